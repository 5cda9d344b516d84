import pytest

from bmm_cli.arch import build_plan, classify
from bmm_cli.errors import InputError


@pytest.mark.parametrize("key,group,conv1d", [
    ("model.layers.3.self_attn.q_proj.weight", "attn_in", False),
    ("model.layers.3.self_attn.k_proj.weight", "attn_in", False),
    ("model.layers.3.self_attn.qkv_proj.weight", "attn_in", False),  # Phi-3 fused
    ("model.layers.3.self_attn.o_proj.weight", "attn_out", False),
    ("model.layers.3.mlp.gate_up_proj.weight", "mlp_in", False),  # Phi-3 fused
    ("model.layers.3.mlp.up_proj.weight", "mlp_in", False),
    ("model.layers.3.mlp.down_proj.weight", "mlp_out", False),
    ("transformer.h.1.attn.c_attn.weight", "attn_in", True),
    ("h.1.attn.c_proj.weight", "attn_out", True),
    ("transformer.h.1.mlp.c_fc.weight", "mlp_in", True),
    ("transformer.h.1.mlp.c_proj.weight", "mlp_out", True),
    ("bert.encoder.layer.2.attention.self.query.weight", "attn_in", False),
    ("encoder.layer.2.attention.output.dense.weight", "attn_out", False),
    ("encoder.layer.2.intermediate.dense.weight", "mlp_in", False),
    ("encoder.layer.2.output.dense.weight", "mlp_out", False),
    ("vit.encoder.layer.0.attention.attention.value.weight", "attn_in", False),
    ("vision_model.encoder.layers.5.self_attn.out_proj.weight", "attn_out", False),
    ("text_model.encoder.layers.0.mlp.fc1.weight", "mlp_in", False),
    ("text_model.encoder.layers.0.mlp.fc2.weight", "mlp_out", False),
    ("visual.transformer.resblocks.7.attn.in_proj_weight", "attn_in", False),
    ("transformer.resblocks.7.attn.out_proj.weight", "attn_out", False),
    ("transformer.resblocks.7.mlp.c_fc.weight", "mlp_in", False),
    ("transformer.resblocks.7.mlp.c_proj.weight", "mlp_out", False),
])
def test_classify_groups(key, group, conv1d):
    ref = classify(key, (8, 8))
    assert ref is not None and ref.group == group and ref.conv1d == conv1d
    assert ref.layer == int([p for p in key.split(".") if p.isdigit()][0])


@pytest.mark.parametrize("key", [
    "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
    "encoder.layer.0.attention.output.LayerNorm.weight", "model.layers.0.self_attn.q_proj.bias",
    "encoder.layer.0.attention.self.query.bias", "pooler.dense.weight", "transformer.wte.weight",
])
def test_others(key):
    assert classify(key, (8, 8)) is None


def test_only_2d_is_solvable():
    assert classify("model.layers.0.self_attn.q_proj.weight", (8,)) is None


def test_plan_blocks_groups_and_unknown():
    keys = [(f"vision_model.encoder.layers.{i}.mlp.fc1.weight", (4, 4)) for i in range(6)]
    keys += [(f"text_model.encoder.layers.{i}.mlp.fc1.weight", (4, 4)) for i in range(3)]
    keys += [("model.layers.0.block_sparse_moe.experts.0.w9.weight", (4, 4)), ("logit_scale", ())]
    plan = build_plan(keys)
    assert len(plan.blocks) == 9
    assert plan.stack_layers == {"text_model.encoder.layers": 3, "vision_model.encoder.layers": 6}
    groups = {b.id: plan.block_group(b, 3) for b in plan.blocks}
    assert groups["vision_model.encoder.layers.0"] == 0 and groups["vision_model.encoder.layers.5"] == 2
    assert groups["text_model.encoder.layers.1"] == 1 and groups["vision_model.encoder.layers.2"] == 1
    assert plan.unknown == ["model.layers.0.block_sparse_moe.experts.0.w9.weight"]
    assert "logit_scale" in plan.others


def test_plan_refuses_unknown_architecture():
    with pytest.raises(InputError, match="no solvable module"):
        build_plan([("foo.weight", (3, 3)), ("bar.bias", (3,))], source="x")


@pytest.mark.parametrize("key,group,family,expert", [
    ("model.layers.1.block_sparse_moe.experts.7.w1.weight", "mlp_in", "moe", 7),
    ("model.layers.1.block_sparse_moe.experts.7.w3.weight", "mlp_in", "moe", 7),
    ("model.layers.1.block_sparse_moe.experts.7.w2.weight", "mlp_out", "moe", 7),
    ("model.layers.1.mlp.experts.12.gate_proj.weight", "mlp_in", "moe", 12),
    ("model.layers.1.mlp.experts.12.down_proj.weight", "mlp_out", "moe", 12),
    ("model.layers.1.mlp.shared_expert.up_proj.weight", "mlp_in", "moe", None),
    ("gpt_neox.layers.1.attention.query_key_value.weight", "attn_in", "neox", None),
    ("gpt_neox.layers.1.attention.dense.weight", "attn_out", "neox", None),
    ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "mlp_in", "neox", None),
    ("transformer.h.1.self_attention.query_key_value.weight", "attn_in", "falcon", None),
    ("transformer.h.1.mlp.dense_4h_to_h.weight", "mlp_out", "falcon", None),
    ("model.layers.1.self_attn.dense.weight", "attn_out", "phi", None),
    ("model.decoder.layers.1.fc1.weight", "mlp_in", "opt", None),
    ("decoder.block.1.layer.1.EncDecAttention.k.weight", "attn_in", "t5", None),
    ("decoder.block.1.layer.2.DenseReluDense.wi_1.weight", "mlp_in", "t5", None),
    ("encoder.block.1.layer.0.SelfAttention.o.weight", "attn_out", "t5", None),
    ("encoder.block.1.layer.1.DenseReluDense.wo.weight", "mlp_out", "t5", None),
])
def test_classify_more_layouts(key, group, family, expert):
    ref = classify(key, (8, 8))
    assert (ref.group, ref.family, ref.expert, ref.layer) == (group, family, expert, 1)


@pytest.mark.parametrize("key", ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.gate.weight",
                                 "model.layers.0.mlp.router.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
def test_routers_are_known_others(key):
    plan = build_plan([(key, (3, 8)), ("model.layers.0.self_attn.q_proj.weight", (8, 8))])
    assert key in plan.others and plan.unknown == []


def test_fused_experts_are_one_module_per_slice():
    import torch

    from bmm_cli.arch import assemble_fused, read_module

    E, H, F = 3, 8, 5
    keys = [("model.layers.0.mlp.experts.gate_up_proj", (E, H, 2 * F)),
            ("model.layers.0.mlp.experts.down_proj", (E, F, H)),
            ("model.layers.0.mlp.router.weight", (E, H)), ("model.layers.0.self_attn.q_proj.weight", (H, H))]
    off = build_plan(keys)
    assert "model.layers.0.mlp.experts.gate_up_proj" in off.others and len(off.modules) == 1
    assert off.unknown == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    plan = build_plan(keys, fused=True, hidden=H)
    gu = [m for m in plan.modules if m.tensor == "model.layers.0.mlp.experts.gate_up_proj"]
    assert [m.key for m in gu] == [f"model.layers.0.mlp.experts.gate_up_proj[{e}]" for e in range(E)]
    assert all(m.conv1d and m.group == "mlp_in" for m in gu)
    assert {m.group for m in plan.modules if m.tensor and "down" in m.tensor} == {"mlp_out"}
    assert "model.layers.0.mlp.router.weight" in plan.others
    # transformers' in-memory layout [E, d_out, d_in] is recognised from the hidden size
    mem = build_plan([("model.layers.0.mlp.experts.gate_up_proj", (E, 2 * F, H))], fused=True, hidden=H)
    assert not any(m.conv1d for m in mem.modules)
    w = torch.randn(E, H, 2 * F)
    parts = {m.key: read_module(m, {m.tensor: w}.__getitem__) for m in gu}
    assert torch.equal(parts[gu[1].key], w[1]) and torch.equal(assemble_fused(gu, parts), w)
    with pytest.raises(InputError, match="incomplete"):
        assemble_fused(gu[:2] + gu[:1], parts)

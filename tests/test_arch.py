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
    keys += [("model.layers.0.block_sparse_moe.experts.0.w1.weight", (4, 4)), ("logit_scale", ())]
    plan = build_plan(keys)
    assert len(plan.blocks) == 9
    assert plan.stack_layers == {"text_model.encoder.layers": 3, "vision_model.encoder.layers": 6}
    groups = {b.id: plan.block_group(b, 3) for b in plan.blocks}
    assert groups["vision_model.encoder.layers.0"] == 0 and groups["vision_model.encoder.layers.5"] == 2
    assert groups["text_model.encoder.layers.1"] == 1 and groups["vision_model.encoder.layers.2"] == 1
    assert plan.unknown == ["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert "logit_scale" in plan.others


def test_plan_refuses_unknown_architecture():
    with pytest.raises(InputError, match="no solvable module"):
        build_plan([("foo.weight", (3, 3)), ("bar.bias", (3,))], source="x")

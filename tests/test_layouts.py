"""Every supported layout on a tiny random model of its transformers class: each block weight is mapped to a λ group
(only routers, norms, biases and T5's position table stay "other"), and ``bmm merge`` changes every block weight and
writes a model that loads with ``from_pretrained`` and gives finite logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import perturb, save
from safetensors import safe_open

from bmm_cli.arch import build_plan

H = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2)


def _model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**H, num_local_experts=3, num_experts_per_tok=2))
    if kind == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**H, num_experts=3, num_experts_per_tok=2,
                                                        moe_intermediate_size=24, shared_expert_intermediate_size=40))
    if kind == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**H, num_experts=3, num_experts_per_tok=2,
                                                        moe_intermediate_size=24, head_dim=8))
    if kind == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4))
    if kind == "falcon":
        return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4))
    if kind == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4))
    if kind == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=32,
                                              max_position_embeddings=64))
    if kind == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                         num_decoder_layers=3, num_heads=4))
    if kind == "t5_gated":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                         num_heads=4, feed_forward_proj="gated-gelu",
                                                         tie_word_embeddings=False))
    raise ValueError(kind)


KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_neox", "falcon", "phi", "opt", "t5", "t5_gated")
# 2-D keys inside a block that are meant to stay "other"
ROUTER = ("block_sparse_moe.gate.weight", "mlp.gate.weight", "shared_expert_gate.weight", "relative_attention_bias")


def _keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _block_weights(keys: dict[str, tuple[int, ...]]) -> list[str]:
    return [k for k, s in keys.items() if len(s) == 2 and k.endswith(".weight") and ".embed" not in k
            and any(f".{n}." in k for n in ("layers", "h", "block")) and not any(r in k for r in ROUTER)]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            base = _model(kind)
            base_dir = save(base, root / "base")
            experts = []
            for t in range(2):
                m = _model(kind)
                m.load_state_dict(base.state_dict())
                experts.append(save(perturb(m, 100 + t), root / f"e{t}"))
            cache[kind] = (base_dir, experts)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_weight_is_solved(layouts, kind):
    base, _ = layouts(kind)
    keys = _keys(base)
    plan = build_plan(keys.items(), source=kind)
    solved = {m.key for m in plan.modules}
    block = _block_weights(keys)
    assert block and set(block) == solved
    assert plan.unknown == []
    if "moe" in kind or kind == "mixtral":
        experts = [m for m in plan.modules if m.expert is not None]
        assert {m.expert for m in experts} == {0, 1, 2} and {m.group for m in experts} == {"mlp_in", "mlp_out"}
    if kind.startswith("t5"):
        assert set(plan.stack_layers) == {"encoder.block", "decoder.block"}


def _logits(kind: str, path) -> torch.Tensor:
    import transformers as tf

    cls = tf.T5ForConditionalGeneration if kind.startswith("t5") else tf.AutoModelForCausalLM
    model = cls.from_pretrained(str(path)).eval()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        if kind.startswith("t5"):
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_merge_changes_every_block_weight(layouts, kind, tmp_path):
    base, experts = layouts(kind)
    out = tmp_path / "merged"
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", "merge", "--base", str(base), "--experts",
                        *map(str, experts), "--out", str(out), "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    with safe_open(str(base / "model.safetensors"), "pt") as b, safe_open(str(out / "model.safetensors"), "pt") as o:
        for k in _block_weights(_keys(base)):
            assert not torch.equal(b.get_tensor(k), o.get_tensor(k)), k
    assert torch.isfinite(_logits(kind, out)).all()


def test_gpt_oss_fused_experts_split_per_expert(tmp_path):
    """GPT-OSS stores its experts fused, [E, d_in, d_out]: one module per expert slice, in transformers' own
    orientation (expert e computes x @ gate_up_proj[e])."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GptOssConfig(**H, num_local_experts=3, num_experts_per_tok=2, head_dim=8)
    path = save(tf.GptOssForCausalLM(cfg), tmp_path / "oss")
    keys = _keys(path)
    plan = build_plan(keys.items(), fused=True, hidden=cfg.hidden_size)
    fused = [m for m in plan.modules if m.tensor]
    assert len(fused) == 2 * 2 * 3 and all(m.conv1d for m in fused)
    assert not [k for k in plan.others if len(keys[k]) == 3]
    assert "model.layers.0.mlp.router.weight" in plan.others and plan.unknown == []
    ref = next(m for m in fused if m.key == "model.layers.1.mlp.experts.down_proj[2]")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        from bmm_cli.arch import read_module

        w = read_module(ref, f.get_tensor)
    assert ref.group == "mlp_out" and w.shape == (cfg.intermediate_size, cfg.hidden_size)  # [d_in, d_out]


def test_data_grams_are_refused_for_moe_experts_up_front(layouts, tmp_path):
    """transformers holds MoE experts fused in memory, so the data Grams' hooks have no module to attach to."""
    base, experts = layouts("mixtral")
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "a b c"}\n')
    out = tmp_path / "merged"
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", "merge", "--base", str(base), "--experts",
                        *map(str, experts), "--calib", f"1={calib}", f"2={calib}", "--out", str(out)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "MoE expert FFNs" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "merged.bmm-work").exists()

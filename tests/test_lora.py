"""LoRA experts: PEFT adapters (written by peft itself) read as task vectors, checked against peft's own merge."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save, tiny_model

from bmm_cli.errors import InputError
from bmm_cli.lora import LoraCheckpoint, module_scale, open_expert, read_adapter, split_spec
from bmm_cli.store import Checkpoint

peft = pytest.importorskip("peft")


def make_adapter(model, path, seed: int, **cfg):
    """A peft adapter with random A and B (so every ΔW is non-zero), saved with safetensors."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or ".lora_B." in n and n.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(path))
    return pm


def peft_merged_state(base_dir, adapter_dir, kind):
    import transformers as tf

    cls = tf.GPT2LMHeadModel if kind == "gpt2" else tf.LlamaForCausalLM
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(str(base_dir)), str(adapter_dir))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-llama")
    return save(tiny_model("llama", 0), root / "base")


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-gpt2")
    return save(tiny_model("gpt2", 0), root / "base")


def _check_against_peft(base_dir, adapter_dir, kind):
    base = Checkpoint.open(base_dir)
    ck = LoraCheckpoint.open(base, adapter_dir)
    merged = peft_merged_state(base_dir, adapter_dir, kind)
    changed = 0
    for key in base.meta:
        if key not in merged:  # tied lm_head
            continue
        ours = ck.get(key).float()
        assert torch.allclose(ours, merged[key].float(), atol=1e-6, rtol=1e-5), key
        changed += not torch.equal(base.get(key), merged[key])
    assert changed == len(ck.adapter.touched()) > 0
    return ck


def test_plain_lora_matches_peft_merge(llama_base, tmp_path):
    make_adapter(tiny_model("llama", 0), tmp_path / "a", 1, r=4, lora_alpha=8,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ck = _check_against_peft(llama_base, tmp_path / "a", "llama")
    m = ck.adapter.modules["model.layers.0.self_attn.q_proj.weight"]
    assert (m.rank, m.scale, m.conv1d) == (4, 2.0, False)
    P, A = ck.factors("model.layers.0.self_attn.q_proj.weight")
    assert torch.allclose(P @ A, ck.task_vector("model.layers.0.self_attn.q_proj.weight"))
    assert ck.task_vector("model.norm.weight") is None


def test_rslora_patterns_modules_to_save_and_embedding(llama_base, tmp_path):
    make_adapter(tiny_model("llama", 0), tmp_path / "a", 2, r=4, lora_alpha=6, use_rslora=True,
                 target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"],
                 rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    ck = _check_against_peft(llama_base, tmp_path / "a", "llama")
    mods = ck.adapter.modules
    assert mods["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(6 / 2 ** 0.5)
    assert mods["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(3 / 2)
    assert mods["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(6 / 2)
    assert mods["model.embed_tokens.weight"].embedding and "lm_head.weight" in ck.adapter.full


def test_conv1d_and_lora_bias_match_peft_merge(gpt2_base, tmp_path):
    make_adapter(tiny_model("gpt2", 0), tmp_path / "a", 3, r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"],
                 fan_in_fan_out=True, lora_bias=True)
    ck = _check_against_peft(gpt2_base, tmp_path / "a", "gpt2")
    m = ck.adapter.modules["transformer.h.0.attn.c_attn.weight"]
    assert m.conv1d and m.bias_key == "transformer.h.0.attn.c_attn.bias"


def test_module_scale_rule():
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"^model.layers.0.mlp.*": 4}, "alpha_pattern": {"o_proj": 2}}
    assert module_scale(cfg, "model.layers.0.mlp.up_proj") == (4, 4.0)
    assert module_scale(cfg, "model.layers.1.self_attn.o_proj") == (8, 0.25)
    assert module_scale(cfg, "model.layers.1.self_attn.xo_proj") == (8, 2.0)
    assert module_scale({**cfg, "use_rslora": True, "rank_pattern": {}}, "a.q")[1] == pytest.approx(16 / 8 ** 0.5)


@pytest.mark.parametrize("cfg,option", [
    ({"use_dora": True}, "use_dora"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"peft_type": "LOHA"}, "peft_type LOHA"),
])
def test_unsupported_adapters_are_refused_in_one_line(llama_base, tmp_path, cfg, option):
    make_adapter(tiny_model("llama", 0), tmp_path / "a", 4, r=2, target_modules=["q_proj"])
    p = tmp_path / "a" / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **cfg}))
    with pytest.raises(InputError, match=option) as exc:
        read_adapter(tmp_path / "a", {k: m.shape for k, m in Checkpoint.open(llama_base).meta.items()})
    assert str(tmp_path / "a") in str(exc.value) and "\n" not in str(exc.value)


def test_real_dora_adapter_is_refused(llama_base, tmp_path):
    make_adapter(tiny_model("llama", 0), tmp_path / "d", 5, r=2, target_modules=["q_proj"], use_dora=True)
    base = Checkpoint.open(llama_base)
    with pytest.raises(InputError, match=r"LoRA expert .*/d: use_dora is not supported"):
        open_expert(str(tmp_path / "d"), base)


def test_adapter_for_another_base_is_refused(gpt2_base, llama_base, tmp_path):
    make_adapter(tiny_model("llama", 0), tmp_path / "a", 6, r=2, target_modules=["q_proj"])
    with pytest.raises(InputError, match="matches no tensor of the base"):
        open_expert(str(tmp_path / "a"), Checkpoint.open(gpt2_base))


def test_pickle_only_adapter_is_refused(llama_base, tmp_path):
    make_adapter(tiny_model("llama", 0), tmp_path / "a", 7, r=2, target_modules=["q_proj"])
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(InputError, match="pickle"):
        open_expert(str(tmp_path / "a"), Checkpoint.open(llama_base))


def test_specs(llama_base, gpt2_base, tmp_path):
    assert split_spec("org/base+org/adapter") == ("org/base", "org/adapter")
    assert split_spec("some/model") == (None, "some/model")
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert split_spec(str(plus)) == (None, str(plus))
    make_adapter(tiny_model("llama", 0), tmp_path / "a", 8, r=2, target_modules=["q_proj"])
    base = Checkpoint.open(llama_base)
    assert open_expert(str(llama_base), base) is None  # a full model
    assert isinstance(open_expert(f"{llama_base}+{tmp_path / 'a'}", base), LoraCheckpoint)
    assert isinstance(open_expert(str(tmp_path / "a"), base), LoraCheckpoint)
    with pytest.raises(InputError, match="is not the merge's base"):
        open_expert(f"{gpt2_base}+{tmp_path / 'a'}", base)
    with pytest.raises(InputError, match="not a PEFT adapter"):
        open_expert(f"{llama_base}+{gpt2_base}", base)

"""LoRA experts merged by the low-rank solve, written as a full model and as one PEFT adapter: same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import save, tiny_model
from test_lora import make_adapter

from bmm_cli.errors import InputError
from bmm_cli.lora import LoraCheckpoint, ModuleUpdate, compress, write_peft_adapter
from bmm_cli.lowrank import lowrank_free_stats, lowrank_solve_factors, ta_anchor_in_basis
from bmm_cli.store import Checkpoint

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = (2, 3, 4)
IDS = torch.tensor([[3, 17, 42, 5, 99, 7]])


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Base, three LoRA experts of ranks 2, 3, 4 and the BMM merge of every adapted module as rank-9 factors."""
    root = tmp_path_factory.mktemp("lora-merge")
    base_dir = save(tiny_model("llama", 0), root / "base")
    for t, r in enumerate(RANKS):
        make_adapter(tiny_model("llama", 0), root / f"a{t}", 10 + t, r=r, lora_alpha=2 * r, target_modules=TARGETS)
    base = Checkpoint.open(base_dir)
    experts = [LoraCheckpoint.open(base, root / f"a{t}") for t in range(len(RANKS))]
    updates = {}
    for key in experts[0].adapter.modules:
        st = lowrank_free_stats([e.factors(key) for e in experts], key=key)
        u, Q = lowrank_solve_factors(st, ta_anchor_in_basis(st, 0.5), 0.1, key=key)
        updates[key] = (u, Q)
    return root, base_dir, updates


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _full_model_logits(base_dir, updates, out):
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(str(base_dir))
    sd = model.state_dict()
    with torch.no_grad():
        for key, (u, Q) in updates.items():
            sd[key] += (u @ Q.mT).float()
    model.load_state_dict(sd)
    model.save_pretrained(str(out))
    return _logits(tf.LlamaForCausalLM.from_pretrained(str(out)))


def _adapter_logits(base_dir, out):
    import transformers as tf

    return _logits(peft.PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(str(base_dir)), str(out)))


def test_adapter_output_equals_full_merge(merged, tmp_path):
    _, base_dir, updates = merged
    full = _full_model_logits(base_dir, updates, tmp_path / "full")
    rep = write_peft_adapter(tmp_path / "ad", [ModuleUpdate(k, u, Q.mT) for k, (u, Q) in updates.items()],
                             rank=sum(RANKS), base_model=str(base_dir))
    assert rep["rank"] == sum(RANKS) and all(m["energy"] == pytest.approx(1.0) for m in rep["modules"].values())
    adapter = _adapter_logits(base_dir, tmp_path / "ad")
    assert torch.allclose(adapter, full, atol=1e-5)
    import transformers as tf

    assert not torch.allclose(_logits(tf.LlamaForCausalLM.from_pretrained(str(base_dir))), full, atol=1e-3)


def test_truncated_adapter_reports_energy(merged, tmp_path):
    _, base_dir, updates = merged
    ups = [ModuleUpdate(k, u, Q.mT) for k, (u, Q) in updates.items()]
    rep = write_peft_adapter(tmp_path / "ad", ups, rank=2)
    assert rep["rank"] == 2
    for k, (u, Q) in updates.items():
        S = torch.linalg.svdvals(u.double() @ Q.double().mT)
        assert rep["modules"][k]["energy"] == pytest.approx(float(S[:2].square().sum() / S.square().sum()), rel=1e-9)
        assert rep["modules"][k]["rank"] == 2 and rep["modules"][k]["energy"] < 1
    full = _full_model_logits(base_dir, updates, tmp_path / "full")
    assert not torch.allclose(_adapter_logits(base_dir, tmp_path / "ad"), full, atol=1e-6)


def test_compress_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g, dtype=torch.float64)
    B, A, e = compress(W, torch.eye(20, dtype=torch.float64), None)
    assert A.shape[0] == 5 and e == pytest.approx(1.0) and torch.allclose(B @ A, W, atol=1e-10)
    U, S, Vh = torch.linalg.svd(W)
    B, A, e = compress(W, torch.eye(20, dtype=torch.float64), 3)
    assert torch.allclose(B @ A, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-10)
    B, A, e = compress(torch.zeros(4, 2), torch.zeros(2, 3), 2)
    assert A.shape == (0, 3) and e == 1.0


def test_conv1d_bias_and_modules_to_save(tmp_path):
    import transformers as tf

    base_dir = save(tiny_model("gpt2", 0), tmp_path / "base")
    base = tf.GPT2LMHeadModel.from_pretrained(str(base_dir))
    g = torch.Generator().manual_seed(1)
    ups, sd = [], base.state_dict()
    for i in range(3):
        key = f"transformer.h.{i}.attn.c_attn.weight"
        L, R = torch.randn(96, 2, generator=g) * 0.1, torch.randn(2, 32, generator=g) * 0.1
        db = torch.randn(96, generator=g) * 0.1
        ups.append(ModuleUpdate(key, L, R, conv1d=True, bias=db))
        sd[key] = sd[key] + (L @ R).T  # Conv1D stores [d_in, d_out]
        sd[key.replace("weight", "bias")] = sd[key.replace("weight", "bias")] + db
    head = sd["transformer.ln_f.weight"] + 0.3
    sd["transformer.ln_f.weight"] = head
    want = tf.GPT2LMHeadModel.from_pretrained(str(base_dir))
    want.load_state_dict(sd)
    saved = {"transformer.ln_f.weight": head, "transformer.ln_f.bias": sd["transformer.ln_f.bias"]}
    write_peft_adapter(tmp_path / "ad", ups, rank=4, modules_to_save=saved)
    got = peft.PeftModel.from_pretrained(tf.GPT2LMHeadModel.from_pretrained(str(base_dir)), str(tmp_path / "ad"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(got.eval()(input_ids=ids).logits, want.eval()(input_ids=ids).logits, atol=1e-5)


def test_refusals(tmp_path):
    u = ModuleUpdate.dense("a.weight", torch.ones(2, 2))
    with pytest.raises(InputError, match="--rank must be"):
        write_peft_adapter(tmp_path / "o", [u], rank=0)
    with pytest.raises(InputError, match="fan_in_fan_out"):
        write_peft_adapter(tmp_path / "o", [u, ModuleUpdate.dense("b.weight", torch.ones(2, 2), conv1d=True)])
    (tmp_path / "o").mkdir()
    with pytest.raises(InputError, match="exists"):
        write_peft_adapter(tmp_path / "o", [u])
    assert list((tmp_path).iterdir()) == [tmp_path / "o"]

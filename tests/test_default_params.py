"""The default merge (λ by the evidence, s = 1) against the same rule evaluated in fp64 from the checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb, save, tiny_tokenizer

from bmm_cli.anchor import anchor
from bmm_cli.closed_form import free_stats, solve_direct
from bmm_cli.default_params import module_lams, params_per_layer
from bmm_cli.defaults import FREE_LAM_FACTOR
from bmm_cli.evidence import evidence_lam, fill_degenerate, residual_energy, spectrum
from bmm_cli.gram import gram
from bmm_cli.params import Params
from bmm_cli.solve import solve
from bmm_cli.store import Checkpoint
from bmm_cli.taskvec import taskvec
from bmm_cli.workdir import AnchorStage, load_project, to_linear

F64 = torch.float64


def _llama(seed: int = 0, intermediate: int = 160):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def rank_deficient(tmp_path_factory):
    """A tiny Llama whose down_proj is [32, 160] with two experts: T·d_out = 64 < d_in = 160, so Ĝ of down_proj
    has a 96-dimensional null space (k/v: [16, 32], T·d_out = 32 = d_in)."""
    root = tmp_path_factory.mktemp("rankdef")
    base = _llama()
    base_dir = save(base, root / "base")
    tiny_tokenizer().save_pretrained(str(base_dir))
    experts = []
    for t in range(2):
        m = _llama()
        m.load_state_dict(base.state_dict())
        perturb(m, 200 + t)
        experts.append(save(m, root / f"expert{t}"))
    work = root / "work"
    taskvec(str(base_dir), [str(e) for e in experts], work)
    anchor(work, "ta")
    gram(work, "free")
    return base_dir, experts, work


def _reference(work, base_dir, experts):
    """{key: U} of the default merge computed in fp64 from the checkpoints: task vectors, Ĝ, B̂, the evidence λ
    per module, its geometric mean per (layer, group) and the closed form."""
    proj = load_project(work)
    base = Checkpoint.open(base_dir)
    exps = [Checkpoint.open(e) for e in experts]
    anc = AnchorStage(work, "ta")
    stats, u0s, lams = {}, {}, {}
    for blk in proj.plan.blocks:
        a = anc.block(blk)
        for ref in blk.modules:
            w0 = to_linear(ref, base.get(ref.key)).to(F64)
            taus = torch.stack([to_linear(ref, e.get(ref.key)).to(F64) - w0 for e in exps])
            st = free_stats(taus, key=ref.key)
            u0 = a.get(ref.key).to(F64)
            S = residual_energy(taus, None, u0, st.m, key=ref.key)
            sp = spectrum(st.G_hat, st.B_hat, u0, S, float(taus.shape[0] * taus.shape[1]), key=ref.key)
            stats[ref.key], u0s[ref.key], lams[ref.key] = st, u0, evidence_lam(sp)
    lams = fill_degenerate(lams)
    params = Params.from_flat(params_per_layer(work, {k: v * FREE_LAM_FACTOR for k, v in lams.items()}, 1.0))
    out = {}
    for blk in proj.plan.blocks:
        for ref in blk.modules:
            lam, s = params.lam_scale(proj, blk, ref.group)
            st = stats[ref.key]
            out[ref.key] = s * solve_direct(st.G_hat, st.B_hat, u0s[ref.key], lam, key=ref.key, dtype=F64)
    return out, lams


def test_default_merge_equals_the_fp64_formula_on_rank_deficient_modules(rank_deficient, tmp_path):
    base_dir, experts, work = rank_deficient
    solve(work, "ta", "free", out=tmp_path / "m", device="cpu")
    ref_u, ref_lams = _reference(work, base_dir, experts)
    proj = load_project(work)
    got, base = Checkpoint.open(tmp_path / "m"), Checkpoint.open(base_dir)
    errs = {}
    for ref in proj.plan.modules:
        u = to_linear(ref, got.get(ref.key)).to(F64) - to_linear(ref, base.get(ref.key)).to(F64)
        errs[ref.key] = float((u - ref_u[ref.key]).norm() / ref_u[ref.key].norm())
    assert max(errs.values()) < 1e-4, {k: f"{v:.2e}" for k, v in errs.items() if v >= 1e-4}
    lams = module_lams(work, "ta", "free")
    assert lams.keys() == ref_lams.keys()
    for key, v in lams.items():
        assert math.isclose(v, ref_lams[key], rel_tol=1e-3), (key, v, ref_lams[key])


def test_modules_no_expert_changed_stay_out_of_the_group_mean(tmp_path):
    """LoRA-like experts that change q, v, up and down only: k, o and gate have Ĝ = 0 and no evidence, so they
    neither get a λ of their own nor pull their group's mean towards the top of the λ range."""
    base = _llama(intermediate=48)
    base_dir = save(base, tmp_path / "base")
    tiny_tokenizer().save_pretrained(str(base_dir))
    experts = []
    for t in range(3):
        m = _llama(intermediate=48)
        m.load_state_dict(base.state_dict())
        perturb(m, 300 + t)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not any(s in name for s in ("q_proj", "v_proj", "up_proj", "down_proj")):
                    p.copy_(base.get_parameter(name))
        experts.append(save(m, tmp_path / f"expert{t}"))
    work = tmp_path / "work"
    taskvec(str(base_dir), [str(e) for e in experts], work)
    anchor(work, "ta")
    gram(work, "free")
    lams = module_lams(work, "ta", "free")
    key = "model.layers.{}.{}.weight".format
    assert not any(key(i, m) in lams for i in (0, 1) for m in ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj"))
    flat = params_per_layer(work, lams, 1.0)
    for i in (0, 1):
        q, v = lams[key(i, "self_attn.q_proj")], lams[key(i, "self_attn.v_proj")]
        assert flat[f"lam_{i}_attn_in"] == pytest.approx(math.sqrt(q * v), rel=1e-12)
        assert flat[f"lam_{i}_mlp_in"] == pytest.approx(lams[key(i, "mlp.up_proj")], rel=1e-12)
        assert flat[f"lam_{i}_mlp_out"] == pytest.approx(lams[key(i, "mlp.down_proj")], rel=1e-12)

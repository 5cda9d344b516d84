"""bench/evidence_study.py on a tiny real llama family: its fp64 statistics and in-memory merge agree with the
library (the evidence λ of fp64 statistics, and the model `bmm solve --params` writes from the same params file)."""

import math

import pytest
import torch

from bench.evidence_study import (
    apply_rule,
    build_factors,
    effective_ranks,
    implied_n,
    marginal_weights,
    merged_update,
    module_lam,
    n_obs,
    parse_rule,
    pooled,
    rule_lams,
    spectral_ranks,
)
from bmm_cli.anchor import anchor
from bmm_cli.default_params import module_lams
from bmm_cli.evidence import evidence_lam, residual_energy, spectrum
from bmm_cli.gram import gram
from bmm_cli.solve import solve
from bmm_cli.taskvec import taskvec


@pytest.fixture(scope="module")
def study(family, tmp_path_factory):
    base, experts = family("llama")
    work = tmp_path_factory.mktemp("study") / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "ta")
    gram(work, "free")
    recs, proj = build_factors(work, ["ta"])
    return work, recs, proj, base


def test_parse_rule():
    assert parse_rule("fp64") == ("fp64", "1")
    assert parse_rule("pr+aa") == ("pr", "aa")
    assert parse_rule("x10@0.9") == ("x10", "0.9")
    with pytest.raises(ValueError):
        parse_rule("fp64@big")


def test_fp64_rule_is_the_evidence_of_the_raw_task_vectors(study):
    work, recs, proj, _ = study
    lams = rule_lams(recs, "ta", "fp64", None)
    blk = proj.plan.blocks[0]
    ref = blk.modules[0]
    taus = proj.taus(blk, ref).double()
    from bmm_cli.workdir import AnchorStage
    u0 = AnchorStage(work, "ta").block(blk).get(ref.key).double()
    G = sum(u.T @ u for u in taus)
    B = sum(u @ u.T @ u for u in taus)
    m = float(torch.diagonal(G).sum()) / G.shape[0]
    S = residual_energy(taus, None, u0, m)
    want = evidence_lam(spectrum(G / m, B / m, u0, S, taus.shape[0] * taus.shape[1]))
    if want > 1e-6 * 1.01:  # not a degenerate module (those take the median of the others)
        assert lams[ref.key] == pytest.approx(want, rel=1e-3)
    lib = module_lams(work, "ta", "free")
    assert sorted(lib) == sorted(lams)


def test_n_obs_rules_on_a_hand_made_spectrum():
    rec = {"lam": torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=torch.float64), "T": 3, "d_out": 5}
    assert n_obs(rec, "fp64") == 15
    assert n_obs(rec, "n0.1") == pytest.approx(1.5)
    assert n_obs(rec, "rank") == 3
    assert n_obs(rec, "pr") == pytest.approx(16 / 6)


def test_spectral_ranks_by_hand():
    pr, er = spectral_ranks(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert pr == pytest.approx(2.0) and er == pytest.approx(2.0)  # two equal directions: both count 2
    pr, er = spectral_ranks(torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert pr == pytest.approx(16 / 10)
    assert er == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert spectral_ranks(torch.zeros(3, dtype=torch.float64)) == (0.0, 0.0)


def test_effective_ranks_of_a_rank_one_task_vector():
    u = torch.outer(torch.arange(1.0, 6.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    pr, er = effective_ranks(u)
    assert pr == pytest.approx(1.0, rel=1e-9) and er == pytest.approx(1.0, rel=1e-6)  # 5 rows, one direction


def test_implied_n_reproduces_the_factor(study):
    _, recs, _, _ = study
    r = next(r for r in recs if module_lam(r, "ta", r["T"] * r["d_out"]) is not None)
    n0 = r["T"] * r["d_out"]
    lam0 = module_lam(r, "ta", n0)
    assert implied_n(r, "ta", 1.0) == pytest.approx(n0, rel=1e-3)
    n = implied_n(r, "ta", 3.0)
    if n is not None:  # the tiny family may hit the λ range before 3x
        assert n < n0
        assert module_lam(r, "ta", n) == pytest.approx(3 * lam0, rel=1e-2)


def test_marginal_update_is_a_mixture_of_map_updates(study):
    _, recs, _, _ = study
    r = recs[0]
    w = marginal_weights(r, "ta", 3.0)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    from bench import evidence_study as es
    want = sum(float(wk) * merged_update(r, "ta", float(lk)).double() for wk, lk in zip(w, es.GRID))
    got = merged_update(r, "ta", 1.0, w).double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_in_memory_merge_equals_bmm_solve_params(study, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    work, recs, _, base = study
    params = pooled(work, rule_lams(recs, "ta", "fp64", None))
    for k in params:
        if k.startswith("s_"):
            params[k] = 0.9
    import json
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps(params))
    solve(work, "ta", "free", out=tmp_path / "m", params_file=pf)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    s = apply_rule(model, recs, "ta", params, "0.9", None)
    assert set(s.values()) == {0.9}
    written = {}
    for f in sorted((tmp_path / "m").glob("*.safetensors")):
        written.update(load_file(str(f)))
    sd = model.state_dict()
    for r in recs:
        a, b = sd[r["key"]], written[r["key"]]
        # bmm solve reads the stored fp32 Ĝ, the study its fp64 recomputation: equal to ~1e-5 of the weights
        assert math.isclose(float((a - b).norm()), 0.0, abs_tol=1e-4 * float(b.norm()))
        assert float((a - b).norm()) < 0.1 * float((b - r["w0"]).norm())  # and far below the update itself

"""The whole-model trial solver against per-module direct solves, in every cache placement (fp64 on CPU)."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.closed_form import (
    _matmul_precision,
    data_stats,
    eig_gram,
    factorize,
    free_stats,
    solve_direct,
    solve_hybrid_trial,
)
from bmm_cli.errors import InputError, NumericError
from bmm_cli.trial_solver import TrialSolver

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grams_(T: int, d_in: int, seed: int = 1, n: int = 50) -> torch.Tensor:
    x = torch.randn(T, n, d_in, generator=gen(seed), dtype=F64)
    return x.mT @ x / n  # mean of x xᵀ over n tokens


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------------------
# TrialSolver
# ---------------------------------------------------------------------------------------------------------

SHAPES = {"q": (8, 8), "k": (4, 8), "up": (12, 8), "down": (8, 12)}


def _model(dtype=F64, n_blocks=3, seed=20):
    """{key: (stats, U0, W_pre, block)} for a tiny Llama-like model; block 1 uses the zero anchor."""
    g = gen(seed)
    mods = {}
    for b in range(n_blocks):
        for name, (d_out, d_in) in SHAPES.items():
            key = f"model.layers.{b}.{name}.weight"
            taus = torch.randn(3, d_out, d_in, generator=g, dtype=F64) * 0.1
            U0 = None if b == 1 else taus.mean(0)
            W = torch.randn(d_out, d_in, generator=g, dtype=F64)
            mods[key] = (free_stats(taus), U0, W.to(dtype), b)
    return mods


def _lams_scales(mods):
    lams = {k: 10.0 ** (-2 + i % 4) for i, k in enumerate(mods)}
    scales = {k: 1.0 + 0.1 * (i % 3) for i, k in enumerate(mods)}
    return lams, scales


@pytest.mark.parametrize("spill", [False, True])
def test_trial_solver_equals_per_module_direct_solves(tmp_path, spill):
    mods = _model()
    lams, scales = _lams_scales(mods)
    solver = TrialSolver("cpu", spill_dir=tmp_path / "spill", host_budget_bytes=0 if spill else None)
    base = {}
    for i, (key, (st, U0, W, b)) in enumerate(mods.items()):
        f = factorize(st.G_hat, st.B_hat, U0, dtype=F64)
        if i % 2:  # half the base weights come from the provider
            solver.add(key, f, block=b)
            base[key] = W
        else:
            solver.add(key, f, W, block=b)
    plan = solver.plan()
    assert plan["blocks"] == 3 and plan["modules"] == len(mods)
    assert plan["where"] == ({"disk": 3} if spill else {"device": 3})
    for trial in range(2):  # the cache serves repeated trials
        got = list(solver.solve(lams, scales, base))
        assert [k for k, _ in got] == list(mods)
        for key, W in got:
            st, U0, W_pre, _ = mods[key]
            want = W_pre + scales[key] * solve_direct(st.G_hat, st.B_hat, U0, lams[key])
            assert W.dtype == F64 and W.device.type == "cpu"
            torch.testing.assert_close(W, want, rtol=1e-10, atol=1e-10)
    solver.close()
    assert not list((tmp_path / "spill").glob("*")) if spill else True


def test_trial_solver_output_dtype_and_scalar_params():
    mods = _model(dtype=torch.bfloat16, n_blocks=1)
    solver = TrialSolver("cpu")
    for key, (st, U0, W, b) in mods.items():
        solver.add(key, factorize(st.G_hat, st.B_hat, U0), W, block=b)
    for key, W in solver.solve(0.5, 1.1):  # one λ and one scale for all
        st, U0, W_pre, _ = mods[key]
        assert W.dtype == torch.bfloat16  # the base's dtype by default
        want = (W_pre.double() + 1.1 * solve_direct(st.G_hat, st.B_hat, U0, 0.5)).to(torch.bfloat16)
        assert rel(W, want) < 1e-2
    out = dict(solver.solve(0.5, 1.1, out_dtype=torch.float32))
    assert all(w.dtype == torch.float32 for w in out.values())


def test_trial_solver_hybrid_and_shared_q():
    g = gen(30)
    solver = TrialSolver("cpu")
    taus = torch.randn(2, 6, 5, generator=g, dtype=F64)
    grams = grams_(2, 5)
    f, d = free_stats(taus), data_stats(taus, grams)
    W = torch.randn(6, 5, generator=g, dtype=F64)
    solver.add_hybrid("blk0.hyb", f, d, None, W, block=0)
    # two modules sharing one input (data-assisted q and k): one Q stored once
    eig = eig_gram(d.G_hat, dtype=F64)
    fq = factorize(d.G_hat, d.B_hat, None, dtype=F64, eig=eig)
    fk = factorize(d.G_hat, 0.5 * d.B_hat, None, dtype=F64, eig=eig)
    solver.add("blk1.q", fq, W, block=1)
    solver.add("blk1.k", fk, W, block=1)
    assert solver.plan()["bytes"] < 2 * fq.nbytes + 3 * W.numel() * 8 + 2 * (f.G_hat.numel() + f.B_hat.numel()) * 8
    out = dict(solver.solve({"blk0.hyb": 0.3, "blk1.q": 0.3, "blk1.k": 0.3}, 1.0, eps=0.6))
    torch.testing.assert_close(out["blk0.hyb"], W + solve_hybrid_trial(f, d, None, 0.3, 0.6))
    torch.testing.assert_close(out["blk1.k"], W + solve_direct(d.G_hat, 0.5 * d.B_hat, None, 0.3))
    with pytest.raises(InputError, match="blk0.hyb: hybrid module needs ε"):
        list(solver.solve(0.3, 1.0))


def test_trial_solver_errors_name_the_module():
    mods = _model(n_blocks=1)
    solver = TrialSolver("cpu")
    keys = list(mods)
    for key, (st, U0, W, b) in mods.items():
        solver.add(key, factorize(st.G_hat, st.B_hat, U0, dtype=F64), block=b)
    with pytest.raises(InputError, match=keys[0]):
        solver.add(keys[0], factorize(mods[keys[0]][0].G_hat, mods[keys[0]][0].B_hat, None), block=0)
    with pytest.raises(InputError, match=f"{keys[0]}: no base weight"):
        list(solver.solve(0.1, 1.0))
    base = {k: v[2] for k, v in mods.items()}
    with pytest.raises(InputError, match=f"{keys[0]}: no λ"):
        list(solver.solve({}, 1.0, base))
    bad = dict(base)
    bad[keys[2]] = torch.full_like(base[keys[2]], float("nan"))
    with pytest.raises(NumericError, match=keys[2]):
        list(solver.solve(0.1, 1.0, bad))
    f0 = factorize(mods[keys[0]][0].G_hat, mods[keys[0]][0].B_hat, None)
    solver.add("other", f0, block=1)  # opens block 1, seals block 0
    with pytest.raises(InputError, match="already sealed"):
        solver.add("other2", f0, block=0)


def test_tf32_flag_is_scoped():
    # TF32 is switched on only around our own GEMMs (the flag is global in torch) and restored afterwards.
    m = torch.backends.cuda.matmul
    before = m.fp32_precision
    with _matmul_precision(torch.device("cuda"), "tf32"):
        assert m.fp32_precision == "tf32"
    with _matmul_precision(torch.device("cpu"), "tf32"):
        assert m.fp32_precision == before
    assert m.fp32_precision == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget,where", [(None, "device"), (0, "host"), (0, "disk")])  # resident / streamed
def test_trial_solver_cuda_matches_cpu(budget, where, tmp_path):                # from pinned host / spilled
    mods = _model(dtype=torch.float32, n_blocks=4)
    lams, scales = _lams_scales(mods)
    cpu = TrialSolver("cpu")
    gpu = TrialSolver("cuda", budget_bytes=budget, host_budget_bytes=0 if where == "disk" else None,
                      spill_dir=tmp_path / "spill")
    for key, (st, U0, W, b) in mods.items():
        f = factorize(st.G_hat.float(), st.B_hat.float(), None if U0 is None else U0.float())
        cpu.add(key, f, W, block=b)
        gpu.add(key, f.to("cuda"), W.cuda(), block=b)
    assert gpu.plan()["where"] == {where: 4}
    want = dict(cpu.solve(lams, scales))
    got = list(gpu.solve(lams, scales))
    assert [k for k, _ in got] == list(want)
    for key, W in got:
        assert W.device.type == "cpu" and W.dtype == torch.float32
        torch.testing.assert_close(W, want[key], rtol=1e-4, atol=1e-5)


def test_trial_solver_host_budget(tmp_path):
    """Blocks fill the host budget in order, the rest go to disk; an explicit budget without a spill dir is an
    error naming the block; the results do not depend on the placement."""
    mods = _model()
    lams, scales = _lams_scales(mods)

    def build(**kw):
        s = TrialSolver("cpu", **kw)
        for key, (st, U0, W, b) in mods.items():
            s.add(key, factorize(st.G_hat, st.B_hat, U0, dtype=F64), W, block=b)
        return s

    ref = build()
    one = ref.plan()["max_block_bytes"]
    want = dict(ref.solve(lams, scales))
    s = build(host_budget_bytes=2 * one, spill_dir=tmp_path / "spill")
    plan = s.plan()
    assert plan["where"] == {"device": 2, "disk": 1} and plan["host_bytes"] <= 2 * one
    assert plan["budget_source"]["host"] == "given" and plan["host_budget_bytes"] == 2 * one
    got = dict(s.solve(lams, scales))
    assert all(torch.equal(got[k], want[k]) for k in want)
    s.close()
    with pytest.raises(InputError, match="block 1 .* does not fit the host memory budget"):
        build(host_budget_bytes=one).plan()
    with pytest.raises(InputError, match="host_budget_bytes must be >= 0"):
        TrialSolver("cpu", host_budget_bytes=-1)

"""bmm_cli.evidence.free_spectra (the smaller side's eigh, straight from the task vectors) against the fp64 route
through Ĝ (free_stats, residual_energy, spectrum), in fp64 on small rank-deficient and full-rank cases.

Both routes compute ``R(λ) = Ŝ - Σ c_i/(λ+Λ_i)`` by a difference; where a module can fit every task
(``T·d_out < d_in``), ``R(λ) ≪ Ŝ`` at small λ and the two agree to ~1e-9 in the log-evidence there (rounding of
either route), which moves the argmax by ≲ 1e-5 relative; elsewhere they agree to ~1e-7 (the argmax's own
resolution, ~√ε₆₄)."""

from __future__ import annotations

import pytest
import torch

from bmm_cli import evidence as ev
from bmm_cli.closed_form import free_stats

GRID = torch.logspace(-6, 2, 33, dtype=torch.float64)


def _taus(T, d_out, d_in, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(T, d_out, d_in, generator=g, dtype=torch.float64)
    lo = torch.randn(T, d_out, rank, generator=g, dtype=torch.float64)
    return lo @ torch.randn(T, rank, d_in, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        T, d_out, d_in, generator=g, dtype=torch.float64)


def _finetune(T, d_out, d_in, seed, rank=4):
    """Like a fine-tune's task vectors: a rank-``rank`` part with 70 % of the energy plus 30 % dense noise (fp32)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(T, d_out, rank, generator=g) @ torch.randn(T, rank, d_in, generator=g) / rank ** 0.5
    return 0.7 ** 0.5 * lo + 0.3 ** 0.5 * torch.randn(T, d_out, d_in, generator=g)


def _fp64_route(taus, u0, n):
    st = free_stats(taus)
    return ev.spectrum(st.G_hat, st.B_hat, u0, ev.residual_energy(taus, None, u0, st.m), n)


@pytest.mark.parametrize("T,d_out,d_in,rank", [
    (3, 8, 40, None),   # T·d_out < d_in: rank-deficient Ĝ, the small side
    (2, 5, 11, 2),      # the same, low rank plus noise
    (3, 20, 16, None),  # T·d_out ≥ d_in: full rank, Ĝ itself
    (3, 24, 12, 3),
    (1, 12, 12, None),  # T·d_out = d_in
])
@pytest.mark.parametrize("anchor", ["zero", "mean", "other"])
def test_equal_to_the_fp64_route(T, d_out, d_in, rank, anchor):
    taus = _taus(T, d_out, d_in, 17 * d_in + d_out, rank)
    u0 = {"zero": None, "mean": taus.mean(0), "other": 0.3 * taus[0] + 0.1}[anchor]
    n = float(T * d_out)
    ref = _fp64_route(taus, u0, n)
    (got,) = ev.free_spectra(taus, [u0], n)
    assert got.S == pytest.approx(ref.S, rel=1e-10)
    assert int((got.lam > 0).sum()) == int((ref.lam > 0).sum()) == min(T * d_out, d_in)
    assert torch.allclose(torch.sort(got.lam).values, torch.sort(ref.lam).values, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ev.log_evidence(GRID, got), ev.log_evidence(GRID, ref), rtol=1e-9, atol=1e-8)
    assert ev.evidence_lam(got) == pytest.approx(ev.evidence_lam(ref), rel=1e-5)


def test_several_anchors_share_one_decomposition():
    taus = _taus(3, 6, 30, 5, rank=2)
    anchors = [None, taus.mean(0), taus[1]]
    got = ev.free_spectra(taus, anchors, 18.0)
    for sp, u0 in zip(got, anchors):
        ref = _fp64_route(taus, u0, 18.0)
        assert ev.evidence_lam(sp) == pytest.approx(ev.evidence_lam(ref), rel=1e-5)


def test_low_rank_task_vectors_give_exact_zeros():
    """Rank-2 task vectors (no noise): Ĝ has rank ≤ T·2, K too; the rest are exact zeros with c = 0."""
    g = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 10, 2, generator=g, dtype=torch.float64) @ torch.randn(3, 2, 50, generator=g,
                                                                                   dtype=torch.float64)
    u0 = taus.mean(0)
    (got,) = ev.free_spectra(taus, [u0], 30.0)
    ref = _fp64_route(taus, u0, 30.0)
    assert int((got.lam > 0).sum()) == 6 and bool((got.c[got.lam == 0] == 0).all())
    assert ev.evidence_lam(got) == pytest.approx(ev.evidence_lam(ref), rel=1e-5)


def test_no_evidence_when_the_anchor_is_the_task_vector_or_nothing_changed():
    taus = _taus(1, 6, 20, 9)
    (sp,) = ev.free_spectra(taus, [taus[0]], 6.0)
    assert sp.S == 0.0 and not ev.has_evidence(sp)
    (sp,) = ev.free_spectra(_taus(1, 20, 6, 9), [_taus(1, 20, 6, 9)[0]], 20.0)
    assert sp.S == 0.0 and not ev.has_evidence(sp)
    (sp,) = ev.free_spectra(torch.zeros(2, 4, 8, dtype=torch.float64), [None], 8.0)
    assert not ev.has_evidence(sp) and sp.lam.shape == (8,)


def test_refuses_a_wrong_shape():
    from bmm_cli.errors import InputError

    with pytest.raises(InputError, match="mod: task vectors must be"):
        ev.free_spectra(torch.zeros(4, 4), [None], 4.0, key="mod")


@pytest.mark.parametrize("T,d_out,d_in", [(3, 48, 400), (4, 40, 200), (3, 160, 64), (5, 64, 96)])
def test_fp32_gives_the_fp64_lambda(T, d_out, d_in):
    """precision="float32" (what "auto" runs from FP32_MIN_SIDE up) against the fp64 route: the dual side
    (T·d_out < d_in) and the primal side, low rank plus noise like a fine-tune, three anchors."""
    taus = _finetune(T, d_out, d_in, 3 * d_in + d_out)
    anchors = [taus.mean(0), None, 0.5 * taus[0]]
    n = float(T * d_out)
    got = ev.free_spectra(taus, anchors, n, precision="float32")
    ref = ev.free_spectra(taus.double(), [None if a is None else a.double() for a in anchors], n,
                          precision="float64")
    for g, r in zip(got, ref):
        assert (g.e is not None) == (T * d_out < d_in) and r.lam_floor == 0 < g.lam_floor < 1e-3
        trusted = GRID[GRID >= 10 * g.lam_floor]
        assert torch.allclose(ev.log_evidence(trusted, g), ev.log_evidence(trusted, r), rtol=1e-5)
    assert ev.free_lams(taus, anchors, n, precision="float32") == pytest.approx(
        [ev.evidence_lam(r) for r in ref], rel=1e-4)


def test_a_lambda_near_the_fp32_floor_is_recomputed_in_fp64(monkeypatch):
    taus = _taus(3, 20, 90, 6, rank=3).float()
    ref = ev.free_lams(taus, [None], 60.0, precision="float64")
    calls = []
    orig = ev.free_spectra

    def spy(*a, **k):
        calls.append(k["precision"])
        sps = orig(*a, **k)
        for sp in sps:  # pretend fp32 were as coarse as the λ itself
            sp.lam_floor = sp.lam_floor and 1.0
        return sps

    monkeypatch.setattr(ev, "free_spectra", spy)
    assert ev.free_lams(taus, [None], 60.0, precision="float32") == ref and calls == ["float32", "float64"]


def test_the_dual_residual_is_taken_without_a_difference():
    """Where one W fits every task (T·d_out < d_in), R(λ) → 0 as λ → 0 and Ŝ - Σ c_i/(λ+Λ_i) subtracts two
    nearly equal numbers; the e form is the same residual, and it keeps fp32's spectrum usable down to small λ."""
    taus = _taus(3, 40, 300, 11, rank=3).float()
    u0 = taus.mean(0)
    (sp32,) = ev.free_spectra(taus, [u0], 120.0, precision="float32")
    (sp64,) = ev.free_spectra(taus.double(), [u0.double()], 120.0, precision="float64")
    lam = torch.logspace(-5, 1, 13, dtype=torch.float64).reshape(-1, 1)
    R_e = (sp64.e * (lam / (lam + sp64.lam))).sum(1)
    R_diff = sp64.S - (sp64.c / (lam + sp64.lam)).sum(1)
    assert torch.allclose(R_e, R_diff, rtol=1e-6)  # the same function (fp64, where the difference still works)
    R_32 = (sp32.e * (lam / (lam + sp32.lam))).sum(1)
    assert torch.allclose(R_32, R_e, rtol=1e-3)
    R_32_diff = sp32.S - (sp32.c / (lam + sp32.lam)).sum(1)  # what the difference form makes of the fp32 spectrum
    assert float(((R_32_diff - R_e) / R_e).abs()[0]) > 1e-2


def test_fp32_falls_back_to_fp64_where_one_w_fits_every_task():
    """T = 1, d_out = d_in: R(0) = 0, which fp32's difference puts off by ~1e-7 of Ŝ; recomputed in fp64."""
    taus = _taus(1, 24, 24, 5).float()
    for u0 in (None, 0.5 * taus[0]):
        (got,) = ev.free_spectra(taus, [u0], 24.0, precision="float32")
        (ref,) = ev.free_spectra(taus, [u0], 24.0, precision="float64")
        assert torch.equal(got.lam, ref.lam) and torch.equal(got.c, ref.c) and got.S == ref.S


def test_fp32_rank_rule_keeps_real_eigenvalues_and_drops_rounding():
    g = torch.Generator().manual_seed(4)
    low = (torch.randn(3, 30, 2, generator=g) @ torch.randn(3, 2, 200, generator=g))  # rank 2 per task
    (sp,) = ev.free_spectra(low, [low.mean(0)], 90.0, precision="float32")
    assert int((sp.lam > 0).sum()) == 6
    full = _taus(3, 30, 200, 8).float()  # full rank, eigenvalues spread over ~2 decades
    (sp,) = ev.free_spectra(full, [None], 90.0, precision="float32")
    assert int((sp.lam > 0).sum()) == 90


def test_auto_is_fp64_below_the_fp32_size_and_precision_is_checked():
    from bmm_cli.errors import InputError

    taus = _taus(3, 20, 50, 2).float()
    (a,) = ev.free_spectra(taus, [None], 60.0)
    (b,) = ev.free_spectra(taus, [None], 60.0, precision="float64")
    assert ev.FP32_MIN_SIDE > 60 and torch.equal(a.lam, b.lam) and torch.equal(a.c, b.c) and a.lam_floor == 0
    with pytest.raises(InputError, match="mod: evidence precision"):
        ev.free_spectra(taus, [None], 60.0, key="mod", precision="bf16")

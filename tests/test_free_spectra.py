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

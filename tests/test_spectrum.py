"""bmm_cli.spectrum: the fp32-eigh-refined-in-fp64 eigen-decomposition against torch.linalg.eigh in fp64."""

from __future__ import annotations

import pytest
import torch

from bmm_cli import evidence, spectrum
from bmm_cli.errors import InputError, NumericError

f64 = torch.float64


def _taus(T, d_out, d_in, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(T, d_out, d_in, generator=g, dtype=f64)
    return torch.randn(T, d_out, rank, generator=g, dtype=f64) @ torch.randn(T, rank, d_in, generator=g, dtype=f64)


def _check_pairs(G, lam, Q, atol_rel=1e-10):
    top = float(lam.max()) if lam.numel() else 0.0
    assert lam.dtype == f64 and Q.dtype == f64
    assert bool((lam[1:] >= lam[:-1]).all())  # ascending
    assert bool((lam >= 0).all())
    # every column an eigenvector: ‖Ĝq - λq‖ small against Λ_max
    res = (G @ Q - Q * lam).norm(dim=0)
    assert float(res.max()) <= 1e-5 * max(top, 1e-300)
    assert float((Q.T @ Q - torch.eye(Q.shape[1], dtype=f64)).abs().max()) < 1e-4


def test_full_rank_matches_fp64_eigh():
    A = torch.randn(300, 120, generator=torch.Generator().manual_seed(1), dtype=f64)
    G = A.T @ A / 300
    ref = torch.linalg.eigvalsh(G)
    lam, Q = spectrum.eigh(G)
    assert torch.allclose(lam, ref, rtol=0, atol=1e-9 * float(ref.max()))  # second order in the fp32 residual
    assert int((lam == 0).sum()) == 0
    _check_pairs(G, lam, Q)


def test_closed_form_spectrum():
    """Ĝ = V diag(d) Vᵀ with known d spanning twelve decades, repeated values and exact zeros."""
    n = 64
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=f64))
    d = torch.cat([torch.logspace(-12, 0, 40, dtype=f64), torch.full((12,), 0.5, dtype=f64),
                   torch.zeros(12, dtype=f64)])
    G = (V * d) @ V.T
    lam, Q = spectrum.eigh(G, rank_rtol=1e-14)
    want = torch.sort(torch.where(d > 1e-14, d, torch.zeros_like(d))).values
    assert torch.allclose(lam, want, rtol=0, atol=2e-15)
    assert int((lam == 0).sum()) == int((want == 0).sum())
    _check_pairs(G, lam, Q)


@pytest.mark.parametrize("T,d_out,d_in,rank", [(3, 20, 96, None), (2, 30, 128, None), (4, 24, 80, 3)])
def test_rank_deficient_null_space_is_exact_zero(T, d_out, d_in, rank):
    """T·d_out (or T·rank) < d_in: the null space comes out as exact zeros, the rest as fp64 eigh has it."""
    G, _, _ = spectrum.free_gram(_taus(T, d_out, d_in, rank=rank))
    r = T * (rank or d_out)
    assert r < d_in
    lam, Q = spectrum.eigh(G)
    ref = torch.linalg.eigvalsh(G)
    assert int((lam == 0).sum()) == d_in - r
    assert torch.allclose(lam[d_in - r:], ref[d_in - r:], rtol=0, atol=1e-9 * float(ref.max()))
    ref_lam, _ = spectrum.eigh64(G)
    assert int((ref_lam == 0).sum()) == d_in - r  # the reference path decides the same rank
    _check_pairs(G, lam, Q)


def test_zero_and_empty():
    lam, Q = spectrum.eigh(torch.zeros(5, 5, dtype=f64))
    assert bool((lam == 0).all()) and torch.equal(Q, torch.eye(5, dtype=f64))
    lam, Q = spectrum.eigh(torch.zeros(0, 0))
    assert lam.shape == (0,) and Q.shape == (0, 0)


def test_mostly_null_falls_back_to_fp64():
    G, _, _ = spectrum.free_gram(_taus(2, 3, 50))  # rank 6 of 50: the small part is most of it
    lam, Q = spectrum.eigh(G)
    assert int((lam == 0).sum()) == 44
    _check_pairs(G, lam, Q)


@pytest.mark.parametrize("T,d_out,d_in,rank", [(3, 40, 64, None), (2, 20, 64, None), (3, 64, 48, None),
                                               (3, 16, 64, 4)])
def test_evidence_lambda_matches_fp64_eigh(T, d_out, d_in, rank):
    taus = _taus(T, d_out, d_in, seed=5, rank=rank)
    taus = taus + 0.3 * taus.mean(0)  # shared direction: an interior evidence maximum
    G, B, m = spectrum.free_gram(taus)
    u0 = taus.mean(0)
    S = evidence.residual_energy(taus, None, u0, m)
    lams = {}
    for name, fn in (("fp64", spectrum.eigh64), ("fast", spectrum.eigh)):
        lam, Q = fn(G)
        sp = evidence.spectrum_from_factors(lam, B @ Q, u0 @ Q, S, T * d_out)
        lams[name] = evidence.evidence_lam(sp)
    assert lams["fast"] == pytest.approx(lams["fp64"], rel=1e-4)


def test_free_gram_matches_closed_form():
    taus = _taus(3, 7, 5, seed=3)
    G, B, m = spectrum.free_gram(taus)
    G0 = sum(u.T @ u for u in taus)
    B0 = sum(u @ u.T @ u for u in taus)
    m0 = float(G0.trace()) / 5
    assert m == pytest.approx(m0, rel=1e-14)
    assert torch.allclose(G, G0 / m0, rtol=1e-13, atol=0) and torch.allclose(B, B0 / m0, rtol=1e-12, atol=1e-15)
    G, B, m = spectrum.free_gram(torch.zeros(2, 3, 4))
    assert m == 0 and not G.any() and not B.any()


def test_refusals():
    with pytest.raises(InputError, match="square"):
        spectrum.eigh(torch.zeros(3, 4), key="m.weight")
    with pytest.raises(NumericError, match="NaN"):
        spectrum.eigh(torch.full((2, 2), float("nan")))
    with pytest.raises(InputError, match=r"\[T, d_out, d_in\]"):
        spectrum.free_gram(torch.zeros(3, 4))

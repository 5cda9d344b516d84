"""Iso-C and Iso-CTS against direct transcriptions of the published algorithm, plus their spectra and subspaces."""

from __future__ import annotations

import math

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors.iso import iso_cts_split

from ._util import lora_stack, polar, randn


def _run(name, taus, opts=()):
    m = get_method(name)
    return m.module(ModuleInput("w", taus, taus[0]), parse_options(m, list(opts)), None, "cpu")


# ----- Iso-C ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, d_out, d_in", [(3, 8, 5), (2, 4, 10), (1, 6, 6)])
def test_iso_c_flat_spectrum_and_reference(gen, T, d_out, d_in):
    taus = randn(gen, T, d_out, d_in)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    u0 = _run("iso-c", taus, ["alpha=1.3"])
    torch.testing.assert_close(u0, 1.3 * s.mean() * u @ vh, rtol=0, atol=1e-12)
    sv = torch.linalg.svdvals(u0)
    torch.testing.assert_close(sv, torch.full_like(sv, 1.3 * s.mean().item()), rtol=0, atol=1e-12)


def test_iso_c_one_task_keeps_singular_vectors(gen):
    tau = randn(gen, 1, 7, 5)
    u, s, vh = torch.linalg.svd(tau[0], full_matrices=False)
    u0 = _run("iso-c", tau)
    torch.testing.assert_close(u0 @ vh.T, s.mean() * u, rtol=0, atol=1e-12)  # Δ v_i = mean(S) u_i
    torch.testing.assert_close(u.T @ u0, s.mean() * vh, rtol=0, atol=1e-12)


def test_iso_c_rank_deficient_sum_keeps_its_rank(gen):
    a, b = randn(gen, 6, 2), randn(gen, 2, 5)
    taus = torch.stack([a @ b, 0.5 * a @ b])  # rank 2
    s = torch.linalg.svdvals(taus.sum(0))[:2]
    sv = torch.linalg.svdvals(_run("iso-c", taus))
    torch.testing.assert_close(sv[:2], torch.full((2,), s.mean().item(), dtype=torch.float64), rtol=0, atol=1e-12)
    assert sv[2:].max() < 1e-12


# ----- Iso-CTS -------------------------------------------------------------------------------------------------


def test_iso_cts_split_rule():
    assert iso_cts_split(768, 768, 8, 0.8) == (19, 616)
    assert iso_cts_split(4096, 14336, 8, 0.8) == (102, 3280)  # 820/8 = 102.5
    assert iso_cts_split(4096, 14336, 8, 0.8, "round") == (102, 3280)  # half to even, as Python's round
    assert iso_cts_split(768, 3072, 20, 0.8) == (8, 608)  # 154/20 = 7.7, rounded as the reference code
    assert iso_cts_split(768, 3072, 20, 0.8, "floor") == (7, 628)
    assert iso_cts_split(16, 16, 12, 0.8) == (1, 4)  # (16-12)/12 < 1: one direction per task
    assert iso_cts_split(5, 8, 7, 0.8) == (1, 0)  # more tasks than directions: no common subspace


def _reference_iso_cts(taus, frac=0.8, split="round"):
    """Alg. 1 of Marczak et al. 2025 as the reference code runs it (≥ 1 direction per task; ``floor`` is the
    optional split)."""
    T, d_out, d_in = taus.shape
    r = min(d_out, d_in)
    q = (r - math.floor(frac * r)) / T
    k_t = max(1, math.floor(q) if split == "floor" else round(q))
    k_c = max(0, r - T * k_t)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :k_c], s[:k_c], vh[:k_c, :]
    blocks_u, blocks_s, blocks_v = [], [], []
    for t in range(T):
        w_ts = taus[t] - uc @ uc.T @ taus[t]
        ut, st, vt = torch.linalg.svd(w_ts, full_matrices=False)
        blocks_u.append(ut[:, :k_t])
        blocks_s.append(st[:k_t])
        blocks_v.append(vt[:k_t, :])
    U = torch.cat(blocks_u + [uc], dim=1)
    S = torch.cat(blocks_s + [sc])
    V = torch.cat(blocks_v + [vc], dim=0)
    return polar(U) @ torch.diag(torch.full_like(S, S.mean().item())) @ polar(V.T).T, U, S


@pytest.mark.parametrize(
    "T, d_out, d_in", [(3, 10, 7), (2, 6, 12), (1, 9, 9), (12, 16, 16), (7, 8, 5), (4, 20, 6)]
)
def test_iso_cts_matches_reference(gen, T, d_out, d_in):
    taus = randn(gen, T, d_out, d_in)
    expected, _, _ = _reference_iso_cts(taus)
    torch.testing.assert_close(_run("iso-cts", taus, ["alpha=0.9"]), 0.9 * expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T, d_out, d_in", [(3, 10, 7), (12, 16, 16), (2, 6, 12)])
def test_iso_cts_spans_common_and_task_subspaces_with_flat_spectrum(gen, T, d_out, d_in):
    taus = randn(gen, T, d_out, d_in)
    _, U, S = _reference_iso_cts(taus)
    u0 = _run("iso-cts", taus)
    r = min(d_out, d_in)
    uu, sv, _ = torch.linalg.svd(u0, full_matrices=False)
    # orthonormal basis, isotropic: r equal singular values = mean of the kept ones
    torch.testing.assert_close(sv, torch.full((r,), S.mean().item(), dtype=torch.float64), rtol=0, atol=1e-12)
    # its column space is exactly span[task blocks, common block]
    proj = uu @ uu.T
    torch.testing.assert_close(proj @ U, U, rtol=0, atol=1e-11)
    k_t, k_c = iso_cts_split(d_out, d_in, T, 0.8)
    assert U.shape[1] == T * k_t + k_c == r


def test_iso_cts_default_split_is_the_reference_rounding():
    """fusion-bench at r = 384, T = 3 (MiniLM): k_t = round((384 - 307) / 3) = 26, k_c = 306; floor gives 25/309."""
    assert iso_cts_split(384, 384, 3, 0.8) == (26, 306)
    assert iso_cts_split(384, 1536, 3, 0.8, "round") == (26, 306)
    assert iso_cts_split(384, 384, 3, 0.8, "floor") == (25, 309)
    m = get_method("iso-cts")
    assert parse_options(m, []).split == "round"
    assert parse_options(m, ["split=floor"]).split == "floor"


def test_iso_cts_one_task_is_iso_c(gen):
    tau = randn(gen, 1, 9, 6)
    torch.testing.assert_close(_run("iso-cts", tau), _run("iso-c", tau), rtol=0, atol=1e-12)


def test_iso_cts_round_split_matches_reference_code(gen):
    taus = randn(gen, 3, 20, 20)  # common_frac 0.6: (20 - 12)/3 = 2.67 -> floor 2, round 3
    for split, k_t in (("floor", 2), ("round", 3)):
        assert iso_cts_split(20, 20, 3, 0.6, split) == (k_t, 20 - 3 * k_t)
        expected, _, _ = _reference_iso_cts(taus, 0.6, split)
        got = _run("iso-cts", taus, ["common_frac=0.6", f"split={split}"])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["iso-c", "iso-cts"])
@pytest.mark.parametrize("T, d_out, d_in, r", [(2, 32, 32, 4), (3, 24, 40, 3), (4, 48, 20, 4), (2, 16, 16, 6)])
def test_lora_rank_bounds_give_the_exact_low_rank_result(gen, name, T, d_out, d_in, r):
    """Float32 LoRA products have rounding in their null space; flattening the spectrum would lift those directions
    to the mean singular value. With the rank bounds the result is the exact float64 stack's (rank <= Σ r_t)."""
    exact, fp32 = lora_stack(gen, T, d_out, d_in, r)
    m = get_method(name)
    want = m.module(ModuleInput("w", exact, exact[0]), None, None, "cpu")
    got = m.module(ModuleInput("w", fp32, fp32[0], ranks=(r,) * T), None, None, "cpu").double()
    blind = m.module(ModuleInput("w", fp32, fp32[0]), None, None, "cpu").double()
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert int((torch.linalg.svdvals(got) > 1e-6 * float(want.norm())).sum()) <= min(T * r, d_out, d_in)
    assert float((blind - want).norm() / want.norm()) > 0.1  # what the bound fixes

"""The spectral anchors' fast paths and null rule against exact float64 SVDs of the same inputs.

Full-rank inputs with decaying spectra (down to s_min/s_max = 1e-5, below what an fp32 SVD resolves) must keep every
direction and equal the reference formulas; truly rank-deficient inputs must still drop their null space; the
Rayleigh-Ritz and block-polar shortcuts must stay within 1e-4 relative of the exact merge at SmolLM2-135M shapes.
"""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors._spectral import _ritz, leading_triplets

from ._util import randn
from .test_iso import _reference_iso_cts
from .test_tsv import _reference_tsv


def _run(name, taus, opts=()):
    m = get_method(name)
    return m.module(ModuleInput("w", taus, taus[0]), parse_options(m, list(opts)), None, "cpu")


def _with_spectrum(gen, d_out, d_in, s):
    u, _ = torch.linalg.qr(randn(gen, d_out, len(s)))
    v, _ = torch.linalg.qr(randn(gen, d_in, len(s)))
    return (u * s) @ v.T


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm())


def _iso_c_reference(taus):
    u, s, vh = torch.linalg.svd(taus.double().sum(0), full_matrices=False)
    return s.mean() * u @ vh


@pytest.mark.parametrize("d, cond", [(384, 1e5), (1024, 1e3)])
def test_iso_c_keeps_real_small_directions(gen, d, cond):
    """s_min/s_max = 1/cond: the old fp32 cut (s <= s_max·d·eps32) dropped directions at d = 384; the reference keeps
    all r. Two fp32 halves sum exactly, so the fp64 reference sees the very matrix bmm merges."""
    m = _with_spectrum(gen, d, d, torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64))
    taus = torch.stack([m / 2, m / 2]).float()
    got = _run("iso-c", taus)
    assert _rel(got, _iso_c_reference(taus)) <= 1e-4
    sv = torch.linalg.svdvals(got.double())
    assert float(sv.min() / sv.max()) > 0.999  # all d directions carry the flat value: nothing dropped


def _low_rank_exact(gen, d_out, d_in, k):
    """A rank-k product with small integers: exactly representable in fp32, so its null space is exact."""
    a = torch.randint(-3, 4, (d_out, k), generator=gen, dtype=torch.float64)
    b = torch.randint(-3, 4, (k, d_in), generator=gen, dtype=torch.float64)
    return a @ b


def test_iso_c_drops_only_a_true_null_space(gen):
    m = _low_rank_exact(gen, 40, 30, 4)
    taus = torch.stack([m, torch.zeros_like(m)]).float()  # the second expert equals the base here
    got = _run("iso-c", taus).double()
    s = torch.linalg.svdvals(m)[:4]
    sv = torch.linalg.svdvals(got)
    torch.testing.assert_close(sv[:4], torch.full((4,), s.mean().item(), dtype=torch.float64), rtol=1e-5, atol=0)
    assert float(sv[4:].max()) < 1e-5 * float(sv[0])


def test_tsv_keeps_small_leading_directions(gen):
    """Each τ_t decays to 1e-12: its r = d/T leading values reach 1e-6·s_max, below fp32 resolution but real."""
    T, d = 2, 96
    taus = torch.stack([_with_spectrum(gen, d, d, torch.logspace(0, -12, d, dtype=torch.float64)) for _ in range(T)])
    taus = taus.float()
    assert _rel(_run("tsv", taus), _reference_tsv(taus.double())) <= 1e-4


def test_tsv_drops_an_exact_null_space(gen):
    T, d_out, d_in, k = 2, 24, 20, 3  # r = 10 per task, only 3 real
    taus = torch.stack([_low_rank_exact(gen, d_out, d_in, k) for _ in range(T)])
    got = _run("tsv", taus.float()).double()
    us, ss, vs = [], [], []
    for t in range(T):
        u, s, vh = torch.linalg.svd(taus[t], full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    pv, _, qv = torch.linalg.svd(torch.cat(vs, 0).T, full_matrices=False)
    want = (pu @ qu * torch.cat(ss)) @ (pv @ qv).T
    assert _rel(got, want) <= 1e-5


def test_iso_cts_full_rank_decaying_matches_reference(gen):
    T, d = 3, 96
    taus = torch.stack([_with_spectrum(gen, d, d, torch.logspace(0, -5, d, dtype=torch.float64)) for _ in range(T)])
    taus = taus.float()
    want, _, _ = _reference_iso_cts(taus.double())
    assert _rel(_run("iso-cts", taus), want) <= 1e-4


def test_iso_cts_rank_deficient_keeps_only_real_directions(gen):
    T, d, k = 3, 30, 2
    taus = torch.stack([_low_rank_exact(gen, d, d, k) for _ in range(T)])
    got = _run("iso-cts", taus.float()).double()
    sv = torch.linalg.svdvals(got)
    nonzero = int((sv > 1e-5 * sv[0]).sum())
    assert nonzero <= T * k  # never more than the span of the task vectors
    torch.testing.assert_close(sv[:nonzero], sv[:1].expand(nonzero), rtol=1e-5, atol=0)  # flat on what is kept


# ----- fast paths at SmolLM2-135M shapes --------------------------------------------------------------------------


def _smollm_taus(gen, d_out, d_in, spectrum):
    T = 4
    if spectrum == "gaussian":
        return (0.01 * randn(gen, T, d_out, d_in)).float()
    s = torch.logspace(0, -4, min(d_out, d_in), dtype=torch.float64)
    return torch.stack([_with_spectrum(gen, d_out, d_in, s) for _ in range(T)]).float()


@pytest.mark.parametrize("d_out, d_in", [(1536, 576), (576, 1536)])
@pytest.mark.parametrize("spectrum", ["gaussian", "decaying"])
def test_fast_paths_match_exact_merge(gen, d_out, d_in, spectrum):
    taus = _smollm_taus(gen, d_out, d_in, spectrum)
    k = min(d_out, d_in) // 4
    assert _ritz(taus[0], k) is not None  # the shortcut is what is being tested
    # the tolerance: 1e-4, or the error the reference itself makes in fp32 when that is larger (ISO-CTS's
    # orthogonalization of 576 stacked vectors amplifies fp32 rounding to ~1.5e-4 on gaussian stacks)
    for want, ref32, got in (
        (_reference_tsv(taus.double()), _reference_tsv(taus), _run("tsv", taus)),
        (_reference_iso_cts(taus.double())[0], _reference_iso_cts(taus)[0], _run("iso-cts", taus)),
    ):
        assert _rel(got, want) <= max(1e-4, 1.1 * _rel(ref32, want))


def test_leading_triplets_are_exact_triplets(gen):
    a = (0.01 * randn(gen, 300, 200)).float()
    u, s, vh = leading_triplets(a, 40, ritz=True)
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    torch.testing.assert_close(s.double(), s64[:40], rtol=1e-5, atol=0)
    torch.testing.assert_close((u.double() * s.double()) @ vh.double(), (u64[:, :40] * s64[:40]) @ vh64[:40],
                               rtol=0, atol=1e-5 * float(s64[0]))


# ----- LAPACK's divide and conquer failing to converge ------------------------------------------------------------


def _failing_svd(monkeypatch, fail_dtypes):
    """torch.linalg.svd raising LinAlgError for the given dtypes, as gesdd does on some clustered fp32 spectra (an
    ISO-CTS polar stack of SmolLM2-135M experts met it on one thread; the input cannot be made to fail portably)."""
    real = torch.linalg.svd
    calls = []

    def svd(a, *args, **kw):
        calls.append(a.dtype)
        if a.dtype in fail_dtypes and kw.get("driver") is None:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("fail", [(torch.float32,), (torch.float32, torch.float64)], ids=["fp32", "fp32+fp64"])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_svd_thin_recovers_from_gesdd_failure(gen, monkeypatch, fail, shape):
    from bmm_cli.anchors._spectral import svd_thin

    a = randn(gen, *shape).float()
    want = torch.linalg.svd(a.double(), full_matrices=False)
    calls = _failing_svd(monkeypatch, fail)
    u, s, vh = svd_thin(a)
    assert calls[0] == torch.float32 and (torch.float64 in calls)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert u.shape == (shape[0], 120) and vh.shape == (120, shape[1])
    torch.testing.assert_close(s.double(), want[1], rtol=1e-5, atol=0)
    torch.testing.assert_close((u.double() * s.double()) @ vh.double(), a.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(u.double().T @ u.double(), torch.eye(120, dtype=torch.float64), rtol=0, atol=1e-5)


def test_iso_cts_and_tsv_survive_gesdd_failure(gen, monkeypatch):
    taus = _smollm_taus(gen, 1536, 576, "decaying")
    want = {"tsv": _reference_tsv(taus.double()), "iso-cts": _reference_iso_cts(taus.double())[0]}
    calls = _failing_svd(monkeypatch, (torch.float32,))
    for m, w in want.items():
        assert _rel(_run(m, taus), w) <= 1e-4  # the bound the fast paths meet above
    assert torch.float64 in calls

"""The low-rank data-free solve against the dense closed form (fp64), and which anchors keep the Σr_t span."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.closed_form import free_stats, solve_direct
from bmm_cli.errors import InputError
from bmm_cli.lowrank import (
    anchor_residual,
    lowrank_free_stats,
    lowrank_solve,
    lowrank_solve_factors,
    ta_anchor_in_basis,
)

D_OUT, D_IN, RANKS = 40, 56, (2, 3, 4)


def _factors(seed: int = 0, ranks=RANKS, d_out=D_OUT, d_in=D_IN):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d_out, r, generator=g, dtype=torch.float64),
             torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5) for r in ranks]


def _dense(F):
    return torch.stack([P @ A for P, A in F])


def test_stats_equal_the_dense_free_stats():
    F = _factors()
    low, dense = lowrank_free_stats(F), free_stats(_dense(F))
    assert low.rank == sum(RANKS)
    d = low.dense()
    assert low.m == pytest.approx(dense.m, rel=1e-12)
    assert torch.allclose(d.G_hat, dense.G_hat, atol=1e-12) and torch.allclose(d.B_hat, dense.B_hat, atol=1e-12)


def _anchor(name: str, taus: torch.Tensor) -> torch.Tensor:
    m = get_method(name)
    opts = parse_options(m, [])
    state = m.prepare(opts, lambda: iter([("k", taus)]), taus.shape[0]) if m.needs_global_pass else None
    return m.module(ModuleInput("k", taus, torch.zeros_like(taus[0])), opts, state, None)


@pytest.mark.parametrize("anchor", ["pretrained", "ta", "tsv", "iso-c", "ties", "dare-ties", "random"])
@pytest.mark.parametrize("lam", [1e-3, 0.3, 10.0])
def test_solve_equals_dense_closed_form_for_any_anchor(anchor, lam):
    F = _factors(1)
    taus = _dense(F)
    if anchor == "random":
        U0 = torch.randn(D_OUT, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    else:
        U0 = None if anchor == "pretrained" else _anchor(anchor, taus)
    dense = free_stats(taus)
    want = solve_direct(dense.G_hat, dense.B_hat, U0, lam)
    got = lowrank_solve(lowrank_free_stats(F), U0, lam)
    assert torch.allclose(got, want, atol=1e-10 * float(want.abs().max()) + 1e-12)


@pytest.mark.parametrize("anchor,in_span", [("ta", True), ("tsv", True), ("iso-c", True), ("iso-cts", True),
                                            ("ties", False), ("dare", False), ("random", False)])
def test_which_anchors_stay_in_the_span(anchor, in_span):
    F = _factors(2)
    taus = _dense(F)
    st = lowrank_free_stats(F)
    U0 = (torch.randn(D_OUT, D_IN, dtype=torch.float64) if anchor == "random" else _anchor(anchor, taus))
    res = anchor_residual(st, U0)
    assert (res < 1e-10) if in_span else (res > 1e-3), res


def test_factor_form_of_the_ta_merge():
    F = _factors(3)
    st = lowrank_free_stats(F)
    u, Q = lowrank_solve_factors(st, ta_anchor_in_basis(st, 0.7), 0.2)
    dense = free_stats(_dense(F))
    want = solve_direct(dense.G_hat, dense.B_hat, 0.7 * _dense(F).sum(0), 0.2)
    assert u.shape == (D_OUT, sum(RANKS)) and torch.allclose(u @ Q.mT, want, atol=1e-11)


def test_shared_directions_and_zero_updates():
    P, A = _factors(4, ranks=(3,))[0]
    F = [(P, A), (2 * P, A), (torch.zeros_like(P), A)]  # rank-deficient stack: the basis still spans it
    dense = free_stats(_dense(F))
    got = lowrank_solve(lowrank_free_stats(F), None, 0.1)
    assert torch.allclose(got, solve_direct(dense.G_hat, dense.B_hat, None, 0.1), atol=1e-11)
    zero = [(torch.zeros_like(P), A)] * 2
    U0 = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    assert torch.equal(lowrank_solve(lowrank_free_stats(zero), U0, 0.5), U0)  # no evidence: the anchor


def test_bad_inputs_name_the_module():
    F = _factors(5)
    with pytest.raises(InputError, match="q_proj: expert 2's factors"):
        lowrank_free_stats([F[0], (F[1][0][:, :1], F[1][1])], key="q_proj")
    with pytest.raises(InputError, match="add up to"):
        lowrank_free_stats(_factors(6, ranks=(30, 30)), key="q_proj")
    with pytest.raises(InputError, match="λ"):
        lowrank_solve(lowrank_free_stats(F), None, 0.0)


@pytest.mark.parametrize("anchor", ["pretrained", "ties"])
def test_trials_match_the_direct_solve_at_every_lambda(anchor):
    from bmm_cli.lowrank import LowRankTrials

    F = _factors(7)
    taus = _dense(F)
    U0 = None if anchor == "pretrained" else _anchor(anchor, taus)
    st = lowrank_free_stats(F)
    trials = LowRankTrials(st, U0)
    dense = free_stats(taus)
    for lam in (1e-3, 0.05, 2.0):
        assert torch.allclose(trials.apply(lam), solve_direct(dense.G_hat, dense.B_hat, U0, lam), atol=1e-10)
    with pytest.raises(InputError, match="λ"):
        trials.apply(-1.0)

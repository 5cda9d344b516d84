"""WUDI: the closed-form gradient against autograd of the stated loss, and the optimization against the reference
loop (autograd + torch.optim.Adam)."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors.wudi import WudiObjective, wudi_merge

from ._util import randn


def _loss(tau_m, taus):
    """Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F, written out."""
    total = 0.0
    for t in range(taus.shape[0]):
        total = total + ((tau_m - taus[t]) @ taus[t].T).pow(2).sum() / taus[t].pow(2).sum()
    return total


@pytest.mark.parametrize("route", ["gram", "factored"])
@pytest.mark.parametrize("T, d_out, d_in", [(3, 6, 4), (2, 3, 11), (1, 5, 5)])
def test_closed_form_gradient_and_loss_match_autograd(gen, route, T, d_out, d_in):
    taus = randn(gen, T, d_out, d_in)
    tau_m = randn(gen, d_out, d_in).requires_grad_(True)
    loss = _loss(tau_m, taus)
    (grad,) = torch.autograd.grad(loss, tau_m)
    obj = WudiObjective(taus, route)
    assert obj.route == route
    g, loss_got = obj.grad_and_loss(tau_m.detach())
    torch.testing.assert_close(g, grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_got, loss.detach(), rtol=1e-12, atol=1e-12)


def test_auto_route_picks_the_cheaper_product():
    assert WudiObjective(torch.randn(8, 64, 16, dtype=torch.float64)).route == "gram"
    assert WudiObjective(torch.randn(2, 4, 32, dtype=torch.float64)).route == "factored"  # 2·T·d_out < d_in


def _reference_wudi(taus, lr, steps):
    """The reference loop: τ_m as a Parameter, autograd, torch.optim.Adam."""
    vectors = taus.clone()
    merging = torch.nn.Parameter(vectors.sum(dim=0).clone())
    opt = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    l2 = vectors.reshape(vectors.shape[0], -1).norm(dim=-1).square()
    for _ in range(steps):
        inner = (merging.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)
        loss = (inner.square() / l2[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging.detach()


@pytest.mark.parametrize("route", ["gram", "factored"])
def test_optimization_matches_reference_loop(gen, route):
    taus = randn(gen, 3, 5, 7)
    tau_m, losses = wudi_merge(taus, lr=1e-2, steps=40, route=route)
    torch.testing.assert_close(tau_m, _reference_wudi(taus, 1e-2, 40), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(losses[-1], _loss(tau_m, taus), rtol=1e-10, atol=1e-10)


def test_loss_decreases_with_default_settings(gen):
    taus = randn(gen, 4, 8, 6)
    m = get_method("wudi")
    u0 = m.module(ModuleInput("w", taus, taus[0]), None, None, "cpu")
    tau_m, losses = wudi_merge(taus)  # lr 1e-5, 300 steps
    assert torch.equal(u0, tau_m)
    diffs = losses[1:] - losses[:-1]
    assert (diffs < 0).all() and losses[-1] < losses[0]
    assert _loss(taus.sum(0), taus) > _loss(u0, taus)


def test_zero_task_vector_contributes_nothing(gen):
    taus = randn(gen, 2, 4, 3)
    with_zero = torch.cat([taus, torch.zeros(1, 4, 3, dtype=taus.dtype)])
    a, _ = wudi_merge(taus, lr=1e-3, steps=20)
    b, _ = wudi_merge(with_zero, lr=1e-3, steps=20)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert torch.equal(wudi_merge(torch.zeros(2, 3, 3), steps=3)[0], torch.zeros(3, 3))


def test_options_and_other(gen):
    m = get_method("wudi")
    taus = randn(gen, 2, 4, 5)
    opts = parse_options(m, ["steps=0"])
    u0 = m.module(ModuleInput("w", taus, taus[0]), opts, None, "cpu")
    torch.testing.assert_close(u0, taus.sum(0), rtol=0, atol=0)
    b, tv = randn(gen, 6), randn(gen, 2, 6)
    torch.testing.assert_close(m.other("norm", b, tv, opts, None), b + tv.mean(0), rtol=0, atol=1e-15)

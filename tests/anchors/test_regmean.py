"""RegMean against the least-squares problem it solves and a direct (inverse-based) evaluation of its formula."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors.regmean import regmean_merge
from bmm_cli.errors import InputError, NumericError

from ._util import randn


def _grams(xs):
    return torch.stack([x.T @ x / x.shape[0] for x in xs])


def _run(taus, base, grams, opts=()):
    m = get_method("regmean")
    return m.module(ModuleInput("w", taus, base, grams=grams), parse_options(m, list(opts)), None, "cpu")


def test_one_task_alpha_one_gives_that_expert(gen):
    taus, base = randn(gen, 1, 5, 4), randn(gen, 5, 4)
    grams = _grams([randn(gen, 12, 4)])
    u0 = _run(taus, base, grams, ["alpha=1"])
    torch.testing.assert_close(base + u0, base + taus[0], rtol=0, atol=1e-13)


@pytest.mark.parametrize("T, d_out, d_in", [(3, 5, 4), (2, 3, 8)])
def test_alpha_one_is_least_squares_on_the_pooled_inputs(gen, T, d_out, d_in):
    n = 3 * d_in
    taus, base = randn(gen, T, d_out, d_in), randn(gen, d_out, d_in)
    xs = [randn(gen, n, d_in) for _ in range(T)]
    u0 = _run(taus, base, _grams(xs), ["alpha=1"])
    # argmin_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²: stack the rows of every task
    X = torch.cat(xs)
    Y = torch.cat([xs[t] @ (base + taus[t]).T for t in range(T)])
    w_ls = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(base + u0, w_ls, rtol=0, atol=1e-11)


@pytest.mark.parametrize("alpha", [0.95, 0.1, 0.0])
def test_matches_direct_formula(gen, alpha):
    T, d_out, d_in = 3, 6, 5
    taus, base = randn(gen, T, d_out, d_in), randn(gen, d_out, d_in)
    grams = _grams([randn(gen, 4, d_in) for _ in range(T)])  # n < d_in: each G_t singular, the sum is not
    gt = [alpha * grams[t] + (1 - alpha) * torch.diag(torch.diag(grams[t])) for t in range(T)]
    w = sum((base + taus[t]) @ gt[t] for t in range(T)) @ torch.linalg.inv(sum(gt))
    torch.testing.assert_close(_run(taus, base, grams, [f"alpha={alpha}"]), w - base, rtol=0, atol=1e-11)
    if alpha == 0.95:
        torch.testing.assert_close(_run(taus, base, grams), w - base, rtol=0, atol=1e-11)  # the default


def test_dead_input_feature_keeps_the_base_weight(gen):
    T, d_out, d_in = 2, 4, 5
    taus = randn(gen, T, d_out, d_in)
    xs = [randn(gen, 10, d_in) for _ in range(T)]
    for x in xs:
        x[:, 2] = 0.0  # feature 2 never active: Σ G̃ is singular
    u0, path = regmean_merge(taus, _grams(xs), 1.0)
    assert path == "pinv-fp64"
    assert u0[:, 2].abs().max() < 1e-13
    keep = [0, 1, 3, 4]
    sub = regmean_merge(taus[:, :, keep], _grams([x[:, keep] for x in xs]), 1.0)[0]
    torch.testing.assert_close(u0[:, keep], sub, rtol=0, atol=1e-11)


def test_ill_conditioned_float32_falls_back_to_float64(gen):
    T, d_out, d_in = 2, 3, 6
    taus = randn(gen, T, d_out, d_in, dtype=torch.float32)
    scale = torch.tensor([1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3], dtype=torch.float64)  # cond ≈ 1e6
    xs = [randn(gen, 20, d_in) * scale for _ in range(T)]
    grams = _grams(xs)
    u0, path = regmean_merge(taus, grams.float(), 1.0)
    assert path == "cholesky-fp64" and u0.dtype == torch.float32
    exact = regmean_merge(taus.double(), grams.float().double(), 1.0)[0]  # same (rounded) inputs, all in fp64
    torch.testing.assert_close(u0.double(), exact, rtol=1e-6, atol=1e-6)
    _, path32 = regmean_merge(taus, _grams([randn(gen, 20, d_in) for _ in range(T)]).float(), 1.0)
    assert path32 == "cholesky"


def test_grams_are_required_and_checked(gen):
    taus, base = randn(gen, 2, 3, 4), randn(gen, 3, 4)
    with pytest.raises(InputError, match="Grams"):
        _run(taus, base, None)
    with pytest.raises(InputError, match=r"\[2, 4, 4\]"):
        _run(taus, base, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    bad = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    bad[1, 0, 0] = -1.0
    with pytest.raises(NumericError, match="negative diagonal"):
        _run(taus, base, bad)
    b, tv = randn(gen, 3), randn(gen, 2, 3)
    torch.testing.assert_close(get_method("regmean").other("bias", b, tv, None, None), b + tv.mean(0))

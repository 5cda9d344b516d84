"""Type-II maximum likelihood λ (bmm_cli/evidence.py) against a brute-force Gaussian evidence in fp64."""

import math

import pytest
import torch

from bmm_cli.errors import InputError, NumericError
from bmm_cli.evidence import (
    evidence_lam,
    fill_degenerate,
    log_evidence,
    log_evidence_dense,
    residual_energy,
    spectrum,
    spectrum_from_factors,
)


def _problem(seed=0, d_in=4, d_out=3, n_t=(5, 6), noise=0.3):
    """Two tasks with their own inputs X_t and weights U_t (= U* + task-specific part); anchor U0."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    Ustar = r(d_out, d_in)
    Xs = [r(n, d_in) for n in n_t]
    Us = [Ustar + noise * r(d_out, d_in) for _ in n_t]
    U0 = 0.5 * Ustar + 0.1 * r(d_out, d_in)
    G = sum(x.T @ x for x in Xs)
    B = sum(u @ (x.T @ x) for u, x in zip(Us, Xs))
    X = torch.cat(Xs)
    Y = torch.cat([x @ u.T for u, x in zip(Us, Xs)])
    return Xs, Us, U0, G, B, X, Y


def _closed_form_unprofiled(sp, lam_abs, beta, d_out):
    """−½ Σ_j [N log 2π − N log β + Σ_i log(1 + Λ_i/λ) + β R_j] with λ = α/β, R = Σ_j R_j."""
    n = sp.n_obs
    R = sp.S - float((sp.c / (lam_abs + sp.lam)).sum())
    occ = float(torch.log1p(sp.lam / lam_abs).sum())
    return -0.5 * (d_out * (n * math.log(2 * math.pi) - n * math.log(beta) + occ) + beta * R)


@pytest.mark.parametrize("anchor", [True, False])
def test_closed_form_equals_dense_gaussian(anchor):
    Xs, Us, U0, G, B, X, Y = _problem()
    u0 = U0 if anchor else None
    S = residual_energy(Us, [x.T @ x for x in Xs], u0, 1.0)
    sp = spectrum(G, B, u0, S, n_obs=X.shape[0])
    for alpha, beta in [(0.5, 2.0), (3.0, 0.7), (0.05, 10.0)]:
        dense = log_evidence_dense(X, Y, u0, alpha, beta)
        assert _closed_form_unprofiled(sp, alpha / beta, beta, Y.shape[1]) == pytest.approx(dense, rel=1e-10)


def test_profiled_evidence_and_argmax_match_brute_force():
    Xs, Us, U0, G, B, X, Y = _problem(seed=1, d_in=5, d_out=4, n_t=(7, 6, 8))
    N, d_out = X.shape[0], Y.shape[1]
    S = residual_energy(Us, [x.T @ x for x in Xs], U0, 1.0)
    sp = spectrum(G, B, U0, S, n_obs=N)
    lams = torch.logspace(-3, 2, 61, dtype=torch.float64)
    dense = []
    for lam in lams.tolist():
        R = sp.S - float((sp.c / (lam + sp.lam)).sum())
        beta = d_out * N / R  # the profiled β*
        dense.append(log_evidence_dense(X, Y, U0, lam * beta, beta))
        const = -0.5 * d_out * N * (math.log(2 * math.pi) - math.log(d_out * N) + 1)
        assert d_out * float(log_evidence(lam, sp)) + const == pytest.approx(dense[-1], rel=1e-9)
    # β* really maximises the dense evidence at fixed λ
    lam = 0.3
    R = sp.S - float((sp.c / (lam + sp.lam)).sum())
    b_star = d_out * N / R
    best = log_evidence_dense(X, Y, U0, lam * b_star, b_star)
    for f in (0.8, 1.25):
        assert log_evidence_dense(X, Y, U0, lam * b_star * f, b_star * f) < best
    # the argmax over a fine grid of the dense evidence brackets evidence_lam's answer
    i = int(torch.tensor(dense).argmax())
    assert 0 < i < len(lams) - 1, "the test problem's optimum must be interior"
    lam_ev = evidence_lam(sp, (1e-3, 1e2))
    assert lams[i - 1] <= lam_ev <= lams[i + 1]
    fine = torch.logspace(math.log10(lams[i - 1]), math.log10(lams[i + 1]), 2001, dtype=torch.float64)
    assert lam_ev == pytest.approx(float(fine[int(log_evidence(fine, sp).argmax())]), rel=2e-3)


def test_relative_units_give_the_same_absolute_lambda():
    Xs, Us, U0, G, B, X, Y = _problem(seed=2, d_in=5, d_out=3, n_t=(9, 9))
    grams = [x.T @ x for x in Xs]
    S = residual_energy(Us, grams, U0, 1.0)
    lam_abs = evidence_lam(spectrum(G, B, U0, S, X.shape[0]))
    m = float(torch.diagonal(G).sum()) / G.shape[0]
    S_hat = residual_energy(Us, grams, U0, m)
    assert S_hat == pytest.approx(S / m, rel=1e-12)
    lam_rel = evidence_lam(spectrum(G / m, B / m, U0, S_hat, X.shape[0]))
    assert lam_rel * m == pytest.approx(lam_abs, rel=1e-6)


def test_spectrum_from_cached_factors_equals_direct():
    Xs, Us, U0, G, B, X, Y = _problem(seed=3)
    S = residual_energy(Us, [x.T @ x for x in Xs], U0, 1.0)
    lam, Q = torch.linalg.eigh(G)
    a = spectrum_from_factors(lam.float(), (B @ Q).float(), (U0 @ Q).float(), S, 11)  # fp32 cache, fp64 math
    b = spectrum(G, B, U0, S, 11)
    assert evidence_lam(a) == pytest.approx(evidence_lam(b), rel=1e-4)


def test_residual_energy_data_free_and_hand_case():
    g = torch.Generator().manual_seed(4)
    Us = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    U0 = 0.2 * sum(Us)
    free = residual_energy(Us, None, U0, 2.0)
    explicit = residual_energy(Us, [u.T @ u for u in Us], U0, 2.0)
    assert free == pytest.approx(explicit, rel=1e-12)
    # hand case: one task, U = [[1, 0]], G = I, U0 = 0 -> S = 1
    assert residual_energy([torch.tensor([[1.0, 0.0]])], [torch.eye(2)], None, 1.0) == pytest.approx(1.0)
    assert residual_energy(Us, None, None, 0.0) == 0.0


def test_more_task_disagreement_means_larger_lambda():
    """Noisier tasks (less agreement about W) should pull towards the prior: λ_ev grows with the noise."""
    out = []
    for noise in (0.05, 0.5, 2.0):
        Xs, Us, U0, G, B, X, Y = _problem(seed=5, d_in=6, d_out=4, n_t=(20, 20, 20), noise=noise)
        S = residual_energy(Us, [x.T @ x for x in Xs], U0, 1.0)
        out.append(evidence_lam(spectrum(G, B, U0, S, X.shape[0])))
    assert out[0] < out[1] < out[2]


def test_errors_name_the_module():
    Xs, Us, U0, G, B, X, Y = _problem()
    with pytest.raises(InputError, match="q_proj"):
        spectrum(G, B, U0, 1.0, 0, key="q_proj")
    with pytest.raises(NumericError, match="q_proj"):
        spectrum(G, B, U0, float("nan"), 5, key="q_proj")
    sp = spectrum(G, B, U0, 1.0, 5, key="q_proj")
    with pytest.raises(InputError, match="q_proj"):
        evidence_lam(sp, (1.0, 0.1))
    with pytest.raises(InputError, match="q_proj"):
        log_evidence(0.0, sp)
    zero = spectrum(torch.zeros(3, 3), torch.zeros(2, 3), None, 0.0, 5)
    assert evidence_lam(zero, (1e-3, 10.0)) == 10.0  # no evidence: the anchor


def test_modules_at_the_lower_bound_get_the_median_of_the_others():
    filled = fill_degenerate({"a": 1e-6, "b": 0.1, "c": 0.3, "d": 0.02}, (1e-6, 1e2))
    assert filled == {"a": 0.1, "b": 0.1, "c": 0.3, "d": 0.02}
    assert fill_degenerate({"a": 1e-6}, (1e-6, 1e2)) == {"a": 0.03}


def test_lambda_below_the_noise_floor_counts_as_degenerate():
    """An evidence maximum below LAM_FLOOR (where the fp32 statistics' rounding dominates the solve) is filled like
    one at the lower end of the range."""
    from bmm_cli.evidence import LAM_FLOOR

    filled = fill_degenerate({"a": 0.3 * LAM_FLOOR, "b": 0.1, "c": 0.3, "d": 2 * LAM_FLOOR}, (1e-6, 1e2))
    assert filled == {"a": 0.1, "b": 0.1, "c": 0.3, "d": 2 * LAM_FLOOR}


def test_the_numerical_rank_is_decided_in_fp64():
    """Eigenvalues below d·eps64·λ_max are rounding: they count as 0, so they lend the evidence no fake directions."""
    lam = torch.tensor([1e-17, 1e-9, 2.0], dtype=torch.float64)
    sp = spectrum_from_factors(lam, torch.ones(2, 3, dtype=torch.float64), None, 1.0, 4.0)
    assert sp.lam.tolist() == [0.0, 1e-9, 2.0]

"""The per-module BMM closed forms against hand formulas and direct solves (fp64 unless a test says otherwise)."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.closed_form import (
    GramStats,
    ModuleFactors,
    apply_factors,
    data_stats,
    eig_gram,
    factorize,
    free_stats,
    hybrid_stats,
    solve_direct,
    solve_hybrid_trial,
)
from bmm_cli.errors import InputError, NumericError

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def taus_(T: int, d_out: int, d_in: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    g = gen(seed)
    if rank is None:
        return torch.randn(T, d_out, d_in, generator=g, dtype=F64)
    return torch.randn(T, d_out, rank, generator=g, dtype=F64) @ torch.randn(T, rank, d_in, generator=g, dtype=F64)


def grams_(T: int, d_in: int, seed: int = 1, n: int = 50) -> torch.Tensor:
    x = torch.randn(T, n, d_in, generator=gen(seed), dtype=F64)
    return x.mT @ x / n  # mean of x xᵀ over n tokens


def reference(G_hat, B_hat, U0, lam):
    """U from U (Ĝ + λI) = B̂ + λU0, solved as (Ĝ + λI)ᵀ Uᵀ = (B̂ + λU0)ᵀ with a general LU solve."""
    R = B_hat + (lam * U0 if U0 is not None else 0)
    A = G_hat + lam * torch.eye(G_hat.shape[0], dtype=G_hat.dtype)
    return torch.linalg.solve(A.mT, R.mT).mT


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 9), (5, 16)])  # d_in <= 2 d_out uses U(UᵀU), d_in > 2 d_out (UUᵀ)U
def test_free_stats_hand_formula(shape):
    d_out, d_in = shape
    taus = taus_(3, d_out, d_in)
    G = sum(u.T @ u for u in taus)
    B = sum(u @ u.T @ u for u in taus)
    m = torch.trace(G) / d_in
    st = free_stats(taus)
    assert st.m == pytest.approx(float(m), rel=1e-12)
    torch.testing.assert_close(st.G_hat, G / m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.B_hat, B / m, rtol=1e-12, atol=1e-12)
    assert float(torch.trace(st.G_hat)) == pytest.approx(d_in)  # mean eigenvalue of Ĝ is 1
    # a list of 2-D task vectors is the same as a stacked tensor
    st2 = free_stats(list(taus))
    torch.testing.assert_close(st2.B_hat, st.B_hat)


def test_free_stats_accumulates_fp32_for_low_precision_inputs():
    taus = taus_(2, 6, 5).to(torch.bfloat16)
    st = free_stats(taus)
    assert st.G_hat.dtype == torch.float32 and st.B_hat.dtype == torch.float32


def test_data_stats_hand_formula():
    T, d_out, d_in = 3, 7, 6
    taus, grams = taus_(T, d_out, d_in), grams_(T, d_in)
    G = grams.sum(0)
    B = sum(taus[t] @ grams[t] for t in range(T))
    m = torch.trace(G) / d_in
    st = data_stats(taus, grams)
    assert st.m == pytest.approx(float(m), rel=1e-12)
    torch.testing.assert_close(st.G_hat, G / m)
    torch.testing.assert_close(st.B_hat, B / m)


def test_hybrid_stats_mixes_normalised_stats():
    taus, grams = taus_(3, 7, 6), grams_(3, 6)
    f, d = free_stats(taus), data_stats(taus, grams)
    h = hybrid_stats(f, d, 0.3)
    torch.testing.assert_close(h.G_hat, 0.3 * d.G_hat + 0.7 * f.G_hat)
    torch.testing.assert_close(h.B_hat, 0.3 * d.B_hat + 0.7 * f.B_hat)
    torch.testing.assert_close(hybrid_stats(f, d, 0.0).G_hat, f.G_hat)
    torch.testing.assert_close(hybrid_stats(f, d, 1.0).B_hat, d.B_hat)
    with pytest.raises(InputError, match="mod.x"):
        hybrid_stats(f, d, 1.5, key="mod.x")


def test_stats_round_trip_through_flat_tensors():
    st = free_stats(taus_(2, 4, 3))
    back = GramStats.from_tensors("k", st.tensors("k"))
    torch.testing.assert_close(back.G_hat, st.G_hat)
    assert back.m == st.m
    with pytest.raises(InputError, match="k: "):
        GramStats.from_tensors("k", {})


# ---------------------------------------------------------------------------------------------------------
# closed form vs a direct solve
# ---------------------------------------------------------------------------------------------------------


def _stats(kind: str, taus, grams) -> GramStats:
    if kind == "free":
        return free_stats(taus)
    if kind == "data":
        return data_stats(taus, grams)
    return hybrid_stats(free_stats(taus), data_stats(taus, grams), 0.4)


@pytest.mark.parametrize("kind", ["free", "data", "hybrid"])
@pytest.mark.parametrize("shape", [(10, 8), (6, 14)])
def test_closed_form_matches_linalg_solve(kind, shape):
    d_out, d_in = shape
    taus, grams = taus_(3, d_out, d_in, seed=2), grams_(3, d_in, seed=3)
    U0 = torch.randn(d_out, d_in, generator=gen(4), dtype=F64)
    st = _stats(kind, taus, grams)
    f = factorize(st.G_hat, st.B_hat, U0, dtype=F64)
    for lam in (1e-3, 0.1, 1.0, 30.0):
        ref = reference(st.G_hat, st.B_hat, U0, lam)
        assert rel(solve_direct(st.G_hat, st.B_hat, U0, lam), ref) < 1e-10
        assert rel(apply_factors(f, lam), ref) < 1e-10


def test_hybrid_trial_equals_direct_on_mixed_stats():
    taus, grams = taus_(3, 9, 7, seed=5), grams_(3, 7)
    f, d = free_stats(taus), data_stats(taus, grams)
    U0 = torch.randn(9, 7, generator=gen(6), dtype=F64)
    h = hybrid_stats(f, d, 0.25)
    torch.testing.assert_close(solve_hybrid_trial(f, d, U0, 0.2, 0.25), reference(h.G_hat, h.B_hat, U0, 0.2))


# ---------------------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["free", "data"])
def test_lambda_to_infinity_gives_anchor(kind):
    # U = (B̂ + λU0)(Ĝ + λI)⁻¹ = (B̂/λ + U0)(Ĝ/λ + I)⁻¹ -> U0 with error O(‖Ĝ‖/λ + ‖B̂‖/λ).
    taus, grams = taus_(3, 8, 6, seed=7), grams_(3, 6)
    U0 = torch.randn(8, 6, generator=gen(8), dtype=F64)
    st = _stats(kind, taus, grams)
    assert rel(solve_direct(st.G_hat, st.B_hat, U0, 1e8), U0) < 1e-6
    assert rel(apply_factors(factorize(st.G_hat, st.B_hat, U0, dtype=F64), 1e8), U0) < 1e-6


def orthogonal_task_vectors(T=3, d_out=12, d_in=10, r=2, seed=9):
    """U_t = P_t S_t R_tᵀ with disjoint blocks of orthonormal P (outputs) and R (inputs): T·r < d_in."""
    g = gen(seed)
    P = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=F64))[0]
    R = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))[0]
    out = []
    for t in range(T):
        S = torch.diag(torch.rand(r, generator=g, dtype=F64) + 0.5)
        out.append(P[:, t * r:(t + 1) * r] @ S @ R[:, t * r:(t + 1) * r].T)
    return torch.stack(out)


def test_orthogonal_subspaces_lambda_to_zero_gives_sum():
    # G = Σ_t U_tᵀU_t and B = Σ_t U_t U_tᵀ U_t. Orthogonal row spaces give U_s U_tᵀ = 0 for s != t, so
    #   (Σ_s U_s) G = Σ_s Σ_t U_s U_tᵀ U_t = Σ_t U_t U_tᵀ U_t = B        (the cross terms vanish),
    # i.e. B̂ = (Σ U_t) Ĝ and, with U0 = 0, U(λ) = (Σ U_t) Ĝ (Ĝ + λI)⁻¹. As λ -> 0 this tends to (Σ U_t) times
    # the projector onto range(Ĝ); every row of every U_t lies in range(G) = span of all R_t, so U -> Σ U_t.
    # (Orthogonal column spaces, U_sᵀU_t = 0, complete "orthogonal task subspaces"; the identity needs only
    # the row spaces.) Ĝ is rank-deficient here (T·r = 6 < d_in = 10): its null space gets U0 = 0, as Σ U_t has.
    taus = orthogonal_task_vectors()
    st = free_stats(taus)
    target = taus.sum(0)
    assert rel(solve_direct(st.G_hat, st.B_hat, None, 1e-9), target) < 1e-6
    assert rel(apply_factors(factorize(st.G_hat, st.B_hat, None, dtype=F64), 1e-9), target) < 1e-6


@pytest.mark.parametrize("kind", ["free", "data"])
def test_rank_deficient_small_lambda_is_finite_and_accurate(kind):
    # λ -> 0 limit in the eigenbasis: component j is (BQ_j + λ U0Q_j)/(Λ_j + λ) -> BQ_j/Λ_j where Λ_j > 0 and
    # U0Q_j where Λ_j = 0 (B̂ has no component there). So U -> B̂ Ĝ⁺ + U0 (I - Ĝ Ĝ⁺).
    d_out, d_in = 6, 16
    taus = taus_(2, d_out, d_in, seed=10, rank=3)  # rank(Ĝ) <= T·rank = 6 < 16
    if kind == "data":
        x = torch.randn(2, 30, 5, generator=gen(11), dtype=F64) @ torch.randn(5, d_in, generator=gen(12), dtype=F64)
        grams = x.mT @ x / 30  # rank 5 < 16 data
        st = data_stats(taus, grams)
    else:
        st = free_stats(taus)
    assert torch.linalg.matrix_rank(st.G_hat) < d_in
    U0 = torch.randn(d_out, d_in, generator=gen(13), dtype=F64)
    pinv = torch.linalg.pinv(st.G_hat, hermitian=True, rtol=1e-10)
    limit = st.B_hat @ pinv + U0 @ (torch.eye(d_in, dtype=F64) - st.G_hat @ pinv)
    # λ = 1e-8 balances the two fp64 errors: the bias of a finite λ, ~λ/Λ_min (Λ_min ≈ 0.3 here), and the
    # rounding noise of Ĝ's null-space eigenvalues (~1e-16) amplified by 1/λ; both stay well below 1e-6.
    lam = 1e-8
    cached = apply_factors(factorize(st.G_hat, st.B_hat, U0, dtype=F64), lam)
    for U in (solve_direct(st.G_hat, st.B_hat, U0, lam), cached):
        assert torch.isfinite(U).all()
        assert rel(U, limit) < 1e-6


def test_zero_task_vectors_give_the_anchor():
    # m = tr(G)/d_in = 0: documented as Ĝ = B̂ = 0, so every solve returns U0 (no 0/0 anywhere).
    taus = torch.zeros(3, 5, 4, dtype=F64)
    st = free_stats(taus)
    assert st.m == 0.0 and not st.G_hat.any() and not st.B_hat.any()
    U0 = torch.randn(5, 4, generator=gen(14), dtype=F64)
    torch.testing.assert_close(solve_direct(st.G_hat, st.B_hat, U0, 1e-3), U0)
    torch.testing.assert_close(apply_factors(factorize(st.G_hat, st.B_hat, U0, dtype=F64), 1e-3), U0)
    assert not solve_direct(st.G_hat, st.B_hat, None, 0.5).any()
    dz = data_stats(taus_(3, 5, 4), torch.zeros(3, 4, 4, dtype=F64))
    assert dz.m == 0.0 and not dz.B_hat.any()


def test_tiny_negative_eigenvalues_are_clamped():
    g = gen(15)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))[0]
    lam_true = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1e-9], dtype=F64)  # rounding-size negative
    G = Q @ torch.diag(lam_true) @ Q.T
    B = torch.randn(4, 6, generator=g, dtype=F64) @ G
    Qe, ev = eig_gram(G, dtype=F64)
    assert (ev >= 0).all() and float(ev.min()) == 0.0
    # λ equal to the negative eigenvalue would divide by ~0 without the clamp; Cholesky fails too (fp64 retry,
    # then the clamped eigendecomposition).
    lam = 1e-9
    U_cached = apply_factors(factorize(G, B, None, dtype=F64), lam)
    U_direct = solve_direct(G, B, None, lam)
    clamped = Q @ torch.diag(lam_true.clamp_min(0)) @ Q.T
    ref = reference(clamped, B, None, lam)
    assert torch.isfinite(U_cached).all() and torch.isfinite(U_direct).all()
    assert rel(U_cached, ref) < 1e-6 and rel(U_direct, ref) < 1e-6


def test_clearly_indefinite_gram_is_refused():
    G = torch.diag(torch.tensor([1.0, 0.5, -0.2], dtype=F64))
    with pytest.raises(NumericError, match="layers.3.mlp.up_proj"):
        eig_gram(G, key="layers.3.mlp.up_proj")


# ---------------------------------------------------------------------------------------------------------
# cached eigenbasis vs direct, by precision
# ---------------------------------------------------------------------------------------------------------

# fp32: eigh/GEMM round-off times cond(Ĝ+λI) for these λ. bf16 factors: Q, B̂Q, U0Q carry a relative error
# of 2^-9 per entry; U inherits a few of those (~1e-2 relative), far below the bf16 rounding of W = W_pre + s·U.
@pytest.mark.parametrize("dtype, factor_dtype, tol", [
    (F64, F64, 1e-11),
    (torch.float32, torch.float32, 1e-4),
    (torch.float32, torch.bfloat16, 2e-2),
])
def test_cached_path_equals_direct(dtype, factor_dtype, tol):
    d_out, d_in = 24, 20
    taus = taus_(4, d_out, d_in, seed=16)
    U0 = 0.3 * taus.mean(0)
    st = free_stats(taus)
    f = factorize(st.G_hat, st.B_hat, U0, dtype=dtype, factor_dtype=factor_dtype)
    assert f.Q.dtype == factor_dtype and f.BQ.dtype == factor_dtype
    for lam in (1e-2, 0.3, 5.0):
        U = apply_factors(f, lam)
        assert U.dtype == (F64 if dtype == F64 else torch.float32)
        assert rel(U, solve_direct(st.G_hat, st.B_hat, U0, lam)) < tol


def test_shared_eigenbasis_and_flat_tensors():
    taus, grams = taus_(3, 6, 5, seed=17), grams_(3, 5)
    st = data_stats(taus, grams)
    eig = eig_gram(st.G_hat, dtype=F64)
    f = factorize(st.G_hat, st.B_hat, None, dtype=F64, eig=eig)
    assert f.U0Q is None and f.Q is eig[0]
    back = ModuleFactors.from_tensors("m", f.tensors("m"))
    torch.testing.assert_close(apply_factors(back, 0.1), solve_direct(st.G_hat, st.B_hat, None, 0.1))


# ---------------------------------------------------------------------------------------------------------
# validation and NaN
# ---------------------------------------------------------------------------------------------------------


def test_nan_inputs_raise_naming_the_key():
    key = "model.layers.7.self_attn.q_proj.weight"
    taus = taus_(2, 4, 3)
    bad = taus.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(NumericError, match=key):
        free_stats(bad, key=key)
    with pytest.raises(NumericError, match=key):
        data_stats(bad, grams_(2, 3), key=key)
    inf_grams = grams_(2, 3)
    inf_grams[0, 0, 0] = float("inf")
    with pytest.raises(NumericError, match=key):
        data_stats(taus, inf_grams, key=key)
    st = free_stats(taus)
    U0 = torch.full((4, 3), float("nan"), dtype=F64)
    with pytest.raises(NumericError, match=key):
        solve_direct(st.G_hat, st.B_hat, U0, 0.1, key=key)
    with pytest.raises(NumericError, match=key):
        factorize(st.G_hat, st.B_hat, U0, key=key, dtype=F64)
    f = factorize(st.G_hat, st.B_hat, None, dtype=F64)
    f.BQ[0, 0] = float("nan")
    with pytest.raises(NumericError, match=key):
        apply_factors(f, 0.1, key=key)
    with pytest.raises(NumericError, match=key):
        eig_gram(torch.full((3, 3), float("nan")), key=key)
    err = NumericError("x")
    assert err.exit_code == 4


def test_bad_options_raise_input_errors():
    st = free_stats(taus_(2, 4, 3))
    for lam in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="k.w: λ"):
            solve_direct(st.G_hat, st.B_hat, None, lam, key="k.w")
    with pytest.raises(InputError, match="k.w"):
        solve_direct(st.G_hat, st.B_hat, torch.zeros(3, 4), 1.0, key="k.w")
    with pytest.raises(InputError, match="k.w"):
        free_stats([torch.zeros(4, 3), torch.zeros(4, 2)], key="k.w")
    with pytest.raises(InputError, match="k.w"):
        data_stats(taus_(2, 4, 3), grams_(3, 3), key="k.w")
    with pytest.raises(InputError, match="compute"):
        apply_factors(factorize(st.G_hat, st.B_hat, None), 1.0, compute="fp8")

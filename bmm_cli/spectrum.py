"""Symmetric eigen-decomposition of Ĝ: an fp32 eigh refined in fp64, the rank decided in fp64 (evidence λ, factors).

The evidence (:mod:`bmm_cli.evidence`) and the factor cache need ``Ĝ = QΛQᵀ``. :func:`eigh` gets
fp64-accurate eigenpairs from an fp32 ``eigh`` (about 0.4× the CPU time of the fp64 one with MKL, one thread):

1. ``eigh`` of ``Ĝ/‖Ĝ‖`` in fp32 gives Q₀; its vectors are orthonormal and span Ĝ's invariant subspaces to about
   1e-7, so every Rayleigh quotient ``qᵀĜq/qᵀq`` (one fp64 GEMM ``P = ĜQ₀``) is fp64-accurate for eigenvalues that
   are large against the fp32 noise ``‖Ĝ‖·1e-7``;
2. the columns whose Rayleigh quotient is below ``small·Λ_max`` (the part the fp32 noise can corrupt: small
   eigenvalues and the null space) are redone in fp64: their span Q_S is projected off the other (large)
   vectors, where the fp32 solution leaks by ~1e-6 (one Newton step ``Q_S -= Q_L Λ_L⁻¹ Q_Lᵀ Ĝ Q_S``), and the
   generalised eigenproblem of Ĝ on that span (``Q_SᵀĜQ_S x = μ Q_SᵀQ_S x``, size k = their number) gives Ritz
   values with a leak of ~1e-12, i.e. errors of ~1e-24·Λ_max beside fp64 rounding;
3. the numerical rank is decided in fp64: eigenvalues at or below ``rank_rtol·Λ_max`` (default ``n·ε₆₄``) are
   set to exact zeros, so the null space of a rank-deficient Ĝ (``T·d_out < d_in``) carries no fp32 rounding
   noise for the evidence to fit.

Measured on one CPU thread (bench/results/shapes_8b_spectrum_cpu.md): 1.2–1.4× less time than the fp64 ``eigh`` for a
full-rank Ĝ, including the B̂Q/U0Q products both need, and no gain for a rank-deficient one. What it adds is step 3.

When more than ``max_small`` of the columns fall below ``small·Λ_max`` the fp32 step buys nothing and a plain fp64
``eigh`` is used (with the same rank rule). The result's eigenvalues are ascending, like ``torch.linalg.eigh``.

Ĝ must be fp64-exact in its null space for step 3 to mean anything: a Ĝ that went through fp32 storage has its
null space filled with ~1e-7·Λ_max of rounding, which no eigensolver can tell from signal. :func:`free_gram` builds
the data-free statistics from the task vectors in fp64.
"""

from __future__ import annotations

import torch

from .errors import InputError, NumericError

Tensor = torch.Tensor

SMALL = 1e-3  # Rayleigh quotients below SMALL·Λ_max are recomputed in fp64 on their subspace
MAX_SMALL = 0.5  # above this fraction of small columns, a plain fp64 eigh is cheaper


def _sym64(G: Tensor, key: str) -> Tensor:
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise InputError(f"{key}: Ĝ must be square, got {tuple(G.shape)}")
    G = G.detach().to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise NumericError(f"{key}: Ĝ has NaN/Inf")
    return 0.5 * (G + G.mT)


def rank_cut(lam: Tensor, n: int, rank_rtol: float | None = None) -> Tensor:
    """Eigenvalues at or below ``rank_rtol·Λ_max`` (default ``n·ε₆₄``) set to exact zeros (negatives too)."""
    top = float(lam.max()) if lam.numel() else 0.0
    if top <= 0:
        return torch.zeros_like(lam)
    tol = (n * torch.finfo(torch.float64).eps if rank_rtol is None else rank_rtol) * top
    return torch.where(lam > tol, lam, torch.zeros_like(lam))


def eigh64(G: Tensor, *, key: str = "<module>", rank_rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """The reference: ``torch.linalg.eigh`` in fp64, with the same rank rule as :func:`eigh`."""
    G = _sym64(G, key)
    lam, Q = torch.linalg.eigh(G)
    return rank_cut(lam, G.shape[0], rank_rtol), Q


def eigh(G: Tensor, *, key: str = "<module>", small: float = SMALL, max_small: float = MAX_SMALL,
         rank_rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """``(Λ, Q)`` of the symmetrised Ĝ, fp64, Λ ascending, ``Ĝ ≈ QΛQᵀ``: an fp32 eigh refined in fp64 (see the
    module docstring). Λ agrees with the fp64 ``eigh`` to ~1e-10·Λ_max (second order in the fp32 residual, and
    far better below ``small·Λ_max``); eigenvalues within the rank
    tolerance are exact zeros."""
    G = _sym64(G, key)
    n = G.shape[0]
    if n == 0:
        return G.new_zeros(0), G.new_zeros(0, 0)
    scale = float(G.abs().max())
    if scale == 0.0:
        return G.new_zeros(n), torch.eye(n, dtype=torch.float64, device=G.device)
    try:
        _, Q32 = torch.linalg.eigh((G / scale).to(torch.float32))
    except RuntimeError:  # no convergence in fp32: the reference path
        return eigh64(G, key=key, rank_rtol=rank_rtol)
    Q = Q32.to(torch.float64)
    del Q32
    P = G @ Q
    nrm = (Q * Q).sum(0)
    rq = (Q * P).sum(0) / nrm
    top = float(rq.max())
    if not (top > 0):  # Ĝ ≤ 0: not a Gram matrix, or all rounding; the reference decides
        return eigh64(G, key=key, rank_rtol=rank_rtol)
    low = rq < small * top
    k = int(low.sum())
    if k > max_small * n:
        return eigh64(G, key=key, rank_rtol=rank_rtol)
    Q = Q / nrm.sqrt()
    lam = rq
    if k:
        idx, big = low.nonzero().squeeze(1), (~low).nonzero().squeeze(1)
        QS, QL = Q[:, idx], Q[:, big]
        # the fp32 span leaks ~1e-6 into the large eigenvectors; one Newton step on that coupling,
        # Q_S -= Q_L Λ_L⁻¹ Q_Lᵀ Ĝ Q_S, takes the leak to ~1e-12 (a plain projection would not: Q_L leaks too)
        QS = QS - QL @ ((QL.mT @ (G @ QS)) / lam[big].unsqueeze(1))
        A = QS.mT @ (G @ QS)
        A = 0.5 * (A + A.mT)
        L = torch.linalg.cholesky(QS.mT @ QS)  # ≈ I: the fp32 vectors are orthonormal to ~1e-6
        C = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, A, upper=False).mT, upper=False)
        mu, V = torch.linalg.eigh(0.5 * (C + C.mT))
        X = torch.linalg.solve_triangular(L.mT, V, upper=True)
        Q[:, idx] = QS @ X
        lam = lam.clone()
        lam[idx] = mu
    order = torch.argsort(lam)
    lam, Q = lam[order], Q[:, order]
    return rank_cut(lam, n, rank_rtol), Q


def free_gram(taus: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(Ĝ, B̂, m)`` of the data-free Gram in fp64 from the task vectors ``[T, d_out, d_in]``: ``G = Σ U_tᵀU_t``,
    ``B = Σ U_t U_tᵀ U_t``, ``m = tr(G)/d_in`` (``Ĝ = G/m``, ``B̂ = B/m``; m = 0 gives zeros). Exact to fp64
    rounding, so a rank-deficient Ĝ keeps its null space at fp64 zero."""
    if taus.dim() != 3:
        raise InputError(f"task vectors must be [T, d_out, d_in], got {tuple(taus.shape)}")
    U = taus.detach().to(torch.float64)
    d_in = U.shape[2]
    G = torch.zeros(d_in, d_in, dtype=torch.float64, device=U.device)
    B = torch.zeros(U.shape[1], d_in, dtype=torch.float64, device=U.device)
    for u in U:
        G += u.mT @ u
        B += (u @ u.mT) @ u if u.shape[0] <= d_in else u @ (u.mT @ u)
    m = float(G.diagonal().sum()) / d_in if d_in else 0.0
    if m <= 0:
        return torch.zeros_like(G), torch.zeros_like(B), 0.0
    return G / m, B / m, m

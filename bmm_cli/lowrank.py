"""The data-free closed form for low-rank task vectors ``U_t = P_t A_t`` (LoRA experts), in a Σr_t basis.

Stack the experts' A factors, ``A = [A_1; …; A_T]`` (``R = Σ r_t`` rows, ``d_in`` columns), and take an
orthonormal basis of their row space, ``Aᵀ = Q Z`` (thin QR, ``Q`` [d_in, R]). Then ``U_t = C_t Qᵀ`` with
``C_t = P_t Z_tᵀ`` [d_out, R] (``Z_t``: the columns of ``Z`` that belong to expert t), and the data-free statistics
(``closed_form.free_stats``) are

    G = Σ U_tᵀU_t = Q g Qᵀ,   g = Σ C_tᵀC_t                [R, R]
    B = Σ U_t U_tᵀ U_t = b Qᵀ,  b = Σ C_t C_tᵀ C_t          [d_out, R]
    m = tr(G)/d_in = tr(g)/d_in                             (the dense normalisation, so λ means the same)

For any anchor ``U0``, ``U (Ĝ + λI) = B̂ + λU0`` splits along ``QQᵀ`` and ``I − QQᵀ``: Ĝ vanishes on the
complement, so the complement part of U is the anchor's own, and

    U = U0 + (b̂ − U0 Q ĝ)(ĝ + λI_R)⁻¹ Qᵀ

exactly: an R×R solve instead of a d_in×d_in one. When the anchor's rows lie in the span of the stacked A_t
(``U0 = u0 Qᵀ``), the merge is itself low rank: ``U = u Qᵀ`` with ``u = (b̂ + λu0)(ĝ + λI)⁻¹`` [d_out, R], so an
adapter output of rank R is exact. Which anchors keep the span:

* task arithmetic (``α Σ U_t``), ISO-C (SVD of Σ U_t), TSV (each expert's top singular vectors, whitened: the
  right factors are combinations of the V_t, which lie in the span of A_t) and the zero anchor: yes;
* WUDI: nearly (its gradient's rows lie in the span, but Adam's elementwise step sizes leave it slightly: a
  relative residual of order 1e-3), so its merge is only approximately rank R;
* TIES, DARE, DARE-TIES: no: elementwise trimming, sign election and random dropping do not preserve a row space;
  the solve above is still exact, but the merge has full rank (its complement part is the anchor's);
* the data-assisted Gram ``G = Σ G_t`` (input covariances) has full rank, and ``B = Σ U_t G_t`` has rows in the
  span of ``A_t G_t``, not of A: the data and hybrid solves get no reduction and stay dense.

:func:`anchor_residual` measures how far an anchor's rows leave the span.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .closed_form import GramStats
from .errors import InputError, NumericError

Tensor = torch.Tensor
Factors = Sequence[tuple[Tensor, Tensor]]  # [(P_t [d_out, r_t], A_t [r_t, d_in])]


@dataclass
class LowRankStats:
    """``Ĝ = Q ĝ Qᵀ``, ``B̂ = b̂ Qᵀ`` of one module, with ``m`` as in :class:`~bmm_cli.closed_form.GramStats`."""

    Q: Tensor  # [d_in, R], orthonormal columns
    C: list[Tensor]  # the task vectors in the basis: U_t = C_t Qᵀ, [d_out, R]
    g_hat: Tensor  # [R, R]
    b_hat: Tensor  # [d_out, R]
    m: float

    @property
    def rank(self) -> int:
        return int(self.Q.shape[1])

    def dense(self) -> GramStats:
        """The same statistics as ``free_stats`` gives from the dense task vectors (for checks)."""
        return GramStats(self.Q @ self.g_hat @ self.Q.mT, self.b_hat @ self.Q.mT, self.m)

    def in_basis(self, U0: Tensor) -> Tensor:
        """``U0 Q`` [d_out, R]: an anchor's coordinates in the basis."""
        return U0.to(self.Q.dtype) @ self.Q


def _check_factors(factors: Factors, key: str) -> tuple[int, int]:
    if not factors:
        raise InputError(f"{key}: no task vectors (T = 0)")
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    for t, (P, A) in enumerate(factors):
        if P.dim() != 2 or A.dim() != 2 or P.shape[1] != A.shape[0] or (P.shape[0], A.shape[1]) != (d_out, d_in):
            raise InputError(f"{key}: expert {t + 1}'s factors {tuple(P.shape)} @ {tuple(A.shape)} do not give a "
                             f"[{d_out}, {d_in}] task vector")
    return d_out, d_in


def lowrank_free_stats(factors: Factors, *, key: str = "<module>", device=None,
                       dtype: torch.dtype | None = None) -> LowRankStats:
    """Data-free statistics of ``U_t = P_t A_t`` in the Σr_t basis (see the module doc)."""
    d_out, d_in = _check_factors(factors, key)
    dev = torch.device(device) if device is not None else factors[0][1].device
    dt = dtype or (torch.float64 if factors[0][1].dtype == torch.float64 else torch.float32)
    R = sum(int(A.shape[0]) for _, A in factors)
    if R > d_in:
        raise InputError(f"{key}: the experts' ranks add up to {R} > d_in = {d_in}: use the dense solve")
    A = torch.cat([a.to(device=dev, dtype=dt) for _, a in factors], 0)
    Q, Z = torch.linalg.qr(A.mT)  # Aᵀ = Q Z: A_t = Z_tᵀ Qᵀ
    C, off = [], 0
    g = torch.zeros(R, R, dtype=dt, device=dev)
    b = torch.zeros(d_out, R, dtype=dt, device=dev)
    for P, a in factors:
        r = int(a.shape[0])
        c = P.to(device=dev, dtype=dt) @ Z[:, off:off + r].mT
        off += r
        gt = c.mT @ c
        g += gt
        b.addmm_(c, gt)
        C.append(c)
    m = float(torch.diagonal(g).sum()) / d_in
    if not math.isfinite(m):
        raise NumericError(f"{key}: data-free Gram has a non-finite trace (NaN/Inf in the LoRA factors)")
    if m <= torch.finfo(dt).tiny:
        return LowRankStats(Q, C, torch.zeros_like(g), torch.zeros_like(b), 0.0)
    return LowRankStats(Q, C, g / m, b / m, m)


def _small_solve(g_hat: Tensor, rhs: Tensor, lam: float, key: str) -> Tensor:
    """``X (ĝ + λI) = rhs`` for the small R×R system (Cholesky, fp64 fallback)."""
    if not (lam > 0 and math.isfinite(lam)):
        raise InputError(f"{key}: λ must be a finite number > 0, got {lam}")
    A = 0.5 * (g_hat + g_hat.mT)
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        L = torch.linalg.cholesky(A.double())
        return torch.cholesky_solve(rhs.double().mT, L).mT.to(rhs.dtype)
    return torch.cholesky_solve(rhs.mT, L).mT


def lowrank_solve(stats: LowRankStats, U0: Tensor | None, lam: float, *, key: str = "<module>") -> Tensor:
    """Dense ``U = (B̂ + λU0)(Ĝ + λI)⁻¹`` [d_out, d_in] for any anchor ``U0`` (None: zero anchor), exactly, with an
    R×R solve: ``U = U0 + (b̂ − U0 Q ĝ)(ĝ + λI)⁻¹ Qᵀ``."""
    if U0 is None:
        return _small_solve(stats.g_hat, stats.b_hat, lam, key) @ stats.Q.mT
    U0 = U0.to(device=stats.Q.device, dtype=stats.Q.dtype)
    if U0.shape != (stats.b_hat.shape[0], stats.Q.shape[0]):
        raise InputError(f"{key}: anchor U0 {tuple(U0.shape)} does not match the task vectors "
                         f"({stats.b_hat.shape[0]}, {stats.Q.shape[0]})")
    X = _small_solve(stats.g_hat, stats.b_hat - (U0 @ stats.Q) @ stats.g_hat, lam, key)
    U = torch.addmm(U0, X, stats.Q.mT)
    if not bool(torch.isfinite(U).all()):
        raise NumericError(f"{key}: low-rank solve gave NaN/Inf at λ={lam:g}")
    return U


def lowrank_solve_factors(stats: LowRankStats, u0: Tensor | None, lam: float, *,
                          key: str = "<module>") -> tuple[Tensor, Tensor]:
    """``(u, Q)`` with ``U = u Qᵀ`` for an anchor given in the basis (``U0 = u0 Qᵀ``, e.g. ``α Σ C_t`` for task
    arithmetic; None: zero anchor): the merge as rank-R factors, for an adapter output."""
    rhs = stats.b_hat if u0 is None else stats.b_hat + lam * u0.to(stats.b_hat)
    return _small_solve(stats.g_hat, rhs, lam, key), stats.Q


def ta_anchor_in_basis(stats: LowRankStats, alpha: float = 1.0) -> Tensor:
    """Task arithmetic's anchor ``α Σ U_t`` in the basis (``u0``)."""
    return alpha * torch.stack(stats.C).sum(0)


def anchor_residual(stats: LowRankStats, U0: Tensor) -> float:
    """``‖U0 − U0QQᵀ‖ / ‖U0‖``: 0 when the anchor's rows lie in the span of the stacked A_t."""
    U0 = U0.to(stats.Q)
    n = float(torch.linalg.norm(U0))
    return 0.0 if n == 0 else float(torch.linalg.norm(U0 - (U0 @ stats.Q) @ stats.Q.mT)) / n


class LowRankTrials:
    """Many λ for one module and anchor: ``ĝ = VΛVᵀ`` once (R×R), then per λ
    ``U(λ) = U0 + ((b̂ − U0Qĝ)V diag(1/(Λ+λ)) Vᵀ) Qᵀ``: one d_out×R×d_in GEMM per trial (the low-rank
    counterpart of ``closed_form.factorize`` / ``apply_factors``)."""

    def __init__(self, stats: LowRankStats, U0: Tensor | None, *, key: str = "<module>"):
        self.key = key
        self.stats = stats
        evals, self.V = torch.linalg.eigh(0.5 * (stats.g_hat + stats.g_hat.mT))
        self.evals = evals.clamp_min(0.0)
        self.U0 = None if U0 is None else U0.to(device=stats.Q.device, dtype=stats.Q.dtype)
        rhs = stats.b_hat if self.U0 is None else stats.b_hat - (self.U0 @ stats.Q) @ stats.g_hat
        self.rhsV = rhs @ self.V  # [d_out, R]

    def apply(self, lam: float) -> Tensor:
        if not (lam > 0 and math.isfinite(lam)):
            raise InputError(f"{self.key}: λ must be a finite number > 0, got {lam}")
        X = ((self.rhsV / (self.evals + lam)) @ self.V.mT) @ self.stats.Q.mT
        return X if self.U0 is None else X.add_(self.U0)

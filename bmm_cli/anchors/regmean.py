"""``regmean``: RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

With the data-assisted Grams ``G_t`` (mean x xᵀ of the module input in expert t on its own data) and
``G̃_t = α·G_t + (1−α)·diag(G_t)`` (α = 0.95; the reference's ``reduce_non_diag`` scales the off-diagonal by α):

    W = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹,   W_t = W_pre + τ_t,   U0 = W − W_pre = (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹

(the two are the same because ``W_pre (Σ G̃)(Σ G̃)⁻¹ = W_pre``; the τ form avoids cancellation). For α = 1 this is
the least-squares merge ``argmin_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²`` with ``G_t = X_tᵀ X_t / n``.

Solve: Cholesky of ``G = Σ G̃_t`` in float32; when it fails or its pivots say the condition number exceeds 1e4,
B and G are rebuilt from the inputs in float64 and solved there; when G is singular even in float64 (input
features never active in any task's data), a pseudo-inverse by eigendecomposition that drops eigenvalues
``<= λ_max·d_in·eps``: there ``U0 = 0``, i.e. ``W`` keeps the base weight on input directions no task's data reaches.
Other tensors: ``W_pre + mean τ`` (the reference averages them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NumericError
from .base import AnchorMethod, ModuleInput, check_finite, check_range, opt

_FP32_COND_LIMIT = 1e4


def _cholesky(g: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor when it exists and the pivots bound cond(G) below what the dtype resolves well."""
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None
    d = chol.diagonal()
    if not bool((d > 0).all()):
        return None
    cond_lb = float((d.max() / d.min()) ** 2)  # a lower bound on cond(G)
    limit = _FP32_COND_LIMIT if g.dtype == torch.float32 else 1.0 / (g.shape[0] * torch.finfo(g.dtype).eps)
    return chol if cond_lb <= limit else None


def _normal_equations(taus: torch.Tensor, grams: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = Σ τ_t G̃_t`` and ``G = Σ G̃_t`` in the dtype of the inputs."""
    diag = grams.diagonal(dim1=1, dim2=2)  # [T, d_in]
    g = alpha * grams.sum(dim=0) + (1.0 - alpha) * torch.diag(diag.sum(dim=0))
    b = alpha * torch.einsum("toi,tij->oj", taus, grams) + (1.0 - alpha) * torch.einsum("toi,ti->oi", taus, diag)
    return b, 0.5 * (g + g.T)  # exact symmetry for Cholesky


def regmean_merge(taus: torch.Tensor, grams: torch.Tensor, alpha: float) -> tuple[torch.Tensor, str]:
    """``(Σ τ_t G̃_t)(Σ G̃_t)⁻¹`` in ``taus``'s dtype, and the solve path used: ``cholesky`` (input dtype),
    ``cholesky-fp64`` or ``pinv-fp64`` (B and G rebuilt in float64 from the inputs: with an ill-conditioned G
    the float32 rounding of B alone would be amplified by cond(G))."""
    if taus.dtype != torch.float64:
        b, g = _normal_equations(taus, grams, alpha)
        chol = _cholesky(g)
        if chol is not None:
            return torch.cholesky_solve(b.T, chol).T, "cholesky"
    b, g = _normal_equations(taus.to(torch.float64), grams.to(torch.float64), alpha)
    chol = _cholesky(g)
    if chol is not None:
        return torch.cholesky_solve(b.T, chol).T.to(taus.dtype), "cholesky-fp64"
    w, q = torch.linalg.eigh(g)
    keep = w > w.max().clamp_min(0) * g.shape[0] * torch.finfo(torch.float64).eps
    qk = q[:, keep]
    return (((b @ qk) / w[keep]) @ qk.T).to(taus.dtype), "pinv-fp64"


@dataclass
class RegMeanOptions:
    alpha: float = opt(0.95, "weight of the off-diagonal Gram entries: G~ = alpha G + (1 - alpha) diag(G)")


class RegMean(AnchorMethod):
    name = "regmean"
    summary = "RegMean: W = (sum W_t G~_t)(sum G~_t)^-1 from data-assisted Grams (off-diagonal scaled by alpha)"
    Options = RegMeanOptions
    needs_data_grams = True

    def validate_options(self, opts: RegMeanOptions) -> None:
        check_range(self.name, "alpha", opts.alpha, 0.0, 1.0, False, False)

    def _module(self, inp: ModuleInput, opts: RegMeanOptions, state: Any, device: torch.device) -> torch.Tensor:
        assert inp.grams is not None
        check_finite(inp.key, inp.grams, "Grams")
        if not bool((inp.grams.diagonal(dim1=1, dim2=2) >= 0).all()):
            raise NumericError(f"{inp.key}: a Gram has a negative diagonal entry; recompute the Grams (gram stage)")
        return regmean_merge(inp.taus, inp.grams, opts.alpha)[0]

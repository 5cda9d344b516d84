"""``iso-c`` and ``iso-cts``: isotropic merging (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging
with Common and Task-Specific Subspaces", arXiv 2502.04959; reference code github.com/danielm1405/iso-merging).

ISO-C. ``Σ_t τ_t = U S Vᵀ``; ``U0 = α · mean(S) · U Vᵀ`` (the spectrum flattened to its mean).

ISO-CTS (Alg. 1 of the paper, as the reference code computes it). With ``r = min(d_out, d_in)``, ``M = Σ_t τ_t``:

- split: ``k_t = max(1, ⌊(r − ⌊f·r⌋)/T⌋)`` directions per task (f = ``common_frac`` = 0.8) and
  ``k_c = max(0, r − T·k_t)`` common ones, so all r directions are used. ``split=round`` uses the reference
  code's ``round(…)`` (Python's half-to-even) instead of ``⌊…⌋``; the two differ only when (r − ⌊f·r⌋)/T has a
  fractional part ≥ 0.5. The ``max(1, ·)`` keeps one direction per task when there are more tasks than
  task-specific directions; then ``T·k_t`` may exceed r and ``k_c = 0``;
- common subspace: ``M = U S Vᵀ``, ``U_c = U[:, :k_c]``, ``S_c``, ``V_c`` (top k_c triplets of M);
- task t: ``R_t = τ_t − U_c U_cᵀ τ_t = U_t S_t V_tᵀ``, keep its k_t leading triplets;
- stack ``U_cts = [U_1,k_t … U_T,k_t, U_c]``, ``V_cts = [V_1,k_t … V_T,k_t, V_c]``, ``s = [S_1,k_t … S_T,k_t, S_c]``;
- orthogonalize both stacks by their polar factor (``P Qᵀ`` of their thin SVD);
- ``U0 = α · mean(s) · U_cts⊥ V_cts⊥ᵀ``.

So the right vectors are NOT recomputed from M: each block carries the right singular vectors of the matrix its
left vectors came from (V_c from M, V_t from R_t), and the stacked V is orthogonalized like U. With an
orthonormal U_cts⊥ (columns) and V_cts⊥ (columns, or rows when the stack is wider than d_in), all nonzero
singular values of U0 equal α·mean(s).

Both methods drop directions whose singular value is a numerical zero (``s <= scale·max(d)·eps``, scale = s_max(M)
for M's triplets and ≈‖τ_t‖₂ for R_t's), which only happens for rank-deficient sums (e.g. LoRA experts): their
singular vectors are an arbitrary null-space basis, and the reference would give them the flattened singular value.
The mean is then over the kept values. For full-rank inputs this is exactly the reference.
Other tensors: ``W_pre + mean τ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._spectral import null_tol, polar_factor, spectral_norm_estimate
from .base import AnchorMethod, ModuleInput, check_range, opt
from .ta import check_lam


def iso_c_merge(taus: torch.Tensor) -> torch.Tensor:
    """``mean(S)·U Vᵀ`` of ``Σ τ_t`` (no α), numerically-null directions dropped."""
    m = taus.sum(dim=0)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0:
        return torch.zeros_like(m)
    keep = s > null_tol(s[0], tuple(m.shape), m.dtype)
    if not bool(keep.any()):
        return torch.zeros_like(m)
    return s[keep].mean() * (u[:, keep] @ vh[keep])


def iso_cts_split(d_out: int, d_in: int, num_tasks: int, common_frac: float, split: str = "floor") -> tuple[int, int]:
    """``(k_t, k_c)``: directions per task and in the common subspace."""
    r = min(d_out, d_in)
    q = (r - int(math.floor(common_frac * r))) / num_tasks
    k_t = max(1, int(math.floor(q)) if split == "floor" else int(round(q)))
    return k_t, max(0, r - num_tasks * k_t)


def iso_cts_merge(taus: torch.Tensor, common_frac: float = 0.8, split: str = "floor") -> torch.Tensor:
    """``mean(s)·U_cts⊥ V_cts⊥ᵀ`` (no α), see the module docstring."""
    T, d_out, d_in = taus.shape
    shape = (d_out, d_in)
    k_t, k_c = iso_cts_split(d_out, d_in, T, common_frac, split)
    m = taus.sum(dim=0)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0:
        return torch.zeros_like(m)
    keep_c = s[:k_c] > null_tol(s[0], shape, m.dtype)
    u_c, s_c, v_c = u[:, :k_c][:, keep_c], s[:k_c][keep_c], vh[:k_c][keep_c]
    us, ss, vs = [], [], []
    for t in range(T):
        tau = taus[t]
        resid = tau - u_c @ (u_c.T @ tau)
        ut, st, vht = torch.linalg.svd(resid, full_matrices=False)
        keep = st[:k_t] > null_tol(spectral_norm_estimate(tau), shape, m.dtype)
        us.append(ut[:, :k_t][:, keep])
        ss.append(st[:k_t][keep])
        vs.append(vht[:k_t][keep])
    us.append(u_c)
    ss.append(s_c)
    vs.append(v_c)
    u_all = torch.cat(us, dim=1)
    if u_all.shape[1] == 0:
        return torch.zeros_like(m)
    s_mean = torch.cat(ss).mean()
    v_all = torch.cat(vs, dim=0).T
    return s_mean * (polar_factor(u_all) @ polar_factor(v_all).T)


@dataclass
class IsoCOptions:
    alpha: float = opt(1.0, "scale α of the merged update")


@dataclass
class IsoCTSOptions:
    alpha: float = opt(1.0, "scale α of the merged update")
    common_frac: float = opt(0.8, "fraction f of the r = min(d_out, d_in) directions given to the common subspace")
    split: str = opt(
        "floor", "k_t = floor or round((r - floor(f r)) / T); round is the reference code", choices=("floor", "round")
    )


class IsoC(AnchorMethod):
    name = "iso-c"
    summary = "Iso-C: SVD of the summed task vectors with the spectrum flattened to its mean, times alpha"
    Options = IsoCOptions

    def validate_options(self, opts: IsoCOptions) -> None:
        check_lam(self.name, opts.alpha)

    def _module(self, inp: ModuleInput, opts: IsoCOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.alpha * iso_c_merge(inp.taus)


class IsoCTS(AnchorMethod):
    name = "iso-cts"
    summary = "Iso-CTS: common subspace of the sum plus task-specific directions, orthogonalized, flat spectrum"
    Options = IsoCTSOptions

    def validate_options(self, opts: IsoCTSOptions) -> None:
        check_lam(self.name, opts.alpha)
        check_range(self.name, "common_frac", opts.common_frac, 0.0, 1.0, False, True)

    def _module(self, inp: ModuleInput, opts: IsoCTSOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.alpha * iso_cts_merge(inp.taus, opts.common_frac, opts.split)

"""``iso-c`` and ``iso-cts``: isotropic merging (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging
with Common and Task-Specific Subspaces", arXiv 2502.04959; reference code github.com/danielm1405/iso-merging).

ISO-C. ``Σ_t τ_t = U S Vᵀ``; ``U0 = α · mean(S) · U Vᵀ`` (the spectrum flattened to its mean).

ISO-CTS (Alg. 1 of the paper, as the reference code computes it). With ``r = min(d_out, d_in)``, ``M = Σ_t τ_t``:

- split (the reference code's, the default): ``k_t = max(1, round((r − ⌊f·r⌋)/T))`` directions per task
  (f = ``common_frac`` = 0.8; Python's half-to-even ``round``) and ``k_c = max(0, r − T·k_t)`` common ones, so all
  r directions are used; e.g. r = 384, T = 3: (26, 306) as fusion-bench. ``split=floor`` takes ``⌊…⌋`` instead
  ((25, 309) there); the two differ only when (r − ⌊f·r⌋)/T has a fractional part ≥ 0.5. The ``max(1, ·)`` keeps
  one direction per task when there are more tasks than task-specific directions; then ``T·k_t`` may exceed r and
  ``k_c = 0``;
- common subspace: ``M = U S Vᵀ``, ``U_c = U[:, :k_c]``, ``S_c``, ``V_c`` (top k_c triplets of M);
- task t: ``R_t = τ_t − U_c U_cᵀ τ_t = U_t S_t V_tᵀ``, keep its k_t leading triplets;
- stack ``U_cts = [U_1,k_t … U_T,k_t, U_c]``, ``V_cts = [V_1,k_t … V_T,k_t, V_c]``, ``s = [S_1,k_t … S_T,k_t, S_c]``;
- orthogonalize both stacks by their polar factor (``P Qᵀ`` of their thin SVD);
- ``U0 = α · mean(s) · U_cts⊥ V_cts⊥ᵀ``.

So the right vectors are NOT recomputed from M: each block carries the right singular vectors of the matrix its
left vectors came from (V_c from M, V_t from R_t), and the stacked V is orthogonalized like U. With an
orthonormal U_cts⊥ (columns) and V_cts⊥ (columns, or rows when the stack is wider than d_in), all nonzero
singular values of U0 equal α·mean(s).

Both methods drop a direction only where its singular value is a numerical zero decided in float64
(``s <= scale·max(d)·eps_fp64``, scale = s_max(M) for M's triplets and ≈‖τ_t‖₂ for R_t's; see ``_spectral``): an
fp32 SVD whose smallest wanted value falls below fp32 resolution is redone in float64. Real fine-tuning deltas
keep every direction even with s_min/s_max ~ 1e-5, so on full-rank inputs the result is the reference's at every
size; only truly rank-deficient sums (an expert equal to the base in a module, exactly low-rank updates) lose
their null space, whose singular vectors are arbitrary (the reference would give them the flattened value). The
mean is then over the kept values. LoRA experts give the rank bound exactly (``ModuleInput.ranks``): the float32
product ``B·A`` has rounding in its null space above the float64 threshold, so ISO-C keeps at most Σ r_t directions
of the sum, and ISO-CTS at most that many common ones and r_t (less what the common subspace covers) per task.

Speed: ISO-CTS takes R_t's k_t leading triplets by a guarded Rayleigh-Ritz step (``_spectral``), and since every
U_t is orthogonal to U_c, ``U_cts⊥ = [polar(U_1 … U_T), U_c]``: one small polar factor instead of a full one.
Other tensors: ``W_pre + mean τ``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._spectral import NeedFloat64, leading_triplets, polar_factor, spectral_norm_estimate
from .base import AnchorMethod, ModuleInput, check_range, opt
from .ta import check_lam


def total_rank(ranks: Sequence[int | None] | None) -> int | None:
    """A bound on rank(Σ τ_t) from per-task bounds (LoRA ranks): their sum, or None unless every task has one."""
    return None if ranks is None or any(r is None for r in ranks) else sum(ranks)  # type: ignore[arg-type]


def iso_c_merge(taus: torch.Tensor, ranks: Sequence[int | None] | None = None) -> torch.Tensor:
    """``mean(S)·U Vᵀ`` of ``Σ τ_t`` over all r directions (no α); only numerically-null directions dropped, and
    with ``ranks`` (every task's rank bound known) no more than their sum."""
    m = taus.sum(dim=0)
    u, s, vh = leading_triplets(m, total_rank(ranks))
    if s.numel() == 0:
        return torch.zeros_like(m)
    return s.mean() * (u @ vh)


def iso_cts_split(d_out: int, d_in: int, num_tasks: int, common_frac: float, split: str = "round") -> tuple[int, int]:
    """``(k_t, k_c)``: directions per task and in the common subspace (``round``: the reference's split)."""
    r = min(d_out, d_in)
    q = (r - int(math.floor(common_frac * r))) / num_tasks
    k_t = max(1, int(math.floor(q)) if split == "floor" else int(round(q)))
    return k_t, max(0, r - num_tasks * k_t)


def _polar_with_common(u_tasks: torch.Tensor, u_c: torch.Tensor) -> torch.Tensor:
    """Polar factor of the stack ``[u_tasks, u_c]``. The task blocks are orthogonal to the orthonormal ``u_c`` (they
    come from residuals with ``u_c`` projected out), so when the stack is tall its Gram is block diagonal and the
    polar factor is ``[polar(u_tasks), u_c]``: one small SVD instead of a full one."""
    if u_tasks.shape[1] + u_c.shape[1] > u_c.shape[0] or u_tasks.shape[1] == 0:
        return polar_factor(torch.cat([u_tasks, u_c], dim=1))
    u_tasks = u_tasks - u_c @ (u_c.T @ u_tasks)  # remove the rounding-level overlap with u_c
    return torch.cat([polar_factor(u_tasks), u_c], dim=1)


def iso_cts_merge(taus: torch.Tensor, common_frac: float = 0.8, split: str = "round",
                  ranks: Sequence[int | None] | None = None) -> torch.Tensor:
    """``mean(s)·U_cts⊥ V_cts⊥ᵀ`` (no α), see the module docstring. In float64 (residuals included) when an fp32
    pass meets a singular value below fp32 resolution. ``ranks``: per task a known bound on rank(τ_t) or None."""
    try:
        return _iso_cts(taus, common_frac, split, ranks)
    except NeedFloat64:
        return _iso_cts(taus.double(), common_frac, split, ranks).to(taus.dtype)


def _iso_cts(taus: torch.Tensor, common_frac: float, split: str, ranks) -> torch.Tensor:
    T, d_out, d_in = taus.shape
    k_t, k_c = iso_cts_split(d_out, d_in, T, common_frac, split)
    total = total_rank(ranks)
    m = taus.sum(dim=0)
    u_c, s_c, v_c = leading_triplets(m, k_c if total is None else min(k_c, total), fallback=False)
    us, ss, vs = [], [], []
    for t in range(T):
        tau = taus[t]
        resid = tau - u_c @ (u_c.T @ tau)
        k = k_t
        if ranks is not None and ranks[t] is not None:  # the residual lies in τ_t's span, less what U_c covers of Σ
            k = min(k, ranks[t], total - u_c.shape[1]) if total is not None else min(k, ranks[t])
        ut, st, vht = leading_triplets(resid, k, scale=spectral_norm_estimate(tau), ritz=True, fallback=False)
        us.append(ut)
        ss.append(st)
        vs.append(vht)
    u_tasks = torch.cat(us, dim=1)
    if u_tasks.shape[1] + u_c.shape[1] == 0:
        return torch.zeros_like(m)
    s_mean = torch.cat(ss + [s_c]).mean()
    v_all = torch.cat(vs + [v_c], dim=0).T
    return s_mean * (_polar_with_common(u_tasks, u_c) @ polar_factor(v_all).T)


@dataclass
class IsoCOptions:
    alpha: float = opt(1.0, "scale α of the merged update")


@dataclass
class IsoCTSOptions:
    alpha: float = opt(1.0, "scale α of the merged update")
    common_frac: float = opt(0.8, "fraction f of the r = min(d_out, d_in) directions given to the common subspace")
    split: str = opt(
        "round",
        "k_t = round((r - floor(f r)) / T) as the reference code (default), or floor",
        choices=("round", "floor"),
    )


class IsoC(AnchorMethod):
    name = "iso-c"
    summary = "Iso-C: SVD of the summed task vectors with the spectrum flattened to its mean, times alpha"
    Options = IsoCOptions

    def validate_options(self, opts: IsoCOptions) -> None:
        check_lam(self.name, opts.alpha)

    def _module(self, inp: ModuleInput, opts: IsoCOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.alpha * iso_c_merge(inp.taus, inp.ranks)


class IsoCTS(AnchorMethod):
    name = "iso-cts"
    summary = "Iso-CTS: common subspace of the sum plus task-specific directions, orthogonalized, flat spectrum"
    Options = IsoCTSOptions

    def validate_options(self, opts: IsoCTSOptions) -> None:
        check_lam(self.name, opts.alpha)
        check_range(self.name, "common_frac", opts.common_frac, 0.0, 1.0, False, True)

    def _module(self, inp: ModuleInput, opts: IsoCTSOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.alpha * iso_cts_merge(inp.taus, opts.common_frac, opts.split, inp.ranks)

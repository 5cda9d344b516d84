"""``tsv``: TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

Per 2-D module with T task vectors ``τ_t = U_t S_t V_tᵀ`` (thin SVD):

1. keep the ``r = max(1, ⌊min(d_out, d_in)/T⌋)`` leading triplets of each task (the reference's
   ``int(min(d_out, d_in)·(1/T))``; when ``min(d_out, d_in) < T`` it would keep none, we keep 1 per task);
2. stack ``U = [U_1,r … U_T,r]`` (d_out × T·r), ``S`` likewise, ``V = [V_1,r … V_T,r]`` (d_in × T·r);
3. orthogonalize by the polar factor: ``U⊥ = P Qᵀ`` from ``U = P Σ Qᵀ`` (and ``V⊥`` likewise);
4. ``U0 = α · U⊥ diag(S) V⊥ᵀ``.

The reference pads the stacks with zero columns up to min(d_out, d_in); the zero columns meet zero entries of S,
so the result is the same. When ``T·r`` exceeds ``d_out`` (or ``d_in``) the stack is wider than tall and its polar
factor has orthonormal rows instead of columns (the nearest partial isometry); ``U0`` stays well defined.
Triplets whose singular value is a numerical zero decided in float64 (``s <= s_max(τ_t)·max(d)·eps_fp64``, see
``_spectral``; only exactly rank-deficient τ_t) are dropped before stacking: their vectors are an arbitrary basis
of a null space and would only perturb the orthogonalization (the reference keeps them). A LoRA expert's task
vector ``B·A`` has rank at most r, but its float32 product has rounding in the null space, above that float64
threshold: such a task contributes at most r triplets (``ModuleInput.ranks``). The leading triplets come
from a guarded Rayleigh-Ritz step on the Gram's leading eigenvectors when r is well below min(d), else from the
SVD in its faster orientation.
Other tensors: ``W_pre + mean τ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._spectral import leading_triplets, polar_factor
from .base import AnchorMethod, ModuleInput, opt
from .ta import check_lam


def tsv_rank(d_out: int, d_in: int, num_tasks: int) -> int:
    """Directions kept per task: ``max(1, ⌊min(d_out, d_in)/T⌋)``."""
    return max(1, min(d_out, d_in) // num_tasks)


def tsv_merge(taus: torch.Tensor, ranks: Sequence[int | None] | None = None) -> torch.Tensor:
    """``U⊥ diag(S) V⊥ᵀ`` for one stack ``taus [T, d_out, d_in]`` (no α). ``ranks``: per task a known bound on
    rank(τ_t) (a LoRA expert's r) or None; no more triplets are kept from that task."""
    T, d_out, d_in = taus.shape
    r = tsv_rank(d_out, d_in, T)
    us, ss, vs = [], [], []
    for t in range(T):
        k = r if ranks is None or ranks[t] is None else min(r, ranks[t])
        u, s, vh = leading_triplets(taus[t], k, ritz=True)
        us.append(u)
        ss.append(s)
        vs.append(vh)
    u_all = torch.cat(us, dim=1)
    if u_all.shape[1] == 0:
        return torch.zeros_like(taus[0])
    s_all = torch.cat(ss)
    v_all = torch.cat(vs, dim=0).T  # d_in x (T r)
    return (polar_factor(u_all) * s_all) @ polar_factor(v_all).T


@dataclass
class TSVOptions:
    alpha: float = opt(1.0, "scale α of the merged update")


class TSV(AnchorMethod):
    name = "tsv"
    summary = "TSV-Merge: top min(d)/T singular triplets per task, stacked, orthogonalized (polar), times alpha"
    Options = TSVOptions

    def validate_options(self, opts: TSVOptions) -> None:
        check_lam(self.name, opts.alpha)

    def _module(self, inp: ModuleInput, opts: TSVOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.alpha * tsv_merge(inp.taus, inp.ranks)

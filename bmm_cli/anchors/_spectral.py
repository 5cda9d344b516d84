"""SVD helpers shared by TSV and the isotropic methods."""

from __future__ import annotations

import torch


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """``P Qᵀ`` from ``m = P S Qᵀ`` (thin SVD): the nearest matrix with orthonormal columns (or orthonormal rows
    when ``m`` is wider than tall), i.e. the orthogonal Procrustes / Löwdin orthogonalization of ``m``."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def null_tol(scale: torch.Tensor | float, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | float:
    """Singular values at or below ``scale · max(shape) · eps`` are numerical zeros (numpy/torch matrix_rank rule).

    Their singular vectors are arbitrary (any basis of a null space), so the anchors drop such directions instead of
    letting them steer an orthogonalization or receive a flattened singular value. For full-rank task vectors (dense
    fine-tuning) nothing is dropped and the result equals the reference implementations'.
    """
    return scale * max(shape) * torch.finfo(dtype).eps


def spectral_norm_estimate(a: torch.Tensor, iters: int = 12) -> torch.Tensor:
    """A deterministic power-iteration estimate (a lower bound, usually within a few %) of ``‖a‖₂`` for tolerances."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(a.shape[1], generator=g, dtype=a.dtype).to(a.device)
    v = v / v.norm().clamp_min(torch.finfo(a.dtype).tiny)
    est = a.new_zeros(())
    for _ in range(iters):
        u = a @ v
        est = u.norm()
        w = a.T @ u
        v = w / w.norm().clamp_min(torch.finfo(a.dtype).tiny)  # a == 0 gives v == 0 and an estimate of 0
    return est

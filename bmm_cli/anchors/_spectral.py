"""SVD helpers shared by TSV and the isotropic methods: fast thin SVDs, leading triplets, polar factors, and the
rule that decides which singular directions are numerical zeros.

Speed (CPU, fp32, one thread; ``bench/svd_anchors.py``): LAPACK's divide-and-conquer SVD of a wide matrix costs
~1.5-2x that of its transpose, so every SVD here runs in the tall orientation. When only the leading ``k`` triplets
are needed and ``k`` is well below ``min(d_out, d_in)``, :func:`leading_triplets` takes a Rayleigh-Ritz step on
the ``k + p`` leading eigenvectors of the fp32 Gram of the short side (one GEMM, one eigh of the short side, one
thin SVD of a ``d × (k + p)`` matrix), guarded by a Davis-Kahan bound and falling back to the exact SVD.

Null rule (all methods). A singular value is a numerical zero when ``s <= scale · max(d_out, d_in) · eps_fp64``
(the numpy/torch ``matrix_rank`` rule in float64; ``scale`` is ``s_max`` of the matrix, or of the task vector a
residual came from). Only such directions are dropped: their singular vectors are an arbitrary basis of a null
space. An fp32 SVD cannot see below ``s_max · max(d) · eps_fp32``; when a wanted singular value falls that low
(decaying spectra of real fine-tuning deltas reach s_min/s_max ~ 1e-5), the decomposition is redone in float64
and the rule applied there. Full-rank inputs therefore keep every direction, exactly as the reference
implementations do; truly rank-deficient ones (zero rows, an expert equal to the base, exact low-rank updates)
drop their null space.
"""

from __future__ import annotations

import torch

_EPS64 = torch.finfo(torch.float64).eps
_RITZ_MAX_FRAC = 0.7  # Rayleigh-Ritz only when k + p <= this fraction of the short side (else the exact SVD is cheaper)
_RITZ_ANGLE = 1e-3  # Davis-Kahan estimate of the subspace angle that the Ritz step must meet (else exact SVD)


class NeedFloat64(Exception):
    """Raised by :func:`leading_triplets` with ``fallback=False`` when a wanted singular value is below what the
    input's precision resolves: the caller redoes its whole computation in float64 (residuals included)."""


def svd_thin(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(m, full_matrices=False)`` computed in the faster tall orientation, and computed again
    when LAPACK's divide and conquer does not converge (:func:`_svd_retry`)."""
    tall = m.shape[0] >= m.shape[1]
    x = m if tall else m.T
    try:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = _svd_retry(x)
    return (u, s, vh) if tall else (vh.T, s, u.T)


def _svd_retry(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ``x`` after ``gesdd`` failed to converge. In float32 that happens on clustered spectra, such as
    the polar stacks of nearly orthonormal vectors (an ISO-CTS merge of SmolLM2-135M experts, one thread, met it):
    the same SVD in float64, and if that fails too, LAPACK's QR-iteration driver ``gesvd``. Back in ``x.dtype``."""
    x64 = x.double()
    try:
        got = torch.linalg.svd(x64, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.device.type == "cuda":
            got = torch.linalg.svd(x64, full_matrices=False, driver="gesvd")
        else:
            import scipy.linalg

            u, s, vh = scipy.linalg.svd(x64.numpy(), full_matrices=False, lapack_driver="gesvd", check_finite=False)
            got = tuple(torch.from_numpy(a) for a in (u, s, vh))
    return tuple(a.to(x.dtype) for a in got)


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """``P Qᵀ`` from ``m = P S Qᵀ`` (thin SVD): the nearest matrix with orthonormal columns (or orthonormal rows
    when ``m`` is wider than tall), i.e. the orthogonal Procrustes / Löwdin orthogonalization of ``m``."""
    p, _, qh = svd_thin(m)
    return p @ qh


def null_tol(scale: torch.Tensor | float, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | float:
    """``scale · max(shape) · eps(dtype)``: singular values at or below it are zeros in that precision."""
    return scale * max(shape) * torch.finfo(dtype).eps


def _partial(device: torch.device, n: int, m: int) -> bool:
    return device.type == "cpu" and 4 * m <= n


def _top_eigh(g: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenpairs of the symmetric ``g``, at least its ``m`` largest. For a small ``m`` on the CPU,
    LAPACK's MRRR (``?syevr``) computes only those (2-3x faster than a full ``eigh`` at m = n/12); else all."""
    n = g.shape[0]
    if not _partial(g.device, n, m):
        return torch.linalg.eigh(g)
    import scipy.linalg

    lam, w = scipy.linalg.eigh(g.numpy(), subset_by_index=[n - m, n - 1], driver="evr", check_finite=False)
    return torch.from_numpy(lam).to(g.dtype), torch.from_numpy(w).to(g.dtype)


def _ritz(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Leading k triplets by Rayleigh-Ritz on the Gram's leading eigenvectors; None when the guard fails."""
    tall = m.shape[0] >= m.shape[1]
    x = m if tall else m.T
    n = x.shape[1]
    p = max(16, k // 2)
    if k + p > _RITZ_MAX_FRAC * n:
        return None
    # few eigenpairs (MRRR, see _top_eigh): a float64 Gram costs next to nothing there and removes the squared
    # fp32 rounding that a flat spectrum around the cut amplifies (ISO-CTS residuals: 1e-4 -> 1.5e-5 on the merge)
    gdt = torch.float64 if _partial(x.device, n, k + p + 1) else x.dtype
    xg = x.to(gdt)
    lam, w = _top_eigh(xg.T @ xg, k + p + 1)  # ascending; the last k + p + 1 eigenpairs (or all)
    lam, w = lam.to(x.dtype), w.to(x.dtype)
    n_got = lam.shape[0]
    lam1, lamk, lam_out = lam[-1], lam[n_got - k], lam[n_got - k - p - 1]
    # eigh of an fp32 Gram errs by ~ sqrt(n)·eps·λ_1 (Gram rounding included); the top-k subspace lies within the
    # kept k + p eigenvectors up to that over the gap λ_k − λ_{k+p+1} (Davis-Kahan). The merge error this leaves
    # is checked against the exact SVD in tests/anchors/test_spectral.py.
    err = n**0.5 * torch.finfo(gdt).eps * lam1
    if not bool(lamk - lam_out > err / _RITZ_ANGLE):
        return None
    w = w[:, n_got - k - p :].flip(1)
    u, s, zh = svd_thin(x @ w)
    u, s, vh = u[:, :k], s[:k], zh[:k] @ w.T
    return (u, s, vh) if tall else (vh.T, s, u.T)


def leading_triplets(
    m: torch.Tensor,
    k: int | None = None,
    scale: torch.Tensor | float | None = None,
    *,
    ritz: bool = False,
    fallback: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets ``(u [d_out, k'], s [k'], vh [k', d_in])`` of ``m`` (k None: all), the
    numerically zero ones dropped (``k' <= k``, see the module docstring; ``scale`` defaults to ``s_max(m)``).
    ``ritz`` allows the Rayleigh-Ritz shortcut. When a wanted value is below fp32 resolution the SVD of ``m`` is
    redone in float64 (``fallback``) or :class:`NeedFloat64` is raised. Results come back in ``m.dtype``."""
    r = min(m.shape)
    k = r if k is None else min(k, r)
    if k == 0 or r == 0:
        return m.new_zeros(m.shape[0], 0), m.new_zeros(0), m.new_zeros(0, m.shape[1])
    got = _ritz(m, k) if (ritz and k < r) else None
    u, s, vh = got if got is not None else svd_thin(m)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    top = s[0] if scale is None else scale
    if m.dtype != torch.float64 and not bool(s[-1] > null_tol(top, tuple(m.shape), m.dtype)):
        # below what this precision resolves: decide (and compute) in float64
        if not fallback:
            raise NeedFloat64
        u, s, vh = svd_thin(m.double())
        u, s, vh = u[:, :k], s[:k], vh[:k]
        top = s[0] if scale is None else scale
    keep = s > null_tol(top, tuple(m.shape), torch.float64)
    return u[:, keep].to(m.dtype), s[keep].to(m.dtype), vh[keep].to(m.dtype)


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

"""Posterior noise of BMM's Bayesian regression (paper App. B, Eq. 32), in relative units.

Each row of a module's ``U`` has the Gaussian posterior ``N(U_MAP, Σ_row)``, ``Σ_row = r²·β⁻¹·(Ĝ + λI)⁻¹`` with
``r`` the RMS of the base weight; with ``Ĝ = QΛQᵀ`` a draw of the noise is one GEMM (:func:`posterior_noise`).
Draws are seeded per (run seed, sample, module key) and made on the CPU, so they do not depend on the device or on
which other modules are drawn (:func:`standard_normal`). ``bmm sample`` (:mod:`bmm_cli.sample`) writes the models.
"""

from __future__ import annotations

import hashlib
import math

import torch


def noise_seed(seed: int, sample: int, key: str) -> int:
    """A 63-bit generator seed for one (run seed, sample index, module key): independent draws per module."""
    h = hashlib.sha256(f"bmm-sample/{seed}/{sample}/{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def standard_normal(shape: tuple[int, int], seed: int, sample: int, key: str) -> torch.Tensor:
    """E ~ N(0, 1) of ``shape`` in fp32, drawn on the CPU (the same numbers on every device)."""
    g = torch.Generator(device="cpu").manual_seed(noise_seed(seed, sample, key))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def posterior_noise(E: torch.Tensor, Q: torch.Tensor, evals: torch.Tensor, lam: float, beta: float,
                    r: float) -> torch.Tensor:
    """``(r/√β) · E · diag((Λ+λ)^{-1/2}) · Qᵀ``: rows with covariance ``r²β⁻¹ Q diag(1/(Λ+λ)) Qᵀ``."""
    col = (r / math.sqrt(beta)) * (evals.to(Q.dtype) + lam).rsqrt()
    return (E.to(Q.dtype) * col) @ Q.mT

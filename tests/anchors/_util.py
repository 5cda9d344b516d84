"""Helpers for the anchor tests: seeded random stacks and direct re-derivations shared by several files."""

from __future__ import annotations

import torch


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def polar(m: torch.Tensor) -> torch.Tensor:
    """P Qᵀ of the thin SVD, written out again for the tests."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh

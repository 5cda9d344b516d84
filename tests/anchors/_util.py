"""Helpers for the anchor tests: seeded random stacks and direct re-derivations shared by several files."""

from __future__ import annotations

import torch


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def polar(m: torch.Tensor) -> torch.Tensor:
    """P Qᵀ of the thin SVD, written out again for the tests."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def lora_stack(gen: torch.Generator, T: int, d_out: int, d_in: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T rank-``r`` task vectors ``B_t·A_t`` as float64 (exact) and as the float32 product a LoRA expert gives."""
    bs = [randn(gen, d_out, r) for _ in range(T)]
    as_ = [randn(gen, r, d_in) for _ in range(T)]
    exact = torch.stack([b @ a for b, a in zip(bs, as_)]) * 1e-3
    fp32 = torch.stack([b.float() @ a.float() for b, a in zip(bs, as_)]) * 1e-3
    return exact, fp32

"""``pretrained``: the base model itself is the anchor, ``U0 = 0``; other tensors stay ``W_pre``."""

from __future__ import annotations

from typing import Any

import torch

from .base import AnchorMethod, ModuleInput


class Pretrained(AnchorMethod):
    name = "pretrained"
    summary = "U0 = 0 (the base model); other tensors keep the base value"
    is_zero = True

    def module(self, inp: ModuleInput, opts: Any, state: Any, device: torch.device | str | None) -> torch.Tensor:
        self._opts(opts)
        self._check_input(inp)
        return torch.zeros_like(inp.taus[0])  # nothing to compute: skip moving the task vectors to `device`

    def _other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: Any, state: Any) -> torch.Tensor:
        return base

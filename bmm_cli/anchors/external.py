"""``external``: any merged checkpoint of the same architecture is the anchor, ``U0 = W_anchor − W_pre``.

Other tensors: the caller (the anchor stage) takes them from the external checkpoint itself. ``other`` here is
only the fallback for a tensor that checkpoint lacks: ``W_pre + mean τ``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AnchorMethod, ModuleInput


class External(AnchorMethod):
    name = "external"
    summary = "U0 = W_external - W_pre from a merged checkpoint (e.g. mergekit output); other: base + mean tau fallback"
    needs_external = True

    def _module(self, inp: ModuleInput, opts: Any, state: Any, device: torch.device) -> torch.Tensor:
        assert inp.external is not None
        return inp.external - inp.base

"""``ta``: task arithmetic (Ilharco et al. 2023), ``U0 = λ·Σ_t τ_t``; other tensors ``W_pre + λ·Σ_t τ_t``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .base import AnchorMethod, ModuleInput, opt


@dataclass
class TAOptions:
    lam: float = opt(0.3, "scale λ of the summed task vectors")


def check_lam(method: str, lam: float) -> None:
    if not math.isfinite(lam):
        raise InputError(f"anchor {method} option lam={lam} is not finite; give a finite scale such as lam=0.3")


class TaskArithmetic(AnchorMethod):
    name = "ta"
    summary = "task arithmetic: U0 = lam * sum of task vectors (also on other tensors)"
    Options = TAOptions

    def validate_options(self, opts: TAOptions) -> None:
        check_lam(self.name, opts.lam)

    def _module(self, inp: ModuleInput, opts: TAOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.lam * inp.taus.sum(dim=0)

    def _other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: TAOptions, state: Any) -> torch.Tensor:
        return base + opts.lam * taus.sum(dim=0)

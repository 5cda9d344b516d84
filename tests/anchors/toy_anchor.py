"""A toy anchor: U0 = weight · (mean of the task vectors); every other tensor W_pre + weight · (mean τ)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bmm_cli.anchors import register
from bmm_cli.anchors.base import AnchorMethod, ModuleInput, check_range, opt


@dataclass
class ToyMeanOptions:
    weight: float = opt(1.0, "factor of the mean task vector")


class ToyMean(AnchorMethod):
    name = "toy-mean"
    summary = "U0 = weight * mean of the task vectors (the worked example of docs/adding-an-anchor.md)"
    Options = ToyMeanOptions

    def validate_options(self, opts: ToyMeanOptions) -> None:
        check_range(self.name, "weight", opts.weight, 0.0, 10.0, True, False)

    def _module(self, inp: ModuleInput, opts: ToyMeanOptions, state, device: torch.device) -> torch.Tensor:
        return opts.weight * inp.taus.mean(dim=0)

    def _other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: ToyMeanOptions, state) -> torch.Tensor:
        return base + opts.weight * taus.mean(dim=0)


register(ToyMean())

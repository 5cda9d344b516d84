"""Choosing the compute device: ``--device auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r} is not a torch device (use auto, cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} asked for CUDA but torch sees no CUDA device; use --device cpu")
    return dev

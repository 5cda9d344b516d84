"""``dare`` and ``dare-ties``: drop-and-rescale task vectors (Yu et al. 2024, "Language Models are Super Mario").

Each entry of each ``τ_t`` is dropped with probability ``p`` and the survivors are scaled by ``1/(1−p)`` (so the
dropped vector equals τ in expectation), then

- ``dare``: task arithmetic on the dropped vectors, ``U0 = λ·Σ_t drop(τ_t)``, default ``λ = 0.3`` = the ``ta``
  default, so ``dare`` with ``p=0`` is exactly ``ta``;
- ``dare-ties``: TIES on the dropped vectors (global thresholds computed on the DROPPED vectors in the prepass),
  default ``k = 0.2``, ``λ = 1.0`` = the ``ties`` defaults, so ``p=0`` is exactly ``ties``.
Other tensors get the same rule: ``W_pre + that``.

The drop mask is a pure function of ``(seed, key, task index, flat index of the entry in the tensor as given)``:
a counter-based hash (murmur3's 32-bit finalizer over a Weyl sequence, salted with blake2b of seed/key/task) in
exact 64-bit integer arithmetic. Unlike ``torch.Generator`` streams, it gives the same mask on CPU and CUDA, in
any iteration order and chunking, which the exact DARE-TIES threshold needs: the prepass and ``module``/``other``
must drop the same entries. Contract for the caller: give ``prepare`` each tensor in the same layout (and under the
same key) as ``module``/``other`` will get it, e.g. GPT-2 Conv1D weights already transposed.
Keep test: an entry survives when ``hash >= round(p·2³²)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from .base import AnchorMethod, ModuleInput, check_range, opt
from .ta import check_lam
from .ties import Ties, Transform

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x·c mod 2³²`` for 0 <= x < 2³² held in int64, without int64 overflow (16-bit split)."""
    ct = torch.tensor(c, dtype=torch.int64, device=x.device)  # a 0-dim tensor: CPU multiplies by a Python int
    return ((x & 0xFFFF) * ct + ((((x >> 16) * ct) & 0xFFFF) << 16)) & _M32  # above 2^31 ~60x slower


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _salt(seed: int, key: str, task: int) -> tuple[int, int]:
    d = hashlib.blake2b(f"dare\0{seed}\0{key}\0{task}".encode(), digest_size=8).digest()
    return int.from_bytes(d[:4], "little"), int.from_bytes(d[4:], "little")


def keep_mask(
    seed: int, key: str, task: int, start: int, count: int, p: float, device: torch.device | str
) -> torch.Tensor:
    """Bool mask of the entries ``start .. start+count-1`` (flat index) of task ``task`` of ``key`` that DARE keeps."""
    s1, s2 = _salt(seed, key, task)
    i = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = _fmix32(_mul32(i & _M32, _GOLDEN) ^ s1)
    h = _fmix32(h ^ ((i >> 32) & _M32) ^ s2)  # second round: mixes the high index bits and the second salt
    return h >= round(p * 2.0**32)


def drop_chunk(key: str, x: torch.Tensor, start: int, p: float, seed: int) -> torch.Tensor:
    """DARE on a chunk ``x [T, n]`` (flat entries ``start .. start+n-1`` of each task's tensor)."""
    if p == 0.0:
        return x
    scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=x.device)  # a tensor: same rounding on every device
    out = torch.empty_like(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    for t in range(x.shape[0]):
        m = keep_mask(seed, key, t, start, x.shape[1], p, x.device)
        out[t] = torch.where(m, x[t] * scale, zero)
    return out


def drop(key: str, taus: torch.Tensor, p: float, seed: int, chunk: int = 1 << 24) -> torch.Tensor:
    """DARE of a whole stack ``taus [T, ...]`` (any tensor shape), ``chunk`` entries per task at a time (bounds the
    int64 temporaries of the hash)."""
    if p == 0.0:
        return taus
    flat = taus.reshape(taus.shape[0], -1)
    out = torch.empty_like(flat)
    for a in range(0, flat.shape[1], chunk):
        out[:, a : a + chunk] = drop_chunk(key, flat[:, a : a + chunk], a, p, seed)
    return out.reshape(taus.shape)


@dataclass
class DareOptions:
    p: float = opt(0.9, "drop probability per entry (survivors are scaled by 1/(1-p))")
    lam: float = opt(0.3, "scale λ of the summed dropped task vectors (the ta default)")
    seed: int = opt(0, "seed of the drop masks")


@dataclass
class DareTiesOptions:
    p: float = opt(0.9, "drop probability per entry (survivors are scaled by 1/(1-p))")
    k: float = opt(0.2, "TIES: fraction of each dropped task vector kept (top |tau| over the whole model)")
    lam: float = opt(1.0, "scale λ of the disjoint mean (the ties default)")
    seed: int = opt(0, "seed of the drop masks")
    zero_sign: str = opt(
        "majority",
        "sign for entries whose kept values sum to 0: majority (reference, one more pass), positive, none",
        choices=("majority", "positive", "none"),
    )


class Dare(AnchorMethod):
    name = "dare"
    summary = "DARE: drop entries with prob p, rescale by 1/(1-p), then task arithmetic with lam"
    Options = DareOptions

    def validate_options(self, opts: DareOptions) -> None:
        check_range(self.name, "p", opts.p, 0.0, 1.0, False, True)
        check_lam(self.name, opts.lam)

    def _module(self, inp: ModuleInput, opts: DareOptions, state: Any, device: torch.device) -> torch.Tensor:
        return opts.lam * drop(inp.key, inp.taus, opts.p, opts.seed).sum(dim=0)

    def _other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: DareOptions, state: Any) -> torch.Tensor:
        return base + opts.lam * drop(key, taus, opts.p, opts.seed).sum(dim=0)


class DareTies(Ties):
    """TIES on the DARE-dropped task vectors: :class:`~.ties.Ties` with DARE's drop as its transform."""

    name = "dare-ties"
    summary = "DARE then TIES: drop/rescale, global top-k trim of the dropped vectors, sign election, disjoint mean"
    Options = DareTiesOptions

    def validate_options(self, opts: DareTiesOptions) -> None:
        check_range(self.name, "p", opts.p, 0.0, 1.0, False, True)
        super().validate_options(opts)

    def transform(self, opts: DareTiesOptions) -> Transform:
        def dropped(key: str, x: torch.Tensor, start: int) -> torch.Tensor:
            return drop_chunk(key, x, start, opts.p, opts.seed)

        return dropped

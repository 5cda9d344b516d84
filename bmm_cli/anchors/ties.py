"""``ties``: TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, times λ.

Trim. Per task t keep the ``K = ⌊k·N⌋`` entries of largest ``|τ_t|`` over the WHOLE model, where N counts every
floating parameter (solvable block weights and "other" tensors alike), as the reference does with its flattened
state dict. One global threshold per task, computed exactly by :func:`global_topk_thresholds` with a streamed radix
select: memory is one tensor at a time plus a 65536-bin histogram per task; nothing is concatenated.

Tie rule. ``θ_t`` is the K-th largest ``|τ_t|`` (``torch.kthvalue(|τ_t|, N − K + 1)`` over the concatenation) and
every entry with ``|τ_t| ≥ θ_t`` is kept, so entries tied with the K-th are all kept (``state.kept[t] − K`` extra
entries, reported). Without ties exactly K are kept. ``K = 0`` keeps nothing (``θ = +inf``). The reference code
keeps ``|τ| ≥ kthvalue(N − K)`` i.e. one entry more than K even without ties (an off-by-one we do not copy: the
difference is a single entry per task).

Elect. ``s = sign(Σ_t trimmed τ_t)`` per entry. Where the kept values sum to exactly zero (all dropped, or an exact
cancellation such as ``+a`` and ``−a`` in bf16 deltas), ``zero_sign`` decides: ``majority`` (default, the
reference) uses the sign of the model-wide sum of elected signs, found in one more streamed pass (``+1`` when that
sum is positive, else ``−1``, which is what the reference's ``where(sign > 0, τ > 0, τ < 0)`` does when it is 0);
``positive`` (mergekit) uses +1 and skips the pass; ``none`` leaves 0, so such entries merge to 0.

Disjoint mean. The mean of the kept, non-zero values whose sign equals ``s`` (0 where there are none), times λ.
The same rule gives "other" tensors: ``W = W_pre + that``.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError, NumericError
from .base import AnchorMethod, IterAll, ModuleInput, check_range, opt
from .ta import check_lam

_BINS = 1 << 16
_LAST_PASS = 5  # digits: 2 of the float32 bit pattern, then 4 of the float64 bit pattern
_CHUNK = 1 << 23  # entries per task and step of the streamed passes (bounds temporaries)

# transform(key, chunk [T, n] in compute dtype, flat start index of the chunk) -> transformed chunk
Transform = Callable[[str, torch.Tensor, int], torch.Tensor]


@dataclass
class TopK:
    """Per-task global thresholds of the trim step (returned by ``prepare``)."""

    total: int  # N: floating entries per task over the whole model
    k_keep: int  # K = ⌊k·N⌋
    thresholds: list[float]  # θ_t, the K-th largest |τ_t| (+inf when K = 0), exact
    kept: list[int]  # entries with |τ_t| >= θ_t (K plus the ties at θ_t; when θ_t = 0, e.g. after DARE, every
    # entry counts as kept, the zeros change nothing)
    passes: int  # streamed passes used for the thresholds
    majority: float = 1.0  # sign given to entries whose kept values sum to 0 (zero_sign)
    extra: list[int] = field(default_factory=list)  # kept[t] - K

    def __post_init__(self) -> None:
        if not self.extra:
            self.extra = [k - self.k_keep for k in self.kept]


def _digit(x: torch.Tensor, j: int) -> torch.Tensor:
    """Digit j (16 bits) of the order-preserving key of non-negative ``x``: digits 0-1 are the float32 bit pattern
    of ``float32(x)``, digits 2-5 the float64 bit pattern of ``x``. Rounding to float32 is monotone, so comparing
    (float32(x), float64(x)) lexicographically orders x exactly, in any source dtype."""
    if j < 2:
        b = x.to(torch.float32).view(torch.int32).to(torch.int64)
        return b >> 16 if j == 0 else b & 0xFFFF
    b = x.to(torch.float64).view(torch.int64)
    return (b >> (48 - 16 * (j - 2))) & 0xFFFF


def _value(prefix: list[int], p: int) -> float:
    """The value whose key starts with digits ``prefix[: p + 1]`` when that prefix already fixes it."""
    if p <= 1:
        bits = (prefix[0] << 16) | (prefix[1] if p == 1 else 0)
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    bits = (prefix[2] << 48) | (prefix[3] << 32) | (prefix[4] << 16) | prefix[5]
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _fixed_after(p: int, dtypes: set[torch.dtype]) -> bool:
    """After pass p, does the chosen prefix determine the value? bf16 fills only the high 16 bits of float32;
    every float type up to 32 bits converts exactly to float32; float64 needs its own four digits."""
    if p == 0:
        return dtypes <= {torch.bfloat16}
    if p == 1:
        return torch.float64 not in dtypes
    return p == _LAST_PASS


def _chunks(key: str, taus: torch.Tensor, num_tasks: int, device: torch.device, transform: Transform | None):
    """(start, |τ| chunk [T, n]) over one tensor, moved to ``device``, transformed, in compute dtype."""
    if taus.shape[0] != num_tasks:
        raise InputError(f"{key}: {taus.shape[0]} task vectors in the prepass, expected {num_tasks}")
    flat = taus.reshape(num_tasks, -1)
    n = flat.shape[1]
    step = max(1, _CHUNK // num_tasks)
    cdt = torch.float64 if taus.dtype == torch.float64 else torch.float32
    for a in range(0, n, step):
        x = flat[:, a : a + step].to(device)
        if transform is not None:
            x = transform(key, x.to(cdt), a)
        yield a, x.abs()


def global_topk_thresholds(
    iter_all: IterAll,
    num_tasks: int,
    frac: float,
    *,
    transform: Transform | None = None,
    device: torch.device | str | None = None,
) -> TopK:
    """Exact per-task K-th largest ``|τ_t|`` over all floating tensors yielded by ``iter_all`` (K = ⌊frac·N⌋).

    Radix select on a 96-bit order-preserving key, 16 bits per streamed pass, from the most significant digit: a
    pass histograms the next digit of the entries still matching the chosen prefix, then picks the bin that holds
    the K-th largest. bf16 models need 1 pass, fp16/fp32 models 2, a model with float64 tensors 6. ``transform``
    (DARE) is applied to each chunk with its flat start index before ``abs``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    T = num_tasks
    offsets = (torch.arange(T, device=dev, dtype=torch.int64) * _BINS)[:, None]
    prefix = [[0] * (_LAST_PASS + 1) for _ in range(T)]
    need = [0] * T  # rank of the wanted entry among the current candidates, from the top
    above = [0] * T  # entries known to be strictly above the wanted one
    thresholds: list[float | None] = [None] * T
    kept = [0] * T
    total = 0
    k_keep = 0
    dtypes: set[torch.dtype] = set()
    p = 0
    for p in range(_LAST_PASS + 1):
        active = [t for t in range(T) if thresholds[t] is None]
        if not active:
            p -= 1
            break
        pre = torch.tensor([prefix[t][:p] for t in range(T)], dtype=torch.int64, device=dev).reshape(T, p)
        hist = torch.zeros(T * _BINS, dtype=torch.int64, device=dev)
        count = 0
        for key, taus in iter_all():
            if not taus.is_floating_point():
                continue
            for _, x in _chunks(key, taus, T, dev, transform):
                if p == 0:
                    if not bool(torch.isfinite(x).all()):
                        raise NumericError(f"{key}: task vectors contain NaN/Inf; check the expert checkpoints")
                    dtypes.add(x.dtype)
                    count += x.shape[1]
                cand = None
                for j in range(p):
                    m = _digit(x, j) == pre[:, j : j + 1]
                    cand = m if cand is None else cand & m
                idx = _digit(x, p) + offsets
                if cand is not None:
                    idx = idx[cand]
                idx = idx.reshape(-1)
                if idx.numel() >= hist.numel():
                    hist += torch.bincount(idx, minlength=hist.numel())
                else:  # small chunk: O(n) scatter instead of an O(bins) bincount
                    hist.index_put_((idx,), torch.ones_like(idx), accumulate=True)
        h_all = hist.view(T, _BINS).cpu().numpy()
        if p == 0:
            total = count
            k_keep = int(frac * total)
            for t in range(T):
                if k_keep == 0:
                    thresholds[t], kept[t] = float("inf"), 0
                need[t] = k_keep
            if k_keep == 0:
                break
        for t in active:
            h = h_all[t]
            below = np.cumsum(h) - h  # below[b] = candidates with digit < b
            cand_total = int(below[-1] + h[-1])
            # the largest bin b with (candidates with digit >= b) = cand_total - below[b] >= need
            b = int(np.searchsorted(below, cand_total - need[t], side="right")) - 1
            strictly_above = cand_total - int(below[b]) - int(h[b])
            need[t] -= strictly_above
            above[t] += strictly_above
            prefix[t][p] = b
            if _fixed_after(p, dtypes):
                thresholds[t] = _value(prefix[t], p)
                kept[t] = above[t] + int(h[b])
    return TopK(
        total=total,
        k_keep=k_keep,
        thresholds=[float(v) for v in thresholds],  # type: ignore[arg-type]
        kept=kept,
        passes=p + 1,
    )


def keep_mask(x_abs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``|τ| >= θ`` decided exactly for any dtype (θ is a float64 value; a float32 comparison uses the smallest
    float32 >= θ, which gives the same answer for every float32-representable |τ|)."""
    if x_abs.dtype == torch.float64:
        return x_abs >= threshold
    t64 = torch.tensor(threshold, dtype=torch.float64)
    t32 = t64.to(torch.float32)
    if t32.to(torch.float64) < t64:
        t32 = torch.nextafter(t32, torch.tensor(float("inf"), dtype=torch.float32))
    return x_abs.to(torch.float32) >= t32.to(x_abs.device)


def trim(taus: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Zero the entries of each ``τ_t`` below its global threshold."""
    if len(thresholds) != taus.shape[0]:
        raise InputError(f"TIES state has {len(thresholds)} thresholds for {taus.shape[0]} task vectors; rerun prepare")
    out = torch.empty_like(taus)
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    for t, thr in enumerate(thresholds):
        out[t] = torch.where(keep_mask(taus[t].abs(), thr), taus[t], zero)
    return out


def elect(trimmed: torch.Tensor, zero_sign: str, majority: float) -> torch.Tensor:
    """Elected sign per entry: sign of the summed kept values, zero sums resolved by ``zero_sign``."""
    sign = torch.sign(trimmed.sum(dim=0))
    if zero_sign == "majority":
        sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
    elif zero_sign == "positive":
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return sign


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean of the kept non-zero values that agree with the elected sign (0 where none agree)."""
    agree = ((sign > 0) & (trimmed > 0)) | ((sign < 0) & (trimmed < 0))
    num = torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype, device=trimmed.device)).sum(dim=0)
    cnt = agree.sum(dim=0).clamp_min(1)
    return num / cnt.to(trimmed.dtype)


def ties_merge(taus: torch.Tensor, state: TopK, lam: float, zero_sign: str) -> torch.Tensor:
    """λ · disjoint_mean(trim(τ)) with the elected signs: the TIES delta of one tensor (any shape [T, ...])."""
    trimmed = trim(taus, state.thresholds)
    return lam * disjoint_mean(trimmed, elect(trimmed, zero_sign, state.majority))


def majority_sign(
    iter_all: IterAll,
    num_tasks: int,
    state: TopK,
    *,
    transform: Transform | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Sign of the model-wide sum of elected signs (zero sums counting 0), the reference's tie-breaker:
    +1 when positive, else -1 (its ``where(sign > 0, ...)`` treats a 0 majority as negative)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    acc = 0
    for key, taus in iter_all():
        if not taus.is_floating_point():
            continue
        flat = taus.reshape(num_tasks, -1)
        step = max(1, _CHUNK // num_tasks)
        cdt = torch.float64 if taus.dtype == torch.float64 else torch.float32
        for a in range(0, flat.shape[1], step):
            x = flat[:, a : a + step].to(device=dev, dtype=cdt)
            if transform is not None:
                x = transform(key, x, a)
            acc += int(torch.sign(trim(x, state.thresholds).sum(dim=0)).sum().item())
    return 1.0 if acc > 0 else -1.0


def ties_prepare(
    iter_all: IterAll,
    num_tasks: int,
    k: float,
    zero_sign: str,
    *,
    transform: Transform | None = None,
    device: torch.device | str | None = None,
) -> TopK:
    state = global_topk_thresholds(iter_all, num_tasks, k, transform=transform, device=device)
    if zero_sign == "majority":
        state.majority = majority_sign(iter_all, num_tasks, state, transform=transform, device=device)
        state.passes += 1
    return state


@dataclass
class TiesOptions:
    k: float = opt(0.2, "fraction of each task vector's entries kept (top |tau| over the whole model)")
    lam: float = opt(1.0, "scale λ of the disjoint mean")
    zero_sign: str = opt(
        "majority",
        "sign for entries whose kept values sum to 0: majority (reference, one more pass), positive, none",
        choices=("majority", "positive", "none"),
    )


def check_state(name: str, state: Any, num_tasks: int) -> TopK:
    """The prepass state as a TopK; ``prepare`` returns it as a plain dict (JSON-able, e.g. kept in a manifest)."""
    if isinstance(state, dict):
        try:
            state = TopK(**state)
        except TypeError:
            raise InputError(f"anchor {name}: the saved prepass state is not a TIES state; "
                             "rerun with --force") from None
    if not isinstance(state, TopK):
        raise InputError(f"anchor {name} needs its global prepass: call prepare() and pass its state")
    if len(state.thresholds) != num_tasks:
        raise InputError(
            f"anchor {name}: prepass state has {len(state.thresholds)} tasks, tensors have {num_tasks}; rerun prepare"
        )
    return state


def apply_transform(transform: Transform | None, key: str, taus: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """``transform`` applied to a whole stack ``taus [T, ...]``, ``chunk`` entries per task at a time (as the prepass
    streams them: a transform is a function of the flat index, so the chunking does not change the result)."""
    if transform is None:
        return taus
    flat = taus.reshape(taus.shape[0], -1)
    out = torch.empty_like(flat)
    for a in range(0, flat.shape[1], chunk):
        out[:, a : a + chunk] = transform(key, flat[:, a : a + chunk], a)
    return out.reshape(taus.shape)


class Ties(AnchorMethod):
    """TIES. A subclass that first transforms the task vectors (DARE's drop, :class:`~.dare.DareTies`) overrides
    :meth:`transform` only: the prepass thresholds and the merge then both see the transformed vectors."""

    name = "ties"
    summary = "TIES: global top-k trim per task, sign election, disjoint mean, times lam"
    Options = TiesOptions
    needs_global_pass = True

    def validate_options(self, opts: TiesOptions) -> None:
        check_range(self.name, "k", opts.k, 0.0, 1.0, False, False)
        check_lam(self.name, opts.lam)

    def transform(self, opts: Any) -> Transform | None:
        """What is applied to every task vector before TIES (None: nothing)."""
        return None

    def prepare(
        self, opts: Any, iter_all: IterAll, num_tasks: int, device: torch.device | str | None = None
    ) -> dict[str, Any]:
        """The per-task thresholds (and majority sign) of the (transformed) task vectors, as a JSON-able dict of
        :class:`TopK`'s fields."""
        opts = self._opts(opts)
        state = ties_prepare(iter_all, num_tasks, opts.k, opts.zero_sign, transform=self.transform(opts),
                             device=device)
        return dataclasses.asdict(state)

    def _module(self, inp: ModuleInput, opts: TiesOptions, state: Any, device: torch.device) -> torch.Tensor:
        st = check_state(self.name, state, inp.num_tasks)
        return ties_merge(apply_transform(self.transform(opts), inp.key, inp.taus), st, opts.lam, opts.zero_sign)

    def _other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: TiesOptions, state: Any) -> torch.Tensor:
        st = check_state(self.name, state, taus.shape[0])
        return base + ties_merge(apply_transform(self.transform(opts), key, taus), st, opts.lam, opts.zero_sign)

"""Ensemble predictions and their calibration: mean of softmax over samples, accuracy, ECE, NLL; β grids.

For users' own evaluation hooks (``bench/ensemble_hook.py`` uses them on the MiniLM benchmark):

    probs = ensemble_probs([logits_of_sample_0, logits_of_sample_1, ...])   # [N, K], mean of softmax
    metrics(probs, labels)  # {"acc", "ece", "nll", "n"}

ECE (paper App. B): 20 equal-width confidence bins on [0, 1], confidence = the top probability, bin b holds
confidences in ``(b/20, (b+1)/20]`` (a confidence of exactly 0 goes to the first bin);
``ECE = Σ_b (n_b/N)·|acc_b − conf_b|``. NLL is the mean of ``−log p(label)`` (probabilities floored at 1e-12).
Everything is computed in fp64.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import InputError

ECE_BINS = 20
_FLOOR = 1e-12


def ensemble_probs(logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``softmax(logits)``: ``[S, N, K]`` (or a list of S ``[N, K]``) -> ``[N, K]`` fp64."""
    x = torch.stack([torch.as_tensor(t) for t in logits]) if not isinstance(logits, torch.Tensor) else logits
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] == 0:
        raise InputError(f"ensemble_probs: expected logits [S, N, K], got shape {tuple(x.shape)}")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise InputError("ensemble_probs: logits have NaN/Inf")
    return torch.softmax(x, dim=-1).mean(0)


def _check(probs: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(probs).double()
    y = torch.as_tensor(labels, dtype=torch.long)
    if p.dim() != 2 or y.dim() != 1 or p.shape[0] != y.shape[0]:
        raise InputError(f"probabilities {tuple(p.shape)} and labels {tuple(y.shape)} do not match ([N, K] and [N])")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= p.shape[1]):
        raise InputError(f"labels must lie in [0, {p.shape[1] - 1}]")
    return p, y


def bin_index(conf: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Bin of each confidence: ``(b/bins, (b+1)/bins]`` -> b; 0 -> 0."""
    return (torch.ceil(conf.double() * bins).long() - 1).clamp(0, bins - 1)


def ece(probs: torch.Tensor, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins."""
    p, y = _check(probs, labels)
    if y.numel() == 0:
        return float("nan")
    conf, pred = p.max(-1)
    correct = (pred == y).double()
    b = bin_index(conf, bins)
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, correct)
    cf = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, conf)
    return float((acc - cf).abs().sum() / y.numel())


def row_nll(probs: torch.Tensor, labels) -> torch.Tensor:
    """``−log p(label)`` per row (fp64)."""
    p, y = _check(probs, labels)
    return -p.gather(1, y[:, None]).squeeze(1).clamp_min(_FLOOR).log()


def row_correct(probs: torch.Tensor, labels) -> torch.Tensor:
    p, y = _check(probs, labels)
    return (p.argmax(-1) == y).double()


def metrics(probs: torch.Tensor, labels, bins: int = ECE_BINS) -> dict:
    """``{"acc", "ece", "nll", "n"}`` of one set of predictions."""
    p, y = _check(probs, labels)
    return {"acc": float(row_correct(p, y).mean()), "ece": ece(p, y, bins), "nll": float(row_nll(p, y).mean()),
            "n": int(y.numel())}


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of ``mean(a − b)`` for per-row values of two methods on the same rows."""
    d = torch.as_tensor(a).double() - torch.as_tensor(b).double()
    return float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")


def paired_bootstrap_ece(pa: torch.Tensor, pb: torch.Tensor, labels, *, reps: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of ``ECE(a) − ECE(b)`` (ECE is not a mean of rows: resample rows, both alike)."""
    pa, y = _check(pa, labels)
    pb, _ = _check(pb, labels)
    g = torch.Generator().manual_seed(seed)
    diffs = torch.empty(reps, dtype=torch.float64)
    for r in range(reps):
        idx = torch.randint(0, y.numel(), (y.numel(),), generator=g)
        diffs[r] = ece(pa[idx], y[idx]) - ece(pb[idx], y[idx])
    return float(diffs.std(unbiased=True))


# ----------------------------------------------------------------------------------------------------------------
# β grids (bmm sample --search-beta)


def log_grid(spec: str, points: int) -> list[float]:
    """``"LOW:HIGH"`` -> ``points`` log-spaced values (both ends included); ``"X"`` -> ``[X]``."""
    try:
        parts = [float(v) for v in spec.split(":")]
    except ValueError:
        raise InputError(f"--search-beta {spec!r}: expected LOW:HIGH (positive numbers), e.g. 10:1e5") from None
    if len(parts) not in (1, 2) or not all(v > 0 and math.isfinite(v) for v in parts):
        raise InputError(f"--search-beta {spec!r}: expected LOW:HIGH with 0 < LOW <= HIGH, finite")
    if len(parts) == 1 or parts[0] == parts[1]:
        return [parts[0]]
    lo, hi = parts
    if lo > hi:
        raise InputError(f"--search-beta {spec!r}: LOW must not exceed HIGH")
    if points < 2:
        raise InputError(f"--grid {points}: a range needs at least 2 points")
    step = (math.log(hi) - math.log(lo)) / (points - 1)
    inner = [float(f"{math.exp(math.log(lo) + i * step):.12g}") for i in range(1, points - 1)]  # 30.0, not 29.99…
    return [lo, *inner, hi]


def pick_best(scores: Sequence[tuple[float, float | None]], *, minimize: bool) -> tuple[float, float]:
    """``(β, score)`` of the best scored grid point; ties go to the larger β (less noise, closer to the MAP).

    ``scores``: ``(β, score or None for a failed evaluation)``. Raises when every evaluation failed.
    """
    ok = [(b, s) for b, s in scores if s is not None and math.isfinite(s)]
    if not ok:
        raise InputError("every β evaluation failed; see the hook's errors above")
    sign = 1.0 if minimize else -1.0
    return min(ok, key=lambda bs: (sign * bs[1], -bs[0]))


__all__ = ["ECE_BINS", "ensemble_probs", "ece", "bin_index", "row_nll", "row_correct", "metrics", "paired_se",
           "paired_bootstrap_ece", "log_grid", "pick_best"]

"""Time each stage of a merge will take on this device, from the module shapes and a one-second calibration.

``bmm plan`` prints it beside the disk (:mod:`bmm_cli.budget`). The model counts the dominant operations of each
stage per solvable module (``[d_out, d_in]`` = ``o × i``, T experts) and divides by rates measured here, on the
device and thread count the merge will use (:func:`calibrate`: one fp64 GEMM, one fp64 ``eigh``, one fp32 SVD and
one pass over a large fp32 array, at a size where each takes tens of milliseconds):

* ``taskvec``: reading base and experts (``(T + 1)·o·i`` elements in the checkpoints' dtype) at :data:`READ_RATE`;
* ``anchor``: TSV / ISO-CTS one SVD per expert and module plus the orthogonalisation (``T + 2`` SVDs of ``o × i``),
  ISO-C one, RegMean an ``i × i`` solve; the elementwise anchors (TA, TIES, DARE...) a few passes over the task
  vectors; WUDI is an iterative optimisation this model does not cover (no estimate);
* ``evidence``: one ``eigh`` of the smaller side ``min(T·o, i)`` and its GEMMs (:func:`bmm_cli.evidence.
  free_spectra`), in fp32 from ``n ≥`` :data:`~bmm_cli.evidence.FP32_MIN_SIDE`, counted at :data:`FP32_SPEEDUP` ×
  the fp64 rates;
* ``solve``: the fp64 data-free statistics ``G = Σ U_tᵀU_t``, ``B = Σ U_tU_tᵀU_t`` (``2·o·i² + 4·o·i·min(o, i)``
  per expert; no stage stores them), a Cholesky of ``i × i`` and two triangular solves with ``o`` right sides;
* ``factors`` (a search's cache): one ``eigh`` of ``i × i`` and the ``B̂Q``, ``U0Q`` GEMMs.

Large LAPACK calls run slower per flop than the calibration's (memory traffic), so the estimate is a rough one
(about ±2× against bench/results/shapes_8b*.md): it tells minutes from hours from days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from .budget import Module, plan_modules
from .evidence import FP32_MIN_SIDE

# fp64 → fp32 speed-up of free_spectra's eigh and GEMMs (bench/results/shapes_8b_evidence_fp32_cpu.md: 2.0-2.3x)
FP32_SPEEDUP = 2.0
READ_RATE = 5e8  # bytes/s read from the checkpoints: a conservative local disk (page-cached inputs read faster)
_N = 768  # calibration size
# elementwise passes over the task vectors, fitted to the anchors measured in bench/results/quality.json (MiniLM)
_ELEMENTWISE_PASSES = {"ta": 6, "pretrained": 0, "external": 6, "dare": 250, "ties": 80, "dare-ties": 330}


@dataclass(frozen=True)
class Rates:
    """Measured speeds: flop/s of an fp64 GEMM; ``n³``/s of an fp64 ``eigh`` and ``m·n²``/s of an fp32 thin SVD;
    elements/s of an elementwise fp32 pass."""

    gemm64: float
    eigh64: float
    svd32: float
    elementwise: float
    device: str
    threads: int


def _best(fn, sync, reps: int = 3) -> float:
    out = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out = min(out, time.perf_counter() - t0)
    return max(out, 1e-6)


@lru_cache(maxsize=4)
def calibrate(device: str = "cpu") -> Rates:
    """Time the four operations on ``device`` (about a second on a CPU, once per process)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_N, _N, generator=g, dtype=torch.float64).to(dev)
    s = a @ a.mT
    w = torch.randn(2 * _N, _N, generator=g, dtype=torch.float32).to(dev)
    v = torch.randn(1 << 22, generator=g).to(dev)
    t_gemm = _best(lambda: a @ a, sync)
    t_eigh = _best(lambda: torch.linalg.eigh(s), sync)
    t_svd = _best(lambda: torch.linalg.svd(w, full_matrices=False), sync)
    t_pass = _best(lambda: torch.add(v, v, alpha=0.5), sync)
    return Rates(gemm64=2 * _N**3 / t_gemm, eigh64=_N**3 / t_eigh, svd32=2 * _N * _N**2 / t_svd,
                 elementwise=v.numel() / t_pass, device=str(dev), threads=torch.get_num_threads())


def _svd(r: Rates, o: int, i: int) -> float:
    return max(o, i) * min(o, i) ** 2 / r.svd32


def _stats(r: Rates, o: int, i: int, T: int) -> float:
    return T * (2 * o * i * i + 4 * o * i * min(o, i)) / r.gemm64


def _anchor(r: Rates, name: str, o: int, i: int, T: int) -> float | None:
    if name in ("tsv", "iso-cts"):
        return (T + 2 + (name == "iso-cts")) * _svd(r, o, i)
    if name == "iso-c":
        return _svd(r, o, i) + T * o * i / r.elementwise
    if name == "regmean":
        return (i**3 / 3 + 2 * T * o * i * i) / r.gemm64
    passes = _ELEMENTWISE_PASSES.get(name)
    return None if passes is None else passes * T * o * i / r.elementwise


def _evidence(r: Rates, o: int, i: int, T: int) -> float:
    n = min(T * o, i)
    if T * o < i:
        gemm = 2 * (T * o) ** 2 * i + T * 2 * o * o * i + 2 * o * (T * o) ** 2
    else:
        gemm = T * 4 * o * i * i + 2 * o * i * i
    fp32 = FP32_SPEEDUP if n >= FP32_MIN_SIDE else 1.0  # free_spectra's precision="auto"
    return (n**3 / r.eigh64 + gemm / r.gemm64) / fp32


def _solve(r: Rates, o: int, i: int, T: int) -> float:
    return _stats(r, o, i, T) + (i**3 / 3 + 2 * o * i * i) / r.gemm64


def _factors(r: Rates, o: int, i: int, T: int) -> float:
    return _stats(r, o, i, T) + i**3 / r.eigh64 + 4 * o * i * i / r.gemm64


def estimate(modules: Sequence[Module], num_tasks: int, *, anchor: str, gram: str = "free", evidence: bool = True,
             search: bool = False, input_bytes: int = 0, rates: Rates | None = None) -> dict[str, float | None]:
    """Seconds per stage of a merge of ``modules`` (None: no estimate for that anchor). ``input_bytes``: the
    bytes ``taskvec`` reads (base and experts' solvable tensors); ``gram``: the statistics of the solve (the data
    Grams' forward passes over calibration text, for ``data``/``hybrid``, are not modelled)."""
    r = rates or calibrate("cpu")
    T = num_tasks
    out: dict[str, float | None] = {"taskvec": input_bytes / READ_RATE}
    parts = [_anchor(r, anchor, m.d_out, m.d_in, T) for m in modules]
    out[f"anchor-{anchor}"] = None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]
    if evidence:
        out["evidence"] = sum(_evidence(r, m.d_out, m.d_in, T) for m in modules)
    out["solve"] = sum(_solve(r, m.d_out, m.d_in, T) for m in modules)
    if search:
        out[f"factors-{anchor}-{gram}"] = sum(_factors(r, m.d_out, m.d_in, T) for m in modules)
    return out


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "no estimate"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def for_merge(plan, meta, num_tasks: int, *, anchor: str, gram: str, input_bytes: int, search: bool = False,
              device: str = "cpu") -> dict:
    """What ``bmm plan`` reports: seconds per stage of ``bmm merge`` (and of a search's cache) on ``device``, with
    the measured rates (JSON-ready). ``input_bytes``: what one pass over the solvable modules reads
    (:func:`bmm_cli.plan.read_bytes`)."""
    mods, _, _ = plan_modules(plan, meta)
    r = calibrate(device)
    secs = estimate(mods, num_tasks, anchor=anchor, gram=gram, search=search, input_bytes=input_bytes, rates=r)
    merge_s = [v for k, v in secs.items() if not k.startswith("factors-")]
    total = None if any(v is None for v in merge_s) else sum(merge_s)  # type: ignore[arg-type]
    return {"seconds": secs, "merge_total": total, "device": r.device, "threads": r.threads, "read_bytes": input_bytes,
            "rates": {"gemm64_flops": r.gemm64, "eigh64_n3_per_s": r.eigh64, "svd32_mn2_per_s": r.svd32,
                      "elementwise_per_s": r.elementwise}}


def lines(t: dict, width: int = 10) -> list[str]:
    """``stage  time`` lines for ``bmm plan`` (the merge's total before a search's cache)."""
    secs = t["seconds"]
    w = max([len(k) for k in secs] + [width])
    search = "  (only with bmm search / merge --eval)"
    rows = [f"{k:<{w}}  {fmt_seconds(v):>11}" + (search if k.startswith("factors-") else "") for k, v in secs.items()]
    at = sum(not k.startswith("factors-") for k in secs)
    rows.insert(at, f"{'merge total':<{w}}  {fmt_seconds(t['merge_total']):>11}")
    return rows

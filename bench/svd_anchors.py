"""SVD anchors on CPU: bmm's TSV / ISO-C / ISO-CTS per block vs the exact-SVD path, at SmolLM2-135M shapes.

One block = the 7 linear modules of SmolLM2-135M (q 576x576, k/v 192x576, o 576x576, gate/up 1536x576, down
576x1536), T = 4 task vectors each (gaussian, scale 0.01). The baseline is the exact path every method used before
(full fp32 SVDs in the given orientation, as the reference implementations): the transcriptions in
tests/anchors/test_{tsv,iso}.py. Timings are interleaved (baseline, bmm, baseline, bmm, ...) on one thread; the
accuracy is the relative Frobenius error of each merge against the same formula in float64.

    OMP_NUM_THREADS=1 python3 bench/svd_anchors.py --reps 3 --out bench/results/svd_anchors_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from anchors.test_iso import _reference_iso_cts  # noqa: E402
from anchors.test_tsv import _reference_tsv  # noqa: E402

from bmm_cli.anchors.iso import iso_c_merge, iso_cts_merge  # noqa: E402
from bmm_cli.anchors.tsv import tsv_merge  # noqa: E402

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def _ref_iso_c(taus):
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    return s.mean() * u @ vh


METHODS = {
    "tsv": (tsv_merge, _reference_tsv),
    "iso-c": (iso_c_merge, _ref_iso_c),
    "iso-cts": (iso_cts_merge, lambda t: _reference_iso_cts(t)[0]),
}


def _block(seed: int, T: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (0.01 * torch.randn(T, *s, generator=g, dtype=torch.float64)).float() for k, s in SHAPES.items()}


def _time_block(fn, block) -> float:
    t = time.perf_counter()
    for taus in block.values():
        fn(taus)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/svd_anchors_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    block = _block(0, args.tasks)
    res = {"shapes": SHAPES, "tasks": args.tasks, "reps": args.reps, "threads": 1, "torch": torch.__version__,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, shared with other jobs (load avg at start "
                      f"{os.getloadavg()[0]:.1f}); timings interleaved, medians", "methods": {}}
    for name, (fast, exact) in METHODS.items():
        t_exact, t_fast = [], []
        for _ in range(args.reps):
            t_exact.append(_time_block(exact, block))
            t_fast.append(_time_block(fast, block))
        errs, errs_ref32 = {}, {}
        for k, taus in block.items():
            want = exact(taus.double())
            errs[k] = float((fast(taus).double() - want).norm() / want.norm())
            errs_ref32[k] = float((exact(taus).double() - want).norm() / want.norm())
        res["methods"][name] = {
            "exact_s_per_block": [round(x, 3) for x in t_exact], "bmm_s_per_block": [round(x, 3) for x in t_fast],
            "median_exact_s": round(statistics.median(t_exact), 3), "median_bmm_s": round(statistics.median(t_fast), 3),
            "speedup": round(statistics.median(t_exact) / statistics.median(t_fast), 2),
            "rel_err_vs_fp64": errs, "rel_err_exact_fp32_vs_fp64": errs_ref32,
        }
        print(name, json.dumps(res["methods"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

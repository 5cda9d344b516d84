"""The SVD anchors (TSV, ISO-C, ISO-CTS) at Llama-3.1-8B block shapes on this CPU, projected to 32 layers.

One module of each shape class of a Llama-3.1-8B block (q/o 4096², k/v 1024 × 4096, gate/up 14336 × 4096, down
4096 × 14336), ``T`` synthetic task vectors each, drawn as ``bench/shapes_8b.py`` draws them (rank 16 plus 30 %
dense noise, so every task vector has full rank and the SVDs do their full work). Each method runs the library's
own per-module function (``tsv_merge``, ``iso_c_merge``, ``iso_cts_merge``: what ``bmm anchor`` runs per module)
on one thread; the time is the thread's CPU time, which a shared machine's load changes much less than the wall
time (both are recorded). A layer is q + o + k + v + gate + up + down; 32 layers are 32 × that. The counts of the
Rayleigh-Ritz shortcut taken or refused (``bmm_cli.anchors._spectral``) say which route the SVDs took.

    OMP_NUM_THREADS=1 nice -n 10 python3 bench/anchors_8b.py --tasks 3 --json bench/results/anchors_8b_cpu.json \
        --md bench/results/anchors_8b_cpu.md
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shapes_8b import FULL_LAYERS, _delta, block_shapes  # noqa: E402

from bmm_cli.anchors import _spectral  # noqa: E402
from bmm_cli.anchors.iso import iso_c_merge, iso_cts_merge  # noqa: E402
from bmm_cli.anchors.tsv import tsv_merge  # noqa: E402

METHODS = {"tsv": tsv_merge, "iso-c": iso_c_merge, "iso-cts": iso_cts_merge}
# one measured module per shape class, and how many modules of a layer share it
CLASSES = {"q_proj": ("self_attn.q_proj", 2), "k_proj": ("self_attn.k_proj", 2), "gate_proj": ("mlp.gate_proj", 2),
           "down_proj": ("mlp.down_proj", 1)}


class RitzCount:
    """Counts the Rayleigh-Ritz shortcut's outcomes by wrapping ``_spectral._ritz`` (None: refused, exact SVD)."""

    def __init__(self) -> None:
        self.taken = self.refused = 0
        self.refused_cpu_s = 0.0  # the Gram and eigh spent on refused tries (the exact SVD follows them)
        self._orig = _spectral._ritz

    def __enter__(self) -> RitzCount:
        def counted(m, k):
            c0 = time.thread_time()
            got = self._orig(m, k)
            if got is None:
                self.refused += 1
                self.refused_cpu_s += time.thread_time() - c0
            else:
                self.taken += 1
            return got

        _spectral._ritz = counted
        return self

    def __exit__(self, *exc) -> None:
        _spectral._ritz = self._orig


def task_vectors(shape: tuple[int, int], tasks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([_delta(shape, g, 1e-3, 0.02) for _ in range(tasks)])


def measure(methods: list[str], classes: list[str], tasks: int, scale: int = 1) -> list[dict]:
    shapes = {k: (a // scale, b // scale) for k, (a, b) in block_shapes().items()}
    rows = []
    for i, cls in enumerate(classes):
        name, count = CLASSES[cls]
        taus = task_vectors(shapes[name], tasks, seed=i)
        for m in methods:
            load = os.getloadavg()[0]
            with RitzCount() as rc:
                c0, w0 = time.thread_time(), time.perf_counter()
                out = METHODS[m](taus)
                cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
            assert torch.isfinite(out).all()
            rows.append({"method": m, "module": name, "shape": list(shapes[name]), "per_layer": count,
                         "tasks": tasks, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                         "ritz_taken": rc.taken, "ritz_refused": rc.refused,
                         "ritz_refused_cpu_s": round(rc.refused_cpu_s, 2), "load": round(load, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del taus
    return rows


def projection(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        layer = sum(r["cpu_s"] * r["per_layer"] for r in mine)
        wasted = sum(r["ritz_refused_cpu_s"] * r["per_layer"] for r in mine)
        out[m] = {"cpu_s_per_layer": round(layer, 1), "ritz_refused_cpu_s_per_layer": round(wasted, 1),
                  "cpu_h_32_layers": round(layer * FULL_LAYERS / 3600, 2),
                  "complete": len(mine) == len(CLASSES)}
    return out


def table(res: dict) -> str:
    classes = list(dict.fromkeys(r["module"].split(".")[-1] for r in res["rows"]))
    scaled = f", dimensions / {res['scale']}" if res.get("scale", 1) != 1 else ""
    lines = [f"# SVD anchors at Llama-3.1-8B block shapes (cpu, one thread, T = {res['tasks']}{scaled})", "",
             "Synthetic task vectors (bench/shapes_8b.py: rank 16 + 30 % dense noise, full rank), one module per "
             "shape class, the library's per-module merge; CPU seconds of the thread (wall seconds and the 1-min "
             f"load average in the JSON). {res['machine']}.", "",
             "| method | " + " | ".join(classes) + " | per layer | 32 layers | Ritz taken / refused | refused tries |",
             "|---|" + "---:|" * (len(classes) + 4)]
    for m, p in res["projection"].items():
        mine = {r["module"].split(".")[-1]: r for r in res["rows"] if r["method"] == m}
        cells = [f"{mine[c]['cpu_s']:.1f}" if c in mine else "" for c in classes]
        ritz = f"{sum(r['ritz_taken'] for r in mine.values())} / {sum(r['ritz_refused'] for r in mine.values())}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {p['cpu_s_per_layer']:.0f} s | "
                     f"{p['cpu_h_32_layers']:.2f} h | {ritz} | {p['ritz_refused_cpu_s_per_layer']:.0f} s |")
    lines += ["", "A layer counts q and o, k and v, gate and up twice, down once (CPU s on one thread). Refused tries: "
              "the CPU seconds per layer of Rayleigh-Ritz tries whose guard failed (an exact SVD ran after each)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--methods", default="tsv,iso-c,iso-cts")
    ap.add_argument("--modules", default=",".join(CLASSES), help="shape classes: " + ",".join(CLASSES))
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (a quick check)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    methods, classes = args.methods.split(","), args.modules.split(",")
    for x in methods:
        if x not in METHODS:
            ap.error(f"--methods: unknown {x!r} (use {', '.join(METHODS)})")
    for x in classes:
        if x not in CLASSES:
            ap.error(f"--modules: unknown {x!r} (use {', '.join(CLASSES)})")
    torch.set_num_threads(1)
    rows = measure(methods, classes, args.tasks, args.scale)
    res = {"tasks": args.tasks, "scale": args.scale, "threads": 1, "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows, "projection": projection(rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The data-free evidence λ of one Llama-3.1-8B block, per module shape: the fp64 route through Ĝ against
:func:`bmm_cli.evidence.free_spectra` (the smaller side's eigh, straight from the task vectors).

Each (shape, route) runs in its own subprocess on one thread and reports CPU seconds (``time.process_time``: the
work itself, whatever else runs on the machine), wall seconds, peak RSS and λ. Task vectors are synthetic like
bench/shapes_8b.py's (rank 16 + 30 % dense noise, so Ĝ has full rank where ``T·d_out ≥ d_in``); the anchor is their
mean (TA).

* ``fp64`` (the route through Ĝ): ``free_stats`` (Ĝ, B̂ in fp64), ``residual_energy``, ``torch.linalg.eigh`` of
  the ``[d_in, d_in]`` Ĝ, ``B̂Q`` and ``U0Q``, then the maximisation;
* ``free_spectra_fp64``: :func:`~bmm_cli.evidence.free_spectra` with ``precision="float64"``;
* ``free_spectra``: what ``bmm solve``'s default λ runs (``precision="auto"``: fp32 from
  :data:`~bmm_cli.evidence.FP32_MIN_SIDE` up, so at every 8B shape).

Per layer: q and o share a shape, k and v, gate and up; down is alone. ``--scale k`` divides every dimension by k
(costs ∝ n³: ×k³ back); the 32-layer hours are per-layer CPU seconds × 32 / 3600.

    nice -n 10 python bench/shapes_8b_evidence.py --scale 2 --routes fp64,free_spectra_fp64,free_spectra \
        --json bench/results/...json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_8b import REPO, block_shapes, wait4_run  # noqa: E402

PER_LAYER = {"self_attn.q_proj": 2, "self_attn.k_proj": 2, "mlp.gate_proj": 2, "mlp.down_proj": 1}

PY = """
import json, sys, time, torch
torch.set_num_threads(1)
from bmm_cli import evidence as ev
from bmm_cli.closed_form import free_stats
d_out, d_in, T, route = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(d_out * 7 + d_in)
r = 16
taus = torch.empty(T, d_out, d_in)
for t in range(T):
    lo = torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g) / r ** 0.5
    taus[t] = lo * 0.7 ** 0.5 + 0.3 ** 0.5 * torch.randn(d_out, d_in, generator=g)
    del lo
u0 = taus.mean(0)
n = float(T * d_out)
precisions = []  # free_spectra's calls (a second one: the fp64 fallback)
t0, c0 = time.perf_counter(), time.process_time()
if route == "fp64":
    t64 = taus.double()
    st = free_stats(t64)
    S = ev.residual_energy(t64, None, u0.double(), st.m)
    sp = ev.spectrum(st.G_hat, st.B_hat, u0.double(), S, n)
    t1, c1 = time.perf_counter(), time.process_time()
    lam = ev.evidence_lam(sp)
else:  # free_lams (the default: precision auto, fp32 at these sizes, with its fp64 fallback) or free_spectra_fp64
    prec = "float64" if route.endswith("_fp64") else "auto"
    _orig = ev.free_spectra
    ev.free_spectra = lambda *a, **k: precisions.append(k["precision"]) or _orig(*a, **k)
    t1, c1 = time.perf_counter(), time.process_time()
    lam = ev.free_lams(taus, [u0], n, precision=prec)[0]
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"d_out": d_out, "d_in": d_in, "T": T, "route": route, "cpu_s": c2 - c0, "wall_s": t2 - t0,
                  "spectrum_cpu_s": c1 - c0, "lam": lam, "precisions": precisions, "threads": torch.get_num_threads()}))
"""


def run(shapes: dict, T: int, routes: list[str], scale: int, env: dict) -> list[dict]:
    rows = []
    for name, (d_out, d_in) in shapes.items():
        for route in routes:
            a, b = d_out // scale, d_in // scale
            print(f"[evidence] {name} [{a}, {b}] T={T} {route} ...", file=sys.stderr, flush=True)
            r = wait4_run([sys.executable, "-c", PY, str(a), str(b), str(T), route], env)
            if r["rc"] != 0:
                raise RuntimeError(f"{name} {route}: {r['stderr'][-800:]}")
            row = json.loads(r["stdout"].strip().splitlines()[-1])
            row.update(module=name, scale=scale, peak_rss=r["peak_rss"], load1_before=r["load1_before"],
                       load1_after=r["load1_after"])
            rows.append(row)
            print(f"[evidence]   {row['cpu_s']:.1f} CPU s, λ {row['lam']:.9g}, peak RSS "
                  f"{row['peak_rss'] / 2**30:.2f} GiB (load {row['load1_before']:.1f})", file=sys.stderr, flush=True)
    return rows


ROUTES = ("fp64", "free_spectra_fp64", "free_spectra")


def table(rows: list[dict], machine: str = "") -> str:
    by = {(r["module"], r["scale"], r["route"]): r for r in rows}  # a later row of the same key wins
    loads = [r["load1_before"] for r in rows]
    routes = [r for r in ROUTES if any(k[2] == r for k in by)]
    lines = ["# Data-free evidence λ per module at Llama-3.1-8B block shapes (cpu, one thread)", "",
             f"{machine}; load average (1 min) while measuring: "
             + (f"{min(loads):.1f}–{max(loads):.1f}" if loads else "n/a")
             + ". T = 3 synthetic task vectors (rank 16 + 30 % noise), TA anchor. CPU seconds of the whole "
             "module: statistics, eigen-decomposition, GEMMs and the λ maximisation. Scale k: every dimension "
             "divided by k. Routes: fp64 (through Ĝ), free_spectra_fp64 (the smaller side's eigh in fp64), "
             "free_spectra (the default: the same in fp32 at these sizes).", "",
             "| module | scale | d_out × d_in | " + " | ".join(f"{r} CPU s" for r in routes)
             + " | " + " | ".join(f"λ {r}" for r in routes) + " | peak RSS GiB (default) | load |",
             "|---|---:|---|" + "---:|" * (2 * len(routes) + 2)]
    for mod, scale in dict.fromkeys((k[0], k[1]) for k in by):
        got = [by.get((mod, scale, r)) for r in routes]
        ref = next(g for g in got if g)
        last = next(g for g in reversed(got) if g)
        lines.append(f"| {mod} | {scale} | {ref['d_out']} × {ref['d_in']} | "
                     + " | ".join(f"{g['cpu_s']:.1f}" if g else "-" for g in got) + " | "
                     + " | ".join(f"{g['lam']:.7g}" if g else "-" for g in got)
                     + f" | {last['peak_rss'] / 2**30:.2f} | {last['load1_before']:.1f} |")
    lines.append("")
    for scale in sorted({r["scale"] for r in rows}):
        for route in routes:
            got = [by.get((m, scale, route)) for m in PER_LAYER]
            if all(got):
                s = sum(w * g["cpu_s"] for w, g in zip(PER_LAYER.values(), got))
                lines.append(f"* scale {scale}, {route}: {s:.0f} CPU s per layer"
                             + (f" (× {scale}³ = {s * scale ** 3:.0f} at 8B shapes)" if scale > 1 else "")
                             + f", {s * scale ** 3 * 32 / 3600:.2f} h at 32 layers")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--routes", default="fp64,free_spectra", help="of " + ", ".join(ROUTES))
    ap.add_argument("--modules", default=",".join(PER_LAYER), help="of " + ", ".join(PER_LAYER))
    ap.add_argument("--json", default=None, help="rows are appended to this file's list when it exists")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shapes = {k: v for k, v in block_shapes().items() if k in args.modules.split(",")}
    old = json.loads(Path(args.json).read_text())["rows"] if args.json and Path(args.json).exists() else []
    rows = old + run(shapes, args.experts, args.routes.split(","), args.scale, env)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    md = table(rows, res["machine"])
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

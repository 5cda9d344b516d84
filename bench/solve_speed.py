"""Speed and memory of the BMM closed-form trial solver on synthetic Llama-3.1-8B-shaped blocks.

Measures, on ``--device auto`` (CUDA when present):

* the one-off cache build per block: data-free Grams, eigh, projections B̂Q and U0Q;
* the per-trial solve of k blocks (k = --blocks), W = W_pre + s·U(λ) returned on CPU in bf16, per block and
  extrapolated to 32 blocks;
* peak GPU memory (torch.cuda.max_memory_allocated) and peak host RSS during the trials, for each k, so the
  memory-flat-in-depth property of the streamed modes is visible;
* the error of fp32 / bf16 cached factors and of fp32 / tf32 / bf16 GEMMs against fp64 factors.

Each (factor dtype, mode, k) runs in its own subprocess so peak-memory numbers do not leak between rows.

    # quick CPU run (all dims x 0.25)
    nice python bench/solve_speed.py --device cpu --scale 0.25 --json bench/results/solve_speed_cpu.json
    # H100 (full Llama-3.1-8B shapes)
    python bench/solve_speed.py --device cuda --json bench/results/solve_speed_h100.json

Modes, one per cache placement of :class:`TrialSolver`: ``resident`` (every block kept on the compute device
while it fits what is free; on CPU that is RAM), ``stream`` (CUDA: ``budget_bytes=0``, the cache in pinned host
memory, copied block by block on a side stream; on CPU the same as resident), ``spill`` (``budget_bytes=0,
host_budget_bytes=0``: one safetensors file per block, read back per trial in a background thread; host and GPU
memory flat in depth). Each row records the plan (where the blocks were placed) and, on CUDA, peak GPU memory
against one block's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bmm_cli.closed_form import (  # noqa: E402
    ModuleFactors,
    apply_factors,
    eig_gram,
    factorize,
    free_stats,
    solve_direct,
)
from bmm_cli.device import resolve_device  # noqa: E402
from bmm_cli.trial_solver import TrialSolver  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
FULL = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
N_LAYERS = 32
TAU_RMS = 6e-4  # task-vector rms; W_pre rms 0.02, so ‖τ‖/‖W_pre‖ ≈ 3% as for typical fine-tunes
W_RMS = 0.02


def block_shapes(scale: float) -> dict[str, tuple[int, int]]:
    """[d_out, d_in] of the 7 linear weights of one Llama-3.1-8B block, all dims times ``scale`` (multiple of 8)."""
    r = lambda n: max(8, int(round(n * scale / 8)) * 8)  # noqa: E731
    h, i = r(FULL["hidden"]), r(FULL["intermediate"])
    kv = r(FULL["kv_heads"] * FULL["head_dim"])
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"


def task_vectors(T: int, d_out: int, d_in: int, dev: torch.device, g: torch.Generator) -> torch.Tensor:
    """Low-rank-ish task vectors: a decaying rank-r part plus 5 % dense noise, rms TAU_RMS."""
    r = max(8, min(d_out, d_in) // 16)
    decay = torch.exp(-torch.arange(r, dtype=torch.float32) / (r / 4)).to(dev)
    out = torch.empty(T, d_out, d_in, device=dev)
    for t in range(T):
        A = torch.randn(d_out, r, generator=g, device=dev)
        B = torch.randn(r, d_in, generator=g, device=dev)
        u = (A * decay) @ B
        u = u / u.pow(2).mean().sqrt()
        u += 0.05 * torch.randn(d_out, d_in, generator=g, device=dev)
        out[t] = u * (TAU_RMS / u.pow(2).mean().sqrt())
    return out


def build_block(shapes, T: int, dev: torch.device, seed: int, zero_anchor: bool, eig_dtype=torch.float32):
    """Real cache build of one block; returns ({module: tensors on CPU}, {stage: seconds})."""
    g = torch.Generator(device=dev).manual_seed(seed)
    times = {"grams": 0.0, "eigh": 0.0, "project": 0.0}
    out = {}
    for name, (d_out, d_in) in shapes.items():
        taus = task_vectors(T, d_out, d_in, dev, g)
        U0 = None if zero_anchor else 0.3 * taus.sum(0)  # a TA-like anchor
        W = (W_RMS * torch.randn(d_out, d_in, generator=g, device=dev)).to(torch.bfloat16)
        sync(dev)
        t0 = time.perf_counter()
        st = free_stats(taus, key=name)
        sync(dev)
        t1 = time.perf_counter()
        eig = eig_gram(st.G_hat, key=name, dtype=eig_dtype)
        sync(dev)
        t2 = time.perf_counter()
        f = factorize(st.G_hat, st.B_hat, U0, key=name, dtype=eig_dtype, eig=eig, factor_dtype=torch.float32)
        sync(dev)
        t3 = time.perf_counter()
        times["grams"] += t1 - t0
        times["eigh"] += t2 - t1
        times["project"] += t3 - t2
        out[name] = {"W_pre": W.cpu(), **{r.removeprefix("x."): v.cpu() for r, v in f.tensors("x").items()}}
        del taus, st, eig, f
    times["total"] = sum(times.values())
    return out, times


# ---------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------


def _cast(f: ModuleFactors, dt: torch.dtype) -> ModuleFactors:
    """Factors stored in ``dt`` (evals stay fp32)."""
    c = lambda t: None if t is None else t.to(dt)  # noqa: E731
    return ModuleFactors(c(f.Q), f.evals.float(), c(f.BQ), c(f.U0Q))


def accuracy(args, dev: torch.device) -> dict:
    """Relative error of U against an all-fp64 reference, for a few λ.

    Variants: the cache built from fp32 statistics (what the Gram stage stores) with eigh in fp32 or fp64,
    stored in fp32 or bf16, applied with fp32 / tf32 / bf16 GEMMs; plus the fp32 Cholesky direct solve.
    For scale: ``bf16_output_rounding`` is the bf16 rounding error of the merged W = W_pre + U itself, in
    units of ‖U‖ (task vectors at 3 % of ‖W_pre‖): an error well below it cannot be seen in the output file.
    """
    shapes = block_shapes(args.accuracy_scale)
    picks = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"]
    g = torch.Generator(device=dev).manual_seed(args.seed + 1)
    lams = [1e-3, 1e-2, 1e-1, 10.0]
    computes = ["fp32"] + (["tf32", "bf16"] if dev.type == "cuda" else ["bf16"])
    rows = []
    for name in picks:
        d_out, d_in = shapes[name]
        taus = task_vectors(args.experts, d_out, d_in, dev, g).double()
        U0 = None if args.zero_anchor else 0.3 * taus.sum(0)
        st = free_stats(taus, key=name)
        f64 = factorize(st.G_hat, st.B_hat, U0, dtype=torch.float64, key=name)
        st32 = st.to(dtype=torch.float32)
        U032 = None if U0 is None else U0.float()
        variants = {}
        for eig in ("fp32", "fp64"):
            f = factorize(st32.G_hat, st32.B_hat, U032, dtype=DTYPES[eig], key=name)
            for store in ("fp32", "bf16"):
                variants[f"eig{eig}_store{store}"] = _cast(f, DTYPES[store])
        W_pre = W_RMS * torch.randn(d_out, d_in, generator=g, device=dev, dtype=torch.float64)
        ev = f64.evals
        for lam in lams:
            ref = apply_factors(f64, lam, key=name)
            nref = float(ref.norm())
            W = W_pre + ref
            row = {
                "module": name, "shape": [d_out, d_in], "lam": lam,
                "rank_deficient_dirs": int((ev <= 1e-9 * ev.max()).sum()),
                "bf16_output_rounding": float((W.bfloat16().double() - W).norm()) / nref,
                "direct_cholesky_fp32": float((solve_direct(st32.G_hat, st32.B_hat, U032, lam).double() - ref).norm())
                / nref,
            }
            for vname, fac in variants.items():
                for c in computes:
                    U = apply_factors(fac, lam, key=name, compute=c).double()
                    row[f"{vname}_gemm{c}"] = float((U - ref).norm()) / nref
            rows.append(row)
        del taus, st, f64, variants
    worst: dict[str, dict[str, float]] = {}
    for r in rows:
        w = worst.setdefault(f"lam={r['lam']:g}", {})
        for k, v in r.items():
            if isinstance(v, float) and k != "lam":
                w[k] = max(w.get(k, 0.0), v)
    return {"scale": args.accuracy_scale, "lams": lams, "modules": picks, "rows": rows, "worst": worst}


# ---------------------------------------------------------------------------------------------------------
# trials (one subprocess per row)
# ---------------------------------------------------------------------------------------------------------


def rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    dev = resolve_device(args.device)
    fd = DTYPES[args.factor_dtype[0]]
    k, mode = args.blocks[0], args.modes[0]
    from safetensors.torch import load_file

    template = load_file(args._template)
    names = sorted({n.split("::")[0] for n in template})
    names = [n for n in block_shapes(1.0) if n in names]  # block order
    # resident: default budgets (what is free); stream: nothing resident on the GPU, the cache in (pinned) host
    # memory; spill: nothing resident anywhere, every block read back from its file each trial
    budget = 0 if mode in ("stream", "spill") and dev.type == "cuda" else None
    spill = Path(args.workdir) / f"spill-{os.getpid()}"
    solver = TrialSolver(dev, budget_bytes=budget, spill_dir=spill, out_dtype=torch.bfloat16,
                         host_budget_bytes=0 if mode == "spill" else None)
    t0 = time.perf_counter()
    where = dev if mode == "resident" else torch.device("cpu")  # streamed / spilled blocks never sit on the GPU
    for b in range(k):
        for n in names:
            def t(role, dt=fd, n=n):
                return template[f"{n}::{role}"].to(device=where, dtype=dt, copy=True)

            U0Q = t("U0Q") if f"{n}::U0Q" in template else None
            f = ModuleFactors(t("Q"), template[f"{n}::evals"].to(where, copy=True), t("BQ"), U0Q)
            solver.add(f"model.layers.{b}.{n}.weight", f, t("W_pre", torch.bfloat16), block=b)
            del f, U0Q
    plan = solver.plan()
    setup_s = time.perf_counter() - t0
    template.clear()  # the copies are the solver's now
    results = []
    for compute in args.compute:
        solver.compute = compute
        lams = {key: 10 ** (-3 + 5 * ((i * 0.618) % 1)) for i, key in enumerate(solver.keys)}
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        rss_ok = rss_reset()
        times = []
        for trial in range(args.warmup + args.trials):
            t1 = time.perf_counter()
            nbytes = 0
            for _, W in solver.solve(lams, 1.1):
                nbytes += W.numel() * W.element_size()
                del W
            dt = time.perf_counter() - t1
            if trial >= args.warmup:
                times.append(dt)
        med = statistics.median(times)
        results.append({
            "k": k, "factor_dtype": args.factor_dtype[0], "mode": mode, "compute": compute,
            "trial_s": times, "trial_median_s": med, "per_block_s": med / k,
            "extrapolated_32_blocks_s": med / k * N_LAYERS,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "peak_rss_bytes": rss_peak(), "rss_peak_reset": rss_ok,
            "output_bytes_per_trial": nbytes, "setup_s": setup_s, "plan": plan,
            "block_bytes": plan["max_block_bytes"],
            "peak_gpu_over_block": (torch.cuda.max_memory_allocated(dev) / plan["max_block_bytes"]
                                    if dev.type == "cuda" else None),
        })
    solver.close()
    return {"rows": results}


def run_rows(args, template_path: Path) -> list[dict]:
    rows = []
    for fd in args.factor_dtype:
        for mode in args.modes:
            for k in args.blocks:
                cmd = [
                    sys.executable, __file__, "--_worker", "--_template", str(template_path),
                    "--device", args.device, "--blocks", str(k), "--modes", mode, "--factor-dtype", fd,
                    "--compute", *args.compute, "--trials", str(args.trials), "--warmup", str(args.warmup),
                    "--workdir", args.workdir, "--threads", str(args.threads),
                ]
                print(f"[bench] factors {fd}, {mode}, {k} blocks ...", file=sys.stderr, flush=True)
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(p.stderr[-4000:], file=sys.stderr)
                    rows.append({"k": k, "factor_dtype": fd, "mode": mode, "error": p.stderr.strip().splitlines()[-1:]})
                    continue
                out = json.loads(p.stdout.strip().splitlines()[-1])
                for r in out["rows"]:
                    rows.append(r)
                    print(
                        f"[bench]   {r['compute']}: {r['trial_median_s']:.3f} s/trial, {r['per_block_s']:.3f} s/block, "
                        f"32 blocks {r['extrapolated_32_blocks_s']:.2f} s, GPU peak {gb(r['peak_gpu_bytes'])}, "
                        f"RSS peak {gb(r['peak_rss_bytes'])}",
                        file=sys.stderr, flush=True,
                    )
    return rows


def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def block_bytes(shapes, fd_bytes: int, zero_anchor: bool) -> dict:
    """Analytic cache size per block: Q [d_in²], BQ and U0Q [d_out·d_in] in the factor dtype, W_pre in bf16."""
    q = sum(d_in * d_in for _, d_in in shapes.values())
    w = sum(d_out * d_in for d_out, d_in in shapes.values())
    n_w = 1 if zero_anchor else 2
    return {
        "Q_elems": q, "weight_elems": w,
        "bytes": q * fd_bytes + n_w * w * fd_bytes + w * 2,
        "bytes_fp32_all": (q + 3 * w) * 4,  # design.md's figure: everything fp32 incl. W_pre
    }


def _times(x) -> str:
    return "" if x is None else f" ({x:.1f}×)"


def table(res: dict) -> str:
    lines = [
        "| factors | mode | GEMM | blocks k | s/trial median (min) | s/block (from min) | → 32 blocks median (min) "
        "| peak GPU (× block) | peak RSS | placement |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['factor_dtype']} | {r['mode']} | - | {r['k']} | error | | | | | |")
            continue
        mn = min(r["trial_s"])
        lines.append(
            f"| {r['factor_dtype']} | {r['mode']} | {r['compute']} | {r['k']} | {r['trial_median_s']:.3f} ({mn:.3f}) | "
            f"{mn / r['k']:.3f} | {r['extrapolated_32_blocks_s']:.2f} ({mn / r['k'] * N_LAYERS:.2f}) | "
            f"{gb(r['peak_gpu_bytes'])}{_times(r.get('peak_gpu_over_block'))} | {gb(r['peak_rss_bytes'])} | "
            f"{', '.join(f'{w} {n}' for w, n in r['plan']['where'].items())} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8], help="numbers of blocks to time")
    ap.add_argument("--experts", type=int, default=3, help="T, the number of task vectors")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--factor-dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compute", nargs="+", default=None, choices=["fp32", "tf32", "bf16"],
                    help="GEMM precision of the trial (default: fp32 on CPU; fp32 tf32 bf16 on CUDA)")
    ap.add_argument("--modes", nargs="+", default=None, choices=["resident", "stream", "spill"],
                    help="default: resident stream spill on CUDA, resident spill on CPU")
    ap.add_argument("--scale", type=float, default=None, help="multiply all dims (default 1.0 on CUDA, 0.25 on CPU)")
    ap.add_argument("--eig-dtype", nargs="+", default=["fp32", "fp64"], choices=["fp32", "fp64"],
                    help="eigh precision(s) of the timed cache build (the first one feeds the trial rows)")
    ap.add_argument("--accuracy-scale", type=float, default=0.25, help="dims scale of the accuracy check")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--zero-anchor", action="store_true", help="pretrained anchor U0 = 0 (no U0Q stored)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", dest="json_out", default=None, help="write the results here")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_template", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    if args.compute is None:
        args.compute = ["fp32", "tf32", "bf16"] if dev.type == "cuda" else ["fp32"]
    if args.modes is None:
        args.modes = ["resident", "stream", "spill"] if dev.type == "cuda" else ["resident", "spill"]
    if args._worker:
        print(json.dumps(worker(args)))
        return 0
    if args.scale is None:
        args.scale = 1.0 if dev.type == "cuda" else 0.25
    own_tmp = None
    if args.workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="bmm-bench-")
        args.workdir = own_tmp.name
    shapes = block_shapes(args.scale)
    res = {
        "bench": "solve_speed", "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
        "scale": args.scale, "shapes": shapes, "experts": args.experts, "zero_anchor": args.zero_anchor,
        "out_dtype": "bf16", "n_layers_extrapolated": N_LAYERS,
        "cache_bytes_per_block": {fd: block_bytes(shapes, DTYPES[fd].itemsize, args.zero_anchor)["bytes"]
                                  for fd in args.factor_dtype},
        "cache_bytes_per_block_full_8b": {fd: block_bytes(block_shapes(1.0), DTYPES[fd].itemsize, args.zero_anchor)
                                          for fd in ("fp32", "bf16")},
    }
    print(f"[bench] {res['device']}, scale {args.scale}, T={args.experts}", file=sys.stderr, flush=True)
    # one-off cache build of one block (timed, twice: the first call pays library warm-up), per eigh dtype;
    # the first build is saved as the template that every row's blocks are copied from
    res["cache_build_per_block_s"] = {}
    built = None
    for ed in args.eig_dtype:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        first, times = build_block(shapes, args.experts, dev, args.seed, args.zero_anchor, DTYPES[ed])
        _, times2 = build_block(shapes, args.experts, dev, args.seed + 7, args.zero_anchor, DTYPES[ed])
        built = first if built is None else built
        del first
        res["cache_build_per_block_s"][f"eigh_{ed}"] = {
            "first": times, "repeat": times2, "extrapolated_32_blocks_s": times2["total"] * N_LAYERS,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        }
        print(f"[bench] cache build per block, eigh {ed}: {times2}", file=sys.stderr, flush=True)
    from safetensors.torch import save_file

    template_path = Path(args.workdir) / "block-template.safetensors"
    save_file({f"{n}::{r}": t.contiguous() for n, d in built.items() for r, t in d.items()}, str(template_path))
    del built
    if not args.no_accuracy:
        res["accuracy"] = accuracy(args, dev)
        print(f"[bench] accuracy (worst rel error of U vs fp64): {res['accuracy']['worst']}", file=sys.stderr)
    res["rows"] = run_rows(args, template_path)
    template_path.unlink(missing_ok=True)
    md = table(res)
    print(md)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    if own_tmp is not None:
        own_tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of each bmm stage against model depth, and the cost of a spilled trial cache (issue 16).

Llama-shaped models (hidden 512, intermediate 1792, 8 heads / 2 KV heads, T = 4 experts, fp32) with L = 2 / 4 / 8
layers; every stage runs the real bmm in its own subprocess on the CPU, while this process samples the
subprocess tree's ``/proc/<pid>/status`` (RssAnon, RssFile, RssShmem summed over the tree) every few ms; the stage
process also reports its own kernel peak (VmHWM) at exit. Rows:

* ``taskvec``, ``anchor`` (TA), ``gram`` (data-free), ``solve``: ``bmm <stage>`` one after the other on one
  work dir; ``merge``: ``bmm merge`` from scratch (all stages in one process, a fresh work dir).
* ``search``: a :class:`bmm_cli.factor_cache.Merger` (what ``bmm search`` builds) writing ``--trials`` trial models,
  with the default memory budget (what is free: the cache is held in RAM) and with ``memory_budget`` = 1.5 cache
  blocks (one block held, the rest spilled to the work dir). ``search-cli``: the same through
  ``bmm search --memory-budget`` when the installed bmm has that option (``--eval 'echo 0.5'``).
* ``timing``: one trial (Merger.write) with the cache resident vs. all blocks spilled (page cache warm), at the
  largest L, interleaved A B A B, medians and their ratio.

    nice python bench/memory.py --json bench/results/memory_cpu.json

``--code DIR`` measures another checkout of bmm (e.g. the commit before a change) with the same models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmRSS")


# ---------------------------------------------------------------------------------------------------------
# measuring a process tree
# ---------------------------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in FIELDS or name == "VmHWM":
                out[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return pids


def run_measured(cmd: list[str], env: dict, interval: float = 0.004) -> dict:
    """Run ``cmd``; peak tree RSS (sampled) split into anonymous / file-backed / shmem, plus the main process's
    VmHWM (the worker prints it as the last stdout line: ``{"vmhwm": ..., ...}``)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {f: 0 for f in FIELDS}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            tot = {f: 0 for f in FIELDS}
            for q in _tree(p.pid):
                st = _status(q)
                for f in FIELDS:
                    tot[f] += st.get(f, 0)
            for f in FIELDS:
                peak[f] = max(peak[f], tot[f])
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    stop.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"[memory] {' '.join(cmd[:6])} ... failed ({p.returncode}):\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    return {"peak_tree_rss": peak["VmRSS"], "peak_tree_anon": peak["RssAnon"], "peak_tree_file": peak["RssFile"],
            "peak_tree_shmem": peak["RssShmem"], "vmhwm": report.pop("vmhwm"), "seconds": time.perf_counter() - t0,
            **report}


# ---------------------------------------------------------------------------------------------------------
# workers (run in the measured subprocess)
# ---------------------------------------------------------------------------------------------------------


def _finish(extra: dict | None = None) -> None:
    print(json.dumps({"vmhwm": _status(os.getpid()).get("VmHWM", 0), **(extra or {})}))


def worker_build(a: dict) -> None:
    """Base + T experts (base + rank-8 update + 10 % dense noise on every 2-D weight), fp32 safetensors."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                         num_hidden_layers=a["layers"], num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg)
    root = Path(a["root"])
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for t in range(a["experts"]):
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for name, p in base.named_parameters():
                p.copy_(sd[name])
                if p.dim() == 2:
                    u = torch.randn(p.shape[0], 8, generator=g) @ torch.randn(8, p.shape[1], generator=g) / 8
                    p.add_(0.002 * (u + 0.1 * torch.randn(p.shape, generator=g)))
        base.save_pretrained(str(root / f"expert{t}"), safe_serialization=True)
    _finish()


def worker_cli(a: dict) -> None:
    from bmm_cli.cli import main

    try:
        main(a["argv"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    _finish()


def _merger(a: dict, **budget):
    import inspect

    from bmm_cli.factor_cache import Merger

    if budget and "memory_budget" not in inspect.signature(Merger).parameters:
        _finish({"unsupported": "this bmm's Merger has no memory_budget"})
        raise SystemExit(0)
    return Merger(Path(a["work"]), "ta", "free", device="cpu", **budget)


def _params(i: int):
    from bmm_cli.params import Params

    p = Params.uniform(1, lam=10 ** (-3 + (i * 0.618) % 1 * 3), scale=1.0 + 0.05 * (i % 4))
    return p


def worker_search(a: dict) -> None:
    """What a search holds: the Merger (its cache) and one trial model written at a time."""
    budget = {} if a.get("budget") is None else {"memory_budget": a["budget"], "spill_dir": a["spill_dir"]}
    m = _merger(a, **budget)
    line = m.placement() if hasattr(m, "placement") else "main: no placement()"
    times = []
    for i in range(a["trials"]):
        out = Path(a["out"]) / f"trial-{i}"
        t = time.perf_counter()
        m.write(_params(i), out)
        times.append(time.perf_counter() - t)
        shutil.rmtree(out)
    plan = m.solver.plan()
    m.close()
    _finish({"placement": line, "trial_s": times, "cache_bytes": plan["bytes"], "where": plan["where"],
             "max_block_bytes": plan["max_block_bytes"]})


def worker_timing(a: dict) -> None:
    """Trial time with the cache resident vs. spilled (every block read back from disk, page cache warm)."""
    ms = {"resident": _merger(a), "spilled": _merger(a, memory_budget=0, spill_dir=a["spill_dir"])}
    times: dict[str, list[float]] = {k: [] for k in ms}
    solve_s: dict[str, list[float]] = {k: [] for k in ms}
    for rep in range(a["reps"] + 1):  # the first round warms the page cache and the allocator
        for name, m in ms.items():
            out = Path(a["out"]) / f"{name}-{rep}"
            t = time.perf_counter()
            r = m.write(_params(rep), out)
            dt = time.perf_counter() - t
            shutil.rmtree(out)
            if rep:
                times[name].append(dt)
                solve_s[name].append(r["solve_s"])
    lines = {k: m.placement() for k, m in ms.items()}
    for m in ms.values():
        m.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    _finish({"trial_s": times, "solve_s": solve_s, "median_s": med, "placement": lines,
             "spilled_over_resident": med["spilled"] / med["resident"],
             "spilled_over_resident_solve": (statistics.median(solve_s["spilled"])
                                             / statistics.median(solve_s["resident"]))})


WORKERS = {"build": worker_build, "cli": worker_cli, "search": worker_search, "timing": worker_timing}


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------


def cache_block_bytes(hidden: int, inter: int, kv: int) -> int:
    """Trial-cache bytes of one block (free Grams, TA anchor, fp32): Q [d_in²], evals [d_in], BQ, U0Q, W_pre
    [d_out·d_in] per module."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    return sum(4 * (d_in * d_in + d_in + 3 * d_out * d_in) for d_out, d_in in shapes)


def has_cli_budget(env: dict) -> bool:
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", "search", "--help"], env=env, capture_output=True,
                       text=True)
    return "--memory-budget" in p.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1792)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=3, help="trial models written per search row")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the resident/spilled timing")
    ap.add_argument("--code", default=str(REPO), help="the bmm checkout to measure (PYTHONPATH of the stages)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        WORKERS[args._worker](json.loads(args._args))
        return 0
    own = tempfile.TemporaryDirectory(prefix="bmm-memory-") if args.workdir is None else None
    scratch = Path(own.name if own else args.workdir)
    env = dict(os.environ, PYTHONPATH=str(Path(args.code).resolve()), OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    kv = args.hidden // 8 * 2
    block = cache_block_bytes(args.hidden, args.intermediate, kv)
    cli_budget = has_cli_budget(env)

    def stage(name: str, a: dict, **meta) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_args", json.dumps(a)]
        r = run_measured(cmd, env)
        if "unsupported" in r:
            print(f"[memory] {meta.get('row', name)}: {r['unsupported']}", file=sys.stderr)
            return {**meta, **r}
        print(f"[memory] {meta.get('row', name)} L={meta.get('L')}: tree peak {r['peak_tree_rss'] / 1e6:.0f} MB "
              f"(anon {r['peak_tree_anon'] / 1e6:.0f}, file {r['peak_tree_file'] / 1e6:.0f}), VmHWM "
              f"{r['vmhwm'] / 1e6:.0f} MB, {r['seconds']:.1f} s", file=sys.stderr, flush=True)
        return {**meta, **r}

    rows = [stage("cli", {"argv": ["version"]}, row="baseline (python + torch + bmm)", L=0)]
    timing = None
    for L in args.layers:
        root = scratch / f"L{L}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        stage("build", {"root": str(root), "layers": L, "experts": args.experts, "hidden": args.hidden,
                        "intermediate": args.intermediate, "vocab": args.vocab}, row="build", L=L)
        base, experts = str(root / "base"), [str(root / f"expert{t}") for t in range(args.experts)]
        work = str(root / "work")
        q = ["--quiet"]
        for row, argv in (
            ("taskvec", ["taskvec", "-b", base, "-e", *experts, "-w", work]),
            ("anchor", ["anchor", "-w", work, "-m", "ta"]),
            ("gram", ["gram", "-w", work, "--kind", "free", "--device", "cpu"]),
            ("solve", ["solve", "-w", work, "-a", "ta", "--gram", "free", "-o", str(root / "solved"),
                       "--device", "cpu", "--lam", "0.01"]),
            ("merge", ["merge", "-b", base, "-e", *experts, "-o", str(root / "merged"), "-w", str(root / "work2"),
                       "-a", "ta", "--gram", "free", "--device", "cpu", "--lam", "0.01"]),
        ):
            rows.append(stage("cli", {"argv": q + argv}, row=row, L=L))
        # the factor cache is built (and timed) outside the measured search rows: both rows then load it
        stage("search", {"work": work, "trials": 1, "out": str(root / "trials")}, row="factor cache build", L=L)
        # 1.5 blocks: one block held in memory, the rest spilled (whatever the exact per-block overhead)
        for label, budget in (("search (default budget)", None), ("search (budget 1.5 blocks)", block * 3 // 2)):
            rows.append(stage("search", {"work": work, "trials": args.trials, "out": str(root / "trials"),
                                         "budget": budget, "spill_dir": work}, row=label, L=L, budget=budget))
        if cli_budget:
            argv = q + ["search", "-w", work, "-a", "ta", "--gram", "free", "--eval", "echo 0.5", "-o",
                        str(root / "best"), "--trials", str(args.trials), "--initial", str(args.trials),
                        "--device", "cpu", "--memory-budget", str(block * 3 // 2), "--force"]
            rows.append(stage("cli", {"argv": argv}, row="search-cli (--memory-budget 1.5 blocks)", L=L,
                              budget=block * 3 // 2))
        if L == max(args.layers):
            timing = stage("timing", {"work": work, "reps": args.reps, "out": str(root / "timing"),
                                      "spill_dir": work}, row="timing", L=L)
        shutil.rmtree(root / "solved", ignore_errors=True)
        shutil.rmtree(root / "merged", ignore_errors=True)
        shutil.rmtree(root / "work2", ignore_errors=True)
    res = {
        "bench": "memory", "command": " ".join(["bench/memory.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "load_average": os.getloadavg(), "code": args.code,
        "shapes": {"hidden": args.hidden, "intermediate": args.intermediate, "kv": kv, "vocab": args.vocab,
                   "experts": args.experts, "dtype": "float32"},
        "cache_block_bytes": block, "cli_memory_budget": cli_budget, "rows": rows, "timing": timing,
        "flatness": flatness(rows, args.layers, block),
    }
    print(table(res))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    if own:
        own.cleanup()
    return 0


def flatness(rows: list[dict], layers: list[int], block: int) -> dict:
    """Growth of each row's peaks from the smallest to the largest L, against issue 16's bound for the search
    under a budget: ≤ 10 % of the smallest-L figure plus one block."""
    lo, hi = min(layers), max(layers)
    rows = [r for r in rows if "peak_tree_rss" in r and "unsupported" not in r]
    out = {}
    for name in dict.fromkeys(r["row"] for r in rows if r.get("L")):
        a = next((r for r in rows if r["row"] == name and r["L"] == lo), None)
        b = next((r for r in rows if r["row"] == name and r["L"] == hi), None)
        if a is None or b is None:
            continue
        out[name] = {k: {"growth": b[k] - a[k], "bound": 0.1 * a[k] + block, "flat": b[k] - a[k] <= 0.1 * a[k] + block}
                     for k in ("peak_tree_rss", "peak_tree_anon", "vmhwm")}
    return out


def table(res: dict) -> str:
    rows = [r for r in res["rows"] if "unsupported" not in r]
    layers = sorted({r["L"] for r in rows if r.get("L")})
    mb = lambda n: f"{n / 1e6:.0f}"  # noqa: E731
    lines = ["| stage | " + " | ".join(f"L={L}" for L in layers) + " | per added layer (tree RSS, anon) |",
             "|---|" + "---|" * len(layers) + "---|"]
    for name in dict.fromkeys(r["row"] for r in rows if r.get("L")):
        by = {r["L"]: r for r in rows if r["row"] == name}
        cells = [f"{mb(by[L]['peak_tree_rss'])} ({mb(by[L]['peak_tree_anon'])})" if L in by else "-" for L in layers]
        lo, hi = layers[0], layers[-1]
        slope = (f"{(by[hi]['peak_tree_rss'] - by[lo]['peak_tree_rss']) / (hi - lo) / 1e6:+.1f} MB, "
                 f"{(by[hi]['peak_tree_anon'] - by[lo]['peak_tree_anon']) / (hi - lo) / 1e6:+.1f} MB"
                 if lo in by and hi in by and hi > lo else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {slope} |")
    t = res.get("timing")
    if t and "median_s" in t:
        lines.append("")
        lines.append(f"trial (L={t['L']}): resident {t['median_s']['resident']:.3f} s, spilled "
                     f"{t['median_s']['spilled']:.3f} s (median of {len(t['trial_s']['resident'])}, interleaved): "
                     f"{t['spilled_over_resident']:.2f}x (solve part {t['spilled_over_resident_solve']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""Low-rank vs dense data-free BMM solve for LoRA experts, at Llama-3.1-8B module shapes.

T experts are rank-r LoRA adapters on every linear module of a decoder layer (q, k, v, o, gate, up, down). For
each module and layer:

* dense: ``free_stats`` on the stacked dense task vectors ``U_t = P_t A_t`` (built beforehand, not timed: the
  dense pipeline reads them from its taskvec stage) + ``solve_direct`` with the task-arithmetic anchor Σ U_t;
* low-rank: ``lowrank_free_stats`` on the factors + ``lowrank_solve_factors`` with the same anchor in the basis
  (the merge as rank-Σr factors, what an adapter output needs), and, timed separately, the dense
  ``U = u Qᵀ`` a full-model output needs.

Accuracy: both fp32 merges against the fp64 low-rank solve (which equals the fp64 dense solve to ~1e-13).

Reported per module: median seconds over layers × repeats (min and max alongside; the low-rank time of each is
the least of ``--low-repeats`` runs), the speed-up of the low-rank
solve (factors, and factors + dense U) over the dense one, and the relative difference of the two merges.

    nice python bench/lowrank_solve.py --device cpu --threads 1 --layers 2 --json bench/results/lowrank_solve.json
    # a host short of memory: the largest module (down_proj: a 14336² Gram) in a run of its own
    nice python bench/lowrank_solve.py --device cpu --threads 1 --modules q_proj,k_proj --json R.json
    nice python bench/lowrank_solve.py --device cpu --threads 1 --modules down_proj --append --json R.json
    python bench/lowrank_solve.py --device cuda --layers 4 --repeats 3 --json bench/results/lowrank_solve_gpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bmm_cli.closed_form import free_stats, solve_direct  # noqa: E402
from bmm_cli.device import resolve_device  # noqa: E402
from bmm_cli.lowrank import lowrank_free_stats, lowrank_solve_factors, ta_anchor_in_basis  # noqa: E402
from bmm_cli.progress import track  # noqa: E402

HIDDEN, INTER, KV = 4096, 14336, 1024
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def one_module(d_out: int, d_in: int, rank: int, experts: int, lam: float, dev: torch.device, seed: int,
               low_repeats: int = 5) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    F = [((torch.randn(d_out, rank, generator=g) * 0.02).to(dev), (torch.randn(rank, d_in, generator=g)
                                                                   / d_in ** 0.5).to(dev)) for _ in range(experts)]
    taus = torch.stack([P @ A for P, A in F])
    U0 = taus.sum(0)

    def dense(taus):
        st = free_stats(taus, key="bench")
        return solve_direct(st.G_hat, st.B_hat, U0, lam, key="bench")

    def low():
        st = lowrank_free_stats(F, key="bench")
        return lowrank_solve_factors(st, ta_anchor_in_basis(st), lam, key="bench")

    U_dense, t_dense = _timed(functools.partial(dense, taus), dev)
    del taus
    t_low = t_expand = float("inf")
    for _ in range(low_repeats):  # cheap: the least of a few runs drops the scheduler noise of a shared host
        (u, Q), t = _timed(low, dev)
        t_low = min(t_low, t)
        U_low, t = _timed(lambda: u @ Q.mT, dev)
        t_expand = min(t_expand, t)
    # reference: the low-rank solve in fp64 (equal to the dense fp64 solve to ~1e-13, tests/test_lowrank.py)
    st64 = lowrank_free_stats([(P.double(), A.double()) for P, A in F], key="bench")
    u64, Q64 = lowrank_solve_factors(st64, ta_anchor_in_basis(st64), lam, key="bench")
    ref = u64 @ Q64.mT
    ref_norm = torch.linalg.norm(ref)

    def err(U):
        return float(torch.linalg.norm(U.double() - ref) / ref_norm)

    return {"dense_s": t_dense, "lowrank_s": t_low, "expand_s": t_expand,
            "rel_diff": float(torch.linalg.norm(U_low - U_dense) / torch.linalg.norm(U_dense)),
            "dense_fp32_err": err(U_dense), "lowrank_fp32_err": err(U_low)}


def _device_name(dev: torch.device) -> str:
    return str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)


def _summary(rows: list[dict]) -> dict:
    out = {}
    for k in ("dense_s", "lowrank_s", "expand_s"):
        v = [r[k] for r in rows]
        out[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    sp = [r["dense_s"] / r["lowrank_s"] for r in rows]
    spf = [r["dense_s"] / (r["lowrank_s"] + r["expand_s"]) for r in rows]
    out["speedup_factors"] = {"median": statistics.median(sp), "min": min(sp), "max": max(sp)}
    out["speedup_full_output"] = {"median": statistics.median(spf), "min": min(spf), "max": max(spf)}
    for k in ("rel_diff", "dense_fp32_err", "lowrank_fp32_err"):
        out[f"{k}_max"] = max(r[k] for r in rows)
    out["n"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (each a fresh draw of every module)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per module and layer")
    ap.add_argument("--low-repeats", type=int, default=5, help="low-rank runs per dense run (the least is kept)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated subset of " + ",".join(MODULES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every dimension (quick runs)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default); 1 is steadiest on a "
                    "shared host")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--append", action="store_true", help="add to the runs already in --json (same settings), e.g. "
                    "modules measured in separate runs on a host short of memory")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if dev.type == "cuda":  # warm-up: first-use kernels and the cuSOLVER handle
        one_module(256, 256, args.rank, args.experts, args.lam, dev, 0)
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    bad = [n for n in names if n not in MODULES]
    if bad or not names:
        ap.error(f"--modules: unknown {bad}; choose from {', '.join(MODULES)}")
    shapes = {n: (max(1, int(MODULES[n][0] * args.scale)), max(1, int(MODULES[n][1] * args.scale))) for n in names}
    jobs = [(layer, rep, name) for layer in range(args.layers) for rep in range(args.repeats) for name in shapes]
    rows: dict[str, list[dict]] = {n: [] for n in shapes}
    if args.append and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        now = {"rank": args.rank, "experts": args.experts, "lam": args.lam, "low_repeats": args.low_repeats,
               "threads": torch.get_num_threads(), "device": _device_name(dev)}
        for k, v in now.items():
            if old.get(k) != v:
                ap.error(f"--append: {args.json} was run with {k}={old.get(k)}, this run has {v}")
        rows = {**{n: list(r) for n, r in old.get("rows", {}).items()}, **rows}
        shapes = {**{n: tuple(v) for n, v in old.get("shapes", {}).items()}, **shapes}
    for layer, rep, name in track(jobs, "low-rank vs dense solve", total=len(jobs)):
        d_out, d_in = shapes[name]
        row = one_module(d_out, d_in, args.rank, args.experts, args.lam, dev, 1000 * layer + rep, args.low_repeats)
        rows.setdefault(name, []).append(row)
        _report(args, dev, shapes, rows, complete=False)  # partial results survive an interrupted run
    return _report(args, dev, shapes, rows, complete=True)


def _report(args, dev: torch.device, shapes: dict, rows: dict[str, list[dict]], *, complete: bool) -> dict:
    per_module = {n: _summary(r) for n, r in rows.items() if r}
    layer_dense = sum(s["dense_s"]["median"] for s in per_module.values())
    layer_low = sum(s["lowrank_s"]["median"] for s in per_module.values())
    layer_expand = sum(s["expand_s"]["median"] for s in per_module.values())
    res = {
        "device": _device_name(dev),
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shapes": shapes,
        "rank": args.rank,
        "experts": args.experts,
        "layers": args.layers,
        "repeats": args.repeats,
        "lam": args.lam,
        "low_repeats": args.low_repeats,
        "complete": complete,
        "anchor": "ta",
        "dtype": "float32",
        "per_module": per_module,
        "rows": rows,
        "per_layer": {"dense_s": layer_dense, "lowrank_s": layer_low, "expand_s": layer_expand,
                      "speedup_factors": layer_dense / layer_low,
                      "speedup_full_output": layer_dense / (layer_low + layer_expand)},
    }
    text = json.dumps(res, indent=2)
    if complete:
        print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()

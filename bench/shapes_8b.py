"""Disk, peak RSS and seconds of every bmm stage at Llama-3.1-8B block shapes, projected to 32 layers.

Synthetic checkpoints (no download): a LlamaForCausalLM directory per model with hidden 4096, intermediate 14336,
32 heads / 8 KV heads (k/v 1024 x 4096), bf16, a small vocabulary (the blocks are what a merge works on) and
``L`` layers. The base weights are N(0, 0.02²) rounded to bf16; expert t is ``bf16(W_pre + δ_t)`` with
``δ_t = rel·0.02·(√0.7·low-rank(16) + √0.3·noise)`` per 2-D block tensor (unit-variance parts), so the task
vectors are mostly rank 16 plus dense noise at ``rel`` (default 1e-3) of the weights, quantised by bf16 as a
real bf16 fine-tune is.

Each stage runs the real ``bmm`` in its own subprocess (``os.wait4`` gives the child's own ``ru_maxrss``); the
bytes a stage wrote are the growth of the work directory (its ``block-NNN`` shards give the per-layer figure):

    taskvec, anchor ta / ties / tsv, gram (free), evidence λ (what ``bmm solve`` runs by default: tsv anchor,
    free Gram), solve (``bmm solve`` with the evidence λ computed above), search cache (the factor cache a
    ``bmm search`` builds before its first trial: ``bmm_cli.factor_cache.prepare_trials``).

The evidence and the search cache run one fp64 eigh per module (six 4096² and one 14336² per layer). On a small
CPU that is hours per layer, so by default (``--eigh project``) those two rows come from timing the per-module
work itself (fp64 ``eigh`` of Ĝ plus ``B̂Q`` and ``U0Q``, the evidence's maximisation) on matrices of 8B shapes
at the sizes in ``--probe-sizes``, fitted as ``a·n³`` and evaluated at 4096 and 14336; their bytes are the
shapes' (fp32 Q, Λ, B̂Q, U0Q per module) and the probe's peak RSS at the largest size, scaled by ``n²``.
``--eigh run`` runs both stages for real instead.

    nice -n 10 python bench/shapes_8b.py --configs 2x3,2x5 --root /path/with/space \
        --json bench/results/shapes_8b_cpu.json

``--device cuda`` runs every stage (and the probe) on the GPU. Everything under ``--root`` is deleted afterwards
(``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
FULL_LAYERS = 32


def block_shapes() -> dict[str, tuple]:
    """The seven linear tensors of one Llama block, [d_out, d_in]."""
    hidden, inter, kv = HIDDEN, INTER, KV_HEADS * HEAD_DIM
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


# ---------------------------------------------------------------------------------------------------------
# synthetic checkpoints
# ---------------------------------------------------------------------------------------------------------


def _delta(shape, g, rel: float, sigma: float, rank: int = 16, noise: float = 0.3):
    import torch

    lo = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / math.sqrt(rank)
    lo.mul_(math.sqrt(1 - noise)).add_(torch.randn(shape, generator=g), alpha=math.sqrt(noise))
    return lo.mul_(rel * sigma)


def build_models(root: Path, layers: int, experts: int, *, vocab: int = 1024, rel: float = 1e-3,
                 sigma: float = 0.02) -> dict:
    """``root/base`` and ``root/expert<t>``: bf16 LlamaForCausalLM directories of 8B block shapes."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                         tie_word_embeddings=False, torch_dtype="bfloat16", rms_norm_eps=1e-5)
    cfg.architectures = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": (torch.randn(vocab, HIDDEN, generator=g) * sigma).bfloat16(),
        "lm_head.weight": (torch.randn(vocab, HIDDEN, generator=g) * sigma).bfloat16(),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    for i in range(layers):
        for name, shape in block_shapes().items():
            base[f"model.layers.{i}.{name}.weight"] = (torch.randn(shape, generator=g) * sigma).bfloat16()
        for n in ("input_layernorm", "post_attention_layernorm"):
            base[f"model.layers.{i}.{n}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    dirs = {"base": root / "base"}
    _save(dirs["base"], cfg, base, save_file)
    for t in range(experts):
        gt = torch.Generator().manual_seed(100 + t)
        sd = {k: (v if v.dim() < 2 else (v.float() + _delta(v.shape, gt, rel, sigma)).bfloat16())
              for k, v in base.items()}
        dirs[f"expert{t}"] = root / f"expert{t}"
        _save(dirs[f"expert{t}"], cfg, sd, save_file)
        del sd
    return {k: str(v) for k, v in dirs.items()}


def _save(d: Path, cfg, sd: dict, save_file) -> None:
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(d))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------
# running one stage
# ---------------------------------------------------------------------------------------------------------


def wait4_run(argv: list[str], env: dict) -> dict:
    """Like :func:`run_child`, with the peak RSS from ``os.wait4`` (the child's own rusage, not a running max)."""
    import tempfile

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdout=fo, stderr=fe, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    return {"seconds": round(dt, 2), "rc": p.returncode, "peak_rss": ru.ru_maxrss * 1024, "load1_before": load0,
            "load1_after": os.getloadavg()[0], "stdout": out[-4000:], "stderr": err[-2000:]}


def stage_bytes(work: Path, before: dict[str, int]) -> tuple[int, int, dict[str, int]]:
    """(bytes added to the work dir, bytes of the new/changed block shards, per stage dir)."""
    now = {str(p.relative_to(work)): p.stat().st_size for p in Path(work).rglob("*") if p.is_file()}
    added = {k: v for k, v in now.items() if before.get(k) != v}
    total = sum(now.values()) - sum(before.values())
    blocks = sum(v for k, v in added.items() if Path(k).name.startswith("block-"))
    per_dir: dict[str, int] = {}
    for k, v in added.items():
        per_dir[Path(k).parts[0]] = per_dir.get(Path(k).parts[0], 0) + v
    return total, blocks, per_dir


def snapshot(work: Path) -> dict[str, int]:
    return {str(p.relative_to(work)): p.stat().st_size for p in Path(work).rglob("*") if p.is_file()}


PY_EVIDENCE = """
import sys, torch
from pathlib import Path
from bmm_cli.default_params import evidence_params
from bmm_cli.workdir import Sources
evidence_params(Sources(Path(sys.argv[1]), sys.argv[2], "free"), scale=1.0, eps=None)
"""

PY_CACHE = """
import sys, torch
from pathlib import Path
from bmm_cli.factor_cache import prepare_trials
from bmm_cli.workdir import Sources
prepare_trials(Sources(Path(sys.argv[1]), sys.argv[2], "free"), device=torch.device(sys.argv[3]))
"""


def stage_commands(work: Path, models: dict, experts: int, device: str, out: Path, eigh: str,
                   skip: set[str] = frozenset(), store: str = "none") -> list[tuple]:
    """(name, argv) of every stage; the solve, evidence and search cache use the TSV anchor unless ``skip`` leaves
    it out (then TA). ``store``: ``bmm taskvec --store`` (none: the task vectors are recomputed when read)."""
    bmm = [sys.executable, "-m", "bmm_cli.cli"]
    py = [sys.executable, "-c"]
    es = [models[f"expert{t}"] for t in range(experts)]
    a = "ta" if "anchor tsv" in skip else "tsv"
    rows = [("taskvec", bmm + ["-q", "taskvec", "-b", models["base"], "-e", *es, "-w", str(work), "--store", store])]
    for m in ("ta", "ties", "tsv"):
        rows.append((f"anchor {m}", bmm + ["-q", "anchor", "-w", str(work), "-m", m, "--device", device]))
    rows.append(("gram free", bmm + ["-q", "gram", "-w", str(work), "--kind", "free", "--device", device]))
    if eigh == "run":
        rows.append(("evidence", py + [PY_EVIDENCE, str(work), a]))
    else:  # the solve below needs a λ: one per module, the stage's cost is the probe's
        rows.append(("solve", bmm + ["-q", "solve", "-w", str(work), "-a", a, "--gram", "free", "--lam", "0.03",
                                     "-o", str(out), "--device", device]))
        return rows
    rows.append(("solve", bmm + ["-q", "solve", "-w", str(work), "-a", a, "--gram", "free", "-o", str(out),
                                 "--device", device]))
    rows.append(("search cache", py + [PY_CACHE, str(work), a, device if device != "auto" else "cpu"]))
    return rows


def run_config(root: Path, layers: int, experts: int, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    models = build_models(root / "models", layers, experts, vocab=args.vocab, rel=args.rel)
    build_s = time.perf_counter() - t0
    inputs = tree_bytes(root / "models")
    work, out = root / "work", root / "out"
    rows = []
    skip = {x.strip() for x in (args.skip or "").split(",") if x.strip()}
    for name, argv in stage_commands(work, models, experts, args.device, out, args.eigh, skip, args.store):
        if name in skip:
            continue
        before = snapshot(work) if work.exists() else {}
        print(f"[shapes_8b] L={layers} T={experts} {name} ...", file=sys.stderr, flush=True)
        r = wait4_run(argv, env)
        if r["rc"] != 0:
            raise RuntimeError(f"{name}: exit {r['rc']}: {r['stderr'].strip().splitlines()[-1:]}")
        total, blocks, per_dir = stage_bytes(work, before)
        row = {"stage": name, "seconds": r["seconds"], "peak_rss": r["peak_rss"], "bytes": total,
               "block_bytes": blocks, "dirs": per_dir, "load1_before": r["load1_before"],
               "load1_after": r["load1_after"]}
        if name == "solve":
            row["out_bytes"] = tree_bytes(out)
        rows.append(row)
        print(f"[shapes_8b]   {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB, "
              f"+{total / 2**30:.2f} GiB (load {r['load1_before']:.1f})", file=sys.stderr, flush=True)
    study = dtype_study(Path(models["base"]), [Path(models[f"expert{t}"]) for t in range(experts)], work)
    res = {"layers": layers, "experts": experts, "input_bytes": inputs,
           "expert_bytes": tree_bytes(Path(models["expert0"])), "build_seconds": round(build_s, 1),
           "work_bytes": tree_bytes(work), "stages": rows, "dtype_study": study}
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------------------
# the bf16 question: how much of a task vector is exact in the experts' dtype, and what bf16 storage costs
# ---------------------------------------------------------------------------------------------------------


def dtype_study(base: Path, experts: list[Path], work: Path) -> dict:
    """Layer 0 of the synthetic models: per tensor, the fraction of entries of ``W_t - W_pre`` (exact in fp32)
    that bf16 holds exactly (Sterbenz: both within a factor 2), and the relative Frobenius error of bf16 storage
    of the task vectors, of B̂ (free Gram) and of the anchor (TSV, else TA) against their fp32 values."""
    from safetensors import safe_open

    def rel(a, b):
        return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-300))

    out: dict[str, dict] = {}
    fb = safe_open(str(base / "model.safetensors"), "pt")
    fes = [safe_open(str(e / "model.safetensors"), "pt") for e in experts]
    gram = sorted((work / "gram-free").glob("block-*.safetensors"))
    anc = (sorted((work / "anchor-tsv").glob("block-*.safetensors"))
           or sorted((work / "anchor-ta").glob("block-*.safetensors")))
    fg = safe_open(str(gram[0]), "pt") if gram else None
    fa = safe_open(str(anc[0]), "pt") if anc else None
    for name in block_shapes():
        key = f"model.layers.0.{name}.weight"
        w0 = fb.get_tensor(key).float()
        exact, n, err, sterbenz, nonzero = 0, 0, 0.0, 0, 0
        for fe in fes:
            w = fe.get_tensor(key).float()
            d = w - w0  # exact: two bf16 numbers differ by an fp32-representable amount
            exact += int((d.bfloat16().float() == d).sum())
            sterbenz += int(((w0.abs() <= 2 * w.abs()) & (w.abs() <= 2 * w0.abs())).sum())
            nonzero += int((d != 0).sum())
            n += d.numel()
            err = max(err, rel(d.bfloat16(), d))
        row = {"bf16_exact_fraction": exact / n, "sterbenz_fraction": sterbenz / n, "nonzero_fraction": nonzero / n,
               "taskvec_bf16_rel_err_max": err}
        if fg is not None:
            b = fg.get_tensor(f"{key}.B_hat")
            row["B_hat_bf16_rel_err"] = rel(b.bfloat16(), b)
            g = fg.get_tensor(f"{key}.G_hat")
            row["G_hat_bf16_rel_err"] = rel(g.bfloat16(), g)
        if fa is not None and key in fa.keys():  # noqa: SIM118 (safe_open has no __contains__)
            a = fa.get_tensor(key)
            row["anchor_bf16_rel_err"] = rel(a.bfloat16(), a)
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------------------
# the eigh probe: what the evidence and the search cache do per module, timed per matrix size
# ---------------------------------------------------------------------------------------------------------


PY_PROBE = """
import json, math, sys, time, torch
from bmm_cli import evidence
n, d_out, dev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(n)
T = 3
A = torch.randn(T * min(d_out, n), n, generator=g, dtype=torch.float64)
G = (A.T @ A).to(dev)
G /= G.diagonal().mean()
B = torch.randn(d_out, n, generator=g, dtype=torch.float64).to(dev)
U0 = torch.randn(d_out, n, generator=g, dtype=torch.float64).to(dev)
if dev.startswith("cuda"): torch.cuda.synchronize()
t0 = time.perf_counter()
lam, Q = torch.linalg.eigh(G)
if dev.startswith("cuda"): torch.cuda.synchronize()
t1 = time.perf_counter()
BQ, U0Q = B @ Q, U0 @ Q
if dev.startswith("cuda"): torch.cuda.synchronize()
t2 = time.perf_counter()
sp = evidence.spectrum_from_factors(lam.cpu(), BQ.cpu(), U0Q.cpu(), 1.0 * d_out, T * d_out)
evidence.evidence_lam(sp)
t3 = time.perf_counter()
print(json.dumps({"n": n, "d_out": d_out, "eigh_s": t1 - t0, "gemm_s": t2 - t1, "lam_s": t3 - t2}))
"""


def eigh_probe(sizes: list[int], device: str, env: dict) -> list[dict]:
    rows = []
    for n in sizes:
        print(f"[shapes_8b] eigh probe n={n} ...", file=sys.stderr, flush=True)
        r = wait4_run([sys.executable, "-c", PY_PROBE, str(n), str(n), device if device != "auto" else "cpu"], env)
        if r["rc"] != 0:
            raise RuntimeError(f"eigh probe n={n}: {r['stderr'][-500:]}")
        row = json.loads(r["stdout"].strip().splitlines()[-1])
        row.update(peak_rss=r["peak_rss"], load1_before=r["load1_before"], load1_after=r["load1_after"],
                   seconds=r["seconds"])
        rows.append(row)
        print(f"[shapes_8b]   eigh {row['eigh_s']:.1f} s, GEMMs {row['gemm_s']:.1f} s, peak RSS "
              f"{row['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return rows


def probe_rows(rows: list[dict], route: str) -> list[dict]:
    """Rows of the spectrum timing as eigh-probe rows for one route (full-rank shapes only), in CPU seconds."""
    out = []
    for r in rows:
        if r["T"] * r["d_out"] < r["n"]:
            continue  # rank-deficient shapes are cheaper for the spectrum route: project from full rank
        x = r[route]  # CPU seconds of the one-thread run: what the work costs, whatever the load beside it
        out.append({"n": r["n"], "d_out": r["d_out"], "eigh_s": x["eig_cpu_s"],
                    "gemm_s": x["total_cpu_s"] - x["eig_cpu_s"], "lam_s": x["max_s"], "peak_rss": r["peak_rss"],
                    "load1_before": r["load1_before"],
                    "route": route, "rep": r["rep"]})
    return out


def project_eigh(probe: list[dict], experts: int) -> dict:
    """Seconds / bytes / RSS per layer of the evidence and the search cache, from the probe: the eigh as a·n³
    (a from the largest probe size, median over repetitions), the two GEMMs [d_out, n]·[n, n] as b·d_out·n²
    (b likewise)."""
    n_top = max(r["n"] for r in probe)
    tops = [r for r in probe if r["n"] == n_top]  # the largest size, median over its repetitions
    a = statistics.median(r["eigh_s"] / r["n"] ** 3 for r in tops)
    b = statistics.median(r["gemm_s"] / (r["d_out"] * r["n"] ** 2) for r in tops)
    rss_per_n2 = max(r["peak_rss"] for r in tops) / n_top ** 2
    shapes = block_shapes()
    eigh_s = sum(a * d_in ** 3 for _, d_in in shapes.values())
    gemm_s = sum(b * d_out * d_in ** 2 for d_out, d_in in shapes.values())
    cache_bytes = sum(4 * (d_in * d_in + d_in + 2 * d_out * d_in) for d_out, d_in in shapes.values())
    n_max = max(d_in for _, d_in in shapes.values())
    return {"eigh_seconds_per_layer": eigh_s, "gemm_seconds_per_layer": gemm_s,
            "seconds_per_layer": eigh_s + gemm_s, "eigh_a": a, "gemm_b": b,
            "eigh_14336_seconds": a * 14336 ** 3, "eigh_4096_seconds": a * 4096 ** 3,
            "peak_rss_projected": rss_per_n2 * n_max ** 2, "search_cache_bytes_per_layer": cache_bytes,
            "evidence_bytes_per_layer": 0}


PY_SPECTRUM = """
import json, sys, time, torch
from bmm_cli import evidence, spectrum
n, d_out, T, dev, order = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
g = torch.Generator().manual_seed(n + d_out)
r = 16
taus = (torch.randn(T, d_out, r, generator=g, dtype=torch.float64)
        @ torch.randn(T, r, n, generator=g, dtype=torch.float64)
        / r ** 0.5 * 0.84 + 0.55 * torch.randn(T, d_out, n, generator=g, dtype=torch.float64)).to(dev)
G, B, m = spectrum.free_gram(taus)
u0 = taus.mean(0)
S = evidence.residual_energy(taus, None, u0, m)
del taus
def sync():
    if dev.startswith("cuda"): torch.cuda.synchronize()
routes = {"eigh_fp64": lambda: torch.linalg.eigh(G), "spectrum": lambda: spectrum.eigh(G)}
out = {"n": n, "d_out": d_out, "T": T}
for name in order.split(","):
    sync(); t0, c0 = time.perf_counter(), time.process_time()
    lam, Q = routes[name]()
    sync(); t1, c1 = time.perf_counter(), time.process_time()
    BQ, U0Q = B @ Q, u0 @ Q
    sync(); t2 = time.perf_counter()
    lam_ev = evidence.evidence_lam(evidence.spectrum_from_factors(lam.cpu(), BQ.cpu(), U0Q.cpu(), S, T * d_out))
    t3, c3 = time.perf_counter(), time.process_time()
    out[name] = {"eig_s": t1 - t0, "gemm_s": t2 - t1, "max_s": t3 - t2, "total_s": t3 - t0, "lam_ev": lam_ev,
                 "eig_cpu_s": c1 - c0, "total_cpu_s": c3 - c0, "threads": torch.get_num_threads(),
                 "zeros": int((lam == 0).sum()), "rank_fp64_tol": int((lam > n * 2.2e-16 * lam.max()).sum())}
    del Q, BQ, U0Q
print(json.dumps(out))
"""


def spectrum_timing(shapes: list[tuple[int, int, int]], reps: int, device: str, env: dict) -> list[dict]:
    """Evidence λ of one module, fp64 ``torch.linalg.eigh`` vs :func:`bmm_cli.spectrum.eigh` (plus the B̂Q / U0Q
    GEMMs and the maximisation both need), alternating which runs first, one subprocess per repetition."""
    rows = []
    for n, d_out, T in shapes:
        for rep in range(reps):
            order = "eigh_fp64,spectrum" if rep % 2 == 0 else "spectrum,eigh_fp64"
            print(f"[shapes_8b] spectrum n={n} d_out={d_out} T={T} rep {rep} ...", file=sys.stderr, flush=True)
            r = wait4_run([sys.executable, "-c", PY_SPECTRUM, str(n), str(d_out), str(T), device, order], env)
            if r["rc"] != 0:
                raise RuntimeError(f"spectrum n={n}: {r['stderr'][-800:]}")
            row = json.loads(r["stdout"].strip().splitlines()[-1])
            row.update(rep=rep, peak_rss=r["peak_rss"], load1_before=r["load1_before"],
                       load1_after=r["load1_after"])
            rows.append(row)
            a, b = row["eigh_fp64"], row["spectrum"]
            print(f"[shapes_8b]   eigh fp64 {a['total_s']:.1f} s, spectrum {b['total_s']:.1f} s "
                  f"({a['total_s'] / b['total_s']:.2f}x), λ {a['lam_ev']:.6g} vs {b['lam_ev']:.6g}",
                  file=sys.stderr, flush=True)
    return rows


def spectrum_table(rows: list[dict], device: str) -> str:
    lines = [(f"# Evidence λ per module: fp64 eigh vs bmm_cli.spectrum.eigh ({device}, "
             f"{rows[0]['eigh_fp64'].get('threads', '?') if rows else '?'} thread(s))"), "",
             ("Synthetic data-free statistics (rank-16 + noise task vectors, fp64), one module; seconds include the "
             "B̂Q/U0Q GEMMs and the λ maximisation both routes need. Alternating order per repetition."), "",
             ("| n (d_in) | d_out | T | rep | eigh fp64 s | spectrum s | speed-up | CPU-time speed-up "
              "| eig only speed-up | λ fp64 | λ spectrum | exact zeros | load |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["eigh_fp64"], r["spectrum"]
        lines.append(f"| {r['n']} | {r['d_out']} | {r['T']} | {r['rep']} | {a['total_s']:.1f} | {b['total_s']:.1f} | "
                     f"{a['total_s'] / b['total_s']:.2f} | {a.get('total_cpu_s', 0) / b.get('total_cpu_s', 1):.2f} | "
                     f"{a['eig_s'] / b['eig_s']:.2f} | {a['lam_ev']:.6g} | "
                     f"{b['lam_ev']:.6g} | {b['zeros']} | {r['load1_before']:.1f} |")
    return "\n".join(lines) + "\n"


def disk_cut_table(before: dict | None = None, after: dict | None = None, layers: int = FULL_LAYERS) -> str:
    """Work-directory bytes of a data-free merge (and a search) at Llama-3.1-8B shapes with task vectors stored in
    fp32 plus the gram-free stage, and with the default layout (task vectors recomputed from the inputs, no gram-free
    stage): from :func:`bmm_cli.budget.estimate`, and as measured by runs of this script (``before``: ``--store
    float32`` with the gram-free stage, ``after``: the default), projected to ``layers``."""
    from bmm_cli import budget

    mods = [budget.Module(f"model.layers.{i}.{k}.weight", o, n, i) for i in range(layers)
            for k, (o, n) in block_shapes().items()]
    P = sum(o * n for o, n in block_shapes().values()) * layers
    lines = ["# Work directory of a data-free 8B merge: task vectors stored vs recomputed", "",
             (f"From bmm_cli.budget.estimate at Llama-3.1-8B block shapes, {layers} layers (block tensors only; "
              "GB = 1e9). 'experts' = the T experts' own block bytes in bf16. 'stored' = `bmm taskvec --store "
              "float32` plus the gram-free stage (the layout of shapes_8b_cpu.md); 'recomputed' = the default: the "
              "stages recompute the task vectors from the checkpoints and the data-free statistics from the task "
              "vectors. The merge column is what a data-free `bmm merge` writes to the work directory (taskvec, "
              "TSV anchor, gram-free, evidence λ); the search adds the factor cache (fp32 factors by default, "
              "`--factor-dtype bfloat16` halves them)."), "",
             ("| T | experts GB | layout | taskvec | anchor | gram-free | merge | × experts | + search cache fp32 "
              "/ bf16 | search total (bf16 cache) | × experts |"),
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for T in (3, 5):
        exp = T * P * 2
        for name, kw in (("stored", {"taskvec_dtype": "float32", "free_gram_stage": True}), ("recomputed", {})):
            est = budget.estimate(mods, T, anchors=("tsv",), search=True, **kw)
            bf = budget.estimate(mods, T, anchors=("tsv",), search=True, factor_dtype="bfloat16", **kw)
            fa, fa16 = est.stages.pop("factors-tsv-free"), bf.stages["factors-tsv-free"]
            tv, an, gr = est.stages["taskvec"], est.stages["anchor-tsv"], est.stages.get("gram-free", 0)
            tot = est.work
            lines.append(f"| {T} | {exp / 1e9:.1f} | {name} | {tv / 1e9:.1f} | {an / 1e9:.1f} | {gr / 1e9:.1f} | "
                         f"{tot / 1e9:.1f} | {tot / exp:.2f} | {fa / 1e9:.1f} / {fa16 / 1e9:.1f} | "
                         f"{(tot + fa16) / 1e9:.1f} | {(tot + fa16) / exp:.2f} |")
    runs = [(n, r) for n, r in (("stored", before), ("recomputed", after)) if r]
    if runs:
        lines += ["", f"## Measured at L = 2 on this CPU, projected to {layers} layers", "",
                  ("Each stage the real `bmm` in its own subprocess (bench/shapes_8b.py; the solve with the TA "
                   "anchor and `--lam 0.03`); bytes the stage added to the work directory, per layer × "
                   f"{layers} + its other files; seconds per layer × {layers}; the peak RSS of the stage's process. "
                   "The merge row adds the stages a data-free `bmm merge` runs (the evidence λ, not run here, "
                   "writes one small JSON)."), "",
                  "| layout | T | stage | GB at 32 layers | h at 32 layers | peak RSS GiB | load |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for name, res in runs:
            for cfg in res["configs"]:
                T, L = cfg["experts"], cfg["layers"]
                exp32 = T * cfg["expert_bytes"] / L * layers
                rows = projected(cfg, layers)
                for r in rows:
                    lines.append(f"| {name} | {T} | {r['stage']} | {gb(r['bytes_32'])} | "
                                 f"{r['seconds_32'] / 3600:.2f} | {r['peak_rss'] / 2**30:.2f} | {r['load1']:.1f} |")
                merge = [r for r in rows if r["stage"] in ("taskvec", "anchor ta", "gram free", "solve")]
                tot = sum(r["bytes_32"] for r in merge)
                lines.append(f"| {name} | {T} | **merge: {' + '.join(r['stage'] for r in merge)}** | "
                             f"**{gb(tot)}** ({tot / exp32:.2f} × experts) | "
                             f"{sum(r['seconds_32'] for r in merge) / 3600:.2f} | "
                             f"{max(r['peak_rss'] for r in merge) / 2**30:.2f} | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def projected(cfg: dict, layers: int = FULL_LAYERS) -> list[dict]:
    """Per stage: bytes per layer (block shards / L), projected bytes at ``layers`` (non-block files once)."""
    L = cfg["layers"]
    rows = []
    for r in cfg["stages"]:
        per_layer = r["block_bytes"] / L
        rest = r["bytes"] - r["block_bytes"]
        rows.append({"stage": r["stage"], "bytes_per_layer": per_layer, "bytes_32": per_layer * layers + rest,
                     "seconds_per_layer": r["seconds"] / L, "seconds_32": r["seconds"] / L * layers,
                     "peak_rss": r["peak_rss"], "load1": r["load1_before"]})
    return rows


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def table(res: dict) -> str:
    lines = [f"# bmm stages at Llama-3.1-8B block shapes ({res['device']})", "",
             (f"Synthetic bf16 checkpoints (bench/shapes_8b.py): hidden 4096, intermediate 14336, GQA 32/8, "
             f"vocab {res['args']['vocab']}, task vectors rank 16 + 30 % noise at {res['args']['rel']:g} of the "
             f"weights. {res['machine']}. Load average (1 min) while measuring: {res['load_range']}. "
             "Bytes are what each stage adds to the work directory; per layer from the block shards; 32 layers "
             "= per layer × 32 + the stage's other files. GB = 1e9 bytes."), ""]
    for cfg in res["configs"]:
        L, T = cfg["layers"], cfg["experts"]
        lines += [(f"## L = {L}, T = {T} (inputs {gb(cfg['input_bytes'])} GB, one expert {gb(cfg['expert_bytes'])} "
                  f"GB, work dir {gb(cfg['work_bytes'])} GB)"), "",
                  "| stage | GB / layer | GB at 32 layers | s / layer | h at 32 layers | peak RSS GiB | load |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in projected(cfg):
            lines.append(f"| {r['stage']} | {gb(r['bytes_per_layer'])} | {gb(r['bytes_32'])} | "
                         f"{r['seconds_per_layer']:.1f} | {r['seconds_32'] / 3600:.2f} | "
                         f"{r['peak_rss'] / 2**30:.2f} | {r['load1']:.1f} |")
        pe = cfg.get("eigh_projection")
        if pe:
            lines.append(f"| evidence (projected, eigh probe) | 0 | 0 | {pe['seconds_per_layer']:.0f} | "
                         f"{pe['seconds_per_layer'] * 32 / 3600:.1f} | {pe['peak_rss_projected'] / 2**30:.2f} | |")
            lines.append(f"| search cache (projected, eigh probe) | {gb(pe['search_cache_bytes_per_layer'])} | "
                         f"{gb(pe['search_cache_bytes_per_layer'] * 32)} | {pe['seconds_per_layer']:.0f} | "
                         f"{pe['seconds_per_layer'] * 32 / 3600:.1f} | {pe['peak_rss_projected'] / 2**30:.2f} | |")
        pa = cfg.get("eigh_projection_after")
        if pa:
            lines.append(f"| evidence with bmm_cli.spectrum.eigh (projected) | 0 | 0 | {pa['seconds_per_layer']:.0f} | "
                         f"{pa['seconds_per_layer'] * 32 / 3600:.1f} | | |")
        tot = sum(r["bytes_32"] for r in projected(cfg)) + (pe["search_cache_bytes_per_layer"] * 32 if pe else 0)
        exp32 = (cfg["expert_bytes"] / L) * 32
        lines += ["", (f"Work dir at 32 layers, all stages above: {gb(tot)} GB = {tot / exp32:.1f}× one expert's "
                  f"block bytes at 32 layers ({gb(exp32)} GB)."), ""]
    if res.get("probe"):
        lines += ["## eigh probe (fp64, one module: eigh of Ĝ [n, n], then B̂Q and U0Q with d_out = n)", "",
                  "| n | eigh s | GEMMs s | evidence max s | peak RSS GiB | load |", "|---:|---:|---:|---:|---:|---:|"]
        for p in res["probe"]:
            lines.append(f"| {p['n']} | {p['eigh_s']:.1f} | {p['gemm_s']:.1f} | {p['lam_s']:.2f} | "
                         f"{p['peak_rss'] / 2**30:.2f} | {p['load1_before']:.1f} |")
        lines.append("")
    st = res["configs"][0].get("dtype_study") if res["configs"] else None
    if st:
        lines += ["## bf16 storage (layer 0, synthetic task vectors)", "",
                  "| tensor | bf16-exact | Sterbenz | nonzero | τ bf16 err | B̂ bf16 err | Ĝ bf16 err "
                  "| anchor bf16 err |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, r in st.items():
            lines.append(f"| {k} | {r['bf16_exact_fraction']:.4f} | {r['sterbenz_fraction']:.4f} | "
                         f"{r['nonzero_fraction']:.3f} | {r['taskvec_bf16_rel_err_max']:.1e} | "
                         f"{r.get('B_hat_bf16_rel_err', float('nan')):.1e} | "
                         f"{r.get('G_hat_bf16_rel_err', float('nan')):.1e} | "
                         f"{r.get('anchor_bf16_rel_err', float('nan')):.1e} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="2x3,2x5", help="LxT list, e.g. 2x3,2x5,4x3")
    ap.add_argument("--root", default="/tmp/bmm-shapes8b", help="scratch directory (deleted afterwards)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: every stage's --device and the eigh probe")
    ap.add_argument("--eigh", choices=("project", "run"), default="project")
    ap.add_argument("--probe-sizes", default="1024,2048,4096", help="empty: no probe")
    ap.add_argument("--skip", default=None, help="stages to leave out, e.g. 'anchor ties'")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rel", type=float, default=1e-3, help="task-vector RMS relative to the weights'")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--report", default=None, help="only rewrite --md from this JSON")
    ap.add_argument("--spectrum", default=None, help="only time the evidence eigen-decomposition: n:d_out:T,...")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--disk-cut", default=None, help="only write the storage-choice table (markdown) to this path")
    ap.add_argument("--spectrum-json", default=None, help="with --report: take the eigh probe from this JSON")
    ap.add_argument("--tiny", action="store_true", help="smoke test: hidden 256, intermediate 896, 4/1 heads")
    ap.add_argument("--store", default="none", help="bmm taskvec --store: none (recompute) or float32/bfloat16")
    ap.add_argument("--before", default=None, help="with --disk-cut: measured JSON of the stored-task-vector layout")
    ap.add_argument("--after", default=None, help="with --disk-cut: measured JSON of the default layout")
    args = ap.parse_args(argv)
    if args.report:
        res = json.loads(Path(args.report).read_text())
        if args.spectrum_json:  # the eigh rows from the spectrum timing (fp64 eigh = today's evidence)
            sp = json.loads(Path(args.spectrum_json).read_text())["rows"]
            res["probe"] = probe_rows(sp, "eigh_fp64")
            res["probe_after"] = probe_rows(sp, "spectrum")
            for cfg in res["configs"]:
                cfg["eigh_projection"] = project_eigh(res["probe"], cfg["experts"])
                cfg["eigh_projection_after"] = project_eigh(res["probe_after"], cfg["experts"])
        Path(args.md or Path(args.report).with_suffix(".md")).write_text(table(res))
        return 0
    if args.tiny:
        global HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM
        HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 256, 896, 4, 1, 64
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.disk_cut:
        runs = [json.loads(Path(f).read_text()) if f else None for f in (args.before, args.after)]
        Path(args.disk_cut).write_text(disk_cut_table(*runs))
        return 0
    if args.spectrum:
        shapes = [tuple(int(x) for x in sp.split(":")) for sp in args.spectrum.split(",")]
        rows = spectrum_timing(shapes, args.reps, args.device, env)
        res = {"device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows}
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        md = spectrum_table(rows, args.device)
        if args.md:
            Path(args.md).write_text(md)
        print(md)
        return 0
    res = {"device": args.device, "args": vars(args), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs", "configs": [], "probe": []}
    loads = []
    for spec in args.configs.split(","):
        L, T = (int(x) for x in spec.lower().split("x"))
        cfg = run_config(Path(args.root) / f"L{L}-T{T}", L, T, args)
        loads += [s["load1_before"] for s in cfg["stages"]]
        res["configs"].append(cfg)
        _dump(res, args, loads)
    if args.eigh == "project" and args.probe_sizes:
        res["probe"] = eigh_probe([int(x) for x in args.probe_sizes.split(",")], args.device, env)
        loads += [p["load1_before"] for p in res["probe"]]
        for cfg in res["configs"]:
            cfg["eigh_projection"] = project_eigh(res["probe"], cfg["experts"])
    _dump(res, args, loads)
    print(table(res))
    return 0


def _dump(res: dict, args, loads: list[float]) -> None:
    res["load_range"] = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "n/a"
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(table(res))


if __name__ == "__main__":
    raise SystemExit(main())

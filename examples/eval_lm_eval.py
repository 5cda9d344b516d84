#!/usr/bin/env python
"""A `bmm search` evaluation hook that wraps lm-evaluation-harness (lm_eval >= 0.4).

    bmm search ... --eval 'python examples/eval_lm_eval.py --model {model} --tasks gsm8k,arc_challenge \
                           --output {evaldir} --limit 200'

It runs

    lm_eval --model hf --model_args pretrained=<model>,dtype=bfloat16 --tasks T1,T2 --output_path <output> ...

with lm_eval's own stdout sent to stderr (so bmm's score line stays the last stdout line), reads the results file
lm_eval wrote, and prints one JSON line: ``score`` = the mean of one metric per task, plus every chosen metric
(and its stderr) as ``"<task>/<metric>,<filter>"`` metrics.

The results file (lm_eval/loggers/evaluation_tracker.py): with ``--output_path DIR`` lm_eval writes
``DIR/<model name with / : etc. replaced by __>/results_<ISO date>.json``; with a path ending in ``.json`` it writes
``<stem>_<ISO date>.json`` next to it. Inside, ``results[task]`` maps metric keys ``"<metric>,<filter>"`` (e.g.
``acc,none``, ``acc_norm,none``, ``exact_match,strict-match``) to values, with ``"<metric>_stderr,<filter>"``
beside them (a number, or "N/A"); group tasks (e.g. ``mmlu``) also appear under ``groups``;
``higher_is_better[task][metric]`` gives each metric's direction; ``config.limit`` is the per-task example cap.
Note that lm_eval only *warns* when it cannot save results, and exits 0: this script checks the file exists.

Metric per task: ``--metric TASK=METRIC,FILTER`` (repeatable), else the first present of acc_norm,none /
acc,none / exact_match,strict-match / exact_match,none / exact_match,flexible-extract / f1,none / mcc,none, else
the task's first higher-is-better metric. A lower-is-better metric (e.g. perplexity) is negated before averaging,
so a higher score is always better.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFERRED = [
    "acc_norm,none",
    "acc,none",
    "exact_match,strict-match",
    "exact_match,none",
    "exact_match,flexible-extract",
    "f1,none",
    "mcc,none",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lm_eval_command(explicit: str | None) -> list[str]:
    if explicit:
        return explicit.split()
    exe = shutil.which("lm_eval") or shutil.which("lm-eval")
    return [exe] if exe else [sys.executable, "-m", "lm_eval"]


def find_results(output: Path, since: float) -> Path:
    """The results file lm_eval wrote in this run (newest ``results_*.json`` / ``<stem>_*.json``)."""
    if output.suffix == ".json":
        candidates = list(output.parent.glob(f"{output.stem}_*.json"))
    else:
        candidates = list(output.rglob("results_*.json"))
    candidates = [p for p in candidates if p.stat().st_mtime >= since - 1]
    if not candidates:
        raise SystemExit(
            f"lm_eval wrote no results file under {output} (it only warns when saving fails: see its log above)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def pick_metric(task: str, row: dict, higher: dict, wanted: str | None) -> tuple[str, float, float | None, bool]:
    """(metric key, value, stderr or None, higher_is_better) for one task's results row."""
    numeric = {k: v for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr," not in k}
    if wanted is not None:
        if wanted not in numeric:
            raise SystemExit(f"task {task}: no metric {wanted!r}; it has {sorted(numeric)}")
        key = wanted
    else:
        key = next((k for k in PREFERRED if k in numeric), None)
        if key is None:
            key = next((k for k in numeric if higher.get(k.split(",")[0]) is True), None)
        if key is None:
            raise SystemExit(f"task {task}: no default metric among {sorted(numeric)}; "
                             f"pass --metric {task}=NAME,FILTER")
    name, _, filt = key.partition(",")
    stderr = row.get(f"{name}_stderr,{filt}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None
    return key, float(numeric[key]), stderr, higher.get(name, True) is not False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="merged model directory (Hugging Face layout)")
    ap.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    ap.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC,FILTER",
                    help="the metric to use for a task (repeatable), e.g. gsm8k=exact_match,flexible-extract")
    ap.add_argument("--output", default=None, help="lm_eval --output_path (default: a temp dir, removed afterwards)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model-args", default="", help="extra model_args, e.g. trust_remote_code=True,max_length=4096")
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--limit", default=None, help="lm_eval --limit (examples per task; quicker, noisier trials)")
    ap.add_argument("--num-fewshot", default=None)
    ap.add_argument("--device", default=None, help="lm_eval --device (default: lm_eval's own, cuda when present)")
    ap.add_argument("--lm-eval", default=None,
                    help="the lm_eval command (default: lm_eval on PATH, else python -m lm_eval)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more lm_eval arguments, passed as they are")
    args = ap.parse_args(argv)

    model = os.path.abspath(args.model)
    if "," in model or "=" in model:
        # lm_eval splits --model_args on "," and "=": such a path cannot be passed through it
        raise SystemExit(f"model path {model!r} contains ',' or '=', which lm_eval's --model_args cannot hold")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SystemExit("--tasks is empty")
    wanted: dict[str, str] = {}
    for spec in args.metric:
        task, sep, key = spec.partition("=")
        if not sep or not key:
            raise SystemExit(f"--metric {spec!r}: expected TASK=METRIC,FILTER (e.g. gsm8k=exact_match,strict-match)")
        wanted[task.strip()] = key.strip() if "," in key else f"{key.strip()},none"

    tmp = None
    output = Path(args.output) if args.output else Path(tmp := tempfile.mkdtemp(prefix="bmm-lm-eval-"))
    model_args = f"pretrained={model},dtype={args.dtype}" + (f",{args.model_args}" if args.model_args else "")
    cmd = lm_eval_command(args.lm_eval) + [
        "--model", "hf", "--model_args", model_args, "--tasks", ",".join(tasks),
        "--output_path", str(output), "--batch_size", str(args.batch_size),
    ]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if args.num_fewshot is not None:
        cmd += ["--num_fewshot", str(args.num_fewshot)]
    if args.device is not None:
        cmd += ["--device", args.device]
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    cmd += extra
    try:
        start = time.time()
        log("eval_lm_eval: " + " ".join(cmd))
        # lm_eval prints its results table on stdout: send it to stderr, the score line must be the last on stdout
        rc = subprocess.run(cmd, stdout=sys.stderr, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            log(f"eval_lm_eval: lm_eval exited with status {rc}")
            return rc if rc > 0 else 1
        path = find_results(output, start)
        data = json.loads(path.read_text(encoding="utf-8"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    results = {**data.get("groups", {}), **data.get("results", {})}
    higher_all = data.get("higher_is_better", {})
    metrics: dict[str, float] = {}
    values = []
    for task in tasks:
        if task not in results:
            raise SystemExit(f"task {task} is not in {path.name} (it has {sorted(results)})")
        key, value, stderr, higher = pick_metric(task, results[task], higher_all.get(task, {}), wanted.get(task))
        if not math.isfinite(value):
            raise SystemExit(f"task {task}: {key} is {value}")
        metrics[f"{task}/{key}"] = value
        if stderr is not None:
            metrics[f"{task}/{key.split(',')[0]}_stderr,{key.split(',', 1)[1]}"] = stderr
        if not higher:
            log(f"eval_lm_eval: {task}/{key} is lower-is-better: negated in the score")
        values.append(value if higher else -value)
    limit = (data.get("config") or {}).get("limit")
    if limit is not None:
        log(f"eval_lm_eval: note: limit={limit} examples per task: scores are estimates")
    score = sum(values) / len(values)
    log(f"eval_lm_eval: score {score:.4f} from {path}")
    print(json.dumps({"score": score, **metrics}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

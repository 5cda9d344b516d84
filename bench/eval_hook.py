"""Evaluation hook for `bmm search`: accuracy of a merged MiniLM encoder with every task's own head.

    python bench/eval_hook.py --model MERGED_DIR [--split val|test] [--limit N] [--tasks a,b] [--cache DIR]

    bmm search ... --eval "python bench/eval_hook.py --model {model}"

MERGED_DIR is a Hugging Face directory (single or sharded safetensors). With no config.json in it, the base's
config is used. Every task's head comes from <cache>/experts/<task>/head.safetensors; heads are never merged.
The last stdout line is one JSON object: {"score": mean accuracy over tasks, "acc/<task>": ..., ...}; with --per-row
also "correct/<task>": "0110…" (one digit per row, for paired standard errors). In-memory search scorer:
``score_in_memory`` below. Progress goes to stderr. Token ids are cached per (task, split, limit) under
<cache>/tokens as safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DEFAULT_VAL_LIMIT,
    MAX_LEN,
    TASK_LABELS,
    BenchError,
    MiniBert,
    base_model_path,
    cache_dir,
    data_dir,
    embed,
    load_head,
    load_split,
    parse_tasks,
    read_json,
    set_threads,
    sha256_file,
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_sha(cache: Path, task: str, split: str) -> str:
    path = data_dir(cache) / "manifest.json"
    if not path.exists():
        raise BenchError(f"missing {path}; build the data first: python bench/tasks.py --cache {cache}")
    return read_json(path)["tasks"][task]["files"][f"{task}.{split}.jsonl"]["sha256"]


def token_cache_path(cache: Path, task: str, split: str, limit: int | None, tok_sha: str) -> Path:
    key = f"{task}.{split}.{limit or 'all'}.len{MAX_LEN}.{_data_sha(cache, task, split)[:12]}.{tok_sha[:8]}"
    return cache / "tokens" / f"{key}.safetensors"


def load_tokens(cache: Path, task: str, split: str, limit: int | None) -> tuple[list, list[int]]:
    """(token id arrays, labels) of the first `limit` rows of a split; cached as flat ids + offsets."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    tok_file = base_model_path() / "tokenizer.json"
    path = token_cache_path(cache, task, split, limit, sha256_file(tok_file))
    if path.exists():
        t = load_file(str(path))
        ids, off = t["ids"].numpy(), t["offsets"].numpy()
        return [ids[off[i]:off[i + 1]] for i in range(len(off) - 1)], t["labels"].tolist()
    from bench.common import load_tokenizer, tokenize

    texts, labels = load_split(cache, task, split, limit)
    seqs = tokenize(load_tokenizer(), texts, MAX_LEN)
    off = np.zeros(len(seqs) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"ids": torch.from_numpy(flat), "offsets": torch.from_numpy(off),
               "labels": torch.tensor(labels, dtype=torch.int64)}, str(tmp))
    os.replace(tmp, path)
    return seqs, labels


def load_merged(model_dir: Path) -> MiniBert:
    """The merged encoder (plain-torch BERT forward); every encoder weight must be present."""
    if not model_dir.is_dir():
        raise BenchError(f"--model {model_dir} is not a directory")
    try:
        return MiniBert.from_dir(model_dir)
    except BenchError as e:
        raise BenchError(f"{model_dir}: {e}") from None


def evaluate(model_dir: Path, cache: Path, tasks: list[str], split: str, limit: int | None,
             batch_size: int = 64) -> dict:
    t0, c0 = time.time(), time.process_time()
    data = {t: load_tokens(cache, t, split, limit) for t in tasks}
    heads = {t: load_head(cache, t) for t in tasks}
    t_load = time.time()
    model = load_merged(model_dir)
    t_model = time.time()
    result = score_forward(model, data, heads, batch_size)
    t_end = time.time()
    result.update(seconds=round(t_end - t0, 2), cpu_seconds=round(time.process_time() - c0, 2),
                  examples_per_s=round(result["n_examples"] / max(t_end - t_model, 1e-9), 1))
    _log(f"data+heads {t_load - t0:.1f} s, model load {t_model - t_load:.1f} s, "
         f"inference {t_end - t_model:.1f} s ({result['examples_per_s']} ex/s)")
    return result


def score_forward(forward, data: dict, heads: dict, batch_size: int = 64) -> dict:
    """{"score": mean accuracy over tasks, "acc/<task>", "correct/<task>": one '0'/'1' per row (for paired
    standard errors between models on the same rows), "n_examples"} of an encoder forward and the tasks' heads."""
    import torch

    out: dict = {}
    n = 0
    for t, (seqs, labels) in data.items():
        emb = embed(forward, seqs, batch_size)
        w, b, _ = heads[t]
        hit = ((emb @ w.T.float() + b.float()).argmax(-1) == torch.as_tensor(labels)).tolist()
        out[f"acc/{t}"] = round(sum(hit) / len(hit), 4) if hit else float("nan")
        out[f"correct/{t}"] = "".join("1" if h else "0" for h in hit)
        n += len(labels)
        _log(f"{t}: acc {out[f'acc/{t}']:.4f} (n={len(labels)})")
    tasks = list(data)
    return {"score": round(sum(out[f"acc/{t}"] for t in tasks) / len(tasks), 5), **out, "n_examples": n}


_INMEM: dict = {}


def score_in_memory(model, tokenizer, trial) -> dict:
    """``bmm search --eval-py bench/eval_hook.py:score_in_memory``: the resident merged BertModel scored like
    ``--model`` would be (same rows, same heads). Tasks, split and rows from $BMM_BENCH_TASKS (default all),
    $BMM_BENCH_SPLIT (default val) and $BMM_BENCH_LIMIT (default the hook's); data is loaded once per process."""
    from bench.common import hf_forward

    tasks = parse_tasks(os.environ.get("BMM_BENCH_TASKS") or None)
    split = os.environ.get("BMM_BENCH_SPLIT", "val")
    limit = int(os.environ.get("BMM_BENCH_LIMIT", DEFAULT_VAL_LIMIT)) or None
    key = (tuple(tasks), split, limit)
    if key not in _INMEM:
        cache = cache_dir(None)
        _INMEM[key] = ({t: load_tokens(cache, t, split, limit) for t in tasks}, {t: load_head(cache, t) for t in tasks})
    data, heads = _INMEM[key]
    model.eval()
    res = score_forward(hf_forward(model), data, heads)
    return {k: v for k, v in res.items() if not k.startswith("correct/")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("BMM_MODEL"), help="merged HF directory (default $BMM_MODEL)")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--limit", type=int, default=DEFAULT_VAL_LIMIT,
                    help=f"rows per task (first rows of the sha1-sorted split; default {DEFAULT_VAL_LIMIT}; 0 = all)")
    ap.add_argument("--tasks", help="comma-separated subset of " + ",".join(TASK_LABELS))
    ap.add_argument("--cache", help="cache dir (default $BMM_BENCH_CACHE or ~/.cache/bmm-bench)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-row", action="store_true", help="also print correct/<task>: one 0/1 digit per row (for "
                    "paired standard errors between models)")
    a = ap.parse_args(argv)
    if not a.model:
        ap.error("--model is required (or set BMM_MODEL)")
    set_threads(a.threads)
    try:
        res = evaluate(Path(a.model), cache_dir(a.cache), parse_tasks(a.tasks), a.split, a.limit or None,
                       a.batch_size)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not a.per_row:
        res = {k: v for k, v in res.items() if not k.startswith("correct/")}
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation hook of the decoder benchmark: mean next-token loss of a (merged) causal LM on fixed windows.

    python3 bench/decoder_eval.py --model DIR [--split val|test] [--limit N] [--tokens L] [--domains a,b]
    bmm search ... --minimize --eval "python3 bench/decoder_eval.py --model {model} --split val"

The windows are the first N of each domain's split (one window per held-out file, bench/decoder_common.py), cut
to their first L tokens. The last stdout line is one JSON object: {"score": mean over domains of the mean window
loss (nats, lower is better), "loss/<domain>": ..., "windows/<domain>": [per-window losses, for paired standard
errors between models], ...}. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BenchError, set_threads  # noqa: E402
from bench.decoder_common import cache_dir, load_lm, load_windows, parse_domains, window_losses  # noqa: E402

DEFAULT_LIMIT = 16
DEFAULT_TOKENS = 32


def evaluate(model_dir: Path, cache: Path, domains: list[str], split: str, limit: int, tokens: int) -> dict:
    t0 = time.time()
    if not Path(model_dir).is_dir():
        raise BenchError(f"--model {model_dir} is not a directory")
    data = {d: load_windows(cache, d, split, limit)[:, :tokens] for d in domains}
    model = load_lm(Path(model_dir))
    out: dict = {}
    for d in domains:
        w = window_losses(model, data[d])
        out[f"loss/{d}"] = round(float(w.mean()), 5)
        out[f"windows/{d}"] = [round(v, 5) for v in w.tolist()]
        print(f"{d}: loss {out[f'loss/{d}']:.4f} (n={len(w)})", file=sys.stderr, flush=True)
    score = sum(out[f"loss/{d}"] for d in domains) / len(domains)
    return {"score": round(score, 5), **out, "split": split, "tokens": tokens, "limit": limit,
            "seconds": round(time.time() - t0, 2)}


_INMEM: dict = {}


def score_in_memory(model, tokenizer, trial) -> dict:
    """``bmm search --minimize --eval-py bench/decoder_eval.py:score_in_memory``: the resident merged model scored
    like ``--model`` would be, on the validation windows. Domains, windows and tokens from $DEC_EVAL_DOMAINS (default
    all), $DEC_EVAL_LIMIT and $DEC_EVAL_TOKENS (defaults as the CLI's), $DEC_EVAL_SPLIT (default val)."""
    domains = parse_domains(os.environ.get("DEC_EVAL_DOMAINS") or None)
    split = os.environ.get("DEC_EVAL_SPLIT", "val")
    limit = int(os.environ.get("DEC_EVAL_LIMIT", DEFAULT_LIMIT))
    tokens = int(os.environ.get("DEC_EVAL_TOKENS", DEFAULT_TOKENS))
    key = (tuple(domains), split, limit, tokens)
    if key not in _INMEM:
        cache = cache_dir(None)
        _INMEM[key] = {d: load_windows(cache, d, split, limit)[:, :tokens] for d in domains}
    model.eval()
    out = {f"loss/{d}": float(window_losses(model, w).mean()) for d, w in _INMEM[key].items()}
    return {"score": sum(out.values()) / len(out), **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("BMM_MODEL"), help="HF directory (default $BMM_MODEL)")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"windows per domain (default {DEFAULT_LIMIT})")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens per window (default {DEFAULT_TOKENS})")
    ap.add_argument("--domains", help="comma-separated subset of python,perl,man,rst")
    ap.add_argument("--cache", help="cache dir (default $BMM_DECODER_CACHE or ~/.cache/bmm-decoder)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a loaded machine)")
    a = ap.parse_args(argv)
    if not a.model:
        ap.error("--model is required (or set BMM_MODEL)")
    if a.limit < 2 or a.tokens < 2:
        ap.error("--limit and --tokens must be ≥ 2")
    set_threads(a.threads)
    try:
        res = evaluate(Path(a.model), cache_dir(a.cache), parse_domains(a.domains), a.split, a.limit, a.tokens)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An in-memory scorer for `bmm search --eval-py examples/eval_inmemory.py:score`: the next-token loss of the
resident causal LM on held-out texts (a JSONL file with a "text" field, or plain lines, named by $BMM_EVAL_DATA),
negated so that higher is better. No checkpoint is written per trial: bmm updates `model` in place.

    BMM_EVAL_DATA=val.jsonl bmm search -w W --anchor tsv --eval-py examples/eval_inmemory.py:score --out best/

The texts are tokenized once (module state lives as long as the worker), in batches of 8, at most 512 tokens.
"""

from __future__ import annotations

import json
import os

import torch

_CACHE: dict = {}


def _texts(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                out.append(obj["text"] if isinstance(obj, dict) else str(obj))
            except (json.JSONDecodeError, KeyError):
                out.append(line)
    if not out:
        raise ValueError(f"{path}: no texts")
    return out


@torch.no_grad()
def score(model, tokenizer, trial) -> dict:
    path = os.environ.get("BMM_EVAL_DATA")
    if not path:
        raise ValueError("set BMM_EVAL_DATA to a JSONL/text file of held-out texts")
    if path not in _CACHE:
        texts = _texts(path)
        _CACHE[path] = [tokenizer(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=512)
                        for i in range(0, len(texts), 8)]
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _CACHE[path]:
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    loss = total / max(count, 1)
    return {"score": -loss, "loss": loss, "tokens": count}

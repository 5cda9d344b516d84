#!/usr/bin/env python
"""A `bmm search` evaluation hook for a sequence classifier: accuracy on a JSONL file.

    bmm search ... --eval 'python examples/eval_classifier.py --model {model} --data dev.jsonl'

Each line of the JSONL file is an object with the text (``--text-field``, default "text"; optionally a second
segment, ``--text-pair-field``) and the label (``--label-field``, default "label": an integer id, or a label name
found in the model config's ``label2id``). The last line on stdout is a JSON object that bmm reads:

    {"score": 0.8125, "accuracy": 0.8125, "nll": 0.43, "n": 512}

Everything else (progress, warnings) goes to stderr. Exit status is non-zero on any error, which bmm records as
a failed trial with the error's last line as the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_examples(path: str, text_field: str, pair_field: str | None, label_field: str, limit: int | None):
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{lineno}: not JSON: {exc}")
            if text_field not in obj or label_field not in obj:
                raise SystemExit(f"{path}:{lineno}: needs fields {text_field!r} and {label_field!r}")
            rows.append((obj[text_field], obj.get(pair_field) if pair_field else None, obj[label_field]))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise SystemExit(f"{path}: no examples")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="merged model directory (Hugging Face layout)")
    ap.add_argument("--data", required=True, help="JSONL file with text and label fields")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--text-pair-field", default=None)
    ap.add_argument("--label-field", default="label")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="use the first N examples only")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    import transformers

    # transformers >= 4.56 calls it `dtype`; older releases `torch_dtype`
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForSequenceClassification.from_pretrained(args.model, use_safetensors=True, **{dtype_kw: dtype})
    model = model.to(device).eval()
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    rows = read_examples(args.data, args.text_field, args.text_pair_field, args.label_field, args.limit)

    def label_id(y) -> int:
        if isinstance(y, bool):
            raise SystemExit(f"label {y!r} is a boolean; use an integer id or a label name")
        if isinstance(y, int):
            return y
        if str(y) in label2id:
            return label2id[str(y)]
        raise SystemExit(f"label {y!r} is not an integer and not in the model's label2id {sorted(label2id)}")

    correct, nll, n = 0, 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(rows), args.batch_size):
            batch = rows[i : i + args.batch_size]
            texts = [r[0] for r in batch]
            pairs = [r[1] for r in batch] if args.text_pair_field else None
            enc = tok(texts, pairs, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            enc = enc.to(device)
            labels = torch.tensor([label_id(r[2]) for r in batch], device=device)
            if int(labels.max()) >= model.config.num_labels or int(labels.min()) < 0:
                raise SystemExit(f"a label id is outside 0..{model.config.num_labels - 1}")
            logits = model(**enc).logits.float()
            correct += int((logits.argmax(-1) == labels).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            n += len(batch)
    acc = correct / n
    mean_nll = nll / n
    log(f"eval_classifier: {n} examples, accuracy {acc:.4f}, nll {mean_nll:.4f}, "
        f"{time.perf_counter() - t0:.1f}s on {device}")
    if not math.isfinite(mean_nll):
        log("eval_classifier: the model produced non-finite logits")
        return 1
    print(json.dumps({"score": acc, "accuracy": acc, "nll": mean_nll, "n": n}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

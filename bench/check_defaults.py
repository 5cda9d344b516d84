"""Does the default merge beat its anchor on a MiniLM task set? Paired test-accuracy differences per row.

For each anchor (default ta, ties, tsv) and Gram kind (free, and data when the work dir has data Grams): the anchor
merge, ``bmm solve`` with the defaults (evidence λ per module, s = 1) and with the old constant (λ = 0.03,
s = 1.15), each scored on the same test rows with every task's own head; the difference to the anchor comes with
its paired standard error (same rows). Uses a finished work dir (taskvec, gram-free[, gram-data]) and a bench cache
(data + experts with heads), e.g. the one ``quickstart.sh`` made:

    python3 bench/check_defaults.py --work demo/bmm-tsv.bmm-work --cache ~/.cache/bmm-demo \
        --tasks wn_noun,gcide_subject,code_lang --out bench/results/defaults_check_demo.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embed, load_head  # noqa: E402
from eval_hook import load_merged, load_tokens  # noqa: E402


def correct(model_dir: Path, cache: Path, tasks: list[str], limit: int) -> torch.Tensor:
    """1/0 per test row (tasks concatenated in order): the merged encoder + each task's own head."""
    model = load_merged(model_dir)
    out = []
    for t in tasks:
        seqs, labels = load_tokens(cache, t, "test", limit)
        w, b, _ = load_head(cache, t)
        pred = (embed(model, seqs, 64) @ w.T.float() + b.float()).argmax(-1)
        out.append((pred == torch.as_tensor(labels)).float())
    return torch.cat(out)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).double()
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(len(d)))


def bmm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bmm_cli.cli", "-q", *args], check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--anchors", default="ta,ties,tsv")
    ap.add_argument("--grams", default="free")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--models", type=Path, default=None, help="where merged models go (default WORK/../check)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    tasks = a.tasks.split(",")
    models = a.models or a.work.parent / "check"
    rows: dict[str, dict] = {}
    results: dict[str, torch.Tensor] = {}
    for anc in a.anchors.split(","):
        adir = models / f"anchor-{anc}"
        bmm("anchor", "--work", str(a.work), "--method", anc, "--materialize", str(adir))
        results[f"anchor-{anc}"] = correct(adir, a.cache, tasks, a.limit)
        for g in a.grams.split(","):
            for tag, extra in (("", []), ("-const", ["--lam", "0.03", "--scale", "1.15"])):
                name = f"bmm-{g}-{anc}{tag}"
                bmm("solve", "--work", str(a.work), "--anchor", anc, "--gram", g, "--out", str(models / name), *extra)
                results[name] = correct(models / name, a.cache, tasks, a.limit)
                d, se = paired(results[name], results[f"anchor-{anc}"])
                rows[name] = {"acc": round(float(results[name].mean()), 4), "vs_anchor": round(d, 4),
                              "se": round(se, 4)}
                print(f"{name}: acc {rows[name]['acc']:.4f}, vs anchor-{anc} {d:+.4f} ± {se:.4f}", flush=True)
        rows[f"anchor-{anc}"] = {"acc": round(float(results[f"anchor-{anc}"].mean()), 4)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"tasks": tasks, "limit": a.limit, "work": str(a.work), "rows": rows}, indent=1)
                     + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

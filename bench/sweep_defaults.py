"""How `bmm solve`/`bmm merge` defaults (λ, s, ε) were chosen: a grid over one uniform λ and scale per BMM variant
on a benchmark's validation split (never test).

    python3 bench/sweep_defaults.py --work ~/.cache/bmm-bench/run/work          # MiniLM, after bench/run.sh
    python3 bench/sweep_defaults.py --bench decoder --work ~/.cache/bmm-decoder/run/work --anchor ta \\
        --grams free --lams evidence --scales 0.7,0.85,1.0,1.15 --out bench/results/decoder-scale.json

    python3 bench/sweep_defaults.py --work ~/.cache/bmm-bench/run/work --factor-check 1,10 --anchor ta,ties,tsv \\
        --split test --limit 400 --out bench/results/minilm-free-factor.json

``--factor-check`` compares data-free merges whose λ is the per-module evidence λ times each factor (the rule of
``bmm_cli.defaults.FREE_LAM_FACTOR``) with their anchor (λ → ∞), per anchor, on the same rows: paired standard errors
of the differences. It is how a factor is checked on a second benchmark (it may use the test split: nothing is
chosen by it). ``--lams evidence`` uses the per-module type-II ML λ (bmm_cli/evidence.py) instead of a uniform
λ, so the grid is over the scale alone. MiniLM: validation accuracy (higher is better); decoder: mean validation
next-token loss (lower is better). Writes the score of every grid point and the best per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, set_threads, write_json  # noqa: E402


def _scorer(a):
    """(score function model_dir -> float, higher_is_better)."""
    if a.bench == "minilm":
        from bench.common import cache_dir, parse_tasks
        from bench.eval_hook import evaluate

        tasks, cache = parse_tasks(a.tasks), cache_dir(a.cache)
        return (lambda m: evaluate(m, cache, tasks, "val", a.limit)["score"]), True
    from bench.decoder_common import cache_dir, parse_domains
    from bench.decoder_eval import evaluate

    domains, cache = parse_domains(a.tasks), cache_dir(a.cache)
    return (lambda m: evaluate(m, cache, domains, "val", a.limit, a.tokens)["score"]), False


def _paired(r1: dict, r2: dict, tasks: list[str]) -> dict:
    """Mean-accuracy difference r1 - r2 over ``tasks`` and its paired SE (same rows; tasks independent)."""
    diff, var = 0.0, 0.0
    for t in tasks:
        a = [int(c) for c in r1[f"correct/{t}"]]
        b = [int(c) for c in r2[f"correct/{t}"]]
        d = [x - y for x, y in zip(a, b)]
        mu = sum(d) / len(d)
        diff += mu
        var += sum((x - mu) ** 2 for x in d) / (len(d) - 1) / len(d)
    return {"diff": round(diff / len(tasks), 4), "se": round(var ** 0.5 / len(tasks), 4)}


def factor_check(a, factors: list[float]) -> dict:
    """MiniLM: per anchor, the anchor and the data-free merge with λ = factor x the evidence λ, scored on the same
    rows of ``a.split``; each row with its paired difference to the anchor and to factor 1."""
    from bench.common import cache_dir, parse_tasks
    from bench.eval_hook import evaluate
    from bmm_cli.default_params import module_lams, params_per_layer
    from bmm_cli.factor_cache import Merger
    from bmm_cli.params import Params

    tasks, cache, work = parse_tasks(a.tasks), cache_dir(a.cache), Path(a.work)
    anchors = [x for x in a.anchor.split(",") if x]
    res = {"bench": "minilm", "split": a.split, "limit": a.limit, "tasks": tasks, "factors": factors, "rows": {}}
    ev = module_lams(work, anchors, "free")
    with tempfile.TemporaryDirectory(prefix="bmm-factor-") as tmp:
        model = Path(tmp) / "m"
        for anc in anchors:
            merger = Merger(work, anc, "free", device="cpu")
            try:
                merger.write(Params.uniform(1, 1e12, 1.0, None), model)  # λ → ∞: the anchor itself
                scored = {"anchor": evaluate(model, cache, tasks, a.split, a.limit)}
                for f in factors:
                    lams = {k: v * f for k, v in ev[anc].items()}
                    merger.write(Params.from_flat(params_per_layer(work, lams, 1.0)), model)
                    scored[f"x{f:g}"] = evaluate(model, cache, tasks, a.split, a.limit)
            finally:
                merger.close()
            for name, r in scored.items():
                row = {"mean_acc": r["score"], **{f"acc/{t}": r[f"acc/{t}"] for t in tasks}}
                if name != "anchor":
                    row["vs_anchor"] = _paired(r, scored["anchor"], tasks)
                    if name != "x1" and "x1" in scored:
                        row["vs_x1"] = _paired(r, scored["x1"], tasks)
                res["rows"][f"{name}-{anc}"] = row
                print(f"{name}-{anc}: {json.dumps(row)}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", choices=("minilm", "decoder"), default="minilm")
    ap.add_argument("--work", required=True, help="bmm work dir with taskvec, gram-free, gram-data, anchor-<anchor>")
    ap.add_argument("--anchor", default="tsv")
    ap.add_argument("--grams", default="free,data,hybrid")
    ap.add_argument("--lams", default="0.001,0.003,0.01,0.03,0.1,0.3,1", help="uniform λ values, or 'evidence'")
    ap.add_argument("--scales", default="1.0,1.15,1.3")
    ap.add_argument("--eps", type=float, default=0.5, help="ε of the hybrid variant")
    ap.add_argument("--tasks", help="comma-separated subset of the benchmark's tasks / domains")
    ap.add_argument("--limit", type=int, default=None, help="validation rows (MiniLM, 150) / windows (decoder, 12)")
    ap.add_argument("--tokens", type=int, default=32, help="decoder: tokens per window")
    ap.add_argument("--cache", help="bench cache dir")
    ap.add_argument("--factor-check", help="MiniLM: comma-separated factors on the data-free evidence λ, each "
                    "compared with its anchor (--anchor may list several) on --split")
    ap.add_argument("--split", choices=("val", "test"), default="val", help="--factor-check only")
    ap.add_argument("--out", default=str(RESULTS_DIR / "defaults.json"))
    a = ap.parse_args(argv)
    a.limit = a.limit or (150 if a.bench == "minilm" else 12)
    set_threads(1 if a.bench == "decoder" else 2)
    if a.factor_check:
        if a.bench != "minilm":
            print("error: --factor-check is for --bench minilm (the decoder has bench/evidence_study.py)",
                  file=sys.stderr)
            return 1
        factors = [float(x) for x in a.factor_check.split(",") if x]
        write_json(Path(a.out), factor_check(a, factors))
        return 0
    from bmm_cli.default_params import module_lams, params_per_layer
    from bmm_cli.factor_cache import Merger
    from bmm_cli.params import Params

    score, higher = _scorer(a)
    scales = [float(x) for x in a.scales.split(",")]
    lams = ["evidence"] if a.lams == "evidence" else [float(x) for x in a.lams.split(",")]
    rows, best = [], {}
    with tempfile.TemporaryDirectory(prefix="bmm-sweep-") as tmp:
        for gram in a.grams.split(","):
            eps = a.eps if gram == "hybrid" else None
            ev = module_lams(Path(a.work), a.anchor, gram, eps=eps) if lams == ["evidence"] else None
            merger = Merger(Path(a.work), a.anchor, gram, device="cpu")
            try:
                for lam in lams:
                    for s in scales:
                        if ev is not None:
                            params = Params.from_flat(params_per_layer(Path(a.work), ev, s, eps))
                        else:
                            params = Params.uniform(1, lam, s, eps)
                        model = Path(tmp) / "m"
                        merger.write(params, model)
                        v = score(model)
                        rows.append({"gram": gram, "lam": lam, "scale": s, "val_score": v})
                        print(f"{gram:6s} lam={lam!s:<8} s={s:<5g} val {v:.4f}", flush=True)
            finally:
                merger.close()
            mine = [r for r in rows if r["gram"] == gram]
            best[gram] = (max if higher else min)(mine, key=lambda r: r["val_score"])
    res = {"bench": a.bench, "anchor": a.anchor, "tasks": a.tasks, "val_limit": a.limit, "eps": a.eps,
           "higher_is_better": higher, "grid": rows, "best": best}
    write_json(Path(a.out), res)
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())

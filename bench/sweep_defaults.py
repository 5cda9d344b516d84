"""How `bmm solve`/`bmm merge` defaults (λ, s, ε) were chosen: a grid over one uniform λ and scale per BMM variant
on the benchmark's validation split (never test), TSV anchor, the MiniLM experts of bench/run.sh.

    python3 bench/sweep_defaults.py --work ~/.cache/bmm-bench/run/work          # after bench/run.sh's stages

Writes bench/results/defaults.json: the validation accuracy of every grid point and the best per variant. The
defaults in bmm_cli/solve.py are a value that is good for every variant, not each variant's own argmax.
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

from bench.common import RESULTS_DIR, cache_dir, parse_tasks, set_threads, write_json  # noqa: E402
from bench.eval_hook import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="bmm work dir with taskvec, gram-free, gram-data, anchor-<anchor>")
    ap.add_argument("--anchor", default="tsv")
    ap.add_argument("--grams", default="free,data,hybrid")
    ap.add_argument("--lams", default="0.001,0.003,0.01,0.03,0.1,0.3,1")
    ap.add_argument("--scales", default="1.0,1.15,1.3")
    ap.add_argument("--eps", type=float, default=0.5, help="ε of the hybrid variant")
    ap.add_argument("--tasks", help="comma-separated subset (default: all five)")
    ap.add_argument("--limit", type=int, default=150, help="validation rows per task")
    ap.add_argument("--cache", help="bench cache dir (default $BMM_BENCH_CACHE or ~/.cache/bmm-bench)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "defaults.json"))
    a = ap.parse_args(argv)
    set_threads(2)
    from bmm_cli.solve import Merger, Params

    tasks, cache = parse_tasks(a.tasks), cache_dir(a.cache)
    lams = [float(x) for x in a.lams.split(",")]
    scales = [float(x) for x in a.scales.split(",")]
    rows, best = [], {}
    with tempfile.TemporaryDirectory(prefix="bmm-sweep-") as tmp:
        for gram in a.grams.split(","):
            merger = Merger(Path(a.work), a.anchor, gram, device="cpu")
            try:
                for lam in lams:
                    for s in scales:
                        params = Params.uniform(1, lam, s, a.eps if gram == "hybrid" else None)
                        model = Path(tmp) / "m"
                        merger.write(params, model)
                        r = evaluate(model, cache, tasks, "val", a.limit)
                        rows.append({"gram": gram, "lam": lam, "scale": s, "val_acc": r["score"]})
                        print(f"{gram:6s} lam={lam:<6g} s={s:<5g} val {r['score']:.4f}", flush=True)
            finally:
                merger.close()
            mine = [r for r in rows if r["gram"] == gram]
            best[gram] = max(mine, key=lambda r: r["val_acc"])
    res = {"anchor": a.anchor, "tasks": tasks, "val_limit": a.limit, "eps": a.eps, "grid": rows, "best": best}
    write_json(Path(a.out), res)
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())

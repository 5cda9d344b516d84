"""Calibration of posterior-sampling ensembles vs IID-noise ensembles (paper App. B, Fig. 4) on the MiniLM benchmark.

    python bench/calibration.py [--tasks a,b] [--sigmas 0.1 0.2 ...] [--samples 10] [--test-limit 400]

Builds its own work dir (taskvec, data-free Grams, TSV anchor) from the benchmark's experts, then for every noise
level ν of ``--sigmas`` writes two ensembles of ``--samples`` models with `bmm sample` on the default module (the
last block's mlp_out), default λ and s:

* IID: ``--iid ν`` (noise RMS ν·r, r = RMS of the base weight);
* posterior: ``--beta β`` with β chosen so that the posterior noise has the *same expected RMS* ν·r
  (``β = mean(1/(Λ+λ)) / ν²``): the two sweeps put the same noise energy into the module and differ only in its
  shape (the posterior puts it where the task vectors carry no evidence).

Every ensemble (and the MAP model) is scored on the validation rows and the test rows (mean of softmax, ECE with
20 bins, NLL; bmm_cli.ensemble_metrics). Per family the noise level with the lowest validation NLL is picked and the
picks are compared on test with paired standard errors across test rows (ECE: paired bootstrap). Writes
bench/results/calibration.json and calibration.png (accuracy vs ECE on test: the Pareto picture of Fig. 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    RESULTS_DIR,
    TASKS,
    base_model_path,
    cache_dir,
    expert_dir,
    parse_tasks,
    set_threads,
    write_json,
)
from bench.ensemble_hook import EnsembleEval, pooled  # noqa: E402

SIGMAS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)


def _log(msg: str) -> None:
    print(f"[calibration] {msg}", file=sys.stderr, flush=True)


def bmm(*args: str) -> dict:
    """Run a bmm command (JSON summary) in a subprocess, as a user would."""
    cmd = [sys.executable, "-m", "bmm_cli.cli", "-q", *args, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BMM_NO_PROGRESS": "1"})
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return json.loads(p.stdout)


def build_work(work: Path, cache: Path, tasks: list[str]) -> dict:
    t0 = time.time()
    experts = [str(expert_dir(cache, t) / "encoder") for t in tasks]
    bmm("taskvec", "--base", str(base_model_path()), "--experts", *experts, "--work", str(work))
    bmm("gram", "--work", str(work), "--kind", "free")
    bmm("anchor", "--work", str(work), "--method", "tsv")
    return {"seconds": round(time.time() - t0, 1)}


def draw(work: Path, out: Path, samples: int, noise: list[str]) -> dict:
    t0 = time.time()
    res = bmm("sample", "--work", str(work), "--anchor", "tsv", "--gram", "free", "--samples", str(samples),
              "--seed", "0", "--out", str(out), *noise)
    res["wall_seconds"] = round(time.time() - t0, 1)
    return res


def score(evals: dict, members: list[Path], tasks: list[str]) -> tuple[dict, dict]:
    """Metrics per split and the pooled test predictions."""
    from bmm_cli.ensemble_metrics import metrics

    out, test = {}, None
    for split, ev in evals.items():
        t0 = time.time()
        p, y = pooled(ev.predict(members), tasks)
        out[split] = {**metrics(p, y), "seconds": round(time.time() - t0, 1)}
        if split == "test":
            test = (p, y)
    return out, test


def compare(a, b, labels) -> dict:
    """a − b on the test rows: accuracy and NLL with paired SEs over rows, ECE with a paired bootstrap SE."""
    from bmm_cli.ensemble_metrics import ece, paired_bootstrap_ece, paired_se, row_correct, row_nll

    ca, cb, na, nb = row_correct(a, labels), row_correct(b, labels), row_nll(a, labels), row_nll(b, labels)
    return {"d_acc": float((ca - cb).mean()), "se_acc": paired_se(ca, cb),
            "d_nll": float((na - nb).mean()), "se_nll": paired_se(na, nb),
            "d_ece": ece(a, labels) - ece(b, labels), "se_ece": paired_bootstrap_ece(a, b, labels, reps=1000)}


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for fam, style in (("posterior", "o-"), ("iid", "s--")):
        pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["noise_rms_rel"])
        ax.plot([r["test"]["ece"] for r in pts], [r["test"]["acc"] for r in pts], style,
                label="posterior samples (BMM)" if fam == "posterior" else "MAP + IID noise")
        for r in pts:
            ax.annotate(f"{r['noise_rms_rel']:g}", (r["test"]["ece"], r["test"]["acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    m = next(r for r in rows if r["family"] == "map")
    ax.plot([m["test"]["ece"]], [m["test"]["acc"]], "k*", markersize=12, label="MAP (single model)")
    ax.set_xlabel("ECE (20 bins, test; lower is better)")
    ax.set_ylabel("accuracy (test)")
    ax.set_title(f"Ensembles of {meta['samples']} merged MiniLM models ({', '.join(meta['tasks'])}, "
                 f"{meta['test_limit']} test rows/task)\nannotated: noise RMS / base weight RMS", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def table(result: dict) -> str:
    """The README table (markdown) of a calibration.json."""
    lines = ["| ensemble | noise RMS / r | β | val NLL | test acc | test ECE | test NLL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    picked = set(result["picked"].values())
    for r in result["rows"]:
        name = {"map": "MAP (one model)"}.get(r["family"], f"{'posterior' if r['family'] == 'posterior' else 'IID'}")
        mark = " **(picked)**" if r["name"] in picked else ""
        beta = f"{r['beta']:.3g}" if r.get("beta") else "—"
        lines.append(f"| {name}{mark} | {r['noise_rms_rel']:g} | {beta} | {r['val']['nll']:.4f} "
                     f"| {r['test']['acc']:.4f} | {r['test']['ece']:.4f} | {r['test']['nll']:.4f} |")
    lines.append("")
    lines.append("| test, picked vs picked | Δ acc ± SE | Δ ECE ± SE | Δ NLL ± SE |")
    lines.append("|---|---:|---:|---:|")
    for k, c in result["comparisons_test"].items():
        lines.append(f"| {k.replace('_vs_', ' − ').replace('_', ' ')} | {c['d_acc']:+.4f} ± {c['se_acc']:.4f} "
                     f"| {c['d_ece']:+.4f} ± {c['se_ece']:.4f} | {c['d_nll']:+.4f} ± {c['se_nll']:.4f} |")
    lines += ["", "| test, posterior − IID at the same noise RMS | Δ acc ± SE | Δ ECE ± SE | Δ NLL ± SE |",
              "|---|---:|---:|---:|"]
    for nu, c in result["posterior_minus_iid_at_equal_noise_test"].items():
        lines.append(f"| {nu} | {c['d_acc']:+.4f} ± {c['se_acc']:.4f} | {c['d_ece']:+.4f} ± {c['se_ece']:.4f} "
                     f"| {c['d_nll']:+.4f} ± {c['se_nll']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS),
                    help="noise RMS relative to the base weight's, one IID and one posterior ensemble each")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--test-limit", type=int, default=400)
    ap.add_argument("--val-limit", type=int, default=150)
    ap.add_argument("--scratch", type=Path, default=None,
                    help="work dir and ensembles (default <cache>/calibration-<tasks hash>)")
    ap.add_argument("--cache", help="benchmark cache (default $BMM_BENCH_CACHE or ~/.cache/bmm-bench)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="print the README table of OUT/calibration.json, redraw "
                    "its plot and exit")
    a = ap.parse_args(argv)
    if a.table:
        res = json.loads((a.out / "calibration.json").read_text())
        plot(res["rows"], a.out / "calibration.png", res["meta"])
        print(table(res))
        return 0
    set_threads(a.threads)
    tasks, cache = parse_tasks(a.tasks), cache_dir(a.cache)
    if a.scratch is None:
        import hashlib

        a.scratch = cache / f"calibration-{hashlib.sha256(','.join(tasks).encode()).hexdigest()[:8]}"
    work, runs = a.scratch / "work", a.scratch / "runs"
    t_start = time.time()
    _log(f"work dir {work}")
    stages = build_work(work, cache, tasks)
    probe = draw(work, runs / "probe", 1, ["--beta", "1"])  # the MAP model and mean(1/(Λ+λ)) of the module
    nr1 = probe["modules"][0]["noise_rms_rel"]  # noise RMS at β = 1
    ref = runs / "probe" / "map"
    evals = {s: EnsembleEval(ref, cache, tasks, s, lim) for s, lim in (("val", a.val_limit), ("test", a.test_limit))}
    rows, preds = [], {}
    res, preds["map"] = score(evals, [ref], tasks)
    rows.append({"name": "map", "family": "map", "noise_rms_rel": 0.0, **res})
    _log(f"MAP: {res}")
    for nu in a.sigmas:
        for fam, noise in (("iid", ["--iid", f"{nu:g}"]), ("posterior", ["--beta", repr((nr1 / nu) ** 2)])):
            name = f"{fam}-{nu:g}"
            d = draw(work, runs / name, a.samples, noise)
            res, preds[name] = score(evals, [runs / name / s for s in d["samples"]], tasks)
            mod = d["modules"][0]
            rows.append({"name": name, "family": fam, "noise_rms_rel": round(mod["noise_rms_rel"], 6),
                         "beta": d.get("beta"), "beta_paper": mod.get("beta_paper"), "iid": d.get("iid"),
                         "sample_seconds": d["wall_seconds"], **res})
            _log(f"{name}: val {res['val']} test {res['test']}")
            for s in d["samples"]:
                shutil.rmtree(runs / name / s)  # 90 MB each; `bmm sample` redraws them in a second
    labels = preds["map"][1]
    pick = {fam: min((r for r in rows if r["family"] == fam), key=lambda r: r["val"]["nll"])
            for fam in ("posterior", "iid")}
    comparisons = {
        "posterior_vs_iid": compare(preds[pick["posterior"]["name"]][0], preds[pick["iid"]["name"]][0], labels),
        "posterior_vs_map": compare(preds[pick["posterior"]["name"]][0], preds["map"][0], labels),
        "iid_vs_map": compare(preds[pick["iid"]["name"]][0], preds["map"][0], labels),
    }
    same = {}  # posterior minus IID at every noise level (same noise energy), on test
    for nu in a.sigmas:
        same[f"{nu:g}"] = compare(preds[f"posterior-{nu:g}"][0], preds[f"iid-{nu:g}"][0], labels)
    a.out.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": {"tasks": tasks, "samples": a.samples, "test_limit": a.test_limit, "val_limit": a.val_limit,
                 "module": probe["modules"][0]["key"], "params": probe["params"], "anchor": "tsv", "gram": "free",
                 "noise_rms_at_beta_1": nr1, "machine": f"{platform.machine()} {platform.system()}, 2 CPU cores "
                 "shared with other jobs (times are indicative only)", "date": time.strftime("%Y-%m-%d"),
                 "stage_seconds": stages["seconds"], "total_seconds": round(time.time() - t_start, 1),
                 "selection": "per family, the noise level with the lowest validation NLL"},
        "rows": rows,
        "picked": {fam: r["name"] for fam, r in pick.items()},
        "comparisons_test": comparisons,
        "posterior_minus_iid_at_equal_noise_test": same,
    }
    write_json(a.out / "calibration.json", result)
    plot(rows, a.out / "calibration.png", result["meta"])
    _log(f"done in {result['meta']['total_seconds']} s: picked {result['picked']}; {comparisons['posterior_vs_iid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

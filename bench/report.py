"""Assemble bench/run.sh's raw scores into quality.json, quality.md (the README table) and quality.png."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROWS = [  # (name in scores/, label, kind)
    ("base", "base (pretrained encoder + each task's head)", "reference"),
    ("average", "weight average (TA with λ=1/T)", "reference"),
    ("anchor-pretrained", "pretrained anchor (= base)", "anchor"),
    ("anchor-ta", "Task Arithmetic (λ=0.3)", "anchor"),
    ("anchor-ties", "TIES (k=0.2)", "anchor"),
    ("anchor-dare", "DARE (p=0.9) + TA", "anchor"),
    ("anchor-tsv", "TSV-M", "anchor"),
    ("anchor-iso-c", "ISO-C", "anchor"),
    ("anchor-iso-cts", "ISO-CTS", "anchor"),
    ("anchor-wudi", "WUDI", "anchor"),
    ("anchor-regmean", "RegMean (data)", "anchor"),
    ("bmm-free", "BMM data-free, defaults (anchor TSV)", "bmm"),
    ("bmm-data", "BMM data-assisted, defaults", "bmm"),
    ("bmm-hybrid", "BMM hybrid ε=0.5, defaults", "bmm"),
    ("bmm-free-search", "BMM data-free + search", "bmm"),
    ("bmm-data-search", "BMM data-assisted + search", "bmm"),
    ("bmm-hybrid-search", "BMM hybrid + search", "bmm"),
]


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="")
    a = ap.parse_args()
    tasks = a.tasks.split(",")
    sd = a.run / "scores"
    expert = {}
    for t in tasks:
        s = _read(sd / f"expert-{t}.json")
        if s is None:
            raise SystemExit(f"missing expert score {sd}/expert-{t}.json: run bench/run.sh")
        expert[t] = s[f"acc/{t}"]
    rows = [{"name": "experts", "label": "experts, each on its own task (upper reference)", "kind": "reference",
             "acc": {t: expert[t] for t in tasks}, "mean": sum(expert.values()) / len(tasks), "normalized": 1.0}]
    for name, label, kind in ROWS:
        s = _read(sd / f"{name}.json")
        if s is None:
            continue
        acc = {t: s[f"acc/{t}"] for t in tasks}
        row = {"name": name, "label": label, "kind": kind, "acc": acc, "mean": sum(acc.values()) / len(tasks),
               "normalized": sum(acc[t] / expert[t] for t in tasks) / len(tasks)}
        sec = sd / f"{name}.seconds"
        if sec.exists():
            row["seconds"] = int(sec.read_text().strip())
        summ = _read(sd / f"{name.replace('bmm-', 'search-').replace('-search', '')}.summary.json") \
            if name.endswith("-search") else None
        if summ:
            row["search"] = {k: summ.get(k) for k in ("best_trial", "best_score", "first_score", "trials",
                                                       "trials_failed", "best_params", "mean_overhead_s")}
            s2 = sd / f"{name.replace('bmm-', 'search-').replace('-search', '')}.seconds"
            if s2.exists():
                row["seconds"] = int(s2.read_text().strip())
        rows.append(row)
    stages = []  # bmm's own cost per step: wall seconds and peak RSS (GNU time), on this machine
    for sec in sorted(sd.glob("*.seconds")):
        name = sec.name[: -len(".seconds")]
        rss = sd / f"{name}.maxrss_kb"
        stages.append({"step": name, "seconds": int(sec.read_text().strip()),
                       "peak_rss_mb": round(int(rss.read_text().split()[-1]) / 1024) if rss.exists() else None})
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"tasks": tasks, "config": a.config, "machine": f"{platform.machine()} {platform.system()}",
            "date": time.strftime("%Y-%m-%d")}
    (a.out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows, "steps": stages}, indent=2) + "\n")
    head = "| model | " + " | ".join(tasks) + " | mean acc | normalized |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        cells = " | ".join(f"{r['acc'][t]:.3f}" for t in tasks)
        bold = "**" if r["kind"] == "bmm" else ""
        lines.append(f"| {bold}{r['label']}{bold} | {cells} | {bold}{r['mean']:.3f}{bold} | {r['normalized']:.3f} |")
    md = "\n".join(lines) + "\n\n" + f"Config: {a.config}. Normalized = mean over tasks of merged / expert accuracy.\n"
    if stages:
        md += "\n| step | seconds | peak RSS (MB) |\n|---|---|---|\n" + "".join(
            f"| {st['step']} | {st['seconds']} | {st['peak_rss_mb'] if st['peak_rss_mb'] is not None else '–'} |\n"
            for st in stages)
    (a.out / "quality.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.2))
    colors = {"reference": "#999999", "anchor": "#6a9fd4", "bmm": "#d4703a"}
    names = [r["label"] for r in rows][::-1]
    vals = [r["mean"] for r in rows][::-1]
    ax.barh(names, vals, color=[colors[r["kind"]] for r in rows][::-1])
    for y, v in enumerate(vals):
        ax.text(v + 0.005, y, f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"mean test accuracy over {len(tasks)} tasks (all-MiniLM-L6-v2 experts)")
    ax.set_title("bmm benchmark: merging five MiniLM experts")
    fig.tight_layout()
    fig.savefig(a.out / "quality.png", dpi=110)
    print(md)


if __name__ == "__main__":
    main()

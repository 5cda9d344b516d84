"""Assemble bench/run.sh's raw scores into quality.json, quality.md (the README table) and quality.png."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import anchor_of, default_of  # noqa: E402

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
]
for _g, _gl in (("free", "data-free"), ("data", "data-assisted"), ("hybrid", "hybrid")):
    for _a, _al in (("ta", "TA"), ("ties", "TIES"), ("tsv", "TSV")):
        ROWS.append((f"bmm-{_g}-{_a}", f"BMM {_gl}, defaults (anchor {_al})", "bmm"))
    ROWS.append((f"bmm-{_g}-tsv-const", f"BMM {_gl}, old constants λ=0.03 s=1.15 (TSV)", "bmm"))
    ROWS.append((f"bmm-{_g}-tsv-search", f"BMM {_gl} + search (TSV)", "bmm"))
    ROWS.append((f"bmm-{_g}-tsv-search-rel", f"BMM {_gl} + search, --relative-lam (TSV)", "bmm"))
REFERENCE_FOR_GAIN = ("average", "anchor-ta", "anchor-ties", "anchor-dare", "anchor-tsv", "anchor-iso-c",
                      "anchor-iso-cts", "anchor-wudi", "anchor-regmean")


def paired_acc_se(s1: dict, s2: dict, tasks: list[str]) -> tuple[float, float] | None:
    """(difference, SE) of the mean-over-tasks accuracy of two score files on the same rows; None without rows."""
    diff, var = 0.0, 0.0
    for t in tasks:
        a, b = s1.get(f"correct/{t}"), s2.get(f"correct/{t}")
        if not a or not b or len(a) != len(b) or len(a) < 2:
            return None
        d = [int(x) - int(y) for x, y in zip(a, b)]
        n = len(d)
        mu = sum(d) / n
        diff += mu
        var += sum((x - mu) ** 2 for x in d) / (n - 1) / n
    k = len(tasks)
    return diff / k, var ** 0.5 / k


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
    raw: dict = {}
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
        summ = _read(sd / f"{name}.summary.json") if "-search" in name else None
        if summ:
            row["search"] = {k: summ.get(k) for k in ("best_trial", "best_score", "first_score", "trials",
                                                       "trials_failed", "best_params", "mean_overhead_s")}
        raw[name] = s
        rows.append(row)
    refs = [r for r in rows if r["name"] in REFERENCE_FOR_GAIN]
    best_ref = max(refs, key=lambda r: r["mean"])["name"] if refs else None
    for row in rows:
        name = row["name"]
        for key, other in (("vs_anchor", anchor_of(name)), ("vs_best_reference", best_ref),
                           ("vs_default", default_of(name))):
            if other and other != name and name in raw and other in raw:
                ds = paired_acc_se(raw[name], raw[other], tasks)
                if ds:
                    row[key] = {"row": other, "diff": round(ds[0], 4), "se": round(ds[1], 4)}
    stages = []  # bmm's own cost per step: wall seconds and peak RSS (GNU time), on this machine
    for sec in sorted(sd.glob("*.seconds")):
        name = sec.name[: -len(".seconds")]
        rss = sd / f"{name}.maxrss_kb"
        stages.append({"step": name, "seconds": int(sec.read_text().strip()),
                       "peak_rss_mb": round(int(rss.read_text().split()[-1]) / 1024) if rss.exists() else None})
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"tasks": tasks, "config": a.config, "best_reference": best_ref,
            "machine": f"{platform.machine()} {platform.system()}",
            "date": time.strftime("%Y-%m-%d")}
    (a.out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows, "steps": stages}, indent=2) + "\n")
    head = ("| model | " + " | ".join(tasks) + " | mean acc | normalized | vs anchor ± paired SE | "
            f"vs {best_ref} ± paired SE | vs default ± paired SE |")
    lines = [head, "|" + "---|" * (len(tasks) + 6)]

    def _vs(r: dict, key: str) -> str:
        v = r.get(key)
        return f"{v['diff']:+.3f} ± {v['se']:.3f}" if v else ""

    for r in rows:
        cells = " | ".join(f"{r['acc'][t]:.3f}" for t in tasks)
        bold = "**" if r["kind"] == "bmm" else ""
        lines.append(f"| {bold}{r['label']}{bold} | {cells} | {bold}{r['mean']:.3f}{bold} | {r['normalized']:.3f} | "
                     f"{_vs(r, 'vs_anchor')} | {_vs(r, 'vs_best_reference')} | {_vs(r, 'vs_default')} |")
    md = "\n".join(lines) + "\n\n" + (f"Config: {a.config}. Normalized = mean over tasks of merged / expert accuracy. "
                                      "Paired SE: the same test rows scored by both models (tasks independent).\n")
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

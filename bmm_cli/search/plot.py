"""The convergence plot a search writes next to its records (``convergence.png``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from bmm_cli.atomic import write_with
from bmm_cli.progress import info


def plot_convergence(records: Sequence[Mapping], path: str | os.PathLike, *, minimize: bool = False) -> Path | None:
    """Write a PNG: each trial's score vs its number, the best-so-far line, failed trials as x at the bottom.

    Returns the path, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        info("convergence plot skipped: matplotlib is not installed (from the bmm clone: pip install -e '.[plot]')")
        return None
    recs = sorted(records, key=lambda r: r["trial"])
    ok = [(r["trial"], r["score"]) for r in recs if r.get("status") == "ok" and r.get("score") is not None]
    failed = [r["trial"] for r in recs if r.get("status") != "ok"]
    fig = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if ok:
        xs, ys = zip(*ok)
        ax.scatter(xs, ys, s=14, color="tab:blue", alpha=0.7, label="trial score")
        best, bx, by = None, [], []
        for t, s in ok:
            best = s if best is None else (min(best, s) if minimize else max(best, s))
            bx.append(t)
            by.append(best)
        last = recs[-1]["trial"] if recs else bx[-1]
        ax.step(bx + [last], by + [by[-1]], where="post", color="tab:orange", lw=2, label="best so far")
        lo, hi = min(ys), max(ys)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1e-3)
        bottom = lo - 2 * pad
        ax.set_ylim(bottom - pad, hi + 2 * pad)
    else:
        bottom = 0.0
    if failed:
        ax.scatter(failed, [bottom] * len(failed), marker="x", color="tab:red", s=30, label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("score (lower is better)" if minimize else "score (higher is better)")
    ax.set_title(f"bmm search: {len(ok)} ok, {len(failed)} failed")
    ax.grid(alpha=0.3)
    if ok or failed:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


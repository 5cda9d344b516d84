"""The live view of a search: a rich table on a terminal, else one line per finished trial (stderr)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Mapping

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bmm_cli.progress import _enabled as _progress_enabled
from bmm_cli.progress import info, stderr

from .space import SearchSpace


def _fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.5g}"


def _param_summary(params: Mapping[str, float], space: SearchSpace) -> str:
    """Compact key parameters: s and the geometric-mean λ per block-group (averaged when there are many)."""
    try:
        scales, lams, eps = space.unpack(params)
    except (KeyError, TypeError, ValueError):
        return ""
    glam = [math.exp(sum(math.log(v) for v in d.values()) / len(d)) for d in lams]
    if len(scales) <= 3:
        s_txt = "/".join(f"{s:.3f}" for s in scales)
        l_txt = "/".join(f"{v:.1e}" for v in glam)
    else:
        s_txt = f"{sum(scales) / len(scales):.3f}(mean)"
        l_txt = f"{math.exp(sum(math.log(v) for v in glam) / len(glam)):.1e}(gmean)"
    txt = f"s={s_txt} λ={l_txt}"
    if eps is not None:
        txt += f" ε={eps:.2f}"
    return txt


class _View:
    """A rich Live table on stderr (a TTY, progress enabled), else one line per finished trial."""

    def __init__(self, space: SearchSpace, trials: int, minimize: bool):
        self.space, self.trials, self.minimize = space, trials, minimize
        self.live_mode = _progress_enabled() and stderr.is_terminal
        self.lock = threading.Lock()
        self.done: list[dict] = []
        self.running: dict[int, tuple[float, dict, int]] = {}
        self.best: dict | None = None
        self.live = None

    def start(self, history: list[dict], best: dict | None) -> None:
        with self.lock:
            self.done = list(history[-10:])
            self.best = best
        if self.live_mode:
            self.live = Live(self, console=stderr, refresh_per_second=2, transient=False)
            self.live.start()

    def started(self, n: int, params: dict, worker: int) -> None:
        with self.lock:
            self.running[n] = (time.monotonic(), params, worker)

    def finished(self, rec: dict, best: dict | None, n_done: int) -> None:
        with self.lock:
            self.running.pop(rec["trial"], None)
            self.done = (self.done + [rec])[-10:]
            self.best = best
        if self.live is None:
            status = rec["status"]
            line = f"trial {rec['trial']:>4} [{n_done}/{self.trials}] {status:<7} score {_fmt_score(rec['score'])}"
            line += f"  {_param_summary(rec['params'], self.space)}  {rec['seconds'].get('total', 0.0):.1f}s"
            if status != "ok":
                line += f"  ({rec['reason']})"
            if best is not None:
                line += f"  | best {_fmt_score(best['score'])} (trial {best['trial']})"
            info(line)
        else:
            self.live.refresh()

    def cancelled(self, n: int) -> None:
        with self.lock:
            self.running.pop(n, None)

    def stop(self) -> None:
        if self.live is not None:
            with contextlib.suppress(Exception):
                self.live.refresh()
                self.live.stop()
            self.live = None

    def __rich__(self):
        with self.lock:
            done, running, best = list(self.done), dict(self.running), self.best
        table = Table(title=f"bmm search ({'min' if self.minimize else 'max'}imize)", expand=False)
        for col in ("trial", "status", "score", "params", "solve", "write", "eval", "total"):
            table.add_column(col, justify="right" if col not in ("status", "params") else "left")
        for r in done:
            sec = r.get("seconds", {})
            is_best = best is not None and r["trial"] == best["trial"]
            style = "bold green" if is_best else ("red" if r["status"] != "ok" else "")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:40]}"
            table.add_row(
                str(r["trial"]), status, _fmt_score(r["score"]), _param_summary(r["params"], self.space),
                *(f"{sec[k]:.1f}" if isinstance(sec.get(k), (int, float)) else "-"
                  for k in ("solve", "write", "eval", "total")),
                style=style,
            )
        now = time.monotonic()
        for n, (t0, params, worker) in sorted(running.items()):
            table.add_row(str(n), f"running (w{worker})", "", _param_summary(params, self.space), "", "", "",
                          f"{now - t0:.0f}", style="cyan")
        line = Text("best: none yet") if best is None else Text(
            f"best: trial {best['trial']} score {_fmt_score(best['score'])}  "
            f"{_param_summary(best['params'], self.space)}", style="bold"
        )
        return Group(table, line)


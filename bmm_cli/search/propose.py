"""Proposals: replaying a recorded history into a fresh optimizer, and asking for the next points."""

from __future__ import annotations

import numpy as np

from bmm_cli.progress import info

from .state import _same_x


def _replay(opt, records: list[dict], *, changed: str | None = None) -> None:
    """Tell a fresh optimizer the recorded history so that it continues as the interrupted one would have.

    A sequential history is replayed ask-for-ask (an ``ask`` before each recorded asked point, then ``tell``):
    the optimizer's random state advances exactly as in the original run, so the next proposals match an
    uninterrupted run; each re-asked point is checked against the record. A history with parallel (constant
    liar) proposals cannot be reproduced that way: it is told in one batch. ``changed`` names the options that
    changed since the history was made (then a divergence is expected and not reported).
    """
    if all(r.get("source") in ("first", "ask") for r in records):
        diverged = False
        for r in records:
            if r.get("source") == "ask" and not diverged:
                again = opt.ask()
                if not _same_x(again, r["x"]):
                    diverged = True
                    if not changed:
                        info(f"search: note: replaying the history diverged at trial {r['trial']} (the same seed "
                             f"and --initial proposed another point: another library version?); continuing from "
                             f"the recorded points")
            if r.get("y") is not None:
                opt.tell(r["x"], r["y"])
    else:
        told = [(r["x"], r["y"]) for r in records if r.get("y") is not None]
        if told:
            xs, ys = zip(*told)
            opt.tell(list(xs), list(ys))


def _propose(opt, k: int, pending: list[list[float]]) -> tuple[list[list[float]], str]:
    """``k`` new points. With nothing in flight and k == 1, a plain ``ask`` (the deterministic sequential path).
    Otherwise constant liar (cl_min, as ``ask(n_points=k, strategy="cl_min")``), extended to the points still in
    flight: a copy of the optimizer is told the lie at those points too, so a freed worker never gets a point
    next to one already running."""
    if k <= 0:
        return [], "ask"
    if not pending and k == 1:
        return [opt.ask()], "ask"
    if not pending:
        return [list(x) for x in opt.ask(n_points=k, strategy="cl_min")], "ask-cl"
    tmp = opt.copy(random_state=opt.rng.randint(0, np.iinfo(np.int32).max))
    lie = float(np.min(opt.yi)) if opt.yi else 0.0
    tmp.tell([list(p) for p in pending], [lie] * len(pending))
    xs = []
    for i in range(k):
        x = tmp.ask()
        xs.append(list(x))
        if i + 1 < k:
            tmp.tell(list(x), lie)
    return xs, "ask-cl"

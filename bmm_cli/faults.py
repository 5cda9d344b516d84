"""Fault injection for tests: ``BMM_FAULT=<point>:<n>`` SIGKILLs the process at the n-th hit of ``point``.

Points: ``<stage>.shard`` (after a stage shard is durably written, before the manifest records it),
``write.shard`` (after an output model shard), ``search.trial`` (after a trial's record). Unset = no cost.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def hit(point: str) -> None:
    spec = os.environ.get("BMM_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, n = item.partition(":")
        if name == point:
            _counts[point] = _counts.get(point, 0) + 1
            if _counts[point] >= int(n or 1):
                os.kill(os.getpid(), signal.SIGKILL)

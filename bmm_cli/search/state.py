"""A search's state on disk, besides the loop: its lock, the records file, archiving, leftover hooks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bmm_cli.atomic import fsync_dir, read_jsonl
from bmm_cli.errors import StateError
from bmm_cli.hooks import kill_process_group


@contextlib.contextmanager
def _flock(path: Path, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StateError(f"another bmm search is running on {what} (lock {path}); wait for it or stop it") from None
        yield
    finally:
        os.close(fd)


def kill_leftover_hooks(run_id: str, grace: float, trial: int | None = None) -> int:
    """Kill hooks of this search (found by BMM_RUN_ID, and BMM_TRIAL when given, in their environment) that a
    killed earlier run or a dead worker left running on this machine."""
    proc = Path("/proc")
    if not proc.is_dir():
        return 0
    needles = [f"BMM_RUN_ID={run_id}".encode()] + ([] if trial is None else [f"BMM_TRIAL={trial}".encode()])
    own = os.getpgid(0)
    groups = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            if all(n in env for n in needles):
                pg = os.getpgid(int(entry.name))
                if pg != own:
                    groups.add(pg)
        except (OSError, ValueError):
            continue
    for pg in groups:
        kill_process_group(pg, grace)
    return len(groups)


def _normalize(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _same_x(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(float(u), float(v), rel_tol=1e-9, abs_tol=1e-12) for u, v in zip(a, b))


def _archive(sdir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    k = 0
    while (sdir / f"trials.{stamp}{'' if k == 0 else f'-{k}'}.jsonl").exists():
        k += 1
    stamp = stamp if k == 0 else f"{stamp}-{k}"
    for name in ("trials.jsonl", "best.json", "search.json", "summary.json"):
        p = sdir / name
        if p.exists():
            stem, dot, ext = name.partition(".")
            os.replace(p, sdir / f"{stem}.{stamp}.{ext}")
    with contextlib.suppress(FileNotFoundError):
        (sdir / "convergence.png").unlink()
    fsync_dir(sdir)
    return stamp


def _is_better(score: float, best: Mapping | None, minimize: bool) -> bool:
    if best is None:
        return True
    return score < best["score"] if minimize else score > best["score"]


def _load_records(path: Path) -> list[dict]:
    seen: set[int] = set()
    out = []
    for r in read_jsonl(path):
        n = r.get("trial")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n in seen:
            continue
        if not isinstance(r.get("x"), list) or r.get("status") not in ("ok", "failed", "timeout"):
            continue
        seen.add(n)
        out.append(r)
    return out


def _fields(workdir: Path, sdir: Path, trial_dir: Path, n: int) -> dict[str, str]:
    return {
        "model": str(trial_dir / f"trial-{n:04d}"),
        "trial": str(n),
        "workdir": str(workdir),
        "evaldir": str(sdir / "eval" / f"trial-{n:04d}"),
    }


def _describe_objective(obj: Mapping) -> str:
    return ", ".join(f"--{k} {v!r}" if v is not None else f"no --{k}" for k, v in obj.items()) or "none"

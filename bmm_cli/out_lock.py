"""An exclusive lock on an output path, so that two runs never write the same ``--out`` at once.

The lock is an ``flock`` on ``.<name>.bmm-lock`` next to the output (``<out>/..``): the kernel drops it when its
holder dies (SIGKILL included), and the holder removes the file when it is done, so a finished or refused run
leaves nothing behind. A second run that finds the lock held stops with exit code 3 before writing anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import InputError, StateError

_HELD: set[Path] = set()  # lock files this process holds (a merge's search takes its --out's lock again)


def lock_path(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.bmm-lock"


def _holder(path: Path) -> str:
    try:
        d = json.loads(path.read_text() or "{}")
        return f"pid {d['pid']} on {d['host']} since {d['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of output ``out`` for the ``with`` body; StateError (exit 3) when another process holds it.
    Directories made here for the lock file are removed again when they are left empty."""
    path = lock_path(Path(out))
    if path in _HELD:
        yield
        return
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create its parent directory ({exc.strerror})") from None
    try:
        fd = _acquire(path, out)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
            _HELD.add(path)
            yield
        finally:
            _HELD.discard(path)
            with contextlib.suppress(OSError):
                path.unlink()  # still holding the flock: a waiter that opened this file sees it is gone and retries
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            for d in created:  # deepest first; stops at the first one that is not empty
                d.rmdir()


def _acquire(path: Path, out) -> int:
    while True:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StateError(f"--out {out} is being written by another bmm process ({_holder(path)}); wait for it "
                             "to finish or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our flock: take the new one

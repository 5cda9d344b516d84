"""Work-directory stages: a sub-directory per stage with shards and a ``stage.json`` manifest, plus the lock.

A stage is identified by its inputs' fingerprints and its options. Rerunning with the same ones skips the shards
already done (a shard counts as done only when the manifest lists it and the file has the recorded size); with
different ones the stage refuses (``StateError``) unless ``force`` wipes it. Shards and the manifest are written
atomically, shard first, so a kill at any point leaves a consistent stage.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from . import atomic, faults
from .errors import InputError, StateError
from .progress import info
from .store import ShardReader, read_header, save_tensors

MANIFEST = "stage.json"
FORMAT_VERSION = 1


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    def __init__(self, work: Path, name: str, *, inputs: dict, options: dict, force: bool = False,
                 command: str = ""):
        self.work = Path(work)
        self.name = name
        self.dir = self.work / name
        self.path = self.dir / MANIFEST
        self.inputs = inputs
        self.options = options
        ident = {"inputs": inputs, "options": options, "format": FORMAT_VERSION}
        self.id = digest(ident)
        old = self._load()
        if old is not None and old.get("id") != self.id:
            if not force:
                what = _what_changed(old, inputs, options)
                raise StateError(
                    f"{self.path}: stage '{name}' was made with different {what}; "
                    f"rerun with --force to redo it, or use another --work directory"
                )
            shutil.rmtree(self.dir)
            old = None
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temps(self.dir)  # half-written temp files of a killed run (never final names)
        if old is None:
            self.manifest = {"stage": name, "id": self.id, "format": FORMAT_VERSION, "inputs": inputs,
                             "options": options, "shards": {}, "complete": False, "command": command,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._save()
        else:
            self.manifest = old

    # -- manifest ------------------------------------------------------------------------------------------------
    def _load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError
            return data
        except ValueError:
            raise StateError(f"{self.path}: unreadable manifest; delete {self.dir} (or pass --force) to redo the stage")

    def _save(self) -> None:
        atomic.write_json(self.path, self.manifest)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def done(self, shard: str) -> bool:
        """Recorded in the manifest, present with the recorded size and a sound header (a damaged shard is redone)."""
        rec = self.manifest["shards"].get(shard)
        if rec is None:
            return False
        p = self.dir / f"{shard}.safetensors"
        if not (p.is_file() and p.stat().st_size == rec.get("bytes")):
            return False
        try:
            read_header(p)
        except InputError:
            return False
        return True

    def shard_path(self, shard: str) -> Path:
        return self.dir / f"{shard}.safetensors"

    def write(self, shard: str, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
        size = save_tensors(self.shard_path(shard), tensors, metadata={"bmm": f"{self.name}/{shard}"})
        faults.hit(f"{self.name.split('-')[0]}.shard")
        self.manifest["shards"][shard] = {"bytes": size, **(info or {})}
        self.manifest["complete"] = False
        self._save()

    def read(self, shard: str) -> ShardReader:
        if not self.done(shard):
            raise StateError(f"{self.dir}: shard {shard} is missing or incomplete; "
                             f"rerun `bmm {self.name.split('-')[0]}`")
        return ShardReader(self.shard_path(shard))

    def finish(self, **summary: Any) -> None:
        self.manifest["complete"] = True
        self.manifest["summary"] = summary
        self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save()

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value
        self._save()


def load_manifest(work: Path, name: str, *, need: str) -> dict:
    """The manifest of a finished stage another stage depends on; a clear error naming the command to run."""
    path = Path(work) / name / MANIFEST
    if not path.exists():
        raise InputError(f"{path} not found: run `{need}` first (or `bmm merge`, which runs every stage)")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        raise StateError(f"{path}: unreadable manifest; delete {path.parent} and rerun `{need}`") from None
    if not data.get("complete"):
        raise InputError(f"{path}: stage '{name}' did not finish; rerun `{need}` (it resumes)")
    return data


def _what_changed(old: dict, inputs: dict, options: dict) -> str:
    parts = []
    if old.get("inputs") != inputs:
        parts.append("inputs")
    if old.get("options") != options:
        diff = sorted(k for k in set(options) | set(old.get("options", {}))
                      if options.get(k) != old.get("options", {}).get(k))
        parts.append("options (" + ", ".join(diff) + ")" if diff else "options")
    if not parts:
        parts.append("format version")
    return " and ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# one process per work directory


@contextlib.contextmanager
def work_lock(work: Path, *, create: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``<work>/.bmm.lock``.

    The kernel drops the lock when its process dies (SIGKILL included), so a lock file left by a killed run is stale
    by construction: the next run takes it over and says so. A live holder makes the second process refuse.

    ``create=False`` (stages that read earlier ones): a missing ``work`` is an error, not a new empty directory.
    Directories this call created are removed again if the run left nothing in them but the lock (a refused run
    leaves nothing behind).
    """
    work = Path(work)
    if not work.is_dir():
        if work.exists():
            raise InputError(f"--work {work}: is a file, not a work directory")
        if not create:
            raise InputError(f"--work {work}: no such work directory; run `bmm taskvec` (or `bmm merge`) to make "
                             "one, or check the path")
    created = [p for p in (work, *work.parents) if not p.exists()]
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--work {work}: cannot create ({exc.strerror})") from None
    try:
        with _locked(work, drop_unused=bool(created)):
            yield
    finally:
        with contextlib.suppress(OSError):
            for d in created:  # deepest first; stops at the first one that is not empty (the rest are its parents)
                d.rmdir()


@contextlib.contextmanager
def _locked(work: Path, *, drop_unused: bool) -> Iterator[None]:
    """Hold the flock; ``drop_unused``: unlink the lock file (still holding it) if nothing else is in ``work``."""
    path = work / ".bmm.lock"
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(fd)
            raise StateError(
                f"{work} is in use by another bmm process ({holder}); wait for it to finish or stop it"
            ) from None
        previous = _read_holder(fd)
        if previous != "unknown holder":
            info(f"bmm: took over a stale lock on {work} ({previous}, no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            if drop_unused:
                with contextlib.suppress(OSError):
                    if [p.name for p in work.iterdir()] == [path.name]:
                        path.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        if not raw:
            return "unknown holder"
        d = json.loads(raw.decode())
        return f"pid {d.get('pid')} on {d.get('host')} since {d.get('since')}"
    except (OSError, ValueError):
        return "unknown holder"

"""Atomic file writes: temp file in the same directory, fsync, rename, fsync the directory.

No partial file is ever visible under a final name: a reader sees the old complete file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import BmmError

TEMP_GLOB = ".*.tmp"  # what ``atomic_path`` names its temp files: ``.<final name>.<random>.tmp``
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    """The process umask, read without changing it where the kernel tells it (Linux >= 4.7: another thread
    creating a file meanwhile would otherwise get mode 0666)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors ``SafetensorError`` (its Rust I/O error says ``os error N``)."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        m = re.search(r"\(os error (\d+)\)", str(exc))
        return int(m.group(1)) if m else None
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success it is fsynced and renamed onto ``final``.

    The file gets the mode a plain ``open(final, "w")`` would give it (0666 & ~umask), not mkstemp's 0600.

    On any exception (disk full included) the temp file is removed and ``final`` is left untouched; a full disk
    (ENOSPC, EDQUOT) becomes a one-line error naming the file and the fix.
    """
    final = Path(final)
    tmp_path: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            # mkstemp makes 0600 (and a writer may have replaced the file with its own temp file): give it the
            # mode a plain open() would, 0666 & ~umask
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        err = _errno_of(exc)
        if err in _NO_SPACE:
            raise disk_full(final, err) from exc
        raise


class DiskFullError(BmmError, OSError):
    """A write failed for lack of space: a one-line BmmError for the CLI (exit 1: neither bad input nor numerics)
    and still an OSError with its errno for library callers."""

    def __init__(self, message: str, err: int = errno.ENOSPC):
        BmmError.__init__(self, message, exit_code=1)
        self.errno = err
        self.strerror = os.strerror(err)


def disk_full(path: Path, err: int = errno.ENOSPC) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{path}: no space left on the device while writing it ({free}); nothing was left "
                         "half-written: free some space (or point --out/--work at a larger disk) and rerun the same "
                         "command, which keeps the finished shards", err)


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Delete temp files that a killed process left in ``directory`` (never final names; call it only while no
    other process can be writing there, e.g. under the work lock). Returns the names removed."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.glob(TEMP_GLOB):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | os.PathLike, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_with(final: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically create ``final`` with a function that writes to a given path (e.g. safetensors.save_file)."""
    with atomic_path(final) as tmp:
        writer(tmp)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a JSON record) durably.

    A single ``write`` of a line with O_APPEND, then fsync. A crash can leave at most a torn last line,
    which readers skip (see ``read_jsonl``); complete earlier lines are never touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        # a torn tail from an earlier crash would glue onto this record: start on a fresh line
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise disk_full(path, exc.errno) from exc
        raise
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read complete JSON lines; a torn or garbled line (from a crash mid-append) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out




# ---------------------------------------------------------------------------------------------------------------
# directory swaps: a directory (a whole model) replaced so that readers see the old one or the new one, never a mix

import ctypes  # noqa: E402
import uuid  # noqa: E402


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(src: Path, dst: Path) -> None:
    """Make ``dst`` hold what ``src`` holds; ``dst`` is never partial.

    ``src`` is renamed (or, across file systems, copied and fsynced) into a temp sibling of ``dst``, then swapped
    in: with an atomic exchange where the kernel has one, else old ``dst`` is renamed aside and the new one renamed
    into place (a crash between the two renames leaves the old one aside, which the next run restores).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.bmm-new-{tag}"
    try:
        os.rename(src, tmp)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        try:
            shutil.copytree(src, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync_tree(tmp)
    if dst.exists():
        if _exchange(tmp, dst):
            fsync_dir(dst.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = dst.parent / f".{dst.name}.bmm-old-{tag}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    if src.exists():  # the copy case
        shutil.rmtree(src, ignore_errors=True)


def recover_dir_swap(dst: Path) -> None:
    """Undo what a crash inside :func:`replace_dir` left next to ``dst``."""
    olds = sorted(dst.parent.glob(f".{dst.name}.bmm-old-*"))
    if not dst.exists() and olds:
        os.rename(olds[-1], dst)  # the crash fell between the two renames: the old best comes back
        olds = olds[:-1]
        fsync_dir(dst.parent)
    for p in olds + sorted(dst.parent.glob(f".{dst.name}.bmm-new-*")):
        shutil.rmtree(p, ignore_errors=True)

"""rich progress bars on stderr; results go to stdout, so pipes stay clean."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

stderr = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _enabled() -> bool:
    return not _quiet and os.environ.get("BMM_NO_PROGRESS", "") in ("", "0")


def progress_shown() -> bool:
    """Whether bars are drawn live (enabled and stderr is a terminal); otherwise callers may log lines instead."""
    return _enabled() and stderr.is_terminal


@contextlib.contextmanager
def progress(*extra: ProgressColumn) -> Iterator[Progress]:
    """A Progress on stderr (disabled with --quiet or BMM_NO_PROGRESS=1); ``extra`` columns go after the bar's
    count, e.g. ``TextColumn("loss {task.fields[loss]}")`` with ``add_task(..., loss="-")``."""
    p = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
        disable=not _enabled(),
    )
    with p:
        yield p


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (none when there is nothing to do: a reused stage draws no 0/0 bar)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if total == 0:
        yield from items
        return
    with progress() as p:
        task = p.add_task(description, total=total)
        for item in items:
            yield item
            p.advance(task)


def info(message: str) -> None:
    """A status line on stderr (never stdout)."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)

"""The trial runners by name: ``local`` threads (:class:`~.local.LocalRunner`) or ``ray`` actors
(:class:`~.ray.RayRunner`, which imports Ray itself only when it starts)."""

from __future__ import annotations

from bmm_cli.errors import InputError

from .local import LocalRunner, Runner
from .ray import RayRunner

RUNNERS: dict[str, type[Runner]] = {"local": LocalRunner, "ray": RayRunner}


def runner_class(kind: str) -> type[Runner]:
    """The runner backend named ``kind`` in :data:`RUNNERS`."""
    try:
        return RUNNERS[kind]
    except KeyError:
        raise InputError(f"unknown trial runner {kind!r}; choose one of: {', '.join(RUNNERS)}") from None

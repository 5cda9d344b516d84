"""The trial runners: how the driver hands trials to workers. Here the interface and the local backend (threads in
the ``bmm search`` process sharing one :class:`~.trial.TrialWorker`); :mod:`.ray` is the cluster backend.

A runner has ``slots`` workers. :meth:`Runner.start` hands one trial to a free slot and returns at once; the
outcome comes back through the ``post`` callback given to :meth:`Runner.open`, exactly once per started trial.
:meth:`Runner.keep` makes a finished trial the kept best (a directory swap at ``dest``), :meth:`Runner.discard`
drops a finished trial's model. The driver (:mod:`.driver`) owns everything else: proposals, records, resume.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Mapping

from bmm_cli.errors import InputError

from .trial import Outcome, TrialWorker

Post = Callable[[Outcome], None]


class Runner:
    """The interface the driver uses; see the module docstring."""

    slots: int = 1
    name: str = "runner"

    @classmethod
    def check(cls, opts, in_memory: bool) -> None:
        """Refuse runner options (a :class:`~bmm_cli.search.options.RunnerOptions`) this backend cannot honour."""

    @classmethod
    def create(cls, spec, opts) -> "Runner":
        """The runner for a search: ``spec`` (a :class:`~.command.WorkerSpec`) builds its workers."""
        raise NotImplementedError

    def open(self, post: Post) -> None:
        self.post = post

    def start(self, o: Outcome, env: Mapping[str, str], fields: Mapping[str, str], cancel: threading.Event) -> None:
        raise NotImplementedError

    def keep(self, o: Outcome | None, params: dict, model_dir: Path | None, dest: Path, marker: dict,
             env: Mapping[str, str]) -> None:
        raise NotImplementedError

    def discard(self, o: Outcome) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask running trials to stop (Ctrl-C); their outcomes still come back, as cancelled."""

    def close(self) -> None:
        """Release the workers (the driver calls it once, at the end)."""


class LocalRunner(Runner):
    """``slots`` threads in this process; each runs its trial on the one shared worker (solves take turns on its
    lock, evaluation commands run in parallel)."""

    name = "local"

    def __init__(self, worker: TrialWorker, slots: int = 1):
        self.worker, self.slots = worker, int(slots)

    @classmethod
    def check(cls, opts, in_memory: bool) -> None:
        if opts.parallel > 1 and in_memory:
            raise InputError("in-memory trials (--eval-py / --lm-eval) hold one resident model per worker: run them "
                             "in parallel with --ray (one actor per GPU or CPU slot), or drop --parallel")

    @classmethod
    def create(cls, spec, opts) -> "LocalRunner":
        return cls(spec.build(), slots=opts.parallel)

    def start(self, o, env, fields, cancel) -> None:
        def work() -> None:
            try:
                self.worker.run(o, env, fields, cancel)
            finally:
                self.post(o)

        threading.Thread(target=work, name=f"bmm-trial-{o.trial}", daemon=True).start()

    def keep(self, o, params, model_dir, dest, marker, env) -> None:
        self.worker.keep(params, model_dir, dest, marker, env)

    def discard(self, o) -> None:
        self.worker.discard(o.model_dir)

    def close(self) -> None:
        self.worker.close()

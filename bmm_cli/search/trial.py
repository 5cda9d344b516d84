"""One trial, run where its worker lives: the interface both backends (threads here, Ray actors) call.

A :class:`TrialWorker` runs a trial in its own process: either it writes the merged model to a directory and runs
the evaluation command on it (:mod:`bmm_cli.hooks`), or it writes the merged weights into a resident model in
place and calls a Python scorer on it (:mod:`.inmemory`). It never raises out of :meth:`TrialWorker.run`: the
outcome says ``ok``/``failed``/``timeout``/``cancelled``, or carries a ``fatal`` exception that stops the search
(configuration problems and a full disk fail every trial the same way).

:meth:`TrialWorker.keep` makes a finished trial's model the kept best at ``dest`` (a directory swap; a trial that
has no model on disk, an in-memory one or one whose directory is gone, is written afresh from its parameters).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bmm_cli.atomic import replace_dir, write_json
from bmm_cli.errors import InputError, StateError
from bmm_cli.hooks import HookResult, render_command, run_hook, score_from_value

MARKER = ".bmm-trial.json"  # written into every model a search puts into `out`

Materialize = Callable[[dict, Path, dict], Mapping[str, float] | None]


@dataclass
class Outcome:
    trial: int
    x: list[float]
    params: dict[str, float]
    worker: int
    source: str
    model_dir: Path
    status: str = "failed"  # ok | failed | timeout | cancelled
    score: float | None = None
    metrics: dict = field(default_factory=dict)
    reason: str = ""
    stderr_tail: str = ""
    returncode: int | None = None
    seconds: dict = field(default_factory=dict)
    fatal: BaseException | None = None
    retried: int = 0  # times a dead worker cost this trial its run (Ray)
    worker_lost: bool = False  # its worker died and could not be replaced: the slot is gone


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, (InputError, StateError)) or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _timings(seconds: dict, timings: Mapping | None) -> None:
    for key, val in dict(timings or {}).items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            seconds[key[:-2] if key.endswith("_s") else key] = float(val)


class TrialWorker:
    """Runs trials in this process.

    ``materialize(params, model_dir, env) -> timings`` writes a complete model (always needed: the kept best is a
    model on disk). With ``hook`` (a command template) a trial is materialize + hook. With ``resident`` (an object
    with ``update(params) -> timings``, ``model``, ``tokenizer``) and ``scorer(model, tokenizer, trial) -> float |
    dict`` a trial writes into the resident model and calls the scorer in-process: no checkpoint per trial.
    ``lock`` serializes the solves of workers that share one solver (threads).
    """

    def __init__(self, *, materialize: Materialize, hook: str | None = None, resident: Any = None,
                 scorer: Callable | None = None, timeout: float = 3600.0, grace: float = 5.0,
                 stdout_limit: int = 1 << 20, cwd=None, lock: threading.Lock | None = None,
                 on_close: Callable[[], None] | None = None):
        if (hook is None) == (scorer is None):
            raise InputError("a trial is scored by an evaluation command or by an in-memory scorer: give one")
        if scorer is not None and resident is None:
            raise InputError("an in-memory scorer needs a resident model")
        self.materialize, self.hook, self.resident, self.scorer = materialize, hook, resident, scorer
        self.timeout, self.grace, self.stdout_limit, self.cwd = timeout, grace, stdout_limit, cwd
        self.lock = lock or threading.Lock()
        self.on_close = on_close

    @property
    def in_memory(self) -> bool:
        return self.scorer is not None

    # -- one trial ---------------------------------------------------------------------------------------------

    def run(self, o: Outcome, env: Mapping[str, str], fields: Mapping[str, str], cancel: threading.Event) -> Outcome:
        t0 = time.monotonic()
        try:
            eval_dir = Path(fields["evaldir"])
            shutil.rmtree(eval_dir, ignore_errors=True)
            eval_dir.mkdir(parents=True)
            if self.in_memory:
                self._run_in_memory(o, env, fields, cancel, t0)
            else:
                self._run_command(o, env, fields, cancel, t0)
        except BaseException as exc:  # our own failure (disk full, ...): stop the search with it
            o.fatal = exc
        return o

    def _failed_step(self, o: Outcome, what: str, exc: BaseException, seconds: dict, t0: float) -> None:
        if _is_fatal(exc):
            o.fatal = exc
            return
        # anything else (numerics, GPU OOM, a scorer's own bug) is this trial's failure: recorded, the search goes on
        o.status = "failed"
        o.reason = f"{what} failed: {_one_line(exc)}"[:500]
        o.stderr_tail = "".join(traceback.format_exception(exc))[-2000:]
        o.seconds = {**seconds, "total": time.monotonic() - t0}

    def _weights(self, o, what: str, write: Callable[[], Mapping | None], seconds: dict, t0: float) -> bool:
        """The trial's weights written (a checkpoint, or the resident model in place); False when the trial ended
        there (failed, fatal or cancelled: ``o`` says which)."""
        t_m = time.monotonic()
        try:
            with self.lock:
                timings = write()
        except Exception as exc:
            self._failed_step(o, what, exc, {"materialize": time.monotonic() - t_m}, t0)
            return False
        seconds["materialize"] = time.monotonic() - t_m
        _timings(seconds, timings)
        return True

    def _run_command(self, o, env, fields, cancel, t0) -> None:
        shutil.rmtree(o.model_dir, ignore_errors=True)
        o.model_dir.mkdir(parents=True)
        seconds: dict = {}
        if not self._weights(o, "materialize", lambda: self.materialize(dict(o.params), o.model_dir, dict(env)),
                             seconds, t0):
            return
        if cancel.is_set():
            o.status = "cancelled"
            return
        res: HookResult = run_hook(
            render_command(self.hook, fields), env=env, timeout=self.timeout, cwd=self.cwd,
            stdout_limit=self.stdout_limit, grace=self.grace, cancel=cancel, tail_chars=2000,
        )
        seconds["eval"] = res.seconds
        seconds["total"] = time.monotonic() - t0
        o.status = res.status
        o.score, o.metrics, o.reason = res.score, res.metrics, res.reason
        o.stderr_tail, o.returncode, o.seconds = res.stderr_tail, res.returncode, seconds

    def _run_in_memory(self, o, env, fields, cancel, t0) -> None:
        seconds: dict = {}
        if not self._weights(o, "in-place update", lambda: self.resident.update(dict(o.params)), seconds, t0):
            return
        if cancel.is_set():
            o.status = "cancelled"
            return
        trial = {"trial": o.trial, "params": dict(o.params), "worker": o.worker, "workdir": fields["workdir"],
                 "evaldir": fields["evaldir"], "env": dict(env)}
        t_e = time.monotonic()
        try:
            value = self.scorer(self.resident.model, self.resident.tokenizer, trial)
        except Exception as exc:
            return self._failed_step(o, "scorer", exc, {**seconds, "eval": time.monotonic() - t_e}, t0)
        seconds["eval"] = time.monotonic() - t_e
        seconds["total"] = time.monotonic() - t0
        o.seconds = seconds
        try:
            o.score, o.metrics = score_from_value(value, what="the scorer's returned mapping")
            o.status = "ok"
        except ValueError as exc:  # NaN, no "score" key, not a number: the same reasons a hook's output gets
            o.status, o.reason = "failed", str(exc)

    # -- the kept best -----------------------------------------------------------------------------------------

    def keep(self, params: dict, model_dir: Path | None, dest: Path, marker: dict, env: Mapping[str, str]) -> None:
        """Make ``dest`` hold the trial's complete model with ``marker``: moved from ``model_dir`` when that holds
        it, else written afresh from ``params`` (under a temp name, then swapped in)."""
        dest = Path(dest)
        if model_dir is not None and Path(model_dir).is_dir() and any(Path(model_dir).iterdir()):
            src = Path(model_dir)
        else:
            # a `.bmm-new-` name: what a crash leaves of it is removed by the next run's recover_dir_swap(dest)
            src = dest.parent / f".{dest.name}.bmm-new-trial-{int(marker.get('trial', -1)):04d}-{uuid.uuid4().hex[:8]}"
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            try:
                with self.lock:
                    self.materialize(dict(params), src, {**env, "BMM_MODEL": str(src)})
            except BaseException:
                shutil.rmtree(src, ignore_errors=True)
                raise
        write_json(src / MARKER, marker)
        if src != dest:
            replace_dir(src, dest)

    def discard(self, model_dir: Path | None) -> None:
        if model_dir is not None:
            shutil.rmtree(model_dir, ignore_errors=True)

    def close(self) -> None:
        if self.on_close is not None:
            with contextlib.suppress(Exception):
                self.on_close()
            self.on_close = None

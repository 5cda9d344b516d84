"""The Bayesian-optimization outer loop (paper Alg. 1), independent of how a trial is produced and scored.

Per trial: ask the optimizer for ``(s_b, λ_{b,g}[, ε])``, hand the trial to a runner (:mod:`.local` threads or
:mod:`.ray` actors), record the outcome, tell the optimizer. The result is the best *observed* trial (never the
surrogate's guess); trial 0 is the default point, so the search cannot return anything worse than it.

State lives in ``WORKDIR/<state_name>/`` (``search`` by default; ``bmm search`` uses ``search-<anchor>-<gram>``):

- ``search.json``   manifest: space fingerprint, the caller's ``fingerprint_extra`` (anchor, Gram kind, inputs...),
                    the objective (evaluation command / in-memory scorer) and its direction, options, run id. A rerun
                    with another space, extra or objective is a different search: refused unless ``force``.
- ``trials.jsonl``  one record per finished trial, appended atomically; the source of truth for resume.
- ``best.json``     the best trial so far (atomic). ``summary.json`` and ``convergence.png`` at the end / on Ctrl-C.
- ``eval/trial-NNNN/`` a scratch directory per trial for the evaluation's own outputs (``{evaldir}``).

Merged models are written to ``trial_dir/trial-NNNN/`` (in-memory trials write none); a new best is moved (or
copied, across file systems, or written afresh for an in-memory trial) into ``out`` with a directory swap, so
``out`` always holds a complete model: the previous best or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bmm_cli.atomic import append_line, recover_dir_swap, write_json
from bmm_cli.errors import InputError, StateError
from bmm_cli.hooks import render_command
from bmm_cli.progress import info

from .local import LocalRunner, Runner
from .plot import plot_convergence
from .propose import _propose, _replay
from .space import SearchSpace
from .state import (
    _archive,
    _describe_objective,
    _fields,
    _flock,
    _is_better,
    _load_records,
    _normalize,
    _now,
    kill_leftover_hooks,
)
from .trial import MARKER, Outcome, TrialWorker
from .view import _View

_TRIAL_RE = re.compile(r"^trial-(\d{4,})$")


@dataclass
class SearchResult:
    best_trial: int | None
    best_score: float | None
    best_params: dict[str, float] | None
    n_ok: int
    n_failed: int
    records: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    model: Path | None = None  # where the best model lies: `out`, or its trial directory when no `out` was given
    state_dir: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# the search


def run_search(
    *,
    space: SearchSpace,
    workdir: str | os.PathLike,
    trials: int,
    materialize: Callable[[dict, Path, dict], Mapping[str, float] | None] | None = None,
    hook: str | None = None,
    runner: Runner | None = None,
    objective: Mapping[str, Any] | None = None,
    initial: int = 10,
    seed: int = 0,
    timeout: float = 3600.0,
    minimize: bool = False,
    parallel: int = 1,
    gpus: Sequence[str] | None = None,
    trial_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    force: bool = False,
    first_point: Mapping[str, float] | None = None,
    fail_fast: int = 3,
    hook_cwd: str | os.PathLike | None = None,
    grace: float = 5.0,
    stdout_limit: int = 1 << 20,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    state_name: str = "search",
    solve_params: Callable[[dict], dict] | None = None,
) -> SearchResult:
    """Run (or resume) the BMM hyper-parameter search; return the best observed trial.

    Trials run either through ``runner`` (a :class:`~.local.Runner`: threads or Ray actors holding
    :class:`~.trial.TrialWorker` s) or, given ``materialize`` and ``hook``, on local threads:
    ``materialize(params, model_dir, env)`` writes the merged model for ``params`` into ``model_dir`` (created,
    empty) and returns timings such as ``{"solve_s": .., "write_s": ..}``; ``env`` holds BMM_MODEL, BMM_TRIAL,
    BMM_WORKER and the worker's CUDA_VISIBLE_DEVICES. An exception from it makes a failed trial, except
    :class:`InputError`/:class:`StateError` (configuration problems), which stop the search. ``hook``: the
    evaluation command template (see :func:`bmm_cli.hooks.render_command`) with ``{model}``, ``{trial}``,
    ``{workdir}``, ``{evaldir}``.

    ``objective``: what scores the trials (default ``{"eval": hook}``); with ``minimize`` it must match on resume:
    another objective is another search. ``trials``: the total number of trials, resumed ones included.
    ``initial``: random points before the GP takes over (trial 0, the default point, counts as one).
    ``first_point``: trial 0's parameters (default: ``space.default_point()``). ``gpus``: one CUDA_VISIBLE_DEVICES
    value per local worker, round-robin (e.g. ``["0", "1"]`` or ``["0,1", "2,3"]``). ``trial_dir``: where trial
    models are written (default ``WORKDIR/<state_name>/trials``; tmpfs makes trials cheaper). ``out``: where the
    best model is kept (None: it stays in its trial directory). ``fingerprint_extra``: whatever else makes scores
    comparable (anchor, Gram kind, inputs' fingerprints); it must match on resume. ``force``: archive an earlier
    search's state and start fresh. ``fail_fast``: stop when this many trials of this run failed and none ever
    succeeded (0: never). ``optimizer_kwargs``: overrides for ``skopt.Optimizer``. ``solve_params``: the
    ``bmm solve --params`` form of a trial's parameters, kept in best.json as ``solve_params`` (for spaces whose
    coordinates are not λ itself, e.g. factors of a per-layer λ).

    Ctrl-C (and SIGTERM): running trials are stopped, the state written so far stays valid, the summary and plot
    are written, and KeyboardInterrupt is raised. A rerun resumes.
    """
    # -- validate ----------------------------------------------------------------------------------------------
    if not isinstance(space, SearchSpace):
        raise InputError("space must be a SearchSpace")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"--trials must be an integer >= 1, got {trials!r}")
    if isinstance(initial, bool) or not isinstance(initial, int) or initial < 0:
        raise InputError(f"--initial must be an integer >= 0, got {initial!r}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise InputError(f"--parallel must be an integer >= 1, got {parallel!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InputError(f"--timeout must be > 0 seconds, got {timeout!r}")
    if runner is None:
        if materialize is None or not isinstance(hook, str) or not hook.strip():
            raise InputError("the evaluation hook command is empty")
    if hook is not None and (not isinstance(hook, str) or not hook.strip()):
        raise InputError("the evaluation hook command is empty")
    gpus = [str(g).strip() for g in gpus] if gpus else None
    if gpus is not None and any(not g for g in gpus):
        raise InputError("--gpus has an empty entry; give e.g. 0,1 (one per worker) or '0,1;2,3'")
    if not space.dim_names:
        raise InputError("the search space has no searched parameter (every range has low == high)")

    workdir = Path(workdir).resolve()
    sdir = workdir / state_name
    trial_dir = (Path(trial_dir) if trial_dir is not None else sdir / "trials").resolve()
    out = Path(out).resolve() if out is not None else None
    if out is not None:
        if out == workdir or out in workdir.parents or out == sdir or sdir in out.parents:
            raise InputError(f"--out {out} must not be the work directory or its search state")
        if out == trial_dir or out in trial_dir.parents or trial_dir in out.parents:
            raise InputError(f"--out {out} and the trial directory {trial_dir} must not contain each other")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
    if hook is not None:  # fail early on a hook template that cannot be rendered, before anything is made
        render_command(hook, _fields(workdir, sdir, trial_dir, 0))
    first = dict(first_point) if first_point is not None else space.default_point()
    first_x = space.from_params(first)
    objective = _normalize(dict(objective) if objective is not None else {"eval": hook})
    if runner is None:
        runner = LocalRunner(TrialWorker(materialize=materialize, hook=hook, timeout=float(timeout), grace=grace,
                                         stdout_limit=stdout_limit, cwd=hook_cwd), slots=parallel)

    drv = _Driver(space=space, workdir=workdir, sdir=sdir, runner=runner, trials=trials, initial=initial, seed=seed,
                  minimize=bool(minimize), gpus=gpus, trial_dir=trial_dir, out=out,
                  extra=_normalize(dict(fingerprint_extra or {})), objective=objective, first=first, first_x=first_x,
                  fail_fast=fail_fast, grace=grace, optimizer_kwargs=dict(optimizer_kwargs or {}),
                  options={"timeout": timeout, "parallel": runner.slots, "backend": runner.name})
    drv.solve_params = solve_params
    sdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        locks.enter_context(_flock(sdir / ".lock", f"work directory {workdir}"))
        trial_dir.mkdir(parents=True, exist_ok=True)
        if trial_dir != sdir / "trials":
            locks.enter_context(_flock(trial_dir / ".bmm-lock", f"trial directory {trial_dir}"))
            owner = trial_dir / ".bmm-owner"
            if owner.exists() and owner.read_text().strip() not in ("", str(sdir)):
                raise StateError(
                    f"trial directory {trial_dir} belongs to the search in {owner.read_text().strip()}; "
                    f"choose another --trial-dir (or delete {owner})"
                )
            owner.write_text(str(sdir) + "\n")
        if out is not None and out.exists():
            recover_dir_swap(out)
            if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
                raise InputError(
                    f"--out {out} is a non-empty directory this search did not write; remove it or choose another"
                )
        return drv.run(force)


class _Driver:
    """One run of a search, under its locks: manifest, resume, the loop, the summary."""

    def __init__(self, *, space, workdir, sdir, runner, trials, initial, seed, minimize, gpus, trial_dir, out,
                 extra, objective, first, first_x, fail_fast, grace, optimizer_kwargs, options):
        self.space, self.workdir, self.sdir, self.runner = space, workdir, sdir, runner
        self.trials, self.initial, self.seed, self.minimize, self.gpus = trials, initial, seed, minimize, gpus
        self.trial_dir, self.out, self.extra, self.objective = trial_dir, out, extra, objective
        self.first, self.first_x, self.fail_fast, self.grace = first, first_x, fail_fast, grace
        self.optimizer_kwargs, self.options = optimizer_kwargs, options
        self.trials_path, self.best_path = sdir / "trials.jsonl", sdir / "best.json"
        self.manifest_path = sdir / "search.json"
        self.records: list[dict] = []
        self.best: dict | None = None
        self.solve_params: Callable[[dict], dict] | None = None
        self.run_id = ""
        self.changed: list[str] = []
        self.old_out: str | None = None

    # -- manifest: resume or refuse ----------------------------------------------------------------------------

    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _differences(self, old: dict) -> list[str]:
        diffs = []
        if old.get("space_fingerprint") != self.space.fingerprint():
            diffs.append("search space")
        old_extra = old.get("extra", {})
        for k in sorted(set(old_extra) | set(self.extra)):
            if old_extra.get(k) != self.extra.get(k):
                diffs.append(f"{k} ({old_extra.get(k)!r} -> {self.extra.get(k)!r})")
        return diffs

    @staticmethod
    def _old_objective(old: dict) -> dict:
        if "objective" in old:
            return old["objective"]
        return {"eval": old.get("options", {}).get("hook")}  # a manifest from before objectives were recorded

    def _check_manifest(self, force: bool) -> dict | None:
        old = self._read_manifest()
        self.records = _load_records(self.trials_path)
        if old and old.get("run_id"):
            killed = kill_leftover_hooks(str(old["run_id"]), self.grace)
            if killed:
                info(f"search: stopped {killed} hook process group(s) left running by an interrupted earlier run")
        if (self.trials_path.exists() or old is not None) and force:
            stamp = _archive(self.sdir)
            info(f"search: --force: earlier search state archived as {self.sdir}/*.{stamp}.*; starting fresh")
            self.records = []
            return None
        if not self.records:
            # an earlier start with other settings that recorded no trial: nothing to keep
            same = old is not None and not self._differences(old) and self._old_objective(old) == self.objective \
                and bool(old.get("minimize")) == self.minimize
            return old if same else None
        if old is None:
            raise StateError(f"{self.manifest_path} is missing or unreadable but {self.trials_path} has trials; "
                             f"rerun with --force to archive them and start fresh")
        diffs = self._differences(old)
        if diffs:
            raise StateError(
                f"the search in {self.sdir} was run with a different {', '.join(diffs)}; rerun with --force to "
                f"archive it and start fresh, or use another work directory"
            )
        old_obj, old_min = self._old_objective(old), bool(old.get("minimize"))
        if old_obj != self.objective or old_min != self.minimize:
            what = []
            if old_obj != self.objective:
                what.append(f"{_describe_objective(old_obj)} -> {_describe_objective(self.objective)}")
            if old_min != self.minimize:
                what.append("direction (--minimize " + ("on -> off" if old_min else "off -> on") + ")")
            raise StateError(
                f"the {len(self.records)} trial(s) in {self.sdir} were scored by another objective "
                f"({'; '.join(what)}): a different search whose scores do not compare; rerun with --force to archive "
                f"them and start fresh, or use another work directory"
            )
        opts = old.get("options", {})
        for name, now in (("seed", self.seed), ("initial", self.initial)):
            if opts.get(name) not in (None, now):
                self.changed.append(f"--{name} {opts.get(name)} -> {now}")
        if self.changed:
            info(f"search: note: {', '.join(self.changed)} since the earlier trials: they are kept, the next "
                 f"proposals differ from what an uninterrupted run would have made")
        self.old_out = opts.get("out")
        return old

    def _write_manifest(self, old: dict | None) -> None:
        self.run_id = (old or {}).get("run_id") or uuid.uuid4().hex
        write_json(self.manifest_path, {
            "version": 2,
            "run_id": self.run_id,
            "space_fingerprint": self.space.fingerprint(),
            "space": self.space.describe(),
            "extra": self.extra,
            "objective": self.objective,
            "minimize": self.minimize,
            "options": {
                "trials": self.trials, "initial": self.initial, "seed": self.seed, **self.options,
                "gpus": self.gpus, "trial_dir": str(self.trial_dir),
                "out": None if self.out is None else str(self.out), "first_point": self.first,
                "hook": self.objective.get("eval"),
            },
            "created": (old or {}).get("created") or _now(),
            "updated": _now(),
        })

    # -- records and the kept best -----------------------------------------------------------------------------

    def model_env(self, n: int, worker: int) -> dict[str, str]:
        env = {
            "BMM_MODEL": str(self.trial_dir / f"trial-{n:04d}"),
            "BMM_TRIAL": str(n),
            "BMM_WORKDIR": str(self.workdir),
            "BMM_EVAL_DIR": str(self.sdir / "eval" / f"trial-{n:04d}"),
            "BMM_WORKER": str(worker),
            "BMM_RUN_ID": self.run_id,
        }
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[worker % len(self.gpus)]
        return env

    def marker(self, rec: dict) -> dict:
        return {"run_id": self.run_id, "trial": rec["trial"], "score": rec["score"], "params": rec["params"]}

    def dest(self, rec: dict) -> Path:
        return self.out if self.out is not None else self.trial_dir / f"trial-{rec['trial']:04d}"

    def write_best(self, rec: dict | None) -> None:
        if rec is None:
            return
        write_json(self.best_path, {
            "trial": rec["trial"], "score": rec["score"], "params": rec["params"], "x": rec["x"],
            "metrics": rec.get("metrics", {}), "seconds": rec.get("seconds", {}), "model": str(self.dest(rec)),
            "minimize": self.minimize, "run_id": self.run_id, "time": _now(),
            **({"solve_params": self.solve_params(rec["params"])} if self.solve_params else {}),
        })

    def better_of(self, recs: list[dict]) -> dict | None:
        best = None
        for r in recs:
            if r["status"] == "ok" and r.get("score") is not None and _is_better(r["score"], best, self.minimize):
                best = r
        return best

    def _restore_best(self) -> None:
        """Bring `out` and the trial directory in line with the records (after a kill, or a changed --out)."""
        best = self.best
        if best is not None:
            src = self.trial_dir / f"trial-{best['trial']:04d}"
            holder = self.dest(best)
            try:
                held = json.loads((holder / MARKER).read_text())
            except (OSError, json.JSONDecodeError):
                held = {}
            if held.get("run_id") != self.run_id or held.get("trial") != best["trial"]:
                complete = src.is_dir() and any(src.iterdir())  # its record exists: materialize had finished
                if complete and self.out is not None:
                    info(f"search: finishing the move of best trial {best['trial']} into {self.out}")
                elif not complete:
                    moved = self.old_out is not None and self.out is not None and self.old_out != str(self.out)
                    why = (f"--out changed from {self.old_out}" if moved else
                           "its trial directory is gone" if self.out is None else
                           f"{self.out} is missing" if not self.out.exists() else
                           "the model there is another trial's: the run was stopped before the new best was kept")
                    info(f"search: writing best trial {best['trial']}'s model into {holder} ({why})")
                self.runner.keep(None, dict(best["params"]), src if complete else None, holder, self.marker(best),
                                 self.model_env(best["trial"], 0))
            self.write_best(best)
        keep = None if self.out is not None or best is None else f"trial-{best['trial']:04d}"
        for p in self.trial_dir.iterdir():
            if (_TRIAL_RE.match(p.name) and p.name != keep) or p.name.startswith(".remake-"):
                shutil.rmtree(p, ignore_errors=True)

    def _optimizer(self):
        opt_kw = {"base_estimator": "GP", "acq_func": "EI", "n_initial_points": self.initial,
                  "random_state": self.seed}
        opt_kw.update(self.optimizer_kwargs)
        from skopt import Optimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = Optimizer(self.space.dimensions(), **opt_kw)
            _replay(opt, self.records, changed=", ".join(self.changed) or None)
        return opt

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self, force: bool) -> SearchResult:
        old = self._check_manifest(force)
        self._write_manifest(old)
        self.best = self.better_of(self.records)
        self.runner.open(self.results_put)
        try:
            self._restore_best()
            self.opt = self._optimizer()
            done = {r["trial"] for r in self.records}
            self.todo = [n for n in range(self.trials) if n not in done]
            if self.records:
                n_ok = sum(r["status"] == "ok" for r in self.records)
                info(f"search: resuming: {len(self.records)} trial(s) on record ({n_ok} ok), {len(self.todo)} to go"
                     + (f"; best so far {self.best['score']:.6g} (trial {self.best['trial']})" if self.best else ""))
            return self._loop()
        finally:
            self.runner.close()

    def results_put(self, o: Outcome) -> None:
        self.results.put(o)

    def _launch(self, numbers: list[int]) -> None:
        pending = [o.x for o in self.in_flight.values()]
        asks = [n for n in numbers if n != 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if 0 in numbers:
                pending = pending + [self.first_x]
            xs, source = _propose(self.opt, len(asks), pending)
        it = iter(xs)
        for n in numbers:
            x, src = (list(self.first_x), "first") if n == 0 else (list(next(it)), source)
            worker = self.free.pop(0)
            params = self.space.to_params(x)
            o = Outcome(trial=n, x=[float(v) for v in x], params=params, worker=worker, source=src,
                        model_dir=self.trial_dir / f"trial-{n:04d}")
            self.in_flight[n] = o
            self.launched[n] = time.monotonic()
            self.view.started(n, params, worker)
            self.runner.start(o, self.model_env(n, worker), _fields(self.workdir, self.sdir, self.trial_dir, n),
                              self.cancel)

    def _worst_y(self) -> float | None:
        ys = [r["y"] for r in self.records if r["status"] == "ok" and r.get("y") is not None]
        return max(ys) if ys else None

    def _record(self, o: Outcome, y: float | None) -> dict:
        ok = o.status == "ok"
        rec = {
            "trial": o.trial, "params": o.params, "x": [float(v) for v in o.x], "score": o.score if ok else None,
            "metrics": o.metrics, "status": o.status, "reason": o.reason, "stderr_tail": o.stderr_tail,
            "seconds": o.seconds, "worker": o.worker, "time": _now(), "source": o.source, "y": y,
            "returncode": o.returncode,
        }
        if o.retried:
            rec["retried"] = o.retried
        append_line(self.trials_path, json.dumps(rec, allow_nan=False, ensure_ascii=False))
        self.records.append(rec)
        return rec

    def _handle(self, o: Outcome) -> None:
        self.in_flight.pop(o.trial, None)
        if not o.worker_lost:
            self.free.append(o.worker)
            self.free.sort()
        if o.status == "cancelled":
            self.view.cancelled(o.trial)
            self.runner.discard(o)
            return
        if o.fatal is not None:
            self.runner.discard(o)
            raise o.fatal
        ok = o.status == "ok"
        # skopt minimizes: y = -score unless --minimize.
        # A failed trial is told the worst score seen so far (not skipped): an untold point leaves the GP and its
        # acquisition maximum unchanged, so skopt would propose the very same (failing) point again; a penalty at
        # the worst *observed* value steers the search away from a region that fails (bad λ -> broken model,
        # OOM, a hook that cannot parse the output) without distorting the GP's scale the way -inf or a huge
        # constant would. Flaky, region-independent failures cost a little: the GP's noise term absorbs one odd
        # point. Before any trial succeeded there is no worst score: the point is not told (the optimizer is
        # still drawing random initial points then, so nothing repeats).
        y = (float(o.score) if self.minimize else -float(o.score)) if ok else self._worst_y()
        if o.trial in self.launched:  # as the driver saw it: dispatch to a worker and back included
            o.seconds = {**o.seconds, "wall": round(time.monotonic() - self.launched.pop(o.trial), 4)}
        rec = self._record(o, y)
        if ok and _is_better(o.score, self.best, self.minimize):
            prev, self.best = self.best, rec
            t_keep = time.monotonic()
            self.runner.keep(o, dict(o.params), o.model_dir, self.dest(rec), self.marker(rec),
                             self.model_env(o.trial, o.worker))
            self.kept.append(round(time.monotonic() - t_keep, 4))
            self.write_best(rec)
            if self.out is None and prev is not None:
                shutil.rmtree(self.trial_dir / f"trial-{prev['trial']:04d}", ignore_errors=True)
        else:
            self.runner.discard(o)
        if not ok:
            self.session_failed += 1
        self.view.finished(rec, self.best, len(self.records))
        if y is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.opt.tell(rec["x"], y)
        if (self.fail_fast and self.session_failed >= self.fail_fast
                and not any(r["status"] == "ok" for r in self.records)):
            raise InputError(
                f"{self.session_failed} trials failed and none has succeeded (trial {o.trial}: {o.reason}); "
                f"check the evaluation by running it by hand on a model, then rerun (it resumes)"
            )

    def _loop(self) -> SearchResult:
        self.cancel = threading.Event()
        self.results: queue.Queue[Outcome] = queue.Queue()
        self.in_flight: dict[int, Outcome] = {}
        self.launched: dict[int, float] = {}
        self.kept: list[float] = []  # seconds of each "new best -> out" (a move; a full write for in-memory)
        self.free = list(range(self.runner.slots))
        self.view = _View(self.space, self.trials, self.minimize)
        self.session_failed = 0
        fatal: BaseException | None = None
        ending = "finished"
        old_term = None
        o: Outcome | None = None
        if threading.current_thread() is threading.main_thread():
            def _on_term(signum, frame):
                raise KeyboardInterrupt

            old_term = signal.signal(signal.SIGTERM, _on_term)
        self.view.start(self.records, self.best)
        try:
            while True:
                while self.free and self.todo:
                    k = min(len(self.free), len(self.todo))
                    numbers, self.todo[:] = self.todo[:k], self.todo[k:]
                    self._launch(numbers)
                if not self.in_flight:
                    break
                try:
                    o = self.results.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._handle(o)
                o = None
        except BaseException as exc:  # Ctrl-C, SIGTERM, fail-fast, a fatal error from a worker
            fatal = exc
            ending = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
            if o is not None and o.trial in self.in_flight:
                self.results.put(o)  # fetched but not handled when the interrupt came
            self._stop(ending)
        finally:
            self.view.stop()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            result = self._finish(ending)
        if fatal is not None:
            raise fatal
        return result

    def _stop(self, ending: str) -> None:
        self.cancel.set()
        self.runner.stop()
        if self.in_flight:
            info(f"search: {ending}: stopping {len(self.in_flight)} running trial(s)...")
        # running hooks are killed within a moment; a trial still in materialize is waited for (bounded)
        deadline = time.monotonic() + max(30.0, self.grace + 10.0)
        try:
            while self.in_flight and time.monotonic() < deadline:
                try:
                    o = self.results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if o.fatal is None and o.status != "cancelled":
                    with contextlib.suppress(Exception):
                        self._handle(o)  # it finished before the stop: keep it
                        continue
                self.in_flight.pop(o.trial, None)
                self.view.cancelled(o.trial)
                self.runner.discard(o)
        except KeyboardInterrupt:
            info("search: second interrupt: not waiting for running trials")
        if self.in_flight:
            info(f"search: left {len(self.in_flight)} unfinished trial(s) behind; a rerun redoes them")

    def _finish(self, ending: str) -> SearchResult:
        records, best = self.records, self.best
        n_ok = sum(r["status"] == "ok" for r in records)
        n_failed = len(records) - n_ok
        model = None if best is None else self.dest(best)
        summary = {
            "state": ending if ending != "finished" or len({r["trial"] for r in records}) >= self.trials else "stopped",
            "trials": self.trials,
            "n_ok": n_ok,
            "n_failed": n_failed,
            "best_trial": None if best is None else best["trial"],
            "best_score": None if best is None else best["score"],
            "best_params": None if best is None else best["params"],
            "model": None if model is None else str(model),
            "minimize": self.minimize,
            "best_kept_s": getattr(self, "kept", []),
            "time": _now(),
        }
        with contextlib.suppress(OSError):
            write_json(self.sdir / "summary.json", summary)
        try:
            plot_convergence(records, self.sdir / "convergence.png", minimize=self.minimize)
        except Exception as exc:  # a plot must never cost the search its result
            info(f"convergence plot failed: {exc}")
        if best is not None:
            info(f"search: best score {best['score']:.6g} at trial {best['trial']} ({n_ok} ok, {n_failed} failed); "
                 f"model: {model}")
        else:
            info(f"search: no successful trial ({n_failed} failed)")
        return SearchResult(
            best_trial=None if best is None else best["trial"],
            best_score=None if best is None else best["score"],
            best_params=None if best is None else dict(best["params"]),
            n_ok=n_ok,
            n_failed=n_failed,
            records=sorted(records, key=lambda r: r["trial"]),
            best_metrics={} if best is None else dict(best.get("metrics") or {}),
            model=model,
            state_dir=self.sdir,
        )

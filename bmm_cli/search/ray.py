"""The Ray backend (``bmm search --ray [ADDRESS]``, extra ``[ray]``): a pool of actors, one per GPU of the cluster
(or one per ``--parallel`` CPU slot on CPU nodes). Each actor builds its :class:`~.trial.TrialWorker` from the
:class:`~.command.WorkerSpec` where it runs: it loads the trial solver's cache from the (shared) work directory once
and keeps it resident, writes its trials to the node-local ``--trial-dir`` or into its resident model, and runs the
evaluation on that node. The GP driver, the records and resume stay in the ``bmm search`` process
(:mod:`.driver`): a trial means the same on either backend.

A dead actor (killed, OOM, node lost) costs its in-flight trial: it is run once more on a replacement actor, and
recorded as failed if that one dies too. A slot whose replacement cannot start is dropped; the search goes on with
the others.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from bmm_cli.errors import InputError, StateError
from bmm_cli.progress import info

from .local import Runner
from .state import kill_leftover_hooks
from .trial import Outcome

EXTRA = "from the bmm clone, pip install -e '.[ray]'"
READY_TIMEOUT = 600.0  # seconds an actor may take to load its solver cache (and resident model)


def check_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed: {EXTRA}") from None
    return ray


class _TrialActor:
    """The actor body (wrapped by ``ray.remote`` in :meth:`RayRunner.open`): one TrialWorker, resident."""

    def __init__(self, spec, slot: int):
        self.slot = slot
        self.worker = spec.build(announce=slot == 0)
        self.cancel_event = threading.Event()

    def ready(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def run(self, o: Outcome, env: dict, fields: dict) -> Outcome:
        self.cancel_event.clear()
        return self.worker.run(o, {**env, "BMM_WORKER_PID": str(os.getpid())}, fields, self.cancel_event)

    def cancel(self) -> None:
        self.cancel_event.set()

    def keep(self, params: dict, model_dir, dest, marker: dict, env: dict) -> None:
        self.worker.keep(params, model_dir, dest, marker, env)

    def discard(self, model_dir) -> None:
        self.worker.discard(model_dir)

    def close(self) -> None:
        self.worker.close()


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


class RayRunner(Runner):
    """Trials on Ray actors. ``address``: ``"local"`` (start a Ray instance in this process), ``"auto"``, a
    ``host:port`` of a running cluster or a ``ray://host:10001`` client address."""

    name = "ray"

    @classmethod
    def check(cls, opts, in_memory: bool) -> None:
        if opts.gpus:
            raise InputError("--gpus sets CUDA_VISIBLE_DEVICES of local workers; with --ray, Ray gives each actor "
                             "its GPU: drop --gpus")
        check_ray()

    @classmethod
    def create(cls, spec, opts) -> "RayRunner":
        return cls(spec, address=opts.ray, parallel=opts.parallel, trial_dir=opts.trial_dir)

    def __init__(self, spec, *, address: str = "local", parallel: int = 1, trial_dir=None,
                 init_kwargs: dict | None = None):
        self.spec, self.address, self.parallel = spec, address, int(parallel)
        self.init_kwargs = dict(init_kwargs or {})
        self.actors: list = []
        self.info: list[dict] = []
        self.lock = threading.Lock()
        self.started_ray = False
        self.ray = check_ray()
        self._connect()

    # -- the pool ----------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            pass
        elif self.address in (None, "", "local"):
            kw = {"num_cpus": max(self.parallel, os.cpu_count() or 1), "include_dashboard": False,
                  **self.init_kwargs}
            ray.init(**kw)
            self.started_ray = True
        else:
            try:
                ray.init(address=self.address, **self.init_kwargs)
            except Exception as exc:
                raise InputError(f"--ray {self.address}: cannot connect to the Ray cluster: {_short(exc)}") from None
            self.started_ray = True
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if gpus >= 1:
            self.slots, self.per_actor = gpus, {"num_gpus": 1, "num_cpus": 1}
        else:
            cpus = int(res.get("CPU", 0))
            if cpus < 1:
                raise InputError(f"--ray {self.address}: the cluster has no CPU or GPU to run actors on")
            self.slots, self.per_actor = max(1, min(self.parallel, cpus)), {"num_cpus": 1}
            if self.parallel > cpus:
                info(f"search: ray: --parallel {self.parallel} but the cluster has {cpus} CPU(s): {self.slots} actors")

    def _new_actors(self, slots: list[int]) -> list[tuple]:
        """Start actors for ``slots`` and wait until each has loaded its worker; [(actor, meta)]."""
        ray = self.ray
        # no restarts by Ray: a replacement is started here, so that the driver knows which trial a death cost
        cls = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2, **self.per_actor)(_TrialActor)
        actors = [cls.remote(self.spec, slot) for slot in slots]
        out = []
        for slot, actor in zip(slots, actors):
            try:
                out.append((actor, ray.get(actor.ready.remote(), timeout=READY_TIMEOUT)))
            except Exception as exc:
                for a in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(a)
                cause = getattr(exc, "cause", None) or exc
                raise StateError(f"ray: trial worker {slot} did not start: {_short(cause)}") from None
        return out

    def _new_actor(self, slot: int):
        return self._new_actors([slot])[0]

    def open(self, post) -> None:
        super().open(post)
        t0 = time.monotonic()
        kind = "GPU" if "num_gpus" in self.per_actor else "CPU"
        info(f"search: ray: starting {self.slots} trial actor(s), one per {kind} slot...")
        # the first one alone: it builds the solver cache in the shared work dir if needed; the others then load it
        started = self._new_actors([0])
        if self.slots > 1:
            started += self._new_actors(list(range(1, self.slots)))
        for actor, meta in started:
            self.actors.append(actor)
            self.info.append(meta)
        hosts = sorted({m["host"] for m in self.info})
        info(f"search: ray: {self.slots} actor(s) ready on {', '.join(hosts)} ({time.monotonic() - t0:.1f} s)")

    def _replace(self, slot: int) -> bool:
        try:
            actor, meta = self._new_actor(slot)
        except Exception as exc:
            info(f"search: ray: worker {slot} could not be replaced ({_short(exc)}); going on without it")
            return False
        with self.lock:
            self.actors[slot], self.info[slot] = actor, meta
        return True

    # -- trials ------------------------------------------------------------------------------------------------

    def start(self, o, env, fields, cancel) -> None:
        threading.Thread(target=self._drive, args=(o, dict(env), dict(fields), cancel), daemon=True,
                         name=f"bmm-ray-trial-{o.trial}").start()

    def _drive(self, o: Outcome, env: dict, fields: dict, cancel: threading.Event) -> None:
        from ray.exceptions import RayActorError

        ray = self.ray
        while True:
            actor = self.actors[o.worker]
            try:
                ref = actor.run.remote(o, env, fields)
                sent_cancel = False
                while not ray.wait([ref], timeout=0.5)[0]:
                    if cancel.is_set() and not sent_cancel:
                        actor.cancel.remote()
                        sent_cancel = True
                res: Outcome = ray.get(ref)
                res.retried = o.retried
                self.post(res)
                return
            except RayActorError as exc:
                # the actor died with the trial in flight: its hook (on this node) is stopped, the slot refilled
                kill_leftover_hooks(env.get("BMM_RUN_ID", ""), self.spec.grace, trial=o.trial)
                info(f"search: ray: worker {o.worker} died running trial {o.trial} ({_short(exc)[:120]})")
                alive = not cancel.is_set() and self._replace(o.worker)
                if cancel.is_set():
                    o.status, o.reason = "cancelled", "cancelled"
                elif alive and o.retried == 0:
                    o.retried = 1
                    info(f"search: ray: running trial {o.trial} again on a fresh worker {o.worker}")
                    continue
                else:
                    o.status = "failed"
                    o.reason = (f"its worker died {'twice' if o.retried else 'and could not be replaced'} while "
                                f"running it ({type(exc).__name__})")
                    o.worker_lost = not alive
                self.post(o)
                return
            except BaseException as exc:  # the task itself failed in Ray (not the trial): stop the search
                o.fatal = exc
                self.post(o)
                return

    def _call(self, slot: int, method: str, *args):
        return self.ray.get(getattr(self.actors[slot], method).remote(*args), timeout=READY_TIMEOUT)

    def keep(self, o, params, model_dir, dest, marker, env) -> None:
        from ray.exceptions import RayActorError

        slots = ([o.worker] if o is not None else []) + [s for s in range(len(self.actors))]
        last: BaseException | None = None
        for i, slot in enumerate(slots):
            try:  # on another worker than the one that ran it, the model is written afresh
                self._call(slot, "keep", params, model_dir if i == 0 else None, Path(dest), marker, env)
                return
            except RayActorError as exc:
                last = exc
        raise StateError(f"ray: no live worker could write the best model to {dest}: {_short(last)}")

    def discard(self, o) -> None:
        from ray.exceptions import RayActorError

        try:
            self._call(o.worker, "discard", o.model_dir)
        except RayActorError:
            pass  # a dead worker's trial directory is its node's business

    def stop(self) -> None:
        for a in self.actors:
            try:
                a.cancel.remote()
            except Exception:
                pass

    def close(self) -> None:
        ray = self.ray
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:
                pass
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

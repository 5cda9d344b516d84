"""``bmm search``: the driver wired to the cached BMM solver, on local threads or Ray actors, scored by a command
(``--eval``), a Python function on a resident model (``--eval-py``) or lm-evaluation-harness (``--lm-eval``).

:class:`WorkerSpec` is everything a worker needs to rebuild its trial solver and scorer where it runs (it is
pickled to Ray actors); :meth:`WorkerSpec.build` makes the :class:`~.trial.TrialWorker`, locally or on an actor.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bmm_cli import budget
from bmm_cli.default_params import evidence_params
from bmm_cli.defaults import DEFAULT_EPS, DEFAULT_LAM, DEFAULT_SCALE
from bmm_cli.errors import InputError
from bmm_cli.factor_cache import Merger
from bmm_cli.out_lock import output_lock
from bmm_cli.params import Params, block_group, geometric_means
from bmm_cli.progress import info
from bmm_cli.workdir import Sources
from bmm_cli.writer import check_not_input

from .driver import run_search
from .inmemory import ResidentModel
from .options import ABSOLUTE_LAM_RANGE, RELATIVE_LAM_RANGE, SearchOptions
from .runners import runner_class
from .scorers import SCORERS
from .space import SearchSpace
from .trial import TrialWorker

__all__ = ["ABSOLUTE_LAM_RANGE", "RELATIVE_LAM_RANGE", "WorkerSpec", "search", "state_dir_name"]


def state_dir_name(anchor: str, gram: str) -> str:
    """One search state per (anchor, Gram kind) in a work directory, so searches of several variants coexist."""
    return f"search-{anchor}-{gram}"


@dataclass
class WorkerSpec:
    """What a worker rebuilds where it runs: the solver (work dir, anchor, Gram, Merger options), the space, and
    the scorer (its key in :data:`.scorers.SCORERS` and its config)."""

    work: str
    anchor: str
    gram: str
    space: dict
    scorer: str
    scorer_config: dict
    merger_kwargs: dict = field(default_factory=dict)
    timeout: float = 3600.0
    grace: float = 5.0
    lam_base: list[dict[str, float]] | None = None  # --relative-lam: the default's λ per layer-group

    @property
    def in_memory(self) -> bool:
        return SCORERS[self.scorer].in_memory

    def make_space(self) -> SearchSpace:
        return SearchSpace(**self.space)

    def build(self, *, announce: bool = True) -> TrialWorker:
        merger = Merger(Path(self.work), self.anchor, self.gram, **self.merger_kwargs)
        if announce and callable(getattr(merger, "placement", None)):
            info(f"search: trial cache: {merger.placement()}")
        space = self.make_space()

        def to_params(flat: dict) -> Params:
            return Params(*expand_params(space, flat, self.lam_base))

        def materialize(params: dict, model_dir: Path, env: dict) -> dict:
            return merger.write(to_params(params), model_dir, extra={"trial": int(env.get("BMM_TRIAL", -1))})

        try:
            scoring = SCORERS[self.scorer].worker_kwargs(self.scorer_config)
            if self.in_memory:
                resident = ResidentModel(merger, to_params, device=merger.dev, dtype=merger.out_dt)
                return TrialWorker(materialize=materialize, resident=resident, on_close=merger.close, **scoring)
            return TrialWorker(materialize=materialize, timeout=self.timeout, grace=self.grace,
                               lock=threading.Lock(), on_close=merger.close, **scoring)
        except BaseException:
            merger.close()
            raise


def expand_params(space: SearchSpace, flat: dict, lam_base: list[dict[str, float]] | None):
    """``(scales, lams, eps)`` a solve uses for a point of the space. Absolute λ: one entry per block-group.
    ``--relative-lam``: one entry per layer-group of ``lam_base`` (the default's per-layer λ), each λ = its base λ
    times the factor of its block-group and module group, each s = its block-group's s."""
    scales, lams, eps = space.unpack(flat)
    if lam_base is None:
        return scales, lams, eps
    n, B = len(lam_base), space.num_groups
    of = [block_group(j, n, B) for j in range(n)]
    return ([scales[of[j]] for j in range(n)],
            [{g: float(v) * lams[of[j]].get(g, 1.0) for g, v in lam_base[j].items()} for j in range(n)], eps)


def solve_params_of(space: SearchSpace, lam_base: list[dict[str, float]]):
    """``flat search point -> bmm solve --params dict`` of a relative-λ search (best.json's ``solve_params``)."""
    return lambda flat: Params(*expand_params(space, flat, lam_base)).flat()


def params_at_bounds(space: SearchSpace, params: dict) -> list[str]:
    """The searched parameters of ``params`` that sit on (within 0.1 % of) the low or high end of their range."""
    out = []
    for name, lo, hi, prior in space.specs():
        if lo >= hi or name not in params:
            continue
        v = float(params[name])
        f = math.log if prior == "log-uniform" else float
        tol = 1e-3 * (f(hi) - f(lo))
        if f(v) <= f(lo) + tol or f(v) >= f(hi) - tol:
            out.append(f"{name}={v:.4g} (range {lo:g}:{hi:g})")
    return out


def first_point(space: SearchSpace, src, *, default_scale: float, default_lam: float,
                default_eps: float) -> tuple[dict[str, float], list[str]]:
    """The first trial, bmm's default merge as far as the space can express it, and the parameters it could not
    express. Each ``lam_<b>_<group>`` is the geometric mean of the evidence λ (type-II maximum likelihood,
    :func:`bmm_cli.default_params.evidence_params`, kept in the work dir) of the layers in block-group b, clipped
    to the λ range; s and ε as the defaults. In a relative-λ space every factor is 1: exactly the default merge.
    The second value names every parameter whose default lies outside its range (``"lam_0_mlp_out=3e-06 (range
    0.0001:1, trial 0 uses 0.0001)"``): trial 0 is then not the default merge."""
    if space.lam_relative:  # factors of the default's own per-layer λ: 1 is the default merge itself
        point = space.default_point(default_scale=default_scale, default_lam=1.0, default_eps=default_eps)
        wanted = {name: 1.0 for name in point if name.startswith("lam_")}
    else:
        point = space.default_point(default_scale=default_scale, default_lam=default_lam, default_eps=default_eps)
        per_layer = evidence_params(src, scale=default_scale, eps=default_eps if src.gram == "hybrid" else None)
        layers = per_layer.num_groups
        means = geometric_means(((block_group(layer, layers, space.num_groups), group), v)
                                for layer, row in enumerate(per_layer.lams) for group, v in row.items())
        wanted = {}
        for name in point:
            if name.startswith("lam_"):
                _, b, group = name.split("_", 2)
                v = means.get((int(b), group))
                if v is not None:
                    wanted[name] = float(v)
    wanted.update({n: float(default_scale) for n in point if n.startswith("s_")})
    if "eps" in point:
        wanted["eps"] = float(default_eps)
    clipped = []
    for name, lo, hi, _ in space.specs():
        if name not in wanted or lo >= hi:  # a parameter fixed by the user is no clipped default
            continue
        v = wanted[name]
        point[name] = float(min(max(v, lo), hi))
        if point[name] != v:
            clipped.append(f"{name}={v:.3g} (range {lo:g}:{hi:g}, trial 0 uses {point[name]:.3g})")
    return point, clipped


def search(
    work: str | os.PathLike,
    anchor: str,
    gram: str,
    eval_cmd: str | None = None,
    *,
    out: str | os.PathLike,
    options: SearchOptions | None = None,
    **flat: Any,
) -> dict:
    """Bayesian optimization of block-tied (s, λ[, ε]) scored by the user's evaluation; the best model at ``out``.

    ``options`` (a :class:`~bmm_cli.search.options.SearchOptions`), or its fields as flat keywords (``trials=20,
    blocks=1, eval_py="m:f", ray="auto", device="cpu"``...; ``eval_cmd`` may also come third, positionally).
    ``ray``: None (local threads), ``"local"`` (start a Ray instance here), ``"auto"`` or an address
    (``ray://head:10001``, ``head:6379``): one actor per GPU of the cluster, or per ``parallel`` CPU slot.
    """
    if options is None:
        options = SearchOptions.build(**flat)
    elif flat:
        raise TypeError(f"search: give options or flat keywords, not both ({', '.join(flat)})")
    if eval_cmd is not None:
        options.scorer.eval_cmd = eval_cmd
    # ---- preflight: every option, before any heavy work ---------------------------------------------------------
    space, objective, scorer, merger_kwargs = options.check(gram)
    sc, rn, opt = options.scorer, options.runner, options.optimizer
    blocks = options.space.blocks
    src = Sources(Path(work), anchor, gram)
    src.proj.plan.check_block_groups(blocks, f"--blocks {blocks}")
    if out is not None:
        check_not_input(Path(out), src.proj.inputs())
    est = budget.for_merge(src.proj.plan, src.proj.base.meta, src.proj.num_tasks, anchor=anchor, gram=gram,
                           search=True, out_dtype=options.output.dtype,
                           factor_dtype=str(merger_kwargs.get("factor_dtype", "float32")))
    budget.check_disk(budget.only(est, ("evidence-", "factors-"), out=out is not None), work, out)
    first, clipped = first_point(space, src, default_scale=DEFAULT_SCALE, default_lam=DEFAULT_LAM,
                                 default_eps=DEFAULT_EPS)
    if clipped:
        info("search: trial 0 is not the default merge: the default lies outside the range for "
             + ", ".join(clipped) + "; widen --scale/--lam/--epsilon to start from the default itself")
    lam_base = None
    if space.lam_relative:
        base = evidence_params(src, scale=DEFAULT_SCALE, eps=DEFAULT_EPS if gram == "hybrid" else None)
        lam_base = [dict(row) for row in base.lams]
    to_solve = solve_params_of(space, lam_base) if lam_base is not None else None
    spec = WorkerSpec(work=str(Path(work).resolve()), anchor=anchor, gram=gram, merger_kwargs=merger_kwargs,
                      space={"num_groups": space.num_groups, "lam_groups": space.lam_groups,
                             "scale_range": space.scale_range, "lam_range": space.lam_range,
                             "eps_range": space.eps_range, "lam_relative": space.lam_relative},
                      timeout=float(sc.timeout), lam_base=lam_base, **scorer)
    # ---- workers ---------------------------------------------------------------------------------------------
    with output_lock(out) if out is not None else contextlib.nullcontext():  # one writer per --out (exit 3)
        runner = runner_class(rn.kind).create(spec, rn)
        try:
            res = run_search(space=space, workdir=work, runner=runner, objective=objective, trials=opt.trials,
                             state_name=state_dir_name(anchor, gram), initial=opt.initial, seed=opt.seed,
                             timeout=sc.timeout, minimize=sc.minimize, gpus=rn.gpus, trial_dir=rn.trial_dir, out=out,
                             force=options.output.force, first_point=first,
                             fingerprint_extra={**src.fingerprint, "gram": gram, "blocks": blocks},
                             hook=sc.eval_cmd or None, solve_params=to_solve)
        finally:
            runner.close()
    return _summary(res, space, runner, spec, to_solve, Path(work) / state_dir_name(anchor, gram) / "best.json",
                    clipped)


def _summary(res, space: SearchSpace, runner, spec: WorkerSpec, to_solve, best_json: Path,
             clipped: list[str]) -> dict:
    """The search's result (what ``--json`` prints), with the checks of a finished search. A parameter at the
    edge of its range is worth a note only when a searched trial put it there, not trial 0's clipped default."""
    if res.best_trial is None:
        last = next((r for r in reversed(res.records) if r.get("reason")), None)
        raise InputError(
            f"search: none of the {len(res.records)} trial(s) succeeded"
            + (f" (trial {last['trial']}: {last['reason']})" if last else "")
            + f"; no model was kept and no best.json written; records in {best_json.parent / 'trials.jsonl'}"
        )
    at_bounds = params_at_bounds(space, res.best_params or {}) if res.best_trial != 0 else []
    if at_bounds:
        info("search: the best trial sits at the edge of its range for " + ", ".join(at_bounds)
             + ": the optimum may lie outside; widen --scale/--lam/--epsilon and rerun with --force")
    first_rec = next((r for r in res.records if r.get("trial") == 0), None)
    overhead = [r["seconds"].get("solve", 0) + r["seconds"].get("write", 0) for r in res.records
                if isinstance(r.get("seconds"), dict)]
    return {
        "best_trial": res.best_trial,
        "best_score": res.best_score,
        "best_params": res.best_params,
        **({"best_solve_params": to_solve(res.best_params)} if to_solve is not None else {}),
        "best_metrics": res.best_metrics,
        "first_score": first_rec.get("score") if first_rec else None,
        "model": str(res.model),
        "trials_ok": res.n_ok,
        "trials_failed": res.n_failed,
        "trials": len(res.records),
        "mean_overhead_s": round(sum(overhead) / len(overhead), 4) if overhead else None,
        "at_bounds": at_bounds,
        "first_clipped": clipped,
        "best_json": str(best_json),
        "backend": runner.name,
        "in_memory": spec.in_memory,
        "ok": res.n_ok,
    }

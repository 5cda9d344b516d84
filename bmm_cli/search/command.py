"""``bmm search``: the driver wired to the cached BMM solver, on local threads or Ray actors, scored by a command
(``--eval``), a Python function on a resident model (``--eval-py``) or lm-evaluation-harness (``--lm-eval``).

:class:`WorkerSpec` is everything a worker needs to rebuild its trial solver and scorer where it runs (it is
pickled to Ray actors); :meth:`WorkerSpec.build` makes the :class:`~.trial.TrialWorker`, locally or on an actor.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bmm_cli.default_params import evidence_params
from bmm_cli.defaults import DEFAULT_EPS, DEFAULT_LAM, DEFAULT_SCALE
from bmm_cli.errors import InputError
from bmm_cli.factor_cache import Merger
from bmm_cli.hooks import render_command
from bmm_cli.params import Params, block_group, geometric_means
from bmm_cli.progress import info
from bmm_cli.workdir import Sources
from bmm_cli.writer import check_not_input, parse_size

from .driver import run_search
from .inmemory import ResidentModel, load_scorer, normalize_scorer_spec
from .lmeval import LmEvalScorer, check, parse_tasks
from .local import LocalRunner
from .ray import RayRunner, check_ray
from .space import SearchSpace, parse_range
from .trial import TrialWorker

MEMORY_OPTIONS = ("memory_budget", "gpu_memory_budget", "spill_dir")
ABSOLUTE_LAM_RANGE = "1e-4:1"  # --lam default: relative λ (units of tr(G)/d_in)
RELATIVE_LAM_RANGE = "0.1:10"  # --lam default with --relative-lam: factors of the default's per-layer λ


def state_dir_name(anchor: str, gram: str) -> str:
    """One search state per (anchor, Gram kind) in a work directory, so searches of several variants coexist."""
    return f"search-{anchor}-{gram}"


@dataclass
class WorkerSpec:
    """What a worker rebuilds where it runs: the solver (work dir, anchor, Gram, Merger options), the space, and
    the scorer (``hook`` command, ``eval_py`` function spec or ``lm_eval`` options)."""

    work: str
    anchor: str
    gram: str
    space: dict
    merger_kwargs: dict = field(default_factory=dict)
    hook: str | None = None
    eval_py: str | None = None
    lm_eval: dict | None = None
    timeout: float = 3600.0
    grace: float = 5.0
    lam_base: list[dict[str, float]] | None = None  # --relative-lam: the default's λ per layer-group

    @property
    def in_memory(self) -> bool:
        return self.hook is None

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
            if self.in_memory:
                scorer = load_scorer(self.eval_py) if self.eval_py else LmEvalScorer(**self.lm_eval)
                resident = ResidentModel(merger, to_params, device=merger.dev, dtype=merger.out_dt)
                return TrialWorker(materialize=materialize, resident=resident, scorer=scorer, on_close=merger.close)
            return TrialWorker(materialize=materialize, hook=self.hook, timeout=self.timeout, grace=self.grace,
                               lock=threading.Lock(), on_close=merger.close)
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


def _memory_kwargs(memory_budget, gpu_memory_budget, spill_dir) -> dict:
    """The memory options, parsed and checked up front; only the given ones (a Merger without them still works)."""
    kw: dict[str, Any] = {}
    for name, value in (("memory_budget", memory_budget), ("gpu_memory_budget", gpu_memory_budget)):
        if value is not None:
            try:
                size = parse_size(value)
            except Exception as exc:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: {exc}") from None
            if size <= 0:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: must be > 0 (e.g. 500MB, 8GB)")
            kw[name] = size
    if spill_dir is not None:
        p = Path(spill_dir)
        if p.exists() and not p.is_dir():
            raise InputError(f"--spill-dir {p}: exists and is not a directory")
        kw["spill_dir"] = p
    accepted = inspect.signature(Merger.__init__).parameters
    missing = [k for k in kw if k not in accepted]
    if missing:
        raise InputError(f"--{missing[0].replace('_', '-')}: this bmm's trial solver has no memory budget yet")
    return kw


def _objective(eval_cmd, eval_py, lm_eval, lm_eval_limit, lm_eval_include) -> tuple[dict, dict]:
    """(objective recorded in the manifest, WorkerSpec scorer fields); exactly one scorer, checked up front."""
    given = [n for n, v in (("--eval", eval_cmd), ("--eval-py", eval_py), ("--lm-eval", lm_eval)) if v]
    if len(given) != 1:
        raise InputError("give one way to score trials: --eval CMD, --eval-py MODULE:FUNCTION or --lm-eval TASKS"
                         + (f" (got {', '.join(given)})" if given else ""))
    if (lm_eval_limit is not None or lm_eval_include is not None) and not lm_eval:
        raise InputError("--lm-eval-limit / --lm-eval-include go with --lm-eval TASKS")
    if eval_cmd:
        return {"eval": eval_cmd}, {"hook": eval_cmd}
    if eval_py:
        spec = normalize_scorer_spec(eval_py)
        load_scorer(spec)  # importable, and a function: checked before heavy work
        return {"eval-py": spec}, {"eval_py": spec}
    tasks = parse_tasks(lm_eval)
    include = None if lm_eval_include is None else str(Path(lm_eval_include).resolve())
    check(tasks, lm_eval_limit, include)
    return ({"lm-eval": ",".join(tasks), "lm-eval-limit": lm_eval_limit, "lm-eval-include": include},
            {"lm_eval": {"tasks": tasks, "limit": lm_eval_limit, "include": include}})


def check_merge_eval(eval_cmd: str, trials: int, *, params_file=None, lam=None, scale=None, epsilon=None) -> None:
    """``bmm merge --eval``'s options, checked in merge's preflight (before any stage runs)."""
    if params_file is not None or lam is not None or scale is not None or epsilon is not None:
        raise InputError("bmm merge --eval searches s and λ itself: drop --params/--lam/--scale/--epsilon "
                         "(or drop --eval to merge with them)")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"--trials must be an integer >= 1, got {trials!r}")
    if not str(eval_cmd).strip():
        raise InputError("--eval: the evaluation command is empty")
    render_command(eval_cmd, {"model": "m", "trial": "0", "workdir": "w", "evaldir": "e"})


def first_point(space: SearchSpace, src, *, default_scale: float, default_lam: float,
                default_eps: float) -> dict[str, float]:
    """The first trial: bmm's default merge as far as the space can express it. Each ``lam_<b>_<group>`` is the
    geometric mean of the evidence λ (type-II maximum likelihood, :func:`bmm_cli.default_params.evidence_params`,
    kept in the work dir) of the layers in block-group b, clipped to the λ range; s and ε as the defaults. In a
    relative-λ space every factor is 1 (clipped to its range): exactly the default merge when 1 and s = 1 are in
    range."""
    if space.lam_relative:  # factors of the default's own per-layer λ: 1 is the default merge itself
        return space.default_point(default_scale=default_scale, default_lam=1.0, default_eps=default_eps)
    point = space.default_point(default_scale=default_scale, default_lam=default_lam, default_eps=default_eps)
    per_layer = evidence_params(src, scale=default_scale, eps=default_eps if src.gram == "hybrid" else None)
    layers = per_layer.num_groups
    means = geometric_means(((block_group(layer, layers, space.num_groups), group), v)
                            for layer, row in enumerate(per_layer.lams) for group, v in row.items())
    lo, hi = space.lam_range
    for name in point:
        if name.startswith("lam_"):
            _, b, group = name.split("_", 2)
            v = means.get((int(b), group))
            if v is not None:
                point[name] = float(min(max(v, lo), hi))
    return point


def search(
    work: str | os.PathLike,
    anchor: str,
    gram: str,
    eval_cmd: str | None = None,
    *,
    out: str | os.PathLike,
    eval_py: str | None = None,
    lm_eval: str | None = None,
    lm_eval_limit: float | None = None,
    lm_eval_include: str | os.PathLike | None = None,
    trials: int = 100,
    blocks: int = 3,
    scale: str = "0.7:1.3",
    lam: str | None = None,
    epsilon: str = "0:1",
    relative_lam: bool = False,
    initial: int = 10,
    seed: int = 0,
    timeout: float = 3600.0,
    parallel: int = 1,
    gpus: Sequence[str] | None = None,
    minimize: bool = False,
    trial_dir: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    factor_dtype: str = "float32",
    compute: str = "fp32",
    ray: str | None = None,
    memory_budget: str | None = None,
    gpu_memory_budget: str | None = None,
    spill_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Bayesian optimization of block-tied (s, λ[, ε]) scored by the user's evaluation; the best model at ``out``.

    ``ray``: None (local threads), ``"local"`` (start a Ray instance here), ``"auto"`` or an address
    (``ray://head:10001``, ``head:6379``): one actor per GPU of the cluster, or per ``parallel`` CPU slot.
    """
    # ---- preflight: every option, before any heavy work ---------------------------------------------------------
    if lam is None:
        lam = RELATIVE_LAM_RANGE if relative_lam else ABSOLUTE_LAM_RANGE
    space = SearchSpace(num_groups=blocks, scale_range=parse_range(scale, "scale"), lam_range=parse_range(lam, "lam"),
                        eps_range=parse_range(epsilon, "epsilon") if gram == "hybrid" else None,
                        lam_relative=bool(relative_lam))
    objective, scorer = _objective(eval_cmd, eval_py, lm_eval, lm_eval_limit, lm_eval_include)
    if ray is not None:
        if gpus:
            raise InputError("--gpus sets CUDA_VISIBLE_DEVICES of local workers; with --ray, Ray gives each actor "
                             "its GPU: drop --gpus")
        check_ray()
    elif parallel > 1 and not eval_cmd:
        raise InputError("in-memory trials (--eval-py / --lm-eval) hold one resident model per worker: run them "
                         "in parallel with --ray (one actor per GPU or CPU slot), or drop --parallel")
    merger_kwargs = dict(device=device, dtype=dtype, max_shard_size=max_shard_size, factor_dtype=factor_dtype,
                         compute=compute, **_memory_kwargs(memory_budget, gpu_memory_budget, spill_dir))
    src = Sources(Path(work), anchor, gram)
    src.proj.plan.check_block_groups(blocks, f"--blocks {blocks}")
    if out is not None:
        check_not_input(Path(out), src.proj.inputs())
    first = first_point(space, src, default_scale=DEFAULT_SCALE, default_lam=DEFAULT_LAM, default_eps=DEFAULT_EPS)
    lam_base = None
    if space.lam_relative:
        base = evidence_params(src, scale=DEFAULT_SCALE, eps=DEFAULT_EPS if gram == "hybrid" else None)
        lam_base = [dict(row) for row in base.lams]
    to_solve = solve_params_of(space, lam_base) if lam_base is not None else None
    spec = WorkerSpec(work=str(Path(work).resolve()), anchor=anchor, gram=gram, merger_kwargs=merger_kwargs,
                      space={"num_groups": space.num_groups, "lam_groups": space.lam_groups,
                             "scale_range": space.scale_range, "lam_range": space.lam_range,
                             "eps_range": space.eps_range, "lam_relative": space.lam_relative},
                      timeout=float(timeout), lam_base=lam_base, **scorer)
    # ---- workers ---------------------------------------------------------------------------------------------
    if ray is not None:
        runner = RayRunner(spec, address=ray, parallel=parallel, trial_dir=trial_dir)
    else:
        runner = LocalRunner(spec.build(), slots=parallel)
    try:
        res = run_search(space=space, workdir=work, runner=runner, objective=objective, trials=trials,
                         state_name=state_dir_name(anchor, gram), initial=initial, seed=seed, timeout=timeout,
                         minimize=minimize, gpus=gpus, trial_dir=trial_dir, out=out, force=force, first_point=first,
                         fingerprint_extra={**src.fingerprint, "gram": gram, "blocks": blocks},
                         hook=eval_cmd or None,
                         solve_params=to_solve)
    finally:
        runner.close()
    best_json = Path(work) / state_dir_name(anchor, gram) / "best.json"
    if res.best_trial is None:
        last = next((r for r in reversed(res.records) if r.get("reason")), None)
        raise InputError(
            f"search: none of the {len(res.records)} trial(s) succeeded"
            + (f" (trial {last['trial']}: {last['reason']})" if last else "")
            + f"; no model was kept and no best.json written; records in {best_json.parent / 'trials.jsonl'}"
        )
    at_bounds = params_at_bounds(space, res.best_params or {})
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
        "best_json": str(best_json),
        "backend": runner.name,
        "in_memory": spec.in_memory,
        "ok": res.n_ok,
    }

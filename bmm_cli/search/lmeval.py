"""The lm-evaluation-harness scorer (``--lm-eval TASKS [--lm-eval-limit N] [--lm-eval-include DIR]``, extra
``[lm-eval]``): the resident model wrapped by lm-eval's ``HFLM`` (an already-built model is accepted as
``pretrained``), evaluated with ``simple_evaluate`` in-process, no checkpoint per trial.

Score: the mean over the tasks of each task's primary metric, the first entry of its ``metric_list`` (a
lower-is-better one, such as perplexity, negated so that higher is always better). Every task's numeric metrics
are kept in the trial record as ``"<task>/<metric>,<filter>"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bmm_cli.errors import InputError

EXTRA = "from the bmm clone, pip install -e '.[lm-eval]'"


def _import():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise InputError(f"--lm-eval needs lm-evaluation-harness, which is not installed ({exc.name or exc}): "
                         f"{EXTRA}") from None
    return simple_evaluate, HFLM, TaskManager


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in str(text).split(",") if t.strip()]
    if not tasks:
        raise InputError(f"--lm-eval {text!r}: give one or more task names, comma-separated")
    return tasks


def check(tasks: list[str], limit: float | None, include: str | None) -> None:
    """Everything that can be checked before heavy work: the package, the include dir, the task names."""
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise InputError(f"--lm-eval-limit {limit}: must be > 0 (examples per task, or a fraction < 1)")
    if include is not None and not Path(include).is_dir():
        raise InputError(f"--lm-eval-include {include}: not a directory")
    _, _, TaskManager = _import()
    tm = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise InputError(f"--lm-eval: unknown task(s) {', '.join(unknown)}"
                         + ("" if include else " (custom task YAML: --lm-eval-include DIR)"))


def _primary(task: str, row: dict, config: dict | None, higher: dict) -> tuple[str, float, bool]:
    numeric = {k: float(v) for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr," not in k and "," in k}
    names = [m.get("metric") for m in (config or {}).get("metric_list", []) if isinstance(m, dict)]
    names = [n for n in names if isinstance(n, str)] or [k.split(",")[0] for k in numeric]
    for name in names:
        key = next((k for k in numeric if k.split(",")[0] == name), None)
        if key is not None:
            return key, numeric[key], higher.get(name, True) is not False
    raise ValueError(f"lm-eval task {task}: no numeric metric in its results ({sorted(row)[:8]})")


class LmEvalScorer:
    """``scorer(model, tokenizer, trial) -> {"score": ..., "<task>/<metric>": ...}`` for in-memory trials."""

    def __init__(self, tasks: list[str], *, limit: float | None = None, include: str | None = None,
                 batch_size: int = 8, num_fewshot: int | None = None):
        self.tasks, self.limit, self.include = list(tasks), limit, include
        self.batch_size, self.num_fewshot = batch_size, num_fewshot
        self._lm = None
        self._model_id = None
        self._tm = None

    def __call__(self, model: Any, tokenizer: Any, trial: dict) -> dict:
        simple_evaluate, HFLM, TaskManager = _import()
        if tokenizer is None:
            raise InputError("--lm-eval: the base model has no tokenizer files; lm-eval needs one")
        if self._lm is None or self._model_id != id(model):
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                            device=str(next(model.parameters()).device))
            self._model_id = id(model)
            self._tm = TaskManager(include_path=self.include)
        res = simple_evaluate(model=self._lm, tasks=self.tasks, limit=self.limit, num_fewshot=self.num_fewshot,
                              task_manager=self._tm, log_samples=False, verbosity="ERROR", bootstrap_iters=0)
        results, configs, higher = res["results"], res.get("configs", {}), res.get("higher_is_better", {})
        out: dict[str, float] = {}
        parts = []
        for task in self.tasks:
            if task not in results:
                raise ValueError(f"lm-eval returned no results for task {task}")
            row = results[task]
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{task}/{k}"] = float(v)
            key, value, up = _primary(task, row, configs.get(task), higher.get(task, {}))
            out[f"{task}/primary"] = value
            parts.append(value if up else -value)
        return {"score": sum(parts) / len(parts), **out}

"""How a search scores its trials, behind one interface, selected from a table by the option given.

=========  ==============  ==========  ====================================================================
key        option          in memory   scores a trial by
=========  ==============  ==========  ====================================================================
eval       ``--eval``      no          a shell command run on the trial's model directory (:mod:`bmm_cli.hooks`)
eval-py    ``--eval-py``   yes         ``FUNCTION(model, tokenizer, trial)`` on a resident model (:mod:`.inmemory`)
lm-eval    ``--lm-eval``   yes         lm-evaluation-harness tasks on a resident model (:mod:`.lmeval`)
=========  ==============  ==========  ====================================================================

A :class:`Scorer` checks its options before heavy work (:meth:`Scorer.objective`, which is also what the search
state records, so a resumed search must be scored the same way), turns them into a small picklable ``config``
(:meth:`Scorer.config`, carried to Ray actors) and, where the worker runs, into the keywords of its
:class:`~.trial.TrialWorker` (:meth:`Scorer.worker_kwargs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bmm_cli.errors import InputError
from bmm_cli.hooks import render_command

from .inmemory import load_scorer, normalize_scorer_spec
from .lmeval import LmEvalScorer as Harness
from .lmeval import check, parse_tasks


class Scorer:
    key: str = ""
    option: str = ""  # the ScorerOptions field that selects it
    in_memory: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.key

    def objective(self, opts: Any) -> dict:
        """The checked options as recorded in the search state (the resume fingerprint)."""
        raise NotImplementedError

    def config(self, opts: Any) -> dict:
        """What a worker needs to rebuild the scorer where it runs (picklable)."""
        raise NotImplementedError

    def worker_kwargs(self, config: dict) -> dict:
        """``hook=...`` (a command) or ``scorer=...`` (an in-memory function) for the TrialWorker."""
        raise NotImplementedError


class CommandScorer(Scorer):
    key, option, in_memory = "eval", "eval_cmd", False

    def objective(self, opts) -> dict:
        if not str(opts.eval_cmd).strip():
            raise InputError("--eval: the evaluation command is empty")
        render_command(opts.eval_cmd, {"model": "m", "trial": "0", "workdir": "w", "evaldir": "e"})
        return {"eval": opts.eval_cmd}

    def config(self, opts) -> dict:
        return {"hook": opts.eval_cmd}

    def worker_kwargs(self, config: dict) -> dict:
        return {"hook": config["hook"]}


class PythonScorer(Scorer):
    key, option, in_memory = "eval-py", "eval_py", True

    def objective(self, opts) -> dict:
        spec = normalize_scorer_spec(opts.eval_py)
        load_scorer(spec)  # importable, and a function: checked before heavy work
        return {"eval-py": spec}

    def config(self, opts) -> dict:
        return {"spec": normalize_scorer_spec(opts.eval_py)}

    def worker_kwargs(self, config: dict) -> dict:
        return {"scorer": load_scorer(config["spec"])}


class LmEvalScorer(Scorer):
    key, option, in_memory = "lm-eval", "lm_eval", True

    @staticmethod
    def _include(opts) -> str | None:
        return None if opts.lm_eval_include is None else str(Path(opts.lm_eval_include).resolve())

    def objective(self, opts) -> dict:
        tasks = parse_tasks(opts.lm_eval)
        include = self._include(opts)
        check(tasks, opts.lm_eval_limit, include)
        return {"lm-eval": ",".join(tasks), "lm-eval-limit": opts.lm_eval_limit, "lm-eval-include": include}

    def config(self, opts) -> dict:
        return {"tasks": parse_tasks(opts.lm_eval), "limit": opts.lm_eval_limit, "include": self._include(opts)}

    def worker_kwargs(self, config: dict) -> dict:
        return {"scorer": Harness(**config)}


SCORERS: dict[str, Scorer] = {s.key: s for s in (CommandScorer(), PythonScorer(), LmEvalScorer())}


def selected(opts: Any) -> Scorer:
    """The one scorer whose option is set in ``opts`` (a :class:`~bmm_cli.search.options.ScorerOptions`)."""
    given = [s for s in SCORERS.values() if getattr(opts, s.option) is not None]
    if len(given) != 1:
        ways = [f"{s.flag} {_META[s.key]}" for s in SCORERS.values()]
        raise InputError(f"give one way to score trials: {', '.join(ways[:-1])} or {ways[-1]}"
                         + (f" (got {', '.join(s.flag for s in given)})" if given else ""))
    if (opts.lm_eval_limit is not None or opts.lm_eval_include is not None) and given[0].key != "lm-eval":
        raise InputError("--lm-eval-limit / --lm-eval-include go with --lm-eval TASKS")
    return given[0]


_META = {"eval": "CMD", "eval-py": "MODULE:FUNCTION", "lm-eval": "TASKS"}

"""The search's option groups (scorer, space, optimizer, runner) and :class:`SearchOptions`, ``bmm search``'s options;
the groups every command shares live in :mod:`bmm_cli.options`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bmm_cli.errors import InputError
from bmm_cli.options import MemoryOptions, Options, OutputOptions, positive_int

from .runners import runner_class
from .scorers import selected
from .space import SearchSpace, parse_range

ABSOLUTE_LAM_RANGE = "1e-4:1"  # search's --lam default: relative λ (units of tr(G)/d_in)
RELATIVE_LAM_RANGE = "0.1:10"  # search's --lam default with --relative-lam: factors of the default's per-layer λ


@dataclass
class ScorerOptions:
    """How a search scores a trial: exactly one of a command (``eval_cmd``), a Python function (``eval_py``) or
    lm-evaluation-harness tasks (``lm_eval``); the direction and the command's time limit."""

    eval_cmd: str | None = None
    eval_py: str | None = None
    lm_eval: str | None = None
    lm_eval_limit: float | None = None
    lm_eval_include: str | Path | None = None
    minimize: bool = False
    timeout: float = 3600.0

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.eval_cmd, self.eval_py, self.lm_eval))

    @property
    def in_memory(self) -> bool:
        """Whether the given scorer works on a resident model (no checkpoint per trial)."""
        return selected(self).in_memory

    def check(self) -> tuple[dict, dict]:
        """(objective recorded in the search state, the worker's scorer fields), checked before heavy work."""
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise InputError(f"--timeout {self.timeout}: must be a positive number of seconds")
        scorer = selected(self)
        return scorer.objective(self), {"scorer": scorer.key, "scorer_config": scorer.config(self)}


@dataclass
class SpaceOptions:
    """The search space: block-groups and the ranges of s, λ (absolute or relative to the default's λ) and ε."""

    blocks: int = 1
    scale: str = "0.7:1.3"
    lam: str | None = None  # None: ABSOLUTE_LAM_RANGE, or RELATIVE_LAM_RANGE with relative_lam
    epsilon: str = "0:1"
    relative_lam: bool = False

    def space(self, gram: str):
        positive_int("blocks", self.blocks)
        lam = self.lam if self.lam is not None else (RELATIVE_LAM_RANGE if self.relative_lam else ABSOLUTE_LAM_RANGE)
        return SearchSpace(num_groups=self.blocks, scale_range=parse_range(self.scale, "scale"),
                           lam_range=parse_range(lam, "lam"),
                           eps_range=parse_range(self.epsilon, "epsilon") if gram == "hybrid" else None,
                           lam_relative=bool(self.relative_lam))


@dataclass
class TrialOptions:
    """The optimizer: total trials, random points before the GP, its seed."""

    trials: int = 100
    initial: int = 10
    seed: int = 0

    def check(self) -> None:
        positive_int("trials", self.trials)
        if isinstance(self.initial, bool) or not isinstance(self.initial, int) or self.initial < 0:
            raise InputError(f"--initial must be an integer >= 0, got {self.initial!r}")


@dataclass
class RunnerOptions:
    """Where trials run: local threads or Ray actors (``ray``: None, ``local``, ``auto`` or an address), how many at
    once, the GPU sets of local workers, and the directory of trial models."""

    parallel: int = 1
    gpus: list[str] | None = None
    ray: str | None = None
    trial_dir: str | Path | None = None

    @property
    def kind(self) -> str:
        return "local" if self.ray is None else "ray"

    def check(self, in_memory: bool) -> None:
        positive_int("parallel", self.parallel)
        runner_class(self.kind).check(self, in_memory)


@dataclass
class SearchOptions(Options):
    """``bmm search``: the scorer, the space, the optimizer, the runner, the trial cache and the written models."""

    scorer: ScorerOptions = field(default_factory=ScorerOptions)
    space: SpaceOptions = field(default_factory=SpaceOptions)
    optimizer: TrialOptions = field(default_factory=TrialOptions)
    runner: RunnerOptions = field(default_factory=RunnerOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def check(self, gram: str):
        """Every option, before heavy work; returns ``(space, objective, scorer fields, Merger keywords)``."""
        space = self.space.space(gram)
        self.optimizer.check()
        objective, scorer = self.scorer.check()
        self.runner.check(in_memory=self.scorer.in_memory)
        merger = dict(device=self.output.device, dtype=self.output.dtype, max_shard_size=self.output.max_shard_size,
                      **self.memory.merger_kwargs())
        return space, objective, scorer, merger

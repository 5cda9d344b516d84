"""Typed option groups shared by the ``bmm`` command line and the library (one default and one check per option).

A group is a dataclass whose fields are named as the library's keyword arguments (``max_shard_size``, ``lam``,
``params_file``...); its :meth:`check` raises one :class:`~bmm_cli.errors.InputError` line naming the flag. The
commands combine them: :class:`MergeOptions` (``bmm merge``) and :class:`SearchOptions` (``bmm search``).
``cli.py`` builds a command's options once and passes them down; library callers may instead give the fields as
flat keywords (``merge(base, experts, out, lam=0.2, device="cpu")``), routed to their group by
:meth:`Options.build`. The CLI's option defaults are read from these classes (a test checks that they agree).

This module imports nothing heavy: the checks import what they need when they run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError


ABSOLUTE_LAM_RANGE = "1e-4:1"  # search's --lam default: relative λ (units of tr(G)/d_in)
RELATIVE_LAM_RANGE = "0.1:10"  # search's --lam default with --relative-lam: factors of the default's per-layer λ


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of option group ``cls`` (what the CLI shows and uses)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__}.{name} has no default")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----- the groups ------------------------------------------------------------------------------------------------


@dataclass
class OutputOptions:
    """Where and how a model is written: compute device, output dtype, shard size, and whether to replace."""

    device: str = "auto"
    dtype: str | None = None
    max_shard_size: str = "5GB"
    force: bool = False

    def check(self) -> None:
        from .device import resolve_device
        from .store import parse_dtype
        from .writer import parse_size

        if self.dtype is not None:
            try:
                parse_dtype(self.dtype)
            except InputError as exc:
                raise InputError(f"--dtype {self.dtype!r}: {exc}") from None
        parse_size(self.max_shard_size)
        resolve_device(self.device)


@dataclass
class AnchorOptions:
    """The anchor merge (the prior mean): method, its ``KEY=VALUE`` options, the external model, the others rule."""

    anchor: str = "tsv"
    anchor_opts: list[str] = field(default_factory=list)
    anchor_model: str | None = None
    others: str = "anchor"

    def check(self):
        """The anchor's method (checked options parsed)."""
        from .anchor import OTHER_RULES
        from .anchors import get_method, parse_options

        method = get_method(self.anchor)
        parse_options(method, list(self.anchor_opts or []))
        if method.needs_external and not self.anchor_model:
            raise InputError(f"--anchor {method.name} needs --anchor-model DIR_OR_HUB_ID")
        if self.others not in OTHER_RULES:
            raise InputError(f"--others {self.others!r}: choose one of {', '.join(OTHER_RULES)}")
        return method


@dataclass
class ParamsOptions:
    """The solve's parameters: a params file, or one λ, s, ε for every module over ``blocks`` block-groups."""

    params_file: str | Path | None = None
    lam: float | None = None
    scale: float | None = None
    epsilon: float | None = None
    blocks: int = 1

    @property
    def given(self) -> bool:
        """Whether any value was set (``bmm merge --eval`` searches them instead)."""
        return any(v is not None for v in (self.params_file, self.lam, self.scale, self.epsilon))

    def check(self, gram: str):
        """The resolved :class:`~bmm_cli.solve.Params` (checked, no warning: the solve resolves them again)."""
        from .solve import resolve_params

        _positive_int("blocks", self.blocks)
        return resolve_params(self.params_file, lam=self.lam, scale=self.scale, eps=self.epsilon, blocks=self.blocks,
                              gram=gram, warn=False)


@dataclass
class CalibOptions:
    """Calibration texts for the data-assisted Grams: ``EXPERT=FILE`` per expert, how many, how long, batch."""

    calib: list[str] = field(default_factory=list)
    samples: int = 128
    max_len: int = 512
    batch_size: int = 8

    def check(self) -> None:
        for name in ("samples", "max_len", "batch_size"):
            _positive_int(name, getattr(self, name))


@dataclass
class MemoryOptions:
    """The trial solver's cache: storage dtype of the eigenbasis, compute precision, host/GPU budgets, spill dir."""

    factor_dtype: str = "float32"
    compute: str = "fp32"
    memory_budget: str | None = None
    gpu_memory_budget: str | None = None
    spill_dir: str | Path | None = None

    def merger_kwargs(self) -> dict[str, Any]:
        """The keywords of the trial solver (``Merger``), sizes parsed and checked; budgets only when given."""
        from .writer import parse_size

        kw: dict[str, Any] = {"factor_dtype": self.factor_dtype, "compute": self.compute}
        for name in ("memory_budget", "gpu_memory_budget"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                size = parse_size(value)
            except Exception as exc:
                raise InputError(f"{_flag(name)} {value!r}: {exc}") from None
            if size <= 0:
                raise InputError(f"{_flag(name)} {value!r}: must be > 0 (e.g. 500MB, 8GB)")
            kw[name] = size
        if self.spill_dir is not None:
            p = Path(self.spill_dir)
            if p.exists() and not p.is_dir():
                raise InputError(f"--spill-dir {p}: exists and is not a directory")
            kw["spill_dir"] = p
        return kw

    def check(self) -> None:
        self.merger_kwargs()


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
        from .search.scorers import selected

        return selected(self).in_memory

    def check(self) -> tuple[dict, dict]:
        """(objective recorded in the search state, the worker's scorer fields), checked before heavy work."""
        from .search.scorers import selected

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
        from .search.space import SearchSpace, parse_range

        _positive_int("blocks", self.blocks)
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
        _positive_int("trials", self.trials)
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
        from .search.local import runner_class

        _positive_int("parallel", self.parallel)
        runner_class(self.kind).check(self, in_memory)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{_flag(name)} must be an integer >= 1, got {value!r}")


GROUPS = (OutputOptions, AnchorOptions, ParamsOptions, CalibOptions, MemoryOptions, ScorerOptions, SpaceOptions,
          TrialOptions, RunnerOptions)


# ----- the commands' options -------------------------------------------------------------------------------------


class Options:
    """A command's options: option groups (fields typed with a group class) and plain fields."""

    def groups(self) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                yield f.name, value

    @classmethod
    def flat_defaults(cls) -> dict[str, Any]:
        """Every option by its flat (keyword) name with this command's default."""
        inst = cls()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = getattr(inst, f.name)
            if dataclasses.is_dataclass(value):
                out.update({g.name: getattr(value, g.name) for g in dataclasses.fields(value)})
            else:
                out[f.name] = value
        return out

    @classmethod
    def build(cls, **flat: Any):
        """The options from flat keywords: each goes to the group that has a field of its name (TypeError for a name
        no group has); the rest keep this command's defaults."""
        inst = cls()
        owner: dict[str, Any] = {}
        for name, group in inst.groups():
            owner.update({g.name: group for g in dataclasses.fields(group)})
        plain = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(getattr(inst, f.name))}  # type: ignore[arg-type]
        for key, value in flat.items():
            if key in owner:
                setattr(owner[key], key, value)
            elif key in plain:
                setattr(inst, key, value)
            else:
                raise TypeError(f"{cls.__name__}: unknown option {key!r}")
        return inst

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out


@dataclass
class MergeOptions(Options):
    """``bmm merge``: every stage's options; with a scorer (``--eval``...) a search picks s and λ."""

    anchor: AnchorOptions = field(default_factory=AnchorOptions)
    params: ParamsOptions = field(default_factory=ParamsOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    scorer: ScorerOptions = field(default_factory=ScorerOptions)
    optimizer: TrialOptions = field(default_factory=lambda: TrialOptions(trials=30))
    runner: RunnerOptions = field(default_factory=RunnerOptions)
    gram: str | None = None  # None: hybrid with calibration texts, free without
    work: str | Path | None = None
    allow_dtype_mismatch: bool = False
    relative_lam: bool = False

    def gram_kind(self) -> str:
        return self.gram or ("hybrid" if self.calib.calib else "free")

    def check(self):
        """Every option that needs no input file; returns ``(anchor method, gram kind, params)``."""
        from .solve import GRAM_KINDS

        method = self.anchor.check()
        self.output.check()
        self.calib.check()
        gram = self.gram_kind()
        if gram not in GRAM_KINDS:
            raise InputError(f"--gram {gram!r}: choose {', '.join(GRAM_KINDS[:-1])} or {GRAM_KINDS[-1]}")
        if (gram in ("data", "hybrid") or method.needs_data_grams) and not self.calib.calib:
            raise InputError(f"--gram {gram} / --anchor {method.name} need calibration texts: --calib 1=a.jsonl ...")
        params = self.params.check(gram)
        if not self.scorer.given:
            if self.relative_lam:
                raise InputError("--relative-lam shapes the search of --eval; without --eval there is no search: "
                                 "drop it")
            return method, gram, params
        if self.params.given:
            raise InputError("bmm merge --eval searches s and λ itself: drop --params/--lam/--scale/--epsilon "
                             "(or drop --eval to merge with them)")
        self.optimizer.check()
        self.scorer.check()
        self.runner.check(in_memory=self.scorer.in_memory)
        return method, gram, params

    def search_options(self) -> "SearchOptions":
        """The search ``merge`` runs: its scorer, trials and runner, over the block-groups of ``--blocks``."""
        return SearchOptions(scorer=self.scorer, space=SpaceOptions(blocks=self.params.blocks,
                                                                    relative_lam=self.relative_lam),
                             optimizer=self.optimizer, runner=self.runner, output=self.output)


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


COMMANDS = {"merge": MergeOptions, "search": SearchOptions}

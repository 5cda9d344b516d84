"""Typed option groups shared by the ``bmm`` command line and the library (one default and one check per option).

A group is a dataclass whose fields are named as the library's keyword arguments (``max_shard_size``, ``lam``,
``params_file``...); its :meth:`check` raises one :class:`~bmm_cli.errors.InputError` line naming the flag. The
commands combine them: ``MergeOptions`` (``bmm merge``) and ``SearchOptions`` (``bmm search``).
``cli.py`` builds a command's options once and passes them down; library callers may instead give the fields as
flat keywords (``merge(base, experts, out, lam=0.2, device="cpu")``), routed to their group by
:meth:`Options.build`. The CLI's option defaults are read from these classes (a test checks that they agree).

The groups every command shares live here (output, anchor, params, calibration, memory) with the :class:`Options`
base; the search's groups and :class:`~bmm_cli.search.options.SearchOptions` live in :mod:`bmm_cli.search.options`,
:class:`~bmm_cli.merge.MergeOptions` in :mod:`bmm_cli.merge`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .anchor import OTHER_RULES
from .anchors import get_method, parse_options
from .device import resolve_device
from .errors import InputError
from .params import resolve_params
from .store import parse_dtype
from .writer import parse_size


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


def flag(name: str) -> str:
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
        if self.dtype is not None:
            try:
                parse_dtype(self.dtype)
            except InputError as exc:
                raise InputError(f"--dtype {self.dtype!r}: {exc}") from None
        parse_size(self.max_shard_size)
        resolve_device(self.device)


@dataclass
class VocabOptions:
    """The written model's vocabulary and chat template: ``--tokenizer base|union|EXPERT`` (experts that appended
    tokens), ``--chat-template auto|base|EXPERT|FILE`` (EXPERT: a 1-based number or the expert as given)."""

    tokenizer: str = "base"
    chat_template: str = "auto"

    @property
    def given(self) -> bool:
        return (self.tokenizer, self.chat_template) != ("base", "auto")

    def check(self) -> None:
        """The spelling (what needs the models, an expert's tokens or template, is checked with them)."""
        t = str(self.tokenizer)
        if t not in ("base", "union") and not (t.isdigit() and int(t) >= 1) and not Path(t).exists():
            raise InputError(f"--tokenizer {t!r}: use base, union, an expert number (1, 2, ...) or an expert's path")
        c = str(self.chat_template)
        if c not in ("auto", "base") and not (c.isdigit() and int(c) >= 1) and not Path(c).exists():
            raise InputError(f"--chat-template {c!r}: use auto, base, an expert number, an expert's path or a "
                             "template file")


@dataclass
class AnchorOptions:
    """The anchor merge (the prior mean): method, its ``KEY=VALUE`` options, the external model, the others rule."""

    anchor: str = "tsv"
    anchor_opts: list[str] = field(default_factory=list)
    anchor_model: str | None = None
    others: str = "anchor"

    def check(self):
        """The anchor's method (checked options parsed)."""

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
        """The resolved :class:`~bmm_cli.params.Params` (checked, no warning: the solve resolves them again)."""
        positive_int("blocks", self.blocks)
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
            positive_int(name, getattr(self, name))


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
        kw: dict[str, Any] = {"factor_dtype": self.factor_dtype, "compute": self.compute}
        for name in ("memory_budget", "gpu_memory_budget"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                size = parse_size(value)
            except Exception as exc:
                raise InputError(f"{flag(name)} {value!r}: {exc}") from None
            if size <= 0:
                raise InputError(f"{flag(name)} {value!r}: must be > 0 (e.g. 500MB, 8GB)")
            kw[name] = size
        if self.spill_dir is not None:
            p = Path(self.spill_dir)
            if p.exists() and not p.is_dir():
                raise InputError(f"--spill-dir {p}: exists and is not a directory")
            kw["spill_dir"] = p
        return kw

    def check(self) -> None:
        self.merger_kwargs()


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{flag(name)} must be an integer >= 1, got {value!r}")


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



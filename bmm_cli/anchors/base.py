"""The contract every anchor method implements, and typed ``key=value`` option parsing.

An anchor method turns the task vectors of one tensor into the anchor ``U0`` (a delta from the base) for the
solvable 2-D modules, and into a merged full value ``W`` for every other tensor. Methods are pure tensor code:
the caller reads checkpoints, transposes GPT-2 ``Conv1D`` weights to ``[d_out, d_in]`` before calling
:meth:`AnchorMethod.module` (and back after), and writes the results.

Precision rule (all methods): math runs in float32, or in float64 when the task vectors are float64 (tests);
results come back on the input's device, ``module`` in ``taus.dtype``, ``other`` in
``torch.promote_types(base.dtype, taus.dtype)`` (the caller picks the checkpoint dtype).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError, NumericError
from ..store import all_finite

IterAll = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class ModuleInput:
    """One solvable module: the task vectors of a 2-D weight in ``nn.Linear`` layout ``[d_out, d_in]``."""

    key: str  # checkpoint key, e.g. "model.layers.3.self_attn.q_proj.weight"
    taus: torch.Tensor  # [T, d_out, d_in]
    base: torch.Tensor  # [d_out, d_in]  W_pre
    grams: torch.Tensor | None = None  # [T, d_in, d_in] data-assisted Grams G_t (mean x x^T per task), RegMean only
    external: torch.Tensor | None = None  # [d_out, d_in] weight of an external merged checkpoint ("external")
    # per task, a bound on rank(τ_t) known exactly (a LoRA expert's r; 0 where it leaves the module alone) or None;
    # the SVD anchors keep no more directions: an fp32 product B·A has rounding in its null space, which they would
    # otherwise keep as directions (None: no bound known for any task)
    ranks: tuple[int | None, ...] | None = None

    @property
    def num_tasks(self) -> int:
        return int(self.taus.shape[0])


@dataclass
class NoOptions:
    """A method without options."""


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A typed option field with its help text (and, for strings, the allowed values)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return dataclasses.field(default=default, metadata=meta)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests); every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _where(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


class AnchorMethod:
    """Base class. Subclasses set the class attributes and implement ``_module`` (and ``_other`` when the rule for
    "other" tensors is not ``base + mean τ``)."""

    name: str = ""
    summary: str = ""
    Options: type = NoOptions
    needs_data_grams: bool = False
    needs_external: bool = False
    needs_global_pass: bool = False  # TIES/DARE-TIES: a streamed prepass over all tensors
    is_zero: bool = False  # U0 = 0 on every solvable module: a solve keeps no U0 (the closed form's U0 = None)

    # ----- options -------------------------------------------------------------------------------------------
    def default_options(self) -> Any:
        return self.Options()

    def validate_options(self, opts: Any) -> None:
        """Range checks; raise InputError naming the option and the allowed range. Override per method."""

    def _opts(self, opts: Any) -> Any:
        if opts is None:
            return self.default_options()
        if not isinstance(opts, self.Options):
            raise InputError(
                f"anchor {self.name}: options of type {type(opts).__name__} given, expected {self.Options.__name__} "
                f"(build them with parse_options)"
            )
        self.validate_options(opts)
        return opts

    # ----- the three entry points ----------------------------------------------------------------------------
    def prepare(
        self, opts: Any, iter_all: IterAll, num_tasks: int, device: torch.device | str | None = None
    ) -> Any:
        """Global prepass (only when ``needs_global_pass``). ``iter_all()`` may be called several times; each call
        yields ``(key, taus[T, ...])`` for every floating tensor of the model in a fixed order, in the same layout
        that ``module``/``other`` will later get. ``device`` (an addition to the brief's signature; default CPU)
        is where the streamed statistics are computed. Returns a small state for ``module``/``other``."""
        return None

    def module(self, inp: ModuleInput, opts: Any, state: Any, device: torch.device | str | None) -> torch.Tensor:
        """The anchor ``U0`` (delta from base) of one 2-D module, ``[d_out, d_in]``, in ``inp.taus``'s dtype and on
        its device. The math runs on ``device`` (None: where ``taus`` lives)."""
        opts = self._opts(opts)
        self._check_input(inp)
        dev = torch.device(device) if device is not None else inp.taus.device
        cdt = compute_dtype(inp.taus.dtype)
        moved = ModuleInput(
            key=inp.key,
            taus=inp.taus.to(device=dev, dtype=cdt),
            base=inp.base.to(device=dev, dtype=cdt),
            grams=None if inp.grams is None else inp.grams.to(device=dev, dtype=cdt),
            external=None if inp.external is None else inp.external.to(device=dev, dtype=cdt),
            ranks=inp.ranks,
        )
        check_finite(inp.key, moved.taus)
        if moved.grams is not None:
            check_finite(inp.key, moved.grams, "Grams")
        if moved.external is not None:
            check_finite(inp.key, moved.external, "external weights")
        out = self._module(moved, opts, state, dev)
        if out.shape != inp.base.shape:  # a bug in a method, not a user error
            raise AssertionError(f"anchor {self.name} returned {tuple(out.shape)} for {inp.key} {_where(inp.base)}")
        if not all_finite(out):
            raise NumericError(
                f"anchor {self.name} produced NaN/Inf for {inp.key}; check that tensor's task vectors "
                f"(and Grams) for NaN/Inf or use another anchor"
            )
        return out.to(device=inp.taus.device, dtype=inp.taus.dtype)

    def other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: Any, state: Any) -> torch.Tensor:
        """The merged FULL value ``W`` of an "other" tensor (embeddings, norms, biases, heads...), computed where the
        tensors live. Non-floating tensors (int64 position ids...) come back unchanged."""
        opts = self._opts(opts)
        if not base.is_floating_point():
            return base
        if taus.dim() != base.dim() + 1 or tuple(taus.shape[1:]) != tuple(base.shape):
            raise InputError(
                f"{key}: task vectors {_where(taus)} do not match the base {_where(base)}; expected [T, *base.shape]"
            )
        out_dtype = torch.promote_types(base.dtype, taus.dtype)
        cdt = compute_dtype(out_dtype)
        w = self._other(key, base.to(cdt), taus.to(device=base.device, dtype=cdt), opts, state)
        if not all_finite(w):
            raise NumericError(f"anchor {self.name} produced NaN/Inf for {key}; check its task vectors for NaN/Inf")
        return w.to(out_dtype)

    # ----- to implement --------------------------------------------------------------------------------------
    def _module(self, inp: ModuleInput, opts: Any, state: Any, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _other(self, key: str, base: torch.Tensor, taus: torch.Tensor, opts: Any, state: Any) -> torch.Tensor:
        """Default rule for non-solved tensors: ``base + mean τ``."""
        return base + taus.mean(dim=0)

    # ----- helpers -------------------------------------------------------------------------------------------
    def _check_input(self, inp: ModuleInput) -> None:
        taus, base = inp.taus, inp.base
        if taus.dim() != 3 or not taus.is_floating_point():
            raise InputError(f"{inp.key}: task vectors must be a floating [T, d_out, d_in] stack, got {_where(taus)}")
        if taus.shape[0] < 1:
            raise InputError(f"{inp.key}: no task vectors (T = 0); give at least one expert")
        if tuple(base.shape) != tuple(taus.shape[1:]):
            raise InputError(
                f"{inp.key}: base {_where(base)} does not match task vectors {_where(taus)}; "
                f"expected base [d_out, d_in] (transpose Conv1D weights first)"
            )
        d_in = taus.shape[2]
        if self.needs_data_grams:
            g = inp.grams
            if g is None:
                raise InputError(f"{inp.key}: anchor {self.name} needs data-assisted Grams; run the gram stage first")
            if tuple(g.shape) != (taus.shape[0], d_in, d_in):
                raise InputError(
                    f"{inp.key}: Grams {_where(g)} do not match; expected [T, d_in, d_in] = "
                    f"[{taus.shape[0]}, {d_in}, {d_in}]"
                )
        if self.needs_external:
            e = inp.external
            if e is None:
                raise InputError(f"{inp.key}: anchor {self.name} needs the external checkpoint's weight for this key")
            if tuple(e.shape) != tuple(base.shape):
                raise InputError(f"{inp.key}: external weight {_where(e)} does not match the base {_where(base)}")


# ----- options ---------------------------------------------------------------------------------------------------

_TYPES = {float: "float", int: "int", bool: "bool", str: "str"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_options(method: AnchorMethod) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` per option, for help texts and the plan."""
    hints = _hints(method.Options)
    out = []
    for f in dataclasses.fields(method.Options):
        help_ = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_ = f"{help_} (one of: {', '.join(f.metadata['choices'])})".strip()
        out.append((f.name, _TYPES.get(hints[f.name], str(hints[f.name])), f.default, help_))
    return out


def _valid_keys(method: AnchorMethod) -> str:
    items = [f"{n} ({t}, default {d})" for n, t, d, _ in describe_options(method)]
    return ", ".join(items) if items else "none (this anchor takes no options)"


def _convert(method: AnchorMethod, name: str, raw: str, typ: Any, field: dataclasses.Field) -> Any:
    where = f"anchor {method.name} option {name}={raw!r}"
    if typ is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise InputError(f"{where} is not a bool; use true or false")
    if typ is int:
        try:
            return int(raw, 10)
        except ValueError:
            raise InputError(f"{where} is not an integer; use e.g. {name}={field.default}") from None
    if typ is float:
        try:
            value = float(raw)
        except ValueError:
            raise InputError(f"{where} is not a number; use e.g. {name}={field.default}") from None
        if not math.isfinite(value):
            raise InputError(f"{where} is not finite; give a finite number")
        return value
    if typ is str:
        choices = field.metadata.get("choices")
        if choices is not None and raw not in choices:
            raise InputError(f"{where} is not allowed; use one of: {', '.join(choices)}")
        return raw
    raise TypeError(f"option type {typ!r} of {method.name}.{name} is not supported")  # a bug in a method


def parse_options(method: AnchorMethod, pairs: list[str] | None) -> Any:
    """Parse ``["lam=0.3", "k=0.2"]`` into ``method.Options``: typed, range-checked, one-line errors."""
    hints = _hints(method.Options)
    fields = {f.name: f for f in dataclasses.fields(method.Options)}
    values: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise InputError(
                f"anchor {method.name} option {item!r} has no '='; write key=value (valid keys: {_valid_keys(method)})"
            )
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        raw = raw.strip()
        if name not in fields:
            raise InputError(f"unknown option {name!r} for anchor {method.name}; valid keys: {_valid_keys(method)}")
        if name in values:
            raise InputError(f"anchor {method.name} option {name} is given twice; give it once")
        values[name] = _convert(method, name, raw, hints[name], fields[name])
    opts = method.Options(**values)
    method.validate_options(opts)
    return opts


def options_dict(opts: Any) -> dict[str, Any]:
    """The options as a plain dict (for manifests and the model card)."""
    return dataclasses.asdict(opts)


def check_range(method: str, name: str, value: float, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    """Raise InputError unless ``lo (<|<=) value (<|<=) hi``."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        left = "<" if lo_open else "<="
        right = "<" if hi_open else "<="
        raise InputError(f"anchor {method} option {name}={value} is out of range; use {lo} {left} {name} {right} {hi}")


def check_finite(key: str, t: torch.Tensor, what: str = "task vectors") -> None:
    if not all_finite(t):
        raise NumericError(f"{key}: {what} contain NaN/Inf; check the expert checkpoints for this tensor")

"""Anchor methods (the prior mean ``U0`` of the BMM solve), one file per method, registered by name.

Use::

    method = get_method("ties")
    opts = parse_options(method, ["k=0.2", "lam=1.0"])
    state = method.prepare(opts, iter_all, T) if method.needs_global_pass else None
    u0 = method.module(ModuleInput(key, taus, base), opts, state, device)   # 2-D solvable modules, [d_out, d_in]
    w = method.other(key, base, taus, opts, state)                          # every other tensor: full value

A new anchor is one file holding an :class:`AnchorMethod` subclass plus one line in :data:`BUILTIN` (or, outside
this package, one ``register(MyAnchor())`` call before the CLI is imported). The CLI's choices, the shell
completions, the contract tests and the table in docs/adding-an-anchor.md all follow from :data:`METHODS`.
"""

from __future__ import annotations

import importlib

from ..errors import InputError
from .base import AnchorMethod, ModuleInput, describe_options, options_dict, parse_options
from .ties import TopK

# The built-in anchors, in the order the CLI lists them: "module:Class" of this package, one line each.
BUILTIN = (
    "pretrained:Pretrained",
    "ta:TaskArithmetic",
    "ties:Ties",
    "dare:Dare",
    "dare:DareTies",
    "tsv:TSV",
    "iso:IsoC",
    "iso:IsoCTS",
    "wudi:Wudi",
    "regmean:RegMean",
    "external:External",
)

METHODS: dict[str, AnchorMethod] = {}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(method: AnchorMethod | type[AnchorMethod] | str) -> AnchorMethod:
    """Add an anchor to :data:`METHODS`: an instance, a subclass, or ``"module:Class"`` of this package. Its
    ``name`` must be new, lower case, with ``-`` between words, and it needs a one-line ``summary``."""
    if isinstance(method, str):
        module, _, cls = method.partition(":")
        method = getattr(importlib.import_module(f".{module}", __name__), cls)
    if isinstance(method, type):
        method = method()
    if not isinstance(method, AnchorMethod):
        raise TypeError(f"register: {method!r} is not an AnchorMethod")
    name = method.name
    if not name or name != _normalize(name) or not method.summary:
        raise ValueError(f"anchor {name!r}: give it a lower-case name (words joined by '-') and a summary")
    if name in METHODS:
        raise ValueError(f"anchor {name!r} is registered already")
    METHODS[name] = method
    return method


def unregister(name: str) -> None:
    """Remove an anchor added by :func:`register` (tests)."""
    METHODS.pop(_normalize(name), None)


for _spec in BUILTIN:
    register(_spec)


def get_method(name: str) -> AnchorMethod:
    """The registered method; ``_`` and ``-`` and case are interchangeable (``dare_ties`` = ``dare-ties``)."""
    try:
        return METHODS[_normalize(name)]
    except KeyError:
        raise InputError(f"unknown anchor {name!r}; choose one of: {', '.join(METHODS)}") from None


def is_zero_anchor(method: str | AnchorMethod) -> bool:
    """Whether the anchor's ``U0`` is 0 on every solvable module (a solve then keeps no ``U0``)."""
    return (method if isinstance(method, AnchorMethod) else get_method(method)).is_zero


def markdown_table() -> str:
    """The registered anchors as a Markdown table: name, what it does, options (defaults), what it needs."""
    rows = ["| anchor | what it does | options (default) | needs |", "|---|---|---|---|"]
    for name, m in METHODS.items():
        opts = ", ".join(f"`{n}` ({d})" for n, _, d, _ in describe_options(m)) or "-"
        needs = [w for w, flag in (("calibration data", m.needs_data_grams), ("`--anchor-model`", m.needs_external),
                                   ("a prepass over all tensors", m.needs_global_pass)) if flag]
        summary = m.summary.replace("|", "\\|")
        rows.append(f"| `{name}` | {summary} | {opts} | {', '.join(needs) or '-'} |")
    return "\n".join(rows) + "\n"


__all__ = [
    "BUILTIN",
    "METHODS",
    "AnchorMethod",
    "ModuleInput",
    "TopK",
    "describe_options",
    "get_method",
    "is_zero_anchor",
    "markdown_table",
    "options_dict",
    "parse_options",
    "register",
    "unregister",
]

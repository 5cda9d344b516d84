"""Anchor methods (the prior mean ``U0`` of the BMM solve), one file per method, registered by name.

Use::

    method = get_method("ties")
    opts = parse_options(method, ["k=0.2", "lam=1.0"])
    state = method.prepare(opts, iter_all, T) if method.needs_global_pass else None
    u0 = method.module(ModuleInput(key, taus, base), opts, state, device)   # 2-D solvable modules, [d_out, d_in]
    w = method.other(key, base, taus, opts, state)                          # every other tensor: full value
"""

from __future__ import annotations

from ..errors import InputError
from .base import AnchorMethod, ModuleInput, describe_options, options_dict, parse_options
from .dare import Dare, DareTies
from .external import External
from .iso import IsoC, IsoCTS
from .pretrained import Pretrained
from .regmean import RegMean
from .ta import TaskArithmetic
from .ties import Ties, TopK
from .tsv import TSV
from .wudi import Wudi

METHODS: dict[str, AnchorMethod] = {
    m.name: m
    for m in (
        Pretrained(),
        TaskArithmetic(),
        Ties(),
        Dare(),
        DareTies(),
        TSV(),
        IsoC(),
        IsoCTS(),
        Wudi(),
        RegMean(),
        External(),
    )
}


def get_method(name: str) -> AnchorMethod:
    """The registered method; ``_`` and ``-`` and case are interchangeable (``dare_ties`` = ``dare-ties``)."""
    norm = name.strip().lower().replace("_", "-")
    try:
        return METHODS[norm]
    except KeyError:
        raise InputError(f"unknown anchor {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = [
    "METHODS",
    "AnchorMethod",
    "ModuleInput",
    "TopK",
    "describe_options",
    "get_method",
    "options_dict",
    "parse_options",
]

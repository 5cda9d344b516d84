"""The merge parameters and their file format: one scale per block-group, one λ per (block-group, module group).

A params file (what ``bmm solve --params`` reads and ``bmm search`` writes) is a flat JSON object::

    {"s_0": 1.0, "lam_0_attn_in": 0.03, ..., "lam_0_mlp_out": 0.03, "s_1": ..., "eps": 0.5}

``s_<b>`` is the scale of block-group b, ``lam_<b>_<group>`` its λ for one module group (:data:`GROUPS`) and the
optional ``eps`` the hybrid Gram's mix. Block-groups are depth-relative (:func:`block_group`): layer ``l`` of a
stack of ``n`` layers belongs to group ``min(B-1, l·B//n)``, so towers of different depth share groups by relative
depth. This module owns the format (building, parsing, checking) and the block-group rule; nothing here reads a
work directory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .defaults import DEFAULT_EPS, DEFAULT_LAM, DEFAULT_SCALE
from .errors import InputError
from .progress import info

GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # the module groups; each has its own λ


def block_group(layer: int, num_layers: int, num_groups: int) -> int:
    """The depth-relative block-group (0..num_groups-1) of layer ``layer`` in a stack of ``num_layers`` layers."""
    return min(num_groups - 1, layer * num_groups // max(num_layers, 1))


def scale_key(b: int) -> str:
    return f"s_{b}"


def lam_key(b: int, group: str) -> str:
    return f"lam_{b}_{group}"


def geometric_means(values: Iterable[tuple[tuple[int, str], float]]) -> dict[tuple[int, str], float]:
    """``{(block-group, group): geometric mean}`` of the positive values given as ``((b, group), value)``."""
    logs: dict[tuple[int, str], list[float]] = {}
    for where, v in values:
        logs.setdefault(where, []).append(math.log(v))
    return {where: math.exp(sum(v) / len(v)) for where, v in logs.items()}


@dataclass
class Params:
    """Block-tied merge parameters: one scale per block-group, one λ per (block-group, group), optional ε."""

    scales: list[float]
    lams: list[dict[str, float]]
    eps: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.scales)

    @classmethod
    def uniform(cls, num_groups: int, lam: float = DEFAULT_LAM, scale: float = DEFAULT_SCALE,
                eps: float | None = None) -> "Params":
        return cls([scale] * num_groups, [{g: lam for g in GROUPS} for _ in range(num_groups)], eps)

    @classmethod
    def from_means(cls, means: dict[tuple[int, str], float], num_groups: int, scale: float,
                   eps: float | None = None, *, missing: float = 1.0) -> "Params":
        """Params whose λ per (block-group, group) is ``means[(b, group)]`` (``missing`` where a group has no
        module) and whose every scale is ``scale``."""
        return cls([scale] * num_groups,
                   [{g: means.get((b, g), missing) for g in GROUPS} for b in range(num_groups)], eps)

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in range(self.num_groups):
            out[scale_key(b)] = self.scales[b]
            for g in GROUPS:
                out[lam_key(b, g)] = self.lams[b][g]
        if self.eps is not None:
            out["eps"] = self.eps
        return out

    @classmethod
    def from_flat(cls, d: dict, *, source: str = "params") -> "Params":
        if "solve_params" in d and isinstance(d["solve_params"], dict):  # best.json of a --relative-lam search
            d = d["solve_params"]
        elif "params" in d and isinstance(d["params"], dict):  # search/best.json
            d = d["params"]
        groups = sorted(int(k[2:]) for k in d if k.startswith("s_") and k[2:].isdigit())
        if not groups or groups != list(range(len(groups))):
            raise InputError(f"{source}: expected keys s_0..s_<B-1>, lam_<b>_<group> (and eps); got {sorted(d)[:6]}")
        known = {"eps", *(scale_key(b) for b in groups), *(lam_key(b, g) for b in groups for g in GROUPS)}
        for k in sorted(set(d) - known):
            m = re.fullmatch(r"lam_(\d+)_(\w+)", k)
            if m and int(m.group(1)) not in groups:
                raise InputError(f"{source}: {k} is for block-group {m.group(1)}, which has no s_{m.group(1)} "
                                 f"(the file has s_0..s_{len(groups) - 1}); add s_{m.group(1)} or remove {k}")
            raise InputError(f"{source}: unknown key {k!r}; expected s_0..s_{len(groups) - 1}, "
                             f"lam_<b>_<group> (group: {', '.join(GROUPS)}) and eps")
        scales, lams = [], []
        for b in groups:
            scales.append(_num(d, scale_key(b), source))
            lams.append({g: _num(d, lam_key(b, g), source) for g in GROUPS})
        eps = _num(d, "eps", source) if "eps" in d else None
        p = cls(scales, lams, eps)
        p.validate(source)
        return p

    def validate(self, source: str = "params") -> None:
        for b, row in enumerate(self.lams):
            for g, v in row.items():
                if not (v > 0 and math.isfinite(v)):
                    raise InputError(f"{source}: lam_{b}_{g} = {v} must be a positive number")
        for b, s in enumerate(self.scales):
            if not (s > 0 and math.isfinite(s)):
                raise InputError(f"{source}: s_{b} = {s} must be a positive number (s = 0 gives back the base "
                                 "model, s < 0 subtracts the merged task vector)")
        if self.eps is not None and not (0.0 <= self.eps <= 1.0):
            raise InputError(f"{source}: eps = {self.eps} must lie in [0, 1]")

    def lam_scale(self, proj, blk, group: str) -> tuple[float, float]:
        """(λ, s) of a module of ``group`` in block ``blk`` of ``proj``'s plan."""
        b = proj.plan.block_group(blk, self.num_groups)
        return self.lams[b][group], self.scales[b]


def _num(d: dict, k: str, source: str) -> float:
    try:
        return float(d[k])
    except KeyError:
        raise InputError(f"{source}: missing {k}") from None
    except (TypeError, ValueError):
        raise InputError(f"{source}: {k} = {d[k]!r} is not a number") from None


def load_params(path: str | Path) -> Params:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"--params {p}: file not found") from None
    except ValueError:
        raise InputError(f"--params {p}: not valid JSON") from None
    if not isinstance(d, dict):
        raise InputError(f"--params {p}: expected a JSON object")
    return Params.from_flat(d, source=str(p))


def resolve_params(params_file: str | Path | None, *, lam: float | None, scale: float | None, eps: float | None,
                   blocks: int, gram: str, warn: bool = True) -> Params:
    """The parameters named by ``--params`` or ``--lam/--scale/--epsilon`` (checked); ``warn=False`` for a preflight
    check whose stage resolves them again (and warns then, once)."""
    if eps is not None and gram != "hybrid":
        raise InputError(f"--epsilon {eps:g} mixes the Gram kinds of --gram hybrid; with --gram {gram} it has no "
                         "effect: drop it or pass --gram hybrid")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"--scale {scale:g} must be a positive number (s = 0 gives back the base model, s < 0 "
                         "subtracts the merged task vector)")
    if params_file is not None:
        if lam is not None or scale is not None:
            raise InputError("give either --params FILE or --lam/--scale, not both")
        if blocks != 1:
            raise InputError(f"--blocks {blocks} goes with --lam/--scale; the params file {params_file} sets the "
                             "block-groups itself (s_0..s_<B-1>)")
        p = load_params(params_file)
        if eps is not None:
            p.eps = eps
    else:
        p = Params.uniform(blocks, DEFAULT_LAM if lam is None else lam, DEFAULT_SCALE if scale is None else scale,
                           eps)
    if gram == "hybrid" and p.eps is None:
        p.eps = DEFAULT_EPS
    if gram != "hybrid":
        if p.eps is not None and warn:
            info(f"bmm: warning: {params_file}: eps = {p.eps:g} is ignored with --gram {gram} (it mixes the Gram "
                 "kinds of --gram hybrid)")
        p.eps = None
    p.validate("--lam/--scale" if params_file is None else str(params_file))
    return p

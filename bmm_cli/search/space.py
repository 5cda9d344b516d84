"""The search space: per block-group a scale ``s_b`` and one λ per module group, plus ε for the hybrid Gram."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from bmm_cli.errors import InputError
from bmm_cli.params import GROUPS as LAM_GROUPS
from bmm_cli.params import lam_key, scale_key


def _range(name: str, r: Sequence[float], *, positive: bool = False, unit: bool = False) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be two numbers (low, high), got {r!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"{name} must be finite with low <= high, got ({lo:g}, {hi:g})")
    if positive and lo <= 0:
        raise InputError(f"{name} is searched log-uniformly: its low end must be > 0, got {lo:g}")
    if unit and (lo < 0 or hi > 1):
        raise InputError(f"{name} must lie within [0, 1], got ({lo:g}, {hi:g})")
    return lo, hi


@dataclass(frozen=True)
class SearchSpace:
    """The BMM hyper-parameters: per block-group ``b`` a scale ``s_b`` (uniform) and one λ per module group
    (log-uniform), plus ε (uniform) for the hybrid Gram.

    Parameter names: ``s_{b}``, ``lam_{b}_{g}`` (g in ``lam_groups``), ``eps``. A range with low == high is a
    constant: it appears in the parameters but is not searched. With ``lam_relative`` each ``lam_{b}_{g}`` is a
    factor applied to the default's per-layer λ (the evidence λ) of the layers in block-group b, not λ itself.
    """

    num_groups: int
    lam_groups: tuple[str, ...] = LAM_GROUPS
    scale_range: tuple[float, float] = (0.7, 1.3)
    lam_range: tuple[float, float] = (1e-4, 1.0)
    eps_range: tuple[float, float] | None = None
    lam_relative: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise InputError(f"the number of block-groups must be an integer >= 1, got {self.num_groups!r}")
        groups = tuple(str(g) for g in self.lam_groups)
        if not groups or len(set(groups)) != len(groups) or any(not re.fullmatch(r"\w+", g) for g in groups):
            raise InputError(f"λ groups must be distinct identifiers, got {self.lam_groups!r}")
        object.__setattr__(self, "lam_groups", groups)
        object.__setattr__(self, "scale_range", _range("scale range", self.scale_range))
        object.__setattr__(self, "lam_range", _range("λ range", self.lam_range, positive=True))
        if self.eps_range is not None:
            object.__setattr__(self, "eps_range", _range("ε range", self.eps_range, unit=True))

    # -- structure ---------------------------------------------------------------------------------------------

    def specs(self) -> list[tuple[str, float, float, str]]:
        """Every parameter as ``(name, low, high, prior)``, in the fixed order x uses."""
        out: list[tuple[str, float, float, str]] = []
        for b in range(self.num_groups):
            out.append((scale_key(b), *self.scale_range, "uniform"))
            for g in self.lam_groups:
                out.append((lam_key(b, g), *self.lam_range, "log-uniform"))
        if self.eps_range is not None:
            out.append(("eps", *self.eps_range, "uniform"))
        return out

    @property
    def names(self) -> list[str]:
        """All parameter names (searched and constant)."""
        return [s[0] for s in self.specs()]

    @property
    def dim_names(self) -> list[str]:
        """The searched parameters (the coordinates of x), in order."""
        return [s[0] for s in self.specs() if s[1] < s[2]]

    def dimensions(self) -> list:
        """scikit-optimize dimensions of the searched parameters."""
        from skopt.space import Real

        return [Real(lo, hi, prior=prior, name=name) for name, lo, hi, prior in self.specs() if lo < hi]

    # -- conversions -------------------------------------------------------------------------------------------

    def to_params(self, x: Sequence[float]) -> dict[str, float]:
        """Named parameters from an optimizer point (constants filled in)."""
        specs = self.specs()
        searched = [s for s in specs if s[1] < s[2]]
        if len(x) != len(searched):
            raise InputError(f"a point of this search space has {len(searched)} coordinates, got {len(x)}")
        it = iter(float(v) for v in x)
        return {name: (next(it) if lo < hi else lo) for name, lo, hi, _ in specs}

    def from_params(self, params: Mapping[str, float]) -> list[float]:
        """The optimizer point of named parameters (constants are checked, not included)."""
        out = []
        for name, lo, hi, _ in self.specs():
            if name not in params:
                raise InputError(f"parameter {name} is missing (this space has: {', '.join(self.names)})")
            v = float(params[name])
            tol = 1e-9 * max(abs(lo), abs(hi), 1e-12)
            if not math.isfinite(v) or v < lo - tol or v > hi + tol:
                raise InputError(f"parameter {name}={v:g} lies outside its range [{lo:g}, {hi:g}]")
            if lo < hi:
                out.append(min(max(v, lo), hi))
        unknown = sorted(set(params) - set(self.names))
        if unknown:
            raise InputError(f"unknown parameter(s) {', '.join(unknown)} (this space has: {', '.join(self.names)})")
        return out

    def default_point(self, default_scale: float = 1.0, default_lam: float = 1.0,
                      default_eps: float = 0.5) -> dict[str, float]:
        """A first trial inside the space: every s_b = ``default_scale``, every λ = ``default_lam``, ε =
        ``default_eps``, each clipped to its range.

        The default λ = 1 is the relative prior weight equal to the mean eigenvalue of Ĝ (``m = tr(G)/d_in``):
        data and anchor weighed evenly, whatever the model.
        """
        params = {}
        for name, lo, hi, prior in self.specs():
            v = default_scale if name.startswith("s_") else default_eps if name == "eps" else default_lam
            params[name] = float(min(max(float(v), lo), hi))
        return params

    def unpack(self, params: Mapping[str, float]) -> tuple[list[float], list[dict[str, float]], float | None]:
        """``(scales[b], lams[b][group], eps or None)`` from named parameters."""
        scales = [float(params[scale_key(b)]) for b in range(self.num_groups)]
        lams = [{g: float(params[lam_key(b, g)]) for g in self.lam_groups} for b in range(self.num_groups)]
        eps = float(params["eps"]) if self.eps_range is not None else None
        return scales, lams, eps

    def describe(self) -> dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "lam_groups": list(self.lam_groups),
            "scale_range": list(self.scale_range),
            "lam_range": list(self.lam_range),
            "eps_range": None if self.eps_range is None else list(self.eps_range),
            "params": [list(s) for s in self.specs()],
            **({"lam_relative": True} if self.lam_relative else {}),
        }

    def fingerprint(self) -> str:
        """A stable hash of the space (names, ranges, priors, order): equal spaces, equal fingerprints."""
        blob = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]



def parse_range(text: str, what: str) -> tuple[float, float]:
    """'1.0:1.3' -> (1.0, 1.3); a single number is a constant (not searched)."""
    lo, sep, hi = str(text).partition(":")
    try:
        a = float(lo)
        b = float(hi) if sep else a
    except ValueError:
        raise InputError(f"--{what} {text!r}: expected LOW:HIGH, e.g. 1e-4:1, or one number") from None
    if b < a:
        raise InputError(f"--{what} {text!r}: LOW must not exceed HIGH")
    return a, b


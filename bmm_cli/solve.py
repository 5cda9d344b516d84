"""Stage 4, ``bmm solve``: the MAP merge ``U = (B̂ + λ·U0)(Ĝ + λI)⁻¹``, ``W = W_pre + s·U``, written as a model.

λ is given per (block-group, group) and s per block-group, as a params file (``s_0``, ``lam_0_attn_in``, ...,
``eps``; the format ``bmm search`` writes) or as one ``--lam``/``--scale`` for everything. ``--gram hybrid`` mixes
the data-free and data-assisted statistics with ``ε``. Other tensors come from the anchor stage. The solve streams
one block at a time on ``--device`` (CUDA when present) in fp32.

For a search, :func:`prepare_trials` caches what does not depend on (λ, s) — the eigenbasis of Ĝ and the projections
``B̂Q``, ``U0Q`` — in ``<work>/factors-<anchor>-<gram>/`` once, and :class:`Merger` then costs about one GEMM per
module per trial.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from .anchor import AnchorStage
from .arch import GROUPS, Block
from .closed_form import ModuleFactors, TrialSolver, factorize, hybrid_stats, solve_direct
from .device import resolve_device
from .errors import InputError
from .progress import track
from .stage import Stage
from .store import DTYPES, ModelWriter, model_card, parse_dtype, parse_size
from .taskvec import Project, from_linear, load_project
from .gram import GramStage

GRAM_KINDS = ("free", "data", "hybrid")
from .defaults import DEFAULT_EPS, DEFAULT_LAM, DEFAULT_SCALE  # noqa: F401  (re-exported)


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

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in range(self.num_groups):
            out[f"s_{b}"] = self.scales[b]
            for g in GROUPS:
                out[f"lam_{b}_{g}"] = self.lams[b][g]
        if self.eps is not None:
            out["eps"] = self.eps
        return out

    @classmethod
    def from_flat(cls, d: dict, *, source: str = "params") -> "Params":
        if "params" in d and isinstance(d["params"], dict):  # search/best.json
            d = d["params"]
        groups = sorted(int(k[2:]) for k in d if k.startswith("s_") and k[2:].isdigit())
        if not groups or groups != list(range(len(groups))):
            raise InputError(f"{source}: expected keys s_0..s_<B-1>, lam_<b>_<group> (and eps); got {sorted(d)[:6]}")
        known = {"eps", *(f"s_{b}" for b in groups), *(f"lam_{b}_{g}" for b in groups for g in GROUPS)}
        for k in sorted(set(d) - known):
            m = re.fullmatch(r"lam_(\d+)_(\w+)", k)
            if m and int(m.group(1)) not in groups:
                raise InputError(f"{source}: {k} is for block-group {m.group(1)}, which has no s_{m.group(1)} "
                                 f"(the file has s_0..s_{len(groups) - 1}); add s_{m.group(1)} or remove {k}")
            raise InputError(f"{source}: unknown key {k!r}; expected s_0..s_{len(groups) - 1}, "
                             f"lam_<b>_<group> (group: {', '.join(GROUPS)}) and eps")
        scales, lams = [], []
        for b in groups:
            scales.append(_num(d, f"s_{b}", source))
            lams.append({g: _num(d, f"lam_{b}_{g}", source) for g in GROUPS})
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

    def lam_scale(self, proj: Project, blk: Block, group: str) -> tuple[float, float]:
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
                   blocks: int, gram: str) -> Params:
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
        if p.eps is not None:
            from .progress import info

            info(f"bmm: warning: {params_file}: eps = {p.eps:g} is ignored with --gram {gram} (it mixes the Gram "
                 "kinds of --gram hybrid)")
        p.eps = None
    p.validate("--lam/--scale" if params_file is None else str(params_file))
    return p


# ----------------------------------------------------------------------------------------------------------------


class Sources:
    """The finished stages a solve reads: project, anchor, Gram statistics."""

    def __init__(self, work: Path, anchor: str, gram: str):
        if gram not in GRAM_KINDS:
            raise InputError(f"--gram {gram!r}: choose free, data or hybrid")
        self.work = Path(work)
        self.proj = load_project(work)
        self.anchor = AnchorStage(work, anchor)
        if self.anchor.manifest["inputs"].get("taskvec") != self.proj.fingerprint:
            raise InputError(f"{self.anchor.dir}: made from other task vectors; rerun `bmm anchor --force`")
        self.gram = gram
        kinds = ("free", "data") if gram == "hybrid" else (gram,)
        self.grams = {k: GramStage(work, k) for k in kinds}
        for gs in self.grams.values():
            if gs.manifest["inputs"].get("taskvec") != self.proj.fingerprint:
                raise InputError(f"{gs.dir}: made from other task vectors; rerun `bmm gram --force`")

    @property
    def fingerprint(self) -> dict:
        return {"taskvec": self.proj.fingerprint, "anchor": self.anchor.id,
                **{f"gram-{k}": g.id for k, g in self.grams.items()}}

    def out_entries(self, dtype: torch.dtype | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        out = []
        for k, meta in self.proj.base.meta.items():
            dt = DTYPES[meta.dtype]
            out.append((k, meta.shape, dtype if (dtype is not None and dt.is_floating_point) else dt))
        return out

    def recipe(self, params: Params, **extra) -> dict:
        return {
            "tool": f"bmm {__version__}",
            "merge": "bmm",
            "base": str(self.proj.base.root),
            "experts": [str(e.root) for e in self.proj.experts],
            "anchor": {"method": self.anchor.method.name, "options": self.anchor.manifest["options"]},
            "gram": self.gram,
            "params": params.flat(),
            "blocks": params.num_groups,
            **extra,
        }

    def write_others(self, writer: ModelWriter) -> None:
        r = self.anchor.others()
        for key in self.proj.plan.others:
            if not writer.shard_done(key):
                writer.add(key, r.get(key))


def solve(
    work: Path,
    anchor: str,
    gram: str = "free",
    *,
    out: Path,
    params_file: str | Path | None = None,
    lam: float | None = None,
    scale: float | None = None,
    epsilon: float | None = None,
    blocks: int = 1,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> dict:
    """One closed-form solve of the whole model, streamed per block, written as an HF model at ``out``."""
    t0 = time.perf_counter()
    src = Sources(work, anchor, gram)
    params = resolve_params(params_file, lam=lam, scale=scale, eps=epsilon, blocks=blocks, gram=gram)
    dev = resolve_device(device)
    out_dt = parse_dtype(dtype) if dtype else None
    proj = src.proj
    writer = ModelWriter(Path(out), src.out_entries(out_dt), max_shard_size=parse_size(max_shard_size),
                         copy_from=proj.base.root, force=force, inputs=proj.inputs(),
                         plan_id=json.dumps([src.fingerprint, params.flat()], sort_keys=True))
    stats = {"modules": 0, "max_rel_change": 0.0}
    for blk in track(proj.plan.blocks, f"solve ({gram}, anchor {src.anchor.method.name})"):
        if all(writer.shard_done(r.key) for r in blk.modules):
            continue
        a = src.anchor.block(blk)
        g = {k: gs.block(blk) for k, gs in src.grams.items()}
        for ref in blk.modules:
            lam_v, s = params.lam_scale(proj, blk, ref.group)
            u0 = a.get(ref.key).to(dev)
            if gram == "hybrid":
                st = hybrid_stats(g["free"](ref.key).to(dev), g["data"](ref.key).to(dev), params.eps, key=ref.key)
            else:
                st = g[gram](ref.key).to(dev)
            U = solve_direct(st.G_hat, st.B_hat, u0, lam_v, key=ref.key, dtype=torch.float32)
            w0 = proj.base_linear(ref).to(dev)
            W = w0 + s * U
            stats["modules"] += 1
            stats["max_rel_change"] = max(stats["max_rel_change"],
                                          float((W - w0).norm() / w0.norm().clamp_min(1e-12)))
            writer.add(ref.key, from_linear(ref, W.cpu()))
    src.write_others(writer)
    recipe = src.recipe(params)
    writer.close(recipe=recipe, card=model_card({"title": f"BMM merge ({gram}, anchor {src.anchor.method.name})",
                                                 **recipe}))
    return {"model": str(out), "anchor": src.anchor.method.name, "gram": gram, "params": params.flat(),
            "device": str(dev), "modules": stats["modules"],
            "max_relative_change": round(stats["max_rel_change"], 6), "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------------------------
# the cached path for many trials


def factors_stage_name(anchor: str, gram: str) -> str:
    return f"factors-{anchor}-{gram}"


def prepare_trials(src: Sources, *, device: torch.device, factor_dtype: torch.dtype = torch.float32) -> Stage | None:
    """Cache ``Q, Λ, B̂Q, U0Q`` per module (one eigh each) in the work dir; None for hybrid (ε changes Q)."""
    if src.gram == "hybrid":
        return None
    # eigh in fp64, once per module: an fp32 eigh leaves ~1e-7·λ_max of rounding noise in Ĝ's null space, which
    # 1/(Λ+λ) amplifies at the small end of the λ range (2e-2 relative error at λ=1e-3, 20x less in fp64:
    # bench/README.md). Storage stays in ``factor_dtype``, so trials cost the same.
    stage = Stage(src.work, factors_stage_name(src.anchor.method.name, src.gram), inputs=src.fingerprint,
                  options={"factor_dtype": str(factor_dtype), "eigh_dtype": "torch.float64"},
                  force=True)  # a cache derived from finished stages: rebuilt (not refused) when they or its options change
    todo = [b for b in src.proj.plan.blocks if not stage.done(b.shard)]
    for blk in track(todo, "factorize Ĝ (once per search)", total=len(todo)):
        a = src.anchor.block(blk)
        g = src.grams[src.gram].block(blk)
        out = {}
        for ref in blk.modules:
            st = g(ref.key).to(device)
            u0 = None if src.anchor.method.name == "pretrained" else a.get(ref.key).to(device)  # zero: no U0Q
            f = factorize(st.G_hat, st.B_hat, u0, key=ref.key, dtype=torch.float64, factor_dtype=factor_dtype)
            out.update({k: v.cpu() for k, v in f.tensors(ref.key).items()})
        stage.write(blk.shard, out)
    stage.finish()
    return stage


class Merger:
    """Writes merged models for many parameter settings; a trial costs about one GEMM per module."""

    def __init__(self, work: Path, anchor: str, gram: str, *, device: str = "auto", dtype: str | None = None,
                 max_shard_size: str | int = "5GB", factor_dtype: str = "float32", spill: bool = False,
                 compute: str = "fp32"):
        self.src = Sources(work, anchor, gram)
        self.dev = resolve_device(device)
        self.out_dt = parse_dtype(dtype) if dtype else None
        self.max_shard_size = parse_size(max_shard_size)
        proj = self.src.proj
        stage = prepare_trials(self.src, device=self.dev, factor_dtype=parse_dtype(factor_dtype))
        self.solver = TrialSolver(self.dev, compute=compute,
                                  spill_dir=(Path(work) / "search" / "spill") if spill else None)
        self.group_of: dict[str, tuple[int, str]] = {}
        for blk in track(proj.plan.blocks, "load solver cache"):
            if stage is not None:
                r = stage.read(blk.shard)
            else:
                a = self.src.anchor.block(blk)
                gf, gd = self.src.grams["free"].block(blk), self.src.grams["data"].block(blk)
            for ref in blk.modules:
                w0 = proj.base_linear(ref)
                if stage is not None:
                    f = ModuleFactors.from_tensors(ref.key, {n: r.get(n) for n in r.keys()
                                                             if n.startswith(ref.key + ".")})
                    self.solver.add(ref.key, f, w0, block=blk.index)
                else:
                    self.solver.add_hybrid(ref.key, gf(ref.key), gd(ref.key), a.get(ref.key), w0, block=blk.index)
                self.group_of[ref.key] = (blk, ref)
        self.solver.plan()

    def iter_weights(self, params: Params) -> Iterator[tuple[str, torch.Tensor]]:
        proj = self.src.proj
        lam = {k: params.lam_scale(proj, blk, ref.group)[0] for k, (blk, ref) in self.group_of.items()}
        scl = {k: params.lam_scale(proj, blk, ref.group)[1] for k, (blk, ref) in self.group_of.items()}
        eps = params.eps if self.src.gram == "hybrid" else None
        for key, W in self.solver.solve(lam, scl, eps=eps, out_dtype=torch.float32):
            blk, ref = self.group_of[key]
            yield key, from_linear(ref, W)

    def write(self, params: Params, out: Path, *, extra: dict | None = None) -> dict:
        """Solve and write one model; returns timings."""
        t0 = time.perf_counter()
        writer = ModelWriter(Path(out), self.src.out_entries(self.out_dt), max_shard_size=self.max_shard_size,
                             copy_from=self.src.proj.base.root, force=True)
        solve_s = 0.0
        t = time.perf_counter()
        for key, W in self.iter_weights(params):
            solve_s += time.perf_counter() - t
            writer.add(key, W)
            t = time.perf_counter()
        self.src.write_others(writer)
        recipe = self.src.recipe(params, **(extra or {}))
        writer.close(recipe=recipe, card=model_card({"title": "BMM merge", **recipe}))
        total = time.perf_counter() - t0
        return {"solve_s": round(solve_s, 4), "write_s": round(total - solve_s, 4)}

    def close(self) -> None:
        self.solver.close()

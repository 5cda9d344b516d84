"""Stage 4, ``bmm solve``: the MAP merge ``U = (B̂ + λ·U0)(Ĝ + λI)⁻¹``, ``W = W_pre + s·U``, written as a model.

λ is given per (block-group, group) and s per block-group, as a params file (``s_0``, ``lam_0_attn_in``, ...,
``eps``; the format ``bmm search`` writes) or as one ``--lam``/``--scale`` for everything. ``--gram hybrid`` mixes
the data-free and data-assisted statistics with ``ε``. Other tensors come from the anchor stage. The solve streams
one block at a time on ``--device`` (CUDA when present), each merged tensor written to its shard as it is made.
When a search left its factor cache in the work dir, the solve goes through it (the search trials' own code, so
``--params best.json`` rewrites the searched model bit for bit on the same device); otherwise one fp64 Cholesky
per module (fp32 is off by ~1 % at λ ~ 1e-4).

For a search, :func:`prepare_trials` caches what does not depend on (λ, s) — the eigenbasis of Ĝ and the projections
``B̂Q``, ``U0Q`` — in ``<work>/factors-<anchor>-<gram>/`` once, and :class:`Merger` then costs about one GEMM per
module per trial.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from .anchor import AnchorStage
from .arch import GROUPS, Block
from .closed_form import ModuleFactors, factorize, solve_direct
from .trials import TrialSolver
from .device import parse_budget, resolve_device
from .errors import InputError
from .progress import track
from .stage import Stage
from .store import DTYPES, parse_dtype
from .writer import ModelWriter, model_card, parse_size
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
        if "solve_params" in d and isinstance(d["solve_params"], dict):  # best.json of a --relative-lam search
            d = d["solve_params"]
        elif "params" in d and isinstance(d["params"], dict):  # search/best.json
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
        """The output tensors in the order the solve produces them (the anchor's others, then block by block), so
        the writer streams each one to its shard as it comes."""
        meta = self.proj.base.meta
        order = list(self.proj.plan.others) + [r.key for b in self.proj.plan.blocks for r in b.modules]
        listed = set(order)
        order += [k for k in meta if k not in listed]
        out = []
        for k in order:
            dt = DTYPES[meta[k].dtype]
            out.append((k, meta[k].shape, dtype if (dtype is not None and dt.is_floating_point) else dt))
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


EVIDENCE_RULE = "type-II maximum likelihood per module, geometric mean per (layer, group); s = --scale or 1"


def solve_params(src: "Sources", params_file: str | Path | None, *, lam: float | None, scale: float | None,
                 eps: float | None, blocks: int) -> Params:
    """The parameters a solve uses: the params file, or ``--lam/--scale``; with neither, the default λ is chosen
    per module by the evidence of BMM's Bayesian regression (:mod:`bmm_cli.evidence`, no validation data) and
    s = ``--scale`` or 1."""
    params = resolve_params(params_file, lam=lam, scale=scale, eps=eps, blocks=blocks, gram=src.gram)
    src.proj.plan.check_block_groups(params.num_groups,
                                     f"--blocks {blocks}" if params_file is None else str(params_file))
    if params_file is None and lam is None:
        params = evidence_params(src, scale=params.scales[0], eps=params.eps)
    return params


def evidence_params(src: "Sources", *, scale: float, eps: float | None) -> Params:
    """Per (layer, group) the evidence λ of its modules, computed once per work dir (one fp64 eigh per module) and
    kept in ``<work>/evidence-<anchor>-<gram>.json`` with the stage ids it was made from (recomputed when they
    change)."""
    from . import atomic
    from .evidence import module_lams, params_per_layer
    from .progress import info

    path = src.work / f"evidence-{src.anchor.method.name}-{src.gram}.json"
    ident = json.loads(json.dumps({**src.fingerprint, "gram": src.gram, "eps": eps, "rule": EVIDENCE_RULE}))
    try:
        kept = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        kept = None
    if isinstance(kept, dict) and kept.get("inputs") == ident and isinstance(kept.get("modules"), dict):
        lams = {k: float(v) for k, v in kept["modules"].items()}
    else:
        info(f"bmm: default λ per module by type-II maximum likelihood (one fp64 eigh each; kept in {path})")
        lams = module_lams(src.work, src.anchor.method.name, src.gram, eps=eps)
        atomic.write_json(path, {"inputs": ident, "modules": lams})
    return Params.from_flat(params_per_layer(src.work, lams, scale, eps), source=str(path))


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
    params = solve_params(src, params_file, lam=lam, scale=scale, eps=epsilon, blocks=blocks)
    proj = src.proj
    dev = resolve_device(device)
    out_dt = parse_dtype(dtype) if dtype else None
    factors = current_factors(src)  # a search's cache: solve through it, as the search's trials did
    path = "direct" if factors is None else f"factors {factors.id}"
    writer = ModelWriter(Path(out), src.out_entries(out_dt), max_shard_size=parse_size(max_shard_size),
                         copy_from=proj.base.root, force=force, inputs=proj.inputs(),
                         plan_id=json.dumps([src.fingerprint, params.flat(), path], sort_keys=True))
    stats = {"modules": 0, "max_rel_change": 0.0}
    src.write_others(writer)
    todo = [blk for blk in proj.plan.blocks if not all(writer.shard_done(r.key) for r in blk.modules)]
    for blk in track(todo, f"solve ({gram}, anchor {src.anchor.method.name})", total=len(todo)):
        for ref, W in _solve_block(src, params, blk, dev, factors):
            w0 = proj.base_linear(ref)
            stats["modules"] += 1
            stats["max_rel_change"] = max(stats["max_rel_change"],
                                          float((W - w0).norm() / w0.norm().clamp_min(1e-12)))
            writer.add(ref.key, from_linear(ref, W))
        proj.base.close()  # unmap the base: its pages read so far would stay in RSS (file-backed) to the end
    recipe = src.recipe(params, **({"lam_rule": EVIDENCE_RULE} if params_file is None and lam is None else {}))
    writer.close(recipe=recipe, card=model_card({"title": f"BMM merge ({gram}, anchor {src.anchor.method.name})",
                                                 **recipe}))
    return {"model": str(out), "anchor": src.anchor.method.name, "gram": gram, "params": params.flat(),
            "device": str(dev), "modules": stats["modules"],
            "path": "cached eigenbasis (the search's)" if factors is not None else "direct (fp64 Cholesky)",
            "max_relative_change": round(stats["max_rel_change"], 6), "seconds": round(time.perf_counter() - t0, 3)}


def _solve_block(src: Sources, params: Params, blk: Block, dev: torch.device, factors: Stage | None):
    """Yield ``(ref, W)`` (linear orientation, fp32, CPU) for one block.

    With the search's factor cache (``factors``), through the same :class:`TrialSolver` code as a search trial,
    so ``bmm solve --params best.json`` writes the searched model bit for bit (same device). Without it, one
    Cholesky per module in fp64: at the small end of the λ range (λ ~ 1e-4, low-rank task vectors) an fp32
    Cholesky is off by ~1 % (κ(Ĝ+λI) ~ λ_max/λ times fp32 rounding), the fp64 one is exact for the stored
    statistics, as accurate as the cached path.
    """
    proj = src.proj
    if factors is not None or src.gram == "hybrid":
        solver = TrialSolver(dev)
        refs = _add_block(solver, src, factors, blk)
        lam = {k: params.lam_scale(proj, blk, ref.group)[0] for k, ref in refs.items()}
        scl = {k: params.lam_scale(proj, blk, ref.group)[1] for k, ref in refs.items()}
        try:
            for key, W in solver.solve(lam, scl, eps=params.eps, out_dtype=torch.float32):
                yield refs[key], W
        finally:
            solver.close()
        return
    a = src.anchor.block(blk)
    g = src.grams[src.gram].block(blk)
    for ref in blk.modules:
        lam_v, s = params.lam_scale(proj, blk, ref.group)
        u0 = a.get(ref.key).to(dev)
        st = g(ref.key).to(dev)
        U = solve_direct(st.G_hat, st.B_hat, u0, lam_v, key=ref.key, dtype=torch.float64)
        yield ref, (proj.base_linear(ref).to(dev, torch.float64) + s * U).float().cpu()


def _add_block(solver: TrialSolver, src: Sources, stage: Stage | None, blk: Block) -> dict[str, object]:
    """Put one block's cached factors (or, for hybrid, its two statistics and the anchor) and base weights into
    ``solver``; returns {key: module ref}."""
    proj = src.proj
    refs = {}
    if stage is not None:
        r = stage.read(blk.shard)
    else:
        a = src.anchor.block(blk)
        gf, gd = src.grams["free"].block(blk), src.grams["data"].block(blk)
    for ref in blk.modules:
        w0 = proj.base_linear(ref)
        if stage is not None:
            f = ModuleFactors.from_tensors(ref.key, {n: r.get(n) for n in r.keys() if n.startswith(ref.key + ".")})
            solver.add(ref.key, f, w0, block=blk.index)
        else:
            solver.add_hybrid(ref.key, gf(ref.key), gd(ref.key), a.get(ref.key), w0, block=blk.index)
        refs[ref.key] = ref
    return refs


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
                  options=_factor_options(factor_dtype),
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


def _factor_options(factor_dtype: torch.dtype) -> dict:
    return {"factor_dtype": str(factor_dtype), "eigh_dtype": "torch.float64"}


def current_factors(src: Sources) -> Stage | None:
    """The factor cache a search left in the work dir, when it is complete and made from these very stages
    (whatever factor dtype the search used); None otherwise. Read only: nothing is rebuilt or removed."""
    if src.gram == "hybrid":
        return None
    path = src.work / factors_stage_name(src.anchor.method.name, src.gram) / "stage.json"
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or not man.get("complete") or man.get("inputs") != src.fingerprint:
        return None
    name = str(man.get("options", {}).get("factor_dtype", "")).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16", "float64"):
        return None
    stage = Stage(src.work, path.parent.name, inputs=src.fingerprint, options=_factor_options(parse_dtype(name)))
    if stage.id != man.get("id") or not all(stage.done(b.shard) for b in src.proj.plan.blocks):
        return None
    return stage


class Merger:
    """Writes merged models for many parameter settings; a trial costs about one GEMM per module.

    Where the trial cache lives (:meth:`placement` says it in one line): on the compute device while it fits
    ``gpu_memory_budget`` (CUDA), then in (pinned) host memory while it fits ``memory_budget``, streamed to the
    device block by block, then spilled to ``spill_dir`` (default: the work dir) and read back block by block,
    overlapped with the GEMMs. Budgets are bytes or sizes like ``"8GB"``; None means what is free (host:
    MemAvailable, CUDA: mem_get_info) minus a reserve. A budget below the cache keeps host memory flat in depth.
    """

    def __init__(self, work: Path, anchor: str, gram: str, *, device: str = "auto", dtype: str | None = None,
                 max_shard_size: str | int = "5GB", factor_dtype: str = "float32", compute: str = "fp32",
                 memory_budget: int | str | None = None, gpu_memory_budget: int | str | None = None,
                 spill_dir: str | Path | None = None):
        host_budget = parse_budget(memory_budget, "--memory-budget")
        gpu_budget = parse_budget(gpu_memory_budget, "--gpu-memory-budget")
        if spill_dir is not None and Path(spill_dir).exists() and not Path(spill_dir).is_dir():
            raise InputError(f"--spill-dir {spill_dir} exists and is not a directory")
        self.src = Sources(work, anchor, gram)
        self.dev = resolve_device(device)
        self.out_dt = parse_dtype(dtype) if dtype else None
        self.max_shard_size = parse_size(max_shard_size)
        proj = self.src.proj
        stage = prepare_trials(self.src, device=self.dev, factor_dtype=parse_dtype(factor_dtype))
        self._spill_dir = _spill_dir(Path(spill_dir) if spill_dir is not None else Path(work))
        self.solver = TrialSolver(self.dev, compute=compute, budget_bytes=gpu_budget, host_budget_bytes=host_budget,
                                  spill_dir=self._spill_dir)
        self.group_of: dict[str, tuple[int, str]] = {}
        for blk in track(proj.plan.blocks, "load solver cache"):
            for key, ref in _add_block(self.solver, self.src, stage, blk).items():
                self.group_of[key] = (blk, ref)
            proj.base.close()  # what stays mapped is what the cache holds (a spilled block's W_pre is not)
        self.solver.plan()

    def placement(self) -> str:
        """One line: where the trial cache lives and why (the budgets and where they came from)."""
        p = self.solver.plan()
        n, nb = p["where"], p["where_bytes"]
        cuda = p["device"].startswith("cuda")
        parts = []
        if cuda:
            parts.append(f"{n.get('device', 0)} blocks on {p['device']}")
            parts.append(f"{n.get('host', 0)} in {'pinned ' if p['pinned'] else ''}host memory")
        else:
            parts.append(f"{n.get('device', 0)} blocks in host memory")
        parts.append(f"{n.get('disk', 0)} spilled" + (f" to {p['spill_dir']}" if n.get("disk") else ""))
        src = p["budget_source"]
        why = []
        if cuda:
            why.append(f"gpu budget {_gb(p['device_budget_bytes'])}: {src['device']}")
        why.append(f"host budget {_gb(p['host_budget_bytes'])}: {src['host']}")
        held = _gb(nb.get("device", 0) + nb.get("host", 0))
        return (f"trial cache {_gb(p['bytes'])} in {p['blocks']} blocks: {', '.join(parts)} "
                f"({held} held in memory; {'; '.join(why)})")

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
        self.src.write_others(writer)
        for key, W in self.iter_weights(params):
            solve_s += time.perf_counter() - t
            writer.add(key, W)
            t = time.perf_counter()
        recipe = self.src.recipe(params, **(extra or {}))
        writer.close(recipe=recipe, card=model_card({"title": "BMM merge", **recipe}))
        total = time.perf_counter() - t0
        return {"solve_s": round(solve_s, 4), "write_s": round(total - solve_s, 4)}

    def close(self) -> None:
        self.solver.close()
        shutil.rmtree(self._spill_dir, ignore_errors=True)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


SPILL_PREFIX = "bmm-trial-cache-"


def _spill_dir(parent: Path) -> Path:
    """This process's spill directory under ``parent`` (made on the first spill, removed by close); spill dirs of
    processes that no longer run (killed searches) are removed."""
    for d in parent.glob(SPILL_PREFIX + "*") if parent.is_dir() else ():
        pid = d.name[len(SPILL_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return parent / f"{SPILL_PREFIX}{os.getpid()}-{os.urandom(3).hex()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

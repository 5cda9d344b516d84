"""The factor cache: what a search's trials share, and the :class:`Merger` that writes a model per trial.

:func:`prepare_trials` caches what does not depend on (λ, s) — the eigenbasis of Ĝ and the projections ``B̂Q``,
``U0Q`` — in ``<work>/factors-<anchor>-<gram>/`` once (one fp64 eigh per module); :class:`Merger` then costs about
one GEMM per module per trial through the :class:`~bmm_cli.trial_solver.TrialSolver`, which places the cache on
the device, in host memory or in a spill directory. ``bmm solve`` reads a complete cache
(:func:`current_factors`) so that ``--params best.json`` rewrites the searched model bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from .arch import Block
from .closed_form import ModuleFactors, factorize
from .device import parse_budget, resolve_device
from .errors import InputError
from .params import Params
from .progress import track
from .stage import Stage
from .store import parse_dtype
from .trial_solver import TrialSolver
from .workdir import Sources, factors_stage, from_linear
from .writer import ModelWriter, model_card, parse_size


def add_block(solver: TrialSolver, src: Sources, stage: Stage | None, blk: Block) -> dict[str, object]:
    """Put one block's cached factors (or, for hybrid, its two statistics and the anchor) and base weights into
    ``solver``; returns {key: module ref}."""
    proj = src.proj
    refs = {}
    if stage is not None:
        r = stage.read(blk.shard)
    else:
        a = src.anchor.block(blk)
        gf, gd = src.block_stats("free", blk, device=solver.device), src.block_stats("data", blk)
    for ref in blk.modules:
        w0 = proj.base_linear(ref)
        if stage is not None:
            f = ModuleFactors.from_tensors(ref.key, {n: r.get(n) for n in r.keys() if n.startswith(ref.key + ".")})
            solver.add(ref.key, f, w0, block=blk.index)
        else:
            solver.add_hybrid(ref.key, gf(ref.key), gd(ref.key), a.get(ref.key), w0, block=blk.index)
        refs[ref.key] = ref
    return refs


def prepare_trials(src: Sources, *, device: torch.device, factor_dtype: torch.dtype = torch.float32) -> Stage | None:
    """Cache ``Q, Λ, B̂Q, U0Q`` per module (one eigh each) in the work dir; None for hybrid (ε changes Q)."""
    if src.gram == "hybrid":
        return None
    # eigh in fp64, once per module: an fp32 eigh leaves ~1e-7·λ_max of rounding noise in Ĝ's null space, which
    # 1/(Λ+λ) amplifies at the small end of the λ range (2e-2 relative error at λ=1e-3, 20x less in fp64:
    # bench/README.md). Storage stays in ``factor_dtype``, so trials cost the same.
    # a cache derived from finished stages: rebuilt (not refused) when they or its options change
    stage = Stage(src.work, factors_stage(src.anchor.method.name, src.gram), inputs=src.fingerprint,
                  options=_factor_options(factor_dtype), force=True)
    todo = [b for b in src.proj.plan.blocks if not stage.done(b.shard)]
    for blk in track(todo, "factorize Ĝ (once per search)", total=len(todo)):
        a = src.anchor.block(blk)
        stats = src.stats64(blk, device=device)  # fp64 Ĝ, B̂: the stage's fp32 copies are noisy in Ĝ's null space
        out = {}
        for ref in blk.modules:
            st = stats(ref)
            u0 = None if src.anchor.zero else a.get(ref.key).to(device)  # zero: no U0Q
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
    path = src.work / factors_stage(src.anchor.method.name, src.gram) / "stage.json"
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
            for key, ref in add_block(self.solver, self.src, stage, blk).items():
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

"""``bmm sample``: merged models drawn from BMM's posterior (paper App. B), and the IID-noise baseline.

Each row of a module's ``U`` has the Gaussian posterior ``N(U_MAP, Σ_row)`` (paper Eq. 32). In bmm's relative units
(``Ĝ = G/m``, ``m = tr(G)/d_in``) we use

    Σ_row = r² · β⁻¹ · (Ĝ + λI)⁻¹,        r = RMS of the module's base weight W_pre,

so **β is dimensionless**: β⁻¹ is the noise variance, in units of the base weight's mean square, along a direction
whose evidence plus prior is 1 (the average evidence, Λ + λ = 1). One β then means the same across layers and
models, as relative λ does, and IID noise of relative size σ is exactly this sampler with ``Ĝ + λI`` replaced by
``I`` and ``β = σ⁻²`` — the two ensembles differ only in the *shape* of the noise. The paper's β (raw ``G``,
``Σ = β_p⁻¹(G + λ_p I)⁻¹``, ``λ_p = λm``) is ``β_p = β / (r² m)``; each module's ``m``, ``r`` and ``β_p`` are
recorded in ``samples.json``.

With ``Ĝ = QΛQᵀ`` (one eigh per sampled module, fp64) a draw is one GEMM:
``U = U_MAP + (r/√β) · E · diag((Λ+λ)^{-1/2}) · Qᵀ``, E standard normal ``[d_out, d_in]``, and the merged weight
is ``W = W_pre + s·U``: the scale s applies to the sampled ``U`` as to the MAP (so the noise in W is ``s`` times
the noise in U; the IID baseline is scaled the same way). ``W_pre + s·U_MAP`` is read from the MAP model that
``bmm solve`` writes to ``DIR/map`` (so a draw is ``W_map + s·noise``, and β = ∞ reproduces it byte for byte,
whichever solve path made it). Hybrid Grams work the same (Ĝ is mixed with ε, then eigh'd). The
search's cached factors (``factors-<anchor>-<gram>/``) are not needed: they would factorize every module of the
model, while a draw needs the eigenbasis of the sampled modules only (one eigh each, fp64, done here). Memory:
``Q`` of every sampled module stays resident (fp32) while the S models are written. With a 16-bit ``--dtype``
the noise is added to the MAP weight as stored (one extra rounding, far below the noise).

E is drawn on the CPU from a generator seeded by (``--seed``, sample index, module key): sample i is the same
whatever S is and whatever modules are sampled alongside.

Layout of ``--out DIR``: ``map/`` (the MAP model), ``sample-000/`` … (complete HF models) and ``samples.json``.
Output shards that hold no sampled module are hard links to ``map/``'s (same bytes; a model split with
``--max-shard-size`` so the sampled layer sits in a small shard costs only that shard per sample).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, atomic
from .arch import Block, ModuleRef, Plan
from .closed_form import eig_gram, hybrid_stats
from .default_params import solve_params
from .device import resolve_device
from .ensemble_metrics import log_grid, pick_best
from .errors import InputError
from .hooks import render_command, run_hook
from .params import Params
from .posterior import posterior_noise, standard_normal
from .progress import info, track
from .solve import solve
from .store import MARKER_NAME, Checkpoint, parse_dtype, read_header
from .workdir import GRAM_STATS, Sources, from_linear, to_linear
from .writer import ModelWriter, check_not_input, model_card, parse_size

MANIFEST = "samples.json"
MAP_DIR = "map"


def sample_dir(out: Path, i: int) -> Path:
    return Path(out) / f"sample-{i:03d}"


def list_samples(out: Path) -> list[Path]:
    """The sample model directories of a ``bmm sample`` output, in order (read from its manifest)."""
    path = Path(out) / MANIFEST
    try:
        man = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{out}: no {MANIFEST}; not a `bmm sample` output") from None
    except ValueError:
        raise InputError(f"{path}: not valid JSON") from None
    if not man.get("complete"):
        raise InputError(f"{out}: the `bmm sample` run that writes it has not finished; rerun it")
    return [Path(out) / name for name in man["samples"]]


# ----------------------------------------------------------------------------------------------------------------
# selection and noise


def default_modules(plan: Plan) -> list[ModuleRef]:
    """The paper's choice: the MLP-output matrix of the last block (of each stack, for two-tower models)."""
    last: dict[str, Block] = {}
    for blk in plan.blocks:
        if blk.stack not in last or blk.layer > last[blk.stack].layer:
            last[blk.stack] = blk
    mods = [m for b in last.values() for m in b.modules if m.group == "mlp_out"]
    if not mods:
        raise InputError("no mlp_out module in the last block; choose modules with --modules REGEX")
    return mods


def select_modules(plan: Plan, pattern: str | None) -> list[ModuleRef]:
    """Solvable modules whose checkpoint key matches ``pattern`` (``re.search``), or the default."""
    if pattern is None:
        return default_modules(plan)
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--modules {pattern!r}: not a valid regular expression ({exc})") from None
    mods = [m for m in plan.modules if rx.search(m.key)]
    if not mods:
        examples = ", ".join(m.key for m in plan.modules[-3:])
        raise InputError(f"--modules {pattern!r} matches no solvable module (keys look like {examples})")
    return mods


# ----------------------------------------------------------------------------------------------------------------
# per module: what every draw needs


@dataclass
class Module:
    ref: ModuleRef
    shape: tuple[int, int]  # [d_out, d_in]
    s: float
    lam: float
    r: float  # RMS of W_pre
    Q: torch.Tensor | None  # eigenbasis of Ĝ (posterior noise only), fp32 on the device
    evals: torch.Tensor | None
    m: float

    def weight(self, sample: int, W_map: torch.Tensor, *, seed: int, beta: float | None,
               iid: float | None) -> torch.Tensor:
        """One draw ``W_map + s·noise`` from the MAP model's weight (checkpoint orientation in and out, CPU).

        ``W_map = W_pre + s·U_MAP`` as `bmm solve` wrote it, so β = ∞ returns it unchanged (the same bytes).
        """
        if iid is None and math.isinf(beta):
            return W_map
        dev = self.Q.device if self.Q is not None else torch.device("cpu")
        E = standard_normal(self.shape, seed, sample, self.ref.key).to(dev)
        noise = E * (iid * self.r) if iid is not None else posterior_noise(E, self.Q, self.evals, self.lam, beta,
                                                                          self.r)
        W = to_linear(self.ref, W_map).to(device=dev, dtype=torch.float32) + self.s * noise
        return from_linear(self.ref, W.cpu())

    def describe(self, beta: float | None, iid: float | None) -> dict:
        d = {"key": self.ref.key, "shape": list(self.shape), "lam": self.lam, "s": self.s, "m": self.m,
             "base_rms": self.r}
        if iid is not None:
            d["noise_rms_rel"] = iid
        else:
            mean_inv = float((self.evals.double() + self.lam).reciprocal().mean())
            d["noise_rms_rel"] = math.sqrt(mean_inv / beta)  # E‖noise‖_F / (r·√(d_out d_in)), before s
            d["beta_paper"] = beta / (self.r ** 2 * self.m) if self.m > 0 else None
            d["evals_min_max"] = [float(self.evals.min()), float(self.evals.max())]
        return d


def prepare_modules(src: Sources, params: Params, refs: list[ModuleRef], *, dev: torch.device,
                    need_basis: bool) -> list[Module]:
    """Per sampled module: λ, s, the RMS of W_pre and, for posterior noise, the eigenbasis of Ĝ (fp64 eigh)."""
    proj = src.proj
    by_block: dict[int, list[ModuleRef]] = {}
    blocks = {}
    for blk in proj.plan.blocks:
        for ref in blk.modules:
            if ref in refs:
                by_block.setdefault(blk.index, []).append(ref)
                blocks[blk.index] = blk
    out: list[Module] = []
    for bi in track(sorted(by_block), "prepare sampled modules (eigh of Ĝ)"):
        blk = blocks[bi]
        g = {k: src.block_stats(k, blk, device=dev) for k in (GRAM_STATS if src.gram == "hybrid" else (src.gram,))}
        for ref in by_block[bi]:
            lam, s = params.lam_scale(proj, blk, ref.group)
            if src.gram == "hybrid":
                st = hybrid_stats(g["free"](ref.key), g["data"](ref.key), params.eps, key=ref.key)
            else:
                st = g[src.gram](ref.key)
            w0 = proj.base_linear(ref)
            r = float(w0.double().square().mean().sqrt())
            if not (r > 0 and math.isfinite(r)):
                raise InputError(f"{ref.key}: the base weight is all zero, so noise relative to its RMS is undefined")
            Q = evals = None
            if need_basis:
                Q64, ev64 = eig_gram(st.G_hat.to(dev), key=ref.key, dtype=torch.float64)
                Q, evals = Q64.float(), ev64.float()
            out.append(Module(ref, tuple(w0.shape), s, lam, r, Q, evals, st.m))
    return out


# ----------------------------------------------------------------------------------------------------------------
# output directory


def check_out(out: Path, src: Sources, *, force: bool) -> None:
    """Refuse an ``--out`` that holds an input or is a foreign non-empty directory (before any work)."""
    check_not_input(out, src.proj.inputs())
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is a file; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists() and not force:
        raise InputError(f"--out {out} exists and is not a `bmm sample` output; choose another path or pass --force")


def link_unchanged(writer: ModelWriter, map_dir: Path, changed: set[str]) -> int:
    """Hard-link ``map_dir``'s shards that hold no sampled key into the writer's staging directory (marked done).

    Same shard plan as the MAP model (same tensors, dtypes and --max-shard-size), so those shards are the same
    bytes; each one's header is checked to list exactly the planned keys. Returns how many were linked.
    """
    linked = 0
    for sh in writer.shards:
        if sh.name in writer.done or changed.intersection(sh.keys):
            continue
        src = map_dir / sh.name
        header, _ = read_header(src)
        if set(header) - {"__metadata__"} != set(sh.keys):
            continue  # a different layout: write it instead
        dst = writer.staging / sh.name
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # no hard links here (another file system, FAT): a copy is still correct
            shutil.copyfile(src, dst)
        writer.done.add(sh.name)
        linked += 1
    return linked


def write_sample(i: int, mods: list[Module], src: Sources, map_ckpt: Checkpoint, out: Path, *, seed: int,
                 beta: float | None, iid: float | None, out_dt, max_shard_size: int, plan_id: str,
                 recipe: dict, force: bool) -> dict:
    """One sampled model: the MAP model's tensors with the sampled modules redrawn."""
    writer = ModelWriter(sample_dir(out, i), src.out_entries(out_dt), max_shard_size=max_shard_size,
                         copy_from=src.proj.base.root, force=force, inputs=src.proj.inputs(),
                         plan_id=json.dumps([plan_id, i]), check_space=False)
    changed = {m.ref.key for m in mods}
    linked = 0
    if not writer.current:
        linked = link_unchanged(writer, map_ckpt.root, changed)
        writer.check_space()  # what is left to write: the linked shards take no space
        drawn = {m.ref.key: m for m in mods}
        for sh in writer.shards:
            if sh.name in writer.done:
                continue
            for key in sh.keys:
                W_map = map_ckpt.get(key)
                writer.add(key, drawn[key].weight(i, W_map, seed=seed, beta=beta, iid=iid) if key in drawn else W_map)
    rec = {**recipe, "sample": i}
    writer.close(recipe=rec, card=model_card({"title": f"BMM posterior sample {i}", **rec}))
    return {"linked_shards": linked, "shards": len(writer.shards)}


# ----------------------------------------------------------------------------------------------------------------
# the command


def _validate(beta: float | None, iid: float | None, samples: int, search: str | None, eval_cmd: str | None,
              grid: int) -> list[float] | None:
    """Option checks before any work; returns the β grid of ``--search-beta`` (None without it)."""
    if iid is not None and (beta is not None or search is not None):
        raise InputError("--iid SIGMA is the IID-noise baseline: it takes no --beta or --search-beta")
    if beta is not None and search is not None:
        raise InputError("give --beta B or --search-beta LOW:HIGH, not both")
    if iid is None and beta is None and search is None:
        raise InputError("--beta is required (or --search-beta LOW:HIGH, or --iid SIGMA for the IID baseline)")
    if beta is not None and not beta > 0:  # NaN fails too; inf is allowed (the MAP model)
        raise InputError(f"--beta {beta}: must be a positive number (inf gives the MAP model)")
    if iid is not None and not (iid > 0 and math.isfinite(iid)):
        raise InputError(f"--iid {iid}: must be a positive finite number (noise RMS relative to the base weight's)")
    if samples < 1:
        raise InputError(f"--samples {samples}: must be at least 1")
    if search is None:
        if eval_cmd is not None:
            raise InputError("--eval scores a β grid: it needs --search-beta LOW:HIGH")
        return None
    if not eval_cmd:
        raise InputError("--search-beta needs --eval CMD (scores one ensemble directory, {model})")
    grid_values = log_grid(search, grid)
    render_command(eval_cmd, {"model": "/x", "beta": 1.0, "workdir": "/w"})  # placeholders checked now
    return grid_values


@dataclass
class _Run:
    """What every ensemble of one command shares."""

    src: Sources
    mods: list[Module]
    map_ckpt: Checkpoint
    ident: dict
    recipe: dict
    seed: int
    out_dt: torch.dtype | None
    shard_bytes: int
    force: bool

    def write(self, out: Path, samples: int, *, beta: float | None, iid: float | None, label: str) -> int:
        """``samples`` models under ``out`` (+ its manifest); returns how many shards were hard links."""
        noise = {"iid": iid} if iid is not None else {"beta": beta}
        ident = {**self.ident, **noise}
        recipe = {**self.recipe, "sampling": {**self.recipe["sampling"], **noise}}
        plan_id = json.dumps(ident, sort_keys=True, default=str)
        linked = 0
        for i in track(range(samples), label):
            linked += write_sample(i, self.mods, self.src, self.map_ckpt, out, seed=self.seed, beta=beta, iid=iid,
                                   out_dt=self.out_dt, max_shard_size=self.shard_bytes, plan_id=plan_id,
                                   recipe=recipe, force=self.force)["linked_shards"]
        _remove_stale(out, samples)
        atomic.write_json(out / MANIFEST, {**ident, "samples": [sample_dir(out, i).name for i in range(samples)],
                                          "map": os.path.relpath(self.map_ckpt.root, out), "complete": True})
        return linked


def _search(run: _Run, out: Path, grid: list[float], samples: int, eval_cmd: str, *, minimize: bool,
            timeout: float) -> tuple[float, list[dict]]:
    """Score an ensemble per β of the grid with the user's hook; returns the best β and every record."""
    trials = out / ".beta-search"
    records = []
    for j, b in enumerate(grid):
        d = trials / f"beta-{j:02d}"
        d.mkdir(parents=True, exist_ok=True)
        run.write(d, samples, beta=b, iid=None, label=f"β {b:.4g} ({j + 1}/{len(grid)})")
        cmd = render_command(eval_cmd, {"model": d, "beta": b, "workdir": run.src.work})
        res = run_hook(cmd, env={"BMM_MODEL": str(d), "BMM_BETA": repr(b)}, timeout=timeout)
        records.append({"beta": b, "status": res.status, "score": res.score, "metrics": res.metrics,
                        "reason": res.reason, "seconds": round(res.seconds, 2)})
        info(f"β {b:.4g}: " + (f"score {res.score:.6g}" if res.ok else f"failed ({res.reason})"))
        shutil.rmtree(d)
    shutil.rmtree(trials, ignore_errors=True)
    best, _ = pick_best([(r["beta"], r["score"]) for r in records], minimize=minimize)
    atomic.write_json(out / "beta-search.json", {"grid": grid, "minimize": minimize, "best_beta": best,
                                                 "records": records})
    return best, records


def sample(
    work: Path,
    anchor: str,
    gram: str = "free",
    *,
    out: Path,
    beta: float | None = None,
    iid: float | None = None,
    samples: int = 10,
    seed: int = 0,
    modules: str | None = None,
    params_file: str | Path | None = None,
    lam: float | None = None,
    scale: float | None = None,
    epsilon: float | None = None,
    blocks: int = 1,
    search_beta: str | None = None,
    grid: int = 7,
    eval_cmd: str | None = None,
    minimize: bool = False,
    timeout: float = 3600.0,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> dict:
    """Write ``samples`` merged models drawn from the posterior (or MAP + IID noise) under ``out``.

    With ``search_beta="LOW:HIGH"`` first score one ensemble per β of a ``grid``-point log grid with ``eval_cmd``
    and keep the best β's ensemble.
    """
    t0 = time.perf_counter()
    betas = _validate(beta, iid, samples, search_beta, eval_cmd, grid)
    out = Path(out)
    src = Sources(work, anchor, gram)
    params = solve_params(src, params_file, lam=lam, scale=scale, eps=epsilon, blocks=blocks)
    refs = select_modules(src.proj.plan, modules)
    dev = resolve_device(device)
    out_dt = parse_dtype(dtype) if dtype else None
    shard_bytes = parse_size(max_shard_size)
    check_out(out, src, force=force)
    mods = prepare_modules(src, params, refs, dev=dev, need_basis=iid is None)  # may still refuse: writes nothing
    # ---- validated: from here on files are written
    out.mkdir(parents=True, exist_ok=True)
    ident = {"inputs": src.fingerprint, "params": params.flat(), "modules": [r.key for r in refs], "seed": seed}
    atomic.write_json(out / MANIFEST, {**ident, "complete": False})
    map_res = solve(work, anchor, gram, out=out / MAP_DIR, params_file=params_file, lam=lam, scale=scale,
                    epsilon=epsilon, blocks=blocks, device=device, dtype=dtype, max_shard_size=shard_bytes,
                    force=force)
    method = "iid" if iid is not None else "posterior"
    recipe = src.recipe(params, sampling={"method": method, "seed": seed, "modules": [r.key for r in refs],
                                          "cov": None if iid is not None else "r^2/beta (G_hat + lam I)^-1"})
    run = _Run(src, mods, Checkpoint.open(out / MAP_DIR, role="MAP model"), ident, recipe, seed, out_dt,
               shard_bytes, force)
    records = None
    if betas is not None:
        beta, records = _search(run, out, betas, samples, eval_cmd, minimize=minimize, timeout=timeout)
    linked = run.write(out, samples, beta=beta, iid=iid, label=f"sample ({method}, {len(mods)} modules)")
    noise = {"iid": iid} if iid is not None else {"beta": beta}
    result = {"dir": str(out), "map": str(out / MAP_DIR), "samples": [sample_dir(out, i).name for i in range(samples)],
              "method": method, **noise, "seed": seed, "params": params.flat(),
              "modules": [m.describe(beta, iid) for m in mods], "linked_shards": linked, "device": str(dev),
              "tool": f"bmm {__version__}", "map_seconds": map_res["seconds"],
              "seconds": round(time.perf_counter() - t0, 3)}
    if records is not None:
        result["beta_search"] = records
    atomic.write_json(out / MANIFEST, {**ident, **result, "complete": True})
    return result


def _remove_stale(out: Path, samples: int) -> list[str]:
    """Sample directories beyond ``samples`` left by an earlier run with more samples (bmm outputs only)."""
    gone = []
    for p in sorted(out.glob("sample-[0-9][0-9][0-9]*")):
        idx = p.name.removeprefix("sample-")
        if idx.isdigit() and int(idx) >= samples and (p / MARKER_NAME).exists():
            shutil.rmtree(p)
            gone.append(p.name)
    return gone


__all__ = ["sample", "list_samples", "select_modules", "default_modules", "sample_dir", "MANIFEST", "MAP_DIR"]

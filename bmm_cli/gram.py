"""Stage 3, ``bmm gram``: the normalised statistics ``Ĝ``, ``B̂`` (and ``m``) of every solvable module.

``--kind free`` (paper Eq. 15): from the task vectors alone, ``G = Σ U_tᵀU_t``, ``B = Σ U_t U_tᵀ U_t``.
``--kind data`` (Eq. 8): each expert runs on its own calibration texts; ``G_t`` = mean ``x xᵀ`` of each module's
input over non-padding tokens, ``G = Σ G_t``, ``B = Σ U_t G_t``. Per-task Grams are kept (``t<t>-block-NNN``)
for RegMean. Both are normalised by ``m = tr(G)/d_in`` (relative λ). Layout: ``<work>/gram-<kind>/block-NNN``.

The data kind is what ``--gram data``, ``hybrid`` and RegMean read. The free kind is stored for inspection only: the
solve, the evidence λ, the factor cache and ``bmm sample`` compute the data-free statistics from the task vectors
themselves (:meth:`bmm_cli.workdir.Sources.stats64` in fp64, :meth:`~bmm_cli.workdir.Sources.block_stats` in fp32),
so ``bmm merge`` never writes ``gram-free/``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from .activations import capture_grams, read_calibration
from .closed_form import data_stats
from .device import resolve_device
from .errors import InputError
from .progress import info, track
from .stage import Stage
from .store import DTYPES, ShardReader, parse_dtype
from .taskvec import check_data_experts
from .workdir import GRAM_STATS, Project, gram_stage, load_project, task_shard


def parse_calib(specs: list[str], experts: list[str]) -> dict[int, str]:
    """``--calib E=path`` per expert (E: 1-based index, the expert's path as given, or its directory name);
    one bare ``--calib path`` means the same texts for every expert."""
    if not specs:
        raise InputError("--kind data needs calibration texts: --calib 1=task1.jsonl --calib 2=task2.jsonl ...")
    if len(specs) == 1 and "=" not in specs[0]:
        info("bmm: one --calib file for all experts; the paper uses each expert's own task data")
        return {t: specs[0] for t in range(len(experts))}
    out: dict[int, str] = {}
    names: dict[str, int] = {}
    for t, e in enumerate(experts):
        for name in (str(t + 1), e, str(Path(e)), Path(e).name, str(_resolved(e)), _resolved(e).name):
            names.setdefault(name, t)
    for spec in specs:
        who, sep, path = spec.partition("=")
        if not sep or not path:
            raise InputError(f"--calib {spec!r}: expected EXPERT=PATH (EXPERT: 1-based index, path or directory name)")
        t = names.get(who, names.get(str(_resolved(who))))
        if t is None:
            raise InputError(f"--calib {spec!r}: {who!r} is not an expert (use 1..{len(experts)} or an expert's "
                             "directory name)")
        out[t] = path
    missing = [str(t + 1) for t in range(len(experts)) if t not in out]
    if missing:
        raise InputError(f"--calib: no calibration file for expert(s) {', '.join(missing)}")
    for t, path in out.items():
        if not Path(path).exists():
            raise InputError(f"--calib {t + 1}={path}: file not found")
        if not Path(path).is_file():
            raise InputError(f"--calib {t + 1}={path}: not a regular file (give a .jsonl, .json or .txt file)")
    return dict(sorted(out.items()))


def _resolved(path: str) -> Path:
    """The absolute, symlink-free form of an expert path (a ``BASE+ADAPTER`` spec or hub id resolves harmlessly)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(path)


def gram(
    work: Path,
    kind: str = "free",
    *,
    calib: list[str] | None = None,
    samples: int = 128,
    max_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
    model_dtype: str = "auto",
    force: bool = False,
) -> dict:
    """Compute the Gram stage of ``kind`` (resumable per block, and per expert for ``data``)."""
    t0 = time.perf_counter()
    if kind not in GRAM_STATS:
        raise InputError(f"--kind {kind!r}: choose free or data (hybrid mixes both at solve time)")
    dev = resolve_device(device)
    proj = load_project(work)
    if kind == "free":
        stage = Stage(work, gram_stage(kind), inputs={"taskvec": proj.fingerprint}, options={}, force=force)
        todo = [b for b in proj.plan.blocks if not stage.done(b.shard)]
        for blk in track(todo, "gram free", total=len(todo)):
            reader = proj.reader(blk)
            out: dict[str, torch.Tensor] = {}
            for ref in blk.modules:
                out.update(proj.free_stats(blk, ref, reader, device=dev).tensors(ref.key))
            stage.write(blk.shard, out)
        stage.finish(kind=kind)
        return {"stage": stage.name, "dir": str(stage.dir), "kind": kind, "blocks": len(proj.plan.blocks),
                "blocks_written": len(todo), "seconds": round(time.perf_counter() - t0, 3)}
    return _gram_data(proj, work, calib or [], samples=samples, max_len=max_len, batch_size=batch_size, seed=seed,
                      dev=dev, model_dtype=model_dtype, force=force, t0=t0)


def _gram_data(proj: Project, work: Path, calib: list[str], *, samples, max_len, batch_size, seed, dev, model_dtype,
               force, t0) -> dict:
    check_data_experts(proj.experts, proj.plan)  # LoRA experts and MoE expert FFNs: refused before any work
    expert_paths = [str(e.root) for e in proj.experts]
    files = parse_calib(calib, proj.manifest["paths"]["experts"])
    texts = {t: read_calibration(p, samples, seed) for t, p in files.items()}
    inputs = {"taskvec": proj.fingerprint,
              "calib": {str(t): hashlib.sha256("\n".join(texts[t]).encode()).hexdigest()[:16] for t in texts}}
    options = {"samples": samples, "max_len": max_len, "seed": seed, "model_dtype": model_dtype}
    stage = Stage(work, gram_stage("data"), inputs=inputs, options=options, force=force)
    mods = [m for m in proj.plan.modules]
    if any(m.family == "open_clip" for m in mods):
        raise InputError("data-assisted Grams need a transformers model; merge open_clip checkpoints with the "
                         "data-free solve (--gram free)")
    names = [m.key[: -len(".weight")] for m in mods]
    conv1d = [m.key[: -len(".weight")] for m in mods if m.conv1d]
    tokens: dict[str, int] = dict(stage.manifest.get("tokens", {}))
    run_dtype = _model_dtype(proj, model_dtype)
    for t in range(proj.num_tasks):
        if all(stage.done(task_shard(t, b)) for b in proj.plan.blocks):
            continue
        info(f"bmm: gram data: expert {t + 1}/{proj.num_tasks} ({len(texts[t])} texts from {files[t]})")
        try:
            res = capture_grams(expert_paths[t], proj.base.root, texts[t], names, max_len=max_len,
                                batch_size=batch_size, device=dev, dtype=run_dtype, conv1d_names=conv1d)
        except InputError as exc:
            if type(exc) is not InputError:
                raise
            raise InputError(f"gram data: expert {t + 1} ({expert_paths[t]}), calibration file {files[t]}: "
                             f"{exc}") from exc
        for blk in proj.plan.blocks:
            out = {ref.key: res[ref.key[: -len(".weight")]][0].clone().contiguous() for ref in blk.modules}
            stage.write(task_shard(t, blk), out)
        tokens[str(t)] = int(next(iter(res.values()))[1])
        stage.set("tokens", tokens)
        del res
    todo = [b for b in proj.plan.blocks if not stage.done(b.shard)]
    for blk in track(todo, "gram data: combine", total=len(todo)):
        reader = proj.reader(blk)
        treaders = [ShardReader(stage.shard_path(task_shard(t, blk))) for t in range(proj.num_tasks)]
        out = {}
        for ref in blk.modules:
            grams = torch.stack([r.get(ref.key) for r in treaders]).to(dev)
            st = data_stats(proj.taus(blk, ref, reader).to(dev), grams, key=ref.key)
            out.update(st.to(device="cpu").tensors(ref.key))
        stage.write(blk.shard, out)
    stage.finish(kind="data", tokens=tokens)
    return {"stage": stage.name, "dir": str(stage.dir), "kind": "data", "blocks": len(proj.plan.blocks),
            "blocks_written": len(todo), "tokens": tokens, "seconds": round(time.perf_counter() - t0, 3)}


def _model_dtype(proj: Project, name: str) -> torch.dtype:
    if name != "auto":
        return parse_dtype(name)
    first = proj.base.meta[proj.plan.modules[0].key].dtype
    dt = DTYPES.get(first, torch.float32)
    return torch.float32 if dt == torch.float32 or dt == torch.float64 else dt

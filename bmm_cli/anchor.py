"""Stage 2, ``bmm anchor``: the anchor ``U0`` of every solvable module and the merged "other" tensors.

Output ``<work>/anchor-<method>/``: ``block-NNN.safetensors`` (``U0`` per module key, ``[d_out, d_in]`` fp32) and
``others.safetensors`` (the merged full value of every other tensor). With ``materialize`` the anchor merge itself is
also written as a loadable Hugging Face model (``bmm anchor --method ties --materialize out/`` is a complete TIES
merge). Methods live in ``bmm_cli/anchors/``; this module only streams tensors in and out, one block at a time.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch

from . import __version__, lora
from .anchors import AnchorMethod, ModuleInput, get_method, options_dict, parse_options
from .arch import Block
from .device import resolve_device
from .errors import InputError
from .progress import info, track
from .stage import Stage, load_manifest
from .store import DTYPES, Checkpoint, ShardReader, parse_dtype
from .taskvec import open_inputs, vocab_of
from .tokens import base_rows, cut_rows, read_vocab
from .workdir import ANCHOR_OTHERS as OTHERS
from .workdir import Project, from_linear, load_project, task_gram_reader, to_linear
from .workdir import anchor_stage as stage_name
from .writer import ModelWriter, model_card, parse_size

OTHER_RULES = ("anchor", "base", "mean")


def _data_gram_reader(work: Path):
    return task_gram_reader(work)


def vocab_cut(base: Checkpoint, experts: list, plan) -> tuple[dict[str, int], int] | None:
    """Experts that appended tokens: the vocabulary tensors (key -> token axis) and the number of shared rows (the
    base tokenizer's tokens), the rows the anchor merges; None when every expert has the base's rows."""
    layout = vocab_of(base, experts, plan)
    if layout is None or not layout.resized:
        return None
    vocab = read_vocab(base.root)
    if vocab is None:
        raise InputError(f"{base.root}: no tokenizer.json, so the experts' extra embedding rows cannot be matched to "
                         "tokens (save the base's fast tokenizer next to it)")
    return layout.keys, min(vocab.size, layout.base_rows)


def other_taus(base: Checkpoint, experts: list, key: str, cut) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, [T, ...] task vectors) of an "other" tensor; a vocabulary tensor cut to its shared rows."""
    if cut is None or key not in cut[0]:
        return Project.other_taus_of(base, experts, key)
    axis, n = cut[0][key], cut[1]
    b = cut_rows(base.get(key), axis, n).float()
    return b, torch.stack([cut_rows(e.get(key), axis, n).float() - b for e in experts])


def _iter_all(proj: Project, cut=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, taus) of every floating tensor, in base order; solvable ones from the taskvec shards."""
    refs = {m.key: (blk, m) for blk in proj.plan.blocks for m in blk.modules}
    readers: dict[str, ShardReader] = {}
    for key, meta in proj.base.meta.items():
        if not meta.is_float:
            continue
        if key in refs:
            blk, ref = refs[key]
            if blk.shard not in readers:
                readers.clear()  # one block's reader at a time
                readers[blk.shard] = proj.reader(blk)
            yield key, proj.taus(blk, ref, readers[blk.shard])
        else:
            yield key, other_taus(proj.base, proj.experts, key, cut)[1]


def other_value(method: AnchorMethod, rule: str, key: str, base: torch.Tensor, taus: torch.Tensor, opts, state):
    if not base.is_floating_point():
        return base
    if rule == "base":
        return base
    if rule == "mean":
        return base + taus.mean(0)
    return method.other(key, base, taus, opts, state)


def anchor(
    work: Path,
    method: str,
    opts: list[str] | None = None,
    *,
    materialize: Path | None = None,
    others: str = "anchor",
    external: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> dict:
    """Compute the anchor stage (resumable) and optionally write the anchor merge as a model."""
    t0 = time.perf_counter()
    m, o = _method_options(method, opts, others, external)
    if materialize is not None:
        check_output_options(dtype, max_shard_size)
    dev = resolve_device(device)
    proj = load_project(work)
    inputs: dict = {"taskvec": proj.fingerprint}
    ext = None
    if m.needs_external:
        ext = _open_external(external, proj.base)
        inputs["external"] = ext.fingerprint()
    grams = None
    if m.needs_data_grams:
        man = load_manifest(work, "gram-data", need="bmm gram --kind data --calib ...")
        inputs["gram-data"] = man["id"]
        grams = _data_gram_reader(work)
    stage = Stage(work, stage_name(m.name), inputs=inputs, options={**options_dict(o), "others": others},
                  force=force)
    cut = vocab_cut(proj.base, proj.experts, proj.plan)
    state = None
    if m.needs_global_pass:
        state = stage.manifest.get("state")
        if state is None:
            info(f"bmm: {m.name}: global pass over all tensors")
            state = m.prepare(o, lambda: _iter_all(proj, cut), proj.num_tasks, dev)
            try:
                json.dumps(state)
            except TypeError:
                pass  # not JSON-able: recomputed on resume
            else:
                stage.set("state", state)
    todo = [b for b in proj.plan.blocks if not stage.done(b.shard)]
    for blk in track(todo, f"anchor {m.name}", total=len(todo)):
        _anchor_block(proj, blk, m, o, state, stage, dev, grams, ext)
    if not stage.done(OTHERS):
        tensors = {}
        for key in track(proj.plan.others, f"anchor {m.name}: other tensors"):
            base, taus = other_taus(proj.base, proj.experts, key, cut)
            tensors[key] = _other_full(m, o, state, others, key, base, taus, ext, cut)
        stage.write(OTHERS, tensors)
    stage.finish(method=m.name, options=options_dict(o))
    res = {"stage": stage.name, "dir": str(stage.dir), "method": m.name, "options": options_dict(o),
           "blocks": len(proj.plan.blocks), "blocks_written": len(todo)}
    if materialize is not None:
        res["model"] = str(write_anchor_model(proj, stage, materialize, dtype=dtype,
                                              max_shard_size=parse_size(max_shard_size),
                                              recipe={"method": m.name, "options": options_dict(o),
                                                      **({"excluded": proj.plan.excluded} if proj.plan.excluded
                                                         else {})},
                                              force=force))
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def _open_external(external: str, base: Checkpoint) -> Checkpoint:
    ext = Checkpoint.open(external, role="anchor model")
    for key, meta in base.meta.items():
        if key not in ext.meta or ext.meta[key].shape != meta.shape:
            raise InputError(f"anchor model {ext.root}: tensor {key!r} is missing or has another shape than the base")
    return ext


def _module_u0(m: AnchorMethod, o, state, dev, ref, taus: torch.Tensor, base: torch.Tensor, grams, ext,
               experts) -> torch.Tensor:
    """U0 of one solvable module from its [T, d_out, d_in] task vectors, as the stage stores it (fp32, CPU)."""
    inp = ModuleInput(key=ref.key, taus=taus, base=base, grams=grams,
                      external=to_linear(ref, ext.get(ref.key)).float() if ext is not None else None,
                      ranks=lora.rank_bounds(experts, ref.key))
    return m.module(inp, o, state, dev).float().cpu().contiguous()


def _other_full(m: AnchorMethod, o, state, others: str, key: str, base: torch.Tensor, taus: torch.Tensor, ext,
                cut=None):
    """The merged full value of one "other" tensor (what the stage's others shard stores; a vocabulary tensor of
    resized experts: its shared rows)."""
    if ext is not None and base.is_floating_point():
        v = ext.get(key).float()
        return cut_rows(v, cut[0][key], cut[1]) if cut is not None and key in cut[0] else v
    return other_value(m, others, key, base, taus, o, state)


def _anchor_block(proj: Project, blk: Block, m: AnchorMethod, o, state, stage: Stage, dev, grams, ext) -> None:
    reader = proj.reader(blk)
    greader = grams(blk) if grams is not None else None
    out = {}
    for ref in blk.modules:
        g = greader(ref.key) if greader is not None else None
        out[ref.key] = _module_u0(m, o, state, dev, ref, proj.taus(blk, ref, reader), proj.base_linear(ref), g, ext,
                                  proj.experts)
    stage.write(blk.shard, out)


def write_anchor_model(proj: Project, stage: Stage, out: Path, *, dtype: str | None, max_shard_size: int,
                       recipe: dict, force: bool) -> Path:
    """W = W_pre + U0 for solvable modules, the stage's others for the rest, in the base's dtypes."""
    order = [ref.key for blk in proj.plan.blocks for ref in blk.modules] + list(proj.plan.others)
    order += list(proj.plan.excluded)
    writer = _model_writer(proj.base, out, dtype, max_shard_size, force, stage.id, proj.inputs(), order=order)
    for blk in track(proj.plan.blocks, "write anchor model"):
        r = stage.read(blk.shard)
        for ref in blk.modules:
            if writer.shard_done(ref.key):
                continue
            w = proj.base_linear(ref) + r.get(ref.key)
            writer.add(ref.key, from_linear(ref, w))
    r = stage.read(OTHERS)
    for key in proj.plan.others:
        if not writer.shard_done(key):
            v = r.get(key)
            if v.shape != proj.base.meta[key].shape:  # shared rows of a vocabulary tensor: the base's padding rows
                v = base_rows(v, proj.base.get(key), vocab_of(proj.base, proj.experts, proj.plan).keys[key])
            writer.add(key, v)
    proj.write_excluded(writer)
    return _close_model(writer, proj.base, proj.experts, recipe)


def _method_options(method: str, opts: list[str] | None, others: str, external: str | None):
    """The anchor method and its typed options, with --others and --model checked (both anchor paths)."""
    m = get_method(method)
    o = parse_options(m, opts or [])
    if others not in OTHER_RULES:
        raise InputError(f"--others {others!r}: choose one of {', '.join(OTHER_RULES)}")
    if m.needs_external and not external:
        raise InputError(f"anchor {m.name} needs --model DIR_OR_HUB_ID (the merged checkpoint to use as anchor)")
    return m, o


def check_output_options(dtype: str | None, max_shard_size: str | int) -> None:
    """--dtype and --max-shard-size of a model to write, checked before any stage runs (merge, anchor --materialize)."""
    if dtype is not None:
        try:
            parse_dtype(dtype)
        except InputError as exc:
            raise InputError(f"--dtype {dtype!r}: {exc}") from None
    parse_size(max_shard_size)


def _model_writer(base: Checkpoint, out: Path, dtype: str | None, max_shard_size: int, force: bool, plan_id: str,
                  inputs: dict[str, Path], order: list[str] | None = None) -> ModelWriter:
    """A writer whose entries are listed in ``order`` (the order the caller produces them; any key it leaves out
    follows in the base's order), so the streaming writer appends each tensor as it comes instead of holding it."""
    out_dt = parse_dtype(dtype) if dtype else None
    keys = list(dict.fromkeys([k for k in (order or []) if k in base.meta] + list(base.meta)))
    entries = [(k, base.meta[k].shape, _out_dtype(base, k, out_dt)) for k in keys]
    return ModelWriter(Path(out), entries, max_shard_size=max_shard_size, copy_from=base.root, force=force,
                       plan_id=plan_id, inputs=inputs)


def _close_model(writer: ModelWriter, base: Checkpoint, experts: list[Checkpoint], recipe: dict) -> Path:
    full = {"tool": f"bmm {__version__}", "base": str(base.root), "experts": [str(e.root) for e in experts],
            "merge": "anchor", **recipe}
    return writer.close(recipe=full, card=model_card({"title": f"{recipe['method']} merge", **full}))


def _out_dtype(base: Checkpoint, key: str, override: torch.dtype | None) -> torch.dtype:
    dt = DTYPES[base.meta[key].dtype]
    return override if (override is not None and dt.is_floating_point) else dt


def anchor_direct(
    base: str,
    experts: list[str],
    method: str,
    opts: list[str] | None = None,
    *,
    materialize: Path,
    others: str = "anchor",
    external: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    allow_dtype_mismatch: bool = False,
    exclude: list[str] | None = None,
) -> dict:
    """The anchor merge written straight from the checkpoints, without a work directory (``bmm anchor --base B
    --experts E... --method ta --materialize OUT``): ``W_t − W_pre`` is formed per tensor as it is read, as
    mergekit does, so no fp32 task-vector stage and no anchor stage go to disk. TIES / DARE-TIES stream their exact
    global threshold with extra read passes over the checkpoints. The output is byte-identical to
    ``bmm taskvec`` + ``bmm anchor --materialize`` (same tensors, same arithmetic, same order of reductions)."""
    t0 = time.perf_counter()
    m, o = _method_options(method, opts, others, external)
    if m.needs_data_grams:
        raise InputError(f"anchor {m.name} needs data Grams: run it with a work directory (bmm merge --calib ...)")
    check_output_options(dtype, max_shard_size)
    max_size = parse_size(max_shard_size)
    dev = resolve_device(device)
    b, es, plan = open_inputs(base, experts, allow_dtype_mismatch=allow_dtype_mismatch, exclude=exclude)
    ext = _open_external(external, b) if m.needs_external else None
    refs = {r.key: r for r in plan.modules}
    excluded = set(plan.excluded)  # --exclude: the base's tensor, in no global pass
    cut = vocab_cut(b, es, plan)

    def taus_of(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, [T, ...] task vectors) of one tensor; solvable modules in [d_out, d_in] as the taskvec stage."""
        ref = refs.get(key)
        if ref is None:
            return other_taus(b, es, key, cut)
        w0 = to_linear(ref, b.get(key).float())
        taus = torch.empty((len(es),) + tuple(w0.shape), dtype=torch.float32)
        for t, e in enumerate(es):  # W_t − W_pre straight into the stack: no per-expert temporaries
            torch.sub(to_linear(ref, e.get(key).float()), w0, out=taus[t])
        return w0, taus

    def iter_all() -> Iterator[tuple[str, torch.Tensor]]:
        for key, meta in b.meta.items():
            if meta.is_float and key not in excluded:
                yield key, taus_of(key)[1]

    recipe = {"method": m.name, "options": options_dict(o), **({"excluded": plan.excluded} if excluded else {})}
    plan_id = hashlib.sha256(json.dumps({
        "base": b.fingerprint(), "experts": [e.fingerprint() for e in es], **recipe, "others": others,
        "external": ext.fingerprint() if ext is not None else None}, sort_keys=True).encode()).hexdigest()
    roles = {"base model": b.root, **{f"expert {i + 1}": e.root for i, e in enumerate(es)}}
    order = list(dict.fromkeys([r.key for blk in plan.blocks for r in blk.modules] + list(plan.others)
                               + list(b.meta)))  # the stage path's write order: same file layout
    writer = _model_writer(b, materialize, dtype, max_size, force, plan_id, roles, order=order)
    state = None
    if m.needs_global_pass and not writer.current:
        info(f"bmm: {m.name}: global pass over all tensors")
        state = json.loads(json.dumps(m.prepare(o, iter_all, len(es), dev)))  # as the stage keeps it
    for key in track(order, f"anchor {m.name} -> {materialize}"):
        if writer.shard_done(key):
            continue
        if key in excluded:
            writer.add(key, b.get(key))
            continue
        base_v, taus = taus_of(key)
        ref = refs.get(key)
        if ref is not None:
            u0 = _module_u0(m, o, state, dev, ref, taus, base_v, None, ext, es)
            writer.add(key, from_linear(ref, base_v + u0))
        else:
            v = _other_full(m, o, state, others, key, base_v, taus, ext, cut)
            writer.add(key, base_rows(v, b.get(key), cut[0][key]) if cut is not None and key in cut[0] else v)
    out = _close_model(writer, b, es, recipe)
    return {"model": str(out), "method": m.name, "options": options_dict(o), "blocks": len(plan.blocks),
            "streamed": True, "seconds": round(time.perf_counter() - t0, 3)}

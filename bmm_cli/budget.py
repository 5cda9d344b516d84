"""Disk each stage will write, from the tensor shapes alone, and the free-space check that refuses a run up front.

:func:`estimate` adds up what the stages store (bench/shapes_8b.py measured them at Llama-3.1-8B shapes; the
formulas match those bytes to within the safetensors headers):

* ``taskvec``: an empty marker shard per block and the manifest (the module plan); with ``bmm taskvec --store
  DTYPE`` also T task vectors per solvable module ``[d_out, d_in]`` in that dtype;
* ``anchor-<method>``: U0 per module and the merged value of every other tensor, float32;
* ``gram-data`` (``--gram data`` or ``hybrid``): ``Ĝ [d_in, d_in]``, ``B̂ [d_out, d_in]`` and ``m`` per module plus T
  per-task Grams ``[d_in, d_in]``, float32; ``gram-free`` (only ``bmm gram --kind free`` writes it: the stages
  recompute the data-free statistics from the task vectors): ``Ĝ``, ``B̂`` and ``m`` per module;
* ``evidence``: one small JSON of λ per module;
* ``factors-<anchor>-<gram>`` (a search's cache): ``Q [d_in, d_in]``, ``B̂Q`` (and ``U0Q`` unless the anchor is
  ``pretrained``) in the factor dtype, Λ in float64;
* the merged model (``out``, on the output's file system): every tensor in the output dtype.

Each safetensors file adds its header (a JSON entry per tensor) and each stage its ``stage.json``; both are modelled
from the tensor names. :func:`check_free` compares a need with ``os.statvfs`` of the path (or of its nearest existing
parent) and raises the one-line :class:`~bmm_cli.errors.InputError` the CLI prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_ALIASES = {"fp64": "float64", "f64": "float64", "fp32": "float32", "f32": "float32", "bf16": "bfloat16",
            "fp16": "float16", "f16": "float16", "half": "float16"}
HEADER_ENTRY = 64  # bytes of one safetensors header entry beside the tensor's name
FILE_HEADER = 64  # the header's length prefix, braces and __metadata__
SMALL_FILES = 1 << 14  # an output's small files beside its tensors (index, config, model card, marker, recipe)
MANIFEST = 1024  # stage.json: fixed part
MANIFEST_PER_SHARD = 160  # stage.json: one entry per shard
PLAN_PER_MODULE = 160  # the taskvec stage keeps the module plan in its manifest
FINGERPRINT_PER_INPUT = 400  # ... and the fingerprint and path of the base and of every expert
EVIDENCE_PER_MODULE = 64  # the evidence JSON: key and λ per module


def dtype_bytes(name: str) -> int:
    n = str(name).lower().removeprefix("torch.")
    n = _ALIASES.get(n, n)
    if n not in DTYPE_BYTES:
        raise InputError(f"dtype {name!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[n]


@dataclass(frozen=True)
class Module:
    """One solvable module: its key, ``[d_out, d_in]`` (bmm's orientation) and its block's index."""

    key: str
    d_out: int
    d_in: int
    block: int = 0


@dataclass
class Estimate:
    """Bytes per stage (work directory) and of the merged model (``out``)."""

    stages: dict[str, int] = field(default_factory=dict)
    out: int = 0

    @property
    def work(self) -> int:
        return sum(self.stages.values())

    def lines(self, width: int = 10) -> list[str]:
        """``stage  size`` lines for ``bmm plan``, the work total and the output last (names padded to ``width``)."""
        w = max([len(k) for k in self.stages] + [width])
        rows = [f"{k:<{w}}  {fmt_bytes(v):>9}" for k, v in self.stages.items()]
        rows.append(f"{'work total':<{w}}  {fmt_bytes(self.work):>9}")
        if self.out:
            rows.append(f"{'output':<{w}}  {fmt_bytes(self.out):>9}")
        return rows

    def to_json(self) -> dict:
        return {"stages": dict(self.stages), "work": self.work, "out": self.out}


def _file(names_numel_bytes: Iterable[tuple[str, int, int]]) -> int:
    """Bytes of one safetensors file holding (name, numel, bytes per element) tensors."""
    total = FILE_HEADER
    for name, numel, b in names_numel_bytes:
        total += numel * b + len(name) + HEADER_ENTRY
    return total


def _per_block(modules: Sequence[Module], tensors) -> tuple[int, int]:
    """(bytes, shards): one shard per block of the tensors ``tensors(module)`` yields."""
    blocks: dict[int, list[Module]] = {}
    for m in modules:
        blocks.setdefault(m.block, []).append(m)
    total = sum(_file(t for m in ms for t in tensors(m)) for ms in blocks.values())
    return total, len(blocks)


def estimate(modules: Sequence[Module], num_tasks: int, *, others: Sequence[tuple[str, int]] = (),
             taskvec_dtype: str = "none", anchors: Sequence[str] = ("tsv",), gram: str = "free",
             evidence: bool = True, search: bool = False, factor_dtype: str = "float32",
             out_numel_bytes: int = 0, free_gram_stage: bool = False) -> Estimate:
    """Bytes each stage writes for these solvable ``modules``, ``num_tasks`` experts and the other tensors
    ``others`` ((key, numel) pairs, merged into the anchor stages). ``taskvec_dtype``: the dtype of
    ``bmm taskvec --store`` (``none``: no copy). ``gram``: the solve's kind, free, data or hybrid (data and hybrid
    write the gram-data stage). ``free_gram_stage``: add the gram-free stage of ``bmm gram --kind free``.
    ``evidence``: the default λ's JSON, for the first of ``anchors`` (the one the solve uses).
    ``search``: add the factor cache a search builds (first anchor). ``out_numel_bytes``: the merged model's tensor
    bytes (Σ numel × output dtype bytes), reported as ``out``."""
    if num_tasks < 1:
        raise InputError(f"{num_tasks} experts: need at least one")
    if gram not in ("free", "data", "hybrid"):
        raise InputError(f"gram {gram!r}: choose free, data or hybrid")
    T = num_tasks
    tv = 0 if str(taskvec_dtype).lower() == "none" else dtype_bytes(taskvec_dtype)
    fb = dtype_bytes(factor_dtype)
    st: dict[str, int] = {}

    def stage(name: str, body: int, shards: int, extra: int = 0) -> None:
        st[name] = body + MANIFEST + MANIFEST_PER_SHARD * shards + extra

    b, n = _per_block(modules, lambda m: [(f"{m.key}@{t}", m.d_out * m.d_in, tv) for t in range(T) if tv])
    stage("taskvec", b, n, PLAN_PER_MODULE * len(modules) + FINGERPRINT_PER_INPUT * (T + 1))
    other = _file((k, numel, 4) for k, numel in others) if others else 0
    for a in anchors:
        b, n = _per_block(modules, lambda m: [(m.key, m.d_out * m.d_in, 4)])
        stage(f"anchor-{a}", b + other, n + (1 if others else 0))
    kinds = (("free",) if free_gram_stage else ()) + (("data",) if gram in ("data", "hybrid") else ())

    def stats(m: Module):
        return [(f"{m.key}.G_hat", m.d_in * m.d_in, 4), (f"{m.key}.B_hat", m.d_out * m.d_in, 4), (f"{m.key}.m", 1, 8)]

    for kind in kinds:
        b, n = _per_block(modules, stats)
        if kind == "data":
            tb, tn = _per_block(modules, lambda m: [(m.key, m.d_in * m.d_in, 4)])
            b, n = b + T * tb, n + T * tn
        stage(f"gram-{kind}", b, n)
    if evidence and anchors:
        st[f"evidence-{anchors[0]}-{gram}.json"] = 256 + EVIDENCE_PER_MODULE * len(modules)
    if search and gram != "hybrid" and anchors:  # hybrid trials refactor per ε: no cache on disk
        a = anchors[0]

        def fac(m: Module):
            out = [(f"{m.key}.Q", m.d_in * m.d_in, fb), (f"{m.key}.evals", m.d_in, 8),
                   (f"{m.key}.BQ", m.d_out * m.d_in, fb)]
            return out + ([] if a == "pretrained" else [(f"{m.key}.U0Q", m.d_out * m.d_in, fb)])

        b, n = _per_block(modules, fac)
        stage(f"factors-{a}-{gram}", b, n)
    return Estimate(st, int(out_numel_bytes))


def plan_modules(plan, meta) -> tuple[list[Module], list[tuple[str, int]], int]:
    """From a :class:`bmm_cli.arch.Plan` and a checkpoint's ``meta`` (key -> TensorMeta): the solvable modules
    (Conv1D weights transposed to ``[d_out, d_in]``), the other tensors as (key, numel), and Σ numel of all."""
    mods = []
    for blk in plan.blocks:
        for ref in blk.modules:
            shape = tuple(meta[ref.key].shape)
            d_out, d_in = (shape[1], shape[0]) if ref.conv1d else (shape[0], shape[-1])
            mods.append(Module(ref.key, int(d_out), int(d_in), blk.index))
    others = [(k, int(meta[k].numel)) for k in plan.others]
    total = sum(int(m.numel) for m in meta.values())
    return mods, others, total


def fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str | os.PathLike) -> tuple[Path, int]:
    """(the existing directory measured, bytes free to an unprivileged writer there): ``path`` or the nearest
    existing parent (a work directory that does not exist yet is created on its parent's file system)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return p, st.f_bavail * st.f_frsize


def check_free(path: str | os.PathLike, need: int, *, what: str = "the work directory",
               option: str = "--work") -> int:
    """Raise a one-line :class:`InputError` when the file system of ``path`` has fewer than ``need`` bytes free;
    returns the free bytes otherwise."""
    where, free = free_bytes(path)
    if need > free:
        at = "" if where == Path(path).absolute() else f" (measured at {where})"
        raise InputError(f"{path}: {what} needs {fmt_bytes(need)} ({need} bytes) but its file system has "
                         f"{fmt_bytes(free)} ({free} bytes) free{at}; use {option} on a disk with more space")
    return free


def _complete(stage_dir: Path) -> bool:
    try:
        return bool(json.loads((stage_dir / "stage.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def missing(est: Estimate, work: str | os.PathLike) -> int:
    """Bytes still to be written to ``work``: per stage, the estimate less what its directory already holds
    (a resumed run needs only the rest; a stage its manifest marks complete needs nothing)."""
    work = Path(work)
    need = 0
    for name, b in est.stages.items():
        p = work / name
        if p.is_dir() and _complete(p):
            continue
        have = (sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir()
                else p.stat().st_size if p.is_file() else 0)
        need += max(0, b - have)
    return need


# bytes per element of the safetensors dtype names a checkpoint's header uses
ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def output_bytes(meta, dtype: str | None = None) -> int:
    """Tensor bytes of the merged model: every float tensor in ``dtype`` (None: its own dtype), others as they are."""
    total = 0
    for m in meta.values():
        own = ST_BYTES.get(str(m.dtype).upper(), 4)
        is_float = str(m.dtype).upper().startswith(("F", "BF"))
        total += int(m.numel) * (dtype_bytes(dtype) if dtype is not None and is_float else own)
    return total


def for_merge(plan, meta, num_tasks: int, *, anchor: str, gram: str, search: bool = False,
              out_dtype: str | None = None, factor_dtype: str = "float32", out_bytes: int | None = None) -> Estimate:
    """What ``bmm merge`` writes: the taskvec stage (no copy of the task vectors), the anchor, the data Gram stage
    (``data``, ``hybrid``), the evidence λ, the factor cache when it searches, and the merged model (``out``:
    ``out_bytes`` when given, e.g. an adapter's :func:`adapter_bytes`, else the full model in ``out_dtype``)."""
    mods, others, _ = plan_modules(plan, meta)
    return estimate(mods, num_tasks, others=others, anchors=(anchor,), gram=gram, search=search,
                    factor_dtype=factor_dtype,
                    out_numel_bytes=output_bytes(meta, out_dtype) if out_bytes is None else out_bytes)


# anchors whose rows stay in the span of the experts' stacked LoRA A factors (bmm_cli.lowrank): the merge of
# LoRA experts is then exactly of rank Σ r_t per module
SPAN_ANCHORS = ("ta", "tsv", "iso-c", "iso-cts", "pretrained")


def adapter_bytes(plan, meta, experts, *, anchor: str, rank: int | None = None, dtype: str | None = None) -> int:
    """Tensor bytes of the adapter ``bmm merge --out-format peft`` writes for these LoRA ``experts``: every module
    an expert adapts at the adapter's one rank (the largest module's: Σ r_t where the anchor keeps the span of the
    experts' A factors, else up to full rank; at most ``rank``), its changed biases, and the whole tensors the experts
    save (``modules_to_save``). An upper bound: a module the merge leaves unchanged is not written."""
    nb = dtype_bytes(dtype or "float32")
    mods, _, _ = plan_modules(plan, meta)
    sides, r_max, bias = 0, 0, 0
    for m in mods:
        ranks = [e.adapter.modules[m.key].rank for e in experts if m.key in e.adapter.modules]
        dense = any(m.key in e.adapter.full for e in experts)
        if not ranks and not dense:
            continue
        r = min(m.d_out, m.d_in) if dense or anchor not in SPAN_ANCHORS else sum(ranks)
        r_max = max(r_max, min(r, rank or r, m.d_out, m.d_in))
        sides += m.d_out + m.d_in
        bias += m.d_out if any(getattr(e.adapter.modules.get(m.key), "bias", None) is not None for e in experts) else 0
    saved = {k for e in experts for k in e.adapter.full if k in plan.others}
    whole = {k for k in plan.others if k.rsplit(".", 1)[0] in {s.rsplit(".", 1)[0] for s in saved}}
    return (r_max * sides + bias) * nb + sum(int(meta[k].numel) * 4 for k in whole)


def only(est: Estimate, prefixes: Sequence[str], *, out: bool = True) -> Estimate:
    """The stages of ``est`` whose names start with one of ``prefixes`` (what one stage command writes)."""
    return Estimate({k: v for k, v in est.stages.items() if k.startswith(tuple(prefixes))}, est.out if out else 0)


def check_disk(est: Estimate, work: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Refuse (one-line :class:`InputError`) when ``work``'s file system cannot hold what ``est`` still has to write
    there (:func:`missing`), or ``out``'s the merged model (both together when they share a file system).
    Returns ``{"need": bytes, "free": bytes}`` of the work directory's file system."""
    need = missing(est, work)
    if out is None or not est.out:
        return {"need": need, "free": check_free(work, need)}
    wdir, _ = free_bytes(work)
    odir, _ = free_bytes(out)
    if os.stat(wdir).st_dev == os.stat(odir).st_dev:
        free = check_free(work, need + est.out, what="the work directory and the output (one file system)")
        return {"need": need + est.out, "free": free}
    check_free(out, est.out, what="the merged model", option="--out")
    return {"need": need, "free": check_free(work, need)}


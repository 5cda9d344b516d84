"""The work directory: the name of every stage and file in it, and read access to the finished stages.

Layout of ``--work DIR`` (each stage directory holds ``stage.json`` and its ``<shard>.safetensors``)::

    taskvec/                  the inputs' fingerprints and the module plan; block-NNN marks a block read and
                              checked (stage 1, bmm taskvec). With ``--store DTYPE`` block-NNN also holds U_t per
                              module as "<key>@<t>"; by default it holds none, and the task vectors are recomputed
                              from the (memory-mapped) checkpoints whenever a stage reads them (:meth:`Project.taus`)
    anchor-<method>/          U0 per module in block-NNN, the merged other tensors in others (stage 2, bmm anchor)
    gram-data/                Ĝ, B̂, m per module in block-NNN and t<t>-block-NNN per task (stage 3, bmm gram
                              --kind data); the data-free statistics are recomputed from the task vectors by the
                              stages that use them (``bmm gram --kind free`` can still store them in gram-free/)
    factors-<anchor>-<gram>/  the search's cached eigenbasis (bmm_cli.factor_cache)
    evidence-<anchor>-<gram>.json   the default λ per module (bmm_cli.default_params)

Weights are stored and solved in ``nn.Linear``'s ``[d_out, d_in]`` orientation (:func:`to_linear`); the writers
turn them back with :func:`from_linear`. The classes here only read: the stage modules write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__, lora
from .anchors import AnchorMethod, get_method
from .arch import Block, ModuleRef, Plan, build_plan, exclude_pattern
from .closed_form import GramStats, data_stats, free_stats
from .errors import InputError, StateError
from .keymap import match_base
from .params import Params
from .stage import load_manifest
from .store import DTYPES, Checkpoint, ShardReader
from .writer import ModelWriter

TASKVEC = "taskvec"
GRAM_STATS = ("free", "data")  # the statistics `bmm gram` makes
GRAM_KINDS = ("free", "data", "hybrid")  # what a solve uses: one of the two, or their ε-mix
ANCHOR_OTHERS = "others"  # the anchor stage's shard of merged "other" tensors


def gram_stage(kind: str) -> str:
    return f"gram-{kind}"


def anchor_stage(method: str) -> str:
    return f"anchor-{method}"


def factors_stage(anchor: str, gram: str) -> str:
    return f"factors-{anchor}-{gram}"


def evidence_file(anchor: str, gram: str) -> str:
    return f"evidence-{anchor}-{gram}.json"


def tv_key(key: str, t: int) -> str:
    """The name of task t's task vector of module ``key`` in a taskvec shard."""
    return f"{key}@{t}"


def task_shard(t: int, blk: Block) -> str:
    """The gram-data shard of task t's own Grams of one block."""
    return f"t{t}-{blk.shard}"


def to_linear(ref: ModuleRef, w: torch.Tensor) -> torch.Tensor:
    """Checkpoint orientation -> [d_out, d_in]."""
    return w.t() if ref.conv1d else w


def from_linear(ref: ModuleRef, w: torch.Tensor) -> torch.Tensor:
    """[d_out, d_in] -> checkpoint orientation."""
    return w.t() if ref.conv1d else w


def task_vector(e, key: str, w0: torch.Tensor) -> torch.Tensor:
    """``W_t − W_pre`` of one tensor in checkpoint orientation (fp32; ``w0`` is the base tensor in fp32): a LoRA
    expert's own ``ΔW`` (zero where the adapter leaves the tensor alone), else the difference of the stored
    weights."""
    if isinstance(e, lora.LoraCheckpoint):
        d = e.task_vector(key)
        return torch.zeros_like(w0) if d is None else d.float()
    return e.get(key).float() - w0


def is_zero_anchor(method: AnchorMethod) -> bool:
    """Whether ``method``'s anchor is U0 = 0 (the pretrained weights): the solvers then skip U0 altogether."""
    zero = getattr(method, "zero", None)
    return method.name == "pretrained" if zero is None else bool(zero)


# ----------------------------------------------------------------------------------------------------------------
# the finished stages


@dataclass
class Project:
    """What every stage after ``taskvec`` works on: the opened base and experts and the module plan."""

    work: Path
    base: Checkpoint
    experts: list[Checkpoint]
    plan: Plan
    manifest: dict

    @property
    def num_tasks(self) -> int:
        return len(self.experts)

    @property
    def fingerprint(self) -> str:
        return self.manifest["id"]

    def inputs(self) -> dict[str, Path]:
        """What an ``--out`` must never replace: base, experts and the work directory (role -> path)."""
        roles = {"base model": self.base.root, "work directory": self.work}
        roles.update({f"expert {i + 1}": e.root for i, e in enumerate(self.experts)})
        return roles

    @property
    def stored(self) -> bool:
        """Whether the taskvec stage keeps a copy of the task vectors (``bmm taskvec --store DTYPE``)."""
        return self.manifest.get("options", {}).get("store", "none") != "none"

    def taus(self, block: Block, ref: ModuleRef, reader: ShardReader | None = None) -> torch.Tensor:
        """[T, d_out, d_in] float32 task vectors of one module: read from the taskvec shard when the stage stores
        them, else recomputed from the checkpoints (the same arithmetic as ``bmm taskvec``, so the same bits as its
        float32 copy)."""
        if not self.stored:
            w0 = self.base.get(ref.key).float()
            out = torch.empty((self.num_tasks,) + tuple(to_linear(ref, w0).shape), dtype=torch.float32)
            for t, e in enumerate(self.experts):
                out[t].copy_(to_linear(ref, task_vector(e, ref.key, w0)))
                e.close()  # only the module being read stays mapped: T experts' pages would otherwise pile up
            return out
        reader = reader or self.reader(block)
        return torch.stack([reader.get(tv_key(ref.key, t)).float() for t in range(self.num_tasks)])

    def free_stats(self, block: Block, ref: ModuleRef, reader: ShardReader | None = None, *,
                   device: torch.device | None = None) -> GramStats:
        """The float32 data-free statistics of one module, computed on ``device`` and returned on the host: what
        ``bmm gram --kind free`` stores, and what the stages that need them compute instead."""
        return free_stats(self.taus(block, ref, reader), key=ref.key, device=device).to(device="cpu")

    def reader(self, block: Block) -> ShardReader | None:
        """The taskvec shard of ``block`` to pass to :meth:`taus`; None when the task vectors are recomputed."""
        if not self.stored:
            return None
        path = self.work / TASKVEC / f"{block.shard}.safetensors"
        if not path.exists():
            raise InputError(f"{path} is missing: rerun `bmm taskvec` (it resumes)")
        return ShardReader(path)

    def write_excluded(self, writer: ModelWriter) -> None:
        """The ``--exclude`` tensors: the base's own, as they are."""
        for key in self.plan.excluded:
            if not writer.shard_done(key):
                writer.add(key, self.base.get(key))

    def base_linear(self, ref: ModuleRef) -> torch.Tensor:
        return to_linear(ref, self.base.get(ref.key)).float()

    def other_taus(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, [T, ...] task vectors) of an "other" tensor, read from the checkpoints (fp32 for floats)."""
        return self.other_taus_of(self.base, self.experts, key)

    @staticmethod
    def other_taus_of(base: Checkpoint, experts: list[Checkpoint], key: str) -> tuple[torch.Tensor, torch.Tensor]:
        b = base.get(key)
        if not b.is_floating_point():
            return b, torch.zeros((0,) + tuple(b.shape), dtype=b.dtype)
        b = b.float()
        taus = torch.empty((len(experts),) + tuple(b.shape), dtype=torch.float32)
        for t, e in enumerate(experts):  # W_t − W_pre straight into the stack: no per-expert temporaries
            torch.sub(e.get(key).float(), b, out=taus[t])
        return b, taus


def load_project(work: Path) -> Project:
    """Reopen base and experts recorded by a finished taskvec stage (and check they did not change since)."""
    man = load_manifest(work, TASKVEC, need="bmm taskvec --base B --experts E1 E2 ... --work DIR")
    paths = man.get("paths", {})
    b = Checkpoint.open(paths["base"], role="base")
    exclude = man.get("options", {}).get("exclude")  # --exclude: the plan taskvec built
    pattern = exclude_pattern(exclude)
    es = [match_base(Checkpoint.open(p, role=f"expert {i + 1}"), b, f"expert {i + 1}", quiet=True, exclude=pattern)
          for i, p in enumerate(paths["experts"])]
    now = {"base": b.fingerprint(), "experts": [e.fingerprint() for e in es]}
    if now != man["inputs"]:
        raise StateError(f"{Path(work) / TASKVEC}: the base or an expert changed on disk since `bmm taskvec`; "
                         "redo the work dir from the new checkpoints: `bmm merge --force` with the same options, or "
                         "`bmm taskvec --force` and then each later stage with --force")
    plan = build_plan(((k, m.shape) for k, m in b.meta.items()), source=str(b.root), exclude=exclude)
    return Project(Path(work), b, es, plan, man)


class GramStage:
    """Read access to a finished Gram stage."""

    def __init__(self, work: Path, kind: str):
        self.kind = kind
        self.name = gram_stage(kind)
        need = "bmm gram --kind free" if kind == "free" else "bmm gram --kind data --calib ..."
        self.manifest = load_manifest(work, self.name, need=need)
        self.dir = Path(work) / self.name

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def block(self, blk: Block) -> Callable[[str], GramStats]:
        r = ShardReader(self.dir / f"{blk.shard}.safetensors")
        return lambda key: GramStats.from_tensors(
            key, {f"{key}.{n}": r.get(f"{key}.{n}") for n in ("G_hat", "B_hat", "m")})


def task_gram_reader(work: Path) -> Callable[[Block], Callable[[str], torch.Tensor]]:
    """For RegMean and the data evidence: block -> (key -> [T, d_in, d_in] per-task Grams)."""
    gs = GramStage(work, "data")
    num_tasks = len(gs.manifest["inputs"]["calib"])

    def for_block(blk: Block):
        readers = [ShardReader(gs.dir / f"{task_shard(t, blk)}.safetensors") for t in range(num_tasks)]
        return lambda key: torch.stack([r.get(key) for r in readers])

    return for_block


class AnchorStage:
    """Read access to a finished anchor stage (for solve and search)."""

    def __init__(self, work: Path, method: str):
        self.method = get_method(method)
        self.name = anchor_stage(self.method.name)
        self.manifest = load_manifest(work, self.name, need=f"bmm anchor --work DIR --method {self.method.name}")
        self.dir = Path(work) / self.name

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def zero(self) -> bool:
        """U0 = 0 for every module: the block shards need not be read."""
        return is_zero_anchor(self.method)

    def block(self, blk: Block) -> ShardReader:
        return ShardReader(self.dir / f"{blk.shard}.safetensors")

    def others(self) -> ShardReader:
        return ShardReader(self.dir / f"{ANCHOR_OTHERS}.safetensors")


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
        # the data-free statistics are computed from the task vectors (:meth:`block_stats`, :meth:`stats64`): only
        # the data kind has a Gram stage to read
        self.grams = {"data": GramStage(work, "data")} if gram in ("data", "hybrid") else {}
        for gs in self.grams.values():
            if gs.manifest["inputs"].get("taskvec") != self.proj.fingerprint:
                raise InputError(f"{gs.dir}: made from other task vectors; rerun `bmm gram --force`")

    @property
    def fingerprint(self) -> dict:
        return {"taskvec": self.proj.fingerprint, "anchor": self.anchor.id,
                **{f"gram-{k}": g.id for k, g in self.grams.items()}}

    def block_stats(self, kind: str, blk: Block, *, device: torch.device | None = None
                    ) -> Callable[[str], GramStats]:
        """Per module key of ``blk``, the float32 statistics of ``kind``: ``data`` read from its Gram stage,
        ``free`` computed from the task vectors on ``device`` and returned on the host (the arithmetic of
        ``bmm gram --kind free``, so the same values as its shards on the same device)."""
        if kind == "data":
            return self.grams["data"].block(blk)
        reader = self.proj.reader(blk)
        refs = {r.key: r for r in blk.modules}
        return lambda key: self.proj.free_stats(blk, refs[key], reader, device=device)

    def stats64(self, blk: Block, *, device: torch.device | None = None) -> Callable[[ModuleRef], GramStats]:
        """Per module of ``blk``, the statistics of ``--gram free`` or ``data`` recomputed in fp64 from the task
        vectors (and the per-task Grams): the stage keeps fp32 copies, whose rounding noise (~1e-7·λ_max) in Ĝ's
        null space a rank-deficient module (``T·d_out < d_in``) would turn into errors of noise/λ."""
        if self.gram not in GRAM_STATS:
            raise InputError(f"--gram {self.gram}: fp64 statistics are made per kind (free or data)")
        reader = self.proj.reader(blk)
        grams = task_gram_reader(self.work)(blk) if self.gram == "data" else None

        def stats(ref: ModuleRef) -> GramStats:
            taus = self.proj.taus(blk, ref, reader).to(torch.float64)
            if grams is None:
                return free_stats(taus, key=ref.key, device=device)
            return data_stats(taus, grams(ref.key).to(torch.float64), key=ref.key, device=device)

        return stats

    def out_entries(self, dtype: torch.dtype | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The output tensors in the order the solve produces them (the anchor's others, then block by block), so
        the writer streams each one to its shard as it comes."""
        meta = self.proj.base.meta
        plan = self.proj.plan
        order = list(plan.others) + list(plan.excluded) + [r.key for b in plan.blocks for r in b.modules]
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
            # in-block tensors no solvable module matches: merged by the anchor's rule for other tensors
            **({"unsolved": list(self.proj.plan.unknown)} if self.proj.plan.unknown else {}),
            # --exclude: tensors left at the base's value
            **({"excluded": list(self.proj.plan.excluded)} if self.proj.plan.excluded else {}),
            **extra,
        }

    def write_others(self, writer: ModelWriter) -> None:
        r = self.anchor.others()
        for key in self.proj.plan.others:
            if not writer.shard_done(key):
                writer.add(key, r.get(key))
        self.proj.write_excluded(writer)

"""Stage 1, ``bmm taskvec``: the experts' task vectors ``U_t = W_t - W_pre`` of every solvable module.

Output: ``<work>/taskvec/block-NNN.safetensors`` (one per transformer block) holding ``"<key>@<t>"`` tensors in the
``[d_out, d_in]`` orientation (GPT-2 Conv1D transposed), in ``--dtype`` (float32 by default: the difference of two
bf16 weights is generally not representable in bf16). The manifest also records the base, the experts and the module
plan that later stages read. Memory: one block's tensors at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Block, ModuleRef, Plan, build_plan
from .errors import InputError
from .preflight import check_experts, check_finite
from .progress import track
from .stage import Stage, load_manifest
from .store import DTYPE_NAMES, Checkpoint, ShardReader, parse_dtype

STAGE = "taskvec"


def tv_key(key: str, t: int) -> str:
    return f"{key}@{t}"


def to_linear(ref: ModuleRef, w: torch.Tensor) -> torch.Tensor:
    """Checkpoint orientation -> [d_out, d_in]."""
    return w.t() if ref.conv1d else w


def from_linear(ref: ModuleRef, w: torch.Tensor) -> torch.Tensor:
    """[d_out, d_in] -> checkpoint orientation."""
    return w.t() if ref.conv1d else w


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

    def taus(self, block: Block, ref: ModuleRef, reader=None) -> torch.Tensor:
        """[T, d_out, d_in] float32 task vectors of one module (from the taskvec shard)."""
        reader = reader or self.reader(block)
        return torch.stack([reader.get(tv_key(ref.key, t)).float() for t in range(self.num_tasks)])

    def reader(self, block: Block) -> ShardReader:
        path = self.work / STAGE / f"{block.shard}.safetensors"
        if not path.exists():
            raise InputError(f"{path} is missing: rerun `bmm taskvec` (it resumes)")
        return ShardReader(path)

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


def open_inputs(base: str, experts: list[str], *, allow_dtype_mismatch: bool = False) -> tuple[Checkpoint, list[Checkpoint], Plan]:
    """Open and preflight base + experts; build the module plan."""
    b = Checkpoint.open(base, role="base")
    es = [Checkpoint.open(e, role=f"expert {i + 1}") for i, e in enumerate(experts)]
    check_experts(b, es, allow_dtype_mismatch=allow_dtype_mismatch)
    plan = build_plan(((k, m.shape) for k, m in b.meta.items()), source=str(b.root))
    check_finite([b, *es], plan.others)  # solvable tensors are checked as taskvec reads them
    return b, es, plan


def taskvec(base: str, experts: list[str], work: Path, *, dtype: str = "float32", force: bool = False,
            allow_dtype_mismatch: bool = False) -> dict:
    """Write the task vectors of every solvable module, one block at a time; resumable."""
    t0 = time.perf_counter()
    store_dtype = parse_dtype(dtype)
    b, es, plan = open_inputs(base, experts, allow_dtype_mismatch=allow_dtype_mismatch)
    inputs = {"base": b.fingerprint(), "experts": [e.fingerprint() for e in es]}
    stage = Stage(work, STAGE, inputs=inputs, options={"dtype": DTYPE_NAMES[store_dtype]}, force=force)
    stage.set("plan", plan.to_json())
    stage.set("paths", {"base": str(b.root), "experts": [str(e.root) for e in es]})
    todo = [blk for blk in plan.blocks if not stage.done(blk.shard)]
    skipped = len(plan.blocks) - len(todo)
    for blk in track(todo, f"taskvec ({len(es)} experts)", total=len(todo)):
        tensors: dict[str, torch.Tensor] = {}
        for ref in blk.modules:
            w0 = b.get(ref.key).float()
            for t, e in enumerate(es):
                u = e.get(ref.key).float() - w0
                tensors[tv_key(ref.key, t)] = to_linear(ref, u).to(store_dtype).contiguous()
            del w0
        stage.write(blk.shard, tensors, {"stack": blk.stack, "layer": blk.layer})
        del tensors
    summary = {
        "stage": STAGE,
        "dir": str(stage.dir),
        "blocks": len(plan.blocks),
        "blocks_written": len(todo),
        "blocks_skipped": skipped,
        "modules": len(plan.modules),
        "others": len(plan.others),
        "unknown": plan.unknown,
        "experts": len(es),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    stage.finish(**{k: v for k, v in summary.items() if k not in ("blocks_written", "blocks_skipped", "seconds")})
    return summary


def load_project(work: Path) -> Project:
    """Reopen base and experts recorded by a finished taskvec stage (and check they did not change since)."""
    man = load_manifest(work, STAGE, need="bmm taskvec --base B --experts E1 E2 ... --work DIR")
    paths = man.get("paths", {})
    b = Checkpoint.open(paths["base"], role="base")
    es = [Checkpoint.open(p, role=f"expert {i + 1}") for i, p in enumerate(paths["experts"])]
    now = {"base": b.fingerprint(), "experts": [e.fingerprint() for e in es]}
    if now != man["inputs"]:
        raise InputError(f"{Path(work) / STAGE}: the base or an expert changed on disk since `bmm taskvec`; "
                         "rerun it with --force")
    plan = build_plan(((k, m.shape) for k, m in b.meta.items()), source=str(b.root))
    return Project(Path(work), b, es, plan, man)


def plan_summary(base: str, experts: list[str], *, num_groups: int = 1) -> dict:
    """What ``bmm plan`` prints: solvable modules per block and group, others, unknown keys, sizes."""
    b, es, plan = open_inputs(base, experts, allow_dtype_mismatch=True)
    groups: dict[str, int] = {}
    tv_bytes = 0
    for m in plan.modules:
        groups[m.group] = groups.get(m.group, 0) + 1
        tv_bytes += b.meta[m.key].numel * 4 * len(es)
    return {
        "base": str(b.root),
        "experts": [str(e.root) for e in es],
        "architecture": (b.config().get("architectures") or ["?"])[0],
        "parameters": sum(m.numel for m in b.meta.values()),
        "blocks": len(plan.blocks),
        "stacks": plan.stack_layers,
        "block_groups": {str(g): [blk.id for blk in plan.blocks if plan.block_group(blk, num_groups) == g]
                         for g in range(num_groups)},
        "modules": len(plan.modules),
        "modules_per_group": groups,
        "solvable_parameters": sum(b.meta[m.key].numel for m in plan.modules),
        "others": plan.others,
        "unknown": plan.unknown,
        "taskvec_bytes_fp32": tv_bytes,
    }

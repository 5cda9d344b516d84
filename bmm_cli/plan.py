"""``bmm plan``: check the inputs and report what a merge would do, before any work.

Which tensors BMM solves (per block and block-group) and which it leaves to the anchor's rule, LoRA experts and
added tokens, dtype mismatches, the disk each stage of a merge writes (:mod:`bmm_cli.budget`; ``work``: checked
against that directory's file system) and a rough estimate of each stage's time on this machine
(:mod:`bmm_cli.timing`). Reads headers and adapters only; writes nothing.
"""

from __future__ import annotations

from . import budget, lora, timing
from .anchors import METHODS
from .arch import Plan
from .device import resolve_device
from .errors import InputError
from .store import Checkpoint
from .taskvec import open_inputs, token_plan

GRAMS = ("free", "data", "hybrid")


def plan(base: str, experts: list[str], *, blocks: int = 1, anchor: str = "tsv", gram: str = "free",
         dtype: str | None = None, work=None, exclude: list[str] | None = None) -> dict:
    """What ``bmm plan`` prints (JSON-ready): :func:`plan_summary` of the inputs, ``disk`` (bytes per stage of
    ``bmm merge --anchor ANCHOR --gram GRAM``, the output in ``dtype``, a search's cache apart; with ``work`` the
    free space there, refused in one line when it cannot hold the stages) and ``time`` (seconds per stage)."""
    if anchor not in METHODS:
        raise InputError(f"--anchor {anchor!r}: choose one of {', '.join(METHODS)}")
    if gram not in GRAMS:
        raise InputError(f"--gram {gram!r}: choose one of {', '.join(GRAMS)}")
    b, es, mod_plan = open_inputs(base, experts, allow_dtype_mismatch=True, exclude=exclude)
    res = plan_summary(b, es, mod_plan, num_groups=blocks)
    est = budget.for_merge(mod_plan, b.meta, len(es), anchor=anchor, gram=gram, search=True, out_dtype=dtype)
    cache = budget.only(est, ("factors-",), out=False)
    merge_est = budget.Estimate({k: v for k, v in est.stages.items() if k not in cache.stages}, est.out)
    res["disk"] = {**merge_est.to_json(), "search_cache": cache.to_json()["stages"], "anchor": anchor, "gram": gram}
    if work is not None:
        res["disk"].update(budget.check_disk(merge_est, work), work=str(work))
    res["time"] = timing.for_merge(mod_plan, b.meta, len(es), anchor=anchor, gram=gram, search=True,
                                   device=str(resolve_device("auto")), input_bytes=read_bytes(b, es, mod_plan))
    return res


def read_bytes(b: Checkpoint, es: list, plan: Plan) -> int:
    """Bytes a stage reads per pass over the solvable modules: the base's tensors, each full expert's, and each LoRA
    expert's factors (its adapter file, not the dense tensors it stands for)."""
    keys = {ref.key for ref in plan.modules}
    dense = sum(int(b.meta[k].nbytes) for k in keys)
    total = dense
    for e in es:
        if isinstance(e, lora.LoraCheckpoint):
            total += sum(int(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size())
                         for k, m in e.adapter.modules.items() if k in keys)
        else:
            total += dense
    return total


def plan_summary(b: Checkpoint, es: list, plan: Plan, *, num_groups: int = 1) -> dict:
    """The inputs part of ``bmm plan``: solvable modules per block and group, others, unknown and excluded keys,
    LoRA experts, added tokens, dtype mismatches and sizes, for the opened base ``b``, experts ``es`` and module
    ``plan`` (:func:`bmm_cli.taskvec.open_inputs`)."""
    _, tplan = token_plan(b, es, plan, "base")
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
        "excluded": plan.excluded,
        "taskvec_store_float32_bytes": tv_bytes,  # what `bmm taskvec --store float32` adds (the default: none)
        "lora": {str(i + 1): _lora_summary(e, plan) for i, e in enumerate(es) if isinstance(e, lora.LoraCheckpoint)},
        "vocabulary": None if tplan is None else {"base_tokens": tplan.shared,
                                                  "added_by_experts": tplan.dropped},
        "dtype_mismatches": {str(i + 1): d for i, e in enumerate(es) if (d := _dtype_mismatch(b, e))},
    }


def _dtype_mismatch(b: Checkpoint, e) -> dict | None:
    """The tensors an expert stores in another dtype than the base (``bmm merge`` refuses them unless
    ``--allow-dtype-mismatch``); None when there are none (LoRA experts are read in the base's dtype)."""
    if isinstance(e, lora.LoraCheckpoint):
        return None
    keys = [k for k, m in b.meta.items() if k in e.meta and e.meta[k].dtype != m.dtype]
    if not keys:
        return None
    return {"tensors": len(keys), "example": keys[0], "expert_dtype": e.meta[keys[0]].dtype,
            "base_dtype": b.meta[keys[0]].dtype}


def _lora_summary(e, plan: Plan) -> dict:
    """What a LoRA expert changes: its adapted solvable modules (the rest get a zero task vector from it)."""
    ad = e.adapter
    solvable = {m.key for m in plan.modules}
    return {"adapter": str(e.root), "ranks": sorted({m.rank for m in ad.modules.values()}),
            "solvable_modules": len(set(ad.modules) & solvable), "other_tensors": sorted(ad.touched() - solvable)}

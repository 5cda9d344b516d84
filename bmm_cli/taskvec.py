"""Stage 1, ``bmm taskvec``: read and check the experts' task vectors ``U_t = W_t - W_pre`` of every solvable module.

The stage reads every solvable tensor of the base and the experts one block at a time (NaN/Inf is refused, naming
the file and tensor) and records the inputs' fingerprints, the base, the experts and the module plan that later
stages read. By default it stores no copy of the task vectors: ``<work>/taskvec/block-NNN.safetensors`` is an empty
shard marking the block done, and every later stage recomputes ``U_t`` in float32 from the (memory-mapped)
checkpoints (:meth:`bmm_cli.workdir.Project.taus`), which costs a read of the inputs instead of ``4·T`` bytes per
block parameter of disk. ``store`` (``--store float32|bfloat16|float16``) keeps a copy instead: ``"<key>@<t>"``
tensors in the ``[d_out, d_in]`` orientation (GPT-2 Conv1D transposed) in that dtype; float32 gives the same values
as the recomputation, bfloat16 and float16 round them (the difference of two bf16 weights is generally not
representable in bf16). Memory: one block's tensors at a time.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from . import lora, tokens
from .arch import Plan, build_plan, exclude_pattern
from .errors import InputError
from .hub import preflight_remote
from .keymap import match_base
from .preflight import check_experts, check_finite
from .progress import track
from .stage import MANIFEST, Stage
from .store import Checkpoint, parse_dtype
from .workdir import TASKVEC, task_vector, to_linear, tv_key


def open_expert(spec: str, base: Checkpoint, role: str, exclude: re.Pattern | None = None):
    """An expert: a model (directory, file, hub id; a task model around the base's backbone is read through
    :func:`~bmm_cli.keymap.match_base`), or a PEFT LoRA adapter (``ADAPTER`` or ``BASE+ADAPTER``) on ``base``
    (:class:`~bmm_cli.lora.LoraCheckpoint`, whose task vector is ``scale·B·A``)."""
    return lora.open_expert(spec, base, role=role) or match_base(Checkpoint.open(spec, role=role), base, role,
                                                                 exclude=exclude)


def reopen_spec(e) -> str:
    """What later stages reopen an expert from (a LoRA expert as ``BASE+ADAPTER``, absolute paths)."""
    return e.reopen_spec if isinstance(e, lora.LoraCheckpoint) else str(e.root)


def check_data_experts(experts: list, plan: Plan | None = None) -> None:
    """Data Grams run each expert as a model on its calibration texts and hook its solvable modules: refuse LoRA
    experts and MoE expert FFNs (transformers holds the experts fused in memory: no module to hook), one line."""
    moe = next((m for m in plan.modules if m.expert is not None), None) if plan is not None else None
    if moe is not None:
        raise InputError(f"{moe.key}: data Grams (--calib, --gram data/hybrid, --anchor regmean) cannot hook MoE "
                         "expert FFNs (transformers runs them fused); merge this model with the data-free solve")
    for i, e in enumerate(experts):
        if isinstance(e, lora.LoraCheckpoint):
            raise InputError(f"expert {i + 1} ({e.root}) is a LoRA adapter: data Grams (--calib, --gram data/hybrid, "
                             "--anchor regmean) run each expert as a model; merge the adapter into its base first "
                             "(peft merge_and_unload) or use the data-free solve")


def vocab_of(b: Checkpoint, es: list, plan: Plan) -> tokens.VocabLayout | None:
    """The vocabulary tensors of a merge and each model's token rows (:func:`bmm_cli.tokens.vocab_layout`)."""
    cfg = b.config()
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return tokens.vocab_layout(b.meta, [e.meta for e in es], plan.others, size)


def token_plan(b: Checkpoint, es: list, plan: Plan, mode: str = "base") -> tuple[tokens.VocabLayout | None,
                                                                                  tokens.TokenPlan | None]:
    """The vocabulary layout and the output's token plan for ``--tokenizer mode`` (checked; refusals name the
    token)."""
    layout = vocab_of(b, es, plan)
    mode = tokens.expert_choice(mode, [e.spec for e in es], [e.root for e in es], "--tokenizer")
    if layout is None or (mode == "base" and not layout.resized):
        return layout, tokens.merge_plan(b.root, None, [], mode)
    return layout, tokens.merge_plan(b.root, layout, [e.root for e in es], mode)


def open_inputs(base: str, experts: list[str], *, allow_dtype_mismatch: bool = False,
                tokenizer: str = "base", exclude: list[str] | None = None) -> tuple[Checkpoint, list[Checkpoint], Plan]:
    """Open and preflight base + experts (with the output vocabulary ``--tokenizer``); build the module plan
    (``exclude``: the ``--exclude`` patterns, whose tensors keep the base's value). Hub ids still to download are
    first checked from their headers (:func:`bmm_cli.hub.preflight_remote`)."""
    pattern = exclude_pattern(exclude)
    preflight_remote(base, experts, allow_dtype_mismatch=allow_dtype_mismatch, exclude=exclude)
    b = Checkpoint.open(base, role="base")
    es = [open_expert(e, b, f"expert {i + 1}", pattern) for i, e in enumerate(experts)]
    plan = build_plan(((k, m.shape) for k, m in b.meta.items()), source=str(b.root), exclude=exclude)
    try:
        layout = vocab_of(b, es, plan)
    except InputError:
        layout = None  # the shape check below names the tensor
    check_experts(b, es, allow_dtype_mismatch=allow_dtype_mismatch,
                  vocab_keys=layout.keys if layout is not None and layout.resized else (), exclude=pattern)
    token_plan(b, es, plan, tokenizer)
    check_finite([b, *es], plan.others)  # solvable tensors are checked as taskvec reads them
    return b, es, plan


STORE_CHOICES = ("none", "float32", "bfloat16", "float16")  # --store: none recomputes the task vectors when read


def store_name(store: str | None, work: Path | None = None) -> str:
    """``--store``'s canonical name: ``none``, or the dtype a copy of the task vectors is kept in. ``None`` (what
    ``bmm merge`` passes): the choice of the taskvec stage already in ``work``, else ``none``."""
    if store is None:
        try:
            store = json.loads((Path(work) / TASKVEC / MANIFEST).read_text())["options"]["store"]
        except (TypeError, OSError, ValueError, KeyError):
            store = "none"  # no stage yet (or one the Stage refuses with its own message)
    if str(store).lower() == "none":
        return "none"
    try:
        name = str(parse_dtype(str(store))).removeprefix("torch.")
    except InputError as exc:
        raise InputError(f"--store {store!r}: {exc}") from None
    if name not in STORE_CHOICES:
        raise InputError(f"--store {store!r}: choose {', '.join(STORE_CHOICES)}")
    return name


def taskvec(base: str, experts: list[str], work: Path, *, store: str | None = "none", force: bool = False,
            allow_dtype_mismatch: bool = False, exclude: list[str] | None = None) -> dict:
    """Read and check the task vectors of every solvable module, one block at a time, keeping a copy in ``store``'s
    dtype (``"none"``: no copy; later stages recompute them from the checkpoints; None: as the stage already in
    ``work`` has it, else none); resumable. ``exclude``: the ``--exclude`` patterns (recorded: every later stage
    rebuilds the same plan)."""
    t0 = time.perf_counter()
    keep = store_name(store, work)
    store_dtype = None if keep == "none" else parse_dtype(keep)
    b, es, plan = open_inputs(base, experts, allow_dtype_mismatch=allow_dtype_mismatch, exclude=exclude)
    inputs = {"base": b.fingerprint(), "experts": [e.fingerprint() for e in es]}
    options = {"store": keep, **({"exclude": list(exclude)} if exclude else {})}
    stage = Stage(work, TASKVEC, inputs=inputs, options=options, force=force)
    stage.set("plan", plan.to_json())
    stage.set("paths", {"base": str(b.root), "experts": [reopen_spec(e) for e in es]})
    todo = [blk for blk in plan.blocks if not stage.done(blk.shard)]
    skipped = len(plan.blocks) - len(todo)
    for blk in track(todo, f"taskvec ({len(es)} experts)", total=len(todo)):
        tensors: dict[str, torch.Tensor] = {}
        for ref in blk.modules:
            w0 = b.get(ref.key).float()
            for t, e in enumerate(es):
                u = task_vector(e, ref.key, w0)  # reads (and checks) the expert's tensor
                if store_dtype is not None:
                    tensors[tv_key(ref.key, t)] = to_linear(ref, u).to(store_dtype).contiguous()
            del w0
        stage.write(blk.shard, tensors, {"stack": blk.stack, "layer": blk.layer})
        del tensors
    summary = {
        "stage": TASKVEC,
        "dir": str(stage.dir),
        "blocks": len(plan.blocks),
        "blocks_written": len(todo),
        "blocks_skipped": skipped,
        "modules": len(plan.modules),
        "others": len(plan.others),
        "unknown": plan.unknown,
        "excluded": plan.excluded,
        "experts": len(es),
        "store": keep,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    stage.finish(**{k: v for k, v in summary.items() if k not in ("blocks_written", "blocks_skipped", "seconds")})
    return summary

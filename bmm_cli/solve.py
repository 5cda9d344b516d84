"""Stage 4, ``bmm solve``: the MAP merge ``U = (B̂ + λ·U0)(Ĝ + λI)⁻¹``, ``W = W_pre + s·U``, written as a model.

λ is given per (block-group, group) and s per block-group, as a params file (``s_0``, ``lam_0_attn_in``, ...,
``eps``; the format ``bmm search`` writes, :mod:`bmm_cli.params`) or as one ``--lam``/``--scale`` for everything;
with neither, λ per module by the evidence (:mod:`bmm_cli.default_params`). ``--gram hybrid`` mixes the data-free
and data-assisted statistics with ``ε``. Other tensors come from the anchor stage. The solve streams one block at a
time on ``--device`` (CUDA when present), each merged tensor written to its shard as it is made. When a search left
its factor cache in the work dir, the solve goes through it (the search trials' own code,
:mod:`bmm_cli.factor_cache`, so ``--params best.json`` rewrites the searched model bit for bit on the same device);
otherwise one fp64 Cholesky per module (fp32 is off by ~1 % at λ ~ 1e-4).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic, lora, tokens
from .arch import Block, Plan
from .closed_form import solve_direct
from .default_params import EVIDENCE_RULE, solve_params
from .defaults import FREE_LAM_FACTOR
from .device import resolve_device
from .errors import InputError
from .factor_cache import add_block, current_factors
from .params import Params
from .progress import info, track
from .stage import Stage
from .store import MARKER_NAME, Checkpoint, parse_dtype
from .taskvec import token_plan
from .trial_solver import TrialSolver
from .workdir import Sources, from_linear
from .writer import ModelWriter, model_card, parse_size


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
    tokenizer: str = "base",
    chat_template: str = "auto",
) -> dict:
    """One closed-form solve of the whole model, streamed per block, written as an HF model at ``out``
    (vocabulary and chat template by ``tokenizer`` and ``chat_template``: :func:`vocab_output`)."""
    t0 = time.perf_counter()
    src = Sources(work, anchor, gram)
    params = solve_params(src, params_file, lam=lam, scale=scale, eps=epsilon, blocks=blocks)
    proj = src.proj
    voc = vocab_output(proj.base, proj.experts, proj.plan, tokenizer, chat_template)
    dev = resolve_device(device)
    out_dt = parse_dtype(dtype) if dtype else None
    factors = current_factors(src)  # a search's cache: solve through it, as the search's trials did
    path = "direct" if factors is None else f"factors {factors.id}"
    writer = ModelWriter(Path(out), voc.entries(src.out_entries(out_dt)), max_shard_size=parse_size(max_shard_size),
                         copy_from=proj.base.root, force=force, inputs=proj.inputs(),
                         plan_id=json.dumps([src.fingerprint, params.flat(), path, voc.ident()], sort_keys=True))
    stats = {"modules": 0, "max_rel_change": 0.0}
    voc.write_others(writer, src)
    todo = [blk for blk in proj.plan.blocks if not all(writer.shard_done(r.key) for r in blk.modules)]
    for blk in track(todo, f"solve ({gram}, anchor {src.anchor.method.name})", total=len(todo)):
        for ref, W in _solve_block(src, params, blk, dev, factors):
            w0 = proj.base_linear(ref)
            stats["modules"] += 1
            stats["max_rel_change"] = max(stats["max_rel_change"],
                                          float((W - w0).norm() / w0.norm().clamp_min(1e-12)))
            writer.add(ref.key, from_linear(ref, W))
        proj.base.close()  # unmap the base: its pages read so far would stay in RSS (file-backed) to the end
    rule = EVIDENCE_RULE + (f"; data-free λ × {FREE_LAM_FACTOR:g}" if gram == "free" else "")
    recipe = src.recipe(params, **({"lam_rule": rule} if params_file is None and lam is None else {}))
    writer.close(recipe=recipe, card=model_card({"title": f"BMM merge ({gram}, anchor {src.anchor.method.name})",
                                                 **recipe}), finish=voc.finish)
    return {"model": str(out), "anchor": src.anchor.method.name, "gram": gram, "params": params.flat(), **voc.summary(),
            "device": str(dev), "modules": stats["modules"],
            "path": "cached eigenbasis (the search's)" if factors is not None else "direct (fp64 Cholesky)",
            "max_relative_change": round(stats["max_rel_change"], 6), "seconds": round(time.perf_counter() - t0, 3)}


def solve_adapter(
    work: Path,
    anchor: str,
    *,
    out: Path,
    rank: int | None = None,
    params_file: str | Path | None = None,
    lam: float | None = None,
    scale: float | None = None,
    epsilon: float | None = None,
    blocks: int = 1,
    device: str = "auto",
    dtype: str | None = None,
    force: bool = False,
) -> dict:
    """The data-free merge of LoRA experts written as one PEFT LoRA adapter on the base (``--out-format peft``).

    Each module's update ``ΔW = s·U`` is cut to the span of the experts' stacked A factors (``Q``, Σr_t columns:
    :mod:`bmm_cli.lowrank`): exact for anchors whose rows stay in it (TA, TSV, ISO, zero); otherwise, and above
    ``rank``, :func:`bmm_cli.lora.compress` keeps the best rank-``rank`` part and the result reports the energy kept
    per module. Changed "other" tensors (``modules_to_save``, embedding LoRA) go to ``modules_to_save``; a changed
    bias of an adapted module goes to ``lora_B.bias``."""
    t0 = time.perf_counter()
    src = Sources(work, anchor, "free")
    proj = src.proj
    check_adapter_experts(proj.experts)
    params = solve_params(src, params_file, lam=lam, scale=scale, eps=epsilon, blocks=blocks)
    dev = resolve_device(device)
    out_dt = parse_dtype(dtype) if dtype else torch.float32
    factors = current_factors(src)
    r = src.anchor.others()
    changed = {k: r.get(k) for k in proj.plan.others
               if not torch.equal(r.get(k).float(), proj.base.get(k).float())}
    updates, exact = [], 0
    for blk in track(proj.plan.blocks, f"solve (free, anchor {src.anchor.method.name}) -> adapter"):
        for ref, W in _solve_block(src, params, blk, dev, factors):
            d = W.double() - proj.base_linear(ref).double()
            bias_key = ref.key.removesuffix("weight") + "bias"
            bias = changed.pop(bias_key) - proj.base.get(bias_key).float() if bias_key in changed else None
            if not bool(d.any()) and bias is None:
                continue
            fs = [f for f in (e.factors(ref.key) for e in proj.experts) if f is not None]
            left = right = None
            if fs:
                Q = torch.linalg.qr(torch.cat([a.double() for _, a in fs]).mT).Q
                left = d @ Q
                if float(torch.linalg.norm(d - left @ Q.mT)) <= 1e-6 * float(torch.linalg.norm(d)):
                    right, exact = Q.mT, exact + 1
            u = (lora.ModuleUpdate(ref.key, left, right, conv1d=ref.conv1d, bias=bias) if right is not None
                 else lora.ModuleUpdate.dense(ref.key, d, conv1d=ref.conv1d, bias=bias))
            updates.append(u)
        proj.base.close()
    saved = {k.rsplit(".", 1)[0] for k in changed}  # modules_to_save holds whole modules: every tensor of each
    changed.update({k: r.get(k) for k in proj.plan.others if k.rsplit(".", 1)[0] in saved and k not in changed})
    recipe = src.recipe(params, out_format="peft", rank=rank)
    card = model_card({"title": f"BMM merge as a LoRA adapter (free, anchor {src.anchor.method.name})", **recipe})
    res = lora.write_peft_adapter(out, updates, rank=rank, base_model=proj.base.spec, modules_to_save=changed,
                                  dtype=out_dt, force=force,
                                  files={MARKER_NAME: json.dumps(recipe, indent=2) + "\n", "README.md": card})
    energies = {k: v["energy"] for k, v in res["modules"].items()}
    low = min(energies, key=energies.get) if energies else None
    info(f"bmm: adapter rank {res['rank']}, {len(updates)} modules ({exact} exactly in the span of the experts' A); "
         + (f"energy kept >= {energies[low]:.6f} ({low})" if low else "no module changed"))
    return {"adapter": str(out), "anchor": src.anchor.method.name, "rank": res["rank"], "params": params.flat(),
            "modules": res["modules"], "modules_to_save": sorted(changed),
            "min_energy": energies[low] if low else 1.0, "seconds": round(time.perf_counter() - t0, 3)}


def check_adapter_experts(experts: list) -> None:
    """``--out-format peft`` writes an adapter on the base: every expert must be a LoRA adapter of it."""
    for i, e in enumerate(experts):
        if not isinstance(e, lora.LoraCheckpoint):
            raise InputError(f"--out-format peft: expert {i + 1} ({e.root}) is a full model, not a LoRA adapter; "
                             "an adapter output needs every expert to be a LoRA adapter (or write a full model)")


@dataclass
class VocabOutput:
    """The output's vocabulary (``--tokenizer``) and chat template (``--chat-template``), decided and checked before
    any heavy work: which tensors are vocabulary-sized, the token plan, the template and where it came from."""

    base: Checkpoint
    experts: list
    layout: tokens.VocabLayout | None
    plan: tokens.TokenPlan | None
    template: str | None
    note: str

    def entries(self, entries: list) -> list:
        """The writer's entries with the vocabulary tensors at the output's number of token rows."""
        if self.plan is None:
            return entries
        out = []
        for k, shape, dt in entries:
            if k in self.layout.keys:
                shape = tuple(self.plan.rows if a == self.layout.keys[k] else d for a, d in enumerate(shape))
            out.append((k, shape, dt))
        return out

    def write_others(self, writer: ModelWriter, src: Sources) -> None:
        """The anchor's merged "other" tensors; a vocabulary tensor gets its shared rows from the merge and the
        other rows by the token plan (:func:`bmm_cli.tokens.assemble_rows`)."""
        r = src.anchor.others()
        for key in src.proj.plan.others:
            if writer.shard_done(key):
                continue
            v = r.get(key)
            if self.plan is not None and key in self.layout.keys:
                axis = self.layout.keys[key]
                v = tokens.assemble_rows(self.plan, key, tokens.cut_rows(v, axis, self.plan.shared),
                                         self.base.get(key), [e.get(key) for e in self.experts], axis)
            writer.add(key, v)
        src.proj.write_excluded(writer)

    def finish(self, d: Path) -> None:
        """Tokenizer files, ``config.vocab_size`` and the chat template of the output directory ``d``."""
        if self.plan is not None:
            tokens.write_tokenizer(self.plan, self.base.root, [e.root for e in self.experts], d)
            cfg = json.loads((d / "config.json").read_text())
            atomic.write_text(d / "config.json", json.dumps(tokens.config_vocab(cfg, self.plan), indent=2,
                                                            sort_keys=True) + "\n")
        if self.template != tokens.read_chat_template(d):
            tokens.write_chat_template(d, self.template)

    def ident(self) -> list:
        """What the written files depend on besides the tensors' recipe."""
        return [self.plan.to_json() if self.plan is not None else None, self.note,
                hashlib.sha256((self.template or "").encode()).hexdigest()]

    def summary(self) -> dict:
        return {"tokenizer": self.plan.to_json() if self.plan is not None else {"mode": "base"},
                "chat_template": self.note}


def vocab_output(base: Checkpoint, experts: list, plan: Plan, tokenizer: str = "base",
                 chat_template: str = "auto", *, say: bool = True) -> VocabOutput:
    """Decide (and check) the output's vocabulary and chat template; ``say``: tell on stderr what was chosen."""
    layout, tplan = token_plan(base, experts, plan, tokenizer)
    choice = tokens.expert_choice(chat_template, [e.spec for e in experts], [e.root for e in experts],
                                  "--chat-template")
    template, note = tokens.choose_chat_template(choice, base.root, [e.root for e in experts])
    if say and template is not None:  # nothing to tell when no model has a template
        info(f"bmm: {note}")
        if tplan is not None and (tplan.added or tplan.dropped):
            what = (f"{len(tplan.dropped)} token(s) the experts added are dropped: {', '.join(tplan.dropped[:8])}"
                    if tplan.dropped else f"{len(tplan.added)} added token row(s) from the experts")
            info(f"bmm: tokenizer {tplan.mode}: {tplan.rows} rows; {what}")
    return VocabOutput(base, experts, layout, tplan, template, note)


def _solve_block(src: Sources, params: Params, blk: Block, dev: torch.device, factors: Stage | None):
    """Yield ``(ref, W)`` (linear orientation, fp32, CPU) for one block.

    With the search's factor cache (``factors``), through the same :class:`TrialSolver` code as a search trial,
    so ``bmm solve --params best.json`` writes the searched model bit for bit (same device). Without it, one
    Cholesky per module in fp64 on statistics recomputed in fp64 (:meth:`Sources.stats64`): at the small end of
    the λ range (λ ~ 1e-4, low-rank task vectors) an fp32 Cholesky is off by ~1 % (κ(Ĝ+λI) ~ λ_max/λ times fp32
    rounding), and the stage's fp32 Ĝ carries rounding noise in its null space that a rank-deficient module
    (T·d_out < d_in) turns into errors of noise/λ.
    """
    proj = src.proj
    if factors is not None or src.gram == "hybrid":
        solver = TrialSolver(dev)
        refs = add_block(solver, src, factors, blk)
        lam = {k: params.lam_scale(proj, blk, ref.group)[0] for k, ref in refs.items()}
        scl = {k: params.lam_scale(proj, blk, ref.group)[1] for k, ref in refs.items()}
        try:
            for key, W in solver.solve(lam, scl, eps=params.eps, out_dtype=torch.float32):
                yield refs[key], W
        finally:
            solver.close()
        return
    a = src.anchor.block(blk)
    stats = src.stats64(blk, device=dev)
    for ref in blk.modules:
        lam_v, s = params.lam_scale(proj, blk, ref.group)
        u0 = a.get(ref.key).to(dev)
        st = stats(ref)
        U = solve_direct(st.G_hat, st.B_hat, u0, lam_v, key=ref.key, dtype=torch.float64)
        yield ref, (proj.base_linear(ref).to(dev, torch.float64) + s * U).float().cpu()

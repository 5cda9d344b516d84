"""The ``bmm`` command: a thin typer app. Each command parses, then calls the library function of the same name.

Results go to stdout (``--json`` for a machine-readable summary), progress and messages to stderr. Errors are one
line, ``bmm: error: ...``, with a non-zero exit code (2 bad input, 3 work-dir state, 4 numerics, 130 interrupted);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from . import __version__
from .anchor import OTHER_RULES
from .anchors import METHODS
from .defaults import DEFAULT_EPS, DEFAULT_SCALE
from .errors import BmmError, InputError
from .merge import MergeOptions
from .options import CalibOptions, OutputOptions, ParamsOptions, VocabOptions, default
from .progress import set_quiet
from .search.options import RunnerOptions, ScorerOptions, SearchOptions
from .taskvec import STORE_CHOICES
from .workdir import GRAM_KINDS, GRAM_STATS

app = typer.Typer(
    name="bmm",
    help="Bayesian Model Merging: merge fine-tuned checkpoints of one base model with the closed-form MAP merge.\n\n"
    "Pipeline: taskvec -> gram (data Grams, with calibration texts) -> anchor -> solve -> search (merge runs them "
    "all). Every stage writes to a work "
    "directory and resumes where it stopped.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"bmm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version_cb, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug or os.environ.get("BMM_DEBUG", "") not in ("", "0")
    set_quiet(quiet)


def _emit(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        text = human(result)
        if text:
            sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


JSON_OPT = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout.")
WORK_OPT = typer.Option(..., "--work", "-w", help="Work directory holding the stages.")
FORCE_OPT = typer.Option(False, "--force", help="Redo the stage when its inputs or options changed.")
EXCLUDE_OPT = typer.Option([], "--exclude", help="Leave the tensors whose key matches this regular expression "
                           "(re.search; repeatable) out of the merge: the output keeps the base's, and the experts' "
                           "may differ in shape (per-task heads).")
BASE_OPT = typer.Option(..., "--base", "-b", help="Base (pretrained) model: directory, .safetensors file or hub id.")
EXPERTS_OPT = typer.Option(..., "--experts", "-e", help="Fine-tuned experts: models, PEFT LoRA adapter dirs or "
                           "BASE+ADAPTER (repeat or list after one flag).")


@app.command()
def version(as_json: bool = JSON_OPT) -> None:
    """Print bmm's version and its main dependencies' versions."""
    import safetensors
    import torch

    info: dict[str, Any] = {"bmm": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
                            "cuda": torch.cuda.is_available()}
    _emit(info, as_json, lambda r: "\n".join(f"{k} {v}" for k, v in r.items()))


@app.command()
def plan(
    base: str = BASE_OPT,
    experts: List[str] = EXPERTS_OPT,
    blocks: int = typer.Option(1, "--blocks", min=1, help="Number of block-groups to show."),
    anchor: str = typer.Option(MergeOptions.flat_defaults()["anchor"], "--anchor", "-a",
                               help="Anchor of the merge whose disk is estimated."),
    gram: str = typer.Option("free", "--gram", help="Gram kind of the merge whose disk is estimated: free, data, "
                             "hybrid."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of float tensors (default: the base's)."),
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Check that this work directory's file system "
                                        "can hold the stages (refused in one line when it cannot)."),
    exclude: List[str] = EXCLUDE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Check the inputs and show which tensors BMM solves, per block and group, and which it leaves to the anchor,
    the disk each stage of a merge will write and a rough estimate of its time on this machine."""
    from . import budget, timing
    from .arch import key_preview
    from .plan import plan as run

    res = run(base, experts, blocks=blocks, anchor=anchor, gram=gram, dtype=dtype, work=work, exclude=exclude)

    def human(r: dict) -> str:
        lines = [
            f"base         {r['base']}  ({r['architecture']}, {r['parameters'] / 1e6:.1f}M parameters)",
            f"experts      {len(r['experts'])}: " + ", ".join(r["experts"]),
            f"blocks       {r['blocks']} in " + ", ".join(f"{s} ({n})" for s, n in r["stacks"].items()),
            f"solvable     {r['modules']} modules, {r['solvable_parameters'] / 1e6:.1f}M parameters: "
            + ", ".join(f"{g} {n}" for g, n in r["modules_per_group"].items()),
            f"others       {len(r['others'])} tensors merged by the anchor's rule",
        ]
        for g, ids in r["block_groups"].items():
            span = f"{ids[0]} .. {ids[-1]} ({len(ids)} blocks)" if ids else "-"
            lines.append(f"block-group {g}: {span}")
        for i, lo in r["lora"].items():
            lines.append(f"lora         expert {i}: rank {'/'.join(map(str, lo['ranks']))} on "
                         f"{lo['solvable_modules']} of {r['modules']} solvable modules (zero task vector elsewhere)"
                         + (f", {len(lo['other_tensors'])} other tensors" if lo["other_tensors"] else ""))
        if r["vocabulary"]:
            v = r["vocabulary"]
            lines.append(f"vocabulary   experts added {len(v['added_by_experts'])} tokens after the base's "
                         f"{v['base_tokens']}: merged on the shared rows; see --tokenizer")
        for i, d in r["dtype_mismatches"].items():
            lines.append(f"DTYPE        expert {i}: {d['tensors']} tensors stored as {d['expert_dtype']} where the "
                         f"base has {d['base_dtype']} (e.g. {d['example']}); merge refuses this without "
                         "--allow-dtype-mismatch")
        if r["unknown"]:
            lines.append(f"UNSOLVED     {len(r['unknown'])} tensors inside the blocks match no module bmm can solve "
                         "(merged by the anchor's rule for other tensors):")
            lines += [f"  {k}" for k in r["unknown"]]
        if r["excluded"]:
            lines.append(f"excluded     {len(r['excluded'])} tensors (--exclude) keep the base's value: "
                         + key_preview(r["excluded"]))
        d = r["disk"]
        lines.append(f"disk of `bmm merge --anchor {d['anchor']} --gram {d['gram']}` (work directory per stage, "
                     "then the output; --work puts the stages on another disk):")
        cache = budget.Estimate(d["search_cache"])
        w = max(len(k) for k in [*d["stages"], *cache.stages])
        lines += [f"  {x}" for x in budget.Estimate(d["stages"], d["out"]).lines(w)]
        lines += [f"  {x}  (only with bmm search / merge --eval)" for x in cache.lines(w)[:-1]]
        if "free" in d:
            lines.append(f"  {d['work']}: {budget.fmt_bytes(d['free'])} free, {budget.fmt_bytes(d['need'])} "
                         "still to write")
        t = r["time"]
        lines.append(f"time of the same merge on this machine ({t['device']}, {t['threads']} threads; a rough "
                     "estimate from the shapes and a 1 s calibration, ±2x):")
        lines += [f"  {x}" for x in timing.lines(t, w)]
        return "\n".join(lines)

    _emit(res, as_json, human)


TaskvecStore = Enum("TaskvecStore", {v: v for v in STORE_CHOICES}, type=str)  # type: ignore[misc]  # --store


@app.command()
def taskvec(
    base: str = BASE_OPT,
    experts: List[str] = EXPERTS_OPT,
    work: Path = WORK_OPT,
    store: TaskvecStore = typer.Option(TaskvecStore("none"), "--store",
                                       help="Keep a copy of the task vectors in this dtype (float32 is exact); none: "
                                       "the later stages recompute them from the checkpoints, no disk used."),
    allow_dtype_mismatch: bool = typer.Option(False, "--allow-dtype-mismatch",
                                              help="Accept experts stored in another dtype than the base."),
    exclude: List[str] = EXCLUDE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage 1: read and check the experts' task vectors (W_t - W_pre) of every solvable module, one block at a time,
    and record the inputs' fingerprints (later stages recompute the task vectors unless --store keeps a copy)."""
    from .stage import work_lock
    from .taskvec import taskvec as run

    with work_lock(work):
        res = run(base, experts, work, store=store.value, force=force, allow_dtype_mismatch=allow_dtype_mismatch,
                  exclude=exclude)
    _emit(res, as_json, lambda r: r["dir"])


DEVICE_OPT = typer.Option(default(OutputOptions, "device"), "--device", help="auto (CUDA when present), cpu, cuda, "
                          "cuda:N.")
SHARD_OPT = typer.Option(default(OutputOptions, "max_shard_size"), "--max-shard-size",
                         help="Largest output shard, e.g. 5GB, 500MB, or bytes.")
DTYPE_OUT_OPT = typer.Option(default(OutputOptions, "dtype"), "--dtype",
                             help="Output dtype of float tensors (default: the base's).")


def _choices(name: str, values) -> type[Enum]:
    """A CLI choice list made from a registry (typer shows and checks an Enum's values)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)  # type: ignore[return-value]


AnchorName = _choices("AnchorName", METHODS)  # the anchor registry (bmm_cli.anchors)
GramKind = _choices("GramKind", GRAM_STATS)  # what the gram stage computes
SolveGram = _choices("SolveGram", GRAM_KINDS)  # what a solve reads (free, data, or their hybrid mix)
OthersRule = _choices("OthersRule", OTHER_RULES)

MD = MergeOptions.flat_defaults()  # the defaults of `bmm merge` and `bmm search` are the library's
SD = SearchOptions.flat_defaults()


@app.command()
def anchor(
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Work directory holding the stages (omit it with "
                                        "--base/--experts/--materialize to merge straight from the checkpoints)."),
    method: AnchorName = typer.Option(..., "--method", "-m", help="Anchor merge method."),
    opts: List[str] = typer.Option([], "--opt", help="Method option KEY=VALUE (repeatable), e.g. --opt k=0.2."),
    materialize: Optional[Path] = typer.Option(None, "--materialize",
                                               help="Also write the anchor merge itself as a model directory."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Without --work: the base model."),
    experts: List[str] = typer.Option([], "--experts", "-e", help="Without --work: the experts."),
    external: Optional[str] = typer.Option(None, "--model", help="The merged checkpoint for --method external."),
    others: OthersRule = typer.Option(OthersRule(MD["others"]), "--others",
                                      help="Rule for non-solved tensors: the anchor's own, base, or mean."),
    exclude: List[str] = typer.Option([], "--exclude", help="Without --work: as bmm merge --exclude (with --work, "
                                      "the taskvec stage's)."),
    device: str = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OUT_OPT,
    max_shard_size: str = SHARD_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage 2: the anchor U0 of every solvable module (and the merged other tensors); --materialize writes it.

    Without --work (give --base, --experts and --materialize) the anchor merge is streamed straight from the
    checkpoints, W_t - W_pre per tensor, with nothing else written to disk."""
    from .anchor import anchor as run
    from .anchor import anchor_direct
    from .out_lock import output_lock
    from .stage import work_lock

    if work is None:
        if not base or not experts or materialize is None:
            raise InputError("bmm anchor: give --work DIR, or --base, --experts and --materialize OUT to merge "
                             "straight from the checkpoints")
        with output_lock(materialize):
            res = anchor_direct(base, experts, method.value, opts, materialize=materialize, others=others.value,
                                external=external, device=device, dtype=dtype, max_shard_size=max_shard_size,
                                force=force, exclude=exclude)
        _emit(res, as_json, lambda r: r["model"])
        return
    if base or experts or exclude:
        raise InputError("bmm anchor: --base/--experts/--exclude are read from the work dir's taskvec stage; drop "
                         "them or drop --work to merge straight from the checkpoints")
    from . import budget
    from .workdir import load_project

    proj = load_project(work)  # the disk the stage (and --materialize) needs, checked before any work
    est = budget.for_merge(proj.plan, proj.base.meta, proj.num_tasks, anchor=method.value, gram="free", out_dtype=dtype)
    budget.check_disk(budget.only(est, (f"anchor-{method.value}",), out=materialize is not None), work, materialize)
    with _out_lock(materialize), work_lock(work, create=False):
        res = run(work, method.value, opts, materialize=materialize, others=others.value, external=external,
                  device=device, dtype=dtype, max_shard_size=max_shard_size, force=force)
    _emit(res, as_json, lambda r: r.get("model", r["dir"]))


@app.command()
def gram(
    work: Path = WORK_OPT,
    kind: GramKind = typer.Option(GramKind(GRAM_STATS[0]), "--kind",
                                  help="data: from calibration texts; free: from task vectors (stored for "
                                  "inspection only: the stages recompute them)."),
    calib: List[str] = typer.Option([], "--calib", help="EXPERT=FILE per expert (1-based index or directory name); "
                                    "JSONL with a text field, or one sample per line."),
    samples: int = typer.Option(default(CalibOptions, "samples"), "--samples", min=1,
                                help="Calibration texts per expert."),
    max_len: int = typer.Option(default(CalibOptions, "max_len"), "--max-len", min=1,
                                help="Tokens per text (longer ones are truncated)."),
    batch_size: int = typer.Option(default(CalibOptions, "batch_size"), "--batch-size", min=1,
                                   help="Texts per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample selection."),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage 3: the Gram statistics (G, B, m) per module from calibration data (--kind data); --kind free stores the
    data-free ones, which no later stage reads (they recompute them from the task vectors in fp64)."""
    from .gram import gram as run
    from .stage import work_lock

    with work_lock(work, create=False):
        res = run(work, kind.value, calib=calib, samples=samples, max_len=max_len, batch_size=batch_size, seed=seed,
                  device=device, force=force)
    _emit(res, as_json, lambda r: r["dir"])


ANCHOR_STAGE_OPT = typer.Option(AnchorName(MD["anchor"]), "--anchor", "-a", help="Anchor stage to use.")
SOLVE_GRAM_OPT = typer.Option(SolveGram(GRAM_KINDS[0]), "--gram", help="Gram statistics: free, data or hybrid.")
PARAMS_OPT = typer.Option(default(ParamsOptions, "params_file"), "--params",
                          help="Params JSON (s_0, lam_0_attn_in, ...; or a search best.json).")
LAM_OPT = typer.Option(default(ParamsOptions, "lam"), "--lam", help="One relative λ for every module (default: each "
                       "module's own λ by type-II maximum likelihood, no validation data needed).")
SCALE_OPT = typer.Option(default(ParamsOptions, "scale"), "--scale",
                         help=f"One scale s for every module (default {DEFAULT_SCALE}).")
EPS_OPT = typer.Option(default(ParamsOptions, "epsilon"), "--epsilon",
                       help=f"Hybrid mix ε in [0, 1] (default {DEFAULT_EPS}).")
BLOCKS_OPT = typer.Option(default(ParamsOptions, "blocks"), "--blocks", min=1,
                          help="Block-groups (with --lam/--scale).")


TOKENIZER_OPT = typer.Option(default(VocabOptions, "tokenizer"), "--tokenizer",
                             help="Output vocabulary when experts added tokens: base (drop them), union (every added "
                                  "token, rows from the experts that added it) or an expert (number or path).")
CHAT_TEMPLATE_OPT = typer.Option(default(VocabOptions, "chat_template"), "--chat-template",
                                 help="auto (the experts' template when they agree, else the base's), base, an "
                                      "expert (number or path) or a template file.")


@app.command()
def solve(
    work: Path = WORK_OPT,
    anchor: AnchorName = ANCHOR_STAGE_OPT,
    gram: SolveGram = SOLVE_GRAM_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    params_file: Optional[Path] = PARAMS_OPT,
    lam: Optional[float] = LAM_OPT,
    scale: Optional[float] = SCALE_OPT,
    epsilon: Optional[float] = EPS_OPT,
    blocks: int = BLOCKS_OPT,
    device: str = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OUT_OPT,
    max_shard_size: str = SHARD_OPT,
    force: bool = typer.Option(False, "--force", help="Replace --out even if it is not a bmm output."),
    tokenizer: str = TOKENIZER_OPT,
    chat_template: str = CHAT_TEMPLATE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stage 4: the closed-form MAP merge U = (B + λU0)(G + λI)^-1, W = W_pre + s·U, written as a model."""
    from dataclasses import asdict

    from .out_lock import output_lock
    from .solve import solve as run
    from .stage import work_lock

    params = ParamsOptions(params_file=params_file, lam=lam, scale=scale, epsilon=epsilon, blocks=blocks)
    output = OutputOptions(device=device, dtype=dtype, max_shard_size=max_shard_size, force=force)
    vocab = VocabOptions(tokenizer=tokenizer, chat_template=chat_template)
    vocab.check()
    with output_lock(out), work_lock(work, create=False):
        res = run(work, anchor.value, gram.value, out=out, **asdict(params), **asdict(output), **asdict(vocab))
    _emit(res, as_json, lambda r: r["model"])


EVAL_OPT_HELP = ("Evaluation command template; {model} {trial} {workdir} {evaldir} are substituted shell-quoted. "
                 "Prints a number or JSON with score last.")
EVAL_PY_OPT = typer.Option(default(ScorerOptions, "eval_py"), "--eval-py", help="In-memory trials: MODULE:FUNCTION "
                           "or path/file.py:FUNCTION, called as FUNCTION(model, tokenizer, trial) -> float | dict on "
                           "the resident base, updated in place per trial.")
LM_EVAL_OPT = typer.Option(default(ScorerOptions, "lm_eval"), "--lm-eval", help="In-memory trials scored by "
                           "lm-evaluation-harness tasks (comma-separated): the mean of their primary metrics.")
LM_EVAL_LIMIT_OPT = typer.Option(default(ScorerOptions, "lm_eval_limit"), "--lm-eval-limit",
                                 help="Examples per lm-eval task.")
LM_EVAL_INCLUDE_OPT = typer.Option(default(ScorerOptions, "lm_eval_include"), "--lm-eval-include",
                                   help="Directory of custom lm-eval task YAML files.")
MINIMIZE_OPT = typer.Option(default(ScorerOptions, "minimize"), "--minimize",
                            help="Lower scores are better (e.g. perplexity, a loss).")
TIMEOUT_OPT = typer.Option(default(ScorerOptions, "timeout"), "--timeout",
                           help="Seconds per evaluation command before it is killed.")
INITIAL_OPT = typer.Option(SD["initial"], "--initial", min=0, help="Random points before the GP takes over.")
TRIAL_DIR_OPT = typer.Option(default(RunnerOptions, "trial_dir"), "--trial-dir", help="Where trial models are "
                             "written (node-local; tmpfs such as /dev/shm/bmm makes trials cheaper).")


@app.command()
def merge(
    base: str = BASE_OPT,
    experts: List[str] = EXPERTS_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    anchor: AnchorName = typer.Option(AnchorName(MD["anchor"]), "--anchor", "-a", help="Anchor merge (prior mean)."),
    anchor_opts: List[str] = typer.Option([], "--opt", help="Anchor option KEY=VALUE (repeatable)."),
    anchor_model: Optional[str] = typer.Option(MD["anchor_model"], "--anchor-model",
                                               help="Merged checkpoint for --anchor external."),
    calib: List[str] = typer.Option([], "--calib", help="EXPERT=FILE calibration texts (switches to data-assisted)."),
    gram: Optional[SolveGram] = typer.Option(MD["gram"], "--gram", help="free, data or hybrid (default: hybrid ε=0.5 "
                                             "with --calib, free without)."),
    params_file: Optional[Path] = typer.Option(MD["params_file"], "--params", help="Params JSON, e.g. a search's "
                                               "best.json."),
    lam: Optional[float] = LAM_OPT,
    scale: Optional[float] = SCALE_OPT,
    epsilon: Optional[float] = EPS_OPT,
    blocks: int = BLOCKS_OPT,
    work: Optional[Path] = typer.Option(MD["work"], "--work", "-w", help="Work directory (default: OUT.bmm-work)."),
    samples: int = typer.Option(MD["samples"], "--samples", min=1, help="Calibration texts per expert."),
    max_len: int = typer.Option(MD["max_len"], "--max-len", min=1, help="Tokens per calibration text."),
    others: OthersRule = typer.Option(OthersRule(MD["others"]), "--others", help="Rule for non-solved tensors."),
    device: str = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OUT_OPT,
    max_shard_size: str = SHARD_OPT,
    allow_dtype_mismatch: bool = typer.Option(MD["allow_dtype_mismatch"], "--allow-dtype-mismatch",
                                              help="Accept experts in another dtype."),
    exclude: List[str] = EXCLUDE_OPT,
    force: bool = typer.Option(MD["force"], "--force", help="Redo stages whose inputs changed; replace a foreign "
                               "--out."),
    tokenizer: str = TOKENIZER_OPT,
    chat_template: str = CHAT_TEMPLATE_OPT,
    out_format: str = typer.Option(MD["out_format"], "--out-format", help="model (a full model) or peft (every "
                                   "expert a LoRA adapter: the merge as one LoRA adapter on the base)."),
    rank: Optional[int] = typer.Option(MD["rank"], "--rank", min=1, help="With --out-format peft: the adapter's "
                                       "rank (default: exact, the experts' ranks added up at most)."),
    eval_cmd: Optional[str] = typer.Option(MD["eval_cmd"], "--eval", help="Search s and λ with this evaluation "
                                           "command (as bmm search --eval) and write the best trial's model to "
                                           "--out."),
    eval_py: Optional[str] = EVAL_PY_OPT,
    lm_eval: Optional[str] = LM_EVAL_OPT,
    lm_eval_limit: Optional[float] = LM_EVAL_LIMIT_OPT,
    lm_eval_include: Optional[Path] = LM_EVAL_INCLUDE_OPT,
    minimize: bool = MINIMIZE_OPT,
    timeout: float = TIMEOUT_OPT,
    trials: int = typer.Option(MD["trials"], "--trials", min=1, help="Search trials with --eval, --eval-py or "
                               "--lm-eval."),
    initial: int = INITIAL_OPT,
    trial_dir: Optional[Path] = TRIAL_DIR_OPT,
    relative_lam: bool = typer.Option(MD["relative_lam"], "--relative-lam", help="With --eval: search λ as a factor "
                                      "of the default's per-layer λ (as bmm search --relative-lam)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Run taskvec -> gram -> anchor -> solve in one go (finished stages are reused) and write the merged model;
    with --eval, --eval-py or --lm-eval, a search (as bmm search) replaces the single solve."""
    from .merge import merge as run

    options = MergeOptions.build(
        anchor=anchor.value, anchor_opts=anchor_opts, anchor_model=anchor_model, others=others.value,
        params_file=params_file, lam=lam, scale=scale, epsilon=epsilon, blocks=blocks,
        calib=calib, samples=samples, max_len=max_len,
        device=device, dtype=dtype, max_shard_size=max_shard_size, force=force,
        eval_cmd=eval_cmd, eval_py=eval_py, lm_eval=lm_eval, lm_eval_limit=lm_eval_limit,
        lm_eval_include=lm_eval_include, minimize=minimize, timeout=timeout,
        trials=trials, initial=initial, trial_dir=trial_dir, relative_lam=relative_lam,
        gram=gram.value if gram else None, work=work, allow_dtype_mismatch=allow_dtype_mismatch, exclude=exclude,
        tokenizer=tokenizer, chat_template=chat_template, out_format=out_format, rank=rank)
    # merge checks every input first and only then creates and locks the work directory
    res = run(base, experts, out, options=options)
    _emit(res, as_json, lambda r: r["model"])


@app.command()
def search(
    work: Path = WORK_OPT,
    eval_cmd: Optional[str] = typer.Option(SD["eval_cmd"], "--eval", help=EVAL_OPT_HELP),
    eval_py: Optional[str] = EVAL_PY_OPT,
    lm_eval: Optional[str] = LM_EVAL_OPT,
    lm_eval_limit: Optional[float] = LM_EVAL_LIMIT_OPT,
    lm_eval_include: Optional[Path] = LM_EVAL_INCLUDE_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Where the best model is kept (always complete)."),
    anchor: AnchorName = ANCHOR_STAGE_OPT,
    gram: SolveGram = SOLVE_GRAM_OPT,
    trials: int = typer.Option(SD["trials"], "--trials", min=1, help="Total trials (a resumed search counts earlier "
                               "ones)."),
    blocks: int = typer.Option(SD["blocks"], "--blocks", min=1, help="Block-groups, each with its own s and 4 λ's."),
    scale: str = typer.Option(SD["scale"], "--scale", help="Range of s (uniform), LOW:HIGH or one number (below 1 "
                              "shrinks the merged task vector: it helped on the decoder benchmark)."),
    lam: Optional[str] = typer.Option(SD["lam"], "--lam", help="Range of λ (log-uniform), LOW:HIGH or one number "
                                      "[default: 1e-4:1; with --relative-lam 0.1:10]."),
    epsilon: str = typer.Option(SD["epsilon"], "--epsilon", help="Range of ε for --gram hybrid."),
    relative_lam: bool = typer.Option(SD["relative_lam"], "--relative-lam", help="Search λ as a factor of the "
                                      "default's own per-layer λ (evidence): the first trial is exactly the default "
                                      "merge and every trial keeps its per-layer λ profile; best.json gets "
                                      "solve_params."),
    initial: int = INITIAL_OPT,
    seed: int = typer.Option(SD["seed"], "--seed", help="Optimizer seed."),
    timeout: float = TIMEOUT_OPT,
    parallel: int = typer.Option(SD["parallel"], "--parallel", min=1, help="Trials evaluated at once (with --ray on "
                                 "CPU nodes: actors)."),
    gpus: Optional[str] = typer.Option(SD["gpus"], "--gpus", help="CUDA_VISIBLE_DEVICES per worker: 0,1 or "
                                       "'0,1;2,3'."),
    ray: Optional[str] = typer.Option(SD["ray"], "--ray", help="Run trials on Ray actors, one per GPU (or per "
                                      "--parallel CPU slot): --ray alone starts Ray here; auto, HOST:PORT or "
                                      "ray://HOST:10001 join a cluster."),
    minimize: bool = MINIMIZE_OPT,
    trial_dir: Optional[Path] = TRIAL_DIR_OPT,
    device: str = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OUT_OPT,
    max_shard_size: str = SHARD_OPT,
    factor_dtype: str = typer.Option(SD["factor_dtype"], "--factor-dtype", help="Storage of the cached eigenbasis "
                                     "(bfloat16 halves memory; see bench/README.md for its error)."),
    memory_budget: Optional[str] = typer.Option(SD["memory_budget"], "--memory-budget", help="Host memory for the "
                                                "trial cache, e.g. 8GB (default: what is free)."),
    gpu_memory_budget: Optional[str] = typer.Option(SD["gpu_memory_budget"], "--gpu-memory-budget", help="GPU memory "
                                                    "for the trial cache, e.g. 20GB (default: what is free)."),
    spill_dir: Optional[Path] = typer.Option(SD["spill_dir"], "--spill-dir", help="Where the trial cache spills "
                                             "beyond the budgets (fast local disk; default: the work dir)."),
    force: bool = typer.Option(SD["force"], "--force", help="Archive an earlier search (another space or objective) "
                               "and start over."),
    as_json: bool = JSON_OPT,
) -> None:
    """Stage 5: Bayesian optimization (GP + expected improvement) of s and λ per block-group, scored by --eval,
    --eval-py or --lm-eval; locally or on a Ray cluster (--ray)."""
    from .search import search as run
    from .stage import work_lock

    options = SearchOptions.build(
        eval_cmd=eval_cmd, eval_py=eval_py, lm_eval=lm_eval, lm_eval_limit=lm_eval_limit,
        lm_eval_include=lm_eval_include, minimize=minimize, timeout=timeout,
        blocks=blocks, scale=scale, lam=lam, epsilon=epsilon, relative_lam=relative_lam,
        trials=trials, initial=initial, seed=seed,
        parallel=parallel, gpus=_gpu_sets(gpus), ray=ray, trial_dir=trial_dir,
        factor_dtype=factor_dtype, memory_budget=memory_budget, gpu_memory_budget=gpu_memory_budget,
        spill_dir=spill_dir, device=device, dtype=dtype, max_shard_size=max_shard_size, force=force)
    with work_lock(work, create=False):
        res = run(work, anchor.value, gram.value, out=out, options=options)
    _emit(res, as_json, _search_human)


def _out_lock(out: Optional[Path]):
    """The lock of an output path (a second run writing the same output stops with exit 3); none without one."""
    from contextlib import nullcontext

    from .out_lock import output_lock

    return output_lock(out) if out is not None else nullcontext()


def _gpu_sets(gpus: Optional[str]) -> Optional[list[str]]:
    if not gpus:
        return None
    return [g.strip() for g in gpus.split(";")] if ";" in gpus else [g.strip() for g in gpus.split(",")]


def _search_human(r: dict) -> str:
    """The summary on stderr; stdout holds only the best model's path (``model=$(bmm -q search ...)``)."""
    from .progress import info

    info(f"best trial {r['best_trial']}: score {r['best_score']:.6g} (first trial {r['first_score']}), "
         f"{r['trials_ok']} ok / {r['trials_failed']} failed; params: {r['best_json']}")
    return r["model"]


def _optional_values(argv: list[str]) -> list[str]:
    """``--ray`` may stand alone (start Ray here): give it the value ``local`` when no address follows."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("local")
    return out


@app.command()
def sample(
    work: Path = WORK_OPT,
    anchor: AnchorName = typer.Option(AnchorName(MD["anchor"]), "--anchor", "-a",
                                      help="Anchor stage to use (prior mean)."),
    gram: SolveGram = SOLVE_GRAM_OPT,
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: map/, sample-000/ ... and samples.json."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Posterior precision, dimensionless: row covariance "
                                         "r^2/β (G + λI)^-1 with r = RMS of the base weight (relative units; "
                                         "paper's β = β/(r^2 m), recorded per module). inf gives the MAP model."),
    iid: Optional[float] = typer.Option(None, "--iid", help="Baseline instead of the posterior: MAP + IID noise of "
                                        "RMS SIGMA·r (r = RMS of the module's base weight; = β 1/SIGMA^2 with "
                                        "G + λI replaced by I)."),
    samples: int = typer.Option(10, "--samples", "-n", min=1, help="Models to draw."),
    seed: int = typer.Option(0, "--seed", help="Noise seed; sample i's noise depends on (seed, i, module key) only."),
    modules: Optional[str] = typer.Option(None, "--modules", help="Regex (re.search) over checkpoint keys of the "
                                          "sampled modules (default: the last block's mlp_out, as in the paper)."),
    params_file: Optional[Path] = PARAMS_OPT,
    lam: Optional[float] = LAM_OPT,
    scale: Optional[float] = typer.Option(default(ParamsOptions, "scale"), "--scale", help="One scale s for every "
                                          f"module (default {DEFAULT_SCALE}); W = W_pre + s·U multiplies the "
                                          "sampled noise too."),
    epsilon: Optional[float] = EPS_OPT,
    blocks: int = BLOCKS_OPT,
    search_beta: Optional[str] = typer.Option(None, "--search-beta", help="LOW:HIGH: score one ensemble per β of a "
                                              "log grid with --eval, keep the best."),
    grid: int = typer.Option(7, "--grid", min=1, help="Points of the --search-beta grid."),
    eval_cmd: Optional[str] = typer.Option(None, "--eval", help="Scores an ensemble directory for --search-beta: "
                                           "{model} {beta} {workdir} substituted shell-quoted; a number or JSON "
                                           "with score last. Higher is better unless --minimize."),
    minimize: bool = typer.Option(default(ScorerOptions, "minimize"), "--minimize",
                                  help="Lower --eval scores are better (NLL, ECE)."),
    timeout: float = typer.Option(default(ScorerOptions, "timeout"), "--timeout",
                                  help="Seconds per --eval run before it is killed."),
    device: str = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OUT_OPT,
    max_shard_size: str = SHARD_OPT,
    force: bool = typer.Option(False, "--force", help="Replace --out even if it is not a bmm sample output."),
    as_json: bool = JSON_OPT,
) -> None:
    """Posterior sampling (paper Appendix B): S merged models with U ~ N(U_MAP, r^2/β (G + λI)^-1) on chosen modules."""
    from .out_lock import output_lock
    from .sample import sample as run
    from .stage import work_lock

    with output_lock(out), work_lock(work):
        res = run(work, anchor.value, gram.value, out=out, beta=beta, iid=iid, samples=samples, seed=seed,
                  modules=modules, params_file=params_file, lam=lam, scale=scale, epsilon=epsilon, blocks=blocks,
                  search_beta=search_beta, grid=grid, eval_cmd=eval_cmd, minimize=minimize, timeout=timeout,
                  device=device, dtype=dtype, max_shard_size=max_shard_size, force=force)
    _emit(res, as_json, lambda r: "\n".join([r["map"]] + [str(Path(r["dir"]) / n) for n in r["samples"]]))


def _expand_lists(argv: list[str]) -> list[str]:
    """Let ``--experts A B C`` work like ``--experts A --experts B --experts C`` (as users of mergekit expect)."""
    multi = {"--experts", "-e", "--calib", "--opt"}
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in multi:
            current = arg
            out.append(arg)
            continue
        if arg.startswith("-"):
            current = None
            out.append(arg)
            continue
        if current is not None and out and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


GLOBAL_FLAGS = ("--quiet", "-q", "--debug")  # options of the root command that users also type after the subcommand


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """``bmm merge ... --quiet`` == ``bmm --quiet merge ...``: move the root's flags in front of the subcommand
    (no subcommand takes an option of these names or a value equal to one of them)."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return [*flags, *(a for a in argv if a not in GLOBAL_FLAGS)]


def _interrupted() -> None:
    print("bmm: interrupted; finished work is kept, rerun the same command to continue", file=sys.stderr)
    sys.exit(130)


def main(argv: Optional[list[str]] = None) -> None:
    args = _optional_values(_hoist_global_flags(_expand_lists(list(sys.argv[1:] if argv is None else argv))))
    debug = "--debug" in args or os.environ.get("BMM_DEBUG", "") not in ("", "0")
    try:
        # with standalone_mode=False click/typer *return* the exit code of a typer.Exit, and typer turns a Ctrl-C
        # inside a command into a returned 130 (no exception reaches us)
        rc = app(args=args, prog_name="bmm", standalone_mode=False)
    except BmmError as exc:
        if debug:
            raise
        print(f"bmm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _interrupted()
    except Exception as exc:  # usage errors and the unexpected
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):  # usage errors
            exc.show()
            sys.exit(exc.exit_code)
        if debug:
            raise
        print(f"bmm: internal error: {exc.__class__.__name__}: {' '.join(str(exc).split())} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    if rc == 130:
        _interrupted()
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()

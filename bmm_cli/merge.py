"""``bmm merge``: taskvec -> gram (data, with --calib) -> anchor -> solve in one command, reusing every finished stage.

All inputs are checked before any heavy work, and before anything is created (the work directory and its lock come
after): checkpoints (configs, keys, shapes, dtypes), the anchor and its options, the calibration files and the base
tokenizer, the params (file or --lam/--scale/--epsilon/--blocks), --dtype, --device, --max-shard-size and the output
directory. ``merge`` takes the output's lock (:mod:`.out_lock`: a second run writing the same ``--out`` stops with
exit code 3) and then the work directory's lock itself, once the checks passed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import budget
from .activations import check_calibration
from .anchor import anchor as run_anchor
from .anchor import vocab_cut
from .arch import key_preview
from .errors import InputError
from .gram import gram as run_gram
from .gram import parse_calib
from .options import AnchorOptions, CalibOptions, Options, OutputOptions, ParamsOptions, VocabOptions
from .out_lock import output_lock
from .progress import info
from .search import search as run_search
from .search.options import RunnerOptions, ScorerOptions, SearchOptions, SpaceOptions, TrialOptions
from .solve import check_adapter_experts, solve_adapter, vocab_output
from .solve import solve as run_solve
from .stage import work_lock
from .store import Checkpoint
from .taskvec import check_data_experts, open_inputs
from .taskvec import taskvec as run_taskvec
from .workdir import GRAM_KINDS
from .writer import check_output_dir


@dataclass
class MergeOptions(Options):
    """``bmm merge``: every stage's options; with a scorer (``--eval``...) a search picks s and λ."""

    anchor: AnchorOptions = field(default_factory=AnchorOptions)
    params: ParamsOptions = field(default_factory=ParamsOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    vocab: VocabOptions = field(default_factory=VocabOptions)
    scorer: ScorerOptions = field(default_factory=ScorerOptions)
    optimizer: TrialOptions = field(default_factory=lambda: TrialOptions(trials=30))
    runner: RunnerOptions = field(default_factory=RunnerOptions)
    gram: str | None = None  # None: hybrid with calibration texts, free without
    work: str | Path | None = None
    allow_dtype_mismatch: bool = False
    exclude: list[str] = field(default_factory=list)  # --exclude REGEX: tensors that keep the base's value
    relative_lam: bool = False
    out_format: str = "model"  # model | peft (every expert a LoRA adapter: the merge as one adapter)
    rank: int | None = None  # --out-format peft: the adapter's rank (None: exact, Σ r_t at most)

    def gram_kind(self) -> str:
        return self.gram or ("hybrid" if self.calib.calib else "free")

    def check(self):
        """Every option that needs no input file; returns ``(anchor method, gram kind, params)``."""
        method = self.anchor.check()
        self.output.check()
        self.vocab.check()
        self.calib.check()
        gram = self.gram_kind()
        if gram not in GRAM_KINDS:
            raise InputError(f"--gram {gram!r}: choose {', '.join(GRAM_KINDS[:-1])} or {GRAM_KINDS[-1]}")
        if not self.calib.calib and gram in ("data", "hybrid"):
            raise InputError(f"--gram {gram} needs calibration texts: --calib 1=a.jsonl --calib 2=b.jsonl ...")
        if not self.calib.calib and method.needs_data_grams:
            raise InputError(f"--anchor {method.name} needs calibration texts (its merge uses the data Grams): "
                             "--calib 1=a.jsonl --calib 2=b.jsonl ...")
        params = self.params.check(gram)
        self._check_format(gram)
        if not self.scorer.given:
            if self.relative_lam:
                raise InputError("--relative-lam shapes the search of --eval; without --eval there is no search: "
                                 "drop it")
            return method, gram, params
        if self.params.given:
            raise InputError("bmm merge --eval searches s and λ itself: drop --params/--lam/--scale/--epsilon "
                             "(or drop --eval to merge with them)")
        if self.vocab.given:
            raise InputError("bmm merge --eval writes the base's tokenizer and chat template: drop --tokenizer / "
                             "--chat-template, or run bmm solve --params best.json --tokenizer ... after the search")
        self.optimizer.check()
        self.scorer.check()
        self.runner.check(in_memory=self.scorer.in_memory)
        return method, gram, params

    def _check_format(self, gram: str) -> None:
        if self.out_format not in ("model", "peft"):
            raise InputError(f"--out-format {self.out_format!r}: choose model or peft")
        if self.rank is not None and (self.out_format != "peft" or isinstance(self.rank, bool) or self.rank < 1):
            raise InputError(f"--rank {self.rank}: an integer >= 1, with --out-format peft")
        if self.out_format == "peft" and (gram != "free" or self.scorer.given or self.vocab.given):
            raise InputError("--out-format peft writes the data-free solve as an adapter: drop --calib/--gram, "
                             "--eval and --tokenizer/--chat-template")

    def search_options(self) -> SearchOptions:
        """The search ``merge`` runs: its scorer, trials and runner, over the block-groups of ``--blocks``."""
        return SearchOptions(scorer=self.scorer, space=SpaceOptions(blocks=self.params.blocks,
                                                                    relative_lam=self.relative_lam),
                             optimizer=self.optimizer, runner=self.runner, output=self.output)


def default_work(out: Path) -> Path:
    return Path(f"{Path(out)}.bmm-work")


def merge(base: str, experts: list[str], out: Path, *, options: MergeOptions | None = None, **flat: Any) -> dict:
    """Merge ``experts`` of ``base`` into ``out``. ``options`` (a :class:`MergeOptions`), or its
    fields as flat keywords: ``merge(base, experts, out, anchor="ta", lam=0.2, calib=[...], device="cpu")``."""
    t0 = time.perf_counter()
    if options is None:
        options = MergeOptions.build(**flat)
    elif flat:
        raise TypeError(f"merge: give options or flat keywords, not both ({', '.join(flat)})")
    out = Path(out).absolute()  # printed and recorded absolute, as `bmm search` does
    work = Path(options.work) if options.work is not None else default_work(out)
    # ---- preflight: every option and input that can be checked without heavy work; nothing is created ----------
    method, gram, params = options.check()
    o, cal = options.output, options.calib
    b, es, plan = open_inputs(base, experts, allow_dtype_mismatch=options.allow_dtype_mismatch,
                              tokenizer=options.vocab.tokenizer, exclude=options.exclude)
    if options.out_format == "peft":
        check_adapter_experts(es)
    elif not options.scorer.given:
        vocab_output(b, es, plan, options.vocab.tokenizer, options.vocab.chat_template, say=False)
    elif (cut := vocab_cut(b, es, plan)) is not None and any(
            cut[1] != b.meta[k].shape[a] for k, a in cut[0].items()):
        raise InputError(f"{b.root}: the base has padding rows past its tokenizer and experts added tokens; "
                         "bmm merge --eval cannot write that vocabulary: search with bmm search, then bmm solve")
    pf = options.params.params_file
    plan.check_block_groups(params.num_groups, f"--blocks {options.params.blocks}" if pf is None else str(pf))
    if method.needs_external:
        Checkpoint.open(options.anchor.anchor_model, role="anchor model")
    if gram in ("data", "hybrid") or method.needs_data_grams:
        check_data_experts(es, plan)
        files = parse_calib(cal.calib, experts)
        check_calibration(b.root, files, experts, samples=cal.samples, max_len=cal.max_len)
        # matched once, here, against the experts as given: the gram stage gets them by index
        cal = dataclasses.replace(cal, calib=[f"{t + 1}={path}" for t, path in files.items()])
        options = dataclasses.replace(options, calib=cal)
    unsolved = unsolved_note(b, plan, options.anchor.others)
    if plan.excluded:
        info(f"bmm: note: --exclude leaves {len(plan.excluded)} tensor(s) at the base's value: "
             + key_preview(plan.excluded))
    adapter = (budget.adapter_bytes(plan, b.meta, es, anchor=method.name, rank=options.rank, dtype=o.dtype)
               if options.out_format == "peft" else None)
    budget.check_disk(budget.for_merge(plan, b.meta, len(es), anchor=method.name, gram=gram,
                                       search=options.scorer.given, out_dtype=o.dtype, out_bytes=adapter), work, out)
    with output_lock(out):  # a second run writing the same --out stops here (exit 3)
        check_output_dir(out, force=o.force, inputs={"base model": b.root, "work directory": work,
                                                     **{f"expert {i + 1}": e.root for i, e in enumerate(es)}})
        with work_lock(work):
            res = _run_stages(base, experts, out, work, options, method=method, gram=gram)
    res["unsolved"] = unsolved
    res["excluded"] = plan.excluded
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def unsolved_note(base: Checkpoint, plan, others: str, shown: int = 8) -> list[str]:
    """The tensors inside the blocks that bmm cannot solve (no solvable module matches them: MoE experts, OPT's
    fc1/fc2...), said once on stderr: they get the anchor's "other" rule instead of the BMM solve."""
    keys = list(plan.unknown)
    if keys:
        inside = sum(base.meta[m.key].numel for m in plan.modules) + sum(base.meta[k].numel for k in keys)
        share = sum(base.meta[k].numel for k in keys) / max(inside, 1)
        more = f" ... and {len(keys) - shown} more (all in --json)" if len(keys) > shown else ""
        info(f"bmm: note: {len(keys)} tensor(s) inside the blocks ({share:.0%} of their parameters) match no module "
             f"bmm can solve and fall to the anchor's rule for other tensors (--others {others}): "
             + ", ".join(keys[:shown]) + more)
    return keys


def _run_stages(base, experts, out, work, options: MergeOptions, *, method, gram) -> dict:
    info(f"bmm: work directory {work}")
    o, cal, a, p = options.output, options.calib, options.anchor, options.params
    # ---- stages ----------------------------------------------------------------------------------------------
    stages = {}
    stages["taskvec"] = run_taskvec(base, experts, work, store=None, force=o.force,  # a kept copy stays kept
                                    allow_dtype_mismatch=options.allow_dtype_mismatch, exclude=options.exclude)
    if gram in ("data", "hybrid") or method.needs_data_grams:  # the data-free statistics need no stage
        stages["gram-data"] = run_gram(work, "data", calib=cal.calib, samples=cal.samples, max_len=cal.max_len,
                                       batch_size=cal.batch_size, device=o.device, force=o.force)
    stages["anchor"] = run_anchor(work, method.name, a.anchor_opts, others=a.others, external=a.anchor_model,
                                  device=o.device, force=o.force)
    if options.out_format == "peft":
        res = solve_adapter(work, method.name, out=out, rank=options.rank, params_file=p.params_file, lam=p.lam,
                            scale=p.scale, epsilon=p.epsilon, blocks=p.blocks, device=o.device, dtype=o.dtype,
                            force=True)  # check_output_dir above decided whether out may be replaced
        res["model"] = res["adapter"]
    elif not options.scorer.given:
        res = run_solve(work, method.name, gram, out=out, params_file=p.params_file, lam=p.lam, scale=p.scale,
                        epsilon=p.epsilon, blocks=p.blocks, device=o.device, dtype=o.dtype,
                        max_shard_size=o.max_shard_size, force=o.force, tokenizer=options.vocab.tokenizer,
                        chat_template=options.vocab.chat_template)
    else:  # `bmm merge --eval CMD [--trials K]`: the search picks (s, λ) and writes its best trial to `out`
        res = run_search(work, method.name, gram, out=out, options=options.search_options())
    res["work"] = str(work)
    res["stages"] = {k: {"written": v.get("blocks_written"), "seconds": v.get("seconds")} for k, v in stages.items()}
    return res

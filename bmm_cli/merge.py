"""``bmm merge``: taskvec -> anchor -> gram -> solve in one command, reusing every finished stage.

All inputs are checked before any heavy work, and before anything is created (the work directory and its lock come
after): checkpoints (configs, keys, shapes, dtypes), the anchor and its options, the calibration files and the base
tokenizer, the params (file or --lam/--scale/--epsilon/--blocks), --dtype, --device, --max-shard-size and the output
directory. ``merge`` takes the work directory's lock itself, once the checks passed.
"""

from __future__ import annotations

import time
from pathlib import Path

from .activations import check_calibration
from .anchor import OTHER_RULES, check_output_options
from .anchor import anchor as run_anchor
from .anchors import get_method, parse_options
from .device import resolve_device
from .errors import InputError
from .gram import gram as run_gram
from .gram import parse_calib
from .params import resolve_params
from .progress import info
from .search import search as run_search
from .search.command import check_merge_eval
from .solve import solve as run_solve
from .stage import work_lock
from .store import Checkpoint
from .taskvec import open_inputs
from .taskvec import taskvec as run_taskvec
from .workdir import GRAM_KINDS
from .writer import check_output_dir


def default_work(out: Path) -> Path:
    return Path(f"{Path(out)}.bmm-work")


def merge(
    base: str,
    experts: list[str],
    out: Path,
    *,
    anchor: str = "tsv",
    anchor_opts: list[str] | None = None,
    anchor_model: str | None = None,
    others: str = "anchor",
    calib: list[str] | None = None,
    gram: str | None = None,
    params_file: str | None = None,
    lam: float | None = None,
    scale: float | None = None,
    epsilon: float | None = None,
    blocks: int = 1,
    work: Path | None = None,
    samples: int = 128,
    max_len: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    allow_dtype_mismatch: bool = False,
    force: bool = False,
    eval_cmd: str | None = None,
    trials: int = 30,
    relative_lam: bool = False,
) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    work = Path(work) if work is not None else default_work(out)
    # ---- preflight: every option and input that can be checked without heavy work; nothing is created ----------
    method = get_method(anchor)
    parse_options(method, anchor_opts or [])
    if method.needs_external and not anchor_model:
        raise InputError(f"--anchor {method.name} needs --anchor-model DIR_OR_HUB_ID")
    if others not in OTHER_RULES:
        raise InputError(f"--others {others!r}: choose one of {', '.join(OTHER_RULES)}")
    check_output_options(dtype, max_shard_size)
    resolve_device(device)
    if gram is None:
        gram = "hybrid" if calib else "free"  # with data: both Grams mixed (best or tied on both benchmarks)
    if gram not in GRAM_KINDS:
        raise InputError(f"--gram {gram!r}: choose free, data or hybrid")
    data_grams = gram in ("data", "hybrid") or method.needs_data_grams
    if data_grams and not calib:
        raise InputError(f"--gram {gram} / --anchor {method.name} need calibration texts: --calib 1=a.jsonl ...")
    params = resolve_params(params_file, lam=lam, scale=scale, eps=epsilon, blocks=blocks, gram=gram, warn=False)
    if relative_lam and eval_cmd is None:
        raise InputError("--relative-lam shapes the search of --eval; without --eval there is no search: drop it")
    if eval_cmd is not None:
        check_merge_eval(eval_cmd, trials, params_file=params_file, lam=lam, scale=scale, epsilon=epsilon)
    b, es, plan = open_inputs(base, experts, allow_dtype_mismatch=allow_dtype_mismatch)
    plan.check_block_groups(params.num_groups, f"--blocks {blocks}" if params_file is None else str(params_file))
    if method.needs_external:
        Checkpoint.open(anchor_model, role="anchor model")
    if data_grams:
        check_calibration(b.root, parse_calib(calib, experts), experts, samples=samples, max_len=max_len)
    check_output_dir(out, force=force, inputs={"base model": b.root, "work directory": work,
                                               **{f"expert {i + 1}": e.root for i, e in enumerate(es)}})
    with work_lock(work):
        res = _run_stages(base, experts, out, work, method=method, gram=gram, anchor_opts=anchor_opts,
                          anchor_model=anchor_model, others=others, calib=calib, params_file=params_file, lam=lam,
                          scale=scale, epsilon=epsilon, blocks=blocks, samples=samples, max_len=max_len,
                          batch_size=batch_size, device=device, dtype=dtype, max_shard_size=max_shard_size,
                          allow_dtype_mismatch=allow_dtype_mismatch, force=force, eval_cmd=eval_cmd, trials=trials,
                          relative_lam=relative_lam)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def _run_stages(base, experts, out, work, *, method, gram, anchor_opts, anchor_model, others, calib, params_file,
                lam, scale, epsilon, blocks, samples, max_len, batch_size, device, dtype, max_shard_size,
                allow_dtype_mismatch, force, eval_cmd=None, trials=30, relative_lam=False) -> dict:
    info(f"bmm: work directory {work}")
    # ---- stages ----------------------------------------------------------------------------------------------
    stages = {}
    stages["taskvec"] = run_taskvec(base, experts, work, force=force, allow_dtype_mismatch=allow_dtype_mismatch)
    needs = {"free"} if gram in ("free", "hybrid") else set()
    if gram in ("data", "hybrid") or method.needs_data_grams:
        needs.add("data")
    for kind in sorted(needs, key=lambda k: k != "data"):  # data first: RegMean reads it
        stages[f"gram-{kind}"] = run_gram(work, kind, calib=calib, samples=samples, max_len=max_len,
                                          batch_size=batch_size, device=device, force=force)
    stages["anchor"] = run_anchor(work, method.name, anchor_opts, others=others, external=anchor_model,
                                  device=device, force=force)
    if eval_cmd is None:
        res = run_solve(work, method.name, gram, out=out, params_file=params_file, lam=lam, scale=scale,
                        epsilon=epsilon, blocks=blocks, device=device, dtype=dtype, max_shard_size=max_shard_size,
                        force=force)
    else:  # `bmm merge --eval CMD [--trials K]`: the search picks (s, λ) and writes its best trial to `out`
        res = run_search(work, method.name, gram, eval_cmd, out=out, trials=trials, blocks=blocks, device=device,
                         dtype=dtype, max_shard_size=max_shard_size, force=force, relative_lam=relative_lam)
    res["work"] = str(work)
    res["stages"] = {k: {"written": v.get("blocks_written"), "seconds": v.get("seconds")} for k, v in stages.items()}
    return res

"""The option groups: one default per option (the CLI's equal the library's), routing of flat keywords, checks."""

import dataclasses
import inspect
from enum import Enum

import pytest

from bmm_cli import cli, options
from bmm_cli.anchor import anchor as anchor_fn
from bmm_cli.errors import InputError
from bmm_cli.gram import gram as gram_fn
from bmm_cli.merge import MergeOptions
from bmm_cli.options import OutputOptions, ParamsOptions
from bmm_cli.sample import sample as sample_fn
from bmm_cli.search import scorers
from bmm_cli.search.local import LocalRunner
from bmm_cli.search.options import RunnerOptions, ScorerOptions, SearchOptions
from bmm_cli.search.runners import RUNNERS, runner_class
from bmm_cli.solve import solve as solve_fn
from bmm_cli.taskvec import taskvec as taskvec_fn

NOT_OPTIONS = {"as_json", "base", "experts", "out", "work"}  # inputs and outputs without a library default


def _cli_defaults(fn) -> dict:
    """``{parameter: default}`` of a typer command, read from its ``typer.Option(...)`` defaults."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        value = getattr(p.default, "default", p.default)
        if value is ... or name in NOT_OPTIONS:
            continue
        out[name] = value.value if isinstance(value, Enum) else value
    return out


def _signature_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _same(a, b) -> bool:
    return a == b or (a in ([], None) and b in ([], None))  # a repeatable option: empty either way


def _stage(defaults: dict) -> dict:
    """A stage's library defaults; its positional anchor defaults to merge's."""
    return {"anchor": MergeOptions().anchor.anchor, **defaults}


@pytest.mark.parametrize("command, library", [
    ("merge", MergeOptions.flat_defaults),
    ("search", lambda: _stage({**SearchOptions.flat_defaults(), "gram": "free"})),
    ("solve", lambda: _stage(_signature_defaults(solve_fn))),
    ("sample", lambda: _stage(_signature_defaults(sample_fn))),
    ("gram", lambda: _signature_defaults(gram_fn)),
    ("anchor", lambda: _signature_defaults(anchor_fn)),
    ("taskvec", lambda: _signature_defaults(taskvec_fn)),
])
def test_every_cli_default_is_the_library_default(command, library):
    ours, theirs = _cli_defaults(getattr(cli, command)), library()
    missing = sorted(set(ours) - set(theirs) - {"materialize", "base", "experts", "exclude", "external", "method"})
    assert not missing, f"bmm {command}: options the library does not take: {missing}"
    differ = {n: (v, theirs[n]) for n, v in ours.items() if n in theirs and not _same(v, theirs[n])}
    assert not differ, f"bmm {command}: CLI default != library default: {differ}"
    assert len(set(ours) & set(theirs)) >= 3


def test_search_blocks_default_is_one_block_group():
    assert SearchOptions().space.blocks == 1 == _cli_defaults(cli.search)["blocks"]


def test_cli_choices_come_from_the_registries():
    from bmm_cli.anchor import OTHER_RULES
    from bmm_cli.anchors import METHODS
    from bmm_cli.workdir import GRAM_KINDS
    from bmm_cli.workdir import GRAM_STATS as KINDS

    assert [m.value for m in cli.AnchorName] == list(METHODS)
    assert [m.value for m in cli.OthersRule] == list(OTHER_RULES)
    assert [m.value for m in cli.GramKind] == list(KINDS)
    assert [m.value for m in cli.SolveGram] == list(GRAM_KINDS)


def test_flat_keywords_go_to_their_group():
    o = MergeOptions.build(lam=0.2, device="cpu", calib=["1=a"], anchor="ta", trials=5, work="w")
    assert (o.params.lam, o.output.device, o.calib.calib, o.anchor.anchor, o.optimizer.trials, o.work) == (
        0.2, "cpu", ["1=a"], "ta", 5, "w")
    assert MergeOptions().optimizer.trials == 30 and SearchOptions().optimizer.trials == 100
    with pytest.raises(TypeError, match="unknown option 'lamda'"):
        MergeOptions.build(lamda=0.2)
    flat = MergeOptions.flat_defaults()
    names = [f.name for g in MergeOptions().groups() for f in dataclasses.fields(g[1])]
    assert len(names) == len(set(names)), "a flat name must belong to one group of a command"
    assert set(names) <= set(flat)


def test_option_groups_check_once_with_the_flag_named():
    with pytest.raises(InputError, match="--max-shard-size|size"):
        OutputOptions(max_shard_size="lots").check()
    with pytest.raises(InputError, match="--dtype 'int8'"):
        OutputOptions(dtype="int8").check()
    with pytest.raises(InputError, match="--blocks must be an integer >= 1"):
        ParamsOptions(blocks=0).check("free")
    with pytest.raises(InputError, match="either --params FILE or --lam"):
        ParamsOptions(params_file="p.json", lam=0.1).check("free")
    with pytest.raises(InputError, match="--memory-budget .-1GB."):
        options.MemoryOptions(memory_budget="-1GB").check()
    with pytest.raises(InputError, match="--relative-lam shapes the search"):
        MergeOptions.build(relative_lam=True).check()
    with pytest.raises(InputError, match="drop --params/--lam/--scale/--epsilon"):
        MergeOptions.build(eval_cmd="echo 1", lam=0.1).check()
    with pytest.raises(InputError, match="--anchor external needs --anchor-model"):
        MergeOptions.build(anchor="external").check()


def test_scorers_come_from_one_table():
    assert list(scorers.SCORERS) == ["eval", "eval-py", "lm-eval"]
    with pytest.raises(InputError, match="give one way to score trials: --eval CMD, --eval-py MODULE:FUNCTION or "
                                         "--lm-eval TASKS$"):
        ScorerOptions().check()
    with pytest.raises(InputError, match=r"\(got --eval, --eval-py\)"):
        ScorerOptions(eval_cmd="echo 1", eval_py="json:dumps").check()
    with pytest.raises(InputError, match="--lm-eval-limit / --lm-eval-include go with --lm-eval"):
        ScorerOptions(eval_cmd="echo 1", lm_eval_limit=3).check()
    with pytest.raises(InputError, match="--eval: the evaluation command is empty"):
        ScorerOptions(eval_cmd=" ").check()
    objective, fields = ScorerOptions(eval_cmd="score {model}").check()
    assert objective == {"eval": "score {model}"} and fields == {"scorer": "eval",
                                                                "scorer_config": {"hook": "score {model}"}}
    assert scorers.SCORERS["eval"].worker_kwargs(fields["scorer_config"]) == {"hook": "score {model}"}
    objective, fields = ScorerOptions(eval_py="json:dumps").check()
    assert objective == {"eval-py": "json:dumps"} and ScorerOptions(eval_py="json:dumps").in_memory
    import json

    assert scorers.SCORERS["eval-py"].worker_kwargs(fields["scorer_config"]) == {"scorer": json.dumps}


def test_runners_come_from_one_table():
    assert list(RUNNERS) == ["local", "ray"] and runner_class("local") is LocalRunner
    with pytest.raises(InputError, match="unknown trial runner 'slurm'"):
        runner_class("slurm")
    with pytest.raises(InputError, match="hold one resident model per worker"):
        RunnerOptions(parallel=2).check(in_memory=True)
    RunnerOptions(parallel=2).check(in_memory=False)
    with pytest.raises(InputError, match="drop --gpus"):
        RunnerOptions(ray="auto", gpus=["0"]).check(in_memory=False)


def test_missing_calibration_names_what_needs_it():
    with pytest.raises(InputError, match="--gram data needs calibration texts") as exc:
        MergeOptions.build(anchor="tsv", gram="data").check()
    assert "tsv" not in str(exc.value)
    with pytest.raises(InputError, match="--anchor regmean needs calibration texts"):
        MergeOptions.build(anchor="regmean").check()

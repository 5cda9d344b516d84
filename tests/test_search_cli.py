"""`bmm search` end to end on a tiny model: the hook scores merged weights against a hidden target merge."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bmm_cli.anchor import anchor
from bmm_cli.gram import gram
from bmm_cli.solve import solve
from bmm_cli.store import Checkpoint
from bmm_cli.taskvec import taskvec

HOOK = textwrap.dedent("""
    import json, sys, torch
    from bmm_cli.store import Checkpoint
    target = Checkpoint.open(sys.argv[2])
    model = Checkpoint.open(sys.argv[1])
    keys = [k for k in target.keys() if k.endswith("dense.weight") or ".self." in k]
    err = sum(float((model.get(k) - target.get(k)).pow(2).sum()) for k in keys)
    print("some log line")
    print(json.dumps({"score": -err ** 0.5, "keys": len(keys)}))
""")


@pytest.fixture(scope="module")
def setup(family, tmp_path_factory):
    base, experts = family("bert")
    root = tmp_path_factory.mktemp("search")
    work = root / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "ta")
    gram(work, "free")
    target = root / "target"
    solve(work, "ta", "free", out=target, lam=0.02, scale=1.25)  # the hidden optimum
    hook = root / "hook.py"
    hook.write_text(HOOK)
    return work, target, hook, root


def test_search_finds_the_hidden_merge(setup):
    work, target, hook, root = setup
    out = root / "best model"  # a space in the path
    cmd = [sys.executable, "-m", "bmm_cli.cli", "search", "--work", str(work), "--anchor", "ta", "--gram", "free",
           "--eval", f"{sys.executable} {hook} {{model}} {target}", "--trials", "10", "--initial", "4",
           "--blocks", "1", "--lam", "0.02", "--scale", "1.0:1.5", "--out", str(out), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["trials"] == 10 and res["trials_failed"] == 0
    assert res["best_score"] > res["first_score"]
    # λ is held at the target (a constant range), so the 1-D search over s must find the hidden s
    assert abs(res["best_params"]["s_0"] - 1.25) < 0.05, res["best_params"]
    best = Checkpoint.open(out)
    recs = [json.loads(x) for x in (work / "search-ta-free" / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["trial"] for r in recs) == list(range(10))
    assert all(set(r["seconds"]) >= {"solve", "write", "eval"} for r in recs)
    # the model at --out is the best trial's merge
    solve(work, "ta", "free", out=root / "check", params_file=work / "search-ta-free" / "best.json")
    chk = Checkpoint.open(root / "check")
    for k in chk.keys():
        assert torch.allclose(best.get(k).float(), chk.get(k).float(), atol=1e-5), k
    assert (work / "search-ta-free" / "convergence.png").exists()
    # rerunning the finished search does no new trial
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["trials"] == 10


def _bmm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bmm_cli.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_no_successful_trial_exits_nonzero_with_nothing_on_stdout(setup, tmp_path):
    """Even with fewer trials than the fail-fast count, a search without a successful trial
    fails: no "None" on stdout, no pointer to a best.json that does not exist."""
    work, _, _, _ = setup
    w = tmp_path / "w"
    import shutil

    shutil.copytree(work, w, ignore=shutil.ignore_patterns("search-*"))
    for quiet in ([], ["-q"]):
        p = _bmm(*quiet, "search", "-w", w, "--anchor", "ta", "--eval", "nonexistent_cmd {model}", "--trials", 2,
                 "--out", tmp_path / "s", "--force")
        assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("bmm: error: search: none of the 2 trial(s) succeeded") and "exit code 127" in last
        assert not (w / "search-ta-free" / "best.json").exists() and not (tmp_path / "s").exists()


def test_rerun_notes_say_what_changed(setup, tmp_path):
    """--initial and --out changes are named as such (no "interrupted", no "diverged"), a changed
    --eval is refused in one line."""
    work, target, hook, root = setup
    import shutil

    w = tmp_path / "w"
    shutil.copytree(work, w, ignore=shutil.ignore_patterns("search-*"))
    ev = f"{sys.executable} {hook} {{model}} {target}"
    base = ["search", "-w", w, "--anchor", "ta", "--eval", ev, "--lam", "0.02", "--scale", "1.0:1.5"]
    p = _bmm(*base, "--trials", 4, "--initial", 2, "--out", tmp_path / "a")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "a")  # stdout: the best model's path only
    p = _bmm(*base, "--trials", 5, "--initial", 3, "--out", tmp_path / "b")
    assert p.returncode == 0, p.stderr
    assert "--initial 2 -> 3" in p.stderr and "diverged" not in p.stderr and "interrupted before" not in p.stderr
    assert f"--out changed from {tmp_path / 'a'}" in p.stderr
    p = _bmm("search", "-w", w, "--anchor", "ta", "--eval", ev + " --other", "--lam", "0.02", "--scale", "1.0:1.5",
             "--trials", 6, "--out", tmp_path / "b")
    assert p.returncode == 3 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1].startswith("bmm: error: the 5 trial(s) in ")
    assert "scored by another objective" in p.stderr and "--force" in p.stderr


def test_merge_with_eval_runs_the_search(family, tmp_path):
    """`bmm merge --eval CMD --trials K` merges and searches in one command; --out holds the best
    trial's model; conflicting options are refused before any stage runs."""
    base, experts = family("bert")
    hook = tmp_path / "score.py"
    hook.write_text("import json, sys\nr = json.load(open(sys.argv[1] + '/bmm_merge.json'))\n"
                    "print(-(r['params']['s_0'] - 1.2) ** 2)\n")
    out = tmp_path / "merged"
    common = ["merge", "-b", base, "-e", *experts, "--anchor", "ta", "--out", out]
    p = _bmm(*common, "--eval", f"{sys.executable} {hook} {{model}}", "--lam", "0.1")
    assert p.returncode == 2 and "drop --params/--lam" in p.stderr
    assert not (tmp_path / "merged.bmm-work" / "taskvec").exists()
    p = _bmm(*common, "--eval", f"{sys.executable} {hook} {{modle}}")
    assert p.returncode == 2 and "unknown placeholder" in p.stderr
    p = _bmm(*common, "--eval", f"{sys.executable} {hook} {{model}}", "--trials", 4, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["trials"] == 4 and res["model"] == str(out) and res["work"] == str(tmp_path / "merged.bmm-work")
    best = json.loads((tmp_path / "merged.bmm-work" / "search-ta-free" / "best.json").read_text())
    assert json.loads((out / "bmm_merge.json").read_text())["params"] == best["params"] == res["best_params"]
    p = _bmm(*common, "--relative-lam")  # no search to shape: refused before anything is made
    assert p.returncode == 2 and "--relative-lam" in p.stderr
    p = _bmm(*common, "--eval", f"{sys.executable} {hook} {{model}}", "--trials", 2, "--relative-lam", "--force",
             "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    best = json.loads((tmp_path / "merged.bmm-work" / "search-ta-free" / "best.json").read_text())
    assert best["solve_params"] == res["best_solve_params"]
    assert json.loads((out / "bmm_merge.json").read_text())["params"] == best["solve_params"]


def test_first_trial_is_the_default_merge_evidence_lambda(family, tmp_path):
    """The search starts from bmm's default merge: its first trial's λ per (block-group, group) is the
    geometric mean of the evidence λ of the layers in that group (clipped to the range), s = 1, so a search never
    keeps a model worse on its objective than `bmm merge` without a search."""
    import math

    from conftest import ready_work

    from bmm_cli.default_params import evidence_params
    from bmm_cli.search import search
    from bmm_cli.workdir import Sources

    work = ready_work(family, "llama", tmp_path / "w")
    res = search(work, "ta", "free", "echo 1", out=tmp_path / "best", blocks=2, trials=1, device="cpu",
                 lam="1e-6:10")
    recs = [json.loads(line) for line in (work / "search-ta-free" / "trials.jsonl").read_text().splitlines()]
    per_layer = evidence_params(Sources(work, "ta", "free"), scale=1.0, eps=None)
    n = per_layer.num_groups
    assert n == 3 and res["trials_ok"] == 1
    for b, layers in enumerate([[0, 1], [2]]):  # 3 layers in 2 block-groups: layer * 2 // 3, as arch.block_group
        for g in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            want = math.exp(sum(math.log(per_layer.lams[i][g]) for i in layers) / len(layers))
            assert recs[0]["params"][f"lam_{b}_{g}"] == pytest.approx(want, rel=1e-9)
        assert recs[0]["params"][f"s_{b}"] == 1.0


def _weights(d):
    c = Checkpoint.open(d)
    return {k: c.get(k) for k in c.keys()}


def test_relative_lam_search_starts_at_the_default_merge_and_best_json_reproduces(family, tmp_path):
    """--relative-lam: λ is searched as a factor of the default's per-layer (evidence) λ. Trial 0 (all factors 1,
    s = 1) is exactly `bmm solve` without --lam/--params; every other trial keeps the per-layer λ profile (each
    layer's λ = its evidence λ × its block-group's factor); best.json's solve_params give `bmm solve --params` the
    kept model bit for bit."""
    from conftest import ready_work

    from bmm_cli.default_params import evidence_params
    from bmm_cli.search import search
    from bmm_cli.workdir import Sources

    work = ready_work(family, "llama", tmp_path / "w")
    default = tmp_path / "default"
    solve(work, "ta", "free", out=default, device="cpu")
    # the hook prefers later trials, so the kept model is not trial 0 (whose weights are checked separately)
    hook = f"{sys.executable} -c 'import sys; print(sys.argv[1])' {{trial}}"
    res = search(work, "ta", "free", hook, out=tmp_path / "best", blocks=2, trials=3, initial=3, device="cpu",
                 relative_lam=True)
    assert res["trials_ok"] == 3 and res["best_trial"] == 2
    lines = (work / "search-ta-free" / "trials.jsonl").read_text().splitlines()
    recs = {r["trial"]: r for r in map(json.loads, lines)}
    assert all(v == 1.0 for k, v in recs[0]["params"].items()), recs[0]["params"]
    per_layer = evidence_params(Sources(work, "ta", "free"), scale=1.0, eps=None)
    best = json.loads((work / "search-ta-free" / "best.json").read_text())
    sp = best["solve_params"]
    assert sp == res["best_solve_params"]
    p = recs[2]["params"]
    for layer, b in enumerate([0, 0, 1]):  # 3 layers, 2 block-groups (layer * 2 // 3)
        assert sp[f"s_{layer}"] == p[f"s_{b}"]
        for g in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            assert sp[f"lam_{layer}_{g}"] == pytest.approx(per_layer.lams[layer][g] * p[f"lam_{b}_{g}"], rel=1e-12)
    again = tmp_path / "again"
    solve(work, "ta", "free", out=again, params_file=work / "search-ta-free" / "best.json", device="cpu")
    kept, want = _weights(tmp_path / "best"), _weights(again)
    assert kept.keys() == want.keys() and all(torch.equal(kept[k], want[k]) for k in kept)
    # trial 0 = the default merge: a one-trial search into another --out against `bmm solve` (same parameters;
    # the search solves through its eigen-factor cache and `bmm solve` by Cholesky: equal to fp32 rounding)
    res0 = search(work, "ta", "free", hook, out=tmp_path / "first", blocks=2, trials=1, device="cpu",
                  relative_lam=True, force=True)
    assert res0["best_trial"] == 0
    assert json.loads((tmp_path / "first" / "bmm_merge.json").read_text())["params"] == \
        json.loads((default / "bmm_merge.json").read_text())["params"]
    first, dflt, base = _weights(tmp_path / "first"), _weights(default), _weights(family("llama")[0])
    assert first.keys() == dflt.keys()
    for k in first:
        step = (dflt[k].double() - base[k].double()).abs().max()
        assert (first[k].double() - dflt[k].double()).abs().max() <= 1e-4 * step + 1e-7, k


def test_trial_0_outside_the_range_is_named_and_is_no_edge_note(family, tmp_path, capsys):
    """A default λ outside --lam: trial 0 uses the clipped value and the search says so up front (stderr and
    ``first_clipped``); when trial 0 stays the best, no "widen the range" note fires for it."""
    from conftest import ready_work

    from bmm_cli.default_params import evidence_params
    from bmm_cli.search import search
    from bmm_cli.workdir import Sources

    work = ready_work(family, "llama", tmp_path / "w")
    lams = [v for row in evidence_params(Sources(work, "ta", "free"), scale=1.0, eps=None).lams for v in row.values()]
    lo = 10 * max(lams)  # every default λ lies below the range
    hook = f"{sys.executable} -c 'print(1.0)'"
    res = search(work, "ta", "free", hook, out=tmp_path / "best", blocks=1, trials=1, device="cpu",
                 lam=f"{lo}:{100 * lo}")
    err = capsys.readouterr().err
    assert res["best_trial"] == 0 and res["at_bounds"] == []
    assert sorted(x.split("=")[0] for x in res["first_clipped"]) == [f"lam_0_{g}" for g in
                                                                      ("attn_in", "attn_out", "mlp_in", "mlp_out")]
    assert "trial 0 is not the default merge" in err and "edge of its range" not in err
    res = search(work, "ta", "free", hook, out=tmp_path / "best2", blocks=1, trials=1, device="cpu",
                 lam=f"{min(lams) / 2}:{2 * max(lams)}", force=True)
    assert res["first_clipped"] == []


def test_params_at_bounds():
    """The search says when its best trial sits on the edge of a range (the optimum may lie outside)."""
    from bmm_cli.search.command import params_at_bounds
    from bmm_cli.search.space import SearchSpace

    space = SearchSpace(num_groups=1, scale_range=(0.7, 1.3), lam_range=(1e-4, 1.0))
    inside = {"s_0": 1.0, "lam_0_attn_in": 0.01, "lam_0_attn_out": 0.3, "lam_0_mlp_in": 0.02, "lam_0_mlp_out": 0.1}
    assert params_at_bounds(space, inside) == []
    edge = {**inside, "s_0": 0.7, "lam_0_mlp_in": 1.0}
    assert [x.split("=")[0] for x in params_at_bounds(space, edge)] == ["s_0", "lam_0_mlp_in"]
    const = SearchSpace(num_groups=1, scale_range=(1.0, 1.0), lam_range=(1e-4, 1.0))
    assert params_at_bounds(const, {**inside, "s_0": 1.0}) == []  # a constant is not searched


def test_merge_eval_takes_the_search_scorer_options(family, tmp_path):
    """`bmm merge --eval` shares bmm search's scorer options: --minimize (a loss is minimized, not maximized),
    --timeout, --initial, --trial-dir, and the in-memory scorers --eval-py and --lm-eval."""
    base, experts = family("bert")
    hook = tmp_path / "loss.py"
    hook.write_text("import json, sys\nr = json.load(open(sys.argv[1] + '/bmm_merge.json'))\n"
                    "print((r['params']['s_0'] - 1.2) ** 2)\n")
    common = ["merge", "-b", base, "-e", *experts, "--anchor", "ta", "--device", "cpu"]
    trial_dir = tmp_path / "trials"
    p = _bmm(*common, "--out", tmp_path / "o", "--eval", f"{sys.executable} {hook} {{model}}", "--minimize",
             "--trials", 4, "--initial", 3, "--timeout", 600, "--trial-dir", trial_dir, "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    recs = [json.loads(x) for x in (tmp_path / "o.bmm-work" / "search-ta-free" / "trials.jsonl").read_text()
            .splitlines()]
    assert res["trials"] == 4 and res["best_score"] == min(r["score"] for r in recs) > 0
    manifest = json.loads((tmp_path / "o.bmm-work" / "search-ta-free" / "search.json").read_text())
    assert manifest["minimize"] is True
    assert {k: manifest["options"][k] for k in ("initial", "timeout", "trial_dir")} == {
        "initial": 3, "timeout": 600, "trial_dir": str(trial_dir)}
    scorer = tmp_path / "score.py"
    scorer.write_text("def score(model, tokenizer, trial):\n    return -abs(trial['params']['s_0'] - 1.1)\n")
    p = _bmm(*common, "--out", tmp_path / "p", "--eval-py", f"{scorer}:score", "--trials", 2, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["in_memory"] is True
    p = _bmm(*common, "--out", tmp_path / "q", "--lm-eval", "no_such_task_here", "--trials", 2)
    assert p.returncode == 2 and "--lm-eval" in p.stderr and not (tmp_path / "q.bmm-work").exists()
    p = _bmm(*common, "--out", tmp_path / "r", "--eval", "echo 1", "--eval-py", f"{scorer}:score")
    assert p.returncode == 2 and "give one way to score trials" in p.stderr

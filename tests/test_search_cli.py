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

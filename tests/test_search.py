"""bmm_cli.search: the BO loop on a synthetic objective, failures, resume after SIGKILL, Ctrl-C, parallel trials.

The objective: ``materialize`` writes the parameters to ``model_dir/params.json``; the hook (a tiny stdlib-only
python script, started with ``-I -S`` to keep it fast) scores ``1 - 5 * mean((z - z*)^2)`` where ``z`` are the
parameters mapped to [0, 1] as the optimizer sees them (λ on a log scale) and ``z*`` is a hidden optimum.
The optimum scores 1.0; "within 5 %" means a score >= 0.95.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import alive

from bmm_cli.atomic import read_jsonl
from bmm_cli.atomic import recover_dir_swap as _recover_dir_swap
from bmm_cli.atomic import replace_dir as _replace_dir
from bmm_cli.errors import InputError, StateError
from bmm_cli.search import MARKER, SearchSpace, run_search

ZSTAR = {"s": 0.7, "lam": 0.35}

OBJECTIVE = r'''
import json, math, os, sys, time
model, trial, cfg_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = json.load(open(cfg_path))
if cfg.get("pidfile_dir"):
    open(os.path.join(cfg["pidfile_dir"], "hook-%d.pid" % trial), "w").write(str(os.getpid()))
block = cfg.get("block_file")
if block and os.path.exists(block) and trial == cfg.get("block_trial"):
    open(cfg["started_file"], "w").write(str(os.getpid()))
    time.sleep(60)
out = cfg.get("out")
if out and os.path.exists(out):  # `out` must always hold a complete model
    if not (os.path.exists(os.path.join(out, "params.json")) and os.path.exists(os.path.join(out, ".bmm-trial.json"))):
        print("out is incomplete"); sys.exit(0)
fail = cfg.get("fail", {}).get(str(trial))
if fail == "exit":
    print("something broke", file=sys.stderr); sys.exit(3)
if fail == "nan":
    print("nan"); sys.exit(0)
if fail == "garbage":
    print("accuracy: high"); sys.exit(0)
if fail == "sleep":
    time.sleep(30)
p = json.load(open(os.path.join(model, "params.json")))
z = []
for name, lo, hi, prior in cfg["specs"]:
    v = p[name]
    if prior == "uniform":
        u = (v - lo) / (hi - lo)
    else:
        u = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    z.append(u - (cfg["zstar"]["s"] if name.startswith("s_") else cfg["zstar"]["lam"]))
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "-1")
print(json.dumps({"score": 1 - 5 * sum(d * d for d in z) / len(z), "gpu": float(gpu.split(",")[0]),
                  "bmm_trial": float(os.environ["BMM_TRIAL"])}))
'''

RUNNER = r'''
import json, signal, sys
# the test signals this process: Ctrl-C must raise KeyboardInterrupt even when the suite was started with SIGINT
# ignored (`nohup pytest ... &` passes SIG_IGN on to children, and Python then installs no handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
from bmm_cli.search import SearchSpace, run_search
cfg = json.loads(sys.argv[1])
def materialize(params, model_dir, env):
    (model_dir / "params.json").write_text(json.dumps(params))
    return {"solve_s": 0.0, "write_s": 0.0}
space = SearchSpace(**cfg["space"])
kw = {}
if cfg.get("fast"):
    from skopt.utils import cook_estimator
    gp = cook_estimator("GP", space=space.dimensions(), random_state=cfg["seed"], n_restarts_optimizer=0)
    kw = {"base_estimator": gp,
          "acq_optimizer_kwargs": {"n_points": 2000, "n_restarts_optimizer": 2}}
try:
    r = run_search(space=space, workdir=cfg["workdir"], materialize=materialize, hook=cfg["hook"], trials=cfg["trials"],
                   initial=cfg["initial"], seed=cfg["seed"], timeout=cfg.get("timeout", 60), out=cfg.get("out"),
                   grace=0.5, optimizer_kwargs=kw)
except KeyboardInterrupt:
    sys.exit(130)
print(json.dumps({"best_trial": r.best_trial, "best_score": r.best_score}))
'''

SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "BMM_NO_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """GP fits on 2 busy cores: one BLAS thread is faster (and the same count as the subprocess runs)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def fast_optimizer(space: SearchSpace, seed: int) -> dict:
    """skopt GP-EI with a lighter hyper-parameter fit and acquisition search, to keep the suite fast."""
    from skopt.utils import cook_estimator

    return {"base_estimator": cook_estimator("GP", space=space.dimensions(), random_state=seed, n_restarts_optimizer=0),
            "acq_optimizer_kwargs": {"n_points": 2000, "n_restarts_optimizer": 2}}


def write_params(params, model_dir, env):
    assert model_dir.is_dir() and not any(model_dir.iterdir())
    trial = int(re.search(r"trial-(\d{4})", model_dir.name)[1])
    assert env["BMM_MODEL"] == str(model_dir) and env["BMM_TRIAL"] == str(trial)
    (model_dir / "params.json").write_text(json.dumps(params))
    return {"solve_s": 0.001, "write_s": 0.002}


def objective(space: SearchSpace, params: dict) -> float:
    z = []
    for name, lo, hi, prior in space.specs():
        v = params[name]
        u = (v - lo) / (hi - lo) if prior == "uniform" else (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
        z.append(u - (ZSTAR["s"] if name.startswith("s_") else ZSTAR["lam"]))
    return 1 - 5 * sum(d * d for d in z) / len(z)


@pytest.fixture
def hook_setup(tmp_path):
    """Returns make(space, **cfg) -> hook template; the hook's behaviour is set by a JSON config file."""
    script = tmp_path / "objective.py"
    script.write_text(OBJECTIVE)

    def make(space: SearchSpace, name: str = "cfg", **cfg) -> str:
        cfg_path = tmp_path / f"{name}.json"
        cfg_path.write_text(json.dumps({"specs": space.specs(), "zstar": ZSTAR, **cfg}))
        return f"{sys.executable} -I -S {script} {{model}} {{trial}} {cfg_path}"

    return make


def trial_numbers(workdir: Path) -> list[int]:
    return [r["trial"] for r in read_jsonl(workdir / "search" / "trials.jsonl")]


# ---------------------------------------------------------------------------------------------------------------
# the space


def test_space_names_roundtrip_defaults_fingerprint():
    sp = SearchSpace(2, eps_range=(0.0, 1.0))
    assert sp.names[:5] == ["s_0", "lam_0_attn_in", "lam_0_attn_out", "lam_0_mlp_in", "lam_0_mlp_out"]
    assert sp.names[-1] == "eps" and len(sp.names) == 11 and sp.dim_names == sp.names
    x = [1.1, 1e-3, 1e-2, 0.1, 0.5, 1.2, 2e-4, 3e-4, 4e-4, 5e-4, 0.25]
    p = sp.to_params(x)
    assert p["lam_1_attn_out"] == 3e-4 and p["eps"] == 0.25 and sp.from_params(p) == x
    scales, lams, eps = sp.unpack(p)
    assert scales == [1.1, 1.2] and lams[0]["mlp_in"] == 0.1 and eps == 0.25

    d = sp.default_point()
    assert all(d[f"s_{b}"] == 1.0 for b in range(2)) and d["lam_0_attn_in"] == 1.0 and d["eps"] == 0.5
    clipped = sp.default_point(default_scale=2.0, default_lam=10.0, default_eps=3.0)
    assert clipped["s_0"] == 1.3 and clipped["lam_1_mlp_out"] == 1.0 and clipped["eps"] == 1.0
    assert SearchSpace(1, lam_range=(1e-3, 100)).default_point()["lam_0_attn_in"] == 1.0
    assert SearchSpace(1, lam_range=(2.0, 100)).default_point()["lam_0_attn_in"] == 2.0

    assert sp.fingerprint() == SearchSpace(2, eps_range=(0, 1)).fingerprint()
    assert sp.fingerprint() != SearchSpace(2).fingerprint() != SearchSpace(3).fingerprint()
    assert SearchSpace(1).fingerprint() != SearchSpace(1, lam_range=(1e-3, 100.0)).fingerprint()

    dims = sp.dimensions()
    assert [d.name for d in dims] == sp.names and dims[1].prior == "log-uniform" and dims[0].prior == "uniform"


def test_space_constants_and_validation():
    sp = SearchSpace(1, scale_range=(1.0, 1.0))
    assert sp.dim_names == ["lam_0_attn_in", "lam_0_attn_out", "lam_0_mlp_in", "lam_0_mlp_out"]
    assert sp.to_params([0.1, 0.2, 0.3, 0.4])["s_0"] == 1.0
    for bad in (dict(num_groups=0), dict(num_groups=1, lam_range=(0.0, 1.0)),
                dict(num_groups=1, scale_range=(1.3, 1.0)),
                dict(num_groups=1, eps_range=(0.0, 2.0)), dict(num_groups=1, lam_groups=("a", "a"))):
        with pytest.raises(InputError):
            SearchSpace(**bad)
    with pytest.raises(InputError, match="missing"):
        SearchSpace(1).from_params({"s_0": 1.0})
    with pytest.raises(InputError, match="outside"):
        SearchSpace(1).from_params({**SearchSpace(1).default_point(), "s_0": 2.0})


# ---------------------------------------------------------------------------------------------------------------
# one search


def test_first_trial_is_default_point_out_always_complete(tmp_path, hook_setup):
    sp = SearchSpace(1)
    out = tmp_path / "merged"
    hook = hook_setup(sp, out=str(out))
    res = run_search(space=sp, workdir=tmp_path / "wd", materialize=write_params, hook=hook, trials=6, initial=3,
                     seed=0, timeout=30, out=out, optimizer_kwargs=fast_optimizer(sp, 0))
    recs = read_jsonl(tmp_path / "wd" / "search" / "trials.jsonl")
    assert [r["trial"] for r in recs] == list(range(6))
    assert recs[0]["params"] == sp.default_point() and recs[0]["source"] == "first"
    assert all(r["status"] == "ok" for r in recs), [r["reason"] for r in recs]  # the hook checks `out` each trial
    for r in recs:
        assert r["score"] == pytest.approx(objective(sp, r["params"]), abs=1e-12)
        assert r["y"] == -r["score"] and set(r["seconds"]) >= {"solve", "write", "eval", "total"}
        assert r["metrics"]["bmm_trial"] == r["trial"] and r["worker"] == 0
    best = max(recs, key=lambda r: r["score"])
    assert res.best_trial == best["trial"] and res.best_score == best["score"] and res.best_params == best["params"]
    assert res.n_ok == 6 and res.n_failed == 0 and res.model == out
    assert json.loads((out / "params.json").read_text()) == best["params"]
    assert json.loads((out / MARKER).read_text())["trial"] == best["trial"]
    sdir = tmp_path / "wd" / "search"
    assert json.loads((sdir / "best.json").read_text())["trial"] == best["trial"]
    assert json.loads((sdir / "summary.json").read_text())["state"] == "finished"
    assert (sdir / "convergence.png").stat().st_size > 1000
    assert not [p for p in (sdir / "trials").iterdir() if p.name.startswith("trial-")]
    assert not list(tmp_path.glob(".merged.bmm-*"))

    # rerun with the same settings: nothing left to do, nothing re-made
    calls = []
    res2 = run_search(space=sp, workdir=tmp_path / "wd", materialize=lambda *a: calls.append(a), hook=hook,
                      trials=6, initial=3, seed=0, timeout=30, out=out, optimizer_kwargs=fast_optimizer(sp, 0))
    assert not calls and res2.best_trial == res.best_trial and len(res2.records) == 6

    # `out` lost (or never moved): the best model is re-made from its parameters, no hook run
    import shutil

    shutil.rmtree(out)
    res3 = run_search(space=sp, workdir=tmp_path / "wd", materialize=write_params, hook=hook, trials=6,
                      initial=3, seed=0, timeout=30, out=out, optimizer_kwargs=fast_optimizer(sp, 0))
    assert json.loads((out / "params.json").read_text()) == best["params"] and res3.n_failed == 0


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, hook_setup):
    sp = SearchSpace(1)
    hook = hook_setup(sp, fail={"1": "exit", "2": "nan", "3": "sleep", "4": "garbage"})

    def materialize(params, model_dir, env):
        if env["BMM_TRIAL"] == "5":
            raise RuntimeError("CUDA out of memory\n(tried to allocate 2 GiB)")
        return write_params(params, model_dir, env)

    res = run_search(space=sp, workdir=tmp_path / "wd", materialize=materialize, hook=hook, trials=8, initial=10,
                     seed=1, timeout=2, grace=0.3)
    recs = {r["trial"]: r for r in res.records}
    assert sorted(recs) == list(range(8))
    assert recs[1]["status"] == "failed" and recs[1]["reason"] == "exit code 3: something broke"
    assert "something broke" in recs[1]["stderr_tail"]
    assert recs[2]["status"] == "failed" and recs[2]["reason"] == "score is NaN"
    assert recs[3]["status"] == "timeout" and recs[3]["reason"].startswith("timed out after 2 s")
    assert recs[4]["status"] == "failed" and "not a number" in recs[4]["reason"]
    assert recs[5]["status"] == "failed"
    assert recs[5]["reason"].startswith("materialize failed: RuntimeError: CUDA out of memory")
    for n in (1, 2, 3, 4, 5):
        assert recs[n]["score"] is None
        # told the worst score seen so far (only trial 0 succeeded before trial 5)
        assert recs[n]["y"] == recs[0]["y"]
    assert recs[6]["status"] == recs[7]["status"] == "ok"
    assert res.n_ok == 3 and res.n_failed == 5
    assert res.best_trial in (0, 6, 7)
    assert not [p for p in (tmp_path / "wd" / "search" / "trials").iterdir() if p.name != f"trial-{res.best_trial:04d}"]


def test_fail_fast_when_nothing_ever_succeeds(tmp_path):
    with pytest.raises(InputError, match="3 trials failed and none has succeeded.*exit code 127"):
        run_search(space=SearchSpace(1), workdir=tmp_path / "wd", materialize=write_params,
                   hook="no-such-evaluator {model}", trials=10, initial=10, seed=0, timeout=10)
    recs = read_jsonl(tmp_path / "wd" / "search" / "trials.jsonl")
    assert [r["trial"] for r in recs] == [0, 1, 2] and all(r["y"] is None for r in recs)
    assert json.loads((tmp_path / "wd" / "search" / "summary.json").read_text())["state"] == "stopped"


def test_full_disk_stops_the_search(tmp_path, hook_setup):
    import errno

    sp = SearchSpace(1)

    def materialize(params, model_dir, env):
        if env["BMM_TRIAL"] == "2":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_params(params, model_dir, env)

    with pytest.raises(OSError):
        run_search(space=sp, workdir=tmp_path / "wd", materialize=materialize, hook=hook_setup(sp), trials=5,
                   initial=10, seed=0, timeout=30)
    assert trial_numbers(tmp_path / "wd") == [0, 1]


def test_parallel_history_resumes_sequentially_and_extends(tmp_path, hook_setup):
    """A history with constant-liar proposals is told in one batch; raising --trials continues the numbering."""
    sp = SearchSpace(1)
    kw = dict(space=sp, workdir=tmp_path / "wd", materialize=write_params, hook=hook_setup(sp), initial=10, seed=0,
              timeout=30)
    run_search(trials=4, parallel=2, **kw)
    res = run_search(trials=6, parallel=1, **kw)
    assert sorted(trial_numbers(tmp_path / "wd")) == list(range(6)) and res.n_ok == 6
    assert [r["source"] for r in res.records][4:] == ["ask", "ask"]


def test_bad_hook_template_fails_before_any_trial(tmp_path):
    calls = []
    with pytest.raises(InputError, match="unknown placeholder"):
        run_search(space=SearchSpace(1), workdir=tmp_path / "wd", materialize=lambda *a: calls.append(a),
                   hook="eval --model {modle}", trials=3, timeout=10)
    assert not calls and not (tmp_path / "wd" / "search" / "trials.jsonl").exists()


def test_changed_space_or_anchor_is_refused_unless_force(tmp_path, hook_setup):
    sp = SearchSpace(1)
    kw = dict(workdir=tmp_path / "wd", materialize=write_params, trials=2, initial=10, seed=0, timeout=30)
    run_search(space=sp, hook=hook_setup(sp), fingerprint_extra={"anchor": "tsv", "gram": "free"}, **kw)
    sp2 = SearchSpace(1, lam_range=(1e-3, 100.0))
    with pytest.raises(StateError, match="search space"):
        run_search(space=sp2, hook=hook_setup(sp2, "cfg2"), fingerprint_extra={"anchor": "tsv", "gram": "free"}, **kw)
    with pytest.raises(StateError, match="anchor"):
        run_search(space=sp, hook=hook_setup(sp), fingerprint_extra={"anchor": "ties", "gram": "free"}, **kw)
    with pytest.raises(StateError, match="direction"):
        run_search(space=sp, hook=hook_setup(sp), fingerprint_extra={"anchor": "tsv", "gram": "free"}, minimize=True,
                   **kw)
    res = run_search(space=sp2, hook=hook_setup(sp2, "cfg2"), fingerprint_extra={"anchor": "ties"}, force=True, **kw)
    sdir = tmp_path / "wd" / "search"
    archived = list(sdir.glob("trials.*.jsonl"))
    assert len(archived) == 1 and len(read_jsonl(archived[0])) == 2
    assert [r["trial"] for r in res.records] == [0, 1]
    assert json.loads((sdir / "search.json").read_text())["extra"] == {"anchor": "ties"}


def test_out_that_is_not_ours_is_refused(tmp_path, hook_setup):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="did not write"):
        run_search(space=SearchSpace(1), workdir=tmp_path / "wd", materialize=write_params,
                   hook=hook_setup(SearchSpace(1)), trials=2, timeout=30, out=out)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_replace_dir_swaps_and_recovers(tmp_path):
    dst, src = tmp_path / "out", tmp_path / "new"
    for d, tag in ((dst, "old"), (src, "new")):
        d.mkdir()
        (d / "w.bin").write_text(tag)
    _replace_dir(src, dst)
    assert (dst / "w.bin").read_text() == "new" and not src.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a crash between "old aside" and "new in place": the old one comes back, the half-made new one goes
    os.rename(dst, tmp_path / ".out.bmm-old-1-x")
    (tmp_path / ".out.bmm-new-1-x").mkdir()
    _recover_dir_swap(dst)
    assert (dst / "w.bin").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parallel_workers_unique_records_and_gpus(tmp_path, hook_setup):
    sp = SearchSpace(1)
    res = run_search(space=sp, workdir=tmp_path / "wd", materialize=write_params, hook=hook_setup(sp), trials=7,
                     initial=3, seed=0, timeout=30, parallel=2, gpus=["3", "5"], optimizer_kwargs=fast_optimizer(sp, 0))
    nums = trial_numbers(tmp_path / "wd")
    assert sorted(nums) == list(range(7)) and len(set(nums)) == 7
    assert all(r["status"] == "ok" for r in res.records)
    assert {r["worker"] for r in res.records} == {0, 1}
    for r in res.records:
        assert r["metrics"]["gpu"] == {0: 3.0, 1: 5.0}[r["worker"]]
    assert res.records[0]["params"] == sp.default_point()
    xs = [tuple(r["x"]) for r in res.records]
    assert len(set(xs)) == 7


# ---------------------------------------------------------------------------------------------------------------
# kills and interrupts (subprocess runs)


def _runner(tmp_path: Path, cfg: dict) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], env=SUB_ENV, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 90.0) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"runner ended early: {proc.returncode}\n{proc.stderr.read()}")
        assert time.monotonic() < end, "timed out waiting for the hook"
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, hook_setup):
    sp = SearchSpace(1)
    trials, initial, seed = 7, 3, 3
    # the uninterrupted reference, in this process
    ref = run_search(space=sp, workdir=tmp_path / "ref", materialize=write_params, hook=hook_setup(sp, "ref"),
                     trials=trials, initial=initial, seed=seed, timeout=30, optimizer_kwargs=fast_optimizer(sp, seed))

    block, started = tmp_path / "block", tmp_path / "started"
    block.touch()
    hook = hook_setup(sp, "cfg", block_file=str(block), block_trial=4, started_file=str(started),
                      out=str(tmp_path / "merged"))
    cfg = {"space": {"num_groups": 1}, "workdir": str(tmp_path / "wd"), "hook": hook, "trials": trials,
           "initial": initial, "seed": seed, "fast": True, "out": str(tmp_path / "merged")}
    proc = _runner(tmp_path, cfg)
    _wait_for(started, proc)  # trial 4's hook is running (after GP steps have been taken)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    orphan = int(started.read_text())
    # the hook runs in its own session, under a guard that stops the group when bmm dies, even by SIGKILL
    deadline = time.monotonic() + 30
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(orphan)
    assert trial_numbers(tmp_path / "wd") == [0, 1, 2, 3]
    block.unlink()

    # resume (here, in-process): trial 4 is redone under its own number
    res = run_search(space=sp, workdir=tmp_path / "wd", materialize=write_params, hook=hook, trials=trials,
                     initial=initial, seed=seed, timeout=30, out=tmp_path / "merged", grace=0.5,
                     optimizer_kwargs=fast_optimizer(sp, seed))
    assert not alive(orphan)
    nums = trial_numbers(tmp_path / "wd")
    assert nums == list(range(trials))
    for a, b in zip(ref.records, res.records):
        assert a["trial"] == b["trial"] and a["source"] == b["source"]
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-9, err_msg=f"trial {a['trial']}")
    assert (res.best_trial, res.best_score) == (ref.best_trial, ref.best_score)
    assert json.loads((tmp_path / "merged" / "params.json").read_text()) == ref.best_params


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_cleanly(tmp_path, hook_setup, sig):
    """Ctrl-C (or SIGTERM from a job scheduler) during trial 2's hook: the hook's group is killed, trials.jsonl
    and `out` stay valid, the summary says interrupted, the runner exits 130 (KeyboardInterrupt)."""
    sp = SearchSpace(1)
    block, started = tmp_path / "block", tmp_path / "started"
    block.touch()
    out = tmp_path / "merged"
    hook = hook_setup(sp, block_file=str(block), block_trial=2, started_file=str(started), out=str(out))
    cfg = {"space": {"num_groups": 1}, "workdir": str(tmp_path / "wd"), "hook": hook, "trials": 6, "initial": 10,
           "seed": 0, "out": str(out)}
    proc = _runner(tmp_path, cfg)
    _wait_for(started, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    hook_pid = int(started.read_text())
    assert not alive(hook_pid)
    sdir = tmp_path / "wd" / "search"
    assert trial_numbers(tmp_path / "wd") == [0, 1]
    assert json.loads((sdir / "summary.json").read_text())["state"] == "interrupted"
    assert (sdir / "convergence.png").exists()
    best = json.loads((sdir / "best.json").read_text())
    assert json.loads((out / "params.json").read_text()) == best["params"]
    assert not (sdir / "trials" / "trial-0002").exists()


# ---------------------------------------------------------------------------------------------------------------
# does the optimizer optimize?


@pytest.mark.slow
def test_gp_ei_beats_random_search(tmp_path, hook_setup):
    """Trials needed to get within 5 % of the optimum (score >= 0.95), GP-EI through run_search vs random search
    (same first point, same budget), averaged over 3 seeds. One block-group (5 dims), 30 trials: in 10 dims
    skopt's GP-EI needs more than 30 trials to beat random search on this objective (measured)."""
    sp = SearchSpace(1)
    budget, thr = 30, 0.95
    hook = hook_setup(sp)

    def first_hit(scores):
        return next((i + 1 for i, s in enumerate(scores) if s is not None and s >= thr), budget + 1)

    gp_hits, rs_hits = [], []
    for seed in range(3):
        res = run_search(space=sp, workdir=tmp_path / f"gp{seed}", materialize=write_params, hook=hook, trials=budget,
                         initial=5, seed=seed, timeout=30, optimizer_kwargs=fast_optimizer(sp, seed))
        assert res.n_ok == budget
        gp_hits.append(first_hit([r["score"] for r in res.records]))
        from skopt.space import Space

        rnd = Space(sp.dimensions()).rvs(budget - 1, random_state=np.random.RandomState(100 + seed))
        rs_hits.append(first_hit([objective(sp, sp.default_point())] + [objective(sp, sp.to_params(x)) for x in rnd]))
    assert np.mean(gp_hits) < np.mean(rs_hits), (gp_hits, rs_hits)
    assert np.mean(gp_hits) <= budget, gp_hits

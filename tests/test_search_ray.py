"""`bmm search --ray` on a real local Ray cluster (127.0.0.1, 2 CPUs, no dashboard, a small object store): two
actors hold the trial solver, one is SIGKILLed in the middle of a trial (the trial runs again on a replacement),
one trial loses its worker twice (recorded as failed), and the records, best.json and --out mean what they mean
locally. Without Ray installed, --ray is a one-line error naming the extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import alive, ready_work

from bmm_cli.atomic import read_jsonl
from bmm_cli.search import MARKER
from bmm_cli.store import Checkpoint

HOOK = textwrap.dedent('''
    import json, os, sys, time
    model, trial, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kills = {2: 1, 3: 2}  # trial -> how many of its runs get their worker killed
    runs = len([n for n in os.listdir(ctl) if n.startswith(f"run-{trial}-")])
    open(os.path.join(ctl, f"run-{trial}-{runs}"), "w").write(os.environ["BMM_WORKER"])
    if runs < kills.get(trial, 0):
        tmp = os.path.join(ctl, f".kill-{trial}-{runs}")
        open(tmp, "w").write(json.dumps({"actor": int(os.environ["BMM_WORKER_PID"]), "hook": os.getpid()}))
        os.rename(tmp, os.path.join(ctl, f"kill-{trial}-{runs}"))
        time.sleep(120)
    recipe = json.load(open(os.path.join(model, "bmm_merge.json")))
    s = recipe["params"]["s_0"]
    print(json.dumps({"score": -(s - 1.2) ** 2, "pid": float(os.environ["BMM_WORKER_PID"])}))
''')


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    tmp = f"/tmp/bmm-ray-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             _temp_dir=tmp, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_search_survives_killed_actors(family, tmp_path, ray_cluster):
    from bmm_cli.search import search

    work = ready_work(family, "bert", tmp_path / "w")
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    killed: list[dict] = []
    stop = threading.Event()

    def killer():  # plays the cluster losing a worker: SIGKILL of the actor process while its trial runs
        done = set()
        while not stop.is_set():
            for p in ctl.glob("kill-*"):
                if p.name not in done:
                    done.add(p.name)
                    pids = json.loads(p.read_text())
                    os.kill(pids["actor"], signal.SIGKILL)
                    killed.append(pids)
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = tmp_path / "best"
    try:
        res = search(work, "ta", "free", f"{sys.executable} -I -S {hook} {{model}} {{trial}} {ctl}", out=out,
                     trials=6, initial=6, blocks=1, lam="0.02", scale="1.0:1.4", ray="auto", parallel=2,
                     trial_dir=tmp_path / "node-local", timeout=300)
    finally:
        stop.set()
        t.join()
    assert res["backend"] == "ray" and len(killed) == 3
    recs = {r["trial"]: r for r in read_jsonl(work / "search-ta-free" / "trials.jsonl")}
    assert sorted(recs) == list(range(6))
    assert recs[2]["status"] == "ok" and recs[2]["retried"] == 1  # re-queued once on a fresh actor
    assert recs[3]["status"] == "failed" and recs[3]["retried"] == 1 and "worker died twice" in recs[3]["reason"]
    assert all(recs[n]["status"] == "ok" and "retried" not in recs[n] for n in (0, 1, 4, 5))
    assert {r["worker"] for r in recs.values()} == {0, 1}
    # the orphaned hooks of the killed actors were stopped, and the three killed actors are gone
    for pids in killed:
        assert not alive(pids["hook"]) and not alive(pids["actor"])
    # the trials ran in actor processes, never in this one; trial 2's second run on a replacement actor
    assert os.getpid() not in {int(r["metrics"]["pid"]) for r in recs.values() if r["status"] == "ok"}
    assert int(recs[2]["metrics"]["pid"]) not in {p["actor"] for p in killed}
    best = max((r for r in recs.values() if r["status"] == "ok"), key=lambda r: r["score"])
    assert res["best_trial"] == best["trial"]
    assert json.loads((work / "search-ta-free" / "best.json").read_text())["trial"] == best["trial"]
    assert json.loads((out / MARKER).read_text())["trial"] == best["trial"]
    assert json.loads((out / "bmm_merge.json").read_text())["params"] == best["params"]
    Checkpoint.open(out)  # a complete model
    assert not [p for p in (tmp_path / "node-local").iterdir() if p.name.startswith("trial-")]

    # resume on the cluster: a larger budget runs only the new trials, numbered on
    res = search(work, "ta", "free", f"{sys.executable} -I -S {hook} {{model}} {{trial}} {ctl}", out=out,
                 trials=7, initial=6, blocks=1, lam="0.02", scale="1.0:1.4", ray="auto", parallel=2,
                 trial_dir=tmp_path / "node-local", timeout=300)
    assert res["trials"] == 7 and [r["trial"] for r in read_jsonl(work / "search-ta-free" / "trials.jsonl")][6:] == [6]


def test_ray_missing_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # what an interpreter without Ray sees: ImportError
            "from bmm_cli.cli import main\n"
            f"main(['search', '-w', {str(tmp_path)!r}, '--eval', 'echo 1', '--out', {str(tmp_path / 'o')!r}, '--ray'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == 2 and p.stdout == ""
    want = "bmm: error: --ray needs Ray, which is not installed: from the bmm clone, pip install -e '.[ray]'"
    assert p.stderr.strip() == want
    assert not (tmp_path / "o").exists()


SCORER = textwrap.dedent('''
    import os

    def score(model, tokenizer, trial):
        w = dict(model.named_parameters())["encoder.layer.0.output.dense.weight"]
        return {"score": -abs(float(w.float().norm()) - 3.0), "pid": os.getpid(), "model_id": id(model)}
''')


@pytest.mark.slow
def test_ray_in_memory_one_resident_model_per_actor(family, tmp_path, ray_cluster):
    from bmm_cli.search import search
    from bmm_cli.solve import solve

    work = ready_work(family, "bert", tmp_path / "w")
    scorer = tmp_path / "scorer.py"
    scorer.write_text(SCORER)
    out = tmp_path / "best"
    res = search(work, "ta", "free", out=out, eval_py=f"{scorer}:score", trials=6, initial=6, blocks=1,
                 ray="auto", parallel=2)
    assert res["in_memory"] and res["backend"] == "ray" and res["trials_failed"] == 0
    recs = read_jsonl(work / "search-ta-free" / "trials.jsonl")
    pids = {int(r["metrics"]["pid"]) for r in recs}
    assert len(pids) == 2 and os.getpid() not in pids  # two actors, each with its own resident model
    per_pid = {}
    for r in recs:
        per_pid.setdefault(int(r["metrics"]["pid"]), set()).add(r["metrics"]["model_id"])
    assert all(len(ids) == 1 for ids in per_pid.values())  # the same model object across an actor's trials
    solve(work, "ta", "free", out=tmp_path / "check", params_file=work / "search-ta-free" / "best.json")
    best, chk = Checkpoint.open(out), Checkpoint.open(tmp_path / "check")
    import torch

    for k in chk.keys():
        torch.testing.assert_close(best.get(k), chk.get(k), rtol=0, atol=1e-5, msg=k)


BLOCK_HOOK = textwrap.dedent('''
    import json, os, sys, time
    model, trial, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if trial == 3 and not os.path.exists(os.path.join(ctl, "released")):
        tmp = os.path.join(ctl, ".started")
        open(tmp, "w").write(json.dumps({"actor": int(os.environ["BMM_WORKER_PID"]), "hook": os.getpid()}))
        os.rename(tmp, os.path.join(ctl, "started"))
        time.sleep(120)
    s = json.load(open(os.path.join(model, "bmm_merge.json")))["params"]["s_0"]
    print(-(s - 1.2) ** 2)
''')


@pytest.mark.slow
def test_ray_driver_sigkill_then_resume(family, tmp_path, ray_cluster):
    """The driver (a `bmm search --ray ADDRESS` process joined to the test's cluster) is SIGKILLed while trial 3
    runs on an actor: Ray reaps the actors it owned, the records stay valid, and a rerun redoes trial 3 under its own
    number and finishes the budget."""
    from bmm_cli.search import search

    work = ready_work(family, "bert", tmp_path / "w")
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    hook = tmp_path / "hook.py"
    hook.write_text(BLOCK_HOOK)
    ev = f"{sys.executable} -I -S {hook} {{model}} {{trial}} {ctl}"
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "bmm_cli.cli", "search", "-w", str(work), "--anchor", "ta", "--eval", ev,
           "--trials", "6", "--initial", "6", "--lam", "0.02", "--scale", "1.0:1.4", "--out", str(tmp_path / "best"),
           "--ray", address, "--parallel", "1", "--trial-dir", str(tmp_path / "node-local")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BMM_NO_PROGRESS": "1"})
    end = time.monotonic() + 240
    while not (ctl / "started").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < end, "trial 3 never started"
        time.sleep(0.1)
    pids = json.loads((ctl / "started").read_text())
    proc.kill()
    proc.wait(timeout=30)
    assert [r["trial"] for r in read_jsonl(work / "search-ta-free" / "trials.jsonl")] == [0, 1, 2]
    end = time.monotonic() + 60
    while alive(pids["actor"]) and time.monotonic() < end:  # the actor belonged to the killed driver's job
        time.sleep(0.2)
    assert not alive(pids["actor"])
    # its hook runs in its own session: Ray's cleanup of a dead worker's children or, on another node, bmm's
    # resume (which kills hooks carrying this search's BMM_RUN_ID) stops it; it is gone after the rerun
    (ctl / "released").touch()
    res = search(work, "ta", "free", ev, out=tmp_path / "best", trials=6, initial=6, blocks=1, lam="0.02",
                 scale="1.0:1.4", ray="auto", parallel=1, trial_dir=tmp_path / "node-local")
    assert not alive(pids["hook"])
    recs = read_jsonl(work / "search-ta-free" / "trials.jsonl")
    assert [r["trial"] for r in recs] == list(range(6)) and all(r["status"] == "ok" for r in recs)
    assert res["trials"] == 6
    best = max(recs, key=lambda r: r["score"])
    assert json.loads((tmp_path / "best" / MARKER).read_text())["trial"] == best["trial"] == res["best_trial"]

"""bmm_cli.hooks: placeholder quoting (no injection), process-group kills, capped output, score parsing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from bmm_cli.errors import InputError
from bmm_cli.hooks import _group_alive, parse_score, render_command, run_hook

NASTY = "a b'c\"d $(touch pwned) `touch pwned2` $HOME \\x;\nrm -rf *"


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped (PID 1 in a container may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _echo_words(command: str, cwd: Path) -> list[str]:
    """Run a rendered command whose program prints each argument NUL-terminated."""
    r = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, check=True)
    return r.stdout.decode().split("\0")[:-1]


# ---------------------------------------------------------------------------------------------------------------
# render_command


@pytest.mark.parametrize(
    "template, expect",
    [
        ("printf '%s\\0' {model}", "{v}"),
        ('printf "%s\\0" "{model}"', "{v}"),
        ("printf '%s\\0' '{model}'", "{v}"),
        ('printf "%s\\0" "--model={model}/x"', "--model={v}/x"),
        ("printf '%s\\0' --model={model}", "--model={v}"),
        ('printf "%s\\0" "$(printf %s {model})"', "{v}"),
        ('printf "%s\\0" "$(printf %s "{model}")"', "{v}"),
        ("true # it's a comment\nprintf '%s\\0' {model}", "{v}"),
    ],
)
def test_render_value_arrives_as_one_literal_argument(tmp_path, template, expect):
    model = str(tmp_path / NASTY)
    words = _echo_words(render_command(template, {"model": model, "trial": 3}), tmp_path)
    assert words == [expect.format(v=model)]
    assert sorted(os.listdir(tmp_path)) == [], "the value was executed, not passed"


def test_render_trial_workdir_and_escaped_braces(tmp_path):
    cmd = render_command("printf '%s\\0' {{x}} {trial} {workdir} '{{}}'", {"trial": 7, "workdir": "/w d", "model": "m"})
    assert _echo_words(cmd, tmp_path) == ["{x}", "7", "/w d", "{}"]


def test_render_plain_values_stay_readable():
    assert render_command("eval.py --model {model} --trial {trial}", {"model": "/runs/trial-0003", "trial": 3}) == (
        "eval.py --model /runs/trial-0003 --trial 3"
    )


@pytest.mark.parametrize("template", ["eval {modle}", "eval {}", "eval {0}", "eval {model.x}"])
def test_render_unknown_placeholder_lists_valid_fields(template):
    with pytest.raises(InputError) as e:
        render_command(template, {"model": "m", "trial": 1, "workdir": "w"})
    msg = str(e.value)
    assert "{model}" in msg and "{trial}" in msg and "{workdir}" in msg and "\n" not in msg


@pytest.mark.parametrize("template", ["eval {model!r}", "eval {model:>20}", "eval {model", "eval }"])
def test_render_malformed_placeholder(template):
    with pytest.raises(InputError):
        render_command(template, {"model": "m"})


@pytest.mark.parametrize(
    "template",
    ["echo `cat {model}`", "echo ${model}", 'echo "${model}"', "cat <<EOF\n{model}\nEOF", "echo $'{model}'",
     "echo \\{model}", "echo ${{X:-{model}}}"],
)
def test_render_refuses_contexts_it_cannot_quote(template):
    with pytest.raises(InputError):
        render_command(template, {"model": "/a b/$(touch pwned)"})


def test_render_refuses_nul():
    with pytest.raises(InputError):
        render_command("x {model}", {"model": "a\0b"})


# ---------------------------------------------------------------------------------------------------------------
# parse_score


def test_parse_score_number_and_json():
    assert parse_score("loading...\n0.75\n\n") == (0.75, {})
    score, metrics = parse_score('log\n{"score": 0.5, "acc": 0.5, "n": 10, "ok": true, "name": "x", '
                                 '"sub": {"f1": 0.25}}\n')
    assert score == 0.5 and metrics == {"acc": 0.5, "n": 10.0, "sub/f1": 0.25}


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "no output"),
        ("accuracy is good\n", "not a number"),
        ("nan\n", "NaN"),
        ("inf\n", "inf"),
        ('{"score": NaN}\n', "NaN"),
        ('{"acc": 0.5}\n', 'no "score"'),
        ('{"score": "0.5"}\n', "must be a number"),
        ('{"score": true}\n', "must be a number"),
        ("[0.5]\n", "must be a number"),
    ],
)
def test_parse_score_rejects(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_score(text)


# ---------------------------------------------------------------------------------------------------------------
# run_hook


def test_run_hook_ok_json_metrics_env_and_cwd(tmp_path):
    r = run_hook(
        'echo noise; echo warn >&2; echo "{\\"score\\": $SCORE, \\"cwd\\": $(pwd | wc -c)}"',
        env={"SCORE": "0.625"}, timeout=10, cwd=tmp_path,
    )
    assert r.ok and r.status == "ok" and r.score == 0.625 and r.returncode == 0
    assert r.metrics == {"cwd": float(len(str(tmp_path)) + 1)}
    assert r.stderr_tail == "warn\n" and r.reason == ""


def test_run_hook_nonzero_exit(tmp_path):
    r = run_hook("echo 0.9; echo 'CUDA out of memory' >&2; exit 3", timeout=10)
    assert r.status == "failed" and r.score is None and r.returncode == 3
    assert r.reason == "exit code 3: CUDA out of memory"
    r = run_hook("kill -SEGV $$", timeout=10)
    assert r.status == "failed" and "SIGSEGV" in r.reason


@pytest.mark.parametrize(
    "command, reason",
    [("echo all good", "not a number"), ("echo nan", "NaN"), ("true", "no output"),
     ("echo '{\"acc\": 1}'", 'no "score"')],
)
def test_run_hook_no_valid_score(command, reason):
    r = run_hook(command, timeout=10)
    assert r.status == "failed" and reason in r.reason and r.returncode == 0


def test_run_hook_timeout_kills_forked_children(tmp_path):
    """The hook ignores SIGTERM and forks a child that would write a file after the timeout: both must die."""
    flag, pidfile = tmp_path / "late.txt", tmp_path / "child.pid"
    cmd = f"trap '' TERM; (sleep 1.5; touch {flag}) & echo $! > {pidfile}; sleep 30; echo 1"
    t0 = time.monotonic()
    r = run_hook(cmd, timeout=0.5, grace=0.3)
    took = time.monotonic() - t0
    assert r.status == "timeout" and "timed out after 0.5 s" in r.reason and r.score is None
    assert took < 3.0
    child = int(pidfile.read_text())
    time.sleep(max(0.0, 2.2 - (time.monotonic() - t0)))
    assert not flag.exists(), "a forked child outlived the timeout"
    assert _dead(child)


def test_run_hook_leftover_background_job_is_stopped(tmp_path):
    """A hook that exits with a score but leaves a job behind: the job is stopped (it would hold a GPU)."""
    flag = tmp_path / "late.txt"
    r = run_hook(f"(sleep 1; touch {flag}) >/dev/null 2>&1 & echo 0.5", timeout=10, grace=0.5)
    assert r.ok and r.score == 0.5
    time.sleep(1.3)
    assert not flag.exists()


def test_run_hook_flood_is_capped():
    """50 MB on stdout and 20 MB on stderr: read incrementally, memory bounded, the score still found."""
    tracemalloc.start()
    try:
        r = run_hook("yes | head -c 50000000; yes err | head -c 20000000 >&2; echo 0.25", timeout=60,
                     stdout_limit=256 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.ok and r.score == 0.25
    assert peak < 4 * 1024 * 1024, peak
    assert len(r.stderr_tail) <= 4000 and r.stderr_tail.endswith("err\n")


def test_run_hook_flood_without_score_says_so():
    r = run_hook("yes | head -c 3000000", timeout=60, stdout_limit=64 * 1024)
    assert r.status == "failed" and "not a number" in r.reason and "3000000 bytes of stdout" in r.reason


def test_run_hook_cancel_from_another_thread(tmp_path):
    cancel = threading.Event()
    pgids = []
    threading.Timer(0.3, cancel.set).start()
    r = run_hook("sleep 30", timeout=60, cancel=cancel, grace=0.5, on_start=pgids.append)
    assert r.status == "cancelled" and not _group_alive(pgids[0])


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_run_hook_keyboard_interrupt_kills_group_and_reraises(tmp_path):
    pidfile = tmp_path / "pid"
    main = threading.main_thread().ident

    def interrupt():
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGINT)

    # under `nohup pytest ... &` this process starts with SIGINT ignored: restore Python's handler for the test
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_hook(f"sleep 30 & echo $! > {pidfile}; wait", timeout=60, grace=0.5)
    finally:
        signal.signal(signal.SIGINT, previous)
    child = int(pidfile.read_text())
    time.sleep(0.1)
    assert _dead(child)


def test_run_hook_path_with_spaces_and_injection_end_to_end(tmp_path):
    """The rendered command receives the nasty model path as one argument, and nothing gets executed."""
    model = tmp_path / NASTY
    model.mkdir()
    (model / "score.txt").write_text("0.375\n")
    script = tmp_path / "hook.py"
    script.write_text("import sys, pathlib\nassert len(sys.argv) == 2, sys.argv\n"
                      "print(pathlib.Path(sys.argv[1], 'score.txt').read_text())\n")
    for tmpl in ("{py} {script} {model}", '{py} "{script}" "{model}"'):
        cmd = render_command(tmpl, {"py": sys.executable, "script": str(script), "model": str(model)})
        r = run_hook(cmd, timeout=30, cwd=tmp_path)
        assert r.ok and r.score == 0.375, r
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([NASTY, "hook.py"])


# ---------------------------------------------------------------------------------------------------------------
# examples/eval_lm_eval.py against a stand-in for lm_eval that writes its documented results layout

FAKE_LM_EVAL = r'''
import json, os, re, sys, datetime
a = sys.argv[1:]
opt = {a[i]: a[i + 1] for i in range(0, len(a) - 1) if a[i].startswith("--")}
model = opt["--model_args"].split("pretrained=")[1].split(",")[0]
assert opt["--model"] == "hf" and "dtype=bfloat16" in opt["--model_args"], opt
print("|    Tasks    |Version|Filter|n-shot|Metric|Value|")  # lm_eval's table goes to stdout
res = {
    "results": {
        "arc_challenge": {"alias": "arc_challenge", "acc,none": 0.5, "acc_stderr,none": 0.01,
                          "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.02},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": "N/A",
                  "exact_match,flexible-extract": 0.4, "exact_match_stderr,flexible-extract": 0.03},
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 12.0, "bits_per_byte,none": 0.7},
    },
    "higher_is_better": {"arc_challenge": {"acc": True, "acc_norm": True},
                         "gsm8k": {"exact_match": True},
                         "wikitext": {"word_perplexity": False, "bits_per_byte": False}},
    "config": {"model": "hf", "limit": 8.0},
}
out = os.path.join(opt["--output_path"], re.sub(r'["<>:/|\\?*\[\]]+', "__", model))
os.makedirs(out, exist_ok=True)
date = datetime.datetime.now().isoformat().replace(":", "-")
json.dump(res, open(os.path.join(out, "results_%s.json" % date), "w"))
'''


def test_example_lm_eval_wrapper_reads_the_results_file(tmp_path):
    fake = tmp_path / "fake_lm_eval.py"
    fake.write_text(FAKE_LM_EVAL)
    script = Path(__file__).resolve().parents[1] / "examples" / "eval_lm_eval.py"
    model = tmp_path / "trial 0003"
    model.mkdir()
    base = f"{sys.executable} {script} --model {{model}} --output {{evaldir}} --lm-eval '{sys.executable} {fake}'"
    fields = {"model": str(model), "evaldir": str(tmp_path / "eval")}
    r = run_hook(render_command(base + " --tasks arc_challenge,gsm8k", fields), timeout=60)
    assert r.ok, r.reason + r.stderr_tail
    assert r.score == pytest.approx((0.6 + 0.3) / 2)
    assert r.metrics == {"arc_challenge/acc_norm,none": 0.6, "arc_challenge/acc_norm_stderr,none": 0.02,
                         "gsm8k/exact_match,strict-match": 0.3}
    assert "Tasks" in r.stderr_tail and "limit=8.0" in r.stderr_tail
    r = run_hook(render_command(base + " --tasks gsm8k,wikitext --metric gsm8k=exact_match,flexible-extract"
                                " --metric wikitext=word_perplexity", fields), timeout=60)
    assert r.ok and r.score == pytest.approx((0.4 - 12.0) / 2)
    r = run_hook(render_command(base + " --tasks wikitext", fields), timeout=60)
    assert r.status == "failed" and "no default metric" in r.reason


# ---------------------------------------------------------------------------------------------------------------
# the hook's group when bmm dies


def _spawn_bmm_like(tmp_path: Path, hook: str) -> tuple[subprocess.Popen, int]:
    """A Python process that runs ``hook`` with run_hook (as a trial would) and prints the hook's pid."""
    pidfile = tmp_path / "hook.pid"
    code = ("import sys; from bmm_cli.hooks import run_hook; "
            f"run_hook({hook!r}, env={{'BMM_RUN_ID': 'guard-test'}}, timeout=None, grace=0.5)")
    env = {**os.environ, "PIDFILE": str(pidfile)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, int(pidfile.read_text())


def _wait_dead(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not _dead(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _dead(pid)


@pytest.mark.parametrize("hook", ['echo $$ > "$PIDFILE"; sleep 300',
                                  'trap "" TERM; sleep 300 & echo $! > "$PIDFILE"; wait'])
def test_kill_9_of_bmm_stops_the_hooks_group(tmp_path, hook):
    """SIGKILL of the process running the hook: the guard stops the hook and its children (SIGKILL after the
    grace period for a hook that ignores SIGTERM); nothing is left for the next run to reap."""
    proc, pid = _spawn_bmm_like(tmp_path, hook)
    assert not _dead(pid)
    proc.kill()
    proc.wait(timeout=30)
    assert _wait_dead(pid)


def test_leftover_hooks_of_a_run_are_found_by_their_run_id(tmp_path):
    """A process of an earlier run that escaped its group (its own session) is stopped by kill_leftover_hooks."""
    from bmm_cli.search.state import kill_leftover_hooks

    env = {**os.environ, "BMM_RUN_ID": "leftover-test", "BMM_TRIAL": "3"}
    other = subprocess.Popen(["sleep", "300"], env={**env, "BMM_RUN_ID": "another-run"}, start_new_session=True)
    p = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    try:
        assert kill_leftover_hooks("leftover-test", grace=0.5, trial=4) == 0
        assert kill_leftover_hooks("leftover-test", grace=0.5, trial=3) == 1
        p.wait(timeout=30)
        assert other.poll() is None
    finally:
        for q in (p, other):
            q.kill()
            q.wait()

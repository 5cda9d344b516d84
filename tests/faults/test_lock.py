"""One process per work directory: a second `bmm` on the same --work refuses (exit 3, one line naming the holder);
a lock left by a SIGKILLed process is taken over (flock: the kernel drops it with the process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from ._util import ENV, argv, bmm_inproc, model_bytes

pytestmark = pytest.mark.slow


def _holder(lock):
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def test_second_process_refused_then_stale_lock_taken_over(ref, work_from, tmp_path, capsys):
    work = work_from("taskvec", "anchor-ties", "gram-free")
    fifo = tmp_path / "params.json"
    os.mkfifo(fifo)  # the first bmm blocks reading its --params while it holds the work lock
    out = tmp_path / "merged"
    first = subprocess.Popen(argv(["solve", "--work", work, "--anchor", "ties", "--params", fifo, "--out", out,
                                   "--device", "cpu"]),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = work / ".bmm.lock"
    try:
        t_end = time.monotonic() + 120
        while (_holder(lock) or {}).get("pid") != first.pid:
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < t_end, "the first bmm never took the lock"
            time.sleep(0.01)
        before = sorted(str(p) for p in work.rglob("*"))
        code, _, err = bmm_inproc(["gram", "--work", work, "--kind", "free", "--device", "cpu"], capsys)
        assert code == 3, err
        assert err.count("\n") == 1 and err.startswith("bmm: error: "), err
        assert str(work) in err and "in use by another bmm process" in err and f"pid {first.pid}" in err
        assert sorted(str(p) for p in work.rglob("*")) == before  # it touched nothing
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert _holder(lock)["pid"] == first.pid  # the lock file still names the dead process: a stale lock
    code, _, err = bmm_inproc(["solve", "--work", work, *ref.solve_args, "--out", out], capsys)
    assert code == 0, err
    assert "took over a stale lock" in err and f"pid {first.pid}" in err
    assert lock.read_text() == ""  # released at exit
    assert model_bytes(out) == model_bytes(ref.out)

"""The parent of every hook process: stops the hook's process group when bmm dies.

``python hook_guard.py PPID GRACE bash -c COMMAND`` runs as the leader of the hook's own session (so bmm's timeout
and cancel still stop the whole group at once), starts the command in that group and exits with its status (a
command killed by a signal is re-raised here, so the caller sees the same signal). When bmm itself is gone — even
after ``kill -9``, which bmm cannot catch — the guard sends SIGTERM to the group, then SIGKILL after GRACE seconds:
on Linux through the parent-death signal (``prctl(PR_SET_PDEATHSIG)``), elsewhere by polling the parent pid.

Standard library only, and run by path, not as ``-m bmm_cli...``: a hook must not pay for importing bmm.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def _stop_group(grace: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches the guard too
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.05)
                continue
        except ChildProcessError:
            break
    os.killpg(0, signal.SIGKILL)  # the guard goes with its group


def _watch_parent(ppid: int, grace: float) -> None:
    while True:
        if os.getppid() != ppid:
            _stop_group(grace)
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    ppid, grace, command = int(argv[0]), float(argv[1]), argv[2:]
    signal.signal(signal.SIGTERM, lambda *_: _stop_group(grace))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the polling thread below is the only watch
        pass
    if os.getppid() != ppid:  # bmm died before the death signal was armed
        _stop_group(grace)
    threading.Thread(target=_watch_parent, args=(ppid, grace), daemon=True).start()
    child = subprocess.Popen(command)
    rc = child.wait()
    if rc < 0:
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

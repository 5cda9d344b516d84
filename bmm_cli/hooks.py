"""Running the user's evaluation command (the "hook") for one search trial, safely.

Contract:

- The hook is a command *template*. ``{model}``, ``{trial}``, ``{workdir}`` (and any other field the caller
  gives) are substituted by :func:`render_command` so that each value reaches the hook as one literal word,
  whatever characters it holds (spaces, quotes, ``$(...)``, backticks). ``{{`` and ``}}`` are literal braces.
- :func:`run_hook` runs the rendered command with ``bash -c`` in a new session (its own process group), with a
  timeout that kills the whole group (SIGTERM, a grace period, SIGKILL), so children the hook forked die with it.
  stdout and stderr are read incrementally and capped (head + tail), so a hook that floods its output cannot
  exhaust memory.
- The score is the last non-empty stdout line: a number, or a JSON object with ``"score"`` (its other numeric
  keys are kept as metrics). Non-zero exit, timeout, no score, NaN or Inf make a failed trial with a precise reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import selectors
import shlex
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from bmm_cli.errors import InputError

__all__ = [
    "HookResult",
    "kill_process_group",
    "parse_score",
    "render_command",
    "run_hook",
    "score_from_value",
]

# ---------------------------------------------------------------------------------------------------------------
# rendering


# characters that need no quoting in any shell context (the set shlex.quote leaves bare)
_PLAIN = re.compile(r"[\w@%+=:,./-]*", re.ASCII)


def _is_plain(value: str) -> bool:
    return value != "" and _PLAIN.fullmatch(value) is not None


class _ShellScanner:
    """Tracks the bash quoting context of literal template text, one character at a time.

    Only as precise as it must be to place a value safely: a context it does not model well (inside ``$'...'``,
    backticks, ``${...}``, ``$((...))``, a comment, after a here-document ``<<``) is reported as "unsafe" and the
    caller refuses a non-plain value there instead of guessing.
    """

    def __init__(self) -> None:
        # frames: "top" | "cmd" ($( ... ), with paren depth) | "dq" | "sq" | "ansi" | "bq" | "param" | "arith"
        self.stack: list[list] = [["top", 0]]
        self.escape = False  # a backslash is pending: it would escape the next character
        self.comment = False
        self.heredoc = False
        self.prev = ""  # previous character (to tell `$(` from `(` and where a word starts)

    @property
    def frame(self) -> str:
        return self.stack[-1][0]

    def feed(self, text: str) -> None:
        i = 0
        n = len(text)
        while i < n:
            c = text[i]
            nxt = text[i + 1] if i + 1 < n else ""
            i += 1
            if self.comment:
                if c == "\n":
                    self.comment = False
                self.prev = c
                continue
            if self.escape:
                self.escape = False
                self.prev = "x"  # an escaped character is an ordinary one
                continue
            f = self.frame
            if f == "sq":
                if c == "'":
                    self.stack.pop()
            elif f == "ansi":
                if c == "\\":
                    self.escape = True
                elif c == "'":
                    self.stack.pop()
            elif f == "bq":
                if c == "\\":
                    self.escape = True
                elif c == "`":
                    self.stack.pop()
            elif f == "dq":
                if c == "\\":
                    self.escape = True
                elif c == '"':
                    self.stack.pop()
                else:
                    i = self._expansion(c, nxt, text, i)
            else:  # "top", "cmd", "param", "arith": unquoted word context
                if c == "\\":
                    self.escape = True
                elif c == "'":
                    if self.prev == "$":
                        self.stack.append(["ansi", 0])
                    else:
                        self.stack.append(["sq", 0])
                elif c == '"':
                    self.stack.append(["dq", 0])
                elif c in "`$":
                    i = self._expansion(c, nxt, text, i)
                elif c == "#" and self.prev in ("", " ", "\t", "\n", ";", "|", "&", "(") and f != "param":
                    self.comment = True
                elif c == "<" and nxt == "<":
                    self.heredoc = True
                elif c == "(":
                    self.stack[-1][1] += 1
                elif c == ")":
                    if self.stack[-1][1] > 0:
                        self.stack[-1][1] -= 1
                    elif f in ("cmd", "arith") and len(self.stack) > 1:
                        self.stack.pop()
                        if f == "arith" and i < n and text[i] == ")":
                            i += 1
                elif c == "}" and f == "param":
                    self.stack.pop()
            self.prev = c

    def _expansion(self, c: str, nxt: str, text: str, i: int) -> int:
        """Open a `$(`, `$((`, `${` or backtick frame (expansions work unquoted and in double quotes alike);
        ``i`` indexes the character after ``c``. Returns the index to continue from."""
        if c == "$" and nxt == "(":
            i += 1
            self._open_paren(text, i)
            if self.frame == "arith":
                i += 1
        elif c == "$" and nxt == "{":
            i += 1
            self.stack.append(["param", 0])
        elif c == "`":
            self.stack.append(["bq", 0])
        return i

    def _open_paren(self, text: str, i: int) -> None:
        # called with text[i-1] == "(" just consumed after "$"
        if i < len(text) and text[i] == "(":
            self.stack.append(["arith", 0])
        else:
            self.stack.append(["cmd", 0])

    def context(self) -> str:
        """'word' (unquoted), 'dq', 'sq', or 'unsafe' (a context we refuse to place non-plain values in)."""
        if self.comment or self.heredoc or self.escape:
            return "unsafe"
        f = self.frame
        if f in ("top", "cmd"):
            if self.prev == "$":
                return "unsafe"  # `${model}` would become `$'...'` (ANSI-C quoting)
            return "word"
        if f in ("dq", "sq"):
            return f
        return "unsafe"


def _place(value: str, ctx: str) -> str:
    """The shell text that makes ``value`` one literal word (or word part) in context ``ctx``."""
    if ctx == "word":
        return shlex.quote(value)
    if ctx == "dq":
        return re.sub(r'([\\"$`])', r"\\\1", value)
    if ctx == "sq":
        return "'" + shlex.quote(value) + "'"  # close the quote, the quoted value, reopen
    raise AssertionError(ctx)


def render_command(template: str, fields: Mapping[str, object]) -> str:
    """Substitute ``{name}`` placeholders in a hook command template with shell-safe values.

    Each value arrives in the hook as literal text: unquoted placeholders get ``shlex.quote``; a placeholder the
    user already wrapped in double or single quotes (``--model "{model}"``) is escaped for that context instead,
    so the quotes the user wrote do not end up inside the value. Values made only of ``[A-Za-z0-9_@%+=:,./-]``
    are inserted bare (safe in every context). ``{{`` and ``}}`` are literal braces.

    Raises :class:`InputError` for an unknown or malformed placeholder, or a non-plain value in a context that
    cannot hold it safely (backticks, ``$'...'``, ``${...}``, comments, here-documents, right after ``\\`` or ``$``).
    """
    values = {str(k): str(v) for k, v in fields.items()}
    valid = ", ".join("{" + k + "}" for k in values) or "(none)"
    for k, v in values.items():
        if "\x00" in v:
            raise InputError(f"hook field {{{k}}} contains a NUL byte, which no shell argument can hold")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(
            f"hook command {template!r}: {exc}; write literal braces as {{{{ and }}}}, placeholders as {valid}"
        ) from None
    scanner = _ShellScanner()
    out: list[str] = []
    for literal, name, spec, conv in parsed:
        out.append(literal)
        scanner.feed(literal)
        if name is None:
            continue
        if name == "" or name not in values:
            shown = "{" + (name or "") + "}"
            raise InputError(f"hook command: unknown placeholder {shown}; valid fields are {valid} "
                             "(write {{ for a literal brace)")
        if spec or conv:
            raise InputError(f"hook command: placeholder {{{name}}} takes no format spec or conversion; "
                             f"write it as {{{name}}}")
        value = values[name]
        if scanner.prev == "$" and not scanner.escape and scanner.frame not in ("sq", "ansi") and not scanner.comment:
            raise InputError(
                f"hook command: '${{{name}}}' would expand a shell variable; write the placeholder as {{{name}}}"
            )
        if _is_plain(value):
            text = value
        else:
            ctx = scanner.context()
            if ctx == "unsafe":
                raise InputError(
                    f"hook command: cannot place {{{name}}} safely where it stands (inside backticks, $'...', "
                    "${...}, "
                    f"a comment, a here-document, or right after '\\' or '$'); write it as a bare word, "
                    f"or use the environment variable (e.g. \"$BMM_MODEL\") instead"
                )
            text = _place(value, ctx)
        out.append(text)
        # the inserted text is closed in itself: it leaves the scanner's context unchanged
        scanner.prev = "x"
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------
# score parsing


def _tail_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[-1] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _flatten_metrics(obj: Mapping, prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v) if math.isfinite(v) else None
        elif isinstance(v, Mapping):
            out.update(_flatten_metrics(v, key + "/"))
    return out


def parse_score(stdout: str) -> tuple[float, dict[str, float | None]]:
    """Parse the hook's score from its stdout: the last non-empty line, a number or a JSON object with "score".

    Returns ``(score, metrics)``; metrics are the object's other numeric keys (nested objects flattened with
    ``/``; non-finite metrics kept as None). Raises ``ValueError`` with the reason when there is no valid score.
    """
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError('no output on stdout; the last line must be a number or a JSON object with "score"')
    last = lines[-1]
    shown = last if len(last) <= 120 else last[:117] + "..."
    value: object
    try:
        value = float(last)
    except ValueError:
        try:
            value = json.loads(last)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(
                f'last stdout line is not a number or a JSON object with "score": {shown!r}'
            ) from None
    return score_from_value(value, shown)


def score_from_value(value: object, shown: str | None = None, *, what: str = "the JSON object on the last stdout line",
                     ) -> tuple[float, dict[str, float | None]]:
    """A score and its metrics from what an evaluation returned: a number, or a mapping with ``"score"`` (its other
    numeric keys are the metrics, nested mappings flattened with ``/``). The in-memory scorers' return value and
    the hook's last stdout line obey the same rule. Raises ``ValueError`` with the reason when it is no score."""
    shown = repr(value)[:120] if shown is None else shown
    metrics: dict[str, float | None] = {}
    if isinstance(value, Mapping):
        if "score" not in value:
            keys = ", ".join(map(str, list(value)[:8])) or "none"
            raise ValueError(f'{what} has no "score" key (keys: {keys})')
        metrics = _flatten_metrics({k: v for k, v in value.items() if k != "score"})
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'"score" must be a number, got {type(value).__name__}: {shown!r}')
    score = float(value)
    if math.isnan(score):
        raise ValueError("score is NaN")
    if math.isinf(score):
        raise ValueError(f"score is {score}")
    return score, metrics


# ---------------------------------------------------------------------------------------------------------------
# running


@dataclass
class HookResult:
    """The outcome of one hook run.

    status: "ok" | "failed" | "timeout" | "cancelled" (the caller's cancel event was set; not the hook's fault).
    score: the parsed score (None unless ok). reason: why it is not ok ("" when ok). stderr_tail / stdout_tail: the
    last characters of each stream. seconds: wall time. returncode: the exit status (negative: killed by signal;
    None if it was never reaped).
    """

    status: str
    score: float | None = None
    metrics: dict = field(default_factory=dict)
    reason: str = ""
    stderr_tail: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    stdout_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Capture:
    """Bounded capture of a byte stream: the first ``limit/2`` bytes and the last ``limit/2`` bytes."""

    def __init__(self, limit: int):
        limit = max(int(limit), 2)
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_limit:  # amortized trim: memory stays below 3x the limit
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - min(len(self.tail), self.tail_limit)

    def last_bytes(self) -> bytes:
        """The end of the stream (the whole stream when nothing was dropped)."""
        tail = bytes(self.tail[-self.tail_limit :]) if self.tail else b""
        return bytes(self.head) + tail if self.dropped == 0 else tail

    def text(self) -> str:
        tail = bytes(self.tail[-self.tail_limit :]) if self.tail else b""
        if self.dropped:
            mid = f"\n[... {self.dropped} bytes not kept ...]\n".encode()
            return (bytes(self.head) + mid + tail).decode("utf-8", errors="replace")
        return (bytes(self.head) + tail).decode("utf-8", errors="replace")

    def tail_text(self, chars: int) -> str:
        return self.last_bytes()[-4 * chars :].decode("utf-8", errors="replace")[-chars:]


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens; split after the last ")"
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 3 and rest[2] == str(pgid) and rest[0] not in ("Z", "X"):
            return True
    return False


def kill_process_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group, wait up to ``grace`` seconds for it to go, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    end = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < end:
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    end = time.monotonic() + 5.0
    while time.monotonic() < end and _group_alive(pgid):
        time.sleep(0.02)


def _exited_unreaped(proc: subprocess.Popen) -> bool:
    """Whether the child exited, without reaping it: its pid (and so its process group id) stays reserved
    while it is a zombie, so killing the group afterwards cannot hit a reused id."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
    except (AttributeError, OSError):  # no waitid on this platform
        return proc.poll() is not None


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


GUARD = Path(__file__).with_name("hook_guard.py")


def _guard(grace: float) -> list[str]:
    """The :mod:`~bmm_cli.hook_guard` prefix: the hook's group dies with this process, even after ``kill -9``."""
    if not sys.executable:
        return []
    return [sys.executable, "-I", str(GUARD), str(os.getpid()), str(grace)]


def run_hook(
    command: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cwd: str | os.PathLike | None = None,
    stdout_limit: int = 1 << 20,
    stderr_limit: int | None = None,
    grace: float = 5.0,
    tail_chars: int = 4000,
    cancel: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
) -> HookResult:
    """Run ``command`` with ``bash -c`` in its own session and parse its score. The session's leader is
    :mod:`~bmm_cli.hook_guard`, which stops the group when this process dies (even by ``kill -9``).

    ``env``: variables set on top of the current environment. ``timeout``: seconds (None: no limit); on expiry the
    whole process group gets SIGTERM, then SIGKILL after ``grace`` seconds. When the hook's main process exits,
    whatever it left running in its group is stopped the same way. ``stdout_limit`` / ``stderr_limit``: bytes kept
    per stream (first half and last half; the rest is counted and dropped). ``cancel``: when set (from another
    thread), the group is killed and the result has status "cancelled". ``on_start(pgid)`` is called once the
    process has started. On KeyboardInterrupt (or any exception) in this thread the group is killed and the
    exception re-raised.
    """
    bash = shutil.which("bash") or "/bin/bash"
    if not os.path.exists(bash):
        raise InputError("hook: bash not found on PATH; the hook command runs with `bash -c`")
    full_env = dict(os.environ)
    if env:
        full_env.update({str(k): str(v) for k, v in env.items()})
    out_cap = _Capture(stdout_limit)
    err_cap = _Capture(stdout_limit if stderr_limit is None else stderr_limit)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [*_guard(grace), bash, "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=None if cwd is None else os.fspath(cwd),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return HookResult(status="failed", reason=f"could not start the hook: {exc}", seconds=time.monotonic() - start)
    pgid = proc.pid  # session leader: its pid is the group id
    sel = selectors.DefaultSelector()
    streams = {proc.stdout.fileno(): out_cap, proc.stderr.fileno(): err_cap}  # type: ignore[union-attr]
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)

    def pump(wait: float) -> None:
        for key, _ in sel.select(timeout=wait):
            try:
                data = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if data:
                streams[key.fd].feed(data)
            else:
                sel.unregister(key.fd)

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while sel.get_map() and time.monotonic() < end:
            pump(min(0.05, max(end - time.monotonic(), 0.0)))

    timed_out = cancelled = False
    try:
        if on_start is not None:
            on_start(pgid)
        deadline = None if timeout is None or not math.isfinite(timeout) else start + max(timeout, 0.0)
        while True:
            if cancel is not None and cancel.is_set():
                cancelled = True
                kill_process_group(pgid, grace)
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                kill_process_group(pgid, grace)
                break
            if _exited_unreaped(proc):
                # read what the hook wrote, then stop anything it left behind in its group
                drain(0.5)
                kill_process_group(pgid, min(grace, 2.0))
                break
            if sel.get_map():
                wait = 0.1 if deadline is None else min(0.1, max(deadline - now, 0.0))
                pump(wait)
            else:
                time.sleep(0.02)
        returncode = proc.wait()
        drain(1.0)  # pipes close once every holder is dead; a process that escaped the group may keep one open
    except BaseException:
        kill_process_group(pgid, min(grace, 1.0))
        try:
            proc.wait(timeout=5)
        except Exception:
            pass
        raise
    finally:
        sel.close()
        for fh in (proc.stdout, proc.stderr):
            try:
                fh.close()  # type: ignore[union-attr]
            except OSError:
                pass
    seconds = time.monotonic() - start
    stderr_tail = err_cap.tail_text(tail_chars)
    stdout_tail = out_cap.tail_text(tail_chars)
    res = HookResult(
        status="failed", stderr_tail=stderr_tail, stdout_tail=stdout_tail, seconds=seconds, returncode=returncode
    )
    last_err = _tail_line(stderr_tail)
    if cancelled:
        res.status, res.reason = "cancelled", "cancelled; process group killed"
        return res
    if timed_out:
        res.status = "timeout"
        res.reason = f"timed out after {timeout:g} s; process group killed"
        return res
    if returncode != 0:
        res.reason = _describe_exit(returncode) + (f": {last_err}" if last_err else "")
        return res
    try:
        score, metrics = parse_score(out_cap.last_bytes().decode("utf-8", errors="replace"))
    except ValueError as exc:
        res.reason = str(exc)
        if out_cap.dropped:
            res.reason += f" ({out_cap.total} bytes of stdout; only the first and last {out_cap.tail_limit} kept)"
        return res
    res.status, res.score, res.metrics = "ok", score, metrics
    return res

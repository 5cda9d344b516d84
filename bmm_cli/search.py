"""The Bayesian-optimization outer loop (paper Alg. 1), independent of how a merged model is produced.

Per trial: ask the optimizer for ``(s_b, λ_{b,g}[, ε])``, let the caller's ``materialize`` write the merged model,
run the user's evaluation hook on it (see :mod:`bmm_cli.hooks`), tell the optimizer the score. The result is the
best *observed* trial (never the surrogate's guess); trial 0 is the default point, so the search cannot return
anything worse than it.

State lives in ``WORKDIR/<state_name>/`` (``search`` by default; ``bmm search`` uses ``search-<anchor>-<gram>``):

- ``search.json``   manifest: space fingerprint, the caller's ``fingerprint_extra`` (anchor, Gram kind, inputs...),
                    direction, options, run id. A rerun with another space/extra/direction is refused unless ``force``.
- ``trials.jsonl``  one record per finished trial, appended atomically; the source of truth for resume.
- ``best.json``     the best trial so far (atomic). ``summary.json`` and ``convergence.png`` at the end / on Ctrl-C.
- ``eval/trial-NNNN/`` a scratch directory per trial for the hook's own outputs (``{evaldir}``).

Merged models are written to ``trial_dir/trial-NNNN/``; a new best is moved (or copied, across file systems) into
``out`` with a directory swap, so ``out`` always holds a complete model: the previous best or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import queue
import re
import shutil
import signal
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bmm_cli.atomic import append_line, fsync_dir, read_jsonl, write_json, write_with
from bmm_cli.errors import InputError, StateError
from bmm_cli.store import check_not_input
from bmm_cli.hooks import HookResult, kill_process_group, render_command, run_hook
from bmm_cli.progress import _enabled as _progress_enabled
from bmm_cli.progress import info, stderr

__all__ = [
    "LAM_GROUPS",
    "SearchResult",
    "SearchSpace",
    "plot_convergence",
    "run_search",
    "search",
]

LAM_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
MARKER = ".bmm-trial.json"  # written into every model this search puts into `out`
_TRIAL_RE = re.compile(r"^trial-(\d{4,})$")

# ---------------------------------------------------------------------------------------------------------------
# the search space


def _range(name: str, r: Sequence[float], *, positive: bool = False, unit: bool = False) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be two numbers (low, high), got {r!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"{name} must be finite with low <= high, got ({lo:g}, {hi:g})")
    if positive and lo <= 0:
        raise InputError(f"{name} is searched log-uniformly: its low end must be > 0, got {lo:g}")
    if unit and (lo < 0 or hi > 1):
        raise InputError(f"{name} must lie within [0, 1], got ({lo:g}, {hi:g})")
    return lo, hi


@dataclass(frozen=True)
class SearchSpace:
    """The BMM hyper-parameters: per block-group ``b`` a scale ``s_b`` (uniform) and one λ per module group
    (log-uniform), plus ε (uniform) for the hybrid Gram.

    Parameter names: ``s_{b}``, ``lam_{b}_{g}`` (g in ``lam_groups``), ``eps``. A range with low == high is a
    constant: it appears in the parameters but is not searched.
    """

    num_groups: int
    lam_groups: tuple[str, ...] = LAM_GROUPS
    scale_range: tuple[float, float] = (1.0, 1.3)
    lam_range: tuple[float, float] = (1e-4, 1.0)
    eps_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise InputError(f"the number of block-groups must be an integer >= 1, got {self.num_groups!r}")
        groups = tuple(str(g) for g in self.lam_groups)
        if not groups or len(set(groups)) != len(groups) or any(not re.fullmatch(r"\w+", g) for g in groups):
            raise InputError(f"λ groups must be distinct identifiers, got {self.lam_groups!r}")
        object.__setattr__(self, "lam_groups", groups)
        object.__setattr__(self, "scale_range", _range("scale range", self.scale_range))
        object.__setattr__(self, "lam_range", _range("λ range", self.lam_range, positive=True))
        if self.eps_range is not None:
            object.__setattr__(self, "eps_range", _range("ε range", self.eps_range, unit=True))

    # -- structure ---------------------------------------------------------------------------------------------

    def specs(self) -> list[tuple[str, float, float, str]]:
        """Every parameter as ``(name, low, high, prior)``, in the fixed order x uses."""
        out: list[tuple[str, float, float, str]] = []
        for b in range(self.num_groups):
            out.append((f"s_{b}", *self.scale_range, "uniform"))
            for g in self.lam_groups:
                out.append((f"lam_{b}_{g}", *self.lam_range, "log-uniform"))
        if self.eps_range is not None:
            out.append(("eps", *self.eps_range, "uniform"))
        return out

    @property
    def names(self) -> list[str]:
        """All parameter names (searched and constant)."""
        return [s[0] for s in self.specs()]

    @property
    def dim_names(self) -> list[str]:
        """The searched parameters (the coordinates of x), in order."""
        return [s[0] for s in self.specs() if s[1] < s[2]]

    def dimensions(self) -> list:
        """scikit-optimize dimensions of the searched parameters."""
        from skopt.space import Real

        return [Real(lo, hi, prior=prior, name=name) for name, lo, hi, prior in self.specs() if lo < hi]

    # -- conversions -------------------------------------------------------------------------------------------

    def to_params(self, x: Sequence[float]) -> dict[str, float]:
        """Named parameters from an optimizer point (constants filled in)."""
        specs = self.specs()
        searched = [s for s in specs if s[1] < s[2]]
        if len(x) != len(searched):
            raise InputError(f"a point of this search space has {len(searched)} coordinates, got {len(x)}")
        it = iter(float(v) for v in x)
        return {name: (next(it) if lo < hi else lo) for name, lo, hi, _ in specs}

    def from_params(self, params: Mapping[str, float]) -> list[float]:
        """The optimizer point of named parameters (constants are checked, not included)."""
        out = []
        for name, lo, hi, _ in self.specs():
            if name not in params:
                raise InputError(f"parameter {name} is missing (this space has: {', '.join(self.names)})")
            v = float(params[name])
            tol = 1e-9 * max(abs(lo), abs(hi), 1e-12)
            if not math.isfinite(v) or v < lo - tol or v > hi + tol:
                raise InputError(f"parameter {name}={v:g} lies outside its range [{lo:g}, {hi:g}]")
            if lo < hi:
                out.append(min(max(v, lo), hi))
        unknown = sorted(set(params) - set(self.names))
        if unknown:
            raise InputError(f"unknown parameter(s) {', '.join(unknown)} (this space has: {', '.join(self.names)})")
        return out

    def default_point(self, default_scale: float = 1.0, default_lam: float = 1.0, default_eps: float = 0.5) -> dict[str, float]:
        """A first trial inside the space: every s_b = ``default_scale``, every λ = ``default_lam``, ε =
        ``default_eps``, each clipped to its range.

        The default λ = 1 is the relative prior weight equal to the mean eigenvalue of Ĝ (``m = tr(G)/d_in``):
        data and anchor weighed evenly, whatever the model.
        """
        params = {}
        for name, lo, hi, prior in self.specs():
            v = default_scale if name.startswith("s_") else default_eps if name == "eps" else default_lam
            params[name] = float(min(max(float(v), lo), hi))
        return params

    def unpack(self, params: Mapping[str, float]) -> tuple[list[float], list[dict[str, float]], float | None]:
        """``(scales[b], lams[b][group], eps or None)`` from named parameters."""
        scales = [float(params[f"s_{b}"]) for b in range(self.num_groups)]
        lams = [{g: float(params[f"lam_{b}_{g}"]) for g in self.lam_groups} for b in range(self.num_groups)]
        eps = float(params["eps"]) if self.eps_range is not None else None
        return scales, lams, eps

    def describe(self) -> dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "lam_groups": list(self.lam_groups),
            "scale_range": list(self.scale_range),
            "lam_range": list(self.lam_range),
            "eps_range": None if self.eps_range is None else list(self.eps_range),
            "params": [list(s) for s in self.specs()],
        }

    def fingerprint(self) -> str:
        """A stable hash of the space (names, ranges, priors, order): equal spaces, equal fingerprints."""
        blob = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass
class SearchResult:
    best_trial: int | None
    best_score: float | None
    best_params: dict[str, float] | None
    n_ok: int
    n_failed: int
    records: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    model: Path | None = None  # where the best model lies: `out`, or its trial directory when no `out` was given


@dataclass
class _Outcome:
    trial: int
    x: list[float]
    params: dict[str, float]
    worker: int
    source: str
    model_dir: Path
    status: str = "failed"  # ok | failed | timeout | cancelled
    score: float | None = None
    metrics: dict = field(default_factory=dict)
    reason: str = ""
    stderr_tail: str = ""
    returncode: int | None = None
    seconds: dict = field(default_factory=dict)
    fatal: BaseException | None = None


# ---------------------------------------------------------------------------------------------------------------
# directory swap


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(src: Path, dst: Path) -> None:
    """Make ``dst`` hold what ``src`` holds; ``dst`` is never partial.

    ``src`` is renamed (or, across file systems, copied and fsynced) into a temp sibling of ``dst``, then swapped
    in: with an atomic exchange where the kernel has one, else old ``dst`` is renamed aside and the new one renamed
    into place (a crash between the two renames leaves the old one aside, which the next run restores).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.bmm-new-{tag}"
    try:
        os.rename(src, tmp)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        try:
            shutil.copytree(src, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_tree(tmp)
    if dst.exists():
        if _exchange(tmp, dst):
            fsync_dir(dst.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = dst.parent / f".{dst.name}.bmm-old-{tag}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    if src.exists():  # the copy case
        shutil.rmtree(src, ignore_errors=True)


def _recover_dir_swap(dst: Path) -> None:
    """Undo what a crash inside :func:`_replace_dir` left next to ``dst``."""
    olds = sorted(dst.parent.glob(f".{dst.name}.bmm-old-*"))
    if not dst.exists() and olds:
        os.rename(olds[-1], dst)  # the crash fell between the two renames: the old best comes back
        olds = olds[:-1]
        fsync_dir(dst.parent)
    for p in olds + sorted(dst.parent.glob(f".{dst.name}.bmm-new-*")):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# locks, leftovers


@contextlib.contextmanager
def _flock(path: Path, what: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StateError(f"another bmm search is running on {what} (lock {path}); wait for it or stop it") from None
        yield
    finally:
        os.close(fd)


def _kill_leftover_hooks(run_id: str, grace: float) -> int:
    """Kill hooks a killed earlier run of this search left running (found by BMM_RUN_ID in their environment)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return 0
    needle = f"BMM_RUN_ID={run_id}".encode()
    own = os.getpgid(0)
    groups = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            if needle in env.split(b"\0"):
                pg = os.getpgid(int(entry.name))
                if pg != own:
                    groups.add(pg)
        except (OSError, ValueError):
            continue
    for pg in groups:
        kill_process_group(pg, grace)
    return len(groups)


# ---------------------------------------------------------------------------------------------------------------
# live view


def _fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.5g}"


def _param_summary(params: Mapping[str, float], space: SearchSpace) -> str:
    """Compact key parameters: s and the geometric-mean λ per block-group (averaged when there are many)."""
    try:
        scales, lams, eps = space.unpack(params)
    except (KeyError, TypeError, ValueError):
        return ""
    glam = [math.exp(sum(math.log(v) for v in d.values()) / len(d)) for d in lams]
    if len(scales) <= 3:
        s_txt = "/".join(f"{s:.3f}" for s in scales)
        l_txt = "/".join(f"{v:.1e}" for v in glam)
    else:
        s_txt = f"{sum(scales) / len(scales):.3f}(mean)"
        l_txt = f"{math.exp(sum(math.log(v) for v in glam) / len(glam)):.1e}(gmean)"
    txt = f"s={s_txt} λ={l_txt}"
    if eps is not None:
        txt += f" ε={eps:.2f}"
    return txt


class _View:
    """A rich Live table on stderr (a TTY, progress enabled), else one line per finished trial."""

    def __init__(self, space: SearchSpace, trials: int, minimize: bool):
        self.space, self.trials, self.minimize = space, trials, minimize
        self.live_mode = _progress_enabled() and stderr.is_terminal
        self.lock = threading.Lock()
        self.done: list[dict] = []
        self.running: dict[int, tuple[float, dict, int]] = {}
        self.best: dict | None = None
        self.live = None

    def start(self, history: list[dict], best: dict | None) -> None:
        with self.lock:
            self.done = list(history[-10:])
            self.best = best
        if self.live_mode:
            from rich.live import Live

            self.live = Live(self, console=stderr, refresh_per_second=2, transient=False)
            self.live.start()

    def started(self, n: int, params: dict, worker: int) -> None:
        with self.lock:
            self.running[n] = (time.monotonic(), params, worker)

    def finished(self, rec: dict, best: dict | None, n_done: int) -> None:
        with self.lock:
            self.running.pop(rec["trial"], None)
            self.done = (self.done + [rec])[-10:]
            self.best = best
        if self.live is None:
            status = rec["status"]
            line = f"trial {rec['trial']:>4} [{n_done}/{self.trials}] {status:<7} score {_fmt_score(rec['score'])}"
            line += f"  {_param_summary(rec['params'], self.space)}  {rec['seconds'].get('total', 0.0):.1f}s"
            if status != "ok":
                line += f"  ({rec['reason']})"
            if best is not None:
                line += f"  | best {_fmt_score(best['score'])} (trial {best['trial']})"
            info(line)
        else:
            self.live.refresh()

    def cancelled(self, n: int) -> None:
        with self.lock:
            self.running.pop(n, None)

    def stop(self) -> None:
        if self.live is not None:
            with contextlib.suppress(Exception):
                self.live.refresh()
                self.live.stop()
            self.live = None

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        with self.lock:
            done, running, best = list(self.done), dict(self.running), self.best
        table = Table(title=f"bmm search ({'min' if self.minimize else 'max'}imize)", expand=False)
        for col in ("trial", "status", "score", "params", "solve", "write", "eval", "total"):
            table.add_column(col, justify="right" if col not in ("status", "params") else "left")
        for r in done:
            sec = r.get("seconds", {})
            style = "bold green" if best is not None and r["trial"] == best["trial"] else ("red" if r["status"] != "ok" else "")
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:40]}"
            table.add_row(
                str(r["trial"]), status, _fmt_score(r["score"]), _param_summary(r["params"], self.space),
                *(f"{sec[k]:.1f}" if isinstance(sec.get(k), (int, float)) else "-" for k in ("solve", "write", "eval", "total")),
                style=style,
            )
        now = time.monotonic()
        for n, (t0, params, worker) in sorted(running.items()):
            table.add_row(str(n), f"running (w{worker})", "", _param_summary(params, self.space), "", "", "", f"{now - t0:.0f}", style="cyan")
        line = Text("best: none yet") if best is None else Text(
            f"best: trial {best['trial']} score {_fmt_score(best['score'])}  {_param_summary(best['params'], self.space)}", style="bold"
        )
        return Group(table, line)


# ---------------------------------------------------------------------------------------------------------------
# plot


def plot_convergence(records: Sequence[Mapping], path: str | os.PathLike, *, minimize: bool = False) -> Path | None:
    """Write a PNG: each trial's score vs its number, the best-so-far line, failed trials as x at the bottom.

    Returns the path, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        info("convergence plot skipped: matplotlib is not installed (pip install 'bmm-cli[plot]')")
        return None
    recs = sorted(records, key=lambda r: r["trial"])
    ok = [(r["trial"], r["score"]) for r in recs if r.get("status") == "ok" and r.get("score") is not None]
    failed = [r["trial"] for r in recs if r.get("status") != "ok"]
    fig = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if ok:
        xs, ys = zip(*ok)
        ax.scatter(xs, ys, s=14, color="tab:blue", alpha=0.7, label="trial score")
        best, bx, by = None, [], []
        for t, s in ok:
            best = s if best is None else (min(best, s) if minimize else max(best, s))
            bx.append(t)
            by.append(best)
        last = recs[-1]["trial"] if recs else bx[-1]
        ax.step(bx + [last], by + [by[-1]], where="post", color="tab:orange", lw=2, label="best so far")
        lo, hi = min(ys), max(ys)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1e-3)
        bottom = lo - 2 * pad
        ax.set_ylim(bottom - pad, hi + 2 * pad)
    else:
        bottom = 0.0
    if failed:
        ax.scatter(failed, [bottom] * len(failed), marker="x", color="tab:red", s=30, label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("score (lower is better)" if minimize else "score (higher is better)")
    ax.set_title(f"bmm search: {len(ok)} ok, {len(failed)} failed")
    ax.grid(alpha=0.3)
    if ok or failed:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


# ---------------------------------------------------------------------------------------------------------------
# the search


def _normalize(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _same_x(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(float(u), float(v), rel_tol=1e-9, abs_tol=1e-12) for u, v in zip(a, b))


def _archive(sdir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    k = 0
    while (sdir / f"trials.{stamp}{'' if k == 0 else f'-{k}'}.jsonl").exists():
        k += 1
    stamp = stamp if k == 0 else f"{stamp}-{k}"
    for name in ("trials.jsonl", "best.json", "search.json", "summary.json"):
        p = sdir / name
        if p.exists():
            stem, dot, ext = name.partition(".")
            os.replace(p, sdir / f"{stem}.{stamp}.{ext}")
    with contextlib.suppress(FileNotFoundError):
        (sdir / "convergence.png").unlink()
    fsync_dir(sdir)
    return stamp


def _is_better(score: float, best: Mapping | None, minimize: bool) -> bool:
    if best is None:
        return True
    return score < best["score"] if minimize else score > best["score"]


def _load_records(path: Path) -> list[dict]:
    seen: set[int] = set()
    out = []
    for r in read_jsonl(path):
        n = r.get("trial")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n in seen:
            continue
        if not isinstance(r.get("x"), list) or r.get("status") not in ("ok", "failed", "timeout"):
            continue
        seen.add(n)
        out.append(r)
    return out


def run_search(
    *,
    space: SearchSpace,
    workdir: str | os.PathLike,
    materialize: Callable[[dict, Path, dict], Mapping[str, float] | None],
    hook: str,
    trials: int,
    initial: int = 10,
    seed: int = 0,
    timeout: float = 3600.0,
    minimize: bool = False,
    parallel: int = 1,
    gpus: Sequence[str] | None = None,
    trial_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    force: bool = False,
    first_point: Mapping[str, float] | None = None,
    fail_fast: int = 3,
    hook_cwd: str | os.PathLike | None = None,
    grace: float = 5.0,
    stdout_limit: int = 1 << 20,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    state_name: str = "search",
) -> SearchResult:
    """Run (or resume) the BMM hyper-parameter search; return the best observed trial.

    ``materialize(params, model_dir, env)`` writes the merged model for ``params`` into ``model_dir`` (created,
    empty) and returns timings such as ``{"solve_s": .., "write_s": ..}``; ``env`` holds BMM_MODEL, BMM_TRIAL,
    BMM_WORKER and the worker's CUDA_VISIBLE_DEVICES. It runs in a worker thread. An exception from it makes a
    failed trial, except :class:`InputError`/:class:`StateError` (configuration problems), which stop the search.

    ``hook``: the evaluation command template (see :func:`bmm_cli.hooks.render_command`) with ``{model}``,
    ``{trial}``, ``{workdir}``, ``{evaldir}``. ``trials``: the total number of trials, resumed ones included.
    ``initial``: random points before the GP takes over (trial 0, the default point, counts as one).
    ``first_point``: trial 0's parameters (default: ``space.default_point()``). ``gpus``: one CUDA_VISIBLE_DEVICES
    value per worker, round-robin (e.g. ``["0", "1"]`` or ``["0,1", "2,3"]``). ``trial_dir``: where trial models
    are written (default ``WORKDIR/<state_name>/trials``; tmpfs makes trials cheaper). ``out``: where the best model is
    kept (None: it stays in its trial directory). ``fingerprint_extra``: whatever else makes scores comparable
    (anchor, Gram kind, inputs' fingerprints); it must match on resume. ``force``: archive an earlier search's
    state and start fresh. ``fail_fast``: stop when this many trials of this run failed and none ever
    succeeded (0: never). ``optimizer_kwargs``: overrides for ``skopt.Optimizer``.

    Ctrl-C (and SIGTERM): running hooks are killed, the state written so far stays valid, the summary and plot
    are written, and KeyboardInterrupt is raised. A rerun resumes.
    """
    # -- validate ----------------------------------------------------------------------------------------------
    if not isinstance(space, SearchSpace):
        raise InputError("space must be a SearchSpace")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"--trials must be an integer >= 1, got {trials!r}")
    if isinstance(initial, bool) or not isinstance(initial, int) or initial < 0:
        raise InputError(f"--initial must be an integer >= 0, got {initial!r}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise InputError(f"--parallel must be an integer >= 1, got {parallel!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InputError(f"--timeout must be > 0 seconds, got {timeout!r}")
    if not isinstance(hook, str) or not hook.strip():
        raise InputError("the evaluation hook command is empty")
    gpus = [str(g).strip() for g in gpus] if gpus else None
    if gpus is not None and any(not g for g in gpus):
        raise InputError("--gpus has an empty entry; give e.g. 0,1 (one per worker) or '0,1;2,3'")
    if not space.dim_names:
        raise InputError("the search space has no searched parameter (every range has low == high)")

    workdir = Path(workdir).resolve()
    sdir = workdir / state_name
    trial_dir = (Path(trial_dir) if trial_dir is not None else sdir / "trials").resolve()
    out = Path(out).resolve() if out is not None else None
    if out is not None:
        if out == workdir or out in workdir.parents or out == sdir or sdir in out.parents:
            raise InputError(f"--out {out} must not be the work directory or its search state")
        if out == trial_dir or out in trial_dir.parents or trial_dir in out.parents:
            raise InputError(f"--out {out} and the trial directory {trial_dir} must not contain each other")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
    extra = _normalize(dict(fingerprint_extra or {}))
    first = dict(first_point) if first_point is not None else space.default_point()
    first_x = space.from_params(first)

    sdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        locks.enter_context(_flock(sdir / ".lock", f"work directory {workdir}"))
        trial_dir.mkdir(parents=True, exist_ok=True)
        if trial_dir != sdir / "trials":
            locks.enter_context(_flock(trial_dir / ".bmm-lock", f"trial directory {trial_dir}"))
            owner = trial_dir / ".bmm-owner"
            if owner.exists() and owner.read_text().strip() not in ("", str(sdir)):
                raise StateError(
                    f"trial directory {trial_dir} belongs to the search in {owner.read_text().strip()}; "
                    f"choose another --trial-dir (or delete {owner})"
                )
            owner.write_text(str(sdir) + "\n")
        if out is not None and out.exists():
            _recover_dir_swap(out)
            if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
                raise InputError(
                    f"--out {out} is a non-empty directory this search did not write; remove it or choose another"
                )
        return _run_locked(
            space=space, workdir=workdir, sdir=sdir, materialize=materialize, hook=hook, trials=trials,
            initial=initial, seed=seed, timeout=float(timeout), minimize=minimize, parallel=parallel, gpus=gpus,
            trial_dir=trial_dir, out=out, extra=extra, force=force, first=first, first_x=first_x,
            fail_fast=fail_fast, hook_cwd=hook_cwd, grace=grace, stdout_limit=stdout_limit,
            optimizer_kwargs=dict(optimizer_kwargs or {}),
        )


def _run_locked(
    *, space, workdir, sdir, materialize, hook, trials, initial, seed, timeout, minimize, parallel, gpus,
    trial_dir, out, extra, force, first, first_x, fail_fast, hook_cwd, grace, stdout_limit, optimizer_kwargs,
) -> SearchResult:
    trials_path, best_path, manifest_path = sdir / "trials.jsonl", sdir / "best.json", sdir / "search.json"

    # -- manifest: resume or refuse ----------------------------------------------------------------------------
    # fail early on a hook template that cannot be rendered, before anything is written or made
    render_command(hook, _fields(workdir, sdir, trial_dir, 0))
    old = None
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
    records = _load_records(trials_path)
    if old and old.get("run_id"):
        killed = _kill_leftover_hooks(str(old["run_id"]), grace)
        if killed:
            info(f"search: stopped {killed} hook process group(s) left running by an interrupted earlier run")
    if (trials_path.exists() or old is not None) and force:
        stamp = _archive(sdir)
        info(f"search: --force: earlier search state archived as {sdir}/*.{stamp}.*; starting fresh")
        old, records = None, []
    elif records:
        if old is None:
            raise StateError(f"{manifest_path} is missing or unreadable but {trials_path} has trials; "
                             f"rerun with --force to archive them and start fresh")
        diffs = []
        if old.get("space_fingerprint") != space.fingerprint():
            diffs.append("search space")
        old_extra = old.get("extra", {})
        for k in sorted(set(old_extra) | set(extra)):
            if old_extra.get(k) != extra.get(k):
                diffs.append(f"{k} ({old_extra.get(k)!r} -> {extra.get(k)!r})")
        if bool(old.get("minimize")) != bool(minimize):
            diffs.append("direction (--minimize)")
        if diffs:
            raise StateError(
                f"the search in {sdir} was run with a different {', '.join(diffs)}; rerun with --force to archive "
                f"it and start fresh, or use another work directory"
            )
        opts = old.get("options", {})
        if opts.get("hook") not in (None, hook):
            info(f"search: note: the hook command changed since the earlier trials ({opts.get('hook')!r}); their scores are kept")
        if opts.get("seed") not in (None, seed):
            info(f"search: note: --seed changed ({opts.get('seed')} -> {seed}); the resumed proposals differ from an uninterrupted run")
    elif old is not None and (old.get("space_fingerprint") != space.fingerprint() or old.get("extra") != extra
                              or bool(old.get("minimize")) != bool(minimize)):
        old = None  # an earlier start with other settings that recorded no trial: nothing to keep
    run_id = (old or {}).get("run_id") or uuid.uuid4().hex
    manifest = {
        "version": 1,
        "run_id": run_id,
        "space_fingerprint": space.fingerprint(),
        "space": space.describe(),
        "extra": extra,
        "minimize": bool(minimize),
        "options": {
            "trials": trials, "initial": initial, "seed": seed, "hook": hook, "timeout": timeout,
            "parallel": parallel, "gpus": gpus, "trial_dir": str(trial_dir), "out": None if out is None else str(out),
            "first_point": first,
        },
        "created": (old or {}).get("created") or _now(),
        "updated": _now(),
    }
    write_json(manifest_path, manifest)

    def better_of(recs):
        best = None
        for r in recs:
            if r["status"] == "ok" and r.get("score") is not None and _is_better(r["score"], best, minimize):
                best = r
        return best

    best = better_of(records)

    # -- bring `out` and the trial directory in line with the records -------------------------------------------
    def model_env(n: int, worker: int) -> dict[str, str]:
        env = {
            "BMM_MODEL": str(trial_dir / f"trial-{n:04d}"),
            "BMM_TRIAL": str(n),
            "BMM_WORKDIR": str(workdir),
            "BMM_EVAL_DIR": str(sdir / "eval" / f"trial-{n:04d}"),
            "BMM_WORKER": str(worker),
            "BMM_RUN_ID": run_id,
        }
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[worker % len(gpus)]
        return env

    def mark(model_dir: Path, rec: dict) -> None:
        write_json(model_dir / MARKER, {"run_id": run_id, "trial": rec["trial"], "score": rec["score"], "params": rec["params"]})

    def write_best(rec: dict | None) -> None:
        if rec is None:
            return
        write_json(best_path, {
            "trial": rec["trial"], "score": rec["score"], "params": rec["params"], "x": rec["x"],
            "metrics": rec.get("metrics", {}), "seconds": rec.get("seconds", {}),
            "model": str(out if out is not None else trial_dir / f"trial-{rec['trial']:04d}"),
            "minimize": bool(minimize), "run_id": run_id, "time": _now(),
        })

    if best is not None:
        src = trial_dir / f"trial-{best['trial']:04d}"
        holder = out if out is not None else src
        try:
            held = json.loads((holder / MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            held = {}
        if held.get("run_id") != run_id or held.get("trial") != best["trial"]:
            if src.is_dir() and any(src.iterdir()):
                # its record exists, so materialize and the hook had finished: the directory is complete
                if out is not None:
                    info(f"search: finishing the move of best trial {best['trial']} into {out}")
            else:
                info(f"search: re-making best trial {best['trial']}'s model (interrupted before it was kept)")
                # made under a temp name and renamed: a directory named trial-NNNN with a record is complete
                tmp = trial_dir / f".remake-{best['trial']:04d}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(src, ignore_errors=True)
                tmp.mkdir(parents=True)
                materialize(dict(best["params"]), tmp, {**model_env(best["trial"], 0), "BMM_MODEL": str(tmp)})
                os.rename(tmp, src)
            mark(src, best)
            if out is not None:
                _replace_dir(src, out)
        write_best(best)
    keep = None if out is not None or best is None else f"trial-{best['trial']:04d}"
    for p in trial_dir.iterdir():
        if (_TRIAL_RE.match(p.name) and p.name != keep) or p.name.startswith(".remake-"):
            shutil.rmtree(p, ignore_errors=True)

    # -- optimizer: a fresh one that replays the history ------------------------------------------------------
    opt_kw = {"base_estimator": "GP", "acq_func": "EI", "n_initial_points": initial, "random_state": seed}
    opt_kw.update(optimizer_kwargs)
    from skopt import Optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Optimizer(space.dimensions(), **opt_kw)
        _replay(opt, records)

    done = {r["trial"] for r in records}
    todo = [n for n in range(trials) if n not in done]
    if records:
        n_ok = sum(r["status"] == "ok" for r in records)
        info(f"search: resuming: {len(records)} trial(s) on record ({n_ok} ok), {len(todo)} to go"
             + (f"; best so far {best['score']:.6g} (trial {best['trial']})" if best else ""))

    # -- the loop ---------------------------------------------------------------------------------------------
    cancel = threading.Event()
    results: queue.Queue[_Outcome] = queue.Queue()
    in_flight: dict[int, _Outcome] = {}
    free = list(range(parallel))
    view = _View(space, trials, minimize)
    state = {"best": best, "session_failed": 0}
    rec_lock = threading.Lock()

    def worst_y() -> float | None:
        ys = [r["y"] for r in records if r["status"] == "ok" and r.get("y") is not None]
        return max(ys) if ys else None

    def handle(o: _Outcome) -> None:
        in_flight.pop(o.trial, None)
        free.append(o.worker)
        free.sort()
        if o.status == "cancelled":
            view.cancelled(o.trial)
            shutil.rmtree(o.model_dir, ignore_errors=True)
            return
        if o.fatal is not None:
            shutil.rmtree(o.model_dir, ignore_errors=True)
            raise o.fatal
        ok = o.status == "ok"
        # skopt minimizes: y = -score unless --minimize.
        # A failed trial is told the worst score seen so far (not skipped): an untold point leaves the GP and its
        # acquisition maximum unchanged, so skopt would propose the very same (failing) point again; a penalty at
        # the worst *observed* value steers the search away from a region that fails (bad λ -> broken model,
        # OOM, a hook that cannot parse the output) without distorting the GP's scale the way -inf or a huge
        # constant would. Flaky, region-independent failures cost a little: the GP's noise term absorbs one odd
        # point. Before any trial succeeded there is no worst score: the point is not told (the optimizer is
        # still drawing random initial points then, so nothing repeats).
        y = (score_to_y(o.score) if ok else worst_y())
        rec = {
            "trial": o.trial,
            "params": o.params,
            "x": [float(v) for v in o.x],
            "score": o.score if ok else None,
            "metrics": o.metrics,
            "status": o.status,
            "reason": o.reason,
            "stderr_tail": o.stderr_tail,
            "seconds": o.seconds,
            "worker": o.worker,
            "time": _now(),
            "source": o.source,
            "y": y,
            "returncode": o.returncode,
        }
        with rec_lock:
            append_line(trials_path, json.dumps(rec, allow_nan=False, ensure_ascii=False))
            records.append(rec)
        improved = ok and _is_better(o.score, state["best"], minimize)
        if improved:
            prev = state["best"]
            state["best"] = rec
            mark(o.model_dir, rec)
            if out is not None:
                _replace_dir(o.model_dir, out)
            write_best(rec)
            if out is None and prev is not None:
                shutil.rmtree(trial_dir / f"trial-{prev['trial']:04d}", ignore_errors=True)
        else:
            shutil.rmtree(o.model_dir, ignore_errors=True)
        if not ok:
            state["session_failed"] += 1
        view.finished(rec, state["best"], len(records))
        if y is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.tell(rec["x"], y)
        if fail_fast and state["session_failed"] >= fail_fast and not any(r["status"] == "ok" for r in records):
            raise InputError(
                f"{state['session_failed']} trials failed and none has succeeded (trial {o.trial}: {o.reason}); "
                f"check the hook by running it by hand on a model, then rerun (it resumes)"
            )

    def score_to_y(score: float) -> float:
        return float(score) if minimize else -float(score)

    def launch(numbers: list[int]) -> None:
        pending = [o.x for o in in_flight.values()]
        proposals: list[tuple[list[float], str]] = []
        asks = [n for n in numbers if n != 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if 0 in numbers:
                pending = pending + [first_x]
            xs, source = _propose(opt, len(asks), pending)
        it = iter(xs)
        for n in numbers:
            proposals.append((list(first_x), "first") if n == 0 else (list(next(it)), source))
        for n, (x, src) in zip(numbers, proposals):
            worker = free.pop(0)
            params = space.to_params(x)
            o = _Outcome(trial=n, x=[float(v) for v in x], params=params, worker=worker, source=src,
                         model_dir=trial_dir / f"trial-{n:04d}")
            in_flight[n] = o
            view.started(n, params, worker)
            threading.Thread(
                target=_trial_worker, name=f"bmm-trial-{n}", daemon=True,
                kwargs=dict(o=o, materialize=materialize, hook=hook, env=model_env(n, worker),
                            fields=_fields(workdir, sdir, trial_dir, n), timeout=timeout, cancel=cancel,
                            results=results, cwd=hook_cwd, grace=grace, stdout_limit=stdout_limit),
            ).start()

    fatal: BaseException | None = None
    ending = "finished"
    old_term = None
    o: _Outcome | None = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _on_term)
    view.start(records, best)
    try:
        while True:
            while free and todo:
                k = min(len(free), len(todo))
                numbers, todo[:] = todo[:k], todo[k:]
                launch(numbers)
            if not in_flight:
                break
            try:
                o = results.get(timeout=0.5)
            except queue.Empty:
                continue
            handle(o)
            o = None
    except BaseException as exc:  # Ctrl-C, SIGTERM, fail-fast, a fatal error from a worker
        fatal = exc
        ending = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
        cancel.set()
        if o is not None and o.trial in in_flight:
            results.put(o)  # fetched but not handled when the interrupt came
        if in_flight:
            info(f"search: {ending}: stopping {len(in_flight)} running trial(s)...")
        # running hooks are killed within a moment; a trial still in materialize is waited for (bounded)
        deadline = time.monotonic() + max(30.0, grace + 10.0)
        try:
            while in_flight and time.monotonic() < deadline:
                try:
                    o = results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if o.fatal is None and o.status != "cancelled":
                    with contextlib.suppress(Exception):
                        handle(o)  # it finished before the stop: keep it
                        continue
                in_flight.pop(o.trial, None)
                view.cancelled(o.trial)
                shutil.rmtree(o.model_dir, ignore_errors=True)
        except KeyboardInterrupt:
            info("search: second interrupt: not waiting for running trials")
        if in_flight:
            info(f"search: left {len(in_flight)} unfinished trial(s) behind; a rerun redoes them")
    finally:
        view.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        result = _finish(sdir, records, state["best"], trials, minimize, out, trial_dir, ending)
    if fatal is not None:
        raise fatal
    return result


def _fields(workdir: Path, sdir: Path, trial_dir: Path, n: int) -> dict[str, str]:
    return {
        "model": str(trial_dir / f"trial-{n:04d}"),
        "trial": str(n),
        "workdir": str(workdir),
        "evaldir": str(sdir / "eval" / f"trial-{n:04d}"),
    }


def _replay(opt, records: list[dict]) -> None:
    """Tell a fresh optimizer the recorded history so that it continues as the interrupted one would have.

    A sequential history is replayed ask-for-ask (an ``ask`` before each recorded asked point, then ``tell``):
    the optimizer's random state advances exactly as in the original run, so the next proposals match an
    uninterrupted run; each re-asked point is checked against the record. A history with parallel (constant
    liar) proposals cannot be reproduced that way: it is told in one batch.
    """
    if all(r.get("source") in ("first", "ask") for r in records):
        diverged = False
        for r in records:
            if r.get("source") == "ask" and not diverged:
                again = opt.ask()
                if not _same_x(again, r["x"]):
                    diverged = True
                    info(f"search: note: replaying the history diverged at trial {r['trial']} (another seed or "
                         f"library version?); continuing from the recorded points")
            if r.get("y") is not None:
                opt.tell(r["x"], r["y"])
    else:
        told = [(r["x"], r["y"]) for r in records if r.get("y") is not None]
        if told:
            xs, ys = zip(*told)
            opt.tell(list(xs), list(ys))


def _propose(opt, k: int, pending: list[list[float]]) -> tuple[list[list[float]], str]:
    """``k`` new points. With nothing in flight and k == 1, a plain ``ask`` (the deterministic sequential path).
    Otherwise constant liar (cl_min, as ``ask(n_points=k, strategy="cl_min")``), extended to the points still in
    flight: a copy of the optimizer is told the lie at those points too, so a freed worker never gets a point
    next to one already running."""
    if k <= 0:
        return [], "ask"
    if not pending and k == 1:
        return [opt.ask()], "ask"
    if not pending:
        return [list(x) for x in opt.ask(n_points=k, strategy="cl_min")], "ask-cl"
    import numpy as np

    tmp = opt.copy(random_state=opt.rng.randint(0, np.iinfo(np.int32).max))
    lie = float(np.min(opt.yi)) if opt.yi else 0.0
    tmp.tell([list(p) for p in pending], [lie] * len(pending))
    xs = []
    for i in range(k):
        x = tmp.ask()
        xs.append(list(x))
        if i + 1 < k:
            tmp.tell(list(x), lie)
    return xs, "ask-cl"


def _trial_worker(*, o: _Outcome, materialize, hook, env, fields, timeout, cancel, results, cwd, grace, stdout_limit) -> None:
    """One trial in a worker thread: materialize, run the hook, report an _Outcome (never raises)."""
    t0 = time.monotonic()
    try:
        shutil.rmtree(o.model_dir, ignore_errors=True)
        o.model_dir.mkdir(parents=True)
        eval_dir = Path(fields["evaldir"])
        shutil.rmtree(eval_dir, ignore_errors=True)
        eval_dir.mkdir(parents=True)
        t_m = time.monotonic()
        try:
            timings = materialize(dict(o.params), o.model_dir, dict(env)) or {}
        except Exception as exc:
            # configuration problems (InputError/StateError) and a full disk would fail every trial the same way:
            # they stop the search. Anything else (numerics, GPU OOM, ...) is this trial's failure: recorded.
            if isinstance(exc, (InputError, StateError)) or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                o.fatal = exc
                return
            o.status = "failed"
            o.reason = f"materialize failed: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
            o.stderr_tail = "".join(traceback.format_exception(exc))[-2000:]
            o.seconds = {"materialize": time.monotonic() - t_m, "total": time.monotonic() - t0}
            return
        seconds = {"materialize": time.monotonic() - t_m}
        for key, val in dict(timings).items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                seconds[key[:-2] if key.endswith("_s") else key] = float(val)
        if cancel.is_set():
            o.status = "cancelled"
            return
        res: HookResult = run_hook(
            render_command(hook, fields), env=env, timeout=timeout, cwd=cwd, stdout_limit=stdout_limit,
            grace=grace, cancel=cancel, tail_chars=2000,
        )
        seconds["eval"] = res.seconds
        seconds["total"] = time.monotonic() - t0
        o.status = res.status
        o.score, o.metrics, o.reason = res.score, res.metrics, res.reason
        o.stderr_tail, o.returncode, o.seconds = res.stderr_tail, res.returncode, seconds
    except BaseException as exc:  # our own failure (disk full, ...): stop the search with it
        o.fatal = exc
    finally:
        results.put(o)


def _finish(sdir: Path, records: list[dict], best: dict | None, trials: int, minimize: bool, out: Path | None,
            trial_dir: Path, ending: str) -> SearchResult:
    n_ok = sum(r["status"] == "ok" for r in records)
    n_failed = len(records) - n_ok
    model = None
    if best is not None:
        model = out if out is not None else trial_dir / f"trial-{best['trial']:04d}"
    summary = {
        "state": ending if ending != "finished" or len({r["trial"] for r in records}) >= trials else "stopped",
        "trials": trials,
        "n_ok": n_ok,
        "n_failed": n_failed,
        "best_trial": None if best is None else best["trial"],
        "best_score": None if best is None else best["score"],
        "best_params": None if best is None else best["params"],
        "model": None if model is None else str(model),
        "minimize": bool(minimize),
        "time": _now(),
    }
    with contextlib.suppress(OSError):
        write_json(sdir / "summary.json", summary)
    try:
        plot_convergence(records, sdir / "convergence.png", minimize=minimize)
    except Exception as exc:  # a plot must never cost the search its result
        info(f"convergence plot failed: {exc}")
    if best is not None:
        info(f"search: best score {best['score']:.6g} at trial {best['trial']} ({n_ok} ok, {n_failed} failed); model: {model}")
    else:
        info(f"search: no successful trial ({n_failed} failed)")
    return SearchResult(
        best_trial=None if best is None else best["trial"],
        best_score=None if best is None else best["score"],
        best_params=None if best is None else dict(best["params"]),
        n_ok=n_ok,
        n_failed=n_failed,
        records=sorted(records, key=lambda r: r["trial"]),
        best_metrics={} if best is None else dict(best.get("metrics") or {}),
        model=model,
    )


# ---------------------------------------------------------------------------------------------------------------
# `bmm search`: the loop above wired to the cached BMM solver


def parse_range(text: str, what: str) -> tuple[float, float]:
    """'1.0:1.3' -> (1.0, 1.3); a single number is a constant (not searched)."""
    lo, sep, hi = str(text).partition(":")
    try:
        a = float(lo)
        b = float(hi) if sep else a
    except ValueError:
        raise InputError(f"--{what} {text!r}: expected LOW:HIGH, e.g. 1e-4:1, or one number") from None
    if b < a:
        raise InputError(f"--{what} {text!r}: LOW must not exceed HIGH")
    return a, b


def state_dir_name(anchor: str, gram: str) -> str:
    """One search state per (anchor, Gram kind) in a work directory, so searches of several variants coexist."""
    return f"search-{anchor}-{gram}"


def search(
    work: str | os.PathLike,
    anchor: str,
    gram: str,
    eval_cmd: str,
    *,
    out: str | os.PathLike,
    trials: int = 100,
    blocks: int = 3,
    scale: str = "1.0:1.3",
    lam: str = "1e-4:1",
    epsilon: str = "0:1",
    initial: int = 10,
    seed: int = 0,
    timeout: float = 3600.0,
    parallel: int = 1,
    gpus: Sequence[str] | None = None,
    minimize: bool = False,
    trial_dir: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    factor_dtype: str = "float32",
    compute: str = "fp32",
    force: bool = False,
) -> dict:
    """Bayesian optimization of block-tied (s, λ[, ε]) with the user's evaluation command as the objective."""
    from .solve import DEFAULT_EPS, DEFAULT_LAM, DEFAULT_SCALE, Merger, Params

    space = SearchSpace(num_groups=blocks, scale_range=parse_range(scale, "scale"), lam_range=parse_range(lam, "lam"),
                        eps_range=parse_range(epsilon, "epsilon") if gram == "hybrid" else None)
    first = space.default_point(default_scale=DEFAULT_SCALE, default_lam=DEFAULT_LAM, default_eps=DEFAULT_EPS)
    merger = Merger(Path(work), anchor, gram, device=device, dtype=dtype, max_shard_size=max_shard_size,
                    factor_dtype=factor_dtype, compute=compute)
    if out is not None:
        check_not_input(Path(out), merger.src.proj.inputs())
    lock = threading.Lock()  # one solve at a time (they share the device); evaluations run in parallel

    def materialize(params: dict, model_dir: Path, env: dict) -> dict:
        scales, lams, eps = space.unpack(params)
        with lock:
            return merger.write(Params(scales, lams, eps), model_dir,
                                extra={"trial": int(env.get("BMM_TRIAL", -1))})

    try:
        res = run_search(space=space, workdir=work, materialize=materialize, hook=eval_cmd, trials=trials,
                         state_name=state_dir_name(anchor, gram),
                         initial=initial, seed=seed, timeout=timeout, minimize=minimize, parallel=parallel, gpus=gpus,
                         trial_dir=trial_dir, out=out, force=force, first_point=first,
                         fingerprint_extra={**merger.src.fingerprint, "gram": gram, "blocks": blocks})
    finally:
        merger.close()
    ok = [r for r in res.records if r.get("status") == "ok"]
    first_rec = next((r for r in res.records if r.get("trial") == 0), None)
    overhead = [r["seconds"].get("solve", 0) + r["seconds"].get("write", 0) for r in res.records
                if isinstance(r.get("seconds"), dict)]
    return {
        "best_trial": res.best_trial,
        "best_score": res.best_score,
        "best_params": res.best_params,
        "best_metrics": res.best_metrics,
        "first_score": first_rec.get("score") if first_rec else None,
        "model": str(res.model) if res.model else None,
        "trials_ok": res.n_ok,
        "trials_failed": res.n_failed,
        "trials": len(res.records),
        "mean_overhead_s": round(sum(overhead) / len(overhead), 4) if overhead else None,
        "best_json": str(Path(work) / state_dir_name(anchor, gram) / "best.json"),
        "ok": len(ok),
    }

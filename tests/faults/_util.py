"""Helpers of the fault-injection suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bmm_cli.store import read_header


def _root_conftest():
    """tests/conftest.py's helpers (tiny_model, perturb, save, calib_texts, write_calib_files), loaded by path: a plain
    `from conftest import ...` gets whichever conftest.py was imported last under that name."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_bmm_tests_root_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_root = _root_conftest()
calib_texts, perturb, save, tiny_model = _root.calib_texts, _root.perturb, _root.save, _root.tiny_model
write_calib_files = _root.write_calib_files

# subprocesses: one intra-op thread (bytes comparable with the in-process reference), no progress bars
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", BMM_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
ENV.pop("BMM_FAULT", None)
SOLVE_ARGS = ["--anchor", "ties", "--gram", "free", "--lam", "0.05", "--max-shard-size", "30KB", "--device", "cpu"]


def argv(args) -> list[str]:
    return [sys.executable, "-m", "bmm_cli.cli", *map(str, args)]


def bmm_killed(args, fault: str) -> subprocess.CompletedProcess:
    """Run ``bmm args`` in a subprocess with BMM_FAULT=fault and check it died by SIGKILL."""
    p = subprocess.run(argv(args), env=dict(ENV, BMM_FAULT=fault), capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, f"expected a SIGKILL at {fault}, got rc {p.returncode}: {p.stderr}"
    return p


def bmm_killed_when(args, path: Path, *, delay: float = 0.0, timeout: float = 120) -> subprocess.Popen:
    """Start ``bmm args``; SIGKILL it as soon as ``path`` exists (plus ``delay`` seconds). Returns the process
    (its returncode tells whether the kill landed before it finished by itself)."""
    p = subprocess.Popen(argv(args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_end = time.monotonic() + timeout
    try:
        while not path.exists():
            if p.poll() is not None:
                raise AssertionError(f"bmm exited ({p.returncode}) before {path} appeared: {p.stderr.read()}")
            if time.monotonic() > t_end:
                raise AssertionError(f"{path} did not appear within {timeout} s")
            time.sleep(0.002)
        if delay:
            time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=60)
    return p


def bmm_inproc(args, capsys) -> tuple[int, str, str]:
    """Run ``bmm args`` in this process (no interpreter start-up); returns (exit code, stdout, stderr)."""
    from bmm_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main([str(a) for a in args])
    out = capsys.readouterr()
    code = ei.value.code
    return (0 if code is None else int(code)), out.out, out.err


def bmm_ok(args, capsys) -> str:
    code, out, err = bmm_inproc(args, capsys)
    assert code == 0, err
    return out


def shard_bytes(d: Path) -> dict[str, bytes]:
    """name -> bytes of every safetensors file (model or stage shard) directly in ``d``."""
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def model_bytes(d: Path) -> dict[str, bytes]:
    """Deterministic files of a model directory (README.md and bmm_merge.json name paths: left out)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.is_file() and p.name not in ("README.md", "bmm_merge.json")}


def assert_no_partial_under_final_names(root: Path) -> None:
    """Every file under a final name is complete: safetensors headers match their sizes, JSON parses."""
    for p in root.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".safetensors":
            read_header(p)  # raises on a truncated or torn file
        elif p.suffix == ".json":
            json.loads(p.read_text())


def tmp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


def assert_stage_equal(work: Path, ref_work: Path, stage: str) -> None:
    """A resumed stage: complete, same shards as the reference, byte for byte, nothing else left in it."""
    man = json.loads((work / stage / "stage.json").read_text())
    ref_man = json.loads((ref_work / stage / "stage.json").read_text())
    assert man["complete"] and man["id"] == ref_man["id"]
    assert man["shards"] == ref_man["shards"]
    got, want = shard_bytes(work / stage), shard_bytes(ref_work / stage)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{stage}/{name} differs from the uninterrupted run"
    assert sorted(p.name for p in (work / stage).iterdir()) == sorted(p.name for p in (ref_work / stage).iterdir())

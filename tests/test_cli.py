import json
import subprocess
import sys
from pathlib import Path

import pytest

from bmm_cli import completions
from bmm_cli.cli import _expand_lists

ROOT = Path(__file__).resolve().parents[1]


def bmm(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_help_lists_implemented_commands():
    out = bmm("--help").stdout
    for cmd in ("plan", "taskvec", "version"):
        assert cmd in out


def test_expand_lists():
    assert _expand_lists(["taskvec", "--experts", "a", "b", "--work", "w", "-e", "c"]) == [
        "taskvec", "--experts", "a", "--experts", "b", "--work", "w", "-e", "c"]


def test_plan_json_and_human(family):
    base, experts = family("bert")
    res = json.loads(bmm("plan", "--base", base, "--experts", *experts, "--blocks", "2", "--json").stdout)
    assert res["blocks"] == 3 and res["modules"] == 18 and res["modules_per_group"]["attn_in"] == 9
    assert list(res["block_groups"]) == ["0", "1"]
    human = bmm("plan", "--base", base, "--experts", *experts).stdout
    assert "solvable" in human and "18 modules" in human


def test_errors_are_one_line_with_exit_codes(tmp_path, family):
    p = bmm("taskvec", "--base", tmp_path / "missing", "--experts", "x", "--work", tmp_path / "w", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("bmm: error: base ")
    assert "Traceback" not in p.stderr
    p = bmm("--debug", "taskvec", "--base", tmp_path / "missing", "--experts", "x", "--work", tmp_path / "w",
            check=False)
    assert "Traceback" in p.stderr


def test_taskvec_stdout_is_the_stage_dir(family, tmp_path):
    base, experts = family("bert")
    p = bmm("taskvec", "--base", base, "--experts", *experts, "--work", tmp_path / "w")
    assert p.stdout.strip() == str(tmp_path / "w" / "taskvec")


def test_second_process_on_same_work_dir_is_refused(tmp_path):
    from bmm_cli.errors import StateError
    from bmm_cli.stage import work_lock

    with work_lock(tmp_path):
        code = ("import sys; from bmm_cli.stage import work_lock\n"
                f"with work_lock({str(tmp_path)!r}): pass\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert p.returncode != 0 and "in use by another bmm process" in p.stderr
    # a lock left by a killed holder is taken over
    p = subprocess.run([sys.executable, "-c", "import os,signal\nfrom bmm_cli.stage import work_lock\n"
                        f"with work_lock({str(tmp_path)!r}): os.kill(os.getpid(), signal.SIGKILL)"])
    assert p.returncode == -9
    with work_lock(tmp_path):
        pass
    assert StateError


@pytest.mark.parametrize("name", sorted(completions.FILES))
def test_completions_are_current(name):
    committed = (ROOT / "completions" / name).read_text()
    assert committed == completions.FILES[name](), (
        f"completions/{name} is stale: run `python -m bmm_cli.completions completions`")


def test_bash_completion_script_parses():
    p = subprocess.run(["bash", "-n", str(ROOT / "completions" / "bmm.bash")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_global_flags_are_accepted_after_the_subcommand(family, tmp_path):
    """`bmm merge ... --quiet`: the root's --quiet/-q/--debug work before or after the subcommand."""
    base, experts = family("bert")
    p = bmm("merge", "--base", base, "--experts", *experts, "--out", tmp_path / "o", "--quiet")
    assert p.stdout.strip() == str(tmp_path / "o") and p.stderr == ""
    p = bmm("plan", "--base", base, "--experts", *experts, "-q", "--json")
    assert json.loads(p.stdout)["blocks"] == 3 and p.stderr == ""
    p = bmm("taskvec", "--base", tmp_path / "missing", "--experts", "x", "--work", tmp_path / "w", "--debug",
            check=False)
    assert "Traceback" in p.stderr

"""The output directory: a full disk, a foreign --out, --out pointing at the base, a crash between the two renames
that swap a finished output in. The previous complete output must stay intact and loadable; no temp file stays."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from bmm_cli import atomic, store, writer

from ._util import assert_stage_equal, bmm_inproc, bmm_ok, model_bytes, tmp_files


def _enospc_at(monkeypatch, n):
    """The n-th file written (by store.save_file or as a streamed model shard) fails with ENOSPC after half of it
    was written (a partial write)."""
    real = store.save_file
    calls = {"n": 0}

    def flaky(tensors, filename, metadata=None):
        calls["n"] += 1
        real(tensors, filename, metadata=metadata)
        if calls["n"] == n:
            with open(filename, "r+b") as fh:
                fh.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(store, "save_file", flaky)
    real_finish = writer._ShardStream._finish  # model shards are streamed, not written by save_file

    def flaky_finish(stream):
        calls["n"] += 1
        if calls["n"] == n:
            stream._fh.truncate(stream._fh.tell() // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stream.path))
        real_finish(stream)

    monkeypatch.setattr(writer._ShardStream, "_finish", flaky_finish)


def _loadable(d, ref_dir):
    from transformers import AutoModelForCausalLM

    c = store.Checkpoint.open(d)
    r = store.Checkpoint.open(ref_dir)
    assert c.keys() == r.keys() and all(torch.equal(c.get(k), r.get(k)) for k in c.keys())
    AutoModelForCausalLM.from_pretrained(str(d))


def _one_error_line(err):
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("bmm: error: "), err
    assert "Traceback" not in err and "internal error" not in err


def test_disk_full_while_writing_the_output(ref, work_from, tmp_path, monkeypatch, capsys):
    work = work_from("taskvec", "anchor-ties", "gram-free")
    out = tmp_path / "merged"
    shutil.copytree(ref.out, out)  # the previous complete output (lam 0.05)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["solve", "--work", work, *ref.solve_args, "--out", out]
    args[args.index("0.05")] = "0.07"
    _enospc_at(monkeypatch, 2)
    code, _, err = bmm_inproc(args, capsys)
    assert code == 1, err
    _one_error_line(err)
    second = sorted(ref.out2.glob("model-*.safetensors"))[1].name
    assert str(tmp_path / ".merged.bmm-partial" / second) in err
    assert "no space left" in err and "rerun the same command" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _loadable(out, ref.out)
    assert not tmp_files(tmp_path)
    monkeypatch.undo()  # space freed: the same command finishes the job, keeping the shard written before
    bmm_ok(args, capsys)
    assert model_bytes(out) == model_bytes(ref.out2)
    assert not tmp_files(tmp_path) and not (tmp_path / ".merged.bmm-partial").exists()


def test_disk_full_in_the_work_dir(ref, work_from, monkeypatch, capsys):
    work = work_from("taskvec")
    args = ["gram", "--work", work, "--kind", "free", "--device", "cpu"]
    _enospc_at(monkeypatch, 2)
    code, _, err = bmm_inproc(args, capsys)
    assert code == 1, err
    _one_error_line(err)
    assert str(work / "gram-free" / "block-001.safetensors") in err
    man = json.loads((work / "gram-free" / "stage.json").read_text())
    assert sorted(man["shards"]) == ["block-000"] and not tmp_files(work)
    monkeypatch.undo()
    bmm_ok(args, capsys)
    assert_stage_equal(work, ref.work, "gram-free")


@pytest.fixture
def small_fs(tmpfs):
    """A real 256 KB tmpfs (root only): a full disk as the kernel reports it, no monkeypatch."""
    mnt = tmpfs("256k")
    if mnt is None:
        pytest.skip("mounting a tmpfs needs root")
    return mnt


def test_disk_full_from_safetensors_is_the_one_line_disk_error(family, small_fs, capsys):
    """safetensors reports a full disk as SafetensorError ("No space left on device (os error 28)"), not OSError:
    the stage still stops with the one-line disk message naming the file, and leaves no temp file."""
    base, ex = family("llama")
    work = small_fs / "w"
    code, _, err = bmm_inproc(["taskvec", "--base", base, "--experts", *ex, "--work", work, "--store", "float32"],
                              capsys)
    assert code == 1, err
    _one_error_line(err)
    assert "no space left" in err and str(work / "taskvec") in err, err
    assert not tmp_files(small_fs)


def test_disk_full_on_append_leaves_no_torn_record(tmp_path, monkeypatch):
    p = tmp_path / "trials.jsonl"
    atomic.append_line(p, json.dumps({"trial": 0}))

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "write", full)
    with pytest.raises(atomic.DiskFullError, match="trials.jsonl: no space left"):
        atomic.append_line(p, json.dumps({"trial": 1}))
    monkeypatch.undo()
    assert atomic.read_jsonl(p) == [{"trial": 0}]


def test_foreign_out_refused_unless_force(ref, work_from, tmp_path, capsys):
    work = work_from("taskvec", "anchor-ties", "gram-free")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    args = ["solve", "--work", work, *ref.solve_args, "--out", out]
    code, _, err = bmm_inproc(args, capsys)
    assert code == 2, err
    _one_error_line(err)
    assert str(out) in err and "not a bmm output" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / ".mine.bmm-partial").exists()
    (tmp_path / "afile").write_text("x")
    code, _, err = bmm_inproc(args[:-1] + [tmp_path / "afile"], capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "afile").read_text() == "x"
    bmm_ok(args + ["--force"], capsys)
    assert model_bytes(out) == model_bytes(ref.out)


def test_out_pointing_at_the_base_is_refused_even_with_force(family, tmp_path, capsys):
    """`--force` also means "redo changed stages" in `bmm merge`: it must never make bmm delete its own base."""
    base0, experts = family("bert")
    base = tmp_path / "base"
    shutil.copytree(base0, base)
    before = model_bytes(base)
    for out in (base, tmp_path):  # the base itself, or a directory containing it
        code, _, err = bmm_inproc(["merge", "--base", base, "--experts", *experts, "--out", out, "--force",
                                   "--work", tmp_path / "w", "--anchor", "ta", "--device", "cpu"], capsys)
        assert code == 2, err
        assert err.rstrip("\n").split("\n")[-1].startswith("bmm: error: --out"), err
        assert "base" in err and "choose another output path" in err
        assert model_bytes(base) == before


def test_out_pointing_at_an_expert_or_the_work_dir_is_refused(ref, work_from, tmp_path, capsys):
    """Every command that writes a model refuses an --out that would replace an expert or the work directory."""
    experts = []
    for i, e in enumerate(ref.experts):
        experts.append(tmp_path / f"expert{i}")
        shutil.copytree(e, experts[-1])
    before = {e: model_bytes(e) for e in experts}
    work = work_from("taskvec", "anchor-ties", "gram-free")
    # the finished taskvec stage records the reference's experts: point them at the copies
    man = json.loads((work / "taskvec" / "stage.json").read_text())
    assert [str(p) for p in man["paths"]["experts"]] == [str(e) for e in ref.experts]
    cases = [
        (["merge", "--base", ref.base, "--experts", *experts, "--work", tmp_path / "mw", "--anchor", "ta",
          "--device", "cpu", "--force", "--out"], [experts[1], tmp_path / "mw"], "expert 2"),
        (["solve", "--work", work, *ref.solve_args, "--force", "--out"], [work, ref.experts[0]], None),
        (["anchor", "--work", work, "--method", "ties", "--force", "--materialize"], [work], "work directory"),
        (["search", "--work", work, "--anchor", "ties", "--gram", "free", "--eval", "echo 1", "--trials", "1",
          "--device", "cpu", "--out"], [ref.experts[0]], "expert 1"),
    ]
    for args, outs, role in cases:
        for out in outs:
            code, _, err = bmm_inproc(args + [out], capsys)
            assert code == 2, (args, out, err)
            last = err.rstrip("\n").split("\n")[-1]
            assert last.startswith("bmm: error: --out") and "choose another output path" in last, last
            if role and out == outs[0]:
                assert role in last, last
    assert {e: model_bytes(e) for e in experts} == before
    assert (work / "taskvec" / "stage.json").is_file()


def test_crash_between_the_swap_renames(ref, work_from, tmp_path, monkeypatch, capsys):
    """Killed after the old output was moved aside and before the new one was moved in: the next run puts the old
    one back first, so even if that run fails too, --out holds the previous complete output."""
    work = work_from("taskvec", "anchor-ties", "gram-free")
    out = tmp_path / "merged"
    shutil.copytree(ref.out, out)
    args = ["solve", "--work", work, *ref.solve_args, "--out", out]
    args[args.index("0.05")] = "0.07"
    real_replace = os.replace

    def die_on_swap_in(src, dst):
        if str(src).endswith(".bmm-partial"):
            raise SystemExit(137)  # stands for SIGKILL at this instant
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_swap_in)
    code, _, _ = bmm_inproc(args, capsys)
    monkeypatch.undo()
    assert code == 137 and not out.exists() and (tmp_path / ".merged.bmm-old").is_dir()
    _enospc_at(monkeypatch, 1)  # the next run fails too (disk full) ...
    code, _, err = bmm_inproc(args, capsys)
    assert code == 1 and "restored the previous" in err, err
    assert model_bytes(out) == model_bytes(ref.out)  # ... and --out is the previous output again
    _loadable(out, ref.out)
    monkeypatch.undo()
    bmm_ok(args, capsys)
    assert model_bytes(out) == model_bytes(ref.out2)
    assert not (tmp_path / ".merged.bmm-old").exists() and not (tmp_path / ".merged.bmm-partial").exists()


def test_ctrl_c_exits_130_and_says_work_is_kept(ref, work_from, monkeypatch, capsys):
    work = work_from("taskvec")
    real = store.save_file
    calls = {"n": 0}

    def interrupted(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what SIGINT (Ctrl-C, CI cancel) raises
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(store, "save_file", interrupted)
    code, _, err = bmm_inproc(["gram", "--work", work, "--kind", "free", "--device", "cpu"], capsys)
    assert not tmp_files(work)
    assert code == 130, f"an interrupted run exited {code}"
    assert "interrupted; finished work is kept" in err

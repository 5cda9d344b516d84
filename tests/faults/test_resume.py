"""Kill/resume of each stage run through the CLI: SIGKILL at fault points (BMM_FAULT) and by timing, then the same
command again; the result must be byte-identical to the uninterrupted reference run (``ref`` fixture), and no file
under a final name may ever hold a partial write. (taskvec alone and `bmm merge` at the four shard points are
covered in tests/test_taskvec.py and tests/test_merge.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from ._util import (
    assert_no_partial_under_final_names,
    assert_stage_equal,
    bmm_inproc,
    bmm_killed,
    bmm_killed_when,
    bmm_ok,
    model_bytes,
    tmp_files,
)

pytestmark = pytest.mark.slow


def _manifest(work, stage):
    return json.loads((work / stage / "stage.json").read_text())


def test_anchor_ties_resumes_after_kills(ref, work_from, capsys):
    """Kill after the 1st block shard, then (resumed) after the last shard (others) is written but not recorded."""
    work = work_from("taskvec")
    args = ["anchor", "--work", work, "--method", "ties", "--device", "cpu"]
    bmm_killed(args, "anchor.shard:1")
    man = _manifest(work, "anchor-ties")
    assert man["shards"] == {} and not man["complete"]
    assert not tmp_files(work)
    assert_no_partial_under_final_names(work)
    bmm_killed(args, "anchor.shard:4")  # block-000..002 recorded, others.safetensors written, not recorded
    man = _manifest(work, "anchor-ties")
    assert sorted(man["shards"]) == ["block-000", "block-001", "block-002"] and not man["complete"]
    assert_no_partial_under_final_names(work)
    res = json.loads(bmm_ok(args + ["--json"], capsys))
    assert res["blocks_written"] == 0  # only the others shard was left to do
    assert_stage_equal(work, ref.work, "anchor-ties")
    assert not tmp_files(work)


def test_anchor_ties_killed_during_global_pass(ref, work_from, capsys):
    """Kill by timing: as soon as the stage manifest exists (the global TIES pass runs right after)."""
    work = work_from("taskvec")
    args = ["anchor", "--work", work, "--method", "ties", "--device", "cpu"]
    bmm_killed_when(args, work / "anchor-ties" / "stage.json")
    assert_no_partial_under_final_names(work)
    bmm_ok(args, capsys)
    assert_stage_equal(work, ref.work, "anchor-ties")
    assert not tmp_files(work)


def test_gram_free_resumes_after_kill(ref, work_from, capsys):
    work = work_from("taskvec")
    args = ["gram", "--work", work, "--kind", "free", "--device", "cpu"]
    bmm_killed(args, "gram.shard:2")
    assert sorted(_manifest(work, "gram-free")["shards"]) == ["block-000"]
    assert_no_partial_under_final_names(work)
    res = json.loads(bmm_ok(args + ["--json"], capsys))
    assert res["blocks_written"] == 2
    assert_stage_equal(work, ref.work, "gram-free")


def _gram_data_args(ref, work):
    calib = [x for spec in ref.calib for x in ("--calib", spec)]
    return ["gram", "--work", work, "--kind", "data", *calib, "--samples", "8", "--max-len", "32", "--device", "cpu"]


def test_gram_data_resumes_after_kills(ref, work_from, capsys):
    """3 experts x 3 blocks per-task shards, then 3 combined shards. Kill inside expert 1's capture, then (resumed)
    inside the combine step; the final rerun does only what is left."""
    work = work_from("taskvec")
    args = _gram_data_args(ref, work)
    bmm_killed(args, "gram.shard:2")
    assert sorted(_manifest(work, "gram-data")["shards"]) == ["t0-block-000"]
    assert_no_partial_under_final_names(work)
    bmm_killed(args, "gram.shard:11")  # expert 1 redone (3), experts 2, 3 (6), combine block-000 (10), -001 (11)
    man = _manifest(work, "gram-data")
    assert "block-000" in man["shards"] and "block-001" not in man["shards"] and not man["complete"]
    assert man["tokens"].keys() == {"0", "1", "2"}
    assert_no_partial_under_final_names(work)
    res = json.loads(bmm_ok(args + ["--json"], capsys))
    assert res["blocks_written"] == 2
    assert_stage_equal(work, ref.work, "gram-data")
    assert _manifest(work, "gram-data")["tokens"] == _manifest(ref.work, "gram-data")["tokens"]


def test_gram_data_killed_by_timing(ref, work_from, capsys):
    """SIGKILL as soon as the stage manifest appears: mid-capture (model loading / forward passes)."""
    work = work_from("taskvec")
    args = _gram_data_args(ref, work)
    p = bmm_killed_when(args, work / "gram-data" / "stage.json")
    assert p.returncode == -9  # the kill landed before the stage finished
    assert not _manifest(work, "gram-data")["complete"]
    assert_no_partial_under_final_names(work)
    bmm_ok(args, capsys)
    assert_stage_equal(work, ref.work, "gram-data")
    assert not tmp_files(work)


def test_solve_resumes_and_keeps_previous_output(ref, work_from, tmp_path, capsys):
    """`bmm solve` over a previous complete output: killed after the 2nd output shard, then (resumed) after the last
    one; the old output stays intact (byte for byte) and the new one is not visible; a half-written temp file in
    the staging dir (what a kill in the middle of a write leaves) must not leak into the final output; the last
    rerun completes the new output from the shards already written."""
    work = work_from("taskvec", "anchor-ties", "gram-free")
    out = tmp_path / "merged"
    shutil.copytree(ref.out, out)  # a previous complete bmm output (lam 0.05)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["solve", "--work", work, *ref.solve_args, "--out", out]
    args[args.index("0.05")] = "0.07"
    bmm_killed(args, "write.shard:2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    staging = tmp_path / ".merged.bmm-partial"
    done = json.loads((staging / ".progress.json").read_text())["done"]
    assert len(done) == 2
    kept = {n: (staging / n).stat().st_ino for n in done}
    assert_no_partial_under_final_names(tmp_path)
    # what SIGKILL in the middle of writing shard 3 leaves behind (atomic.atomic_path's temp name)
    shards = sorted(ref.out2.glob("model-*.safetensors"))
    (staging / f".{shards[2].name}.k1ll3d.tmp").write_bytes(shards[2].read_bytes()[:1000])
    # resumed, killed again after the last shard, before the index, config, card and the swap
    bmm_killed(args, f"write.shard:{len(shards) - 2}")
    done = json.loads((staging / ".progress.json").read_text())["done"]
    assert len(done) == len(shards)
    kept = {n: (staging / n).stat().st_ino for n in done}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = json.loads(bmm_ok(args + ["--json"], capsys))
    assert res["model"] == str(out)
    assert model_bytes(out) == model_bytes(ref.out2)
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # the finished shards were kept, not redone
    assert not staging.exists() and not tmp_files(tmp_path)
    assert not (tmp_path / ".merged.bmm-old").exists()


def test_solve_killed_by_timing_while_writing(ref, work_from, tmp_path, capsys):
    """SIGKILL as soon as the output staging directory appears; --out must not exist until complete."""
    work = work_from("taskvec", "anchor-ties", "gram-free")
    out = tmp_path / "merged"
    args = ["solve", "--work", work, *ref.solve_args, "--out", out]
    p = bmm_killed_when(args, tmp_path / ".merged.bmm-partial")
    if p.returncode == -9:
        assert not out.exists()
    assert_no_partial_under_final_names(tmp_path)
    bmm_ok(args, capsys)
    assert model_bytes(out) == model_bytes(ref.out)
    assert not tmp_files(tmp_path) and not (tmp_path / ".merged.bmm-partial").exists()


def test_temp_files_of_a_killed_write_are_cleaned_on_resume(ref, work_from, capsys):
    """A kill in the middle of an atomic write leaves `.<name>.XXXX.tmp` (never a final name); the resumed stage
    removes it instead of letting such leftovers (a shard's size each) pile up in the work directory."""
    work = work_from("taskvec")
    args = ["gram", "--work", work, "--kind", "free", "--device", "cpu"]
    bmm_killed(args, "gram.shard:1")
    shard = ref.work / "gram-free" / "block-001.safetensors"
    (work / "gram-free" / ".block-001.safetensors.k1ll3d.tmp").write_bytes(shard.read_bytes()[:500])
    bmm_ok(args, capsys)
    assert_stage_equal(work, ref.work, "gram-free")
    assert not tmp_files(work)


def test_damaged_stage_shard_is_reported_and_redone(ref, work_from, capsys):
    """A damaged shard in the work directory (truncated; or same size, torn header): the next stage names it and
    says how to fix it, and rerunning the stage that owns it rewrites just that shard."""
    work = work_from("taskvec", "anchor-ties")
    victim = work / "anchor-ties" / "block-001.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    code, _, err = bmm_inproc(["solve", "--work", work, *ref.solve_args, "--out", work.parent / "o"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert str(victim) in err and "bmm anchor" in err, err
    res = json.loads(bmm_ok(["anchor", "--work", work, "--method", "ties", "--json"], capsys))
    assert res["blocks_written"] == 1
    assert_stage_equal(work, ref.work, "anchor-ties")
    # same size, corrupt header (the taskvec stage's block marker): the size check alone would take it for done
    marker = work / "taskvec" / "block-001.safetensors"
    marker.write_bytes(b"\x00" * 8 + marker.read_bytes()[8:])
    taskvec_args = ["taskvec", "--base", ref.base, "--experts", *ref.experts, "--work", work, "--json"]
    res = json.loads(bmm_ok(taskvec_args, capsys))
    assert res["blocks_written"] == 1
    assert_stage_equal(work, ref.work, "taskvec")


def test_expert_rewritten_in_place_is_not_silently_reused(family, tmp_path, capsys):
    """An expert re-saved at the same path with new values (same names, shapes, dtypes: same header bytes and
    size): a finished taskvec stage must not be reused for it (that would merge the old expert)."""
    import torch
    from safetensors.torch import load_file, save_file

    from bmm_cli.workdir import load_project

    base, experts = family("bert")
    e = tmp_path / "expert"
    shutil.copytree(experts[0], e)
    args = ["taskvec", "--base", base, "--experts", e, experts[1], "--work", tmp_path / "w"]
    bmm_ok(args, capsys)
    sd = load_file(str(e / "model.safetensors"))
    sd = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, str(e / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = bmm_inproc(args, capsys)
    assert code == 3 and "different inputs" in err and "--force" in err, err
    code, _, err = bmm_inproc(["anchor", "--work", tmp_path / "w", "--method", "ta"], capsys)
    assert code == 3 and "changed on disk" in err, err
    bmm_ok(args + ["--force"], capsys)
    proj = load_project(tmp_path / "w")  # the task vectors are now the new expert's
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(proj.taus(proj.plan.blocks[0], proj.plan.module(key))[0],
                       sd[key] - load_file(str(base / "model.safetensors"))[key])


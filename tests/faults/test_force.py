"""``--force`` redoes exactly the stages whose inputs changed, through every stage (taskvec, gram, anchor, solve):
after a rerun with other experts, or with an expert re-saved in place, the forced result is the same, byte for
byte, as a fresh run in a new work directory; without ``--force`` the changed stage is refused (exit 3)."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file

from ._util import bmm_inproc, bmm_ok, model_bytes

MERGE = ["merge", "--anchor", "tsv", "--device", "cpu", "--max-shard-size", "30KB"]


def _merge(base, experts, out, *extra):
    return [*MERGE, "--base", base, "--experts", *experts, "--out", out, *extra]


def test_merge_force_after_dropping_an_expert(family, tmp_path, capsys):
    base, ex = family("llama")
    out = tmp_path / "out"
    bmm_ok(_merge(base, ex, out), capsys)
    code, _, err = bmm_inproc(_merge(base, ex[:2], out), capsys)
    assert code == 3 and "different inputs" in err and "--force" in err, err
    bmm_ok(_merge(base, ex[:2], out, "--force"), capsys)
    bmm_ok(_merge(base, ex[:2], tmp_path / "fresh"), capsys)
    assert model_bytes(out) == model_bytes(tmp_path / "fresh")


def test_merge_force_after_an_expert_is_resaved_in_place(family, tmp_path, capsys):
    base, ex = family("llama")
    e = tmp_path / "expert"
    shutil.copytree(ex[0], e)
    out = tmp_path / "out"
    bmm_ok(_merge(base, [e, ex[1]], out), capsys)
    sd = load_file(str(e / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in sd.items()}, str(e / "model.safetensors"), metadata={"format": "pt"})
    bmm_ok(_merge(base, [e, ex[1]], out, "--force"), capsys)
    bmm_ok(_merge(base, [e, ex[1]], tmp_path / "fresh"), capsys)
    assert model_bytes(out) == model_bytes(tmp_path / "fresh")


def test_stage_commands_force_after_taskvec_changed(family, tmp_path, capsys):
    """`bmm gram --kind free --force` and `bmm anchor --method tsv --force` redo stages made from old task vectors."""
    base, ex = family("llama")
    w = tmp_path / "w"
    stages = [["gram", "--work", w, "--kind", "free", "--device", "cpu"],
              ["anchor", "--work", w, "--method", "tsv", "--device", "cpu"]]
    bmm_ok(["taskvec", "--base", base, "--experts", *ex, "--work", w], capsys)
    for args in stages:
        bmm_ok(args, capsys)
    bmm_ok(["taskvec", "--base", base, "--experts", *ex[:2], "--work", w, "--force"], capsys)
    for args in stages:
        code, _, err = bmm_inproc(args, capsys)
        assert code == 3 and "different inputs" in err, err
        bmm_ok(args + ["--force"], capsys)
    fresh = tmp_path / "fresh"
    bmm_ok(["taskvec", "--base", base, "--experts", *ex[:2], "--work", fresh], capsys)
    for args in stages:
        bmm_ok([fresh if a == w else a for a in args], capsys)
    for stage in ("gram-free", "anchor-tsv"):
        got = {p.name: p.read_bytes() for p in sorted((w / stage).glob("*.safetensors"))}
        want = {p.name: p.read_bytes() for p in sorted((fresh / stage).glob("*.safetensors"))}
        assert got == want and got, stage


def test_later_stages_after_an_expert_is_resaved_in_place_exit_3(family, tmp_path, capsys):
    """An expert re-saved after `bmm taskvec`: every later stage stops with exit 3 (the work dir disagrees with the
    inputs) and names the commands that redo it; `--force` on the later stage alone cannot, `bmm merge --force` can."""
    base, ex = family("llama")
    e = tmp_path / "expert"
    shutil.copytree(ex[0], e)
    w = tmp_path / "w"
    bmm_ok(["taskvec", "--base", base, "--experts", e, ex[1], "--work", w], capsys)
    bmm_ok(["anchor", "--work", w, "--method", "ta", "--device", "cpu"], capsys)
    bmm_ok(["gram", "--work", w, "--kind", "free", "--device", "cpu"], capsys)
    sd = load_file(str(e / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in sd.items()}, str(e / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    for args in (["anchor", "--work", w, "--method", "ta", "--device", "cpu"],
                 ["gram", "--work", w, "--kind", "free", "--device", "cpu"],
                 ["solve", "--work", w, "--anchor", "ta", "--lam", "0.1", "--device", "cpu", "--out", out],
                 ["solve", "--work", w, "--anchor", "ta", "--lam", "0.1", "--device", "cpu", "--out", out, "--force"]):
        code, _, err = bmm_inproc(args, capsys)
        assert code == 3 and "changed on disk since `bmm taskvec`" in err and "bmm merge --force" in err, (args, err)
    assert not out.exists()

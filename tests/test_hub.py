"""Hub inputs are checked from config.json and their safetensors headers before any download (a local stand-in for
the hub API serves them: tests/hub_standin.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hub_standin import HubStandin
from safetensors.torch import load_file, save_file


def _env(tmp_path, hub):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return dict(env, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1", BMM_NO_PROGRESS="1")


def _bmm(args, env):
    return subprocess.run([sys.executable, "-m", "bmm_cli.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def _publish(src, root, repo, edit=None):
    d = root / repo
    shutil.copytree(src, d)
    if edit is not None:
        sd = load_file(str(d / "model.safetensors"))
        save_file(edit(sd), str(d / "model.safetensors"), metadata={"format": "pt"})
    return repo


def test_a_mismatching_hub_expert_is_refused_from_its_headers_before_download(family, tmp_path):
    base, ex = family("llama")
    root = tmp_path / "hub"
    key = "model.layers.1.mlp.down_proj.weight"
    bad = _publish(ex[1], root, "someorg/bad", lambda sd: {**sd, key: sd[key][:, :-1].contiguous()})
    out, work = tmp_path / "out", tmp_path / "work"
    with HubStandin(root) as hub:
        p = _bmm(["merge", "--base", base, "--experts", ex[0], bad, "--out", out, "--work", work, "--device", "cpu"],
                 _env(tmp_path, hub))
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
        assert f"someorg/bad/model.safetensors: tensor {key!r} has shape [32, 47]" in p.stderr, p.stderr
        assert any(r is not None for m, path, r in hub.log if path.endswith("model.safetensors"))  # header read
        assert hub.whole_file_gets("model.safetensors") == []  # ...and no download
    assert not out.exists() and not work.exists()


def test_a_matching_hub_expert_passes_and_merges_like_the_local_copy(family, tmp_path):
    base, ex = family("llama")
    good = _publish(ex[1], tmp_path / "hub", "someorg/good")
    args = ["--anchor", "ta", "--lam", "0.1", "--device", "cpu"]
    with HubStandin(tmp_path / "hub") as hub:
        env = _env(tmp_path, hub)
        p = _bmm(["merge", "--base", base, "--experts", ex[0], good, "--out", tmp_path / "hubout", *args], env)
        assert p.returncode == 0, p.stderr
        assert "someorg/good: checked from config.json and the safetensors headers" in p.stderr
        assert len(hub.whole_file_gets("model.safetensors")) == 1
        p = _bmm(["merge", "--base", base, "--experts", ex[0], ex[1], "--out", tmp_path / "localout", *args], env)
        assert p.returncode == 0, p.stderr
    got, want = load_file(str(tmp_path / "hubout" / "model.safetensors")), load_file(
        str(tmp_path / "localout" / "model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got)


def test_a_download_larger_than_the_cache_disk_is_refused_before_it_starts(family, tmp_path, tmpfs):
    """HF_HOME on a real 64 KB tmpfs (root only): the expert's weights (from its headers) do not fit; refused in one
    line naming HF_HOME, and nothing is downloaded."""
    base, ex = family("llama")
    good = _publish(ex[1], tmp_path / "hub", "someorg/good")
    mnt = tmpfs("64k")
    if mnt is None:
        pytest.skip("mounting a tmpfs needs root")
    with HubStandin(tmp_path / "hub") as hub:
        env = dict(_env(tmp_path, hub), HF_HOME=str(mnt / "hf"))
        p = _bmm(["merge", "--base", base, "--experts", ex[0], good, "--out", tmp_path / "o", "--device", "cpu"], env)
        assert p.returncode == 2, p.stderr
        assert "the download of someorg/good needs" in p.stderr and "HF_HOME" in p.stderr, p.stderr
        assert hub.whole_file_gets("model.safetensors") == []
    assert not (tmp_path / "o").exists()

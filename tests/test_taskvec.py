import json
import os
import subprocess
import sys

import pytest
import torch

from bmm_cli import store
from bmm_cli.errors import InputError, StateError
from bmm_cli.store import Checkpoint, ShardReader
from bmm_cli.taskvec import taskvec
from bmm_cli.workdir import load_project, tv_key


def _shard_bytes(work):
    return {p.name: p.read_bytes() for p in sorted((work / "taskvec").glob("*.safetensors"))}


@pytest.mark.parametrize("kind,sharded", [("bert", False), ("llama", True), ("gpt2", False), ("clip", False)])
def test_task_vectors_are_exact(family, tmp_path, kind, sharded):
    """The stored float32 copy and the recomputed task vectors (the default) are W_t − W_pre bit for bit."""
    base, experts = family(kind, sharded=sharded)
    work, kept = tmp_path / "w", tmp_path / "kept"
    res = taskvec(str(base), [str(e) for e in experts], work)
    assert res["blocks_written"] == res["blocks"] > 0 and res["store"] == "none"
    taskvec(str(base), [str(e) for e in experts], kept, store="float32")
    b = Checkpoint.open(base)
    es = [Checkpoint.open(e) for e in experts]
    proj, proj_kept = load_project(work), load_project(kept)
    assert not proj.stored and proj_kept.stored
    n = 0
    for blk in proj.plan.blocks:
        r = ShardReader(kept / "taskvec" / f"{blk.shard}.safetensors")
        assert ShardReader(work / "taskvec" / f"{blk.shard}.safetensors").keys() == []  # a marker: no copy
        for ref in blk.modules:
            taus = proj.taus(blk, ref, proj.reader(blk))
            assert taus.dtype == torch.float32 and torch.equal(taus, proj_kept.taus(blk, ref))
            for t, e in enumerate(es):
                want = e.get(ref.key).float() - b.get(ref.key).float()
                if ref.conv1d:
                    want = want.t()  # stored [d_out, d_in]
                assert torch.equal(r.get(tv_key(ref.key, t)), want)
                assert torch.equal(taus[t], want)
                n += 1
    assert n == len(proj.plan.modules) * len(es)


def test_stored_copy_is_opt_in_and_costs_the_disk(family, tmp_path):
    base, experts = family("llama")
    sizes = {}
    for store_as in ("none", "float32", "bf16"):
        work = tmp_path / store_as
        res = taskvec(str(base), [str(e) for e in experts], work, store=store_as)
        sizes[res["store"]] = sum(p.stat().st_size for p in (work / "taskvec").glob("*.safetensors"))
    tv = sum(Checkpoint.open(base).meta[m.key].numel for m in load_project(tmp_path / "none").plan.modules)
    assert sizes["float32"] > len(experts) * tv * 4 > sizes["bfloat16"] > len(experts) * tv * 2
    assert sizes["none"] < 100 * len(load_project(tmp_path / "none").plan.blocks)
    with pytest.raises(InputError, match="--store 'int8'"):
        taskvec(str(base), [str(e) for e in experts], tmp_path / "x", store="int8")
    with pytest.raises(InputError, match="--store 'float64': choose none, float32, bfloat16, float16"):
        taskvec(str(base), [str(e) for e in experts], tmp_path / "x", store="float64")
    assert not (tmp_path / "x").exists()


def test_gpt2_conv1d_orientation(family, tmp_path):
    base, experts = family("gpt2")
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    proj = load_project(work)
    ref = proj.plan.module("transformer.h.0.mlp.c_fc.weight")
    assert ref.conv1d
    tau = proj.taus(proj.plan.blocks[0], ref)
    d_in, d_out = Checkpoint.open(base).meta[ref.key].shape  # Conv1D stores [d_in, d_out]
    assert tau.shape == (len(experts), d_out, d_in) and d_out != d_in


def test_rerun_is_noop_and_changed_inputs_refused(family, tmp_path):
    base, experts = family("bert")
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    before = _shard_bytes(work)
    res = taskvec(str(base), [str(e) for e in experts], work)
    assert res["blocks_written"] == 0 and res["blocks_skipped"] == res["blocks"]
    assert _shard_bytes(work) == before
    with pytest.raises(StateError, match="different inputs"):
        taskvec(str(base), [str(e) for e in experts[:2]], work)
    with pytest.raises(StateError, match=r"options \(store\)"):
        taskvec(str(base), [str(e) for e in experts], work, store="bfloat16")
    res = taskvec(str(base), [str(e) for e in experts[:2]], work, force=True)
    assert res["blocks_written"] == res["blocks"]


@pytest.mark.parametrize("store_as", ["none", "float32"])
def test_resume_after_sigkill_gives_identical_shards(family, tmp_path, store_as):
    base, experts = family("llama")
    args = [sys.executable, "-m", "bmm_cli.cli", "taskvec", "--base", str(base), "--experts",
            *map(str, experts), "--store", store_as, "--work"]
    ref_work = tmp_path / "ref"
    subprocess.run(args + [str(ref_work)], check=True, capture_output=True)
    work = tmp_path / "w"
    env = dict(os.environ, BMM_FAULT="taskvec.shard:2")
    p = subprocess.run(args + [str(work)], env=env, capture_output=True)
    assert p.returncode == -9
    man = json.loads((work / "taskvec" / "stage.json").read_text())
    assert len(man["shards"]) == 1 and not man["complete"]  # the 2nd shard was written but not yet recorded
    assert not [f for f in os.listdir(work / "taskvec") if f.endswith(".tmp")]
    p = subprocess.run(args + [str(work), "--json"], capture_output=True, text=True, check=True)
    res = json.loads(p.stdout)
    assert res["blocks_written"] == res["blocks"] - 1
    assert _shard_bytes(work) == _shard_bytes(ref_work)


def test_memory_is_one_block(family, tmp_path):
    base, experts = family("llama")
    store.residency.reset_peak()
    start = store.residency.live
    taskvec(str(base), [str(e) for e in experts], tmp_path / "w")
    proj = load_project(tmp_path / "w")
    per_block = max(len(b.modules) for b in proj.plan.blocks)
    # one base module and one expert module are read at a time; the block's diffs are not checkpoint reads
    assert store.residency.peak - start <= 2
    assert per_block > 2  # (so the bound above is not trivially the whole model)


def test_preflight_mismatch_names_file_and_tensor(family, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base, experts = family("llama")
    bad = tmp_path / "bad"
    shutil.copytree(experts[0], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    want = r"bad/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape"
    with pytest.raises(InputError, match=want):
        taskvec(str(base), [str(experts[1]), str(bad)], tmp_path / "w")
    assert not (tmp_path / "w" / "taskvec").exists()  # refused before any work

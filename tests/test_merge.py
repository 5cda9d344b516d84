import os
import subprocess
import sys

import pytest
import torch
from conftest import write_calib_files

from bmm_cli.errors import InputError
from bmm_cli.merge import merge
from bmm_cli.store import Checkpoint, ShardReader


def _out_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_data_assisted_and_hybrid_merge(family, tmp_path):
    base, experts = family("bert")
    calib = write_calib_files(tmp_path, len(experts), 12)
    work = tmp_path / "w"
    res = merge(str(base), [str(e) for e in experts], tmp_path / "data", calib=calib, work=work, lam=0.2,
                scale=1.0, anchor="ta", samples=8, max_len=32, gram="data")
    assert res["gram"] == "data"
    key = "encoder.layer.1.attention.output.dense.weight"
    b = Checkpoint.open(base).get(key).double()
    us = [Checkpoint.open(e).get(key).double() - b for e in experts]
    Gt = [ShardReader(work / "gram-data" / f"t{t}-block-001.safetensors").get(key).double() for t in range(3)]
    G = sum(Gt)
    B = sum(u @ g for u, g in zip(us, Gt))
    m = torch.trace(G) / G.shape[0]
    u0 = 0.3 * sum(us)  # TA with its default λ = 0.3
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    want = b + torch.linalg.solve((G + 0.2 * m * eye).t(), (B + 0.2 * m * u0).t()).t()
    got = Checkpoint.open(tmp_path / "data").get(key).double()
    assert torch.allclose(got, want, atol=5e-6, rtol=1e-4)
    # hybrid reuses the data Grams and adds the free ones
    res = merge(str(base), [str(e) for e in experts], tmp_path / "hyb", calib=calib, work=work, gram="hybrid",
                epsilon=0.25, lam=0.2, scale=1.0, anchor="ta", samples=8, max_len=32)
    assert res["stages"]["gram-data"]["written"] == 0 and res["params"]["eps"] == 0.25
    Gf = sum(u.t() @ u for u in us)
    Bf = sum(u @ u.t() @ u for u in us)
    mf = torch.trace(Gf) / Gf.shape[0]
    Gh = 0.25 * G / m + 0.75 * Gf / mf
    Bh = 0.25 * B / m + 0.75 * Bf / mf
    want = b + torch.linalg.solve((Gh + 0.2 * eye).t(), (Bh + 0.2 * u0).t()).t()
    got = Checkpoint.open(tmp_path / "hyb").get(key).double()
    assert torch.allclose(got, want, atol=5e-6, rtol=1e-4)
    from transformers import AutoModel

    AutoModel.from_pretrained(str(tmp_path / "hyb"))


def test_preflight_before_any_work(family, tmp_path):
    base, experts = family("bert")
    work = tmp_path / "w"
    with pytest.raises(InputError, match="calibration"):
        merge(str(base), [str(e) for e in experts], tmp_path / "o", gram="data", work=work)
    with pytest.raises(InputError, match="not found"):
        merge(str(base), [str(e) for e in experts], tmp_path / "o", calib=["1=/nope.jsonl", "2=/x", "3=/y"],
              work=work)
    with pytest.raises(InputError, match="unknown anchor"):
        merge(str(base), [str(e) for e in experts], tmp_path / "o", anchor="fancy", work=work)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a bmm output"):
        merge(str(base), [str(e) for e in experts], foreign, work=work)
    assert not work.exists()


CMD = ["merge", "--anchor", "ties", "--max-shard-size", "30KB", "--lam", "0.05", "--json"]


@pytest.mark.parametrize("fault", ["taskvec.shard:2", "anchor.shard:2", "write.shard:2"])  # data-free: no gram stage
def test_merge_resumes_after_sigkill_with_identical_output(family, tmp_path, fault):
    base, experts = family("llama")
    args = [sys.executable, "-m", "bmm_cli.cli", *CMD, "--base", str(base), "--experts", *map(str, experts)]
    ref = tmp_path / "ref"
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "out"
    p = subprocess.run(args + ["--out", str(out)], env=dict(os.environ, BMM_FAULT=fault), capture_output=True)
    assert p.returncode == -9, p.stderr
    assert not out.exists()  # the final directory appears only when complete
    p = subprocess.run(args + ["--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert _out_bytes(out).keys() == _out_bytes(ref).keys()
    for name, data in _out_bytes(ref).items():
        if name in ("bmm_merge.json", "README.md"):
            continue  # they name the paths
        assert _out_bytes(out)[name] == data, name


def test_params_file_flat_or_a_search_best_json(family, tmp_path):
    """README: a params file is the flat object; a search's best.json (params nested under "params", next to the
    trial and score) is accepted as it is and gives the same model."""
    import json

    base, experts = family("llama")
    params = {"s_0": 1.1, "lam_0_attn_in": 0.05, "lam_0_attn_out": 0.2, "lam_0_mlp_in": 0.05, "lam_0_mlp_out": 0.3}
    flat, best = tmp_path / "flat.json", tmp_path / "best.json"
    flat.write_text(json.dumps(params))
    best.write_text(json.dumps({"trial": 3, "score": 0.8, "params": params, "x": [1.1, 0.05]}))
    work = tmp_path / "w"
    a = merge(str(base), [str(e) for e in experts], tmp_path / "a", params_file=str(flat), work=work, device="cpu")
    b = merge(str(base), [str(e) for e in experts], tmp_path / "b", params_file=str(best), work=work, device="cpu")
    assert a["params"] == b["params"] == params
    want = {k: v for k, v in _out_bytes(tmp_path / "a").items() if k not in ("bmm_merge.json", "README.md")}
    assert want == {k: v for k, v in _out_bytes(tmp_path / "b").items() if k not in ("bmm_merge.json", "README.md")}


def test_params_eps_with_a_free_gram_is_warned_about_once(family, tmp_path, capsys):
    """A params file carrying ε (a hybrid search's best.json) merged with --gram free: ε is ignored, and the user is
    told so once, not once by the preflight and again by the solve stage."""
    import json

    base, experts = family("llama")
    params = {"s_0": 1.0, "lam_0_attn_in": 0.05, "lam_0_attn_out": 0.2, "lam_0_mlp_in": 0.05, "lam_0_mlp_out": 0.3,
              "eps": 0.3}
    pf = tmp_path / "best.json"
    pf.write_text(json.dumps(params))
    merge(str(base), [str(e) for e in experts], tmp_path / "m", params_file=str(pf), work=tmp_path / "w",
          device="cpu")
    err = capsys.readouterr().err
    assert err.count("is ignored with --gram free") == 1, err


def test_calibration_texts_default_to_the_hybrid_gram(family, tmp_path):
    """`bmm merge --calib ...` without --gram mixes the data and data-free Grams (ε = 0.5): on both benchmarks the
    hybrid default was best or tied (data-assisted alone lost to its TSV anchor's data-free BMM on MiniLM)."""
    import json

    base, experts = family("llama")
    calib = write_calib_files(tmp_path, len(experts), 6)
    res = merge(str(base), [str(e) for e in experts], tmp_path / "m", calib=calib, work=tmp_path / "w",
                lam=0.1, scale=1.0, samples=4, max_len=16, device="cpu")
    assert res["gram"] == "hybrid" and res["params"]["eps"] == 0.5
    rec = json.loads((tmp_path / "m" / "bmm_merge.json").read_text())
    assert rec["gram"] == "hybrid" and rec["params"]["eps"] == 0.5


WAIT_HOOK = """import pathlib, sys, time
pathlib.Path(sys.argv[2]).write_text("started")
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
print(1)
"""


def test_a_second_run_writing_the_same_out_exits_3(family, tmp_path):
    """Two real `bmm merge` processes, different --work, the same --out: while the first writes it (its search's
    evaluation waits on a gate file), the second stops with exit 3 and leaves nothing behind; the first finishes."""
    import time

    from bmm_cli.out_lock import lock_path

    base, experts = family("bert")
    out, gate, started, hook = tmp_path / "o", tmp_path / "gate", tmp_path / "started", tmp_path / "wait.py"
    hook.write_text(WAIT_HOOK)
    cmd = [sys.executable, "-m", "bmm_cli.cli", "merge", "-b", str(base), "-e", *map(str, experts), "--anchor", "ta",
           "--out", str(out), "--device", "cpu"]
    first = subprocess.Popen([*cmd, "--work", str(tmp_path / "w1"), "--eval", f"{sys.executable} {hook} {gate} "
                              f"{started}", "--trials", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):  # the first run is inside its search, holding --out
            if started.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists(), first.communicate()[1]
        assert lock_path(out).exists()
        second = subprocess.run([*cmd, "--work", str(tmp_path / "w2")], capture_output=True, text=True)
        assert second.returncode == 3, second.stderr
        assert f"--out {out} is being written by another bmm process (pid {first.pid}" in second.stderr
        assert second.stderr.count("\n") == 1 and not (tmp_path / "w2").exists()
    finally:
        gate.write_text("go")
        _, err = first.communicate()
    assert first.returncode == 0, err
    assert not lock_path(out).exists() and Checkpoint.open(out).keys()


def test_merge_names_the_in_block_tensors_it_cannot_solve(family, tmp_path):
    """A tensor inside a block that no solvable module matches falls to the anchor's rule: merge says so on stderr
    and lists it in --json (it is merged, as the anchor's others rule says)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    base, experts = family("bert")
    key = "encoder.layer.1.attention.self.rel_pos.weight"
    dirs = []
    for i, src in enumerate([base, *experts]):
        dst = tmp_path / f"m{i}"
        shutil.copytree(src, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        tensors[key] = torch.full((4, 6), float(i))
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(str(dst))
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", "merge", "-b", dirs[0], "-e", *dirs[1:], "--anchor",
                        "ta", "--others", "mean", "--out", str(tmp_path / "o"), "--device", "cpu", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["unsolved"] == [key]
    assert json.loads((tmp_path / "o" / "bmm_merge.json").read_text())["unsolved"] == [key]  # the recipe...
    assert key in (tmp_path / "o" / "README.md").read_text()  # ...and the model card record it
    note = next(line for line in p.stderr.splitlines() if "match no module bmm can solve" in line)
    assert key in note and "anchor's rule" in note and "--others mean" in note
    torch.testing.assert_close(Checkpoint.open(tmp_path / "o").get(key), torch.full((4, 6), 2.0))  # mean of 1, 2, 3


def test_recomputed_task_vectors_without_a_gram_free_stage_give_the_same_bytes(family, tmp_path):
    """The default work dir (task vectors recomputed from the checkpoints, no gram-free stage) and one holding a
    float32 copy of the task vectors and the gram-free stage merge to the same bytes (default evidence λ); the
    free statistics the stages recompute equal the gram-free stage's shards bit for bit."""
    from bmm_cli.anchor import anchor
    from bmm_cli.gram import gram
    from bmm_cli.taskvec import taskvec
    from bmm_cli.workdir import GramStage, Sources, load_project

    base, experts = family("llama")
    es = [str(e) for e in experts]
    res = merge(str(base), es, tmp_path / "a", work=tmp_path / "wa", device="cpu")
    assert set(res["stages"]) == {"taskvec", "anchor"}
    assert sorted(p.name for p in (tmp_path / "wa").iterdir() if not p.name.startswith(".")) == [
        "anchor-tsv", "evidence-tsv-free.json", "taskvec"]
    kept = tmp_path / "wb"
    taskvec(str(base), es, kept, store="float32")
    gram(kept, "free", device="cpu")
    merge(str(base), es, tmp_path / "b", work=kept, device="cpu")
    assert load_project(kept).stored and not load_project(tmp_path / "wa").stored
    assert _out_bytes(tmp_path / "a")["model.safetensors"] == _out_bytes(tmp_path / "b")["model.safetensors"]
    anchor(tmp_path / "wa", "ta", device="cpu")
    src, stage = Sources(tmp_path / "wa", "ta", "free"), GramStage(kept, "free")
    for blk in src.proj.plan.blocks:
        ours, theirs = src.block_stats("free", blk), stage.block(blk)
        for ref in blk.modules:
            a, b = ours(ref.key), theirs(ref.key)
            assert torch.equal(a.G_hat, b.G_hat) and torch.equal(a.B_hat, b.B_hat) and a.m == b.m

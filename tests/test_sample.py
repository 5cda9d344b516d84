"""bmm sample: posterior moments against an independent fp64 derivation, β → ∞ = MAP, reproducibility, layout."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bmm_cli.anchor import anchor
from bmm_cli.errors import InputError
from bmm_cli.gram import gram
from bmm_cli.params import Params
from bmm_cli.posterior import noise_seed, posterior_noise, standard_normal
from bmm_cli.sample import list_samples, prepare_modules, sample, select_modules
from bmm_cli.solve import solve
from bmm_cli.store import Checkpoint
from bmm_cli.taskvec import taskvec
from bmm_cli.workdir import Sources

LAST = "encoder.layer.2.output.dense.weight"  # tiny BERT: 3 layers, the last block's mlp_out [32, 48]


@pytest.fixture(scope="module")
def work(family, tmp_path_factory):
    base, experts = family("bert")
    w = tmp_path_factory.mktemp("sample") / "w"
    taskvec(str(base), [str(e) for e in experts], w)
    anchor(w, "tsv")
    gram(w, "free")
    return w


def _reference_cov(base, experts, key, lam, r, beta):
    """Σ_row = r²/β (Ĝ + λI)⁻¹ with Ĝ = G/m recomputed in fp64 straight from the checkpoints."""
    b = Checkpoint.open(base).get(key).double()
    us = [Checkpoint.open(e).get(key).double() - b for e in experts]
    G = sum(u.t() @ u for u in us)
    Gh = G / (torch.trace(G) / G.shape[0])
    return r ** 2 / beta * torch.linalg.inv(Gh + lam * torch.eye(G.shape[0], dtype=torch.float64))


def test_posterior_mean_and_covariance_match_the_closed_form(family, work):
    """n = 32 rows x 800 draws = 25600 rows of a [32, 48] module. Tolerance: the empirical second moment about
    U_MAP (zero noise) has E‖Σ̂ − Σ‖²_F = (tr(Σ)² + ‖Σ‖²_F)/n (Gaussian rows), and we allow 3x its RMS; the mean gets
    3x the RMS of ‖mean noise‖_F = sqrt(d_out·tr(Σ)/draws). A transposed basis or a wrong square root is
    far outside both (checked below, so the test has the power it claims)."""
    base, experts = family("bert")
    src = Sources(work, "tsv", "free")
    params = Params.uniform(1, lam=0.05, scale=1.1)
    (mod,) = prepare_modules(src, params, select_modules(src.proj.plan, None), dev=torch.device("cpu"),
                             need_basis=True)
    assert mod.ref.key == LAST
    beta, draws = 50.0, 800
    zero = torch.zeros(mod.shape)  # a draw is W_map + s·noise: with W_map = 0 it is s·noise
    noise = torch.stack([mod.weight(i, zero, seed=3, beta=beta, iid=None).double() / mod.s
                         for i in range(draws)])  # [draws, d_out, d_in]
    d_out, d_in = mod.shape
    rows = noise.reshape(-1, d_in)
    n = rows.shape[0]
    emp = rows.T @ rows / n
    want = _reference_cov(base, experts, LAST, 0.05, mod.r, beta)
    tol = 3 * math.sqrt((torch.trace(want) ** 2 + want.square().sum()) / n)
    assert float((emp - want).norm()) < tol, (float((emp - want).norm()), tol)
    mean_tol = 3 * math.sqrt(d_out * float(torch.trace(want)) / draws)
    assert float(noise.mean(0).norm()) < mean_tol
    # the alternatives the test must reject
    Q, ev = mod.Q.double(), mod.evals.double()
    wrong_t = mod.r ** 2 / beta * Q.T @ torch.diag(1 / (ev + 0.05)) @ Q  # E·D·Q instead of E·D·Qᵀ
    wrong_sqrt = mod.r ** 2 / beta * Q @ torch.diag(1 / (ev + 0.05) ** 2) @ Q.T  # (Λ+λ)^-1 instead of ^-1/2
    for wrong in (wrong_t, wrong_sqrt):
        assert float((emp - wrong).norm()) > 5 * tol


def test_posterior_noise_formula_in_fp64():
    """E·diag((Λ+λ)^-1/2)·Qᵀ has rows with covariance Q diag(1/(Λ+λ)) Qᵀ exactly (E = I picks the rows out)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, generator=g, dtype=torch.float64)
    evals, Q = torch.linalg.eigh(A @ A.T)
    evals = evals.clamp_min(0)
    N = posterior_noise(torch.eye(5, dtype=torch.float64), Q, evals, 0.1, 4.0, 2.0)
    want = 4.0 / 4.0 * torch.linalg.inv(A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64))
    assert torch.allclose(N.T @ N, want, atol=1e-12)


def test_beta_infinity_is_the_map_model_byte_for_byte(work, tmp_path):
    res = sample(work, "tsv", out=tmp_path / "s", beta=math.inf, samples=2, lam=0.05, scale=1.1)
    solve(work, "tsv", out=tmp_path / "map", lam=0.05, scale=1.1)
    ref = (tmp_path / "map" / "model.safetensors").read_bytes()
    for name in res["samples"]:
        assert (tmp_path / "s" / name / "model.safetensors").read_bytes() == ref
    assert (tmp_path / "s" / "map" / "model.safetensors").read_bytes() == ref


def test_same_seed_same_bytes_and_draws_independent_of_count_and_selection(work, tmp_path):
    a = sample(work, "tsv", out=tmp_path / "a", beta=100.0, samples=2, seed=7)
    b = sample(work, "tsv", out=tmp_path / "b", beta=100.0, samples=3, seed=7,
               modules=r"layer\.(1|2)\.output\.dense")  # more samples, one more module
    sample(work, "tsv", out=tmp_path / "c", beta=100.0, samples=1, seed=8)
    assert len(b["modules"]) == 2 and a["modules"][0]["key"] == LAST
    fa = (tmp_path / "a" / "sample-001" / "model.safetensors").read_bytes()
    fa2 = sample(work, "tsv", out=tmp_path / "a2", beta=100.0, samples=2, seed=7)
    assert (tmp_path / "a2" / "sample-001" / "model.safetensors").read_bytes() == fa
    ca, cb, cc = (Checkpoint.open(tmp_path / d / "sample-000") for d in "abc")
    assert torch.equal(ca.get(LAST), cb.get(LAST))  # the same draw of this module with another module alongside
    assert not torch.equal(ca.get(LAST), cc.get(LAST))
    assert not torch.equal(ca.get(LAST), Checkpoint.open(tmp_path / "a" / "sample-001").get(LAST))
    other = "encoder.layer.1.output.dense.weight"
    m = Checkpoint.open(tmp_path / "a" / "map")
    assert torch.equal(ca.get(other), m.get(other)) and not torch.equal(cb.get(other), m.get(other))
    assert fa2["samples"] == ["sample-000", "sample-001"]
    assert noise_seed(7, 1, LAST) != noise_seed(7, 1, other) != noise_seed(7, 2, other)


def test_iid_noise_is_sigma_times_base_rms(work, tmp_path):
    res = sample(work, "tsv", out=tmp_path / "i", iid=0.05, samples=1, seed=2)
    W = Checkpoint.open(tmp_path / "i" / "sample-000").get(LAST).double()
    M = Checkpoint.open(tmp_path / "i" / "map").get(LAST).double()
    w0 = Checkpoint.open(Sources(work, "tsv", "free").proj.base.root).get(LAST).double()
    r = float(w0.square().mean().sqrt())
    s = res["params"]["s_0"]
    E = standard_normal(tuple(W.shape), 2, 0, LAST).double()
    assert torch.allclose(W - M, s * 0.05 * r * E, atol=1e-6)
    assert res["modules"][0]["noise_rms_rel"] == 0.05


def test_sharded_samples_link_unchanged_shards_and_load_with_transformers(work, tmp_path):
    from transformers import BertModel

    out = tmp_path / "sh"
    res = sample(work, "tsv", out=out, beta=10.0, samples=2, max_shard_size="20KB")
    assert res["linked_shards"] > 0
    index = json.loads((out / "sample-001" / "model.safetensors.index.json").read_text())["weight_map"]
    unchanged = sorted({f for k, f in index.items() if f != index[LAST]})
    assert os.path.samefile(out / "sample-001" / unchanged[0], out / "map" / unchanged[0])
    assert not os.path.samefile(out / "sample-001" / index[LAST], out / "map" / index[LAST])
    model = BertModel.from_pretrained(str(out / "sample-001"))
    got = model.state_dict()[LAST]
    assert torch.equal(got, Checkpoint.open(out / "sample-001").get(LAST))
    assert [p.name for p in list_samples(out)] == ["sample-000", "sample-001"]


def test_rerun_with_fewer_samples_removes_the_extra_ones(work, tmp_path):
    out = tmp_path / "r"
    sample(work, "tsv", out=out, beta=10.0, samples=3)
    before = (out / "sample-000" / "model.safetensors").stat().st_mtime_ns
    sample(work, "tsv", out=out, beta=10.0, samples=2)
    assert not (out / "sample-002").exists()
    assert (out / "sample-000" / "model.safetensors").stat().st_mtime_ns == before  # current: not rewritten


@pytest.mark.parametrize("kwargs, msg", [
    ({"beta": 1.0, "iid": 0.1}, "takes no --beta"),
    ({}, "--beta is required"),
    ({"beta": 0.0}, "must be a positive number"),
    ({"beta": float("nan")}, "must be a positive number"),
    ({"iid": -1.0}, "positive finite"),
    ({"beta": 1.0, "modules": "("}, "not a valid regular expression"),
    ({"beta": 1.0, "modules": "nothing-like-this"}, "matches no solvable module"),
    ({"beta": 1.0, "search_beta": "1:10"}, "not both"),
    ({"search_beta": "1:10"}, "needs --eval"),
    ({"search_beta": "10:1", "eval_cmd": "echo 1"}, "LOW must not exceed HIGH"),
    ({"beta": 1.0, "eval_cmd": "echo 1"}, "needs --search-beta"),
    ({"beta": 1.0, "lam": 0.1, "params_file": "p.json"}, "not both"),
])
def test_refused_runs_leave_nothing(work, tmp_path, kwargs, msg):
    out = tmp_path / "never"
    with pytest.raises(InputError, match=msg.replace("(", r"\(").replace("-", r"\-")):
        sample(work, "tsv", out=out, **kwargs)
    assert not out.exists()


def test_foreign_out_dir_is_refused(work, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not a `bmm sample` output"):
        sample(work, "tsv", out=out, beta=1.0)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="work directory"):
        sample(work, "tsv", out=work, beta=1.0, force=True)


def test_search_beta_scores_a_grid_with_the_hook(work, tmp_path):
    """The hook sees an ensemble dir and the β; here it scores -|log10 β - 2|, so the best of 1..1e4 is 100."""
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import json, math, sys\n"
        "d, b = sys.argv[1], float(sys.argv[2])\n"
        "man = json.load(open(d + '/samples.json'))\n"
        "assert len(man['samples']) == 2 and man['complete']\n"
        "print(json.dumps({'score': -abs(math.log10(b) - 2), 'n': len(man['samples'])}))\n")
    out = tmp_path / "bs"
    res = sample(work, "tsv", out=out, search_beta="1:1e4", grid=5, samples=2,
                 eval_cmd=f"{sys.executable} {hook} {{model}} {{beta}}")
    assert res["beta"] == pytest.approx(100.0)
    assert [r["status"] for r in res["beta_search"]] == ["ok"] * 5
    assert json.loads((out / "beta-search.json").read_text())["best_beta"] == pytest.approx(100.0)
    assert not (out / ".beta-search").exists() and sorted(p.name for p in out.iterdir()) == [
        "beta-search.json", "map", "sample-000", "sample-001", "samples.json"]


def test_cli_errors_are_one_line(work, tmp_path):
    def bmm(*args):
        return subprocess.run([sys.executable, "-m", "bmm_cli.cli", "sample", "--work", str(work), *map(str, args)],
                              capture_output=True, text=True)

    p = bmm("--out", tmp_path / "x", "--beta", "1", "--iid", "0.1")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--iid" in p.stderr
    p = bmm("--out", tmp_path / "x", "--beta", "-3")
    assert p.returncode == 2 and "--beta -3.0" in p.stderr
    assert not (tmp_path / "x").exists()
    p = bmm("--out", tmp_path / "y", "--beta", "inf", "--samples", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["samples"] == ["sample-000"]


def test_hybrid_gram_samples_around_the_hybrid_map(family, tmp_path):
    """--gram hybrid: no cached eigenbasis exists (ε changes Ĝ), so the sampled module is eigh'd on the fly."""
    from conftest import write_calib_files

    from bmm_cli.closed_form import hybrid_stats

    base, experts = family("bert")
    w = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], w)
    anchor(w, "pretrained")
    gram(w, "data", calib=write_calib_files(tmp_path, len(experts), 8), samples=8, max_len=16)
    res = sample(w, "pretrained", "hybrid", out=tmp_path / "s", beta=math.inf, samples=1, epsilon=0.3)
    solve(w, "pretrained", "hybrid", out=tmp_path / "m", epsilon=0.3)
    assert (tmp_path / "s" / "sample-000" / "model.safetensors").read_bytes() == \
        (tmp_path / "m" / "model.safetensors").read_bytes()
    src = Sources(w, "pretrained", "hybrid")
    (mod,) = prepare_modules(src, Params.uniform(1, eps=0.3), select_modules(src.proj.plan, None),
                             dev=torch.device("cpu"), need_basis=True)
    blk = next(b for b in src.proj.plan.blocks if any(r.key == LAST for r in b.modules))
    h = hybrid_stats(src.block_stats("free", blk)(LAST), src.block_stats("data", blk)(LAST), 0.3)
    G = (mod.Q.double() * mod.evals.double()) @ mod.Q.double().T
    assert torch.allclose(G, h.G_hat.double(), atol=1e-5)
    assert res["params"]["eps"] == 0.3


def test_params_from_a_search_best_json(work, tmp_path):
    """A search's best.json nests the parameters under "params"; λ and s reach the sampled module."""
    p = Params.uniform(1, lam=0.2, scale=1.25)
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"trial": 3, "score": 0.5, "params": p.flat()}))
    res = sample(work, "tsv", out=tmp_path / "s", beta=math.inf, samples=1, params_file=best)
    solve(work, "tsv", out=tmp_path / "m", lam=0.2, scale=1.25)
    assert (tmp_path / "s" / "sample-000" / "model.safetensors").read_bytes() == \
        (tmp_path / "m" / "model.safetensors").read_bytes()
    assert res["modules"][0]["lam"] == 0.2 and res["modules"][0]["s"] == 1.25


def test_a_sample_needs_disk_only_for_the_shards_it_redraws(work, tmp_path, monkeypatch):
    """Each sample's disk check counts the shards it writes, not those it links from the MAP model: a file system
    with room for half a model takes one more sample; one without room for its redrawn shard refuses it."""
    from types import SimpleNamespace

    from bmm_cli import budget

    out = tmp_path / "d"
    sample(work, "tsv", out=out, beta=10.0, samples=1, max_shard_size="20KB")
    model = sum(f.stat().st_size for f in (out / "map").glob("*.safetensors"))

    def free(n):
        monkeypatch.setattr(budget.os, "statvfs", lambda p: SimpleNamespace(f_bavail=n, f_frsize=1, f_bsize=1))

    free(model // 2)
    res = sample(work, "tsv", out=out, beta=10.0, samples=2, max_shard_size="20KB")
    assert res["linked_shards"] > 0 and (out / "sample-001").is_dir()
    free(1000)
    with pytest.raises(InputError, match="sample-002: the merged model needs"):
        sample(work, "tsv", out=out, beta=10.0, samples=3, max_shard_size="20KB")
    assert not (out / "sample-002").exists()

"""The whole pipeline against an independent fp64 re-derivation from the checkpoints."""

import json

import pytest
import torch

from bmm_cli.anchor import anchor
from bmm_cli.defaults import FREE_LAM_FACTOR
from bmm_cli.errors import InputError
from bmm_cli.factor_cache import Merger
from bmm_cli.gram import gram
from bmm_cli.params import Params, load_params
from bmm_cli.solve import solve
from bmm_cli.store import Checkpoint
from bmm_cli.taskvec import taskvec


def _expected(base, experts, key, lam, s, conv1d=False, u0=None):
    """W = W_pre + s (B + λ m U0)(G + λ m I)^-1 with raw G, B (relative λ), fp64, straight from the files."""
    b = Checkpoint.open(base).get(key).double()
    us = [Checkpoint.open(e).get(key).double() - b for e in experts]
    if conv1d:
        b, us = b.t(), [u.t() for u in us]
    G = sum(u.t() @ u for u in us)
    B = sum(u @ u.t() @ u for u in us)
    m = torch.trace(G) / G.shape[0]
    U0 = torch.zeros_like(b) if u0 is None else u0
    U = torch.linalg.solve((G + lam * m * torch.eye(G.shape[0], dtype=G.dtype)).t(), (B + lam * m * U0).t()).t()
    W = b + s * U
    return W.t() if conv1d else W


def _stages(base, experts, work, method="ta"):
    """taskvec, anchor ``method`` and data-free Grams in ``work``."""
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, method)
    gram(work, "free")
    return work


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pretrained_anchor_free_solve_matches_fp64(family, tmp_path, kind):
    base, experts = family(kind)
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "pretrained")
    gram(work, "free")
    params = Params.uniform(2, lam=0.05, scale=1.1)
    params.lams[1]["mlp_out"] = 0.5
    params.scales[1] = 1.2
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps(params.flat()))
    out = tmp_path / "m"
    solve(work, "pretrained", "free", out=out, params_file=pfile)
    merged = Checkpoint.open(out)
    key = {"bert": "encoder.layer.2.output.dense.weight", "gpt2": "transformer.h.2.mlp.c_proj.weight"}[kind]
    want = _expected(base, experts, key, lam=0.5, s=1.2, conv1d=(kind == "gpt2"))
    got = merged.get(key).double()
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-4), (got - want).abs().max()
    key0 = {"bert": "encoder.layer.0.attention.self.query.weight", "gpt2": "transformer.h.0.attn.c_attn.weight"}[kind]
    want0 = _expected(base, experts, key0, lam=0.05, s=1.1, conv1d=(kind == "gpt2"))
    assert torch.allclose(merged.get(key0).double(), want0, atol=2e-6, rtol=1e-4)
    # other tensors: the pretrained anchor keeps the base
    b = Checkpoint.open(base)
    other = [k for k in b.keys() if "LayerNorm" in k or "ln_" in k][0]
    assert torch.equal(merged.get(other), b.get(other))


def test_tsv_anchor_enters_the_solve(family, tmp_path):
    base, experts = family("bert")
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "tsv")
    gram(work, "free")
    out = tmp_path / "m"
    solve(work, "tsv", "free", out=out, lam=0.3, scale=1.0)
    key = "encoder.layer.1.intermediate.dense.weight"
    from bmm_cli.store import ShardReader

    u0 = ShardReader(work / "anchor-tsv" / "block-001.safetensors").get(key).double()
    want = _expected(base, experts, key, lam=0.3, s=1.0, u0=u0)
    assert torch.allclose(Checkpoint.open(out).get(key).double(), want, atol=2e-6, rtol=1e-4)
    # lam -> infinity gives the anchor merge itself
    out2 = tmp_path / "m2"
    solve(work, "tsv", "free", out=out2, lam=1e7, scale=1.0)
    b = Checkpoint.open(base).get(key).double()
    assert torch.allclose(Checkpoint.open(out2).get(key).double(), b + u0, atol=1e-5)


def test_merger_trials_equal_direct_solves(family, tmp_path):
    base, experts = family("llama")
    work = _stages(base, experts, tmp_path / "w")
    params = Params.uniform(3, lam=0.02, scale=1.05)
    params.lams[2]["attn_in"] = 0.7
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps(params.flat()))
    solve(work, "ta", "free", out=tmp_path / "direct", params_file=pfile)
    m = Merger(work, "ta", "free")
    m.write(params, tmp_path / "cached")
    m.close()
    a, c = Checkpoint.open(tmp_path / "direct"), Checkpoint.open(tmp_path / "cached")
    for k in a.keys():
        assert torch.allclose(a.get(k).float(), c.get(k).float(), atol=1e-5, rtol=1e-4), k


def test_params_file_errors(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"s_0": 1.0, "lam_0_attn_in": 0.1}))
    with pytest.raises(InputError, match="missing lam_0_attn_out"):
        load_params(p)
    p.write_text(json.dumps({"params": {**Params.uniform(1).flat(), "lam_0_mlp_in": -1}}))
    with pytest.raises(InputError, match="lam_0_mlp_in = -1"):
        load_params(p)
    with pytest.raises(InputError, match="not found"):
        load_params(tmp_path / "nope.json")


def test_merger_small_lambda_matches_fp64(family, tmp_path):
    """Search trials at the bottom of the λ range: the cached eigenbasis is built in fp64 (an fp32 eigh leaves
    rounding noise in Ĝ's null space that 1/(Λ+λ) amplifies; bench/README.md measures it)."""
    base, experts = family("llama")
    work = _stages(base, experts, tmp_path / "w")
    lam = 1e-4
    m = Merger(work, "ta", "free", device="cpu")
    m.write(Params.uniform(1, lam=lam, scale=1.0), tmp_path / "cached")
    m.close()
    got = Checkpoint.open(tmp_path / "cached")
    u0_reader = __import__("bmm_cli.store", fromlist=["ShardReader"]).ShardReader
    b = Checkpoint.open(base)
    worst = 0.0
    for key in [k for k in b.keys() if k.endswith("proj.weight") and ".layers." in k]:
        blk = int(key.split(".layers.")[1].split(".")[0])
        u0 = u0_reader(work / "anchor-ta" / f"block-{blk:03d}.safetensors").get(key).double()
        want = _expected(base, experts, key, lam=lam, s=1.0, u0=u0) - b.get(key).double()
        err = float((got.get(key).double() - b.get(key).double() - want).norm() / want.norm())
        worst = max(worst, err)
    assert worst < 8e-5, worst  # fp64 eigh: 4.4e-5 (fp32 storage); an fp32 eigh gives 1.2e-4 here


def test_rerun_with_the_same_plan_keeps_the_output(family, tmp_path, capsys):
    """An unchanged rerun does not rewrite the model (an 8B output is 16 GB); any change of inputs, parameters,
    a damaged shard or --force does."""
    base, experts = family("bert")
    work = _stages(base, experts, tmp_path / "w")
    out = tmp_path / "m"

    def stamp():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir())}

    solve(work, "ta", "free", out=out, lam=0.3, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    first, before = stamp(), {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    solve(work, "ta", "free", out=out, lam=0.3, max_shard_size="100KB")
    assert stamp() == first
    assert "is up to date" in capsys.readouterr().err
    assert not (tmp_path / ".m.bmm-partial").exists()
    solve(work, "ta", "free", out=out, lam=0.3, max_shard_size="100KB", force=True)
    assert stamp() != first
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same bytes, freshly written
    second = stamp()
    solve(work, "ta", "free", out=out, lam=0.4, max_shard_size="100KB")
    assert stamp() != second
    changed = {p.name: p.read_bytes() for p in out.iterdir()}
    assert changed != before
    shard = sorted(out.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 8)
    solve(work, "ta", "free", out=out, lam=0.4, max_shard_size="100KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == changed


def _lora_family(root):
    """A tiny Llama base and 3 LoRA-like experts: every block weight moved by a pure rank-2 update."""
    from conftest import save, tiny_model, tiny_tokenizer

    base = tiny_model("llama", 0)
    base_dir = save(base, root / "base")
    tiny_tokenizer().save_pretrained(str(base_dir))
    experts = []
    for t in range(3):
        m = tiny_model("llama", 0)
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(300 + t)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 2 and ".layers." in name:
                    p.add_(0.02 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
        experts.append(save(m, root / f"expert{t}"))
    return base_dir, experts


def _small_lambda_params():
    """A searched best with λ_attn_out = 1.3e-4 at the bottom of the range, the rest moderate."""
    p = Params.uniform(1, lam=0.02, scale=1.0)
    p.lams[0]["attn_out"] = 1.3e-4
    p.lams[0]["mlp_out"] = 3e-3
    return p


def _rel_max_err(got_dir, base, experts, lams_by_key, work):
    """max |W - W_ref| / max |W_ref - W_pre| over the block weights, W_ref in fp64 from the checkpoints."""
    from bmm_cli.store import ShardReader

    got, b = Checkpoint.open(got_dir), Checkpoint.open(base)
    worst = {}
    for key in [k for k in b.keys() if k.endswith("proj.weight") and ".layers." in k]:
        blk = int(key.split(".layers.")[1].split(".")[0])
        u0 = ShardReader(work / "anchor-ta" / f"block-{blk:03d}.safetensors").get(key).double()
        lam = lams_by_key(key)
        want = _expected(base, experts, key, lam=lam, s=1.0, u0=u0)
        delta = (want - b.get(key).double()).abs().max()
        err = float((got.get(key).double() - want).abs().max() / delta)
        worst[lam] = max(worst.get(lam, 0.0), err)
    return worst


def _rel_max_gap(a_dir, b_dir, base):
    """max over block weights of max |W_a - W_b| / max |W_b - W_pre|."""
    a, c, b = Checkpoint.open(a_dir), Checkpoint.open(b_dir), Checkpoint.open(base)
    keys = [k for k in b.keys() if k.endswith("proj.weight") and ".layers." in k]
    return max(float((a.get(k).double() - c.get(k).double()).abs().max()
                     / (c.get(k).double() - b.get(k).double()).abs().max()) for k in keys)


def test_solve_reproduces_the_searched_model_at_small_lambda(tmp_path):
    """`bmm solve --params best.json` writes the model the search scored: with the search's factor cache in the
    work dir bit for bit, and without it the direct solve is as accurate as the cached one against fp64
    (an fp32 Cholesky is off by 1.2 % at λ_attn_out = 1.3e-4, the cached trial by 0.09 %)."""
    base, experts = _lora_family(tmp_path)
    work = _stages(base, experts, tmp_path / "w")
    params = _small_lambda_params()
    pfile = tmp_path / "best.json"
    pfile.write_text(json.dumps({"trial": 7, "params": params.flat()}))
    proj_lam = lambda key: 1.3e-4 if "o_proj" in key else (3e-3 if "down_proj" in key else 0.02)  # noqa: E731

    res = solve(work, "ta", "free", out=tmp_path / "direct", params_file=pfile, device="cpu")
    assert res["path"].startswith("direct")
    direct = _rel_max_err(tmp_path / "direct", base, experts, proj_lam, work)
    m = Merger(work, "ta", "free", device="cpu")
    m.write(params, tmp_path / "trial")
    m.close()
    cached = _rel_max_err(tmp_path / "trial", base, experts, proj_lam, work)
    gap = _rel_max_gap(tmp_path / "direct", tmp_path / "trial", base)
    print(direct, cached, gap)
    assert gap < 1e-4, gap
    assert direct[1.3e-4] <= 1.1 * cached[1.3e-4], (direct, cached)  # no worse than the trial against fp64

    res = solve(work, "ta", "free", out=tmp_path / "resolved", params_file=pfile, device="cpu")
    assert res["path"].startswith("cached")  # the search's cache is there now: the same code as the trial
    a, c = Checkpoint.open(tmp_path / "trial"), Checkpoint.open(tmp_path / "resolved")
    assert a.keys() == c.keys()
    for k in a.keys():
        assert torch.equal(a.get(k), c.get(k)), k


def test_merger_memory_budget_places_the_cache_and_gives_the_same_model(family, tmp_path):
    """Below the cache size the blocks that do not fit the host budget are spilled (to --spill-dir) and read back
    per trial: the merged model is bit-identical to the all-resident one; placement() says where and why;
    close() removes the spill files; a dead process's spill dir is cleaned up; bad budgets are refused."""
    base, experts = family("llama")
    work = _stages(base, experts, tmp_path / "w")
    params = Params.uniform(3, lam=0.05, scale=1.1)
    m = Merger(work, "ta", "free", device="cpu")
    plan = m.solver.plan()
    assert plan["where"] == {"device": 3} and "3 blocks in host memory, 0 spilled" in m.placement()
    assert "MemAvailable minus reserve" in m.placement()
    m.write(params, tmp_path / "resident")
    m.close()
    spill = tmp_path / "spill"
    stale = spill / "bmm-trial-cache-999999999-abcdef"  # left by a killed search (no such pid)
    stale.mkdir(parents=True)
    (stale / "block-0.safetensors").write_bytes(b"x")
    one = plan["max_block_bytes"]
    for budget, held in ((one, 1), ("0", 0)):
        m = Merger(work, "ta", "free", device="cpu", memory_budget=budget, spill_dir=spill)
        assert not stale.exists()
        line = m.placement()
        assert f"{held} blocks in host memory, {3 - held} spilled to {spill}" in line, line
        assert "given" in line and line.startswith("trial cache ")
        mine = [d for d in spill.iterdir() if d.is_dir()]
        assert len(mine) == 1 and len(list(mine[0].glob("block-*.safetensors"))) == 3 - held
        for trial in range(2):  # a spilled block is read back every trial
            m.write(params, tmp_path / f"spilled{trial}")
            a, c = Checkpoint.open(tmp_path / "resident"), Checkpoint.open(tmp_path / f"spilled{trial}")
            assert all(torch.equal(a.get(k), c.get(k)) for k in a.keys())
        m.close()
        assert not list(spill.iterdir())
    with pytest.raises(InputError, match="--memory-budget 'lots'"):
        Merger(work, "ta", "free", device="cpu", memory_budget="lots")
    with pytest.raises(InputError, match="--gpu-memory-budget -1"):
        Merger(work, "ta", "free", device="cpu", gpu_memory_budget=-1)


@pytest.mark.parametrize("command", ["solve", "search"])
def test_more_block_groups_than_layers_is_refused_before_any_work(command, family, tmp_path):
    """`bmm solve --blocks N` / `bmm search --blocks N` with N above the number of layers: one line naming the
    option, before a model or a search state is written."""
    from conftest import ready_work

    from bmm_cli.search import search

    work = ready_work(family, "llama", tmp_path / "w")
    before = sorted(p.name for p in work.iterdir())
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"--blocks 9: 9 block-groups .* at most 3"):
        if command == "solve":
            solve(work, "ta", "free", out=out, blocks=9, device="cpu")
        else:
            search(work, "ta", "free", "echo 1", out=out, blocks=9, trials=2, device="cpu")
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == before


def test_default_lambda_is_the_evidence_per_module_and_kept_in_the_work_dir(family, tmp_path, monkeypatch):
    """Without --lam/--params the solve takes each (layer, group)'s type-II maximum-likelihood λ: the
    model equals an explicit params file of those λ with s = 1; the λ are computed once and kept in the work dir
    (a rerun neither recomputes them nor rewrites the model); changed inputs recompute them."""
    from conftest import ready_work

    from bmm_cli import default_params
    from bmm_cli.default_params import evidence_params
    from bmm_cli.workdir import Sources

    work = ready_work(family, "llama", tmp_path / "w")
    res = solve(work, "ta", "free", out=tmp_path / "auto", device="cpu")
    kept = json.loads((work / "evidence-ta-free.json").read_text())
    lams = default_params.module_lams(work, "ta", "free")
    assert kept["modules"] == pytest.approx(lams, rel=1e-12) and len(set(round(v, 9) for v in lams.values())) > 1
    flat = default_params.params_per_layer(work, {k: v * FREE_LAM_FACTOR for k, v in lams.items()}, 1.0)
    (tmp_path / "p.json").write_text(json.dumps(flat))
    solve(work, "ta", "free", out=tmp_path / "explicit", params_file=tmp_path / "p.json", device="cpu")
    a, b = Checkpoint.open(tmp_path / "auto"), Checkpoint.open(tmp_path / "explicit")
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    assert res["params"] == flat
    assert "maximum likelihood" in json.loads((tmp_path / "auto" / "bmm_merge.json").read_text())["lam_rule"]

    def boom(*a, **k):
        raise AssertionError("evidence λ recomputed")

    monkeypatch.setattr(default_params, "module_lams", boom)
    before = (tmp_path / "auto" / "model.safetensors").stat().st_mtime_ns
    solve(work, "ta", "free", out=tmp_path / "auto", device="cpu")
    assert (tmp_path / "auto" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(AssertionError, match="recomputed"):  # another anchor: other inputs, computed anew
        anchor(work, "ties")
        evidence_params(Sources(work, "ties", "free"), scale=1.0, eps=None)

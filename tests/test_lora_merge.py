"""LoRA experts through ``bmm merge`` / ``taskvec`` / ``plan``: ``-e ADAPTER`` and ``-e BASE+ADAPTER`` give the same
merged model as the dense merge of the same experts made full (peft's own ``merge_and_unload``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import perturb, save, tiny_model, tiny_tokenizer
from safetensors import safe_open
from test_lora import make_adapter

from bmm_cli.workdir import load_project

peft = pytest.importorskip("peft")


def bmm(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def _full(base_dir, adapter_dir, out):
    """The adapter merged into its base by peft, saved as a dense expert."""
    import transformers as tf

    m = peft.PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    m.merge_and_unload().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """A tiny Llama base, a plain LoRA adapter, an rsLoRA adapter with ``modules_to_save``, a dense expert; and the
    two adapters made full."""
    root = tmp_path_factory.mktemp("lora-merge")
    base = save(tiny_model("llama", 0), root / "base")
    tiny_tokenizer().save_pretrained(str(base))
    make_adapter(tiny_model("llama", 0), root / "plain", 11, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    make_adapter(tiny_model("llama", 0), root / "rs", 12, r=2, lora_alpha=4, use_rslora=True,
                 target_modules=["q_proj", "k_proj", "gate_proj"], modules_to_save=["lm_head"])
    dense = tiny_model("llama", 0)
    perturb(dense, 13)
    dense = save(dense, root / "dense")
    full = [_full(base, root / "plain", root / "plain-full"), _full(base, root / "rs", root / "rs-full")]
    return base, [root / "plain", root / "rs", dense], full


def _tensors_of(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping


def _tensors(d):
    return _tensors_of(d / "model.safetensors")


def test_lora_experts_merge_as_their_full_models(lora_family, tmp_path):
    import transformers as tf

    base, (plain, rs, dense), (plain_full, rs_full) = lora_family
    out_lora, out_dense = tmp_path / "lora", tmp_path / "dense"
    # task arithmetic as the anchor: TSV's orthogonalisation depends on the null-space directions of exactly
    # low-rank task vectors, which the dense experts fill with rounding noise
    bmm("merge", "--base", base, "-e", plain, "-e", f"{base}+{rs}", "-e", dense, "--anchor", "ta", "--out", out_lora)
    bmm("merge", "--base", base, "-e", plain_full, "-e", rs_full, "-e", dense, "--anchor", "ta", "--out", out_dense)
    ours, want = _tensors(out_lora), _tensors(out_dense)
    assert ours.keys() == want.keys()
    b = _tensors(base)
    for k, w in want.items():
        assert torch.allclose(ours[k], w, atol=2e-6, rtol=1e-4), (k, float((ours[k] - w).abs().max()))
        assert not torch.equal(ours[k], b[k]) or torch.equal(w, b[k]), k
    card = json.loads((out_lora / "bmm_merge.json").read_text())
    assert card["experts"][:2] == [str(plain.resolve()), str(rs.resolve())]
    model = tf.AutoModelForCausalLM.from_pretrained(str(out_lora))
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()


def test_lora_task_vectors_and_resume(lora_family, tmp_path):
    base, (plain, rs, _), _ = lora_family
    work = tmp_path / "w"
    bmm("taskvec", "--base", base, "-e", plain, "-e", rs, "--work", work)
    man = json.loads((work / "taskvec" / "stage.json").read_text())
    assert man["paths"]["experts"] == [f"{base.resolve()}+{plain.resolve()}", f"{base.resolve()}+{rs.resolve()}"]
    kept = tmp_path / "kept"  # a stored float32 copy: the same bits as the recomputed task vectors
    bmm("taskvec", "--base", base, "-e", plain, "-e", rs, "--work", kept, "--store", "float32")
    with safe_open(str(kept / "taskvec" / "block-000.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.k_proj.weight@0"), torch.zeros(16, 32))
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight@1").abs().sum() > 0
    proj, proj_kept = load_project(work), load_project(kept)
    assert not proj.stored and proj_kept.stored
    for blk in proj.plan.blocks:
        for ref in blk.modules:
            assert torch.equal(proj.taus(blk, ref), proj_kept.taus(blk, ref)), ref.key
    # the stage's identity covers the adapter files: a retrained adapter is not silently reused
    make_adapter(tiny_model("llama", 0), tmp_path / "plain2", 99, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    (plain / "adapter_model.safetensors").rename(tmp_path / "saved.safetensors")
    try:
        (tmp_path / "plain2" / "adapter_model.safetensors").rename(plain / "adapter_model.safetensors")
        p = bmm("taskvec", "--base", base, "-e", plain, "-e", rs, "--work", work, check=False)
        assert p.returncode != 0 and "different inputs" in p.stderr
    finally:
        (tmp_path / "saved.safetensors").replace(plain / "adapter_model.safetensors")


def test_plan_and_refusals(lora_family, tmp_path):
    base, (plain, rs, dense), _ = lora_family
    r = json.loads(bmm("plan", "--base", base, "-e", plain, "-e", f"{base}+{rs}", "--json").stdout)
    assert r["experts"] == [str(plain.resolve()), str(rs.resolve())] and not r["unknown"]
    assert r["lora"]["1"] == {"adapter": str(plain.resolve()), "ranks": [4], "solvable_modules": 15,
                              "other_tensors": []}
    assert r["lora"]["2"]["solvable_modules"] == 9 and r["lora"]["2"]["other_tensors"] == ["lm_head.weight"]
    # the time estimate reads the base's solvable tensors and the adapters' factors, not dense expert tensors
    factors = 0
    for ad in (plain, rs):
        with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
            factors += sum(f.get_tensor(k).nbytes for k in f.keys() if ".lora_" in k)  # noqa: SIM118
    assert r["time"]["read_bytes"] == 4 * r["solvable_parameters"] + factors
    human = bmm("plan", "--base", base, "-e", plain, rs).stdout
    assert "expert 1: rank 4 on 15 of 21 solvable modules" in human
    p = bmm("merge", "--base", plain, "-e", dense, "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "is a PEFT LoRA adapter" in p.stderr
    p = bmm("merge", "--base", base, "-e", f"{dense}+{plain}", "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "is not the merge's base" in p.stderr
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "w1 w2"}\n')
    p = bmm("merge", "--base", base, "-e", plain, "-e", dense, "--calib", f"1={calib}", f"2={calib}",
            "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "LoRA" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.bmm-work").exists()
    w = tmp_path / "w"  # the gram stage on its own refuses them too, before any work
    bmm("taskvec", "--base", base, "-e", plain, "-e", dense, "--work", w)
    p = bmm("gram", "--work", w, "--kind", "data", "--calib", f"1={calib}", f"2={calib}", check=False)
    assert p.returncode == 2 and "LoRA" in p.stderr and not (w / "gram-data").exists()


def test_lora_experts_merged_to_one_adapter(lora_family, tmp_path):
    import transformers as tf

    base, (plain, rs, dense), _ = lora_family
    common = ["--base", base, "-e", plain, rs, "--anchor", "ta", "--work", tmp_path / "w"]
    bmm("merge", *common, "--out", tmp_path / "full")
    r = json.loads(bmm("merge", *common, "--out-format", "peft", "--out", tmp_path / "ad", "--json").stdout)
    assert r["rank"] <= 4 + 2 and r["min_energy"] == pytest.approx(1.0, abs=1e-9)
    assert r["modules_to_save"] == ["lm_head.weight"]
    ids = torch.tensor([[1, 5, 7, 9, 2]])

    def logits(m):
        with torch.no_grad():
            return m.eval()(input_ids=ids).logits

    want = logits(tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")))
    ad = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "ad"))
    torch.testing.assert_close(logits(ad), want, rtol=1e-4, atol=1e-5)
    assert "- bmm" in (tmp_path / "ad" / "README.md").read_text()  # the card (local parents: in its recipe)
    # above --rank the update is cut by SVD and the energy kept is reported per module
    r2 = json.loads(bmm("merge", *common, "--out-format", "peft", "--rank", "2", "--out", tmp_path / "ad",
                        "--json").stdout)  # a bmm output: replaced without --force
    assert r2["rank"] == 2 and 0 < r2["min_energy"] < 1
    assert r2["modules"]["model.layers.0.self_attn.k_proj.weight"]["energy"] == pytest.approx(1.0)
    p = bmm("merge", "--base", base, "-e", plain, dense, "--out-format", "peft", "--out", tmp_path / "x",
            check=False)
    assert p.returncode == 2 and "expert 2" in p.stderr and "not a LoRA adapter" in p.stderr
    p = bmm("merge", "--base", base, "-e", plain, rs, "--rank", "2", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "--out-format peft" in p.stderr
    assert not (tmp_path / "x").exists()


def test_adapter_output_is_budgeted_as_an_adapter(lora_family, tmp_path, tmpfs):
    """``--out-format peft`` checks the output disk for the adapter it writes, not for a full model: the estimate
    bounds the real adapter from above, and a file system that holds the adapter but not the model takes it."""
    from bmm_cli import budget
    from bmm_cli.arch import build_plan
    from bmm_cli.lora import LoraCheckpoint
    from bmm_cli.store import Checkpoint

    base, (plain, rs, _), _ = lora_family
    b = Checkpoint.open(base)
    es = [LoraCheckpoint.open(b, plain), LoraCheckpoint.open(b, rs)]
    plan = build_plan(((k, m.shape) for k, m in b.meta.items()))
    est = {a: budget.adapter_bytes(plan, b.meta, es, anchor=a) for a in ("ta", "ties")}
    full = budget.output_bytes(b.meta)
    bmm("merge", "--base", base, "-e", plain, rs, "--anchor", "ta", "--work", tmp_path / "w", "--out-format", "peft",
        "--out", tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        real = sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # noqa: SIM118 - safe_open is not a mapping
    assert real <= est["ta"] < est["ties"] and est["ta"] < full / 2, (real, est, full)
    assert budget.adapter_bytes(plan, b.meta, es, anchor="ties", rank=2) < est["ties"]
    size = est["ta"] + 40 * 1024  # room for the adapter and its small files, not for the model
    assert full > size
    mnt = tmpfs(f"{-(-size // 4096) * 4}k")
    if mnt is None:
        pytest.skip("mounting a tmpfs needs root")
    p = bmm("merge", "--base", base, "-e", plain, rs, "--anchor", "ta", "--work", tmp_path / "w",
            "--out-format", "peft", "--out", mnt / "ad", check=False)
    assert p.returncode == 0, p.stderr
    p = bmm("merge", "--base", base, "-e", plain, rs, "--anchor", "ta", "--work", tmp_path / "w",
            "--out", mnt / "model", check=False)
    assert p.returncode == 2 and "the merged model" in p.stderr and not (mnt / "model").exists(), p.stderr


@pytest.mark.parametrize("method", ["tsv", "iso-c", "iso-cts"])
def test_svd_anchors_of_lora_experts_keep_only_their_ranks(lora_family, tmp_path, method):
    """The anchor stage tells the SVD anchors each LoRA expert's rank: U0 of every module equals the anchor of the
    exact (float64) products B·A, not of their float32 rounding; the direct path (anchor --materialize from
    --base/--experts) gets the same bounds."""
    from bmm_cli.anchor import anchor
    from bmm_cli.anchors import ModuleInput, get_method
    from bmm_cli.lora import LoraCheckpoint
    from bmm_cli.store import Checkpoint
    from bmm_cli.taskvec import taskvec

    base, (plain, rs, _), _ = lora_family
    work = tmp_path / "w"
    taskvec(str(base), [str(plain), str(rs)], work)
    anchor(work, method)
    u0 = {}
    for f in sorted((work / f"anchor-{method}").glob("block-*.safetensors")):
        u0.update(_tensors_of(f))
    b = Checkpoint.open(base)
    es = [LoraCheckpoint.open(b, plain), LoraCheckpoint.open(b, rs)]
    m = get_method(method)
    checked = 0
    for key, got in u0.items():
        exact = []
        for e in es:
            f = e.factors(key)
            exact.append(torch.zeros(got.shape, dtype=torch.float64) if f is None else f[0].double() @ f[1].double())
        exact = torch.stack(exact)
        if not exact.any():
            continue
        want = m.module(ModuleInput(key, exact, exact[0]), None, None, "cpu")
        assert float((got.double() - want).norm() / want.norm()) < 1e-5, key
        checked += 1
    assert checked == 21  # every solvable module: plain adapts 15, rs 9, together all 21
    out = tmp_path / "direct"
    bmm("anchor", "--base", base, "-e", plain, rs, "--method", method, "--materialize", out)
    bmm("anchor", "-w", work, "--method", method, "--materialize", tmp_path / "staged")
    staged = _tensors(tmp_path / "staged")  # the direct path reads W_t = W_pre + ΔW: rounding apart, the same
    for k, a in _tensors(out).items():
        torch.testing.assert_close(a, staged[k], rtol=1e-5, atol=1e-6, msg=k)

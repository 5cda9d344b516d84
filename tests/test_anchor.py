"""The anchor stage: streamed per block == in memory, for every method; --materialize loads in transformers."""

import json

import pytest
import torch
from conftest import calib_texts

from bmm_cli.anchor import anchor
from bmm_cli.anchors import METHODS, ModuleInput, get_method, parse_options
from bmm_cli.arch import build_plan
from bmm_cli.errors import InputError
from bmm_cli.gram import gram
from bmm_cli.store import Checkpoint, ShardReader
from bmm_cli.taskvec import taskvec

FAST = {"wudi": ["steps=5"]}


@pytest.fixture(scope="module")
def prepared(family, tmp_path_factory):
    base, experts = family("gpt2")  # Conv1D orientation + fused c_attn
    work = tmp_path_factory.mktemp("anchor") / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    specs = []
    for t in range(len(experts)):
        p = work.parent / f"c{t}.txt"
        p.write_text("\n".join(calib_texts(6, t)))
        specs.append(f"{t + 1}={p}")
    gram(work, "data", calib=specs, samples=6, max_len=24)
    return base, experts, work


def _in_memory(method_name, base, experts, work, opts):
    """The whole model in memory, no stage files: the reference the stream must equal."""
    m = get_method(method_name)
    o = parse_options(m, opts)
    b = Checkpoint.open(base)
    es = [Checkpoint.open(e) for e in experts]
    plan = build_plan((k, v.shape) for k, v in b.meta.items())
    refs = {r.key: r for r in plan.modules}
    W0 = {k: b.get(k) for k in b.keys()}
    taus = {}
    for k, w in W0.items():
        if not w.is_floating_point():
            continue
        t = torch.stack([e.get(k).float() - w.float() for e in es])
        if k in refs and refs[k].conv1d:
            t = t.transpose(1, 2)
        taus[k] = t
    state = m.prepare(o, lambda: iter(list(taus.items())), len(es)) if m.needs_global_pass else None
    if state is not None:
        state = json.loads(json.dumps(state))  # the stage keeps it as JSON
    grams = None
    if m.needs_data_grams:
        grams = {}
        for blk in plan.blocks:
            rs = [ShardReader(work / "gram-data" / f"t{t}-{blk.shard}.safetensors") for t in range(len(es))]
            for r in blk.modules:
                grams[r.key] = torch.stack([x.get(r.key) for x in rs])
    out = {}
    for k, w in W0.items():
        if k in refs:
            base_l = w.float().t() if refs[k].conv1d else w.float()
            out[k] = m.module(ModuleInput(k, taus[k], base_l, grams[k] if grams else None), o, state, "cpu")
        elif w.is_floating_point():
            out[k] = m.other(k, w.float(), taus[k], o, state)
    return out


@pytest.mark.parametrize("method", [n for n in METHODS if n != "external"])
def test_streamed_equals_in_memory(prepared, method):
    base, experts, work = prepared
    opts = FAST.get(method, [])
    anchor(work, method, opts)
    want = _in_memory(method, base, experts, work, opts)
    sdir = work / f"anchor-{method}"
    got = {}
    for p in sorted(sdir.glob("*.safetensors")):
        r = ShardReader(p)
        got.update({k: r.get(k) for k in r.keys()})
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-6, rtol=1e-5), (method, k)


@pytest.mark.parametrize("method", ["ties", "tsv", "regmean"])
def test_materialize_loads_and_equals_base_plus_u0(prepared, tmp_path, method):
    from transformers import AutoModelForCausalLM

    base, experts, work = prepared
    out = tmp_path / f"{method}-model"
    res = anchor(work, method, materialize=out)
    assert res["model"] == str(out)
    AutoModelForCausalLM.from_pretrained(str(out))
    key = "transformer.h.1.attn.c_attn.weight"
    u0 = ShardReader(work / f"anchor-{method}" / "block-001.safetensors").get(key)
    w = Checkpoint.open(out).get(key)
    assert torch.allclose(w, Checkpoint.open(base).get(key) + u0.t(), atol=1e-6)  # Conv1D written back transposed


def test_external_anchor_is_the_given_model(prepared, tmp_path):
    base, experts, work = prepared
    out = tmp_path / "ta-model"
    anchor(work, "ta", materialize=out)
    anchor(work, "external", external=str(out))
    key = "transformer.h.0.mlp.c_fc.weight"
    u0 = ShardReader(work / "anchor-external" / "block-000.safetensors").get(key)
    want = (Checkpoint.open(out).get(key) - Checkpoint.open(base).get(key)).t()
    assert torch.allclose(u0, want, atol=1e-6)
    with pytest.raises(InputError, match="needs --model"):
        anchor(work, "external")


def test_changed_options_are_refused(prepared):
    from bmm_cli.errors import StateError

    _, _, work = prepared
    anchor(work, "ta", ["lam=0.3"])
    with pytest.raises(StateError, match="options"):
        anchor(work, "ta", ["lam=0.5"])
    with pytest.raises(InputError, match="unknown option"):
        anchor(work, "ta", ["lamda=0.5"])


@pytest.mark.parametrize("opts", [{"dtype": "int8"}, {"max_shard_size": "lots"}])
def test_materialize_output_options_are_checked_before_the_stage(family, tmp_path, opts):
    """`bmm anchor --materialize OUT --dtype int8`: refused before the anchor stage is computed."""
    base, experts = family("gpt2")
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    with pytest.raises(InputError, match="--dtype 'int8'|--max-shard-size"):
        anchor(work, "iso-c", materialize=tmp_path / "out", **opts)
    assert not (work / "anchor-iso-c").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ta", "ties", "dare", "dare-ties", "tsv"])
def test_direct_equals_taskvec_stage_path(prepared, tmp_path, method):
    """No work dir: W_t − W_pre streamed per tensor gives the same bytes as taskvec + anchor --materialize."""
    from bmm_cli.anchor import anchor_direct

    base, experts, work = prepared
    opts = []  # the shared work dir's stages were made with the defaults
    staged = tmp_path / "staged"
    anchor(work, method, opts, materialize=staged, dtype="bfloat16", force=True)
    direct = tmp_path / "direct"
    res = anchor_direct(str(base), [str(e) for e in experts], method, opts, materialize=direct, dtype="bfloat16")
    assert res["model"] == str(direct) and res["streamed"]
    assert not (tmp_path / "direct.bmm-work").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "direct", "staged"]
    a, b = Checkpoint.open(staged), Checkpoint.open(direct)
    assert list(a.meta) == list(b.meta)
    for k in a.meta:
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and torch.equal(x, y), (method, k)


def test_direct_cli_needs_base_experts_and_out(prepared, tmp_path, capsys):
    from bmm_cli.cli import main

    def bmm(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        return e.value.code

    base, experts, _ = prepared
    es = [str(e) for e in experts]
    out = tmp_path / "ta"
    rc = bmm("anchor", "--method", "ta", "--base", str(base), "--experts", *es, "--materialize", str(out))
    assert rc in (0, None)
    assert (out / "config.json").exists()
    assert bmm("anchor", "--method", "ta", "--base", str(base)) == 2
    assert "--materialize" in capsys.readouterr().err
    rm = tmp_path / "rm"
    assert bmm("anchor", "--method", "regmean", "--base", str(base), "--experts", *es, "--materialize", str(rm)) == 2
    assert "data Grams" in capsys.readouterr().err and not rm.exists()

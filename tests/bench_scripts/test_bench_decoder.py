"""Decoder benchmark pieces on tiny real models: windows, per-window loss, gap closed with paired SEs, and the
evidence-λ params file end to end through `bmm solve --params`."""

import json
import math

import pytest
import torch

from bench.common import BenchError
from bench.decoder_bench import PREFIX, gap_stats, paired_gap_se, paired_gap_se_parts, se_sizing
from bench.decoder_common import file_windows, parse_domains, window_losses, window_token_losses
from bmm_cli.anchor import anchor
from bmm_cli.default_params import module_lams, params_per_layer
from bmm_cli.evidence import evidence_lam, residual_energy, spectrum
from bmm_cli.gram import gram
from bmm_cli.solve import solve
from bmm_cli.taskvec import taskvec
from bmm_cli.workdir import Sources, load_project


def test_file_windows_drop_the_tail():
    ids = list(range(10))
    assert file_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert file_windows(ids[:3], 4) == []


def test_parse_domains_refuses_unknown():
    assert parse_domains("man,rst") == ["man", "rst"]
    with pytest.raises(BenchError, match="latex"):
        parse_domains("man,latex")


def test_window_losses_equal_the_model_loss(family):
    from transformers import AutoModelForCausalLM

    base, _ = family("llama")
    m = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.randint(0, 100, (5, 9), generator=torch.Generator().manual_seed(0))
    w = window_losses(m, ids, batch_size=2)
    with torch.no_grad():
        ref = m(input_ids=ids, labels=ids).loss  # every window has the same length: mean of means = mean
    assert w.shape == (5,)
    assert float(w.mean()) == pytest.approx(float(ref), rel=1e-5)
    with torch.no_grad():
        one = m(input_ids=ids[3:4], labels=ids[3:4]).loss
    assert float(w[3]) == pytest.approx(float(one), rel=1e-5)


def test_token_losses_of_a_prefix_equal_the_shorter_window(family):
    """A causal LM's loss on the first P tokens of a window does not depend on the tokens after them."""
    from transformers import AutoModelForCausalLM

    base, _ = family("llama")
    m = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    nll = window_token_losses(m, ids, batch_size=2)
    assert nll.shape == (3, 11) and nll.dtype == torch.float64
    assert torch.allclose(nll[:, :5].mean(1), window_losses(m, ids[:, :6]), rtol=1e-5)
    assert torch.allclose(nll.mean(1), window_losses(m, ids), rtol=1e-12)


def _row(losses):
    return {f"loss/{d}": sum(v) / len(v) for d, v in losses.items()} | {f"windows/{d}": v for d, v in losses.items()}


def test_gap_closed_and_paired_se_by_hand():
    rows = {
        "base": _row({"a": [2.0, 2.0, 2.0], "b": [3.0, 3.0, 3.0]}),
        "expert-a": _row({"a": [1.0, 1.0, 1.0]}),
        "expert-b": _row({"b": [2.0, 2.0, 2.0]}),
        "m1": _row({"a": [1.5, 1.4, 1.6], "b": [2.5, 2.5, 2.5]}),
        "m2": _row({"a": [1.5, 1.5, 1.5], "b": [2.4, 2.6, 2.5]}),
    }
    st = gap_stats(rows, ["a", "b"])
    assert st["gaps"] == {"a": 1.0, "b": 1.0}
    assert st["rows"]["m1"]["gap_closed"] == pytest.approx(0.5)
    assert st["rows"]["base"]["gap_closed"] == 0.0
    # diffs a: (0, .1, -.1), b: (-.1, .1, 0): var/n = (0.01)/3 each; SE = sqrt(2 * 0.01/3) / 2
    assert paired_gap_se(rows["m1"], rows["m2"], st["gaps"], ["a", "b"]) == pytest.approx(math.sqrt(0.02 / 3) / 2)
    rows["expert-b"] = _row({"b": [3.5, 3.5, 3.5]})
    with pytest.raises(BenchError, match="expert-b"):
        gap_stats(rows, ["a", "b"])
    weak = gap_stats(rows, ["a", "b"], allow_weak=True)
    assert weak["weak"] == ["b"] and weak["rows"]["m1"]["gap_closed"] == pytest.approx(0.5)


def _prow(full, prefix):
    return _row(full) | {f"prefix/{d}": v for d, v in prefix.items()}


def test_se_sizing_compares_all_tokens_with_the_prefix():
    rows = {
        "base": _prow({"a": [2.0, 2.2, 1.8], "b": [3.0, 3.0, 3.0]}, {"a": [2.5, 2.5, 2.5], "b": [3.5, 3.5, 3.5]}),
        "expert-a": _prow({"a": [1.0, 1.2, 0.8]}, {"a": [1.5, 1.5, 1.5]}),
        "expert-b": _prow({"b": [2.0, 2.0, 2.0]}, {"b": [3.0, 3.0, 3.0]}),
        "anchor-ta": _prow({"a": [1.5, 1.5, 1.5], "b": [2.5, 2.5, 2.5]}, {"a": [2.0, 2.0, 2.0], "b": [3.2, 3.2, 3.2]}),
        "bmm-free-ta": _prow({"a": [1.4, 1.5, 1.6], "b": [2.4, 2.6, 2.5]},
                             {"a": [1.8, 2.0, 2.2], "b": [3.0, 3.2, 3.1]}),
    }
    st = gap_stats(rows, ["a", "b"])
    out = se_sizing(rows, st, best_ref="anchor-ta")
    pair = out["pairs"]["bmm-free-ta vs anchor-ta"]
    assert list(out["pairs"]) == ["bmm-free-ta vs anchor-ta"]  # the anchor is the best reference: one pair
    assert pair["se"] == pytest.approx(paired_gap_se(rows["bmm-free-ta"], rows["anchor-ta"], st["gaps"], ["a", "b"]),
                                       abs=1e-4)
    # prefix gaps: a 2.5 - 1.5 = 1, b 3.5 - 3 = 0.5; diffs a (.2, 0, -.2), b (.2, 0, .1) / 0.5 = (.4, 0, .2):
    # squared deviations sum to 0.08 in both, so var/n = 0.08 / 2 / 3 each
    want = math.sqrt(2 * 0.08 / 6) / 2
    assert pair["se_prefix"] == pytest.approx(want, abs=1e-4)
    parts = paired_gap_se_parts(rows["bmm-free-ta"], rows["anchor-ta"], st["gaps"], ["a", "b"])
    assert math.hypot(*parts.values()) == pytest.approx(pair["se"], abs=1e-4)
    assert out["prefix_tokens"] == PREFIX
    del rows["expert-b"]["prefix/b"]
    out = se_sizing(rows, st, best_ref="anchor-ta")  # no prefix losses for every row: the full-window SEs only
    assert "prefix_tokens" not in out and "se_prefix" not in out["pairs"]["bmm-free-ta vs anchor-ta"]
    assert out["pairs"]["bmm-free-ta vs anchor-ta"]["se"] == pair["se"]


@pytest.mark.parametrize("kind", ["free", "data"])
def test_evidence_params_drive_a_solve(family, tmp_path, kind):
    from tests.conftest import write_calib_files

    base, experts = family("llama")
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "ta")
    if kind == "data":
        gram(work, "data", calib=write_calib_files(tmp_path, len(experts), 6), samples=6, max_len=16)
    else:
        gram(work, "free")
    lams = module_lams(work, "ta", kind, lam_range=(1e-4, 10.0))
    proj = load_project(work)
    keys = [r.key for b in proj.plan.blocks for r in b.modules]
    assert sorted(lams) == sorted(keys)
    assert all(1e-4 <= v <= 10.0 for v in lams.values())
    # one module recomputed from first principles (fp64 statistics from the raw task vectors)
    blk = proj.plan.blocks[0]
    ref = blk.modules[0]
    src = Sources(work, "ta", kind)
    taus = proj.taus(blk, ref).double()
    u0 = src.anchor.block(blk).get(ref.key).double()
    if kind == "free":
        grams = [u.T @ u for u in taus]
        n = len(experts) * taus.shape[1]
    else:
        from bmm_cli.workdir import task_gram_reader

        grams = [g.double() for g in task_gram_reader(work)(blk)(ref.key)]
        n = sum(src.grams["data"].manifest["tokens"].values())
    G = sum(grams)
    B = sum(u @ g for u, g in zip(taus, grams))
    m = float(torch.diagonal(G).sum()) / G.shape[0]
    S = residual_energy(taus, grams, u0, m)
    want = evidence_lam(spectrum(G / m, B / m, u0, S, n), (1e-4, 10.0))
    assert lams[ref.key] == pytest.approx(want, rel=1e-3)
    params = params_per_layer(work, lams, scale=1.0)
    layers = max(proj.plan.stack_layers.values())
    assert sorted(k for k in params if k.startswith("s_")) == [f"s_{b}" for b in range(layers)]
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps(params))
    res = solve(work, "ta", kind, out=tmp_path / "out", params_file=pfile)
    assert res["params"]["s_0"] == 1.0
    assert res["params"]["lam_0_attn_in"] == pytest.approx(
        math.exp(sum(math.log(lams[r.key]) for r in blk.modules if r.group == "attn_in")
                 / sum(1 for r in blk.modules if r.group == "attn_in")))

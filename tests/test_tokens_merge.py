"""``bmm merge --tokenizer base|union|EXPERT --chat-template ...`` with experts that appended tokens (2 and 5, tied and
untied heads): shared rows by the task-vector math, added rows from the experts, tokenizer + config.vocab_size
written, and the output loads and generates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_tokenizer
from safetensors import safe_open
from test_tokens import ADDED, TEMPLATE, _expert, _llama, _loads_and_generates, _vocab_keys


def bmm(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokmerge-tied" if request.param else "tokmerge-untied")
    base = _llama(request.param)
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "base"))
    e2 = _expert(base, root / "e2", 1, ADDED[2])
    e5 = _expert(base, root / "e5", 2, ADDED[5])
    return request.param, root / "base", [e2, e5]


def _get(d, key):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return f.get_tensor(key)


def _merge(fam, out, *extra):
    _, base, experts = fam
    return bmm("merge", "--base", base, "-e", *experts, "--anchor", "ta", "--others", "mean", "--out", out, *extra)


def test_union_merges_shared_rows_and_takes_added_rows_from_the_experts(fam, tmp_path):
    tied, base, (e2, e5) = fam
    p = _merge(fam, tmp_path / "u", "--tokenizer", "union")
    assert "chat template: the experts' (experts 1, 2 agree)" in p.stderr
    tok, model = _loads_and_generates(tmp_path / "u", 105)
    ids = tok.get_vocab()
    assert [ids[s] for s, _ in ADDED[5]] == list(range(100, 105))
    assert (tmp_path / "u" / "chat_template.jinja").read_text() == TEMPLATE
    for key in _vocab_keys(tied):
        b, x2, x5, got = _get(base, key), _get(e2, key), _get(e5, key), _get(tmp_path / "u", key)
        want = b + ((x2[:100] - b) + (x5[:100] - b)) / 2  # --others mean on the shared rows
        torch.testing.assert_close(got[:100], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[100], (x2[100] + x5[100]) / 2)  # <|im_start|>: both experts added it
        torch.testing.assert_close(got[104], x5[104])  # "newword": expert 2 only
    # a block weight is solved as usual
    assert not torch.equal(_get(tmp_path / "u", "model.layers.0.mlp.up_proj.weight"),
                           _get(base, "model.layers.0.mlp.up_proj.weight"))


def test_base_and_expert_vocabularies(fam, tmp_path):
    tied, base, (e2, e5) = fam
    p = _merge(fam, tmp_path / "b")
    assert "are dropped: </tool>, <tool>, <|im_end|>, <|im_start|>, newword" in p.stderr
    _loads_and_generates(tmp_path / "b", 100)
    assert json.loads((tmp_path / "b" / "tokenizer.json").read_text()) == json.loads(
        (base / "tokenizer.json").read_text())
    bmm("merge", "--base", base, "-e", e2, e5, "--anchor", "ta", "--others", "mean", "--tokenizer", e5,
        "--chat-template", "base",
        "--work", tmp_path / "b.bmm-work", "--out", tmp_path / "x")  # the stages of the first merge are reused
    tok, _ = _loads_and_generates(tmp_path / "x", 105)
    assert tok.get_vocab()["<tool>"] == 102 and tok.chat_template is None
    emb = _get(tmp_path / "x", "model.embed_tokens.weight")
    torch.testing.assert_close(emb[:100], _get(tmp_path / "b", "model.embed_tokens.weight"))


def test_refusals_come_before_any_work(fam, tmp_path):
    _, base, (e2, e5) = fam
    r = json.loads(bmm("plan", "--base", base, "-e", e2, e5, "--json").stdout)
    assert r["vocabulary"] == {"base_tokens": 100, "added_by_experts": sorted(s for s, _ in ADDED[5])}
    out = tmp_path / "o"
    for args, msg in [(("--tokenizer", "7"), "expert number 1..2"), (("--tokenizer", "nope"), "--tokenizer 'nope'"),
                      (("--chat-template", "3"), "expert number 1..2"),
                      (("--chat-template", tmp_path / "none.jinja"), "--chat-template")]:
        p = bmm("merge", "--base", base, "-e", e2, e5, "--out", out, *args, check=False)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    bad = json.loads((e2 / "tokenizer.json").read_text())
    clash = tmp_path / "clash"
    clash.mkdir()
    for f in e2.iterdir():
        (clash / f.name).write_bytes(f.read_bytes())
    entry = next(a for a in bad["model"]["vocab"] if a == "w7")
    bad["model"]["vocab"]["w7x"] = bad["model"]["vocab"].pop(entry)
    (clash / "tokenizer.json").write_text(json.dumps(bad))
    p = bmm("merge", "--base", base, "-e", clash, e5, "--out", out, check=False)
    assert p.returncode == 2 and "'w7x'" in p.stderr and "'w7'" in p.stderr
    assert not out.exists() and not (tmp_path / "o.bmm-work").exists()


def test_chat_template_file_and_auto_fallback(fam, tmp_path):
    _, base, (e2, e5) = fam
    t = tmp_path / "t.jinja"
    t.write_text("{{ messages[0]['content'] }}")
    _merge(fam, tmp_path / "f", "--chat-template", t)
    assert (tmp_path / "f" / "chat_template.jinja").read_text() == t.read_text()
    cfg = json.loads((tmp_path / "f" / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg


def test_anchor_model_of_resized_experts_keeps_the_base_vocabulary(fam, tmp_path):
    tied, base, (e2, e5) = fam
    bmm("anchor", "--method", "ta", "--base", base, "--experts", e2, e5, "--others", "mean",
        "--materialize", tmp_path / "a")
    _loads_and_generates(tmp_path / "a", 100)
    b, x2, x5 = (_get(d, "model.embed_tokens.weight") for d in (base, e2, e5))
    torch.testing.assert_close(_get(tmp_path / "a", "model.embed_tokens.weight"),
                               b + ((x2[:100] - b) + (x5[:100] - b)) / 2, rtol=1e-5, atol=1e-6)

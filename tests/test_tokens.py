"""Experts with appended tokens (2 and 5, tied and untied heads), union vocabularies and chat-template choice."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import perturb, tiny_tokenizer

from bmm_cli.errors import InputError
from bmm_cli.store import Checkpoint
from bmm_cli.tokens import (
    assemble_rows,
    choose_chat_template,
    config_vocab,
    plan_tokens,
    read_chat_template,
    read_vocab,
    vocab_axis,
    write_chat_template,
    write_tokenizer,
)

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
ADDED = {2: [("<|im_start|>", True), ("<|im_end|>", True)],
         5: [("<|im_start|>", True), ("<|im_end|>", True), ("<tool>", True), ("</tool>", True), ("newword", False)]}


def _llama(tied: bool, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              tie_word_embeddings=tied, bos_token_id=4, eos_token_id=5,
                                              pad_token_id=0))


def _expert(base, path, seed: int, added, template: str | None = TEMPLATE):
    import transformers as tf

    m = tf.LlamaForCausalLM(copy.deepcopy(base.config))
    m.load_state_dict(base.state_dict())
    tok = tiny_tokenizer()
    for s, special in added:
        tok.add_tokens([s], special_tokens=special)
    if template:
        tok.chat_template = template
    m.resize_token_embeddings(len(tok), mean_resizing=False)
    perturb(m, seed)
    m.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens-tied" if request.param else "tokens-untied")
    base = _llama(request.param)
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "base"))
    e2 = _expert(base, root / "e2", 1, ADDED[2])
    e5 = _expert(base, root / "e5", 2, ADDED[5])
    return request.param, root / "base", [e2, e5]


def _rows(d) -> int:
    return Checkpoint.open(d).meta["model.embed_tokens.weight"].shape[0]


def _plan(base, experts, mode):
    return plan_tokens(read_vocab(base), _rows(base), [read_vocab(e) for e in experts], [_rows(e) for e in experts],
                       mode)


def _vocab_keys(tied: bool) -> list[str]:
    return ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])


def _write_merge(tied, base_dir, experts, plan, out):
    """A task-arithmetic stand-in for the "other" rule on the shared rows, the token plan for the rest; the rest of
    the model is the base's."""
    import transformers as tf

    b, es = Checkpoint.open(base_dir), [Checkpoint.open(e) for e in experts]
    model = tf.LlamaForCausalLM.from_pretrained(str(base_dir))
    model.resize_token_embeddings(plan.rows, mean_resizing=False)
    sd = model.state_dict()
    for key in _vocab_keys(tied):
        base_t, ex = b.get(key), [e.get(key) for e in es]
        assert vocab_axis(key, tuple(base_t.shape), tuple(ex[1].shape)) == 0
        shared = base_t[: plan.shared] + sum(e[: plan.shared] - base_t[: plan.shared] for e in ex) / len(ex)
        sd[key] = assemble_rows(plan, key, shared, base_t, ex)
    model.load_state_dict(sd)
    model.config.vocab_size = plan.rows
    model.save_pretrained(str(out))
    write_tokenizer(plan, base_dir, experts, out)
    cfg = config_vocab(json.loads((out / "config.json").read_text()), plan)
    (out / "config.json").write_text(json.dumps(cfg))
    return b, es


def _loads_and_generates(out, rows):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(out))
    model = tf.AutoModelForCausalLM.from_pretrained(str(out))
    assert len(tok) <= rows == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == rows
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == ids.shape[1] + 3
    return tok, model


def test_base_mode_keeps_the_base_vocabulary(fam, tmp_path):
    tied, base, experts = fam
    plan = _plan(base, experts, "base")
    assert (plan.rows, plan.shared, plan.added) == (100, 100, {})
    assert plan.dropped == sorted(s for s, _ in ADDED[5])
    out = tmp_path / "o"
    b, es = _write_merge(tied, base, experts, plan, out)
    _loads_and_generates(out, 100)


def test_union_mode_adds_every_token_with_the_experts_rows(fam, tmp_path):
    tied, base, experts = fam
    plan = _plan(base, experts, "union")
    assert plan.rows == 105 and sorted(plan.added) == list(range(100, 105))
    out = tmp_path / "o"
    b, es = _write_merge(tied, base, experts, plan, out)
    tok, model = _loads_and_generates(out, 105)
    emb = model.get_input_embeddings().weight.detach()
    e2, e5 = (e.get("model.embed_tokens.weight") for e in es)
    for s, _ in ADDED[5]:
        oid = tok.convert_tokens_to_ids(s)
        assert oid >= 100 and tok.decode([oid]) == s
        i5 = read_vocab(experts[1]).ids()[s]
        want = (e2[read_vocab(experts[0]).ids()[s]] + e5[i5]) / 2 if s in dict(ADDED[2]) else e5[i5]
        assert torch.allclose(emb[oid], want, atol=1e-6), s
    shared = b.get("model.embed_tokens.weight")[:100]
    assert torch.allclose(emb[:100], shared + ((e2[:100] - shared) + (e5[:100] - shared)) / 2, atol=1e-6)
    if not tied:
        head = model.get_output_embeddings().weight.detach()
        assert torch.allclose(head[104], es[1].get("lm_head.weight")[104], atol=1e-6)


def test_expert_mode_takes_that_tokenizer(fam, tmp_path):
    tied, base, experts = fam
    plan = _plan(base, experts, "2")
    assert plan.rows == 105 and plan.added[100] == [(0, 100), (1, 100)] and plan.added[104] == [(1, 104)]
    out = tmp_path / "o"
    _write_merge(tied, base, experts, plan, out)
    tok, _ = _loads_and_generates(out, 105)
    assert tok.convert_tokens_to_ids("newword") == 104
    with pytest.raises(InputError, match="--tokenizer '3'"):
        _plan(base, experts, "3")


def test_union_of_different_tokens_at_clashing_ids(tmp_path):
    base = _llama(False)
    base.save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "base"))
    a = _expert(base, tmp_path / "a", 1, [("<x>", True), ("<y>", True)])
    c = _expert(base, tmp_path / "c", 2, [("<y>", True), ("<z>", True)])  # <y> at id 100 here, 101 in a
    plan = _plan(tmp_path / "base", [a, c], "union")
    assert plan.rows == 103
    assert [t["content"] for t in plan.new_tokens] == ["<x>", "<y>", "<z>"]
    assert plan.added[101] == [(0, 101), (1, 100)] and plan.added[102] == [(1, 101)]
    _write_merge(False, tmp_path / "base", [a, c], plan, tmp_path / "o")
    tok, _ = _loads_and_generates(tmp_path / "o", 103)
    assert [tok.convert_tokens_to_ids(s) for s in ("<x>", "<y>", "<z>")] == [100, 101, 102]


def test_incompatible_vocabularies_are_refused_naming_the_token(tmp_path):
    base = _llama(False)
    base.save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "base"))
    a = _expert(base, tmp_path / "a", 1, [("<x>", True)])
    b = _expert(base, tmp_path / "b", 2, [("<x>", False)])
    with pytest.raises(InputError, match="token '<x>': expert 1 adds it as special and expert 2 as normal"):
        _plan(tmp_path / "base", [a, b], "union")
    tj = json.loads((a / "tokenizer.json").read_text())
    tj["model"]["vocab"]["w0"], tj["model"]["vocab"]["w1"] = tj["model"]["vocab"]["w1"], tj["model"]["vocab"]["w0"]
    (a / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InputError, match="token id 6 is 'w1' but the base's is 'w0'"):
        _plan(tmp_path / "base", [a], "base")
    with pytest.raises(InputError, match="more than the vocabulary axis"):
        vocab_axis("k", (100, 32), (101, 33))


def test_chat_template_choice(tmp_path):
    base = _llama(False)
    base.save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "base"))
    a = _expert(base, tmp_path / "a", 1, [], TEMPLATE)
    b = _expert(base, tmp_path / "b", 2, [], TEMPLATE)
    c = _expert(base, tmp_path / "c", 3, [], "{{ messages[0]['content'] }}")
    n = _expert(base, tmp_path / "n", 4, [], None)
    t, why = choose_chat_template("auto", tmp_path / "base", [a, b, n])
    assert t == TEMPLATE and why == "chat template: the experts' (experts 1, 2 agree)"
    t, why = choose_chat_template("auto", tmp_path / "base", [a, c])
    assert t is None and "differ" in why and "the base has none" in why
    t, why = choose_chat_template("auto", a, [n])  # no expert has one: the "base" (a) has
    assert t == TEMPLATE and why == "chat template: the base's (no expert has one)"
    assert choose_chat_template("2", tmp_path / "base", [a, c])[0] == "{{ messages[0]['content'] }}"
    assert choose_chat_template("base", tmp_path / "base", [a])[0] is None
    f = tmp_path / "t.jinja"
    f.write_text("{{ 'hi' }}")
    assert choose_chat_template(str(f), tmp_path / "base", [a]) == ("{{ 'hi' }}", f"chat template: from {f}")
    for bad, msg in (("3", "expert number 1..2"), ("nope.jinja", "not auto, base"), ("2", "has no chat template")):
        with pytest.raises(InputError, match=msg):
            choose_chat_template(bad, tmp_path / "base", [a, n] if bad == "2" else [a, c])
    out = tmp_path / "out"
    out.mkdir()
    tiny_tokenizer().save_pretrained(str(out))
    write_chat_template(out, TEMPLATE)
    assert read_chat_template(out) == TEMPLATE
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "<|im_start|>w1<|im_end|>"
    write_chat_template(out, None)
    assert read_chat_template(out) is None


def test_plan_for_models_needs_tokenizers_only_for_resized_experts(fam, tmp_path):
    from bmm_cli.tokens import plan_for_models, shared_rows

    _, base, experts = fam
    assert plan_for_models(base, 100, [base], [100]) is None
    plan = plan_for_models(base, 100, experts, [102, 105], "union")
    assert plan.rows == 105 and shared_rows(plan, torch.zeros(105, 4)).shape == (100, 4)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(InputError, match=r"expert 2 \(.*bare\): no tokenizer.json, but its embedding has 102 rows"):
        plan_for_models(base, 100, [experts[0], bare], [102, 102])

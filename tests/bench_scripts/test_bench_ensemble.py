"""bench/ensemble_hook.py: the layer replay gives the same ensemble as full forward passes of every member."""

import hashlib
import json

import pytest
import torch

from bench.common import TASK_LABELS, mean_pool, pad_batch
from bench.ensemble_hook import EnsembleEval, replay_point

TASK = "code_lang"


def _cache(tmp_path):
    """A benchmark cache with one task: 12 test rows, a random head."""
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    labels = TASK_LABELS[TASK]
    rows = [{"text": f"def f{i}(x): return x + {i} " * (1 + i % 4), "label": labels[i % len(labels)]}
            for i in range(12)]
    path = cache / "data" / f"{TASK}.test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"tasks": {TASK: {"files": {path.name: {"sha256": sha}}}}}
    (cache / "data" / "manifest.json").write_text(json.dumps(manifest))
    from safetensors.torch import save_file

    d = cache / "experts" / TASK
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"weight": torch.randn(len(labels), 32, generator=g), "bias": torch.randn(len(labels), generator=g)},
              str(d / "head.safetensors"))
    (d / "labels.json").write_text(json.dumps(labels))
    return cache, rows


def _members(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    ref = tf.BertModel(cfg).eval()
    ref.save_pretrained(str(tmp_path / "ref"))
    paths = []
    for i, key in enumerate(["encoder.layer.2.output.dense.weight", "encoder.layer.2.output.dense.weight",
                             "encoder.layer.1.intermediate.dense.weight", "embeddings.word_embeddings.weight"]):
        m = tf.BertModel(cfg).eval()
        m.load_state_dict(ref.state_dict())
        with torch.no_grad():
            m.state_dict()[key].add_(0.5 * torch.randn(m.state_dict()[key].shape))
        m.save_pretrained(str(tmp_path / f"m{i}"))
        paths.append(tmp_path / f"m{i}")
    return tmp_path / "ref", paths


def _direct(paths, cache, rows):
    """Mean of softmax from a full transformers forward pass of every member."""
    import transformers as tf
    from safetensors.torch import load_file

    from bench.common import load_tokenizer, tokenize

    seqs = tokenize(load_tokenizer(), [r["text"] for r in rows])
    ids, mask = pad_batch(seqs)
    head = load_file(str(cache / "experts" / TASK / "head.safetensors"))
    probs = []
    for p in paths:
        m = tf.BertModel.from_pretrained(str(p)).eval()
        with torch.no_grad():
            emb = mean_pool(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        probs.append(torch.softmax((emb @ head["weight"].T + head["bias"]).double(), -1))
    return torch.stack(probs).mean(0)


def test_replay_point():
    assert replay_point(["encoder.layer.5.output.dense.weight"]) == "encoder.layer.5.output"
    assert replay_point(["bert.encoder.layer.5.output.dense.weight", "encoder.layer.4.attention.self.query.weight"]) \
        == "encoder.layer.4"
    assert replay_point(["embeddings.word_embeddings.weight"]) is None


@pytest.mark.parametrize("which, replays", [([0, 1], 2), ([0, 2], 1), ([0, 3], 1)])
def test_ensemble_matches_full_forward_passes(tmp_path, which, replays):
    cache, rows = _cache(tmp_path)
    ref, members = _members(tmp_path)
    chosen = [members[i] for i in which]
    ev = EnsembleEval(ref, cache, [TASK], "test", None, batch_size=5)
    probs, labels = ev.predict(chosen)[TASK]
    want = _direct(chosen, cache, rows)
    assert torch.allclose(probs, want, atol=1e-5), (probs - want).abs().max()
    assert ev.point == "encoder.layer.2.output" and ev.replays == replays
    assert labels.tolist() == [TASK_LABELS[TASK].index(r["label"]) for r in rows]

"""Experts saved as task models around the base's backbone (BertForSequenceClassification experts of a BertModel
base, each with its own number of labels): merged on the base's tensors, heads left out with a note."""

from __future__ import annotations

from conftest import perturb, save, tiny_model
from safetensors.torch import load_file

from bmm_cli.merge import merge


def test_task_model_experts_merge_like_their_backbones(tmp_path, capsys):
    import transformers as tf

    base_model = tiny_model("bert", 0)
    base = save(base_model, tmp_path / "base")
    heads, backbones = [], []
    for t in range(2):
        backbone = perturb(tiny_model("bert", 0), t)
        backbones.append(save(backbone, tmp_path / f"backbone{t}"))
        cfg = tf.BertConfig(**{**backbone.config.to_dict(), "num_labels": 2 + t})
        clf = tf.BertForSequenceClassification(cfg)
        clf.bert.load_state_dict(backbone.state_dict())
        heads.append(save(clf, tmp_path / f"classifier{t}"))
    merge(str(base), [str(e) for e in heads], tmp_path / "from-classifiers", anchor="ta", lam=0.1, device="cpu")
    err = capsys.readouterr().err
    assert "under 'bert.' are merged" in err and "classifier.weight" in err and "task heads are not merged" in err
    merge(str(base), [str(e) for e in backbones], tmp_path / "from-backbones", anchor="ta", lam=0.1, device="cpu")
    got = load_file(str(tmp_path / "from-classifiers" / "model.safetensors"))
    want = load_file(str(tmp_path / "from-backbones" / "model.safetensors"))
    assert got.keys() == want.keys() == load_file(str(base / "model.safetensors")).keys()
    assert all(got[k].equal(want[k]) for k in got)

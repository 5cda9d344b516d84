"""Experts saved as task models around the base's backbone (BertForSequenceClassification experts of a BertModel
base, each with its own number of labels): merged on the base's tensors, heads left out with a note."""

from __future__ import annotations

import json

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


def _classifier_family(root, labels=(2, 3, 4)):
    """A BertForSequenceClassification base (``labels[0]`` labels) and two experts with other label counts."""
    import transformers as tf

    out = []
    for t, n in enumerate(labels):
        m = tiny_model("bert", 0) if t == 0 else perturb(tiny_model("bert", 0), t)
        clf = tf.BertForSequenceClassification(tf.BertConfig(**{**m.config.to_dict(), "num_labels": n}))
        clf.bert.load_state_dict(m.state_dict())
        out.append(save(clf, root / ("base" if t == 0 else f"expert{t}")))
    return out[0], out[1:]


def test_exclude_leaves_per_task_heads_at_the_base(tmp_path, capsys):
    """Heads of different shapes under the base's own names are refused; ``--exclude`` keeps the base's head, the
    encoder is merged exactly as without the heads, and every stage (solve, anchor --materialize, the direct anchor)
    rebuilds the same plan from the work directory."""
    import pytest

    from bmm_cli.anchor import anchor, anchor_direct
    from bmm_cli.errors import InputError
    from bmm_cli.solve import solve

    base, experts = _classifier_family(tmp_path)
    es = [str(e) for e in experts]
    refused = r"'classifier\.bias' has shape \[3\] but the base has \[2\].*--exclude '\^classifier\\\.'"
    with pytest.raises(InputError, match=refused):
        merge(str(base), es, tmp_path / "refused", anchor="ta", lam=0.1, device="cpu")
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.bmm-work").exists()

    work = tmp_path / "work"
    res = merge(str(base), es, tmp_path / "out", anchor="ta", lam=0.1, device="cpu", work=work,
                exclude=[r"^classifier\."])
    assert res["excluded"] == ["classifier.bias", "classifier.weight"]
    assert "--exclude leaves 2 tensor(s) at the base's value" in capsys.readouterr().err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    assert got.keys() == b.keys()
    assert got["classifier.weight"].equal(b["classifier.weight"]) and got["classifier.bias"].equal(b["classifier.bias"])
    recipe = json.loads((tmp_path / "out" / "bmm_merge.json").read_text())
    assert recipe["excluded"] == ["classifier.bias", "classifier.weight"]
    assert '"classifier.bias"' in (tmp_path / "out" / "README.md").read_text()  # the model card's recipe

    # the same encoders saved with the base's head: the merge without --exclude must give the same tensors
    import transformers as tf

    same = []
    for t, e in enumerate(experts):
        clf = tf.BertForSequenceClassification.from_pretrained(str(e))
        head = tf.BertForSequenceClassification.from_pretrained(str(base)).classifier
        clf.classifier = head
        clf.config.num_labels = 2
        same.append(str(save(clf, tmp_path / f"same-head{t}")))
    merge(str(base), same, tmp_path / "ref", anchor="ta", lam=0.1, device="cpu")
    want = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(got[k].equal(want[k]) for k in got)

    # later stages read the plan from the work dir: a resolve and the anchor model keep the base's head
    solve(work, "ta", "free", out=tmp_path / "again", lam=0.1, device="cpu")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(again[k].equal(got[k]) for k in got)
    anchor(work, "ta", materialize=tmp_path / "anchor-stage", device="cpu")
    anchor_direct(str(base), es, "ta", materialize=tmp_path / "anchor-direct", device="cpu", exclude=[r"^classifier\."])
    a1 = load_file(str(tmp_path / "anchor-stage" / "model.safetensors"))
    a2 = load_file(str(tmp_path / "anchor-direct" / "model.safetensors"))
    assert a1.keys() == a2.keys() == b.keys()
    assert all(a1[k].equal(a2[k]) for k in a1) and a1["classifier.weight"].equal(b["classifier.weight"])


def test_exclude_a_solvable_module_and_bad_patterns(tmp_path):
    """An excluded in-block weight is neither solved nor merged (the base's value; the plan says so); a pattern that
    is not a regular expression, or that matches nothing, is refused in one line before any work."""
    import pytest

    from bmm_cli.errors import InputError
    from bmm_cli.plan import plan

    base = save(tiny_model("bert", 0), tmp_path / "base")
    es = [str(save(perturb(tiny_model("bert", 0), t), tmp_path / f"e{t}")) for t in (1, 2)]
    key = "encoder.layer.1.attention.self.query.weight"
    p = plan(str(base), es, exclude=[r"layer\.1\.attention\.self\.query\."])
    full = plan(str(base), es)
    assert sorted(p["excluded"]) == [key.replace("weight", "bias"), key] and p["modules"] == full["modules"] - 1
    out = tmp_path / "out"
    merge(str(base), es, out, anchor="ta", device="cpu", exclude=[r"layer\.1\.attention\.self\.query\."])
    got = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    assert got[key].equal(b[key]) and not got[key.replace("query", "key")].equal(b[key.replace("query", "key")])
    for bad, msg in (("(", "not a regular expression"), ("no_such_tensor", "matches no tensor"),
                     (".", "leaves no solvable module")):
        with pytest.raises(InputError, match=msg):
            merge(str(base), es, tmp_path / "bad", anchor="ta", device="cpu", exclude=[bad])
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.bmm-work").exists()


def test_exclude_on_the_command_line(tmp_path):
    """``bmm plan --exclude`` lists what keeps the base's value; a bad pattern is one line on stderr, exit 2."""
    import subprocess
    import sys

    base, experts = _classifier_family(tmp_path)

    def bmm(*args):
        return subprocess.run([sys.executable, "-m", "bmm_cli.cli", *map(str, args)], capture_output=True, text=True)

    p = bmm("plan", "-b", base, "-e", experts[0], "-e", experts[1], "--exclude", r"^classifier\.")
    assert p.returncode == 0, p.stderr
    assert "excluded     2 tensors (--exclude) keep the base's value: classifier.bias, classifier.weight" in p.stdout
    p = bmm("plan", "-b", base, "-e", experts[0], "-e", experts[1])
    assert p.returncode == 2 and "--exclude '^classifier\\.' keeps the base's" in p.stderr
    p = bmm("merge", "-b", base, "-e", experts[0], "-e", experts[1], "-o", tmp_path / "o", "--exclude", "[")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--exclude '['" in p.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.bmm-work").exists()

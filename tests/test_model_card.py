"""The merged model's card names every parent (Hub convention for merges) and a sentence-transformers base keeps
its pooling files."""

from __future__ import annotations

import json

from conftest import make_family

from bmm_cli.merge import merge
from bmm_cli.writer import model_card, parent_name


def _front_matter(card: str) -> list[str]:
    lines = card.splitlines()
    assert lines[0] == "---"
    return lines[1:lines.index("---", 1)]


def test_card_lists_every_parent_with_the_merge_relation():
    hub = "/home/u/.cache/huggingface/hub/models--org--base-7b/snapshots/0123abcd"
    card = model_card({"base": hub, "experts": ["/data/ft-a", "org2/ft-b", "/data/ft-a"], "title": "t"})
    fm = _front_matter(card)
    i = fm.index("base_model:")
    assert fm[i + 1:i + 3] == ['- "org/base-7b"', '- "org2/ft-b"']  # a local directory is no Hub parent
    assert fm[i + 3] == "base_model_relation: merge"
    assert parent_name("/x/models--a--b/snapshots/c/") == "a/b" and parent_name("/x/y") is None
    assert "base_model" not in model_card({"base": "/data/base", "experts": ["/data/ft-a"]})


def test_merge_copies_sentence_transformers_files_and_names_parents(tmp_path):
    base, experts = make_family(tmp_path, "bert", n_experts=2)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (base / "modules.json").write_text(json.dumps(modules))
    (base / "sentence_bert_config.json").write_text('{"max_seq_length": 64, "do_lower_case": false}')
    (base / "config_sentence_transformers.json").write_text('{"similarity_fn_name": "cosine"}')
    (base / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (base / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (base / "2_Normalize").mkdir()
    out = tmp_path / "merged"
    merge(str(base), [str(e) for e in experts], out, anchor="ta", device="cpu")
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "base_model" not in "\n".join(_front_matter(card))  # local parents: named in the recipe only
    assert all(str(p.resolve()) in card for p in (base, *experts))

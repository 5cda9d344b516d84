"""What a merged model directory carries besides the weights: a model's own code (``trust_remote_code``), tiktoken
vocabularies and processor configs are copied from the base, so the output loads as the base does."""

from __future__ import annotations

import json
import shutil

import torch

from bmm_cli.merge import merge

CODE = '''from transformers import LlamaForCausalLM


class TinyRemoteLlama(LlamaForCausalLM):
    """A model class that only exists in this directory's code."""
'''


def test_remote_code_and_tokenizer_files_are_copied_and_load(family, tmp_path, monkeypatch):
    import transformers as tf

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    base0, ex = family("llama")
    base = tmp_path / "base"
    shutil.copytree(base0, base)
    (base / "modeling_tiny.py").write_text(CODE)
    (base / "vocab.tiktoken").write_text("YQ== 0\n")
    (base / "processor_config.json").write_text(json.dumps({"processor_class": "Tiny"}))
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyRemoteLlama"}
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    merge(str(base), [str(e) for e in ex], out, anchor="ta", lam=0.1, device="cpu")
    for name in ("modeling_tiny.py", "vocab.tiktoken", "processor_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    model = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteLlama"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

"""Shared fixtures: tiny random checkpoints (base + experts) of real transformers architectures, written to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("BMM_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

KINDS = ("bert", "llama", "gpt2", "clip")


def tiny_model(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64)
        return tf.BertModel(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "clip":
        text = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=32)
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      image_size=16, patch_size=8)
        cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        return tf.CLIPModel(cfg)
    raise ValueError(kind)


def perturb(model, seed: int, scale: float = 0.02):
    """A fake fine-tune: a low-rank-ish + dense perturbation of every float parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                r = min(4, *p.shape)
                a = torch.randn(p.shape[0], r, generator=g)
                b = torch.randn(r, p.shape[1], generator=g)
                p.add_(scale * (a @ b) / r + 0.1 * scale * torch.randn(p.shape, generator=g))
            else:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def save(model, path: Path, shard: str | None = None) -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return path


def make_family(root: Path, kind: str, n_experts: int = 3, sharded: bool = False) -> tuple[Path, list[Path]]:
    shard = "20KB" if sharded else None
    base = tiny_model(kind, 0)
    base_dir = save(base, root / "base", shard)
    experts = []
    for t in range(n_experts):
        m = tiny_model(kind, 0)
        m.load_state_dict(base.state_dict())
        perturb(m, 100 + t)
        experts.append(save(m, root / f"expert{t}", shard))
    return base_dir, experts


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """family(kind, sharded=False, n=3) -> (base_dir, [expert_dirs]); built once per session."""
    cache: dict = {}

    def get(kind: str = "bert", sharded: bool = False, n: int = 3):
        key = (kind, sharded, n)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{kind}{'-sharded' if sharded else ''}-{n}")
            cache[key] = make_family(root, kind, n, sharded)
        return cache[key]

    return get

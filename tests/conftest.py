"""Shared fixtures: tiny random checkpoints (base + experts) of real transformers architectures, written to tmp dirs."""

from __future__ import annotations

import json
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


def tiny_tokenizer(vocab_size: int = 100):
    """A word-level tokenizer over words w0..w93 with BERT-style special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "<s>": 4, "</s>": 5}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", bos_token="<s>", eos_token="</s>")


def calib_texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        out.append(" ".join(f"w{int(i)}" for i in torch.randint(0, 60 + 10 * (seed % 3), (length,), generator=g)))
    return out


def write_calib_files(root: Path, n_tasks: int, per_task: int) -> list[str]:
    """One JSONL of ``per_task`` calib_texts per task under ``root``; returns the ``--calib T=PATH`` specs."""
    specs = []
    for t in range(n_tasks):
        p = root / f"calib{t}.jsonl"
        p.write_text("".join(json.dumps({"text": x}) + "\n" for x in calib_texts(per_task, t)))
        specs.append(f"{t + 1}={p}")
    return specs


def make_family(root: Path, kind: str, n_experts: int = 3, sharded: bool = False) -> tuple[Path, list[Path]]:
    shard = "20KB" if sharded else None
    base = tiny_model(kind, 0)
    base_dir = save(base, root / "base", shard)
    if kind != "clip":
        tiny_tokenizer().save_pretrained(str(base_dir))
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


def ready_work(family, kind: str, work: Path, method: str = "ta") -> Path:
    """taskvec + anchor ``method`` + data-free Grams of ``family(kind)`` in ``work``: what a search starts from."""
    from bmm_cli.anchor import anchor
    from bmm_cli.gram import gram
    from bmm_cli.taskvec import taskvec

    base, experts = family(kind)
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, method)
    gram(work, "free")
    return work


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a real tmpfs of ``size`` ("64k", "1m") under ``tmp_path`` and returns its path, or None
    where this machine does not allow it (not root, no ``mount``); every mount is undone at teardown."""
    import shutil
    import subprocess

    mounted = []

    def mount(size: str):
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return None
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            return None
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)

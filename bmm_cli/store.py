"""Checkpoint I/O: the one place that opens model files.

Reading: a local directory or a hub id, single-file or sharded safetensors, one tensor at a time (``safe_open``),
never the whole model. Headers are parsed and validated without torch so that a truncated shard, a corrupt header or
an index that points at a missing file is reported before any heavy work. Pickle checkpoints (``.bin``, ``.pt``) are
refused and never unpickled.

Writing a merged model directory lives in :mod:`bmm_cli.writer`; this module keeps the small atomic safetensors
writes of the work-dir stages (:func:`save_tensors`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic, lora
from .errors import BmmError, InputError, NumericError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MARKER_NAME = "bmm_merge.json"  # marks a directory as a bmm output (safe to replace)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# files copied from the base into a merged model (everything a loader needs besides the weights)
COPY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# files of any name copied too: a model's own code (``trust_remote_code``) and tiktoken vocabularies
COPY_GLOBS = ("*.py", "*.tiktoken")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'float32' / 'fp16' ... -> torch dtype."""
    aliases = {
        "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64,
    }
    try:
        return aliases[name.strip().lower()]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16, float64") from None


# ----------------------------------------------------------------------------------------------------------------
# instrumentation: how many tensors read from checkpoints are alive at once (tests bound it)


class _Residency:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.live += 1
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release)
        return t

    def _release(self) -> None:
        with self.lock:
            self.live -= 1

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = self.live


residency = _Residency()


# ----------------------------------------------------------------------------------------------------------------
# headers


@dataclass(frozen=True)
class TensorMeta:
    key: str
    dtype: str  # safetensors dtype name (F32, BF16, ...)
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path, *, fix: str | None = None) -> tuple[dict[str, Any], bytes]:
    """Parse and validate a safetensors header without torch; returns (header dict, raw header bytes).

    Checks that the file is complete: the last tensor's data must end exactly at the file's end. Errors name the
    file and, by default, the fix for a downloaded checkpoint; ``fix`` replaces that advice (work-dir shards).
    """

    def bad(reason: str, default_fix: str = "re-download or re-save the file") -> InputError:
        advice = fix or default_fix
        return InputError(f"{path}: {reason}" + (f"; {advice}" if advice else ""))

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"not a safetensors file (only {len(head)} bytes)", "re-download it")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise bad(f"corrupt safetensors header (header length {n}, file {size} bytes)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise bad("file not found", "") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"corrupt safetensors header ({exc.__class__.__name__})") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            start, stop = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"corrupt safetensors header entry for tensor {key!r}") from None
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {key!r} has unsupported dtype {dtype}", "")
        nbytes = DTYPE_BYTES[dtype]
        for d in shape:
            nbytes *= d
        if stop - start != nbytes or start < 0:
            raise bad(f"corrupt safetensors header: tensor {key!r} offsets do not match its shape")
        end = max(end, stop)
    if 8 + n + end != size:
        raise bad(f"truncated or padded safetensors file ({size} bytes, header says {8 + n + end})",
                  "the download or copy is incomplete: fetch it again")
    return header, raw


# ----------------------------------------------------------------------------------------------------------------
# reading


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~", "/"))
        and all(c.isalnum() or c in "-_." for c in spec.replace("/", ""))
    )


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (as huggingface_hub reads it: set and not "0")."""
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def resolve_model_dir(spec: str | os.PathLike, *, role: str = "model") -> Path:
    """A local directory, a single .safetensors file's directory, or a hub id -> a local directory."""
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".safetensors":
                return path.parent.resolve()
            if path.suffix in PICKLE_SUFFIXES:
                raise InputError(f"{role} {path}: pickle checkpoints are refused (they can run code when loaded); "
                                 "convert to safetensors first, e.g. save_pretrained(..., safe_serialization=True)")
            raise InputError(f"{role} {path}: expected a model directory or a .safetensors file")
        return path.resolve()
    if not looks_like_hub_id(spec_s):
        raise InputError(f"{role} {spec_s}: no such file or directory (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"{role} {spec_s}: not a local path and huggingface_hub is not installed") from None
    try:
        local = snapshot_download(repo_id=spec_s, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # hub errors come in many classes (offline, 404, auth)
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache: download it first or pass a local path"
                if hub_offline() else "check the id, your network and HF_TOKEN")
        raise InputError(f"{role} {spec_s}: cannot fetch from the hub ({exc.__class__.__name__}); {hint}") from None
    return Path(local)


class BadTensorError(InputError, NumericError):
    """NaN/Inf stored in an input checkpoint: bad input (exit 2), and a NumericError for code that catches those."""

    def __init__(self, message: str):
        BmmError.__init__(self, message, exit_code=2)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: its min and max are finite (``aminmax`` propagates NaN). One reduction without the
    bool temporary of ``isfinite(t).all()``: ~30x faster on one CPU thread, which matters when every tensor of
    every checkpoint is checked as it is read."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class Checkpoint:
    """A safetensors checkpoint opened lazily: metadata up front, tensors one at a time."""

    def __init__(self, root: Path, files: dict[str, Path], meta: dict[str, TensorMeta], spec: str):
        self.root = root
        self.spec = spec
        self.files = files  # shard name -> path
        self.meta = meta  # key -> TensorMeta (in file order)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, spec: str | os.PathLike, *, role: str = "model") -> "Checkpoint":
        """Open ``spec``: a model directory, a .safetensors file, a hub id, or ``BASE+ADAPTER`` (a PEFT LoRA adapter
        on its base, seen as the full fine-tuned model: a :class:`~bmm_cli.lora.LoraCheckpoint`). A bare adapter
        directory is refused here: it is an expert of ``--base`` (:func:`~bmm_cli.lora.open_expert`)."""
        base_spec, rest = lora.split_spec(str(spec))
        if base_spec is not None:
            if not lora.is_adapter(rest):
                raise InputError(f"{role} {spec}: {rest} is not a PEFT adapter directory (no {lora.CONFIG_NAME})")
            return lora.LoraCheckpoint.open(cls.open(base_spec, role=f"{role} base"), Path(rest).resolve(),
                                            spec=str(spec))
        if lora.is_adapter(spec):
            raise InputError(f"{role} {spec}: is a PEFT LoRA adapter ({lora.CONFIG_NAME}), not a model; give it as "
                             "an expert (-e ADAPTER or -e BASE+ADAPTER)")
        root = resolve_model_dir(spec, role=role)
        index = root / INDEX_NAME
        if index.exists() and (root / SINGLE_NAME).exists():
            # transformers loads model.safetensors first, bmm would follow the index: they could disagree
            raise InputError(f"{role} {root}: has both {SINGLE_NAME} and {INDEX_NAME}; one of them is stale "
                             "(left by an earlier save): delete it")
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
            names = sorted(set(weight_map.values()))
            for name in names:
                if not (root / name).is_file():
                    raise InputError(f"{index} points at {name}, which is missing from {root}; "
                                     "the download is incomplete: fetch the missing shard")
        else:
            names = sorted(p.name for p in root.glob("*.safetensors"))
            if not names:
                pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES) if root.is_dir() else []
                if pickles:
                    raise InputError(
                        f"{role} {root}: only pickle checkpoints ({pickles[0]}); they are refused because loading them "
                        "can run code: convert with save_pretrained(..., safe_serialization=True)")
                raise InputError(f"{role} {root}: no .safetensors files found")
            if len(names) > 1 and SINGLE_NAME in names:
                names = [SINGLE_NAME]
            weight_map = None
        files = {name: root / name for name in names}
        meta: dict[str, TensorMeta] = {}
        for name, path in files.items():
            header, _ = read_header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(key) != name:
                    if key not in weight_map:
                        raise InputError(f"{path}: tensor {key!r} is not in {INDEX_NAME}; the index is stale")
                    continue
                if key in meta:
                    raise InputError(f"{path}: tensor {key!r} is stored twice ({meta[key].file.name} too)")
                meta[key] = TensorMeta(key, info["dtype"], tuple(int(d) for d in info["shape"]), path)
        if weight_map is not None:
            missing = [k for k in weight_map if k not in meta]
            if missing:
                raise InputError(f"{root / weight_map[missing[0]]}: tensor {missing[0]!r} listed in the index is not "
                                 "in that file; the shard is stale or corrupt")
        return cls(root, files, meta, str(spec))

    # -- metadata ------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.meta)

    def __contains__(self, key: str) -> bool:
        return key in self.meta

    def config(self) -> dict:
        path = self.root / "config.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise InputError(f"{path}: not valid JSON") from None

    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.meta.values())

    def fingerprint(self) -> dict:
        """Identity of the inputs for stage manifests: paths, sizes, header hashes and a hash of a few bytes sampled
        from every tensor (no full-file hashing). The sample tells a checkpoint re-saved in place with new values
        (same names, shapes and dtypes, so the same header and size) from the one a stage was computed from."""
        files = []
        for name, path in sorted(self.files.items()):
            header, raw = read_header(path)
            files.append({"name": name, "bytes": path.stat().st_size, "header_sha256": hashlib.sha256(raw).hexdigest(),
                          "sample_sha256": _sample_digest(path, header, len(raw))})
        return {"path": str(self.root), "files": files}

    # -- tensors -------------------------------------------------------------------------------------------------
    def _handle(self, path: Path):
        with self._lock:
            h = self._handles.get(path)
            if h is None:
                try:
                    h = safe_open(str(path), framework="pt", device="cpu")
                except Exception as exc:
                    raise InputError(f"{path}: cannot open ({exc}); the file is corrupt, fetch it again") from None
                self._handles[path] = h
            return h

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """Read one tensor (a copy in its stored dtype). NaN/Inf in a float tensor is an error naming file+tensor."""
        try:
            m = self.meta[key]
        except KeyError:
            raise InputError(f"{self.root}: no tensor {key!r}") from None
        try:
            t = self._handle(m.file).get_tensor(m.key)  # its name in the file (a keymap view renames it)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{m.file}: cannot read tensor {key!r} ({exc})") from None
        if check_finite and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise BadTensorError(f"{m.file}: tensor {key!r} has {bad} NaN/Inf values; the checkpoint is broken: "
                                 "re-export it from a good training checkpoint, or leave it out of the merge")
        return residency.track(t)

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


SAMPLE_BYTES = 64  # bytes read at the start, middle and end of every tensor for the fingerprint


def _sample_digest(path: Path, header: dict, header_len: int) -> str:
    """sha256 over up to 3 x SAMPLE_BYTES of every tensor's data (a few hundred small reads per checkpoint)."""
    h = hashlib.sha256()
    base = 8 + header_len
    with open(path, "rb") as fh:
        for key in sorted(k for k in header if k != "__metadata__"):
            start, stop = (int(v) for v in header[key]["data_offsets"])
            n = stop - start
            for off in sorted({0, max(0, n // 2 - SAMPLE_BYTES // 2), max(0, n - SAMPLE_BYTES)}):
                h.update(os.pread(fh.fileno(), min(SAMPLE_BYTES, n - off), base + start + off))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# stage shards (work directory files): plain safetensors, written atomically


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file atomically; returns its size in bytes.

    At most one metadata entry: safetensors writes a metadata map in hash order, so several entries would make
    the bytes differ from run to run (shards must be byte-identical after a resume).
    """
    if metadata and len(metadata) > 1:
        raise ValueError("save_tensors: at most one metadata entry keeps the file bytes deterministic")
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic.write_with(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))
    return path.stat().st_size


def _stage_fix(path: Path) -> str:
    """How to repair a missing or damaged shard of a work-directory stage (``<work>/<stage>/<shard>``)."""
    stage = path.parent.name
    cmd = "bmm search" if stage.startswith("factors-") else f"bmm {stage.split('-')[0]}"
    return (f"rerun `{cmd}` with the same options: it redoes missing or damaged shards "
            f"(or delete {path.parent} and rerun it)")


class ShardReader:
    """Lazy reader of one work-directory shard."""

    def __init__(self, path: Path):
        self.path = path
        read_header(path, fix=_stage_fix(path))  # validates completeness
        self._h = safe_open(str(path), framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self._h.keys())

    def __contains__(self, key: str) -> bool:
        return key in set(self._h.keys())

    def get(self, key: str) -> torch.Tensor:
        try:
            return residency.track(self._h.get_tensor(key))
        except Exception:
            raise InputError(f"{self.path}: missing tensor {key!r}; "
                             "rerun the stage that writes it with --force") from None

    def metadata(self) -> dict[str, str]:
        return self._h.metadata() or {}


__all__ = [
    "Checkpoint", "TensorMeta", "ShardReader", "save_tensors", "read_header", "parse_dtype", "resolve_model_dir",
    "residency", "BadTensorError", "all_finite",
    "DTYPES", "DTYPE_NAMES", "MARKER_NAME", "INDEX_NAME", "SINGLE_NAME", "COPY_PATTERNS", "COPY_GLOBS",
]

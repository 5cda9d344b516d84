"""Checkpoint I/O: the one place that opens model files.

Reading: a local directory or a hub id, single-file or sharded safetensors, one tensor at a time (``safe_open``),
never the whole model. Headers are parsed and validated without torch so that a truncated shard, a corrupt header or
an index that points at a missing file is reported before any heavy work. Pickle checkpoints (``.bin``, ``.pt``) are
refused and never unpickled.

Writing: Hugging Face layout (``model-0000i-of-0000n.safetensors`` + index, or one ``model.safetensors``), config and
tokenizer files copied from the base, a model card; every file atomic, the directory swapped in only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic, faults
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
    "chat_template.jinja",
    "chat_template.json",
)
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

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


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~", "/"))
        and all(c.isalnum() or c in "-_." for c in spec.replace("/", ""))
    )


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
    if not _looks_like_hub_id(spec_s):
        raise InputError(f"{role} {spec_s}: no such file or directory (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"{role} {spec_s}: not a local path and huggingface_hub is not installed") from None
    try:
        local = snapshot_download(repo_id=spec_s, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # hub errors come in many classes (offline, 404, auth)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache: download it first or pass a local path"
                if offline else "check the id, your network and HF_TOKEN")
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
                raise InputError(f"{root / weight_map[missing[0]]}: tensor {missing[0]!r} listed in the index is not in "
                                 "that file; the shard is stale or corrupt")
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
            t = self._handle(m.file).get_tensor(key)
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
            raise InputError(f"{self.path}: missing tensor {key!r}; rerun the stage that writes it with --force") from None

    def metadata(self) -> dict[str, str]:
        return self._h.metadata() or {}


# ----------------------------------------------------------------------------------------------------------------
# writing a Hugging Face model directory


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise InputError(f"--max-shard-size {text!r}: expected bytes like 5GB, 500MB or 2000000") from None
    if value <= 0:
        raise InputError(f"--max-shard-size {text!r} must be positive")
    return value


@dataclass
class _ShardPlan:
    name: str
    keys: list[str]
    nbytes: int


def plan_shards(entries: list[tuple[str, int]], max_shard_size: int) -> list[_ShardPlan]:
    """Greedy, in order: start a new shard when the next tensor would overflow (a lone big tensor gets its own)."""
    shards: list[list[tuple[str, int]]] = [[]]
    size = 0
    for key, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, nbytes))
        size += nbytes
    n = len(shards)
    out = []
    for i, sh in enumerate(shards):
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        out.append(_ShardPlan(name, [k for k, _ in sh], sum(b for _, b in sh)))
    return out


def check_not_input(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an ``--out`` that is, or contains, one of ``inputs`` (role -> path: base, experts, work dir).

    Writing ``out`` replaces the whole directory, so this would delete an input; ``--force`` does not override it.
    """
    dst = Path(out).resolve()
    for role, path in inputs.items():
        src = Path(path).resolve()
        if dst == src or dst in src.parents:
            raise InputError(f"--out {out} is (or contains) the {role} {path}; writing the merge there would delete "
                             f"the {role}: choose another output path")


def check_output_dir(out: Path, *, force: bool, inputs: dict[str, Path] | None = None) -> None:
    """Refuse to replace a directory that is not a bmm output (unless --force) or that holds an input (always)."""
    check_not_input(out, inputs or {})
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is a file; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).exists() and not force:
        raise InputError(f"--out {out} exists and is not a bmm output; choose another path or pass --force to replace it")


class _ShardStream:
    """One output shard written as its tensors arrive: the safetensors header first (from the known shapes and
    dtypes), then each tensor's bytes appended in header order, into a temp file renamed onto the shard's name
    (fsynced) once the last tensor is in. A tensor that arrives before its turn waits in memory until the ones
    before it are written, so a producer that follows the layout order holds one tensor at a time.

    Layout, as ``safetensors.torch.save_file`` lays files out: tensors grouped by element size, largest first
    (every offset is then aligned to its dtype), contiguous offsets from 0, the header JSON compact with
    ``__metadata__`` first and space-padded to a multiple of 8 bytes. Within a group the order is the caller's
    (the order tensors are produced) where save_file sorts by dtype, then name; for input given in that order the
    bytes are save_file's.
    """

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        order = sorted(range(len(layout)), key=lambda i: -_itemsize(layout[i][2]))  # stable: caller's order kept
        self.keys = [layout[i][0] for i in order]
        head: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        self.nbytes: dict[str, int] = {}
        offset = 0
        for i in order:
            key, shape, dt = layout[i]
            n = _numel(shape) * _itemsize(dt)
            head[key] = {"dtype": DTYPE_NAMES[dt], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
            self.nbytes[key] = n
            offset += n
        raw = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.header) + offset
        self._next = 0
        self._waiting: dict[str, torch.Tensor] = {}
        self._ctx = None
        self._fh = None

    @property
    def complete(self) -> bool:
        return self._next == len(self.keys)

    def add(self, key: str, t: torch.Tensor) -> None:
        if t.numel() * t.element_size() != self.nbytes[key]:
            raise ValueError(f"{self.path.name}: tensor {key!r} has {t.numel() * t.element_size()} bytes, "
                             f"the header says {self.nbytes[key]}")
        if self._fh is None:
            self._ctx = atomic.atomic_path(self.path)
            tmp = self._ctx.__enter__()
            self._guard(lambda: self._open(tmp))
        self._waiting[key] = t
        self._guard(self._drain)

    def _open(self, tmp: Path) -> None:
        self._fh = open(tmp, "wb")
        self._fh.write(self.header)

    def _drain(self) -> None:
        while self._next < len(self.keys) and self.keys[self._next] in self._waiting:
            data = self._waiting.pop(self.keys[self._next]).reshape(-1).view(torch.uint8)
            if data.numel():
                self._fh.write(memoryview(data.numpy()))
            del data
            self._next += 1
        self._fh.flush()  # in the file, not in a buffer of ours
        if self.complete:
            self._finish()

    def _finish(self) -> None:
        self._fh.close()
        ctx, self._ctx, self._fh = self._ctx, None, None
        ctx.__exit__(None, None, None)  # fsync, rename onto the shard's name, fsync the directory

    def _guard(self, step) -> None:
        """Run a write step; on any error remove the temp file (a full disk becomes the one-line DiskFullError)."""
        try:
            step()
        except BaseException as exc:
            ctx, fh = self._ctx, self._fh
            self._ctx, self._fh, self._waiting = None, None, {}
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()
            if ctx is not None:
                ctx.__exit__(type(exc), exc, exc.__traceback__)  # raises DiskFullError for ENOSPC / EDQUOT
            raise

    def abort(self) -> None:
        """Drop the temp file of an unfinished shard (an error elsewhere: the writer will not complete)."""
        if self._ctx is not None:
            with contextlib.suppress(_Aborted):
                self._guard(_abort)
        self._waiting = {}


class _Aborted(Exception):
    pass


def _abort() -> None:
    raise _Aborted()


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


class ModelWriter:
    """Streams tensors into an HF-layout directory; the directory appears under its final name only when complete.

    ``entries`` (key, shape, dtype) fix the layout up front: shards are planned greedily in the entries' order
    and every shard file is streamed (:class:`_ShardStream`): its header is written first and each tensor goes to
    disk as it arrives, so memory holds one tensor (plus those that arrive before their turn, when the producer
    does not follow the entries' order). List the entries in the order they will be produced. A finished shard
    is fsynced and renamed; files go to a staging directory next to ``out``; shards already completed there by an
    interrupted run with the same plan are kept (resume), and ``close`` swaps the staging directory in place of
    ``out`` (the previous output stays intact until that instant).

    With a non-empty ``plan_id`` (what the content depends on) and no ``force``, an ``out`` written by the same plan
    and still sound is *current*: every shard counts as done and nothing is rewritten.
    """

    def __init__(
        self,
        out: Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_size: int,
        copy_from: Path | None,
        force: bool = False,
        plan_id: str = "",
        inputs: dict[str, Path] | None = None,
    ):
        self.out = Path(out)
        inputs = dict(inputs or {})
        if copy_from is not None:
            inputs.setdefault("base model", Path(copy_from))
        check_not_input(self.out, inputs)
        recover_output(self.out)
        check_output_dir(self.out, force=force)
        self.dtypes = {k: dt for k, _, dt in entries}
        self.numel = {k: _numel(shape) for k, shape, _ in entries}
        shapes = {k: tuple(shape) for k, shape, _ in entries}
        sized = [(k, _numel(shape) * _itemsize(dt)) for k, shape, dt in entries]
        self.shards = plan_shards(sized, max_shard_size)
        self.shard_of = {k: sh for sh in self.shards for k in sh.keys}
        self.copy_from = copy_from
        self.staging = self.out.parent / f".{self.out.name}.bmm-partial"
        self.streams = {sh.name: _ShardStream(self.staging / sh.name, [(k, shapes[k], self.dtypes[k]) for k in sh.keys],
                                              metadata={"format": "pt"}) for sh in self.shards}
        plan_hash = hashlib.sha256(
            json.dumps([plan_id, [(sh.name, sh.keys) for sh in self.shards],
                        [(k, str(self.dtypes[k])) for k in self.dtypes]]).encode()).hexdigest()
        self.plan_hash = plan_hash
        self.current = bool(plan_id) and not force and self._is_current()
        if self.current:  # same inputs, parameters and layout as the complete output there: nothing to write
            self.done = {sh.name for sh in self.shards}
            return
        progress_path = self.staging / ".progress.json"
        done: list[str] = []
        if progress_path.exists():
            try:
                prog = json.loads(progress_path.read_text())
                if prog.get("plan") == plan_hash:
                    done = [n for n in prog.get("done", []) if _sound(self.staging / n)]
            except ValueError:
                done = []
        if not done and self.staging.exists():
            shutil.rmtree(self.staging)
        elif done:  # resume: drop what a killed run was writing (its temp files would end up in the output)
            atomic.remove_stale_temps(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.done = set(done)
        self._progress_path = progress_path
        self._write_progress()

    def _is_current(self) -> bool:
        """``out`` is a complete bmm output written with this plan (its marker records the plan hash, every shard
        has a sound header): a rerun with unchanged inputs and parameters need not rewrite it."""
        try:
            if json.loads((self.out / MARKER_NAME).read_text()).get("output_plan") != self.plan_hash:
                return False
        except (OSError, ValueError, AttributeError):
            return False
        return all(_sound(self.out / sh.name) for sh in self.shards)

    def _write_progress(self) -> None:
        atomic.write_json(self._progress_path, {"plan": self.plan_hash, "done": sorted(self.done)})

    def shard_done(self, key: str) -> bool:
        """True when the key's shard was completed by an earlier (interrupted) run: the caller may skip its work."""
        return self.shard_of[key].name in self.done

    def add(self, key: str, tensor: torch.Tensor) -> None:
        sh = self.shard_of.get(key)
        if sh is None:
            raise KeyError(f"tensor {key!r} is not in the output plan")
        if sh.name in self.done:
            return
        t = tensor.detach().to(device="cpu", dtype=self.dtypes[key]).contiguous()
        if not all_finite(t):
            self.abort()
            raise NumericError(f"merged tensor {key!r} has NaN/Inf values; refusing to write it")
        stream = self.streams[sh.name]
        try:
            stream.add(key, t)
        except BaseException:
            self.abort()
            raise
        del t
        if stream.complete:
            self.done.add(sh.name)
            self._write_progress()
            faults.hit("write.shard")

    def float_dtype(self) -> torch.dtype | None:
        """The dtype holding most of the written floating-point elements (what config.json must name)."""
        count: dict[torch.dtype, int] = {}
        for sh in self.shards:
            for k in sh.keys:
                if self.dtypes[k].is_floating_point:
                    count[self.dtypes[k]] = count.get(self.dtypes[k], 0) + self.numel[k]
        return max(count, key=count.get) if count else None

    def abort(self) -> None:
        """Remove the temp files of unfinished shards (finished ones stay for a resume)."""
        for st in self.streams.values():
            st.abort()

    def close(self, *, recipe: dict, card: str) -> Path:
        if self.current:
            from .progress import info

            info(f"bmm: {self.out} is up to date (same inputs, parameters and layout); nothing rewritten")
            return self.out
        missing = [sh.name for sh in self.shards if sh.name not in self.done]
        if missing:
            st = self.streams[missing[0]]
            absent = [k for k in st.keys[st._next:] if k not in st._waiting]
            self.abort()
            raise RuntimeError(f"output incomplete: shard {missing[0]} lacks tensor {absent[0] if absent else '?'}")
        if len(self.shards) > 1:
            total = sum(sh.nbytes for sh in self.shards)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: sh.name for sh in self.shards for k in sh.keys}}
            atomic.write_json(self.staging / INDEX_NAME, index)
        if self.copy_from is not None:
            for name in COPY_PATTERNS:
                src = self.copy_from / name
                if src.is_file():
                    data = src.read_bytes()
                    if name == "config.json":
                        data = config_with_dtype(data, self.float_dtype(), source=src)
                    atomic.write_bytes(self.staging / name, data)
        atomic.write_text(self.staging / "README.md", card)
        atomic.write_json(self.staging / MARKER_NAME, {**recipe, "output_plan": self.plan_hash})
        self._progress_path.unlink(missing_ok=True)
        swap_in_dir(self.staging, self.out)
        return self.out


_CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers >= 4.56 reads ``dtype`` (5.x prefers it), older ``torch_dtype``


def config_with_dtype(raw: bytes, dtype: torch.dtype | None, *, source: Path) -> bytes:
    """The base's config.json with its dtype set to the one the merged tensors are written in.

    Unchanged (byte for byte) when it already names that dtype. Otherwise both keys are written, so that
    ``from_pretrained(dtype="auto")`` of any transformers version loads the tensors' dtype; sub-configs (``text_config``
    ...) that name a dtype get the same one.
    """
    if dtype is None:
        return raw
    try:
        cfg = json.loads(raw)
    except ValueError:
        raise InputError(f"{source}: not valid JSON") from None
    if not isinstance(cfg, dict):
        return raw
    name = str(dtype).removeprefix("torch.")
    if all(cfg.get(k) in (None, name) for k in _CONFIG_DTYPE_KEYS) and any(cfg.get(k) for k in _CONFIG_DTYPE_KEYS):
        return raw

    def patch(d: dict, top: bool) -> None:
        for k in _CONFIG_DTYPE_KEYS:
            if top or k in d:
                d[k] = name
        for v in d.values():
            if isinstance(v, dict) and any(k in v for k in _CONFIG_DTYPE_KEYS):
                patch(v, False)

    patch(cfg, True)
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def _sound(path: Path) -> bool:
    """A complete safetensors file (header consistent with the size)."""
    try:
        read_header(path)
    except InputError:
        return False
    return True


def recover_output(final: Path) -> None:
    """Undo a crash between the two renames of :func:`swap_in_dir`: ``final`` missing and its previous version at
    ``.<name>.bmm-old`` -> put the previous version back."""
    old = final.parent / f".{final.name}.bmm-old"
    if not final.exists() and old.is_dir():
        os.replace(old, final)
        atomic.fsync_dir(final.parent)
        from .progress import info

        info(f"bmm: restored the previous {final} from {old.name} (an earlier run was killed while swapping it)")


def swap_in_dir(new: Path, final: Path) -> None:
    """Replace directory ``final`` by ``new`` with renames: at every instant ``final`` is the old or the new one
    (between the two renames it is briefly absent; a crash there leaves the old one at ``.<name>.bmm-old``, which
    the next ModelWriter for ``final`` puts back: :func:`recover_output`)."""
    old = final.parent / f".{final.name}.bmm-old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    atomic.fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_card(recipe: dict) -> str:
    """A short README.md for a merged model."""
    lines = ["---", "tags:", "- merge", "- bmm", "- bayesian-model-merging"]
    base = recipe.get("base")
    if base:
        lines += [f"base_model: {json.dumps(str(base))}"]
    lines += ["---", "", f"# {recipe.get('title', 'Merged model')}", "",
              "Merged with [bmm](https://arxiv.org/abs/2605.12843) (Bayesian Model Merging).", ""]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


__all__ = [
    "check_not_input",
    "Checkpoint", "TensorMeta", "ModelWriter", "ShardReader", "save_tensors", "read_header", "plan_shards",
    "parse_size", "parse_dtype", "resolve_model_dir", "check_output_dir", "recover_output", "swap_in_dir",
    "model_card", "residency", "BadTensorError",
    "DTYPES", "DTYPE_NAMES", "MARKER_NAME", "INDEX_NAME", "SINGLE_NAME",
]

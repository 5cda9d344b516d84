"""Writing a Hugging Face model directory: ``model-0000i-of-0000n.safetensors`` + index (or one
``model.safetensors``), config and tokenizer files copied from the base, a model card. Shards are streamed as their
tensors are produced (header first, from the planned shapes), every file is atomic, and the directory is swapped in
under its final name only when complete; an interrupted write resumes from its finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import atomic, faults
from .budget import FILE_HEADER, HEADER_ENTRY, SMALL_FILES, check_free
from .errors import InputError, NumericError
from .progress import info
from .store import (
    COPY_GLOBS,
    COPY_PATTERNS,
    DTYPE_NAMES,
    INDEX_NAME,
    MARKER_NAME,
    SINGLE_NAME,
    all_finite,
    looks_like_hub_id,
    read_header,
)


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
        raise InputError(f"--out {out} exists and is not a bmm output; "
                         "choose another path or pass --force to replace it")


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
            head[key] = {"dtype": DTYPE_NAMES[dt], "shape": [int(d) for d in shape],
                         "data_offsets": [offset, offset + n]}
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
        check_space: bool = True,
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
        self.done = set(done)
        self._sized = dict(sized)
        if check_space:
            self.check_space()
        self.staging.mkdir(parents=True, exist_ok=True)
        self._progress_path = progress_path
        self._write_progress()

    def check_space(self) -> int:
        """Refuse (one-line :class:`InputError`) when the output's file system cannot hold what is still to be
        written: the shards not done (a resume needs only the rest; shards a caller linked in count as done), each
        with its header, the files copied from the base and the small files. Returns those bytes."""
        need = SMALL_FILES + sum(FILE_HEADER + sum(self._sized[k] + len(k) + HEADER_ENTRY for k in sh.keys)
                                 for sh in self.shards if sh.name not in self.done)
        need += sum(p.stat().st_size for p in set(self._copied_files()))
        check_free(self.out, need, what="the merged model", option="--out")
        return need

    def _copied_files(self) -> list[Path]:
        """The base's files the output carries (``COPY_PATTERNS`` in order, then ``COPY_GLOBS``), those present."""
        if self.copy_from is None:
            return []
        named = [p for p in (self.copy_from / n for n in COPY_PATTERNS) if p.is_file()]
        return named + sorted({p for g in COPY_GLOBS for p in self.copy_from.glob(g) if p.is_file()})

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

    def close(self, *, recipe: dict, card: str, finish: Callable[[Path], None] | None = None) -> Path:
        """Complete the output: index, files copied from the base, model card, marker; ``finish(dir)`` may then
        change files of the directory (tokenizer, config) before it is swapped in under its final name."""
        if self.current:
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
        for src in self._copied_files():
            data = src.read_bytes()
            if src.name == "config.json":
                data = config_with_dtype(data, self.float_dtype(), source=src)
            atomic.write_bytes(self.staging / src.name, data)
        copy_sentence_transformers(self.copy_from, self.staging)
        if finish is not None:
            finish(self.staging)
        atomic.write_text(self.staging / "README.md", card)
        atomic.write_json(self.staging / MARKER_NAME, {**recipe, "output_plan": self.plan_hash})
        self._progress_path.unlink(missing_ok=True)
        swap_in_dir(self.staging, self.out)
        return self.out


# transformers >= 4.56 reads ``dtype`` (5.x prefers it), older versions ``torch_dtype``
_CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


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


ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def copy_sentence_transformers(src: Path | None, dst: Path) -> list[str]:
    """A sentence-transformers base's own files (``modules.json``, its config files and the module folders it
    lists, e.g. ``1_Pooling/``), copied into ``dst`` so the merged model keeps its pooling; returns what was copied."""
    if src is None or not (Path(src) / "modules.json").is_file():
        return []
    src = Path(src)
    try:
        modules = json.loads((src / "modules.json").read_text())
        dirs = [m.get("path") for m in modules if isinstance(m, dict)]
    except (ValueError, AttributeError):
        raise InputError(f"{src / 'modules.json'}: not a sentence-transformers module list") from None
    copied = []
    for name in ST_FILES:
        if (src / name).is_file():
            atomic.write_bytes(dst / name, (src / name).read_bytes())
            copied.append(name)
    for d in dirs:
        if not d or not (src / d).is_dir() or Path(d).is_absolute() or ".." in Path(d).parts:
            continue
        for f in sorted((src / d).rglob("*")):
            if f.is_file():
                rel = f.relative_to(src)
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                atomic.write_bytes(dst / rel, f.read_bytes())
                copied.append(str(rel))
    return copied


_HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def parent_name(path: str) -> str | None:
    """How the model card's ``base_model:`` names a parent: its hub id (a hub cache snapshot, or an id as given);
    None for a local directory, which the Hub could not resolve (the recipe below the front matter names it)."""
    m = _HUB_CACHE.search(str(path))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return str(path) if looks_like_hub_id(str(path)) and not Path(str(path)).exists() else None


def model_card(recipe: dict) -> str:
    """A short README.md for a merged model: front matter with every parent on the Hub (``base_model:`` the base
    and the experts, ``base_model_relation: merge``, the Hub's convention for merges), the recipe below."""
    lines = ["---", "tags:", "- merge", "- bmm", "- bayesian-model-merging"]
    parents = [recipe.get("base"), *(recipe.get("experts") or [])]
    parents = [p for p in dict.fromkeys(parent_name(p) for p in parents if p) if p]
    if parents:
        lines += ["base_model:"] + [f"- {json.dumps(p)}" for p in parents] + ["base_model_relation: merge"]
    lines += ["---", "", f"# {recipe.get('title', 'Merged model')}", "",
              "Merged with [bmm](https://arxiv.org/abs/2605.12843) (Bayesian Model Merging).", ""]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


__all__ = [
    "ModelWriter", "plan_shards", "parse_size", "check_not_input", "check_output_dir", "recover_output",
    "swap_in_dir", "config_with_dtype", "model_card", "copy_sentence_transformers", "parent_name",
]

"""The cached trial solver: every module of a model solved for one search trial, about one GEMM each, with the
cache placed on the device, in host memory or spilled to disk under memory budgets.

The math (``_apply``: ``U = ((B̂Q + λ·U0Q)·diag(1/(Λ+λ)))Qᵀ``, the hybrid Cholesky) lives in :mod:`closed_form`;
this module only decides where each block's factors live and streams them through the GEMMs.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_with
from .closed_form import (
    _COMPUTE_MODES,
    GramStats,
    ModuleFactors,
    _apply,
    _check_lam,
    _check_shapes,
    _matmul_precision,
    solve_hybrid_trial,
)
from .device import gpu_memory, host_memory, host_reserve, resolve_device
from .errors import InputError, NumericError

Tensor = torch.Tensor

__all__ = ["TrialSolver", "BaseProvider", "Param"]

# ---------------------------------------------------------------------------------------------------------
# The trial solver: all modules of a model, one GEMM each per trial, memory flat in depth
# ---------------------------------------------------------------------------------------------------------

BaseProvider = Union[Mapping[str, Tensor], Callable[[str], Tensor], None]
Param = Union[Mapping[str, float], Callable[[str], float], float]


@dataclass
class _Entry:
    key: str
    kind: str  # "factors" | "hybrid"
    names: dict[str, str]  # role -> tensor name inside the block's dict
    shape: tuple[int, int]


@dataclass
class _Block:
    id: object
    entries: list[_Entry]
    tensors: dict[str, Tensor]
    where: str = "open"  # open | device | host | disk
    path: Path | None = None
    nbytes: int = 0


def _param(p: Param, key: str, what: str) -> float:
    try:
        if callable(p):
            return float(p(key))
        if isinstance(p, Mapping):
            return float(p[key])
        return float(p)
    except KeyError:
        raise InputError(f"{key}: no {what} given for this module") from None


class TrialSolver:
    """Solve every module of a model for one search trial: ``W = W_pre + s·U(λ)``, about one GEMM per module.

    Modules are added block by block (``add(key, factors, w_pre, block=b)``; a new block id seals the previous
    block). A sealed block is placed once, in order of preference:

    * ``device``: resident on the compute device while the resident blocks fit ``budget_bytes`` (CUDA).
      ``budget_bytes=None`` means "what is free on the GPU when the first block is sealed, minus a reserve of
      3 blocks" (two stream buffers + working set); ``budget_bytes=0`` streams every block (GPU memory flat in
      depth). On CPU the device is host memory: see ``host``.
    * ``host``: host memory (pinned on CUDA, copied to the device block by block on a side stream, the next
      block's copy overlapping the current block's GEMMs) while the blocks kept there fit ``host_budget_bytes``.
      ``None`` means MemAvailable when the solver is made minus a reserve (the larger of 2 GiB and 10 % of the
      machine) and two blocks in flight; ``0`` keeps nothing there.
    * ``disk``: the rest, with ``spill_dir``: written once as ``block-<id>.safetensors`` and read back per trial
      in a background thread, the next block's read overlapping the current block's GEMMs (host memory flat in
      depth: two blocks in flight; the page cache makes rereads cheap while RAM allows). Without ``spill_dir`` a
      block over an explicit host budget is an error; over the default budget it stays in host memory.

    Per trial the device working set is at most two streamed blocks plus one module's temporaries
    (X, U, W in fp32 and an fp32 copy of Q when factors are bf16), independent of the number of blocks.
    Results are yielded in insertion order, on CPU, one module behind the GPU so the copy-back and the
    caller's work overlap the next module's GEMM.

    Llama-3.1-8B (per block: Q 306 M elements, BQ / U0Q / W_pre 218 M each): fp32 cache 3.84 GB/block,
    123 GB for 32 blocks (no H100 holds it); bf16 cache + bf16 W_pre 1.92 GB/block, 61 GB (47 GB with the
    zero anchor, U0Q not stored): resident on one 80 GB H100 with room for the working set. Chosen default
    for 8B on H100: bf16 factors resident, ``compute="tf32"`` (or ``bf16``); anything that does not fit is
    streamed from pinned host memory (~40 ms per bf16 block at 48 GB/s, overlapped).
    """

    def __init__(
        self,
        device: torch.device | str = "auto",
        *,
        budget_bytes: int | None = None,
        compute: str = "fp32",
        out_dtype: torch.dtype | None = None,
        spill_dir: str | os.PathLike | None = None,
        pin_memory: bool = True,
        host_budget_bytes: int | None = None,
    ):
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        if compute not in _COMPUTE_MODES:
            raise InputError(f"compute must be one of {', '.join(_COMPUTE_MODES)}, got {compute!r}")
        for name, v in (("budget_bytes", budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if v is not None and v < 0:
                raise InputError(f"{name} must be >= 0, got {v}")
        self.compute = compute
        self.out_dtype = out_dtype
        self.budget_bytes = budget_bytes
        self.host_budget_bytes = host_budget_bytes
        # where each budget came from (for plan() and the user-facing placement line)
        self.budget_source = {"device": "given" if budget_bytes is not None else "free minus reserve",
                              "host": "given" if host_budget_bytes is not None else "MemAvailable minus reserve"}
        self._host_free = host_memory() if host_budget_bytes is None else None  # measured before the cache exists
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.pin_memory = pin_memory
        self._blocks: list[_Block] = []
        self._keys: set[str] = set()
        self._resident_bytes = 0
        self._host_bytes = 0
        self._copy_stream = None
        self._reader = None  # one background thread reading spilled blocks

    # -- building ------------------------------------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        return [e.key for b in self._blocks for e in b.entries]

    def _block_for(self, block: object) -> _Block:
        if self._blocks and self._blocks[-1].id == block and self._blocks[-1].where == "open":
            return self._blocks[-1]
        if any(b.id == block for b in self._blocks):
            raise InputError(f"block {block!r} was already sealed: add a block's modules together")
        if self._blocks:
            self._seal(self._blocks[-1])
        b = _Block(block, [], {})
        self._blocks.append(b)
        return b

    def _put(self, blk: _Block, name: str, t: Tensor) -> str:
        # Deduplicate tensors shared between modules (e.g. one Q for q/k/v in data-assisted mode).
        for n, old in blk.tensors.items():
            if old is t:
                return n
        blk.tensors[name] = t
        return name

    def _add(self, key: str, kind: str, roles: dict[str, Tensor | None], shape, block) -> None:
        if key in self._keys:
            raise InputError(f"{key}: added twice to the trial solver")
        blk = self._block_for(block)
        names = {r: self._put(blk, f"{key}::{r}", t) for r, t in roles.items() if t is not None}
        blk.entries.append(_Entry(key, kind, names, tuple(shape)))
        self._keys.add(key)

    def add(self, key: str, factors: ModuleFactors, w_pre: Tensor | None = None, *, block: object = 0) -> None:
        """Register one module's cached factors (and optionally its base weight ``W_pre`` [d_out, d_in])."""
        if w_pre is not None and tuple(w_pre.shape) != factors.shape:
            raise InputError(f"{key}: W_pre {tuple(w_pre.shape)} does not match the factors {factors.shape}")
        roles = {"Q": factors.Q, "evals": factors.evals, "BQ": factors.BQ, "U0Q": factors.U0Q, "W_pre": w_pre}
        self._add(key, "factors", roles, factors.shape, block)

    def add_hybrid(
        self,
        key: str,
        free: GramStats,
        data: GramStats,
        U0: Tensor | None,
        w_pre: Tensor | None = None,
        *,
        block: object = 0,
    ) -> None:
        """Register a hybrid module: ε is given per trial, so each trial costs a Cholesky solve instead."""
        _check_shapes(free.G_hat, free.B_hat, U0, key)
        _check_shapes(data.G_hat, data.B_hat, U0, key)
        if w_pre is not None and tuple(w_pre.shape) != tuple(free.B_hat.shape):
            raise InputError(f"{key}: W_pre {tuple(w_pre.shape)} does not match B̂ {tuple(free.B_hat.shape)}")
        roles = {"Gf": free.G_hat, "Bf": free.B_hat, "Gd": data.G_hat, "Bd": data.B_hat, "U0": U0, "W_pre": w_pre}
        self._add(key, "hybrid", roles, free.B_hat.shape, block)

    def _reserve(self, blk: _Block) -> int:
        """Device bytes kept free: two streamed blocks plus one module's fp32 temporaries."""
        work = 0
        for e in blk.entries:
            d_out, d_in = e.shape
            work = max(work, 4 * (4 * d_out * d_in + 2 * d_in * d_in))
        return 2 * blk.nbytes + work

    def _resolve_budgets(self, blk: _Block) -> None:
        """Fix the default budgets when the first block is sealed (its size sets the reserves)."""
        if self.host_budget_bytes is None:
            avail, total = self._host_free
            self.host_budget_bytes = max(0, avail - host_reserve(total) - 2 * blk.nbytes)
        if self.budget_bytes is None and self.device.type == "cuda":
            free, _ = gpu_memory(self.device)
            # tensors already on the device are counted as free for themselves
            here = sum(t.numel() * t.element_size() for t in blk.tensors.values() if t.device.type == "cuda")
            self.budget_bytes = max(0, free + here - self._reserve(blk))

    def _seal(self, blk: _Block) -> None:
        if blk.where != "open":
            return
        # one memory layout whatever the placement (a spilled block comes back contiguous), so the GEMMs, and the
        # results bit for bit, do not depend on where the block lives
        blk.tensors = {n: t.contiguous() for n, t in blk.tensors.items()}
        blk.nbytes = sum(t.numel() * t.element_size() for t in blk.tensors.values())
        dev = self.device
        if self.host_budget_bytes is None or (self.budget_bytes is None and dev.type == "cuda"):
            self._resolve_budgets(blk)
        if dev.type == "cuda" and self._resident_bytes + blk.nbytes <= self.budget_bytes:
            blk.tensors = {n: t.to(dev) for n, t in blk.tensors.items()}
            blk.where = "device"
            self._resident_bytes += blk.nbytes
            return
        if self._host_bytes + blk.nbytes > self.host_budget_bytes:
            if self.spill_dir is not None:
                self._spill(blk)
                return
            if self.budget_source["host"] == "given":
                raise InputError(f"trial cache block {blk.id} ({blk.nbytes / 1e9:.2f} GB) does not fit the host memory "
                                 f"budget ({self.host_budget_bytes / 1e9:.2f} GB, {self._host_bytes / 1e9:.2f} GB "
                                 "used): give a spill directory or a larger budget")
        moved = {}
        for n, t in blk.tensors.items():
            t = t.detach().to("cpu")
            if dev.type == "cuda" and self.pin_memory:
                try:
                    t = t.pin_memory()
                except RuntimeError:  # pinned memory exhausted: pageable still works, only slower
                    pass
            moved[n] = t
        blk.tensors, blk.where = moved, ("device" if dev.type == "cpu" else "host")
        self._host_bytes += blk.nbytes
        if dev.type == "cpu":
            self._resident_bytes += blk.nbytes

    def _spill(self, blk: _Block) -> None:
        path = self.spill_dir / f"block-{blk.id}.safetensors"
        # atomic: a full disk is the one-line DiskFullError naming the file, and leaves no partial file
        write_with(path, lambda tmp: save_file({n: t.detach().cpu().contiguous() for n, t in blk.tensors.items()},
                                               str(tmp)))
        blk.tensors, blk.where, blk.path = {}, "disk", path

    def plan(self) -> dict:
        """Seal the last block and describe where the blocks live (for logs and the bench)."""
        if self._blocks:
            self._seal(self._blocks[-1])
        where: dict[str, int] = {}
        where_bytes: dict[str, int] = {}
        for b in self._blocks:
            where[b.where] = where.get(b.where, 0) + 1
            where_bytes[b.where] = where_bytes.get(b.where, 0) + b.nbytes
        return {
            "device": str(self.device),
            "blocks": len(self._blocks),
            "modules": sum(len(b.entries) for b in self._blocks),
            "where": where,
            "where_bytes": where_bytes,
            "bytes": sum(b.nbytes for b in self._blocks),
            "resident_bytes": self._resident_bytes,
            "host_bytes": self._host_bytes,
            "max_block_bytes": max((b.nbytes for b in self._blocks), default=0),
            "device_budget_bytes": self.budget_bytes if self.device.type == "cuda" else None,
            "host_budget_bytes": self.host_budget_bytes,
            "budget_source": dict(self.budget_source),
            "spill_dir": str(self.spill_dir) if self.spill_dir is not None else None,
            "pinned": self.device.type == "cuda" and self.pin_memory,
        }

    # -- per trial -----------------------------------------------------------------------------------------

    def _start_fetch(self, blk: _Block):
        """Begin bringing a block to the device; returns (tensors, event or None) or a future of that pair.

        Spilled blocks are read (and on CUDA copied to the device) in a background thread, so the next block's
        read overlaps this block's GEMMs; host blocks on CUDA are copied on a side stream.
        """
        if blk.where == "device":
            return blk.tensors, None
        if blk.where == "disk":
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bmm-spill-read")
            return self._reader.submit(self._read_spilled, blk.path)
        return self._to_device(blk.tensors)

    def _read_spilled(self, path: Path):
        return self._to_device(load_file(str(path), device="cpu"))

    def _to_device(self, src: dict[str, Tensor]):
        if self.device.type != "cuda":
            return src, None
        with torch.cuda.stream(self._copy_stream):
            dev = {n: t.to(self.device, non_blocking=True) for n, t in src.items()}
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        return dev, ev

    def _finish_fetch(self, fetched) -> dict[str, Tensor]:
        if not isinstance(fetched, tuple):  # a future from the spill reader
            fetched = fetched.result()
        tensors, ev = fetched
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for t in tensors.values():
                t.record_stream(cur)  # memory made on the copy stream, used (and freed) on this one
        return tensors

    def _delta(self, e: _Entry, T: dict[str, Tensor], lam: float, eps: float | None) -> Tensor:
        n = e.names
        if e.kind == "factors":
            return _apply(T[n["Q"]], T[n["evals"]], T[n["BQ"]], T[n["U0Q"]] if "U0Q" in n else None, lam, self.compute)
        if eps is None:
            raise InputError(f"{e.key}: hybrid module needs ε for this trial")
        free = GramStats(T[n["Gf"]], T[n["Bf"]], 1.0)
        data = GramStats(T[n["Gd"]], T[n["Bd"]], 1.0)
        # fp64 Cholesky: at small λ an fp32 one is off by ~κ(Ĝ+λI)·1e-7 (1 % at λ ~ 1e-4 with low-rank task vectors)
        return solve_hybrid_trial(free, data, T[n["U0"]] if "U0" in n else None, lam, eps, key=e.key,
                                  dtype=torch.float64)

    def solve(
        self,
        lams: Param,
        scales: Param,
        base: BaseProvider = None,
        *,
        eps: Param | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(key, W)`` in insertion order, ``W = W_pre + s·U(λ)`` on CPU in ``out_dtype``.

        ``lams``, ``scales`` (and ``eps`` for hybrid modules): a mapping key -> value, a callable, or one number.
        ``base`` supplies ``W_pre`` for modules added without one (mapping or callable key -> tensor).
        ``out_dtype`` default: the solver's, else ``W_pre``'s dtype. Raises :class:`NumericError` naming the
        module on NaN/Inf.
        """
        self.plan()
        dev = self.device
        cuda = dev.type == "cuda"
        blocks = self._blocks
        pending: tuple[str, Tensor, Tensor, object] | None = None

        def finish(p) -> tuple[str, Tensor]:
            key, W, ok, ev = p
            if ev is not None:
                ev.synchronize()
            if not bool(ok):
                raise NumericError(f"{key}: merged weight has NaN/Inf (check λ, the scale and the base weight)")
            return key, W

        if cuda and self._copy_stream is None:  # made here, not racily in the spill reader thread
            self._copy_stream = torch.cuda.Stream(dev)
        # TF32 and no_grad are scoped to our own compute, never left on while the caller runs between yields.
        nxt = self._start_fetch(blocks[0]) if blocks else None
        for i, blk in enumerate(blocks):
            T = self._finish_fetch(nxt)
            nxt = self._start_fetch(blocks[i + 1]) if i + 1 < len(blocks) else None
            for e in blk.entries:
                lam = _check_lam(_param(lams, e.key, "λ"), e.key)
                s = _param(scales, e.key, "scale")
                if "W_pre" in e.names:
                    W_pre = T[e.names["W_pre"]]
                else:
                    W_pre = self._base(base, e.key, e.shape)
                od = out_dtype or self.out_dtype or W_pre.dtype
                e_eps = None if eps is None else _param(eps, e.key, "ε")
                with _matmul_precision(dev, self.compute), torch.no_grad():
                    U = self._delta(e, T, lam, e_eps)
                    W = torch.add(W_pre.to(device=dev, dtype=U.dtype), U, alpha=s)
                    del U
                    ok = torch.isfinite(W).all()
                if cuda:
                    out = torch.empty(W.shape, dtype=od, pin_memory=True)
                    out.copy_(W.to(od), non_blocking=True)
                    ok = ok.to("cpu", non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                else:
                    out, ev = (W if W.dtype == od else W.to(od)), None
                del W
                if pending is not None:
                    yield finish(pending)
                pending = (e.key, out, ok, ev)
            del T
        if pending is not None:
            yield finish(pending)

    @staticmethod
    def _base(base: BaseProvider, key: str, shape) -> Tensor:
        if base is None:
            raise InputError(f"{key}: no base weight: add it with W_pre or pass base=")
        try:
            W = base(key) if callable(base) else base[key]
        except KeyError:
            raise InputError(f"{key}: base weight provider has no such key") from None
        if tuple(W.shape) != tuple(shape):
            raise InputError(f"{key}: base weight {tuple(W.shape)} does not match {tuple(shape)}")
        return W

    def close(self) -> None:
        """Drop every cached tensor and remove spilled block files."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        for b in self._blocks:
            b.tensors = {}
            if b.path is not None:
                with contextlib.suppress(OSError):
                    b.path.unlink()
        self._blocks, self._keys, self._resident_bytes, self._host_bytes = [], set(), 0, 0

    def __enter__(self) -> "TrialSolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

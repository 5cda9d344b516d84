"""LoRA experts: a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) read as a task vector.

An expert is a LoRA adapter when its directory holds ``adapter_config.json``, or when it is written
``BASE+ADAPTER`` (mergekit's spelling; the base must then be the merge's base). Each adapted module contributes

    ΔW = scale · B · A          ([d_out, d_in], nn.Linear orientation; GPT-2 Conv1D bases store its transpose)

with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` taken
per module from ``rank_pattern`` / ``alpha_pattern`` by PEFT's rule (a pattern matches a module name that equals
it or ends with ``.pattern``, as a regex). Embedding LoRA gives ``ΔE = scale · (B·A)ᵀ``. ``lora_bias`` adds
``scale · lora_B.bias`` to the base bias. Full tensors in the adapter file (``modules_to_save``, trained biases,
``save_embedding_layers``' base-layer copies) replace the base tensor: their task vector is ``W_saved − W_base``.

Refused, in one line naming the adapter and the option: other PEFT types (LoHa, LoKr, IA3, AdaLoRA, ...), DoRA,
QA-LoRA, aLoRA, layer replication, LoRA on parameters (``target_parameters``), trainable token indices, adapters
whose initialisation changed the base (PiSSA, OLoRA, CorDA, LoftQ), and other LoRA variants. The adapter is read
with safetensors (never a pickle); ``peft`` is not needed to read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import atomic
from .budget import HEADER_ENTRY, SMALL_FILES, check_free
from .errors import InputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json options that change what the adapter computes, and are not supported: (option, why)
_REFUSED_FLAGS = (
    ("use_dora", "DoRA rescales each column of W by a learned magnitude, so its task vector is not B·A"),
    ("use_qalora", "QA-LoRA pools its inputs group-wise, so its task vector is not B·A"),
    ("layer_replication", "layer replication changes the base's layer stack"),
    ("target_parameters", "LoRA on raw parameters is not read by bmm"),
    ("trainable_token_indices", "trainable token rows are not read by bmm"),
    ("alora_invocation_tokens", "activated LoRA only applies after its invocation tokens"),
    ("use_bdlora", "block-diagonal LoRA is not read by bmm"),
    ("arrow_config", "Arrow routing mixes adapters per token"),
    ("megatron_config", "Megatron-parallel LoRA layers are not read by bmm"),
)
# init_lora_weights values whose adapter is meant for a base that the initialisation changed
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal")


@dataclass
class LoraModule:
    """One adapted module, keyed by the base checkpoint's weight key."""

    key: str  # base weight key, e.g. "model.layers.0.self_attn.q_proj.weight"
    A: torch.Tensor  # [r, d_in]  (embedding LoRA: [r, num_embeddings])
    B: torch.Tensor  # [d_out, r] (embedding LoRA: [dim, r])
    scale: float
    conv1d: bool = False  # the base stores this weight [d_in, d_out] (fan_in_fan_out)
    embedding: bool = False  # the base weight is [num_embeddings, dim]: ΔE = (scale·B·A)ᵀ
    bias_key: str | None = None  # base bias key that lora_bias changes
    bias: torch.Tensor | None = None  # lora_B.bias (times ``scale`` when applied)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, A)`` with ``ΔW = P @ A`` in nn.Linear orientation [d_out, d_in] (scale folded into P).

        For embedding LoRA the "linear" orientation is the transposed table ``[dim, num_embeddings]``."""
        return self.scale * self.B.to(dtype), self.A.to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW`` in the base checkpoint's orientation."""
        P, A = self.factors(dtype)
        d = P @ A
        return d.T.contiguous() if (self.conv1d or self.embedding) else d


@dataclass
class LoraAdapter:
    """A read PEFT LoRA adapter, mapped onto a base checkpoint's keys."""

    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight key -> module
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # base key -> saved tensor replacing the base's

    @property
    def name(self) -> str:
        return str(self.path)

    def task_vector(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        """``W_expert − W_base`` of one base tensor in checkpoint orientation (fp32), or None when untouched."""
        out = None
        if key in self.full:
            out = self.full[key].float() - base.float()
        mod = self.modules.get(key)
        if mod is not None:
            d = mod.delta()
            out = d if out is None else out + d
        for m in self.modules.values():
            if m.bias_key == key and m.bias is not None:
                d = m.scale * m.bias.float()
                out = d if out is None else out + d
        return out

    def touched(self) -> set[str]:
        """Every base key the adapter changes."""
        keys = set(self.full) | set(self.modules)
        keys |= {m.bias_key for m in self.modules.values() if m.bias is not None and m.bias_key}
        return keys


# ---------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------


def is_adapter(path: str | Path) -> bool:
    """A directory holding ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def split_spec(spec: str) -> tuple[str | None, str]:
    """``BASE+ADAPTER`` -> (base, adapter); a plain spec -> (None, spec). A path that exists as written is never
    split (a ``+`` may be part of a directory name)."""
    if "+" not in spec or Path(spec).exists():
        return None, spec
    base, _, adapter = spec.rpartition("+")
    if not base or not adapter:
        raise InputError(f"expert {spec!r}: write a LoRA expert as BASE+ADAPTER (both parts non-empty)")
    return base, adapter


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not a PEFT adapter (no {CONFIG_NAME})") from None
    except ValueError:
        raise InputError(f"{cfg_path}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: expected a JSON object")
    check_supported(cfg, path)
    return cfg


def check_supported(cfg: dict, path: Path) -> None:
    """Refuse adapter kinds whose task vector is not ``scale·B·A`` (one line naming the adapter and option)."""
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise InputError(f"LoRA expert {path}: peft_type {kind} is not supported (only plain LoRA adapters merge)")
    for opt, why in _REFUSED_FLAGS:
        if cfg.get(opt):
            raise InputError(f"LoRA expert {path}: {opt} is not supported ({why}); merge the adapter into its base "
                             "first (peft merge_and_unload) and pass that model as the expert")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        raise InputError(f"LoRA expert {path}: init_lora_weights={init!r} changes the base weights the adapter "
                         "applies to; convert it to a plain LoRA adapter first (peft "
                         "path_initial_model_for_weight_conversion) or merge it into its base")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise InputError(f"LoRA expert {path}: {CONFIG_NAME} needs an integer r > 0 and a number lora_alpha "
                         f"(got r={r!r}, lora_alpha={alpha!r})")


def pattern_value(patterns: Mapping[str, float], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", name)``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", name):
            return v
    return default


def module_scale(cfg: dict, name: str) -> tuple[int, float]:
    """(r, scale) of module ``name`` (the module's name in the model, e.g. ``model.layers.0.self_attn.q_proj``)."""
    r = int(pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
    return r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _base_key(name: str, base_shapes: Mapping[str, tuple[int, ...]], adapter: Path) -> str:
    """The base checkpoint key of an adapter tensor name (prefix differences such as ``model.`` are allowed when
    exactly one base key fits)."""
    if name in base_shapes:
        return name
    hits = [k for k in base_shapes if k.endswith("." + name) or name.endswith("." + k)]
    if len(hits) != 1:
        why = "no tensor" if not hits else f"{len(hits)} tensors ({', '.join(hits[:3])})"
        raise InputError(f"LoRA expert {adapter}: {name!r} matches {why} of the base; is this adapter for this base?")
    return hits[0]


def _split_name(key: str) -> tuple[str, str] | None:
    """adapter key (prefix stripped) -> (module name, LoRA part), or None for a full tensor."""
    for part in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B"):
        if key.endswith(part):
            return key[: -len(part)], part
    return None


def _full_name(key: str) -> str:
    """A full tensor's model key: drop PEFT's wrapper levels (``.modules_to_save.<adapter>``, ``.base_layer``)."""
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    key = re.sub(r"\.original_module\.", ".", key)
    return key.replace(".base_layer.", ".")


def read_adapter(path: str | Path, base_shapes: Mapping[str, tuple[int, ...]]) -> LoraAdapter:
    """Read a PEFT LoRA adapter and map it onto the base (``base_shapes``: base key -> shape)."""
    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        hint = (" (only adapter_model.bin, a pickle, which bmm refuses to load: re-save it with "
                "safe_serialization=True)" if pickled.exists() else "")
        raise InputError(f"LoRA expert {path}: no {WEIGHTS_NAME}{hint}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    ad = LoraAdapter(path, cfg)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for raw in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                key = raw[len(PREFIX):] if raw.startswith(PREFIX) else raw
                if "lora_magnitude_vector" in key:
                    raise InputError(f"LoRA expert {path}: {raw!r} is a DoRA magnitude; use_dora is not supported")
                split = _split_name(key)
                if split is None:
                    if ".lora_" in key:
                        raise InputError(f"LoRA expert {path}: tensor {raw!r} is not a LoRA A/B tensor bmm reads "
                                         "(another LoRA variant?)")
                    bk = _base_key(_full_name(key), base_shapes, path)
                    t = f.get_tensor(raw)
                    if tuple(t.shape) != tuple(base_shapes[bk]):
                        raise InputError(f"LoRA expert {path}: saved tensor {raw!r} has shape {tuple(t.shape)}, the "
                                         f"base's {bk!r} has {tuple(base_shapes[bk])} (resized vocabulary?)")
                    ad.full[bk] = t
                    continue
                parts.setdefault(split[0], {})[split[1]] = f.get_tensor(raw)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"LoRA expert {weights}: cannot read ({exc})") from None
    for name, p in parts.items():
        mod = _module(ad, name, p, base_shapes)
        ad.modules[mod.key] = mod
    if not ad.modules and not ad.full:
        raise InputError(f"LoRA expert {path}: {WEIGHTS_NAME} holds no LoRA tensor")
    return ad


def _module(ad: LoraAdapter, name: str, p: dict[str, torch.Tensor], base_shapes) -> LoraModule:
    path = ad.path
    emb = ".lora_embedding_A" in p or ".lora_embedding_B" in p
    A, B = (p.get(".lora_embedding_A"), p.get(".lora_embedding_B")) if emb else (p.get(".lora_A.weight"),
                                                                                p.get(".lora_B.weight"))
    if A is None or B is None:
        raise InputError(f"LoRA expert {path}: module {name!r} has only one of its A/B tensors")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise InputError(f"LoRA expert {path}: module {name!r} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                         "which do not multiply (only linear and embedding LoRA are supported)")
    r, scale = module_scale(ad.config, name)
    if r != A.shape[0]:
        raise InputError(f"LoRA expert {path}: module {name!r} has rank {A.shape[0]} but {CONFIG_NAME} says r={r} "
                         "(check rank_pattern)")
    key = _base_key(name + ".weight", base_shapes, path)
    shape = tuple(base_shapes[key])
    lin = (int(B.shape[0]), int(A.shape[1]))
    if emb:
        conv1d = False
        ok = shape == lin[::-1]
    else:
        conv1d = bool(ad.config.get("fan_in_fan_out"))
        ok = shape == (lin[::-1] if conv1d else lin)
    if not ok:
        raise InputError(f"LoRA expert {path}: module {name!r} gives a {lin[0]}x{lin[1]} update but the base's {key!r} "
                         f"is {shape} (fan_in_fan_out={conv1d}); is this adapter for this base?")
    bias_key, bias = None, p.get(".lora_B.bias")
    if bias is not None:
        bias_key = _base_key(name + ".bias", base_shapes, path)
    return LoraModule(key, A, B, scale, conv1d, emb, bias_key, bias)


def adapter_digest(path: str | Path) -> str:
    """sha256 of the adapter's config and weights (an identity for stage manifests)."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class LoraCheckpoint:
    """A LoRA expert seen as a full checkpoint: the base's keys, shapes and dtypes; ``get`` returns
    ``W_base + ΔW`` (fp32) for the tensors the adapter changes and the base tensor for the rest.

    ``task_vector(key)`` gives ``ΔW`` directly (no rounding through ``W_base``); ``factors(key)`` the low-rank
    ``(P, A)`` of an adapted linear module in nn.Linear orientation, for the low-rank solve."""

    def __init__(self, base, adapter: LoraAdapter, spec: str):
        self.base = base
        self.adapter = adapter
        self.root = adapter.path
        self.spec = spec
        self.meta = base.meta
        self.files = base.files

    @classmethod
    def open(cls, base, adapter_path: str | Path, *, spec: str | None = None) -> "LoraCheckpoint":
        """``base``: the opened base :class:`~bmm_cli.store.Checkpoint`."""
        shapes = {k: tuple(m.shape) for k, m in base.meta.items()}
        return cls(base, read_adapter(adapter_path, shapes), spec or str(adapter_path))

    def keys(self) -> list[str]:
        return list(self.meta)

    def __contains__(self, key: str) -> bool:
        return key in self.meta

    @property
    def reopen_spec(self) -> str:
        """``BASE+ADAPTER`` with absolute paths: what :meth:`bmm_cli.store.Checkpoint.open` reopens as this expert."""
        return f"{self.base.root}+{self.root}"

    def config(self) -> dict:
        return self.base.config()

    def total_bytes(self) -> int:
        return self.base.total_bytes()

    def fingerprint(self) -> dict:
        return {"path": str(self.root), "lora_sha256": adapter_digest(self.root), "base": self.base.fingerprint()}

    def task_vector(self, key: str) -> torch.Tensor | None:
        if key not in self.adapter.touched():
            return None
        return self.adapter.task_vector(key, self.base.get(key))

    def rank_bound(self, key: str) -> int | None:
        """``rank(ΔW)`` of one base tensor as the adapter defines it: its LoRA rank, 0 when the adapter leaves it
        alone, None when it is a saved full tensor or an embedding."""
        if key in self.adapter.full:
            return None
        m = self.adapter.modules.get(key)
        if m is None:
            return 0 if key not in self.adapter.touched() else None
        return None if m.embedding else m.rank

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        m = self.adapter.modules.get(key)
        if m is None or m.embedding or key in self.adapter.full:
            return None
        return m.factors()

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        w = self.base.get(key, check_finite=check_finite)
        if key not in self.adapter.touched():
            return w
        d = self.adapter.task_vector(key, w)
        out = w.float() + d
        if check_finite and not bool(torch.isfinite(out).all()):
            raise InputError(f"LoRA expert {self.root}: the update of {key!r} has NaN/Inf values")
        return out

    def close(self) -> None:
        self.base.close()


def rank_bounds(experts, key: str) -> tuple[int | None, ...] | None:
    """Per expert, the exact bound on the rank of its task vector of ``key`` a LoRA expert gives
    (:meth:`LoraCheckpoint.rank_bound`; None for a full expert); None when no expert gives one."""
    out = tuple(e.rank_bound(key) if isinstance(e, LoraCheckpoint) else None for e in experts)
    return None if all(r is None for r in out) else out


def open_expert(spec: str, base, *, role: str = "expert"):
    """An expert spec -> a checkpoint: ``BASE+ADAPTER`` or an adapter directory -> :class:`LoraCheckpoint` on the
    opened ``base`` (a ``BASE`` that is not the merge's base is refused); anything else -> None (open it as a model)."""
    base_spec, adapter = split_spec(spec)
    if base_spec is not None:
        local = Path(base_spec).expanduser()
        same = local.resolve() == Path(base.root).resolve() if local.exists() else base_spec == base.spec
        if not same:
            raise InputError(f"{role} {spec}: its base {base_spec} is not the merge's base {base.root}; "
                             "every expert must be a fine-tune of the same base")
        if not is_adapter(adapter):
            raise InputError(f"{role} {spec}: {adapter} is not a PEFT adapter directory (no {CONFIG_NAME})")
    elif not is_adapter(adapter):
        return None
    return LoraCheckpoint.open(base, Path(adapter).resolve(), spec=spec)


# ---------------------------------------------------------------------------------------------------------
# Writing a merge as one adapter
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModuleUpdate:
    """The merged update of one module, ``ΔW = left @ right`` in nn.Linear orientation [d_out, d_in]."""

    key: str  # base weight key, "<module name>.weight"
    left: torch.Tensor  # [d_out, k]
    right: torch.Tensor  # [k, d_in]
    conv1d: bool = False  # the base module is a GPT-2 Conv1D
    bias: torch.Tensor | None = None  # Δbias of the module (written as lora_B.bias; the base must have a bias)

    @classmethod
    def dense(cls, key: str, delta: torch.Tensor, **kw) -> "ModuleUpdate":
        """From a dense ``ΔW`` [d_out, d_in]."""
        return cls(key, delta, torch.eye(delta.shape[1], dtype=delta.dtype, device=delta.device), **kw)


def compress(left: torch.Tensor, right: torch.Tensor, rank: int | None, *,
             rtol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, energy)`` with ``B @ A`` the best rank-``rank`` approximation of ``left @ right`` (fp64 inside).

    Exact (``energy`` 1) when the product's numerical rank (singular values above ``rtol``·σ_max) is at most
    ``rank`` (None: no limit); ``energy`` is the kept share of ``‖ΔW‖²_F``. Costs a QR of each factor and an SVD
    of a k×k core, never a d_out×d_in SVD (for a dense ΔW pass ``right = I``)."""
    L, Rt = left.double(), right.double()
    Q1, R1 = torch.linalg.qr(L)
    Q2, R2 = torch.linalg.qr(Rt.mT)
    U, S, Vh = torch.linalg.svd(R1 @ R2.mT)
    total = float(S.square().sum())
    if total == 0.0:
        return left.new_zeros(left.shape[0], 0), right.new_zeros(0, right.shape[1]), 1.0
    keep = int((S > rtol * S[0]).sum())
    if rank is not None:
        keep = min(keep, rank)
    B = (Q1 @ U[:, :keep]) * S[:keep]
    A = (Q2 @ Vh[:keep].mT).mT
    return B, A, float(S[:keep].square().sum()) / total


def write_peft_adapter(out: str | Path, updates: list[ModuleUpdate], *, rank: int | None = None,
                       base_model: str | None = None, modules_to_save: Mapping[str, torch.Tensor] | None = None,
                       dtype: torch.dtype = torch.float32, force: bool = False,
                       files: Mapping[str, str] | None = None) -> dict:
    """Write the merge as one PEFT LoRA adapter on the base; returns ``{"rank": r, "modules": {key: {"rank",
    "energy"}}}``.

    Every module gets rank ``r`` = the largest rank kept (at most ``rank``), ``lora_alpha = r`` (scale 1); a module
    of lower rank is padded with zero rows, so ``PeftModel.from_pretrained(base, out)`` computes ``W + B·A`` with
    ``B·A`` = the update (exact when each update's rank is at most ``rank``; else its truncated SVD, ``energy`` < 1).
    ``modules_to_save``: full tensors (base key -> tensor) of whole modules the merge changed otherwise
    (e.g. ``lm_head.weight``): the module name (the key without its last part) is listed in ``modules_to_save``.
    ``files``: more text files (name -> content) for the directory (a model card, a recipe).
    The directory appears complete or not at all."""
    out = Path(out)
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be >= 1, got {rank}")
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    kinds = {u.conv1d for u in updates}
    if len(kinds) > 1:
        raise InputError("a PEFT adapter has one fan_in_fan_out setting: Conv1D and Linear modules cannot share it")
    if not updates:
        raise InputError("no module updates to write as an adapter")
    parts, report = [], {}
    for u in updates:
        if not u.key.endswith(".weight"):
            raise InputError(f"{u.key}: a LoRA module update must name a '.weight' tensor")
        B, A, energy = compress(u.left, u.right, rank)
        parts.append((u, B, A))
        report[u.key] = {"rank": int(A.shape[0]), "energy": energy}
    r = max(1, max(int(A.shape[0]) for _, _, A in parts))
    with_bias = any(u.bias is not None for u, _, _ in parts)
    tensors: dict[str, torch.Tensor] = {}
    names = []
    for u, B, A in parts:
        name = u.key[: -len(".weight")]
        names.append(name)
        pad = r - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])]) if pad else A
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1) if pad else B
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous()
        if with_bias:
            bias = u.bias if u.bias is not None else B.new_zeros(B.shape[0])
            tensors[f"{PREFIX}{name}.lora_B.bias"] = bias.to(dtype).contiguous()
    saved_modules = sorted({k.rsplit(".", 1)[0] for k in (modules_to_save or {})})
    for k, t in (modules_to_save or {}).items():
        tensors[PREFIX + k] = t.contiguous()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": r, "lora_alpha": r,
        "lora_dropout": 0.0, "target_modules": sorted(names), "fan_in_fan_out": kinds == {True},
        "bias": "none", "lora_bias": with_bias, "use_rslora": False, "use_dora": False,
        "modules_to_save": saved_modules or None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }
    # the tensors, a header entry each, and room for the config, card and recipe
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + HEADER_ENTRY * len(tensors) + SMALL_FILES
    check_free(out, need, what="the adapter", option="--out")
    tmp = out.parent / f".{out.name}.bmm-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic.write_with(tmp / WEIGHTS_NAME, lambda p: save_file(clean, str(p)))
        atomic.write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (files or {}).items():
            atomic.write_text(tmp / name, text)
        tmp.chmod(0o777 & ~atomic._umask())
        atomic.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rank": r, "modules": report}

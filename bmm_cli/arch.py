"""Architecture map: which checkpoint keys BMM solves, their transformer block and their group.

A key is *solvable* when it is a 2-D linear weight inside a transformer block; its group is one of
``attn_in`` (q/k/v, fused qkv, T5 cross-attention q/k/v), ``attn_out``, ``mlp_in`` (gate/up, fused gate_up, fc1,
expert w1/w3) or ``mlp_out``.
Everything else is "other" and is merged by the anchor's rule. Keys the map does not recognise are listed by
``bmm plan`` (never dropped silently).

MoE expert FFNs are modules of their own (one per expert, in the ``mlp_in`` / ``mlp_out`` groups, see
``moe_groups``); routers are "other". Fused 3-D expert tensors are split per expert when asked (``fused=True``).

Blocks are identified by their *stack* (the key prefix before the layer number, e.g. ``model.layers`` or
``vision_model.encoder.layers``) and their layer number, so two-tower models (CLIP) keep their towers apart.
Block-groups are depth-relative: layer ``l`` of a stack with ``L`` layers belongs to group ``l * B // L``, so a
CLIP's text and vision layers at the same relative depth share a group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .errors import InputError
from .params import GROUPS, block_group


@dataclass(frozen=True)
class ModuleRef:
    key: str  # the module's id: the checkpoint key, or ``tensor[E]`` for one expert of a fused 3-D tensor
    stack: str  # key prefix up to the layer number, e.g. "model.layers"
    layer: int
    group: str  # one of GROUPS
    family: str  # which rule matched (llama, gpt2, bert, clip, open_clip, moe, neox, falcon, phi, t5, opt)
    conv1d: bool = False  # stored d_in x d_out (GPT-2 Conv1D, GPT-OSS experts): transpose on read and on write
    expert: int | None = None  # MoE expert number (per-expert keys and fused slices alike)
    tensor: str | None = None  # the fused 3-D checkpoint tensor this module is slice ``expert`` of (None: 2-D)

    @property
    def block_id(self) -> str:
        return f"{self.stack}.{self.layer}"

    @property
    def source(self) -> str:
        """The checkpoint key holding this module's weight."""
        return self.tensor or self.key


# (family, regex, group by name pattern, conv1d). The regex captures (stack, layer, name); in a name pattern
# ``#`` stands for a number (an expert, or T5's sub-layer index) and the group lookup uses the name with its
# numbers replaced by ``#``.
_L = r"(?P<stack>(?:.*\.)?{stack})\.(?P<layer>\d+)\.(?P<name>{names})"
_RULES: list[tuple[str, re.Pattern, dict[str, str], bool]] = []
_NUM = re.compile(r"(?:(?<=\.)|^)\d+(?=\.|$)")


def _name_pattern(name: str) -> str:
    return re.escape(name).replace(r"\#", r"\d+")


def _rule(family: str, stack: str, names: dict[str, str], suffix: str = r"\.weight", conv1d: bool = False) -> None:
    alt = "|".join(_name_pattern(n) for n in sorted(names, key=len, reverse=True))
    pat = re.compile("^" + _L.format(stack=stack, names=alt) + suffix + "$")
    _RULES.append((family, pat, names, conv1d))


# Llama, Mistral, Qwen2, Gemma, Phi-3 (fused qkv_proj / gate_up_proj); OPT's and Phi-2's q/k/v_proj too
_rule("llama", "layers", {
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.qkv_proj": "attn_in", "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.gate_up_proj": "mlp_in", "mlp.down_proj": "mlp_out",
})
# MoE expert FFNs, one module per expert, in the mlp groups (see ``moe_groups`` below): Mixtral, Qwen2-MoE /
# Qwen3-MoE (routed and shared experts), DeepSeek-style ``shared_experts``. Routers stay "other".
_rule("moe", "layers", {
    "block_sparse_moe.experts.#.w1": "mlp_in", "block_sparse_moe.experts.#.w3": "mlp_in",
    "block_sparse_moe.experts.#.w2": "mlp_out",
    "mlp.experts.#.gate_proj": "mlp_in", "mlp.experts.#.up_proj": "mlp_in", "mlp.experts.#.down_proj": "mlp_out",
    "mlp.shared_expert.gate_proj": "mlp_in", "mlp.shared_expert.up_proj": "mlp_in",
    "mlp.shared_expert.down_proj": "mlp_out",
    "mlp.shared_experts.gate_proj": "mlp_in", "mlp.shared_experts.up_proj": "mlp_in",
    "mlp.shared_experts.down_proj": "mlp_out",
})
# HF CLIP / SigLIP style encoders; OPT's out_proj (fc1/fc2 sit directly in the layer there); Phi-2's dense
_rule("clip", "layers", {
    "self_attn.out_proj": "attn_out", "mlp.fc1": "mlp_in", "mlp.fc2": "mlp_out",
})
_rule("opt", "layers", {"fc1": "mlp_in", "fc2": "mlp_out"})
_rule("phi", "layers", {"self_attn.dense": "attn_out"})
# GPT-NeoX / Pythia
_rule("neox", "layers", {
    "attention.query_key_value": "attn_in", "attention.dense": "attn_out",
    "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_out",
})
# GPT-2 (Conv1D: weights stored [d_in, d_out])
_rule("gpt2", "h", {
    "attn.c_attn": "attn_in", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out",
}, conv1d=True)
# Falcon
_rule("falcon", "h", {
    "self_attention.query_key_value": "attn_in", "self_attention.dense": "attn_out",
    "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_out",
})
# T5 / mT5 / Flan-T5: encoder and decoder stacks (``encoder.block``, ``decoder.block``); the decoder's
# cross-attention (EncDecAttention) is attention like the self-attention
_rule("t5", "block", {
    "layer.#.SelfAttention.q": "attn_in", "layer.#.SelfAttention.k": "attn_in", "layer.#.SelfAttention.v": "attn_in",
    "layer.#.SelfAttention.o": "attn_out",
    "layer.#.EncDecAttention.q": "attn_in", "layer.#.EncDecAttention.k": "attn_in",
    "layer.#.EncDecAttention.v": "attn_in", "layer.#.EncDecAttention.o": "attn_out",
    "layer.#.DenseReluDense.wi": "mlp_in", "layer.#.DenseReluDense.wi_0": "mlp_in",
    "layer.#.DenseReluDense.wi_1": "mlp_in", "layer.#.DenseReluDense.wo": "mlp_out",
})
# BERT / RoBERTa / HF ViT ("attention.attention.*")
_rule("bert", "layer", {
    "attention.self.query": "attn_in", "attention.self.key": "attn_in", "attention.self.value": "attn_in",
    "attention.attention.query": "attn_in", "attention.attention.key": "attn_in",
    "attention.attention.value": "attn_in",
    "attention.output.dense": "attn_out", "intermediate.dense": "mlp_in", "output.dense": "mlp_out",
})
# open_clip (fused in_proj_weight)
_rule("open_clip", "resblocks", {"attn.in_proj": "attn_in"}, suffix=r"_weight")
_rule("open_clip", "resblocks", {"attn.out_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"})

# Fused 3-D expert tensors ``[E, ., .]`` (GPT-OSS, Llama 4): each slice ``[e]`` is one module. GPT-OSS and
# Llama 4 store them ``[E, d_in, d_out]``; transformers' in-memory MoE layout is ``[E, d_out, d_in]``.
_FUSED = re.compile(r"^(?P<stack>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<name>(?:mlp|feed_forward)\.experts\."
                    r"(?P<proj>gate_up_proj|down_proj))$")

# 2-D keys inside a block that are "other" on purpose (not listed as unknown): MoE routers, T5's relative
# position table
_KNOWN_OTHER = re.compile(r"(?:\.(?:block_sparse_moe|mlp)\.(?:gate|router)|\.shared_expert_gate"
                          r"|\.relative_attention_bias)\.weight$")

# MoE expert FFNs join the dense FFN's λ groups: an expert's w1/w3 (gate/up) is an FFN input projection and its
# w2 (down) an FFN output projection, so it gets ``mlp_in`` / ``mlp_out``. λ is relative (each module's Ĝ is
# normalised to mean eigenvalue 1), so one λ per group is meaningful across experts of different sizes, and the
# params format (``lam_<b>_<group>`` over the four groups) and the search space stay as they are.
moe_groups = {"w1": "mlp_in", "w3": "mlp_in", "w2": "mlp_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
              "gate_up_proj": "mlp_in", "down_proj": "mlp_out"}


def _expert_of(name: str) -> int | None:
    m = re.search(r"experts\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def classify(key: str, shape: tuple[int, ...] | None = None) -> ModuleRef | None:
    """The module a key belongs to, or None for "other". Only 2-D tensors are solvable here; fused 3-D expert
    tensors are split into modules by :func:`fused_experts`."""
    if shape is not None and len(shape) != 2:
        return None
    for family, pat, names, conv1d in _RULES:
        m = pat.match(key)
        if m:
            name = m.group("name")
            group = names[_NUM.sub("#", name)]
            return ModuleRef(key, m.group("stack"), int(m.group("layer")), group, family, conv1d, _expert_of(name))
    return None


def fused_experts(key: str, shape: tuple[int, ...], hidden: int | None = None) -> list[ModuleRef]:
    """One module per expert of a fused 3-D expert tensor (``mlp.experts.gate_up_proj`` / ``down_proj``), or [].

    Orientation: ``[E, d_in, d_out]`` (GPT-OSS, Llama 4 checkpoints) unless ``hidden`` (the model's hidden size)
    shows ``[E, d_out, d_in]``: gate_up's d_in and down's d_out are the hidden size.
    """
    m = _FUSED.match(key)
    if not m or len(shape) != 3:
        return []
    proj = m.group("proj")
    hid_if_in_first, hid_if_out_first = (shape[1], shape[2]) if proj == "gate_up_proj" else (shape[2], shape[1])
    conv1d = not (hidden is not None and hid_if_out_first == hidden and hid_if_in_first != hidden)
    group = moe_groups[proj]
    stack, layer = m.group("stack"), int(m.group("layer"))
    return [ModuleRef(f"{key}[{e}]", stack, layer, group, "moe_fused", conv1d, e, key) for e in range(shape[0])]


def read_module(ref: ModuleRef, get) -> torch.Tensor:
    """A module's weight in checkpoint orientation: ``get(key)``, or slice ``expert`` of its fused tensor."""
    w = get(ref.source)
    return w[ref.expert] if ref.tensor is not None else w


def assemble_fused(refs: list[ModuleRef], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fused 3-D tensor from its experts' weights (``weights[ref.key]`` in checkpoint orientation)."""
    refs = sorted(refs, key=lambda r: r.expert)
    if [r.expert for r in refs] != list(range(len(refs))) or len({r.tensor for r in refs}) != 1:
        raise InputError(f"{refs[0].tensor if refs else '?'}: fused expert slices are incomplete")
    return torch.stack([weights[r.key] for r in refs])


_BLOCKISH = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")


@dataclass
class Block:
    index: int  # position in the global block order
    stack: str
    layer: int
    modules: list[ModuleRef] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.stack}.{self.layer}"

    @property
    def shard(self) -> str:
        return f"block-{self.index:03d}"


@dataclass
class Plan:
    """The module map of one checkpoint."""

    blocks: list[Block]
    others: list[str]  # keys merged by the anchor's rule
    unknown: list[str]  # "other" keys that look like they sit inside a block but matched no rule (listed by plan)
    stack_layers: dict[str, int]  # stack -> number of layers
    excluded: list[str] = field(default_factory=list)  # ``--exclude``: neither solved nor merged, the base's value

    @property
    def modules(self) -> list[ModuleRef]:
        return [m for b in self.blocks for m in b.modules]

    def module(self, key: str) -> ModuleRef:
        for b in self.blocks:
            for m in b.modules:
                if m.key == key:
                    return m
        raise KeyError(key)

    def block_group(self, block: Block, num_groups: int) -> int:
        """Depth-relative block-group index of a block (0..num_groups-1)."""
        return block_group(block.layer, self.stack_layers[block.stack], num_groups)

    def check_block_groups(self, num_groups: int, what: str) -> None:
        """Refuse more block-groups than layers: a group would get no layer (``what`` names the option or file)."""
        most = max(self.stack_layers.values(), default=0)
        if num_groups > most:
            per = ", ".join(f"{s} {n}" for s, n in self.stack_layers.items())
            raise InputError(f"{what}: {num_groups} block-groups but the model has {most} layers per stack ({per}); "
                             f"a block-group would get no layer: use at most {most}")

    def to_json(self) -> dict:
        return {
            "blocks": [{"shard": b.shard, "stack": b.stack, "layer": b.layer,
                        "modules": [_module_json(m) for m in b.modules]}
                       for b in self.blocks],
            "others": self.others,
            "unknown": self.unknown,
            "stack_layers": self.stack_layers,
            **({"excluded": self.excluded} if self.excluded else {}),
        }


def _module_json(m: ModuleRef) -> dict:
    d: dict = {"key": m.key, "group": m.group, "conv1d": m.conv1d}
    if m.expert is not None:
        d["expert"] = m.expert
    if m.tensor is not None:
        d["tensor"] = m.tensor
    return d


def exclude_pattern(patterns: Sequence[str] | None) -> re.Pattern | None:
    """``--exclude REGEX`` (repeatable) as one pattern, searched in each key (None: nothing excluded)."""
    pats = [str(p) for p in patterns or ()]
    for p in pats:
        if not p:
            raise InputError("--exclude '': give a regular expression that matches the keys to leave out")
        try:
            re.compile(p)
        except re.error as exc:
            raise InputError(f"--exclude {p!r}: not a regular expression ({exc})") from None
    return re.compile("|".join(f"(?:{p})" for p in pats)) if pats else None


def is_excluded(key: str, exclude: re.Pattern | None) -> bool:
    return exclude is not None and exclude.search(key) is not None


def key_preview(keys: Sequence[str], n: int = 8) -> str:
    """The first ``n`` keys, comma-separated, with `` ...`` when there are more (for one-line notes)."""
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def build_plan(shapes: Iterable[tuple[str, tuple[int, ...]]], *, source: str = "model", fused: bool = False,
               hidden: int | None = None, exclude: Sequence[str] | None = None) -> Plan:
    """The module map of a checkpoint from its ``(key, shape)`` pairs.

    ``exclude``: regular expressions (``--exclude``); a key any of them matches (``re.search``) is neither solved
    nor merged: the output keeps the base's tensor (:attr:`Plan.excluded`), and the experts' tensors of that name
    are not read. Each pattern must match at least one key.

    ``fused``: split fused 3-D expert tensors into one module per expert (:func:`fused_experts`; ``hidden`` is
    the config's hidden size, for their orientation). Such modules have ``tensor`` set: read them with
    :func:`read_module` and write the tensor back with :func:`assemble_fused`. Off, those tensors are "other".
    """
    blocks: dict[tuple[str, int], Block] = {}
    others: list[str] = []
    unknown: list[str] = []
    excluded: list[str] = []
    pattern = exclude_pattern(exclude)
    for key, shape in shapes:
        if is_excluded(key, pattern):
            excluded.append(key)
            continue
        refs = fused_experts(key, tuple(shape), hidden) if fused else []
        ref = classify(key, shape)
        if ref is not None:
            refs = [ref]
        if not refs:
            others.append(key)
            if ((len(shape) == 2 and _BLOCKISH.search(key) and key.endswith("weight")
                    and not _KNOWN_OTHER.search(key)) or (not fused and fused_experts(key, tuple(shape), hidden))):
                unknown.append(key)  # fused 3-D experts too, while they are not split: not solved, said so
            continue
        blk = blocks.setdefault((refs[0].stack, refs[0].layer), Block(0, refs[0].stack, refs[0].layer))
        blk.modules.extend(refs)
    for p in exclude or ():
        if not any(re.search(p, k) for k in excluded):
            raise InputError(f"--exclude {p!r} matches no tensor of {source}")
    if not blocks:
        if excluded:
            raise InputError(f"--exclude {' '.join(exclude or ())}: leaves no solvable module of {source} to merge")
        raise InputError(
            f"{source}: no solvable module found (no key matches the Llama/Mistral/Qwen2/Gemma/Phi-3, GPT-2, BERT, "
            "CLIP/ViT or open_clip block layouts); bmm cannot merge this architecture yet"
        )
    ordered = sorted(blocks.values(), key=lambda b: (b.stack, b.layer))
    stack_layers: dict[str, int] = {}
    for i, b in enumerate(ordered):
        b.index = i
        b.modules.sort(key=lambda m: (GROUPS.index(m.group), m.key))
        stack_layers[b.stack] = max(stack_layers.get(b.stack, 0), b.layer + 1)
    return Plan(ordered, others, unknown, stack_layers, excluded)

"""Architecture map: which checkpoint keys BMM solves, their transformer block and their group.

A key is *solvable* when it is a 2-D linear weight inside a transformer block; its group is one of
``attn_in`` (q/k/v, fused qkv), ``attn_out``, ``mlp_in`` (gate/up, fused gate_up, fc1) or ``mlp_out``.
Everything else is "other" and is merged by the anchor's rule. Keys the map does not recognise are listed by
``bmm plan`` (never dropped silently).

Blocks are identified by their *stack* (the key prefix before the layer number, e.g. ``model.layers`` or
``vision_model.encoder.layers``) and their layer number, so two-tower models (CLIP) keep their towers apart.
Block-groups are depth-relative: layer ``l`` of a stack with ``L`` layers belongs to group ``l * B // L``, so a
CLIP's text and vision layers at the same relative depth share a group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from .errors import InputError
from .params import GROUPS, block_group


@dataclass(frozen=True)
class ModuleRef:
    key: str
    stack: str  # key prefix up to the layer number, e.g. "model.layers"
    layer: int
    group: str  # one of GROUPS
    family: str  # which rule matched (llama, gpt2, bert, clip, open_clip)
    conv1d: bool = False  # stored d_in x d_out (GPT-2 Conv1D): transpose on read and on write

    @property
    def block_id(self) -> str:
        return f"{self.stack}.{self.layer}"


# (family, regex, group by captured name, conv1d). The regex captures (stack, layer, name).
_L = r"(?P<stack>(?:.*\.)?{stack})\.(?P<layer>\d+)\.(?P<name>{names})"
_RULES: list[tuple[str, re.Pattern, dict[str, str], bool]] = []


def _rule(family: str, stack: str, names: dict[str, str], suffix: str = r"\.weight", conv1d: bool = False) -> None:
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pat = re.compile("^" + _L.format(stack=stack, names=alt) + suffix + "$")
    _RULES.append((family, pat, names, conv1d))


# Llama, Mistral, Qwen2, Gemma, Phi-3 (fused qkv_proj / gate_up_proj)
_rule("llama", "layers", {
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.qkv_proj": "attn_in", "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.gate_up_proj": "mlp_in", "mlp.down_proj": "mlp_out",
})
# HF CLIP / SigLIP style encoders
_rule("clip", "layers", {
    "self_attn.out_proj": "attn_out", "mlp.fc1": "mlp_in", "mlp.fc2": "mlp_out",
})
# GPT-2 (Conv1D: weights stored [d_in, d_out])
_rule("gpt2", "h", {
    "attn.c_attn": "attn_in", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out",
}, conv1d=True)
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


def classify(key: str, shape: tuple[int, ...] | None = None) -> ModuleRef | None:
    """The module a key belongs to, or None for "other". Only 2-D tensors are solvable."""
    if shape is not None and len(shape) != 2:
        return None
    for family, pat, names, conv1d in _RULES:
        m = pat.match(key)
        if m:
            return ModuleRef(key, m.group("stack"), int(m.group("layer")), names[m.group("name")], family, conv1d)
    return None


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
                        "modules": [{"key": m.key, "group": m.group, "conv1d": m.conv1d} for m in b.modules]}
                       for b in self.blocks],
            "others": self.others,
            "unknown": self.unknown,
            "stack_layers": self.stack_layers,
        }


def build_plan(shapes: Iterable[tuple[str, tuple[int, ...]]], *, source: str = "model") -> Plan:
    blocks: dict[tuple[str, int], Block] = {}
    others: list[str] = []
    unknown: list[str] = []
    for key, shape in shapes:
        ref = classify(key, shape)
        if ref is None:
            others.append(key)
            if len(shape) == 2 and _BLOCKISH.search(key) and key.endswith("weight"):
                unknown.append(key)
            continue
        blk = blocks.setdefault((ref.stack, ref.layer), Block(0, ref.stack, ref.layer))
        blk.modules.append(ref)
    if not blocks:
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
    return Plan(ordered, others, unknown, stack_layers)

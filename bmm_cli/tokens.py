"""Vocabularies and chat templates of the merge: experts that added tokens, and which tokenizer and template to write.

Vocabularies (``--tokenizer base|union|EXPERT``). Fine-tunes often append tokens after the base vocabulary (chat
markers, tool tags): their embedding (and untied lm_head) then has more rows than the base. bmm reads each
tokenizer's ``tokenizer.json`` (model vocab + ``added_tokens``) and requires every expert to keep the base's
tokens at the base's ids (an appended vocabulary); the rows of those *shared* ids are merged by the task-vector
math like any tensor. What happens to the other rows depends on the choice:

* ``base``: the output has the base's tokenizer and row count; the experts' added tokens are dropped (listed).
* ``union``: the base's tokens, then every added token in expert order (one id per string, new ids after the
  base's tokens). The row of an added token is the mean of the rows of the experts that added that string (at
  whatever id each gave it), or the one expert's row. This is what a user expects: a token only its expert
  trained keeps that expert's embedding; a token several experts trained gets their average, as the shared rows
  get a merge of theirs.
* ``EXPERT`` (1-based number or path of an expert): that expert's tokenizer and row count; its added tokens get
  the same mean over every expert that added the string.

Refused, naming the token: an expert whose tokenizer gives a base id another string (not an appended
vocabulary), one string added with different ``special`` flags by two experts, and a tokenizer with more tokens
than its model has rows. Rows past the tokenizer's length (padding) come from the base in ``base`` and ``union``
(zeros where the base has none) and from the chosen expert with ``EXPERT``.

Chat templates (``--chat-template auto|base|EXPERT|FILE``): ``auto`` takes the experts' template when every expert
that has one has the same one, else the base's, and says which; ``tokenizer_config.json``'s ``chat_template`` and
``chat_template.jinja`` are both read; the output gets ``chat_template.jinja``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import atomic
from .errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class Vocab:
    """A tokenizer's id -> string map (model vocab and added tokens) and its added tokens' flags."""

    path: Path
    tokens: dict[int, str]
    added: dict[str, dict] = field(default_factory=dict)  # content -> added_tokens entry

    @property
    def size(self) -> int:
        return max(self.tokens, default=-1) + 1

    def ids(self) -> dict[str, int]:
        return {s: i for i, s in self.tokens.items()}


def read_vocab(model_dir: str | Path) -> Vocab | None:
    """The vocabulary in ``model_dir/tokenizer.json``; None when there is none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tj = json.loads(path.read_text())
        model = tj.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            tokens = {int(i): s for s, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
            tokens = {i: (p[0] if isinstance(p, list) else p) for i, p in enumerate(vocab)}
        else:
            tokens = {}
        added = {}
        for a in tj.get("added_tokens") or []:
            tokens[int(a["id"])] = a["content"]
            added[a["content"]] = a
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a tokenizers JSON file bmm can read ({exc.__class__.__name__})") from None
    return Vocab(path, tokens, added)


@dataclass
class TokenPlan:
    """The output vocabulary and where each output row of a vocabulary-sized tensor comes from."""

    mode: str  # base | union | expert:N
    shared: int  # rows 0..shared-1 are the base's tokens: merged by the task-vector math
    rows: int  # output rows (config.vocab_size)
    added: dict[int, list[tuple[int, int]]]  # output id -> [(expert index, expert row)] to average
    pad_from: tuple[str, int | None]  # rows past the tokens: ("base", None) or ("expert", index)
    tokenizer_from: tuple[str, int | None]  # ("base", None) | ("expert", i) | ("union", None)
    new_tokens: list[dict]  # union: added_tokens entries (with output ids) to append to the base's tokenizer
    dropped: list[str]  # base mode: the experts' added tokens left out

    def to_json(self) -> dict:
        return {"mode": self.mode, "shared_rows": self.shared, "rows": self.rows, "added_tokens": len(self.added),
                "dropped_tokens": self.dropped}


def _expert_additions(base: Vocab, ex: Vocab, i: int, rows: int) -> dict[int, str]:
    """Expert ``i``'s tokens past the base vocabulary (id -> string), after checking it is an appended one."""
    name = f"expert {i + 1} ({ex.path.parent})"
    for tid, s in base.tokens.items():
        got = ex.tokens.get(tid)
        if got != s:
            raise InputError(f"{name}: token id {tid} is {got!r} but the base's is {s!r}: not the base vocabulary "
                             "with tokens appended, so its embedding rows cannot be merged row by row")
    if ex.size > rows:
        raise InputError(f"{name}: its tokenizer has {ex.size} tokens but its embedding has {rows} rows; token "
                         f"{ex.tokens.get(ex.size - 1)!r} has no row")
    return {tid: s for tid, s in ex.tokens.items() if tid >= base.size}


def plan_tokens(base: Vocab, base_rows: int, experts: Sequence[Vocab], expert_rows: Sequence[int],
                mode: str = "base") -> TokenPlan:
    """Decide the output vocabulary (``mode``: base, union, or a 1-based expert number)."""
    if base.size > base_rows:
        raise InputError(f"{base.path}: the base tokenizer has {base.size} tokens but its embedding has {base_rows} "
                         "rows")
    adds = [_expert_additions(base, ex, i, r) for i, (ex, r) in enumerate(zip(experts, expert_rows))]
    by_string: dict[str, list[tuple[int, int]]] = {}
    flags: dict[str, tuple[int, bool]] = {}
    for i, add in enumerate(adds):
        for tid, s in sorted(add.items()):
            special = bool(experts[i].added.get(s, {}).get("special", False))
            if s in flags and flags[s][1] != special:
                raise InputError(f"token {s!r}: expert {flags[s][0] + 1} adds it as "
                                 f"{'special' if flags[s][1] else 'normal'} and expert {i + 1} as "
                                 f"{'special' if special else 'normal'}; the merged tokenizer can hold only one: "
                                 "pick one expert's tokenizer with --tokenizer N")
            flags.setdefault(s, (i, special))
            by_string.setdefault(s, []).append((i, tid))
    if mode == "base":
        dropped = sorted(by_string)
        return TokenPlan("base", base.size, base_rows, {}, ("base", None), ("base", None), [], dropped)
    if mode == "union":
        added, new_tokens = {}, []
        for k, (s, srcs) in enumerate(by_string.items()):
            oid = base.size + k
            added[oid] = srcs
            i = srcs[0][0]
            entry = dict(experts[i].added.get(s) or {"content": s, "special": False, "normalized": True,
                                                     "single_word": False, "lstrip": False, "rstrip": False})
            entry["id"] = oid
            new_tokens.append(entry)
        rows = max(base_rows, base.size + len(by_string))
        return TokenPlan("union", base.size, rows, added, ("base", None), ("union", None), new_tokens, [])
    try:
        k = int(mode) - 1
        if not 0 <= k < len(experts):
            raise ValueError
    except ValueError:
        raise InputError(f"--tokenizer {mode!r}: use base, union or an expert number 1..{len(experts)}") from None
    added = {tid: by_string[s] for tid, s in adds[k].items()}
    return TokenPlan(f"expert:{k + 1}", base.size, expert_rows[k], added, ("expert", k), ("expert", k), [], [])


def vocab_axis(key: str, base_shape: tuple[int, ...], expert_shape: tuple[int, ...]) -> int | None:
    """The axis along which an expert's tensor has a different number of token rows (None: same shape)."""
    if tuple(base_shape) == tuple(expert_shape):
        return None
    diff = [a for a, (b, e) in enumerate(zip(base_shape, expert_shape)) if b != e]
    if len(base_shape) != len(expert_shape) or len(diff) != 1:
        raise InputError(f"{key}: shape {tuple(expert_shape)} differs from the base's {tuple(base_shape)} in more "
                         "than the vocabulary axis")
    return diff[0]


def assemble_rows(plan: TokenPlan, key: str, merged_shared: torch.Tensor, base: torch.Tensor,
                  experts: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
    """The output tensor of a vocabulary-sized tensor (embedding, lm_head, its bias, T5's final_logits_bias).

    ``merged_shared``: the merge of the first ``plan.shared`` rows (the task-vector math on every tensor cut to
    the shared rows); ``base`` and ``experts``: the full tensors (rows along ``axis``)."""
    mv = merged_shared.movedim(axis, 0)
    if mv.shape[0] != plan.shared:
        raise InputError(f"{key}: merged shared rows {mv.shape[0]} != {plan.shared}")
    ex = [e.movedim(axis, 0) for e in experts]
    b = base.movedim(axis, 0)
    out = torch.zeros((plan.rows,) + tuple(mv.shape[1:]), dtype=mv.dtype)
    if plan.pad_from[0] == "base":
        n = min(b.shape[0], plan.rows)
        out[:n] = b[:n].to(mv.dtype)
    else:
        src = ex[plan.pad_from[1]]
        n = min(src.shape[0], plan.rows)
        out[:n] = src[:n].to(mv.dtype)
    out[: plan.shared] = mv
    for oid, srcs in plan.added.items():
        out[oid] = torch.stack([ex[i][r].to(torch.float32) for i, r in srcs]).mean(0).to(mv.dtype)
    return out.movedim(0, axis).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------------------


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic.write_bytes(out / name, (src / name).read_bytes())


def write_tokenizer(plan: TokenPlan, base_dir: str | Path, expert_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the output's tokenizer files into ``out`` (an existing directory) for ``plan``; returns the source."""
    out = Path(out)
    kind, idx = plan.tokenizer_from
    src = Path(expert_dirs[idx]) if kind == "expert" else Path(base_dir)
    _copy_tokenizer(src, out)
    if kind == "union" and plan.new_tokens:
        tj = json.loads((src / "tokenizer.json").read_text())
        tj["added_tokens"] = list(tj.get("added_tokens") or []) + plan.new_tokens
        atomic.write_text(out / "tokenizer.json", json.dumps(tj, ensure_ascii=False, indent=2) + "\n")
        cfg_path = out / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            dec = cfg.get("added_tokens_decoder")
            if isinstance(dec, dict):
                for t in plan.new_tokens:
                    dec[str(t["id"])] = {k: v for k, v in t.items() if k != "id"}
                atomic.write_text(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    return src


def config_vocab(config: dict, plan: TokenPlan) -> dict:
    """``config.json`` with ``vocab_size`` set to the output's rows (text_config's too, for multimodal configs)."""
    cfg = dict(config)
    if "vocab_size" in cfg or "text_config" not in cfg:
        cfg["vocab_size"] = plan.rows
    if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        cfg["text_config"] = {**cfg["text_config"], "vocab_size": plan.rows}
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------


def read_chat_template(model_dir: str | Path) -> str | None:
    """The chat template of a model directory (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``, else ``chat_template.json``); a list of named templates is kept as JSON text."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        p = d / name
        if p.is_file():
            try:
                t = json.loads(p.read_text()).get("chat_template")
            except (ValueError, AttributeError):
                raise InputError(f"{p}: not a JSON object") from None
            if t:
                return t if isinstance(t, str) else json.dumps(t, sort_keys=True)
    return None


def choose_chat_template(choice: str, base_dir: str | Path,
                         expert_dirs: Sequence[str | Path]) -> tuple[str | None, str]:
    """(template or None, a sentence saying where it came from). ``choice``: auto, base, an expert number 1..T,
    or a template file."""
    if choice == "base":
        t = read_chat_template(base_dir)
        return t, f"chat template: the base's ({base_dir})" if t else "chat template: none (the base has none)"
    if choice == "auto":
        temps = [read_chat_template(e) for e in expert_dirs]
        distinct = {t for t in temps if t is not None}
        if len(distinct) == 1:
            who = [str(i + 1) for i, t in enumerate(temps) if t is not None]
            return distinct.pop(), f"chat template: the experts' (experts {', '.join(who)} agree)"
        t = read_chat_template(base_dir)
        why = "the experts' templates differ" if distinct else "no expert has one"
        return t, f"chat template: the base's ({why})" if t else f"chat template: none ({why}, the base has none)"
    if choice.isdigit():
        k = int(choice) - 1
        if not 0 <= k < len(expert_dirs):
            raise InputError(f"--chat-template {choice}: use auto, base, an expert number 1..{len(expert_dirs)} "
                             "or a template file")
        t = read_chat_template(expert_dirs[k])
        if t is None:
            raise InputError(f"--chat-template {choice}: expert {choice} ({expert_dirs[k]}) has no chat template")
        return t, f"chat template: expert {choice}'s ({expert_dirs[k]})"
    p = Path(choice)
    if not p.is_file():
        raise InputError(f"--chat-template {choice}: not auto, base, an expert number or an existing template file")
    return p.read_text(), f"chat template: from {p}"


def write_chat_template(out: str | Path, template: str | None) -> None:
    """Give ``out`` exactly ``template``: ``chat_template.jinja``, no competing copy in ``tokenizer_config.json``
    or ``chat_template.json`` (None: no template at all)."""
    out = Path(out)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "chat_template" in cfg:
            del cfg["chat_template"]
            atomic.write_text(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    (out / "chat_template.json").unlink(missing_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if template is None:
        return
    try:
        named = json.loads(template) if template.lstrip().startswith("[") else None
    except ValueError:
        named = None
    if isinstance(named, list):  # several named templates: only tokenizer_config.json holds those
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["chat_template"] = named
        atomic.write_text(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    else:
        atomic.write_text(out / "chat_template.jinja", template)




def plan_for_models(base_dir: str | Path, base_rows: int, expert_dirs: Sequence[str | Path],
                    expert_rows: Sequence[int], mode: str = "base") -> TokenPlan | None:
    """The token plan of a merge, or None when nothing needs one (every expert has the base's rows and ``mode``
    is base). ``*_rows``: the embedding rows of each model. Refuses resized experts without a tokenizer.json (an
    expert with the base's rows and no tokenizer.json counts as having the base's tokens)."""
    if mode == "base" and all(r == base_rows for r in expert_rows):
        return None
    base = read_vocab(base_dir)
    if base is None:
        raise InputError(f"{base_dir}: no tokenizer.json, so the experts' extra embedding rows cannot be matched "
                         "to tokens (save the base's fast tokenizer next to it)")
    vocabs = []
    for i, d in enumerate(expert_dirs):
        v = read_vocab(d)
        if v is None and expert_rows[i] == base_rows:  # the base's rows: the base's tokens, nothing added
            v = Vocab(Path(d) / "tokenizer.json", dict(base.tokens), {})
        if v is None:
            raise InputError(f"expert {i + 1} ({d}): no tokenizer.json, but its embedding has {expert_rows[i]} rows "
                             f"and the base's {base_rows}; save the expert's fast tokenizer next to it")
        vocabs.append(v)
    return plan_tokens(base, base_rows, vocabs, expert_rows, mode)


def shared_rows(plan: TokenPlan, t: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """The shared-token rows of a vocabulary tensor (what the task-vector math merges)."""
    return t.narrow(axis, 0, plan.shared)


# ---------------------------------------------------------------------------------------------------------
# The pipeline's view: which tensors are vocabulary-sized, and the rows the task-vector math merges
# ---------------------------------------------------------------------------------------------------------

EMBED_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "shared", "output.weight", "final_logits_bias")


@dataclass
class VocabLayout:
    """The vocabulary-sized tensors of a merge (key -> token axis) and each model's number of token rows."""

    keys: dict[str, int]
    base_rows: int
    expert_rows: list[int]

    @property
    def resized(self) -> bool:
        return any(r != self.base_rows for r in self.expert_rows)


def _rows_only(key: str, b: tuple[int, ...], e: tuple[int, ...]) -> int | None:
    """The token axis when ``e`` differs from ``b`` along exactly one axis of a tensor named like a vocabulary
    tensor (embedding, lm_head, their biases), else None."""
    if len(b) != len(e) or not any(h in key for h in EMBED_HINTS):
        return None
    diff = [a for a, (x, y) in enumerate(zip(b, e)) if x != y]
    return diff[0] if len(diff) == 1 else None


def vocab_layout(base_meta, expert_metas, others: Sequence[str], vocab_size: int | None) -> VocabLayout | None:
    """The vocabulary tensors among ``others`` (keys -> TensorMeta maps of base and experts): the tensors whose
    rows differ between base and an expert, or, when no expert was resized, the embedding-named tensors with
    ``vocab_size`` rows (an expert may have put its added tokens in the base's padding rows). None: none."""
    keys: dict[str, int] = {}
    rows: list[dict[int, int]] = [{} for _ in expert_metas]
    for key in others:
        b = tuple(base_meta[key].shape)
        for i, em in enumerate(expert_metas):
            e = tuple(em[key].shape) if key in em else b
            if e == b:
                continue
            axis = _rows_only(key, b, e)
            if axis is None:
                return None  # not a vocabulary difference: the shape check names it
            if keys.setdefault(key, axis) != axis:
                raise InputError(f"{key}: the experts resize it along different axes")
            rows[i][e[axis]] = 1
    if not keys:
        if not vocab_size:
            return None
        for key in others:
            b = tuple(base_meta[key].shape)
            if any(h in key for h in EMBED_HINTS) and vocab_size in b and len(b) <= 2:
                keys[key] = b.index(vocab_size)
        return VocabLayout(keys, int(vocab_size), [int(vocab_size)] * len(expert_metas)) if keys else None
    first = next(iter(keys))
    base_rows = int(base_meta[first].shape[keys[first]])
    expert_rows = []
    for i, em in enumerate(expert_metas):
        got = {int(em[k].shape[a]) if k in em else base_rows for k, a in keys.items()}
        if len(got) != 1:
            raise InputError(f"expert {i + 1}: its vocabulary tensors ({', '.join(keys)}) have different numbers of "
                             f"token rows ({sorted(got)})")
        expert_rows.append(got.pop())
    return VocabLayout(keys, base_rows, expert_rows)


def expert_choice(choice: str, expert_specs: Sequence[str], expert_dirs: Sequence[str | Path], flag: str) -> str:
    """``--tokenizer`` / ``--chat-template`` value naming an expert by path -> its 1-based number; else as given."""
    if choice.isdigit():
        return choice
    for i, (spec, d) in enumerate(zip(expert_specs, expert_dirs)):
        if choice == str(spec) or (Path(choice).exists() and Path(choice).resolve() == Path(d).resolve()):
            return str(i + 1)
    return choice


def merge_plan(base_dir: str | Path, layout: VocabLayout | None, expert_dirs: Sequence[str | Path],
               mode: str = "base") -> TokenPlan | None:
    """The token plan of a merge (None: the base's vocabulary, nothing to assemble)."""
    if layout is None:
        if mode != "base":
            raise InputError(f"--tokenizer {mode}: no embedding tensor of the vocabulary found to resize")
        return None
    return plan_for_models(base_dir, layout.base_rows, expert_dirs, layout.expert_rows, mode)


def cut_rows(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """The first ``n`` token rows of a vocabulary tensor."""
    return t.narrow(axis, 0, n) if t.shape[axis] > n else t


def base_rows(merged_shared: torch.Tensor, base: torch.Tensor, axis: int) -> torch.Tensor:
    """A vocabulary tensor in the base's shape: its first rows merged, the rest (padding rows) the base's."""
    if merged_shared.shape[axis] == base.shape[axis]:
        return merged_shared
    out = base.to(merged_shared.dtype).clone()
    out.narrow(axis, 0, merged_shared.shape[axis]).copy_(merged_shared)
    return out


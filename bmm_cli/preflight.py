"""Checks on all inputs before any heavy work; each failure is one line naming the file and tensor."""

from __future__ import annotations

import re
from typing import Collection

from .errors import InputError
from .progress import info
from .store import Checkpoint

_finite_ok: set[tuple[str, int, int, str]] = set()  # (file, size, mtime_ns, key) found finite in this process

_EMBED_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "shared", "output.weight")


def check_experts(base: Checkpoint, experts: list[Checkpoint], *, allow_dtype_mismatch: bool = False,
                  vocab_keys: Collection[str] = (), exclude: re.Pattern | None = None) -> None:
    """Every expert must have the base's keys, shapes and dtypes; ``vocab_keys`` (embedding, lm_head) may have other
    token rows (experts that appended tokens: :mod:`bmm_cli.tokens` checks their vocabularies). Keys ``exclude``
    matches (``--exclude``: the output keeps the base's) are not compared."""
    if not experts:
        raise InputError("no experts given: pass --experts E1 E2 ...")
    seen: dict[str, int] = {}
    for i, e in enumerate(experts):
        if str(e.root) == str(base.root):
            raise InputError(f"expert {e.root} is the base model itself; its task vector would be zero")
        if str(e.root) in seen:
            raise InputError(f"expert {e.root} is given twice (positions {seen[str(e.root)] + 1} and {i + 1})")
        seen[str(e.root)] = i
    if len(experts) == 1:
        info("bmm: warning: only one expert; the merge reduces to a regularized copy of it")
    base_cfg = base.config()
    base_vocab = base_cfg.get("vocab_size")
    for e in experts:
        check_configs(base, base_cfg, e)
        bkeys, ekeys = set(base.meta), set(e.meta)
        kept = (lambda k: True) if exclude is None else (lambda k: exclude.search(k) is None)
        missing = [k for k in base.meta if k not in ekeys and kept(k)]
        extra = [k for k in e.meta if k not in bkeys and kept(k)]
        only_head = all("lm_head" in k for k in missing + extra)  # else it is not a tie_word_embeddings difference
        for k in missing + extra if only_head else []:
            if "lm_head" in k:
                who, other = (e, base) if k in missing else (base, e)
                raise InputError(
                    f"{who.root}: has no {k!r} but {other.root} has one: one checkpoint ties lm_head to the input "
                    "embeddings and the other does not; save both with the same tie_word_embeddings setting"
                )
        if missing:
            raise InputError(f"{e.root}: tensor {missing[0]!r} of the base is missing ({len(missing)} missing in all); "
                             "is this a fine-tune of the same base model?")
        if extra:
            raise InputError(f"{e.meta[extra[0]].file}: tensor {extra[0]!r} is not in the base ({len(extra)} extra in "
                             "all); is this a fine-tune of the same base model?")
        e_vocab = e.config().get("vocab_size")
        for k, bm in base.meta.items():
            if not kept(k):
                continue
            em = e.meta[k]
            if em.shape != bm.shape and k not in vocab_keys:
                # a vocabulary resize changes the rows of the embeddings / lm_head only (columns: the width)
                rows_only = len(em.shape) == len(bm.shape) == 2 and em.shape[1] == bm.shape[1]
                vocab_differs = bool(base_vocab and e_vocab and base_vocab != e_vocab)
                if rows_only and (any(h in k for h in _EMBED_HINTS) or vocab_differs):
                    raise InputError(
                        f"{em.file}: tensor {k!r} has shape {list(em.shape)} but the base has {list(bm.shape)}: the "
                        f"vocabulary was resized (vocab_size {e_vocab} vs {base_vocab}); merge only checkpoints with "
                        "the base's vocabulary"
                    )
                raise InputError(f"{em.file}: tensor {k!r} has shape {list(em.shape)} but the base has "
                                 f"{list(bm.shape)}; it is not a fine-tune of this base (a per-task head? "
                                 f"--exclude '{_exclude_hint(k)}' keeps the base's)")
            if em.dtype != bm.dtype and not allow_dtype_mismatch:
                raise InputError(
                    f"{em.file}: tensor {k!r} is {em.dtype} but the base stores it as {bm.dtype}; save the expert in "
                    "the base's dtype or pass --allow-dtype-mismatch (math is fp32 either way)"
                )


def _exclude_hint(key: str) -> str:
    """An ``--exclude`` pattern for the module that holds ``key`` (``^classifier\\.`` for ``classifier.bias``)."""
    return "^" + re.escape(key.rsplit(".", 1)[0] + ".") if "." in key else "^" + re.escape(key) + "$"


# what config.json must agree on for an expert to be a fine-tune of the base: (label, the names models use for it)
_ARCH_FIELDS = (
    ("model_type", ("model_type",)),
    ("hidden_size", ("hidden_size", "n_embd", "d_model", "dim")),
    ("num_hidden_layers", ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
    ("vocab_size", ("vocab_size",)),
)


def _arch_value(cfg: dict, names: tuple[str, ...]):
    return next((cfg[n] for n in names if n in cfg), None)


def check_configs(base: Checkpoint, base_cfg: dict, e: Checkpoint) -> None:
    """Compare the configs first (when both have one): another architecture, width or depth is said as such, not
    inferred from the first tensor that differs. A vocabulary-only difference is left to the tensor check, which
    names the embedding tensor."""
    e_cfg = e.config()
    if not base_cfg or not e_cfg:
        return
    diffs = []
    for label, names in _ARCH_FIELDS:
        bv, ev = _arch_value(base_cfg, names), _arch_value(e_cfg, names)
        if bv is not None and ev is not None and bv != ev:
            diffs.append((label, ev, bv))
    if any(label != "vocab_size" for label, _, _ in diffs):
        what = ", ".join(f"{label} {ev} vs {bv}" for label, ev, bv in diffs)
        raise InputError(f"{e.root / 'config.json'} differs from the base's {base.root / 'config.json'} "
                         f"(expert vs base): {what}; it is not a fine-tune of this base")


def check_finite(checkpoints: list[Checkpoint], keys: list[str]) -> None:
    """NaN/Inf in ``keys`` of every checkpoint -> one-line error naming file and tensor (exit 2).

    Used for the "other" tensors (embeddings, norms, biases): no stage reads them before the anchor, which would
    otherwise fail only after taskvec and gram. They are a small part of a model (Llama-3-8B: the two embedding
    matrices, ~13%), so reading them once more is cheap. The solvable tensors (the bulk) are checked as taskvec
    reads them, before anything derived from them is written: a full pre-scan would read every expert twice.
    """
    for c in checkpoints:
        for key in keys:
            m = c.meta[key]
            if not m.is_float:
                continue
            st = m.file.stat()
            ident = (str(m.file), st.st_size, st.st_mtime_ns, key)
            if ident in _finite_ok:
                continue
            t = c.get(key)  # raises BadTensorError naming file and tensor
            del t
            _finite_ok.add(ident)

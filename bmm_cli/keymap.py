"""Experts saved as a task model around the base's backbone.

A classifier fine-tuned from a ``BertModel`` base is usually saved as ``BertForSequenceClassification``: its keys
are the base's under a prefix (``bert.encoder.layer.0...`` for ``encoder.layer.0...``) plus a task head
(``classifier.weight``) that the base does not have, often with a different number of labels per expert. Such an
expert is read through a view whose keys are the base's: the prefix is dropped, and the tensors that are not in the
base (the heads) are left out of the merge, with a note naming them. An expert whose keys already are the base's is
returned as it is.
"""

from __future__ import annotations

import re

from .progress import info
from .store import Checkpoint


def _prefix(expert_keys, base_keys: set[str]) -> str | None:
    """The one ``name.`` prefix under which the expert holds every base key, if any."""
    counts: dict[str, int] = {}
    for k in expert_keys:
        head, dot, rest = k.partition(".")
        if dot and rest in base_keys:
            counts[head + "."] = counts.get(head + ".", 0) + 1
    full = [p for p, n in counts.items() if n == len(base_keys)]
    return full[0] if len(full) == 1 else None


def match_base(expert: Checkpoint, base: Checkpoint, role: str, *, quiet: bool = False,
               exclude: re.Pattern | None = None) -> Checkpoint:
    """``expert`` itself, or a view of it keyed like ``base`` when it is a task model around the base (see above);
    ``quiet``: no note (a stage reopening what taskvec already reported); base keys ``exclude`` matches
    (``--exclude``) need not be in the expert."""
    base_keys = {k for k in base.meta if exclude is None or exclude.search(k) is None}
    if not base_keys or base_keys <= set(expert.meta):
        return expert
    prefix = _prefix(expert.meta, base_keys)
    if prefix is None:
        return expert  # the usual checks name what is missing
    meta = {k[len(prefix):]: m for k, m in expert.meta.items() if k.startswith(prefix) and k[len(prefix):] in base_keys}
    left = [k for k in expert.meta if not (k.startswith(prefix) and k[len(prefix):] in base_keys)]
    view = Checkpoint(expert.root, expert.files, meta, expert.spec)
    if quiet:
        return view
    shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
    info(f"bmm: {role} {expert.root}: the base's tensors under {prefix!r} are merged"
         + (f"; {len(left)} tensors the base does not have are left out ({shown}): task heads are not merged"
            if left else ""))
    return view

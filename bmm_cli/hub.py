"""Hub inputs checked from their headers before anything is downloaded.

A hub id that is not in the local cache is read as ``config.json`` plus its safetensors headers (``HfApi
.get_safetensors_metadata``: a range request per file, kilobytes, not gigabytes). The same checks as for local
inputs (:func:`bmm_cli.preflight.check_experts`: keys, shapes, dtypes, config, vocabulary) and the module plan then
run on those headers, so a mismatching expert is refused in one line before its weights are fetched. Cached hub ids
and local paths are checked the usual way; offline (``HF_HUB_OFFLINE``), the download's own error stands.
"""

from __future__ import annotations

import json
from pathlib import Path

from .arch import build_plan, exclude_pattern
from .budget import check_free, fmt_bytes
from .errors import InputError
from .lora import is_adapter
from .preflight import check_experts
from .progress import info
from .store import HUB_PATTERNS, Checkpoint, TensorMeta, hub_offline, looks_like_hub_id
from .tokens import vocab_axis


class HeaderCheckpoint(Checkpoint):
    """A hub checkpoint known by its config and tensor headers only (no tensor can be read)."""

    def __init__(self, spec: str, meta: dict[str, TensorMeta], config: dict):
        super().__init__(Path(spec), {}, meta, spec)
        self._config = config

    def config(self) -> dict:
        return self._config

    def get(self, key: str):
        raise InputError(f"{self.spec}: only the headers were read; download it to read {key!r}")


def needs_download(spec: str) -> bool:
    """A hub id (not a local path) whose safetensors files are not all in the local cache."""
    if Path(spec).expanduser().exists() or not looks_like_hub_id(spec) or hub_offline():
        return False
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=spec, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:  # not (completely) cached: huggingface_hub raises several classes for it
        return True
    return False


def header_checkpoint(spec: str, *, role: str) -> HeaderCheckpoint | None:
    """``spec``'s config.json and safetensors headers from the hub, nothing else; None for a repo that holds no
    ``model.safetensors[.index.json]`` (a PEFT adapter, say: it is checked once downloaded)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        md = HfApi().get_safetensors_metadata(spec)
        cfg_path = hf_hub_download(spec, "config.json")
    except NotASafetensorsRepoError:
        return None
    except Exception as exc:  # hub errors come in many classes (404, auth, network)
        raise InputError(f"{role} {spec}: cannot read its headers from the hub ({exc.__class__.__name__}); "
                         "check the id, your network and HF_TOKEN") from None
    try:
        config = json.loads(Path(cfg_path).read_text())
    except ValueError:
        raise InputError(f"{role} {spec}: config.json on the hub is not valid JSON") from None
    meta = {}
    for name, fm in sorted(md.files_metadata.items()):
        for key, t in fm.tensors.items():
            meta[key] = TensorMeta(key, t.dtype, tuple(int(d) for d in t.shape), Path(spec) / name)
    return HeaderCheckpoint(spec, meta, config if isinstance(config, dict) else {})


def _token_rows(base: Checkpoint, key: str, shape: tuple[int, ...]) -> bool:
    """Whether an expert's ``key`` differs from the base's only in its token rows (appended tokens: the full
    vocabulary checks of :mod:`bmm_cli.tokens` run once the files are read)."""
    if key not in base.meta or base.meta[key].shape == tuple(shape):
        return False
    try:
        axis = vocab_axis(key, base.meta[key].shape, shape)
    except InputError:
        return False
    vocab = base.config().get("vocab_size")
    return axis is not None and vocab is not None and base.meta[key].shape[axis] == vocab


def preflight_remote(base: str, experts: list[str], *, allow_dtype_mismatch: bool = False,
                     exclude: list[str] | None = None) -> bool:
    """When any input is a hub id still to download: check all inputs against each other from headers (remote) and
    local files, and build the plan (``exclude``: the ``--exclude`` patterns), before anything is fetched. Returns
    whether it checked anything."""
    specs = [str(base), *(str(e) for e in experts)]
    if any("+" in s or is_adapter(s) for s in specs[1:]):  # LoRA experts: checked against the base when read
        return False
    remote = [needs_download(s) for s in specs]
    if not any(remote):
        return False
    roles = ["base"] + [f"expert {i + 1}" for i in range(len(experts))]
    cks = [header_checkpoint(s, role=r) if rem else Checkpoint.open(s, role=r)
           for s, r, rem in zip(specs, roles, remote)]
    if any(c is None for c in cks):  # an adapter repo: its own checks run once it is downloaded
        return False
    b = cks[0]
    resized = {k for e in cks[1:] for k, m in e.meta.items() if _token_rows(b, k, m.shape)}
    check_experts(b, cks[1:], allow_dtype_mismatch=allow_dtype_mismatch, vocab_keys=resized,  # tokens: once read
                  exclude=exclude_pattern(exclude))
    build_plan(((k, m.shape) for k, m in cks[0].meta.items()), source=str(cks[0].root), exclude=exclude)
    names = ", ".join(s for s, rem in zip(specs, remote) if rem)
    need = sum(m.nbytes for c, rem in zip(cks, remote) if rem for m in c.meta.values())
    from huggingface_hub import constants

    check_free(constants.HF_HUB_CACHE, need, what=f"the download of {names}",
               option="HF_HOME (or HF_HUB_CACHE)")
    info(f"bmm: {names}: checked from config.json and the safetensors headers; downloading "
         f"{fmt_bytes(need)}")
    return True

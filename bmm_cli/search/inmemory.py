"""In-memory trials: the base loaded once as a transformers model, each trial's merged weights written into its
parameters in place, the user's Python scorer called on it (``--eval-py MODULE:FUNCTION`` or
``--eval-py path/to/file.py:FUNCTION``, ``FUNCTION(model, tokenizer, trial) -> float | dict``).

The tensors BMM does not solve (embeddings, norms, biases: the anchor's "others") are set once, by the anchor's
rule, when the model is loaded; each trial then overwrites only the solved modules. So the resident model holds
exactly the tensors ``bmm solve`` would write for the same parameters.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bmm_cli.errors import InputError
from bmm_cli.progress import info
from bmm_cli.store import DTYPES


def load_scorer(spec: str) -> Callable:
    """The function named by ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION`` (one clear error otherwise)."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise InputError(f"--eval-py {spec!r}: expected MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise InputError(f"--eval-py {spec!r}: file {path} not found")
        mod_name = "bmm_eval_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)  # imported once per process (the preflight check and the worker)
        if module is None:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mspec)
            try:
                mspec.loader.exec_module(module)
            except Exception as exc:
                raise InputError(f"--eval-py {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise InputError(f"--eval-py {spec!r}: cannot import module {target}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--eval-py {spec!r}: {target} has no function {name}")
    return fn


def normalize_scorer_spec(spec: str) -> str:
    """A file path made absolute (workers on other nodes or in other directories load the same file)."""
    target, sep, name = str(spec).rpartition(":")
    if sep and (target.endswith(".py") or "/" in target or os.sep in target):
        return f"{Path(target).expanduser().resolve()}:{name}"
    return str(spec)


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


class ResidentModel:
    """The base as a transformers model on ``device``, with the anchor's other tensors set, updated per trial.

    ``merger``: a :class:`bmm_cli.factor_cache.Merger` (its ``iter_weights`` yields every solved module's merged
    weight in the checkpoint's orientation). ``to_params``: the search's flat parameters -> ``params.Params``.
    """

    def __init__(self, merger, to_params: Callable[[dict], Any], *, device: torch.device, dtype: torch.dtype | None):
        import transformers

        self.merger, self.to_params, self.device = merger, to_params, torch.device(device)
        base = merger.src.proj.base
        meta = base.meta
        float_dts = [DTYPES[m.dtype] for m in meta.values() if DTYPES[m.dtype].is_floating_point]
        self.dtype = dtype or (float_dts[0] if float_dts else torch.float32)
        t0 = time.perf_counter()
        config = transformers.AutoConfig.from_pretrained(str(base.root))
        self.model = _model_class(config).from_pretrained(str(base.root), dtype=self.dtype).to(self.device).eval()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(base.root))
        except Exception:  # an encoder shipped without a tokenizer: the scorer brings its own
            self.tokenizer = None
        state = self.model.state_dict()
        prefix = getattr(self.model, "base_model_prefix", "") or ""

        def target(key: str) -> torch.Tensor | None:
            for k in (key, key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None,
                      f"{prefix}.{key}" if prefix else None):
                if k is not None and k in state:
                    return state[k]
            return None

        self.targets: dict[str, torch.Tensor] = {}
        for key in merger.group_of:
            t = target(key)
            if t is None:
                raise InputError(f"in-memory trials: the base loaded as {type(self.model).__name__} has no parameter "
                                 f"{key} (its checkpoint does); write trials to disk with --eval instead")
            if tuple(t.shape) != tuple(meta[key].shape):
                raise InputError(f"in-memory trials: {key} is {tuple(t.shape)} in the loaded model, "
                                 f"{tuple(meta[key].shape)} in the checkpoint")
            self.targets[key] = t
        others = merger.src.anchor.others()
        n_set = 0
        with torch.no_grad():
            for key in merger.src.proj.plan.others:
                t = target(key)
                if t is None:  # a checkpoint tensor the model does not hold as state (nothing to set)
                    continue
                t.copy_(others.get(key).to(device=t.device, dtype=t.dtype).reshape(t.shape))
                n_set += 1
        info(f"search: in-memory: {type(self.model).__name__} resident on {self.device} ({self.dtype}), "
             f"{len(self.targets)} solved modules, {n_set} other tensors set by the anchor "
             f"({time.perf_counter() - t0:.1f} s)")

    @torch.no_grad()
    def update(self, params: dict) -> dict:
        """Write the trial's merged weights into the model; returns ``{"solve_s", "write_s"}``."""
        solve_s = write_s = 0.0
        t = time.perf_counter()
        for key, W in self.merger.iter_weights(self.to_params(params)):
            t1 = time.perf_counter()
            solve_s += t1 - t
            self.targets[key].copy_(W.to(device=self.device, dtype=self.targets[key].dtype, non_blocking=True))
            t = time.perf_counter()
            write_s += t - t1
        if self.device.type == "cuda":
            t1 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            write_s += time.perf_counter() - t1
        return {"solve_s": round(solve_s, 4), "write_s": round(write_s, 4)}

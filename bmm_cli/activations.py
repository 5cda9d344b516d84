"""Data-assisted Gram capture: run an expert on calibration text and collect G_t = mean x xᵀ per linear module.

The data-assisted closed form (paper Eq. 8) needs, for every solved module of expert t, the second moment of the
module's input over the non-padding tokens of t's calibration data: ``G_t = Σ x xᵀ / n_tokens`` (``d_in × d_in``).
This module reads calibration files (``read_calibration``) and captures those Grams (``capture_grams``).

How the capture works
---------------------
* The expert is loaded with ``transformers.AutoModel`` (the bare base model: no LM/classifier head, so no
  ``batch × seq × vocab`` logits are ever made); architectures AutoModel does not know fall back to
  ``AutoModelForCausalLM``. Eval mode, ``torch.inference_mode()``, ``use_cache=False``: no dropout, deterministic.
  ``trust_remote_code`` is never set.
* Texts are tokenized with the BASE model's tokenizer (special tokens as the tokenizer adds them, BOS included),
  truncated to ``max_len`` (clamped to the model's maximum positions), sorted by length (longest first, so an
  out-of-memory shows on the first batch and padding is minimal) and padded on the RIGHT: with right padding, real
  tokens keep positions 0..L-1 and (causal or masked) attention never lets them see a pad, so their activations do not
  depend on the batch they are in. A tokenizer without a pad token pads with eos/unk (masked, so the id is irrelevant).
* A forward pre-hook on each module receives its input ``x`` of shape ``[batch, seq, d_in]`` (or the flattened
  ``[batch*seq, d_in]``); the rows of the non-padding tokens (attention mask) are selected and ``Σ x xᵀ`` is
  accumulated in fp32 on the execution device. bf16/fp16 inputs on CUDA use a GEMM with fp32 output (bf16×bf16
  products are exact in fp32, so this equals casting first at about 1/16 of the cost); everything else is cast to
  fp32 first.
  The result is symmetrized and divided by the token count.
* GPT-2 ``Conv1D`` stores its weight as ``[d_in, d_out]`` but, like ``nn.Linear``, takes inputs ``[..., d_in]``:
  the Gram needs no transpose; only ``d_in`` is read from ``weight.shape[0]`` instead of ``weight.shape[1]``.
* Modules that read the same input tensor (q/k/v; gate/up; GPT-2 c_attn alone) share one accumulator: when a hook
  sees the very tensor the previous hooked module saw (same storage pointer, shape, strides, dtype and device, with
  a reference held so the address cannot be reused), it links to that module's accumulator on the first batch and
  does no work afterwards. This is detected from the running graph, not from architecture tables, so it holds for
  any model; a model whose sharing changes from batch to batch is reported as an error. In the returned dict the
  sharing modules hold the SAME tensor object (treat results as read-only; ``safetensors.save_file`` refuses tensors
  that share memory, so store one copy per group or ``.clone()``).

Models larger than the device: accelerate offload + multi-pass capture
----------------------------------------------------------------------
Before any weight is read, the model is built on the meta device to resolve the module names and size the run:
weights (params × dtype size), Grams (Σ d_in² × 4 bytes, before sharing: an upper bound) and activations (an estimate
from the config, batch size and length). Against the execution device's budget (``max_memory`` entry, else 90 % of
free CUDA memory or 80 % of available RAM):

1. everything fits → the model is loaded straight onto the device; one pass over the data;
2. otherwise the weights that do not fit are offloaded with accelerate (``device_map="auto"``, ``max_memory``,
   ``offload_folder``: CPU RAM, then disk). accelerate's hooks move each offloaded layer onto the execution device
   for its forward; our pre-hooks see the inputs there, so capture is unchanged (tested with disk offload).
3. if the Grams themselves do not fit next to the activations (e.g. a 70B model: ≈ 263 GB of fp32 Grams), the
   modules are split, in execution order, into passes whose Grams fit; each pass reruns the calibration data with
   hooks on its modules only and stops the forward once they have all run.

Why this and not layer-by-layer execution (GPTQ style: cache every layer's inputs, run one layer over all data):
layer-by-layer moves each weight once and holds one layer's Grams, but it must know each architecture's layer stack
and per-layer arguments (rotary embeddings, per-layer sliding-window masks, tuple outputs), and it keeps all
calibration hidden states. Whole-model forwards with accelerate work for every architecture transformers runs, and
for the design target (an 8B model, ≈ 16 GB bf16 weights + ≈ 33 GB Grams on one 80 GB H100) case 1 applies.

Limits: offloaded weights are re-read from CPU/disk for every batch (and every pass): bandwidth-bound, use large
batches; k passes cost about (k+1)/2 forwards of compute; one execution device (``cuda:N`` or CPU), other GPUs are
not used; a module applied more than once per forward (weights shared across depth, ALBERT) is accumulated over all
its applications, but must not be split into multiple passes (passes stop at its first use); text models only
(no image/audio calibration); the activation estimate is coarse (lower ``batch_size``/``max_len`` on OOM).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from .device import resolve_device
from .errors import BmmError, InputError, NumericError
from .progress import info, progress

__all__ = ["read_calibration", "capture_grams", "JSONL_SUFFIXES"]

#: Files with these suffixes are read as JSON lines (``.json`` may also hold one JSON array); anything else is plain
#: text with one sample per line.
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


# ----------------------------------------------------------------------------------------------------------------------
# calibration files
# ----------------------------------------------------------------------------------------------------------------------


def read_calibration(path: str | os.PathLike, samples: int, seed: int = 0, *, note: bool = True) -> list[str]:
    """Read calibration texts and pick at most ``samples`` of them, deterministically.

    Format by extension: ``.jsonl``/``.ndjson``/``.json`` → one JSON object per line with a string ``"text"``
    field (a ``.json`` file may instead hold one JSON array of such objects); any other extension → plain text, one
    sample per line. Blank lines and empty texts are skipped.

    Selection: with more than ``samples`` texts, the indices are shuffled with ``random.Random(seed)`` and the first
    ``samples`` are kept, returned in file order. The choice depends only on (number of texts, samples, seed), and a
    smaller ``samples`` picks a subset of a larger one's pick. With fewer texts than asked, all are used and a line
    on stderr says so; the count used is ``len()`` of the result.
    """
    path = Path(path)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"calibration samples must be a positive integer, got {samples!r}")
    if not path.is_file():
        raise InputError(f"calibration file {path} not found (give a .jsonl file with a \"text\" field per line, "
                         f"or a text file with one sample per line)")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"calibration file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"re-encode it as UTF-8") from exc
    if path.suffix.lower() in JSONL_SUFFIXES:
        texts = _parse_json_texts(path, raw)
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
    if not texts:
        raise InputError(f"calibration file {path} holds no non-empty text")
    n = len(texts)
    if n < samples:
        if note:  # (not in preflight: the stage says it when it reads the file)
            info(f"{path}: {n} calibration texts, fewer than the {samples} asked; using all {n}")
        return texts
    if n == samples:
        return texts
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in sorted(order[:samples])]


def _parse_json_texts(path: Path, raw: str) -> list[str]:
    stripped = raw.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); a .json calibration file is a JSON "
                             f"array of {{\"text\": ...}} objects or one such object per line") from exc
        return [t for i, item in enumerate(items) if (t := _text_of(item, f"{path} item {i}"))]
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be a JSON object like "
                             f"{{\"text\": \"...\"}}") from exc
        text = _text_of(obj, f"{path}:{lineno}")
        if text:
            texts.append(text)
    return texts


def _text_of(obj: Any, where: str) -> str:
    if not isinstance(obj, dict) or "text" not in obj:
        keys = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise InputError(f"{where}: no \"text\" field ({keys}); each record must be an object like "
                         f"{{\"text\": \"...\"}}")
    text = obj["text"]
    if not isinstance(text, str):
        raise InputError(f"{where}: \"text\" is a {type(text).__name__}, not a string")
    return text if text.strip() else ""


# ----------------------------------------------------------------------------------------------------------------------
# Gram capture
# ----------------------------------------------------------------------------------------------------------------------


def capture_grams(
    model_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    texts: list[str],
    module_names: list[str],
    *,
    max_len: int = 512,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
    conv1d_names: Iterable[str] = (),
    max_memory: Mapping[Any, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Capture ``{name: (G, n_tokens)}``: ``G`` = mean over non-padding tokens of ``x xᵀ`` (fp32, CPU, ``d_in×d_in``).

    ``model_dir``: the expert (HF directory). ``tokenizer_dir``: the BASE model's tokenizer (None: ``model_dir``).
    ``module_names``: checkpoint weight keys without ``.weight`` (a base-model prefix such as ``bert.``/``model.``/
    ``transformer.`` may be present or absent). ``dtype``: the dtype the model runs in (Grams are fp32 regardless).
    ``conv1d_names``: names the caller's architecture map says are GPT-2 ``Conv1D``; checked against the model.
    ``max_memory``: accelerate-style budgets (``{0: "70GiB", "cpu": "100GiB"}``) for the execution device and the
    CPU; ``offload_folder``: where disk-offloaded weights go (default: a temp dir, removed afterwards).
    See the module docstring for placement, offload and multi-pass behaviour.
    """
    transformers = _import_transformers()
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    for what, d in (("model", model_dir), ("tokenizer", tokenizer_dir)):
        if not d.is_dir():
            raise InputError(f"{what} directory {d} not found (give a Hugging Face model directory)")
    module_names = list(dict.fromkeys(module_names))
    if not module_names:
        raise InputError("capture_grams: no module names given")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InputError(f"no calibration texts to run {model_dir} on")
    if batch_size < 1 or max_len < 1:
        raise InputError(f"batch_size and max_len must be positive (got {batch_size}, {max_len})")
    dtype = _as_dtype(dtype)
    dev = resolve_device(str(device))

    with _quiet_transformers(transformers):
        config = transformers.AutoConfig.from_pretrained(model_dir)
        auto_cls, meta_model = _meta_model(transformers, config, model_dir)
    targets = _resolve_modules(meta_model, module_names, set(conv1d_names), model_dir)
    max_len = _clamp_max_len(config, max_len)
    plan = _plan(meta_model, targets, config, dev, dtype, batch_size, max_len, max_memory)
    del meta_model

    batches = _tokenize(tokenizer_dir, texts, max_len, batch_size)

    made_folder = None
    if plan.offload and offload_folder is None:
        offload_folder = made_folder = tempfile.mkdtemp(prefix="bmm-offload-")
    try:
        with _quiet_transformers(transformers):
            model = _load(auto_cls, model_dir, dtype, dev, plan, offload_folder)
        model.eval()
        if plan.offload:
            info(f"{model_dir.name}: weights do not fit on {dev}; offloading part of them to CPU/disk "
                 f"({_gib(plan.weights_bytes)} GiB weights, budget {_gib(plan.weights_budget)} GiB)")
        if len(plan.passes) > 1:
            info(f"{model_dir.name}: Grams ({_gib(plan.grams_bytes)} GiB) do not fit on {dev} at once; "
                 f"capturing in {len(plan.passes)} passes over the data")
        accepted = set(inspect.signature(model.forward).parameters)
        results: dict[str, tuple[torch.Tensor, int]] = {}
        modules = dict(model.named_modules())
        with progress() as bar:
            task = bar.add_task(f"grams {model_dir.name}", total=len(batches) * len(plan.passes))
            for pass_targets in plan.passes:
                results.update(_run_pass(model, modules, pass_targets, batches, dev, accepted,
                                         stop_early=len(plan.passes) > 1, bar=bar, task=task))
        del model, modules
    finally:
        if made_folder is not None:
            shutil.rmtree(made_folder, ignore_errors=True)
    return {name: results[name] for name in module_names}


# --- loading ----------------------------------------------------------------------------------------------------------


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("data-assisted Grams need transformers: from the bmm clone, pip install -e '.[data]'") from exc
    return transformers


@contextlib.contextmanager
def _quiet_transformers(transformers) -> Iterator[None]:
    """transformers' load reports and progress bars would interleave with ours on stderr."""
    tlog = transformers.utils.logging
    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    alias = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    got = getattr(torch, alias.get(name, name), None)
    if not isinstance(got, torch.dtype) or not got.is_floating_point:
        raise InputError(f"dtype {dtype!r} is not a torch floating dtype (use float32, bfloat16 or float16)")
    return got


def _meta_model(transformers, config, model_dir: Path):
    """The class to load with and a weightless instance of it (names and sizes, no memory)."""
    from accelerate import init_empty_weights

    errors = []
    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        try:
            with init_empty_weights():
                return cls, cls.from_config(config)
        except (ValueError, KeyError) as exc:
            errors.append(f"{cls.__name__}: {exc}")
    raise InputError(f"{model_dir}/config.json: transformers cannot build this architecture "
                     f"({getattr(config, 'model_type', '?')}): {'; '.join(errors)}")


def _load(auto_cls, model_dir: Path, dtype: torch.dtype, dev: torch.device, plan: "_Plan", offload_folder):
    kwargs: dict[str, Any] = {"use_safetensors": True}  # never fall back to a pickled .bin next to the shards
    major = int(_import_transformers().__version__.split(".")[0])
    kwargs["dtype" if major >= 5 else "torch_dtype"] = dtype
    if plan.offload:
        kwargs.update(device_map="auto", max_memory=plan.max_memory, offload_folder=str(offload_folder))
    elif dev.type != "cpu":
        kwargs.update(device_map={"": str(dev)})
    try:
        return auto_cls.from_pretrained(model_dir, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        raise InputError(f"out of memory loading {model_dir} onto {dev}; give max_memory for {dev} "
                         f"lower than the free memory") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load {model_dir} with {auto_cls.__name__}: {exc}") from exc


def _clamp_max_len(config, max_len: int) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    if limit is not None and max_len > limit:
        info(f"max_len {max_len} > the model's {limit} positions; truncating calibration texts to {limit} tokens")
        return limit
    return max_len


# --- module names -----------------------------------------------------------------------------------------------------


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class _Target:
    module: str  # name in model.named_modules()
    names: list[str]  # the caller's names that map to it
    d_in: int
    order: int  # position in named_modules (≈ execution order)


def _candidates(name: str, prefix: str) -> list[str]:
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    if "." in name:
        out.append(name.split(".", 1)[1])
    if prefix:
        out.append(f"{prefix}.{name}")
    return out


def _resolve_modules(model: torch.nn.Module, names: list[str], conv1d: set[str], model_dir: Path) -> list[_Target]:
    """Map checkpoint names to ``named_modules`` names, tolerating a base-model prefix on either side."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    linear = {}
    for order, (mname, mod) in enumerate(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) or _is_conv1d(mod):
            linear[mname] = (mod, order)
    all_modules = dict(model.named_modules())
    targets: dict[str, _Target] = {}
    missing, wrong_type, wrong_kind = [], [], []
    for name in names:
        hit = next((c for c in _candidates(name, prefix) if c in linear), None)
        if hit is None:
            other = next((c for c in _candidates(name, prefix) if c in all_modules), None)
            if other is not None:
                wrong_type.append(f"{name} ({type(all_modules[other]).__name__})")
            else:
                missing.append(name)
            continue
        mod, order = linear[hit]
        is_conv = _is_conv1d(mod)
        if (name in conv1d) != is_conv and (conv1d or not is_conv):
            wrong_kind.append(f"{name} (is {'Conv1D' if is_conv else 'Linear'})")
        d_in = int(mod.weight.shape[0] if is_conv else mod.weight.shape[1])
        if hit in targets:
            targets[hit].names.append(name)
        else:
            targets[hit] = _Target(hit, [name], d_in, order)
    where = f"{model_dir} (loaded as {type(model).__name__})"
    if missing:
        example = ", ".join(list(linear)[:4])
        raise InputError(f"{len(missing)} of {len(names)} module names not found in {where}: "
                         f"{_short(missing)}; its linear modules look like: {example} "
                         f"(pass checkpoint weight keys without '.weight')")
    if wrong_type:
        raise InputError(f"modules in {where} are not nn.Linear/Conv1D, so they have no Gram: {_short(wrong_type)}")
    if wrong_kind:
        raise InputError(f"the architecture map's Conv1D list disagrees with {where}: {_short(wrong_kind)}; "
                         f"fix conv1d_names")
    return sorted(targets.values(), key=lambda t: t.order)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", … ({len(items) - n} more)" if len(items) > n else "")


# --- memory plan ------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    passes: list[list[_Target]]
    offload: bool
    max_memory: dict | None
    weights_bytes: int
    weights_budget: int
    grams_bytes: int
    headroom: int
    budget: int = 0


def _to_bytes(value: int | str) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    from accelerate.utils import convert_file_size_to_int

    return int(convert_file_size_to_int(value))


def _device_key(dev: torch.device):
    return (dev.index or 0) if dev.type == "cuda" else dev.type


def _device_budget(dev: torch.device, max_memory: Mapping | None) -> int:
    key = _device_key(dev)
    if max_memory:
        for k in (key, str(key), str(dev)):
            if k in max_memory:
                return _to_bytes(max_memory[k])
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * 0.9)
    return _host_budget(None)


def _host_budget(max_memory: Mapping | None) -> int:
    if max_memory and "cpu" in max_memory:
        return _to_bytes(max_memory["cpu"])
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.8)
    except ImportError:  # pragma: no cover
        return 8 << 30


def _activation_headroom(config, dev: torch.device, batch_size: int, max_len: int, itemsize: int) -> int:
    """A coarse upper estimate of one forward's transient memory plus the Gram update's temporaries."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*attrs, default):
        for a in attrs:
            v = getattr(cfg, a, None)
            if isinstance(v, int) and v > 0:
                return v
        return default

    hidden = first("hidden_size", "n_embd", "d_model", default=4096)
    ffn = first("intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden)
    heads = first("num_attention_heads", "n_head", default=max(1, hidden // 64))
    tokens = batch_size * max_len
    widest = max(hidden, ffn)
    forward = tokens * (6 * hidden + 3 * ffn) * itemsize + batch_size * heads * max_len * max_len * 4
    gram_tmp = tokens * widest * 4 + widest * widest * 4
    slop = (512 << 20) if dev.type == "cuda" else 0
    return forward + gram_tmp + slop


def _plan(model, targets, config, dev, dtype, batch_size, max_len, max_memory) -> _Plan:
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() * (itemsize if p.is_floating_point() else p.element_size())
                  for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    grams = [t.d_in * t.d_in * 4 for t in targets]
    grams_total = sum(grams)
    headroom = _activation_headroom(config, dev, batch_size, max_len, itemsize)
    budget = _device_budget(dev, max_memory)
    usable = budget - headroom
    if weights + grams_total <= usable:
        return _Plan([targets], False, None, weights, usable - grams_total, grams_total, headroom, budget)
    # Grams get what the weights leave, and at least half of the device when weights must be offloaded anyway.
    gram_budget = min(grams_total, max(usable - weights, usable // 2))
    if gram_budget < max(grams):
        big = targets[grams.index(max(grams))]
        raise InputError(f"not enough memory on {dev} for the Gram of {big.names[0]} ({_gib(max(grams))} GiB fp32) "
                         f"plus activations ({_gib(headroom)} GiB) within {_gib(budget)} GiB; lower batch_size/"
                         f"max_len or use a device with more memory")
    passes, cur, cur_bytes = [], [], 0
    for t, b in zip(targets, grams):
        if cur and cur_bytes + b > gram_budget:
            passes.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += b
    passes.append(cur)
    weights_budget = usable - max(sum(t.d_in * t.d_in * 4 for t in p) for p in passes)
    offload = weights > weights_budget
    mm = None
    if offload:
        mm = {_device_key(dev): max(weights_budget, 0)}
        if dev.type != "cpu":
            mm["cpu"] = _host_budget(max_memory)
    return _Plan(passes, offload, mm, weights, weights_budget, grams_total, headroom, budget)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


# --- tokenization -----------------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer_dir: Path):
    """The base tokenizer; any failure of transformers/tokenizers (a KeyError from a damaged tokenizer.json, ...) is
    bad input naming the directory, not an internal error."""
    transformers = _import_transformers()
    try:
        with _quiet_transformers(transformers):
            return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # transformers/tokenizers raise many classes for broken tokenizer files
        raise InputError(f"cannot load the base tokenizer from {tokenizer_dir} ({exc.__class__.__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); check its tokenizer files") from exc


def _encode(tok, texts: list[str], max_len: int, tokenizer_dir: Path) -> dict:
    try:
        return tok(texts, truncation=True, max_length=max_len, add_special_tokens=True)
    except Exception as exc:
        raise InputError(f"the base tokenizer in {tokenizer_dir} fails on these texts ({exc.__class__.__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from exc


def check_calibration(tokenizer_dir: Path, files: dict[int, str], experts: list[str], *, samples: int,
                      max_len: int, seed: int = 0) -> None:
    """Preflight of ``--gram data``: every calibration file reads and the base tokenizer loads and encodes its
    texts; errors name the expert and its file."""
    tok = None
    for t, path in files.items():
        try:
            texts = read_calibration(path, samples, seed, note=False)
            tok = tok or _load_tokenizer(Path(tokenizer_dir))
            _encode(tok, texts, max_len, Path(tokenizer_dir))
        except InputError as exc:
            raise InputError(f"expert {t + 1} ({experts[t]}), calibration file {path}: {exc}") from exc


def _tokenize(tokenizer_dir: Path, texts: list[str], max_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded CPU batches, longest texts first."""
    tok = _load_tokenizer(tokenizer_dir)
    pad_id = tok.pad_token_id
    if pad_id is None:
        pad_id = next((i for i in (tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) if i is not None), 0)
    enc = _encode(tok, texts, max_len, tokenizer_dir)
    ids = enc["input_ids"]
    type_ids = enc.get("token_type_ids")
    keep = [i for i in range(len(ids)) if len(ids[i]) > 0]
    if len(keep) < len(ids):
        info(f"{len(ids) - len(keep)} calibration texts tokenize to nothing; skipped")
    if not keep:
        raise InputError(f"no calibration text yields any token with the tokenizer in {tokenizer_dir}")
    order = sorted(keep, key=lambda i: (-len(ids[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        tt = torch.zeros((len(rows), width), dtype=torch.long) if type_ids is not None else None
        for r, i in enumerate(rows):
            n = len(ids[i])
            input_ids[r, :n] = torch.tensor(ids[i], dtype=torch.long)
            mask[r, :n] = 1
            if tt is not None:
                tt[r, :n] = torch.tensor(type_ids[i], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if tt is not None:
            batch["token_type_ids"] = tt
        batches.append(batch)
    return batches


# --- the hooks --------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once every module of a pass has run: the rest of the forward is not needed."""


class _Acc:
    __slots__ = ("gram", "n", "leader")

    def __init__(self, leader: str):
        self.gram: torch.Tensor | None = None
        self.n = 0
        self.leader = leader


class _Collector:
    def __init__(self, targets: list[_Target], dev: torch.device, stop_early: bool):
        self.targets = {t.module: t for t in targets}
        self.dev = dev
        self.stop_early = stop_early
        self.acc: dict[str, _Acc] = {}
        self.mask: torch.Tensor | None = None  # [batch, seq] bool, CPU
        self._idx: dict[torch.device, torch.Tensor] = {}
        self._last: tuple | None = None  # (key, tensor ref, _Acc)
        self.fired: set[str] = set()
        self.out_dtype_ok = True

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self._idx = {}
        self._last = None
        self.fired = set()

    def end_batch(self) -> None:
        self._last = None
        self._idx = {}
        missed = set(self.targets) - self.fired
        if missed:
            names = [self.targets[m].names[0] for m in sorted(missed, key=lambda m: self.targets[m].order)]
            raise InputError(f"modules never ran in the forward pass, so they have no Gram: {_short(names)}")

    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        b, s = self.mask.shape
        d = self.targets[name].d_in
        if x.shape[-1] != d or not (tuple(x.shape[:-1]) == (b, s) or (x.dim() == 2 and x.shape[0] == b * s)):
            raise BmmError(f"module {self.targets[name].names[0]} got an input of shape {tuple(x.shape)}; expected "
                           f"[batch, seq, d_in] = [{b}, {s}, {d}] (or flattened); this layout is not supported")
        idx = self._idx.get(x.device)
        if idx is None:
            idx = self._idx[x.device] = self.mask.reshape(-1).nonzero().squeeze(1).to(x.device)
        return x.reshape(-1, d).index_select(0, idx)

    def _accumulate(self, acc: _Acc, xs: torch.Tensor) -> None:
        d = xs.shape[1]
        if acc.gram is None:
            acc.gram = torch.zeros((d, d), dtype=torch.float32, device=self.dev)
        if xs.dtype in (torch.bfloat16, torch.float16) and xs.device.type == "cuda" and self.out_dtype_ok:
            try:
                prod = torch.mm(xs.t(), xs, out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                self.out_dtype_ok = False
                prod = None
            if prod is not None:
                acc.gram.add_(prod.to(self.dev))
                acc.n += xs.shape[0]
                return
        xs = xs.float()
        if xs.device == acc.gram.device:
            acc.gram.addmm_(xs.t(), xs)
        else:
            acc.gram.add_((xs.t() @ xs).to(acc.gram.device))
        acc.n += xs.shape[0]

    def hook(self, name: str):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            key = (x.data_ptr(), x.device, x.dtype, tuple(x.shape), tuple(x.stride()))
            acc = self.acc.get(name)
            last = self._last
            same_input = last is not None and last[0] == key
            if acc is None:
                if same_input:  # first sight: share the accumulator of the module that read this very tensor
                    self.acc[name] = last[2]
                    self._done(name)
                    return None
                self.acc[name] = acc = _Acc(name)
            elif acc.leader != name:  # a follower: its leader must have just read the same tensor
                if same_input and last[2] is acc:
                    self._done(name)
                    return None
                raise BmmError(f"module {self.targets[name].names[0]} shared its input with "
                               f"{self.targets[acc.leader].names[0]} on the first batch but not on this one; "
                               f"this model's graph changes between batches and is not supported")
            self._accumulate(acc, self._rows(x, name))
            self._last = (key, x, acc)
            self._done(name)
            return None

        return pre_hook

    def _done(self, name: str) -> None:
        self.fired.add(name)
        if self.stop_early and len(self.fired) == len(self.targets):
            raise _StopForward

    def results(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Finalize outside inference mode, so callers get ordinary (mutable) tensors."""
        out: dict[str, tuple[torch.Tensor, int]] = {}
        done: dict[int, tuple[torch.Tensor, int]] = {}
        for mname, t in self.targets.items():
            acc = self.acc[mname]
            if id(acc) not in done:
                if acc.n == 0:
                    raise InputError(f"module {t.names[0]} saw no non-padding token")
                g = acc.gram.to("cpu", torch.float64)
                g = ((g + g.t()) / (2 * acc.n)).to(torch.float32)
                if not torch.isfinite(g).all():
                    raise NumericError(f"the Gram of {self.targets[acc.leader].names[0]} has NaN/Inf values (an "
                                       f"overflow in the model's dtype?); rerun with dtype float32")
                done[id(acc)] = (g, acc.n)
            for n in t.names:
                out[n] = done[id(acc)]
        return out


def _run_pass(model, modules, targets: list[_Target], batches, dev, accepted: set[str], *, stop_early, bar, task):
    col = _Collector(targets, dev, stop_early)
    handles = [modules[t.module].register_forward_pre_hook(col.hook(t.module), with_kwargs=True) for t in targets]
    extra = {"use_cache": False} if "use_cache" in accepted else {}
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                col.start_batch(batch["attention_mask"])
                inputs = {k: v.to(dev) for k, v in batch.items() if k in accepted}
                try:
                    model(**inputs, **extra)
                except _StopForward:
                    pass
                except torch.cuda.OutOfMemoryError as exc:
                    b, s = batch["input_ids"].shape
                    raise InputError(f"out of memory on {dev} at calibration batch {i + 1}/{len(batches)} "
                                     f"({b}×{s} tokens); lower batch_size or max_len") from exc
                col.end_batch()
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
    return col.results()

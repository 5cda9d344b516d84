"""Evaluation hook for ensembles (`bmm sample`): mean-of-softmax accuracy, ECE (20 bins) and NLL on MiniLM tasks.

    python bench/ensemble_hook.py --ensemble DIR [--split val|test] [--limit N] [--tasks a,b] [--objective nll]

    bmm sample ... --search-beta 10:1e5 --minimize --eval "python bench/ensemble_hook.py --ensemble {model}"

DIR is a `bmm sample` output (its samples.json lists the members) or one model directory (an ensemble of one,
e.g. the MAP model). The last stdout line is one JSON object: {"score": the --objective (nll: lower is better,
so pass --minimize to bmm; acc: higher), "acc", "ece", "nll", per task "acc/<task>" ...}; metrics pool the rows of
every task. Predictions use bmm_cli.ensemble_metrics (mean of softmax over the members).

Only the tensors that differ between members are evaluated per member: the encoder runs once (first member) up to
the first transformer layer holding a differing tensor, and per member only the layers from there on (for the
paper's default, the last block's mlp_out, 1 of 6 layers). The replay of the first member is checked against its
full forward pass (max |Δ| ≤ 1e-4 on the pooled embeddings) every time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DEFAULT_VAL_LIMIT,
    BenchError,
    MiniBert,
    cache_dir,
    embed,
    load_encoder,
    load_head,
    parse_tasks,
    set_threads,
)
from bench.eval_hook import load_tokens  # noqa: E402

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def members_of(path: Path) -> list[Path]:
    """Member model directories of an ensemble directory (or the directory itself as an ensemble of one)."""
    from bmm_cli.errors import BmmError
    from bmm_cli.sample import MANIFEST, list_samples

    if not path.is_dir():
        raise BenchError(f"--ensemble {path} is not a directory")
    if not (path / MANIFEST).exists():
        return [path]
    try:
        return list_samples(path)
    except BmmError as e:
        raise BenchError(str(e)) from None


def reference_of(path: Path, members: list[Path]) -> Path:
    """The MAP model a `bmm sample` output records (the members differ from it in the sampled modules only)."""
    from bmm_cli.sample import MANIFEST

    try:
        rel = json.loads((path / MANIFEST).read_text()).get("map")
    except (OSError, ValueError):
        rel = None
    ref = path / rel if rel else None
    return ref if ref is not None and ref.is_dir() else members[0]


def _state(path: Path) -> dict:
    """Every encoder tensor of a model directory (fp32, "bert." prefix stripped), as the eval hook reads them."""
    try:
        return MiniBert.from_dir(path).w
    except BenchError as e:
        raise BenchError(f"{path}: {e}") from None


def replay_point(keys: list[str]) -> str | None:
    """The module from which a forward pass must be redone when ``keys`` change: ``encoder.layer.K.output`` (the
    FFN output projection + LayerNorm) when every changed key of the first changed layer K is in it, else
    ``encoder.layer.K``; None when a changed key is outside the layers (embeddings: redo everything)."""
    found = [(_LAYER.search(k), k) for k in keys]
    if not keys or not all(m for m, _ in found):
        return None
    K = min(int(m.group(1)) for m, _ in found)
    first = [k.removeprefix("bert.") for m, k in found if int(m.group(1)) == K]
    ffn_out = f"encoder.layer.{K}.output."
    return ffn_out[:-1] if all(k.startswith(ffn_out) for k in first) else f"encoder.layer.{K}"


def _in_region(key: str, point: str) -> bool:
    key = key.removeprefix("bert.")
    K = int(_LAYER.search(point + ".").group(1))
    m = _LAYER.search(key)
    return m is not None and (int(m.group(1)) > K or key.startswith(point + "."))


class EnsembleEval:
    """Predictions of many ensembles around one reference model (e.g. the MAP) on the benchmark's rows.

    The reference's forward pass runs once, recording the input of the replay point (see :func:`replay_point`,
    fixed by the first member's differences from the reference); a member that differs from the reference only
    at or after that point costs only the rest of the encoder. Any other member gets a full forward pass.
    """

    def __init__(self, reference: Path, cache: Path, tasks: list[str], split: str, limit: int | None,
                 batch_size: int = 64):
        self.ref_state = _state(reference)
        self.model = load_encoder(reference)
        self.own = self.model.state_dict()
        self.tasks, self.batch_size = tasks, batch_size
        self.heads = {t: load_head(cache, t) for t in tasks}
        self.data = {t: load_tokens(cache, t, split, limit) for t in tasks}
        self.point: str | None = None
        self.saved: dict[str, list] = {"layer": [], "point": []}
        self._i = 0
        self.full_passes = 0
        self.replays = 0

    def _pass(self, fn) -> dict:
        return {t: embed(fn, self.data[t][0], self.batch_size) for t in self.tasks}

    def _full(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _record(self, point: str) -> None:
        K = int(_LAYER.search(point + ".").group(1))
        hooks = [self.model.encoder.layer[K].register_forward_pre_hook(
                     lambda mod, a, kw: self.saved["layer"].append((a, dict(kw))), with_kwargs=True),
                 self.model.get_submodule(point).register_forward_pre_hook(
                     lambda mod, a, kw: self.saved["point"].append((a, dict(kw))), with_kwargs=True)]
        self.ref_emb = self._pass(self._full)
        self.full_passes += 1
        for h in hooks:
            h.remove()
        self.point, self.K = point, K
        err = max(float((e - self.ref_emb[t]).abs().max()) for t, e in self._replay().items())
        if err > 1e-4:
            raise BenchError(f"replay from {point} differs from the full forward by {err:.2e}")

    def _suffix(self, ids, mask):
        (args, kwargs), (largs, lkwargs) = self.saved["point"][self._i], self.saved["layer"][self._i]
        self._i += 1
        # the point's output is layer K's output (for ``.output``: BertLayer.feed_forward_chunk returns it as is)
        h = self.model.get_submodule(self.point)(*args, **kwargs)
        for layer in self.model.encoder.layer[self.K + 1:]:
            h = layer(h, *largs[1:], **lkwargs)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def _replay(self) -> dict:
        self._i = 0
        out = self._pass(self._suffix)
        assert self._i == len(self.saved["point"])
        return out

    def _set(self, tensors: dict) -> None:
        import torch

        with torch.no_grad():
            for k, v in tensors.items():
                name = k.removeprefix("bert.")
                if name not in self.own:
                    raise BenchError(f"tensor {k} differs from the reference but the encoder has no such weight")
                self.own[name].copy_(v)

    def member(self, path: Path) -> dict:
        """Pooled embeddings per task of one member."""
        import torch

        state = _state(path)
        diff = [k for k, v in state.items() if not torch.equal(v, self.ref_state[k])]
        if not diff:
            if self.point is None:
                self._record(f"encoder.layer.{self.model.config.num_hidden_layers - 1}")
            return self.ref_emb
        if self.point is None and replay_point(diff) is not None:
            self._record(replay_point(diff))
        self._set({k: state[k] for k in diff})
        try:
            if self.point is not None and all(_in_region(k, self.point) for k in diff):
                self.replays += 1
                return self._replay()
            self.full_passes += 1
            return self._pass(self._full)
        finally:
            self._set({k: self.ref_state[k] for k in diff})

    def predict(self, members: list[Path]) -> dict:
        """``{task: (probs [N, K] fp64 mean of softmax over members, labels [N])}``."""
        import torch

        from bmm_cli.ensemble_metrics import ensemble_probs

        embs = [self.member(m) for m in members]
        out = {}
        for t in self.tasks:
            w, b, _ = self.heads[t]
            out[t] = (ensemble_probs([e[t] @ w.T.float() + b.float() for e in embs]),
                      torch.as_tensor(self.data[t][1]))
        return out


def pooled(pred: dict, tasks: list[str]):
    """Every task's rows together: (probs [N, K_max] zero-padded, labels [N])."""
    import torch

    K = max(pred[t][0].shape[1] for t in tasks)
    probs = torch.cat([torch.nn.functional.pad(pred[t][0], (0, K - pred[t][0].shape[1])) for t in tasks])
    return probs, torch.cat([pred[t][1] for t in tasks])


def summarize(pred: dict, tasks: list[str]) -> dict:
    """Metrics pooled over every task's rows, plus accuracy per task."""
    from bmm_cli.ensemble_metrics import metrics

    res = metrics(*pooled(pred, tasks))
    for t in tasks:
        res[f"acc/{t}"] = metrics(*pred[t])["acc"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ensemble", default=os.environ.get("BMM_MODEL"), help="bmm sample output or a model dir")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--limit", type=int, default=DEFAULT_VAL_LIMIT, help="rows per task (0 = all)")
    ap.add_argument("--tasks", help="comma-separated subset of the benchmark tasks")
    ap.add_argument("--objective", choices=("nll", "ece", "acc"), default="nll",
                    help="what 'score' is (nll and ece: lower is better, use bmm's --minimize)")
    ap.add_argument("--cache", help="cache dir (default $BMM_BENCH_CACHE or ~/.cache/bmm-bench)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if not a.ensemble:
        ap.error("--ensemble is required (or set BMM_MODEL)")
    set_threads(a.threads)
    try:
        tasks = parse_tasks(a.tasks)
        members = members_of(Path(a.ensemble))
        t0 = time.time()
        ev = EnsembleEval(reference_of(Path(a.ensemble), members), cache_dir(a.cache), tasks, a.split,
                          a.limit or None)
        pred = ev.predict(members)
        seconds = round(time.time() - t0, 2)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = summarize(pred, tasks)
    _log(f"{len(members)} members, {res['n']} rows: acc {res['acc']:.4f} ece {res['ece']:.4f} nll {res['nll']:.4f} "
         f"({seconds} s; replayed from {ev.point}: {ev.replays} members, {ev.full_passes} full passes)")
    print(json.dumps({"score": res[a.objective], **res, "members": len(members), "seconds": seconds}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

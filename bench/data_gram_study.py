"""Why does data-assisted BMM not beat its TSV anchor on the five-task MiniLM benchmark? (issue 13, item 5)

    python3 bench/data_gram_study.py --work RUN/work --model RUN/models/bmm-data-tsv --anchor-model \\
        RUN/models/anchor-tsv --variant sum=RUN/work:sum --variant trace=RUN/work:trace \\
        --variant sum512=RUN/work-calib512:sum --out bench/results/data_gram_study.json

Each ``--variant NAME=WORK:WEIGHTING[:NSCALE]`` is a data-assisted merge rebuilt module by module in fp64 from a work
dir's task vectors, TSV anchor and *per-task* data Grams ``G_t`` (so calibration size is a property of WORK):

* ``sum``: what ``bmm gram --kind data`` does, ``G = Σ_t G_t``, ``B = Σ_t U_t G_t`` (paper Eq. 8);
* ``trace``: every task weighted equally, ``G_t ← G_t / (tr(G_t)/d_in)`` before the sums (a task whose module
  inputs are larger no longer dominates the regression);
* ``free``: the data-free statistics (for reference: the same code path, ``G_t = U_tᵀU_t``).

λ is bmm's default rule (type-II ML per module, geometric mean per layer and group, s = 1); NSCALE multiplies the
evidence's number of observations N (the calibration tokens by default: correlated tokens carry fewer). The tensors
bmm does not solve are taken from ``--model`` (a ``bmm solve`` output over the same anchor), so variants differ only
in the solved modules. Scores: accuracy on validation and test rows with every task's own head, paired standard errors
against the first variant and against ``--anchor-model`` (same rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cache_dir, hf_forward, load_head, parse_tasks, set_threads, write_json  # noqa: E402
from bench.eval_hook import load_tokens, score_forward  # noqa: E402
from bench.report import paired_acc_se as paired  # noqa: E402

WEIGHTINGS = ("sum", "trace", "free")


def _log(msg: str) -> None:
    print(f"[data-gram] {msg}", file=sys.stderr, flush=True)


def module_stats(taus: torch.Tensor, grams: torch.Tensor | None, weighting: str):
    """(Ĝ, B̂, m, per-task Grams used) in fp64 for one module; ``grams`` [T, d_in, d_in] (None for free)."""
    taus = taus.double()
    d_in = taus.shape[2]
    if weighting == "free":
        gl = [u.T @ u for u in taus]
    else:
        gl = [g.double() for g in grams]
        if weighting == "trace":
            gl = [g / max(float(torch.trace(g)) / d_in, 1e-300) for g in gl]
    G = sum(gl)
    B = sum(u @ g for u, g in zip(taus, gl))
    m = float(torch.trace(G)) / d_in
    return G / m, B / m, m, torch.stack(gl)


def variant_modules(work: Path, anchor: str, weighting: str, n_scale: float = 1.0
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """{module key: merged U (fp64)} and {module key: evidence λ} of one variant."""
    from bmm_cli.closed_form import solve_direct
    from bmm_cli.default_params import params_per_layer
    from bmm_cli.evidence import default_num_obs, evidence_lam, fill_degenerate, residual_energy, spectrum
    from bmm_cli.workdir import AnchorStage, GramStage, load_project, task_gram_reader

    proj = load_project(work)
    T = proj.num_tasks
    ast = AnchorStage(work, anchor)
    tgr = task_gram_reader(work) if weighting != "free" else None
    tokens = None
    if weighting != "free":
        tok = GramStage(work, "data").manifest.get("tokens") or {}
        tokens = float(sum(int(v) for v in tok.values())) if len(tok) == T else None
    stats, lams = {}, {}
    for blk in proj.plan.blocks:
        reader, a = proj.reader(blk), ast.block(blk)
        tg = tgr(blk) if tgr is not None else None
        for ref in blk.modules:
            taus = proj.taus(blk, ref, reader)
            G, B, m, gl = module_stats(taus, tg(ref.key) if tg else None, weighting)
            u0 = a.get(ref.key).double()
            kind = "free" if weighting == "free" else "data"
            n = default_num_obs(kind, T, taus.shape[1], tokens) * n_scale
            S = residual_energy(taus, None if kind == "free" else gl, u0, m, key=ref.key)
            lams[ref.key] = evidence_lam(spectrum(G, B, u0, S, n, key=ref.key))
            stats[ref.key] = (G, B, u0, blk, ref)
    lams = fill_degenerate(lams)
    # bmm's default: one λ per (layer, group), the geometric mean of its modules' λ (default_params.params_per_layer)
    per_layer = params_per_layer(work, lams, 1.0)
    layers = max(proj.plan.stack_layers.values())
    lam_used = {k: per_layer[f"lam_{proj.plan.block_group(blk, layers)}_{ref.group}"]
                for k, (_, _, _, blk, ref) in stats.items()}
    U = {k: solve_direct(G, B, u0, lam_used[k], dtype=torch.float64) for k, (G, B, u0, _, _) in stats.items()}
    return U, lam_used


def load_model(path: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()


def set_modules(model, base_sd: dict, U: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for key, u in U.items():
            k = key if key in sd else key.removeprefix("bert.")
            if k not in sd or k not in base_sd:
                raise SystemExit(f"module {key} is not in the model {sorted(sd)[:3]}…")
            sd[k].copy_((base_sd[k].double() + u).to(sd[k].dtype))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="a bmm solve output (others and layout)")
    ap.add_argument("--anchor-model", required=True, type=Path)
    ap.add_argument("--anchor", default="tsv")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=WORK:WEIGHTING[:NSCALE] (sum, trace, free; NSCALE multiplies the evidence's N)")
    ap.add_argument("--tasks")
    ap.add_argument("--val-limit", type=int, default=150)
    ap.add_argument("--test-limit", type=int, default=400)
    ap.add_argument("--cache")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    set_threads()
    tasks = parse_tasks(a.tasks)
    cache = cache_dir(a.cache)
    from transformers import AutoModel

    from bmm_cli.store import Checkpoint

    variants = []
    for spec in a.variant:
        name, _, rest = spec.partition("=")
        parts = rest.split(":")
        work, w = parts[0], parts[1] if len(parts) > 1 else ""
        try:
            ns = float(parts[2]) if len(parts) > 2 else 1.0
        except ValueError:
            ns = -1.0
        if not name or w not in WEIGHTINGS or not Path(work).is_dir() or not ns > 0:
            ap.error(f"--variant {spec!r}: expected NAME=WORK:WEIGHTING[:NSCALE] with WEIGHTING in {WEIGHTINGS}")
        variants.append((name, Path(work), w, ns))
    data = {s: {t: load_tokens(cache, t, s, lim) for t in tasks} for s, lim in (("val", a.val_limit),
                                                                               ("test", a.test_limit))}
    heads = {t: load_head(cache, t) for t in tasks}
    model = load_model(a.model)
    from bmm_cli.workdir import load_project

    base = Checkpoint.open(load_project(variants[0][1]).base.root)
    base_sd = {}
    for k in model.state_dict():
        for cand in (k, f"bert.{k}"):
            if cand in base.meta:
                base_sd[k] = base.get(cand)
    anchor_model = AutoModel.from_pretrained(str(a.anchor_model), dtype=torch.float32).eval()
    ref = {s: score_forward(hf_forward(anchor_model), data[s], heads) for s in data}
    del anchor_model
    rows, first = {}, None
    for name, work, w, ns in variants:
        t0 = time.time()
        U, lams = variant_modules(work, a.anchor, w, ns)
        set_modules(model, base_sd, U)
        res = {s: score_forward(hf_forward(model), data[s], heads) for s in data}
        vals = sorted(lams.values())
        row = {"work": str(work), "weighting": w, "n_scale": ns, "lam_median": vals[len(vals) // 2], "lam_min": vals[0],
               "lam_max": vals[-1], "seconds": round(time.time() - t0, 1)}
        for s in data:
            row[s] = {"acc": res[s]["score"], **{f"acc/{t}": res[s][f"acc/{t}"] for t in tasks}}
            d, se = paired(res[s], ref[s], tasks)
            row[s]["vs_anchor"] = {"diff": round(d, 4), "se": round(se, 4)}
            if first is not None:
                d, se = paired(res[s], rows[first]["_raw"][s], tasks)
                row[s][f"vs_{first}"] = {"diff": round(d, 4), "se": round(se, 4)}
        row["_raw"] = res
        rows[name] = row
        first = first or name
        _log(f"{name}: val {row['val']['acc']:.4f} test {row['test']['acc']:.4f} (vs anchor "
             f"{row['test']['vs_anchor']['diff']:+.4f} ± {row['test']['vs_anchor']['se']:.4f}), λ median "
             f"{row['lam_median']:.3g}")
    out = {"tasks": tasks, "anchor": a.anchor, "anchor_model": str(a.anchor_model),
           "anchor_scores": {s: ref[s]["score"] for s in ref}, "limits": {"val": a.val_limit, "test": a.test_limit},
           "variants": {k: {kk: vv for kk, vv in v.items() if kk != "_raw"} for k, v in rows.items()}}
    write_json(a.out, out)
    print(json.dumps({k: v["test"]["acc"] for k, v in out["variants"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

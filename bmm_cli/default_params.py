"""The parameters a solve uses when no ``--params``/``--lam`` is given: λ per module by the evidence.

Per module, :func:`module_lams` maximises the evidence of BMM's Bayesian regression (:mod:`bmm_cli.evidence`,
no validation data) on the work dir's statistics; :func:`params_per_layer` takes the geometric mean per (layer,
group), one block-group per layer. :func:`evidence_params` keeps the per-module λ in
``<work>/evidence-<anchor>-<gram>.json`` with the ids of the stages it was made from (recomputed when they
change).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from . import atomic
from .closed_form import data_stats, free_stats, hybrid_stats
from .defaults import FREE_LAM_FACTOR
from .errors import InputError
from .evidence import (
    LAM_RANGE,
    default_num_obs,
    evidence_lam,
    fill_degenerate,
    free_lams,
    has_evidence,
    residual_energy,
    spectrum_from_factors,
)
from .params import Params, geometric_means, resolve_params
from .progress import info, track
from .workdir import GRAM_STATS, AnchorStage, Sources, evidence_file, load_project, task_gram_reader

EVIDENCE_RULE = ("type-II maximum likelihood per module on fp64 statistics, geometric mean per (layer, group) "
                 "over the modules with evidence; s = --scale or 1")


def module_lams(work, anchor: str | Sequence[str], gram: str, *, eps: float | None = None,
                lam_range: tuple[float, float] = LAM_RANGE, n_obs_scale: float = 1.0):
    """``{module key: λ_ev}`` (relative units) for ``bmm solve``'s statistics of ``gram`` (free, data, hybrid);
    given a list of anchors, ``{anchor: {key: λ_ev}}`` from one eigh per module (the basis does not depend on U0).
    Modules without evidence (:func:`~bmm_cli.evidence.has_evidence`: Ĝ = 0, or task vectors equal to the anchor)
    are left out: any λ fits them, and their solve gives the anchor.

    Needs the task vectors, the anchor and the Gram stages; the data kind also reads the per-task Grams and the
    calibration token counts the Gram stage recorded. Ĝ, B̂ and Ŝ are computed here in fp64 from the task vectors
    (and per-task Grams): the stage's fp32 copies carry rounding noise in Ĝ's null space that the evidence would
    fit as signal in rank-deficient modules (``T·d_out < d_in``). The data-free kind never forms Ĝ there: it
    decomposes the smaller ``[T·d_out]²`` side (:func:`~bmm_cli.evidence.free_spectra`). ``n_obs_scale``
    multiplies N (for studies of how much the tokens are worth: correlated tokens carry fewer than N independent
    observations)."""
    anchors = [anchor] if isinstance(anchor, str) else list(anchor)
    src = Sources(work, anchors[0], gram)
    stages = [src.anchor] + [AnchorStage(work, a) for a in anchors[1:]]
    proj = src.proj
    T = proj.num_tasks
    kinds = GRAM_STATS if gram == "hybrid" else (gram,)
    if gram == "hybrid" and eps is None:
        raise InputError("hybrid evidence λ needs ε")
    tokens = None
    task_grams = None
    if "data" in kinds:
        tok = src.grams["data"].manifest.get("tokens") or {}
        tokens = float(sum(int(v) for v in tok.values())) if len(tok) == T else None
        task_grams = task_gram_reader(work)
    out: dict[str, dict[str, float]] = {a: {} for a in anchors}
    for blk in track(proj.plan.blocks, "evidence λ (one eigh per module)"):
        ablk = [st.block(blk) for st in stages]
        reader = proj.reader(blk)
        tg = task_grams(blk) if task_grams is not None else None
        for ref in blk.modules:
            taus = proj.taus(blk, ref, reader)
            if kinds == ("free",):  # straight from the task vectors, the smaller side's eigh (evidence.free_spectra)
                u0s = [None if st.zero else a.get(ref.key) for st, a in zip(stages, ablk)]
                n = default_num_obs("free", T, taus.shape[1]) * n_obs_scale
                for name, lam in zip(anchors, free_lams(taus, u0s, n, key=ref.key, lam_range=lam_range)):
                    if lam is not None:  # a module without evidence (no expert changed it) has no λ of its own
                        out[name][ref.key] = lam
                continue
            taus = taus.to(torch.float64)
            grams_k = {k: (tg(ref.key).to(torch.float64) if k == "data" else None) for k in kinds}
            stats = {k: (free_stats(taus, key=ref.key) if k == "free" else data_stats(taus, grams_k[k], key=ref.key))
                     for k in kinds}
            n_k = {k: default_num_obs(k, T, taus.shape[1], tokens) * n_obs_scale for k in kinds}
            if len(kinds) == 1:
                G, B = stats[gram].G_hat, stats[gram].B_hat
                w = {gram: 1.0}
            else:
                mix = hybrid_stats(stats["free"], stats["data"], eps, key=ref.key)
                G, B = mix.G_hat, mix.B_hat
                w = {"free": 1.0 - eps, "data": eps}
            lam, Q = torch.linalg.eigh(0.5 * (G + G.T))
            BQ = B @ Q
            n = sum(w[k] * n_k[k] for k in kinds)
            for name, st, a in zip(anchors, stages, ablk):
                u0 = None if st.zero else a.get(ref.key).to(torch.float64)
                S = sum(w[k] * residual_energy(taus, grams_k[k], u0, stats[k].m, key=ref.key) for k in kinds)
                sp = spectrum_from_factors(lam, BQ, None if u0 is None else u0 @ Q, S, n, key=ref.key)
                if has_evidence(sp):  # a module without evidence (no expert changed it) has no λ of its own
                    out[name][ref.key] = evidence_lam(sp, lam_range)
    res = {a: fill_degenerate(v, lam_range) for a, v in out.items()}
    return res[anchors[0]] if isinstance(anchor, str) else res


def params_per_layer(work, lams: dict[str, float], scale: float, eps: float | None = None) -> dict[str, float]:
    """A ``bmm solve --params`` file (flat dict) with one block-group per layer and, per (layer, group), the
    geometric mean of the λ of its modules in ``lams`` (q/k/v share attn_in, gate/up share mlp_in); a (layer,
    group) without any gets λ = 1."""
    plan = load_project(work).plan
    layers = max(plan.stack_layers.values())
    means = geometric_means(((plan.block_group(blk, layers), ref.group), lams[ref.key])
                            for blk in plan.blocks for ref in blk.modules if ref.key in lams)
    return Params.from_means(means, layers, scale, eps).flat()


def evidence_params(src: Sources, *, scale: float, eps: float | None) -> Params:
    """Per (layer, group) the evidence λ of its modules, computed once per work dir (one eigh per module) and
    kept in ``<work>/evidence-<anchor>-<gram>.json`` with the stage ids it was made from."""
    path = src.work / evidence_file(src.anchor.method.name, src.gram)
    ident = json.loads(json.dumps({**src.fingerprint, "gram": src.gram, "eps": eps, "rule": EVIDENCE_RULE}))
    try:
        kept = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        kept = None
    if isinstance(kept, dict) and kept.get("inputs") == ident and isinstance(kept.get("modules"), dict):
        lams = {k: float(v) for k, v in kept["modules"].items()}
    else:
        info(f"bmm: default λ per module by type-II maximum likelihood (one fp64 eigh each; kept in {path})")
        lams = module_lams(src.work, src.anchor.method.name, src.gram, eps=eps)
        atomic.write_json(path, {"inputs": ident, "modules": lams})
    if src.gram == "free":  # the data-free rule (bmm_cli.defaults)
        lams = {k: v * FREE_LAM_FACTOR for k, v in lams.items()}
    return Params.from_flat(params_per_layer(src.work, lams, scale, eps), source=str(path))


def solve_params(src: Sources, params_file: str | Path | None, *, lam: float | None, scale: float | None,
                 eps: float | None, blocks: int) -> Params:
    """The parameters a solve uses: the params file, or ``--lam/--scale``; with neither, the default λ is chosen
    per module by the evidence (no validation data) and s = ``--scale`` or 1."""
    params = resolve_params(params_file, lam=lam, scale=scale, eps=eps, blocks=blocks, gram=src.gram)
    src.proj.plan.check_block_groups(params.num_groups,
                                     f"--blocks {blocks}" if params_file is None else str(params_file))
    if params_file is None and lam is None:
        params = evidence_params(src, scale=params.scales[0], eps=params.eps)
    return params

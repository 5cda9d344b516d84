"""Data-free λ / scale rules for BMM, measured on the decoder benchmark's validation windows.

    python3 bench/evidence_study.py --work RUN/work --anchors tsv,ta [--rules lib,fp64,...] [--limit 24]
        [--tokens 128] --out bench/results/evidence_study.json [--params-dir DIR]

Every statistic is recomputed in fp64 from the task vectors (``Ĝ = Σ U_tᵀU_t / m``, ``B̂ = Σ U_t U_tᵀ U_t / m``,
one fp64 eigh per module), so no rule is fitted to the fp32 rounding noise of a stored Gram's null space. A rule
gives λ per module (relative units, as ``bmm solve``); λ is then pooled per (layer, group) by geometric mean,
exactly as ``bmm_cli.evidence.params_per_layer`` does, with one scale per layer: the params file
``bmm solve --params`` reads (written to ``--params-dir`` per rule and anchor). The merged model
``W = W0 + s·(B̂ + λU0)(Ĝ + λI)⁻¹`` is put into one resident model (no checkpoint written) and scored on the
validation windows: gap closed (mean over domains of (L_base - L)/(L_base - L_expert)) with a paired SE against
the anchor itself (λ → ∞, s = 1) on the same windows.

Rules (N: observations per output row in the profiled evidence f(λ) = -½[N log R(λ) + Σ log(1 + Λ_i/λ)]):
  lib        the library's default: λ from the stored (fp32) Gram stage, N = T·d_out, s = 1
  fp64       the same formula on the fp64 statistics
  pr         N = participation ratio of Ĝ's spectrum, (ΣΛ)²/ΣΛ² (the effective number of independent inputs)
  rank       N = numerical rank of Ĝ (eigenvalues above 1e-10·Λ_max)
  nK         N = K·T·d_out (K a number, e.g. n0.01)
  xK         K·λ of fp64 (a probe of how far from the evidence the optimum is)
  marg-pr    λ marginalised: U = Σ_k p(λ_k | data) U(λ_k) over a log grid with N = participation ratio (the
             in-memory filter; no params file can express it)
A rule name may end in ``+aa`` (anchor-aware scale: per layer s = sqrt(Σ‖U0‖² / Σ‖U‖²) over its modules, so the
merged update keeps the anchor's energy) or ``@S`` (a constant scale S).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BenchError, read_json, set_threads, write_json
from bench.decoder_common import (
    base_dir,
    cache_dir,
    load_lm,
    load_windows,
    parse_domains,
    window_losses,
)

GRID = None  # log-λ grid of the marginal rule (built lazily: torch import)
RANK_TOL = 1e-10


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ statistics

def build_factors(work: Path, anchors: list[str]) -> tuple[list[dict], object]:
    """Per module (fp64 from the task vectors): eigenvalues Λ of Ĝ, Q, B̂Q, and per anchor U0Q and Ŝ."""
    recs, proj = module_stats(work)
    for a in anchors:
        add_anchor(recs, proj, work, a)
    return recs, proj


def module_stats(work: Path) -> tuple[list[dict], object]:
    """The anchor-free part: per module Λ, Q, B̂Q (fp64 statistics and eigh), the base weight and m."""
    import torch
    from rich.progress import track

    from bmm_cli.workdir import load_project

    proj = load_project(work)
    layers = max(proj.plan.stack_layers.values())
    recs = []
    for blk in track(proj.plan.blocks, "fp64 statistics and eigh per module", console=None):
        reader = proj.reader(blk)
        b = proj.plan.block_group(blk, layers)
        for ref in blk.modules:
            taus = proj.taus(blk, ref, reader).to(torch.float64)
            T, d_out, d_in = taus.shape
            G = torch.zeros(d_in, d_in, dtype=torch.float64)
            B = torch.zeros(d_out, d_in, dtype=torch.float64)
            for u in taus:
                Gt = u.T @ u
                G += Gt
                B += u @ Gt
            m = float(torch.diagonal(G).sum()) / d_in
            lam, Q = torch.linalg.eigh(0.5 * (G + G.T) / m)
            ranks = [effective_ranks(u) for u in taus]
            recs.append({"row_pr": sum(x[0] for x in ranks), "row_erank": sum(x[1] for x in ranks),
                         "key": ref.key, "blk": blk, "ref": ref, "layer": b, "group": ref.group, "T": T,
                         "d_out": d_out, "d_in": d_in, "m": m, "lam": lam.clamp_min(0.0), "Q": Q.float(),
                         "BQ": ((B / m) @ Q).float(), "w0": proj.base_linear(ref).float(), "anchors": {}})
    return recs, proj


def spectral_ranks(ev) -> tuple[float, float]:
    """(participation ratio (Σe)²/Σe², entropy rank exp(-Σ p log p), p = e/Σe) of a non-negative spectrum ``ev``."""
    import torch

    ev = ev.clamp_min(0.0)
    tot = float(ev.sum())
    if tot <= 0:
        return 0.0, 0.0
    p = ev / tot
    nz = p[p > 0]
    return tot ** 2 / float(ev.square().sum()), math.exp(-float((nz * torch.log(nz)).sum()))


def effective_ranks(u) -> tuple[float, float]:
    """:func:`spectral_ranks` of the squared singular values of one task vector ``u`` (its rows' effective count)."""
    import torch

    g = u @ u.T if u.shape[0] <= u.shape[1] else u.T @ u
    return spectral_ranks(torch.linalg.eigvalsh(0.5 * (g + g.T)))


def add_anchor(recs: list[dict], proj, work: Path, anchor: str) -> None:
    """Per module of ``recs``: the anchor's U0Q, the evidence's c = Σ_j Z_ji² and Ŝ (fp64)."""
    import torch

    from bmm_cli.evidence import residual_energy
    from bmm_cli.workdir import AnchorStage

    st = AnchorStage(work, anchor)
    cur = None
    for r in recs:
        if cur is not r["blk"]:
            cur, ablk, reader = r["blk"], st.block(r["blk"]), proj.reader(r["blk"])
        taus = proj.taus(cur, r["ref"], reader).to(torch.float64)
        u0 = ablk.get(r["key"]).to(torch.float64)
        Q = r["Q"].double()
        U0Q = u0 @ Q
        Z = r["BQ"].double() - U0Q * r["lam"]
        r["anchors"][anchor] = {"U0Q": U0Q.float(), "c": (Z * Z).sum(0),
                                "S": residual_energy(taus, None, u0, r["m"], key=r["key"]),
                                "u0_norm2": float(u0.square().sum())}


def n_obs(rec: dict, rule: str) -> float:
    lam = rec["lam"]
    base = rec["T"] * rec["d_out"]
    if rule == "pr":
        return float(lam.sum() ** 2 / lam.square().sum())
    if rule == "rank":
        return float((lam > RANK_TOL * lam.max()).sum())
    if rule.startswith("n"):
        return base * float(rule[1:])
    return float(base)


def module_spectrum(rec: dict, anchor: str, N: float):
    """The module's evidence spectrum, exactly as the library builds it (fp64 rank decision included)."""
    from bmm_cli.evidence import spectrum_from_factors

    a = rec["anchors"][anchor]
    return spectrum_from_factors(rec["lam"], rec["BQ"], a["U0Q"], a["S"], N, key=rec["key"])


def module_lam(rec: dict, anchor: str, N: float) -> float | None:
    """The evidence λ, or None for a module without evidence (the library leaves it out of the per-layer means)."""
    from bmm_cli.evidence import evidence_lam, has_evidence

    sp = module_spectrum(rec, anchor, N)
    return evidence_lam(sp) if has_evidence(sp) else None


def marginal_weights(rec: dict, anchor: str, N: float):
    """p(λ_k | data) on a log grid (flat prior in log λ), from the profiled evidence."""
    import torch

    from bmm_cli.evidence import log_evidence

    global GRID
    if GRID is None:
        GRID = torch.logspace(-6, 2, 97, dtype=torch.float64)
    f = log_evidence(GRID, module_spectrum(rec, anchor, N))
    return torch.softmax(f, 0)


def parse_rule(rule: str) -> tuple[str, str]:
    """'fp64+aa' -> ('fp64', 'aa'); 'pr@0.9' -> ('pr', '0.9'); 'lib' -> ('lib', '1')."""
    if rule.endswith("+aa"):
        return rule[:-3], "aa"
    if "@" in rule:
        r, s = rule.split("@", 1)
        float(s)
        return r, s
    return rule, "1"


def implied_n(rec: dict, anchor: str, factor: float) -> float | None:
    """The N at which the module's evidence λ is ``factor`` × its λ at N = T·d_out. The evidence
    f(λ) = -½[N log R(λ) + Σ log(1 + Λ_i/λ)] is stationary where N·R'(λ)/R(λ) = Σ Λ_i/(λ(λ + Λ_i)), with
    R' = Σ c_i/(λ + Λ_i)², so N = R(λ)/R'(λ) · Σ Λ_i/(λ(λ + Λ_i)) at λ = factor·λ_ev (closed form). None for a
    module without evidence or whose λ sits at the edge of the evidence's λ range."""
    import torch

    from bmm_cli.evidence import LAM_RANGE, evidence_lam, has_evidence

    sp = module_spectrum(rec, anchor, float(rec["T"] * rec["d_out"]))
    if not has_evidence(sp):
        return None
    lam0 = evidence_lam(sp)
    if not (LAM_RANGE[0] * 1.01 < lam0 < LAM_RANGE[1] / 1.01):
        return None
    lam = torch.tensor(factor * lam0, dtype=torch.float64)
    den = lam + sp.lam
    R = sp.S - float((sp.c / den).sum())
    dR = float((sp.c / den.square()).sum())
    occ = float((sp.lam / (lam * den)).sum())
    if R <= 0 or dR <= 0:
        return None
    return R / dR * occ


def diagnose(recs: list[dict], anchors: list[str], factors: list[float]) -> dict:
    """Per anchor and factor: the N that makes the evidence λ that many times larger, against N = T·d_out and the
    measured effective ranks (participation ratio / entropy rank of Ĝ's spectrum, and the sum over tasks of each
    task vector's own effective rank): medians over modules of each count / (T·d_out), and per-group medians."""
    import statistics

    def med(xs):
        return round(statistics.median(xs), 5) if xs else None

    ranks = {}
    for r in recs:
        n0 = r["T"] * r["d_out"]
        pr, er = spectral_ranks(r["lam"])
        r["ratios"] = {"gram_pr": pr / n0, "gram_erank": er / n0, "rows_pr": r["row_pr"] / n0,
                       "rows_erank": r["row_erank"] / n0}
    for k in recs[0]["ratios"]:
        ranks[k] = {"all": med([r["ratios"][k] for r in recs])}
        for g in sorted({r["group"] for r in recs}):
            ranks[k][g] = med([r["ratios"][k] for r in recs if r["group"] == g])
    out = {"rank_over_n": ranks, "implied_n_over_n": {}}
    for anc in anchors:
        out["implied_n_over_n"][anc] = {}
        for f in factors:
            vals = {}
            for r in recs:
                n = implied_n(r, anc, f)
                if n is not None:
                    vals.setdefault(r["group"], []).append(n / (r["T"] * r["d_out"]))
            row = {"all": med([v for vs in vals.values() for v in vs]),
                   "modules": sum(len(v) for v in vals.values())}
            row.update({g: med(v) for g, v in sorted(vals.items())})
            out["implied_n_over_n"][anc][str(f)] = row
            _log(f"{anc} x{f:g}: implied N / (T·d_out) median {row['all']} over {row['modules']} modules")
    return out


def rule_lams(recs: list[dict], anchor: str, rule: str, lib: dict | None) -> dict[str, float]:
    """{module key: λ} of a λ rule (before pooling per (layer, group))."""
    from bmm_cli.evidence import fill_degenerate

    if rule == "lib":
        if lib is None:
            raise BenchError("rule lib needs the library's module λ (bmm_cli.evidence.module_lams)")
        return dict(lib[anchor])
    if rule.startswith("x"):
        k = float(rule[1:])
        return {key: v * k for key, v in rule_lams(recs, anchor, "fp64", lib).items()}
    rule = rule.removeprefix("marg-")  # the λ of the underlying rule (used for the params file only)
    lams = {r["key"]: module_lam(r, anchor, n_obs(r, rule)) for r in recs}
    return fill_degenerate({k: v for k, v in lams.items() if v is not None})


def pooled(work: Path, lams: dict[str, float]) -> dict[str, float]:
    from bmm_cli.default_params import params_per_layer

    return params_per_layer(work, lams, 1.0)


def merged_update(rec: dict, anchor: str, lam: float, weights=None):
    """U = (B̂Q + λU0Q) diag(1/(Λ+λ)) Qᵀ, or its average over the λ grid under ``weights``."""
    import torch

    a = rec["anchors"][anchor]
    L = rec["lam"]
    if weights is None:
        fb = 1.0 / (L + lam)
        fu = lam / (L + lam)
    else:
        den = L[None, :] + GRID[:, None]
        fb = (weights[:, None] / den).sum(0)
        fu = (weights[:, None] * GRID[:, None] / den).sum(0)
    UQ = rec["BQ"].double() * fb + a["U0Q"].double() * fu
    return (UQ @ rec["Q"].double().T).float() if UQ.numel() else torch.zeros_like(rec["w0"])


def apply_rule(model, recs: list[dict], anchor: str, params: dict, scale: str, marg_rule: str | None) -> dict:
    """Set every linear module of ``model`` to W0 + s·U; returns the per-layer scales used."""
    import torch

    ups = {}
    for r in recs:
        lam = params[f"lam_{r['layer']}_{r['group']}"]
        w = marginal_weights(r, anchor, n_obs(r, marg_rule)) if marg_rule else None
        ups[r["key"]] = merged_update(r, anchor, lam, w)
    layers = sorted({r["layer"] for r in recs})
    if scale == "aa":
        s = {}
        for b in layers:
            num = sum(r["anchors"][anchor]["u0_norm2"] for r in recs if r["layer"] == b)
            den = sum(float(ups[r["key"]].double().square().sum()) for r in recs if r["layer"] == b)
            s[b] = math.sqrt(num / den) if den > 0 else 1.0
    else:
        s = {b: float(scale) for b in layers}
    sd = model.state_dict()
    with torch.no_grad():
        for r in recs:
            sd[r["key"]].copy_(r["w0"] + s[r["layer"]] * ups[r["key"]])
    return s


# ------------------------------------------------------------------------------------------------ scoring

def score(model, data: dict) -> dict:
    return {d: window_losses(model, w) for d, w in data.items()}


def gap_closed(losses: dict, base: dict, expert: dict) -> tuple[float, dict]:
    """Mean over domains of (L_base - L)/(L_base - L_expert), and the per-window scaled terms for paired SEs."""
    per = {}
    gc = 0.0
    for d, w in losses.items():
        gap = float(base[d].mean() - expert[d].mean())
        per[d] = (base[d] - w) / gap
        gc += float(per[d].mean())
    return gc / len(losses), per


def paired(per1: dict, per2: dict) -> tuple[float, float]:
    diff, var = 0.0, 0.0
    for d, v in per1.items():
        x = v - per2[d]
        diff += float(x.mean())
        var += float(x.var(unbiased=True)) / len(x)
    k = len(per1)
    return diff / k, math.sqrt(var) / k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="the benchmark's work dir (taskvec and anchor stages)")
    ap.add_argument("--anchors", default="tsv,ta")
    ap.add_argument("--rules", default="lib,fp64,pr,rank,n0.01,x10,x100,fp64@0.9,fp64+aa,pr+aa,marg-pr")
    ap.add_argument("--domains")
    ap.add_argument("--limit", type=int, default=24, help="validation windows per domain")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--cache")
    ap.add_argument("--experts-dir", help="default <cache>/experts")
    ap.add_argument("--lib-modules", help="the library's module λ per anchor, a JSON path with {anchor} "
                    "(bench/decoder_bench.py lam writes PARAMS.modules.json); default: computed here")
    ap.add_argument("--wait-dir", help="wait for DIR/anchor-<m>.done before reading anchor m (the anchors are "
                    "made while the statistics are computed)")
    ap.add_argument("--params-dir", help="write each rule's params file (bmm solve --params) here")
    ap.add_argument("--implied-n", help="comma-separated λ factors: instead of scoring, write per anchor the N that "
                    "makes the evidence λ that many times larger, against measured effective ranks (no model loaded)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    set_threads(1)
    try:
        work, cache = Path(a.work), cache_dir(a.cache)
        if not (work / "taskvec").exists():
            raise BenchError(f"--work {work}: no taskvec stage (run bench/run_decoder.sh first)")
        anchors = [x for x in a.anchors.split(",") if x]
        rules = [x for x in a.rules.split(",") if x]
        for r in rules:
            parse_rule(r)
        if a.implied_n:
            factors = [float(x) for x in a.implied_n.split(",") if x]
            recs, proj = module_stats(work)
            for anc in anchors:
                add_anchor(recs, proj, work, anc)
            write_json(Path(a.out), {"work": str(work.resolve()), **diagnose(recs, anchors, factors)})
            return 0
        domains = parse_domains(a.domains)
        experts = Path(a.experts_dir) if a.experts_dir else cache / "experts"
        data = {d: load_windows(cache, d, "val", a.limit)[:, :a.tokens] for d in domains}
        out_path = Path(a.out)
        setting = {"split": "val", "limit": a.limit, "tokens": a.tokens, "domains": domains,
                   "windows": {d: int(w.shape[0]) for d, w in data.items()}, "work": str(work.resolve())}
        res = read_json(out_path) if out_path.exists() else {}
        if any(res.get(k) != v for k, v in setting.items()):
            res = {}  # another setting: nothing of it is reused
        res.update(setting)
        res.setdefault("rows", {})

        def done(rule: str, anc: str) -> bool:
            pf = Path(a.params_dir) / f"params-{rule}-{anc}.json" if a.params_dir else None
            return f"{rule}-{anc}" in res["rows"] and (pf is None or rule.startswith("marg-") or pf.exists())

        if all(done(r, anc) for anc in anchors for r in rules):
            _log(f"{out_path}: every rule already measured")
            return 0
        t0 = time.time()
        lib = None
        if "lib" in rules or any(r.startswith("lib") for r in rules):
            if a.lib_modules:  # bench/decoder_bench.py lam's per-module record of the same computation
                lib = {anc: read_json(Path(a.lib_modules.replace("{anchor}", anc)))["modules"] for anc in anchors}
            else:
                from bmm_cli.default_params import module_lams
                lib = module_lams(work, anchors, "free")
        recs, proj = module_stats(work)
        _log(f"statistics of {len(recs)} modules in {time.time() - t0:.0f} s")
        model = load_lm(base_dir(cache))
        base = score(model, data)
        expert = {}
        for d in domains:
            expert[d] = window_losses(load_lm(experts / d), data[d])
        _log("base " + " ".join(f"{d} {float(base[d].mean()):.4f}" for d in domains))
        res["base_loss"] = {d: float(base[d].mean()) for d in domains}
        res["expert_loss"] = {d: float(expert[d].mean()) for d in domains}
        for anc in anchors:
            flag = Path(a.wait_dir) / f"anchor-{anc}.done" if a.wait_dir else None
            while flag is not None and not flag.exists():
                time.sleep(10)
            add_anchor(recs, proj, work, anc)
        for anc in anchors:
            if all(done(r, anc) for r in rules):
                continue
            apply_rule(model, recs, anc, {f"lam_{r['layer']}_{r['group']}": 1e12 for r in recs}, "1", None)
            gc_a, per_a = gap_closed(score(model, data), base, expert)
            res["rows"][f"anchor-{anc}"] = {"gap_closed": round(gc_a, 4)}
            _log(f"anchor-{anc}: val gap closed {gc_a:.4f}")
            write_json(out_path, res)
            for rule in rules:
                if done(rule, anc):
                    continue
                name, scale = parse_rule(rule)
                t1 = time.time()
                lams = rule_lams(recs, anc, name, lib)
                params = pooled(work, lams)
                marg = name[len("marg-"):] if name.startswith("marg-") else None
                s = apply_rule(model, recs, anc, params, scale, marg)
                for b, v in s.items():
                    params[f"s_{b}"] = v
                gc, per = gap_closed(score(model, data), base, expert)
                diff, se = paired(per, per_a)
                vals = sorted(lams.values())
                row = {"gap_closed": round(gc, 4), "vs_anchor": {"diff": round(diff, 4), "se": round(se, 4)},
                       "lam_module": {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]},
                       "scale": {"min": round(min(s.values()), 4), "max": round(max(s.values()), 4)},
                       "seconds": round(time.time() - t1, 1)}
                res["rows"][f"{rule}-{anc}"] = row
                _log(f"{rule}-{anc}: val gap closed {gc:.4f}, vs anchor {diff:+.4f} ± {se:.4f}, λ median "
                     f"{row['lam_module']['median']:.3g}, s {row['scale']}")
                if a.params_dir and not marg:
                    write_json(Path(a.params_dir) / f"params-{rule}-{anc}.json", params)
                write_json(out_path, res)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

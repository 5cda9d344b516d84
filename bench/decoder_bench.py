"""Decoder benchmark driver: score models (cached), evidence-λ params files, and the report.

    python3 bench/decoder_bench.py score --run RUN NAME=MODEL_DIR ... [--split test] [--limit 16] [--tokens 32]
    python3 bench/decoder_bench.py lam --work W --anchor ta --gram free --scale 1.0 --out params.json
    python3 bench/decoder_bench.py report --run RUN --out bench/results [--config "k=v ..."]

`score` evaluates every model in one process (no interpreter start per model) into RUN/scores/NAME.json; a score is
reused while it is newer than the model's bmm_merge.json / model.safetensors and names the same directory. An
`expert-<domain>` row is scored on its own domain only (all the gap needs). `report` writes decoder.json, decoder.md
and decoder.png: loss per domain, gap closed (mean over domains of (L_base - L)/(L_base - L_expert)) and paired
standard errors on the same windows (each row against its anchor, and against the best reference merge).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BenchError, anchor_of, default_of, read_json, set_threads, write_json  # noqa: E402
from bench.decoder_common import (  # noqa: E402
    cache_dir,
    load_lm,
    load_windows,
    paired_se,
    parse_domains,
    window_token_losses,
)

REFERENCES = ("average", "anchor-ta", "anchor-ties", "anchor-tsv", "anchor-iso-cts")
PREFIX = 128  # scoring more tokens also records each window's loss on its first PREFIX tokens (`prefix/<domain>`)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stamp(model: Path) -> float:
    cands = [model / "bmm_merge.json", model / "model.safetensors", model / "config.json"]
    return max((p.stat().st_mtime for p in cands if p.exists()), default=0.0)


def _scored_as(f: Path) -> tuple | None:
    try:
        r = read_json(f)
    except (OSError, ValueError):
        return None
    return r.get("model"), r.get("split"), r.get("limit"), r.get("tokens")


def cmd_score(a) -> int:
    run, cache = Path(a.run), cache_dir(a.cache)
    domains = parse_domains(a.domains)
    (run / "scores").mkdir(parents=True, exist_ok=True)
    data = {d: load_windows(cache, d, a.split, a.limit)[:, :a.tokens] for d in domains}
    for spec in a.models:
        name, sep, path = spec.partition("=")
        if not sep:
            raise BenchError(f"score: {spec!r} is not NAME=MODEL_DIR")
        model_dir = Path(path)
        f = run / "scores" / f"{name}.json"
        if f.exists() and f.stat().st_mtime >= _stamp(model_dir) and \
                _scored_as(f) == (str(model_dir), a.split, a.limit, a.tokens):
            _log(f"{name}: cached")
            continue
        if not model_dir.is_dir():
            raise BenchError(f"score {name}: {model_dir} is not a model directory")
        t0 = time.time()
        model = load_lm(model_dir)
        mine = [name[len("expert-"):]] if name.startswith("expert-") else domains
        out = {"model": str(model_dir), "split": a.split, "limit": a.limit, "tokens": a.tokens}
        for d in mine:
            nll = window_token_losses(model, data[d])
            w = nll.mean(1)
            out[f"loss/{d}"] = float(w.mean())
            out[f"windows/{d}"] = w.tolist()
            if a.tokens > PREFIX:
                out[f"prefix/{d}"] = nll[:, :PREFIX - 1].mean(1).tolist()
        out["seconds"] = round(time.time() - t0, 1)
        write_json(f, out)
        _log(f"{name}: " + " ".join(f"{d} {out[f'loss/{d}']:.4f}" for d in mine) + f" ({out['seconds']} s)")
        del model
    return 0


def cmd_lam(a) -> int:
    """One params file per anchor (``--out`` holds ``{anchor}``), from one eigh per module for all anchors."""
    from bmm_cli.default_params import module_lams, params_per_layer

    anchors = a.anchor.split(",")
    if len(anchors) > 1 and "{anchor}" not in a.out:
        raise BenchError("lam: with several --anchor values, --out must contain {anchor}")
    res = module_lams(Path(a.work), anchors, a.gram, eps=a.eps, n_obs_scale=a.n_scale)
    summary = {}
    for anc, lams in res.items():
        out = Path(a.out.replace("{anchor}", anc))
        params = params_per_layer(Path(a.work), lams, a.scale, a.eps if a.gram == "hybrid" else None)
        vals = sorted(lams.values())
        info = {"lam_min": vals[0], "lam_median": vals[len(vals) // 2], "lam_max": vals[-1]}
        write_json(out.with_suffix(".modules.json"), {"modules": lams, **info})
        write_json(out, params)
        summary[anc] = info
    print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------------ report

def gap_stats(rows: dict, domains: list[str], allow_weak: bool = False) -> dict:
    """Per row: loss per domain, gap closed, and helpers for paired SEs (per-window scaled losses).

    An expert that is not better than the base on its own domain is an error (the benchmark is void), unless
    ``allow_weak`` (smoke runs): then that domain is left out of the gap closed and listed under ``weak``."""
    base = rows["base"]
    gaps, weak = {}, []
    for d in domains:
        e = rows.get(f"expert-{d}")
        if e is None:
            raise BenchError(f"report: no expert-{d} score")
        gap = base[f"loss/{d}"] - e[f"loss/{d}"]
        if gap <= 0:
            if not allow_weak:
                raise BenchError(f"report: expert-{d} is not better than the base on {d} (gap {gap:.4f})")
            weak.append(d)
            continue
        gaps[d] = gap
    if not gaps:
        raise BenchError("report: no expert beats the base on its own domain")
    scored = [d for d in domains if d in gaps]
    out = {}
    for name, r in rows.items():
        if name.startswith("expert-"):
            continue
        gc = sum((base[f"loss/{d}"] - r[f"loss/{d}"]) / gaps[d] for d in scored) / len(scored)
        out[name] = {"loss": {d: round(r[f"loss/{d}"], 4) for d in domains},
                     "mean_loss": round(sum(r[f"loss/{d}"] for d in domains) / len(domains), 4),
                     "gap_closed": round(gc, 4)}
    return {"gaps": gaps, "rows": out, "weak": weak, "scored": scored}


def paired_gap_se_parts(r1: dict, r2: dict, gaps: dict, domains: list[str], key: str = "windows") -> dict:
    """Each domain's share of the SE of gap_closed(r1) - gap_closed(r2): the SE of its mean window difference
    over its gap, divided by the number of domains (the shares add in quadrature)."""
    out = {}
    for d in domains:
        a, b = r1[f"{key}/{d}"], r2[f"{key}/{d}"]
        n = len(a)
        diff = [(y - x) / gaps[d] for x, y in zip(a, b)]  # (L2 - L1)/gap: positive when r1 is better
        mu = sum(diff) / n
        out[d] = math.sqrt(sum((x - mu) ** 2 for x in diff) / (n - 1) / n) / len(domains)
    return out


def paired_gap_se(r1: dict, r2: dict, gaps: dict, domains: list[str], key: str = "windows") -> float:
    """SE of gap_closed(r1) - gap_closed(r2) on the same windows (domains independent)."""
    return math.sqrt(sum(v * v for v in paired_gap_se_parts(r1, r2, gaps, domains, key).values()))


def se_sizing(rows: dict, st: dict, best_ref: str | None) -> dict | None:
    """The paired SE of every BMM row against its anchor and the best reference, with each domain's share; when
    every row was scored on more than PREFIX tokens, also the SE on each window's first PREFIX tokens only.
    None when there is no BMM row."""
    ds = st["scored"]

    def has_prefix(name: str, domains: list[str]) -> bool:
        return name in rows and all(f"prefix/{d}" in rows[name] for d in domains)

    names = [n for n in st["rows"] if n.startswith("bmm-")]
    prefix = (all(has_prefix(n, ds) for n in st["rows"]) and all(has_prefix(f"expert-{d}", [d]) for d in ds))
    if prefix:
        pre = {n: {k.replace("prefix/", "windows/"): v for k, v in r.items() if k.startswith("prefix/")}
               for n, r in rows.items()}
        for r in pre.values():
            r.update({k.replace("windows/", "loss/"): sum(v) / len(v) for k, v in list(r.items())})
        pgaps = {d: pre["base"][f"loss/{d}"] - pre[f"expert-{d}"][f"loss/{d}"] for d in ds}
    pairs = {}
    for n in names:
        for other in (anchor_of(n), best_ref):
            if other is None or other == n or other not in st["rows"]:
                continue
            parts = paired_gap_se_parts(rows[n], rows[other], st["gaps"], ds)
            pairs[f"{n} vs {other}"] = {"se": round(math.sqrt(sum(v * v for v in parts.values())), 4),
                                        "se_share": {d: round(v, 4) for d, v in parts.items()}}
            if prefix:
                pairs[f"{n} vs {other}"]["se_prefix"] = round(paired_gap_se(pre[n], pre[other], pgaps, ds), 4)
    if not pairs:
        return None
    med = sorted(p["se"] for p in pairs.values())
    out = {"pairs": pairs, "se_median": med[len(med) // 2], "se_min": med[0], "se_max": med[-1]}
    if prefix:
        medp = sorted(p["se_prefix"] for p in pairs.values())
        out.update(prefix_tokens=PREFIX, se_prefix_median=medp[len(medp) // 2])
    return out


def _row_order(p: Path) -> tuple:
    n = p.stem
    head = ["base", "average", "anchor-ta", "anchor-ties", "anchor-tsv", "anchor-iso-cts"]
    return (head.index(n), "") if n in head else (len(head), n)


def cmd_report(a) -> int:
    run, out_dir = Path(a.run), Path(a.out)
    domains = parse_domains(a.domains)
    rows = {p.stem: read_json(p) for p in sorted((run / "scores").glob("*.json"), key=_row_order)
            if p.stem != "timings"}
    st = gap_stats(rows, domains, a.allow_weak)
    refs = [r for r in REFERENCES if r in st["rows"]]
    best_ref = max(refs, key=lambda r: st["rows"][r]["gap_closed"]) if refs else None
    for name, r in st["rows"].items():
        anc = anchor_of(name)
        if anc in rows:
            r["vs_anchor"] = {"anchor": anc, "diff": round(r["gap_closed"] - st["rows"][anc]["gap_closed"], 4),
                              "se": round(paired_gap_se(rows[name], rows[anc], st["gaps"], st["scored"]),
                                          4)}
        summ = run / "scores" / f"{name}.summary"
        if summ.exists() and summ.stat().st_size:  # a search row: its validation record (bmm search --json)
            sj = read_json(summ)
            r["search"] = {k: sj.get(k) for k in ("trials", "best_trial", "first_score", "best_score", "best_params")}
        dflt = default_of(name)
        if dflt in rows:
            r["vs_default"] = {"default": dflt, "diff": round(r["gap_closed"] - st["rows"][dflt]["gap_closed"], 4),
                               "se": round(paired_gap_se(rows[name], rows[dflt], st["gaps"], st["scored"]), 4)}
        if best_ref and name != best_ref:
            r["vs_best_reference"] = {"reference": best_ref,
                                      "diff": round(r["gap_closed"] - st["rows"][best_ref]["gap_closed"], 4),
                                      "se": round(paired_gap_se(rows[name], rows[best_ref], st["gaps"],
                                                                st["scored"]), 4)}
    experts = {d: round(rows[f"expert-{d}"][f"loss/{d}"], 4) for d in domains}
    gain_se = {d: round(paired_se(rows["base"][f"windows/{d}"], rows[f"expert-{d}"][f"windows/{d}"]), 4)
               for d in domains}
    res = {"benchmark": "decoder (SmolLM2-135M-Instruct, 4 Debian text domains)", "domains": domains,
           "expert_own_loss": experts, "gap": {d: round(v, 4) for d, v in st["gaps"].items()},
           "weak_experts": st["weak"],
           "gap_se": gain_se, "windows_per_domain": len(rows["base"][f"windows/{domains[0]}"]),
           "rows": st["rows"], "best_reference": best_ref, "config": a.config,
           "machine": "2 CPU cores shared with other jobs; times are wall clock"}
    sizing = se_sizing(rows, st, best_ref)
    if sizing:
        res["se_sizing"] = sizing
    extra = run / "scores" / "timings.json"
    if extra.exists():
        res["timings"] = read_json(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "decoder.json", res)
    (out_dir / "decoder.md").write_text(markdown(res), encoding="utf-8")
    plot(res, out_dir / "decoder.png")
    print(json.dumps({k: v["gap_closed"] for k, v in res["rows"].items()}))
    return 0


def markdown(res: dict) -> str:
    ds = res["domains"]
    lines = ["| row | " + " | ".join(f"loss {d}" for d in ds) + " | gap closed | vs anchor (± paired SE) | "
             f"vs {res['best_reference']} | vs default |", "|---|" + "---:|" * (len(ds) + 4)]
    lines.append("| base − expert (own domain), ± paired SE | " + " | ".join(
        f"{res['gap'].get(d, float('nan')):.3f} ± {res['gap_se'][d]:.3f}" for d in ds) + " | | | | |")
    lines.append("| expert (own domain) | " + " | ".join(f"{res['expert_own_loss'][d]:.4f}" for d in ds)
                 + " | 1 | | | |")

    def vs(v):
        return f"{v['diff']:+.3f} ± {v['se']:.3f}" if v else ""

    for name, r in res["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['loss'][d]:.4f}" for d in ds) + f" | {r['gap_closed']:.3f} | "
                     + " | ".join(vs(r.get(k)) for k in ("vs_anchor", "vs_best_reference", "vs_default")) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["rows"])
    vals = [res["rows"][n]["gap_closed"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    colors = ["tab:gray" if not n.startswith("bmm") else "tab:blue" for n in names]
    ax.barh(range(len(names)), vals, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("gap closed on test (1 = each expert on its own domain)")
    ax.set_title("Decoder benchmark: SmolLM2-135M, 4 domain experts")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--run", required=True)
    s.add_argument("--split", choices=("val", "test"), default="test")
    s.add_argument("--limit", type=int, default=16)
    s.add_argument("--tokens", type=int, default=32)
    s.add_argument("--domains")
    s.add_argument("--cache")
    s.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    l_ = sub.add_parser("lam")
    l_.add_argument("--work", required=True)
    l_.add_argument("--anchor", required=True, help="an anchor, or several comma-separated")
    l_.add_argument("--gram", choices=("free", "data", "hybrid"), required=True)
    l_.add_argument("--scale", type=float, default=1.0)
    l_.add_argument("--eps", type=float)
    l_.add_argument("--n-scale", type=float, default=1.0, help="multiply the evidence's N (a study knob)")
    l_.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--run", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--domains")
    r.add_argument("--config", default="")
    r.add_argument("--allow-weak", action="store_true", help="smoke runs: leave out domains whose expert is not better")
    a = ap.parse_args(argv)
    set_threads(1)  # one thread: on a loaded 2-core machine two threads were 4x slower per step (sync waits)
    try:
        return {"score": cmd_score, "lam": cmd_lam, "report": cmd_report}[a.cmd](a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

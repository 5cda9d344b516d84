"""The stage-time model of ``bmm plan``: its operation counts on hand-made shapes, and the plan's report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bmm_cli.budget import Module
from bmm_cli.timing import Rates, calibrate, estimate, fmt_seconds

UNIT = Rates(gemm64=1.0, eigh64=1.0, svd32=1.0, elementwise=1.0, device="cpu", threads=1)


def test_counts_of_one_module_by_hand():
    """o = 2, i = 8, T = 3 (the wide case: the evidence decomposes the 6 × 6 side)."""
    o, i, T = 2, 8, 3
    s = estimate([Module("m", o, i)], T, anchor="tsv", gram="free", search=True, input_bytes=10**9, rates=UNIT)
    stats = T * (2 * o * i * i + 4 * o * i * min(o, i))  # ΣUᵀU and ΣUUᵀU per expert
    assert s["taskvec"] == pytest.approx(10**9 / 5e8)
    assert "gram-free" not in s  # the data-free statistics are the solve's own
    assert s["anchor-tsv"] == (T + 2) * i * o * o  # T + 2 SVDs of max·min²
    n = T * o
    assert s["evidence"] == n**3 + 2 * n * n * i + T * 2 * o * o * i + 2 * o * n * n
    assert s["solve"] == pytest.approx(stats + i**3 / 3 + 2 * o * i * i)
    assert s["factors-tsv-free"] == stats + i**3 + 4 * o * i * i
    tall = estimate([Module("m", 8, 2)], T, anchor="ta", gram="free", rates=UNIT)
    assert tall["evidence"] == 2**3 + T * 4 * 8 * 2 * 2 + 2 * 8 * 2 * 2  # eigh of Ĝ [2, 2] itself
    assert tall["anchor-ta"] == 6 * T * 8 * 2


def test_the_evidence_of_large_modules_is_counted_in_fp32():
    """From an eigh of FP32_MIN_SIDE up, free_spectra runs in fp32: the same counts at FP32_SPEEDUP x the rate."""
    from bmm_cli.evidence import FP32_MIN_SIDE
    from bmm_cli.timing import FP32_SPEEDUP

    i, T = 2 * FP32_MIN_SIDE, 3
    below, at = (estimate([Module("m", o, i)], T, anchor="ta", rates=UNIT)["evidence"]
                 for o in (FP32_MIN_SIDE // T - 1, FP32_MIN_SIDE // T + 1))
    n_b, n_a = T * (FP32_MIN_SIDE // T - 1), T * (FP32_MIN_SIDE // T + 1)
    o_b, o_a = n_b // T, n_a // T
    assert below == n_b**3 + 2 * n_b * n_b * i + T * 2 * o_b * o_b * i + 2 * o_b * n_b * n_b
    assert at == pytest.approx((n_a**3 + 2 * n_a * n_a * i + T * 2 * o_a * o_a * i + 2 * o_a * n_a * n_a)
                               / FP32_SPEEDUP)


def test_stages_follow_the_merge():
    mods = [Module("a", 16, 16, 0), Module("b", 64, 16, 0)]
    hybrid = estimate(mods, 2, anchor="wudi", gram="data", evidence=False, rates=UNIT)
    assert "gram-free" not in hybrid and "evidence" not in hybrid and hybrid["anchor-wudi"] is None
    small, big = (estimate(mods, T, anchor="iso-cts", rates=UNIT) for T in (2, 5))
    assert all(big[k] > small[k] for k in ("anchor-iso-cts", "evidence", "solve"))
    assert [fmt_seconds(x) for x in (None, 12, 600, 7200, 10**6)] == ["no estimate", "12 s", "10 min", "2.0 h",
                                                                       "11.6 days"]


def test_calibration_measures_positive_rates():
    r = calibrate("cpu")
    assert min(r.gemm64, r.eigh64, r.svd32, r.elementwise) > 0 and r.threads >= 1


def test_plan_reports_the_time(family):
    base, experts = family("llama")
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", "plan", "-b", str(base), *sum([["-e", str(e)]
                        for e in experts], []), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    t = json.loads(p.stdout)["time"]
    assert set(t["seconds"]) == {"taskvec", "anchor-tsv", "evidence", "solve", "factors-tsv-free"}
    assert t["merge_total"] == pytest.approx(sum(v for k, v in t["seconds"].items() if not k.startswith("factors")))
    p = subprocess.run([sys.executable, "-m", "bmm_cli.cli", "plan", "-b", str(base), *sum([["-e", str(e)]
                        for e in experts], [])], capture_output=True, text=True)
    assert "time of the same merge on this machine" in p.stdout and "merge total" in p.stdout

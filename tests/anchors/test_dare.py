"""DARE and DARE-TIES: reproducible, order-independent masks, unbiased rescaling, and the DARE-TIES threshold on the
dropped vectors."""

from __future__ import annotations

import random

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors import dare as dare_mod
from bmm_cli.anchors import ties as ties_mod

from ._util import randn


def test_mul32_is_exact_modular_multiplication():
    rnd = random.Random(3)
    xs = [rnd.randrange(2**32) for _ in range(200)] + [0, 1, 2**32 - 1]
    x = torch.tensor(xs, dtype=torch.int64)
    for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 2**32 - 1):
        assert dare_mod._mul32(x, c).tolist() == [(v * c) % 2**32 for v in xs]


def test_mask_is_reproducible_and_depends_on_seed_key_task():
    m = dare_mod.keep_mask(0, "a.weight", 0, 0, 4000, 0.9, "cpu")
    assert torch.equal(m, dare_mod.keep_mask(0, "a.weight", 0, 0, 4000, 0.9, "cpu"))
    for other in (
        dare_mod.keep_mask(1, "a.weight", 0, 0, 4000, 0.9, "cpu"),
        dare_mod.keep_mask(0, "b.weight", 0, 0, 4000, 0.9, "cpu"),
        dare_mod.keep_mask(0, "a.weight", 1, 0, 4000, 0.9, "cpu"),
    ):
        assert not torch.equal(m, other)
        assert (m & other).sum() < 0.02 * 4000 + 40  # independent-looking: overlap about 1 %


def test_mask_is_independent_of_chunking_and_order():
    full = dare_mod.keep_mask(5, "k", 2, 0, 1000, 0.7, "cpu")
    starts = (900, 0, 300, 100, 500, 200, 800, 400, 700, 600)
    parts = [dare_mod.keep_mask(5, "k", 2, a, 100, 0.7, "cpu") for a in starts]
    assert torch.equal(torch.cat([parts[i] for i in (1, 3, 5, 2, 7, 4, 9, 8, 6, 0)]), full)
    # a high flat index (> 2^32) is handled and gives a different pattern than its low 32 bits alone
    hi = dare_mod.keep_mask(5, "k", 2, 2**32, 1000, 0.7, "cpu")
    assert not torch.equal(hi, full)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_neighbour_independence(p):
    n = 50_000
    m = dare_mod.keep_mask(11, "x", 0, 0, n, p, "cpu").double()
    q = 1 - p
    assert abs(m.mean().item() - q) < 5 * (q * p / n) ** 0.5
    # adjacent entries: correlation ~ 0
    c = ((m[1:] - q) * (m[:-1] - q)).mean().item() / (q * p)
    assert abs(c) < 5 / n**0.5


def test_rescaled_drop_is_unbiased_over_seeds(gen):
    taus = randn(gen, 2, 6, 5)
    for p, seeds in ((0.5, 400), (0.9, 1500)):
        acc = torch.zeros_like(taus)
        for s in range(seeds):
            d = dare_mod.drop("w", taus, p, s)
            kept = d != 0
            # survivors are exactly tau / (1 - p), the rest exactly 0
            assert torch.equal(d[kept], taus[kept] * torch.tensor(1 / (1 - p), dtype=taus.dtype))
            acc += d
        mean = acc / seeds
        sd = taus.abs() * (p / (1 - p) / seeds) ** 0.5  # std of the mean per entry
        assert ((mean - taus).abs() <= 5 * sd + 1e-12).all()


def test_dare_module_and_other(gen):
    m = get_method("dare")
    taus, base = randn(gen, 3, 5, 4), randn(gen, 5, 4)
    opts = parse_options(m, ["p=0.6", "lam=0.8", "seed=4"])
    u0 = m.module(ModuleInput("blk.w", taus, base), opts, None, "cpu")
    expected = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(3):
        mask = dare_mod.keep_mask(4, "blk.w", t, 0, 20, 0.6, "cpu").reshape(5, 4)
        expected += 0.8 * torch.where(mask, taus[t] / 0.4, 0.0)
    torch.testing.assert_close(u0, expected, rtol=1e-15, atol=1e-15)
    assert 0 < (u0 != 0).sum() < 20
    b, tv = randn(gen, 7), randn(gen, 3, 7)
    torch.testing.assert_close(m.other("norm", b, tv, opts, None), b + 0.8 * dare_mod.drop("norm", tv, 0.6, 4).sum(0))


def test_p_zero_reduces_to_ta_and_ties(gen):
    taus, base = randn(gen, 3, 4, 6), randn(gen, 4, 6)
    inp = ModuleInput("w", taus, base)
    ta = get_method("ta").module(inp, None, None, "cpu")
    dare = get_method("dare").module(inp, parse_options(get_method("dare"), ["p=0"]), None, "cpu")
    torch.testing.assert_close(dare, ta, rtol=0, atol=0)
    it = lambda: iter([("w", taus)])  # noqa: E731
    ties, dt = get_method("ties"), get_method("dare-ties")
    o_dt = parse_options(dt, ["p=0"])
    a = ties.module(inp, None, ties.prepare(None, it, 3), "cpu")
    b = dt.module(inp, o_dt, dt.prepare(o_dt, it, 3), "cpu")
    torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dare_ties_threshold_is_kthvalue_of_dropped_vectors_and_merge_matches(gen, dtype, monkeypatch):
    monkeypatch.setattr(ties_mod, "_CHUNK", 50)  # the prepass sees chunks, module() whole tensors
    T, p, k, seed = 3, 0.5, 0.3, 9
    tensors = {"blk.0.w": randn(gen, T, 8, 6, dtype=dtype), "norm.w": randn(gen, T, 9, dtype=dtype)}
    m = get_method("dare-ties")
    opts = parse_options(m, [f"p={p}", f"k={k}", f"seed={seed}"])
    st = ties_mod.TopK(**m.prepare(opts, lambda: iter(list(tensors.items())), T))
    # reference: drop each tensor whole, concatenate, kthvalue
    dropped = {key: dare_mod.drop(key, v, p, seed) for key, v in tensors.items()}
    flat = torch.cat([v.reshape(T, -1).double() for v in dropped.values()], dim=1)
    N, K = flat.shape[1], int(k * flat.shape[1])
    thr = [torch.kthvalue(flat[t].abs(), N - K + 1).values.item() for t in range(T)]
    assert st.total == N and st.k_keep == K and st.thresholds == thr
    # iteration order does not matter
    reordered = ties_mod.TopK(**m.prepare(opts, lambda: iter(list(tensors.items())[::-1]), T))
    assert (reordered.thresholds, reordered.kept, reordered.majority) == (st.thresholds, st.kept, st.majority)
    # merge: TIES (majority rule) on the dropped vectors
    trimmed = torch.stack([flat[t] * (flat[t].abs() >= thr[t]) for t in range(T)])
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = 1.0 if torch.sign(trimmed.sum(0)).sum() > 0 else -1.0
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    base_w = randn(gen, 8, 6, dtype=dtype)
    u0 = m.module(ModuleInput("blk.0.w", tensors["blk.0.w"], base_w), opts, st, "cpu")
    tol = dict(rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-15)
    torch.testing.assert_close(u0.double(), merged[:48].reshape(8, 6), **tol)
    base_n = randn(gen, 9, dtype=dtype)
    w = m.other("norm.w", base_n, tensors["norm.w"], opts, st)
    torch.testing.assert_close(w.double(), base_n.double() + merged[48:], **tol)


def test_chunked_drop_equals_whole_drop(gen):
    taus = randn(gen, 2, 7, 9)
    whole = dare_mod.drop("w", taus, 0.8, 3)
    torch.testing.assert_close(dare_mod.drop("w", taus, 0.8, 3, chunk=10), whole, rtol=0, atol=0)

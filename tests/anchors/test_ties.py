"""TIES: a hand-made case, the streamed global threshold against torch.kthvalue over the concatenation, and the
whole merge against a direct transcription of the reference algorithm on the flattened model."""

from __future__ import annotations

import json

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors import ties as ties_mod
from bmm_cli.errors import InputError, NumericError

from ._util import randn


def _iter(tensors):
    calls = []

    def iter_all():
        calls.append(1)
        return iter(list(tensors.items()))

    return iter_all, calls


def test_hand_made_trim_elect_disjoint_mean():
    # k = 0.6 of N = 5 -> K = 3 per task. Task 3 has a tie at its 3rd largest |tau| (three 2s): 4 kept.
    taus = torch.tensor(
        [
            [4.0, -1.0, 2.0, 0.5, -3.0],  # keeps 4, 2, -3
            [-2.0, 3.0, 1.0, -4.0, 0.1],  # keeps -2, 3, -4
            [2.0, -2.0, -5.0, 2.0, 0.2],  # keeps 2, -2, -5, 2 (tie)
        ],
        dtype=torch.float64,
    )
    m = get_method("ties")
    opts = parse_options(m, ["k=0.6", "lam=0.5"])
    it, _ = _iter({"w": taus})
    st = ties_mod.TopK(**m.prepare(opts, it, 3))
    assert (st.total, st.k_keep, st.thresholds, st.kept, st.extra) == (5, 3, [2.0, 2.0, 2.0], [3, 3, 4], [0, 0, 1])
    # sums 4, 1, -3, -2, -3 -> signs + + - - -; agreeing means 3, 3, -5, -4, -3
    expected = 0.5 * torch.tensor([3.0, 3.0, -5.0, -4.0, -3.0], dtype=torch.float64)
    base = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(m.other("w", base, taus, opts, st), base + expected, rtol=0, atol=0)
    u0 = m.module(ModuleInput("w", taus.reshape(3, 1, 5), base.reshape(1, 5)), opts, st, "cpu")
    torch.testing.assert_close(u0, expected.reshape(1, 5), rtol=0, atol=0)


@pytest.mark.parametrize(
    "last, majority, pos, none",
    [
        (3.0, [1.0, 1.0, 3.0], [1.0, 1.0, 3.0], [0.0, 0.0, 3.0]),
        (-3.0, [-1.0, -1.0, -3.0], [1.0, 1.0, -3.0], [0.0, 0.0, -3.0]),
    ],
)
def test_zero_sum_sign_rules(last, majority, pos, none):
    # entries 0 and 1 cancel exactly; the model-wide majority of elected signs is the sign of entry 2
    taus = torch.tensor([[1.0, -1.0, last], [-1.0, 1.0, last]], dtype=torch.float64)
    m = get_method("ties")
    for rule, want in (("majority", majority), ("positive", pos), ("none", none)):
        opts = parse_options(m, ["k=1", f"zero_sign={rule}"])
        st = m.prepare(opts, _iter({"w": taus})[0], 2)
        assert st["majority"] == (1.0 if last > 0 else -1.0 if rule == "majority" else 1.0)
        out = m.other("w", torch.zeros(3, dtype=torch.float64), taus, opts, st)
        assert out.tolist() == want, rule


def _model(gen, dtypes):
    """Mixed shapes, many ties (values on a 0.25 grid), one fp64 tensor with continuous values, an int tensor."""
    T = 3
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i, dt in enumerate(dtypes):
        shape = [(5, 7), (11,), (2, 3, 4), (1,)][i % 4]
        grid = torch.randint(-8, 9, (T, *shape), generator=g).to(torch.float64) * 0.25
        tensors[f"t{i}"] = grid.to(dt)
    tensors["pos"] = torch.arange(6).expand(T, 6)
    return tensors


def _kth_reference(tensors, k):
    flat = torch.cat([v.reshape(v.shape[0], -1).double() for v in tensors.values() if v.is_floating_point()], dim=1)
    N = flat.shape[1]
    K = int(k * N)
    thr, kept = [], []
    for t in range(flat.shape[0]):
        a = flat[t].abs()
        if K == 0:
            thr.append(float("inf"))
            kept.append(0)
            continue
        v = torch.kthvalue(a, N - K + 1).values.item()  # the K-th largest
        thr.append(v)
        kept.append(int((a >= v).sum()))
    return N, K, thr, kept


@pytest.mark.parametrize(
    "dtypes, passes",
    [
        ([torch.bfloat16] * 3, 1),
        ([torch.float32, torch.float32, torch.float32, torch.float32], 2),
        ([torch.float16, torch.bfloat16, torch.float32], 2),
        ([torch.float64, torch.float32, torch.bfloat16], 6),
    ],
)
@pytest.mark.parametrize("k", [0.0, 0.03, 0.2, 0.5, 1.0])
def test_streamed_threshold_equals_kthvalue_over_concatenation(gen, dtypes, passes, k, monkeypatch):
    monkeypatch.setattr(ties_mod, "_CHUNK", 64)  # several chunks per tensor and per task
    tensors = _model(gen, dtypes)
    if torch.float64 in dtypes:  # continuous values too, including near-duplicates in the low bits
        x = randn(gen, 3, 13)
        x[:, :3] = x[:, 3:6] * (1 + 2**-40)
        tensors["f64"] = x
    it, calls = _iter(tensors)
    st = ties_mod.global_topk_thresholds(it, 3, k)
    N, K, thr, kept = _kth_reference(tensors, k)
    assert (st.total, st.k_keep, st.thresholds, st.kept) == (N, K, thr, kept)
    assert len(calls) == st.passes == (1 if K == 0 else passes)
    assert any(e > 0 for e in st.extra) or K == 0 or k == 1.0  # the grid makes ties at the threshold


def test_threshold_of_dare_like_sparse_vectors_is_zero_and_keeps_every_nonzero():
    taus = torch.zeros(2, 20, dtype=torch.float32)
    taus[0, :3] = torch.tensor([1.0, -2.0, 3.0])
    taus[1, 5] = -7.0
    st = ties_mod.global_topk_thresholds(_iter({"w": taus})[0], 2, 0.5)
    assert st.thresholds == [0.0, 0.0] and st.kept == [20, 20]


def test_threshold_between_float32_neighbours_compares_exactly():
    # an fp64 tensor sets a threshold that is not a float32; float32 entries just below/above must be decided right
    thr = 1.0 + 2**-30
    x32 = torch.tensor([[1.0, 1.0 + 2**-23]], dtype=torch.float32)  # 1.0 < thr < 1 + 2^-23
    assert ties_mod.keep_mask(x32.abs(), thr).tolist() == [[False, True]]
    assert ties_mod.keep_mask(torch.tensor([thr, 1.0], dtype=torch.float64), thr).tolist() == [True, False]


def _reference_ties(tensors, k, lam):
    """The reference algorithm on the flattened model (majority rule for zero sums), with K = floor(k N)."""
    keys = [key for key, v in tensors.items() if v.is_floating_point()]
    flat = torch.cat([tensors[key].reshape(tensors[key].shape[0], -1).double() for key in keys], dim=1)
    N = flat.shape[1]
    K = int(k * N)
    kth = torch.kthvalue(flat.abs(), N - K + 1, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    sel = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    merged = lam * sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).double(), min=1)
    out, a = {}, 0
    for key in keys:
        n = tensors[key][0].numel()
        out[key] = merged[a : a + n].reshape(tensors[key].shape[1:])
        a += n
    return out


@pytest.mark.parametrize("k, lam", [(0.2, 1.0), (0.55, 0.7)])
def test_merge_matches_reference_over_whole_model(gen, k, lam):
    T = 4
    tensors = {
        "blocks.0.attn.q.weight": randn(gen, T, 6, 4),
        "blocks.0.mlp.fc1.weight": randn(gen, T, 9, 4),
        "norm.weight": randn(gen, T, 4),
        "emb.weight": torch.round(randn(gen, T, 5, 4) * 4) / 4,  # ties and exact cancellations
    }
    m = get_method("ties")
    opts = parse_options(m, [f"k={k}", f"lam={lam}"])
    st = json.loads(json.dumps(m.prepare(opts, _iter(tensors)[0], T)))  # the state survives a JSON manifest
    ref = _reference_ties(tensors, k, lam)
    for key in ("blocks.0.attn.q.weight", "blocks.0.mlp.fc1.weight"):
        base = randn(gen, *tensors[key].shape[1:])
        u0 = m.module(ModuleInput(key, tensors[key], base), opts, st, "cpu")
        torch.testing.assert_close(u0, ref[key], rtol=0, atol=1e-15)
    for key in ("norm.weight", "emb.weight"):
        base = randn(gen, *tensors[key].shape[1:])
        torch.testing.assert_close(m.other(key, base, tensors[key], opts, st), base + ref[key], rtol=0, atol=1e-15)


def test_missing_or_mismatching_state_is_an_input_error(gen):
    m = get_method("ties")
    taus, base = randn(gen, 2, 3, 3), randn(gen, 3, 3)
    with pytest.raises(InputError, match="prepare"):
        m.module(ModuleInput("w", taus, base), None, None, "cpu")
    st = m.prepare(None, _iter({"w": randn(gen, 3, 3, 3)})[0], 3)
    with pytest.raises(InputError, match="3 tasks"):
        m.module(ModuleInput("w", taus, base), None, st, "cpu")
    with pytest.raises(InputError, match="not a TIES state"):
        m.module(ModuleInput("w", taus, base), None, {"thresholds": [1.0, 1.0]}, "cpu")
    with pytest.raises(InputError, match="expected 2"):
        m.prepare(None, _iter({"w": randn(gen, 3, 3, 3)})[0], 2)


def test_nan_in_prepass_is_a_numeric_error(gen):
    x = randn(gen, 2, 4)
    x[1, 1] = float("inf")
    with pytest.raises(NumericError, match="bad.key"):
        get_method("ties").prepare(None, _iter({"bad.key": x})[0], 2)

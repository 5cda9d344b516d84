"""TSV-Merge against a direct transcription of the reference (zero-padded stacks), plus its structural facts."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options
from bmm_cli.anchors._spectral import polar_factor
from bmm_cli.anchors.tsv import tsv_rank

from ._util import lora_stack, polar, randn


def _reference_tsv(taus):
    """The reference's compute_and_sum_svd_mem_reduction for one key, stacks padded with zeros."""
    T, d_out, d_in = taus.shape
    r = max(1, min(d_out, d_in) // T)
    width = max(min(d_out, d_in), T * r)
    sum_u = torch.zeros(d_out, width, dtype=taus.dtype)
    sum_s = torch.zeros(width, dtype=taus.dtype)
    sum_v = torch.zeros(width, d_in, dtype=taus.dtype)
    for i in range(T):
        u, s, v = torch.linalg.svd(taus[i], full_matrices=False)
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_v[i * r : (i + 1) * r, :] = v[:r, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


@pytest.mark.parametrize("T, d_out, d_in", [(2, 7, 4), (3, 4, 9), (4, 8, 8), (5, 12, 10), (4, 3, 5), (7, 6, 2)])
def test_matches_reference(gen, T, d_out, d_in):
    taus, base = randn(gen, T, d_out, d_in), randn(gen, d_out, d_in)
    m = get_method("tsv")
    u0 = m.module(ModuleInput("w", taus, base), parse_options(m, ["alpha=0.7"]), None, "cpu")
    torch.testing.assert_close(u0, 0.7 * _reference_tsv(taus), rtol=0, atol=1e-12)


def test_rank_rule():
    assert tsv_rank(4096, 4096, 8) == 512 and tsv_rank(1024, 4096, 20) == 51
    assert tsv_rank(3, 5, 4) == 1 and tsv_rank(49, 60, 49) == 1  # at least one direction per task


@pytest.mark.parametrize("d_out, d_in", [(6, 4), (3, 8), (5, 5)])
def test_one_task_reproduces_full_rank_truncation(gen, d_out, d_in):
    tau = randn(gen, 1, d_out, d_in)
    u0 = get_method("tsv").module(ModuleInput("w", tau, tau[0]), None, None, "cpu")
    torch.testing.assert_close(u0, tau[0], rtol=0, atol=1e-13)  # r = min(d_out, d_in): the whole SVD


def test_orthogonal_tasks_give_sum_of_truncations(gen):
    # tasks on disjoint row and column blocks: stacks are already orthonormal, Δ = Σ_t (rank-r truncation of τ_t)
    T, d = 3, 9
    taus = torch.zeros(T, d, d, dtype=torch.float64)
    for t in range(T):
        taus[t, 3 * t : 3 * t + 3, 3 * t : 3 * t + 3] = randn(gen, 3, 3)
    r = tsv_rank(d, d, T)
    expected = torch.zeros(d, d, dtype=torch.float64)
    for t in range(T):
        u, s, vh = torch.linalg.svd(taus[t])
        expected += u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    u0 = get_method("tsv").module(ModuleInput("w", taus, taus[0]), None, None, "cpu")
    torch.testing.assert_close(u0, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("T, d_out, d_in", [(3, 10, 7), (2, 5, 9)])
def test_orthonormal_factors_keep_the_stacked_spectrum(gen, T, d_out, d_in):
    taus = randn(gen, T, d_out, d_in)
    r = tsv_rank(d_out, d_in, T)
    stack_u = torch.cat([torch.linalg.svd(taus[t], full_matrices=False)[0][:, :r] for t in range(T)], dim=1)
    q = polar_factor(stack_u)
    torch.testing.assert_close(q.T @ q, torch.eye(T * r, dtype=torch.float64), rtol=0, atol=1e-13)
    # Δ = U⊥ diag(S) V⊥ᵀ with orthonormal U⊥, V⊥ has exactly the stacked S as its nonzero singular values
    s_stack = torch.cat([torch.linalg.svdvals(taus[t])[:r] for t in range(T)])
    u0 = get_method("tsv").module(ModuleInput("w", taus, taus[0]), None, None, "cpu")
    sv = torch.linalg.svdvals(u0)
    torch.testing.assert_close(sv[: T * r], s_stack.sort(descending=True).values, rtol=0, atol=1e-12)
    assert sv[T * r :].abs().max() < 1e-12 if sv.numel() > T * r else True


def test_wide_stack_has_orthonormal_rows(gen):
    m = randn(gen, 3, 5)
    q = polar_factor(m)
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(q, polar(m), rtol=0, atol=1e-13)


def test_rank_deficient_tasks_drop_null_directions(gen):
    # rank-1 task vectors (think LoRA): only the true directions enter the orthogonalization
    d, T = 6, 2
    a = [randn(gen, d) for _ in range(T)]
    b = [randn(gen, d) for _ in range(T)]
    a = [x / x.norm() for x in a]
    b = [x / x.norm() for x in b]
    s = [2.0, 0.5]
    taus = torch.stack([s[t] * torch.outer(a[t], b[t]) for t in range(T)])
    expected = polar(torch.stack(a, 1)) @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ polar(torch.stack(b, 1)).T
    u0 = get_method("tsv").module(ModuleInput("w", taus, taus[0]), None, None, "cpu")
    torch.testing.assert_close(u0, expected, rtol=0, atol=1e-12)
    zero = get_method("tsv").module(ModuleInput("w", torch.zeros(2, 3, 4), torch.zeros(3, 4)), None, None, "cpu")
    assert torch.equal(zero, torch.zeros(3, 4))


def test_other_is_base_plus_mean(gen):
    b, tv = randn(gen, 4, 3), randn(gen, 5, 4, 3)
    torch.testing.assert_close(get_method("tsv").other("emb", b, tv, None, None), b + tv.mean(0), rtol=0, atol=1e-15)


@pytest.mark.parametrize("T, d_out, d_in, r", [(2, 32, 32, 4), (3, 24, 40, 3), (4, 48, 20, 4)])
def test_lora_rank_bounds_give_the_exact_low_rank_result(gen, T, d_out, d_in, r):
    """A float32 LoRA product B·A has rounding in its null space, above the float64 null threshold: given each
    task's rank (``ModuleInput.ranks``) TSV keeps only its true directions and matches the exact float64 stack."""
    exact, fp32 = lora_stack(gen, T, d_out, d_in, r)
    m = get_method("tsv")
    want = m.module(ModuleInput("w", exact, exact[0]), None, None, "cpu")
    got = m.module(ModuleInput("w", fp32, fp32[0], ranks=(r,) * T), None, None, "cpu").double()
    blind = m.module(ModuleInput("w", fp32, fp32[0]), None, None, "cpu").double()
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert float((blind - want).norm() / want.norm()) > 0.1  # what the bound fixes


def test_rank_bounds_mix_lora_untouched_and_full_experts(gen):
    """Bounds per task: a LoRA expert (r), one that leaves the module alone (0) and a full expert (None)."""
    exact, fp32 = lora_stack(gen, 3, 24, 24, 3)
    dense = randn(gen, 24, 24) * 1e-3
    exact[1], fp32[1] = 0, 0
    exact[2], fp32[2] = dense, dense.float()
    m = get_method("tsv")
    want = m.module(ModuleInput("w", exact, exact[0]), None, None, "cpu")
    got = m.module(ModuleInput("w", fp32, fp32[0], ranks=(3, 0, None)), None, None, "cpu").double()
    assert float((got - want).norm() / want.norm()) < 1e-5

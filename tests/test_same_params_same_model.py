"""The same parameters give the same model whichever path or history writes it: `bmm solve` before and after a
search built its eigen-factor cache in the work dir (direct fp64 solve vs the cached eigenbasis), on a model whose
k/v projections are rank-deficient (one expert: T·d_out < d_in), to fp32 rounding of the merged update; `bmm sample`'s
MAP model is that same model."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchor import anchor
from bmm_cli.factor_cache import current_factors, prepare_trials
from bmm_cli.gram import gram
from bmm_cli.sample import MAP_DIR, sample
from bmm_cli.solve import solve
from bmm_cli.store import Checkpoint
from bmm_cli.taskvec import taskvec
from bmm_cli.workdir import Sources


def _weights(d):
    c = Checkpoint.open(d)
    return {k: c.get(k).double() for k in c.keys()}


@pytest.mark.parametrize("lam", [None, 0.01])
def test_solve_is_the_same_before_and_after_a_factor_cache(family, tmp_path, lam):
    base, experts = family("llama", n=1)
    work = tmp_path / "w"
    taskvec(str(base), [str(e) for e in experts], work)
    anchor(work, "tsv")
    gram(work, "free")
    before = tmp_path / "before"
    solve(work, "tsv", "free", out=before, lam=lam, device="cpu")
    src = Sources(work, "tsv", "free")
    assert current_factors(src) is None
    prepare_trials(src, device=torch.device("cpu"))  # what `bmm search` builds before its first trial
    assert current_factors(src) is not None
    after = tmp_path / "after"
    res = solve(work, "tsv", "free", out=after, lam=lam, device="cpu")
    assert "cached" in res["path"]
    w0, w1, wb = _weights(before), _weights(after), _weights(base)
    assert w0.keys() == w1.keys()
    kv = [k for k in w0 if ".k_proj." in k or ".v_proj." in k]
    assert kv
    for k in w0:
        step = (w0[k] - wb[k]).abs().max()
        assert (w1[k] - w0[k]).abs().max() <= 1e-4 * step + 1e-7, k
    # `bmm sample`'s MAP model is `bmm solve`'s, whatever the cache
    sample(work, "tsv", "free", out=tmp_path / "ens", lam=lam, samples=1, beta=1e4, device="cpu")
    wm = _weights(tmp_path / "ens" / MAP_DIR)
    assert all(torch.equal(wm[k], w1[k]) for k in w1)

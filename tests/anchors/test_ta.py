import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method, parse_options

from ._util import randn


@pytest.mark.parametrize("T", [1, 4])
def test_module_and_other_match_lambda_sum(gen, T):
    m = get_method("ta")
    taus, base = randn(gen, T, 6, 3), randn(gen, 6, 3)
    opts = parse_options(m, ["lam=0.7"])
    u0 = m.module(ModuleInput("w", taus, base), opts, None, "cpu")
    expected = sum(0.7 * taus[t] for t in range(T))
    torch.testing.assert_close(u0, expected, rtol=0, atol=1e-14)
    b, tv = randn(gen, 2, 5), randn(gen, T, 2, 5)
    torch.testing.assert_close(m.other("emb", b, tv, opts, None), b + 0.7 * tv.sum(0), rtol=0, atol=1e-14)


def test_default_lambda_is_0_3(gen):
    m = get_method("ta")
    taus, base = randn(gen, 2, 3, 3), randn(gen, 3, 3)
    u0 = m.module(ModuleInput("w", taus, base), None, None, None)
    torch.testing.assert_close(u0, 0.3 * (taus[0] + taus[1]), rtol=0, atol=1e-14)

import torch

from bmm_cli.anchors import ModuleInput, get_method

from ._util import randn


def test_anchor_is_zero_and_others_keep_base(gen):
    m = get_method("pretrained")
    taus, base = randn(gen, 3, 5, 4), randn(gen, 5, 4)
    u0 = m.module(ModuleInput("w", taus, base), None, None, "cpu")
    assert u0.dtype == taus.dtype and torch.equal(u0, torch.zeros(5, 4, dtype=taus.dtype))
    b = randn(gen, 7)
    assert torch.equal(m.other("norm.weight", b, randn(gen, 3, 7), None, None), b)

import pytest
import torch

from bmm_cli.anchors import ModuleInput, get_method
from bmm_cli.errors import InputError

from ._util import randn


def test_anchor_is_external_minus_base(gen):
    m = get_method("external")
    assert m.needs_external
    taus, base, ext = randn(gen, 2, 4, 6), randn(gen, 4, 6), randn(gen, 4, 6)
    u0 = m.module(ModuleInput("w", taus, base, external=ext), None, None, "cpu")
    torch.testing.assert_close(u0, ext - base, rtol=0, atol=0)


def test_bf16_checkpoint_delta_is_computed_in_fp32(gen):
    m = get_method("external")
    taus = randn(gen, 2, 4, 6, dtype=torch.float32)
    base, ext = randn(gen, 4, 6, dtype=torch.bfloat16), randn(gen, 4, 6, dtype=torch.bfloat16)
    u0 = m.module(ModuleInput("w", taus, base, external=ext), None, None, "cpu")
    assert u0.dtype == torch.float32
    assert torch.equal(u0, ext.float() - base.float())


def test_missing_or_mismatching_external_is_an_input_error(gen):
    m = get_method("external")
    taus, base = randn(gen, 2, 4, 6), randn(gen, 4, 6)
    with pytest.raises(InputError, match="external"):
        m.module(ModuleInput("w", taus, base), None, None, "cpu")
    with pytest.raises(InputError, match="does not match"):
        m.module(ModuleInput("w", taus, base, external=randn(gen, 6, 4)), None, None, "cpu")


def test_other_fallback_is_base_plus_mean(gen):
    m = get_method("external")
    b, tv = randn(gen, 5), randn(gen, 3, 5)
    torch.testing.assert_close(m.other("bias", b, tv, None, None), b + tv.mean(0), rtol=0, atol=1e-15)

"""The registry, option parsing, and the contract every method shares (shapes, dtypes, devices, errors)."""

from __future__ import annotations

import pytest
import torch

from bmm_cli.anchors import (
    BUILTIN,
    METHODS,
    AnchorMethod,
    ModuleInput,
    describe_options,
    get_method,
    is_zero_anchor,
    options_dict,
    parse_options,
    register,
    unregister,
)
from bmm_cli.errors import InputError, NumericError

from ._util import randn

NAMES = list(METHODS)  # every registered anchor meets the contract below


def test_registry_names():
    assert len(NAMES) == len(BUILTIN) and {"pretrained", "ties", "dare-ties", "external"} <= set(NAMES)
    for name, m in METHODS.items():
        assert m.name == name and m.summary and name == name.lower() and "_" not in name
    assert get_method("DARE_TIES") is METHODS["dare-ties"]
    assert get_method(" Iso-CTS ") is METHODS["iso-cts"]


def test_the_zero_anchor_is_an_attribute():
    assert [n for n, m in METHODS.items() if m.is_zero] == ["pretrained"]
    assert is_zero_anchor("pretrained") and is_zero_anchor(METHODS["pretrained"]) and not is_zero_anchor("ta")


def test_register_checks_names_and_unregister_removes():
    class Bad(AnchorMethod):
        name, summary = "Bad_Name", "x"

    class Twin(AnchorMethod):
        name, summary = "ta", "x"

    class New(AnchorMethod):
        name, summary = "new-one", "x"

    with pytest.raises(ValueError, match="lower-case name"):
        register(Bad)
    with pytest.raises(ValueError, match="registered already"):
        register(Twin())
    with pytest.raises(TypeError, match="not an AnchorMethod"):
        register(object())
    try:
        assert register(New).name == "new-one" and get_method("NEW_ONE").name == "new-one"
    finally:
        unregister("new-one")
    assert "new-one" not in METHODS


def test_unknown_method_lists_the_names():
    with pytest.raises(InputError) as e:
        get_method("tie")
    msg = str(e.value)
    assert "'tie'" in msg and all(n in msg for n in NAMES) and "\n" not in msg


def test_parse_typed_values():
    o = parse_options(get_method("ties"), ["k=0.1", "lam=2", "zero-sign=positive"])
    assert (o.k, o.lam, o.zero_sign) == (0.1, 2.0, "positive") and isinstance(o.lam, float)
    o = parse_options(get_method("wudi"), ["steps=12", "lr=1e-3", "tf32=yes"])
    assert (o.steps, o.lr, o.tf32) == (12, 1e-3, True) and isinstance(o.steps, int)
    assert parse_options(get_method("wudi"), ["tf32=False"]).tf32 is False
    assert options_dict(parse_options(get_method("dare"), [])) == {"p": 0.9, "lam": 0.3, "seed": 0}
    iso = options_dict(parse_options(get_method("iso-cts"), None))
    assert iso == {"alpha": 1.0, "common_frac": 0.8, "split": "round"}  # the reference split is the default


@pytest.mark.parametrize(
    "method, pairs, pattern",
    [
        ("ties", ["kk=0.1"], r"unknown option 'kk' for anchor ties; valid keys: k \(float, default 0.2\), lam"),
        ("ties", ["k"], r"has no '='.*valid keys: k"),
        ("ties", ["k=abc"], r"ties option k='abc' is not a number"),
        ("ties", ["k=nan"], r"not finite"),
        ("ties", ["k=1.5"], r"k=1.5 is out of range; use 0.0 <= k <= 1.0"),
        ("ties", ["k=0.1", "k=0.2"], r"given twice"),
        ("ties", ["zero_sign=maybe"], r"use one of: majority, positive, none"),
        ("wudi", ["steps=3.5"], r"steps='3.5' is not an integer"),
        ("wudi", ["tf32=perhaps"], r"is not a bool"),
        ("wudi", ["lr=0"], r"out of range"),
        ("dare", ["p=1"], r"p=1.0 is out of range; use 0.0 <= p < 1.0"),
        ("regmean", ["alpha=-0.1"], r"out of range"),
        ("iso-cts", ["common_frac=1.0"], r"out of range"),
        ("pretrained", ["lam=1"], r"valid keys: none"),
        ("ta", ["lam=inf"], r"not finite"),
    ],
)
def test_option_errors_are_one_line_input_errors(method, pairs, pattern):
    with pytest.raises(InputError, match=pattern) as e:
        parse_options(get_method(method), pairs)
    assert "\n" not in str(e.value)


def test_describe_options():
    rows = describe_options(get_method("ties"))
    assert [r[0] for r in rows] == ["k", "lam", "zero_sign"]
    assert rows[0][1:3] == ("float", 0.2) and "majority, positive, none" in rows[2][3]
    assert describe_options(get_method("external")) == []


def _inputs(gen, T, d_out, d_in, dtype=torch.float64):
    taus = randn(gen, T, d_out, d_in, dtype=dtype)
    base = randn(gen, d_out, d_in, dtype=dtype)
    xs = [randn(gen, 3 * d_in, d_in) for _ in range(T)]
    grams = torch.stack([x.T @ x / x.shape[0] for x in xs]).to(dtype)
    ext = randn(gen, d_out, d_in, dtype=dtype)
    return ModuleInput("layers.0.mlp.fc1.weight", taus, base, grams, ext)


def _state(m, opts, taus_list, T):
    if not m.needs_global_pass:
        return None
    return m.prepare(opts, lambda: iter(taus_list), T)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T, d_out, d_in", [(1, 7, 4), (3, 4, 9), (5, 6, 6)])
def test_every_method_keeps_shape_dtype_device(gen, name, T, d_out, d_in):
    m = METHODS[name]
    opts = parse_options(m, ["steps=5"] if name == "wudi" else [])
    for dtype in (torch.float32, torch.float64):
        inp = _inputs(gen, T, d_out, d_in, dtype)
        b_other, t_other = randn(gen, 3, dtype=torch.bfloat16), randn(gen, T, 3, dtype=dtype)
        state = _state(m, opts, [(inp.key, inp.taus), ("norm", t_other)], T)
        u0 = m.module(inp, opts, state, torch.device("cpu"))
        assert u0.shape == (d_out, d_in) and u0.dtype == dtype and u0.device == inp.taus.device
        w = m.other("norm", b_other, t_other, opts, state)
        assert w.shape == (3,) and w.dtype == dtype
        pos = torch.arange(4)
        assert m.other("position_ids", pos, pos.expand(T, 4), opts, state) is pos


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_input_errors(gen, name):
    m = METHODS[name]
    inp = _inputs(gen, 2, 4, 3)
    state = _state(m, m.default_options(), [(inp.key, inp.taus)], 2)
    with pytest.raises(InputError, match="does not match"):
        m.module(ModuleInput(inp.key, inp.taus, inp.base.T, inp.grams, inp.external), None, state, "cpu")
    with pytest.raises(InputError, match=r"\[T, d_out, d_in\]"):
        m.module(ModuleInput(inp.key, inp.taus[0], inp.base), None, state, "cpu")
    with pytest.raises(InputError, match=r"\[T, \*base.shape\]"):
        m.other("norm", randn(gen, 3), randn(gen, 2, 4), None, state)
    with pytest.raises(InputError, match="expected"):
        m.module(inp, object(), state, "cpu")


def test_nan_task_vectors_raise_numeric_error(gen):
    inp = _inputs(gen, 2, 4, 3)
    inp.taus[1, 2, 0] = float("nan")
    for name in ("ta", "tsv", "iso-cts", "wudi", "regmean"):
        with pytest.raises(NumericError, match="layers.0.mlp.fc1.weight: task vectors contain NaN"):
            METHODS[name].module(inp, None, None, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(gen, name):
    m = METHODS[name]
    opts = parse_options(m, ["steps=20", "lr=1e-3"] if name == "wudi" else [])
    inp = _inputs(gen, 3, 12, 8)
    state = _state(m, opts, [(inp.key, inp.taus)], 3)
    cpu = m.module(inp, opts, state, "cpu")
    state_gpu = m.prepare(opts, lambda: iter([(inp.key, inp.taus)]), 3, device="cuda") if m.needs_global_pass else None
    gpu = m.module(inp, opts, state_gpu, "cuda")
    assert gpu.device.type == "cpu"  # back where the input lives
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-9)

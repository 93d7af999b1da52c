"""tconv against PyTorch: ``F.conv_transpose{1,2,3}d``, ``F.conv{1,2,3}d`` and
``nn.ConvTranspose{1,2,3}d(...)(x, output_size=...)`` on random cases.

PyTorch computes in float64 from the very arrays tconv is given; tconv must
match it to SPEC's accuracy (float64 1e-12, float32 1e-5 relative of the
output's scale). Skipped where torch is not installed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import tconv  # noqa: E402

DIMS = pytest.mark.parametrize("ndim", [1, 2, 3])
KINDS = pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])


def as_torch(*arrays):
    return [None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]


@DIMS
@KINDS
@settings(max_examples=30)
@given(data=st.data())
def test_symmetric_padding_matches_torch_functional(backend_name, cases, torch_forward, assert_close,
                                                    ndim, transposed, data):
    # int and per-dim padding: one direct F.conv* call with the same arguments
    case = data.draw(cases(transposed=transposed, ndim=ndim, padding_forms=("int", "per_dim")), label="case")
    x, w, b = case.arrays()
    with torch.no_grad():
        expected = torch_forward(case, *as_torch(x, w, b)).numpy()
    got = case.run(x, w, b, backend_name)
    assert got.dtype == np.dtype(case.dtype)
    assert_close(got, expected)


@DIMS
@KINDS
@settings(max_examples=25)
@given(data=st.data())
def test_asymmetric_and_same_padding_match_torch_with_explicit_pads(
    backend_name, cases, torch_forward, assert_close, ndim, transposed, data
):
    # (begin, end) pairs, "valid", "same", "same_lower": PyTorch's unpadded call, then crop/pad
    forms = ("pairs", "valid", "same", "same_lower")
    case = data.draw(cases(transposed=transposed, ndim=ndim, padding_forms=forms), label="case")
    x, w, b = case.arrays()
    with torch.no_grad():
        expected = torch_forward(case, *as_torch(x, w, b)).numpy()
    assert_close(case.run(x, w, b, backend_name), expected)


@DIMS
@pytest.mark.parametrize("mode", ["same", "valid"])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=15)
@given(data=st.data())
def test_conv_padding_strings_match_torch_strings(backend_name, cases, assert_close, ndim, mode, data):
    # PyTorch's own padding="same" (stride 1 only; odd extra padding at the end) and "valid"
    case = data.draw(cases(transposed=False, ndim=ndim, padding_forms=(mode,)), label="case")
    case = dataclasses.replace(case, stride=(1,) * ndim, stride_arg=1)
    x, w, b = case.arrays()
    conv = getattr(torch.nn.functional, f"conv{ndim}d")
    expected = conv(*as_torch(x, w, b), stride=1, padding=mode, dilation=case.dilation, groups=case.groups)
    got = getattr(tconv, f"conv{ndim}d")(x, w, b, stride=1, padding=mode, dilation=case.dilation_arg,
                                         groups=case.groups, backend=backend_name)
    assert_close(got, expected.numpy())


@DIMS
@settings(max_examples=20)
@given(data=st.data())
def test_output_size_matches_torch_module(backend_name, assert_close, ndim, data):
    """``nn.ConvTranspose{n}d(...)(x, output_size=...)``: every reachable size, spatial or full shape."""
    draw = data.draw
    groups = draw(st.integers(1, 2), label="groups")
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    dims = lambda s: tuple(draw(s) for _ in range(ndim))  # noqa: E731
    kernel, stride = dims(st.integers(1, 3)), dims(st.integers(1, 3))
    padding, dilation = dims(st.integers(0, 1)), dims(st.integers(1, 2))
    in_size = dims(st.integers(2, 4))
    smallest = [(i - 1) * s - 2 * p + d * (k - 1) + 1
                for i, s, p, d, k in zip(in_size, stride, padding, dilation, kernel)]
    assume(min(smallest) >= 1)
    size = tuple(m + draw(st.integers(0, s - 1)) for m, s in zip(smallest, stride))
    batch = draw(st.sampled_from([None, 2]), label="batch")
    full_shape = draw(st.booleans(), label="full shape")

    module_class = getattr(torch.nn, f"ConvTranspose{ndim}d")
    module = module_class(c_in, c_out, kernel, stride, padding, groups=groups, dilation=dilation,
                          dtype=torch.float64)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal(((batch,) if batch else ()) + (c_in, *in_size))
    wanted = ((batch,) if batch else ()) + (c_out, *size) if full_shape else size
    with torch.no_grad():
        expected = module(torch.from_numpy(x), output_size=list(wanted)).numpy()
    got = getattr(tconv, f"conv_transpose{ndim}d")(
        x, module.weight.detach().numpy(), module.bias.detach().numpy(), stride, padding,
        groups=groups, dilation=dilation, output_size=wanted, backend=backend_name,
    )
    assert got.shape == expected.shape
    assert_close(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_decoder_sized_layer_matches_torch(backend_name, assert_close, dtype):
    # one realistic shape (DCGAN-like upsampling), larger than the random cases
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 16, 8, 8)).astype(dtype)
    w = rng.standard_normal((16, 8, 4, 4)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    expected = torch.nn.functional.conv_transpose2d(*as_torch(x, w, b), stride=2, padding=1).numpy()
    got = tconv.conv_transpose2d(x, w, b, stride=2, padding=1, backend=backend_name)
    assert got.dtype == dtype
    assert_close(got, expected)

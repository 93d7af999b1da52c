"""The ``blas`` backend's shifted route: stride-1 transposed convolutions with each
tap's product added into the output (``_blas_core.scatter_shifted``), no col2im.

The oracle is the definition written as plain loops (``tests/oracle.py``). The
route's size bounds are lifted for the property test, so that small random
shapes take it; every test checks that the route was really taken.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import tconv
from tconv.backend import Geometry

blas_backend = pytest.importorskip("tconv._blas_backend")
if blas_backend._blas_core is None or not blas_backend._blas_core.small_gemm_available():
    pytest.skip("the shifted route needs the compiled core and its AVX-512F kernel", allow_module_level=True)

#: The route's bounds, lifted: any channel count and image size takes it.
ANY_SIZE = dict(SHIFTED_MIN_CHANNELS=1, SHIFTED_MAX_CHANNELS=10**9, SHIFTED_MAX_DEPTH=10**9, SHIFTED_MIN_CELLS=1)


@pytest.fixture
def plans():
    """Set plan constants (``plans(**constants)``) on fresh caches; restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        def set_constants(**constants):
            for name, value in constants.items():
                patch.setattr(blas_backend, name, value)
            blas_backend.clear_plan_caches()
        set_constants()
        yield set_constants
    blas_backend.clear_plan_caches()


def _geometry(x_shape, w_shape, out_shape, pad_begin, dilation, groups) -> Geometry:
    lead = 5 - len(x_shape)
    return Geometry(image=(1,) * lead + tuple(out_shape[2:]), grid=(1,) * lead + tuple(x_shape[2:]),
                    kernel=(1,) * lead + tuple(w_shape[2:]), stride=(1, 1, 1),
                    dilation=(1,) * lead + tuple(dilation), pad_begin=(0,) * lead + tuple(pad_begin),
                    groups=groups)


def _route(x, w, out, pad_begin, dilation, groups) -> str:
    geom = _geometry(x.shape, w.shape, out.shape, pad_begin, dilation, groups)
    return blas_backend.scatter_route(geom, x.shape[1] // groups, w.shape[1], x.itemsize)


def _reshape5(a):
    return a.reshape(a.shape[:2] + (1,) * (5 - a.ndim) + a.shape[2:])


@pytest.mark.parametrize("dtype, stride, route", [("float32", 1, "shifted"), ("float64", 1, "col2im"),
                                                  ("float32", 2, "col2im")])
def test_stride_one_float32_layers_take_the_shifted_route(plans, dtype, stride, route):
    """A 64->64 3x3 layer on a 56x56 grid (the benchmark's stride-1 case) goes shifted at
    stride 1 in float32 only: the unpacked kernel is float32, and other strides scatter."""
    size = 56 * stride
    geom = Geometry(image=(1, size, size), grid=(1, 56, 56), kernel=(1, 3, 3), stride=(1, stride, stride),
                    dilation=(1, 1, 1), pad_begin=(0, 1, 1), groups=1)
    assert blas_backend.scatter_route(geom, 64, 64, np.dtype(dtype).itemsize) == route


def test_layers_outside_its_bounds_keep_their_routes(plans):
    """Few output channels (a last layer, 64->3), deep reductions (512 input channels) and
    small images (8x8) run as before: the shifted route lost there."""
    def route(c_in, c_out, size):
        geom = Geometry(image=(1, size, size), grid=(1, size, size), kernel=(1, 3, 3), stride=(1, 1, 1),
                        dilation=(1, 1, 1), pad_begin=(0, 1, 1), groups=1)
        return blas_backend.scatter_route(geom, c_in, c_out, 4)

    assert route(64, 64, 56) == "shifted"
    assert route(64, 3, 56) == "col2im"
    assert route(512, 64, 28) == "flipped-gather"
    assert route(64, 64, 8) == "col2im"


# (each example sets its constants through ``plans``, on fresh caches)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_shifted_route_matches_the_definition(plans, data):
    """Random 1-3-D stride-1 cases (padding each side, dilation, output padding, groups),
    in bands of one image row or of the whole image, against the plain-loop definition."""
    plans(**ANY_SIZE, SHIFTED_BAND_BYTES=data.draw(st.sampled_from([1, 2**30]), label="band bytes"))
    ndim = data.draw(st.integers(1, 3), label="ndim")
    dims = lambda strategy: tuple(data.draw(strategy) for _ in range(ndim))  # noqa: E731
    groups = data.draw(st.integers(1, 2), label="groups")
    c_in_g, c_out_g = data.draw(st.integers(1, 4), label="c_in/g"), data.draw(st.integers(1, 11), label="c_out/g")
    kernel = dims(st.integers(1, 3))
    dilation = dims(st.integers(1, 2))
    in_size = dims(st.integers(1, {1: 9, 2: 6, 3: 4}[ndim]))[:-1] + (data.draw(st.integers(2, 6)),)  # (a one-cell
    # grid whose output is the kernel takes the single-cell route)
    # any padding that leaves an output cell, up to past the kernel's extent (cropping grid cells)
    pad_begin = tuple(data.draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilation))
    pad_end = tuple(data.draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilation))
    output_padding = tuple(data.draw(st.integers(0, d - 1)) for d in dilation)
    out_size = [i - 1 - b - e + d * (k - 1) + op + 1
                for i, b, e, d, k, op in zip(in_size, pad_begin, pad_end, dilation, kernel, output_padding)]
    if min(out_size) < 1:
        return
    n = data.draw(st.integers(1, 2), label="n")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = rng.standard_normal((n, groups * c_in_g, *in_size)).astype(np.float32)
    w = rng.standard_normal((groups * c_in_g, c_out_g, *kernel)).astype(np.float32)
    b = rng.standard_normal(groups * c_out_g).astype(np.float32) if data.draw(st.booleans()) else None
    conv_transpose = getattr(tconv, f"conv_transpose{ndim}d")
    got = conv_transpose(x, w, b, stride=1, padding=tuple(zip(pad_begin, pad_end)),
                         output_padding=output_padding, dilation=dilation, groups=groups, backend="blas")
    assert _route(x, w, got, pad_begin, dilation, groups) == "shifted"
    expected = oracle.conv_transpose_loops(x, w, b, (1,) * ndim, pad_begin, pad_end, output_padding, dilation,
                                           groups)
    # float32 sums of C_in/g * taps products each
    bound = 1e-6 * c_in_g * np.prod(kernel) * (1 + np.abs(expected).max())
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= bound


def _layer(rng, n=2, c_in=12, c_out=24, size=(13, 17), kernel=3):
    x = rng.standard_normal((n, c_in, *size)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    return x, w, b


def test_bands_change_no_bit(plans):
    """Each output element sums the same products in the same order whatever the
    band's height: bands of 1, 2 and 5 rows give the whole image's bits."""
    x, w, b = _layer(np.random.default_rng(1))
    results = []
    for band_bytes in [1, (24 + 3 * 12) * 19 * 4 * 2, (24 + 3 * 12) * 19 * 4 * 5, 2**30]:
        plans(**ANY_SIZE, SHIFTED_BAND_BYTES=band_bytes)
        results.append(tconv.conv_transpose2d(x, w, b, padding=(1, 2), backend="blas"))
    assert _route(x, w, results[0], (0, 1, 2), (1, 1), 1) == "shifted"
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


def test_channel_ranges_write_only_their_channels(plans):
    """``ScatterCall.channels_into`` on the shifted route (a backend's threads each
    writing some output channels) fills its range of each group with the whole
    call's bits and leaves the other channels alone."""
    plans(**ANY_SIZE)
    x, w, b = _layer(np.random.default_rng(2), c_in=8, c_out=10)
    groups, q = 2, 5
    w = np.ascontiguousarray(w[:, :q])
    geom = Geometry(image=(1, 15, 19), grid=(1, 13, 17), kernel=(1, 3, 3), stride=(1, 1, 1),
                    dilation=(1, 1, 1), pad_begin=(0, 0, 0), groups=groups)
    call = blas_backend._scatter_call(geom, 2, 8, q, np.dtype(np.float32))
    whole = call(_reshape5(x), _reshape5(w), b)
    out = np.full_like(whole, np.nan)
    assert call.channels_into(_reshape5(x), _reshape5(w), b, out, 1, 4) is True
    for g in range(groups):
        np.testing.assert_array_equal(out[:, g * q + 1:g * q + 4], whole[:, g * q + 1:g * q + 4])
        assert np.isnan(out[:, [g * q, g * q + 4]]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_falls_back_to_col2im(plans, bad):
    """The shifted copies' zero columns would multiply every weight, so a NaN or an
    infinity in the weight sends the call to the col2im route: only the cells the
    definition has it reach are NaN or infinite (padding 1: the taps leave the grid)."""
    plans(**ANY_SIZE)
    x, w, b = _layer(np.random.default_rng(3), n=1)
    w[4, 7, 0, 2] = bad
    got = tconv.conv_transpose2d(x, w, b, padding=1, backend="blas")
    assert _route(x, w, got, (0, 1, 1), (1, 1), 1) == "shifted"
    expected = oracle.conv_transpose_loops(x, w, b, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    assert np.abs(got[finite] - expected[finite]).max() <= 1e-4 * np.abs(expected[finite]).max()
    assert np.isfinite(got[:, :7]).all() and not np.isfinite(got[:, 7]).all()

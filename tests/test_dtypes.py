"""SPEC's dtype and memory-layout rules, checked against the loop oracle.

float32/float64 keep their dtype; float16 is computed in float32 and comes
back as float16; ints and bools become float64; mixed inputs follow
``np.result_type``. Non-contiguous, Fortran-ordered, read-only and
negative-stride inputs work, and no input is ever written to.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracle
import tconv

RNG = np.random.default_rng(11)
# forward output shapes (N, C_out, H, W), by SPEC's formula for the arguments below:
# transposed H (5-1)*2 - 1 - 0 + 3 + 1 = 11, W (6-1)*1 - 0 - 1 + 2 + 0 = 6;
# regular    H (5+1+0-3)//2 + 1 = 2,       W (6+0+1-2)//1 + 1 = 6
X = RNG.standard_normal((2, 4, 5, 6))
WT = RNG.standard_normal((4, 3, 3, 2))  # transposed: (C_in, C_out // groups, kh, kw), groups 2 -> C_out 6
WC = RNG.standard_normal((6, 2, 3, 2))  # regular: (C_out, C_in // groups, kh, kw)
B = RNG.standard_normal(6)
ARGS = dict(stride=(2, 1), padding=((1, 0), (0, 1)), groups=2)


def transposed(x, w, b, backend):
    return tconv.conv_transpose2d(x, w, b, **ARGS, output_padding=(1, 0), backend=backend)


def regular(x, w, b, backend):
    return tconv.conv2d(x, w, b, **ARGS, backend=backend)


def expected_transposed(x, w, b):
    return oracle.conv_transpose_loops(x, w, b, (2, 1), (1, 0), (0, 1), (1, 0), (1, 1), 2)


def expected_regular(x, w, b):
    return oracle.conv_loops(x, w, b, (2, 1), (1, 0), (0, 1), (1, 1), 2)


KINDS = pytest.mark.parametrize(
    "call, expected, w",
    [(transposed, expected_transposed, WT), (regular, expected_regular, WC)],
    ids=["conv_transpose", "conv"],
)


@KINDS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_keep_their_dtype(backend_name, assert_close, call, expected, w, dtype):
    x, w, b = (a.astype(dtype) for a in (X, w, B))
    out = call(x, w, b, backend_name)
    assert out.dtype == dtype
    assert_close(out, expected(x, w, b))


@KINDS
def test_float16_in_gives_float16_out(backend_name, assert_close, call, expected, w):
    x, w, b = (a.astype(np.float16) for a in (X, w, B))
    out = call(x, w, b, backend_name)
    assert out.dtype == np.float16
    # computed in float32, rounded once to float16 (relative step 2**-11)
    assert_close(out, expected(x, w, b), rtol=2**-10)


@KINDS
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.bool_])
def test_integer_and_bool_inputs_give_float64(backend_name, call, expected, w, dtype):
    x = (X * 3).astype(dtype)
    w = (w * 3).astype(dtype)
    b = (B * 3).astype(dtype)
    out = call(x, w, b, backend_name)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, expected(x, w, b))  # small integers: exact


MIXED = [
    (np.float32, np.float64, None),
    (np.float64, np.float32, np.float32),
    (np.float32, np.int64, None),
    (np.int16, np.float32, np.float32),
    (np.float16, np.float32, None),
    (np.float16, np.int8, np.float16),
    (np.float32, np.float32, np.float16),
    (np.int32, np.bool_, np.uint8),
]


@KINDS
@pytest.mark.parametrize("x_dtype, w_dtype, b_dtype", MIXED)
def test_mixed_dtypes_follow_result_type(backend_name, call, expected, w, x_dtype, w_dtype, b_dtype):
    x, w = X.astype(x_dtype), w.astype(w_dtype)
    b = None if b_dtype is None else B.astype(b_dtype)
    want = np.result_type(*(a.dtype for a in (x, w, b) if a is not None))
    if want.kind in "biu":
        want = np.dtype(np.float64)
    out = call(x, w, b, backend_name)
    assert out.dtype == want
    reference = expected(x, w, b)
    assert np.max(np.abs(out - reference)) <= (2e-3 if want == np.float16 else 1e-5) * np.max(np.abs(reference))


def views(a):
    """The same values in every layout SPEC says must work."""
    read_only = a.copy()
    read_only.flags.writeable = False
    strided = np.zeros((*a.shape[:-1], 2 * a.shape[-1]))[..., ::2]
    strided[...] = a
    reversed_view = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    return {
        "fortran": np.asfortranarray(a),
        "read_only": read_only,
        "strided": strided,
        "negative_stride": reversed_view,
        "transposed_axes": np.ascontiguousarray(np.swapaxes(a, 0, -1)).swapaxes(0, -1),
    }


@KINDS
@pytest.mark.parametrize("layout", ["fortran", "read_only", "strided", "negative_stride", "transposed_axes"])
def test_any_memory_layout_works(backend_name, assert_close, call, expected, w, layout):
    x, wl, b = views(X)[layout], views(w)[layout], views(B)[layout]
    assert np.array_equal(x, X) and np.array_equal(wl, w) and np.array_equal(b, B)
    assert_close(call(x, wl, b, backend_name), expected(X, w, B))


def test_zero_stride_broadcast_views_work(backend_name, assert_close):
    # np.broadcast_to gives read-only arrays with zero strides
    x = np.broadcast_to(np.arange(6.0).reshape(1, 1, 6), (2, 4, 5, 6))
    w = np.broadcast_to(np.float64(0.5), WT.shape)
    b = np.broadcast_to(np.float64(1.0), (6,))
    assert_close(transposed(x, w, b, backend_name), expected_transposed(np.array(x), np.array(w), np.array(b)))


@KINDS
def test_python_lists_are_accepted(backend_name, assert_close, call, expected, w):
    out = call(X.tolist(), w.tolist(), B.tolist(), backend_name)
    assert out.dtype == np.float64
    assert_close(out, expected(X, w, B))


@KINDS
def test_inputs_are_never_written_to(backend_name, call, expected, w):
    arrays = {"x": X.copy(), "w": w.copy(), "b": B.copy()}
    call(arrays["x"], arrays["w"], arrays["b"], backend_name)
    for name, original in (("x", X), ("w", w), ("b", B)):
        np.testing.assert_array_equal(arrays[name], original, err_msg=f"{name} was modified")


@pytest.mark.parametrize("is_transposed", [True, False], ids=["conv_transpose", "conv"])
def test_backward_never_writes_to_its_inputs(backend_name, is_transposed):
    if is_transposed:
        fn, w, extra, out_shape = tconv.conv_transpose2d_backward, WT, {"output_padding": (1, 0)}, (2, 6, 11, 6)
    else:
        fn, w, extra, out_shape = tconv.conv2d_backward, WC, {}, (2, 6, 2, 6)
    g = RNG.standard_normal(out_shape)
    copies = [a.copy() for a in (g, X, w)]
    fn(copies[0], copies[1], copies[2], **ARGS, **extra, backend=backend_name)
    for copy, original in zip(copies, (g, X, w)):
        np.testing.assert_array_equal(copy, original)


@pytest.mark.parametrize("is_transposed", [True, False], ids=["conv_transpose", "conv"])
@pytest.mark.parametrize("dtype, grad_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                               (np.int32, np.float64), (np.float16, np.float16)])
def test_backward_gradients_follow_the_dtype_rules(backend_name, is_transposed, dtype, grad_dtype):
    if is_transposed:
        fn, w, extra, out_shape = tconv.conv_transpose2d_backward, WT, {"output_padding": (1, 0)}, (2, 6, 11, 6)
    else:
        fn, w, extra, out_shape = tconv.conv2d_backward, WC, {}, (2, 6, 2, 6)
    g = np.ones(out_shape, dtype=dtype)
    grads = fn(g, X.astype(dtype), w.astype(dtype), **ARGS, **extra, backend=backend_name)
    assert [a.dtype for a in grads] == [grad_dtype] * 3
    assert [a.shape for a in grads] == [X.shape, w.shape, (6,)]


@KINDS
def test_unbatched_in_unbatched_out(backend_name, assert_close, call, expected, w):
    out = call(X[1], w, B, backend_name)
    reference = expected(X[1:2], w, B)[0]
    assert out.shape == reference.shape
    assert_close(out, reference)


@KINDS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_gives_an_empty_result_of_the_right_shape(backend_name, call, expected, w, dtype):
    out = call(np.zeros((0, *X.shape[1:]), dtype), w.astype(dtype), B.astype(dtype), backend_name)
    assert out.shape == (0, *expected(X[:1], w, B).shape[1:])
    assert out.dtype == dtype


@pytest.mark.parametrize("is_transposed", [True, False], ids=["conv_transpose", "conv"])
def test_unbatched_and_empty_batch_backward_shapes(backend_name, is_transposed):
    if is_transposed:
        fn, w, extra, out_shape = tconv.conv_transpose2d_backward, WT, {"output_padding": (1, 0)}, (6, 11, 6)
    else:
        fn, w, extra, out_shape = tconv.conv2d_backward, WC, {}, (6, 2, 6)
    gx, gw, gb = fn(np.ones(out_shape), X[0], w, **ARGS, **extra, backend=backend_name)
    assert (gx.shape, gw.shape, gb.shape) == (X[0].shape, w.shape, (6,))
    gx, gw, gb = fn(np.ones((0, *out_shape)), X[:0], w, **ARGS, **extra, backend=backend_name)
    assert (gx.shape, gw.shape, gb.shape) == (X[:0].shape, w.shape, (6,))
    assert not gw.any() and not gb.any()

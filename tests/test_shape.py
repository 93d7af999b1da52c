"""``tconv.shape`` against the size formulas of SPEC, written out here.

Per spatial dim::

    transposed: out = (in - 1) * stride - pad_begin - pad_end + dilation * (k - 1) + output_padding + 1
    regular:    out = (in + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1

and ONNX's auto_pad rules for ``"same"`` (SAME_UPPER), ``"same_lower"`` and
``"valid"``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tconv import shape

small = st.integers(1, 9)


def transposed_size(i, k, s, pb, pe, op, d):
    return (i - 1) * s - pb - pe + d * (k - 1) + op + 1


def regular_size(i, k, s, pb, pe, d):
    return (i + pb + pe - d * (k - 1) - 1) // s + 1


@st.composite
def dims_args(draw, max_ndim=3):
    """Per-dim sizes, kernels, strides, dilations, output_paddings and (begin, end) pads."""
    ndim = draw(st.integers(1, max_ndim))
    per = lambda strat: tuple(draw(strat) for _ in range(ndim))  # noqa: E731
    stride, dilation = per(st.integers(1, 4)), per(st.integers(1, 3))
    return dict(
        input_size=per(small), kernel_size=per(st.integers(1, 5)), stride=stride, dilation=dilation,
        output_padding=tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)),
        pad_begin=per(st.integers(0, 3)), pad_end=per(st.integers(0, 3)),
    )


def assert_sizes(call, expected):
    """The formula's sizes; where one is below 1 there is no output, and that is an error."""
    if min(expected) < 1:
        with pytest.raises(ValueError, match="below 1"):
            call()
    else:
        assert call() == expected


def _zip(a):
    return zip(a["input_size"], a["kernel_size"], a["stride"], a["pad_begin"], a["pad_end"],
               a["output_padding"], a["dilation"])


@settings(max_examples=80)
@given(dims_args())
def test_conv_transpose_output_size_with_begin_end_pairs(a):
    pads = tuple(zip(a["pad_begin"], a["pad_end"]))
    assert_sizes(lambda: shape.conv_transpose_output_size(a["input_size"], a["kernel_size"], a["stride"], pads,
                                                          a["output_padding"], a["dilation"]),
                 tuple(transposed_size(*v) for v in _zip(a)))


@settings(max_examples=40)
@given(dims_args())
def test_conv_transpose_output_size_with_symmetric_padding(a):
    assert_sizes(lambda: shape.conv_transpose_output_size(a["input_size"], a["kernel_size"], a["stride"],
                                                          a["pad_begin"], a["output_padding"], a["dilation"]),
                 tuple(transposed_size(i, k, s, pb, pb, op, d) for i, k, s, pb, _, op, d in _zip(a)))


@settings(max_examples=80)
@given(dims_args())
def test_conv_output_size_with_begin_end_pairs(a):
    pads = tuple(zip(a["pad_begin"], a["pad_end"]))
    assert_sizes(lambda: shape.conv_output_size(a["input_size"], a["kernel_size"], a["stride"], pads, a["dilation"]),
                 tuple(regular_size(i, k, s, pb, pe, d) for i, k, s, pb, pe, _, d in _zip(a)))


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda: shape.conv_transpose_output_size((2, 2), 3), (4, 4)),  # SPEC's first example
        (lambda: shape.conv_transpose_output_size((3, 3), 3, padding=2), (1, 1)),  # second
        (lambda: shape.conv_transpose_output_size((3, 3), 3, stride=3, output_padding=1), (10, 10)),  # third
        (lambda: shape.conv_transpose_output_size(7, 4, stride=2, padding=1), (14,)),
        (lambda: shape.conv_transpose_output_size([5, 6, 7], [1, 2, 3], [1, 2, 3]), (5, 12, 21)),
        (lambda: shape.conv_output_size((4, 4), 3), (2, 2)),
        (lambda: shape.conv_output_size(10, 3, stride=3, dilation=2), (2,)),
    ],
)
def test_worked_sizes(call, expected):
    assert call() == expected


@settings(max_examples=80)
@given(dims_args(), st.data())
def test_output_padding_for_inverts_the_formula_over_the_reachable_sizes(a, data):
    pads = tuple(zip(a["pad_begin"], a["pad_end"]))
    smallest = [transposed_size(i, k, s, pb, pe, 0, d) for i, k, s, pb, pe, _, d in _zip(a)]
    if min(smallest) < 1:
        return
    # PyTorch's rule: every size in smallest .. smallest + stride - 1 is reached
    extra = tuple(data.draw(st.integers(0, s - 1)) for s in a["stride"])
    wanted = tuple(m + e for m, e in zip(smallest, extra))
    got = shape.output_padding_for(a["input_size"], wanted, a["kernel_size"], a["stride"], pads, a["dilation"])
    assert got == extra


@settings(max_examples=40)
@given(dims_args(), st.data())
def test_output_padding_for_refuses_unreachable_sizes_listing_the_reachable(a, data):
    pads = tuple(zip(a["pad_begin"], a["pad_end"]))
    smallest = [transposed_size(i, k, s, pb, pe, 0, d) for i, k, s, pb, pe, _, d in _zip(a)]
    if min(smallest) < 1:
        return
    dim = data.draw(st.integers(0, len(smallest) - 1))
    wrong = data.draw(st.sampled_from([smallest[dim] - 1, smallest[dim] + a["stride"][dim]]))
    wanted = tuple(wrong if j == dim else m for j, m in enumerate(smallest))
    with pytest.raises(ValueError) as info:
        shape.output_padding_for(a["input_size"], wanted, a["kernel_size"], a["stride"], pads, a["dilation"])
    message = str(info.value)
    assert str(smallest[dim]) in message and str(smallest[dim] + a["stride"][dim] - 1) in message


def test_output_padding_for_example():
    # in 7, kernel 3, stride 2, padding 1: smallest 13, so 14 needs output_padding 1
    assert shape.output_padding_for(7, 14, 3, stride=2, padding=1) == (1,)
    with pytest.raises(ValueError, match="13"):
        shape.output_padding_for(7, 15, 3, stride=2, padding=1)


def onnx_split(total, mode):
    """ONNX: SAME_UPPER crops the odd cell at the end, SAME_LOWER at the start (floor division)."""
    return (total // 2, total - total // 2) if mode == "same" else (total - total // 2, total // 2)


@settings(max_examples=80)
@given(dims_args(), st.sampled_from(["same", "same_lower"]))
def test_same_modes_of_a_transposed_convolution_give_input_times_stride(a, mode):
    # ONNX ConvTranspose: out = in * stride; total crop = stride*(in-1) + output_padding + extent - out
    extents = [d * (k - 1) + 1 for k, d in zip(a["kernel_size"], a["dilation"])]
    totals = [s * (i - 1) + op + e - i * s
              for i, s, op, e in zip(a["input_size"], a["stride"], a["output_padding"], extents)]
    begin, end = shape.resolve_padding(mode, a["input_size"], a["kernel_size"], a["stride"], a["dilation"],
                                       a["output_padding"], transposed=True)
    assert tuple(zip(begin, end)) == tuple(onnx_split(t, mode) for t in totals)


@settings(max_examples=80)
@given(dims_args(), st.sampled_from(["same", "same_lower"]), st.data())
def test_same_modes_with_output_size_are_onnx_output_shape(a, mode, data):
    extents = [d * (k - 1) + 1 for k, d in zip(a["kernel_size"], a["dilation"])]
    target = tuple(data.draw(st.integers(1, 3 * i * s)) for i, s in zip(a["input_size"], a["stride"]))
    totals = [s * (i - 1) + op + e - t
              for i, s, op, e, t in zip(a["input_size"], a["stride"], a["output_padding"], extents, target)]
    begin, end = shape.resolve_padding(mode, a["input_size"], a["kernel_size"], a["stride"], a["dilation"],
                                       a["output_padding"], transposed=True, output_size=target)
    assert tuple(zip(begin, end)) == tuple(onnx_split(t, mode) for t in totals)


@settings(max_examples=80)
@given(dims_args(), st.sampled_from(["same", "same_lower"]))
def test_same_modes_of_a_regular_convolution_give_ceil_input_over_stride(a, mode):
    # ONNX Conv: out = ceil(in / stride); total = max((out - 1) * stride + extent - in, 0)
    extents = [d * (k - 1) + 1 for k, d in zip(a["kernel_size"], a["dilation"])]
    outs = [-(-i // s) for i, s in zip(a["input_size"], a["stride"])]
    totals = [max((o - 1) * s + e - i, 0) for o, s, e, i in zip(outs, a["stride"], extents, a["input_size"])]
    begin, end = shape.resolve_padding(mode, a["input_size"], a["kernel_size"], a["stride"], a["dilation"],
                                       transposed=False)
    assert tuple(zip(begin, end)) == tuple(onnx_split(t, mode) for t in totals)
    assert shape.conv_output_size(a["input_size"], a["kernel_size"], a["stride"], mode, a["dilation"]) == tuple(outs)


@settings(max_examples=40)
@given(dims_args())
def test_same_transposed_size_is_input_times_stride(a):
    got = shape.conv_transpose_output_size(a["input_size"], a["kernel_size"], a["stride"], "same",
                                           a["output_padding"], a["dilation"])
    assert got == tuple(i * s for i, s in zip(a["input_size"], a["stride"]))


@settings(max_examples=40)
@given(dims_args())
def test_valid_is_zero_padding(a):
    n = len(a["input_size"])
    assert shape.resolve_padding("valid", a["input_size"], a["kernel_size"]) == ((0,) * n, (0,) * n)
    assert_sizes(lambda: shape.conv_output_size(a["input_size"], a["kernel_size"], a["stride"], "valid", a["dilation"]),
                 tuple(regular_size(i, k, s, 0, 0, d) for i, k, s, _, _, _, d in _zip(a)))


@pytest.mark.parametrize("mode", ["SAME", "Same_Lower", "VALID"])
def test_padding_strings_are_case_insensitive(mode):
    assert shape.resolve_padding(mode, (4,), (3,), (2,)) == shape.resolve_padding(mode.lower(), (4,), (3,), (2,))


@pytest.mark.parametrize(
    "call",
    [
        lambda: shape.conv_transpose_output_size(3, 3, stride=0),
        lambda: shape.conv_transpose_output_size(3, 3, dilation=0),
        lambda: shape.conv_transpose_output_size(3, 0),
        lambda: shape.conv_transpose_output_size(3, 3, padding=-1),
        lambda: shape.conv_transpose_output_size(3, 3, output_padding=-1),
        lambda: shape.conv_output_size((3, 3), (3, 3), stride=(1, 2, 3)),
        lambda: shape.conv_output_size(3, 3, padding="full"),
        lambda: shape.conv_output_size(3, 3, padding=((1, 1, 1),)),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: shape.conv_transpose_output_size(3, 3, stride=True),
        lambda: shape.conv_transpose_output_size(3, 3, stride=1.5),
        lambda: shape.conv_output_size(3, 3, padding=None),
    ],
)
def test_non_integers_raise_type_error(call):
    with pytest.raises(TypeError):
        call()

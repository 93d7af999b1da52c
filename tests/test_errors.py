"""Every bad input SPEC lists: the right exception, and a message that names
the argument and the values (so a user can see what to fix)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tconv

X = np.ones((1, 4, 3, 3))  # (N, C_in, H, W)
WT = np.ones((4, 2, 3, 3))  # transposed weight (C_in, C_out, kh, kw)
WC = np.ones((2, 4, 3, 3))  # regular weight (C_out, C_in, kh, kw)


def ct(**kwargs):
    args = {"x": X, "weight": WT, **kwargs}
    return lambda backend: tconv.conv_transpose2d(**args, backend=backend)


def cv(**kwargs):
    args = {"x": X, "weight": WC, **kwargs}
    return lambda backend: tconv.conv2d(**args, backend=backend)


# (id, call, exception types, fragments the message must contain)
BAD_INPUTS = [
    # ---- ranks --------------------------------------------------------------
    ("x 2-D", ct(x=np.ones((4, 3))), ValueError, ["x", "(4, 3)"]),
    ("x 5-D", ct(x=np.ones((1, 4, 3, 3, 3))), ValueError, ["x", "(1, 4, 3, 3, 3)"]),
    ("weight 3-D", ct(weight=np.ones((4, 2, 3))), ValueError, ["weight", "(4, 2, 3)"]),
    ("conv weight 5-D", cv(weight=np.ones((2, 4, 3, 3, 3))), ValueError, ["weight", "(2, 4, 3, 3, 3)"]),
    ("x scalar", ct(x=np.float64(1.0)), ValueError, ["x", "()"]),
    # ---- channels and groups -------------------------------------------------
    ("transposed channel mismatch", ct(weight=np.ones((3, 2, 3, 3))), ValueError, ["4", "3"]),
    ("conv channel mismatch", cv(weight=np.ones((2, 3, 3, 3))), ValueError, ["4", "3"]),
    ("groups not dividing C_in", ct(x=np.ones((1, 3, 3, 3)), weight=np.ones((3, 2, 3, 3)), groups=2),
     ValueError, ["groups", "2", "3"]),
    ("groups not dividing C_out", cv(x=np.ones((1, 4, 3, 3)), weight=np.ones((3, 2, 3, 3)), groups=2),
     ValueError, ["groups", "2", "3"]),
    ("groups 0", ct(groups=0), ValueError, ["groups", "0"]),
    ("groups negative", cv(groups=-2), ValueError, ["groups", "-2"]),
    # ---- stride, dilation, padding, output_padding -------------------------------
    ("stride 0", ct(stride=0), ValueError, ["stride", "0"]),
    ("stride negative in one dim", cv(stride=(1, -2)), ValueError, ["stride", "-2"]),
    ("stride wrong length", ct(stride=(1, 2, 3)), ValueError, ["stride", "(1, 2, 3)"]),
    ("dilation 0", ct(dilation=0), ValueError, ["dilation", "0"]),
    ("dilation negative", cv(dilation=(-1, 1)), ValueError, ["dilation", "-1"]),
    ("padding negative", ct(padding=-1), ValueError, ["padding", "-1"]),
    ("padding negative in one dim", cv(padding=(0, -3)), ValueError, ["padding", "-3"]),
    ("padding pair negative", ct(padding=((0, 0), (1, -1))), ValueError, ["padding", "-1"]),
    ("padding pair of three", ct(padding=((0, 0, 0), (1, 1, 1))), ValueError, ["padding"]),
    ("padding unknown string", ct(padding="full"), ValueError, ["padding", "full"]),
    ("conv padding unknown string", cv(padding="SAME_UPPERX"), ValueError, ["padding", "SAME_UPPERX"]),
    ("output_padding negative", ct(output_padding=-1), ValueError, ["output_padding", "-1"]),
    ("output_padding equal to stride and dilation", ct(stride=2, dilation=2, output_padding=2),
     ValueError, ["output_padding", "2"]),
    ("output_padding above stride and dilation", ct(stride=(1, 2), output_padding=(0, 3)),
     ValueError, ["output_padding", "3"]),
    # ---- sizes ---------------------------------------------------------------
    ("conv output below 1", cv(x=np.ones((1, 4, 2, 2))), ValueError, ["output", "2"]),
    ("transposed output below 1", ct(x=np.ones((1, 4, 1, 1)), weight=np.ones((4, 2, 1, 1)), padding=1),
     ValueError, ["output", "padding"]),
    ("empty spatial input", ct(x=np.ones((1, 4, 0, 3))), ValueError, ["x", "0"]),
    # ---- bias -----------------------------------------------------------------
    ("bias too long", ct(bias=np.ones(3)), ValueError, ["bias", "(3,)", "2"]),
    ("bias 2-D", cv(bias=np.ones((1, 2))), ValueError, ["bias", "(1, 2)"]),
    ("bias scalar", ct(bias=np.float64(1.0)), ValueError, ["bias", "()"]),
    # ---- output_size ----------------------------------------------------------------
    ("output_size wrong length", ct(output_size=(5, 5, 5, 5, 5)), ValueError, ["output_size", "(5, 5, 5, 5, 5)"]),
    ("output_size 0", ct(output_size=(0, 5), padding="same"), ValueError, ["output_size", "0"]),
    # ---- dtypes -------------------------------------------------------------
    ("complex x", ct(x=X.astype(np.complex128)), TypeError, ["x", "complex"]),
    ("complex weight", cv(weight=WC.astype(np.complex64)), TypeError, ["weight", "complex"]),
    ("object x", ct(x=X.astype(object)), TypeError, ["x", "object"]),
    ("string x", ct(x="abc"), TypeError, ["x"]),
    ("object bias", ct(bias=np.array([1, "a"], dtype=object)), TypeError, ["bias", "object"]),
    ("None x", ct(x=None), TypeError, ["x", "None"]),
    ("ragged x", ct(x=[[1.0, 2.0], [3.0]]), (TypeError, ValueError), ["x"]),
    # ---- bools and other non-ints where an int goes ---------------------------------------------
    ("bool stride", ct(stride=True), (TypeError, ValueError), ["stride", "True"]),
    ("bool in stride tuple", ct(stride=(1, False)), (TypeError, ValueError), ["stride", "False"]),
    ("bool dilation", cv(dilation=True), (TypeError, ValueError), ["dilation", "True"]),
    ("bool padding", ct(padding=True), (TypeError, ValueError), ["padding", "True"]),
    ("bool output_padding", ct(stride=2, output_padding=True), (TypeError, ValueError), ["output_padding", "True"]),
    ("bool groups", cv(groups=True), (TypeError, ValueError), ["groups", "True"]),
    ("bool output_size", ct(output_size=(True, 5)), (TypeError, ValueError), ["output_size", "True"]),
    ("float stride", ct(stride=1.5), TypeError, ["stride", "1.5"]),
    ("float padding", cv(padding=0.5), TypeError, ["padding", "0.5"]),
    ("None stride", ct(stride=None), TypeError, ["stride", "None"]),
    # ---- overflow-sized problems: refused before anything is allocated ---------------------------
    ("huge stride", ct(stride=2**62), (ValueError, MemoryError), []),
    ("huge dilation", cv(dilation=2**62), (ValueError, MemoryError), []),
    ("huge padding", cv(padding=2**62), (ValueError, MemoryError), []),
    ("huge output_size", ct(output_size=(2**62, 2**62), padding="same"), (ValueError, MemoryError), []),
    # 2**50 elements (8 PiB) is below any index overflow but past every address space
    ("output of 8 PiB", ct(x=np.ones((1, 4, 2, 2)), stride=(2**25, 2**25)), (ValueError, MemoryError), []),
    ("output past 2**63 elements",
     ct(x=np.ones((1, 4, 2, 2)), stride=(2**31, 2**31)), (ValueError, MemoryError), []),
]


@pytest.mark.parametrize("call, errors, fragments", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_with_a_message_naming_it(backend_name, call, errors, fragments):
    with pytest.raises(errors) as info:
        call(backend_name)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"message {message!r} does not mention {fragment!r}"


def test_unreachable_output_size_lists_the_reachable_sizes(backend_name):
    # in 3, kernel 3, stride 2: smallest output (3-1)*2 + 3 = 7, reachable 7..8
    with pytest.raises(ValueError) as info:
        tconv.conv_transpose2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), stride=2, output_size=(7, 10),
                               backend=backend_name)
    message = str(info.value)
    assert "output_size" in message and "10" in message
    assert re.search(r"\b7\b", message) and re.search(r"\b8\b", message), message


@pytest.mark.parametrize("size", [(6, 7), (7, 9)])
def test_output_size_just_outside_the_reachable_range_is_refused(backend_name, size):
    with pytest.raises(ValueError, match="output_size"):
        tconv.conv_transpose2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), stride=2, output_size=size,
                               backend=backend_name)


def test_output_padding_below_dilation_alone_is_accepted(backend_name):
    # PyTorch's rule: smaller than the stride OR the dilation is enough
    out = tconv.conv_transpose1d(np.ones((1, 1, 3)), np.ones((1, 1, 2)), stride=1, dilation=3,
                                 output_padding=2, backend=backend_name)
    assert out.shape == (1, 1, 3 - 1 + 3 * 1 + 2 + 1)


@pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])
def test_backward_refuses_a_grad_output_of_the_wrong_shape(backend_name, transposed):
    if transposed:
        call = lambda g: tconv.conv_transpose2d_backward(g, X, WT, backend=backend_name)  # noqa: E731
    else:
        call = lambda g: tconv.conv2d_backward(g, X, WC, backend=backend_name)  # noqa: E731
    with pytest.raises(ValueError) as info:
        call(np.ones((1, 2, 9, 9)))
    assert "grad_output" in str(info.value) and "(1, 2, 9, 9)" in str(info.value)


@pytest.mark.parametrize("needs", [("input", "gradient"), ("bias", "x")])
def test_backward_refuses_unknown_needs(backend_name, needs):
    g = np.ones((1, 2, 5, 5))
    with pytest.raises(ValueError) as info:
        tconv.conv_transpose2d_backward(g, X, WT, needs=needs, backend=backend_name)
    assert "needs" in str(info.value)


@pytest.mark.parametrize("fn", ["conv_transpose1d", "conv_transpose3d", "conv1d", "conv3d"])
def test_rank_checks_hold_in_every_dimension(backend_name, fn):
    ndim = int(fn[-2])
    x = np.ones((1, 2) + (3,) * (ndim + 1))  # one spatial dim too many
    w = np.ones((2, 2) + (1,) * ndim)
    with pytest.raises(ValueError, match="x"):
        getattr(tconv, fn)(x, w, backend=backend_name)

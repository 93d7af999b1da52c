"""Gradients (issue 3): every ``*_backward`` against two independent oracles.

1. PyTorch autograd through ``F.conv*`` (float64, 1e-10 relative of each
   gradient's scale) over random cases of every argument in 1, 2 and 3 dims.
2. Central finite differences of tconv's forward pass. The loss
   ``sum(forward * G)`` is linear in each of x, weight and bias, so the
   central difference is exact up to rounding and the tolerance can be tight.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

DIMS = pytest.mark.parametrize("ndim", [1, 2, 3])
KINDS = pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])
GRADIENT_RTOL = 1e-10
NEEDS = ("input", "weight", "bias")


def torch_gradients(torch_forward, case, x, w, b, grad_output):
    """(grad_x, grad_w, grad_b) from PyTorch autograd, float64."""
    import torch

    tensors = [None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b)]
    out = torch_forward(case, *tensors)
    out.backward(torch.from_numpy(np.asarray(grad_output, dtype=np.float64)))
    grads = []
    for t in tensors:
        if t is None:
            grads.append(None)
        elif t.grad is None:  # an empty batch leaves some grads unset: they are zero
            grads.append(np.zeros(t.shape))
        else:
            grads.append(t.grad.numpy())
    return grads


@DIMS
@KINDS
@settings(max_examples=20)
@given(data=st.data())
def test_backward_matches_torch_autograd(backend_name, cases, torch_forward, assert_close, ndim, transposed, data):
    # output_size=False: SPEC's backward takes output_padding, not output_size
    case = data.draw(cases(transposed=transposed, ndim=ndim, dtypes=("float64",), output_size=False), label="case")
    x, w, b = case.arrays()
    b = np.zeros(case.c_out) if b is None else b  # the bias gradient is always asked for here
    grad_output = case.grad_output()
    expected = torch_gradients(torch_forward, case, x, w, b, grad_output)
    got = case.backward_function(grad_output, x, w, **case.kwargs(), backend=backend_name)
    for name, g, e in zip(NEEDS, got, expected):
        assert g is not None, f"grad of {name} missing"
        assert g.dtype == np.float64, name
        assert_close(g, e, rtol=GRADIENT_RTOL)


@DIMS
@KINDS
@settings(max_examples=5)
@given(data=st.data())
def test_needs_computes_only_what_is_asked(backend_name, cases, torch_forward, assert_close, ndim, transposed, data):
    case = data.draw(cases(transposed=transposed, ndim=ndim, dtypes=("float64",), output_size=False,
                           empty_batch=False), label="case")
    x, w, _ = case.arrays()
    grad_output = case.grad_output()
    expected = dict(zip(NEEDS, torch_gradients(torch_forward, case, x, w, np.zeros(case.c_out), grad_output)))
    for count in range(0, 4):
        for needs in itertools.combinations(NEEDS, count):
            got = dict(zip(NEEDS, case.backward_function(grad_output, x, w, **case.kwargs(), needs=needs,
                                                         backend=backend_name)))
            for name in NEEDS:
                if name in needs:
                    assert_close(got[name], expected[name], rtol=GRADIENT_RTOL)
                else:
                    assert got[name] is None, f"needs={needs} but {name} gradient was computed"


def central_differences(loss, array, step=0.5):
    """d loss / d array, entry by entry (``array`` is perturbed in place and restored)."""
    grad = np.zeros_like(array)
    flat, out = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + step
        up = loss()
        flat[i] = keep - step
        down = loss()
        flat[i] = keep
        out[i] = (up - down) / (2 * step)
    return grad


@DIMS
@KINDS
@settings(max_examples=8)
@given(data=st.data())
def test_backward_matches_finite_differences(backend_name, cases, assert_close, ndim, transposed, data):
    case = data.draw(cases(transposed=transposed, ndim=ndim, dtypes=("float64",), output_size=False,
                           max_work=400), label="case")
    x, w, b = case.arrays()
    b = np.zeros(case.c_out) if b is None else b
    probe = case.grad_output()  # loss = sum(forward * probe), so d loss / d forward = probe

    def loss():
        return float(np.sum(case.run(x, w, b, backend_name) * probe))

    numeric = [central_differences(loss, a) for a in (x, w, b)]
    analytic = case.backward_function(probe, x, w, **case.kwargs(), backend=backend_name)
    for name, g, e in zip(NEEDS, analytic, numeric):
        # rounding in the differences: ~eps * |loss| / step per entry
        tolerance = 1e-9 * max(1.0, float(np.sum(np.abs(probe))))
        assert g.shape == e.shape, name
        if e.size:
            assert float(np.max(np.abs(g - e))) <= tolerance, (name, g, e)


@pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])
def test_float32_backward_keeps_dtype_and_accuracy(backend_name, torch_forward, transposed):
    # not in the random draws above (those are float64): one float32 case, 1e-5 relative
    import tconv

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    if transposed:
        w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        fn, out_shape = tconv.conv_transpose2d_backward, (2, 6, 10, 12)
        kwargs = dict(stride=2, padding=1, output_padding=1, groups=2)
    else:
        w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
        fn, out_shape = tconv.conv2d_backward, (2, 6, 3, 3)
        kwargs = dict(stride=2, padding=1, groups=2)
    g = rng.standard_normal(out_shape).astype(np.float32)
    got = fn(g, x, w, **kwargs, backend=backend_name)

    import torch
    import torch.nn.functional as F

    tx, tw = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w))
    tb = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    conv = F.conv_transpose2d if transposed else F.conv2d
    conv(tx, tw, tb, **kwargs).backward(torch.from_numpy(g.astype(np.float64)))
    for gradient, reference in zip(got, (tx.grad, tw.grad, tb.grad)):
        assert gradient.dtype == np.float32
        reference = reference.numpy()
        assert np.max(np.abs(gradient - reference)) <= 1e-5 * np.max(np.abs(reference))

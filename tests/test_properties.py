"""Property tests (issue 7): random problems of every argument, every CPU backend.

Each example is one random convolution drawn by the shared ``conv_cases``
strategy (conftest: 1-3 dims, groups, every padding form, output_padding,
output_size, batched/unbatched/empty batch, float32/float64) and checked
against independent oracles:

* forward: the plain-loop definition (``tests/oracle.py``), whatever the
  memory layout of the inputs (Fortran order, negative strides, strided
  views, read-only), and the inputs are never written to;
* backward: the adjoint identities of the definition. A convolution is
  linear in ``x`` and in ``weight``, so for any probe ``u`` and ``v``
  ``<grad_x, u> == <grad_out, T(u, w)>`` and ``<grad_w, v> == <grad_out, T(x, v)>``
  with ``T`` the oracle without bias; ``grad_b`` is the sum of ``grad_out``;
* tconv's own ``conv`` and ``conv_transpose`` are adjoint with the same weight:
  ``<conv_transpose(x, w), y> == <x, conv(y, w)>``;
* the long fuzz (``-m slow``) adds PyTorch autograd when torch is installed.

Tolerances are SPEC's, measured against the scale of the cancellation-free
sum (the same computation on ``|x|`` and ``|w|``): float64 1e-12, float32 1e-5.

The CI run is bounded (a few dozen examples per test and backend). The long
run: ``TCONV_FUZZ_EXAMPLES=5000 pytest -m slow tests/test_properties.py -s``;
it prints how many cases ran on each backend.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import oracle

TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
LAYOUTS = ("C", "F", "negative", "strided", "readonly", "list")
FUZZ_EXAMPLES = int(os.environ.get("TCONV_FUZZ_EXAMPLES", "2000"))
CI_SETTINGS = dict(deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def _slow_is_opt_in(request):
    """``slow`` tests run only when asked for with ``-m slow``."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: run with -m slow")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def relayout(a, how: str):
    """The same values in another memory layout (or as a nested list)."""
    if a is None or how == "C":
        return a
    if how == "F":
        return np.asfortranarray(a)
    if how == "negative":  # a view whose strides are all negative
        return np.flip(np.flip(a).copy())
    if how == "strided":  # every other element of a bigger buffer
        big = np.full(a.shape[:-1] + (2 * a.shape[-1],), np.nan, dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if how == "readonly":
        a = a.copy()
        a.setflags(write=False)
        return a
    if how == "list":  # an empty array would lose its shape as a list
        return a.tolist() if a.size else a
    raise AssertionError(how)


def batched(case, a):
    return a if case.batch is not None else a[None]


def unbatched(case, a):
    return a if case.batch is not None else a[0]


def oracle_forward(case, x, w, b=None):
    """The loop definition in float64, in the user's shape."""
    x = batched(case, np.asarray(x, dtype=np.float64))
    w = np.asarray(w, dtype=np.float64)
    if case.transposed:
        out = oracle.conv_transpose_loops(x, w, b, case.stride, case.pad_begin, case.pad_end,
                                          case.output_padding, case.dilation, case.groups)
    else:
        out = oracle.conv_loops(x, w, b, case.stride, case.pad_begin, case.pad_end, case.dilation, case.groups)
    return unbatched(case, out)


def check_close(got, expected, scale, dtype, what):
    """``|got - expected| <= tol * scale`` elementwise (``scale``: the cancellation-free magnitude)."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == np.shape(expected), f"{what}: shape {got.shape} != {np.shape(expected)}"
    tol = TOL[np.dtype(dtype)]
    bound = tol * np.maximum(np.asarray(scale, dtype=np.float64), np.finfo(np.float64).tiny) + 1e-300
    err = np.abs(got - expected)
    bad = err > bound
    if np.any(bad):
        i = tuple(np.argwhere(bad)[0]) if np.ndim(bad) else ()
        raise AssertionError(
            f"{what}: {int(np.sum(bad))} cells off; first at {i}: got {np.asarray(got)[i]!r}, "
            f"expected {np.asarray(expected)[i]!r}, tolerance {np.asarray(bound)[i]:.3g}"
        )


# --------------------------------------------------------------------------- #
# the checks (shared by the bounded tests and the long fuzz)
# --------------------------------------------------------------------------- #
def check_forward(case, backend, layout_x="C", layout_w="C"):
    x, w, b = case.arrays()
    before = [None if a is None else a.copy() for a in (x, w, b)]
    xs, ws = relayout(x, layout_x), relayout(w, layout_w)
    got = case.function(xs, ws, b, **case.kwargs(), backend=backend)
    dtype = np.result_type(*(np.asarray(a).dtype for a in (xs, ws, b) if a is not None))  # lists are float64
    assert isinstance(got, np.ndarray)
    assert got.shape == case.out_shape, f"shape {got.shape}, definition says {case.out_shape}"
    assert got.dtype == dtype, f"dtype {got.dtype}, expected {dtype}"
    expected = oracle_forward(case, x, w, b)
    scale = oracle_forward(case, np.abs(x), np.abs(w), None if b is None else np.abs(b))
    check_close(got, expected, scale, dtype, f"forward on {backend} (x {layout_x}, w {layout_w})")
    for name, a, a0 in zip(("x", "weight", "bias"), (x, w, b), before):
        if a is not None:
            assert np.array_equal(a, a0), f"{name} was written to"
    if isinstance(xs, np.ndarray) and layout_x != "list":
        assert np.array_equal(xs, x), "x view was written to"


def check_backward_adjoint(case, backend, seed):
    """grad_x, grad_w, grad_b against the definition through the adjoint identities."""
    x, w, _ = case.arrays()
    dy = case.grad_output()
    rng = np.random.default_rng(seed)
    needs = tuple(n for n in ("input", "weight", "bias") if rng.random() < 0.8) or ("input",)
    gx, gw, gb = case.backward_function(dy, x, w, **case.kwargs(), needs=needs, backend=backend)
    for name, key, g, shape in (("grad_x", "input", gx, case.x_shape), ("grad_w", "weight", gw, case.weight_shape),
                                ("grad_b", "bias", gb, (case.c_out,))):
        if key not in needs:
            assert g is None, f"{name} computed though not in needs={needs}"
        else:
            assert isinstance(g, np.ndarray) and g.shape == shape, f"{name}: {getattr(g, 'shape', g)} != {shape}"
            assert g.dtype == np.dtype(case.dtype), f"{name} dtype {g.dtype}"
    dy64 = dy.astype(np.float64)
    for _ in range(2):  # two random probes each
        if gx is not None:
            u = rng.standard_normal(case.x_shape)
            lhs = np.vdot(gx.astype(np.float64), u)
            rhs = np.vdot(dy64, oracle_forward(case, u, w))
            scale = np.vdot(np.abs(dy64), oracle_forward(case, np.abs(u), np.abs(w)))
            check_close(lhs, rhs, scale, case.dtype, f"<grad_x, u> on {backend}")
        if gw is not None:
            v = rng.standard_normal(case.weight_shape)
            lhs = np.vdot(gw.astype(np.float64), v)
            rhs = np.vdot(dy64, oracle_forward(case, x, v))
            scale = np.vdot(np.abs(dy64), oracle_forward(case, np.abs(x), np.abs(v)))
            check_close(lhs, rhs, scale, case.dtype, f"<grad_w, v> on {backend}")
    if gb is not None:
        axes = tuple(i for i in range(dy.ndim) if i != (1 if case.batch is not None else 0))
        check_close(gb, dy64.sum(axis=axes), np.abs(dy64).sum(axis=axes), case.dtype, f"grad_b on {backend}")


def check_backward_torch(case, backend):
    """grad_x, grad_w, grad_b elementwise against PyTorch autograd (float64 reference)."""
    import torch
    import torch.nn.functional as F

    x, w, b = case.arrays()
    dy = case.grad_output()

    def torch_grads(xa, wa, ba, dya):
        t = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in (xa, wa, ba)]
        xt = t[0] if case.batch is not None else t[0][None]
        nd = case.ndim
        widths = [v for pb, pe in zip(reversed(case.pad_begin), reversed(case.pad_end)) for v in (pb, pe)]
        if case.transposed:
            # unpadded, then cropped (negative widths) or extended (positive: no input lands there)
            full = getattr(F, f"conv_transpose{nd}d")(xt, t[1], None, case.stride, 0, case.output_padding,
                                                      case.groups, case.dilation)
            out = F.pad(full, [-v for v in widths])
        else:
            out = getattr(F, f"conv{nd}d")(F.pad(xt, widths), t[1], None, case.stride, 0, case.dilation, case.groups)
        out = out + t[2].reshape(-1, *(1,) * nd)
        out = out if case.batch is not None else out[0]
        out.backward(torch.tensor(np.asarray(dya, dtype=np.float64)))
        return [np.zeros(a.shape) if a.grad is None else a.grad.numpy() for a in t]

    b = np.zeros(case.c_out, dtype=case.dtype) if b is None else b
    expected = torch_grads(x, w, b, dy)
    scale = torch_grads(np.abs(x), np.abs(w), np.abs(b), np.abs(dy))
    got = case.backward_function(dy, x, w, **case.kwargs(), backend=backend)
    for name, g, e, s in zip(("grad_x", "grad_w", "grad_b"), got, expected, scale):
        check_close(g, e, s, case.dtype, f"{name} vs torch autograd on {backend}")


def check_adjoint_pair(case, backend):
    """tconv's conv is the adjoint of its conv_transpose, with the same weight."""
    import tconv

    x, w, _ = case.arrays()
    kwargs = dict(stride=case.stride, padding=tuple(zip(case.pad_begin, case.pad_end)),
                  dilation=case.dilation, groups=case.groups)
    ct = getattr(tconv, f"conv_transpose{case.ndim}d")
    cv = getattr(tconv, f"conv{case.ndim}d")
    y_fwd = ct(x, w, None, output_padding=case.output_padding, **kwargs, backend=backend)
    y = np.random.default_rng(case.seed + 7).standard_normal(y_fwd.shape).astype(case.dtype)
    x_back = cv(y, w, None, **kwargs, backend=backend)
    assert x_back.shape == x.shape, f"conv of the output gives {x_back.shape}, not x's {x.shape}"
    lhs = np.vdot(y_fwd.astype(np.float64), y)
    rhs = np.vdot(x.astype(np.float64), x_back)
    scale = np.vdot(np.abs(ct(np.abs(x), np.abs(w), None, output_padding=case.output_padding, **kwargs,
                              backend=backend)).astype(np.float64), np.abs(y))
    check_close(lhs, rhs, scale, case.dtype, f"<conv_transpose(x), y> vs <x, conv(y)> on {backend}")


# --------------------------------------------------------------------------- #
# bounded tests (CI)
# --------------------------------------------------------------------------- #
@settings(max_examples=50, **CI_SETTINGS)
@given(data=st.data())
def test_forward_matches_definition_in_any_layout(backend_name, cases, data):
    case = data.draw(cases(max_work=2500), label="case")
    layout_x = data.draw(st.sampled_from(LAYOUTS), label="layout_x")
    layout_w = data.draw(st.sampled_from(LAYOUTS), label="layout_w")
    check_forward(case, backend_name, layout_x, layout_w)


@settings(max_examples=40, **CI_SETTINGS)
@given(data=st.data())
def test_backward_satisfies_adjoint_identities(backend_name, cases, data):
    case = data.draw(cases(output_size=False, max_work=1500), label="case")
    check_backward_adjoint(case, backend_name, data.draw(st.integers(0, 2**32 - 1), label="probe_seed"))


@settings(max_examples=30, **CI_SETTINGS)
@given(data=st.data())
def test_conv_and_conv_transpose_are_adjoint(backend_name, cases, data):
    # output_padding below the stride: conv of the output then has x's size again
    case = data.draw(cases(transposed=True, output_size=False, padding_forms=("int", "per_dim", "pairs", "valid")),
                     label="case")
    if any(op >= s for op, s in zip(case.output_padding, case.stride)):
        case = dataclasses.replace(case, output_padding=(0,) * case.ndim, output_padding_arg=None)
        assume(min(case.out_size) >= 1)
    check_adjoint_pair(case, backend_name)


@settings(max_examples=15, **CI_SETTINGS)
@given(data=st.data())
def test_backward_matches_torch_autograd_elementwise(backend_name, cases, data):
    pytest.importorskip("torch")
    case = data.draw(cases(output_size=False, dtypes=("float64",), max_work=1500), label="case")
    check_backward_torch(case, backend_name)


# --------------------------------------------------------------------------- #
# long fuzz (-m slow): everything above plus torch autograd, TCONV_FUZZ_EXAMPLES cases per backend
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_long_fuzz(backend_name, cases, capsys):
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    counts = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, **CI_SETTINGS)
    @given(data=st.data())
    def fuzz(data):
        case = data.draw(cases(max_work=4000), label="case")
        done = ["forward"]
        check_forward(case, backend_name, data.draw(st.sampled_from(LAYOUTS)), data.draw(st.sampled_from(LAYOUTS)))
        if case.output_size is None:
            check_backward_adjoint(case, backend_name, data.draw(st.integers(0, 2**32 - 1)))
            done.append("backward (adjoint)")
            if have_torch and case.dtype == "float64":
                check_backward_torch(case, backend_name)
                done.append("backward (torch)")
        counts.update(done + ["cases", f"{case.ndim}-D"])  # only examples that ran to the end

    fuzz()
    with capsys.disabled():
        print(f"\n[tconv fuzz] backend {backend_name}: {dict(counts)} (TCONV_FUZZ_EXAMPLES={FUZZ_EXAMPLES})")
    assert counts["cases"] > 0

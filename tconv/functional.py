"""The public functions: transposed and regular convolution, forward and backward.

Each one validates its arguments once (``tconv._args``), then maps itself onto
one of the backend primitives (``tconv.backend``)::

    conv_transpose forward   = scatter(x, weight)          conv forward   = gather(x, weight)
    conv_transpose grad x    = gather(grad_out, weight)    conv grad x    = scatter(grad_out, weight)
    conv_transpose grad w    = weight_grad(grad_out, x)    conv grad w    = weight_grad(x, grad_out)

The functions for 1, 2 and 3 spatial dims are made by one factory each, so
they cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._args import _plain, prepare
from .registry import resolve_backend

__all__ = [
    f"{op}{d}d{suffix}"
    for op in ("conv_transpose", "conv")
    for d in (1, 2, 3)
    for suffix in ("", "_backward")
]

NEEDS_ALL = ("input", "weight", "bias")


def _zeros(call, shape5, bias=None):
    """Result of an empty problem (no samples, or no channels to sum over)."""
    out = call.backend.asarray(np.zeros(shape5), call.x.dtype)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1, 1)
    return out


#: Forward calls already validated: (function, backend name, the arrays' shapes and
#: dtypes, the arguments) -> the plan. A hit skips ``prepare`` and goes straight
#: to the backend. Only exact NumPy arrays and exact ints/strs/tuples of them are
#: keyed (``2.0 == 2`` and ``True == 1`` hash alike, but must still be rejected);
#: empty problems are never stored (they take ``_zeros``).
_FAST_PLANS: dict = {}
_FAST_PLANS_SIZE = 512
_ndarray = np.ndarray


def _forward(transposed: bool, ndim: int, x, weight, bias, stride, padding, output_padding,
             groups, dilation, output_size, backend):
    key = None
    if (type(x) is _ndarray and type(weight) is _ndarray and (bias is None or type(bias) is _ndarray)
            and (type(stride) is int or _plain(stride)) and (type(padding) is int or _plain(padding))
            and (type(output_padding) is int or _plain(output_padding))
            and (type(groups) is int or _plain(groups)) and (type(dilation) is int or _plain(dilation))
            and (output_size is None or _plain(output_size))):
        engine = resolve_backend(backend)
        key = (transposed, ndim, engine.name, x.shape, x.dtype, weight.shape, weight.dtype,
               None if bias is None else (bias.shape, bias.dtype),
               stride, padding, output_padding, groups, dilation, output_size)
        plan = _FAST_PLANS.get(key)
        if plan is not None:
            # as ``prepare`` + ``Prepared.finish`` do on a cached plan, minus their bookkeeping
            dtype = plan.compute_dtype
            x5 = engine.asarray(x, dtype).reshape(plan.x5)
            w5 = engine.asarray(weight, dtype).reshape(plan.weight5)
            if bias is not None:
                bias = engine.asarray(bias, dtype)
            if transposed:
                out = engine.scatter(x5, w5, bias, plan.geom)
            else:
                out = engine.gather(x5, w5, bias, plan.geom)
            out = out.reshape(plan.out_shape)
            if out.dtype != plan.result_dtype:
                out = out.astype(plan.result_dtype)
            return engine.to_user(out, plan.user_numpy)
    call = prepare(
        transposed=transposed, ndim=ndim, x=x, weight=weight, bias=bias, stride=stride,
        padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
        output_size=output_size, backend=backend,
    )
    if call.x.size == 0 or call.weight.size == 0:
        out = _zeros(call, call.plan.out5, call.bias)
    else:
        if key is not None and call.backend.name == key[2]:
            if len(_FAST_PLANS) >= _FAST_PLANS_SIZE:
                _FAST_PLANS.clear()
            _FAST_PLANS[key] = call.plan
        if transposed:
            out = call.backend.scatter(call.x, call.weight, call.bias, call.geom)
        else:
            out = call.backend.gather(call.x, call.weight, call.bias, call.geom)
    return call.finish(out, call.plan.out_shape)


def _check_needs(needs, fname):
    if isinstance(needs, str):
        needs = (needs,)
    try:
        needs = tuple(needs)
    except TypeError:
        raise TypeError(f"{fname}: needs must be a sequence drawn from {NEEDS_ALL}, got {needs!r}") from None
    unknown = [n for n in needs if n not in NEEDS_ALL]
    if unknown:
        raise ValueError(f"{fname}: needs must be drawn from {NEEDS_ALL}, got {needs!r}")
    return needs


def _backward(transposed: bool, ndim: int, grad_output, x, weight, stride, padding, output_padding,
              groups, dilation, needs, backend, output_size=None):
    needs = _check_needs(needs, ("conv_transpose" if transposed else "conv") + f"{ndim}d_backward")
    call = prepare(
        transposed=transposed, ndim=ndim, x=x, weight=weight, stride=stride, padding=padding,
        output_padding=output_padding, groups=groups, dilation=dilation, grad_output=grad_output,
        output_size=output_size, backward=True, backend=backend,
    )
    engine, geom, dy = call.backend, call.geom, call.grad_output
    empty = dy.size == 0 or call.x.size == 0 or call.weight.size == 0
    want_x, want_w = "input" in needs, "weight" in needs
    grad_x = grad_w = grad_b = None
    if empty:
        grad_x = _zeros(call, call.x.shape) if want_x else None
        grad_w = _zeros(call, call.weight.shape) if want_w else None
    elif transposed and want_x and want_w:
        # both read grad_output through the same im2col: one call for the pair
        grad_x, grad_w = engine.gather_and_weight_grad(dy, call.weight, call.x, geom)
    elif transposed:
        grad_x = engine.gather(dy, call.weight, None, geom) if want_x else None
        grad_w = engine.weight_grad(dy, call.x, geom) if want_w else None
    else:
        grad_x = engine.scatter(dy, call.weight, None, geom) if want_x else None
        grad_w = engine.weight_grad(call.x, dy, geom) if want_w else None
    if want_x:
        grad_x = call.finish(grad_x, call.plan.x_shape)
    if want_w:
        grad_w = call.finish(grad_w, call.plan.weight_shape)
    if "bias" in needs:
        grad_b = call.finish(dy.sum(axis=(0, 2, 3, 4)), call.plan.out_shape[-ndim - 1 : -ndim])
    return grad_x, grad_w, grad_b


def _make_conv_transpose(ndim: int):
    def conv_transpose(
        x: Any,
        weight: Any,
        bias: Any = None,
        stride: int | Sequence[int] = 1,
        padding: Any = 0,
        output_padding: int | Sequence[int] = 0,
        groups: int = 1,
        dilation: int | Sequence[int] = 1,
        *,
        output_size: Sequence[int] | None = None,
        backend: str | None = None,
    ):
        return _forward(True, ndim, x, weight, bias, stride, padding, output_padding,
                        groups, dilation, output_size, backend)

    conv_transpose.__name__ = conv_transpose.__qualname__ = f"conv_transpose{ndim}d"
    conv_transpose.__doc__ = f"""{ndim}-D transposed convolution, as PyTorch's ``F.conv_transpose{ndim}d``.

    Every input cell scatters ``value * kernel`` onto the output at
    ``cell * stride - pad_begin + tap * dilation``; cells that land outside
    the output are dropped.

    Parameters
    ----------
    x : array, ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``
    weight : array, ``(C_in, C_out // groups, *kernel)``
    bias : array ``(C_out,)`` or None
    stride, output_padding, dilation : int or {ndim} ints
    padding : int, {ndim} ints, {ndim} ``(begin, end)`` pairs, ``"valid"``, ``"same"`` or ``"same_lower"``
    groups : int
    output_size : {ndim} ints (or the full shape), optional
        The spatial size wanted; chooses ``output_padding`` (PyTorch's rule),
        or with ``"same"``/``"same_lower"`` the crop (ONNX ``output_shape``).
    backend : str, optional
        Run this call on that backend (see ``tconv.list_backends()``).

    Returns
    -------
    array, ``(N, C_out, *out)`` (unbatched in, unbatched out), float32/float64
    as the inputs (float16 in, float16 out; ints and bools give float64).
    """
    return conv_transpose


def _make_conv(ndim: int):
    def conv(
        x: Any,
        weight: Any,
        bias: Any = None,
        stride: int | Sequence[int] = 1,
        padding: Any = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        *,
        backend: str | None = None,
    ):
        return _forward(False, ndim, x, weight, bias, stride, padding, 0, groups, dilation, None, backend)

    conv.__name__ = conv.__qualname__ = f"conv{ndim}d"
    conv.__doc__ = f"""{ndim}-D convolution (cross-correlation), as PyTorch's ``F.conv{ndim}d``.

    The adjoint of :func:`conv_transpose{ndim}d`: output cell ``l`` gathers
    ``weight * x`` from ``l * stride - pad_begin + tap * dilation``.

    Parameters
    ----------
    x : array, ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``
    weight : array, ``(C_out, C_in // groups, *kernel)``
    bias : array ``(C_out,)`` or None
    stride, dilation : int or {ndim} ints
    padding : int, {ndim} ints, {ndim} ``(begin, end)`` pairs, ``"valid"``, ``"same"`` or ``"same_lower"``
    groups : int
    backend : str, optional

    Returns
    -------
    array, ``(N, C_out, *out)``
    """
    return conv


def _make_conv_transpose_backward(ndim: int):
    def conv_transpose_backward(
        grad_output: Any,
        x: Any,
        weight: Any,
        stride: int | Sequence[int] = 1,
        padding: Any = 0,
        output_padding: int | Sequence[int] = 0,
        groups: int = 1,
        dilation: int | Sequence[int] = 1,
        *,
        needs: Sequence[str] = NEEDS_ALL,
        backend: str | None = None,
        output_size: Sequence[int] | None = None,
    ):
        return _backward(True, ndim, grad_output, x, weight, stride, padding, output_padding,
                         groups, dilation, needs, backend, output_size)

    conv_transpose_backward.__name__ = conv_transpose_backward.__qualname__ = f"conv_transpose{ndim}d_backward"
    conv_transpose_backward.__doc__ = f"""Gradients of :func:`conv_transpose{ndim}d`.

    Parameters
    ----------
    grad_output : array of the forward output's shape
    x, weight, stride, padding, output_padding, groups, dilation
        As given to the forward call.
    needs : sequence of ``"input"``, ``"weight"``, ``"bias"``
        Which gradients to compute; the others come back as None.
    backend : str, optional
    output_size : optional
        As given to the forward call, if it was (an extension of SPEC's signature).

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
    """
    return conv_transpose_backward


def _make_conv_backward(ndim: int):
    def conv_backward(
        grad_output: Any,
        x: Any,
        weight: Any,
        stride: int | Sequence[int] = 1,
        padding: Any = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        *,
        needs: Sequence[str] = NEEDS_ALL,
        backend: str | None = None,
    ):
        return _backward(False, ndim, grad_output, x, weight, stride, padding, 0,
                         groups, dilation, needs, backend)

    conv_backward.__name__ = conv_backward.__qualname__ = f"conv{ndim}d_backward"
    conv_backward.__doc__ = f"""Gradients of :func:`conv{ndim}d`.

    Parameters
    ----------
    grad_output : array of the forward output's shape
    x, weight, stride, padding, dilation, groups
        As given to the forward call.
    needs : sequence of ``"input"``, ``"weight"``, ``"bias"``

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
    """
    return conv_backward


conv_transpose1d, conv_transpose2d, conv_transpose3d = (_make_conv_transpose(d) for d in (1, 2, 3))
conv1d, conv2d, conv3d = (_make_conv(d) for d in (1, 2, 3))
conv_transpose1d_backward, conv_transpose2d_backward, conv_transpose3d_backward = (
    _make_conv_transpose_backward(d) for d in (1, 2, 3)
)
conv1d_backward, conv2d_backward, conv3d_backward = (_make_conv_backward(d) for d in (1, 2, 3))

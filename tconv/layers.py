"""Layers: PyTorch-style modules holding ``.weight`` and ``.bias`` as NumPy arrays.

A layer is a thin shell over :mod:`tconv.functional`: it stores its
hyper-parameters, initialises its parameters as PyTorch does, remembers the
last forward call, and runs the matching backward.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from . import functional as F
from ._args import MAX_ELEMENTS
from .shape import per_dim

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1d", "Conv2d", "Conv3d"]


class _ConvNd:
    transposed: bool
    ndim: int

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, output_padding,
                 groups, bias, dilation, dtype, rng):
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        kernel = per_dim(kernel_size, self.ndim, f"{name}: kernel_size")
        if min(kernel) < 1:
            raise ValueError(f"{name}: kernel_size must be positive, got {kernel_size!r}")
        weight_size = in_channels * (out_channels // groups) * math.prod(kernel)
        if weight_size > MAX_ELEMENTS:
            raise ValueError(
                f"{name}: a weight of in_channels={in_channels} x out_channels/groups="
                f"{out_channels // groups} x kernel_size={kernel} has {weight_size} elements, "
                f"more than can be allocated"
            )
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"{name}: dtype must be a float dtype, got {dtype!r} ({exc})") from None
        if dtype.kind != "f":
            raise TypeError(f"{name}: dtype must be a float dtype, got {dtype}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.groups, self.dilation = groups, dilation

        try:
            rng = np.random.default_rng(rng)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name}: rng must be None, a seed or a numpy Generator, got {rng!r} ({exc})"
            ) from None
        if self.transposed:
            shape = (in_channels, out_channels // groups, *kernel)
        else:
            shape = (out_channels, in_channels // groups, *kernel)
        # PyTorch: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the
        # bias uses the same bound; fan_in is weight.shape[1] * prod(kernel) for both kinds.
        bound = 1.0 / math.sqrt(shape[1] * math.prod(kernel))
        self.weight = rng.uniform(-bound, bound, size=shape).astype(dtype)
        self.bias = rng.uniform(-bound, bound, size=out_channels).astype(dtype) if bias else None
        self.weight_grad = None
        self.bias_grad = None
        self._last_call = None

    def _hyper(self) -> dict:
        args = dict(stride=self.stride, padding=self.padding, groups=self.groups, dilation=self.dilation)
        if self.transposed:
            args["output_padding"] = self.output_padding
        return args

    def __call__(self, x: Any, output_size: Sequence[int] | None = None, *, backend: str | None = None):
        """Forward pass; ``output_size`` as PyTorch's (transposed layers only)."""
        weight, bias = self.weight, self.bias
        transposed = self.transposed
        if not transposed and output_size is not None:
            raise TypeError(f"{type(self).__name__}: output_size applies to transposed convolutions only")
        # What ``self._forward`` (``F.conv_transpose{n}d`` / ``F.conv{n}d``) does with
        # ``**self._hyper()``, without building and unpacking that dict on every call.
        out = F._forward(transposed, self.ndim, x, weight, bias, self.stride, self.padding,
                         self.output_padding if transposed else 0, self.groups, self.dilation,
                         output_size, backend)
        # Keep what backward needs; the weight as it was, should the user replace it.
        self._last_call = (x, weight, bias is not None, output_size, backend)
        return out

    forward = __call__

    def backward(self, grad_output: Any):
        """Gradients of the last forward call.

        Returns the input gradient and stores ``.weight_grad`` and ``.bias_grad``.
        """
        if self._last_call is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward call")
        x, weight, has_bias, output_size, backend = self._last_call
        needs = ("input", "weight", "bias") if has_bias else ("input", "weight")
        extra = {"output_size": output_size} if self.transposed else {}
        grad_x, self.weight_grad, self.bias_grad = self._backward(
            grad_output, x, weight, **self._hyper(), needs=needs, backend=backend, **extra
        )
        return grad_x

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self._hyper().items())
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, {hyper}, bias={self.bias is not None})")


class _ConvTransposeNd(_ConvNd):
    transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1, *,
                 dtype=np.float32, rng=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                         groups, bias, dilation, dtype, rng)


class _RegularConvNd(_ConvNd):
    transposed = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, dtype=np.float32, rng=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, 0,
                         groups, bias, dilation, dtype, rng)


def _layer(base, ndim, forward, backward, doc):
    cls = type(f"{'ConvTranspose' if base.transposed else 'Conv'}{ndim}d", (base,), {
        "ndim": ndim, "_forward": staticmethod(forward), "_backward": staticmethod(backward),
        "__doc__": doc, "__module__": __name__,
    })
    return cls


_DOC = """{kind} layer over {ndim}-D inputs, with PyTorch's arguments and initialisation.

``.weight`` ({layout}) and ``.bias`` are plain NumPy arrays, uniform in
``±1/sqrt(fan_in)``; replace them freely (the kernel size used is the
weight's). ``layer(x)`` runs forward, ``layer.backward(grad_output)``
returns the input gradient and stores ``.weight_grad`` and ``.bias_grad``.
"""

ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (
    _layer(_ConvTransposeNd, d, getattr(F, f"conv_transpose{d}d"), getattr(F, f"conv_transpose{d}d_backward"),
           _DOC.format(kind="Transposed convolution", ndim=d, layout="(C_in, C_out // groups, *kernel)"))
    for d in (1, 2, 3)
)
Conv1d, Conv2d, Conv3d = (
    _layer(_RegularConvNd, d, getattr(F, f"conv{d}d"), getattr(F, f"conv{d}d_backward"),
           _DOC.format(kind="Convolution", ndim=d, layout="(C_out, C_in // groups, *kernel)"))
    for d in (1, 2, 3)
)

"""Shape inference: the one place where convolution sizes are computed.

Per spatial dimension, a transposed convolution maps ``in`` cells to::

    out = (in - 1) * stride - pad_begin - pad_end + dilation * (k - 1) + output_padding + 1

and a regular convolution is its adjoint::

    out = (in + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1

Every other module asks this one for sizes and for the resolution of the
padding forms (int, per-dim ints, ``(begin, end)`` pairs, ``"valid"``,
``"same"`` = ONNX ``SAME_UPPER``, ``"same_lower"`` = ONNX ``SAME_LOWER``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Union

import numpy as np

IntOrSeq = Union[int, Sequence[int]]
Padding = Union[int, str, Sequence[int], Sequence[Sequence[int]]]

PADDING_MODES = ("valid", "same", "same_lower")

#: Sizes, strides, dilations and paddings past this are refused: nothing that
#: large can be allocated, and keeping every index product far from 2**63 means
#: the compiled kernels' Py_ssize_t arithmetic cannot overflow.
MAX_EXTENT = 2**40

__all__ = [
    "conv_transpose_output_size",
    "conv_output_size",
    "output_padding_for",
    "resolve_padding",
    "solve",
    "Solution",
    "PADDING_MODES",
]


# --------------------------------------------------------------------------- #
# argument helpers (shared with the API module)
# --------------------------------------------------------------------------- #
def _is_int(value) -> bool:
    """An integer scalar (Python or NumPy, 0-d arrays included); bools are not."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        return False
    return not (isinstance(value, np.ndarray) and value.ndim > 0)  # arrays have __index__ too


def as_int(value, name: str) -> int:
    """``value`` as a Python int; bools and non-integers are a TypeError."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def per_dim(value, ndim: int, name: str) -> tuple[int, ...]:
    """Expand an int or a sequence of ``ndim`` ints to a tuple of ``ndim`` ints."""
    if _is_int(value):
        return _bounded((operator.index(value),) * ndim, name)
    if not _is_sequence(value):
        raise TypeError(f"{name} must be an int or {ndim} ints, got {value!r}")
    items = tuple(value)
    if len(items) != ndim:
        raise ValueError(
            f"{name} must be an int or {ndim} ints (one per spatial dim), got {value!r}"
        )
    return _bounded(tuple(as_int(v, name) for v in items), name)


def _bounded(values: tuple[int, ...], name: str) -> tuple[int, ...]:
    if any(abs(v) > MAX_EXTENT for v in values):
        raise ValueError(f"{name} {values} is too large (limit {MAX_EXTENT} per dim)")
    return values


def _check_positive(values: tuple[int, ...], name: str) -> None:
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")


def _stride_dilation(stride, dilation, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``stride`` and ``dilation`` per dim, both checked positive."""
    strides = per_dim(stride, ndim, "stride")
    dil = per_dim(dilation, ndim, "dilation")
    _check_positive(strides, "stride")
    _check_positive(dil, "dilation")
    return strides, dil


def _check_non_negative(values: tuple[int, ...], name: str) -> None:
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative, got {values}")


def _sizes(input_size: IntOrSeq, kernel_size: IntOrSeq) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate the sizes; the number of spatial dims is ``input_size``'s (or the
    kernel's, when ``input_size`` is a bare int)."""
    if _is_int(input_size):
        ndim = 1 if _is_int(kernel_size) else len(_as_tuple(kernel_size, "kernel_size"))
        input_size = per_dim(input_size, ndim, "input_size")
    else:
        items = _as_tuple(input_size, "input_size")
        if not 1 <= len(items) <= 3:
            raise ValueError(f"input_size must give 1 to 3 spatial sizes, got {input_size!r}")
        input_size = per_dim(items, len(items), "input_size")
        if not _is_int(kernel_size) and len(_as_tuple(kernel_size, "kernel_size")) != len(items):
            raise ValueError(
                f"input_size {input_size} and kernel_size {kernel_size!r} give different numbers "
                f"of spatial dims"
            )
    kernel = per_dim(kernel_size, len(input_size), "kernel_size")
    _check_non_negative(input_size, "input_size")
    _check_positive(kernel, "kernel_size")
    return input_size, kernel


def _as_tuple(value, name: str) -> tuple:
    if not _is_sequence(value):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}")
    return tuple(value)


def _is_sequence(value) -> bool:
    """A list, tuple, range or array of values; not a string, set or mapping (no order)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _numeric_padding(padding, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """int | per-dim ints | per-dim (begin, end) pairs -> (begins, ends)."""
    if _is_int(padding):
        p = operator.index(padding)
        begin = end = (p,) * ndim
    else:
        if not _is_sequence(padding) and not isinstance(padding, np.ndarray):
            raise TypeError(
                f"padding must be an int, {ndim} ints, {ndim} (begin, end) pairs or one of "
                f"{PADDING_MODES}, got {padding!r}"
            )
        items = tuple(padding)
        if len(items) != ndim:
            raise ValueError(
                f"padding must be an int, {ndim} ints or {ndim} (begin, end) pairs "
                f"(one per spatial dim), got {padding!r}"
            )
        if all(isinstance(i, (tuple, list, np.ndarray)) for i in items):
            if any(len(i) != 2 for i in items):
                raise ValueError(f"padding pairs must be (begin, end), got {padding!r}")
            begin = tuple(as_int(i[0], "padding") for i in items)
            end = tuple(as_int(i[1], "padding") for i in items)
        else:
            begin = end = tuple(as_int(i, "padding") for i in items)
    if any(v < 0 for v in begin + end):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    _bounded(begin + end, "padding")
    return begin, end


def _split_total(total: int, mode: str) -> tuple[int, int]:
    """Split a total crop as ONNX does: SAME_UPPER puts the odd cell at the end.

    Floor division, as SPEC and ONNX's reference implementation: a negative
    total (kernel shorter than stride, or an ``output_size`` past the full
    output) is legal and adds computed cells instead of cropping.
    """
    half = total // 2
    if mode == "same":
        return half, total - half
    return total - half, half


def resolve_padding(
    padding: Padding,
    input_size: IntOrSeq,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    output_padding: IntOrSeq = 0,
    *,
    transposed: bool = True,
    output_size: IntOrSeq | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolve any padding form to per-dim ``(pad_begin, pad_end)`` tuples.

    Parameters
    ----------
    padding
        int, per-dim ints, per-dim ``(begin, end)`` pairs, or ``"valid"``,
        ``"same"`` (ONNX SAME_UPPER) or ``"same_lower"`` (ONNX SAME_LOWER).
    transposed
        Whether the sizes are those of a transposed convolution (where
        ``"same"`` means ``out = in * stride``) or a regular one (``out =
        ceil(in / stride)``).
    output_size
        Transposed only, with ``"same"``/``"same_lower"``: the size wanted
        (ONNX ``output_shape``); the total crop is recomputed from it.

    Returns
    -------
    (pad_begin, pad_end)
        Two tuples of ints. Only the ``"same"`` modes with an ``output_size``
        may give negative values (extra computed cells).
    """
    inp, kernel = _sizes(input_size, kernel_size)
    ndim = len(inp)
    if not isinstance(padding, str):
        return _numeric_padding(padding, ndim)
    mode = padding.lower()
    if mode not in PADDING_MODES:
        raise ValueError(f"padding must be an int, ints, pairs or one of {PADDING_MODES}, got {padding!r}")
    if mode == "valid":
        return (0,) * ndim, (0,) * ndim
    strides, dil = _stride_dilation(stride, dilation, ndim)
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dil, kernel))
    if transposed:
        op = per_dim(output_padding, ndim, "output_padding")
        if output_size is None:
            target = tuple(i * s for i, s in zip(inp, strides))
        else:
            target = per_dim(output_size, ndim, "output_size")
        totals = [s * (i - 1) + o + e - t for i, s, o, e, t in zip(inp, strides, op, extent, target)]
    else:
        target = tuple(-(-i // s) for i, s in zip(inp, strides))
        totals = [max((t - 1) * s + e - i, 0) for i, s, e, t in zip(inp, strides, extent, target)]
    pairs = [_split_total(t, mode) for t in totals]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


# --------------------------------------------------------------------------- #
# the formulas
# --------------------------------------------------------------------------- #
def conv_transpose_output_size(
    input_size: IntOrSeq,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    output_padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
) -> tuple[int, ...]:
    """Spatial output size of a transposed convolution.

    ``out = (in - 1) * stride - pad_begin - pad_end + dilation * (k - 1) + output_padding + 1``

    Examples
    --------
    >>> conv_transpose_output_size((2, 2), 3)
    (4, 4)
    >>> conv_transpose_output_size(7, 4, stride=2, padding=1)
    (14,)
    """
    inp, kernel = _sizes(input_size, kernel_size)
    ndim = len(inp)
    strides, dil = _stride_dilation(stride, dilation, ndim)
    op = per_dim(output_padding, ndim, "output_padding")
    _check_non_negative(op, "output_padding")
    begin, end = resolve_padding(padding, inp, kernel, strides, dil, op, transposed=True)
    return _positive(transposed_size(inp, kernel, strides, begin, end, op, dil), inp, kernel, strides, padding, dil)


def _positive(sizes: tuple[int, ...], input_size, kernel, stride, padding, dilation) -> tuple[int, ...]:
    if min(sizes) < 1:
        raise ValueError(
            f"output size {sizes} is below 1 for input_size {input_size}, kernel_size {kernel}, "
            f"stride {stride}, padding {padding!r}, dilation {dilation}: no output cell is left"
        )
    return sizes


def transposed_size(input_size, kernel, stride, pad_begin, pad_end, output_padding, dilation) -> tuple[int, ...]:
    """The transposed formula on resolved per-dim tuples, unchecked.

    For callers that validated their arguments already; pads may be negative
    here (``"same"`` with an ``output_size`` past the full output).
    """
    return tuple(
        (i - 1) * s - b - e + d * (k - 1) + o + 1
        for i, s, b, e, d, k, o in zip(input_size, stride, pad_begin, pad_end, dilation, kernel, output_padding)
    )


def regular_size(input_size, kernel, stride, pad_begin, pad_end, dilation) -> tuple[int, ...]:
    """The regular formula on resolved per-dim tuples, unchecked."""
    return tuple(
        (i + b + e - d * (k - 1) - 1) // s + 1
        for i, s, b, e, d, k in zip(input_size, stride, pad_begin, pad_end, dilation, kernel)
    )


def conv_output_size(
    input_size: IntOrSeq,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
) -> tuple[int, ...]:
    """Spatial output size of a regular convolution.

    ``out = (in + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1``

    Examples
    --------
    >>> conv_output_size((4, 4), 3)
    (2, 2)
    """
    inp, kernel = _sizes(input_size, kernel_size)
    ndim = len(inp)
    strides, dil = _stride_dilation(stride, dilation, ndim)
    begin, end = resolve_padding(padding, inp, kernel, strides, dil, transposed=False)
    return _positive(regular_size(inp, kernel, strides, begin, end, dil), inp, kernel, strides, padding, dil)


def reachable_output_sizes(
    input_size: IntOrSeq,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
) -> tuple[range, ...]:
    """Per dim, the sizes ``smallest .. smallest + stride - 1`` that ``output_padding``
    ``0 .. stride - 1`` give (PyTorch's rule); ``smallest`` may be below 1, where
    only the positive sizes of the range exist."""
    inp, kernel = _sizes(input_size, kernel_size)
    ndim = len(inp)
    strides, dil = _stride_dilation(stride, dilation, ndim)
    begin, end = resolve_padding(padding, inp, kernel, strides, dil, transposed=True)
    smallest = transposed_size(inp, kernel, strides, begin, end, (0,) * ndim, dil)
    return tuple(range(m, m + s) for m, s in zip(smallest, strides))


def output_padding_for(
    input_size: IntOrSeq,
    output_size: IntOrSeq,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
) -> tuple[int, ...]:
    """The ``output_padding`` that makes a transposed convolution produce ``output_size``.

    PyTorch's rule: the reachable sizes per dim are ``smallest .. smallest +
    stride - 1``, ``smallest`` being the size with ``output_padding = 0``.

    Raises
    ------
    ValueError
        When a size is not reachable; the message lists the reachable ones.

    Examples
    --------
    >>> output_padding_for(7, 14, 3, stride=2, padding=1)
    (1,)
    """
    inp, kernel = _sizes(input_size, kernel_size)
    ndim = len(inp)
    wanted = per_dim(output_size, ndim, "output_size")
    reachable = reachable_output_sizes(inp, kernel, stride, padding, dilation)
    for dim, (want, sizes) in enumerate(zip(wanted, reachable)):
        if want < 1 or want not in sizes:
            positive = range(max(1, sizes.start), sizes.stop)
            which = f"{positive.start}..{positive.stop - 1}" if positive else "none (all below 1)"
            raise ValueError(
                f"output_size {wanted} is not reachable: in spatial dim {dim} the sizes "
                f"reachable with this kernel, stride, padding and dilation are "
                f"{which} (output_padding 0..{sizes.stop - sizes.start - 1}), got {want}"
            )
    return tuple(w - r.start for w, r in zip(wanted, reachable))


# --------------------------------------------------------------------------- #
# the inverse question: which layers map size A to size B?
# --------------------------------------------------------------------------- #
class Solution(tuple):
    """One (kernel, stride, padding, output_padding) choice for one spatial dim.

    A tuple, so it unpacks and compares as one; ``repr`` is the short form
    used in the docs and by ``python -m tconv explain --from/--to``
    (``k4 s2 p1``: defaults are left out).
    """

    __slots__ = ()

    def __new__(cls, kernel: int, stride: int, padding: int, output_padding: int):
        return super().__new__(cls, (kernel, stride, padding, output_padding))

    kernel = property(operator.itemgetter(0))
    stride = property(operator.itemgetter(1))
    padding = property(operator.itemgetter(2))
    output_padding = property(operator.itemgetter(3))

    def as_kwargs(self) -> dict[str, int]:
        """The layer arguments, defaults left out: ``{"kernel_size": 4, "stride": 2, "padding": 1}``."""
        kwargs = {"kernel_size": self.kernel, "stride": self.stride}
        if self.padding:
            kwargs["padding"] = self.padding
        if self.output_padding:
            kwargs["output_padding"] = self.output_padding
        return kwargs

    def __repr__(self) -> str:
        parts = [f"k{self.kernel}", f"s{self.stride}"]
        if self.padding:
            parts.append(f"p{self.padding}")
        if self.output_padding:
            parts.append(f"op{self.output_padding}")
        return " ".join(parts)


def _simplicity(solution: Solution, ratio: float) -> tuple:
    """Sort key of :func:`solve`: smaller is simpler.

    First the stride nearest the size ratio (the stride does the upsampling;
    the kernel only fills the gaps), then the fewest cells computed and thrown
    away or added (kernel + padding + output_padding), then the fewest
    non-default knobs, then the smaller kernel.
    """
    kernel, stride, padding, output_padding = solution
    knobs = bool(padding) + bool(output_padding)
    return (abs(stride - ratio), kernel + padding + output_padding, knobs, kernel)


def solve(
    input_size: int,
    output_size: int,
    *,
    max_kernel: int = 16,
    max_stride: int = 8,
    limit: int | None = 10,
) -> list[Solution]:
    """Common transposed-convolution settings mapping ``input_size`` to ``output_size``.

    One spatial dim, dilation 1, symmetric padding. Searches kernels
    ``1..max_kernel`` and strides ``1..max_stride``; keeps a kernel no smaller
    than the stride (a smaller one leaves output cells no input reaches), a
    padding smaller than the kernel (a wider crop throws whole input cells
    away) and an ``output_padding`` smaller than the stride (PyTorch's rule).
    With ``input_size == 1`` the stride has no effect, so only stride 1 is
    listed. Each answer is confirmed by :func:`conv_transpose_output_size`.

    Parameters
    ----------
    input_size, output_size : int
        Positive sizes of one spatial dim.
    max_kernel, max_stride : int
        The search bounds.
    limit : int or None
        Return at most this many (None: all).

    Returns
    -------
    list of Solution
        Simplest first: the stride nearest ``output_size / input_size``, then
        the smallest ``kernel + padding + output_padding``, then the fewest
        non-default arguments.

    Examples
    --------
    >>> solve(7, 14)[:3]
    [k2 s2, k4 s2 p1, k3 s2 p1 op1]
    >>> solve(1, 4)[0]
    k4 s1
    """
    inp = as_int(input_size, "input_size")
    out = as_int(output_size, "output_size")
    if inp < 1 or out < 1:
        raise ValueError(f"sizes must be positive, got input_size={inp}, output_size={out}")
    for value, name in ((max_kernel, "max_kernel"), (max_stride, "max_stride")):
        if as_int(value, name) < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    found = []
    for stride in range(1, (1 if inp == 1 else max_stride) + 1):
        for kernel in range(stride, max_kernel + 1):
            # out = (in - 1) * s - 2p + k + op   =>   2p = (in - 1) * s + k + op - out
            for op in range(stride):
                twice_pad = (inp - 1) * stride + kernel + op - out
                if twice_pad < 0 or twice_pad % 2:
                    continue
                pad = twice_pad // 2
                if pad >= kernel:
                    continue
                if conv_transpose_output_size(inp, kernel, stride, pad, op)[0] != out:
                    continue  # pragma: no cover - the algebra above is the formula
                found.append(Solution(kernel, stride, pad, op))
    ratio = out / inp
    found.sort(key=lambda s: _simplicity(s, ratio))
    return found if limit is None else found[:limit]

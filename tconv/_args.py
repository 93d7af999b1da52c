"""Argument validation and normalisation, done once per call in Python.

Everything a user may pass (lists, read-only or Fortran-ordered arrays, int
dtypes, every padding form, ``output_size``) is checked here and turned into
what backends take: C-contiguous 5-D arrays of one float dtype and a
:class:`~tconv.backend.Geometry` of plain ints. Error messages name the
function, the argument, the value, and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shape
from .shape import MAX_EXTENT
from .backend import Backend, Geometry
from .registry import resolve_backend


#: Arrays of more elements than this are refused up front (nothing can hold them).
MAX_ELEMENTS = 2**56



@dataclass(frozen=True)
class CallPlan:
    """Everything a call's arguments determine, except the arrays themselves.

    Computed once per distinct (shapes, dtypes, arguments) and cached, so that
    a layer called in a loop pays for validation once.
    """

    fname: str
    geom: Geometry
    x5: tuple[int, ...]  # the 5-D shapes the kernels see
    weight5: tuple[int, ...]
    out5: tuple[int, ...]
    out_shape: tuple[int, ...]  # the user-facing shapes: forward output, x, weight
    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    compute_dtype: np.dtype
    result_dtype: np.dtype
    user_numpy: bool


class Prepared:
    """One validated call, ready for a backend: its plan and its normalised arrays.

    (A plain slotted class: it is built on every call, and a frozen
    dataclass costs microseconds there.)
    """

    __slots__ = ("plan", "backend", "x", "weight", "bias", "grad_output")

    def __init__(self, plan: CallPlan, backend: Backend, x, weight, bias, grad_output):
        self.plan = plan
        self.backend = backend
        self.x = x  # 5-D, C-contiguous, compute dtype
        self.weight = weight
        self.bias = bias  # 1-D or None
        self.grad_output = grad_output  # 5-D or None (backward only)

    @property
    def geom(self) -> Geometry:
        return self.plan.geom

    def finish(self, array, user_shape: tuple[int, ...]):
        """Kernel result -> the user's shape, dtype and array kind."""
        array = array.reshape(user_shape)
        if array.dtype != self.plan.result_dtype:
            array = array.astype(self.plan.result_dtype)
        return self.backend.to_user(array, self.plan.user_numpy)


def _as_array(value, name: str, fname: str, backend: Backend, optional: bool = False):
    if value is None:
        if optional:
            return None
        raise TypeError(f"{fname}: {name} is required, got None")
    if backend.is_native(value) or isinstance(value, np.ndarray):
        array = value
    else:
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise TypeError(f"{fname}: {name} must be an array of numbers, got {type(value).__name__}: {exc}") from None
    kind = array.dtype.kind
    if kind == "c":
        raise TypeError(f"{fname}: {name} has complex dtype {array.dtype}; only real inputs are supported")
    if kind not in "biuf":
        raise TypeError(
            f"{fname}: {name} must hold real numbers (float, int or bool), got dtype {array.dtype}"
        )
    if kind == "f" and array.dtype.itemsize > 8:
        raise TypeError(f"{fname}: {name} has dtype {array.dtype}; use float64 or float32")
    return array


def _dtypes(fname: str, *arrays) -> tuple[np.dtype, np.dtype]:
    """(compute dtype, result dtype) by SPEC's rules."""
    result = np.result_type(*[a.dtype for a in arrays if a is not None])
    if result.kind in "biu":
        return np.dtype(np.float64), np.dtype(np.float64)
    if result == np.float16:
        return np.dtype(np.float32), np.dtype(np.float16)
    return result, result


def _check_size(fname: str, what: str, spatial, channels: int, batch: int, because: str) -> None:
    """Refuse sizes nothing could allocate; ``because`` names the arguments that gave them."""
    if any(s > MAX_EXTENT for s in spatial):
        raise ValueError(
            f"{fname}: {what} size {tuple(spatial)} is too large (limit {MAX_EXTENT} per dim), from {because}"
        )
    total = batch * channels
    for s in spatial:
        total *= s
    if total > MAX_ELEMENTS:
        raise ValueError(
            f"{fname}: {what} would have {total} elements, more than can be allocated, from {because}"
        )


def _lift(sizes: tuple[int, ...], fill: int) -> tuple[int, int, int]:
    return (fill,) * (3 - len(sizes)) + tuple(sizes)


_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 512


def _plain(value) -> bool:
    """Whether an argument is an exact int, str or (nested) tuple of them: safe as a cache key.

    (``2.0 == 2`` and ``True == 1`` hash alike, but must still be rejected.)
    """
    kind = type(value)
    if kind is int or kind is str or value is None:
        return True
    return kind is tuple and all(_plain(v) for v in value)


def prepare(
    *,
    transposed: bool,
    ndim: int,
    x,
    weight,
    bias=None,
    stride=1,
    padding=0,
    output_padding=0,
    groups=1,
    dilation=1,
    output_size=None,
    grad_output=None,
    backward: bool = False,
    backend: str | None = None,
) -> Prepared:
    """Validate one call and normalise it for a backend (see module docstring)."""
    engine = resolve_backend(backend)
    key = None
    # (spelt out, not with generators: this is the cost of every cached call)
    if ((type(stride) is int or _plain(stride)) and (type(padding) is int or _plain(padding))
            and (type(output_padding) is int or _plain(output_padding))
            and (type(groups) is int or _plain(groups)) and (type(dilation) is int or _plain(dilation))
            and (output_size is None or _plain(output_size))):
        parts = []
        for a in (x, weight, bias, grad_output):
            if a is None:
                parts.append(None)
            elif type(a) is np.ndarray or engine.is_native(a):
                parts.append((type(a), a.shape, a.dtype))
            else:
                break
        else:
            key = (transposed, ndim, backward, engine.name, *parts,
                   stride, padding, output_padding, groups, dilation, output_size)
            plan = _PLAN_CACHE.get(key)
            if plan is not None:
                return _bind(plan, engine, x, weight, bias, grad_output)

    fname = ("conv_transpose" if transposed else "conv") + f"{ndim}d" + ("_backward" if backward else "")
    x = _as_array(x, "x", fname, engine)
    weight = _as_array(weight, "weight", fname, engine)
    bias = _as_array(bias, "bias", fname, engine, optional=True)
    if backward:
        grad_output = _as_array(grad_output, "grad_output", fname, engine)
    plan = _plan(fname, engine, transposed, ndim, x, weight, bias, stride, padding, output_padding,
                 groups, dilation, output_size, grad_output, backward)
    if key is not None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return _bind(plan, engine, x, weight, bias, grad_output)


def _bind(plan: CallPlan, engine: Backend, x, weight, bias, grad_output) -> Prepared:
    dtype = plan.compute_dtype
    return Prepared(
        plan,
        engine,
        engine.asarray(x, dtype).reshape(plan.x5),
        engine.asarray(weight, dtype).reshape(plan.weight5),
        None if bias is None else engine.asarray(bias, dtype),
        None if grad_output is None else engine.asarray(grad_output, dtype).reshape(plan.out5),
    )


def _plan(fname, engine, transposed, ndim, x, weight, bias, stride, padding, output_padding,
          groups, dilation, output_size, grad_output, backward) -> CallPlan:
    """All the checks and size computations of one call (the slow path, cached by ``prepare``)."""
    user_numpy = not any(
        engine.is_native(a) and not isinstance(a, np.ndarray)
        for a in (x, weight, bias, grad_output) if a is not None
    )
    compute_dtype, result_dtype = _dtypes(fname, x, weight, bias, grad_output)

    # ---- ranks and channels ------------------------------------------------
    if weight.ndim != ndim + 2:
        layout = "(C_in, C_out // groups, *kernel)" if transposed else "(C_out, C_in // groups, *kernel)"
        raise ValueError(f"{fname}: weight must be {ndim + 2}-D {layout}, got shape {tuple(weight.shape)}")
    if x.ndim not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"{fname}: x must be {ndim + 2}-D (N, C_in, *spatial) or {ndim + 1}-D (C_in, *spatial), "
            f"got shape {tuple(x.shape)}"
        )
    batched = x.ndim == ndim + 2
    batch_shape = tuple(x.shape) if batched else (1, *x.shape)
    n, c_in, in_spatial = batch_shape[0], batch_shape[1], batch_shape[2:]
    kernel = tuple(weight.shape[2:])

    groups = shape.as_int(groups, f"{fname}: groups")
    if groups < 1:
        raise ValueError(f"{fname}: groups must be a positive integer, got {groups}")
    if transposed:
        if weight.shape[0] != c_in:
            raise ValueError(
                f"{fname}: x has {c_in} input channels but weight.shape[0] is {weight.shape[0]} "
                f"(weight layout (C_in, C_out // groups, *kernel))"
            )
        c_out = weight.shape[1] * groups
    else:
        if weight.shape[1] * groups != c_in:
            raise ValueError(
                f"{fname}: x has {c_in} input channels but weight.shape[1] * groups is "
                f"{weight.shape[1]} * {groups} = {weight.shape[1] * groups} "
                f"(weight layout (C_out, C_in // groups, *kernel))"
            )
        c_out = weight.shape[0]
    if c_in % groups:
        raise ValueError(f"{fname}: groups={groups} does not divide the {c_in} input channels")
    if c_out % groups:
        raise ValueError(f"{fname}: groups={groups} does not divide the {c_out} output channels")
    if min(kernel) < 1:
        raise ValueError(f"{fname}: kernel size (weight.shape[2:]) must be positive, got {kernel}")
    if min(in_spatial) < 1:
        raise ValueError(f"{fname}: x spatial size must be positive, got {in_spatial}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{fname}: bias must have shape ({c_out},) (C_out), got {tuple(bias.shape)}")

    # ---- numeric arguments --------------------------------------------------
    def dims(value, name, minimum):
        try:
            values = shape.per_dim(value, ndim, name)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{fname}: {exc}") from None
        if any(v < minimum for v in values):
            what = "positive" if minimum == 1 else "non-negative"
            raise ValueError(f"{fname}: {name} must be {what}, got {value!r}")
        return values

    stride = dims(stride, "stride", 1)
    dilation = dims(dilation, "dilation", 1)
    output_padding = dims(output_padding, "output_padding", 0) if transposed else (0,) * ndim

    wanted = None
    if transposed and output_size is not None:
        try:
            wanted = tuple(output_size)
        except TypeError:
            wanted = (output_size,)
        wanted = tuple(shape.as_int(v, f"{fname}: output_size") for v in wanted)
        if len(wanted) in (ndim + 1, ndim + 2):  # the full shape, with N and/or C
            wanted = wanted[-ndim:]
        if len(wanted) != ndim:
            raise ValueError(
                f"{fname}: output_size must give {ndim} spatial sizes (or the full shape), got {output_size!r}"
            )
        if min(wanted) < 1:
            raise ValueError(f"{fname}: output_size must be positive, got {output_size!r}")
        if any(v > MAX_EXTENT for v in wanted):
            raise ValueError(f"{fname}: output_size {output_size!r} is too large (limit {MAX_EXTENT})")

    same_mode = isinstance(padding, str) and padding.lower() in ("same", "same_lower")
    try:
        pad_begin, pad_end = shape.resolve_padding(
            padding, in_spatial, kernel, stride, dilation, output_padding,
            transposed=transposed, output_size=wanted if same_mode else None,
        )
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{fname}: {exc}") from None
    pads = tuple(zip(pad_begin, pad_end))

    if wanted is not None and not same_mode:
        try:
            output_padding = shape.output_padding_for(in_spatial, wanted, kernel, stride, pads, dilation)
        except ValueError as exc:
            raise ValueError(f"{fname}: {exc}") from None
    if transposed and not (wanted is not None and not same_mode):
        bad = [
            (o, s, d) for o, s, d in zip(output_padding, stride, dilation) if not (o < s or o < d)
        ]
        if bad:
            raise ValueError(
                f"{fname}: output_padding must be smaller than stride or dilation, got "
                f"output_padding={output_padding}, stride={stride}, dilation={dilation}"
            )

    if transposed:
        out_spatial = shape.transposed_size(in_spatial, kernel, stride, pad_begin, pad_end, output_padding, dilation)
    else:
        out_spatial = shape.regular_size(in_spatial, kernel, stride, pad_begin, pad_end, dilation)
    if min(out_spatial) < 1:
        raise ValueError(
            f"{fname}: output size {out_spatial} is below 1 for input size {in_spatial}, "
            f"kernel {kernel}, stride {stride}, padding {padding!r}, dilation {dilation}"
        )
    because = (f"x of shape {tuple(x.shape)}, weight of shape {tuple(weight.shape)}, stride {stride}, "
               f"padding {padding!r}, output_padding {output_padding}, dilation {dilation}")
    _check_size(fname, "output", out_spatial, c_out, n, because)
    _check_size(fname, "kernel extent (dilation * (kernel - 1) + 1)",
                tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel)), 1, 1, because)

    image, grid = (out_spatial, in_spatial) if transposed else (in_spatial, out_spatial)
    geom = Geometry(
        image=_lift(image, 1),
        grid=_lift(grid, 1),
        kernel=_lift(kernel, 1),
        stride=_lift(stride, 1),
        dilation=_lift(dilation, 1),
        pad_begin=_lift(pad_begin, 0),
        groups=groups,
    )

    out_shape = (n, c_out, *out_spatial) if batched else (c_out, *out_spatial)
    if backward and tuple(grad_output.shape) != out_shape:
        raise ValueError(
            f"{fname}: grad_output must have the forward output's shape {out_shape}, "
            f"got {tuple(grad_output.shape)}"
        )
    return CallPlan(
        fname=fname,
        geom=geom,
        x5=(n, c_in, *_lift(in_spatial, 1)),
        weight5=(*weight.shape[:2], *_lift(kernel, 1)),
        out5=(n, c_out, *_lift(out_spatial, 1)),
        out_shape=out_shape,
        x_shape=tuple(x.shape),
        weight_shape=tuple(weight.shape),
        compute_dtype=compute_dtype,
        result_dtype=result_dtype,
        user_numpy=user_numpy,
    )

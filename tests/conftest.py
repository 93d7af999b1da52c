"""Shared fixtures: the backends under test, random convolution cases, tolerances.

Cases are built here, from the contract (SPEC) alone: output sizes and the
``"same"``/``"same_lower"`` pads are computed with ONNX's published rules,
written out below, never by asking ``tconv.shape``. Test modules reach these
helpers through fixtures (hypothesis tests draw from the strategy factory with
``st.data()``), so no test imports ``conftest``.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, reject, settings
from hypothesis import strategies as st

import oracle
import tconv
from tconv import registry
from tconv._numpy_backend import NumpyBackend


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (long fuzz, timing, soak) run only when asked for with ``-m slow``."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)

# Bounded example counts keep the suite fast; deadline=None because the
# first call of a backend (imports, BLAS warm-up) is much slower than the rest.
settings.register_profile(
    "tconv",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("tconv")

# --------------------------------------------------------------------------- #
# backends
# --------------------------------------------------------------------------- #
# Always tested: the core's two CPU backends. Others (plugins) join when they
# can run here; cupy is left to its own GPU-marked tests.
CORE_BACKENDS = ("numpy", "blas")
NOT_HERE = ("cupy",)


def _backend_infos() -> dict:
    return {info.name: info for info in tconv.list_backends()}


def _backends_under_test() -> list[str]:
    names = list(CORE_BACKENDS)
    for name, info in _backend_infos().items():
        if name not in names and name not in NOT_HERE and info.available:
            names.append(name)
    return names


def require_backend(name: str) -> str:
    """Skip (locally) or fail (under ``CI``) when ``name`` cannot run here."""
    info = _backend_infos().get(name)
    if info is not None and info.available:
        return name
    why = "not installed" if info is None else (info.reason or "unavailable")
    message = f"backend {name!r} is unavailable: {why}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so every core backend must run)")
    pytest.skip(message)


def require_plugin(name: str) -> str:
    """A plugin backend: skipped where it is not installed (CI's run of the core
    alone), else as ``require_backend`` (installed but broken fails under ``CI``)."""
    if name not in _backend_infos():
        pytest.skip(f"the {name} plugin is not installed (pip install ./backends/{name})")
    return require_backend(name)


@pytest.fixture(scope="session", params=_backends_under_test())
def backend_name(request) -> str:
    """Each CPU backend to test, by name (see ``require_backend``)."""
    return require_backend(request.param)


@pytest.fixture(scope="session")
def require():
    """``require(name)``: skip/fail as ``backend_name`` does, for a test naming its backend."""
    return require_backend


@pytest.fixture(scope="session")
def plugin():
    """``plugin(name)``: ``require_plugin``, for a test naming a plugin backend."""
    return require_plugin


class SpyBackend(NumpyBackend):
    """The numpy backend under another name, counting its ``scatter`` and ``gather``
    calls: shows which backend actually ran a call."""

    name = "spy"
    description = "numpy, counting calls"
    default_priority = None  # never chosen implicitly

    def __init__(self, available=True, reason=""):
        self.calls = 0
        self._availability = (available, reason)
        self._lock = threading.Lock()

    def availability(self):
        return self._availability

    def _count(self):
        with self._lock:
            self.calls += 1

    def scatter(self, *args):
        self._count()
        return super().scatter(*args)

    def gather(self, *args):
        self._count()
        return super().gather(*args)


@pytest.fixture
def spy(restore_backend_choice):
    """A ``SpyBackend`` registered as "spy" for the test; the registry is rediscovered after."""
    backend = SpyBackend()
    registry.register_backend(backend, name="spy")
    yield backend
    registry.reload_backends()


@pytest.fixture
def broken_spy(restore_backend_choice):
    """An unavailable ``SpyBackend`` registered as "unicorn"."""
    backend = SpyBackend(available=False, reason="needs a unicorn")
    registry.register_backend(backend, name="unicorn")
    yield backend
    registry.reload_backends()


@pytest.fixture
def restore_threads():
    """Put the thread budget back to its default after the test."""
    yield
    tconv.set_num_threads(None)


@pytest.fixture
def restore_backend_choice():
    """Undo any ``set_backend`` a test makes."""
    yield
    tconv.set_backend(None)


# --------------------------------------------------------------------------- #
# tolerances
# --------------------------------------------------------------------------- #
# SPEC: float64 to 1e-12 relative, float32 to 1e-5 relative of the output's scale.
RELATIVE = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3}


def assert_close_to_scale(got, expected, rtol: float | None = None, dtype=None) -> None:
    """``|got - expected| <= rtol * max|expected|`` elementwise, shapes equal."""
    got = np.asarray(got)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"shape {got.shape} != expected {expected.shape}"
    if rtol is None:
        rtol = RELATIVE[np.dtype(dtype if dtype is not None else got.dtype)]
    if expected.size == 0:
        return
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    error = float(np.max(np.abs(got.astype(np.float64) - expected)))
    worst = np.unravel_index(np.argmax(np.abs(got.astype(np.float64) - expected)), expected.shape)
    assert error <= rtol * scale, (
        f"max error {error:.3e} > {rtol:g} * scale {scale:.3e} "
        f"(worst at {worst}: got {got[worst]!r}, expected {expected[worst]!r})"
    )


@pytest.fixture(scope="session")
def assert_close():
    return assert_close_to_scale


# --------------------------------------------------------------------------- #
# random convolution cases
# --------------------------------------------------------------------------- #
def onnx_same_split(total: int, mode: str) -> tuple[int, int]:
    """ONNX: SAME_UPPER puts the odd cell at the end, SAME_LOWER at the start (floor division)."""
    half = total // 2
    if mode == "same":
        return half, total - half
    return total - half, half


def extent(k: int, d: int) -> int:
    return d * (k - 1) + 1


@dataclass(frozen=True)
class Case:
    """One convolution call: the arguments as tconv takes them, and as the oracle does.

    ``padding`` is what tconv is given (any form); ``pad_begin``/``pad_end``
    are the per-dim pads the test itself resolved, fed to the oracle.
    """

    transposed: bool
    ndim: int
    batch: int | None  # None: unbatched input
    c_in: int
    c_out: int
    groups: int
    in_size: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    output_padding: tuple
    padding: object
    pad_begin: tuple
    pad_end: tuple
    bias: bool
    dtype: str
    seed: int
    output_size: object = None  # what tconv is given, if anything
    stride_arg: object = None  # the forms tconv is given (int or per-dim)
    dilation_arg: object = None
    output_padding_arg: object = None

    # -- sizes, by the formulas of SPEC --------------------------------------
    @property
    def out_size(self) -> tuple:
        if self.transposed:
            return tuple(
                (i - 1) * s - pb - pe + extent(k, d) + op
                for i, s, pb, pe, k, d, op in zip(self.in_size, self.stride, self.pad_begin, self.pad_end,
                                                  self.kernel, self.dilation, self.output_padding)
            )
        return tuple(
            (i + pb + pe - extent(k, d)) // s + 1
            for i, s, pb, pe, k, d in zip(self.in_size, self.stride, self.pad_begin, self.pad_end,
                                          self.kernel, self.dilation)
        )

    @property
    def x_shape(self) -> tuple:
        lead = () if self.batch is None else (self.batch,)
        return (*lead, self.c_in, *self.in_size)

    @property
    def weight_shape(self) -> tuple:
        if self.transposed:
            return (self.c_in, self.c_out // self.groups, *self.kernel)
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def out_shape(self) -> tuple:
        lead = () if self.batch is None else (self.batch,)
        return (*lead, self.c_out, *self.out_size)

    # -- data ------------------------------------------------------------------
    def arrays(self, dtype=None):
        """Random ``(x, weight, bias)`` of this case, in ``dtype`` (default the case's)."""
        rng = np.random.default_rng(self.seed)
        dtype = np.dtype(dtype or self.dtype)
        x = rng.standard_normal(self.x_shape).astype(dtype)
        w = rng.standard_normal(self.weight_shape).astype(dtype)
        b = rng.standard_normal(self.c_out).astype(dtype) if self.bias else None
        return x, w, b

    def grad_output(self, dtype=None):
        rng = np.random.default_rng(self.seed + 1)
        return rng.standard_normal(self.out_shape).astype(np.dtype(dtype or self.dtype))

    # -- the call, both ways ---------------------------------------------------
    @property
    def function(self):
        name = ("conv_transpose" if self.transposed else "conv") + f"{self.ndim}d"
        return getattr(tconv, name)

    @property
    def backward_function(self):
        name = ("conv_transpose" if self.transposed else "conv") + f"{self.ndim}d_backward"
        return getattr(tconv, name)

    def kwargs(self) -> dict:
        """Keyword arguments for tconv (without x, weight, bias)."""
        args = dict(
            stride=self.stride if self.stride_arg is None else self.stride_arg,
            padding=self.padding,
            dilation=self.dilation if self.dilation_arg is None else self.dilation_arg,
            groups=self.groups,
        )
        if self.transposed:
            if self.output_size is not None:
                args["output_size"] = self.output_size
            # With numeric padding, output_size chooses output_padding (PyTorch); with
            # the same modes it is ONNX output_shape, whose crop counts output_padding.
            if self.output_size is None or isinstance(self.padding, str):
                args["output_padding"] = (
                    self.output_padding if self.output_padding_arg is None else self.output_padding_arg
                )
        return args

    def run(self, x, w, b, backend: str):
        return self.function(x, w, b, **self.kwargs(), backend=backend)

    def expected(self, x, w, b):
        """The oracle's answer (float64), in the user's shape."""
        xb = x if self.batch is not None else x[None]
        if self.transposed:
            out = oracle.conv_transpose_loops(xb, w, b, self.stride, self.pad_begin, self.pad_end,
                                              self.output_padding, self.dilation, self.groups)
        else:
            out = oracle.conv_loops(xb, w, b, self.stride, self.pad_begin, self.pad_end,
                                    self.dilation, self.groups)
        return out if self.batch is not None else out[0]

    @property
    def work(self) -> int:
        """Python steps the oracle takes, about."""
        n = 1 if self.batch is None else max(self.batch, 1)
        cells = math.prod(self.in_size) if self.transposed else math.prod(self.out_size)
        return n * self.c_in * (self.c_out // self.groups) * cells * math.prod(self.kernel)


PADDING_FORMS = ("int", "per_dim", "pairs", "valid", "same", "same_lower")


def _maybe_int(draw, values: tuple):
    """Give ``values`` as one int when they agree (sometimes), else as a tuple or list."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return draw(st.sampled_from([tuple, list]))(values)


@st.composite
def conv_cases(
    draw,
    *,
    transposed: bool | None = None,
    ndim: int | None = None,
    padding_forms=PADDING_FORMS,
    dtypes=("float64", "float32"),
    output_size: bool = True,
    unbatched: bool = True,
    empty_batch: bool = True,
    max_work: int = 6000,
):
    """A random valid convolution case drawing every argument SPEC lists.

    ``output_size``: whether transposed cases may give ``output_size``
    instead of ``output_padding`` (PyTorch's rule with numeric padding,
    ONNX ``output_shape`` with the same modes).
    """
    transposed = draw(st.booleans()) if transposed is None else transposed
    ndim = draw(st.sampled_from((1, 2, 3))) if ndim is None else ndim
    small = {1: 6, 2: 4, 3: 3}[ndim]  # largest input extent per dim
    big_k = {1: 4, 2: 3, 3: 2}[ndim]

    # channels: plain, grouped, or depthwise (one input channel per group)
    layout = draw(st.sampled_from(("plain", "grouped", "depthwise")))
    if layout == "plain":
        groups, c_in_g, c_out_g = 1, draw(st.integers(1, 3)), draw(st.integers(1, 3))
    elif layout == "grouped":
        groups, c_in_g, c_out_g = draw(st.integers(2, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    else:
        groups, c_in_g, c_out_g = draw(st.integers(2, 4)), 1, draw(st.integers(1, 2))
    c_in, c_out = groups * c_in_g, groups * c_out_g

    dims = lambda strat: tuple(draw(strat) for _ in range(ndim))  # noqa: E731
    kernel = dims(st.integers(1, big_k))
    in_size = dims(st.integers(1, small))
    stride = dims(st.integers(1, 3))
    dilation = dims(st.integers(1, 2))
    if transposed:
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    else:
        output_padding = (0,) * ndim

    form = draw(st.sampled_from(padding_forms))
    out_size_arg = None
    if form in ("int", "per_dim", "pairs"):
        if form == "int":
            p = draw(st.integers(0, 2))
            padding, pad_begin, pad_end = p, (p,) * ndim, (p,) * ndim
        elif form == "per_dim":
            pad_begin = pad_end = dims(st.integers(0, 2))
            padding = draw(st.sampled_from([tuple, list]))(pad_begin)
        else:
            pad_begin, pad_end = dims(st.integers(0, 2)), dims(st.integers(0, 2))
            padding = tuple((b, e) for b, e in zip(pad_begin, pad_end))
            if draw(st.booleans()):
                padding = [list(p) for p in padding]
    elif form == "valid":
        padding, pad_begin, pad_end = "valid", (0,) * ndim, (0,) * ndim
    else:
        padding = draw(st.sampled_from([form, form.upper()])) if form == "same" else form
        mode = form
        if transposed:
            # ONNX ConvTranspose: total = stride*(in-1) + output_padding + extent - target,
            # target = in*stride, or output_shape when given.
            target = tuple(i * s for i, s in zip(in_size, stride))
            if output_size and draw(st.booleans()):
                target = tuple(max(1, t + draw(st.integers(-2, 2))) for t in target)
                out_size_arg = target
            totals = [s * (i - 1) + op + extent(k, d) - t
                      for i, s, op, k, d, t in zip(in_size, stride, output_padding, kernel, dilation, target)]
        else:
            # ONNX Conv: out = ceil(in / stride), total = max((out-1)*stride + extent - in, 0)
            totals = [max((-(-i // s) - 1) * s + extent(k, d) - i, 0)
                      for i, s, k, d in zip(in_size, stride, kernel, dilation)]
        pairs = [onnx_same_split(t, mode) for t in totals]
        pad_begin, pad_end = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    batch = draw(st.sampled_from(([None] if unbatched else []) + ([0] if empty_batch else []) + [1, 2]))
    case = Case(
        transposed=transposed, ndim=ndim, batch=batch, c_in=c_in, c_out=c_out, groups=groups,
        in_size=in_size, kernel=kernel, stride=stride, dilation=dilation, output_padding=output_padding,
        padding=padding, pad_begin=pad_begin, pad_end=pad_end, bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**31 - 1)),
        output_size=out_size_arg,
        stride_arg=_maybe_int(draw, stride), dilation_arg=_maybe_int(draw, dilation),
        output_padding_arg=_maybe_int(draw, output_padding),
    )
    if min(case.out_size) < 1 or case.work > max_work:
        reject()
    # With numeric padding, output_size picks output_padding (PyTorch's rule):
    # give the size this case produces, spatial or as the full shape.
    # PyTorch reaches only stride-many sizes: output_padding < stride.
    reachable = all(op < s for op, s in zip(output_padding, stride))
    if transposed and output_size and reachable and form in ("int", "per_dim", "pairs") and draw(st.booleans()):
        full = draw(st.booleans())
        size = case.out_shape if full else case.out_size
        case = replace(case, output_size=tuple(size))
    return case


@pytest.fixture(scope="session")
def cases():
    """The strategy factory ``conv_cases(**options)`` (draw with ``st.data()``)."""
    return conv_cases


# --------------------------------------------------------------------------- #
# PyTorch as the second oracle
# --------------------------------------------------------------------------- #
def _torch_forward(case: Case, x, w, b):
    """PyTorch's answer for ``case`` on torch tensors (autograd flows through).

    Symmetric numeric padding is one ``F.conv*`` call. Other pads have no
    direct PyTorch spelling, so they are built from its unpadded call:
    a transposed convolution's output is cropped (``F.pad`` with negative
    widths; positive widths add the cells no input reaches), a regular
    convolution's input is zero-padded.
    """
    import torch.nn.functional as F

    nd = case.ndim
    symmetric = not isinstance(case.padding, str) and case.pad_begin == case.pad_end
    # F.pad lists the last dim first
    widths = [v for pb, pe in zip(reversed(case.pad_begin), reversed(case.pad_end)) for v in (pb, pe)]
    if case.transposed:
        fn = getattr(F, f"conv_transpose{nd}d")
        if symmetric:
            return fn(x, w, b, case.stride, case.pad_begin, case.output_padding, case.groups, case.dilation)
        out = F.pad(fn(x, w, None, case.stride, 0, case.output_padding, case.groups, case.dilation),
                    [-v for v in widths])
    else:
        fn = getattr(F, f"conv{nd}d")
        if symmetric:
            return fn(x, w, b, case.stride, case.pad_begin, case.dilation, case.groups)
        out = fn(F.pad(x, widths), w, None, case.stride, 0, case.dilation, case.groups)
    if b is not None:
        out = out + b.reshape(-1, *(1,) * nd)
    return out


@pytest.fixture(scope="session")
def torch_forward():
    """``torch_forward(case, x, w, b)`` on torch tensors; skips where torch is missing."""
    pytest.importorskip("torch")
    return _torch_forward

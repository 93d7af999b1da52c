"""The CuPy backend (``backends/cupy``), with and without a GPU.

Without a GPU: the plugin imports and says why it cannot run; ``nvcc``
compiles ``kernels.cu`` (so a syntax error cannot land); and the backend's
whole algorithm (``_engine``) runs on the CPU with NumPy in place of CuPy and
the CUDA element functions compiled for the host, against the ``numpy``
reference. With a GPU and CuPy (marker ``gpu``): the real backend agrees,
keeps CuPy arrays on the device, returns NumPy for NumPy and is deterministic.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tconv
from tconv import registry
from tconv.backend import Backend

SOURCE = Path(__file__).resolve().parents[1] / "backends" / "cupy"
KERNELS = SOURCE / "tconv_cupy" / "kernels.cu"

try:
    import tconv_cupy
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(SOURCE))
    import tconv_cupy

from tconv_cupy import _engine  # noqa: E402


def _cupy_reason() -> str:
    return tconv_cupy.CupyBackend().availability()[1]


needs_gpu = pytest.mark.skipif(not tconv_cupy.CupyBackend().is_available(),
                               reason=f"cupy backend cannot run here: {_cupy_reason()}")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


# --------------------------------------------------------------------------- #
# without a GPU
# --------------------------------------------------------------------------- #
def test_plugin_imports_and_reports_why_it_cannot_run():
    backend = tconv_cupy.CupyBackend()
    available, reason = backend.availability()
    assert backend.name == "cupy" and backend.default_priority is None
    if not available:
        assert reason.startswith(("CuPy is not installed", "no CUDA device", "CuPy failed"))
    assert backend.is_native(np.ones(2)) is False


def test_selecting_it_where_it_cannot_run_is_a_backend_error_with_the_reason(restore_backend_choice):
    backend = tconv_cupy.CupyBackend()
    if backend.is_available():
        pytest.skip("the cupy backend can run here")
    registry.register_backend(backend, name="cupy")
    try:
        with pytest.raises(tconv.BackendError) as info:
            tconv.set_backend("cupy")
        assert "cupy" in str(info.value) and backend.availability()[1] in str(info.value)
        with pytest.raises(tconv.BackendError):
            tconv.conv_transpose1d(np.ones((1, 1, 3)), np.ones((1, 1, 2)), backend="cupy")
    finally:
        registry.reload_backends()


@needs_nvcc
def test_kernel_source_compiles_with_nvcc(tmp_path):
    done = subprocess.run(["nvcc", "--ptx", "-o", str(tmp_path / "kernels.ptx"), str(KERNELS)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ptx = (tmp_path / "kernels.ptx").read_text()
    for name in ("im2col_f32", "im2col_f64", "col2im_f32", "col2im_f64"):
        assert f".entry {name}(" in ptx, name


# The CUDA element functions, looped over on the host: the same code each GPU thread runs.
HARNESS = """
#include "{kernels}"
#define TCONV_HOST_LOOPS(T, SUFFIX)                                                             \\
    extern "C" void host_im2col_##SUFFIX(const T* image, T* cols, const i64* geo, i64 groups,  \\
                                         i64 p, i64 sn, i64 sg, i64 sr, i64 total) {{           \\
        for (i64 e = 0; e < total; ++e) im2col_at<T>(e, image, cols, geo, groups, p, sn, sg, sr); \\
    }}                                                                                          \\
    extern "C" void host_col2im_##SUFFIX(const T* cols, T* out, const T* bias, int has_bias,    \\
                                         const i64* geo, i64 groups, i64 q, i64 total) {{       \\
        for (i64 e = 0; e < total; ++e) col2im_at<T>(e, cols, out, bias, has_bias, geo, groups, q); \\
    }}
TCONV_HOST_LOOPS(float, f32)
TCONV_HOST_LOOPS(double, f64)
"""


class HostLauncher:
    """``_cuda.CudaLauncher``'s interface on NumPy arrays, through the host-compiled kernels."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))

    @staticmethod
    def _ptr(array):
        assert array.flags.c_contiguous
        return array.ctypes.data_as(ctypes.c_void_p)

    def _call(self, name, dtype, *args):
        suffix = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[np.dtype(dtype)]
        converted = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_longlong(a) for a in args]
        getattr(self.lib, f"host_{name}_{suffix}")(*converted)

    def im2col(self, image, cols, geo, groups, p, strides):
        self._call("im2col", image.dtype, self._ptr(image), self._ptr(cols), self._ptr(geo),
                   groups, p, *strides, cols.size)

    def col2im(self, cols, out, bias, geo, groups, q):
        fn = getattr(self.lib, "host_col2im_" + ("f32" if out.dtype == np.float32 else "f64"))
        bias_ptr = self._ptr(bias) if bias is not None else self._ptr(out)
        fn(self._ptr(cols), self._ptr(out), bias_ptr, ctypes.c_int(bias is not None),
           self._ptr(geo), ctypes.c_longlong(groups), ctypes.c_longlong(q), ctypes.c_longlong(out.size))


class HostEngineBackend(Backend):
    """The cupy backend's engine with NumPy for CuPy: everything but the device itself."""

    name = "cupy-host"
    description = "tconv_cupy's engine on the CPU (tests only)"

    def __init__(self, launcher):
        self.engine = _engine.Engine(np, launcher)

    def scatter(self, grid_in, weight, bias, geom):
        return self.engine.scatter(grid_in, weight, bias, geom)

    def gather(self, image_in, weight, bias, geom):
        return self.engine.gather(image_in, weight, bias, geom)

    def weight_grad(self, image_in, grid_in, geom):
        return self.engine.weight_grad(image_in, grid_in, geom)


@pytest.fixture(scope="module")
def host_engine(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    folder = tmp_path_factory.mktemp("cupy_host")
    harness = folder / "harness.cu"
    harness.write_text(HARNESS.format(kernels=KERNELS.as_posix()))
    library = folder / "libharness.so"
    done = subprocess.run(["nvcc", "-O2", "-shared", "-Xcompiler", "-fPIC", "-o", str(library),
                           str(harness)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    registry.register_backend(HostEngineBackend(HostLauncher(library)), name="cupy-host")
    yield "cupy-host"
    registry.reload_backends()


def _everything(case, backend):
    x, w, b = case.arrays()
    out = case.run(x, w, b, backend)
    grads = case.backward_function(case.grad_output(), x, w, **case.kwargs(), backend=backend)
    return [out, *grads]


@given(data=st.data())
def test_engine_with_host_kernels_agrees_with_numpy(host_engine, cases, assert_close, data):
    case = data.draw(cases())
    for got, expected in zip(_everything(case, host_engine), _everything(case, "numpy")):
        assert_close(got, expected, dtype=case.dtype)


@pytest.mark.parametrize("chunk_bytes", [1, 10**9], ids=["one_sample_per_chunk", "one_chunk"])
def test_engine_chunks_agree(host_engine, monkeypatch, chunk_bytes, assert_close):
    monkeypatch.setattr(_engine, "WORKSPACE_BYTES", chunk_bytes)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 7, 8))
    w = rng.standard_normal((6, 2, 3, 4))
    b = rng.standard_normal(4)
    kw = dict(stride=(2, 3), padding=((1, 0), (2, 1)), output_padding=(1, 0), groups=2, dilation=(1, 2))
    y = tconv.conv_transpose2d(x, w, b, **kw, backend=host_engine)
    assert_close(y, tconv.conv_transpose2d(x, w, b, **kw, backend="numpy"))
    dy = rng.standard_normal(y.shape)
    for got, expected in zip(tconv.conv_transpose2d_backward(dy, x, w, **kw, backend=host_engine),
                             tconv.conv_transpose2d_backward(dy, x, w, **kw, backend="numpy")):
        assert_close(got, expected)


# --------------------------------------------------------------------------- #
# with a GPU
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def cupy_backend():
    cupy = pytest.importorskip("cupy")
    if "cupy" not in {i.name for i in tconv.list_backends()}:
        registry.register_backend(tconv_cupy.CupyBackend(), name="cupy")
    return cupy


@pytest.mark.gpu
@needs_gpu
@given(data=st.data())
def test_gpu_agrees_with_numpy(cupy_backend, cases, assert_close, data):
    case = data.draw(cases())
    for got, expected in zip(_everything(case, "cupy"), _everything(case, "numpy")):
        assert isinstance(got, np.ndarray) == isinstance(expected, np.ndarray)
        assert_close(got, expected, dtype=case.dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_keeps_cupy_arrays_on_the_device_and_numpy_on_the_host(cupy_backend, dtype, assert_close):
    cupy = cupy_backend
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8, 9, 9)).astype(dtype)
    w = rng.standard_normal((8, 4, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    host = tconv.conv_transpose2d(x, w, b, stride=2, padding=1, backend="cupy")
    device = tconv.conv_transpose2d(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), stride=2,
                                    padding=1, backend="cupy")
    assert isinstance(host, np.ndarray) and host.dtype == dtype
    assert isinstance(device, cupy.ndarray) and device.dtype == dtype
    assert_close(host, tconv.conv_transpose2d(x, w, b, stride=2, padding=1, backend="numpy"))
    assert np.array_equal(host, cupy.asnumpy(device))
    grads = tconv.conv_transpose2d_backward(cupy.asarray(np.ones(host.shape, dtype)), cupy.asarray(x),
                                            cupy.asarray(w), stride=2, padding=1, backend="cupy")
    assert all(isinstance(g, cupy.ndarray) for g in grads)


@pytest.mark.gpu
@needs_gpu
def test_gpu_results_are_deterministic(cupy_backend):
    cupy = cupy_backend
    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal((8, 16, 12, 12)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((16, 8, 4, 4)).astype(np.float32))
    first = tconv.conv_transpose2d(x, w, stride=2, padding=1, backend="cupy")
    dy = cupy.ones_like(first)
    first_grads = tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, backend="cupy")
    for _ in range(3):
        assert cupy.array_equal(first, tconv.conv_transpose2d(x, w, stride=2, padding=1, backend="cupy"))
        again = tconv.conv_transpose2d_backward(dy, x, w, stride=2, padding=1, backend="cupy")
        for a, b in zip(first_grads, again):
            assert cupy.array_equal(a, b)


def test_engine_keeps_nan_weights_and_gradients_where_the_definition_sends_them(host_engine):
    """Zero-filled im2col taps must not turn a NaN into NaN everywhere (``0 * NaN``)."""
    x = np.array([[[2.0, 3.0]]])
    w = np.array([[[np.nan, 1.0]]])
    got = tconv.conv1d(x, w, padding=1, backend=host_engine)
    assert np.array_equal(np.isnan(got), [[[False, True, True]]]), got
    dy = np.array([[[np.nan, 1.0, 1.0]]])
    got = tconv.conv1d_backward(dy, x, np.ones((1, 1, 2)), padding=1, backend=host_engine)[1]
    expected = tconv.conv1d_backward(dy, x, np.ones((1, 1, 2)), padding=1, backend="numpy")[1]
    assert np.array_equal(np.isnan(got), np.isnan(expected))

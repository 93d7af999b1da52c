"""Which BLAS the core's GEMMs call (``tconv._blas_library``): the choice by
``TCONV_BLAS``, its errors, that either library gives the definition's results,
and that the one chosen is the one reported and thread-controlled."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tconv
from tconv import _blas_library, _threads

import oracle

_blas_core = pytest.importorskip("tconv._blas_core")

needs_openblas32 = pytest.mark.skipif(_blas_library._openblas32_file() is None,
                                      reason="scipy-openblas32 is not installed")


class RecordingCore:
    """Stands in for ``_blas_core`` in ``select``: records the addresses it is given."""

    def __init__(self):
        self.calls = []

    def use_blas(self, sgemm_address=0, dgemm_address=0):
        self.calls.append((sgemm_address, dgemm_address))


@pytest.fixture
def restore_core_blas():
    """Put the real core back on the GEMMs tconv chose when it loaded."""
    saved = _blas_core.blas_addresses()
    yield
    _blas_core.use_blas(*saved)


def test_unknown_choice_is_named_with_the_choices():
    core = RecordingCore()
    with pytest.raises(ValueError, match=r"TCONV_BLAS='mkl'.*auto, scipy-openblas32, scipy"):
        _blas_library.select("MKL", core)
    assert core.calls == []


def test_scipy_points_the_core_back_at_cython_blas():
    core = RecordingCore()
    choice = _blas_library.select("scipy", core)
    assert (choice.name, choice.path, core.calls) == ("scipy", None, [(0, 0)])


@needs_openblas32
def test_auto_takes_scipy_openblas32_where_installed():
    core = RecordingCore()
    choice = _blas_library.select("auto", core)
    assert choice.name == "scipy-openblas32" and os.path.isfile(choice.path)
    [(sgemm, dgemm)] = core.calls
    assert sgemm and dgemm and sgemm != dgemm


def test_missing_scipy_openblas32_fails_only_when_asked_for(monkeypatch):
    monkeypatch.setattr(_blas_library, "_openblas32_file", lambda: None)
    core = RecordingCore()
    with pytest.raises(ValueError, match="TCONV_BLAS=scipy-openblas32.*not installed"):
        _blas_library.select("scipy-openblas32", core)
    choice = _blas_library.select("auto", core)
    assert choice.name == "scipy" and "not installed" in choice.reason
    assert core.calls == [(0, 0)]


@pytest.mark.parametrize("library", ["scipy", pytest.param("scipy-openblas32", marks=needs_openblas32)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_either_library_gives_the_definition(library, dtype, restore_core_blas):
    _blas_library.select(library, _blas_core)
    rng = np.random.default_rng(7)
    # (BLAS, not the unpacked kernel: columns = weight^T (16*16 x 48) @ grid (48 x 12))
    x = rng.standard_normal((1, 48, 3, 4)).astype(dtype)
    w = rng.standard_normal((48, 16, 4, 4)).astype(dtype)
    b = rng.standard_normal(16).astype(dtype)
    got = tconv.conv_transpose2d(x, w, b, stride=2, padding=1, backend="blas")
    expected = oracle.conv_transpose_loops(x, w, b, (2, 2), (1, 1), (1, 1), (0, 0), (1, 1), 1)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    a = np.asfortranarray(rng.standard_normal((70, 90)).astype(dtype))
    c = np.asfortranarray(rng.standard_normal((90, 50)).astype(dtype))
    out = np.zeros((70, 50), dtype=dtype, order="F")
    _blas_core.blas_matmul(a, c, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ c.astype(np.float64),
                               rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-3)


def test_the_core_library_is_the_one_reported_and_controlled():
    blas = _threads.blas_info()
    core = [lib for lib in blas if _blas_library.core_calls(lib["filepath"])]
    assert len(core) == 1, blas
    choice = _blas_library.chosen()
    if choice.path is not None:  # ... and the core's GEMMs really are that library's
        assert os.path.samefile(core[0]["filepath"], choice.path)
        library = ctypes.CDLL(choice.path)
        assert _blas_core.blas_addresses() == tuple(
            ctypes.cast(f, ctypes.c_void_p).value for f in (library.scipy_sgemm_, library.scipy_dgemm_))
    _threads.forget_blas_threads()
    _threads.set_blas_threads(1)
    [core] = [lib for lib in _threads.blas_info() if _blas_library.core_calls(lib["filepath"])]
    assert core["num_threads"] == 1


def test_tconv_blas_scipy_is_reported_by_info():
    env = {**os.environ, "TCONV_BLAS": "scipy"}
    done = subprocess.run([sys.executable, "-m", "tconv", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["core_blas"]["name"] == "scipy"
    used = [lib for lib in report["blas"] if lib["used_by"].startswith("the compiled core")]
    assert len(used) == 1 and os.path.basename(os.path.dirname(used[0]["path"])) in ("scipy.libs", ".dylibs")


def test_a_bad_tconv_blas_fails_the_import_loudly():
    env = {**os.environ, "TCONV_BLAS": "mkl"}
    done = subprocess.run([sys.executable, "-c", "import tconv"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "TCONV_BLAS='mkl': expected one of auto, scipy-openblas32, scipy" in done.stderr


def test_asking_for_a_missing_scipy_openblas32_is_an_error(monkeypatch):
    monkeypatch.setattr(_blas_library, "_openblas32_file", lambda: None)
    monkeypatch.setenv("TCONV_BLAS", "scipy-openblas32")
    with pytest.raises(ValueError, match="scipy-openblas32 package is not installed"):
        _blas_library.requested()
    monkeypatch.setenv("TCONV_BLAS", "Auto")
    assert _blas_library.requested() == "auto"


@pytest.mark.parametrize("small_gemm", ["1", "0"])
def test_info_says_whether_the_unpacked_kernel_runs(small_gemm):
    """``TCONV_SMALL_GEMM=0`` (read when the core loads) leaves every GEMM to BLAS, and
    ``info`` says so; otherwise it says the kernel runs exactly where the CPU has AVX-512F."""
    env = {**os.environ, "TCONV_SMALL_GEMM": small_gemm}
    done = subprocess.run([sys.executable, "-m", "tconv", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = small_gemm == "1" and _blas_core.small_gemm_available()
    assert json.loads(done.stdout)["core_blas"]["unpacked_kernel"] is expected
    text = subprocess.run([sys.executable, "-m", "tconv", "info"], env=env, capture_output=True, text=True,
                          timeout=120).stdout
    assert ("its own AVX-512 kernel for most float32 GEMMs" in text) is expected

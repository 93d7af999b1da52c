"""The unpacked float32 GEMM (``tconv/_small_gemm.h``) and the BLAS call beside it,
against float64 NumPy products, and layers whose GEMMs take it against the
``numpy`` backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tconv

_blas_core = pytest.importorskip("tconv._blas_core")


def _strided(rng, rows: int, cols: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """A (rows x cols) float32 view whose rows are ``pad`` elements longer, and its parent."""
    parent = rng.standard_normal((rows, cols + pad)).astype(np.float32)
    return parent[:, :cols], parent


@given(m=st.integers(1, 40), n=st.integers(1, 110), k=st.integers(1, 70), pad=st.integers(0, 5),
       a_transposed=st.booleans(), start=st.sampled_from(["zero", "accumulate", "bias"]),
       through_blas=st.booleans(), rows_outer=st.booleans(), seed=st.integers(0, 2**16))
def test_gemm_matches_a_float64_product(m, n, k, pad, a_transposed, start, through_blas, rows_outer, seed):
    if not through_blas and not _blas_core.small_gemm_available():
        pytest.skip("the unpacked kernel needs AVX-512F")
    rng = np.random.default_rng(seed)
    a, _ = _strided(rng, k, m, pad) if a_transposed else _strided(rng, m, k, pad)
    b, _ = _strided(rng, k, n, pad)
    c, c_parent = _strided(rng, m, n, pad)
    bias = rng.standard_normal(m).astype(np.float32)
    before = c_parent.copy()
    product = (a.T if a_transposed else a).astype(np.float64) @ b.astype(np.float64)
    start_value = {"zero": 0.0, "accumulate": before[:, :n], "bias": bias[:, None]}[start]
    expected = product + start_value
    _blas_core.small_gemm(a, b, c, a_transposed, start == "accumulate", through_blas,
                          bias if start == "bias" else None, rows_outer)
    # float32 sums of k products: error within a few ulps of the sum of magnitudes
    bound = 1e-6 * (k + 1) * ((np.abs(a.T if a_transposed else a) @ np.abs(b)) + np.abs(start_value))
    assert np.all(np.abs(c - expected) <= bound + 1e-30)
    assert np.array_equal(c_parent[:, n:], before[:, n:])  # the rows' padding is left alone


@pytest.mark.parametrize("m, n, k", [(520, 40, 2100), (16, 70, 70000), (1000, 33, 1100)])
@pytest.mark.parametrize("start", ["zero", "accumulate", "bias"])
def test_a_large_a_is_taken_in_chunks_of_its_columns(m, n, k, start):
    """Above 2**20 elements A is multiplied a chunk of its columns at a time (each chunk
    added into C, the first from the bias or C's old value) where chunks of 256 columns
    or more fit 2**18 elements: the same product. Chunks that do not divide K; M 1000,
    whose chunks would be 262 columns, just above the bound."""
    if not _blas_core.small_gemm_available():
        pytest.skip("the unpacked kernel needs AVX-512F")
    assert m * k > 2**20
    rng = np.random.default_rng(m)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    start_value = {"zero": 0.0, "accumulate": c.astype(np.float64), "bias": bias[:, None]}[start]
    expected = a.astype(np.float64) @ b.astype(np.float64) + start_value
    _blas_core.small_gemm(a, b, c, False, start == "accumulate", False, bias if start == "bias" else None)
    bound = 1e-6 * (k + 1) * (np.abs(a) @ np.abs(b) + np.abs(start_value))
    assert np.all(np.abs(c - expected) <= bound)


# Layers whose GEMMs are in the unpacked kernel's range (float32, A of 1024-8192
# elements, K <= 512): the backward's input gradient (32 channels x 16*9 taps),
# DCGAN 64->3's (64 x 3*16), the forward's columns (16*9 x 32, transposed), one cell;
# and in its streaming range (K <= 16, M <= 64, N >= 16384): a 1x1 convolution of
# 3 channels into 8 over a 128x128 image, with a bias (the GEMM starts from it).
LAYERS = {
    "autoencoder": dict(n=6, c_in=32, c_out=16, grid=(7, 7), kernel=3, stride=2, padding=1, output_padding=1),
    "dcgan 64->3": dict(n=2, c_in=64, c_out=3, grid=(9, 8), kernel=4, stride=2, padding=1, output_padding=0),
    "one cell": dict(n=64, c_in=100, c_out=8, grid=(1, 1), kernel=4, stride=1, padding=0, output_padding=0),
    "1x1 image": dict(n=1, c_in=3, c_out=8, grid=(128, 128), kernel=1, stride=1, padding=0, output_padding=0,
                      conv=True),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_through_the_kernel_match_the_reference(name, assert_close):
    layer = LAYERS[name]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((layer["n"], layer["c_in"], *layer["grid"])).astype(np.float32)
    w = rng.standard_normal((layer["c_in"], layer["c_out"], layer["kernel"], layer["kernel"])).astype(np.float32)
    b = rng.standard_normal(layer["c_out"]).astype(np.float32)
    kw = dict(stride=layer["stride"], padding=layer["padding"], output_padding=layer["output_padding"])
    results = {}
    for backend in ("blas", "numpy"):
        if layer.get("conv"):  # (the regular convolution's weight is (C_out, C_in, k, k))
            results[backend] = [tconv.conv2d(x, w.transpose(1, 0, 2, 3).copy(), b, backend=backend)]
            continue
        y = tconv.conv_transpose2d(x, w, b, backend=backend, **kw)
        dy = np.cos(np.arange(y.size, dtype=np.float32)).reshape(y.shape)
        grads = tconv.conv_transpose2d_backward(dy, x, w, needs=("input", "weight"), backend=backend, **kw)
        results[backend] = [y, *grads[:2]]
    for got, want in zip(results["blas"], results["numpy"]):
        assert_close(got, want)


def test_the_kernel_takes_large_products_only_where_blas_has_one_thread(restore_threads):
    """The kernel runs on the calling thread alone: where the ``blas`` backend gives BLAS
    two threads, the large products stay with BLAS; the flag is the calling thread's,
    so a thread that was not told (an openmp plugin's worker) keeps the kernel."""
    import threading

    if not _blas_core.small_gemm_available():
        pytest.skip("the unpacked kernel needs AVX-512F")
    x = np.ones((2, 4, 3, 3), np.float32)
    w = np.ones((4, 2, 3, 3), np.float32)
    tconv.set_num_threads(2)
    tconv.conv_transpose2d(x, w, backend="blas")
    assert not _blas_core.unpacked_gemm(2048, 256, 512)
    assert _blas_core.unpacked_gemm(64, 1024, 48)  # (the small-operand range, at any count)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_blas_core.unpacked_gemm(2048, 256, 512)))
    worker.start()
    worker.join()
    assert seen == [True]
    tconv.set_num_threads(1)
    tconv.conv_transpose2d(x, w, backend="blas")
    assert _blas_core.unpacked_gemm(2048, 256, 512)


@pytest.mark.parametrize("rows_outer", [False, True])
@pytest.mark.parametrize("start", ["zero", "accumulate", "bias"])
def test_an_empty_reduction_still_writes_c(rows_outer, start):
    """K = 0: C is its start alone (zeros, its old value, or the bias), by either driver."""
    if not _blas_core.small_gemm_available():
        pytest.skip("the unpacked kernel needs AVX-512F")
    a, b = np.zeros((5, 0), np.float32), np.zeros((0, 40), np.float32)
    c = np.full((5, 40), 7, np.float32)
    bias = np.arange(5, dtype=np.float32)
    _blas_core.small_gemm(a, b, c, False, start == "accumulate", False, bias if start == "bias" else None,
                          rows_outer)
    expected = {"zero": np.zeros((5, 40)), "accumulate": np.full((5, 40), 7.0),
                "bias": np.repeat(bias[:, None], 40, axis=1)}[start]
    assert np.array_equal(c, expected)

"""Large results come from a pool of blocks (``_blas_core.empty_result``).

A block may be handed to a new result only when no array uses it any more, and
a result made from a reused block must be written whole: the block holds
whatever the last result left there, never the zeros of fresh pages.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import tconv
from tconv import _blas_backend as blas_backend

_blas_core = pytest.importorskip("tconv._blas_core")

SMALL = 1024  # bytes: the pool's threshold in these tests, so small arrays are pooled


@pytest.fixture
def small_pool(monkeypatch):
    """Pool every result of ``SMALL`` bytes or more, starting from an empty pool; the
    shape plans (whose compiled calls remember whether they pool) are rebuilt."""
    monkeypatch.setattr(_blas_core, "RESULT_POOL_MIN_BYTES", SMALL)
    _blas_core.release_results()
    blas_backend.clear_plan_caches()
    yield
    gc.collect()
    _blas_core.release_results()
    blas_backend.clear_plan_caches()


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_small_results_are_plain_arrays():
    result = _blas_core.empty_result((4, 5), np.float32)
    assert result.base is None and result.flags.c_contiguous and result.flags.writeable
    assert result.shape == (4, 5) and result.dtype == np.float32


def test_a_dropped_result_gives_its_block_to_the_next_of_its_size(small_pool):
    first = _blas_core.empty_result((32, 32), np.float32)
    address = _address(first)
    assert first.flags.c_contiguous and first.flags.writeable and first.shape == (32, 32)
    del first
    assert _blas_core.idle_result_bytes() == 32 * 32 * 4
    assert _address(_blas_core.empty_result((32, 32), np.float32)) == address  # (dropped at once again)
    assert _address(_blas_core.empty_result((16, 64), np.float32)) == address  # same bytes, any shape
    assert _address(_blas_core.empty_result((32, 33), np.float32)) != address  # another size: a new block


def test_a_block_stays_taken_while_any_view_of_its_result_lives(small_pool):
    result = _blas_core.empty_result((32, 32), np.float64)
    address = _address(result)
    view = result[::2].T
    del result
    assert _blas_core.idle_result_bytes() == 0
    other = _blas_core.empty_result((32, 32), np.float64)
    assert _address(other) != address
    del view
    assert _address(_blas_core.empty_result((32, 32), np.float64)) == address


def test_idle_blocks_are_bounded_oldest_dropped_first(small_pool, monkeypatch):
    monkeypatch.setattr(_blas_core, "RESULT_POOL_IDLE_BYTES", 2 * 8192)
    results = [_blas_core.empty_result((2048,), np.float32) for _ in range(3)]
    addresses = [_address(r) for r in results]
    for i in range(3):
        results[i] = None  # given back in order: the first is dropped when the third comes
    assert _blas_core.idle_result_bytes() == 2 * 8192
    again = [_blas_core.empty_result((2048,), np.float32) for _ in range(2)]
    assert {_address(r) for r in again} == set(addresses[1:])
    _blas_core.release_results()
    assert _blas_core.idle_result_bytes() == 0


def test_release_workspace_frees_idle_results(small_pool):
    _blas_core.empty_result((64, 64), np.float32)
    assert _blas_core.idle_result_bytes() > 0
    tconv.registry.resolve_backend("blas").release_workspace()
    assert _blas_core.idle_result_bytes() == 0


# Layers of each route of the transposed convolution (and the backward pair):
# (C_in, C_out, grid, kernel, stride, padding, output_padding)
LAYERS = {
    "col2im": (3, 4, (6, 5), 3, 2, 1, 1),
    "exact cover": (3, 4, (5, 6), 2, 2, 0, 0),
    "patches": (2, 3, (3, 3), 8, 4, 2, 0),
    "one cell": (5, 4, (1, 1), 4, 1, 0, 0),
    "flipped gather": (130, 3, (5, 5), 3, 1, 1, 0),
}


def _layer_results(layer, backend):
    c_in, c_out, grid, k, s, p, op = layer
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, c_in, *grid)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out, k, k)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    kw = dict(stride=s, padding=p, output_padding=op, backend=backend)
    y = tconv.conv_transpose2d(x, w, b, **kw)
    dy = np.cos(np.arange(y.size, dtype=np.float32)).reshape(y.shape)
    return [y, *tconv.conv_transpose2d_backward(dy, x, w, needs=("input", "weight"), **kw)[:2]]


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("backend,threads", [("blas", 1), ("openmp", 2)])
def test_results_in_reused_blocks_are_written_whole(small_pool, require, plugin, restore_threads, layer,
                                                    backend, threads, assert_close):
    """Results are made twice: the first ones are filled with NaN and dropped, so
    the second ones get those blocks back and must overwrite every element."""
    (require if backend == "blas" else plugin)(backend)
    tconv.set_num_threads(threads)
    expected = _layer_results(LAYERS[layer], "numpy")
    first = _layer_results(LAYERS[layer], backend)
    addresses = {_address(r) for r in first}
    for result in first:
        result[...] = np.nan
    del first, result
    again = _layer_results(LAYERS[layer], backend)
    assert addresses & {_address(r) for r in again}  # (some block did come back)
    for got, want in zip(again, expected):
        assert_close(got, want)

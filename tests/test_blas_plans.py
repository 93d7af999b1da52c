"""Every way the ``blas`` backend cuts a transposed convolution gives the definition.

The plan (``tconv._blas_backend``) picks a route and a tiling from the shape:
column ranges of one sample, whole samples folded side by side (plain or
sample-minor "interleaved" columns), blocks of output channels, a one-cell
grid as a single GEMM, stride 1 as a regular convolution. Each test forces
one of them by shrinking the plan's budgets, checks that the plan really
took it, and compares with the plain-loop definition (``tests/oracle.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

import oracle
import tconv

blas_backend = pytest.importorskip("tconv._blas_backend")
if blas_backend._blas_core is None:
    pytest.skip("the compiled core is not built", allow_module_level=True)

# name: (monkeypatched plan constants, what describe_plan must say)
PATHS = {
    "column_tiles": (dict(CACHE_TILE_BYTES=1, MIN_GEMM_COLUMNS=7), "columns per GEMM"),
    "folded_plain": (dict(INTERLEAVE_MIN_SAMPLES=10**9), "samples folded per GEMM"),
    "folded_interleaved": (dict(INTERLEAVE_MIN_SAMPLES=2), "sample-minor"),
    # a budget too small for every output channel's rows at once: channel blocks
    "channel_blocks_interleaved": (dict(INTERLEAVE_MIN_SAMPLES=2, MIN_GEMM_COLUMNS=10**9,
                                        CACHE_TILE_BYTES=1), "sample-minor"),
}
N, SIZE = 11, {1: 7, 2: 4, 3: 3}


def _arrays(rng, ndim, n, c_in, c_out, groups, size, kernel):
    x = rng.standard_normal((n, c_in) + (size,) * ndim)
    w = rng.standard_normal((c_in, c_out // groups) + (kernel,) * ndim)
    b = rng.standard_normal(c_out)
    return x, w, b


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scatter_plan_paths_match_the_definition(monkeypatch, path, ndim, with_bias, assert_close):
    constants, described = PATHS[path]
    for name, value in constants.items():
        assert hasattr(blas_backend, name), name
        monkeypatch.setattr(blas_backend, name, value)
    if path == "channel_blocks_interleaved":
        # room for 1.5 output channels' rows (3**ndim each) over all N * cells columns
        monkeypatch.setattr(blas_backend, "WORKSPACE_BYTES", 8 * 3 * 3**ndim * N * SIZE[ndim] ** ndim // 2)
    blas_backend.scatter_plan.cache_clear()  # plans are cached by shape
    try:
        x, w, b = _arrays(np.random.default_rng(ndim), ndim, n=N, c_in=4, c_out=6, groups=2,
                          size=SIZE[ndim], kernel=3)
        bias = b if with_bias else None
        got = getattr(tconv, f"conv_transpose{ndim}d")(
            x, w, bias, stride=2, padding=1, output_padding=1, groups=2, backend="blas")
        plan = blas_backend.scatter_plan(_geometry(x, w, ndim), N, 2, 3, x.itemsize)
    finally:
        blas_backend.scatter_plan.cache_clear()
    assert described in plan.describe(), plan
    if path == "channel_blocks_interleaved":
        assert plan.row_block < w.shape[1], plan
    expected = oracle.conv_transpose_loops(
        x, w, bias, stride=(2,) * ndim, pad_begin=(1,) * ndim, pad_end=(1,) * ndim,
        output_padding=(1,) * ndim, dilation=(1,) * ndim, groups=2)
    assert_close(got, expected)


def _geometry(x, w, ndim):
    """The backend's Geometry of these calls (stride 2, padding 1, output_padding 1, groups 2)."""
    from tconv.backend import Geometry

    lead = 3 - ndim
    grid = (1,) * lead + x.shape[2:]
    kernel = (1,) * lead + w.shape[2:]
    image = (1,) * lead + tuple((g - 1) * 2 - 2 + (k - 1) + 2 for g, k in zip(x.shape[2:], w.shape[2:]))
    return Geometry(image=image, grid=grid, kernel=kernel, stride=(1,) * lead + (2,) * ndim,
                    dilation=(1, 1, 1), pad_begin=(0,) * lead + (1,) * ndim, groups=2)

"""Every way the ``blas`` backend cuts a call gives the definition's result.

The plan (``tconv._blas_backend``) picks a tiling from the shape: column
ranges of one sample, whole samples folded side by side, with their columns
sample-major (plain) or sample-minor ("interleaved"), and for col2im blocks
of output channels. Each test forces one of them by changing the plan's
budgets, checks that the plans really took it, and compares the transposed
and the regular convolution, forward and both gradients, with the ``numpy``
backend (tap by tap, no tiles) and the transposed forward with the plain-loop
definition (``tests/oracle.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracle
import tconv
from tconv.backend import Geometry

blas_backend = pytest.importorskip("tconv._blas_backend")
if blas_backend._blas_core is None:
    pytest.skip("the compiled core is not built", allow_module_level=True)



@pytest.fixture(autouse=True)
def fresh_plans():
    """Routes and plans are cached by shape: each test plans afresh, with its own constants."""
    blas_backend.clear_plan_caches()
    yield
    blas_backend.clear_plan_caches()


N, C_IN, C_OUT, GROUPS = 11, 4, 6, 2
SIZE = {1: 7, 2: 4, 3: 3}
KW = dict(stride=2, padding=1, output_padding=1, groups=GROUPS)

# name: (plan constants, what every plan's description must say)
PATHS = {
    "column_tiles": (dict(CACHE_TILE_BYTES=1, MIN_GEMM_COLUMNS=7, MIN_FOLDED_GEMM_COLUMNS=7), "columns per GEMM"),
    "folded_plain": (dict(INTERLEAVE_MIN_SAMPLES=10**9), "samples folded per GEMM"),
    # col2im adding strided runs into the output instead of the phase-major accumulator
    "folded_unphased": (dict(INTERLEAVE_MIN_SAMPLES=10**9, PHASED_MAX_BYTES=0), "samples folded per GEMM"),
    "folded_interleaved": (dict(INTERLEAVE_MIN_SAMPLES=2), "sample-minor"),
    # the im2col plans' GEMMs skip padding's taps (2-D only: the k3 s2 p1 grid's first row)
    "border_taps_skipped": (dict(INTERLEAVE_MIN_SAMPLES=2, BORDER_BAND_MIN_COLUMNS=1), "sample-minor"),
    # col2im's budget too small for all output channels at once (set per ndim below)
    "channel_blocks_interleaved": (dict(INTERLEAVE_MIN_SAMPLES=2, MIN_FOLDED_GEMM_COLUMNS=10**9,
                                        CACHE_TILE_BYTES=1), "sample-minor"),
}


def _geometry(ndim: int) -> Geometry:
    """The lifted 3-D geometry of the transposed calls below."""
    lead = 3 - ndim
    grid = (1,) * lead + (SIZE[ndim],) * ndim
    image = (1,) * lead + (2 * SIZE[ndim],) * ndim  # (g - 1) * 2 - 2 + 2 + 1 + 1
    return Geometry(image=image, grid=grid, kernel=(1,) * lead + (3,) * ndim,
                    stride=(1,) * lead + (2,) * ndim, dilation=(1, 1, 1),
                    pad_begin=(0,) * lead + (1,) * ndim, groups=GROUPS)


def _plans(ndim: int) -> list:
    """The plans of col2im and of the gradients' im2col (input and weight)."""
    geom, p, q = _geometry(ndim), C_IN // GROUPS, C_OUT // GROUPS
    # the gradients (and the regular convolution below, image 2S -> grid S) map
    # the same geometry with the image's channels first
    return [blas_backend.scatter_plan(geom, N, p, q, 8),
            blas_backend.gather_plan(geom, N, q, p, 8)[0],
            blas_backend.weight_grad_plan(geom, N, q, p, 8)]


def _everything(x, w, wc, b, ndim, backend):
    ct, ctb = getattr(tconv, f"conv_transpose{ndim}d"), getattr(tconv, f"conv_transpose{ndim}d_backward")
    cv, cvb = getattr(tconv, f"conv{ndim}d"), getattr(tconv, f"conv{ndim}d_backward")
    y = ct(x, w, b, **KW, backend=backend)
    dy = np.cos(np.arange(y.size)).reshape(y.shape).astype(y.dtype)
    conv_kw = dict(stride=2, padding=1, groups=GROUPS)
    z = cv(y, wc, b[:C_IN] if b is not None else None, **conv_kw, backend=backend)
    dz = np.sin(np.arange(z.size)).reshape(z.shape).astype(z.dtype)
    needs = ("input", "weight")
    return [y, *ctb(dy, x, w, **KW, needs=needs, backend=backend)[:2],
            z, *cvb(dz, y, wc, **conv_kw, needs=needs, backend=backend)[:2]]


def _transpose_weight_grads(monkeypatch, transposed: bool, ndim: int) -> None:
    """Make every weight gradient below sum ``gw^T`` (or none), and check that it does."""
    monkeypatch.setattr(blas_backend, "GW_TRANSPOSED_MIN_COLUMNS", 0 if transposed else 10**9)
    # the transposed call's gradients map its output (the image) onto its input (the grid)
    assert blas_backend.weight_grad_transposed(_geometry(ndim), N, C_OUT // GROUPS, C_IN // GROUPS, 8) == transposed


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("gw_transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # (float32 packs sample-minor tiles in 4x4 blocks)
def test_every_tiling_matches_the_reference(monkeypatch, restore_threads, path, ndim, with_bias, gw_transposed, dtype,
                                            assert_close):
    if dtype == np.float32:
        tconv.set_num_threads(1)  # (float32's GEMMs then take the unpacked kernel: see test_small_gemm)
    constants, described = PATHS[path]
    for name, value in constants.items():
        assert hasattr(blas_backend, name), name
        monkeypatch.setattr(blas_backend, name, value)
    _transpose_weight_grads(monkeypatch, gw_transposed, ndim)
    if path == "channel_blocks_interleaved":
        # room for 1.5 output channels' rows (3**ndim each) over all N * cells columns
        monkeypatch.setattr(blas_backend, "WORKSPACE_BYTES", 8 * 3 * 3**ndim * N * SIZE[ndim] ** ndim // 2)
    rng = np.random.default_rng(ndim)
    x = rng.standard_normal((N, C_IN) + (SIZE[ndim],) * ndim).astype(dtype)
    w = rng.standard_normal((C_IN, C_OUT // GROUPS) + (3,) * ndim).astype(dtype)
    wc = rng.standard_normal((C_IN, C_OUT // GROUPS) + (3,) * ndim).astype(dtype)
    b = rng.standard_normal(C_OUT).astype(dtype) if with_bias else None
    got = _everything(x, w, wc, b, ndim, "blas")
    assert all(g.dtype == dtype for g in got)
    plans = _plans(ndim)
    for plan in plans:
        assert described in plan.describe(), plan
    if path == "channel_blocks_interleaved":
        assert plans[0].row_block < C_OUT // GROUPS, plans[0]
    if path.startswith("folded_"):
        assert all(plan.phased == (path == "folded_plain") for plan in plans), plans
    assert [plan.skips_border_taps for plan in plans] == [False, *[path == "border_taps_skipped" and ndim == 2] * 2]
    expected = _everything(x, w, wc, b, ndim, "numpy")
    for g, e in zip(got, expected):
        assert_close(g, e)
    definition = oracle.conv_transpose_loops(
        x, w, b, stride=(2,) * ndim, pad_begin=(1,) * ndim, pad_end=(1,) * ndim,
        output_padding=(1,) * ndim, dilation=(1,) * ndim, groups=GROUPS)
    assert_close(got[0], definition)


class _NanEmpty:
    """``numpy`` with ``empty`` returning NaN-filled arrays: a kernel that reads an
    output element before writing it passes the NaN on."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        return np.full(shape, np.nan, dtype=dtype, order=order)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_outputs_are_written_not_read(monkeypatch, path, ndim, with_bias, assert_close):
    """Without a bias the gather's GEMMs write the output (beta 0) instead of adding
    into a zeroed one: every tiling must still write every element."""
    for name, value in PATHS[path][0].items():
        monkeypatch.setattr(blas_backend, name, value)
    if path == "channel_blocks_interleaved":
        monkeypatch.setattr(blas_backend, "WORKSPACE_BYTES", 8 * 3 * 3**ndim * N * SIZE[ndim] ** ndim // 2)
    rng = np.random.default_rng(ndim)
    x = rng.standard_normal((N, C_IN) + (SIZE[ndim],) * ndim)
    w = rng.standard_normal((C_IN, C_OUT // GROUPS) + (3,) * ndim)
    wc = rng.standard_normal((C_IN, C_OUT // GROUPS) + (3,) * ndim)
    b = rng.standard_normal(C_OUT) if with_bias else None
    expected = _everything(x, w, wc, b, ndim, "numpy")
    monkeypatch.setattr(blas_backend, "np", _NanEmpty())
    monkeypatch.setattr(blas_backend, "empty_result", lambda shape, dtype: _NanEmpty.empty(shape, dtype))
    for g, e in zip(_everything(x, w, wc, b, ndim, "blas"), expected):
        assert_close(g, e)


@pytest.mark.parametrize("path", ["column_tiles", "folded_plain", "folded_interleaved", "border_taps_skipped",
                                  "tight_budget"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gw_transposed", [False, True])
def test_the_backward_pair_is_the_two_calls_bit_for_bit(monkeypatch, restore_threads, path, ndim, dtype,
                                                        gw_transposed):
    """Both gradients of a transposed convolution come from one im2col per tile
    (``gather_and_weight_grad``): the same bits as asking for each alone. Where
    the pair's (slightly larger) buffers would pass the budget, it makes the two calls."""
    if dtype == np.float32:
        tconv.set_num_threads(1)  # (float32's GEMMs then take the unpacked kernel)
    tight = path == "tight_budget"
    for name, value in ({} if tight else PATHS[path][0]).items():
        monkeypatch.setattr(blas_backend, name, value)
    _transpose_weight_grads(monkeypatch, gw_transposed, ndim)
    rng = np.random.default_rng(ndim)
    x = rng.standard_normal((N, C_IN) + (SIZE[ndim],) * ndim).astype(dtype)
    w = rng.standard_normal((C_IN, C_OUT // GROUPS) + (3,) * ndim).astype(dtype)
    dy = rng.standard_normal((N, C_OUT) + (2 * SIZE[ndim],) * ndim).astype(dtype)
    backward = getattr(tconv, f"conv_transpose{ndim}d_backward")
    calls = []
    monkeypatch.setattr(blas_backend._blas_core, "gather_and_weight_grad",
                        _recording(blas_backend._blas_core.gather_and_weight_grad, calls))
    alone = (backward(dy, x, w, **KW, needs=("input",), backend="blas")[0],
             backward(dy, x, w, **KW, needs=("weight",), backend="blas")[1])
    if tight:  # (the plans, cached above, were made with the whole budget)
        monkeypatch.setattr(blas_backend, "WORKSPACE_BYTES", 64)
    pair = backward(dy, x, w, **KW, needs=("input", "weight"), backend="blas")
    assert len(calls) == (0 if tight else 1)
    for a, b in zip(pair[:2], alone):
        assert a.dtype == dtype and np.array_equal(a, b)


def _recording(function, calls):
    def recorded(*args):
        calls.append(args)
        return function(*args)

    return recorded


# Kernels wider than the grid take the "patches" route: per block of output
# channels and tile of grid cells, whole kernel rows are added. Cache tiles in
# float64 (kernel patches of 5**ndim, grids of 3**ndim cells): all cells and
# channels at once; all cells, two of three channels per GEMM; two cells per GEMM.
PATCH_BUDGETS = {
    "all_at_once": lambda ndim: 2**22,
    "channel_blocks": lambda ndim: 8 * 5**ndim * 3**ndim * 2,
    "cell_tiles": lambda ndim: 8 * 5**ndim * 2,
}


@pytest.mark.parametrize("budget", sorted(PATCH_BUDGETS))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_patches_route_matches_the_definition(monkeypatch, budget, ndim, assert_close):
    monkeypatch.setattr(blas_backend, "CACHE_TILE_BYTES", PATCH_BUDGETS[budget](ndim))
    rng = np.random.default_rng(ndim)
    n, groups, size, kernel = 2, 2, 3, 5
    x = rng.standard_normal((n, 4) + (size,) * ndim)
    w = rng.standard_normal((4, 3) + (kernel,) * ndim)
    b = rng.standard_normal(6)
    # dilation 2 and padding 3 put some taps of the edge cells off the image
    kwargs = dict(stride=2, padding=3, output_padding=1, dilation=2, groups=groups)
    got = getattr(tconv, f"conv_transpose{ndim}d")(x, w, b, **kwargs, backend="blas")
    lead = 3 - ndim
    geom = Geometry(image=(1,) * lead + got.shape[2:], grid=(1,) * lead + x.shape[2:],
                    kernel=(1,) * lead + w.shape[2:], stride=(1,) * lead + (2,) * ndim,
                    dilation=(1,) * lead + (2,) * ndim, pad_begin=(0,) * lead + (3,) * ndim, groups=groups)
    assert blas_backend.scatter_route(geom, 2, 3, 8) == "patches"
    cells, q_block = blas_backend.patch_plan(geom, 3, 8)
    if budget == "channel_blocks":
        assert cells == size**ndim and q_block == 2, (cells, q_block)
    if budget == "cell_tiles":
        assert cells == 2 and q_block == 1, (cells, q_block)
    expected = oracle.conv_transpose_loops(
        x, w, b, stride=(2,) * ndim, pad_begin=(3,) * ndim, pad_end=(3,) * ndim,
        output_padding=(1,) * ndim, dilation=(2,) * ndim, groups=groups)
    assert_close(got, expected)


def test_work_buffers_are_cached_per_thread_and_released():
    """A layer called in a loop reuses its thread's work buffers; other threads have their own."""
    import threading

    core = blas_backend._blas_core
    backend = tconv.registry.resolve_backend("blas")
    x, w = np.ones((4, 8, 6, 6)), np.ones((8, 4, 3, 3))
    backend.release_workspace()
    assert core.cached_workspace_bytes() == 0
    first = tconv.conv_transpose2d(x, w, stride=2, backend="blas")
    held = core.cached_workspace_bytes()
    assert held > 0
    again = tconv.conv_transpose2d(x, w, stride=2, backend="blas")
    assert core.cached_workspace_bytes() == held and np.array_equal(first, again)
    seen = {}

    def other_thread():
        seen["before"] = core.cached_workspace_bytes()
        tconv.conv_transpose2d(x, w, stride=2, backend="blas")
        seen["after"] = core.cached_workspace_bytes()

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen == {"before": 0, "after": held}
    backend.release_workspace()
    assert core.cached_workspace_bytes() == 0


# stride = kernel: taps side by side. With the image inside the grid's full
# extent every cell gets exactly one product and col2im writes instead of
# adding; output_padding past that extent leaves cells only the bias reaches.
COVER_CASES = {  # name: (padding, output_padding, covers exactly)
    "full": (0, 0, True),
    "cropped": (1, 1, True),
    "past_the_extent": (0, 1, False),
}


@pytest.mark.parametrize("case", sorted(COVER_CASES))
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("tiles", ["columns", "folded"])
def test_non_overlapping_taps_match_the_definition(monkeypatch, case, ndim, tiles, assert_close):
    padding, output_padding, covers = COVER_CASES[case]
    if tiles == "columns":  # several per sample
        monkeypatch.setattr(blas_backend, "CACHE_TILE_BYTES", 1)
        monkeypatch.setattr(blas_backend, "COVER_TILE_BYTES", 1)
        monkeypatch.setattr(blas_backend, "MIN_GEMM_COLUMNS", 5)
        monkeypatch.setattr(blas_backend, "MIN_FOLDED_GEMM_COLUMNS", 5)
    rng = np.random.default_rng(ndim)
    x = rng.standard_normal((3, 4) + (SIZE[ndim] + 1,) * ndim)
    w = rng.standard_normal((4, 3, *(2,) * ndim))
    b = rng.standard_normal(6)
    got = getattr(tconv, f"conv_transpose{ndim}d")(
        x, w, b, stride=2, padding=padding, output_padding=output_padding, groups=2, backend="blas")
    lead = 3 - ndim
    geom = Geometry(image=(1,) * lead + got.shape[2:], grid=(1,) * lead + x.shape[2:],
                    kernel=(1,) * lead + w.shape[2:], stride=(1,) * lead + (2,) * ndim,
                    dilation=(1, 1, 1), pad_begin=(0,) * lead + (padding,) * ndim, groups=2)
    assert blas_backend.covers_exactly(geom) == covers
    plan = blas_backend.scatter_plan(geom, 3, 2, 3, 8)
    assert (plan.cols_per_tile < np.prod(x.shape[2:])) == (tiles == "columns"), plan
    expected = oracle.conv_transpose_loops(
        x, w, b, stride=(2,) * ndim, pad_begin=(padding,) * ndim, pad_end=(padding,) * ndim,
        output_padding=(output_padding,) * ndim, dilation=(1,) * ndim, groups=2)
    assert_close(got, expected)


# col2im_phased: whole samples, each channel accumulated with image rows stored
# phase-major. Strides that differ per dim, dilation, and padding that puts
# the edge cells' outer taps off the image; stride 1 is one phase.
PHASED_CASES = {  # name: (stride, padding, output_padding, dilation)
    "mixed_strides": ((3, 2, 2), 3, 1, 2),
    "stride_one": (1, 1, 0, 1),
    "stride_past_kernel": (4, 0, 2, 1),
}


@pytest.mark.parametrize("case", sorted(PHASED_CASES))
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("fold", [True, False])
def test_phased_col2im_matches_the_definition(case, ndim, fold, assert_close):
    stride, padding, output_padding, dilation = PHASED_CASES[case]
    stride = (stride,) * ndim if isinstance(stride, int) else stride[-ndim:]
    rng = np.random.default_rng(ndim)
    n = 5 if fold else 1
    x = rng.standard_normal((n, 4) + (3,) * ndim).astype(np.float32)
    w = rng.standard_normal((4, 3) + (3,) * ndim).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=2)
    got = getattr(tconv, f"conv_transpose{ndim}d")(x, w, b, **kwargs, backend="blas")
    lead = 3 - ndim
    geom = Geometry(image=(1,) * lead + got.shape[2:], grid=(1,) * lead + x.shape[2:],
                    kernel=(1,) * lead + w.shape[2:], stride=(1,) * lead + tuple(stride),
                    dilation=(1,) * lead + (dilation,) * ndim, pad_begin=(0,) * lead + (padding,) * ndim,
                    groups=2)
    assert blas_backend.scatter_route(geom, 2, 3, 4) == "col2im"
    plan = blas_backend.scatter_plan(geom, n, 2, 3, 4)
    assert plan.phased and (plan.samples_per_tile > 1) == fold, plan
    expected = oracle.conv_transpose_loops(
        x, w, b, stride=tuple(stride), pad_begin=(padding,) * ndim, pad_end=(padding,) * ndim,
        output_padding=(output_padding,) * ndim, dilation=(dilation,) * ndim, groups=2)
    assert_close(got, expected)


@pytest.mark.parametrize("case", sorted(PHASED_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_phased_col2im_adds_in_the_plain_order(monkeypatch, case, dtype):
    """The phase-major accumulator starts at the bias and adds the taps in the plain
    col2im's order: the same bits, with or without it."""
    stride, padding, output_padding, dilation = PHASED_CASES[case]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 6, 5)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    kwargs = dict(stride=stride if isinstance(stride, int) else stride[1:], padding=padding,
                  output_padding=output_padding, dilation=dilation, groups=2)
    phased = tconv.conv_transpose2d(x, w, b, **kwargs, backend="blas")
    monkeypatch.setattr(blas_backend, "PHASED_MAX_BYTES", 0)
    blas_backend.clear_plan_caches()
    assert np.array_equal(tconv.conv_transpose2d(x, w, b, **kwargs, backend="blas"), phased)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("fold", [True, False])
def test_phased_im2col_gives_the_same_columns(monkeypatch, ndim, fold):
    """im2col through phase-major channels copies the same values into the same
    columns: regular convolutions and both gradients, bit for bit."""
    stride, padding, dilation = (3, 2, 2)[-ndim:], 2, 2
    rng = np.random.default_rng(ndim)
    n = 5 if fold else 1
    x = rng.standard_normal((n, 4) + (9,) * ndim).astype(np.float32)
    wc = rng.standard_normal((6, 2) + (3,) * ndim).astype(np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=2)
    cv, cvb = getattr(tconv, f"conv{ndim}d"), getattr(tconv, f"conv{ndim}d_backward")

    def everything():
        z = cv(x, wc, None, **kw, backend="blas")
        dz = np.cos(np.arange(z.size, dtype=np.float32)).reshape(z.shape)
        # the pair (gather_and_weight_grad) is the transposed convolution's backward
        ct_grads = getattr(tconv, f"conv_transpose{ndim}d_backward")(
            x, dz, wc, **kw, output_padding=tuple(2 if s == 3 else 0 for s in stride),
            needs=("input", "weight"), backend="blas")[:2]
        return [z, *cvb(dz, x, wc, **kw, needs=("input", "weight"), backend="blas")[:2], *ct_grads]

    lead = 3 - ndim
    z_shape = cv(x, wc, None, **kw, backend="numpy").shape
    geom = Geometry(image=(1,) * lead + x.shape[2:], grid=(1,) * lead + z_shape[2:],
                    kernel=(1,) * lead + wc.shape[2:], stride=(1,) * lead + tuple(stride),
                    dilation=(1,) * lead + (dilation,) * ndim, pad_begin=(0,) * lead + (padding,) * ndim,
                    groups=2)
    plans = [blas_backend.gather_plan(geom, n, 2, 3, 4)[0], blas_backend.weight_grad_plan(geom, n, 2, 3, 4)]
    assert all(plan.phased and (plan.samples_per_tile > 1) == fold for plan in plans), plans
    phased = everything()
    monkeypatch.setattr(blas_backend, "PHASED_MAX_BYTES", 0)
    blas_backend.clear_plan_caches()
    for a, b in zip(everything(), phased):
        assert np.array_equal(a, b)


# Stride 1 along W with a 3-wide kernel: col2im adds a row's three taps in one pass.
# name: (stride, padding, dilation), (H, W) each: edges where one or two of the taps land
THREE_TAP_CASES = {
    "plain": ((1, 1), (1, 1), 1),
    "dilated": ((2, 1), (0, 0), 2),
    "wide_padding": ((1, 1), (0, 3), 1),  # 3 image columns: the taps overlap on 1 to 3
    "strided_rows": ((3, 1), (2, 2), 1),
}
# name: (plan constants, samples, what the plan says)
THREE_TAP_TILES = {
    "column_tiles": (dict(CACHE_TILE_BYTES=1, MIN_GEMM_COLUMNS=5, MIN_FOLDED_GEMM_COLUMNS=5), 1,
                     "columns per GEMM"),  # rows cut mid-way
    "folded_short_runs": (dict(INTERLEAVE_MIN_SAMPLES=10**9), 9, "samples folded per GEMM"),
    "whole_sample": ({}, 1, "1 tiles"),
}


@pytest.mark.parametrize("case", sorted(THREE_TAP_CASES))
@pytest.mark.parametrize("tiles", sorted(THREE_TAP_TILES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_three_taps_at_once_add_in_the_plain_order(monkeypatch, case, tiles, dtype, assert_close):
    """The three taps of a kernel row at stride 1 go into each image row in one pass,
    every element taking them in tap order: the definition's values, and where tiles
    hold whole samples, bit for bit those of the phase-major accumulator (bias, then
    each tap in order; column tiles add tile by tile, another order)."""
    stride, padding, dilation = THREE_TAP_CASES[case]
    constants, n, described = THREE_TAP_TILES[tiles]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 4, 5, 7)).astype(dtype)
    w = rng.standard_normal((4, 3, 2, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=2)
    phased = tconv.conv_transpose2d(x, w, b, **kwargs, backend="blas")
    for name, value in dict(constants, PHASED_MAX_BYTES=0).items():
        monkeypatch.setattr(blas_backend, name, value)
    blas_backend.clear_plan_caches()
    got = tconv.conv_transpose2d(x, w, b, **kwargs, backend="blas")
    geom = Geometry(image=(1,) + got.shape[2:], grid=(1, 5, 7), kernel=(1, 2, 3), stride=(1, *stride),
                    dilation=(1, dilation, dilation), pad_begin=(0, *padding), groups=2)
    plan = blas_backend.scatter_plan(geom, n, 2, 3, np.dtype(dtype).itemsize)
    assert blas_backend.scatter_route(geom, 2, 3, np.dtype(dtype).itemsize) == "col2im" and not plan.phased and described in plan.describe()
    assert tiles == "column_tiles" or np.array_equal(got, phased)
    assert_close(got, oracle.conv_transpose_loops(
        x, w, b, stride=stride, pad_begin=padding, pad_end=padding, output_padding=(0, 0),
        dilation=(dilation,) * 2, groups=2))


def test_samples_with_large_grids_are_not_folded(assert_close):
    """A sample of FOLD_MAX_CELLS grid cells or more makes a wide GEMM alone: no folding
    (which would copy the tile's input), whatever room the cache tile leaves."""
    x = np.random.default_rng(0).standard_normal((3, 2, 24, 24))  # 576 cells, tiny channels
    w = np.random.default_rng(1).standard_normal((2, 3, 4, 4))
    kw = dict(stride=2, padding=1)
    y = tconv.conv_transpose2d(x, w, **kw, backend="blas")
    geom = Geometry(image=(1, 48, 48), grid=(1, 24, 24), kernel=(1, 4, 4), stride=(1, 2, 2),
                    dilation=(1, 1, 1), pad_begin=(0, 1, 1), groups=1)
    assert 24 * 24 >= blas_backend.FOLD_MAX_CELLS
    for plan in (blas_backend.scatter_plan(geom, 3, 2, 3, 8), blas_backend.gather_plan(geom, 3, 3, 2, 8)[0],
                 blas_backend.weight_grad_plan(geom, 3, 3, 2, 8)):
        assert plan.samples_per_tile == 1, plan
    assert_close(y, tconv.conv_transpose2d(x, w, **kw, backend="numpy"))
    dy = np.cos(np.arange(y.size)).reshape(y.shape).astype(y.dtype)
    for got, want in zip(tconv.conv_transpose2d_backward(dy, x, w, **kw, backend="blas"),
                         tconv.conv_transpose2d_backward(dy, x, w, **kw, backend="numpy")):
        assert_close(got, want)


@pytest.mark.parametrize("side", [8, 16])
def test_deep_layers_fold_small_samples_into_wide_tiles(side):
    """Deep reductions leave the cache tile few columns: samples smaller than
    MIN_GEMM_COLUMNS cells are folded to at least MIN_FOLDED_GEMM_COLUMNS, while a
    sample that fills MIN_GEMM_COLUMNS alone stays one per tile."""
    geom = Geometry(image=(1, 2 * side, 2 * side), grid=(1, side, side), kernel=(1, 4, 4),
                    stride=(1, 2, 2), dilation=(1, 1, 1), pad_begin=(0, 1, 1), groups=1)
    cells, n = side * side, 64
    plans = [blas_backend.scatter_plan(geom, n, 256, 128, 4), blas_backend.gather_plan(geom, n, 128, 256, 4)[0]]
    for plan in plans:
        if cells < blas_backend.MIN_GEMM_COLUMNS:
            assert plan.cols_per_tile >= blas_backend.MIN_FOLDED_GEMM_COLUMNS, plan
        else:
            assert plan.samples_per_tile == 1 and plan.cols_per_tile == blas_backend.MIN_GEMM_COLUMNS, plan


def test_the_compiled_call_refuses_arrays_it_was_not_planned_for(assert_close):
    """``ScatterCall`` reads data pointers, so it checks dtype, C order, alignment,
    byte order and size itself."""
    geom = _geometry(2)
    q = C_OUT // GROUPS
    call = blas_backend._scatter_call(geom, N, C_IN, q, np.dtype(np.float64))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C_IN, *geom.grid))
    w = rng.standard_normal((C_IN, q, *geom.kernel))
    b = rng.standard_normal(C_OUT)
    assert_close(call(x, w, b), tconv.registry.resolve_backend("numpy").scatter(x, w, b, geom))
    swapped = x.astype(x.dtype.newbyteorder())
    unaligned = np.frombuffer(b"\0" + x.tobytes(), dtype=np.uint8)[1:].view(np.float64).reshape(x.shape)
    assert not unaligned.flags.aligned
    for bad, name in [((x.astype(np.float32), w, b), "grid_in"), ((x[:-1], w, b), "grid_in"),
                      ((swapped, w, b), "grid_in"), ((unaligned, w, b), "grid_in"),
                      ((x, np.asfortranarray(w), b), "weight"), ((x, w, b[:-1]), "bias")]:
        with pytest.raises(ValueError, match=f"{name} must be a C-contiguous, aligned, native float64"):
            call(*bad)
    with pytest.raises(TypeError):
        call(list(x), w, None)


def test_channel_ranges_run_only_on_the_patches_and_shifted_routes(assert_close):
    """``ScatterCall.channels_into`` (a backend's threads each writing some output
    channels) runs the patches and shifted routes only, within the channels, into a full output."""
    col2im = blas_backend._scatter_call(_geometry(2), N, C_IN, C_OUT // GROUPS, np.dtype(np.float64))
    x = np.ones((N, C_IN, *_geometry(2).grid))
    w = np.ones((C_IN, C_OUT // GROUPS, *_geometry(2).kernel))
    with pytest.raises(ValueError, match="only the patches and shifted routes"):
        col2im.channels_into(x, w, None, np.empty((N, C_OUT, *_geometry(2).image)), 0, 1)
    geom = Geometry(image=(1, 1, 40), grid=(1, 1, 3), kernel=(1, 1, 16), stride=(1, 1, 12), dilation=(1, 1, 1),
                    pad_begin=(0, 0, 0), groups=1)
    assert blas_backend.scatter_route(geom, 2, 3, 8) == "patches"
    call = blas_backend._scatter_call(geom, 1, 2, 3, np.dtype(np.float64))
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((1, 2, 1, 1, 3)), rng.standard_normal((2, 3, 1, 1, 16)), rng.standard_normal(3)
    out = np.full((1, 3, 1, 1, 40), np.nan)
    call.channels_into(x, w, b, out, 1, 3)
    assert np.isnan(out[:, 0]).all()
    assert_close(out[:, 1:], call(x, w, b)[:, 1:])
    for first, end in [(-1, 2), (2, 1), (0, 4)]:
        with pytest.raises(ValueError, match="not within 0..3"):
            call.channels_into(x, w, b, out, first, end)
    with pytest.raises(ValueError, match="out must be"):
        call.channels_into(x, w, b, out[:, :2].copy(), 0, 1)


@pytest.mark.parametrize("fits", [True, False])
@pytest.mark.parametrize("ndim", [1, 2])
def test_wide_kernels_go_phased_when_a_sample_fits(monkeypatch, fits, ndim, assert_close):
    """Kernels 8 or more wide take col2im through the phase-major accumulator, on
    whole samples, when a sample's columns fit ``WIDE_KERNEL_TILE_BYTES`` (FSRCNN's
    k9 s3), else the patches route; both give the definition's result."""
    if not fits:
        monkeypatch.setattr(blas_backend, "WIDE_KERNEL_TILE_BYTES", 1024)
    rng = np.random.default_rng(ndim)
    n, c_in, c_out, size, kernel = 3, 4, 2, 10, 9
    x = rng.standard_normal((n, c_in) + (size,) * ndim)
    w = rng.standard_normal((c_in, c_out) + (kernel,) * ndim)
    b = rng.standard_normal(c_out)
    kwargs = dict(stride=3, padding=4, output_padding=2)
    got = getattr(tconv, f"conv_transpose{ndim}d")(x, w, b, **kwargs, backend="blas")
    lead = 3 - ndim
    geom = Geometry(image=(1,) * lead + got.shape[2:], grid=(1,) * lead + x.shape[2:],
                    kernel=(1,) * lead + w.shape[2:], stride=(1,) * lead + (3,) * ndim,
                    dilation=(1, 1, 1), pad_begin=(0,) * lead + (4,) * ndim, groups=1)
    route = blas_backend.scatter_route(geom, c_in, c_out, 8)
    assert route == ("col2im" if fits else "patches")
    if fits:
        plan = blas_backend.scatter_plan(geom, n, c_in, c_out, 8)
        assert plan.phased and not plan.interleaved and plan.cols_per_tile >= size**ndim, plan
    assert_close(got, oracle.conv_transpose_loops(
        x, w, b, stride=(3,) * ndim, pad_begin=(4,) * ndim, pad_end=(4,) * ndim,
        output_padding=(2,) * ndim, dilation=(1,) * ndim, groups=1))


@given(grid=st.integers(1, 9), kernel=st.integers(1, 6), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       pad=st.integers(0, 6), extra=st.integers(-2, 3))
def test_border_bands_are_the_kernel_rows_each_grid_row_meets(grid, kernel, stride, dilation, pad, extra):
    """``_blas_core.border_bands`` against the index map written out: grid row ``lh``
    meets kernel row ``kh`` where ``0 <= lh * stride - pad + kh * dilation < H``."""
    height = max(1, (grid - 1) * stride - pad + dilation * (kernel - 1) + 1 + extra)
    met = [[kh for kh in range(kernel) if 0 <= lh * stride - pad + kh * dilation < height] for lh in range(grid)]
    bands = blas_backend._blas_core.border_bands((1, height, 5), (1, grid, 3), (1, kernel, 2), (1, stride, 1),
                                                 (1, dilation, 1), (0, pad, 0))
    if kernel < 2 or any(not rows for rows in met) or all(len(rows) == kernel for rows in met):
        assert bands == []
        return
    merged = []
    for lh, rows in enumerate(met):
        assert rows == list(range(rows[0], rows[-1] + 1))  # (a range, as the bands assume)
        if merged and merged[-1][1:] == (rows[0], rows[-1] + 1):
            merged[-1] = (lh + 1, rows[0], rows[-1] + 1)
        else:
            merged.append((lh + 1, rows[0], rows[-1] + 1))
    assert bands == (merged if len(merged) <= 16 else [])


def test_three_d_kernels_are_not_banded():
    assert blas_backend._blas_core.border_bands((4, 8, 8), (2, 4, 4), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)) == []


@pytest.mark.parametrize("path", sorted(set(PATHS) - {"channel_blocks_interleaved"}))
def test_wide_weight_gradients_are_summed_by_the_kernel(monkeypatch, restore_threads, path, assert_close):
    """A float32 weight gradient at least ``KERNEL_MIN_COLUMNS`` wide (the transposed
    convolution's 40 input channels), over a long reduction (8 samples of 12x12), is
    summed transposed as ``cols @ dY^T`` by the unpacked kernel (one block of three
    vectors a row block, the last masked to 8 columns), on every tiling: the numpy
    backend's result, and the pair's bits those of the weight gradient alone."""
    if not blas_backend._blas_core.small_gemm_available():
        pytest.skip("the unpacked kernel needs AVX-512F")
    for name, value in PATHS[path][0].items():
        monkeypatch.setattr(blas_backend, name, value)
    n, c_in, c_out, size = 8, 40, 6, 12
    geom = Geometry(image=(1, 2 * size, 2 * size), grid=(1, size, size), kernel=(1, 4, 4), stride=(1, 2, 2),
                    dilation=(1, 1, 1), pad_begin=(0, 1, 1), groups=1)
    tconv.set_num_threads(1)  # (the kernel is for one thread: see test_small_gemm)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, c_in, size, size)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out, 4, 4)).astype(np.float32)
    dy = rng.standard_normal((n, c_out, 2 * size, 2 * size)).astype(np.float32)
    kw = dict(stride=2, padding=1)
    alone = tconv.conv_transpose2d_backward(dy, x, w, **kw, needs=("weight",), backend="blas")[1]
    pair = tconv.conv_transpose2d_backward(dy, x, w, **kw, needs=("input", "weight"), backend="blas")
    expected = tconv.conv_transpose2d_backward(dy, x, w, **kw, needs=("input", "weight"), backend="numpy")
    # (asked after the calls, which told the core this thread's BLAS threads)
    assert blas_backend.weight_grad_transposed(geom, n, c_out, c_in, 4)
    tile = blas_backend.weight_grad_plan(geom, n, c_out, c_in, 4).cols_per_tile
    assert blas_backend._blas_core.unpacked_gemm(c_out * 16, c_in, tile)
    assert np.array_equal(pair[1], alone)
    assert_close(pair[0], expected[0])
    assert_close(pair[1], expected[1])

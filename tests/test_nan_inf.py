"""NaN and Inf go exactly where the definition sends them, on every CPU backend (issue 7).

SPEC: every input cell scatters ``value * kernel`` onto the output at
``cell * stride - pad_begin + tap * dilation``; cells landing outside are
dropped. So a NaN in ``x`` makes NaN exactly the output cells it scatters to
(in the output channels of its group), a NaN in ``weight`` the cells its tap
reaches from every input cell, a NaN in ``bias`` its whole channel; every
other cell stays finite. An Inf behaves the same with a sign. The expected
masks below are computed from that sentence with index arithmetic, not from
any convolution code. All other values are finite and non-zero (so that no
``0 * NaN`` question arises) and small (so that nothing overflows).
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = dict(max_examples=15, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def nonzero(rng, shape, dtype):
    """Random values in ±[0.5, 1.5]: finite, non-zero, no overflow."""
    return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def taps(case):
    return itertools.product(*(range(k) for k in case.kernel))


def image_pos(case, cell, tap):
    """Where grid cell ``cell`` and kernel tap ``tap`` meet: ``cell * stride - pad_begin + tap * dilation``."""
    return tuple(c * s - pb + t * d for c, s, pb, t, d in zip(cell, case.stride, case.pad_begin, tap, case.dilation))


def inside(pos, size):
    return all(0 <= p < n for p, n in zip(pos, size))


def group_channels(case, channel_in_group_of: int, side: str):
    """The channels on ``side`` ('in'/'out') of the group holding input/output channel ``channel_in_group_of``."""
    g_in, g_out = case.c_in // case.groups, case.c_out // case.groups
    group = channel_in_group_of // (g_in if side == "out" else g_out)
    per = g_out if side == "out" else g_in
    return range(group * per, (group + 1) * per)


def grid_cells(case):
    """All cells of the strided side: the input of a transposed conv, the output of a regular one."""
    size = case.in_size if case.transposed else case.out_size
    return itertools.product(*(range(n) for n in size))


def batched_shape(case, shape):
    return shape if case.batch is not None else (1, *shape)


def pick_cell(rng, shape):
    return tuple(int(rng.integers(0, n)) for n in shape)


def run(case, x, w, b, backend):
    out = case.function(x, w, b, **case.kwargs(), backend=backend)
    return out if case.batch is not None else out[None]


def draw_case(data, cases, **kw):
    # a non-empty batch: an empty one has no cells to poison
    return data.draw(cases(empty_batch=False, output_size=False, **kw), label="case")


# --------------------------------------------------------------------------- #
# expected masks, from the definition
# --------------------------------------------------------------------------- #
def mask_from_x(case, poisoned, out_shape):
    """Output cells reached from the poisoned x cells ``(n, c, *spatial)``."""
    mask = np.zeros(out_shape, dtype=bool)
    for n, c, *cell in poisoned:
        cell = tuple(cell)
        if case.transposed:  # x cell scatters to cell*s - pb + tap*d, in its group's output channels
            for tap in taps(case):
                pos = image_pos(case, cell, tap)
                if inside(pos, case.out_size):
                    for co in group_channels(case, c, "out"):
                        mask[(n, co, *pos)] = True
        else:  # output cell l reads image cell l*s - pb + tap*d: find the l that read this one
            for l in grid_cells(case):
                if any(image_pos(case, l, tap) == cell for tap in taps(case)):
                    for co in group_channels(case, c, "out"):
                        mask[(n, co, *l)] = True
    return mask


def mask_from_weight(case, poisoned, out_shape):
    """Output cells a poisoned weight entry ``(a, b, *tap)`` contributes to (every sample)."""
    mask = np.zeros(out_shape, dtype=bool)
    for a, b, *tap in poisoned:
        tap = tuple(tap)
        if case.transposed:  # weight (C_in, C_out/g, *k): out channel = group(a) * C_out/g + b
            co = (a // (case.c_in // case.groups)) * (case.c_out // case.groups) + b
            for cell in grid_cells(case):
                pos = image_pos(case, cell, tap)
                if inside(pos, case.out_size):
                    mask[(slice(None), co, *pos)] = True
        else:  # weight (C_out, C_in/g, *k): output cell l uses it when its tap lands inside x
            for l in grid_cells(case):
                if inside(image_pos(case, l, tap), case.in_size):
                    mask[(slice(None), a, *l)] = True
    return mask


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
@settings(**SETTINGS)
@given(data=st.data())
def test_nan_in_x_reaches_exactly_its_scatter_cells(backend_name, cases, data):
    case = draw_case(data, cases)
    rng = np.random.default_rng(case.seed)
    x, w = nonzero(rng, case.x_shape, case.dtype), nonzero(rng, case.weight_shape, case.dtype)
    b = nonzero(rng, (case.c_out,), case.dtype) if case.bias else None
    xb = x.reshape(batched_shape(case, x.shape))
    poisoned = {pick_cell(rng, xb.shape) for _ in range(data.draw(st.integers(1, 3), label="cells"))}
    for cell in poisoned:
        xb[cell] = np.nan
    out = run(case, x, w, b, backend_name)
    expected = mask_from_x(case, poisoned, out.shape)
    assert np.array_equal(np.isnan(out), expected), (
        f"NaN cells {np.argwhere(np.isnan(out) != expected)[:5].tolist()} differ from the definition "
        f"(x poisoned at {sorted(poisoned)})"
    )
    assert np.all(np.isfinite(out[~expected]))


@settings(**SETTINGS)
@given(data=st.data())
def test_nan_in_weight_reaches_exactly_its_tap_cells(backend_name, cases, data):
    case = draw_case(data, cases)
    rng = np.random.default_rng(case.seed)
    x, w = nonzero(rng, case.x_shape, case.dtype), nonzero(rng, case.weight_shape, case.dtype)
    poisoned = {pick_cell(rng, w.shape) for _ in range(data.draw(st.integers(1, 2), label="entries"))}
    for entry in poisoned:
        w[entry] = np.nan
    out = run(case, x, w, None, backend_name)
    expected = mask_from_weight(case, poisoned, out.shape)
    assert np.array_equal(np.isnan(out), expected), (
        f"NaN cells {np.argwhere(np.isnan(out) != expected)[:5].tolist()} differ from the definition "
        f"(weight poisoned at {sorted(poisoned)})"
    )


@settings(**SETTINGS)
@given(data=st.data())
def test_inf_in_x_gives_signed_inf_exactly_where_it_lands(backend_name, cases, data):
    case = draw_case(data, cases, transposed=True)
    rng = np.random.default_rng(case.seed)
    x, w = nonzero(rng, case.x_shape, case.dtype), nonzero(rng, case.weight_shape, case.dtype)
    xb = x.reshape(batched_shape(case, x.shape))
    cell = pick_cell(rng, xb.shape)
    sign = data.draw(st.sampled_from([1.0, -1.0]), label="sign")
    xb[cell] = sign * np.inf
    out = run(case, x, w, None, backend_name)
    # one Inf input cell meets each output cell through at most one tap: the sign is sign * sign(w)
    expected = np.zeros(out.shape)
    n, c, *grid = cell
    for tap in taps(case):
        pos = image_pos(case, tuple(grid), tap)
        if inside(pos, case.out_size):
            for co in group_channels(case, c, "out"):
                expected[(n, co, *pos)] = sign * np.sign(w[(c, co % (case.c_out // case.groups), *tap)])
    assert not np.any(np.isnan(out)), "an Inf alone must not make NaN"
    assert np.array_equal(np.sign(out) * np.isinf(out), expected)


def test_nan_in_bias_fills_exactly_its_channel(backend_name):
    import tconv

    rng = np.random.default_rng(0)
    for ndim in (1, 2, 3):
        x = nonzero(rng, (2, 4, *(3,) * ndim), np.float64)
        w = nonzero(rng, (4, 3, *(2,) * ndim), np.float64)
        b = nonzero(rng, (6,), np.float64)
        b[4] = np.nan
        out = getattr(tconv, f"conv_transpose{ndim}d")(x, w, b, stride=2, padding=1, groups=2, backend=backend_name)
        expected = np.zeros(out.shape, dtype=bool)
        expected[:, 4] = True
        assert np.array_equal(np.isnan(out), expected)


@settings(**SETTINGS)
@given(data=st.data())
def test_nan_in_grad_output_reaches_exactly_the_gradients_that_read_it(backend_name, cases, data):
    case = draw_case(data, cases, transposed=True)
    rng = np.random.default_rng(case.seed)
    x, w = nonzero(rng, case.x_shape, case.dtype), nonzero(rng, case.weight_shape, case.dtype)
    dy = nonzero(rng, case.out_shape, case.dtype)
    dyb = dy.reshape(batched_shape(case, dy.shape))
    n, co, *pos = cell = pick_cell(rng, dyb.shape)
    dyb[cell] = np.nan
    gx, gw, gb = case.backward_function(dy, x, w, **case.kwargs(), backend=backend_name)
    gx = gx.reshape(batched_shape(case, gx.shape))
    # grad_x[n, ci, l] reads dy[n, co, l*s - pb + tap*d] for the ci of co's group
    want_x = np.zeros(gx.shape, dtype=bool)
    want_w = np.zeros(gw.shape, dtype=bool)
    cog = case.c_out // case.groups
    for l in grid_cells(case):
        for tap in taps(case):
            if image_pos(case, l, tap) == tuple(pos):
                for ci in group_channels(case, co, "in"):
                    want_x[(n, ci, *l)] = True
                    want_w[(ci, co % cog, *tap)] = True
    assert np.array_equal(np.isnan(gx), want_x), "grad_x NaN cells differ from the definition"
    assert np.array_equal(np.isnan(gw), want_w), "grad_weight NaN cells differ from the definition"
    want_b = np.zeros(case.c_out, dtype=bool)
    want_b[co] = True
    assert np.array_equal(np.isnan(gb), want_b), "grad_bias NaN cells differ from the definition"


@settings(**SETTINGS)
@given(data=st.data())
def test_nan_in_the_grid_reaches_exactly_the_weight_gradients_that_read_it(backend_name, cases, data):
    """The weight gradient multiplies the strided side (``x`` of a transposed
    convolution, ``grad_output`` of a regular one) with the image at the taps
    that land in it. A NaN at a border cell, some of whose taps leave the
    image, must not reach those taps' entries (backends check the result
    for this: ``tconv.backend.weight_grad_needs_exact``)."""
    case = draw_case(data, cases)
    rng = np.random.default_rng(case.seed)
    x, w = nonzero(rng, case.x_shape, case.dtype), nonzero(rng, case.weight_shape, case.dtype)
    dy = nonzero(rng, case.out_shape, case.dtype)
    grid = x if case.transposed else dy
    grid_b = grid.reshape(batched_shape(case, grid.shape))
    # a corner, an edge or anywhere, along each spatial dim
    n, c = pick_cell(rng, grid_b.shape[:2])
    cell = tuple(int(rng.choice([0, size - 1, rng.integers(0, size)])) for size in grid_b.shape[2:])
    grid_b[(n, c, *cell)] = np.nan
    gw = case.backward_function(dy, x, w, **case.kwargs(), backend=backend_name)[1]
    image_size = case.out_size if case.transposed else case.in_size
    # weight (C_in, C_out/g, *k) of a transposed conv: c is an input channel; (C_out, C_in/g, *k)
    # of a regular one: c is an output channel. Either way its row of the weight gradient.
    want = np.zeros(gw.shape, dtype=bool)
    for tap in taps(case):
        if inside(image_pos(case, cell, tap), image_size):
            want[(c, slice(None), *tap)] = True
    assert np.array_equal(np.isnan(gw), want), (
        f"grad_weight NaN entries {np.argwhere(np.isnan(gw) != want)[:5].tolist()} differ from the "
        f"definition (grid cell {cell} of channel {c} poisoned)"
    )


@settings(max_examples=300, deadline=None, database=None)
@given(grid=st.integers(1, 9), kernel=st.integers(1, 6), stride=st.integers(1, 4), dilation=st.integers(1, 3),
       pad=st.integers(-3, 8), extra=st.integers(-4, 4))
def test_taps_leave_image_exactly_when_some_cell_and_tap_land_outside(grid, kernel, stride, dilation, pad, extra):
    """``taps_leave_image`` against every (cell, tap) pair of one dim."""
    from tconv.backend import Geometry, taps_leave_image

    image = max(1, (grid - 1) * stride - pad + (kernel - 1) * dilation + 1 + extra)
    inside_all = [all(0 <= cell * stride - pad + tap * dilation < image for tap in range(kernel))
                  for cell in range(grid)]
    geom = Geometry(image=(1, 1, image), grid=(1, 1, grid), kernel=(1, 1, kernel), stride=(1, 1, stride),
                    dilation=(1, 1, dilation), pad_begin=(0, 0, pad), groups=1)
    assert taps_leave_image(geom) == (not all(inside_all))

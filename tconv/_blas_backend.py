"""The ``blas`` backend: the compiled core (Cython im2col/col2im + GEMMs: the core's
unpacked AVX-512 kernel for most float32 products, BLAS for the rest).

This module plans; ``_blas_core`` computes. The plan splits a call into
tiles whose work buffers fit ``WORKSPACE_BYTES`` whatever the batch size:
small images are folded (several samples per GEMM, so the GEMM stays wide),
large ones are cut into column ranges. Tiles of whole samples move col2im's
and im2col's strided runs through a phase-major copy of one channel
(``PHASED_MAX_BYTES``). The kernels take the buffers from a
cache per thread, so concurrent calls from several threads share no state
and a layer called in a loop allocates nothing after its first call.

A transposed convolution takes one of four routes (``scatter_route``):
GEMM + col2im in general; one GEMM straight into the output for a one-cell
grid; at stride 1 with deep reductions, a regular convolution (im2col +
GEMM) with the flipped kernel; for kernels wider than the grid (or 8 wide,
unless a whole sample's columns are small enough for the phase-major
col2im), GEMM + col2im of whole kernel rows ("patches").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from . import _blas_library, _threads
from ._numpy_backend import NumpyBackend
from .backend import Backend, Geometry, taps_leave_image, weight_grad_needs_exact
from .registry import get_num_threads

try:
    from . import _blas_core
except ImportError as exc:  # an uninstalled source tree, or a failed build
    _blas_core = None
    _IMPORT_ERROR = f"the compiled core is not built ({exc}); run `pip install .`"
else:
    _IMPORT_ERROR = ""
    _blas_library.choose(_blas_core)  # (before threadpoolctl's scan: see _threads.controller)

#: Upper bound of the work buffers one call allocates (column buffer plus
#: packed operand). SPEC's bound is 64 MiB; this leaves headroom.
WORKSPACE_BYTES = int(os.environ.get("TCONV_WORKSPACE_MB", "32")) * 2**20

#: The column buffer aims at this size: small enough to be read back from
#: L2 cache by col2im right after the GEMM wrote it (and by BLAS's packing
#: right after im2col wrote it), unless that would make the GEMM narrower
#: than MIN_GEMM_COLUMNS. 1 MiB beat 4 MiB by 10-25% on small-image layers
#: (autoencoder, DCGAN 64->3; 2 MiB of L2 per core) and tied on large ones.
CACHE_TILE_BYTES = 1 * 2**20
MIN_GEMM_COLUMNS = 256
#: ... and where samples smaller than that are folded, at least this many: BLAS
#: packs the weight operand again for every tile, which a deep layer's narrow
#: tiles pay too often (DCGAN 256->128, 8x8 grids, 2048-deep reductions, at 1
#: thread, interleaved A/B: backward 97.3 -> 87.0, 101.2 -> 91.4 and 93.7 -> 85.3
#: ms as 8 samples a tile instead of 4; forward 48.3 -> 43.6 and 54.2 -> 48.0,
#: once 45.4 -> 49.7; DCGAN 512->256 within noise). Samples that fill
#: MIN_GEMM_COLUMNS alone are not folded to reach it (DCGAN 128->64's forward
#: lost 10-15% as pairs of 16x16 grids), nor are unfolded tiles widened (FCN-8s's
#: backward lost 11%).
MIN_FOLDED_GEMM_COLUMNS = 512

#: Where the taps cover the image exactly (``covers_exactly``: col2im writes each
#: column once, nothing accumulates, so the columns need not stay in L2) the
#: column tiles aim at this size instead: fewer, wider GEMMs, each packing the
#: weight once. U-Net's k2 s2 at 1 thread, interleaved medians of 9-11: batch 1
#: 512->256 (4 tiles -> the whole sample) 13.1 -> 12.3 and 12.3 -> 11.6 ms;
#: batch 8 128->64 30.7 -> 30.2; 8 MiB no better.
COVER_TILE_BYTES = 4 * 2**20

#: Samples of at least this many grid cells are never folded together: one
#: alone makes a wide enough GEMM, and folding costs a copy of the tile's
#: input (DCGAN 64->3, 32x32 grids: forward 7.5 -> 6.9 ms, backward 15.6 -> 12.7).
FOLD_MAX_CELLS = 512

#: A stride-1 transposed convolution runs as a regular one with the flipped
#: kernel when each output sums at least this many products (C_in/groups *
#: taps): the GEMM then reduces over C_in*K instead of C_in and writes the
#: output directly, which beats col2im once channels are many.
FLIPPED_GATHER_MIN_DEPTH = 1024

#: A stride-1 transposed convolution runs without col2im ("shifted": each tap a
#: product of the unpacked float32 kernel added into the output, reading the
#: grid rows it lands on in place or from a shifted copy) when a group has
#: SHIFTED_MIN_CHANNELS to SHIFTED_MAX_CHANNELS output channels, at most
#: SHIFTED_MAX_DEPTH input channels, and the image at least SHIFTED_MIN_CELLS
#: cells a sample. Against the other routes (col2im, or the flipped gather
#: past FLIPPED_GATHER_MIN_DEPTH), 1 thread, k3 p1, interleaved medians of 7:
#: 64->64 56x56 2.90 -> 2.27 ms, 128->64 28x28 1.91 -> 1.24, 128->128 56x56
#: 11.4 -> 9.0, 256->256 28x28 x1.05, 384->128 x1.19, 4->64 and 8->64 x2.4-3.1,
#: 64->16 x1.15, 32->32 14x14 batch 16 x1.21, 64->64 12x12 batch 4 x1.07;
#: lost: 512->512 and 1024->512 (the reduction's panel of the grid leaves L1)
#: x0.58-0.81, 128->512 and 256->512 x0.88-0.92, 64->8 x0.95, 64->3 x0.42,
#: 3->64 x0.93, 64->64 8x8 batch 32 x0.57.
SHIFTED_MIN_CHANNELS = 16
SHIFTED_MAX_CHANNELS = 256
SHIFTED_MAX_DEPTH = 384
SHIFTED_MIN_CELLS = 144
#: ... in bands of image rows whose output and shifted copies take about this
#: many bytes. Larger is faster, unlike the column tiles above: 64->64 56x56
#: in bands of 9, 18 and 56 rows (0.5, 1 and 4 MiB) 2.66, 2.30 and 2.30 ms.
SHIFTED_BAND_BYTES = 2 * 2**20

#: Folded scatter tiles of at least this many samples use the sample-minor
#: ("interleaved") column order: col2im then adds runs of that many
#: contiguous values instead of walking grid rows a few cells long.
INTERLEAVE_MIN_SAMPLES = 8

#: Kernels at least this wide (or wider than the grid) take the "patches"
#: route: col2im then adds whole kernel rows, contiguous runs long enough to
#: vectorise, instead of one strided run per grid row and tap (FCN's k16 s8
#: and k64 s32 upsampling run about twice as fast).
PATCH_MIN_KERNEL_WIDTH = 8

#: ... unless one sample's column buffer fits this: then the tile is the whole
#: sample and col2im goes through the phase-major accumulator, where every
#: tap adds a run as long as the grid (``PHASED_MAX_BYTES`` bounds that
#: buffer). FSRCNN's k9 s3 (81 rows x 4096 cells, 1.3 MiB) at 1 thread,
#: interleaved medians of 9: 0.94 -> 0.67 and 0.91 -> 0.82 ms; FCN-8s (16.9 MiB
#: a sample) is twice as slow as plain col2im as it is through patches.
WIDE_KERNEL_TILE_BYTES = 4 * 2**20

#: Tiles of whole samples (sample-major) run col2im through each channel's
#: image stored phase-major (``_blas_core.col2im_phased``), and at strides
#: past 1 im2col too (``im2col_phased``), when that channel buffer is at most
#: this big (it should stay in L1/L2 while the taps go through it).
#: Interleaved A/B at 1 thread (medians of 7): DCGAN b64 forward 256->128
#: 54.8 -> 40.6 ms, 128->64 51.6 -> 42.9, 64->3 7.0 -> 5.7, stride 1 even;
#: backward 2-6% faster.
PHASED_MAX_BYTES = 256 * 2**10

#: The weight gradient ``gw (Q, P*K) = dY cols^T`` is summed transposed, as
#: ``gw^T`` in a work buffer of at most GW_TRANSPOSED_MAX_BYTES, where Q <= P*K:
#: OpenBLAS runs the product faster with the short side first (sgemm alone,
#: interleaved medians: Q=32 P*K=144 (autoencoder) x1.30, DCGAN 128->64 x1.18,
#: FCN-8s x1.26; Q=64 P*K=48 (DCGAN 64->3) x0.95, hence the condition). The
#: final transpose must be paid back by a long reduction (N * grid cells):
#: backward at 1 thread, autoencoder 3.12 -> 2.64 ms, DCGAN 128->64 108 -> 97,
#: but DCGAN 100->512 (64 columns) 3.4 -> 4.1. DCGAN 256->128's 2 MiB buffer
#: gained at 1 thread (81 -> 78) and lost at 2 (53 -> 56), hence the 1 MiB.
GW_TRANSPOSED_MAX_BYTES = 1 * 2**20
GW_TRANSPOSED_MIN_COLUMNS = 1024
#: Where the core's unpacked kernel takes the product (float32, Q at least
#: ``_blas_core.KERNEL_MIN_COLUMNS``), it is summed transposed, as ``cols @ dY^T``
#: (the kernel's form: B's rows contiguous), in a buffer of up to
#: GW_KERNEL_MAX_BYTES: GEMMs alone, 1 thread, M 2048 N 256 K 512 101 -> 112
#: GFLOP/s (OpenBLAS's ``dY cols^T`` -> the kernel's); whole backward passes,
#: interleaved A/B, DCGAN 256->128 87.5 -> 82.2 ms, 128->64 94.4 -> 85.7. With
#: 512->256's 8 MiB buffer (and its final transpose) that backward lost, 82.3 ->
#: 85.8 ms at 1 thread and 44.1 -> 46.2 at 2, hence 4 MiB.
GW_KERNEL_MAX_BYTES = 4 * 2**20

#: A regular convolution's sample-minor tiles skip the products of taps that
#: fall on padding (``_blas_core.Bands``: the column buffer kernel-row-major,
#: one GEMM per band of grid rows over the kernel rows they meet) where every
#: band is at least this many columns wide; thinner GEMMs lose more than the
#: skipped products save. DCGAN 256->128's backward (bands of 64, 384 and 64
#: columns; 12% of the products are padding's): each GEMM of a tile 3% faster
#: (the tile's GEMMs timed alone, 1 thread); whole backward passes, interleaved
#: A/B at 1 thread: 512->256 88.3 -> 84.5 ms, 256->128 91.8 -> 89.8, the
#: autoencoder's even. (The same cut on the transposed convolution's col2im
#: GEMMs lost: 512->256 forward 46.6 -> 48.5 ms, each band packing the weight.)
BORDER_BAND_MIN_COLUMNS = 64

_BLAS_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class TilePlan:
    """How one call is cut: ``n_tiles`` tiles of ``cols_per_tile`` GEMM columns."""

    samples_per_tile: int
    cols_per_tile: int
    n_tiles: int
    row_block: int  # scatter: output channels per GEMM (all of them unless the kernel is huge)
    interleaved: bool = False  # scatter: folded columns ordered sample-minor (see _blas_core)
    phased: bool = False  # whole samples: col2im / im2col through phase-major channels
    skips_border_taps: bool = False  # im2col, sample-minor: no products of padding (BORDER_BAND_MIN_COLUMNS)

    def describe(self) -> str:
        if self.samples_per_tile > 1:
            how = f"{self.samples_per_tile} samples folded per GEMM"
            if self.interleaved:
                how += ", sample-minor"
        else:
            how = f"{self.cols_per_tile} columns per GEMM"
        if self.phased:
            how += ", phase-major channels"
        if self.skips_border_taps:
            how += ", border taps skipped"
        return f"{how}, {self.n_tiles} tiles"


def plan_tiles(n: int, grid_cells: int, rows_per_col: int, packed_rows_per_col: int,
               itemsize: int, row_unit: int = 0, row_units: int = 0, cache_bytes: int | None = None) -> TilePlan:
    """Choose tile sizes so that the work buffers stay within ``WORKSPACE_BYTES``.

    ``rows_per_col`` elements of column buffer and ``packed_rows_per_col``
    elements of packed operand are needed per GEMM column (the latter only
    when samples are folded), aiming at ``cache_bytes`` (``CACHE_TILE_BYTES``)
    a tile. For scatter, ``row_units`` output channels of ``row_unit`` rows
    each may be split into blocks when even a narrow tile would not fit.
    """
    cache_bytes = CACHE_TILE_BYTES if cache_bytes is None else cache_bytes
    budget = WORKSPACE_BYTES // itemsize
    foldable = n > 1 and grid_cells < FOLD_MAX_CELLS
    folds_anyway = foldable and grid_cells < MIN_GEMM_COLUMNS
    min_cols = min(grid_cells * n, MIN_FOLDED_GEMM_COLUMNS if folds_anyway else MIN_GEMM_COLUMNS)
    row_block = row_units
    if row_unit and rows_per_col * min_cols > budget:
        row_block = max(1, budget // min_cols // row_unit)
        rows_per_col = row_block * row_unit
    per_col = max(1, rows_per_col + (packed_rows_per_col if foldable else 0))
    wanted = max(min_cols, cache_bytes // itemsize // per_col)
    cols = max(1, min(wanted, budget // per_col))
    if foldable and grid_cells < cols:  # fold whole samples into one GEMM
        samples = min(n, cols // grid_cells)
        return TilePlan(samples, samples * grid_cells, -(-n // samples), row_block)
    cols = min(grid_cells, cols)
    return TilePlan(1, cols, n * -(-grid_cells // cols), row_block)


def _check_blas_ints(*sizes: int) -> None:
    if max(sizes) > _BLAS_INT_MAX:
        raise ValueError(
            f"blas backend: a GEMM dimension of {max(sizes)} exceeds BLAS's 32-bit limit; "
            f"use the numpy backend for problems this large"
        )


@functools.lru_cache(maxsize=512)
def _spatial(geom: Geometry) -> tuple:
    return (geom.image, geom.grid, geom.kernel, geom.stride, geom.dilation, geom.pad_begin)


@functools.lru_cache(maxsize=512)
def scatter_route(geom: Geometry, depth: int, q: int, itemsize: int) -> str:
    """How a transposed convolution runs: ``"single-cell"`` (one GEMM, no col2im),
    ``"shifted"`` (stride 1, each tap's product added into the output),
    ``"flipped-gather"`` (stride 1, as a regular convolution), ``"patches"``
    (col2im of whole kernel rows: kernels wider than the grid, or wide ones
    whose sample is too large for ``wide_kernel_phased``) or ``"col2im"``.

    ``depth`` is C_in / groups, the GEMM's reduction without the kernel; ``q``
    the output channels per group.
    """
    if (geom.grid == (1, 1, 1) and geom.pad_begin == (0, 0, 0) and geom.image == geom.kernel
            and geom.dilation == (1, 1, 1)):
        return "single-cell"
    if (geom.stride == (1, 1, 1) and itemsize == 4 and _blas_core is not None
            and _blas_core.small_gemm_available() and SHIFTED_MIN_CHANNELS <= q <= SHIFTED_MAX_CHANNELS
            and depth <= SHIFTED_MAX_DEPTH and math.prod(geom.image) >= SHIFTED_MIN_CELLS
            and shifted_workspace_bytes(geom, depth, q, itemsize, 1) <= WORKSPACE_BYTES):
        return "shifted"
    if geom.stride == (1, 1, 1) and depth * math.prod(geom.kernel) >= FLIPPED_GATHER_MIN_DEPTH:
        return "flipped-gather"
    return _col2im_route(geom, q, itemsize)


def _col2im_route(geom: Geometry, q: int, itemsize: int) -> str:
    """``"patches"`` or ``"col2im"``: the routes that take any geometry and weight."""
    if geom.kernel[2] > geom.grid[2]:
        return "patches"
    if geom.kernel[2] >= PATCH_MIN_KERNEL_WIDTH and not wide_kernel_phased(geom, q, itemsize):
        return "patches"
    return "col2im"


def shifted_workspace_bytes(geom: Geometry, p: int, q: int, itemsize: int, rows: int) -> int:
    """The ``"shifted"`` route's work buffers in bands of ``rows`` image rows: the
    weight as one block per tap, and the band's grid rows copied once per kw
    (``_blas_core.scatter_shifted``)."""
    band_rows = rows + (geom.kernel[1] - 1) * geom.dilation[1]
    return (geom.groups * math.prod(geom.kernel) * q * p + geom.kernel[2] * p * band_rows * geom.image[2]) * itemsize


@functools.lru_cache(maxsize=512)
def shifted_band_rows(geom: Geometry, p: int, q: int, itemsize: int) -> int:
    """Image rows per band of the ``"shifted"`` route (``SHIFTED_BAND_BYTES``)."""
    row_bytes = (q + geom.kernel[2] * p) * geom.image[2] * itemsize  # output + copies, per image row
    rows = max(1, min(geom.image[1], SHIFTED_BAND_BYTES // row_bytes))
    while rows > 1 and shifted_workspace_bytes(geom, p, q, itemsize, rows) > WORKSPACE_BYTES:
        rows //= 2
    return rows


def wide_kernel_phased(geom: Geometry, q: int, itemsize: int) -> bool:
    """Whether a kernel ``PATCH_MIN_KERNEL_WIDTH`` or more wide runs col2im over whole
    samples through the phase-major accumulator (``WIDE_KERNEL_TILE_BYTES``)."""
    return (geom.kernel[2] >= PATCH_MIN_KERNEL_WIDTH and not covers_exactly(geom)
            and q * math.prod(geom.kernel) * math.prod(geom.grid) * itemsize <= WIDE_KERNEL_TILE_BYTES
            and phased_acc_bytes(geom, itemsize) <= PHASED_MAX_BYTES)


@functools.lru_cache(maxsize=512)
def covers_exactly(geom: Geometry) -> bool:
    """Whether every image cell receives exactly one (grid cell, tap) product: taps
    side by side with no gap or overlap (stride = kernel, undilated) and the
    image inside the grid's full extent, so col2im can write instead of add."""
    return all(
        s == k and (k == 1 or d == 1) and 0 <= p and i <= g * s - p
        for i, g, k, s, d, p in zip(geom.image, geom.grid, geom.kernel, geom.stride, geom.dilation, geom.pad_begin)
    )


@functools.lru_cache(maxsize=512)
def patch_plan(geom: Geometry, q: int, itemsize: int) -> tuple[int, int]:
    """(grid cells, output channels) per GEMM of the ``"patches"`` route.

    All grid cells at once where a channel's patches fit the cache tile, so
    that each block of channels reads its share of the (large) weight once;
    else as many cells as fit, one channel at a time.
    """
    patch_bytes = math.prod(geom.kernel) * itemsize  # one channel, one cell
    cells = math.prod(geom.grid)
    if patch_bytes * cells <= CACHE_TILE_BYTES:
        return cells, max(1, min(q, CACHE_TILE_BYTES // (patch_bytes * cells)))
    return max(1, CACHE_TILE_BYTES // patch_bytes), 1


# The plans (and the routes above) depend on sizes only: cached, so a layer
# called in a loop plans once (caching the routes saved ~1 us of the seed call's ~9).
@functools.lru_cache(maxsize=512)
def scatter_plan(geom: Geometry, n: int, p: int, q: int, itemsize: int) -> TilePlan:
    """Tiles of ``cols (q*K, T) = W^T X``: K rows per output channel, P packed rows."""
    taps, grid_cells = math.prod(geom.kernel), math.prod(geom.grid)
    _check_blas_ints(grid_cells, q * taps, p)
    if wide_kernel_phased(geom, q, itemsize):  # whole samples, sample-major: phase-major col2im
        plan = plan_tiles(n, grid_cells, q * taps, p, itemsize, row_unit=taps, row_units=q,
                          cache_bytes=WIDE_KERNEL_TILE_BYTES)
        return _phased(plan, geom, itemsize)
    cover = COVER_TILE_BYTES if covers_exactly(geom) else None
    plan = plan_tiles(n, grid_cells, q * taps, p, itemsize, row_unit=taps, row_units=q, cache_bytes=cover)
    # sample-minor: an accumulator of q image-sized channels per sample
    plan = _sample_minor(plan, lambda extra: plan_tiles(
        n, grid_cells, q * taps, p + extra, itemsize, row_unit=taps, row_units=q, cache_bytes=cover), q, geom)
    return _phased(plan, geom, itemsize) if not covers_exactly(geom) else plan


def _phased(plan: TilePlan, geom: Geometry, itemsize: int, min_stride: int = 1) -> TilePlan:
    """``plan`` with ``phased`` set where its tiles hold whole samples in sample-major
    order, the stride along the last dim is at least ``min_stride`` and one channel's
    phase-major image fits ``PHASED_MAX_BYTES``."""
    whole_samples = plan.samples_per_tile > 1 or plan.cols_per_tile >= math.prod(geom.grid)
    if (whole_samples and not plan.interleaved and geom.stride[2] >= min_stride
            and phased_acc_bytes(geom, itemsize) <= PHASED_MAX_BYTES):
        return dataclasses.replace(plan, phased=True)
    return plan


def phased_acc_bytes(geom: Geometry, itemsize: int) -> int:
    """Bytes of the phased kernels' channel buffer: one channel's image, rows padded
    to a whole number of stride phases (``_blas_core.phased_acc_size`` elements)."""
    depth, height, width = geom.image
    return depth * height * geom.stride[2] * -(-width // geom.stride[2]) * itemsize


def _sample_minor(plan: TilePlan, replan, channels: int, geom: Geometry) -> TilePlan:
    """``plan``, switched to sample-minor columns when it folds enough samples.

    Sample-minor tiles also hold ``channels`` image-sized channels per sample
    (scatter's accumulator, or the packed image im2col reads): ``replan(extra)``
    plans again with ``extra`` more elements per GEMM column.
    """
    if plan.samples_per_tile < INTERLEAVE_MIN_SAMPLES:
        return plan
    grid_cells = math.prod(geom.grid)
    plan = replan(channels * -(-math.prod(geom.image) // grid_cells))
    if plan.samples_per_tile < INTERLEAVE_MIN_SAMPLES:
        return plan
    return dataclasses.replace(plan, interleaved=True)


@functools.lru_cache(maxsize=512)
def gather_plan(geom: Geometry, n: int, p: int, q: int, itemsize: int) -> tuple[TilePlan, bool]:
    """Tiles of ``out (Q, T) = W cols``, and whether im2col is the identity (1x1 conv)."""
    taps, grid_cells = math.prod(geom.kernel), math.prod(geom.grid)
    identity = (geom.kernel == (1, 1, 1) and geom.stride == (1, 1, 1)
                and geom.pad_begin == (0, 0, 0) and geom.image == geom.grid)
    _check_blas_ints(grid_cells, p * taps, q)
    plan = plan_tiles(n, grid_cells, 0 if identity else p * taps, q + (p if identity else 0), itemsize)
    if not identity:  # (a 1x1 convolution has no im2col to speed up)
        plan = _sample_minor(plan, lambda extra: plan_tiles(n, grid_cells, p * taps, q + extra, itemsize),
                             p, geom)
        plan = _phased(plan, geom, itemsize, min_stride=2)  # (at stride 1 im2col copies runs already)
        plan = _skipping_border_taps(plan, geom, p, q, itemsize)
    return plan, identity


@functools.lru_cache(maxsize=512)
def weight_grad_plan(geom: Geometry, n: int, p: int, q: int, itemsize: int) -> TilePlan:
    """Tiles of ``gw (Q, P*K) += dY cols^T``."""
    taps, grid_cells = math.prod(geom.kernel), math.prod(geom.grid)
    _check_blas_ints(grid_cells, p * taps, q)
    plan = plan_tiles(n, grid_cells, p * taps, q, itemsize)
    plan = _sample_minor(plan, lambda extra: plan_tiles(n, grid_cells, p * taps, q + extra, itemsize), p, geom)
    return _skipping_border_taps(_phased(plan, geom, itemsize, min_stride=2), geom, p, q, itemsize)


def pair_workspace_bytes(plan: TilePlan, geom: Geometry, p: int, q: int, itemsize: int) -> int:
    """Work buffers of ``_blas_core.gather_and_weight_grad`` on ``plan`` (the
    separate calls take a little less)."""
    taps = math.prod(geom.kernel)
    image_tile = p * math.prod(geom.image) * plan.samples_per_tile if plan.interleaved else 0
    packed = 2 * q * plan.cols_per_tile + image_tile if plan.samples_per_tile > 1 else 0
    copies = (geom.groups * q + 1) * p * taps if plan.skips_border_taps else 0  # (the weight's, a row buffer)
    return (p * taps * plan.cols_per_tile + packed + copies) * itemsize


def _skipping_border_taps(plan: TilePlan, geom: Geometry, p: int, q: int, itemsize: int) -> TilePlan:
    """``plan``, its sample-minor tiles skipping padding's products where every band
    is ``BORDER_BAND_MIN_COLUMNS`` wide and the copies fit the workspace bound."""
    if not plan.interleaved or _blas_core is None:
        return plan
    bands = _blas_core.border_bands(*_spatial(geom))
    rows = [end - start for (end, _, _), start in zip(bands, [0] + [b[0] for b in bands])]
    if not bands or min(rows) * geom.grid[2] * plan.samples_per_tile < BORDER_BAND_MIN_COLUMNS:
        return plan
    skipping = dataclasses.replace(plan, skips_border_taps=True)
    return skipping if pair_workspace_bytes(skipping, geom, p, q, itemsize) <= WORKSPACE_BYTES else plan


def gather_streams(geom: Geometry, n: int, p: int, q: int, itemsize: int) -> bool:
    """Whether a regular convolution is a 1x1 product the core runs as a memory stream
    through its unpacked kernel (``_blas_core.streams_unpacked``: few channels over a
    large image), where a second thread has little to add."""
    if _blas_core is None or itemsize != 4:
        return False
    plan, identity = gather_plan(geom, n, p, q, itemsize)
    return identity and _blas_core.streams_unpacked(q, plan.cols_per_tile, p)


def weight_grad_transposed(geom: Geometry, n: int, p: int, q: int, itemsize: int) -> bool:
    """Whether ``gw (Q, P*K) = dY cols^T``, summed over N * grid cells, is summed as
    its transpose: in the unpacked kernel's form where that takes the tiles' product
    (``GW_KERNEL_MAX_BYTES``), else by BLAS (``GW_TRANSPOSED_MAX_BYTES``)."""
    p_taps, columns = p * math.prod(geom.kernel), n * math.prod(geom.grid)
    size = geom.groups * q * p_taps * itemsize
    if columns < GW_TRANSPOSED_MIN_COLUMNS:
        return False
    tile_columns = weight_grad_plan(geom, n, p, q, itemsize).cols_per_tile  # (the GEMMs' reduction)
    if itemsize == 4 and _blas_core is not None and _blas_core.unpacked_gemm(p_taps, q, tile_columns):
        return size <= GW_KERNEL_MAX_BYTES
    return q <= p_taps and size <= GW_TRANSPOSED_MAX_BYTES


@functools.lru_cache(maxsize=512)
def _scatter_call(geom: Geometry, n: int, c_in: int, q: int, dtype: np.dtype):
    """The compiled call (``_blas_core.ScatterCall``) of a transposed convolution,
    planned once per shape (the route, its plan and the BLAS size checks): a
    layer called in a loop goes straight to its kernel. None for the
    ``"flipped-gather"`` route (a ``gather``)."""
    route = scatter_route(geom, c_in // geom.groups, q, dtype.itemsize)
    if route == "flipped-gather":
        return None
    return _route_call(route, geom, n, c_in, q, dtype)


def _route_call(route: str, geom: Geometry, n: int, c_in: int, q: int, dtype: np.dtype):
    shape = (dtype, n, c_in, q, *_spatial(geom), geom.groups)
    if route == "shifted":
        fallback = _route_call(_col2im_route(geom, q, dtype.itemsize), geom, n, c_in, q, dtype)
        rows = shifted_band_rows(geom, c_in // geom.groups, q, dtype.itemsize)
        return _blas_core.ScatterCall(route, *shape, (rows,), fallback=fallback)
    if route == "single-cell":
        _check_blas_ints(q * math.prod(geom.kernel) * geom.groups, c_in)
        return _blas_core.ScatterCall(route, *shape)
    if route == "patches":
        cells, q_block = patch_plan(geom, q, dtype.itemsize)
        _check_blas_ints(q * math.prod(geom.kernel), c_in, math.prod(geom.grid))
        return _blas_core.ScatterCall(route, *shape, (cells, q_block))
    plan = scatter_plan(geom, n, c_in // geom.groups, q, dtype.itemsize)
    return _blas_core.ScatterCall(
        route, *shape, (plan.samples_per_tile, plan.cols_per_tile, plan.n_tiles, plan.row_block),
        plan.interleaved, covers_exactly(geom), plan.phased)


def clear_plan_caches() -> None:
    """Forget every cached route and plan (for code that changes the constants above)."""
    for cached in (_spatial, scatter_route, covers_exactly, patch_plan, scatter_plan, gather_plan,
                   weight_grad_plan, shifted_band_rows, _scatter_call):
        cached.cache_clear()


class BlasBackend(Backend):
    """The compiled core. ``blas_threads`` pins the BLAS thread count of its GEMMs
    (``None``: tconv's thread budget, ``get_num_threads()``); a backend that runs
    the core's kernels inside its own threads uses ``BlasBackend(blas_threads=1)``.
    """

    name = "blas"
    description = ("compiled core: Cython im2col/col2im + GEMMs (an AVX-512 kernel for most float32 "
                   "products; BLAS: scipy-openblas32, else SciPy's cython_blas)")
    default_priority = 10

    def __init__(self, blas_threads: int | None = None) -> None:
        self._blas_threads = blas_threads

    def _set_blas_threads(self) -> None:
        threads = self._blas_threads or get_num_threads()
        _threads.set_blas_threads(threads)
        _blas_core.set_gemm_threads(threads)  # (the core's kernel is for one thread)

    def availability(self) -> tuple[bool, str]:
        return (_blas_core is not None), _IMPORT_ERROR

    def release_workspace(self) -> None:
        if _blas_core is not None:
            _blas_core.release_workspace()
            _blas_core.release_results()

    def scatter(self, grid_in, weight, bias, geom):
        call = _scatter_call(geom, *grid_in.shape[:2], weight.shape[1], grid_in.dtype)
        if call is None:
            return self._scatter_as_flipped_gather(grid_in, weight, bias, geom)
        self._set_blas_threads()
        return call(grid_in, weight, bias)

    def scatter_channels_into(self, grid_in, weight, bias, geom, out, q_first: int, q_end: int) -> bool:
        """Output channels ``q_first .. q_end - 1`` of each group of a transposed convolution
        on the "patches" or "shifted" route, written into ``out`` (its full, C-contiguous
        output): a backend running the core on several threads gives each a range. False
        where the shifted route met a non-finite weight and wrote nothing (``scatter``
        then gives the result)."""
        call = _scatter_call(geom, *grid_in.shape[:2], weight.shape[1], grid_in.dtype)
        self._set_blas_threads()
        return call.channels_into(grid_in, weight, bias, out, q_first, q_end)

    def describe_plan(self, primitive: str, *args) -> str:
        """How ``primitive`` (``"scatter"``, ``"gather"``, ``"weight_grad"``) would run
        on these arguments: the route and the tiles (for the benchmark's JSON)."""
        geom = args[-1]
        first, second = args[0], args[1]
        n, c = first.shape[:2]
        itemsize = first.itemsize
        if primitive == "scatter":
            route = scatter_route(geom, c // geom.groups, second.shape[1], itemsize)
            if route == "patches":
                cells, q_block = patch_plan(geom, second.shape[1], itemsize)
                return f"patches: {cells} grid cells x {q_block} output channels per GEMM"
            if route == "shifted":
                rows = shifted_band_rows(geom, c // geom.groups, second.shape[1], itemsize)
                return f"shifted: each tap's product added into bands of {rows} image rows"
            if route != "col2im":
                return route
            plan = scatter_plan(geom, n, c // geom.groups, second.shape[1], itemsize)
        elif primitive in ("gather", "gather_and_weight_grad"):
            plan, identity = gather_plan(geom, n, c // geom.groups, second.shape[0] // geom.groups, itemsize)
            route = "gemm on the image (1x1)" if identity else "im2col"
            if primitive == "gather_and_weight_grad":
                route = "two calls, " + route if identity else "one im2col for both gradients"
        else:
            plan = weight_grad_plan(geom, n, c // geom.groups, second.shape[1] // geom.groups, itemsize)
            route = "im2col"
        if primitive in ("weight_grad", "gather_and_weight_grad") and weight_grad_transposed(
                geom, n, c // geom.groups, args[-2].shape[1] // geom.groups, itemsize):  # (args[-2]: the grid)
            return f"{route}: {plan.describe()}, weight gradient summed transposed"
        return f"{route}: {plan.describe()}"

    def _scatter_as_flipped_gather(self, grid_in, weight, bias, geom):
        """Stride 1: ``conv_transpose(x, W, pad) == conv(x, flip(W)^T, dilation*(k-1) - pad)``."""
        g = geom.groups
        p, q = weight.shape[0] // g, weight.shape[1]
        flipped = weight.reshape(g, p, q, *geom.kernel)[..., ::-1, ::-1, ::-1]
        flipped = np.ascontiguousarray(flipped.transpose(0, 2, 1, 3, 4, 5)).reshape(g * q, p, *geom.kernel)
        as_conv = Geometry(
            image=geom.grid, grid=geom.image, kernel=geom.kernel, stride=geom.stride,
            dilation=geom.dilation, groups=g,
            pad_begin=tuple(d * (k - 1) - pad for d, k, pad in zip(geom.dilation, geom.kernel, geom.pad_begin)),
        )
        return self.gather(grid_in, flipped, bias, as_conv)

    def gather(self, image_in, weight, bias, geom):
        if taps_leave_image(geom) and not np.isfinite(weight).all():
            return _EXACT.gather(image_in, weight, bias, geom)  # 0 * NaN: see taps_leave_image
        n, c_in = image_in.shape[:2]
        q = weight.shape[0] // geom.groups
        plan, identity = gather_plan(geom, n, c_in // geom.groups, q, image_in.itemsize)
        out = empty_result((n, weight.shape[0], *geom.grid), image_in.dtype)
        self._set_blas_threads()
        _blas_core.gather(
            image_in, weight, *_bias_arg(bias, image_in.dtype), out, *_spatial(geom), geom.groups,
            plan.samples_per_tile, plan.cols_per_tile, plan.n_tiles, identity, plan.interleaved, plan.phased,
            plan.skips_border_taps,
        )
        return out

    def weight_grad(self, image_in, grid_in, geom):
        n, c_img = image_in.shape[:2]
        p, q = c_img // geom.groups, grid_in.shape[1] // geom.groups
        plan = weight_grad_plan(geom, n, p, q, image_in.itemsize)
        out = empty_result((q * geom.groups, p, *geom.kernel), image_in.dtype)
        self._set_blas_threads()
        _blas_core.weight_grad(
            image_in, grid_in, out, *_spatial(geom), geom.groups,
            plan.samples_per_tile, plan.cols_per_tile, plan.n_tiles, plan.interleaved, plan.phased,
            weight_grad_transposed(geom, n, p, q, image_in.itemsize), plan.skips_border_taps,
        )
        if weight_grad_needs_exact(out, geom):  # 0 * NaN: see taps_leave_image
            return _EXACT.weight_grad(image_in, grid_in, geom)
        return out

    def gather_and_weight_grad(self, image_in, weight, grid_in, geom):
        """Both from one im2col per tile (``_blas_core.gather_and_weight_grad``): bitwise
        the two separate calls' results, one column buffer pass fewer."""
        grad_image = empty_result((image_in.shape[0], grid_in.shape[1], *geom.grid), image_in.dtype)
        grad_weight = empty_result(weight.shape, image_in.dtype)
        self.gather_and_weight_grad_into(image_in, weight, grid_in, geom, grad_image, grad_weight)
        return grad_image, grad_weight

    def gather_and_weight_grad_into(self, image_in, weight, grid_in, geom, grad_image, grad_weight) -> None:
        """``gather_and_weight_grad``, written into C-contiguous ``grad_image`` and
        ``grad_weight`` (a backend running the core on parts of a batch hands it
        slices of its outputs)."""
        n, c_img = image_in.shape[:2]
        p, q = c_img // geom.groups, grid_in.shape[1] // geom.groups
        itemsize = image_in.itemsize
        plan, identity = gather_plan(geom, n, p, q, itemsize)
        if (identity or pair_workspace_bytes(plan, geom, p, q, itemsize) > WORKSPACE_BYTES
                or (taps_leave_image(geom) and not np.isfinite(weight).all())):
            grad_image[...] = self.gather(image_in, weight, None, geom)
            grad_weight[...] = self.weight_grad(image_in, grid_in, geom)
            return
        self._set_blas_threads()
        _blas_core.gather_and_weight_grad(
            image_in, weight, grid_in, grad_image, grad_weight, *_spatial(geom), geom.groups,
            plan.samples_per_tile, plan.cols_per_tile, plan.n_tiles, plan.interleaved, plan.phased,
            weight_grad_transposed(geom, n, p, q, itemsize), plan.skips_border_taps,
        )
        if weight_grad_needs_exact(grad_weight, geom):  # 0 * NaN: see taps_leave_image
            grad_weight[...] = _EXACT.weight_grad(image_in, grid_in, geom)


#: Where zero-filled taps would meet a non-finite value, the numpy backend's
#: tap-by-tap computation (which skips such taps) gives the definition's result.
_EXACT = NumpyBackend()

_NO_BIAS = {np.dtype(np.float32): np.zeros(1, np.float32), np.dtype(np.float64): np.zeros(1, np.float64)}


def empty_result(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised result array, from the core's pool when large
    (``_blas_core.empty_result``: no page faults for it in a loop)."""
    return _blas_core.empty_result(shape, dtype)


def _bias_arg(bias, dtype):
    """(bias buffer, has_bias): the kernels take a buffer either way."""
    if bias is None:
        return _NO_BIAS[dtype], False
    return bias, True

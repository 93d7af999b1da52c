"""Shape-only decisions of the ``openmp`` backend: how a call is cut into tasks.

Nothing here looks at the thread count. Every cut (tile widths, folded
samples, row blocks, chunks of the shared column buffer) depends on the
problem's shape and dtype alone, so each output element is produced by the
same floating-point operations in the same order whatever the number of
threads: threads only decide which task runs where. That is why results are
bitwise identical from run to run *and* across thread counts.

A *tile* is the column range of one GEMM: either a slice of one sample's grid
cells, or several whole samples folded side by side (small images, so that
the GEMM stays wide and its weight operand is packed once for many samples).

The index tables turn the map ``image = cell * stride - pad + tap * dilation``
into lookups, one spatial dim at a time, so the kernels never divide by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Per-thread buffers (im2col tile, packed operand, folded result).
THREAD_WORKSPACE_BYTES = 4 << 20
#: The column buffer ``scatter`` shares between its GEMM and col2im phases.
SHARED_WORKSPACE_BYTES = 16 << 20
#: GEMM width (columns) aimed at: wide enough for BLAS's packing to pay off.
TARGET_WIDTH = 512
#: Samples narrower than this many grid cells are folded together.
FOLD_BELOW = 256
#: Tiles a call is cut into where the shape allows, to balance the threads.
TARGET_TASKS = 32
#: Folding stops short of leaving fewer tiles than this.
MIN_FOLDED_TASKS = 8
#: ``scatter`` runs direct tasks (no shared buffer) when it has at least this many.
MIN_DIRECT_TASKS = 4
#: Direct ``scatter`` tasks aimed at (smaller channel blocks past that) ...
DIRECT_TASKS = 8
#: ... and where the taps cover the image exactly (GEMM results written straight
#: into the output, no col2im adds to share out): fewer, larger GEMMs. Interleaved
#: A/B at 2 threads, U-Net b1 512->256: 7.1-7.2 -> 6.1-6.3 ms (8 -> 4 tasks of
#: 32 -> 64 channels); other layers' blocks are unchanged or worse at 4 (DCGAN
#: b1 128->64: 0.51 -> 0.54 ms), hence only here.
DIRECT_TASKS_EXACT_COVER = 4
#: Direct ``scatter`` tasks folding at least this many samples order their
#: columns sample-minor: col2im then adds runs of that many contiguous values
#: (into a per-thread accumulator) instead of walking grid rows a few cells long.
INTERLEAVE_MIN_SAMPLES = 4
#: Direct ``scatter`` tasks over whole samples (sample-major) run col2im through
#: a phase-major accumulator of one channel's image (the core's
#: ``col2im_phased``) when it takes at most this many bytes.
PHASED_MAX_BYTES = 256 << 10
#: A GEMM narrower than this many rows wastes BLAS's kernels.
MIN_GEMM_ROWS = 32
#: Row blocks of ``weight_grad`` (each re-reads the grid input).
TARGET_ROW_BLOCKS = 16
MIN_TILE = 64
MIN_ROW_BLOCK = 32
MAX_ROW_BLOCK = 512

#: A transposed convolution's backward pair (both gradients) runs as this
#: many batch parts at most, each a core call sharing one im2col between
#: the two GEMMs, the parts on several threads ...
PAIR_MAX_PARTS = 4
#: ... and each part at least this many multiply-adds per gradient (smaller
#: pairs run this backend's own gather and weight_grad tasks) ...
PAIR_MIN_PART_MACS = 1 << 23
#: ... and this many GEMM columns (samples x grid cells): each part's weight
#: gradient is a weight-sized partial sum to add, paid back only by a long
#: reduction. (Interleaved A/B at 2 threads, against 2**25 MACs and no column
#: bound: autoencoder backward 1.95 -> 1.73 ms as 2 parts; DCGAN 100->512,
#: 64 columns, went 3.9 -> 5.0 as 4 parts, which this bound forbids.)
PAIR_MIN_PART_COLUMNS = 256
#: ... and the parts' weight-gradient partial sums within this many bytes.
PAIR_PARTIALS_BYTES = 16 << 20

BLAS_INT_MAX = 2**31 - 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


@dataclass(frozen=True)
class Tiling:
    """GEMM columns: ``fold`` whole samples per tile (when > 1), else ``tile`` cells of one sample."""

    fold: int
    tile: int

    def tiles(self, samples: int, cells: int) -> int:
        """Tiles covering ``samples`` x ``cells``."""
        if self.fold > 1:
            return _ceil_div(samples, self.fold)
        return samples * _ceil_div(cells, self.tile)

    def width(self, cells: int) -> int:
        """Widest tile: its GEMM column count."""
        return self.fold * cells if self.fold > 1 else self.tile

    def describe(self) -> str:
        return f"{self.fold} samples folded per GEMM" if self.fold > 1 else f"{self.tile} columns per GEMM"


def tiling(samples: int, cells: int, parallel_units: int, rows_per_column: int, itemsize: int) -> Tiling:
    """Cut ``samples`` x ``cells`` into tiles; ``parallel_units`` tasks run per tile (groups).

    ``rows_per_column``: per-thread buffer elements one folded column needs.
    """
    budget = THREAD_WORKSPACE_BYTES // itemsize
    if cells < FOLD_BELOW and samples > 1:
        fold = _ceil_div(TARGET_WIDTH, cells)
        fold = min(fold, max(1, samples * parallel_units // MIN_FOLDED_TASKS))
        fold = min(fold, max(1, budget // max(1, rows_per_column * cells)), samples)
        if fold > 1:
            return Tiling(fold, cells)
    tile = _ceil_div(samples * cells * parallel_units, TARGET_TASKS)
    tile = min(_clamp(tile, MIN_TILE, TARGET_WIDTH), cells)
    return Tiling(1, tile)


@dataclass(frozen=True)
class ScatterPlan:
    """How ``scatter`` runs: *direct* tasks, or two phases over a shared buffer.

    Direct: tasks are (group, tile of samples, block of ``block`` output
    channels); each owns its outputs, runs its GEMMs into its own buffer and
    adds them into the image at once. Used when the shape gives at least
    ``MIN_DIRECT_TASKS`` such tasks.

    Two phases (few samples and few channels, e.g. a batch of one ending in
    3 channels): chunks of ``samples`` samples x all groups x ``channels``
    channels x ``cells`` grid cells; per chunk, a GEMM phase over column tiles
    into the shared buffer, then a col2im phase over output lines.
    """

    direct: bool
    block: int
    samples: int
    channels: int
    cells: int
    tiling: Tiling
    shared: int  # elements of the shared column buffer (two phases)
    per_thread: int  # elements of each thread's buffers
    interleaved: bool = False  # direct, folded: columns sample-minor, per-thread accumulator
    phased: bool = False  # direct, whole samples sample-major: phase-major col2im accumulator


def scatter_plan(n: int, groups: int, p: int, q: int, taps: int, cells: int, image_cells: int, itemsize: int,
                 phased_acc: int = 0, stride_w: int = 1, exact_cover: bool = False) -> ScatterPlan:
    """``phased_acc``: elements of the phase-major accumulator (0 where col2im
    must not use it: taps that cover the image exactly write it directly);
    ``exact_cover``: they do (``covers_exactly``)."""
    budget = THREAD_WORKSPACE_BYTES // itemsize
    fold = min(n, _ceil_div(TARGET_WIDTH, cells)) if cells < FOLD_BELOW else 1
    fold = min(fold, max(1, budget // (2 * max(p, taps) * cells)))
    interleaved = fold >= INTERLEAVE_MIN_SAMPLES
    # Whole samples per tile (sample-major): col2im can go through the phased
    # accumulator. Tiles are widened to whole samples for it only at stride > 1:
    # at stride 1 the taps' runs are contiguous already, and the wider tiles
    # only cost balance (stride-1 3x3, batch 1: 2.09 -> 2.28 ms at 2 threads).
    phased = (not interleaved and 0 < phased_acc * itemsize <= PHASED_MAX_BYTES
              and (fold > 1 or (stride_w > 1 and taps * cells + phased_acc <= budget)
                   or cells <= TARGET_WIDTH))
    width = fold * cells if fold > 1 else (cells if phased else min(cells, TARGET_WIDTH))
    units = groups * (_ceil_div(n, fold) if fold > 1 else n)
    packed = p * width if fold > 1 else 0
    scratch = packed + (phased_acc if phased else 0)
    per_channel = taps * width + (image_cells * fold if interleaved else 0)  # GEMM rows (+ accumulator)
    tasks = DIRECT_TASKS_EXACT_COVER if exact_cover and not interleaved else DIRECT_TASKS
    block = min(q, max(_ceil_div(MIN_GEMM_ROWS, taps), _ceil_div(q * units, tasks)))
    block = max(1, min(block, (budget - scratch) // per_channel))
    if units * _ceil_div(q, block) >= MIN_DIRECT_TASKS:
        tiles = Tiling(fold, cells) if fold > 1 else Tiling(1, width)
        return ScatterPlan(True, block, 0, 0, 0, tiles, 0, block * per_channel + scratch, interleaved, phased)

    shared_budget = max(groups * taps, SHARED_WORKSPACE_BYTES // itemsize)
    per_sample = groups * q * taps * cells
    if per_sample <= shared_budget:
        samples, channels, chunk_cells = min(n, shared_budget // per_sample), q, cells
    elif groups * taps * cells <= shared_budget:
        samples, channels, chunk_cells = 1, shared_budget // (groups * taps * cells), cells
    else:
        samples, channels, chunk_cells = 1, 1, shared_budget // (groups * taps)
    # folding needs whole samples in the chunk
    tiles = tiling(samples, chunk_cells, groups, p, itemsize) if chunk_cells == cells else Tiling(
        1, min(chunk_cells, TARGET_WIDTH))
    shared = groups * channels * taps * samples * chunk_cells
    per_thread = p * tiles.width(chunk_cells) if tiles.fold > 1 else 0
    return ScatterPlan(False, 0, samples, channels, chunk_cells, tiles, shared, per_thread)


@dataclass(frozen=True)
class GatherPlan:
    """Tasks are (group, tile); ``rows`` im2col rows per GEMM (all of them unless huge).

    ``interleaved``: folded tiles pack their image sample-minor first, so
    im2col copies runs of ``fold`` values (see ``_kernels``).
    """

    tiling: Tiling
    rows: int
    per_thread: int
    interleaved: bool = False


def gather_plan(n: int, groups: int, rows_total: int, q: int, cells: int, image_size: int,
                itemsize: int) -> GatherPlan:
    """``image_size``: elements of one sample's image in one group (P x image cells)."""
    tiles = tiling(n, cells, groups, rows_total + q, itemsize)
    interleaved = tiles.fold >= INTERLEAVE_MIN_SAMPLES
    if interleaved:  # room for the packed image too
        tiles = tiling(n, cells, groups, rows_total + q + _ceil_div(image_size, cells), itemsize)
        interleaved = tiles.fold >= INTERLEAVE_MIN_SAMPLES
    width = tiles.width(cells)
    result = q * width if tiles.fold > 1 else 0
    image = image_size * tiles.fold if interleaved else 0
    budget = THREAD_WORKSPACE_BYTES // itemsize
    rows = _clamp((budget - result - image) // width, 1, rows_total)
    return GatherPlan(tiles, rows, rows * width + result + image, interleaved)


@dataclass(frozen=True)
class WeightGradPlan:
    """Tasks are (group, block of ``rows`` im2col rows); each sums over all tiles in order.

    ``interleaved``: as in ``GatherPlan``, each task packing the image
    channels its rows read.
    """

    rows: int
    tiling: Tiling
    per_thread: int
    interleaved: bool = False


def weight_grad_plan(n: int, groups: int, rows_total: int, q: int, cells: int, taps: int,
                     image_cells: int, itemsize: int) -> WeightGradPlan:
    rows = _clamp(_ceil_div(groups * rows_total, TARGET_ROW_BLOCKS), MIN_ROW_BLOCK, MAX_ROW_BLOCK)
    rows = min(rows, rows_total)
    # Every task walks all tiles, so the tiling only needs wide GEMMs, not many tiles.
    budget = THREAD_WORKSPACE_BYTES // itemsize
    if cells < FOLD_BELOW and n > 1:
        fold = min(n, _ceil_div(TARGET_WIDTH, cells), max(1, budget // ((rows + q) * cells)))
        tiles = Tiling(fold, cells) if fold > 1 else Tiling(1, cells)
    else:
        tiles = Tiling(1, _clamp(budget // rows, 1, cells))
    width = tiles.width(cells)
    packed = q * width if tiles.fold > 1 else 0
    interleaved = tiles.fold >= INTERLEAVE_MIN_SAMPLES
    # a block of rows reads at most rows // taps + 2 channels (it may start and end mid-channel)
    image = (rows // taps + 2) * image_cells * tiles.fold if interleaved else 0
    return WeightGradPlan(rows, tiles, rows * width + packed + image, interleaved)


def pair_parts(n: int, macs: int, weight_bytes: int, columns: int) -> int:
    """Batch parts of a backward pair of ``macs`` multiply-adds per gradient over
    ``n`` samples, ``columns`` (n x grid cells) in all (1: do not split). Part ``i``
    covers samples ``n * i // parts`` up to ``n * (i + 1) // parts``; the weight
    gradient sums the parts in order."""
    parts = min(PAIR_MAX_PARTS, n, macs // PAIR_MIN_PART_MACS, columns // PAIR_MIN_PART_COLUMNS,
                PAIR_PARTIALS_BYTES // max(1, weight_bytes))
    # a power of two: parts of equal size keep 2 or 4 threads equally busy (3 parts on
    # 2 threads ran DCGAN 512->256's backward at 1.06x the 1-thread time)
    return 1 << (max(1, parts).bit_length() - 1)


def check_blas_ints(*sizes: int) -> None:
    """BLAS takes 32-bit ints: refuse what would not fit rather than wrap around."""
    if max(sizes) > BLAS_INT_MAX:
        raise ValueError(
            f"openmp backend: a GEMM dimension of {max(sizes)} exceeds BLAS's 32-bit limit; "
            f"use the numpy backend for problems this large"
        )


# --------------------------------------------------------------------------- #
# index tables, one spatial dim at a time
# --------------------------------------------------------------------------- #
def _landing(image: int, grid: int, kernel: int, stride: int, dilation: int, pad: int):
    """``(taps, cells, image_index)`` as (kernel, grid) arrays."""
    taps, cells = np.meshgrid(np.arange(kernel), np.arange(grid), indexing="ij")
    return taps, cells, cells * stride - pad + taps * dilation


def image_index_map(image, grid, kernel, stride, dilation, pad) -> np.ndarray:
    """``map[tap * grid + cell]``: the image index that tap and cell meet, or -1 off the image."""
    _, _, index = _landing(image, grid, kernel, stride, dilation, pad)
    index = np.where((index >= 0) & (index < image), index, -1)
    return np.ascontiguousarray(index.ravel(), dtype=np.intp)


def image_entries(image, grid, kernel, stride, dilation, pad):
    """For each image index, the (tap, cell) pairs that land on it, taps ascending.

    Returns ``(start, taps, cells)``: the pairs of index ``i`` are
    ``taps[start[i]:start[i + 1]]``, ``cells[...]`` (a CSR layout).
    """
    taps, cells, index = _landing(image, grid, kernel, stride, dilation, pad)
    keep = (index >= 0) & (index < image)
    taps, cells, index = taps[keep], cells[keep], index[keep]
    order = np.lexsort((taps, index))
    start = np.zeros(image + 1, dtype=np.intp)
    np.cumsum(np.bincount(index, minlength=image), out=start[1:])
    return (start, np.ascontiguousarray(taps[order], dtype=np.intp),
            np.ascontiguousarray(cells[order], dtype=np.intp))


def tap_runs(image, grid, kernel, stride, dilation, pad):
    """Per tap, the cells that land inside the image: ``first <= cell <= last``,
    at image index ``cell * stride + offset``. ``first > last`` when none do."""
    offset = np.arange(kernel) * dilation - pad
    first = np.maximum(0, -(offset // stride))  # ceil(-offset / stride)
    last = np.minimum(grid - 1, (image - 1 - offset) // stride)
    return (np.ascontiguousarray(first, dtype=np.intp), np.ascontiguousarray(last, dtype=np.intp),
            np.ascontiguousarray(offset, dtype=np.intp))

# cython: language_level=3
"""Multicore kernels of the ``openmp`` backend: ``prange`` over independent tasks.

Each primitive is cut (by ``_plan``, from the shape alone) into tasks whose
outputs are disjoint, so every output element is written by exactly one
thread and no thread waits for another:

``scatter_direct`` (col2im)
    tasks are (group, samples, block of output channels); each runs
    ``cols = W_g^T @ X`` tile by tile into its own buffer and adds it into
    its own output channels at once.
``scatter`` (col2im, for shapes with too few such tasks)
    per chunk, two phases. GEMM phase: tasks are column tiles; each computes
    ``cols = W_g^T @ X`` for its grid cells into its own columns of a shared
    buffer. col2im phase: tasks are output lines (one sample, channel and
    (d, h)); each sums the column entries that land on its line, gathering
    over d and h and scattering along w.
``gather`` (im2col)
    tasks are (sample, group, column tile); each fills its own im2col tile
    and runs the GEMM into its own output columns.
``weight_grad``
    tasks are (group, block of im2col rows); each sums its block of the
    weight gradient over samples and column tiles, in order.

Inside a task BLAS runs single-threaded (the caller sets it to one thread),
so OpenMP threads x BLAS threads never exceed the budget. All arrays are
flat C-contiguous views; indices come from the plan and from index tables
built in Python, which is why bounds checks are off.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport isfinite
from libc.string cimport memcpy, memset
from cpython.pyport cimport PY_SSIZE_T_MAX, PY_SSIZE_T_MIN
from scipy.linalg cimport cython_blas

cdef extern from *:
    """
    #ifdef _OPENMP
    #define TCONV_BUILT_WITH_OPENMP 1
    #else
    #define TCONV_BUILT_WITH_OPENMP 0
    #endif
    """
    const int TCONV_BUILT_WITH_OPENMP


def built_with_openmp():
    """Whether this extension was compiled with OpenMP (else ``prange`` is serial)."""
    return TCONV_BUILT_WITH_OPENMP == 1


@cython.boundscheck(False)
@cython.wraparound(False)
def all_finite(const floating[::1] values, int threads):
    """Whether no element is NaN or infinite (one parallel pass, no temporary)."""
    cdef Py_ssize_t i, bad = 0
    with nogil:
        for i in prange(values.shape[0], num_threads=threads, schedule="static"):
            if not isfinite(values[i]):
                bad += 1
    return bad == 0


cdef struct Sizes:
    # Spatial sizes (D, H, W) of the image, grid and kernel.
    Py_ssize_t image[3]
    Py_ssize_t grid[3]
    Py_ssize_t kernel[3]
    Py_ssize_t stride_w      # stride along W (the scattered dim of col2im)
    Py_ssize_t image_cells   # I = prod(image)
    Py_ssize_t grid_cells    # L = prod(grid)
    Py_ssize_t taps          # K = prod(kernel)


cdef struct Tables:
    # im2col: image index met by (tap, cell), or -1; map_d[tap * grid[d] + cell].
    const Py_ssize_t* map0
    const Py_ssize_t* map1
    const Py_ssize_t* map2
    # col2im over D and H: the (tap, cell) pairs landing on image index i are
    # entries start_d[i] .. start_d[i + 1] - 1 of tap_d / cell_d.
    const Py_ssize_t* start0
    const Py_ssize_t* tap0
    const Py_ssize_t* cell0
    const Py_ssize_t* start1
    const Py_ssize_t* tap1
    const Py_ssize_t* cell1
    # col2im along W: tap k covers cells first_w[k] .. last_w[k], landing at
    # cell * stride_w + offset_w[k].
    const Py_ssize_t* first_w
    const Py_ssize_t* last_w
    const Py_ssize_t* offset_w


cdef Sizes make_sizes(tuple image, tuple grid, tuple kernel, Py_ssize_t stride_w):
    cdef Sizes s
    cdef int d
    for d in range(3):
        s.image[d] = image[d]
        s.grid[d] = grid[d]
        s.kernel[d] = kernel[d]
    s.stride_w = stride_w
    s.image_cells = s.image[0] * s.image[1] * s.image[2]
    s.grid_cells = s.grid[0] * s.grid[1] * s.grid[2]
    s.taps = s.kernel[0] * s.kernel[1] * s.kernel[2]
    return s


# --------------------------------------------------------------------------- #
# BLAS
# --------------------------------------------------------------------------- #
# The sgemm_ / dgemm_ the tasks call: SciPy's until ``use_blas`` hands over the
# core's (``tconv._blas_core.blas_addresses()``, the library ``TCONV_BLAS`` chose).
ctypedef void sgemm_t(char* transa, char* transb, int* m, int* n, int* k, float* alpha, float* a, int* lda,
                      float* b, int* ldb, float* beta, float* c, int* ldc) noexcept nogil
ctypedef void dgemm_t(char* transa, char* transb, int* m, int* n, int* k, double* alpha, double* a, int* lda,
                      double* b, int* ldb, double* beta, double* c, int* ldc) noexcept nogil

# The core's float32 GEMM in row-major terms (``tconv._blas_core.sgemm_rows_address``):
# its AVX-512 kernel where the core would take it, its BLAS elsewhere; NULL until
# ``use_blas`` hands it over.
ctypedef void sgemm_rows_t(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda,
                           int a_transposed, const float* b, Py_ssize_t ldb, int accumulate, float* c,
                           Py_ssize_t ldc) noexcept nogil

cdef sgemm_t* blas_sgemm = cython_blas.sgemm
cdef dgemm_t* blas_dgemm = cython_blas.dgemm
cdef sgemm_rows_t* core_sgemm_rows = NULL


def use_blas(size_t sgemm_address, size_t dgemm_address, size_t sgemm_rows_address=0):
    """Call the ``sgemm_`` and ``dgemm_`` at these addresses (the core's, see
    ``tconv._blas_core.use_blas``), and for float32 products with A untransposed the
    core's ``gemm_rows`` at the third (``sgemm_rows_address``), if given; set once,
    before any task runs."""
    global blas_sgemm, blas_dgemm, core_sgemm_rows
    blas_sgemm = <sgemm_t*>sgemm_address
    blas_dgemm = <dgemm_t*>dgemm_address
    core_sgemm_rows = <sgemm_rows_t*>sgemm_rows_address


cdef inline void gemm(char transa, char transb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                      const floating* a, Py_ssize_t lda, const floating* b, Py_ssize_t ldb,
                      floating beta, floating* c, Py_ssize_t ldc) noexcept nogil:
    """C = op(A) op(B) + beta C, in BLAS's column-major terms (sizes checked < 2**31)."""
    cdef int im = <int>m, i_n = <int>n, ik = <int>k
    cdef int ilda = <int>lda, ildb = <int>ldb, ildc = <int>ldc
    cdef floating one = 1
    if floating is float and core_sgemm_rows != NULL and transa == c'N' and (beta == 0 or beta == 1):
        # Row-major, the core's terms: C's storage, read row-major, is C^T (n x m) =
        # op(B)^T (n x k) A^T (k x m). A^T is A's storage read row-major (k rows of m);
        # op(B)^T is B's storage read row-major where transb is 'N' (n rows of k), and
        # the transpose of B's storage read row-major (k rows of n) where it is 'T'.
        core_sgemm_rows(n, m, k, <const float*>b, ldb, transb == c'T', <const float*>a, lda, beta == 1,
                        <float*>c, ldc)
    elif floating is float:
        blas_sgemm(&transa, &transb, &im, &i_n, &ik, &one, <float*>a, &ilda,
              <float*>b, &ildb, &beta, c, &ildc)
    else:
        blas_dgemm(&transa, &transb, &im, &i_n, &ik, &one, <double*>a, &ilda,
              <double*>b, &ildb, &beta, c, &ildc)


# --------------------------------------------------------------------------- #
# tiles: the GEMM column ranges
# --------------------------------------------------------------------------- #
cdef struct Tile:
    Py_ssize_t sample    # first sample
    Py_ssize_t samples   # samples folded side by side (> 1 only when whole samples are)
    Py_ssize_t cell      # first grid cell of each sample
    Py_ssize_t cells     # grid cells per sample
    Py_ssize_t width     # samples * cells: the GEMM's column count


cdef inline Py_ssize_t tile_count(Py_ssize_t samples, Py_ssize_t cells, Py_ssize_t fold,
                                  Py_ssize_t tile) noexcept nogil:
    if fold > 1:
        return (samples + fold - 1) // fold
    return samples * ((cells + tile - 1) // tile)


cdef inline Tile tile_at(Py_ssize_t index, Py_ssize_t sample0, Py_ssize_t samples,
                         Py_ssize_t cell0, Py_ssize_t cells, Py_ssize_t fold,
                         Py_ssize_t tile) noexcept nogil:
    """Tile ``index`` of the block samples ``sample0 ..`` x cells ``cell0 ..`` (see _plan.Tiling)."""
    cdef Tile t
    cdef Py_ssize_t per_sample
    if fold > 1:
        t.sample = sample0 + index * fold
        t.samples = min(fold, sample0 + samples - t.sample)
        t.cell = cell0
        t.cells = cells
    else:
        per_sample = (cells + tile - 1) // tile
        t.sample = sample0 + index // per_sample
        t.samples = 1
        t.cell = cell0 + (index % per_sample) * tile
        t.cells = min(tile, cell0 + cells - t.cell)
    t.width = t.samples * t.cells
    return t


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void pack_rows(const floating* src, Py_ssize_t sample_stride, Py_ssize_t rows,
                    Py_ssize_t row_stride, const Tile* t, floating* dst) noexcept nogil:
    """``dst[r * width + s * cells + j] = src[(sample + s) * sample_stride + r * row_stride + cell + j]``."""
    cdef Py_ssize_t r, s
    for r in range(rows):
        for s in range(t.samples):
            memcpy(dst + r * t.width + s * t.cells,
                   src + (t.sample + s) * sample_stride + r * row_stride + t.cell,
                   t.cells * sizeof(floating))


# --------------------------------------------------------------------------- #
# im2col and col2im on one task's share
# --------------------------------------------------------------------------- #
@cython.cdivision(True)
cdef inline Py_ssize_t split_row(Py_ssize_t row, const Sizes* s, Py_ssize_t* k0, Py_ssize_t* k1,
                                 Py_ssize_t* k2) noexcept nogil:
    """An im2col row ``p * K + tap``: returns p, sets the tap's (d, h, w) indices."""
    cdef Py_ssize_t k = row % s.taps
    k0[0] = k // (s.kernel[1] * s.kernel[2])
    k1[0] = (k // s.kernel[2]) % s.kernel[1]
    k2[0] = k % s.kernel[2]
    return row // s.taps


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void im2col_rows(const floating* image, Py_ssize_t row0, Py_ssize_t rows,
                      Py_ssize_t col0, Py_ssize_t width, floating* buf, Py_ssize_t ld,
                      const Sizes* s, const Tables* t) noexcept nogil:
    """``buf[r * ld + j] = image[p, image(col0 + j, tap)]`` (0 off the image).

    Rows ``row0 .. row0 + rows - 1`` of the im2col matrix (row = p * K + tap)
    of one (sample, group), columns (grid cells) ``col0 .. col0 + width - 1``.
    """
    cdef Py_ssize_t G0 = s.grid[0], G1 = s.grid[1], G2 = s.grid[2]
    cdef Py_ssize_t I1 = s.image[1], I2 = s.image[2]
    cdef Py_ssize_t r, p, k0, k1, k2, j, run, u, a0, a1, a2, i0, i1, i2
    cdef const floating* src
    cdef const floating* line
    cdef const Py_ssize_t* map_w
    cdef floating* dst
    for r in range(rows):
        p = split_row(row0 + r, s, &k0, &k1, &k2)
        src = image + p * s.image_cells
        dst = buf + r * ld
        a2 = col0 % G2
        a1 = (col0 // G2) % G1
        a0 = col0 // (G1 * G2)
        j = 0
        while j < width:  # one grid line (fixed d, h) at a time
            run = G2 - a2
            if run > width - j:
                run = width - j
            i0 = t.map0[k0 * G0 + a0]
            i1 = t.map1[k1 * G1 + a1]
            if i0 < 0 or i1 < 0:
                memset(dst + j, 0, run * sizeof(floating))
            else:
                line = src + (i0 * I1 + i1) * I2
                map_w = t.map2 + k2 * G2 + a2
                for u in range(run):
                    i2 = map_w[u]
                    dst[j + u] = line[i2] if i2 >= 0 else 0
            j += run
            a2 = 0
            a1 += 1
            if a1 == G1:
                a1 = 0
                a0 += 1


cdef inline void im2col_tile(const floating* image, Py_ssize_t sample_stride, Py_ssize_t row0,
                             Py_ssize_t rows, const Tile* tile, floating* buf,
                             const Sizes* s, const Tables* t) noexcept nogil:
    """im2col of a tile into ``buf`` (rows x tile.width), sample after sample."""
    cdef Py_ssize_t i
    for i in range(tile.samples):
        im2col_rows(image + (tile.sample + i) * sample_stride, row0, rows, tile.cell,
                    tile.cells, buf + i * tile.cells, tile.width, s, t)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void col2im_line(const floating* cols, Py_ssize_t ld, Py_ssize_t col_begin,
                      Py_ssize_t col_end, floating* out_line, bint fresh, floating init,
                      Py_ssize_t i0, Py_ssize_t i1, const Sizes* s, const Tables* t) noexcept nogil:
    """Add into one output line (fixed channel, d = i0, h = i1) every column entry landing on it.

    ``cols[tap * ld + (cell - col_begin)]`` holds the channel's columns for
    grid cells ``col_begin .. col_end - 1``. ``fresh``: the line starts at
    ``init`` (the bias) instead of its current value. The terms of each
    element are added in a fixed order: D entries, H entries, W taps.
    """
    cdef Py_ssize_t K1 = s.kernel[1], K2 = s.kernel[2]
    cdef Py_ssize_t G1 = s.grid[1], G2 = s.grid[2], I2 = s.image[2], sw = s.stride_w
    cdef Py_ssize_t e0, e1, k2, tap_base, cell_base, lo, hi, cell, offset, x
    cdef const floating* src
    if fresh:
        for x in range(I2):
            out_line[x] = init
    for e0 in range(t.start0[i0], t.start0[i0 + 1]):
        for e1 in range(t.start1[i1], t.start1[i1 + 1]):
            tap_base = (t.tap0[e0] * K1 + t.tap1[e1]) * K2
            cell_base = (t.cell0[e0] * G1 + t.cell1[e1]) * G2
            if cell_base + G2 <= col_begin or cell_base >= col_end:
                continue
            for k2 in range(K2):
                lo = t.first_w[k2]
                if lo < col_begin - cell_base:
                    lo = col_begin - cell_base
                hi = t.last_w[k2]
                if hi > col_end - 1 - cell_base:
                    hi = col_end - 1 - cell_base
                offset = t.offset_w[k2]
                src = cols + (tap_base + k2) * ld + cell_base - col_begin
                for cell in range(lo, hi + 1):
                    out_line[cell * sw + offset] += src[cell]


# A copy of the core's ``add_three_taps`` (this package builds without tconv's sources).
cdef inline void add_taps_at(floating* dst, Py_ssize_t x, const floating* a, const floating* b,
                             const floating* c, Py_ssize_t db, Py_ssize_t dc, Py_ssize_t lo_a, Py_ssize_t hi_a,
                             Py_ssize_t lo_b, Py_ssize_t hi_b, Py_ssize_t lo_c, Py_ssize_t hi_c) noexcept nogil:
    cdef floating v = dst[x]
    if lo_a <= x < hi_a:
        v += a[x]
    if lo_b <= x - db < hi_b:
        v += b[x - db]
    if lo_c <= x - dc < hi_c:
        v += c[x - dc]
    dst[x] = v


cdef inline void add_three_taps(floating* dst, const floating* a, const floating* b, const floating* c,
                                Py_ssize_t db, Py_ssize_t dc, Py_ssize_t lo_a, Py_ssize_t hi_a,
                                Py_ssize_t lo_b, Py_ssize_t hi_b, Py_ssize_t lo_c, Py_ssize_t hi_c) noexcept nogil:
    """Three neighbouring taps of one line at stride 1, each element loaded and stored
    once and taking them in order (``dst[x] += a[x]``, ``+= b[x - db]``, ``+= c[x - dc]``,
    each on its range ``lo <= index < hi``): the bits of three passes."""
    cdef Py_ssize_t x, x0 = PY_SSIZE_T_MAX, x1 = PY_SSIZE_T_MIN, lo, hi
    if lo_a < hi_a:  # x0, x1: the span of the taps that land at all
        x0, x1 = min(x0, lo_a), max(x1, hi_a)
    if lo_b < hi_b:
        x0, x1 = min(x0, lo_b + db), max(x1, hi_b + db)
    if lo_c < hi_c:
        x0, x1 = min(x0, lo_c + dc), max(x1, hi_c + dc)
    lo = max(lo_a, max(lo_b + db, lo_c + dc))  # lo, hi: where all three land (the bulk)
    hi = min(hi_a, min(hi_b + db, hi_c + dc))
    if hi <= lo:
        lo = hi = x1
    for x in range(x0, lo):
        add_taps_at(dst, x, a, b, c, db, dc, lo_a, hi_a, lo_b, hi_b, lo_c, hi_c)
    for x in range(lo, hi):
        dst[x] = ((dst[x] + a[x]) + b[x - db]) + c[x - dc]
    for x in range(hi, x1):
        add_taps_at(dst, x, a, b, c, db, dc, lo_a, hi_a, lo_b, hi_b, lo_c, hi_c)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_add_tile(const floating* cols, Py_ssize_t channels, const Tile* tile,
                          floating* out, Py_ssize_t sample_stride, const Sizes* s,
                          const Tables* t, bint cover, const floating* bias) noexcept nogil:
    """Add a tile's columns into the image: the scatter form, for a task owning its outputs.

    ``cols[(c * K + tap) * width + j]`` is channel c's term at tap ``tap`` of
    tile column j; ``out`` points at channel 0 of the tile's first sample.
    Each element's terms are added in a fixed order: channel, tap, cell.
    ``cover``: every image cell gets exactly one term (see the core's
    ``covers_exactly``), so it is written, ``bias[c]`` (or 0) plus the term,
    into an image that was not filled first.
    """
    cdef Py_ssize_t K = s.taps, K1 = s.kernel[1], K2 = s.kernel[2]
    cdef Py_ssize_t G0 = s.grid[0], G1 = s.grid[1], G2 = s.grid[2]
    cdef Py_ssize_t I = s.image_cells, I1 = s.image[1], I2 = s.image[2], sw = s.stride_w
    cdef Py_ssize_t c, k, k0, k1, k2, i, cell, end, j, run, a0, a1, a2, i0, i1, lo, hi, u, offset
    # k2 s2 along W (U-Net), covered exactly, the two taps on the same cells: one
    # pass writes both into alternate elements, contiguous stores the compiler
    # vectorises (the core's col2im_cover does the same)
    cdef bint pairs = (cover and sw == 2 and K2 == 2 and t.first_w[0] == t.first_w[1]
                       and t.last_w[0] == t.last_w[1] and t.offset_w[1] == t.offset_w[0] + 1)
    # stride 1, 3 wide (3x3 kernels): a line's three taps along W in one pass
    cdef bint threes = not cover and sw == 1 and K2 == 3
    cdef Py_ssize_t w
    cdef Py_ssize_t lo3[3]
    cdef Py_ssize_t hi3[3]
    cdef const floating* src
    cdef const floating* src_right
    cdef floating* dst
    cdef floating* line
    cdef floating value
    for c in range(channels):
        value = bias[c] if bias != NULL else 0
        for k in range(K):
            k0 = k // (K1 * K2)
            k1 = (k // K2) % K1
            k2 = k % K2
            if (pairs and k2 == 1) or (threes and k2 != 0):
                continue  # (written with tap k - 1, or added with tap k - k2)
            offset = t.offset_w[k2]
            src = cols + (c * K + k) * tile.width
            src_right = src + tile.width
            for i in range(tile.samples):
                dst = out + i * sample_stride + c * I
                cell = tile.cell
                end = tile.cell + tile.cells
                j = i * tile.cells
                a2 = cell % G2
                a1 = (cell // G2) % G1
                a0 = cell // (G1 * G2)
                while cell < end:  # one grid line (fixed d, h) at a time
                    run = G2 - a2
                    if run > end - cell:
                        run = end - cell
                    i0 = t.map0[k0 * G0 + a0]
                    i1 = t.map1[k1 * G1 + a1]
                    if i0 >= 0 and i1 >= 0:
                        line = dst + (i0 * I1 + i1) * I2
                        lo = a2 if a2 > t.first_w[k2] else t.first_w[k2]
                        hi = a2 + run - 1 if a2 + run - 1 < t.last_w[k2] else t.last_w[k2]
                        if threes:
                            for w in range(3):
                                lo3[w] = a2 if a2 > t.first_w[w] else t.first_w[w]
                                hi3[w] = a2 + run if a2 + run <= t.last_w[w] else t.last_w[w] + 1
                            add_three_taps(line + offset, src + j - a2, src + tile.width + j - a2,
                                           src + 2 * tile.width + j - a2, t.offset_w[1] - offset,
                                           t.offset_w[2] - offset, lo3[0], hi3[0], lo3[1], hi3[1], lo3[2], hi3[2])
                        elif pairs:
                            for u in range(lo, hi + 1):
                                line[2 * u + offset] = src[j + u - a2] + value
                                line[2 * u + offset + 1] = src_right[j + u - a2] + value
                        elif cover:
                            for u in range(lo, hi + 1):
                                line[u * sw + offset] = src[j + u - a2] + value
                        else:
                            for u in range(lo, hi + 1):
                                line[u * sw + offset] += src[j + u - a2]
                    cell += run
                    j += run
                    a2 = 0  # the next line starts at its first cell
                    a1 += 1
                    if a1 == G1:
                        a1 = 0
                        a0 += 1


@cython.cdivision(True)
cdef inline void store_phases(floating* out, const floating* acc, Py_ssize_t W, Py_ssize_t sw,
                              Py_ssize_t plen) noexcept nogil:
    """One image row back from phase-major: ``out[m * sw + r] = acc[r * plen + m]``
    (the core's helper of the same name)."""
    cdef Py_ssize_t m, r
    if sw == 2:  # both phases in one pass, contiguous stores the compiler vectorises
        for m in range(W // 2):
            out[2 * m] = acc[m]
            out[2 * m + 1] = acc[plen + m]
        if W % 2:
            out[W - 1] = acc[W // 2]
        return
    for r in range(sw):
        for m in range((W - r + sw - 1) // sw):
            out[m * sw + r] = acc[r * plen + m]


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_phased_tile(const floating* cols, Py_ssize_t channels, const Tile* tile,
                             floating* out, Py_ssize_t sample_stride, const Sizes* s,
                             const Tables* t, const floating* bias, floating* acc) noexcept nogil:
    """Write a tile of whole samples into the image (not filled first): the core's
    ``col2im_phased``. Per sample and channel, ``acc`` (the core's
    ``phased_acc_bytes`` over the itemsize) holds the image with each row stored phase-major (column
    ``m * stride_w + r`` at ``r * phase_len + m``), starts at ``bias[c]`` (or 0)
    and takes each tap's grid lines as contiguous runs, in col2im_add_tile's
    order; one strided store writes each element once.
    """
    cdef Py_ssize_t K = s.taps, K1 = s.kernel[1], K2 = s.kernel[2]
    cdef Py_ssize_t G0 = s.grid[0], G1 = s.grid[1], G2 = s.grid[2], L = s.grid_cells
    cdef Py_ssize_t I = s.image_cells, I1 = s.image[1], I2 = s.image[2], sw = s.stride_w
    cdef Py_ssize_t phase_len = (I2 + sw - 1) // sw
    cdef Py_ssize_t acc_line = sw * phase_len, lines = s.image[0] * I1
    cdef Py_ssize_t i, c, k, k0, k1, k2, a0, a1, i0, i1, lo, hi, u, x, phase, shift
    cdef const floating* src
    cdef const floating* run
    cdef floating* line
    cdef floating* dst
    cdef floating value
    for i in range(tile.samples):
        for c in range(channels):
            value = bias[c] if bias != NULL else 0
            for x in range(lines * acc_line):
                acc[x] = value
            for k in range(K):
                k0 = k // (K1 * K2)
                k1 = (k // K2) % K1
                k2 = k % K2
                lo, hi = t.first_w[k2], t.last_w[k2]
                if hi < lo:
                    continue
                # image column u * sw + offset = (u + q) * sw + phase: at phase * phase_len + u + q
                phase = ((t.offset_w[k2] % sw) + sw) % sw
                shift = phase * phase_len + (t.offset_w[k2] - phase) // sw
                src = cols + (c * K + k) * tile.width + i * L
                for a0 in range(G0):
                    i0 = t.map0[k0 * G0 + a0]
                    if i0 < 0:
                        continue
                    for a1 in range(G1):
                        i1 = t.map1[k1 * G1 + a1]
                        if i1 < 0:
                            continue
                        line = acc + (i0 * I1 + i1) * acc_line + shift
                        run = src + (a0 * G1 + a1) * G2
                        for u in range(lo, hi + 1):
                            line[u] += run[u]
            dst = out + i * sample_stride + c * I
            for x in range(lines):
                store_phases(dst + x * I2, acc + x * acc_line, I2, sw, phase_len)


# --------------------------------------------------------------------------- #
# sample-minor tiles (folded samples, short grid rows)
# --------------------------------------------------------------------------- #
# A folded tile's columns ordered cell-major, sample-minor (column
# cell * samples + i): each col2im step adds ``samples`` contiguous values into
# an accumulator laid out (channel, image cell, sample), which one transposing
# store writes out. Same order of additions per element as col2im_add_tile.

cdef extern from "_simd.h" nogil:
    void transpose4_f32(const float* src, Py_ssize_t src_stride, float* dst, Py_ssize_t dst_stride)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void transpose_block(const floating* src, Py_ssize_t src_stride, Py_ssize_t rows, Py_ssize_t cols,
                          floating* dst, Py_ssize_t dst_stride) noexcept nogil:
    """dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: float32
    in 4 x 4 blocks through SSE registers (``_simd.h``), the rest one by one (as the
    core's ``transpose_block``)."""
    cdef Py_ssize_t i, j, k, rows4 = 0, cols4
    if floating is float:
        rows4, cols4 = rows - rows % 4, cols - cols % 4
        for i in range(0, rows4, 4):
            for j in range(0, cols4, 4):
                transpose4_f32(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride)
            for k in range(i, i + 4):
                for j in range(cols4, cols):
                    dst[j * dst_stride + k] = src[k * src_stride + j]
    for i in range(rows4, rows):
        for j in range(cols):
            dst[j * dst_stride + i] = src[i * src_stride + j]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void pack_interleaved(const floating* src, Py_ssize_t sample_stride, Py_ssize_t rows,
                           Py_ssize_t row_stride, Py_ssize_t cells, Py_ssize_t sample0, Py_ssize_t ns,
                           floating* dst, Py_ssize_t ld) noexcept nogil:
    """``dst[r * ld + j * ns + i] = src[(sample0 + i) * sample_stride + r * row_stride + j]``, j < cells.

    A folded tile's grid operand (cells = grid cells, ld = tile width) or its
    image (cells = image cells), sample-minor: per row, an (ns x cells) block transposed.
    """
    cdef Py_ssize_t r
    for r in range(rows):
        transpose_block(src + sample0 * sample_stride + r * row_stride, sample_stride, ns, cells,
                        dst + r * ld, ns)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void im2col_rows_interleaved(const floating* image, Py_ssize_t p0, Py_ssize_t row0, Py_ssize_t rows,
                                  Py_ssize_t ns, floating* buf, Py_ssize_t ld,
                                  const Sizes* s, const Tables* t) noexcept nogil:
    """``buf[r * ld + cell * ns + i] = image[((p - p0) * I + image(cell, tap)) * ns + i]`` (0 off
    the image) for im2col rows ``row0 ..`` (row = p * K + tap); ``image`` holds channels
    ``p0 ..`` of ``ns`` samples, packed by ``pack_interleaved``."""
    cdef Py_ssize_t G0 = s.grid[0], G1 = s.grid[1], G2 = s.grid[2]
    cdef Py_ssize_t I = s.image_cells, I1 = s.image[1], I2 = s.image[2]
    cdef Py_ssize_t r, p, k0, k1, k2, a0, a1, a2, i0, i1, i2, i
    cdef const floating* src
    cdef const floating* base
    cdef floating* line
    for r in range(rows):
        p = split_row(row0 + r, s, &k0, &k1, &k2)
        src = image + (p - p0) * I * ns
        for a0 in range(G0):
            i0 = t.map0[k0 * G0 + a0]
            for a1 in range(G1):
                i1 = t.map1[k1 * G1 + a1]
                line = buf + r * ld + (a0 * G1 + a1) * G2 * ns
                if i0 < 0 or i1 < 0:
                    memset(line, 0, G2 * ns * sizeof(floating))
                    continue
                base = src + (i0 * I1 + i1) * I2 * ns
                for a2 in range(G2):
                    i2 = t.map2[k2 * G2 + a2]
                    if i2 < 0:
                        for i in range(ns):
                            line[a2 * ns + i] = 0
                    else:
                        for i in range(ns):
                            line[a2 * ns + i] = base[i2 * ns + i]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void col2im_add_interleaved(const floating* cols, Py_ssize_t channels, const Tile* tile,
                                 floating* acc, const Sizes* s, const Tables* t) noexcept nogil:
    """``acc[(c * I + image cell) * samples + i] += cols[(c * K + tap) * width + cell * samples + i]``
    over every (tap, cell) landing in the image (whole samples)."""
    cdef Py_ssize_t K = s.taps, K1 = s.kernel[1], K2 = s.kernel[2], ns = tile.samples
    cdef Py_ssize_t G0 = s.grid[0], G1 = s.grid[1], G2 = s.grid[2]
    cdef Py_ssize_t I = s.image_cells, I1 = s.image[1], I2 = s.image[2], step = s.stride_w * ns
    cdef Py_ssize_t c, k, k0, k1, k2, a0, a1, i0, i1, u, i, lo, hi
    cdef const floating* src
    cdef const floating* src_run
    cdef floating* dst_run
    for c in range(channels):
        for k in range(K):
            k0 = k // (K1 * K2)
            k1 = (k // K2) % K1
            k2 = k % K2
            lo, hi = t.first_w[k2], t.last_w[k2]
            src = cols + (c * K + k) * tile.width
            for a0 in range(G0):
                i0 = t.map0[k0 * G0 + a0]
                if i0 < 0:
                    continue
                for a1 in range(G1):
                    i1 = t.map1[k1 * G1 + a1]
                    if i1 < 0:
                        continue
                    dst_run = acc + ((c * I + (i0 * I1 + i1) * I2 + t.offset_w[k2]) + lo * s.stride_w) * ns
                    src_run = src + ((a0 * G1 + a1) * G2 + lo) * ns
                    for u in range(hi - lo + 1):
                        for i in range(ns):
                            dst_run[u * step + i] += src_run[u * ns + i]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void store_interleaved(const floating* acc, Py_ssize_t values, Py_ssize_t ns,
                            floating* out, Py_ssize_t sample_stride) noexcept nogil:
    """``out[i * sample_stride + v] = acc[v * ns + i]``: the (values x ns) accumulator transposed."""
    transpose_block(acc, ns, values, ns, out, sample_stride)


# --------------------------------------------------------------------------- #
# the three primitives
# --------------------------------------------------------------------------- #
cdef inline const Py_ssize_t* first_of(const Py_ssize_t[::1] table):
    # An empty table (no tap lands anywhere along a dim) is never indexed.
    return &table[0] if table.shape[0] else NULL


cdef Tables make_tables(tuple tables):
    """Pointers into the arrays of ``tables`` (built by ``_plan``; they outlive the call)."""
    cdef Tables t
    t.map0, t.map1, t.map2 = first_of(tables[0]), first_of(tables[1]), first_of(tables[2])
    t.start0, t.tap0, t.cell0 = first_of(tables[3]), first_of(tables[4]), first_of(tables[5])
    t.start1, t.tap1, t.cell1 = first_of(tables[6]), first_of(tables[7]), first_of(tables[8])
    t.first_w, t.last_w, t.offset_w = first_of(tables[9]), first_of(tables[10]), first_of(tables[11])
    return t


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
def scatter(const floating[::1] grid_in, const floating[::1] weight, const floating[::1] bias,
            bint has_bias, floating[::1] out, floating[::1] cols, floating[::1] work,
            tuple image, tuple grid, tuple kernel, Py_ssize_t stride_w,
            Py_ssize_t n, Py_ssize_t groups, Py_ssize_t p, Py_ssize_t q, tuple tables,
            Py_ssize_t chunk_samples, Py_ssize_t chunk_channels, Py_ssize_t chunk_cells,
            Py_ssize_t fold, Py_ssize_t tile, Py_ssize_t per_thread, int threads):
    """col2im: ``out[n, gQ+q] = bias + sum W[gP+p, q, tap] X[n, gP+p, cell]`` over landings.

    ``grid_in`` (N, G*P, L), ``weight`` (G*P, Q, K), ``out`` (N, G*Q, I), all
    flat. ``cols`` holds one chunk, laid out ``[group][channel * K + tap]
    [sample * chunk_cells + cell]``; ``work`` holds ``threads`` packing
    buffers of ``per_thread`` elements (used when samples are folded).
    """
    cdef Sizes s = make_sizes(image, grid, kernel, stride_w)
    cdef Tables t = make_tables(tables)
    cdef Py_ssize_t K = s.taps, L = s.grid_cells, I = s.image_cells
    cdef Py_ssize_t lines_per_channel = s.image[0] * s.image[1], I1 = s.image[1], I2 = s.image[2]
    cdef Py_ssize_t sample0, ns, q0, nq, cell0, nc, ld, tiles, task, gi, lda, qi, line
    cdef Py_ssize_t channel, line_in_channel, sample, rest
    cdef Tile tl
    cdef const floating* x = &grid_in[0]
    cdef const floating* w = &weight[0]
    cdef const floating* operand
    cdef floating* y = &out[0]
    cdef floating* c = &cols[0]
    cdef floating* buf
    cdef floating zero = 0

    with nogil:
        # Chunks run one after the other; each is a GEMM phase then a col2im phase.
        sample0 = 0
        while sample0 < n:
            ns = min(chunk_samples, n - sample0)
            q0 = 0
            while q0 < q:
                nq = min(chunk_channels, q - q0)
                cell0 = 0
                while cell0 < L:
                    nc = min(chunk_cells, L - cell0)
                    ld = ns * nc
                    tiles = tile_count(ns, nc, fold, tile)
                    # GEMM phase: each task owns the columns of one (group, tile).
                    for task in prange(groups * tiles, num_threads=threads, schedule="dynamic"):
                        gi = task // tiles
                        tl = tile_at(task % tiles, sample0, ns, cell0, nc, fold, tile)
                        if tl.samples > 1:
                            buf = &work[0] + threadid() * per_thread
                            pack_rows(x + gi * p * L, groups * p * L, p, L, &tl, buf)
                            operand = buf
                            lda = tl.width
                        else:
                            operand = x + (tl.sample * groups + gi) * p * L + tl.cell
                            lda = L
                        # Column-major view: X (P x cells, row-major) is the col-major
                        # (cells x P) matrix; W_g (P x Q*K, row-major) is col-major
                        # (Q*K x P), transposed, from row q0*K. C = cols^T: col-major
                        # (width x nq*K), ld = the chunk's folded width.
                        gemm(c'N', c'T', tl.width, nq * K, p, operand, lda,
                             w + gi * p * q * K + q0 * K, q * K, zero,
                             c + gi * nq * K * ld + (tl.sample - sample0) * nc + (tl.cell - cell0), ld)
                    # col2im phase: each task owns one output line.
                    # (lines are short: hand them out 16 at a time)
                    for line in prange(ns * groups * nq * lines_per_channel, num_threads=threads,
                                       schedule="dynamic", chunksize=16):
                        channel = line // lines_per_channel      # (sample, group, channel) of the chunk
                        line_in_channel = line % lines_per_channel
                        sample = channel // (groups * nq)
                        rest = channel % (groups * nq)           # group * nq + channel in block
                        gi = rest // nq
                        qi = q0 + rest % nq
                        col2im_line(c + rest * K * ld + sample * nc, ld, cell0, cell0 + nc,
                                    y + (((sample0 + sample) * groups + gi) * q + qi) * I
                                    + line_in_channel * I2,
                                    cell0 == 0,
                                    bias[gi * q + qi] if has_bias else zero,
                                    line_in_channel // I1, line_in_channel % I1, &s, &t)
                    cell0 += nc
                q0 += nq
            sample0 += ns


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
def scatter_direct(const floating[::1] grid_in, const floating[::1] weight,
                   const floating[::1] bias, bint has_bias, floating[::1] out, floating[::1] work,
                   tuple image, tuple grid, tuple kernel, Py_ssize_t stride_w,
                   Py_ssize_t n, Py_ssize_t groups, Py_ssize_t p, Py_ssize_t q, tuple tables,
                   Py_ssize_t block, Py_ssize_t fold, Py_ssize_t tile, Py_ssize_t per_thread,
                   bint interleaved, bint exact_cover, bint phased, int threads):
    """col2im with tasks that own their outputs: (group, samples, block of channels).

    Each task walks its column tiles in order: one GEMM into its own buffer
    (``block`` channels x K rows), then adds the buffer into its own output
    channels while it is in cache. No shared buffer, no phase barrier; used
    when the shape gives enough such tasks (see ``_plan.scatter_plan``).
    ``work`` holds ``threads`` buffers of ``per_thread`` elements.
    ``interleaved`` (folded tasks): columns sample-minor, summed in an
    accumulator after the packed operand, stored once at the end.
    ``exact_cover`` (not with ``interleaved``): taps cover the image once, so
    col2im writes bias + term and the outputs are not filled first.
    ``phased`` (whole-sample tiles, sample-major): col2im through a phase-major
    accumulator after the packed operand (``col2im_phased_tile``), no fill either.
    """
    cdef Sizes s = make_sizes(image, grid, kernel, stride_w)
    cdef Tables t = make_tables(tables)
    cdef Py_ssize_t K = s.taps, L = s.grid_cells, I = s.image_cells
    cdef Py_ssize_t blocks = (q + block - 1) // block
    cdef Py_ssize_t sample_tiles = tile_count(n, L, fold, L) if fold > 1 else n
    cdef Py_ssize_t col_tiles = 1 if fold > 1 else (L + tile - 1) // tile
    cdef Py_ssize_t task, gi, unit, q0, nq, first, samples, index, i, c, x_i, lda
    cdef Tile tl
    cdef const floating* x = &grid_in[0]
    cdef const floating* w = &weight[0]
    cdef const floating* operand
    cdef floating* y = &out[0]
    cdef floating* buf
    cdef floating* packed
    cdef floating* acc
    cdef floating* dst
    cdef floating value, zero = 0

    with nogil:
        for task in prange(groups * sample_tiles * blocks, num_threads=threads, schedule="dynamic"):
            buf = &work[0] + threadid() * per_thread
            gi = task // (sample_tiles * blocks)
            unit = (task // blocks) % sample_tiles
            q0 = (task % blocks) * block
            nq = min(block, q - q0)
            first = unit * fold if fold > 1 else unit
            samples = min(fold, n - first) if fold > 1 else 1
            if interleaved:  # one folded tile: GEMM, col2im into the accumulator, store
                tl = tile_at(unit, 0, n, 0, L, fold, L)
                packed = buf + nq * K * tl.width
                acc = packed + p * tl.width
                pack_interleaved(x + gi * p * L, groups * p * L, p, L, L, tl.sample, tl.samples, packed, tl.width)
                # the GEMM below, on sample-minor columns
                gemm(c'N', c'T', tl.width, nq * K, p, packed, tl.width,
                     w + gi * p * q * K + q0 * K, q * K, zero, buf, tl.width)
                for c in range(nq):
                    value = bias[gi * q + q0 + c] if has_bias else zero
                    for x_i in range(I * samples):
                        acc[c * I * samples + x_i] = value
                col2im_add_interleaved(buf, nq, &tl, acc, &s, &t)
                store_interleaved(acc, nq * I, samples, y + ((first * groups + gi) * q + q0) * I,
                                  groups * q * I)
                continue
            # the task's outputs start at bias (or zero), unless col2im writes them all
            for i in range(samples if not (exact_cover or phased) else 0):
                for c in range(nq):
                    value = bias[gi * q + q0 + c] if has_bias else zero
                    dst = y + (((first + i) * groups + gi) * q + q0 + c) * I
                    for x_i in range(I):
                        dst[x_i] = value
            for index in range(col_tiles):
                if fold > 1:
                    tl = tile_at(unit, 0, n, 0, L, fold, L)
                else:
                    tl = tile_at(unit * col_tiles + index, 0, n, 0, L, 1, tile)
                packed = buf + nq * K * tl.width
                if tl.samples > 1:
                    pack_rows(x + gi * p * L, groups * p * L, p, L, &tl, packed)
                    operand = packed
                    lda = tl.width
                else:
                    operand = x + (tl.sample * groups + gi) * p * L + tl.cell
                    lda = L
                # Column-major view: X (P x cells, row-major) is col-major (cells x P);
                # W_g (P x Q*K, row-major) is col-major (Q*K x P), transposed, from row
                # q0*K. C = cols^T: col-major (width x nq*K) = row-major (nq*K x width).
                gemm(c'N', c'T', tl.width, nq * K, p, operand, lda,
                     w + gi * p * q * K + q0 * K, q * K, zero, buf, tl.width)
                if phased:
                    col2im_phased_tile(buf, nq, &tl, y + ((tl.sample * groups + gi) * q + q0) * I,
                                       groups * q * I, &s, &t, &bias[gi * q + q0] if has_bias else NULL,
                                       packed + (p * tl.width if tl.samples > 1 else 0))
                    continue
                col2im_add_tile(buf, nq, &tl, y + ((tl.sample * groups + gi) * q + q0) * I,
                                groups * q * I, &s, &t, exact_cover,
                                &bias[gi * q + q0] if has_bias and exact_cover else NULL)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
def gather(const floating[::1] image_in, const floating[::1] weight, const floating[::1] bias,
           bint has_bias, floating[::1] out, floating[::1] work,
           tuple image, tuple grid, tuple kernel, Py_ssize_t n, Py_ssize_t groups, Py_ssize_t p,
           Py_ssize_t q, tuple tables, Py_ssize_t fold, Py_ssize_t tile, Py_ssize_t rows,
           Py_ssize_t per_thread, bint interleaved, int threads):
    """im2col: ``out[n, gQ+q, cell] = bias + sum W[gQ+q, p, tap] X[n, gP+p, image(cell, tap)]``.

    ``image_in`` (N, G*P, I), ``weight`` (G*Q, P, K), ``out`` (N, G*Q, L);
    ``work`` holds ``threads`` buffers of ``per_thread`` elements: the im2col
    tile (``rows`` x width) and, when samples are folded, the GEMM result
    and (``interleaved``: columns sample-minor) the tile's packed image.
    """
    cdef Sizes s = make_sizes(image, grid, kernel, 1)
    cdef Tables t = make_tables(tables)
    cdef Py_ssize_t K = s.taps, L = s.grid_cells, I = s.image_cells, PK = p * K
    cdef Py_ssize_t tiles = tile_count(n, L, fold, tile)
    cdef Py_ssize_t task, gi, block, row0, nrows, qi, j, i, ldc
    cdef Tile tl
    cdef const floating* x = &image_in[0]
    cdef const floating* w = &weight[0]
    cdef floating* y = &out[0]
    cdef floating* buf
    cdef floating* result
    cdef floating* packed_image
    cdef floating* dst
    cdef floating beta, value
    cdef bint in_place

    with nogil:
        for task in prange(groups * tiles, num_threads=threads, schedule="dynamic"):
            gi = task // tiles
            tl = tile_at(task % tiles, 0, n, 0, L, fold, tile)
            buf = &work[0] + threadid() * per_thread
            # folded (or interleaved: its last tile may hold one sample): GEMM into a
            # buffer, then unpack; else in place
            in_place = tl.samples == 1 and not interleaved
            if not in_place:
                result = buf + rows * tl.width
                ldc = tl.width
                if interleaved:
                    packed_image = result + q * tl.width
                    pack_interleaved(x + gi * p * I, groups * p * I, p, I, I, tl.sample, tl.samples,
                                     packed_image, I * tl.samples)
            else:
                result = y + (tl.sample * groups + gi) * q * L + tl.cell   # in place
                ldc = L
                if has_bias:
                    for qi in range(q):
                        value = bias[gi * q + qi]
                        for j in range(tl.width):
                            result[qi * L + j] = value
            for block in range((PK + rows - 1) // rows):
                row0 = block * rows
                nrows = min(rows, PK - row0)
                if interleaved:
                    im2col_rows_interleaved(packed_image, 0, row0, nrows, tl.samples, buf, tl.width, &s, &t)
                else:
                    im2col_tile(x + gi * p * I, groups * p * I, row0, nrows, &tl, buf, &s, &t)
                beta = 1 if (row0 > 0 or (has_bias and in_place)) else 0
                # Column-major view: the tile (nrows x width, row-major) is col-major
                # (width x nrows); W_g (Q x P*K, row-major) is col-major (P*K x Q), from
                # row row0. C = out^T: col-major (width x Q).
                gemm(c'N', c'N', tl.width, q, nrows, buf, tl.width,
                     w + gi * q * PK + row0, PK, beta, result, ldc)
            if not in_place:
                for i in range(tl.samples):
                    for qi in range(q):
                        value = bias[gi * q + qi] if has_bias else 0
                        dst = y + ((tl.sample + i) * groups + gi) * q * L + qi * L
                        if interleaved:
                            for j in range(L):
                                dst[j] = result[qi * tl.width + j * tl.samples + i] + value
                        else:
                            for j in range(L):
                                dst[j] = result[qi * tl.width + i * L + j] + value


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
def weight_grad(const floating[::1] image_in, const floating[::1] grid_in, floating[::1] out,
                floating[::1] work, tuple image, tuple grid, tuple kernel, Py_ssize_t n,
                Py_ssize_t groups, Py_ssize_t p, Py_ssize_t q, tuple tables,
                Py_ssize_t rows, Py_ssize_t fold, Py_ssize_t tile, Py_ssize_t per_thread,
                bint interleaved, int threads):
    """``gw[gQ+q, p, tap] = sum_n sum_cell dY[n, gQ+q, cell] X[n, gP+p, image(cell, tap)]``.

    ``image_in`` (N, G*P, I), ``grid_in`` (N, G*Q, L), ``out`` (G*Q, P, K);
    ``work`` holds ``threads`` buffers of ``per_thread`` elements: the im2col
    tile (``rows`` x width) and, when samples are folded, the packed dY and
    (``interleaved``: columns sample-minor) the image channels of the rows.
    """
    cdef Sizes s = make_sizes(image, grid, kernel, 1)
    cdef Tables t = make_tables(tables)
    cdef Py_ssize_t K = s.taps, L = s.grid_cells, I = s.image_cells, PK = p * K
    cdef Py_ssize_t blocks = (PK + rows - 1) // rows
    cdef Py_ssize_t tiles = tile_count(n, L, fold, tile)
    cdef Py_ssize_t task, gi, row0, nrows, index, ldb, p0, p1
    cdef Tile tl
    cdef const floating* x = &image_in[0]
    cdef const floating* dy = &grid_in[0]
    cdef const floating* operand
    cdef floating* gw = &out[0]
    cdef floating* buf
    cdef floating* packed_image
    cdef floating beta

    with nogil:
        for task in prange(groups * blocks, num_threads=threads, schedule="dynamic"):
            buf = &work[0] + threadid() * per_thread
            gi = task // blocks
            row0 = (task % blocks) * rows
            nrows = min(rows, PK - row0)
            for index in range(tiles):   # in order: the sum over tiles is reproducible
                tl = tile_at(index, 0, n, 0, L, fold, tile)
                if interleaved:  # the channels p0 .. p1 - 1 this task's rows read
                    p0 = row0 // K
                    p1 = (row0 + nrows - 1) // K + 1
                    packed_image = buf + (nrows + q) * tl.width
                    pack_interleaved(x + (gi * p + p0) * I, groups * p * I, p1 - p0, I, I,
                                     tl.sample, tl.samples, packed_image, I * tl.samples)
                    im2col_rows_interleaved(packed_image, p0, row0, nrows, tl.samples, buf, tl.width, &s, &t)
                    pack_interleaved(dy + gi * q * L, groups * q * L, q, L, L, tl.sample, tl.samples,
                                     buf + nrows * tl.width, tl.width)
                    operand = buf + nrows * tl.width
                    ldb = tl.width
                elif tl.samples > 1:
                    im2col_tile(x + gi * p * I, groups * p * I, row0, nrows, &tl, buf, &s, &t)
                    pack_rows(dy + gi * q * L, groups * q * L, q, L, &tl, buf + nrows * tl.width)
                    operand = buf + nrows * tl.width
                    ldb = tl.width
                else:
                    im2col_tile(x + gi * p * I, groups * p * I, row0, nrows, &tl, buf, &s, &t)
                    operand = dy + (tl.sample * groups + gi) * q * L + tl.cell
                    ldb = L
                beta = 0 if index == 0 else 1
                # Column-major view: C = gw_g^T, col-major (P*K x Q) from row row0. The
                # tile (nrows x width, row-major) is col-major (width x nrows), transposed;
                # dY (Q x cells, row-major) is col-major (cells x Q).
                gemm(c'T', c'N', nrows, q, tl.width, buf, tl.width, operand, ldb,
                     beta, gw + gi * q * PK + row0, PK)

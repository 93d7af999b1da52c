# cython: language_level=3
"""Compiled kernels of the ``blas`` backend: im2col gather, col2im scatter, BLAS GEMM.

Every primitive walks the problem in *tiles*: a tile is ``nt`` samples times
the grid columns ``[l0, l0 + lt)`` of each (either a slice of one sample, or
several whole samples folded together so that small images still give the
GEMM a wide operand). Per tile and group, one GEMM produces or consumes a
column buffer of ``rows x tile_cols`` elements, which is scattered into the
output (or gathered from the input) right away, while it is still in cache.
The work buffers are sized by the plan the Python side computed (bounded,
whatever the batch) and carved from a buffer cached per thread, so
concurrent calls share nothing and repeated calls allocate nothing.

Arguments arrive validated (``tconv._args``) and planned
(``tconv._blas_backend``): C-contiguous 5-D arrays ``(N, C, D, H, W)``,
plain ints, tiles that fit the arrays. The kernels do not re-check them,
which is why bounds checks are off. The ``def`` kernels take typed
memoryviews; the transposed convolution, planned once per shape as a
``ScatterCall``, takes the arrays' data pointers after checking dtype, order
and size (a layer called in a loop pays that on every call).
"""

import os
import threading

import numpy as np

cimport cython
cimport numpy as cnp
from cython cimport floating
from libc.string cimport memset, memcpy
from cpython.pyport cimport PY_SSIZE_T_MAX, PY_SSIZE_T_MIN
from scipy.linalg cimport cython_blas

cnp.import_array()


cdef struct Geom:
    # Spatial sizes, (D, H, W) each, and the index map
    # image = grid * stride - pad + tap * dilation.
    Py_ssize_t image[3]
    Py_ssize_t grid[3]
    Py_ssize_t kernel[3]
    Py_ssize_t stride[3]
    Py_ssize_t dilation[3]
    Py_ssize_t pad[3]
    Py_ssize_t image_cells   # prod(image)
    Py_ssize_t grid_cells    # prod(grid), "L"
    Py_ssize_t taps          # prod(kernel), "K"


cdef struct Tile:
    Py_ssize_t n0, nt        # samples n0 .. n0 + nt - 1
    Py_ssize_t l0, lt        # grid columns l0 .. l0 + lt - 1 of each sample
    Py_ssize_t cols          # nt * lt, the GEMM's tile width


cdef struct Row:
    # One run of a tile's columns along the grid's last dim: grid cells
    # (d, h, lw0 .. lw1 - 1) of each sample n0 + s of the tile, at tile column
    # s * lt + j0 + lw. Every sample of a tile has the same runs.
    Py_ssize_t d, h, lw0, lw1, j0


cdef enum:
    MAX_BANDS = 16


cdef struct Bands:
    # Where a 2-D kernel's border rows miss: grid rows [row_end[b-1], row_end[b])
    # (row_end[-1] = 0) meet kernel rows kh_lo[b] .. kh_hi[b] - 1 only. With the
    # column buffer's rows kernel-row-major (``column_row``), those kernel rows are
    # one block of rows, so a sample-minor tile's GEMMs skip the taps that fall
    # on padding: whole products of zeros (DCGAN 256->128, 8x8 grid: 12% of them).
    Py_ssize_t n
    Py_ssize_t row_end[MAX_BANDS]
    Py_ssize_t kh_lo[MAX_BANDS]
    Py_ssize_t kh_hi[MAX_BANDS]


cdef Geom make_geom(tuple image, tuple grid, tuple kernel, tuple stride, tuple dilation, tuple pad):
    cdef Geom g
    cdef int d
    for d in range(3):
        g.image[d] = image[d]
        g.grid[d] = grid[d]
        g.kernel[d] = kernel[d]
        g.stride[d] = stride[d]
        g.dilation[d] = dilation[d]
        g.pad[d] = pad[d]
    g.image_cells = g.image[0] * g.image[1] * g.image[2]
    g.grid_cells = g.grid[0] * g.grid[1] * g.grid[2]
    g.taps = g.kernel[0] * g.kernel[1] * g.kernel[2]
    return g


# --------------------------------------------------------------------------- #
# BLAS
# --------------------------------------------------------------------------- #
# The Fortran-ABI sgemm_ / dgemm_ every BLAS product goes through: SciPy's
# (``scipy.linalg.cython_blas``), unless ``use_blas`` pointed them at another
# OpenBLAS (``tconv._blas_library`` does, once, when tconv loads).
ctypedef void sgemm_t(char* transa, char* transb, int* m, int* n, int* k, float* alpha, float* a, int* lda,
                      float* b, int* ldb, float* beta, float* c, int* ldc) noexcept nogil
ctypedef void dgemm_t(char* transa, char* transb, int* m, int* n, int* k, double* alpha, double* a, int* lda,
                      double* b, int* ldb, double* beta, double* c, int* ldc) noexcept nogil

cdef sgemm_t* blas_sgemm = cython_blas.sgemm
cdef dgemm_t* blas_dgemm = cython_blas.dgemm


def use_blas(size_t sgemm_address=0, size_t dgemm_address=0):
    """Route every BLAS GEMM of the core through the ``sgemm_`` and ``dgemm_`` at these
    addresses (Fortran calling convention, 32-bit ints: an LP64 OpenBLAS's, or
    SciPy's), or back to SciPy's ``cython_blas`` where an address is 0. Not while a
    call runs: set once, before any."""
    global blas_sgemm, blas_dgemm
    blas_sgemm = <sgemm_t*>sgemm_address if sgemm_address else cython_blas.sgemm
    blas_dgemm = <dgemm_t*>dgemm_address if dgemm_address else cython_blas.dgemm


def blas_addresses():
    """The addresses of the ``sgemm_`` and ``dgemm_`` the core calls (SciPy's own are
    ``cython_blas``'s wrappers)."""
    return <size_t>blas_sgemm, <size_t>blas_dgemm


@cython.boundscheck(False)
@cython.wraparound(False)
def blas_matmul(const floating[::1, :] a, const floating[::1, :] b, floating[::1, :] c):
    """``c = a @ b`` (Fortran-ordered, shapes checked by the caller) through the core's
    BLAS: the GEMM the benchmark's peak is measured with."""
    cdef floating one = 1, zero = 0
    with nogil:
        gemm(c'N', c'N', c.shape[0], c.shape[1], a.shape[1], one, &a[0, 0], a.shape[0],
             &b[0, 0], b.shape[0], zero, &c[0, 0], c.shape[0])


cdef inline void gemm(char transa, char transb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                      floating alpha, const floating* a, Py_ssize_t lda,
                      const floating* b, Py_ssize_t ldb, floating beta,
                      floating* c, Py_ssize_t ldc) noexcept nogil:
    """C = alpha op(A) op(B) + beta C, in BLAS's column-major terms.

    The plan keeps every size and leading dimension below 2**31 (BLAS's int).
    """
    cdef int im = <int>m, i_n = <int>n, ik = <int>k
    cdef int ilda = <int>lda, ildb = <int>ldb, ildc = <int>ldc
    if floating is float:
        blas_sgemm(&transa, &transb, &im, &i_n, &ik, &alpha, <float*>a, &ilda,
              <float*>b, &ildb, &beta, c, &ildc)
    else:
        blas_dgemm(&transa, &transb, &im, &i_n, &ik, &alpha, <double*>a, &ilda,
              <double*>b, &ildb, &beta, c, &ildc)


cdef extern from "_small_gemm.h" nogil:
    int tconv_small_gemm_ready()
    void tconv_sgemm_nn(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t a_row,
                        Py_ssize_t a_col, const float* b, Py_ssize_t ldb, float* c, Py_ssize_t ldc,
                        const float* row_init, int accumulate)
    void tconv_sgemm_nn_rows(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t a_row,
                             Py_ssize_t a_col, const float* b, Py_ssize_t ldb, float* c, Py_ssize_t ldc,
                             const float* row_init, int accumulate)

cdef extern from *:
    """
    /* The BLAS threads the calling thread's last call was given (set_gemm_threads):
       per thread, since several Python threads, and the openmp plugin's pool, run
       the core side by side at different counts. */
    #if defined(_MSC_VER)
    static __declspec(thread) int tconv_gemm_threads_ = 1;
    #else
    static _Thread_local int tconv_gemm_threads_ = 1;
    #endif
    static int tconv_gemm_threads(void) { return tconv_gemm_threads_; }
    static void tconv_set_gemm_threads(int n) { tconv_gemm_threads_ = n; }
    """
    int tconv_gemm_threads() noexcept nogil
    void tconv_set_gemm_threads(int n) noexcept nogil


def set_gemm_threads(int n):
    """The BLAS threads this thread's calls are given (the ``blas`` backend says so before
    each call). Above 1 the large float32 products stay with BLAS, which threads them,
    instead of the unpacked kernel, which runs on the calling thread alone."""
    tconv_set_gemm_threads(n)


# Whether the unpacked kernels of ``_small_gemm.h`` are used: the CPU runs them
# (AVX-512F) and ``TCONV_SMALL_GEMM=0`` did not turn them off (then every GEMM
# is BLAS's). Read once, when the module loads.
cdef bint small_gemm_ready = tconv_small_gemm_ready() and os.environ.get("TCONV_SMALL_GEMM", "1") != "0"


def small_gemm_available():
    """Whether the unpacked float32 GEMMs of ``_small_gemm.h`` are used (AVX-512F, not turned off)."""
    return bool(small_gemm_ready)


@cython.boundscheck(False)
@cython.wraparound(False)
def small_gemm(const float[:, :] a, const float[:, :] b, float[:, :] c, bint a_transposed,
               bint accumulate, bint through_blas=False, const float[::1] row_init=None,
               bint rows_outer=False):
    """Row-major ``c (=|+=) a @ b`` (``a_transposed``: ``a.T @ b``; ``row_init``: ``c =
    row_init[:, None] + a @ b``) by the unpacked kernel (its row-blocks-outside driver
    with ``rows_outer``), or by BLAS (``through_blas``): the twins the tests and the
    tuning compare. The caller checks the shapes (and ``small_gemm_available()``, for
    the kernel)."""
    # (rows may be strided: each matrix's leading dimension is its row stride)
    if a.strides[1] != sizeof(float) or b.strides[1] != sizeof(float) or c.strides[1] != sizeof(float):
        raise ValueError("small_gemm: each matrix's rows must be contiguous")
    cdef Py_ssize_t m = c.shape[0], n = c.shape[1], k = b.shape[0]
    cdef Py_ssize_t lda = a.strides[0] // sizeof(float), ldb = b.strides[0] // sizeof(float)
    cdef Py_ssize_t ldc = c.strides[0] // sizeof(float)
    cdef const float* init = &row_init[0] if row_init is not None else NULL
    with nogil:
        if through_blas:
            blas_gemm_rows(m, n, k, &a[0, 0], lda, a_transposed, &b[0, 0], ldb, init, accumulate, &c[0, 0], ldc)
        elif rows_outer:
            tconv_sgemm_nn_rows(m, n, k, &a[0, 0], 1 if a_transposed else lda, lda if a_transposed else 1,
                                &b[0, 0], ldb, &c[0, 0], ldc, init, accumulate)
        else:
            tconv_sgemm_nn(m, n, k, &a[0, 0], 1 if a_transposed else lda, lda if a_transposed else 1,
                           &b[0, 0], ldb, &c[0, 0], ldc, init, accumulate)


cdef enum:
    # The unpacked kernel runs a row-major product C (M x N) = A (M x K) B (K x N)
    # where A has SMALL_GEMM_MIN_A to SMALL_GEMM_MAX_A elements (it stays in the
    # L1 cache beside the kernel's 48-column panel of B) and K <= SMALL_GEMM_MAX_K.
    # Against OpenBLAS's sgemm, 1 thread, N = 1024, beta 0, medians of 9: M 32-64
    # x K 48-288 and M 48-144 x K 32-64 (A transposed) x1.2-2.7 (M 64 K 48:
    # 83 -> 45 us; M 32 K 144: 163 -> 103; M 144 K 32: 133 -> 95); larger A
    # (M 96-256 x K 64-144) x0.9-1.16; K >= 1024 x0.5-0.84 (B's panel leaves L1);
    # M 16 K 32 x0.83. (Figures from before the full edge blocks below.)
    SMALL_GEMM_MIN_A = 1024
    SMALL_GEMM_MAX_A = 8192
    SMALL_GEMM_MAX_K = 512
    # ... and where the product only streams memory: a reduction of at most
    # STREAM_GEMM_MAX_K, at most STREAM_GEMM_MAX_M rows, at least STREAM_GEMM_MIN_N
    # columns (a 1x1 convolution of few channels over a large image). There
    # OpenBLAS copies all of B before multiplying, and the kernel writes C once,
    # bias included: M 8 K 4 (the 1x1 image convolution's tiles) N 65536 257 ->
    # 116 us, N 262144 1281 -> 634 us; M 64 K 16 N 16384 803 -> 530 us; M 8 K 4
    # N 16384 32 -> 29 us, N 4096 5.9 -> 6.9 us (hence the bound).
    STREAM_GEMM_MAX_K = 16
    STREAM_GEMM_MAX_M = 64
    STREAM_GEMM_MIN_N = 16384
    # ... and, where this thread's BLAS has one thread (``set_gemm_threads``: the
    # kernel runs on the caller's alone), every product at least KERNEL_MIN_COLUMNS
    # wide, its A (if transposed) of at most KERNEL_MAX_A elements (4 MiB). (At 2
    # threads, interleaved A/B, threaded BLAS -> the kernel: the blas backend's
    # DCGAN 256->128 28.4 -> 50.1 ms forward, 51.0 -> 96.7 backward.) Since C's right
    # edge takes full blocks of 16 or 32 columns (before, one masked kernel several
    # times slower), the kernel beats OpenBLAS 0.3.34 on the large products im2col
    # makes too, no packing; 1 thread, interleaved medians of 7, GFLOP/s OpenBLAS -> kernel:
    # M 256 N 512 K 2048 (DCGAN 256->128's input gradient) 92 -> 105, M 2048 N 256
    # K 512 (its weight gradient, as cols @ dY^T) 101 -> 112, M 1024 N 128 K 512
    # 101 -> 115, M 8 N 1024 K 2048 30 -> 91, M 32 N 1024 K 1024 69 -> 104; N 17
    # (a tiny product) lost, 54 -> 41. A larger A is taken in chunks of K that stay
    # in L2 (``_small_gemm.h``: read whole, an 8 MiB A streamed from L3 once a
    # panel, and DCGAN 512->256's backward lost 3% at 2 threads; in chunks, A/B
    # OpenBLAS -> kernel 1 thread 85.0 -> 85.3 ms, 2 threads 44.8 -> 43.4), but
    # not a transposed one: that forward's 4096 x 512 A lost 11% (49.9 -> 56.1).
    # Rows outside (``tconv_sgemm_nn_rows``) where B, K x N, is at most
    # ROWS_OUTER_MAX_B elements (512 KiB: it stays in L2 while each row block
    # sweeps it), and A is not transposed: GFLOP/s columns outside -> rows outside,
    # M 4096 N 512 K 256 96 -> 106, M 256 N 1024 K 64 96 -> 105.
    KERNEL_MIN_COLUMNS = 32
    KERNEL_MAX_A = 1 << 20
    ROWS_OUTER_MAX_B = 1 << 17


cdef inline bint streams(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Whether a float32 product only streams memory through the unpacked kernel."""
    return small_gemm_ready and k <= STREAM_GEMM_MAX_K and m <= STREAM_GEMM_MAX_M and n >= STREAM_GEMM_MIN_N


cdef inline bint unpacked_wins(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, bint a_transposed) noexcept nogil:
    """Whether ``gemm_rows`` runs a float32 product by the unpacked kernel."""
    if not small_gemm_ready:
        return False
    if streams(m, n, k) or k <= SMALL_GEMM_MAX_K and SMALL_GEMM_MIN_A <= m * k <= SMALL_GEMM_MAX_A:
        return True
    return (n >= KERNEL_MIN_COLUMNS and (m * k <= KERNEL_MAX_A or not a_transposed)
            and tconv_gemm_threads() == 1)


cdef void sgemm_rows(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda, int a_transposed,
                     const float* b, Py_ssize_t ldb, int accumulate, float* c, Py_ssize_t ldc) noexcept nogil:
    """``gemm_rows`` in float32 without a bias, as a plain C function for a plugin's tasks."""
    gemm_rows(m, n, k, a, lda, a_transposed, b, ldb, NULL, accumulate, c, ldc)


def sgemm_rows_address():
    """The address of the core's float32 ``gemm_rows`` (C, row-major: ``void (Py_ssize_t m,
    Py_ssize_t n, Py_ssize_t k, const float* a, Py_ssize_t lda, int a_transposed, const
    float* b, Py_ssize_t ldb, int accumulate, float* c, Py_ssize_t ldc)``): a plugin's
    GEMMs then take the unpacked kernel where the core would, and the core's BLAS
    elsewhere."""
    return <size_t>&sgemm_rows


def unpacked_gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, bint a_transposed=False):
    """Whether ``gemm_rows`` runs a float32 product C (m x n) = A (m x k) B (k x n) by the
    unpacked kernel (``KERNEL_MIN_COLUMNS``) rather than BLAS."""
    return bool(unpacked_wins(m, n, k, a_transposed))


def streams_unpacked(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k):
    """Whether a float32 product C (m x n) = A (m x k) B (k x n) only streams memory
    through the unpacked kernel (``STREAM_GEMM_MAX_K``): a 1x1 convolution of few
    channels over a large image, which more threads barely speed up."""
    return bool(streams(m, n, k))


cdef inline void gemm_rows(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
                           bint a_transposed, const floating* b, Py_ssize_t ldb, const floating* row_init,
                           bint accumulate, floating* c, Py_ssize_t ldc) noexcept nogil:
    """Row-major ``C (m x n) = A (m x k) @ B (k x n)``, plus ``row_init[i]`` on row ``i``
    when given (a bias), or ``+=`` with ``accumulate`` (not both); ``A`` is row-major
    with row stride ``lda``, or (``a_transposed``) the transpose of a row-major (k x m)
    matrix with row stride ``lda``. The unpacked kernel where it wins
    (``KERNEL_MIN_COLUMNS``, ``SMALL_GEMM_MAX_A``, ``STREAM_GEMM_MAX_K``), else BLAS."""
    if floating is float and unpacked_wins(m, n, k, a_transposed):
        if not a_transposed and k * n <= ROWS_OUTER_MAX_B:
            tconv_sgemm_nn_rows(m, n, k, <const float*>a, lda, 1, <const float*>b, ldb, <float*>c, ldc,
                                <const float*>row_init, accumulate)
        else:
            tconv_sgemm_nn(m, n, k, <const float*>a, 1 if a_transposed else lda, lda if a_transposed else 1,
                           <const float*>b, ldb, <float*>c, ldc, <const float*>row_init, accumulate)
    else:
        blas_gemm_rows(m, n, k, a, lda, a_transposed, b, ldb, row_init, accumulate, c, ldc)


cdef inline void blas_gemm_rows(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const floating* a, Py_ssize_t lda,
                                bint a_transposed, const floating* b, Py_ssize_t ldb, const floating* row_init,
                                bint accumulate, floating* c, Py_ssize_t ldc) noexcept nogil:
    """``gemm_rows`` by BLAS (``row_init`` filled in first, then added to)."""
    cdef floating one = 1, zero = 0
    cdef Py_ssize_t i
    if row_init != NULL:
        for i in range(m):  # (rows ldc apart: one channel of n cells at a time)
            fill_channels(c + i * ldc, 1, n, row_init + i, True)
    # Column-major: C^T (n x m) = B^T (n x k) A^T (k x m); a row-major matrix is
    # its own transpose in column-major terms, with the same leading dim.
    gemm(c'N', c'T' if a_transposed else c'N', n, m, k, one, b, ldb, a, lda,
         one if accumulate or row_init != NULL else zero, c, ldc)


# --------------------------------------------------------------------------- #
# index helpers
# --------------------------------------------------------------------------- #
@cython.cdivision(True)
cdef inline Py_ssize_t floor_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """Floor division for b > 0 (C's / truncates towards zero)."""
    cdef Py_ssize_t q = a / b
    if (a % b != 0) and (a < 0):
        q -= 1
    return q


cdef struct Tap:
    # Where one kernel tap lands: grid cells first[d] .. last[d] of dim d land
    # inside the image, cell l at image index l * stride[d] + offset[d]
    # (first > last where none does).
    Py_ssize_t first[3]
    Py_ssize_t last[3]
    Py_ssize_t offset[3]


@cython.cdivision(True)
cdef inline void tap_at(const Geom* g, Py_ssize_t k, Tap* tap) noexcept nogil:
    """The landing of kernel tap ``k`` (row-major over (kd, kh, kw))."""
    cdef Py_ssize_t index[3]
    cdef int d
    index[2] = k % g.kernel[2]
    index[1] = (k // g.kernel[2]) % g.kernel[1]
    index[0] = k // (g.kernel[2] * g.kernel[1])
    for d in range(3):
        tap.offset[d] = index[d] * g.dilation[d] - g.pad[d]
        tap.first[d] = -floor_div(tap.offset[d], g.stride[d])  # ceil(-offset / stride)
        if tap.first[d] < 0:
            tap.first[d] = 0
        tap.last[d] = floor_div(g.image[d] - 1 - tap.offset[d], g.stride[d])
        if tap.last[d] > g.grid[d] - 1:
            tap.last[d] = g.grid[d] - 1


cdef inline bint tap_misses_row(const Tap* tap, Py_ssize_t ld, Py_ssize_t lh) noexcept nogil:
    """Whether the tap lands outside the image for the whole grid row (ld, lh)."""
    return ld < tap.first[0] or ld > tap.last[0] or lh < tap.first[1] or lh > tap.last[1]


cdef inline Py_ssize_t image_row(const Geom* g, const Tap* tap, Py_ssize_t ld, Py_ssize_t lh) noexcept nogil:
    """Image index where grid cell (ld, lh, 0) lands at this tap; cell (ld, lh, lw) is
    ``lw * stride[2]`` further (outside the image unless first <= lw <= last)."""
    return (((ld * g.stride[0] + tap.offset[0]) * g.image[1] + lh * g.stride[1] + tap.offset[1]) * g.image[2]
            + tap.offset[2])


cdef Py_ssize_t kernel_row_bands(const Geom* g, Bands* bands) noexcept nogil:
    """Fill ``bands`` for a 2-D kernel over a 2-D grid (grid rows merged where they
    meet the same kernel rows) and return their number; 0 where no grid row misses a
    kernel row, or where one meets none, or for a 3-D kernel or grid, or past
    ``MAX_BANDS``: then nothing is skipped."""
    cdef Py_ssize_t lh, kh, lo, hi, oh
    cdef bint misses = False
    bands.n = 0
    if g.kernel[0] != 1 or g.grid[0] != 1 or g.kernel[1] < 2:
        return 0
    for lh in range(g.grid[1]):
        lo, hi = g.kernel[1], 0
        for kh in range(g.kernel[1]):  # (the rows met are a range: oh grows with kh)
            oh = lh * g.stride[1] - g.pad[1] + kh * g.dilation[1]
            if 0 <= oh < g.image[1]:
                lo = kh if kh < lo else lo
                hi = kh + 1
        if hi <= lo:
            bands.n = 0
            return 0
        misses = misses or lo > 0 or hi < g.kernel[1]
        if bands.n > 0 and bands.kh_lo[bands.n - 1] == lo and bands.kh_hi[bands.n - 1] == hi:
            bands.row_end[bands.n - 1] = lh + 1
            continue
        if bands.n == MAX_BANDS:
            bands.n = 0
            return 0
        bands.row_end[bands.n], bands.kh_lo[bands.n], bands.kh_hi[bands.n] = lh + 1, lo, hi
        bands.n += 1
    if not misses:
        bands.n = 0
    return bands.n


def border_bands(tuple image, tuple grid, tuple kernel, tuple stride, tuple dilation, tuple pad):
    """``[(grid row end, first kernel row, end kernel row), ...]`` of ``kernel_row_bands``
    for a regular convolution's geometry; empty where nothing would be skipped."""
    cdef Geom g = make_geom(image, grid, kernel, stride, dilation, pad)
    cdef Bands bands
    cdef Py_ssize_t b
    kernel_row_bands(&g, &bands)
    return [(bands.row_end[b], bands.kh_lo[b], bands.kh_hi[b]) for b in range(bands.n)]


cdef inline Py_ssize_t column_row(const Geom* g, Py_ssize_t c, Py_ssize_t k, Py_ssize_t channels,
                                  bint kernel_rows_outer) noexcept nogil:
    """The column-buffer row of channel ``c`` (of ``channels``) at tap ``k``: ``c * K + k``,
    or kernel-row-major, ``((kd * Kh + kh) * channels + c) * Kw + kw`` (see ``Bands``)."""
    if not kernel_rows_outer:
        return c * g.taps + k
    return ((k // g.kernel[2]) * channels + c) * g.kernel[2] + k % g.kernel[2]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void to_kernel_rows_outer(const floating* src, Py_ssize_t Q, Py_ssize_t P, const Geom* g,
                               floating* dst) noexcept nogil:
    """``dst[q, column_row(p, k)] = src[q, p * K + k]``: a (Q x P*K) row-major weight
    with its columns in the kernel-row-major order of the column buffer."""
    cdef Py_ssize_t q, p, o, kw, Kw = g.kernel[2], Ko = g.taps // g.kernel[2], PK = P * g.taps
    for q in range(Q):
        for p in range(P):
            for o in range(Ko):
                for kw in range(Kw):
                    dst[q * PK + (o * P + p) * Kw + kw] = src[q * PK + (p * Ko + o) * Kw + kw]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void from_kernel_rows_outer(floating* gw, Py_ssize_t Q, Py_ssize_t P, const Geom* g,
                                 floating* row_buffer) noexcept nogil:
    """In place, ``gw[q, p * K + k]`` = element ``(q, column_row(p, k))`` of ``gw`` (a
    (Q x P*K) row-major matrix): each row goes through ``row_buffer`` (P*K elements)."""
    cdef Py_ssize_t q, p, o, kw, Kw = g.kernel[2], Ko = g.taps // g.kernel[2], PK = P * g.taps
    for q in range(Q):
        memcpy(row_buffer, gw + q * PK, PK * sizeof(floating))
        for p in range(P):
            for o in range(Ko):
                for kw in range(Kw):
                    gw[q * PK + (p * Ko + o) * Kw + kw] = row_buffer[(o * P + p) * Kw + kw]


cdef inline void fill_channels(floating* out, Py_ssize_t channels, Py_ssize_t cells,
                               const floating* bias, bint has_bias) noexcept nogil:
    """out[c, :] = bias[c] (or 0) for one sample."""
    cdef Py_ssize_t c, i
    cdef floating value
    for c in range(channels):
        if has_bias:
            value = bias[c]
            for i in range(cells):
                out[c * cells + i] = value
        else:
            memset(out + c * cells, 0, cells * sizeof(floating))


cdef inline void add_strided(floating* dst, Py_ssize_t stride, const floating* src,
                             Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """dst[i * stride] += src[i] for lo <= i < hi (the inner loop of col2im)."""
    cdef Py_ssize_t i
    if stride == 1:  # a separate loop the compiler can vectorise
        for i in range(lo, hi):
            dst[i] += src[i]
    else:
        for i in range(lo, hi):
            dst[i * stride] += src[i]


cdef inline void add_taps_at(floating* dst, Py_ssize_t x, const floating* a, const floating* b,
                             const floating* c, Py_ssize_t db, Py_ssize_t dc, Py_ssize_t lo_a, Py_ssize_t hi_a,
                             Py_ssize_t lo_b, Py_ssize_t hi_b, Py_ssize_t lo_c, Py_ssize_t hi_c) noexcept nogil:
    """``add_three_taps`` at one element, each tap where it lands."""
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
    """Three neighbouring taps of one grid row at stride 1 (a 3-wide kernel), in one pass:
    ``dst[x] += a[x]`` for lo_a <= x < hi_a, then ``+= b[x - db]`` where lo_b <= x - db < hi_b,
    then ``+= c[x - dc]`` likewise. Each element takes the three in that order, so the
    bits are those of three ``add_strided`` passes, but it is loaded and stored once."""
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


cdef inline void copy_strided(floating* dst, const floating* src, Py_ssize_t stride,
                              Py_ssize_t start, Py_ssize_t lo, Py_ssize_t hi,
                              Py_ssize_t end) noexcept nogil:
    """dst[i] = src[i * stride] on lo <= i < hi, zero on the rest of start <= i < end."""
    cdef Py_ssize_t i
    if lo > end:  # the tap lands outside the image for the whole run
        lo = end
    if hi > end:
        hi = end
    if hi < lo:
        hi = lo
    for i in range(start, lo):
        dst[i] = 0
    if stride == 1:
        for i in range(lo, hi):
            dst[i] = src[i]
    else:
        for i in range(lo, hi):
            dst[i] = src[i * stride]
    for i in range(hi, end):
        dst[i] = 0


cdef inline void add_across_samples(floating* dst, Py_ssize_t dst_step, const floating* src,
                                    Py_ssize_t src_step, Py_ssize_t count) noexcept nogil:
    """dst[s * dst_step] += src[s * src_step] for s < count."""
    cdef Py_ssize_t s
    for s in range(count):
        dst[s * dst_step] += src[s * src_step]


cdef inline void copy_across_samples(floating* dst, Py_ssize_t dst_step, const floating* src,
                                     Py_ssize_t src_step, Py_ssize_t count) noexcept nogil:
    """dst[s * dst_step] = src[s * src_step] for s < count."""
    cdef Py_ssize_t s
    for s in range(count):
        dst[s * dst_step] = src[s * src_step]


@cython.cdivision(True)
cdef Py_ssize_t tile_rows(const Geom* g, const Tile* t, Row* rows) noexcept nogil:
    """Split one sample's share of a tile into grid rows (the divisions live here).

    ``rows`` has room for ``lt // W + 2`` entries; returns how many were written.
    """
    cdef Py_ssize_t count = 0, l, l_end, row_end, lw0
    cdef Py_ssize_t Wg = g.grid[2], Hg = g.grid[1]
    l = t.l0
    l_end = t.l0 + t.lt
    while l < l_end:
        lw0 = l % Wg
        row_end = l - lw0 + Wg
        if row_end > l_end:
            row_end = l_end
        rows[count].h = (l // Wg) % Hg
        rows[count].d = l // (Wg * Hg)
        rows[count].lw0 = lw0
        rows[count].lw1 = lw0 + (row_end - l)
        rows[count].j0 = (l - t.l0) - lw0
        count += 1
        l = row_end
    return count


cdef inline Py_ssize_t max_tile_rows(const Geom* g, Py_ssize_t samples_per_tile,
                                     Py_ssize_t cols_per_tile) noexcept nogil:
    # one sample's share: whole samples when folded, else a column range
    cdef Py_ssize_t per_sample = cols_per_tile // samples_per_tile
    return per_sample // g.grid[2] + 2


cdef enum:
    # Runs shorter than this are walked sample-innermost (same offsets, one stride).
    SHORT_RUN = 8


# --------------------------------------------------------------------------- #
# col2im / im2col on one tile
# --------------------------------------------------------------------------- #
@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_scatter(const Geom* g, const floating* cols, Py_ssize_t tile_cols,
                         Py_ssize_t rows, floating* image, Py_ssize_t image_stride_n,
                         Py_ssize_t image_stride_c, const Tile* t,
                         const Row* grid_rows, Py_ssize_t n_rows) noexcept nogil:
    """Add a column buffer into the image.

    ``cols[(c * K + tap) * tile_cols + j]`` holds channel c's contribution at
    tap ``tap`` of tile column j; ``rows / K`` channels. ``grid_rows`` says
    which grid cells the tile's columns are (see ``tile_rows``).
    """
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t c, k, r, s, ld, lh, lw, lo, hi
    cdef Py_ssize_t sw = g.stride[2]
    cdef Tap tap
    cdef const floating* src
    cdef floating* dst
    cdef floating* dst_row
    cdef const Row* row
    for c in range(channels):
        dst = image + c * image_stride_c
        if sw == 1 and g.kernel[2] == 3:  # (3x3 kernels) each row's three taps along W in one pass
            for k in range(0, g.taps, 3):
                col2im_three_taps(g, cols + (c * g.taps + k) * tile_cols, tile_cols, k, dst, image_stride_n,
                                  t, grid_rows, n_rows)
            continue
        for k in range(g.taps):
            tap_at(g, k, &tap)
            src = cols + (c * g.taps + k) * tile_cols
            if t.lt == g.grid_cells:  # whole samples: plain loops over the grid
                for s in range(t.nt):
                    for ld in range(tap.first[0], tap.last[0] + 1):
                        for lh in range(tap.first[1], tap.last[1] + 1):
                            add_strided(dst + (t.n0 + s) * image_stride_n + image_row(g, &tap, ld, lh), sw,
                                        src + s * t.lt + (ld * g.grid[1] + lh) * g.grid[2],
                                        tap.first[2], tap.last[2] + 1)
                continue
            for r in range(n_rows):
                row = &grid_rows[r]
                if tap_misses_row(&tap, row.d, row.h):
                    continue
                lo = row.lw0 if row.lw0 > tap.first[2] else tap.first[2]
                hi = row.lw1 if row.lw1 < tap.last[2] + 1 else tap.last[2] + 1
                dst_row = dst + t.n0 * image_stride_n + image_row(g, &tap, row.d, row.h)
                if hi - lo >= SHORT_RUN or t.nt == 1:
                    for s in range(t.nt):
                        add_strided(dst_row + s * image_stride_n, sw, src + s * t.lt + row.j0, lo, hi)
                else:  # short runs (small images): the samples make the long loop
                    for lw in range(lo, hi):
                        add_across_samples(dst_row + lw * sw, image_stride_n, src + row.j0 + lw, t.lt, t.nt)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void col2im_three_taps(const Geom* g, const floating* src, Py_ssize_t tile_cols, Py_ssize_t k,
                            floating* dst, Py_ssize_t image_stride_n, const Tile* t,
                            const Row* grid_rows, Py_ssize_t n_rows) noexcept nogil:
    """``col2im_scatter``'s work for taps k, k+1, k+2 of one channel (the three taps of
    a kernel row at stride 1, rows ``src``, ``src + tile_cols``, ...): same bits."""
    cdef Tap taps[3]
    cdef Py_ssize_t lo[3]
    cdef Py_ssize_t hi[3]
    cdef Py_ssize_t i, r, s, ld, lh, lw, db, dc, cell
    cdef floating* dst_row
    cdef const Row* row
    for i in range(3):
        tap_at(g, k + i, &taps[i])
    db = taps[1].offset[2] - taps[0].offset[2]
    dc = taps[2].offset[2] - taps[0].offset[2]
    if t.lt == g.grid_cells:  # whole samples: plain loops over the grid
        for s in range(t.nt):  # (the three share their rows: same kd, kh)
            for ld in range(taps[0].first[0], taps[0].last[0] + 1):
                for lh in range(taps[0].first[1], taps[0].last[1] + 1):
                    cell = s * t.lt + (ld * g.grid[1] + lh) * g.grid[2]
                    add_three_taps(dst + (t.n0 + s) * image_stride_n + image_row(g, &taps[0], ld, lh),
                                   src + cell, src + tile_cols + cell, src + 2 * tile_cols + cell, db, dc,
                                   taps[0].first[2], taps[0].last[2] + 1, taps[1].first[2], taps[1].last[2] + 1,
                                   taps[2].first[2], taps[2].last[2] + 1)
        return
    for r in range(n_rows):
        row = &grid_rows[r]
        if tap_misses_row(&taps[0], row.d, row.h):
            continue
        for i in range(3):
            lo[i] = row.lw0 if row.lw0 > taps[i].first[2] else taps[i].first[2]
            hi[i] = row.lw1 if row.lw1 < taps[i].last[2] + 1 else taps[i].last[2] + 1
        dst_row = dst + t.n0 * image_stride_n + image_row(g, &taps[0], row.d, row.h)
        if row.lw1 - row.lw0 >= SHORT_RUN or t.nt == 1:
            for s in range(t.nt):
                add_three_taps(dst_row + s * image_stride_n, src + s * t.lt + row.j0,
                               src + tile_cols + s * t.lt + row.j0, src + 2 * tile_cols + s * t.lt + row.j0,
                               db, dc, lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
        else:  # short runs (small images): the samples make the long loop, tap by tap
            for i in range(3):
                for lw in range(lo[i], hi[i]):
                    add_across_samples(dst_row + (taps[i].offset[2] - taps[0].offset[2]) + lw,
                                       image_stride_n, src + i * tile_cols + row.j0 + lw, t.lt, t.nt)


cdef inline void set_strided(floating* dst, Py_ssize_t stride, const floating* src,
                             Py_ssize_t lo, Py_ssize_t hi, floating value) noexcept nogil:
    """dst[i * stride] = src[i] + value for lo <= i < hi (col2im when taps never overlap)."""
    cdef Py_ssize_t i
    for i in range(lo, hi):
        dst[i * stride] = src[i] + value


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_cover(const Geom* g, const floating* cols, Py_ssize_t tile_cols,
                       Py_ssize_t rows, floating* image, Py_ssize_t image_stride_n,
                       Py_ssize_t image_stride_c, const Tile* t,
                       const Row* grid_rows, Py_ssize_t n_rows,
                       const floating* bias) noexcept nogil:
    """Write a column buffer into an image its taps cover exactly once (stride equal
    to the kernel, e.g. U-Net's k2 s2): ``image = bias + cols``, no fill, no read.

    Same layout as ``col2im_scatter``; ``bias`` (or NULL) from the block's first channel.
    """
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t c, k, r, s, lo, hi, lw
    cdef Py_ssize_t sw = g.stride[2]
    # k2 s2 along W (U-Net): a row's two taps write alternate elements; when they
    # cover the same grid cells, one pass writes both, contiguous stores the
    # compiler vectorises, instead of two strided passes
    cdef bint pairs = sw == 2 and g.kernel[2] == 2
    cdef Tap tap, right
    cdef const floating* src
    cdef const floating* src_right
    cdef floating* dst_row
    cdef floating* out
    cdef const Row* row
    cdef floating value
    for c in range(channels):
        value = bias[c] if bias != NULL else 0
        k = 0
        while k < g.taps:
            tap_at(g, k, &tap)
            src = cols + (c * g.taps + k) * tile_cols
            if pairs:
                tap_at(g, k + 1, &right)
                src_right = src + tile_cols
            for r in range(n_rows):
                row = &grid_rows[r]
                if tap_misses_row(&tap, row.d, row.h):
                    continue
                lo = row.lw0 if row.lw0 > tap.first[2] else tap.first[2]
                hi = row.lw1 if row.lw1 < tap.last[2] + 1 else tap.last[2] + 1
                dst_row = image + c * image_stride_c + t.n0 * image_stride_n + image_row(g, &tap, row.d, row.h)
                if pairs and right.first[2] == tap.first[2] and right.last[2] == tap.last[2]:
                    # (the right tap lands one element further: same rows, same cells)
                    for s in range(t.nt):
                        out = dst_row + s * image_stride_n
                        for lw in range(lo, hi):
                            out[2 * lw] = src[s * t.lt + row.j0 + lw] + value
                            out[2 * lw + 1] = src_right[s * t.lt + row.j0 + lw] + value
                    continue
                for s in range(t.nt):
                    set_strided(dst_row + s * image_stride_n, sw, src + s * t.lt + row.j0, lo, hi, value)
                if pairs:  # (the right tap's own cells)
                    lo = row.lw0 if row.lw0 > right.first[2] else right.first[2]
                    hi = row.lw1 if row.lw1 < right.last[2] + 1 else right.last[2] + 1
                    for s in range(t.nt):
                        set_strided(dst_row + 1 + s * image_stride_n, sw, src_right + s * t.lt + row.j0, lo, hi,
                                    value)
            k += 2 if pairs else 1


# --------------------------------------------------------------------------- #
# whole samples, strided taps: col2im through a phase-major accumulator
# --------------------------------------------------------------------------- #
# With stride s > 1 along the last dim, a tap adds a grid row into every s-th
# image element: a strided read-modify-write the compiler cannot vectorise,
# repeated for each of the kernel's taps that overlap there (DCGAN's k4 s2:
# 4 per element, a third of the layer's time). When a tile holds whole
# samples, each channel's image is instead accumulated in a buffer whose rows
# are stored phase-major (image column n * s + r at r * phase_len + n), where
# every tap's grid row is one contiguous run; a strided store then writes each
# image element once, so the output needs no fill beforehand. The accumulator
# starts at the bias and adds the taps in col2im_scatter's order: same bits.

cdef inline Py_ssize_t phase_len(const Geom* g) noexcept nogil:
    """Accumulator elements per phase of an image row: ceil(W / stride)."""
    return (g.image[2] + g.stride[2] - 1) // g.stride[2]


cdef inline Py_ssize_t phased_acc_size(const Geom* g) noexcept nogil:
    """Elements of one channel's phase-major accumulator (``_blas_backend.phased_acc_bytes``)."""
    return g.image[0] * g.image[1] * g.stride[2] * phase_len(g)


@cython.cdivision(True)
cdef inline void store_phases(floating* out, const floating* acc, Py_ssize_t W, Py_ssize_t sw,
                              Py_ssize_t plen) noexcept nogil:
    """One image row back from phase-major: ``out[n * sw + r] = acc[r * plen + n]``."""
    cdef Py_ssize_t n, r
    if sw == 2:  # both phases in one pass, contiguous stores the compiler vectorises
        for n in range(W // 2):
            out[2 * n] = acc[n]
            out[2 * n + 1] = acc[plen + n]
        if W % 2:
            out[W - 1] = acc[W // 2]
        return
    for r in range(sw):
        for n in range((W - r + sw - 1) // sw):
            out[n * sw + r] = acc[r * plen + n]


@cython.cdivision(True)
cdef inline void load_phases(floating* acc, const floating* row, Py_ssize_t W, Py_ssize_t sw,
                             Py_ssize_t plen) noexcept nogil:
    """One image row into phase-major: ``acc[r * plen + n] = row[n * sw + r]``."""
    cdef Py_ssize_t n, r
    if sw == 2:  # both phases in one pass, contiguous loads the compiler vectorises
        for n in range(W // 2):
            acc[n] = row[2 * n]
            acc[plen + n] = row[2 * n + 1]
        if W % 2:
            acc[W // 2] = row[W - 1]
        return
    for r in range(sw):
        for n in range((W - r + sw - 1) // sw):
            acc[r * plen + n] = row[n * sw + r]


cdef inline Py_ssize_t phase_shift(Py_ssize_t offset, Py_ssize_t sw, Py_ssize_t plen) noexcept nogil:
    """Where image column ``lw * sw + offset`` = ``(lw + q) * sw + r`` sits in a
    phase-major row, less ``lw``: ``r * plen + q``."""
    cdef Py_ssize_t q = floor_div(offset, sw)
    return (offset - q * sw) * plen + q


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_phased(const Geom* g, const floating* cols, Py_ssize_t tile_cols,
                        Py_ssize_t rows, floating* image, Py_ssize_t image_stride_n,
                        Py_ssize_t image_stride_c, const Tile* t, const Tap* taps,
                        const floating* bias, floating* acc) noexcept nogil:
    """Write a column buffer of whole samples into the image: ``image = bias + col2im(cols)``.

    Same column layout as ``col2im_scatter``; ``taps`` are the K ``tap_at``
    landings, ``acc`` holds ``phased_acc_size`` elements, ``bias`` (or NULL)
    starts at the block's first channel.
    """
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t sw = g.stride[2], W = g.image[2]
    cdef Py_ssize_t plen = phase_len(g), acc_row = sw * phase_len(g)
    cdef Py_ssize_t image_rows = g.image[0] * g.image[1]
    cdef Py_ssize_t s, c, k, ld, lh, lw, lo, hi, shift, i
    cdef const Tap* tap
    cdef const floating* src
    cdef const floating* src_row
    cdef floating* dst_row
    cdef floating* out
    cdef floating value
    for s in range(t.nt):
        for c in range(channels):
            # starting at the bias, each element sums its terms in col2im_scatter's order
            value = bias[c] if bias != NULL else 0
            for i in range(image_rows * acc_row):
                acc[i] = value
            for k in range(g.taps):
                tap = &taps[k]
                lo, hi = tap.first[2], tap.last[2] + 1
                if hi <= lo:
                    continue
                shift = phase_shift(tap.offset[2], sw, plen)
                src = cols + (c * g.taps + k) * tile_cols + s * t.lt
                for ld in range(tap.first[0], tap.last[0] + 1):
                    for lh in range(tap.first[1], tap.last[1] + 1):
                        dst_row = acc + ((ld * g.stride[0] + tap.offset[0]) * g.image[1]
                                         + lh * g.stride[1] + tap.offset[1]) * acc_row + shift
                        src_row = src + (ld * g.grid[1] + lh) * g.grid[2]
                        for lw in range(lo, hi):
                            dst_row[lw] += src_row[lw]
            out = image + (t.n0 + s) * image_stride_n + c * image_stride_c
            for i in range(image_rows):
                store_phases(out + i * W, acc + i * acc_row, W, sw, plen)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void im2col_phased(const Geom* g, const floating* image, Py_ssize_t image_stride_n,
                        Py_ssize_t image_stride_c, Py_ssize_t rows, floating* cols,
                        Py_ssize_t tile_cols, const Tile* t, const Tap* taps,
                        floating* phased_image) noexcept nogil:
    """``im2col_gather`` for a tile of whole samples, through a phase-major copy of
    each channel (``phased_image``, ``phased_acc_size`` elements): one strided read
    per image element, then every tap's grid row is a contiguous copy (the plain
    gather reads each element kernel/stride times with a stride). Same columns.
    """
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t sw = g.stride[2], W = g.image[2], Wg = g.grid[2]
    cdef Py_ssize_t plen = phase_len(g), acc_row = sw * phase_len(g)
    cdef Py_ssize_t image_rows = g.image[0] * g.image[1]
    cdef Py_ssize_t s, c, k, ld, lh, lo, hi, shift, i
    cdef const Tap* tap
    cdef const floating* src
    cdef const floating* src_row
    cdef floating* dst
    cdef floating* line
    for c in range(channels):
        for s in range(t.nt):
            src = image + (t.n0 + s) * image_stride_n + c * image_stride_c
            for i in range(image_rows):
                load_phases(phased_image + i * acc_row, src + i * W, W, sw, plen)
            for k in range(g.taps):
                tap = &taps[k]
                lo, hi = tap.first[2], tap.last[2] + 1
                if hi < lo:
                    lo = hi = 0
                shift = phase_shift(tap.offset[2], sw, plen)
                dst = cols + (c * g.taps + k) * tile_cols + s * t.lt
                for ld in range(g.grid[0]):
                    for lh in range(g.grid[1]):
                        line = dst + (ld * g.grid[1] + lh) * Wg
                        if tap_misses_row(tap, ld, lh):
                            memset(line, 0, Wg * sizeof(floating))
                            continue
                        src_row = phased_image + ((ld * g.stride[0] + tap.offset[0]) * g.image[1]
                                                  + lh * g.stride[1] + tap.offset[1]) * acc_row + shift
                        memset(line, 0, lo * sizeof(floating))
                        memcpy(line + lo, src_row + lo, (hi - lo) * sizeof(floating))
                        memset(line + hi, 0, (Wg - hi) * sizeof(floating))


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void im2col_gather(const Geom* g, const floating* image, Py_ssize_t image_stride_n,
                        Py_ssize_t image_stride_c, Py_ssize_t rows, floating* cols,
                        Py_ssize_t tile_cols, const Tile* t,
                        const Row* grid_rows, Py_ssize_t n_rows) noexcept nogil:
    """Fill a column buffer from the image (zeros where a tap falls outside).

    The layout is the one ``col2im_scatter`` reads: row ``c * K + tap``.
    """
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t c, k, r, s, ld, lh, lw, lo, hi
    cdef Py_ssize_t sw = g.stride[2]
    cdef Tap tap
    cdef const floating* src
    cdef const floating* src_row
    cdef floating* dst
    cdef floating* line
    cdef const Row* row
    for c in range(channels):
        src = image + c * image_stride_c
        for k in range(g.taps):
            tap_at(g, k, &tap)
            dst = cols + (c * g.taps + k) * tile_cols
            if t.lt == g.grid_cells:  # whole samples: plain loops over the grid
                for s in range(t.nt):
                    for ld in range(g.grid[0]):
                        for lh in range(g.grid[1]):
                            line = dst + s * t.lt + (ld * g.grid[1] + lh) * g.grid[2]
                            if tap_misses_row(&tap, ld, lh):
                                memset(line, 0, g.grid[2] * sizeof(floating))
                            else:
                                copy_strided(line, src + (t.n0 + s) * image_stride_n + image_row(g, &tap, ld, lh),
                                             sw, 0, tap.first[2], tap.last[2] + 1, g.grid[2])
                continue
            for r in range(n_rows):
                row = &grid_rows[r]
                if tap_misses_row(&tap, row.d, row.h):
                    for s in range(t.nt):
                        memset(dst + s * t.lt + row.j0 + row.lw0, 0, (row.lw1 - row.lw0) * sizeof(floating))
                    continue
                lo = row.lw0 if row.lw0 > tap.first[2] else tap.first[2]
                hi = row.lw1 if row.lw1 < tap.last[2] + 1 else tap.last[2] + 1
                src_row = src + t.n0 * image_stride_n + image_row(g, &tap, row.d, row.h)
                if hi - lo >= SHORT_RUN or t.nt == 1:
                    for s in range(t.nt):
                        copy_strided(dst + s * t.lt + row.j0, src_row + s * image_stride_n, sw, row.lw0, lo, hi,
                                     row.lw1)
                else:  # short runs (small images): the samples make the long loop
                    for s in range(t.nt):  # zero the cells outside the image first
                        copy_strided(dst + s * t.lt + row.j0, src_row, sw, row.lw0, lo, lo, row.lw1)
                    for lw in range(lo, hi):
                        copy_across_samples(dst + row.j0 + lw, t.lt, src_row + lw * sw, image_stride_n, t.nt)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void pack_tile(const floating* src, Py_ssize_t stride_n, Py_ssize_t rows, Py_ssize_t row_stride,
                    floating* dst, const Tile* t) noexcept nogil:
    """dst[r * cols + s * lt + j] = src[(n0 + s) * stride_n + r * row_stride + l0 + j]."""
    cdef Py_ssize_t r, s
    for r in range(rows):
        for s in range(t.nt):
            memcpy(dst + r * t.cols + s * t.lt,
                   src + (t.n0 + s) * stride_n + r * row_stride + t.l0,
                   t.lt * sizeof(floating))


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void unpack_tile(const floating* src, Py_ssize_t rows, floating* dst, Py_ssize_t stride_n,
                      Py_ssize_t row_stride, const Tile* t) noexcept nogil:
    """The inverse of pack_tile."""
    cdef Py_ssize_t r, s
    for r in range(rows):
        for s in range(t.nt):
            memcpy(dst + (t.n0 + s) * stride_n + r * row_stride + t.l0,
                   src + r * t.cols + s * t.lt, t.lt * sizeof(floating))


# --------------------------------------------------------------------------- #
# sample-innermost tiles: folded samples with short grid rows
# --------------------------------------------------------------------------- #
# When many small samples are folded into one tile, the plain layout puts a
# sample's grid cells side by side, so col2im walks rows as short as the grid
# (4 cells in a 4x4 grid) with a stride: loop overhead, no vector code. The
# interleaved layout orders a tile's GEMM columns cell-major, sample-minor
# (column l * nt + s), so every col2im step adds nt contiguous values into an
# accumulator laid out (channel, image cell, sample) the same way; one
# transposing store at the end writes each output element exactly once.

cdef extern from "_simd.h" nogil:
    void transpose4_f32(const float* src, Py_ssize_t src_stride, float* dst, Py_ssize_t dst_stride)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void transpose_block(const floating* src, Py_ssize_t src_stride, Py_ssize_t rows, Py_ssize_t cols,
                          floating* dst, Py_ssize_t dst_stride) noexcept nogil:
    """dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols.

    float32 in 4 x 4 blocks through SSE registers (``_simd.h``), four source
    rows at a time, so that reads stream and the writes of a sweep stay in L1;
    float64 and the edges element by element.
    """
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
cdef void pack_interleaved(const floating* src, Py_ssize_t stride_n, Py_ssize_t rows,
                           Py_ssize_t cells, floating* dst, Py_ssize_t ld, const Tile* t) noexcept nogil:
    """dst[r * ld + l * nt + s] = src[(n0 + s) * stride_n + r * cells + l] (whole samples).

    Packs a folded tile's grid operand (``cells`` = grid cells, ``ld`` = tile
    columns) or its image (``cells`` = image cells) sample-minor: per row, an
    (nt x cells) block transposed.
    """
    cdef Py_ssize_t r
    for r in range(rows):
        transpose_block(src + t.n0 * stride_n + r * cells, stride_n, t.nt, cells, dst + r * ld, t.nt)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_scatter_interleaved(const Geom* g, const floating* cols, Py_ssize_t tile_cols,
                                     Py_ssize_t rows, floating* acc, Py_ssize_t nt) noexcept nogil:
    """Add an interleaved column buffer into ``acc[(c * I + image cell) * nt + s]``."""
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t c, k, ld, lh, lw, s
    cdef Py_ssize_t step = g.stride[2] * nt
    cdef Tap tap
    cdef const floating* src
    cdef const floating* src_run
    cdef floating* dst
    cdef floating* dst_run
    for c in range(channels):
        dst = acc + c * g.image_cells * nt
        for k in range(g.taps):
            tap_at(g, k, &tap)
            src = cols + (c * g.taps + k) * tile_cols
            for ld in range(tap.first[0], tap.last[0] + 1):
                for lh in range(tap.first[1], tap.last[1] + 1):
                    dst_run = dst + (image_row(g, &tap, ld, lh) + tap.first[2] * g.stride[2]) * nt
                    src_run = src + ((ld * g.grid[1] + lh) * g.grid[2] + tap.first[2]) * nt
                    for lw in range(tap.last[2] - tap.first[2] + 1):
                        for s in range(nt):
                            dst_run[lw * step + s] += src_run[lw * nt + s]


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void im2col_gather_interleaved(const Geom* g, const floating* image, Py_ssize_t rows,
                                    floating* cols, Py_ssize_t tile_cols, Py_ssize_t nt,
                                    bint kernel_rows_outer) noexcept nogil:
    """cols[column_row(c, tap) * tile_cols + l * nt + s] = image[(c * I + image cell) * nt + s],
    zero where the tap falls outside the image (``image`` packed by ``pack_interleaved``)."""
    cdef Py_ssize_t channels = rows // g.taps
    cdef Py_ssize_t c, k, ld, lh, lw, lo, hi, s
    cdef Py_ssize_t step = g.stride[2] * nt, run = g.grid[2] * nt
    cdef Tap tap
    cdef const floating* src
    cdef const floating* src_run
    cdef floating* dst
    cdef floating* line
    for c in range(channels):
        src = image + c * g.image_cells * nt
        for k in range(g.taps):
            tap_at(g, k, &tap)
            lo, hi = tap.first[2], tap.last[2] + 1
            if hi < lo:
                lo = hi = 0
            dst = cols + column_row(g, c, k, channels, kernel_rows_outer) * tile_cols
            for ld in range(g.grid[0]):
                for lh in range(g.grid[1]):
                    line = dst + (ld * g.grid[1] + lh) * run
                    if tap_misses_row(&tap, ld, lh):
                        memset(line, 0, run * sizeof(floating))
                        continue
                    src_run = src + (image_row(g, &tap, ld, lh) + lo * g.stride[2]) * nt
                    memset(line, 0, lo * nt * sizeof(floating))
                    if g.stride[2] == 1:
                        memcpy(line + lo * nt, src_run, (hi - lo) * nt * sizeof(floating))
                    else:  # runs of nt values: a plain loop beats a memcpy call each
                        for lw in range(hi - lo):
                            for s in range(nt):
                                line[(lo + lw) * nt + s] = src_run[lw * step + s]
                    memset(line + hi * nt, 0, (run - hi * nt) * sizeof(floating))


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void store_interleaved(const floating* acc, Py_ssize_t channels, Py_ssize_t cells,
                            floating* out, Py_ssize_t stride_n, Py_ssize_t nt) noexcept nogil:
    """out[s * stride_n + c * cells + i] = acc[(c * cells + i) * nt + s]: the
    (channels * cells x nt) accumulator transposed into the tile's samples."""
    transpose_block(acc, nt, channels * cells, nt, out, stride_n)


cdef inline Tile tile_at(Py_ssize_t index, Py_ssize_t samples_per_tile, Py_ssize_t cols_per_sample_tile,
                         Py_ssize_t n_samples, Py_ssize_t grid_cells) noexcept nogil:
    """The index-th tile of the plan (samples folded, or columns of one sample split)."""
    cdef Tile t
    cdef Py_ssize_t tiles_per_sample
    if samples_per_tile > 1 or cols_per_sample_tile >= grid_cells:
        t.n0 = index * samples_per_tile
        t.nt = samples_per_tile if t.n0 + samples_per_tile <= n_samples else n_samples - t.n0
        t.l0 = 0
        t.lt = grid_cells
    else:
        tiles_per_sample = (grid_cells + cols_per_sample_tile - 1) // cols_per_sample_tile
        t.n0 = index // tiles_per_sample
        t.nt = 1
        t.l0 = (index % tiles_per_sample) * cols_per_sample_tile
        t.lt = cols_per_sample_tile if t.l0 + cols_per_sample_tile <= grid_cells else grid_cells - t.l0
    t.cols = t.nt * t.lt
    return t


cdef struct Workspace:
    # A call's work buffers, carved from its thread's cached buffer: GEMM
    # column buffer, packed operand (folded tiles only) and the tile's row
    # descriptors.
    void* cols
    void* packed
    const Tap* taps  # phased kernels only: the K tap landings ...
    void* phased     # ... and one channel's phase-major image (phased_acc_size elements)
    Row* rows


# Work buffers are cached per thread and reused from call to call. Allocating
# them afresh cost more than the computation on small layers: glibc returns
# a freed multi-MiB block to the system, and the next call faults its pages
# back in (twice the time of a 2 ms autoencoder layer). A thread's buffer
# only grows, up to the plan's bound (``_blas_backend.WORKSPACE_BYTES`` plus
# the row descriptors); ``release_workspace`` drops it.
_thread_cache = threading.local()

cdef enum:
    ALIGN = 64  # bytes: each buffer starts on a cache line


def release_workspace():
    """Drop the calling thread's cached work buffers (the next call allocates them again)."""
    _thread_cache.__dict__.pop("buffer", None)


def cached_workspace_bytes():
    """Bytes of work buffers the calling thread keeps between calls."""
    buffer = getattr(_thread_cache, "buffer", None)
    return 0 if buffer is None else buffer.nbytes


# Large results come from a pool of blocks that outlive them. glibc maps a
# block past its largest mmap threshold (32 MiB on 64-bit) fresh from the
# kernel on every malloc and unmaps it on free, so a layer with such an
# output, called in a loop, had the kernel zero every page of it on every
# call before the kernel wrote it (U-Net 128->64 at batch 8, a 32 MiB output,
# 1 thread: 40 ms a call, 31-37 ms with glibc's mmap turned off;
# ``clear_page_erms`` was 11% of its profile). Smaller blocks glibc reuses by
# itself. A pooled result is a view of its block through a ``_ResultLease``;
# when the result and every view of it are gone, the lease gives the block
# back, and the next result of the same byte size takes it. Pool operations
# are plain list operations under the GIL, so calls from several threads
# never get the same block.

#: Results of at least this many bytes are pooled ...
RESULT_POOL_MIN_BYTES = 32 * 2**20
#: ... and at most this many bytes of idle blocks are kept (oldest dropped first).
RESULT_POOL_IDLE_BYTES = 128 * 2**20

_idle_blocks = []  # uint8 arrays no result uses, oldest first


cdef class _ResultLease:
    """The base object of a pooled result: holds its block, and gives it back
    to the pool when the last array using it is freed."""
    cdef object block

    def __dealloc__(self):
        if self.block is None:
            return
        try:
            _idle_blocks.append(self.block)
            _trim_idle(RESULT_POOL_IDLE_BYTES)
        except Exception:  # (the interpreter is shutting down: let the block go)
            pass


cdef void _trim_idle(Py_ssize_t keep_bytes):
    cdef Py_ssize_t idle = sum([block.nbytes for block in _idle_blocks])
    while _idle_blocks and idle > keep_bytes:
        idle -= _idle_blocks.pop(0).nbytes


def empty_result(shape, dtype):
    """An uninitialised C-ordered result array; of at least ``RESULT_POOL_MIN_BYTES``,
    a view of a pooled block (which a dropped earlier result of the same size
    may have left), else a plain ``np.empty``."""
    dtype = np.dtype(dtype)
    cdef Py_ssize_t nbytes = dtype.itemsize
    cdef cnp.npy_intp dims[32]
    cdef int nd = len(shape), d
    if nd > 32:
        return np.empty(shape, dtype)
    for d in range(nd):
        dims[d] = shape[d]
        nbytes *= dims[d]
    if nbytes < RESULT_POOL_MIN_BYTES:
        return np.empty(shape, dtype)
    return pooled_result(nd, dims, dtype, nbytes)


cdef cnp.ndarray pooled_result(int nd, cnp.npy_intp* dims, object dtype, Py_ssize_t nbytes):
    cdef _ResultLease lease = _ResultLease()
    cdef Py_ssize_t i
    for i in range(len(_idle_blocks) - 1, -1, -1):  # the most recently given back first
        if _idle_blocks[i].nbytes == nbytes:
            lease.block = _idle_blocks.pop(i)
            break
    else:
        try:
            lease.block = np.empty(nbytes, dtype=np.uint8)
        except MemoryError:
            _trim_idle(0)  # room for it, then try once more
            lease.block = np.empty(nbytes, dtype=np.uint8)
    out = cnp.PyArray_SimpleNewFromData(nd, dims, (<cnp.dtype>dtype).type_num,
                                        cnp.PyArray_DATA(<cnp.ndarray>lease.block))
    cnp.set_array_base(out, lease)
    return out


def release_results():
    """Free the idle pooled result blocks (results still in use keep theirs)."""
    _trim_idle(0)


def idle_result_bytes():
    """Bytes of pooled result blocks waiting for a next result."""
    return sum([block.nbytes for block in _idle_blocks])


cdef inline size_t aligned(size_t nbytes) noexcept nogil:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


cdef unsigned char* thread_buffer(size_t nbytes) except NULL:
    """The calling thread's cached buffer, grown to at least ``nbytes`` (+ alignment slack)."""
    cdef unsigned char[::1] view
    buffer = getattr(_thread_cache, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes + ALIGN:
        _thread_cache.buffer = None  # free the old one before allocating the new one
        try:
            buffer = np.empty(nbytes + ALIGN, dtype=np.uint8)
        except MemoryError:
            raise MemoryError(f"tconv: could not allocate {nbytes} bytes of workspace") from None
        _thread_cache.buffer = buffer
    view = buffer
    return &view[0] + (-(<size_t>&view[0])) % ALIGN


cdef int workspace_alloc(Workspace* ws, size_t cols_bytes, size_t packed_bytes, Py_ssize_t n_rows,
                         const Geom* phased=NULL, size_t itemsize=0) except -1 nogil:
    """Carve the call's buffers; with ``phased`` (its geometry), also the phased
    kernels' tap table (filled here) and phase-major channel of ``itemsize`` elements."""
    cdef unsigned char* base
    cdef size_t at = aligned(cols_bytes) + aligned(packed_bytes)
    cdef size_t taps_bytes = aligned(phased.taps * sizeof(Tap)) if phased != NULL else 0
    cdef size_t phased_bytes = aligned(phased_acc_size(phased) * itemsize) if phased != NULL else 0
    cdef Tap* taps
    cdef Py_ssize_t k
    with gil:
        base = thread_buffer(at + taps_bytes + phased_bytes + n_rows * sizeof(Row))
    ws.cols = base if cols_bytes else NULL
    ws.packed = base + aligned(cols_bytes) if packed_bytes else NULL
    ws.taps = NULL
    ws.phased = NULL
    if phased != NULL:
        taps = <Tap*>(base + at)
        for k in range(phased.taps):
            tap_at(phased, k, &taps[k])
        ws.taps = taps
        ws.phased = base + at + taps_bytes
    ws.rows = <Row*>(base + at + taps_bytes + phased_bytes)
    return 0


cdef void workspace_free(Workspace* ws) noexcept nogil:
    # the buffer stays cached for the thread's next call
    ws.cols = ws.packed = ws.phased = NULL
    ws.taps = NULL
    ws.rows = NULL


# --------------------------------------------------------------------------- #
# the three primitives
# --------------------------------------------------------------------------- #
@cython.boundscheck(False)
@cython.wraparound(False)
cdef int scatter_col2im(const Geom* gp, const floating* x, const floating* w, const floating* bias_ptr,
                        bint has_bias, floating* y, Py_ssize_t n, Py_ssize_t c_in, Py_ssize_t Q,
                        Py_ssize_t groups, Py_ssize_t samples_per_tile, Py_ssize_t cols_per_tile,
                        Py_ssize_t n_tiles, Py_ssize_t q_block, bint interleaved, bint exact_cover,
                        bint phased) except -1 nogil:
    """col2im: ``y = bias + scatter(x, w)`` (transposed conv forward); ``x`` is
    ``(n, c_in, grid)``, ``w`` ``(c_in, Q, kernel)``, ``y`` ``(n, Q * groups, image)``.

    Per tile, group and block of ``q_block`` output channels:
    ``cols (q_block*K, T) = W_g[:, block]^T (q_block*K, P) @ X_tile (P, T)``,
    then the cols are added into ``y``. ``interleaved`` (folded tiles only)
    orders the tile's columns sample-minor and accumulates in a buffer of
    ``q_block * image cells * samples_per_tile`` elements. ``exact_cover``
    (taps never overlap and cover the image: see ``_blas_backend.covers_exactly``)
    writes the cols instead of adding them. ``phased`` (whole-sample tiles only)
    writes each output element once from a phase-major accumulator (``col2im_phased``).
    """
    cdef Geom g = gp[0]
    cdef Py_ssize_t P = c_in // groups, K = g.taps, L = g.grid_cells
    cdef Py_ssize_t c_out = Q * groups
    cdef Py_ssize_t b, gi, ti, q0, qb
    cdef Tile t
    cdef const floating* operand
    cdef Py_ssize_t ld_operand
    cdef Workspace ws
    cdef floating* cols
    cdef floating* acc
    cdef Py_ssize_t n_rows
    cdef bint folded = samples_per_tile > 1
    cdef Py_ssize_t acc_size = q_block * g.image_cells * samples_per_tile if interleaved else 0

    if not (interleaved or exact_cover or phased):  # (those store every output element themselves)
        for b in range(n):
            fill_channels(y + b * c_out * g.image_cells, c_out, g.image_cells, bias_ptr, has_bias)
    workspace_alloc(&ws, q_block * K * cols_per_tile * sizeof(floating),
                    (P * cols_per_tile + acc_size) * sizeof(floating) if folded else 0,
                    max_tile_rows(&g, samples_per_tile, cols_per_tile),
                    &g if phased else NULL, sizeof(floating))
    cols = <floating*>ws.cols
    acc = <floating*>ws.packed + P * cols_per_tile
    for ti in range(n_tiles):
        t = tile_at(ti, samples_per_tile, cols_per_tile, n, L)
        n_rows = tile_rows(&g, &t, ws.rows)
        for gi in range(groups):
            if interleaved:
                pack_interleaved(x + gi * P * L, c_in * L, P, L, <floating*>ws.packed, t.cols, &t)
                operand, ld_operand = <floating*>ws.packed, t.cols
            elif folded:
                pack_tile(x + gi * P * L, c_in * L, P, L, <floating*>ws.packed, &t)
                operand, ld_operand = <floating*>ws.packed, t.cols
            else:
                operand, ld_operand = x + t.n0 * c_in * L + gi * P * L + t.l0, L
            q0 = 0
            while q0 < Q:
                qb = q_block if q0 + q_block <= Q else Q - q0
                # cols (qb*K x T) = W_g[:, q0*K .. (q0+qb)*K]^T (qb*K x P) X_tile (P x T)
                gemm_rows(qb * K, t.cols, P, w + gi * P * Q * K + q0 * K, Q * K, True,
                          operand, ld_operand, NULL, False, cols, t.cols)
                if interleaved:
                    fill_channels(acc, qb, g.image_cells * t.nt,
                                     bias_ptr + gi * Q + q0 if has_bias else NULL, has_bias)
                    col2im_scatter_interleaved(&g, cols, t.cols, qb * K, acc, t.nt)
                    store_interleaved(acc, qb, g.image_cells,
                                      y + t.n0 * c_out * g.image_cells + (gi * Q + q0) * g.image_cells,
                                      c_out * g.image_cells, t.nt)
                elif exact_cover:
                    col2im_cover(&g, cols, t.cols, qb * K,
                                 y + (gi * Q + q0) * g.image_cells, c_out * g.image_cells,
                                 g.image_cells, &t, ws.rows, n_rows,
                                 bias_ptr + gi * Q + q0 if has_bias else NULL)
                elif phased:
                    col2im_phased(&g, cols, t.cols, qb * K,
                                  y + (gi * Q + q0) * g.image_cells, c_out * g.image_cells,
                                  g.image_cells, &t, ws.taps,
                                  bias_ptr + gi * Q + q0 if has_bias else NULL,
                                  <floating*>ws.phased)
                else:
                    col2im_scatter(&g, cols, t.cols, qb * K,
                                   y + (gi * Q + q0) * g.image_cells, c_out * g.image_cells,
                                   g.image_cells, &t, ws.rows, n_rows)
                q0 += qb
    workspace_free(&ws)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void tile_columns(const Geom* g, const floating* image, Py_ssize_t c_img, Py_ssize_t P, const Tile* t,
                       const Row* rows, Py_ssize_t n_rows, bint interleaved, floating* image_tile,
                       const Tap* taps, floating* phased_image, floating* cols,
                       const Bands* bands=NULL) noexcept nogil:
    """im2col of one tile of one group: ``cols`` (P*K rows of t.cols columns) from
    ``image`` (the group's first channel of sample 0), sample-minor when ``interleaved``
    (the tile's image is first packed into ``image_tile``; rows kernel-row-major where
    ``bands`` is given), through a phase-major copy when ``taps`` is not NULL (whole
    samples: ``im2col_phased``)."""
    if interleaved:
        pack_interleaved(image, c_img * g.image_cells, P, g.image_cells, image_tile, g.image_cells * t.nt, t)
        im2col_gather_interleaved(g, image_tile, P * g.taps, cols, t.cols, t.nt, bands != NULL)
    elif taps != NULL:
        im2col_phased(g, image, c_img * g.image_cells, g.image_cells, P * g.taps, cols, t.cols, t, taps,
                      phased_image)
    else:
        im2col_gather(g, image, c_img * g.image_cells, g.image_cells, P * g.taps, cols, t.cols, t, rows, n_rows)


cdef inline void tile_span(const Geom* g, const Bands* bands, Py_ssize_t b, const Tile* t, Py_ssize_t PK,
                           Py_ssize_t* c0, Py_ssize_t* c1, Py_ssize_t* k0, Py_ssize_t* k1) noexcept nogil:
    """The ``b``-th block of a tile's GEMM: its columns ``[c0, c1)`` and column-buffer rows
    ``[k0, k1)``. Without ``bands`` one block, the whole tile; with them (sample-minor
    tiles, kernel-row-major rows) band ``b``'s columns and the kernel rows they meet."""
    cdef Py_ssize_t run = g.grid[2] * t.nt, per_kernel_row = PK // g.kernel[1]
    if bands == NULL:
        c0[0], c1[0], k0[0], k1[0] = 0, t.cols, 0, PK
        return
    c0[0] = (bands.row_end[b - 1] if b > 0 else 0) * run
    c1[0] = bands.row_end[b] * run
    k0[0] = bands.kh_lo[b] * per_kernel_row
    k1[0] = bands.kh_hi[b] * per_kernel_row


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void gather_from_columns(const Geom* g, const floating* cols, Py_ssize_t ld_cols, const floating* w_g,
                              Py_ssize_t PK, Py_ssize_t Q, const Tile* t, bint folded, bint interleaved,
                              floating* result, floating* y_g, Py_ssize_t c_out,
                              const floating* bias_g, bint has_bias, const Bands* bands=NULL) noexcept nogil:
    """``out_tile (Q, T) = bias_g + W_g (Q, P*K) @ cols (P*K, T)`` into ``y_g`` (the group's
    first output channel of sample 0), through ``result`` where the tile is folded.
    With ``bands`` (sample-minor tiles; ``cols`` and ``w_g`` kernel-row-major) one
    GEMM per band, over the kernel rows its grid rows meet.

    ``y_g`` is not read: the GEMM starts each row from its bias (or zero), and
    each output element is written by one tile (zeroing the whole output first
    cost a pass over it, 1.6 ms of DCGAN 64->3's 19 ms backward; filling it with
    the bias, a pass of the 27 MB 1x1 image convolution's output).
    """
    cdef Py_ssize_t L = g.grid_cells
    cdef const floating* row_init = bias_g if has_bias else NULL
    cdef Py_ssize_t b, c0, c1, k0, k1
    if not folded:
        gemm_rows(Q, t.cols, PK, w_g, PK, False, cols, ld_cols, row_init, False, y_g + t.n0 * c_out * L + t.l0, L)
        return
    for b in range(bands.n if bands != NULL else 1):
        tile_span(g, bands, b, t, PK, &c0, &c1, &k0, &k1)
        gemm_rows(Q, c1 - c0, k1 - k0, w_g + k0, PK, False, cols + k0 * ld_cols + c0, ld_cols, row_init,
                  False, result + c0, t.cols)
    if interleaved:  # columns sample-minor: transposed out of `result`
        store_interleaved(result, Q, L, y_g + t.n0 * c_out * L, c_out * L, t.nt)
    else:
        unpack_tile(result, Q, y_g, c_out * L, L, t)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void pack_transposed(const floating* src, Py_ssize_t stride_n, Py_ssize_t rows, Py_ssize_t row_stride,
                          floating* dst, const Tile* t, bint interleaved) noexcept nogil:
    """``dst`` (T x rows, row-major) = the tile's (rows x T) operand transposed, its
    columns in the tile's order: ``s * lt + j``, or sample-minor ``l * nt + s``."""
    cdef Py_ssize_t s
    for s in range(t.nt):
        if interleaved:
            transpose_block(src + (t.n0 + s) * stride_n, row_stride, rows, t.lt, dst + s * rows, t.nt * rows)
        else:
            transpose_block(src + (t.n0 + s) * stride_n + t.l0, row_stride, rows, t.lt, dst + s * t.lt * rows,
                            rows)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void weight_grad_from_columns(const Geom* g, const floating* cols, const floating* dy_g,
                                   Py_ssize_t c_grid, Py_ssize_t PK, Py_ssize_t Q, const Tile* t,
                                   bint folded, bint interleaved, floating* packed,
                                   floating* gw_g, bint transposed, const Bands* bands=NULL) noexcept nogil:
    """``gw_g (Q, P*K) += dY_tile (Q, T) @ cols (P*K, T)^T``; ``dy_g`` is the group's first
    grid channel of sample 0, packed into ``packed`` in the columns' order where folded.
    ``transposed``: ``gw_g`` is the transpose, (P*K, Q) row-major; where the unpacked
    kernel takes a float32 tile's product, summed in its form, ``cols @ dY_tile^T``
    (``dY_tile`` packed transposed; ``gemm_rows``). With ``bands`` (sample-minor
    tiles; ``cols`` and ``gw_g`` kernel-row-major) one GEMM per band."""
    cdef Py_ssize_t L = g.grid_cells
    cdef const floating* operand
    cdef Py_ssize_t ld_operand
    cdef floating one = 1
    cdef Py_ssize_t b, c0, c1, k0, k1
    if transposed and floating is float and unpacked_wins(PK, Q, t.cols, False):
        pack_transposed(dy_g, c_grid * L, Q, L, packed, t, interleaved)
        for b in range(bands.n if bands != NULL else 1):
            tile_span(g, bands, b, t, PK, &c0, &c1, &k0, &k1)
            gemm_rows(k1 - k0, Q, c1 - c0, cols + k0 * t.cols + c0, t.cols, False, packed + c0 * Q, Q, NULL,
                      True, gw_g + k0 * Q, Q)
        return
    if interleaved:
        pack_interleaved(dy_g, c_grid * L, Q, L, packed, t.cols, t)
        operand, ld_operand = packed, t.cols
    elif folded:
        pack_tile(dy_g, c_grid * L, Q, L, packed, t)
        operand, ld_operand = packed, t.cols
    else:
        operand, ld_operand = dy_g + t.n0 * c_grid * L + t.l0, L
    # Column-major: cols (P*K x T, row-major) is col-major (T x P*K); dY_tile (Q x T,
    # row stride ld_operand) is col-major (T x Q); both enter transposed. C = gw_g^T,
    # col-major (P*K x Q); or, transposed, C = gw_g col-major (Q x P*K). A block of
    # rows k0..k1 and columns c0..c1 (``tile_span``) is the same product on sub-matrices.
    for b in range(bands.n if bands != NULL else 1):
        tile_span(g, bands, b, t, PK, &c0, &c1, &k0, &k1)
        if transposed:
            gemm(c'T', c'N', Q, k1 - k0, c1 - c0, one, operand + c0, ld_operand, cols + k0 * t.cols + c0, t.cols,
                 one, gw_g + k0 * Q, Q)
        else:
            gemm(c'T', c'N', k1 - k0, Q, c1 - c0, one, cols + k0 * t.cols + c0, t.cols, operand + c0, ld_operand,
                 one, gw_g + k0, PK)


cdef void finish_weight_grad(const Geom* g, const floating* acc, Py_ssize_t groups, Py_ssize_t P, Py_ssize_t Q,
                             bint transposed, bint kernel_rows_outer, floating* gw,
                             floating* row_buffer) noexcept nogil:
    """Put a weight gradient summed transposed (in ``acc``, apart) and/or kernel-row-major
    (in ``gw`` itself unless transposed) in ``gw``'s order: transposed first, then its
    columns reordered in place, a row at a time through ``row_buffer`` (P*K elements;
    one pass, where the transpose reordering as it went was a strided scalar copy:
    7.7% of DCGAN 512->256's backward)."""
    cdef Py_ssize_t gi, size = Q * P * g.taps
    if transposed:
        transpose_groups(acc, groups, P * g.taps, Q, gw)
    if kernel_rows_outer:
        for gi in range(groups):
            from_kernel_rows_outer(gw + gi * size, Q, P, g, row_buffer)


cdef void transpose_groups(const floating* src, Py_ssize_t groups, Py_ssize_t rows, Py_ssize_t cols,
                           floating* dst) noexcept nogil:
    """``dst[g, c, r] = src[g, r, c]`` for each of ``groups`` (rows x cols) blocks."""
    cdef Py_ssize_t gi
    for gi in range(groups):
        transpose_block(src + gi * rows * cols, cols, rows, cols, dst + gi * rows * cols, rows)


@cython.boundscheck(False)
@cython.wraparound(False)
def gather(const floating[:, :, :, :, ::1] image_in, const floating[:, :, :, :, ::1] weight,
           const floating[::1] bias, bint has_bias, floating[:, :, :, :, ::1] out,
           tuple image, tuple grid, tuple kernel, tuple stride, tuple dilation, tuple pad,
           Py_ssize_t groups, Py_ssize_t samples_per_tile, Py_ssize_t cols_per_tile,
           Py_ssize_t n_tiles, bint identity_map, bint interleaved, bint phased,
           bint skip_border_taps=False):
    """im2col: ``out = bias + W_g (Q, P*K) @ cols (P*K, T)`` (regular conv forward).

    ``identity_map`` (1x1 kernel, stride 1, no padding) skips im2col: the
    image itself is the column buffer. ``interleaved`` (folded tiles, not
    with ``identity_map``) packs the tile's image sample-minor first, so
    im2col copies runs of ``samples_per_tile`` values. ``phased`` (whole-sample
    tiles, not with the other two) runs im2col through phase-major channels.
    ``skip_border_taps`` (with ``interleaved``): the GEMMs skip the kernel rows
    that fall on padding (``Bands``; the weight is first copied kernel-row-major).
    """
    cdef Geom g = make_geom(image, grid, kernel, stride, dilation, pad)
    cdef Py_ssize_t n = image_in.shape[0], c_in = image_in.shape[1]
    cdef Py_ssize_t P = c_in // groups, K = g.taps, L = g.grid_cells
    cdef Py_ssize_t c_out = weight.shape[0], Q = c_out // groups
    cdef Py_ssize_t gi, ti
    cdef Tile t
    cdef const floating* x = &image_in[0, 0, 0, 0, 0]
    cdef const floating* w = &weight[0, 0, 0, 0, 0]
    cdef floating* y = &out[0, 0, 0, 0, 0]
    cdef const floating* bias_ptr = &bias[0] if has_bias else NULL
    cdef const floating* operand
    cdef Py_ssize_t ld_operand
    cdef Workspace ws
    cdef floating* cols
    cdef floating* result
    cdef floating* image_tile
    cdef Py_ssize_t n_rows
    cdef bint folded = samples_per_tile > 1
    cdef Py_ssize_t image_tile_size = P * g.image_cells * samples_per_tile if interleaved else 0
    cdef Bands bands
    cdef const Bands* skip = &bands if skip_border_taps and interleaved and kernel_row_bands(&g, &bands) else NULL
    cdef Py_ssize_t weight_copy_size = c_out * P * K if skip != NULL else 0

    with nogil:
        workspace_alloc(&ws, P * K * cols_per_tile * sizeof(floating) if folded or not identity_map else 0,
                        (Q * cols_per_tile + image_tile_size + weight_copy_size) * sizeof(floating) if folded else 0,
                        max_tile_rows(&g, samples_per_tile, cols_per_tile),
                        &g if phased else NULL, sizeof(floating))
        cols, result = <floating*>ws.cols, <floating*>ws.packed
        image_tile = result + Q * cols_per_tile
        if skip != NULL:
            for gi in range(groups):
                to_kernel_rows_outer(w + gi * Q * P * K, Q, P, &g, image_tile + image_tile_size + gi * Q * P * K)
            w = image_tile + image_tile_size
        for ti in range(n_tiles):
            t = tile_at(ti, samples_per_tile, cols_per_tile, n, L)
            n_rows = tile_rows(&g, &t, ws.rows)
            for gi in range(groups):
                if identity_map and not folded:
                    operand, ld_operand = x + t.n0 * c_in * L + gi * P * L + t.l0, L
                elif identity_map:
                    # image cells are grid cells: packing the tile is the im2col
                    pack_tile(x + gi * P * L, c_in * L, P, L, cols, &t)
                    operand, ld_operand = cols, t.cols
                else:
                    tile_columns(&g, x + gi * P * g.image_cells, c_in, P, &t, ws.rows, n_rows, interleaved,
                                 image_tile, ws.taps, <floating*>ws.phased, cols, skip)
                    operand, ld_operand = cols, t.cols
                gather_from_columns(&g, operand, ld_operand, w + gi * Q * P * K, P * K, Q, &t, folded,
                                    interleaved, result, y + gi * Q * L, c_out,
                                    bias_ptr + gi * Q if has_bias else NULL, has_bias, skip)
        workspace_free(&ws)


@cython.boundscheck(False)
@cython.wraparound(False)
def weight_grad(const floating[:, :, :, :, ::1] image_in, const floating[:, :, :, :, ::1] grid_in,
                floating[:, :, :, :, ::1] out,
                tuple image, tuple grid, tuple kernel, tuple stride, tuple dilation, tuple pad,
                Py_ssize_t groups, Py_ssize_t samples_per_tile, Py_ssize_t cols_per_tile,
                Py_ssize_t n_tiles, bint interleaved, bint phased, bint transposed,
                bint skip_border_taps=False):
    """``gw_g (Q, P*K) += dY_tile (Q, T) @ cols (P*K, T)^T``, summed over tiles in order.

    ``interleaved`` (folded tiles) orders both operands' columns sample-minor;
    ``phased`` as in ``gather``. ``transposed`` sums ``gw_g^T`` in a work buffer
    and transposes it at the end (BLAS runs the product faster that way round
    when Q is the smaller side). ``skip_border_taps`` as in ``gather`` (the sum
    is kept kernel-row-major, in ``out`` itself unless transposed, and put in
    ``out``'s order at the end, a row at a time).
    """
    cdef Geom g = make_geom(image, grid, kernel, stride, dilation, pad)
    cdef Py_ssize_t n = image_in.shape[0], c_img = image_in.shape[1], c_grid = grid_in.shape[1]
    cdef Py_ssize_t P = c_img // groups, Q = c_grid // groups, K = g.taps, L = g.grid_cells
    cdef Py_ssize_t gi, ti
    cdef Tile t
    cdef const floating* x = &image_in[0, 0, 0, 0, 0]
    cdef const floating* dy = &grid_in[0, 0, 0, 0, 0]
    cdef floating* gw = &out[0, 0, 0, 0, 0]
    cdef Workspace ws
    cdef floating* cols
    cdef floating* image_tile
    cdef Py_ssize_t n_rows
    cdef bint folded = samples_per_tile > 1
    cdef Py_ssize_t image_tile_size = P * g.image_cells * samples_per_tile if interleaved else 0
    cdef Py_ssize_t packed_size = Q * cols_per_tile + image_tile_size if folded or transposed else 0
    cdef Py_ssize_t gw_size = groups * Q * P * K
    cdef floating* acc
    cdef Bands bands
    cdef const Bands* skip = &bands if skip_border_taps and interleaved and kernel_row_bands(&g, &bands) else NULL
    cdef Py_ssize_t row_buffer_size = P * K if skip != NULL else 0

    with nogil:
        workspace_alloc(&ws, P * K * cols_per_tile * sizeof(floating),
                        (packed_size + row_buffer_size + (gw_size if transposed else 0)) * sizeof(floating),
                        max_tile_rows(&g, samples_per_tile, cols_per_tile),
                        &g if phased else NULL, sizeof(floating))
        cols = <floating*>ws.cols
        image_tile = <floating*>ws.packed + Q * cols_per_tile
        acc = <floating*>ws.packed + packed_size + row_buffer_size if transposed else gw
        memset(acc, 0, gw_size * sizeof(floating))
        for ti in range(n_tiles):
            t = tile_at(ti, samples_per_tile, cols_per_tile, n, L)
            n_rows = tile_rows(&g, &t, ws.rows)
            for gi in range(groups):
                tile_columns(&g, x + gi * P * g.image_cells, c_img, P, &t, ws.rows, n_rows, interleaved,
                             image_tile, ws.taps, <floating*>ws.phased, cols, skip)
                weight_grad_from_columns(&g, cols, dy + gi * Q * L, c_grid, P * K, Q, &t, folded, interleaved,
                                         <floating*>ws.packed, acc + gi * Q * P * K, transposed, skip)
        finish_weight_grad(&g, acc, groups, P, Q, transposed, skip != NULL, gw, <floating*>ws.packed + packed_size)
        workspace_free(&ws)


@cython.boundscheck(False)
@cython.wraparound(False)
def gather_and_weight_grad(const floating[:, :, :, :, ::1] image_in, const floating[:, :, :, :, ::1] weight,
                           const floating[:, :, :, :, ::1] grid_in, floating[:, :, :, :, ::1] out,
                           floating[:, :, :, :, ::1] gw_out,
                           tuple image, tuple grid, tuple kernel, tuple stride, tuple dilation, tuple pad,
                           Py_ssize_t groups, Py_ssize_t samples_per_tile, Py_ssize_t cols_per_tile,
                           Py_ssize_t n_tiles, bint interleaved, bint phased, bint transposed,
                           bint skip_border_taps=False):
    """``gather(image_in, weight)`` into ``out`` (no bias) and ``weight_grad(image_in,
    grid_in)`` into ``gw_out`` from one im2col per tile: a transposed convolution's
    input and weight gradients. With the plan of ``gather`` (not its identity map)
    and the same ``transposed`` and ``skip_border_taps`` both results are bitwise
    those of the two separate calls.
    """
    cdef Geom g = make_geom(image, grid, kernel, stride, dilation, pad)
    cdef Py_ssize_t n = image_in.shape[0], c_img = image_in.shape[1], c_grid = grid_in.shape[1]
    cdef Py_ssize_t P = c_img // groups, Q = c_grid // groups, K = g.taps, L = g.grid_cells
    cdef Py_ssize_t gi, ti
    cdef Tile t
    cdef const floating* x = &image_in[0, 0, 0, 0, 0]
    cdef const floating* w = &weight[0, 0, 0, 0, 0]
    cdef const floating* dy = &grid_in[0, 0, 0, 0, 0]
    cdef floating* y = &out[0, 0, 0, 0, 0]
    cdef floating* gw = &gw_out[0, 0, 0, 0, 0]
    cdef Workspace ws
    cdef floating* cols
    cdef floating* result
    cdef floating* packed
    cdef floating* image_tile
    cdef Py_ssize_t n_rows
    cdef bint folded = samples_per_tile > 1
    cdef Py_ssize_t image_tile_size = P * g.image_cells * samples_per_tile if interleaved else 0
    cdef Py_ssize_t packed_size = 2 * Q * cols_per_tile + image_tile_size if folded or transposed else 0
    cdef Py_ssize_t gw_size = groups * Q * P * K
    cdef floating* acc
    cdef Bands bands
    cdef const Bands* skip = &bands if skip_border_taps and interleaved and kernel_row_bands(&g, &bands) else NULL
    # with ``skip``: the weight's copy, kernel-row-major, and a row buffer (see finish_weight_grad)
    cdef Py_ssize_t copies_size = gw_size + P * K if skip != NULL else 0
    cdef floating* copies

    with nogil:
        workspace_alloc(&ws, P * K * cols_per_tile * sizeof(floating),
                        (packed_size + copies_size + (gw_size if transposed else 0)) * sizeof(floating),
                        max_tile_rows(&g, samples_per_tile, cols_per_tile),
                        &g if phased else NULL, sizeof(floating))
        cols, result = <floating*>ws.cols, <floating*>ws.packed
        packed = result + Q * cols_per_tile
        image_tile = packed + Q * cols_per_tile
        copies = <floating*>ws.packed + packed_size
        acc = copies + copies_size if transposed else gw
        memset(acc, 0, gw_size * sizeof(floating))
        if skip != NULL:
            for gi in range(groups):
                to_kernel_rows_outer(w + gi * Q * P * K, Q, P, &g, copies + gi * Q * P * K)
            w = copies
        for ti in range(n_tiles):
            t = tile_at(ti, samples_per_tile, cols_per_tile, n, L)
            n_rows = tile_rows(&g, &t, ws.rows)
            for gi in range(groups):
                tile_columns(&g, x + gi * P * g.image_cells, c_img, P, &t, ws.rows, n_rows, interleaved,
                             image_tile, ws.taps, <floating*>ws.phased, cols, skip)
                gather_from_columns(&g, cols, t.cols, w + gi * Q * P * K, P * K, Q, &t, folded, interleaved,
                                    result, y + gi * Q * L, c_grid, NULL, False, skip)
                weight_grad_from_columns(&g, cols, dy + gi * Q * L, c_grid, P * K, Q, &t, folded, interleaved,
                                         packed, acc + gi * Q * P * K, transposed, skip)
        finish_weight_grad(&g, acc, groups, P, Q, transposed, skip != NULL, gw, copies + gw_size)
        workspace_free(&ws)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void col2im_patches(const Geom* g, const floating* cols, Py_ssize_t l0, Py_ssize_t lt,
                         Py_ssize_t channels, floating* image, Py_ssize_t image_stride_c) noexcept nogil:
    """Add patch-major columns into one sample's image.

    ``cols[j * channels * K + c * K + tap]``: grid cell ``l0 + j``'s whole
    kernel patch, channel by channel; each kernel row lands as one run along W.
    """
    cdef Py_ssize_t QK = channels * g.taps  # the row length of cols
    cdef Py_ssize_t j, l, ld, lh, lw, c, kd, kh, od, oh, ow0, kw_lo, kw_hi
    cdef const floating* src
    cdef floating* row
    for j in range(lt):
        l = l0 + j
        lw = l % g.grid[2]
        lh = (l // g.grid[2]) % g.grid[1]
        ld = l // (g.grid[2] * g.grid[1])
        ow0 = lw * g.stride[2] - g.pad[2]
        # taps kw with 0 <= ow0 + kw * dilation < image width
        kw_lo = -floor_div(ow0, g.dilation[2]) if ow0 < 0 else 0
        kw_hi = floor_div(g.image[2] - 1 - ow0, g.dilation[2]) + 1
        if kw_hi > g.kernel[2]:
            kw_hi = g.kernel[2]
        if kw_lo >= kw_hi:
            continue
        for c in range(channels):
            for kd in range(g.kernel[0]):
                od = ld * g.stride[0] - g.pad[0] + kd * g.dilation[0]
                if od < 0 or od >= g.image[0]:
                    continue
                for kh in range(g.kernel[1]):
                    oh = lh * g.stride[1] - g.pad[1] + kh * g.dilation[1]
                    if oh < 0 or oh >= g.image[1]:
                        continue
                    src = cols + j * QK + c * g.taps + (kd * g.kernel[1] + kh) * g.kernel[2]
                    row = image + c * image_stride_c + (od * g.image[1] + oh) * g.image[2] + ow0
                    add_strided(row, g.dilation[2], src, kw_lo, kw_hi)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int scatter_patches(const Geom* gp, const floating* x, const floating* w, const floating* bias_ptr,
                         bint has_bias, floating* y, Py_ssize_t n, Py_ssize_t c_in, Py_ssize_t Q,
                         Py_ssize_t groups, Py_ssize_t cells_per_tile, Py_ssize_t q_block,
                         Py_ssize_t q_first, Py_ssize_t q_end) except -1 nogil:
    """col2im with patch-major columns, for kernels wider than the grid (FCN's
    64-wide kernel on a 7x7 grid): per tile of grid cells and block of output
    channels ``cols (T, q_block*K) = X_tile^T W_g[:, block]``, then each kernel
    row is added as one run, instead of one short strided run per grid row
    and tap. Blocks of channels over all cells read the (large) weight once.
    Only output channels ``q_first .. q_end - 1`` of each group are written
    (a backend on several threads gives each a range).
    """
    cdef Geom g = gp[0]
    cdef Py_ssize_t P = c_in // groups, K = g.taps, L = g.grid_cells
    cdef Py_ssize_t c_out = Q * groups, QK = Q * K
    cdef Py_ssize_t b, gi, l0, lt, q0, qb
    cdef Workspace ws
    cdef floating* cols
    cdef floating one = 1, zero = 0

    for b in range(n):
        for gi in range(groups):
            fill_channels(y + (b * c_out + gi * Q + q_first) * g.image_cells, q_end - q_first, g.image_cells,
                          bias_ptr + gi * Q + q_first if has_bias else NULL, has_bias)
    workspace_alloc(&ws, q_block * K * cells_per_tile * sizeof(floating), 0, 1)
    cols = <floating*>ws.cols
    for b in range(n):
        for gi in range(groups):
            q0 = q_first
            while q0 < q_end:
                qb = q_block if q0 + q_block <= q_end else q_end - q0
                l0 = 0
                while l0 < L:
                    lt = cells_per_tile if l0 + cells_per_tile <= L else L - l0
                    # Column-major: W_g (P x Q*K, row-major) is col-major (QK x P), of
                    # which rows q0*K .. (q0+qb)*K are taken; the grid cells l0.. of X
                    # (P x L, row-major) are col-major (L x P), taken transposed
                    # (P x lt). C col-major (qb*K x lt) = row-major (lt x qb*K).
                    gemm(c'N', c'T', qb * K, lt, P, one, w + gi * P * QK + q0 * K, QK,
                         x + (b * c_in + gi * P) * L + l0, L, zero, cols, qb * K)
                    col2im_patches(&g, cols, l0, lt, qb,
                                   y + (b * c_out + gi * Q + q0) * g.image_cells, g.image_cells)
                    l0 += lt
                q0 += qb
    workspace_free(&ws)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int scatter_single_cell(const floating* x, const floating* w, const floating* bias_ptr, bint has_bias,
                             floating* y, Py_ssize_t n, Py_ssize_t c_in, Py_ssize_t QK, Py_ssize_t K,
                             Py_ssize_t groups) except -1 nogil:
    """Transposed conv of a one-cell grid whose output is exactly the kernel (no
    padding, dilation 1), e.g. a generator's first layer: no col2im at all,
    ``out[n, group] = x[n, group] @ W_group`` is one GEMM per group (``QK``: a
    group's output channels times the ``K`` taps).
    """
    cdef Py_ssize_t P = c_in // groups
    cdef Py_ssize_t b, gi
    for b in range(n):
        fill_channels(y + b * groups * QK, groups * (QK // K), K, bias_ptr, has_bias)
    for gi in range(groups):
        # out[:, gi*QK ..] (N x QK, row stride groups*QK) += x[:, gi*P ..] (N x P) W_g (P x QK)
        gemm_rows(n, QK, P, x + gi * P, c_in, False, w + gi * P * QK, QK, NULL, True, y + gi * QK, groups * QK)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int scatter_shifted(const Geom* gp, const float* x, const float* w, const float* bias_ptr,
                         bint has_bias, float* y, Py_ssize_t n, Py_ssize_t c_in, Py_ssize_t Q,
                         Py_ssize_t groups, Py_ssize_t rows_per_band, Py_ssize_t q_first,
                         Py_ssize_t q_end) except -1 nogil:
    """Stride 1 without col2im: ``y[o, i] = bias[o] + sum_taps W_tap[o, :] x[:, i + pad - tap * dilation]``,
    each tap one product of the unpacked kernel added into a band of ``rows_per_band``
    image rows. Float32 with the kernel only (the route's condition).

    Along D and H a tap moves the band by whole rows, so the grid rows it reads are
    contiguous, rows of the image's width apart; along W it moves within rows, so
    each kw reads a copy of the band's grid rows shifted by its offset, zero where
    the shift leaves the grid. Output channels ``q_first .. q_end - 1`` of each
    group only (a backend on several threads gives each a range).

    Returns 1, computing nothing, when the weight holds a NaN or an infinity: the
    zeros of the copies would multiply it where the definition has no product.
    """
    cdef Geom g = gp[0]
    cdef Py_ssize_t P = c_in // groups, K = g.taps, L = g.grid_cells
    cdef Py_ssize_t KD = g.kernel[0], KH = g.kernel[1], KW = g.kernel[2]
    cdef Py_ssize_t GD = g.grid[0], GH = g.grid[1], GW = g.grid[2]
    cdef Py_ssize_t H = g.image[1], W = g.image[2]
    cdef Py_ssize_t c_out = Q * groups, qn = q_end - q_first
    # grid rows one band reads, at most, and the copies' channel stride
    cdef Py_ssize_t band_rows = rows_per_band + (KH - 1) * g.dilation[1], ld_copy = band_rows * W
    cdef Py_ssize_t b, d, h0, h1, gi, gd, kd, kh, kw, tap, q, p, r, r0, r1, row_shift, col_shift, a0, a1
    cdef bint in_place
    cdef float value
    cdef float nonfinite = 0
    cdef Workspace ws
    cdef float* taps_w
    cdef float* shifted
    cdef float* band
    cdef const float* x_slice
    cdef const float* operand
    cdef Py_ssize_t ld_operand

    workspace_alloc(&ws, groups * K * qn * P * sizeof(float), KW * P * ld_copy * sizeof(float), 1)
    taps_w = <float*>ws.cols
    shifted = <float*>ws.packed
    # taps_w[gi, tap] = W_tap (qn x P, row-major) of group gi
    for gi in range(groups):
        for tap in range(K):
            for q in range(qn):
                for p in range(P):
                    value = w[((gi * P + p) * Q + q_first + q) * K + tap]
                    nonfinite += value - value  # NaN from a NaN or an infinity, else 0
                    taps_w[((gi * K + tap) * qn + q) * P + p] = value
    if nonfinite != 0:
        workspace_free(&ws)
        return 1
    for b in range(n):
        for d in range(g.image[0]):
            h0 = 0
            while h0 < H:
                h1 = h0 + rows_per_band if h0 + rows_per_band <= H else H
                for gi in range(groups):
                    band = y + (b * c_out + gi * Q + q_first) * g.image_cells + (d * H + h0) * W
                    for q in range(qn):
                        fill_channels(band + q * g.image_cells, 1, (h1 - h0) * W,
                                      bias_ptr + gi * Q + q_first + q, has_bias)
                    for kd in range(KD):
                        gd = d + g.pad[0] - kd * g.dilation[0]
                        if gd < 0 or gd >= GD:
                            continue
                        # the grid rows any kh reads for this band
                        r0 = h0 + g.pad[1] - (KH - 1) * g.dilation[1]
                        r0 = r0 if r0 > 0 else 0
                        r1 = h1 + g.pad[1] if h1 + g.pad[1] < GH else GH
                        if r0 >= r1:
                            continue
                        x_slice = x + ((b * c_in + gi * P) * GD + gd) * GH * GW
                        for kw in range(KW):
                            col_shift = g.pad[2] - kw * g.dilation[2]  # grid column = image column + shift
                            if col_shift == 0 and W == GW:
                                continue  # the grid rows themselves
                            for p in range(P):
                                for r in range(r0, r1):
                                    copy_strided(shifted + kw * P * ld_copy + p * ld_copy + (r - r0) * W,
                                                 x_slice + p * L + r * GW + col_shift, 1, 0,
                                                 -col_shift if col_shift < 0 else 0,
                                                 GW - col_shift if GW - col_shift < W else W, W)
                        for kh in range(KH):
                            row_shift = g.pad[1] - kh * g.dilation[1]  # grid row = image row + shift
                            a0 = h0 if h0 + row_shift >= 0 else -row_shift
                            a1 = h1 if h1 + row_shift <= GH else GH - row_shift
                            if a0 >= a1:
                                continue
                            for kw in range(KW):
                                tap = (kd * KH + kh) * KW + kw
                                col_shift = g.pad[2] - kw * g.dilation[2]
                                in_place = col_shift == 0 and W == GW
                                if in_place:
                                    operand, ld_operand = x_slice + (a0 + row_shift) * GW, L
                                else:
                                    operand = shifted + kw * P * ld_copy + (a0 + row_shift - r0) * W
                                    ld_operand = ld_copy
                                # band rows a0 .. a1 (qn x rows*W, rows image_cells apart) +=
                                # W_tap (qn x P) . grid rows a0 + shift .. (P x rows*W)
                                tconv_sgemm_nn(qn, (a1 - a0) * W, P, taps_w + (gi * K + tap) * qn * P, P, 1,
                                               operand, ld_operand, band + (a0 - h0) * W, g.image_cells,
                                               NULL, 1)
                h0 = h1
    workspace_free(&ws)
    return 0


# --------------------------------------------------------------------------- #
# a transposed convolution, planned once per shape
# --------------------------------------------------------------------------- #
cdef enum:
    ROUTE_COL2IM = 0
    ROUTE_PATCHES = 1
    ROUTE_SINGLE_CELL = 2
    ROUTE_SHIFTED = 3

_ROUTES = {"col2im": ROUTE_COL2IM, "patches": ROUTE_PATCHES, "single-cell": ROUTE_SINGLE_CELL,
           "shifted": ROUTE_SHIFTED}


cdef struct ScatterPlan:
    Geom g
    int route
    Py_ssize_t n, c_in, q, groups
    # col2im: samples_per_tile, cols_per_tile, n_tiles, q_block; patches: cells_per_tile, q_block;
    # shifted: rows_per_band
    Py_ssize_t tiling[4]
    bint interleaved, exact_cover, phased


cdef int run_scatter(const ScatterPlan* p, const floating* x, const floating* w, const floating* bias,
                     bint has_bias, floating* y, Py_ssize_t q_first, Py_ssize_t q_end) except -1 nogil:
    """0, or 1 where the shifted route met a non-finite weight and computed nothing.
    Output channels ``q_first .. q_end - 1`` of each group on the patches and shifted
    routes; the others write them all."""
    if p.route == ROUTE_SHIFTED:
        if floating is float:  # (ScatterCall takes this route for float32 only)
            return scatter_shifted(&p.g, x, w, bias, has_bias, y, p.n, p.c_in, p.q, p.groups,
                                   p.tiling[0], q_first, q_end)
        return 1
    if p.route == ROUTE_SINGLE_CELL:
        return scatter_single_cell(x, w, bias, has_bias, y, p.n, p.c_in, p.q * p.g.taps, p.g.taps, p.groups)
    if p.route == ROUTE_PATCHES:
        return scatter_patches(&p.g, x, w, bias, has_bias, y, p.n, p.c_in, p.q, p.groups,
                               p.tiling[0], p.tiling[1], q_first, q_end)
    return scatter_col2im(&p.g, x, w, bias, has_bias, y, p.n, p.c_in, p.q, p.groups, p.tiling[0],
                          p.tiling[1], p.tiling[2], p.tiling[3], p.interleaved, p.exact_cover, p.phased)


cdef class ScatterCall:
    """A transposed convolution of one shape, route and plan (``_blas_backend._scatter_call``
    makes them, once per shape): ``call(grid_in, weight, bias)`` returns the output.

    A layer called in a loop comes here on every call, so the arrays are taken
    as they are: their data pointers, after checking dtype, C order, alignment,
    byte order and element count (what the plan was made for). Typed
    memoryviews would check the shapes too, at 0.75 us for four arrays, a
    tenth of a small layer's whole call.

    The shifted route needs a ``fallback`` call of another route, for weights
    holding a NaN or an infinity (see ``scatter_shifted``).
    """
    cdef ScatterPlan plan
    cdef int type_num
    cdef object dtype
    cdef readonly object fallback
    cdef Py_ssize_t grid_size, weight_size, out_bytes
    cdef bint pooled
    cdef cnp.npy_intp out_dims[5]

    def __init__(self, str route, dtype, Py_ssize_t n, Py_ssize_t c_in, Py_ssize_t q,
                 tuple image, tuple grid, tuple kernel, tuple stride, tuple dilation, tuple pad,
                 Py_ssize_t groups, tuple tiling=(), bint interleaved=False, bint exact_cover=False,
                 bint phased=False, ScatterCall fallback=None):
        cdef int d
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"ScatterCall: dtype must be float32 or float64, got {self.dtype}")
        if route == "shifted":
            if self.dtype != np.float32 or not small_gemm_ready:
                raise ValueError("ScatterCall: the shifted route needs float32 and the unpacked kernel "
                                 "(small_gemm_available())")
            if stride != (1, 1, 1) or fallback is None:
                raise ValueError(f"ScatterCall: the shifted route needs stride (1, 1, 1) and a fallback "
                                 f"call, got stride {stride}, fallback {fallback}")
        self.fallback = fallback
        self.type_num = self.dtype.num
        self.plan.g = make_geom(image, grid, kernel, stride, dilation, pad)
        self.plan.route = _ROUTES[route]
        self.plan.n, self.plan.c_in, self.plan.q, self.plan.groups = n, c_in, q, groups
        for d in range(4):
            self.plan.tiling[d] = tiling[d] if d < len(tiling) else 0
        self.plan.interleaved, self.plan.exact_cover, self.plan.phased = interleaved, exact_cover, phased
        self.grid_size = n * c_in * self.plan.g.grid_cells
        self.weight_size = c_in * q * self.plan.g.taps
        self.out_dims[0], self.out_dims[1] = n, q * groups
        for d in range(3):
            self.out_dims[2 + d] = self.plan.g.image[d]
        self.out_bytes = n * q * groups * self.plan.g.image_cells * self.dtype.itemsize
        self.pooled = self.out_bytes >= RESULT_POOL_MIN_BYTES

    cdef int check(self, cnp.ndarray array, Py_ssize_t size, str name) except -1:
        # (ISCARRAY_RO: C-contiguous and aligned; ISNOTSWAPPED: native byte order)
        if (cnp.PyArray_TYPE(array) != self.type_num or not cnp.PyArray_ISCARRAY_RO(array)
                or not cnp.PyArray_ISNOTSWAPPED(array) or cnp.PyArray_SIZE(array) != size):
            raise ValueError(f"ScatterCall: {name} must be a C-contiguous, aligned, native {self.dtype} "
                             f"array of {size} elements, got {(<object>array).dtype} {(<object>array).shape}")
        return 0

    def __call__(self, cnp.ndarray grid_in not None, cnp.ndarray weight not None, object bias):
        """``out (N, C_out, D, H, W) = bias + scatter(grid_in, weight)``; ``bias`` may be None."""
        cdef bint has_bias = bias is not None
        cdef void* bias_data = NULL
        cdef cnp.ndarray out
        self.check(grid_in, self.grid_size, "grid_in")
        self.check(weight, self.weight_size, "weight")
        if has_bias:
            self.check(bias, self.out_dims[1], "bias")
            bias_data = cnp.PyArray_DATA(<cnp.ndarray>bias)
        if self.pooled:
            out = pooled_result(5, self.out_dims, self.dtype, self.out_bytes)
        else:
            out = cnp.PyArray_EMPTY(5, self.out_dims, self.type_num, 0)
        if self.run(grid_in, weight, bias_data, has_bias, out, 0, self.plan.q):
            return self.fallback(grid_in, weight, bias)  # a non-finite weight on the shifted route
        return out

    cdef int run(self, cnp.ndarray grid_in, cnp.ndarray weight, void* bias_data, bint has_bias,
                 cnp.ndarray out, Py_ssize_t q_first, Py_ssize_t q_end) except -1:
        """``run_scatter`` in the plan's dtype, on checked arrays."""
        cdef int status
        with nogil:
            if self.type_num == cnp.NPY_FLOAT32:
                status = run_scatter(&self.plan, <const float*>cnp.PyArray_DATA(grid_in),
                                     <const float*>cnp.PyArray_DATA(weight), <const float*>bias_data, has_bias,
                                     <float*>cnp.PyArray_DATA(out), q_first, q_end)
            else:
                status = run_scatter(&self.plan, <const double*>cnp.PyArray_DATA(grid_in),
                                     <const double*>cnp.PyArray_DATA(weight), <const double*>bias_data,
                                     has_bias, <double*>cnp.PyArray_DATA(out), q_first, q_end)
        return status

    def channels_into(self, cnp.ndarray grid_in not None, cnp.ndarray weight not None, object bias,
                      cnp.ndarray out not None, Py_ssize_t q_first, Py_ssize_t q_end):
        """Output channels ``q_first .. q_end - 1`` of each group, written into ``out``
        (patches and shifted routes): threads given disjoint ranges fill one output
        together. Returns False, writing nothing, where the shifted route meets a
        non-finite weight (the caller then runs ``fallback`` on the whole call)."""
        cdef bint has_bias = bias is not None
        cdef void* bias_data = NULL
        cdef Py_ssize_t out_size = self.out_dims[0] * self.out_dims[1] * self.plan.g.image_cells
        if self.plan.route != ROUTE_PATCHES and self.plan.route != ROUTE_SHIFTED:
            raise ValueError("ScatterCall.channels_into: only the patches and shifted routes run by "
                             "channel ranges")
        if not 0 <= q_first <= q_end <= self.plan.q:
            raise ValueError(f"ScatterCall.channels_into: channels {q_first}..{q_end} are not within 0..{self.plan.q}")
        self.check(grid_in, self.grid_size, "grid_in")
        self.check(weight, self.weight_size, "weight")
        self.check(out, out_size, "out")
        if not cnp.PyArray_ISWRITEABLE(out):
            raise ValueError("ScatterCall.channels_into: out is read-only")
        if has_bias:
            self.check(bias, self.out_dims[1], "bias")
            bias_data = cnp.PyArray_DATA(<cnp.ndarray>bias)
        return self.run(grid_in, weight, bias_data, has_bias, out, q_first, q_end) == 0

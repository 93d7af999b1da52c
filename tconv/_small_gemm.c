/* The single-precision GEMM kernels declared in _small_gemm.h (what they compute,
 * and why, is said there): a unit of their own, compiled into tconv._blas_core. */
#include <stddef.h>

#include "_small_gemm.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#define TCONV_AVX512 __attribute__((target("avx512f")))

int tconv_small_gemm_ready(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

static inline TCONV_AVX512 __mmask16 tconv_mask(ptrdiff_t left)
{
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* One block of C, mr <= 8 rows by nv <= 3 vectors of 16 columns (up to 24 of the 32
   AVX-512 registers), held in registers through the whole k loop and written once;
   with ``masked``, the last vector's columns are those of ``last`` (a block at C's
   right edge). Always inlined with constant mr, nv and masked, so that each shape is
   its own fully unrolled loop with its accumulators in registers. */
static inline __attribute__((always_inline)) TCONV_AVX512 void
tconv_nn_block(const int mr, const int nv, const int masked, __mmask16 last, ptrdiff_t k,
               const float* a, ptrdiff_t a_row, ptrdiff_t a_col, const float* b, ptrdiff_t ldb,
               float* c, ptrdiff_t ldc, const float* row_init, int accumulate)
{
    __m512 acc[8][3], bv[3];
    int i, v;
    ptrdiff_t p;
#pragma GCC unroll 8
    for (i = 0; i < mr; i++)
#pragma GCC unroll 3
        for (v = 0; v < nv; v++)
            acc[i][v] = row_init ? _mm512_set1_ps(row_init[i]) : _mm512_setzero_ps();
    for (p = 0; p < k; p++) {
        const float* row = b + p * ldb;
#pragma GCC unroll 3
        for (v = 0; v < nv; v++)
            bv[v] = masked && v == nv - 1 ? _mm512_maskz_loadu_ps(last, row + 16 * v) : _mm512_loadu_ps(row + 16 * v);
#pragma GCC unroll 8
        for (i = 0; i < mr; i++) {
            __m512 ai = _mm512_set1_ps(a[i * a_row + p * a_col]);
#pragma GCC unroll 3
            for (v = 0; v < nv; v++)
                acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }
#pragma GCC unroll 8
    for (i = 0; i < mr; i++)
#pragma GCC unroll 3
        for (v = 0; v < nv; v++) {
            float* out = c + i * ldc + 16 * v;
            if (masked && v == nv - 1) {
                __m512 r = accumulate ? _mm512_add_ps(acc[i][v], _mm512_maskz_loadu_ps(last, out)) : acc[i][v];
                _mm512_mask_storeu_ps(out, last, r);
            } else {
                _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(out)) : acc[i][v]);
            }
        }
}

typedef void tconv_nn_fn(__mmask16 last, ptrdiff_t k, const float* a, ptrdiff_t a_row, ptrdiff_t a_col,
                         const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc, const float* row_init,
                         int accumulate);

#define TCONV_NN_BLOCK(mr, nv, masked)                                                                    \
    static TCONV_AVX512 void tconv_nn_##mr##x##nv##_##masked(                                             \
        __mmask16 last, ptrdiff_t k, const float* a, ptrdiff_t a_row, ptrdiff_t a_col, const float* b,    \
        ptrdiff_t ldb, float* c, ptrdiff_t ldc, const float* row_init, int accumulate)                    \
    {                                                                                                     \
        tconv_nn_block(mr, nv, masked, last, k, a, a_row, a_col, b, ldb, c, ldc, row_init, accumulate);   \
    }
#define TCONV_NN_ROWS(mr) TCONV_NN_BLOCK(mr, 1, 1) TCONV_NN_BLOCK(mr, 2, 1) TCONV_NN_BLOCK(mr, 3, 1)
TCONV_NN_BLOCK(8, 1, 0) TCONV_NN_BLOCK(8, 2, 0) TCONV_NN_BLOCK(8, 3, 0)
TCONV_NN_ROWS(1) TCONV_NN_ROWS(2) TCONV_NN_ROWS(3) TCONV_NN_ROWS(4)
TCONV_NN_ROWS(5) TCONV_NN_ROWS(6) TCONV_NN_ROWS(7) TCONV_NN_ROWS(8)

/* The full blocks of 16, 32, 48 columns; and the edge blocks, by [rows - 1][vectors - 1]. */
static tconv_nn_fn* const tconv_nn_full[3] = {tconv_nn_8x1_0, tconv_nn_8x2_0, tconv_nn_8x3_0};
#define TCONV_NN_EDGE_ROW(mr) {tconv_nn_##mr##x1_1, tconv_nn_##mr##x2_1, tconv_nn_##mr##x3_1}
static tconv_nn_fn* const tconv_nn_edge[8][3] = {
    TCONV_NN_EDGE_ROW(1), TCONV_NN_EDGE_ROW(2), TCONV_NN_EDGE_ROW(3), TCONV_NN_EDGE_ROW(4),
    TCONV_NN_EDGE_ROW(5), TCONV_NN_EDGE_ROW(6), TCONV_NN_EDGE_ROW(7), TCONV_NN_EDGE_ROW(8)};

/* Row block (mr <= 8 rows) of C across columns [j, n): blocks of 48 columns, then
   what is left (under 48) in one block of 1-3 vectors, the last one masked if short;
   64 left go as two blocks of 32, not 48 and 16 (an 8 x 16 block, one load of B for
   8 FMAs, runs at about half speed: DCGAN 256->128's weight gradient, 256 wide). */
static inline TCONV_AVX512 void tconv_nn_row_block(ptrdiff_t mr, ptrdiff_t j, ptrdiff_t n, ptrdiff_t k,
                                                   const float* a, ptrdiff_t a_row, ptrdiff_t a_col,
                                                   const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                                                   const float* row_init, int accumulate)
{
    ptrdiff_t left;
    for (; n - j >= 48 && n - j != 64; j += 48)
        (mr == 8 ? tconv_nn_full[2] : tconv_nn_edge[mr - 1][2])(
            0xFFFF, k, a, a_row, a_col, b + j, ldb, c + j, ldc, row_init, accumulate);
    if (n - j == 64) {
        (mr == 8 ? tconv_nn_full[1] : tconv_nn_edge[mr - 1][1])(
            0xFFFF, k, a, a_row, a_col, b + j, ldb, c + j, ldc, row_init, accumulate);
        j += 32;
    }
    left = n - j;
    if (left <= 0)
        return;
    if (mr == 8 && left % 16 == 0)
        tconv_nn_full[left / 16 - 1](0xFFFF, k, a, a_row, a_col, b + j, ldb, c + j, ldc, row_init, accumulate);
    else
        tconv_nn_edge[mr - 1][(left - 1) / 16](tconv_mask(left - 16 * ((left - 1) / 16)), k, a, a_row, a_col,
                                                b + j, ldb, c + j, ldc, row_init, accumulate);
}

/* Columns outside: a K x 48 panel of B stays in L1 while every row block reads it
   (A read whole for each panel). An A of more than TCONV_A_WHOLE elements is taken
   in chunks of its columns (K) of about TCONV_A_CHUNK elements, each chunk's product
   added into C, where that leaves chunks of at least TCONV_A_MIN_CHUNK columns: a
   chunk stays in L2 while the panels read it, where the whole A would stream from
   L3 once a panel (and from both cores' share of it, at two). */
#define TCONV_A_WHOLE (1 << 20)
#define TCONV_A_CHUNK (1 << 18)
#define TCONV_A_MIN_CHUNK 256  /* shorter chunks, C passed over once per chunk, lost: M 4096 K 512 in 64s 106 -> 83 GFLOP/s */
TCONV_AVX512 void tconv_sgemm_nn(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row,
                                 ptrdiff_t a_col, const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                                 const float* row_init, int accumulate)
{
    ptrdiff_t i, j, p, kc = k > 0 ? k : 1, kp;
    if (m * k > TCONV_A_WHOLE && TCONV_A_CHUNK / m >= TCONV_A_MIN_CHUNK)
        kc = TCONV_A_CHUNK / m;
    for (p = 0; p == 0 || p < k; p += kc) {  /* (once at K = 0: C is still written, from its start) */
        kp = k - p < kc ? k - p : kc;
        for (j = 0; j < n; j += 48)
            for (i = 0; i < m; i += 8)
                tconv_nn_row_block(m - i < 8 ? m - i : 8, j, n - j < 48 ? n : j + 48, kp,
                                   a + i * a_row + p * a_col, a_row, a_col, b + p * ldb, ldb, c + i * ldc, ldc,
                                   p == 0 && row_init ? row_init + i : 0, p == 0 ? accumulate : 1);
    }
}

/* Rows outside: an 8 x K panel of A stays in L1/L2 while the row block sweeps all of
   B, which streams from L3 (the large products im2col makes: A a weight of 256 x 2048,
   B a 2048 x 512 column buffer). */
TCONV_AVX512 void tconv_sgemm_nn_rows(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a,
                                      ptrdiff_t a_row, ptrdiff_t a_col, const float* b, ptrdiff_t ldb,
                                      float* c, ptrdiff_t ldc, const float* row_init, int accumulate)
{
    ptrdiff_t i;
    for (i = 0; i < m; i += 8)
        tconv_nn_row_block(m - i < 8 ? m - i : 8, 0, n, k, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc,
                           ldc, row_init ? row_init + i : 0, accumulate);
}

#else  /* not GCC/Clang on x86-64: BLAS only */

int tconv_small_gemm_ready(void) { return 0; }
void tconv_sgemm_nn(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row, ptrdiff_t a_col,
                    const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc, const float* row_init, int accumulate) {}
void tconv_sgemm_nn_rows(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row,
                         ptrdiff_t a_col, const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                         const float* row_init, int accumulate) {}

#endif

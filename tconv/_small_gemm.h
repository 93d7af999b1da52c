/* Single-precision GEMMs for the thin products im2col makes, without packing.
 *
 * Row-major (unlike the BLAS calls next to them):
 *   tconv_sgemm_nn:  C (M x N)  = or +=  A (M x K) . B (K x N)
 * with row strides ldb and ldc; A[i, p] is read at a[i * a_row + p * a_col]
 * (a_col = 1: row-major with row stride a_row; a_row = 1: the transpose of a
 * row-major matrix with row stride a_col).
 *
 * Why: where one side of a product is short (a backward pass's K = C * taps
 * of 48-144, or its 32-64 output channels), OpenBLAS copies ("packs") both
 * operands into its own layout first and that copy costs about as much as
 * the multiply (DCGAN 64->3's backward: 25% of the time in packing, 7% more
 * zeroing C for beta 0). This kernel reads the operands where they are and
 * keeps an 8 x 48 block of C in 24 AVX-512 registers, broadcasting A and
 * loading rows of B. (A dot-product kernel for A B^T, the weight gradient's
 * shape, ran at 0.36-0.73x OpenBLAS and was dropped.)
 *
 * AVX-512F only, checked at run time (tconv_small_gemm_ready); elsewhere the
 * callers keep using BLAS, and tconv_sgemm_nn is never called.
 */
#ifndef TCONV_SMALL_GEMM_H
#define TCONV_SMALL_GEMM_H

#include <stddef.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#define TCONV_AVX512 __attribute__((target("avx512f")))

static int tconv_small_gemm_ready(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

static inline TCONV_AVX512 __mmask16 tconv_mask(ptrdiff_t left)
{
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* A full 8 x 48 block of C: its 24 registers are written straight from the loop. */
static inline TCONV_AVX512 void tconv_nn_full(ptrdiff_t k, const float* a, ptrdiff_t a_row, ptrdiff_t a_col,
                                              const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                                              const float* row_init, int accumulate)
{
    __m512 acc[8][3];
    int i, v;
    ptrdiff_t p;
#pragma GCC unroll 8
    for (i = 0; i < 8; i++)
#pragma GCC unroll 3
        for (v = 0; v < 3; v++)
            acc[i][v] = row_init ? _mm512_set1_ps(row_init[i]) : _mm512_setzero_ps();
    for (p = 0; p < k; p++) {
        const float* row = b + p * ldb;
        __m512 b0 = _mm512_loadu_ps(row), b1 = _mm512_loadu_ps(row + 16), b2 = _mm512_loadu_ps(row + 32);
#pragma GCC unroll 8
        for (i = 0; i < 8; i++) {
            __m512 ai = _mm512_set1_ps(a[i * a_row + p * a_col]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(ai, b2, acc[i][2]);
        }
    }
#pragma GCC unroll 8
    for (i = 0; i < 8; i++)
#pragma GCC unroll 3
        for (v = 0; v < 3; v++) {
            float* out = c + i * ldc + 16 * v;
            _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(out)) : acc[i][v]);
        }
}

/* A block at C's edges, of mr <= 8 rows and nr <= 48 columns, one of them short
   (masked loads and stores). */
static inline TCONV_AVX512 void tconv_nn_edge(ptrdiff_t mr, ptrdiff_t nr, ptrdiff_t k,
                                              const float* a, ptrdiff_t a_row, ptrdiff_t a_col,
                                              const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                                              const float* row_init, int accumulate)
{
    __m512 acc[8][3];
    __mmask16 mask[3];
    int i, v;
    ptrdiff_t p;
    for (v = 0; v < 3; v++)
        mask[v] = tconv_mask(nr - 16 * v);
    for (i = 0; i < 8; i++)
        for (v = 0; v < 3; v++)
            acc[i][v] = row_init && i < mr ? _mm512_set1_ps(row_init[i]) : _mm512_setzero_ps();
    for (p = 0; p < k; p++) {
        const float* row = b + p * ldb;
        __m512 b0 = _mm512_maskz_loadu_ps(mask[0], row), b1 = _mm512_maskz_loadu_ps(mask[1], row + 16),
               b2 = _mm512_maskz_loadu_ps(mask[2], row + 32);
#pragma GCC unroll 8
        for (i = 0; i < 8; i++) {
            if (i < mr) {
                __m512 ai = _mm512_set1_ps(a[i * a_row + p * a_col]);
                acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
                acc[i][2] = _mm512_fmadd_ps(ai, b2, acc[i][2]);
            }
        }
    }
    for (i = 0; i < mr; i++) {
        float* out = c + i * ldc;
        for (v = 0; v < 3; v++) {
            __m512 r = acc[i][v];
            if (accumulate)
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask[v], out + 16 * v));
            _mm512_mask_storeu_ps(out + 16 * v, mask[v], r);
        }
    }
}

static TCONV_AVX512 void tconv_sgemm_nn(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row,
                                        ptrdiff_t a_col, const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                                        const float* row_init, int accumulate)
{
    ptrdiff_t i, j;
    /* column blocks outside: a K x 48 panel of B stays in L1 while every row block reads it */
    for (j = 0; j < n; j += 48)
        for (i = 0; i < m; i += 8) {
            if (m - i >= 8 && n - j >= 48)
                tconv_nn_full(k, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc,
                              row_init ? row_init + i : 0, accumulate);
            else
                tconv_nn_edge(m - i < 8 ? m - i : 8, n - j < 48 ? n - j : 48, k,
                              a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc,
                              row_init ? row_init + i : 0, accumulate);
        }
}

#else  /* not GCC/Clang on x86-64: BLAS only */

static int tconv_small_gemm_ready(void) { return 0; }
static void tconv_sgemm_nn(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row,
                           ptrdiff_t a_col, const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                           const float* row_init, int accumulate) {}

#endif
#endif

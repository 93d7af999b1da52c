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
 * shape, ran at 0.36-0.73x OpenBLAS and was dropped: the weight gradient is
 * summed transposed instead, cols . dY^T, in this kernel's form.)
 *
 * With full blocks at C's edges too (16 or 32 columns), it also beats OpenBLAS
 * 0.3.34 on im2col's large products (see KERNEL_MIN_COLUMNS in _blas_core.pyx;
 * a large A in chunks of K): an 8 x 48 block runs at ~117 GFLOP/s on one core, and
 * reading the operands where they are saves the 10% OpenBLAS spends packing.
 *
 * AVX-512F only, checked at run time (tconv_small_gemm_ready); elsewhere the
 * callers keep using BLAS, and tconv_sgemm_nn is never called.
 */
#ifndef TCONV_SMALL_GEMM_H
#define TCONV_SMALL_GEMM_H

#include <stddef.h>

/* Defined in _small_gemm.c, a unit of its own: its 27 fully unrolled kernels,
   written here as static functions, counted against GCC's inlining budget for
   _blas_core.c and the float64 im2col lost some of its inlining (the
   autoencoder's float64 backward 5-8% slower; apart, within 3%). */
int tconv_small_gemm_ready(void);
void tconv_sgemm_nn(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row, ptrdiff_t a_col,
                    const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc, const float* row_init, int accumulate);
void tconv_sgemm_nn_rows(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const float* a, ptrdiff_t a_row,
                         ptrdiff_t a_col, const float* b, ptrdiff_t ldb, float* c, ptrdiff_t ldc,
                         const float* row_init, int accumulate);

#endif

/* Small transposes for the sample-minor ("interleaved") tiles of this package's _kernels.pyx.
 *
 * Packing a tile sample-minor and storing it back are transposes of (samples x cells)
 * blocks; element by element they ran at one value per cycle or less (the compiler
 * does not turn a transpose into shuffles). A 4 x 4 block through four SSE registers
 * moves 16 values in 8 loads and stores. SSE is part of every x86-64 CPU; elsewhere
 * the plain loop stands in.
 *
 * A copy of tconv/_simd.h (the plugin builds without tconv's sources).
 */
#ifndef TCONV_SIMD_H
#define TCONV_SIMD_H

#include <stddef.h>

#if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>

/* dst[j * dst_stride + i] = src[i * src_stride + j] for i, j in 0..3 */
static inline void transpose4_f32(const float* src, ptrdiff_t src_stride, float* dst, ptrdiff_t dst_stride)
{
    __m128 r0 = _mm_loadu_ps(src);
    __m128 r1 = _mm_loadu_ps(src + src_stride);
    __m128 r2 = _mm_loadu_ps(src + 2 * src_stride);
    __m128 r3 = _mm_loadu_ps(src + 3 * src_stride);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    _mm_storeu_ps(dst, r0);
    _mm_storeu_ps(dst + dst_stride, r1);
    _mm_storeu_ps(dst + 2 * dst_stride, r2);
    _mm_storeu_ps(dst + 3 * dst_stride, r3);
}

#else

static inline void transpose4_f32(const float* src, ptrdiff_t src_stride, float* dst, ptrdiff_t dst_stride)
{
    for (ptrdiff_t i = 0; i < 4; ++i)
        for (ptrdiff_t j = 0; j < 4; ++j)
            dst[j * dst_stride + i] = src[i * src_stride + j];
}

#endif
#endif /* TCONV_SIMD_H */

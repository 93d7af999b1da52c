// im2col and col2im of the tconv CuPy backend, in gather form.
//
// One GPU thread computes one output element and writes it once: col2im
// sums, in a fixed order (taps ascending), every column entry that lands on
// its image cell. So there are no atomics, and results are deterministic.
//
// NVRTC compiles this file through cupy.RawModule (no #include: NVRTC has no
// standard headers). It is also valid host C++ under nvcc: the element
// functions are __host__ __device__, and the test suite runs them on the CPU.
//
// Sizes travel in `geo`, 18 int64: image[3], grid[3], kernel[3], stride[3],
// dilation[3], pad_begin[3], each (D, H, W). An image cell and a grid cell
// meet at tap k when image = grid * stride - pad_begin + k * dilation.

typedef long long i64;

#define TCONV_HD __host__ __device__

enum { IMAGE = 0, GRID = 3, KERNEL = 6, STRIDE = 9, DILATION = 12, PAD = 15 };

// cols[n * stride_n + g * stride_g + r * stride_r + l] = image[n, g*P + p, image(l, k)],
// r = p * K + k, 0 where the tap falls off the image; e runs over (n, g, r, l).
template <typename T>
TCONV_HD inline void im2col_at(i64 e, const T* image, T* cols, const i64* geo, i64 groups,
                               i64 p, i64 stride_n, i64 stride_g, i64 stride_r) {
    const i64 K1 = geo[KERNEL + 1], K2 = geo[KERNEL + 2];
    const i64 G1 = geo[GRID + 1], G2 = geo[GRID + 2];
    const i64 K = geo[KERNEL] * K1 * K2;
    const i64 L = geo[GRID] * G1 * G2;
    const i64 l = e % L;
    i64 rest = e / L;
    const i64 r = rest % (p * K);
    rest /= p * K;
    const i64 g = rest % groups;
    const i64 n = rest / groups;
    const i64 channel = r / K, k = r % K;
    const i64 tap[3] = {k / (K1 * K2), (k / K2) % K1, k % K2};
    const i64 cell[3] = {l / (G1 * G2), (l / G2) % G1, l % G2};
    i64 at[3];
    bool inside = true;
    for (int d = 0; d < 3; ++d) {
        at[d] = cell[d] * geo[STRIDE + d] - geo[PAD + d] + tap[d] * geo[DILATION + d];
        inside = inside && at[d] >= 0 && at[d] < geo[IMAGE + d];
    }
    T value = 0;
    if (inside) {
        const i64 plane = ((n * groups + g) * p + channel);
        value = image[((plane * geo[IMAGE] + at[0]) * geo[IMAGE + 1] + at[1]) * geo[IMAGE + 2] + at[2]];
    }
    cols[n * stride_n + g * stride_g + r * stride_r + l] = value;
}

// out[n, g*Q + q, i] = bias[g*Q + q] + sum over taps k landing on i of
// cols[n, g, q*K + k, l(i, k)]; cols is (N, G, Q*K, L), out (N, G*Q, I).
template <typename T>
TCONV_HD inline void col2im_at(i64 e, const T* cols, T* out, const T* bias, int has_bias,
                               const i64* geo, i64 groups, i64 q) {
    const i64 I1 = geo[IMAGE + 1], I2 = geo[IMAGE + 2];
    const i64 K0 = geo[KERNEL], K1 = geo[KERNEL + 1], K2 = geo[KERNEL + 2];
    const i64 G0 = geo[GRID], G1 = geo[GRID + 1], G2 = geo[GRID + 2];
    const i64 I = geo[IMAGE] * I1 * I2, K = K0 * K1 * K2, L = G0 * G1 * G2;
    const i64 i = e % I;
    const i64 channel = (e / I) % (groups * q);
    const i64 n = e / (I * groups * q);
    const i64 at[3] = {i / (I1 * I2), (i / I2) % I1, i % I2};
    // column block of this (sample, group, channel): rows q*K .. q*K + K - 1
    const T* block = cols + ((n * groups + channel / q) * q * K + (channel % q) * K) * L;
    T sum = 0;
    for (i64 k0 = 0; k0 < K0; ++k0) {
        const i64 t0 = at[0] + geo[PAD] - k0 * geo[DILATION];
        if (t0 < 0 || t0 % geo[STRIDE] != 0 || t0 / geo[STRIDE] >= G0) continue;
        for (i64 k1 = 0; k1 < K1; ++k1) {
            const i64 t1 = at[1] + geo[PAD + 1] - k1 * geo[DILATION + 1];
            if (t1 < 0 || t1 % geo[STRIDE + 1] != 0 || t1 / geo[STRIDE + 1] >= G1) continue;
            for (i64 k2 = 0; k2 < K2; ++k2) {
                const i64 t2 = at[2] + geo[PAD + 2] - k2 * geo[DILATION + 2];
                if (t2 < 0 || t2 % geo[STRIDE + 2] != 0 || t2 / geo[STRIDE + 2] >= G2) continue;
                const i64 l = ((t0 / geo[STRIDE]) * G1 + t1 / geo[STRIDE + 1]) * G2 + t2 / geo[STRIDE + 2];
                sum += block[((k0 * K1 + k1) * K2 + k2) * L + l];
            }
        }
    }
    out[e] = has_bias ? bias[channel] + sum : sum;
}

// Grid-stride loops: any launch size covers `total` elements.
#define TCONV_KERNELS(T, SUFFIX)                                                              \
    extern "C" __global__ void im2col_##SUFFIX(const T* image, T* cols, const i64* geo,       \
                                               i64 groups, i64 p, i64 stride_n, i64 stride_g, \
                                               i64 stride_r, i64 total) {                     \
        for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;                   \
             e += (i64)blockDim.x * gridDim.x)                                                \
            im2col_at<T>(e, image, cols, geo, groups, p, stride_n, stride_g, stride_r);       \
    }                                                                                         \
    extern "C" __global__ void col2im_##SUFFIX(const T* cols, T* out, const T* bias,          \
                                               int has_bias, const i64* geo, i64 groups,      \
                                               i64 q, i64 total) {                            \
        for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;                   \
             e += (i64)blockDim.x * gridDim.x)                                                \
            col2im_at<T>(e, cols, out, bias, has_bias, geo, groups, q);                       \
    }

TCONV_KERNELS(float, f32)
TCONV_KERNELS(double, f64)

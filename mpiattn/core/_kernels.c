/* Fused float32 element-wise kernels of the encoder's NumPy path (mpiattn.core.kernels).
 *
 * Each kernel does in one pass over memory what NumPy does in several passes and
 * temporaries: GELU with its bias, the softmax of attention scores laid out (keys,
 * queries), the store of attention's output heads, and LayerNorm after a residual add.
 *
 * Plain C99, no Python headers: the library is loaded with ctypes, so it builds where
 * Python's headers are missing. Built without -ffast-math: the sums run in 16 fixed lanes
 * and NaN and infinities propagate as NumPy's do; products may contract into FMA, so,
 * as with BLAS, the last bit depends on the CPU (each function has an AVX-512, an AVX2
 * and a baseline clone, picked when the library loads). exp is Cephes' expf (S. L.
 * Moshier, Cephes Math Library, 1984-2000): Cody-Waite reduction by ln 2 and a degree-6
 * polynomial, under 2 ulp, written so that compilers vectorise it without libm.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(MPIATTN_NO_CLONES)
#define MPIATTN_CLONES 1
#define CLONED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONED
#endif

#define LANES 16

#define EXP_HI 88.3762626647949f  /* the largest float's logarithm */
#define EXP_LO -87.3365447505531f /* the smallest normal float's logarithm */

/* e^x for x in [EXP_LO, EXP_HI]: n = round(x / ln 2) by the 1.5 * 2^23 trick (round to
 * nearest, no libm call), r = x - n ln 2 in two parts, e^r by Cephes' polynomial, and 2^n
 * put into the exponent bits. n + 127 is read from the low bits of k (0x4B400000 + n),
 * in unsigned arithmetic: no float-to-int conversion, which for NaN would be undefined
 * behaviour (NaN gives NaN through p). */
static inline float exp_in_range(float x) {
    float k = x * 1.44269504088896341f + 12582912.0f;
    float n = k - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r;
    p = p + 1.0f;
    uint32_t bits;
    memcpy(&bits, &k, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* e^x for x <= 0 (the softmax's shifted scores): 0 below EXP_LO (so -inf gives 0), NaN
 * for NaN. */
static inline float exp_nonpositive(float x) {
    float y = exp_in_range(x < EXP_LO ? EXP_LO : x);
    return x < EXP_LO ? 0.0f : y;
}

static inline float lane_sum(const float *restrict v, ptrdiff_t n) {
    float acc[LANES] = {0};
    ptrdiff_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += v[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += v[i];
    for (int w = LANES / 2; w; w >>= 1)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0] + tail;
}

static inline float lane_sum_squares(const float *restrict v, ptrdiff_t n) {
    float acc[LANES] = {0};
    ptrdiff_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += v[i + j] * v[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += v[i] * v[i];
    for (int w = LANES / 2; w; w >>= 1)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0] + tail;
}

/* Abramowitz & Stegun (1964) 7.1.26 for Phi(-|x|) = erfc(|x| / sqrt 2) / 2: p / sqrt 2
 * and a1..a5 / 2, as mpiattn.core.ops._gelu_blocks has them. */
#define GELU_P 0.231641900f
#define GELU_A1 0.127414796f
#define GELU_A2 -0.142248368f
#define GELU_A3 0.710706871f
#define GELU_A4 -0.726576014f
#define GELU_A5 0.530702715f

static inline float gelu_f(float x) {
    float a = fabsf(x);
    float t = 1.0f / (a * GELU_P + 1.0f);
    float y = t * GELU_A5;
    y = (y + GELU_A4) * t;
    y = (y + GELU_A3) * t;
    y = (y + GELU_A2) * t;
    y = (y + GELU_A1) * t;
    float e = exp_nonpositive((x * x) * -0.5f);
    y = (y * e) * a;
    return (x > 0.0f ? x : 0.0f) - y;
}

/* out[r, c] = GELU(x[r, c] + bias[c]) for (rows, cols) arrays; bias may be NULL; out may
 * not overlap x. */
CLONED void mpiattn_gelu(const float *x, const float *bias, float *out, ptrdiff_t rows,
                         ptrdiff_t cols) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * cols;
        float *restrict o = out + r * cols;
        if (bias) {
            const float *restrict b = bias;
            for (ptrdiff_t c = 0; c < cols; c++) o[c] = gelu_f(xr[c] + b[c]);
        } else {
            for (ptrdiff_t c = 0; c < cols; c++) o[c] = gelu_f(xr[c]);
        }
    }
}

#define COLUMN_BLOCK 512

/* Softmax down the columns of each of `groups` (rows, cols) score blocks, in place:
 * s[h, r, c] <- exp(s[h, r, c] - max_r s[h, r, c]), and total[h, c] receives the column
 * sums (the caller divides). */
CLONED void mpiattn_softmax_columns(float *s, float *total, ptrdiff_t groups,
                                    ptrdiff_t rows, ptrdiff_t cols) {
    float top[COLUMN_BLOCK];
    if (rows <= 0) { /* no keys: empty sums (the caller's 0 / 0 is NaN), and no row 0 */
        for (ptrdiff_t i = 0; i < groups * cols; i++) total[i] = 0.0f;
        return;
    }
    for (ptrdiff_t h = 0; h < groups; h++) {
        float *block = s + h * rows * cols;
        for (ptrdiff_t c0 = 0; c0 < cols; c0 += COLUMN_BLOCK) {
            ptrdiff_t w = cols - c0 < COLUMN_BLOCK ? cols - c0 : COLUMN_BLOCK;
            float *restrict m = top;
            float *restrict t = total + h * cols + c0;
            memcpy(m, block + c0, (size_t)w * sizeof(float));
            for (ptrdiff_t r = 1; r < rows; r++) {
                const float *restrict row = block + r * cols + c0;
                for (ptrdiff_t c = 0; c < w; c++) m[c] = row[c] > m[c] ? row[c] : m[c];
            }
            for (ptrdiff_t c = 0; c < w; c++) t[c] = 0.0f;
            for (ptrdiff_t r = 0; r < rows; r++) {
                float *restrict row = block + r * cols + c0;
                for (ptrdiff_t c = 0; c < w; c++) {
                    float e = exp_nonpositive(row[c] - m[c]);
                    row[c] = e;
                    t[c] += e;
                }
            }
        }
    }
}

/* dest[q, h, :] = o[h, q, :] / total[h, q] for o (groups, queries, head_dim), total
 * (groups, queries); dest's rows are dest_row floats apart (its heads side by side). */
CLONED void mpiattn_store_heads(const float *o, const float *total, float *dest,
                                ptrdiff_t groups, ptrdiff_t queries, ptrdiff_t head_dim,
                                ptrdiff_t dest_row) {
    for (ptrdiff_t q = 0; q < queries; q++)
        for (ptrdiff_t h = 0; h < groups; h++) {
            const float *restrict src = o + (h * queries + q) * head_dim;
            float *restrict dst = dest + q * dest_row + h * head_dim;
            float t = total[h * queries + q];
            for (ptrdiff_t j = 0; j < head_dim; j++) dst[j] = src[j] / t;
        }
}

/* out = LayerNorm(x + bias + residual) over the rows of (rows, cols) arrays, with gain g
 * and shift b; total (or NULL) receives x + bias; bias may be NULL. out may not be x or
 * residual. rstd = 1 / sqrt(mean((v - mean v)^2) + eps). */
CLONED void mpiattn_add_layer_norm(const float *x, const float *residual, const float *bias,
                                   const float *g, const float *b, float eps, float *total,
                                   float *out, ptrdiff_t rows, ptrdiff_t cols) {
    const float inv_cols = 1.0f / (float)cols;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * cols;
        const float *restrict res = residual + r * cols;
        float *restrict o = out + r * cols;
        if (bias && total) {
            float *restrict tr = total + r * cols;
            for (ptrdiff_t c = 0; c < cols; c++) {
                float v = xr[c] + bias[c];
                tr[c] = v;
                o[c] = v + res[c];
            }
        } else if (bias) {
            for (ptrdiff_t c = 0; c < cols; c++) o[c] = (xr[c] + bias[c]) + res[c];
        } else {
            if (total) memcpy(total + r * cols, xr, (size_t)cols * sizeof(float));
            for (ptrdiff_t c = 0; c < cols; c++) o[c] = xr[c] + res[c];
        }
        float mean = lane_sum(o, cols) * inv_cols;
        for (ptrdiff_t c = 0; c < cols; c++) o[c] -= mean;
        float rstd = 1.0f / sqrtf(lane_sum_squares(o, cols) * inv_cols + eps);
        for (ptrdiff_t c = 0; c < cols; c++) o[c] = (o[c] * rstd) * g[c] + b[c];
    }
}

/* Which clone the loader picked, by the test the clones' resolver makes. */
const char *mpiattn_kernels_isa(void) {
#ifdef MPIATTN_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "AVX-512 clone";
    if (__builtin_cpu_supports("avx2")) return "AVX2 clone";
    return "baseline clone";
#else
    return "one build for this machine";
#endif
}

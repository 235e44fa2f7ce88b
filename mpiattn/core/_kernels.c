/* Fused float32 element-wise kernels of the encoder's NumPy path (mpiattn.core.kernels).
 *
 * Each kernel does in one pass over memory what NumPy does in several passes and
 * temporaries: GELU with its bias, attention (scores, softmax and the product with V in
 * one pass), and LayerNorm after a residual add.
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

/* Attention, fused: FlashAttention's order (T. Dao et al., "FlashAttention", NeurIPS 2022)
 * on one core. A block of QUERY_BLOCK queries' scores against every key are made, put
 * through the softmax and multiplied by V while they sit in the L1 cache: no score array
 * goes to memory. The products run on register tiles written with GCC's vector
 * extensions (16 floats, one AVX-512 register; two AVX2 or four SSE registers in the
 * other clones): 8 queries x 32 keys for the scores, 8 queries x 32 columns for P V. */
typedef float vec16 __attribute__((vector_size(64)));
/* Loads and stores through this type may alias the float arrays (as x86's own __m512). */
typedef float vec16_unaligned __attribute__((vector_size(64), aligned(4), may_alias));
#define LOAD16(p) (*(const vec16_unaligned *)(p))
#define STORE16(p, x) (*(vec16_unaligned *)(p) = (x))
#define INLINE static inline __attribute__((always_inline))

/* 8 queries: the score tile takes 16 of AVX-512's 32 registers; 16 queries (every
 * register) measured within 1% on one AMD EPYC core, 12 slower. */
#define QUERY_BLOCK 8
#define KEY_BLOCK 32

/* s[i, j] = sum_c qs[i, c] kt[c, j] for QUERY_BLOCK queries (qs rows d apart) and
 * KEY_BLOCK keys (kt rows `keys_padded` apart); s rows s_row apart. */
INLINE void score_tile(const float *restrict qs, const float *restrict kt, ptrdiff_t d,
                       ptrdiff_t keys_padded, float *restrict s, ptrdiff_t s_row) {
    vec16 acc[QUERY_BLOCK][2];
    for (int i = 0; i < QUERY_BLOCK; i++) acc[i][0] = acc[i][1] = (vec16){0};
    for (ptrdiff_t c = 0; c < d; c++) {
        vec16 k0 = LOAD16(kt + c * keys_padded), k1 = LOAD16(kt + c * keys_padded + 16);
        for (int i = 0; i < QUERY_BLOCK; i++) {
            float x = qs[i * d + c];
            acc[i][0] += x * k0;
            acc[i][1] += x * k1;
        }
    }
    for (int i = 0; i < QUERY_BLOCK; i++) {
        STORE16(s + i * s_row, acc[i][0]);
        STORE16(s + i * s_row + 16, acc[i][1]);
    }
}

/* o[i, 0:16 W] = sum_{j < keys} p[i, j] v[j, 0:16 W] for QUERY_BLOCK queries: W = 2 or 1
 * vectors of V's columns (v rows v_row apart, p rows p_row apart, o rows o_row apart). */
#define PV_TILE(NAME, W)                                                                   \
    INLINE void NAME(const float *restrict p, ptrdiff_t p_row, const float *restrict v,    \
                     ptrdiff_t v_row, ptrdiff_t keys, float *restrict o, ptrdiff_t o_row) { \
        vec16 acc[QUERY_BLOCK][W];                                                         \
        for (int i = 0; i < QUERY_BLOCK; i++)                                              \
            for (int w = 0; w < W; w++) acc[i][w] = (vec16){0};                            \
        for (ptrdiff_t j = 0; j < keys; j++) {                                             \
            vec16 x[W];                                                                    \
            for (int w = 0; w < W; w++) x[w] = LOAD16(v + j * v_row + 16 * w);             \
            for (int i = 0; i < QUERY_BLOCK; i++) {                                        \
                float pij = p[i * p_row + j];                                              \
                for (int w = 0; w < W; w++) acc[i][w] += pij * x[w];                       \
            }                                                                              \
        }                                                                                  \
        for (int i = 0; i < QUERY_BLOCK; i++)                                              \
            for (int w = 0; w < W; w++) STORE16(o + i * o_row + 16 * w, acc[i][w]);        \
    }
PV_TILE(pv_tile32, 2)
PV_TILE(pv_tile16, 1)

/* The columns c0..cols of P V that are not a multiple of 16 (head_dim 8, 20, ...). */
INLINE void pv_columns(const float *restrict p, ptrdiff_t p_row, const float *restrict v,
                       ptrdiff_t v_row, ptrdiff_t keys, float *restrict o, ptrdiff_t o_row,
                       ptrdiff_t cols) {
    for (int i = 0; i < QUERY_BLOCK; i++) {
        float *restrict oi = o + i * o_row;
        for (ptrdiff_t c = 0; c < cols; c++) oi[c] = 0.0f;
        for (ptrdiff_t j = 0; j < keys; j++) {
            float pij = p[i * p_row + j];
            for (ptrdiff_t c = 0; c < cols; c++) oi[c] += pij * v[j * v_row + c];
        }
    }
}

/* s[j] <- exp(s[j] - max s) for j < n, in place; returns their sum (lanes, then a tree). */
INLINE float softmax_row(float *restrict s, ptrdiff_t n) {
    float top[LANES];
    for (int l = 0; l < LANES; l++) top[l] = -INFINITY;
    ptrdiff_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) top[l] = s[j + l] > top[l] ? s[j + l] : top[l];
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++) m = top[l] > m ? top[l] : m;
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    float acc[LANES] = {0};
    for (j = 0; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float e = exp_nonpositive(s[j + l] - m);
            s[j + l] = e;
            acc[l] += e;
        }
    float tail = 0.0f;
    for (; j < n; j++) {
        float e = exp_nonpositive(s[j] - m);
        s[j] = e;
        tail += e;
    }
    for (int w = LANES / 2; w; w >>= 1)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0] + tail;
}

/* Floats of `work` that mpiattn_attention needs for head_dim d and `keys` keys. */
ptrdiff_t mpiattn_attention_work(ptrdiff_t d, ptrdiff_t keys) {
    ptrdiff_t padded = (keys + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    return (d + QUERY_BLOCK) * padded + 2 * QUERY_BLOCK * d;
}

/* Softmax attention of `heads` heads of one sequence, written into dest:
 *   dest[i, h d + c] = sum_j softmax_j(scale (q_i + qb) . (k_j + kb) + kbias[j]
 *                                      + position[h, i, j]) (v_j + vb)[c]
 * for queries i < queries and keys j < keys. q, k and v point at head 0's columns of row 0
 * (rows `row` floats apart, head h at h d); q_bias, k_bias, v_bias (heads d,) are added
 * here (NULL: none); key_bias (keys,) and position (heads, queries, position_row) may be
 * NULL. dest's rows are dest_row floats apart. work holds mpiattn_attention_work(d, keys)
 * floats. The value bias is added after the division by the sum of the weights (which
 * is 1); no keys gives NaN. */
CLONED void mpiattn_attention(const float *q, const float *k, const float *v, ptrdiff_t row,
                              ptrdiff_t heads, ptrdiff_t d, ptrdiff_t queries, ptrdiff_t keys,
                              float scale, const float *q_bias, const float *k_bias,
                              const float *v_bias, const float *key_bias,
                              const float *position, ptrdiff_t position_row, float *dest,
                              ptrdiff_t dest_row, float *work) {
    ptrdiff_t padded = (keys + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    float *kt = work;               /* (d, padded): K^T, keys along the rows */
    float *sc = kt + d * padded;    /* (QUERY_BLOCK, padded): scores, then weights */
    float *qs = sc + QUERY_BLOCK * padded; /* (QUERY_BLOCK, d): scaled queries */
    float *ob = qs + QUERY_BLOCK * d;      /* (QUERY_BLOCK, d): unnormalised outputs */
    for (ptrdiff_t h = 0; h < heads; h++) {
        const float *qh = q + h * d, *kh = k + h * d, *vh = v + h * d;
        for (ptrdiff_t c = 0; c < d; c++) {
            float *restrict kr = kt + c * padded;
            float b = k_bias ? k_bias[h * d + c] : 0.0f;
            for (ptrdiff_t j = 0; j < keys; j++) kr[j] = kh[j * row + c] + b;
            for (ptrdiff_t j = keys; j < padded; j++) kr[j] = 0.0f;
        }
        for (ptrdiff_t i0 = 0; i0 < queries; i0 += QUERY_BLOCK) {
            ptrdiff_t count = queries - i0 < QUERY_BLOCK ? queries - i0 : QUERY_BLOCK;
            for (ptrdiff_t i = 0; i < QUERY_BLOCK; i++) {
                const float *restrict qr = qh + (i0 + i) * row;
                float *restrict qd = qs + i * d;
                if (i >= count)
                    for (ptrdiff_t c = 0; c < d; c++) qd[c] = 0.0f;
                else if (q_bias)
                    for (ptrdiff_t c = 0; c < d; c++) qd[c] = (qr[c] + q_bias[h * d + c]) * scale;
                else
                    for (ptrdiff_t c = 0; c < d; c++) qd[c] = qr[c] * scale;
            }
            for (ptrdiff_t j0 = 0; j0 < padded; j0 += KEY_BLOCK)
                score_tile(qs, kt + j0, d, padded, sc + j0, padded);
            float total[QUERY_BLOCK];
            for (ptrdiff_t i = 0; i < QUERY_BLOCK; i++) {
                float *restrict s = sc + i * padded;
                if (key_bias)
                    for (ptrdiff_t j = 0; j < keys; j++) s[j] += key_bias[j];
                if (position && i < count) {
                    const float *restrict pr = position + (h * queries + i0 + i) * position_row;
                    for (ptrdiff_t j = 0; j < keys; j++) s[j] += pr[j];
                }
                total[i] = softmax_row(s, keys);
            }
            ptrdiff_t c0 = 0;
            for (; c0 + 32 <= d; c0 += 32) pv_tile32(sc, padded, vh + c0, row, keys, ob + c0, d);
            for (; c0 + 16 <= d; c0 += 16) pv_tile16(sc, padded, vh + c0, row, keys, ob + c0, d);
            if (c0 < d) pv_columns(sc, padded, vh + c0, row, keys, ob + c0, d, d - c0);
            for (ptrdiff_t i = 0; i < count; i++) {
                float *restrict o = dest + (i0 + i) * dest_row + h * d;
                const float *restrict src = ob + i * d;
                float t = total[i];
                if (v_bias)
                    for (ptrdiff_t c = 0; c < d; c++) o[c] = src[c] / t + v_bias[h * d + c];
                else
                    for (ptrdiff_t c = 0; c < d; c++) o[c] = src[c] / t;
            }
        }
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

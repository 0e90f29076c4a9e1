/* The GRU attention pooling of TESSERA v1.0 / v1.1 (tessera_model/pooling.py) on the
 * int8-dynamic CPU path: the recurrence with int8 weights and per-step int8 rows of the hidden
 * state, and the pooling after it, in one pass per block of pixels.
 *
 * Per pixel (one row b), h_0 = 0, from the int8 rows (q_x, s_x) of the transformer outputs
 * x_t (the last encoder layer makes them):
 *
 *   gi    = [W_ir x_t + b_r | W_iz x_t + b_z | W_ih x_t + b_h]   (3H; the int8 GEMM of q_x,
 *           with gemm_i8.c's epilogue: the same bits as tessera_model.int8.int8_linear)
 *   t = 0:  z = sigmoid(gi_z), h = z * tanh(gi_h)                 (every h product vanishes)
 *   t > 0:  (q, s) = int8 row of h                                 (s = max |h| / 127)
 *           [r | z] = sigmoid(s s_rz[n] sum_k q[k] Wrz[n, k] + gi_rz)
 *           (q', s') = int8 row of r * h
 *           h~ = tanh(s' s_hh[n] sum_k q'[k] Whh[n, k] + gi_h)
 *           h = h + z (h~ - h)
 *   score_t = query . LayerNorm(h) + query_bias
 *           = rstd (sum_j a_j (h_j - mean)) + c,   a = query * ln_w, c = query . ln_b + qb
 *   out[b] = sum_t softmax(score)_t x[b, t]
 *
 * Rows are quantised as tessera_model/int8.py does (q = round-to-even(h / s) with 1 / s
 * precomputed; an all-zero row gets s = 1). The integer products use AVX-512 VNNI with the
 * rows fed as q + 128 and 128 sum_k w subtracted (comp), weights packed by pack_vnni
 * (gemm_i8.c's panels of 32 columns). tanh(a) = 2 sigmoid(2a) - 1; sigmoid through a
 * exp2 (vec.h; clamped to [-126, 126]). Each row's result depends only on that row,
 * in any block or thread split. The pure-torch form of the same math is
 * tessera_model.pooling.gru_pool_int8_torch (the fallback, and the tests' reference). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

#define MR 8 /* rows per tile */
#define NR 32 /* columns per weight panel */
#define MAX_H 4096

#if HAVE_VNNI
#define LOG2E 1.4426950408889634f

static inline __attribute__((always_inline)) __m512 exp2_ps(__m512 x) {
    return (__m512)exp2_clamped((vf)x); /* vec.h */
}

/* 1 / (1 + 2^(-x log2 e)) */
static inline __attribute__((always_inline)) __m512 sigmoid_ps(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 e = exp2_ps(_mm512_mul_ps(x, _mm512_set1_ps(-LOG2E)));
    return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

static inline __attribute__((always_inline)) __m512 tanh_ps(__m512 x) {
    const __m512 s = sigmoid_ps(_mm512_add_ps(x, x));
    return _mm512_sub_ps(_mm512_add_ps(s, s), _mm512_set1_ps(1.0f));
}

/* int8 row of v (k floats, k % 16 == 0), or of v * m when m is not NULL, stored as q + 128
 * (unsigned bytes) into u; returns the scale. */
static inline float quantise_u8(const float *v, const float *m, int64_t k, uint8_t *u) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        __m512 x = _mm512_loadu_ps(v + j);
        if (m) x = _mm512_mul_ps(x, _mm512_loadu_ps(m + j));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(x));
    }
    const float a = _mm512_reduce_max_ps(amax);
    const float s = a > 0.0f ? a / 127.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    const __m512i off = _mm512_set1_epi32(128);
    for (int64_t j = 0; j < k; j += 16) {
        __m512 x = _mm512_loadu_ps(v + j);
        if (m) x = _mm512_mul_ps(x, _mm512_loadu_ps(m + j));
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv)); /* nearest, ties to even */
        _mm_storeu_si128((__m128i *)(u + j), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
    }
    return s;
}

/* Integer sums of an MR x (16 or 32) tile: rows a + r * lda (k bytes each, q + 128), panel b
 * ([k / 4][16 or 32 columns][4] bytes). Named-local accumulators (see gemm_i8.c). */
#define ROW(r)                                                    \
    {                                                             \
        int32_t v_;                                               \
        memcpy(&v_, a + (r) * lda + 4 * k, 4);                    \
        const __m512i av = _mm512_set1_epi32(v_);                 \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);           \
        if (wide) c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1); \
    }
static inline __attribute__((always_inline)) void tile_sums(const uint8_t *a, int64_t lda,
                                                           const int8_t *b, int64_t k4,
                                                           const int wide, __m512i *c) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
            c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    const int64_t step = wide ? 128 : 64;
    for (int64_t k = 0; k < k4; k++) {
        const __m512i b0 = _mm512_loadu_si512(b + k * step);
        const __m512i b1 = wide ? _mm512_loadu_si512(b + k * step + 64) : b0;
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7)
    }
    c[0] = c00, c[1] = c01, c[2] = c10, c[3] = c11, c[4] = c20, c[5] = c21, c[6] = c30;
    c[7] = c31, c[8] = c40, c[9] = c41, c[10] = c50, c[11] = c51, c[12] = c60, c[13] = c61;
    c[14] = c70, c[15] = c71;
}
#undef ROW

static void __attribute__((noinline)) sums(const uint8_t *a, int64_t lda, const int8_t *b,
                                           int64_t k4, int wide, __m512i *c) {
    if (wide)
        tile_sums(a, lda, b, k4, 1, c);
    else
        tile_sums(a, lda, b, k4, 0, c);
}

typedef struct {
    const int8_t *wx, *wrz, *whh;
    const int32_t *cx, *crz, *chh;
    const float *sx, *bx, *srz, *shh, *a;
    float c, eps;
    int64_t t, h, d;
} gru_t;

/* The input maps g (nr x 3H) of one tile at one step: rows q (stride ldq bytes) with scales
 * qs (stride lds); ua int8 scratch (MR x D). */
static void input_tile(const gru_t *p, int nr, const int8_t *q, int64_t ldq, const float *qs,
                       int64_t lds, float *g, uint8_t *ua) {
    const int64_t d = p->d, n = 3 * p->h;
    const __m128i flip = _mm_set1_epi8((char)0x80);
    __m512i c[2 * MR];
    for (int r = 0; r < MR; r++) {
        if (r < nr)
            for (int64_t j = 0; j < d; j += 16)
                _mm_storeu_si128((__m128i *)(ua + r * d + j),
                                 _mm_xor_si128(_mm_loadu_si128((const __m128i *)(q + r * ldq + j)),
                                               flip)); /* q + 128 */
        else
            memset(ua + r * d, 128, (size_t)d);
    }
    for (int64_t n0 = 0; n0 < n; n0 += NR) {
        const int wide = n - n0 >= NR;
        sums(ua, d, p->wx + n0 * d, d / 4, wide, c);
        for (int j = 0; j < 1 + wide; j++) {
            const int64_t c0 = n0 + 16 * j;
            const __m512i cm = _mm512_loadu_si512(p->cx + c0);
            const __m512 sw = _mm512_loadu_ps(p->sx + c0), b = _mm512_loadu_ps(p->bx + c0);
            for (int r = 0; r < nr; r++) {
                const __m512 y =
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[2 * r + j], cm)), sw);
                _mm512_storeu_ps(g + r * n + c0, _mm512_fmadd_ps(y, _mm512_set1_ps(qs[r * lds]), b));
            }
        }
    }
}

/* Step t > 0 of one tile: rows h (nr x H, stride H), gates rz (MR x 2H), input maps g (rows
 * of stride ldg), int8 scratch ua (MR x H). */
static void step_tile(const gru_t *p, int nr, float *h, float *rz, const float *g,
                      int64_t ldg, uint8_t *ua) {
    const int64_t hd = p->h, k4 = hd / 4;
    float s[MR];
    __m512i c[2 * MR];
    for (int r = 0; r < nr; r++) s[r] = quantise_u8(h + r * hd, 0, hd, ua + r * hd);
    for (int r = nr; r < MR; r++) memset(ua + r * hd, 128, (size_t)hd);
    /* [r | z] = sigmoid(...) */
    for (int64_t n0 = 0; n0 < 2 * hd; n0 += NR) {
        const int wide = 2 * hd - n0 >= NR;
        sums(ua, hd, p->wrz + n0 * hd, k4, wide, c);
        for (int j = 0; j < 1 + wide; j++) {
            const int64_t c0 = n0 + 16 * j;
            const __m512i cm = _mm512_loadu_si512(p->crz + c0);
            const __m512 sw = _mm512_loadu_ps(p->srz + c0);
            for (int r = 0; r < nr; r++) {
                __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[2 * r + j], cm)), sw);
                y = _mm512_fmadd_ps(y, _mm512_set1_ps(s[r]), _mm512_loadu_ps(g + r * ldg + c0));
                _mm512_storeu_ps(rz + r * 2 * hd + c0, sigmoid_ps(y));
            }
        }
    }
    /* h~ = tanh(...) on the int8 rows of r * h; h += z (h~ - h) */
    for (int r = 0; r < nr; r++) s[r] = quantise_u8(h + r * hd, rz + r * 2 * hd, hd, ua + r * hd);
    for (int64_t n0 = 0; n0 < hd; n0 += NR) {
        const int wide = hd - n0 >= NR;
        sums(ua, hd, p->whh + n0 * hd, k4, wide, c);
        for (int j = 0; j < 1 + wide; j++) {
            const int64_t c0 = n0 + 16 * j;
            const __m512i cm = _mm512_loadu_si512(p->chh + c0);
            const __m512 sw = _mm512_loadu_ps(p->shh + c0);
            for (int r = 0; r < nr; r++) {
                __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[2 * r + j], cm)), sw);
                y = _mm512_fmadd_ps(y, _mm512_set1_ps(s[r]),
                                    _mm512_loadu_ps(g + r * ldg + 2 * hd + c0));
                const __m512 ht = tanh_ps(y);
                const __m512 z = _mm512_loadu_ps(rz + r * 2 * hd + hd + c0);
                const __m512 hv = _mm512_loadu_ps(h + r * hd + c0);
                _mm512_storeu_ps(h + r * hd + c0, _mm512_fmadd_ps(z, _mm512_sub_ps(ht, hv), hv));
            }
        }
    }
}

/* Step 0 of one row: h = sigmoid(gi_z) tanh(gi_h). */
static void first_step(int64_t hd, float *h, const float *g) {
    for (int64_t j = 0; j < hd; j += 16) {
        const __m512 z = sigmoid_ps(_mm512_loadu_ps(g + hd + j));
        _mm512_storeu_ps(h + j, _mm512_mul_ps(z, tanh_ps(_mm512_loadu_ps(g + 2 * hd + j))));
    }
}

/* query . LayerNorm(h) + query_bias of one row (two passes: mean, then the centred sums). */
static float score(const gru_t *p, const float *h) {
    const int64_t hd = p->h;
    __m512 sm = _mm512_setzero_ps();
    for (int64_t j = 0; j < hd; j += 16) sm = _mm512_add_ps(sm, _mm512_loadu_ps(h + j));
    const float mean = _mm512_reduce_add_ps(sm) / (float)hd;
    const __m512 mv = _mm512_set1_ps(mean);
    __m512 sq = _mm512_setzero_ps(), dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < hd; j += 16) {
        const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(h + j), mv);
        sq = _mm512_fmadd_ps(x, x, sq);
        dot = _mm512_fmadd_ps(x, _mm512_loadu_ps(p->a + j), dot);
    }
    const float var = _mm512_reduce_add_ps(sq) / (float)hd;
    return _mm512_reduce_add_ps(dot) / sqrtf(var + p->eps) + p->c;
}

/* out = sum_t softmax(sc)_t x[t] for one row: x (t, d) floats, d % 16 == 0. */
static void pool_row(const float *sc, float *w, int64_t t, const float *x, int64_t d, float *out) {
    float m = sc[0];
    for (int64_t i = 1; i < t; i++) m = sc[i] > m ? sc[i] : m;
    __m512 tot = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t i = 0; i < t; i += 16) {
        const __mmask16 k = t - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (t - i)) - 1u);
        const __m512 s = _mm512_maskz_loadu_ps(k, sc + i);
        const __m512 e = _mm512_maskz_mov_ps(k, exp2_ps(_mm512_mul_ps(_mm512_sub_ps(s, mv),
                                                                      _mm512_set1_ps(LOG2E))));
        tot = _mm512_add_ps(tot, e);
        _mm512_mask_storeu_ps(w + i, k, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(tot);
    for (int64_t j = 0; j < d; j += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < t; i++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), _mm512_loadu_ps(x + i * d + j), acc);
        _mm512_storeu_ps(out + j, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
    }
}
#endif

int tessera_gru_pool_i8_supported(void) { return HAVE_VNNI; }

/* Pixels per block of tessera_gru_pool_i8: their tiles are in flight together at each step (a
 * block of one tile waits on each step's latency: 1.6x the time per pixel). */
int64_t tessera_gru_block_rows(int64_t hd) { return hd <= 128 ? 4 * MR : MR; }

/* Rows [r0, r1) (pixels): xq (rows, t, d) int8 with scales xs (rows, t), the transformer
 * outputs' int8 rows, and x (rows, t, d) their floats; out (rows, d) floats. wx (3 hd, d): the
 * stacked input maps [W_ir; W_iz; W_ih] with bias bx; wrz, whh: the recurrent maps
 * [W_hr; W_hz] (2 hd, hd) and W_hh (hd, hd); each int8, packed by pack_vnni, with its comp
 * (int32) and per-column scales. a (hd,) = query * ln_w, c = query . ln_b + query bias, eps
 * the LayerNorm's. hd and d multiples of 16. Returns 0, -1 for bad sizes, -2 without VNNI,
 * -3 when out of memory. */
int tessera_gru_pool_i8(const int8_t *xq, const float *xs, const float *x, float *out,
                        int64_t r0, int64_t r1, int64_t t, int64_t hd, int64_t d,
                        const int8_t *wx, const int32_t *cx, const float *sx, const float *bx,
                        const int8_t *wrz, const int32_t *crz, const float *srz,
                        const int8_t *whh, const int32_t *chh, const float *shh, const float *a,
                        float c, float eps) {
#if HAVE_VNNI
    if (t < 1 || hd < 16 || hd % 16 || hd > MAX_H || d < 16 || d % 16 || d > MAX_H) return -1;
    if (r1 <= r0) return 0;
    const gru_t p = {wx, wrz, whh, cx, crz, chh, sx, bx, srz, shh, a, c, eps, t, hd, d};
    const int64_t br = tessera_gru_block_rows(hd);
    const int64_t wk = hd > d ? hd : d;
    float *h = malloc((size_t)(br * hd + MR * 5 * hd + br * t + t + 16) * sizeof(float));
    uint8_t *ua = malloc((size_t)(MR * wk));
    if (!h || !ua) {
        free(h), free(ua);
        return -3;
    }
    float *rz = h + br * hd, *g = rz + MR * 2 * hd, *sc = g + MR * 3 * hd, *w = sc + br * t;
    for (int64_t rb = r0; rb < r1; rb += br) {
        const int64_t nb = r1 - rb < br ? r1 - rb : br;
        for (int64_t s = 0; s < t; s++) {
            for (int64_t i = 0; i < nb; i += MR) {
                const int nr = nb - i < MR ? (int)(nb - i) : MR;
                const int64_t row = (rb + i) * t + s; /* (pixel, step) row of xq */
                input_tile(&p, nr, xq + row * d, t * d, xs + row, t, g, ua);
                if (s == 0)
                    for (int r = 0; r < nr; r++) first_step(hd, h + (i + r) * hd, g + r * 3 * hd);
                else
                    step_tile(&p, nr, h + i * hd, rz, g, 3 * hd, ua);
                for (int r = 0; r < nr; r++) sc[(i + r) * t + s] = score(&p, h + (i + r) * hd);
            }
        }
        for (int64_t r = 0; r < nb; r++)
            pool_row(sc + r * t, w, t, x + (rb + r) * t * d, d, out + (rb + r) * d);
    }
    free(h), free(ua);
    return 0;
#else
    (void)xq, (void)xs, (void)x, (void)out, (void)r0, (void)r1, (void)t, (void)hd, (void)d;
    (void)wx, (void)cx, (void)sx, (void)bx, (void)wrz, (void)crz, (void)srz, (void)whh;
    (void)chh, (void)shh, (void)a, (void)c, (void)eps;
    return -2;
#endif
}

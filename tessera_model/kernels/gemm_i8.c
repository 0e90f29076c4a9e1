/* The int8 GEMM of the int8-dynamic CPU inference path with its epilogue fused
 * (tessera_model/int8.py, tessera_model/cpu_kernels.py):
 *
 *   y[m, n] = relu((float(sum_k q[m, k] w[n, k]) * s_w[n]) * s_x[m] + b[n] + res[m, n])
 *
 * and, optionally, the int8 rows of y (the next int8 layer's input, quant.c). The integer sum
 * is exact, and the epilogue makes the same float32 operations in the same order as
 * tessera_dequantise, so the result has the bits of torch._int_mm followed by that epilogue;
 * but the int32 product never goes to memory (a (rows, n) int32 round trip through the
 * second- or third-level cache), and a row block's outputs are quantised while in cache.
 *
 * AVX-512 VNNI (vpdpbusd: unsigned x signed bytes, four products summed into each int32 lane):
 * the activations are fed as q + 128 (unsigned; exact) and 128 * sum_k w[n, k] is subtracted
 * from each column's sum (comp). Sums stay far inside int32: |q + 128| <= 255, |w| <= 127,
 * K <= 65536. Without VNNI (another CPU, or a compiler that does not target it), the entry
 * points report it and the caller uses torch._int_mm.
 *
 * Weights are packed once per model (tessera_model/int8.py, pack_vnni): columns padded to a
 * multiple of 16 and cut into panels of 32 (the last one 16 when 16 remain), each panel stored
 * as [k / 4][its columns][4 bytes], panel p starting at byte n0(p) * K.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

void tessera_quantise_block(const float *x, int64_t ldx, int nr, int8_t *q, float *scale,
                            int64_t k);
int tessera_layer_norm(const float *x, float *y, const float *w, const float *b, int64_t r0,
                       int64_t r1, int64_t d, float eps, int8_t *q, float *qs);

#define MR 8 /* rows per block */
#define NR 32 /* columns per panel */
#define MAX_K 65536

int tessera_gemm_i8_supported(void) { return HAVE_VNNI; }

#if HAVE_VNNI
/* The epilogue of one row's 16 columns [c0, c0 + 16) (mask: the real ones); comp, sw and bias
 * of those columns already loaded. */
static inline __attribute__((always_inline)) void epilogue16(
    __m512i acc, float *yr, __m512i comp, __m512 sw, __m512 bias, int has_bias, float s,
    const float *rr, int relu, int64_t c0, __mmask16 mask) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, comp)), sw);
    y = has_bias ? _mm512_fmadd_ps(y, _mm512_set1_ps(s), bias) : _mm512_mul_ps(y, _mm512_set1_ps(s));
    if (rr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, rr + c0));
    if (relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(yr + c0, mask, y);
}

/* Epilogue arguments shared by the rows of a tile. */
typedef struct {
    const int32_t *comp;
    const float *sw, *sx, *bias, *res;
    float *y;
    int64_t ldy, n;
    int relu, nr;
} epi_t;

/* One MR x (16 or 32) tile at columns [n0, n0 + 16 or 32): a (k4, MR) packed biased
 * activations, b (k4, width) panel; then its epilogue. Rows of e->y, e->res and e->sx are the
 * block's (row 0 first). The accumulators are named locals, stored once after the loop (with
 * an array, or with the epilogue in the same scope, GCC copies them between registers on every
 * step). */
#define ROW(r)                                                    \
    {                                                             \
        const __m512i av = _mm512_set1_epi32(a[k * MR + (r)]);    \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);           \
        if (wide) c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1); \
    }
static inline __attribute__((always_inline)) void tile_sums(const int32_t *a, const int8_t *b,
                                                           int64_t k4, const int wide,
                                                           __m512i *c) {
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

static void __attribute__((noinline)) tile(const int32_t *a, const int8_t *b, int64_t k4,
                                           const int wide, int64_t n0, const epi_t *e) {
    __m512i c[2 * MR];
    if (wide)
        tile_sums(a, b, k4, 1, c);
    else
        tile_sums(a, b, k4, 0, c);
    /* the columns' constants, once per tile; masks for the last columns */
    const int64_t left0 = e->n - n0, left1 = e->n - n0 - 16;
    const __mmask16 m0 = left0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left0) - 1u);
    const __mmask16 m1 =
        !wide ? 0 : left1 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left1) - 1u);
    const int has_bias = e->bias != 0;
    const __m512i cm0 = _mm512_maskz_loadu_epi32(m0, e->comp + n0);
    const __m512i cm1 = _mm512_maskz_loadu_epi32(m1, e->comp + n0 + 16);
    const __m512 sw0 = _mm512_maskz_loadu_ps(m0, e->sw + n0);
    const __m512 sw1 = _mm512_maskz_loadu_ps(m1, e->sw + n0 + 16);
    const __m512 b_0 = has_bias ? _mm512_maskz_loadu_ps(m0, e->bias + n0) : _mm512_setzero_ps();
    const __m512 b_1 =
        has_bias ? _mm512_maskz_loadu_ps(m1, e->bias + n0 + 16) : _mm512_setzero_ps();
    for (int r = 0; r < e->nr; r++) {
        float *yr = e->y + r * e->ldy;
        const float *rr = e->res ? e->res + r * e->n : 0;
        const float s = e->sx[r];
        epilogue16(c[2 * r], yr, cm0, sw0, b_0, has_bias, s, rr, e->relu, n0, m0);
        if (wide) epilogue16(c[2 * r + 1], yr, cm1, sw1, b_1, has_bias, s, rr, e->relu, n0 + 16, m1);
    }
}
#undef ROW
#endif

/* Rows [r0, r1) of y = epilogue(q @ w^T): q (rows, k) int8, wp the packed (n, k) weight, comp
 * (n,) int32, sw (n,), bias (n,) or NULL, res (rows, n) or NULL; y (rows, n) float32, or NULL
 * with q_out (rows, n) int8 and qs (rows,): the rows' int8 form, as tessera_dequantise makes it.
 * With ln, each row block's results then go through tessera_layer_norm in place (ln_w, ln_b:
 * (n,) or NULL; the LayerNorm after an encoder layer's residual sum, while the rows are in
 * cache), and q_out receives the normalised rows' int8 form. Returns 0, or -1 for bad sizes,
 * -2 without VNNI. */
int tessera_gemm_i8(const int8_t *q, const int8_t *wp, const int32_t *comp, const float *sw,
                    const float *sx, const float *bias, const float *res, int relu, float *y,
                    int8_t *q_out, float *qs, int64_t r0, int64_t r1, int64_t n, int64_t k,
                    int ln, const float *ln_w, const float *ln_b, float ln_eps) {
#if HAVE_VNNI
    if (n < 1 || k < 4 || k % 4 || k > MAX_K || (!y && !q_out) || (ln && !y)) return -1;
    const int64_t k4 = k / 4, npad = (n + 15) / 16 * 16;
    int32_t apack[k4 * MR];
    /* the float rows of a block when only their int8 form is wanted */
    float scratch[y ? 1 : MR * npad];
    for (int64_t r = r0; r < r1; r += MR) {
        const int nr = r1 - r < MR ? (int)(r1 - r) : MR;
        /* pack the block's activations as [k4][row] dwords of q + 128 (XOR of the sign bit) */
        for (int i = 0; i < MR; i++) {
            if (i < nr) {
                const uint32_t *src = (const uint32_t *)(q + (r + i) * k);
                for (int64_t j = 0; j < k4; j++) {
                    uint32_t v;
                    memcpy(&v, src + j, 4);
                    apack[j * MR + i] = (int32_t)(v ^ 0x80808080u);
                }
            } else {
                for (int64_t j = 0; j < k4; j++) apack[j * MR + i] = (int32_t)0x80808080u;
            }
        }
        float *yb = y ? y + r * n : scratch;
        const int64_t ldy = y ? n : npad;
        const epi_t e = {comp, sw, sx + r, bias, res ? res + r * n : 0, yb, ldy, n, relu, nr};
        for (int64_t n0 = 0; n0 < npad; n0 += NR) {
            if (npad - n0 >= NR)
                tile(apack, wp + n0 * k, k4, 1, n0, &e);
            else
                tile(apack, wp + n0 * k, k4, 0, n0, &e);
        }
        if (ln) {
            tessera_layer_norm(yb, yb, ln_w, ln_b, 0, nr, n, ln_eps,
                               q_out ? q_out + r * n : 0, qs ? qs + r : 0);
        } else if (q_out) {
            for (int i = 0; i < nr; i += 4)
                tessera_quantise_block(yb + i * ldy, ldy, nr - i < 4 ? nr - i : 4,
                                       q_out + (r + i) * n, qs + r + i, n);
        }
    }
    return 0;
#else
    (void)q, (void)wp, (void)comp, (void)sw, (void)sx, (void)bias, (void)res, (void)relu;
    (void)y, (void)q_out, (void)qs, (void)r0, (void)r1, (void)n, (void)k, (void)ln, (void)ln_w;
    (void)ln_b, (void)ln_eps;
    return -2;
#endif
}

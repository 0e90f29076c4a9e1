/* Dynamic int8 quantisation of activation rows and the dequantising epilogue of an int8 GEMM,
 * for the int8-dynamic CPU inference path (tessera_model/int8.py).
 *
 * Part of tessera_model (tessera_model/cpu_kernels.py compiles and loads it). The same float32
 * operations, in the same order, as the torch form of tessera_model.int8 (so the same bits),
 * in one pass over each row instead of six to eight full passes over the tensor:
 *
 *   quantise:   s = max|x| / 127 (1 for an all-zero row), q = round_half_even(x * (1 / s))
 *   dequantise: y = (float(acc) * s_w) * s_x + b, then + residual, then ReLU
 *
 * Built with -ffp-contract=off (tessera_model/cpu_kernels.py): every product is rounded as
 * torch rounds it; torch's addcmul rounds (y s_x + b) once, hence the explicit fmaf.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

static const float QMAX = 127.0f;
#define MAX_SCRATCH_ROW 16384 /* widest row of a dequantise without a float result */

typedef int8_t vq __attribute__((vector_size(W)));
typedef int8_t vq_u __attribute__((vector_size(W), aligned(1)));

/* round(x * inv) of one vector as int8: the product rounded to float (this file is built
 * without contraction), then to the nearest integer, ties to even (adding and removing
 * 1.5 * 2^23 rounds so in the default rounding mode, as rintf does, for |v| < 2^22; here
 * |v| <= 127), then narrowed (exact). */
static inline __attribute__((always_inline)) vq quantise_vec(vf x, vf inv) {
    const vf magic = splat(12582912.0f);
    vf v = x * inv;
    v = (v + magic) - magic;
    return __builtin_convertvector(__builtin_convertvector(v, vi), vq);
}

static inline __attribute__((always_inline)) vi imax(vi a, vi b) {
    const vi g = a > b;
    return (g & a) | (~g & b);
}

/* max |x| of one row as a vector of partial maxima: the integer maximum of the magnitudes'
 * bit patterns (ordered as the magnitudes), in two independent chains */
static inline __attribute__((always_inline)) vi row_absmax(const float *xr, int64_t full,
                                                          int64_t tail) {
    const vi absmask = (vi){0} + 0x7fffffff;
    vi m0 = (vi){0}, m1 = (vi){0};
    int64_t c = 0;
    for (; c + 2 * W <= full; c += 2 * W) {
        m0 = imax(m0, absmask & (vi)load_u(xr + c));
        m1 = imax(m1, absmask & (vi)load_u(xr + c + W));
    }
    if (c < full) m0 = imax(m0, absmask & (vi)load_u(xr + c));
    if (tail) m1 = imax(m1, absmask & (vi)load_part(xr + full, tail));
    return imax(m0, m1);
}

static inline __attribute__((always_inline)) void quantise_row(const float *xr, int8_t *qr,
                                                              int64_t full, int64_t tail,
                                                              float amax, float *scale) {
    const float s = amax > 0.0f ? amax / QMAX : 1.0f;
    const vf inv = splat(1.0f / s);
    *scale = s;
    for (int64_t c = 0; c < full; c += W) *(vq_u *)(qr + c) = quantise_vec(load_u(xr + c), inv);
    if (tail) {
        vq t = quantise_vec(load_part(xr + full, tail), inv);
        memcpy(qr + full, &t, (size_t)tail);
    }
}

/* Rows x[i * ldx], i < nr <= 4, of k values into q rows (q + i * k) and scale[i]: their maxima
 * are independent chains, reduced together. */
void tessera_quantise_block(const float *x, int64_t ldx, int nr, int8_t *q, float *scale,
                            int64_t k) {
    const int64_t full = k / W * W, tail = k - full;
    vi m[4];
    for (int i = 0; i < 4; i++) m[i] = i < nr ? row_absmax(x + i * ldx, full, tail) : (vi){0};
    /* four horizontal maxima at once: u0 lanes 0-7 row 0, 8-15 row 1; u1 rows 2, 3; then
     * lanes 4i..4i+3 of v row i's */
    vi u0 = imax((vi)SHUFFLE2((vf)m[0], (vf)m[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                              22, 23),
                 (vi)SHUFFLE2((vf)m[0], (vf)m[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                              28, 29, 30, 31));
    vi u1 = imax((vi)SHUFFLE2((vf)m[2], (vf)m[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                              22, 23),
                 (vi)SHUFFLE2((vf)m[2], (vf)m[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                              28, 29, 30, 31));
    vi v = imax((vi)SHUFFLE2((vf)u0, (vf)u1, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                             27),
                (vi)SHUFFLE2((vf)u0, (vf)u1, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                             31));
    v = imax(v, (vi)SWAP2((vf)v));
    v = imax(v, (vi)SWAP1((vf)v));
    const vf amax = (vf)v;
    for (int i = 0; i < nr; i++)
        quantise_row(x + i * ldx, q + i * k, full, tail, amax[4 * i], scale + i);
}

/* Rows [r0, r1) of x (rows, k) into q (rows, k) int8 and scale (rows,). */
int tessera_quantise_rows(const float *x, int8_t *q, float *scale, int64_t r0, int64_t r1,
                          int64_t k) {
    if (k < 1) return -1;
    for (int64_t r = r0; r < r1; r += 4) {
        const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
        tessera_quantise_block(x + r * k, k, nr, q + r * k, scale + r, k);
    }
    return 0;
}

/* One row of the epilogue: y = (float(acc) * s_w) * s_x + b, then + residual, then ReLU. */
static inline __attribute__((always_inline)) void dequantise_row(
    const int32_t *ar, float *yr, const float *sw, float s, const float *bias, const float *rr,
    int relu, int64_t n) {
    if (bias) {
        for (int64_t c = 0; c < n; c++) yr[c] = fmaf((float)ar[c] * sw[c], s, bias[c]);
    } else {
        for (int64_t c = 0; c < n; c++) yr[c] = (float)ar[c] * sw[c] * s;
    }
    if (rr) {
        for (int64_t c = 0; c < n; c++) yr[c] += rr[c];
    }
    if (relu) {
        for (int64_t c = 0; c < n; c++) yr[c] = yr[c] > 0.0f ? yr[c] : 0.0f;
    }
}

/* Rows [r0, r1) of the int32 product acc (rows, n) into y (rows, n) float32.
 * sw: (n,) weight scales; sx: (rows,) row scales; bias: (n,) or NULL; res: (rows, n) or NULL.
 * With q (rows, n) int8 and qs (rows,), the result rows are also quantised as
 * tessera_quantise_rows does (the next int8 layer's input, made while the rows are in the
 * first-level cache); then y may be NULL (no float result kept: rows go through a scratch
 * block on the stack). */
int tessera_dequantise(const int32_t *acc, float *y, const float *sw, const float *sx,
                       const float *bias, const float *res, int relu, int64_t r0, int64_t r1,
                       int64_t n, int8_t *q, float *qs) {
    if (n < 1 || (!y && !q) || (!y && n > MAX_SCRATCH_ROW)) return -1;
    float scratch[y ? 1 : 4 * n];
    for (int64_t r = r0; r < r1; r += 4) {
        const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
        float *yb = y ? y + r * n : scratch;
        for (int i = 0; i < nr; i++)
            dequantise_row(acc + (r + i) * n, yb + i * n, sw, sx[r + i], bias,
                           res ? res + (r + i) * n : 0, relu, n);
        if (q) tessera_quantise_block(yb, n, nr, q + r * n, qs + r, n);
    }
    return 0;
}

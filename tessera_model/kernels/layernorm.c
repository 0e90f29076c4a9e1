/* LayerNorm over the last axis of float32 rows, for CPU inference.
 *
 * Part of tessera_model (tessera_model/cpu_kernels.py compiles and loads it). Per row of d
 * values: mean, then the mean square deviation from it (two passes: no cancellation), then
 * y = (x - mean) / sqrt(var + eps) * w + b, the math of torch.nn.functional.layer_norm. The
 * row stays in registers or the first-level cache; torch's CPU kernel for the same rows runs
 * its AVX2 code on the dev box at about a seventh of this speed for rows of 64.
 */
#include <math.h>
#include <stdint.h>

#include "vec.h"

/* quant.c: rows x[i * ldx], i < nr <= 4, quantised to int8 with one scale per row */
void tessera_quantise_block(const float *x, int64_t ldx, int nr, int8_t *q, float *scale,
                            int64_t k);

/* Row sum of x (d floats) as a vector of partial sums; with shift, of (x - shift)^2. */
static inline __attribute__((always_inline)) vf row_partials(const float *x, int64_t full,
                                                            int64_t tail, vi keep, const vf *shift) {
    vf acc = splat(0.0f);
    for (int64_t c = 0; c < full; c += W) {
        vf u = load_u(x + c);
        if (shift) {
            u -= *shift;
            u *= u;
        }
        acc += u;
    }
    if (tail) {
        vf u = load_part(x + full, tail);
        if (shift) {
            u = (vf)(keep & (vi)(u - *shift));
            u *= u;
        }
        acc += u;
    }
    return acc;
}

static inline __attribute__((always_inline)) void row_normalise(
    const float *x, float *y, const float *w, const float *b, int64_t full, int64_t tail,
    vf mean, vf rstd) {
    for (int64_t c = 0; c < full; c += W) {
        vf u = (load_u(x + c) - mean) * rstd;
        if (w) u = u * load_u(w + c);
        if (b) u = u + load_u(b + c);
        store_u(y + c, u);
    }
    if (tail) {
        vf u = (load_part(x + full, tail) - mean) * rstd;
        if (w) u = u * load_part(w + full, tail);
        if (b) u = u + load_part(b + full, tail);
        store_part(y + full, u, tail);
    }
}

/* Rows [r0, r1) of x (rows, d) into y (may be x); w and b: (d,) or NULL (no affine). Rows go
 * in blocks of eight whose horizontal sums are reduced together (sums8). With q (rows, d) int8
 * and qs (rows,), the output rows are also quantised (quant.c: the next int8 layer's input),
 * while they are in the first-level cache. */
int tessera_layer_norm(const float *x, float *y, const float *w, const float *b, int64_t r0,
                       int64_t r1, int64_t d, float eps, int8_t *q, float *qs) {
    if (d < 1) return -1;
    const int64_t full = d / W * W, tail = d - full;
    const float inv_d = 1.0f / (float)d;
    vi keep;
    for (int i = 0; i < W; i++) keep[i] = i < tail ? -1 : 0;
    for (int64_t r = r0; r < r1; r += 8) {
        const int nr = r1 - r < 8 ? (int)(r1 - r) : 8;
        vf acc[8];
        for (int k = 0; k < 8; k++)
            acc[k] = k < nr ? row_partials(x + (r + k) * d, full, tail, keep, 0) : splat(0.0f);
        const vf mean = sums8(acc) * inv_d; /* row k's in lane 2k */
        vf mk[8];
        for (int k = 0; k < 8; k++) {
            mk[k] = splat(mean[2 * k]);
            acc[k] = k < nr ? row_partials(x + (r + k) * d, full, tail, keep, &mk[k])
                            : splat(0.0f);
        }
        const vf var = sums8(acc) * inv_d;
        for (int k = 0; k < nr; k++)
            row_normalise(x + (r + k) * d, y + (r + k) * d, w, b, full, tail, mk[k],
                          splat(1.0f / sqrtf(var[2 * k] + eps)));
        if (q) {
            for (int k = 0; k < nr; k += 4)
                tessera_quantise_block(y + (r + k) * d, d, nr - k < 4 ? nr - k : 4,
                                       q + (r + k) * d, qs + r + k, d);
        }
    }
    return 0;
}

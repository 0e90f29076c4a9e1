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

#include "vec.h"

static const float QMAX = 127.0f;

/* Rows [r0, r1) of x (rows, k) into q (rows, k) int8 and scale (rows,). */
int tessera_quantise_rows(const float *x, int8_t *q, float *scale, int64_t r0, int64_t r1,
                          int64_t k) {
    if (k < 1) return -1;
    const int64_t full = k / W * W, tail = k - full;
    const vi absmask = (vi){0} + 0x7fffffff;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * k;
        int8_t *qr = q + r * k;
        vf m = splat(0.0f);
        for (int64_t c = 0; c < full; c += W) m = vmax(m, (vf)(absmask & (vi)load_u(xr + c)));
        if (tail) m = vmax(m, (vf)(absmask & (vi)load_part(xr + full, tail)));
        const float amax = all_max(m)[0];
        const float s = amax > 0.0f ? amax / QMAX : 1.0f;
        const float inv = 1.0f / s;
        scale[r] = s;
        /* the product rounded to float (this file is built without contraction), then to the
         * nearest integer, ties to even (rintf in the default rounding mode) */
        for (int64_t c = 0; c < k; c++) qr[c] = (int8_t)(int32_t)rintf(xr[c] * inv);
    }
    return 0;
}

/* Rows [r0, r1) of the int32 product acc (rows, n) into y (rows, n) float32.
 * sw: (n,) weight scales; sx: (rows,) row scales; bias: (n,) or NULL; res: (rows, n) or NULL. */
int tessera_dequantise(const int32_t *acc, float *y, const float *sw, const float *sx,
                       const float *bias, const float *res, int relu, int64_t r0, int64_t r1,
                       int64_t n) {
    if (n < 1) return -1;
    for (int64_t r = r0; r < r1; r++) {
        const int32_t *ar = acc + r * n;
        float *yr = y + r * n;
        const float s = sx[r];
        if (bias) {
            for (int64_t c = 0; c < n; c++) yr[c] = fmaf((float)ar[c] * sw[c], s, bias[c]);
        } else {
            for (int64_t c = 0; c < n; c++) yr[c] = (float)ar[c] * sw[c] * s;
        }
        if (res) {
            const float *rr = res + r * n;
            for (int64_t c = 0; c < n; c++) yr[c] += rr[c];
        }
        if (relu) {
            for (int64_t c = 0; c < n; c++) yr[c] = yr[c] > 0.0f ? yr[c] : 0.0f;
        }
    }
    return 0;
}

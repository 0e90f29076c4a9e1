/* Fused multi-head self-attention of one encoder layer for CPU inference.
 *
 * Part of tessera_model (tessera_model/cpu_kernels.py compiles and loads it). For each pixel
 * and head, reading the QKV projection in the layout the in-projection GEMM writes it and
 * writing the head outputs in the layout the out-projection GEMM reads:
 *
 *     out[p, i, h, :] = sum_j softmax_j(scale * q_i . k_j) v_j
 *
 * with q, k, v the head-h slices of token rows of pixel p. The scores, the softmax and the
 * weighted sum of one (pixel, head) stay in the first-level cache: no (B, heads, T, T) score
 * tensor, no head-major copies of Q, K and V, no separate softmax passes.
 *
 * Plain C with GCC/Clang vector extensions (16 floats; the compiler maps them to the
 * machine's vector registers). The exponential is our own (vec.h: range reduction to
 * [-1/2, 1/2] and a polynomial of 2^f, relative error about 1e-7 in float32), so
 * the code needs no libm and no fast-math: the same binary gives the same bits on every run,
 * and every pixel's result depends only on that pixel's rows.
 */
#include <stdint.h>
#include <string.h>

#include "vec.h"

/* quant.c: rows x[i * ldx], i < nr <= 4, quantised to int8 with one scale per row */
void tessera_quantise_block(const float *x, int64_t ldx, int nr, int8_t *q, float *scale,
                            int64_t k);

#define R 8 /* query rows per register block (sums8 reduces eight) */

/* Softmax numerators of one row of scores sr (tp columns, the last vector's lanes past t
 * masked out by keep) into pr, taken of the scores as they are (the row maximum only guards the
 * exponent's range, and finding it costs as much as the rest); returns their lane-wise sum. */
static inline __attribute__((always_inline)) vf row_exp(const float *sr, float *pr, int64_t nj,
                                                       vi keep) {
    vf tot = splat(0.0f);
    for (int64_t jb = 0; jb < nj - 1; jb++) {
        const vf e = exp2_clamped(*(const vf *)(sr + jb * W));
        *(vf *)(pr + jb * W) = e;
        tot += e;
    }
    const vf e = (vf)(keep & (vi)exp2_clamped(*(const vf *)(sr + (nj - 1) * W)));
    *(vf *)(pr + (nj - 1) * W) = e;
    return tot + e;
}

/* The same with the row maximum subtracted (for a row whose sum left [2^-100, 2^100]: no
 * overflow, no loss to subnormals); returns 1 / the sum in every lane. */
static vf row_exp_shifted(const float *sr, float *pr, int64_t nj, vi keep) {
    vf m = (vf)((keep & (vi) * (const vf *)(sr + (nj - 1) * W)) | (~keep & (vi)splat(-1e30f)));
    for (int64_t jb = 0; jb < nj - 1; jb++) m = vmax(m, *(const vf *)(sr + jb * W));
    m = all_max(m);
    vf tot = splat(0.0f);
    for (int64_t jb = 0; jb < nj; jb++) {
        vf e = exp2_clamped(*(const vf *)(sr + jb * W) - m);
        if (jb == nj - 1) e = (vf)(keep & (vi)e);
        *(vf *)(pr + jb * W) = e;
        tot += e;
    }
    return splat(1.0f) / all_sum(tot);
}

/* Rows i0 .. i0 + nr of one (pixel, head): scores, softmax, weighted values. Called with a
 * constant nr = R for whole blocks (the row loops then unroll into registers). s and pr: R rows
 * of tp floats each (scores, softmax numerators). */
static inline __attribute__((always_inline)) void rows_block(
    const float *q, int64_t row, const float *kt, const float *vv, int64_t vstride, float *s,
    float *pr, float *o, int64_t d, int64_t t, int64_t tp, int64_t dh, int64_t dhp, float alpha,
    int nr) {
    const int64_t nj = tp / W, nd = dhp / W;
    for (int64_t jb = 0; jb < nj; jb++) {
        vf acc[R];
        for (int r = 0; r < nr; r++) acc[r] = splat(0.0f);
        for (int64_t c = 0; c < dh; c++) {
            const vf kv = *(const vf *)(kt + c * tp + jb * W);
            for (int r = 0; r < nr; r++) acc[r] += kv * q[r * row + c];
        }
        for (int r = 0; r < nr; r++) *(vf *)(s + r * tp + jb * W) = acc[r] * alpha;
    }
    vi keep;
    for (int i = 0; i < W; i++) keep[i] = (nj - 1) * W + i < t ? -1 : 0;
    vf tot[R];
    for (int r = 0; r < R; r++) tot[r] = r < nr ? row_exp(s + r * tp, pr + r * tp, nj, keep)
                                                : splat(1.0f);
    const vf z = sums8(tot); /* row r's sum in lane 2r */
    const vf invz = splat(1.0f) / z;
    vf inv[R];
    for (int r = 0; r < nr; r++) {
        const float zr = z[2 * r];
        inv[r] = zr >= 0x1p-100f && zr <= 0x1p100f
                     ? splat(invz[2 * r])
                     : row_exp_shifted(s + r * tp, pr + r * tp, nj, keep);
    }
    for (int64_t db = 0; db < nd; db++) {
        vf acc[R];
        for (int r = 0; r < nr; r++) acc[r] = splat(0.0f);
        for (int64_t j = 0; j < t; j++) {
            const vf vj = load_u(vv + j * vstride + db * W);
            for (int r = 0; r < nr; r++) acc[r] += vj * pr[r * tp + j];
        }
        const int64_t cols = dh - db * W < W ? dh - db * W : W;
        for (int r = 0; r < nr; r++) {
            float *dst = o + r * d + db * W;
            vf y = acc[r] * inv[r];
            if (cols == W) {
                store_u(dst, y);
            } else {
                for (int64_t c = 0; c < cols; c++) dst[c] = y[c];
            }
        }
    }
}

/* Floats of scratch space tessera_attention needs for sequences of t tokens and heads of dh. */
int64_t tessera_attention_scratch(int64_t t, int64_t dh) {
    const int64_t tp = (t + W - 1) / W * W, dhp = (dh + W - 1) / W * W;
    return dh * tp + tp * dhp + 2 * R * tp + W; /* + W: room to align to a vector */
}

/* Attention of pixels [p0, p1).
 *
 * qkv: (n, t, 3, heads, dh) float32, contiguous (token rows of width 3 d, d = heads dh).
 * out: (n, t, heads, dh) float32, contiguous (token rows of width d).
 * scratch: tessera_attention_scratch(t, dh) floats, owned by the calling thread.
 * scale: the score scale, 1 / sqrt(dh).
 * q_out, qs: NULL, or (n t, d) int8 and (n t,) float32 that also receive the output rows'
 * int8 form (quant.c, as tessera_quantise_rows makes it: the out-projection's int8 input).
 * Returns 0, or -1 for t < 1 or dh < 1 (nothing written).
 */
int tessera_attention(const float *qkv, float *out, float *scratch, int64_t p0, int64_t p1,
                      int64_t t, int64_t heads, int64_t dh, float scale, int8_t *q_out,
                      float *qs) {
    if (t < 1 || dh < 1) return -1;
    const int64_t d = heads * dh, row = 3 * d;
    const int64_t tp = (t + W - 1) / W * W;   /* key columns, padded */
    const int64_t dhp = (dh + W - 1) / W * W; /* value columns, padded */
    const float alpha = scale * 1.44269504088896341f; /* scores in base-2 units */
    float *kt = (float *)(((uintptr_t)scratch + sizeof(vf) - 1) / sizeof(vf) * sizeof(vf));
    float *vv = kt + dh * tp, *s = vv + tp * dhp, *pr = s + R * tp;
    for (int64_t p = p0; p < p1; p++) {
        const float *base = qkv + p * t * row;
        float *obase = out + p * t * d;
        for (int64_t h = 0; h < heads; h++) {
            const float *q = base + h * dh, *k = base + d + h * dh, *v = base + 2 * d + h * dh;
            /* K transposed to (dh, tp), key columns past t zero, in 16 x 16 blocks. Reading
             * whole vectors past column dh stays inside the token row (V follows K). */
            for (int64_t jb = 0; jb < tp; jb += W) {
                for (int64_t cb = 0; cb < dh; cb += W) {
                    vf blk[W];
                    for (int i = 0; i < W; i++)
                        blk[i] = jb + i < t ? load_u(k + (jb + i) * row + cb) : splat(0.0f);
                    transpose16(blk);
                    const int64_t nc = dh - cb < W ? dh - cb : W;
                    for (int64_t c = 0; c < nc; c++) *(vf *)(kt + (cb + c) * tp + jb) = blk[c];
                }
            }
            /* V read in place when its rows are whole vectors, else copied zero-padded */
            const float *vr = v;
            int64_t vstride = row;
            if (dh != dhp) {
                for (int64_t j = 0; j < t; j++) {
                    float *dst = vv + j * dhp;
                    memcpy(dst, v + j * row, (size_t)dh * sizeof(float));
                    for (int64_t c = dh; c < dhp; c++) dst[c] = 0.0f;
                }
                vr = vv;
                vstride = dhp;
            }
            int64_t i0 = 0;
            for (; i0 + R <= t; i0 += R)
                rows_block(q + i0 * row, row, kt, vr, vstride, s, pr, obase + i0 * d + h * dh, d, t,
                           tp, dh, dhp, alpha, R);
            if (i0 < t)
                rows_block(q + i0 * row, row, kt, vr, vstride, s, pr, obase + i0 * d + h * dh, d, t,
                           tp, dh, dhp, alpha, (int)(t - i0));
        }
        if (q_out) /* the pixel's rows as int8 (quant.c), while they are in cache */
            for (int64_t i = 0; i < t; i += 4)
                tessera_quantise_block(obase + i * d, d, t - i < 4 ? (int)(t - i) : 4,
                                       q_out + (p * t + i) * d, qs + p * t + i, d);
    }
    return 0;
}

/* The kernels over a call's whole range of pixels or rows, split over `parts` threads of the
 * pool (pool.c). Each pixel's (row's) result depends only on its own inputs, so the split never
 * changes a bit. Part of tessera_model (tessera_model/cpu_kernels.py loads these). */
#include <stdint.h>
#include <stdlib.h>

#include "pool.h"

int tessera_attention(const float *qkv, float *out, float *scratch, int64_t p0, int64_t p1,
                      int64_t t, int64_t heads, int64_t dh, float scale, int8_t *q_out, float *qs);
int64_t tessera_attention_scratch(int64_t t, int64_t dh);
int tessera_layer_norm(const float *x, float *y, const float *w, const float *b, int64_t r0,
                       int64_t r1, int64_t d, float eps, int8_t *q, float *qs);
int tessera_quantise_rows(const float *x, int8_t *q, float *scale, int64_t r0, int64_t r1,
                          int64_t k);
int tessera_dequantise(const int32_t *acc, float *y, const float *sw, const float *sx,
                       const float *bias, const float *res, int relu, int64_t r0, int64_t r1,
                       int64_t n, int8_t *q, float *qs);
int tessera_gemm_i8(const int8_t *q, const int8_t *wp, const int32_t *comp, const float *sw,
                    const float *sx, const float *bias, const float *res, int relu, float *y,
                    int8_t *q_out, float *qs, int64_t r0, int64_t r1, int64_t n, int64_t k,
                    int ln, const float *ln_w, const float *ln_b, float ln_eps);

typedef struct {
    const float *qkv;
    float *out;
    int64_t t, heads, dh;
    float scale;
    int8_t *q;
    float *qs;
} attention_args;

static int attention_part(void *ctx, int64_t p0, int64_t p1) {
    const attention_args *a = ctx;
    /* the thread's scratch, kept between calls */
    static __thread float *buf = 0;
    static __thread int64_t cap = 0;
    const int64_t need = tessera_attention_scratch(a->t, a->dh);
    if (need > cap) {
        free(buf);
        buf = malloc((size_t)need * sizeof(float));
        cap = buf ? need : 0;
        if (!buf) return -1;
    }
    return tessera_attention(a->qkv, a->out, buf, p0, p1, a->t, a->heads, a->dh, a->scale, a->q,
                             a->qs);
}

int tessera_attention_mt(const float *qkv, float *out, int64_t n, int64_t t, int64_t heads,
                         int64_t dh, float scale, int8_t *q, float *qs, int parts) {
    if (t < 1 || dh < 1) return -1;
    attention_args a = {qkv, out, t, heads, dh, scale, q, qs};
    return tessera_parallel(attention_part, &a, n, parts);
}

typedef struct {
    const float *x;
    float *y;
    const float *w, *b;
    int64_t d;
    float eps;
    int8_t *q;
    float *qs;
} layer_norm_args;

static int layer_norm_part(void *ctx, int64_t r0, int64_t r1) {
    const layer_norm_args *a = ctx;
    return tessera_layer_norm(a->x, a->y, a->w, a->b, r0, r1, a->d, a->eps, a->q, a->qs);
}

int tessera_layer_norm_mt(const float *x, float *y, const float *w, const float *b, int64_t rows,
                          int64_t d, float eps, int8_t *q, float *qs, int parts) {
    if (d < 1) return -1;
    layer_norm_args a = {x, y, w, b, d, eps, q, qs};
    return tessera_parallel(layer_norm_part, &a, rows, parts);
}

typedef struct {
    const float *x;
    int8_t *q;
    float *scale;
    int64_t k;
} quantise_args;

static int quantise_part(void *ctx, int64_t r0, int64_t r1) {
    const quantise_args *a = ctx;
    return tessera_quantise_rows(a->x, a->q, a->scale, r0, r1, a->k);
}

int tessera_quantise_rows_mt(const float *x, int8_t *q, float *scale, int64_t rows, int64_t k,
                             int parts) {
    if (k < 1) return -1;
    quantise_args a = {x, q, scale, k};
    return tessera_parallel(quantise_part, &a, rows, parts);
}

typedef struct {
    const int32_t *acc;
    float *y;
    const float *sw, *sx, *bias, *res;
    int relu;
    int64_t n;
    int8_t *q;
    float *qs;
} dequantise_args;

static int dequantise_part(void *ctx, int64_t r0, int64_t r1) {
    const dequantise_args *a = ctx;
    return tessera_dequantise(a->acc, a->y, a->sw, a->sx, a->bias, a->res, a->relu, r0, r1, a->n,
                              a->q, a->qs);
}

int tessera_dequantise_mt(const int32_t *acc, float *y, const float *sw, const float *sx,
                          const float *bias, const float *res, int relu, int64_t rows, int64_t n,
                          int8_t *q, float *qs, int parts) {
    if (n < 1 || (!y && !q)) return -1;
    dequantise_args a = {acc, y, sw, sx, bias, res, relu, n, q, qs};
    return tessera_parallel(dequantise_part, &a, rows, parts);
}

typedef struct {
    const int8_t *q, *wp;
    const int32_t *comp;
    const float *sw, *sx, *bias, *res;
    int relu;
    float *y;
    int8_t *q_out;
    float *qs;
    int64_t n, k;
    int ln;
    const float *ln_w, *ln_b;
    float ln_eps;
} gemm_args;

static int gemm_part(void *ctx, int64_t r0, int64_t r1) {
    const gemm_args *a = ctx;
    return tessera_gemm_i8(a->q, a->wp, a->comp, a->sw, a->sx, a->bias, a->res, a->relu, a->y,
                           a->q_out, a->qs, r0, r1, a->n, a->k, a->ln, a->ln_w, a->ln_b,
                           a->ln_eps);
}

int tessera_gemm_i8_mt(const int8_t *q, const int8_t *wp, const int32_t *comp, const float *sw,
                       const float *sx, const float *bias, const float *res, int relu, float *y,
                       int8_t *q_out, float *qs, int64_t rows, int64_t n, int64_t k, int ln,
                       const float *ln_w, const float *ln_b, float ln_eps, int parts) {
    gemm_args a = {q, wp, comp, sw, sx, bias, res, relu, y, q_out, qs, n, k, ln, ln_w, ln_b,
                   ln_eps};
    if (rows < 1) return 0;
    /* sizes checked once, before the split (a rejected part would leave the others written) */
    const int rc = tessera_gemm_i8(q, wp, comp, sw, sx, bias, res, relu, y, q_out, qs, 0, 0, n, k,
                                   ln, ln_w, ln_b, ln_eps);
    return rc ? rc : tessera_parallel(gemm_part, &a, rows, parts);
}

int tessera_gru_pool_i8(const int8_t *xq, const float *xs, const float *x, float *out,
                        int64_t r0, int64_t r1, int64_t t, int64_t hd, int64_t d,
                        const int8_t *wx, const int32_t *cx, const float *sx, const float *bx,
                        const int8_t *wrz, const int32_t *crz, const float *srz,
                        const int8_t *whh, const int32_t *chh, const float *shh, const float *a,
                        float c, float eps);
int64_t tessera_gru_block_rows(int64_t hd);

typedef struct {
    const int8_t *xq;
    const float *xs, *x;
    float *out;
    int64_t t, hd, d;
    const int8_t *wx;
    const int32_t *cx;
    const float *sx, *bx;
    const int8_t *wrz;
    const int32_t *crz;
    const float *srz;
    const int8_t *whh;
    const int32_t *chh;
    const float *shh, *a;
    float c, eps;
    int64_t rows, block;
} gru_args;

/* The range is in whole blocks of tessera_gru_block_rows pixels (a thread's part never cuts
 * a block into single tiles). */
static int gru_part(void *ctx, int64_t u0, int64_t u1) {
    const gru_args *g = ctx;
    const int64_t r0 = u0 * g->block, r1 = u1 * g->block < g->rows ? u1 * g->block : g->rows;
    return tessera_gru_pool_i8(g->xq, g->xs, g->x, g->out, r0, r1, g->t, g->hd, g->d, g->wx,
                               g->cx, g->sx, g->bx, g->wrz, g->crz, g->srz, g->whh, g->chh,
                               g->shh, g->a, g->c, g->eps);
}

int tessera_gru_pool_i8_mt(const int8_t *xq, const float *xs, const float *x, float *out,
                           int64_t rows, int64_t t, int64_t hd, int64_t d, const int8_t *wx,
                           const int32_t *cx, const float *sx, const float *bx,
                           const int8_t *wrz, const int32_t *crz, const float *srz,
                           const int8_t *whh, const int32_t *chh, const float *shh,
                           const float *a, float c, float eps, int parts) {
    const int64_t block = tessera_gru_block_rows(hd);
    gru_args g = {xq, xs, x, out, t, hd, d, wx, cx, sx, bx, wrz, crz, srz, whh, chh, shh, a,
                  c, eps, rows, block};
    /* sizes checked once, before the split */
    const int rc = tessera_gru_pool_i8(xq, xs, x, out, 0, 0, t, hd, d, wx, cx, sx, bx, wrz, crz,
                                       srz, whh, chh, shh, a, c, eps);
    return rc ? rc : tessera_parallel(gru_part, &g, (rows + block - 1) / block, parts);
}

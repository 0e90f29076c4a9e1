/* Vector helpers shared by the CPU kernels of tessera_model (GCC/Clang vector extensions). */
#ifndef TESSERA_VEC_H
#define TESSERA_VEC_H
#include <stdint.h>
#include <string.h>

#define W 16 /* floats per vector */

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vf_u __attribute__((vector_size(W * sizeof(float)), aligned(4)));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline __attribute__((unused)) void store_u(float *p, vf v) { *(vf_u *)p = v; }
static inline __attribute__((unused)) vf splat(float x) { return (vf){0} + x; }
static inline __attribute__((unused)) vf vmax(vf a, vf b) {
    vi m = a > b; /* all ones where a > b */
    return (vf)((m & (vi)a) | (~m & (vi)b));
}

/* 2^x elementwise, x clamped to [-126, 126] (2^-126 for anything lower: no subnormals). */
#if defined(__AVX512F__)
#include <immintrin.h>
/* AVX-512: rounding and the power of two in one instruction each (vrndscaleps, vscalefps),
 * 2^f on [-1/2, 1/2] by a degree-5 polynomial fitted for least relative error (8e-8): 10
 * operations against 17 for the portable form below. */
static inline __attribute__((unused)) vf exp2_clamped(vf x) {
    const __m512 v =
        _mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(v, n);
    __m512 p = _mm512_set1_ps(0.0013266970386325919f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675459745517631f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550742616002543f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022121753561676f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469491610631f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000710296983f));
    return (vf)_mm512_scalef_ps(p, n);
}
#else
static inline __attribute__((unused)) vf exp2_clamped(vf x) {
    x = vmax(x, splat(-126.0f));
    {
        vi m = x > splat(126.0f);
        x = (vf)((m & (vi)splat(126.0f)) | (~m & (vi)x));
    }
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x + magic) - magic;
    vf f = x - n; /* in [-1/2, 1/2] */
    /* 2^f on [-1/2, 1/2]: degree-6 polynomial fitted for least maximum relative error
     * (1.9e-9; 1e-7 after float32 Horner rounding) */
    const float c1 = 0.6931472057371135f, c2 = 0.24022646890295196f, c3 = 0.05550328777213428f,
                c4 = 0.009618488993799912f, c5 = 0.0013399931139421242f,
                c6 = 0.0001534580213339489f, c0 = 1.0000000005542111f;
    vf p = splat(c6);
    p = p * f + c5;
    p = p * f + c4;
    p = p * f + c3;
    p = p * f + c2;
    p = p * f + c1;
    p = p * f + c0;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof(scale));
    return p * scale;
}
#endif

/* Horizontal max and sum of a vector, returned in every lane (butterfly, then lane 0 broadcast,
 * so every lane holds the same value). */
#ifdef __clang__
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (vi){__VA_ARGS__})
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif
#define SWAP8(v) SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#define SWAP4(v) SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
#define SWAP2(v) SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
#define SWAP1(v) SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#define LANE0(v) SHUFFLE(v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

static inline __attribute__((unused)) vf all_max(vf v) {
    v = vmax(v, SWAP8(v));
    v = vmax(v, SWAP4(v));
    v = vmax(v, SWAP2(v));
    return vmax(v, SWAP1(v));
}

static inline __attribute__((unused)) vf all_sum(vf v) {
    v = v + SWAP8(v);
    v = v + SWAP4(v);
    v = v + SWAP2(v);
    v = v + SWAP1(v);
    return LANE0(v);
}

/* One butterfly stage of a 16 x 16 transpose: rows a (bit s of the row index clear) and b
 * (set) swap their off-diagonal s x s sub-blocks. Four stages, s = 1, 2, 4, 8, transpose. */
#define STAGE1(a, b)                                                                      \
    do {                                                                                  \
        vf x_ = SHUFFLE2(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30); \
        b = SHUFFLE2(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);     \
        a = x_;                                                                           \
    } while (0)
#define STAGE2(a, b)                                                                      \
    do {                                                                                  \
        vf x_ = SHUFFLE2(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29); \
        b = SHUFFLE2(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);   \
        a = x_;                                                                           \
    } while (0)
#define STAGE4(a, b)                                                                      \
    do {                                                                                  \
        vf x_ = SHUFFLE2(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27); \
        b = SHUFFLE2(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);   \
        a = x_;                                                                           \
    } while (0)
#define STAGE8(a, b)                                                                      \
    do {                                                                                  \
        vf x_ = SHUFFLE2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);   \
        b = SHUFFLE2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31); \
        a = x_;                                                                           \
    } while (0)

/* Transpose the 16 x 16 block r[0..15] in place (r[i][l] becomes r[l][i]). */
static inline __attribute__((unused)) void transpose16(vf *r) {
    for (int i = 0; i < 16; i += 2) STAGE1(r[i], r[i + 1]);
    for (int i = 0; i < 16; i += 4)
        for (int j = i; j < i + 2; j++) STAGE2(r[j], r[j + 2]);
    for (int i = 0; i < 16; i += 8)
        for (int j = i; j < i + 4; j++) STAGE4(r[j], r[j + 4]);
    for (int j = 0; j < 8; j++) STAGE8(r[j], r[j + 8]);
}

/* The sums of eight vectors t[0..7] at once: row r's sum in lanes 2r and 2r + 1 (23 operations
 * against 72 for eight all_sum). */
static inline __attribute__((unused)) vf sums8(const vf *t) {
    vf u[4], v[2];
    for (int r = 0; r < 4; r++) /* lanes 0-7: row r, 8-15: row r + 4 */
        u[r] = SHUFFLE2(t[r], t[r + 4], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE2(t[r], t[r + 4], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                        31);
    for (int r = 0; r < 2; r++) /* lanes 0-3: row r, 4-7: r + 2, 8-11: r + 4, 12-15: r + 6 */
        v[r] = SHUFFLE2(u[r], u[r + 2], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               SHUFFLE2(u[r], u[r + 2], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30,
                        31);
    /* lanes 2k, 2k + 1: row k */
    vf w = SHUFFLE2(v[0], v[1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SHUFFLE2(v[0], v[1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return w + SWAP1(w);
}

/* Lane i of v in every lane. */
#define BROADCAST_LANE(v, i) SHUFFLE(v, i, i, i, i, i, i, i, i, i, i, i, i, i, i, i, i)

/* n (< W) floats into a vector, the other lanes zero; and back. */
static inline __attribute__((unused)) vf load_part(const float *p, int64_t n) {
    vf v = splat(0.0f);
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}

static inline __attribute__((unused)) void store_part(float *p, vf v, int64_t n) {
    memcpy(p, &v, (size_t)n * sizeof(float));
}

static inline __attribute__((unused)) vf load_u(const float *p) { return *(const vf_u *)p; }
#endif

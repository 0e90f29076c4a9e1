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

/* 2^x for x <= 0 (scores minus their row maximum), elementwise. */
static inline __attribute__((unused)) vf exp2_nonpos(vf x) {
    const vf lo = splat(-126.0f);
    x = vmax(x, lo);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x + magic) - magic;
    vf f = x - n; /* in [-1/2, 1/2] */
    /* 2^f = e^(f ln 2), Taylor to degree 7 in Horner form */
    const float c1 = 0.693147180559945309f, c2 = 0.240226506959100712f,
                c3 = 0.0555041086648215799f, c4 = 0.00961812910762847716f,
                c5 = 0.00133335581464284434f, c6 = 0.000154035303933816099f,
                c7 = 0.0000152527338040598403f;
    vf p = splat(c7);
    p = p * f + c6;
    p = p * f + c5;
    p = p * f + c4;
    p = p * f + c3;
    p = p * f + c2;
    p = p * f + c1;
    p = p * f + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof(scale));
    return p * scale;
}

/* Horizontal max and sum of a vector, returned in every lane (butterfly, then lane 0 broadcast,
 * so every lane holds the same value). */
#ifdef __clang__
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (vi){__VA_ARGS__})
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

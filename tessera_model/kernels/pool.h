/* The kernels' thread pool (pool.c) and the parallel forms of the kernels (parallel.c). */
#ifndef TESSERA_POOL_H
#define TESSERA_POOL_H
#include <stdint.h>

/* Work on [r0, r1) of a call's range; 0 on success. */
typedef int (*range_fn)(void *ctx, int64_t r0, int64_t r1);

/* fn over [0, n) in `parts` ranges, the first in the calling thread; returns 0, or -1 when any
 * part failed. */
int tessera_parallel(range_fn fn, void *ctx, int64_t n, int parts);
#endif

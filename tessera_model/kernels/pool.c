/* A small thread pool for the CPU kernels (tessera_model/cpu_kernels.py): one call's range of
 * pixels or rows cut into chunks that the calling thread and the pool's workers claim one at a
 * time.
 *
 * Why not Python's ThreadPoolExecutor: each hand-off there costs 45-70 us on the 2-core dev box
 * (queue, lock, thread wake-up, future), as much as a whole kernel call of a small model; two
 * threads then ran the int8 path slower than one.
 *
 * Busy machines: the caller never waits for a worker that has not started. The range is cut
 * into CHUNKS_PER_THREAD chunks per thread, every thread (the caller first) claims the next
 * unclaimed chunk until none is left, and the caller then waits only for chunks a worker has
 * already begun; if the workers get no core (other processes hold them), the caller does all
 * the work itself, as one thread would. Idle workers sleep on a condition variable (an idle pool
 * costs nothing); a hand-off then costs a thread wake-up. On a machine of one's own,
 * TESSERA_KERNEL_SPIN_US (default 0) lets them first look for the next call with sched_yield for
 * that long (200 us covers the gap between the kernel calls of one forward; two threads, int8:
 * `small` 1.19x and v2-nano 1.32x the pixels/s of sleeping at once); a yield that takes over
 * 30 us means another thread wanted the core, and the poller sleeps. Not the default: beside two
 * busy processes, polling made two threads 1.8-2.2x slower than one, sleeping 0.6-0.8x.
 *
 * One call at a time uses the pool; a call that finds it busy (another Python thread in the
 * middle of a call) runs its whole range in the calling thread instead of waiting. A child
 * process made by fork() has none of the workers: it starts its own (pthread_atfork).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "pool.h"

#define MAX_WORKERS 255
#define CHUNKS_PER_THREAD 4

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;      /* sleeping and waking */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static int workers = 0; /* threads started */
/* The call: generation (high 32 bits) and the next unclaimed chunk (low 32). A claim is a
 * compare-and-swap on both, so a worker can never take a chunk of a call other than the one
 * whose fields it read. */
static _Atomic uint64_t state = 0;
static atomic_int chunks_done = 0;
static atomic_int job_error = 0;
static range_fn job_fn;
static void *job_ctx;
static int64_t job_n;
static int64_t job_chunks;
static long spin_ns = -1;
#define CONTENDED_NS 30000 /* a sched_yield this long means another thread got the core */
static uint32_t start_gen[MAX_WORKERS]; /* the generation before a worker's first call */
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* In a forked child only the forking thread exists: forget the workers and reset the locks
 * (another thread of the parent may have held them). */
static void after_fork_child(void) {
    workers = 0;
    pthread_mutex_init(&call_lock, 0);
    pthread_mutex_init(&lock, 0);
    pthread_cond_init(&wake, 0);
    pthread_cond_init(&done, 0);
}

static void register_fork_handler(void) { pthread_atfork(0, 0, after_fork_child); }

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static long spin_budget(void) {
    if (spin_ns < 0) {
        const char *s = getenv("TESSERA_KERNEL_SPIN_US");
        long us = s ? atol(s) : 0;
        spin_ns = (us < 0 ? 0 : us) * 1000L;
    }
    return spin_ns;
}

/* Give the core away once; true when that took long enough that another thread ran (the core
 * is wanted: stop polling and sleep). *t: the time before, updated. */
static int yield_was_contended(long *t) {
    sched_yield();
    const long t2 = now_ns();
    const int contended = t2 - *t > CONTENDED_NS;
    *t = t2;
    return contended;
}

static uint32_t gen_of(uint64_t s) { return (uint32_t)(s >> 32); }

/* Claim and run chunks of call `gen` until none is left; the thread that completes the last
 * chunk wakes the caller. */
static void work(uint32_t gen) {
    uint64_t s = atomic_load_explicit(&state, memory_order_acquire);
    for (;;) {
        if (gen_of(s) != gen) return;
        const int64_t chunks = job_chunks, c = (int64_t)(uint32_t)s;
        if (c >= chunks) return;
        if (!atomic_compare_exchange_weak_explicit(&state, &s, s + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* chunk c of this call is ours: the call cannot end before we report it */
        const int64_t r0 = job_n * c / chunks, r1 = job_n * (c + 1) / chunks;
        if (r1 > r0 && job_fn(job_ctx, r0, r1) != 0) atomic_store(&job_error, 1);
        if (atomic_fetch_add_explicit(&chunks_done, 1, memory_order_acq_rel) + 1 == chunks) {
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&done);
            pthread_mutex_unlock(&lock);
        }
        s = atomic_load_explicit(&state, memory_order_acquire);
    }
}

static void *worker(void *arg) {
    uint32_t seen = start_gen[(intptr_t)arg];
    for (;;) {
        uint32_t g = gen_of(atomic_load_explicit(&state, memory_order_acquire));
        if (g == seen) {
            long t = now_ns();
            const long until = t + spin_budget();
            while ((g = gen_of(atomic_load_explicit(&state, memory_order_acquire))) == seen &&
                   t < until && !yield_was_contended(&t))
                ;
            if (g == seen) {
                pthread_mutex_lock(&lock);
                while ((g = gen_of(atomic_load_explicit(&state, memory_order_acquire))) == seen)
                    pthread_cond_wait(&wake, &lock);
                pthread_mutex_unlock(&lock);
            }
        }
        seen = g;
        work(g);
    }
    return 0;
}

int tessera_parallel(range_fn fn, void *ctx, int64_t n, int parts) {
    if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
    if (parts > n) parts = (int)n;
    if (parts <= 1) return n > 0 ? fn(ctx, 0, n) : 0;
    pthread_once(&once, register_fork_handler);
    if (pthread_mutex_trylock(&call_lock) != 0) return fn(ctx, 0, n);
    const uint32_t gen = gen_of(atomic_load(&state)) + 1;
    while (workers < parts - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 8u << 20); /* the kernels keep row blocks on the stack */
        start_gen[workers] = gen - 1;
        const int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)workers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        workers++;
    }
    if (parts - 1 > workers) parts = workers + 1;
    int64_t chunks = (int64_t)parts * CHUNKS_PER_THREAD;
    if (chunks > n) chunks = n;
    job_fn = fn, job_ctx = ctx, job_n = n, job_chunks = chunks;
    atomic_store(&job_error, 0);
    atomic_store(&chunks_done, 0);
    pthread_mutex_lock(&lock);
    atomic_store_explicit(&state, (uint64_t)gen << 32, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    work(gen);
    /* every chunk is claimed: wait for the ones workers are running */
    if (atomic_load_explicit(&chunks_done, memory_order_acquire) < chunks) {
        long t = now_ns();
        const long until = t + spin_budget();
        while (atomic_load_explicit(&chunks_done, memory_order_acquire) < chunks && t < until &&
               !yield_was_contended(&t))
            ;
        pthread_mutex_lock(&lock);
        while (atomic_load_explicit(&chunks_done, memory_order_acquire) < chunks)
            pthread_cond_wait(&done, &lock);
        pthread_mutex_unlock(&lock);
    }
    const int err = atomic_load(&job_error);
    pthread_mutex_unlock(&call_lock);
    return err ? -1 : 0;
}

/* A small thread pool for the CPU kernels (tessera_model/cpu_kernels.py): one call's range of
 * pixels or rows split over `parts` threads, the calling thread running the first part.
 *
 * Why not Python's ThreadPoolExecutor: each hand-off there costs 45-70 us on the 2-core dev box
 * (queue, lock, thread wake-up, future), as much as a whole kernel call of a small model; two
 * threads then ran the int8 path slower than one. Here the workers wait for the next call by
 * polling with sched_yield for a short while (TESSERA_KERNEL_SPIN_US, default 200 us: the gap
 * between the kernel calls of one forward), then sleep on a condition variable, so an idle
 * pool costs nothing and a worker never holds a core another runnable thread wants (the
 * busy-machine rule: sched_yield gives the core away at once).
 *
 * One call at a time uses the pool; a call that finds it busy (another Python thread in the
 * middle of a call) runs its whole range in the calling thread instead of waiting. A child
 * process made by fork() has none of the workers: it starts its own pool (pthread_atfork).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "pool.h"

#define MAX_WORKERS 255

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;      /* sleeping and waking */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static int workers = 0; /* threads started */
static atomic_long generation = 0;
static atomic_int remaining = 0;
static range_fn job_fn;
static void *job_ctx;
static int64_t job_n;
static int job_parts;
static atomic_int job_error = 0;
static long spin_ns = -1;
static long start_gen[MAX_WORKERS]; /* the generation before a worker's first call */

static pthread_once_t once = PTHREAD_ONCE_INIT;

/* In a forked child only the forking thread exists: forget the workers and reset the locks
 * (another thread of the parent may have held them). */
static void after_fork_child(void) {
    workers = 0;
    pthread_mutex_init(&call_lock, 0);
    pthread_mutex_init(&lock, 0);
    pthread_cond_init(&wake, 0);
    pthread_cond_init(&done, 0);
    atomic_store(&remaining, 0);
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
        long us = s ? atol(s) : 200;
        spin_ns = (us < 0 ? 0 : us) * 1000L;
    }
    return spin_ns;
}

static void run_part(int part) {
    const int64_t r0 = job_n * part / job_parts, r1 = job_n * (part + 1) / job_parts;
    if (r1 > r0 && job_fn(job_ctx, r0, r1) != 0) atomic_store(&job_error, 1);
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg; /* runs part id + 1 */
    long seen = start_gen[id]; /* not the generation now: the first call may be posted already */
    for (;;) {
        long g = atomic_load_explicit(&generation, memory_order_acquire);
        if (g == seen) {
            const long until = now_ns() + spin_budget();
            while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen &&
                   now_ns() < until)
                sched_yield();
            if (g == seen) {
                pthread_mutex_lock(&lock);
                while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen)
                    pthread_cond_wait(&wake, &lock);
                pthread_mutex_unlock(&lock);
            }
        }
        seen = g;
        if (id + 1 < job_parts) {
            run_part(id + 1);
            if (atomic_fetch_sub_explicit(&remaining, 1, memory_order_acq_rel) == 1) {
                pthread_mutex_lock(&lock);
                pthread_cond_signal(&done);
                pthread_mutex_unlock(&lock);
            }
        }
    }
    return 0;
}

int tessera_parallel(range_fn fn, void *ctx, int64_t n, int parts) {
    if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
    if (parts > n) parts = (int)n;
    if (parts <= 1) return n > 0 ? fn(ctx, 0, n) : 0;
    pthread_once(&once, register_fork_handler);
    if (pthread_mutex_trylock(&call_lock) != 0) return fn(ctx, 0, n);
    while (workers < parts - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 8u << 20); /* the kernels keep row blocks on the stack */
        start_gen[workers] = atomic_load(&generation);
        const int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)workers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        workers++;
    }
    if (parts - 1 > workers) parts = workers + 1;
    job_fn = fn, job_ctx = ctx, job_n = n, job_parts = parts;
    atomic_store(&job_error, 0);
    atomic_store(&remaining, parts - 1);
    pthread_mutex_lock(&lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    run_part(0);
    if (atomic_load_explicit(&remaining, memory_order_acquire) > 0) {
        const long until = now_ns() + spin_budget();
        while (atomic_load_explicit(&remaining, memory_order_acquire) > 0 && now_ns() < until)
            sched_yield();
        pthread_mutex_lock(&lock);
        while (atomic_load_explicit(&remaining, memory_order_acquire) > 0)
            pthread_cond_wait(&done, &lock);
        pthread_mutex_unlock(&lock);
    }
    const int err = atomic_load(&job_error);
    pthread_mutex_unlock(&call_lock);
    return err ? -1 : 0;
}

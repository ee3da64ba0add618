/* The kernels' own thread pool: persistent workers that spin briefly between calls, then sleep.

   Not OpenMP: in a Python process the OpenMP runtime is torch's, whose thread count torch's
   set_num_threads changes under us, and whose teams run 2-3x slower when started from a thread
   other than the main one (the serving engine's scheduler thread), which plain C does not show.
   A decode step calls a kernel every few microseconds, so a worker that went to sleep would cost
   a wake-up per call: workers spin on the call counter for a while (SPIN_NS) before sleeping.

   parallel_for(threads, n, fn, ctx) runs fn(ctx, begin, end) over `threads` contiguous parts of
   [0, n), the caller taking the first. One call at a time: concurrent callers wait their turn. */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#ifdef __x86_64__
#include <immintrin.h>
#define RELAX() _mm_pause()
#else
#define RELAX() ((void)0)
#endif

#include "pool.h"

#define MAX_THREADS 256
#define SPIN_NS 2000000 /* 2 ms */

static struct {
    pthread_mutex_t call;   /* one parallel_for at a time */
    pthread_mutex_t lock;   /* with wake: for sleeping workers */
    pthread_cond_t wake;
    int workers;            /* started so far */
    atomic_uint generation; /* bumped per call */
    atomic_int pending;     /* parts not finished */
    int parts;
    int64_t n;
    task_fn fn;
    void *ctx;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void run_part(int part) {
    int64_t begin = P.n * part / P.parts, end = P.n * (part + 1) / P.parts;
    if (begin < end) P.fn(P.ctx, begin, end);
}

static unsigned start_generation[MAX_THREADS]; /* the call counter when each worker was made */

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg; /* 1 .. workers; part `index` of each call that has that many */
    unsigned seen = start_generation[index]; /* not read now: the first call may already be out */
    for (;;) {
        int64_t start = now_ns();
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&P.generation, memory_order_acquire)) == seen) {
            RELAX();
            if (++spins % 1024 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&P.lock);
                while ((gen = atomic_load(&P.generation)) == seen) pthread_cond_wait(&P.wake, &P.lock);
                pthread_mutex_unlock(&P.lock);
                break;
            }
        }
        seen = gen;
        if (index < P.parts) run_part(index);
        /* Every worker answers every call, taking part or not, so that none lags a call behind. */
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
    }
    return 0;
}

/* After fork only the forking thread exists: the child starts with no workers. */
static void after_fork_child(void) {
    pthread_mutex_init(&P.call, 0);
    pthread_mutex_init(&P.lock, 0);
    pthread_cond_init(&P.wake, 0);
    P.workers = 0;
}

static pthread_once_t registered = PTHREAD_ONCE_INIT;
static void register_fork(void) { pthread_atfork(0, 0, after_fork_child); }

void parallel_for(int threads, int64_t n, task_fn fn, void *ctx) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
    pthread_once(&registered, register_fork);
    pthread_mutex_lock(&P.call);
    while (P.workers < threads - 1) {
        pthread_t t;
        start_generation[P.workers + 1] = atomic_load(&P.generation);
        if (pthread_create(&t, 0, worker, (void *)(intptr_t)(P.workers + 1)) != 0) break;
        pthread_detach(t);
        P.workers++;
    }
    if (threads - 1 > P.workers) threads = P.workers + 1;
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    P.parts = threads;
    atomic_store(&P.pending, P.workers);
    pthread_mutex_lock(&P.lock);
    atomic_fetch_add_explicit(&P.generation, 1, memory_order_release);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.lock);
    run_part(0);
    while (atomic_load_explicit(&P.pending, memory_order_acquire) > 0) RELAX();
    pthread_mutex_unlock(&P.call);
}

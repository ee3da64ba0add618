/* The kernels' own thread pool: persistent workers that take chunks of a call's rows as they come.

   Not OpenMP: in a Python process the OpenMP runtime is torch's, whose thread count torch's
   set_num_threads changes under us, and whose teams ran the kernels 2-3x slower when started
   from a thread other than the main one (the serving engine's scheduler thread).

   Other pools share the cores: torch's (and numba's) OpenMP workers spin for milliseconds after
   each of their parallel regions. So nothing here waits on a particular thread: a call is cut into
   chunks that any participant claims from one counter, the caller included, and the caller waits
   only for chunks already claimed. A worker kept off its core by another pool's spinning costs at
   most the chunk it holds; one that wakes late finds nothing left and goes back to waiting.
   Workers spin SPIN_NS for the next call (a decode step calls a kernel every few microseconds),
   then sleep.

   parallel_for(threads, n, fn, ctx) runs fn(ctx, begin, end) over chunks of [0, n). Which thread
   takes which chunk varies; the kernels' results never depend on it. One call at a time:
   concurrent callers wait their turn. */

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
#define CHUNKS_PER_THREAD 2
#define SPIN_NS 200000 /* 0.2 ms */

static struct {
    pthread_mutex_t call;       /* one parallel_for at a time */
    pthread_mutex_t lock;       /* with wake: for sleeping workers */
    pthread_cond_t wake;
    int workers;                /* started so far */
    int sleepers;               /* waiting on wake (under lock) */
    /* A cache line each for what the caller writes once per call, the claim counter everyone
       updates, and the finished count the caller waits on: no false sharing among them. */
    _Alignas(64) int64_t n;
    task_fn fn;
    void *ctx;
    _Alignas(64) _Atomic uint64_t claim; /* see CALL, COUNT, NEXT */
    _Alignas(64) atomic_int done;        /* chunks finished in this call */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The claim word: call number << 32 | the call's chunk count << 16 | next chunk. The count travels
   in the word itself: a participant still holding an earlier call's word must never compare it
   against the next call's count (written before that call opens), or it could claim a chunk past
   the end of a call whose caller has moved on. */
#define CALL(v) ((uint32_t)((v) >> 32))
#define COUNT(v) ((int)(((v) >> 16) & 0xFFFF))
#define NEXT(v) ((int)((v) & 0xFFFF))

/* Claim and run chunks of call `call` until none is left or the call is over. A successful claim
   of a chunk of call `call` means the call is still open, so its fields below are its own. */
static void take_chunks(uint32_t call) {
    uint64_t v = atomic_load(&P.claim);
    for (;;) {
        if (CALL(v) != call || NEXT(v) >= COUNT(v)) return;
        if (!atomic_compare_exchange_weak(&P.claim, &v, v + 1)) continue;
        int chunk = NEXT(v), chunks = COUNT(v);
        int64_t begin = P.n * chunk / chunks, end = P.n * (chunk + 1) / chunks;
        if (begin < end) P.fn(P.ctx, begin, end);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
        v = atomic_load(&P.claim);
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint32_t seen = CALL(atomic_load(&P.claim));
    for (;;) {
        int64_t start = now_ns();
        int spins = 0;
        uint32_t call;
        while ((call = CALL(atomic_load_explicit(&P.claim, memory_order_acquire))) == seen) {
            RELAX();
            if (++spins % 256 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&P.lock);
                P.sleepers++;
                while ((call = CALL(atomic_load(&P.claim))) == seen) pthread_cond_wait(&P.wake, &P.lock);
                P.sleepers--;
                pthread_mutex_unlock(&P.lock);
                break;
            }
        }
        seen = call;
        take_chunks(call);
    }
    return 0;
}

/* After fork only the forking thread exists: the child starts with no workers. */
static void after_fork_child(void) {
    pthread_mutex_init(&P.call, 0);
    pthread_mutex_init(&P.lock, 0);
    pthread_cond_init(&P.wake, 0);
    P.workers = 0;
    P.sleepers = 0;
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
        if (pthread_create(&t, 0, worker, 0) != 0) break;
        pthread_detach(t);
        P.workers++;
    }
    int chunks = threads * CHUNKS_PER_THREAD;
    if (chunks > n) chunks = (int)n;
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    atomic_store(&P.done, 0);
    uint32_t call = CALL(atomic_load(&P.claim)) + 1;
    atomic_store_explicit(&P.claim, (uint64_t)call << 32 | (uint64_t)chunks << 16, memory_order_release); /* opens the call */
    pthread_mutex_lock(&P.lock);
    if (P.sleepers) pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.lock);
    take_chunks(call);
    while (atomic_load_explicit(&P.done, memory_order_acquire) < chunks) RELAX();
    pthread_mutex_unlock(&P.call);
}

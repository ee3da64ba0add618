/* See pool.c. */
#pragma once
#include <stdint.h>

typedef void (*task_fn)(void *ctx, int64_t begin, int64_t end);
void parallel_for(int threads, int64_t n, task_fn fn, void *ctx);
/* The same, but the workers go to sleep at once after it, instead of spinning for a next call. */
void parallel_for_then_sleep(int threads, int64_t n, task_fn fn, void *ctx);

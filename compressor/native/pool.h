/* See pool.c. */
#pragma once
#include <stdint.h>

typedef void (*task_fn)(void *ctx, int64_t begin, int64_t end);
void parallel_for(int threads, int64_t n, task_fn fn, void *ctx);

/* An adapter's rank-r products with its input dropout applied on the fly (compressor.lora.product).

   x is (rows, width) float32, A is (rank, width), h and the gradient of h are (rows, rank). The
   dropout mask is ops.c's (dropped()), indexed by the element's place in x, so no dropped copy of
   x is ever written: h = dropout(x) @ A.T, dA = dh.T @ dropout(x) and dx += dropout(dh @ A) each
   read x or write dx once. A row's result depends on that row alone, in a fixed order, whatever
   the thread count; dA sums fixed parts of the rows, then the parts in order. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "pool.h"

typedef struct {
    const float *x, *a, *grad_h;
    float *h, *out;
    int64_t rows, width, rank;
    uint32_t seed_lo, seed_hi, threshold;
    float scale; /* 1 / (1 - p); 0: no dropout */
    float *partials;
} lowrank_job;

/* Row t of x with the mask applied, into buf (or x's own row without dropout). */
static const float *row_of(const lowrank_job *j, int64_t t, float *buf) {
    const float *row = j->x + t * j->width;
    if (j->scale == 0.0f) return row;
    dropped(row, j->width, t * j->width, j->seed_lo, j->seed_hi, j->threshold, j->scale, buf);
    return buf;
}

static void low_rank_in_part(void *ctx, int64_t begin, int64_t end) {
    const lowrank_job *j = ctx;
    float *buf = malloc(sizeof(float) * j->width);
    for (int64_t t = begin; t < end; t++) {
        const float *row = row_of(j, t, buf);
        for (int64_t r = 0; r < j->rank; r++) j->h[t * j->rank + r] = dot16(row, j->a + r * j->width, j->width);
    }
    free(buf);
}

void low_rank_in(const float *x, int64_t rows, int64_t width, const float *a, int64_t rank, uint32_t seed_lo, uint32_t seed_hi,
                 uint32_t threshold, float scale, float *h, int threads) {
    lowrank_job j = {.x = x, .a = a, .h = h, .rows = rows, .width = width, .rank = rank, .seed_lo = seed_lo, .seed_hi = seed_hi,
                     .threshold = threshold, .scale = scale};
    parallel_for(threads, rows, low_rank_in_part, &j);
}

#define GRAD_A_PARTS 8 /* fixed, so that the sum's order does not depend on the thread count */

static void grad_a_part(void *ctx, int64_t begin, int64_t end) {
    const lowrank_job *j = ctx;
    float *buf = malloc(sizeof(float) * j->width);
    for (int64_t part = begin; part < end; part++) {
        float *acc = j->partials + part * j->rank * j->width;
        memset(acc, 0, sizeof(float) * j->rank * j->width);
        int64_t first = j->rows * part / GRAD_A_PARTS, last = j->rows * (part + 1) / GRAD_A_PARTS;
        for (int64_t t = first; t < last; t++) {
            const float *row = row_of(j, t, buf);
            for (int64_t r = 0; r < j->rank; r++) {
                float g = j->grad_h[t * j->rank + r];
                float *out = acc + r * j->width;
                for (int64_t k = 0; k < j->width; k++) out[k] += g * row[k];
            }
        }
    }
    free(buf);
}

void low_rank_grad_a(const float *grad_h, const float *x, int64_t rows, int64_t width, int64_t rank, uint32_t seed_lo,
                     uint32_t seed_hi, uint32_t threshold, float scale, float *grad_a, int threads) {
    lowrank_job j = {.x = x, .grad_h = grad_h, .rows = rows, .width = width, .rank = rank, .seed_lo = seed_lo, .seed_hi = seed_hi,
                     .threshold = threshold, .scale = scale};
    j.partials = malloc(sizeof(float) * GRAD_A_PARTS * rank * width);
    parallel_for(threads, GRAD_A_PARTS, grad_a_part, &j);
    int64_t n = rank * width;
    memcpy(grad_a, j.partials, sizeof(float) * n);
    for (int part = 1; part < GRAD_A_PARTS; part++)
        for (int64_t k = 0; k < n; k++) grad_a[k] += j.partials[part * n + k];
    free(j.partials);
}

static void grad_x_part(void *ctx, int64_t begin, int64_t end) {
    const lowrank_job *j = ctx;
    float *buf = malloc(sizeof(float) * j->width);
    for (int64_t t = begin; t < end; t++) {
        memset(buf, 0, sizeof(float) * j->width);
        for (int64_t r = 0; r < j->rank; r++) {
            float g = j->grad_h[t * j->rank + r];
            const float *a = j->a + r * j->width;
            for (int64_t k = 0; k < j->width; k++) buf[k] += g * a[k];
        }
        float *out = j->out + t * j->width;
        if (j->scale != 0.0f) dropped(buf, j->width, t * j->width, j->seed_lo, j->seed_hi, j->threshold, j->scale, buf);
        for (int64_t k = 0; k < j->width; k++) out[k] += buf[k];
    }
    free(buf);
}

void low_rank_add_grad_x(const float *grad_h, const float *a, int64_t rows, int64_t width, int64_t rank, uint32_t seed_lo,
                         uint32_t seed_hi, uint32_t threshold, float scale, float *grad_x, int threads) {
    lowrank_job j = {.a = a, .grad_h = grad_h, .out = grad_x, .rows = rows, .width = width, .rank = rank, .seed_lo = seed_lo,
                     .seed_hi = seed_hi, .threshold = threshold, .scale = scale};
    parallel_for(threads, rows, grad_x_part, &j);
}

/* RMSNorm and the gated activation for training (compressor.lora.fused): forwards shared out over
   the pool that keep what their backward needs, and the backwards, each one pass over the rows.

   transformers' modules compute an RMSNorm in five tensor operations and the MLP's act(gate) * up
   in two; autograd then saves their intermediates and runs as many again backwards, each a pass
   over the whole batch and, past 32 MB (a 1B model's MLP rows), a fresh mapping whose pages fault
   in. Here each is one pass, and only the inputs (and the norm's per-row scale) are kept.

   Every row is computed on its own, in an order fixed here, so a row's numbers do not depend on
   the thread count. The activation's exp is ops.c's polynomial. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "pool.h"

typedef struct {
    const float *x, *dy, *weight, *rstd_in, *gate, *up;
    float *out, *rstd, *dx, *dgate, *dup;
    int64_t width, ldg, ldu, ldo;
    float offset, eps;
    int act;
} rows_job;

static void norm_forward_part(void *ctx, int64_t begin, int64_t end) {
    const rows_job *j = ctx;
    rms_norm(j->x + begin * j->width, end - begin, j->width, j->width, j->weight, j->offset, j->eps, j->out + begin * j->width,
             j->width, j->rstd + begin);
}

void rms_norm_forward(const float *x, int64_t rows, int64_t width, const float *weight, float offset, float eps, float *out,
                      float *rstd, int threads) {
    rows_job j = {.x = x, .weight = weight, .offset = offset, .eps = eps, .out = out, .rstd = rstd, .width = width};
    parallel_for(threads, rows, norm_forward_part, &j);
}

/* y = x * r * w' (w' = weight + offset, r the row's 1 / rms): dx = r * (dy w' - x r * mean(dy w' * x r)). */
static void norm_backward_part(void *ctx, int64_t begin, int64_t end) {
    const rows_job *j = ctx;
    const int64_t width = j->width;
    float *gw = malloc(sizeof(float) * width);
    for (int64_t m = begin; m < end; m++) {
        const float *x = j->x + m * width, *dy = j->dy + m * width, r = j->rstd_in[m];
        float *dx = j->dx + m * width;
        for (int64_t i = 0; i < width; i++) gw[i] = dy[i] * (j->weight[i] + j->offset);
        float c = dot16(gw, x, width) * r / (float)width;
        for (int64_t i = 0; i < width; i++) dx[i] = (gw[i] - x[i] * r * c) * r;
    }
    free(gw);
}

void rms_norm_backward(const float *dy, const float *x, const float *rstd, int64_t rows, int64_t width, const float *weight,
                       float offset, float *dx, int threads) {
    rows_job j = {.dy = dy, .x = x, .rstd_in = rstd, .width = width, .weight = weight, .offset = offset, .dx = dx};
    parallel_for(threads, rows, norm_backward_part, &j);
}

static void act_forward_part(void *ctx, int64_t begin, int64_t end) {
    const rows_job *j = ctx;
    act_mul(j->gate + begin * j->ldg, j->ldg, j->up + begin * j->ldu, j->ldu, end - begin, j->width, j->act,
            j->out + begin * j->ldo, j->ldo);
}

void act_mul_forward(const float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t rows, int64_t width, int act,
                     float *out, int threads) {
    rows_job j = {.gate = gate, .ldg = ldg, .up = up, .ldu = ldu, .width = width, .act = act, .out = out, .ldo = width};
    parallel_for(threads, rows, act_forward_part, &j);
}

/* out = act(g) * u: d_gate = dy * u * act'(g), d_up = dy * act(g).
   SiLU: s = 1 / (1 + exp(-g)), act = g s, act' = s (1 + g (1 - s)).
   GELU (tanh): t = tanh(y), y = c (g + k g^3), act = g (1 + t) / 2, act' = (1 + t) / 2 + g (1 - t^2) c (1 + 3 k g^2) / 2. */
static void act_backward_part(void *ctx, int64_t begin, int64_t end) {
    const rows_job *j = ctx;
    const int64_t width = j->width;
    const float c = 0.7978845608028654f, k = 0.044715f;
    float *e = malloc(sizeof(float) * width);
    for (int64_t m = begin; m < end; m++) {
        const float *g = j->gate + m * j->ldg, *u = j->up + m * j->ldu, *dy = j->dy + m * width;
        float *dg = j->dgate + m * width, *du = j->dup + m * width;
        for (int64_t i = 0; i < width; i++) {
            float y = j->act == ACT_SILU ? -g[i] : 2.0f * (c * (g[i] + k * g[i] * g[i] * g[i]));
            e[i] = y < 88.0f ? y : 88.0f;
        }
        exp_all(e, width);
        if (j->act == ACT_SILU)
            for (int64_t i = 0; i < width; i++) {
                float s = 1.0f / (1.0f + e[i]);
                du[i] = dy[i] * (g[i] * s);
                dg[i] = dy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
            }
        else
            for (int64_t i = 0; i < width; i++) {
                float t = 1.0f - 2.0f / (e[i] + 1.0f);
                du[i] = dy[i] * (0.5f * g[i] * (1.0f + t));
                dg[i] = dy[i] * u[i] * (0.5f * (1.0f + t) + 0.5f * g[i] * (1.0f - t * t) * c * (1.0f + 3.0f * k * g[i] * g[i]));
            }
    }
    free(e);
}

void act_mul_backward(const float *gate, int64_t ldg, const float *up, int64_t ldu, const float *dy, int64_t rows, int64_t width,
                      int act, float *dgate, float *dup, int threads) {
    rows_job j = {.gate = gate, .ldg = ldg, .up = up, .ldu = ldu, .dy = dy, .width = width, .act = act, .dgate = dgate, .dup = dup};
    parallel_for(threads, rows, act_backward_part, &j);
}

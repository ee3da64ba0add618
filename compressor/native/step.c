/* A whole decoder step over the other kernels in one call: every layer's norms, products (with
   each row's adapter term), rotary embedding, attention and residual adds, for a batch of
   sequences each with its own adapter and cache.

   The Python step (serve/decoder.py) makes the same kernel calls in the same order, a dozen a
   layer; from Python each costs tens of microseconds around a product that, for one token, takes
   about as long. Here they cost nothing between them, and the bits are the same: every call is
   the very kernel the Python step runs, on the same rows.

   The adapter term of a row is scaling * (x @ A.T) @ B.T: t_j = x . a_j (ops.c's fixed-order dot),
   then acc_n = sum over j in order of t_j * bt[j][n], then y_n += acc_n * scaling. It depends on
   the row alone. */

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "pool.h"

/* ---- the adapter term ------------------------------------------------------------------------ */

typedef struct {
    const float *a;   /* rank x in (NULL: the adapter does not reach this module) */
    const float *b_t; /* rank x out: B transposed */
    int64_t rank;
    float scaling;
} lora_t;

static void lora_row(const float *x, int64_t in, const lora_t *l, int64_t out, float *y, float *t, float *acc) {
    for (int64_t j = 0; j < l->rank; j++) t[j] = dot16(x, l->a + j * in, in);
    for (int64_t n = 0; n < out; n++) acc[n] = 0;
    for (int64_t j = 0; j < l->rank; j++) {
        const float tj = t[j], *bj = l->b_t + j * out;
        for (int64_t n = 0; n < out; n++) acc[n] += tj * bj[n];
    }
    for (int64_t n = 0; n < out; n++) y[n] += acc[n] * l->scaling;
}

typedef struct {
    const float *x; int64_t ldx; const int64_t *rows; const int32_t *group; const lora_t *const *tables; int64_t slot;
    const lora_t *one; int64_t in, out; float *y; int64_t ldy;
} lora_job;

/* The term of row rows[i] (or i), from `one`, or from tables[group[i]][slot] when group[i] >= 0. */
static void lora_part(void *arg, int64_t begin, int64_t end) {
    const lora_job *j = arg;
    float *t = NULL, *acc = malloc(sizeof(float) * j->out);
    int64_t held = 0; /* room in t */
    for (int64_t i = begin; i < end; i++) {
        const lora_t *l = j->one;
        if (!l) {
            if (j->group[i] < 0) continue;
            l = &j->tables[j->group[i]][j->slot];
        }
        if (!l->a) continue;
        if (l->rank > held) t = realloc(t, sizeof(float) * (held = l->rank));
        int64_t row = j->rows ? j->rows[i] : i;
        lora_row(j->x + row * j->ldx, j->in, l, j->out, j->y + row * j->ldy, t, acc);
    }
    free(t);
    free(acc);
}

/* y[rows[i]] += the adapter term of x[rows[i]], for i < n (rows NULL: rows 0 .. n). */
void lora_add(const float *x, int64_t ldx, const int64_t *rows, int64_t n, const lora_t *l, int64_t in, int64_t out, float *y,
              int64_t ldy, int threads) {
    lora_job job = {x, ldx, rows, NULL, NULL, 0, l, in, out, y, ldy};
    parallel_for(threads, n, lora_part, &job);
}

/* ---- the step -------------------------------------------------------------------------------- */

typedef struct { const float *weight; float eps, offset; } norm_t; /* weight NULL: the layer has none */

typedef struct {
    const weight_t *w;
    const float *bias;
    int64_t offset; /* where its outputs start in a row of the group's buffer (q | k | v, gate | up) */
    int32_t int8;   /* int8 activations (where matmul takes them) */
} linear_t;

/* A layer's modules by slot (the index of its adapter table entries): q, k, v (or one fused qkv in
   slot 0), o, gate, up (or one fused gate_up in slot 4), down. */
enum { S_Q = 0, S_O = 3, S_GATE = 4, S_DOWN = 6, SLOTS = 7 };

typedef struct {
    int32_t n_qkv, n_gate_up;
    linear_t linear[SLOTS];
    norm_t attn_norm, q_norm, k_norm, attn_out_norm, mlp_norm, mlp_out_norm;
    int64_t inter; /* the MLP's width */
    int32_t act, window;
    float scale, softcap;
    int32_t rotary; /* which of the step's rotary tables (Gemma 3: local layers have their own base) */
} layer_t;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, rotary_dim;
    const layer_t *layers;
} model_t;

typedef struct {
    int64_t rows, nseq;
    float *h;                       /* rows x hidden: the hidden states, updated in place */
    const int32_t *group;           /* per row: its adapter's index in tables, or -1 */
    const lora_t *const *tables;    /* per adapter: n_layers x SLOTS terms */
    const float *const *cos, *const *sin; /* per rotary table: rows x rotary_dim */
    const int64_t *seq_start, *past;
    float *const *keys, *const *values; /* n_layers x nseq caches (kv_heads x capacity x head_dim), layer-major */
    const int64_t *capacity;            /* n_layers x nseq */
    int32_t threads;
    double *timings;                /* NULL, or PHASES seconds to add to */
} step_t;

enum { T_NORMS, T_QKV, T_ROTARY, T_ATTENTION, T_O, T_GATE_UP, T_ACT, T_DOWN, PHASES };

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double mark(const step_t *s, int phase, double since) {
    if (!s->timings) return since;
    double t = now_s();
    s->timings[phase] += t - since;
    return t;
}

/* Row-by-row work shared out over the pool for a prompt's many rows (every row is computed on
   its own, so the split changes no bits); a decode step's few rows stay on the caller. */
#define SHARED_ROWS 32
typedef struct { const norm_t *n; const float *x; int64_t width, ldx; float *out; int64_t ldo; int act; } rows_job;

static void norm_part(void *arg, int64_t begin, int64_t end) {
    const rows_job *j = arg;
    rms_norm(j->x + begin * j->ldx, end - begin, j->width, j->ldx, j->n->weight, j->n->offset, j->n->eps, j->out + begin * j->ldo, j->ldo,
             NULL);
}

static void act_part(void *arg, int64_t begin, int64_t end) {
    const rows_job *j = arg;
    const float *gate = j->x + begin * j->ldx;
    act_mul(gate, j->ldx, gate + j->width, j->ldx, end - begin, j->width, j->act, j->out + begin * j->ldo, j->ldo);
}

static void norm(const step_t *s, const norm_t *n, const float *x, int64_t rows, int64_t width, int64_t ldx, float *out, int64_t ldo) {
    rows_job job = {n, x, width, ldx, out, ldo, 0};
    parallel_for(rows >= SHARED_ROWS ? s->threads : 1, rows, norm_part, &job);
}

/* out (rows, ldo) [+]= the product of x with slot's module, plus each row's adapter term. */
static void linear(const step_t *s, const layer_t *L, int64_t layer, int slot, const float *x, int64_t ldx, float *out, int64_t ldo,
                   int accumulate) {
    const linear_t *m = &L->linear[slot];
    out += m->offset;
    matmul(m->w, x, s->rows, ldx, m->bias, out, ldo, accumulate, s->threads, m->int8);
    if (s->tables) {
        lora_job job = {x, ldx, NULL, s->group, s->tables, layer * SLOTS + slot, NULL, m->w->cols, m->w->rows, out, ldo};
        parallel_for(s->threads, s->rows, lora_part, &job);
    }
}

static void add_rows(float *h, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] += x[i];
}

/* Every layer of the model for the step's rows (see step_t); the caches get the new keys. */
void decoder_step(const model_t *md, const step_t *s) {
    const int64_t rows = s->rows, hidden = md->hidden, dim = md->head_dim, heads = md->heads, kv = md->kv_heads;
    const int64_t qkv_width = (heads + 2 * kv) * dim;
    int64_t widest = 0;
    for (int64_t i = 0; i < md->n_layers; i++) widest = md->layers[i].inter > widest ? md->layers[i].inter : widest;
    float *x = malloc(sizeof(float) * rows * hidden), *tmp = malloc(sizeof(float) * rows * hidden);
    float *qkv = malloc(sizeof(float) * rows * qkv_width), *attn = malloc(sizeof(float) * rows * heads * dim);
    float *gate_up = malloc(sizeof(float) * rows * 2 * widest), *act = malloc(sizeof(float) * rows * widest);
    float *q = qkv, *k = qkv + heads * dim, *v = k + kv * dim;
    double t = s->timings ? now_s() : 0;
    for (int64_t i = 0; i < md->n_layers; i++) {
        const layer_t *L = &md->layers[i];
        norm(s, &L->attn_norm, s->h, rows, hidden, hidden, x, hidden);
        t = mark(s, T_NORMS, t);
        for (int p = 0; p < L->n_qkv; p++) linear(s, L, i, S_Q + p, x, hidden, qkv, qkv_width, 0);
        t = mark(s, T_QKV, t);
        if (L->q_norm.weight)
            for (int64_t m = 0; m < rows; m++) {
                norm(s, &L->q_norm, q + m * qkv_width, heads, dim, dim, q + m * qkv_width, dim);
                norm(s, &L->k_norm, k + m * qkv_width, kv, dim, dim, k + m * qkv_width, dim);
            }
        rope(q, rows, heads, dim, qkv_width, s->cos[L->rotary], s->sin[L->rotary], md->rotary_dim);
        rope(k, rows, kv, dim, qkv_width, s->cos[L->rotary], s->sin[L->rotary], md->rotary_dim);
        t = mark(s, T_ROTARY, t);
        attention(q, k, v, qkv_width, qkv_width, s->nseq, s->seq_start, s->past, s->keys + i * s->nseq, s->values + i * s->nseq,
                  s->capacity + i * s->nseq, heads, kv, dim, L->scale, L->softcap, L->window, attn, heads * dim, s->threads);
        t = mark(s, T_ATTENTION, t);
        if (!L->attn_out_norm.weight) {
            linear(s, L, i, S_O, attn, heads * dim, s->h, hidden, 1);
        } else {
            linear(s, L, i, S_O, attn, heads * dim, tmp, hidden, 0);
            norm(s, &L->attn_out_norm, tmp, rows, hidden, hidden, tmp, hidden);
            add_rows(s->h, tmp, rows * hidden);
        }
        t = mark(s, T_O, t);
        norm(s, &L->mlp_norm, s->h, rows, hidden, hidden, x, hidden);
        t = mark(s, T_NORMS, t);
        for (int p = 0; p < L->n_gate_up; p++) linear(s, L, i, S_GATE + p, x, hidden, gate_up, 2 * L->inter, 0);
        t = mark(s, T_GATE_UP, t);
        rows_job act_rows = {NULL, gate_up, L->inter, 2 * L->inter, act, L->inter, L->act};
        parallel_for(rows >= SHARED_ROWS ? s->threads : 1, rows, act_part, &act_rows);
        t = mark(s, T_ACT, t);
        if (!L->mlp_out_norm.weight) {
            linear(s, L, i, S_DOWN, act, L->inter, s->h, hidden, 1);
        } else {
            linear(s, L, i, S_DOWN, act, L->inter, tmp, hidden, 0);
            norm(s, &L->mlp_out_norm, tmp, rows, hidden, hidden, tmp, hidden);
            add_rows(s->h, tmp, rows * hidden);
        }
        t = mark(s, T_DOWN, t);
    }
    free(x); free(tmp); free(qkv); free(attn); free(gate_up); free(act);
}

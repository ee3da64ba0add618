/* The per-layer work of a decoder step around the matrix products: norms, activations, rotary
   embeddings and attention over each sequence's own key/value cache.

   Every output row depends only on its own inputs, in an order fixed here, so a sequence gets the
   same bits alone or batched. Sums run over 16 lanes (lane l takes elements l, l + 16, ...) folded
   by halves, written as plain loops that the compiler turns into vector code (with
   -ffp-contract=off it cannot reorder them). exp is a polynomial, accurate to about 2 ulp, so that
   it vectorises too (the compiler will not vectorise a loop around floorf or a clamp, so the
   loops that call it have an AVX-512 body, with the same operations in the same order as the
   scalar one, and a scalar tail). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "pool.h"

static inline float fold16(const float *acc) {
    float h8[8], h4[4], h2[2];
    for (int l = 0; l < 8; l++) h8[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++) h4[l] = h8[l] + h8[l + 4];
    for (int l = 0; l < 2; l++) h2[l] = h4[l] + h4[l + 2];
    return h2[0] + h2[1];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[k + l] * b[k + l];
    for (int l = 0; k + l < n; l++) acc[l] += a[k + l] * b[k + l];
    return fold16(acc);
}

/* The same fixed-order dot product, for step.c's adapter terms. */
float dot16(const float *a, const float *b, int64_t n) { return dot(a, b, n); }

/* exp(x) for x <= 88: 2**n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial).
   Below -87 it returns exp(-87) (about 1.6e-38) rather than 0. */
#define EXP_STEPS(FLOOR, MUL, ADD, SUB, SET, POW2) \
    x = MAX(x, SET(-87.0f));                        \
    n = FLOOR(ADD(MUL(x, SET(1.44269504088896341f)), SET(0.5f))); \
    r = SUB(x, MUL(n, SET(0.693359375f)));          \
    r = SUB(r, MUL(n, SET(-2.12194440e-4f)));       \
    p = SET(1.9875691500e-4f);                      \
    p = ADD(MUL(p, r), SET(1.3981999507e-3f));      \
    p = ADD(MUL(p, r), SET(8.3334519073e-3f));      \
    p = ADD(MUL(p, r), SET(4.1665795894e-2f));      \
    p = ADD(MUL(p, r), SET(1.6666665459e-1f));      \
    p = ADD(MUL(p, r), SET(5.0000001201e-1f));      \
    p = ADD(ADD(MUL(MUL(p, r), r), r), SET(1.0f));  \
    return MUL(p, POW2(n));

#define S_MUL(a, b) ((a) * (b))
#define S_ADD(a, b) ((a) + (b))
#define S_SUB(a, b) ((a) - (b))
#define S_SET(a) (a)
static inline float s_pow2(float n) {
    int32_t bits = ((int32_t)n + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline float fast_exp(float x) {
    float n, r, p;
#define MAX(a, b) ((a) > (b) ? (a) : (b))
    EXP_STEPS(floorf, S_MUL, S_ADD, S_SUB, S_SET, s_pow2)
#undef MAX
}

#ifdef __AVX512F__
static inline __m512 v_floor(__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline __m512 v_pow2(__m512 n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline __m512 exp16(__m512 x) {
    __m512 n, r, p;
#define MAX(a, b) _mm512_max_ps(a, b)
    EXP_STEPS(v_floor, _mm512_mul_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_set1_ps, v_pow2)
#undef MAX
}
#elif defined(__AVX2__)
static inline __m256 v_floor(__m256 a) { return _mm256_floor_ps(a); }
static inline __m256 v_pow2(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline __m256 exp8(__m256 x) {
    __m256 n, r, p;
#define MAX(a, b) _mm256_max_ps(a, b)
    EXP_STEPS(v_floor, _mm256_mul_ps, _mm256_add_ps, _mm256_sub_ps, _mm256_set1_ps, v_pow2)
#undef MAX
}
#endif

/* exp of n floats in place (the vector bodies do the scalar one's operations in its order). */
void exp_all(float *v, int64_t n) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp16(_mm512_loadu_ps(v + i)));
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
#endif
    for (; i < n; i++) v[i] = fast_exp(v[i]);
}

/* out = x / rms(x) * weight (offset 0) or * (1 + weight) (offset 1, Gemma), row by row; each
   row's 1 / rms(x) into rstd unless it is NULL (training keeps it for the backward). */
void rms_norm(const float *x, int64_t rows, int64_t width, int64_t ldx, const float *weight, float offset, float eps,
              float *out, int64_t ldo, float *rstd) {
    for (int64_t m = 0; m < rows; m++) {
        const float *xm = x + m * ldx;
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= width; k += 16)
            for (int l = 0; l < 16; l++) acc[l] += xm[k + l] * xm[k + l];
        for (int l = 0; k + l < width; l++) acc[l] += xm[k + l] * xm[k + l];
        float inv = 1.0f / sqrtf(fold16(acc) / (float)width + eps);
        if (rstd) rstd[m] = inv;
        float *om = out + m * ldo;
        for (int64_t i = 0; i < width; i++) om[i] = (xm[i] * inv) * (weight[i] + offset);
    }
}

/* out[m, i] = act(gate[m, i]) * up[m, i] (rows ldg, ldu and ldo apart; one gate_up tensor's
   halves, or two tensors). SiLU is g / (1 + exp(-g)); the GELU's tanh(y) is 1 - 2 / (exp(2y) + 1),
   with 2y capped at 88. */
void act_mul(const float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t rows, int64_t width, int act, float *out,
             int64_t ldo) {
    float *e = malloc(sizeof(float) * (width > 0 ? width : 1));
    for (int64_t m = 0; m < rows; m++) {
        const float *g = gate + m * ldg, *u = up + m * ldu;
        float *o = out + m * ldo;
        for (int64_t i = 0; i < width; i++) {
            float y = act == ACT_SILU ? -g[i] : 2.0f * (0.7978845608028654f * (g[i] + 0.044715f * g[i] * g[i] * g[i]));
            e[i] = y < 88.0f ? y : 88.0f;
        }
        exp_all(e, width);
        if (act == ACT_SILU)
            for (int64_t i = 0; i < width; i++) o[i] = g[i] / (1.0f + e[i]) * u[i];
        else
            for (int64_t i = 0; i < width; i++) o[i] = 0.5f * g[i] * (1.0f + (1.0f - 2.0f / (e[i] + 1.0f))) * u[i];
    }
    free(e);
}

/* Rotary embedding in place, transformers' rotate_half convention: for each of ``heads`` vectors
   of ``dim`` in a row, its first ``rot`` elements become x * cos + rotate_half(x) * sin, with the
   row's cos and sin (rot each). */
void rope(float *x, int64_t rows, int64_t heads, int64_t dim, int64_t ldx, const float *cos, const float *sin, int64_t rot) {
    int64_t half = rot / 2;
    for (int64_t m = 0; m < rows; m++) {
        const float *c = cos + m * rot, *s = sin + m * rot;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + m * ldx + h * dim;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] + -b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

#ifdef __AVX512F__
/* dot(q, keys + t * dim, dim) for the 16 positions t0 .. t0 + 15, bit for bit as dot() computes
   each (dim a multiple of 16): each position's 16 lanes are summed over dim in the same order,
   then the 16 positions' lanes are folded together by halves (8 + 8, 4 + 4, 2 + 2, 1 + 1) with
   shuffles across registers instead of one register at a time. Slot s of the fold ends in lane
   FOLD_SLOT[s], so slot s takes the position that lane stands for. */
static const int FOLD_SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

static inline __m512 dot16_positions(const float *q, const float *keys, int64_t t0, int64_t dim) {
    __m512 v[16];
    for (int s = 0; s < 16; s++) {
        const float *k = keys + (t0 + FOLD_SLOT[s]) * dim;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d += 16) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d)));
        v[s] = acc;
    }
    __m512 w[8], u[4], r[2];
    for (int i = 0; i < 8; i++) w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++) u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
    for (int i = 0; i < 2; i++) r[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44), _mm512_shuffle_ps(u[i], u[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88), _mm512_shuffle_ps(r[0], r[1], 0xDD));
}
#endif

typedef struct {
    const float *q; int64_t ldq, nseq; const int64_t *seq_start, *past; const float *const *keys, *const *values;
    const int64_t *capacity; int64_t heads, kv_heads, dim; float scale, softcap; int64_t window; float *out; int64_t ldo, longest;
} attention_job;

/* (new token, key head) pairs begin .. end of the step: the query heads that read one key head
   together, so that each cached key and value is loaded once for all of them. Each head's
   numbers are computed exactly as alone. A position p sits at slot p % capacity (a sliding
   layer's ring; below the capacity, slot p), and the window's positions are read in order across
   the wrap, so the numbers do not depend on where the ring stands. */
static void attention_part(void *arg, int64_t begin, int64_t end) {
    const attention_job *j = arg;
    const int64_t kv_heads = j->kv_heads, dim = j->dim, group = j->heads / kv_heads, longest = j->longest > 0 ? j->longest : 1;
    float *scores = malloc(sizeof(float) * longest * group);
    int64_t b = 0;
    for (int64_t pair = begin; pair < end; pair++) {
        int64_t row = pair / kv_heads, g = pair % kv_heads;
        while (j->seq_start[b + 1] <= row) b++;
        int64_t pos = j->past[b] + (row - j->seq_start[b]), cap = j->capacity[b];
        int64_t first = j->window > 0 && pos - j->window + 1 > 0 ? pos - j->window + 1 : 0, span = pos + 1 - first;
        int64_t start = first % cap, run = span < cap - start ? span : cap - start; /* slots start .. start + run, then 0 .. span - run */
        const float *kh = j->keys[b] + g * cap * dim, *vh = j->values[b] + g * cap * dim;
        const float *q0 = j->q + row * j->ldq + g * group * dim;
        for (int part = 0; part < 2; part++) { /* scores[i]: position first + i */
            int64_t slot = part ? 0 : start, n = part ? span - run : run, at = part ? run : 0, i = 0;
#ifdef __AVX512F__
            if (dim % 16 == 0)
                for (; i + 16 <= n; i += 16)
                    for (int64_t h = 0; h < group; h++)
                        _mm512_storeu_ps(scores + h * longest + at + i,
                                         _mm512_mul_ps(dot16_positions(q0 + h * dim, kh, slot + i, dim), _mm512_set1_ps(j->scale)));
#endif
            for (; i < n; i++)
                for (int64_t h = 0; h < group; h++) scores[h * longest + at + i] = dot(q0 + h * dim, kh + (slot + i) * dim, dim) * j->scale;
        }
        float *o0 = j->out + row * j->ldo + g * group * dim;
        for (int64_t h = 0; h < group; h++) {
            float *sc = scores + h * longest;
            if (j->softcap > 0)
                for (int64_t i = 0; i < span; i++) sc[i] = j->softcap * tanhf(sc[i] / j->softcap);
            float best = -INFINITY;
            for (int64_t i = 0; i < span; i++) best = sc[i] > best ? sc[i] : best;
            for (int64_t i = 0; i < span; i++) sc[i] -= best;
            exp_all(sc, span);
            float norm = 0;
            for (int64_t i = 0; i < span; i++) norm += sc[i];
            for (int64_t i = 0; i < span; i++) sc[i] /= norm;
            for (int64_t d = 0; d < dim; d++) o0[h * dim + d] = 0;
        }
#ifdef __AVX512F__
        if (dim % 64 == 0) { /* the same sums, four registers of o at a time held across the positions */
            for (int64_t h = 0; h < group; h++)
                for (int64_t d = 0; d < dim; d += 64) {
                    __m512 o4[4];
                    for (int i = 0; i < 4; i++) o4[i] = _mm512_loadu_ps(o0 + h * dim + d + 16 * i);
                    for (int64_t i = 0, slot = start; i < span; i++, slot = slot + 1 == cap ? 0 : slot + 1) {
                        __m512 p = _mm512_set1_ps(scores[h * longest + i]);
                        for (int r = 0; r < 4; r++)
                            o4[r] = _mm512_add_ps(o4[r], _mm512_mul_ps(p, _mm512_loadu_ps(vh + slot * dim + d + 16 * r)));
                    }
                    for (int i = 0; i < 4; i++) _mm512_storeu_ps(o0 + h * dim + d + 16 * i, o4[i]);
                }
            continue;
        }
#endif
        for (int64_t i = 0, slot = start; i < span; i++, slot = slot + 1 == cap ? 0 : slot + 1) {
            const float *vt = vh + slot * dim;
            for (int64_t h = 0; h < group; h++) {
                float p = scores[h * longest + i], *o = o0 + h * dim;
                for (int64_t d = 0; d < dim; d++) o[d] += p * vt[d];
            }
        }
    }
    free(scores);
}

/* One layer's attention for a batch of sequences, each with its own cache.

   Sequence b owns rows seq_start[b] .. seq_start[b + 1] of q (heads * dim each), k and v
   (kv_heads * dim each): its new tokens, at positions past[b], past[b] + 1, ... Their keys and
   values are first written into its cache (keys[b], values[b]: kv_heads x capacity[b] x dim),
   position p at slot p % capacity[b], so a ring must have room for the window of the first new
   token beside the new ones. Then each new token attends causally over the cache, within
   ``window`` positions when window >
   0, with scores soft-capped at ``softcap`` when softcap > 0; query head h reads key head
   h / (heads / kv_heads). out has the rows of q. */
void attention(const float *q, const float *k, const float *v, int64_t ldq, int64_t ldk, int64_t nseq, const int64_t *seq_start,
               const int64_t *past, float *const *keys, float *const *values, const int64_t *capacity, int64_t heads,
               int64_t kv_heads, int64_t dim, float scale, float softcap, int64_t window, float *out, int64_t ldo, int threads) {
    int64_t longest = 0;
    for (int64_t b = 0; b < nseq; b++) {
        int64_t n = seq_start[b + 1] - seq_start[b];
        for (int64_t t = 0; t < n; t++)
            for (int64_t g = 0; g < kv_heads; g++) {
                int64_t at = g * capacity[b] * dim + (past[b] + t) % capacity[b] * dim;
                memcpy(keys[b] + at, k + (seq_start[b] + t) * ldk + g * dim, sizeof(float) * dim);
                memcpy(values[b] + at, v + (seq_start[b] + t) * ldk + g * dim, sizeof(float) * dim);
            }
        int64_t span = window > 0 && window < past[b] + n ? window : past[b] + n; /* the most positions a new token reads */
        if (span > longest) longest = span;
    }
    attention_job job = {q, ldq, nseq, seq_start, past, (const float *const *)keys, (const float *const *)values, capacity, heads,
                         kv_heads, dim, scale, softcap, window, out, ldo, longest};
    parallel_for(threads, seq_start[nseq] * kv_heads, attention_part, &job);
}

/* Dropout whose mask is a pure function of (seed, index): out[i] = x[i] * scale where the hash of i
   is at least threshold (out of 2**32), else 0. The backward calls it again on the gradient with
   the same seed instead of storing a mask. The hash is murmur3's 32-bit finalizer applied twice
   (index, then seed), plain 32-bit integer arithmetic that the compiler vectorises. */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* The mask in blocks of 2**20 elements, so that the inner loops run on 32-bit lanes only (they
   vectorise); the block number enters the seed. */
#define DROPOUT_BLOCK ((int64_t)1 << 20)
static inline uint32_t block_seed(uint32_t seed_lo, int64_t start) { return seed_lo ^ (uint32_t)(start >> 20) * 0x632be5abu; }
static inline uint32_t dropout_hash(uint32_t i, uint32_t lo, uint32_t hi) { return fmix32(fmix32(i * 0x9e3779b9u ^ lo) ^ hi); }

/* out[i] = x[i] * (mask of element first + i), for i < n: any stretch of a tensor, so that a row
   kernel (lowrank.c) sees the very mask that dropout() applies to the whole tensor. */
void dropped(const float *x, int64_t n, int64_t first, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale,
             float *out) {
    for (int64_t i = 0; i < n;) {
        int64_t at = first + i, block = at & ~(DROPOUT_BLOCK - 1);
        uint32_t offset = (uint32_t)(at - block), lo = block_seed(seed_lo, block);
        uint32_t len = (uint32_t)(n - i < DROPOUT_BLOCK - offset ? n - i : DROPOUT_BLOCK - offset);
        const float *xs = x + i;
        float *os = out + i;
        for (uint32_t j = 0; j < len; j++)
            os[j] = xs[j] * (dropout_hash(offset + j, lo, seed_hi) >= threshold ? scale : 0.0f);
        i += len;
    }
}

void dropout(const float *x, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale, float *out) {
    dropped(x, n, 0, seed_lo, seed_hi, threshold, scale, out);
}

static inline uint32_t block_len(int64_t n, int64_t start) { return (uint32_t)(n - start < DROPOUT_BLOCK ? n - start : DROPOUT_BLOCK); }

/* The same mask over bfloat16 bits: each kept element is widened, scaled in float32 and rounded
   back to nearest-even, as torch rounds; a NaN stays a (quiet) NaN. */
void dropout_bf16(const uint16_t *x, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale, uint16_t *out) {
    for (int64_t start = 0; start < n; start += DROPOUT_BLOCK) {
        uint32_t len = block_len(n, start), lo = block_seed(seed_lo, start);
        const uint16_t *xs = x + start;
        uint16_t *os = out + start;
        for (uint32_t i = 0; i < len; i++) {
            float v = from_bf16(xs[i]) * (dropout_hash(i, lo, seed_hi) >= threshold ? scale : 0.0f);
            os[i] = v != v ? (uint16_t)(xs[i] | 0x40u) : to_bf16(v); /* NaN: the input's, made quiet */
        }
    }
}

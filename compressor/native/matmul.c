/* Row-wise matrix products over packed weights: out[m, n] = dot(x[m], W[n]) (+ bias[n]) (+ out[m, n]).

   Every kernel reads the weight in its file layout (no repacked copy), decodes each weight row
   once per tile of up to TILE activation rows, and gives each (m, n) one fixed summation order:
   two accumulators of 16 float32 lanes, each lane summing its elements in order by fused
   multiply-add (q4: lane l of the first takes element 2l of every 32, of the second element
   2l + 1; dense: the first takes elements 32j + l, the second 32j + 16 + l), then the two added
   and the lanes folded by halves (8 + 8, 4 + 4, 2 + 2, 1 + 1). Two chains, not one, so that a
   single row is not held up by the latency of one long chain of dependent additions. The order
   depends neither on how many rows share the call nor on which thread takes the row, so a
   sequence decodes to the same bits alone or in any batch. The portable build computes the same
   lanes in the same order with scalar code, and gives the same bits.

   A weight value is exactly what the format's dequantize writes (the same float32 operations in
   the same order), so "exact" activations see the dequantized weight itself.

   Formats (weight row n, element k):
     q4: 4-bit codes, two per byte, element 2i in the high nibble (bitsandbytes' layout).
         value = table[code] * scale[block]           (nf4, fp4: table is the codebook)
         value = (code - zero[block]) * scale[block]    (int4: zero is the integer zero point)
     i8: int8 codes, value = (code - zero[row]) * scale[row]   (int8 affine, per row or tensor)
                     value = (code * scale[row]) * c       (int8-sym: c = 1/127)
     f32 / bf16: the float weight itself (bfloat16 widened exactly). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "kernels.h"
#include "pool.h"

#define TILE 8 /* activation rows that share one decode of a weight row */

/* ---- the 16-lane accumulator and its fixed fold ---------------------------------------------- */

#ifdef __AVX512F__
typedef __m512 lanes;
static inline lanes lanes_zero(void) { return _mm512_setzero_ps(); }
static inline lanes lanes_fma(lanes w, const float *x, lanes acc) { return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc); }
static inline lanes lanes_add(lanes a, lanes b) { return _mm512_add_ps(a, b); }
static inline float lanes_fold(lanes a) {
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    __m128 h1 = _mm_add_ss(h2, _mm_movehdup_ps(h2));
    return _mm_cvtss_f32(h1);
}
#else
typedef struct { float v[16]; } lanes;
static inline lanes lanes_zero(void) { lanes a; memset(&a, 0, sizeof a); return a; }
static inline lanes lanes_fma(lanes w, const float *x, lanes acc) {
    for (int l = 0; l < 16; l++) acc.v[l] = __builtin_fmaf(w.v[l], x[l], acc.v[l]);
    return acc;
}
static inline lanes lanes_add(lanes a, lanes b) {
    for (int l = 0; l < 16; l++) a.v[l] += b.v[l];
    return a;
}
static inline float lanes_fold(lanes a) {
    float h8[8], h4[4], h2[2];
    for (int l = 0; l < 8; l++) h8[l] = a.v[l] + a.v[l + 8];
    for (int l = 0; l < 4; l++) h4[l] = h8[l] + h8[l + 4];
    for (int l = 0; l < 2; l++) h2[l] = h4[l] + h4[l + 2];
    return h2[0] + h2[1];
}
#endif

static inline void store(float *out, float dot, const float *bias, int64_t n, int accumulate) {
    if (bias) dot += bias[n];
    *out = accumulate ? *out + dot : dot;
}

/* ---- q4 ------------------------------------------------------------------------------------- */

/* The 16 values a block's codes stand for: table[c] * scale, or (c - zero) * scale, computed
   once per block; each is the very float32 product dequantize computes per element. */
#ifdef __AVX512F__
typedef __m512 table16;
static inline table16 q4_values(const float *table, const uint8_t *zero, float scale) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 t = zero ? _mm512_sub_ps(iota, _mm512_set1_ps((float)*zero)) : _mm512_loadu_ps(table);
    return _mm512_mul_ps(t, _mm512_set1_ps(scale));
}
/* 16 bytes = 32 codes: the high nibbles are the even elements, the low ones the odd. */
static inline void q4_decode(const uint8_t *codes, table16 values, lanes *even, lanes *odd) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
    *even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values);
    *odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), values);
}
#else
typedef struct { float v[16]; } table16;
static inline table16 q4_values(const float *table, const uint8_t *zero, float scale) {
    table16 t;
    for (int c = 0; c < 16; c++) t.v[c] = (zero ? (float)c - (float)*zero : table[c]) * scale;
    return t;
}
static inline void q4_decode(const uint8_t *codes, table16 values, lanes *even, lanes *odd) {
    for (int i = 0; i < 16; i++) {
        even->v[i] = values.v[codes[i] >> 4];
        odd->v[i] = values.v[codes[i] & 0x0F];
    }
}
#endif

/* Weight rows n .. n + nr against activation rows 0 .. mt of xs (laid out as q4_split writes
   them). nr > 1 only interleaves independent rows, for more chains in flight when mt is small: each
   (m, n) is summed exactly as alone. */
static inline __attribute__((always_inline)) void q4_row(
    const int mt, const int nr, const float *xs, int64_t ldx, const uint8_t *codes, int64_t code_stride, const float *scales,
    const uint8_t *zeros, int64_t block_stride, const float *table, int64_t K, int shift, const float *bias, int64_t n, float *out,
    int64_t ldo, int accumulate) {
    lanes even_acc[4][TILE], odd_acc[4][TILE];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++) even_acc[r][m] = odd_acc[r][m] = lanes_zero();
    const int64_t per_block = (int64_t)1 << shift;
    for (int64_t start = 0; start < K; start += per_block) {
        int64_t block = start >> shift, end = start + per_block < K ? start + per_block : K;
        table16 values[4];
        for (int r = 0; r < nr; r++)
            values[r] = q4_values(table, zeros ? zeros + r * block_stride + block : 0, scales[r * block_stride + block]);
        for (int64_t k = start; k < end; k += 32) {
#ifdef __AVX512F__
            if (mt == 1 && (k & 127) == 0) /* the next rows' codes, a line at a time (see int8_activations.c) */
                for (int r = 0; r < nr; r++) _mm_prefetch((const char *)codes + (nr + r) * code_stride + k / 2, _MM_HINT_T1);
#endif
            for (int r = 0; r < nr; r++) {
                lanes even, odd;
                q4_decode(codes + r * code_stride + k / 2, values[r], &even, &odd);
#pragma GCC unroll 8
                for (int m = 0; m < mt; m++) {
                    even_acc[r][m] = lanes_fma(even, xs + m * ldx + k, even_acc[r][m]);
                    odd_acc[r][m] = lanes_fma(odd, xs + m * ldx + k + 16, odd_acc[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++)
            store(out + m * ldo + n + r, lanes_fold(lanes_add(even_acc[r][m], odd_acc[r][m])), bias, n + r, accumulate);
}

/* The activations once per call in the order the codes come in: each run of 32 elements as its
   16 even elements, then its 16 odd ones, so a decoded half multiplies a contiguous half. */
static void q4_split(const float *x, int64_t M, int64_t ldx, int64_t K, float *xs) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 32)
            for (int i = 0; i < 16; i++) {
                xs[m * K + k + i] = x[m * ldx + k + 2 * i];
                xs[m * K + k + 16 + i] = x[m * ldx + k + 2 * i + 1];
            }
}

/* out (M, ldo) [+]= x (M, ldx) @ W.T for a q4 weight of N rows of K elements (K a multiple of 32,
   blocks of 2**shift >= 32 elements). Row n's codes start at codes + n * code_stride bytes and its
   block scales at scales + n * block_stride (zeros likewise; NULL for a codebook). */
typedef struct {
    const float *xs; int64_t M; const uint8_t *codes; int64_t code_stride; const float *scales; const uint8_t *zeros;
    int64_t block_stride; const float *table; int64_t K; int shift; const float *bias; float *out; int64_t ldo; int accumulate;
} q4_job;

static void q4_rows(void *arg, int64_t begin, int64_t end) {
    const q4_job *j = arg;
    const int64_t M = j->M, K = j->K, ldo = j->ldo, cs = j->code_stride, bs = j->block_stride;
#define Q4_ROW(MT, NR, m) \
    q4_row(MT, NR, j->xs + (m) * K, K, c, cs, s, z, bs, j->table, K, j->shift, j->bias, n, j->out + (m) * ldo, ldo, j->accumulate)
    for (int64_t n = begin; n < end; n++) {
        const uint8_t *c = j->codes + n * cs;
        const float *s = j->scales + n * bs;
        const uint8_t *z = j->zeros ? j->zeros + n * bs : 0;
        if (M == 1) { /* one activation row: four weight rows at a time */
            if (n + 3 < end) { Q4_ROW(1, 4, 0); n += 3; } else if (n + 1 < end) { Q4_ROW(1, 2, 0); n++; } else Q4_ROW(1, 1, 0);
            continue;
        }
        int64_t m = 0;
        for (; m + TILE <= M; m += TILE) Q4_ROW(TILE, 1, m);
        if (M - m >= 4) { Q4_ROW(4, 1, m); m += 4; }
        if (M - m >= 2) { Q4_ROW(2, 1, m); m += 2; }
        if (M - m >= 1) Q4_ROW(1, 1, m);
    }
#undef Q4_ROW
}

/* out (M, ldo) [+]= x (M, ldx) @ W.T for a q4 weight of N rows of K elements (K a multiple of 32,
   blocks of 2**shift >= 32 elements). Row n's codes start at codes + n * code_stride bytes and its
   block scales at scales + n * block_stride (zeros likewise; NULL for a codebook). */
static void q4_matmul(const float *x, int64_t M, int64_t ldx, const uint8_t *codes, int64_t code_stride,
               const float *scales, const uint8_t *zeros, int64_t block_stride, const float *table,
               int64_t N, int64_t K, int shift, const float *bias, float *out, int64_t ldo, int accumulate, int threads) {
    float *xs = malloc(sizeof(float) * M * K);
    if (!xs) return;
    q4_split(x, M, ldx, K, xs);
    q4_job job = {xs, M, codes, code_stride, scales, zeros, block_stride, table, K, shift, bias, out, ldo, accumulate};
    parallel_for(threads, N, q4_rows, &job);
    free(xs);
}

/* ---- i8 and float weights: 16 values per decode ---------------------------------------------- */

static inline lanes decode16(int kind, const void *row, int64_t k, int32_t zero, float scale, float c) {
#ifdef __AVX512F__
    switch (kind) {
    case W_I8_AFFINE: {
        __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)row + k)));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(zero))), _mm512_set1_ps(scale));
    }
    case W_I8_SYM: {
        __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)row + k)));
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(scale)), _mm512_set1_ps(c));
    }
    case W_F32:
        return _mm512_loadu_ps((const float *)row + k);
    default: {
        __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    }
    }
#else
    lanes w;
    for (int l = 0; l < 16; l++) {
        switch (kind) {
        case W_I8_AFFINE: w.v[l] = (float)((int32_t)((const int8_t *)row)[k + l] - zero) * scale; break;
        case W_I8_SYM: w.v[l] = ((float)((const int8_t *)row)[k + l] * scale) * c; break;
        case W_F32: w.v[l] = ((const float *)row)[k + l]; break;
        default: {
            uint32_t bits = (uint32_t)((const uint16_t *)row)[k + l] << 16;
            memcpy(&w.v[l], &bits, 4);
        }
        }
    }
    return w;
#endif
}

static inline __attribute__((always_inline)) void dense_row(
    const int mt, const int kind, const float *x, int64_t ldx, const void *row, int32_t zero, float scale, float c,
    int64_t K, const float *bias, int64_t n, float *out, int64_t ldo, int accumulate) {
    lanes acc0[TILE], acc1[TILE];
    for (int m = 0; m < mt; m++) acc0[m] = acc1[m] = lanes_zero();
    const int64_t itemsize = kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
#ifdef __AVX512F__
        if (mt == 1) /* two rows ahead, a line at a time (see int8_activations.c) */
            for (int64_t at = k * itemsize; at < (k + 32) * itemsize; at += 64)
                _mm_prefetch((const char *)row + 2 * K * itemsize + at, _MM_HINT_T1);
#endif
        lanes w0 = decode16(kind, row, k, zero, scale, c), w1 = decode16(kind, row, k + 16, zero, scale, c);
#pragma GCC unroll 8
        for (int m = 0; m < mt; m++) {
            acc0[m] = lanes_fma(w0, x + m * ldx + k, acc0[m]);
            acc1[m] = lanes_fma(w1, x + m * ldx + k + 16, acc1[m]);
        }
    }
    if (k < K) { /* a last 16 */
        lanes w0 = decode16(kind, row, k, zero, scale, c);
        for (int m = 0; m < mt; m++) acc0[m] = lanes_fma(w0, x + m * ldx + k, acc0[m]);
    }
    for (int m = 0; m < mt; m++) store(out + m * ldo + n, lanes_fold(lanes_add(acc0[m], acc1[m])), bias, n, accumulate);
}

typedef struct {
    const float *x; int64_t M, ldx; const void *weight; const float *scales; const int32_t *zeros; int64_t group_stride; float c;
    int64_t K; const float *bias; float *out; int64_t ldo; int accumulate;
} dense_job;

/* One kind per instance, so that each gets its own compiled loops with the decode inlined. */
static inline __attribute__((always_inline)) void dense_rows(const int kind, const dense_job *j, int64_t begin, int64_t end) {
    const int64_t itemsize = kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1;
    const int64_t M = j->M, K = j->K, ldx = j->ldx, ldo = j->ldo;
    for (int64_t n = begin; n < end; n++) {
        const void *row = (const uint8_t *)j->weight + n * K * itemsize;
        float scale = j->scales ? j->scales[n * j->group_stride] : 1.0f;
        int32_t zero = j->zeros ? j->zeros[n * j->group_stride] : 0;
        int64_t m = 0;
        for (; m + TILE <= M; m += TILE) dense_row(TILE, kind, j->x + m * ldx, ldx, row, zero, scale, j->c, K, j->bias, n, j->out + m * ldo, ldo, j->accumulate);
        if (M - m >= 4) { dense_row(4, kind, j->x + m * ldx, ldx, row, zero, scale, j->c, K, j->bias, n, j->out + m * ldo, ldo, j->accumulate); m += 4; }
        if (M - m >= 2) { dense_row(2, kind, j->x + m * ldx, ldx, row, zero, scale, j->c, K, j->bias, n, j->out + m * ldo, ldo, j->accumulate); m += 2; }
        if (M - m >= 1) dense_row(1, kind, j->x + m * ldx, ldx, row, zero, scale, j->c, K, j->bias, n, j->out + m * ldo, ldo, j->accumulate);
    }
}
static void dense_i8_affine(void *j, int64_t b, int64_t e) { dense_rows(W_I8_AFFINE, j, b, e); }
static void dense_i8_sym(void *j, int64_t b, int64_t e) { dense_rows(W_I8_SYM, j, b, e); }
static void dense_f32(void *j, int64_t b, int64_t e) { dense_rows(W_F32, j, b, e); }
static void dense_bf16(void *j, int64_t b, int64_t e) { dense_rows(W_BF16, j, b, e); }

/* out (M, ldo) [+]= x (M, ldx) @ W.T for an int8 or float weight of N rows of K elements (K a
   multiple of 16). Row n starts at weight + n * K elements; its scale and zero point are
   scales[n * group_stride] and zeros[n * group_stride] (group_stride 0: one for the tensor). */
static void dense_matmul(int kind, const float *x, int64_t M, int64_t ldx, const void *weight, const float *scales,
                  const int32_t *zeros, int64_t group_stride, float c, int64_t N, int64_t K,
                  const float *bias, float *out, int64_t ldo, int accumulate, int threads) {
    dense_job job = {x, M, ldx, weight, scales, zeros, group_stride, c, K, bias, out, ldo, accumulate};
    task_fn fn = kind == W_I8_AFFINE ? dense_i8_affine : kind == W_I8_SYM ? dense_i8_sym : kind == W_F32 ? dense_f32 : dense_bf16;
    parallel_for(threads, N, fn, &job);
}

/* ---- the weight itself, for products that go to a GEMM library (prompts) ----------------------- */

typedef struct { const weight_t *w; void *out; int bf16; } unpack_job;

static void unpack_rows(void *arg, int64_t begin, int64_t end) {
    const unpack_job *j = arg;
    const weight_t *w = j->w;
    const int64_t K = w->cols;
    float *scratch = j->bf16 ? malloc(sizeof(float) * K) : NULL;
    for (int64_t n = begin; n < end; n++) {
        float *row = j->bf16 ? scratch : (float *)j->out + n * K;
        if (w->kind == W_Q4) {
            const uint8_t *codes = (const uint8_t *)w->data + n * w->data_stride;
            const float *scales = w->scales + n * w->scale_stride;
            const uint8_t *zeros = w->zeros ? (const uint8_t *)w->zeros + n * w->scale_stride : 0;
            for (int64_t k = 0; k < K; k += 32) {
                int64_t block = k >> w->shift;
                lanes even, odd;
                q4_decode(codes + k / 2, q4_values(w->table, zeros ? zeros + block : 0, scales[block]), &even, &odd);
                float e[16], o[16];
                memcpy(e, &even, sizeof e);
                memcpy(o, &odd, sizeof o);
                for (int i = 0; i < 16; i++) { row[k + 2 * i] = e[i]; row[k + 2 * i + 1] = o[i]; }
            }
        } else {
            const void *data = (const uint8_t *)w->data + n * K * (w->kind == W_F32 ? 4 : w->kind == W_BF16 ? 2 : 1);
            float scale = w->scales ? w->scales[n * w->scale_stride] : 1.0f;
            int32_t zero = w->zeros ? ((const int32_t *)w->zeros)[n * w->scale_stride] : 0;
            for (int64_t k = 0; k < K; k += 16) {
                lanes v = decode16(w->kind, data, k, zero, scale, w->constant);
                memcpy(row + k, &v, sizeof v);
            }
        }
        if (j->bf16)
            for (int64_t k = 0; k < K; k++) ((uint16_t *)j->out)[n * K + k] = to_bf16(row[k]);
    }
    free(scratch);
}

/* out (N, K) = the weight's values exactly as the products above use them: float32, or (bf16 set)
   rounded to bfloat16. */
void unpack(const weight_t *w, void *out, int bf16, int threads) {
    unpack_job job = {w, out, bf16};
    parallel_for(threads, w->rows, unpack_rows, &job);
}

/* out (M, ldo) [+]= x (M, ldx) @ W.T (+ bias), with the activations quantized to int8 when int8 is
   set and int8_activations_supported says the kernels take the weight (int8_activations.c; 2:
   without AMX tiles, for tests). */
void matmul(const weight_t *w, const float *x, int64_t M, int64_t ldx, const float *bias, float *out, int64_t ldo,
            int accumulate, int threads, int int8) {
    if (int8 && int8_activations_supported(w->kind, w->cols)) {
        matmul_i8(w, x, M, ldx, bias, out, ldo, accumulate, threads, int8 == 1);
        return;
    }
    if (w->kind == W_Q4)
        q4_matmul(x, M, ldx, w->data, w->data_stride, w->scales, w->zeros, w->scale_stride, w->table, w->rows, w->cols,
                  w->shift, bias, out, ldo, accumulate, threads);
    else
        dense_matmul(w->kind, x, M, ldx, w->data, w->scales, w->zeros, w->scale_stride, w->constant, w->rows, w->cols,
                     bias, out, ldo, accumulate, threads);
}

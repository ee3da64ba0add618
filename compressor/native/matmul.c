/* Row-wise matrix products over packed weights: out[m, n] = dot(x[m], W[n]) (+ bias[n]) (+ out[m, n]).

   Every kernel reads the weight in its file layout (no repacked copy), decodes each weight row
   once per tile of up to TILE activation rows, and gives each (m, n) one fixed summation order:
   16 float32 lanes, lane l summing elements l, l + 16, l + 32, ... in order by fused multiply-add,
   then the lanes folded by halves (8 + 8, 4 + 4, 2 + 2, 1 + 1). That order depends neither on how
   many rows share the call nor on which thread takes the row, so a sequence decodes to the same
   bits alone or in any batch. The portable build computes the same lanes in the same order with
   scalar code, and gives the same bits.

   A weight value is exactly what the format's dequantize writes (the same float32 operations in
   the same order), so "exact" activations see the dequantized weight itself.

   Formats (weight row n, element k):
     q4: 4-bit codes, two per byte, element 2i in the high nibble (bitsandbytes' layout).
         value = table[code] * scale[block]           (nf4, fp4: table is the codebook)
         value = (code - zero[block]) * scale[block]    (int4: zero is the integer zero point)
     i8: int8 codes, value = (code - zero[row]) * scale[row]   (int8 affine, per row or tensor)
                     value = (code * scale[row]) * c       (int8-sym: c = 1/127)
     f32 / bf16: the float weight itself (bfloat16 widened exactly). */

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define TILE 8 /* activation rows that share one decode of a weight row */

/* ---- the 16-lane accumulator and its fixed fold ---------------------------------------------- */

#ifdef __AVX512F__
typedef __m512 lanes;
static inline lanes lanes_zero(void) { return _mm512_setzero_ps(); }
static inline lanes lanes_fma(lanes w, const float *x, lanes acc) { return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc); }
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

/* ---- decoders: 32 (q4) or 16 (i8, f32) consecutive weight values into lanes ------------------ */

#ifdef __AVX512F__
/* 16 bytes = 32 codes; even elements sit in high nibbles. Decoded as two 16-lane halves in
   element order: w0 = elements 0..15, w1 = elements 16..31. */
static inline void q4_decode(const uint8_t *codes, __m512 table, __m512 scale, lanes *w0, lanes *w1) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
    __m512i even = _mm512_srli_epi32(bytes, 4);
    __m512i odd = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
    /* Interleave indices: element 2i is even[i], element 2i + 1 is odd[i]. */
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    __m512i i0 = _mm512_permutex2var_epi32(even, lo, odd);
    __m512i i1 = _mm512_permutex2var_epi32(even, hi, odd);
    *w0 = _mm512_mul_ps(_mm512_permutexvar_ps(i0, table), scale);
    *w1 = _mm512_mul_ps(_mm512_permutexvar_ps(i1, table), scale);
}
static inline __m512 q4_table(const float *table, const uint8_t *zero) {
    if (!zero) return _mm512_loadu_ps(table);
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_sub_ps(iota, _mm512_set1_ps((float)*zero)); /* exact: small integers */
}
#define Q4_TABLE_T __m512
#define Q4_SCALE(s) _mm512_set1_ps(s)
#else
static inline void q4_decode(const uint8_t *codes, const float *table, float scale, lanes *w0, lanes *w1) {
    for (int i = 0; i < 16; i++) {
        int e0 = 2 * i, e1 = 2 * i + 1;
        float a = table[codes[i] >> 4] * scale, b = table[codes[i] & 0x0F] * scale;
        if (e0 < 16) w0->v[e0] = a; else w1->v[e0 - 16] = a;
        if (e1 < 16) w0->v[e1] = b; else w1->v[e1 - 16] = b;
    }
}
typedef struct { float v[16]; } table16;
static inline table16 q4_table_make(const float *table, const uint8_t *zero) {
    table16 t;
    for (int c = 0; c < 16; c++) t.v[c] = zero ? (float)c - (float)*zero : table[c];
    return t;
}
#endif

/* ---- q4 ------------------------------------------------------------------------------------- */

/* One weight row against rows m0 .. m0 + mt of x. */
static inline __attribute__((always_inline)) void q4_row(
    const int mt, const float *x, int64_t ldx, const uint8_t *codes, const float *scales, const uint8_t *zeros,
    const float *table, int64_t K, int shift, const float *bias, int64_t n, float *out, int64_t ldo, int accumulate) {
    lanes acc[TILE];
    for (int m = 0; m < mt; m++) acc[m] = lanes_zero();
    int64_t last_block = -1;
#ifdef __AVX512F__
    __m512 tab = _mm512_setzero_ps(), scale = _mm512_setzero_ps();
#else
    table16 tab; float scale = 0;
#endif
    for (int64_t k = 0; k < K; k += 32) {
        int64_t block = k >> shift;
        if (block != last_block) {
            last_block = block;
#ifdef __AVX512F__
            tab = q4_table(table, zeros ? zeros + block : 0);
            scale = _mm512_set1_ps(scales[block]);
#else
            tab = q4_table_make(table, zeros ? zeros + block : 0);
            scale = scales[block];
#endif
        }
        lanes w0, w1;
#ifdef __AVX512F__
        q4_decode(codes + k / 2, tab, scale, &w0, &w1);
#else
        q4_decode(codes + k / 2, tab.v, scale, &w0, &w1);
#endif
#pragma GCC unroll 8
        for (int m = 0; m < mt; m++) {
            acc[m] = lanes_fma(w0, x + m * ldx + k, acc[m]);
            acc[m] = lanes_fma(w1, x + m * ldx + k + 16, acc[m]);
        }
    }
    for (int m = 0; m < mt; m++) store(out + m * ldo + n, lanes_fold(acc[m]), bias, n, accumulate);
}

/* out (M, ldo) [+]= x (M, ldx) @ W.T for a q4 weight of N rows of K elements (K a multiple of 32,
   blocks of 2**shift >= 32 elements). Row n's codes start at codes + n * code_stride bytes and its
   block scales at scales + n * block_stride (zeros likewise; NULL for a codebook). */
void q4_matmul(const float *x, int64_t M, int64_t ldx, const uint8_t *codes, int64_t code_stride,
               const float *scales, const uint8_t *zeros, int64_t block_stride, const float *table,
               int64_t N, int64_t K, int shift, const float *bias, float *out, int64_t ldo, int accumulate) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *c = codes + n * code_stride;
        const float *s = scales + n * block_stride;
        const uint8_t *z = zeros ? zeros + n * block_stride : 0;
        int64_t m = 0;
        for (; m + TILE <= M; m += TILE) q4_row(TILE, x + m * ldx, ldx, c, s, z, table, K, shift, bias, n, out + m * ldo, ldo, accumulate);
        if (M - m >= 4) { q4_row(4, x + m * ldx, ldx, c, s, z, table, K, shift, bias, n, out + m * ldo, ldo, accumulate); m += 4; }
        if (M - m >= 2) { q4_row(2, x + m * ldx, ldx, c, s, z, table, K, shift, bias, n, out + m * ldo, ldo, accumulate); m += 2; }
        if (M - m >= 1) q4_row(1, x + m * ldx, ldx, c, s, z, table, K, shift, bias, n, out + m * ldo, ldo, accumulate);
    }
}

/* ---- i8 and float weights: 16 values per decode ---------------------------------------------- */

enum { W_I8_AFFINE = 0, W_I8_SYM = 1, W_F32 = 2, W_BF16 = 3 };

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
    const int mt, int kind, const float *x, int64_t ldx, const void *row, int32_t zero, float scale, float c,
    int64_t K, const float *bias, int64_t n, float *out, int64_t ldo, int accumulate) {
    lanes acc[TILE];
    for (int m = 0; m < mt; m++) acc[m] = lanes_zero();
    for (int64_t k = 0; k < K; k += 16) {
        lanes w = decode16(kind, row, k, zero, scale, c);
#pragma GCC unroll 8
        for (int m = 0; m < mt; m++) acc[m] = lanes_fma(w, x + m * ldx + k, acc[m]);
    }
    for (int m = 0; m < mt; m++) store(out + m * ldo + n, lanes_fold(acc[m]), bias, n, accumulate);
}

/* out (M, ldo) [+]= x (M, ldx) @ W.T for an int8 or float weight of N rows of K elements (K a
   multiple of 16). Row n starts at weight + n * K elements; its scale and zero point are
   scales[n * group_stride] and zeros[n * group_stride] (group_stride 0: one for the tensor). */
void dense_matmul(int kind, const float *x, int64_t M, int64_t ldx, const void *weight, const float *scales,
                  const int32_t *zeros, int64_t group_stride, float c, int64_t N, int64_t K,
                  const float *bias, float *out, int64_t ldo, int accumulate) {
    const int64_t itemsize = kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const void *row = (const uint8_t *)weight + n * K * itemsize;
        float scale = scales ? scales[n * group_stride] : 1.0f;
        int32_t zero = zeros ? zeros[n * group_stride] : 0;
        int64_t m = 0;
        for (; m + TILE <= M; m += TILE) dense_row(TILE, kind, x + m * ldx, ldx, row, zero, scale, c, K, bias, n, out + m * ldo, ldo, accumulate);
        if (M - m >= 4) { dense_row(4, kind, x + m * ldx, ldx, row, zero, scale, c, K, bias, n, out + m * ldo, ldo, accumulate); m += 4; }
        if (M - m >= 2) { dense_row(2, kind, x + m * ldx, ldx, row, zero, scale, c, K, bias, n, out + m * ldo, ldo, accumulate); m += 2; }
        if (M - m >= 1) dense_row(1, kind, x + m * ldx, ldx, row, zero, scale, c, K, bias, n, out + m * ldo, ldo, accumulate);
    }
}

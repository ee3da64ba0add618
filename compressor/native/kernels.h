/* What the kernel files share: the weight description, bfloat16 conversion, and the calls step.c makes into the others. */
#pragma once
#include <stdint.h>
#include <string.h>

/* float32 to bfloat16, rounding to nearest even (as torch's conversion does) for finite values. */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* bfloat16 to float32: its bits are the top half of a float32's. */
static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

enum { W_I8_AFFINE = 0, W_I8_SYM = 1, W_F32 = 2, W_BF16 = 3, W_Q4 = 4 }; /* weight_t.kind */

/* A weight as compressor.native.matmul describes it (built once per weight, so that a call passes
   one pointer instead of a dozen fields). */
typedef struct {
    int32_t kind;           /* W_* */
    int32_t shift;          /* q4: log2 of the block size */
    int64_t rows, cols;     /* N, K */
    const void *data;       /* codes or float values */
    int64_t data_stride;    /* q4: bytes per row (dense rows are cols elements apart) */
    const float *scales;    /* q4: per block; i8: per row or tensor */
    const void *zeros;      /* q4: uint8 per block (NULL: codebook); i8 affine: int32 per row or tensor */
    int64_t scale_stride;   /* q4: blocks per row; i8: 1 per row, 0 per tensor */
    const float *table;     /* q4 codebook */
    float constant;         /* i8 sym: 1/127 */
} weight_t;

void matmul(const weight_t *w, const float *x, int64_t M, int64_t ldx, const float *bias, float *out, int64_t ldo,
            int accumulate, int threads, int int8);
int int8_activations_supported(int kind, int64_t K);
void matmul_i8(const weight_t *w, const float *x, int64_t M, int64_t ldx, const float *bias, float *out, int64_t ldo,
               int accumulate, int threads, int tiles);
void rms_norm(const float *x, int64_t rows, int64_t width, int64_t ldx, const float *weight, float offset, float eps,
              float *out, int64_t ldo, float *rstd);
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };
void act_mul(const float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t rows, int64_t width, int act, float *out,
             int64_t ldo);
void exp_all(float *v, int64_t n); /* exp in place: a polynomial accurate to about 2 ulp, for x <= 88 */
void rope(float *x, int64_t rows, int64_t heads, int64_t dim, int64_t ldx, const float *cos, const float *sin, int64_t rot);
void dropout(const float *x, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale, float *out);
void dropped(const float *x, int64_t n, int64_t first, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale,
             float *out); /* dropout's mask over elements first .. first + n - 1 of a tensor */
void dropout_bf16(const uint16_t *x, int64_t n, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, float scale, uint16_t *out);
void attention(const float *q, const float *k, const float *v, int64_t ldq, int64_t ldk, int64_t nseq, const int64_t *seq_start,
               const int64_t *past, float *const *keys, float *const *values, const int64_t *capacity, int64_t heads,
               int64_t kv_heads, int64_t dim, float scale, float softcap, int64_t window, float *out, int64_t ldo, int threads);
float dot16(const float *a, const float *b, int64_t n); /* sum a[k] b[k] over 16 lanes folded by halves */

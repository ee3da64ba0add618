/* Products with dynamic int8 activations: out[m, n] = dot(x[m], W[n]) with x quantized per run.

   Activations, as llama.cpp's Q8 and onnxruntime's accuracy level 4 do it: each run of 32
   elements of a row gets scale = absmax / 127 and codes round(x / scale) in [-127, 127]. A row is
   quantized on its own, so batching does not change it. Weights become signed bytes: q4 codes
   through a table (nf4/fp4: round(127 * value), with the block scale times 1/127; int4: code -
   zero, exact, with the block scale), int8 codes as they are.

   The order, which every path below computes and so gives the same bits:
       d[r]   = the exact integer dot of run r's 32 weight bytes and 32 activation codes
       acc    = fma((float)d[r], wscale[n, r] * xscale[m, r], acc)      for r = 0, 1, ... in turn
   with wscale the run's block scale times the table's scale (1 for int8 weights), and then
       q4: acc;  int8 affine: (acc - zero * xsum[m]) * scale;  int8 sym: acc * (scale * c)
   (+ bias) (+ out). The integer dot has no order (it is exact, |d| < 2**24 converts exactly), so
   the paths are free to form it as they like:
     - AMX (Sapphire Rapids and later): one tile product per run, 16 weight rows by up to 16
       activation rows, signed by signed bytes.
     - AVX-512 VNNI elsewhere: unsigned weight bytes (w + 128) by signed codes, four products a
       lane, the lanes of a run summed in integers, 128 * the run's code sum taken back.
   Both keep a block of 16 weight rows in the vector lanes of the float accumulation. K must be a
   multiple of 64; without VNNI the caller falls back to float32 activations. */

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#endif

#include "kernels.h"
#include "pool.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#endif

/* Whether the int8-activation kernels take this weight. */
int int8_activations_supported(int kind, int64_t K) {
#ifdef HAVE_VNNI
    return (kind == W_Q4 || kind == W_I8_AFFINE || kind == W_I8_SYM) && K % 64 == 0;
#else
    (void)kind; (void)K;
    return 0;
#endif
}

#ifdef HAVE_VNNI

#define BLOCK 16 /* weight rows a block: the lanes of the accumulation */

typedef struct {
    int64_t M, K, runs;
    int8_t *codes;    /* M x K, q4 order (each 32 as 16 even then 16 odd elements) or natural */
    float *scales;    /* M x runs */
    int32_t *sums128; /* M x runs: 128 * the run's code sum (VNNI's unsigned-weight term) */
    float *sums;      /* M: sum over runs of scale * code sum, in order (int8 affine's zero-point term) */
    int8_t *tiles;    /* AMX, M > 1: per (16 rows, run) the 32 x 16 codes in the tile's 4-byte interleave */
    float *tile_scales; /* AMX, M > 1: per (16 rows, run) the 16 rows' scales (0 past M) */
} qx_t;

static void qx_free(qx_t *q) {
    free(q->codes); free(q->scales); free(q->sums128); free(q->sums); free(q->tiles); free(q->tile_scales);
}

/* 32 floats into 32 codes (q4 order: the even elements, then the odd), returning the scale and
   writing the code sum; the float operations are the scalar ones (absmax / 127, x * (127 / absmax),
   rounded to nearest even), 16 lanes at a time. */
static inline float quantize_run(const float *x, int q4_order, int8_t *codes, int32_t *sum) {
    __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    if (q4_order) {
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        __m512 e = _mm512_permutex2var_ps(a, even, b), o = _mm512_permutex2var_ps(a, odd, b);
        a = e, b = o;
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i ca = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv))), lo), hi);
    __m512i cb = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv))), lo), hi);
    _mm_storeu_si128((__m128i *)codes, _mm512_cvtepi32_epi8(ca));
    _mm_storeu_si128((__m128i *)(codes + 16), _mm512_cvtepi32_epi8(cb));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb));
    return scale;
}

static int qx_make(const float *x, int64_t M, int64_t ldx, int64_t K, int q4_order, int tiles, qx_t *q) {
    const int64_t runs = K / 32, mblocks = (M + 15) / 16;
    memset(q, 0, sizeof *q);
    q->M = M, q->K = K, q->runs = runs;
    q->codes = malloc(M * K);
    q->scales = malloc(sizeof(float) * M * runs);
    q->sums128 = malloc(sizeof(int32_t) * M * runs);
    q->sums = malloc(sizeof(float) * M);
    if (tiles) {
        q->tiles = calloc(mblocks * runs, 512);
        q->tile_scales = calloc(mblocks * runs * 16, sizeof(float));
    }
    if (!q->codes || !q->scales || !q->sums128 || !q->sums || (tiles && (!q->tiles || !q->tile_scales))) return 0;
    for (int64_t m = 0; m < M; m++) {
        float total = 0;
        for (int64_t r = 0; r < runs; r++) {
            int8_t *run = q->codes + m * K + 32 * r;
            int32_t sum;
            const float scale = quantize_run(x + m * ldx + 32 * r, q4_order, run, &sum);
            q->scales[m * runs + r] = scale;
            q->sums128[m * runs + r] = 128 * sum;
            total += scale * (float)sum;
            if (tiles) { /* B tile: the run's 4-byte groups down the rows, activation row m % 16 across */
                int8_t *tile = q->tiles + ((m / 16) * runs + r) * 512 + (m % 16) * 4;
                for (int g = 0; g < 8; g++) memcpy(tile + g * 64, run + 4 * g, 4);
                q->tile_scales[((m / 16) * runs + r) * 16 + m % 16] = scale;
            }
        }
        q->sums[m] = total;
    }
    return 1;
}

/* ---- a block's weights as bytes -------------------------------------------------------------- */

typedef struct {
    const weight_t *w; const qx_t *qx; __m512i table, table_flipped; float table_scale; const float *bias; float *out;
    int64_t ldo; int accumulate, amx;
} job_t;

/* A 4-bit table as bytes in every 128-bit lane: lanes 0-1 block b0's, lanes 2-3 block b1's (an
   integer zero point's codes - zero; the codebook's as the job holds it), as unsigned w + 128 if flipped. */
static inline __m512i q4_table(const job_t *j, const uint8_t *zeros, int64_t b0, int64_t b1, int flipped) {
    if (!zeros) return flipped ? j->table_flipped : j->table;
    const __m128i iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m256i t0 = _mm256_broadcastsi128_si256(_mm_sub_epi8(iota, _mm_set1_epi8((char)zeros[b0])));
    __m256i t1 = _mm256_broadcastsi128_si256(_mm_sub_epi8(iota, _mm_set1_epi8((char)zeros[b1])));
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(t0), t1, 1), _mm512_set1_epi8(flipped ? (char)0x80 : 0));
}

/* The 64 bytes of weight row `row` from element k (flipped: as VNNI's unsigned w + 128).
   q4: 32 code bytes become, lane by lane, the high nibbles (even elements) and the low ones (odd)
   of the first 16 bytes, then of the next 16: each run of 32 in q4 order. */
static inline __m512i chunk_bytes(const job_t *j, int64_t row, int64_t k, int flipped) {
    const weight_t *w = j->w;
    if (w->kind != W_Q4)
        return _mm512_xor_si512(_mm512_loadu_si512((const int8_t *)w->data + row * w->cols + k), _mm512_set1_epi8(flipped ? (char)0x80 : 0));
    const uint8_t *zeros = w->zeros ? (const uint8_t *)w->zeros + row * w->scale_stride : 0;
    const __m512i table = q4_table(j, zeros, k >> w->shift, (k + 32) >> w->shift, flipped);
    __m512i z = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)((const uint8_t *)w->data + row * w->data_stride + k / 2)));
    z = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), z);
    z = _mm512_and_si512(_mm512_mask_srli_epi16(z, 0x00FF00FF, z, 4), _mm512_set1_epi8(0x0F));
    return _mm512_shuffle_epi8(table, z);
}

/* The weight scales of the chunk's two runs, row i of the block in lane i (rows given by index). */
static inline void chunk_scales(const job_t *j, int64_t n0, __m512i rows, int64_t k, __m512 *ws0, __m512 *ws1) {
    const weight_t *w = j->w;
    if (w->kind != W_Q4) { *ws0 = *ws1 = _mm512_set1_ps(1.0f); return; }
    const __m512i at = _mm512_mullo_epi32(rows, _mm512_set1_epi32((int)w->scale_stride));
    const float *base = w->scales + n0 * w->scale_stride;
    const int64_t b0 = k >> w->shift, b1 = (k + 32) >> w->shift;
    const __m512 ts = _mm512_set1_ps(j->table_scale);
    *ws0 = _mm512_mul_ps(_mm512_i32gather_ps(at, base + b0, 4), ts);
    *ws1 = b1 == b0 ? *ws0 : _mm512_mul_ps(_mm512_i32gather_ps(at, base + b1, 4), ts);
}

/* Row i of a block of nr rows, by lane and in row[i]: past the last, the last again (its products are never stored). */
static inline __m512i block_rows(int nr, int32_t row[BLOCK]) {
    const __m512i rows = _mm512_min_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(nr - 1));
    _mm512_storeu_si512(row, rows);
    return rows;
}

/* Where the codes of the block after the one at row n0 start (NULL when that is the last full
   one), and the bytes a row takes: asked for a line at a time while this block is worked on,
   since 16 short streams outrun the hardware prefetchers. */
static inline const uint8_t *next_block(const weight_t *w, int64_t n0, int64_t *row_bytes) {
    *row_bytes = w->kind == W_Q4 ? w->data_stride : w->cols;
    return n0 + 2 * BLOCK <= w->rows ? (const uint8_t *)w->data + (n0 + BLOCK) * *row_bytes : 0;
}

/* acc[i * is + m * ms] (weight row n0 + i, activation row m0 + m) into out, as the order says
   (the scalar operations, 16 weight rows a vector). */
static void block_store(const job_t *j, int64_t n0, int nr, int64_t m0, int64_t mt, const float *acc, int64_t is, int64_t ms) {
    const weight_t *w = j->w;
    const __mmask16 valid = (__mmask16)((1u << nr) - 1);
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)is));
    __m512 scale = _mm512_setzero_ps(), zero = _mm512_setzero_ps();
    if (w->kind != W_Q4) { /* per row (scale_stride 1) or one for the tensor (0) */
        scale = w->scale_stride ? _mm512_maskz_loadu_ps(valid, w->scales + n0) : _mm512_set1_ps(w->scales[0]);
        if (w->kind == W_I8_SYM) scale = _mm512_mul_ps(scale, _mm512_set1_ps(w->constant));
        else if (w->zeros) {
            const int32_t *z = w->zeros;
            zero = _mm512_cvtepi32_ps(w->scale_stride ? _mm512_maskz_loadu_epi32(valid, z + n0) : _mm512_set1_epi32(z[0]));
        }
    }
    const __m512 bias = j->bias ? _mm512_maskz_loadu_ps(valid, j->bias + n0) : _mm512_setzero_ps();
    for (int64_t m = 0; m < mt; m++) {
        __m512 v = is == 1 ? _mm512_loadu_ps(acc + m * ms) : _mm512_i32gather_ps(at, acc + m * ms, 4);
        if (w->kind == W_I8_AFFINE) v = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_mul_ps(zero, _mm512_set1_ps(j->qx->sums[m0 + m]))), scale);
        else if (w->kind == W_I8_SYM) v = _mm512_mul_ps(v, scale);
        if (j->bias) v = _mm512_add_ps(v, bias);
        float *o = j->out + (m0 + m) * j->ldo + n0;
        if (j->accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(valid, o), v);
        _mm512_mask_storeu_ps(o, valid, v);
    }
}

/* ---- VNNI: 16 lanes of four products, summed per run across a block of rows ------------------ */

/* d[i] holds row i's 16 partial sums of a chunk (lanes 0-7 run one, 8-15 run two): the two runs'
   sums of all 16 rows, row i in lane i. Integer additions, so exact in any order. */
static inline void runs_of(const __m512i d[BLOCK], __m512i *run0, __m512i *run1) {
    __m512i t[8], v[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_epi32(d[2 * i], d[2 * i + 1]));
    for (int i = 0; i < 4; i++)   /* per 128-bit lane: rows 4i .. 4i + 3's sums over that quarter of the chunk */
        v[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[0], v[1], 0x88), _mm512_shuffle_i32x4(v[0], v[1], 0xDD));
    __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2], v[3], 0x88), _mm512_shuffle_i32x4(v[2], v[3], 0xDD));
    *run0 = _mm512_shuffle_i32x4(s01, s23, 0x88);
    *run1 = _mm512_shuffle_i32x4(s01, s23, 0xDD);
}

/* All activation rows against the block's rows n0 .. n0 + nr; acc (M x 16, row i in lane i). */
static void block_vnni(const job_t *j, int64_t n0, int nr, float *acc) {
    const qx_t *qx = j->qx;
    const int64_t K = qx->K, runs = qx->runs, M = qx->M;
    int32_t row[BLOCK];
    const __m512i rows = block_rows(nr, row);
    memset(acc, 0, sizeof(float) * 16 * M);
    int64_t row_bytes;
    const uint8_t *next = next_block(j->w, n0, &row_bytes);
    const int q4 = j->w->kind == W_Q4;
    for (int64_t k = 0; k < K; k += 64) {
        const int64_t r = k / 32;
        __m512 ws0, ws1;
        chunk_scales(j, n0, rows, k, &ws0, &ws1);
        __m512i w[BLOCK];
        for (int i = 0; i < BLOCK; i++) w[i] = chunk_bytes(j, n0 + row[i], k, 1);
        if (next && (k & 64) == 0) /* a cache line of every row of the next block */
            for (int i = 0; i < BLOCK; i++) _mm_prefetch((const char *)next + i * row_bytes + (q4 ? k / 2 : k), _MM_HINT_T1);
        for (int64_t m = 0; m < M; m++) {
            const __m512i x = _mm512_loadu_si512((const void *)(qx->codes + m * K + k));
            __m512i d[BLOCK], run0, run1;
            for (int i = 0; i < BLOCK; i++) d[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[i], x);
            runs_of(d, &run0, &run1);
            run0 = _mm512_sub_epi32(run0, _mm512_set1_epi32(qx->sums128[m * runs + r]));
            run1 = _mm512_sub_epi32(run1, _mm512_set1_epi32(qx->sums128[m * runs + r + 1]));
            __m512 a = _mm512_loadu_ps(acc + 16 * m);
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(run0), _mm512_mul_ps(ws0, _mm512_set1_ps(qx->scales[m * runs + r])), a);
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(run1), _mm512_mul_ps(ws1, _mm512_set1_ps(qx->scales[m * runs + r + 1])), a);
            _mm512_storeu_ps(acc + 16 * m, a);
        }
    }
}

/* ---- AMX: a tile product per run ------------------------------------------------------------- */

#ifdef HAVE_AMX
/* Tiles: 0, 1 the weight bytes of even and odd runs (16 rows x 32 bytes), 2, 3 the activation
   codes (8 rows x 64 bytes: 16 activation rows), 4, 5 their products (16 x 16 int32). */
typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 2; t++) {
        c.rows[t] = 16, c.colsb[t] = 32;
        c.rows[2 + t] = 8, c.colsb[2 + t] = 64;
        c.rows[4 + t] = 16, c.colsb[4 + t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Linux lends the tile registers to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM). */
static int amx_permitted(void) {
    static atomic_int state; /* 0 not asked, 1 granted, -1 refused */
    int s = atomic_load(&state);
    if (!s) {
        s = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        atomic_store(&state, s);
    }
    return s > 0;
}

/* The block's weights as signed bytes, 16 rows of K at bytes + i * stride (int8 weights of a full
   block where they lie), and each run's weight scales by lane, wscale[r * 16 + i]. */
static const int8_t *block_bytes(const job_t *j, int64_t n0, int nr, int8_t *scratch, float *wscale, int64_t *stride) {
    const weight_t *w = j->w;
    const int64_t K = w->cols;
    int32_t row[BLOCK];
    const __m512i rows = block_rows(nr, row);
    for (int64_t k = 0; k < K; k += 64) {
        __m512 ws0, ws1;
        chunk_scales(j, n0, rows, k, &ws0, &ws1);
        _mm512_storeu_ps(wscale + (k / 32) * BLOCK, ws0);
        _mm512_storeu_ps(wscale + (k / 32 + 1) * BLOCK, ws1);
    }
    *stride = K;
    if (w->kind != W_Q4 && nr == BLOCK) return (const int8_t *)w->data + n0 * K; /* read where they lie */
    int64_t row_bytes;
    const uint8_t *next = next_block(w, n0, &row_bytes);
    for (int i = 0; i < BLOCK; i++)
        for (int64_t k = 0; k < K; k += 64) {
            _mm512_storeu_si512(scratch + i * K + k, chunk_bytes(j, n0 + row[i], k, 0));
            if (next && (k & 64) == 0) _mm_prefetch((const char *)next + i * row_bytes + k / 2, _MM_HINT_T1);
        }
    return scratch;
}

/* The tile products of runs r and r + 1 (activation rows of tile mb) into d[0] and d[1]. */
static inline void run_pair(const qx_t *qx, const int8_t *bytes, int64_t stride, int64_t mb, int64_t r, int32_t d[2][BLOCK][16]) {
    const int8_t *codes = qx->tiles + (mb * qx->runs + r) * 512;
    _tile_loadd(0, bytes + 32 * r, stride);
    _tile_loadd(2, codes, 64);
    _tile_zero(4);
    _tile_dpbssd(4, 0, 2);
    _tile_loadd(1, bytes + 32 * (r + 1), stride);
    _tile_loadd(3, codes + 512, 64);
    _tile_zero(5);
    _tile_dpbssd(5, 1, 3);
    _tile_stored(4, d[0], 64);
    _tile_stored(5, d[1], 64);
}

/* Activation rows 16 mb .. 16 mb + 15 against the block: the products of a run are 16 x 16 int32,
   weight row i by activation row m; acc[i][m]. The tiles of the next pair of runs are issued
   before this pair's products are read back, so that the two overlap. */
static void block_amx(const job_t *j, const int8_t *bytes, int64_t stride, const float *wscale, int64_t mb, float acc[BLOCK][16]) {
    const qx_t *qx = j->qx;
    const int64_t runs = qx->runs;
    int32_t d[2][2][BLOCK][16] __attribute__((aligned(64)));
    __m512 a[BLOCK];
    for (int i = 0; i < BLOCK; i++) a[i] = _mm512_setzero_ps();
    run_pair(qx, bytes, stride, mb, 0, d[0]);
    for (int64_t r = 0; r < runs; r += 2) {
        if (r + 2 < runs) run_pair(qx, bytes, stride, mb, r + 2, d[(r / 2 + 1) % 2]);
        int32_t (*done)[BLOCK][16] = d[(r / 2) % 2];
        for (int h = 0; h < 2; h++) {
            const __m512 xs = _mm512_loadu_ps(qx->tile_scales + (mb * runs + r + h) * 16);
            for (int i = 0; i < BLOCK; i++)
                a[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(done[h][i])),
                                       _mm512_mul_ps(_mm512_set1_ps(wscale[(r + h) * BLOCK + i]), xs), a[i]);
        }
    }
    for (int i = 0; i < BLOCK; i++) _mm512_storeu_ps(acc[i], a[i]);
}
#endif

/* ---- the blocks of a call -------------------------------------------------------------------- */

static void blocks(void *arg, int64_t begin, int64_t end) {
    const job_t *j = arg;
    const int64_t K = j->w->cols, N = j->w->rows, M = j->qx->M;
#ifdef HAVE_AMX
    if (j->amx) {
        int8_t *scratch = aligned_alloc(64, BLOCK * K);
        float *wscale = aligned_alloc(64, sizeof(float) * BLOCK * (K / 32));
        if (scratch && wscale) {
            float acc[BLOCK][16];
            configure();
            for (int64_t b = begin; b < end; b++) {
                const int64_t n0 = b * BLOCK;
                const int nr = N - n0 < BLOCK ? (int)(N - n0) : BLOCK;
                int64_t stride;
                const int8_t *bytes = block_bytes(j, n0, nr, scratch, wscale, &stride);
                for (int64_t mb = 0; mb * 16 < M; mb++) {
                    block_amx(j, bytes, stride, wscale, mb, acc);
                    block_store(j, n0, nr, mb * 16, M - mb * 16 < 16 ? M - mb * 16 : 16, &acc[0][0], 16, 1);
                }
            }
            _tile_release();
        }
        free(scratch);
        free(wscale);
        return;
    }
#endif
    float *acc = aligned_alloc(64, sizeof(float) * 16 * M);
    if (!acc) return;
    for (int64_t b = begin; b < end; b++) {
        const int64_t n0 = b * BLOCK;
        const int nr = N - n0 < BLOCK ? (int)(N - n0) : BLOCK;
        block_vnni(j, n0, nr, acc);
        block_store(j, n0, nr, 0, M, acc, 1, 16);
    }
    free(acc);
}

/* out (M, ldo) [+]= x (M, ldx) @ W.T (+ bias) with x quantized per run; tiles: 0 keeps to VNNI
   even where AMX is lent (tests compare the two). */
void matmul_i8(const weight_t *w, const float *x, int64_t M, int64_t ldx, const float *bias, float *out, int64_t ldo,
               int accumulate, int threads, int tiles) {
    int amx = 0; /* one activation row: VNNI's lanes measure faster than a tile with one column */
#ifdef HAVE_AMX
    amx = tiles && M > 1 && amx_permitted();
#else
    (void)tiles;
#endif
    qx_t q;
    if (!qx_make(x, M, ldx, w->cols, w->kind == W_Q4, amx, &q)) { qx_free(&q); return; }
    job_t job = {w, &q, _mm512_setzero_si512(), _mm512_setzero_si512(), w->zeros ? 1.0f : 1.0f / 127.0f, bias, out, ldo, accumulate, amx};
    if (w->kind == W_Q4 && !w->zeros) {
        int8_t table8[16];
        for (int c = 0; c < 16; c++) table8[c] = (int8_t)lrintf(127.0f * w->table[c]);
        job.table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table8));
        job.table_flipped = _mm512_xor_si512(job.table, _mm512_set1_epi8((char)0x80));
    }
    parallel_for(threads, (w->rows + BLOCK - 1) / BLOCK, blocks, &job);
    qx_free(&q);
}
#else
void matmul_i8(const weight_t *w, const float *x, int64_t M, int64_t ldx, const float *bias, float *out, int64_t ldo,
               int accumulate, int threads, int tiles) {
    /* Never called: int8_activations_supported is 0 without VNNI. */
    (void)w; (void)x; (void)M; (void)ldx; (void)bias; (void)out; (void)ldo; (void)accumulate; (void)threads; (void)tiles;
}
#endif

/* Paged decode attention for CPUs: one query token per sequence attends to its keys and values read in
 * place from the paged KV cache (no gather copy). Grouped-query aware: the G query heads that share a KV
 * head are computed together, so each key/value block is read (and converted) once. Float32 math; cache
 * float32 or bfloat16. Parallel over (sequence, kv head) with OpenMP (torch's own libgomp at run time).
 *
 * Layouts: q, out (B, H, D); k_cache (num_blocks, KVH, D, block_size): keys stored transposed per block,
 * so scores vectorize over the block's tokens; v_cache (num_blocks, KVH, block_size, D); block_tables
 * (B, max_blocks); kv_lens (B,). Token t of sequence b is in block block_tables[b][t / block_size] at
 * offset t % block_size.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BLOCK_SIZE 128

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);  /* round to nearest even */
    return (uint16_t)((v.u + rounding) >> 16);
}

/* n contiguous values at base[offset...] -> dst as float32 */
static inline void load(const void *base, int64_t offset, int64_t n, int is_bf16, float *restrict dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)base + offset, sizeof(float) * (size_t)n);
    }
}

static inline __attribute__((always_inline)) void attend_impl(const void *q, const void *k_cache, const void *v_cache,
                       const int64_t *table, int64_t L, void *out, int64_t q_offset, const int G, int KVH, int h,
                       const int D, const int bs, float scale, int is_bf16, float *restrict buf) {
    float *restrict kv = buf;               /* D * bs: one block of K^T or V, as float32 */
    float *restrict scores = kv + D * bs;   /* G * L */
    float qf[G * D], acc[G * D];            /* small: G * D <= a few KB */
    load(q, q_offset, (int64_t)G * D, is_bf16, qf);
    for (int i = 0; i < G * D; i++) { qf[i] *= scale; acc[i] = 0.f; }
    const int64_t num_blocks = (L + bs - 1) / bs;
    const int64_t head_stride = (int64_t)D * bs;

    for (int64_t blk = 0; blk < num_blocks; blk++) {      /* scores = (q * scale) . k, all G heads at once */
        load(k_cache, (table[blk] * KVH + h) * head_stride, head_stride, is_bf16, kv);
        const int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        float s[G * bs];
        for (int i = 0; i < G * bs; i++) s[i] = 0.f;
        for (int d = 0; d < D; d++) {
            const float *krow = kv + d * bs;
            for (int g = 0; g < G; g++) {
                const float qd = qf[g * D + d];
#pragma omp simd
                for (int t = 0; t < bs; t++) s[g * bs + t] += qd * krow[t];
            }
        }
        for (int g = 0; g < G; g++) memcpy(scores + g * L + blk * bs, s + g * bs, sizeof(float) * (size_t)n);
    }
    for (int g = 0; g < G; g++) {                         /* softmax */
        float *sg = scores + g * L, mx = -FLT_MAX, sum = 0.f;
        for (int64_t t = 0; t < L; t++) mx = sg[t] > mx ? sg[t] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; t++) { sg[t] = expf(sg[t] - mx); sum += sg[t]; }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < L; t++) sg[t] *= inv;
    }
    for (int64_t blk = 0; blk < num_blocks; blk++) {      /* out = p . v, all G heads per value row */
        const int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        load(v_cache, (table[blk] * KVH + h) * head_stride, n * D, is_bf16, kv);
        for (int64_t t = 0; t < n; t++) {
            const float *vrow = kv + t * D;
            for (int g = 0; g < G; g++) {
                const float p = scores[g * L + blk * bs + t];
#pragma omp simd
                for (int d = 0; d < D; d++) acc[g * D + d] += p * vrow[d];
            }
        }
    }
    if (is_bf16) {
        uint16_t *o = (uint16_t *)out + q_offset;
        for (int i = 0; i < G * D; i++) o[i] = f32_to_bf16(acc[i]);
    } else {
        memcpy((float *)out + q_offset, acc, sizeof(float) * (size_t)(G * D));
    }
}

/* Specializations with compile-time head size and block size: the inner loops unroll and the
 * accumulators stay in registers. Anything else takes the generic version. */
#define SPECIALIZE(NAME, GG, DD, BS)                                                                   \
    static void NAME(const void *q, const void *k, const void *v, const int64_t *table, int64_t L,      \
                     void *out, int64_t qo, int G, int KVH, int h, int D, int bs, float scale,           \
                     int is_bf16, float *restrict buf) {                                               \
        (void)G; (void)D; (void)bs;                                                                    \
        attend_impl(q, k, v, table, L, out, qo, GG, KVH, h, DD, BS, scale, is_bf16, buf);              \
    }
SPECIALIZE(attend_g4_d64_b16, 4, 64, 16)
SPECIALIZE(attend_g4_d128_b16, 4, 128, 16)
SPECIALIZE(attend_g6_d128_b16, 6, 128, 16)
SPECIALIZE(attend_g7_d128_b16, 7, 128, 16)
SPECIALIZE(attend_g8_d128_b16, 8, 128, 16)
SPECIALIZE(attend_g2_d64_b16, 2, 64, 16)

static void attend_generic(const void *q, const void *k, const void *v, const int64_t *table, int64_t L,
                           void *out, int64_t qo, int G, int KVH, int h, int D, int bs, float scale,
                           int is_bf16, float *restrict buf) {
    attend_impl(q, k, v, table, L, out, qo, G, KVH, h, D, bs, scale, is_bf16, buf);
}

typedef void (*attend_fn)(const void *, const void *, const void *, const int64_t *, int64_t, void *, int64_t,
                          int, int, int, int, int, float, int, float *restrict);

static attend_fn pick(int G, int D, int bs) {
    if (bs == 16 && D == 64 && G == 4) return attend_g4_d64_b16;
    if (bs == 16 && D == 64 && G == 2) return attend_g2_d64_b16;
    if (bs == 16 && D == 128 && G == 4) return attend_g4_d128_b16;
    if (bs == 16 && D == 128 && G == 6) return attend_g6_d128_b16;
    if (bs == 16 && D == 128 && G == 7) return attend_g7_d128_b16;
    if (bs == 16 && D == 128 && G == 8) return attend_g8_d128_b16;
    return attend_generic;
}

int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, const int64_t *kv_lens, void *out,
                           int B, int H, int KVH, int D, int block_size, int max_blocks,
                           float scale, int is_bf16) {
    if (block_size > MAX_BLOCK_SIZE || H % KVH != 0) return -1;
    const int G = H / KVH;
    const attend_fn attend_one = pick(G, D, block_size);
    int64_t max_len = 0;
    for (int b = 0; b < B; b++) max_len = kv_lens[b] > max_len ? kv_lens[b] : max_len;
    const size_t buf_floats = (size_t)(D * block_size) + (size_t)G * (size_t)max_len;
    int failed = 0;
#pragma omp parallel
    {
        float *buf = malloc(sizeof(float) * buf_floats);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * KVH; task++) {
            if (buf == NULL) continue;
            const int b = task / KVH, h = task % KVH;
            attend_one(q, k_cache, v_cache, block_tables + (int64_t)b * max_blocks, kv_lens[b], out,
                       ((int64_t)b * H + (int64_t)h * G) * D, G, KVH, h, D, block_size, scale, is_bf16, buf);
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

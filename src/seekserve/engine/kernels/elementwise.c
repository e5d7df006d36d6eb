/* Fused elementwise ops for CPUs (float32 or bfloat16 tensors, float32 math), each one pass over memory
 * where PyTorch eager needs several: RMSNorm with the residual add, SiLU-and-multiply, and rotary
 * embedding applied in place. Parallel over rows with OpenMP. */
#include <math.h>
#include <stdint.h>

static inline float ld(const void *p, int64_t i, int bf16) {
    if (bf16) {
        union { uint32_t u; float f; } v;
        v.u = (uint32_t)((const uint16_t *)p)[i] << 16;
        return v.f;
    }
    return ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float f, int bf16) {
    if (bf16) {
        union { uint32_t u; float f; } v;
        v.f = f;
        ((uint16_t *)p)[i] = (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
    } else {
        ((float *)p)[i] = f;
    }
}

/* residual == NULL: out = norm(x) * w.  Else: residual = x + residual (rounded to the dtype, like an
 * eager add), out = norm(residual) * w. x, out, residual: (T, H); w: (H,). */
void rms_norm(const void *x, void *residual, const void *w, void *out, int64_t T, int64_t H, float eps,
              int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const int64_t row = t * H;
        float ss = 0.f;
        if (residual) {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < H; i++) {
                st(residual, row + i, ld(x, row + i, bf16) + ld(residual, row + i, bf16), bf16);
                const float r = ld(residual, row + i, bf16);
                ss += r * r;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < H; i++) { const float v = ld(x, row + i, bf16); ss += v * v; }
        }
        const void *src = residual ? residual : x;
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) {
            /* normalize, round to the dtype, then scale: the order transformers uses */
            float v = ld(src, row + i, bf16) * inv;
            if (bf16) { st(out, row + i, v, 1); v = ld(out, row + i, 1); }
            st(out, row + i, v * ld(w, i, bf16), bf16);
        }
    }
}

/* out = silu(gate) * up, gate_up: (T, 2I) with gate first; out: (T, I). */
void silu_mul(const void *gate_up, void *out, int64_t T, int64_t I, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
#pragma omp simd
        for (int64_t i = 0; i < I; i++) {
            const float g = ld(gate_up, t * 2 * I + i, bf16), u = ld(gate_up, t * 2 * I + I + i, bf16);
            st(out, t * I + i, g / (1.f + expf(-g)) * u, bf16);
        }
    }
}

/* Neox-style rotary embedding in place on heads [0, num_heads) of each row of x: (T, row_stride), head h
 * at x + t * row_stride + h * D. cos_sin: (max_pos, D) cos then (max_pos, D) sin, float32. */
void rotary(void *x, const int64_t *positions, const float *cos_cache, const float *sin_cache, int64_t T,
            int64_t row_stride, int64_t num_heads, int64_t D, int bf16) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_cache + positions[t] * D, *s = sin_cache + positions[t] * D;
        for (int64_t h = 0; h < num_heads; h++) {
            const int64_t base = t * row_stride + h * D;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = ld(x, base + i, bf16), b = ld(x, base + half + i, bf16);
                st(x, base + i, a * c[i] - b * s[i], bf16);
                st(x, base + half + i, b * c[half + i] + a * s[half + i], bf16);
            }
        }
    }
}

/* Row-wise argmax of float32 logits (N, V) into out (N,): first index of the maximum, like torch.
 * Two vectorizable passes (max, then first match) beat one branchy pass. NaN-free input assumed. */
void argmax_rows(const float *x, int64_t *out, int64_t N, int64_t V) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *row = x + n * V;
        float best = row[0];
#pragma omp simd reduction(max : best)
        for (int64_t v = 0; v < V; v++) best = row[v] > best ? row[v] : best;
        int64_t arg = 0;
        while (arg < V - 1 && row[arg] != best) arg++;  /* bounded even if a NaN slipped in */
        out[n] = arg;
    }
}

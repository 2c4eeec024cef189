/* W8A8 products for the dense linears on CPU (expertpool.kernels.cpu_w8a8): int8 weights with one fp32
   scale per output row, int8 activations with one fp32 scale per row and 128-column block (quantized
   per call, as DeepSeek-V3's FP8 inference quantizes its activations in 1 x 128 blocks), multiplied with
   the CPU's int8 dot product (AVX512_VNNI vpdpbusd: 64 exact byte products per instruction, twice the
   pairs of the bf16 dot product's 32).

   At a decode batch (16 rows) a bf16 product is bound by the bf16 dot product's rate, not by memory:
   bench-mini's 32000 x 1024 output head took ~1.8 ms, whose 65 MB the memory here streams in ~1.3
   (docs/benchmarks.md, session 22). Here each instruction does twice the multiplies and each weight is
   one byte.

   vpdpbusd multiplies unsigned by signed bytes: the activations are stored as q + 128 (0..255), and
   each block's sum is corrected by 128 * (the block's sum of the weights), precomputed at packing:
   sum_k (q_k + 128) w_k - 128 sum_k w_k = sum_k q_k w_k, exact in int32 (|sum| <= 128 * 127 * 255).

   Layouts: activations [M][K] bytes, scales [M][K / 128]; weights [N / 16][K / 4][16][4] (a 32-bit
   lane holds 4 consecutive k of one output), corrections [N / 16][K / 128][16] int32, weight scales
   [N] fp32. Requires K % 128 == 0 and N % 16 == 0 (the Python side checks).

   Each output is sum_blocks fma(float(block's int sum), x scale, acc) in block order, times the weight
   scale: the same operations in the same order whatever the other rows, the tiling or the threads, so a
   row's result does not depend on its batch. Compiled only where the compiler targets AVX512_VNNI. */

#include "vec.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QB 128       /* activation scale block along k */
#define W8_MT 6      /* rows per tile, x W8_NT vectors of 16 outputs: 12 int32 and 12 fp32 accumulators in */
#define W8_NT 2      /* registers, each broadcast row feeding two dot products. bench-mini's products at 16 rows,
                        2 threads, from DRAM (alternated, noisy): 6 x 2 58-99 us where 8 x 1 gave 98-145 and
                        the bf16 kernel 136-184 (q_b, o_proj, q_a + kv_a); the 32000-row head 1.73-2.14 ms
                        where 8 x 1 gave 1.77-2.44 and bf16 2.38-2.64 */
#ifndef W8_PF
#define W8_PF 16     /* k-steps (64 bytes each) the weight stream is prefetched ahead */
#endif
#ifndef W8_CHUNK
#define W8_CHUNK 2   /* 32-output items per dynamic hand-out */
#endif

/* Rows of x (fp32 or bf16, row stride xr elements) to bytes q + 128 and per-(row, block) scales:
   s = amax / 127 (1 where the block is all zero), q = round-half-even(x / s) clamped to [-127, 127]. */
void w8a8_quant_rows(const void *x, int x_bf16, int64_t M, int64_t K, int64_t xr, uint8_t *xq, float *xs) {
    const int64_t KB = K / QB;
#pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < KB; b++) {
            __m512 v[QB / 16];
            for (int j = 0; j < QB / 16; j++) {
                const int64_t off = m * xr + b * QB + j * 16;
                v[j] = x_bf16 ? (__m512)widen_bf16((const uint16_t *)x + off)
                              : _mm512_loadu_ps((const float *)x + off);
            }
            __m512 a = _mm512_abs_ps(v[0]);
            for (int j = 1; j < QB / 16; j++) a = _mm512_max_ps(a, _mm512_abs_ps(v[j]));
            const float amax = _mm512_reduce_max_ps(a);
            const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
            xs[m * KB + b] = s;
            const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
            for (int j = 0; j < QB / 16; j++) {
                __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v[j], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
                const __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
                _mm_storeu_si128((__m128i *)(xq + m * K + b * QB + j * 16), _mm512_cvtepi32_epi8(qi));
            }
        }
    }
}

/* one tile: mt rows x nt vectors of 16 outputs over all of K (wstride: bytes between the vectors' weights) */
static inline __attribute__((always_inline)) void w8_tile(const uint8_t *xq, const float *xs, int64_t K,
                                                          const int8_t *wp, int64_t wstride, const int32_t *corr,
                                                          const float *ws, const int mt, const int nt, void *out,
                                                          int64_t os, int out_bf16) {
    const int64_t KB = K / QB;
    __m512 facc[W8_MT][W8_NT];
    __m512i iacc[W8_MT][W8_NT];
#pragma GCC unroll 8
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) facc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < KB; b++) {
#pragma GCC unroll 8
        for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
            for (int j = 0; j < nt; j++) iacc[i][j] = _mm512_setzero_si512();
        const int8_t *wb = wp + b * (QB / 4) * 64;
        const uint8_t *xb = xq + b * QB;
        for (int k = 0; k < QB / 4; k++) {
            __m512i w[W8_NT];
#pragma GCC unroll 2
            for (int j = 0; j < nt; j++) {
                __builtin_prefetch(wb + j * wstride + (k + W8_PF) * 64);
                w[j] = _mm512_loadu_si512((const void *)(wb + j * wstride + k * 64));
            }
#pragma GCC unroll 8
            for (int i = 0; i < mt; i++) {
                int32_t p;
                memcpy(&p, xb + i * K + 4 * k, 4);
                const __m512i x4 = _mm512_set1_epi32(p);
#pragma GCC unroll 2
                for (int j = 0; j < nt; j++) iacc[i][j] = _mm512_dpbusd_epi32(iacc[i][j], x4, w[j]);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < mt; i++) {
            const __m512 sx = _mm512_set1_ps(xs[i * KB + b]);
#pragma GCC unroll 2
            for (int j = 0; j < nt; j++) {
                const __m512i c = _mm512_loadu_si512((const void *)(corr + (j * KB + b) * 16));
                facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[i][j], c)), sx, facc[i][j]);
            }
        }
    }
#pragma GCC unroll 2
    for (int j = 0; j < nt; j++) {
        const __m512 s = _mm512_loadu_ps(ws + j * 16);
#pragma GCC unroll 8
        for (int i = 0; i < mt; i++) {
            const __m512 y = _mm512_mul_ps(facc[i][j], s);
            if (out_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + i * os + j * 16), (__m256i)_mm512_cvtneps_pbh(y));
            else
                _mm512_storeu_ps((float *)out + i * os + j * 16, y);
        }
    }
}

/* out[m, n] (fp32, or bf16 rounded to nearest even; row stride os) for the quantized rows (xq, xs) of
   M x K and the packed weights (wp, corr, ws) of N outputs. Items of W8_NT x 16 outputs (the last one
   16 where N % 32 == 16) handed out dynamically: a thread another process preempts leaves its items to
   the others. */
void w8a8_gemm(const uint8_t *xq, const float *xs, int64_t M, int64_t K, const int8_t *wp, const int32_t *corr,
               const float *ws, int64_t N, void *out, int64_t os, int out_bf16, int nthreads) {
    const int64_t nv = N / 16, items = (nv + W8_NT - 1) / W8_NT, KB = K / QB, wstride = (K / 4) * 64;
    const size_t esize = out_bf16 ? 2 : 4;
#pragma omp parallel for schedule(dynamic, W8_CHUNK) num_threads(nthreads)
    for (int64_t it = 0; it < items; it++) {
        const int64_t v0 = it * W8_NT;
        const int nt = nv - v0 < W8_NT ? (int)(nv - v0) : W8_NT;
        const int8_t *w = wp + v0 * wstride;
        const int32_t *c = corr + v0 * KB * 16;
        for (int64_t m0 = 0; m0 < M; m0 += W8_MT) {
            const int mt = M - m0 < W8_MT ? (int)(M - m0) : W8_MT;
            char *o = (char *)out + ((size_t)(m0 * os) + (size_t)v0 * 16) * esize;
            const uint8_t *x = xq + m0 * K;
            const float *s = xs + m0 * KB;
            /* constant row and vector counts per call: the accumulators stay in registers */
#define W8_CASE(MTC, NTC) case MTC: w8_tile(x, s, K, w, wstride, c, ws + v0 * 16, MTC, NTC, o, os, out_bf16); break;
#define W8_ROWS(NTC) switch (mt) { W8_CASE(6, NTC) W8_CASE(5, NTC) W8_CASE(4, NTC) W8_CASE(3, NTC) \
                                   W8_CASE(2, NTC) default: W8_CASE(1, NTC) }
            if (nt == W8_NT) { W8_ROWS(W8_NT) } else { W8_ROWS(1) }
#undef W8_ROWS
#undef W8_CASE
        }
    }
}
#endif

/* Grouped small-M products for the absorbed MLA decode (expertpool.kernels.cpu_gemm).

   out[m, g, n] = sum_k x[m, g, k] * W[g][k, n] for G groups (heads) of a few rows (a decode batch):
   q_nope times W_UK per head, and the attention output times W_UV per head. torch's batched matmul
   repacks each head's weight on every call and reads it from memory cold; here the weights are packed
   once, where the model caches them, so that one vector load feeds every row of a tile:

   - bf16 (AVX512_BF16): W as [G][N / 16][K / 2][16][2] bf16, the vdpbf16ps layout (a lane's 32 bits
     hold the pair W[k, n], W[k + 1, n]); a row's pair x[k], x[k + 1] is broadcast, and each instruction
     adds both exact products to 16 fp32 lanes. Output rounded to bf16 (nearest even), as torch rounds.
   - fp32 (any AVX2 or AVX-512 build): W as [G][N / L][K][L] fp32; x[k] broadcast, one FMA per lane.

   Every output row is summed over k in the same order whatever the number of rows or threads (each
   (row, 16 outputs) has one accumulator, tiles only decide which rows share a weight load), so a row's
   result does not depend on its batch. Work items are (group, block of 2 vectors of outputs), split
   into contiguous ranges per thread. */

#include <omp.h>

#include "vec.h"

#define NT 2         /* output vectors per work item (32 outputs with AVX-512, 16 with AVX2) */
#ifndef PFK
#define PFK 32       /* k steps a weight stream is prefetched ahead (each stream's end prefetches the next
                        one's start). Weights from DRAM, bf16, 16 rows x 8 heads x 128 x 512: 2 threads
                        53-54 us without, 40-41 with; 1 thread 103-109 against 74-76 */
#endif
#if L == 16
#define MT 12        /* rows per tile: MT * NT accumulators + NT weights + 1 broadcast <= 32 zmm */
#else
#define MT 6         /* AVX2: 16 ymm */
#endif

/* one tile: mt rows x nt output vectors of group g, over all of K (fp32) */
static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t xs, const float *wp, int64_t K,
                                                            const int mt, const int nt, float *out, int64_t os) {
    vf acc[MT][NT];
#pragma GCC unroll 12
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) acc[i][j] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        vf w[NT];
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) __builtin_prefetch(wp + ((int64_t)j * K + k + PFK) * L);
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) w[j] = *(const vf *)(wp + ((int64_t)j * K + k) * L);
#pragma GCC unroll 12
        for (int i = 0; i < mt; i++) {
            const vf b = (vf){0} + x[i * xs + k];
#pragma GCC unroll 2
            for (int j = 0; j < nt; j++) acc[i][j] += b * w[j];
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) memcpy(out + i * os + j * L, &acc[i][j], sizeof(vf));
}

#define TILES_LOW(FN, ...)                                                                            \
    case 6: FN(6, __VA_ARGS__); break; case 5: FN(5, __VA_ARGS__); break;                             \
    case 4: FN(4, __VA_ARGS__); break; case 3: FN(3, __VA_ARGS__); break;                             \
    case 2: FN(2, __VA_ARGS__); break; default: FN(1, __VA_ARGS__); break;
#if MT == 12
#define TILES(FN, ...)                                                                                \
    switch (mt) {                                                                                     \
    case 12: FN(12, __VA_ARGS__); break; case 11: FN(11, __VA_ARGS__); break;                         \
    case 10: FN(10, __VA_ARGS__); break; case 9: FN(9, __VA_ARGS__); break;                           \
    case 8: FN(8, __VA_ARGS__); break; case 7: FN(7, __VA_ARGS__); break;                             \
    TILES_LOW(FN, __VA_ARGS__)                                                                        \
    }
#else
#define TILES(FN, ...) switch (mt) { TILES_LOW(FN, __VA_ARGS__) }
#endif

/* items [i0, i1) of the flattened (group, output block) space */
static void items_f32(const float *x, int64_t xr, int64_t xg, int64_t M, int64_t K, const float *wp, int64_t N,
                      float *out, int64_t or_, int64_t og, int64_t i0, int64_t i1) {
    const int64_t nv = N / L, nb = (nv + NT - 1) / NT;
    for (int64_t it = i0; it < i1; it++) {
        const int64_t g = it / nb, v0 = (it % nb) * NT;
        const int nt = nv - v0 < NT ? (int)(nv - v0) : NT;
        const float *w = wp + (g * nv + v0) * K * L;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? (int)(M - m0) : MT;
            const float *xt = x + m0 * xr + g * xg;
            float *ot = out + m0 * or_ + g * og + v0 * L;
#define F32(MTC, NTC) tile_f32(xt, xr, w, K, MTC, NTC, ot, or_)
            if (nt == NT) { TILES(F32, NT) } else { TILES(F32, 1) }
#undef F32
        }
    }
}

/* Runs ITEMS_FN over `items` work items, split in contiguous ranges over at most `nthreads` threads
   (the ranges, not the sums, depend on the thread count) */
#define RUN_ITEMS(items, nthreads, ITEMS_FN, ...)                                                    \
    do {                                                                                              \
        int team = (nthreads) < (items) ? (nthreads) : (int)(items);                                  \
        if (team < 1) team = 1;                                                                       \
        _Pragma("omp parallel num_threads(team)")                                                     \
        {                                                                                             \
            const int64_t n_ = (items), t_ = omp_get_thread_num(), T_ = omp_get_num_threads();       \
            ITEMS_FN(__VA_ARGS__, n_ * t_ / T_, n_ * (t_ + 1) / T_);                                  \
        }                                                                                             \
    } while (0)

/* x: fp32 rows (row stride xr, group stride xg, in elements); wp: packed fp32 weights; out: fp32 (row
   stride or_, group stride og). Requires N % L == 0. */
void grouped_gemm_f32(const float *x, int64_t xr, int64_t xg, int64_t M, int64_t K, const float *wp, int64_t N,
                      int64_t G, float *out, int64_t or_, int64_t og, int nthreads) {
    const int64_t nv = N / L;
    RUN_ITEMS(G * ((nv + NT - 1) / NT), nthreads, items_f32, x, xr, xg, M, K, wp, N, out, or_, og);
}

int grouped_gemm_lanes(void) { return L; }

#if defined(__AVX512BF16__)
/* one tile: mt rows x nt vectors of 16 outputs, over K / 2 pairs (bf16 dot product) */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *x, int64_t xs, const uint16_t *wp,
                                                             int64_t K2, const int mt, const int nt,
                                                             uint16_t *out, int64_t os) {
    __m512 acc[MT][NT];
#pragma GCC unroll 12
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K2; k++) {
        __m512bh w[NT];
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) __builtin_prefetch(wp + ((int64_t)j * K2 + k + PFK) * 32);
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++) w[j] = (__m512bh)_mm512_loadu_si512((const void *)(wp + ((int64_t)j * K2 + k) * 32));
#pragma GCC unroll 12
        for (int i = 0; i < mt; i++) {
            uint32_t pair;
            memcpy(&pair, x + i * xs + 2 * k, 4);
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)pair);
#pragma GCC unroll 2
            for (int j = 0; j < nt; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], b, w[j]);
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mt; i++)
#pragma GCC unroll 2
        for (int j = 0; j < nt; j++)
            _mm256_storeu_si256((__m256i *)(out + i * os + j * 16), (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
}

static void items_bf16(const uint16_t *x, int64_t xr, int64_t xg, int64_t M, int64_t K, const uint16_t *wp,
                       int64_t N, uint16_t *out, int64_t or_, int64_t og, int64_t i0, int64_t i1) {
    const int64_t nv = N / 16, nb = (nv + NT - 1) / NT, K2 = K / 2;
    for (int64_t it = i0; it < i1; it++) {
        const int64_t g = it / nb, v0 = (it % nb) * NT;
        const int nt = nv - v0 < NT ? (int)(nv - v0) : NT;
        const uint16_t *w = wp + (g * nv + v0) * K2 * 32;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? (int)(M - m0) : MT;
            const uint16_t *xt = x + m0 * xr + g * xg;
            uint16_t *ot = out + m0 * or_ + g * og + v0 * 16;
#define BF(MTC, NTC) tile_bf16(xt, xr, w, K2, MTC, NTC, ot, or_)
            if (nt == NT) { TILES(BF, NT) } else { TILES(BF, 1) }
#undef BF
        }
    }
}

/* bf16 x (strides as above), packed bf16 weights, bf16 out. Requires K % 2 == 0 and N % 16 == 0. */
void grouped_gemm_bf16(const uint16_t *x, int64_t xr, int64_t xg, int64_t M, int64_t K, const uint16_t *wp,
                       int64_t N, int64_t G, uint16_t *out, int64_t or_, int64_t og, int nthreads) {
    const int64_t nv = N / 16;
    RUN_ITEMS(G * ((nv + NT - 1) / NT), nthreads, items_bf16, x, xr, xg, M, K, wp, N, out, or_, og);
}
#endif

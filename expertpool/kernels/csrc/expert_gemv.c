/* Grouped few-row products for the routed experts on CPU (expertpool.kernels.cpu_experts).

   out[p, n] = sum_k x[p, k] * W[e(p), n, k] for the rows p of each active expert e (rows sorted by
   expert). A decode step gives most experts one to three rows, where a GEMM library spends more time
   packing and dispatching than reading the weights; this loop streams each weight row once, widens
   bf16 or int8 weights to fp32 in registers and accumulates in fp32. int8 weights (weight-only,
   symmetric) carry one bf16 scale per output row: the row's sum over k is multiplied by it once at the
   end, so they stream half the bytes of bf16 with no dequantizing pass. Every output row is summed in
   the same order whatever the other rows are, so a row's result does not depend on its batch.

   Built at first use with the machine's compiler (-O3 -march=native -fopenmp); the vector type below
   becomes AVX-512 or AVX2 code on the CPU it is built for. OpenMP resolves to the libgomp torch has
   already loaded (same soname), so this kernel and torch's ops share one thread team. */

#include "vec.h"

#define MB 4         /* rows that share one pass over a weight row */
#define KS 2         /* accumulators per row over k */
#ifndef KS8
#if L == 16
#define KS8 4        /* accumulators per row over k for int8 weights: their widening is two instructions per
                        vector, so more independent chains (one decode-like bench-mini layer from DRAM,
                        alternated: 1.16-1.22 against 1.23-1.27 ms at 1 thread x 8 tokens, 1.42-1.43
                        against 1.46-1.55 at 2 x 16) */
#else
#define KS8 2        /* AVX2: 16 ymm registers hold 4 rows x 2 accumulators and the weights, not x 4 */
#endif
#endif
#define PF 64        /* weight elements prefetched ahead: two cache lines of bf16 (64 bench-mini experts from
                        DRAM, 2 threads: 256 gave 14.8-15.7 GB/s at 2 rows per expert and 18.1-18.7 at
                        4 rows; 64 gave 16.2-16.4 and 20.8-21.2; 1 row the same) */
/* Weight rows per work item and items per dynamic hand-out (overridable with -D for experiments).
   Decode-like layer, 50 active bench-mini experts from DRAM, bf16, 2 threads: 16 rows x 4 items gave
   w13 1,265-1,458 us and w2 707-869 us; 128 x 1 gave 1,175-1,321 and 565-651 (w2's 0.5 KB rows made
   ~3,200 items of 8 KB a layer, and two threads interleaving 32 KB chunks left its streams short);
   256 x 1 the same, 512 x 1 w13 slower (1,484). One thread: no difference. */
#ifndef NB
#define NB 128
#endif
#ifndef ITEMB
#define ITEMB 131072 /* weight bytes per work item at least (NB rows, or more where rows are short): bench-mini's
                        int8 w2 has 256-byte rows, and 128-row items of 32 KB left each thread's stream short.
                        One decode-like int8 layer (bench/moe_layer.py, 2 threads, 16 tokens, alternated):
                        32 KB 1.45-1.54 ms, 128 KB 1.31-1.42, 256 KB 1.27-1.31; at 2 tokens 32 KB 0.32-0.41,
                        128 KB 0.30-0.32, 256 KB 0.29-0.41 (fewer items to balance); bf16 within noise. The decode step
                        (bench-mini, 2 x 16, int8 experts): bf16 12.6 / 11.2 -> 10.4 / 10.3 ms, fp32 14.6 -> 13.7 */
#endif
#ifndef CHUNK
#define CHUNK 1
#endif

/* weight formats of the fp32 path */
#define W_F32 0
#define W_BF16 1
#define W_I8 2

/* One weight row (fp32, bf16 or int8, widened in registers) times MBR rows of x, packed as
   [K / L][MBR][L] so that a k-chunk's MBR vectors are adjacent. KS accumulators per row hide the FMA
   latency; their tree-sum and the lane tree-sum are the same for every MBR, so a row's result does
   not depend on how many rows share its expert. wt is a constant wherever this is inlined. */
static inline __attribute__((always_inline)) void row_dot(const float *xp, int64_t K, const void *w,
                                                           const int wt, const int mbr, float *res) {
    const int ks = wt == W_I8 ? KS8 : KS;
    const int64_t Kv = K - K % (L * ks);
    const uint16_t *h = (const uint16_t *)w;
    const float *g = (const float *)w;
    const int8_t *q = (const int8_t *)w;
    vf acc[MB][KS8];
#pragma GCC unroll 4
    for (int i = 0; i < mbr; i++)
#pragma GCC unroll 4
        for (int j = 0; j < ks; j++) acc[i][j] = (vf){0};
    for (int64_t k = 0; k < Kv; k += L * ks) {
        /* the weight stream prefetched ahead (measured on an earlier tiling of 4 weight rows per pass:
           4 rows per expert ~1.9x faster, 1 row unchanged); int8 4 * PF codes (256 bytes) ahead: 2, 4
           and 8 * PF gave 1.89, 1.83 and 1.81 ms for a decode-like layer, within the noise */
        __builtin_prefetch(wt == W_BF16 ? (const void *)(h + k + PF)
                           : wt == W_I8 ? (const void *)(q + k + 4 * PF) : (const void *)(g + k + PF));
#pragma GCC unroll 4
        for (int j = 0; j < ks; j++) {
            const vf wv = wt == W_BF16 ? widen_bf16(h + k + j * L)
                          : wt == W_I8 ? widen_i8(q + k + j * L) : *(const vf *)(g + k + j * L);
            const float *xk = xp + (k + j * L) * mbr;
#pragma GCC unroll 4
            for (int i = 0; i < mbr; i++) acc[i][j] += wv * *(const vf *)(xk + i * L);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < mbr; i++) {
        vf a = acc[i][0];
#pragma GCC unroll 4
        for (int j = 1; j < ks; j++) a += acc[i][j];
        float s = hsum(a);
        for (int64_t k = Kv; k < K; k++) {
            const float wk = wt == W_BF16 ? bf16_to_f(h[k]) : wt == W_I8 ? (float)q[k] : g[k];
            s += wk * xp[(k / L) * L * mbr + i * L + k % L];
        }
        res[i] = s;
    }
}

/* rows [n0, n1) of one expert's weights w (format wt; int8 rows scaled by scale[n], bf16) */
#define ROWS_FN(MBR)                                                                                  \
    static void rows_##MBR(const float *xp, int64_t K, const void *w, int wt, const uint16_t *scale,   \
                           int64_t n0, int64_t n1, float *out, int64_t N) {                            \
        const size_t rb = (size_t)K * (wt == W_F32 ? 4 : wt == W_BF16 ? 2 : 1);                       \
        for (int64_t n = n0; n < n1; n++) {                                                           \
            float res[MB];                                                                            \
            const void *wn = (const char *)w + n * rb;                                                \
            if (wt == W_BF16) row_dot(xp, K, wn, W_BF16, MBR, res);                                   \
            else if (wt == W_I8) {                                                                    \
                row_dot(xp, K, wn, W_I8, MBR, res);                                                   \
                const float sc = bf16_to_f(scale[n]);                                                 \
                for (int i = 0; i < MBR; i++) res[i] *= sc;                                           \
            } else row_dot(xp, K, wn, W_F32, MBR, res);                                               \
            for (int i = 0; i < MBR; i++) out[i * N + n] = res[i];                                    \
        }                                                                                             \
    }
ROWS_FN(1)
ROWS_FN(3)
ROWS_FN(4)

/* rows of an expert's next block, out of `left`: up to MB, but two rows go as two single-row passes
   (the second reads the item's weight rows from cache). Measured from DRAM, 64 bench-mini experts,
   2 threads: a layer's w13 at 2 rows per expert 4.1-4.3 ms in one pass of two, 2.9-3.0 ms in two
   passes; a decode-like mix of 16 tokens 2.29-2.33 against 2.00-2.08 ms. Same bits either way: a
   row's sums do not depend on its block. */
static inline int64_t blk(int64_t left) { return left == 2 ? 1 : (left < MB ? left : MB); }
#ifndef BLK_I8
#define BLK_I8(left) ((left) < MB ? (left) : MB)
#endif

/* mbr rows of x (T, K per row) into the packed layout at xp: [K / LANES][mbr][LANES], zero-padded */
#define PACK_FN(NAME, T, LANES)                                                                       \
    static void NAME(const T *x, int64_t K, int mbr, T *xp) {                                         \
        const int64_t chunks = (K + (LANES) - 1) / (LANES);                                           \
        for (int64_t c = 0; c < chunks; c++)                                                          \
            for (int i = 0; i < mbr; i++)                                                             \
                for (int l = 0; l < (LANES); l++) {                                                   \
                    const int64_t k = c * (LANES) + l;                                                \
                    xp[(c * mbr + i) * (LANES) + l] = k < K ? x[i * K + k] : (T)0;                    \
                }                                                                                     \
    }
PACK_FN(pack_rows, float, L)

#if defined(__AVX512BF16__)
/* bf16 activations against bf16 weights with the CPU's bf16 dot product (AVX512_BF16 vdpbf16ps: 32
   bf16 pairs per instruction, each product exact in fp32, summed into 16 fp32 lanes), where the fp32
   path above spends two widening instructions per 16 weights. x must be bf16 already (bf16 compute):
   nothing is rounded that the fp32 path keeps. Same blocking, so a row's bits do not depend on its
   batch either; its summation order differs from the fp32 path's (pairs first). */
#define LB 32        /* bf16 per vector */

static inline __attribute__((always_inline)) void row_dot_bf16(const uint16_t *xp, int64_t K, const uint16_t *w,
                                                                const int mbr, float *res) {
    const int64_t Kv = K - K % (LB * KS);
    __m512 acc[MB][KS];
#pragma GCC unroll 4
    for (int i = 0; i < mbr; i++)
#pragma GCC unroll 4
        for (int j = 0; j < KS; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kv; k += LB * KS) {
#pragma GCC unroll 4
        for (int j = 0; j < KS; j++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + k + j * LB));
            const uint16_t *xk = xp + (k + j * LB) * mbr;
#pragma GCC unroll 4
            for (int i = 0; i < mbr; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, (__m512bh)_mm512_loadu_si512((const void *)(xk + i * LB)));
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < mbr; i++) {
        __m512 a = acc[i][0];
#pragma GCC unroll 4
        for (int j = 1; j < KS; j++) a = _mm512_add_ps(a, acc[i][j]);
        float s = hsum((vf)a);
        for (int64_t k = Kv; k < K; k++) s += bf16_to_f(w[k]) * bf16_to_f(xp[(k / LB) * LB * mbr + i * LB + k % LB]);
        res[i] = s;
    }
}

#define ROWS_BF16_FN(MBR)                                                                             \
    static void rows_bf16_##MBR(const uint16_t *xp, int64_t K, const uint16_t *w, int64_t n0, int64_t n1, \
                                float *out, int64_t N) {                                              \
        for (int64_t n = n0; n < n1; n++) {                                                           \
            float res[MB];                                                                            \
            row_dot_bf16(xp, K, w + n * K, MBR, res);                                                 \
            for (int i = 0; i < MBR; i++) out[i * N + n] = res[i];                                    \
        }                                                                                             \
    }
ROWS_BF16_FN(1)
ROWS_BF16_FN(3)
ROWS_BF16_FN(4)

PACK_FN(pack_rows_bf16, uint16_t, LB)

#if defined(__AVX512VBMI__)
/* int8 weights (weight-only, one bf16 scale per output row) against bf16 activations through the same
   bf16 dot product. The fp32 path above spends two widening instructions per 16 codes and one FMA per
   16 codes and row, which bounds it below the memory's rate (warm weights, one thread, Zen 5: 49 GB/s
   of codes at one row per expert, 26 at two). Here 64 codes become two bf16 vectors in six
   instructions: |q| (vpabsb) looks up the low and the high byte of bf16(|q|) in two 128-byte tables
   (vpermi2b, AVX512_VBMI), the sign bit is or-ed into the high byte, and two byte unpacks interleave
   them into bf16 words; each vector then takes one vdpbf16ps per row (32 codes). Exact: |q| <= 127
   has 7 significant bits, a bf16 holds 8, and the products of a code and a bf16 activation are exact
   in fp32, so only the summation order (pairs of k first, as the bf16 weights' path) differs from the
   fp32 path. Codes must lie in [-127, 127] (reference.int8_weight_quant clamps there): -128 would
   read as -0. The unpacks interleave within 128-bit lanes, so the activations are packed in that
   order (pack_rows_i8bf16): bf16 lane w of vector h of a 64-code chunk holds code 16 (w / 8) + 8 h +
   w % 8. */
#define LQ 64        /* int8 codes per conversion (two bf16 vectors) */
#ifndef PFQ
#define PFQ (4 * PF) /* codes prefetched ahead */
#endif

/* bf16(v) for v = 0..127 as two 128-byte tables: low bytes, then high bytes */
static void i8_bf16_tables(uint8_t *tab) {
    for (int v = 0; v < 128; v++) {
        const float f = (float)v;
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        tab[v] = (uint8_t)(u >> 16);
        tab[128 + v] = (uint8_t)(u >> 24);
    }
}

static inline __attribute__((always_inline)) void widen_i8_bf16(const int8_t *p, const __m512i *t, __m512i *a,
                                                                __m512i *b) {
    const __m512i q = _mm512_loadu_si512((const void *)p);
    const __m512i m = _mm512_abs_epi8(q);
    const __m512i lo = _mm512_permutex2var_epi8(t[0], m, t[1]);
    /* hi | (q & 0x80): ternary logic 0xF8 = A | (B & C) */
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t[2], m, t[3]), q,
                                                 _mm512_set1_epi8((char)0x80), 0xF8);
    *a = _mm512_unpacklo_epi8(lo, hi);
    *b = _mm512_unpackhi_epi8(lo, hi);
}

/* one int8 weight row (K % 64 == 0) times mbr packed bf16 rows: [K / 64][2][mbr][32]. Two chunks of 64
   codes per iteration (four accumulators per row: at one row the dot product's latency, not the
   conversion, bounds a chain); an odd last chunk adds into the first two. */
static inline __attribute__((always_inline)) void row_dot_i8bf16(const uint16_t *xp, int64_t K, const int8_t *w,
                                                                  const __m512i *t, const int mbr, float *res) {
    __m512 acc[MB][4];
#pragma GCC unroll 4
    for (int i = 0; i < mbr; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    const int64_t K2 = K - K % (2 * LQ);
#define I8_CHUNK(KK, A, B)                                                                            \
    do {                                                                                              \
        __builtin_prefetch(w + (KK) + PFQ);                                                           \
        __m512i wa, wb;                                                                               \
        widen_i8_bf16(w + (KK), t, &wa, &wb);                                                         \
        const uint16_t *xk = xp + (KK) * mbr;                                                         \
        _Pragma("GCC unroll 4") for (int i = 0; i < mbr; i++) {                                       \
            acc[i][A] = _mm512_dpbf16_ps(acc[i][A], (__m512bh)wa,                                     \
                                         (__m512bh)_mm512_loadu_si512((const void *)(xk + i * LB)));  \
            acc[i][B] = _mm512_dpbf16_ps(acc[i][B], (__m512bh)wb,                                     \
                                         (__m512bh)_mm512_loadu_si512((const void *)(xk + (mbr + i) * LB))); \
        }                                                                                             \
    } while (0)
    for (int64_t k = 0; k < K2; k += 2 * LQ) {
        I8_CHUNK(k, 0, 1);
        I8_CHUNK(k + LQ, 2, 3);
    }
    if (K2 < K) I8_CHUNK(K2, 0, 1);
#undef I8_CHUNK
#pragma GCC unroll 4
    for (int i = 0; i < mbr; i++)
        res[i] = hsum((vf)_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
}

#define ROWS_I8BF16_FN(MBR)                                                                           \
    static void rows_i8bf16_##MBR(const uint16_t *xp, int64_t K, const int8_t *w, const uint16_t *scale, \
                                  const uint8_t *tab, int64_t n0, int64_t n1, float *out, int64_t N) { \
        __m512i t[4];                                                                                 \
        for (int j = 0; j < 4; j++) t[j] = _mm512_loadu_si512((const void *)(tab + 64 * j));          \
        for (int64_t n = n0; n < n1; n++) {                                                           \
            float res[MB];                                                                            \
            row_dot_i8bf16(xp, K, w + n * K, t, MBR, res);                                            \
            const float sc = bf16_to_f(scale[n]);                                                     \
            for (int i = 0; i < MBR; i++) out[i * N + n] = res[i] * sc;                               \
        }                                                                                             \
    }
ROWS_I8BF16_FN(1)
ROWS_I8BF16_FN(2)
ROWS_I8BF16_FN(3)
ROWS_I8BF16_FN(4)

/* mbr bf16 rows (K % 64 == 0) into [K / 64][2][mbr][32] in the unpack order above */
static void pack_rows_i8bf16(const uint16_t *x, int64_t K, int mbr, uint16_t *xp) {
    for (int64_t c = 0; c < K / LQ; c++)
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < mbr; i++)
                for (int wl = 0; wl < LB; wl++)
                    xp[((c * 2 + h) * mbr + i) * LB + wl] = x[i * K + c * LQ + 16 * (wl / 8) + 8 * h + wl % 8];
}
#endif
#endif

/* The one driver of both entries. x_PK: rows sorted by expert, fp32 (x_bf16 = 0) or, where built,
   bf16 (x_bf16 = 1: the dot-product path, bf16 weights); for active expert j: rows [start[j], start[j]
   + count[j]) use weight slot expert[j] of w_ENK (format wt: W_F32, W_BF16, or W_I8 with the bf16
   row scales scale_EN; the bf16 entry takes bf16 only); out_PN fp32. xp_scratch:
   P * (K rounded up to the path's lanes) elements of x's type. */
static void grouped(const void *x_PK, int x_bf16, int64_t K, const int64_t *start, const int64_t *count,
                    const int64_t *expert, int64_t n_active, const void *w_ENK, int wt,
                    const uint16_t *scale_EN, int64_t N, float *out_PN, void *xp_scratch, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
    const int i8dot = x_bf16 && wt == W_I8;  /* int8 codes through the bf16 dot product (K % 64 == 0) */
    uint8_t tab[256] __attribute__((aligned(64)));
    if (i8dot) i8_bf16_tables(tab);
    const int64_t lanes = i8dot ? LQ : x_bf16 ? LB : L;
#elif defined(__AVX512BF16__)
    const int i8dot = 0;
    const int64_t lanes = x_bf16 ? LB : L;
#else
    const int i8dot = 0;
    const int64_t lanes = L;
#endif
    const int64_t Kp = (K + lanes - 1) / lanes * lanes;
    const size_t esize = wt == W_F32 ? 4 : wt == W_BF16 ? 2 : 1, xsize = x_bf16 ? 2 : 4;
    const int64_t row_bytes = K * (int64_t)esize;
    const int64_t nbr = row_bytes * NB >= ITEMB ? NB : ITEMB / row_bytes;  /* weight rows per work item */
    const int64_t blocks = (N + nbr - 1) / nbr;
    /* every (expert, block of MB rows) packed once: block of rows [start + m0, ...) at (start + m0) * Kp */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n_active; j++)
            for (int64_t m0 = 0, mbr = 0; m0 < count[j]; m0 += mbr) {
                mbr = i8dot ? BLK_I8(count[j] - m0) : blk(count[j] - m0);
                const int64_t r = start[j] + m0;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
                if (i8dot) {
                    pack_rows_i8bf16((const uint16_t *)x_PK + r * K, K, mbr, (uint16_t *)xp_scratch + r * Kp);
                    continue;
                }
#endif
#if defined(__AVX512BF16__)
                if (x_bf16) {
                    pack_rows_bf16((const uint16_t *)x_PK + r * K, K, mbr, (uint16_t *)xp_scratch + r * Kp);
                    continue;
                }
#endif
                pack_rows((const float *)x_PK + r * K, K, mbr, (float *)xp_scratch + r * Kp);
            }
/* dynamic: a thread that another process preempts (the serving replica, on a shared CPU) leaves its
   items to the others instead of holding the whole region up (measured at 16-row items: 5.6 vs 6.7 ms
   for a layer's w13 at 2 rows per expert beside a 33%-busy neighbour, the same when quiet) */
#pragma omp for schedule(dynamic, CHUNK)
        for (int64_t it = 0; it < n_active * blocks; it++) {
            const int64_t j = it / blocks, b = it % blocks;
            const int64_t n0 = b * nbr, n1 = n0 + nbr < N ? n0 + nbr : N;
            const void *w = (const char *)w_ENK + (size_t)expert[j] * (size_t)N * (size_t)K * esize;
            const uint16_t *sc = wt == W_I8 ? scale_EN + (size_t)expert[j] * (size_t)N : 0;
            for (int64_t m0 = 0, mbr = 0; m0 < count[j]; m0 += mbr) {
                mbr = i8dot ? BLK_I8(count[j] - m0) : blk(count[j] - m0);
                const void *xp = (const char *)xp_scratch + (size_t)((start[j] + m0) * Kp) * xsize;
                float *o = out_PN + (start[j] + m0) * N;
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
                if (i8dot) {
                    switch (mbr) {
                    case 1: rows_i8bf16_1(xp, K, w, sc, tab, n0, n1, o, N); break;
                    case 2: rows_i8bf16_2(xp, K, w, sc, tab, n0, n1, o, N); break;
                    case 3: rows_i8bf16_3(xp, K, w, sc, tab, n0, n1, o, N); break;
                    default: rows_i8bf16_4(xp, K, w, sc, tab, n0, n1, o, N);
                    }
                    continue;
                }
#endif
#if defined(__AVX512BF16__)
                if (x_bf16) {
                    switch (mbr) {  /* 1, 3 or 4 (blk) */
                    case 1: rows_bf16_1(xp, K, w, n0, n1, o, N); break;
                    case 3: rows_bf16_3(xp, K, w, n0, n1, o, N); break;
                    default: rows_bf16_4(xp, K, w, n0, n1, o, N);
                    }
                    continue;
                }
#endif
                switch (mbr) {
                case 1: rows_1(xp, K, w, wt, sc, n0, n1, o, N); break;
                case 3: rows_3(xp, K, w, wt, sc, n0, n1, o, N); break;
                default: rows_4(xp, K, w, wt, sc, n0, n1, o, N);
                }
            }
        }
    }
}

/* fp32 x_PK; weights w_ENK in format wt (0 fp32, 1 bf16, 2 int8 with bf16 row scales scale_EN [E, N];
   read only for int8), widened in registers; xp_scratch: P * (K rounded up to L) floats. */
void grouped_gemv(const float *x_PK, int64_t K, const int64_t *start, const int64_t *count,
                  const int64_t *expert, int64_t n_active, const void *w_ENK, int wt, const uint16_t *scale_EN,
                  int64_t N, float *out_PN, float *xp_scratch, int nthreads) {
    grouped(x_PK, 0, K, start, count, expert, n_active, w_ENK, wt, scale_EN, N, out_PN, xp_scratch, nthreads);
}

#if defined(__AVX512BF16__)
/* bf16 x_PK and bf16 w_ENK through the dot product; xp_scratch: P * (K rounded up to 32) bf16 */
void grouped_gemv_bf16(const uint16_t *x_PK, int64_t K, const int64_t *start, const int64_t *count,
                       const int64_t *expert, int64_t n_active, const uint16_t *w_ENK, int64_t N,
                       float *out_PN, uint16_t *xp_scratch, int nthreads) {
    grouped(x_PK, 1, K, start, count, expert, n_active, w_ENK, W_BF16, 0, N, out_PN, xp_scratch, nthreads);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
/* bf16 x_PK against int8 codes w_ENK (in [-127, 127], K % 64 == 0) with their bf16 row scales, through
   the bf16 dot product; xp_scratch: P * K bf16 */
void grouped_gemv_i8bf16(const uint16_t *x_PK, int64_t K, const int64_t *start, const int64_t *count,
                         const int64_t *expert, int64_t n_active, const int8_t *w_ENK, const uint16_t *scale_EN,
                         int64_t N, float *out_PN, uint16_t *xp_scratch, int nthreads) {
    grouped(x_PK, 1, K, start, count, expert, n_active, w_ENK, W_I8, scale_EN, N, out_PN, xp_scratch, nthreads);
}
#endif

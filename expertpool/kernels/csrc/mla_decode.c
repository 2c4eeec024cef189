/* Absorbed-MLA decode attention over the paged latent cache on CPU (expertpool.kernels.cpu_attention).

   For each decode row b and head h, over the row's context t < lens[b] (slot of t =
   table[b, t / bs] * bs + t % bs, each cache slot [C latent | R rope] values):
       s[t] = (q_abs[b, h] . c_t + q_pe[b, h] . k_pe_t) * scale
       p    = softmax(s)                     (fp32)
       out[b, h] = sum_t p[t] c_t            (fp32 sums, stored in q's dtype)
   The torch path gathers every context padded to the step's longest into a new tensor, then runs two
   batched GEMMs (whose bf16 outputs round the scores before the softmax) and five elementwise ops; at a
   decode batch that costs ~0.4 ms per layer on bench-mini where the bytes read allow a tenth of it. Here
   a work item is one row and HG heads, in one pass over its context (flash-decoding's running max and
   sum): per tile of TT context rows, read in place through the block table, the HG scores, then the
   weighted sum of the tile while its rows are in L1/L2; the next tile's rows are fetched into L2 during
   that sum, which is bound by the fp32 FMA, so the memory streams under it. Scores and probabilities
   stay fp32; with bf16 queries and cache on AVX512_BF16 the scores take the bf16 dot product (each
   product exact in fp32, half the instructions of widening to fp32). Nothing is allocated per step but
   a scratch per thread. A row's result does not depend on the other rows of the batch or their lengths
   (each item is summed in one fixed order by one thread), so a decode row comes out the same in any
   batch.

   q and the cache are each fp32 or bf16 (bf16 widened in registers); out has q's dtype. */

#include <math.h>
#include <stdlib.h>

#include "vec.h"

#define HG 8  /* heads per work item: their scores share one read of each context row, and their HG
                 accumulators stay in registers (AVX2's 16 included) */

static inline vf load_vec(const void *p, int bf16, int64_t i) {
    return bf16 ? widen_bf16((const uint16_t *)p + i) : *(const vf *)((const float *)p + i);
}

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static inline float load_one(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* scores of context rows t0 .. t0 + NR - 1 for the HG heads: per head the lanes over X, the lane
   tree, then the scalar tail; NR rows share each load of the query */
#define SCORES_FN(NAME, NR)                                                                           \
    static inline __attribute__((always_inline)) void NAME(const char **rows, int c_bf16, const float *qf, \
                                                           int64_t X, int64_t XS, int64_t t0, int64_t T, float scale, \
                                                           float *pt) {                               \
        const int64_t Xv = X - X % L;                                                                 \
        vf acc[NR][HG];                                                                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++)                                          \
            _Pragma("GCC unroll 8") for (int h = 0; h < HG; h++) acc[r][h] = (vf){0};                 \
        for (int64_t k = 0; k < Xv; k += L) {                                                         \
            vf c[NR];                                                                                 \
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) c[r] = load_vec(rows[t0 + r], c_bf16, k); \
            _Pragma("GCC unroll 8") for (int h = 0; h < HG; h++) {                                    \
                const vf q = *(const vf *)(qf + h * XS + k);                                           \
                _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) acc[r][h] += c[r] * q;           \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < NR; r++)                                                                  \
            for (int h = 0; h < HG; h++) {                                                            \
                float s = hsum(acc[r][h]);                                                            \
                for (int64_t k = Xv; k < X; k++) s += load_one(rows[t0 + r], c_bf16, k) * qf[h * XS + k]; \
                pt[h * T + t0 + r] = s * scale;                                                       \
            }                                                                                         \
    }
SCORES_FN(scores_1, 1)
SCORES_FN(scores_2, 2)

#define TT 64 /* context rows per tile: scored, then summed while they are in L1/L2 (72 KB of bf16
                 bench-mini / DeepSeek-V3 rows), so each row comes from memory once */
#if L == 16
#define PC 2 /* latent chunks per pass of the weighted sum: HG x PC accumulators (AVX-512 has 32 registers) */
#else
#define PC 1
#endif

/* chunk c0 of a row's latent (PC vectors) as fp32 for the weighted sum. bf16 on AVX-512 (PC = 2): the
   32 channels' even ones, then their odd ones (one load, a shift and a mask: a bf16 is the top half of
   an fp32; widening in order takes two zero-extends and two shifts, which share ports with the FMAs);
   the sums of a chunk are kept in that order and put back in order once, at the end (unpermute) */
static inline __attribute__((always_inline)) void load_chunk(vf *v, const char *row, const int c_bf16, int64_t c0) {
#if L == 16
    if (c_bf16) {
        const __m512i x = _mm512_loadu_si512((const void *)((const uint16_t *)row + c0));
        v[0] = (vf)_mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        v[1] = (vf)_mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xffff0000u)));
        return;
    }
#endif
    for (int j = 0; j < PC; j++) v[j] = load_vec(row, c_bf16, c0 + j * L);
}

#if L == 16
/* channels half .. half + 15 (half: 0 or 16) of a chunk that load_chunk split into even and odd */
static inline vf unpermute(const float *chunk, int64_t half) {
    const int h8 = half ? 8 : 0;
    const __m512i idx = _mm512_set_epi32(16 + h8 + 7, h8 + 7, 16 + h8 + 6, h8 + 6, 16 + h8 + 5, h8 + 5, 16 + h8 + 4,
                                         h8 + 4, 16 + h8 + 3, h8 + 3, 16 + h8 + 2, h8 + 2, 16 + h8 + 1, h8 + 1,
                                         16 + h8, h8);
    return (vf)_mm512_permutex2var_ps(_mm512_loadu_ps(chunk), idx, _mm512_loadu_ps(chunk + 16));
}
#endif

/* the cache rows of context positions t0 .. t0 + n - 1 of the row whose block-table row is table_b:
   one division per block of bs positions, not per position */
static inline void fill_rows(const char **rows, const char *cache, const int32_t *table_b, int64_t t0, int64_t n,
                             int64_t bs, size_t row_bytes) {
    for (int64_t i = 0, t = t0; i < n;) {
        const char *block = cache + (int64_t)table_b[t / bs] * bs * (int64_t)row_bytes;
        for (int64_t o = t % bs; o < bs && i < n; o++, i++, t++) rows[i] = block + o * (int64_t)row_bytes;
    }
}

#if defined(__AVX512BF16__)
/* 16 vectors to one: lane 4k + j holds the sum of v[4j + k], in a fixed order (four levels of
   128-bit and in-lane shuffles, 45 instructions for the 16 sums where one reduction each takes ~7) */
static inline __m512 sum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)  /* quarters: v[2i] lanes 0-3 + 8-11, 4-7 + 12-15, then v[2i+1]'s */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)  /* quarter k: 4 partial lanes of v[4i + k] */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)  /* quarter k: 2 lanes of v[8i + k], 2 of v[8i + 4 + k] */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* the bf16 dot product of n <= 32 elements onto acc for two rows (zeros past n on the query side) */
static inline __attribute__((always_inline)) void dp_step(__m512 acc[2][HG], const uint16_t *r0, const uint16_t *r1,
                                                           const uint16_t *const *q, int64_t k, int64_t n) {
    const __mmask32 m = n >= 32 ? 0xffffffffu : (1u << n) - 1;
    const __m512bh c0 = (__m512bh)_mm512_maskz_loadu_epi16(m, r0 + k), c1 = (__m512bh)_mm512_maskz_loadu_epi16(m, r1 + k);
#pragma GCC unroll 8
    for (int h = 0; h < HG; h++) {
        const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, q[h] + k);
        acc[0][h] = _mm512_dpbf16_ps(acc[0][h], c0, qv);
        acc[1][h] = _mm512_dpbf16_ps(acc[1][h], c1, qv);
    }
}

/* bf16 queries and cache: the scores of tile rows i, i + 1 (i + 1 < n) or row i alone for the HG
   heads with vdpbf16ps (each product of two bf16 exact in fp32, sums in fp32: the precision of the
   widening path, half its instructions), 32 elements at a time over the latent (qa) and the rope
   part (qp) */
static inline void scores_dp(const char **rows, int64_t i, int64_t n, const uint16_t *const *qa,
                             const uint16_t *const *qp, int64_t C, int64_t R, float scale, float *pt) {
    const uint16_t *r0 = (const uint16_t *)rows[i], *r1 = (const uint16_t *)rows[i + 1 < n ? i + 1 : i];
    __m512 acc[2][HG];
#pragma GCC unroll 8
    for (int h = 0; h < HG; h++) acc[0][h] = acc[1][h] = _mm512_setzero_ps();
    for (int64_t k = 0; k < C; k += 32) dp_step(acc, r0, r1, qa, k, C - k);
    for (int64_t k = 0; k < R; k += 32) dp_step(acc, r0 + C, r1 + C, qp, k, R - k);
    float s[16];
    _mm512_storeu_ps(s, _mm512_mul_ps(sum16(&acc[0][0]), _mm512_set1_ps(scale)));
    for (int v = 0; v < 2 * HG; v++) {  /* v = row * HG + head sits in lane 4 (v % 4) + v / 4 */
        const int r = v / HG, h = v % HG;
        if (i + r < n) pt[h * TT + i + r] = s[4 * (v % 4) + v / 4];
    }
}
#define HAVE_DP 1
#else
#define HAVE_DP 0
#endif

/* One item: row b, heads h0 .. h0 + nh - 1 (nh <= HG), in one pass over its context, TT rows at a
   time: the tile's scores, then per head the running max m and sum l of the exponentials (the tile's
   probabilities relative to the new max, the sums so far rescaled by e^(m_old - m_new)), then the
   weighted latent of the tile onto the fp32 accumulators oa (rescaled alike as they are loaded); at
   the end oa / l. Scratch: qf [HG][XS] fp32 (heads past nh are zeros and their results dropped, so
   every item runs the same register-resident loops), pt [HG][TT] scores then exponentials, rows
   [2][TT] the row pointers of this tile and the next, oa [HG][CS] (XS, CS: X and C rounded up to
   whole vectors). Inlined per dtype pair (the flags are constants there). */
static inline __attribute__((always_inline)) void item(
        const void *q_abs, const void *q_pe, const int q_bf16, const char *cache, const int c_bf16,
        const int32_t *table, int64_t M, int64_t T, int64_t b, int64_t h0, int64_t nh, int64_t H, int64_t C,
        int64_t R, int64_t bs, float scale, void *out, float *qf, float *pt, const char **rows, float *oa) {
    const int64_t X = C + R, XS = round_up(X, L), CS = round_up(C, L), Cv = C - C % (L * PC);
    const size_t row_bytes = (size_t)X * (c_bf16 ? 2 : 4);
#if HAVE_DP
    const int dp = q_bf16 && c_bf16;
    const uint16_t *qa[HG], *qp[HG];
    if (dp)
        for (int64_t h = 0; h < HG; h++) {  /* heads past nh read head h0's query; their results are dropped */
            const int64_t qrow = b * H + h0 + (h < nh ? h : 0);
            qa[h] = (const uint16_t *)q_abs + qrow * C;
            qp[h] = (const uint16_t *)q_pe + qrow * R;
        }
#else
    const int dp = 0;
#endif
    if (!dp) {
        memset(qf, 0, sizeof(float) * HG * XS);
        for (int64_t h = 0; h < nh; h++) {
            const int64_t qrow = b * H + h0 + h;
            for (int64_t k = 0; k < C; k++) qf[h * XS + k] = load_one(q_abs, q_bf16, qrow * C + k);
            for (int64_t k = 0; k < R; k++) qf[h * XS + C + k] = load_one(q_pe, q_bf16, qrow * R + k);
        }
    }
    float m[HG], l[HG], alpha[HG];
    for (int h = 0; h < HG; h++) m[h] = -INFINITY, l[h] = 0.0f;

    for (int64_t t0 = 0; t0 < T; t0 += TT) {
        const int64_t n = T - t0 < TT ? T - t0 : TT, nv = n - n % L;
        const char **cur = rows + (t0 / TT % 2) * TT, **nxt = rows + (t0 / TT % 2 ? 0 : TT);
        if (!t0)
            fill_rows(cur, cache, table + b * M, 0, n, bs, row_bytes);
        /* later tiles were fetched into L2 while the tile before them was summed (prefetching the
           first tile's rows ahead of the scores measured slower than the demand loads) */
        int64_t i = 0;
#if HAVE_DP
        if (dp)
            for (; i < n; i += 2) scores_dp(cur, i, n, qa, qp, C, R, scale, pt);
#endif
        for (; i + 2 <= n; i += 2) scores_2(cur, c_bf16, qf, X, XS, i, TT, scale, pt);
        if (i < n) scores_1(cur, c_bf16, qf, X, XS, i, TT, scale, pt);

        /* per head: the new max, the tile's exponentials against it, the sum rescaled; heads past nh
           get zeros (their accumulators stay zero) */
        for (int64_t h = 0; h < HG; h++) {
            float *ph = pt + h * TT;
            if (h >= nh) {
                memset(ph, 0, sizeof(float) * n);
                alpha[h] = 0.0f;
                continue;
            }
            float mn = m[h];
            for (int64_t j = 0; j < n; j++) mn = ph[j] > mn ? ph[j] : mn;  /* fmaxf is a libm call here */
            alpha[h] = expf(m[h] - mn);  /* 0 on the first tile (m = -inf) */
            vf vs = (vf){0};
            for (int64_t j = 0; j < nv; j += L) {
                const vf e = vexp(*(vf *)(ph + j) - mn);
                *(vf *)(ph + j) = e;
                vs += e;
            }
            float tail[L] = {0};
            for (int64_t j = nv; j < n; j++) tail[j - nv] = ph[j] - mn;
            vf te;
            memcpy(&te, tail, sizeof te);
            te = vexp(te);
            memcpy(tail, &te, sizeof te);
            float s = hsum(vs);
            for (int64_t j = nv; j < n; j++) s += ph[j] = tail[j - nv];
            l[h] = l[h] * alpha[h] + s;
            m[h] = mn;
        }

        /* the weighted latent of the tile, acc[h][c] = alpha[h] oa[h][c] + sum_t e[h][t] c_t[c] in t
           order: per PC chunks of C the HG x PC accumulators in registers, the tile's rows read from
           L1/L2 once per chunk pass */
        const int64_t nn = T - t0 - TT < TT ? T - t0 - TT : TT, passes = Cv / (L * PC);  /* nn <= 0: last tile */
        if (nn > 0) fill_rows(nxt, cache, table + b * M, t0 + TT, nn, bs, row_bytes);
        /* the next tile's lines into L2, spread evenly over the sum's row steps (bursts stall on the
           misses in flight) */
        const int64_t lines = (int64_t)(row_bytes + 63) / 64;
        const int64_t per_step = nn > 0 && passes ? (nn * lines + passes * n - 1) / (passes * n) : 0;
        int64_t pr = 0, pl = 0;  /* the next line to fetch: row pr, line pl */
        for (int64_t c0 = 0; c0 < Cv; c0 += L * PC) {
            vf acc[HG][PC];
#pragma GCC unroll 8
            for (int h = 0; h < HG; h++)
#pragma GCC unroll 2
                for (int j = 0; j < PC; j++) acc[h][j] = (t0 ? *(const vf *)(oa + h * CS + c0 + j * L) : (vf){0}) * alpha[h];
            for (int64_t r = 0; r < n; r++) {
                for (int64_t f = 0; f < per_step && pr < nn; f++) {
                    __builtin_prefetch(nxt[pr] + pl * 64, 0, 2);
                    if (++pl == lines) pl = 0, pr++;
                }
                vf v[PC];
                load_chunk(v, cur[r], c_bf16, c0);
#pragma GCC unroll 8
                for (int h = 0; h < HG; h++) {
                    const float p = pt[h * TT + r];
#pragma GCC unroll 2
                    for (int j = 0; j < PC; j++) acc[h][j] += v[j] * p;
                }
            }
#pragma GCC unroll 8
            for (int h = 0; h < HG; h++)
#pragma GCC unroll 2
                for (int j = 0; j < PC; j++) *(vf *)(oa + h * CS + c0 + j * L) = acc[h][j];
        }
        for (int64_t c = Cv; c < C; c++)
            for (int64_t h = 0; h < HG; h++) {
                float a = t0 ? oa[h * CS + c] * alpha[h] : 0.0f;
                for (int64_t r = 0; r < n; r++) a += pt[h * TT + r] * load_one(cur[r], c_bf16, c);
                oa[h * CS + c] = a;
            }
    }
    for (int64_t h = 0; h < nh; h++) {
        const float inv = 1.0f / l[h];
        for (int64_t c = 0; c < C; c += L) {
            const int64_t n = C - c < L ? C - c : L;
            vf o = load_n(oa + h * CS + c, n);
#if L == 16
            if (c_bf16 && c < Cv) o = unpermute(oa + h * CS + c - c % 32, c % 32);
#endif
            store_n(out, q_bf16, (b * H + h0 + h) * C + c, o * inv, n);
        }
    }
}

/* item() with its two dtype flags made constants: four specialized copies */
static void item_any(const void *q_abs, const void *q_pe, int q_bf16, const char *cache, int c_bf16,
                     const int32_t *table, int64_t M, int64_t T, int64_t b, int64_t h0, int64_t nh, int64_t H,
                     int64_t C, int64_t R, int64_t bs, float scale, void *out, float *qf, float *pt,
                     const char **rows, float *oa) {
#define ITEM(QB, CB) item(q_abs, q_pe, QB, cache, CB, table, M, T, b, h0, nh, H, C, R, bs, scale, out, qf, pt, rows, oa)
    if (q_bf16 && c_bf16) ITEM(1, 1);
    else if (q_bf16) ITEM(1, 0);
    else if (c_bf16) ITEM(0, 1);
    else ITEM(0, 0);
#undef ITEM
}

static void *scratch(size_t bytes) { return aligned_alloc(64, (size_t)round_up((int64_t)bytes, 64)); }

/* q_abs [B, H, C], q_pe [B, H, R] (q_bf16: bf16, else fp32), cache [P, C + R] (c_bf16), table [B, M]
   and lens [B] int32, out [B, H, C] in q's dtype. Returns 0; -1 where the scratch could not be
   allocated (out is then incomplete); -2, before reading anything, where a length is not in
   [1, M * bs] or a block the lengths reach is not in [0, P / bs). */
int mla_decode(const void *q_abs, const void *q_pe, int q_bf16, const void *cache, int c_bf16, int64_t P,
               const int32_t *table, int64_t M, const int32_t *lens, int64_t B, int64_t H, int64_t C, int64_t R,
               int64_t bs, float scale, void *out, int nthreads) {
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > M * bs) return -2;
        for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; j++)
            if (table[b * M + j] < 0 || table[b * M + j] >= P / bs) return -2;
    }
    const int64_t groups = (H + HG - 1) / HG, items = B * groups;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* 64-byte aligned, each query row at a whole number of vectors: no vector load splits a line */
        float *qf = scratch(sizeof(float) * HG * round_up(C + R, L));
        float *pt = scratch(sizeof(float) * HG * TT);
        const char **rows = scratch(sizeof(char *) * 2 * TT);
        float *oa = scratch(sizeof(float) * HG * round_up(C, L));
        if (!qf || !pt || !rows || !oa) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            /* items of unequal lengths: handed out one at a time; each is computed whole by one thread */
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < items; i++) {
                const int64_t b = i / groups, h0 = (i % groups) * HG;
                const int64_t nh = H - h0 < HG ? H - h0 : HG;
                item_any(q_abs, q_pe, q_bf16, (const char *)cache, c_bf16, table, M, lens[b], b, h0, nh, H, C, R,
                         bs, scale, out, qf, pt, rows, oa);
            }
        }
        free(qf);
        free(pt);
        free(rows);
        free(oa);
    }
    return failed ? -1 : 0;
}

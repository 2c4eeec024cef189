/* Absorbed-MLA decode attention over the paged latent cache on CPU (expertpool.kernels.cpu_attention).

   For each decode row b and head h, over the row's context t < lens[b] (slot of t =
   table[b, t / bs] * bs + t % bs, each cache slot [C latent | R rope] values):
       s[t] = (q_abs[b, h] . c_t + q_pe[b, h] . k_pe_t) * scale
       p    = softmax(s)                     (fp32)
       out[b, h] = sum_t p[t] c_t            (fp32 sums, stored in q's dtype)
   The torch path gathers every context padded to the step's longest into a new tensor, then runs two
   batched GEMMs (whose bf16 outputs round the scores before the softmax) and five elementwise ops; at a
   decode batch that costs ~0.4 ms per layer on bench-mini where the bytes read allow a tenth of it. Here
   a work item is one row and HG heads: each context row is read in place, once for the HG scores and
   once per C-chunk for the weighted sum, the scores and probabilities stay fp32, and nothing is
   allocated per step but a scratch per thread. A row's result does not depend on the other rows of
   the batch or their lengths (each item is summed in one fixed order by one thread), so a decode row
   comes out the same in any batch.

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

#define TT 64 /* context rows per tile of the weighted sum: 72 KB of bf16 bench-mini / DeepSeek-V3 rows */
#if L == 16
#define PC 2 /* latent chunks per pass of the weighted sum: HG x PC accumulators (AVX-512 has 32 registers) */
#else
#define PC 1
#endif

/* One item: row b, heads h0 .. h0 + nh - 1 (nh <= HG). Scratch: qf [HG][XS] fp32 (heads past nh are
   zeros and their results dropped, so every item runs the same register-resident loops), pt [HG][T]
   scores then probabilities, rows [T] context row pointers, oa [HG][CS] the fp32 output (XS, CS: X
   and C rounded up to whole vectors). Inlined per dtype pair (the flags are constants there). */
static inline __attribute__((always_inline)) void item(
        const void *q_abs, const void *q_pe, const int q_bf16, const char *cache, const int c_bf16,
        const int32_t *table, int64_t M, int64_t T, int64_t b, int64_t h0, int64_t nh, int64_t H, int64_t C,
        int64_t R, int64_t bs, float scale, void *out, float *qf, float *pt, const char **rows, float *oa) {
    const int64_t X = C + R, XS = round_up(X, L), CS = round_up(C, L), Tv = T - T % L, Cv = C - C % (L * PC);
    const size_t row_bytes = (size_t)X * (c_bf16 ? 2 : 4);
    memset(qf, 0, sizeof(float) * HG * XS);
    for (int64_t h = 0; h < nh; h++) {
        const int64_t qrow = b * H + h0 + h;
        for (int64_t k = 0; k < C; k++) qf[h * XS + k] = load_one(q_abs, q_bf16, qrow * C + k);
        for (int64_t k = 0; k < R; k++) qf[h * XS + C + k] = load_one(q_pe, q_bf16, qrow * R + k);
    }
    for (int64_t t = 0; t < T; t++)
        rows[t] = cache + ((int64_t)table[b * M + t / bs] * bs + t % bs) * row_bytes;

    int64_t t = 0;
    for (; t + 2 <= T; t += 2) scores_2(rows, c_bf16, qf, X, XS, t, T, scale, pt);
    if (t < T) scores_1(rows, c_bf16, qf, X, XS, t, T, scale, pt);

    /* softmax per head in fp32, L positions at a time; heads past nh get zeros */
    for (int64_t h = 0; h < HG; h++) {
        float *ph = pt + h * T;
        if (h >= nh) {
            memset(ph, 0, sizeof(float) * T);
            continue;
        }
        float m = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < T; i++) m = fmaxf(m, ph[i]);
        vf vs = (vf){0};
        for (int64_t i = 0; i < Tv; i += L) {
            const vf e = vexp(*(vf *)(ph + i) - m);
            *(vf *)(ph + i) = e;
            vs += e;
        }
        float tail[L] = {0};
        for (int64_t i = Tv; i < T; i++) tail[i - Tv] = ph[i] - m;
        vf te;
        memcpy(&te, tail, sizeof te);
        te = vexp(te);
        memcpy(tail, &te, sizeof te);
        for (int64_t i = Tv; i < T; i++) ph[i] = tail[i - Tv];
        sum = hsum(vs);
        for (int64_t i = Tv; i < T; i++) sum += ph[i];
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < T; i++) ph[i] *= inv;
    }

    /* the weighted latent, acc[h][c] = sum_t p[h][t] c_t[c] in t order: over tiles of TT context rows
       (read from L1/L2 once per chunk pass, however long the context), per PC chunks of C the HG x PC
       accumulators in registers, carried between tiles in the fp32 scratch oa [HG][C] */
    for (int64_t t0 = 0; t0 < T; t0 += TT) {
        const int64_t t1 = t0 + TT < T ? t0 + TT : T;
        for (int64_t c0 = 0; c0 < Cv; c0 += L * PC) {
            vf acc[HG][PC];
#pragma GCC unroll 8
            for (int h = 0; h < HG; h++)
#pragma GCC unroll 2
                for (int j = 0; j < PC; j++) acc[h][j] = t0 ? *(const vf *)(oa + h * CS + c0 + j * L) : (vf){0};
            for (int64_t i = t0; i < t1; i++) {
                vf v[PC];
#pragma GCC unroll 2
                for (int j = 0; j < PC; j++) v[j] = load_vec(rows[i], c_bf16, c0 + j * L);
#pragma GCC unroll 8
                for (int h = 0; h < HG; h++) {
                    const float p = pt[h * T + i];
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
                float a = t0 ? oa[h * CS + c] : 0.0f;
                for (int64_t i = t0; i < t1; i++) a += pt[h * T + i] * load_one(rows[i], c_bf16, c);
                oa[h * CS + c] = a;
            }
    }
    for (int64_t h = 0; h < nh; h++)
        for (int64_t c = 0; c < C; c += L) {
            const int64_t n = C - c < L ? C - c : L;
            store_n(out, q_bf16, (b * H + h0 + h) * C + c, load_n(oa + h * CS + c, n), n);
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
    int64_t T_max = 1;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > M * bs) return -2;
        for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; j++)
            if (table[b * M + j] < 0 || table[b * M + j] >= P / bs) return -2;
        T_max = lens[b] > T_max ? lens[b] : T_max;
    }
    const int64_t groups = (H + HG - 1) / HG, items = B * groups;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* 64-byte aligned, each query row at a whole number of vectors: no vector load splits a line */
        float *qf = scratch(sizeof(float) * HG * round_up(C + R, L));
        float *pt = scratch(sizeof(float) * HG * T_max);
        const char **rows = scratch(sizeof(char *) * T_max);
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

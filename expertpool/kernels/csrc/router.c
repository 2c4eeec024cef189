/* DeepSeek-V3's router for a few rows on CPU in one call (expertpool.kernels.cpu_router).

   In torch the router is ~17 ops per MoE layer (widen, the fp32 GEMM, sigmoid, bias, group top-2,
   group top-k, mask, top-k, gather, normalize, scale), each costing more to dispatch than to compute
   at a decode batch. Here, per row:
     logits[e] = sum_d x[d] * W[e, d]           fp32 (bf16 x widened exactly), one accumulator of L
                                                lanes per (row, expert) and a fixed lane tree: a row's
                                                logits do not depend on its batch
     score[e]  = 1 / (1 + exp(-logits[e]))      sigmoid
     choice[e] = score[e] + bias[e]             selection only
     group g   = sum of its two largest choices; the topk_group best groups are kept
     ids       = the top_k largest choices among the kept groups, in descending order (ties: the
                 lower index first)
     weights   = score[ids] / (sum + 1e-20) (norm_topk, top_k > 1), times scale.
   Work is split over experts for the logits and over rows for the selection. */

#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "vec.h"

#define RT 4         /* rows x experts per register tile */
#define NE 4

static inline int better(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

/* indices of the k largest of v[0..n) (descending, ties: lower index first) into out */
static void top(const float *v, int64_t n, int64_t k, int64_t *out) {
    for (int64_t j = 0; j < k; j++) out[j] = -1;
    for (int64_t i = 0; i < n; i++) {
        if (v[i] == -INFINITY) continue;
        int64_t j = k;
        while (j > 0 && (out[j - 1] < 0 || better(v[i], i, v[out[j - 1]], out[j - 1]))) j--;
        if (j < k) {
            for (int64_t m = k - 1; m > j; m--) out[m] = out[m - 1];
            out[j] = i;
        }
    }
}

/* v[i] = 1 / (1 + e^-v[i]) in place, from e = e^-|v| <= 1 (vexp, ~1 ulp): 1 / (1 + e) where v >= 0,
   e / (1 + e) below */
static void sigmoid(float *v, int64_t n) {
    const int64_t nv = n - n % L;
    for (int64_t i = 0; i < nv; i += L) {
        vu neg;
        const vf e = exp_neg_abs(*(vf *)(v + i), &neg), one = (vf){0} + 1.0f;
        const vf s = blend(neg, e / (one + e), one / (one + e));
        memcpy(v + i, &s, sizeof s);
    }
    for (int64_t i = nv; i < n; i++) {
        const float e = expf(-fabsf(v[i]));
        v[i] = v[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    }
}

/* logits of rt rows x ne experts (constants where inlined: the rt * ne accumulators stay in registers,
   each load of x feeds ne experts and each load of W rt rows) */
static inline __attribute__((always_inline)) void logit_tile(const float *xw, const float *we, int64_t D, const int rt,
                                                              const int ne, float *out, int64_t E) {
    const int64_t Dv = D - D % L;
    vf acc[RT][NE];
#pragma GCC unroll 4
    for (int i = 0; i < rt; i++)
#pragma GCC unroll 4
        for (int j = 0; j < ne; j++) acc[i][j] = (vf){0};
    for (int64_t d = 0; d < Dv; d += L) {
        vf wv[NE];
#pragma GCC unroll 4
        for (int j = 0; j < ne; j++) wv[j] = *(const vf *)(we + j * D + d);
#pragma GCC unroll 4
        for (int i = 0; i < rt; i++) {
            const vf xv = *(const vf *)(xw + i * D + d);
#pragma GCC unroll 4
            for (int j = 0; j < ne; j++) acc[i][j] += wv[j] * xv;
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < rt; i++)
#pragma GCC unroll 4
        for (int j = 0; j < ne; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t d = Dv; d < D; d++) s += we[j * D + d] * xw[i * D + d];
            out[i * E + j] = s;
        }
}

/* x: T rows of D (row stride xs) fp32 or bf16; w: [E, D] fp32; bias: [E] fp32 or NULL; scratch: T * (D
   + 2 E) floats. Returns 0, or -1 where a row has fewer than top_k selectable experts. */
int route_sigmoid(const void *x, int64_t xs, int x_bf16, int64_t T, int64_t D, const float *w, const float *bias,
                  int64_t E, int64_t n_group, int64_t topk_group, int64_t top_k, int norm, float scale,
                  float *weights, int64_t *ids, float *scratch, int nthreads) {
    float *xw = scratch, *logits = scratch + T * D, *choice = logits + T * E;
    for (int64_t t = 0; t < T; t++) {
        const int64_t Dv = D - D % L;
        float *row = xw + t * D;
        if (x_bf16) {
            const uint16_t *h = (const uint16_t *)x + t * xs;
            for (int64_t d = 0; d < Dv; d += L) *(vf *)(row + d) = widen_bf16(h + d);
            for (int64_t d = Dv; d < D; d++) row[d] = bf16_to_f(h[d]);
        } else {
            memcpy(row, (const float *)x + t * xs, D * sizeof(float));
        }
    }
    int team = nthreads < (E + NE - 1) / NE ? nthreads : (int)((E + NE - 1) / NE);
    if (team < 1) team = 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t e = 0; e < E; e += NE) {
        const float *we = w + e * D;
        float *out = logits + e;
        int64_t t0 = 0;
        if (E - e >= NE) {
            for (; t0 + RT <= T; t0 += RT) logit_tile(xw + t0 * D, we, D, RT, NE, out + t0 * E, E);
            for (; t0 < T; t0++) logit_tile(xw + t0 * D, we, D, 1, NE, out + t0 * E, E);
        } else {
            for (int64_t j = e; j < E; j++)
                for (t0 = 0; t0 < T; t0++) logit_tile(xw + t0 * D, w + j * D, D, 1, 1, logits + t0 * E + j, E);
        }
    }
    int bad = 0;
    const int64_t per = E / n_group;
    for (int64_t t = 0; t < T; t++) {
        float *sc = logits + t * E, *ch = choice + t * E;
        sigmoid(sc, E);
        for (int64_t e = 0; e < E; e++) ch[e] = bias ? sc[e] + bias[e] : sc[e];
        if (n_group > 1) {
            float gs[256];
            int64_t keep[256], two[2];
            for (int64_t g = 0; g < n_group; g++) {
                if (per >= 2) {
                    top(ch + g * per, per, 2, two);
                    gs[g] = ch[g * per + two[0]] + ch[g * per + two[1]];
                } else {
                    gs[g] = ch[g * per];
                }
            }
            top(gs, n_group, topk_group, keep);
            for (int64_t g = 0; g < n_group; g++) {
                int kept = 0;
                for (int64_t j = 0; j < topk_group; j++) kept |= keep[j] == g;
                if (!kept)
                    for (int64_t e = 0; e < per; e++) ch[g * per + e] = -INFINITY;
            }
        }
        int64_t *id = ids + t * top_k;
        float *wt = weights + t * top_k;
        top(ch, E, top_k, id);
        float sum = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            if (id[j] < 0) {
                bad = 1;
                id[j] = 0;
            }
            wt[j] = sc[id[j]];
            sum += wt[j];
        }
        for (int64_t j = 0; j < top_k; j++) {
            if (norm && top_k > 1) wt[j] = wt[j] / (sum + 1e-20f);
            wt[j] *= scale;
        }
    }
    return bad ? -1 : 0;
}

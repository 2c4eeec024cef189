/* The elementwise steps around the routed experts' two products on CPU, in one call each
   (expertpool.kernels.cpu_experts: ``swiglu``, ``combine``).

   Between the products a decode layer ran ~8 torch ops (round the product to the compute dtype, split,
   silu, round, multiply, round), and after them ~6 (round, times the routing weight, scatter the pairs
   to their (token, slot) places, sum the slots in fp32, round): ~250 us of dispatch per bench-mini
   layer for ~100 rows. These compute the same expressions in the same roundings (round() is to the
   compute dtype: bf16 nearest even, or none for fp32); silu uses the vectorized exp (~1 ulp), not
   torch's, so a silu can differ in its last fp32 bit. */

#include "vec.h"

/* L lanes rounded to the compute dtype (bf16: nearest even; fp32: as they are) */
static inline vf rnd_vec(vf x, int bf16) { return bf16 ? as_vf(round_bf16_vec(x)) : x; }

/* silu(x) = x / (1 + e^-x), from e = e^-|x| <= 1: x / (1 + e) where x >= 0, x e / (1 + e) below */
static inline vf vsilu(vf x) {
    vu neg;
    const vf e = exp_neg_abs(x, &neg), one = (vf){0} + 1.0f;
    return blend(neg, x * e / (one + e), x / (one + e));
}

/* a[p, f] = round(round(silu(round(h[p, f]))) * round(h[p, F + f])) for bf16 compute (each product of
   two bf16 values is exact in fp32), silu(h) * h' for fp32. h: P x 2F fp32; a: P x F in the compute
   dtype. */
__attribute__((optimize("fp-contract=off")))
void moe_swiglu(const float *h, int64_t P, int64_t F, int bf16, void *a) {
    for (int64_t p = 0; p < P; p++) {
        const float *gate = h + p * 2 * F, *up = gate + F;
        for (int64_t f0 = 0; f0 < F; f0 += L) {
            const int64_t n = F - f0 < L ? F - f0 : L;
            const vf g = rnd_vec(load_n(gate + f0, n), bf16), u = rnd_vec(load_n(up + f0, n), bf16);
            store_n(a, bf16, p * F + f0, rnd_vec(vsilu(g), bf16) * u, n);  /* rounded as stored */
        }
    }
}

/* out[t, :] = round(sum over k, in slot order from 0, of the slot's y), where pair q holds slot
   pair_idx[q] = t * K + k with y = round(round(y_q) * w_q) (w_q in the compute dtype) and a slot
   without a pair adds 0. y: Q x D fp32; w: Q in the compute dtype; out: T x D in the compute dtype;
   slot: T * K scratch. */
__attribute__((optimize("fp-contract=off")))
void moe_combine(const float *y, const void *w, const int64_t *pair_idx, int64_t Q, int64_t T, int64_t K,
                 int64_t D, int bf16, int64_t *slot, void *out) {
    for (int64_t s = 0; s < T * K; s++) slot[s] = -1;
    for (int64_t q = 0; q < Q; q++) slot[pair_idx[q]] = q;
    for (int64_t t = 0; t < T; t++)
        for (int64_t d0 = 0; d0 < D; d0 += L) {
            const int64_t n = D - d0 < L ? D - d0 : L;
            vf acc = (vf){0};
            for (int64_t k = 0; k < K; k++) {
                const int64_t q = slot[t * K + k];
                if (q < 0) {
                    acc += (vf){0};
                    continue;
                }
                const float wq = bf16 ? bf16_to_f(((const uint16_t *)w)[q]) : ((const float *)w)[q];
                const float *yq = y + q * D + d0;
                acc += rnd_vec(rnd_vec(load_n(yq, n), bf16) * wq, bf16);
            }
            store_n(out, bf16, t * D + d0, acc, n);
        }
}

/* The valid (token, slot) pairs of a layer sorted by expert, stably (as reference._pairs_by_expert:
   argsort of the ids, stable), with the kernel's groups, in one pass instead of ~9 torch ops and a
   Python loop over the experts (~170 us per bench-mini decode layer at two threads). ids: T * K
   expert ids (-1: a slot another rank owns); x: T rows of row_bytes; w: T * K routing weights of
   w_bytes each. Out: expert, start, count for each active expert in ascending expert order (E
   entries at most), pair_idx (t * K + k), x_sorted (each pair's input row) and w_sorted (its weight)
   for the P valid pairs, *n_pairs = P, *max_count the largest group. Returns the number of active
   experts, or -1 if an id is >= E or < -1 (nothing valid is written then). cnt: E scratch. */
int64_t moe_group(const int64_t *ids, int64_t T, int64_t K, int64_t E, const void *x, int64_t row_bytes,
                  const void *w, int64_t w_bytes, int64_t *cnt, int64_t *expert, int64_t *start, int64_t *count,
                  int64_t *pair_idx, void *x_sorted, void *w_sorted, int64_t *n_pairs, int64_t *max_count) {
    for (int64_t e = 0; e < E; e++) cnt[e] = 0;
    for (int64_t s = 0; s < T * K; s++) {
        const int64_t e = ids[s];
        if (e < -1 || e >= E) return -1;
        if (e >= 0) cnt[e]++;
    }
    int64_t n_active = 0, P = 0, mx = 0;
    for (int64_t e = 0; e < E; e++) {
        if (!cnt[e]) continue;
        expert[n_active] = e, start[n_active] = P, count[n_active] = cnt[e];
        mx = cnt[e] > mx ? cnt[e] : mx;
        cnt[e] = P;  /* from here: the next free place of expert e */
        P += count[n_active++];
    }
    for (int64_t s = 0; s < T * K; s++) {
        const int64_t e = ids[s];
        if (e < 0) continue;
        const int64_t q = cnt[e]++;
        pair_idx[q] = s;
        memcpy((char *)x_sorted + q * row_bytes, (const char *)x + (s / K) * row_bytes, (size_t)row_bytes);
        memcpy((char *)w_sorted + q * w_bytes, (const char *)w + s * w_bytes, (size_t)w_bytes);
    }
    *n_pairs = P, *max_count = mx;
    return n_active;
}

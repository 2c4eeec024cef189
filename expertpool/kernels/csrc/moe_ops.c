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

/* Expert parallelism at inference: the (token, slot) pairs of one rank's layer packed for the
   all-to-all, in one pass instead of ~10 torch ops (model.dispatch.AllToAllDispatcher). Each pair goes
   to the rank of its expert e = ids[s] mod E (ids are variant-offset virtual ids): owner[e], or with
   copies (replicated experts) copies[e * width + s mod ncopies[e]] (pair s takes copy s mod copies, as
   the torch path does). Pairs are ordered by destination rank, stably (argsort(dest, stable)): order[q]
   = s for the q-th packed pair; counts[r] the pairs for rank r. Packed row q: token s / K's x row
   (row_bytes), then the pair's id (its 8 bytes as they are); send rows are send_row_bytes apart.
   Returns 0, or -1 if an id is negative or a destination is outside [0, W) (nothing is sent then).
   pos: W scratch. */
int64_t ep_pack(const int64_t *ids, int64_t T, int64_t K, int64_t E, const int64_t *owner,
                const int64_t *copies, const int64_t *ncopies, int64_t width, int64_t W, const void *x,
                int64_t row_bytes, void *send, int64_t send_row_bytes, int64_t *order,
                int64_t *counts, int64_t *pos, int64_t *dest) {
    for (int64_t r = 0; r < W; r++) counts[r] = 0;
    for (int64_t s = 0; s < T * K; s++) {
        if (ids[s] < 0) return -1;
        const int64_t e = ids[s] % E;
        const int64_t d = copies ? copies[e * width + s % ncopies[e]] : owner[e];
        if (d < 0 || d >= W) return -1;
        dest[s] = d;
        counts[d]++;
    }
    for (int64_t r = 0, at = 0; r < W; r++) pos[r] = at, at += counts[r];
    for (int64_t s = 0; s < T * K; s++) {
        const int64_t q = pos[dest[s]]++;
        char *row = (char *)send + q * send_row_bytes;
        order[q] = s;
        memcpy(row, (const char *)x + (s / K) * row_bytes, (size_t)row_bytes);
        memcpy(row + row_bytes, ids + s, 8);
    }
    return 0;
}

/* The origin's combine of expert parallelism: out[t, :] = round(sum over k, in slot order from 0, of
   round(back_q * round(w[t * K + k]))) where q is the packed place of slot t * K + k (order[q] =
   t * K + k, every slot has one) and back_q its expert output row in the compute dtype, as received
   (rows back_row_elems elements apart). The same roundings as reference.combine_pairs of the rows
   times their weights in the compute dtype. w: T * K fp32 routing weights; out: T x D in the compute
   dtype; slot: T * K scratch. */
__attribute__((optimize("fp-contract=off")))
void ep_combine(const void *back, int64_t back_row_elems, const float *w, const int64_t *order, int64_t T,
                int64_t K, int64_t D, int bf16, int64_t *slot, void *out) {
    for (int64_t q = 0; q < T * K; q++) slot[order[q]] = q;
    for (int64_t t = 0; t < T; t++)
        for (int64_t d0 = 0; d0 < D; d0 += L) {
            const int64_t n = D - d0 < L ? D - d0 : L;
            vf acc = (vf){0};
            for (int64_t k = 0; k < K; k++) {
                const int64_t s = t * K + k, q = slot[s];
                vf y;
                if (bf16) {
                    const uint16_t *row = (const uint16_t *)back + q * back_row_elems + d0;
                    if (n == L) y = widen_bf16(row);
                    else {
                        float tmp[L] = {0};
                        for (int64_t i = 0; i < n; i++) tmp[i] = bf16_to_f(row[i]);
                        y = load_n(tmp, L);
                    }
                } else {
                    y = load_n((const float *)back + q * back_row_elems + d0, n);
                }
                const float ws = bf16 ? round_bf16(w[s]) : w[s];
                acc += rnd_vec(y * ws, bf16);
            }
            store_n(out, bf16, t * D + d0, acc, n);
        }
}

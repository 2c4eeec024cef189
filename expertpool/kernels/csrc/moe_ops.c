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

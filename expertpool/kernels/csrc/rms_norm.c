/* RMSNorm of a few rows on CPU in one call (expertpool.kernels.cpu_norm).

   The model's RMSNorm is eight torch ops (widen, square, mean, add eps, rsqrt, scale, round, times the
   weight); at a decode batch each costs more to dispatch than to compute, and a bench-mini step runs
   17 of these norms. This computes the same expression per row, in the same roundings:
       y = round(w * round(x * r)),  r = 1 / sqrt(sum(x^2) / D + eps)
   in fp32, where round() is to the input's dtype (bf16: nearest even; fp32: none). Only the order of
   the sum of squares differs from torch's reduction (L lanes, then a fixed lane tree). One thread: a
   norm of 16 x 1,024 is a few microseconds, less than waking a second one. */

#include <math.h>

#include "vec.h"

static float sum_squares(const float *x, const uint16_t *h, int64_t D) {
    const int64_t Dv = D - D % L;
    vf acc = (vf){0};
    for (int64_t d = 0; d < Dv; d += L) {
        const vf v = h ? widen_bf16(h + d) : *(const vf *)(x + d);
        acc += v * v;
    }
    float s = hsum(acc);
    for (int64_t d = Dv; d < D; d++) {
        const float v = h ? bf16_to_f(h[d]) : x[d];
        s += v * v;
    }
    return s;
}

/* x: T rows of D (row stride xs elements), fp32 or bf16 (x_bf16); w: D weights in x's dtype; out: T x D
   contiguous in x's dtype */
__attribute__((optimize("fp-contract=off")))  /* x * r and w * y are two roundings, as in torch */
void rms_norm(const void *x, int64_t xs, int x_bf16, const void *w, int64_t T, int64_t D, float eps, void *out) {
    const int64_t Dv = D - D % L;
    for (int64_t t = 0; t < T; t++) {
        const float *xf = (const float *)x + t * xs;
        const uint16_t *xh = (const uint16_t *)x + t * xs;
        const float r = 1.0f / sqrtf(sum_squares(xf, x_bf16 ? xh : NULL, D) / (float)D + eps);
        const vf rv = (vf){0} + r;
        if (x_bf16) {
            const uint16_t *wh = (const uint16_t *)w;
            uint16_t *o = (uint16_t *)out + t * D;
            for (int64_t d = 0; d < Dv; d += L) {
                const vf y = as_vf(round_bf16_vec(widen_bf16(xh + d) * rv));
                *(vh *)(o + d) = to_bf16(widen_bf16(wh + d) * y);
            }
            for (int64_t d = Dv; d < D; d++)
                o[d] = f_to_bf16(bf16_to_f(wh[d]) * round_bf16(bf16_to_f(xh[d]) * r));
        } else {
            const float *wf = (const float *)w;
            float *o = (float *)out + t * D;
            for (int64_t d = 0; d < D; d++) o[d] = wf[d] * (xf[d] * r);
        }
    }
}

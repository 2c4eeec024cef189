/* The steps of an MLA layer between its down-projections and its attention, in one call on CPU
   (expertpool.kernels.cpu_attention.prep).

   For each new token n of a serving step:
     q_pe_out[n, h] = rope(q[n, h, Dn:Dn+R])                      for every head h
     cache[slot[n], :C]  = rms_norm(kv[n, :C]) * w                (the normalized latent)
     cache[slot[n], C:]  = rope(kv[n, C:C+R])                      (the shared key's RoPE part)
   where rope(x)[i] = x[2i] cos_i - x[2i+1] sin_i and rope(x)[R/2 + i] = x[2i+1] cos_i + x[2i] sin_i
   (interleaved pairs in, de-interleaved out: layers.apply_rope). In torch these are ~12 ops a layer
   (two RoPEs of six ops each, the norm, a concatenation, a cast and the cache's index_copy_), each
   costing more to dispatch than to compute at a decode batch. The arithmetic and its roundings are
   torch's: fp32 products and sums, not fused (fp-contract off), rounded to the activations' dtype at
   the end (bf16: nearest even); the norm is rms_norm.c's. The cache takes the activations' dtype.
   One thread: 16 tokens are a few microseconds of work. */

#include "vec.h"

void rms_norm(const void *x, int64_t xs, int x_bf16, const void *w, int64_t T, int64_t D, float eps, void *out);

__attribute__((optimize("fp-contract=off")))
static void rope(const void *x, int bf16, int64_t R, const float *cos, const float *sin, void *out) {
    const int64_t half = R / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1, x2;
        if (bf16) {
            x1 = bf16_to_f(((const uint16_t *)x)[2 * i]);
            x2 = bf16_to_f(((const uint16_t *)x)[2 * i + 1]);
        } else {
            x1 = ((const float *)x)[2 * i];
            x2 = ((const float *)x)[2 * i + 1];
        }
        const float a = x1 * cos[i], b = x2 * sin[i], c = x2 * cos[i], d = x1 * sin[i];
        const float lo = a - b, hi = c + d;
        if (bf16) {
            ((uint16_t *)out)[i] = f_to_bf16(lo);
            ((uint16_t *)out)[half + i] = f_to_bf16(hi);
        } else {
            ((float *)out)[i] = lo;
            ((float *)out)[half + i] = hi;
        }
    }
}

/* q: [N] rows of H heads (row stride qs, head stride qh, elements), the RoPE part at offset qo of each
   head; kv: [N] rows (stride kvs) of C latent then R RoPE values; cos, sin: [N, R/2] fp32 contiguous;
   norm_w: C weights; slots: N cache slots; cache: [P, C + R] contiguous; q_pe_out: [N, H, R]
   contiguous. Everything but cos/sin/slots in one dtype (bf16 or fp32). Returns 0, or -1 for a slot
   outside [0, P) (nothing written for that token or after it). */
int mla_prep(const void *q, int64_t qs, int64_t qh, int64_t qo, int64_t H, const void *kv, int64_t kvs,
             int64_t C, int64_t R, int64_t N, int bf16, const float *cos, const float *sin,
             const void *norm_w, float eps, const int64_t *slots, void *cache, int64_t P, void *q_pe_out) {
    const int64_t es = bf16 ? 2 : 4, X = C + R;
    char *cache_b = (char *)cache;
    const char *q_b = (const char *)q, *kv_b = (const char *)kv;
    for (int64_t n = 0; n < N; n++) {
        const int64_t slot = slots[n];
        if (slot < 0 || slot >= P) return -1;
        const float *cn = cos + n * (R / 2), *sn = sin + n * (R / 2);
        for (int64_t h = 0; h < H; h++)
            rope(q_b + (n * qs + h * qh + qo) * es, bf16, R, cn, sn, (char *)q_pe_out + ((n * H + h) * R) * es);
        char *row = cache_b + slot * X * es;
        rms_norm(kv_b + n * kvs * es, kvs, bf16, norm_w, 1, C, eps, row);
        rope(kv_b + (n * kvs + C) * es, bf16, R, cn, sn, row + C * es);
    }
    return 0;
}

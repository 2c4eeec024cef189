/* Vector helpers shared by the CPU kernels (expert_gemv.c, mla_decode.c): the fp32 vector of the
   CPU the library is built for (AVX-512: 16 lanes, AVX2: 8), bf16 and int8 widening, and the
   fixed-order lane sum. Built with -O3 -march=native -fopenmp (expertpool.kernels.cpu_experts). */

#ifndef EXPERTPOOL_VEC_H
#define EXPERTPOOL_VEC_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define L 16         /* fp32 lanes per vector: one zmm */
#else
#define L 8          /* one ymm (AVX2; 16 registers, so the accumulators below stay in registers) */
#endif

typedef float vf __attribute__((vector_size(L * 4), aligned(4), may_alias));
typedef uint16_t vh __attribute__((vector_size(L * 2), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(L * 4)));

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* L bf16 values widened to fp32 (exact: a bf16 is the top half of an fp32) */
static inline vf widen_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
#elif defined(__AVX2__)
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
#else
    vu u = __builtin_convertvector(*(const vh *)p, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* L int8 values widened to fp32 (exact) */
static inline vf widen_i8(const int8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    typedef int8_t vi8 __attribute__((vector_size(L), aligned(1)));
    return __builtin_convertvector(*(const vi8 *)p, vf);
#endif
}

static inline float bf16_to_f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float hsum(vf v) {
    /* fixed order: lanes added pairwise in a tree, t[i] += t[i + w] for w = L/2, ..., 1. The intrinsic
       forms add the same pairs in registers (the upper half onto the lower one at each level), so
       they give the bits of the scalar loop (checked on bench-mini shapes at 1-8 rows) without its
       trip through memory: a layer's w13 at 4 rows per expert went from 5.3-5.4 to 3.7-3.9 ms */
#if defined(__AVX512F__)
    __m512 z = (__m512)v;
    __m256 y = _mm256_add_ps(_mm512_castps512_ps256(z),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
#elif defined(__AVX2__)
    __m256 y = (__m256)v;
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
#else
    float t[L];
    memcpy(t, &v, sizeof t);
    for (int w = L / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
#endif
}

static inline vf as_vf(vu u) {
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline vu as_vu(vf f) {
    vu u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* the lanes of a where m is all ones, of b where it is zero */
static inline vf blend(vu m, vf a, vf b) { return as_vf((as_vu(a) & m) | (as_vu(b) & ~m)); }

/* exp of L lanes, each x <= 0 (a score minus its row's max): x = n ln2 + r with |r| <= ln2 / 2, e^r
   from Cephes' expf polynomial (~1 ulp), times 2^n built in the exponent bits. Below -87.3 (where
   2^n would leave the normal range) it returns e^-87.3, ~1e-38: a probability that rounds to nothing
   beside the row's max term, which is 1 (mla_decode.c); a sigmoid's e^-|x| that leaves 1 + e^-|x| = 1
   (router.c). */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} - 87.3f, magic = (vf){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = blend((vu)(x < lo), lo, x); /* the max of x and lo, lane by lane */
    const vf t = x * 1.44269504088896341f + magic;
    const vf n = t - magic;
    const vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vf p = r * 1.9875691500E-4f + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    vu ti, pi;
    memcpy(&ti, &t, sizeof ti);
    memcpy(&pi, &p, sizeof pi);
    pi += (ti - 0x4B400000u) << 23; /* n, from t's low mantissa bits, added to p's exponent */
    memcpy(&p, &pi, sizeof p);
    return p;
}

/* e^-|x| (~1 ulp) and, in *neg, all ones in the lanes where x < 0: the halves of a sigmoid that never
   overflow (router.c's sigmoid, moe_ops.c's silu) */
static inline vf exp_neg_abs(vf x, vu *neg) {
    *neg = (vu)(x < (vf){0});
    return vexp((vf){0} - as_vf(as_vu(x) & 0x7fffffffu));
}

/* bf16 rounding (mla_decode.c, rms_norm.c, moe_ops.c) */
/* fp32 -> bf16, round to nearest even; NaN stays NaN (quiet) */
static inline uint16_t f_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f(f_to_bf16(f)); }

/* L fp32 values rounded to bf16 (nearest even, NaN kept quiet), as the upper halves of fp32 lanes */
static inline vu round_bf16_vec(vf f) {
    const vu u = as_vu(f);
    const vu nearest = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);  /* all ones where NaN */
    return (nearest & ~nan) | (((u & 0xffff0000u) | 0x400000u) & nan);
}

/* L fp32 values rounded to bf16 */
static inline vh to_bf16(vf v) { return __builtin_convertvector(round_bf16_vec(v) >> 16, vh); }

/* the first n <= L floats at p, the other lanes zero. A whole vector is one load: through memcpy the
   AVX2 build copied it via the stack as two 16-byte stores and then a 32-byte load that could not be
   forwarded from them (27% of mla_decode.c's samples at short contexts) */
static inline vf load_n(const float *p, int64_t n) {
    if (n == L) return *(const vf *)p;  /* vf: 4-byte aligned, may_alias */
    vf v = (vf){0};
    memcpy(&v, p, sizeof(float) * n);
    return v;
}

/* the first n <= L lanes of v stored at p + i as fp32 or, rounded, as bf16 (whole vectors as one store) */
static inline void store_n(void *p, int bf16, int64_t i, vf v, int64_t n) {
    if (!bf16) {
        if (n == L) memcpy((float *)p + i, &v, sizeof v);
        else memcpy((float *)p + i, &v, sizeof(float) * n);
        return;
    }
    const vh h = to_bf16(v);
    if (n == L) memcpy((uint16_t *)p + i, &h, sizeof h);
    else memcpy((uint16_t *)p + i, &h, sizeof(uint16_t) * n);
}

#endif

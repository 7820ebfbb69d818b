/* Decode attention's inner loop (attention.py `_decode_kernel` calls it once per sequence and split of the
   cached positions; native.py builds it with gemv_int8.c): the hkv * g query heads q [hkv * g, d] (already
   scaled by d^-0.5; heads h*g .. h*g+g-1 share kv head h) against n cached positions, whose keys and values
   are rows of hkv * d at k + t * ld and v + t * ld, float32, or int8 with one float32 scale per group of gs
   channels at ks + t * lds and vs + t * lds (kv_int8.py). An online softmax over tiles of TILE positions
   updates in place m [hq] (running max; start -inf), l [hq] (sum of exp(score - m); start 0) and acc [hq, d]
   (sum of exp(score - m) * value; start 0); attention.py merges the splits.

   What makes it faster than the numba loop it replaces (which stays for other CPUs): a key row is loaded
   (and dequantised) once for its g query heads, whose dot products accumulate in registers; the softmax
   exponentials are vectorised. On AVX-512 the scores keep two accumulator chains a head and reduce four
   sums at once, the value rows are prefetched while the scores run, and the values go through the tile in
   blocks of 16 / g chunks of 16 channels whose sums stay in registers (one multiply-add per weight, one
   conversion per int8 value); the AVX2 entry point keeps the simpler loop (values row by row, the sums in
   acc). g is a compile-time constant for 1, 2, 4 and 8 query heads per kv head (the loops unroll). d must
   be a multiple of 16 and gs / 16 a power of two (gs = 16 for a float32 cache); attention.py checks before
   calling. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd_math.h"

#define TILE 64
#define GMAX 16         /* query heads per kv head */
#define HQMAX 64        /* query heads */

/* ---- AVX-512 ------------------------------------------------------------------------------------- */

/* 16 channels of a row: float32, or int8 times the group's scale */
__attribute__((target("avx512f"), always_inline))
static inline __m512 row16(const void *base, int64_t off, int quant, float scale) {
    if (quant)
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                   _mm_loadu_si128((const __m128i *)((const int8_t *)base + off)))), _mm512_set1_ps(scale));
    return _mm512_loadu_ps((const float *)base + off);
}

/* max(m, sc[0..n)) */
__attribute__((target("avx512f")))
static float max16(const float *sc, int64_t n, float m) {
    __m512 mx = _mm512_set1_ps(m);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        mx = _mm512_mask_max_ps(mx, mask, mx, _mm512_maskz_loadu_ps(mask, sc + i));
    }
    return _mm512_reduce_max_ps(mx);
}

/* exp(sc[i] - mt) in place for i < n; returns their sum */
__attribute__((target("avx512f")))
static float exp_sum16(float *sc, int64_t n, float mt) {
    __m512 sum = _mm512_setzero_ps(), mx = _mm512_set1_ps(mt);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + i), mx));
        _mm512_mask_storeu_ps(sc + i, mask, p);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, p));
    }
    return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx512f"), always_inline))
static inline void attn512(const float *q, int64_t hkv, const int g, int64_t d, const void *k, const void *v,
                           int64_t ld, const float *ks, const float *vs, int64_t lds, int64_t gs, int64_t n,
                           float *m, float *l, float *acc, const int quant) {
    float sc[HQMAX * TILE];
    const int64_t C = d / 16, hq = hkv * g;
    const int sh = __builtin_ctzll((uint64_t)(gs / 16));      /* chunk -> scale index (gs / 16 a power of 2) */
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        const int64_t nt = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t i = 0; i < nt; i++) {                     /* scores: each key row once, g dot products */
            const int64_t t = t0 + i;
            const char *vrow = (const char *)v + t * ld * (quant ? 1 : 4);
            for (int64_t b = 0; b < hkv * d * (quant ? 1 : 4); b += 64)     /* the value row, for the loop below */
                _mm_prefetch(vrow + b, _MM_HINT_T0);
            for (int64_t h = 0; h < hkv; h++) {
                __m512 a[GMAX], b[GMAX];          /* two accumulators a head: 2g multiply-add chains */
                for (int j = 0; j < g; j++)
                    a[j] = b[j] = _mm512_setzero_ps();
                int64_t c = 0;
                for (; c + 2 <= C; c += 2) {
                    __m512 r0 = row16(k, t * ld + h * d + c * 16, quant, quant ? ks[t * lds + ((h * d / 16 + c) >> sh)] : 1.0f);
                    __m512 r1 = row16(k, t * ld + h * d + c * 16 + 16, quant,
                                      quant ? ks[t * lds + ((h * d / 16 + c + 1) >> sh)] : 1.0f);
                    for (int j = 0; j < g; j++) {
                        a[j] = _mm512_fmadd_ps(r0, _mm512_loadu_ps(q + (h * g + j) * d + c * 16), a[j]);
                        b[j] = _mm512_fmadd_ps(r1, _mm512_loadu_ps(q + (h * g + j) * d + c * 16 + 16), b[j]);
                    }
                }
                if (c < C) {
                    __m512 r = row16(k, t * ld + h * d + c * 16, quant, quant ? ks[t * lds + ((h * d / 16 + c) >> sh)] : 1.0f);
                    for (int j = 0; j < g; j++)
                        a[j] = _mm512_fmadd_ps(r, _mm512_loadu_ps(q + (h * g + j) * d + c * 16), a[j]);
                }
                for (int j = 0; j < g; j++)
                    a[j] = _mm512_add_ps(a[j], b[j]);
                int j = 0;
                for (; j + 4 <= g; j += 4) {                   /* four sums at once */
                    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 1], 0x44),
                                             _mm512_shuffle_f32x4(a[j], a[j + 1], 0xEE));
                    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(a[j + 2], a[j + 3], 0x44),
                                             _mm512_shuffle_f32x4(a[j + 2], a[j + 3], 0xEE));
                    __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
                    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));
                    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0xB1));    /* block b: the sum of a[j + b] */
                    float sums[4];          /* lanes 0, 4, 8, 12 (a compress store is microcoded on Zen 4) */
                    _mm_storeu_ps(sums, _mm512_castps512_ps128(_mm512_permutexvar_ps(
                        _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), z)));
                    for (int u = 0; u < 4; u++)
                        sc[(h * g + j + u) * TILE + i] = sums[u];
                }
                for (; j < g; j++)
                    sc[(h * g + j) * TILE + i] = _mm512_reduce_add_ps(a[j]);
            }
        }
        for (int64_t j = 0; j < hq; j++) {                     /* the online softmax's update */
            const float mt = max16(sc + j * TILE, nt, m[j]);
            const float alpha = expf(m[j] - mt);               /* 0 on the first tile (m = -inf) */
            m[j] = mt;
            l[j] = l[j] * alpha + exp_sum16(sc + j * TILE, nt, mt);
            const __m512 al = _mm512_set1_ps(alpha);
            for (int64_t c = 0; c < C; c++)
                _mm512_storeu_ps(acc + j * d + c * 16, _mm512_mul_ps(_mm512_loadu_ps(acc + j * d + c * 16), al));
        }
        /* values: per kv head, blocks of CB = 16 / g chunks of 16 channels whose g x CB sums stay in
           registers through the tile (its rows were prefetched by the score loop) */
        const int CB = GMAX / g;
        for (int64_t h = 0; h < hkv; h++) {
            for (int64_t c0 = 0; c0 < C; c0 += CB) {
                __m512 o[GMAX];
                for (int j = 0; j < g; j++)
                    for (int cc = 0; cc < CB; cc++)
                        o[j * CB + cc] = c0 + cc < C ? _mm512_loadu_ps(acc + (h * g + j) * d + (c0 + cc) * 16)
                                                     : _mm512_setzero_ps();
                for (int64_t i = 0; i < nt; i++) {
                    const int64_t t = t0 + i;
                    for (int cc = 0; cc < CB; cc++) {
                        if (c0 + cc >= C)
                            break;
                        const int64_t c = c0 + cc;
                        __m512 r = row16(v, t * ld + h * d + c * 16, quant, quant ? vs[t * lds + ((h * d / 16 + c) >> sh)] : 1.0f);
                        for (int j = 0; j < g; j++)
                            o[j * CB + cc] = _mm512_fmadd_ps(_mm512_set1_ps(sc[(h * g + j) * TILE + i]), r, o[j * CB + cc]);
                    }
                }
                for (int j = 0; j < g; j++)
                    for (int cc = 0; cc < CB; cc++)
                        if (c0 + cc < C)
                            _mm512_storeu_ps(acc + (h * g + j) * d + (c0 + cc) * 16, o[j * CB + cc]);
            }
        }
    }
}

#define DISPATCH_G(FN, QUANT)                                                                          \
    switch (g) {                                                                                       \
    case 1: FN(q, hkv, 1, d, k, v, ld, ks, vs, lds, gs, n, m, l, acc, QUANT); break;                   \
    case 2: FN(q, hkv, 2, d, k, v, ld, ks, vs, lds, gs, n, m, l, acc, QUANT); break;                   \
    case 4: FN(q, hkv, 4, d, k, v, ld, ks, vs, lds, gs, n, m, l, acc, QUANT); break;                   \
    case 8: FN(q, hkv, 8, d, k, v, ld, ks, vs, lds, gs, n, m, l, acc, QUANT); break;                   \
    default: FN(q, hkv, g, d, k, v, ld, ks, vs, lds, gs, n, m, l, acc, QUANT);                         \
    }

/* one entry point per instruction set: quant 0 (float32 cache: ks, vs unused) or 1 (int8); g <= GMAX */
__attribute__((target("avx512f")))
void jt_attn_decode(const float *q, int64_t hkv, int64_t g, int64_t d, const void *k, const void *v, int64_t ld,
                    const float *ks, const float *vs, int64_t lds, int64_t gs, int64_t n,
                    float *m, float *l, float *acc, int64_t quant) {
    if (quant) {
        DISPATCH_G(attn512, 1)
    } else {
        DISPATCH_G(attn512, 0)
    }
}

/* ---- AVX2 + FMA: 8 lanes, the simpler loop ------------------------------------------------------------- */

__attribute__((target("avx2,fma"), always_inline))
static inline __m256 row8(const void *base, int64_t off, int quant, float scale) {
    if (quant)
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                   _mm_loadl_epi64((const __m128i *)((const int8_t *)base + off)))), _mm256_set1_ps(scale));
    return _mm256_loadu_ps((const float *)base + off);
}

__attribute__((target("avx2,fma")))
static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

__attribute__((target("avx2,fma")))
static float exp_sum8(float *sc, int64_t n, float mt) {
    __m256 sum = _mm256_setzero_ps(), mx = _mm256_set1_ps(mt);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + i), mx));
        _mm256_storeu_ps(sc + i, p);
        sum = _mm256_add_ps(sum, p);
    }
    float s = hsum8(sum);
    for (; i < n; i++) {
        sc[i] = expf(sc[i] - mt);
        s += sc[i];
    }
    return s;
}

__attribute__((target("avx2,fma"), always_inline))
static inline void attn256(const float *q, int64_t hkv, const int g, int64_t d, const void *k, const void *v,
                           int64_t ld, const float *ks, const float *vs, int64_t lds, int64_t gs, int64_t n,
                           float *m, float *l, float *acc, const int quant) {
    float sc[HQMAX * TILE];
    const int64_t C = d / 8, hq = hkv * g;
    const int sh = __builtin_ctzll((uint64_t)(gs / 8));
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        const int64_t nt = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t i = 0; i < nt; i++) {
            const int64_t t = t0 + i;
            for (int64_t h = 0; h < hkv; h++) {
                __m256 a[GMAX];
                for (int j = 0; j < g; j++)
                    a[j] = _mm256_setzero_ps();
                for (int64_t c = 0; c < C; c++) {
                    __m256 r = row8(k, t * ld + h * d + c * 8, quant, quant ? ks[t * lds + ((h * d / 8 + c) >> sh)] : 1.0f);
                    for (int j = 0; j < g; j++)
                        a[j] = _mm256_fmadd_ps(r, _mm256_loadu_ps(q + (h * g + j) * d + c * 8), a[j]);
                }
                for (int j = 0; j < g; j++)
                    sc[(h * g + j) * TILE + i] = hsum8(a[j]);
            }
        }
        for (int64_t j = 0; j < hq; j++) {
            float mt = m[j];
            for (int64_t i = 0; i < nt; i++)
                mt = sc[j * TILE + i] > mt ? sc[j * TILE + i] : mt;
            const float alpha = expf(m[j] - mt);
            m[j] = mt;
            l[j] = l[j] * alpha + exp_sum8(sc + j * TILE, nt, mt);
            const __m256 al = _mm256_set1_ps(alpha);
            for (int64_t c = 0; c < C; c++)
                _mm256_storeu_ps(acc + j * d + c * 8, _mm256_mul_ps(_mm256_loadu_ps(acc + j * d + c * 8), al));
        }
        for (int64_t i = 0; i < nt; i++) {
            const int64_t t = t0 + i;
            for (int64_t h = 0; h < hkv; h++) {
                __m256 p[GMAX];
                for (int j = 0; j < g; j++)
                    p[j] = _mm256_set1_ps(sc[(h * g + j) * TILE + i]);
                for (int64_t c = 0; c < C; c++) {
                    __m256 r = row8(v, t * ld + h * d + c * 8, quant, quant ? vs[t * lds + ((h * d / 8 + c) >> sh)] : 1.0f);
                    for (int j = 0; j < g; j++) {
                        float *o = acc + (h * g + j) * d + c * 8;
                        _mm256_storeu_ps(o, _mm256_fmadd_ps(p[j], r, _mm256_loadu_ps(o)));
                    }
                }
            }
        }
    }
}

__attribute__((target("avx2,fma")))
void jt_attn_decode_avx2(const float *q, int64_t hkv, int64_t g, int64_t d, const void *k, const void *v, int64_t ld,
                         const float *ks, const float *vs, int64_t lds, int64_t gs, int64_t n,
                         float *m, float *l, float *acc, int64_t quant) {
    if (quant) {
        DISPATCH_G(attn256, 1)
    } else {
        DISPATCH_G(attn256, 0)
    }
}

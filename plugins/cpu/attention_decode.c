/* Decode attention's inner loop (attention.py `_decode_kernel` calls it once per sequence and split of the
   cached positions; native.py builds it with gemv_int8.c): the hkv * g query heads q [hkv * g, d] (already
   scaled by d^-0.5; heads h*g .. h*g+g-1 share kv head h) against n cached positions, whose keys and values
   are rows of hkv * d at k + t * ld and v + t * ld, float32, or int8 with one float32 scale per group of gs
   channels at ks + t * lds and vs + t * lds (kv_int8.py), or (quant 2, the AVX512-VNNI entry point only, from
   `_decode_blocked`) int8 in kv_int8.py's blocked layout. An online softmax over tiles of TILE positions
   updates in place m [hq] (running max; start -inf), l [hq] (sum of exp(score - m); start 0) and acc [hq, d]
   (sum of exp(score - m) * value; start 0); attention.py merges the splits.

   What makes it faster than the numba loop it replaces (which stays for other CPUs): a key row is loaded
   (and dequantised) once for its g query heads, whose dot products accumulate in registers; the softmax
   exponentials are vectorised. On AVX-512 the scores keep two accumulator chains a head and reduce four
   sums at once, the value rows are prefetched while the scores run, and the values go through the tile in
   blocks of 16 / g chunks of 16 channels whose sums stay in registers (one multiply-add per weight, one
   conversion per int8 value); the AVX2 entry point keeps the simpler loop for a float32 cache (attn256).
   The AVX512-VNNI and AVX2 entry points run an int8 cache in groups of 32 channels through 16-bit integer
   dot products (attn_vnni, attn_i16, below); everything else as the AVX-512 one. g is a compile-time
   constant for 1, 2, 4 and 8 query heads per kv head (the loops unroll). d must be a multiple of 16 and gs / 16 a power
   of two (gs = 16 for a float32 cache); attention.py checks before calling. */

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

/* the online softmax's update for a tile of nt scores a head (rows of TILE in sc): the running max m and sum l,
   the scores turned into exp(score - m) in place, acc [hq, d] rescaled to the new max (left as it is when the
   max stayed: alpha 1, most tiles after the first few) */
__attribute__((target("avx512f")))
static void softmax_update(float *sc, int64_t nt, int64_t hq, int64_t d, float *m, float *l, float *acc) {
    for (int64_t j = 0; j < hq; j++) {
        const float mt = max16(sc + j * TILE, nt, m[j]);
        const float alpha = expf(m[j] - mt);                   /* 0 on the first tile (m = -inf) */
        m[j] = mt;
        l[j] = l[j] * alpha + exp_sum16(sc + j * TILE, nt, mt);
        if (alpha == 1.0f)
            continue;
        const __m512 al = _mm512_set1_ps(alpha);
        for (int64_t c = 0; c < d; c += 16)
            _mm512_storeu_ps(acc + j * d + c, _mm512_mul_ps(_mm512_loadu_ps(acc + j * d + c), al));
    }
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
        softmax_update(sc, nt, hq, d, m, l, acc);
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

/* ---- AVX-512 VNNI, an int8 cache in groups of 32 channels: 16-bit integer dot products ------------- */
/* The loop above spends a multiply-add per weight and query head, and a conversion per int8 value; here
   each vpdpwssd multiplies 32 int16 pairs. Scores: the query is rounded to int16 per group of 32
   channels (q ~ qs * qi, |qi| <= 32767, an error of at most 2^-16 of the group's largest), and 16 key rows
   are transposed (16 x 16 dwords) so that a lane is a position: a dword of 4 int8 channels splits into
   two int16 pairs, each multiplied by a broadcast pair of query channels, and a group's int32 sums are
   scaled by its 16 positions' key scales -- no horizontal sums. Values: the softmax weights times the
   group's value scales are rounded to int16 per tile (at most 2^-16 of the tile's largest), two value
   rows are interleaved so that a dword is one channel at two positions, and the g query heads' sums of a
   group's 32 channels stay in registers through the tile. The scales are prefetched a tile ahead, the keys
   half a tile ahead by the score loop, the values a tile ahead by the value loop (PREFETCHING below).
   64K positions, 8 query heads of 128 over 2 kv heads, 2 threads: 1.9-2.7 ms against the loop above's
   2.5-3.3 ms in the same runs (about the memory's bandwidth); 1.2-1.5x in the cache. tests/test_kv_int8.py
   bounds the roundings.
   AMD Zen 5, same shape, one thread, in the cache (C harness): 29.5-31 ns a position, 26-27.5 after the
   multiply-adds were written in place (DPWSSD, simd_math.h: ~7%) and the scale columns transposed, not
   gathered (LDSMAX); ablations then: the values ~7 ns, the key dot products ~5, the key transposes ~2.6,
   the weights' rounding ~4, the softmax ~3, the prefetches ~3 (without them 64K positions took 3x the time).
   In the int8 peer model's decode step after 64K tokens the two builds alternating in one process took the
   same time (1.012x): there the kernel took 1.34 ms (28 GB/s), against 1.05 ms on 2 threads in a harness
   whose L3 still held part of the cache (PREFETCHING).

   PREFETCHING (Zen 5, 2 threads, 64K positions, the harness flushing the L3 cache between runs as the decode
   step's weights do): into L1 (T0), not L2 (T1): 1.5 ms against 2.2 (prefetcht1 went at about half the rate);
   the value rows prefetched by the value loop rather than with the keys by the score loop, spreading the
   prefetches over the whole tile: 1.15 against 1.3 ms; issued in sequential bursts of 16 rows they were
   2x slower. Without the L3 flush the harness gets part of the 38 MB from the L3 (1.05 ms at best) and
   hid all of this. The kernel loading the same lines without computing takes about as long (1.08 ms against
   1.11), while a sequential read of those bytes takes 0.6-0.8 ms; the arithmetic alone on 2 threads ~0.82
   ms. The blocked layout (quant 2: keys as blocks of 16 transposed positions, values with positions paired,
   scales in blocks of 16: no transposes or unpacks, every line once and in order), which the engine's int8
   cache takes on AVX512-VNNI: 18.0 ns a position against 24.3 in rows, one thread in L2 (the same bits out);
   from memory on two threads the same ~1.05 ms as rows: there the limit is the memory's throughput while
   computing (~36 GB/s), not the walk. When the memory is fast the arithmetic bounds rows instead (a plain
   read of the 38 MB in 0.49 ms, the row kernel ~0.95 ms inside the step). In the int8 peer model's decode
   step at 64K, against one tile ahead into L2: 0.81x the step time (T0, the values still prefetched by the
   score loop); this form 0.95x and 0.76x (two runs, the memory fast, then slow).
   attn_i16 below (AVX2) on the same Zen 5 and harness: T0 2.15 ms against T1 2.39 (it is compute-bound,
   46 ns a position in the cache); not measured on Zen 3, the AVX2-only machines. */

#define DMAX 256        /* head dimension this path takes (query pairs on the stack) */
#define LDSMAX 32       /* scales a position (kv heads x groups) whose columns are transposed; more: gathered */

/* x[r] dword c -> x[c] dword r (r, c < 16): unpack 32- and 64-bit, then a 4 x 4 transpose of 128-bit blocks */
__attribute__((target("avx512f"), always_inline))
static inline void transpose16(__m512i x[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);
    }
    /* b[4R + m], block L: rows 4R .. 4R+3 of column 4L + m */
    for (int R = 0; R < 4; R++) {
        b[4 * R + 0] = _mm512_unpacklo_epi64(a[4 * R], a[4 * R + 2]);
        b[4 * R + 1] = _mm512_unpackhi_epi64(a[4 * R], a[4 * R + 2]);
        b[4 * R + 2] = _mm512_unpacklo_epi64(a[4 * R + 1], a[4 * R + 3]);
        b[4 * R + 3] = _mm512_unpackhi_epi64(a[4 * R + 1], a[4 * R + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i e0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x44), e1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xEE);
        __m512i e2 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x44), e3 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xEE);
        x[m] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        x[4 + m] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        x[8 + m] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        x[12 + m] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* 16 lanes of rows r < nr: the float at base + r * stride + off (0 beyond) */
__attribute__((target("avx512f"), always_inline))
static inline __m512 column16(const float *base, int64_t stride, int64_t off, int nr) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)stride));
    const __mmask16 rows = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, idx, base + off, 4);
}

/* x * 32767 / max|x| rounded, as int16 (0 where max|x| is 0); *scale = max|x| / 32767 (NaN if not finite) */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m512i round16x32(__m512 a, __m512 b, float *scale) {
    const __m512 mx = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b));
    const float top = _mm512_reduce_max_ps(mx);
    __mmask16 bad = _mm512_cmp_ps_mask(_mm512_add_ps(a, b), _mm512_add_ps(a, b), _CMP_UNORD_Q);
    if (bad || !(top <= 3.4e38f)) {
        *scale = __builtin_nanf("");
        return _mm512_setzero_si512();
    }
    *scale = top / 32767.0f;
    const __m512 inv = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)))),
                              _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))), 1);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void attn_vnni(const float *q, int64_t hkv, const int g, int64_t d, const int8_t *k, const int8_t *v,
                             int64_t ld, const float *ks, const float *vs, int64_t lds, int64_t n,
                             float *m, float *l, float *acc, const int blk) {
    float sc[HQMAX * TILE];
    int32_t qp[HQMAX * DMAX / 2];                  /* head j, quad c: (q[4c], q[4c+2]), (q[4c+1], q[4c+3]) */
    float qsc[HQMAX * DMAX / 32];                  /* head j, group: the query's scale */
    int16_t p16[GMAX * (TILE + 16)];
    float kT[LDSMAX * 16], vT[LDSMAX * TILE];     /* scale column c: kT, 16 positions; vT, the tile */
    const int64_t G = d / 32, hq = hkv * g, QP = d / 2;
    /* word w of a group's 32 query channels -> the pair order of qp */
    const __m512i pairs = _mm512_set_epi16(31, 29, 30, 28, 27, 25, 26, 24, 23, 21, 22, 20, 19, 17, 18, 16,
                                           15, 13, 14, 12, 11, 9, 10, 8, 7, 5, 6, 4, 3, 1, 2, 0);
    for (int64_t j = 0; j < hq; j++)
        for (int64_t grp = 0; grp < G; grp++) {
            __m512i w = round16x32(_mm512_loadu_ps(q + j * d + grp * 32), _mm512_loadu_ps(q + j * d + grp * 32 + 16),
                                   qsc + j * G + grp);
            _mm512_storeu_si512(qp + j * QP + grp * 16, _mm512_permutexvar_epi16(pairs, w));
        }
    /* the int32 pair sums of a group (unpacked: dword 4L + u holds channel 8L + u of lo, 8L + 4 + u of hi) in
       channel order */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        const int64_t nt = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t i0 = 0; i0 < nt; i0 += 16) {            /* scores of 16 positions a vector */
            const int nr = nt - i0 < 16 ? (int)(nt - i0) : 16;
            const int64_t t = t0 + i0;
            if (t + TILE < n)                                   /* the scales one tile ahead */
                for (int64_t bt = 0; bt < 16 * lds * 4; bt += 64) {
                    _mm_prefetch((const char *)(ks + (t + TILE) * lds) + bt, _MM_HINT_T0);
                    _mm_prefetch((const char *)(vs + (t + TILE) * lds) + bt, _MM_HINT_T0);
                }
            /* the 16 positions' key and value scales, 16 columns at a time: the transposes cost less than a
               gather a column (on Zen 5 the gathers, one a position in all, took ~12% of the kernel's time,
               these transposes ~8%) */
            for (int64_t c0 = 0; !blk && lds <= LDSMAX && c0 < lds; c0 += 16) {   /* blocked: stored so */
                const __mmask16 cols = lds - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (lds - c0)) - 1);
                __m512i x[16], y[16];
                for (int r = 0; r < 16; r++) {
                    x[r] = r < nr ? _mm512_maskz_loadu_epi32(cols, ks + (t + r) * lds + c0) : _mm512_setzero_si512();
                    y[r] = r < nr ? _mm512_maskz_loadu_epi32(cols, vs + (t + r) * lds + c0) : _mm512_setzero_si512();
                }
                transpose16(x);
                transpose16(y);
                for (int c = 0; c < 16 && c0 + c < lds; c++) {
                    _mm512_storeu_si512(kT + (c0 + c) * 16, x[c]);
                    _mm512_storeu_si512(vT + (c0 + c) * TILE + i0, y[c]);
                }
            }
            for (int64_t h = 0; h < hkv; h++) {
                __m512 s[GMAX];
                for (int j = 0; j < g; j++)
                    s[j] = _mm512_setzero_ps();
                for (int64_t ch = 0; ch * 64 < d; ch++) {     /* 64 channels (16 dwords) of 16 rows */
                    const int nq = d - ch * 64 >= 64 ? 16 : 8;
                    const __mmask16 cols = nq == 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
                    __m512i x[16];
                    if (blk) {                                  /* already a dword column a line */
                        const int8_t *kb = k + (t / 16) * hkv * d * 16 + (h * d / 4 + ch * 16) * 64;
                        for (int c = 0; c < nq; c++) {
                            x[c] = _mm512_loadu_si512(kb + c * 64);
                            if (t + TILE / 2 < n)               /* keys half a tile ahead */
                                _mm_prefetch((const char *)(kb + (TILE / 32) * hkv * d * 16 + c * 64), _MM_HINT_T0);
                        }
                    } else {
                        for (int r = 0; r < 16; r++) {
                            x[r] = r < nr ? _mm512_maskz_loadu_epi32(cols, k + (t + r) * ld + h * d + ch * 64)
                                          : _mm512_setzero_si512();
                            if (t + TILE / 2 + r < n)           /* keys half a tile ahead */
                                _mm_prefetch((const char *)(k + (t + TILE / 2 + r) * ld + h * d + ch * 64), _MM_HINT_T0);
                        }
                        transpose16(x);
                    }
                    for (int gl = 0; gl < nq / 8; gl++) {
                        const int64_t grp = ch * 2 + gl;
                        __m512i a[GMAX];
                        for (int j = 0; j < g; j++)
                            a[j] = _mm512_setzero_si512();
                        for (int c = gl * 8; c < gl * 8 + 8; c++) {
                            const __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(x[c], 8), 8);   /* channels 0, 2 */
                            const __m512i hi = _mm512_srai_epi16(x[c], 8);                          /* 1, 3 */
                            const int64_t cq = ch * 16 + c;
                            for (int j = 0; j < g; j++) {
                                const int32_t *qj = qp + (h * g + j) * QP + 2 * cq;
                                DPWSSD(a[j], lo, _mm512_set1_epi32(qj[0]));
                                DPWSSD(a[j], hi, _mm512_set1_epi32(qj[1]));
                            }
                        }
                        const __m512 kst = blk ? _mm512_loadu_ps(ks + t * lds + (h * G + grp) * 16)
                                         : lds <= LDSMAX ? _mm512_loadu_ps(kT + (h * G + grp) * 16)
                                                         : column16(ks + t * lds, lds, h * G + grp, nr);
                        for (int j = 0; j < g; j++)
                            s[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[j]),
                                                   _mm512_mul_ps(kst, _mm512_set1_ps(qsc[(h * g + j) * G + grp])), s[j]);
                    }
                }
                for (int j = 0; j < g; j++)
                    _mm512_storeu_ps(sc + (h * g + j) * TILE + i0, s[j]);
            }
        }
        softmax_update(sc, nt, hq, d, m, l, acc);
        for (int64_t h = 0; h < hkv; h++)
            for (int64_t grp = 0; grp < G; grp++) {
                float s16[GMAX];
                __m512 vst[TILE / 16];
                for (int64_t i0 = 0; i0 < nt; i0 += 16)
                    vst[i0 / 16] = blk ? _mm512_loadu_ps(vs + (t0 + i0) * lds + (h * G + grp) * 16)
                                 : lds <= LDSMAX ? _mm512_loadu_ps(vT + (h * G + grp) * TILE + i0)
                                                 : column16(vs + (t0 + i0) * lds, lds, h * G + grp, nt - i0 < 16 ? (int)(nt - i0) : 16);
                for (int j = 0; j < g; j++) {          /* weight x value scale, rounded to int16 over the tile */
                    __m512 pw[TILE / 16], top = _mm512_setzero_ps();
                    __mmask16 bad = 0;
                    for (int64_t i0 = 0; i0 < nt; i0 += 16) {
                        const __mmask16 rows = nt - i0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nt - i0)) - 1);
                        pw[i0 / 16] = _mm512_maskz_mul_ps(rows, _mm512_loadu_ps(sc + (h * g + j) * TILE + i0), vst[i0 / 16]);
                        bad |= _mm512_cmp_ps_mask(pw[i0 / 16], pw[i0 / 16], _CMP_UNORD_Q);
                        top = _mm512_max_ps(top, pw[i0 / 16]);
                    }
                    const float mx = _mm512_reduce_max_ps(top);
                    s16[j] = bad || !(mx <= 3.4e38f) ? __builtin_nanf("") : mx / 32767.0f;
                    const __m512 inv = _mm512_set1_ps(!bad && mx > 0.0f && mx <= 3.4e38f ? 32767.0f / mx : 0.0f);
                    for (int64_t i0 = 0; i0 < nt; i0 += 16)
                        _mm256_storeu_si256((__m256i *)(p16 + j * (TILE + 16) + i0),
                                           _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(pw[i0 / 16], inv))));
                }
                __m512i alo[GMAX], ahi[GMAX];
                for (int j = 0; j < g; j++)
                    alo[j] = ahi[j] = _mm512_setzero_si512();
                if (blk) {       /* a tile's pairs of positions in a row: 64 bytes a pair, a dword a channel at both
                                    (odd nt: the last pair's second weight is 0, rounded from a masked lane) */
                    const int8_t *vp = v + ((t0 / TILE * hkv + h) * G + grp) * (TILE / 2) * 64;
                    const int8_t *vnext = vp + hkv * G * (TILE / 2) * 64;
                    for (int64_t i = 0; i < nt; i += 2) {
                        if (t0 + TILE + i < n)                  /* the next tile's pair */
                            _mm_prefetch((const char *)(vnext + i * 32), _MM_HINT_T0);
                        const __m512i lo = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vp + i * 32)));
                        const __m512i hi = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vp + i * 32 + 32)));
                        for (int j = 0; j < g; j++) {
                            const __m512i pp = _mm512_set1_epi32(*(const int32_t *)(p16 + j * (TILE + 16) + i));
                            DPWSSD(alo[j], lo, pp);
                            DPWSSD(ahi[j], hi, pp);
                        }
                    }
                    for (int j = 0; j < g; j++) {               /* channels 0-15 in alo, 16-31 in ahi */
                        float *o = acc + (h * g + j) * d + grp * 32;
                        const __m512 sj = _mm512_set1_ps(s16[j]);
                        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(alo[j]), sj, _mm512_loadu_ps(o)));
                        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ahi[j]), sj, _mm512_loadu_ps(o + 16)));
                    }
                    continue;
                }
                const int8_t *vr = v + t0 * ld + h * d + grp * 32;
                for (int64_t i = 0; i < nt; i += 2) {          /* rows i, i + 1: a dword is a channel at both */
                    /* the next tile's rows i, i + 1 (the line of this group and the next: one a group pair) */
                    if (t0 + TILE + i + (grp & 1) < n)
                        _mm_prefetch((const char *)(vr + (TILE + i + (grp & 1)) * ld - (grp & 1) * 32), _MM_HINT_T0);
                    const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vr + i * ld)));
                    const __m512i b = i + 1 < nt ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vr + (i + 1) * ld)))
                                                 : _mm512_setzero_si512();
                    const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
                    for (int j = 0; j < g; j++) {
                        const __m512i pp = _mm512_set1_epi32(*(const int32_t *)(p16 + j * (TILE + 16) + i));
                        DPWSSD(alo[j], lo, pp);
                        DPWSSD(ahi[j], hi, pp);
                    }
                }
                for (int j = 0; j < g; j++) {
                    float *o = acc + (h * g + j) * d + grp * 32;
                    const __m512 sj = _mm512_set1_ps(s16[j]);
                    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(alo[j], first, ahi[j])),
                                                        sj, _mm512_loadu_ps(o)));
                    _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(alo[j], second, ahi[j])),
                                                             sj, _mm512_loadu_ps(o + 16)));
                }
            }
    }
}

/* one function a (g, layout): inlined into one dispatcher they slowed each other (~12% on Zen 5) */
#define VNNI_FN(G, BLK)                                                                                 \
    __attribute__((target("avx512f,avx512bw,avx512vnni"), noinline))                                   \
    static void attn_vnni_##G##_##BLK(const float *q, int64_t hkv, int64_t g, int64_t d, const int8_t *k,  \
                                      const int8_t *v, int64_t ld, const float *ks, const float *vs,    \
                                      int64_t lds, int64_t n, float *m, float *l, float *acc) {         \
        attn_vnni(q, hkv, G, d, k, v, ld, ks, vs, lds, n, m, l, acc, BLK);                              \
    }
VNNI_FN(1, 0) VNNI_FN(2, 0) VNNI_FN(4, 0) VNNI_FN(8, 0) VNNI_FN(g, 0)
VNNI_FN(1, 1) VNNI_FN(2, 1) VNNI_FN(4, 1) VNNI_FN(8, 1) VNNI_FN(g, 1)

#define DISPATCH_VNNI(BLK)                                                                             \
    switch (g) {                                                                                       \
    case 1: attn_vnni_1_##BLK(q, hkv, g, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;               \
    case 2: attn_vnni_2_##BLK(q, hkv, g, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;               \
    case 4: attn_vnni_4_##BLK(q, hkv, g, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;               \
    case 8: attn_vnni_8_##BLK(q, hkv, g, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;               \
    default: attn_vnni_g_##BLK(q, hkv, g, d, k, v, ld, ks, vs, lds, n, m, l, acc);                     \
    }

/* AVX-512 with VNNI: attn_vnni for an int8 cache in groups of 32 channels (d <= DMAX), attn512 otherwise;
   quant 2: an int8 cache in the blocked layout (kv_int8.py: keys and scales in blocks of 16 positions, values
   in tiles of 64; k, v, ks and vs at the first position, a multiple of 64; ld unused), which only this path
   reads: attention.py sends it nothing else */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void jt_attn_decode_vnni(const float *q, int64_t hkv, int64_t g, int64_t d, const void *k, const void *v, int64_t ld,
                         const float *ks, const float *vs, int64_t lds, int64_t gs, int64_t n,
                         float *m, float *l, float *acc, int64_t quant) {
    if (quant == 2) {
        if (gs == 32 && d % 32 == 0 && d <= DMAX)              /* else attention.py never sends it */
            DISPATCH_VNNI(1)
        return;
    }
    if (!quant || gs != 32 || d % 32 || d > DMAX) {
        jt_attn_decode(q, hkv, g, d, k, v, ld, ks, vs, lds, gs, n, m, l, acc, quant);
        return;
    }
    DISPATCH_VNNI(0)
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

/* the online softmax over a tile's scores sc [hq][TILE] (nt of them): the running max m and sum l, acc
   rescaled to the new max, sc replaced by exp(score - max) */
__attribute__((target("avx2,fma")))
static void softmax_update8(float *sc, int64_t nt, int64_t hq, int64_t d, float *m, float *l, float *acc) {
    for (int64_t j = 0; j < hq; j++) {
        float mt = m[j];
        int64_t i = 0;
        if (nt >= 8) {                      /* NaN scores are skipped, as by the comparison below */
            __m256 mx = _mm256_set1_ps(mt);
            for (; i + 8 <= nt; i += 8)
                mx = _mm256_max_ps(_mm256_loadu_ps(sc + j * TILE + i), mx);
            mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
            mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4E));
            mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xB1));
            mt = _mm256_cvtss_f32(mx);
        }
        for (; i < nt; i++)
            mt = sc[j * TILE + i] > mt ? sc[j * TILE + i] : mt;
        const float alpha = expf(m[j] - mt);
        m[j] = mt;
        l[j] = l[j] * alpha + exp_sum8(sc + j * TILE, nt, mt);
        const __m256 al = _mm256_set1_ps(alpha);
        for (int64_t c = 0; c < d / 8; c++)
            _mm256_storeu_ps(acc + j * d + c * 8, _mm256_mul_ps(_mm256_loadu_ps(acc + j * d + c * 8), al));
    }
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
        softmax_update8(sc, nt, hq, d, m, l, acc);
        /* values. int8: 8 channels of the g heads' outputs in registers through the tile's positions (the
           tile's int8 value rows, 64 x d bytes a head, stay in L1 across the channel blocks); each output
           takes the positions in order, as the float loop below does, at a third of its loads and stores.
           AMD Zen 3, 2 threads, 8 / 2 heads, d 128, the same bits: 0.85x the time at 16K positions, 0.96x
           at 64K. float32 (4x the bytes: the tile's rows leave L1): 1.33x, so that loop stays as it was. */
        if (!quant) {
            for (int64_t i = 0; i < nt; i++) {
                const int64_t t = t0 + i;
                for (int64_t h = 0; h < hkv; h++) {
                    __m256 p[GMAX];
                    for (int j = 0; j < g; j++)
                        p[j] = _mm256_set1_ps(sc[(h * g + j) * TILE + i]);
                    for (int64_t c = 0; c < C; c++) {
                        __m256 r = row8(v, t * ld + h * d + c * 8, 0, 1.0f);
                        for (int j = 0; j < g; j++) {
                            float *o = acc + (h * g + j) * d + c * 8;
                            _mm256_storeu_ps(o, _mm256_fmadd_ps(p[j], r, _mm256_loadu_ps(o)));
                        }
                    }
                }
            }
            continue;
        }
        for (int64_t h = 0; h < hkv; h++) {
            for (int64_t c = 0; c < C; c++) {
                __m256 o[GMAX];
                for (int j = 0; j < g; j++)
                    o[j] = _mm256_loadu_ps(acc + (h * g + j) * d + c * 8);
                for (int64_t i = 0; i < nt; i++) {
                    const int64_t t = t0 + i;
                    __m256 r = row8(v, t * ld + h * d + c * 8, 1, vs[t * lds + ((h * d / 8 + c) >> sh)]);
                    for (int j = 0; j < g; j++)
                        o[j] = _mm256_fmadd_ps(_mm256_set1_ps(sc[(h * g + j) * TILE + i]), r, o[j]);
                }
                for (int j = 0; j < g; j++)
                    _mm256_storeu_ps(acc + (h * g + j) * d + c * 8, o[j]);
            }
        }
    }
}

/* AVX2 over an int8 cache in groups of 32 channels: attn_vnni's integer path at 8 lanes, the same roundings
   (the query to int16 per group of 32, the softmax weights times the value scales to int16 per tile), so
   tests/test_kv_int8.py's bound of them holds for both. Without VNNI a 16-bit multiply-add is VPMADDWD and
   an add; 8 positions are the lanes (an 8 x 8 transpose of their keys' dwords), so a score needs no
   horizontal sum and no per-element conversion or scale; keys and values are prefetched a tile ahead. The
   values go through the tile 16 channels and up to 4 query heads at a time (their sums in 8 registers).
   AMD Zen 3 (two multiply-adds and four vector ALU operations a cycle), 8 / 2 heads, d 128, one thread, in the
   cache: 77 ns a position, 0.81x the first version's time with the same bits (the query pairs broadcast once
   instead of in the key loop, whose ALU slots they shared; the scale columns gathered, not stored and
   reloaded; no sum of the values loop spilled), against attn256 0.85x at 16K positions, 0.82x at 64K
   (2 threads, the first version). Of the 77 ns: the scores ~30, rounding the weights ~11, the values ~18, the
   softmax ~6-9 (llvm-mca: the key loop's ~7 cycles an iteration of 8 multiply-adds, the transposes besides). */

/* x[r] dword c -> x[c] dword r (r, c < 8) */
__attribute__((target("avx2"), always_inline))
static inline void transpose8(__m256i x[8]) {
    __m256i a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_epi32(x[i], x[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(x[i], x[i + 1]);
    }
    for (int R = 0; R < 2; R++) {           /* b[4R + m], 128-bit block L: rows 4R..4R+3 of column 4L + m */
        b[4 * R + 0] = _mm256_unpacklo_epi64(a[4 * R], a[4 * R + 2]);
        b[4 * R + 1] = _mm256_unpackhi_epi64(a[4 * R], a[4 * R + 2]);
        b[4 * R + 2] = _mm256_unpacklo_epi64(a[4 * R + 1], a[4 * R + 3]);
        b[4 * R + 3] = _mm256_unpackhi_epi64(a[4 * R + 1], a[4 * R + 3]);
    }
    for (int m = 0; m < 4; m++) {
        x[m] = _mm256_permute2x128_si256(b[m], b[4 + m], 0x20);
        x[4 + m] = _mm256_permute2x128_si256(b[m], b[4 + m], 0x31);
    }
}

/* 8 lanes of rows r < nr: the float at base + r * stride + off (0 beyond); one gather (scalar stores and a
   vector load of them would stall on store forwarding) */
__attribute__((target("avx2"), always_inline))
static inline __m256 column8(const float *base, int64_t stride, int64_t off, int nr) {
    const __m256i r = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i idx = _mm256_mullo_epi32(r, _mm256_set1_epi32((int)stride));
    if (nr >= 8)
        return _mm256_i32gather_ps(base + off, idx, 4);
    const __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nr), r));
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base + off, idx, mask, 4);
}

/* round16x32 in scalar code: x[0..32) * 32767 / max|x| rounded to int16 (0 where max|x| is 0), the scale
   max|x| / 32767 (NaN, and zeros, when x holds a NaN or an infinity) */
static inline float round32(const float *x, int16_t *out) {
    float top = 0.0f;
    int bad = 0;
    for (int i = 0; i < 32; i++) {
        const float a = fabsf(x[i]);
        bad |= !(a <= 3.4e38f);
        top = a > top ? a : top;
    }
    const float inv = bad || !(top > 0.0f) ? 0.0f : 32767.0f / top;
    for (int i = 0; i < 32; i++)
        out[i] = (int16_t)lrintf(x[i] * inv);
    return bad ? __builtin_nanf("") : top / 32767.0f;
}

__attribute__((target("avx2,fma"), always_inline))
static inline void attn_i16(const float *q, int64_t hkv, const int g, int64_t d, const int8_t *k, const int8_t *v,
                            int64_t ld, const float *ks, const float *vs, int64_t lds, int64_t n,
                            float *m, float *l, float *acc) {
    float sc[HQMAX * TILE];
    float qsc[HQMAX * DMAX / 32];                  /* head j, group: the query's scale */
    int16_t p16[GMAX * TILE];
    const int64_t G = d / 32, hq = hkv * g, QP = d / 2;
    /* head j, quad c: (q[4c], q[4c+2]) then (q[4c+1], q[4c+3]) in every lane, memory operands of the key loop's
       multiply-adds (broadcast there, each multiply-add brought a broadcast onto the vector pipes its shifts
       and adds use); up to 256 KB (HQMAX, DMAX) */
    __m256i qb[hq * QP];
    for (int64_t j = 0; j < hq; j++)
        for (int64_t grp = 0; grp < G; grp++) {
            int16_t w[32];
            qsc[j * G + grp] = round32(q + j * d + grp * 32, w);
            for (int c = 0; c < 8; c++) {
                __m256i *pair = qb + j * QP + grp * 16 + 2 * c;
                pair[0] = _mm256_set1_epi32((int32_t)(uint16_t)w[4 * c] | (int32_t)((uint32_t)(uint16_t)w[4 * c + 2] << 16));
                pair[1] = _mm256_set1_epi32((int32_t)(uint16_t)w[4 * c + 1] | (int32_t)((uint32_t)(uint16_t)w[4 * c + 3] << 16));
            }
        }
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        const int64_t nt = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t i0 = 0; i0 < nt; i0 += 8) {             /* scores of 8 positions a vector */
            const int nr = nt - i0 < 8 ? (int)(nt - i0) : 8;
            const int64_t t = t0 + i0;
            for (int64_t h = 0; h < hkv; h++) {
                __m256 s[GMAX];
                for (int j = 0; j < g; j++)
                    s[j] = _mm256_setzero_ps();
                for (int64_t grp = 0; grp < G; grp++) {       /* 32 channels (8 dwords) of 8 rows */
                    __m256i x[8], a[GMAX];
                    for (int r = 0; r < 8; r++) {
                        x[r] = r < nr ? _mm256_loadu_si256((const __m256i *)(k + (t + r) * ld + h * d + grp * 32))
                                      : _mm256_setzero_si256();
                        if (t + TILE + r < n) {                 /* keys and values one tile ahead (T0) */
                            _mm_prefetch((const char *)(k + (t + TILE + r) * ld + h * d + grp * 32), _MM_HINT_T0);
                            _mm_prefetch((const char *)(v + (t + TILE + r) * ld + h * d + grp * 32), _MM_HINT_T0);
                        }
                    }
                    transpose8(x);
                    for (int j = 0; j < g; j++)
                        a[j] = _mm256_setzero_si256();
                    for (int c = 0; c < 8; c++) {
                        const __m256i lo = _mm256_srai_epi16(_mm256_slli_epi16(x[c], 8), 8);   /* channels 0, 2 */
                        const __m256i hi = _mm256_srai_epi16(x[c], 8);                          /* 1, 3 */
                        for (int j = 0; j < g; j++) {
                            const __m256i *qj = qb + (h * g + j) * QP + grp * 16 + 2 * c;
                            a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(lo, qj[0]));
                            a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(hi, qj[1]));
                        }
                    }
                    const __m256 kst = column8(ks + t * lds, lds, h * G + grp, nr);
                    for (int j = 0; j < g; j++)
                        s[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[j]),
                                               _mm256_mul_ps(kst, _mm256_set1_ps(qsc[(h * g + j) * G + grp])), s[j]);
                }
                for (int j = 0; j < g; j++)
                    _mm256_storeu_ps(sc + (h * g + j) * TILE + i0, s[j]);
            }
        }
        softmax_update8(sc, nt, hq, d, m, l, acc);
        for (int64_t h = 0; h < hkv; h++)
            for (int64_t grp = 0; grp < G; grp++) {
                float s16[GMAX];
                __m256 vst[TILE / 8];
                for (int64_t i0 = 0; i0 < nt; i0 += 8)
                    vst[i0 / 8] = column8(vs + (t0 + i0) * lds, lds, h * G + grp, nt - i0 < 8 ? (int)(nt - i0) : 8);
                for (int j = 0; j < g; j++) {          /* weight x value scale, rounded to int16 over the tile */
                    __m256 pw[TILE / 8], top = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
                    for (int64_t i0 = 0; i0 < nt; i0 += 8) {
                        pw[i0 / 8] = _mm256_mul_ps(_mm256_loadu_ps(sc + (h * g + j) * TILE + i0), vst[i0 / 8]);
                        if (nt - i0 < 8)               /* lanes past the tile: 0 */
                            pw[i0 / 8] = _mm256_and_ps(pw[i0 / 8], _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                _mm256_set1_epi32((int)(nt - i0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
                        bad = _mm256_or_ps(bad, _mm256_cmp_ps(pw[i0 / 8], pw[i0 / 8], _CMP_UNORD_Q));
                        top = _mm256_max_ps(top, pw[i0 / 8]);
                    }
                    float tops[8];
                    _mm256_storeu_ps(tops, top);
                    float mx = 0.0f;
                    for (int r = 0; r < 8; r++)
                        mx = tops[r] > mx ? tops[r] : mx;
                    const int nan = _mm256_movemask_ps(bad) != 0 || !(mx <= 3.4e38f);
                    s16[j] = nan ? __builtin_nanf("") : mx / 32767.0f;
                    const __m256 inv = _mm256_set1_ps(!nan && mx > 0.0f ? 32767.0f / mx : 0.0f);
                    for (int64_t i0 = 0; i0 < nt; i0 += 8) {
                        const __m256i w32 = _mm256_cvtps_epi32(_mm256_mul_ps(pw[i0 / 8], inv));
                        _mm_storeu_si128((__m128i *)(p16 + j * TILE + i0),
                                         _mm_packs_epi32(_mm256_castsi256_si128(w32), _mm256_extracti128_si256(w32, 1)));
                    }
                }
                /* 16 channels and gb heads at a time: 2 gb sums in registers (gb, like g, a compile-time constant
                   where g is one: the loops over j unroll) */
                const int gb = g < 4 ? g : 4;
                const int64_t ne = nt & ~(int64_t)1;    /* rows with a next row (a test of i + 1 < nt: 1.1x the time) */
                for (int half = 0; half < 2; half++)
                    for (int j0 = 0; j0 < g; j0 += gb) {
                        const int gj = g - j0 < gb ? g - j0 : gb;
                        __m256i alo[4], ahi[4];
                        for (int j = 0; j < gb; j++)
                            alo[j] = ahi[j] = _mm256_setzero_si256();
                        const int8_t *vr = v + t0 * ld + h * d + grp * 32 + half * 16;
                        for (int64_t i = 0; i < nt; i += 2) {  /* rows i, i + 1: a dword is a channel at both */
                            const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(vr + i * ld)));
                            const __m256i b = i < ne ? _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(vr + (i + 1) * ld)))
                                                     : _mm256_setzero_si256();
                            /* dwords: lo channels 0-3, 8-11; hi 4-7, 12-15 (unpacks stay within 128-bit lanes) */
                            const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
                            for (int j = 0; j < gj; j++) {
                                /* the pointer through an empty asm: gcc may not load the next head's pair before
                                   this one's sums are updated (hoisted, the pairs take 4 registers and gcc spills
                                   a sum, whose store-to-load chain then bounds the loop) */
                                const int16_t *pj = p16 + (j0 + j) * TILE + i;
                                __asm__ volatile("" : "+r"(pj) : "x"(alo[j > 0 ? j - 1 : 0]));
                                const __m256i pp = _mm256_set1_epi32(*(const int32_t *)pj);
                                alo[j] = _mm256_add_epi32(alo[j], _mm256_madd_epi16(lo, pp));
                                ahi[j] = _mm256_add_epi32(ahi[j], _mm256_madd_epi16(hi, pp));
                            }
                        }
                        for (int j = 0; j < gj; j++) {
                            float *o = acc + (h * g + j0 + j) * d + grp * 32 + half * 16;
                            const __m256 sj = _mm256_set1_ps(s16[j0 + j]);
                            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(
                                _mm256_permute2x128_si256(alo[j], ahi[j], 0x20)), sj, _mm256_loadu_ps(o)));
                            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(
                                _mm256_permute2x128_si256(alo[j], ahi[j], 0x31)), sj, _mm256_loadu_ps(o + 8)));
                        }
                    }
            }
    }
}

__attribute__((target("avx2,fma")))
void jt_attn_decode_avx2(const float *q, int64_t hkv, int64_t g, int64_t d, const void *k, const void *v, int64_t ld,
                         const float *ks, const float *vs, int64_t lds, int64_t gs, int64_t n,
                         float *m, float *l, float *acc, int64_t quant) {
    if (quant && gs == 32 && d % 32 == 0 && d <= DMAX) {
        switch (g) {
        case 1: attn_i16(q, hkv, 1, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;
        case 2: attn_i16(q, hkv, 2, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;
        case 4: attn_i16(q, hkv, 4, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;
        case 8: attn_i16(q, hkv, 8, d, k, v, ld, ks, vs, lds, n, m, l, acc); break;
        default: attn_i16(q, hkv, (int)g, d, k, v, ld, ks, vs, lds, n, m, l, acc);
        }
    } else if (quant) {
        DISPATCH_G(attn256, 1)
    } else {
        DISPATCH_G(attn256, 0)
    }
}

/* The GEMVs of the ORT engine's decode step: int8 weights (jt_gemv_int8*, first) and float32 weights
   (jt_gemv_f32*, last). The int8 GEMV on x86-64 CPUs with AVX512-VNNI (jt_gemv_int8) or AVX2
   (jt_gemv_int8_avx2, below); each function names its instruction set, so one build serves both and
   native.py loads the one the CPU runs. linear_int8.py's `_gemv_int8` calls it and keeps its numba loop
   for every other CPU.

   out[m, n] = xs[m] * scale[n] * sum_k xq[m, k] * w[n, k]

   x [M, K] float32 arrives as 31-bit fixed point per row, xq = round(x / xs) with |xq| <= 2^30, split in two
   int16 halves xq = 65536 * hi + lo (hi in [-2^14, 2^14], lo in [-2^15, 2^15)), each zero-padded to Kp, a
   multiple of 32. VPDPWSSD multiplies 32 int16 pairs and adds them into 16 int32 lanes in one instruction, so
   a 32-weight slice costs one widening (int8 -> int16) and two multiply-adds: a third of the widen/convert/FMA
   instructions of the float32 loop, which made that loop compute-bound below the memory bandwidth.
   The sums are exact integers (int32 lanes, widened to int64 every BLOCK weights: lane sums stay under 2^31
   for |w| <= 128), so the only error is x's rounding to 31 bits: |error| <= 2^-31 * max|x| * sum_k |w[n, k]|
   before the final product, which is rounded to float32 once.

   One weight row at a time (one sequential stream per thread: interleaving four rows' streams read 0.6x
   the bytes per second here), every row of x against it while it is in L1. A cache line of weights goes
   through four multiply-add chains (two did one line per 8 cycles, VPDPWSSD's latency 4 a chain: ~60 GB/s on
   two Zen 5 cores at 3.8 GHz whatever the memory gave), and the stream is prefetched PREFETCH bytes ahead
   within the thread's rows. AMD Zen 5, 2 threads, a 184 MB matrix (the int8 peer model's bytes a decode step),
   C harness, the same runs: two chains 55.8-61 GB/s, four chains and the prefetch 72-84, a plain read 81-90;
   when the memory gave less, 46.5-47.4 / 51.7-52.8 / 53.4-57 (the prefetch alone: 4 KB ahead 52.5-53.1, 8 KB
   53-56.5, 1 KB no gain). The int8 decode step of the peer model, the two builds alternating in one process:
   0.936x the time after 512 tokens, 0.929x after 16K. */

#include <immintrin.h>
#include <stdint.h>

#include "simd_math.h"

#define BLOCK 4096   /* weights per lane flush: K/32 products of <= 2^23 per lane stay < 2^31 up to 8192 */
#define PREFETCH 8192

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static inline __m512i widen_add(__m512i acc64, __m512i lanes32) {
    acc64 = _mm512_add_epi64(acc64, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes32)));
    return _mm512_add_epi64(acc64, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes32, 1)));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void jt_gemv_int8(const int16_t *xh, const int16_t *xl, const double *xs, int64_t M, int64_t Kp,
                  const int8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1,
                  float *out, int64_t ldo) {
    const int64_t stop = n1 * K;                  /* the thread's last weight: prefetches stay before it */
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *hm = xh + m * Kp, *lm = xl + m * Kp;
            __m512i h64 = _mm512_setzero_si512(), l64 = h64;
            for (int64_t b = 0; b < K; b += BLOCK) {
                int64_t e = b + BLOCK < K ? b + BLOCK : K;
                __m512i h32 = _mm512_setzero_si512(), l32 = h32, h32b = h32, l32b = h32;
                int64_t k = b;
                for (; k + 64 <= e; k += 64) {     /* a cache line: four multiply-add chains */
                    if (m == 0 && n * K + k + PREFETCH < stop)
                        _mm_prefetch((const char *)(row + k + PREFETCH), _MM_HINT_T0);
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
                    __m512i wv2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k + 32)));
                    DPWSSD(h32, _mm512_loadu_si512(hm + k), wv);
                    DPWSSD(l32, _mm512_loadu_si512(lm + k), wv);
                    DPWSSD(h32b, _mm512_loadu_si512(hm + k + 32), wv2);
                    DPWSSD(l32b, _mm512_loadu_si512(lm + k + 32), wv2);
                }
                h32 = _mm512_add_epi32(h32, h32b);
                l32 = _mm512_add_epi32(l32, l32b);
                for (; k + 32 <= e; k += 32) {
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
                    DPWSSD(h32, _mm512_loadu_si512(hm + k), wv);
                    DPWSSD(l32, _mm512_loadu_si512(lm + k), wv);
                }
                if (k < e) {   /* the row's tail: masked bytes are not read; x is zero-padded to Kp */
                    __mmask32 mask = (__mmask32)((1ull << (e - k)) - 1);
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row + k));
                    DPWSSD(h32, _mm512_loadu_si512(hm + k), wv);
                    DPWSSD(l32, _mm512_loadu_si512(lm + k), wv);
                }
                h64 = widen_add(h64, h32);
                l64 = widen_add(l64, l32);
            }
            double dot = 65536.0 * (double)_mm512_reduce_add_epi64(h64) + (double)_mm512_reduce_add_epi64(l64);
            out[m * ldo + n] = (float)(dot * xs[m] * (double)scale[n]);
        }
    }
}

/* The same on AVX2 (no VNNI): VPMADDWD multiplies 16 int16 pairs into 8 int32 lanes, VPADDD adds them up.
   32 weights an iteration into two accumulators per half, and the weight stream prefetched PREFETCH2 bytes
   ahead (into the next rows at a row's end): AMD Zen 3, 2 threads, a 92 MB matrix, interleaved in one
   process: 25.3 GB/s with 16 weights an iteration and no prefetch, 26.2 unrolled, 30.1 unrolled and
   prefetched (a plain read of the bytes: 30.9). The hardware prefetcher alone keeps too few lines in flight.
   A lane gains <= 2^23 per 32 weights, so the lanes are widened every 2048. */
#define BLOCK2 2048
#define PREFETCH2 1024

__attribute__((target("avx2")))
static inline __m256i widen_add2(__m256i acc64, __m256i lanes32) {
    acc64 = _mm256_add_epi64(acc64, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(lanes32)));
    return _mm256_add_epi64(acc64, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(lanes32, 1)));
}

__attribute__((target("avx2")))
static inline int64_t hsum64(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* h32 += xh[k..k+15] . w16, l32 += xl[k..k+15] . w16 (w16: 16 weights widened to int16) */
__attribute__((target("avx2")))
static inline void madd16(__m256i w16, const int16_t *hm, const int16_t *lm, __m256i *h32, __m256i *l32) {
    *h32 = _mm256_add_epi32(*h32, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)hm), w16));
    *l32 = _mm256_add_epi32(*l32, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)lm), w16));
}

__attribute__((target("avx2")))
void jt_gemv_int8_avx2(const int16_t *xh, const int16_t *xl, const double *xs, int64_t M, int64_t Kp,
                       const int8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1,
                       float *out, int64_t ldo) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *hm = xh + m * Kp, *lm = xl + m * Kp;
            __m256i h64 = _mm256_setzero_si256(), l64 = h64;
            for (int64_t b = 0; b < K; b += BLOCK2) {
                int64_t e = b + BLOCK2 < K ? b + BLOCK2 : K;
                __m256i h0 = _mm256_setzero_si256(), l0 = h0, h1 = h0, l1 = h0;
                int64_t k = b;
                for (; k + 32 <= e; k += 32) {
                    if (m == 0)
                        _mm_prefetch((const char *)(row + k + PREFETCH2), _MM_HINT_T0);
                    madd16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k))), hm + k, lm + k, &h0, &l0);
                    madd16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k + 16))),
                           hm + k + 16, lm + k + 16, &h1, &l1);
                }
                for (; k + 16 <= e; k += 16)
                    madd16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k))), hm + k, lm + k, &h0, &l0);
                if (k < e) {   /* the row's tail through a zeroed copy (no masked byte loads in AVX2) */
                    int8_t tail[16] = {0};
                    for (int64_t i = 0; i < e - k; i++)
                        tail[i] = row[k + i];
                    madd16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)tail)), hm + k, lm + k, &h1, &l1);
                }
                h64 = widen_add2(widen_add2(h64, h0), h1);
                l64 = widen_add2(widen_add2(l64, l0), l1);
            }
            double dot = 65536.0 * (double)hsum64(h64) + (double)hsum64(l64);
            out[m * ldo + n] = (float)(dot * xs[m] * (double)scale[n]);
        }
    }
}

/* float32 weights (linear_f32.py, the default export's linear layers): out[m, n] = sum_k x[m, k] * w[n, k],
   x [M, K], w [N, K], out [M, ldo], rows n0..n1-1. Four independent accumulators of 16 lanes per row keep
   the FMA latency off the stream; the row tail is a masked load (no byte past the row is read). ONNX
   Runtime's MatMul read the peer preset's 465 MB of float32 decode weights at 24.7 GB/s, this at 32.7
   (back to back, 2 threads, interleaved; issue 18). */
__attribute__((target("avx512f")))
void jt_gemv_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t n0, int64_t n1,
                 float *out, int64_t ldo) {
    for (int64_t n = n0; n < n1; n++) {
        const float *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(xm + k), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k + 16), _mm512_loadu_ps(xm + k + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k + 32), _mm512_loadu_ps(xm + k + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k + 48), _mm512_loadu_ps(xm + k + 48), a3);
            }
            for (; k + 16 <= K; k += 16)
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(xm + k), a0);
            if (k < K) {
                __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
                a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, row + k), _mm512_maskz_loadu_ps(mask, xm + k), a1);
            }
            out[m * ldo + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        }
    }
}

/* The same with AVX2 + FMA: 8 lanes, four accumulators, a scalar tail. (Prefetching the weights as
   jt_gemv_int8_avx2 does made this loop 1.0-1.17x slower: it reads at the bandwidth already.) */
__attribute__((target("avx2,fma")))
void jt_gemv_f32_avx2(const float *x, int64_t M, int64_t K, const float *w, int64_t n0, int64_t n1,
                      float *out, int64_t ldo) {
    for (int64_t n = n0; n < n1; n++) {
        const float *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 16), _mm256_loadu_ps(xm + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 24), _mm256_loadu_ps(xm + k + 24), a3);
            }
            for (; k + 8 <= K; k += 8)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(xm + k), a0);
            __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float acc = _mm_cvtss_f32(h);
            for (; k < K; k++)
                acc += row[k] * xm[k];
            out[m * ldo + n] = acc;
        }
    }
}

/* The int8 GEMV of the ORT engine's decode step on CPUs with AVX512-VNNI (native.py builds and loads it;
   linear_int8.py's `_gemv_int8` calls it and keeps its numba loop for every other CPU).

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
   the bytes per second here), every row of x against it while it is in L1. */

#include <immintrin.h>
#include <stdint.h>

#define BLOCK 4096   /* weights per lane flush: K/32 products of <= 2^23 per lane stay < 2^31 up to 8192 */

static inline __m512i widen_add(__m512i acc64, __m512i lanes32) {
    acc64 = _mm512_add_epi64(acc64, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes32)));
    return _mm512_add_epi64(acc64, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes32, 1)));
}

void jt_gemv_int8(const int16_t *xh, const int16_t *xl, const double *xs, int64_t M, int64_t Kp,
                  const int8_t *w, int64_t K, const float *scale, int64_t n0, int64_t n1,
                  float *out, int64_t ldo) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *hm = xh + m * Kp, *lm = xl + m * Kp;
            __m512i h64 = _mm512_setzero_si512(), l64 = h64;
            for (int64_t b = 0; b < K; b += BLOCK) {
                int64_t e = b + BLOCK < K ? b + BLOCK : K;
                __m512i h32 = _mm512_setzero_si512(), l32 = h32;
                int64_t k = b;
                for (; k + 32 <= e; k += 32) {
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + k)));
                    h32 = _mm512_dpwssd_epi32(h32, _mm512_loadu_si512(hm + k), wv);
                    l32 = _mm512_dpwssd_epi32(l32, _mm512_loadu_si512(lm + k), wv);
                }
                if (k < e) {   /* the row's tail: masked bytes are not read; x is zero-padded to Kp */
                    __mmask32 mask = (__mmask32)((1ull << (e - k)) - 1);
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row + k));
                    h32 = _mm512_dpwssd_epi32(h32, _mm512_loadu_si512(hm + k), wv);
                    l32 = _mm512_dpwssd_epi32(l32, _mm512_loadu_si512(lm + k), wv);
                }
                h64 = widen_add(h64, h32);
                l64 = widen_add(l64, l32);
            }
            double dot = 65536.0 * (double)_mm512_reduce_add_epi64(h64) + (double)_mm512_reduce_add_epi64(l64);
            out[m * ldo + n] = (float)(dot * xs[m] * (double)scale[n]);
        }
    }
}

/* The float32 GEMM of the ORT engine's prefill on AVX2 CPUs without AVX-512 (linear_int8.py, linear_f32.py
   say when it runs): int8 weights as stored (--weights-int8 and ExpertsInt8; where the CPU has no VNNI, whose
   integer limb GEMM runs instead) or float32 weights, float32 activations, products and sums, an int8
   weight's per-channel scale applied to the finished sums.

       out[m, n] = scale[n] * sum_k x[m, k] * w[n, k]      x [M, K] float32, w [N, K] int8 or float32

   Before this kernel, int8 weights were dequantised a block at a time to float32 (one pass over N*K,
   written and read back) for torch's float32 GEMM, which is also slow on short M (a MoE expert's 100-200
   tokens). Here the weights become float32 as they are packed for the multiply, which the GEMM does anyway,
   so int8 weights cost nothing over float32 ones. AMD Zen 3 (AVX2), 2 threads, interleaved, the peer
   preset's shapes, int8 weights: 108-126 GFLOP/s (the FMA peak measured there: ~175), 0.80-0.92x the time
   of the dequantise + torch path at M = 512, 0.64-0.71x at M = 128; torch's GEMM on float32 weights:
   81-131. float32 weights against oneDNN's GEMM (through torch): 0.89-1.08x its time per shape, 0.93x the
   float32 peer engine's prefill of 512 tokens (median of 6 interleaved rounds).

   The usual blocking of a packed GEMM (Goto / BLIS): for each NC columns of w (a thread's range) and KC
   of K, w's block is packed as float32 16-column micro-panels [KC][16] (in L2/L3), x's MC x KC block as
   6-row micro-panels [KC][6] (in L2), and a 6 x 16 register tile (12 accumulators) takes one broadcast
   of x and two loads of w per k. Sums over K run in order within a KC block, blocks added in order:
   the error is float32 accumulation's, |error| <= K * 2^-24 * sum_k |x w| (before the scale). */

#include <immintrin.h>
#include <stdint.h>

#define MR 6
#define NR 16
#define KC 512
#define MC 96
#define NC 1024

/* eight rows of 8 floats s[j][i] -> d[i * NR + j] (i, j < 8): column i of the rows at d + i * NR */
__attribute__((target("avx2"), always_inline))
static inline void store_transposed8(const __m256 s[8], float *d) {
    __m256 t0 = _mm256_unpacklo_ps(s[0], s[1]), t1 = _mm256_unpackhi_ps(s[0], s[1]);
    __m256 t2 = _mm256_unpacklo_ps(s[2], s[3]), t3 = _mm256_unpackhi_ps(s[2], s[3]);
    __m256 t4 = _mm256_unpacklo_ps(s[4], s[5]), t5 = _mm256_unpackhi_ps(s[4], s[5]);
    __m256 t6 = _mm256_unpacklo_ps(s[6], s[7]), t7 = _mm256_unpackhi_ps(s[6], s[7]);
    __m256 u[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                   _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                   _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                   _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
    for (int i = 0; i < 4; i++) {                 /* column i: u[i] low half, u[i + 4] high half */
        _mm256_storeu_ps(d + i * NR, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * NR, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}

/* w rows n0..n0+nr-1 (nr <= NR), columns k0..k0+kc-1, int8 (f32 0) or float32 (f32 1), as float32
   bp[k][NR] (rows past nr: zeros). A full panel goes 16 rows x 8 columns at a time, two 8 x 8 transposes. */
__attribute__((target("avx2,fma")))
static void pack_w(const void *w, int f32, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc, float *bp) {
    const int8_t *w8 = (const int8_t *)w;
    const float *w32 = (const float *)w;
    int64_t k = 0;
    if (nr == NR)
        for (; k + 8 <= kc; k += 8)
            for (int h = 0; h < 2; h++) {
                __m256 s[8];
                for (int j = 0; j < 8; j++) {
                    const int64_t at = (n0 + 8 * h + j) * K + k0 + k;
                    s[j] = f32 ? _mm256_loadu_ps(w32 + at)
                               : _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w8 + at))));
                }
                store_transposed8(s, bp + k * NR + 8 * h);
            }
    for (; k < kc; k++)
        for (int64_t j = 0; j < NR; j++) {
            const int64_t at = (n0 + j) * K + k0 + k;
            bp[k * NR + j] = j >= nr ? 0.0f : f32 ? w32[at] : (float)w8[at];
        }
}

/* x rows m0..m0+mr-1 (mr <= MR), columns k0..k0+kc-1, as ap[k][MR] (rows past mr: zeros) */
static void pack_x(const float *x, int64_t K, int64_t m0, int64_t mr, int64_t k0, int64_t kc, float *ap) {
    for (int64_t i = 0; i < MR; i++) {
        const float *src = x + (m0 + i) * K + k0;
        for (int64_t k = 0; k < kc; k++)
            ap[k * MR + i] = i < mr ? src[k] : 0.0f;
    }
}

/* c[MR][NR] (+= when accumulate) ap[kc][MR] x bp[kc][NR], times scale[0..NR) when scale is given (the last
   K block); only rows < mr and columns < nr of c are written. */
__attribute__((target("avx2,fma")))
static void tile(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int64_t mr, int64_t nr,
                 int accumulate, const float *scale) {
    /* twelve named accumulators: an array of them is kept on the stack by gcc, a store per FMA */
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < kc; k++, ap += MR, bp += NR) {
        __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), a;
#define ROW(i, lo, hi) a = _mm256_broadcast_ss(ap + i); lo = _mm256_fmadd_ps(a, b0, lo); hi = _mm256_fmadd_ps(a, b1, hi)
        ROW(0, c00, c01); ROW(1, c10, c11); ROW(2, c20, c21); ROW(3, c30, c31); ROW(4, c40, c41); ROW(5, c50, c51);
#undef ROW
    }
    __m256 acc[2 * MR] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++) {
            float *ci = c + i * ldc;
            __m256 v0 = acc[2 * i], v1 = acc[2 * i + 1];
            if (accumulate) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci + 8));
            }
            if (scale) {
                v0 = _mm256_mul_ps(v0, _mm256_loadu_ps(scale));
                v1 = _mm256_mul_ps(v1, _mm256_loadu_ps(scale + 8));
            }
            _mm256_storeu_ps(ci, v0);
            _mm256_storeu_ps(ci + 8, v1);
        }
        return;
    }
    float part[MR * NR] __attribute__((aligned(32)));
    for (int i = 0; i < 2 * MR; i++)
        _mm256_store_ps(part + 8 * i, acc[i]);
    for (int64_t i = 0; i < mr; i++)
        for (int64_t j = 0; j < nr; j++) {
            float v = part[i * NR + j] + (accumulate ? c[i * ldc + j] : 0.0f);
            c[i * ldc + j] = scale ? v * scale[j] : v;
        }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The float32 scratch one call needs (its packed blocks of w and x): the caller allocates it. */
int64_t jt_gemm_scratch(void) { return (int64_t)(NC + MC) * KC; }

/* out[m, n] for n in [n0, n1) (out [M, ldo]); w int8 (w_f32 0) or float32 (1); scale [N], or NULL (no scale);
   x, w, scale C-contiguous; scratch: jt_gemm_scratch() floats of this call's own (one per thread). */
__attribute__((target("avx2,fma")))
void jt_gemm_avx2(const float *x, int64_t M, int64_t K, const void *w, int64_t w_f32, const float *scale,
                  int64_t n0, int64_t n1, float *out, int64_t ldo, float *scratch) {
    float *bp = scratch, *ap = scratch + NC * KC;
    if (K == 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = n0; n < n1; n++)
                out[m * ldo + n] = 0.0f;       /* (scale * 0, but for an infinite or NaN scale) */
    for (int64_t jc = n0; jc < n1; jc += NC) {
        int64_t nc = min64(n1 - jc, NC);
        for (int64_t pc = 0; pc < K; pc += KC) {
            int64_t kc = min64(K - pc, KC);
            int last = pc + kc >= K;
            for (int64_t jr = 0; jr < nc; jr += NR)
                pack_w(w, (int)w_f32, K, jc + jr, min64(nc - jr, NR), pc, kc, bp + jr * kc);
            for (int64_t ic = 0; ic < M; ic += MC) {
                int64_t mc = min64(M - ic, MC);
                for (int64_t ir = 0; ir < mc; ir += MR)
                    pack_x(x, K, ic + ir, min64(mc - ir, MR), pc, kc, ap + ir * kc);
                for (int64_t jr = 0; jr < nc; jr += NR)
                    for (int64_t ir = 0; ir < mc; ir += MR)
                        tile(kc, ap + ir * kc, bp + jr * kc, out + (ic + ir) * ldo + jc + jr, ldo,
                             min64(mc - ir, MR), min64(nc - jr, NR), pc > 0, last && scale ? scale + jc + jr : 0);
            }
        }
    }
}

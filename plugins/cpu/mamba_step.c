/* One decode step of Mamba's selective scan (d_state 16) for the native decode step (mamba_mixer.py
   `_mixer_step` calls it per sequence and range of channels; native.py builds it with the other kernels).
   For channels d in [d0, d1) of one sequence, the arrays being that sequence's rows:

       dt      = softplus(delta[d] + dbias[d])                  (torch's: x above 20 stays x)
       h[d, :] = exp(dt * A[d, :]) * h0[d, :] + dt * u[d] * B   (16 states: one register)
       y[d]    = (sum_n h[d, n] C[n] + Dskip[d] u[d]) * silu(z[d])   (times 1 when has_z is 0)

   numba's `_step_kernel` (selective_scan.py) computes the same with the same exp and log polynomials but
   sums C . h one lane per channel, which on the [d, n] state layout reads it at a stride of 16 floats;
   here a channel's 16 states are one vector and its sum one horizontal reduction, and softplus and silu
   run 16 channels at a time: ~4x fewer instructions. The sum's order differs from numba's, so the two agree
   to float32 rounding, not bit for bit. jt_scan_step16_avx2 (below) is the same on AVX2 + FMA: a channel's
   states two 8-lane vectors, softplus and silu 8 channels at a time. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd_math.h"

/* softplus(x) as torch computes it (x above 20 stays x), 16 lanes */
__attribute__((target("avx512f"), always_inline))
static inline __m512 softplus16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = exp16(x), mp = _mm512_add_ps(one, e);
    /* log1p(e) = log(1 + e) * e / ((1 + e) - 1), exact for e below float32's epsilon (then 1 + e == 1) */
    __m512 lp = _mm512_mul_ps(log16(mp), _mm512_div_ps(e, _mm512_sub_ps(mp, one)));
    lp = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mp, one, _CMP_EQ_OQ), lp, e);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(20.0f), _CMP_GT_OQ), lp, x);
}

/* silu(z) = z / (1 + exp(-z)), 16 lanes */
__attribute__((target("avx512f"), always_inline))
static inline __m512 silu16(__m512 z) {
    return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}

__attribute__((target("avx512f")))
void jt_scan_step16(const float *u, const float *delta, const float *A, const float *Bv, const float *Cv,
                    const float *Dskip, const float *z, int64_t has_z, const float *dbias, const float *h0,
                    float *y, float *h_out, int64_t d0, int64_t d1) {
    const __m512 Bn = _mm512_loadu_ps(Bv), Cn = _mm512_loadu_ps(Cv);
    float dt[16], tu[16], sums[16];
    for (int64_t c = d0; c < d1; c += 16) {
        int64_t nw = d1 - c < 16 ? d1 - c : 16;
        __mmask16 m = (__mmask16)((1u << nw) - 1);
        __m512 t = softplus16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, delta + c), _mm512_maskz_loadu_ps(m, dbias + c)));
        __m512 uu = _mm512_maskz_loadu_ps(m, u + c);
        _mm512_storeu_ps(dt, t);
        _mm512_storeu_ps(tu, _mm512_mul_ps(t, uu));
        for (int64_t j = 0; j < nw; j++) {
            const int64_t d = c + j;
            __m512 h = _mm512_fmadd_ps(exp16(_mm512_mul_ps(_mm512_set1_ps(dt[j]), _mm512_loadu_ps(A + 16 * d))),
                                       _mm512_loadu_ps(h0 + 16 * d), _mm512_mul_ps(_mm512_set1_ps(tu[j]), Bn));
            _mm512_storeu_ps(h_out + 16 * d, h);
            sums[j] = _mm512_reduce_add_ps(_mm512_mul_ps(h, Cn));
        }
        __m512 out = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, Dskip + c), uu, _mm512_maskz_loadu_ps(m, sums));
        if (has_z)
            out = _mm512_mul_ps(out, silu16(_mm512_maskz_loadu_ps(m, z + c)));
        _mm512_mask_storeu_ps(y + c, m, out);
    }
}

/* jt_scan_step16 on AVX2 + FMA. AMD Zen 3, the int8 peer preset's Mamba mixer step (D 2048): 197 us above
   its GEMVs with numba's `_step_kernel` (see _mixer_step). */
__attribute__((target("avx2,fma")))
void jt_scan_step16_avx2(const float *u, const float *delta, const float *A, const float *Bv, const float *Cv,
                         const float *Dskip, const float *z, int64_t has_z, const float *dbias, const float *h0,
                         float *y, float *h_out, int64_t d0, int64_t d1) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 B0 = _mm256_loadu_ps(Bv), B1 = _mm256_loadu_ps(Bv + 8);
    const __m256 C0 = _mm256_loadu_ps(Cv), C1 = _mm256_loadu_ps(Cv + 8);
    float dt[8], tu[8], sums[8];
    for (int64_t c = d0; c < d1; c += 8) {
        int64_t nw = d1 - c < 8 ? d1 - c : 8;
        /* lanes j < nw: the masked loads read nothing past d1 and give 0 elsewhere */
        __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nw), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 x = _mm256_add_ps(_mm256_maskload_ps(delta + c, m), _mm256_maskload_ps(dbias + c, m));
        __m256 e = exp8(x), mp = _mm256_add_ps(one, e);
        __m256 lp = _mm256_mul_ps(log8(mp), _mm256_div_ps(e, _mm256_sub_ps(mp, one)));   /* log1p(e), as above */
        lp = _mm256_blendv_ps(lp, e, _mm256_cmp_ps(mp, one, _CMP_EQ_OQ));
        __m256 t = _mm256_blendv_ps(lp, x, _mm256_cmp_ps(x, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
        __m256 uu = _mm256_maskload_ps(u + c, m);
        _mm256_storeu_ps(dt, t);
        _mm256_storeu_ps(tu, _mm256_mul_ps(t, uu));
        for (int64_t j = 0; j < nw; j++) {
            const int64_t d = c + j;
            const __m256 dtj = _mm256_set1_ps(dt[j]), tuj = _mm256_set1_ps(tu[j]);
            __m256 ha = _mm256_fmadd_ps(exp8(_mm256_mul_ps(dtj, _mm256_loadu_ps(A + 16 * d))),
                                        _mm256_loadu_ps(h0 + 16 * d), _mm256_mul_ps(tuj, B0));
            __m256 hb = _mm256_fmadd_ps(exp8(_mm256_mul_ps(dtj, _mm256_loadu_ps(A + 16 * d + 8))),
                                        _mm256_loadu_ps(h0 + 16 * d + 8), _mm256_mul_ps(tuj, B1));
            _mm256_storeu_ps(h_out + 16 * d, ha);
            _mm256_storeu_ps(h_out + 16 * d + 8, hb);
            sums[j] = hsum8(_mm256_fmadd_ps(ha, C0, _mm256_mul_ps(hb, C1)));
        }
        __m256 out = _mm256_fmadd_ps(_mm256_maskload_ps(Dskip + c, m), uu, _mm256_maskload_ps(sums, m));
        if (has_z) {
            __m256 zz = _mm256_maskload_ps(z + c, m);
            out = _mm256_mul_ps(out, _mm256_div_ps(zz, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), zz)))));
        }
        _mm256_maskstore_ps(y + c, m, out);
    }
}

/* A prefill chunk of the scan (d_state 16) over channels [d0, d1) of one sequence, the rows time-major as
   the fused int8 Mamba mixer keeps them: u, delta, z and y at row t + ld* (channels contiguous), B and C
   at Bm + t * ldbc, Cm + t * ldbc (16 states), A, h0, h_out [D, 16] (h_out carries the states between
   tiles). Lanes are 16 channels, the exp and log polynomials numba's `_scan_kernel` uses, C . h in four
   partial sums (so the two agree to float32 rounding, not bit for bit). Time goes in tiles of TT steps,
   each block of 16 channels in turn through a tile with its 16 states in registers; the tile's softplus,
   dt u, D u and silu(z) are computed in a first pass, so the states' exp and multiply-add chains never wait
   on them. That pass is what made it faster: with them inline this loop, like numba's, took ~45 cycles a
   16-lane state update (latency-bound), ~19-33 with it (one thread, AMD Zen 5; the fused mixer's int8
   prefill 0.95x the time). */
#define TT 32

__attribute__((target("avx512f")))
void jt_scan_chunk16(const float *u, int64_t ldu, const float *delta, int64_t ldd, const float *z, int64_t ldz,
                     const float *Bm, const float *Cm, int64_t ldbc, const float *A, const float *Dskip,
                     const float *dbias, const float *h0, float *y, int64_t ldy, float *h_out,
                     int64_t L, int64_t d0, int64_t d1) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
    memcpy(h_out + 16 * d0, h0 + 16 * d0, (size_t)(d1 - d0) * 16 * sizeof(float));
    for (int64_t t0 = 0; t0 < L; t0 += TT) {
        const int64_t t1 = t0 + TT < L ? t0 + TT : L;
        for (int64_t c = d0; c < d1; c += 16) {
            const __mmask16 m = (__mmask16)((1u << (d1 - c < 16 ? d1 - c : 16)) - 1);
            float a[16 * 16];                          /* state n's A over the block: a + 16 n (read as operands) */
            __m512 h[16];
            #pragma GCC unroll 16
            for (int n = 0; n < 16; n++) {
                _mm512_storeu_ps(a + 16 * n, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, A + 16 * c + n, 4));
                h[n] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, h_out + 16 * c + n, 4);
            }
            const __m512 bias = _mm512_maskz_loadu_ps(m, dbias + c), dsk = _mm512_maskz_loadu_ps(m, Dskip + c);
            __m512 dts[TT], dtus[TT], dus[TT], szs[TT];    /* the tile's per-step terms first: off the states' chains */
            for (int64_t t = t0; t < t1; t++) {
                const __m512 dt = softplus16(_mm512_add_ps(_mm512_maskz_loadu_ps(m, delta + t * ldd + c), bias));
                const __m512 uu = _mm512_maskz_loadu_ps(m, u + t * ldu + c);
                dts[t - t0] = dt;
                dtus[t - t0] = _mm512_mul_ps(dt, uu);
                dus[t - t0] = _mm512_mul_ps(dsk, uu);
                szs[t - t0] = silu16(_mm512_maskz_loadu_ps(m, z + t * ldz + c));
            }
            for (int64_t t = t0; t < t1; t++) {
                const __m512 dt = dts[t - t0], dtu = dtus[t - t0];
                const float *bt = Bm + t * ldbc, *ct = Cm + t * ldbc;
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                #pragma GCC unroll 16
                for (int n = 0; n < 16; n++) {
                    h[n] = _mm512_fmadd_ps(exp16(_mm512_mul_ps(dt, _mm512_loadu_ps(a + 16 * n))), h[n],
                                           _mm512_mul_ps(dtu, _mm512_set1_ps(bt[n])));
                    acc[n % 4] = _mm512_fmadd_ps(h[n], _mm512_set1_ps(ct[n]), acc[n % 4]);
                }
                const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                _mm512_mask_storeu_ps(y + t * ldy + c, m, _mm512_mul_ps(_mm512_add_ps(sum, dus[t - t0]), szs[t - t0]));
            }
            #pragma GCC unroll 16
            for (int n = 0; n < 16; n++)
                _mm512_mask_i32scatter_ps(h_out + 16 * c + n, m, rows, h[n], 4);
        }
    }
}

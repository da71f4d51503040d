// rnnrec_fast AVX-512 float32 GEMM (packed-B, 8x32 register-blocked micro-kernel).
//
// Compiled for AVX-512F via a target pragma so the portable build still contains it; the driver
// calls it only after a run-time CPU check. No torch header may be included here.
//   C[M, N] = (beta ? C : 0) + A . op(B),   A(i, k) = A[i * a_si + k * a_sk]
// op(B) (K x N) is first packed into panels of 32 columns: panel p holds K rows of 32 floats
// (zero padded), so the micro-kernel streams it with aligned-size vector loads.
#include "rnnrec_kernels.h"

#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace rnnrec {
namespace {

constexpr int64_t NR = 32;

}  // namespace

static inline __m256 _mm512_extractf32x8_ps_compat(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

namespace {
constexpr int MR = 8;

template <int R>
static inline void micro(int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp, float* C,
                         int64_t ldc, int64_t nvalid, bool acc) {
  __m512 c0[R], c1[R];
  for (int i = 0; i < R; ++i) {
    c0[i] = _mm512_setzero_ps();
    c1[i] = _mm512_setzero_ps();
  }
  if (sk == 1) {
    for (int64_t k = 0; k < K; ++k) {
      const __m512 b0 = _mm512_loadu_ps(Bp + k * NR);
      const __m512 b1 = _mm512_loadu_ps(Bp + k * NR + 16);
      for (int i = 0; i < R; ++i) {
        const __m512 a = _mm512_set1_ps(A[i * si + k]);
        c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
        c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const __m512 b0 = _mm512_loadu_ps(Bp + k * NR);
      const __m512 b1 = _mm512_loadu_ps(Bp + k * NR + 16);
      const float* ak = A + k * sk;
      for (int i = 0; i < R; ++i) {
        const __m512 a = _mm512_set1_ps(ak[i * si]);
        c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
        c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
      }
    }
  }
  const __mmask16 m0 = nvalid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nvalid) - 1u);
  const int64_t n1 = nvalid - 16;
  const __mmask16 m1 = n1 >= 16 ? __mmask16(0xFFFF) : (n1 <= 0 ? __mmask16(0) : __mmask16((1u << n1) - 1u));
  for (int i = 0; i < R; ++i) {
    float* ci = C + i * ldc;
    __m512 v0 = c0[i], v1 = c1[i];
    if (acc) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), v1);
    }
    _mm512_mask_storeu_ps(ci, m0, v0);
    _mm512_mask_storeu_ps(ci + 16, m1, v1);
  }
}

}  // namespace

int64_t avx512_packed_size(int64_t K, int64_t N) { return K * ((N + NR - 1) / NR) * NR; }

void avx512_pack_b(bool transB, int64_t K, int64_t N, const float* B, int64_t ldb, float* out) {
  const int64_t np = (N + NR - 1) / NR;
  for (int64_t p = 0; p < np; ++p) {
    float* dst = out + p * K * NR;
    const int64_t n0 = p * NR;
    const int64_t nv = N - n0 < NR ? N - n0 : NR;
    if (!transB) {  // B[k, n] at B[k * ldb + n]
      const __mmask16 m0 = nv >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nv) - 1u);
      const int64_t n1 = nv - 16;
      const __mmask16 m1 = n1 >= 16 ? __mmask16(0xFFFF) : (n1 <= 0 ? __mmask16(0) : __mmask16((1u << n1) - 1u));
      for (int64_t k = 0; k < K; ++k) {
        const float* src = B + k * ldb + n0;
        _mm512_storeu_ps(dst + k * NR, _mm512_maskz_loadu_ps(m0, src));
        _mm512_storeu_ps(dst + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
      }
    } else {  // B[k, n] at B[n * ldb + k]: transpose 32 weight rows into the panel
      for (int64_t k = 0; k < K; ++k) {
        float* d = dst + k * NR;
        int64_t n = 0;
        for (; n < nv; ++n) d[n] = B[(n0 + n) * ldb + k];
        for (; n < NR; ++n) d[n] = 0.0f;
      }
    }
  }
}

void avx512_gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                        const float* Bp, bool beta, float* C, int64_t ldc) {
  const int64_t np = (N + NR - 1) / NR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    const float* Ai = A + i * a_si;
    for (int64_t p = 0; p < np; ++p) {
      const int64_t n0 = p * NR;
      micro<MR>(K, Ai, a_si, a_sk, Bp + p * K * NR, C + i * ldc + n0, ldc, N - n0, beta);
    }
  }
  const int64_t rem = M - i;
  if (rem > 0) {
    const float* Ai = A + i * a_si;
    for (int64_t p = 0; p < np; ++p) {
      const int64_t n0 = p * NR;
      const float* bp = Bp + p * K * NR;
      float* c = C + i * ldc + n0;
      switch (rem) {
        case 1: micro<1>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
        case 2: micro<2>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
        case 3: micro<3>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
        case 4: micro<4>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
        case 5: micro<5>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
        case 6: micro<6>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
        default: micro<7>(K, Ai, a_si, a_sk, bp, c, ldc, N - n0, beta); break;
      }
    }
  }
}

// out[j] = W[j, :] . x for j < M (one batch row): eight weight rows at a time (eight memory
// streams in flight), 16-wide FMAs; a masked tail for K % 16.
static inline __m256 fold256(__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps_compat(v)); }

void avx512_gemv_nt(int64_t M, int64_t K, const float* W, int64_t ldw, const float* x, float* out) {
  const int64_t kf = K & ~int64_t(15);
  const __mmask16 mt = __mmask16((1u << (K - kf)) - 1u);
  int64_t j = 0;
  for (; j + 8 <= M; j += 8) {
    const float* w = W + j * ldw;
    __m512 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < kf; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * ldw + k), xv, a[r]);
    }
    if (k < K) {
      const __m512 xv = _mm512_maskz_loadu_ps(mt, x + k);
      for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mt, w + r * ldw + k), xv, a[r]);
    }
    const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(fold256(a[0]), fold256(a[1])), _mm256_hadd_ps(fold256(a[2]), fold256(a[3])));
    const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(fold256(a[4]), fold256(a[5])), _mm256_hadd_ps(fold256(a[6]), fold256(a[7])));
    // lo = [s0 s1 s2 s3 | s0' s1' s2' s3'] (two 128-bit halves to add), same for hi
    const __m256 sw = _mm256_permute2f128_ps(lo, hi, 0x20);  // [lo.low, hi.low]
    const __m256 sh = _mm256_permute2f128_ps(lo, hi, 0x31);  // [lo.high, hi.high]
    _mm256_storeu_ps(out + j, _mm256_add_ps(sw, sh));
  }
  for (; j < M; ++j) {
    const float* w0 = W + j * ldw;
    __m512 a0 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < kf; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), _mm512_loadu_ps(x + k), a0);
    if (k < K) a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mt, w0 + k), _mm512_maskz_loadu_ps(mt, x + k), a0);
    out[j] = _mm512_reduce_add_ps(a0);
  }
}

}  // namespace rnnrec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // RNNREC_HAVE_AVX2_TU

// rnnrec_fast AVX2/FMA float32 kernels.
//
// Everything after the includes is compiled for AVX2+FMA (target pragma), so that the default,
// portable build still contains them; rnnrec_cpu.cpp calls them only after a run-time CPU check.
// No torch header may be included here (see rnnrec_kernels.h).
#include "rnnrec_kernels.h"

#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace rnnrec {
namespace {

// ------------------------------------------------------------------------------------------------
// Vector math. exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor
// polynomial for e^r (truncation error < 1e-8 relative), scaling by 2^n through the exponent bits.
// ------------------------------------------------------------------------------------------------
static inline __m256 v_exp(__m256 x) {
  // operand order keeps NaN: max/min return the second operand when either is NaN
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvtps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(n));
}

static inline __m256 v_abs(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

// sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) for x < 0 (no cancellation, no overflow)
static inline __m256 v_sigmoid(__m256 x) {
  const __m256 e = v_exp(_mm256_sub_ps(_mm256_setzero_ps(), v_abs(x)));
  const __m256 s = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(s, _mm256_mul_ps(e, s), neg);
}

// tanh: odd Taylor polynomial (5 terms) for |x| < 0.25, (1 - e^-2|x|) / (1 + e^-2|x|) otherwise.
static inline __m256 v_tanh(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = v_abs(x);
  const __m256 e = v_exp(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
  const __m256 big = _mm256_div_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), e), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 x2 = _mm256_mul_ps(a, a);
  __m256 p = _mm256_set1_ps(62.0f / 2835.0f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-17.0f / 315.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.0f / 15.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3.0f));
  p = _mm256_mul_ps(p, x2);
  const __m256 small = _mm256_fmadd_ps(p, a, a);
  const __m256 use_small = _mm256_cmp_ps(a, _mm256_set1_ps(0.25f), _CMP_LT_OQ);
  return _mm256_or_ps(_mm256_blendv_ps(big, small, use_small), sign);
}

// ------------------------------------------------------------------------------------------------
// Full / tail vector access: every row kernel is written once as a generic lambda over an accessor.
// ------------------------------------------------------------------------------------------------
struct Full {
  inline __m256 ld(const float* p) const { return _mm256_loadu_ps(p); }
  inline void st(float* p, __m256 v) const { _mm256_storeu_ps(p, v); }
};
struct Tail {
  __m256i m;
  explicit Tail(int64_t n)
      : m(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))) {}
  inline __m256 ld(const float* p) const { return _mm256_maskload_ps(p, m); }
  inline void st(float* p, __m256 v) const { _mm256_maskstore_ps(p, m, v); }
};

template <typename F>
static inline void for_vec(int64_t H, const F& f) {
  int64_t j = 0;
  const Full full;
  for (; j + 8 <= H; j += 8) f(j, full);
  if (j < H) f(j, Tail(H - j));
}

static inline __m256 one() { return _mm256_set1_ps(1.0f); }

// ------------------------------------------------------------------------------------------------
// Row kernels (same math and order of operations as the scalar ones in rnnrec_cpu.cpp)
// ------------------------------------------------------------------------------------------------
void v_rnn_fwd(int64_t H, const float* xp, const float* hp, const float* bi, const float* bh, float* y,
               int relu) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 pre = _mm256_add_ps(_mm256_add_ps(A.ld(xp + j), A.ld(bi + j)), _mm256_add_ps(A.ld(hp + j), A.ld(bh + j)));
    A.st(y + j, relu ? _mm256_max_ps(_mm256_setzero_ps(), pre) : v_tanh(pre));
  });
}

void v_gru_fwd_ra(int64_t H, const float* xp, const float* hp, const float* bi, const float* bh, float* ws,
                  float* y) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 r = v_sigmoid(_mm256_add_ps(_mm256_add_ps(A.ld(xp + j), A.ld(bi + j)),
                                       _mm256_add_ps(A.ld(hp + j), A.ld(bh + j))));
    __m256 z = v_sigmoid(_mm256_add_ps(_mm256_add_ps(A.ld(xp + H + j), A.ld(bi + H + j)),
                                       _mm256_add_ps(A.ld(hp + H + j), A.ld(bh + H + j))));
    __m256 hn = _mm256_add_ps(A.ld(hp + 2 * H + j), A.ld(bh + 2 * H + j));
    __m256 n = v_tanh(_mm256_add_ps(_mm256_add_ps(A.ld(xp + 2 * H + j), A.ld(bi + 2 * H + j)), _mm256_mul_ps(r, hn)));
    __m256 h = A.ld(ws + j);
    A.st(y + j, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(one(), z), n), _mm256_mul_ps(z, h)));
    A.st(ws + H + j, r);
    A.st(ws + 2 * H + j, z);
    A.st(ws + 3 * H + j, n);
    A.st(ws + 4 * H + j, hn);
  });
}

void v_gru_fwd_a(int64_t H, const float* xp, const float* hp, const float* bi, const float* bh, float* ws,
                 float* rh) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 r = v_sigmoid(_mm256_add_ps(_mm256_add_ps(A.ld(xp + j), A.ld(bi + j)),
                                       _mm256_add_ps(A.ld(hp + j), A.ld(bh + j))));
    __m256 z = v_sigmoid(_mm256_add_ps(_mm256_add_ps(A.ld(xp + H + j), A.ld(bi + H + j)),
                                       _mm256_add_ps(A.ld(hp + H + j), A.ld(bh + H + j))));
    A.st(ws + H + j, r);
    A.st(ws + 2 * H + j, z);
    A.st(rh + j, _mm256_mul_ps(r, A.ld(ws + j)));
  });
}

void v_gru_fwd_b(int64_t H, const float* xp, const float* bi, const float* bh, float* ws, float* y) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 hn = _mm256_add_ps(A.ld(ws + 4 * H + j), A.ld(bh + 2 * H + j));
    __m256 n = v_tanh(_mm256_add_ps(_mm256_add_ps(A.ld(xp + 2 * H + j), A.ld(bi + 2 * H + j)), hn));
    __m256 z = A.ld(ws + 2 * H + j);
    A.st(y + j, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(one(), z), n), _mm256_mul_ps(z, A.ld(ws + j))));
    A.st(ws + 3 * H + j, n);
    A.st(ws + 4 * H + j, hn);
  });
}

void v_rnn_bwd(int64_t H, float* dh, const float* gy, const float* y, float* dgx, int relu) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 g = _mm256_add_ps(A.ld(dh + j), A.ld(gy + j));
    __m256 yy = A.ld(y + j);
    __m256 ag = relu ? _mm256_and_ps(_mm256_cmp_ps(yy, _mm256_setzero_ps(), _CMP_GT_OQ), one())
                     : _mm256_sub_ps(one(), _mm256_mul_ps(yy, yy));
    A.st(dgx + j, _mm256_mul_ps(g, ag));
    A.st(dh + j, _mm256_setzero_ps());
  });
}

void v_gru_bwd_ra(int64_t H, float* dh, const float* gy, const float* ws, float* dgx, float* dgh, float* dhn_out) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 g = _mm256_add_ps(A.ld(dh + j), A.ld(gy + j));
    __m256 hprev = A.ld(ws + j), r = A.ld(ws + H + j), z = A.ld(ws + 2 * H + j), n = A.ld(ws + 3 * H + j),
           hn = A.ld(ws + 4 * H + j);
    __m256 dn = _mm256_mul_ps(g, _mm256_sub_ps(one(), z));
    __m256 dz = _mm256_mul_ps(g, _mm256_sub_ps(hprev, n));
    __m256 dn_pre = _mm256_mul_ps(dn, _mm256_sub_ps(one(), _mm256_mul_ps(n, n)));
    __m256 dz_pre = _mm256_mul_ps(_mm256_mul_ps(dz, z), _mm256_sub_ps(one(), z));
    __m256 dr = _mm256_mul_ps(dn_pre, hn);
    __m256 dhn = _mm256_mul_ps(dn_pre, r);
    __m256 dr_pre = _mm256_mul_ps(_mm256_mul_ps(dr, r), _mm256_sub_ps(one(), r));
    A.st(dgx + j, dr_pre);
    A.st(dgx + H + j, dz_pre);
    A.st(dgx + 2 * H + j, dn_pre);
    A.st(dgh + j, dr_pre);
    A.st(dgh + H + j, dz_pre);
    A.st(dgh + 2 * H + j, dhn);
    A.st(dhn_out + j, dhn);
    A.st(dh + j, _mm256_mul_ps(g, z));
  });
}

void v_gru_bwd_1(int64_t H, float* dh, const float* gy, const float* ws, float* dgx) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 g = _mm256_add_ps(A.ld(dh + j), A.ld(gy + j));
    __m256 hprev = A.ld(ws + j), z = A.ld(ws + 2 * H + j), n = A.ld(ws + 3 * H + j);
    __m256 dn = _mm256_mul_ps(g, _mm256_sub_ps(one(), z));
    __m256 dz = _mm256_mul_ps(g, _mm256_sub_ps(hprev, n));
    A.st(dgx + 2 * H + j, _mm256_mul_ps(dn, _mm256_sub_ps(one(), _mm256_mul_ps(n, n))));
    A.st(dgx + H + j, _mm256_mul_ps(_mm256_mul_ps(dz, z), _mm256_sub_ps(one(), z)));
    A.st(dh + j, _mm256_mul_ps(g, z));
  });
}

void v_gru_bwd_2(int64_t H, float* dh, const float* drh, const float* ws, float* dgx, float* hin) {
  for_vec(H, [&](int64_t j, const auto& A) {
    __m256 hprev = A.ld(ws + j), r = A.ld(ws + H + j), d = A.ld(drh + j);
    A.st(dgx + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(d, hprev), r), _mm256_sub_ps(one(), r)));
    A.st(dh + j, _mm256_add_ps(A.ld(dh + j), _mm256_mul_ps(d, r)));
    A.st(hin + j, _mm256_mul_ps(r, hprev));
  });
}

// ------------------------------------------------------------------------------------------------
// Small-batch product out[b, j] = W[j, :] . X[b, :] with W row-major (as stored by PyTorch).
// RB weight rows x NB batch rows of accumulators, k in chunks of 8 (masked tail).
// ------------------------------------------------------------------------------------------------
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// four horizontal sums at once -> (sum a, sum b, sum c, sum d)
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 ab = _mm256_hadd_ps(a, b);
  __m256 cd = _mm256_hadd_ps(c, d);
  __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

template <int NB, int RB>
static void gemm_nt_block(int64_t j0, int64_t K, const float* W, int64_t ldw, const float* X, int64_t ldx,
                          float* out, int64_t ldo) {
  __m256 acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(X + b * ldx + k);
    for (int r = 0; r < RB; ++r) {
      const __m256 wv = _mm256_loadu_ps(W + (j0 + r) * ldw + k);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  if (k < K) {
    const Tail T(K - k);
    __m256 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = T.ld(X + b * ldx + k);
    for (int r = 0; r < RB; ++r) {
      const __m256 wv = T.ld(W + (j0 + r) * ldw + k);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  if (RB == 4) {
    for (int b = 0; b < NB; ++b) {
      __m128 s = hsum4(acc[0][b], acc[1 % RB][b], acc[2 % RB][b], acc[3 % RB][b]);
      _mm_storeu_ps(out + b * ldo + j0, s);
    }
  } else {
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < NB; ++b) out[b * ldo + j0 + r] = hsum(acc[r][b]);
  }
}

template <int NB>
static void gemm_nt_nb(int64_t M, int64_t K, const float* W, int64_t ldw, const float* X, int64_t ldx, float* out,
                       int64_t ldo) {
  constexpr int RB = NB == 1 ? 4 : (NB == 2 ? 4 : (NB <= 4 ? 2 : 1));
  int64_t j = 0;
  for (; j + RB <= M; j += RB) gemm_nt_block<NB, RB>(j, K, W, ldw, X, ldx, out, ldo);
  for (; j < M; ++j) gemm_nt_block<NB, 1>(j, K, W, ldw, X, ldx, out, ldo);
}

}  // namespace

RowKernels<float> avx2_row_kernels_f32() {
  RowKernels<float> k;
  k.rnn_fwd = &v_rnn_fwd;
  k.gru_fwd_ra = &v_gru_fwd_ra;
  k.gru_fwd_a = &v_gru_fwd_a;
  k.gru_fwd_b = &v_gru_fwd_b;
  k.rnn_bwd = &v_rnn_bwd;
  k.gru_bwd_ra = &v_gru_bwd_ra;
  k.gru_bwd_1 = &v_gru_bwd_1;
  k.gru_bwd_2 = &v_gru_bwd_2;
  return k;
}

void avx2_small_gemm_nt_f32(int64_t nb, int64_t M, int64_t K, const float* W, int64_t ldw, const float* X,
                            int64_t ldx, float* out, int64_t ldo) {
  while (nb > 0) {
    const int64_t c = nb >= 8 ? 8 : nb;
    switch (c) {
      case 1: gemm_nt_nb<1>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 2: gemm_nt_nb<2>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 3: gemm_nt_nb<3>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 4: gemm_nt_nb<4>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 5: gemm_nt_nb<5>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 6: gemm_nt_nb<6>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 7: gemm_nt_nb<7>(M, K, W, ldw, X, ldx, out, ldo); break;
      default: gemm_nt_nb<8>(M, K, W, ldw, X, ldx, out, ldo); break;
    }
    nb -= c;
    X += c * ldx;
    out += c * ldo;
  }
}

}  // namespace rnnrec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // RNNREC_HAVE_AVX2_TU

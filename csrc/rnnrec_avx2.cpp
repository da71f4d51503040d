// rnnrec_fast AVX2/FMA float32 kernels.
//
// Everything after the includes is compiled for AVX2+FMA (target pragma), so that the default,
// portable build still contains them; rnnrec_cpu.cpp calls them only after a run-time CPU check.
// No torch header may be included here (see rnnrec_kernels.h).
#include "rnnrec_kernels.h"

#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <limits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace rnnrec {
namespace {

// ------------------------------------------------------------------------------------------------
// 8-lane vector layer for the row kernels (rnnrec_rows.inc) and the small products below.
// ------------------------------------------------------------------------------------------------
using vf = __m256;
using vm = __m256;
static inline vf vset(float c) { return _mm256_set1_ps(c); }
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vldexp(vf p, vf n) {  // p * 2^n through 2^n's exponent bits
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
}
static inline vm vlt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline vm vle(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
static inline vf vselect(vm m, vf a, vf b) { return _mm256_blendv_ps(b, a, m); }

struct Full {
  inline vf ld(const float* p) const { return _mm256_loadu_ps(p); }
  inline void st(float* p, vf v) const { _mm256_storeu_ps(p, v); }
};
// The last n < 8 lanes of a row. Masked loads are cheap; a masked store (vmaskmovps) costs ~10
// cycles on Zen 3, so the tail is stored in 4-, 2- and 1-lane pieces instead.
struct Tail {
  __m256i m;
  int n;
  explicit Tail(int64_t n_)
      : m(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n_)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))),
        n(static_cast<int>(n_)) {}
  inline vf ld(const float* p) const { return _mm256_maskload_ps(p, m); }
  inline void st(float* p, vf v) const {
    __m128 q = _mm256_castps256_ps128(v);
    if (n & 4) {
      _mm_storeu_ps(p, q);
      q = _mm256_extractf128_ps(v, 1);
      p += 4;
    }
    if (n & 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), q);
      q = _mm_movehl_ps(q, q);
      p += 2;
    }
    if (n & 1) _mm_store_ss(p, q);
  }
};

template <typename F>
static inline void for_vec(int64_t H, const F& f) {
  int64_t j = 0;
  const Full full;
  for (; j + 8 <= H; j += 8) f(j, full);
  if (j < H) f(j, Tail(H - j));
}

#include "rnnrec_rows.inc"

// ------------------------------------------------------------------------------------------------
// Small-batch product out[b, j] = W[j, :] . X[b, :] with W row-major (as stored by PyTorch).
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

// RB weight rows x NB rows of X, in RB x NB accumulators, k in chunks of 8 (masked tail). Two
// register blockings: the NB rows of X of a chunk held in registers and each weight row loaded as
// it is used (WRegs false: 1 x 4, 5..8 x 1), or the RB weight rows held and each row of X loaded as
// it is used (WRegs true: 2 x 6, 3 x 4, 4 x 3 fill the 16 registers; per chunk, RB + NB loads
// feed RB x NB FMAs).
template <int NB, int RB, bool WRegs>
static void gemm_nt_block(int64_t j0, int64_t K, const float* W, int64_t ldw, const float* X, int64_t ldx,
                          float* out, int64_t ldo) {
  __m256 acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  const auto chunk = [&](int64_t k, const auto& L) {
    if constexpr (WRegs) {
      __m256 wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = L.ld(W + (j0 + r) * ldw + k);
      for (int b = 0; b < NB; ++b) {
        const __m256 xv = L.ld(X + b * ldx + k);
        for (int r = 0; r < RB; ++r) acc[r][b] = _mm256_fmadd_ps(wv[r], xv, acc[r][b]);
      }
    } else {
      __m256 xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = L.ld(X + b * ldx + k);
      for (int r = 0; r < RB; ++r) {
        const __m256 wv = L.ld(W + (j0 + r) * ldw + k);
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) chunk(k, Full());
  if (k < K) chunk(k, Tail(K - k));
  if constexpr (RB == 4 && !WRegs) {
    for (int b = 0; b < NB; ++b) {
      __m128 s = hsum4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]);
      _mm_storeu_ps(out + b * ldo + j0, s);
    }
  } else if constexpr (NB == 1) {
    // one row of X: a weight row left over from the groups of 4 adds its lanes in hsum4's order, so
    // an output's bits do not depend on where its row falls (thread slices, the gemv's blocks)
    const __m256 z = _mm256_setzero_ps();
    for (int r = 0; r < RB; ++r) out[j0 + r] = _mm_cvtss_f32(hsum4(acc[r][0], z, z, z));
  } else {
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < NB; ++b) out[b * ldo + j0 + r] = hsum(acc[r][b]);
  }
}

// out[b, j] for NB rows of X and all M weight rows: blocks of RB weight rows, then one at a time.
template <int NB, int RB, bool WRegs>
static void gemm_nt_rows(int64_t M, int64_t K, const float* W, int64_t ldw, const float* X, int64_t ldx, float* out,
                         int64_t ldo) {
  int64_t j = 0;
  for (; j + RB <= M; j += RB) gemm_nt_block<NB, RB, WRegs>(j, K, W, ldw, X, ldx, out, ldo);
  for (; j < M; ++j) gemm_nt_block<NB, 1, false>(j, K, W, ldw, X, ldx, out, ldo);
}

// acc[0, 4V) += the column sums of R rows of 4V floats (ld apart), in V double accumulators.
template <int V>
static inline void col_sums_block(int64_t R, const float* A, int64_t ld, double* acc) {
  __m256d s[V];
  for (int v = 0; v < V; ++v) s[v] = _mm256_loadu_pd(acc + 4 * v);
  for (int64_t r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) s[v] = _mm256_add_pd(s[v], _mm256_cvtps_pd(_mm_loadu_ps(A + r * ld + 4 * v)));
  for (int v = 0; v < V; ++v) _mm256_storeu_pd(acc + 4 * v, s[v]);
}

}  // namespace

void avx2_col_sums_f32(int64_t R, int64_t C, const float* A, int64_t ld, double* acc) {
  // 32 columns at a time in eight 4-lane double accumulators, then 8 in two, then one by one; every
  // column adds its rows in order, as the portable loop does (the same bits).
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) col_sums_block<8>(R, A + c, ld, acc + c);
  for (; c + 8 <= C; c += 8) col_sums_block<2>(R, A + c, ld, acc + c);
  for (; c < C; ++c) {
    double s = acc[c];
    for (int64_t r = 0; r < R; ++r) s += double(A[r * ld + c]);
    acc[c] = s;
  }
}

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

// Rows of X in groups of up to 8: 2, 3 and 4 rows with the weight rows in registers (2 x 6, 3 x 4,
// 4 x 3), 1 and 5 to 8 rows with the rows of X in registers (one weight row at a time; 4 for one
// row of X). Measured at T = 20 (forward, one thread, A/B interleaved): B = 3 153 -> 133 us
// at H = 100 and 810 -> 720 us at H = 256, B = 4 189 -> 175 and 980 -> 885 us, B = 2 -5%. Groups of 4
// for 5 to 8 rows looked better standalone for weights larger than L2, but were 2-7% slower in the
// forward at H = 256.
void avx2_small_gemm_nt_f32(int64_t nb, int64_t M, int64_t K, const float* W, int64_t ldw, const float* X,
                            int64_t ldx, float* out, int64_t ldo) {
  while (nb > 0) {
    const int64_t c = nb >= 8 ? 8 : nb;
    switch (c) {
      case 1: gemm_nt_rows<1, 4, false>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 2: gemm_nt_rows<2, 6, true>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 3: gemm_nt_rows<3, 4, true>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 4: gemm_nt_rows<4, 3, true>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 5: gemm_nt_rows<5, 1, false>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 6: gemm_nt_rows<6, 1, false>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 7: gemm_nt_rows<7, 1, false>(M, K, W, ldw, X, ldx, out, ldo); break;
      default: gemm_nt_rows<8, 1, false>(M, K, W, ldw, X, ldx, out, ldo); break;
    }
    nb -= c;
    X += c * ldx;
    out += c * ldo;
  }
}

// select_topk's small-k selection (rnnrec_cpu.cpp: the k largest of s[0..N) into vals / idx, best
// first, NaN above every number, among equals the lower index first; one pass in index order that
// keeps them in a sorted array), with two changes that leave its result as it was:
//  - its rejection test (a score not above the k-th held, thr) is made on 8 scores at a time: once
//    k are held nearly every score is rejected there, and only the lanes that pass go through the
//    scalar test and insertion, in index order (a lane taken after an insertion raised thr was
//    tested against the old one: the scalar test settles it);
//  - from 1,024 scores and k = 10 on, a first pass takes the maxima of 64 interleaved groups of them
//    (lane i of 8 vectors: the scores j with j % 64 = i, but for the last N % 64), and scores below
//    the k-th largest of those maxima (lo) are not offered at all: k distinct scores are at least
//    lo, so a score below it is beaten by k others. Scores in random order otherwise enter the
//    sorted array ~k ln(N / k) times, each shifting ~k / 2 held ones (2,933 scores, k = 20: ~120
//    insertions, ~1,000 shifts). With a NaN among the scores there is no such bound (NaN ranks
//    first): every score is offered. For smaller k the first pass costs more than it saves.
// Standalone C++, one thread, Zen 3, 64 rows of 2,933 N(0, 1) scores, per row: k = 20 ~3.8 us with
// the scalar pass, 3.3 with the vector test alone, 1.8-2.1 with both; k = 32 6.9 -> 1.9 us, k = 12
// 1.9 -> 1.0 us with the first pass; k = 4 0.46 us without it (0.9 with).
void avx2_select_topk_f32(const float* s, int64_t N, int64_t k, float* vals, int64_t* idx) {
  // (a > c is false where c is NaN: no test of c for a number a)
  const auto better = [](float a, float c) { return std::isnan(a) ? !std::isnan(c) : a > c; };
  float lo = -std::numeric_limits<float>::infinity();
  if (N >= 1024 && k >= 10 && k <= 64) {
    __m256 mx[8], nan = _mm256_setzero_ps();
    for (int g = 0; g < 8; ++g) mx[g] = _mm256_loadu_ps(s + 8 * g);
    const int64_t N64 = N - N % 64;
    for (int64_t j = 64; j < N64; j += 64)
      for (int g = 0; g < 8; ++g) {
        const __m256 v = _mm256_loadu_ps(s + j + 8 * g);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        mx[g] = _mm256_max_ps(mx[g], v);
      }
    for (int g = 0; g < 8; ++g) {
      const __m256 v = _mm256_loadu_ps(s + 8 * g);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    bool any_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t j = N64; j < N && !any_nan; ++j) any_nan = std::isnan(s[j]);
    if (!any_nan) {
      alignas(32) float m[64];
      for (int g = 0; g < 8; ++g) _mm256_store_ps(m + 8 * g, mx[g]);
      std::nth_element(m, m + (k - 1), m + 64, [](float a, float b) { return a > b; });
      lo = m[k - 1];
    }
  }
  int64_t cnt = 0;
  float thr = 0.0f;  // vals[k - 1] once k values are held
  const auto offer = [&](int64_t j) {
    const float v = s[j];
    int64_t pos;
    if (cnt < k) {
      pos = cnt++;
    } else {
      if (!better(v, thr)) return;
      pos = k - 1;
    }
    if (std::isnan(v)) {
      while (pos > 0 && !std::isnan(vals[pos - 1])) {
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
    } else {
      while (pos > 0 && v > vals[pos - 1]) {
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
    }
    vals[pos] = v;
    idx[pos] = j;
    if (cnt == k) thr = vals[k - 1];
  };
  // every score not below lo (NaN too), then, once k are held, not below thr (>= lo)
  __m256 t = _mm256_set1_ps(lo);
  int64_t j = 0;
  for (; j + 8 <= N; j += 8) {
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), t, _CMP_NLT_UQ)));
    if (m == 0) continue;
    for (; m != 0; m &= m - 1) offer(j + __builtin_ctz(m));
    if (cnt == k) t = _mm256_set1_ps(thr);
  }
  for (; j < N; ++j)
    if (!(s[j] < (cnt == k ? thr : lo))) offer(j);
}

int64_t avx2_collect_above_f32(const float* s, int64_t j, int64_t N, float thr, uint64_t* keys, int64_t* n,
                               int64_t cap) {
  const __m256 t = _mm256_set1_ps(thr);
  int64_t m = *n;
  for (; j + 8 <= N && m + 8 <= cap; j += 8) {
    // (not <= thr: above it, or NaN)
    unsigned pass = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), t, _CMP_NLE_UQ)));
    for (; pass != 0; pass &= pass - 1) {
      const int64_t l = j + __builtin_ctz(pass);
      keys[m++] = topk_key(s[l], l);
    }
  }
  *n = m;
  return j;
}

}  // namespace rnnrec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // RNNREC_HAVE_AVX2_TU

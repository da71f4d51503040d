// rnnrec_fast AVX2/FMA float32 GEMM (packed-B, 6x16 register-blocked micro-kernel): the kernels that
// machines without AVX-512 use where rnnrec_avx512.cpp's run on those with it (same interface, same
// blocking scheme; see the notes there). Without them an AVX2 machine went through ATen/BLAS for
// every product: a call per step, strided outputs computed into a temporary and copied, and no
// packed weights reused across steps.
//
// Compiled for AVX2+FMA via a target pragma so the portable build still contains it; the driver
// calls it only after a run-time CPU check. No torch header may be included here.
//   C[M, N] = (beta ? C : 0) + A . op(B),   A(i, k) = A[i * a_si + k * a_sk]
// op(B) (K x N) is packed into panels of 16 columns (panel p holds K rows of 16 floats, zero
// padded). There is no in-place ("direct") form: on AVX2 machines the driver uses this kernel only
// where it measured faster than ATen/MKL, which is a packed product (see gemm_any there).
#include "rnnrec_kernels.h"

#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace rnnrec {
namespace {

constexpr int64_t NR = 16;  // columns of a panel: two 8-lane vectors
constexpr int MR = 6;       // rows of the micro-kernel: 12 accumulators + 2 B vectors + 1 broadcast

static inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Loads and stores of slice v of a tile: whole vectors, or the lanes below nvalid.
struct WholeSlices {
  inline __m256 ld(const float* p, int) const { return _mm256_loadu_ps(p); }
  inline void st(float* p, int, __m256 r) const { _mm256_storeu_ps(p, r); }
};
struct MaskedSlices {
  __m256i m[2];
  explicit MaskedSlices(int64_t nvalid) : m{lanes_below(nvalid), lanes_below(nvalid - 8)} {}
  inline __m256 ld(const float* p, int v) const { return _mm256_maskload_ps(p, m[v]); }
  inline void st(float* p, int v, __m256 r) const { _mm256_maskstore_ps(p, m[v], r); }
};

// C's R x 8V tile (+)= the accumulators. The loops unroll completely, so that the accumulators
// stay in registers through the caller's k loop.
template <int R, int V, typename S>
static inline void store_tile(const __m256 (&c)[V][R], float* C, int64_t ldc, bool acc, const S& s) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    float* ci = C + i * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      __m256 r = c[v][i];
      if (acc) r = _mm256_add_ps(s.ld(ci + 8 * v, v), r);
      s.st(ci + 8 * v, v, r);
    }
  }
}

// One R x 16 block of C (R <= MR), or R x 8 (V = 1) for a last slice of at most 8 columns. The
// panel of op(B) is read with full-width loads at Bp + k * NR (zero padded past N).
// Columns at or past nvalid are not stored. Not inlined, like the AVX-512 kernel: its loop keeps
// every pointer in a register.
template <int R, int V>
__attribute__((noinline)) static void micro_impl(int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp,
                                                 float* C, int64_t ldc, int64_t nvalid, bool acc) {
  __m256 c[V][R];
  // C's tile fetched before the k loop, as in the AVX-512 kernel (a weight gradient's C cold from
  // L3 or memory: M1536 N512 K128 62 -> 90 GFLOP/s, standalone C++ on the Zen 4 VM): for a += and
  // for K >= 128, not for short loops that only store)
  if (acc || K >= 128) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const char* ci = reinterpret_cast<const char*>(C + i * ldc);
      _mm_prefetch(ci, _MM_HINT_T0);
      _mm_prefetch(ci + 32 * V - 4, _MM_HINT_T0);
    }
  }
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) c[v][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(Bp + k * NR + 8 * v);
    const float* ak = A + k * sk;
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(ak + i * si);
      for (int v = 0; v < V; ++v) c[v][i] = _mm256_fmadd_ps(a, b[v], c[v][i]);
    }
  }
  // Full slices are stored with plain loads and stores: a masked store (vmaskmovps) costs many
  // cycles on Zen 3, and twelve of them per tile held the 6x16 kernel to 79 GFLOP/s at K = 100 (M256
  // N300: 194 us; 162 us, 95 GFLOP/s, with plain stores). A last, partial slice masks off the
  // lanes at or past nvalid.
  if (nvalid >= 8 * V)
    store_tile<R, V>(c, C, ldc, acc, WholeSlices());
  else
    store_tile<R, V>(c, C, ldc, acc, MaskedSlices(nvalid));
}

template <int R>
static inline void micro(int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp, float* C, int64_t ldc,
                         int64_t nvalid, bool acc) {
  if (nvalid <= 8)
    micro_impl<R, 1>(K, A, si, sk, Bp, C, ldc, nvalid, acc);
  else
    micro_impl<R, 2>(K, A, si, sk, Bp, C, ldc, nvalid, acc);
}

// C = (beta ? C : 0) + A . op(B), op(B) packed (panel p at Bp + p * K * NR). Rows in groups of MC
// (MC x K of A about 192 KiB, kept in L2); within a group each panel is read once and reused from
// cache by all the group's 6-row blocks. Any strides of A give the right result; the driver passes
// row-major ones (a_sk = 1), for which this is fast.
void gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* Bp,
                 bool beta, float* C, int64_t ldc) {
  const int64_t np = (N + NR - 1) / NR;
  const int64_t MC = std::max<int64_t>(MR, (int64_t(192 * 1024) / (4 * std::max<int64_t>(K, 1))) / MR * MR);
  for (int64_t g = 0; g < M; g += MC) {
    const int64_t g1 = std::min(M, g + MC);
    for (int64_t p = 0; p < np; ++p) {
      const int64_t n0 = p * NR, nvalid = N - n0;
      const float* Bk = Bp + p * K * NR;
      // Whole 6-row blocks, then the rest; a rest of one or two rows (two or four accumulators:
      // too few chains to keep both FMA pipes busy) takes the last whole block with it, as a 4-row
      // block and a 3- or 4-row one (M = 32: 6 6 6 6 4 4, not 6 6 6 6 6 2).
      int64_t i = g, whole = (g1 - g) / MR;
      const int64_t rest = (g1 - g) % MR;
      if (whole > 0 && (rest == 1 || rest == 2)) --whole;
      for (const int64_t i1 = g + whole * MR; i < i1; i += MR)
        micro<MR>(K, A + i * a_si, a_si, a_sk, Bk, C + i * ldc + n0, ldc, nvalid, beta);
      if (g1 - i > MR) {
        micro<4>(K, A + i * a_si, a_si, a_sk, Bk, C + i * ldc + n0, ldc, nvalid, beta);
        i += 4;
      }
      const float* Ai = A + i * a_si;
      float* Ci = C + i * ldc + n0;
      switch (g1 - i) {
        case 0: break;
        case 1: micro<1>(K, Ai, a_si, a_sk, Bk, Ci, ldc, nvalid, beta); break;
        case 2: micro<2>(K, Ai, a_si, a_sk, Bk, Ci, ldc, nvalid, beta); break;
        case 3: micro<3>(K, Ai, a_si, a_sk, Bk, Ci, ldc, nvalid, beta); break;
        case 4: micro<4>(K, Ai, a_si, a_sk, Bk, Ci, ldc, nvalid, beta); break;
        default: micro<5>(K, Ai, a_si, a_sk, Bk, Ci, ldc, nvalid, beta); break;
      }
    }
  }
}

int64_t packed_size(int64_t K, int64_t N) { return K * ((N + NR - 1) / NR) * NR; }

#include "rnnrec_transpose.inc"

void pack_b(bool transB, int64_t K, int64_t N, const float* B, int64_t ldb, float* out) {
  const int64_t np = (N + NR - 1) / NR;
  for (int64_t p = 0; p < np; ++p) {
    float* dst = out + p * K * NR;
    const int64_t n0 = p * NR;
    const int64_t nv = N - n0 < NR ? N - n0 : NR;
    if (transB) {  // B[k, n] at B[n * ldb + k]
      pack_panel_trans(K, nv, NR, B + n0 * ldb, ldb, dst);
      continue;
    }
    int64_t k0 = 0;
    if (nv == NR) {  // a full panel of a row-major B: two vectors per row
      for (; k0 < K; ++k0) {
        _mm256_storeu_ps(dst + k0 * NR, _mm256_loadu_ps(B + k0 * ldb + n0));
        _mm256_storeu_ps(dst + k0 * NR + 8, _mm256_loadu_ps(B + k0 * ldb + n0 + 8));
      }
    }
    for (int64_t k = k0; k < K; ++k) {  // B[k, n] at B[k * ldb + n]
      float* d = dst + k * NR;
      int64_t n = 0;
      for (; n < nv; ++n) d[n] = B[k * ldb + n0 + n];
      for (; n < NR; ++n) d[n] = 0.0f;
    }
  }
}

}  // namespace

void avx2_transpose_f32(int64_t R, int64_t C, const float* src, int64_t lds, float* dst, int64_t ldd) {
  transpose_block(R, C, src, lds, dst, ldd);
}

GemmKernels avx2_gemm_kernels_f32() {
  GemmKernels k;
  k.packed_size = &packed_size;
  k.pack_b = &pack_b;
  k.gemm_packed = &gemm_packed;
  k.gemm_direct = nullptr;  // no in-place form (see the top of this file)
  return k;
}

}  // namespace rnnrec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // RNNREC_HAVE_AVX2_TU

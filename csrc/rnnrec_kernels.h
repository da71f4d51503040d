// rnnrec_fast CPU kernels: plain C++ declarations shared by the ATen driver (rnnrec_cpu.cpp) and
// the AVX2/FMA translation unit (rnnrec_avx2.cpp). This header must not include any torch header:
// rnnrec_avx2.cpp compiles everything after its includes for AVX2, and inline torch code compiled
// there could leak AVX2 instructions into the portable part of the extension.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rnnrec {

enum : int { MODE_RNN_TANH = 0, MODE_RNN_RELU = 1, MODE_GRU = 2 };

// The top-k selection's order (select_topk in rnnrec_cpu.cpp: NaN above every number, -0 equal to
// +0, among equal scores the lower index first) as a 64-bit key that ascends with it: the score
// mapped to an unsigned integer that grows with it (NaN largest, -0 as +0), inverted, above the
// index (j < 2^32).
inline uint64_t topk_key(float x, int64_t j) {
  uint32_t u;
  if (std::isnan(x)) {
    u = 0xFFFFFFFFu;
  } else {
    std::memcpy(&u, &x, sizeof u);
    if (x == 0.0f) u = 0;
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (uint64_t(~u) << 32) | uint64_t(j);
}

// ---------------------------------------------------------------------------------------------
// Per-row pointwise kernels (one batch row, H hidden units). Arguments are raw pointers into the
// row-major buffers of the driver. Bias pointers are never null (the driver substitutes zeros).
//   xp: input projection row without bias (G*H), hp: recurrent projection row without bias
//   hprev: the state entering the step (after a reset: the driver points at a zero row)
//   ws row: gru [r, z, n, hn] (4H); rnn saves nothing (its backward needs only y)
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RowKernels {
  // rnn forward: y = act((xp + bi) + (hp + bh)); relu when relu != 0.
  void (*rnn_fwd)(int64_t H, const T* xp, const T* hp, const T* bi, const T* bh, T* y, int relu);
  // gru reset_after=True forward: fills ws[0:4H] and y. xp may alias ws[0:3H] (read before written).
  void (*gru_fwd_ra)(int64_t H, const T* xp, const T* hp, const T* bi, const T* bh, const T* hprev, T* ws,
                     T* y);
  // gru reset_after=False, pass A: r, z into ws; rh = r * h_prev.
  void (*gru_fwd_a)(int64_t H, const T* xp, const T* hp, const T* bi, const T* bh, const T* hprev, T* ws,
                    T* rh);
  // pass B: ws[3H:4H] holds W_hn (r*h_prev) (no bias) on entry; adds b_hn, computes n and y.
  void (*gru_fwd_b)(int64_t H, const T* xp, const T* bi, const T* bh, const T* hprev, T* ws, T* y);
  // rnn backward: g = dh + gy; dgx = g * act'(y); dh := 0.
  void (*rnn_bwd)(int64_t H, T* dh, const T* gy, const T* y, T* dgx, int relu);
  // gru reset_after=True backward: dgx = [dr, dz, dn], dgh = [dr, dz, dn*r], dh := g*z.
  void (*gru_bwd_ra)(int64_t H, T* dh, const T* gy, const T* hprev, const T* ws, T* dgx, T* dgh);
  // gru reset_after=False backward pass 1: dgx[H:3H] = [dz, dn], dh := g*z.
  void (*gru_bwd_1)(int64_t H, T* dh, const T* gy, const T* hprev, const T* ws, T* dgx);
  // pass 2: d_rh = dn @ W_hn given; dgx[0:H] = dr; dh += d_rh * r; hin = r * h_prev.
  void (*gru_bwd_2)(int64_t H, T* dh, const T* drh, const T* hprev, const T* ws, T* dgx, T* hin);
};

// Small-batch matrix products with the weights kept row-major as PyTorch stores them:
//   out[b, j] = sum_k W[j, k] * X[b, k]        b < nb (nb <= 8), j < M, k < K
// X rows are ldx apart, out rows ldo apart.
template <typename T>
using SmallGemmNT = void (*)(int64_t nb, int64_t M, int64_t K, const T* W, int64_t ldw, const T* X,
                             int64_t ldx, T* out, int64_t ldo);

// The length of the K chunks that a product of depth K takes, where chunks are at most kc long:
// K in as few chunks as that allows, of equal length (the last one shorter by what is left):
// K = 300 with kc = 256 as 150 + 150, where 256 + 44 ran a short second pass over C (the
// backward's products of depth 3H at H = 100).
constexpr int64_t k_chunk(int64_t K, int64_t kc) {
  if (K <= kc) return K;
  const int64_t n = (K + kc - 1) / kc;
  return (K + n - 1) / n;
}

// What its callers rely on (gemm_panels copies a chunk of B into a buffer of KC rows; the packed
// products run ceil(K / chunk) chunks): every chunk is at most kc long, none empty, and the chunks
// are as few as chunks of kc. Checked at build time over the depths the kernels meet.
constexpr bool k_chunk_holds(int64_t kc, int64_t k_max) {
  for (int64_t K = 1; K <= k_max; ++K) {
    const int64_t c = k_chunk(K, kc);
    if (c < 1 || c > kc || (K + c - 1) / c != (K + kc - 1) / kc) return false;
  }
  return true;
}
static_assert(k_chunk(300, 256) == 150 && k_chunk(256, 256) == 256 && k_chunk(257, 256) == 129,
              "k_chunk splits K into equal chunks");
static_assert(k_chunk_holds(256, 8192) && k_chunk_holds(128, 4096) && k_chunk_holds(7, 200),
              "k_chunk gives chunks of at most kc, as few as kc's");

// Packed-B float GEMM of one instruction set: AVX-512F (rnnrec_avx512.cpp, 32-column panels) or
// AVX2/FMA (rnnrec_avx2_gemm.cpp, 16-column panels). op(B) is K x N: B[n * ldb + k] when transB,
// else B[k * ldb + n]. gemm_packed: C[M, N] = (beta ? C : 0) + A . op(B) with A(i, k) =
// A[i * a_si + k * a_sk] and op(B) packed by pack_b into packed_size(K, N) floats; gemm_direct: the
// same with a row-major, not transposed B (K x N, B[k * ldb + n]) read in place (AVX-512 only:
// null in the AVX2 set).
struct GemmKernels {
  int64_t (*packed_size)(int64_t K, int64_t N);
  void (*pack_b)(bool transB, int64_t K, int64_t N, const float* B, int64_t ldb, float* out);
  void (*gemm_packed)(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                      const float* Bp, bool beta, float* C, int64_t ldc);
  void (*gemm_direct)(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                      const float* B, int64_t ldb, bool beta, float* C, int64_t ldc);
};

// The CPU's vendor (__builtin_cpu_is, read once): AMD's and Intel's AVX-512 cores differ in what
// pays (split 64-byte loads, MKL's own AVX-512 kernels).
enum class CpuVendor { kOther, kIntel, kAmd };
inline CpuVendor cpu_vendor() {
#if defined(__GNUC__) || defined(__clang__)
  static const CpuVendor v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? CpuVendor::kIntel : __builtin_cpu_is("amd") ? CpuVendor::kAmd : CpuVendor::kOther;
  }();
  return v;
#else
  return CpuVendor::kOther;
#endif
}

// Portable scalar versions (defined in rnnrec_cpu.cpp).
template <typename T>
RowKernels<T> scalar_row_kernels();

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RNNREC_HAVE_AVX2_TU 1
// AVX2/FMA float kernels (rnnrec_avx2.cpp). Only call after simd_enabled() (rnnrec_cpu.cpp) returned true.
RowKernels<float> avx2_row_kernels_f32();
void avx2_small_gemm_nt_f32(int64_t nb, int64_t M, int64_t K, const float* W, int64_t ldw,
                            const float* X, int64_t ldx, float* out, int64_t ldo);
// acc[c] += A[r, c] summed over the R rows of a (R, C) block in double (rows ld apart), row by row.
void avx2_col_sums_f32(int64_t R, int64_t C, const float* A, int64_t ld, double* acc);
// dst[c * ldd + r] = src[r * lds + c] for a (R, C) block (rnnrec_transpose.inc's transpose_block,
// which also packs the GEMM's transposed panels).
void avx2_transpose_f32(int64_t R, int64_t C, const float* src, int64_t lds, float* dst, int64_t ldd);
// The k (>= 1) largest of s[0..N) into vals / idx, best first (select_topk in rnnrec_cpu.cpp: NaN
// above every number, among equals the lower index first), its rejection test on 8 scores at a time.
void avx2_select_topk_f32(const float* s, int64_t N, int64_t k, float* vals, int64_t* idx);
// select_topk_large's scan (rnnrec_cpu.cpp: collect_above) on whole vectors of 8 scores: from j on,
// the scores above thr or NaN appended to keys[*n..cap) as topk_key(s[j], j) in index order while
// 8 more fit; returns the first j not looked at (the scalar pass takes the rest).
int64_t avx2_collect_above_f32(const float* s, int64_t j, int64_t N, float thr, uint64_t* keys, int64_t* n,
                               int64_t cap);
// AVX2/FMA float GEMM (rnnrec_avx2_gemm.cpp). Only call after simd_enabled() (rnnrec_cpu.cpp) returned true.
GemmKernels avx2_gemm_kernels_f32();
// AVX-512F float GEMM (rnnrec_avx512.cpp). Only call after the run-time check for avx512f.
// op(B) is K x N: B[n * ldb + k] when transB, else B[k * ldb + n]; packed into 32-column panels.
int64_t avx512_packed_size(int64_t K, int64_t N);
void avx512_pack_b(bool transB, int64_t K, int64_t N, const float* B, int64_t ldb, float* out);
// C[M, N] = (beta ? C : 0) + A . op(B) with A(i, k) = A[i * a_si + k * a_sk].
void avx512_gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                        const float* Bp, bool beta, float* C, int64_t ldc);
// The same product with a row-major, not transposed B (K x N, B[k * ldb + n]) read in place,
// without a packed copy.
void avx512_gemm_direct(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                        const float* B, int64_t ldb, bool beta, float* C, int64_t ldc);
// The row kernels with 16 lanes (the same bits per element as the AVX2 ones).
RowKernels<float> avx512_row_kernels_f32();
// out[j] = W[j, :] . x, j < M (AVX-512F). Rows that do not start on a cache line are read with
// aligned loads (in groups of rows that fill whole cache lines, gemv_grouped, where the rows lie
// back to back and K suits it; else in classes of rows, gemv_nt_aligned) or with plain unaligned
// loads, as gemv_aligned_loads() says: by CPU (plain on AMD's cores), or as set_gemv_loads(2 / 1 /
// 0) forces: 2 the groups where they apply, 1 the classes, 0 plain (-1: by CPU again; the tests
// run each). The groups and the classes give the same bits. gemv_form says which form a product
// takes (kGrouped: its last M % 8 rows in classes).
enum class GemvForm { kPlain, kClasses, kGrouped };
bool gemv_aligned_loads();
void set_gemv_loads(int choice);
GemvForm gemv_form(int64_t M, int64_t K, const float* W, int64_t ldw);
void avx512_gemv_nt(int64_t M, int64_t K, const float* W, int64_t ldw, const float* x, float* out);
// out[b, j] = W[j, :] . X[b, :] for b < nb <= 8 (nb = 1: avx512_gemv_nt), j < M.
void avx512_small_gemm_nt(int64_t nb, int64_t M, int64_t K, const float* W, int64_t ldw, const float* X,
                          int64_t ldx, float* out, int64_t ldo);
#endif

}  // namespace rnnrec

// rnnrec_fast AVX-512 float32 GEMM (packed-B, 8x32 register-blocked micro-kernel).
//
// Compiled for AVX-512F via a target pragma so the portable build still contains it; the driver
// calls it only after a run-time CPU check. No torch header may be included here.
//   C[M, N] = (beta ? C : 0) + A . op(B),   A(i, k) = A[i * a_si + k * a_sk]
// op(B) (K x N) is either packed into panels of 32 columns first (panel p holds K rows of 32
// floats, zero padded, so the micro-kernel streams it with full-width vector loads), or, when it is
// a row-major matrix that is not transposed, read in place (no copy; masked loads in the last
// slice only).
#include "rnnrec_kernels.h"

#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics (max, min, shuffles, extracts) pass _mm512_undefined_*() to their
// masked builtins as the unused source, which -Wall reports as uninitialized once they are inlined
// here: ~600 false warnings (GCC bug 105593, fixed in GCC 13). Off for this file's code only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <array>
#include <atomic>
#include <utility>

#include <algorithm>
#include <cstdint>
#include <memory>

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

// The lanes of vector v (columns 16v .. 16v + 15) that lie within nvalid columns.
static inline __mmask16 mask_at(int64_t nvalid, int v) {
  const int64_t n1 = nvalid - 16 * v;
  return n1 >= 16 ? __mmask16(0xFFFF) : (n1 <= 0 ? __mmask16(0) : __mmask16((1u << n1) - 1u));
}
static inline __mmask16 mask_lo(int64_t nvalid) { return mask_at(nvalid, 0); }

// How a tile's slices of C are read and written: whole (16 columns each) or masked to the columns
// of a last, partial slice.
struct WholeSlices {
  inline __m512 ld(const float* p, int) const { return _mm512_loadu_ps(p); }
  inline void st(float* p, int, __m512 r) const { _mm512_storeu_ps(p, r); }
};
struct MaskedSlices {
  __mmask16 m[3];
  inline __m512 ld(const float* p, int v) const { return _mm512_maskz_loadu_ps(m[v], p); }
  inline void st(float* p, int v, __m512 r) const { _mm512_mask_storeu_ps(p, m[v], r); }
};

// C's R x 16V tile (+)= the accumulators. The loops unroll completely (as in the AVX2 kernel):
// rolled, GCC kept the accumulators in a stack array and spilled all 16 after the k loop. With a
// full tile stored without masks, products of K = 100 (M256 N300, the batch of sessions) went 109 ->
// 114.6 GFLOP/s, standalone C++ on the Zen 4 VM; module A/B B256 T1 H100 ~353 -> ~338 us (best of 8
// runs each).
template <int R, int V, typename S>
static inline void store_tile(const __m512 (&c)[V][R], float* C, int64_t ldc, bool acc, const S& s) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    float* ci = C + i * ldc;
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      __m512 r = c[v][i];
      if (acc) r = _mm512_add_ps(s.ld(ci + 16 * v, v), r);
      s.st(ci + 16 * v, v, r);
    }
  }
}

// One R x 32 block of C (R <= MR). The 32-column slice of op(B) is read at Bp + k * bs: a packed
// panel (bs = NR) or, for a row-major B that is not transposed, the matrix itself (bs = ldb; masked
// loads stop at the last valid column there). V = 2 vectors of 16 columns, or V = 1 for a last
// slice of at most 16 columns (half the work), or V = 3: a full slice and the last one, of at most
// 16 columns, in one R x 48 block, whose third vector is read at Bq + k * bs (the next packed
// panel, or Bp + 32 in place). Not inlined: inlined into gemm_panels' dispatch, the
// loop ran out of general registers and kept its pointers on the stack (~15% slower).
template <int R, int V, bool kMaskedB>
__attribute__((noinline)) static void micro_impl(int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp,
                                                 const float* Bq, int64_t bs, float* C, int64_t ldc, int64_t nvalid,
                                                 bool acc) {
  static_assert(V >= 1 && V <= 3, "R x 16V blocks, V <= 3 (R * V accumulators, V vectors of B and one of A)");
  __m512 c[V][R];
  // The tile of C is loaded (acc) and stored only after the k loop: fetched now, its lines arrive
  // during the loop. A weight gradient's C (3 MiB at H = 512, += once per ~128-row chunk of the
  // backward) comes from L3 or memory, and its 16 misses at the end of each tile stalled the kernel
  // (M1536 N512 K128 with C cold: 85 -> 100 GFLOP/s, standalone C++ on the Zen 4 VM; training
  // B64 T20 H512 135-143 -> 128-130 ms, ad hoc A/B). Every line the tile touches (unaligned: V + 1).
  // For a += (the weight gradients; with a batch_first input the backward's x takes one product
  // per step, K = 64 rows at B = 64: cold C 68 -> 88 GFLOP/s) and for long loops; not for short
  // ones that only store, whose C is small and cached (B256 T1 H100, K = 100: ~1% slower with it).
  if (acc || K >= 128) {
    for (int i = 0; i < R; ++i) {
      const char* ci = reinterpret_cast<const char*>(C + i * ldc);
      for (int v = 0; v < V; ++v) _mm_prefetch(ci + 64 * v, _MM_HINT_T0);
      _mm_prefetch(ci + 64 * V - 4, _MM_HINT_T0);
    }
  }
#pragma GCC unroll 3
  for (int v = 0; v < V; ++v)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) c[v][i] = _mm512_setzero_ps();
  const __mmask16 m[3] = {mask_at(nvalid, 0), mask_at(nvalid, 1), mask_at(nvalid, 2)};
  const float* const base[3] = {Bp, Bp + 16, Bq};
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[V];
    for (int v = 0; v < V; ++v)
      b[v] = kMaskedB && v == V - 1 ? _mm512_maskz_loadu_ps(m[v], base[v] + k * bs) : _mm512_loadu_ps(base[v] + k * bs);
    const float* ak = A + k * sk;
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(ak[i * si]);
      for (int v = 0; v < V; ++v) c[v][i] = _mm512_fmadd_ps(a, b[v], c[v][i]);
    }
  }
  if (nvalid >= 16 * V)
    store_tile<R, V>(c, C, ldc, acc, WholeSlices());
  else
    store_tile<R, V>(c, C, ldc, acc, MaskedSlices{{m[0], m[1], m[2]}});
}

// Full-width loads of op(B) wherever they are safe (a packed panel is zero padded; a matrix read in
// place has all 32 columns except in its last slice): masked loads cost far more on some CPUs.
// wide: the block is a full slice and the last one (nvalid in 33..48 columns), Bq the last one's.
template <int R>
static inline void micro(int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp, const float* Bq,
                         int64_t bs, bool packed, bool wide, float* C, int64_t ldc, int64_t nvalid, bool acc) {
  if (wide) {
    if (!packed && nvalid < 48)
      micro_impl<R, 3, true>(K, A, si, sk, Bp, Bq, bs, C, ldc, nvalid, acc);
    else
      micro_impl<R, 3, false>(K, A, si, sk, Bp, Bq, bs, C, ldc, nvalid, acc);
    return;
  }
  const bool masked = !packed && nvalid < NR;
  if (nvalid <= 16) {
    if (masked)
      micro_impl<R, 1, true>(K, A, si, sk, Bp, Bq, bs, C, ldc, nvalid, acc);
    else
      micro_impl<R, 1, false>(K, A, si, sk, Bp, Bq, bs, C, ldc, nvalid, acc);
  } else if (masked) {
    micro_impl<R, 2, true>(K, A, si, sk, Bp, Bq, bs, C, ldc, nvalid, acc);
  } else {
    micro_impl<R, 2, false>(K, A, si, sk, Bp, Bq, bs, C, ldc, nvalid, acc);
  }
}

}  // namespace

namespace {
// dst[j * ld + i] = src[i * lds + j] for i < rows, j < cols (rows, cols <= 16), from a 16 x 16 block
// transposed in registers (four rounds of 16 shuffles); the rows past `rows` read as zeros, so the
// `cols` vectors stored have zeros in their lanes from `rows` on (a packed panel's padding). Loads
// are masked to `cols` floats (never past the source's end).
static inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ld, int64_t rows, int64_t cols) {
  const __mmask16 m = mask_lo(cols);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(m, src + i * lds) : _mm512_setzero_ps();
  // within each 128-bit lane L: t[2i], t[2i + 1] interleave rows 2i and 2i + 1
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + c], lane L: rows 4g .. 4g + 3 of column 4L + c
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // t[c] = lanes 0, 2 of r[c] and r[4 + c]; t[4 + c] lanes 1, 3; t[8 + c], t[12 + c] likewise of r[8 + c], r[12 + c]
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
  }
  // column 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);            // L = 0
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);        // L = 2
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);   // L = 1
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xDD);  // L = 3
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    if (j < cols) _mm512_storeu_ps(dst + j * ld, r[j]);
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
      const __mmask16 m0 = mask_at(nv, 0), m1 = mask_at(nv, 1);
      for (int64_t k = 0; k < K; ++k) {
        const float* src = B + k * ldb + n0;
        _mm512_storeu_ps(dst + k * NR, _mm512_maskz_loadu_ps(m0, src));
        _mm512_storeu_ps(dst + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
      }
    } else {  // B[k, n] at B[n * ldb + k]: 32 weight rows into the panel, 16 x 16 blocks transposed
      // (zeros past the last row; the 8 x 8 AVX blocks before, with the K % 8 edge one by one, took
      // 5.5 us for a 300 x 100 weight on the Intel Xeon VM, two per call of a T = 1 inference)
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t cols = std::min<int64_t>(16, K - k0);
        for (int64_t h = 0; h < NR; h += 16)
          transpose16(B + (n0 + h) * ldb + k0, ldb, dst + k0 * NR + h, NR, std::max<int64_t>(0, std::min<int64_t>(16, nv - h)), cols);
      }
    }
  }
}

namespace {
// C = (beta ? C : 0) + A . op(B), op(B)'s 32-column slice p at B + p * ps, row k of it at + k * bs.
// Rows go in groups of MC (MC x KC of A about 192 KiB, so it stays in L2); within a group every
// 32-column slice of op(B) is read once from memory and reused, from cache, by all the group's
// 8-row blocks.
//
// Operands whose layout defeats the caches are copied in blocks first: a B read in place (direct
// mode) is copied one KC x 32 slice at a time into a small aligned buffer, and an A that is not
// row-major (the transposed A of a weight gradient) one MC x KC block at a time, as 8-row blocks. With row strides
// of a power of two (H = 512: 2 KiB, 6 KiB), reading them in place walks a handful of cache sets
// and evicts itself: the products ran at a third of the packed speed. Copies are O(K (M + N)) per
// block against O(M N K) arithmetic, and take no more than ~200 KiB of scratch per thread.
constexpr int64_t KC = 256;

struct Scratch {
  std::unique_ptr<float[]> own;
  float* p = nullptr;
  int64_t n = 0;
  float* get(int64_t want) {  // 64-byte aligned, grown on demand
    if (want > n) {
      own.reset(new float[size_t(want + 16)]);
      p = own.get() + (16 - (reinterpret_cast<uintptr_t>(own.get()) / sizeof(float)) % 16) % 16;
      n = want;
    }
    return p;
  }
};

template <int R>
inline void block_rows(int64_t kb, const float* A, int64_t si, int64_t sk, const float* Bp, const float* Bq, int64_t bs,
                       bool packed, bool wide, float* C, int64_t ldc, int64_t nvalid, bool acc) {
  micro<R>(kb, A, si, sk, Bp, Bq, bs, packed, wide, C, ldc, nvalid, acc);
}

void gemm_panels(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk, const float* B,
                 int64_t ps, int64_t bs, bool packed, bool beta, float* C, int64_t ldc) {
  thread_local Scratch a_buf, b_buf;
  const int64_t np = (N + NR - 1) / NR;
  const bool copy_a = a_sk != 1;
  // B in place is fine when its rows spread over the cache sets (H = 100: 400-byte rows); rows a
  // multiple of 512 bytes apart share a few sets, and B is copied.
  const bool copy_b = !packed && (bs * int64_t(sizeof(float))) % 512 == 0;
  // K in chunks of KC wherever it is longer (a packed op(B) too: the 32-column slice of a K = 1536
  // product, 192 KiB, was streamed from L2 by every 8-row block; a KC x 32 chunk, 32 KiB, stays in
  // L1): M128 N512 K1536 1.48 -> 1.30-1.43 ms, M64 N512 K1536 740 -> 672-686 us (standalone, Intel
  // Xeon VM); B64 T20 H512 training ~1.5% (ad hoc, alternating processes). Chunks of equal length
  // (k_chunk): K = 300 as 2 x 150, not 256 + 44 (the backward's d(h) . W_hh at B32 H100, read in
  // place, M32 N100 K300; backward 1.37 -> 1.34 ms with the 48-column blocks below, A/B)
  const int64_t kc_step = K > KC ? k_chunk(K, KC) : (copy_a || copy_b) ? KC : std::max<int64_t>(K, 1);
  const int64_t kmax = std::min(K, kc_step);
  const int64_t MC = std::max<int64_t>(MR, (int64_t(192 * 1024) / (4 * std::max<int64_t>(kmax, 1))) / MR * MR);
  for (int64_t g = 0; g < M; g += MC) {
    const int64_t g1 = std::min(M, g + MC);
    for (int64_t kc = 0; kc < K || kc == 0; kc += kc_step) {
      const int64_t kb = std::min(kc_step, K - kc);
      const bool acc = beta || kc > 0;
      // Row block b (rows g + b*MR ...) of this k-chunk: A(i, k) at Ab + i * gsi + k * gsk.
      const float* Ag = A + g * a_si + kc * a_sk;
      int64_t gsi = a_si, gsk = a_sk, gbs = MR * a_si;
      if (copy_a) {  // each block as kb rows of MR contiguous values (zero padded)
        const int64_t nb = (g1 - g + MR - 1) / MR;
        float* dst = a_buf.get(nb * MR * std::max<int64_t>(kb, 1));
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t rows = std::min<int64_t>(MR, g1 - g - b * MR);
          float* d = dst + b * kb * MR;
          if (a_si == 1 && rows == MR) {  // (a transposed A, the weight gradients': 8 floats in a row)
            static_assert(MR == 8, "one 8-float vector per k");
            for (int64_t k = 0; k < kb; ++k) _mm256_storeu_ps(d + k * MR, _mm256_loadu_ps(Ag + b * MR + k * a_sk));
            continue;
          }
          for (int64_t k = 0; k < kb; ++k) {
            const float* src = Ag + b * MR * a_si + k * a_sk;
            for (int64_t r = 0; r < rows; ++r) d[k * MR + r] = src[r * a_si];
            for (int64_t r = rows; r < MR; ++r) d[k * MR + r] = 0.f;
          }
        }
        Ag = dst, gsi = 1, gsk = MR, gbs = kb * MR;
      }
      for (int64_t p = 0; p < np; ++p) {
        const int64_t n0 = p * NR, nvalid = N - n0;
        const float* Bp = B + p * ps + kc * bs;
        // A last slice of at most 16 columns goes with the full one before it, as R x 48 blocks
        // (V = 3): alone it took V = 1 blocks, whose FMAs wait on one broadcast of A each, at
        // about half the rate: N = 100 (3 x 32 + 4, the backward's products at H = 100) cost as
        // 4 full slices, now 3.5; N = 300 (9 x 32 + 12) 10 -> 9.5. The same bits (each element
        // of C sums the same products in the same order in any block).
        const bool wide = p + 2 == np && nvalid - NR <= 16 && !copy_b;
        const float* Bq = wide ? Bp + ps : Bp;  // (the next slice: packed, or 32 columns on)
        int64_t b_s = bs;
        bool b_packed = packed;
        if (copy_b) {  // rows kc..kc+kb of the 32-column slice, zero padded
          float* dst = b_buf.get(KC * NR);
          const int64_t w = std::min<int64_t>(NR, nvalid);
          for (int64_t k = 0; k < kb; ++k) {
            const float* src = B + (kc + k) * bs + n0;
            std::copy(src, src + w, dst + k * NR);
            std::fill(dst + k * NR + w, dst + (k + 1) * NR, 0.f);
          }
          Bp = dst, b_s = NR, b_packed = true;
        }
        int64_t i = g;
        for (; i + MR <= g1; i += MR)
          block_rows<MR>(kb, Ag + (i - g) / MR * gbs, gsi, gsk, Bp, Bq, b_s, b_packed, wide, C + i * ldc + n0, ldc,
                         nvalid, acc);
        const float* Ai = Ag + (i - g) / MR * gbs;
        float* Ci = C + i * ldc + n0;
        switch (g1 - i) {
          case 0: break;
          case 1: block_rows<1>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
          case 2: block_rows<2>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
          case 3: block_rows<3>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
          case 4: block_rows<4>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
          case 5: block_rows<5>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
          case 6: block_rows<6>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
          default: block_rows<7>(kb, Ai, gsi, gsk, Bp, Bq, b_s, b_packed, wide, Ci, ldc, nvalid, acc); break;
        }
        if (wide) ++p;  // (the last slice is done)
      }
      if (K == 0) break;
    }
  }
}
}  // namespace

void avx512_gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                        const float* Bp, bool beta, float* C, int64_t ldc) {
  gemm_panels(M, N, K, A, a_si, a_sk, Bp, K * NR, NR, true, beta, C, ldc);
}

void avx512_gemm_direct(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_si, int64_t a_sk,
                        const float* B, int64_t ldb, bool beta, float* C, int64_t ldc) {
  gemm_panels(M, N, K, A, a_si, a_sk, B, NR, ldb, false, beta, C, ldc);
}

// out[j] = W[j, :] . x for j < M (one batch row): eight weight rows at a time (eight memory
// streams in flight), 16-wide FMAs; a masked tail for K % 16.
static inline __m256 fold256(__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps_compat(v)); }

// The eight sums of a[0..7], in order.
static inline __m256 sum8(const __m512* a) {
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(fold256(a[0]), fold256(a[1])), _mm256_hadd_ps(fold256(a[2]), fold256(a[3])));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(fold256(a[4]), fold256(a[5])), _mm256_hadd_ps(fold256(a[6]), fold256(a[7])));
  // lo = [s0 s1 s2 s3 | s0' s1' s2' s3'] (two 128-bit halves to add), same for hi
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// The sum of one a, added in sum8's order (so a row gets the same bits in a group of 8 or alone:
// a product split into blocks differently, by threads or direction, gives the same result).
static inline float sum1(__m512 a) {
  const __m256 f = fold256(a);
  const __m256 q = _mm256_hadd_ps(_mm256_hadd_ps(f, f), _mm256_hadd_ps(f, f));
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}

namespace {

constexpr int64_t kAlignedMaxK = 1024;  // x's shifted copy lives on the stack

// The same product with 64-byte-aligned loads of W. Rows whose length is not a multiple of 16
// floats (H = 100) start at varying offsets within a cache line, and an unaligned 64-byte load
// that straddles two lines costs about twice an aligned one: at the serving step this made the
// product ~1.5x slower. Rows j and j + p (p * ldw a multiple of 16) share their offset, so rows
// are taken in p classes; within a class every row starts `off` floats past an aligned address,
// x is copied once shifted by `off` (zeros around it), and each row is read as aligned vectors
// from that address, masking the lanes before the row's start and after its end.
void gemv_nt_aligned(int64_t M, int64_t K, const float* W, int64_t ldw, const float* x, float* out,
                     int64_t p) {
  alignas(64) float xs[kAlignedMaxK + 32];
  for (int64_t c = 0; c < p && c < M; ++c) {
    const int64_t off = int64_t((reinterpret_cast<uintptr_t>(W + c * ldw) / sizeof(float)) % 16);
    const int64_t nv = (off + K + 15) / 16;  // vectors per row
    std::fill(xs, xs + nv * 16, 0.f);
    std::copy(x, x + K, xs + off);
    const __mmask16 head = __mmask16(0xFFFFu << off);
    __mmask16 tail = mask_lo(off + K - 16 * (nv - 1));
    if (nv == 1) tail &= head;
    const __mmask16 first = nv == 1 ? tail : head;
    int64_t j = c;
    for (; j + 7 * p < M; j += 8 * p) {
      const float* w[8];
      __m512 a[8];
      for (int r = 0; r < 8; ++r) w[r] = W + (j + r * p) * ldw - off;
      const __m512 x0 = _mm512_load_ps(xs);
      for (int r = 0; r < 8; ++r) a[r] = _mm512_mul_ps(_mm512_maskz_load_ps(first, w[r]), x0);
      int64_t v = 1;
      for (; v + 1 < nv; ++v) {
        const __m512 xv = _mm512_load_ps(xs + 16 * v);
        for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(_mm512_load_ps(w[r] + 16 * v), xv, a[r]);
      }
      if (v < nv) {
        const __m512 xv = _mm512_load_ps(xs + 16 * v);
        for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(_mm512_maskz_load_ps(tail, w[r] + 16 * v), xv, a[r]);
      }
      alignas(32) float s[8];
      _mm256_store_ps(s, sum8(a));
      for (int r = 0; r < 8; ++r) out[j + r * p] = s[r];
    }
    for (; j < M; j += p) {
      const float* w = W + j * ldw - off;
      __m512 a0 = _mm512_mul_ps(_mm512_maskz_load_ps(first, w), _mm512_load_ps(xs));
      int64_t v = 1;
      for (; v + 1 < nv; ++v) a0 = _mm512_fmadd_ps(_mm512_load_ps(w + 16 * v), _mm512_load_ps(xs + 16 * v), a0);
      if (v < nv) a0 = _mm512_fmadd_ps(_mm512_maskz_load_ps(tail, w + 16 * v), _mm512_load_ps(xs + 16 * v), a0);
      out[j] = sum1(a0);
    }
  }
}

// The same product where the rows lie back to back (ldw == K), K a multiple of 4 but not of 16,
// and W starts on a cache line: rows are taken in groups of P (4 where K % 16 is 4 or 12, 2 where
// it is 8), each group P K floats of whole cache lines read as L = P K / 16 aligned vectors, no
// masked load. x is laid P times back to back (xx) and held in L registers for the whole product
// (L <= 25: K up to 100 with P = 4, up to 200 with P = 2; K a template parameter so that every
// loop unrolls and xx stays in registers: with a run-time K the rows' chains ran one after another
// and the product was slower than the classes' one). Row r of a group covers vectors sv..ev with
// the lanes x[k] sits in in the classes' form (r K % 16 = that row's class offset): its first
// vector masked to its lanes with a zeroing multiply, its last through a masked FMA that leaves the
// other lanes alone (x's copies there belong to the neighbouring rows, whose non-finite values must
// not leak in), then +0 added in those lanes, as the classes' form adds 0 * 0 there (a -0 lane
// becomes +0): each row gets the classes' form's bits (checked against it on random, zero, -0,
// non-finite and denormal values, ad hoc; tests/test_op.py compares the two). Eight rows at a time
// (8 / P groups), their sums in sum8's order and stored as one vector, where the classes' form
// stores eight strided floats. The serving step's H = 100 products on the Intel Xeon VM
// (standalone, 296 x 100 from L2, fastest of 300 bursts): 1.09 -> 0.85 us; 296 x 200 (P = 2):
// 1.98 -> 1.58; 296 x 52: 0.73 -> 0.52. M a multiple of 8.
template <int K>
void gemv_grouped(int64_t M, const float* W, const float* x, float* out) {
  constexpr int P = K % 16 == 8 ? 2 : 4, L = P * K / 16, G = 8 / P;
  static_assert(K % 4 == 0 && K % 16 != 0 && L <= 25, "gemv_grouped: K a multiple of 4, not of 16, L <= 25");
  alignas(64) float xx[16 * L];
  for (int r = 0; r < P; ++r) std::copy(x, x + K, xx + r * K);
  __m512 xr[L];
#pragma GCC unroll 32
  for (int v = 0; v < L; ++v) xr[v] = _mm512_load_ps(xx + 16 * v);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < M; j += 8) {
    __m512 a[8];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const float* w = W + (j + g * P) * K;
#pragma GCC unroll 8
      for (int r = 0; r < P; ++r) {
        const int b = r * K, e = b + K - 1, sv = b / 16, ev = e / 16;
        const __mmask16 tail = mask_lo(e % 16 + 1);
        const __mmask16 head = __mmask16((0xFFFFu << (b % 16)) & (sv == ev ? tail : 0xFFFFu));
        __m512 acc = _mm512_maskz_mul_ps(head, _mm512_load_ps(w + 16 * sv), xr[sv]);
#pragma GCC unroll 32
        for (int v = sv + 1; v < ev; ++v) acc = _mm512_fmadd_ps(_mm512_load_ps(w + 16 * v), xr[v], acc);
        if (ev > sv) {
          acc = _mm512_mask3_fmadd_ps(_mm512_load_ps(w + 16 * ev), xr[ev], acc, tail);
          acc = _mm512_mask_add_ps(acc, __mmask16(~tail), acc, zero);
        }
        a[g * P + r] = acc;
      }
    }
    _mm256_storeu_ps(out + j, sum8(a));
  }
}

using GroupedGemv = void (*)(int64_t, const float*, const float*, float*);

// gemv_grouped<K> for every K it takes from 20 on (K = 20, 28, ..., 100 with P = 4; 24, 40, ...,
// 200 with P = 2), by K / 4; null elsewhere.
template <int K>
constexpr GroupedGemv grouped_for() {
  if constexpr (K >= 20 && K % 4 == 0 && K % 16 != 0 && (K % 16 == 8 ? 2 : 4) * K / 16 <= 25)
    return &gemv_grouped<K>;
  else
    return nullptr;
}
template <size_t... I>
constexpr std::array<GroupedGemv, sizeof...(I)> grouped_table(std::index_sequence<I...>) {
  return {grouped_for<int(4 * I)>()...};
}
constexpr int64_t kGroupedMaxK = 200;
constexpr auto kGrouped = grouped_table(std::make_index_sequence<kGroupedMaxK / 4 + 1>());

}  // namespace

std::atomic<int> gemv_loads_choice{-1};

bool gemv_aligned_loads() {
  const int c = gemv_loads_choice.load(std::memory_order_relaxed);
  if (c >= 0) return c >= 1;
  // AMD's AVX-512 cores (Zen 4: 512-bit loads split in two 256-bit halves) read straddling rows
  // faster with plain unaligned loads: the serving step's two H = 100 products (GRU, B1 T1, one
  // thread, min of 400 bursts of 500 calls, Zen 4 VM, ad hoc) 4.16 -> 3.84 us a call. The aligned
  // classes are kept for the others (the Intel AVX-512 machine of 2026-11-23: the straddling
  // loads ~1.5x slower there).
  return cpu_vendor() != CpuVendor::kAmd;
}

// Where the aligned loads are taken, the grouped form where it applies: by CPU wherever the aligned
// loads are (the classes' form forced by 1, the grouped one by 2).
static bool gemv_grouped_rows() {
  const int c = gemv_loads_choice.load(std::memory_order_relaxed);
  return c == 2 || (c < 0 && gemv_aligned_loads());
}

void set_gemv_loads(int choice) { gemv_loads_choice.store(choice < 0 ? -1 : choice > 2 ? 2 : choice); }

GemvForm gemv_form(int64_t M, int64_t K, const float* W, int64_t ldw) {
  const bool misaligned = ldw % 16 != 0 || reinterpret_cast<uintptr_t>(W) % 64 != 0;
  if (!misaligned || !gemv_aligned_loads() || ldw % 4 != 0 || reinterpret_cast<uintptr_t>(W) % sizeof(float) != 0 ||
      K < 16 || K > kAlignedMaxK)
    return GemvForm::kPlain;
  if (gemv_grouped_rows() && ldw == K && K <= kGroupedMaxK && kGrouped[size_t(K / 4)] != nullptr &&
      reinterpret_cast<uintptr_t>(W) % 64 == 0 && M >= 8)
    return GemvForm::kGrouped;
  return GemvForm::kClasses;
}

void avx512_gemv_nt(int64_t M, int64_t K, const float* W, int64_t ldw, const float* x, float* out) {
  // Misaligned rows: the aligned form when its classes are few (p <= 4, so x is copied at most
  // four times; with p = 16 the copies cost more than the split loads), where the CPU prefers it.
  const GemvForm form = gemv_form(M, K, W, ldw);
  if (form != GemvForm::kPlain) {
    int64_t done = 0;
    if (form == GemvForm::kGrouped) {  // whole blocks of 8 rows grouped, the last M % 8 rows in classes
      done = M & ~int64_t(7);
      kGrouped[size_t(K / 4)](done, W, x, out);
      if (done == M) return;
    }
    int64_t p = 1;
    while ((p * ldw) % 16 != 0) ++p;
    gemv_nt_aligned(M - done, K, W + done * ldw, ldw, x, out + done, p);
    return;
  }
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
    _mm256_storeu_ps(out + j, sum8(a));
  }
  for (; j < M; ++j) {
    const float* w0 = W + j * ldw;
    __m512 a0 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < kf; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), _mm512_loadu_ps(x + k), a0);
    if (k < K) a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mt, w0 + k), _mm512_maskz_loadu_ps(mt, x + k), a0);
    out[j] = sum1(a0);
  }
}

// out[b, j] = W[j, :] . X[b, :] for 2 to 8 rows of X (b < nb) and j < M. Blocks of RB weight rows
// x NB rows of X in RB x NB 16-lane accumulators, k in chunks of 16 (a masked tail); the RB weight
// vectors of a chunk held in registers and each row of X loaded as it is used: RB x NB FMAs for
// RB + NB loads, within the 32 registers. Each accumulator adds its lanes in sum8's order (in groups
// of 8 accumulators; a group's unused slots are zeros, which do not touch the others' lanes), so
// an output's bits do not depend on its row's place in a block, a thread's slice or a backward
// pass's block. On Zen 4 (AVX-512 at half rate, the same FLOPs a cycle as AVX2) the gain over the
// 8-lane kernel is fewer instructions and twice the registers (figures at small_nt, rnnrec_cpu.cpp).
// The blocks were chosen on the Zen 4 VM from 2 x 6..8, 3 x 4..8, 4 x 5..6, 7 x 2..3 and 8 x 2..3.
namespace {

template <int NB, int RB, bool Tail>
static inline void small_chunk(const float* w, int64_t ldw, const float* X, int64_t ldx, __mmask16 m, __m512* acc) {
  __m512 wv[RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) wv[r] = Tail ? _mm512_maskz_loadu_ps(m, w + r * ldw) : _mm512_loadu_ps(w + r * ldw);
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
    const __m512 xv = Tail ? _mm512_maskz_loadu_ps(m, X + b * ldx) : _mm512_loadu_ps(X + b * ldx);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) acc[r * NB + b] = _mm512_fmadd_ps(wv[r], xv, acc[r * NB + b]);
  }
}

template <int NB, int RB>
void small_block(int64_t j0, int64_t K, const float* W, int64_t ldw, const float* X, int64_t ldx, float* out,
                 int64_t ldo) {
  constexpr int kN = RB * NB, kG = (kN + 7) / 8;
  __m512 acc[kG * 8];
#pragma GCC unroll 32
  for (int i = 0; i < kG * 8; ++i) acc[i] = _mm512_setzero_ps();
  const float* w = W + j0 * ldw;
  const int64_t kf = K & ~int64_t(15);
  for (int64_t k = 0; k < kf; k += 16) small_chunk<NB, RB, false>(w + k, ldw, X + k, ldx, 0, acc);
  if (kf < K) small_chunk<NB, RB, true>(w + kf, ldw, X + kf, ldx, mask_lo(K - kf), acc);
  // the sums in groups of 8 (r-major: acc[r * NB + b] -> out[b, j0 + r]; the slots past kN are zeros)
  alignas(32) float s[kG * 8];
#pragma GCC unroll 4
  for (int g = 0; g < kG; ++g) _mm256_store_ps(s + 8 * g, sum8(acc + 8 * g));
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) out[b * ldo + j0 + r] = s[r * NB + b];
}

template <int NB, int RB>
void small_rows(int64_t M, int64_t K, const float* W, int64_t ldw, const float* X, int64_t ldx, float* out,
                int64_t ldo) {
  int64_t j = 0;
  for (; j + RB <= M; j += RB) small_block<NB, RB>(j, K, W, ldw, X, ldx, out, ldo);
  for (; j < M; ++j) small_block<NB, 1>(j, K, W, ldw, X, ldx, out, ldo);
}

}  // namespace

void avx512_small_gemm_nt(int64_t nb, int64_t M, int64_t K, const float* W, int64_t ldw, const float* X,
                          int64_t ldx, float* out, int64_t ldo) {
  while (nb > 0) {
    const int64_t c = nb >= 7 ? 4 : nb;  // 7 = 4 + 3, 8 = 4 + 4 (W streamed twice: faster than 7 x 3, 8 x 3)
    switch (c) {  // RB x NB accumulators + RB weight vectors + one of X: at most 29 of 32 registers
      case 1: avx512_gemv_nt(M, K, W, ldw, X, out); break;
      case 2: small_rows<2, 8>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 3: avx2_small_gemm_nt_f32(3, M, K, W, ldw, X, ldx, out, ldo); break;  // (faster, 3 x 6 to 3 x 8 tried)
      case 4: small_rows<4, 5>(M, K, W, ldw, X, ldx, out, ldo); break;
      case 5: small_rows<5, 4>(M, K, W, ldw, X, ldx, out, ldo); break;
      default: small_rows<6, 4>(M, K, W, ldw, X, ldx, out, ldo); break;
    }
    nb -= c;
    X += c * ldx;
    out += c * ldo;
  }
}

// ------------------------------------------------------------------------------------------------
// 16-lane vector layer for the row kernels (rnnrec_rows.inc): the same operations as the 8-lane
// layer of rnnrec_avx2.cpp (AVX-512F only), so the
// kernels give the same bits per element, with half the instructions and twice the registers.
// ------------------------------------------------------------------------------------------------
namespace {

using vf = __m512;
using vm = __mmask16;
static inline vf vset(float c) { return _mm512_set1_ps(c); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vfnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
// p * 2^n in one instruction (vscalefps: the product rounded once, as the 8-lane layer's multiply
// by 2^n; the gate pass at B=256, H=100 ~10% faster than through the exponent bits, standalone)
static inline vf vldexp(vf p, vf n) { return _mm512_scalef_ps(p, n); }
static inline vm vlt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline vm vle(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
static inline vf vselect(vm m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }

struct Full {
  inline vf ld(const float* p) const { return _mm512_loadu_ps(p); }
  inline void st(float* p, vf v) const { _mm512_storeu_ps(p, v); }
};
struct Tail {
  __mmask16 m;
  explicit Tail(int64_t n) : m(mask_lo(n)) {}
  inline vf ld(const float* p) const { return _mm512_maskz_loadu_ps(m, p); }
  inline void st(float* p, vf v) const { _mm512_mask_storeu_ps(p, m, v); }
};

template <typename F>
static inline void for_vec(int64_t H, const F& f) {
  int64_t j = 0;
  const Full full;
  for (; j + 16 <= H; j += 16) f(j, full);
  if (j < H) f(j, Tail(H - j));
}

#include "rnnrec_rows.inc"

}  // namespace

RowKernels<float> avx512_row_kernels_f32() {
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

}  // namespace rnnrec

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // RNNREC_HAVE_AVX2_TU

// Ad hoc trial (2026-12-06, session 62; not a pytest-benchmark case, not part of the package): can
// Intel AMX's bf16 tile products stand in for our AVX-512 fp32 products at float32 accuracy?
// Each float32 operand is split into three bf16 pieces (x = x1 + x2 + x3, 24 significant bits) and
// the six products whose order is above 2^-24 (a1b1 a1b2 a2b1 a1b3 a2b2 a3b1) are laid side by side
// along K, so that one bf16 product of depth 6K (fp32 sums in the tiles) gives A . B. Timed beside our
// AVX-512 packed kernel (csrc/rnnrec_avx512.cpp) on the B=32 T=20 H=100 training step's shapes and
// the batch of sessions', best of 200, in one process. Build and run on a CPU with AMX (Linux >= 5.16):
//   for f in rnnrec_avx512 rnnrec_avx2 rnnrec_avx2_gemm; do g++ -O3 -fno-math-errno -std=c++17 -c csrc/$f.cpp -o /tmp/$f.o; done
//   g++ -O2 -march=native -std=c++17 benchmarks/adhoc_amx_bf16x6.cpp /tmp/rnnrec_avx*.o -Icsrc -o /tmp/amx && /tmp/amx
// Arguments: none (both), "fp32" (ours only), "noA" / "noB" (the AMX product without its A or B tile
// loads after the first k block: wrong results, to see what the loads cost), "peak" (tile products
// alone, no loads). Results: benchmarks/results/HISTORY.md, 2026-12-06 session 62.
#include "rnnrec_kernels.h"
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#include <random>
#include <string>
using namespace rnnrec;
typedef uint16_t bf16;
struct TileCfg { uint8_t palette; uint8_t start_row; uint8_t res[14]; uint16_t colsb[16]; uint8_t rows[16]; };
template <class F> double best_us(F f, int reps) {
  double b = 1e9;
  for (int r = 0; r < reps; ++r) { auto t0 = std::chrono::steady_clock::now(); f(); b = std::min(b, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count()); }
  return b;
}
static inline float bf2f(bf16 v) { uint32_t u = uint32_t(v) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return bf16(u >> 16); }
// pieces order along K: (a1,b1) (a1,b2) (a2,b1) (a1,b3) (a2,b2) (a3,b1)
static const int apiece[6] = {0, 0, 1, 0, 1, 2};
static const int bpiece[6] = {0, 1, 0, 2, 1, 0};
static inline int64_t rup(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
// split A (M x K, lda) into A' (M x Kp) bf16, vectorised
__attribute__((target("avx512f,avx512bf16,avx512bw")))
void split_a(int64_t M, int64_t K, const float* A, int64_t lda, bf16* out, int64_t Kp) {
  for (int64_t m = 0; m < M; ++m) {
    bf16* o = out + m * Kp;
    const float* a = A + m * lda;
    int64_t k = 0;
    for (; k < K; k += 16) {
      __mmask16 mk = (K - k >= 16) ? 0xffff : __mmask16((1u << (K - k)) - 1);
      __m512 x = _mm512_maskz_loadu_ps(mk, a + k);
      __m256bh p1 = _mm512_cvtneps_pbh(x);
      __m512 f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)p1), 16));
      __m512 r1 = _mm512_sub_ps(x, f1);
      __m256bh p2 = _mm512_cvtneps_pbh(r1);
      __m512 f2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)p2), 16));
      __m256bh p3 = _mm512_cvtneps_pbh(_mm512_sub_ps(r1, f2));
      __m256i P[3] = {(__m256i)p1, (__m256i)p2, (__m256i)p3};
      for (int s = 0; s < 6; ++s) _mm256_mask_storeu_epi16(o + s * K + k, mk, P[apiece[s]]);
    }
    for (int64_t kk = 6 * K; kk < Kp; ++kk) o[kk] = 0;
  }
}
// B (K x N, ldb, row-major) -> VNNI packed tiles of B' (Kp x Np)
void pack_b(int64_t K, int64_t N, const float* B, int64_t ldb, bf16* out, int64_t Kp, int64_t Np) {
  std::vector<float> piece[3];
  for (int i = 0; i < 3; ++i) piece[i].assign(K * N, 0.f);
  for (int64_t i = 0; i < K * N; ++i) {
    float x = B[(i / N) * ldb + i % N];
    bf16 p1 = f2bf(x); float r = x - bf2f(p1); bf16 p2 = f2bf(r); float r2 = r - bf2f(p2);
    piece[0][i] = bf2f(p1); piece[1][i] = bf2f(p2); piece[2][i] = bf2f(f2bf(r2));
  }
  const int64_t nkb = Kp / 32;
  for (int64_t nb = 0; nb < Np / 16; ++nb)
    for (int64_t kb = 0; kb < nkb; ++kb)
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
          for (int p = 0; p < 2; ++p) {
            int64_t kk = kb * 32 + 2 * r + p, n = nb * 16 + c;
            float v = 0;
            if (kk < 6 * K && n < N) { int s = kk / K; v = piece[bpiece[s]][(kk % K) * N + n]; }
            out[((nb * nkb + kb) * 16 + r) * 32 + c * 2 + p] = f2bf(v);
          }
}
int g_variant = 0;  // 1: no A tile loads after the first k block, 2: no B tile loads
__attribute__((target("amx-tile,amx-bf16")))
void amx_gemm(int64_t M, int64_t Np, int64_t Kp, const bf16* A, const bf16* Bp, float* C, int64_t ldc) {
  const int v = g_variant;
  const int64_t nkb = Kp / 32;
  for (int64_t mb = 0; mb < M; mb += 32) {
    for (int64_t nb = 0; nb < Np / 16; nb += 2) {
      const bool two = nb + 1 < Np / 16;
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      const bf16* b0 = Bp + (nb * nkb) * 512;
      const bf16* b1 = Bp + ((nb + 1) * nkb) * 512;
      for (int64_t kb = 0; kb < nkb; ++kb) {
        if (v != 1 || kb == 0) { _tile_loadd(4, A + mb * Kp + kb * 32, Kp * 2);
        _tile_loadd(5, A + (mb + 16) * Kp + kb * 32, Kp * 2); }
        if (v != 2 || kb == 0) _tile_loadd(6, b0 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          if (v != 2 || kb == 0) _tile_loadd(7, b1 + kb * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, C + mb * ldc + nb * 16, ldc * 4);
      _tile_stored(2, C + (mb + 16) * ldc + nb * 16, ldc * 4);
      if (two) {
        _tile_stored(1, C + mb * ldc + nb * 16 + 16, ldc * 4);
        _tile_stored(3, C + (mb + 16) * ldc + nb * 16 + 16, ldc * 4);
      }
    }
  }
}
__attribute__((target("amx-tile")))
void amx_config() {
  TileCfg cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  asm volatile("" : : "r"(&cfg) : "memory");  // gcc 12's ldtilecfg has no memory input: keep the stores
  _tile_loadconfig(&cfg);
}
// tile products alone: four independent accumulators, no loads
__attribute__((target("amx-tile,amx-bf16"))) void peak() {
  for (int r = 0; r < 3; ++r) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    const long n = 200000;
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    printf("tile product alone: %.2f ns each, %.0f GFLOP/s bf16, %.0f GFLOP/s of float32 work at six products\n", us * 1e3 / (4.0 * n), 4.0 * n * 16384 / us / 1e3, 4.0 * n * 16384 / us / 1e3 / 6);
  }
}
int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
  const bool use_amx = arg != "fp32";
  g_variant = arg == "noA" ? 1 : arg == "noB" ? 2 : 0;
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: a process must ask before its first tile instruction
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) { printf("no AMX permission\n"); return 1; }
  amx_config();
  if (arg == "peak") { peak(); return 0; }
  struct S { long M, N, K; int reps; const char* what; };
  for (S s : {S{32, 300, 100, 20, "fwd step"}, S{32, 100, 300, 20, "bwd step"}, S{640, 100, 300, 1, "input grad"},
              S{640, 300, 100, 1, "input proj"}, S{256, 300, 100, 1, "batch of sessions"}}) {
    const long M = s.M, N = s.N, K = s.K;
    const long Kp = rup(6 * K, 32), Np = rup(N, 16), ldc = Np;
    std::mt19937 g(1); std::normal_distribution<float> nd(0, 1);
    std::vector<float> A(M * K), W(K * N), C(M * N), C2(M * ldc);
    for (auto& v : A) v = nd(g) * 0.5f; for (auto& v : W) v = nd(g) * 0.1f;
    std::vector<bf16> As(M * Kp), Bp(Np * Kp);
    pack_b(K, N, W.data(), N, Bp.data(), Kp, Np);
    std::vector<float> pk(avx512_packed_size(K, N));
    avx512_pack_b(false, K, N, W.data(), N, pk.data());
    for (int rep = 0; rep < 3; ++rep) {
      double p = best_us([&] { for (int t = 0; t < s.reps; ++t) avx512_gemm_packed(M, N, K, A.data(), K, 1, pk.data(), false, C.data(), N); }, 200);
      double sp = best_us([&] { for (int t = 0; t < s.reps; ++t) split_a(M, K, A.data(), K, As.data(), Kp); }, 200);
      double a = !use_amx ? 1 : best_us([&] { for (int t = 0; t < s.reps; ++t) { split_a(M, K, A.data(), K, As.data(), Kp); amx_gemm(M, Np, Kp, As.data(), Bp.data(), C2.data(), ldc); } }, 200);
      double fl = 2.0 * M * N * K * s.reps;
      printf("%-18s M%ld N%ld K%ld x%d: avx512 %.1f us (%.0f GF/s)  amx(split+gemm) %.1f us (%.0f GF/s eq), split alone %.1f\n", s.what, M, N, K, s.reps, p, fl / p / 1e3, a, fl / a / 1e3, sp);
    }
    // accuracy against double
    double maxe_amx = 0, maxe_f = 0, scale = 0;
    for (long m = 0; m < M; ++m) for (long n = 0; n < N; ++n) {
      double ref = 0, ab = 0; for (long k = 0; k < K; ++k) { ref += double(A[m * K + k]) * W[k * N + n]; ab += std::fabs(double(A[m * K + k]) * W[k * N + n]); }
      maxe_amx = std::max(maxe_amx, std::fabs(C2[m * ldc + n] - ref) / ab);
      maxe_f = std::max(maxe_f, std::fabs(C[m * N + n] - ref) / ab);
    }
    printf("   max |err|/sum|a*b|: amx %.2e  fp32 %.2e\n", maxe_amx, maxe_f);
  }
}

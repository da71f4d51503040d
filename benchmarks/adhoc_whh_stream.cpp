// Ad hoc trial (2026-12-08, session 75; not a pytest-benchmark case, not part of the package): what
// one step of the long session (B=1, H=512) costs for reading W_hh alone, on one core, where W_hh
// (3H x H float32, 3 MiB) is larger than the core's L2. Each step is the product y = W h (AVX-512
// dot products, 4 rows at a time), then h = y's first H elements scaled (so that a step waits on the
// one before, as the recurrence does). "same": rows 0 .. 3H-1 every step; "alternate": the
// direction reversed every step, so that a step starts on the rows the last one read last (still
// in L2). Also the rate of a plain read of a buffer in L2 and of one larger than L2 (from L3).
// Numbers quoted in README "What bounds the unmet cases" (Intel Xeon VM) and HISTORY.md, session 75.
// Build and run on an AVX-512 CPU:
//   g++ -O3 -mavx512f -mfma -std=c++17 benchmarks/adhoc_whh_stream.cpp -o /tmp/whh && /tmp/whh
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

// y[0..3] = the dot products of 4 rows (w, w + n, ...) with h: 8 independent FMA chains
static void dot4(const float* w, const float* h, int n, float* y) {
  __m512 a[8];
  for (int c = 0; c < 8; ++c) a[c] = _mm512_setzero_ps();
  for (int k = 0; k < n; k += 32) {
    const __m512 h0 = _mm512_loadu_ps(h + k), h1 = _mm512_loadu_ps(h + k + 16);
    for (int r = 0; r < 4; ++r) {
      a[2 * r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (size_t)r * n + k), h0, a[2 * r]);
      a[2 * r + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (size_t)r * n + k + 16), h1, a[2 * r + 1]);
    }
  }
  for (int r = 0; r < 4; ++r) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[2 * r], a[2 * r + 1]));
}

// steps of y = W h, h = y[:H] * 1e-3; returns the best microseconds a step over reps runs
static double steps_us(const std::vector<float>& W, int H, int steps, bool alternate, int reps) {
  const int rows = 3 * H;
  std::vector<float> h(H, 1.0f), y(rows);
  double best = 1e30;
  bool forward = true;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) {
      if (forward)
        for (int i = 0; i < rows; i += 4) dot4(&W[(size_t)i * H], h.data(), H, &y[i]);
      else
        for (int i = rows - 4; i >= 0; i -= 4) dot4(&W[(size_t)i * H], h.data(), H, &y[i]);
      for (int j = 0; j < H; ++j) h[j] = y[j] * 1e-3f;
      if (alternate) forward = !forward;
    }
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / steps;
    best = std::min(best, us);
  }
  if (h[0] == 12345.f) std::printf("!");
  return best;
}

// GB/s of summing a buffer of n floats (read repeatedly; best of reps)
static double read_gbs(size_t n, int reps) {
  std::vector<float> b(n, 1.0f);
  double best = 1e30;
  float sink = 0;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (size_t k = 0; k < n; k += 64) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(&b[k]));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(&b[k + 16]));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(&b[k + 32]));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(&b[k + 48]));
    }
    sink += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (sink == 1.f) std::printf("!");
  return n * 4.0 / best / 1e9;
}

int main(int argc, char** argv) {
  const int H = argc > 1 ? std::atoi(argv[1]) : 512;
  std::vector<float> W((size_t)3 * H * H);
  for (size_t i = 0; i < W.size(); ++i) W[i] = (float)((i * 2654435761u) % 1000) * 1e-6f;
  std::printf("H=%d: W_hh %.2f MiB\n", H, W.size() * 4.0 / (1 << 20));
  for (int round = 0; round < 3; ++round) {
    double same = steps_us(W, H, 200, false, 20), alt = steps_us(W, H, 200, true, 20);
    std::printf("a step, best of 20 x 200 steps: same direction %.1f us, alternating %.1f us\n", same, alt);
  }
  std::printf("read rate: 1 MiB (L2) %.0f GB/s, 8 MiB (L3) %.0f GB/s, 64 MiB %.0f GB/s\n",
              read_gbs((size_t)1 << 18, 200), read_gbs((size_t)1 << 21, 50), read_gbs((size_t)1 << 24, 20));
  return 0;
}

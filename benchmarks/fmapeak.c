/* The fp32 FMA peak of one core: a register-only loop of independent fused multiply-adds on
 * vectors as wide as our kernels' (32 bytes: AVX2, 64: AVX-512), no memory traffic. benchmarks/run.py
 * compiles it with -O2 -march=native and calls fma_gflops (ctypes) on one thread: the rate no
 * fp32 kernel exceeds on this core, beside MKL's large-GEMM rate. */
#include <time.h>

#ifndef VBYTES
#define VBYTES 32
#endif
typedef float vf __attribute__((vector_size(VBYTES)));

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

double fma_gflops(long iters, float seed) {
  vf a, b;
  for (int l = 0; l < VBYTES / 4; ++l) {
    a[l] = 0.999999f;
    b[l] = seed * 1e-7f;
  }
  /* Chains in named variables (an array would live in memory), as many as the vector registers
   * hold beside a and b. With AVX-512's 32 registers, 24 chains: enough for two FMA ports at up to
   * 12 cycles of latency. Twelve were too few on the Intel Xeon VM of 2026-12-04: 139 GFLOP/s
   * (4.3 G AVX-512 FMAs a second) where 24 reach ~212 (6.6 G, two ports at ~3.3 GHz) and MKL's
   * 1024^3 product ran at 165 (ad hoc; GCC 12 kept `b` on the stack, an FMA with a memory operand).
   * With AVX2's 16 registers, 12 chains (two ports at up to 6 cycles): 24 spilled to the stack and
   * read 86.8 GFLOP/s on the Zen 3 VM of 2026-12-05, below MKL's 90.3, where 12 reach ~102.5 (two
   * 256-bit ports at ~3.2 GHz; ad hoc). */
  vf c0 = a, c1 = a * 2.f, c2 = a * 3.f, c3 = a * 4.f, c4 = a * 5.f, c5 = a * 6.f;
  vf c6 = a * 7.f, c7 = a * 8.f, c8 = a * 9.f, c9 = a * 10.f, c10 = a * 11.f, c11 = a * 12.f;
#if defined(__AVX512F__)
#define CHAINS 24
  vf d0 = a * 13.f, d1 = a * 14.f, d2 = a * 15.f, d3 = a * 16.f, d4 = a * 17.f, d5 = a * 18.f;
  vf d6 = a * 19.f, d7 = a * 20.f, d8 = a * 21.f, d9 = a * 22.f, d10 = a * 23.f, d11 = a * 24.f;
#else
#define CHAINS 12
#endif
  double t = now();
  for (long n = 0; n < iters; ++n) { /* CHAINS FMAs (-ffp-contract=fast) per iteration */
    __asm__("" : "+x"(a), "+x"(b)); /* both in registers: no memory operand */
    c0 = c0 * a + b; c1 = c1 * a + b; c2 = c2 * a + b; c3 = c3 * a + b;
    c4 = c4 * a + b; c5 = c5 * a + b; c6 = c6 * a + b; c7 = c7 * a + b;
    c8 = c8 * a + b; c9 = c9 * a + b; c10 = c10 * a + b; c11 = c11 * a + b;
#if CHAINS == 24
    d0 = d0 * a + b; d1 = d1 * a + b; d2 = d2 * a + b; d3 = d3 * a + b;
    d4 = d4 * a + b; d5 = d5 * a + b; d6 = d6 * a + b; d7 = d7 * a + b;
    d8 = d8 * a + b; d9 = d9 * a + b; d10 = d10 * a + b; d11 = d11 * a + b;
#endif
  }
  t = now() - t;
  vf s = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11;
#if CHAINS == 24
  s += d0 + d1 + d2 + d3 + d4 + d5 + d6 + d7 + d8 + d9 + d10 + d11;
#endif
  volatile float sink = s[0];
  (void)sink;
  return 2.0 * (VBYTES / 4) * CHAINS * (double)iters / t / 1e9;
}

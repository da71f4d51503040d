// rnnrec_fast C++ CPU backend: fused Elman RNN / GRU forward and backward.
//
// Contract: rnnrec_fast/backends/reference.py (same outputs, same workspace, same gradients).
// Design: one GEMM for the input projection of every step, one recurrent GEMM per step into a
// preallocated buffer followed by a single pointwise pass over (B, H); the backward pass runs a
// fused pointwise gate-gradient pass and one carry GEMM per step, then, per chunk of ~96 rows of
// steps, one GEMM each for grad_x, grad_w_ih and grad_w_hh (the state entering each step, which
// the workspace does not hold, read from y and h0 in place). No per-step allocations.
//
// Built twice (setup.py): into the Python module rnnrec_fast._C, and with RNNREC_STANDALONE
// (csrc/standalone/) into librnnrec_fast_ops.so, the op without Python for libtorch programs
// (AOTInductor packages, TorchScript): there everything from the modules' fast path on is left out.
#if defined(RNNREC_STANDALONE)
#include <ATen/ATen.h>
#else
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#endif
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/ScopeExit.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define RNNREC_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RNNREC_ASAN 1
#endif
#endif
#if defined(RNNREC_ASAN)
#include <sanitizer/asan_interface.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <pthread.h>
#endif

#include "rnnrec_kernels.h"

namespace rnnrec {

// (defined below, after the kernels; the input checks use it)
void check_within_storage(const char* where, const char* name, const at::Tensor& t);

namespace {

// ------------------------------------------------------------------------------------------------
// Scalar math
// ------------------------------------------------------------------------------------------------
template <typename T>
inline T sigmoid_s(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
inline T act_s(T x, int relu) {
  return relu ? ((x > T(0) || std::isnan(x)) ? x : T(0)) : std::tanh(x);  // relu(NaN) = NaN, as torch
}

// ------------------------------------------------------------------------------------------------
// Scalar row kernels (the portable fallback and the float64 path)
// ------------------------------------------------------------------------------------------------
template <typename T>
void s_rnn_fwd(int64_t H, const T* xp, const T* hp, const T* bi, const T* bh, T* y, int relu) {
  for (int64_t j = 0; j < H; ++j) {
    T pre = (xp[j] + bi[j]) + (hp[j] + bh[j]);
    y[j] = act_s(pre, relu);
  }
}

template <typename T>
void s_gru_fwd_ra(int64_t H, const T* xp, const T* hp, const T* bi, const T* bh, const T* hprev, T* ws, T* y) {
  T* r_ = ws;
  T* z_ = ws + H;
  T* n_ = ws + 2 * H;
  T* hn_ = ws + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    T r = sigmoid_s((xp[j] + bi[j]) + (hp[j] + bh[j]));
    T z = sigmoid_s((xp[H + j] + bi[H + j]) + (hp[H + j] + bh[H + j]));
    T hn = hp[2 * H + j] + bh[2 * H + j];
    T n = std::tanh((xp[2 * H + j] + bi[2 * H + j]) + r * hn);
    y[j] = (T(1) - z) * n + z * hprev[j];
    r_[j] = r;
    z_[j] = z;
    n_[j] = n;
    hn_[j] = hn;
  }
}

template <typename T>
void s_gru_fwd_a(int64_t H, const T* xp, const T* hp, const T* bi, const T* bh, const T* hprev, T* ws, T* rh) {
  for (int64_t j = 0; j < H; ++j) {
    T r = sigmoid_s((xp[j] + bi[j]) + (hp[j] + bh[j]));
    T z = sigmoid_s((xp[H + j] + bi[H + j]) + (hp[H + j] + bh[H + j]));
    ws[j] = r;
    ws[H + j] = z;
    rh[j] = r * hprev[j];
  }
}

template <typename T>
void s_gru_fwd_b(int64_t H, const T* xp, const T* bi, const T* bh, const T* hprev, T* ws, T* y) {
  for (int64_t j = 0; j < H; ++j) {
    T hn = ws[3 * H + j] + bh[2 * H + j];
    T n = std::tanh((xp[2 * H + j] + bi[2 * H + j]) + hn);
    T z = ws[H + j];
    y[j] = (T(1) - z) * n + z * hprev[j];
    ws[2 * H + j] = n;
    ws[3 * H + j] = hn;
  }
}

template <typename T>
void s_rnn_bwd(int64_t H, T* dh, const T* gy, const T* y, T* dgx, int relu) {
  for (int64_t j = 0; j < H; ++j) {
    T g = dh[j] + gy[j];
    T yy = y[j];
    // relu: torch's threshold_backward, 0 where y <= 0, else g (a NaN state passes g on)
    dgx[j] = relu ? (yy <= T(0) ? T(0) : g) : g * (T(1) - yy * yy);
    dh[j] = T(0);
  }
}

template <typename T>
void s_gru_bwd_ra(int64_t H, T* dh, const T* gy, const T* hp, const T* ws, T* dgx, T* dgh) {
  for (int64_t j = 0; j < H; ++j) {
    T g = dh[j] + gy[j];
    T hprev = hp[j], r = ws[j], z = ws[H + j], n = ws[2 * H + j], hn = ws[3 * H + j];
    T dn = g * (T(1) - z);
    T dz = g * (hprev - n);
    T dn_pre = dn * (T(1) - n * n);
    T dz_pre = dz * z * (T(1) - z);
    T dr = dn_pre * hn;
    T dhn = dn_pre * r;
    T dr_pre = dr * r * (T(1) - r);
    dgx[j] = dr_pre;
    dgx[H + j] = dz_pre;
    dgx[2 * H + j] = dn_pre;
    dgh[j] = dr_pre;
    dgh[H + j] = dz_pre;
    dgh[2 * H + j] = dhn;
    dh[j] = g * z;
  }
}

template <typename T>
void s_gru_bwd_1(int64_t H, T* dh, const T* gy, const T* hp, const T* ws, T* dgx) {
  for (int64_t j = 0; j < H; ++j) {
    T g = dh[j] + gy[j];
    T hprev = hp[j], z = ws[H + j], n = ws[2 * H + j];
    T dn = g * (T(1) - z);
    T dz = g * (hprev - n);
    dgx[2 * H + j] = dn * (T(1) - n * n);
    dgx[H + j] = dz * z * (T(1) - z);
    dh[j] = g * z;
  }
}

template <typename T>
void s_gru_bwd_2(int64_t H, T* dh, const T* drh, const T* hp, const T* ws, T* dgx, T* hin) {
  for (int64_t j = 0; j < H; ++j) {
    T hprev = hp[j], r = ws[j];
    T d = drh[j];
    dgx[j] = d * hprev * r * (T(1) - r);
    dh[j] = dh[j] + d * r;
    hin[j] = r * hprev;
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel selection, checked once at run time: AVX-512F float kernels (GEMM, gemv, row kernels)
// when the CPU has them, else AVX2/FMA, else scalar. RNNREC_FAST_NO_AVX512=1 / RNNREC_FAST_NO_SIMD=1
// step down (tests/test_simd_paths.py runs the portable paths with them).
// ------------------------------------------------------------------------------------------------
// A run-time switch from the environment: unset, "", "0", "false", "no", "off" (any case) are off;
// "1", "true", "yes", "on" on; anything else on, with a warning (any value but "0" was on, silently:
// RNNREC_FAST_NO_SIMD=false switched the vector kernels off).
bool env_switch(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr) return false;
  std::string v(e);
  for (auto& c : v) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (v.empty() || v == "0" || v == "false" || v == "no" || v == "off") return false;
  if (v != "1" && v != "true" && v != "yes" && v != "on")
    TORCH_WARN(name, "=", e, " is none of 1/0, true/false, yes/no, on/off: taken as 1");
  return true;
}

bool simd_enabled() {
  static const bool on = [] {
    if (env_switch("RNNREC_FAST_NO_SIMD")) return false;
#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
#else
    return false;
#endif
  }();
  return on;
}

bool avx512_enabled() {
  static const bool on = [] {
    if (!simd_enabled()) return false;
    if (env_switch("RNNREC_FAST_NO_AVX512")) return false;
#if defined(RNNREC_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return false;
#endif
  }();
  return on;
}

// Whether a large GRU inference projects its inputs a chunk of steps at a time
// (projection_chunk): on AVX-512, where it pays; on AVX2 too where RNNREC_FAST_CHUNKED_PROJECTION=1
// (tests/test_simd_paths.py: the chunked path's tests on a machine without AVX-512).
bool chunked_projection() {
  static const bool on = avx512_enabled() || (simd_enabled() && env_switch("RNNREC_FAST_CHUNKED_PROJECTION"));
  return on;
}

template <typename T>
const RowKernels<T>& row_kernels() {
  static const RowKernels<T> k = [] {
#if defined(RNNREC_HAVE_AVX2_TU)
    if constexpr (std::is_same<T, float>::value) {
      if (avx512_enabled()) return avx512_row_kernels_f32();
      if (simd_enabled()) return avx2_row_kernels_f32();
    }
#endif
    return scalar_row_kernels<T>();
  }();
  return k;
}

// ------------------------------------------------------------------------------------------------
// GEMM on raw row-major buffers: C[M,N] = op(A) op(B) (+ beta*C)
//   op(A) = A (M x K, lda) or, with ta, A^T where A is stored K x M; likewise B.
// ------------------------------------------------------------------------------------------------
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b, beta, 1);
  }
}

// Large fresh buffers: ask Linux for transparent huge pages (where THP is in "madvise" mode this
// cuts the first-touch page-fault cost of a 50 MB workspace from ~20 ms to ~3 ms). Harmless hint.
inline void advise_huge(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (p == nullptr || bytes < 4 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Scratch memory kept between calls. Freeing a large buffer at the top of glibc's heap gives its
// pages back to the system (trim), and the next call's buffer is faulted in again page by page:
// GRU inference B16 T20 H512 grew and trimmed the heap by ~6 MiB at every call (~1,600 page
// faults; one thread on the Zen 4 VM, medians of three runs each: 13.7-13.9 ms, 10.4-11.2 with
// this pool, no page fault). Freed blocks of 64 KiB or more are kept, up to kHeld bytes in all
// (the oldest freed first beyond that), and the smallest that fits serves the next request, if it
// is at most twice the request (a small request does not pin a large block that the next large
// one would then allocate again); release() frees them (rnnrec_fast.empty_cache()). One pool for
// every thread, under a lock (a call takes a handful of blocks). give() never allocates (it runs
// in destructors): the table of kept blocks has room for kHeld / kMinBytes of them. Under
// AddressSanitizer (make sanitize) a kept block is poisoned, and a block handed out is
// addressable only up to the bytes asked for: a use after give() or a read past the request
// reports as it would with malloc.
class ScratchPool {
 public:
  static constexpr size_t kMinBytes = size_t(64) << 10;
  static constexpr size_t kHeld = size_t(32) << 20;
  static ScratchPool& get() {
    // Never destroyed (blocks may come back during exit). Held across fork() (a DataLoader worker
    // forked while another thread is in take/give must not inherit a locked mutex).
    static ScratchPool* pool = [] {
      auto* p = new ScratchPool();
#if defined(__linux__)
      pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); }, [] { get().mu_.unlock(); });
#endif
      return p;
    }();
    return *pool;
  }
  // A block of at least bytes, 64-byte aligned; *cap gets its size (bytes rounded up to 64, or the
  // kept block's).
  void* take(size_t bytes, size_t* cap) {
    if (bytes > std::numeric_limits<size_t>::max() - 64) throw std::bad_alloc();
    const size_t want = (bytes + 63) & ~size_t(63);
    void* p = nullptr;
    if (want >= kMinBytes) {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = n_;
      for (size_t i = 0; i < n_; ++i)
        if (blocks_[i].bytes >= want && blocks_[i].bytes / 2 <= want &&
            (best == n_ || blocks_[i].bytes < blocks_[best].bytes))
          best = i;
      if (best < n_) {
        p = blocks_[best].p;
        *cap = blocks_[best].bytes;
        held_ -= blocks_[best].bytes;
        std::memmove(blocks_ + best, blocks_ + best + 1, (n_ - best - 1) * sizeof(Block));
        --n_;
      }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(64, want);
      if (p == nullptr) throw std::bad_alloc();
      advise_huge(p, want);
      *cap = want;
    }
    poison(p, *cap);
    unpoison(p, bytes);
    return p;
  }
  // (noexcept: a mutex that fails to lock ends the process, as it would anywhere in a destructor)
  void give(void* p, size_t bytes) noexcept {
    if (p == nullptr) return;
    if (bytes >= kMinBytes && bytes <= kHeld) {
      poison(p, bytes);
      Block dropped[kHeld / kMinBytes];  // the oldest, beyond the bound: freed after the lock
      size_t drop = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        while (drop < n_ && held_ + bytes > kHeld) {
          dropped[drop] = blocks_[drop];
          held_ -= blocks_[drop++].bytes;
        }
        if (drop > 0) std::memmove(blocks_, blocks_ + drop, (n_ - drop) * sizeof(Block));
        n_ -= drop;
        blocks_[n_++] = {p, bytes};  // (room: every kept block has kMinBytes or more, kHeld in all)
        held_ += bytes;
      }
      for (size_t i = 0; i < drop; ++i) free_block(dropped[i]);
      return;
    }
    unpoison(p, bytes);
    std::free(p);
  }
  // Frees every kept block; returns their bytes.
  size_t release() {
    Block all[kHeld / kMinBytes];
    size_t n = 0, bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::copy(blocks_, blocks_ + n_, all);
      n = n_;
      bytes = held_;
      n_ = 0;
      held_ = 0;
    }
    for (size_t i = 0; i < n; ++i) free_block(all[i]);
    return bytes;
  }
  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };
  static void poison(void* p, size_t bytes) {
#if defined(RNNREC_ASAN)
    ASAN_POISON_MEMORY_REGION(p, bytes);
#endif
    (void)p, (void)bytes;
  }
  static void unpoison(void* p, size_t bytes) {
#if defined(RNNREC_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(p, bytes);
#endif
    (void)p, (void)bytes;
  }
  static void free_block(const Block& b) {
    unpoison(b.p, b.bytes);
    std::free(b.p);
  }
  std::mutex mu_;
  Block blocks_[kHeld / kMinBytes];  // kept blocks, oldest first
  size_t n_ = 0;
  size_t held_ = 0;
};

// Uninitialised scratch buffer (every element is written before it is read), from ScratchPool.
template <typename T>
class Buf {
 public:
  Buf() = default;
  explicit Buf(int64_t n) {
    if (n <= 0) return;
    if (uint64_t(n) > (std::numeric_limits<size_t>::max() - 64) / sizeof(T)) throw std::bad_alloc();
    p_ = static_cast<T*>(ScratchPool::get().take(sizeof(T) * size_t(n), &cap_));
  }
  Buf(Buf&& o) noexcept : p_(o.p_), cap_(o.cap_) { o.p_ = nullptr, o.cap_ = 0; }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      ScratchPool::get().give(p_, cap_);
      p_ = o.p_, cap_ = o.cap_;
      o.p_ = nullptr, o.cap_ = 0;
    }
    return *this;
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { ScratchPool::get().give(p_, cap_); }
  T* data() const { return p_; }

 private:
  T* p_ = nullptr;
  size_t cap_ = 0;
};

// The op's large outputs (y and the workspace; grad_x and the weight gradients) as tensors whose
// memory comes from ScratchPool and goes back to it when the tensor is freed. From torch's CPU
// allocator (glibc), a training step's outputs came back as fresh pages at every step: glibc gives
// the top of its heap back to the system (trim) or unmaps a large block when the step frees it,
// and the next step's first writes fault each page in again (~1.1 us a page on the Intel Xeon VM).
// Training, one thread, that VM: B32 T20 H100 ~55 -> 0 page faults a step (2.40-2.69 -> 2.37-2.39
// ms, A/B); B64 T20 H512 690-1,500 -> 0 (pooling y, the workspace and grad_x alone moved glibc's
// reuse onto the weight gradients' 6 MB: more faults and ~3% slower; with them too ~96 -> ~91 ms).
// A storage with this allocator behaves as any CPU tensor's (it can be resized, shared, pickled).
class PoolAllocator final : public c10::Allocator {
 public:
  static PoolAllocator* get() {
    static PoolAllocator* a = new PoolAllocator();  // never destroyed (tensors may be freed at exit)
    return a;
  }
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    auto* b = new Block{nullptr, 0};
    try {
      b->p = ScratchPool::get().take(n, &b->cap);
    } catch (...) {
      delete b;
      throw;
    }
    return {b->p, b, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* p;
    size_t cap;
  };
  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    if (b == nullptr) return;
    ScratchPool::get().give(b->p, b->cap);
    delete b;
  }
};

// An uninitialised CPU tensor of these sizes and opts' dtype, from PoolAllocator; from c10's CPU
// allocator (as at::empty) while torch's memory profiler is on, which sees its allocations, or
// where the process has set another CPU allocator (c10::SetCPUAllocator).
inline at::Tensor empty_pooled(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu(), "rnnrec_fast cpp: empty_pooled makes CPU tensors");
  if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator() || c10::memoryProfilingEnabled()) {
    at::Tensor t = at::empty(sizes, opts);
    advise_huge(t.data_ptr(), t.nbytes());
    return t;
  }
  return at::detail::empty_generic(sizes, PoolAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), std::nullopt);
}

// Buf for a call's small scratch: up to 4 KiB on the stack, larger on the heap. The serving step's
// recurrent product (300 floats at H = 100) came from malloc at every call, and a request of
// 1 KiB or more makes glibc consolidate the fast bins that the call's small frees refilled (a
// measurable share of a ~7 us step).
template <typename T>
struct SmallBuf {
  static constexpr int64_t kInline = 4096 / int64_t(sizeof(T));
  alignas(64) T inline_[kInline];
  Buf<T> heap;
  explicit SmallBuf(int64_t n) : heap(n > kInline ? n : 0) {}
  T* data() { return heap.data() != nullptr ? heap.data() : inline_; }
};

// The packed-B GEMM kernels this CPU runs: AVX-512F where it has it, else AVX2/FMA, else none
// (ATen/BLAS then does every product).
const GemmKernels* fast_gemm() {
#if defined(RNNREC_HAVE_AVX2_TU)
  static const GemmKernels avx512{&avx512_packed_size, &avx512_pack_b, &avx512_gemm_packed, &avx512_gemm_direct};
  static const GemmKernels avx2 = avx2_gemm_kernels_f32();
  static const GemmKernels* k = avx512_enabled() ? &avx512 : simd_enabled() ? &avx2 : nullptr;
  return k;
#else
  return nullptr;
#endif
}

// Product over row blocks of C = A . op(B) with the fast_gemm() kernels (call only where it is not
// null), parallel over M when the work pays. op(B) is a packed copy (Bp from pack_b, ldb = 0) or,
// with ldb > 0, a row-major K x N matrix read in place.
inline void fast_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp,
                      int64_t ldb, bool beta, float* C, int64_t ldc) {
  const GemmKernels& g = *fast_gemm();
  auto block = [&](int64_t i0, int64_t i1) {
    if (ldb > 0)
      g.gemm_direct(i1 - i0, N, K, A + i0 * si, si, sk, Bp, ldb, beta, C + i0 * ldc, ldc);
    else
      g.gemm_packed(i1 - i0, N, K, A + i0 * si, si, sk, Bp, beta, C + i0 * ldc, ldc);
  };
  // In parallel over whole micro-kernel row blocks from ~0.5M multiply-adds (~5 us on one core),
  // each thread taking at least ~0.25M: the per-step products of training at B32 H100 (32 x 300 x
  // 100) are of that size, and on two threads MKL splits them too.
  const double work = double(M) * double(N) * double(K);
  const int64_t mr = avx512_enabled() ? 8 : 6;  // rows of the micro-kernel: blocks of whole ones
  if (work < 5.0e5 || M < 2 * mr || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    block(0, M);
    return;
  }
  const int64_t nblk = (M + mr - 1) / mr;
  at::parallel_for(0, nblk, std::max<int64_t>(1, int64_t(2.5e5 / (double(N) * double(K) * double(mr))) + 1),
                   [&](int64_t b0, int64_t b1) { block(b0 * mr, std::min(M, b1 * mr)); });
}

inline void packed_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t si, int64_t sk, const float* Bp,
                        bool beta, float* C, int64_t ldc) {
  fast_rows(M, N, K, A, si, sk, Bp, 0, beta, C, ldc);
}

constexpr int64_t kL2Bytes = 512 * 1024;  // the L2 cache per core of the Zen 3 machine here
constexpr int64_t kPackKC = 256;          // gemm_any packs op(B) and runs its product in K chunks of at most this (k_chunk)

// With AVX2 only, the packed kernel competes with MKL's own AVX2 kernel (both ~93 GFLOP/s on a
// 1024^3 product on the Zen 3 machine here). It wins where op(B) packed fits in a quarter of L2,
// and for a transposed A (the weight gradients, whose A rows the kernel reads K floats apart) A
// too: the products of H = 100 (M256 N300 K100: 162 us against MKL's ~193 us, whose B packing and
// beta = 0 scaling of C cost it ~30 us; training B32 T20 H100 ~3.75 -> ~3.4 ms, A/B). It also wins
// on a long, not transposed A with one K chunk written into a strided C (the forward's input
// projection of a large batch, B512 T20 H256: 126 -> 112 ms). With larger operands MKL's cache
// blocking wins (B64 T20 H512 training, packing the per-step weight gradients' 128 KB x: ~137 ->
// ~143 ms).
inline bool avx2_packed_pays(int64_t K, int64_t N) { return K * N * int64_t(sizeof(float)) <= kL2Bytes / 4; }
// AVX-512: packing op(B) pays where it is small (a quarter of L2) or used by enough rows. Packing
// the 3 MB of a H=512 weight for the 64 rows of a one-step batch made that call slower than MKL's
// path (B64 T1 H512 inference, one thread, Zen 4: 4,760 us in run cpu-2026-12-02b, 2,647 us in
// 12-02c after this; T=20 and training, whose products have 640+ rows, keep the packed kernels)
inline bool avx512_packed_pays(int64_t M, int64_t K, int64_t N) {
  return K * N * int64_t(sizeof(float)) <= kL2Bytes / 4 || M >= 256;
}

// Whether MKL takes a product that our AVX-512 packed kernel would otherwise run: on Intel CPUs,
// where MKL runs AVX-512 kernels of its own (on AMD's it takes its AVX2 path, which ours beats),
// for products whose K is at least 512 and whose op(A) and op(B) each pass 512 KiB. Our kernel's
// 32-column panels of K >= 512 rows no longer fit in L1 (48 KiB) there; standalone C++ against
// torch.mm, the Intel Xeon VM, one thread, fastest of 200: M1280 N1536 K512 ours 13.5 ms, MKL 11.6;
// M1024^3 14.8 / 11.6 ms; but M512 N768 K256 1.21 / 1.12 ms and M256 N300 K100 93 / 100 us. Training
// B64 T20 H512 (its input projection, input gradient and weight gradients), one thread, three
// processes of each in turn: 97-100 -> 91-94 ms. Also the products with a transposed A (the weight
// gradients of a backward chunk, K = its rows) whose C passes 512 KiB: M1536 N512 K128 (H = 512,
// B = 64) ours 1.33-1.35 ms with the packing, MKL 1.24; M768 N256 K128 333 / 305 us.
inline bool mkl_takes(int64_t M, int64_t N, int64_t K, bool ta = false) {
  const int64_t limit = 512 * 1024 / int64_t(sizeof(float));
  if (!avx512_enabled() || cpu_vendor() != CpuVendor::kIntel) return false;
  return (K >= 512 && K * N > limit && M * K > limit) || (ta && K >= 64 && M * N > limit);
}

// Whether gemm_any may run a float product on our kernels at all (else ATen/BLAS).
inline bool gemm_any_ours(bool ta, int64_t M, int64_t N, int64_t K) {
  return M >= 48 && N >= 8 && K > 0 && fast_gemm() != nullptr && !mkl_takes(M, N, K, ta);
}
// Whether gemm_any runs a float product as the packed one (op(B) packed in K chunks of
// k_chunk(K, kPackKC), each chunk's product by packed_rows): M large enough to amortise packing
// op(B), and (AVX2 only) where that beats MKL (below).
inline bool gemm_any_packs(bool ta, bool tb, int64_t M, int64_t N, int64_t K) {
  return gemm_any_ours(ta, M, N, K) &&
         ((avx512_enabled() && avx512_packed_pays(M, K, N)) ||
          (avx2_packed_pays(K, N) && (!ta || avx2_packed_pays(K, M))) || (!ta && tb && K <= 256 && M >= 4096));
}

// General product (row-major, as gemm_rm): C = op(A) op(B), or C += op(A) op(B) with acc. The
// packed-B kernels for float when M is large enough to amortise packing op(B) and (AVX2 only)
// where they beat MKL (above); with AVX-512, a row-major op(B) not worth packing is read in place;
// ATen/BLAS otherwise.
template <typename T>
void gemm_any(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
              T* C, int64_t ldc, bool acc = false) {
  if constexpr (std::is_same<T, float>::value) {
    const GemmKernels* g = fast_gemm();
    if (gemm_any_packs(ta, tb, M, N, K)) {
      const int64_t KC = k_chunk(K, kPackKC);
      Buf<float> pk(g->packed_size(KC, N));
      for (int64_t kc = 0; kc < K; kc += KC) {
        const int64_t kb = std::min(KC, K - kc);
        g->pack_b(tb, kb, N, tb ? B + kc : B + kc * ldb, ldb, pk.data());
        if (ta)
          packed_rows(M, N, kb, A + kc * lda, 1, lda, pk.data(), acc || kc > 0, C, ldc);
        else
          packed_rows(M, N, kb, A + kc, lda, 1, pk.data(), acc || kc > 0, C, ldc);
      }
      return;
    }
    if (gemm_any_ours(ta, M, N, K) && !tb && avx512_enabled() && g->gemm_direct != nullptr) {
      // AVX-512, a row-major op(B) too large to pack for these rows: the kernel reads it in place
      // (the backward's input gradient per chunk at H = 512, 128 x 512 x 1536: ~2.1 ms against
      // MKL's ~2.7 in standalone timings on the Zen 4 VM, where MKL runs its AVX2 path)
      fast_rows(M, N, K, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, acc, C, ldc);
      return;
    }
  }
  gemm_rm<T>(ta, tb, M, N, K, A, lda, B, ldb, acc ? T(1) : T(0), C, ldc);
}

#if defined(RNNREC_HAVE_AVX2_TU)
// C[m, n] = A[m, :] . W[n, :] for M <= 8 rows of A, one thread (call only where simd_enabled()):
// one row on AVX-512, avx512_gemv_nt; more rows on AVX-512 where every row of W starts
// on a cache line (H = 128, 256, 512: a 64-byte load across two lines costs about two), the
// 16-lane kernel, else the 8-lane one. _C.linear_rows on the Zen 4 VM, one thread, W 1536 x 512
// (from L3), fastest of 300 calls in three alternating runs, 8-lane -> 16-lane: 2 rows 46 -> 44 us,
// 4 rows 68 -> 64, 6 rows 110 -> 94, 8 rows 138 -> 127 (two products of 4 rows); W 768 x 256:
// 6 rows 29.4 -> 26.0, 8 rows 37 -> 34.5. In a whole GRU call (T = 20, B = 2-8, H = 256 or 512)
// the change was within this VM's noise.
inline void small_nt(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* A, int64_t lda,
                     float* C, int64_t ldc) {
  if (avx512_enabled() && (M == 1 || (ldw % 16 == 0 && reinterpret_cast<uintptr_t>(W) % 64 == 0)))
    avx512_small_gemm_nt(M, N, K, W, ldw, A, lda, C, ldc);  // (one row: avx512_gemv_nt)
  else
    avx2_small_gemm_nt_f32(M, N, K, W, ldw, A, lda, C, ldc);
}

// C[m, n] = A[m, :] . W[n, :] for a few rows of A (M <= 8; call only where simd_enabled()): the
// hand-vectorised kernels stream W once. A few rows against a large W is a stream of W (from L3
// when it does not fit in L2: 3 MB at H=512, 1.2 MB for a 2,933-item catalogue): with more
// threads, each streams a slice of the rows of W. Below ~256K multiply-adds the hand-over costs
// more than it saves. With backward, each thread reads its slice of W in blocks of 120 rows from
// its last block to its first. A recurrence streams the same W at every step; alternating the
// direction step by step starts each step on the rows the previous one read last, still in L2,
// where the same direction every step finds each row evicted (LRU over a W larger than L2). W_hh
// at H = 512 (3 MiB), one thread, Zen 4 (1 MiB of L2), 20 steps of the gemv in a standalone C++
// loop: ~40 -> ~36 us a step. Each output is the same dot product either way, added in the same order
// whichever block or thread slice holds its row (the kernels' reductions do not depend on where a
// row falls in their register blocks): the same bits in both directions and with any thread count.
inline void few_rows_nt(int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw, const float* A, int64_t lda,
                        float* C, int64_t ldc, bool backward = false) {
  const auto rows = [&](int64_t n0, int64_t n1) { small_nt(M, n1 - n0, K, W + n0 * ldw, ldw, A, lda, C + n0, ldc); };
  const auto cols = [&](int64_t n0, int64_t n1) {  // output columns n0..n1 (rows of W)
    if (!backward) {
      rows(n0, n1);
      return;
    }
    // blocks aligned to n0, the ragged one last; 120 rows, a multiple of every kernel's register
    // block (8, 5, 4; 6, 4, 3 on AVX2), so no block leaves rows to a one-row loop (64 left 4 of
    // every 64 of a 4-row product with its 5-row blocks: ~5% slower, from a review)
    constexpr int64_t kBlock = 120;
    for (int64_t b = (n1 - n0 - 1) / kBlock; b >= 0; --b) rows(n0 + b * kBlock, std::min(n1, n0 + (b + 1) * kBlock));
  };
  const int64_t nthr = at::get_num_threads();
  if (nthr > 1 && M * N * K >= (int64_t(1) << 18) && N >= 64 && !at::in_parallel_region()) {
    const int64_t blocks = (N + 31) / 32;  // slices of whole 32-row blocks
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) { cols(b0 * 32, std::min(N, b1 * 32)); });
  } else {
    cols(0, N);
  }
}
#endif

#if defined(RNNREC_HAVE_AVX2_TU)
// C = A . Wt^T (Wt: N x K row-major, as PyTorch stores weights) for several blocks of rows of A,
// with Wt packed once: each block's product is gemm_any's packed one (the same K chunks, the same
// kernel), so a block's outputs have the same bits as if all blocks were one product that takes
// the packed path (call only with fast_gemm(), and where gemm_any would pack the product of all
// the blocks together: gemm_any_packs). The input projections of a GRU's steps in chunks
// (forward_impl), of a step's rows in blocks (one_step_rows).
struct PackedNT {
  int64_t N, K, KC, per;
  Buf<float> pk{0};
  PackedNT(int64_t N_, int64_t K_, const float* Wt, int64_t ldw)
      : N(N_), K(K_), KC(k_chunk(K_, kPackKC)), per(fast_gemm()->packed_size(KC, N_)) {
    pk = Buf<float>(per * ((K + KC - 1) / KC));
    for (int64_t kc = 0; kc < K; kc += KC)
      fast_gemm()->pack_b(true, std::min(KC, K - kc), N, Wt + kc, ldw, pk.data() + kc / KC * per);
  }
  void run(int64_t M, const float* A, int64_t lda, float* C, int64_t ldc) const {
    for (int64_t kc = 0; kc < K; kc += KC)
      packed_rows(M, N, std::min(KC, K - kc), A + kc, lda, 1, pk.data() + kc / KC * per, kc > 0, C, ldc);
  }
};
#endif

// A weight used by one product per step: out[M, N] = A[M, K] . op(W), op(W) = W^T (W stored N x K,
// tb) or W (stored K x N). With the AVX-512 packed-B kernels, W^T is packed once per call; W is read
// in place (no copy of the weights: this is the backward pass, where memory is tight) but where its
// rows are a multiple of 512 bytes apart, which the in-place kernel would copy at every step (packed
// once: H = 128, 256, 512; training B64 T20 H512 live peak 26.2 MiB, torch.nn's 31.1). With AVX2
// only, op(W) is packed once per call where avx2_packed_pays (a quarter of L2 at most: H = 100;
// with the peak of a B32 T20 H100 training step at 2.24 MiB against torch.nn's 3.22, live heap), and
// where it is larger than the L2 cache, used over several steps and by few rows (MKL repacks it
// from L3 at every product, a cost its few rows do not amortise: training B64 T20 H512 ~160 ->
// ~151 ms, A/B); otherwise ATen/MKL (B512 T20 H256 inference looked ~5% slower packed).
template <typename T>
struct StepW {
  bool tb = false, packed = false, direct = false, small = false;
  int64_t K = 0, N = 0, ldw = 0;
  const T* W = nullptr;
  Buf<float> pk{0};
  mutable bool flip = false;  // the few-rows product alternates its direction over W, step by step
  // Whether run() is our packed or in-place kernel: the same bits for any rows, in any blocks.
  bool ours() const { return packed || direct; }
  StepW(bool tb_, int64_t K_, int64_t N_, const T* W_, int64_t ldw_, int64_t M, int64_t steps)
      : tb(tb_), K(K_), N(N_), ldw(ldw_), W(W_) {
#if defined(RNNREC_HAVE_AVX2_TU)
    if constexpr (std::is_same<T, float>::value) {
      const GemmKernels* g = fast_gemm();
      if (tb && M <= 8 && simd_enabled()) {
        small = true;
      } else if (!tb && M > 8 && steps > 1 && mkl_takes(M * steps, N, K)) {
        // Intel AVX-512 (mkl_takes), a large row-major W over many steps: MKL's product reading W
        // in place (its "nocopy" kernel) beats ours packed there: the backward's d(h) . W_hh at
        // B = 64, H = 512 (M64 N512 K1536) ~593 us against 672-740 (standalone, ours without
        // packing); B64 T20 H512 training ~1% (ad hoc), and no 3 MiB packed copy of W_hh held
      } else if (!tb && avx512_enabled() && K > 0 && N > 0 && M * steps >= 32 &&
                 !(steps > 1 && (ldw * int64_t(sizeof(float))) % 512 == 0)) {
        // (W read in place, but for rows a multiple of 512 bytes apart, which the kernel copies
        // at every product to keep them off a few cache sets: those are packed once, below; the
        // backward's W_hh at H = 512, 3 MB copied at each of its steps)
        direct = true;
      } else if (K > 0 && N > 0 && M * steps >= 32 &&
                 ((avx512_enabled() && avx512_packed_pays(M * steps, K, N)) ||
                  (simd_enabled() && avx2_packed_pays(K, N)) ||
                  (simd_enabled() && steps > 1 && M <= 128 &&
                                       K * N * int64_t(sizeof(float)) > kL2Bytes))) {
        packed = true;
        pk = Buf<float>(g->packed_size(K, N));
        g->pack_b(tb, K, N, W, ldw, pk.data());
      }
    }
#endif
    (void)M;
    (void)steps;
  }
  void run(int64_t M, const T* A, int64_t lda, T* C, int64_t ldc) const {
#if defined(RNNREC_HAVE_AVX2_TU)
    if constexpr (std::is_same<T, float>::value) {
      if (small) {
        // W larger than half of L2 (Zen 3's 512 KiB): every other step reads it backwards (see
        // few_rows_nt)
        const bool backward = flip && N * K * int64_t(sizeof(float)) > kL2Bytes / 2;
        flip = !flip;
        few_rows_nt(M, N, K, W, ldw, A, lda, C, ldc, backward);
        return;
      }
      if (packed || direct) {
        fast_rows(M, N, K, A, lda, 1, packed ? pk.data() : W, packed ? 0 : ldw, false, C, ldc);
        return;
      }
    }
#endif
    gemm_rm<T>(false, tb, M, N, K, A, lda, W, ldw, T(0), C, ldc);
  }
};

// out[m, n] = sum_k X[m, k] * Wt[n, k]  (Wt row-major as PyTorch stores weights). Up to 8 rows of
// X: the hand-vectorised kernel (no BLAS call overhead, the weights streamed once); 9-47: the
// transposed packed product below (9-12 rows on AVX2 with large weights: the few-rows kernel).
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* X, int64_t ldx, const T* Wt, int64_t ldw, T* C,
             int64_t ldc) {
#if defined(RNNREC_HAVE_AVX2_TU)
  if constexpr (std::is_same<T, float>::value) {
    if (M <= 8 && simd_enabled()) {
      small_nt(M, N, K, Wt, ldw, X, ldx, C, ldc);
      return;
    }
    if (M < 48 && N >= 64 && K > 0 && simd_enabled() && (M > 12 || avx512_enabled())) {
      // Few rows (9-47: the input projection of one long session, or of a few short ones):
      // compute C^T = Wt . X^T with the weights as the broadcast operand, so that only X (small)
      // is packed and the weights are streamed once; then transpose the (N, M) result into C. The
      // rows of X are the columns of C^T, taken 16 to a panel: past 16, a last 1-8 (20 = 16 + 4)
      // would fill a panel to half at most, and go to the few-rows kernel instead. Standalone C++,
      // one thread, this against what ran before (M20 N1536 K512): Zen 4, AVX-512 against the
      // product with X as the broadcast operand, 477 -> 301 us (M33 707 -> 527, M40 757 -> 706,
      // M20 N300 K100 18.7 -> 14.6); Zen 3, AVX2 against the few-rows kernel 8 rows at a time
      // (which streamed the weights 3 times at M20), interleaved in one process on a noisy VM:
      // M20 564 -> 363 us, M16 479 -> 282, M24 727 -> 527, M40 1263 -> 834 (MKL's small-M product
      // took ~500 us at M20 there).
      const GemmKernels& g = *fast_gemm();
      const int64_t rest = M > 16 && M % 16 <= 8 ? M % 16 : 0, Mv = M - rest;
      Buf<float> pk(g.packed_size(K, Mv));
      g.pack_b(true, K, Mv, X, ldx, pk.data());
      Buf<float> ct(N * Mv);
      packed_rows(N, Mv, K, Wt, ldw, 1, pk.data(), false, ct.data(), Mv);
      // (a scalar copy of the transposed result, its reads Mv floats apart, took ~7 of the ~107 us
      // of a one-step B32 H100 GRU forward: ad hoc perf profile, Zen 3 VM)
      avx2_transpose_f32(N, Mv, ct.data(), Mv, C, ldc);
      if (rest > 0) few_rows_nt(rest, N, K, Wt, ldw, X + Mv * ldx, ldx, C + Mv * ldc, ldc);
      return;
    }
    if (M <= 12 && simd_enabled() && N * K * int64_t(sizeof(float)) > kL2Bytes) {
      // AVX2, 9-12 rows against weights larger than L2: the few-rows kernel, 8 rows at a time
      // (it streams the weights twice, and still beats MKL's small-M product: 12 rows 354 -> 262
      // us; and the transposed product above, whose 16-column panel would be at most 3/4 full:
      // GRU B1 T12 H512, one thread, Zen 3, ~765 against ~840 us a call)
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        few_rows_nt(std::min<int64_t>(8, M - m0), N, K, Wt, ldw, X + m0 * ldx, ldx, C + m0 * ldc, ldc);
      return;
    }
  }
#endif
  gemm_any<T>(false, true, M, N, K, X, ldx, Wt, ldw, C, ldc);
}

// Run fn(b0, b1) over batch rows, in parallel when the pointwise work is large enough to pay.
template <typename F>
inline void for_rows(int64_t B, int64_t work_per_row, const F& fn) {
  const int64_t min_work = 32768;
  if (B * work_per_row < 2 * min_work || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    fn(int64_t(0), B);
    return;
  }
  int64_t grain = std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, B, grain, fn);
}

// ------------------------------------------------------------------------------------------------
// Input validation
// ------------------------------------------------------------------------------------------------
struct Dims {
  int64_t T, B, I, H, G, W;  // W: the workspace's width (ws_width)
};

// The saved workspace per step and row: gru [r, z, n, hn]; rnn nothing (rnnrec_fast.backends.reference).
inline int64_t ws_width(int64_t mode, int64_t H) { return mode == MODE_GRU ? 4 * H : 0; }

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype,
                  bool strided = false) {
  TORCH_CHECK(t.defined(), "rnnrec_fast cpp: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "rnnrec_fast cpp: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, "rnnrec_fast cpp: ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "rnnrec_fast cpp: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(strided || t.is_contiguous(), "rnnrec_fast cpp: ", name, " must be contiguous");
  // (the op's dispatcher resolves these, and checks the memory, before its kernels run; a direct
  // call of forward / backward reaches here with whatever it was given)
  TORCH_CHECK_VALUE(!t.is_neg() && !t._is_zerotensor(), "rnnrec_fast cpp: ", name,
                    " has the negative bit or is an efficient zero tensor: resolve_neg() / clone() it first");
  check_within_storage("rnnrec_fast cpp: ", name, t);
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expect) {
  TORCH_CHECK(t.sizes() == expect, "rnnrec_fast cpp: ", name, " must have shape ", expect, ", got ",
              t.sizes());
}

Dims validate(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
              const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
              const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& resets,
              int64_t mode, bool strided_x = false) {
  TORCH_CHECK(mode == MODE_RNN_TANH || mode == MODE_RNN_RELU || mode == MODE_GRU,
              "rnnrec_fast cpp: mode must be 0 (rnn_tanh), 1 (rnn_relu) or 2 (gru), got ", mode);
  TORCH_CHECK(x.defined(), "rnnrec_fast cpp: x is undefined");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "rnnrec_fast cpp: x must be float32 or float64, got ", dtype);
  check_tensor(x, "x", 3, dtype, strided_x);
  check_tensor(h0, "h0", 2, dtype);
  check_tensor(w_ih, "w_ih", 2, dtype);
  check_tensor(w_hh, "w_hh", 2, dtype);
  Dims d;
  d.T = x.size(0);
  d.B = x.size(1);
  d.I = x.size(2);
  d.H = h0.size(1);
  d.G = mode == MODE_GRU ? 3 : 1;
  d.W = ws_width(mode, d.H);
  TORCH_CHECK(h0.size(0) == d.B, "rnnrec_fast cpp: h0 must have shape (B, H) with B = ", d.B,
              " (x.shape[1]), got ", h0.sizes());
  check_shape(w_ih, "w_ih", {d.G * d.H, d.I});
  check_shape(w_hh, "w_hh", {d.G * d.H, d.H});
  if (b_ih.has_value() && b_ih->defined()) {
    check_tensor(*b_ih, "b_ih", 1, dtype);
    check_shape(*b_ih, "b_ih", {d.G * d.H});
  }
  if (b_hh.has_value() && b_hh->defined()) {
    check_tensor(*b_hh, "b_hh", 1, dtype);
    check_shape(*b_hh, "b_hh", {d.G * d.H});
  }
  if (lengths.has_value() && lengths->defined()) {
    check_tensor(*lengths, "lengths", 1, at::kLong);
    check_shape(*lengths, "lengths", {d.B});
    const int64_t* L = lengths->data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      TORCH_CHECK(L[b] >= 0 && L[b] <= d.T, "rnnrec_fast cpp: lengths must lie in [0, T=", d.T,
                  "], got lengths[", b, "] = ", L[b]);
    }
  }
  if (resets.has_value() && resets->defined()) {
    check_tensor(*resets, "resets", 2, at::kBool);
    check_shape(*resets, "resets", {d.T, d.B});
  }
  return d;
}

const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// Per-step row state: active and reset flags.
struct StepMasks {
  const int64_t* len = nullptr;  // (B,) or null
  const bool* rst = nullptr;     // (T, B) or null
  int64_t B = 0;
  inline bool active(int64_t t, int64_t b) const { return len == nullptr || t < len[b]; }
  inline bool reset(int64_t t, int64_t b) const { return rst != nullptr && rst[t * B + b]; }
  inline bool any_active(int64_t t) const {
    if (len == nullptr) return true;
    for (int64_t b = 0; b < B; ++b)
      if (t < len[b]) return true;
    return false;
  }
  // Every row active at step t and none reset: the state entering step t is h0 (t = 0) or y[t - 1]
  // as it stands.
  inline bool all_plain(int64_t t) const {
    for (int64_t b = 0; b < B; ++b)
      if (!active(t, b) || reset(t, b)) return false;
    return true;
  }
  // Lengths that never increase from a row to the next, and no resets (a PackedSequence's sorted
  // batch, as the modules pass it): the rows active at step t are the first live(t), and each of
  // them was active at t - 1, so the state entering step t is h0 or y[t - 1] as it stands for them.
  inline bool prefix() const {
    if (len == nullptr || rst != nullptr) return false;
    for (int64_t b = 1; b < B; ++b)
      if (len[b] > len[b - 1]) return false;
    return true;
  }
  inline int64_t live(int64_t t) const {  // (prefix() only)
    int64_t n = B;
    while (n > 0 && len[n - 1] <= t) --n;
    return n;
  }
  // The rows of [b0, b1) a step's products take: with prefix, the live ones (the first of them);
  // else all.
  inline int64_t live_in(int64_t t, int64_t b0, int64_t b1, bool prefix) const {
    return prefix ? std::min(b1 - b0, std::max<int64_t>(0, live(t) - b0)) : b1 - b0;
  }
};

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
// The steps per chunk of a GRU inference's input projections (forward_impl), 0 for one product of
// all steps: on AVX-512 (the packed kernel takes every product of 256 rows or more there), where
// the whole workspace would be larger than kChunkedWsBytes and the one product would be ours (not
// mkl_takes: the chunks must give its bits), chunks of at least 256 rows. GRU
// inference, one thread, the Intel Xeon VM (2 MiB of L2), ad hoc, medians of calls in alternating
// processes, whole -> chunked, the same bits: B512 T20 H256 (40 MiB) 72.3-72.5 -> 60.4-62.0 ms
// (three processes of each build, in turn; 78-82 -> 61-69 in a noisier hour), B32 T100
// H256 (13 MiB) 21.4-21.8 -> 18.1-20.5, B64 T20 H512 (10 MiB) 30.3-31.4 -> 28.7-29.4, B128 T20 H256
// 15.5-16.9 -> 14.8-16.7; B256 T20 H100 (8 MiB) within the noise (5.9-6.8 against 6.6).
constexpr int64_t kChunkedWsBytes = int64_t(4) << 20;
template <typename T>
int64_t projection_chunk(const Dims& d, int mode) {
#if defined(RNNREC_HAVE_AVX2_TU)
  if constexpr (std::is_same<T, float>::value) {
    // (W_ih packed whole, ~I x 3H floats, at most a quarter of the workspace it saves: an input of
    // thousands of features keeps the one product, whose packed K chunks are small)
    if (mode == MODE_GRU && chunked_projection() && fast_gemm() != nullptr && d.I > 0 && d.H >= 3 &&
        d.T * d.B * d.W * int64_t(sizeof(float)) > kChunkedWsBytes && 4 * d.I * 3 * d.H <= d.T * d.B * d.W &&
        !mkl_takes(d.T * d.B, 3 * d.H, d.I) &&
        (avx512_enabled() || gemm_any_packs(false, true, d.T * d.B, 3 * d.H, d.I))) {  // (AVX2: for tests)
      const int64_t c = (256 + d.B - 1) / d.B;
      if (d.T >= 2 * c) return c;
    }
  }
#endif
  (void)d;
  (void)mode;
  return 0;
}

// The threads a recurrence's rows are split over (forward_impl): one where the step's products
// are too small to pay for another (fast_rows' ~1M multiply-adds a step), else as many as give
// each at least one 8-row block of the micro-kernel.
inline int64_t row_threads(int64_t B, int64_t N, int64_t K) {
  if (at::get_num_threads() <= 1 || at::in_parallel_region() || double(B) * double(N) * double(K) < 5.0e5) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 8));
}
// The rows each of `threads` takes: its share rounded up to whole 8-row blocks of the micro-kernel.
inline int64_t thread_rows(int64_t B, int64_t threads) { return ((B + threads - 1) / threads + 7) / 8 * 8; }
// The rows of a recurrence split over `threads` (row_threads) as [bounds[k], bounds[k + 1]): whole
// 8-row blocks of the micro-kernel, thread_rows() each; with lengths that never increase
// (m.prefix(), the first rows the longest), about equal shares of the summed lengths instead, the
// boundaries the block ends nearest to them (32 sessions of 1-20 steps: 8 + 24 rows, where 16 + 16
// gave the first thread ~3/4 of the steps).
inline std::vector<int64_t> thread_bounds(int64_t B, int64_t threads, const StepMasks& m, bool prefix) {
  std::vector<int64_t> bounds{0};
  if (!prefix) {
    const int64_t rows = thread_rows(B, threads);
    for (int64_t b = rows; b < B; b += rows) bounds.push_back(b);
  } else {
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += m.len[b];
    int64_t b = 0, cum = 0;
    for (int64_t k = 1; k < threads; ++k) {
      const double share = double(total) * double(k) / double(threads);
      while (b < B) {
        const int64_t e = std::min(B, b + 8);
        int64_t add = 0;
        for (int64_t i = b; i < e; ++i) add += m.len[i];
        if (std::abs(double(cum + add) - share) > std::abs(double(cum) - share)) break;
        cum += add;
        b = e;
      }
      if (b > bounds.back() && b < B) bounds.push_back(b);
    }
  }
  bounds.push_back(B);
  return bounds;
}

// Inference of one step (T = 1, no workspace kept) of a GRU (reset_after, as torch.nn's) or an Elman
// RNN, every row active and none reset, where both products run on our packed kernels: the rows in
// blocks of kStepRows, each block's input projection (W_ih packed once: PackedNT, whose bits are
// those of the one product forward_impl makes otherwise), recurrent product (StepW, any rows: the
// same bits) and pointwise pass in turn, from scratch of the block's size that stays in cache, the
// pass's r, z and n in one row's scratch (no (B, 4H) workspace written and dropped), and the block's
// h_n copied while it is in cache. In parallel over blocks (a thread's products and passes on its
// own rows, no hand-over between them). Returns false, having done nothing, where that does not
// apply. The batch of sessions, B256 T1 H100 GRU, one thread, the Intel Xeon VM (ad hoc, medians of
// alternating runs in one process): 260-266 -> 250-254 us; of that ~12 us is the two weights'
// packing at each call, ~2 x 93 the products and ~47 the pointwise pass.
constexpr int64_t kStepRows = 32;
template <typename T>
bool one_step_rows(const Dims& d, const T* x, const T* h0, const T* w_ih, const StepW<T>& whh, const T* bi,
                   const T* bh, int mode, T* y, T* h_n) {
#if defined(RNNREC_HAVE_AVX2_TU)
  if constexpr (std::is_same<T, float>::value) {
    const int64_t B = d.B, I = d.I, H = d.H, GH = d.G * H;
    if (d.T != 1 || B < 2 * kStepRows || !whh.ours() || !gemm_any_packs(false, true, B, GH, I)) return false;
    const RowKernels<float>& K = row_kernels<float>();
    const bool gru = mode == MODE_GRU;
    const int relu = mode == MODE_RNN_RELU ? 1 : 0;
    const PackedNT proj(GH, I, w_ih, I);
    const auto blocks = [&](int64_t k0, int64_t k1) {
      Buf<float> gx(kStepRows * GH), gh(kStepRows * GH), rz(gru ? d.W : 0);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b0 = k * kStepRows, n = std::min(kStepRows, B - b0);
        proj.run(n, x + b0 * I, I, gx.data(), GH);
        whh.run(n, h0 + b0 * H, H, gh.data(), GH);
        for (int64_t r = 0; r < n; ++r) {
          const float *gxr = gx.data() + r * GH, *ghr = gh.data() + r * GH;
          float* yr = y + (b0 + r) * H;
          if (gru)
            K.gru_fwd_ra(H, gxr, ghr, bi, bh, h0 + (b0 + r) * H, rz.data(), yr);
          else
            K.rnn_fwd(H, gxr, ghr, bi, bh, yr, relu);
        }
        std::memcpy(h_n + b0 * H, y + b0 * H, sizeof(float) * size_t(n * H));
      }
    };
    const int64_t nblk = (B + kStepRows - 1) / kStepRows;
    // (threads from ~1M multiply-adds, as fast_rows' products: a block is ~0.3M at H = 100)
    if (double(B) * double(GH) * double(I + H) < 1.0e6 || at::get_num_threads() <= 1 || at::in_parallel_region())
      blocks(0, nblk);
    else
      at::parallel_for(0, nblk, 1, blocks);
    return true;
  }
#endif
  (void)d, (void)x, (void)h0, (void)w_ih, (void)whh, (void)bi, (void)bh, (void)mode, (void)y, (void)h_n;
  return false;
}

template <typename T>
void forward_impl(const Dims& d, const T* x, const T* h0, const T* w_ih, const T* w_hh, const T* b_ih,
                  const T* b_hh, const StepMasks& m, int mode, bool reset_after, T* y, T* h_n, T* ws,
                  int64_t chunk = 0, bool keep_ws = true) {
  const int64_t T_ = d.T, B = d.B, I = d.I, H = d.H, G = d.G, W = d.W, GH = G * H;
  const RowKernels<T>& K = row_kernels<T>();
  const bool gru = mode == MODE_GRU;
  const int relu = mode == MODE_RNN_RELU ? 1 : 0;

  const int64_t nz = b_ih == nullptr || b_hh == nullptr ? GH : 0;  // zero biases where one is missing
  SmallBuf<T> zeros(nz);
  std::fill(zeros.data(), zeros.data() + nz, T(0));
  const T* bi = b_ih ? b_ih : zeros.data();
  const T* bh = b_hh ? b_hh : zeros.data();

  // Input projections of every step (no bias: the pointwise pass adds it), one GEMM written
  // straight into the outputs, so no (T, B, G*H) scratch: gru puts them in the workspace's r, z, n
  // slots (ws[t, b, 0:3H], which the step's pointwise pass reads and then overwrites with r, z, n),
  // rnn puts them in y (overwritten with h_new).
  //
  // chunk > 0 (a GRU's inference on AVX-512, see infer_layers; float only): ws holds 2 * chunk - 1
  // steps, and the projections are made chunk steps at a time (the last chunk takes the rest, up to
  // 2 * chunk - 1 steps) with W_ih packed once, each just before its steps, which read it while it
  // is still in cache. The same bits as one product (PackedNT), without the (T, B, 4H) workspace:
  // at B512 T20 H256 40 MiB, allocated at every call (page faults) and written to memory and read
  // back. chunk B rows are at least 256: the packed kernel's rate (M512 N768 K256 ~160 GFLOP/s,
  // M10240 ~142: C itself goes to memory; standalone C++, the Intel Xeon VM, one thread).
  //
  // w_ih null: x is already the input projection (I = G*H: the identity as W_ih, GRU4Rec's one-hot
  // input, each item's row of its first layer's input weights; the serving fast path's projected0):
  // the pointwise passes read it in place, no product, no copy.
  const int64_t hp_cols = gru ? (reset_after ? 3 * H : 2 * H) : H;
  const StepW<T> whh(true, H, hp_cols, w_hh, H, B, T_);
  TORCH_INTERNAL_ASSERT(w_ih != nullptr || (I == GH && chunk == 0), "rnnrec_fast cpp: a projected input of ", I,
                        " features for ", GH, " gate rows");
  // (keep_ws false: inference, whose workspace is scratch)
  if (!keep_ws && chunk == 0 && w_ih != nullptr && m.len == nullptr && m.rst == nullptr && (!gru || reset_after) &&
      one_step_rows<T>(d, x, h0, w_ih, whh, bi, bh, mode, y, h_n))
    return;

  T* const proj_out = gru ? ws : y;  // where the projections are made (xp itself, unless x is them)
  const T* const xp = w_ih == nullptr ? x : proj_out;
  const int64_t ldxp = w_ih == nullptr ? GH : gru ? W : H;
  // Lengths that never increase (m.prefix(): a PackedSequence's sorted batch) and our packed
  // kernels: each step's input projections are made for its live rows only, with W_ih packed once
  // (the padding's, up to half of the product at uniformly drawn lengths, are not made).
  const bool prefix = m.prefix();
  bool chunked = false, live_rows = false;
#if defined(RNNREC_HAVE_AVX2_TU)
  std::unique_ptr<PackedNT> proj;
  if constexpr (std::is_same<T, float>::value) {
    if (chunk > 0) {  // (projection_chunk's, from infer_layers)
      chunked = true;
      proj.reset(new PackedNT(GH, I, w_ih, I));
    } else if (prefix && fast_gemm() != nullptr && I > 0 && w_ih != nullptr) {
      live_rows = true;
      proj.reset(new PackedNT(GH, I, w_ih, I));
    }
  }
#endif
  TORCH_INTERNAL_ASSERT(chunked || chunk == 0, "rnnrec_fast cpp: a chunked workspace for an unchunked forward");
  if (!chunked && !live_rows && w_ih != nullptr) gemm_nt<T>(T_ * B, GH, I, x, I, w_ih, I, proj_out, ldxp);
  int64_t c0 = 0, c1 = T_;  // the steps whose projections xp holds (from its start)

  SmallBuf<T> hp_buf(B * hp_cols);
  T* hp = hp_buf.data();
  SmallBuf<T> rh_buf(gru && !reset_after ? B * H : 0);
  T* rh = rh_buf.data();
  // The state entering a step (after resets) as (B, H) rows: h0 or the previous step's y in place
  // when every row is active and none resets, else gathered here (zero rows where reset/inactive;
  // only lengths or resets make a step so).
  SmallBuf<T> hin_buf(m.len != nullptr || m.rst != nullptr ? B * H : 0);
  c10::SmallVector<const T*, 16> cur(size_t(B), nullptr);
  const StepW<T> whn(true, H, gru && !reset_after ? H : 0, w_hh + 2 * H * H, H, B, T_);
  for (int64_t b = 0; b < B; ++b) cur[b] = h0 + b * H;

  // The state entering step t for rows [b0, b1) into hin_buf: row b from src(b), zero where the
  // row resets or is inactive.
  const auto gather_state = [&](int64_t t, int64_t b0, int64_t b1, const auto& src) {
    T* dst = hin_buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b) && !m.reset(t, b))
        std::memcpy(dst + b * H, src(b), sizeof(T) * H);
      else
        std::fill(dst + b * H, dst + (b + 1) * H, T(0));
    }
    return static_cast<const T*>(dst);
  };

  // Step t's pointwise work on rows [b0, b1), whose recurrent product is in hp (Cho's form: up to
  // its second product, which gru_b's rows read from the workspace): the state entering the step
  // at hin (rows H apart), xp_t its input projections, ws_t and y_t its outputs.
  const auto rnn_rows = [&](int64_t t, int64_t b0, int64_t b1, const T* xp_t, T* y_t) {
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b))
        K.rnn_fwd(H, xp_t + b * ldxp, hp + b * hp_cols, bi, bh, y_t + b * H, relu);
      else
        std::fill(y_t + b * H, y_t + (b + 1) * H, T(0));
    }
  };
  const auto gru_ra_rows = [&](int64_t t, int64_t b0, int64_t b1, const T* xp_t, const T* hin, T* ws_t, T* y_t) {
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b)) {
        K.gru_fwd_ra(H, xp_t + b * ldxp, hp + b * hp_cols, bi, bh, hin + b * H, ws_t + b * W, y_t + b * H);
      } else {
        std::fill(ws_t + b * W, ws_t + (b + 1) * W, T(0));
        std::fill(y_t + b * H, y_t + (b + 1) * H, T(0));
      }
    }
  };
  const auto gru_a_rows = [&](int64_t t, int64_t b0, int64_t b1, const T* xp_t, const T* hin, T* ws_t) {
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b))
        K.gru_fwd_a(H, xp_t + b * ldxp, hp + b * hp_cols, bi, bh, hin + b * H, ws_t + b * W, rh + b * H);
      else
        std::fill(rh + b * H, rh + (b + 1) * H, T(0));
    }
  };
  const auto gru_b_rows = [&](int64_t t, int64_t b0, int64_t b1, const T* xp_t, const T* hin, T* ws_t, T* y_t) {
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b)) {
        K.gru_fwd_b(H, xp_t + b * ldxp, bi, bh, hin + b * H, ws_t + b * W, y_t + b * H);
      } else {
        std::fill(ws_t + b * W, ws_t + (b + 1) * W, T(0));
        std::fill(y_t + b * H, y_t + (b + 1) * H, T(0));
      }
    }
  };

  // Step t's products on its rows [b0, b0 + live) (hin: the state entering it, rows H apart): the
  // input projections where they are made step by step (live_rows), then the recurrent product.
  const auto step_products = [&](int64_t t, int64_t b0, int64_t live, const T* hin) {
    if (live <= 0) return;
#if defined(RNNREC_HAVE_AVX2_TU)
    if constexpr (std::is_same<T, float>::value) {  // (live_rows: never chunked, so xp holds every step)
      if (live_rows) proj->run(live, x + (t * B + b0) * I, I, proj_out + (t * B + b0) * ldxp, ldxp);
    }
#endif
    whh.run(live, hin + b0 * H, H, hp + b0 * hp_cols, hp_cols);
  };

  // Several threads, every row active (resets allowed), every product on our kernels (the same bits
  // for any rows): each thread runs every step for its own rows, which need no other row's state,
  // instead of a parallel region for each step's product and another for its pointwise pass.
  // (with lengths that never increase too: each thread's live rows are the first of its own, as
  // in the one-thread path below; the rows split by their lengths, thread_bounds)
  const int64_t threads = !chunked && (m.len == nullptr || prefix) && whh.ours() && (whn.N == 0 || whn.ours())
                              ? row_threads(B, hp_cols, H) : 1;
  if (threads > 1) {
    const std::vector<int64_t> bounds = thread_bounds(B, threads, m, prefix);
    at::parallel_for(0, int64_t(bounds.size()) - 1, 1, [&](int64_t k0, int64_t k1) {
      const int64_t b0 = bounds[k0], b1 = bounds[k1];
      for (int64_t t = 0; t < T_; ++t) {
        T* ws_t = ws + t * B * W;
        T* y_t = y + t * B * H;
        const T* xp_t = xp + t * B * ldxp;
        const T* hin = t == 0 ? h0 : y_t - B * H;
        bool reset = false;
        for (int64_t b = b0; b < b1 && !reset; ++b) reset = m.reset(t, b);
        if (reset) {  // (this thread's rows)
          const T* prev = hin;
          hin = gather_state(t, b0, b1, [&](int64_t b) { return prev + b * H; });
        }
        const int64_t live = m.live_in(t, b0, b1, prefix);
        step_products(t, b0, live, hin);
        if (!gru) {
          rnn_rows(t, b0, b1, xp_t, y_t);
        } else if (reset_after) {
          gru_ra_rows(t, b0, b1, xp_t, hin, ws_t, y_t);
        } else {
          gru_a_rows(t, b0, b1, xp_t, hin, ws_t);
          if (live > 0) whn.run(live, rh + b0 * H, H, ws_t + b0 * W + 3 * H, W);
          gru_b_rows(t, b0, b1, xp_t, hin, ws_t, y_t);
        }
      }
    });
    if (!prefix) {
      std::memcpy(h_n, y + (T_ - 1) * B * H, sizeof(T) * size_t(B * H));
    } else {  // each row's state after its last step (h0 for a row of length 0)
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(h_n + b * H, m.len[b] > 0 ? y + ((m.len[b] - 1) * B + b) * H : h0 + b * H, sizeof(T) * H);
    }
    return;
  }

  for (int64_t t = 0; t < T_; ++t) {
#if defined(RNNREC_HAVE_AVX2_TU)
    if constexpr (std::is_same<T, float>::value) {
      if (chunked && (t == 0 || t == c1)) {
        c0 = t;
        c1 = T_ - t < 2 * chunk ? T_ : t + chunk;
        proj->run((c1 - c0) * B, x + c0 * B * I, I, ws, W);
      }
    }
#endif
    T* ws_t = ws + (t - c0) * B * W;
    T* y_t = y + t * B * H;
    const T* xp_t = xp + (t - c0) * B * ldxp;
    if (!m.any_active(t)) {
      std::fill(ws_t, ws_t + B * W, T(0));
      std::fill(y_t, y_t + B * H, T(0));
      continue;
    }
    const T* hin = t == 0 ? h0 : y_t - B * H;  // every row active (so active at t - 1) and no reset
    if (!prefix && !m.all_plain(t)) hin = gather_state(t, 0, B, [&](int64_t b) { return cur[b]; });
    // (with prefix, the products take the live rows only: what follows reads no other row of
    // their outputs, and their rows' values are the same for any rows the product takes)
    const int64_t live = m.live_in(t, 0, B, prefix);
    step_products(t, 0, live, hin);
    if (!gru) {
      for_rows(B, 4 * H, [&](int64_t b0, int64_t b1) { rnn_rows(t, b0, b1, xp_t, y_t); });
    } else if (reset_after) {
      for_rows(B, 12 * H, [&](int64_t b0, int64_t b1) { gru_ra_rows(t, b0, b1, xp_t, hin, ws_t, y_t); });
    } else {
      for_rows(B, 8 * H, [&](int64_t b0, int64_t b1) { gru_a_rows(t, b0, b1, xp_t, hin, ws_t); });
      // hn = W_hn (r * h_prev), straight into the workspace's hn slot.
      whn.run(live, rh, H, ws_t + 3 * H, W);
      for_rows(B, 6 * H, [&](int64_t b0, int64_t b1) { gru_b_rows(t, b0, b1, xp_t, hin, ws_t, y_t); });
    }
    for (int64_t b = 0; b < B; ++b)
      if (m.active(t, b)) cur[b] = y_t + b * H;
  }
  for (int64_t b = 0; b < B; ++b) std::memcpy(h_n + b * H, cur[b], sizeof(T) * H);
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
// A (T, B, C) tensor that may be strided (the gradient autograd hands over is often an expanded or
// transposed view): element (t, b, c) at p[t * st + b * sb + c * sc].
template <typename T>
struct View3 {
  const T* p;
  int64_t st, sb, sc;
  // Step t as a row-major (B, C) block: the data itself where it already is one, else a copy.
  const T* step(int64_t t, int64_t B, int64_t C, T* scratch) const {
    const T* base = p + t * st;
    if (sc == 1 && (sb == C || B == 1)) return base;
    if (sc == 0) {  // a row broadcast along C (the gradient of y.sum() is all strides 0)
      for (int64_t b = 0; b < B; ++b) std::fill(scratch + b * C, scratch + (b + 1) * C, base[b * sb]);
      return scratch;
    }
    for (int64_t b = 0; b < B; ++b) copy_row(scratch + b * C, base + b * sb, C);
    return scratch;
  }
  // Steps [t0, t1) as (rows, C) with a uniform row stride: returns the pointer, sets ld.
  const T* steps(int64_t t0, int64_t t1, int64_t B, int64_t C, T* scratch, int64_t& ld) const {
    if (rows_uniform(B) || (sc == 1 && t1 - t0 == 1)) {
      ld = B == 1 && t1 - t0 > 1 ? st : sb;
      return p + t0 * st;
    }
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < B; ++b) copy_row(scratch + ((t - t0) * B + b) * C, p + t * st + b * sb, C);
    ld = C;
    return scratch;
  }
  // Row b of step t as C contiguous values: the data itself where they are (sc == 1), else a copy
  // in scratch (C values).
  const T* row(int64_t t, int64_t b, int64_t C, T* scratch) const {
    const T* src = p + t * st + b * sb;
    if (sc == 1) return src;
    if (sc == 0) {
      std::fill(scratch, scratch + C, src[0]);
      return scratch;
    }
    copy_row(scratch, src, C);
    return scratch;
  }
  bool rows_uniform(int64_t B) const { return sc == 1 && (st == B * sb || B == 1); }
  // The C values of one row at src (sc apart) into dst, contiguous.
  void copy_row(T* dst, const T* src, int64_t C) const {
    if (sc == 1)
      std::memcpy(dst, src, sizeof(T) * size_t(C));
    else
      for (int64_t c = 0; c < C; ++c) dst[c] = src[c * sc];
  }
};

template <typename T>
View3<T> view3(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Accumulates the column sums of a (R, C) row-major block (leading dimension ld) in double.
template <typename T>
void add_col_sums(int64_t R, int64_t C, const T* A, int64_t ld, double* acc) {
#if defined(RNNREC_HAVE_AVX2_TU)
  if constexpr (std::is_same<T, float>::value) {
    if (simd_enabled()) {
      avx2_col_sums_f32(R, C, A, ld, acc);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < R; ++r) {
    const T* row = A + r * ld;
    for (int64_t c = 0; c < C; ++c) acc[c] += double(row[c]);
  }
}

// Rows (time steps x batch) per backward chunk. The backward runs in chunks of steps, from the
// last: the gate gradients of one chunk live in a (chunk, B, G*H) buffer, and the weight and
// input gradients of the chunk are one GEMM each. This bounds the scratch memory of a training
// step (a whole-sequence gate-gradient buffer would cost more than torch.nn.GRU's entire backward)
// while keeping the products large enough to run near the GEMM kernel's speed. About 96 rows
// (whole steps, so 128 at B = 64): at B32 T20 H100, 128 -> 96 rows lowered the peak by ~0.07 MiB
// for ~0.4% more time; 64 rows cost 1-5%.
constexpr int64_t kBackwardChunkRows = 96;

template <typename T>
void backward_impl(const Dims& d, const View3<T>& gy, const T* ghn, const View3<T>& x, const T* h0,
                   const T* w_ih, const T* w_hh, const StepMasks& m, const T* y, const T* ws, int mode,
                   bool reset_after, T* gx, T* gh0, T* gw_ih, T* gw_hh, T* gb_ih, T* gb_hh, bool need_gh0) {
  // gx, gw_ih or gw_hh null: that gradient is not wanted, and its products (and the gathers that
  // feed only them) do not run. need_gh0 false: the carry of step 0 (dh through W_hh into h0's
  // gradient: the whole recurrent product of a one-step call) does not run, and gh0 holds scratch.
  const int64_t T_ = d.T, B = d.B, I = d.I, H = d.H, G = d.G, W = d.W, GH = G * H;
  const RowKernels<T>& K = row_kernels<T>();
  const bool gru = mode == MODE_GRU;
  const int relu = mode == MODE_RNN_RELU ? 1 : 0;
  const int64_t Tc = std::min(T_, std::max<int64_t>(1, (kBackwardChunkRows + B - 1) / B));

  Buf<T> dgx_buf(Tc * B * GH);  // d(x W_ih^T + b_ih), this chunk
  T* dgx = dgx_buf.data();
  Buf<T> dgh_step(gru && reset_after ? B * GH : 0);   // d(h W_hh^T + b_hh), this step
  Buf<T> hin_buf(gru && !reset_after ? Tc * B * H : 0); // r * h_prev, this chunk
  Buf<T> drh(gru && !reset_after ? B * H : 0);
  Buf<T> carry(B * H);
  Buf<T> gy_rows(B * H);                                       // gy of a step when gy is strided
  // x of a chunk when its rows are not evenly spaced (a batch_first x): gathered, so that
  // grad_w_ih takes one product per chunk. (Summed step by step, without this copy, its products
  // had K = B rows, each a pass over the whole of grad_w_ih: at B64 T20 H512, 20 passes over 3 MiB
  // instead of 10, ~88 against ~100 GFLOP/s in standalone timings; the copy is Tc * B * I floats,
  // 256 KiB there.) With lengths, a chunk holding rows past their length goes to live_products
  // (below), which gathers x's live rows only: x past a row's length is padding the forward never
  // read (0 * NaN padding made all of grad_w_ih NaN).
  int64_t min_len = T_;
  for (int64_t b = 0; m.len != nullptr && b < B; ++b) min_len = std::min(min_len, m.len[b]);
  Buf<T> x_rows(x.rows_uniform(B) || gw_ih == nullptr ? 0 : Tc * B * I);
  std::vector<double> sum_i(GH, 0.0), sum_n(gru && reset_after ? H : 0, 0.0);
  // carry weights: rnn W_hh (H x H); gru/reset_after W_hh (3H x H); gru/Cho W_hh[:2H] and W_hn
  const StepW<T> wc(false, gru && !reset_after ? 2 * H : GH, H, w_hh, H, B, T_);
  const StepW<T> wn(false, H, gru && !reset_after ? H : 0, w_hh + 2 * H * H, H, B, T_);
  // The input gradient of each chunk, dgx . W_ih: a small W_ih (op(W) = W_ih, GH x I, at most a
  // quarter of L2: H = 100) goes to StepW, packed once for all chunks (a product per chunk repacked
  // it every time: training B32 T20 H100 3.34 -> 3.29 ms, A/B in one process). A larger one stays
  // with gemm_any: a copy held through the backward adds its size to the step's peak (3 MiB at
  // H = 512: 25.9 -> 28.9 MiB, live heap, against torch.nn's 31.1) for ~0.7% (B64 T20 H512).
  // (gx null: no input gradient is wanted, x requires none, and none of its products runs)
  const bool wi_once = avx2_packed_pays(GH, I) && gx != nullptr;
  const StepW<T> wi(false, GH, wi_once ? I : 0, w_ih, I, Tc * B, (T_ + Tc - 1) / Tc);

  // (A row of length 0 never read its h0, which may hold anything, a fresh buffer: its zero
  // gradients times NaN would be NaN. Every chunk from step 0 then holds an inactive row and goes
  // to live_products, which reads the live rows' states only.)
  // The state entering step t, row b (not saved by the forward): zero where the row resets or the
  // step is inactive, else h0 at t = 0 and y[t - 1] after (as the reference's prev_states).
  const std::vector<T> zero_row(size_t(H), T(0));
  const auto h_prev = [&](int64_t t, int64_t b) -> const T* {
    return m.reset(t, b) || !m.active(t, b) ? zero_row.data() : t == 0 ? h0 + b * H : y + ((t - 1) * B + b) * H;
  };
  // The same as (rows, H) blocks for the weight gradients of a chunk whose rows are all active: y
  // read in place where that is the same; gathered into hp_rows (allocated only then) where a row
  // resets. (A chunk with rows past their length takes live_products, which reads only the live
  // rows' states: never a last output past its length, whose zero gradient times inf or NaN made
  // the weight gradient NaN, nor x's padding.)
  bool gather = false;
  for (int64_t i = 0; m.rst != nullptr && i < T_ * B && !gather; ++i) gather = m.rst[i];
  Buf<T> hp_rows(gather && gw_hh != nullptr ? Tc * B * H : 0);
  // C (N x H) = (or += with acc) A^T . h_prev rows of steps [t0, t1); A holds (t1 - t0) * B rows, lda apart.
  const auto gemm_hprev = [&](int64_t N, const T* A, int64_t lda, int64_t t0, int64_t t1, T* C, bool acc) {
    const int64_t R = (t1 - t0) * B;
    if (gather) {
      T* dst = hp_rows.data();
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t b = 0; b < B; ++b) std::memcpy(dst + ((t - t0) * B + b) * H, h_prev(t, b), sizeof(T) * H);
      gemm_any<T>(true, false, N, H, R, A, lda, dst, H, C, H, acc);
    } else if (t0 > 0) {
      gemm_any<T>(true, false, N, H, R, A, lda, y + (t0 - 1) * B * H, H, C, H, acc);
    } else {  // step 0 from h0, the others from y
      gemm_any<T>(true, false, N, H, B, A, lda, h0, H, C, H, acc);
      if (R > B) gemm_any<T>(true, false, N, H, R - B, A + B * lda, lda, y, H, C, H, true);
    }
  };

  T* dh = gh0;
  std::memcpy(dh, ghn, sizeof(T) * B * H);

  // Step t's gate gradients on rows [b0, b1), by mode (gyr(b): row b of gy at step t; dgx_t and
  // hin_t the step's rows in this chunk's buffers), and dh_prev = (partial, already in dh) +
  // carry on those rows: zero where the state was reset; inactive rows pass dh through unchanged.
  const auto rnn_bwd_rows = [&](int64_t t, int64_t b0, int64_t b1, const auto& gyr, T* dgx_t) {
    const T* y_t = y + t * B * H;
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b))
        K.rnn_bwd(H, dh + b * H, gyr(b), y_t + b * H, dgx_t + b * GH, relu);
      else
        std::fill(dgx_t + b * GH, dgx_t + (b + 1) * GH, T(0));
    }
  };
  const auto gru_ra_bwd_rows = [&](int64_t t, int64_t b0, int64_t b1, const auto& gyr, T* dgx_t) {
    const T* ws_t = ws + t * B * W;
    T* dgh = dgh_step.data();
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b)) {
        K.gru_bwd_ra(H, dh + b * H, gyr(b), h_prev(t, b), ws_t + b * W, dgx_t + b * GH, dgh + b * GH);
      } else {
        std::fill(dgx_t + b * GH, dgx_t + (b + 1) * GH, T(0));
        std::fill(dgh + b * GH, dgh + (b + 1) * GH, T(0));
      }
    }
  };
  const auto gru_bwd_1_rows = [&](int64_t t, int64_t b0, int64_t b1, const auto& gyr, T* dgx_t, T* hin_t) {
    const T* ws_t = ws + t * B * W;
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b)) {
        K.gru_bwd_1(H, dh + b * H, gyr(b), h_prev(t, b), ws_t + b * W, dgx_t + b * GH);
      } else {
        std::fill(dgx_t + b * GH, dgx_t + (b + 1) * GH, T(0));
        std::fill(hin_t + b * H, hin_t + (b + 1) * H, T(0));
      }
    }
  };
  const auto gru_bwd_2_rows = [&](int64_t t, int64_t b0, int64_t b1, T* dgx_t, T* hin_t) {
    const T* ws_t = ws + t * B * W;
    for (int64_t b = b0; b < b1; ++b) {
      if (m.active(t, b))
        K.gru_bwd_2(H, dh + b * H, drh.data() + b * H, h_prev(t, b), ws_t + b * W, dgx_t + b * GH, hin_t + b * H);
    }
  };
  const auto dh_rows = [&](int64_t t, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!m.active(t, b)) continue;
      T* dr = dh + b * H;
      if (m.reset(t, b)) {
        std::fill(dr, dr + H, T(0));
      } else {
        const T* c = carry.data() + b * H;
        for (int64_t j = 0; j < H; ++j) dr[j] = dr[j] + c[j];
      }
    }
  };
  // Several threads, every row active (resets allowed), the step products on our kernels: each
  // thread runs a chunk's steps for its own rows (a row's dh needs no other row's), as the forward
  // does (row_threads), instead of parallel regions for each step; the chunk's input and weight
  // gradients stay one product each.
  const bool prefix = m.prefix();
  const int64_t bwd_threads =
      (m.len == nullptr || prefix) && wc.ours() && (wn.N == 0 || wn.ours()) ? row_threads(B, H, GH) : 1;
  const std::vector<int64_t> bwd_bounds = thread_bounds(B, bwd_threads, m, prefix);

  // A chunk's input and weight gradients over its `live` rows active (with lengths; at uniformly
  // drawn ones about half of them, a PackedSequence's padding the rest): their rows of dgx (and for
  // Cho's form of r * h_prev) moved together in place, in (step, row) order, x's and h_prev's
  // gathered beside them, each product over those rows, and the input gradients scattered back
  // (zero at the others). The same sums as over every row without the zero rows.
  Buf<T> live_gx(m.len != nullptr && gx != nullptr ? Tc * B * I : 0);
  Buf<T> live_hp(m.len != nullptr && gw_hh != nullptr ? Tc * B * H : 0);
  Buf<T> live_x(m.len != nullptr && gw_ih != nullptr ? Tc * B * I : 0);
  std::vector<int64_t> live_src;
  const auto live_products = [&](int64_t t0, int64_t t1, int64_t live, bool acc) {
    live_src.clear();
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < B; ++b) {
        if (!m.active(t, b)) continue;
        const int64_t i = int64_t(live_src.size()), src = (t - t0) * B + b;
        live_src.push_back(t * B + b);
        if (i != src) {
          std::memmove(dgx + i * GH, dgx + src * GH, sizeof(T) * GH);
          if (gru && !reset_after) std::memmove(hin_buf.data() + i * H, hin_buf.data() + src * H, sizeof(T) * H);
        }
        if (gw_ih != nullptr) {
          T* xi = live_x.data() + i * I;
          const T* xr = x.row(t, b, I, xi);  // (xi itself where x is strided)
          if (xr != xi) std::memcpy(xi, xr, sizeof(T) * I);
        }
        if (gw_hh != nullptr) std::memcpy(live_hp.data() + i * H, h_prev(t, b), sizeof(T) * H);
      }
    if (gx != nullptr) {
      if (wi_once)
        wi.run(live, dgx, GH, live_gx.data(), I);
      else
        gemm_any<T>(false, false, live, I, GH, dgx, GH, w_ih, I, live_gx.data(), I);
      for (int64_t t = t0, i = 0; t < t1; ++t)
        for (int64_t b = 0; b < B; ++b) {
          T* dst = gx + (t * B + b) * I;
          if (m.active(t, b))
            std::memcpy(dst, live_gx.data() + (i++) * I, sizeof(T) * I);
          else
            std::fill(dst, dst + I, T(0));
        }
    }
    if (gw_ih != nullptr) gemm_any<T>(true, false, GH, I, live, dgx, GH, live_x.data(), I, gw_ih, I, acc);
    add_col_sums<T>(live, GH, dgx, GH, sum_i.data());
    if (gru && reset_after) {  // (dn * r in place, as below)
      for (int64_t i = 0; i < live; ++i) {
        T* dn = dgx + i * GH + 2 * H;
        const T* r = ws + live_src[i] * W;
        for (int64_t j = 0; j < H; ++j) dn[j] = dn[j] * r[j];
      }
      add_col_sums<T>(live, H, dgx + 2 * H, GH, sum_n.data());
    }
    if (gw_hh == nullptr) return;
    if (!gru || reset_after) {
      gemm_any<T>(true, false, GH, H, live, dgx, GH, live_hp.data(), H, gw_hh, H, acc);
    } else {
      gemm_any<T>(true, false, 2 * H, H, live, dgx, GH, live_hp.data(), H, gw_hh, H, acc);
      gemm_any<T>(true, false, H, H, live, dgx + 2 * H, GH, hin_buf.data(), H, gw_hh + 2 * H * H, H, acc);
    }
  };
  // (step 0's carry only feeds h0's gradient)
  const auto carries = [&](int64_t t) { return t > 0 || need_gh0; };

  for (int64_t t1 = T_; t1 > 0; t1 -= Tc) {
    const int64_t t0 = std::max<int64_t>(0, t1 - Tc), R = (t1 - t0) * B;
    if (bwd_threads > 1) {
      at::parallel_for(0, int64_t(bwd_bounds.size()) - 1, 1, [&](int64_t k0, int64_t k1) {
        const int64_t b0 = bwd_bounds[k0], b1 = bwd_bounds[k1];
        Buf<T> gy_row(H);
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const auto gyr = [&](int64_t b) { return gy.row(t, b, H, gy_row.data()); };
          T* dgx_t = dgx + (t - t0) * B * GH;
          const int64_t live = m.live_in(t, b0, b1, prefix);
          const bool carried = live > 0 && carries(t);
          if (!gru) {
            rnn_bwd_rows(t, b0, b1, gyr, dgx_t);
            if (carried) wc.run(live, dgx_t + b0 * GH, GH, carry.data() + b0 * H, H);
          } else if (reset_after) {
            gru_ra_bwd_rows(t, b0, b1, gyr, dgx_t);
            if (carried) wc.run(live, dgh_step.data() + b0 * GH, GH, carry.data() + b0 * H, H);
          } else {
            T* hin_t = hin_buf.data() + (t - t0) * B * H;
            gru_bwd_1_rows(t, b0, b1, gyr, dgx_t, hin_t);
            if (live > 0) wn.run(live, dgx_t + b0 * GH + 2 * H, GH, drh.data() + b0 * H, H);
            gru_bwd_2_rows(t, b0, b1, dgx_t, hin_t);
            if (carried) wc.run(live, dgx_t + b0 * GH, GH, carry.data() + b0 * H, H);
          }
          if (carries(t)) dh_rows(t, b0, b1);
        }
      });
    } else {
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const T* gy_t = gy.step(t, B, H, gy_rows.data());
        const auto gyr = [&](int64_t b) { return gy_t + b * H; };
        T* dgx_t = dgx + (t - t0) * B * GH;
        const bool any = m.any_active(t);
        // (lengths that never increase: the products take the step's live rows only, the others'
        // carry and d(r * h_prev) being read nowhere, as in the forward)
        const int64_t live = m.live_in(t, 0, B, prefix);
        const bool carried = any && carries(t);
        if (!gru) {
          for_rows(B, 4 * H, [&](int64_t b0, int64_t b1) { rnn_bwd_rows(t, b0, b1, gyr, dgx_t); });
          if (carried) wc.run(live, dgx_t, GH, carry.data(), H);
        } else if (reset_after) {
          for_rows(B, 16 * H, [&](int64_t b0, int64_t b1) { gru_ra_bwd_rows(t, b0, b1, gyr, dgx_t); });
          if (carried) wc.run(live, dgh_step.data(), GH, carry.data(), H);
        } else {
          T* hin_t = hin_buf.data() + (t - t0) * B * H;
          for_rows(B, 10 * H, [&](int64_t b0, int64_t b1) { gru_bwd_1_rows(t, b0, b1, gyr, dgx_t, hin_t); });
          if (!any) continue;
          // d(r * h_prev) = dn_pre @ W_hn
          wn.run(live, dgx_t + 2 * H, GH, drh.data(), H);
          for_rows(B, 6 * H, [&](int64_t b0, int64_t b1) { gru_bwd_2_rows(t, b0, b1, dgx_t, hin_t); });
          if (carried) wc.run(live, dgx_t, GH, carry.data(), H);
        }
        if (carried) dh_rows(t, 0, B);
      }
    }

    // This chunk's input and weight gradients: one product each over its R rows (the recurrent
    // weights' two where step 0 reads h0).
    const bool acc = t1 < T_;
    const T* ws_c = ws + t0 * B * W;
    // With lengths, a chunk holding rows past their length: the products take its live rows only
    // (live_products); the others' gradients are zero.
    int64_t live = R;
    if (m.len != nullptr && t1 > min_len) {
      live = 0;
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t b = 0; b < B; ++b) live += m.active(t, b) ? 1 : 0;
    }
    if (live < R) {
      live_products(t0, t1, live, acc);
      continue;
    }
    if (gx != nullptr) {
      if (wi_once)
        wi.run(R, dgx, GH, gx + t0 * B * I, I);
      else
        gemm_any<T>(false, false, R, I, GH, dgx, GH, w_ih, I, gx + t0 * B * I, I);
    }
    if (gw_ih != nullptr) {
      int64_t ldx = 0;
      const T* x_c = x.steps(t0, t1, B, I, x_rows.data(), ldx);
      gemm_any<T>(true, false, GH, I, R, dgx, GH, x_c, ldx, gw_ih, I, acc);
    }
    add_col_sums<T>(R, GH, dgx, GH, sum_i.data());
    if (gru && reset_after) {
      // The n rows of W_hh act on h_prev too, with gradient dhn = dn * r: dgx's n part (dn) becomes
      // dhn in place (the same product the step kernel formed for dgh), and W_hh's three gate
      // blocks take one product.
      for (int64_t i = 0; i < R; ++i) {
        T* dn = dgx + i * GH + 2 * H;
        const T* r = ws_c + i * W;
        for (int64_t j = 0; j < H; ++j) dn[j] = dn[j] * r[j];
      }
      add_col_sums<T>(R, H, dgx + 2 * H, GH, sum_n.data());
    }
    if (gw_hh == nullptr) continue;
    if (!gru || reset_after) {
      gemm_hprev(GH, dgx, GH, t0, t1, gw_hh, acc);
    } else {
      gemm_hprev(2 * H, dgx, GH, t0, t1, gw_hh, acc);
      gemm_any<T>(true, false, H, H, R, dgx + 2 * H, GH, hin_buf.data(), H, gw_hh + 2 * H * H, H, acc);
    }
  }
  for (int64_t c = 0; c < GH; ++c) gb_ih[c] = T(sum_i[c]);
  std::memcpy(gb_hh, gb_ih, sizeof(T) * GH);
  for (int64_t c = 0; c < int64_t(sum_n.size()); ++c) gb_hh[2 * H + c] = T(sum_n[c]);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Entry points (external linkage: rnnrec_op.cpp registers them with the dispatcher too)
// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& resets, int64_t mode,
    bool reset_after) {
  const Dims d = validate(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode);
  auto opts = x.options();
  at::Tensor y = empty_pooled({d.T, d.B, d.H}, opts);
  at::Tensor h_n = at::empty({d.B, d.H}, opts);
  at::Tensor ws = empty_pooled({d.T, d.B, d.W}, opts);
  StepMasks m;
  m.B = d.B;
  if (auto p = opt_ptr(lengths)) m.len = p->data_ptr<int64_t>();
  if (auto p = opt_ptr(resets)) m.rst = p->data_ptr<bool>();
  const at::Tensor* bi = opt_ptr(b_ih);
  const at::Tensor* bh = opt_ptr(b_hh);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnrec_fast_cpp_forward", [&] {
    forward_impl<scalar_t>(d, x.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                           w_hh.data_ptr<scalar_t>(), bi ? bi->data_ptr<scalar_t>() : nullptr,
                           bh ? bh->data_ptr<scalar_t>() : nullptr, m, int(mode), reset_after,
                           y.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>());
  });
  return std::make_tuple(y, h_n, ws);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& resets, const at::Tensor& y, const at::Tensor& ws, int64_t mode,
    bool reset_after, bool need_gx, bool need_gh0, bool need_gw_ih, bool need_gw_hh) {
  // grad_y and x may be strided views (autograd often hands over an expanded or transposed
  // gradient): the kernel reads them through their strides instead of copying them whole.
  // A need_* false: that gradient is not computed, for a caller that drops it (the op's autograd,
  // where its input requires none), and comes back as zeros, contiguous as the op's fake kernel
  // says its outputs are (an expanded scalar, without memory, failed the dispatcher-level check
  // of torch's CrossRefFakeMode; the memory is what the gradient would have taken, and the memset
  // is far cheaper than the product). Each is a product left out: grad_x's (dgx . W_ih) and a
  // weight's gradient a sixth of a training step's products each; h0's the first step's carry
  // (dh . W_hh), the whole recurrent product of a one-step call.
  const Dims d = validate(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, /*strided_x=*/true);
  const auto dtype = x.scalar_type();
  check_tensor(grad_y, "grad_y", 3, dtype, /*strided=*/true);
  check_shape(grad_y, "grad_y", {d.T, d.B, d.H});
  check_tensor(grad_h_n, "grad_h_n", 2, dtype);
  check_shape(grad_h_n, "grad_h_n", {d.B, d.H});
  check_tensor(y, "y", 3, dtype);
  check_shape(y, "y", {d.T, d.B, d.H});
  check_tensor(ws, "ws", 3, dtype);
  check_shape(ws, "ws", {d.T, d.B, d.W});
  auto opts = x.options();
  const auto zeros = [&](at::IntArrayRef shape) { return empty_pooled(shape, opts).zero_(); };
  at::Tensor gx = need_gx ? empty_pooled({d.T, d.B, d.I}, opts) : zeros({d.T, d.B, d.I});
  at::Tensor gh0 = at::empty({d.B, d.H}, opts);  // (the kernel's dh: scratch where not wanted)
  at::Tensor gw_ih = need_gw_ih ? empty_pooled({d.G * d.H, d.I}, opts) : zeros({d.G * d.H, d.I});
  at::Tensor gw_hh = need_gw_hh ? empty_pooled({d.G * d.H, d.H}, opts) : zeros({d.G * d.H, d.H});
  at::Tensor gb_ih = at::empty({d.G * d.H}, opts);
  at::Tensor gb_hh = at::empty({d.G * d.H}, opts);
  if (d.T == 0 || d.B == 0) {  // no step (h_n is h0) or no row: the kernel's chunking divides by both
    if (need_gh0) gh0.copy_(grad_h_n);  // (the op refuses these sizes; a direct call of backward
    else gh0.zero_();                  // reaches here)
    for (at::Tensor* g : {&gw_ih, &gw_hh, &gb_ih, &gb_hh}) g->zero_();
    return std::make_tuple(gx, gh0, gw_ih, gw_hh, gb_ih, gb_hh);
  }
  StepMasks m;
  m.B = d.B;
  if (auto p = opt_ptr(lengths)) m.len = p->data_ptr<int64_t>();
  if (auto p = opt_ptr(resets)) m.rst = p->data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnnrec_fast_cpp_backward", [&] {
    backward_impl<scalar_t>(d, view3<scalar_t>(grad_y), grad_h_n.data_ptr<scalar_t>(),
                            view3<scalar_t>(x), h0.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), m,
                            y.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), int(mode), reset_after,
                            need_gx ? gx.data_ptr<scalar_t>() : nullptr, gh0.data_ptr<scalar_t>(),
                            need_gw_ih ? gw_ih.data_ptr<scalar_t>() : nullptr,
                            need_gw_hh ? gw_hh.data_ptr<scalar_t>() : nullptr, gb_ih.data_ptr<scalar_t>(),
                            gb_hh.data_ptr<scalar_t>(), need_gh0);
  });
  if (!need_gh0) gh0.zero_();
  return std::make_tuple(gx, gh0, gw_ih, gw_hh, gb_ih, gb_hh);
}

// Bytes from the start of t's storage to the end of its last element (0 for an empty tensor). A
// storage freed or shrunk after the tensor was made (untyped_storage().resize_(0), as FSDP frees
// parameters) falls short of it, and a kernel would read past its end: the op refuses such a tensor
// (rnnrec_op.cpp, check_memory; ops._check_memory in Python) and the fast path declines it.
int64_t storage_reach(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = t.storage_offset();
  const auto sizes = t.sizes(), strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  return (last + 1) * int64_t(t.element_size());
}

bool within_storage(const at::Tensor& t) {
  return t.numel() == 0 || (t.has_storage() && storage_reach(t) <= int64_t(t.storage().nbytes()));
}

// Whether t's memory holds its values as they are, for the fast paths that read it by pointer (see
// infer_impl): storage, no negative bit, not an efficient zero tensor, not a Python tensor subclass
// or a functionalized tensor, within its storage.
bool plain_memory(const at::Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set();
  return t.has_storage() && !t.is_neg() && !t._is_zerotensor() && !ks.has(c10::DispatchKey::Python) &&
         !ks.has(c10::DispatchKey::Functionalize) && within_storage(t);
}

// A ValueError, "<where><name> reaches N bytes into its storage, which holds M: ...", for a tensor
// reaching past its storage (the op's check_memory and the scoring entry points below).
void check_within_storage(const char* where, const char* name, const at::Tensor& t) {
  if (t.numel() == 0 || !t.has_storage()) return;
  const int64_t need = storage_reach(t), have = int64_t(t.storage().nbytes());
  TORCH_CHECK_VALUE(need <= have, where, name, " reaches ", need, " bytes into its storage, which holds ", have,
                    ": its memory was freed or shrunk (untyped_storage().resize_())");
}

#if !defined(RNNREC_STANDALONE)
// ------------------------------------------------------------------------------------------------
// Inference fast path of the modules (rnnrec_fast.modules): the whole module call in one C++ call,
// for eager calls that need no autograd (serving). It takes the module's own input layout
// (batch_first, unbatched, hx of all layers) and runs the layers without the dispatcher, the
// workspace allocation or the Python-side reshaping: at the serving step (B=1, T=1, H=100) those
// cost more than the arithmetic. Returns None for anything it does not handle exactly as the
// module would (other dtypes or devices, wrong shapes...): the module then takes its
// general path, which also raises the proper errors. A call that autograd records goes from the
// same plan to train_impl, which makes the Python forward's op calls from C++.
// ------------------------------------------------------------------------------------------------
// rnnrec_op.cpp: the backend that ran this thread's last call (what rnnrec_fast.last_backend()
// reports; a plain pybind call from Python, ~10x cheaper than a torch.ops round trip)
void note_cpp_backend_ran();
std::tuple<bool, bool, bool, bool> backward_skips();
std::string last_backend();
void set_last_backend(std::string name);
// (below: a PackedSequence's padding and its inverse, without and with autograd)
std::tuple<at::Tensor, at::Tensor> pad_packed_sorted(const at::Tensor& data, const at::Tensor& batch_sizes);
at::Tensor unpad_packed_sorted(const at::Tensor& padded, const at::Tensor& batch_sizes);
std::tuple<at::Tensor, at::Tensor> pad_packed_autograd(const at::Tensor& data, const at::Tensor& batch_sizes);
at::Tensor unpad_packed_autograd(const at::Tensor& padded, const at::Tensor& batch_sizes);
at::Tensor reverse_padded(const at::Tensor& x, const at::Tensor& lengths);
at::Tensor reverse_padded_autograd(const at::Tensor& x, const at::Tensor& lengths);

namespace {

// Reused per-thread scratch (the serving step must not allocate its workspace per call), one
// buffer per Slot (0: infer_layers' workspace, 1: a cell's h_n, 2: infer_layers' zero state); large
// requests get a buffer of their own instead of growing it.
template <typename T, int Slot>
T* infer_scratch(int64_t n, Buf<T>& own) {
  constexpr int64_t kKeep = (int64_t(1) << 20) / int64_t(sizeof(T));
  if (n > kKeep) {
    own = Buf<T>(n);
    return own.data();
  }
  thread_local std::vector<T> scratch;
  if (int64_t(scratch.size()) < n) scratch.resize(size_t(n));
  return scratch.data();
}

// The layers (and directions) of one inference call. A layer's directions run one after the
// other, each over the layer's whole input: the reverse one on a time-reversed copy of it, into a
// (T, B, H) sequence of its own whose steps are then written back in time order beside the forward
// one's (the layer's output is (T, B, 2H)). That is the general path's arithmetic (an op call per
// direction on the flipped input, then flip and cat): the same kernels on the same rows, the same bits.
// With lengths (B,) that never increase (a PackedSequence's sorted batch, infer_packed), row b
// runs its first lengths[b] steps (StepMasks::prefix: each step's products on its live rows); the
// reverse direction then reverses each row's own steps (modules._reverse_index), its padding
// zero, and h_n holds each row's state after its last step.
// projected0: x is already layer 0's input projection (one direction, I = G*H: its W_ih, w[0], is
// the identity and is not read; see forward_impl's null w_ih).
template <typename T>
void infer_layers(const Dims& d0, int64_t layers, int64_t dirs, const T* x, const T* hx, const at::Tensor* const* w,
                  int64_t per_layer, int mode, bool reset_after, T* y, T* h_n, const int64_t* lengths = nullptr,
                  bool projected0 = false) {
  TORCH_INTERNAL_ASSERT(!projected0 || (dirs == 1 && d0.I == d0.G * d0.H), "rnnrec_fast cpp: projected0 for ",
                        dirs, " directions, I ", d0.I, ", ", d0.G * d0.H, " gate rows");
  const int64_t T_ = d0.T, B = d0.B, H = d0.H, DH = dirs * H;
  Buf<T> own_ws(0);
  // (a chunked workspace holds at most 2 * chunk - 1 steps, see forward_impl; a layer's chunking
  // depends on its input size, so the workspace serves the layer that needs the most; a projected
  // layer 0 makes no projection and takes every step's workspace)
  const auto chunk_of = [&](int64_t l, const Dims& dl) {
    return projected0 && l == 0 ? int64_t(0) : projection_chunk<T>(dl, mode);
  };
  int64_t ws_steps = 0;
  for (int64_t l = 0; l < layers; ++l) {
    Dims dl = d0;
    if (l > 0) dl.I = DH;
    const int64_t c = chunk_of(l, dl);
    ws_steps = std::max(ws_steps, c > 0 ? 2 * c - 1 : T_);
  }
  T* ws = infer_scratch<T, 0>(ws_steps * B * d0.W, own_ws);
  // Layers before the last write their output into a scratch sequence (two when layers > 2).
  std::vector<T> mid(layers > 1 ? size_t((layers > 2 ? 2 : 1) * T_ * B * DH) : 0);
  std::vector<T> rev_in(dirs == 2 ? size_t(T_ * B * std::max(d0.I, DH)) : 0);
  std::vector<T> dir_out(dirs == 2 ? size_t(T_ * B * H) : 0);
  // h0 = 0 where no hx is given, in scratch of its own (a thread once kept its largest call's zeros
  // for good: 80 MB after one B = 20000, H = 1000 call)
  Buf<T> own_zeros(0);
  T* zeros = nullptr;
  if (hx == nullptr) {
    zeros = infer_scratch<T, 2>(B * H, own_zeros);
    std::fill(zeros, zeros + B * H, T(0));
  }
  StepMasks m;
  m.B = B;
  m.len = lengths;
  // step t of row b in the reverse direction's time: the row's own steps turned round
  const auto rev_step = [&](int64_t t, int64_t b) { return lengths == nullptr ? T_ - 1 - t : lengths[b] - 1 - t; };
  const auto rev_row = [&](int64_t t, int64_t b) { return lengths == nullptr || t < lengths[b]; };
  const T* in = x;
  Dims d = d0;
  for (int64_t l = 0; l < layers; ++l) {
    if (l > 0) d.I = DH;
    const int64_t row = B * d.I;  // one step of the layer's input
    T* out = l + 1 == layers ? y : mid.data() + (l % 2) * T_ * B * DH;
    for (int64_t dir = 0; dir < dirs; ++dir) {
      const int64_t k = l * dirs + dir;
      const at::Tensor* const* lw = w + k * per_layer;
      const T* b_ih = per_layer == 4 ? lw[2]->data_ptr<T>() : nullptr;
      const T* b_hh = per_layer == 4 ? lw[3]->data_ptr<T>() : nullptr;
      const T* h0 = hx ? hx + k * B * H : zeros;
      if (dirs == 1) {
        forward_impl<T>(d, in, h0, projected0 && l == 0 ? nullptr : lw[0]->data_ptr<T>(), lw[1]->data_ptr<T>(), b_ih,
                        b_hh, m, mode, reset_after, out, h_n + k * B * H, ws, chunk_of(l, d), false);
        continue;
      }
      const T* src = in;
      if (dir == 1 && lengths == nullptr) {
        for (int64_t t = 0; t < T_; ++t)
          std::memcpy(rev_in.data() + t * row, in + (T_ - 1 - t) * row, sizeof(T) * size_t(row));
        src = rev_in.data();
      } else if (dir == 1) {
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t b = 0; b < B; ++b) {
            T* to = rev_in.data() + t * row + b * d.I;
            if (rev_row(t, b))
              std::memcpy(to, in + rev_step(t, b) * row + b * d.I, sizeof(T) * size_t(d.I));
            else
              std::fill(to, to + d.I, T(0));
          }
        src = rev_in.data();
      }
      forward_impl<T>(d, src, h0, lw[0]->data_ptr<T>(), lw[1]->data_ptr<T>(), b_ih, b_hh, m, mode, reset_after,
                      dir_out.data(), h_n + k * B * H, ws, chunk_of(l, d), false);
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t b = 0; b < B; ++b) {
          T* to = out + (t * B + b) * DH + dir * H;
          if (dir == 0 || rev_row(t, b))
            std::memcpy(to, dir_out.data() + ((dir == 1 ? rev_step(t, b) : t) * B + b) * H, sizeof(T) * size_t(H));
          else
            std::fill(to, to + H, T(0));
        }
      }
    }
    in = out;
  }
}

}  // namespace

namespace {

// The memory of the fast path's outputs. Small ones (up to 4 KiB: the serving step's (1, 1, H)
// output and state) come from a per-thread cache of 64-byte-aligned blocks instead of c10's CPU
// allocator, whose posix_memalign takes glibc's aligned path (an oversized chunk split in three,
// its ends freed, often consolidating the fast bins) and cost ~0.1 us a tensor (ad hoc: two
// (1, 1, 100) outputs 0.61 -> 0.39 us, Zen 4 VM). A block freed on any thread goes to that thread's
// cache (kKeep a size class, the rest to free()). Anything larger, every call while torch's memory
// profiler is on, and every call once the process has another CPU allocator than c10's default
// (c10::SetCPUAllocator), gets c10's CPU allocator as usual.
class OutputAllocator final : public c10::Allocator {
 public:
  static OutputAllocator* get() {
    static OutputAllocator* a = new OutputAllocator();  // never destroyed: storages keep a pointer
    return a;
  }
  // Whether allocate(n) hands out one of this allocator's blocks now (else c10's CPU allocator's memory).
  static bool serves(size_t n) { return size_class(n) >= 0 && in_use(); }
  // Whether d is memory of this allocator's.
  static bool owns(const c10::DataPtr& d) { return d.get_deleter() == &OutputAllocator::release; }
  c10::DataPtr allocate(size_t n) override {
    c10::Allocator* cpu = c10::GetCPUAllocator();
    const int c = size_class(n);
    if (c < 0 || !in_use()) return cpu->allocate(n);
    void* base = nullptr;
    Cache* cache = Cache::mine();
    if (cache != nullptr && cache->n[c] > 0) base = cache->blocks[c][--cache->n[c]];
    if (base == nullptr) {
      base = std::aligned_alloc(64, kHeader + (size_t(64) << c));
      if (base == nullptr) throw std::bad_alloc();
      static_cast<int*>(base)[0] = c;
    }
    void* data = static_cast<char*>(base) + kHeader;
    return {data, base, &OutputAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static constexpr size_t kHeader = 64;  // holds the block's size class; keeps the data aligned
  static constexpr int kClasses = 7;     // 64 B << c, up to 4 KiB
  static constexpr int kKeep = 8;
  // c10's default CPU allocator is the process's, and torch's memory profiler is off
  static bool in_use() {
    return c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator() && !c10::memoryProfilingEnabled();
  }
  static int size_class(size_t n) {
    for (int c = 0; c < kClasses; ++c)
      if (n <= (size_t(64) << c)) return c;
    return -1;
  }
  struct Cache {
    void* blocks[kClasses][kKeep];
    int n[kClasses] = {};
    ~Cache() {
      gone() = true;
      for (int c = 0; c < kClasses; ++c)
        for (int i = 0; i < n[c]; ++i) std::free(blocks[c][i]);
    }
    // nullptr once this thread's cache is destroyed (a tensor freed later in its exit)
    static Cache* mine() {
      if (gone()) return nullptr;
      thread_local Cache cache;
      return &cache;
    }
    static bool& gone() {
      thread_local bool g = false;  // (trivially destructible: valid throughout the thread's exit)
      return g;
    }
  };
  static void release(void* base) {
    const int c = static_cast<int*>(base)[0];
    Cache* cache = Cache::mine();
    if (cache != nullptr && cache->n[c] < kKeep) {
      cache->blocks[c][cache->n[c]++] = base;
      return;
    }
    std::free(base);
  }
};

// The small outputs a plan handed out, kept so that a later call of the same plan can hand the same
// tensor objects out again once no one else holds them: at the serving step, making two output
// tensors (TensorImpl, storage, Python object) and freeing them again (torch frees a tensor's
// memory with the GIL released) cost ~0.4 of a ~1.6 us RNN call (ad hoc, Zen 4 VM). In a serving
// loop, `out, h = m(x, h)`, call k's outputs are the objects of call k - 2, which the caller let go
// of when it rebound out and h after call k - 1. A kept output is taken only where nothing can
// tell it from a new one: no reference but the ring's to the object, its tensor or its memory (no
// view, storage object, NumPy array, DLPack capsule, weak reference), nothing added to it (no
// attribute, hook, grad, requires_grad, changed dispatch keys: conj / neg bits), and its shape,
// strides, dtype and memory (a block of OutputAllocator's, the size made) as made; a tensor with a
// version counter gets a fresh one where its count moved. Under torch's memory profiler, or with
// another CPU allocator set, no output is taken (OutputAllocator::serves). Touched only with the
// GIL held.
class OutputRing {
 public:
  OutputRing() = default;
  OutputRing(const OutputRing&) = delete;
  OutputRing& operator=(const OutputRing&) = delete;
  ~OutputRing() {  // (with the GIL: the plan is freed with its Python object)
    for (auto& s : slots_) Py_XDECREF(s.obj);
    release();
  }

  // Drops the references let go of since the last release: the call's very end, as freeing a
  // tensor can run Python code (weak references' callbacks; torch frees its memory with the GIL
  // released), which must not run between the call's lookups and its kernel.
  void release() {
    while (!doomed_.empty()) {
      PyObject* o = doomed_.back();
      doomed_.pop_back();
      Py_DECREF(o);
    }
  }

  // A kept output, no one else's (so not one taken for this call), of these sizes (C-contiguous)
  // and dtype, made in this mode (torch.inference_mode or not): a new reference, or nullptr. A
  // kept output that only the ring holds but that something was done to is let go of on the way
  // (release()).
  PyObject* take(at::IntArrayRef sizes, at::ScalarType dtype, bool inference) {
    for (auto& s : slots_) {
      if (s.obj == nullptr || Py_REFCNT(s.obj) != 1) continue;
      if (!pristine(s)) {
        doomed_.push_back(s.obj);
        s.obj = nullptr;
        continue;
      }
      const at::Tensor& t = THPVariable_Unpack(s.obj);
      if (s.inference != inference || t.scalar_type() != dtype || t.sizes() != sizes) continue;
      at::TensorImpl* impl = t.unsafeGetTensorImpl();
      if (!inference && impl->version_counter().current_version() != 0)
        impl->set_version_counter(c10::VariableVersion(0));
      Py_INCREF(s.obj);
      return s.obj;
    }
    return nullptr;
  }

  // Keeps o (a new output; its dispatch keys as made), in place of the oldest one kept.
  void keep(PyObject* o) {
    Slot& s = slots_[next_];
    next_ = (next_ + 1) % kSlots;
    Py_INCREF(o);
    if (s.obj != nullptr) doomed_.push_back(s.obj);
    s.obj = o;
    s.keys = THPVariable_Unpack(o).key_set();
    s.inference = THPVariable_Unpack(o).is_inference();
  }

 private:
  static constexpr int kSlots = 4;  // two calls' (output, h_n)
  struct Slot {
    PyObject* obj = nullptr;
    c10::DispatchKeySet keys;  // as made
    bool inference = false;
  };
  Slot slots_[kSlots];
  int next_ = 0;
  c10::SmallVector<PyObject*, 2 * kSlots> doomed_;

  // Whether s's object (which only the ring holds) is as it was made: nothing else refers to its
  // tensor or memory, nothing was added to it, its layout and memory are the ones it was made with.
  static bool pristine(const Slot& s) {
    PyObject* o = s.obj;
    if (Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return false;
    const auto* v = reinterpret_cast<const THPVariable*>(o);
    if (v->backward_hooks != nullptr || v->post_accumulate_grad_hooks != nullptr) return false;
    const Py_ssize_t wl = Py_TYPE(o)->tp_weaklistoffset;  // (3.12 on: managed, a negative offset)
    if (wl != 0 && *reinterpret_cast<PyObject* const*>(reinterpret_cast<const char*>(o) + wl) != nullptr) return false;
    const at::Tensor& t = THPVariable_Unpack(o);  // (torch 2.4: cdata is a MaybeOwned<Tensor>)
    const at::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (t.use_count() != 1 || t.weak_use_count() != 1 || t.key_set() != s.keys || impl->autograd_meta() != nullptr ||
        !t.device().is_cpu() || t.layout() != at::kStrided || t.storage_offset() != 0 || !impl->has_storage())
      return false;
    int64_t numel = 1;
    const auto sizes = t.sizes(), strides = t.strides();
    for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
      if (strides[d] != numel) return false;
      numel *= sizes[d];
    }
    const c10::Storage& st = impl->storage();
    if (st.use_count() != 1 || !OutputAllocator::owns(st.data_ptr()) || st.nbytes() != size_t(numel) * t.element_size())
      return false;
    // no attribute set on the object (last: this makes its __dict__ once)
    PyObject* d = PyObject_GenericGetDict(o, nullptr);
    if (d == nullptr) {
      PyErr_Clear();
      return false;
    }
    const bool bare = PyDict_GET_SIZE(d) == 0;
    Py_DECREF(d);
    return bare;
  }
};

// Whether the weights of `states` (layer, direction) pairs, `per_layer` each (w_ih, w_hh[, b_ih,
// b_hh]), are plain contiguous CPU tensors of dtype in a recurrence's shapes: w_ih (G H, I) for
// the first layer's directions and (G H, dirs H) above them, w_hh (G H, H), the biases (G H,).
bool weights_fit(const at::Tensor* const* weights, int64_t states, int64_t dirs, int64_t per_layer, int64_t G,
                 int64_t I, int64_t H, at::ScalarType dtype) {
  for (int64_t s = 0; s < states; ++s) {
    const int64_t in_l = s < dirs ? I : dirs * H;
    for (int64_t k = 0; k < per_layer; ++k) {
      const at::Tensor& t = *weights[s * per_layer + k];
      if (!t.defined() || t.scalar_type() != dtype || !t.device().is_cpu() || t.layout() != at::kStrided ||
          !t.is_contiguous() || !plain_memory(t))
        return false;
      const bool ok = k == 0 ? (t.dim() == 2 && t.size(0) == G * H && t.size(1) == in_l)
                    : k == 1 ? (t.dim() == 2 && t.size(0) == G * H && t.size(1) == H)
                             : (t.dim() == 1 && t.size(0) == G * H);
      if (!ok) return false;
    }
  }
  return true;
}

// The structure of a fast-path call's weights: G gates, `states` (layer, direction) pairs (the
// weight sets and rows of hx / h_n), per_layer weights each (w_ih, w_hh[, b_ih, b_hh]), hidden size H.
struct LayerShape {
  int64_t G, states, per_layer, H;
};

// Whether the `nw` weights fit a call of `mode` over layers x dirs (a cell: one direction) on I
// input features of dtype (weights_fit), with its LayerShape in s; false: the fast path declines.
bool layer_shape(int64_t mode, int64_t layers, int64_t dirs, bool cell, const at::Tensor* const* weights, int64_t nw,
                 int64_t I, at::ScalarType dtype, LayerShape& s) {
  if (mode != MODE_RNN_TANH && mode != MODE_RNN_RELU && mode != MODE_GRU) return false;
  if (layers < 1 || (dirs != 1 && dirs != 2) || (cell && dirs != 1) || nw == 0 || nw % (layers * dirs) != 0)
    return false;
  s.G = mode == MODE_GRU ? 3 : 1;
  s.states = layers * dirs;
  s.per_layer = nw / s.states;
  if (s.per_layer != 2 && s.per_layer != 4) return false;
  const at::Tensor& w_hh0 = *weights[1];
  if (w_hh0.dim() != 2) return false;
  s.H = w_hh0.size(1);
  return s.H > 0 && w_hh0.size(0) == s.G * s.H && weights_fit(weights, s.states, dirs, s.per_layer, s.G, I, s.H, dtype);
}

// A PackedSequence's packed rows (bs[t] rows of row_bytes at step t, in its sorted batch order)
// padded to T steps of B rows at dst, zeros after each step's rows; len (B, zeroed) gets each
// sorted entry's length. unpad_steps: the inverse copy.
void pad_steps(const int64_t* bs, int64_t T, int64_t B, size_t row_bytes, const char* src, char* dst, int64_t* len) {
  for (int64_t t = 0; t < T; ++t) {
    if (row_bytes > 0) {
      std::memcpy(dst + size_t(t * B) * row_bytes, src, size_t(bs[t]) * row_bytes);
      std::memset(dst + size_t(t * B + bs[t]) * row_bytes, 0, size_t(B - bs[t]) * row_bytes);  // (0.0 in every float type)
    }
    src += size_t(bs[t]) * row_bytes;
    for (int64_t j = 0; j < bs[t]; ++j) len[j] += 1;
  }
}
void unpad_steps(const int64_t* bs, int64_t T, int64_t B, size_t row_bytes, const char* src, char* dst) {
  for (int64_t t = 0; t < T && row_bytes > 0; ++t) {
    std::memcpy(dst, src + size_t(t * B) * row_bytes, size_t(bs[t]) * row_bytes);
    dst += size_t(bs[t]) * row_bytes;
  }
}

// RecordFunction observers (the profiler, a global observer) see a fast-path call as an event
// named after the op, as they would see the op's. (a RecordFunction only where a callback is
// registered: at::RecordFunction's construction looks the callbacks up too, and its destruction
// costs as much again)
void record_infer_call(std::optional<at::RecordFunction>& record, const at::Tensor& input, const at::Tensor* hx) {
  if (auto callbacks = at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION); C10_UNLIKELY(callbacks.has_value())) {
    record.emplace(std::move(*callbacks));
    if (record->isActive()) {
      const std::vector<c10::IValue> inputs = hx != nullptr && hx->defined() ? std::vector<c10::IValue>{input, *hx}
                                                                            : std::vector<c10::IValue>{input};
      at::detail::record_function_with_scope(*record, "rnnrec_fast::recurrence", inputs);
    }
  }
}

// An output of the fast path: CPU memory without the dispatcher round trip of at::empty, small
// blocks from OutputAllocator's cache. (Under torch.inference_mode the new tensors are inference
// tensors all the same, as TensorImpl reads the mode.)
at::Tensor empty_output(at::IntArrayRef size, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_generic(size, OutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              dtype, std::nullopt));
}

// run(weights) for a fast-path call whose products take `work` multiply-adds: a large call lets
// other Python threads run meanwhile (the op path does too), the weights then held as snapshots
// (new TensorImpls on the same memory, taken under the GIL): another thread may replace a module's
// parameter, or give it other memory (`p.data = ...`, `p.set_(...)`, which free the old memory: a
// reference to the parameter's TensorImpl alone would read freed memory).
template <typename F>
void with_weights_held(int64_t work, const at::Tensor* const* weights, int64_t nw, const F& run) {
  if (work < (int64_t(1) << 20)) {
    run(weights);
    return;
  }
  std::vector<at::Tensor> held;
  std::vector<const at::Tensor*> ptrs;
  held.reserve(size_t(nw));
  for (int64_t k = 0; k < nw; ++k) held.push_back(weights[k]->defined() ? weights[k]->variable_data() : *weights[k]);
  for (const auto& t : held) ptrs.push_back(&t);
  py::gil_scoped_release no_gil;
  run(ptrs.data());
}

// A made tensor moved into its Python object (a copy would take a reference that, dropped in C++
// again, takes the GIL: see infer_impl), and two such objects as a (first, second) tuple.
py::object wrapped(at::Tensor&& t) {
  PyObject* o = THPVariable_Wrap(std::move(t));
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

py::object pair_of(py::object&& first, py::object&& second) {
  PyObject* pair = PyTuple_New(2);
  if (pair == nullptr) throw py::error_already_set();
  PyTuple_SET_ITEM(pair, 0, first.release().ptr());
  PyTuple_SET_ITEM(pair, 1, second.release().ptr());
  return py::reinterpret_steal<py::object>(pair);
}

// A module call's sizes as the fast paths read them (call_shape).
struct CallShape {
  int64_t T = 0, B = 0, I = 0;
  bool batched = false, bf = false;  // bf: a batched sequence module's batch_first input
  LayerShape ls;
};

// Whether the fast paths take a module call's input, hx and `nw` weights (the layers' w_ih, w_hh[,
// b_ih, b_hh]; infer_impl's and train_impl's: everything the modules' Python forward checks would
// pass), with the call's sizes in s; false: declined, the general path takes the call (and raises
// where it should). Plain tensors only: a functorch wrapper (torch.func.vmap's batched tensor) has
// no storage; a tensor with the negative bit (a lazily negated view: x.conj().imag,
// torch._neg_view) holds the values' negation in memory, and an efficient zero tensor
// (torch._efficientzerotensor) none: the dispatcher resolves both before the op's kernel runs; a
// Python tensor subclass (_make_wrapper_subclass) or a functionalized tensor
// (torch.func.functionalize) has no memory of its values either: the op's call goes through their
// dispatch. A tensor reaching past its storage (freed or shrunk) goes to the op, which refuses it.
bool call_shape(const at::Tensor& input, const at::Tensor* hx, const at::Tensor* const* weights, int64_t nw,
                int64_t mode, int64_t layers, bool batch_first, bool cell, int64_t dirs, CallShape& s) {
  const auto dtype = input.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || !input.device().is_cpu() || input.layout() != at::kStrided ||
      !plain_memory(input))
    return false;
  // Nor inside a torch.func transform, plain tensors or not: a grad / jvp level wraps what the ATen
  // calls make there (a batch_first input's transposed copy, a contiguous hx), and the wrapper has
  // no memory ("Cannot access data pointer of Tensor that doesn't have storage")
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) return false;
  // Sequence modules: (T, B, I), (B, T, I) or unbatched (T, I); cells: (B, I) or unbatched (I,).
  // Shapes are read, not reshaped: view ops cost as much as the arithmetic at the serving step.
  const int64_t nd = input.dim();
  s.batched = nd == (cell ? 2 : 3);
  if (!s.batched && nd != (cell ? 1 : 2)) return false;
  s.bf = batch_first && s.batched && !cell;
  if (cell) {
    s.T = 1, s.B = s.batched ? input.size(0) : 1;
  } else if (s.batched) {
    s.T = input.size(s.bf ? 1 : 0), s.B = input.size(s.bf ? 0 : 1);
  } else {
    s.T = input.size(0), s.B = 1;
  }
  s.I = input.size(nd - 1);
  if (s.T == 0 || s.B == 0 || s.I == 0) return false;
  if (!layer_shape(mode, layers, dirs, cell, weights, nw, s.I, dtype, s.ls)) return false;
  // hx: sequence modules (states, B, H) or unbatched (states, H); cells (B, H) or unbatched (H,).
  if (hx == nullptr || !hx->defined()) return true;
  if (hx->scalar_type() != dtype || !hx->device().is_cpu() || hx->layout() != at::kStrided || hx->dim() != nd ||
      !plain_memory(*hx))
    return false;
  const int64_t H = s.ls.H;
  return cell ? (hx->size(nd - 1) == H && (!s.batched || hx->size(0) == s.B))
              : (hx->size(0) == s.ls.states && hx->size(nd - 1) == H && (!s.batched || hx->size(1) == s.B));
}

// The fast path proper: `weights` holds `nw` pointers (the layers' w_ih, w_hh[, b_ih, b_hh]).
py::object infer_impl(const at::Tensor& input, const at::Tensor* hx_in, const at::Tensor* const* weights,
                      int64_t nw, int64_t mode, bool reset_after, int64_t layers, bool batch_first, bool cell,
                      int64_t dirs, OutputRing* ring = nullptr, bool projected0 = false) {
  const py::object unhandled = py::none();
  const auto dtype = input.scalar_type();
  // Only where autograd is off (torch.no_grad / torch.inference_mode): nothing is recorded here.
  CallShape cs;
  if (at::GradMode::is_enabled() || !call_shape(input, hx_in, weights, nw, mode, layers, batch_first, cell, dirs, cs))
    return unhandled;
  const int64_t T_ = cs.T, B = cs.B, I = cs.I;
  const bool batched = cs.batched, bf = cs.bf;
  const int64_t G = cs.ls.G, states = cs.ls.states, per_layer = cs.ls.per_layer, H = cs.ls.H;
  TORCH_CHECK_VALUE(!projected0 || (dirs == 1 && I == G * H), "rnnrec_fast infer: projected0 takes one direction "
                    "and an input of ", G * H, " features (the first layer's projection), got ", dirs,
                    " direction(s) and ", I);
  // The caller's tensors are read through pointers, not copied: a C++ copy of a tensor that Python
  // holds takes a reference to its Python object too, and dropping it again takes the GIL
  // (c10::intrusive_ptr's 1 <-> 2 transitions: with the outputs' below, ~0.16 of a ~1.8 us call
  // at H = 4, ad hoc, Zen 4 VM). The caller (the module's call, whose arguments tuple holds them)
  // keeps them alive for the call.
  const at::Tensor* hx = nullptr;
  at::Tensor hx_copy;
  if (hx_in != nullptr && hx_in->defined()) {
    hx = hx_in;
    if (!hx->is_contiguous()) hx_copy = hx->contiguous(), hx = &hx_copy;
  }
  // Handled from here on: RecordFunction observers (the profiler, a global observer) see the call
  // as an event named after the op, as they would see the op's.
  std::optional<at::RecordFunction> record;
  record_infer_call(record, input, hx_in);
  // The kernel reads x as (T, B, I) rows: a batch_first input is that layout already when T or B
  // is 1; otherwise it is transposed once.
  const at::Tensor* x = &input;
  at::Tensor x_copy;
  if (bf && T_ > 1 && B > 1) x_copy = input.transpose(0, 1).contiguous(), x = &x_copy;
  else if (!input.is_contiguous()) x_copy = input.contiguous(), x = &x_copy;
  Dims d{T_, B, I, H, G, ws_width(int(mode), H)};
  // Outputs are allocated in the shape the module returns. A cell's new state is its one output
  // step; its h_n goes to scratch. A batch_first output with T, B > 1 is the usual transposed view.
  const auto empty = [dtype](at::IntArrayRef size) { return empty_output(size, dtype); };
  const int64_t DH = dirs * H;
  c10::SmallVector<int64_t, 3> y_size, h_size;
  if (cell)
    y_size = batched ? c10::SmallVector<int64_t, 3>{B, H} : c10::SmallVector<int64_t, 3>{H};
  else if (!batched)
    y_size = {T_, DH};
  else if (bf && (T_ == 1 || B == 1))
    y_size = {B, T_, DH};
  else
    y_size = {T_, B, DH};
  if (!cell) h_size = batched ? c10::SmallVector<int64_t, 3>{states, B, H} : c10::SmallVector<int64_t, 3>{states, H};
  // Each output is a kept one of the plan's (OutputRing) where one is free, else made.
  const bool transposed = bf && T_ > 1 && B > 1;
  const bool inference = c10::InferenceMode::is_enabled();
  const auto take = [&](at::IntArrayRef size) {
    if (ring == nullptr || transposed || !OutputAllocator::serves(size_t(c10::multiply_integers(size)) * c10::elementSize(dtype)))
      return py::object();
    return py::reinterpret_steal<py::object>(ring->take(size, dtype, inference));
  };
  // (last: after the outputs are made, on every way out)
  const auto release = c10::make_scope_exit([ring] {
    if (ring != nullptr) ring->release();
  });
  py::object y_kept = take(y_size);
  py::object h_kept = cell ? py::object() : take(h_size);
  at::Tensor y, h_n;  // (made)
  if (!y_kept) y = empty(y_size);
  if (!cell && !h_kept) h_n = empty(h_size);
  const at::Tensor& y_out = y_kept ? THPVariable_Unpack(y_kept.ptr()) : y;
  const at::Tensor& h_out = h_kept ? THPVariable_Unpack(h_kept.ptr()) : h_n;
  with_weights_held(T_ * B * G * H * (I + H) * states, weights, nw, [&](const at::Tensor* const* w) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "rnnrec_fast_infer", [&] {
      Buf<scalar_t> own(0);
      scalar_t* hn = cell ? infer_scratch<scalar_t, 1>(B * H, own) : h_out.data_ptr<scalar_t>();
      infer_layers<scalar_t>(d, layers, dirs, x->data_ptr<scalar_t>(),
                             hx != nullptr ? hx->data_ptr<scalar_t>() : nullptr, w, per_layer, int(mode),
                             reset_after, y_out.data_ptr<scalar_t>(), hn, nullptr, projected0);
    });
  });
  note_cpp_backend_ran();
  if (transposed) y = y.transpose(0, 1);
  // The made outputs are moved into their Python objects (a copy would take the GIL again to drop
  // the C++ reference, as above), and kept by the plan where their memory is OutputAllocator's.
  auto wrap = [&](at::Tensor&& t) {
    const bool keep = ring != nullptr && !transposed && t.has_storage() && OutputAllocator::owns(t.storage().data_ptr());
    py::object o = wrapped(std::move(t));
    if (keep) ring->keep(o.ptr());
    return o;
  };
  py::object out_y = y_kept ? std::move(y_kept) : wrap(std::move(y));
  if (cell) return out_y;
  return pair_of(std::move(out_y), h_kept ? std::move(h_kept) : wrap(std::move(h_n)));
}

// The op's calls as the modules' Python forward makes them (train_impl, train_packed), through the
// dispatcher (its autograd kernel records the node, as the Python call's does): call(x, h0, k[,
// lengths]) runs layer-direction k on x from h0 (undefined: None) -> (output, h_n). It holds the
// weights (another thread may replace a module's parameter while the GIL is released); made and
// dropped with the GIL held.
class OpCalls {
 public:
  OpCalls(const at::Tensor* const* weights, int64_t nw, int64_t per_layer, int64_t mode, bool reset_after,
          const std::string& backend)
      : per_layer_(per_layer), reset_after_(reset_after), backend_(backend),
        mode_(mode == MODE_GRU ? "gru" : mode == MODE_RNN_RELU ? "rnn_relu" : "rnn_tanh") {
    w_.reserve(size_t(nw));
    for (int64_t k = 0; k < nw; ++k) w_.push_back(*weights[k]);
  }

  std::pair<at::Tensor, at::Tensor> operator()(const at::Tensor& x, const at::Tensor& h0, int64_t k,
                                               const at::Tensor& lengths = at::Tensor()) const {
    using Opt = std::optional<at::Tensor>;
    using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const at::Tensor&,
                                                               const at::Tensor&, const Opt&, const Opt&, const Opt&,
                                                               const Opt&, c10::string_view, bool, c10::string_view);
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("rnnrec_fast::recurrence", "").typed<Fwd>();
    const auto opt = [](const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); };
    const at::Tensor* lw = w_.data() + k * per_layer_;
    auto r = op.call(x, opt(h0), lw[0], lw[1], per_layer_ == 4 ? opt(lw[2]) : Opt(),
                     per_layer_ == 4 ? opt(lw[3]) : Opt(), opt(lengths), Opt(), mode_, reset_after_, backend_);
    return {std::move(std::get<0>(r)), std::move(std::get<1>(r))};
  }

  // The forward's layer loop on x (T, B, I) from hx (states, B, H; undefined: None) -> (output,
  // h_n): each layer-direction's call (a reverse direction's on x reversed in time, its output
  // reversed back: by flip(0), or with lengths each row's steps by reverse_padded, as
  // modules._Reversal), the directions' outputs joined by cat, h_n of one layer-direction by
  // unsqueeze_ in place, of several by stack.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& hx, int64_t layers, int64_t dirs,
                                           const at::Tensor& lengths = at::Tensor()) const {
    const auto h0 = [&](int64_t k) { return hx.defined() ? hx.select(0, k) : at::Tensor(); };
    const auto reverse = [&](const at::Tensor& t) {
      if (!lengths.defined()) return t.flip(0);
      return t.requires_grad() && at::GradMode::is_enabled() ? reverse_padded_autograd(t, lengths)
                                                             : reverse_padded(t, lengths);
    };
    if (layers == 1 && dirs == 1) {
      auto r = (*this)(x, h0(0), 0, lengths);
      r.second.unsqueeze_(0);
      return r;
    }
    at::Tensor layer_in = x;
    std::vector<at::Tensor> hs;
    for (int64_t l = 0; l < layers; ++l) {
      std::vector<at::Tensor> outs;
      for (int64_t dir = 0; dir < dirs; ++dir) {
        const int64_t k = l * dirs + dir;
        auto r = (*this)(dir == 0 ? layer_in : reverse(layer_in), h0(k), k, lengths);
        outs.push_back(dir == 0 ? std::move(r.first) : reverse(r.first));
        hs.push_back(std::move(r.second));
      }
      layer_in = dirs == 1 ? std::move(outs[0]) : at::cat(outs, 2);
    }
    return {std::move(layer_in), at::stack(hs)};
  }

 private:
  std::vector<at::Tensor> w_;
  int64_t per_layer_;
  bool reset_after_;
  const std::string backend_;  // (a copy: the plan may be replaced by another thread while the GIL is released)
  const char* mode_;
};

// A module call that autograd records (grad mode on; a dense input): the op calls and views of the
// modules' Python forward (_RNNBase.forward without lengths or resets, _CellBase.forward), made
// here: the same ATen views (transpose, unsqueeze, select, flip), the op through the dispatcher
// (its autograd kernel records the node, as the Python call's does), the same outputs (h_n of one
// layer made by unsqueeze_ in place, of several by stack). What the Python forward would have
// spent on its frame, attribute reads and checks around those calls (~70 of a ~95 us call at H =
// 4, one thread, Zen 3 VM, ad hoc) is left out. Takes exactly what infer_impl takes (call_shape);
// the caller declines what the Python forward would not hand to a plan (weights of a tensor
// subclass, dropout in training mode, observed calls, tracing, dispatch modes). The GIL is released
// around the calls, as the op's call from Python releases it.
py::object train_impl(const at::Tensor& input, const at::Tensor* hx_in, const at::Tensor* const* weights, int64_t nw,
                      int64_t mode, bool reset_after, int64_t layers, bool batch_first, bool cell,
                      int64_t dirs, const std::string& backend) {
  CallShape cs;
  if (!at::GradMode::is_enabled() ||
      !call_shape(input, hx_in, weights, nw, mode, layers, batch_first, cell, dirs, cs))
    return py::none();
  const OpCalls call(weights, nw, cs.ls.per_layer, mode, reset_after, backend);
  at::Tensor in = input, hx = hx_in != nullptr ? *hx_in : at::Tensor(), out_y, out_h;
  {
    py::gil_scoped_release no_gil;
    if (cell) {  // (x.unsqueeze(0): one step)
      const at::Tensor x = cs.batched ? in : in.unsqueeze(0);
      const at::Tensor h0 = !hx.defined() ? hx : cs.batched ? hx : hx.unsqueeze(0);
      at::Tensor h = call(x.unsqueeze(0), h0, 0).second;
      out_y = cs.batched ? std::move(h) : h.squeeze(0);
    } else {
      const at::Tensor x = !cs.batched ? in.unsqueeze(1) : cs.bf ? in.transpose(0, 1) : in;
      if (hx.defined() && !cs.batched) hx = hx.unsqueeze(1);
      std::tie(out_y, out_h) = call.forward(x, hx, layers, dirs);
      if (!cs.batched) {
        out_y = out_y.squeeze(1);
        out_h = out_h.squeeze(1);
      } else if (cs.bf) {
        out_y = out_y.transpose(0, 1);
      }
    }
  }
  py::object y_obj = wrapped(std::move(out_y));
  if (cell) return y_obj;
  return pair_of(std::move(y_obj), wrapped(std::move(out_h)));
}

}  // namespace

py::object infer(const at::Tensor& input, const c10::optional<at::Tensor>& hx,
                 const std::vector<at::Tensor>& weights, int64_t mode, bool reset_after, int64_t layers,
                 bool batch_first, bool cell, int64_t directions, bool projected0) {
  c10::SmallVector<const at::Tensor*, 16> w;
  for (const auto& t : weights) w.push_back(&t);
  return infer_impl(input, hx.has_value() ? &*hx : nullptr, w.data(), int64_t(w.size()), mode, reset_after,
                    layers, batch_first, cell, directions, nullptr, projected0);
}

// What InferPlan::module_call reads of Python besides the module: set once by rnnrec_fast.modules
// (set_module_call_context). Never freed: it lives as long as the interpreter, and a static
// py::object would be released after the interpreter has gone.
namespace {
struct ModuleCallContext {
  py::tuple own_forwards;  // the modules' own forward functions (a subclass's or an instance's: declined)
  py::object nn_module;    // torch.nn.modules.module: the global hook dicts, looked up at each call
  py::object forward_ad;   // torch.autograd.forward_ad: _current_level >= 0 inside dual_level()
  py::object module_cls;   // torch.nn.Module, whose __call__ must still be torch's own:
  py::object torch_call;   // a user's patched nn.Module.__call__ (a global call wrapper) sees every call
  // torch's nn.Module._call_impl, which __call__ calls: one patched on nn.Module, overridden by a
  // subclass or set on the instance (a wrapper checking every module call) must see every call too
  py::object torch_call_impl;
  std::vector<PyObject*> module_hooks, global_hooks;  // interned names
  PyObject *forward, *compiled_call_impl, *training, *dropout, *current_level, *dunder_call, *call_impl;
  // the two modules' namespaces (borrowed: the modules above keep them), read as dicts: a module
  // attribute lookup goes through the module type's getattr first
  PyObject *nn_module_dict, *forward_ad_dict;
  py::object packed_cls;  // torch.nn.utils.rnn.PackedSequence: InferPlan's call takes one (infer_packed)
};
ModuleCallContext* module_call_ctx = nullptr;

// Whether o is a torch PackedSequence, exactly (a subclass's fields could mean something else)
inline bool is_packed_sequence(PyObject* o) {
  const ModuleCallContext* c = module_call_ctx;
  return c != nullptr && c->packed_cls && reinterpret_cast<PyObject*>(Py_TYPE(o)) == c->packed_cls.ptr() &&
         PyTuple_Check(o) && PyTuple_GET_SIZE(o) == 4;
}

// A dict's version: CPython 3.11 and 3.12 give every dict a tag (ma_version_tag) that each
// insertion, deletion or value change replaces with a new one from a process-wide counter, and a
// new dict a fresh one: while a dict's tag is the one seen before, so are its contents (the same
// value objects, kept alive by the dict). 0 where the tag is not kept (3.13 on): nothing is then
// cached, every call looks its keys up.
inline uint64_t dict_version(PyObject* d) {
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  return reinterpret_cast<PyDictObject*>(d)->ma_version_tag;
#pragma GCC diagnostic pop
#else
  (void)d;
  return 0;
#endif
}

// A hooks container whose emptiness can be read without running Python code: a dict or an
// OrderedDict exactly, as nn.Module keeps them (a subclass's __len__ could say otherwise; any other
// container is declined: the module's Python call handles it).
inline bool plain_hooks(PyObject* h) { return PyDict_CheckExact(h) || PyODict_CheckExact(h); }

PyObject* interned(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw py::error_already_set();
  return o;  // (kept for the interpreter's lifetime)
}
}  // namespace

void set_module_call_context(py::tuple own_forwards, py::object nn_module, py::object forward_ad,
                             py::type module_cls, py::object torch_call, py::object torch_call_impl,
                             py::object packed_cls) {
  auto* c = new ModuleCallContext();
  c->packed_cls = std::move(packed_cls);
  c->own_forwards = std::move(own_forwards);
  c->nn_module = std::move(nn_module);
  c->forward_ad = std::move(forward_ad);
  c->module_cls = std::move(module_cls);
  c->torch_call = std::move(torch_call);
  c->torch_call_impl = std::move(torch_call_impl);
  for (const char* n : {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"})
    c->module_hooks.push_back(interned(n));
  for (const char* n : {"_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                        "_global_backward_pre_hooks"})
    c->global_hooks.push_back(interned(n));
  c->forward = interned("forward");
  c->compiled_call_impl = interned("_compiled_call_impl");
  c->training = interned("training");
  c->dropout = interned("dropout");
  c->current_level = interned("_current_level");
  c->dunder_call = interned("__call__");
  c->call_impl = interned("_call_impl");
  c->nn_module_dict = PyModule_GetDict(c->nn_module.ptr());
  c->forward_ad_dict = PyModule_GetDict(c->forward_ad.ptr());
  if (c->nn_module_dict == nullptr || c->forward_ad_dict == nullptr) throw py::error_already_set();
  module_call_ctx = c;  // (a second call replaces the context; the first is kept: it may be in use)
}

namespace {
// What the fast paths read of a PackedSequence call (packed_shape).
struct PackedShape {
  PyObject* f[4];  // (data, batch_sizes, sorted_indices, unsorted_indices), borrowed
  const at::Tensor* data = nullptr;
  const at::Tensor* hx = nullptr;
  const int64_t* bs = nullptr;
  const int64_t* sorted = nullptr;  // (both null: sorted_indices None, the batch was sorted already)
  const int64_t* unsorted = nullptr;
  int64_t T = 0, B = 0, N = 0, I = 0;
  LayerShape ls;
};

// Whether the fast paths take a sequence module's call on a PackedSequence (infer_packed's and
// train_packed's), with what they read in s; false for all the module's packed branch would refuse
// or treat otherwise: malformed batch sizes or indices (out-of-range indices too), another dtype or
// device, a subclass's or non-plain tensors, weights or hx that do not fit (the general path then
// raises the errors).
bool packed_shape(PyObject* packed, PyObject* hx_obj, const at::Tensor* const* weights, int64_t nw, int64_t mode,
                  int64_t layers, int64_t dirs, PackedShape& s) {
  PyObject** f = s.f;
  for (int i = 0; i < 4; ++i) f[i] = PyTuple_GET_ITEM(packed, i);
  const bool perm = f[2] != Py_None;  // (sorted_indices None: the batch was sorted already)
  if (!THPVariable_CheckExact(f[0]) || !THPVariable_CheckExact(f[1]) || perm != (f[3] != Py_None) ||
      (perm && (!THPVariable_CheckExact(f[2]) || !THPVariable_CheckExact(f[3]))) ||
      (hx_obj != Py_None && !THPVariable_CheckExact(hx_obj)))
    return false;
  const at::Tensor& data = THPVariable_Unpack(f[0]);
  const at::Tensor& bs_t = THPVariable_Unpack(f[1]);
  const auto dtype = data.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || !data.device().is_cpu() || data.layout() != at::kStrided ||
      data.dim() != 2 || !plain_memory(data) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    return false;
  const auto index_fits = [](const at::Tensor& t) {
    return t.scalar_type() == at::kLong && t.device().is_cpu() && t.layout() == at::kStrided && t.dim() == 1 &&
           t.is_contiguous() && plain_memory(t);
  };
  if (!index_fits(bs_t) || bs_t.numel() == 0) return false;
  const int64_t* bs = bs_t.data_ptr<int64_t>();
  const int64_t T_ = bs_t.numel(), B = bs[0], N = data.size(0), I = data.size(1);
  int64_t sum = 0;
  for (int64_t t = 0; t < T_; ++t) {
    if (bs[t] < 1 || (t > 0 && bs[t] > bs[t - 1])) return false;
    sum += bs[t];
  }
  if (sum != N || I == 0) return false;
  if (perm) {
    const at::Tensor& si = THPVariable_Unpack(f[2]);
    const at::Tensor& ui = THPVariable_Unpack(f[3]);
    if (!index_fits(si) || !index_fits(ui) || si.numel() != B || ui.numel() != B) return false;
    s.sorted = si.data_ptr<int64_t>(), s.unsorted = ui.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      if (s.sorted[b] < 0 || s.sorted[b] >= B || s.unsorted[b] < 0 || s.unsorted[b] >= B) return false;
  }
  if (!layer_shape(mode, layers, dirs, false, weights, nw, I, dtype, s.ls)) return false;
  if (hx_obj != Py_None) {
    const at::Tensor* hx = &THPVariable_Unpack(hx_obj);
    if (hx->scalar_type() != dtype || !hx->device().is_cpu() || hx->layout() != at::kStrided || hx->dim() != 3 ||
        hx->size(0) != s.ls.states || hx->size(1) != B || hx->size(2) != s.ls.H || !plain_memory(*hx))
      return false;
    s.hx = hx;
  }
  s.data = &data, s.bs = bs, s.T = T_, s.B = B, s.N = N, s.I = I;
  return true;
}

// A packed call's result, as the module's: (PackedSequence(data, batch_sizes, sorted_indices,
// unsorted_indices) of the call's PackedSequence type and fields, h_n).
py::object packed_result(PyObject* packed, at::Tensor&& data, at::Tensor&& h_n) {
  py::object h_out = wrapped(std::move(h_n));
  py::object result = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(Py_TYPE(packed)))(
      wrapped(std::move(data)), py::handle(PyTuple_GET_ITEM(packed, 1)), py::handle(PyTuple_GET_ITEM(packed, 2)),
      py::handle(PyTuple_GET_ITEM(packed, 3)));
  return pair_of(std::move(result), std::move(h_out));
}

// A sequence module's inference on a PackedSequence (InferPlan's call with one): the modules'
// packed branch (_check_packed, _pad_packed, the permuted hx, the op, the gather of the output
// rows and h_n back to the batch's order) in one C++ call. The data is padded in its sorted batch
// order, whose lengths never increase (infer_layers then runs each step's products on its live
// rows); hx is read in that order (hx[:, sorted_indices], as torch.nn permutes it); the output's
// packed rows are each step's first batch_sizes[t] rows of the padded output, and h_n goes back
// to the batch's order (h_n[:, unsorted_indices]). Declines (None) all the module's packed branch
// would refuse or treat otherwise: malformed batch sizes or indices (out-of-range indices too),
// another dtype or device, a subclass's or non-plain tensors, weights or hx that do not fit; the
// general path then raises the errors. B32 T20 H100, one thread, Zen 3 VM (ad hoc): the general
// path's packed inference ~730 us, of which ~180 outside the kernels (Python, the op's dispatch,
// ATen's index ops).
py::object infer_packed(PyObject* packed, PyObject* hx_obj, const at::Tensor* const* weights, int64_t nw,
                        int64_t mode, bool reset_after, int64_t layers, int64_t dirs) {
  PackedShape ps;
  if (!packed_shape(packed, hx_obj, weights, nw, mode, layers, dirs, ps)) return py::none();
  const bool perm = ps.sorted != nullptr;
  const at::Tensor& data = *ps.data;
  const at::Tensor* hx = ps.hx;
  const auto dtype = data.scalar_type();
  const int64_t* bs = ps.bs;
  const int64_t *sorted = ps.sorted, *unsorted = ps.unsorted;
  const int64_t T_ = ps.T, B = ps.B, N = ps.N, I = ps.I;
  const int64_t G = ps.ls.G, states = ps.ls.states, per_layer = ps.ls.per_layer, H = ps.ls.H;
  // handled from here on
  std::optional<at::RecordFunction> record;
  record_infer_call(record, data, hx);
  const at::Tensor xc = data.contiguous();
  const at::Tensor hc = hx != nullptr ? hx->contiguous() : at::Tensor();
  const int64_t DH = dirs * H;
  at::Tensor out = empty_output({N, DH}, dtype);
  at::Tensor h_n = empty_output({states, B, H}, dtype);
  with_weights_held(T_ * B * G * H * (I + H) * states, weights, nw, [&](const at::Tensor* const* w) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "rnnrec_fast_infer_packed", [&] {
      using S = scalar_t;
      Buf<S> x(T_ * B * I), y(T_ * B * DH), h0(perm && hx != nullptr ? states * B * H : 0), hs(perm ? states * B * H : 0);
      std::vector<int64_t> lengths(size_t(B), 0);
      pad_steps(bs, T_, B, sizeof(S) * size_t(I), reinterpret_cast<const char*>(xc.data_ptr<S>()),
                reinterpret_cast<char*>(x.data()), lengths.data());
      const S* h_in = hx != nullptr ? hc.data_ptr<S>() : nullptr;
      if (perm && h_in != nullptr) {
        for (int64_t k = 0; k < states; ++k)
          for (int64_t j = 0; j < B; ++j)
            std::memcpy(h0.data() + (k * B + j) * H, h_in + (k * B + sorted[j]) * H, sizeof(S) * size_t(H));
        h_in = h0.data();
      }
      S* hn = perm ? hs.data() : h_n.data_ptr<S>();
      infer_layers<S>(Dims{T_, B, I, H, G, ws_width(int(mode), H)}, layers, dirs, x.data(), h_in, w, per_layer,
                      int(mode), reset_after, y.data(), hn, lengths.data());
      unpad_steps(bs, T_, B, sizeof(S) * size_t(DH), reinterpret_cast<const char*>(y.data()),
                  reinterpret_cast<char*>(out.data_ptr<S>()));
      if (perm) {
        S* h = h_n.data_ptr<S>();
        for (int64_t k = 0; k < states; ++k)
          for (int64_t b = 0; b < B; ++b)
            std::memcpy(h + (k * B + b) * H, hs.data() + (k * B + unsorted[b]) * H, sizeof(S) * size_t(H));
      }
    });
  });
  note_cpp_backend_ran();
  return packed_result(packed, std::move(out), std::move(h_n));
}

// A sequence module's call on a PackedSequence that autograd records: the Python forward's packed
// branch (modules._pad_packed and _unpad_cpu on the CPU) made from C++ as train_impl makes the
// dense one: the data padded in its sorted batch order (pad_packed_autograd where it requires
// grad), hx in that order (index_select), the op with the lengths layer by layer, the output's
// packed rows (unpad_packed_autograd) and h_n back in the batch's order (index_select); the same
// graph, outputs and gradients (a bidirectional module's reverse directions on each row's steps
// reversed by reverse_padded, as forward's _Reversal). Declines what packed_shape declines and
// calls that RecordFunction observers see (forward's padding and reversal are then ATen's index
// ops, which they see). B=2, T=3, H=4, one thread, Zen 3 VM (ad hoc):
// a packed forward's ~150 us of Python around ~20 us of work.
py::object train_packed(PyObject* packed, PyObject* hx_obj, const at::Tensor* const* weights, int64_t nw,
                        int64_t mode, bool reset_after, int64_t layers, int64_t dirs, const std::string& backend) {
  PackedShape ps;
  if (!at::GradMode::is_enabled() ||
      at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION).has_value() ||
      !packed_shape(packed, hx_obj, weights, nw, mode, layers, dirs, ps))
    return py::none();
  const OpCalls call(weights, nw, ps.ls.per_layer, mode, reset_after, backend);
  const bool perm = ps.sorted != nullptr;
  const at::Tensor data = *ps.data, bs = THPVariable_Unpack(ps.f[1]);
  const at::Tensor si = perm ? THPVariable_Unpack(ps.f[2]) : at::Tensor();
  const at::Tensor ui = perm ? THPVariable_Unpack(ps.f[3]) : at::Tensor();
  at::Tensor hx = ps.hx != nullptr ? *ps.hx : at::Tensor(), out_data, h_n;
  {
    py::gil_scoped_release no_gil;
    at::Tensor x, lengths;
    std::tie(x, lengths) = data.requires_grad() ? pad_packed_autograd(data, bs) : pad_packed_sorted(data, bs);
    if (hx.defined() && perm) hx = hx.index_select(1, si);
    at::Tensor out;
    std::tie(out, h_n) = call.forward(x, hx, layers, dirs, lengths);
    out_data = out.requires_grad() ? unpad_packed_autograd(out, bs) : unpad_packed_sorted(out, bs);
    if (perm) h_n = h_n.index_select(1, ui);
  }
  return packed_result(packed, std::move(out_data), std::move(h_n));
}
}  // namespace

// A module's fast path, bound once to the module's parameter dict (nn.Module._parameters) and
// the names of its weights in order: a call converts two arguments, takes the weights from the
// dict (looked up again whenever the dict has changed since the last call, by its dict_version: a
// replaced, reassigned or swapped parameter is seen at once; the tensors themselves are read at
// every call, so are changes made in place), and runs infer_impl (infer_packed for a
// PackedSequence). Declines (None) what those decline, non-plain tensors, missing parameters, and calls under torch.jit.trace (which must
// record the op) or a torch dispatch mode: those see the op's call. (The module checks torch
// function modes before calling the plan: modules._calls_observed.) RecordFunction observers (the
// profiler, a global observer) see the call as an event named after the op, and the fast path
// stays on under them. (Hidden, as pybind11's own types it holds: default visibility drew a GCC
// warning for each of its py::object fields.)
class __attribute__((visibility("hidden"))) InferPlan {
 public:
  InferPlan(py::dict params, const std::vector<std::string>& names, int64_t mode, bool reset_after,
            int64_t layers, bool batch_first, bool cell, int64_t directions, std::string backend)
      : params_(std::move(params)), backend_(std::move(backend)), mode_(mode), layers_(layers), dirs_(directions),
        reset_after_(reset_after), batch_first_(batch_first), cell_(cell) {
    for (const auto& n : names) {
      py::str key(n);
      PyUnicode_InternInPlace(&key.ptr());
      names_.push_back(std::move(key));
    }
  }

  py::object call(py::handle input, py::handle hx) const {
    const bool packed = !cell_ && is_packed_sequence(input.ptr());
    const bool grad = at::GradMode::is_enabled();  // (train_impl's, where autograd records the call)
    if ((!packed && !THPVariable_CheckExact(input.ptr())) || (!hx.is_none() && !THPVariable_CheckExact(hx.ptr())) ||
        torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::any_modes_set())
      return py::none();
    // the parameters as looked up at an earlier call while the dict is unchanged since
    const uint64_t tag = dict_version(params_.ptr());
    if (tag == 0 || tag != params_tag_) {
      params_tag_ = 0;
      params_found_.clear();
      for (const auto& name : names_) {
        PyObject* p = PyDict_GetItemWithError(params_.ptr(), name.ptr());  // borrowed
        if (p == nullptr) {
          if (PyErr_Occurred()) throw py::error_already_set();
          return py::none();
        }
        params_found_.push_back(p);
      }
      params_tag_ = tag;
    }
    c10::SmallVector<const at::Tensor*, 16> w;
    // plain tensors or Parameters only, with autograd or without: a weight of a subclass with
    // __torch_function__ must see the op's call, and torch.nn's result is of its class (the
    // plan's outputs are plain tensors)
    for (PyObject* p : params_found_) {
      if (!THPVariable_CheckExact(p)) return py::none();
      w.push_back(&THPVariable_Unpack(p));
    }
    if (grad && packed)
      return train_packed(input.ptr(), hx.ptr(), w.data(), int64_t(w.size()), mode_, reset_after_, layers_,
                          dirs_, backend_);
    if (grad)
      return train_impl(THPVariable_Unpack(input.ptr()), hx.is_none() ? nullptr : &THPVariable_Unpack(hx.ptr()),
                        w.data(), int64_t(w.size()), mode_, reset_after_, layers_, batch_first_, cell_, dirs_,
                        backend_);
    if (packed) return infer_packed(input.ptr(), hx.ptr(), w.data(), int64_t(w.size()), mode_, reset_after_, layers_, dirs_);
    return infer_impl(THPVariable_Unpack(input.ptr()), hx.is_none() ? nullptr : &THPVariable_Unpack(hx.ptr()),
                      w.data(), int64_t(w.size()), mode_, reset_after_, layers_, batch_first_, cell_, dirs_,
                      &outputs_);
  }

  // The module's whole call, `module(*args)` (the classes' call slot below, or
  // modules._FastPath.__call__ outside torch.compile):
  // the plan's call where nn.Module.__call__ would call forward straight away and forward would
  // take this plan, else None. The checks are the Python ones, in C++ (they took ~1.3 of the ~7.5
  // us of a serving step there): positional input and optional hx only; nn.Module.__call__ not
  // patched by the user (the patch must see the call); no hooks on the module or
  // global ones, no module.compile(); forward is the module's own (not a subclass's override or
  // one set on the instance); no training-mode dropout; no forward-mode AD level. Where all that
  // holds but a torch function mode is on, NotImplemented: the module then looks at the modes in
  // Python (torch's DeviceContext, `with torch.device(...)`, is no reason to decline). `self` is
  // passed at each call: the plan holds no reference to it. What the checks read from a dict (the
  // module's __dict__, nn.Module's class dict, torch's two module namespaces) is kept while that
  // dict's version is unchanged (checks_; the hook dicts' sizes are read at every call): the
  // serving step's ~17 dict lookups, ~0.2 us of a ~3.8 us GRU call (ad hoc, Zen 4 VM).
  py::object module_call(py::handle self, py::tuple args) const {
    PyObject* d = PyObject_GenericGetDict(self.ptr(), nullptr);
    if (d == nullptr) throw py::error_already_set();
    const auto dict = py::reinterpret_steal<py::object>(d);
    return module_call_in(self.ptr(), args.ptr(), d);
  }

  // module_call given the module's __dict__ d (the call slot below has it already).
  py::object module_call_in(PyObject* self, PyObject* args, PyObject* d) const {
    const ModuleCallContext* c = module_call_ctx;
    const Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (c == nullptr || n < 1 || n > 2) return py::none();
    const auto lookup = [](PyObject* dict, PyObject* key) -> PyObject* {  // borrowed, or nullptr when absent
      PyObject* v = PyDict_GetItemWithError(dict, key);
      if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
      return v;
    };
    const auto truthy = [](PyObject* v) -> bool {
      if (v == nullptr) return false;
      const int t = PyObject_IsTrue(v);
      if (t < 0) throw py::error_already_set();
      return t != 0;
    };
    CallChecks& k = checks_;
    if (k.ctx != c) k = CallChecks(), k.ctx = c;
    {
      PyObject* cls_dict = ((PyTypeObject*)c->module_cls.ptr())->tp_dict;
      const uint64_t tag = dict_version(cls_dict);
      if (tag == 0 || tag != k.cls_tag) {
        k.cls_tag = 0;
        if (lookup(cls_dict, c->dunder_call) != c->torch_call.ptr()) return py::none();
        k.cls_tag = tag;
      }
    }
    {
      // the module's own attributes: no forward of the instance's, no module.compile(), no
      // training-mode dropout, no hooks. The hook dicts are kept: their contents change in place,
      // so each call reads their sizes.
      const uint64_t tag = dict_version(d);
      if (tag != 0 && d == k.module_dict && tag == k.module_tag) {
        for (PyObject* h : k.hooks)
          if (PyDict_GET_SIZE(h) != 0) return py::none();
      } else {
        k.module_tag = 0;
        k.module_dict = nullptr;
        k.hooks.clear();
        if (lookup(d, c->forward) != nullptr || lookup(d, c->call_impl) != nullptr) return py::none();
        PyObject* compiled = lookup(d, c->compiled_call_impl);
        if (compiled != nullptr && compiled != Py_None) return py::none();
        if (truthy(lookup(d, c->training)) && truthy(lookup(d, c->dropout))) return py::none();
        for (PyObject* key : c->module_hooks) {
          PyObject* h = lookup(d, key);
          if (h == nullptr) continue;
          if (!plain_hooks(h) || PyDict_GET_SIZE(h) != 0) return py::none();
          k.hooks.push_back(h);
        }
        // (not kept where Python code run above, a __bool__, changed d meanwhile)
        if (tag != 0 && dict_version(d) == tag) k.module_dict = d, k.module_tag = tag;
      }
    }
    {
      // the class attribute as stored (borrowed; a plain function's __get__ on the class returns itself)
      PyObject* fwd = _PyType_Lookup(Py_TYPE(self), c->forward);
      bool own = false;  // (a missing forward, nullptr, is none of them)
      for (const auto& f : c->own_forwards) own = own || f.ptr() == fwd;
      if (!own) return py::none();
      // (torch's _call_impl, as found along the class's MRO: nn.Module's, unpatched)
      if (_PyType_Lookup(Py_TYPE(self), c->call_impl) != c->torch_call_impl.ptr()) return py::none();
    }
    {
      // torch's global module hooks (a global missing from its module: declined)
      const uint64_t tag = dict_version(c->nn_module_dict);
      if (tag != 0 && tag == k.globals_tag) {
        for (PyObject* h : k.global_hooks)
          if (PyDict_GET_SIZE(h) != 0) return py::none();
      } else {
        k.globals_tag = 0;
        k.global_hooks.clear();
        for (PyObject* key : c->global_hooks) {
          PyObject* h = lookup(c->nn_module_dict, key);
          if (h == nullptr || !plain_hooks(h) || PyDict_GET_SIZE(h) != 0) return py::none();
          k.global_hooks.push_back(h);
        }
        k.globals_tag = tag;
      }
    }
    {
      const uint64_t tag = dict_version(c->forward_ad_dict);
      if (tag == 0 || tag != k.forward_ad_tag) {
        k.forward_ad_tag = 0;
        PyObject* level = lookup(c->forward_ad_dict, c->current_level);
        if (level == nullptr) return py::none();
        const long lv = PyLong_AsLong(level);
        if (lv == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (lv >= 0) return py::none();
        k.forward_ad_tag = tag;
      }
    }
    if (at::impl::torch_function_mode_enabled()) return py::reinterpret_borrow<py::object>(Py_NotImplemented);
    return call(PyTuple_GET_ITEM(args, 0), n == 2 ? PyTuple_GET_ITEM(args, 1) : Py_None);
  }

 private:
  // What module_call_in and call found at an earlier call, each part valid while the dict it was
  // read from keeps its version (dict_version; 0: not valid): borrowed pointers into those dicts.
  struct CallChecks {
    const ModuleCallContext* ctx = nullptr;
    uint64_t cls_tag = 0, module_tag = 0, globals_tag = 0, forward_ad_tag = 0;
    PyObject* module_dict = nullptr;
    c10::SmallVector<PyObject*, 4> hooks, global_hooks;
  };
  mutable CallChecks checks_;
  mutable OutputRing outputs_;  // (see OutputRing)
  mutable uint64_t params_tag_ = 0;
  mutable c10::SmallVector<PyObject*, 16> params_found_;
  py::dict params_;
  std::vector<py::str> names_;
  std::string backend_;  // the module's ("auto" or "cpp"): the op's argument in train_impl's calls
  int64_t mode_, layers_, dirs_;
  bool reset_after_, batch_first_, cell_;
};

// The call slot of rnnrec_fast's own module classes (RNN, GRU, RNNCell, GRUCell; not their
// subclasses). `module(x, h)` runs the type's tp_call; a Python class's is CPython's slot_tp_call,
// which looks __call__ up and runs its Python frame (~0.6 us of a ~7 us serving step here).
// install_call_slot gives the classes module_call_slot instead, which does in C++ what
// modules._FastPath.__call__ does first (the plan's module_call, for calls without keyword
// arguments) and hands every other call on as it would: the rest of the call to
// _FastPath._call_after, or, where the module's plan is not an InferPlan (a Python backend's, or
// none), the whole call to _FastPath.__call__. That Python __call__ stays the classes' attribute:
// torch.compile traces it (the slot only ever sees eager calls), subclasses run it, and assigning
// or deleting a class's __call__ makes CPython reset the slot to the Python one (__call__ installs
// this slot again at the class's next call where the class's __call__ is _FastPath's again).
namespace {
struct CallSlot {
  PyTypeObject* plan_type;  // InferPlan's
  PyObject* py_call;        // _FastPath.__call__
  PyObject* call_after;     // _FastPath._call_after(module, args, kwargs, tried)
  PyObject* plan_key;       // "_plan"
};
const CallSlot* call_slot = nullptr;  // never freed: it lives as long as the interpreter

PyObject* module_call_slot(PyObject* self, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  const CallSlot* s = call_slot;
  PyObject* d = PyObject_GenericGetDict(self, nullptr);
  if (d == nullptr) throw py::error_already_set();
  const auto dict = py::reinterpret_steal<py::object>(d);
  // The plan: the last call's while its module's dict is that call's, unchanged (dict_version;
  // borrowed from the dict; the GIL serialises these calls).
  static PyObject *last_dict = nullptr, *last_plan = nullptr;
  static uint64_t last_tag = 0;
  const uint64_t tag = dict_version(d);
  PyObject* plan;
  if (tag != 0 && d == last_dict && tag == last_tag) {
    plan = last_plan;
  } else {
    plan = PyDict_GetItemWithError(d, s->plan_key);
    if (plan == nullptr && PyErr_Occurred()) throw py::error_already_set();
    if (plan != nullptr && tag != 0) last_dict = d, last_plan = plan, last_tag = tag;
  }
  // (held: a large call lets other threads run, and one could replace the module's plan meanwhile)
  const auto plan_ref = py::reinterpret_borrow<py::object>(plan);
  if (plan == nullptr || Py_TYPE(plan) != s->plan_type) {  // _FastPath.__call__(self, *args, **kwargs)
    const Py_ssize_t n = PyTuple_GET_SIZE(args);
    c10::SmallVector<PyObject*, 4> argv{self};
    for (Py_ssize_t i = 0; i < n; ++i) argv.push_back(PyTuple_GET_ITEM(args, i));
    return PyObject_VectorcallDict(s->py_call, argv.data(), size_t(n + 1), kwargs);
  }
  const bool no_kwargs = kwargs == nullptr || PyDict_GET_SIZE(kwargs) == 0;
  py::object tried = py::none();
  if (no_kwargs) {
    // (the plan's C++ object straight from its pybind11 instance, which is of InferPlan's own type
    // exactly: py::cast looks the type up in pybind11's tables at every call; a plan never
    // initialised, InferPlan.__new__ alone, has no value there and goes through the cast's error)
    auto* inst = reinterpret_cast<py::detail::instance*>(plan);
    const auto* p = static_cast<const InferPlan*>(inst->get_value_and_holder().value_ptr());
    tried = (p != nullptr ? *p : py::handle(plan).cast<const InferPlan&>()).module_call_in(self, args, d);
    if (!tried.is_none() && tried.ptr() != Py_NotImplemented) return tried.release().ptr();
  }
  // (a copy, as a Python **kwargs parameter would get: the caller's dict is not handed on)
  const py::object kw = no_kwargs ? py::dict() : py::reinterpret_steal<py::object>(PyDict_Copy(kwargs));
  if (!kw) throw py::error_already_set();
  PyObject* argv[4] = {self, args, kw.ptr(), tried.ptr()};
  return PyObject_Vectorcall(s->call_after, argv, 4, nullptr);
  END_HANDLE_TH_ERRORS
}
}  // namespace

void install_call_slot(py::tuple classes, py::object py_call, py::object call_after) {
  for (const auto& cls : classes)
    TORCH_CHECK_TYPE(PyType_Check(cls.ptr()) && (reinterpret_cast<PyTypeObject*>(cls.ptr())->tp_flags & Py_TPFLAGS_HEAPTYPE),
                     "install_call_slot: Python classes expected");
  auto* s = new CallSlot();
  s->plan_type = reinterpret_cast<PyTypeObject*>(py::type::of<InferPlan>().ptr());
  s->py_call = py_call.release().ptr();
  s->call_after = call_after.release().ptr();
  s->plan_key = PyUnicode_InternFromString("_plan");
  if (s->plan_key == nullptr) throw py::error_already_set();
  call_slot = s;  // (a second call, a reloaded rnnrec_fast.modules, replaces it; the first is kept: it may be in use)
  for (const auto& cls : classes)
    reinterpret_cast<PyTypeObject*>(cls.ptr())->tp_call = module_call_slot;
}

bool has_call_slot(py::handle cls) {
  return PyType_Check(cls.ptr()) && reinterpret_cast<PyTypeObject*>(cls.ptr())->tp_call == module_call_slot;
}

namespace {
// t's values in plain memory, for the calls below that read it by pointer: a tensor with the
// negative or conjugate bit (a lazily negated view: torch._neg_view) resolved, an efficient zero
// tensor (torch._efficientzerotensor, no memory) made of zeros; in t's own layout (plain_values,
// where the caller checks the layout itself) or contiguous (contiguous_values).
at::Tensor plain_values(const at::Tensor& t) {
  if (t._is_zerotensor()) return at::zeros(t.sizes(), t.options());
  return t.resolve_conj().resolve_neg();
}
at::Tensor contiguous_values(const at::Tensor& t) { return plain_values(t).contiguous(); }

// A PackedSequence's batch_sizes (checked as pad_packed_sorted / unpad_packed_sorted take them),
// contiguous: positive, non-increasing, summing to the packed rows N (N < 0: any sum, returned).
at::Tensor checked_batch_sizes(const char* where, const at::Tensor& batch_sizes, int64_t& N) {
  TORCH_CHECK_VALUE(batch_sizes.dim() == 1 && batch_sizes.numel() > 0 && batch_sizes.scalar_type() == at::kLong &&
                    batch_sizes.device().is_cpu(),
                    where, "batch_sizes must be a non-empty 1-D int64 CPU tensor");
  check_within_storage(where, "batch_sizes", batch_sizes);
  at::Tensor bsc = batch_sizes.contiguous();
  const int64_t* bs = bsc.data_ptr<int64_t>();
  int64_t sum = 0;
  for (int64_t t = 0; t < bsc.numel(); ++t) {
    TORCH_CHECK_VALUE(bs[t] >= 1 && (t == 0 || bs[t] <= bs[t - 1]), where,
                      "batch_sizes must be positive and non-increasing");
    sum += bs[t];
  }
  TORCH_CHECK_VALUE(N < 0 || sum == N, where, "batch_sizes sum to ", sum, ", the packed data has ", N, " rows");
  N = sum;
  return bsc;
}
}  // namespace

// A PackedSequence's data (N, C) padded to (T, B, C) in its sorted batch order (step t's rows are
// its first batch_sizes[t], zeros after them), and each sorted entry's length (B,): the modules'
// padding of a PackedSequence on the CPU (one copy and one fill a step, ~40-80 us of ATen ops at
// B32 T20 H100 before; with autograd, modules._PackedPad, whose backward is unpad_packed_sorted).
// Refuses batch sizes that are not positive, non-increasing and summing to N.
std::tuple<at::Tensor, at::Tensor> pad_packed_sorted(const at::Tensor& data, const at::Tensor& batch_sizes) {
  const char* where = "rnnrec_fast pad_packed_sorted: ";
  TORCH_CHECK_VALUE(data.dim() == 2 && data.device().is_cpu() && data.is_floating_point() && data.layout() == at::kStrided,
                    where, "data must be a 2-D floating CPU tensor, got ", data.sizes(), " ", data.scalar_type(),
                    " on ", data.device());
  check_within_storage(where, "data", data);
  int64_t N = data.size(0);
  const at::Tensor bsc = checked_batch_sizes(where, batch_sizes, N);
  const int64_t* bs = bsc.data_ptr<int64_t>();
  const int64_t T = bsc.numel(), B = bs[0], C = data.size(1);
  const at::Tensor dc = contiguous_values(data);
  at::Tensor x = empty_pooled({T, B, C}, dc.options());
  at::Tensor lengths = at::zeros({B}, bsc.options());
  pad_steps(bs, T, B, size_t(C) * dc.element_size(), static_cast<const char*>(dc.data_ptr()),
            static_cast<char*>(x.data_ptr()), lengths.data_ptr<int64_t>());
  return {x, lengths};
}

// The inverse: a padded (T, B, C) sequence in a PackedSequence's sorted batch order back to its
// packed rows (N, C), step t's first batch_sizes[t] (a copy a step): the modules' output of a
// PackedSequence, and the gradient of pad_packed_sorted (modules._PackedUnpad / _PackedPad).
at::Tensor unpad_packed_sorted(const at::Tensor& padded, const at::Tensor& batch_sizes) {
  const char* where = "rnnrec_fast unpad_packed_sorted: ";
  TORCH_CHECK_VALUE(padded.dim() == 3 && padded.device().is_cpu() && padded.is_floating_point() &&
                    padded.layout() == at::kStrided,
                    where, "padded must be a 3-D floating CPU tensor, got ", padded.sizes(), " ", padded.scalar_type(),
                    " on ", padded.device());
  check_within_storage(where, "padded", padded);
  int64_t N = -1;
  const at::Tensor bsc = checked_batch_sizes(where, batch_sizes, N);
  const int64_t* bs = bsc.data_ptr<int64_t>();
  const int64_t T = bsc.numel(), B = padded.size(1), C = padded.size(2);
  TORCH_CHECK_VALUE(padded.size(0) == T && bs[0] == B, where, "padded must be (", T, ", ", bs[0], ", C) for these ",
                    "batch_sizes, got ", padded.sizes());
  const at::Tensor pc = contiguous_values(padded);
  at::Tensor data = at::empty({N, C}, pc.options());
  unpad_steps(bs, T, B, size_t(C) * pc.element_size(), static_cast<const char*>(pc.data_ptr()),
              static_cast<char*>(data.data_ptr()));
  return data;
}

// Each row's first lengths[b] steps of a padded sequence x (T, B, C) in reverse order, its padding
// steps (t >= lengths[b]) where they are: the input and the output of a bidirectional module's
// reverse direction on a padded PackedSequence (modules._Reversal, train_packed). A
// permutation of x's (T * B) C-vectors that is its own inverse (and so its own adjoint: the
// backward of reverse_padded_autograd is itself). Where ATen's index_select over a per-row index
// had an index_add as its backward (~160 us a call at B32 T20 H100, one thread, Zen 3 VM, ad hoc).
// Refuses lengths that are not a 1-D int64 CPU tensor of B entries in [0, T].
at::Tensor reverse_padded(const at::Tensor& x, const at::Tensor& lengths) {
  const char* where = "rnnrec_fast reverse_padded: ";
  TORCH_CHECK_VALUE(x.dim() == 3 && x.device().is_cpu() && x.layout() == at::kStrided, where,
                    "x must be a 3-D strided CPU tensor (T, B, C), got ", x.sizes(), " on ", x.device());
  const int64_t T = x.size(0), B = x.size(1), C = x.size(2);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.numel() == B && lengths.scalar_type() == at::kLong &&
                    lengths.device().is_cpu() && lengths.layout() == at::kStrided,
                    where, "lengths must be a 1-D int64 CPU tensor of ", B, " entries (x's batch), got ",
                    lengths.sizes(), " ", lengths.scalar_type(), " on ", lengths.device());
  check_within_storage(where, "x", x);
  check_within_storage(where, "lengths", lengths);
  const at::Tensor lc = lengths.contiguous();
  const int64_t* len = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= T, where, "lengths must lie in [0, ", T, "] (x's steps), got ",
                      len[b], " at ", b);
  const at::Tensor xc = contiguous_values(x);
  at::Tensor y = at::empty({T, B, C}, xc.options());
  const size_t row = size_t(C) * xc.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(y.data_ptr());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t from = t < len[b] ? len[b] - 1 - t : t;
      std::memcpy(dst + size_t(t * B + b) * row, src + size_t(from * B + b) * row, row);
    }
  return y;
}

// With autograd (the modules' PackedSequence calls where autograd records them: modules._pad_packed,
// _unpad_cpu, _Reversal, and train_packed): the padding and its inverse as C++ autograd
// functions, each the other's adjoint, and the per-row reversal, its own, so each backward is
// differentiable again. (They were Python autograd Functions:
// each call and each backward was a Python frame, ~30 us a piece on the Zen 3 VM, ad hoc.)
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct PackedUnpadFn;
struct PackedPadFn : public torch::autograd::Function<PackedPadFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& data, const at::Tensor& batch_sizes) {
    ctx->saved_data["batch_sizes"] = batch_sizes;
    auto [x, lengths] = pad_packed_sorted(data, batch_sizes);
    ctx->mark_non_differentiable({lengths});
    return {x, lengths};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

struct PackedUnpadFn : public torch::autograd::Function<PackedUnpadFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& padded, const at::Tensor& batch_sizes) {
    ctx->saved_data["batch_sizes"] = batch_sizes;
    return {unpad_packed_sorted(padded, batch_sizes)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    return {PackedPadFn::apply(grads[0], ctx->saved_data["batch_sizes"].toTensor())[0], at::Tensor()};
  }
};

variable_list PackedPadFn::backward(AutogradContext* ctx, variable_list grads) {
  if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
  return {PackedUnpadFn::apply(grads[0], ctx->saved_data["batch_sizes"].toTensor())[0], at::Tensor()};
}

struct ReversePaddedFn : public torch::autograd::Function<ReversePaddedFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lengths) {
    ctx->saved_data["lengths"] = lengths;
    return reverse_padded(x, lengths);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    return {ReversePaddedFn::apply(grads[0], ctx->saved_data["lengths"].toTensor()), at::Tensor()};
  }
};
}  // namespace

std::tuple<at::Tensor, at::Tensor> pad_packed_autograd(const at::Tensor& data, const at::Tensor& batch_sizes) {
  auto r = PackedPadFn::apply(data, batch_sizes);
  return {r[0], r[1]};
}

at::Tensor unpad_packed_autograd(const at::Tensor& padded, const at::Tensor& batch_sizes) {
  return PackedUnpadFn::apply(padded, batch_sizes)[0];
}

at::Tensor reverse_padded_autograd(const at::Tensor& x, const at::Tensor& lengths) {
  return ReversePaddedFn::apply(x, lengths);
}

// out = x W^T (+ b) for a few rows of x: the serving path's scores against the whole catalogue.
// float32 CPU rows (at most 8) on a CPU with the vector kernels and without autograd to record go
// to few_rows_nt (the catalogue streamed once, split over threads); anything else to ATen.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK_VALUE(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1),
                    "rnnrec_fast linear_rows: x (M, K) and W (N, K) expected, got ", x.sizes(), " and ", W.sizes());
  const bool has_b = b.has_value() && b->defined();
  if (has_b)
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == W.size(0), "rnnrec_fast linear_rows: b must be (",
                      W.size(0), ",), got ", b->sizes());
  check_within_storage("rnnrec_fast linear_rows: ", "x", x);
  check_within_storage("rnnrec_fast linear_rows: ", "W", W);
  if (has_b) check_within_storage("rnnrec_fast linear_rows: ", "b", *b);
#if defined(RNNREC_HAVE_AVX2_TU)
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || W.requires_grad() || (has_b && b->requires_grad()));
  // (a tensor with the negative bit holds its values' negation, an efficient zero tensor no memory:
  // ATen resolves both)
  const auto unusual = [](const at::Tensor& t) { return t.is_neg() || t._is_zerotensor(); };
  const bool neg = unusual(x) || unusual(W) || (has_b && unusual(*b));
  if (!grad && !neg && simd_enabled() && x.size(0) >= 1 && x.size(0) <= 8 && x.size(1) > 0 && x.scalar_type() == at::kFloat &&
      W.scalar_type() == at::kFloat && x.device().is_cpu() && W.device().is_cpu() &&
      (!has_b || (b->scalar_type() == at::kFloat && b->device().is_cpu()))) {
    const at::Tensor xc = x.contiguous(), Wc = W.contiguous();
    const int64_t M = xc.size(0), N = Wc.size(0), K = Wc.size(1);
    at::Tensor out = at::empty({M, N}, xc.options());
    few_rows_nt(M, N, K, Wc.data_ptr<float>(), K, xc.data_ptr<float>(), K, out.data_ptr<float>(), N);
    if (has_b) out.add_(*b);
    return out;
  }
#endif
  return has_b ? at::addmm(*b, x, W.t()) : at::mm(x, W.t());
}

// The k largest of s[0..N) into vals/idx, best first. NaN ranks above every number, as in
// torch.topk; among equal values the lower index comes first. Small k: one pass that keeps them in
// a sorted array (a new entry shifts at most k - 1 others; k = 20 of 2,933 scores ~4x faster than
// the selection below). Larger k, where that array costs O(N k) (k = 30,000 of 30,000 took 186 ms):
// select_topk_large. The AVX2 pass (a first pass bounds the k-th score for k <= 64) keeps the
// sorted array up to k = 64: standalone C++, Zen 3, rows of 2,933 N(0, 1) scores, per row k = 33
// 2.6 against 12.3 us for a partial sort of keys, k = 48 4.5 / 14.0, k = 64 8.6 / 17.5.
constexpr int64_t kTopkInsertMax = 32;
constexpr int64_t kTopkInsertMaxAvx2 = 64;

// Scores s[j], j from j0 on, above thr or NaN, appended to keys[n..cap) as topk_key(s[j], j) in
// index order until cap are held; returns the first j not looked at. (The scalar pass; where the
// vector kernels run, avx2_collect_above_f32 takes the whole vectors first and this the rest.)
inline int64_t collect_above(const float* __restrict s, int64_t j0, int64_t N, float thr, uint64_t* __restrict keys,
                             int64_t& n, int64_t cap) {
  int64_t j = j0;
  for (; j < N && n < cap; ++j) {
    const float v = s[j];
    if (v > thr || std::isnan(v)) keys[n++] = topk_key(v, j);
  }
  return j;
}

// select_topk for larger k (N < 2^32): a buffer of keys (topk_key: their ascending order is the
// selection's) for cap = 3k scores. It is filled with the first cap scores; then, until every
// score has been looked at, the k best of the buffer are moved to its front (nth_element), the
// k-th of them is the bound thr, and the buffer is refilled from the scores still to come that
// beat it: a later score equal to thr ranks below it (its index is higher), so only scores above
// thr, or NaN, can enter the k best. Scores in random order enter ~k ln(N / k) times; in ascending
// order every score enters, and each round of nth_element over 3k keys takes in 2k new ones: O(N)
// even then. The scan is the cost: avx2_collect_above_f32 tests 8 scores at a time. The k best are
// sorted last. Standalone C++, one thread, Zen 3, per row of N(0, 1) scores, against the partial
// sort of all N keys this replaced: N = 2,933 k = 100 15 against 37 us, k = 500 44 / 93, k = 1,000
// 70 / 71 (cap >= N: one nth_element); N = 100,000 k = 100 49 / 696 us, k = 1,000 210 / 979.
inline void select_topk_large(const float* __restrict s, int64_t N, int64_t k, float* __restrict vals,
                              int64_t* __restrict idx) {
  thread_local std::vector<uint64_t> buf;
  const int64_t cap = std::min(N, std::max<int64_t>(3 * k, 64));
  buf.resize(size_t(cap));
  uint64_t* keys = buf.data();
  int64_t n = 0, j = 0;
  for (; j < cap; ++j) keys[n++] = topk_key(s[j], j);
  while (j < N) {
    std::nth_element(keys, keys + (k - 1), keys + n);
    n = k;
    const float thr = s[keys[k - 1] & 0xFFFFFFFFu];
    if (std::isnan(thr)) break;  // k NaN held: a later NaN ranks below them, anything else too
#if defined(RNNREC_HAVE_AVX2_TU)
    if (simd_enabled()) j = avx2_collect_above_f32(s, j, N, thr, keys, &n, cap);
#endif
    j = collect_above(s, j, N, thr, keys, n, cap);
  }
  if (n > k) std::nth_element(keys, keys + (k - 1), keys + n);
  std::sort(keys, keys + k);
  for (int64_t i = 0; i < k; ++i) {
    idx[i] = int64_t(keys[i] & 0xFFFFFFFFu);
    vals[i] = s[idx[i]];
  }
}

inline void select_topk(const float* __restrict s, int64_t N, int64_t k, float* __restrict vals,
                        int64_t* __restrict idx) {
#if defined(RNNREC_HAVE_AVX2_TU)
  if (simd_enabled() && (k <= kTopkInsertMaxAvx2 || N >= (int64_t(1) << 32)))
    return avx2_select_topk_f32(s, N, k, vals, idx);  // (this pass, 8 scores at a time)
#endif
  if (k > kTopkInsertMax && N < (int64_t(1) << 32)) return select_topk_large(s, N, k, vals, idx);
  const auto better = [](float a, float c) { return std::isnan(a) ? !std::isnan(c) : (!std::isnan(c) && a > c); };
  int64_t cnt = 0;
  float thr = 0.0f;  // vals[k - 1] once k values are held
  for (int64_t j = 0; j < N; ++j) {
    const float v = s[j];
    int64_t pos;
    if (cnt < k) {
      pos = cnt++;
    } else {
      if (v <= thr || !better(v, thr)) continue;  // the first test settles nearly every element
      pos = k - 1;
    }
    while (pos > 0 && better(v, vals[pos - 1])) {
      vals[pos] = vals[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    vals[pos] = v;
    idx[pos] = j;
    if (cnt == k) thr = vals[k - 1];
  }
}

// torch.topk(scores, k, dim=1) for a float32 CPU (M, N) matrix, by select_topk per row (in
// parallel over rows): the serving batch's top-k (k=20 of 2,933 items, 64 rows, one thread: ~360 us
// against torch.topk's ~546 us, timed in a loop here; the same at two threads).
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(),
                    "rnnrec_fast topk_rows: scores must be a float32 CPU (M, N) matrix, got ", scores.sizes());
  const int64_t M = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "rnnrec_fast topk_rows: k must be in [1, ", N, "], got ", k);
  check_within_storage("rnnrec_fast topk_rows: ", "scores", scores);
  const at::Tensor sc = contiguous_values(scores);
  at::Tensor vals = at::empty({M, k}, sc.options()), idx = at::empty({M, k}, sc.options().dtype(at::kLong));
  const float* sp = sc.data_ptr<float>();
  float* vp = vals.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) select_topk(sp + r * N, N, k, vp + r * k, ip + r * k);
  });
  return std::make_tuple(vals, idx);
}

// The serving click's scores and top-k in one call: s = W h + b for one state h (H,) against the
// catalogue W (N, H) (few_rows_nt into a per-thread buffer where the vector kernels run, else
// at::mv), the excluded items set to -inf, then one pass that keeps the k best in a sorted array
// (NaN ranks above every number, as in torch.topk; among equal scores the lower index comes
// first). Returns (scores, indices) as Python lists, best first: no tensors to build or convert.
// score_topk's and click_topk's end: s[0..N) += bias, the excluded items at -inf, the k best as
// Python lists (scores, indices), best first
static py::tuple scores_topk_lists(float* s, int64_t N, const float* bias, int64_t k, const std::vector<int64_t>& exclude) {
  for (int64_t j = 0; j < N; ++j) s[j] += bias[j];
  for (const int64_t j : exclude) s[j] = -std::numeric_limits<float>::infinity();
  std::vector<float> bv(static_cast<size_t>(k));
  std::vector<int64_t> bi(static_cast<size_t>(k));
  select_topk(s, N, k, bv.data(), bi.data());
  py::list vals(k), idx(k);
  for (int64_t i = 0; i < k; ++i) {
    vals[size_t(i)] = py::float_(double(bv[size_t(i)]));
    idx[size_t(i)] = py::int_(bi[size_t(i)]);
  }
  return py::make_tuple(vals, idx);
}

py::tuple score_topk(const at::Tensor& h_in, const at::Tensor& W_in, const at::Tensor& b_in, int64_t k,
                     const std::vector<int64_t>& exclude) {
  check_within_storage("rnnrec_fast score_topk: ", "h", h_in);
  check_within_storage("rnnrec_fast score_topk: ", "W", W_in);
  check_within_storage("rnnrec_fast score_topk: ", "b", b_in);
  const at::Tensor h = plain_values(h_in), W = plain_values(W_in), b = plain_values(b_in);
  TORCH_CHECK_VALUE(W.dim() == 2 && W.scalar_type() == at::kFloat && W.device().is_cpu() && W.is_contiguous(),
                    "rnnrec_fast score_topk: W must be a contiguous float32 CPU (N, H) matrix");
  const int64_t N = W.size(0), H = W.size(1);
  TORCH_CHECK_VALUE(h.numel() == H && h.scalar_type() == at::kFloat && h.device().is_cpu(),
                    "rnnrec_fast score_topk: h must hold H = ", H, " float32 values on the CPU, got ", h.sizes());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N && b.scalar_type() == at::kFloat && b.device().is_cpu(),
                    "rnnrec_fast score_topk: b must be a float32 CPU (", N, ",) vector");
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "rnnrec_fast score_topk: k must be in [1, ", N, "], got ", k);
  for (const int64_t j : exclude)
    TORCH_CHECK_VALUE(j >= 0 && j < N, "rnnrec_fast score_topk: excluded index ", j, " out of [0, ", N, ")");
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < N) buf.resize(size_t(N));
  float* s = buf.data();
  const at::Tensor hc = h.contiguous().view({H}), bc = b.contiguous();
#if defined(RNNREC_HAVE_AVX2_TU)
  if (simd_enabled()) {
    few_rows_nt(1, N, H, W.data_ptr<float>(), H, hc.data_ptr<float>(), H, s, N);
  } else
#endif
  {
    const at::Tensor sv = at::mv(W, hc);
    std::memcpy(s, sv.data_ptr<float>(), sizeof(float) * size_t(N));
  }
  return scores_topk_lists(s, N, bc.data_ptr<float>(), k, exclude);
}

#if defined(RNNREC_HAVE_AVX2_TU)
// A plain contiguous float32 CPU tensor of dim dimensions, read and written by pointer (the
// scoring and click entry points decline anything else).
static bool plain_f32(const at::Tensor& t, int64_t dim) {
  return t.defined() && t.dim() == dim && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
         t.layout() == at::kStrided && t.is_contiguous() && plain_memory(t);
}

// Whether the clicks may write a session store's slab in place here, as the general path's copy_
// would: not an inference tensor outside inference mode (copy_ raises: the general path says so),
// not a leaf that requires grad where autograd records (only where it records nothing).
static bool writable_here(const at::Tensor& slab) {
  return !(slab.is_inference() && !c10::InferenceMode::is_enabled()) &&
         !(slab.requires_grad() && at::GradMode::is_enabled());
}

// The scores of a batch's rows held in scratch at most, 16 MiB: a larger batch is scored in
// blocks of rows (of one row at least).
constexpr int64_t kRowsTopkMaxScores = int64_t(4) << 20;

// The rows of a batch of M rows over N items that RowsTopk scores at a time: all of them where
// their scores fit in kRowsTopkMaxScores, else as few blocks of equal rows as do (one row at least).
static int64_t rows_topk_block(int64_t M, int64_t N) {
  const int64_t fit = std::max<int64_t>(1, kRowsTopkMaxScores / std::max<int64_t>(N, 1));
  if (M <= fit) return M;
  const int64_t blocks = (M + fit - 1) / fit;
  return (M + blocks - 1) / blocks;
}

// A ValueError for arguments of RowsTopk (below) it cannot take: W not (N, H) with N the bias's
// length, packed weights not of W's size, k out of [1, N], not one exclude list per row (or none),
// an excluded index out of [0, N). (W itself is not read: the packed copy is, which its caller
// keeps in step with W.)
static void check_rows_topk_args(const char* where, const GemmKernels& g, int64_t M, int64_t H, const at::Tensor& W,
                                 const at::Tensor& packed, int64_t N, int64_t k,
                                 const std::vector<std::vector<int64_t>>& exclude) {
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(0) == N && W.size(1) == H, where, "W must be (", N, ", ", H,
                    ") as the bias and the states say, got ", W.sizes());
  TORCH_CHECK_VALUE(H > 0 && N > 0 && packed.numel() == g.packed_size(H, N), where, "packed weights for (", N,
                    ", ", H, ") expected, got ", packed.numel(), " floats");
  TORCH_CHECK_VALUE(k >= 1 && k <= N, where, "k must be in [1, ", N, "], got ", k);
  TORCH_CHECK_VALUE(exclude.empty() || int64_t(exclude.size()) == M, where, exclude.size(), " exclude lists for ",
                    M, " rows");
  for (const auto& row : exclude)
    for (const int64_t j : row) TORCH_CHECK_VALUE(j >= 0 && j < N, where, "excluded index ", j, " out of [0, ", N, ")");
}

// score_topk_rows' work on checked arguments, in two parts: RowsTopk(M, k, N) takes every
// allocation (the result tensors, the scores' scratch: rows_topk_block's rows), so that a caller
// can have them before it changes anything (click_rows_topk: before the states are written back);
// run(h, ...) fills them from h (M, H) floats, packed by pack_scores_weights for (N, H), bias b
// (N), exclude empty or one list of indices in [0, N) per row, a block of rows at a time, without
// the GIL (it touches no Python object).
struct RowsTopk {
  at::Tensor vals, idx;
  int64_t rows;
  Buf<float> s;
  RowsTopk(int64_t M, int64_t k, int64_t N)
      : vals(at::empty({M, k}, at::TensorOptions().dtype(at::kFloat))),
        idx(at::empty({M, k}, at::TensorOptions().dtype(at::kLong))),
        rows(rows_topk_block(M, N)),
        s(rows * N) {}
  void run(const float* h, int64_t M, int64_t H, const float* packed, const float* bp, int64_t N, int64_t k,
           const std::vector<std::vector<int64_t>>& exclude) {
    float* sp = s.data();
    float* vp = vals.data_ptr<float>();
    int64_t* ip = idx.data_ptr<int64_t>();
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t first = 0; first < M; first += rows) {
      const int64_t m = std::min(rows, M - first);
      packed_rows(m, N, H, h + first * H, H, 1, packed, false, sp, N);
      at::parallel_for(0, m, std::max<int64_t>(1, 65536 / N), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* row = sp + r * N;
          for (int64_t j = 0; j < N; ++j) row[j] += bp[j];
          if (!exclude.empty())
            for (const int64_t j : exclude[size_t(first + r)]) row[j] = ninf;
          select_topk(row, N, k, vp + (first + r) * k, ip + (first + r) * k);
        }
      });
    }
  }
  py::tuple result() const { return py::make_tuple(vals, idx); }
};
#endif

// The catalogue's weights W (N, H) packed as this CPU's packed-B GEMM kernels read W^T, for
// score_topk_rows: a float32 tensor, or None where those kernels do not run (no AVX2) or W is not a
// plain contiguous float32 CPU matrix. A copy: it does not follow later changes of W.
py::object pack_scores_weights(const at::Tensor& W) {
#if defined(RNNREC_HAVE_AVX2_TU)
  const GemmKernels* g = fast_gemm();
  if (g != nullptr && plain_f32(W, 2) && W.size(0) > 0 && W.size(1) > 0) {
    const int64_t N = W.size(0), H = W.size(1);
    at::Tensor out = at::empty({g->packed_size(H, N)}, W.options());
    g->pack_b(true, H, N, W.data_ptr<float>(), H, out.data_ptr<float>());
    return py::cast(out);
  }
#else
  (void)W;
#endif
  return py::none();
}

// The serving batch's top-k in one call: for each row of h (M, H), the scores h W^T + b against
// the catalogue (W packed by pack_scores_weights), that row's excluded items at -inf, and its k
// best (select_topk: NaN above every number, equal scores in index order, as topk_rows). One
// packed GEMM over all rows (split over threads by rows) into scratch, then the selection per row
// (in parallel over rows): no scores tensor, and the GEMM kernel of the training path, faster than
// oneDNN's on the Zen 3 VM (64 x 100 x 2,933: ~400 against ~470 us, one thread; 40 x 100 x 100k:
// 15.2 against 21.7 ms with topk_rows). Over 16 MiB of scores, in blocks of rows. Returns
// (values (M, k), indices (M, k) int64), or None where it does not apply (no packed kernels; h not
// a plain contiguous float32 CPU matrix; autograd to record), then the caller scores and selects
// as before. exclude: empty, or one list per row. Bad shapes, k or
// excluded indices raise a ValueError.
py::object score_topk_rows(const at::Tensor& h, const at::Tensor& W, const at::Tensor& packed, const at::Tensor& b,
                           int64_t k, const std::vector<std::vector<int64_t>>& exclude) {
#if defined(RNNREC_HAVE_AVX2_TU)
  const GemmKernels* g = fast_gemm();
  if (g == nullptr || !plain_f32(h, 2) || !plain_f32(packed, 1) || !plain_f32(b, 1)) return py::none();
  if (at::GradMode::is_enabled() && (h.requires_grad() || b.requires_grad())) return py::none();
  const int64_t M = h.size(0), H = h.size(1), N = b.size(0);
  check_rows_topk_args("rnnrec_fast score_topk_rows: ", *g, M, H, W, packed, N, k, exclude);
  RowsTopk out(M, k, N);
  // (snapshots on the same memory, which they keep alive, as with_weights_held's: the serving fast
  // path passes copies of its own, but a direct caller's tensor may be given other memory by
  // another thread meanwhile)
  const at::Tensor h_held = h.variable_data(), packed_held = packed.variable_data(), b_held = b.variable_data();
  {
    py::gil_scoped_release no_gil;  // (the scores and selection: ~0.5 ms at 64 x 2,933)
    out.run(h_held.data_ptr<float>(), M, H, packed_held.data_ptr<float>(), b_held.data_ptr<float>(), N, k, exclude);
  }
  return out.result();
#else
  (void)h, (void)W, (void)packed, (void)b, (void)k, (void)exclude;
  return py::none();
#endif
}

#if defined(RNNREC_HAVE_AVX2_TU)
// The declines click_topk and click_rows_topk share (false: the caller returns None, nothing
// changed): the vector kernels off, a torch.func transform, the embeddings (items x I), the slab
// (slots x L x H) or the bias (N) not plain contiguous float32 CPU tensors, a slab not writable
// here, an I, H or N of 0, a slab of other than L = weights / 4 layers, weights not L GRU layers
// (w_ih, w_hh, b_ih, b_hh) of float32 for (I, H). Where it takes the call, w holds the weights.
static bool click_takes(const at::Tensor& emb, const at::Tensor& slab, const at::Tensor& b,
                        const std::vector<at::Tensor>& weights, c10::SmallVector<const at::Tensor*, 16>& w) {
  const int64_t nw = int64_t(weights.size()), L = nw / 4;
  if (!simd_enabled() || nw == 0 || nw % 4 != 0 ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    return false;
  if (!plain_f32(emb, 2) || !plain_f32(slab, 3) || !plain_f32(b, 1) || !writable_here(slab)) return false;
  const int64_t I = emb.size(1), H = slab.size(2);
  if (H == 0 || I == 0 || b.size(0) == 0 || slab.size(1) != L) return false;
  for (const at::Tensor& t : weights) w.push_back(&t);
  return weights_fit(w.data(), L, 1, 4, 3, I, H, at::kFloat);
}

// projected0 (GRU4Rec's one-hot input: each item's embedding row is already the first layer's
// input projection, its W_ih the identity, which is then not read) needs rows of the gates' width.
static void check_projected0(const char* where, bool projected0, int64_t I, int64_t GH) {
  TORCH_CHECK_VALUE(!projected0 || I == GH, where, "projected0 needs embedding rows of ", GH,
                    " values (the first layer's input projection), got ", I);
}
#endif

// The serving click in one call (SessionRecommender.click through serving.fastpath): one step of
// a GRU4Rec's GRU layers for one session from its state row in the store's slab (slab[slot], L x
// H), the new state written back there, then score_topk's scores and top k for its top layer's new
// state. The same kernels as the separate calls it replaces (infer's layers, score_topk's product
// and selection), so the same bits; without the Python and ATen glue between them (torch.no_grad,
// the embedding row's and the state row's views, the state's copy back, the top layer's view, a
// second argument parsing): ~10 us of a ~60 us click over 2,933 items at H = 100 on the Zen 3 VM.
// weights: each layer's w_ih, w_hh, b_ih, b_hh; projected0: emb's rows are the first layer's input
// projection (a one-hot GRU4Rec's W0, its w_ih the identity, which is not read: the same bits as
// with the product for finite rows; a non-finite value's products with the identity's zeros would
// have made every gate NaN). Declines (None, nothing changed) what it does not
// handle: anything but plain contiguous float32 CPU tensors of the expected shapes, a CPU without
// the vector kernels, a torch.func transform; the caller then takes its general path. A bad item,
// slot, k or excluded index raises a ValueError before anything changes.
py::object click_topk(const at::Tensor& emb, int64_t idx, const at::Tensor& slab, int64_t slot,
                      const std::vector<at::Tensor>& weights, bool reset_after, const at::Tensor& W,
                      const at::Tensor& b, int64_t k, const std::vector<int64_t>& exclude, bool projected0) {
  const py::object declined = py::none();
#if defined(RNNREC_HAVE_AVX2_TU)
  c10::SmallVector<const at::Tensor*, 16> w;
  if (!click_takes(emb, slab, b, weights, w)) return declined;
  const int64_t L = slab.size(1), I = emb.size(1), H = slab.size(2), N = b.size(0), G = 3;
  if (!plain_f32(W, 2) || W.size(0) != N || W.size(1) != H) return declined;
  check_projected0("rnnrec_fast click_topk: ", projected0, I, G * H);
  TORCH_CHECK_VALUE(idx >= 0 && idx < emb.size(0), "rnnrec_fast click_topk: item index ", idx, " out of [0, ",
                    emb.size(0), ")");
  TORCH_CHECK_VALUE(slot >= 0 && slot < slab.size(0), "rnnrec_fast click_topk: slot ", slot, " out of [0, ",
                    slab.size(0), ")");
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "rnnrec_fast click_topk: k must be in [1, ", N, "], got ", k);
  for (const int64_t j : exclude)
    TORCH_CHECK_VALUE(j >= 0 && j < N, "rnnrec_fast click_topk: excluded index ", j, " out of [0, ", N, ")");
  float* state = slab.data_ptr<float>() + slot * L * H;
  SmallBuf<float> y(H), hn(L * H);
  const Dims d{1, 1, I, H, G, ws_width(MODE_GRU, H)};
  infer_layers<float>(d, L, 1, emb.data_ptr<float>() + idx * I, state, w.data(), 4, MODE_GRU, reset_after, y.data(),
                      hn.data(), nullptr, projected0);
  std::memcpy(state, hn.data(), sizeof(float) * size_t(L * H));
  if (!slab.is_inference()) slab.unsafeGetTensorImpl()->bump_version();  // (as row.copy_ would)
  note_cpp_backend_ran();
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < N) buf.resize(size_t(N));
  few_rows_nt(1, N, H, W.data_ptr<float>(), H, hn.data() + (L - 1) * H, H, buf.data(), N);
  return scores_topk_lists(buf.data(), N, b.data_ptr<float>(), k, exclude);
#else
  (void)emb, (void)idx, (void)slab, (void)slot, (void)weights, (void)reset_after, (void)W, (void)b, (void)k,
      (void)exclude, (void)projected0;
  return declined;
#endif
}

// A serving batch of clicks in one call (SessionRecommender.click_many through serving.fastpath):
// click_topk for B sessions at once. Row p steps the state slab[slots[p]] (L x H) with item
// idxs[p] through the GRU layers (one batched step: infer's layers on the gathered rows), its new
// state is written back there, and rows_topk gives the k best items for each row's top layer
// (each row's excluded items at -inf): (values (B, k), indices (B, k) int64). The same kernels and
// bits as the separate calls (fast.step on the gathered states, the copy back, score_topk_rows).
// Declines (None, nothing changed) what it does not handle (as click_topk; also no packed GEMM
// kernels); the slots must be distinct (a session once per call). Bad items,
// slots, k or excluded indices raise a ValueError before anything changes.
py::object click_rows_topk(const at::Tensor& emb, const std::vector<int64_t>& idxs, const at::Tensor& slab,
                           const std::vector<int64_t>& slots, const std::vector<at::Tensor>& weights,
                           bool reset_after, const at::Tensor& W, const at::Tensor& packed, const at::Tensor& b,
                           int64_t k, const std::vector<std::vector<int64_t>>& exclude, bool projected0) {
  const py::object declined = py::none();
#if defined(RNNREC_HAVE_AVX2_TU)
  const char* where = "rnnrec_fast click_rows_topk: ";
  const GemmKernels* g = fast_gemm();
  c10::SmallVector<const at::Tensor*, 16> w;
  if (g == nullptr || !click_takes(emb, slab, b, weights, w)) return declined;
  const int64_t L = slab.size(1), I = emb.size(1), H = slab.size(2), N = b.size(0), G = 3, B = int64_t(idxs.size());
  if (!plain_f32(packed, 1)) return declined;
  check_projected0(where, projected0, I, G * H);
  TORCH_CHECK_VALUE(int64_t(slots.size()) == B, where, B, " items for ", slots.size(), " slots");
  for (const int64_t i : idxs)
    TORCH_CHECK_VALUE(i >= 0 && i < emb.size(0), where, "item index ", i, " out of [0, ", emb.size(0), ")");
  for (const int64_t sl : slots)
    TORCH_CHECK_VALUE(sl >= 0 && sl < slab.size(0), where, "slot ", sl, " out of [0, ", slab.size(0), ")");
  std::vector<int64_t> sorted(slots);
  std::sort(sorted.begin(), sorted.end());
  TORCH_CHECK_VALUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(), where,
                    "a slot appears more than once");
  check_rows_topk_args(where, *g, B, H, W, packed, N, k, exclude);
  // every allocation before the states change (the results, the scores' scratch, the gathered rows)
  RowsTopk out(B, k, N);
  if (B == 0) return out.result();
  // the batch's inputs and states gathered (x: B x I; states: L x B x H, as infer takes them)
  Buf<float> x(B * I), hx(L * B * H), hn(L * B * H), y(B * H);
  const float* ep = emb.data_ptr<float>();
  float* sp = slab.data_ptr<float>();
  for (int64_t p = 0; p < B; ++p) {
    std::memcpy(x.data() + p * I, ep + idxs[size_t(p)] * I, sizeof(float) * size_t(I));
    for (int64_t l = 0; l < L; ++l)
      std::memcpy(hx.data() + (l * B + p) * H, sp + (slots[size_t(p)] * L + l) * H, sizeof(float) * size_t(H));
  }
  const Dims d{1, B, I, H, G, ws_width(MODE_GRU, H)};
  infer_layers<float>(d, L, 1, x.data(), hx.data(), w.data(), 4, MODE_GRU, reset_after, y.data(), hn.data(), nullptr,
                      projected0);
  for (int64_t p = 0; p < B; ++p)
    for (int64_t l = 0; l < L; ++l)
      std::memcpy(sp + (slots[size_t(p)] * L + l) * H, hn.data() + (l * B + p) * H, sizeof(float) * size_t(H));
  if (!slab.is_inference()) slab.unsafeGetTensorImpl()->bump_version();  // (as index_copy_ would)
  note_cpp_backend_ran();
  const at::Tensor packed_held = packed.variable_data(), b_held = b.variable_data();  // (as score_topk_rows)
  {
    py::gil_scoped_release no_gil;  // (the scores and selection; the caller's lock keeps the store)
    out.run(hn.data() + (L - 1) * B * H, B, H, packed_held.data_ptr<float>(), b_held.data_ptr<float>(), N, k,
            exclude);
  }
  return out.result();
#else
  (void)emb, (void)idxs, (void)slab, (void)slots, (void)weights, (void)reset_after, (void)W, (void)packed, (void)b,
      (void)k,
      (void)exclude, (void)projected0;
  return declined;
#endif
}
#endif  // !RNNREC_STANDALONE

template <typename T>
RowKernels<T> scalar_row_kernels() {
  RowKernels<T> k;
  k.rnn_fwd = &s_rnn_fwd<T>;
  k.gru_fwd_ra = &s_gru_fwd_ra<T>;
  k.gru_fwd_a = &s_gru_fwd_a<T>;
  k.gru_fwd_b = &s_gru_fwd_b<T>;
  k.rnn_bwd = &s_rnn_bwd<T>;
  k.gru_bwd_ra = &s_gru_bwd_ra<T>;
  k.gru_bwd_1 = &s_gru_bwd_1<T>;
  k.gru_bwd_2 = &s_gru_bwd_2<T>;
  return k;
}
template RowKernels<float> scalar_row_kernels<float>();
template RowKernels<double> scalar_row_kernels<double>();

}  // namespace rnnrec

#if !defined(RNNREC_STANDALONE)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnrec_fast fused Elman RNN / GRU CPU kernels (contract: rnnrec_fast.backends.reference)";
  m.def("forward", &rnnrec::forward, "fused forward -> (y, h_n, ws)", py::arg("x"), py::arg("h0"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("lengths"),
        py::arg("resets"), py::arg("mode"), py::arg("reset_after"));
  m.def("release_scratch", [] { return int64_t(rnnrec::ScratchPool::get().release()); },
        "free the scratch blocks the C++ kernels keep between calls; returns their bytes");
  m.def("scratch_bytes", [] { return int64_t(rnnrec::ScratchPool::get().held()); },
        "bytes of scratch the C++ kernels keep between calls (freed blocks kept for reuse)");
  m.def("simd_level", [] { return rnnrec::avx512_enabled() ? "avx512" : rnnrec::simd_enabled() ? "avx2" : "scalar"; },
        "the float32 CPU kernels this process runs: 'avx512', 'avx2' or 'scalar' (RNNREC_FAST_NO_AVX512=1 / "
        "RNNREC_FAST_NO_SIMD=1 step down)");
  m.def("chunked_projection", &rnnrec::chunked_projection,
        "whether a large GRU inference projects its inputs a chunk of steps at a time (AVX-512; on AVX2 "
        "where RNNREC_FAST_CHUNKED_PROJECTION=1, for tests)");
  m.def("_set_gemv_loads", [](int64_t choice) {
#if defined(RNNREC_HAVE_AVX2_TU)
    rnnrec::set_gemv_loads(int(choice));
#else
    (void)choice;
#endif
  }, "tests: the AVX-512 batch-1 product's loads for weight rows off cache lines: 2 aligned in groups of rows "
     "where they apply, 1 aligned in classes of rows, 0 plain unaligned, -1 as the CPU prefers (plain on AMD, "
     "else the groups where they apply)", py::arg("choice"));
  m.def("_gemv_form", [](const at::Tensor& W) -> std::string {
    TORCH_CHECK_VALUE(W.dim() == 2 && W.scalar_type() == at::kFloat && W.device().is_cpu() && W.stride(1) == 1,
                      "_gemv_form: a float32 CPU matrix with unit column stride expected");
#if defined(RNNREC_HAVE_AVX2_TU)
    if (rnnrec::avx512_enabled()) {
      switch (rnnrec::gemv_form(W.size(0), W.size(1), W.data_ptr<float>(), W.stride(0))) {
        case rnnrec::GemvForm::kGrouped: return "grouped";
        case rnnrec::GemvForm::kClasses: return "classes";
        case rnnrec::GemvForm::kPlain: return "plain";
      }
    }
#endif
    return "none";
  }, "tests: the form the AVX-512 batch-1 product takes for the weight W (its rows, columns, row stride and "
     "address): 'grouped', 'classes' or 'plain'; 'none' where the AVX-512 kernels do not run", py::arg("W"));
  m.def("linear_rows", &rnnrec::linear_rows,
        "x @ W.T (+ b) with W as stored (N, K); a few float32 rows of x stream W once through the vector "
        "kernels (split over threads), other inputs go to torch.addmm",
        py::arg("x"), py::arg("W"), py::arg("b") = py::none());
  m.def("pad_packed_sorted", &rnnrec::pad_packed_sorted,
        "a PackedSequence's (data, batch_sizes) as (padded (T, B, C) in its sorted batch order, lengths (B,)); "
        "no autograd", py::arg("data"), py::arg("batch_sizes"));
  m.def("unpad_packed_sorted", &rnnrec::unpad_packed_sorted,
        "padded (T, B, C) in a PackedSequence's sorted batch order -> its packed rows (N, C); no autograd",
        py::arg("padded"), py::arg("batch_sizes"));
  m.def("pad_packed_autograd", &rnnrec::pad_packed_autograd,
        "pad_packed_sorted with autograd (its backward: unpad_packed_autograd)", py::arg("data"),
        py::arg("batch_sizes"));
  m.def("unpad_packed_autograd", &rnnrec::unpad_packed_autograd,
        "unpad_packed_sorted with autograd (its backward: pad_packed_autograd)", py::arg("padded"),
        py::arg("batch_sizes"));
  m.def("reverse_padded", &rnnrec::reverse_padded,
        "x (T, B, C) with each row's first lengths[b] steps reversed, its padding in place", py::arg("x"),
        py::arg("lengths"));
  m.def("reverse_padded_autograd", &rnnrec::reverse_padded_autograd,
        "reverse_padded with autograd (its backward: itself)", py::arg("x"), py::arg("lengths"));
  m.def("topk_rows", &rnnrec::topk_rows,
        "torch.topk(scores, k, dim=1) for a float32 CPU (M, N) matrix: (values, indices), best first; NaN "
        "first, equal scores in index order", py::arg("scores"), py::arg("k"));
  m.def("score_topk", &rnnrec::score_topk,
        "(scores, indices) of the k best items for one state h: W h + b, the excluded items at -inf, "
        "best first, as Python lists (the serving click)",
        py::arg("h"), py::arg("W"), py::arg("b"), py::arg("k"), py::arg("exclude") = std::vector<int64_t>());
  m.def("pack_scores_weights", &rnnrec::pack_scores_weights,
        "W (N, H) packed for score_topk_rows (a float32 tensor), or None where its kernels do not run",
        py::arg("W"));
  m.def("score_topk_rows", &rnnrec::score_topk_rows,
        "(values, indices) (M, k) of the k best items for each row of h (M, H): h W^T + b, read from W's copy "
        "packed by pack_scores_weights, each row's excluded items at -inf; None where it does not apply",
        py::arg("h"), py::arg("W"), py::arg("packed"), py::arg("b"), py::arg("k"),
        py::arg("exclude") = std::vector<std::vector<int64_t>>());
  m.def("click_topk", &rnnrec::click_topk,
        "the serving click in one call: one GRU step of the state slab[slot] (written back) for item idx, then "
        "score_topk's (scores, indices) for its top layer; None (nothing changed) where it does not apply; "
        "projected0: emb's rows are the first layer's input projection (its w_ih, the identity, is not read)",
        py::arg("emb"), py::arg("idx"), py::arg("slab"), py::arg("slot"), py::arg("weights"), py::arg("reset_after"),
        py::arg("W"), py::arg("b"), py::arg("k"), py::arg("exclude") = std::vector<int64_t>(),
        py::arg("projected0") = false);
  m.def("click_rows_topk", &rnnrec::click_rows_topk,
        "a serving batch in one call: one GRU step of each state slab[slots[p]] (written back) for item idxs[p], "
        "then score_topk_rows' (values, indices) for their top layer; None (nothing changed) where it does not "
        "apply; projected0 as click_topk's",
        py::arg("emb"), py::arg("idxs"), py::arg("slab"), py::arg("slots"), py::arg("weights"),
        py::arg("reset_after"), py::arg("W"), py::arg("packed"), py::arg("b"), py::arg("k"),
        py::arg("exclude") = std::vector<std::vector<int64_t>>(), py::arg("projected0") = false);
  m.def("infer", &rnnrec::infer,
        "the modules' inference fast path -> (output, h_n), the new state (cells) or None (not handled); "
        "projected0: the input is the first layer's projection (one direction; its w_ih, the identity, is not read)",
        py::arg("input"), py::arg("hx"), py::arg("weights"), py::arg("mode"), py::arg("reset_after"),
        py::arg("layers"), py::arg("batch_first"), py::arg("cell"), py::arg("directions") = 1,
        py::arg("projected0") = false);
  py::class_<rnnrec::InferPlan>(m, "InferPlan",
                                "a module's inference fast path bound to its parameter dict: plan(input, hx) "
                                "-> as infer, or None (not handled)")
      .def(py::init<py::dict, const std::vector<std::string>&, int64_t, bool, int64_t, bool, bool, int64_t,
                    std::string>(),
           py::arg("params"), py::arg("names"), py::arg("mode"), py::arg("reset_after"), py::arg("layers"),
           py::arg("batch_first"), py::arg("cell"), py::arg("directions") = 1, py::arg("backend") = "auto")
      .def("__call__", &rnnrec::InferPlan::call, py::arg("input"), py::arg("hx") = py::none())
      .def("module_call", &rnnrec::InferPlan::module_call, py::arg("module"), py::arg("args"),
           "module(*args) on this plan where the module's call would reach it (see modules._FastPath), else None");
  m.def("set_module_call_context", &rnnrec::set_module_call_context, py::arg("own_forwards"),
        py::arg("nn_module"), py::arg("forward_ad"), py::arg("module_cls"), py::arg("torch_call"),
        py::arg("torch_call_impl"), py::arg("packed_cls") = py::none(),
        "what InferPlan.module_call reads besides the module");
  m.def("install_call_slot", &rnnrec::install_call_slot, py::arg("classes"), py::arg("py_call"),
        py::arg("call_after"), "give the module classes the C++ call slot (module_call_slot; see modules)");
  m.def("has_call_slot", &rnnrec::has_call_slot, py::arg("cls"), "whether calls of cls's instances start in C++");
  m.def("last_backend", &rnnrec::last_backend, "the backend that ran this thread's last call ('' before any)");
  m.def("set_last_backend", &rnnrec::set_last_backend, "record the backend (a Python one) that ran this call",
        py::arg("name"));
  m.def("backward", &rnnrec::backward,
        "fused backward -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)",
        py::arg("grad_y"), py::arg("grad_h_n"), py::arg("x"), py::arg("h0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("lengths"), py::arg("resets"),
        py::arg("y"), py::arg("ws"), py::arg("mode"), py::arg("reset_after"), py::arg("need_gx") = true,
        py::arg("need_gh0") = true, py::arg("need_gw_ih") = true, py::arg("need_gw_hh") = true);
  m.def("backward_skips", &rnnrec::backward_skips,
        "the gradients this thread's op backward under way leaves out, as a tuple of four bools (grad_x, "
        "grad_h0, grad_w_ih, grad_w_hh: their inputs require none)");
}
#endif  // !RNNREC_STANDALONE

// A CUDA emulator for the CPU, just large enough to run csrc/rnnrec_cuda.cu and its kernels
// (csrc/rnnrec_cuda_kernels.cuh) unchanged on CPU tensors, so that CI, which has no GPU, executes
// the CUDA backend's own code against the reference backend (tests/test_cuda_emulated.py).
// tests/cuda_emu/build.py compiles the CUDA sources as C++ against the headers of this folder,
// which stand in for the CUDA runtime, cooperative groups and ATen's CUDA context.
//
// What it models:
//   * every CUDA thread is a fiber (ucontext stacks, switched with _setjmp/_longjmp); a launch runs
//     all of its threads to the end before it returns (the host sees a synchronous device);
//   * __syncthreads(), __shfl_xor_sync() (full warps) and a cooperative grid's grid.sync() are
//     barriers: a thread waits there until every thread it synchronises with has arrived. Which
//     ready thread runs next is the schedule's choice (set from Python): in launch order, or block
//     by block: the first block in an order (random from a seed, lowest first or highest first)
//     that has a thread ready runs one of them, picked at random, so each block runs as far as its
//     own barriers let it before the next moves. A barrier missing, within a block or across
//     blocks, then shows as a read of a value not yet written, or already overwritten;
//   * a barrier that some threads never reach (a divergent __syncthreads, a thread that returns
//     early) is reported as a deadlock, naming the barrier;
//   * dynamic shared memory: one buffer per block of exactly the launch's size, filled with 0xFF
//     bytes (NaN as float or double), between two 64-byte canaries checked after the launch (a
//     write further off is heap memory: AddressSanitizer's, under make sanitize);
//   * launch checks as CUDA makes them: 1 to 1024 threads a block, at least one block, dynamic shared
//     memory over 48 KiB only after cudaFuncSetAttribute raised the kernel's limit, and at most the
//     device's opt-in limit; a cooperative grid larger than the device holds at once fails with
//     cudaErrorCooperativeLaunchTooLarge (usable_sms models an MPS client given fewer SMs than the
//     device properties report);
//   * the device properties the host code reads, from rnnrec_emu::config (set from Python).
// Built with RNNREC_FAST_SANITIZE=1 (make sanitize) it runs under AddressSanitizer and
// UndefinedBehaviorSanitizer: a kernel's read or write past a tensor is then reported.
// What it does not model: memory spaces (device pointers are CPU pointers: host code reading device
// memory, or a kernel calling host-only code, builds and runs here), streams (all work is
// synchronous, in order), caches (__ldcg is a plain load), memory ordering beyond the barriers,
// registers and __launch_bounds__, warp-synchronous code without __shfl_*_sync, atomics, textures,
// 2-D and 3-D launches (refused), timing. Each thread holds a fiber of ~250 bytes and, once started,
// a 64 KiB stack: launches of a few thousand threads, not an H100-sized grid.
#pragma once

#include <ucontext.h>
#include <setjmp.h>
#include <sys/mman.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/extension.h>

// ---------------------------------------------------------------------------------------------
// CUDA runtime types

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
typedef cudaError_t cudaError;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaDeviceProp {
  int cooperativeLaunch;
  int multiProcessorCount;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int maxThreadsPerBlock;
  int maxThreadsPerMultiProcessor;
};

// device-code keywords: host code here
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace rnnrec_emu {

// The emulated device (set from Python: emu_configure, in bind()).
struct Config {
  int num_sms = 4;                  // multiProcessorCount
  int usable_sms = -1;              // SMs a cooperative launch may really use (-1: all; MPS: fewer)
  int cooperative = 1;              // cooperativeLaunch
  size_t smem_per_block = 48 * 1024;
  size_t smem_optin = 227 * 1024;   // sharedMemPerBlockOptin (H100)
  size_t smem_per_sm = 228 * 1024;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
  // the schedule: 0 launch order; block by block, 1 in a random order of blocks (from seed), 2 the
  // lowest first, 3 the highest first (within a block the ready thread to run is picked at random)
  int schedule = 1;
  uint64_t seed = 1;
};
inline Config config;

struct Stats {
  int64_t launches = 0;              // kernels run (both kinds)
  int64_t cooperative_launches = 0;  // cooperative kernels run
  int64_t cooperative_refused = 0;   // cudaErrorCooperativeLaunchTooLarge returned
  int64_t max_grid_blocks = 0;       // of a cooperative launch
  int64_t barrier_waits = 0;         // threads parked at a barrier
};
inline Stats stats;

inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, size_t> dynamic_smem_limit;  // raised by cudaFuncSetAttribute

inline const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}

inline cudaDeviceProp* device_props() {
  static cudaDeviceProp p;
  p.cooperativeLaunch = config.cooperative;
  p.multiProcessorCount = config.num_sms;
  p.sharedMemPerBlock = config.smem_per_block;
  p.sharedMemPerBlockOptin = config.smem_optin;
  p.sharedMemPerMultiprocessor = config.smem_per_sm;
  p.maxThreadsPerBlock = 1024;
  p.maxThreadsPerMultiProcessor = config.max_threads_per_sm;
  return &p;
}

// Blocks of `threads` threads and `smem` bytes of dynamic shared memory one SM holds at once.
inline int blocks_per_sm(int threads, size_t smem) {
  if (threads < 1 || threads > 1024 || smem > config.smem_optin) return 0;
  int n = std::min(config.max_blocks_per_sm, config.max_threads_per_sm / threads);
  if (smem > 0) n = std::min<int64_t>(n, (int64_t)(config.smem_per_sm / smem));
  return n;
}

// ---------------------------------------------------------------------------------------------
// fibers and barriers

struct Fiber {
  unsigned block = 0, thread = 0;
  char* stack = nullptr;
  jmp_buf jb;
  bool started = false, done = false;
};

struct Barrier {
  const char* what = "";
  unsigned expected = 0, arrived = 0;
  std::vector<Fiber*> waiting;
};

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 4096;  // a PROT_NONE page below each stack: an overflow faults
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0xA5;  // (not the 0xFF fill: a write of NaN is seen too)

struct StackPool {
  std::vector<char*> free_list;
  ~StackPool() {
    for (char* s : free_list) munmap(s - kGuardBytes, kStackBytes + kGuardBytes);
  }
  char* get() {
    if (!free_list.empty()) {
      char* s = free_list.back();
      free_list.pop_back();
#if defined(__SANITIZE_ADDRESS__)
      // (make sanitize) a thread's frames are never returned from (it ends by a jump, or is
      // abandoned at a fault): their redzones stay poisoned in the stack's shadow until cleared
      ASAN_UNPOISON_MEMORY_REGION(s, kStackBytes);
#endif
      return s;
    }
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "cuda_emu: cannot map a fiber stack");
    TORCH_CHECK(mprotect(m, kGuardBytes, PROT_NONE) == 0, "cuda_emu: cannot protect a stack guard");
    return static_cast<char*>(m) + kGuardBytes;
  }
  void put(char* s) { free_list.push_back(s); }
};
inline StackPool stack_pool;

struct Grid {
  dim3 grid, block;
  bool cooperative = false;
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<std::vector<unsigned char>> shared;  // per block: smem bytes + canary (+ alignment)
  std::vector<Barrier> block_bar;                 // per block
  std::vector<Barrier> warp_bar;                  // per (block, warp)
  std::vector<std::array<uint64_t, 32>> warp_slot;
  Barrier grid_bar;
  std::vector<std::vector<Fiber*>> ready;  // per block: the threads that may run
  size_t n_ready = 0;
  std::vector<unsigned> block_order;        // schedules 1 to 3: which block's threads run first
  jmp_buf sched;
  Fiber* cur = nullptr;
  std::mt19937_64 rng;
  std::string fault;  // a device-side error: the launch stops and raises it
};
inline Grid* g_grid = nullptr;

// A device-side error: the faulting thread is abandoned (its stack is not unwound: an exception
// cannot cross a fiber's first frame), and the launch raises `msg` once back on the host's stack.
[[noreturn]] inline void device_fault(const std::string& msg) {
  Grid& g = *g_grid;
  g.fault = msg;
  g.cur->done = true;
  _longjmp(g.sched, 1);
}

template <typename... Args>
inline void device_check(bool ok, const Args&... what) {
  if (ok) return;
  const std::string msg = c10::str("cuda_emu: ", what...);
  if (g_grid != nullptr && g_grid->cur != nullptr) device_fault(msg);
  TORCH_CHECK(false, msg);
}

inline Grid& grid_now() {
  TORCH_CHECK(g_grid != nullptr && g_grid->cur != nullptr, "cuda_emu: a device builtin used outside a kernel");
  return *g_grid;
}
inline dim3 thread_idx() { return dim3(grid_now().cur->thread, 0, 0); }
inline dim3 block_idx() { return dim3(grid_now().cur->block, 0, 0); }

inline unsigned char* dynamic_shared_of(Grid& g, unsigned block) {
  unsigned char* base = g.shared[block].data() + kCanaryBytes;
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(base) + 15) & ~uintptr_t(15));
}
inline unsigned char* dynamic_shared() {
  Grid& g = grid_now();
  return dynamic_shared_of(g, g.cur->block);
}

// Fiber side: back to the scheduler; returns when resumed.
inline void yield_to_scheduler() {
  Grid& g = *g_grid;
  Fiber* f = g.cur;
  if (!_setjmp(f->jb)) _longjmp(g.sched, 1);
}

inline void make_ready(Grid& g, Fiber* f) {
  g.ready[f->block].push_back(f);
  ++g.n_ready;
}

// Wait until every thread of the barrier has arrived. The last one to arrive makes them all ready
// (itself too): the schedule picks which runs next.
inline void barrier_wait(Barrier& b) {
  Grid& g = grid_now();
  ++stats.barrier_waits;
  b.waiting.push_back(g.cur);
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    for (Fiber* w : b.waiting) make_ready(g, w);
    b.waiting.clear();
  }
  yield_to_scheduler();
}

// The next thread to run, taken out of the ready lists (n_ready > 0): the first block in
// block_order with a ready thread; in it, the oldest (schedule 0) or one at random.
inline Fiber* pick(Grid& g) {
  size_t k = 0;
  while (g.ready[g.block_order[k]].empty()) ++k;
  const unsigned b = g.block_order[k];
  size_t i = 0;
  if (config.schedule != 0) i = std::uniform_int_distribution<size_t>(0, g.ready[b].size() - 1)(g.rng);
  std::vector<Fiber*>& r = g.ready[b];
  Fiber* f = r[i];
  if (config.schedule == 0) {
    r.erase(r.begin());
  } else {
    r[i] = r.back();
    r.pop_back();
  }
  --g.n_ready;
  return f;
}

inline void fiber_main() {
  Grid& g = *g_grid;
  std::string error;
  try {  // (an exception cannot leave a fiber's first frame)
    g.body();
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "cuda_emu: a kernel threw an exception that is not a std::exception";
  }
  if (!error.empty()) device_fault(error);
  g.cur->done = true;
  _longjmp(g.sched, 1);
}

// Scheduler side: run f until it waits at a barrier or ends.
inline void resume(Grid& g, Fiber* f) {
  g.cur = f;
  if (!_setjmp(g.sched)) {
    if (!f->started) {
      f->started = true;
      f->stack = stack_pool.get();
      // (read only by setcontext: the thread never returns through uc_link, so the context need
      // not outlive this call)
      ucontext_t uctx;
      getcontext(&uctx);
      uctx.uc_stack.ss_sp = f->stack;
      uctx.uc_stack.ss_size = kStackBytes;
      uctx.uc_link = nullptr;
      makecontext(&uctx, (void (*)())fiber_main, 0);
      setcontext(&uctx);
    } else {
      _longjmp(f->jb, 1);
    }
  }
  g.cur = nullptr;
}

inline std::string deadlock_report(const Grid& g) {
  std::ostringstream os;
  os << "cuda_emu: deadlock: threads wait at a barrier that the others never reach:";
  auto note = [&](const Barrier& b, const std::string& where) {
    if (!b.waiting.empty())
      os << "\n  " << b.what << where << ": " << b.waiting.size() << " of " << b.expected << " arrived";
  };
  note(g.grid_bar, "");
  for (size_t i = 0; i < g.block_bar.size(); ++i) note(g.block_bar[i], " of block " + std::to_string(i));
  const size_t wpb = (g.block.x + 31) / 32;
  for (size_t i = 0; i < g.warp_bar.size(); ++i)
    note(g.warp_bar[i], " of block " + std::to_string(i / wpb) + " warp " + std::to_string(i % wpb));
  return os.str();
}

// Run every thread of a launch to its end. Raises (c10::Error) on a deadlock or a write past the
// dynamic shared memory; the launch's configuration was checked by the caller.
inline void run_grid(dim3 grid, dim3 block, size_t smem, bool cooperative, std::function<void()> body) {
  device_check(g_grid == nullptr, "a kernel launched from inside a kernel");
  ++stats.launches;
  if (cooperative) {
    ++stats.cooperative_launches;
    stats.max_grid_blocks = std::max<int64_t>(stats.max_grid_blocks, grid.x);
  }
  Grid g;
  g.grid = grid;
  g.block = block;
  g.cooperative = cooperative;
  g.body = std::move(body);
  g.rng.seed(config.seed);
  const unsigned nb = grid.x, nt = block.x, wpb = (nt + 31) / 32;
  const size_t n = (size_t)nb * nt;
  g.fibers.resize(n);
  g.shared.resize(nb);
  g.block_bar.resize(nb);
  g.ready.resize(nb);
  g.block_order.resize(nb);
  for (unsigned b = 0; b < nb; ++b) g.block_order[b] = config.schedule == 3 ? nb - 1 - b : b;
  if (config.schedule == 1) std::shuffle(g.block_order.begin(), g.block_order.end(), g.rng);
  g.warp_bar.resize((size_t)nb * wpb);
  g.warp_slot.resize((size_t)nb * wpb);
  for (unsigned b = 0; b < nb; ++b) {
    // canary, (alignment), smem bytes of 0xFF (NaN until written), canary
    std::vector<unsigned char>& sh = g.shared[b];
    sh.assign(kCanaryBytes + 16 + smem + kCanaryBytes, kCanary);
    std::fill_n(dynamic_shared_of(g, b), smem, (unsigned char)0xFF);
    g.block_bar[b].what = "__syncthreads()";
    g.block_bar[b].expected = nt;
    for (unsigned w = 0; w < wpb; ++w) {
      Barrier& wb = g.warp_bar[(size_t)b * wpb + w];
      wb.what = "__shfl_xor_sync()";
      wb.expected = std::min(32u, nt - 32 * w);
    }
  }
  g.grid_bar.what = "grid.sync()";
  g.grid_bar.expected = (unsigned)n;
  for (size_t i = 0; i < n; ++i) {
    g.fibers[i].block = (unsigned)(i / nt);
    g.fibers[i].thread = (unsigned)(i % nt);
    make_ready(g, &g.fibers[i]);
  }
  struct Reset {  // leave no dangling state behind, also when raising
    Grid& g;
    ~Reset() {
      for (Fiber& f : g.fibers)
        if (f.stack != nullptr) stack_pool.put(f.stack);
      g_grid = nullptr;
    }
  } reset{g};
  g_grid = &g;
  size_t remaining = n;
  while (remaining > 0) {
    TORCH_CHECK(g.n_ready > 0, deadlock_report(g));
    Fiber* f = pick(g);
    resume(g, f);
    TORCH_CHECK(g.fault.empty(), g.fault, " (block ", f->block, ", thread ", f->thread, ")");
    if (f->done) {
      --remaining;
      stack_pool.put(f->stack);
      f->stack = nullptr;
    }
  }
  for (unsigned b = 0; b < nb; ++b) {
    const unsigned char* sh = dynamic_shared_of(g, b);
    const unsigned char* first = g.shared[b].data();
    for (const unsigned char* c = first; c < first + kCanaryBytes; ++c)
      TORCH_CHECK(*c == kCanary, "cuda_emu: block ", b, " wrote before its dynamic shared memory (byte ",
                  c - sh, ")");
    for (size_t k = 0; k < kCanaryBytes; ++k)
      TORCH_CHECK(sh[smem + k] == kCanary, "cuda_emu: block ", b, " wrote past its ", smem,
                  " bytes of dynamic shared memory (byte ", smem + k, ")");
  }
}


// ---------------------------------------------------------------------------------------------
// launches

// CUDA's checks of a launch's configuration; cudaSuccess when it may run.
inline cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1)
    TORCH_CHECK(false, "cuda_emu: only 1-D grids and blocks are emulated");
  if (grid.x < 1 || block.x < 1 || block.x > 1024) return cudaErrorInvalidConfiguration;
  auto it = dynamic_smem_limit.find(kernel);
  const size_t limit = it != dynamic_smem_limit.end() ? it->second : config.smem_per_block;
  if (smem > limit) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to
// rnnrec_emu::launch(kernel, grid, block, smem, stream)(args...).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    const cudaError_t err = check_launch((const void*)kernel, grid, block, smem);
    if (err != cudaSuccess) {
      last_error = err;
      return;
    }
    std::tuple<P...> args(std::forward<A>(a)...);  // copied, as a launch copies its arguments
    auto k = kernel;
    run_grid(grid, block, smem, false, [&] { std::apply(k, args); });
  }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                    cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, smem};
}

// cudaLaunchCooperativeKernel((const void*)kernel, grid, block, args, smem, stream) is rewritten to
// rnnrec_emu::launch_cooperative(kernel, grid, block, args, smem, stream).
template <typename... P, size_t... I>
std::tuple<P...> unpack_args(void** args, std::index_sequence<I...>) {
  return std::tuple<P...>(*static_cast<P*>(args[I])...);
}
template <typename... P>
cudaError_t launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t smem,
                               cudaStream_t) {
  if (!config.cooperative) return cudaErrorInvalidValue;
  cudaError_t err = check_launch((const void*)kernel, grid, block, smem);
  if (err == cudaSuccess) {
    const int sms = config.usable_sms >= 0 ? config.usable_sms : config.num_sms;
    if ((int64_t)grid.x > (int64_t)blocks_per_sm((int)block.x, smem) * sms) {
      ++stats.cooperative_refused;
      err = cudaErrorCooperativeLaunchTooLarge;
    }
  }
  if (err != cudaSuccess) {
    last_error = err;  // as CUDA: also the next cudaGetLastError()
    return err;
  }
  std::tuple<P...> t = unpack_args<P...>(args, std::index_sequence_for<P...>{});
  auto k = kernel;
  run_grid(grid, block, smem, true, [&] { std::apply(k, t); });
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// device builtins

inline void syncthreads() {
  Grid& g = grid_now();
  barrier_wait(g.block_bar[g.cur->block]);
}

template <typename T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "cuda_emu: __shfl_xor_sync of a type wider than 8 bytes");
  Grid& g = grid_now();
  device_check(mask == 0xffffffffu && width == 32 && g.block.x % 32 == 0,
               "only full-warp __shfl_xor_sync is emulated");
  const unsigned lane = g.cur->thread % 32;
  const size_t w = (size_t)g.cur->block * (g.block.x / 32) + g.cur->thread / 32;
  device_check(lane_mask >= 0 && lane_mask < 32, "__shfl_xor_sync lane mask ", lane_mask);
  std::memcpy(&g.warp_slot[w][lane], &v, sizeof(T));
  barrier_wait(g.warp_bar[w]);  // every lane has written
  T out;
  std::memcpy(&out, &g.warp_slot[w][lane ^ (unsigned)lane_mask], sizeof(T));
  barrier_wait(g.warp_bar[w]);  // every lane has read before any writes again
  return out;
}

inline void grid_sync() {
  Grid& g = grid_now();
  device_check(g.cooperative, "grid.sync() in a kernel not launched cooperatively");
  barrier_wait(g.grid_bar);
}

}  // namespace rnnrec_emu

#define threadIdx (::rnnrec_emu::thread_idx())
#define blockIdx (::rnnrec_emu::block_idx())
#define blockDim (::rnnrec_emu::grid_now().block)
#define gridDim (::rnnrec_emu::grid_now().grid)

inline void __syncthreads() { ::rnnrec_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::rnnrec_emu::shfl_xor_sync(mask, v, lane_mask, width);
}
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// runtime API

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::rnnrec_emu::last_error;
  ::rnnrec_emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return ::rnnrec_emu::error_string(e); }

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      (size_t)value > ::rnnrec_emu::config.smem_optin)
    return cudaErrorInvalidValue;
  ::rnnrec_emu::dynamic_smem_limit[kernel] = (size_t)value;
  return cudaSuccess;
}

inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* kernel,
                                                                 int threads, size_t smem) {
  (void)kernel;
  *n = ::rnnrec_emu::blocks_per_sm(threads, smem);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Python side: the emulated device's settings and counters (added to the module by build.py)

namespace rnnrec_emu {
inline void bind(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "emu_configure",
      [](int num_sms, int usable_sms, bool cooperative, int64_t smem_optin, int schedule, uint64_t seed) {
        TORCH_CHECK(num_sms >= 1 && smem_optin >= 0 && schedule >= 0 && schedule <= 3,
                    "emu_configure: bad settings");
        config.schedule = schedule;
        config.num_sms = num_sms;
        config.usable_sms = usable_sms;
        config.cooperative = cooperative ? 1 : 0;
        config.smem_optin = (size_t)smem_optin;
        config.seed = seed;
      },
      "set the emulated device (usable_sms -1: all of them) and the schedule (0 launch order; block "
      "by block, 1 in a random order from seed, 2 the lowest first, 3 the highest first)",
      py::arg("num_sms") = 4, py::arg("usable_sms") = -1, py::arg("cooperative") = true,
      py::arg("smem_optin") = 227 * 1024, py::arg("schedule") = 1, py::arg("seed") = 1);
  m.def("emu_stats", [] {
    py::dict d;
    d["launches"] = stats.launches;
    d["cooperative_launches"] = stats.cooperative_launches;
    d["cooperative_refused"] = stats.cooperative_refused;
    d["max_grid_blocks"] = stats.max_grid_blocks;
    d["barrier_waits"] = stats.barrier_waits;
    return d;
  });
  m.def("emu_reset_stats", [] { stats = Stats(); });
}
}  // namespace rnnrec_emu

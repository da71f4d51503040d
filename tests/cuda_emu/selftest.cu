// Kernels that check the CUDA emulator itself (tests/test_cuda_emulated.py): each does what a CUDA
// program must do right, or must not do, and the tests check the emulator's answer (a missing
// barrier reads a value not yet written, a barrier some threads skip is a deadlock, a write past the
// dynamic shared memory is reported, a bad launch configuration is an error). Compiled only into
// the emulated module, after rnnrec_cuda.cu, through the same rewrites (build.py).
namespace rnnrec_emu_selftest {

namespace cg = cooperative_groups;
using at::Tensor;

// every lane: the sum over its warp of (lane + 1) * scale (32 * 33 / 2 * scale)
__global__ void warp_sum_kernel(float* out, float scale) {
  float v = (float)((threadIdx.x & 31) + 1) * scale;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// each thread writes its index to shared memory and reads its neighbour's: right only after the
// barrier
__global__ void neighbour_kernel(float* out, bool sync) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x] = (float)threadIdx.x;
  if (sync) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// a barrier that only the threads below `reach` arrive at
__global__ void divergent_kernel(int reach) {
  if ((int)threadIdx.x < reach) __syncthreads();
}

// thread 0 writes the float at `index` of the dynamic shared memory (-1: the one before it)
__global__ void shared_write_kernel(int index) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x == 0) s[index] = 1.0f;
}

// block b writes its slot, crosses a barrier (0 none, 1 __syncthreads, 2 a warp shuffle, 3
// grid.sync), then reads block b + 1's: right only after grid.sync()
struct GridArgs {
  float* slots;
  float* out;
  int barrier;
};
__global__ void grid_kernel(const GridArgs a) {
  cg::grid_group grid = cg::this_grid();
  if (threadIdx.x == 0) a.slots[blockIdx.x] = (float)blockIdx.x + 1;
  if (a.barrier == 1) __syncthreads();
  if (a.barrier == 2) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
  if (a.barrier == 3) grid.sync();
  if (threadIdx.x == 0) a.out[blockIdx.x] = a.slots[(blockIdx.x + 1) % gridDim.x];
}

inline Tensor warp_sum(int64_t blocks, int64_t threads, double scale) {
  Tensor out = at::full({blocks * threads}, NAN, at::kFloat);
  warp_sum_kernel<<<(unsigned)blocks, (unsigned)threads, 0, nullptr>>>(out.data_ptr<float>(), (float)scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

inline Tensor neighbours(int64_t blocks, int64_t threads, bool sync) {
  Tensor out = at::full({blocks * threads}, NAN, at::kFloat);
  neighbour_kernel<<<(unsigned)blocks, (unsigned)threads, threads * sizeof(float), nullptr>>>(
      out.data_ptr<float>(), sync);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

inline void divergent(int64_t threads, int64_t reach) {
  divergent_kernel<<<1, (unsigned)threads, 0, nullptr>>>((int)reach);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void shared_write(int64_t floats, int64_t index) {
  shared_write_kernel<<<2, 32, floats * sizeof(float), nullptr>>>((int)index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cudaGetLastError() after launching a do-nothing kernel with this configuration (0: it ran)
inline int64_t launch_error(int64_t blocks, int64_t threads, int64_t smem) {
  divergent_kernel<<<(unsigned)blocks, (unsigned)threads, (size_t)smem, nullptr>>>(0);
  return (int64_t)cudaGetLastError();
}

inline Tensor grid(int64_t blocks, int64_t barrier, bool cooperative) {
  Tensor slots = at::full({blocks}, NAN, at::kFloat), out = at::full({blocks}, NAN, at::kFloat);
  GridArgs a{slots.data_ptr<float>(), out.data_ptr<float>(), (int)barrier};
  if (cooperative) {
    void* args[] = {(void*)&a};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel((const void*)grid_kernel, dim3((unsigned)blocks), dim3(64),
                                               args, 0, nullptr));
  } else {
    grid_kernel<<<(unsigned)blocks, 64, 0, nullptr>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// The host code's memory of cooperative grids refused as too large (rnnrec_cuda.cu), cleared so
// that a test sees a first refusal whatever ran before it in the process.
inline void forget_refused_grids() {
  std::lock_guard<std::mutex> lock(rnnrec_cuda::refused_mu);
  rnnrec_cuda::refused_grids.clear();
}

inline void bind(pybind11::module_& m) {
  m.def("emu_forget_refused_grids", &forget_refused_grids);
  m.def("selftest_warp_sum", &warp_sum);
  m.def("selftest_neighbours", &neighbours);
  m.def("selftest_divergent", &divergent);
  m.def("selftest_shared_write", &shared_write);
  m.def("selftest_launch_error", &launch_error);
  m.def("selftest_grid", &grid);
}

}  // namespace rnnrec_emu_selftest

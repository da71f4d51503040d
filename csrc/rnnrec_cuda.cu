// rnnrec_fast CUDA backend: the extension module rnnrec_fast._C_cuda.
//
// forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after) -> (y, h_n, ws)
// backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws, mode,
//          reset_after) -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)
// with exactly the contract of rnnrec_fast/backends/reference.py.
//
// Two forward paths (the backward always uses the GEMM path):
//   (a) "persistent": B <= 8 and the weights fit in shared memory -> input projections with one
//       cuBLAS GEMM, then ONE cooperative kernel for the whole sequence (rnnrec_cuda_kernels.cuh).
//   (b) "gemm": input GEMM once; per step a cuBLAS GEMM for the recurrent projections into a
//       preallocated buffer plus one fused pointwise kernel.
// Everything runs on the current stream, allocates only through ATen and never synchronises with
// the host, so both forward and backward can be captured in a CUDA graph.
// half / bfloat16 inputs are computed in float32 (state, accumulation, GEMMs) with a float32
// workspace, as the reference does.
// Workspace: (T, B, 0) for the RNN modes, (T, B, 4H) = [r, z, n, hn] for GRU. The state entering
// each step (h_prev) is not saved: the backward rebuilds it from h0, y and resets.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "rnnrec_cuda_kernels.cuh"

namespace rnnrec_cuda {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Forward path selection: 0 auto, 1 persistent whenever it is possible, 2 always gemm.
// Set from Python with set_forward_path(): tests, benchmarks, and rnnrec_fast.backends.cuda at
// import from RNNREC_FAST_CUDA_PATH (parsed there, in any case, with a warning on a bad value).
static std::atomic<int> g_path_override{0};
// The path the latest forward call took: 0 none yet, 1 persistent, 2 gemm.
static std::atomic<int> g_last_path{0};

constexpr int kThreads = 256;

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride pointwise kernel over n elements.
static inline unsigned int pointwise_blocks(int64_t n) {
  int64_t blocks = ceil_div(n, kThreads);
  if (blocks > 65535) blocks = 65535;
  return (unsigned int)(blocks < 1 ? 1 : blocks);
}

static inline const int64_t* opt_lengths(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}
static inline const bool* opt_resets(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<bool>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// input checks (direct bad calls raise instead of crashing)

struct Dims {
  int64_t T, B, I, H, G, WD;
};

static void check_same(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rnnrec_fast._C_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == x.device(), "rnnrec_fast._C_cuda: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rnnrec_fast._C_cuda: ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type());
}

static Dims check_inputs(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths,
                         const OptTensor& resets, int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1 || mode == 2,
              "rnnrec_fast._C_cuda: mode must be 0 (rnn_tanh), 1 (rnn_relu) or 2 (gru), got ", mode);
  TORCH_CHECK(x.is_cuda(), "rnnrec_fast._C_cuda: x must be a CUDA tensor");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "rnnrec_fast._C_cuda: unsupported dtype ", st);
  TORCH_CHECK(x.dim() == 3, "rnnrec_fast._C_cuda: x must be 3-D (T, B, I), got ", x.sizes());
  Dims d;
  d.T = x.size(0);
  d.B = x.size(1);
  d.I = x.size(2);
  TORCH_CHECK(d.T > 0 && d.B > 0 && d.I > 0, "rnnrec_fast._C_cuda: x must not be empty");
  d.G = mode == 2 ? 3 : 1;
  check_same(w_hh, x, "w_hh");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) > 0 && w_hh.size(0) == d.G * w_hh.size(1),
              "rnnrec_fast._C_cuda: w_hh must be (G*H, H), got ", w_hh.sizes());
  d.H = w_hh.size(1);
  d.WD = mode == 2 ? 4 * d.H : 0;  // workspace width: GRU [r, z, n, hn]; nothing for the RNN modes
  TORCH_CHECK(d.T <= INT32_MAX && d.B <= INT32_MAX && d.H <= INT32_MAX / 8,
              "rnnrec_fast._C_cuda: sizes too large");
  check_same(w_ih, x, "w_ih");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == d.G * d.H && w_ih.size(1) == d.I,
              "rnnrec_fast._C_cuda: w_ih must be (G*H, I), got ", w_ih.sizes());
  check_same(h0, x, "h0");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == d.B && h0.size(1) == d.H,
              "rnnrec_fast._C_cuda: h0 must be (B, H), got ", h0.sizes());
  if (b_ih.has_value()) {
    check_same(*b_ih, x, "b_ih");
    TORCH_CHECK(b_ih->dim() == 1 && b_ih->size(0) == d.G * d.H,
                "rnnrec_fast._C_cuda: b_ih must be (G*H,), got ", b_ih->sizes());
  }
  if (b_hh.has_value()) {
    check_same(*b_hh, x, "b_hh");
    TORCH_CHECK(b_hh->dim() == 1 && b_hh->size(0) == d.G * d.H,
                "rnnrec_fast._C_cuda: b_hh must be (G*H,), got ", b_hh->sizes());
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->is_cuda() && lengths->device() == x.device(),
                "rnnrec_fast._C_cuda: lengths must be on ", x.device());
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 &&
                    lengths->size(0) == d.B,
                "rnnrec_fast._C_cuda: lengths must be an int64 tensor of shape (B,)");
  }
  if (resets.has_value()) {
    TORCH_CHECK(resets->is_cuda() && resets->device() == x.device(),
                "rnnrec_fast._C_cuda: resets must be on ", x.device());
    TORCH_CHECK(resets->scalar_type() == at::kBool && resets->dim() == 2 &&
                    resets->size(0) == d.T && resets->size(1) == d.B,
                "rnnrec_fast._C_cuda: resets must be a bool tensor of shape (T, B)");
  }
  return d;
}

static inline OptTensor contig(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

// acc_t copy of an optional tensor (no copy when the dtype already matches).
static inline OptTensor to_acc(const OptTensor& t, at::ScalarType acc) {
  return t.has_value() ? OptTensor(t->to(acc)) : std::nullopt;
}

// out = bias + a @ b   (or a @ b without bias), written into the preallocated `out`.
static inline void gemm_bias_out(Tensor& out, const OptTensor& bias, const Tensor& a,
                                 const Tensor& b) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// ---------------------------------------------------------------------------------------------
// (a) persistent path: launch helpers

// Raise a persistent kernel's dynamic shared-memory limit once per (device, kernel), and cache its
// occupancy (blocks per SM) per (device, kernel, smem bytes). Host-side only: no stream work.
static int persistent_blocks_per_sm(const void* kernel, int device, size_t smem, size_t smem_optin) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, bool> attr_done;
  static std::map<std::tuple<int, const void*, size_t>, int> occ;
  std::lock_guard<std::mutex> lock(mu);
  auto akey = std::make_pair(device, kernel);
  if (!attr_done[akey]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)smem_optin));
    attr_done[akey] = true;
  }
  auto key = std::make_tuple(device, kernel, smem);
  auto it = occ.find(key);
  if (it != occ.end()) return it->second;
  int nb = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, PB_THREADS, smem));
  occ[key] = nb;
  return nb;
}

// Cooperative grids refused as too large (cudaErrorCooperativeLaunchTooLarge: under MPS a client
// may get fewer SMs than the device properties report), per (device, kernel, smem bytes): the
// smallest refused block count. A grid at least that large is not tried again (every refusal is a
// failed launch call before the GEMM path); smaller ones still are.
using GridKey = std::tuple<int, const void*, size_t>;
static std::mutex refused_mu;
static std::map<GridKey, int> refused_grids;

static bool grid_refused_before(const GridKey& key, int nblk) {
  std::lock_guard<std::mutex> lock(refused_mu);
  auto it = refused_grids.find(key);
  return it != refused_grids.end() && nblk >= it->second;
}

static void note_refused_grid(const GridKey& key, int nblk) {
  std::lock_guard<std::mutex> lock(refused_mu);
  auto it = refused_grids.find(key);
  if (it == refused_grids.end() || nblk < it->second) refused_grids[key] = nblk;
}

// Tries the persistent path; returns false (having done nothing) when it does not apply.
template <typename scalar_t, typename acc_t, int MODE>
static bool try_persistent(const Dims& d, const Tensor& xp, const Tensor& w_hh,
                           const OptTensor& b_hh_acc, const Tensor& h0, const OptTensor& lengths,
                           const OptTensor& resets, Tensor& y, Tensor& h_n, Tensor& ws) {
  if (d.B > PB_MAXB) return false;
  const int device = xp.get_device();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return false;
  const int num_sms = prop->multiProcessorCount;
  const int G = (int)d.G, B = (int)d.B, H = (int)d.H;
  // Units per block: spread H over the SMs, but give each block at least 4 units (when H allows)
  // so that small H uses fewer blocks (a cheaper grid barrier) and the warps have rows to work on.
  int U = (int)ceil_div(H, num_sms);
  if (U < 4) U = H < 4 ? H : 4;
  const int nblk = (int)ceil_div(H, U);
  const size_t smem = persist_smem_bytes<scalar_t, acc_t>(G, B, H, U);
  const size_t smem_optin = prop->sharedMemPerBlockOptin;
  if (smem > smem_optin) return false;
  auto kernel = persistent_fwd_kernel<scalar_t, acc_t, MODE>;
  const int per_sm = persistent_blocks_per_sm((const void*)kernel, device, smem, smem_optin);
  if (per_sm < 1 || nblk > per_sm * num_sms) return false;
  const GridKey grid_key = std::make_tuple(device, (const void*)kernel, smem);
  if (grid_refused_before(grid_key, nblk)) return false;

  auto opts = xp.options();  // acc_t
  Tensor hbuf = at::empty({2, d.B, d.H}, opts);
  Tensor rh;
  if (MODE == KMODE_GRU_CHO) rh = at::empty({d.B, d.H}, opts);

  PersistParams<scalar_t, acc_t> p;
  p.xp = xp.data_ptr<acc_t>();
  p.w_hh = w_hh.data_ptr<scalar_t>();
  p.b_hh = b_hh_acc.has_value() ? b_hh_acc->data_ptr<acc_t>() : nullptr;
  p.h0 = h0.data_ptr<scalar_t>();
  p.lengths = opt_lengths(lengths);
  p.resets = opt_resets(resets);
  p.y = y.data_ptr<scalar_t>();
  p.h_n = h_n.data_ptr<scalar_t>();
  p.ws = MODE >= KMODE_GRU ? ws.data_ptr<acc_t>() : nullptr;  // the RNN modes save nothing
  p.hbuf = hbuf.data_ptr<acc_t>();
  p.rh = MODE == KMODE_GRU_CHO ? rh.data_ptr<acc_t>() : nullptr;
  p.T = (int)d.T;
  p.B = B;
  p.H = H;
  p.U = U;
  void* args[] = {(void*)&p};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = cudaLaunchCooperativeKernel((const void*)kernel, dim3(nblk), dim3(PB_THREADS), args,
                                                       smem, stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {  // fewer SMs than the properties say (MPS limits):
    (void)cudaGetLastError();                        // clear it; the caller takes the GEMM path
    note_refused_grid(grid_key, nblk);
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// ---------------------------------------------------------------------------------------------
// forward

template <typename scalar_t, typename acc_t, int MODE>
static void forward_impl(const Dims& d, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                         const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                         const OptTensor& lengths, const OptTensor& resets, Tensor& y,
                         Tensor& h_n, Tensor& ws) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = d.T, B = d.B, H = d.H, G = d.G;
  auto opts = x.options().dtype(acc);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Input projections of every step: one GEMM, (T*B, G*H) incl. b_ih, in acc_t.
  const Tensor w_ih_a = w_ih.to(acc);
  const OptTensor b_ih_a = to_acc(b_ih, acc), b_hh_a = to_acc(b_hh, acc);
  Tensor xp = at::empty({T * B, G * H}, opts);
  gemm_bias_out(xp, b_ih_a, x.to(acc).view({T * B, d.I}), w_ih_a.t());

  const int path = g_path_override.load();
  if (path != 2) {
    if (try_persistent<scalar_t, acc_t, MODE>(d, xp, w_hh, b_hh_a, h0, lengths, resets, y, h_n, ws)) {
      g_last_path = 1;
      return;
    }
  }
  g_last_path = 2;

  // (b) GEMM path.
  const Tensor w_hh_a = w_hh.to(acc);
  const int64_t hp_cols = MODE == KMODE_GRU_CHO ? 2 * H : G * H;
  const Tensor w_rec_t = w_hh_a.narrow(0, 0, hp_cols).t();  // (H, hp_cols) view, no copy
  OptTensor b_rec;
  if (b_hh_a.has_value()) b_rec = b_hh_a->narrow(0, 0, hp_cols);
  Tensor hbuf = at::empty({2, B, H}, opts);
  Tensor hp = at::empty({B, hp_cols}, opts);
  Tensor rh, hn, w_hn_t;
  OptTensor b_hn;
  if (MODE == KMODE_GRU_CHO) {
    rh = at::empty({B, H}, opts);
    hn = at::empty({B, H}, opts);
    w_hn_t = w_hh_a.narrow(0, 2 * H, H).t();
    if (b_hh_a.has_value()) b_hn = b_hh_a->narrow(0, 2 * H, H);
  }
  const int64_t* len_p = opt_lengths(lengths);
  const bool* res_p = opt_resets(resets);
  const unsigned int blocks = pointwise_blocks(B * H);
  const int Ti = (int)T, Bi = (int)B, Hi = (int)H;

  init_state_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
      h0.data_ptr<scalar_t>(), len_p, res_p, hbuf[0].data_ptr<acc_t>(), Ti, Bi, Hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const acc_t* xp_p = xp.data_ptr<acc_t>();
  acc_t* ws_p = MODE >= KMODE_GRU ? ws.data_ptr<acc_t>() : nullptr;  // (T, B, 4H), or width 0
  scalar_t* y_p = y.data_ptr<scalar_t>();
  for (int64_t t = 0; t < T; ++t) {
    Tensor cur = hbuf[t & 1];
    Tensor nxt = hbuf[(t + 1) & 1];
    gemm_bias_out(hp, b_rec, cur, w_rec_t);
    const acc_t* xp_t = xp_p + t * B * G * H;
    const acc_t* hn_p = nullptr;
    if (MODE == KMODE_GRU_CHO) {
      gru_cho_rh_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
          xp_t, hp.data_ptr<acc_t>(), cur.data_ptr<acc_t>(), rh.data_ptr<acc_t>(), Bi, Hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gemm_bias_out(hn, b_hn, rh, w_hn_t);
      hn_p = hn.data_ptr<acc_t>();
    }
    fwd_step_kernel<scalar_t, acc_t, MODE><<<blocks, kThreads, 0, stream>>>(
        xp_t, hp.data_ptr<acc_t>(), (int)hp_cols, hn_p, cur.data_ptr<acc_t>(),
        nxt.data_ptr<acc_t>(), y_p + t * B * H, ws_p != nullptr ? ws_p + t * B * d.WD : nullptr,
        t == T - 1 ? h_n.data_ptr<scalar_t>() : nullptr, len_p, res_p, (int)t, Ti, Bi, Hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x_, const Tensor& h0_, const Tensor& w_ih_,
                                           const Tensor& w_hh_, const OptTensor& b_ih_,
                                           const OptTensor& b_hh_, const OptTensor& lengths_,
                                           const OptTensor& resets_, int64_t mode,
                                           bool reset_after) {
  const Dims d = check_inputs(x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_, lengths_, resets_, mode);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(),
               w_hh = w_hh_.contiguous();
  const OptTensor b_ih = contig(b_ih_), b_hh = contig(b_hh_), lengths = contig(lengths_),
                  resets = contig(resets_);
  const int kmode = mode == 2 ? (reset_after ? KMODE_GRU : KMODE_GRU_CHO) : (int)mode;
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor y = at::empty({d.T, d.B, d.H}, x.options());
  Tensor h_n = at::empty({d.B, d.H}, x.options());
  Tensor ws = at::empty({d.T, d.B, d.WD}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rnnrec_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (kmode) {
      case KMODE_TANH:
        forward_impl<scalar_t, acc_t, KMODE_TANH>(d, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, h_n, ws);
        break;
      case KMODE_RELU:
        forward_impl<scalar_t, acc_t, KMODE_RELU>(d, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, h_n, ws);
        break;
      case KMODE_GRU:
        forward_impl<scalar_t, acc_t, KMODE_GRU>(d, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, h_n, ws);
        break;
      default:
        forward_impl<scalar_t, acc_t, KMODE_GRU_CHO>(d, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, h_n, ws);
        break;
    }
  });
  return {y, h_n, ws};
}

// ---------------------------------------------------------------------------------------------
// backward (GEMM path for every size)

template <typename scalar_t, typename acc_t, int MODE>
static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Dims& d, const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& lengths, const OptTensor& resets,
    const Tensor& y, const Tensor& ws) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto st = x.scalar_type();
  const int64_t T = d.T, B = d.B, H = d.H, G = d.G, I = d.I;
  auto opts = x.options().dtype(acc);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* len_p = opt_lengths(lengths);
  const bool* res_p = opt_resets(resets);
  const unsigned int blocks = pointwise_blocks(B * H);
  const int Ti = (int)T, Bi = (int)B, Hi = (int)H;

  const Tensor gy = grad_y.to(acc);  // (T, B, H)
  const Tensor w_hh_a = w_hh.to(acc);
  // The state entering each step is not in the workspace: it is rebuilt from h0 and y (see
  // prev_state). In acc_t: for half / bfloat16, y rounded to the input dtype and upcast (as the
  // reference reads it); for float / double no copy. The RNN modes also take act'(pre) from y.
  const Tensor h0_a = h0.to(acc);  // (B, H)
  const Tensor y_a = y.to(acc);    // (T, B, H)
  // d(x W_ih^T + b_ih) per step; for the RNN modes and GRU reset_after=False this is also the
  // gradient of the W_hh products (dgh aliases dgx). GRU reset_after=True needs its own dgh.
  Tensor dgx = at::empty({T, B, G * H}, opts);
  Tensor dgh = MODE == KMODE_GRU ? at::empty({T, B, G * H}, opts) : dgx;
  Tensor carry = at::empty({B, H}, opts);
  carry.copy_(grad_h_n);
  // an inactive step's pass-through gradient, kept out of the carry's GEMM (see incoming()); only
  // read with lengths
  Tensor pass = lengths.has_value() ? at::empty({B, H}, opts) : Tensor();
  acc_t* pass_p = lengths.has_value() ? pass.data_ptr<acc_t>() : nullptr;
  Tensor drh;
  if (MODE == KMODE_GRU_CHO) drh = at::empty({B, H}, opts);

  const acc_t* gy_p = gy.data_ptr<acc_t>();
  const acc_t* h0_p = h0_a.data_ptr<acc_t>();
  const acc_t* y_p = y_a.data_ptr<acc_t>();
  const acc_t* ws_p = MODE >= KMODE_GRU ? ws.data_ptr<acc_t>() : nullptr;  // (T, B, 4H) or width 0
  for (int64_t t = T - 1; t >= 0; --t) {
    const acc_t* gy_t = gy_p + t * B * H;
    Tensor dgx_t = dgx[t];  // (B, G*H), contiguous
    Tensor dgh_t = dgh[t];
    if constexpr (MODE == KMODE_TANH || MODE == KMODE_RELU) {
      bwd_rnn_step_kernel<acc_t, MODE><<<blocks, kThreads, 0, stream>>>(
          carry.data_ptr<acc_t>(), pass_p, gy_t, y_p + t * B * H, dgx_t.data_ptr<acc_t>(), len_p, res_p,
          (int)t, Ti, Bi, Hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      carry.addmm_(dgx_t, w_hh_a);  // carry += d_pre @ W_hh
    } else if constexpr (MODE == KMODE_GRU) {
      const acc_t* ws_t = ws_p + t * B * d.WD;
      bwd_gru_step_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
          carry.data_ptr<acc_t>(), pass_p, gy_t, ws_t, h0_p, y_p, dgx_t.data_ptr<acc_t>(),
          dgh_t.data_ptr<acc_t>(), len_p, res_p, (int)t, Ti, Bi, Hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      carry.addmm_(dgh_t, w_hh_a);  // carry = g*z + dgh @ W_hh
    } else {
      const acc_t* ws_t = ws_p + t * B * d.WD;
      bwd_gru_cho_a_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
          carry.data_ptr<acc_t>(), pass_p, gy_t, ws_t, h0_p, y_p, dgx_t.data_ptr<acc_t>(), len_p, res_p,
          (int)t, Ti, Bi, Hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(drh, dgx_t.narrow(1, 2 * H, H), w_hh_a.narrow(0, 2 * H, H));  // d(r * h_prev)
      bwd_gru_cho_b_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
          carry.data_ptr<acc_t>(), drh.data_ptr<acc_t>(), ws_t, h0_p, y_p, dgx_t.data_ptr<acc_t>(),
          len_p, res_p, (int)t, Ti, Bi, Hi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      carry.addmm_(dgx_t.narrow(1, 0, 2 * H), w_hh_a.narrow(0, 0, 2 * H));
    }
  }
  Tensor grad_h0 = at::empty({B, H}, x.options());
  bwd_final_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
      carry.data_ptr<acc_t>(), pass_p, grad_h0.data_ptr<scalar_t>(), len_p, res_p, Ti, Bi, Hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // After the loop: one GEMM each for grad_x and grad_w_ih; the bias gradients are column sums.
  const Tensor dgx2 = dgx.view({T * B, G * H});
  const Tensor dgh2 = dgh.view({T * B, G * H});
  Tensor x_a = x.to(acc);
  Tensor inactive;  // (T, B, 1), where lengths are given
  if (lengths.has_value()) {  // padding past a row's length enters grad_w_ih as zeros (0 * NaN is NaN)
    const Tensor active = at::arange(T, lengths->options()).unsqueeze(1) < lengths->unsqueeze(0);  // (T, B)
    inactive = active.logical_not().unsqueeze(2);
    x_a = x_a.masked_fill(inactive, 0);
  }
  const Tensor x2 = x_a.reshape({T * B, I});
  Tensor grad_x = at::mm(dgx2, w_ih.to(acc)).view({T, B, I});
  if (inactive.defined()) grad_x.masked_fill_(inactive, 0);  // (exactly zero there, whatever W_ih holds)
  Tensor grad_w_ih = at::mm(dgx2.t(), x2);
  Tensor grad_b_ih = dgx2.sum(0);
  Tensor grad_b_hh = dgh2.sum(0);

  // grad_w_hh. MODE 3: the n rows multiplied h_in = r * h_prev (zero at inactive steps and resets).
  Tensor h_in;
  if constexpr (MODE == KMODE_GRU_CHO) {
    h_in = at::empty({T, B, H}, opts);
    gru_cho_hin_kernel<acc_t><<<pointwise_blocks(T * B * H), kThreads, 0, stream>>>(
        ws_p, h0_p, y_p, h_in.data_ptr<acc_t>(), len_p, res_p, Ti, Bi, Hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The rows that multiplied h_prev (all of W_hh, or its r and z rows for MODE 3):
  //   sum over (t, b) of dgh[t, b]^T h_prev[t, b],  h_prev = 0 at a reset or an inactive step, h0 at
  // t = 0, y[t - 1] after (as the reference's prev_states and its active mask). Without lengths or
  // resets that is dgh[0]^T h0 + dgh[1:]^T y[:-1], with no copy. With them, h_prev is built with
  // those rows zeroed: the discarded state may hold anything (a fresh state buffer's NaN, a row's h0
  // of length 0 or less, the last output of a row past its length that overflowed to inf), and
  // their zero dgh rows times it would be NaN.
  const int64_t cols = MODE == KMODE_GRU_CHO ? 2 * H : G * H;
  Tensor grad_w_hh = at::empty({G * H, H}, opts);
  Tensor w_rows = grad_w_hh.narrow(0, 0, cols);  // contiguous rows
  if (resets.has_value() || lengths.has_value()) {
    Tensor h_prev = at::empty({T, B, H}, opts);
    h_prev[0].copy_(h0_a);
    if (T > 1) h_prev.narrow(0, 1, T - 1).copy_(y_a.narrow(0, 0, T - 1));
    Tensor discard = resets.has_value() ? resets->to(at::kBool) : at::zeros({T, B}, opts.dtype(at::kBool));
    if (lengths.has_value())
      discard = discard.logical_or(at::arange(T, lengths->options()).unsqueeze(1) >= lengths->unsqueeze(0));
    h_prev.masked_fill_(discard.unsqueeze(2), 0);
    at::mm_out(w_rows, dgh2.narrow(1, 0, cols).t(), h_prev.view({T * B, H}));
  } else {
    at::mm_out(w_rows, dgh[0].narrow(1, 0, cols).t(), h0_a);
    if (T > 1) {
      w_rows.addmm_(dgh2.narrow(0, B, (T - 1) * B).narrow(1, 0, cols).t(),
                    y_a.view({T * B, H}).narrow(0, 0, (T - 1) * B));
    }
  }
  if constexpr (MODE == KMODE_GRU_CHO) {
    Tensor bottom = grad_w_hh.narrow(0, 2 * H, H);
    at::mm_out(bottom, dgh2.narrow(1, 2 * H, H).t(), h_in.view({T * B, H}));
  }
  return {grad_x.to(st), grad_h0, grad_w_ih.to(st), grad_w_hh.to(st), grad_b_ih.to(st),
          grad_b_hh.to(st)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_y_, const Tensor& grad_h_n_, const Tensor& x_, const Tensor& h0_,
    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_,
    const OptTensor& lengths_, const OptTensor& resets_, const Tensor& y_, const Tensor& ws_,
    int64_t mode, bool reset_after) {
  const Dims d = check_inputs(x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_, lengths_, resets_, mode);
  check_same(grad_y_, x_, "grad_y");
  TORCH_CHECK(grad_y_.dim() == 3 && grad_y_.size(0) == d.T && grad_y_.size(1) == d.B &&
                  grad_y_.size(2) == d.H,
              "rnnrec_fast._C_cuda: grad_y must be (T, B, H), got ", grad_y_.sizes());
  check_same(grad_h_n_, x_, "grad_h_n");
  TORCH_CHECK(grad_h_n_.dim() == 2 && grad_h_n_.size(0) == d.B && grad_h_n_.size(1) == d.H,
              "rnnrec_fast._C_cuda: grad_h_n must be (B, H), got ", grad_h_n_.sizes());
  check_same(y_, x_, "y");
  TORCH_CHECK(y_.dim() == 3 && y_.size(0) == d.T && y_.size(1) == d.B && y_.size(2) == d.H,
              "rnnrec_fast._C_cuda: y must be (T, B, H), got ", y_.sizes());
  const auto acc = at::toOpMathType(x_.scalar_type());
  TORCH_CHECK(ws_.is_cuda() && ws_.device() == x_.device(),
              "rnnrec_fast._C_cuda: ws must be on ", x_.device());
  TORCH_CHECK(ws_.scalar_type() == acc, "rnnrec_fast._C_cuda: ws must have dtype ", acc, ", got ",
              ws_.scalar_type());
  TORCH_CHECK(ws_.dim() == 3 && ws_.size(0) == d.T && ws_.size(1) == d.B && ws_.size(2) == d.WD,
              "rnnrec_fast._C_cuda: ws must be (T, B, ", d.WD, "), got ", ws_.sizes());
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor grad_y = grad_y_.contiguous(), grad_h_n = grad_h_n_.contiguous(),
               x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(),
               w_hh = w_hh_.contiguous(), y = y_.contiguous(), ws = ws_.contiguous();
  const OptTensor lengths = contig(lengths_), resets = contig(resets_);
  const int kmode = mode == 2 ? (reset_after ? KMODE_GRU : KMODE_GRU_CHO) : (int)mode;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rnnrec_cuda_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (kmode) {
      case KMODE_TANH:
        out = backward_impl<scalar_t, acc_t, KMODE_TANH>(d, grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, resets, y, ws);
        break;
      case KMODE_RELU:
        out = backward_impl<scalar_t, acc_t, KMODE_RELU>(d, grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, resets, y, ws);
        break;
      case KMODE_GRU:
        out = backward_impl<scalar_t, acc_t, KMODE_GRU>(d, grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, resets, y, ws);
        break;
      default:
        out = backward_impl<scalar_t, acc_t, KMODE_GRU_CHO>(d, grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, resets, y, ws);
        break;
    }
  });
  return out;
}

void set_forward_path(int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2,
              "rnnrec_fast._C_cuda.set_forward_path: 0 (auto), 1 (persistent when possible) or 2 (gemm)");
  g_path_override = (int)path;
}

int64_t get_forward_path() { return g_path_override.load(); }
int64_t last_forward_path() { return g_last_path.load(); }

}  // namespace rnnrec_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "rnnrec_fast CUDA kernels (fused Elman RNN / GRU recurrence)";
  m.def("forward", &rnnrec_cuda::forward, "fused forward -> (y, h_n, ws)", py::arg("x"),
        py::arg("h0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("lengths"), py::arg("resets"), py::arg("mode"), py::arg("reset_after"));
  m.def("backward", &rnnrec_cuda::backward,
        "backward -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)",
        py::arg("grad_y"), py::arg("grad_h_n"), py::arg("x"), py::arg("h0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("lengths"), py::arg("resets"),
        py::arg("y"), py::arg("ws"), py::arg("mode"), py::arg("reset_after"));
  m.def("set_forward_path", &rnnrec_cuda::set_forward_path,
        "forward path: 0 auto (persistent kernel for B <= 8 when the weights fit on chip), "
        "1 persistent whenever possible, 2 always the per-step GEMM path",
        py::arg("path"));
  m.def("get_forward_path", &rnnrec_cuda::get_forward_path);
  m.def("last_forward_path", &rnnrec_cuda::last_forward_path,
        "path of the latest forward call: 0 none yet, 1 persistent, 2 gemm");
}

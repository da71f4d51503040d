// rnnrec_fast CUDA kernels (device code). Included by rnnrec_cuda.cu only.
//
// Conventions shared by every kernel here (see rnnrec_fast/backends/reference.py for the contract):
//   * scalar_t is the tensor dtype (float, double, c10::Half, c10::BFloat16); acc_t is the compute /
//     state / workspace type (double for double, float otherwise).
//   * All matrices are row-major and contiguous. "row (t, b)" of a (T, B, X) tensor starts at
//     ((t * B) + b) * X.
//   * MODE: 0 rnn_tanh, 1 rnn_relu, 2 gru reset_after=True, 3 gru reset_after=False (Cho et al.).
//   * Gate order inside a G*H row: r, z, n (as torch.nn.GRU).
//   * lengths (int64, B) and resets (bool, T x B) live on the device and may be null. A length is
//     clamped to [0, T] in the kernel (no host synchronisation). Step t of row b is active iff
//     t < clamp(lengths[b]). A reset at (t, b) zeroes the state entering step t, and only matters
//     when step t is active for row b.
//   * Workspace ws (T, B, WD) in acc_t: WD = 0 for the RNN modes (nothing saved), WD = 4H for GRU
//     with ws[t, b] = [r, z, n, hn]; exact zeros at inactive steps. h_prev (the state entering
//     step t, reset applied) is not saved: the backward rebuilds it from h0 and y (prev_state).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace rnnrec_cuda {

namespace cg = cooperative_groups;

enum : int { KMODE_TANH = 0, KMODE_RELU = 1, KMODE_GRU = 2, KMODE_GRU_CHO = 3 };

// ---------------------------------------------------------------------------------------------
// scalar helpers

__device__ __forceinline__ float d_exp(float v) { return expf(v); }
__device__ __forceinline__ double d_exp(double v) { return exp(v); }
__device__ __forceinline__ float d_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double d_tanh(double v) { return tanh(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t d_sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + d_exp(-v));
}

template <typename acc_t>
__device__ __forceinline__ acc_t d_relu(acc_t v) {
  return (v > acc_t(0) || v != v) ? v : acc_t(0);  // NaN stays NaN, as torch.relu (fmax would drop it)
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t to_scalar(acc_t v) {
  return static_cast<scalar_t>(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Is step t active for row b? (lengths clamped to [0, T]; t is always in [0, T).)
__device__ __forceinline__ bool is_active(const int64_t* lengths, int b, int t, int T) {
  if (lengths == nullptr) return true;
  int64_t L = lengths[b];
  L = L < 0 ? 0 : (L > T ? T : L);
  return t < L;
}

// Is row b's state zeroed before step t? Only when step t is active for it. t may be == T
// (the "next step" after the last one): never a reset then.
__device__ __forceinline__ bool resets_at(const bool* resets, const int64_t* lengths, int b, int t,
                                          int B, int T) {
  if (resets == nullptr || t >= T) return false;
  return resets[(int64_t)t * B + b] && is_active(lengths, b, t, T);
}

// The gradient reaching row b's state after step t (t = -1: h0's) from the steps after it: zero
// where step t + 1 resets the row; the carry where step t + 1 is active (its partial plus the
// host's dg_{t+1} @ W_hh); else the pass-through `pass`, what an inactive step leaves unchanged.
// That one is kept apart because the host's GEMM adds 0 @ W_hh to an inactive row's carry, NaN
// wherever W_hh holds an inf or NaN (IEEE 0 * inf), where the reference selects (torch.where) and
// never reads the discarded branch. pass is only read with lengths (else every step is active).
template <typename acc_t>
__device__ __forceinline__ acc_t incoming(const acc_t* __restrict__ carry, const acc_t* __restrict__ pass,
                                          const int64_t* lengths, const bool* resets, int64_t i, int b,
                                          int t, int T, int B) {
  if (resets_at(resets, lengths, b, t + 1, B, T)) return acc_t(0);
  return (t + 1 < T && !is_active(lengths, b, t + 1, T)) ? pass[i] : carry[i];
}

// h_prev of (t, b, j), rebuilt from the forward's outputs: 0 where step t resets row b, else h0 at
// t = 0, else y[t - 1] (an active step t follows an active step t - 1, whose output is its state).
// Exact at every active step; at an inactive step the value is never used (its gradients are zero).
//   h0 (B, H) and y (T, B, H) in acc_t (for half / bfloat16: y rounded to the input dtype, upcast,
//   as the reference reads it).
template <typename acc_t>
__device__ __forceinline__ acc_t prev_state(const acc_t* __restrict__ h0, const acc_t* __restrict__ y,
                                            const int64_t* lengths, const bool* resets, int t,
                                            int64_t b, int64_t j, int T, int B, int H) {
  if (resets_at(resets, lengths, (int)b, t, B, T)) return acc_t(0);
  return t == 0 ? h0[b * H + j] : y[((int64_t)(t - 1) * B + b) * H + j];
}

// Grid-stride loop over n elements, 64-bit indices.
#define RNNREC_GRID_LOOP(i, n)                                                         \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); \
       i += (int64_t)gridDim.x * blockDim.x)

// =============================================================================================
// (b) GEMM path, forward. Per step t the host runs
//       hp = h_prev @ W_hh^T + b_hh      (cuBLAS; only the r, z rows for MODE 3)
//       [MODE 3: rh kernel, then hn = rh @ W_hn^T + b_hn (cuBLAS)]
//       fwd_step_kernel
//   with a ping-pong pair of (B, H) state buffers: hcur holds the state entering step t with the
//   reset of step t already applied (so the GEMM can read it directly); the step kernel writes
//   hnext = the state entering step t+1 with the reset of step t+1 applied.
// =============================================================================================

// hcur[b, j] = reset(0, b) ? 0 : h0[b, j]. One thread per (b, j); i = b * H + j.
template <typename scalar_t, typename acc_t>
__global__ void init_state_kernel(const scalar_t* __restrict__ h0, const int64_t* __restrict__ lengths,
                                  const bool* __restrict__ resets, acc_t* __restrict__ hcur, int T,
                                  int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int b = (int)(i / H);
    hcur[i] = resets_at(resets, lengths, b, 0, B, T) ? acc_t(0) : static_cast<acc_t>(h0[i]);
  }
}

// MODE 3 only: rh[b, j] = r * h_prev with r = sigmoid(xp_r + hp_r).
//   xp_t: (B, 3H) input projections of step t (incl. b_ih); hp: (B, 2H) = [W_hr h + b_hr, W_hz h + b_hz].
template <typename acc_t>
__global__ void gru_cho_rh_kernel(const acc_t* __restrict__ xp_t, const acc_t* __restrict__ hp,
                                  const acc_t* __restrict__ hcur, acc_t* __restrict__ rh, int B,
                                  int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int64_t b = i / H, j = i - b * H;
    const acc_t r = d_sigmoid(xp_t[b * 3 * H + j] + hp[b * 2 * H + j]);
    rh[i] = r * hcur[i];
  }
}

// One time step, pointwise. One thread per (b, j); i = b * H + j.
//   xp_t   (B, G*H)        input projections of step t (incl. b_ih)
//   hp     (B, hp_cols)    recurrent projections (incl. b_hh): G*H columns, or 2H for MODE 3
//   hn_cho (B, H)          MODE 3 only: W_hn (r * h_prev) + b_hn
//   hcur   (B, H)          state entering step t (reset applied)
//   hnext  (B, H)          out: state entering step t+1 (reset of step t+1 applied); unused at t = T-1
//   y_t    (B, H)          out (scalar_t): h_new, or exact zero when inactive
//   ws_t   (B, 4H)         out, GRU only (null for the RNN modes): [r, z, n, hn]; exact zeros when
//                          inactive
//   h_n    (B, H)          out at the last step only (else null)
template <typename scalar_t, typename acc_t, int MODE>
__global__ void fwd_step_kernel(const acc_t* __restrict__ xp_t, const acc_t* __restrict__ hp,
                                int hp_cols, const acc_t* __restrict__ hn_cho,
                                const acc_t* __restrict__ hcur, acc_t* __restrict__ hnext,
                                scalar_t* __restrict__ y_t, acc_t* __restrict__ ws_t,
                                scalar_t* __restrict__ h_n, const int64_t* __restrict__ lengths,
                                const bool* __restrict__ resets, int t, int T, int B, int H) {
  constexpr int G = MODE >= KMODE_GRU ? 3 : 1;
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int64_t b = i / H, j = i - b * H;
    const bool act = is_active(lengths, (int)b, t, T);
    const acc_t h_prev = hcur[i];
    const acc_t* xr = xp_t + b * G * H;
    const acc_t* hr = hp + b * hp_cols;
    acc_t h_new;
    if constexpr (MODE == KMODE_TANH || MODE == KMODE_RELU) {
      const acc_t pre = xr[j] + hr[j];
      h_new = MODE == KMODE_TANH ? d_tanh(pre) : d_relu(pre);
    } else {
      acc_t* wsr = ws_t + b * 4 * H;  // [r, z, n, hn]
      const acc_t r = d_sigmoid(xr[j] + hr[j]);
      const acc_t z = d_sigmoid(xr[H + j] + hr[H + j]);
      acc_t hn, n;
      if constexpr (MODE == KMODE_GRU) {
        hn = hr[2 * H + j];
        n = d_tanh(xr[2 * H + j] + r * hn);
      } else {
        hn = hn_cho[i];
        n = d_tanh(xr[2 * H + j] + hn);
      }
      h_new = (acc_t(1) - z) * n + z * h_prev;
      wsr[j] = act ? r : acc_t(0);
      wsr[H + j] = act ? z : acc_t(0);
      wsr[2 * H + j] = act ? n : acc_t(0);
      wsr[3 * H + j] = act ? hn : acc_t(0);
    }
    // Inactive: the state passes through unchanged (h_prev == the un-reset state, since a reset
    // only applies at active steps).
    const acc_t state = act ? h_new : h_prev;
    y_t[i] = act ? to_scalar<scalar_t>(h_new) : to_scalar<scalar_t>(acc_t(0));
    if (t + 1 < T) hnext[i] = resets_at(resets, lengths, (int)b, t + 1, B, T) ? acc_t(0) : state;
    if (h_n != nullptr) h_n[i] = to_scalar<scalar_t>(state);
  }
}

// =============================================================================================
// (b) GEMM path, backward. One (B, H) buffer `carry` holds the gradient flowing into the state:
//   on entry to the step-t kernel it holds the *raw* dh_prev of step t+1 (before step t+1's
//   reset mask), or grad_h_n at t = T-1; the kernel applies step t+1's reset mask (pend = t+1),
//   computes the gate gradients of step t and leaves in carry the part of dh_prev(t) that is not a
//   GEMM (g * z for GRU, 0 for RNN, or the pass-through dh at inactive steps); then the host adds
//   d_gates @ W_hh with cuBLAS (beta = 1) in place.
//   Rows of d_gates at inactive steps are exact zeros, so the GEMM adds exactly 0 there.
//   h_prev is not in the workspace: the GRU kernels rebuild it from h0 / y (prev_state), and the
//   host computes the weight gradients over h_prev rows from h0 and y directly (see backward_impl).
// =============================================================================================

// RNN modes. y_t: the forward output of step t in acc_t (act'(pre) is computed from it, exactly as
// the reference does). dg_t (B, H): d(pre) = d(x W_ih^T + b_ih) = d(h W_hh^T + b_hh).
template <typename acc_t, int MODE>
__global__ void bwd_rnn_step_kernel(acc_t* __restrict__ carry, acc_t* __restrict__ pass,
                                    const acc_t* __restrict__ gy_t,
                                    const acc_t* __restrict__ y_t, acc_t* __restrict__ dg_t,
                                    const int64_t* __restrict__ lengths,
                                    const bool* __restrict__ resets, int t, int T, int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int b = (int)(i / H);
    const acc_t dh = incoming(carry, pass, lengths, resets, i, b, t, T, B);
    const bool act = is_active(lengths, b, t, T);
    const acc_t g = dh + (act ? gy_t[i] : acc_t(0));
    const acc_t h = y_t[i];
    // relu: torch's threshold_backward, 0 where h <= 0, else g (a NaN state passes g on)
    const acc_t dg = MODE == KMODE_TANH ? g * (acc_t(1) - h * h) : (h <= acc_t(0) ? acc_t(0) : g);
    dg_t[i] = act ? dg : acc_t(0);
    carry[i] = acc_t(0);  // (+ dg @ W_hh by the host)
    if (!act) pass[i] = dh;
  }
}

// GRU reset_after=True. ws_t (B, 4H) = [r, z, n, hn] of step t; h_prev rebuilt from h0 / y
// (prev_state). Writes
//   dgx_t (B, 3H) = [dr_pre, dz_pre, dn_pre]   (gradient of x W_ih^T + b_ih)
//   dgh_t (B, 3H) = [dr_pre, dz_pre, dn_pre*r] (gradient of h W_hh^T + b_hh)
template <typename acc_t>
__global__ void bwd_gru_step_kernel(acc_t* __restrict__ carry, acc_t* __restrict__ pass,
                                    const acc_t* __restrict__ gy_t,
                                    const acc_t* __restrict__ ws_t, const acc_t* __restrict__ h0,
                                    const acc_t* __restrict__ y, acc_t* __restrict__ dgx_t,
                                    acc_t* __restrict__ dgh_t, const int64_t* __restrict__ lengths,
                                    const bool* __restrict__ resets, int t, int T, int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int64_t b = i / H, j = i - b * H;
    const acc_t dh = incoming(carry, pass, lengths, resets, i, (int)b, t, T, B);
    const bool act = is_active(lengths, (int)b, t, T);
    const acc_t g = dh + (act ? gy_t[i] : acc_t(0));
    const acc_t* w = ws_t + b * 4 * H;
    const acc_t r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
    const acc_t h_prev = prev_state(h0, y, lengths, resets, t, b, j, T, B, H);
    const acc_t dn = g * (acc_t(1) - z);
    const acc_t dz = g * (h_prev - n);
    const acc_t dn_pre = dn * (acc_t(1) - n * n);
    const acc_t dz_pre = dz * z * (acc_t(1) - z);
    const acc_t dr = dn_pre * hn;
    const acc_t dhn = dn_pre * r;
    const acc_t dr_pre = dr * r * (acc_t(1) - r);
    acc_t* gx = dgx_t + b * 3 * H;
    acc_t* gh = dgh_t + b * 3 * H;
    gx[j] = act ? dr_pre : acc_t(0);
    gx[H + j] = act ? dz_pre : acc_t(0);
    gx[2 * H + j] = act ? dn_pre : acc_t(0);
    gh[j] = act ? dr_pre : acc_t(0);
    gh[H + j] = act ? dz_pre : acc_t(0);
    gh[2 * H + j] = act ? dhn : acc_t(0);
    carry[i] = act ? g * z : acc_t(0);  // (+ dgh @ W_hh by the host)
    if (!act) pass[i] = dh;
  }
}

// GRU reset_after=False, pass A (before the d_rh GEMM). dg_t (B, 3H) is both d(x W_ih^T + b_ih)
// and d(W_hh-input products): [dr_pre, dz_pre, dn_pre]. Pass A fills the z and n thirds and leaves
// g in carry (active), or the pass-through dh in pass (inactive). ws_t (B, 4H) = [r, z, n, hn].
template <typename acc_t>
__global__ void bwd_gru_cho_a_kernel(acc_t* __restrict__ carry, acc_t* __restrict__ pass,
                                     const acc_t* __restrict__ gy_t,
                                     const acc_t* __restrict__ ws_t, const acc_t* __restrict__ h0,
                                     const acc_t* __restrict__ y, acc_t* __restrict__ dg_t,
                                     const int64_t* __restrict__ lengths,
                                     const bool* __restrict__ resets, int t, int T, int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int64_t b = i / H, j = i - b * H;
    const acc_t dh = incoming(carry, pass, lengths, resets, i, (int)b, t, T, B);
    const bool act = is_active(lengths, (int)b, t, T);
    const acc_t g = dh + (act ? gy_t[i] : acc_t(0));
    const acc_t* w = ws_t + b * 4 * H;
    const acc_t z = w[H + j], n = w[2 * H + j];
    const acc_t h_prev = prev_state(h0, y, lengths, resets, t, b, j, T, B, H);
    const acc_t dn = g * (acc_t(1) - z);
    const acc_t dz = g * (h_prev - n);
    const acc_t dn_pre = dn * (acc_t(1) - n * n);
    const acc_t dz_pre = dz * z * (acc_t(1) - z);
    acc_t* d = dg_t + b * 3 * H;
    d[H + j] = act ? dz_pre : acc_t(0);
    d[2 * H + j] = act ? dn_pre : acc_t(0);
    carry[i] = act ? g : acc_t(0);
    if (!act) pass[i] = dh;
  }
}

// GRU reset_after=False, pass B (after d_rh = dn_pre @ W_hn). Fills the r third of dg_t and sets
// carry = g * z + d_rh * r (active) / 0 (inactive); the host then adds dg[:, :2H] @ W_hh[:2H].
template <typename acc_t>
__global__ void bwd_gru_cho_b_kernel(acc_t* __restrict__ carry, const acc_t* __restrict__ drh,
                                     const acc_t* __restrict__ ws_t, const acc_t* __restrict__ h0,
                                     const acc_t* __restrict__ y, acc_t* __restrict__ dg_t,
                                     const int64_t* __restrict__ lengths,
                                     const bool* __restrict__ resets, int t, int T, int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int64_t b = i / H, j = i - b * H;
    const bool act = is_active(lengths, (int)b, t, T);
    const acc_t* w = ws_t + b * 4 * H;
    const acc_t r = w[j], z = w[H + j];
    const acc_t h_prev = prev_state(h0, y, lengths, resets, t, b, j, T, B, H);
    const acc_t d_rh = drh[i];
    const acc_t dr_pre = d_rh * h_prev * r * (acc_t(1) - r);
    dg_t[b * 3 * H + j] = act ? dr_pre : acc_t(0);
    carry[i] = act ? carry[i] * z + d_rh * r : acc_t(0);  // (+ dg[:, :2H] @ W_hh[:2H] by the host)
  }
}

// GRU reset_after=False, after the loop: h_in (T, B, H) = r * h_prev, what the n rows of W_hh
// multiplied (zero at inactive steps and at resets).
// One thread per (t, b, j); i = (t * B + b) * H + j. ws (T, B, 4H).
template <typename acc_t>
__global__ void gru_cho_hin_kernel(const acc_t* __restrict__ ws, const acc_t* __restrict__ h0,
                                   const acc_t* __restrict__ y, acc_t* __restrict__ h_in,
                                   const int64_t* __restrict__ lengths,
                                   const bool* __restrict__ resets, int T, int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)T * B * H) {
    const int64_t row = i / H, j = i - row * H;  // row = t * B + b
    const int64_t t = row / B, b = row - t * B;
    // zero at an inactive step, not r * h_prev: its r is zero in the workspace, but its h_prev may
    // be NaN (the h0 of a row of length 0, which may hold anything)
    h_in[i] = is_active(lengths, (int)b, (int)t, T)
                  ? ws[row * 4 * H + j] * prev_state(h0, y, lengths, resets, (int)t, b, j, T, B, H)
                  : acc_t(0);
  }
}

// grad_h0[b, j] = reset(0, b) ? 0 : carry[b, j]   (cast to scalar_t).
template <typename scalar_t, typename acc_t>
__global__ void bwd_final_kernel(const acc_t* __restrict__ carry, const acc_t* __restrict__ pass,
                                 scalar_t* __restrict__ grad_h0, const int64_t* __restrict__ lengths,
                                 const bool* __restrict__ resets, int T, int B, int H) {
  RNNREC_GRID_LOOP(i, (int64_t)B * H) {
    const int b = (int)(i / H);
    grad_h0[i] = to_scalar<scalar_t>(incoming(carry, pass, lengths, resets, i, b, -1, T, B));
  }
}

// =============================================================================================
// (a) Persistent forward kernel for small batches (B <= PB_MAXB): one cooperative launch runs the
// whole sequence. Block k owns the hidden units [j0, j0 + nu), j0 = k * U, and keeps the G rows of
// W_hh for each of them in shared memory for all T steps:
//     wsm[(g * U + u) * H + k] = W_hh[g * H + j0 + u, k]     (g < G, u < nu, k < H)
// so a warp reading one row with lane-strided k is coalesced and bank-conflict free.
// Per step t:
//   1. stage the full state entering step t (all B rows, reset applied) into shared memory hs
//      (read with __ldcg: it was written by other blocks, so bypass the non-coherent L1);
//   2. one warp per (gate, unit) row: B dot products of length H, warp-reduced into gsum;
//   3. pointwise gate math for the block's (b, unit) pairs, written to y / ws (GRU) / the next state;
//   4. grid.sync() (the state buffers ping-pong between steps, so one barrier per step suffices).
// MODE 3 (Cho) needs r * h_prev of all units before W_hn: phase 1 does the r, z rows and writes
// rh to global memory, grid.sync(), phase 2 stages rh and does the n rows: two barriers per step.
// =============================================================================================

constexpr int PB_THREADS = 256;
constexpr int PB_MAXB = 8;

template <typename scalar_t, typename acc_t>
struct PersistParams {
  const acc_t* xp;        // (T, B, G*H) input projections incl. b_ih
  const scalar_t* w_hh;   // (G*H, H)
  const acc_t* b_hh;      // (G*H) or null
  const scalar_t* h0;     // (B, H)
  const int64_t* lengths; // (B) or null
  const bool* resets;     // (T, B) or null
  scalar_t* y;            // (T, B, H)
  scalar_t* h_n;          // (B, H)
  acc_t* ws;              // (T, B, 4H) GRU: [r, z, n, hn]; null for the RNN modes (width 0)
  acc_t* hbuf;            // (2, B, H) ping-pong state (without the next step's reset)
  acc_t* rh;              // (B, H) MODE 3 only, else null
  int T, B, H, U;
};

// Shared-memory bytes of the persistent kernel (host and device agree on this layout):
//   hs    acc_t [B][H]            staged state (or rh in MODE 3 phase 2)
//   gsum  acc_t [G][U][PB_MAXB]   dot products + b_hh
//   hmine acc_t [PB_MAXB][U]      the block's own units of h_prev (reset applied)
//   (pad to 16 bytes)
//   wsm   scalar_t [G][U][H]      the block's rows of W_hh
template <typename scalar_t, typename acc_t>
__host__ __device__ inline size_t persist_acc_bytes(int G, int B, int H, int U) {
  size_t n = (size_t)B * H + (size_t)G * U * PB_MAXB + (size_t)PB_MAXB * U;
  return (n * sizeof(acc_t) + 15) & ~(size_t)15;
}
template <typename scalar_t, typename acc_t>
__host__ __device__ inline size_t persist_smem_bytes(int G, int B, int H, int U) {
  return persist_acc_bytes<scalar_t, acc_t>(G, B, H, U) + (size_t)G * U * H * sizeof(scalar_t);
}

// Rows [g_begin, g_end) x [0, nu) of the block's weights times the staged vectors hs:
//   gsum[(g * U + u) * PB_MAXB + b] = sum_k wsm[(g*U+u)*H + k] * hs[b*H + k] + b_hh[g*H + j0 + u]
// One warp per row (warp-uniform loop, so the full-mask shuffles are safe); lane l handles
// k = l, l + 32, ...; PB_MAXB accumulators in registers, rows b >= B skipped.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_dots(const scalar_t* wsm, const acc_t* hs, acc_t* gsum,
                                           const acc_t* b_hh, int g_begin, int g_end, int nu,
                                           int U, int H, int B, int j0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int nrows = (g_end - g_begin) * nu;
  for (int row = warp; row < nrows; row += nwarps) {
    const int g = g_begin + row / nu, u = row % nu;
    const scalar_t* w = wsm + ((size_t)g * U + u) * H;
    acc_t a[PB_MAXB];
#pragma unroll
    for (int b = 0; b < PB_MAXB; ++b) a[b] = acc_t(0);
    for (int k = lane; k < H; k += 32) {
      const acc_t wk = static_cast<acc_t>(w[k]);
#pragma unroll
      for (int b = 0; b < PB_MAXB; ++b)
        if (b < B) a[b] += wk * hs[(size_t)b * H + k];
    }
#pragma unroll
    for (int b = 0; b < PB_MAXB; ++b) a[b] = warp_sum(a[b]);
    if (lane == 0) {
      const acc_t bias = b_hh != nullptr ? b_hh[(size_t)g * H + j0 + u] : acc_t(0);
#pragma unroll
      for (int b = 0; b < PB_MAXB; ++b)
        if (b < B) gsum[((size_t)g * U + u) * PB_MAXB + b] = a[b] + bias;
    }
  }
}

template <typename scalar_t, typename acc_t, int MODE>
__global__ void __launch_bounds__(PB_THREADS)
    persistent_fwd_kernel(const PersistParams<scalar_t, acc_t> p) {
  constexpr int G = MODE >= KMODE_GRU ? 3 : 1;
  constexpr int G1 = MODE == KMODE_GRU_CHO ? 2 : G;  // gates of phase 1
  cg::grid_group grid = cg::this_grid();
  const int T = p.T, B = p.B, H = p.H, U = p.U;
  const int j0 = blockIdx.x * U;
  const int nu = min(U, H - j0);  // >= 1: the host launches ceil(H / U) blocks
  const int tid = threadIdx.x, nthreads = blockDim.x;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* hs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gsum = hs + (size_t)B * H;
  acc_t* hmine = gsum + (size_t)G * U * PB_MAXB;
  scalar_t* wsm = reinterpret_cast<scalar_t*>(smem_raw + persist_acc_bytes<scalar_t, acc_t>(G, B, H, U));

  // Load the block's weight rows once. idx enumerates (g, u, k) with k fastest, so consecutive
  // threads read consecutive addresses of one W_hh row.
  const int64_t nw = (int64_t)G * nu * H;
  for (int64_t idx = tid; idx < nw; idx += nthreads) {
    const int64_t g = idx / ((int64_t)nu * H);
    const int64_t rem = idx - g * nu * H;
    const int64_t u = rem / H, k = rem - u * H;
    wsm[(g * U + u) * H + k] = p.w_hh[(g * H + j0 + u) * H + k];
  }

  for (int t = 0; t < T; ++t) {
    const acc_t* cur = p.hbuf + (size_t)(t & 1) * B * H;
    acc_t* nxt = p.hbuf + (size_t)((t + 1) & 1) * B * H;

    // 1. stage h_prev (all B x H), reset applied; step 0 reads h0 directly.
    for (int idx = tid; idx < B * H; idx += nthreads) {
      const int b = idx / H;
      acc_t v;
      if (resets_at(p.resets, p.lengths, b, t, B, T)) v = acc_t(0);
      else if (t == 0) v = static_cast<acc_t>(p.h0[idx]);
      else v = __ldcg(cur + idx);
      hs[idx] = v;
    }
    __syncthreads();
    for (int idx = tid; idx < B * nu; idx += nthreads) {
      const int b = idx / nu, u = idx - b * nu;
      hmine[b * U + u] = hs[(size_t)b * H + j0 + u];
    }
    // 2. dot products of phase 1 (all gates, or r and z for MODE 3).
    block_dots<scalar_t, acc_t>(wsm, hs, gsum, p.b_hh, 0, G1, nu, U, H, B, j0);
    __syncthreads();

    if constexpr (MODE == KMODE_GRU_CHO) {
      // rh = r * h_prev for the block's units -> global, visible to all blocks after grid.sync.
      for (int idx = tid; idx < B * nu; idx += nthreads) {
        const int b = idx / nu, u = idx - b * nu, j = j0 + u;
        const acc_t* xr = p.xp + ((size_t)t * B + b) * G * H;
        const acc_t r = d_sigmoid(xr[j] + gsum[((size_t)0 * U + u) * PB_MAXB + b]);
        p.rh[(size_t)b * H + j] = r * hmine[b * U + u];
      }
      grid.sync();
      for (int idx = tid; idx < B * H; idx += nthreads) hs[idx] = __ldcg(p.rh + idx);
      __syncthreads();
      block_dots<scalar_t, acc_t>(wsm, hs, gsum, p.b_hh, 2, 3, nu, U, H, B, j0);
      __syncthreads();
    }

    // 3. pointwise: one thread per (b, unit) pair of this block.
    for (int idx = tid; idx < B * nu; idx += nthreads) {
      const int b = idx / nu, u = idx - b * nu, j = j0 + u;
      const bool act = is_active(p.lengths, b, t, T);
      const acc_t h_prev = hmine[b * U + u];
      const size_t row = (size_t)t * B + b;  // (t, b) row index
      const acc_t* xr = p.xp + row * G * H;
      acc_t h_new;
      if constexpr (MODE == KMODE_TANH || MODE == KMODE_RELU) {
        const acc_t pre = xr[j] + gsum[(size_t)u * PB_MAXB + b];
        h_new = MODE == KMODE_TANH ? d_tanh(pre) : d_relu(pre);
      } else {
        acc_t* wsr = p.ws + row * 4 * H;  // [r, z, n, hn]
        const acc_t r = d_sigmoid(xr[j] + gsum[((size_t)0 * U + u) * PB_MAXB + b]);
        const acc_t z = d_sigmoid(xr[H + j] + gsum[((size_t)1 * U + u) * PB_MAXB + b]);
        const acc_t hn = gsum[((size_t)2 * U + u) * PB_MAXB + b];
        const acc_t n = MODE == KMODE_GRU ? d_tanh(xr[2 * H + j] + r * hn) : d_tanh(xr[2 * H + j] + hn);
        h_new = (acc_t(1) - z) * n + z * h_prev;
        wsr[j] = act ? r : acc_t(0);
        wsr[H + j] = act ? z : acc_t(0);
        wsr[2 * H + j] = act ? n : acc_t(0);
        wsr[3 * H + j] = act ? hn : acc_t(0);
      }
      const acc_t state = act ? h_new : h_prev;
      p.y[row * H + j] = act ? to_scalar<scalar_t>(h_new) : to_scalar<scalar_t>(acc_t(0));
      nxt[(size_t)b * H + j] = state;
      if (t == T - 1) p.h_n[(size_t)b * H + j] = to_scalar<scalar_t>(state);
    }
    // 4. all blocks' states for step t+1 are written before anyone stages them. (Also a block-wide
    //    barrier: hs / hmine / gsum are reused by the next step.)
    if (t + 1 < T) grid.sync();
  }
}

}  // namespace rnnrec_cuda

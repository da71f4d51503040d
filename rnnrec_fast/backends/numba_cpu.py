"""Numba ``@njit`` CPU kernels of the fused RNN / GRU recurrence (forward and backward).

The functions here work on NumPy arrays only (``numba_backend`` turns torch tensors into NumPy views
and back). The math, the workspace layout and the handling of ``lengths`` / ``resets`` follow
``reference.py`` exactly; see its docstring.

Layout of the work:
  * forward: the input projection of every step ``xp = x W_ih^T`` is one GEMM done by the caller
    (BLAS, through torch), and so, for batches of GH0_MIN_ROWS rows or more, is step 0's recurrent
    product ``h0 W_hh^T`` (it needs nothing but h0; at T = 1 it is the whole recurrent work); the
    kernel runs the whole time loop: the biases, the recurrent product ``h_prev W_hh^T`` of the
    other steps for the rows active at step t (a small register-blocked GEMM, written here since
    Numba only calls BLAS through SciPy) and the fused gate math, writing ``y``, ``h_n`` and the
    workspace ``ws`` (width 0 when no backward follows: nothing kept). Calls of a few rows
    (PROJECT_MAX_ROWS) do their input projection in the kernel too (``forward_projected``); large
    batches and weights (``blas_steps``) get every step's first product from BLAS, one kernel
    call per step (``forward_stepped``).
  * backward: the kernel runs the reverse time loop and writes the gradients of the pre-activations
    ``d_gx`` (of ``x W_ih^T + b_ih``) and ``d_gh`` (of ``h W_hh^T + b_hh``; for GRU with
    ``reset_after=False`` the n rows act on ``r * h_prev``, saved in ``h_in``) plus ``grad_h0``; the
    caller turns them into ``grad_x`` / ``grad_w_*`` / ``grad_b_*`` with a GEMM or two each. The
    state entering each step, ``h_prev``, is not in the workspace: the kernel (GRU) and the caller
    (``grad_w_hh``, see ``numba_backend._weight_grads``) take it from ``h0``, ``y`` and ``resets``.

Batch rows are independent through the whole recurrence, so for large batches the batch is split
into chunks run by a thread pool (the kernels release the GIL); each chunk runs the full time loop
on its own: no synchronisation per step, and no second (parallel=True) compilation of the kernels.
A chunk must carry enough product work to pay for the pool's hand-over (PARALLEL_MIN_WORK).
The number of threads is ``torch.get_num_threads()`` capped by NUMBA_NUM_THREADS.

Every kernel is compiled once per dtype (float32 / float64); the mode, ``reset_after`` and the
presence of resets are run-time arguments; a missing bias / lengths / resets is passed as zeros /
``T`` / a dummy array by the caller, so the number of specialisations stays small.
"""
from __future__ import annotations

import os
import threading

import numpy as np
from numba import config as _numba_config

from .._numba import njit

MODE_RNN_TANH = 0
MODE_RNN_RELU = 1
MODE_GRU = 2


# --------------------------------------------------------------------------------------------------
# small GEMMs (written here since Numba only calls BLAS through SciPy). The rows of A and O are
# picked through idx (the rows active at this step); the loops index the arrays directly (a slice
# costs an atomic reference-count pair, which in these loops cost more than the arithmetic), and
# every vectorised loop runs over range(N) from 0 so that Numba's negative-index wraparound folds
# away. The sums are reassociated (fastmath) and so ordered differently from torch: rounding only.
#
# "axpy" form, on W^T: O[r, :] += A[r, k] * W^T[k, :]. The inner loop is contiguous over the
#   output columns and needs no horizontal reduction; a block of 4 rows x 4 k shares each vector
#   of 4 W^T rows between 16 FMAs (per vector: 4 loads of W^T, 4 loads and 4 stores of O).
# "NT" form, on W as stored: dot products of A rows and W rows, 4 x 4 register blocks. Each output
#   ends with a horizontal reduction, which is cheap only for long rows (large K); it needs no
#   transposed copy of W, so the forward uses it for large H and for few row-steps.
# Both walk W in blocks small enough to stay in L2 while every row of A uses them.
# --------------------------------------------------------------------------------------------------
_GEMM_FM = {"reassoc", "contract", "nsz"}
_AXPY_KB = 128  # rows of W^T per block of the axpy form
_NT_JB = 64  # rows of W per block of the NT form


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=_GEMM_FM)
def _gemm_axpy(A, ar0, ac0, idx, n, WT, k0, K, N, O):
    """O[idx[i], j] += sum_k A[ar0 + idx[i], ac0 + k] * WT[k0 + k, j] for i < n, j < N, k < K."""
    for kb in range(0, K, _AXPY_KB):
        ke = min(kb + _AXPY_KB, K)
        i = 0
        while i + 4 <= n:
            r0 = idx[i]
            r1 = idx[i + 1]
            r2 = idx[i + 2]
            r3 = idx[i + 3]
            k = kb
            while k + 4 <= ke:
                a00 = A[ar0 + r0, ac0 + k]
                a01 = A[ar0 + r0, ac0 + k + 1]
                a02 = A[ar0 + r0, ac0 + k + 2]
                a03 = A[ar0 + r0, ac0 + k + 3]
                a10 = A[ar0 + r1, ac0 + k]
                a11 = A[ar0 + r1, ac0 + k + 1]
                a12 = A[ar0 + r1, ac0 + k + 2]
                a13 = A[ar0 + r1, ac0 + k + 3]
                a20 = A[ar0 + r2, ac0 + k]
                a21 = A[ar0 + r2, ac0 + k + 1]
                a22 = A[ar0 + r2, ac0 + k + 2]
                a23 = A[ar0 + r2, ac0 + k + 3]
                a30 = A[ar0 + r3, ac0 + k]
                a31 = A[ar0 + r3, ac0 + k + 1]
                a32 = A[ar0 + r3, ac0 + k + 2]
                a33 = A[ar0 + r3, ac0 + k + 3]
                w = k0 + k
                for j in range(N):
                    w0 = WT[w, j]
                    w1 = WT[w + 1, j]
                    w2 = WT[w + 2, j]
                    w3 = WT[w + 3, j]
                    O[r0, j] += a00 * w0 + a01 * w1 + a02 * w2 + a03 * w3
                    O[r1, j] += a10 * w0 + a11 * w1 + a12 * w2 + a13 * w3
                    O[r2, j] += a20 * w0 + a21 * w1 + a22 * w2 + a23 * w3
                    O[r3, j] += a30 * w0 + a31 * w1 + a32 * w2 + a33 * w3
                k += 4
            while k < ke:
                a0 = A[ar0 + r0, ac0 + k]
                a1 = A[ar0 + r1, ac0 + k]
                a2 = A[ar0 + r2, ac0 + k]
                a3 = A[ar0 + r3, ac0 + k]
                w = k0 + k
                for j in range(N):
                    w0 = WT[w, j]
                    O[r0, j] += a0 * w0
                    O[r1, j] += a1 * w0
                    O[r2, j] += a2 * w0
                    O[r3, j] += a3 * w0
                k += 1
            i += 4
        while i < n:
            r0 = idx[i]
            k = kb
            while k + 4 <= ke:
                a0 = A[ar0 + r0, ac0 + k]
                a1 = A[ar0 + r0, ac0 + k + 1]
                a2 = A[ar0 + r0, ac0 + k + 2]
                a3 = A[ar0 + r0, ac0 + k + 3]
                w = k0 + k
                for j in range(N):
                    O[r0, j] += a0 * WT[w, j] + a1 * WT[w + 1, j] + a2 * WT[w + 2, j] + a3 * WT[w + 3, j]
                k += 4
            while k < ke:
                a0 = A[ar0 + r0, ac0 + k]
                w = k0 + k
                for j in range(N):
                    O[r0, j] += a0 * WT[w, j]
                k += 1
            i += 1


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=_GEMM_FM)
def _gemm_nt(A, idx, n, W, O):
    """O[idx[i], j] += sum_k A[idx[i], k] * W[j, k] for i < n, j < W.shape[0], k < A.shape[1]."""
    N = W.shape[0]
    K = A.shape[1]
    zero = O.dtype.type(0)
    for jb in range(0, N, _NT_JB):
        je = min(jb + _NT_JB, N)
        i = 0
        while i + 4 <= n:
            r0 = idx[i]
            r1 = idx[i + 1]
            r2 = idx[i + 2]
            r3 = idx[i + 3]
            j = jb
            while j + 4 <= je:  # 4 x 4 block: 8 vector loads feed 16 FMAs per k step
                s00 = zero
                s01 = zero
                s02 = zero
                s03 = zero
                s10 = zero
                s11 = zero
                s12 = zero
                s13 = zero
                s20 = zero
                s21 = zero
                s22 = zero
                s23 = zero
                s30 = zero
                s31 = zero
                s32 = zero
                s33 = zero
                for k in range(K):
                    v0 = W[j, k]
                    v1 = W[j + 1, k]
                    v2 = W[j + 2, k]
                    v3 = W[j + 3, k]
                    x0 = A[r0, k]
                    x1 = A[r1, k]
                    x2 = A[r2, k]
                    x3 = A[r3, k]
                    s00 += x0 * v0
                    s01 += x0 * v1
                    s02 += x0 * v2
                    s03 += x0 * v3
                    s10 += x1 * v0
                    s11 += x1 * v1
                    s12 += x1 * v2
                    s13 += x1 * v3
                    s20 += x2 * v0
                    s21 += x2 * v1
                    s22 += x2 * v2
                    s23 += x2 * v3
                    s30 += x3 * v0
                    s31 += x3 * v1
                    s32 += x3 * v2
                    s33 += x3 * v3
                O[r0, j] += s00
                O[r0, j + 1] += s01
                O[r0, j + 2] += s02
                O[r0, j + 3] += s03
                O[r1, j] += s10
                O[r1, j + 1] += s11
                O[r1, j + 2] += s12
                O[r1, j + 3] += s13
                O[r2, j] += s20
                O[r2, j + 1] += s21
                O[r2, j + 2] += s22
                O[r2, j + 3] += s23
                O[r3, j] += s30
                O[r3, j + 1] += s31
                O[r3, j + 2] += s32
                O[r3, j + 3] += s33
                j += 4
            while j < je:
                s00 = zero
                s10 = zero
                s20 = zero
                s30 = zero
                for k in range(K):
                    v0 = W[j, k]
                    s00 += A[r0, k] * v0
                    s10 += A[r1, k] * v0
                    s20 += A[r2, k] * v0
                    s30 += A[r3, k] * v0
                O[r0, j] += s00
                O[r1, j] += s10
                O[r2, j] += s20
                O[r3, j] += s30
                j += 1
            i += 4
        while i < n:
            r0 = idx[i]
            j = jb
            while j + 4 <= je:
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                for k in range(K):
                    x = A[r0, k]
                    s0 += x * W[j, k]
                    s1 += x * W[j + 1, k]
                    s2 += x * W[j + 2, k]
                    s3 += x * W[j + 3, k]
                O[r0, j] += s0
                O[r0, j + 1] += s1
                O[r0, j + 2] += s2
                O[r0, j + 3] += s3
                j += 4
            while j < je:
                s0 = zero
                for k in range(K):
                    s0 += A[r0, k] * W[j, k]
                O[r0, j] += s0
                j += 1
            i += 1


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _matmul_rows(A, idx, n, Wm, transposed, O):
    """O[idx[i], :] += A[idx[i], :] @ W^T for i < n; Wm is W^T (K, N) when transposed, else W (N, K)."""
    if transposed:
        _gemm_axpy(A, 0, 0, idx, n, Wm, 0, Wm.shape[0], Wm.shape[1], O)
    else:
        _gemm_nt(A, idx, n, Wm, O)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _transposed(w, G, Hp):
    """W^T for the axpy form: w (G*H, K), G gate blocks of H rows, becomes (K, G*Hp) with
    out[k, g*Hp + j] = w[g*H + j, k]; the Hp - H columns after each block are zero (padding to a
    whole number of vectors: no scalar remainder in the GEMM's inner loop). 8 rows of w at a time,
    so that each row of the result gets 8 contiguous values per pass."""
    GH, K = w.shape
    H = GH // G if G > 0 else 0
    out = np.empty((K, G * Hp), w.dtype)  # (np.zeros: calloc, fresh pages to fault in)
    for g in range(G):
        w0 = g * H  # first row of the block in w, first column in out
        o0 = g * Hp
        for k in range(K):
            for j in range(Hp - H):
                out[k, o0 + H + j] = 0.0
        j = 0
        while j + 8 <= H:
            for k in range(K):
                out[k, o0 + j] = w[w0 + j, k]
                out[k, o0 + j + 1] = w[w0 + j + 1, k]
                out[k, o0 + j + 2] = w[w0 + j + 2, k]
                out[k, o0 + j + 3] = w[w0 + j + 3, k]
                out[k, o0 + j + 4] = w[w0 + j + 4, k]
                out[k, o0 + j + 5] = w[w0 + j + 5, k]
                out[k, o0 + j + 6] = w[w0 + j + 6, k]
                out[k, o0 + j + 7] = w[w0 + j + 7, k]
            j += 8
        while j < H:
            for k in range(K):
                out[k, o0 + j] = w[w0 + j, k]
            j += 1
    return out


# --------------------------------------------------------------------------------------------------
# activations, vectorised. libm's exp / tanh are scalar calls (~3 ns and ~13 ns each here) and
# dominated the GRU step; these loops have no calls, so LLVM vectorises them.
# exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-12 Taylor polynomial (relative
# error ~3e-16), times 2^n built from its bits. Below -708 exp gives 0 (the exact value is a
# denormal at most: sigmoid / tanh results then differ from the exact ones by < 1e-300), above 709
# inf (float32: -87, 88), so the infinities come out exact (sigmoid(-inf) = 0, as in torch). NaN
# propagates.
# tanh: (1 - e) / (1 + e) with e = exp(-2|x|) for |x| >= 1/16 (relative error ~1e-15), a Taylor
# polynomial below (error < 1e-16 relative). Computed in the array's precision (float32: degree-7
# exp polynomial, int32 exponent bits; relative errors a few float32 ulp). The polynomials use
# FMAs (fastmath "contract": fewer roundings, half the instructions). The 2^n factor goes through
# memory (the bits stored as integers, read back as floats); that read is folded into the
# sigmoid / tanh pass that follows, so each activation is two passes over the data.
# --------------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.4286068203094173e-06
_E2 = 1.0 / 2.0
_E3 = 1.0 / 6.0
_E4 = 1.0 / 24.0
_E5 = 1.0 / 120.0
_E6 = 1.0 / 720.0
_E7 = 1.0 / 5040.0
_E8 = 1.0 / 40320.0
_E9 = 1.0 / 362880.0
_E10 = 1.0 / 3628800.0
_E11 = 1.0 / 39916800.0
_E12 = 1.0 / 479001600.0


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _exp_parts(src, scale, absolute, dst, ib, m):
    """exp(x_j) = dst[j] * 2^n_j for x_j = scale * src[j] (scale * |src[j]| if absolute), j < m:
    dst[j] gets the polynomial, ib[j] the bits of the float 2^n_j (the caller reads them through
    a float view of ib's memory and folds the product into its own pass). Computed in src's
    precision."""
    c = src.dtype.type
    single = src.itemsize == 4
    lo = c(-87.0) if single else c(-708.0)
    hi = c(88.0) if single else c(709.0)
    bias = 127 if single else 1023
    shift = 23 if single else 52
    log2e = c(_LOG2E)
    ln2_hi = c(0.693359375) if single else c(_LN2_HI)
    ln2_lo = c(-2.12194440e-4) if single else c(_LN2_LO)
    half = c(0.5)
    one = c(1.0)
    zero = c(0.0)
    inf = c(np.inf)
    e2, e3, e4, e5, e6, e7 = c(_E2), c(_E3), c(_E4), c(_E5), c(_E6), c(_E7)
    e8, e9, e10, e11, e12 = c(_E8), c(_E9), c(_E10), c(_E11), c(_E12)
    for j in range(m):
        v = src[j]
        if absolute:
            v = abs(v)
        v = scale * v
        x = v
        if x < lo:
            x = lo
        if x > hi:
            x = hi
        n = np.floor(x * log2e + half)  # same float type (math.floor would give an int)
        r = x - n * ln2_hi
        r = r - n * ln2_lo
        if single:
            p = one + r * (one + r * (e2 + r * (e3 + r * (e4 + r * (e5 + r * (e6 + r * e7))))))
        else:
            p = one + r * (one + r * (e2 + r * (e3 + r * (e4 + r * (e5 + r * (e6 + r * (
                e7 + r * (e8 + r * (e9 + r * (e10 + r * (e11 + r * e12)))))))))))
        if v < lo:  # exp underflows: 0 (a denormal at most), exactly 0 for -inf
            p = zero
        if v > hi:  # exp overflows: inf (so sigmoid(-inf) is exactly 0, as in torch)
            p = inf
        if v != v:
            p = v
        dst[j] = p
        # |n| < 1100: the int32 conversion is faster; the sum in int64 (as compiled, where the int
        # literal widens it; interpreted, NUMBA_DISABLE_JIT=1, NumPy kept int32 and << 52 overflowed)
        ib[j] = (np.int64(np.int32(n)) + bias) << shift


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _vsigmoid(u, e, ib, fb, m):
    """u[:m] = sigmoid(u[:m]) = 1 / (1 + exp(-u)) in place. e, fb: scratch of u's dtype, ib: fb's
    memory viewed as the integer type of the same size (int32 / int64)."""
    one = u.dtype.type(1.0)
    _exp_parts(u, -one, False, e, ib, m)
    for j in range(m):
        u[j] = one / (one + e[j] * fb[j])


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _vtanh(v, e, ib, fb, m):
    """v[:m] = tanh(v[:m]) in place; e scratch of v's dtype."""
    c = v.dtype.type
    one = c(1.0)
    t3, t5, t7 = c(-1.0 / 3.0), c(2.0 / 15.0), c(-17.0 / 315.0)
    t9, t11 = c(62.0 / 2835.0), c(-1382.0 / 155925.0)
    small_lim = c(0.0625)
    _exp_parts(v, c(-2.0), True, e, ib, m)
    for j in range(m):
        x = v[j]
        x2 = x * x
        small = x * (one + x2 * (t3 + x2 * (t5 + x2 * (t7 + x2 * (t9 + x2 * t11)))))
        ex = e[j] * fb[j]
        big = (one - ex) / (one + ex)
        if x < 0:
            big = -big
        v[j] = small if abs(x) < small_lim else big


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _fwd_rows(xp, bih, h0, w1, wn, transposed, bhh, gh0, has_gh0, lengths, resets, has_resets, mode,
              reset_after, y, h_n, ws, int_like, b0, b1):
    """Forward of batch rows [b0, b1) over all steps.

    xp (T, B, G*H) input projections x W_ih^T (without b_ih); bih, bhh (G*H,). The recurrent weights: w1 the rows
    of W_hh used by the first product of a step (all G*H, or the r, z rows for GRU with
    reset_after=False), wn the n rows for that second product (else unused); each stored as is
    (N, H) or, when transposed, as made by ``_transposed`` (H, N') with padded gate blocks.
    When has_gh0, gh0 (B, N1) holds the first product of step 0, h0 W1^T (N1 = the rows of w1,
    no bias), computed by the caller with BLAS on h0 zeroed where the row resets at step 0 (the
    product of a reset state is 0 W1^T, NaN where W1 holds inf or NaN, as in the reference).
    Writes y (T, B, H), h_n (B, H) and ws (T, B, W) for these rows: W = 4*H, [r, z, n, hn] for GRU;
    W = 0 for the RNN modes, and for a GRU forward that no backward follows (nothing written).
    int_like: an array of the integer type of the float's size (int32 for float32, int64 for
    float64).
    """
    T = xp.shape[0]
    B = xp.shape[1]
    H = h0.shape[1]
    GH = xp.shape[2]
    G = GH // H if H > 0 else 1
    WG = ws.shape[2] // H if H > 0 else 1
    nb = b1 - b0
    gru = mode == MODE_GRU
    split = gru and not reset_after
    dt = h0.dtype
    one = dt.type(1.0)
    # (.., G, H) views: the gate blocks are indexed [.., g, j] with j from 0, no slices per row
    xp4 = xp.reshape((T, B, G, H))
    ws4 = ws.reshape((T, B, WG, H))
    bhh2 = bhh.reshape((G, H))
    bih2 = bih.reshape((G, H))
    # the state, updated in place: at step t it is the state entering the step (zeroed by a reset)
    # until the last pass writes the new one (element by element, after reading the old)
    h = np.empty((nb, H), dt)
    for i in range(nb):
        for k in range(H):
            h[i, k] = h0[b0 + i, k]
    # h_prev W_hh^T + b_hh, gate blocks padded to Hp like the columns of a transposed w1
    Hp = w1.shape[1] // (2 if split else G) if transposed else H
    acc = np.zeros((nb, G, Hp), dt)
    acc2 = acc.reshape((nb, G * Hp))
    accn = np.zeros((nb, Hp), dt)  # gru, reset_after=False: (r * h_prev) W_hn^T + b_hn
    rh = np.empty((nb, H), dt)
    # activations of all active rows at once (row q of these is batch row b0 + idx[q]): one long
    # vectorised loop per step instead of short ones per row
    rz = np.empty((nb, 2, H), dt)  # r, z
    nv = np.empty((nb, H), dt)  # n (or the new state of an RNN)
    e = np.empty(nb * 2 * H, dt)
    fb = np.empty(nb * 2 * H, dt)
    ib = fb.view(int_like.dtype)
    rz1 = rz.reshape(nb * 2 * H)
    nv1 = nv.reshape(nb * H)
    idx = np.empty(nb, np.int64)
    for t in range(T):
        nact = 0
        for i in range(nb):
            b = b0 + i
            if t < lengths[b]:
                idx[nact] = i
                nact += 1
                reset = has_resets and resets[t, b]
                if reset:
                    for k in range(H):
                        h[i, k] = 0.0
                for g in range(G):
                    for j in range(H):
                        acc[i, g, j] = bhh2[g, j]
                if t == 0 and has_gh0:  # (computed on the state zeroed where it resets)
                    for g in range(2 if split else G):
                        for j in range(H):
                            acc[i, g, j] += gh0[b, g * H + j]
            else:
                for k in range(H):
                    y[t, b, k] = 0.0
                for g in range(WG):
                    for k in range(H):
                        ws4[t, b, g, k] = 0.0
        if nact == 0:
            continue
        if t > 0 or not has_gh0:
            _matmul_rows(h, idx, nact, w1, transposed, acc2)
        if not gru:
            for q in range(nact):
                i = idx[q]
                for j in range(H):
                    nv[q, j] = xp4[t, b0 + i, 0, j] + bih2[0, j] + acc[i, 0, j]
            if mode == MODE_RNN_TANH:
                _vtanh(nv1, e, ib, fb, nact * H)
            else:
                for j in range(nact * H):
                    if nv1[j] < 0:
                        nv1[j] = 0.0
            for q in range(nact):  # (no workspace: the backward needs only y and h_prev)
                i = idx[q]
                b = b0 + i
                for j in range(H):
                    y[t, b, j] = nv[q, j]
                    h[i, j] = nv[q, j]
            continue
        for q in range(nact):
            i = idx[q]
            for g in range(2):
                for j in range(H):
                    rz[q, g, j] = xp4[t, b0 + i, g, j] + bih2[g, j] + acc[i, g, j]
        _vsigmoid(rz1, e, ib, fb, nact * 2 * H)
        if reset_after:
            for q in range(nact):
                i = idx[q]
                for j in range(H):
                    nv[q, j] = xp4[t, b0 + i, 2, j] + bih2[2, j] + rz[q, 0, j] * acc[i, 2, j]
        else:  # the n rows act on r * h_prev: a second product
            for q in range(nact):
                i = idx[q]
                for j in range(H):
                    rh[i, j] = rz[q, 0, j] * h[i, j]
                    accn[i, j] = bhh2[2, j]
            _matmul_rows(rh, idx, nact, wn, transposed, accn)
            for q in range(nact):
                i = idx[q]
                for j in range(H):
                    nv[q, j] = xp4[t, b0 + i, 2, j] + bih2[2, j] + accn[i, j]
        _vtanh(nv1, e, ib, fb, nact * H)
        for q in range(nact):
            i = idx[q]
            b = b0 + i
            if WG > 0:  # (width 0: no backward follows, nothing to keep)
                for g in range(2):
                    for j in range(H):
                        ws4[t, b, g, j] = rz[q, g, j]
                for j in range(H):
                    ws4[t, b, 2, j] = nv[q, j]
                if reset_after:
                    for j in range(H):
                        ws4[t, b, 3, j] = acc[i, 2, j]
                else:
                    for j in range(H):
                        ws4[t, b, 3, j] = accn[i, j]
            for j in range(H):
                z = rz[q, 1, j]
                hnew = (one - z) * nv[q, j] + z * h[i, j]
                y[t, b, j] = hnew
                h[i, j] = hnew
    for i in range(nb):
        for k in range(H):
            h_n[b0 + i, k] = h[i, k]


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _bwd_rows(grad_y, grad_h_n, h0, w_hh, lengths, resets, has_resets, y, ws, mode, reset_after,
              d_gx, d_gh, h_in, grad_h0, product, b0, b1):
    """Backward of batch rows [b0, b1) over all steps (reverse order).

    With product False (not for GRU with reset_after=False), the recurrent product d_gh[t] W_hh
    is left out of the gradient passed to the state entering each step: for one step at a time
    with the caller adding it (``backward_stepped``).

    w_hh (G*H, H) as stored: the products with it are in the axpy form (gradient rows times W_hh).
    ws (T, B, 4*H) = [r, z, n, hn] for GRU (unused, width 0, for the RNN modes). The GRU's h_prev,
    the state entering step t after a reset, is rebuilt from h0 (B, H), y and resets: zero where
    the row resets, else h0 at t = 0 and y[t - 1] after (exact at every active step).
    Writes d_gx, d_gh (T, B, G*H), grad_h0 (B, H) and, for GRU with reset_after=False,
    h_in (T, B, H) = r * h_prev (what the n rows of W_hh multiplied).
    """
    T = grad_y.shape[0]
    B = grad_y.shape[1]
    H = grad_h_n.shape[1]
    GH = w_hh.shape[0]
    G = GH // H if H > 0 else 1
    WG = ws.shape[2] // H if H > 0 else 1
    nb = b1 - b0
    gru = mode == MODE_GRU
    split = gru and not reset_after
    dt = grad_h_n.dtype
    one = dt.type(1.0)
    zero = dt.type(0.0)
    ws4 = ws.reshape((T, B, WG, H))
    gx4 = d_gx.reshape((T, B, G, H))
    gh4 = d_gh.reshape((T, B, G, H))
    dh = np.empty((nb, H), dt)
    for i in range(nb):
        for k in range(H):
            dh[i, k] = grad_h_n[b0 + i, k]
    dhn = np.empty((nb, H), dt)  # gradient w.r.t. the state entering the step
    drh = np.empty((nb, H), dt)  # gru / reset_after=False: gradient of r * h_prev
    hp = np.empty((nb, H), dt)  # gru: h_prev of the active rows at step t
    idx = np.empty(nb, np.int64)
    for t in range(T - 1, -1, -1):
        prev = h0 if t == 0 else y[t - 1]  # the state entering step t, before a reset
        nact = 0
        for i in range(nb):
            b = b0 + i
            if t >= lengths[b]:
                for g in range(G):
                    for j in range(H):
                        gx4[t, b, g, j] = 0.0
                        gh4[t, b, g, j] = 0.0
                if split:
                    for j in range(H):
                        h_in[t, b, j] = 0.0
                continue
            idx[nact] = i
            nact += 1
            if gru:
                if has_resets and resets[t, b]:
                    for j in range(H):
                        hp[i, j] = zero
                else:
                    for j in range(H):
                        hp[i, j] = prev[b, j]
            if not gru:
                for j in range(H):
                    g = dh[i, j] + grad_y[t, b, j]
                    hnew = y[t, b, j]
                    if mode == MODE_RNN_TANH:
                        dg = g * (one - hnew * hnew)
                    else:
                        dg = zero if hnew <= 0 else g  # torch's threshold_backward: NaN passes g
                    gx4[t, b, 0, j] = dg
                    gh4[t, b, 0, j] = dg
                    dhn[i, j] = 0.0
            elif reset_after:
                for j in range(H):
                    g = dh[i, j] + grad_y[t, b, j]
                    r = ws4[t, b, 0, j]
                    z = ws4[t, b, 1, j]
                    n = ws4[t, b, 2, j]
                    dn_pre = g * (one - z) * (one - n * n)
                    dz_pre = g * (hp[i, j] - n) * z * (one - z)
                    dr_pre = dn_pre * ws4[t, b, 3, j] * r * (one - r)
                    gx4[t, b, 0, j] = dr_pre
                    gx4[t, b, 1, j] = dz_pre
                    gx4[t, b, 2, j] = dn_pre
                    gh4[t, b, 0, j] = dr_pre
                    gh4[t, b, 1, j] = dz_pre
                    gh4[t, b, 2, j] = dn_pre * r
                    dhn[i, j] = g * z
            else:
                for j in range(H):
                    g = dh[i, j] + grad_y[t, b, j]
                    z = ws4[t, b, 1, j]
                    n = ws4[t, b, 2, j]
                    dn_pre = g * (one - z) * (one - n * n)
                    dz_pre = g * (hp[i, j] - n) * z * (one - z)
                    gx4[t, b, 1, j] = dz_pre
                    gx4[t, b, 2, j] = dn_pre
                    gh4[t, b, 1, j] = dz_pre
                    gh4[t, b, 2, j] = dn_pre
                    h_in[t, b, j] = ws4[t, b, 0, j] * hp[i, j]
                    dhn[i, j] = g * z
                    drh[i, j] = 0.0
        if nact == 0:
            continue
        dgh_t = d_gh[t]
        if split:
            _gemm_axpy(dgh_t, b0, 2 * H, idx, nact, w_hh, 2 * H, H, H, drh)  # d(r * h_prev)
            for q in range(nact):
                i = idx[q]
                b = b0 + i
                for j in range(H):
                    r = ws4[t, b, 0, j]
                    dr_pre = drh[i, j] * hp[i, j] * r * (one - r)
                    gx4[t, b, 0, j] = dr_pre
                    gh4[t, b, 0, j] = dr_pre
                    dhn[i, j] += drh[i, j] * r
            _gemm_axpy(dgh_t, b0, 0, idx, nact, w_hh, 0, 2 * H, H, dhn)
        elif product:
            _gemm_axpy(dgh_t, b0, 0, idx, nact, w_hh, 0, GH, H, dhn)
        for q in range(nact):
            i = idx[q]
            if has_resets and resets[t, b0 + i]:
                for k in range(H):
                    dh[i, k] = 0.0
            else:
                for k in range(H):
                    dh[i, k] = dhn[i, k]
    for i in range(nb):
        for k in range(H):
            grad_h0[b0 + i, k] = dh[i, k]


# --------------------------------------------------------------------------------------------------
# entry points on NumPy arrays
# --------------------------------------------------------------------------------------------------
PARALLEL_MIN_ROWS = 16  # rows per chunk below which splitting the batch does not pay
PARALLEL_MIN_WORK = 1 << 21  # nor below ~2M multiply-adds of products per chunk (~50 µs here)

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool():  # in a forked child: the parent's worker threads do not exist there
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _get_pool(n):
    """The shared pool, with at least n workers. A smaller one is replaced, not shut down: a call
    in another thread may still be submitting to it (its idle workers exit once it is collected)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="rnnrec_numba")
            _pool_size = n
        return _pool


def _num_threads():
    """Threads for the batch split: torch's intra-op setting, capped by NUMBA_NUM_THREADS (read from
    the config so that numba's own threading layer is never started)."""
    import torch
    return max(1, min(torch.get_num_threads(), _numba_config.NUMBA_NUM_THREADS))


def _nchunks(B, work):
    """Chunks for B batch rows and `work` multiply-adds of recurrent products in all."""
    if B < 2 * PARALLEL_MIN_ROWS or work < 2 * PARALLEL_MIN_WORK:
        return 1
    return max(1, min(_num_threads(), B // PARALLEL_MIN_ROWS, work // PARALLEL_MIN_WORK))


# read-only stand-ins for absent arguments (the kernels never write them)
_NO_RESETS = np.zeros((1, 1), np.bool_)
_DUMMY = {4: np.zeros((1, 1), np.float32), 8: np.zeros((1, 1), np.float64)}
_INT_LIKE = {4: np.zeros(1, np.int32), 8: np.zeros(1, np.int64)}


def _run_chunks(fn, args, B, nch):
    """fn(*args, b0, b1) over nch chunks of the batch. The kernels release the GIL (nogil=True),
    so a thread pool runs the chunks in parallel without a separately compiled parallel variant."""
    if nch <= 1:
        fn(*args, 0, B)
        return
    pool = _get_pool(nch)
    futs = [pool.submit(fn, *args, c * B // nch, (c + 1) * B // nch) for c in range(1, nch)]
    fn(*args, 0, B // nch)
    for f in futs:
        f.result()


# The forward's products use W_hh^T (the axpy form) when its transposed copy, made once per call,
# pays: H small enough for the axpy form to beat the NT one (measured: up to H ~ 320) and enough
# row-steps for the copy (about as costly as 2-3 single-row products) to be amortised.
AXPY_MAX_H = 256
AXPY_MIN_ROW_STEPS = 32
# Step 0's first product needs only h0, so the caller can do it with BLAS (one GEMM, like the input
# projection) from this many batch rows up; below, the call overhead outweighs BLAS's speed.
GH0_MIN_ROWS = 16
# Every step's first recurrent product is done with BLAS (forward_stepped) from GH0_MIN_ROWS rows
# and this many multiply-adds per step (B x N1 x H; one thread, more threads): the kernel's own
# GEMM runs at ~50 GFLOP/s where MKL's runs at ~90, and does not split small batches over threads.
# Measured, T = 20, forward, numba: B=64 H=512 61-68 -> 50 ms on one thread (torch.nn ~50), 42 ->
# 30 ms on two; B=16 H=512 16 -> 15 ms; about even at 12.6M (B=64 H=256) on one thread, ahead from
# ~2M (B=64 H=100: 2.3 -> 2.1 ms) on two; behind below (B=16 H=100: 0.7 -> 1.0 ms, the per-step
# calls' overhead).
BLAS_STEP_MIN_WORK = (1 << 23, 1 << 20)


def blas_steps(B, H, mode, reset_after):
    """Whether the forward runs each step's first product with BLAS (forward_stepped)."""
    work = B * first_product_rows(H, mode, reset_after) * H
    return B >= GH0_MIN_ROWS and work >= BLAS_STEP_MIN_WORK[_num_threads() > 1]


def first_product_rows(H, mode, reset_after):
    """How many rows of W_hh (from the top) step 0's first product uses: all, or r and z for GRU
    with reset_after=False (its n rows act on r * h_prev, known only inside the step)."""
    return 2 * H if mode == MODE_GRU and not reset_after else (3 if mode == MODE_GRU else 1) * H


# Calls with at most this many rows of x (T * B) get their input projection from the NT kernel
# (forward_projected) instead of a BLAS call through torch: at so few rows torch.mm's call and
# MKL's small-M path cost more than the NT product (measured, one thread, I = H, 3H x H weights:
# 1 row H=100 2.3 vs 6.0 us, H=512 52 vs 75 us; 4 rows H=100 7.4 vs 9.6 us, H=512 127 vs 190 us;
# at 8 rows about even, beyond BLAS wins).
PROJECT_MAX_ROWS = 4


def forward_projected(x, w_ih, bih, h0, w_hh, bhh, lengths, resets, mode, reset_after, y, h_n, ws):
    """forward_recurrence for calls of at most PROJECT_MAX_ROWS rows (T * B), given x (T, B, I) and
    w_ih (G*H, I) instead of their product xp, which the NT kernel computes; the other arguments as
    there. (Two kernel calls, ~1.7 us more than one kernel doing both, which would add a second
    compilation of _fwd_rows per dtype: ~6 s at first use.)"""
    has_resets = resets is not None
    if resets is None:
        resets = _NO_RESETS
    T, B, I = x.shape
    H = h0.shape[1]
    GH = w_ih.shape[0]
    n = T * B
    xp = np.zeros((T, B, GH), x.dtype)
    _gemm_nt(x.reshape(n, I), np.arange(n, dtype=np.int64), n, w_ih, xp.reshape(n, GH))
    w1, wn, _ = product_parts(w_hh, H, mode, reset_after)
    _fwd_rows(xp, bih, h0, w1, wn, False, bhh, _DUMMY[h0.dtype.itemsize], False, lengths, resets, has_resets,
              int(mode), bool(reset_after), y, h_n, ws, _INT_LIKE[h0.dtype.itemsize], 0, B)


def product_parts(w_hh, H, mode, reset_after):
    """(w1, wn, split): the rows of W_hh (as stored) in a step's first recurrent product (all, or
    r and z for GRU with reset_after=False: split) and in its second (the n rows, on r * h_prev;
    w1 again where there is none)."""
    split = mode == MODE_GRU and not reset_after
    w1 = w_hh[:first_product_rows(H, mode, reset_after)]
    return w1, (w_hh[2 * H:] if split else w1), split


def forward_recurrence(xp, bih, h0, w_hh, bhh, lengths, resets, mode, reset_after, y, h_n, ws,
                       gh0=None):
    """Run the forward time loop. All arguments NumPy arrays, C-contiguous, one float dtype.

    xp (T, B, G*H) = x W_ih^T; bih (G*H,); h0 (B, H); w_hh (G*H, H); bhh (G*H,); lengths int64 (B,);
    resets bool (T, B) or None; outputs y (T, B, H), h_n (B, H), ws (T, B, W) written in place.
    gh0: None, or step 0's first product h0 W1^T (B, N1), no bias, computed by the caller (see
    ``first_product_rows``).
    """
    has_resets = resets is not None
    if resets is None:
        resets = _NO_RESETS
    has_gh0 = gh0 is not None
    if gh0 is None:
        gh0 = _DUMMY[h0.dtype.itemsize]
    T, B = xp.shape[:2]
    H = h0.shape[1]
    w1, wn, split = product_parts(w_hh, H, mode, reset_after)
    steps = T if split or not has_gh0 else T - 1  # steps whose products run in the kernel
    if steps <= 0:  # no product left for the kernel: no copy of W_hh either
        w1 = wn = np.zeros((0, H), h0.dtype)
    transposed = 0 < H <= AXPY_MAX_H and B * steps >= AXPY_MIN_ROW_STEPS
    if transposed:
        hp = -(-H * h0.itemsize // 32) * 32 // h0.itemsize  # H rounded up to whole 32-byte vectors
        w1 = _transposed(w1, 2 if split else w1.shape[0] // H, hp)
        wn = _transposed(wn, 1, hp) if split else w1
    int_like = _INT_LIKE[h0.dtype.itemsize]
    args = (xp, bih, h0, w1, wn, transposed, bhh, gh0, has_gh0, lengths, resets, has_resets, int(mode),
            bool(reset_after), y, h_n, ws, int_like)
    _run_chunks(_fwd_rows, args, B, _nchunks(B, B * max(steps, 0) * w_hh.shape[0] * H))


def reset_state(h, resets, t):
    """h (B, H), or a copy of it zeroed in the rows that reset at step t (resets (T, B) or None):
    the state a step's first product is taken of, so that a reset row's product is 0 W^T exactly
    as the reference's (NaN where W holds inf or NaN), not skipped."""
    if resets is None or not resets[t].any():
        return h
    h = h.copy()
    h[resets[t]] = 0.0
    return h


def forward_stepped(xp, bih, h0, w_hh, bhh, lengths, resets, mode, reset_after, y, h_n, ws, first_product):
    """forward_recurrence (same arguments but gh0), one kernel call per step, each step's first
    recurrent product ``h W1^T`` (``first_product_rows``) done by the caller's
    ``first_product(h)`` -> (B, N1) array (BLAS, through torch): for large batches and weights,
    where BLAS's GEMM runs well ahead of the kernel's own. The kernel does the rest of each step
    (biases, gates; for GRU with reset_after=False the n rows' product on r * h_prev)."""
    T, B = xp.shape[:2]
    H = h0.shape[1]
    has_resets = resets is not None
    w1, wn, split = product_parts(w_hh, H, mode, reset_after)  # (w1 unused: each step's product comes in gh)
    int_like = _INT_LIKE[h0.dtype.itemsize]
    state, nxt = h0, np.empty_like(h0)
    steps_left = np.empty(B, np.int64)
    nch = _nchunks(B, B * wn.shape[0] * H if split else 0)
    for t in range(T):
        np.subtract(lengths, t, out=steps_left)  # the kernel's step 0 is active where > 0
        args = (xp[t:t + 1], bih, state, w1, wn, False, bhh, first_product(reset_state(state, resets, t)), True,
                steps_left,
                resets[t:t + 1] if has_resets else _NO_RESETS, has_resets, int(mode), bool(reset_after),
                y[t:t + 1], nxt, ws[t:t + 1], int_like)
        _run_chunks(_fwd_rows, args, B, nch)
        state, nxt = nxt, (np.empty_like(h0) if t == 0 else state)
    h_n[...] = state


def backward_recurrence(grad_y, grad_h_n, h0, w_hh, lengths, resets, y, ws, mode, reset_after,
                        d_gx, d_gh, h_in, grad_h0):
    """Run the backward time loop (see ``_bwd_rows``); h0 (B, H) and w_hh (G*H, H) contiguous; ws
    (T, B, 4*H) for GRU, (T, B, 0) for the RNN modes; h_in may be None unless GRU with
    reset_after=False."""
    has_resets = resets is not None
    if resets is None:
        resets = _NO_RESETS
    if h_in is None:
        h_in = np.zeros((1, 1, 1), grad_h_n.dtype)
    B = grad_h_n.shape[0]
    args = (grad_y, grad_h_n, h0, w_hh, lengths, resets, has_resets, y, ws, int(mode),
            bool(reset_after), d_gx, d_gh, h_in, grad_h0, True)
    _run_chunks(_bwd_rows, args, B, _nchunks(B, B * grad_y.shape[0] * w_hh.shape[0] * w_hh.shape[1]))


def backward_stepped(grad_y, grad_h_n, h0, w_hh, lengths, resets, y, ws, mode, reset_after, d_gx, d_gh, grad_h0,
                     product):
    """backward_recurrence (same arguments but h_in) with one kernel call per step and each step's
    recurrent product d_gh[t] W_hh done by the caller's ``product(d_gh[t])`` -> (B, H) array
    (BLAS): for large batches and weights (``blas_steps``); not for GRU with reset_after=False."""
    T = grad_y.shape[0]
    B = grad_h_n.shape[0]
    has_resets = resets is not None
    h_in = np.zeros((1, 1, 1), grad_h_n.dtype)
    dh, out = grad_h_n, np.empty_like(grad_h_n)
    steps_left = np.empty(B, np.int64)
    for t in range(T - 1, -1, -1):
        np.subtract(lengths, t, out=steps_left)  # the kernel's step 0 is active where > 0
        rst = resets[t:t + 1] if has_resets else _NO_RESETS
        # the gate gradients of step t -> d_gx[t], d_gh[t], and in out the gradient reaching the
        # state entering it but for the product (zero where that state was reset; dh where inactive)
        _bwd_rows(grad_y[t:t + 1], dh, h0 if t == 0 else y[t - 1], w_hh, steps_left, rst, has_resets, y[t:t + 1],
                  ws[t:t + 1], int(mode), bool(reset_after), d_gx[t:t + 1], d_gh[t:t + 1], h_in, out, False, 0, B)
        p = product(d_gh[t])
        # no product reaches a row inactive at step t or reset there: zeroed (their d_gh is zero,
        # but 0 W_hh is NaN where W_hh holds inf or NaN; the reference passes dh through them)
        skip = steps_left <= 0
        if has_resets:
            skip |= resets[t]
        p[skip] = 0.0
        out += p
        dh, out = out, (np.empty_like(grad_h_n) if t == T - 1 else dh)
    grad_h0[...] = dh

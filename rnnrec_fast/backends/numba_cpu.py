"""Numba ``@njit`` CPU kernels of the fused RNN / GRU recurrence (forward and backward).

The functions here work on NumPy arrays only (``numba_backend`` turns torch tensors into NumPy views
and back). The math, the workspace layout and the handling of ``lengths`` / ``resets`` follow
``reference.py`` exactly; see its docstring.

Layout of the work:
  * forward: the input projection of every step ``xp = x W_ih^T + b_ih`` is one GEMM done by the
    caller; the kernel runs the whole time loop: recurrent product ``h_prev W_hh^T + b_hh`` for the
    rows active at step t (a small register-blocked GEMM, written here since Numba only calls BLAS
    through SciPy) and the fused gate math, writing ``y``, ``h_n`` and the workspace ``ws``.
  * backward: the kernel runs the reverse time loop and writes the gradients of the pre-activations
    ``d_gx`` (of ``x W_ih^T + b_ih``) and ``d_gh`` (of ``h W_hh^T + b_hh``; for GRU with
    ``reset_after=False`` the n rows act on ``r * h_prev``, saved in ``h_in``) plus ``grad_h0``; the
    caller turns them into ``grad_x`` / ``grad_w_*`` / ``grad_b_*`` with one GEMM each.

Batch rows are independent through the whole recurrence, so for large batches the batch is split
into chunks run by a thread pool (the kernels release the GIL); each chunk runs the full time loop
on its own: no synchronisation per step, and no second (parallel=True) compilation of the kernels.
The number of threads is ``torch.get_num_threads()`` capped by NUMBA_NUM_THREADS.

Every kernel is compiled once per dtype (float32 / float64); the mode, ``reset_after`` and the
presence of resets are run-time arguments; a missing bias / lengths / resets is passed as zeros /
``T`` / a dummy array by the caller, so the number of specialisations stays small.
"""
from __future__ import annotations

import numpy as np
from numba import config as _numba_config
from numba import njit

MODE_RNN_TANH = 0
MODE_RNN_RELU = 1
MODE_GRU = 2


# --------------------------------------------------------------------------------------------------
# small GEMM, "NT" form:  O[idx[i], c0 + j] += sum_k A[ar0 + idx[i], ac0 + k] * W[c0 + j, k0 + k]
#   for i < n (rows picked through idx: the active rows), j < N, k < K.
#   Register blocks of 4 rows x 2 columns of O (8 independent dot products sharing the loads); the
#   k loop runs over 0-based slices and is vectorised by LLVM, which needs the reassociation
#   allowed by fastmath (the sums are then ordered differently from torch: rounding-level only).
# --------------------------------------------------------------------------------------------------
_GEMM_FM = {"reassoc", "contract", "nsz"}


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=_GEMM_FM)
def _gemm_nt(A, ar0, ac0, idx, n, W, c0, N, k0, K, O):
    zero = O.dtype.type(0)
    i = 0
    while i + 4 <= n:
        r0 = idx[i]
        r1 = idx[i + 1]
        r2 = idx[i + 2]
        r3 = idx[i + 3]
        a0 = A[ar0 + r0, ac0:ac0 + K]
        a1 = A[ar0 + r1, ac0:ac0 + K]
        a2 = A[ar0 + r2, ac0:ac0 + K]
        a3 = A[ar0 + r3, ac0:ac0 + K]
        j = c0
        while j + 4 <= c0 + N:  # 4 x 4 block: 8 vector loads feed 16 FMAs per k step
            w0 = W[j, k0:k0 + K]
            w1 = W[j + 1, k0:k0 + K]
            w2 = W[j + 2, k0:k0 + K]
            w3 = W[j + 3, k0:k0 + K]
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
                v0 = w0[k]
                v1 = w1[k]
                v2 = w2[k]
                v3 = w3[k]
                x0 = a0[k]
                x1 = a1[k]
                x2 = a2[k]
                x3 = a3[k]
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
        while j + 2 <= c0 + N:
            w0 = W[j, k0:k0 + K]
            w1 = W[j + 1, k0:k0 + K]
            s00 = zero
            s01 = zero
            s10 = zero
            s11 = zero
            s20 = zero
            s21 = zero
            s30 = zero
            s31 = zero
            for k in range(K):
                v0 = w0[k]
                v1 = w1[k]
                s00 += a0[k] * v0
                s01 += a0[k] * v1
                s10 += a1[k] * v0
                s11 += a1[k] * v1
                s20 += a2[k] * v0
                s21 += a2[k] * v1
                s30 += a3[k] * v0
                s31 += a3[k] * v1
            O[r0, j] += s00
            O[r0, j + 1] += s01
            O[r1, j] += s10
            O[r1, j + 1] += s11
            O[r2, j] += s20
            O[r2, j + 1] += s21
            O[r3, j] += s30
            O[r3, j + 1] += s31
            j += 2
        if j < c0 + N:
            w0 = W[j, k0:k0 + K]
            s00 = zero
            s10 = zero
            s20 = zero
            s30 = zero
            for k in range(K):
                v0 = w0[k]
                s00 += a0[k] * v0
                s10 += a1[k] * v0
                s20 += a2[k] * v0
                s30 += a3[k] * v0
            O[r0, j] += s00
            O[r1, j] += s10
            O[r2, j] += s20
            O[r3, j] += s30
        i += 4
    while i < n:
        r0 = idx[i]
        a0 = A[ar0 + r0, ac0:ac0 + K]
        j = c0
        while j + 4 <= c0 + N:
            w0 = W[j, k0:k0 + K]
            w1 = W[j + 1, k0:k0 + K]
            w2 = W[j + 2, k0:k0 + K]
            w3 = W[j + 3, k0:k0 + K]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for k in range(K):
                x = a0[k]
                s0 += x * w0[k]
                s1 += x * w1[k]
                s2 += x * w2[k]
                s3 += x * w3[k]
            O[r0, j] += s0
            O[r0, j + 1] += s1
            O[r0, j + 2] += s2
            O[r0, j + 3] += s3
            j += 4
        while j < c0 + N:
            w0 = W[j, k0:k0 + K]
            s0 = zero
            for k in range(K):
                s0 += a0[k] * w0[k]
            O[r0, j] += s0
            j += 1
        i += 1


# --------------------------------------------------------------------------------------------------
# activations, vectorised. libm's exp / tanh are scalar calls (~3 ns and ~13 ns each here) and
# dominated the GRU step; these loops have no calls, so LLVM vectorises them.
# exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-12 Taylor polynomial (relative
# error ~3e-16), times 2^n built from its bits. x is clamped to [-708, 709] first
# (exp(-708) ~ 3e-308 stands for 0: sigmoid / tanh results then differ from the exact ones by
# < 1e-300). NaN propagates.
# tanh: (1 - e) / (1 + e) with e = exp(-2|x|) for |x| >= 1/16 (relative error ~1e-15), a Taylor
# polynomial below (error < 1e-16 relative). Computed in the array's precision (float32: degree-7
# exp polynomial, int32 exponent bits; relative errors a few float32 ulp).
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


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _vexp(u, ib, fb, m):
    """u[:m] = exp(u[:m]) in place, in u's precision. fb: scratch of u's dtype, ib: the same memory
    viewed as the integer type of the same size (int32 / int64)."""
    c = u.dtype.type
    single = u.itemsize == 4
    lo = c(-87.0) if single else c(-708.0)
    hi = c(88.0) if single else c(709.0)
    bias = 127 if single else 1023
    shift = 23 if single else 52
    log2e = c(_LOG2E)
    ln2_hi = c(0.693359375) if single else c(_LN2_HI)
    ln2_lo = c(-2.12194440e-4) if single else c(_LN2_LO)
    half = c(0.5)
    one = c(1.0)
    e2, e3, e4, e5, e6, e7 = c(_E2), c(_E3), c(_E4), c(_E5), c(_E6), c(_E7)
    e8, e9, e10, e11, e12 = c(_E8), c(_E9), c(_E10), c(_E11), c(_E12)
    for j in range(m):
        v = u[j]
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
        if v != v:
            p = v
        u[j] = p
        ib[j] = (np.int64(n) + bias) << shift
    for j in range(m):
        u[j] *= fb[j]


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _vsigmoid(u, ib, fb, m):
    """u[:m] = sigmoid(u[:m]) in place."""
    one = u.dtype.type(1.0)
    for j in range(m):
        u[j] = -u[j]
    _vexp(u, ib, fb, m)
    for j in range(m):
        u[j] = one / (one + u[j])


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _vtanh(v, e, ib, fb, m):
    """v[:m] = tanh(v[:m]) in place; e scratch of v's dtype."""
    c = v.dtype.type
    one = c(1.0)
    m2 = c(-2.0)
    t3, t5, t7 = c(-1.0 / 3.0), c(2.0 / 15.0), c(-17.0 / 315.0)
    t9, t11 = c(62.0 / 2835.0), c(-1382.0 / 155925.0)
    small_lim = c(0.0625)
    for j in range(m):
        e[j] = m2 * abs(v[j])
    _vexp(e, ib, fb, m)
    for j in range(m):
        x = v[j]
        x2 = x * x
        small = x * (one + x2 * (t3 + x2 * (t5 + x2 * (t7 + x2 * (t9 + x2 * t11)))))
        big = (one - e[j]) / (one + e[j])
        if x < 0:
            big = -big
        v[j] = small if abs(x) < small_lim else big


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _fwd_rows(xp, h0, w_hh, bhh, lengths, resets, has_resets, mode, reset_after,
              y, h_n, ws, int_like, b0, b1):
    """Forward of batch rows [b0, b1) over all steps.

    xp (T, B, G*H) input projections incl. b_ih; w_hh (G*H, H); bhh (G*H,).
    Writes y (T, B, H), h_n (B, H) and ws (T, B, W) for these rows. int_like: an array of the
    integer type of the float's size (int32 for float32, int64 for float64).
    """
    T = xp.shape[0]
    H = h0.shape[1]
    GH = w_hh.shape[0]
    W = ws.shape[2]
    nb = b1 - b0
    gru = mode == MODE_GRU
    split = gru and not reset_after  # n rows multiply r * h_prev: a second product per step
    nfirst = 2 * H if split else GH
    h = np.empty((nb, H), h0.dtype)
    for i in range(nb):
        for k in range(H):
            h[i, k] = h0[b0 + i, k]
    hp = np.empty((nb, H), h0.dtype)
    acc = np.empty((nb, GH), h0.dtype)
    rh = np.empty((nb, H), h0.dtype)
    dt = h0.dtype
    rz = np.empty((nb, 2 * H) if split else (1, 1), dt)  # r, z kept between the two products
    u = np.empty(GH, dt)  # scratch rows for the activations
    v = np.empty(H, dt)
    e = np.empty(H, dt)
    fb = np.empty(GH, dt)
    ib = fb.view(int_like.dtype)
    idx = np.empty(nb, np.int64)
    for t in range(T):
        nact = 0
        for i in range(nb):
            b = b0 + i
            if t < lengths[b]:
                idx[nact] = i
                nact += 1
                hpi = hp[i]
                hi = h[i]
                if has_resets and resets[t, b]:
                    for k in range(H):
                        hpi[k] = 0.0
                else:
                    for k in range(H):
                        hpi[k] = hi[k]
                ai = acc[i]
                for j in range(GH):
                    ai[j] = bhh[j]
            else:
                yr = y[t, b]
                wr = ws[t, b]
                for k in range(H):
                    yr[k] = 0.0
                for k in range(W):
                    wr[k] = 0.0
        if nact == 0:
            continue
        _gemm_nt(hp, 0, 0, idx, nact, w_hh, 0, nfirst, 0, H, acc)
        if not gru:
            for q in range(nact):
                i = idx[q]
                b = b0 + i
                xr = xp[t, b]
                ai = acc[i]
                hpi = hp[i]
                hi = h[i]
                yr = y[t, b]
                wr = ws[t, b]
                for j in range(H):
                    v[j] = xr[j] + ai[j]
                if mode == MODE_RNN_TANH:
                    _vtanh(v, e, ib, fb, H)
                else:
                    for j in range(H):
                        if v[j] < 0:
                            v[j] = 0.0
                for j in range(H):
                    wr[j] = hpi[j]
                    yr[j] = v[j]
                    hi[j] = v[j]
        elif reset_after:
            for q in range(nact):
                i = idx[q]
                b = b0 + i
                xr = xp[t, b]
                ai = acc[i]
                hpi = hp[i]
                hi = h[i]
                yr = y[t, b]
                wr = ws[t, b]
                for j in range(2 * H):
                    u[j] = xr[j] + ai[j]
                _vsigmoid(u, ib, fb, 2 * H)
                xn = xr[2 * H:]
                an = ai[2 * H:]
                for j in range(H):
                    v[j] = xn[j] + u[j] * an[j]
                _vtanh(v, e, ib, fb, H)
                w_h = wr[:H]
                w_rz = wr[H:3 * H]
                w_n = wr[3 * H:4 * H]
                w_hn = wr[4 * H:]
                uz = u[H:2 * H]
                for j in range(H):
                    z = uz[j]
                    hnew = (1.0 - z) * v[j] + z * hpi[j]
                    w_h[j] = hpi[j]
                    w_n[j] = v[j]
                    w_hn[j] = an[j]
                    yr[j] = hnew
                    hi[j] = hnew
                for j in range(2 * H):
                    w_rz[j] = u[j]
        else:
            for q in range(nact):
                i = idx[q]
                b = b0 + i
                xr = xp[t, b]
                ai = acc[i]
                hpi = hp[i]
                rzi = rz[i]
                rhi = rh[i]
                wr = ws[t, b]
                for j in range(2 * H):
                    rzi[j] = xr[j] + ai[j]
                _vsigmoid(rzi, ib, fb, 2 * H)
                w_h = wr[:H]
                w_rz = wr[H:3 * H]
                for j in range(H):
                    w_h[j] = hpi[j]
                    rhi[j] = rzi[j] * hpi[j]
                for j in range(2 * H):
                    w_rz[j] = rzi[j]
            _gemm_nt(rh, 0, 0, idx, nact, w_hh, 2 * H, H, 0, H, acc)
            for q in range(nact):
                i = idx[q]
                b = b0 + i
                xn = xp[t, b, 2 * H:]
                an = acc[i, 2 * H:]
                hpi = hp[i]
                hi = h[i]
                uz = rz[i, H:]
                yr = y[t, b]
                wr = ws[t, b]
                w_n = wr[3 * H:4 * H]
                w_hn = wr[4 * H:]
                for j in range(H):
                    v[j] = xn[j] + an[j]
                _vtanh(v, e, ib, fb, H)
                for j in range(H):
                    z = uz[j]
                    hnew = (1.0 - z) * v[j] + z * hpi[j]
                    w_n[j] = v[j]
                    w_hn[j] = an[j]
                    yr[j] = hnew
                    hi[j] = hnew
    for i in range(nb):
        for k in range(H):
            h_n[b0 + i, k] = h[i, k]


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _bwd_rows(grad_y, grad_h_n, whhT, lengths, resets, has_resets, y, ws, mode, reset_after,
              d_gx, d_gh, h_in, grad_h0, b0, b1):
    """Backward of batch rows [b0, b1) over all steps (reverse order).

    whhT (H, G*H) = W_hh^T. Writes d_gx, d_gh (T, B, G*H), grad_h0 (B, H) and, for GRU with
    reset_after=False, h_in (T, B, H) = r * h_prev (what the n rows of W_hh multiplied).
    """
    T = grad_y.shape[0]
    H = grad_h_n.shape[1]
    GH = whhT.shape[1]
    nb = b1 - b0
    gru = mode == MODE_GRU
    split = gru and not reset_after
    dt = grad_h_n.dtype
    dh = np.empty((nb, H), dt)
    for i in range(nb):
        for k in range(H):
            dh[i, k] = grad_h_n[b0 + i, k]
    dhn = np.empty((nb, H), dt)  # gradient w.r.t. the state entering the step
    drh = np.empty((nb, H), dt)  # gru / reset_after=False: gradient of r * h_prev
    idx = np.empty(nb, np.int64)
    for t in range(T - 1, -1, -1):
        dgx_t = d_gx[t]
        dgh_t = d_gh[t]
        nact = 0
        for i in range(nb):
            b = b0 + i
            gx = dgx_t[b]
            gh = dgh_t[b]
            if t >= lengths[b]:
                for j in range(GH):
                    gx[j] = 0.0
                    gh[j] = 0.0
                if split:
                    hir = h_in[t, b]
                    for j in range(H):
                        hir[j] = 0.0
                continue
            idx[nact] = i
            nact += 1
            dhi = dh[i]
            dhni = dhn[i]
            gyr = grad_y[t, b]
            if not gru:
                yr = y[t, b]
                for j in range(H):
                    g = dhi[j] + gyr[j]
                    hnew = yr[j]
                    if mode == MODE_RNN_TANH:
                        dg = g * (1.0 - hnew * hnew)
                    else:
                        dg = g if hnew > 0 else 0.0 * g
                    gx[j] = dg
                    gh[j] = dg
                    dhni[j] = 0.0
            else:
                wr = ws[t, b]
                w_h = wr[:H]
                w_r = wr[H:2 * H]
                w_z = wr[2 * H:3 * H]
                w_n = wr[3 * H:4 * H]
                w_hn = wr[4 * H:]
                gx_r = gx[:H]
                gx_z = gx[H:2 * H]
                gx_n = gx[2 * H:]
                gh_r = gh[:H]
                gh_z = gh[H:2 * H]
                gh_n = gh[2 * H:]
                if reset_after:
                    for j in range(H):
                        g = dhi[j] + gyr[j]
                        r = w_r[j]
                        z = w_z[j]
                        n = w_n[j]
                        dn_pre = g * (1.0 - z) * (1.0 - n * n)
                        dz_pre = g * (w_h[j] - n) * z * (1.0 - z)
                        dr_pre = dn_pre * w_hn[j] * r * (1.0 - r)
                        gx_r[j] = dr_pre
                        gx_z[j] = dz_pre
                        gx_n[j] = dn_pre
                        gh_r[j] = dr_pre
                        gh_z[j] = dz_pre
                        gh_n[j] = dn_pre * r
                        dhni[j] = g * z
                else:
                    hir = h_in[t, b]
                    drhi = drh[i]
                    for j in range(H):
                        g = dhi[j] + gyr[j]
                        z = w_z[j]
                        n = w_n[j]
                        dn_pre = g * (1.0 - z) * (1.0 - n * n)
                        dz_pre = g * (w_h[j] - n) * z * (1.0 - z)
                        gx_z[j] = dz_pre
                        gx_n[j] = dn_pre
                        gh_z[j] = dz_pre
                        gh_n[j] = dn_pre
                        hir[j] = w_r[j] * w_h[j]
                        dhni[j] = g * z
                        drhi[j] = 0.0
        if nact == 0:
            continue
        if split:
            # d(r * h_prev) = dn_pre @ W_hn
            _gemm_nt(dgh_t, b0, 2 * H, idx, nact, whhT, 0, H, 2 * H, H, drh)
            for q in range(nact):
                i = idx[q]
                b = b0 + i
                wr = ws[t, b]
                w_h = wr[:H]
                w_r = wr[H:2 * H]
                gx = dgx_t[b]
                gh = dgh_t[b]
                drhi = drh[i]
                dhni = dhn[i]
                for j in range(H):
                    r = w_r[j]
                    dr_pre = drhi[j] * w_h[j] * r * (1.0 - r)
                    gx[j] = dr_pre
                    gh[j] = dr_pre
                    dhni[j] += drhi[j] * r
            _gemm_nt(dgh_t, b0, 0, idx, nact, whhT, 0, H, 0, 2 * H, dhn)
        else:
            _gemm_nt(dgh_t, b0, 0, idx, nact, whhT, 0, H, 0, GH, dhn)
        for q in range(nact):
            i = idx[q]
            dhi = dh[i]
            dhni = dhn[i]
            if has_resets and resets[t, b0 + i]:
                for k in range(H):
                    dhi[k] = 0.0
            else:
                for k in range(H):
                    dhi[k] = dhni[k]
    for i in range(nb):
        for k in range(H):
            grad_h0[b0 + i, k] = dh[i, k]


# --------------------------------------------------------------------------------------------------
# entry points on NumPy arrays
# --------------------------------------------------------------------------------------------------
PARALLEL_MIN_ROWS = 16  # rows per chunk below which splitting the batch does not pay

_pool = None
_pool_size = 0


def _num_threads():
    """Threads for the batch split: torch's intra-op setting, capped by NUMBA_NUM_THREADS (read from
    the config so that numba's own threading layer is never started)."""
    import torch
    return max(1, min(torch.get_num_threads(), _numba_config.NUMBA_NUM_THREADS))


def _nchunks(B):
    return max(1, min(_num_threads(), B // PARALLEL_MIN_ROWS))


def _run_chunks(fn, args, B, nch):
    """fn(*args, b0, b1) over nch chunks of the batch. The kernels release the GIL (nogil=True),
    so a thread pool runs the chunks in parallel without a separately compiled parallel variant."""
    global _pool, _pool_size
    if nch <= 1:
        fn(*args, 0, B)
        return
    if _pool is None or _pool_size < nch:
        from concurrent.futures import ThreadPoolExecutor
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=nch, thread_name_prefix="rnnrec_numba")
        _pool_size = nch
    futs = [_pool.submit(fn, *args, c * B // nch, (c + 1) * B // nch) for c in range(1, nch)]
    fn(*args, 0, B // nch)
    for f in futs:
        f.result()


def forward_recurrence(xp, h0, w_hh, bhh, lengths, resets, mode, reset_after, y, h_n, ws):
    """Run the forward time loop. All arguments NumPy arrays, C-contiguous, one float dtype.

    xp (T, B, G*H); h0 (B, H); w_hh (G*H, H); bhh (G*H,); lengths int64 (B,);
    resets bool (T, B) or None; outputs y (T, B, H), h_n (B, H), ws (T, B, W) written in place.
    """
    has_resets = resets is not None
    if resets is None:
        resets = np.zeros((1, 1), np.bool_)
    B = h0.shape[0]
    int_like = np.zeros(1, np.int32 if h0.dtype.itemsize == 4 else np.int64)
    args = (xp, h0, w_hh, bhh, lengths, resets, has_resets, int(mode), bool(reset_after),
            y, h_n, ws, int_like)
    _run_chunks(_fwd_rows, args, B, _nchunks(B))


def backward_recurrence(grad_y, grad_h_n, whhT, lengths, resets, y, ws, mode, reset_after,
                        d_gx, d_gh, h_in, grad_h0):
    """Run the backward time loop (see ``_bwd_rows``); whhT (H, G*H) = W_hh^T contiguous; h_in may
    be None unless GRU with reset_after=False."""
    has_resets = resets is not None
    if resets is None:
        resets = np.zeros((1, 1), np.bool_)
    if h_in is None:
        h_in = np.zeros((1, 1, 1), grad_h_n.dtype)
    B = grad_h_n.shape[0]
    args = (grad_y, grad_h_n, whhT, lengths, resets, has_resets, y, ws, int(mode),
            bool(reset_after), d_gx, d_gh, h_in, grad_h0)
    _run_chunks(_bwd_rows, args, B, _nchunks(B))

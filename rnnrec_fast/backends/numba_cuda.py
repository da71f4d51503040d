"""``numba.cuda`` kernels of the fused RNN / GRU recurrence (forward and backward).

Each direction is ONE kernel launch that runs the whole time loop (a launch from Python costs tens
of microseconds, far more than one step of a small RNN):

  * one thread block per group of ``RB`` batch rows (rows are independent through the recurrence, so
    blocks never wait on each other); threads loop over hidden units ``j``; ``cuda.syncthreads()``
    separates the phases of a step;
  * the block's state rows live in dynamic shared memory; ``W_hh`` is read from global memory (L2
    resident for the sizes of interest), laid out so that consecutive threads read consecutive
    addresses: ``W_hh^T`` (H, G*H) in the forward, ``W_hh`` (G*H, H) in the backward;
  * forward, per step: (1) ``h_prev`` = state, zeroed on reset; (2) each thread computes the gate
    pre-activations of its units (dot products with ``h_prev`` for the RB rows) and the fused gate
    math, writing ``y``, ``ws`` (GRU: ``[r, z, n, hn]``; the RNN modes have none) and the new
    state; GRU with ``reset_after=False`` needs a second product with ``r * h_prev``, hence a
    third phase;
  * backward, per step: (1) gate gradients of each unit from ``ws`` and ``h_prev`` (not saved:
    zero where the row resets, else ``h0`` at t = 0 and ``y[t - 1]`` after) -> ``d_gx``, ``d_gh``
    (global, for the weight gradients) and the block's copy of ``d_gh`` in shared memory;
    (2) ``dh_prev = g * z (+ d(r h) * r) + d_gh W_hh`` (for ``reset_after=False`` first
    ``d(r h) = dn_pre W_hn``).

The input projection (one GEMM) and the weight-gradient GEMMs are torch ops around the kernels.
Semantics, layouts and the workspace follow ``reference.py`` exactly.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported) the same code
runs on CPU: ``forward`` / ``backward`` then take CPU tensors (handed to the kernels as NumPy views,
which the simulator copies in and back), and ``forward_numpy`` / ``backward_numpy`` take NumPy
arrays and go through ``cuda.to_device`` / ``copy_to_host``. That is how CI checks indexing and
synchronisation without a GPU.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from numba import config as _numba_config
from numba import cuda, float32, float64

from . import reference

MODE_RNN_TANH = 0
MODE_RNN_RELU = 1
MODE_GRU = 2

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

MAX_THREADS = 256
SHARED_BYTES = 48 * 1024  # dynamic shared memory available without an opt-in

_KERNELS = {}


def _make_kernels(nbdt, RB):
    """Forward and backward kernels for one float type and RB batch rows per block."""
    # typed constants: a bare 1.0 is a float64 literal, which turns float32 gate math into float64
    # arithmetic on the GPU (tests/test_numba_ptx.py checks the PTX for f64 instructions)
    ONE = nbdt(1.0)
    ZERO = nbdt(0.0)

    @cuda.jit
    def fwd_kernel(xp, h0, whhT, bhh, has_bias, lengths, has_lengths, resets, has_resets,
                   mode, reset_after, y, h_n, ws):
        T = xp.shape[0]
        B = h0.shape[0]
        H = h0.shape[1]
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        row0 = cuda.blockIdx.x * RB
        gru = mode == MODE_GRU
        split = gru and reset_after == 0
        sh = cuda.shared.array(0, dtype=nbdt)  # [h (RB*H) | h_prev (RB*H) | r*h_prev (RB*H)]
        HP = RB * H
        RH = 2 * RB * H
        ar = cuda.local.array(RB, dtype=nbdt)
        az = cuda.local.array(RB, dtype=nbdt)
        an = cuda.local.array(RB, dtype=nbdt)

        for q in range(tid, RB * H, nt):
            rr = q // H
            k = q - rr * H
            b = row0 + rr
            if b < B:
                sh[q] = h0[b, k]
        cuda.syncthreads()

        for t in range(T):
            # phase 1: h_prev = state, zeroed where the row resets at this step
            for q in range(tid, RB * H, nt):
                rr = q // H
                b = row0 + rr
                if b < B:
                    v = sh[q]
                    if has_resets and resets[t, b]:
                        v = ZERO
                    sh[HP + q] = v
            cuda.syncthreads()
            # phase 2: gate pre-activations of unit j and the fused gate math
            for j in range(tid, H, nt):
                for rr in range(RB):
                    ar[rr] = 0.0
                    az[rr] = 0.0
                    an[rr] = 0.0
                if not gru:
                    for k in range(H):
                        wr = whhT[k, j]
                        for rr in range(RB):
                            ar[rr] += wr * sh[HP + rr * H + k]
                elif split:
                    for k in range(H):
                        wr = whhT[k, j]
                        wz = whhT[k, H + j]
                        for rr in range(RB):
                            hv = sh[HP + rr * H + k]
                            ar[rr] += wr * hv
                            az[rr] += wz * hv
                else:
                    for k in range(H):
                        wr = whhT[k, j]
                        wz = whhT[k, H + j]
                        wn = whhT[k, 2 * H + j]
                        for rr in range(RB):
                            hv = sh[HP + rr * H + k]
                            ar[rr] += wr * hv
                            az[rr] += wz * hv
                            an[rr] += wn * hv
                for rr in range(RB):
                    b = row0 + rr
                    if b >= B:
                        continue
                    if has_lengths and t >= lengths[b]:
                        y[t, b, j] = 0.0
                        if gru:  # (the RNN modes have no workspace; ws is then a dummy)
                            for g in range(4):
                                ws[t, b, g * H + j] = 0.0
                        continue
                    hpj = sh[HP + rr * H + j]
                    if not gru:
                        pre = xp[t, b, j] + ar[rr]
                        if has_bias:
                            pre += bhh[j]
                        if mode == MODE_RNN_TANH:
                            hnew = math.tanh(pre)
                        else:
                            hnew = pre
                            if pre < 0:
                                hnew = ZERO
                        y[t, b, j] = hnew
                        sh[rr * H + j] = hnew
                    else:
                        pr = xp[t, b, j] + ar[rr]
                        pz = xp[t, b, H + j] + az[rr]
                        if has_bias:
                            pr += bhh[j]
                            pz += bhh[H + j]
                        r = ONE / (ONE + math.exp(-pr))
                        z = ONE / (ONE + math.exp(-pz))
                        ws[t, b, j] = r
                        ws[t, b, H + j] = z
                        if split:
                            sh[RH + rr * H + j] = r * hpj
                        else:
                            hn = an[rr]
                            if has_bias:
                                hn += bhh[2 * H + j]
                            n = math.tanh(xp[t, b, 2 * H + j] + r * hn)
                            hnew = (ONE - z) * n + z * hpj
                            ws[t, b, 2 * H + j] = n
                            ws[t, b, 3 * H + j] = hn
                            y[t, b, j] = hnew
                            sh[rr * H + j] = hnew
            cuda.syncthreads()
            if split:
                # phase 3 (Cho et al. GRU): hn = W_hn (r * h_prev) + b_hn, then the new state
                for j in range(tid, H, nt):
                    for rr in range(RB):
                        an[rr] = 0.0
                    for k in range(H):
                        wn = whhT[k, 2 * H + j]
                        for rr in range(RB):
                            an[rr] += wn * sh[RH + rr * H + k]
                    for rr in range(RB):
                        b = row0 + rr
                        if b >= B or (has_lengths and t >= lengths[b]):
                            continue
                        hn = an[rr]
                        if has_bias:
                            hn += bhh[2 * H + j]
                        n = math.tanh(xp[t, b, 2 * H + j] + hn)
                        z = ws[t, b, H + j]
                        hnew = (ONE - z) * n + z * sh[HP + rr * H + j]
                        ws[t, b, 2 * H + j] = n
                        ws[t, b, 3 * H + j] = hn
                        y[t, b, j] = hnew
                        sh[rr * H + j] = hnew
                cuda.syncthreads()

        for q in range(tid, RB * H, nt):
            rr = q // H
            k = q - rr * H
            b = row0 + rr
            if b < B:
                h_n[b, k] = sh[q]

    @cuda.jit(device=True)
    def prev_state(h0, y, resets, has_resets, t, b, j):
        """h_prev[t, b, j], the state entering step t after a reset (not saved in ws): zero where
        the row resets, else h0 at t = 0 and y[t - 1] after (exact at every active step)."""
        if has_resets and resets[t, b]:
            return ZERO
        if t == 0:
            return h0[b, j]
        return y[t - 1, b, j]

    @cuda.jit
    def bwd_kernel(grad_y, grad_h_n, h0, w_hh, lengths, has_lengths, resets, has_resets, y, ws,
                   mode, reset_after, d_gx, d_gh, h_in, grad_h0):
        T = grad_y.shape[0]
        B = grad_h_n.shape[0]
        H = grad_h_n.shape[1]
        GH = w_hh.shape[0]
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        row0 = cuda.blockIdx.x * RB
        gru = mode == MODE_GRU
        split = gru and reset_after == 0
        # [dh (RB*H): grad w.r.t. the state after step t | dn (RB*H): its direct part for the
        #  state before step t | dg (RB*GH): d_gh of the step, the operand of the product]
        sh = cuda.shared.array(0, dtype=nbdt)
        DN = RB * H
        DG = 2 * RB * H
        acc = cuda.local.array(RB, dtype=nbdt)

        for q in range(tid, RB * H, nt):
            rr = q // H
            k = q - rr * H
            b = row0 + rr
            if b < B:
                sh[q] = grad_h_n[b, k]
        cuda.syncthreads()

        for tt in range(T):
            t = T - 1 - tt
            # phase 1: gate gradients of unit j
            for j in range(tid, H, nt):
                for rr in range(RB):
                    b = row0 + rr
                    if b >= B:
                        continue
                    dhj = sh[rr * H + j]
                    if has_lengths and t >= lengths[b]:
                        if gru:
                            for g in range(3):
                                d_gx[t, b, g * H + j] = 0.0
                                d_gh[t, b, g * H + j] = 0.0
                        else:
                            d_gx[t, b, j] = 0.0
                            d_gh[t, b, j] = 0.0
                        if split:
                            h_in[t, b, j] = 0.0
                        sh[DN + rr * H + j] = dhj
                        continue
                    g = dhj + grad_y[t, b, j]
                    if not gru:
                        hnew = y[t, b, j]
                        if mode == MODE_RNN_TANH:
                            dg = g * (ONE - hnew * hnew)
                        else:
                            dg = ZERO if hnew <= 0 else g  # torch's threshold_backward
                        d_gx[t, b, j] = dg
                        d_gh[t, b, j] = dg
                        sh[DG + rr * GH + j] = dg
                        sh[DN + rr * H + j] = 0.0
                    else:
                        hpj = prev_state(h0, y, resets, has_resets, t, b, j)
                        r = ws[t, b, j]
                        z = ws[t, b, H + j]
                        n = ws[t, b, 2 * H + j]
                        dn_pre = g * (ONE - z) * (ONE - n * n)
                        dz_pre = g * (hpj - n) * z * (ONE - z)
                        d_gx[t, b, H + j] = dz_pre
                        d_gx[t, b, 2 * H + j] = dn_pre
                        d_gh[t, b, H + j] = dz_pre
                        sh[DG + rr * GH + H + j] = dz_pre
                        sh[DN + rr * H + j] = g * z
                        if split:
                            d_gh[t, b, 2 * H + j] = dn_pre
                            sh[DG + rr * GH + 2 * H + j] = dn_pre
                            h_in[t, b, j] = r * hpj
                        else:
                            hn = ws[t, b, 3 * H + j]
                            dr_pre = dn_pre * hn * r * (ONE - r)
                            d_gx[t, b, j] = dr_pre
                            d_gh[t, b, j] = dr_pre
                            d_gh[t, b, 2 * H + j] = dn_pre * r
                            sh[DG + rr * GH + j] = dr_pre
                            sh[DG + rr * GH + 2 * H + j] = dn_pre * r
            cuda.syncthreads()
            if split:
                # phase 1b: d(r * h_prev) = dn_pre W_hn, then the r gate
                for j in range(tid, H, nt):
                    for rr in range(RB):
                        acc[rr] = 0.0
                    for k in range(H):
                        w = w_hh[2 * H + k, j]
                        for rr in range(RB):
                            acc[rr] += sh[DG + rr * GH + 2 * H + k] * w
                    for rr in range(RB):
                        b = row0 + rr
                        if b >= B or (has_lengths and t >= lengths[b]):
                            continue
                        drh = acc[rr]
                        hpj = prev_state(h0, y, resets, has_resets, t, b, j)
                        r = ws[t, b, j]
                        dr_pre = drh * hpj * r * (ONE - r)
                        d_gx[t, b, j] = dr_pre
                        d_gh[t, b, j] = dr_pre
                        sh[DG + rr * GH + j] = dr_pre
                        sh[DN + rr * H + j] += drh * r
                cuda.syncthreads()
            # phase 2: dh_prev = dn + d_gh W_hh (split: the r, z rows only), zeroed on reset
            K = 2 * H if split else GH
            for j in range(tid, H, nt):
                for rr in range(RB):
                    acc[rr] = 0.0
                for k in range(K):
                    w = w_hh[k, j]
                    for rr in range(RB):
                        acc[rr] += sh[DG + rr * GH + k] * w
                for rr in range(RB):
                    b = row0 + rr
                    if b >= B or (has_lengths and t >= lengths[b]):
                        continue  # inactive: the gradient passes through unchanged
                    v = sh[DN + rr * H + j] + acc[rr]
                    if has_resets and resets[t, b]:
                        v = ZERO
                    sh[rr * H + j] = v
            cuda.syncthreads()

        for q in range(tid, RB * H, nt):
            rr = q // H
            k = q - rr * H
            b = row0 + rr
            if b < B:
                grad_h0[b, k] = sh[q]

    return fwd_kernel, bwd_kernel


def _kernels(np_dtype, RB):
    key = (np.dtype(np_dtype).str, RB)
    ks = _KERNELS.get(key)
    if ks is None:
        nbdt = float32 if np.dtype(np_dtype) == np.float32 else float64
        ks = _make_kernels(nbdt, RB)
        _KERNELS[key] = ks
    return ks


def _row_bytes(H, GH, itemsize, fwd):
    """Shared memory a batch row's state takes in the forward (3H values) or the backward (2H + G*H)."""
    return (3 * H if fwd else 2 * H + GH) * itemsize


_WARNED_TOO_LARGE = set()


def _reference_if_too_large(H, GH, dtype, fwd):
    """True where a batch row's state does not fit the kernels' shared memory (float32 GRU: the
    forward up to H = 4096, the backward up to H = 2457; float64 half that): the call then runs the
    reference backend's math on the same tensors (same contract: a forward on the kernels and a
    backward on the reference mix), with one warning a size; for a forward, last_backend() says so."""
    per_row = _row_bytes(H, GH, dtype.itemsize, fwd)
    if per_row <= SHARED_BYTES:
        return False
    if fwd:
        from .. import ops

        ops._set_last("reference")
    key = (fwd, H, GH, dtype)
    if key not in _WARNED_TOO_LARGE:
        _WARNED_TOO_LARGE.add(key)
        import warnings

        warnings.warn(f"rnnrec_fast numba.cuda backend: hidden size {H} ({dtype}) needs {per_row} bytes of "
                      f"shared memory per batch row in the {'forward' if fwd else 'backward'}, more than its "
                      f"kernel has ({SHARED_BYTES}); that pass runs on the reference backend's math "
                      "(slower; the 'cuda' backend has no such limit)", RuntimeWarning, stacklevel=3)
    return True


def _launch_config(B, H, GH, itemsize, threads, rows_per_block, fwd):
    """threads per block, rows per block, blocks, dynamic shared memory bytes."""
    per_row = _row_bytes(H, GH, itemsize, fwd)
    if rows_per_block is None:
        rows_per_block = 1 if B < 512 else 4
        while rows_per_block > 1 and rows_per_block * per_row > SHARED_BYTES:
            rows_per_block //= 2
    if rows_per_block * per_row > SHARED_BYTES:
        raise ValueError(f"rnnrec_fast numba.cuda backend: hidden size {H} needs {per_row} bytes "
                         f"of shared memory per batch row, more than {SHARED_BYTES}")
    if threads is None:
        threads = min(MAX_THREADS, max(32, -(-H // 32) * 32))
    blocks = -(-B // rows_per_block)
    return threads, rows_per_block, blocks, rows_per_block * per_row


# --------------------------------------------------------------------------------------------------
# launches on device arrays (numba device arrays, or NumPy arrays under the simulator)
# --------------------------------------------------------------------------------------------------
def launch_forward(xp, h0, whhT, bhh, lengths, resets, mode, reset_after, y, h_n, ws,
                   stream=0, threads=None, rows_per_block=None, dummies=None):
    """xp (T,B,G*H), h0 (B,H), whhT (H,G*H) = W_hh^T, bhh (G*H,) or None, lengths (B,) int64 or
    None, resets (T,B) bool or None; writes y, h_n and, for GRU, ws (T,B,4*H) = [r, z, n, hn]
    (the RNN modes have no workspace: ws, (T,B,0) or None, is not handed to the kernel). One
    launch."""
    B, H = h0.shape
    GH = whhT.shape[1]
    if B == 0:
        return
    th, rb, blocks, shmem = _launch_config(B, H, GH, np.dtype(h0.dtype).itemsize, threads,
                                           rows_per_block, True)
    fwd, _ = _kernels(h0.dtype, rb)
    d = dummies if dummies is not None else _numpy_dummies(h0.dtype)
    fwd[blocks, th, stream, shmem](
        xp, h0, whhT, d["vec"] if bhh is None else bhh, bhh is not None,
        d["len"] if lengths is None else lengths, lengths is not None,
        d["rst"] if resets is None else resets, resets is not None,
        int(mode), int(bool(reset_after)), y, h_n,
        d["ws"] if ws is None or mode != MODE_GRU else ws)


def launch_backward(grad_y, grad_h_n, h0, w_hh, lengths, resets, y, ws, mode, reset_after,
                    d_gx, d_gh, h_in, grad_h0, stream=0, threads=None, rows_per_block=None,
                    dummies=None):
    """Writes d_gx, d_gh (T,B,G*H), grad_h0 (B,H) and, for GRU with reset_after=False, h_in
    (T,B,H) = r * h_prev. ws (T,B,4*H) for GRU (RNN modes: not used, may be None); h_prev is
    taken from h0 (B,H), y and resets. One launch."""
    B, H = grad_h_n.shape
    GH = w_hh.shape[0]
    if B == 0:
        return
    th, rb, blocks, shmem = _launch_config(B, H, GH, np.dtype(grad_h_n.dtype).itemsize, threads,
                                           rows_per_block, False)
    _, bwd = _kernels(grad_h_n.dtype, rb)
    d = dummies if dummies is not None else _numpy_dummies(grad_h_n.dtype)
    bwd[blocks, th, stream, shmem](
        grad_y, grad_h_n, h0, w_hh, d["len"] if lengths is None else lengths, lengths is not None,
        d["rst"] if resets is None else resets, resets is not None, y,
        d["ws"] if ws is None or mode != MODE_GRU else ws,
        int(mode), int(bool(reset_after)), d_gx, d_gh, d["ws"] if h_in is None else h_in,
        grad_h0)


def _numpy_dummies(dtype):
    return {"vec": np.zeros(1, dtype), "len": np.zeros(1, np.int64),
            "rst": np.zeros((1, 1), np.bool_), "ws": np.zeros((1, 1, 1), dtype)}


# --------------------------------------------------------------------------------------------------
# NumPy entry points (copies through cuda.to_device; used by the simulator checks)
# --------------------------------------------------------------------------------------------------
def _to_dev(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def forward_numpy(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after,
                  threads=None, rows_per_block=None):
    """The forward on NumPy arrays: input projection with NumPy, the recurrence on the device
    (or the simulator). Returns (y, h_n, ws) as NumPy arrays."""
    T, B, I = x.shape
    H = h0.shape[1]
    GH = w_hh.shape[0]
    gru = mode == MODE_GRU
    xp = (x.reshape(T * B, I) @ w_ih.T).reshape(T, B, GH)
    if b_ih is not None:
        xp = xp + b_ih
    dt = h0.dtype
    d_y = cuda.device_array((T, B, H), dt)
    d_hn = cuda.device_array((B, H), dt)
    d_ws = cuda.device_array((T, B, 4 * H), dt) if gru else None  # the RNN modes: no workspace
    dummies = {k: cuda.to_device(v) for k, v in _numpy_dummies(dt).items()}
    launch_forward(_to_dev(xp.astype(dt)), _to_dev(h0), _to_dev(w_hh.T), _to_dev(b_hh),
                   _to_dev(lengths), _to_dev(resets), mode, reset_after, d_y, d_hn, d_ws,
                   threads=threads, rows_per_block=rows_per_block, dummies=dummies)
    ws = d_ws.copy_to_host() if gru else np.zeros((T, B, 0), dt)
    return d_y.copy_to_host(), d_hn.copy_to_host(), ws


def backward_numpy(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws,
                   mode, reset_after, threads=None, rows_per_block=None):
    """The backward on NumPy arrays (recurrence on the device or the simulator, weight gradients
    with NumPy). Returns the six gradients as NumPy arrays."""
    T, B, I = x.shape
    H = h0.shape[1]
    GH = w_hh.shape[0]
    dt = h0.dtype
    split = mode == MODE_GRU and not reset_after
    d_gx = cuda.device_array((T, B, GH), dt)
    d_gh = cuda.device_array((T, B, GH), dt)
    d_hin = cuda.device_array((T, B, H), dt) if split else None
    d_g0 = cuda.device_array((B, H), dt)
    dummies = {k: cuda.to_device(v) for k, v in _numpy_dummies(dt).items()}
    launch_backward(_to_dev(grad_y), _to_dev(grad_h_n), _to_dev(h0), _to_dev(w_hh),
                    _to_dev(lengths), _to_dev(resets), _to_dev(y),
                    _to_dev(ws) if mode == MODE_GRU else None, mode, reset_after,
                    d_gx, d_gh, d_hin, d_g0, threads=threads, rows_per_block=rows_per_block,
                    dummies=dummies)
    dgx = d_gx.copy_to_host().reshape(T * B, GH)
    dgh = d_gh.copy_to_host().reshape(T * B, GH)
    h_prev = reference.prev_states(torch.from_numpy(y), torch.from_numpy(h0),
                                   None if resets is None else torch.from_numpy(resets)).numpy()
    grad_x = (dgx @ w_ih).reshape(T, B, I)
    if lengths is not None:  # what inactive steps read (padding, a length-0 row's h0) enters as zeros (reference)
        active = (np.arange(T)[:, None] < lengths[None, :])[:, :, None]
        grad_x = np.where(active, grad_x, 0).astype(grad_x.dtype)  # (and their grad_x is exactly zero)
        x = np.where(active, x, 0).astype(x.dtype)
        h_prev = np.where(active, h_prev, 0).astype(h_prev.dtype)
    h_prev = h_prev.reshape(T * B, H)
    grad_w_ih = dgx.T @ x.reshape(T * B, I)
    if split:
        h_in = d_hin.copy_to_host().reshape(T * B, H)
        grad_w_hh = np.concatenate([dgh[:, :2 * H].T @ h_prev, dgh[:, 2 * H:].T @ h_in], 0)
    else:
        grad_w_hh = dgh.T @ h_prev
    return (grad_x, d_g0.copy_to_host(), grad_w_ih, grad_w_hh, dgx.sum(0), dgh.sum(0))


# --------------------------------------------------------------------------------------------------
# torch entry points (CUDA tensors; CPU tensors under the simulator)
# --------------------------------------------------------------------------------------------------
_DUMMIES = {}


def _dev(t):
    if t is None:
        return None
    t = t.detach()
    if SIMULATOR:
        return t.numpy()  # the simulator copies NumPy arguments in and back
    # sync=False: the kernel runs on torch's current stream, so no stream synchronisation is needed
    return cuda.as_cuda_array(t, sync=False)


def _torch_dummies(dtype, device):
    key = (dtype, str(device))
    d = _DUMMIES.get(key)
    if d is None:
        d = {"vec": torch.zeros(1, dtype=dtype, device=device),
             "len": torch.zeros(1, dtype=torch.int64, device=device),
             "rst": torch.zeros(1, 1, dtype=torch.bool, device=device),
             "ws": torch.zeros(1, 1, 1, dtype=dtype, device=device)}
        d = {k: _dev(v) for k, v in d.items()} if SIMULATOR else {
            k: (v, _dev(v)) for k, v in d.items()}
        _DUMMIES[key] = d
    if SIMULATOR:
        return d
    return {k: v[1] for k, v in d.items()}


_STREAMS = {}


def _stream(device):
    """numba view of torch's current stream (cached per device and stream handle)."""
    if SIMULATOR:
        return 0  # the simulator has no external streams
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    s = _STREAMS.get(key)
    if s is None:
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        s = _STREAMS[key] = cuda.external_stream(key[1])
    return s


def _on_device(device):
    """numba's context of the tensors' GPU, for the launch: numba wraps torch's pointers and
    launches in its current context, device 0's unless told, whatever torch's current device is
    (tensors on cuda:1 would be launched on in device 0's context)."""
    if SIMULATOR:
        return contextlib.nullcontext()
    return cuda.gpus[device.index if device.index is not None else torch.cuda.current_device()]


def _check_device(x):
    if not SIMULATOR and x.device.type != "cuda":
        raise ValueError(f"rnnrec_fast numba.cuda backend: expected CUDA tensors, got {x.device}")


def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode: int, reset_after: bool,
            threads=None, rows_per_block=None):
    _check_device(x)
    if threads is None and rows_per_block is None and _reference_if_too_large(h0.shape[1], w_hh.shape[0],
                                                                              x.dtype, True):
        with torch.no_grad():
            return reference.forward(x.detach(), h0.detach(), w_ih.detach(), w_hh.detach(),
                                     None if b_ih is None else b_ih.detach(),
                                     None if b_hh is None else b_hh.detach(), lengths, resets, mode, reset_after)
    with torch.no_grad():
        x, h0, w_ih, w_hh = (t.detach() for t in (x, h0, w_ih, w_hh))
        T, B, _ = x.shape
        H = h0.shape[1]
        W = 4 * H if mode == MODE_GRU else 0  # gru: [r, z, n, hn]; the RNN modes: none
        from .numba_backend import _input_projection
        xp = _input_projection(x, w_ih, None if b_ih is None else b_ih.detach())
        whhT = w_hh.t().contiguous()
        y = torch.empty(T, B, H, dtype=x.dtype, device=x.device)
        h_n = torch.empty(B, H, dtype=x.dtype, device=x.device)
        ws = torch.empty(T, B, W, dtype=x.dtype, device=x.device)
        if T == 0 or B == 0:  # nothing to launch (and no zero-size arrays handed to numba)
            return y, h0.clone(), ws
        if lengths is not None:
            lengths = lengths.to(torch.int64)
        with _on_device(x.device):
            launch_forward(_dev(xp), _dev(h0), _dev(whhT), _dev(b_hh), _dev(lengths), _dev(resets),
                           mode, reset_after, _dev(y), _dev(h_n),
                           _dev(ws) if mode == MODE_GRU else None,  # the RNN modes: (T, B, 0), unused
                           stream=_stream(x.device), threads=threads, rows_per_block=rows_per_block,
                           dummies=_torch_dummies(x.dtype, x.device))
    return y, h_n, ws


def backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws,
             mode: int, reset_after: bool, threads=None, rows_per_block=None):
    _check_device(x)
    if threads is None and rows_per_block is None and _reference_if_too_large(h0.shape[1], w_hh.shape[0],
                                                                              x.dtype, False):
        with torch.no_grad():
            return reference.backward(*(None if t is None else t.detach() for t in (
                grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh)), lengths, resets, y.detach(), ws.detach(),
                mode, reset_after)
    with torch.no_grad():
        grad_y, grad_h_n, x, h0, w_ih, w_hh, y, ws = (
            t.detach().contiguous() for t in (grad_y, grad_h_n, x, h0, w_ih, w_hh, y, ws))
        T, B, I = x.shape
        H = h0.shape[1]
        GH = w_hh.shape[0]
        split = mode == MODE_GRU and not reset_after
        kw = dict(dtype=x.dtype, device=x.device)
        d_gx = torch.empty(T, B, GH, **kw)
        d_gh = torch.empty(T, B, GH, **kw)
        h_in = torch.empty(T, B, H, **kw) if split else None
        grad_h0 = torch.empty(B, H, **kw)
        if lengths is not None:
            lengths = lengths.to(torch.int64)
        if T == 0 or B == 0:
            d_gx.zero_()
            d_gh.zero_()
            grad_h0.copy_(grad_h_n)
            if h_in is not None:
                h_in.zero_()
        else:
            with _on_device(x.device):
                launch_backward(_dev(grad_y), _dev(grad_h_n), _dev(h0), _dev(w_hh), _dev(lengths),
                                _dev(resets), _dev(y), _dev(ws) if mode == MODE_GRU else None,
                                mode, reset_after, _dev(d_gx),
                                _dev(d_gh), _dev(h_in), _dev(grad_h0), stream=_stream(x.device),
                                threads=threads, rows_per_block=rows_per_block,
                                dummies=_torch_dummies(x.dtype, x.device))
        from .numba_backend import _weight_grads
        grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = _weight_grads(
            x, h0, y, lengths, resets, d_gx, d_gh, h_in, w_ih, mode, H)
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh

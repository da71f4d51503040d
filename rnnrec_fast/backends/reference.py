"""Pure-PyTorch reference backend: the readable specification of the op.

Every fast backend (C++, CUDA, Numba) implements exactly these two functions,
with the same arguments, the same outputs and the same workspace layout, and the
tests compare them element by element.

Shapes (already validated and contiguous when a backend is called):
    x        (T, B, I)          float32 / float64 (CUDA backends: also half / bfloat16)
    h0       (B, H)
    w_ih     (G*H, I)           G = 1 for rnn_tanh / rnn_relu, 3 for gru (rows: r, z, n)
    w_hh     (G*H, H)
    b_ih     (G*H,) or None
    b_hh     (G*H,) or None
    lengths  (B,) int64 or None  0 <= lengths[b] <= T; steps t >= lengths[b] are inactive
    resets   (T, B) bool or None resets[t, b]: row b's state is zeroed before step t
                                 (applies only when step t is active for that row)
    mode     int: MODE_RNN_TANH, MODE_RNN_RELU or MODE_GRU
    reset_after  bool (gru only): True  -> n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   (PyTorch, cuDNN)
                                  False -> n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)   (Cho et al. 2014)

forward(...) -> (y, h_n, ws)
    y   (T, B, H)   the state after each active step; exact zeros at inactive steps
    h_n (B, H)      the state after each row's last active step (h0 when a row has none)
    ws  (T, B, W)   saved for backward; exact zeros at inactive steps; float32 for half / bfloat16
                    inputs (which are computed with float32 state and accumulation)
        rnn modes: W = 0    (nothing: the backward needs only y and the state entering each step)
        gru:       W = 4*H, ws[t, b] = [r, z, n, hn]
                   hn = W_hn h_prev + b_hn         (reset_after=True)
                   hn = W_hn (r * h_prev) + b_hn   (reset_after=False)
    h_prev, the state entering step t after a reset, is not saved: it is h0 at t = 0, y[t - 1]
    after (an active step t follows an active step t - 1, whose y is its state), and zero where
    resets[t] is set. The backward rebuilds it from y, h0 and resets (``prev_states``); the
    workspace would otherwise repeat y, and a training step's peak memory is the workspace's.
    For half / bfloat16 inputs y is rounded to the input dtype, so the backward sees h_prev rounded
    the same way (the gradients are rounded to that dtype too).

backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws, mode, reset_after)
    -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)
    grad_b_* have shape (G*H,) and are returned even when the bias is None (the caller drops them).
    grad_y at inactive steps is ignored (the output there is a constant zero), and so is x there:
    padding the forward never read enters grad_w_ih as zeros (NaN padding gives finite gradients),
    and its gradient, grad_x there, is exactly zero (whatever W_ih holds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODE_RNN_TANH = 0
MODE_RNN_RELU = 1
MODE_GRU = 2

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _active_mask(lengths, T, B, device):
    """(T, B, 1) bool mask of active steps, or None when every step is active."""
    if lengths is None:
        return None
    steps = torch.arange(T, device=device).unsqueeze(1)
    return (steps < lengths.to(device).unsqueeze(0)).unsqueeze(2)


def _upcast(*tensors):
    return [None if t is None else t.float() for t in tensors]


def prev_states(y, h0, resets):
    """(T, B, H) state entering each step after a reset: h0, then y shifted by one step; zero where
    resets[t, b] is set. Exact at every active step (see the module docstring); what it holds at an
    inactive step is never used (the gradients there are zero)."""
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]], 0)
    return h_prev if resets is None else h_prev.masked_fill(resets.unsqueeze(2), 0.0)


def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode: int, reset_after: bool):
    if x.dtype in (torch.float16, torch.bfloat16):
        y, h_n, ws = forward(*_upcast(x, h0, w_ih, w_hh, b_ih, b_hh), lengths, resets, mode, reset_after)
        return y.to(x.dtype), h_n.to(x.dtype), ws
    T, B, _ = x.shape
    H = h0.shape[1]
    active = _active_mask(lengths, T, B, x.device)
    xp = F.linear(x, w_ih, b_ih)  # input projections of every step: one GEMM
    h = h0
    ys, wss = [], []
    for t in range(T):
        h_prev = h if resets is None else h.masked_fill(resets[t].unsqueeze(1), 0.0)
        hp = F.linear(h_prev, w_hh, b_hh)
        if mode == MODE_GRU:
            xr, xz, xn = xp[t].chunk(3, 1)
            hr, hz, hn = hp.chunk(3, 1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            if reset_after:
                n = torch.tanh(xn + r * hn)
            else:
                b_hn = None if b_hh is None else b_hh[2 * H:]
                hn = F.linear(r * h_prev, w_hh[2 * H:], b_hn)
                n = torch.tanh(xn + hn)
            h_new = (1.0 - z) * n + z * h_prev
            ws_t = torch.cat([r, z, n, hn], 1)
        else:
            pre = xp[t] + hp
            h_new = torch.tanh(pre) if mode == MODE_RNN_TANH else torch.relu(pre)
            ws_t = h_new.new_empty(B, 0)
        if active is None:
            y_t = h_new
        else:
            m = active[t]
            h_new = torch.where(m, h_new, h)
            y_t = torch.where(m, h_new, 0.0)
            ws_t = torch.where(m, ws_t, 0.0)
        ys.append(y_t)
        wss.append(ws_t)
        h = h_new
    y = torch.stack(ys)
    ws = torch.stack(wss)
    return y, h.clone(), ws


def backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws,
             mode: int, reset_after: bool):
    if x.dtype in (torch.float16, torch.bfloat16):
        grads = backward(*_upcast(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh), lengths, resets,
                         y.float(), ws, mode, reset_after)
        return tuple(g.to(x.dtype) for g in grads)
    T, B, _ = x.shape
    H = h0.shape[1]
    active = _active_mask(lengths, T, B, x.device)
    d_gx = torch.zeros(T, B, w_ih.shape[0], dtype=x.dtype, device=x.device)  # d(x W_ih^T + b_ih)
    d_gh = torch.zeros_like(d_gx)  # d(h W_hh^T + b_hh); for gru/reset_after=False: n rows act on r*h
    h_in = torch.zeros(T, B, H, dtype=x.dtype, device=x.device)  # what the n rows of W_hh multiplied
    dh = grad_h_n.clone()  # gradient w.r.t. the state after step t
    h_prev_all = prev_states(y, h0, resets)
    for t in range(T - 1, -1, -1):
        m = None if active is None else active[t]
        g = dh + grad_y[t] if m is None else dh + torch.where(m, grad_y[t], 0.0)
        if mode == MODE_GRU:
            h_prev = h_prev_all[t]
            r, z, n, hn = ws[t].split(H, 1)
            dn = g * (1.0 - z)
            dz = g * (h_prev - n)
            dn_pre = dn * (1.0 - n * n)
            dz_pre = dz * z * (1.0 - z)
            if reset_after:
                dr = dn_pre * hn
                dhn = dn_pre * r
                dr_pre = dr * r * (1.0 - r)
                dgh = torch.cat([dr_pre, dz_pre, dhn], 1)
                dgx = torch.cat([dr_pre, dz_pre, dn_pre], 1)
                dh_prev = g * z + dgh @ w_hh
                h_in[t] = h_prev
            else:
                d_rh = dn_pre @ w_hh[2 * H:]  # gradient of r * h_prev
                dr_pre = d_rh * h_prev * r * (1.0 - r)
                dgh = torch.cat([dr_pre, dz_pre, dn_pre], 1)
                dgx = dgh
                dh_prev = g * z + d_rh * r + dgh[:, :2 * H] @ w_hh[:2 * H]
                h_in[t] = r * h_prev
        else:
            h_new = y[t]
            # relu: torch's threshold_backward, 0 where h <= 0, else g (a NaN state passes g on)
            dgx = g * (1.0 - h_new * h_new) if mode == MODE_RNN_TANH else torch.where(h_new <= 0, 0.0, g)
            dgh = dgx
            dh_prev = dgx @ w_hh
        if resets is not None:
            dh_prev = dh_prev.masked_fill(resets[t].unsqueeze(1), 0.0)
        if m is not None:
            dgx = torch.where(m, dgx, 0.0)
            dgh = torch.where(m, dgh, 0.0)
            dh_prev = torch.where(m, dh_prev, dh)  # inactive step: the state passes through
        d_gx[t] = dgx
        d_gh[t] = dgh
        dh = dh_prev
    # inactive steps have zero gradients: what they read (padding of x, the h0 of a row of length
    # 0, which may hold anything) enters the weight gradients as zeros (0 * NaN is NaN)
    if active is not None:
        x, h_prev_all, h_in = (v.masked_fill(~active, 0.0) for v in (x, h_prev_all, h_in))
    x2 = x.reshape(T * B, -1)
    dgx2 = d_gx.reshape(T * B, -1)
    dgh2 = d_gh.reshape(T * B, -1)
    h_prev_all = h_prev_all.reshape(T * B, H)
    grad_x = (dgx2 @ w_ih).reshape(x.shape)
    if active is not None:  # (exact zeros: x there is never read, even where W_ih holds inf or NaN)
        grad_x = grad_x.masked_fill(~active, 0.0)
    grad_w_ih = dgx2.t() @ x2
    if mode == MODE_GRU:
        grad_w_hh = torch.cat([dgh2[:, :2 * H].t() @ h_prev_all,
                               dgh2[:, 2 * H:].t() @ h_in.reshape(T * B, H)], 0)
    else:
        grad_w_hh = dgh2.t() @ h_prev_all
    return grad_x, dh, grad_w_ih, grad_w_hh, dgx2.sum(0), dgh2.sum(0)

"""Numba backend: ``@njit`` kernels on CPU (``numba_cpu``) and ``numba.cuda`` kernels on GPU
(``numba_cuda``), behind the same ``forward`` / ``backward`` functions as ``reference.py``.

Importing this module raises ImportError (with the reason) when Numba is not installed, so the op
layer can report it or fall back to another backend.
"""
from __future__ import annotations

try:
    import numba  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    if isinstance(exc, ModuleNotFoundError) and exc.name == "numba":
        raise ImportError("rnnrec_fast: the 'numba' backend needs the numba package (pip install numba)") from exc
    # installed, and its import failed (NUMBA_NUM_THREADS=0, a numpy it does not support): not a
    # missing package
    raise ImportError(f"rnnrec_fast: the 'numba' backend cannot run: importing numba failed: {exc!r}") from exc

import numpy as np
import torch

from . import numba_cpu, reference

MODE_RNN_TANH = 0
MODE_RNN_RELU = 1
MODE_GRU = 2

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float64)

_cuda_module = None


def _cuda():
    """numba_cuda, imported on first use (it needs a working numba.cuda)."""
    global _cuda_module
    if _cuda_module is None:
        try:
            from . import numba_cuda
        except Exception as exc:
            raise ImportError(
                "rnnrec_fast: the numba backend could not load numba.cuda for CUDA tensors "
                f"({exc!r})") from exc
        _cuda_module = numba_cuda
    return _cuda_module


_cuda_probe: list = []  # [reason or None], once a CUDA tensor's backend has been chosen


def auto_skip(device_type):
    """Why backend="auto" passes this backend over for ``device_type`` tensors (None: it does not).
    With NUMBA_DISABLE_JIT=1 the CPU kernels run interpreted, hundreds of times slower than the
    reference backend's torch calls (a GRU step of B=8, T=5, H=100: ~270 ms against ~1 ms): "auto"
    takes the reference backend then, and a forced "numba" still runs them (to debug them)."""
    if device_type == "cpu" and numba.config.DISABLE_JIT:
        return "NUMBA_DISABLE_JIT=1: numba's CPU kernels would run interpreted"
    return None


def device_unavailable(device_type):
    """Why numba cannot run this backend's kernels on ``device_type`` tensors here (None: it can).
    On CUDA it needs numba.cuda with a driver that sees a GPU, and NVVM and libdevice (from a CUDA
    toolkit) to compile the kernels: without them "auto" falls back to the next backend, and a
    forced "numba" says why, instead of failing at the first launch. Probed once."""
    if device_type != "cuda":
        return None
    if not _cuda_probe:
        _cuda_probe.append(_probe_cuda())
    return _cuda_probe[0]


def _probe_cuda():
    try:
        nc = _cuda()
        if nc.SIMULATOR:
            return None
        from numba import cuda
        from numba.cuda.cudadrv import nvvm
        if not cuda.is_available():
            return "numba.cuda finds no usable CUDA driver and GPU"
        if not nvvm.is_available():
            return "numba.cuda cannot load NVVM (libnvvm, from a CUDA toolkit) to compile its kernels"
        nvvm.get_libdevice()
    except Exception as exc:  # an ImportError from _cuda(), a missing libdevice, a driver error
        return f"numba.cuda is not usable: {exc}"
    return None


def _check(x, mode):
    if x.dtype not in DTYPES:
        raise TypeError(f"rnnrec_fast numba backend: unsupported dtype {x.dtype} "
                        f"(supported: {', '.join(str(d) for d in DTYPES)})")
    dev = "cpu" if x.is_cpu else x.device.type
    if dev not in DEVICES:
        raise ValueError(f"rnnrec_fast numba backend: unsupported device {x.device} "
                         f"(supported: {', '.join(DEVICES)})")
    if mode not in (MODE_RNN_TANH, MODE_RNN_RELU, MODE_GRU):
        raise ValueError(f"rnnrec_fast numba backend: unknown mode {mode}")
    return dev


def _check_shapes(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, saved=()):
    """The shapes the kernels read by, unchecked (they do not bounds-check): the op checks them
    before it calls a backend, and this repeats the few that keep a direct call of ``forward`` /
    ``backward`` inside its tensors (``saved``: the backward's (name, tensor, shape) triples; a
    length's value only compares with step indices, and none is out of bounds), and that every float
    tensor has x's dtype. A ValueError names the first that does not fit. (The messages are formatted
    on failure alone: formatting them all took ~10 us a call, most of the check.)"""
    def fail(what):
        raise ValueError(f"rnnrec_fast numba backend: {what}")
    if not (x.dim() == 3 and h0.dim() == 2 and w_hh.dim() == 2):
        fail("x must be (T, B, I), h0 (B, H), w_hh (G*H, H)")
    T, B, I = x.shape
    H = h0.shape[1]
    GH = (3 if mode == MODE_GRU else 1) * H
    if h0.shape != (B, H):
        fail(f"h0 must be ({B}, H), got {tuple(h0.shape)}")
    if w_hh.shape != (GH, H):
        fail(f"w_hh must be ({GH}, {H}), got {tuple(w_hh.shape)}")
    if w_ih.shape != (GH, I):
        fail(f"w_ih must be ({GH}, {I}), got {tuple(w_ih.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and b.shape != (GH,):
            fail(f"{name} must be ({GH},), got {tuple(b.shape)}")
    if resets is not None and resets.shape != (T, B):
        fail(f"resets must be ({T}, {B}), got {tuple(resets.shape)}")
    if lengths is not None and lengths.shape != (B,):
        fail(f"lengths must be ({B},), got {tuple(lengths.shape)}")
    for name, t, shape in saved:
        if tuple(t.shape) != tuple(shape):
            fail(f"{name} must be {shape}, got {tuple(t.shape)}")
    # one dtype: the kernels would cast another on the way in and give x's (from a review: float64
    # weights beside a float32 x returned float32 results, no error)
    dt = x.dtype
    for name, t in (("h0", h0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)) + \
            tuple((name, t) for name, t, _ in saved):
        if t is not None and t.dtype != dt:
            fail(f"{name} must have x's dtype {dt}, got {t.dtype}")


def _np(t):
    """NumPy view of a CPU tensor (no copy when contiguous)."""
    return t.detach().contiguous().numpy()


def _input_projection(x, w_ih, b_ih):
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    if b_ih is None:
        xp = torch.mm(x2, w_ih.t())
    else:
        xp = torch.addmm(b_ih, x2, w_ih.t())
    return xp.view(T, B, w_ih.shape[0])


def forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode: int, reset_after: bool):
    dev = _check(x, mode)
    mode = int(mode)
    _check_shapes(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    reset_after = bool(reset_after)
    if dev == "cuda":
        return _cuda().forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after)
    with torch.no_grad():
        return _forward_cpu(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after)


def _forward_cpu(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after):
    x, h0, w_ih, w_hh = (t.detach().contiguous() for t in (x, h0, w_ih, w_hh))
    T, B, _ = x.shape
    H = h0.shape[1]
    dt = x.dtype
    y = torch.empty(T, B, H, dtype=dt, device="cpu")  # (the CPU by name: the kernels write NumPy views)
    h_n = torch.empty(B, H, dtype=dt, device="cpu")
    ws = torch.empty(T, B, 4 * H if mode == MODE_GRU else 0, dtype=dt, device="cpu")  # gru: [r, z, n, hn]
    run_cpu(x.numpy(), h0.numpy(), w_ih.numpy(), w_hh.numpy(), None if b_ih is None else _np(b_ih),
            None if b_hh is None else _np(b_hh), None if lengths is None else _np(lengths.to(torch.int64)),
            None if resets is None else _np(resets.to(torch.bool)), mode, reset_after, y.numpy(), h_n.numpy(),
            ws.numpy())
    return y, h_n, ws


def run_cpu(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, y, h_n, ws):
    """The CPU forward on NumPy arrays, C-contiguous, of one float dtype (the modules' inference
    fast path calls it directly): x (T, B, I), h0 (B, H), w_ih (G*H, I), w_hh (G*H, H); b_ih, b_hh
    (G*H,), lengths int64 (B,), resets bool (T, B) or None. Writes y (T, B, H), h_n (B, H) and ws
    (T, B, 4*H) for GRU, or (T, B, 0): the RNN modes, and a GRU forward no backward follows.
    Nothing is checked here and the kernels do not bounds-check: the callers check the shapes."""
    T, B, I = x.shape
    H = h0.shape[1]
    GH = w_hh.shape[0]
    if b_ih is None:
        b_ih = np.zeros(GH, x.dtype)
    if b_hh is None:
        b_hh = np.zeros(GH, x.dtype)
    if lengths is None:
        lengths = np.full(B, T, np.int64)
    if T * B <= numba_cpu.PROJECT_MAX_ROWS:  # a few rows: the input projection in the kernel too
        numba_cpu.forward_projected(x, w_ih, b_ih, h0, w_hh, b_hh, lengths, resets, mode, reset_after, y, h_n,
                                    ws)
        return
    # the input projection of every step: one GEMM (the kernel adds b_ih where it reads it)
    xp = torch.mm(torch.from_numpy(x).view(T * B, I), torch.from_numpy(w_ih).t()).numpy()
    w1 = numba_cpu.product_parts(w_hh, H, mode, reset_after)[0]  # the rows of a step's first product
    if T > 1 and numba_cpu.blas_steps(B, H, mode, reset_after):  # large: each step's product by BLAS
        w1t = torch.from_numpy(w1).t()
        numba_cpu.forward_stepped(xp.reshape(T, B, GH), b_ih, h0, w_hh, b_hh, lengths, resets, mode, reset_after,
                                  y, h_n, ws, lambda h: torch.mm(torch.from_numpy(h), w1t).numpy())
        return
    gh0 = None
    if B >= numba_cpu.GH0_MIN_ROWS:  # step 0's first product needs only h0: one GEMM as well
        gh0 = torch.mm(torch.from_numpy(numba_cpu.reset_state(h0, resets, 0)), torch.from_numpy(w1).t()).numpy()
    numba_cpu.forward_recurrence(xp.reshape(T, B, GH), b_ih, h0, w_hh, b_hh, lengths, resets, mode, reset_after,
                                 y, h_n, ws, gh0)


def run_layers_cpu(x, h0, layers, mode, reset_after, h_n, y=None):
    """Stacked layers' inference on the CPU kernels (the modules' inference path and the serving
    fast path call it): x (T, B, I) a NumPy array; ``h0[l]`` layer l's (B, H) initial state, or
    None for zeros; ``layers`` one ``(w_ih, w_hh, b_ih, b_hh)`` of C-contiguous arrays per layer
    (biases None where absent). Writes each layer's final state into ``h_n[l]`` and, where ``y``
    (T, B, H) is given, the last layer's outputs into it; returns the last layer's outputs. No
    workspace: no backward follows."""
    T, B = x.shape[:2]
    ws = np.empty((T, B, 0), x.dtype)
    last = len(layers) - 1
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        H = w_hh.shape[1]
        state = np.zeros((B, H), x.dtype) if h0[l] is None else h0[l]
        out = y if l == last and y is not None else np.empty((T, B, H), x.dtype)
        run_cpu(np.ascontiguousarray(x), np.ascontiguousarray(state), w_ih, w_hh, b_ih, b_hh, None, None, mode,
                reset_after, out, h_n[l], ws)
        x = out
    return x


def _weight_grads(x, h0, y, lengths, resets, d_gx, d_gh, h_in, w_ih, mode, H):
    """grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh from the pre-activation gradients
    (torch GEMMs; works on CPU and CUDA tensors). x, y, d_gx, d_gh, h_in contiguous.

    The rows of W_hh that act on h_prev (all, or r and z for GRU with reset_after=False, whose n
    rows act on h_in = r * h_prev) get d_gh^T h_prev, h_prev being h0 at step 0, y[t - 1] after and
    zero where the row resets or the step is inactive (``reference.prev_states`` and its active
    mask: the state it discards may hold anything, inf or NaN, and 0 * inf is NaN). Without lengths
    or resets it is not built: the product is d_gh[0]^T h0 + d_gh[1:]^T y[:-1], no (T, B, H) copy of
    y. Inactive steps have d_gh = 0, and x there (padding) enters grad_w_ih as zeros, as does the h0
    of a row of length 0 (or less: CUDA lengths are clamped, not checked)."""
    T, B, I = x.shape
    GH = d_gx.shape[2]
    active = None
    if lengths is not None:
        active = reference._active_mask(lengths, T, B, x.device)
        x = x.masked_fill(~active, 0.0)
    x2 = x.reshape(T * B, I)
    dgx2 = d_gx.view(T * B, GH)
    dgh2 = d_gh.view(T * B, GH)
    grad_x = torch.mm(dgx2, w_ih).view(T, B, I)
    if active is not None:  # (exact zeros past a row's length, whatever W_ih holds: reference.backward)
        grad_x.masked_fill_(~active, 0.0)
    grad_w_ih = torch.mm(dgx2.t(), x2)
    grad_b_ih = dgx2.sum(0)
    grad_b_hh = dgh2.sum(0)
    K = GH if h_in is None else 2 * H  # the rows of W_hh acting on h_prev
    grad_w_hh = torch.empty(GH, H, dtype=x.dtype, device=x.device)
    if h_in is not None:
        torch.mm(dgh2[:, 2 * H:].t(), h_in.view(T * B, H), out=grad_w_hh[2 * H:])
    if T == 0:
        grad_w_hh[:K].zero_()
    elif lengths is None and resets is None:
        torch.mm(d_gh[0, :, :K].t(), h0, out=grad_w_hh[:K])
        if T > 1:
            grad_w_hh[:K].addmm_(dgh2[B:, :K].t(), y[:T - 1].view((T - 1) * B, H))
    else:
        h_prev = reference.prev_states(y, h0, None if resets is None else resets.to(device=x.device, dtype=torch.bool))
        if active is not None:
            h_prev = h_prev.masked_fill(~active, 0.0)
        torch.mm(dgh2[:, :K].t(), h_prev.reshape(T * B, H), out=grad_w_hh[:K])
    return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws,
             mode: int, reset_after: bool):
    dev = _check(x, mode)
    mode = int(mode)
    reset_after = bool(reset_after)
    if x.dim() == 3 and h0.dim() == 2:
        (T, B, _), H = x.shape, h0.shape[1]
        saved = (("grad_y", grad_y, (T, B, H)), ("grad_h_n", grad_h_n, (B, H)), ("y", y, (T, B, H)),
                 ("ws", ws, (T, B, 4 * H if mode == MODE_GRU else 0)))
    else:
        saved = ()
    _check_shapes(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, saved)
    if dev == "cuda":
        return _cuda().backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets,
                                y, ws, mode, reset_after)
    with torch.no_grad():
        grad_y, grad_h_n, x, h0, w_ih, w_hh, y, ws = (
            t.detach().contiguous() for t in (grad_y, grad_h_n, x, h0, w_ih, w_hh, y, ws))
        T, B, _ = x.shape
        H = h0.shape[1]
        GH = w_hh.shape[0]
        split = mode == MODE_GRU and not reset_after
        d_gx = torch.empty(T, B, GH, dtype=x.dtype, device="cpu")
        d_gh = torch.empty(T, B, GH, dtype=x.dtype, device="cpu")
        h_in = torch.empty(T, B, H, dtype=x.dtype, device="cpu") if split else None
        grad_h0 = torch.empty(B, H, dtype=x.dtype, device="cpu")
        lens = np.full(B, T, np.int64) if lengths is None else _np(lengths.to(torch.int64))
        rst = None if resets is None else _np(resets.to(torch.bool))
        if T > 1 and not split and numba_cpu.blas_steps(B, H, mode, reset_after):  # each step's product by BLAS
            numba_cpu.backward_stepped(
                grad_y.numpy(), grad_h_n.numpy(), h0.numpy(), w_hh.numpy(), lens, rst, y.numpy(), ws.numpy(),
                mode, reset_after, d_gx.numpy(), d_gh.numpy(), grad_h0.numpy(),
                lambda d: torch.mm(torch.from_numpy(d), w_hh).numpy())
        else:
            numba_cpu.backward_recurrence(
                grad_y.numpy(), grad_h_n.numpy(), h0.numpy(), w_hh.numpy(), lens, rst,
                y.numpy(), ws.numpy(),
                mode, reset_after, d_gx.numpy(), d_gh.numpy(),
                None if h_in is None else h_in.numpy(), grad_h0.numpy())
        grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = _weight_grads(
            x, h0, y, lengths, resets, d_gx, d_gh, h_in, w_ih, mode, H)
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh

"""Check the numba.cuda kernels of the numba backend against the reference, through Numba's CUDA
simulator (runs on CPU, no GPU needed). Run as a script; exits non-zero on the first mismatch.

    python tests/cudasim_check.py            # full grid (tests/test_numba_cudasim.py runs this)

NUMBA_ENABLE_CUDASIM must be set before numba is imported, so it is set here before any import and
this file must run in its own process. Sizes are tiny: the simulator runs every thread as a Python
thread.
"""
import os

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rnnrec_fast.backends import numba_cuda, reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from discarded_state import discarded_state_case  # noqa: E402

MODES = [(0, False), (1, False), (2, True), (2, False)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}
NAMES = ["grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]


def make_case(mode, bias, lengths_kind, with_resets, dtype, T=4, B=3, H=5, I=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 3 if mode == 2 else 1

    def rnd(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)

    x = rnd(T, B, I)
    h0 = rnd(B, H, scale=0.5)
    w_ih = rnd(G * H, I, scale=0.6)
    w_hh = rnd(G * H, H, scale=0.6)
    b_ih = rnd(G * H, scale=0.3) if bias else None
    b_hh = rnd(G * H, scale=0.3) if bias else None
    lengths = None
    if lengths_kind == "mixed":  # T, 0 and in between; NaN padding past them and NaN h0 rows of length 0 (never read)
        lengths = torch.tensor([(T, 0, 2)[b % 3] for b in range(B)], dtype=torch.int64)
        x = x.masked_fill((torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)).unsqueeze(2), float("nan"))
        h0 = h0.masked_fill((lengths == 0).unsqueeze(1), float("nan"))
    resets = None
    if with_resets:
        resets = torch.rand(T, B, generator=g) < 0.35
        resets[0, 0] = True
        resets[min(1, T - 1), B - 1] = True
    return (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets), rnd(T, B, H), rnd(B, H)


def check(args, mode, ra, gy, ghn, dtype, label, launch, equal_nan=False):
    """numba_cuda's forward and backward against the reference. With lengths (make_case's
    "mixed"), the NaN h0 of a row of length 0 is h_n there and nothing else: every gradient finite."""
    tol = dict(TOL[dtype], equal_nan=equal_nan)
    ref_fwd = reference.forward(*args, mode, ra)
    got_fwd = numba_cuda.forward(*args, mode, ra, **launch)
    T, B, H = ref_fwd[0].shape
    assert got_fwd[2].shape == (T, B, 4 * H if mode == 2 else 0), f"{label} ws shape"
    lengths = args[6]
    for name, a, b in zip(("y", "h_n", "ws"), got_fwd, ref_fwd):
        torch.testing.assert_close(a, b, **dict(tol, equal_nan=equal_nan or (name == "h_n" and lengths is not None)),
                                   msg=lambda m, n=name: f"{label} {n}: {m}")
    y, ws = ref_fwd[0], ref_fwd[2]
    ref_bwd = reference.backward(gy, ghn, *args, y, ws, mode, ra)
    got_bwd = numba_cuda.backward(gy, ghn, *args, y, ws, mode, ra, **launch)
    for name, a, b in zip(NAMES, got_bwd, ref_bwd):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{label} {n}: {m}")
        assert lengths is None or torch.isfinite(a).all(), f"{label} {name}: not finite"


def check_too_large_for_shared_memory():
    """A hidden size whose batch row does not fit the kernels' shared memory (the backward's limit
    is lower than the forward's) runs that pass on the reference's math, with one warning a size,
    instead of a ValueError at backward() (SHARED_BYTES shrunk: the simulator would take minutes at
    the real limits). GRU, H = 5, float64: the forward needs 120 bytes a row, the backward 200."""
    import warnings

    import rnnrec_fast

    saved = numba_cuda.SHARED_BYTES
    try:
        for limit, fwd_kernel in ((150, True), (100, False)):
            numba_cuda.SHARED_BYTES = limit
            numba_cuda._WARNED_TOO_LARGE.clear()
            args, gy, ghn = make_case(2, True, "mixed", True, torch.float64, seed=11)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rnnrec_fast.ops._set_last("numba")
                got_fwd = numba_cuda.forward(*args, 2, True)
                assert rnnrec_fast.last_backend() == ("numba" if fwd_kernel else "reference")
                got_bwd = numba_cuda.backward(gy, ghn, *args, *got_fwd[::2], 2, True)
                numba_cuda.backward(gy, ghn, *args, *got_fwd[::2], 2, True)  # (warned once)
            msgs = [str(w.message) for w in caught]
            assert len(msgs) == (1 if fwd_kernel else 2), msgs
            assert all("shared memory" in m and "reference" in m for m in msgs), msgs
            ref_fwd = reference.forward(*args, 2, True)
            ref_bwd = reference.backward(gy, ghn, *args, *ref_fwd[::2], 2, True)
            for name, a, b in zip(("y", "h_n", "ws") + tuple(NAMES), got_fwd + got_bwd, ref_fwd + ref_bwd):
                torch.testing.assert_close(a, b, **TOL[torch.float64], equal_nan=name == "h_n",
                                           msg=lambda m, n=name: f"[too large, limit {limit}] {n}: {m}")
    finally:
        numba_cuda.SHARED_BYTES = saved
        numba_cuda._WARNED_TOO_LARGE.clear()


def check_shared_memory_limits():
    """The kernels' limits on the hidden size hold exactly at SHARED_BYTES: a batch row that needs just
    that much shared memory still runs on the kernels (float32: the forward up to H = 4096, any mode,
    and the RNN modes' backward up to H = 4096; float64 the forward up to H = 2048), with one row per
    block and no ValueError from the launch configuration; one unit more runs on the reference. Only
    the sizes are computed (no launch: the simulator would take minutes). From a mutation review: a
    '<' for '<=' in either check (the H = 4096 float32 GRU forward sent to the reference, or
    refused) went unnoticed."""
    import warnings

    import rnnrec_fast

    assert numba_cuda.SHARED_BYTES == 48 * 1024
    cases = [(torch.float32, True, 4096, 3), (torch.float32, True, 4096, 1), (torch.float32, False, 4096, 1),
             (torch.float64, True, 2048, 3), (torch.float64, False, 2048, 1)]  # (dtype, forward, H, gates)
    try:
        for dtype, fwd, H, G in cases:
            label = f"[shared memory limit {dtype} {'forward' if fwd else 'backward'} H={H} G={G}]"
            assert numba_cuda._row_bytes(H, G * H, dtype.itemsize, fwd) == numba_cuda.SHARED_BYTES, label
            rnnrec_fast.ops._set_last("numba")
            assert not numba_cuda._reference_if_too_large(H, G * H, dtype, fwd), label
            assert rnnrec_fast.last_backend() == "numba", label
            for B in (1, 3, 600):  # (from 512 rows the default is 4 rows per block, halved to fit)
                threads, rows, blocks, shmem = numba_cuda._launch_config(B, H, G * H, dtype.itemsize, None,
                                                                         None, fwd)
                assert (threads, rows, blocks, shmem) == (256, 1, B, numba_cuda.SHARED_BYTES), label
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                assert numba_cuda._reference_if_too_large(H + 1, G * (H + 1), dtype, fwd), label
            try:
                numba_cuda._launch_config(1, H + 1, G * (H + 1), dtype.itemsize, None, None, fwd)
            except ValueError as e:
                assert "shared memory" in str(e), label
            else:
                raise AssertionError(f"{label} H + 1 was not refused")
    finally:
        numba_cuda._WARNED_TOO_LARGE.clear()


def check_numpy_entry(dtype):
    """forward_numpy / backward_numpy (cuda.to_device + copy_to_host) on one case per mode."""
    for mode, ra in MODES:
        args, gy, ghn = make_case(mode, True, "mixed", True, dtype, seed=3)
        npa = [None if a is None else a.numpy() for a in args]
        y, hn, ws = numba_cuda.forward_numpy(*npa, mode, ra, threads=3, rows_per_block=2)
        ry, rhn, rws = reference.forward(*args, mode, ra)
        tol = TOL[dtype]
        for name, a, b in (("y", y, ry), ("h_n", hn, rhn), ("ws", ws, rws)):
            torch.testing.assert_close(torch.from_numpy(a), b, **tol, equal_nan=name == "h_n",
                                       msg=lambda m, n=name: f"numpy mode={mode} {n}: {m}")
        grads = numba_cuda.backward_numpy(gy.numpy(), ghn.numpy(), *npa, ry.numpy(), rws.numpy(),
                                          mode, ra, threads=3, rows_per_block=2)
        rgrads = reference.backward(gy, ghn, *args, ry, rws, mode, ra)
        for name, a, b in zip(NAMES, grads, rgrads):
            torch.testing.assert_close(torch.from_numpy(np.asarray(a)), b, **tol,
                                       msg=lambda m, n=name: f"numpy mode={mode} {n}: {m}")
            assert np.isfinite(a).all(), f"numpy mode={mode} {name}: not finite"  # (h0's NaN row: length 0)


def main():
    assert numba_cuda.SIMULATOR, "NUMBA_ENABLE_CUDASIM was not in effect"
    t0 = time.time()
    n = 0
    # launch shapes: threads < H (strided unit loops) with 2 rows per block (B=3: a partial block),
    # and threads > H with all 3 rows in one block (the default configuration, 32 threads and 1 row
    # per block, is used for the tiny cases only: every simulated thread is a Python thread)
    launches = [dict(threads=2, rows_per_block=2), dict(threads=6, rows_per_block=3)]
    for dtype in (torch.float64, torch.float32):
        for (mode, ra), bias, lk, rs in itertools.product(MODES, (True, False), ("none", "mixed"),
                                                          (False, True)):
            launch = launches[n % 2]
            args, gy, ghn = make_case(mode, bias, lk, rs, dtype, seed=n)
            label = (f"[{dtype} mode={mode} reset_after={ra} bias={bias} lengths={lk} "
                     f"resets={rs} launch={launch}]")
            check(args, mode, ra, gy, ghn, dtype, label, launch)
            n += 1
        check_numpy_entry(dtype)
    check_too_large_for_shared_memory()
    check_shared_memory_limits()
    # T = 1, B = 1, H = 1
    for mode, ra in MODES:
        args, gy, ghn = make_case(mode, True, "none", True, torch.float64, T=1, B=1, H=1, I=2)
        check(args, mode, ra, gy, ghn, torch.float64, f"[tiny mode={mode} ra={ra}]", {})
        n += 1
    # relu through a NaN state: torch's threshold_backward passes the gradient on (0 only where h <= 0)
    for dtype in (torch.float64, torch.float32):
        args, gy, ghn = make_case(1, True, "none", False, dtype, seed=7)
        args[0][1, 0, 0] = float("nan")
        check(args, 1, False, gy, ghn, dtype, f"[relu NaN state {dtype}]", launches[0], equal_nan=True)
        n += 1
    # a discarded state: a relu state overflowed to inf whose row is then past its length or resets,
    # or the h0 of a row of negative length (CUDA lengths are clamped, not checked): the reference's
    # h_prev is zero there and W_hh's gradient finite (zero gradients times the state were NaN)
    for dtype in (torch.float32, torch.float64):
        for kind in ("lengths", "resets", "negative"):
            (x, h0, w_ih, w_hh, b_ih, b_hh, _, _), gy, ghn = make_case(1, True, "none", False, dtype, T=2, B=2,
                                                                       H=3, I=2, seed=5)
            x, h0, w_ih, lengths, resets = discarded_state_case(kind, x, h0, w_ih)
            args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets)
            assert kind == "negative" or torch.isinf(reference.forward(*args, 1, False)[0][0, 0]).all()
            check(args, 1, False, gy, ghn, dtype, f"[discarded state {kind} {dtype}]", launches[0])
            n += 1
    # NaN and inf in W_hh beside lengths and resets: as the reference, a reset row's product is
    # 0 W_hh (NaN) and a row past its length takes none (its gradient passes through): the numba
    # CPU backend's BLAS-computed products got both wrong (fixed 2026-12-02)
    for mode, ra in MODES:
        args, gy, ghn = make_case(mode, True, "mixed", True, torch.float64, T=3, B=4, H=3, I=2, seed=5)
        w_hh = args[3].clone()
        w_hh[0, 0], w_hh[1, 1] = float("nan"), float("inf")
        args = args[:3] + (w_hh,) + args[4:]
        ref_fwd = reference.forward(*args, mode, ra)
        got_fwd = numba_cuda.forward(*args, mode, ra, **launches[1])
        ref_bwd = reference.backward(gy, ghn, *args, ref_fwd[0], ref_fwd[2], mode, ra)
        got_bwd = numba_cuda.backward(gy, ghn, *args, ref_fwd[0], ref_fwd[2], mode, ra, **launches[1])
        assert ref_fwd[0].isnan().any() and torch.isfinite(ref_bwd[1]).any()  # (both effects present)
        for name, a, b in zip(["y", "h_n", "ws"] + NAMES, [*got_fwd, *got_bwd], [*ref_fwd, *ref_bwd]):
            torch.testing.assert_close(a, b, **TOL[torch.float64], equal_nan=True,
                                       msg=lambda m, n=name: f"[non-finite W_hh mode={mode} ra={ra}] {n}: {m}")
        n += 1
    # empty time or batch: no launch, h_n = h0, grad_h0 = grad_h_n
    for T, B in ((0, 2), (2, 0)):
        for mode, ra in MODES:
            args, gy, ghn = make_case(mode, True, "none", False, torch.float64, T=max(T, 1),
                                      B=max(B, 1))
            args = (args[0][:T, :B].contiguous(), args[1][:B].contiguous()) + args[2:]
            y, hn, ws = numba_cuda.forward(*args, mode, ra)
            H = args[1].shape[1]
            assert y.shape == (T, B, H) and ws.shape == (T, B, 4 * H if mode == 2 else 0)
            torch.testing.assert_close(hn, args[1])
            g = numba_cuda.backward(gy[:T, :B].contiguous(), ghn[:B].contiguous(), *args, y, ws,
                                    mode, ra)
            torch.testing.assert_close(g[1], ghn[:B])
            assert g[0].shape == args[0].shape and not g[3].any()
    print(f"cudasim: {n} cases + numpy entry points OK in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()

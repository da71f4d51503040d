"""The Numba njit CPU backend against the pure-PyTorch reference: outputs, workspace, gradients."""
import itertools

import pytest
import torch

numba_backend = pytest.importorskip("rnnrec_fast.backends.numba_backend")
from rnnrec_fast.backends import reference  # noqa: E402

# (mode, reset_after)
MODES = [(0, False), (1, False), (2, True), (2, False)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


def make_case(mode, reset_after, bias, lengths_kind, with_resets, dtype, T=4, B=5, H=5, I=3,
              seed=0):
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
    if lengths_kind == "none":
        lengths = None
    else:  # includes 0 and T
        lengths = torch.tensor([(T, 0, 2, 1, T, 3, 0)[b % 7] for b in range(B)], dtype=torch.int64)
    resets = None
    if with_resets:
        resets = torch.rand(T, B, generator=g) < 0.35
        resets[0, 0] = True
        resets[T - 1, B - 1] = True
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after)
    grad_y = rnd(T, B, H)
    grad_h_n = rnd(B, H)
    return args, grad_y, grad_h_n


def check_case(args, grad_y, grad_h_n, dtype):
    tol = TOL[dtype]
    y_r, hn_r, ws_r = reference.forward(*args)
    inputs = [a.clone() if torch.is_tensor(a) else a for a in args]
    y, hn, ws = numba_backend.forward(*args)
    for a, b in zip(args, inputs):  # the forward writes none of its inputs
        assert not torch.is_tensor(a) or torch.equal(a, b)
    T, B, H = y_r.shape
    assert ws.shape == (T, B, 4 * H if args[8] == 2 else 0)  # gru [r, z, n, hn]; rnn: none
    torch.testing.assert_close(y, y_r, **tol)
    torch.testing.assert_close(hn, hn_r, **tol)
    torch.testing.assert_close(ws, ws_r, **tol)
    (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after) = args
    gr = reference.backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets,
                            y_r, ws_r, mode, reset_after)
    bwd_in = (grad_y, grad_h_n, y_r, ws_r) + args[:8]
    kept = [a.clone() if torch.is_tensor(a) else a for a in bwd_in]
    gn = numba_backend.backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets,
                                y_r, ws_r, mode, reset_after)
    for a, b in zip(bwd_in, kept):  # nor does the backward
        assert not torch.is_tensor(a) or torch.equal(a, b)
    names = ["grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]
    for name, a, b in zip(names, gn, gr):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,reset_after", MODES, ids=["tanh", "relu", "gru_after", "gru_before"])
def test_numba_cpu_matches_reference(mode, reset_after, dtype):
    for bias, lengths_kind, with_resets in itertools.product(
            (True, False), ("none", "mixed"), (False, True)):
        args, gy, ghn = make_case(mode, reset_after, bias, lengths_kind, with_resets, dtype)
        check_case(args, gy, ghn, dtype)


@pytest.mark.parametrize("mode,reset_after", MODES, ids=["tanh", "relu", "gru_after", "gru_before"])
def test_numba_cpu_parallel_chunks(mode, reset_after, monkeypatch):
    """The batch split into chunks run by the thread pool gives the same result as one chunk."""
    from rnnrec_fast.backends import numba_cpu
    monkeypatch.setattr(numba_cpu, "_nchunks", lambda B, work: 3)  # 3 chunks of 13 rows: 4, 4, 5
    args, gy, ghn = make_case(mode, reset_after, True, "mixed", True, torch.float64, T=3, B=13,
                              H=6, I=2, seed=1)
    check_case(args, gy, ghn, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_numba_cpu_first_product_by_blas(dtype, monkeypatch):
    """Step 0's first product h0 W_hh^T done by BLAS before the kernel (from GH0_MIN_ROWS batch rows
    up), with rows reset at step 0, rows of length 0, no biases, T = 1 (no product left for the
    kernel) and T > 1; at the natural threshold and forced on for small batches."""
    from rnnrec_fast.backends import numba_cpu
    used = []  # whether each forward call got the precomputed product
    real = numba_cpu.forward_recurrence
    monkeypatch.setattr(numba_cpu, "forward_recurrence",
                        lambda *a: used.append(a[-1] is not None) or real(*a))
    for mode, ra in MODES:
        for T, bias, lengths_kind, with_resets in ((1, True, "none", False), (1, False, "mixed", True),
                                                   (3, True, "mixed", True), (3, False, "none", False)):
            args, gy, ghn = make_case(mode, ra, bias, lengths_kind, with_resets, dtype, T=T,
                                      B=numba_cpu.GH0_MIN_ROWS, H=7, I=3, seed=2)
            check_case(args, gy, ghn, dtype)
    monkeypatch.setattr(numba_cpu, "GH0_MIN_ROWS", 1)
    for mode, ra in MODES:
        for bias, lengths_kind, with_resets in itertools.product(
                (True, False), ("none", "mixed"), (False, True)):
            args, gy, ghn = make_case(mode, ra, bias, lengths_kind, with_resets, dtype)
            check_case(args, gy, ghn, dtype)
    assert len(used) == 4 * 4 + 4 * 8 and all(used)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_numba_cpu_projection_in_the_kernel(dtype, monkeypatch):
    """Calls of at most PROJECT_MAX_ROWS rows (T * B) do their input projection in the kernel
    (forward_projected) instead of a BLAS call: at the natural threshold, and forced for every
    mode, bias, lengths and resets case."""
    from rnnrec_fast.backends import numba_cpu
    used = []  # (T, B) of the calls that took the projection into the kernel
    real = numba_cpu.forward_projected
    monkeypatch.setattr(numba_cpu, "forward_projected", lambda *a: used.append(a[0].shape[:2]) or real(*a))
    assert numba_cpu.PROJECT_MAX_ROWS == 4
    for mode, ra in MODES:
        for T, B in ((1, 4), (4, 1), (2, 2), (1, 5), (5, 1)):
            args, gy, ghn = make_case(mode, ra, True, "none", True, dtype, T=T, B=B, H=6, I=3, seed=3)
            check_case(args, gy, ghn, dtype)
    assert used == [(1, 4), (4, 1), (2, 2)] * 4
    monkeypatch.setattr(numba_cpu, "PROJECT_MAX_ROWS", 10 ** 9)
    for mode, ra in MODES:
        for bias, lengths_kind, with_resets in itertools.product(
                (True, False), ("none", "mixed"), (False, True)):
            args, gy, ghn = make_case(mode, ra, bias, lengths_kind, with_resets, dtype)
            check_case(args, gy, ghn, dtype)
    assert len(used) == 12 + 4 * 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_numba_cpu_blas_steps(dtype, monkeypatch):
    """Large batches and weights get every step's first product from BLAS, one kernel call per step
    (forward_stepped; the backward likewise, backward_stepped): forced on small cases for every
    mode, bias, lengths (0 and T included) and resets case, also with the batch split over threads;
    the natural choice at its thresholds."""
    from rnnrec_fast.backends import numba_cpu
    assert not numba_cpu.blas_steps(numba_cpu.GH0_MIN_ROWS - 1, 4096, 2, True)
    monkeypatch.setattr(numba_cpu, "_num_threads", lambda: 1)
    assert numba_cpu.blas_steps(64, 512, 2, True) and not numba_cpu.blas_steps(64, 100, 2, True)
    monkeypatch.setattr(numba_cpu, "_num_threads", lambda: 2)
    assert numba_cpu.blas_steps(64, 100, 2, True) and not numba_cpu.blas_steps(16, 100, 2, True)
    steps, back = [], []  # T of the forward and backward calls that ran stepped
    real, real_back = numba_cpu.forward_stepped, numba_cpu.backward_stepped
    monkeypatch.setattr(numba_cpu, "forward_stepped", lambda *a: steps.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(numba_cpu, "backward_stepped", lambda *a: back.append(a[0].shape[0]) or real_back(*a))
    monkeypatch.setattr(numba_cpu, "GH0_MIN_ROWS", 1)
    monkeypatch.setattr(numba_cpu, "BLAS_STEP_MIN_WORK", (0, 0))
    for mode, ra in MODES:
        for bias, lengths_kind, with_resets in itertools.product(
                (True, False), ("none", "mixed"), (False, True)):
            args, gy, ghn = make_case(mode, ra, bias, lengths_kind, with_resets, dtype)
            check_case(args, gy, ghn, dtype)
    assert steps == [4] * 32 and back == [4] * 24  # (the backward of GRU reset_after=False: not stepped)
    monkeypatch.setattr(numba_cpu, "_nchunks", lambda B, work: 3)  # 3 chunks of 13 rows: 4, 4, 5
    for mode, ra in MODES:
        args, gy, ghn = make_case(mode, ra, True, "mixed", True, dtype, T=3, B=13, H=6, I=2, seed=1)
        check_case(args, gy, ghn, dtype)
    assert steps == [4] * 32 + [3] * 4 and back == [4] * 24 + [3] * 3


@pytest.mark.parametrize("path", ["gh0", "stepped"])
def test_numba_cpu_reset_row_product_of_nonfinite_weights(path, monkeypatch):
    """A row that resets takes its step's first product of the zeroed state, 0 W_hh^T: NaN where
    W_hh holds NaN or inf, as in the reference, also where that product comes from BLAS before the
    kernel (step 0's, from GH0_MIN_ROWS rows; every step's, forward_stepped), which used to skip it
    for reset rows (finite y where the reference has NaN)."""
    from rnnrec_fast.backends import numba_cpu
    if path == "stepped":
        monkeypatch.setattr(numba_cpu, "BLAS_STEP_MIN_WORK", (0, 0))
    B = numba_cpu.GH0_MIN_ROWS
    for mode, ra in MODES:
        args, gy, ghn = make_case(mode, ra, True, "none", False, torch.float64, T=3, B=B, H=5, I=3, seed=4)
        args = list(args)
        w_hh = args[3].clone()
        w_hh[0, 0] = float("nan")
        w_hh[1, 1] = float("inf")
        args[3] = w_hh
        resets = torch.zeros(3, B, dtype=torch.bool)
        resets[0, 1] = resets[1, 2] = resets[2, 3] = True
        args[7] = resets
        y_r, hn_r, _ = reference.forward(*args)
        y, hn, _ = numba_backend.forward(*args)
        assert y_r[0, 1].isnan().any()  # (the case tests what it means to)
        torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10, equal_nan=True)
        torch.testing.assert_close(hn, hn_r, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("with_resets", [False, True], ids=["lengths", "lengths+resets"])
def test_numba_cpu_stepped_backward_skips_the_product_of_inactive_rows(with_resets, monkeypatch):
    """The stepped backward (each step's recurrent product by BLAS) adds no product to a row inactive
    at that step (past its length) or reset there: their gate gradients are zero, but 0 W_hh is NaN
    where W_hh holds NaN or inf, and grad_h0 (and a relu RNN's grad_x) came out NaN where the
    reference passes the gradient through them (a review: B = 40, H = 300)."""
    from rnnrec_fast.backends import numba_cpu
    monkeypatch.setattr(numba_cpu, "BLAS_STEP_MIN_WORK", (0, 0))
    B = numba_cpu.GH0_MIN_ROWS
    for mode, ra in MODES:
        if mode == 2 and not ra:
            continue  # (the stepped backward is not used for the original GRU form)
        args, gy, ghn = make_case(mode, ra, True, "mixed", with_resets, torch.float64, T=4, B=B, H=5, I=3, seed=6)
        args = list(args)
        args[3] = args[3].clone()
        args[3][0, 0] = float("nan")
        y, hn, ws = reference.forward(*args)
        want = reference.backward(gy, ghn, *args[:8], y, ws, *args[8:])
        got = numba_backend.backward(gy, ghn, *args[:8], y, ws, *args[8:])
        assert not want[1][1].isnan().any()  # (a row of length 0: its gradient passes through)
        for name, a, b in zip(("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("project", [False, True], ids=["blas", "kernel"])
def test_numba_cpu_forward_without_workspace(project, monkeypatch):
    """run_cpu with a workspace of width 0 (no backward follows: the modules' inference fast path)
    writes the y and h_n of the full forward, and nothing through the workspace (its zero-size
    array points into a sentinel buffer here)."""
    import numpy as np
    from rnnrec_fast.backends import numba_cpu
    if project:
        monkeypatch.setattr(numba_cpu, "PROJECT_MAX_ROWS", 10 ** 9)
    for mode, ra in MODES:
        for bias, lengths_kind, with_resets in ((True, "none", False), (False, "mixed", True)):
            args, _, _ = make_case(mode, ra, bias, lengths_kind, with_resets, torch.float64, T=3, B=5)
            y_f, hn_f, _ = numba_backend.forward(*args)
            x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = args[:8]
            T, B, H = y_f.shape
            y, hn = np.full((T, B, H), np.nan), np.full((B, H), np.nan)
            sentinel = np.full(4 * H * T * B, 7.0)
            ws = sentinel[:0].reshape(T, B, 0)
            npy = [None if t is None else t.numpy() for t in (b_ih, b_hh, lengths, resets)]
            numba_backend.run_cpu(x.numpy(), h0.numpy(), w_ih.numpy(), w_hh.numpy(), *npy, mode, ra, y, hn, ws)
            torch.testing.assert_close(torch.from_numpy(y), y_f, rtol=0, atol=0)
            torch.testing.assert_close(torch.from_numpy(hn), hn_f, rtol=0, atol=0)
            assert (sentinel == 7.0).all()


def test_numba_cpu_edge_shapes():
    # T = 1, B = 1, H = 1, and a row-block of exactly 4
    for T, B, H in ((1, 1, 1), (2, 4, 3)):
        for mode, ra in MODES:
            args, gy, ghn = make_case(mode, ra, True, "none", True, torch.float64, T=T, B=B, H=H,
                                      I=2)
            check_case(args, gy, ghn, torch.float64)


def test_numba_backend_rejects_unsupported():
    args, _, _ = make_case(0, False, True, "none", False, torch.float64)
    x = args[0].to(torch.float16)
    with pytest.raises(TypeError, match="float16"):
        numba_backend.forward(x, *args[1:])
    assert numba_backend.DEVICES == ("cpu", "cuda")
    assert numba_backend.DTYPES == (torch.float32, torch.float64)


def test_numba_cpu_empty_time_or_batch():
    for T, B in ((0, 3), (3, 0)):
        for mode, ra in MODES:
            args, gy, ghn = make_case(mode, ra, True, "none", False, torch.float64, T=max(T, 1),
                                      B=max(B, 1), H=4, I=2)
            x, h0 = args[0][:T, :B], args[1][:B]
            args = (x.contiguous(), h0.contiguous()) + args[2:]
            y, hn, ws = numba_backend.forward(*args)
            assert y.shape == (T, B, 4) and ws.shape == (T, B, 16 if mode == 2 else 0)
            torch.testing.assert_close(hn, h0)
            g = numba_backend.backward(gy[:T, :B].contiguous(), ghn[:B].contiguous(), *args[:8],
                                       y, ws, mode, ra)
            assert g[0].shape == x.shape
            torch.testing.assert_close(g[1], ghn[:B])
            assert not g[3].any() and g[5].shape == (args[3].shape[0],)


def test_batch_split_pool_is_safe_to_grow_and_fork():
    """The batch split's thread pool: a larger one replaces it without shutting it down (a call in
    another thread may still be submitting to it: 'cannot schedule new futures after shutdown'),
    and a forked child makes its own (the parent's workers do not exist there: it waited forever)."""
    import os
    import subprocess
    import sys

    from rnnrec_fast.backends import numba_cpu

    small = numba_cpu._get_pool(2)
    bigger = numba_cpu._get_pool(numba_cpu._pool_size + 1)
    assert bigger is not small and numba_cpu._get_pool(1) is bigger
    assert small.submit(lambda: 7).result(timeout=10) == 7
    code = (
        "import os, signal, numpy as np\n"
        "from rnnrec_fast.backends import numba_cpu\n"
        "out = np.zeros(8)\n"
        "def fill(a, b0, b1): a[b0:b1] += 1\n"
        "numba_cpu._run_chunks(fill, (out,), 8, 2)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(20)\n"
        "    numba_cpu._run_chunks(fill, (out,), 8, 2)\n"
        "    os._exit(0 if (out == 2).all() else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', os.waitstatus_to_exitcode(status))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "child 0" in proc.stdout, (proc.stdout, proc.stderr)


def test_numba_backend_refuses_what_its_kernels_cannot_read():
    """forward / backward called directly refuse, each with a ValueError naming it: tensors on a
    device numba does not run on (meta), a mode number that is none of the three, tensors of the
    wrong rank, and a b_hh of another dtype than x (from a mutation review: dropping any of these
    checks passed the suite; the kernels do not bounds-check, and would run or fail elsewhere)."""
    args, gy, ghn = make_case(2, True, True, "mixed", True, torch.float32, T=3, B=2, H=4, I=3)
    y, hn, ws = numba_backend.forward(*args)
    meta = [a.to("meta") if torch.is_tensor(a) else a for a in args]
    with pytest.raises(ValueError, match=r"numba backend: unsupported device meta \(supported: cpu, cuda\)"):
        numba_backend.forward(*meta)
    with pytest.raises(ValueError, match=r"numba backend: unsupported device meta"):
        numba_backend.backward(gy.to("meta"), ghn.to("meta"), *meta[:8], y.to("meta"), ws.to("meta"), 2, True)
    rnn = make_case(0, False, True, "none", False, torch.float32, T=3, B=2, H=4, I=3)[0]
    for mode in (3, -1):
        with pytest.raises(ValueError, match=f"numba backend: unknown mode {mode}$"):
            numba_backend.forward(*rnn[:8], mode, False)
        with pytest.raises(ValueError, match=f"numba backend: unknown mode {mode}$"):
            numba_backend.backward(gy[..., :4], ghn, *rnn[:8], y, ws[..., :0], mode, False)
    rank = r"numba backend: x must be \(T, B, I\), h0 \(B, H\), w_hh \(G\*H, H\)"
    for i, bad in ((0, args[0][0]), (1, args[1][None]), (3, args[3].flatten())):
        a = list(args)
        a[i] = bad
        with pytest.raises(ValueError, match=rank):
            numba_backend.forward(*a)
        with pytest.raises(ValueError, match=rank):
            numba_backend.backward(gy, ghn, *a[:8], y, ws, 2, True)
    a = list(args)
    a[5] = a[5].double()
    with pytest.raises(ValueError, match=r"b_hh must have x's dtype torch.float32, got torch.float64"):
        numba_backend.forward(*a)
    with pytest.raises(ValueError, match=r"b_hh must have x's dtype torch.float32, got torch.float64"):
        numba_backend.backward(gy, ghn, *a[:8], y, ws, 2, True)

"""The CUDA backend's own code, csrc/rnnrec_cuda.cu and its kernels, run on the CPU.

CI has no GPU, and tests/test_cuda.py skips there. This file compiles the CUDA sources for the CPU
against the emulator of tests/cuda_emu (every CUDA thread a fiber; __syncthreads, warp shuffles and
a cooperative grid's grid.sync as barriers; the order threads run in chosen by a schedule: launch
order, block by block in a random order or from either end; shared-memory canaries and CUDA's launch
limits checked: see tests/cuda_emu/include/cuda_emu.h) and runs both forward paths (the persistent
cooperative kernel and the per-step GEMM path) and the backward against the reference backend, on
fresh random inputs; the persistent kernel under every schedule, which must change no bit; and,
through the op with the "cuda" backend forced, gradcheck, opcheck and the drop-in modules against
torch.nn. Device pointers are CPU pointers, so ATen's CPU GEMMs stand in for cuBLAS; what this
cannot see is what only a GPU shows (whether the device code compiles for it: nvcc's, memory
ordering and caches beyond the barriers, registers, real occupancy, speed): that is test_cuda.py's,
on a GPU.

The emulated device has 4 SMs unless a test says otherwise, so that small H already spreads the
persistent kernel over several blocks (H = 33: four blocks of 9, 9, 9 and 6 units). Every buffer
at::empty gives the host code is filled with NaN (torch's deterministic mode), so a read of
anything not written first shows. Tolerances as test_cuda.py's.
"""
import importlib.util
import math
import os

import pytest
import torch
from torch import nn

import rnnrec_fast
from rnnrec_fast import backends, ops
from rnnrec_fast.backends import reference
from rnnrec_fast.ops import MODES

from conftest import case_seed
from cuda_bad_calls import assert_bad_direct_calls_raise
from discarded_state import discarded_state_case
from module_twins import (assert_call_matches_torch_nn, assert_gradient_penalty_matches_torch_nn,
                          assert_outputs_and_gradients_close, module_pair)

HERE = os.path.dirname(os.path.abspath(__file__))

MODE_FORMS = [("rnn_tanh", True), ("rnn_relu", True), ("gru", True), ("gru", False)]
MODE_IDS = ["tanh", "relu", "gru", "gru_cho"]
PERSISTENT, GEMM = 1, 2


def _load_build():
    spec = importlib.util.spec_from_file_location("cuda_emu_build", os.path.join(HERE, "cuda_emu", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def emu():
    """The emulated extension (built once into build/cuda_emu; a build failure fails the tests)."""
    return _load_build().load()


@pytest.fixture(autouse=True)
def _device(emu):
    """Each test starts from the default emulated device and the automatic path; buffers from
    at::empty are NaN-filled."""
    emu.emu_configure()
    emu.set_forward_path(0)
    emu.emu_reset_stats()
    emu.emu_forget_refused_grids()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)
    emu.emu_configure()
    emu.set_forward_path(0)


@pytest.fixture
def as_cuda_backend(emu, monkeypatch):
    """The emulated module as the registry's "cuda" backend, for CPU tensors: the op (its checks,
    autograd, the C++ op handing a forced backend to the Python one) runs the CUDA code."""
    fake = type("EmulatedCuda", (), dict(forward=staticmethod(emu.forward), backward=staticmethod(emu.backward),
                                          DEVICES=("cpu",), DTYPES=(torch.float32, torch.float64)))
    monkeypatch.setitem(backends._loaded, "cuda", fake)
    ops._resolved.clear()
    yield emu
    ops._resolved.clear()


def make_inputs(T, B, I, H, mode, bias, extras, dtype, gen):
    G = 3 if mode == "gru" else 1
    ws = min(0.7, 2.0 / math.sqrt(H))
    wi = min(0.7, 2.0 / math.sqrt(I))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x, h0 = rnd(T, B, I), rnd(B, H)
    w_ih, w_hh = rnd(G * H, I, scale=wi), rnd(G * H, H, scale=ws)
    b_ih, b_hh = (rnd(G * H, scale=0.5), rnd(G * H, scale=0.5)) if bias else (None, None)
    lengths = resets = None
    if extras in ("lengths", "both"):
        # out of range too: the kernels clamp to [0, T] (the host does not look at device lengths)
        lengths = torch.randint(-2, T + 3, (B,), generator=gen)
        lengths[0] = T
    if extras in ("resets", "both"):
        resets = torch.rand(T, B, generator=gen) < 0.3
    return x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets


def tol(dtype, K=1):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * max(1.0, math.sqrt(K / 64.0)))
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3)
    return dict(rtol=1.6e-2, atol=1.6e-2)  # bfloat16


def close(actual, expected, what, **kw):
    torch.testing.assert_close(actual, expected, **kw, msg=lambda m: f"{what}: {m}")


def as64(t):
    return None if t is None else t.double()


def run_case(emu, T, B, I, H, mode, reset_after, bias, extras, dtype, seed, path):
    gen = torch.Generator().manual_seed(seed)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(T, B, I, H, mode, bias, extras, dtype, gen)
    emu.set_forward_path(path)
    m = MODES[mode]
    inputs = [t for t in (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets) if t is not None]
    before = [t.clone() for t in inputs]
    y, h_n, ws = emu.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, m, reset_after)
    # the forced path ran: the GEMM path always, the persistent one wherever it applies (B <= 8)
    assert emu.last_forward_path() == (PERSISTENT if path == PERSISTENT and B <= 8 else GEMM)
    assert y.dtype == dtype and h_n.dtype == dtype and ws.dtype == dtype
    assert ws.shape == (T, B, 4 * H if mode == "gru" else 0)
    K = max(H, I, T * B)
    clamped = None if lengths is None else lengths.clamp(0, T)
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [clamped, resets]
    ry, rh, rws = reference.forward(*ref_in, m, reset_after)
    for name, got, ref in (("output", y, ry), ("h_n", h_n, rh), ("workspace", ws, rws)):
        t = tol(dtype, K)
        if dtype == torch.float32 and ref.numel():  # relative to the tensor's scale (a relu state grows)
            t["atol"] *= max(1.0, ref.abs().max().item())
        close(got.double(), ref, name, **t)
    if lengths is not None:  # padding is exactly zero, in the output and the workspace
        pad = torch.arange(T).unsqueeze(1) >= clamped.unsqueeze(0)
        assert (y[pad] == 0).all() and (ws[pad] == 0).all()
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gh = torch.randn(h_n.shape, generator=gen, dtype=torch.float64)
    got = emu.backward(gy.to(dtype), gh.to(dtype), x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws, m,
                       reset_after)
    # the reference backward gets our y (relu's mask is computed from it, as test_cuda.py's)
    want = reference.backward(gy.to(dtype).double(), gh.to(dtype).double(), *ref_in, y.double(), rws, m,
                              reset_after)
    for name, g, rg in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
        assert g.dtype == dtype, name
        t = tol(dtype, K)
        if dtype == torch.float32:
            t["atol"] *= max(1.0, rg.abs().max().item())
        close(g.double(), rg, f"grad {name}", **t)
    for a, b in zip(inputs, before):  # nothing written into the inputs
        assert torch.equal(a, b)
    return y, h_n, ws, got


# T, B, I, H: one step of one unit; a few units in one block; four blocks, the last one partly
# filled; more rows than the persistent kernel takes (the GEMM path, even when persistent is asked)
SHAPES = [(1, 1, 1, 1), (5, 3, 4, 6), (4, 8, 5, 33), (3, 11, 4, 10)]
SHAPE_ID = "T{}B{}I{}H{}".format


@pytest.mark.parametrize("path", [PERSISTENT, GEMM], ids=["persistent", "gemm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: SHAPE_ID(*s))
@pytest.mark.parametrize("extras", ["plain", "lengths", "resets", "both"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_float64_matches_reference(emu, path, shape, extras, bias, mode, reset_after):
    seed = case_seed("emu64", shape, extras, bias, mode, reset_after, path)
    run_case(emu, *shape, mode, reset_after, bias, extras, torch.float64, seed, path)


@pytest.mark.parametrize("path", [PERSISTENT, GEMM], ids=["persistent", "gemm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: SHAPE_ID(*s))
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_float32_matches_reference(emu, path, shape, mode, reset_after):
    seed = case_seed("emu32", shape, mode, reset_after, path)
    run_case(emu, *shape, mode, reset_after, True, "both", torch.float32, seed, path)


@pytest.mark.parametrize("path", [PERSISTENT, GEMM], ids=["persistent", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_half_types_match_reference(emu, path, dtype, mode, reset_after):
    """half / bfloat16: computed in float32 (state, accumulation, workspace), outputs rounded; the
    reference upcasts the same inputs and rounds its outputs back."""
    T, B, I, H = 5, 4, 5, 12
    gen = torch.Generator().manual_seed(case_seed("emu-half", str(dtype), mode, reset_after, path))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(T, B, I, H, mode, True, "both", dtype, gen)
    emu.set_forward_path(path)
    m = MODES[mode]
    y, h_n, ws = emu.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, m, reset_after)
    assert emu.last_forward_path() == path
    assert ws.dtype == torch.float32 and y.dtype == dtype
    clamped = lengths.clamp(0, T)
    ry, rh, rws = reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, clamped, resets, m, reset_after)
    close(y.float(), ry.float(), "output", **tol(dtype))
    close(h_n.float(), rh.float(), "h_n", **tol(dtype))
    close(ws, rws, "workspace", rtol=1e-4, atol=1e-4)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    gh = torch.randn(h_n.shape, generator=gen).to(dtype)
    got = emu.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws, m, reset_after)
    want = reference.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, clamped, resets, y, rws, m, reset_after)
    for name, g, rg in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
        assert g.dtype == dtype
        t = tol(dtype)
        close(g.float(), rg.float(), f"grad {name}", rtol=t["rtol"],
              atol=t["atol"] * max(1.0, rg.float().abs().max().item()))


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_no_schedule_changes_a_bit(emu, mode, reset_after):
    """Every output element is computed by one thread in a fixed order, so the order the emulator
    runs threads in (launch order; block by block in three random orders, from either end)
    changes no bit: a race between threads (a barrier missing, within a block or across blocks)
    would. H = 12 splits evenly, three blocks of four units, so no block waits on work the others
    lack."""
    gen = torch.Generator().manual_seed(case_seed("emu-schedule", mode, reset_after))
    args = make_inputs(6, 5, 4, 12, mode, True, "both", torch.float32, gen)
    emu.set_forward_path(PERSISTENT)
    outs = []
    for schedule, seed in ((0, 0), (1, 1), (1, 2), (1, 3), (2, 4), (3, 5)):
        emu.emu_configure(schedule=schedule, seed=seed)
        outs.append(emu.forward(*args, MODES[mode], reset_after))
        assert emu.last_forward_path() == PERSISTENT
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            assert torch.equal(a, b)
    assert emu.emu_stats()["max_grid_blocks"] == 3


def test_paths_agree(emu):
    gen = torch.Generator().manual_seed(case_seed("emu-paths"))
    for mode, reset_after in MODE_FORMS:
        args = make_inputs(7, 6, 5, 21, mode, True, "both", torch.float64, gen)
        outs = []
        for p in (PERSISTENT, GEMM):
            emu.set_forward_path(p)
            outs.append(emu.forward(*args, MODES[mode], reset_after))
            assert emu.last_forward_path() == p
        for a, b, what in zip(outs[0], outs[1], ("y", "h_n", "ws")):
            close(a, b, f"{mode}/{reset_after} {what}", rtol=1e-12, atol=1e-12)


def _gru(gen, B=3, H=33, T=3):
    return make_inputs(T, B, 4, H, "gru", True, "plain", torch.float64, gen) + (MODES["gru"], True)


def test_auto_path_takes_the_persistent_kernel_where_it_applies(emu):
    """Auto: persistent for B <= 8 when the block's W_hh rows fit in shared memory and the device
    can launch the grid cooperatively; else the GEMM path, with the same results."""
    gen = torch.Generator().manual_seed(case_seed("emu-auto"))
    args = _gru(gen)
    want = emu.forward(*args)
    assert emu.last_forward_path() == PERSISTENT
    for setting in (dict(cooperative=False), dict(smem_optin=1024)):
        emu.emu_configure(**setting)
        got = emu.forward(*args)
        assert emu.last_forward_path() == GEMM, setting
        for a, b in zip(got, want):
            close(a, b, str(setting), rtol=1e-12, atol=1e-12)
    emu.emu_configure()
    emu.forward(*make_inputs(3, 9, 4, 33, "gru", True, "plain", torch.float64, gen), MODES["gru"], True)
    assert emu.last_forward_path() == GEMM


def test_more_than_48_kib_of_shared_memory(emu):
    """The persistent kernel past the default 48 KiB of dynamic shared memory (one block holding all
    of a float64 GRU's W_hh, H = 64: ~116 KiB), which only the kernel's raised limit allows."""
    emu.emu_configure(num_sms=1)
    run_case(emu, 4, 8, 3, 64, "gru", True, True, "both", torch.float64, case_seed("emu-smem"), PERSISTENT)
    assert emu.emu_stats()["cooperative_launches"] == 1


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_non_contiguous_inputs(emu, mode, reset_after):
    """The extension takes views in any layout (it makes them contiguous): the same results as from
    contiguous copies, forward and backward, on both paths."""
    gen = torch.Generator().manual_seed(case_seed("emu-strides", mode, reset_after))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(5, 3, 4, 6, mode, True, "both", torch.float64, gen)

    def strided(t):  # the same values, every dimension's stride doubled
        big = torch.zeros(*(2 * n for n in t.shape), dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        assert not view.is_contiguous() and torch.equal(view, t)
        return view

    plain = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets)
    views = tuple(strided(t) for t in plain)
    m = MODES[mode]
    for path in (PERSISTENT, GEMM):
        emu.set_forward_path(path)
        want = emu.forward(*plain, m, reset_after)
        got = emu.forward(*views, m, reset_after)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        gy = torch.randn(want[0].shape, generator=gen, dtype=torch.float64)
        gh = torch.randn(want[1].shape, generator=gen, dtype=torch.float64)
        gw = emu.backward(gy, gh, *plain, want[0], want[2], m, reset_after)
        ws_view = want[2] if want[2].numel() == 0 else strided(want[2])
        gv = emu.backward(strided(gy), strided(gh), *views, strided(want[0]), ws_view, m, reset_after)
        for a, b in zip(gv, gw):
            assert torch.equal(a, b)


def test_a_grid_refused_as_too_large_is_not_tried_again(emu):
    """Under MPS a client may get fewer SMs than the properties report: the cooperative launch
    fails (cudaErrorCooperativeLaunchTooLarge), the call takes the GEMM path with the same results,
    the error is cleared, and a grid that large is not tried again; a smaller one still is."""
    gen = torch.Generator().manual_seed(case_seed("emu-mps"))
    # 16 SMs reported, 1 usable: 8 blocks of 256 threads fit at once; H = 64 needs 16 blocks of 4 units
    emu.emu_configure(num_sms=16, usable_sms=1)
    big = _gru(gen, H=64)
    emu.emu_configure(num_sms=16, usable_sms=-1)
    want = emu.forward(*big)
    assert emu.last_forward_path() == PERSISTENT
    emu.emu_configure(num_sms=16, usable_sms=1)
    for _ in range(2):
        got = emu.forward(*big)
        assert emu.last_forward_path() == GEMM
        for a, b in zip(got, want):
            close(a, b, "after a refused grid", rtol=1e-12, atol=1e-12)
    assert emu.emu_stats()["cooperative_refused"] == 1  # (the second call did not try)
    emu.forward(*_gru(gen, H=24))  # 6 blocks: fits
    assert emu.last_forward_path() == PERSISTENT


def test_bad_direct_calls_raise(emu):
    """The extension's own checks (test_cuda.py's test_direct_bad_calls_raise on a GPU, but for the
    device: here every tensor is a CPU tensor)."""
    gen = torch.Generator().manual_seed(0)
    assert_bad_direct_calls_raise(emu, make_inputs(3, 2, 4, 5, "gru", True, "both", torch.float32, gen))


# ----------------------------------------------------------------------------------------------
# through the op: autograd, non-finite values, discarded states (test_cuda.py's twins)


@pytest.mark.parametrize("path", [PERSISTENT, GEMM], ids=["persistent", "gemm"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_gradcheck_through_the_op(as_cuda_backend, path, mode, reset_after):
    as_cuda_backend.set_forward_path(path)
    gen = torch.Generator().manual_seed(case_seed("emu-gradcheck", mode, reset_after, path))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(3, 3, 2, 4, mode, True, "both", torch.float64, gen)
    lengths = lengths.clamp(0, 3)  # (the op checks lengths on the host)
    if mode == "rnn_relu":  # keep the pre-activations off relu's kink, where a difference is not a slope
        b_ih = b_ih.abs() + 1.0
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def f(*a):
        y, h_n = rnnrec_fast.recurrence(*a, lengths=lengths, resets=resets, mode=mode, reset_after=reset_after,
                                        backend="cuda")
        return y, h_n

    assert torch.autograd.gradcheck(f, leaves)
    assert rnnrec_fast.last_backend() == "cuda"
    assert as_cuda_backend.last_forward_path() == path


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_non_finite_values_propagate_as_in_the_reference(as_cuda_backend, mode, reset_after):
    T, B, I, H = 3, 5, 5, 6
    gen = torch.Generator().manual_seed(8)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float64, gen)
    h0[1, 2], h0[2, 0], h0[4, 3] = float("inf"), -float("inf"), float("nan")
    x[1, 3, 1] = float("inf")
    w_hh = w_hh * 30
    kw = dict(mode=mode, reset_after=reset_after)
    want = rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="reference", **kw)
    for path in (PERSISTENT, GEMM):
        as_cuda_backend.set_forward_path(path)
        got = rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="cuda", **kw)
        for a, b, what in zip(got, want, ("output", "h_n")):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), what
            assert torch.isnan(b).any() and torch.isfinite(b).any()
            close(a, b, what, equal_nan=True, **tol(torch.float64))


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_rows_past_their_length_and_reset_rows_as_in_the_reference(as_cuda_backend, mode, reset_after):
    """A non-finite W_hh entry beside rows past their length, NaN / inf padding and h0 rows that are
    never read (a row of length 0, a row reset at step 0): gradients and outputs as the reference's,
    NaN exactly where it has NaN."""
    T, B, I, H = 4, 4, 3, 5
    gen = torch.Generator().manual_seed(case_seed("emu-discard", mode, reset_after))
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float64, gen)
    lengths = torch.tensor([T, 0, 2, 3])
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[0, 3] = True
    x = x.masked_fill((torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)).unsqueeze(2), float("nan"))
    h0[1], h0[3] = float("inf"), float("nan")
    for path, w_fill in ((PERSISTENT, None), (GEMM, None), (PERSISTENT, float("inf")), (GEMM, float("inf"))):
        as_cuda_backend.set_forward_path(path)
        w = w_hh.clone()
        if w_fill is not None:
            w[0, 0] = w_fill
        grads = []
        for backend in ("reference", "cuda"):
            leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w, b_ih, b_hh)]
            y, h_n = rnnrec_fast.recurrence(*leaves, lengths=lengths, resets=resets, mode=mode,
                                            reset_after=reset_after, backend=backend)
            grads.append([y, h_n, *torch.autograd.grad((y * 1.5).sum() + h_n[[0, 2, 3]].sum(), leaves)])
        for a, b, what in zip(grads[1], grads[0], ("y", "h_n", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), what
            close(a, b, f"{what} (path {path}, W_hh[0, 0] = {w_fill})", equal_nan=True, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["lengths", "resets", "negative"])
def test_a_discarded_state_stays_out_of_grad_w_hh(emu, kind):
    gen = torch.Generator().manual_seed(5)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(2, 2, 2, 3, "rnn_relu", True, "plain", torch.float64, gen)
    x, h0, w_ih, lengths, resets = discarded_state_case(kind, x, h0, w_ih)
    clamped = None if lengths is None else lengths.clamp(0, 2)
    m = MODES["rnn_relu"]
    gy = torch.zeros(2, 2, 3, dtype=torch.float64)
    gy[:, 1] = 1.0
    gh = torch.zeros(2, 3, dtype=torch.float64)
    for path in (PERSISTENT, GEMM):
        emu.set_forward_path(path)
        y, h_n, ws = emu.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, m, True)
        got = emu.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws, m, True)
        ry, _, rws = reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, clamped, resets, m, True)
        want = reference.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, clamped, resets, ry, rws, m, True)
        assert torch.isfinite(want[3]).all()
        for a, b, what in zip(got, want, ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
            close(a, b, what, equal_nan=True, **tol(torch.float64))


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_opcheck_through_the_op(as_cuda_backend, mode, reset_after):
    """torch.library.opcheck of the forward and backward ops with the "cuda" backend forced: the
    schema, the fake kernels, the autograd registration and the AOT dispatch, against the CUDA code."""
    gen = torch.Generator().manual_seed(case_seed("emu-opcheck", mode, reset_after))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(4, 3, 2, 5, mode, True, "both", torch.float32, gen)
    lengths = lengths.clamp(0, 4)
    args = (x.requires_grad_(), h0.requires_grad_(), w_ih.requires_grad_(), w_hh.requires_grad_(),
            b_ih.requires_grad_(), b_hh, lengths, resets, mode, reset_after, "cuda")
    as_cuda_backend.emu_reset_stats()
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence.default, args)
    with torch.no_grad():
        y, h_n, ws = torch.ops.rnnrec_fast.recurrence(*args)
    assert as_cuda_backend.emu_stats()["launches"] > 0  # (the emulated kernels ran, not a stand-in)
    bargs = (torch.randn(y.shape, generator=gen), torch.randn(h_n.shape, generator=gen)) + tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]) + (y, ws, mode, reset_after, "cuda")
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence_backward.default, bargs)


# ----------------------------------------------------------------------------------------------
# the drop-in modules with backend="cuda" against torch.nn (test_cuda.py's twins): layers, both
# directions, h0, a PackedSequence, and a gradient penalty's second derivatives


@pytest.mark.parametrize("path", [PERSISTENT, GEMM], ids=["persistent", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B", [1, 4, 37])
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh", "RNN_relu"])
def test_modules_match_torch_nn(as_cuda_backend, kind, B, dtype, path):
    if path == PERSISTENT and B > 8:
        pytest.skip("the persistent kernel is for B <= 8")
    as_cuda_backend.set_forward_path(path)
    torch.manual_seed(case_seed("emu-modules", kind, B, str(dtype), path))
    ref, ours = module_pair(kind, "cuda", input_size=6, hidden_size=20, num_layers=2, batch_first=True,
                            bidirectional=True, dtype=dtype)
    assert ours.active_backend() == "cuda"
    x = torch.randn(B, 7, 6, dtype=dtype, requires_grad=True)
    hx = torch.randn(4, B, 20, dtype=dtype, requires_grad=True)
    as_cuda_backend.emu_reset_stats()

    def ran_emulated():
        assert rnnrec_fast.last_backend() == "cuda" and as_cuda_backend.emu_stats()["launches"] > 0
        assert as_cuda_backend.last_forward_path() == path

    assert_call_matches_torch_nn(ref, ours, x, hx, tol(dtype, 64), after=ran_emulated)


@pytest.mark.parametrize("path", [PERSISTENT, GEMM], ids=["persistent", "gemm"])
def test_module_packed_sequence_matches_torch_nn(as_cuda_backend, path):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    as_cuda_backend.set_forward_path(path)
    torch.manual_seed(case_seed("emu-packed", path))
    ref, ours = module_pair("GRU", "cuda", input_size=5, hidden_size=16, bidirectional=True, dtype=torch.float64)
    x = torch.randn(9, 6, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 3, 7, 1, 9, 4])
    (pr, hr), (po, ho) = (m(pack_padded_sequence(x, lengths, enforce_sorted=False)) for m in (ref, ours))
    assert rnnrec_fast.last_backend() == "cuda" and as_cuda_backend.last_forward_path() == path
    assert_outputs_and_gradients_close((pad_packed_sequence(pr)[0], hr), (pad_packed_sequence(po)[0], ho),
                                       [x] + list(ref.parameters()), [x] + list(ours.parameters()),
                                       tol(torch.float64), tol(torch.float64))


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_double_backward_matches_torch_nn(as_cuda_backend, kind):
    """A gradient penalty through a module on the "cuda" backend against torch.nn's, float64: the
    gradients taken with create_graph=True and the second derivatives of x, hx and every weight."""
    torch.manual_seed(case_seed("emu double backward", kind))
    ref = getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    as_cuda_backend.emu_reset_stats()

    def ran_emulated():
        assert rnnrec_fast.last_backend() == "cuda" and as_cuda_backend.emu_stats()["launches"] > 0

    assert_gradient_penalty_matches_torch_nn(ref, rnnrec_fast.from_torch(ref, backend="cuda"), "cpu",
                                             after=ran_emulated)


# ----------------------------------------------------------------------------------------------
# the emulator itself (tests/cuda_emu/selftest.cu): what it must catch, and what it must run


def test_emulator_runs_warp_shuffles_and_barriers(emu):
    assert torch.equal(emu.selftest_warp_sum(3, 64, 0.5), torch.full((192,), 32 * 33 / 2 * 0.5))
    for schedule, seed in ((0, 0), (1, 1), (1, 7), (2, 1), (3, 1)):
        emu.emu_configure(schedule=schedule, seed=seed)
        got = emu.selftest_neighbours(2, 64, True).view(2, 64)
        assert torch.equal(got, ((torch.arange(64) + 1) % 64).float().expand(2, 64))
        # without the barrier some thread reads its neighbour's slot before it is written, whatever
        # the order the threads run in
        assert emu.selftest_neighbours(2, 64, False).isnan().any()
        assert torch.equal(emu.selftest_grid(5, 3, True), torch.tensor([2.0, 3.0, 4.0, 5.0, 1.0]))
        assert emu.selftest_grid(5, 0, True).isnan().any()
    # a block's own barrier (__syncthreads, a warp shuffle) where grid.sync() belongs: run block by
    # block, the first block reads its neighbour's slot before that block has started
    for schedule in (2, 3):
        emu.emu_configure(schedule=schedule)
        for barrier in (1, 2):
            assert emu.selftest_grid(5, barrier, True).isnan().any(), (schedule, barrier)
    # in a random order of blocks, some block runs before its neighbour: most seeds show it
    seen = 0
    for seed in range(1, 11):
        emu.emu_configure(schedule=1, seed=seed)
        seen += bool(emu.selftest_grid(5, 1, True).isnan().any())
    assert seen >= 5


def test_emulator_reports_what_a_gpu_would_get_wrong(emu):
    with pytest.raises(RuntimeError, match=r"deadlock(.|\n)*__syncthreads\(\) of block 0: 5 of 64 arrived"):
        emu.selftest_divergent(64, 5)
    emu.selftest_shared_write(8, 7)
    emu.selftest_shared_write(8, 0)
    with pytest.raises(RuntimeError, match="wrote past its 32 bytes of dynamic shared memory"):
        emu.selftest_shared_write(8, 8)
    with pytest.raises(RuntimeError, match="wrote past its 32 bytes of dynamic shared memory"):
        emu.selftest_shared_write(8, 23)  # (the last float of the canary)
    with pytest.raises(RuntimeError, match="wrote before its dynamic shared memory"):
        emu.selftest_shared_write(8, -1)
    with pytest.raises(RuntimeError, match="not launched cooperatively"):
        emu.selftest_grid(4, 3, False)
    emu.emu_configure(num_sms=1)  # 32 blocks of 64 threads at once
    emu.selftest_grid(32, 3, True)
    with pytest.raises(RuntimeError, match="too many blocks in cooperative launch"):
        emu.selftest_grid(33, 3, True)
    # launch configurations CUDA refuses: 1025 threads, no blocks, over 48 KiB of dynamic shared
    # memory without the kernel's attribute raised
    assert emu.selftest_launch_error(1, 1024, 48 * 1024) == 0
    assert emu.selftest_launch_error(1, 1025, 0) == 9
    assert emu.selftest_launch_error(0, 32, 0) == 9
    assert emu.selftest_launch_error(1, 32, 48 * 1024 + 1) == 1
    # and the module works on after each of them
    assert torch.equal(emu.selftest_warp_sum(1, 32, 1.0), torch.full((32,), 528.0))

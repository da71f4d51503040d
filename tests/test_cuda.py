"""The CUDA backend (rnnrec_fast._C_cuda) against the reference, torch.nn and itself.

Everything here needs a CUDA GPU and the built CUDA extension; without them every test is skipped
with the reason. With RNNREC_FAST_REQUIRE_CUDA=1 (benchmarks/gpu_run.sh) a GPU machine whose CUDA
backend failed to build fails instead of skipping.

Both forward paths are covered: "persistent" (one cooperative kernel for the whole sequence, used
for batch <= 8) and "gemm" (cuBLAS per step); the `path` fixture forces one of them.
Tolerances: float64 1e-9; float32 1e-5 relative with an absolute floor of 1e-5 that grows with the
reduction length (sqrt(K / 64)) and with the tensor's largest magnitude (rounding is relative to a
tensor's scale: a relu state grows to hundreds over a few steps); float16 / bfloat16 a few units of
their precision (outputs are rounded to the dtype on both sides), their float32 workspace to
float32 precision.
"""
import math
import os

import pytest
import torch
from torch import nn

import rnnrec_fast
from rnnrec_fast import backends
from rnnrec_fast.backends import reference
from rnnrec_fast.ops import MODES
from rnnrec_fast._checks import env_flag

from conftest import case_seed
from cuda_bad_calls import assert_bad_direct_calls_raise
from discarded_state import discarded_state_case
from module_twins import assert_call_matches_torch_nn, assert_gradient_penalty_matches_torch_nn, module_pair


def _skip_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not backends.available("cuda"):
        if env_flag("RNNREC_FAST_REQUIRE_CUDA"):
            return None  # fail loudly below instead of skipping
        return f"cuda backend unavailable: {backends.unavailable_reason('cuda')}"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DEV = "cuda"
MODE_FORMS = [("rnn_tanh", True), ("rnn_relu", True), ("gru", True), ("gru", False)]
MODE_IDS = ["tanh", "relu", "gru", "gru_cho"]
EXTRAS = ["plain", "lengths", "resets", "both"]
PATHS = {"auto": 0, "persistent": 1, "gemm": 2}


def _cext():
    from rnnrec_fast import _C_cuda  # noqa: PLC0415

    return _C_cuda


@pytest.fixture(autouse=True)
def _strict_fp32():
    """No TF32 anywhere (cuBLAS or cuDNN): the tolerances below are for real float32."""
    if _REASON is not None:
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
    torch.set_float32_matmul_precision(old[2])


@pytest.fixture(params=["persistent", "gemm"])
def path(request):
    """Force a forward path for the test ("persistent" falls back to the GEMM path where the
    persistent kernel does not apply: B > 8, or weights too large for shared memory); restore auto
    afterwards."""
    ext = _cext()
    ext.set_forward_path(PATHS[request.param])
    _FORCED[0] = request.param
    yield request.param
    _FORCED[0] = None
    ext.set_forward_path(0)


_FORCED = [None]  # the path the `path` fixture forces (run_case checks that it ran)


def test_backend_loads():
    """Also the loud failure when RNNREC_FAST_REQUIRE_CUDA=1 and the extension did not build."""
    mod = backends.load("cuda")
    assert mod.DEVICES == ("cuda",)
    assert set(mod.DTYPES) == {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    assert rnnrec_fast.resolve_backend("auto", "cuda", torch.float32) == "cuda"


# ----------------------------------------------------------------------------------------------
# helpers


def make_inputs(T, B, I, H, mode, bias, extras, dtype, gen, device=DEV):
    G = 3 if mode == "gru" else 1
    ws = min(0.7, 2.0 / math.sqrt(H))  # keep pre-activations O(1) for large H
    wi = min(0.7, 2.0 / math.sqrt(I))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x, h0 = rnd(T, B, I), rnd(B, H)
    w_ih, w_hh = rnd(G * H, I, scale=wi), rnd(G * H, H, scale=ws)
    b_ih, b_hh = (rnd(G * H, scale=0.5), rnd(G * H, scale=0.5)) if bias else (None, None)
    lengths = resets = None
    if extras in ("lengths", "both"):
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[0] = T  # always one full row
        lengths = lengths.to(device)
    if extras in ("resets", "both"):
        resets = (torch.rand(T, B, generator=gen) < 0.3).to(device)
    return x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets


def as64(t):
    return None if t is None or not t.is_floating_point() else t.detach().double()


def tol(dtype, K=1):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        a = 1e-5 * max(1.0, math.sqrt(K / 64.0))
        return dict(rtol=1e-5, atol=a)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3)
    return dict(rtol=1.6e-2, atol=1.6e-2)  # bfloat16


def close(actual, expected, what, **kw):
    torch.testing.assert_close(actual, expected, **kw, msg=lambda m: f"{what}: {m}")


def run_case(T, B, I, H, mode, reset_after, bias, extras, dtype, seed, grads=True):
    """Forward (+ backward through autograd) on the CUDA backend vs the float64 reference on the
    GPU computed from the same (rounded) inputs."""
    gen = torch.Generator().manual_seed(seed)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(T, B, I, H, mode, bias, extras, dtype, gen)
    params = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh) if t is not None]
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode,
                                                 reset_after, "cuda")
    assert rnnrec_fast.last_backend() == "cuda"
    # the forced path ran (a persistent case that fell back to the GEMM path passed as one, a review
    # noted): the GEMM path always; the persistent one where it surely applies (B <= 8, and W_hh
    # small enough for one block's shared memory, whatever the card)
    ran = _cext().last_forward_path()
    if _FORCED[0] == "gemm":
        assert ran == PATHS["gemm"], ran
    elif _FORCED[0] == "persistent" and B <= 8 and H <= 33:
        assert ran == PATHS["persistent"], ran
    ws_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert y.dtype == dtype and h_n.dtype == dtype and ws.dtype == ws_dtype
    assert ws.shape == (T, B, 4 * H if mode == "gru" else 0)  # gru [r, z, n, hn]; rnn: nothing
    K = max(H, I, T * B)
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [lengths, resets]
    ry, rh, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    for name, got, ref, dt in (("output", y, ry, dtype), ("h_n", h_n, rh, dtype), ("workspace", ws, rws, ws_dtype)):
        t = tol(dt, K)
        if dt == torch.float32 and ref.numel():  # relative to the tensor's scale, as for the grads below:
            t["atol"] *= max(1.0, ref.abs().max().item())  # a relu state grows to ~300 by T = 12 here
        close(got.detach().double(), ref, name, **t)
    if lengths is not None:  # padding is exactly zero, in the output and the workspace
        pad = torch.arange(T, device=DEV).unsqueeze(1) >= lengths.unsqueeze(0)
        assert (y.detach()[pad] == 0).all()
        assert (ws.detach()[pad] == 0).all()
    if not grads:
        return
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEV)
    gh = torch.randn(h_n.shape, generator=gen, dtype=torch.float64).to(DEV)
    got = torch.autograd.grad((y * gy.to(dtype)).sum() + (h_n * gh.to(dtype)).sum(), params)
    # the reference backward gets our output y (act'(pre) is computed from it: with the reference's
    # own y a relu pre-activation within rounding of 0 could flip the mask and fail spuriously)
    ref_grads = reference.backward(gy.to(dtype).double(), gh.to(dtype).double(), *ref_in, y.detach().double(),
                                   rws, MODES[mode], reset_after)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]  # zip stops at len(params)
    for name, g, rg in zip(names, got, ref_grads):
        assert g.dtype == dtype
        t = tol(dtype, K)
        if dtype == torch.float32:  # rounding is relative to the tensor's scale, not each element's
            t["atol"] *= max(1.0, rg.abs().max().item())  # (see test_op.py::test_matches_reference)
        close(g.double(), rg, f"grad {name}", **t)


# ----------------------------------------------------------------------------------------------
# parity with the reference


SHAPES = [(1, 1, 1, 1), (5, 3, 4, 6), (7, 8, 5, 33), (4, 2, 3, 130), (6, 40, 7, 20)]  # T, B, I, H


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_matches_reference(path, dtype, shape, extras, bias, mode, reset_after):
    seed = case_seed(str(dtype), shape, extras, bias, mode, reset_after)
    run_case(*shape, mode, reset_after, bias, extras, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (6, 4, 5, 24), (5, 24, 8, 64)], ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("extras", ["plain", "both"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_half_types_match_reference(path, dtype, shape, extras, mode, reset_after):
    """half / bfloat16: computed in float32 (state, accumulation, workspace), outputs rounded."""
    T, B, I, H = shape
    gen = torch.Generator().manual_seed(case_seed(str(dtype), shape, extras, mode, reset_after))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(T, B, I, H, mode, True, extras, dtype, gen)
    params = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode,
                                                 reset_after, "cuda")
    assert ws.dtype == torch.float32
    with torch.no_grad():
        # the reference upcasts the same half inputs to float32 and rounds its outputs back
        ry, rh, rws = reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, MODES[mode], reset_after)
    close(y.detach().float(), ry.float(), "output", **tol(dtype))
    close(h_n.detach().float(), rh.float(), "h_n", **tol(dtype))
    close(ws.detach(), rws, "workspace", rtol=1e-4, atol=1e-4)
    gy = torch.randn(y.shape, generator=gen).to(dtype).to(DEV)
    gh = torch.randn(h_n.shape, generator=gen).to(dtype).to(DEV)
    got = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), params)
    with torch.no_grad():
        ref_grads = reference.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y.detach(), rws,
                                       MODES[mode], reset_after)
    for name, g, rg in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, ref_grads):
        assert g.dtype == dtype
        # the gradients are sums over T*B terms rounded to the dtype: scale the floor by their size
        scale = max(1.0, rg.float().abs().max().item())
        t = tol(dtype)
        close(g.float(), rg.float(), f"grad {name}", rtol=t["rtol"], atol=t["atol"] * scale)


@pytest.mark.parametrize("H", [1, 100, 512, 1024])
@pytest.mark.parametrize("B", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_serving_sizes_persistent(B, H, mode, reset_after):
    """The serving kernel's range (B <= 8, H up to 1024), float32, auto path -> persistent."""
    ext = _cext()
    ext.set_forward_path(0)
    run_case(12, B, 16, H, mode, reset_after, True, "both", torch.float32, seed=B * 7919 + H,
             grads=H <= 512)
    assert ext.last_forward_path() == 1, "B <= 8 should run the persistent kernel on this GPU"


@pytest.mark.parametrize("H", [100, 1024])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_serving_sizes_float64(H, mode, reset_after):
    """float64 at B = 8 (the persistent kernel where its shared memory allows, else the GEMM path)."""
    run_case(10, 8, 12, H, mode, reset_after, True, "both", torch.float64, seed=H, grads=False)


@pytest.mark.parametrize("shape", [(20, 512, 32, 256), (3, 9, 4, 17), (2, 1000, 3, 5)],
                         ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_large_batch(shape, mode, reset_after):
    ext = _cext()
    ext.set_forward_path(0)
    run_case(*shape, mode, reset_after, True, "both", torch.float32, seed=shape[1])
    assert ext.last_forward_path() == 2, "B > 8 runs the GEMM path"


def test_paths_agree():
    """Persistent and GEMM forward paths give the same numbers (float64: to rounding)."""
    ext = _cext()
    gen = torch.Generator().manual_seed(5)
    for mode, reset_after in MODE_FORMS:
        args = make_inputs(9, 5, 7, 70, mode, True, "both", torch.float64, gen)
        outs = []
        for p in (1, 2):
            ext.set_forward_path(p)
            outs.append(torch.ops.rnnrec_fast.recurrence(*args, mode, reset_after, "cuda"))
            assert ext.last_forward_path() == p
        ext.set_forward_path(0)
        for a, b, what in zip(outs[0], outs[1], ("y", "h_n", "ws")):
            close(a, b, f"{mode}/{reset_after} {what}", rtol=1e-12, atol=1e-12)


def test_lengths_out_of_range_are_clamped(path):
    """Device lengths are not checked on the host (that would synchronise); the kernels clamp."""
    gen = torch.Generator().manual_seed(2)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, resets = make_inputs(5, 4, 3, 6, "gru", True, "resets", torch.float64, gen)
    lengths = torch.tensor([7, -3, 2, 5], device=DEV)
    y, h_n, ws = _cext().forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, 2, True)
    ry, rh, rws = reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths.clamp(0, 5), resets, 2, True)
    close(y, ry, "output", **tol(torch.float64))
    close(h_n, rh, "h_n", **tol(torch.float64))
    close(ws, rws, "ws", **tol(torch.float64))


def test_reset_after_forms_differ():
    gen = torch.Generator().manual_seed(1)
    args = make_inputs(3, 2, 3, 4, "gru", True, "plain", torch.float64, gen)
    a = rnnrec_fast.recurrence(*args[:6], reset_after=True, backend="cuda")[0]
    b = rnnrec_fast.recurrence(*args[:6], reset_after=False, backend="cuda")[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_backward_rebuilds_h_prev_from_y(mode, reset_after, dtype):
    """The workspace holds no h_prev: the backward takes the state entering step t from h0 (t = 0) and
    y[t - 1], zero at a reset. Fed the reference's (y, ws) directly -- also with y moved off the
    forward's values at active steps, which the reference reads the same way -- it matches
    reference.backward. Resets at t = 0 and rows with no / partial steps included."""
    ext = _cext()
    T, B, I, H = 6, 5, 4, 7
    gen = torch.Generator().manual_seed(17)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", dtype, gen)
    lengths = torch.tensor([T, 0, 3, 1, T - 1], device=DEV)
    resets = (torch.rand(T, B, generator=gen) < 0.3).to(DEV)
    resets[0, 0] = True  # h0 of row 0 unused
    resets[2, 2] = True
    m = MODES[mode]
    with torch.no_grad():
        ry, _, rws = reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, m, reset_after)
    assert rws.shape == (T, B, 4 * H if mode == "gru" else 0)
    active = (torch.arange(T, device=DEV).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)
    bumped = torch.where(active, ry.double() + 0.05 * torch.randn(ry.shape, generator=gen,
                                                                   dtype=torch.float64).to(DEV), 0.0).to(dtype)
    gy = torch.randn(T, B, H, generator=gen, dtype=torch.float64).to(dtype).to(DEV)
    gh = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype).to(DEV)
    for what, yy in (("y", ry), ("bumped y", bumped)):
        got = ext.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, yy, rws, m, reset_after)
        with torch.no_grad():
            want = reference.backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, yy, rws, m,
                                      reset_after)
        for name, g, rg in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
            assert g.dtype == dtype and g.shape == rg.shape
            if dtype == torch.bfloat16:
                scale = max(1.0, rg.float().abs().max().item())
                t = tol(dtype)
                close(g.float(), rg.float(), f"{what}: grad {name}", rtol=t["rtol"], atol=t["atol"] * scale)
            else:
                close(g, rg, f"{what}: grad {name}", **tol(dtype, T * B))


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_reset_rows_ignore_what_h0_holds(path, mode, reset_after):
    """A row reset at step 0 starts from zeros whatever h0 holds there (NaN, inf: a fresh state
    buffer): outputs and every gradient equal those with that row zeroed (grad_w_hh was 0 * NaN)."""
    T, B, I, H = 4, 3, 5, 6
    gen = torch.Generator().manual_seed(2)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float64, gen)
    resets = torch.zeros(T, B, dtype=torch.bool, device=DEV)
    resets[0, 1] = True
    resets[2, 2] = True
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        h0f = h0.clone()
        h0f[1] = fill
        leaves = [t.clone().requires_grad_() for t in (x, h0f, w_ih, w_hh, b_ih, b_hh)]
        y, h_n = rnnrec_fast.recurrence(*leaves, resets=resets, mode=mode, reset_after=reset_after,
                                        backend="cuda")
        grads = torch.autograd.grad((y * 1.5).sum() + h_n.sum(), leaves)
        results.append([y, h_n] + [g for i, g in enumerate(grads) if i != 1])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.isfinite(a).all()
            close(a, b, "with a non-finite discarded h0 row", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_padding_past_lengths_is_never_read(path, mode, reset_after):
    """x past a row's length (padding) holding NaN / inf gives the outputs and gradients of zero
    padding (grad_w_ih was NaN: 0 * NaN in its product); so does the h0 of a row of length 0, which
    only passes through to h_n (grad_w_hh was NaN)."""
    T, B, I, H = 6, 4, 3, 5
    gen = torch.Generator().manual_seed(21)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float64, gen)
    lengths = torch.tensor([T, 4, 0, 1], device=DEV)
    pad = (torch.arange(T, device=DEV).unsqueeze(1) >= lengths.unsqueeze(0)).unsqueeze(2)
    unread = (lengths == 0).unsqueeze(1)
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        leaves = [t.clone().requires_grad_() for t in (x.masked_fill(pad, fill), h0.masked_fill(unread, fill),
                                                        w_ih, w_hh, b_ih, b_hh)]
        y, h_n = rnnrec_fast.recurrence(*leaves, lengths=lengths, mode=mode, reset_after=reset_after,
                                        backend="cuda")
        grads = torch.autograd.grad((y * 1.5).sum() + h_n.sum(), leaves)
        results.append([y, h_n.masked_fill(unread, 0.0), *grads])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.isfinite(a).all()
            close(a, b, "with NaN / inf padding", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_non_finite_values_propagate_as_in_the_reference(path, dtype, mode, reset_after):
    """A state or input gone to inf / NaN gives NaN exactly where the reference does (relu kept NaN
    as 0: a diverged model looked finite), and the same finite values elsewhere."""
    T, B, I, H = 3, 5, 5, 6
    gen = torch.Generator().manual_seed(8)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", dtype, gen)
    h0[1, 2], h0[2, 0], h0[4, 3] = float("inf"), -float("inf"), float("nan")
    x[1, 3, 1] = float("inf")
    w_hh = w_hh * 30
    kw = dict(mode=mode, reset_after=reset_after)
    want = rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="reference", **kw)
    got = rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="cuda", **kw)
    for a, b, what in zip(got, want, ("output", "h_n")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        assert torch.isnan(b).any() and torch.isfinite(b).any()  # the case has both
        close(a, b, what, equal_nan=True, **tol(dtype, H))


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_rows_past_their_length_pass_gradients_beside_a_non_finite_w_hh(mode, reset_after):
    """A row's steps past its length pass the gradient through unchanged, as the reference selects
    it: an inf in W_hh does not reach it (the backward added 0 @ W_hh to such rows in its per-step
    GEMM: NaN by IEEE 0 * inf, in h0's gradient of a length-0 row and, carried on, at a shorter
    row's last step; the pass-through is now kept apart). The CPU backends' twin is in test_op.py."""
    T, B, I, H = 4, 3, 3, 5
    gen = torch.Generator().manual_seed(12)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float64, gen)
    w_hh[0, 0] = float("inf")
    lengths = torch.tensor([T, 0, 2], device=DEV)
    grads = []
    for backend in ("reference", "cuda"):
        leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        y, h_n = rnnrec_fast.recurrence(*leaves, lengths=lengths, mode=mode, reset_after=reset_after,
                                        backend=backend)
        grads.append(torch.autograd.grad((y * 1.5).sum() + h_n.sum(), leaves))
    want, got = grads
    assert torch.isfinite(want[1][1]).all() and torch.isfinite(want[0][1, 2]).all()  # (what the case checks)
    for a, b, what in zip(got, want, ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        close(a, b, what, equal_nan=True, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["lengths", "resets", "negative"])
def test_a_discarded_state_stays_out_of_grad_w_hh(path, dtype, kind):
    """A relu state overflowed to inf whose row is then past its length or resets, or the NaN h0 of a
    row of negative length (clamped to 0): the reference's h_prev is zero there and W_hh's gradient
    finite; the backward multiplied those steps' zero gradients by the discarded state (NaN). The
    CPU backends' twin is in test_op.py, numba.cuda's in tests/cudasim_check.py."""
    gen = torch.Generator().manual_seed(5)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(2, 2, 2, 3, "rnn_relu", True, "plain", dtype, gen)
    x, h0, w_ih, lengths, resets = discarded_state_case(kind, x, h0, w_ih, device=DEV)
    grads = []
    clamped = None if lengths is None else lengths.clamp(0, 2)  # (what the CUDA kernels read)
    for backend, lens in (("reference", clamped), ("cuda", lengths)):
        leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        y, _ = rnnrec_fast.recurrence(*leaves, lengths=lens, resets=resets, mode="rnn_relu", backend=backend)
        grads.append(torch.autograd.grad(y[:, 1].sum(), leaves))
    want, got = grads
    assert torch.isfinite(want[3]).all()
    for a, b, what in zip(got, want, ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
        close(a, b, what, equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_relu_gradient_through_a_nan_state_as_the_reference(path, dtype):
    """relu's backward is torch's threshold_backward (0 where h <= 0, else the gradient): a NaN
    state passes the gradient on, as the reference and torch.nn do (a mask 'h > 0' dropped it)."""
    T, B, I, H = 4, 3, 3, 5
    gen = torch.Generator().manual_seed(9)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "rnn_relu", True, "plain", dtype, gen)
    x[1, 0, 0] = float("nan")
    grads = []
    for backend in ("reference", "cuda"):
        leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        y, h_n = rnnrec_fast.recurrence(*leaves, mode="rnn_relu", backend=backend)
        grads.append(torch.autograd.grad(y.sum() + h_n.sum(), leaves))
    for a, b, what in zip(grads[1], grads[0], ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        close(a, b, what, equal_nan=True, **tol(dtype, H))
    assert torch.isfinite(grads[0][0][1, 0]).all()


# ----------------------------------------------------------------------------------------------
# direct calls with bad arguments raise (never crash)


def test_direct_bad_calls_raise():
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(3, 2, 4, 5, "gru", True, "both", torch.float32, gen)
    assert_bad_direct_calls_raise(_cext(), inputs, elsewhere=lambda t: t.cpu())
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# gradcheck / opcheck


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
@pytest.mark.parametrize("extras", ["plain", "both"])
def test_gradcheck(path, mode, reset_after, extras):
    gen = torch.Generator().manual_seed(7)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(3, 2, 2, 3, mode, True, extras, torch.float64, gen)
    if mode == "rnn_relu":  # keep pre-activations away from the kink
        b_ih = b_ih.abs() + 1.0
    args = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def fn(*a):
        y, h, _ = torch.ops.rnnrec_fast.recurrence(*a, lengths, resets, mode, reset_after, "cuda")
        return y, h

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
@pytest.mark.parametrize("extras", ["plain", "both"])
def test_opcheck(mode, reset_after, extras):
    gen = torch.Generator().manual_seed(3)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(4, 3, 2, 5, mode, True, extras, torch.float32, gen)
    args = (x.requires_grad_(), h0.requires_grad_(), w_ih.requires_grad_(), w_hh.requires_grad_(),
            b_ih.requires_grad_(), b_hh, lengths, resets, mode, reset_after, "cuda")
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence.default, args)
    with torch.no_grad():
        y, h_n, ws = torch.ops.rnnrec_fast.recurrence(*args)
    bargs = (torch.randn_like(y), torch.randn_like(h_n)) + tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]) + (y, ws, mode, reset_after, "cuda")
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence_backward.default, bargs)


# ----------------------------------------------------------------------------------------------
# drop-in modules on cuda vs torch.nn on cuda (cuDNN for float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B", [1, 4, 37])
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh", "RNN_relu"])
def test_modules_match_torch_nn(kind, B, dtype):
    torch.manual_seed(B)
    ref, ours = module_pair(kind, "cuda", input_size=6, hidden_size=20, num_layers=2, batch_first=True,
                            bidirectional=True, device=DEV, dtype=dtype)
    assert ours.active_backend() == "cuda"
    x = torch.randn(B, 7, 6, device=DEV, dtype=dtype, requires_grad=True)
    hx = torch.randn(4, B, 20, device=DEV, dtype=dtype, requires_grad=True)
    assert_call_matches_torch_nn(ref, ours, x, hx, tol(dtype, 64))


def test_module_packed_sequence_matches_torch_nn():
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    ref = nn.GRU(5, 16, device=DEV, dtype=torch.float64)
    ours = rnnrec_fast.GRU(5, 16, device=DEV, dtype=torch.float64, backend="cuda")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 6, 5, device=DEV, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 7, 1, 9, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    (pr, hr), (po, ho) = ref(packed), ours(packed)
    close(pad_packed_sequence(po)[0], pad_packed_sequence(pr)[0], "output", **tol(torch.float64))
    close(ho, hr, "h_n", **tol(torch.float64))


# ----------------------------------------------------------------------------------------------
# CUDA graphs: capture / replay equals eager, also after the static inputs change


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
@pytest.mark.parametrize("B", [2, 32])
def test_cuda_graph_capture_replay(path, mode, reset_after, B):
    if path == "persistent" and B > 8:
        pytest.skip("the persistent kernel is for B <= 8")
    gen = torch.Generator().manual_seed(11)
    T, I, H = 6, 5, 48
    args = list(make_inputs(T, B, I, H, mode, True, "both", torch.float32, gen))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = args
    gy = torch.randn(T, B, H, device=DEV)
    gh = torch.randn(B, H, device=DEV)

    def step():
        y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode,
                                                     reset_after, "cuda")
        grads = torch.ops.rnnrec_fast.recurrence_backward(gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets,
                                                         y, ws, mode, reset_after, "cuda")
        return (y, h_n, ws) + tuple(grads)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (cuBLAS handles, backend resolution) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = step()
    for trial in range(2):
        if trial == 1:  # new data in the same static buffers
            x.copy_(torch.randn(x.shape, generator=gen).to(DEV))
            h0.copy_(torch.randn(h0.shape, generator=gen).to(DEV))
            lengths.copy_(torch.randint(0, T + 1, (B,), generator=gen).to(DEV))
            resets.copy_((torch.rand(T, B, generator=gen) < 0.5).to(DEV))
        g.replay()
        torch.cuda.synchronize()
        eager = step()
        names = ["y", "h_n", "ws", "grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]
        for name, a, b in zip(names, static_out, eager):
            close(a, b, f"replay {trial} {name}", rtol=1e-6, atol=1e-6)


def test_cuda_graph_serving_single_step():
    """The serving call (B=1, T=1, H=100 GRU) captured once and replayed many times."""
    ext = _cext()
    ext.set_forward_path(0)
    gen = torch.Generator().manual_seed(4)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(1, 1, 100, 100, "gru", True, "plain", torch.float32, gen)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="cuda")
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y, h_n = rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="cuda")
        assert ext.last_forward_path() == 1
        h = h0.clone()
        for _ in range(5):  # feed the state back, as a serving loop does
            h0.copy_(h)
            g.replay()
            ye, he = rnnrec_fast.recurrence(x, h, w_ih, w_hh, b_ih, b_hh, backend="cuda")
            close(h_n, he, "h_n", rtol=1e-6, atol=1e-6)
            h = he


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_double_backward_matches_torch_nn(kind):
    """A gradient penalty through a CUDA module (the Python autograd's differentiable backward,
    the reference forward recomputed on the GPU) against torch.nn's, float64: the gradients taken
    with create_graph=True and the second derivatives of x, hx and every weight."""
    torch.manual_seed(case_seed("cuda double backward", kind))
    ref = getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True, batch_first=True).double().to(DEV)
    assert_gradient_penalty_matches_torch_nn(ref, rnnrec_fast.from_torch(ref), DEV)

"""The Numba CUDA backend on a real GPU against torch.nn (cuDNN) on cuda. Skipped without a GPU;
in CI the same kernels run through Numba's CUDA simulator (test_numba_cudasim.py)."""
import pytest
import torch
from torch import nn

import rnnrec_fast
from rnnrec_fast import backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _numba_cuda():
    """numba and its CUDA target usable here (numba.cuda needs a driver and NVVM, which a machine
    with a GPU may still lack: a skip with the reason, not 40 failures), and no TF32 in torch.nn's
    reference while a test runs (the flags restored after it)."""
    if not backends.available("numba"):
        pytest.skip(f"numba backend unavailable: {backends.unavailable_reason('numba')}")
    why = backends.device_unavailable("numba", "cuda")
    if why is not None:
        pytest.skip(f"numba backend cannot run on cuda here: {why}")
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _tol(dtype, expected):
    """float64 1e-9; float32 1e-5 relative, with an absolute floor of 1e-5 times the tensor's
    largest magnitude: rounding is relative to a tensor's scale, not each element's (a weight
    gradient summed over B * T = 1,280 rows of float32 differs from its float64 value by up to
    ~2e-5 in torch.nn's own result), as tests/test_cuda.py does."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    return dict(rtol=1e-5, atol=1e-5 * max(1.0, expected.detach().abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh", "RNN_relu"])
@pytest.mark.parametrize("shape", [(1, 1, 100), (64, 20, 100), (3, 7, 33)], ids=lambda s: "B{}T{}H{}".format(*s))
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_numba_cuda_matches_torch(dtype, kind, shape, layers, bidirectional):
    B, T, H = shape
    torch.manual_seed(0)
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=True, device="cuda", dtype=dtype)
    if kind == "GRU":
        ref = nn.GRU(H, H, **kw)
    else:
        ref = nn.RNN(H, H, nonlinearity=kind.split("_")[1], **kw)
    ours = rnnrec_fast.from_torch(ref, backend="numba")
    x = torch.randn(B, T, H, device="cuda", dtype=dtype, requires_grad=True)
    hx = torch.randn(layers * (2 if bidirectional else 1), B, H, device="cuda", dtype=dtype, requires_grad=True)
    out, h = ours(x, hx)
    assert rnnrec_fast.last_backend() == "numba"
    out_ref, h_ref = ref(x, hx)
    torch.testing.assert_close(out, out_ref, **_tol(dtype, out_ref))
    torch.testing.assert_close(h, h_ref, **_tol(dtype, h_ref))
    gy, gh = torch.randn_like(out), torch.randn_like(h)
    ins = [x, hx]
    g = torch.autograd.grad((out * gy).sum() + (h * gh).sum(), ins + list(ours.parameters()))
    g_ref = torch.autograd.grad((out_ref * gy).sum() + (h_ref * gh).sum(), ins + list(ref.parameters()))
    assert len(g) == len(g_ref) == 2 + 4 * layers * (2 if bidirectional else 1)  # x, hx, 4 per layer and direction
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **_tol(dtype, b))


@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)])
def test_numba_cuda_gradcheck_with_lengths_and_resets(mode, reset_after):
    G = 3 if mode == "gru" else 1
    gen = torch.Generator(device="cuda").manual_seed(1)
    T, B, I, H = 4, 3, 2, 3
    args = [torch.randn(*s, device="cuda", dtype=torch.float64, generator=gen).requires_grad_()
            for s in ((T, B, I), (B, H), (G * H, I), (G * H, H), (G * H,), (G * H,))]
    lengths = torch.tensor([4, 2, 0], device="cuda")
    resets = torch.zeros(T, B, dtype=torch.bool, device="cuda")
    resets[2, 0] = True

    def fn(*a):
        y, h, _ = torch.ops.rnnrec_fast.recurrence(*a, lengths, resets, mode, reset_after, "numba")
        return y, h

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_numba_cuda_runs_on_torchs_current_stream():
    """The kernels launch on torch's current stream (a side stream here: torch's are non-blocking), so
    they run after the work queued before them there: x is written on the side stream behind a long
    GPU sleep, and the forward and backward must see it (launched on another stream they read x and
    the input projection before they are written). The simulator has no streams. From a mutation
    review: the forward launched on numba's default stream (stream=0) went unnoticed. (Written
    without a GPU at hand: check that it fails with that change.)"""
    torch.manual_seed(0)
    ref = nn.GRU(8, 8, device="cuda", dtype=torch.float64)
    ours = rnnrec_fast.from_torch(ref, backend="numba")
    x_true = torch.randn(5, 3, 8, device="cuda", dtype=torch.float64)
    out_ref, h_ref = ref(x_true)
    g_ref = torch.autograd.grad(out_ref.sum() + h_ref.sum(), list(ref.parameters()))
    # compile and load the kernels first (numba.cuda compiles at the first launch, in ~1 s, longer
    # than the sleeps below: run alone, a launch on the wrong stream would start after them anyway)
    o, hh = ours(x_true)
    torch.autograd.grad(o.sum() + hh.sum(), list(ours.parameters()))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x = torch.zeros_like(x_true)
        torch.cuda._sleep(500_000_000)  # a few hundred ms of GPU time queued ahead on the side stream
        x.copy_(x_true)
        out, h = ours(x)
        assert rnnrec_fast.last_backend() == "numba"
        torch.cuda._sleep(500_000_000)
        g = torch.autograd.grad(out.sum() + h.sum(), list(ours.parameters()))
    side.synchronize()
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_numba_cuda_on_the_second_gpu():
    """Tensors on cuda:1 while torch's current device is 0: the kernels launch in numba's context of
    cuda:1 on its stream (numba wraps pointers and launches in device 0's context unless told)."""
    assert torch.cuda.current_device() == 0
    torch.manual_seed(0)
    ref = nn.GRU(8, 8, device="cuda:1", dtype=torch.float64)
    ours = rnnrec_fast.from_torch(ref, backend="numba")
    x = torch.randn(5, 3, 8, device="cuda:1", dtype=torch.float64, requires_grad=True)
    out, h = ours(x)
    out_ref, h_ref = ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
    g = torch.autograd.grad(out.sum() + h.sum(), [x] + list(ours.parameters()))
    g_ref = torch.autograd.grad(out_ref.sum() + h_ref.sum(), [x] + list(ref.parameters()))
    for a, b in zip(g, g_ref):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

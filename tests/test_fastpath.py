"""The modules' C++ inference fast path (rnnrec_fast._C.infer) against torch.nn and against the
modules' general path (the registered op), and the calls it must decline.

Without autograd (torch.no_grad / torch.inference_mode) an eager module call on CPU float tensors
runs the whole module in one C++ call; everything else takes the general path. These tests spy on
the fast path to be sure which path ran.
"""
import os

import pytest
import torch
from torch import nn

import rnnrec_fast
from rnnrec_fast import modules

from conftest import assert_close

needs_ext = pytest.mark.skipif(
    modules._infer is None and os.environ.get("RNNREC_FAST_REQUIRE_EXT") != "1",
    reason="the C++ extension is not built")


@pytest.fixture
def spy(monkeypatch):
    """Counts fast-path calls and how many it handled (returned a result)."""
    counts = {"calls": 0, "handled": 0}
    real = modules._infer

    def wrapped(*args):
        counts["calls"] += 1
        out = real(*args)
        counts["handled"] += out is not None
        return out

    monkeypatch.setattr(modules, "_infer", wrapped)
    return counts


def pair(kind, dtype, **kw):
    if kind == "GRU":
        ref, ours = nn.GRU(dtype=dtype, **kw), rnnrec_fast.GRU(dtype=dtype, **kw)
    elif kind == "GRU_cho":
        ref, ours = None, rnnrec_fast.GRU(dtype=dtype, reset_after=False, **kw)
    else:
        nl = kind.split("_")[1]
        ref, ours = nn.RNN(nonlinearity=nl, dtype=dtype, **kw), rnnrec_fast.RNN(nonlinearity=nl, dtype=dtype, **kw)
    if ref is not None:
        ours.load_state_dict(ref.state_dict())
    return ref, ours


def general_path(module, *args):
    """The same call through the registered op (autograd on, so the fast path declines)."""
    with torch.enable_grad():
        out = module(*args)
    return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()


SHAPES = [(1, 1), (5, 3), (1, 4), (4, 1)]  # (T, B)


@needs_ext
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("T,B", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("num_layers", [1, 3], ids=["L1", "L3"])
@pytest.mark.parametrize("kind", ["GRU", "GRU_cho", "RNN_tanh", "RNN_relu"])
def test_sequence_modules(spy, kind, num_layers, batch_first, T, B, dtype, mode):
    salt = sum(map(ord, f"{kind}{num_layers}{batch_first}{T}{B}{dtype}"))
    torch.manual_seed(salt)
    bias, with_hx, unbatched = salt % 2 == 0, (salt // 2) % 2 == 0, (salt // 4) % 3 == 0
    I, H = 7, 9
    ref, ours = pair(kind, dtype, input_size=I, hidden_size=H, num_layers=num_layers, bias=bias,
                     batch_first=batch_first, dropout=0.3 if num_layers > 1 else 0.0)
    ours.eval()  # dropout is off in eval mode, so the fast path may run
    if ref is not None:
        ref.eval()
    if unbatched:
        x = torch.randn(T, I, dtype=dtype)
        hx = torch.randn(num_layers, H, dtype=dtype) if with_hx else None
    else:
        x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
        hx = torch.randn(num_layers, B, H, dtype=dtype) if with_hx else None
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        out, h_n = ours(x, hx)
    assert spy == {"calls": 1, "handled": 1}
    assert rnnrec_fast.last_backend() == "cpp"
    g_out, g_h = general_path(ours, x, hx)
    assert out.shape == g_out.shape and h_n.shape == g_h.shape
    assert_close(out, g_out, dtype, "output vs general path")
    assert_close(h_n, g_h, dtype, "h_n vs general path")
    if ref is not None:
        with torch.no_grad():
            r_out, r_h = ref(x, hx)
        assert out.shape == r_out.shape and h_n.shape == r_h.shape
        assert_close(out, r_out, dtype, "output vs torch.nn")
        assert_close(h_n, r_h, dtype, "h_n vs torch.nn")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell_tanh", "RNNCell_relu"])
def test_cells(spy, kind, bias, with_hx, batched, dtype):
    torch.manual_seed(5)
    I, H, B = 6, 11, 4
    if kind == "GRUCell":
        ref, ours = nn.GRUCell(I, H, bias=bias, dtype=dtype), rnnrec_fast.GRUCell(I, H, bias=bias, dtype=dtype)
    else:
        nl = kind.split("_")[1]
        ref = nn.RNNCell(I, H, bias=bias, nonlinearity=nl, dtype=dtype)
        ours = rnnrec_fast.RNNCell(I, H, bias=bias, nonlinearity=nl, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, dtype=dtype) if batched else torch.randn(I, dtype=dtype)
    hx = (torch.randn(B, H, dtype=dtype) if batched else torch.randn(H, dtype=dtype)) if with_hx else None
    with torch.inference_mode():
        h = ours(x, hx)
        r = ref(x, hx)
    assert spy == {"calls": 1, "handled": 1}
    assert h.shape == r.shape
    assert_close(h, r, dtype, "new state vs torch.nn")
    assert_close(h, general_path(ours, x, hx), dtype, "new state vs general path")


@needs_ext
def test_non_contiguous_inputs(spy):
    torch.manual_seed(2)
    ref, ours = pair("GRU", torch.float32, input_size=5, hidden_size=8, num_layers=2, batch_first=True)
    x = torch.randn(6, 3, 5).transpose(0, 1)                 # (B=3, T=6, I) view, not contiguous
    hx = torch.randn(3, 2, 8).transpose(0, 1)                # (layers, B, H) view, not contiguous
    with torch.inference_mode():
        out, h_n = ours(x, hx)
        r_out, r_h = ref(x, hx)
    assert spy["handled"] == 1
    assert_close(out, r_out, torch.float32, "output")
    assert_close(h_n, r_h, torch.float32, "h_n")


@needs_ext
def test_declines_what_it_does_not_handle(spy):
    """Autograd on, training-mode dropout, bidirectional, resets, another backend or dtype: the
    general path runs (with the same results as torch.nn where torch.nn has the feature)."""
    torch.manual_seed(4)
    x = torch.randn(5, 2, 3)
    ref, ours = pair("GRU", torch.float32, input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
    ours(x)  # autograd on
    with torch.no_grad():  # training mode with dropout: must draw the same masks as torch.nn
        torch.manual_seed(9)
        out, _ = ours(x)
        torch.manual_seed(9)
        r_out, _ = ref(x)
    assert_close(out, r_out, torch.float32, "dropout output")
    assert spy["calls"] == 0
    _, bi = pair("GRU", torch.float32, input_size=3, hidden_size=4, bidirectional=True)
    with torch.inference_mode():
        bi(x)
        rnnrec_fast.GRU(3, 4)(x, resets=torch.zeros(5, 2, dtype=torch.bool))
        rnnrec_fast.GRU(3, 4, backend="reference")(x)
        assert rnnrec_fast.last_backend() == "reference"
    assert spy["calls"] == 0
    half = rnnrec_fast.GRU(3, 4, dtype=torch.float16)
    with torch.inference_mode():
        half(x.half())
    assert spy == {"calls": 1, "handled": 0}  # tried, declined: float16 is not the C++ kernels'


@needs_ext
@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m(torch.randn(4, 2, 5)), ValueError, "input.size\\(-1\\) must be equal to input_size"),
    (lambda m: m(torch.randn(4, 2, 3), torch.randn(1, 3, 4)), ValueError, "Expected hidden size"),
    (lambda m: m(torch.randn(4, 2, 3), torch.randn(2, 4)), ValueError, "hx should also be 3-D"),
    (lambda m: m(torch.randn(4, 2, 3, 1)), ValueError, "Expected input to be 2D or 3D"),
    (lambda m: m(torch.randn(4, 2, 3).double()), ValueError, "dtype"),
    (lambda m: m(torch.randn(0, 2, 3)), ValueError, "must not be empty"),
])
def test_bad_input_gets_the_same_errors_without_autograd(spy, call, exc, match):
    module = rnnrec_fast.GRU(3, 4)
    with torch.inference_mode(), pytest.raises(exc, match=match):
        call(module)
    with pytest.raises(exc, match=match):  # the same message with autograd on
        call(module)

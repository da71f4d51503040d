"""Bad input raises a clear ValueError / TypeError / RuntimeError naming the problem, never a crash."""
import contextlib
import os
import threading

import pytest
import torch
from torch import nn

import rnnrec_fast
from rnnrec_fast._checks import env_flag

from conftest import assert_close, case_seed, cpu_backends, shrunk


def good(T=3, B=2, I=4, H=5, G=3, dtype=torch.float32):
    return dict(x=torch.randn(T, B, I, dtype=dtype), h0=torch.randn(B, H, dtype=dtype),
                w_ih=torch.randn(G * H, I, dtype=dtype), w_hh=torch.randn(G * H, H, dtype=dtype),
                b_ih=torch.randn(G * H, dtype=dtype), b_hh=torch.randn(G * H, dtype=dtype))


def call(backend="auto", mode="gru", lengths=None, resets=None, **over):
    a = good(G=1 if mode.startswith("rnn") else 3)
    a.update(over)
    return torch.ops.rnnrec_fast.recurrence(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                            lengths, resets, mode, True, backend)


BAD_INPUTS = [
    (dict(x=torch.randn(3, 4)), "x must be 3-D"),
    (dict(x=torch.randn(0, 2, 4)), "must not be empty"),
    (dict(x=torch.randn(3, 0, 4), h0=torch.randn(0, 5)), "must not be empty"),
    (dict(h0=torch.randn(3, 5)), "h0 must be"),
    (dict(h0=torch.randn(2, 5, dtype=torch.float64)), "h0 has dtype"),
    (dict(w_ih=torch.randn(15, 3)), "w_ih must be"),
    (dict(w_hh=torch.randn(14, 5)), "w_hh must be"),
    (dict(b_ih=torch.randn(14)), "b_ih must be"),
    (dict(b_hh=torch.randn(15, dtype=torch.float64)), "b_hh has dtype"),
    (dict(x=torch.randint(0, 3, (3, 2, 4))), "floating-point"),
    (dict(mode="lstm"), "mode must be one of"),
    (dict(lengths=torch.tensor([1, 4])), r"lengths must lie in \[0, T=3\]"),
    (dict(lengths=torch.tensor([-1, 2])), "lengths must lie"),
    (dict(lengths=torch.tensor([1.0, 2.0])), "lengths must be an int64"),
    (dict(lengths=torch.tensor([1, 2, 3])), "lengths must be an int64 tensor of shape"),
    (dict(resets=torch.zeros(3, 2)), "resets must be a bool"),
    (dict(resets=torch.zeros(2, 2, dtype=torch.bool)), "resets must be a bool tensor of shape"),
    # (from a mutation review: each passed the Python kernels' checks once its check was dropped)
    (dict(w_ih=torch.randn(0, 4), w_hh=torch.randn(0, 0), h0=None, b_ih=None, b_hh=None),
     r"w_hh must be \(3\*H, H\) for mode 'gru', got shape \(0, 0\)"),
    (dict(lengths=torch.tensor([[3, 2], [3, 2]])), r"lengths must be an int64 tensor of shape \(2,\), got torch.int64 \(2, 2\)"),
    (dict(lengths=torch.tensor([3, 2], dtype=torch.int32)), r"lengths must be an int64 tensor of shape \(2,\), got torch.int32"),
    (dict(lengths=torch.tensor([3, 2], device="meta")), "lengths is on meta but x is on cpu"),
    (dict(resets=torch.zeros(3, 2, dtype=torch.bool, device="meta")), "resets is on meta but x is on cpu"),
    # a storage freed or shrunk after the tensor was made: the kernels would read past its end
    (dict(x=shrunk(torch.randn(3, 2, 4))), "x reaches 96 bytes into its storage, which holds 8: its memory was freed"),
    (dict(h0=shrunk(torch.randn(2, 5), 0)), "h0 reaches 40 bytes into its storage, which holds 0"),
    (dict(w_ih=shrunk(torch.randn(4, 15).t())), "w_ih reaches 240 bytes into its storage, which holds 8"),
    # views within their storage must pass: an offset, an expanded (stride 0) h0, a sliced step
    (dict(w_hh=torch.randn(16, 5)[1:]), None),
    (dict(h0=torch.randn(1, 5).expand(2, 5)), None),
    (dict(w_ih=torch.randn(15, 8)[:, ::2]), None),
    # (a sliced step reaches further than its element count: 476 bytes for 240 of elements)
    (dict(w_ih=shrunk(torch.randn(15, 8)[:, ::2], 400)), "w_ih reaches 476 bytes into its storage, which holds 400"),
    (dict(w_hh=shrunk(torch.randn(16, 5)[1:], 300)), "w_hh reaches 320 bytes into its storage, which holds 300"),
    (dict(b_ih=shrunk(torch.randn(15))), "b_ih reaches 60 bytes"),
    (dict(b_hh=shrunk(torch.randn(15))), "b_hh reaches 60 bytes"),
    (dict(lengths=shrunk(torch.tensor([3, 2]))), "lengths reaches 16 bytes into its storage, which holds 8"),
    (dict(resets=shrunk(torch.zeros(3, 2, dtype=torch.bool), 4)), "resets reaches 6 bytes"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("change,match", BAD_INPUTS)
def test_op_rejects_bad_input(backend, change, match):
    if match is None:  # a case that must pass
        call(backend=backend, **change)
        return
    with pytest.raises(ValueError, match=match):
        call(backend=backend, **change)


@pytest.mark.skipif(not rnnrec_fast.backends.available("cpp"), reason="needs the C++ extension")
@pytest.mark.parametrize("change,match", [case for case in BAD_INPUTS if case[1] is not None])
def test_cpp_checks_say_what_the_python_checks_say(change, match):
    """The C++ validation (the cpp backend's calls) words every error as the Python one (the
    reference backend's): dtypes as torch prints them (torch.float64, not Double)."""
    msgs = []
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError) as info:
            call(backend=backend, **change)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("mode", ["lstm", "gru\x00junk", "gru\n", "it's", "a\"b'c", "back\\slash", "g\x7fru"])
def test_unknown_mode_is_quoted_as_python_quotes_it(mode):
    """Every backend names an unknown mode as repr() writes it (from a review: the C++ check
    printed the raw string, so a NUL cut its message short, "got 'gru", and a newline or a quote
    came out unescaped, where the Python registration's message said 'gru\\x00junk')."""
    expected = f"rnnrec_fast.recurrence: mode must be one of ('rnn_tanh', 'rnn_relu', 'gru'), got {mode!r}"
    for backend in ("cpp", "numba", "reference", "auto"):
        if backend != "auto" and not rnnrec_fast.backends.available(backend):
            continue
        with pytest.raises(ValueError) as info:
            call(backend=backend, mode=mode)
        assert str(info.value) == expected, backend


def test_unknown_backend_and_wrong_device():
    with pytest.raises(ValueError, match="backend must be one of"):
        rnnrec_fast.recurrence(*good().values(), backend="fortran")
    # the CUDA backend on CPU tensors: refused as a device it does not run, or, not built here, as
    # unavailable with the reason (from a review: the unbuilt branch raised its own ValueError)
    if rnnrec_fast.ops._backends.available("cuda"):
        with pytest.raises(ValueError, match="does not run on 'cpu'"):
            call(backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            call(backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on one device"):
            call(h0=torch.randn(2, 5, device="cuda"))


def test_unavailable_backend_says_why(monkeypatch):
    from rnnrec_fast import backends

    monkeypatch.setitem(backends._errors, "nonexistent", "ImportError: nope")
    monkeypatch.setitem(backends._MODULES, "nonexistent", "rnnrec_fast.backends.nonexistent")
    with pytest.raises(RuntimeError, match="not available .*nope"):
        backends.load("nonexistent")


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((4, 0), {}, ValueError, "hidden_size must be greater than zero"),
    ((4, 3), dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
    ((4, 3), dict(dropout=1.5), ValueError, "dropout"),
    ((4.0, 3), {}, TypeError, "input_size should be of type int"),
    ((4, 3), dict(backend="gpu"), ValueError, "backend must be one of"),
    ((4, 3), dict(bias=None), TypeError, "bias should be of type bool, got: NoneType"),
    ((4, 3), dict(bias=0), TypeError, "bias should be of type bool, got: int"),
    ((4, 3), dict(batch_first=1), TypeError, "batch_first should be of type bool, got: int"),
    ((4, 3), dict(bidirectional=2), TypeError, "bidirectional should be of type bool, got: int"),
    ((4, 3), dict(reset_after="False"), TypeError, "reset_after should be of type bool, got: str"),
])
def test_module_constructor_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rnnrec_fast.GRU(*args, **kwargs)


def test_cell_reset_after_must_be_a_bool():
    with pytest.raises(TypeError, match="reset_after should be of type bool, got: int"):
        rnnrec_fast.GRUCell(4, 3, reset_after=0)


@pytest.mark.parametrize("which", ["w_ih", "w_hh", "b_ih", "h0", "x"])
def test_op_arguments_that_are_not_tensors_are_named(which):
    """A None (or a list) where the op wants a tensor: a TypeError naming the argument (a None
    weight reached the dispatcher as an undefined tensor: 'tensor does not have a device')."""
    args = dict(x=torch.randn(3, 2, 4), h0=torch.randn(2, 5), w_ih=torch.randn(15, 4), w_hh=torch.randn(15, 5),
                b_ih=None)
    args[which] = [1.0] if which in ("b_ih", "h0", "x") else None
    with pytest.raises(TypeError, match=f"{which} must be a tensor"):
        rnnrec_fast.recurrence(**args)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_bare_op_calls_name_a_tensor_given_as_none(backend, mode):
    """torch.ops calls of both ops with None for each tensor they require: a TypeError naming it,
    from the autograd kernels and the kernels below them alike, on every backend (it was torch's
    'tensor does not have a device' through autograd, an AttributeError from the Python kernels,
    and 'grad_output must be a torch.float32 tensor of shape (3, 2, 5), got torch.UNKNOWN_SCALAR
    (0,)' below autograd)."""
    T, B, I, H = 3, 2, 4, 5
    w = dict(x=torch.randn(T, B, I), h0=torch.randn(B, H), w_ih=torch.randn(3 * H, I), w_hh=torch.randn(3 * H, H))
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(w["x"], w["h0"], w["w_ih"], w["w_hh"], None, None, None, None,
                                                  "gru", True, backend)
    if mode == "grad":
        w = {k: v.clone().requires_grad_() for k, v in w.items()}
    ctx = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    fwd = dict(w)
    bwd = dict(grad_output=torch.randn(T, B, H), grad_h_n=torch.randn(B, H), **w, output=y, workspace=ws)
    for name in ("x", "w_ih", "w_hh"):
        a = {**fwd, name: None}
        with ctx(), pytest.raises(TypeError, match=f"^rnnrec_fast.recurrence: {name} must be a tensor, got None$"):
            torch.ops.rnnrec_fast.recurrence(a["x"], a["h0"], a["w_ih"], a["w_hh"], None, None, None, None, "gru",
                                             True, backend)
    for name in ("grad_output", "grad_h_n", "x", "w_ih", "w_hh", "output", "workspace"):
        a = {**bwd, name: None}
        with ctx(), pytest.raises(TypeError, match=f"^rnnrec_fast.recurrence: {name} must be a tensor, got None$"):
            torch.ops.rnnrec_fast.recurrence_backward(a["grad_output"], a["grad_h_n"], a["x"], a["h0"], a["w_ih"],
                                                      a["w_hh"], None, None, None, None, a["output"],
                                                      a["workspace"], "gru", True, backend)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_constructor_positional_order_and_proj_size_as_torch(kind):
    """torch.nn.RNNBase's positional order has proj_size (LSTM's) before device and dtype, and
    torch.nn.GRU / RNN refuse a proj_size keyword, even 0, with a ValueError."""
    pre = (4, 5, 1) + (("relu",) if kind == "RNN" else ()) + (True, False, 0.0, False)
    for cls in (getattr(torch.nn, kind), getattr(rnnrec_fast, kind)):
        m = cls(*pre, 0, "cpu", torch.float64)
        assert m.weight_hh_l0.dtype == torch.float64 and m.proj_size == 0
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
            cls(4, 5, proj_size=0)
        with pytest.raises(ValueError, match="proj_size should be a positive integer or zero"):
            cls(*pre, -1)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        getattr(rnnrec_fast, kind)(*pre, 2)  # (torch.nn builds a GRU with proj_size=2 that fails later)


def test_module_forward_errors():
    gru = rnnrec_fast.GRU(4, 3, num_layers=2)
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        gru(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="input.size\\(-1\\) must be equal to input_size"):
        gru(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="Expected hidden size"):
        gru(torch.randn(2, 3, 4), torch.randn(1, 3, 3))
    with pytest.raises(ValueError, match="hx should also be 3-D"):
        gru(torch.randn(2, 3, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="dtype"):
        gru(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="Tensor or PackedSequence"):
        gru([[1.0, 2.0]])
    with pytest.raises(ValueError, match="resets must be a bool tensor"):
        gru(torch.randn(2, 3, 4), resets=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="Expected hidden to be 2D"):
        rnnrec_fast.GRUCell(4, 3)(torch.randn(2, 4), torch.randn(3))
    with pytest.raises(ValueError, match="inconsistent input_size"):
        rnnrec_fast.RNNCell(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        rnnrec_fast.RNN(4, 3, nonlinearity="sigmoid")


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_lstm_style_state_pair_is_refused_by_name(kind, grad):
    """An LSTM's (h, c) pair given as hx (a model migrated from nn.LSTM) is a TypeError naming hx,
    with or without autograd (it was "'tuple' object has no attribute 'dtype'" from the autocast
    check, which read hx before its type was checked; torch.nn's is as obscure)."""
    m = getattr(rnnrec_fast, kind)(4, 3)
    h = torch.zeros(1, 2, 3)
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=r"hx must be a Tensor, got tuple .*LSTM"):
        m(torch.randn(5, 2, 4), (h, h))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_module_rejects_sparse_and_mkldnn_tensors(backend, grad):
    """Tensors of another layout get the module's clear error with and without autograd (the fast
    paths decline them), not a conversion failure or a dispatcher message. (A cell whose backend
    is left to choose runs torch.nn's cell operator on a sparse input: test_modules.py.)"""
    seq = rnnrec_fast.GRU(4, 3, backend=backend)
    cell = rnnrec_fast.GRUCell(4, 3, backend=backend)
    x, hx = torch.randn(2, 3, 4), torch.randn(1, 3, 3)
    with torch.set_grad_enabled(grad):
        for convert in (torch.Tensor.to_sparse, torch.Tensor.to_mkldnn):
            layout = convert(torch.ones(1)).layout
            with pytest.raises(ValueError, match=f"input must be a dense tensor.*got {layout}"):
                seq(convert(x))
            with pytest.raises(ValueError, match=f"hx must be a dense tensor.*got {layout}"):
                seq(x, convert(hx))
            with pytest.raises(ValueError, match=f"input must be a dense tensor.*got {layout}"):
                cell(convert(x[0]))
            with pytest.raises(ValueError, match=f"hx must be a dense tensor.*got {layout}"):
                cell(x[0], convert(hx[0]))
        assert seq(x, hx)[0].shape == (2, 3, 3)  # and dense ones still run


@pytest.mark.parametrize("backend", cpu_backends())
def test_threads_share_a_module(backend):
    torch.manual_seed(0)
    gru = rnnrec_fast.GRU(8, 16, num_layers=2, batch_first=True, backend=backend)
    inputs = [torch.randn(3, 5 + i % 4, 8) for i in range(16)]
    with torch.no_grad():
        expected = [gru(x) for x in inputs]
    results, errors = [None] * 16, []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    results[i] = gru(inputs[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for (y, h), (ey, eh) in zip(results, expected):
        assert torch.equal(y, ey) and torch.equal(h, eh)


@pytest.mark.parametrize("backend", cpu_backends())
def test_module_errors_torch_raises_as_runtime_error(backend):
    """Where torch.nn raises RuntimeError (sizes, sequence length, hx shape and dtype), the modules
    raise an error that is both a RuntimeError and a ValueError: code written against torch.nn
    (except RuntimeError) and against this package (except ValueError) both catch it, and torch.nn
    itself raises RuntimeError on each of these calls."""
    gru, ref = rnnrec_fast.GRU(4, 3, num_layers=2, backend=backend), torch.nn.GRU(4, 3, num_layers=2)
    cell, ref_cell = rnnrec_fast.GRUCell(4, 3, backend=backend), torch.nn.GRUCell(4, 3)
    calls = [
        (lambda m: m(torch.randn(2, 3, 5)), "input.size\\(-1\\) must be equal to input_size", False),
        (lambda m: m(torch.randn(2, 3, 4), torch.randn(2, 2, 3)), "Expected hidden size", False),
        (lambda m: m(torch.randn(2, 3, 4), torch.randn(2, 3)), "hx should also be 3-D", False),
        (lambda m: m(torch.randn(3, 4), torch.randn(2, 1, 3)), "hx should also be 2-D", False),
        (lambda m: m(torch.randn(0, 3, 4)), "sequence length to be larger than 0", False),
        (lambda m: m(torch.randn(2, 3, 4), torch.randn(2, 3, 3, dtype=torch.float64)),
         "hx has dtype torch.float64 but input has torch.float32", False),
        (lambda m: m(torch.randn(2, 5)), "inconsistent input_size", True),
        (lambda m: m(torch.randn(2, 4), torch.randn(3, 3)), "Input batch size 2 doesn't match hidden0 batch size 3",
         True),
        (lambda m: m(torch.randn(2, 4), torch.randn(2, 3, dtype=torch.float64)),
         "hx has dtype torch.float64 but input has torch.float32", True),
        (lambda m: m(torch.randn(2, 4), torch.randn(2, 5)), "hidden0 has inconsistent hidden_size: got 5, expected 3",
         True),
        (lambda m: m(torch.randn(4), torch.randn(1, 3)), "Expected hidden to be 1D, got 2D", True),
        (lambda m: m(torch.randn(2, 4, dtype=torch.float64)), "weight_ih has dtype torch.float32 but the input has torch.float64", True),
        (lambda m: m(torch.randint(0, 3, (2, 4))), "weight_ih has dtype torch.float32 but the input has torch.int64", True),
    ]
    for call, match, is_cell in calls:
        with pytest.raises(RuntimeError):
            call(ref_cell if is_cell else ref)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                with pytest.raises(RuntimeError, match=match) as info:
                    call(cell if is_cell else gru)
                assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_op_checks_its_own_arguments(backend):
    """recurrence_backward is public: a gradient, saved output or workspace of the wrong shape or
    dtype gets a clear error on every backend (the kernels read them by shape: the numba one read
    past a too-narrow workspace and returned garbage)."""
    torch.manual_seed(0)
    T, B, I, H = 3, 2, 4, 5
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    w_ih, w_hh, b_ih, b_hh = torch.randn(3 * H, I), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, "gru", True, backend)
    good = dict(grad_y=torch.randn(T, B, H), grad_h_n=torch.randn(B, H), y=y, ws=ws)

    def call(**kw):
        a = {**good, **kw}
        return torch.ops.rnnrec_fast.recurrence_backward(a["grad_y"], a["grad_h_n"], x, h0, w_ih, w_hh, b_ih, b_hh,
                                                         None, None, a["y"], a["ws"], "gru", True, backend)

    call()  # the right arguments pass
    for kw, match in [(dict(ws=ws[:, :, :H].contiguous()), "workspace must be a torch.float32 tensor of shape"),
                      (dict(grad_y=torch.randn(T, B, 1)), "grad_output must be a torch.float32 tensor of shape"),
                      (dict(grad_y=good["grad_y"].double()), "grad_output must be a torch.float32 tensor"),
                      (dict(grad_h_n=torch.randn(B + 1, H)), "grad_h_n must be"),
                      (dict(y=y[:-1]), "output must be"),
                      (dict(ws=shrunk(ws.clone(), 0)), "workspace reaches 480 bytes into its storage, which holds 0"),
                      (dict(grad_y=shrunk(torch.randn(T, B, H))), "grad_output reaches 120 bytes into its storage")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)


def test_differentiable_backward_op_checks_its_arguments():
    """recurrence_backward_differentiable is public too (what a backward with create_graph=True
    runs): the forward's checks and the gradients' (from a review: lengths out of range, float
    lengths, a broadcast bias, a float32 gradient beside float64 inputs ran silently; mode 'lstm',
    a mis-shaped weight or resets failed inside torch; with nothing requiring grad any garbage came
    back as zero gradients)."""
    T, B, I, H = 4, 3, 5, 6
    f = dict(dtype=torch.float64, requires_grad=True)
    x, h0 = torch.randn(T, B, I, **f), torch.randn(B, H, **f)
    w_ih, w_hh, b_ih, b_hh = torch.randn(3 * H, I, **f), torch.randn(3 * H, H, **f), torch.randn(3 * H, **f), torch.randn(3 * H, **f)
    gy, gh = torch.randn(T, B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    good = dict(gy=gy, gh=gh, x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, lengths=None, resets=None, mode="gru")

    def call(**kw):
        a = {**good, **kw}
        return torch.ops.rnnrec_fast.recurrence_backward_differentiable(
            a["gy"], a["gh"], a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["lengths"], a["resets"],
            a["mode"], True)

    ref = torch.autograd.grad(rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, backend="reference")[:2],
                              (x, h0, w_ih, w_hh, b_ih, b_hh), (gy, gh))
    for got, want in zip(call(), ref):  # the right arguments pass
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for kw, match in [(dict(lengths=torch.tensor([-1, 99, 3])), r"lengths must lie in \[0, T=4\]"),
                      (dict(lengths=torch.tensor([4.0, 1.0, 3.0])), "lengths must be an int64 tensor"),
                      (dict(b_ih=torch.ones(1, **f)), r"b_ih must be \(18,\)"),
                      (dict(gh=gh.float()), "grad_h_n must be a torch.float64 tensor of shape"),
                      (dict(gy=gy[:, :, :2]), "grad_output must be a torch.float64 tensor of shape"),
                      (dict(mode="lstm"), "mode must be one of"),
                      (dict(w_hh=torch.randn(18, 7, **f)), "w_hh must be"),
                      (dict(resets=torch.zeros(1, 3, dtype=torch.bool)), "resets must be a bool tensor of shape"),
                      (dict(x=x.detach().long(), h0=None, w_ih=w_ih.detach(), w_hh=w_hh.detach(), b_ih=None,
                            b_hh=None), "x must be a floating-point tensor")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)


def test_lengths_must_hold_integers():
    x, h0 = torch.randn(3, 2, 4), torch.randn(2, 5)
    w_ih, w_hh = torch.randn(15, 4), torch.randn(15, 5)
    # (complex: from a mutation review, without its check [3+0j, 1+0j] ran as [3, 1])
    for lengths in ([2.9, 1.5], torch.tensor([True, False]), torch.tensor([2.0, 1.0]), [3 + 0j, 1 + 0j]):
        with pytest.raises(ValueError, match="lengths must hold integers"):
            rnnrec_fast.recurrence(x, h0, w_ih, w_hh, lengths=lengths)
    rnnrec_fast.recurrence(x, h0, w_ih, w_hh, lengths=[3, 1])  # Python ints and int tensors pass
    rnnrec_fast.recurrence(x, h0, w_ih, w_hh, lengths=torch.tensor([3, 1], dtype=torch.int32))
    # a list past int64 said 'must be a tensor, got list' (lists are taken; from a review)
    with pytest.raises(ValueError, match="lengths holds a value outside int64's range"):
        rnnrec_fast.recurrence(x, h0, w_ih, w_hh, lengths=[2 ** 70, 1])
    with pytest.raises(TypeError, match="lengths must be a tensor or a sequence of numbers, got str"):
        rnnrec_fast.recurrence(x, h0, w_ih, w_hh, lengths="ab")


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_forced_backend_without_the_dtype_says_so(backend):
    """float16 forced onto a backend that lacks it: the same ValueError from every backend (the C++
    one raised its own RuntimeError), and from the fake kernel too (torch.compile / export)."""
    from rnnrec_fast import backends as _b
    if _b.supports(backend, "cpu", torch.float16):
        pytest.skip(f"{backend} runs float16")
    x, h0 = torch.randn(3, 2, 4).half(), torch.randn(2, 5).half()
    w_ih, w_hh = torch.randn(15, 4).half(), torch.randn(15, 5).half()
    match = f"backend '{backend}' does not support torch.float16"
    with pytest.raises(ValueError, match=match):
        rnnrec_fast.recurrence(x, h0, w_ih, w_hh, backend=backend)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
        fx, fh, fi, fw = (mode.from_tensor(t) for t in (x, h0, w_ih, w_hh))
        torch.ops.rnnrec_fast.recurrence(fx, fh, fi, fw, None, None, None, None, "gru", True, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_module_weight_and_packed_errors_name_the_problem(backend):
    """Weights replaced after construction are checked by name (a mis-shaped weight_hh was reported
    as a mis-shaped w_ih: the op infers H from w_hh), as errors that are RuntimeErrors like torch.nn's;
    a weight or bias set to None is a TypeError as in torch.nn's GRU (a None bias was dropped silently),
    a cell's None bias no bias, as in torch.nn's cells; a
    malformed PackedSequence is refused before torch's pad_packed_sequence, which aborts the process
    on a negative batch size; meta lengths / resets are named."""
    from torch import nn
    from torch.nn.utils.rnn import PackedSequence

    for grad in (torch.no_grad, torch.enable_grad):
        for make, wname in ((lambda: rnnrec_fast.GRU(3, 5, num_layers=2, backend=backend), "weight_hh_l1"),
                            (lambda: rnnrec_fast.GRUCell(3, 5, backend=backend), "weight_hh")):
            m = make()
            x = torch.randn(4, 2, 3) if isinstance(m, rnnrec_fast.GRU) else torch.randn(2, 3)
            setattr(m, wname, nn.Parameter(torch.randn(12, 4)))
            # (a cell, as torch.nn's, takes its hidden size from weight_hh: its zero state does not fit)
            match = ("hidden0 has inconsistent hidden_size: got 5, expected 4 .*weight_hh has shape \\(12, 4\\)"
                     if wname == "weight_hh" else f"{wname} has shape \\(12, 4\\), expected \\(15, 5\\)")
            with grad(), pytest.raises(RuntimeError, match=match):
                m(x)
            setattr(m, wname, nn.Parameter(torch.randn(15, 5, dtype=torch.float64)))
            with grad(), pytest.raises(RuntimeError, match=f"{wname} has dtype torch.float64 but the input"):
                m(x)
            bname = wname.replace("weight", "bias")
            setattr(m, wname, nn.Parameter(torch.randn(15, 5)))
            m(x)  # whole again
            cell = isinstance(m, rnnrec_fast.GRUCell)
            for name in (bname, wname):
                keep = getattr(m, name)
                setattr(m, name, None)
                if cell and name == bname:  # torch.nn's cells take a None bias as no bias
                    ref = nn.GRUCell(3, 5)
                    ref.load_state_dict(m.state_dict(), strict=False)
                    ref.bias_hh = None
                    with grad():
                        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-6)
                else:
                    with grad(), pytest.raises(TypeError, match=f"{name} must be a Tensor, got NoneType"):
                        m(x)
                setattr(m, name, keep)
    gru = rnnrec_fast.GRU(3, 4, backend=backend)
    bad = [(PackedSequence(torch.randn(3, 3), torch.tensor([3, -1, 1])), "must be non-increasing, the first positive"),
           (PackedSequence(torch.randn(3, 3), torch.tensor([1, 2])), "must be non-increasing, the first positive"),
           (PackedSequence(torch.randn(0, 3), torch.tensor([0, 0])), "must be non-increasing, the first positive"),
           # (a negative last size whose sum fits: the C++ padding's own ValueError was no RuntimeError)
           (PackedSequence(torch.randn(2, 3), torch.tensor([2, 1, -1])), "must be non-increasing, the first positive"),
           (PackedSequence(torch.randn(4, 3), torch.tensor([2, 1])), "sum to its data's 4 rows"),
           (PackedSequence(torch.randn(3, 2, 3), torch.tensor([2, 1])), "data must have 2 dimensions"),
           (PackedSequence(torch.randn(3, 3), torch.tensor([2.0, 1.0])), "1-D int64 CPU tensor")]
    for packed, match in bad:
        with pytest.raises(RuntimeError, match=match):
            gru(packed)
    x = torch.randn(3, 2, 3)
    with pytest.raises(ValueError, match="resets is a meta tensor"):
        gru(x, resets=torch.zeros(3, 2, dtype=torch.bool, device="meta"))
    a = good()
    with pytest.raises(ValueError, match="lengths is a meta tensor"):
        rnnrec_fast.recurrence(a["x"], a["h0"], a["w_ih"], a["w_hh"], lengths=torch.ones(2, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_refuses_lengths_out_of_range_on_every_backend(backend):
    """The backward op, public as the forward, refuses lengths outside [0, T] on every backend
    (the C++ one did; numba and reference ran them as clamped)."""
    a = good()
    T, B, H = 3, 2, 5
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                                  None, None, "gru", True, backend)
    for lengths in ([5, 2], [-3, 2]):
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):
            torch.ops.rnnrec_fast.recurrence_backward(
                torch.randn(T, B, H), torch.randn(B, H), a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"],
                a["b_hh"], torch.tensor(lengths), None, y, ws, "gru", True, backend)


def test_fake_and_meta_kernels_refuse_a_backend_as_the_real_call():
    """Under FakeTensorMode (torch.compile, export) the backward's fake kernel refuses a forced
    backend that the real call refuses, as the forward's does (it traced what fails when it runs);
    on meta tensors an unknown backend name, or a dtype the backend never runs, is refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    a = good()
    T, B, H = 3, 2, 5
    cases = [("bogus", torch.float32, ValueError, "unknown backend 'bogus'"),
             ("numba", torch.float16, ValueError, "does not support torch.float16"),
             # (without the extension, cpp is refused as unavailable before its dtypes are asked)
             ("cpp", torch.float16, *((ValueError, "does not support torch.float16") if rnnrec_fast.backends.available("cpp")
                                      else (RuntimeError, "backend 'cpp' is not available")))]
    if rnnrec_fast.backend_info()["cuda"] != "available":
        cases.append(("cuda", torch.float32, RuntimeError, "backend 'cuda'"))
    for backend, dt, exc, match in cases:
        args = [a[k].to(dt) for k in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")]
        grads = [torch.randn(T, B, H, dtype=dt), torch.randn(B, H, dtype=dt)]
        out = [torch.randn(T, B, H, dtype=dt), torch.empty(T, B, 4 * H, dtype=torch.float32 if dt == torch.float16 else dt)]
        with FakeTensorMode() as mode:
            fa, fg, fo = ([mode.from_tensor(t) for t in ts] for ts in (args, grads, out))
            with pytest.raises(exc, match=match):
                torch.ops.rnnrec_fast.recurrence(*fa, None, None, "gru", True, backend)
            with pytest.raises(exc, match=match):
                torch.ops.rnnrec_fast.recurrence_backward(*fg, *fa, None, None, *fo, "gru", True, backend)
    meta = [a[k].to("meta") for k in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")]
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        torch.ops.rnnrec_fast.recurrence(*meta, None, None, "gru", True, "bogus")
    with pytest.raises(ValueError, match="does not support torch.float16"):
        torch.ops.rnnrec_fast.recurrence(*[t.half() for t in meta], None, None, "gru", True, "numba")
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(*meta, None, None, "gru", True, "cpp")  # (runs nowhere: shapes)
    assert y.shape == (T, B, H) and y.device.type == "meta"


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_python_kernel_refuses_zero_input_size(backend):
    """x with input_size 0 (and a matching (G*H, 0) w_ih) is refused as empty on the Python kernels
    too, not run."""
    with pytest.raises(ValueError, match="x must not be empty"):
        call(backend=backend, x=torch.randn(3, 2, 0), w_ih=torch.randn(15, 0))


@pytest.mark.parametrize("backend", cpu_backends())
def test_b_hh_shape_is_checked(backend):
    """A mis-shaped b_hh (not only b_ih) is refused by name, with a ValueError."""
    with pytest.raises(ValueError, match=r"b_hh must be \(15,\)"):
        call(backend=backend, b_hh=torch.randn(14))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("which", ["h0", "w_hh", "b_ih"])
def test_a_meta_tensor_beside_cpu_inputs_is_refused(backend, which):
    """One input on the meta device beside CPU ones is refused by name (the call would otherwise
    take the fake kernel and return meta tensors, no values)."""
    with pytest.raises(ValueError, match=f"{which} is on meta but x is on cpu; all must be on one device"):
        call(backend=backend, **{which: good()[which].to("meta")})


@pytest.mark.parametrize("backend", cpu_backends())
def test_packed_sequences_pack_padded_sequence_never_builds_run_as_torch_nn(backend):
    """Two hand-built PackedSequence forms that torch.nn runs: batch_sizes ending in zeros (refused
    here before) and sorted_indices None with unsorted_indices given (h_n came back unpermuted:
    torch.nn puts it in unsorted_indices' order; under torch.compile the re-packing failed), from a
    review. Outputs, h_n and gradients as torch.nn's, with and without autograd, one and two
    layers, bidirectional; resets are refused with them (torch.nn has none); a first size of 0 is
    still refused (as torch.nn refuses it)."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    torch.manual_seed(5)
    p = pack_padded_sequence(torch.randn(5, 3, 3), torch.tensor([2, 5, 3]), enforce_sorted=False)
    zeros = torch.cat([p.batch_sizes, torch.zeros(2, dtype=torch.int64)])
    forms = [PackedSequence(p.data, zeros, p.sorted_indices, p.unsorted_indices),
             PackedSequence(p.data, p.batch_sizes, None, p.unsorted_indices),
             PackedSequence(p.data, zeros, None, p.unsorted_indices), PackedSequence(p.data, zeros, None, None)]
    for layers, bidirectional in ((1, False), (2, True)):
        ref = nn.GRU(3, 4, num_layers=layers, bidirectional=bidirectional)
        m = rnnrec_fast.from_torch(ref, backend=backend)
        h0 = torch.randn(layers * (1 + bidirectional), 3, 4)
        for q in forms:
            for h in (None, h0):
                with torch.no_grad():
                    want, got = ref(q, h), m(q, h)
                assert torch.equal(got[0].batch_sizes, q.batch_sizes)
                assert got[0].sorted_indices is q.sorted_indices and got[0].unsorted_indices is q.unsorted_indices
                assert_close(got[0].data, want[0].data, torch.float32, "packed output")
                assert_close(got[1], want[1], torch.float32, "h_n")
                x = q.data.clone().requires_grad_()
                grads = []
                for mod in (ref, m):
                    out = mod(PackedSequence(x, *q[1:]), h)
                    grads.append(torch.autograd.grad(out[0].data.square().sum() + out[1].sum(),
                                                     [x, *mod.parameters()]))
                for a, b in zip(*grads):
                    assert_close(b, a, torch.float32, "gradient")
        with pytest.raises(ValueError, match="resets are taken with a PackedSequence that pack_padded_sequence"):
            rnnrec_fast.GRU(3, 4, backend=backend)(forms[1], resets=torch.zeros(5, 3, dtype=torch.bool))


def test_packed_sequence_with_indices_of_another_batch_is_refused():
    """sorted_indices / unsorted_indices of another size than the batch (batch_sizes[0]) are refused
    by name (the modules permute hx and h_n with them), not run on rows that are not there."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    m = rnnrec_fast.GRU(3, 4)
    good = pack_padded_sequence(torch.randn(3, 3, 3), torch.tensor([2, 3, 1]), enforce_sorted=False)
    for i, name in ((2, "sorted_indices"), (3, "unsorted_indices")):
        fields = list(good)
        fields[i] = torch.arange(2)
        with pytest.raises(ValueError, match=f"{name} must hold one index per sequence"):
            m(PackedSequence(*fields))
    m(good)  # (the well-formed one runs)


def _backend_args(T=3, B=2, I=4, H=5):
    a = good(T=T, B=B, I=I, H=H)
    return [a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None, None, 2, True]


@pytest.mark.skipif(not rnnrec_fast.backends.available("cpp"), reason="needs the C++ extension")
def test_cpp_backend_entry_points_check_memory_and_the_negative_bit():
    """The cpp backend's forward / backward called directly (not through the op, whose dispatcher
    resolves the negative bit and whose checks see a shrunk storage first) refuse a tensor past its
    storage (one of 2000 x 64 x 512 floats read through a 4-byte storage crashed the process) and
    one with the negative bit (its memory holds the values negated: read as it was, the results
    were silently wrong), each with a ValueError naming it."""
    cpp = rnnrec_fast.backends.load("cpp")
    args = _backend_args()
    y, h_n, ws = cpp.forward(*args)
    T, B, H = y.shape
    for i, name in ((0, "x"), (1, "h0"), (2, "w_ih"), (3, "w_hh"), (4, "b_ih")):
        for bad, match in ((shrunk(args[i].clone()), f"{name} reaches"), (torch._neg_view(args[i]), f"{name} has the negative bit")):
            a = list(args)
            a[i] = bad
            with pytest.raises(ValueError, match=match):
                cpp.forward(*a)
    lengths = torch.tensor([3, 2])
    with pytest.raises(ValueError, match="lengths reaches"):
        cpp.forward(*args[:6], shrunk(lengths), *args[7:])
    gy, ghn = torch.randn(T, B, H), torch.randn(B, H)
    bwd = [gy, ghn] + args[:8] + [y, ws] + args[8:]
    cpp.backward(*bwd)  # (the right arguments pass)
    for i, name in ((0, "grad_y"), (1, "grad_h_n"), (10, "y"), (11, "ws")):
        for bad, match in ((shrunk(bwd[i].clone()), f"{name} reaches"), (torch._neg_view(bwd[i]), f"{name} has the negative bit")):
            a = list(bwd)
            a[i] = bad
            with pytest.raises(ValueError, match=match):
                cpp.backward(*a)


@pytest.mark.parametrize("T,B", [(0, 2), (3, 0), (0, 0)])
def test_backend_entry_points_take_no_step_or_no_row(T, B):
    """The compiled backends' forward / backward called directly with no step or no row (the op
    refuses these sizes, and the modules give torch.nn's results without calling them): the cpp
    backward divided by both (SIGFPE: the process died; from an audit); now cpp and numba give
    h_n = h0, grad_h0 = grad_h_n, zero weight and bias gradients, empty outputs."""
    names = [n for n in ("cpp", "numba") if rnnrec_fast.backends.available(n)]
    assert "cpp" in names or not env_flag("RNNREC_FAST_REQUIRE_EXT")
    args = _backend_args(T=T, B=B)
    gy, ghn = torch.randn(T, B, 5), torch.randn(B, 5)
    for name in names:
        be = rnnrec_fast.backends.load(name)
        y, h_n, ws = be.forward(*args)
        assert y.shape == (T, B, 5) and torch.equal(h_n, args[1]), name
        g = be.backward(gy, ghn, *args[:8], y, ws, *args[8:])
        assert g[0].shape == (T, B, 4) and torch.equal(g[1], ghn), name
        for grad, w in zip(g[2:], args[2:6]):
            assert grad.shape == w.shape and not grad.any(), name


def test_numba_backend_entry_points_check_the_shapes_their_kernels_read_by():
    """The numba backend's forward / backward called directly check the shapes their kernels read
    by without bounds checks: a (1,) lengths for 4M rows crashed the process, and for 64 rows gave
    8 rows of garbage; a (1, 1) resets for T = 2 failed only by luck."""
    pytest.importorskip("numba")
    nb = rnnrec_fast.backends.load("numba")
    args = _backend_args()
    y, h_n, ws = nb.forward(*args)
    T, B, H = y.shape
    for i, bad, match in ((6, torch.tensor([1]), r"lengths must be \(2,\)"), (7, torch.zeros(1, 1, dtype=torch.bool), r"resets must be \(3, 2\)"),
                          (1, torch.randn(3, 5), r"h0 must be \(2, H\)"), (3, torch.randn(15, 4), r"w_hh must be \(15, 5\)"),
                          (2, torch.randn(15, 3), r"w_ih must be \(15, 4\)"), (5, torch.randn(14), r"b_hh must be \(15,\)")):
        a = list(args)
        a[i] = bad
        with pytest.raises(ValueError, match=match):
            nb.forward(*a)
    gy, ghn = torch.randn(T, B, H), torch.randn(B, H)
    bwd = [gy, ghn] + args[:8] + [y, ws] + args[8:]
    nb.backward(*bwd)  # (the right arguments pass)
    for i, bad, match in ((0, gy[:, :1], "grad_y must be"), (1, ghn[:1], "grad_h_n must be"), (10, y[:2], "y must be"),
                          (11, ws[..., :H], "ws must be"), (8, torch.tensor([1]), "lengths must be")):
        a = list(bwd)
        a[i] = bad
        with pytest.raises(ValueError, match=match):
            nb.backward(*a)
    # one dtype (from a review: float64 weights beside a float32 x gave float32 results, no error)
    for i, name in ((1, "h0"), (2, "w_ih"), (3, "w_hh"), (4, "b_ih")):
        a = list(args)
        a[i] = a[i].double()
        with pytest.raises(ValueError, match=f"{name} must have x's dtype torch.float32, got torch.float64"):
            nb.forward(*a)
    for i, name in ((0, "grad_y"), (11, "ws")):
        a = list(bwd)
        a[i] = a[i].double()
        with pytest.raises(ValueError, match=f"{name} must have x's dtype torch.float32"):
            nb.backward(*a)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("attr,value,match", [
    ("hidden_size", 9, r"weight_ih_l0 has shape \(\d+, 5\), expected \(\d+, 5\) for input_size=5, hidden_size=9"),
    ("num_layers", 2, r"num_layers=2, bidirectional=False but the module holds 1 layer"),
    ("bidirectional", True, r"num_layers=1, bidirectional=True but the module holds 1 layer"),
    ("input_size", 6, r"input.size\(-1\) must be equal to input_size"),
])
def test_sizes_changed_after_construction_are_refused_on_both_paths(kind, grad, attr, value, match):
    """Sizes set on a module after construction (its weights are made there) make its call raise,
    as torch.nn's does (a RuntimeError; ours also a ValueError), with autograd and without: the
    inference fast path ran with the weights' own sizes (hidden_size), the general path raised an
    IndexError (num_layers, bidirectional). Setting the size back makes it work again."""
    m = getattr(rnnrec_fast, kind)(5, 7)
    x = torch.randn(3, 4, 5)
    old = getattr(m, attr)
    setattr(m, attr, value)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=match) as info:
        m(x)
    assert isinstance(info.value, ValueError)
    setattr(m, attr, old)
    with torch.set_grad_enabled(grad):
        assert m(x)[0].shape == (3, 4, 7)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_weights_changed_to_other_sizes_are_refused(grad):
    """Weights replaced by ones of other sizes (all four of a layer, consistent among themselves)
    make the call raise as torch.nn's does, with autograd and without (the inference fast path ran
    with the new weights' sizes: a (5, 3, 20) output from a GRU(8, 10), from a review); weights that
    fit again bring the fast path back."""
    x = torch.randn(5, 3, 8)
    m = rnnrec_fast.GRU(8, 10)
    kept = {n: getattr(m, n) for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
    for n, shape in (("weight_ih_l0", (60, 8)), ("weight_hh_l0", (60, 20)), ("bias_ih_l0", (60,)), ("bias_hh_l0", (60,))):
        setattr(m, n, torch.nn.Parameter(torch.randn(shape)))
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=r"weight_ih_l0 has shape \(60, 8\), expected \(30, 8\)"):
        m(x)
    for n, p in kept.items():
        setattr(m, n, p)
    assert m._plan is not None
    with torch.set_grad_enabled(grad):
        assert m(x)[0].shape == (5, 3, 10)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("name,shape", [("bias_ih_l0", (31,)), ("bias_hh_l1", (29,)), ("weight_hh_l1", (30, 11)),
                                        ("bias_hh", (29,))])
def test_a_weight_given_other_sizes_in_place_is_refused(grad, name, shape):
    """A parameter given memory of other sizes in place (`p.data = ...`: the module's __setattr__ does
    not see it) makes the call raise as torch.nn's does, with autograd and without: the inference
    fast path checks every weight's sizes itself (from a mutation review: without its check of a
    bias's length or of a later layer's w_hh columns it ran, reading past the end or across rows)."""
    m = rnnrec_fast.GRUCell(8, 10) if name == "bias_hh" else rnnrec_fast.GRU(8, 10, num_layers=2)
    x = torch.randn(3, 8) if name == "bias_hh" else torch.randn(5, 3, 8)
    getattr(m, name).data = torch.randn(shape)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=rf"{name} has shape \({shape[0]},"):
        m(x)


@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("change", ["input_size", "hidden_size", "hidden_size_hx", "weight_ih", "all_four",
                                    "all_four_hx", "mismatched"])
def test_cells_take_their_sizes_from_their_weights_as_torch_nn(kind, grad, change):
    """torch.nn's cells read their sizes from weight_ih and weight_hh, not from their attributes
    (hidden_size only for the zero state of a call without hx): an input_size set after
    construction changes nothing, a weight surgery that keeps the four weights consistent runs
    (weight_ih for a wider input; a new hidden size with an hx of it), and a call without hx
    whose hidden_size differs from weight_hh's raises. Ours do the same, with the same outputs and
    gradients (both refused these, from a review), on the fast path and the general one."""
    G = 3 if kind == "GRUCell" else 1
    g = torch.Generator().manual_seed(case_seed(kind, grad, change))
    ref = getattr(torch.nn, kind)(3, 4).double()
    ours = rnnrec_fast.from_torch(ref)
    x, hx, weights = torch.randn(2, 3, generator=g, dtype=torch.float64), None, {}
    if change == "weight_ih":
        weights["weight_ih"] = torch.randn(G * 4, 5, generator=g, dtype=torch.float64)
        x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    elif change.startswith("all_four") or change == "mismatched":
        H = 6
        for n, shape in (("weight_ih", (G * H, 3)), ("weight_hh", (G * H, H)), ("bias_ih", (G * H,)),
                         ("bias_hh", (G * H if change != "mismatched" else G * H + 1,))):
            weights[n] = torch.randn(shape, generator=g, dtype=torch.float64)
        if change == "all_four_hx":
            hx = torch.randn(2, H, generator=g, dtype=torch.float64)
    elif change == "hidden_size_hx":
        hx = torch.randn(2, 4, generator=g, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        for n, w in weights.items():
            setattr(m, n, torch.nn.Parameter(w.clone()))
        if change == "input_size":
            m.input_size = 7
        elif change.startswith("hidden_size"):
            m.hidden_size = 5
        xi = x.clone().requires_grad_(grad)
        try:
            with torch.set_grad_enabled(grad):
                out = m(xi, hx)
        except RuntimeError as exc:
            results.append(exc)
            continue
        grads = torch.autograd.grad(out.sum(), [xi, *m.parameters()]) if grad else ()
        results.append((out, grads))
    if isinstance(results[0], Exception) or change == "mismatched":
        assert isinstance(results[1], RuntimeError), results  # (torch.nn's a RuntimeError; ours an InputError)
        if change != "mismatched":  # (torch.nn's error comes from its products there)
            assert str(results[0]) in str(results[1])
        return
    assert not isinstance(results[1], Exception), results[1]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for ours_g, ref_g in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-12, atol=1e-12)


def test_test_switches_read_the_run_time_words_and_refuse_others(monkeypatch):
    """RNNREC_FAST_REQUIRE_EXT and the other test switches read 1 / true / yes / on as set and
    refuse a value that is none of the words (from a review: only "1" was read, so =true skipped the
    tests a missing extension should fail)."""
    for value, want in [("1", True), ("True", True), ("yes", True), ("ON", True), ("", False), ("0", False),
                        ("false", False), ("off", False)]:
        monkeypatch.setenv("RNNREC_FAST_REQUIRE_X", value)
        assert env_flag("RNNREC_FAST_REQUIRE_X") is want, value
    monkeypatch.delenv("RNNREC_FAST_REQUIRE_X")
    assert env_flag("RNNREC_FAST_REQUIRE_X") is False
    monkeypatch.setenv("RNNREC_FAST_REQUIRE_X", "2")
    with pytest.raises(ValueError, match="RNNREC_FAST_REQUIRE_X='2' is none of"):
        env_flag("RNNREC_FAST_REQUIRE_X")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_packed_sequence_of_no_steps_is_refused_by_name(backend, grad):
    """A PackedSequence with empty batch_sizes (no steps at all) is refused with the module's
    message, a RuntimeError as torch.nn's (torch.nn: 'index 0 is out of bounds'), not an IndexError
    from reading its first batch size."""
    from torch.nn.utils.rnn import PackedSequence

    gru = rnnrec_fast.GRU(3, 4, backend=backend)
    packed = PackedSequence(torch.randn(0, 3), torch.zeros(0, dtype=torch.int64))
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="batch_sizes must be a non-empty 1-D int64"):
        gru(packed)


@pytest.mark.parametrize("reset_after", [True, False])
def test_rnn_refuses_reset_after_by_name(reset_after):
    """reset_after is a GRU form: an RNN given it (either value) is a TypeError saying so, not
    a keyword taken and silently ignored."""
    with pytest.raises(TypeError, match="^RNN: reset_after applies to GRU only$"):
        rnnrec_fast.RNN(4, 3, reset_after=reset_after)
    with pytest.raises(TypeError, match="^RNN: reset_after applies to GRU only$"):
        rnnrec_fast.RNN(4, 3, 1, "relu", reset_after=reset_after)
    assert rnnrec_fast.GRU(4, 3, reset_after=reset_after).reset_after is reset_after


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_resets_are_refused_by_a_bidirectional_module(backend, grad):
    """resets (a state restart at a step) have no meaning for the reverse direction: a
    bidirectional module refuses them by name, whatever the input's form, rather than restarting
    the reverse pass at the wrong steps."""
    gru = rnnrec_fast.GRU(3, 4, bidirectional=True, backend=backend)
    with torch.set_grad_enabled(grad):
        for x, r in ((torch.randn(5, 2, 3), torch.zeros(5, 2, dtype=torch.bool)),
                     (torch.randn(5, 3), torch.zeros(5, dtype=torch.bool))):
            with pytest.raises(ValueError, match="^GRU: resets are not defined for a bidirectional model$"):
                gru(x, resets=r)


def test_meta_resets_and_lengths_are_taken_beside_meta_inputs():
    """A meta tensor of resets or lengths is refused only beside real inputs (no values to read): a
    model on the meta device (shape propagation, deferred initialisation) takes them, and gives
    meta outputs of the right shapes."""
    gru = rnnrec_fast.GRU(3, 4, device="meta")
    y, h = gru(torch.randn(5, 2, 3, device="meta"), resets=torch.zeros(5, 2, dtype=torch.bool, device="meta"))
    assert y.is_meta and y.shape == (5, 2, 4) and h.shape == (1, 2, 4)
    w = [torch.randn(12, 3, device="meta"), torch.randn(12, 4, device="meta")]
    y, h = rnnrec_fast.recurrence(torch.randn(5, 2, 3, device="meta"), None, *w,
                                  lengths=torch.ones(2, dtype=torch.long, device="meta"))
    assert y.is_meta and y.shape == (5, 2, 4) and h.shape == (2, 4)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_a_weight_on_another_device_than_the_input_is_named(kind, grad):
    """A weight moved to another device than the input's (meta: there on every machine) is the
    module's error naming the weight, a RuntimeError as torch.nn's, not the op's plain ValueError
    naming its own argument (w_hh)."""
    from torch import nn

    m = getattr(rnnrec_fast, kind)(3, 4)
    name = "weight_hh_l0" if kind == "GRU" else "weight_hh"
    setattr(m, name, nn.Parameter(torch.randn(12, 4, device="meta")))
    x = torch.randn(5, 2, 3) if kind == "GRU" else torch.randn(2, 3)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError,
                                                     match=f"{kind}: {name} is on meta but the input is on cpu"):
        m(x)

"""The op under torch.compile(fullgraph=True), torch.export, AOTInductor and TorchScript, matching eager."""
import contextlib
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch._dynamo
import torch._inductor
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnrec_fast
from rnnrec_fast._checks import env_flag


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.gru = rnnrec_fast.GRU(8, 16, num_layers=2, batch_first=True)
        self.out = nn.Linear(16, 50)

    def forward(self, items):
        y, h = self.gru(self.emb(items))
        return self.out(y), h


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    """Forward and backward compiled, the default backend (inductor) included: it checks the
    backward's gradient strides against the fake kernel's (a batch_first GRU's input gradient).
    Inductor's caches are off: a graph compiled by an earlier run would hide a changed fake kernel."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = Model()
    items = torch.randint(0, 50, (4, 7))
    eager_logits, eager_h = model(items)
    eager_grads = torch.autograd.grad(eager_logits.logsumexp(-1).sum() + eager_h.sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with inductor_config.patch(force_disable_caches=True):
        logits, h = compiled(items)
        grads = torch.autograd.grad(logits.logsumexp(-1).sum() + h.sum(), list(model.parameters()))
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, eager_h, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_compiled_autograd_runs_the_backward_of_an_eager_call():
    """Compiled autograd (torch._dynamo.compiled_autograd) over the backward of eager calls: the
    gradients of the eager backward (the C++ autograd marked the workspace non-differentiable,
    which compiled autograd refuses for C++ functions: an INTERNAL ASSERT that asked the user to
    report a PyTorch bug). The workspace output takes no gradient either way."""
    from torch._dynamo import compiled_autograd

    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable  # (older torch)
    torch.manual_seed(3)
    mods = [rnnrec_fast.GRU(3, 4, num_layers=2), rnnrec_fast.RNN(3, 4, nonlinearity="relu"), rnnrec_fast.GRUCell(3, 4)]
    for m in mods:
        x = torch.randn(5, 2, 3) if not isinstance(m, rnnrec_fast.GRUCell) else torch.randn(2, 3)
        grads = []
        for compiled in (False, True):
            torch._dynamo.reset()
            xx = x.clone().requires_grad_()
            params = list(m.parameters())
            for p in params:
                p.grad = None
            ctx = enable(torch.compile(backend="aot_eager")) if compiled else contextlib.nullcontext()
            try:
                with ctx:
                    out = m(xx)
                    out = out[0] if isinstance(out, tuple) else out
                    (out * out).sum().backward()
            except RuntimeError as e:  # torch 2.4 and 2.6: their compiled autograd refuses C++ autograd functions
                if ("compiled_args not implemented for non-traceable node: torch::autograd::CppNode" in str(e)
                        or "Attempting to trace a potentially unsafe C++ autograd function" in str(e)):
                    pytest.skip("this torch's compiled autograd takes no C++ autograd function (CppNode)")
                raise
            grads.append([xx.grad] + [p.grad for p in params])
        for g, e in zip(*grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 2, 4, requires_grad=True)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, None, torch.randn(12, 4), torch.randn(12, 4), None, None,
                                                  None, None, "gru", True, "auto")
    assert y.requires_grad and not ws.requires_grad and ws.grad_fn is None


def test_torch_compile_inductor_inference():
    torch.manual_seed(0)
    model = Model().eval()
    items = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        expected = model(items)[0]
        got = torch.compile(model, fullgraph=True)(items)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_torch_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Model().eval()
    items = torch.randint(0, 50, (2, 5))
    ep = torch.export.export(model, (items,))
    assert any("rnnrec_fast.recurrence" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(items)[0], model(items)[0])
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    torch.save(items, tmp_path / "items.pt")
    torch.save(model(items)[0].detach(), tmp_path / "expected.pt")
    code = (
        "import torch, rnnrec_fast, sys\n"
        f"ep = torch.export.load({str(path)!r})\n"
        f"items = torch.load({str(tmp_path / 'items.pt')!r})\n"
        f"exp = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "torch.testing.assert_close(ep.module()(items)[0], exp)\n"
        "print('fresh-process-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert "fresh-process-ok" in out.stdout


def test_torchscript_script_and_trace():
    @torch.jit.script
    def scripted(x, h0, w_ih, w_hh):
        y, h, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, None, None, None, None, "gru", True, "auto")
        return y, h

    x, h0 = torch.randn(3, 2, 4), torch.randn(2, 5)
    w_ih, w_hh = torch.randn(15, 4), torch.randn(15, 5)
    y, h = scripted(x, h0, w_ih, w_hh)
    ey, eh = rnnrec_fast.recurrence(x, h0, w_ih, w_hh)
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(h, eh)

    model = Model().eval()
    items = torch.randint(0, 50, (2, 5))
    traced = torch.jit.trace(model, (items,))
    assert "rnnrec_fast::recurrence" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(items)[0], model(items)[0])


@pytest.mark.parametrize("kind,kw,x_shape,h_shape", [
    ("GRU", dict(num_layers=2), (5, 2, 3), (2, 2, 4)),
    ("RNN", dict(batch_first=True, bidirectional=True), (2, 5, 3), (2, 2, 4)),
    ("GRU", {}, (5, 2, 3), None),
    ("GRUCell", {}, (2, 3), (2, 4)),
    ("RNNCell", {}, (2, 3), None),
])
def test_jit_trace_warns_only_where_the_trace_depends_on_a_size(kind, kw, x_shape, h_shape):
    """Under torch.jit.trace the modules' input checks, which only decide whether to raise, add no
    "converting a tensor to a Python boolean" TracerWarning (the weights' shapes gave one per
    weight: 12 for a 2-layer GRU, against torch.nn's 4); the ones left are ops.is_zero's: the empty
    batch's branch, which picks what the trace records, and the sequence-length check. The
    sequence modules warn less than torch.nn's."""
    torch.manual_seed(0)
    args = (torch.randn(*x_shape),) + ((torch.randn(*h_shape),) if h_shape else ())
    counts = []
    for m in (getattr(rnnrec_fast, kind)(3, 4, **kw), getattr(nn, kind)(3, 4, **kw)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = torch.jit.trace(m, args, check_trace=False)
        tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        counts.append(len(tracer))
        if isinstance(m, (rnnrec_fast.RNN, rnnrec_fast.GRU, rnnrec_fast.RNNCell, rnnrec_fast.GRUCell)):
            assert all(w.filename.endswith(os.path.join("rnnrec_fast", "ops.py")) for w in tracer), \
                [(w.filename, w.lineno) for w in tracer]
            torch.testing.assert_close(traced(*args), m(*args))
    if "Cell" not in kind:
        assert counts[0] < counts[1], counts


@pytest.mark.parametrize("kind,shapes", [("GRU", [(6, 3, 4), (1, 2, 5)]), ("GRU", [(6, 3, 4), (2, 3, 5)]),
                                         ("GRU", [(6, 3, 3)]), ("GRUCell", [(3, 3)]), ("GRUCell", [(3, 4), (2, 5)]),
                                         ("GRUCell", [(3, 4), (3, 6)])],
                         ids=["hx_batch", "hx_layers", "input_size", "cell_input_size", "cell_batch", "cell_hidden"])
def test_jit_trace_refuses_inputs_of_other_sizes_as_eager(kind, shapes):
    """Under torch.jit.trace, where the sizes the modules compare are 0-dim tensors, an hx of another
    batch or layer count, or an input of another size, is refused by the module's own check with
    eager mode's message, sizes printed as numbers (from a mutation review: ops.sizes_differ taking
    two such tensors as equal let a wrong batch through to the op's message, and a wrong layer count
    to a failed trace check; and the messages printed traced sizes as "tensor(3)")."""
    m = getattr(rnnrec_fast, kind)(4, 5)
    args = tuple(torch.randn(*s) for s in shapes)
    with pytest.raises(RuntimeError) as eager:
        m(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with pytest.raises(RuntimeError) as traced:
            torch.jit.trace(m, args)
    assert str(traced.value) == str(eager.value) and "tensor(" not in str(eager.value), (traced.value, eager.value)
    assert str(eager.value).startswith(f"{kind}: "), eager.value


@pytest.mark.parametrize("kind,x_shape,h_shape", [("GRU", (5, 0, 3), (1, 0, 4)), ("RNN", (5, 0, 3), None),
                                                  ("GRUCell", (0, 3), (0, 4)), ("RNNCell", (0, 3), None)])
def test_compiled_empty_batch_in_one_graph(kind, x_shape, h_shape):
    """A batch of zero rows, which torch.nn accepts and the modules run as the reference math on
    empty tensors (modules._empty_batch), compiles in one graph (fullgraph=True) with torch.nn's
    outputs and weight gradients (the eager-only backend check and last_backend() kept out of the
    trace: in it, dynamo refused the graph, from a mutation check)."""
    torch.manual_seed(0)
    ours = getattr(rnnrec_fast, kind)(3, 4)
    ref = rnnrec_fast.to_torch(ours)
    args = (torch.randn(*x_shape),) + ((torch.randn(*h_shape),) if h_shape else ())
    torch._dynamo.reset()
    got = torch.compile(ours, backend="aot_eager", fullgraph=True)(*args)
    torch._dynamo.reset()
    want = ref(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    grads = [torch.autograd.grad(sum(o.sum() for o in outs), list(m.parameters()), allow_unused=True,
                                 materialize_grads=True) for outs, m in ((got, ours), (want, ref))]
    for (name, _), g, w in zip(ours.named_parameters(), *grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_compiled_python_backend_module_without_grad_in_one_graph(backend, kind, grad_mode):
    """A module on a Python backend (numba, reference) compiled and called without autograd, where
    eagerly its inference plan (_FastPath._call_after) would run: dynamo must trace forward's op
    call instead (tracing the plan, it refused the graph: 'torch.* op returned non-Tensor'; from a
    mutation check), one graph with torch.nn's outputs."""
    from rnnrec_fast import backends

    if not backends.available(backend):
        pytest.skip(f"backend {backend!r} unavailable: {backends.unavailable_reason(backend)}")
    torch.manual_seed(0)
    ours = getattr(rnnrec_fast, kind)(3, 4, backend=backend)
    ref = rnnrec_fast.to_torch(ours)
    x = torch.randn(5, 2, 3) if kind == "GRU" else torch.randn(2, 3)
    torch._dynamo.reset()
    with getattr(torch, grad_mode)():
        got = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
        want = ref(x)
    torch._dynamo.reset()
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


class _PackedModel(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, data, batch_sizes, sorted_indices, unsorted_indices):
        out, h_n = self.rnn(PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices))
        return out.data, h_n


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_jit_trace_of_a_packed_bidirectional_input_replays_on_new_data(kind):
    """torch.jit.trace of a model feeding a PackedSequence to a bidirectional module records ATen's
    padding, per-row reversal and unpadding, not the C++ copies that stand in for them in eager
    calls (a trace cannot see those: with them the traced model replayed values from the trace,
    ~1e110 off, from a mutation check), so it gives torch.nn's outputs on other data of the same
    lengths."""
    torch.manual_seed(23)
    ours = getattr(rnnrec_fast, kind)(3, 4, bidirectional=True, dtype=torch.float64)
    ref = getattr(nn, kind)(3, 4, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    lengths = torch.tensor([5, 2, 4])
    first, other = (pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), lengths, enforce_sorted=False)
                    for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_PackedModel(ours), tuple(first), check_trace=False)
    got = traced(*other)
    out, h_n = ref(other)
    torch.testing.assert_close(got[0], out.data, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], h_n, rtol=1e-10, atol=1e-12)


class _PackedEncoder(nn.Module):
    """The usual variable-length encoder: pack, the recurrent module, pad back."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        y, h_n = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])[0], h_n


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_jit_trace_of_a_packed_input_takes_other_batch_sizes(kind):
    """A traced variable-length encoder (pack_padded_sequence, the module, pad_packed_sequence) runs
    on batches larger and smaller than the trace's example, as torch.nn's traced one does, and so
    does its saved and loaded form: the padding read the batch size from batch_sizes' values, a
    trace constant ('index_copy_(): Number of indices (9) should be equal to source.size(dim) (10)'
    at one more row; a review). Gradients through the traced model too."""
    import io

    torch.manual_seed(31)
    ours = getattr(rnnrec_fast, kind)(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    ref = getattr(nn, kind)(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    example = (torch.randn(3, 4, 5, dtype=torch.float64), torch.tensor([4, 2, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_PackedEncoder(ours), example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for lengths in ([4, 1, 3, 2, 4], [2, 4], [4, 4, 1, 2, 3, 1, 4]):
        x = torch.randn(len(lengths), 4, 5, dtype=torch.float64)
        want = _PackedEncoder(ref)(x, torch.tensor(lengths))
        for model in (traced, loaded):
            xg = x.clone().requires_grad_()
            got = model(xg, torch.tensor(lengths))
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
            gx, = torch.autograd.grad(got[0].sum() + got[1].square().sum(), xg)
            xr = x.clone().requires_grad_()
            ref_out = _PackedEncoder(ref)(xr, torch.tensor(lengths))
            wx, = torch.autograd.grad(ref_out[0].sum() + ref_out[1].square().sum(), xr)
            torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_jit_trace_of_a_packed_input_takes_other_sequence_lengths(kind):
    """A traced variable-length encoder runs on batches whose longest sequence is longer or shorter
    than the trace example's, as torch.nn's traced one does: the padding's number of steps is read
    from batch_sizes' shape inside the trace, not recorded as a constant (a constant failed in the
    TorchScript interpreter at a longer sequence)."""
    torch.manual_seed(37)
    ours = getattr(rnnrec_fast, kind)(3, 4, batch_first=True, dtype=torch.float64)
    ref = getattr(nn, kind)(3, 4, batch_first=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    example = (torch.randn(3, 4, 3, dtype=torch.float64), torch.tensor([4, 2, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_PackedEncoder(ours), example, check_trace=False)
    for lengths in ([6, 2, 3], [2, 1]):
        x = torch.randn(len(lengths), max(lengths), 3, dtype=torch.float64)
        with torch.no_grad():
            got, want = traced(x, torch.tensor(lengths)), _PackedEncoder(ref)(x, torch.tensor(lengths))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


class _CellModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = rnnrec_fast.GRUCell(8, 16)
        self.rnn = rnnrec_fast.RNN(16, 16, nonlinearity="relu")

    def forward(self, x, h):
        h = self.cell(input=x, hx=h)  # keyword arguments too
        y, h_n = self.rnn(h.unsqueeze(0), hx=h.unsqueeze(0))
        return y, h_n


def test_fx_symbolic_trace_keeps_modules_as_leaves():
    """torch.fx.symbolic_trace records each module as one call_module node, as it does torch.nn's
    RNN modules (their forward branches on the input and cannot be traced through): the graph
    module gives the model's results, with grad and without."""
    torch.manual_seed(0)
    for model, inputs, names in ((Model(), (torch.randint(0, 50, (2, 5)),), {"gru"}),
                                 (_CellModel(), (torch.randn(3, 8), torch.randn(3, 16)), {"cell", "rnn"})):
        gm = torch.fx.symbolic_trace(model)
        calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        assert names <= calls, calls
        for out, want in zip(gm(*inputs), model(*inputs)):
            torch.testing.assert_close(out, want)
        with torch.inference_mode():
            for out, want in zip(gm(*inputs), model(*inputs)):
                torch.testing.assert_close(out, want)


def test_fx_custom_tracer_sees_the_module_calls():
    """A custom torch.fx Tracer's call_module override runs for these modules too (they are
    recorded through it, as leaves), and the node carries the module stack the tracer keeps."""
    seen = []

    class Recording(torch.fx.Tracer):
        def call_module(self, m, forward, args, kwargs):
            seen.append(self.path_of_module(m))
            return super().call_module(m, forward, args, kwargs)

    model = Model()
    graph = Recording().trace(model)
    assert "gru" in seen
    (node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == "gru"]
    assert "gru" in node.meta.get("nn_module_stack", {})
    gm = torch.fx.GraphModule(model, graph)
    items = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(gm(items)[0], model(items)[0])


@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_torchscript_script_refuses_modules_clearly(kind):
    """torch.jit.script cannot type the modules' forward: a TypeError naming the alternatives, raised
    before the model is touched (its submodule stays the eager module, which still runs)."""
    model = Model() if kind == "GRU" else _CellModel()
    if kind == "RNN":
        model = nn.Sequential(rnnrec_fast.RNN(8, 16))
    if kind == "RNNCell":
        model = nn.Sequential(rnnrec_fast.RNNCell(8, 16))
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="torch.jit.script cannot compile rnnrec_fast's modules.*torch.jit.trace"):
        torch.jit.script(model)
    assert [type(m) for m in model.modules()] == before


def _skip_unless_torch_compiles(what, fn, *args, backend="eager", **compile_kwargs):
    """Skips the test where this torch cannot compile ``fn(*args)`` (a case of torch's own code,
    standing for what the test compiles of ours), naming what and the error; dynamo reset after."""
    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=backend, **compile_kwargs)(*args)
    except Exception as e:  # noqa: BLE001 - whatever dynamo raises there
        pytest.skip(f"this torch cannot compile {what}: {type(e).__name__}")
    torch._dynamo.reset()


def test_packed_sequence_input_compiles_without_extra_graphs():
    """The module's PackedSequence checks read batch_sizes' values only in eager mode: compiled,
    one graph (reading them split it into four)."""
    from torch._dynamo.testing import CompileCounter
    from torch.nn.utils.rnn import pad_packed_sequence

    packed = pack_padded_sequence(torch.randn(5, 3, 3), torch.tensor([5, 3, 2]))
    # torch 2.6's dynamo runs torch's own pad_packed_sequence on fake tensors, which fails
    _skip_unless_torch_compiles("torch's own pad_packed_sequence", lambda p: pad_packed_sequence(p)[0], packed)
    m = rnnrec_fast.GRU(3, 4)
    want = m(packed)[0].data
    # (dynamo does not trace torch's pad_packed_sequence: the call runs past a graph break, eagerly,
    # where the C++ plan would take it whole; put aside, the Python forward runs and is compiled)
    m.__dict__["_plan"] = m.__dict__["_module_call"] = None
    counter = CompileCounter()
    got = torch.compile(lambda p: m(p)[0].data, backend=counter)(packed)
    torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def test_compiled_dropout_of_an_unsorted_packed_sequence_as_torch_nn():
    """Compiled, a PackedSequence is padded in the original batch order (torch's own padding), and
    the dropout between layers still draws its mask over the packed rows in their sorted order, as
    torch.nn's does: under the same seed the same units drop, so outputs and h_n equal torch.nn's
    (the packed rows' places must follow sorted_indices there, unlike the eager C++ padding's)."""
    packed = pack_padded_sequence(torch.randn(6, 4, 3, dtype=torch.float64), torch.tensor([3, 6, 1, 5]),
                                  enforce_sorted=False)
    _skip_unless_torch_compiles("torch's own pad_packed_sequence", lambda p: pad_packed_sequence(p)[0], packed)
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, num_layers=2, dropout=0.5, dtype=torch.float64)
    ours = rnnrec_fast.from_torch(ref)
    ours.__dict__["_plan"] = ours.__dict__["_module_call"] = None  # (the Python forward, compiled)
    compiled = torch.compile(lambda p: ours(p), backend="eager")
    outs = []
    for m in (ref, compiled):
        torch.manual_seed(1)
        with torch.no_grad():
            y, h = m(packed)
        outs.append((y.data, h))
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(outs[0][0], ref.eval()(packed)[0].data)  # (masks were drawn)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_bidirectional_packed_sequence_compiles_without_extra_graphs(grad):
    """A bidirectional module's per-row reversal of a PackedSequence's steps is traced as ATen's
    index ops while compiling, not run as the C++ copy (_C.reverse_padded, which dynamo cannot
    trace: a graph break at each of the reversals); one graph, the eager values."""
    from torch._dynamo.testing import CompileCounter

    packed = pack_padded_sequence(torch.randn(5, 3, 3), torch.tensor([5, 3, 2]))
    _skip_unless_torch_compiles("torch's own pad_packed_sequence", lambda p: pad_packed_sequence(p)[0], packed)
    torch.manual_seed(7)
    m = rnnrec_fast.GRU(3, 4, bidirectional=True)
    with torch.set_grad_enabled(grad):
        want = m(packed)[0].data
        m.__dict__["_plan"] = m.__dict__["_module_call"] = None  # (the Python forward, compiled)
        counter = CompileCounter()
        got = torch.compile(lambda p: m(p)[0].data, backend=counter)(packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind,kw,shape", [("GRU", dict(batch_first=True), (2, 5, 3)), ("GRU", {}, (5, 3)),
                                            ("RNN", dict(batch_first=True, num_layers=2), (2, 5, 3))],
                         ids=["batch_first", "unbatched", "rnn_2_layers_batch_first"])
def test_compiled_output_changed_in_place_gets_torch_nn_gradients(kind, kw, shape):
    """A compiled module's output changed in place before backward() (out.relu_()): torch.nn's
    gradients. Its batch_first and unbatched outputs were views of the sequence output the op saves
    for the backward, and a compiled graph returning such a view loses autograd's check: the
    backward read the changed values (grad_x off by up to 0.6, no error; from a review of the
    compiled paths). Eager raises that check's error instead (README; test_modules)."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4, **kw)
    compiled = torch.compile(rnnrec_fast.from_torch(ref), backend="aot_eager", fullgraph=True)
    x0 = torch.randn(*shape)
    grads = []
    for m in (ref, compiled):
        x = x0.clone().requires_grad_()
        out = m(x)[0].relu_()
        out.pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for got, want in zip(*reversed(grads)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _ActiveSessions(nn.Module):
    """A batch filtered by a mask before the GRU: its size is data-dependent (unbacked) under export."""

    def __init__(self, gru):
        super().__init__()
        self.gru = gru

    def forward(self, x, active):
        return self.gru(x[active])[1]


def test_export_with_a_data_dependent_batch():
    """gru(x[mask]) exports (the size checks guarded on the unknown batch: 'Could not guard on
    data-dependent expression'); the program matches eager on other masks, and a mask that keeps
    no row is refused by the kernel's own check when the program runs."""
    torch.manual_seed(0)
    model = _ActiveSessions(rnnrec_fast.GRU(4, 6, batch_first=True)).eval()
    ep = torch.export.export(model, (torch.randn(3, 5, 4), torch.tensor([True, False, True])))
    x = torch.randn(3, 5, 4)
    for mask in ([True, True, True], [False, True, False], [True, True, False]):
        active = torch.tensor(mask)
        torch.testing.assert_close(ep.module()(x, active), model(x, active), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="must not be empty"):
        ep.module()(x, torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("which", ["b_ih", "h0"])
def test_export_refuses_an_argument_of_another_rank_as_the_eager_call(which):
    """torch.export of an op call given a b_ih of shape (15, 1) for (15,), or an h0 of (2, 5, 1) for
    (2, 5), is refused by the fake kernel's shape check, as the eager call is (from a mutation
    review: ops.sizes_differ comparing the shapes' sizes without their lengths let both through
    while tracing: the program exported and failed only when it ran)."""

    class Call(nn.Module):
        def forward(self, x, h0, w_ih, w_hh, b_ih):
            return torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, None, None, None, "gru", True, "auto")[0]

    args = dict(x=torch.randn(3, 2, 4), h0=torch.randn(2, 5), w_ih=torch.randn(15, 4), w_hh=torch.randn(15, 5),
                b_ih=torch.randn(15))
    args[which] = args[which].unsqueeze(-1)
    match = r"b_ih must be \(15,\), got shape \(15, 1\)" if which == "b_ih" else \
        r"h0 must be \(B, H\) = \(2, 5\), got shape \(2, 5, 1\)"
    with pytest.raises(ValueError, match=match):
        Call()(*args.values())
    with pytest.raises((ValueError, RuntimeError), match=match):  # (torch < 2.5: dynamo's TorchRuntimeError)
        torch.export.export(Call(), tuple(args.values()))


@pytest.mark.skipif(not hasattr(torch._dynamo.decorators, "mark_unbacked"),
                    reason="this torch has no torch._dynamo.decorators.mark_unbacked")
@pytest.mark.parametrize("kind", ["GRU", "GRUCell", "op", "GRU with hx", "GRUCell with hx",
                                  "op with h0, lengths and resets", "GRU with resets"])
def test_compile_with_unbacked_batch_and_time(kind):
    """mark_unbacked on the batch (and time) sizes, the remedy dynamo's recompile log suggests for
    its 0/1 specialisation: one graph serves every size, 1 included, matching eager; with a state,
    lengths and resets too, whose size checks had guarded on the unbacked batch ('Could not guard on
    data-dependent expression', from a review): the kernels check the real sizes as it runs."""
    from torch._dynamo.decorators import mark_unbacked
    from torch.fx.experimental import symbolic_shapes

    torch.manual_seed(0)
    torch._dynamo.reset()
    state = kind.endswith("hx") or kind.startswith("op with") or kind.endswith("resets")
    if state and not hasattr(symbolic_shapes, "guard_or_false"):
        pytest.skip("torch < 2.7 has no guard_or_false: a state's size check beside an unbacked batch guards "
                    "on it (torch.nn.GRUCell's fails alike, on every version)")
    if kind.startswith("op"):
        w = [torch.randn(18, 4), torch.randn(18, 6), torch.randn(18), torch.randn(18)]
        if state:  # (x, h0, lengths, resets), B unbacked in each, T in x and resets
            fn = lambda x, h: rnnrec_fast.recurrence(x, h[0], *w, lengths=h[1], resets=h[2])[0]  # noqa: E731
        else:
            fn = lambda x: rnnrec_fast.recurrence(x, None, *w)[0]  # noqa: E731
        shapes, dims = [(5, 3, 4), (1, 1, 4), (2, 7, 4)], (0, 1)
    elif kind in ("GRU", "GRU with hx"):
        fn = rnnrec_fast.GRU(4, 6, batch_first=True)
        shapes, dims = [(3, 5, 4), (1, 1, 4), (7, 2, 4)], (0, 1)
    elif kind == "GRU with resets":  # (the module's resets check guarded on the batch; a review)
        gru = rnnrec_fast.GRU(4, 6, batch_first=True)
        fn = lambda x, r: gru(x, resets=r)  # noqa: E731
        shapes, dims = [(3, 5, 4), (1, 1, 4), (7, 2, 4)], (0, 1)
    else:
        fn = rnnrec_fast.GRUCell(4, 6)
        shapes, dims = [(3, 4), (1, 4), (9, 4)], (0,)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    for shape in shapes:
        x = torch.randn(*shape)
        for d in dims:
            mark_unbacked(x, d)
        args = (x,)
        if state:
            if kind.startswith("op"):
                T, B = shape[0], shape[1]
                h = (torch.randn(B, 6), torch.randint(1, T + 1, (B,)), torch.rand(T, B) < 0.3)
                for t, ds in zip(h, ((0,), (0,), (0, 1))):
                    for d in ds:
                        mark_unbacked(t, d)
            elif kind.endswith("resets"):  # (B, T), as the batch_first input
                h = torch.rand(shape[0], shape[1]) < 0.3
                for d in (0, 1):
                    mark_unbacked(h, d)
            else:
                h = torch.randn(*(((1,) if kind.startswith("GRU ") else ()) + (shape[0], 6)))
                mark_unbacked(h, h.dim() - 2)
            args = (x, h)
        got, expected = compiled(*args), fn(*args)
        got, expected = (got[0], expected[0]) if isinstance(got, tuple) else (got, expected)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_compile_of_vmap_over_a_module(kind):
    """torch.compile(torch.func.vmap(module), fullgraph=True): dynamo formats the module, which it
    could not while extra_repr used str.format(**self.__dict__)."""
    torch.manual_seed(0)
    # older torch (2.4, 2.6) compiles no vmap over a module, torch.nn's own included
    _skip_unless_torch_compiles("vmap over torch.nn.Linear", torch.func.vmap(nn.Linear(4, 2)), torch.randn(3, 4),
                                fullgraph=True)
    module = getattr(rnnrec_fast, kind)(4, 6)
    xs = torch.randn(3, 5, 2, 4) if kind == "GRU" else torch.randn(3, 2, 4)
    expected = torch.func.vmap(module)(xs)
    got = torch.compile(torch.func.vmap(module), backend="eager", fullgraph=True)(xs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # (GRU: the (output, h_n) pair)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "hessian", "grad_of_grad", "compiled_jvp",
                                       "compiled_jacfwd"])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_torch_func_transforms_of_a_compiled_module(kind, transform):
    """torch.func's forward-mode and second-order transforms of a compiled module (jvp, jacfwd,
    hessian, grad(grad(f))), and jvp / jacfwd inside a compiled function (where a tangent reaches
    the module, traced: ops.op_for takes the op's torch operations, in one graph: fullgraph=True
    failed on the backends' loading lock): torch.nn's answers (the same transform of the eager
    torch.nn twin). (A dual tensor given to a compiled module fails, as for
    torch.nn.Linear: the README says so. The reverse transforms inside a compiled function: below.)"""
    torch.manual_seed(0)
    module = getattr(rnnrec_fast, kind)(4, 5, **({"batch_first": True} if kind == "GRU" else {})).double()
    twin = rnnrec_fast.to_torch(module)
    shape = (2, 3, 4) if kind == "GRU" else (2, 4)
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)

    def apply(m, compiled):
        torch._dynamo.reset()
        out = (lambda x: m(x)[0]) if kind == "GRU" else m
        f = out if "jvp" in transform or "jacfwd" in transform else (lambda x: out(x).square().sum())
        inside = transform.startswith("compiled_")
        f = torch.compile(f, backend="aot_eager") if compiled and not inside else f
        if transform.endswith("jvp"):
            g = lambda x, t: torch.func.jvp(f, (x,), (t,))  # noqa: E731
        elif transform.endswith("jacfwd"):
            g = lambda x, t: torch.func.jacfwd(f)(x)  # noqa: E731
        elif transform == "hessian":
            g = lambda x, t: torch.func.hessian(f)(x)  # noqa: E731
        else:
            g = lambda x, t: torch.func.grad(lambda x: torch.func.grad(f)(x).sin().sum())(x)  # noqa: E731
        # (ours inside a compiled function in one graph: torch.nn.GRU's has graph breaks)
        return (torch.compile(g, backend="aot_eager", fullgraph=m is module) if compiled and inside else g)(x, t)

    try:
        apply(twin, compiled=True)
    except Exception as e:  # noqa: BLE001 - whatever this torch raises there
        pytest.skip(f"this torch cannot run {transform} of a compiled torch.nn.{kind}: {type(e).__name__}")
    expected = apply(twin, compiled=False)
    rnnrec_fast.ops._set_last("cpp")  # (what a call of the op would leave)
    got = apply(module, compiled=True)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert rnnrec_fast.last_backend() == "reference"  # (derivatives the op's autograd does not give)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "hessian", "grad_of_grad", "vmap_of_grad"])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell", "RNN_relu_2_bidirectional"])
def test_torch_func_reverse_transforms_inside_a_compiled_function(kind, transform):
    """torch.compile(fullgraph=True) of a function that calls torch.func's reverse-mode transforms
    on a module (grad, vjp, jacrev, hessian, grad(grad(f)), per-sample vmap(grad(f))): torch.nn's
    answers (the same transform of the eager torch.nn twin) from one graph, the module traced as
    the op's torch operations (ops.op_for). grad, vjp and jacrev failed there ('RuntimeError when
    making fake tensor call': dynamo traced the op at the transform's level, where torch refuses its
    registered autograd). torch.nn's RNN modules compile only with graph breaks (dynamo runs them
    eagerly), torch.nn.GRUCell whole: where this torch cannot compile the transform of a
    torch.nn.GRUCell (torch 2.4: jacrev and hessian, "Cannot access storage of TensorWrapper"), of
    torch operations as ours are here, the test skips."""
    torch.manual_seed(0)
    if kind == "RNN_relu_2_bidirectional":
        module = rnnrec_fast.RNN(4, 5, num_layers=2, bidirectional=True, nonlinearity="relu").double()
    else:
        module = getattr(rnnrec_fast, kind)(4, 5, **({"batch_first": True} if kind == "GRU" else {})).double()
    twin = rnnrec_fast.to_torch(module)
    shape = (2, 4) if kind == "GRUCell" else (3, 2, 4)
    x = torch.randn(shape, dtype=torch.float64)
    bdim = 1 if kind.startswith("RNN") else 0  # (the batch dimension)

    def make(m, cell=kind == "GRUCell"):
        out = m if cell else (lambda x: m(x)[0])
        f = lambda x: out(x).square().sum()  # noqa: E731
        if transform == "grad":
            return lambda x: torch.func.grad(f)(x)
        if transform == "vjp":
            def pulled(x):
                y, pull = torch.func.vjp(out, x)
                return pull(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))[0]
            return pulled
        if transform == "jacrev":
            return lambda x: torch.func.jacrev(out)(x)
        if transform == "hessian":
            return lambda x: torch.func.hessian(f)(x)
        if transform == "grad_of_grad":
            return lambda x: torch.func.grad(lambda x: torch.func.grad(f)(x).sin().sum())(x)
        return lambda x: torch.func.vmap(torch.func.grad(f), in_dims=bdim, out_dims=bdim)(x)  # (unbatched samples)

    if transform == "vmap_of_grad":  # (torch.nn's RNN modules have no batching rule: one sample at a time)
        f = lambda xi: (twin(xi) if kind == "GRUCell" else twin(xi)[0]).square().sum()  # noqa: E731
        expected = torch.stack([torch.func.grad(f)(x.select(bdim, i)) for i in range(x.shape[bdim])], dim=bdim)
    else:
        _skip_unless_torch_compiles(f"{transform} of a torch.nn {kind}", make(twin), x, backend="aot_eager")
        expected = make(twin)(x)
    if kind != "GRUCell" and transform != "vmap_of_grad":
        _skip_unless_torch_compiles(f"{transform} of a torch.nn.GRUCell whole", make(nn.GRUCell(4, 5).double(), True),
                                    torch.randn(2, 4, dtype=torch.float64), backend="aot_eager", fullgraph=True)
    rnnrec_fast.ops._set_last("cpp")  # (what a call of the op would leave)
    torch._dynamo.reset()
    got = torch.compile(make(module), backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert rnnrec_fast.last_backend() == "reference"


def _float64_cell_twin_and_inputs():
    """A float64 GRUCell(3, 4), its torch.nn twin, an input (2, 3) and a state (2, 4); seed 0."""
    torch.manual_seed(0)
    cell = rnnrec_fast.GRUCell(3, 4).double()
    return cell, rnnrec_fast.to_torch(cell), torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)


@pytest.mark.parametrize("case", ["tangent_beside_the_module", "jvp_of_vmap"])
def test_compiled_forward_mode_where_the_module_holds_no_tangent_of_its_own(case):
    """torch.compile of a function calling jvp where the tangent does not reach the module (it
    scales the cell's output), and of jvp over vmap of a cell: torch.nn's answers (the first met a
    wrapped tensor the op refuses; the second read a tangent through a vmap-batched tensor, which
    fails in dynamo's fake run: 'Batching rule not implemented for aten::_unpack_dual'), in one
    graph (fullgraph=True: it broke on the backends' loading lock)."""
    cell, twin, x, h = _float64_cell_twin_and_inputs()

    def make(m):
        if case == "tangent_beside_the_module":
            return (lambda s, ds: torch.func.jvp(lambda s: m(x, h) * s, (s,), (ds,))), \
                (torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        xs = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        return (lambda xs, ts: torch.func.jvp(torch.func.vmap(lambda x: m(x, h)), (xs,), (ts,))), \
            (xs, torch.randn(xs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))

    f, args = make(twin)
    _skip_unless_torch_compiles(f"this jvp of a torch.nn.GRUCell ({case})", f, *args)
    expected = f(*args)
    f, args = make(cell)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_constants_of_the_trace_carry_torchs_own_mark():
    """ops marks the functions dynamo is to call once while tracing as torch's
    assume_constant_result would, without importing torch._dynamo (test_packaging: no sympy at
    import): the marks must be torch's."""
    marked = torch.compiler.assume_constant_result(lambda: True)
    mark = dict(vars(marked))
    assert mark
    for fn in (rnnrec_fast.ops._reference_backend_check, rnnrec_fast.ops._grad_transform_traced):
        assert {k: vars(fn).get(k) for k in mark} == mark, fn.__name__


@pytest.mark.parametrize("case", ["outside_and_inside_jvp", "outside_and_inside_grad",
                                  "jacfwd_of_a_module_compiled_before", "forward_ad_dual_level_inside"])
def test_compiled_function_mixing_transformed_and_plain_calls(case):
    """A compiled function that calls a module both outside a transform and inside it (jvp, grad),
    jacfwd inside a compiled function on a module that was given to torch.compile before, and a
    forward_ad.dual_level opened inside a compiled function around the module's call on a dual
    input: torch.nn's answers in one graph (each failed: 'RuntimeError when making fake tensor
    call' where the op was traced inside the transform or level, the last from a mutation check of
    ops.op_for, and a dynamo assertion, 'Expected attribute mutation for UserFunctionVariable', for
    the module compiled before)."""
    cell, twin, x, h = _float64_cell_twin_and_inputs()

    def make(m):
        if case == "outside_and_inside_jvp":
            return lambda x: m(x, h).sum() + torch.func.jvp(lambda x: m(x, h), (x,), (x.cos(),))[1].sum()
        if case == "outside_and_inside_grad":
            return lambda x: m(x, h) + torch.func.grad(lambda x: m(x, h).square().sum())(x).sum(-1, keepdim=True)
        if case == "forward_ad_dual_level_inside":
            def tangent(x):
                with forward_ad.dual_level():
                    return forward_ad.unpack_dual(m(forward_ad.make_dual(x, x.cos()), h)).tangent
            return tangent
        return lambda x: torch.func.jacfwd(m)(x, h)

    f = make(twin)
    _skip_unless_torch_compiles(f"this function of a torch.nn.GRUCell ({case})", f, x)
    expected = f(x)
    if case == "jacfwd_of_a_module_compiled_before":
        torch.compile(cell, backend="aot_eager")(x, h)  # (dynamo not reset after it)
    got = torch.compile(make(cell), backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_compiled_training_step_with_a_data_dependent_batch_and_no_gradient_into_h_n():
    """A compiled training step whose batch is chosen by a mask (a data-dependent size) and whose
    loss takes the output alone: torch.nn's gradients (the C++ autograd's backward made h_n's zero
    gradient from y.size(), which refuses the unbacked size: GuardOnDataDependentSymNode)."""
    torch.manual_seed(0)
    gru = rnnrec_fast.GRU(3, 4)
    twin = rnnrec_fast.to_torch(gru)
    x, mask = torch.randn(5, 6, 3), torch.tensor([True, False, True, True, False, True])
    cfg = torch._dynamo.config
    if not hasattr(cfg, "capture_dynamic_output_shape_ops"):
        pytest.skip("this torch has no capture_dynamic_output_shape_ops")
    before = cfg.capture_dynamic_output_shape_ops
    cfg.capture_dynamic_output_shape_ops = True
    try:
        torch._dynamo.reset()
        torch.compile(lambda x, m: gru(x[:, m])[0], backend="aot_eager")(x, mask).sum().backward()
    finally:
        cfg.capture_dynamic_output_shape_ops = before
        torch._dynamo.reset()
    twin(x[:, mask])[0].sum().backward()
    for (name, p), q in zip(gru.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _skip_unless_torch_loads_aoti_packages(tmp_path, env):
    """Skips the test where this torch cannot load an AOTInductor package of torch.nn.Linear in a
    fresh process either (torch 2.10's aoti_load_package there: "module 'torch._inductor' has no
    attribute 'codecache'"), naming torch's error."""
    ep = torch.export.export(nn.Linear(3, 2), (torch.randn(1, 3),))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "linear.pt2"))
    code = f"import torch\ntorch._inductor.aoti_load_package({path!r})\n"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        pytest.skip(f"this torch cannot load an AOTInductor package in a fresh process: {lines[-1] if lines else ''}")


_needs_aoti = pytest.mark.skipif(not hasattr(torch._inductor, "aoti_compile_and_package"),
                                 reason="AOTInductor packages need a newer torch")


@_needs_aoti
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="needs a C++ compiler")
def test_aoti_package_runs_in_a_fresh_process_that_imports_the_package(tmp_path):
    """An AOTInductor package of a model holding the modules (dynamic batch and time) runs in a
    fresh process after `import rnnrec_fast`, matching eager; without the import, loading it fails
    with torch's error naming the op (as the README says)."""
    torch.manual_seed(0)
    model = Model().eval()
    items = torch.randint(0, 50, (3, 5))
    B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
    ep = torch.export.export(model, (items,), dynamic_shapes={"items": {0: B, 1: T}})
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    probe = torch.randint(0, 50, (2, 9))
    torch.save(probe, tmp_path / "items.pt")
    torch.save(model(probe)[0].detach(), tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "if sys.argv[1] == 'import':\n"
        "    import rnnrec_fast\n"
        f"runner = torch._inductor.aoti_load_package({path!r})\n"
        f"got = runner(torch.load({str(tmp_path / 'items.pt')!r}))[0]\n"
        f"torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=1e-5, atol=1e-6)\n"
        "print('aoti-ok')\n"
    )
    # TMPDIR: torch's package loader unpacks into a temporary folder it never removes
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path)}
    # the two processes side by side (~6 s each, most of it importing torch)
    ok, bare = (subprocess.Popen([sys.executable, "-c", code, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for how in ("import", "bare"))
    try:
        (ok_out, ok_err), (_, bare_err) = ok.communicate(timeout=300), bare.communicate(timeout=300)
    finally:
        for proc in (ok, bare):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if ok.returncode != 0:
        _skip_unless_torch_loads_aoti_packages(tmp_path, env)
    assert ok.returncode == 0 and "aoti-ok" in ok_out, ok_err[-3000:]
    assert bare.returncode != 0 and "rnnrec_fast::recurrence" in bare_err, bare_err[-3000:]


def _library_or_skip():
    try:
        return rnnrec_fast.library_path()
    except FileNotFoundError:
        if env_flag("RNNREC_FAST_REQUIRE_EXT"):
            raise
        pytest.skip("the library without Python was not built")


def test_library_without_python_defines_the_same_op(tmp_path):
    """librnnrec_fast_ops.so needs no Python (no libtorch_python, no Py* symbol) and, loaded in a
    process that never imports rnnrec_fast, defines the op with the schemas ops.py defines and runs
    its forward and backward (C++ autograd) as the package does; a Python backend or another dtype
    is refused with a clear error there, and importing the package afterwards too. Loaded after
    the package, it leaves the op as it is."""
    path = _library_or_skip()
    if shutil.which("readelf") and shutil.which("nm"):
        needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
        assert "libtorch_python" not in needed and "libpython" not in needed, needed
        undefined = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True,
                                   check=True).stdout.split()
        assert not [s for s in undefined if s.startswith(("Py", "_Py"))]
    from rnnrec_fast import ops

    torch.manual_seed(0)
    x, h0 = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    w = [torch.randn(18, 5, dtype=torch.float64), torch.randn(18, 6, dtype=torch.float64),
         torch.randn(18, dtype=torch.float64), torch.randn(18, dtype=torch.float64)]
    leaves = [t.clone().requires_grad_() for t in (x, h0, *w)]
    y, h = rnnrec_fast.recurrence(*leaves)
    grads = torch.autograd.grad((y * y).sum() + h.sum(), leaves)
    code = (
        "import sys, torch\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "assert 'rnnrec_fast' not in sys.modules\n"
        "op = torch.ops.rnnrec_fast\n"
        "print(op.recurrence.default._schema)\n"
        "print(op.recurrence_backward.default._schema)\n"
        "d = torch.load(sys.argv[2])\n"
        "leaves = [t.clone().requires_grad_() for t in d['inputs']]\n"
        "y, h, ws = op.recurrence(*leaves, None, None, 'gru', True, 'auto')\n"
        "grads = torch.autograd.grad((y * y).sum() + h.sum(), leaves)\n"
        "torch.testing.assert_close(y, d['y'], rtol=1e-12, atol=1e-12)\n"
        "torch.testing.assert_close(h, d['h'], rtol=1e-12, atol=1e-12)\n"
        "for g, e in zip(grads, d['grads']):\n"
        "    torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)\n"
        # no second derivative without the package's Python recomputation: the first-order gradients
        # with create_graph=True, then a clear refusal
        "y, h, ws = op.recurrence(*leaves, None, None, 'gru', True, 'auto')\n"
        "g1 = torch.autograd.grad((y * y).sum() + h.sum(), leaves, create_graph=True)\n"
        "for g, e in zip(g1, d['grads']):\n"
        "    torch.testing.assert_close(g.detach(), e, rtol=1e-12, atol=1e-12)\n"
        "try:\n"
        "    torch.autograd.grad(g1[0].square().sum(), leaves)\n"
        "except NotImplementedError as e:\n"
        "    assert 'in the library without Python, are not supported' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('second derivative not refused')\n"
        "for args in [(*d['inputs'], None, None, 'gru', True, 'numba'),\n"
        "             (*[t.half() for t in d['inputs']], None, None, 'gru', True, 'auto')]:\n"
        "    try:\n"
        "        op.recurrence(*args)\n"
        "    except ValueError as e:\n"
        "        assert 'runs the \\'cpp\\' backend on float32 and float64 CPU tensors only' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('not refused')\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('rnnrec_fast::recurrence', 'CUDA')\n"  # (a clear refusal)
        "try:\n"
        "    import rnnrec_fast\n"
        "except ImportError as e:\n"
        "    assert 'already defined in this process, by librnnrec_fast_ops.so' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('imported over the library')\n"
        "print('standalone-ok')\n"
    )
    data = str(tmp_path / "data.pt")
    torch.save({"inputs": (x, h0, *w), "y": y.detach(), "h": h.detach(), "grads": grads}, data)
    out = subprocess.run([sys.executable, "-c", code, path, data], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    schemas = [torch._C.parse_schema("rnnrec_fast::recurrence" + ops._FWD_SCHEMA),
               torch._C.parse_schema("rnnrec_fast::recurrence_backward" + ops._BWD_SCHEMA)]
    assert lines[:2] == [str(s) for s in schemas]
    assert lines[-1] == "standalone-ok"
    # the other order: loaded after the package it registers nothing (it used to abort the process
    # in its static initialisation: 'Only a single TORCH_LIBRARY ...') and the package runs on
    after = ("import sys, torch, rnnrec_fast\n"
             "torch.ops.load_library(rnnrec_fast.library_path())\n"
             "rnnrec_fast.GRU(4, 5)(torch.randn(3, 2, 4))\n"
             "assert rnnrec_fast.last_backend() == 'cpp'\n"
             "print('after-ok')\n")
    out = subprocess.run([sys.executable, "-c", after], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "after-ok" in out.stdout, out.stderr[-3000:]


_CPP_RUNNER = r"""
#include <dlfcn.h>
#include <iostream>
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
// argv: library ('-' for none), model, B, T: runs the model on items (arange(B*T) % 50).view(B, T);
// a model whose name ends in .pt is a TorchScript one (its first output printed), else an AOTI package
int main(int argc, char** argv) {
  if (std::string(argv[1]) != "-" && !dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << dlerror() << "\n";
    return 2;
  }
  try {
    const std::string model = argv[2];
    const int64_t B = std::stoll(argv[3]), T = std::stoll(argv[4]);
    const at::Tensor items = at::arange(B * T, at::kLong).remainder(50).view({B, T});
    at::Tensor y;
    if (model.size() > 3 && model.substr(model.size() - 3) == ".pt") {
      torch::jit::Module m = torch::jit::load(model);
      y = m.forward({items}).toTuple()->elements()[0].toTensor().contiguous();
    } else {
      torch::inductor::AOTIModelPackageLoader loader(model);
      y = loader.run({items})[0].contiguous();
    }
    std::cout.precision(9);
    for (int64_t i = 0; i < y.numel(); ++i) std::cout << y.data_ptr<float>()[i] << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 3;
  }
  return 0;
}
"""


@_needs_aoti
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_aoti_package_and_torchscript_run_from_a_cpp_program_with_the_library(tmp_path):
    """A libtorch program with no Python at all: it dlopens librnnrec_fast_ops.so, loads an
    AOTInductor package of a model holding the GRU (dynamic batch and time), and a torch.jit.trace
    of it, and matches eager; without the library neither loads."""
    path = _library_or_skip()
    tdir = os.path.dirname(torch.__file__)
    (tmp_path / "run.cpp").write_text(_CPP_RUNNER)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    std = "c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14) else "c++17"  # (as setup.py)
    # the program compiles (~16 s on one core) while the package does
    gxx = subprocess.Popen(["g++", f"-std={std}", "-O1", "run.cpp", "-o", "run",
                            f"-I{tdir}/include", f"-I{tdir}/include/torch/csrc/api/include",
                            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-L{tdir}/lib", f"-Wl,-rpath,{tdir}/lib", "-ltorch",
                            "-ltorch_cpu", "-lc10", "-ldl"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        torch.manual_seed(0)
        model = Model().eval()
        B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
        ep = torch.export.export(model, (torch.randint(0, 50, (3, 5)),), dynamic_shapes={"items": {0: B, 1: T}})
        package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
        gxx_out = gxx.communicate(timeout=300)[0]
    finally:
        if gxx.poll() is None:
            gxx.kill()
            gxx.communicate()
    assert gxx.returncode == 0, gxx_out[-3000:]
    scripted = str(tmp_path / "traced.pt")
    torch.jit.trace(model, (torch.randint(0, 50, (3, 5)),)).save(scripted)
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # (where the loader unpacks the package and leaves it)
    for name, b, t in ((package, 2, 7), (package, 1, 1), (scripted, 2, 7), (scripted, 1, 1)):
        out = subprocess.run([str(tmp_path / "run"), path, name, str(b), str(t)], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        got = torch.tensor([float(v) for v in out.stdout.split()])
        expected = model((torch.arange(b * t) % 50).view(b, t))[0].detach().flatten()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name in (package, scripted):
        bare = subprocess.run([str(tmp_path / "run"), "-", name, "2", "7"], capture_output=True, text=True, timeout=120,
                              env=env)
        assert bare.returncode != 0 and "rnnrec_fast" in bare.stderr, bare.stderr[-3000:]


@pytest.mark.parametrize("embedding", ["shared", 4, 0])
def test_a_multi_layer_gru4rec_with_hidden_dropout_compiles_in_one_graph(embedding):
    """GRU4Rec with 2+ GRU layers and hidden dropout, in eval mode: its step and scoring compile
    with fullgraph=True and export strictly, with eager's answers (its layer stack took the
    module's C++ inference plan while dynamo traced it: 'Dynamo does not know how to trace method
    __call__ of class InferPlan', two graph breaks by default; a review)."""
    from rnnrec_fast.recsys import GRU4Rec
    from rnnrec_fast.serving.export import OneStepScorer

    torch.manual_seed(5)
    m = GRU4Rec(40, layers=(6, 6, 6), embedding=embedding, dropout_hidden=0.25).eval()
    items, h = torch.tensor([1, 2, 3]), m.init_state(3)
    h = torch.randn_like(h)

    def f(items, h):
        y, hn = m(items.unsqueeze(0), h)
        return m.score(hn[-1]).topk(5), hn
    torch._dynamo.reset()
    (vals, idx), hn = torch.compile(f, backend="aot_eager", fullgraph=True)(items, h)
    (want_vals, want_idx), want_hn = f(items, h)
    torch.testing.assert_close(hn, want_hn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vals, want_vals, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, want_idx)
    torch._dynamo.reset()
    ep = torch.export.export(OneStepScorer(m, k=5), (items, h), strict=True)
    for got, want in zip(ep.module()(items, h), OneStepScorer(m, k=5)(items, h)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["grad", "jacrev"])
def test_compiled_transforms_of_the_op_with_lengths_in_one_graph(name):
    """torch.func.grad / jacrev of rnnrec_fast.recurrence with lengths compile with fullgraph=True
    (the lengths' range check read their values while dynamo traced: 'Could not guard on
    data-dependent expression'; a review), with eager's gradients; lengths out of range are still
    refused, by a check in the graph (a RuntimeError when it runs). Where this torch cannot compile
    the transform of a torch.nn.GRUCell (torch 2.4: jacrev, "Cannot access storage of
    TensorWrapper"), of torch operations as the op's are here, the case skips."""
    transform = getattr(torch.func, name)
    torch.manual_seed(41)
    x, w_ih, w_hh = (torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(15, 3, dtype=torch.float64),
                     torch.randn(15, 5, dtype=torch.float64))

    def make(lengths):
        def loss(w_hh):
            return rnnrec_fast.recurrence(x, None, w_ih, w_hh, lengths=lengths)[1].square().sum()
        return loss
    cell = nn.GRUCell(3, 5).double()
    _skip_unless_torch_compiles(f"{name} of a torch.nn.GRUCell whole", transform(lambda h: cell(x[0], h).square().sum()),
                                torch.randn(2, 5, dtype=torch.float64), backend="aot_eager", fullgraph=True)
    loss = make(torch.tensor([4, 2]))
    torch._dynamo.reset()
    got = torch.compile(transform(loss), backend="aot_eager", fullgraph=True)(w_hh)
    torch.testing.assert_close(got, transform(loss)(w_hh), rtol=1e-10, atol=1e-12)
    for bad in ([4, 7], [-1, 2]):  # (past T, and below 0: from a mutation review, the graph's check lacked it)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T\]"):
            torch.compile(transform(make(torch.tensor(bad))), backend="aot_eager", fullgraph=True)(w_hh)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=4\]"):  # (eager: the op's own error)
        transform(make(torch.tensor([4, 7])))(w_hh)
    torch._dynamo.reset()

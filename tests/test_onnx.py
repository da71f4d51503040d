"""ONNX export of models holding the drop-in modules: under torch.onnx.export they call torch.nn's
own operators (torch._VF.gru / rnn_tanh / rnn_relu and the cells'), so a model exports as one
holding torch.nn's modules does: the same ONNX graph, run here with ONNX Runtime on inputs of other
sizes than the export's and compared with torch.nn's twin. What ONNX cannot express (per-step
resets, the GRU's reset_after=False) is refused by name."""
import importlib
import inspect
import io
import re
import warnings

import pytest
import torch
import torch.onnx
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnrec_fast

SEQ_CONFIGS = [
    ("GRU", {}),
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu", "bias": False}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("RNN", {"num_layers": 3, "batch_first": True}),
]
I, H = 6, 7


def _export(model, args, **kw):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the TorchScript-based exporter's deprecation and tracer notes)
        torch.onnx.export(model, args, buf, dynamo=False, **kw)
    return buf.getvalue()


def _ops(blob):
    onnx = pytest.importorskip("onnx")
    return [n.op_type for n in onnx.load_from_string(blob).graph.node]


def _run(blob, feeds):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in feeds.items()})]


@pytest.fixture
def onnx_exporting(monkeypatch):
    """torch.onnx.is_in_onnx_export() true, as during an export (for what needs no onnx package)."""
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)


@pytest.mark.parametrize("kind,kw", SEQ_CONFIGS + [("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"})])
def test_under_export_the_modules_call_torch_nn_operators(kind, kw, onnx_exporting):
    """The traced graph holds torch.nn's operator and none of ours, and gives torch.nn's results
    bit for bit; so does torch.export's non-strict capture (the newer exporter's first)."""
    torch.manual_seed(0)
    ours = getattr(rnnrec_fast, kind)(I, H, **kw).eval()
    twin = rnnrec_fast.to_torch(ours)
    cell = kind.endswith("Cell")
    x = torch.randn(4, I) if cell else torch.randn(3, 4, I)
    traced, traced_twin = (torch.jit.trace(m, (x,), check_trace=False) for m in (ours, twin))
    kinds, twin_kinds = ({n.kind() for n in t.inlined_graph.nodes()} for t in (traced, traced_twin))
    # (the cells' operators are composite: the trace holds what they call, as torch.nn's does; a
    # batch_first input's transpose for our own path is traced, unused: the export drops it)
    assert kinds - {"aten::transpose"} == twin_kinds, (sorted(kinds), sorted(twin_kinds))
    want = "aten::" + ours._op_mode + ("_cell" if cell else "")
    assert cell or want in kinds
    fresh = torch.randn(x.shape)
    for got, ref in zip(*(m(fresh) if not cell else (m(fresh),) for m in (traced, twin))):
        assert torch.equal(got, ref)
    program = torch.export.export(ours, (x,), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert f"aten.{want[6:]}.input" in targets or f"aten.{want[6:]}.default" in targets, sorted(targets)
    assert not any("rnnrec_fast" in t for t in targets), sorted(targets)


@pytest.mark.parametrize("kind,kw", SEQ_CONFIGS)
def test_sequence_modules_export_as_torch_nn_does(kind, kw):
    """A bare module (its forward's three parameters passed by position) exports to the graph
    torch.nn's twin gives (ONNX GRU / RNN nodes), which ONNX Runtime runs on other batch and time
    sizes (dynamic axes) and another h0 with torch.nn's results."""
    torch.manual_seed(1)
    ours = getattr(rnnrec_fast, kind)(I, H, **kw).eval()
    twin = rnnrec_fast.to_torch(ours)
    bf = kw.get("batch_first", False)
    L = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    x, h0 = (torch.randn(2, 3, I) if bf else torch.randn(3, 2, I)), torch.randn(L, 2, H)
    axes = {"x": {0: "batch", 1: "time"} if bf else {0: "time", 1: "batch"}, "h0": {1: "batch"},
            "y": {0: "batch", 1: "time"} if bf else {0: "time", 1: "batch"}, "h_n": {1: "batch"}}
    names = dict(input_names=["x", "h0"], output_names=["y", "h_n"], dynamic_axes=axes)
    blob = _export(ours, (x, h0), **names)
    assert _ops(blob) == _ops(_export(twin, (x, h0), **names))
    assert ("GRU" if kind == "GRU" else "RNN") in _ops(blob)
    # without h0: the zero state sized from the input, as torch.nn's
    names = dict(input_names=["x"], output_names=["y", "h_n"], dynamic_axes={k: axes[k] for k in ("x", "y", "h_n")})
    assert _ops(_export(ours, (x,), **names)) == _ops(_export(twin, (x,), **names))
    x, h0 = (torch.randn(5, 9, I) if bf else torch.randn(9, 5, I)), torch.randn(L, 5, H)
    with torch.no_grad():
        want = twin(x, h0)
    for got, ref in zip(_run(blob, {"x": x, "h0": h0}), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell"])
def test_cells_export_as_torch_nn_does(kind):
    torch.manual_seed(2)
    ours = getattr(rnnrec_fast, kind)(I, H).eval()
    twin = rnnrec_fast.to_torch(ours)
    names = dict(input_names=["x", "h"], output_names=["h1"], dynamic_axes={"x": {0: "b"}, "h": {0: "b"}})
    blob = _export(ours, (torch.randn(2, I), torch.randn(2, H)), **names)
    assert _ops(blob) == _ops(_export(twin, (torch.randn(2, I), torch.randn(2, H)), **names))
    x, h = torch.randn(6, I), torch.randn(6, H)
    with torch.no_grad():
        want = twin(x, h)
    torch.testing.assert_close(_run(blob, {"x": x, "h": h})[0], want, rtol=1e-5, atol=1e-5)


def test_a_model_packing_its_sequences_exports_as_torch_nn_does():
    """pack_padded_sequence (unsorted lengths) -> GRU -> pad_packed_sequence: ONNX's GRU with
    sequence lengths, as for torch.nn's, run with other lengths than the export's."""
    class Model(nn.Module):
        def __init__(self, lib):
            super().__init__()
            self.emb = nn.Embedding(20, I)
            self.gru = lib.GRU(I, H, num_layers=2, batch_first=True)

        def forward(self, items, lengths):
            packed = pack_padded_sequence(self.emb(items), lengths, batch_first=True, enforce_sorted=False)
            out, h_n = self.gru(packed)
            return pad_packed_sequence(out, batch_first=True, total_length=items.shape[1])[0], h_n

    torch.manual_seed(3)
    ref = Model(nn).eval()
    ours = rnnrec_fast.from_torch(ref)
    names = dict(input_names=["items", "lengths"], output_names=["y", "h_n"],
                 dynamic_axes={"items": {0: "b", 1: "t"}, "lengths": {0: "b"}, "y": {0: "b", 1: "t"},
                               "h_n": {1: "b"}})
    args = (torch.randint(0, 20, (3, 6)), torch.tensor([6, 2, 4]))
    blob = _export(ours, args, **names)
    assert _ops(blob) == _ops(_export(ref, args, **names)) and "GRU" in _ops(blob)
    items, lengths = torch.randint(0, 20, (4, 8)), torch.tensor([3, 8, 1, 5])
    with torch.no_grad():
        want = ref(items, lengths)
    for got, r in zip(_run(blob, {"items": items, "lengths": lengths}), want):
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_under_export_a_packed_sequence_with_hx_as_torch_nn(kind, onnx_exporting):
    """Under export, an unsorted PackedSequence with an hx runs torch.nn's packed operator as
    torch.nn's forward calls it: hx taken in the sorted batch order, h_n given back in the input's;
    the traced encoder gives torch.nn's outputs and h_n bit for bit; an hx of another batch is the
    module's error naming the expected hidden size."""
    class Encoder(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x, lengths, hx):
            out, h_n = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
            return pad_packed_sequence(out, total_length=x.shape[0])[0], h_n

    torch.manual_seed(8)
    ours = getattr(rnnrec_fast, kind)(I, H, num_layers=2).eval()
    twin = rnnrec_fast.to_torch(ours)
    args = (torch.randn(5, 3, I), torch.tensor([2, 5, 3]), torch.randn(2, 3, H))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Encoder(ours), args, check_trace=False)
        got, want = traced(*args), Encoder(twin)(*args)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::" + ours._op_mode in kinds, sorted(kinds)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # an hx of another batch is the module's error, by shape (not an index error of the permutation),
    # its sizes as numbers (traced sizes are 0-dim tensors: not "(tensor(2), ...)")
    msg = re.escape(f"Expected hidden size (2, 3, {H}), got (2, 2, {H})")
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(RuntimeError, match=msg):
        warnings.simplefilter("ignore")
        torch.jit.trace(Encoder(ours), args[:2] + (torch.randn(2, 2, H),), check_trace=False)


def test_under_export_a_module_in_training_mode_keeps_its_dropout(onnx_exporting):
    """Exported in training mode (torch.onnx.export's TrainingMode.TRAINING / PRESERVE), the module
    calls torch.nn's operator with its training flag, as torch.nn's forward does: under the same
    seed the traced graph drops the units torch.nn's module drops (not an inference graph)."""
    torch.manual_seed(9)
    ours = rnnrec_fast.GRU(I, H, num_layers=3, dropout=0.5).train()
    twin = rnnrec_fast.to_torch(ours)
    x = torch.randn(4, 3, I)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ours, (x,), check_trace=False)
        torch.manual_seed(1)
        got = traced(x)
        torch.manual_seed(1)
        want = twin(x)
        assert not torch.equal(want[0], twin.eval()(x)[0])  # (units were dropped)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_what_onnx_cannot_express_is_refused_by_name(onnx_exporting):
    """Traced as the TorchScript-based exporter traces (no fast path then)."""
    class Call(nn.Module):
        def __init__(self, module, *args, **kwargs):
            super().__init__()
            self.module, self.args, self.kwargs = module, args, kwargs

        def forward(self, x):
            return self.module(x, *self.args, **self.kwargs)

    x = torch.randn(3, 2, I)
    resets = torch.zeros(3, 2, dtype=torch.bool)
    gru = rnnrec_fast.GRU(I, H)
    for call in (Call(gru, resets=resets), Call(gru, None, resets)):
        with pytest.raises(ValueError, match="resets cannot be exported to ONNX"):
            torch.jit.trace(call, (x,), check_trace=False)
    for m, arg in ((rnnrec_fast.GRU(I, H, reset_after=False), x), (rnnrec_fast.GRUCell(I, H, reset_after=False), x[0])):
        with pytest.raises(ValueError, match=r"reset_after=False\), the original GRU form, cannot be exported"):
            torch.jit.trace(Call(m), (arg,), check_trace=False)
    for kw in ({"resets": resets[:, :1]}, {"lengths": torch.tensor([3])}, {"reset_after": False}):
        with pytest.raises(ValueError, match="cannot be exported to ONNX"):
            torch.jit.trace(lambda x: rnnrec_fast.ops.recurrence(x, None, gru.weight_ih_l0, gru.weight_hh_l0, **kw),
                            (x[:, :1],), check_trace=False)


def test_calls_outside_the_export_are_left_alone(onnx_exporting):
    """torch.onnx's flag is process-wide: while one thread exports, another's calls (neither traced
    nor under a fake tensor mode) run the package's op as usual, resets and all."""
    torch.manual_seed(6)
    m = rnnrec_fast.GRU(I, H, num_layers=2, dropout=0.3, reset_after=False)
    x, resets = torch.randn(4, 3, I), torch.rand(4, 3) < 0.3
    assert torch.onnx.is_in_onnx_export()
    out, h_n = m(x, resets=resets)
    (out.sum() + h_n.sum()).backward()
    with torch.no_grad():
        y, _ = rnnrec_fast.ops.recurrence(x, None, m.weight_ih_l0, m.weight_hh_l0, resets=resets, reset_after=False)
    assert y.shape == (4, 3, H)


GRU4REC_CONFIGS = [dict(layers=[8, 8], dropout_hidden=0.4), dict(layers=[8, 8], embedding=0), dict(layers=[8])]


class _Scores(nn.Module):
    """GRU4Rec's network and its scores of the last step (what a served model computes)."""

    def __init__(self, config):
        super().__init__()
        from rnnrec_fast.recsys.model import GRU4Rec
        self.net = GRU4Rec(50, **config).eval()

    def forward(self, items, h):
        y, h_n = self.net(items, h)
        return self.net.score(y[-1]), h_n


@pytest.mark.parametrize("config", GRU4REC_CONFIGS)
def test_the_recommenders_network_exports(config):
    """GRU4Rec's forward (its layer loop calls the op with dropout between layers; a one-hot first
    layer runs the op on an identity matrix) and its scores, run by ONNX Runtime on other sizes."""
    torch.manual_seed(7)
    model = _Scores(config).eval()
    L = len(config["layers"])
    names = dict(input_names=["items", "h"], output_names=["scores", "h_n"],
                 dynamic_axes={"items": {0: "t", 1: "b"}, "h": {1: "b"}, "scores": {0: "b"}, "h_n": {1: "b"}})
    blob = _export(model, (torch.randint(0, 50, (3, 2)), torch.randn(L, 2, 8)), **names)
    assert "GRU" in _ops(blob)
    items, h = torch.randint(0, 50, (6, 5)), torch.randn(L, 5, 8)
    with torch.no_grad():
        want = model(items, h)
    for got, ref in zip(_run(blob, {"items": items, "h": h}), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_resets_may_be_passed_by_position():
    """forward(input, hx, resets): the third parameter by position is the keyword's."""
    torch.manual_seed(4)
    m = rnnrec_fast.GRU(I, H, batch_first=True)
    x, h0 = torch.randn(2, 5, I), torch.randn(1, 2, H)
    resets = torch.tensor([[False, False, True, False, False], [False, True, False, False, True]])
    for got, want in zip(m(x, h0, resets), m(x, h0, resets=resets)):
        assert torch.equal(got, want)
    assert not torch.equal(m(x, h0, resets)[0], m(x, h0)[0])
    for wrong in ("x", (h0, h0)):  # (torch.as_tensor's own message named neither)
        with pytest.raises(TypeError, match=f"GRU: resets must be a tensor or a sequence of numbers, got {type(wrong).__name__}"):
            m(x, h0, wrong)


def _export_default(model, args, **kw):
    """torch.onnx.export's default exporter from torch 2.9 (dynamo=True: torch.export, then ONNX
    Script's translation; onnxscript is a test pin), as an ONNX model's bytes."""
    pytest.importorskip("onnxscript")
    if "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters:
        pytest.skip(f"torch {torch.__version__}: dynamo=True is torch.onnx.dynamo_export, not the torch.export-based "
                    "exporter (torch 2.5 on)")
    if not hasattr(_exporter_flags(), "_is_onnx_exporting"):
        pytest.skip(f"torch {torch.__version__}: its torch.export-based exporter sets no flag the modules can read "
                    "(they export with dynamo=False)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, verbose=False, **kw)
    return program.model_proto.SerializeToString()


def _exporter_flags():
    """torch.onnx's module of the torch.export-based exporter's flag (ops.onnx_exporting reads it), or None."""
    try:
        return importlib.import_module("torch.onnx._internal.exporter._flags")
    except ImportError:
        return None


def _run_positional(blob, args):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


@pytest.mark.parametrize("kind,kw", SEQ_CONFIGS + [("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"})])
def test_default_exporter_gives_torch_nns_graph(kind, kw):
    """The default exporter (torch.export, then ONNX Script): the same ONNX operators as the torch.nn
    twin's export, with h0 and a dynamic batch, run by ONNX Runtime on another batch size."""
    torch.manual_seed(5)
    ours = getattr(rnnrec_fast, kind)(I, H, **kw).eval()
    twin = rnnrec_fast.to_torch(ours).eval()
    cell = kind.endswith("Cell")
    first = kw.get("batch_first", False)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)

    def args(b):
        if cell:
            return torch.randn(b, I), torch.randn(b, H)
        return torch.randn(b, 4, I) if first else torch.randn(4, b, I), torch.randn(layers, b, H)

    batch = torch.export.Dim("batch")
    dims = ({0: batch}, {0: batch}) if cell else ({0 if first else 1: batch}, {1: batch})
    ours_blob = _export_default(ours, args(3), dynamic_shapes=dims)
    try:
        twin_blob = _export_default(twin, args(3), dynamic_shapes=dims)
    except Exception:
        # torch.nn's own modules fail this export on older releases, where ours export (torch 2.9.1:
        # NameError in its guards, its _flat_weights "assigned during export"): nothing to compare with
        if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13):
            raise
    else:
        assert _ops(ours_blob) == _ops(twin_blob)
    assert cell or kind in _ops(ours_blob) or "MatMul" in _ops(ours_blob)  # (RNN: torch's unrolled steps)
    fresh = args(5)
    with torch.no_grad():
        want = twin(*fresh)
    for got, ref in zip(_run_positional(ours_blob, fresh), (want,) if cell else want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_default_exporter_refuses_by_name():
    """What ONNX cannot express is refused by name by the default exporter too: its torch.export
    capture fails on the refusal, and so does the strict (dynamo) capture it falls back to, which
    had captured the package's op and failed later without naming the cause. So is a
    PackedSequence, which torch.export makes data (its batch_sizes a fake tensor of unknown size;
    the refusal had been a wrong-input error)."""
    class Call(nn.Module):
        def __init__(self, m, **kw):
            super().__init__()
            self.m, self.kw = m, kw

        def forward(self, x):
            return self.m(x, **self.kw)

    class Packs(nn.Module):  # (torch.nn's modules fail there too, on a fake tensor: a TypeError)
        def __init__(self):
            super().__init__()
            self.gru = rnnrec_fast.GRU(I, H)

        def forward(self, x, lengths):
            return self.gru(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    torch.manual_seed(6)
    x = torch.randn(4, 3, I)
    for model, args, why in ((Call(rnnrec_fast.GRU(I, H), resets=torch.rand(4, 3) < 0.3), (x,), "resets cannot be"),
                             (Call(rnnrec_fast.GRU(I, H, reset_after=False)), (x,), "original GRU form"),
                             (Call(rnnrec_fast.GRUCell(I, H, reset_after=False)), (x[0],), "original GRU form"),
                             (Packs(), (x, torch.tensor([4, 2, 3])), "PackedSequence cannot be exported by")):
        with pytest.raises(Exception) as info:
            _export_default(model, args)
        assert why in str(info.value), str(info.value)[-2000:]


def test_default_exporters_strict_capture_takes_torch_nns_operator():
    """torch.export's strict (dynamo) capture under the exporter's flag holds torch.nn's operator;
    without the flag (a plain torch.export, torch.compile) it holds the package's op."""
    flags = _exporter_flags()
    if not hasattr(flags, "set_onnx_exporting_flag"):
        pytest.skip(f"torch {torch.__version__}: its torch.export-based exporter sets no flag")
    torch.manual_seed(8)
    m = rnnrec_fast.GRU(I, H).eval()
    x = torch.randn(4, 3, I)

    def targets(program):
        return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}

    exported = flags.set_onnx_exporting_flag(lambda: torch.export.export(m, (x,), strict=True))()
    assert "aten.gru.input" in targets(exported) and not any("rnnrec_fast" in t for t in targets(exported))
    assert any("rnnrec_fast" in t for t in targets(torch.export.export(m, (x,), strict=True)))


@pytest.mark.parametrize("config", GRU4REC_CONFIGS)
def test_the_recommenders_network_exports_by_default(config):
    """GRU4Rec's network and scores through the default exporter, a dynamic batch, run by ONNX
    Runtime on another batch size."""
    torch.manual_seed(7)
    model = _Scores(config).eval()
    L = len(config["layers"])
    batch = torch.export.Dim("batch")
    blob = _export_default(model, (torch.randint(0, 50, (3, 2)), torch.randn(L, 2, 8)),
                           dynamic_shapes=({1: batch}, {1: batch}))
    assert "GRU" in _ops(blob)
    items, h = torch.randint(0, 50, (3, 5)), torch.randn(L, 5, 8)
    with torch.no_grad():
        want = model(items, h)
    for got, ref in zip(_run_positional(blob, (items, h)), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_compile_beside_the_exporters_flag_keeps_the_op(monkeypatch, onnx_exporting):
    """torch.compile of a module while the torch.export-based exporter's process-wide flag is set
    (and is_in_onnx_export() answers True), outside any export: the compiled graph holds the op,
    not torch.nn's operator (a compile is exporting only under torch.export: from a mutation review,
    reading the flag alone passed the suite)."""
    flags = pytest.importorskip("torch.onnx._internal.exporter._flags")
    monkeypatch.setattr(flags, "_is_onnx_exporting", True, raising=False)
    torch.manual_seed(10)
    m = rnnrec_fast.GRU(I, H).eval()
    x = torch.randn(4, 3, I)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, backend=backend, fullgraph=True)(x)
        want = m(x)
    assert "rnnrec_fast.recurrence.default" in seen and not any("gru" in t for t in seen), seen
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

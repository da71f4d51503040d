"""Drop-in modules against torch.nn with the same weights, over every constructor option and input kind."""
import itertools
import warnings
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnrec_fast
from rnnrec_fast.modules import InputError

from conftest import (assert_close, case_seed, cpu_backends, expected_calls, relu_recurrence_float64, shrunk,
                      tolerances)

KINDS = ["RNN_tanh", "RNN_relu", "GRU"]
INPUTS = ["batched", "unbatched", "packed_sorted", "packed_unsorted"]


def make_pair(kind, backend, dtype, **kw):
    if kind == "GRU":
        ref = nn.GRU(dtype=dtype, **kw)
        ours = rnnrec_fast.GRU(dtype=dtype, backend=backend, **kw)
    else:
        nl = kind.split("_")[1]
        ref = nn.RNN(nonlinearity=nl, dtype=dtype, **kw)
        ours = rnnrec_fast.RNN(nonlinearity=nl, dtype=dtype, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def relu_rnn_float64(m, x, hx, lengths=None):
    """A float64 replica of an nn.RNN ``m`` of relu units (every layer and direction, batch_first,
    unbatched input, rows of ``lengths`` as a PackedSequence's), dropout off: (its output, padded
    with zeros, and the pre-activations of every active step, flat). The parity tests' guard: a
    float32 pre-activation within rounding of the kink can take one sign in torch.nn and the other
    in ours, and a gradient then differs by O(1) with no kernel at fault."""
    X = x.detach().double()
    if X.dim() == 2:
        X, hx = X.unsqueeze(1), None if hx is None else hx.unsqueeze(1)
    elif m.batch_first:
        X = X.transpose(0, 1)
    D, pres = 2 if m.bidirectional else 1, []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            h = torch.zeros(X.shape[1], m.hidden_size) if hx is None else hx[layer * D + d]
            w = [getattr(m, f"{n}{sfx}", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            out, pre = relu_recurrence_float64(X, h, *w, lengths, reverse=d == 1)
            outs.append(out)
            pres.append(pre)
        X = torch.cat(outs, 2)
    return X, torch.cat(pres)


def test_the_relu_replica_is_torch_nns_relu_rnn():
    """relu_rnn_float64 gives torch.nn's output (float64) for every structure and input kind, so the
    kink it measures is the one the parity tests meet."""
    torch.manual_seed(case_seed("relu replica"))
    for num_layers, bidirectional, batch_first, input_kind in itertools.product(
            (1, 2), (False, True), (False, True), INPUTS):
        m = nn.RNN(4, 6, num_layers=num_layers, nonlinearity="relu", bidirectional=bidirectional,
                   batch_first=batch_first, dtype=torch.float64)
        D = 2 if bidirectional else 1
        unbatched = input_kind == "unbatched"
        x = torch.randn((5, 4) if unbatched else (3, 5, 4) if batch_first else (5, 3, 4), dtype=torch.float64)
        hx = torch.randn((num_layers * D, 6) if unbatched else (num_layers * D, 3, 6), dtype=torch.float64)
        lengths = torch.tensor([5, 3, 1]) if input_kind == "packed_sorted" else torch.tensor([2, 5, 3])
        if input_kind.startswith("packed"):
            packed, _ = m(pack_padded_sequence(x, lengths, batch_first=batch_first,
                                               enforce_sorted=input_kind == "packed_sorted"), hx)
            want = torch.nn.utils.rnn.pad_packed_sequence(packed, total_length=5)[0]
        else:
            lengths = None
            want = m(x, hx)[0]
            want = want.unsqueeze(1) if unbatched else want.transpose(0, 1) if batch_first else want
        got, pre = relu_rnn_float64(m, x, hx, lengths)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert pre.numel() == D * 6 * (int(lengths.sum()) if lengths is not None else 5 * (1 if unbatched else 3)) \
            * num_layers


def grads_of(module, inputs, outputs, weights):
    out, h = outputs
    data = out.data if hasattr(out, "batch_sizes") else out
    gen = torch.Generator().manual_seed(11)
    loss = (data * torch.randn(data.shape, generator=gen, dtype=torch.float64).to(data.dtype)).sum() + \
        (h * torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.dtype)).sum()
    return torch.autograd.grad(loss, inputs + list(module.parameters()), retain_graph=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("input_kind", INPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_parity_with_torch(backend, kind, input_kind):
    """A gradient penalty (gradients taken with create_graph=True, a loss of them differentiated
    again) against torch.nn's, float64: two layers, bidirectional, with and without hx, dropout
    between the layers off; the gradients of x, hx and every weight. (The second derivative was
    refused with NotImplementedError before 2026-12-05.)"""
    torch.manual_seed(case_seed("double backward", backend, kind, input_kind))
    T, B, I, H = 4, 3, 3, 4
    ref, ours = make_pair(kind, backend, torch.float64, input_size=I, hidden_size=H, num_layers=2,
                          bidirectional=True, batch_first=input_kind == "batched")
    if kind == "RNN_relu":  # (away from the kink, where finite-precision ties differ)
        with torch.no_grad():
            for m in (ref, ours):
                m.bias_ih_l0.add_(1.0)
    for with_hx in (True, False):
        results = []
        for m in (ref, ours):
            g = torch.Generator().manual_seed(5)
            shape = (B, T, I) if input_kind == "batched" else (T, I) if input_kind == "unbatched" else (T, B, I)
            x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
            hx = torch.randn((4, B, H) if input_kind != "unbatched" else (4, H), generator=g,
                             dtype=torch.float64).requires_grad_()
            leaves = [x] + ([hx] if with_hx else []) + list(m.parameters())
            feed = x
            if input_kind.startswith("packed"):
                feed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
            out, h = m(feed, hx if with_hx else None)
            data = out.data if input_kind.startswith("packed") else out
            loss = data.sin().sum() + (h * h).sum()
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            penalty = sum(gi.square().sum() for gi in grads)
            results.append((grads, torch.autograd.grad(penalty, leaves)))
        names = ["x"] + (["hx"] if with_hx else []) + [n for n, _ in ref.named_parameters()]
        for name, a, b in zip(names, results[1][0], results[0][0]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda msg: f"grad {name}: {msg}")
        for name, a, b in zip(names, results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda msg: f"second derivative {name}: {msg}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("input_kind", INPUTS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_parity_with_torch(backend, kind, num_layers, bidirectional, batch_first, input_kind, dtype, backend_calls):
    """Output, h_n and the gradients of input, hx and every weight against torch.nn, in both dtypes
    for every structure, and only the forced backend running (every layer and direction, forward and
    backward: from a review, the reverse direction on 'auto' passed every parity test). relu draws
    keep their pre-activations 1e-4 from the kink (relu_rnn_float64)."""
    # bias, hx and a strided input alternate deterministically over the grid, each value in each
    # structure (the two dtypes take opposite bias and hx)
    salt = sum(map(ord, f"{kind}{num_layers}{bidirectional}{batch_first}{input_kind}"))
    flip = dtype == torch.float32
    bias, with_hx, noncontig = (salt % 2 == 0) != flip, ((salt // 2) % 2 == 0) != flip, (salt // 4) % 2 == 0
    torch.manual_seed(case_seed("parity", backend, salt, str(dtype)))  # fresh weights and inputs each run
    T, B, I, H = 5, 3, 4, 6
    lengths = None
    if input_kind.startswith("packed"):
        lengths = torch.tensor([5, 3, 1]) if input_kind == "packed_sorted" else torch.tensor([2, 5, 3])
    for _ in range(100):  # (relu: drawn again while a pre-activation lies within 1e-4 of the kink)
        ref, ours = make_pair(kind, backend, dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                              bias=bias, batch_first=batch_first, bidirectional=bidirectional)
        D = 2 if bidirectional else 1
        if input_kind == "unbatched":
            x = torch.randn(T, I, dtype=dtype)
            hx = torch.randn(num_layers * D, H, dtype=dtype) if with_hx else None
        else:
            shape = (B, T, I) if batch_first else (T, B, I)
            x = torch.randn(shape, dtype=dtype)
            hx = torch.randn(num_layers * D, B, H, dtype=dtype) if with_hx else None
        if noncontig:
            x = torch.randn(*x.shape[:-1], 2 * I, dtype=dtype)[..., ::2]
            assert not x.is_contiguous()
        if kind != "RNN_relu" or float(relu_rnn_float64(ref, x, hx, lengths)[1].abs().min()) >= 1e-4:
            break
    else:
        raise AssertionError("no draw in 100 kept its relu pre-activations 1e-4 from the kink")
    x.requires_grad_()
    inputs = [x] + ([hx.requires_grad_()] if hx is not None else [])
    if input_kind.startswith("packed"):
        feed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                    enforce_sorted=input_kind == "packed_sorted")
    else:
        feed = x
    out_ref, h_ref = ref(feed, hx)
    out, h = ours(feed, hx)
    calls = num_layers * D
    assert backend_calls == expected_calls(backend, forward=calls)
    if input_kind.startswith("packed"):
        assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
        for a, b in ((out.sorted_indices, out_ref.sorted_indices), (out.unsorted_indices, out_ref.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        assert_close(out.data, out_ref.data, dtype, "packed output")
    else:
        assert out.shape == out_ref.shape
        assert_close(out, out_ref, dtype, "output")
    assert_close(h, h_ref, dtype, "h_n")
    g_ref = grads_of(ref, inputs, (out_ref, h_ref), None)
    g = grads_of(ours, inputs, (out, h), None)
    assert backend_calls == expected_calls(backend, forward=calls, backward=calls)
    names = ["x"] + (["hx"] if hx is not None else []) + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        assert_close(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["RNNCell_tanh", "RNNCell_relu", "GRUCell"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cells(backend, kind, batched, bias, dtype, backend_calls):
    torch.manual_seed(case_seed("cells", backend, kind, batched, bias, str(dtype)))
    if kind == "GRUCell":
        ref, ours = nn.GRUCell(3, 4, bias=bias, dtype=dtype), rnnrec_fast.GRUCell(3, 4, bias=bias, dtype=dtype, backend=backend)
    else:
        nl = kind.split("_")[1]
        ref = nn.RNNCell(3, 4, bias=bias, nonlinearity=nl, dtype=dtype)
        ours = rnnrec_fast.RNNCell(3, 4, bias=bias, nonlinearity=nl, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((2, 3) if batched else (3,), dtype=dtype, requires_grad=True)
    hx = torch.randn((2, 4) if batched else (4,), dtype=dtype, requires_grad=True)
    for h_in in (None, hx):
        backend_calls.clear()
        a, b = ours(x, h_in), ref(x, h_in)
        assert_close(a, b, dtype, "cell output")
        ins = [x] + ([hx] if h_in is not None else [])
        for ga, gb in zip(torch.autograd.grad(a.sum(), ins + list(ours.parameters())),
                          torch.autograd.grad(b.sum(), ins + list(ref.parameters()))):
            assert_close(ga, gb, dtype, "cell grad")
        assert backend_calls == expected_calls(backend, forward=1, backward=1)  # the forced backend ran


def test_names_shapes_init_and_state_dict_round_trip():
    for ref_cls, our_cls, kw in [(nn.GRU, rnnrec_fast.GRU, dict(num_layers=3, bidirectional=True, bias=False)),
                                 (nn.RNN, rnnrec_fast.RNN, dict(num_layers=2, nonlinearity="relu")),
                                 (nn.GRUCell, rnnrec_fast.GRUCell, {}), (nn.RNNCell, rnnrec_fast.RNNCell, {})]:
        torch.manual_seed(0)
        ref = ref_cls(7, 5, **kw)
        torch.manual_seed(0)
        ours = our_cls(7, 5, **kw)
        # same names, shapes, and the same draws from the same initialisation distribution
        assert list(ref.state_dict()) == list(ours.state_dict())
        for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
        ref2 = ref_cls(7, 5, **kw)
        ref2.load_state_dict(ours.state_dict())  # and the reverse direction
        ours.load_state_dict(ref2.state_dict())


def test_from_torch_and_modes():
    ref = nn.GRU(4, 3, num_layers=2, batch_first=True, dropout=0.25)
    ours = rnnrec_fast.from_torch(ref)
    assert isinstance(ours, rnnrec_fast.GRU) and ours.batch_first and ours.dropout == 0.25
    ref.eval(), ours.eval()
    x = torch.randn(2, 6, 4)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    cell = rnnrec_fast.from_torch(nn.RNNCell(2, 3, nonlinearity="relu"))
    assert isinstance(cell, rnnrec_fast.RNNCell) and cell.nonlinearity == "relu"
    with pytest.raises(TypeError, match="LSTM"):
        rnnrec_fast.from_torch(nn.LSTM(2, 3))


def cpp_modules():
    """rnnrec_fast.modules, whose packed helpers (_C.pad_packed_sorted, reverse_padded, ...) these
    tests check; skips without the C++ extension."""
    from rnnrec_fast import modules
    if modules._pad_packed_sorted is None or modules._reverse_padded is None:
        pytest.skip("the C++ extension is not built")
    return modules


def fresh_lengths(B, T, shortest):
    """B sequence lengths drawn in shortest..T, one of them T."""
    lengths = torch.randint(shortest, T + 1, (B,))
    lengths[torch.randint(0, B, ())] = T
    return lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape", [(6, 5, 3), (1, 4, 2), (7, 1, 3), (2, 3, 1)], ids=["B6T5", "B1", "T1", "I1"])
def test_packed_padding_in_cpp_matches_python(monkeypatch, dtype, shape):
    """On the CPU the modules pad a PackedSequence and take the padded output back to its packed
    rows in C++ (_C.pad_packed_sorted, unpad_packed_sorted): the same padded data, lengths and
    packed rows as their Python path (index ops), bit for bit, for fresh lengths (sorted or not, a
    full one, ones of 1); a module's packed inference then gives torch.nn's outputs; malformed
    batch sizes and padded sizes are refused by name."""
    modules = cpp_modules()
    B, T, I = shape
    torch.manual_seed(case_seed("pad_packed", str(dtype), shape))
    lengths = fresh_lengths(B, T, 1)
    x = torch.randn(B, T, I).to(dtype)
    for enforce_sorted in (False, True):
        lens = lengths.sort(descending=True).values if enforce_sorted else lengths
        packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=enforce_sorted)
        got = modules._pad_packed(packed)
        with monkeypatch.context() as mp:
            mp.setattr(modules, "_pad_packed_sorted", None)
            want = modules._pad_packed(packed)
        for a, b in zip(got[:2], want[:2]):
            assert a.dtype == b.dtype and torch.equal(a, b)
        padded = torch.randn(got[0].shape).to(dtype)  # (fresh values, padding too: unpad must skip it)
        a, b = got[2](padded), want[2](padded)
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(got[2](got[0]), packed.data)
    if I > 0 and dtype != torch.bfloat16:
        ref = nn.GRU(I, 4, batch_first=True, dtype=dtype)
        ours = rnnrec_fast.from_torch(ref)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        with torch.inference_mode():
            (out, h), (out_ref, h_ref) = ours(packed), ref(packed)
        assert_close(out.data, out_ref.data, dtype, "packed output")
        assert_close(h, h_ref, dtype, "h_n")
    with pytest.raises(ValueError, match="non-increasing"):
        modules._pad_packed_sorted(torch.zeros(3, 2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="sum to 3"):
        modules._pad_packed_sorted(torch.zeros(4, 2), torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="non-increasing"):
        modules._unpad_packed_sorted(torch.zeros(2, 2, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"padded must be \(2, 2, C\)"):
        modules._unpad_packed_sorted(torch.zeros(2, 3, 3), torch.tensor([2, 1]))


def graph_node_names(t):
    """The names of the autograd nodes t's gradient runs through (a C++ function's without its
    namespaces)."""
    names, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(fn.name().rstrip(">").rsplit("::", 1)[-1])
            stack.extend(f for f, _ in fn.next_functions)
    return names


def test_packed_padding_gradients_in_cpp():
    """With autograd the C++ padding and its inverse run as C++ autograd functions
    (_C.pad_packed_autograd, unpad_packed_autograd), each the other's adjoint: gradcheck and
    gradgradcheck in float64 for fresh lengths, and a training step of a packed GRU records them
    (not ATen's index ops)."""
    modules = cpp_modules()
    torch.manual_seed(case_seed("pad_packed_grad"))
    lengths = torch.randint(1, 6, (5,))
    lengths[2] = 6
    packed = pack_padded_sequence(torch.randn(5, 6, 3, dtype=torch.float64), lengths, batch_first=True,
                                  enforce_sorted=False)
    data, bs = packed.data.clone().requires_grad_(), packed.batch_sizes
    padded = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    for f, inp in ((lambda d: modules._pad_packed_autograd(d, bs)[0], data),
                   (lambda p: modules._unpad_packed_autograd(p, bs), padded)):
        assert torch.autograd.gradcheck(f, (inp,))
        assert torch.autograd.gradgradcheck(f, (inp,))
    m = rnnrec_fast.GRU(3, 4, dtype=torch.float64)
    out, h = m(PackedSequence(data, *packed[1:]))
    names = graph_node_names(out.data)
    assert {"PackedPadFn", "PackedUnpadFn"} <= names and not any("Index" in n for n in names), names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape", [(6, 5, 3), (1, 4, 2), (7, 1, 3), (3, 6, 1)], ids=["T6B5", "T1", "B1", "C1"])
def test_reverse_padded_in_cpp_matches_python(monkeypatch, dtype, shape):
    """On the CPU a bidirectional module reverses each row's steps of a padded PackedSequence in
    C++ (_C.reverse_padded): the same values, bit for bit, as the index_select of the general
    path, for fresh lengths (unsorted, 0 and T among them) and a strided x; applied twice it gives
    x back; with autograd (_C.reverse_padded_autograd, its own adjoint) gradcheck and
    gradgradcheck pass in float64, and a bidirectional packed training step records it, not ATen's
    index ops; malformed lengths are refused by name."""
    modules = cpp_modules()
    T, B, C = shape
    torch.manual_seed(case_seed("reverse_padded", str(dtype), shape))
    lengths = fresh_lengths(B, T, 0)
    x = torch.randn(T, B, 2 * C)[..., ::2].to(dtype)  # (strided)
    got = modules._Reversal(T, lengths, x.device)(x)
    with monkeypatch.context() as mp:
        mp.setattr(modules, "_reverse_padded", None)
        want = modules._Reversal(T, lengths, x.device)(x)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    for b in range(B):  # (and what it means: each row's first lengths[b] steps reversed)
        n = int(lengths[b])
        assert torch.equal(got[:n, b], x[:n, b].flip(0)) and torch.equal(got[n:, b], x[n:, b])
    assert torch.equal(modules._reverse_padded(got, lengths), x)
    xd = torch.randn(T, B, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: modules._reverse_padded_autograd(t, lengths), (xd,))
    assert torch.autograd.gradgradcheck(lambda t: modules._reverse_padded_autograd(t, lengths), (xd,))
    if dtype == torch.float64 and B > 1:
        m = rnnrec_fast.GRU(C, 4, bidirectional=True, batch_first=True, dtype=dtype)
        packed = pack_padded_sequence(torch.randn(B, T, C, dtype=dtype), lengths.clamp(min=1), batch_first=True,
                                      enforce_sorted=False)
        out, _ = m(PackedSequence(packed.data.requires_grad_(), *packed[1:]))  # (a leaf: no sort node)
        names = graph_node_names(out.data)
        assert "ReversePaddedFn" in names and not any("Index" in n for n in names), names
    for bad, match in ((lengths[:-1], f"lengths must be a 1-D int64 CPU tensor of {B} entries"),
                       (lengths.to(torch.int32), "int64"), (lengths + T + 1, rf"lie in \[0, {T}\]"),
                       (lengths - T - 1, rf"lie in \[0, {T}\]")):
        with pytest.raises(ValueError, match=match):
            modules._reverse_padded(x, bad)
    with pytest.raises(ValueError, match="x must be a 3-D"):
        modules._reverse_padded(x[0], lengths)


@pytest.mark.parametrize("lazy", ["neg", "zero"])
def test_packed_helpers_read_lazily_held_values(lazy):
    """The C++ padding, its inverse and the reversal read their input by pointer: a tensor with the
    negative bit (torch._neg_view: memory holding the values' negation) gives the values it stands
    for, and an efficient zero tensor (no memory at all) zeros (the reversal had returned the
    memory's values, and a zero tensor crashed the process)."""
    modules = cpp_modules()
    torch.manual_seed(case_seed("lazy_values", lazy))

    def lazily(t):  # (the same values as t, lazily held; or zeros)
        return torch._neg_view(t.neg()) if lazy == "neg" else torch._efficientzerotensor(t.shape, dtype=t.dtype)

    def values(t):
        return t if lazy == "neg" else torch.zeros_like(t)

    x, data, bs, lengths = torch.randn(3, 2, 4), torch.randn(4, 3), torch.tensor([2, 1, 1]), torch.tensor([3, 1])
    assert lazily(x).is_neg() if lazy == "neg" else lazily(x)._is_zerotensor()
    for f, t in ((lambda t: modules._reverse_padded(t, lengths), x),
                 (lambda t: modules._pad_packed_sorted(t, bs)[0], data),
                 (lambda t: modules._unpad_packed_sorted(t, bs), x)):
        assert torch.equal(f(lazily(t)), f(values(t)))


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_dropout_of_a_packed_sequence_as_torch(kind, bidirectional, enforce_sorted):
    """With a PackedSequence, the dropout between layers draws its mask over the packed rows, as
    torch.nn's does: the same seed drops the same units, so outputs, h_n and every gradient equal
    torch.nn's (they differed: the mask was drawn over the padded output)."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(3, 4, num_layers=3, dropout=0.5, bidirectional=bidirectional, dtype=torch.float64)
    ours = rnnrec_fast.from_torch(ref)
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 5, 3, 1]) if enforce_sorted else torch.tensor([3, 6, 1, 5])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    grads = []
    for m in (ref, ours):
        torch.manual_seed(1)
        y, h = m(packed)
        grads.append((y.data, h) + torch.autograd.grad(y.data.square().sum() + h.sum(), [x] + list(m.parameters()),
                                                       retain_graph=True))
    assert not torch.equal(grads[0][0], ref(packed)[0].data)  # (masks were drawn)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_dropout_between_layers():
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, num_layers=3, dropout=0.5, dtype=torch.float64)
    ours = rnnrec_fast.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    y_ref = ref(x)[0]
    torch.manual_seed(1)
    y = ours(x)[0]
    # the same random masks are drawn in the same order as torch's CPU implementation
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-9, atol=1e-9)  # no dropout in eval mode
    ours.train()
    assert not torch.equal(ours(x)[0], ours(x)[0])


def _cho_step(x, h, w_ih, w_hh, b_ih, b_hh):
    """One step of the original GRU (Cho et al. 2014: the reset gate applied before W_hn), written
    out from its formula (the oracle of the tests below, by autograd)."""
    gi = x @ w_ih.T + (0 if b_ih is None else b_ih)
    i_r, i_z, i_n = gi.chunk(3, -1)
    W_hr, W_hz, W_hn = w_hh.chunk(3)
    b_hr, b_hz, b_hn = (0, 0, 0) if b_hh is None else b_hh.chunk(3)
    r = torch.sigmoid(i_r + h @ W_hr.T + b_hr)
    z = torch.sigmoid(i_z + h @ W_hz.T + b_hz)
    n = torch.tanh(i_n + (r * h) @ W_hn.T + b_hn)
    return (1 - z) * n + z * h


def _cho_module(m, x, hx, lengths):
    """rnnrec_fast.GRU(reset_after=False)'s (output, h_n) by _cho_step: x (T, B, I), hx (L*D, B,
    H) or None, lengths (B,) or None (a row's steps past its length leave its state, and give 0)."""
    T, B, _ = x.shape
    D = 2 if m.bidirectional else 1
    H = m.hidden_size
    lengths = [T] * B if lengths is None else lengths.tolist()
    layer_in, hs = x, []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(m, f"{n}{sfx}", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            rows, finals = [], []
            for b in range(B):
                h = torch.zeros(H, dtype=x.dtype) if hx is None else hx[layer * D + d, b]
                steps = range(lengths[b] - 1, -1, -1) if d else range(lengths[b])
                ys = [None] * T
                for t in steps:
                    h = _cho_step(layer_in[t, b], h, *w)
                    ys[t] = h
                rows.append(torch.stack([y if y is not None else torch.zeros(H, dtype=x.dtype) for y in ys]))
                finals.append(h)
            outs.append(torch.stack(rows, 1))
            hs.append(torch.stack(finals))
        layer_in = torch.cat(outs, 2)
    return layer_in, torch.stack(hs)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("num_layers,bidirectional,packed", [(1, False, False), (2, True, False), (2, False, True),
                                                              (1, True, True)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cho_form_gru_against_its_formula(backend, num_layers, bidirectional, packed, bias, dtype):
    """GRU(reset_after=False) on every backend, one and two layers, one and two directions, dense
    and packed input, with and without biases: output, h_n and the gradients of the input, hx and
    every weight equal the Cho-form formula run step by step under autograd (torch.nn has no such
    GRU to compare with), and so does its inference fast path (no_grad)."""
    torch.manual_seed(case_seed("cho", backend, num_layers, bidirectional, packed, bias, str(dtype)))
    T, B, I, H = 5, 3, 4, 7
    m = rnnrec_fast.GRU(I, H, num_layers=num_layers, bias=bias, bidirectional=bidirectional, reset_after=False,
                        dtype=dtype, backend=backend)
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    hx = torch.randn(num_layers * D, B, H, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([5, 2, 4]) if packed else None
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    y, h_n = m(inp, hx)
    if packed:
        y = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=T)[0]
    want_y, want_h = _cho_module(m, x, hx, lengths)
    tol = tolerances(dtype)
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(h_n, want_h, **tol)
    g = torch.Generator().manual_seed(3)
    gy, gh = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(h_n.shape, generator=g, dtype=dtype)
    leaves = [x, hx] + list(m.parameters())
    got = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), leaves)
    want = torch.autograd.grad((want_y * gy).sum() + (want_h * gh).sum(), leaves)
    for name, a, b in zip(["x", "hx"] + [n for n, _ in m.named_parameters()], got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda s, n=name: f"grad {n}: {s}")
    with torch.no_grad():  # (the inference fast path)
        y2, h2 = m(inp, hx)
    torch.testing.assert_close(h2, want_h, **tol)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cho_form_gru_cell_against_its_formula(backend, batched, bias, dtype):
    """GRUCell(reset_after=False) on every backend: the new state and the gradients of the input,
    the state and every weight equal the Cho-form formula under autograd, with autograd and on the
    inference fast path (no_grad), with and without the state given (a review found the cell's
    reset_after could be ignored without any test noticing)."""
    torch.manual_seed(case_seed("cho cell", backend, batched, bias, str(dtype)))
    m = rnnrec_fast.GRUCell(4, 7, bias=bias, reset_after=False, dtype=dtype, backend=backend)
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 4, dtype=dtype, requires_grad=True)
    h = torch.randn(*shape, 7, dtype=dtype, requires_grad=True)
    w = [m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh]
    tol = tolerances(dtype)
    got, want = m(x, h), _cho_step(x, h, *w)
    torch.testing.assert_close(got, want, **tol)
    leaves = [x, h] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(got.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():
        torch.testing.assert_close(m(x, h), want, **tol)
        torch.testing.assert_close(m(x), _cho_step(x, torch.zeros_like(h), *w), **tol)


def test_reset_after_false_is_the_cho_form():
    torch.manual_seed(0)
    gru = rnnrec_fast.GRU(3, 4, reset_after=False, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y, _ = gru(x)
    W_ir, W_iz, W_in = gru.weight_ih_l0.chunk(3)
    W_hr, W_hz, W_hn = gru.weight_hh_l0.chunk(3)
    b_ir, b_iz, b_in = gru.bias_ih_l0.chunk(3)
    b_hr, b_hz, b_hn = gru.bias_hh_l0.chunk(3)
    h = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(4):
        r = torch.sigmoid(x[t] @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
        z = torch.sigmoid(x[t] @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
        n = torch.tanh(x[t] @ W_in.T + b_in + (r * h) @ W_hn.T + b_hn)
        h = (1 - z) * n + z * h
        torch.testing.assert_close(y[t], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh"])
def test_resets_in_multilayer_module(backend, kind):
    """resets zero every layer's state: a 2-layer module with resets gives what torch.nn gives on
    each row's sessions run one by one (the first from hx, the others from zeros): output, h_n and
    the gradients of the input, hx and every weight."""
    torch.manual_seed(case_seed("resets module", backend, kind))
    T, B, I, H = 6, 3, 3, 4
    ref, ours = make_pair(kind, backend, torch.float64, input_size=I, hidden_size=H, num_layers=2, batch_first=True)
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[1, 2] = resets[2, 0] = resets[2, 4] = resets[2, 5] = True  # row 0: none
    y, h_n = ours(x, hx, resets=resets)
    outs, finals = [], []
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if resets[b, t]]
        h, pieces = (torch.zeros(2, 1, H, dtype=torch.float64) if resets[b, 0] else hx[:, b:b + 1]), []
        for k, t0 in enumerate(starts):
            t1 = starts[k + 1] if k + 1 < len(starts) else T
            out, h = ref(x[b:b + 1, t0:t1], h if k == 0 else torch.zeros(2, 1, H, dtype=torch.float64))
            pieces.append(out[0])
        outs.append(torch.cat(pieces))
        finals.append(h[:, 0])
    want_y, want_h = torch.stack(outs), torch.stack(finals, 1)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_n, want_h, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(1)
    gy, gh = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(h_n.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), [x, hx] + list(ours.parameters()))
    want = torch.autograd.grad((want_y * gy).sum() + (want_h * gh).sum(), [x, hx] + list(ref.parameters()))
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_active_backend_reported():
    gru = rnnrec_fast.GRU(3, 4)
    name = gru.active_backend()
    gru(torch.randn(2, 1, 3))
    assert rnnrec_fast.last_backend() == name
    assert rnnrec_fast.GRU(3, 4, backend="reference").active_backend() == "reference"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", KINDS)
def test_smallest_shapes(backend, kind):
    """T=1, B=1, H=1 (and input_size 1), float64, batch_first, with hx."""
    torch.manual_seed(3)
    ref, ours = make_pair(kind, backend, torch.float64, input_size=1, hidden_size=1, num_layers=2,
                          batch_first=True)
    x = torch.randn(1, 1, 1, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2, 1, 1, dtype=torch.float64, requires_grad=True)
    out, h = ours(x, hx)
    out_ref, h_ref = ref(x, hx)
    assert_close(out, out_ref, torch.float64, "output")
    assert_close(h, h_ref, torch.float64, "h_n")
    for a, b in zip(grads_of(ours, [x, hx], (out, h), None), grads_of(ref, [x, hx], (out_ref, h_ref), None)):
        assert_close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_relu", "GRUCell", "RNNCell_tanh"])
def test_empty_batch_as_torch(backend, kind):
    """A batch of zero rows (what a filter can leave) works as in torch.nn: empty outputs of the same
    shapes and dtype, which still depend on the weights (their gradients are zeros, as torch.nn's)."""
    torch.manual_seed(3)
    if kind.endswith("Cell"):
        ref = nn.GRUCell(4, 5) if kind == "GRUCell" else nn.RNNCell(4, 5, nonlinearity="tanh")
        ours = rnnrec_fast.from_torch(ref, backend=backend)
        inputs = [(torch.randn(0, 4),), (torch.randn(0, 4), torch.randn(0, 5))]
    else:
        kw = dict(num_layers=2, bidirectional=True, batch_first=True)
        ref = nn.GRU(4, 5, **kw) if kind == "GRU" else nn.RNN(4, 5, nonlinearity="relu", **kw)
        ours = rnnrec_fast.from_torch(ref, backend=backend)
        inputs = [(torch.randn(0, 3, 4),), (torch.randn(0, 3, 4), torch.randn(4, 0, 5))]
    for args in inputs:
        with torch.inference_mode():
            for a, b in zip(torch.utils._pytree.tree_leaves(ours(*args)), torch.utils._pytree.tree_leaves(ref(*args))):
                assert a.shape == b.shape and a.dtype == b.dtype and a.numel() == 0
        ours(torch.randn(2, 4) if kind.endswith("Cell") else torch.randn(2, 3, 4))  # (last_backend: the backend)
        outs = torch.utils._pytree.tree_leaves(ours(*args))
        assert rnnrec_fast.last_backend() == "reference"  # what ran (it said the previous call's backend)
        refs = torch.utils._pytree.tree_leaves(ref(*args))
        assert all(o.requires_grad for o in outs)
        loss = sum(o.sum() for o in outs)
        grads = torch.autograd.grad(loss, list(ours.parameters()))
        ref_grads = torch.autograd.grad(sum(o.sum() for o in refs), list(ref.parameters()))
        for g, rg in zip(grads, ref_grads):
            assert torch.equal(g, rg) and not g.any()


@pytest.mark.parametrize("backend,dtype", [("cuda", torch.float32), ("numba", torch.float16), ("cpp", torch.float16)])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_empty_batch_refuses_a_forced_backend_as_any_batch(backend, dtype, kind):
    """A forced backend that cannot run the tensors (a device it lacks, or a dtype) is refused for a
    batch of zero rows as for any other (it ran the reference math silently)."""
    if backend == "cpp" and not rnnrec_fast.backends.available("cpp"):
        pytest.skip("the cpp backend is not built")
    cell = kind.endswith("Cell")
    ours = getattr(rnnrec_fast, kind)(3, 4, backend=backend, dtype=dtype)
    full, empty = ((torch.randn(2, 3, dtype=dtype), torch.randn(0, 3, dtype=dtype)) if cell else
                   (torch.randn(5, 2, 3, dtype=dtype), torch.randn(5, 0, 3, dtype=dtype)))
    with pytest.raises((RuntimeError, ValueError)) as want:
        ours(full)
    with pytest.raises(type(want.value)) as got:
        ours(empty)
    assert str(got.value) == str(want.value)
    # on meta tensors (which no backend runs) a zero batch still gives torch.nn's empty outputs
    meta = getattr(rnnrec_fast, kind)(3, 4, device="meta")
    out = meta(empty.to("meta", torch.float32))
    assert (out[0] if isinstance(out, tuple) else out).shape == ((0, 4) if cell else (5, 0, 4))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell"])
@pytest.mark.parametrize("sizes", [(0, 5), (4, 0), (0, 0)])
def test_zero_size_cells_as_torch(backend, kind, sizes):
    """torch.nn's cells (not its RNN/GRU) accept input_size or hidden_size 0; so do ours, with
    torch.nn's results: batched and unbatched, hx given or not, grad on and off, gradients."""
    torch.manual_seed(4)
    I, H = sizes
    ref = getattr(nn, kind)(I, H)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-1, 1)
    ours = rnnrec_fast.from_torch(ref, backend=backend)
    for x in (torch.randn(3, I), torch.randn(I)):
        for hx in (None, torch.randn(*x.shape[:-1], H)):
            with torch.inference_mode():
                a, b = ours(x, hx), ref(x, hx)
                assert a.shape == b.shape
                assert_close(a, b, torch.float32, "inference")
            a, b = ours(x, hx), ref(x, hx)
            assert_close(a, b, torch.float32, "output")
            loss, ref_loss = (a * a.detach().sign()).sum(), (b * b.detach().sign()).sum()
            params = [p for p in ours.parameters()]
            for g, rg in zip(torch.autograd.grad(loss, params, allow_unused=True),
                             torch.autograd.grad(ref_loss, list(ref.parameters()), allow_unused=True)):
                assert (g is None) == (rg is None)
                if g is not None:
                    assert_close(g, rg, torch.float32, "grad")
    with pytest.raises(ValueError, match="non-negative"):
        getattr(rnnrec_fast, kind)(-1, 5)
    with pytest.raises(TypeError, match="should be of type int"):  # as torch.nn's (from torch.empty)
        getattr(rnnrec_fast, kind)(4.0, 5)


@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_a_parametrization_runs_once_a_call(kind):
    """Each weight is read once a call: a parametrization runs once (spectral_norm's power
    iteration steps once, a random one draws once); the first weight was read twice."""
    from torch.nn.utils import parametrize

    calls = {}

    class Count(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, w):
            calls[self.name] = calls.get(self.name, 0) + 1
            return w * 0.5

    seq = kind in ("GRU", "RNN")
    m = getattr(rnnrec_fast, kind)(4, 5, **(dict(num_layers=2, bidirectional=True) if seq else {}))
    names = [n for n, _ in m.named_parameters()]
    for n in names:
        parametrize.register_parametrization(m, n, Count(n))
    x = torch.randn(3, 2, 4) if seq else torch.randn(2, 4)
    for grad_mode in (torch.enable_grad, torch.no_grad):
        calls.clear()
        with grad_mode():
            m(x)
        assert calls == {n: 1 for n in names}, (grad_mode, calls)


def _weight_drop(module, name):
    """The AWD-LSTM WeightDrop pattern: the parameter moves to name + "_raw" and a plain tensor
    derived from it takes its place before each call."""
    raw = getattr(module, name)
    del module._parameters[name]
    module.register_parameter(name + "_raw", raw)
    module.register_forward_pre_hook(lambda m, args: setattr(m, name, getattr(m, name + "_raw") * 0.5))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("transform", ["parametrize", "weight_norm", "prune", "weight_drop"])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_transformed_weights_as_torch(backend, transform, kind):
    """torch.nn's weight transforms (parametrizations, weight_norm, pruning, WeightDrop's plain-tensor
    weight) replace a parameter by a computed attribute: the modules read their weights as attributes,
    as torch.nn does, so outputs and gradients match torch.nn's under each."""
    torch.manual_seed(4)
    if kind == "GRU":
        ref, name, x = nn.GRU(4, 5, num_layers=2), "weight_hh_l1", torch.randn(3, 2, 4)
    else:
        ref, name, x = nn.GRUCell(4, 5), "weight_hh", torch.randn(2, 4)
    ours = rnnrec_fast.from_torch(ref, backend=backend)

    class Scale(nn.Module):
        def forward(self, w):
            return 0.5 * w

    for m in (ref, ours):
        if transform == "parametrize":
            parametrize.register_parametrization(m, name, Scale())
        elif transform == "weight_norm":
            parametrizations.weight_norm(m, name)
        elif transform == "prune":
            prune.random_unstructured(m, name, amount=0.5)
        else:
            _weight_drop(m, name)
    if transform == "prune":  # the same mask in both
        ours.get_buffer(name + "_mask").copy_(ref.get_buffer(name + "_mask"))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a = torch.utils._pytree.tree_leaves(ours(x))
            b = torch.utils._pytree.tree_leaves(ref(x))
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(sum(o.sum() for o in a), list(ours.parameters()))
    gb = torch.autograd.grad(sum(o.sum() for o in b), list(ref.parameters()))
    assert len(ga) == len(gb)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_from_torch_keeps_frozen_weights_frozen():
    ref = nn.GRU(3, 4, num_layers=2)
    ref.weight_ih_l0.requires_grad_(False)
    ref.bias_hh_l1.requires_grad_(False)
    ours = rnnrec_fast.from_torch(ref)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("backend", cpu_backends())
def test_cpu_modules_run_while_another_default_device_is_set(backend):
    """CPU modules called while torch.set_default_device names another device ('meta' standing
    for 'cuda' here): what torch.nn computes. Scratch and outputs made without a device went there:
    the numba inference path raised "can't convert meta device type tensor to numpy", the packed
    rows of a multi-layer training-mode call with dropout "not on the expected device meta"."""
    torch.manual_seed(case_seed(backend))
    x = torch.randn(7, 3, 5)
    lengths = torch.tensor([7, 5, 2])
    gru = rnnrec_fast.GRU(5, 16, num_layers=2, dropout=0.2, backend=backend)
    cell = rnnrec_fast.GRUCell(5, 16, backend=backend)
    rnn = rnnrec_fast.RNN(5, 16, nonlinearity="relu", backend=backend)
    calls = {
        "gru eval no_grad": lambda: gru.eval()(x)[0],
        "cell no_grad": lambda: cell(x[0]),
        "rnn inference": lambda: rnn(x)[1],
        "gru packed, training-mode dropout": lambda: gru.train()(pack_padded_sequence(x, lengths))[0].data,
        "op backward": lambda: torch.autograd.grad(rnn(x.requires_grad_())[0].sum(), [x] + list(rnn.parameters())),
    }
    for name, call in calls.items():
        modes = [torch.inference_mode] if name == "rnn inference" else [torch.no_grad] if "no_grad" in name \
            else [torch.enable_grad]
        with modes[0]():
            torch.manual_seed(1)
            want = call()
            torch.set_default_device("meta")
            try:
                torch.manual_seed(1)
                got = call()
            finally:
                torch.set_default_device(None)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        x.requires_grad_(False)


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
@pytest.mark.parametrize("case", ["tied_in_one_module", "plain_tensor_weight", "buffer_and_child",
                                  "re_registered_weight", "convertible_child"])
def test_conversion_keeps_a_modules_own_weight_layout_buffers_and_children(direction, case):
    """A weight tied under two names of one module stays one Parameter (named_parameters lists it
    once: the second name kept the twin's random weight, wrong outputs), a weight held as a plain
    tensor (deleted and set again, as WeightDrop does) stays a plain tensor that can be set again
    (the twin kept a random Parameter of that name too: wrong outputs, an extra state_dict key,
    torch's TypeError at the next assignment), a weight registered again keeps its place in the
    parameters' order, and buffers and submodules registered on it are kept (they were dropped),
    each in its own train / eval mode, a convertible one converted too, and one held in two places
    stays one; the converted module computes what the original does."""
    torch.manual_seed(case_seed(direction, case))
    src_lib = nn if direction == "from_torch" else rnnrec_fast
    convert = getattr(rnnrec_fast, direction)
    x = torch.randn(5, 2, 6)
    m = src_lib.GRU(6, 6, num_layers=2)
    if case == "tied_in_one_module":
        m.weight_hh_l1 = m.weight_hh_l0
        m.weight_ih_l1 = m.weight_hh_l0
    elif case == "plain_tensor_weight":
        w = m.weight_hh_l0.detach() * 0.5
        del m.weight_hh_l0
        m.weight_hh_l0 = w
    elif case == "buffer_and_child":
        m.register_buffer("step", torch.tensor(7))
        m.register_buffer("scratch", torch.ones(3), persistent=False)
        m.adapter = nn.Linear(6, 2)
        m.drop = nn.Dropout(0.5).eval()  # (the module itself in training mode)
    elif case == "re_registered_weight":  # (now last in _parameters: named_parameters', state_dict's order)
        w = m.weight_ih_l0
        del m.weight_ih_l0
        m.weight_ih_l0 = nn.Parameter(w.detach().clone())
    else:
        m.cell = src_lib.GRUCell(6, 6)
    model = nn.ModuleDict({"gru": m, "cell": m.cell}) if case == "convertible_child" else m
    c = convert(model)
    c = c["gru"] if case == "convertible_child" else c
    assert type(c).__module__ != type(m).__module__
    assert [n for n, _ in c.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert list(c.state_dict()) == list(m.state_dict())
    for (name, got), want in zip(c.state_dict().items(), m.state_dict().values()):
        assert torch.equal(got, want), name
    torch.testing.assert_close(c(x)[0], m(x)[0], rtol=1e-5, atol=1e-6)
    if case == "tied_in_one_module":
        assert c.weight_hh_l1 is c.weight_hh_l0 and c.weight_ih_l1 is c.weight_hh_l0
        assert len(list(c.parameters())) == len(list(m.parameters()))
    elif case == "plain_tensor_weight":
        assert "weight_hh_l0" not in c._parameters and not isinstance(c.weight_hh_l0, nn.Parameter)
        for mod in (m, c):
            mod.weight_hh_l0 = w * 2  # (a WeightDrop's step)
        torch.testing.assert_close(c(x)[0], m(x)[0], rtol=1e-5, atol=1e-6)
    elif case == "buffer_and_child":
        assert set(dict(c.named_buffers())) == {"step", "scratch"} and c.adapter is not m.adapter
        assert "scratch" not in c.state_dict()
        assert c.training and not c.drop.training
    elif case == "convertible_child":
        whole = convert(nn.ModuleDict({"gru": m, "cell": m.cell}))
        assert type(whole["gru"].cell).__module__ == type(c).__module__ and whole["gru"].cell is whole["cell"]
        assert type(convert(m).cell).__module__ == type(c).__module__


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
def test_conversion_of_a_module_graph_with_a_cycle_keeps_one_module(direction):
    """A module registered under itself, or under a child that points back at it (torch allows
    cycles in the module graph): the converted model points back at the converted module (it kept
    the unconverted copy there, one module made two of different libraries)."""
    src_lib = nn if direction == "from_torch" else rnnrec_fast
    convert = getattr(rnnrec_fast, direction)
    g = src_lib.GRU(3, 4)
    g.add_module("me", g)
    c = convert(g)
    assert c.me is c and [n for n, _ in c.named_modules()] == [""]
    r = src_lib.GRU(3, 4)
    r.add_module("c", nn.Module())
    r.c.add_module("back", r)
    seq = convert(nn.Sequential(r))
    assert seq[0].c.back is seq[0] and type(seq[0]).__module__ != type(r).__module__
    assert r.c.back is r  # (the original untouched)


def test_to_torch_refuses_a_gru4rec_model():
    """GRU4Rec's own code calls its recurrent layers with what only rnnrec_fast's modules take
    (resets; reset_after and the backend read from them): to_torch of a model holding one is
    refused by name (the converted model failed at its first call with an AttributeError)."""
    from rnnrec_fast.recsys.model import GRU4Rec

    with pytest.raises(TypeError, match="to_torch: GRU4Rec's own code calls its recurrent layers"):
        rnnrec_fast.to_torch(nn.Sequential(GRU4Rec(20, layers=[8, 8])))


def test_from_torch_and_to_torch_keep_shared_modules_tied_weights_hooks_and_attributes():
    """Converting a model keeps its structure as a deep copy does: a module held in two places
    stays one module (the second place was left a torch.nn module), a weight tied between a GRU and
    a cell stays one Parameter (it became two copies), and the converted modules keep their hooks and
    a user's attributes (they were dropped); the original model is untouched."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 4)
            self.again = self.gru
            self.cell = nn.GRUCell(4, 4)
            self.cell.weight_hh = self.gru.weight_hh_l0

    torch.manual_seed(3)
    model = Model()
    calls = []
    model.gru.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__module__))
    model.gru.note = "kept"
    ours = rnnrec_fast.from_torch(model)
    back = rnnrec_fast.to_torch(ours)
    for m, lib in ((ours, rnnrec_fast.GRU), (back, nn.GRU)):
        assert type(m.gru) is lib and m.again is m.gru and m.cell.weight_hh is m.gru.weight_hh_l0
        assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in model.parameters())
        assert m.gru.note == "kept"
    assert not {id(p) for p in model.parameters()} & {id(p) for p in ours.parameters()}
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ours.gru(x)[0], model.gru(x)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        back.gru(x)
    assert calls == ["rnnrec_fast.modules", "torch.nn.modules.rnn", "torch.nn.modules.rnn"]
    one = nn.GRUCell(3, 4)
    one.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    cell = rnnrec_fast.from_torch(one)
    assert cell.weight_hh is not one.weight_hh and torch.equal(cell.weight_hh, one.weight_hh)
    with torch.no_grad():
        cell(torch.randn(2, 3))
    assert calls[-1] == "pre"


@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_hx_on_another_device_is_refused_as_torch_nn_refuses_it(kind):
    """An hx on another device than the input raises InputError (a RuntimeError, as torch.nn's; it
    was the op's plain ValueError naming its own arguments). The meta device stands in for a GPU."""
    cell = kind.endswith("Cell")
    x = torch.randn(2, 3) if cell else torch.randn(2, 1, 3)
    hx = torch.zeros((2, 4) if cell else (1, 1, 4), device="meta")
    with pytest.raises(RuntimeError):
        getattr(nn, kind)(3, 4)(x, hx)
    with pytest.raises(InputError, match=rf"{kind}: hx is on meta but the input is on cpu"):
        getattr(rnnrec_fast, kind)(3, 4)(x, hx)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh"])
def test_autocast_computes_in_the_input_dtype(backend, kind):
    """Under CPU autocast the op computes in its inputs' dtype on every backend (what its fake kernel
    declares): the same outputs and gradients as without autocast (torch.nn.RNN would return bfloat16
    there; the numba backend used to crash on the bfloat16 products autocast made)."""
    torch.manual_seed(6)
    ref, ours = make_pair(kind, backend, torch.float32, input_size=4, hidden_size=5, num_layers=2)
    x = torch.randn(3, 2, 4, requires_grad=True)
    plain = ours(x)
    g_plain = torch.autograd.grad(plain[0].sum() + plain[1].sum(), [x] + list(ours.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            y, h = ours(x.detach())
            assert y.dtype == h.dtype == torch.float32
            assert torch.equal(y, plain[0].detach()) and torch.equal(h, plain[1].detach())
        cast = ours(x)
        assert cast[0].dtype == torch.float32
        g_cast = torch.autograd.grad(cast[0].sum() + cast[1].sum(), [x] + list(ours.parameters()))
    for a, b in zip(g_cast, g_plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh", "GRUCell"])
def test_autocast_takes_a_bfloat16_input_as_torch_nn(backend, kind):
    """Under CPU autocast a float32 module takes a bfloat16 input (and hx), as torch.nn's take what
    autocast's ops make (a bfloat16 Linear before the GRU), and computes in the weights' dtype: the
    result of the input converted to float32 (it was refused: 'w_ih has dtype torch.float32 but x
    has torch.bfloat16'). Outside autocast the mismatch is still refused, and so is a float64
    input or hx under autocast (torch.nn refuses it too; it was silently rounded to float32); a
    bfloat16 module takes float32 input and hx there, as torch.nn's does."""
    torch.manual_seed(12)
    if kind == "GRUCell":
        ours = rnnrec_fast.GRUCell(4, 5, backend=backend)
        x, hx = torch.randn(2, 4).bfloat16(), torch.randn(2, 5).bfloat16()
    else:
        _, ours = make_pair(kind, backend, torch.float32, input_size=4, hidden_size=5, num_layers=2)
        x, hx = torch.randn(3, 2, 4).bfloat16(), torch.randn(2, 2, 5).bfloat16()
    want = ours(x.float(), hx.float())
    for grad_mode in (torch.enable_grad, torch.inference_mode):
        for xi, hi in ((x, hx), (x.float(), hx), (x, hx.float())):  # either one or both in bfloat16
            with grad_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                got = ours(xi, hi)
            for g, w in zip(got if kind != "GRUCell" else [got], want if kind != "GRUCell" else [want]):
                assert g.dtype == torch.float32
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        ours(x, hx)
    for xi, hi in ((x.double(), hx.float()), (x.float(), hx.double())):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises((ValueError, RuntimeError), match="dtype"):
            ours(xi, hi)
    # a bfloat16 module under autocast takes float32 input and hx (torch.nn does): computed in bfloat16
    low = ours.bfloat16()
    low.backend = "auto"  # (half precision runs on the reference backend)
    want = low(x, hx)
    for xi, hi in ((x.float(), hx), (x, hx.float()), (x.float(), hx.float())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = low(xi, hi)
        for g, w in zip(got if kind != "GRUCell" else [got], want if kind != "GRUCell" else [want]):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def _memory_case_pair(kind, backend):
    """torch.nn's module and ours with its weights (a 2-layer sequence module or a cell of 3 -> 4),
    an input, an hx and the name of a recurrent weight, for the tests of unusual tensor memory."""
    if kind == "GRUCell":
        ref = nn.GRUCell(3, 4)
        ours = rnnrec_fast.GRUCell(3, 4, backend=backend)
        ours.load_state_dict(ref.state_dict())
        return ref, ours, torch.randn(2, 3), torch.randn(2, 4), "weight_hh"
    ref, ours = make_pair(kind, backend, torch.float32, input_size=3, hidden_size=4, num_layers=2)
    return ref, ours, torch.randn(5, 2, 3), torch.randn(2, 2, 4), "weight_hh_l1"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_relu", "GRUCell"])
@pytest.mark.parametrize("form", ["negative bit", "zero tensor"])
def test_unusual_tensor_memory_read_by_value(backend, kind, form):
    """An input, hx or weight whose memory is not its values gives torch.nn's result in every grad
    mode: one with the negative bit (a lazily negated view: x.conj().imag, torch._neg_view; its
    memory holds the values' negation), or an efficient zero tensor (torch._efficientzerotensor: no
    memory behind it). The inference fast paths read raw memory (cpp: the sign was wrong, silently,
    and 'data is not allocated yet'; numba: NumPy's 'negative bit' error, 'Cannot convert a
    ZeroTensor to numpy'); the op's dispatcher resolves both."""
    ours_form, torch_form = {"negative bit": (lambda v: torch._neg_view(-v), lambda v: v),
                             "zero tensor": (lambda v: torch._efficientzerotensor(v.shape), torch.zeros_like)}[form]
    torch.manual_seed(21)
    ref, ours, x, hx, wname = _memory_case_pair(kind, backend)
    w = getattr(ref, wname).detach().clone()
    for grad_mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        for where in ("input", "hx", "weight"):
            xi, hi = (ours_form(x) if where == "input" else x), (ours_form(hx) if where == "hx" else hx)
            xr, hr = (torch_form(x) if where == "input" else x), (torch_form(hx) if where == "hx" else hx)
            if where == "weight":  # (a zero tensor cannot require grad)
                setattr(ours, wname, nn.Parameter(ours_form(w), requires_grad=form == "negative bit"))
                setattr(ref, wname, nn.Parameter(torch_form(w)))
            else:
                setattr(ours, wname, nn.Parameter(w.clone()))
                setattr(ref, wname, nn.Parameter(w.clone()))
            with grad_mode():
                got, want = ours(xi, hi), ref(xr, hr)
            for g, r in zip(got if kind != "GRUCell" else [got], want if kind != "GRUCell" else [want]):
                assert_close(g, r, torch.float32, f"{grad_mode.__name__}, {where}")


class _Wrapped(torch.Tensor):
    """A tensor subclass holding another tensor (torch.Tensor._make_wrapper_subclass: no memory of
    its own), unwrapping it for every op, as DTensor-like subclasses do."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=inner.device, requires_grad=False)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.inner if isinstance(a, _Wrapped) else a  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return _Wrapped(out) if func is torch.ops.aten.detach.default else out  # (nn.Parameter detaches)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_subclass_weights_and_functionalize_as_torch_nn(backend, kind):
    """A weight that is a wrapper tensor subclass, and a call under torch.func.functionalize, give
    torch.nn's result without autograd: the inference fast paths read such tensors' memory, which
    they have none of (cpp: 'data is not allocated yet'; numba: '.numpy() is not supported for
    tensor subclasses'); the op's call goes through their dispatch."""
    torch.manual_seed(25)
    ref, ours, x, hx, wname = _memory_case_pair(kind, backend)
    if kind != "GRUCell":
        hx = hx[:ours.num_layers]
    want = ref(x, hx)
    with torch.no_grad():
        got = torch.func.functionalize(lambda a, b: ours(a, b))(x, hx)
        for g, r in zip(got if kind != "GRUCell" else [got], want if kind != "GRUCell" else [want]):
            assert_close(g, r, torch.float32, "functionalize")
        setattr(ours, wname, nn.Parameter(_Wrapped(getattr(ref, wname).detach().clone()), requires_grad=False))
        got = ours(x, hx)
    for g, r in zip(got if kind != "GRUCell" else [got], want if kind != "GRUCell" else [want]):
        assert_close(g, r, torch.float32, "wrapper subclass weight")


class _Seen(torch.Tensor):
    """A __torch_function__ subclass: what torch computes with it keeps the subclass."""


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_function_subclass_weights_as_torch_nn(backend, kind):
    """Weights of a __torch_function__ subclass (Parameters of it) on a bidirectional module, given a
    tensor or a PackedSequence, with or without autograd: the outputs are of the subclass and equal
    to torch.nn's. The C++ inference plan steps aside for such weights, as its autograd path did
    (it returned plain tensors without autograd, the subclass never seeing the call), and a
    packed output's unpadding is ATen's (which keeps the subclass), not the C++ copy that serves
    plain tensors (which returned a plain tensor: from a mutation check)."""
    torch.manual_seed(29)
    mods = [getattr(rnnrec_fast, kind)(3, 4, bidirectional=True, dtype=torch.float64, backend=backend)]
    mods.append(getattr(nn, kind)(3, 4, bidirectional=True, dtype=torch.float64))
    mods[1].load_state_dict(mods[0].state_dict())
    for m in mods:
        for name, p in list(m.named_parameters()):
            setattr(m, name, nn.Parameter(p.detach().as_subclass(_Seen)))
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for inp in (x, packed):
        assert_outputs_of_the_subclass_as_torch_nn(mods, (inp,))


def assert_outputs_of_the_subclass_as_torch_nn(mods, args):
    """mods[0] (ours) and mods[1] (its torch.nn twin) called on args, under no_grad and with
    autograd: both outputs (a PackedSequence's data) and h_n are _Seen, with equal values."""
    plain = lambda t: t.as_subclass(torch.Tensor)  # noqa: E731
    for grad_mode in (torch.no_grad, torch.enable_grad):
        with grad_mode():
            (out, h_n), (want_out, want_h) = (m(*args) for m in mods)
        if isinstance(want_out, PackedSequence):  # (ours must be one too: .data)
            out, want_out = out.data, want_out.data
        assert type(want_out) is _Seen and type(want_h) is _Seen  # (torch.nn's)
        assert type(out) is _Seen and type(h_n) is _Seen, (grad_mode.__name__, type(args[0]).__name__)
        torch.testing.assert_close(plain(out), plain(want_out), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(plain(h_n), plain(want_h), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("where", ["input", "hx", "packed data"])
def test_function_subclass_inputs_as_torch_nn(backend, where):
    """An input, hx or PackedSequence data of a __torch_function__ subclass (plain weights), with or
    without autograd: the subclass sees the call and the outputs are of it, equal to torch.nn's, as
    for such weights above; the C++ plan steps aside (from a mutation review: its checks that hx
    and a PackedSequence's data are plain tensors exactly were untested, and without them it
    returned plain tensors the subclass never saw)."""
    torch.manual_seed(30)
    mods = [rnnrec_fast.GRU(3, 4, num_layers=2, dtype=torch.float64, backend=backend)]
    mods.append(nn.GRU(3, 4, num_layers=2, dtype=torch.float64))
    mods[1].load_state_dict(mods[0].state_dict())
    x, hx = torch.randn(5, 3, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    if where == "input":
        args = (x.as_subclass(_Seen), hx)
    elif where == "hx":
        args = (x, hx.as_subclass(_Seen))
    else:
        p = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
        args = (PackedSequence(p.data.as_subclass(_Seen), *p[1:]), hx)
    assert_outputs_of_the_subclass_as_torch_nn(mods, args)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_relu", "GRUCell"])
def test_freed_or_shrunk_storage_is_refused(backend, kind):
    """A weight, input or hx whose storage was freed or shrunk after it was made (FSDP frees
    parameters with untyped_storage().resize_(0)) is an error naming it in every grad mode, as
    torch.nn raises one: the kernels read past the end of the memory (NaN, or a crash for a large
    x). The op's own checks are tested in test_errors.py."""
    torch.manual_seed(24)
    if kind == "GRUCell":
        ours = rnnrec_fast.GRUCell(3, 4, backend=backend)
        x, hx, wname, opname = torch.randn(2, 3), torch.randn(2, 4), "weight_hh", "w_hh"
    else:
        _, ours = make_pair(kind, backend, torch.float32, input_size=3, hidden_size=4, num_layers=2)
        x, hx, wname, opname = torch.randn(5, 2, 3), torch.randn(2, 2, 4), "weight_ih_l1", "w_ih"
    w = getattr(ours, wname).detach().clone()

    for grad_mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        for where, name in (("input", "x"), ("hx", "h0"), ("weight", opname), ("freed weight", opname)):
            xi = shrunk(x.clone(), 8) if where == "input" else x
            hi = shrunk(hx.clone(), 8) if where == "hx" else hx
            wi = shrunk(w.clone(), 0 if where == "freed weight" else 8) if "weight" in where else w
            setattr(ours, wname, nn.Parameter(wi))
            n = 0 if where == "freed weight" else 8
            # (ours, or torch's own error where the module's view of the input or hx sees it first)
            with grad_mode(), pytest.raises((ValueError, RuntimeError),
                                            match=f"({name} reaches .* bytes into its storage, which holds {n}: "
                                                  f"its memory was freed|out of bounds for storage of size {n})"):
                ours(xi, hi)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_gradient_through_a_nan_state_as_torch_nn(backend, dtype):
    """RNN(nonlinearity='relu') backward as torch's threshold_backward: 0 where the state is <= 0,
    else the incoming gradient, so a NaN state passes it on (a mask 'h > 0' dropped it: finite
    gradients of earlier steps, h0 and the weights differed from torch.nn)."""
    torch.manual_seed(22)
    ref, ours = make_pair("RNN_relu", backend, dtype, input_size=2, hidden_size=3)
    x = torch.randn(4, 2, 2, dtype=dtype)
    x[1, 0, 0] = float("nan")
    h0 = torch.randn(1, 2, 3, dtype=dtype)
    grads = []
    for m in (ref, ours):
        xx, hh = x.clone().requires_grad_(), h0.clone().requires_grad_()
        y, h_n = m(xx, hh)
        grads.append(torch.autograd.grad(y.sum() + h_n.sum(), [xx, hh] + list(m.parameters())))
    for g, r in zip(*reversed(grads)):
        assert torch.equal(torch.isnan(g), torch.isnan(r))
        torch.testing.assert_close(g, r, equal_nan=True, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                   atol=1e-5 if dtype == torch.float32 else 1e-10)
    assert torch.isfinite(grads[0][0][1, 0]).all()  # the NaN step's input gradient is finite in torch.nn


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_forward_ad_is_never_silently_dropped(backend, kind):
    """Forward-mode AD (a dual input inside forward_ad.dual_level), under no_grad as with autograd
    on: the output carries torch.nn's tangent (the inference fast paths had returned the output
    without its tangent; then the op refused forward mode), from the op's torch operations
    (last_backend() 'reference'); outside dual_level the fast path serves again."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(13)
    ours = (rnnrec_fast.GRU(4, 5, backend=backend) if kind == "GRU" else rnnrec_fast.GRUCell(4, 5, backend=backend))
    ref = getattr(nn, kind)(4, 5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 4) if kind == "GRU" else torch.randn(2, 4)
    t = torch.randn_like(x)
    for grad_mode in (torch.no_grad, torch.enable_grad):  # (inference_mode makes no dual tensors)
        got = []
        for m in (ours, ref):
            with grad_mode(), fwAD.dual_level():
                out = m(fwAD.make_dual(x, t))
                out = out[0] if isinstance(out, tuple) else out
                got.append(fwAD.unpack_dual(out))
        assert rnnrec_fast.last_backend() == "reference" or backend == "reference"
        assert got[0].tangent is not None
        torch.testing.assert_close(got[0].primal, got[1].primal, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0].tangent, got[1].tangent, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours(x)  # and outside dual_level the fast path serves again
    assert rnnrec_fast.last_backend() == backend


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_forward_ad_through_a_packed_bidirectional_module(kind):
    """Forward-mode AD through a PackedSequence into a bidirectional module: its padding, the
    reverse direction's per-row reversal and its unpadding (C++ copies on the CPU, which carry no
    tangent) step aside for ATen's index ops inside dual_level, so out.data and h_n carry
    torch.nn's tangents, under no_grad and with autograd on (with the copies taken there the
    tangent was dropped: None, from a mutation check)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(19)
    ours = getattr(rnnrec_fast, kind)(3, 4, bidirectional=True, dtype=torch.float64)
    ref = getattr(nn, kind)(3, 4, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    lengths = torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), lengths, enforce_sorted=False)
    tangent = torch.randn_like(packed.data)
    for grad_mode in (torch.no_grad, torch.enable_grad):
        got = []
        for m in (ours, ref):
            with grad_mode(), fwAD.dual_level():
                dual = PackedSequence(fwAD.make_dual(packed.data, tangent), packed.batch_sizes,
                                      packed.sorted_indices, packed.unsorted_indices)
                out, h_n = m(dual)
                got.append([fwAD.unpack_dual(out.data), fwAD.unpack_dual(h_n)])
        for (mine, theirs) in zip(*got):
            assert mine.tangent is not None
            torch.testing.assert_close(mine.primal, theirs.primal, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mine.tangent, theirs.tangent, rtol=1e-10, atol=1e-12)


def _transform_case(kind, backend):
    """(module, call(x, params=None) -> the sequence output, x) for the torch.func tests: a GRU, a
    GRUCell or the op called with a GRU's weights (params: functional_call's mapping)."""
    from torch.func import functional_call

    if kind == "op":
        m = rnnrec_fast.GRU(4, 5, backend=backend)

        def call(x, params=None):
            p = dict(m.named_parameters()) if params is None else params
            return rnnrec_fast.recurrence(x, None, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                                          p["bias_hh_l0"], backend=backend)[0]
        return m, call, torch.randn(3, 2, 4)
    m = getattr(rnnrec_fast, kind.split("-")[0])(4, 5, backend=backend, **_TRANSFORM_KWARGS.get(kind, {}))

    def call(x, params=None):
        out = m(x) if params is None else functional_call(m, params, (x,))
        return out[0] if isinstance(out, tuple) else out
    return m, call, torch.randn(2, 4) if kind == "GRUCell" else torch.randn(3, 2, 4)


_TRANSFORM_KWARGS = {"RNN-relu-2-bi": dict(nonlinearity="relu", num_layers=2, bidirectional=True)}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell", "op", "RNN-relu-2-bi"])
def test_forward_mode_ad_matches_torch_nn_on_every_autograd_path(backend, kind):
    """torch.func.jvp / jacfwd (a tangent on the input or, through functional_call, on a weight,
    also around vmap) and torch.autograd.forward_ad (no_grad or not) give torch.nn's tangents,
    whichever autograd registration would serve the call (the C++ one, CPU with the extension; the
    Python one, CUDA tensors and CPU without the extension: the Python-registration run of
    test_fallback.py runs this test too): the modules and rnnrec_fast.recurrence run the op's torch
    operations there (last_backend() 'reference'; before, a NotImplementedError, and before that
    zeros from the Python registration). A dual_level with no tangent on the call's tensors runs
    the kernels."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(17)
    m, call, x = _transform_case(kind, backend)
    twin = _torch_twin(kind, m)
    params = {n: p.detach() for n, p in m.named_parameters()}
    w_hh = "weight_hh" if kind == "GRUCell" else "weight_hh_l0"
    ones = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    bdim = 1 if x.dim() == 3 else 0

    def attempts(f):
        per_sample = [torch.func.jvp(lambda xi: f(xi.unsqueeze(bdim)), (xi,), (ti,))[1]
                      for xi, ti in zip(x.unbind(bdim), ones.unbind(bdim))]
        out = [
            torch.func.jvp(f, (x,), (ones,))[1],
            torch.func.jacfwd(f)(x),
            # (vmap's batched tensor: torch's "Batching rule not implemented for aten::_unpack_dual";
            # torch.nn's GRU has no batching rule: its samples one by one)
            (torch.func.jvp(torch.func.vmap(lambda xi: f(xi.unsqueeze(bdim)), in_dims=bdim), (x,), (ones,))[1]
             if f is call else torch.stack(per_sample)),
            torch.func.jvp(lambda w: f(x, {**params, w_hh: w}), (params[w_hh],),
                           (torch.ones_like(params[w_hh]),))[1],
        ]
        for grad_mode in (torch.no_grad, torch.enable_grad):
            with grad_mode(), fwAD.dual_level():
                out.append(fwAD.unpack_dual(f(fwAD.make_dual(x, ones))).tangent)
        # torch.func.grad inside a dual_level, the tangent on x (invisible inside the grad level: the
        # call took the autograd function, whose jvp raised; from a review)
        with fwAD.dual_level():
            xd = fwAD.make_dual(x, ones)
            g = torch.func.grad(lambda w: f(xd, {**params, w_hh: w}).square().sum())(params[w_hh])
            out.append(fwAD.unpack_dual(g).tangent)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch's per-sample fallback warning)
        got, want = attempts(call), attempts(twin)
    assert rnnrec_fast.last_backend() == "reference"
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda msg: f"case {i}: {msg}")
    with fwAD.dual_level():  # forward AD elsewhere in a program: no tangent here, so the kernels run
        assert torch.equal(call(x), call(x.clone()))
    assert rnnrec_fast.last_backend() == backend


def _torch_twin(kind, m):
    """call(x, params=None) as _transform_case's, on the torch.nn module with m's weights."""
    from torch.func import functional_call

    ref = getattr(nn, "GRU" if kind == "op" else kind.split("-")[0])(4, 5, **_TRANSFORM_KWARGS.get(kind, {}))
    ref.load_state_dict(m.state_dict())

    def call(x, params=None):
        out = ref(x) if params is None else functional_call(ref, params, (x,))
        return out[0] if isinstance(out, tuple) else out
    return call


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell", "op", "RNN-relu-2-bi"])
def test_reverse_mode_func_transforms_match_torch_nn(backend, kind):
    """torch.func.grad / vjp / jacrev, composed with vmap either way round (per-sample gradients),
    through functional_call on the weights, under a no_grad inside the transform, and on tensors
    the transform does not track, give torch.nn's results, on every autograd registration (the
    Python-registration run of test_fallback.py runs this test too). torch refused both registered
    autograd kernels there ("cannot use C++ torch::autograd::Function with functorch transforms";
    "must override the setup_context staticmethod"): the modules and rnnrec_fast.recurrence call
    the op through an autograd function functorch runs. Second derivatives raise as double
    backward does; vmap alone and torch.autograd.functional.jacobian match too."""
    torch.manual_seed(19)
    m, call, x = _transform_case(kind, backend)
    twin = _torch_twin(kind, m)
    bdim = 1 if x.dim() == 3 else 0
    params = dict(m.named_parameters())

    def cases(f):
        one = (lambda xi: f(xi.unsqueeze(bdim)).sum())
        # (torch.nn's GRU has no batching rule: a loop over the samples stands in for vmap there)
        vmap_one = (torch.func.vmap(one, in_dims=bdim) if f is call else
                    lambda i: torch.stack([one(xi) for xi in i.unbind(bdim)]))
        per_sample = (torch.func.vmap(torch.func.grad(one), in_dims=bdim, out_dims=bdim)(x) if f is call else
                      torch.stack([torch.func.grad(one)(xi) for xi in x.unbind(bdim)], bdim))

        def under_no_grad(i):
            with torch.no_grad():
                y = f(i)
            return (i.sin().sum() * y).sum()
        return [
            torch.func.grad(lambda i: f(i).square().sum())(x),
            torch.func.vjp(f, x)[1](torch.linspace(-1, 1, f(x).numel()).reshape(f(x).shape))[0],
            torch.func.jacrev(f)(x),
            per_sample,
            torch.func.grad(lambda i: vmap_one(i).square().sum())(x),
            torch.func.grad(lambda p: f(x, p).square().sum())(params),
            torch.func.grad(under_no_grad)(x),
            torch.func.grad(lambda i: (i.cos() * f(torch.ones_like(x)).sum()).sum())(x),  # (an untracked call)
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch's per-sample fallback warning)
        got, want = cases(call), cases(twin)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda msg: f"case {i}: {msg}")
    assert got[6].grad_fn is None and got[7].grad_fn is not None  # (the weights: recorded only with grad on)
    assert want[6].grad_fn is None and want[7].grad_fn is not None
    # second derivatives (the op's torch operations run there): jacrev of jacrev, hessian (jacfwd of
    # jacrev), grad of grad, as torch.nn's
    for second in (lambda f: torch.func.jacrev(torch.func.jacrev(lambda i: f(i).square().sum()))(x),
                   lambda f: torch.func.hessian(lambda i: f(i).square().sum())(x),
                   lambda f: torch.func.grad(lambda i: torch.func.grad(lambda j: f(j).square().sum())(i).sin().sum())(x)):
        torch.testing.assert_close(second(call), second(twin), rtol=1e-5, atol=1e-6)
        assert rnnrec_fast.last_backend() == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = torch.func.vmap(lambda xi: call(xi.unsqueeze(bdim)), in_dims=bdim)(x)
    want = torch.stack([twin(x.narrow(bdim, b, 1)) for b in range(x.shape[bdim])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    jac = torch.autograd.functional.jacobian(call, x)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(twin, x), rtol=1e-5, atol=1e-6)


# (class, constructor keywords, a non-contiguous hx) of test_reverse_mode_func_untracked_no_grad_calls
_UNTRACKED_CASES = {
    "GRU-batch_first": ("GRU", dict(batch_first=True), False),
    "GRU-hx": ("GRU", {}, True),
    "GRU-2": ("GRU", dict(num_layers=2), False),
    "RNN-relu-batch_first": ("RNN", dict(batch_first=True, nonlinearity="relu"), False),
    "GRUCell": ("GRUCell", {}, False),
    "GRUCell-hx": ("GRUCell", {}, True),
}


@pytest.mark.parametrize("backend", ["auto"] + cpu_backends())
@pytest.mark.parametrize("kind", list(_UNTRACKED_CASES))
def test_reverse_mode_func_untracked_no_grad_calls_match_torch_nn(backend, kind):
    """Inside torch.func.grad / vjp / jvp, a no_grad call on tensors the transform does not track
    (a frozen model, a target network) gives torch.nn's result: the inference fast paths step aside
    there (a grad or jvp level wraps the result of every ATen call made inside it, plain inputs or
    not, and the Python plan's detached weights, the C++ plan's transposed batch_first input or
    contiguous hx, were such wrappers: "Cannot access data pointer of Tensor that doesn't have
    storage"); vmap alone too."""
    torch.manual_seed(23)
    base, kw, odd_hx = _UNTRACKED_CASES[kind]
    ours = getattr(rnnrec_fast, base)(3, 4, backend=backend, **kw)
    ref = getattr(nn, base)(3, 4, **kw)
    ref.load_state_dict(ours.state_dict())
    cell = base.endswith("Cell")
    x = torch.randn(2, 3) if cell else torch.randn(2, 5, 3) if kw.get("batch_first") else torch.randn(5, 2, 3)
    hx = None
    if odd_hx:  # a non-contiguous hx
        hx = torch.randn(4, 2).t() if cell else torch.randn(1, 4, 2).transpose(1, 2)
    w = torch.randn(4)

    def results(m):
        def f(v):
            with torch.no_grad():
                out = m(x) if hx is None else m(x, hx)
            return ((out if cell else out[0]) * v).sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return [torch.func.grad(f)(w), torch.func.vjp(f, w)[1](torch.tensor(2.0))[0],
                    torch.func.jvp(f, (w,), (torch.ones(4),))[1], torch.func.vmap(f)(torch.stack([w, 2 * w]))]
    for i, (got, want) in enumerate(zip(results(ours), results(ref))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"case {i}: {m}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell", "op"])
def test_forward_mode_func_jvp_runs_calls_without_a_tangent_as_torch_nn(backend, kind):
    """torch.func.jvp / jacfwd of a function whose recurrent call gets no tangent (the tangent is on a
    head's weights, the RNN's inputs and weights are not the transform's) give torch.nn's result, with
    grad on and under no_grad: the jvp level refused both registered autograd kernels there ("cannot
    use C++ torch::autograd::Function with functorch transforms"), so the call goes through the
    autograd function as under grad, whose jvp refuses only a tangent that reaches it."""
    torch.manual_seed(29)
    m, call, x = _transform_case(kind, backend)
    twin = _torch_twin(kind, m)
    head = torch.randn(5)
    for grad_mode in (torch.enable_grad, torch.no_grad):
        def results(f):
            def features():
                with grad_mode():
                    return f(x)
            return [torch.func.jvp(lambda w: (features() * w).sum(-1), (head,), (torch.ones(5),))[1],
                    torch.func.jacfwd(lambda w: (features() * w).sum(-1))(head)]
        for got, want in zip(results(call), results(twin)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell", "op"])
def test_reverse_mode_func_transforms_with_functionalize_are_refused_clearly(backend, kind):
    """torch.func.functionalize around or inside grad / jacrev raises an error naming the package and
    the way out (torch's was "NYI: Functionalize rule for custom_function_call", for the autograd
    function those transforms run the op through); functionalize alone runs and matches torch.nn."""
    torch.manual_seed(31)
    m, call, x = _transform_case(kind, backend)
    twin = _torch_twin(kind, m)
    for attempt in (lambda: torch.func.grad(lambda i: torch.func.functionalize(call)(i).sum())(x),
                    lambda: torch.func.functionalize(torch.func.grad(lambda i: call(i).sum()))(x),
                    lambda: torch.func.functionalize(torch.func.jacrev(call))(x)):
        with pytest.raises(NotImplementedError, match=r"functionalize .*rnnrec_fast\.to_torch"):
            attempt()
    torch.testing.assert_close(torch.func.functionalize(call)(x), twin(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_compiled_functionalize_of_grad_gives_torch_nns_gradient(kind):
    """torch.compile of functionalize(grad(f)) on a module, which eager mode refuses (above), runs:
    dynamo takes the transforms over and traces the module as the op's torch operations, so the
    refusal's check stays out of the traced call (ops._grad_transform_traced: no name, no raise), and
    the gradient is torch.nn's (from a mutation review: the check raising there too passed the suite)."""
    torch.manual_seed(32)
    m = getattr(rnnrec_fast, kind)(3, 4, dtype=torch.float64)
    twin = rnnrec_fast.to_torch(m)
    x = torch.randn((5, 2, 3) if kind == "GRU" else (2, 3), dtype=torch.float64)

    def loss(module):
        return (lambda i: module(i)[0].sum()) if kind == "GRU" else (lambda i: module(i).sum())

    f = torch.func.functionalize(torch.func.grad(loss(m)))
    with pytest.raises(NotImplementedError, match=r"functionalize .*rnnrec_fast\.to_torch"):
        f(x)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (dynamo's graph-break notes)
        got = torch.compile(f, backend="eager")(x)
    torch.testing.assert_close(got, torch.func.grad(loss(twin))(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nograd", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_func_transforms_over_a_closed_over_strided_packed_sequence(transform, nograd):
    """A call on a PackedSequence of plain, non-contiguous data (and a plain hx) made inside a
    torch.func transform that does not reach it: the value the call has outside the transform
    (torch.nn's own call raises "Cannot access data pointer" under grad here). The C++ plan's
    packed paths step aside inside a transform, as its dense ones do: their copy of the data
    would be the transform's wrapper, without memory (from a mutation review: without that check
    grad raised, and vmap with autograd on refused the C++ padding function)."""
    if transform == "grad":
        try:  # (torch 2.4: Tensor.tolist() of a closed-over tensor inside grad, as reading batch_sizes does)
            torch.func.grad(lambda s: s * torch.tensor([1.0]).tolist()[0])(torch.tensor(1.0))
        except RuntimeError as e:
            pytest.skip(f"this torch cannot read a closed-over tensor's values inside torch.func.grad: {e}")
    torch.manual_seed(37)
    m = rnnrec_fast.GRU(3, 4)
    p = pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    packed = PackedSequence(torch.randn(p.data.shape[0], 6)[:, ::2], p.batch_sizes, None, None)
    hx = torch.randn(1, 2, 4)

    def total():
        with torch.no_grad() if nograd else torch.enable_grad():
            out, h_n = m(packed, hx)
        return (out.data.sum() + h_n.sum()).detach()

    want = total()
    if transform == "grad":
        got = torch.func.grad(lambda s: total() * s)(torch.tensor(2.0))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        got = torch.func.vmap(lambda s: total() * s)(torch.tensor([1.0, 2.0]))
        torch.testing.assert_close(got, torch.stack([want, 2 * want]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_reverse_mode_func_keeps_h_n_in_place(backend):
    """h_n is no view, as torch.nn's: `h_n.detach_()` works for a batch of zero rows (as before the
    autograd function of torch.func's transforms came in) and inside torch.func.grad (a view there)."""
    torch.manual_seed(37)
    ours = rnnrec_fast.GRU(3, 4, backend=backend)
    ref = nn.GRU(3, 4)
    ref.load_state_dict(ours.state_dict())
    for m in (ours, ref):
        _, h_n = m(torch.randn(5, 0, 3, requires_grad=True))
        assert h_n._base is None
        h_n.detach_()

    def loss(m):
        def f(i):
            y, h_n = m(i)
            return y.square().sum() + h_n.detach_().sum()
        return f
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(ref))(x), rtol=1e-5, atol=1e-6)


def test_recommender_score_keeps_forward_ad_tangents():
    """GRU4Rec.score's few-rows kernel steps aside under forward-mode AD: the tangent of the scores
    is torch's (it was dropped)."""
    import torch.autograd.forward_ad as fwAD

    from rnnrec_fast.recsys import GRU4Rec

    torch.manual_seed(15)
    m = GRU4Rec(50, [16]).eval()
    h, t = torch.randn(1, 16), torch.randn(1, 16)
    with torch.no_grad(), fwAD.dual_level():
        tangent = fwAD.unpack_dual(m.score(fwAD.make_dual(h, t))).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, t @ m.Wy.detach().t())


@pytest.mark.parametrize("how", ["subclass", "instance"])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_a_users_forward_is_always_called(how, kind):
    """A subclass's forward, or one set on the instance (as wrappers such as accelerate's hooks
    do), runs under no_grad / inference_mode too: the inference shortcut skipped it there."""
    base = getattr(rnnrec_fast, kind)
    if how == "subclass":
        class Scaled(base):
            def forward(self, *a, **k):
                out = super().forward(*a, **k)
                return (out[0] * 0 + 42.0, out[1]) if isinstance(out, tuple) else out * 0 + 42.0
        m = Scaled(4, 5)
    else:
        m = base(4, 5)
        plain = m.forward
        m.forward = lambda *a, **k: (lambda out: (out[0] * 0 + 42.0, out[1]) if isinstance(out, tuple)
                                     else out * 0 + 42.0)(plain(*a, **k))
    x = torch.randn(3, 2, 4) if kind == "GRU" else torch.randn(2, 4)
    for grad_mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with grad_mode():
            out = m(x)
        assert torch.all((out[0] if kind == "GRU" else out) == 42.0), grad_mode


@pytest.mark.parametrize("backend", ["auto", "reference"])  # the C++ whole-call entry; a Python plan
@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_a_patched_module_call_sees_every_call(monkeypatch, backend, kind):
    """A global call wrapper (nn.Module.__call__ patched, for logging or tracing) sees torch.nn's
    calls in every grad mode; the no-grad shortcut went around it."""
    seen = []
    torch_call = torch.nn.Module.__call__

    def wrapper(self, *a, **k):
        seen.append(type(self).__name__)
        return torch_call(self, *a, **k)

    m = getattr(rnnrec_fast, kind)(4, 5, backend=backend)
    x = torch.randn(3, 2, 4) if kind in ("GRU", "RNN") else torch.randn(2, 4)
    with torch.no_grad():
        want = m(x)
    monkeypatch.setattr(torch.nn.Module, "__call__", wrapper)
    for grad_mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with grad_mode():
            out = m(x)
        assert seen == [kind], (grad_mode, seen)
        seen.clear()
        for got, ref in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    monkeypatch.undo()
    with torch.no_grad():
        m(x)
    assert not seen


@pytest.mark.parametrize("layout", ["unbatched", "packed_batch_first", "packed", "batch_first", "time_major"])
def test_resets_laid_out_as_the_input(layout):
    """resets take the input's layout: (T,) for an unbatched input, (B, T) with batch_first, else
    (T, B), a PackedSequence as its padded form (original batch order); the wrong layout raises
    naming the right shape. Checked against running the two halves of a sequence separately."""
    torch.manual_seed(14)
    T, B = 5, 2
    bf = layout in ("packed_batch_first", "batch_first")
    gru = rnnrec_fast.GRU(4, 6, batch_first=bf)
    xs = torch.randn(T, B, 4)
    r = torch.zeros(T, B, dtype=torch.bool)
    r[3, :] = True
    with torch.no_grad():
        want = torch.cat([gru(xs[:3].transpose(0, 1) if bf else xs[:3])[0],
                          gru(xs[3:].transpose(0, 1) if bf else xs[3:])[0]], dim=1 if bf else 0)
        if layout == "unbatched":
            x, res, want = xs[:, 0], r[:, 0], want[:, 0]
            wrong = r[:, :1]
        elif layout.startswith("packed"):
            x = pack_padded_sequence(xs, torch.tensor([T, T]), enforce_sorted=False)
            res = r.t() if bf else r
            wrong = r if bf else r.t()
            want = want.transpose(0, 1) if bf else want
        else:
            x = xs.transpose(0, 1) if bf else xs
            res = r.t() if bf else r
            wrong = r if bf else r.t()
        y = gru(x, resets=res)[0]
        if layout.startswith("packed"):
            y = torch.nn.utils.rnn.pad_packed_sequence(y)[0]
        torch.testing.assert_close(y, want)
        want_shape = (T,) if layout == "unbatched" else (B, T) if bf else (T, B)
        with pytest.raises(ValueError, match=re.escape(f"shape {want_shape}")):
            gru(x, resets=wrong)


@pytest.mark.parametrize("kind", KINDS)
def test_mode_attribute_as_torch(kind):
    """``mode`` reads as torch.nn's ("GRU", "RNN_TANH", "RNN_RELU"); a module pickled when it held the
    op's name ("gru", ...) still runs."""
    ref, ours = make_pair(kind, "auto", torch.float32, input_size=3, hidden_size=4)
    assert ours.mode == ref.mode
    x = torch.randn(2, 1, 3)
    expected = ref(x)[0]
    old = ours._op_mode
    ours.mode = old  # the attribute as modules pickled before held it
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(ours(x)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_vmap_over_modules(backend, grad):
    """torch.func.vmap runs the modules (the op through torch's per-sample fallback): the same as a
    loop, with autograd on or off (the fast paths decline vmap's batched tensors, which have no
    storage: they raised 'Cannot access data pointer' under no_grad)."""
    torch.manual_seed(0)
    m = rnnrec_fast.GRU(4, 5, num_layers=2, backend=backend)
    xs = torch.randn(3, 6, 2, 4)
    with torch.set_grad_enabled(grad):
        out = torch.func.vmap(lambda x: m(x)[0])(xs)
        loop = torch.stack([m(x)[0] for x in xs])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-6)


def test_repr_as_torch():
    """A module prints as its torch.nn namesake (plus the options torch.nn has not: a relu RNN, whose
    nonlinearity torch.nn's repr leaves out, reset_after=False, a forced backend)."""
    for kw in (dict(), dict(num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)):
        assert repr(rnnrec_fast.GRU(3, 4, **kw)) == repr(nn.GRU(3, 4, **kw))
        assert repr(rnnrec_fast.RNN(3, 4, **kw)) == repr(nn.RNN(3, 4, **kw))
    for kw in (dict(), dict(bias=False)):
        assert repr(rnnrec_fast.GRUCell(3, 4, **kw)) == repr(nn.GRUCell(3, 4, **kw))
    for kw in (dict(), dict(bias=False, nonlinearity="relu")):
        assert repr(rnnrec_fast.RNNCell(3, 4, **kw)) == repr(nn.RNNCell(3, 4, **kw))
    assert repr(rnnrec_fast.RNN(3, 4, nonlinearity="relu")) == "RNN(3, 4, nonlinearity='relu')"
    assert repr(rnnrec_fast.GRU(3, 4, reset_after=False, backend="numba")) == \
        "GRU(3, 4, reset_after=False, backend='numba')"


def test_from_torch_refuses_transformed_modules_clearly():
    """A parametrized or pruned torch.nn module, or a subclass, is refused with a message saying why
    (a pruned one failed inside load_state_dict); the plain module converts."""
    from torch.nn.utils import parametrizations, prune

    wn = parametrizations.weight_norm(nn.GRU(4, 5), "weight_hh_l0")
    pruned = nn.GRU(4, 5)
    prune.l1_unstructured(pruned, "weight_hh_l0", 0.5)
    old_wn = torch.nn.utils.weight_norm(nn.GRU(4, 5), "weight_hh_l0")  # the hook-based one: _g, _v
    for m in (wn, pruned, old_wn):
        with pytest.raises(ValueError, match="parametrized .* or pruned"):
            rnnrec_fast.from_torch(m)

    class MyGRU(nn.GRU):
        pass

    with pytest.raises(TypeError, match="a subclass of one"):
        rnnrec_fast.from_torch(MyGRU(4, 5))
    with pytest.raises(TypeError, match="got Linear$"):
        rnnrec_fast.from_torch(nn.Linear(4, 5))
    prune.remove(pruned, "weight_hh_l0")
    ours = rnnrec_fast.from_torch(pruned)
    x = torch.randn(3, 2, 4)
    assert_close(ours(x)[0], pruned(x)[0], torch.float32, "converted after prune.remove")


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_from_torch_refuses_a_projection_set_after_construction(kind):
    """torch.nn refuses proj_size for RNN / GRU at construction; one set on the module afterwards
    (which torch.nn's own checks then read) is refused by from_torch by name, not dropped silently
    (the converted module would have had no projection)."""
    m = getattr(nn, kind)(3, 4)
    m.proj_size = 2
    with pytest.raises(ValueError, match="from_torch: proj_size is not supported"):
        rnnrec_fast.from_torch(m)
    m.proj_size = 0
    assert type(rnnrec_fast.from_torch(m)) is getattr(rnnrec_fast, kind)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_flop_counter_counts_the_op_as_torch_nn(backend, kind):
    """torch.utils.flop_counter.FlopCounterMode counted 0 FLOPs for the op (no formula): it now
    counts torch.nn's for the forward (the matrix products, 2*T*B*G*H*(I+H) a layer and direction)
    and twice that for the op's backward, less the products the C++ kernel leaves out for inputs
    requiring no gradient (the other backends compute every gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    seq = kind in ("GRU", "RNN")
    ref = getattr(torch.nn, kind)(8, 16, **(dict(num_layers=2, bidirectional=True) if seq else {}))
    ours = rnnrec_fast.from_torch(ref, backend=backend)
    x = torch.randn(5, 3, 8) if seq else torch.randn(3, 8)
    counts = []
    for m in (ref, ours):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        counts.append(fc.get_total_flops())
    G, H = (3 if kind.startswith("GRU") else 1), 16
    B, T = 3, (5 if seq else 1)
    inputs = [8, 8, 32, 32] if seq else [8]  # each layer and direction's input size
    want = sum(2 * T * B * G * H * (i + H) for i in inputs)
    assert counts == [want, want]

    def backward_flops(x_grad=True, weights_grad=True):
        for p in ours.parameters():
            p.requires_grad_(weights_grad)
        with FlopCounterMode(display=False) as fc:
            out = ours(x.detach().requires_grad_(x_grad))
            (out[0] if seq else out).sum().backward()
        return fc.get_total_flops() - want

    cpp = ours.active_backend() == "cpp"
    # left out on the C++ kernel: h0's gradient, the first step's carry (no hx given: its state is
    # zeros requiring none), 2*B*G*H*H each layer and direction; x's, the first layer's input
    # gradient 2*T*B*G*H*I; the weights', 2*T*B*G*H*(I + H) each layer and direction
    carry0 = cpp * 2 * B * G * H * H * len(inputs)
    assert backward_flops() == 2 * want - carry0
    gx = 2 * T * B * G * H * 8 * (2 if seq else 1)
    assert backward_flops(x_grad=False) == 2 * want - carry0 - cpp * gx
    assert backward_flops(weights_grad=False) == 2 * want - carry0 - cpp * want
    # an hx requiring a gradient: its carry is computed (and counted)
    h = torch.zeros(len(inputs), B, H) if seq else torch.zeros(B, H)
    for p in ours.parameters():
        p.requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        out = ours(x.detach().requires_grad_(), h.requires_grad_())
        (out[0] if seq else out).sum().backward()
    assert fc.get_total_flops() == 3 * want


@pytest.mark.skipif(not rnnrec_fast.backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("frozen", ["weight_ih_l0", "weight_hh_l0"])
def test_forced_cpp_backend_leaves_out_the_gradients_auto_leaves_out(frozen):
    """A module forced onto backend="cpp" runs the C++ kernels as "auto" does on CPU float tensors,
    its backward included: a frozen weight's gradient product is left out, so the FLOP counter
    counts the same, and the other gradients are the same bits (from a mutation review: with
    "cpp" handed to the op's Python kernels, as another backend is, every test passed while the
    backward computed, and the counter counted, the frozen weight's product too)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(40)
    x = torch.randn(5, 3, 8)
    mods = [rnnrec_fast.GRU(8, 16, backend=b) for b in ("auto", "cpp")]
    mods[1].load_state_dict(mods[0].state_dict())
    counts, grads = [], []
    for m in mods:
        getattr(m, frozen).requires_grad_(False)
        with FlopCounterMode(display=False) as fc:
            out, h_n = m(x)
            (out.sum() + h_n.sum()).backward()
        assert rnnrec_fast.last_backend() == "cpp"
        counts.append(fc.get_total_flops())
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert counts[1] == counts[0]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_to_torch_gives_the_torch_nn_twin(kind):
    """to_torch: the torch.nn module with the same configuration, weights, frozen flags and mode
    (for what needs torch.nn's classes: quantize_dynamic, isinstance checks)."""
    torch.manual_seed(3)
    seq = kind in ("GRU", "RNN")
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.25) if seq else {}
    if kind.startswith("RNN"):
        kw["nonlinearity"] = "relu"
    ours = getattr(rnnrec_fast, kind)(4, 5, bias=False, dtype=torch.float64, **kw).eval()
    next(ours.parameters()).requires_grad_(False)
    twin = rnnrec_fast.to_torch(ours)
    assert type(twin) is getattr(nn, kind) and not twin.training
    assert repr(twin) == repr(ours).replace(", nonlinearity='relu'", "" if kind == "RNN" else ", nonlinearity='relu'")
    assert [(n, p.requires_grad) for n, p in twin.named_parameters()] == \
        [(n, p.requires_grad) for n, p in ours.named_parameters()]
    for (n, a), (_, b) in zip(twin.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n  # a copy
    x = torch.randn(3, 2, 4, dtype=torch.float64) if seq else torch.randn(3, 4, dtype=torch.float64)
    for got, want in zip(*(m(x) if seq else (m(x),) for m in (twin, ours))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="has no torch.nn counterpart"):
        if kind.startswith("GRU"):
            rnnrec_fast.to_torch(getattr(rnnrec_fast, kind)(4, 5, reset_after=False))
        else:
            raise ValueError("has no torch.nn counterpart")  # (the RNN kinds have no such form)


def test_whole_models_convert_both_ways_and_export_to_onnx():
    """from_torch / to_torch on a model: a copy with every recurrent module inside converted (others
    kept, the original untouched); a subclass of one is refused. The torch.nn copy exports to ONNX."""
    class Model(nn.Module):
        def __init__(self, lib):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.rnn = lib.GRU(4, 5, num_layers=2, batch_first=True)
            self.cells = nn.ModuleList([lib.RNNCell(5, 3)])
            self.lstm = nn.LSTM(3, 3)

        def forward(self, items):
            out, _ = self.rnn(self.emb(items))
            return self.cells[0](out[:, -1]), out

    torch.manual_seed(4)
    ref = Model(nn).eval()
    ours = rnnrec_fast.from_torch(ref)
    assert (type(ours.rnn), type(ours.cells[0]), type(ours.lstm)) == (rnnrec_fast.GRU, rnnrec_fast.RNNCell, nn.LSTM)
    assert type(ref.rnn) is nn.GRU and ours.emb is not ref.emb
    back = rnnrec_fast.to_torch(ours)
    assert (type(back.rnn), type(back.cells[0])) == (nn.GRU, nn.RNNCell) and type(ours.rnn) is rnnrec_fast.GRU
    items = torch.randint(0, 10, (2, 6))
    for m in (ours, back):
        for got, want in zip(m(items), ref(items)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    class MyGRU(nn.GRU):
        pass
    with pytest.raises(TypeError, match="got MyGRU .a subclass of one"):
        rnnrec_fast.from_torch(nn.Sequential(MyGRU(3, 4)))

    ort = pytest.importorskip("onnxruntime")  # (make test installs it)
    import io
    import warnings
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(back, (items,), buf, dynamo=False, input_names=["items"])
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"items": items.numpy()})
    for g, want in zip(got, ours(items)):
        torch.testing.assert_close(torch.from_numpy(g), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_documented_migration_differences_raise_clearly(kind):
    """What the README lists as differing from torch.nn raises instead of computing something else:
    an in-place change of the sequence output before backward() (it is saved for the backward, as
    cuDNN's GRU saves it), and detach_() of a batch_first sequence output. (Forward mode, once
    here, now gives torch.nn's tangents: test_forward_mode_ad_matches_torch_nn_on_every_autograd_path.)"""
    m = getattr(rnnrec_fast, kind)(4, 5)
    x = torch.randn(3, 2, 4) if kind == "GRU" else torch.randn(2, 4)
    out = (lambda y: y[0] if isinstance(y, tuple) else y)
    if kind == "GRU":
        for change in (lambda y: y.relu_(), lambda y: y.add_(1.0)):
            y = out(m(x))
            change(y)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
        y = out(m(x)).relu()  # the out-of-place form works
        y.sum().backward()
        # a batch_first output is a transposed view of the saved (T, B, H) one: detach_() refuses it
        # in place (torch.nn's is a tensor of its own), detach() works; h_n detaches in place
        y, h = rnnrec_fast.GRU(4, 5, batch_first=True)(x)
        with pytest.raises(RuntimeError, match="Can't detach views in-place"):
            y.detach_()
        assert not y.detach().requires_grad
        h.detach_()


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_active_backend_honours_the_device_argument(kind):
    """active_backend(device) answers for that device (a device type no backend runs on: refused).
    (From a mutation review: the argument was ignored and the suite, whose only such test needs a
    GPU, passed.)"""
    m = getattr(rnnrec_fast, kind)(3, 4)
    assert m.active_backend("cpu") == m.active_backend()
    with pytest.raises(ValueError, match="meta"):
        m.active_backend("meta")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_truncated_bptt_detaches_h_n_in_place_as_torch_nn(backend, num_layers, packed):
    """The truncated-BPTT loop `out, h = m(x, h); loss.backward(); h.detach_()` runs as on torch.nn,
    with its gradients: h_n is no view (a one-layer module's was `h.unsqueeze(0)`, and
    detach_() refused it: 'Can't detach views in-place')."""
    torch.manual_seed(5)
    ref = nn.GRU(3, 4, num_layers=num_layers, batch_first=True)
    ours = rnnrec_fast.from_torch(ref, backend=backend)
    chunks = [torch.randn(2, 5, 3) for _ in range(3)]
    lengths = torch.tensor([5, 3])
    h_ref = h_ours = None
    for x in chunks:
        grads = []
        for m, h in ((ref, h_ref), (ours, h_ours)):
            m.zero_grad()
            inp = pack_padded_sequence(x, lengths, batch_first=True) if packed else x
            out, h = m(inp, h)
            ((out.data if packed else out) ** 2).sum().add(h.sum()).backward()
            h.detach_()
            assert not h.requires_grad and h.grad_fn is None
            grads.append([p.grad.clone() for p in m.parameters()] + [h])
        h_ref, h_ours = grads[0][-1], grads[1][-1]
        for g, rg in zip(grads[1], grads[0]):
            assert_close(g, rg, torch.float32, "grad")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_h_n_of_an_inference_call_detaches_in_place_as_torch_nn(backend, num_layers, mode):
    """h_n of a call without autograd (each backend's inference plan) is no view either: `h.detach_()`
    works as on torch.nn (the reference backend's plan returned a one-layer module's h_n as
    `h.unsqueeze(0)`: 'Can't detach views in-place')."""
    torch.manual_seed(5)
    ref = nn.GRU(3, 4, num_layers=num_layers)
    ours = rnnrec_fast.from_torch(ref, backend=backend)
    x = torch.randn(5, 2, 3)
    for m in (ref, ours):
        with getattr(torch, mode)():
            out, h = m(x)
        assert h._base is None
        h.detach_()
    assert_close(h, ref(x)[1], torch.float32, "h_n")


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_constructor_argument_types_as_torch_nn(kind):
    """num_layers may be any integer, NumPy's too (np.random.choice in a hyperparameter search), as
    torch.nn takes it; the sizes must be Python ints, as torch.nn requires."""
    np = pytest.importorskip("numpy")
    for cls in (getattr(nn, kind), getattr(rnnrec_fast, kind)):
        m = cls(3, 4, num_layers=np.int64(2))
        assert m.num_layers == 2 and repr(m) == f"{kind}(3, 4, num_layers=2)" and len(m.all_weights) == 2
        with pytest.raises(TypeError, match="hidden_size should be of type int"):
            cls(3, np.int64(4))
        with pytest.raises(ValueError, match="num_layers must be greater than zero"):
            cls(3, 4, num_layers=np.int64(0))


def test_rnn_nonlinearity_given_twice_is_refused_as_torch_nn():
    """torch.nn.RNN refuses a nonlinearity given both positionally and as a keyword (TypeError);
    ours ran the positional one, silently dropping the keyword."""
    for cls in (nn.RNN, rnnrec_fast.RNN):
        with pytest.raises(TypeError, match="nonlinearity"):
            cls(3, 4, 1, "tanh", nonlinearity="relu")
        assert cls(3, 4, 1, "relu").nonlinearity == "relu" and cls(3, 4, nonlinearity="relu").nonlinearity == "relu"
        with pytest.raises(ValueError, match="Unknown nonlinearity"):
            cls(3, 4, nonlinearity=None)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_dropout_warning_filtered_as_torch_nn(kind):
    """The one-layer dropout warning has torch.nn's text, so a filter written for it
    (`filterwarnings("ignore", message="dropout option adds dropout")`, which matches the start of
    the message) silences ours too (it began with "GRU: ")."""
    for cls in (getattr(nn, kind), getattr(rnnrec_fast, kind)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls(3, 4, dropout=0.5)
        assert [str(w.message)[:28] for w in caught] == ["dropout option adds dropout "]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", message="dropout option adds dropout", category=UserWarning)
            cls(3, 4, dropout=0.5)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_flat_weights_refresh_as_torch_nn(kind):
    """Code written against torch.nn.RNNBase refreshes its _flat_weights list after replacing a weight
    (WeightDrop wrappers, diffq's quantizer: `m._flat_weights = [getattr(m, n) if hasattr(m, n) else None
    for n in m._flat_weights_names]`), and reads it while a weight is missing; both raised
    AttributeError here. The refresh is accepted (these modules read the attributes at every call); a list
    of other tensors, which torch.nn would run on, is refused rather than ignored."""
    torch.manual_seed(5)
    ref = getattr(nn, kind)(3, 4, num_layers=2)
    ours = rnnrec_fast.from_torch(ref)
    x = torch.randn(5, 2, 3)
    outs = []
    for m in (ref, ours):
        raw = m.weight_hh_l1
        del m._parameters["weight_hh_l1"]  # WeightDrop: the weight becomes weight_hh_l1_raw
        m.register_parameter("weight_hh_l1_raw", nn.Parameter(raw.detach()))
        assert len(m._flat_weights) == 8 and m._flat_weights[0] is m.weight_ih_l0
        m.weight_hh_l1 = torch.nn.functional.dropout(m.weight_hh_l1_raw, 0.5, training=False) * 0.5
        m._flat_weights = [getattr(m, n) if hasattr(m, n) else None for n in m._flat_weights_names]
        outs.append(m(x))
    for a, b in zip(outs[1], outs[0]):
        assert_close(a, b, torch.float32, "refreshed")
    parametrizations.weight_norm(ours, "weight_hh_l0")  # a parametrized weight: read anew at each call anyway
    ours._flat_weights = ours._flat_weights
    with pytest.raises(NotImplementedError, match="_flat_weights can only be refreshed"):
        ours._flat_weights = [w * 2 for w in ours._flat_weights]
    with pytest.raises(NotImplementedError, match="_flat_weights can only be refreshed"):
        ours._flat_weights = []


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_flat_weights_init_and_update_as_torch_nn(kind):
    """torch.nn.RNNBase's _init_flat_weights / _update_flat_weights, which pruning sweeps, quantizers
    and weight swaps call after replacing a weight, and _weights_have_changed / _flat_weight_refs
    (AttributeError here, from a review): callable, and the call then runs on the new weight as
    torch.nn's does (these modules read the attributes at every call: nothing to refresh)."""
    torch.manual_seed(7)
    ref = getattr(nn, kind)(3, 4, num_layers=2)
    ours = rnnrec_fast.from_torch(ref)
    x = torch.randn(5, 2, 3)
    new = torch.randn_like(ref.weight_hh_l1)
    outs = []
    for m in (ref, ours):
        m.weight_hh_l1 = nn.Parameter(new.clone())
        m._init_flat_weights()
        m._update_flat_weights()
        assert m._weights_have_changed() is False
        assert [r() for r in m._flat_weight_refs] == m._flat_weights
        outs.append(m(x))
    for a, b in zip(outs[1], outs[0]):
        assert_close(a, b, torch.float32, "after _init_flat_weights")


@pytest.mark.parametrize("direction", ["to_torch", "from_torch"])
def test_conversion_follows_a_sequence_rnns_mode(direction):
    """torch.nn.RNN's forward runs the activation its ``mode`` names (RNN_TANH / RNN_RELU), and so
    does ours; ``nonlinearity`` sets it at construction only. The conversions built the twin from
    ``nonlinearity``: a module whose mode was set later converted to one computing the other
    activation, silently (from a review). They follow the mode now."""
    torch.manual_seed(8)
    x = torch.randn(5, 2, 3)
    for mode, nonlinearity in (("RNN_RELU", "tanh"), ("RNN_TANH", "relu")):
        m = (nn.RNN if direction == "from_torch" else rnnrec_fast.RNN)(3, 4, nonlinearity=nonlinearity)
        m.mode = mode
        twin = getattr(rnnrec_fast, direction)(m)
        assert twin.mode == mode and twin.nonlinearity == mode[4:].lower()
        for a, b in zip(twin(x), m(x)):
            assert_close(a, b, torch.float32, direction)


@pytest.mark.parametrize("backend", cpu_backends())
def test_rnncell_nonlinearity_change_takes_effect_as_torch_nn(backend):
    """torch.nn's RNNCell reads `nonlinearity` at every call, so changing it switches the activation;
    so does ours (it kept running tanh, silently), with and without autograd; a bad value is refused."""
    torch.manual_seed(6)
    ref = nn.RNNCell(3, 4)
    ours = rnnrec_fast.from_torch(ref, backend=backend)
    x, hx = torch.randn(5, 3), torch.randn(5, 4)
    for nl in ("relu", "tanh", "relu"):
        ref.nonlinearity = ours.nonlinearity = nl
        assert ours.nonlinearity == nl and ours.mode == "rnn_" + nl
        with torch.no_grad():
            assert_close(ours(x, hx), ref(x, hx), torch.float32, "inference")
        assert_close(ours(x, hx), ref(x, hx), torch.float32, "output")
    assert (ref(x, hx) == 0).any()  # (relu did clip something)
    assert rnnrec_fast.to_torch(ours).nonlinearity == "relu"
    with pytest.raises(ValueError, match="nonlinearity"):
        ours.nonlinearity = "sigmoid"


@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell"])
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_cells_take_sparse_input_as_torch_nn(kind, layout, grad):
    """torch.nn's cells take a sparse input (one-hot rows, say; and RNNCell a sparse hx): ours,
    their backend left to choose, run torch.nn's cell operator on it, with its results and
    gradients, and last_backend() says so; with a forced backend, whose kernels take dense
    tensors, they refuse it by name (test_errors.py); GRUCell(reset_after=False), which torch.nn
    has no cell for, runs our kernels on it made dense. (From a review: they refused it.)"""
    torch.manual_seed(case_seed(kind, layout, grad, "sparse"))
    ref = getattr(nn, kind)(6, 4)
    ours = rnnrec_fast.from_torch(ref)
    x = torch.zeros(3, 6)
    x[torch.arange(3), torch.randint(0, 6, (3,))] = 1.0
    sparse = x.to_sparse() if layout == "coo" else x.to_sparse_csr()
    hxs = [None, torch.randn(3, 4)] + ([torch.randn(3, 4).to_sparse()] if kind == "RNNCell" and layout == "coo" else [])
    for hx in hxs:
        got, want = [], []
        for m, out in ((ours, got), (ref, want)):
            m.zero_grad()
            with torch.set_grad_enabled(grad):
                h = m(sparse, hx)
                out.append(h.detach())
                if grad:
                    h.square().sum().backward()
                    out.extend(p.grad for p in m.parameters())
        assert rnnrec_fast.last_backend() == "torch.nn"
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[0], ours(x, None if hx is None else hx.to_dense()).detach(),
                                   rtol=1e-5, atol=1e-6)
    assert ours(x[0].to_sparse()).shape == (4,)  # unbatched
    with pytest.raises(ValueError, match="input must be a dense tensor"):
        getattr(rnnrec_fast, kind)(6, 4, backend="reference")(sparse)
    if kind == "GRUCell":  # GRU's original form, which no torch.nn cell computes: our kernels, on it densified
        cho = rnnrec_fast.GRUCell(6, 4, reset_after=False)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(cho(sparse), cho(x), rtol=0, atol=0)
        assert rnnrec_fast.last_backend() != "torch.nn"


@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell"])
def test_cell_sizes_take_numpy_integers_as_torch_nn(kind):
    """torch.nn's cells take any integer size (NumPy's, from np.max or a shape computation); so do
    ours, stored as int; a negative size raises an error that is a RuntimeError (torch.nn's type)
    and a ValueError; a float or bool size is refused."""
    np = pytest.importorskip("numpy")
    cell = getattr(rnnrec_fast, kind)(np.int64(3), np.int32(4))
    ref = getattr(nn, kind)(np.int64(3), np.int32(4))
    assert type(cell.input_size) is int and type(cell.hidden_size) is int
    assert cell(torch.randn(2, 3)).shape == ref(torch.randn(2, 3)).shape == (2, 4)
    with pytest.raises(RuntimeError, match="non-negative"):
        getattr(rnnrec_fast, kind)(3, np.int64(-1))
    for bad in (4.0, True):
        with pytest.raises(TypeError, match="should be of type int"):
            getattr(rnnrec_fast, kind)(bad, 4)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_rnnbase_checks_and_permute_hidden_as_torch_nn(kind):
    """torch.nn.RNNBase's check_forward_args / check_input / get_expected_hidden_size /
    check_hidden_size / permute_hidden, which user code calls (e.g. to reorder a state by a
    PackedSequence's indices), exist and answer as torch.nn's."""
    ref = getattr(nn, kind)(3, 4, num_layers=2, batch_first=True)
    ours = rnnrec_fast.from_torch(ref)
    x, h = torch.randn(5, 6, 3), torch.randn(2, 5, 4)
    perm = torch.tensor([4, 0, 3, 1, 2])
    for m in (ref, ours):
        assert m.get_expected_hidden_size(x, None) == (2, 5, 4)
        assert m.get_expected_hidden_size(x[0], torch.tensor([3, 2])) == (2, 3, 4)
        m.check_forward_args(x, h, None)
        assert torch.equal(m.permute_hidden(h, perm), h[:, perm]) and m.permute_hidden(h, None) is h
    for bad_x, bad_h in ((x, h[:, :4]), (x[..., :2], h), (x.double(), h)):
        errors = []
        for m in (ref, ours):
            with pytest.raises((RuntimeError, ValueError)) as info:
                m.check_forward_args(bad_x, bad_h, None)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


def _pair_of(kind, backend, **kw):
    """torch.nn's module of ``kind`` (GRU, RNN, GRUCell, RNNCell) and ours with its weights."""
    torch.manual_seed(5)
    ref = getattr(nn, kind)(3, 4, **kw)
    ours = getattr(rnnrec_fast, kind)(3, 4, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3) if kind in ("GRU", "RNN") else torch.randn(2, 3)
    return ref, ours, x


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_bias_changed_in_place_before_backward(kind, backend, backend_calls):
    """A bias changed in place between the forward and backward() (a bias-only optimiser step, a
    constraint): the backward runs, as torch.nn's does (the biases are not saved for it: it never
    reads them), with torch.nn's gradients. (From a review: it raised autograd's in-place error.)"""
    ref, ours, x = _pair_of(kind, backend)
    suffix = "_l0" if kind in ("GRU", "RNN") else ""
    grads = []
    for m in (ref, ours):
        y = _out(m(x))
        with torch.no_grad():
            getattr(m, "bias_hh" + suffix).add_(1.0)
            getattr(m, "bias_ih" + suffix).mul_(0.5)
        grads.append(torch.autograd.grad((y * y).sum(), list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if backend != "cpp":
        assert backend_calls[(backend, "backward")] == 1
    # the weights and the input are still checked, as torch.nn's are
    y = _out(ours(x))
    with torch.no_grad():
        getattr(ours, "weight_hh" + suffix).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_deepcopy_of_a_parametrized_module(kind):
    """copy.deepcopy of a module with a parametrized weight (weight_norm, orthogonal: what
    AveragedModel / EMA / best-model copies do) works and computes as the original and as torch.nn's
    copy, in grad and inference mode. (From a review: torch's parametrize copies __dict__ whole,
    the C++ plan with it: TypeError.)"""
    import copy
    ref, ours, x = _pair_of(kind, "auto")
    name = "weight_hh_l0" if kind in ("GRU", "RNN") else "weight_hh"
    for m in (ref, ours):
        parametrizations.weight_norm(m, name)
    ours.load_state_dict(ref.state_dict())
    ref_copy, ours_copy = copy.deepcopy(ref), copy.deepcopy(ours)
    assert type(ours_copy) is type(ours) and ours_copy is not ours
    with torch.no_grad():  # the copy's weights are its own
        getattr(ours.parametrizations, name).original0.mul_(2.0)
        getattr(ref.parametrizations, name).original0.mul_(2.0)
    for mode in (torch.enable_grad, torch.inference_mode):
        with mode():
            for a, b in ((ref_copy, ours_copy), (ref, ours)):
                torch.testing.assert_close(_out(b(x)), _out(a(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell"])
def test_bias_flag_set_after_construction(kind, backend):
    """``m.bias`` set after construction: torch.nn's RNN/GRU refuse the call (their weights were made
    with the other flag), ours too, with grad on or off; torch.nn's cells ignore the flag and use the
    biases they hold, ours too. (From a review: the general path dropped the biases while the fast
    path kept them: two results for one module and input.)"""
    for built, flag in ((True, False), (False, True)):
        ref, ours, x = _pair_of(kind, backend, bias=built)
        ref.bias, ours.bias = flag, flag
        for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with mode():
                if kind in ("GRU", "RNN"):
                    with pytest.raises(RuntimeError):
                        ref(x)
                    # (the message says which: built with biases, or without)
                    with pytest.raises(RuntimeError, match=f"bias={flag} but the module was built "
                                                           f"with{'' if built else 'out'} biases \\("):
                        ours(x)
                else:
                    torch.testing.assert_close(_out(ours(x)), _out(ref(x)), rtol=1e-5, atol=1e-6)
        ref.bias, ours.bias = built, built  # and back
        for mode in (torch.enable_grad, torch.inference_mode):
            with mode():
                torch.testing.assert_close(_out(ours(x)), _out(ref(x)), rtol=1e-5, atol=1e-6)


# ---- a second mutation review (each of these failed on a mutant the suite let through)

@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_with_only_bias_ih_removed_as_torch_nn(backend):
    """A GRUCell with bias_ih set to None (bias_hh kept) computes as torch.nn's with the same
    weights, with grad on and off: the plan keeps the bias it holds."""
    torch.manual_seed(3)
    ref = nn.GRUCell(3, 4)
    ours = rnnrec_fast.GRUCell(3, 4, backend=backend)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.bias_hh.add_(0.5)  # a bias large enough to matter
        ours.bias_hh.copy_(ref.bias_hh)
    ref.bias_ih = None
    ours.bias_ih = None
    x, hx = torch.randn(2, 3), torch.randn(2, 4)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            for h in (None, hx):
                torch.testing.assert_close(ours(x, h), ref(x, h), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(ours(x[0], None if h is None else h[0]), ref(x[0], None if h is None else h[0]),
                                           rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_deepcopy_of_a_module_referring_to_itself(kind):
    """copy.deepcopy of a module whose __dict__ refers back to it (a bound method kept on it)
    works, as torch.nn's does, the reference pointing at the copy, which computes as the original."""
    import copy
    ref, ours, x = _pair_of(kind, "auto")
    for m in (ref, ours):
        m.fwd = m.forward
    ref_copy, ours_copy = copy.deepcopy(ref), copy.deepcopy(ours)
    assert ours_copy is not ours and ours_copy.fwd.__self__ is ours_copy
    for mode in (torch.enable_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(_out(ours_copy(x)), _out(ours(x)))
            torch.testing.assert_close(_out(ours_copy.fwd(x)), _out(ref_copy(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_training_dropout_applies_without_grad(backend):
    """A 2-layer GRU in training mode with dropout drops between its layers under torch.no_grad
    too (as torch.nn's), where the inference plans would not: two calls differ, and from eval.
    (The cpp case from a mutation check: forward's own dropout check, taken away, passed.)"""
    torch.manual_seed(0)
    m = rnnrec_fast.GRU(3, 4, num_layers=2, dropout=0.9, backend=backend)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        m.eval()
        y_eval = m(x)[0]
        m.train()
        torch.manual_seed(1)
        y1 = m(x)[0]
        y2 = m(x)[0]
        ref = nn.GRU(3, 4, num_layers=2, dropout=0.9)
        ref.load_state_dict(m.state_dict())
        torch.manual_seed(1)
        y_ref = ref(x)[0]
    assert not torch.equal(y1, y_eval) and not torch.equal(y1, y2)
    torch.testing.assert_close(y1, y_ref, rtol=1e-5, atol=1e-6)  # torch.nn's masks, drawn in the same order



@pytest.mark.parametrize("backend", ["numba", "reference"])
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh"])
def test_inference_plan_with_hx_layers_and_batch_first_as_torch_nn(backend, kind):
    """The Python inference plan (no grad) matches torch.nn for two layers with a given hx (each
    layer its own h0) and batch_first shapes with B = 1 or T = 1."""
    torch.manual_seed(5)
    ref, ours = make_pair(kind, backend, torch.float64, input_size=3, hidden_size=4, num_layers=2,
                          batch_first=True)
    for B, T in ((1, 4), (3, 1), (3, 4)):
        x, hx = torch.randn(B, T, 3, dtype=torch.float64), torch.randn(2, B, 4, dtype=torch.float64)
        with torch.no_grad():
            (y, h), (ry, rh) = ours(x, hx), ref(x, hx)
        assert y.shape == ry.shape and h.shape == rh.shape, (B, T, y.shape, h.shape)
        assert_close(y, ry, torch.float64, f"y B={B} T={T}")
        assert_close(h, rh, torch.float64, f"h_n B={B} T={T}")


@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh"])
def test_numba_inference_plan_serves_plain_no_grad_calls(kind, backend_calls):
    """A no-grad call on ordinary (contiguous, storage-filling) tensors runs on the numba inference
    plan (run_cpu directly, no op forward); with grad on, the op's forward runs once."""
    ref, ours = make_pair(kind, "numba", torch.float32, input_size=3, hidden_size=4)
    x, hx = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    with torch.no_grad():
        y, h = ours(x, hx)
        ry, rh = ref(x, hx)
    assert_close(y, ry, torch.float32, "y")
    assert dict(backend_calls) == {}, dict(backend_calls)
    ours(x, hx)
    assert dict(backend_calls) == expected_calls("numba", forward=1)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_a_module_made_under_inference_mode(kind, backend):
    """Weights made under torch.inference_mode (inference tensors): calls without autograd run as
    torch.nn's do, and one that autograd would record raises torch's own refusal to save them for
    backward, as torch.nn.GRU's does (the biases' version counters, which inference tensors lack,
    were read first: 'Inference tensors do not track version counter'). torch.nn.GRUCell's
    composite ops save no weight where the input and state need no gradient; the op saves them."""
    torch.manual_seed(8)
    with torch.inference_mode():
        ref = getattr(nn, kind)(4, 5)
        ours = getattr(rnnrec_fast, kind)(4, 5, backend=backend)
        ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 4) if kind == "GRU" else torch.randn(2, 4)
    with torch.no_grad():
        for got, want in zip(*((m(x) if kind == "GRU" else (m(x),)) for m in (ours, ref))):
            assert_close(got, want, torch.float32)
    for m in (ref, ours) if kind == "GRU" else (ours,):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            m(x)


def test_to_torch_refuses_a_gru4rec_model_given_itself():
    """to_torch of a GRU4Rec itself (not held in another module) is refused by name too (mutation
    review: the refusal looked only at the modules under the model given, and passed a test that
    wraps it in a Sequential)."""
    from rnnrec_fast.recsys.model import GRU4Rec

    with pytest.raises(TypeError, match="to_torch: GRU4Rec's own code calls its recurrent layers"):
        rnnrec_fast.to_torch(GRU4Rec(20, layers=[8]))



@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
def test_conversion_of_a_module_holding_none_of_its_weights_is_refused(direction):
    """A module whose every weight was deleted (no Parameter, no plain tensor left: nothing to take
    the dtype and device from) is refused with a ValueError naming its class and library, not an
    IndexError from reading its first weight; one weight set again as a plain tensor converts."""
    src_lib = nn if direction == "from_torch" else rnnrec_fast
    m = src_lib.GRU(4, 5, bias=False)
    w = m.weight_hh_l0.detach().clone()
    del m.weight_ih_l0, m.weight_hh_l0
    lib = "torch.nn.modules.rnn" if direction == "from_torch" else "rnnrec_fast.modules"
    with pytest.raises(ValueError, match=f"^{lib}.GRU holds none of its weights: nothing to convert$"):
        getattr(rnnrec_fast, direction)(m)
    m.weight_hh_l0 = w
    assert torch.equal(getattr(rnnrec_fast, direction)(m).weight_hh_l0, w)


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
def test_conversion_of_a_module_whose_weight_is_deleted_and_not_set_again(direction):
    """A weight deleted and not set again (WeightDrop before its first forward: it sets the weight
    at each call) is absent from the converted module too, which takes it when set, as the
    original does (mutation review: reading it unconditionally raised a KeyError)."""
    src_lib = nn if direction == "from_torch" else rnnrec_fast
    torch.manual_seed(5)
    m = src_lib.GRU(4, 5)
    w = m.weight_hh_l0.detach().clone()
    del m.weight_hh_l0
    c = getattr(rnnrec_fast, direction)(m)
    assert "weight_hh_l0" not in c._parameters and "weight_hh_l0" not in vars(c)
    assert [n for n, _ in c.named_parameters()] == [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 4)
    for mod in (m, c):
        mod.weight_hh_l0 = w * 0.5
    torch.testing.assert_close(c(x)[0], m(x)[0], rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("backend,dtype", [("cuda", torch.float32), ("numba", torch.float16)])
def test_forward_mode_ad_refuses_a_forced_backend_as_without_it(backend, dtype):
    """A forced backend that cannot run the tensors is refused under forward-mode AD (where the op's
    torch operations run) with the error it gets without a tangent (mutation review: dropping the
    check in _reference_op computed silently)."""
    import torch.autograd.forward_ad as fwAD

    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    gru = rnnrec_fast.GRU(3, 4, backend=backend, dtype=dtype)
    x = torch.randn(5, 2, 3, dtype=dtype)
    with pytest.raises((RuntimeError, ValueError)) as want:
        gru(x)
    with fwAD.dual_level(), pytest.raises(type(want.value)) as got:
        gru(fwAD.make_dual(x, torch.randn_like(x)))
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
@pytest.mark.parametrize("p", [1, 1.0], ids=["int", "float"])
def test_dropout_of_one_is_taken_as_torch_nn(kind, p):
    """dropout=1 (the closed range's end, int or float), which torch.nn accepts: every unit between the
    layers dropped in training mode, so the last layer sees zeros, exactly torch.nn's output."""
    torch.manual_seed(case_seed("dropout one", kind, p))
    ref = getattr(nn, kind)(3, 4, num_layers=2, dropout=p, dtype=torch.float64)
    ours = getattr(rnnrec_fast, kind)(3, 4, num_layers=2, dropout=p, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    assert ours.dropout == ref.dropout == 1.0 and repr(ours) == repr(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    (y, h), (y_ref, h_ref) = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_resets_of_an_unsorted_packed_sequence_follow_its_rows(backend, grad):
    """resets given with a PackedSequence of unsorted lengths are in the original batch order (as
    its padded form): each row's resets act on that row, whatever place it takes in the sorted
    order. Checked against each row run alone, unbatched, with its own resets (float64)."""
    torch.manual_seed(case_seed("packed unsorted resets", backend, grad))
    T, B, I, H = 6, 3, 4, 5
    gru = rnnrec_fast.GRU(I, H, backend=backend, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = torch.randn(1, B, H, dtype=torch.float64)
    lengths = torch.tensor([3, 6, 4])  # sorted order 1, 2, 0
    r = torch.zeros(T, B, dtype=torch.bool)
    r[1, 0] = r[4, 1] = True  # row 2: none
    with torch.set_grad_enabled(grad):
        y, h_n = gru(pack_padded_sequence(x, lengths, enforce_sorted=False), hx, resets=r)
        y = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=T)[0]
        for b in range(B):
            n = int(lengths[b])
            want_y, want_h = gru(x[:n, b], hx[:, b], resets=r[:n, b])
            torch.testing.assert_close(y[:n, b], want_y, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(h_n[:, b], want_h, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["GRU", "RNN_tanh"])
def test_empty_batch_first_batch_without_grad_as_torch(kind, backend):
    """A batch of zero rows, batch_first, hx given or not, with autograd off (where the inference
    plans run): torch.nn's output layout (B, T, H) and h_n, and last_backend() says the reference
    math ran (the plans leave empty batches to the general path)."""
    torch.manual_seed(case_seed("empty batch_first", kind, backend))
    ref, ours = make_pair(kind, backend, torch.float32, input_size=3, hidden_size=4, num_layers=2, batch_first=True)
    x = torch.randn(0, 5, 3)
    prime = next((b for b in ("cpp", "numba") if rnnrec_fast.backends.available(b)), None)
    for hx in (None, torch.randn(2, 0, 4)):
        with torch.no_grad():
            if prime is not None:
                rnnrec_fast.GRU(3, 4, backend=prime)(torch.randn(2, 1, 3))  # (last_backend() not 'reference' before)
            y, h = ours(x, hx)
            assert rnnrec_fast.last_backend() == "reference"
            y_ref, h_ref = ref(x, hx)
        assert y.shape == y_ref.shape == (0, 5, 4) and h.shape == h_ref.shape == (2, 0, 4)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)

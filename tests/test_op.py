"""The op against the reference backend: every backend, every mode, with lengths and resets.

Forward outputs, h_n and the workspace must match the reference, and so must all six gradients
(through autograd, i.e. the registered backward). float64 to 1e-9, float32 to 1e-5 relative, against
a float64 reference computed on the same (rounded) inputs.
"""
import contextlib
import heapq
import itertools
import os

import pytest
import torch
from torch import nn

import rnnrec_fast
from rnnrec_fast import backends
from rnnrec_fast.backends import reference
from rnnrec_fast.ops import MODES
from rnnrec_fast._checks import env_flag

from conftest import (assert_close, case_seed, cpu_backends, expected_calls, num_threads, relu_recurrence_float64,
                      shrunk, tolerances)

MODE_FORMS = [("rnn_tanh", True), ("rnn_relu", True), ("gru", True), ("gru", False)]
SHAPES = [(1, 1, 1, 1), (5, 3, 4, 6), (6, 4, 3, 2)]  # T, B, I, H
EXTRAS = ["plain", "lengths", "resets", "both"]


def make_inputs(T, B, I, H, mode, bias, extras, dtype, gen, relu_margin=0.0):
    """Random inputs; for rnn_relu with relu_margin > 0, clear of the kink by that margin (see
    clear_draw)."""
    return clear_draw(lambda: _draw_inputs(T, B, I, H, mode, bias, extras, dtype, gen), mode, relu_margin)


def clear_draw(draw, mode, margin):
    """draw() (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets) again while, for rnn_relu, a
    pre-activation of an active step lies within margin of the kink at 0. A finite difference step
    across it, or float32 rounding that gives it the other sign than float64, changes a gradient by
    O(1) with no kernel at fault (the latter failed a test on 1 fresh draw in 13,000). float32's
    error in a pre-activation grows with its terms and over the steps: up to ~7e-5 on these tests'
    draws (a review's 6,500), so float32 tests take a margin of 1e-4."""
    for _ in range(100):
        inputs = draw()
        if mode != "rnn_relu" or margin <= 0.0 or kink_distance(*inputs) >= margin:
            return inputs
    raise AssertionError(f"no draw in 100 kept its relu pre-activations {margin} from 0")


def kink_distance(*inputs):
    """The smallest |pre-activation| of an rnn_relu recurrence over its active steps (float64: its
    own loop, which the backend_calls spy does not count as the reference's forward)."""
    pre = relu_recurrence_float64(*inputs)[1]
    return float(pre.abs().min()) if pre.numel() else float("inf")


def clear_of_the_kink(primals, tangents, lengths, resets, h):
    """Whether every rnn_relu pre-activation lies more than twice as far from the kink as a step of
    +-h along the tangents moves it (a finite difference across the kink is no derivative's fault)."""
    pre = relu_recurrence_float64(*primals, lengths, resets)[1]
    return all(bool((pre.abs() > 2 * (relu_recurrence_float64(*[p + s * t for p, t in zip(primals, tangents)],
                                                               lengths, resets)[1] - pre).abs()).all())
               for s in (h, -h))


def test_kink_distance_sees_a_pre_activation_at_the_kink():
    """The finite-difference tests' guard measures what it says: a draw with a margin keeps it; a
    pre-activation moved to the kink reads 0 at an active step and is not counted at an inactive one;
    clear_of_the_kink passes the draw for a small step and refuses it with the one at the kink."""
    gen = torch.Generator().manual_seed(case_seed("kink"))

    def draw():
        inputs = _draw_inputs(4, 3, 2, 5, "rnn_relu", True, "both", torch.float64, gen)
        inputs[7][0, 1] = True  # (row 1's state entering step 0 is zeroed, not h0: the guard must see it)
        return inputs

    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = clear_draw(draw, "rnn_relu", 0.05)
    assert kink_distance(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets) >= 0.05
    primals = (x, h0, w_ih, w_hh, b_ih, b_hh)
    tangents = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in primals]
    assert clear_of_the_kink(primals, tangents, lengths, resets, 1e-6)
    pre = nn.functional.linear(x[0, 1], w_ih, b_ih) + b_hh  # (the reset: the state entering is zero)
    x[0, 1] -= pre[2] * w_ih[2] / w_ih[2].dot(w_ih[2])  # row 1's unit 2 at step 0 onto the kink
    lengths[1] = 0
    assert kink_distance(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets) >= 0.05
    lengths[1] = 1
    assert kink_distance(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets) < 1e-12
    assert not clear_of_the_kink(primals, tangents, lengths, resets, 1e-6)


def _draw_inputs(T, B, I, H, mode, bias, extras, dtype, gen):
    G = 3 if mode == "gru" else 1

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x, h0 = rnd(T, B, I), rnd(B, H)
    w_ih, w_hh = rnd(G * H, I) * 0.7, rnd(G * H, H) * 0.7
    b_ih, b_hh = (rnd(G * H), rnd(G * H)) if bias else (None, None)
    lengths = resets = None
    if extras in ("lengths", "both"):
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[0] = T  # always one full row
    if extras in ("resets", "both"):
        resets = torch.rand(T, B, generator=gen) < 0.3
    return x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets


def as64(t):
    return None if t is None or not t.is_floating_point() else t.detach().double()


def assert_grad_close(g, rg, dtype, name):
    """A gradient against the float64 reference's: float64 as assert_close; float32 to 1e-5 of each
    element, or of the tensor's largest one where that is above 1. The op tests' weights are
    unscaled (randn), so gradients reach ~100 and an element is often a sum of far larger terms
    that cancel: float32 rounding is then ~1e-6 of the tensor's scale, not of the element (a
    per-element 1e-5 failed 3 of 23 fresh draws, on the cpp, numba and reference backends; this
    passed 100 of 100; a 1e-4 error in one gate gradient still fails it)."""
    if dtype == torch.float64:
        assert_close(g.double(), rg, dtype, f"grad {name}")
    else:
        scale = max(1.0, float(rg.abs().max()))
        torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"grad {name} (atol 1e-5 x {scale:.3g}): {m}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_matches_reference(backend, dtype, shape, extras, bias, mode, reset_after, backend_calls):
    gen = torch.Generator().manual_seed(case_seed(backend, str(dtype), shape, extras, bias, mode, reset_after))
    inputs = make_inputs(*shape, mode, bias, extras, dtype, gen, relu_margin=1e-4)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = inputs
    params = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh) if t is not None]
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode,
                                                 reset_after, backend)
    assert rnnrec_fast.last_backend() == backend
    assert backend_calls == expected_calls(backend, forward=1)
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [lengths, resets]
    ry, rh, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    assert_close(y.detach().double(), ry, dtype, "output")
    assert_close(h_n.detach().double(), rh, dtype, "h_n")
    assert_close(ws.detach().double(), rws, dtype, "workspace")
    if lengths is not None:  # padding is exactly zero
        pad = torch.arange(shape[0]).unsqueeze(1) >= lengths.unsqueeze(0)
        assert (y.detach()[pad] == 0).all()

    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gh = torch.randn(h_n.shape, generator=gen, dtype=torch.float64)
    backend_calls.clear()
    grads = torch.autograd.grad((y * gy.to(dtype)).sum() + (h_n * gh.to(dtype)).sum(), params)
    assert backend_calls == expected_calls(backend, backward=1)  # the gradients come from the same backend
    ref_grads = reference.backward(gy, gh, *ref_in, ry, rws, MODES[mode], reset_after)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for name, g, rg in zip(names, grads, ref_grads):
        assert_grad_close(g, rg, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("extras", ["plain", "both"])
def test_gradcheck(backend, mode, reset_after, extras, backend_calls):
    gen = torch.Generator().manual_seed(7)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(3, 2, 2, 3, mode, True, extras, torch.float64, gen,
                                                                 relu_margin=1e-3)
    args = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def fn(*a):
        y, h, _ = torch.ops.rnnrec_fast.recurrence(*a, lengths, resets, mode, reset_after, backend)
        return y, h

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # (the analytical gradients were the forced backend's)
    assert set(backend_calls) == set(expected_calls(backend, forward=1, backward=1))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("extras", ["plain", "both"])
def test_opcheck(backend, mode, reset_after, extras):
    gen = torch.Generator().manual_seed(3)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(4, 3, 2, 5, mode, True, extras, torch.float32, gen)
    _opcheck_both((x.requires_grad_(), h0.requires_grad_(), w_ih.requires_grad_(), w_hh.requires_grad_(),
                   b_ih.requires_grad_(), b_hh, lengths, resets, mode, reset_after, backend))


def _opcheck_both(args):
    """opcheck of the forward op on ``args``, then of the backward op on its outputs."""
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence.default, args)
    with torch.no_grad():
        y, h_n, ws = torch.ops.rnnrec_fast.recurrence(*args)
    bargs = (torch.randn_like(y), torch.randn_like(h_n)) + tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                               for a in args[:8]) + (y, ws) + tuple(args[8:])
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence_backward.default, bargs)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("layout", ["time_major", "batch_first"])
@pytest.mark.parametrize("lengths", [[30, 25, 7, 0, 29], [30, 25, 9, 12, 29], [30, 29, 25, 7, 0], [30, 29, 12, 9, 9]],
                         ids=["len0", "chunk_edge", "sorted_len0", "sorted_chunk_edge"])
def test_padding_past_lengths_is_never_read(backend, mode, reset_after, layout, lengths):
    """x past a row's length is padding: NaN / inf there gives the outputs and gradients (grad_x
    zero there, finite grad_w_ih) of zero padding (grad_w_ih was NaN: 0 * NaN). Long enough
    for several backward chunks of the C++ kernels, some with every row active. chunk_edge has no
    row of length 0 (which sends every chunk to the masked branch): its shortest row (9) ends one
    step before the end of the C++ backward's first chunk in time (B=5: chunks of ceil(96/5)=20
    steps, [10, 30) then [0, 10)), so that chunk holds exactly one padded step (from a mutation
    review: `t1 > min_len` -> `t1 - 1 > min_len` in backward_impl gave a NaN grad_w_ih, and len0
    passed). Nor is the h0 of a row of length 0, which only passes through to h_n: NaN / inf there
    made grad_w_hh NaN (0 * NaN in its step-0 product; from a review of the numba backend). The
    sorted cases (lengths that never increase) take the C++ kernels' live-rows products."""
    gen = torch.Generator().manual_seed(21)
    T, B, I, H = 30, 5, 3, 4
    x, h0, w_ih, w_hh, b_ih, b_hh, _, resets = make_inputs(T, B, I, H, mode, True, "resets", torch.float64, gen)
    lengths = torch.tensor(lengths)
    pad = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)  # (T, B)
    unread = (lengths == 0).unsqueeze(1)  # (B, 1): h0 rows no step reads
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        xf = x.masked_fill(pad.unsqueeze(2), fill)
        if layout == "batch_first":  # a (T, B, I) view of (B, T, I) memory, as a batch_first module passes
            xf = xf.transpose(0, 1).contiguous().transpose(0, 1)
        h0f = h0.masked_fill(unread, fill)
        leaves = [t.clone().requires_grad_() for t in (xf, h0f, w_ih, w_hh, b_ih, b_hh)]
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*leaves, lengths, resets, mode, reset_after, backend)
        grads = torch.autograd.grad((y * 1.5).sum() + h_n.sum(), leaves)
        torch.testing.assert_close(h_n, torch.where(unread, h0f, h_n), rtol=0, atol=0, equal_nan=True)
        results.append([y, h_n.masked_fill(unread, 0.0), *grads])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not results[0][2][pad].any()  # grad_x at the padding


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("masks", [None, "lengths", "resets", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_inputs_without_grad_give_the_same_other_gradients(backend, mode, reset_after, masks, dtype):
    """Where an input requires no gradient, the C++ kernel leaves out its product: x's and W_ih's
    (an input projection each), W_hh's (a recurrent product), h0's (the first step's carry; x's
    alone: B32 T20 H100 ~3.2 -> ~2.7 ms, ad hoc). The gradients still wanted are the same bits as
    with every input requiring one, for each input left out alone, for all four, and without h0
    (an absent h0 shifts autograd's input indices: W_ih is then input 1). Large enough for several
    backward chunks, with W_ih packed once (H = 40) and not (H = 200), both thread counts. The op
    itself, called outside autograd, still returns every gradient."""
    gen = torch.Generator().manual_seed(29)
    old = torch.get_num_threads()
    names = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
    try:
        for T, B, I, H, threads in ((30, 5, 3, 40, 1), (7, 16, 24, 200, 2)):
            torch.set_num_threads(threads)
            x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(T, B, I, H, mode, True, masks, dtype, gen)
            gy = torch.linspace(-1, 1, H, dtype=dtype)
            for with_h0 in (True, False):
                def grads(frozen):
                    leaves = [t.clone().requires_grad_(n not in frozen)
                              for n, t in zip(names, (x, h0 if with_h0 else None, w_ih, w_hh, b_ih, b_hh))
                              if t is not None]
                    args = leaves if with_h0 else leaves[:1] + [None] + leaves[1:]
                    y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*args, lengths, resets, mode, reset_after, backend)
                    (y * gy).sum().add(h_n.sum()).backward()
                    return {n: t.grad for n, t in zip([n for n in names if with_h0 or n != "h0"], leaves)}

                full = grads(())
                assert all(g is not None and g.abs().sum() > 0 for g in full.values())
                for frozen in (("x",), ("h0",), ("w_ih",), ("w_hh",), ("x", "h0", "w_ih", "w_hh")):
                    got = grads(frozen)
                    for n, g in got.items():
                        if n in frozen:
                            assert g is None, n
                        else:
                            assert torch.equal(g, full[n]), (frozen, n, with_h0)
    finally:
        torch.set_num_threads(old)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after,
                                                  backend)
    out = torch.ops.rnnrec_fast.recurrence_backward(torch.ones_like(y), torch.zeros_like(h_n), x, h0, w_ih, w_hh, b_ih,
                                                    b_hh, lengths, resets, y, ws, mode, reset_after, backend)
    for g, t in zip(out, (x, h0, w_ih, w_hh, b_ih, b_hh)):
        assert g.shape == t.shape and g.stride() == t.contiguous().stride() and g.abs().sum() > 0


@pytest.mark.parametrize("frozen", ["none", "h0 absent", "h0", "x", "w_ih", "w_hh", "all four"])
def test_backward_outputs_match_the_fake_kernel_where_gradients_are_left_out(frozen):
    """torch's CrossRefFakeMode runs the fake kernel beside each real call and compares their
    outputs' metadata: the gradients the C++ kernel leaves out (inputs requiring none) come back
    contiguous, as the fake kernel says (they were expanded zeros, stride 0: a MetadataMismatchError
    for an absent h0, the modules' usual call, from a review), and the gradients are still right."""
    from torch._subclasses.fake_utils import CrossRefFakeMode

    gen = torch.Generator().manual_seed(31)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(3, 2, 3, 4, "gru", True, None, torch.float64, gen)
    off = {"all four": ("x", "h0", "w_ih", "w_hh")}.get(frozen, (frozen,))
    names = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
    leaves = [t.clone().requires_grad_(n not in off) for n, t in zip(names, (x, h0, w_ih, w_hh, b_ih, b_hh))]
    args = list(leaves)
    if frozen == "h0 absent":
        args[1] = None
    got = []
    for check in (True, False):
        for t in leaves:
            t.grad = None
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*args, None, None, "gru", True, "auto")
        with CrossRefFakeMode() if check else contextlib.nullcontext():
            (y.sum() + h_n.sum()).backward()
        got.append([t.grad for t in leaves])
    for a, b in zip(*got):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert [g is None for g in got[0]] == [n in off or (frozen == "h0 absent" and n == "h0") for n in names]


@pytest.mark.parametrize("left_out", ["x", "h0", "w_ih", "w_hh"])
def test_cpp_backward_gives_the_gradients_it_leaves_out_as_zeros(left_out):
    """_C.backward with need_gx / need_gh0 / need_gw_ih / need_gw_hh false returns that gradient
    as zeros, as its description and the op's fake kernel say, and the others with the bits of the
    call that computes them all. The full call runs first and its outputs are freed, so the
    scratch pool (blocks of 64 KiB or more: grad_x and the weight gradients here) hands their
    memory out again with its gradients in it, and the kernel's dh (h0's gradient where it is
    wanted) is scratch otherwise. (From a mutation review: grad_x or grad_h0 left as that memory
    passed every test; the op's autograd drops them, a direct or dispatch-mode caller sees them.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(case_seed("left_out_zeros", left_out))
    T, B, I, H = 4, 64, 96, 96  # grad_x 96 KiB, grad_w_ih and grad_w_hh 108 KiB (float32)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "gru", True, "plain", torch.float32, gen)
    w_ih, w_hh = w_ih * I ** -0.5, w_hh * H ** -0.5
    y, _, ws = _C.forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, 2, True)
    gy, ghn = torch.randn(T, B, H, generator=gen), torch.randn(B, H, generator=gen)
    args = (gy, ghn, x, h0, w_ih, w_hh, b_ih, b_hh, None, None, y, ws, 2, True)
    grads = _C.backward(*args)
    full = [g.clone() for g in grads]
    assert all(bool(g.abs().sum() > 0) for g in full)
    del grads
    names = ["x", "h0", "w_ih", "w_hh"]
    got = _C.backward(*args, **{f"need_g{n}": n != left_out for n in ("x", "h0", "w_ih", "w_hh")})
    for name, g, want in zip(names + ["b_ih", "b_hh"], got, full):
        expect = torch.zeros_like(want) if name == left_out else want
        assert g.shape == want.shape and g.is_contiguous(), name
        assert torch.equal(g, expect), name


@pytest.mark.parametrize("bad", [-1, -5])
def test_cpp_entry_points_refuse_a_negative_length(bad):
    """_C.forward and _C.backward called directly (the op checks lengths first, so only a direct
    caller reaches the kernel's own check) refuse a length below 0 with its row and value, and take
    the same call with that length 0. (From a mutation review: the kernel's check taking -1 passed
    every test; test_errors' negative length comes with one past T, which fails the check anyway.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(case_seed("negative_length", bad))
    T, B, I, H = 3, 3, 2, 4
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "gru", True, "plain", torch.float64, gen)
    gy, ghn = torch.randn(T, B, H, generator=gen, dtype=torch.float64), torch.randn(B, H, generator=gen,
                                                                                   dtype=torch.float64)
    good = torch.tensor([3, 0, 2])
    y, _, ws = _C.forward(x, h0, w_ih, w_hh, b_ih, b_hh, good, None, 2, True)
    _C.backward(gy, ghn, x, h0, w_ih, w_hh, b_ih, b_hh, good, None, y, ws, 2, True)
    lengths = torch.tensor([3, bad, 2])
    match = rf"lengths must lie in \[0, T=3\], got lengths\[1\] = {bad}"
    with pytest.raises((RuntimeError, ValueError), match=match):
        _C.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, None, 2, True)
    with pytest.raises((RuntimeError, ValueError), match=match):
        _C.backward(gy, ghn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, None, y, ws, 2, True)


@pytest.mark.parametrize("T,B", [(0, 2), (3, 0)], ids=["no_step", "no_row"])
def test_cpp_backward_of_no_step_or_row_gives_left_out_gradients_as_zeros(T, B):
    """_C.backward of a call with no step or no row (which the op refuses; a direct call reaches
    it): h0's gradient is grad_h_n (h_n is h0), or zeros where need_gh0 is false, as for any other
    size; every other gradient zeros (from a mutation review: that early return gave grad_h_n back
    whatever need_gh0 said)."""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    from rnnrec_fast import _C

    x, h0, w_ih, w_hh = torch.randn(T, B, 3), torch.randn(B, 4), torch.randn(12, 3), torch.randn(12, 4)
    y, _, ws = _C.forward(x, h0, w_ih, w_hh, None, None, None, None, 2, True)
    ghn = torch.randn(B, 4) + 1
    for need in (True, False):
        got = _C.backward(torch.randn(T, B, 4), ghn, x, h0, w_ih, w_hh, None, None, None, None, y, ws, 2, True,
                          need_gh0=need)
        assert torch.equal(got[1], ghn if need else torch.zeros(B, 4)), need
        for g, shape in zip(got[:1] + got[2:], [(T, B, 3), (12, 3), (12, 4), (12,), (12,)]):
            assert g.shape == shape and torch.equal(g, torch.zeros(shape))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_grad_x_past_lengths_is_zero_whatever_w_ih_holds(backend, mode, reset_after):
    """grad_x past a row's length is exactly zero (x there is never read) also where W_ih holds NaN
    or inf: the reference and numba backends gave NaN there (their input gradient, one product over
    every step, multiplied the inactive steps' zero gradients by W_ih), where the C++ kernels give
    zero (from a review). The other gradients are those of the reference, NaN where it has NaN."""
    gen = torch.Generator().manual_seed(23)
    T, B, I, H = 6, 3, 3, 4
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, None, torch.float64, gen)
    lengths = torch.tensor([6, 2, 0])
    pad = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)
    for special in (float("nan"), float("inf")):
        w = w_ih.clone()
        w[1, 1] = special
        got = []
        for name in (backend, "reference"):
            leaves = [t.clone().requires_grad_() for t in (x, h0, w, w_hh, b_ih, b_hh)]
            y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*leaves, lengths, None, mode, reset_after, name)
            got.append(torch.autograd.grad(y.sum() + h_n.sum(), leaves))
        assert torch.equal(got[0][0][pad], torch.zeros_like(got[0][0][pad])), got[0][0][pad]
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sorted_lengths_match_the_same_rows_unsorted(backend, mode, reset_after, dtype, threads):
    """Lengths that never increase from a row to the next (a PackedSequence's sorted batch, as the
    modules pass it): the C++ kernels then run each step's products, the input projections
    included, on its live rows only. The outputs and every gradient are those of the same rows in
    a shuffled order (the general masked path), row for row, and the float64 reference's. Steps
    of many live counts, a row of length 0, a live count of 1 and two last steps where none is
    live; B = 40 for products of several register blocks."""
    gen = torch.Generator().manual_seed(case_seed("sorted_lengths", backend, mode, reset_after, str(dtype), threads))
    T, B, I, H = 11, 40, 6, 20

    def draw():
        x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", dtype, gen)
        w_ih, w_hh = w_ih * 0.4, w_hh * 0.4  # (states of order 1 over the steps, relu's too)
        lengths = torch.randint(2, T - 3, (B,), generator=gen).sort(descending=True).values
        lengths[0], lengths[1], lengths[-1] = T - 2, T - 3, 0  # steps T-3 (one live row), T-2, T-1 (none)
        return x, h0, w_ih, w_hh, b_ih, b_hh, lengths, None

    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, _ = clear_draw(draw, mode, 1e-4)
    assert (lengths[1:] <= lengths[:-1]).all()
    perm = torch.randperm(B, generator=gen)
    inv = torch.argsort(perm)
    gy = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    gh = torch.randn(B, H, generator=gen, dtype=torch.float64)
    results = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for order, back in ((torch.arange(B), torch.arange(B)), (perm, inv)):
            leaves = [x.index_select(1, order).requires_grad_(), h0.index_select(0, order).requires_grad_()] + [
                t.clone().requires_grad_() for t in (w_ih, w_hh, b_ih, b_hh)]
            y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*leaves, lengths.index_select(0, order), None, mode,
                                                         reset_after, backend)
            grads = torch.autograd.grad((y * gy.index_select(1, order).to(dtype)).sum()
                                        + (h_n * gh.index_select(0, order).to(dtype)).sum(), leaves)
            results.append([y.detach().index_select(1, back), h_n.detach().index_select(0, back),
                            grads[0].index_select(1, back), grads[1].index_select(0, back), *grads[2:]])
    finally:
        torch.set_num_threads(before)
    names = ["y", "h_n", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for name, a, b in zip(names, *results):  # (float32: to 1e-5 of the tensor's scale, as assert_grad_close)
        scale = 1e-12 if dtype == torch.float64 else 1e-5 * max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=0, atol=scale, msg=lambda m, name=name: f"{name}: {m}")
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [lengths, None]
    ry, rh, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    assert_close(results[0][0].double(), ry, dtype, "output")
    assert_close(results[0][1].double(), rh, dtype, "h_n")
    ref_grads = reference.backward(gy, gh, *ref_in, ry, rws, MODES[mode], reset_after)
    for name, g, rg in zip(names[2:], results[0][2:], ref_grads):
        assert_grad_close(g, rg, dtype, name)


@pytest.mark.parametrize("lengths", ["sorted", "none"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_input_projections_in_cpp_deeper_than_a_k_chunk(mode, reset_after, lengths):
    """float32 input projections of I = 301 features, which the packed kernels take in two K
    chunks (at most 256 each: 151 + 150), each chunk's product added to the one before: with sorted
    lengths each step's live rows (W_ih packed once, rnnrec_cpu.cpp's PackedNT), without lengths
    one product of all T * B = 120 rows (gemm_any's packed path). The float64 reference's outputs
    and h_n. (From a mutation review: a second K chunk that overwrote the first in PackedNT, or one
    read to the full chunk length in gemm_any, passed every test; no packed projection of theirs,
    one-step blocks and chunked steps included, had I > 256.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(case_seed("deep_projection", mode, reset_after, lengths))
    T, B, I, H = 5, 24, 301, 16
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float32, gen)
    w_ih, w_hh = w_ih * I ** -0.5, w_hh * 0.4  # (pre-activations and states of order 1)
    lens = None
    if lengths == "sorted":
        lens = torch.randint(1, T + 1, (B,), generator=gen).sort(descending=True).values
        lens[0], lens[-1] = T, 0
    y, h_n, _ = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lens, None, mode, reset_after, "cpp")
    ry, rh, _ = reference.forward(*[as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)], lens, None, MODES[mode],
                                  reset_after)
    assert_close(y.double(), ry, torch.float32, "output")
    assert_close(h_n.double(), rh, torch.float32, "h_n")


def test_cpp_weight_gradient_in_place_added_over_backward_chunks():
    """grad_w_ih = dgx^T . x summed over two backward chunks of 96 rows each (rnn_tanh, T = 12,
    B = 16: six steps a chunk), each chunk's product too large to pack for its M = H = 64 rows
    (I = 1000: K N > L2 / 4, M < 256) and not MKL's, so gemm_any's in-place kernel (AVX-512) runs
    both, the second adding to the first. The float64 reference's gradients, one thread. (From a
    mutation review: the in-place kernel told to overwrite where it should add passed every test;
    test_kernel_paths' in-place case has T = 8, whose second chunk of 32 rows is small enough to
    pack.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(case_seed("in_place_weight_gradient_chunks"))
    T, B, I, H = 12, 16, 1000, 64
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "rnn_tanh", True, "plain", torch.float32, gen)
    w_ih, w_hh = w_ih * I ** -0.5, w_hh * H ** -0.5  # (pre-activations of order 1)
    gy = torch.randn(T, B, H, generator=gen)
    with num_threads(1):
        grads = cpp_training_step((x, h0, w_ih, w_hh, b_ih, b_hh), gy, None, None, "rnn_tanh", True)[2:]
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [None, None]
    ry, _, rws = reference.forward(*ref_in, MODES["rnn_tanh"], True)
    ref_grads = reference.backward(gy.double(), torch.ones(B, H, dtype=torch.float64), *ref_in, ry, rws,
                                   MODES["rnn_tanh"], True)
    for name, g, rg in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], grads, ref_grads):
        assert_grad_close(g, rg, torch.float32, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["rnn_tanh", "gru"])
def test_opcheck_strided_inputs(backend, mode):
    """opcheck with a permuted x (a batch_first module's input) and transposed weights: the fake
    kernels' outputs, the backward's gradients included, are laid out as the real ones (contiguous)."""
    gen = torch.Generator().manual_seed(4)
    T, B, I, H = 4, 3, 2, 5
    G = 3 if mode == "gru" else 1
    x = torch.randn(B, T, I, generator=gen).transpose(0, 1)
    w_ih = torch.randn(I, G * H, generator=gen).t()
    w_hh = torch.randn(H, G * H, generator=gen).t()
    h0 = torch.randn(B, H, generator=gen)
    _opcheck_both((x.requires_grad_(), h0, w_ih.requires_grad_(), w_hh.requires_grad_(), None, None, None, None,
                   mode, True, backend))


# Longer and wider than SHAPES: the C++ backward runs in chunks of time steps (about 128 rows of
# T*B each) and reads its weights in 32-column slices; these shapes give several chunks, a last
# chunk shorter than the rest, and hidden sizes with full, over-16 and under-16 last slices.
LONG_SHAPES = [(9, 40, 7, 33), (13, 24, 5, 20), (3, 300, 6, 16), (130, 1, 3, 5)]  # T, B, I, H


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_backward_chunks_and_strided_gradients(backend, dtype, shape, mode, reset_after):
    """The backward op over several time chunks, with lengths and resets, equals the reference
    (float64), and on strided grad_y / x (as autograd hands them over: an expanded gradient, one
    value per row, a batch_first input) gives what it gives on dense copies of them (both dtypes):
    exactly, but for grad_w_ih on a batch_first x, which the C++ backend sums step by step (its rows
    are evenly spaced within a step only) instead of over a copy of the chunk: the same terms in
    another order."""
    gen = torch.Generator().manual_seed(case_seed(backend, str(dtype), shape, mode, reset_after))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(*shape, mode, True, "both", dtype, gen)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode,
                                                 reset_after, backend)
    T, B, I, H = shape
    # (T, B, I) view of a (B, T, I) tensor (at B = 1 too, where .contiguous() would keep x as it is)
    x_strided = torch.empty(B, T, I, dtype=dtype).copy_(x.transpose(0, 1)).transpose(0, 1)
    gy_cases = {
        "contiguous": torch.randn(T, B, H, generator=gen, dtype=torch.float64).to(dtype),
        "transposed": torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype).transpose(0, 1),
        "expanded": torch.randn(H, generator=gen, dtype=torch.float64).to(dtype).expand(T, B, H),
        # one value per row (the gradient of (y.sum(-1) * w).sum(): strides (B, 1, 0))
        "row_broadcast": torch.randn(T, B, 1, generator=gen, dtype=torch.float64).to(dtype).expand(T, B, H),
        "column": torch.randn(T, B, 2 * H, generator=gen, dtype=torch.float64).to(dtype)[:, :, ::2],
    }
    gh = torch.randn(B, H, generator=gen, dtype=torch.float64)
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [lengths, resets]
    ry, _, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for kind, gy in gy_cases.items():
        ref_grads = reference.backward(gy.double().contiguous(), gh, *ref_in, ry, rws, MODES[mode], reset_after)
        dense = None
        for xin, gyin in ((x, gy.contiguous()), (x_strided, gy), (x, gy)):
            grads = torch.ops.rnnrec_fast.recurrence_backward(gyin, gh.to(dtype), xin, h0, w_ih, w_hh, b_ih, b_hh,
                                                              lengths, resets, y, ws, mode, reset_after, backend)
            what = f"{kind} grad_y, x contiguous={xin.is_contiguous()}: grad"
            if dense is None:
                dense = grads
                if dtype == torch.float64:  # float32 rounding grows with T and H: 1e-5 is for short runs
                    for name, g, rg in zip(names, grads, ref_grads):
                        assert_close(g, rg, dtype, f"{what} {name}")
            else:  # strided inputs are read in place: the very same arithmetic as on dense copies
                for name, g, d in zip(names, grads, dense):
                    if name == "w_ih" and not xin.is_contiguous():
                        tol = 1e-12 if dtype == torch.float64 else 1e-5
                        torch.testing.assert_close(g, d, rtol=tol, atol=tol * float(d.abs().max()),
                                                   msg=lambda m: f"{what} {name}: {m}")
                    else:
                        assert torch.equal(g, d), f"{what} {name} differs from the dense-input result"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_cpp_backward_reads_a_batch_first_grad_y_of_two_rows(mode, reset_after, dtype):
    """The one-thread backward reads grad_y a step at a time as a (B, H) block: in place where its
    rows are H apart (or B = 1), else copied row by row. A batch_first grad_y of B = 2 rows (a
    (T, 2, H) view of a (2, T, H) tensor: rows T * H apart) gives the very bits of its dense copy,
    and the float64 reference's gradients. (From a mutation review: taking B <= 2 rows in place,
    which reads row 1 of step t from row 0 of step t + 1, passed every test; LONG_SHAPES' strided
    grad_y cases have B = 1 or B >= 24.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(case_seed("batch_first_grad_y_two_rows", mode, reset_after, str(dtype)))
    T, B, I, H = 5, 2, 3, 6
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", dtype, gen, relu_margin=1e-4)
    gy = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype).transpose(0, 1)
    gh = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, None, None)
    with num_threads(1):
        y, _, ws = torch.ops.rnnrec_fast.recurrence(*args, mode, reset_after, "cpp")
        got, dense = (torch.ops.rnnrec_fast.recurrence_backward(g, gh, *args, y, ws, mode, reset_after, "cpp")
                      for g in (gy, gy.contiguous()))
    assert not gy.is_contiguous() and gy.stride(1) == T * H
    ref_in = [as64(t) for t in args[:6]] + [None, None]
    ry, _, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    ref = reference.backward(gy.double().contiguous(), gh.double(), *ref_in, ry, rws, MODES[mode], reset_after)
    for name, g, d, r in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, dense, ref):
        assert torch.equal(g, d), name
        assert_grad_close(g, r, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_cpu_autograd_is_registered_in_cpp(backend):
    """With the extension, CPU calls record the C++ autograd node (csrc/rnnrec_op.cpp) whatever the
    backend; the Python registration (ops._backward) serves the other devices and the package
    without its extension (tests/test_fallback.py checks its gradients)."""
    if not rnnrec_fast.ops._CPP_OP:
        pytest.skip("needs the compiled extension")
    gen = torch.Generator().manual_seed(5)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(3, 2, 2, 4, "gru", True, "plain", torch.float64, gen)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x.requires_grad_(), h0, w_ih, w_hh, b_ih, b_hh, None, None, "gru",
                                                 True, backend)
    assert "RecurrenceFn" in y.grad_fn.name() and "RecurrenceFn" in h_n.grad_fn.name(), y.grad_fn.name()
    assert not ws.requires_grad


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("extras", ["plain", "both"])
def test_gradgradcheck(backend, mode, reset_after, extras):
    """Second derivatives (a backward taken with create_graph=True, differentiated again) against
    finite differences of the first ones, float64, with and without lengths and resets; h0 given
    and not (zeros)."""
    gen = torch.Generator().manual_seed(case_seed(11))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(3, 2, 2, 3, mode, True, extras, torch.float64, gen,
                                                                 relu_margin=1e-3)
    for with_h0 in (True, False):
        args = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        if not with_h0:
            args[1] = None

        def fn(x, h0, *w):
            y, h, _ = torch.ops.rnnrec_fast.recurrence(x, h0 if with_h0 else None, *w, lengths, resets, mode,
                                                       reset_after, backend)
            return y, h

        inputs = args if with_h0 else [args[0], torch.zeros(0)] + args[2:]
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("extras", ["plain", "both"])
def test_double_backward_of_a_gradient_penalty(backend, extras):
    """A gradient penalty through the op (create_graph=True, then backward): its first-order
    gradients equal the plain backward's, and its second derivatives equal those of the op's
    specification (the reference forward as plain torch operations, differentiated twice by
    autograd), for every input, including the upstream gradients' own dependence on the weights."""
    gen = torch.Generator().manual_seed(case_seed(9))
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(4, 3, 2, 5, "gru", True, extras, torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    c = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)

    def loss(run):
        y, h_n = run(*leaves)
        return (y.square() * c).sum() + (h_n * leaves[2].sum()).sum()  # (grad_h_n depends on w_ih)

    def ours(*a):
        return torch.ops.rnnrec_fast.recurrence(*a, lengths, resets, "gru", True, backend)[:2]

    def spec(x, *a):  # (x's padding left out, as the kernels never read it)
        if lengths is not None:
            x = x.masked_fill(torch.arange(4).unsqueeze(1).unsqueeze(2) >= lengths.view(1, -1, 1), 0.0)
        return reference.forward(x, *a, lengths, resets, 2, True)[:2]

    plain = torch.autograd.grad(loss(ours), leaves)
    results = []
    for run in (ours, spec):
        g = torch.autograd.grad(loss(run), leaves, create_graph=True)
        penalty = sum((gi * torch.linspace(-1, 1, gi.numel(), dtype=gi.dtype).view(gi.shape)).sum() for gi in g)
        results.append((g, torch.autograd.grad(penalty, leaves)))
    (g, gg), (rg, rgg) = results
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for name, a, b, r in zip(names, g, plain, rg):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
        torch.testing.assert_close(a.detach(), r.detach(), rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    for name, a, r in zip(names, gg, rgg):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"second derivative, {name}: {m}")
    assert any(float(a.abs().max()) > 1e-3 for a in gg)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", ["w_hh is w_ih", "b_hh is b_ih", "h0 from x", "x from w_ih"])
def test_double_backward_with_tied_or_dependent_inputs(backend, case):
    """One tensor passed as two arguments, or one argument computed from another: the gradients
    taken with create_graph=True and the second derivatives equal those of the specification run on
    the same tensors (autograd through the reference forward). They were the total derivatives
    counted once per argument (the gradients themselves off by ~2, the second derivatives ~100;
    from a review)."""
    gen = torch.Generator().manual_seed(case_seed(12, case))
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(4, 3, 5, 5, "gru", True, "plain", torch.float64, gen)
    base = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def args():
        x, h0, w_ih, w_hh, b_ih, b_hh = base
        if case == "w_hh is w_ih":
            w_hh = w_ih
        elif case == "b_hh is b_ih":
            b_hh = b_ih
        elif case == "h0 from x":
            h0 = torch.tanh(x[0] * 0.7 + h0)
        else:
            x = x + w_ih[:5].t().sum(0)
        return x, h0, w_ih, w_hh, b_ih, b_hh

    def ours(*a):
        return torch.ops.rnnrec_fast.recurrence(*a, None, None, "gru", True, backend)[:2]

    def spec(*a):
        return reference.forward(*a, None, None, 2, True)[:2]

    results = []
    for run in (ours, spec):
        y, h_n = run(*args())
        g = torch.autograd.grad(y.sin().sum() + h_n.square().sum(), base, create_graph=True, materialize_grads=True)
        results.append((g, torch.autograd.grad(sum(gi.square().sum() for gi in g), base, materialize_grads=True)))
    for name, a, b in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], results[0][0] + results[0][1],
                          results[1][0] + results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{case}, {name}: {m}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_double_backward_ignores_what_the_kernels_never_read(backend):
    """The h0 of a row of length 0 and x past a row's length are never read: NaN there gives the
    plain backward's finite gradients with create_graph=True too (the recomputation read that h0:
    NaN in grad_w_hh; from a review), and finite second derivatives."""
    gen = torch.Generator().manual_seed(case_seed(13))
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(4, 3, 2, 5, "gru", True, "plain", torch.float64, gen)
    lengths = torch.tensor([4, 0, 2])
    with torch.no_grad():
        h0[1] = float("nan")
        x[2:, 2] = float("nan")
    leaves = [t.requires_grad_() for t in (w_ih, w_hh, b_ih, b_hh)]

    def loss():
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(x, h0, *leaves, lengths, None, "gru", True, backend)
        return y.square().sum() + h_n[[0, 2]].sum()

    plain = torch.autograd.grad(loss(), leaves)
    graphed = torch.autograd.grad(loss(), leaves, create_graph=True)
    for a, b in zip(graphed, plain):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-10)
    second = torch.autograd.grad(sum(g.square().sum() for g in graphed), leaves)
    assert all(torch.isfinite(g).all() for g in second)


@pytest.mark.parametrize("backend", cpu_backends())
def test_double_backward_refuses_a_bias_changed_in_place(backend):
    """A backward with create_graph=True recomputes the forward with the biases, which are not saved
    (a plain backward never reads them, and runs after such a change, as torch.nn's does): one
    changed in place since the forward is refused, as autograd refuses a saved tensor changed in
    place, and the plain backward still runs."""
    gen = torch.Generator().manual_seed(case_seed(10))
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(3, 2, 2, 4, "gru", True, "plain", torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, w_hh, b_ih, b_hh)]

    def fwd():
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, "gru", True, backend)
        return y.square().sum()

    for b in (b_ih, b_hh):
        loss = fwd()
        with torch.no_grad():
            b.add_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, leaves, create_graph=True)
        torch.autograd.grad(fwd(), leaves)  # (a fresh forward)
        loss = fwd()
        with torch.no_grad():
            b.sub_(0.5)
        assert all(g is not None for g in torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", [("gru", True), ("gru", False), ("rnn_tanh", True), ("rnn_relu", True)])
def test_forward_mode_and_second_derivatives_against_finite_differences(backend, mode, reset_after):
    """rnnrec_fast.recurrence under forward mode (torch.func.jvp; torch.autograd.forward_ad, no_grad
    or not) and second derivatives (hessian-vector products by jvp of grad, and grad of grad), which
    run the op's torch operations, against finite differences of the kernels themselves (float64),
    with lengths, resets and NaN in x past each row's length (never read: no NaN in any derivative).
    Before, a NotImplementedError.

    The differences are Richardson's extrapolation of central ones at h = 1e-5 and h/2 (truncation
    O(h^4)). Plain central differences at 1e-6 failed about one fresh rnn_relu draw in 1000: relu
    sequences grow (|y| near 100), and the third derivatives of sin(y) with them (their error fell as
    h^2; the derivatives were right). Over 1500 draws of each mode these stay within 1/30 of the
    tolerance. An rnn_relu draw is taken again when a step of h would bring a pre-activation near
    the kink (a step moved one by up to 7e-3 over 4500 draws)."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(case_seed(backend, mode, str(reset_after), "forward mode"))
    for _ in range(100):
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(5, 4, 3, 6, mode, True, "both", torch.float64, gen)
        active = reference._active_mask(lengths, 5, 4, x.device)
        primals = (x, h0, w_ih, w_hh, b_ih, b_hh)
        tangents = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64).masked_fill(~active, 0.0)
                         if p is x else torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in primals)
        if mode != "rnn_relu" or clear_of_the_kink(primals, tangents, lengths, resets, 1e-5):
            break
    else:
        raise AssertionError("no draw in 100 kept its relu pre-activations clear of the kink")
    x = x.masked_fill(~active, float("nan"))
    primals = (x, h0, w_ih, w_hh, b_ih, b_hh)

    def f(*p):
        return rnnrec_fast.recurrence(*p, lengths=lengths, resets=resets, mode=mode, reset_after=reset_after,
                                      backend=backend)

    def central(fn, h=1e-5):
        def diff(h):
            with torch.no_grad():
                plus = fn(*[p + h * t.nan_to_num() for p, t in zip(primals, tangents)])
                minus = fn(*[p - h * t.nan_to_num() for p, t in zip(primals, tangents)])
            return [(a - b) / (2 * h) for a, b in zip(plus, minus)]

        return [(4 * fine - coarse) / 3 for coarse, fine in zip(diff(h), diff(h / 2))]

    out, tan = torch.func.jvp(f, primals, tangents)
    assert rnnrec_fast.last_backend() == "reference"
    want = central(f)
    for got, w in zip(tan, want):
        assert not got.isnan().any()
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, f(*primals), rtol=1e-12, atol=1e-12)  # (the primal: the kernels' to rounding)
    for grad_mode in (torch.no_grad, torch.enable_grad):
        with grad_mode(), fwAD.dual_level():
            duals = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
            for d, t in zip(duals, tan):
                torch.testing.assert_close(fwAD.unpack_dual(d).tangent, t, rtol=1e-12, atol=1e-12)

    # second derivatives of a scalar loss: the gradient (eager: the kernels' backward) differenced
    cy = torch.randn(out[0].shape, generator=gen, dtype=torch.float64)
    ch = torch.randn(out[1].shape, generator=gen, dtype=torch.float64)

    def loss(*p):
        y, h_n = f(*p)
        return (y.sin() * cy).sum() + (h_n * ch).sum()

    def grads(*p):
        p = [t.detach().requires_grad_() for t in p]
        with torch.enable_grad():
            return torch.autograd.grad(loss(*p), p)

    hvp = torch.func.jvp(torch.func.grad(loss, argnums=tuple(range(6))), primals, tangents)[1]
    for got, w in zip(hvp, central(grads)):
        assert not got.isnan().any()
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    # grad of grad: d/dp <grad loss(p), v> = H v, the same product by reverse mode twice
    tv = tuple(t.nan_to_num() for t in tangents)
    gg = torch.func.grad(lambda *p: sum((g * v).sum() for g, v in zip(torch.func.grad(loss, argnums=tuple(range(6)))(*p), tv)),
                         argnums=tuple(range(6)))(*primals)
    for got, w in zip(gg, hvp):
        torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", cpu_backends())
def test_forward_mode_ad_of_bare_op_calls_is_refused(backend):
    """A bare torch.ops call of either op under torch.func.jvp / jacfwd or inside
    forward_ad.dual_level (no_grad or not), with a tangent on any tensor argument, raises. On the
    Python registration (CUDA tensors; CPU without the extension: test_fallback.py runs this
    there) the error names forward-mode AD and rnnrec_fast.to_torch: torch.library's autograd
    kernel redispatched below autograd, where the tangents are invisible, and returned zero
    tangents, no error; there a tangent the op never sees (another tensor of the function) still
    gets its derivative. The C++ registration raises torch's error for a C++ autograd function."""
    import torch.autograd.forward_ad as fwAD
    from rnnrec_fast import ops

    gen = torch.Generator().manual_seed(21)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(4, 3, 2, 5, "gru", True, "both", torch.float64, gen)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, "gru", True,
                                                  backend)
    forward = [x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, "gru", True, backend]
    backward = [torch.ones_like(y), torch.ones_like(h_n), x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws,
                "gru", True, backend]

    def call(op, args, at, t):
        return op(*args[:at], t, *args[at + 1:])[0]

    attempts = []
    for op, args, ats in ((torch.ops.rnnrec_fast.recurrence, forward, (0, 1, 3, 5)),
                          (torch.ops.rnnrec_fast.recurrence_backward, backward, (0, 2, 5, 10))):
        for at in ats:
            f = (lambda t, op=op, args=args, at=at: call(op, args, at, t))
            attempts += [lambda f=f, t=args[at]: torch.func.jvp(f, (t,), (torch.ones_like(t),)),
                         lambda f=f, t=args[at]: torch.func.jacfwd(f)(t)]
            for grad_mode in (torch.no_grad, torch.enable_grad):
                def dual(f=f, t=args[at], grad_mode=grad_mode):
                    with grad_mode(), fwAD.dual_level():
                        return fwAD.unpack_dual(f(fwAD.make_dual(t, torch.ones_like(t)))).tangent
                attempts.append(dual)
    python_registration = not ops._CPP_OP
    message = r"forward-mode AD .*rnnrec_fast\.to_torch" if python_registration else "functorch transforms|jvp|forward"
    for attempt in attempts:
        with pytest.raises(RuntimeError, match=message):
            attempt()
    if not python_registration:  # (a C++ autograd function refuses every torch.func transform)
        return
    other = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    try:
        primal, tangent = torch.func.jvp(lambda o: o.sin() + call(torch.ops.rnnrec_fast.recurrence, forward, 0, x)[0],
                                         (other,), (torch.ones_like(other),))
    except RuntimeError as exc:  # (torch 2.4's autograd kernel refuses functorch's transforms: seen there)
        assert "setup_context" in str(exc) and tuple(map(int, torch.__version__.split(".")[:2])) < (2, 13), exc
        return
    torch.testing.assert_close(primal, other.sin() + y[0], rtol=0, atol=0)
    torch.testing.assert_close(tangent, other.cos(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_workspace_is_not_differentiable_and_unused_outputs_cost_nothing(backend):
    """No gradient flows into the workspace (autograd must not build a zero (T, B, 4H) gradient for
    it), and a loss on y alone or on h_n alone gives the gradients of that output only."""
    gen = torch.Generator().manual_seed(11)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(4, 3, 2, 5, "gru", True, "plain", torch.float64, gen)
    params = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(*params, None, None, "gru", True, backend)
    assert y.requires_grad and h_n.requires_grad and not ws.requires_grad
    ref_in = [as64(t) for t in params] + [None, None]
    ry, _, rws = reference.forward(*ref_in, MODES["gru"], True)
    for gy, gh in ((torch.randn(y.shape, generator=gen, dtype=torch.float64), None),
                   (None, torch.randn(h_n.shape, generator=gen, dtype=torch.float64))):
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*params, None, None, "gru", True, backend)
        loss = (y * gy).sum() if gy is not None else (h_n * gh).sum()
        grads = torch.autograd.grad(loss, params)
        ref_grads = reference.backward(gy if gy is not None else torch.zeros_like(ry),
                                       gh if gh is not None else torch.zeros_like(ry[0]), *ref_in, ry, rws,
                                       MODES["gru"], True)
        for g, rg in zip(grads, ref_grads):
            assert_close(g, rg, torch.float64, "grad")


def test_padding_and_zero_lengths_keep_state():
    x = torch.randn(4, 3, 2)
    h0 = torch.randn(3, 5)
    w_ih, w_hh = torch.randn(15, 2), torch.randn(15, 5)
    y, h_n = rnnrec_fast.recurrence(x, h0, w_ih, w_hh, lengths=[4, 0, 2])
    assert torch.equal(h_n[1], h0[1])  # no step: state unchanged
    assert (y[:, 1] == 0).all() and (y[2:, 2] == 0).all()
    assert torch.equal(h_n[2], y[1, 2]) and torch.equal(h_n[0], y[3, 0])


@pytest.mark.parametrize("reset_after", [True, False], ids=["gru", "gru_cho"])
def test_cpp_workspace_of_steps_no_row_reaches_is_zero(reset_after):
    """Steps past every row's length (a batch's last steps, lengths all below T): the workspace
    there is zeros, as the reference's (the op's third output; its rows past a length are zeros at
    every other step too), whatever its memory held. A call with every row full runs first and its
    outputs are freed, so the scratch pool hands the workspace's memory out again with that call's
    values in it. (From a mutation review: the forward's zeroing of such a step's workspace left
    out passed every test; test_matches_reference keeps a full row in every batch.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(case_seed("workspace_past_lengths", reset_after))
    T, B, I, H = 4, 64, 8, 64  # workspace 256 KiB (float32): pooled
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "gru", True, "plain", torch.float32, gen)
    w_ih, w_hh = w_ih * I ** -0.5, w_hh * H ** -0.5  # (pre-activations of order 1)
    full = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, "gru", reset_after, "cpp")
    assert bool(full[2][T - 1].abs().sum() > 0)
    del full
    lengths = torch.randint(0, T - 1, (B,), generator=gen)
    lengths[0] = T - 2  # steps T-2 and T-1: no row active
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, None, "gru", reset_after,
                                                  "cpp")
    assert torch.equal(ws[T - 2:], torch.zeros_like(ws[T - 2:]))
    ry, rh, rws = reference.forward(*[as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)], lengths, None, MODES["gru"],
                                    reset_after)
    for name, got, want in (("output", y, ry), ("h_n", h_n, rh), ("workspace", ws, rws)):
        assert_close(got.double(), want, torch.float32, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_zero_length_rows_keep_their_h0_out_of_the_gradients(backend, dtype, mode, reset_after):
    """A row of length 0 never reads its h0, which may hold anything (a fresh state buffer): NaN or
    inf there gives exactly the outputs and gradients of zeros there, but for that row's h_n (its h0,
    passed through). (From a mutation review: the backward copying such a row's h0 into the weight
    gradients' operand, where its zero gradient times NaN made grad_w_hh NaN, passed every test: the
    padding tests put NaN in x only, and the reset tests in rows that reset.)"""
    gen = torch.Generator().manual_seed(case_seed(backend, str(dtype), mode, reset_after))
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(5, 3, 4, 6, mode, True, "plain", dtype, gen)
    lengths = torch.tensor([5, 0, 3])
    gy = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64).to(dtype)
    gh = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        h = h0.clone()
        h[1] = fill
        params = [t.clone().requires_grad_() for t in (x, h, w_ih, w_hh, b_ih, b_hh)]
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*params, lengths, None, mode, reset_after, backend)
        grads = torch.autograd.grad([y, h_n], params, [gy, gh])
        results.append([y.detach(), h_n.detach()[[0, 2]], *grads])
        torch.testing.assert_close(h_n.detach()[1], h[1], rtol=0, atol=0, equal_nan=True)
    names = ["output", "h_n", "grad x", "grad h0", "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    for fill, res in zip(("nan", "inf"), results[1:]):
        for name, a, b in zip(names, res, results[0]):
            assert torch.equal(a, b), f"{name} with {fill} in the h0 of a row of length 0"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "gru"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_resets_match_separate_sessions_in_torch_nn(backend, mode, with_lengths):
    """A reset before step t is a fresh session starting at t from the zero state: outputs, h_n and
    the gradients of x, h0 and every weight equal torch.nn run on each row's sessions one by one (an
    oracle of its own for resets: the reference's reset logic is otherwise only checked against
    itself). Resets at step 0, at consecutive steps, past a row's length (ignored), none in a row."""
    gen = torch.Generator().manual_seed(case_seed("resets", backend, mode, with_lengths))
    T, B, I, H = 7, 4, 3, 5
    ref = (nn.GRU(I, H) if mode == "gru" else nn.RNN(I, H, nonlinearity=mode[4:])).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, generator=gen, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[[3, 0, 1, 2, 5, 6], [0, 1, 1, 1, 2, 2]] = True  # row 3: no reset
    lengths = torch.tensor([T, 6, 5, 2]) if with_lengths else None  # row 2's reset at step 6: past its end
    gy = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    gh = torch.randn(B, H, generator=gen, dtype=torch.float64)
    weights = list(ref.parameters())  # weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0: the op's order

    leaves = [x, h0] + [w.detach().clone().requires_grad_() for w in weights]
    y, h_n = rnnrec_fast.recurrence(*leaves, lengths=lengths, resets=resets, mode=mode, backend=backend)
    got = [y, h_n, *torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), leaves)]

    ys, hs = torch.zeros(T, B, H, dtype=torch.float64), []
    for b in range(B):
        end = T if lengths is None else int(lengths[b])
        starts = [0] + [t for t in range(1, end) if resets[t, b]]
        h = torch.zeros(1, 1, H, dtype=torch.float64) if resets[0, b] else h0[b].view(1, 1, H)
        for k, t0 in enumerate(starts):
            t1 = starts[k + 1] if k + 1 < len(starts) else end
            out, h = ref(x[t0:t1, b:b + 1], h if k == 0 else torch.zeros(1, 1, H, dtype=torch.float64))
            ys[t0:t1, b] = out[:, 0]
        hs.append(h.view(H) if end > 0 else h0[b])
    want_h_n = torch.stack(hs)
    loss = (ys * gy).sum() + (want_h_n * gh).sum()
    want = [ys, want_h_n, *torch.autograd.grad(loss, [x, h0] + weights)]
    for name, a, b in zip(["y", "h_n", "grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"],
                          got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_backward_is_autograd_of_the_reference_forward(mode, reset_after, extras, bias):
    """The reference's hand-written backward (the oracle of every backend's gradients) equals
    torch.autograd through the reference's forward, plain torch ops (from a review: the reference's
    test cases compared it with itself, so dropping its reset masking failed only gradcheck)."""
    gen = torch.Generator().manual_seed(29)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(6, 4, 3, 5, mode, bias, extras, torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh) if t is not None]
    y, h_n, ws = reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, MODES[mode], reset_after)
    gy, gh = torch.randn(y.shape, generator=gen, dtype=torch.float64), torch.randn(h_n.shape, generator=gen,
                                                                                  dtype=torch.float64)
    want = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum(), leaves)
    got = reference.backward(gy, gh, *(t.detach() if t is not None else None for t in (x, h0, w_ih, w_hh, b_ih, b_hh)),
                             lengths, resets, y.detach(), ws.detach(), MODES[mode], reset_after)
    got = [g for g, t in zip(got, (x, h0, w_ih, w_hh, b_ih, b_hh)) if t is not None]
    for name, a, b in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_reference_computes_half_types_in_float32(dtype):
    """The reference on float16 / bfloat16 inputs is its float32 computation on the same (rounded)
    inputs: y, h_n and the gradients that rounded to the input dtype, bit for bit, and the workspace
    float32, as the module docstring specifies (from a mutation review: computing bfloat16 in its
    own precision, a workspace in the input dtype and float32 gradients all passed the suite)."""
    gen = torch.Generator().manual_seed(31)
    inputs = make_inputs(5, 3, 4, 6, "gru", True, "both", torch.float32, gen)
    half = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs]
    f32 = [t.float() if t is not None and t.is_floating_point() else t for t in half]
    y, h_n, ws = reference.forward(*half, MODES["gru"], True)
    fy, fh, fws = reference.forward(*f32, MODES["gru"], True)
    assert (y.dtype, h_n.dtype, ws.dtype) == (dtype, dtype, torch.float32)
    assert torch.equal(y, fy.to(dtype)) and torch.equal(h_n, fh.to(dtype)) and torch.equal(ws, fws)
    gy, gh = torch.randn(y.shape, generator=gen).to(dtype), torch.randn(h_n.shape, generator=gen).to(dtype)
    got = reference.backward(gy, gh, *half, y, ws, MODES["gru"], True)
    want = reference.backward(gy.float(), gh.float(), *f32, y.float(), fws, MODES["gru"], True)
    for name, a, b in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype)), name


@pytest.mark.parametrize("backend", cpu_backends())
def test_reset_after_forms_differ(backend):
    """Both GRU forms are really computed (a test that cannot fail is a defect)."""
    gen = torch.Generator().manual_seed(1)
    args = make_inputs(3, 2, 3, 4, "gru", True, "plain", torch.float64, gen)
    a = rnnrec_fast.recurrence(*args[:6], reset_after=True, backend=backend)[0]
    b = rnnrec_fast.recurrence(*args[:6], reset_after=False, backend=backend)[0]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)],
                         ids=["tanh", "gru", "gru_cho"])
def test_tanh_of_tiny_values_keeps_relative_accuracy(backend, dtype, mode, reset_after):
    """Pre-activations near 1e-6 (every input, weight and bias positive and scaled by 1e-6, so no
    sum cancels): outputs and states to a few ulp relative, against the float64 reference, with no
    absolute tolerance. tanh as (1 - e) / (1 + e), e = exp(-2|x|), loses the leading digits there
    (float32: ~3% at 1e-6), which the other tests' absolute tolerances hide; the kernels take a
    polynomial near zero. H = 11: a vector and a tail. (From a mutation review: the numba CPU
    kernel's polynomial branch removed passed every other test.)"""
    gen = torch.Generator().manual_seed(case_seed(backend, str(dtype), mode, reset_after, "tiny"))
    T, B, I, H = 3, 3, 5, 11
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "none", dtype, gen)
    args = [t.abs() * 1e-6 for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    y, h_n = rnnrec_fast.recurrence(*args, mode=mode, reset_after=reset_after, backend=backend)
    y64, h_n64, _ = reference.forward(*[as64(t) for t in args], None, None, MODES[mode], reset_after)
    assert 0 < y64.min() and y64.max() < 1e-5
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=0)
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(h_n.double(), h_n64, **tol)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_activations_to_a_few_ulp(backend, dtype):
    """tanh and sigmoid as the kernels compute them, over their whole range, within 8 ulp (float32)
    or 16 ulp (float64) of torch.tanh / torch.sigmoid of the same inputs in float64. Measured
    here: the C++ vector kernels' rational tanh ~5 ulp (5.6 at most over every float32 input,
    checked once by a standalone sweep) and exp-based sigmoid ~3.5; the numba backend's float64
    tanh up to 7 (2 million inputs near its (1 - e) / (1 + e) form's cancellation). A coefficient
    off in its fourth digit gives hundreds. The outputs are the activations themselves: an Elman
    RNN with W_ih = I, W_hh = 0, no bias and h0 = 0 gives y = tanh(x) (each product exact: one
    term a sum); a GRU whose z gate takes x and whose n gate is 0, from h0 = 1, gives
    y = (1 - z) * 0 + z * 1 = sigmoid(x). H = 20: a 16-lane vector and a tail. Inputs: a grid
    (dense, and logarithmic towards 0) and fresh random draws; sigmoid where its value is a normal
    float32 (x > -87), since an ulp of a denormal is not a relative measure."""
    gen = torch.Generator().manual_seed(case_seed(backend, str(dtype), "activations"))
    H = 20
    eye, zero = torch.eye(H, dtype=dtype), torch.zeros(H, H, dtype=dtype)

    def inputs(bound):
        near0 = torch.logspace(-8, 0, 2000, dtype=torch.float64)
        x = torch.cat([torch.linspace(-bound, bound, 40000, dtype=torch.float64), near0, -near0,
                       (torch.rand(20000, generator=gen, dtype=torch.float64) * 2 - 1) * bound])
        return x[: x.numel() // H * H].to(dtype).reshape(1, -1, H)  # (T = 1, B, H)

    def ulp_error(got, x, exact):
        want = exact(x.double())
        # the spacing of |want| in dtype, computed in float64: 2^(e - 24) (float32) or 2^(e - 53) for
        # |want| in [2^(e-1), 2^e). (np.spacing in float32, and torch.ldexp, whose power of two is
        # a float32, read 0 near 1e-38, 'inf ulp', in a process whose compiled code had set the CPU's
        # flush-to-zero modes: torch 2.4.1's inductor, run by earlier tests)
        _, e = torch.frexp(want.abs())
        ulp = torch.exp2((e - (24 if dtype == torch.float32 else 53)).to(torch.float64))
        err = (got.double() - want).abs() / ulp
        worst = int(err.argmax())
        return float(err.flatten()[worst]), float(x.flatten()[worst])

    x = inputs(12.0)
    y, _ = rnnrec_fast.recurrence(x, torch.zeros(x.shape[1], H, dtype=dtype), eye, zero, None, None,
                                  mode="rnn_tanh", backend=backend)
    bound = 8 if dtype == torch.float32 else 16
    err, at = ulp_error(y, x, torch.tanh)
    assert err <= bound, f"tanh: {err:.1f} ulp at x = {at!r}"
    x = inputs(87.0)
    y, _ = rnnrec_fast.recurrence(x, torch.ones(x.shape[1], H, dtype=dtype), torch.cat([zero, eye, zero]),
                                  torch.zeros(3 * H, H, dtype=dtype), None, None, mode="gru", backend=backend)
    err, at = ulp_error(y, x, torch.sigmoid)
    assert err <= bound, f"sigmoid: {err:.1f} ulp at x = {at!r}"
    assert rnnrec_fast.last_backend() == backend


@pytest.mark.parametrize("backend", cpu_backends())
def test_float32_tanh_saturates_to_exactly_one(backend):
    """float32 tanh of |x| >= 9.1 is exactly +-1, as torch.tanh's (every float32 past ~9.01 rounds
    to 1): the C++ vector kernels clamp their rational fit at 9.1, where it gives 1. A clamp at 8
    left 1 - 4 ulp beyond it, within test_activations_to_a_few_ulp's 8 ulp (from a mutation review);
    the fit's 1 + 1 ulp below 9.1 (found by that review) is clamped to 1 now.
    Outputs y = tanh(x) as there (W_ih = I, W_hh = 0, h0 = 0); H = 20: a 16-lane vector and a tail."""
    H = 20
    big = torch.tensor([9.1, 9.125, 9.2, 9.5, 9.75, 10.0, 11.0, 12.0, 13.0, 15.0, 20.0, 30.0, 50.0, 88.0, 100.0,
                        1e3, 1e6, 1e20, 1e30, 3e38])
    x = torch.stack([big, -big]).reshape(1, 2, H)
    y, _ = rnnrec_fast.recurrence(x, torch.zeros(2, H), torch.eye(H), torch.zeros(H, H), None, None,
                                  mode="rnn_tanh", backend=backend)
    assert rnnrec_fast.last_backend() == backend
    assert torch.equal(torch.tanh(x), x.sign())
    assert torch.equal(y, x.sign()), f"tanh {x[y != x.sign()].tolist()} gave {y[y != x.sign()].tolist()}"
    # and never past +-1 below the clamp: every float32 in [8, 9.1], both signs (the C++ vector
    # kernels' fit gave 1 + 1 ulp for 16,596 of those from 8.2 up, within the 8 ulp above; a sweep
    # of every float32 found none elsewhere)
    sweep = torch.arange(int(torch.tensor(8.0).view(torch.int32)), int(torch.tensor(9.1).view(torch.int32)) + 1,
                         dtype=torch.int32).view(torch.float32)
    sweep = torch.cat([sweep, -sweep])
    sweep = sweep[: sweep.numel() // H * H].reshape(1, -1, H)
    y, _ = rnnrec_fast.recurrence(sweep, torch.zeros(sweep.shape[1], H), torch.eye(H), torch.zeros(H, H), None, None,
                                  mode="rnn_tanh", backend=backend)
    past = y.abs() > 1
    assert not bool(past.any()), f"tanh {sweep[past][:5].tolist()} gave {y[past][:5].tolist()}"


@pytest.mark.parametrize("backend", cpu_backends())
def test_h0_none_is_the_zero_state(backend):
    gen = torch.Generator().manual_seed(2)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(4, 3, 2, 5, "gru", True, "both", torch.float64, gen)
    w_ih.requires_grad_()
    y0, h_0, _ = torch.ops.rnnrec_fast.recurrence(x, None, w_ih, w_hh, b_ih, b_hh, lengths, resets, "gru", True, backend)
    y1, h_1, _ = torch.ops.rnnrec_fast.recurrence(x, torch.zeros_like(h0), w_ih, w_hh, b_ih, b_hh, lengths, resets,
                                                 "gru", True, backend)
    assert torch.equal(y0, y1) and torch.equal(h_0, h_1)
    g0, = torch.autograd.grad(y0.sum(), [w_ih])
    g1, = torch.autograd.grad(y1.sum(), [w_ih])
    torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence.default,
                          (x, None, w_ih, w_hh, b_ih, b_hh, lengths, resets, "gru", True, backend))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("given", ["b_ih", "b_hh"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_one_bias_without_the_other(backend, dtype, given, mode, reset_after):
    """Only one of b_ih / b_hh given (the op takes either alone): outputs, the workspace and the
    gradients equal the reference's, the missing bias acting as zeros, and the given bias gets its
    gradient. (From a mutation review: the op's tests gave both biases or neither, so swapping the
    two 'has a bias' flags that the C++ autograd saves passed every test.)"""
    gen = torch.Generator().manual_seed(case_seed(backend, str(dtype), given, mode, reset_after))

    def draw():
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(5, 3, 4, 6, mode, True, "both", dtype, gen)
        return x, h0, w_ih, w_hh, *((b_ih, None) if given == "b_ih" else (None, b_hh)), lengths, resets

    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = clear_draw(draw, mode, 1e-4)
    params = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih if given == "b_ih" else b_hh)]
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode,
                                                 reset_after, backend)
    ref_in = [as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)] + [lengths, resets]
    ry, rh, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    assert_close(y.detach().double(), ry, dtype, "output")
    assert_close(h_n.detach().double(), rh, dtype, "h_n")
    assert_close(ws.detach().double(), rws, dtype, "workspace")
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gh = torch.randn(h_n.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y * gy.to(dtype)).sum() + (h_n * gh.to(dtype)).sum(), params)
    rg = reference.backward(gy, gh, *ref_in, ry, rws, MODES[mode], reset_after)
    ref_grads = list(rg[:4]) + [rg[4] if given == "b_ih" else rg[5]]
    for name, g, r in zip(["x", "h0", "w_ih", "w_hh", given], grads, ref_grads):
        assert_grad_close(g, r, dtype, name)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("reset_after", [True, False], ids=["gru", "gru_cho"])
def test_flop_count_leaves_out_h0s_carry_in_either_gru_form(reset_after):
    """FlopCounterMode's count of the op's C++ backward (forward 2*T*B*3H*(I + H), backward twice
    that) leaves out h0's first-step carry where h0 requires no gradient: dh . W_hh over the rows
    acting on h_prev itself, 2*B*3H*H, and for Cho's form (reset_after=False) 2*B*2H*H, its W_hn
    product being the r gate's anyway (from a mutation review: the count without Cho's exception
    passed every test, torch.nn having no such form to compare with)."""
    from torch.utils.flop_counter import FlopCounterMode

    T, B, I, H = 4, 3, 2, 5
    gen = torch.Generator().manual_seed(6)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "gru", True, None, torch.float32, gen)
    counts = []
    for h0_grad in (True, False):
        with FlopCounterMode(display=False) as fc:
            y, h_n, _ = torch.ops.rnnrec_fast.recurrence(x.requires_grad_(), h0.detach().requires_grad_(h0_grad),
                                                         w_ih.requires_grad_(), w_hh.requires_grad_(), b_ih, b_hh,
                                                         None, None, "gru", reset_after, "auto")
            (y.sum() + h_n.sum()).backward()
        assert rnnrec_fast.last_backend() == "cpp"
        counts.append(fc.get_total_flops())
    forward = 2 * T * B * 3 * H * (I + H)
    assert counts == [3 * forward, 3 * forward - 2 * B * (3 if reset_after else 2) * H * H]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_opcheck_half_precision(dtype):
    """opcheck of both ops on bfloat16 and float16 inputs (a Python backend runs them): the fake
    kernels' outputs are the real ones', the workspace float32, as the reference saves it (from a
    mutation review: a fake workspace in the inputs' dtype passed every test, whose opchecks ran
    float32 and float64 only)."""
    gen = torch.Generator().manual_seed(5)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(3, 2, 2, 4, "gru", True, "both", dtype, gen)
    _opcheck_both((x.requires_grad_(), h0, w_ih.requires_grad_(), w_hh, b_ih, b_hh, lengths, resets, "gru", True,
                   "reference"))
    with torch.no_grad():
        assert torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, "gru", True,
                                                "auto")[2].dtype == torch.float32


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_opcheck_python_twins(backend):
    """The internal twins the C++ CPU kernel hands forced Python backends to (no autograd of their own)."""
    if not rnnrec_fast.ops._backends.available(backend):
        pytest.skip(f"{backend} unavailable")
    gen = torch.Generator().manual_seed(4)
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = make_inputs(3, 2, 2, 4, "gru", True, "both", torch.float64, gen)
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, "gru", False, backend)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence_py.default, args, test_utils=utils)
    y, h_n, ws = torch.ops.rnnrec_fast.recurrence_py(*args)
    bargs = (torch.randn_like(y), torch.randn_like(h_n)) + args[:8] + (y, ws, "gru", False, backend)
    torch.library.opcheck(torch.ops.rnnrec_fast.recurrence_backward_py.default, bargs, test_utils=utils)


@pytest.mark.parametrize("extras", ["both", "resets", None, "sorted"], ids=["masks", "resets", "plain", "sorted"])
@pytest.mark.parametrize("H", [128, 48])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_threads_give_the_same_bits(mode, reset_after, H, extras):
    """Shapes large enough for the C++ kernels' parallel loops (rows of the per-step products and
    of the pointwise passes, the weight-gradient GEMMs; at H = 48 every product but the
    transposed-A weight gradients' runs the packed kernel on AVX2 machines too, split over rows):
    two threads give exactly the one-thread results, forward and backward (each element is
    computed by the same code in the same order). Without lengths (resets, plain) the forward
    splits the rows over the threads for all its steps, and the backward for each chunk's steps
    (forward_impl, backward_impl, row_threads: 160 rows as 80 + 80); so with lengths that never
    increase (sorted, a PackedSequence's), the rows split by their summed lengths (thread_bounds)."""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(21)
    inputs = make_inputs(4, 160, 64, H, mode, True, "lengths" if extras == "sorted" else extras, torch.float32, gen)
    if extras == "sorted":
        inputs = inputs[:6] + (inputs[6].sort(descending=True).values, None)
    gy = torch.randn(4, 160, H, generator=gen)
    results = one_and_two_threads(lambda: cpp_training_step(inputs[:6], gy, *inputs[6:], mode, reset_after))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_threads_give_the_same_bits_with_resets_in_a_threads_last_row(mode, reset_after):
    """Two threads that split the rows of the forward's steps (160 rows as 80 + 80, each thread
    gathering the state entering a step where one of its rows resets): resets only in each
    thread's last row (79 and 159, at steps 0 and 2) zero those rows' states as with one thread,
    the same bits forward and backward, and the float64 reference's values. (From a mutation
    review: a thread that looked for resets in all its rows but the last passed every test; random
    resets put one elsewhere in a thread's rows at every step.)"""
    if not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(case_seed("threads_last_row_reset", mode, reset_after))
    T, B, I, H = 3, 160, 16, 128
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float32, gen)
    w_ih, w_hh = w_ih * I ** -0.5, w_hh * H ** -0.5  # (states of order 1)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[0, 79] = resets[2, 79] = resets[2, 159] = True
    gy = torch.randn(T, B, H, generator=gen)
    results = one_and_two_threads(
        lambda: cpp_training_step((x, h0, w_ih, w_hh, b_ih, b_hh), gy, None, resets, mode, reset_after))
    for name, a, b in zip(["y", "h_n", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], *results):
        assert torch.equal(a, b), name
    ry, rh, _ = reference.forward(*[as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)], None, resets, MODES[mode],
                                  reset_after)
    assert_close(results[1][0].double(), ry, torch.float32, "output")
    assert_close(results[1][1].double(), rh, torch.float32, "h_n")


def _backends_and_loads():
    """Every CPU backend with its own choice of loads (-1), and the C++ one with each of its AVX-512
    batch-1 product's three forms forced: aligned loads in groups of rows where they apply (2), in
    classes of rows (1), plain loads (0)."""
    cases = []
    for b in cpu_backends():  # (a name, or a pytest.param carrying a skip mark)
        name, marks = (b, ()) if isinstance(b, str) else (b.values[0], b.marks)
        cases.append(pytest.param(name, -1, id=name, marks=marks))
        if name == "cpp":
            cases += [pytest.param(name, c, id=f"cpp-{form}", marks=marks)
                      for c, form in ((2, "grouped"), (1, "aligned"), (0, "plain"))]
    return cases


@contextlib.contextmanager
def forced_gemv_loads(loads):
    """The C++ batch-1 product's loads set (see _backends_and_loads; -1: left as they are), then back."""
    if loads == -1:
        yield
        return
    from rnnrec_fast import _C

    _C._set_gemv_loads(loads)
    try:
        yield
    finally:
        _C._set_gemv_loads(-1)


@pytest.fixture
def gemv_loads(loads):
    """Sets the C++ batch-1 product's loads for the test, then back."""
    with forced_gemv_loads(loads):
        yield


@pytest.mark.parametrize("backend,loads", _backends_and_loads())
@pytest.mark.parametrize("offset", [0, 1, 4, 7, 12])
@pytest.mark.parametrize("T,I,H", [(1, 20, 100), (3, 33, 36), (2, 64, 64)])
@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)],
                         ids=["tanh", "gru", "gru_cho"])
def test_weights_at_any_alignment(gemv_loads, backend, loads, offset, T, I, H, mode, reset_after):
    """Batch-1 products read weights whose rows start anywhere within a cache line (rows of 100
    floats start at four different offsets; a weight that is a view into a larger buffer starts
    anywhere), with aligned loads in classes of rows or plain ones (AVX-512: by CPU, both forced
    here): weights placed `offset` floats into a buffer give the reference's outputs and gradients."""
    gen = torch.Generator().manual_seed(offset * 1000 + T * 100 + H)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, 1, I, H, mode, True, "plain", torch.float32, gen)

    def placed(w):  # scaled like torch.nn's init, so float32 rounding stays within 1e-5 at H = 100
        buf = torch.full((offset + w.numel() + 16,), float("nan"))  # neighbours must never be read
        out = buf[offset:offset + w.numel()].view(w.shape)
        out.copy_(w / w.shape[1] ** 0.5)
        return out

    w_ih, w_hh = placed(w_ih), placed(w_hh)
    assert_float32_matches_reference([x, h0, w_ih, w_hh, b_ih, b_hh], mode, reset_after, backend, gen, 1.0)


def assert_float32_matches_reference(tensors, mode, reset_after, backend, gen, scale):
    """The op's float32 output, h_n and every gradient (of x, h0, w_ih, w_hh, b_ih, b_hh: tensors)
    against the float64 reference, for the loss sum(y * gy) + scale * sum(h_n), gy random values
    times scale."""
    params = [t.requires_grad_() for t in tensors]
    y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*params, None, None, mode, reset_after, backend)
    ref_in = [as64(t) for t in params] + [None, None]
    ry, rh, rws = reference.forward(*ref_in, MODES[mode], reset_after)
    assert_close(y.detach().double(), ry, torch.float32, "output")
    assert_close(h_n.detach().double(), rh, torch.float32, "h_n")
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64) * scale
    gh = torch.full(rh.shape, scale, dtype=torch.float64)
    grads = torch.autograd.grad((y * gy.float()).sum() + (h_n * gh.float()).sum(), params)
    ref_grads = reference.backward(gy, gh, *ref_in, ry, rws, MODES[mode], reset_after)
    for name, g, rg in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], grads, ref_grads):
        assert_close(g.double(), rg, torch.float32, f"grad {name}")


def check_large_products_float32(backend, T, B, I, H, mode, reset_after):
    """float32 against the reference with torch.nn's initial weight scale and a mean-like loss, so
    that float32 rounding stays within 1e-5."""
    gen = torch.Generator().manual_seed(T * 1000 + H)
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float32, gen)
    with torch.no_grad():  # torch.nn's initial scale, so float32 rounding stays within 1e-5
        w_ih.mul_(1 / I ** 0.5)
        w_hh.mul_(1 / H ** 0.5)
    # weight gradients sum T * B terms: O(1) gradients keep 1e-5 meaningful
    assert_float32_matches_reference([x, h0, w_ih, w_hh, b_ih, b_hh], mode, reset_after, backend, gen,
                                     1 / (T * B) ** 0.5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("T,B,I,H", [(3, 100, 130, 128), (2, 20, 64, 512), (64, 64, 48, 7), (6, 2, 300, 200),
                                     (2, 24, 300, 32), (1, 300, 20, 16), (5, 11, 20, 16)])
@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)],
                         ids=["tanh", "gru", "gru_cho"])
def test_large_products_float32(backend, T, B, I, H, mode, reset_after):
    """float32 against the reference at sizes where the C++ products split K into chunks and copy
    operands whose rows are a multiple of 512 bytes apart (H = 128, 512) or not row-major (the
    weight gradients' transposed operand), and where the input projection of T * B >= 4096 rows
    runs the packed kernel on AVX2 machines too, with a last panel narrower than a vector (G * H =
    21 or 7 columns) written into the strided workspace, and where 12 rows of input meet a W_ih
    larger than L2 (the 8-row kernel in chunks, on AVX2), and where the packed kernel's products
    run in chunks of K = 256 that must add up: an input size of 300 in the forward's input
    projection (48 rows, G * H <= 96), and a batch of 300 rows in the weight gradients' products
    (the transposed A of one step of B = 300: float32 was otherwise only checked against itself at
    B = 300, and dropping the sum over the K chunks passed every test; from a mutation review), and
    where the packed kernel's 6-row blocks leave 5 rows (B = 11) or 1 (T * B = 55, taken as 4 + 3
    with the last whole block): no other shape here leaves either, and a last block of 5 computing 4
    rows, or 7 rows taken as one block of 5, passed every test (from a mutation review): forward,
    h_n and every gradient."""
    check_large_products_float32(backend, T, B, I, H, mode, reset_after)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_training_products_of_the_b64_h512_case():
    """The benchmark's B64 T20 H512 training step, float32, against the reference: on Intel CPUs
    MKL takes its large products (the input projection, the backward's d(h) . W_hh at each step,
    the chunks' input and weight gradients: mkl_takes), which no smaller shape here reaches; on
    other CPUs our kernels take them, their K chunks of 256 among them."""
    check_large_products_float32("cpp", 20, 64, 512, 512, "gru", True)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("T,B", [(17, 1), (20, 1), (11, 3), (5, 8), (7, 2)])
@pytest.mark.parametrize("mode,reset_after,H", [("rnn_tanh", True, 64), ("gru", True, 96), ("gru", False, 96),
                                                 ("gru", True, 101)],
                         ids=["tanh", "gru", "gru_cho", "gru_ragged"])
def test_input_projection_of_few_rows(T, B, mode, reset_after, H):
    """The forward's input projection of 13-47 rows (T * B), which the packed kernels (AVX-512 and
    AVX2) take as the columns of a transposed product, 16 rows to a panel and a last 1-8 through the
    few-rows kernel (17 = 16 + 1, 20 = 16 + 4: one long session, 33 = 32 + 1, 40 = 32 + 8; 14 rows
    in one panel), then transpose back (8 x 8 blocks, the gate rows past a multiple of 8 one by
    one: H = 101): output and h_n against the reference in float32, every row of every step."""
    gen = torch.Generator().manual_seed(T * 100 + B + H)
    I = 70
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float32, gen)
    with torch.no_grad():
        w_ih.mul_(1 / I ** 0.5)
        w_hh.mul_(1 / H ** 0.5)
    y, h_n, _ = torch.ops.rnnrec_fast.recurrence(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, mode, reset_after, "cpp")
    ry, rh, _ = reference.forward(*[as64(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)], None, None, MODES[mode],
                                  reset_after)
    assert_close(y.double(), ry, torch.float32, "output")
    assert_close(h_n.double(), rh, torch.float32, "h_n")


def one_and_two_threads(fn):
    """fn() with one intra-op thread, then with two (the thread count restored)."""
    with num_threads(1):
        one = fn()
    with num_threads(2):
        return one, fn()


def cpp_training_step(tensors, gy, lengths, resets, mode, reset_after):
    """y, h_n and the gradients of (y * gy).sum() + h_n.sum() with respect to copies of the six
    tensors (x, h0, w_ih, w_hh, b_ih, b_hh), through the op on the C++ backend."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*leaves, lengths, resets, mode, reset_after, "cpp")
    return [y.detach(), h_n.detach(), *torch.autograd.grad((y * gy).sum() + h_n.sum(), leaves)]


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("mode,reset_after,H", [("rnn_tanh", True, 520), ("gru", True, 300), ("gru", False, 300),
                                                 ("rnn_tanh", True, 513), ("gru", True, 301)],
                         ids=["tanh", "gru", "gru_cho", "tanh_ragged", "gru_ragged"])
def test_few_rows_large_weights_split_over_threads(B, mode, reset_after, H):
    """A few batch rows against a large W_hh: with more than one thread each thread streams a slice
    of W_hh's rows at every step (the long-session case). The same bits as one thread, and the
    reference's values, with lengths and resets (the rows that skip or restart a step). H = 513 and
    3H = 903 rows are not a multiple of the kernels' 4-row blocks: the ragged rows fall elsewhere in
    a thread's slice and in the steps that read W_hh backwards (from a review: on AVX2 one thread and
    two then differed in the last bits). In the scalar build every product is ATen's, whose bits may
    depend on the thread count (MKL's on the Intel Xeon VM split the B = 1 product over two threads
    and differed in the last bit), so there only the values are checked."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(B * 7 + H)
    T, I = 4, 9
    x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, mode, True, "plain", torch.float32, gen)
    with torch.no_grad():
        w_hh.mul_(1 / H ** 0.5)
    lengths = torch.tensor([T, 2, 3][:B])
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[2, 0] = True
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, "cpp")
    (y1, h1, ws1), (y2, h2, ws2) = one_and_two_threads(lambda: torch.ops.rnnrec_fast.recurrence(*args))
    for a, b in ((y1, y2), (h1, h2), (ws1, ws2)):
        if _C.simd_level() != "scalar":
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_close(b.double(), a.double(), torch.float32, "2 threads")
    ry, rh, _ = reference.forward(*[as64(t) for t in args[:6]], lengths, resets, MODES[mode], reset_after)
    assert_close(y2.double(), ry, torch.float32, "output")
    assert_close(h2.double(), rh, torch.float32, "h_n")


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("B", range(2, 9))
def test_few_rows_every_batch_size(B):
    """2 to 8 batch rows, whose recurrent product (and, at T = 1, input projection) runs a few-rows
    kernel with a register block per row count (AVX-512 where the weights' rows start on cache
    lines, as here at H = I = 256; 7 and 8 rows as 4 + 3 and 4 + 4): the reference's values, and
    1 and 2 threads (W_hh's rows split between them; at T = 2 the second step reads W_hh
    backwards) the same bits. (T * B stays at most 16, where the input projection is ours: the
    few-rows kernel, or the transposed packed product from 13 rows, each output one sum whatever the
    thread count. MKL's small GEMM, 9 x 48 x 768, gave one thread and two different bits in a row;
    in the scalar build every product is ATen's, whose bits may depend on the thread count, so there
    only the values are checked.)"""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(B * 31)
    H, I = 256, 256
    for T in (1, 2):
        x, h0, w_ih, w_hh, b_ih, b_hh, _, _ = make_inputs(T, B, I, H, "gru", True, "plain", torch.float32, gen)
        with torch.no_grad():
            w_hh.mul_(1 / H ** 0.5)
            w_ih.mul_(1 / I ** 0.5)
        args = (x, h0, w_ih, w_hh, b_ih, b_hh, None, None, "gru", True, "cpp")
        (y1, h1, _), (y2, h2, _) = one_and_two_threads(lambda: torch.ops.rnnrec_fast.recurrence(*args))
        if _C.simd_level() != "scalar":
            torch.testing.assert_close(y1, y2, rtol=0, atol=0)
            torch.testing.assert_close(h1, h2, rtol=0, atol=0)
        assert_close(y2.double(), y1.double(), torch.float32, f"2 threads, T={T}")
        ry, rh, _ = reference.forward(*[as64(t) for t in args[:6]], None, None, MODES["gru"], True)
        assert_close(y1.double(), ry, torch.float32, f"output, T={T}")
        assert_close(h1.double(), rh, torch.float32, f"h_n, T={T}")
    # the product itself (_C.linear_rows runs the same kernels; the outputs above pass a gate's last
    # bit through a sigmoid, which may round it away): a weight row's place in a block or a thread's
    # slice does not change its sums (N = 771: 3 rows past the last register block)
    W = torch.randn(771, 256, generator=gen) / 16
    xb = torch.randn(B, 256, generator=gen)
    p1, p2 = one_and_two_threads(lambda: _C.linear_rows(xb, W))
    if _C.simd_level() != "scalar":
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert_close(p1.double(), xb.double() @ W.double().t(), torch.float32, "product")


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_linear_rows_matches_addmm():
    """_C.linear_rows (the serving scores: a few rows against the whole catalogue) equals
    torch.addmm: 1-9 rows (9 goes to ATen), with and without bias, 1 and 2 threads (the catalogue
    split over threads), a non-contiguous x, float64 (ATen); with autograd to record it is ATen's
    differentiable product; bad shapes raise ValueError."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(2933, 100, generator=gen)
    b = torch.randn(2933, generator=gen)
    threads = torch.get_num_threads()
    try:
        for nthr in (1, 2):
            torch.set_num_threads(nthr)
            for M in range(1, 10):
                x = torch.randn(M, 100, generator=gen)
                assert_close(_C.linear_rows(x, W, b), torch.addmm(b, x, W.t()), torch.float32, f"M={M}")
                assert_close(_C.linear_rows(x, W), x @ W.t(), torch.float32, f"M={M}, no bias")
    finally:
        torch.set_num_threads(threads)
    xt = torch.randn(100, 3, generator=gen).t()  # (3, 100), not contiguous
    assert_close(_C.linear_rows(xt, W, b), torch.addmm(b, xt, W.t()), torch.float32, "non-contiguous x")
    x64, W64 = torch.randn(2, 100, dtype=torch.float64), W.double()
    torch.testing.assert_close(_C.linear_rows(x64, W64), x64 @ W64.t())
    xg = torch.randn(2, 100, requires_grad=True)
    (g,) = torch.autograd.grad(_C.linear_rows(xg, W, b).sum(), xg)
    (ref,) = torch.autograd.grad(torch.addmm(b, xg, W.t()).sum(), xg)
    torch.testing.assert_close(g, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="linear_rows"):
        _C.linear_rows(torch.randn(2, 99), W, b)
    with pytest.raises(ValueError, match="linear_rows"):
        _C.linear_rows(torch.randn(2, 100), W, torch.randn(5))


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_large_outputs_come_from_the_scratch_pool_and_act_as_tensors():
    """The op's large outputs (y, the workspace; grad_x and the weight gradients in the backward) come
    from the scratch pool that the kernels keep between calls (from glibc, a training step's outputs
    came back as fresh pages at every step, each faulted in again): freed, they are kept for the
    next call; alive, a later call leaves them alone; they resize, share memory and pickle as any
    CPU tensor, and gradients accumulate into them; under torch's memory profiler they come from
    c10's CPU allocator, which reports them."""
    import io
    import pickle

    gen = torch.Generator().manual_seed(31)
    T, B, H = 20, 16, 128  # y and grad_x 160 KiB, the workspace 640 KiB: blocks the pool keeps
    args = make_inputs(T, B, H, H, "gru", True, "none", torch.float32, gen)[:6]
    other = make_inputs(T, B, H, H, "gru", True, "none", torch.float32, gen)[:6]

    def call(a):
        return torch.ops.rnnrec_fast.recurrence(*a, None, None, "gru", True, "cpp")

    rnnrec_fast.empty_cache()
    y, h_n, ws = call(args)
    kept = (y.clone(), h_n.clone(), ws.clone())
    before = rnnrec_fast.scratch_bytes()
    y2, h2, ws2 = call(other)  # while the first call's outputs live
    assert all(torch.equal(a, b) for a, b in zip((y, h_n, ws), kept))
    assert not torch.equal(y2, y)
    freed = y2.nbytes + ws2.nbytes
    del y2, h2, ws2
    assert rnnrec_fast.scratch_bytes() >= before + freed
    y3, _, ws3 = call(args)  # from the kept blocks: the same values as the first call's
    assert rnnrec_fast.scratch_bytes() <= before + freed - ws3.nbytes
    assert torch.equal(y3, kept[0]) and torch.equal(ws3, kept[2])

    # ordinary tensors: resized (in place and through the storage), shared, pickled
    n = y.numel()
    y.resize_(2 * n)
    assert torch.equal(y[:n], kept[0].reshape(-1))
    ws.untyped_storage().resize_(ws.nbytes * 3)
    assert torch.equal(ws, kept[2])
    h3 = y3.share_memory_()
    assert h3.is_shared() and torch.equal(h3, kept[0])
    buf = io.BytesIO()
    torch.save(ws3, buf)
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue())), kept[2])
    assert torch.equal(pickle.loads(pickle.dumps(ws3)), kept[2])

    # grad_x and the weight gradients: from the pool, back to it when freed; two backward passes
    # accumulate into x.grad
    x, w_ih, w_hh = (t.clone().requires_grad_() for t in args[:1] + args[2:4])
    loss = lambda: (call((x, args[1], w_ih, w_hh) + tuple(args[4:]))[0] ** 2).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(), (x, w_ih, w_hh))
    g1 = grads[0].clone()
    before = rnnrec_fast.scratch_bytes()
    freed = sum(g.nbytes for g in grads)
    del grads
    assert rnnrec_fast.scratch_bytes() >= before + freed
    loss().backward()
    loss().backward()
    assert_close(x.grad.double(), 2 * g1.double(), torch.float32, "accumulated grad_x")

    # torch's memory profiler sees them (c10's CPU allocator, which reports to it)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        call(args)
    events = [e for e in prof.events() if e.name == "rnnrec_fast::recurrence"]
    assert events and max(e.cpu_memory_usage for e in events) >= kept[0].nbytes + kept[2].nbytes


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("K", [20, 24, 36, 52, 88, 100, 120, 200])
def test_grouped_rows_give_the_classes_bits(K):
    """The AVX-512 batch-1 product of a weight whose rows lie back to back, K a multiple of 4 but
    not of 16 (H = 100), read in groups of rows that fill whole cache lines (gemv_grouped), gives
    each row the bits of the classes' form (gemv_nt_aligned), which takes the rows that cannot be
    grouped (the last M % 8, a weight off a cache line): so a row's sum does not depend on which
    form or thread slice reads it. Random values; zero weights against negative x (every product
    -0: the classes' form makes the lanes past a row's end +0); zeros of both signs; infinities,
    NaN, denormals and huge values in x and in W (a neighbouring row's values must not leak into a
    row's first or last vector); 8 to 39 rows. The forms are asserted taken (_C._gemv_form), and
    finite results match float64."""
    from rnnrec_fast import _C

    if _C.simd_level() != "avx512":
        pytest.skip("the AVX-512 kernels do not run on this CPU")
    gen = torch.Generator().manual_seed(K)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 3e38, -3e38])

    def pick(n):
        return specials[torch.randint(0, len(specials), (n,), generator=gen)]

    for trial in range(36):
        M = 8 * (1 + trial % 4) + trial % 8
        W = torch.randn(M, K, generator=gen) / K ** 0.5
        x = torch.randn(1, K, generator=gen)
        kind = trial % 6
        if kind == 1:
            W.zero_()
            x = -x.abs()
        elif kind == 2:
            W[torch.rand(M, K, generator=gen) < 0.5] = -0.0
            x[torch.rand(1, K, generator=gen) < 0.3] = 0.0
        elif kind == 3:
            x = -x.abs()
        if kind >= 4:
            x.view(-1)[torch.randint(0, K, (2,), generator=gen)] = pick(2)
        if kind == 5:
            W.view(-1)[torch.randint(0, M * K, (6,), generator=gen)] = pick(6)
        outs, forms = {}, {}
        for loads in (2, 1):
            with forced_gemv_loads(loads):
                forms[loads] = _C._gemv_form(W)
                outs[loads] = _C.linear_rows(x, W)
        assert forms == {2: "grouped", 1: "classes"}, forms
        g, c = outs[2], outs[1]
        same = (g.view(torch.int32) == c.view(torch.int32)) | (g.isnan() & c.isnan())
        assert bool(same.all()), (f"K={K} M={M} kind={kind}: rows {same.logical_not().nonzero()[:, 1].tolist()}: "
                                  f"{g[~same].tolist()} against {c[~same].tolist()}")
        if kind in (0, 3):
            assert_close(g.double(), x.double() @ W.double().t(), torch.float32, f"K={K} M={M}")


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_extension_helpers_read_the_negative_bit():
    """linear_rows, score_topk and topk_rows take a tensor with the negative bit (a lazily negated
    view: x.conj().imag, torch._neg_view; its memory holds the values' negation) by its values,
    as ATen does (they read the raw memory: the sign was wrong)."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(6)
    N, H = 300, 16
    W, b, h = torch.randn(N, H, generator=gen), torch.randn(N, generator=gen), torch.randn(H, generator=gen)
    x = torch.randn(2, H, generator=gen)
    neg = torch._neg_view
    for args in ((neg(x), W, b), (x, neg(W), b), (x, W, neg(b))):
        assert args[0].is_neg() or args[1].is_neg() or args[2].is_neg()
        want = torch.addmm(*[a.resolve_neg() for a in (args[2], args[0])], args[1].resolve_neg().t())
        assert_close(_C.linear_rows(*args), want, torch.float32, "linear_rows")
    for hh, WW, bb in ((neg(h), W, b), (h, neg(W), b), (h, W, neg(b))):
        want = torch.topk(torch.addmv(bb.resolve_neg(), WW.resolve_neg(), hh.resolve_neg()), 5)
        vals, idx = _C.score_topk(hh, WW, bb, 5, [])
        assert idx == want.indices.tolist()
        torch.testing.assert_close(torch.tensor(vals), want.values, rtol=1e-5, atol=1e-5)
    scores = neg(torch.randn(3, N, generator=gen))
    vals, idx = _C.topk_rows(scores, 4)
    want = torch.topk(scores.resolve_neg(), 4)
    assert torch.equal(idx, want.indices) and torch.equal(vals, want.values)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_extension_helpers_refuse_freed_storage_and_read_zero_tensors():
    """linear_rows, score_topk and topk_rows refuse a tensor whose storage was freed or shrunk after
    it was made (they read past its end: a GRU4Rec whose item matrix was freed scored garbage),
    with a ValueError naming it; they take an efficient zero tensor as zeros (linear_rows' kernel
    read the missing memory: 'data is not allocated'; score_topk and topk_rows raised ATen's
    RuntimeError saying so)."""
    from rnnrec_fast import _C
    from rnnrec_fast.recsys import GRU4Rec

    N, H = 300, 16
    W, b, h, x = torch.randn(N, H), torch.randn(N), torch.randn(H), torch.randn(2, H)
    with pytest.raises(ValueError, match="linear_rows: W reaches 19200 bytes into its storage, which holds 8"):
        _C.linear_rows(x, shrunk(W.clone()), b)
    with pytest.raises(ValueError, match="linear_rows: x reaches 128 bytes"):
        _C.linear_rows(shrunk(x.clone()), W, b)
    with pytest.raises(ValueError, match="linear_rows: b reaches"):
        _C.linear_rows(x, W, shrunk(b.clone()))
    with pytest.raises(ValueError, match="score_topk: W reaches"):
        _C.score_topk(h, shrunk(W.clone()), b, 5, [])
    with pytest.raises(ValueError, match="score_topk: h reaches"):
        _C.score_topk(shrunk(h.clone()), W, b, 5, [])
    with pytest.raises(ValueError, match="topk_rows: scores reaches"):
        _C.topk_rows(shrunk(torch.randn(3, N)), 4)
    z = torch._efficientzerotensor
    assert_close(_C.linear_rows(z(2, H), W, b), b.expand(2, N), torch.float32, "linear_rows, zero x")
    assert_close(_C.linear_rows(x, z(N, H), b), b.expand(2, N), torch.float32, "linear_rows, zero W")
    def values(t):  # (a zero tensor's values as a plain tensor)
        return torch.zeros(t.shape) if t._is_zerotensor() else t

    for hh, WW, bb in ((z(H), W, b), (h, z(N, H), b), (h, W, z(N))):
        want = torch.topk(torch.addmv(values(bb), values(WW), values(hh)), 5)
        vals, idx = _C.score_topk(hh, WW, bb, 5, [])
        assert idx == want.indices.tolist()
        torch.testing.assert_close(torch.tensor(vals), want.values, rtol=1e-5, atol=1e-5)
    vals, idx = _C.topk_rows(z(3, N), 4)  # (ties: the lower index first)
    assert torch.equal(vals, torch.zeros(3, 4)) and torch.equal(idx, torch.arange(4).expand(3, 4))
    model = GRU4Rec(N, [H]).eval()
    shrunk(model.Wy.data)
    with pytest.raises(ValueError, match="W reaches"):
        model.score(torch.randn(1, H))


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_packed_helpers_refuse_freed_storage_and_other_sizes():
    """pad_packed_sorted, unpad_packed_sorted and reverse_padded (the modules' PackedSequence copies)
    refuse a tensor whose storage was freed or shrunk after it was made, with a ValueError naming
    it, and unpad_packed_sorted a padded sequence of other steps than batch_sizes has: they read by
    pointer, past the memory's end (from a mutation review: without these checks every test
    passed)."""
    from rnnrec_fast import _C

    bs = torch.tensor([3, 2, 2, 1])
    data, padded, lengths = torch.randn(8, 5), torch.randn(4, 3, 5), torch.tensor([4, 3, 1])
    x, n = _C.pad_packed_sorted(data, bs)  # (what fits: a round trip)
    assert torch.equal(n, lengths) and torch.equal(_C.unpad_packed_sorted(x, bs), data)
    with pytest.raises(ValueError, match="pad_packed_sorted: data reaches 160 bytes into its storage, which holds 8"):
        _C.pad_packed_sorted(shrunk(data.clone()), bs)
    with pytest.raises(ValueError, match="pad_packed_sorted: batch_sizes reaches 32 bytes"):
        _C.pad_packed_sorted(data, shrunk(bs.clone()))
    with pytest.raises(ValueError, match="unpad_packed_sorted: padded reaches 240 bytes"):
        _C.unpad_packed_sorted(shrunk(padded.clone()), bs)
    for steps in (3, 5):
        with pytest.raises(ValueError, match=rf"padded must be \(4, 3, C\) for these batch_sizes, got \[{steps}, 3, 5\]"):
            _C.unpad_packed_sorted(torch.randn(steps, 3, 5), bs)
    with pytest.raises(ValueError, match="reverse_padded: x reaches 240 bytes"):
        _C.reverse_padded(shrunk(padded.clone()), lengths)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_score_topk_matches_torch_topk():
    """_C.score_topk (the serving click: W h + b, exclusions at -inf, the k best as lists) against
    addmv + torch.topk: several k up to N, 1 and 2 threads, exclusions (repeated ones too), NaN
    ranked first as torch.topk ranks it, equal scores in index order, and clear errors."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(5)
    N, H = 1000, 37
    W, b, h = torch.randn(N, H, generator=gen), torch.randn(N, generator=gen), torch.randn(H, generator=gen)
    ref = torch.addmv(b, W, h)
    threads = torch.get_num_threads()
    try:
        for nthr in (1, 2):
            torch.set_num_threads(nthr)
            for k in (1, 5, 20, N):
                v, i = _C.score_topk(h, W, b, k)
                rv, ri = torch.topk(ref, k)
                assert i == ri.tolist(), (nthr, k)
                assert_close(torch.tensor(v), rv, torch.float32, f"k={k}")
    finally:
        torch.set_num_threads(threads)
    excl = ri[:7].tolist() + ri[:2].tolist()
    masked = ref.clone()
    masked[excl] = float("-inf")
    v, i = _C.score_topk(h.view(1, H), W, b, 30, excl)
    assert i == torch.topk(masked, 30).indices.tolist() and not set(i) & set(excl)
    bn = b.clone()
    bn[[3, 500]] = float("nan")
    v, i = _C.score_topk(h, W, bn, 4)
    assert sorted(i[:2]) == [3, 500] and all(x != x for x in v[:2])
    assert i[2:] == [j for j in torch.topk(ref, 6).indices.tolist() if j not in (3, 500)][:2]
    flat = torch.zeros(N)  # every score equal: the lowest indices, in order
    assert _C.score_topk(torch.zeros(H), W, flat, 5)[1] == [0, 1, 2, 3, 4]
    for bad in (lambda: _C.score_topk(h, W, b, 0), lambda: _C.score_topk(h, W, b, N + 1),
                lambda: _C.score_topk(h, W, b, 3, [N]), lambda: _C.score_topk(h[:5], W, b, 3),
                lambda: _C.score_topk(h, W, b[:5], 3), lambda: _C.score_topk(h, W.double(), b, 3)):
        with pytest.raises(ValueError, match="score_topk"):
            bad()


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_topk_rows_matches_torch_topk():
    """_C.topk_rows (the serving batch's top-k) equals torch.topk(scores, k, dim=1): several k up to
    N, 1 and 2 threads, a strided input, -inf and NaN entries; clear errors."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(9)
    s = torch.randn(37, 501, generator=gen)
    s[3, :400] = float("-inf")
    s[5, [7, 300]] = float("nan")
    threads = torch.get_num_threads()
    try:
        for nthr in (1, 2):
            torch.set_num_threads(nthr)
            for k in (1, 20, 501):
                v, i = _C.topk_rows(s, k)
                rv, ri = torch.topk(s, k, dim=1)
                if k < 501:  # (at k = N the many -inf ties of row 3 may come in another order)
                    keep = torch.arange(37) != 5  # row 5's two NaNs may come in either order
                    assert torch.equal(i[keep], ri[keep]), (nthr, k)
                    assert set(i[5, :2].tolist()) <= {7, 300} and torch.equal(i[5, 2:], ri[5, 2:])
                torch.testing.assert_close(v, rv, equal_nan=True)
    finally:
        torch.set_num_threads(threads)
    assert sorted(_C.topk_rows(s, 2)[1][5].tolist()) == [7, 300]
    st = torch.randn(501, 4, generator=gen).t()
    assert torch.equal(_C.topk_rows(st, 9)[1], torch.topk(st, 9, dim=1).indices)
    for bad in (lambda: _C.topk_rows(s, 0), lambda: _C.topk_rows(s, 502), lambda: _C.topk_rows(s.double(), 3),
                lambda: _C.topk_rows(s[0], 3)):
        with pytest.raises(ValueError, match="topk_rows"):
            bad()


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_topk_selection_order_for_every_k():
    """Both selections (a sorted array for k <= 32, k <= 64 on the AVX2 path; above, where the array
    cost O(N k), a buffer of (score, index) keys refilled with the scores that beat its k-th) give one order: NaN first, then
    scores descending (-0 equal to +0), equal scores by lower index. Checked for k on both sides of
    each switch, in topk_rows and score_topk, against a sort in Python."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(11)
    N = 400
    s = torch.round(torch.randn(N, generator=gen) * 3) / 2  # many ties
    s[[5, 77, 200]] = float("nan")
    s[[9, 10]] = float("inf")
    s[[11, 12]] = float("-inf")
    zeros = (s == 0).nonzero().flatten()
    s[zeros[::2]] = -0.0
    vals = s.tolist()
    order = sorted(range(N), key=lambda j: (0, 0.0, j) if vals[j] != vals[j] else (1, -vals[j] + 0.0, j))
    eye = torch.eye(1)
    for k in (1, 20, 32, 33, 64, 65, 99, 100, 101, 250, N - 1, N):
        v, i = _C.topk_rows(s.view(1, N), k)
        assert i[0].tolist() == order[:k], k
        torch.testing.assert_close(v[0], s[order[:k]], equal_nan=True, rtol=0, atol=0)
        sv, si = _C.score_topk(eye[0], s.view(N, 1), torch.zeros(N), k)
        assert si == order[:k], k


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", ["ties", "distinct", "tail", "nan", "many_nan", "constant", "descending", "ascending"])
def test_topk_selection_of_many_scores(case):
    """From 1,024 scores and k = 10 the vector selection first bounds the k-th score from below by
    the maxima of 64 interleaved groups and offers only the scores not below it; above k = 64 (32
    without AVX2) a buffer of 3k keys is cut to its k best and refilled with the later scores above
    its k-th, 8 at a time where AVX2 runs. The same order as a sort (NaN first, scores descending,
    -0 equal to +0, equal scores by lower index) for k on both sides of 10, 32, 64 and of 978 (where the buffer
    holds every score), N = 2,933 (not a multiple of 64 or 8: the last 53 scores are in no group):
    many ties (at the buffer's k-th too); N(0, 1) scores (no ties); the best finite scores among the last 53, the best of all among the last 5; a NaN
    (no bound: every score offered); 155 NaN (k of them held: the scan stops); all scores equal; scores in
    descending order (every score in a group's maximum's place; none refills the buffer); in ascending order (every score does)."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(17)
    N = 2933
    s = torch.round(torch.randn(N, generator=gen) * 4) / 2  # many ties
    s[[9, 2000]] = float("inf")
    s[[11, 2931]] = float("-inf")
    zeros = (s == 0).nonzero().flatten()
    s[zeros[::2]] = -0.0
    if case == "distinct":
        s = torch.randn(N, generator=gen)
    elif case == "tail":
        s[N - 53:] = s[s.isfinite()].max() + torch.arange(53, 0, -1) % 7  # (ties among them too)
        s[N - 3] = s[N - 53:].max() + 1  # (among the last 5, past the last whole vector)
    elif case == "nan":
        s[[1500, 2870, 2920]] = float("nan")  # (2870: in the last whole group of 64)
    elif case == "constant":
        s = torch.full((N,), 0.25)
    elif case == "many_nan":
        s[::19] = float("nan")
    elif case == "descending":
        s = torch.arange(N, 0, -1, dtype=torch.float32) / 8
    elif case == "ascending":
        s = torch.arange(N, dtype=torch.float32) / 8
    vals = s.tolist()
    order = sorted(range(N), key=lambda j: (0, 0.0, j) if vals[j] != vals[j] else (1, -vals[j] + 0.0, j))
    eye = torch.eye(1)
    for k in (1, 4, 9, 10, 11, 20, 31, 32, 33, 48, 63, 64, 65, 100, 154, 155, 156, 500, 977, 978, N - 1, N):
        v, i = _C.topk_rows(s.view(1, N), k)
        assert i[0].tolist() == order[:k], k
        torch.testing.assert_close(v[0], s[order[:k]], equal_nan=True, rtol=0, atol=0)
        sv, si = _C.score_topk(eye[0], s.view(N, 1), torch.zeros(N), k)
        assert si == order[:k], k


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_topk_selection_of_a_large_catalogue():
    """The selection of k > 64 among 100,003 scores (a catalogue's; many rounds of the key buffer),
    N(0, 1) in one row, with ties and NaN in the other, in the order of a sort, in topk_rows (rows in
    parallel) and score_topk."""
    from rnnrec_fast import _C

    gen = torch.Generator().manual_seed(23)
    N = 100_003
    s = torch.randn(2, N, generator=gen)
    s[1] = torch.round(s[1] * 64) / 8
    s[1, [17, 50_000, N - 1]] = float("nan")
    eye = torch.eye(1)
    for k in (65, 100, 1000, 5000):
        v, i = _C.topk_rows(s, k)
        for r in range(2):
            vals = s[r].tolist()
            order = heapq.nsmallest(k, range(N), key=lambda j: (0, 0.0, j) if vals[j] != vals[j] else (1, -vals[j] + 0.0, j))
            assert i[r].tolist() == order, (k, r)
            torch.testing.assert_close(v[r], s[r, order], equal_nan=True, rtol=0, atol=0)
        assert _C.score_topk(eye[0], s[1].view(N, 1), torch.zeros(N), k)[1] == i[1].tolist(), k


# Opt-in big-memory tests (RNNREC_FAST_BIGMEM=1): sizes whose element offsets pass 2^31 although
# every dimension is small, where index arithmetic done in 32 bits would wrap (a catalogue of 19.3M
# items x H = 128; a GRU workspace of T = 65 x B = 65537 x 4H = 512), with a row, a step or a
# thread's share of the work starting past element 2^31 (a wrapped start offset shows there, not
# only a wrapped offset within a kernel). Each needs ~12 GB of free RAM and 1-2 min on 2 cores; run
# one such process at a time. The test_op.py selection that test_simd_paths.py re-runs on the AVX2
# and scalar kernels takes the scoring ones with it (their names hold "linear_rows" / "topk") when
# the variable is set. (A signed 32-bit offset there crashed each of these tests, a segfault at the
# call, in a scratch build; an unsigned one would need 2^32 elements, 16 GiB, to show.)
bigmem = pytest.mark.skipif(not env_flag("RNNREC_FAST_BIGMEM") or not backends.available("cpp"),
                            reason="big-memory test (~12 GB of RAM, minutes; needs the C++ extension): "
                                   "set RNNREC_FAST_BIGMEM=1 to run it")
_BIG_CHUNK = 1 << 20


def _uniform_big(shape, gen):
    """A float32 tensor of U(-1, 1) values, filled in chunks of rows (no temporaries of its size)."""
    t = torch.empty(shape)
    flat = t.view(-1, shape[-1])
    for r in range(0, flat.shape[0], _BIG_CHUNK):
        flat[r:r + _BIG_CHUNK].uniform_(-1, 1, generator=gen)
    return t


@bigmem
def test_bigmem_linear_rows_and_score_topk_past_2_31_elements():
    """linear_rows and score_topk on an item matrix of N * H > 2^31 elements (19.3M items x 128,
    9.2 GiB): the scores of the items past element 2^31 equal torch's (addmm over chunks of items),
    and the top-k, with the best items planted there, equals torch.topk's. On one thread (offsets
    within the kernel pass 2^31) and on eight (the catalogue split over threads: the last shares
    start past 2^31)."""
    from rnnrec_fast import _C

    H = 128
    N = (1 << 31) // H * 23 // 20  # 1.15 x 2^31 elements: the last of 8 thread shares starts past 2^31
    wrap = (1 << 31) // H
    gen = torch.Generator().manual_seed(21)
    W = _uniform_big((N, H), gen)
    b = torch.empty(N).uniform_(-1, 1, generator=gen)
    x = torch.randn(3, H, generator=gen)
    hot = [N - 1, wrap + 1, N - 2000, 7]  # row 0's best items (equal rows, told apart by b): three past the wrap
    W[hot] = x[0] / x[0].norm() * 40
    ref = torch.empty(N)  # row 0's scores, as torch computes them
    for r in range(0, N, _BIG_CHUNK):
        ref[r:r + _BIG_CHUNK] = torch.addmv(b[r:r + _BIG_CHUNK], W[r:r + _BIG_CHUNK], x[0])
    threads = torch.get_num_threads()
    try:
        for nthr in (1, 8):
            torch.set_num_threads(nthr)
            for M in (1, 3):  # M = 1: the AVX-512 gemv where the CPU has it; M = 3: the small-batch kernel
                got = _C.linear_rows(x[:M], W, b)
                for r in range(0, N, _BIG_CHUNK):
                    want = torch.addmm(b[r:r + _BIG_CHUNK], x[:M], W[r:r + _BIG_CHUNK].t())
                    torch.testing.assert_close(got[:, r:r + _BIG_CHUNK], want, rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"linear_rows M={M}, {nthr} threads, items from {r}: {m}")
                del got
            for k, excl in ((20, []), (100, []), (20, [N - 1, 3])):  # k <= 32 and k > 32: both selections
                masked = ref.clone()
                masked[excl] = float("-inf")
                rv, _ = torch.topk(masked, k)
                v, i = _C.score_topk(x[0], W, b, k, excl)
                want_hot = sorted(set(hot) - set(excl), key=lambda j: -float(b[j]))  # (equal rows: b decides)
                assert i[:len(want_hot)] == want_hot, (nthr, k, excl, i[:len(want_hot)])
                assert len(set(i)) == k and not set(i) & set(excl), (nthr, k, excl)
                # (the tail of the k may order two near-equal scores otherwise than torch: compared by value)
                torch.testing.assert_close(torch.tensor(v), rv, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(masked[i], torch.tensor(v), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@bigmem
def test_bigmem_topk_rows_past_2_31_elements():
    """topk_rows on a (129, 16.8M) score matrix (M * N > 2^31, 8.1 GiB; the last row starts past
    element 2^31): every row's top-k equals torch.topk's values, at the indices of those values
    (torch's order among equal scores is unspecified); both selections (k <= 32 and k > 32)."""
    from rnnrec_fast import _C

    M = 129
    N = (1 << 31) // (M - 1) + 1000
    gen = torch.Generator().manual_seed(22)
    s = _uniform_big((M, N), gen)
    s[-1, [N - 1, N - 5, 3]] = torch.tensor([5.0, 4.0, 3.0])
    s[0, N - 2] = 6.0
    for k in (20, 100):
        v, i = _C.topk_rows(s, k)
        assert i[-1, :3].tolist() == [N - 1, N - 5, 3] and i[0, 0].item() == N - 2, k
        for r0 in range(0, M, 8):
            rv, _ = torch.topk(s[r0:r0 + 8], k, dim=1)
            assert torch.equal(v[r0:r0 + 8], rv), (k, r0)
            assert torch.equal(s[r0:r0 + 8].gather(1, i[r0:r0 + 8]), rv), (k, r0)
        assert all(len(set(row)) == k for row in i.tolist()), k


@bigmem
@pytest.mark.parametrize("reset_after", [True, False])
def test_bigmem_gru_workspace_past_2_31_elements(reset_after):
    """The C++ GRU forward and backward with a workspace (T, B, 4H) of more than 2^31 elements
    (T = 65, B = 65537, H = 128: 8.1 GiB; the last step starts past element 2^31). The
    rows are independent: outputs, workspace, h_n, grad_x and grad_h0 of rows 0, 1 and the last 64
    equal the reference backend's on those rows; the weight and bias gradients (sums over all rows)
    equal the sum of the C++ backward over the two halves of the batch (each below 2^31), to the
    float32 rounding of sums of 4.2M terms (grad_w_ih cancels: ~6e-4 of its largest element)."""
    from rnnrec_fast import _C

    T, B, I, H = 65, 65537, 1, 128
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(T, B, I, generator=gen)
    h0 = torch.randn(B, H, generator=gen) * 0.5
    w_ih = torch.randn(3 * H, I, generator=gen) * 0.3
    w_hh = torch.randn(3 * H, H, generator=gen) / H ** 0.5
    b_ih, b_hh = torch.randn(3 * H, generator=gen) * 0.1, torch.randn(3 * H, generator=gen) * 0.1
    gy, ghn = torch.ones(1, 1, 1).expand(T, B, H), torch.zeros(B, H)
    y, hn, ws = _C.forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, 2, reset_after)
    assert (T - 1) * B * ws.shape[2] >= 1 << 31
    rows = [0, 1] + list(range(B - 64, B))
    xr = x[:, rows].contiguous()
    ry, rhn, rws = reference.forward(xr, h0[rows], w_ih, w_hh, b_ih, b_hh, None, None, 2, reset_after)
    for name, got, want in (("y", y[:, rows], ry), ("h_n", hn[rows], rhn), ("ws", ws[:, rows], rws)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    grads = _C.backward(gy, ghn, x, h0, w_ih, w_hh, b_ih, b_hh, None, None, y, ws, 2, reset_after)
    rg = reference.backward(gy[:, rows], ghn[rows], xr, h0[rows], w_ih, w_hh, b_ih, b_hh, None, None, ry, rws, 2,
                            reset_after)
    for name, got, want in (("grad_x", grads[0][:, rows], rg[0]), ("grad_h0", grads[1][rows], rg[1])):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
    full = [g.clone() for g in grads[2:]]
    del y, hn, ws, grads
    halves = [torch.zeros_like(g, dtype=torch.float64) for g in full]
    for b0, b1 in ((0, B // 2), (B // 2, B)):
        xs = x[:, b0:b1].contiguous()
        yh, _, wsh = _C.forward(xs, h0[b0:b1], w_ih, w_hh, b_ih, b_hh, None, None, 2, reset_after)
        gh = _C.backward(gy[:, b0:b1], ghn[b0:b1], xs, h0[b0:b1], w_ih, w_hh, b_ih, b_hh, None, None, yh, wsh, 2,
                         reset_after)
        for acc, g in zip(halves, gh[2:]):
            acc += g.double()
        del yh, wsh, gh
    for name, got, want in zip(("grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"), full, halves):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-3 * scale,
                                   msg=lambda m: f"{name} (atol 5e-3 x {scale:.3g}): {m}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["rnn_tanh", "gru"])
def test_reset_rows_ignore_what_h0_holds(backend, mode):
    """A row reset at step 0 starts from zeros whatever h0 holds there (NaN, inf: a fresh state
    buffer): outputs and every gradient are those of h0 with that row zeroed, on every backend."""
    torch.manual_seed(2)
    T, B, I, H = 4, 3, 5, 6
    G = 3 if mode == "gru" else 1
    x = torch.randn(T, B, I, dtype=torch.float64)
    w_ih, w_hh = torch.randn(G * H, I, dtype=torch.float64), torch.randn(G * H, H, dtype=torch.float64)
    b_ih, b_hh = torch.randn(G * H, dtype=torch.float64), torch.randn(G * H, dtype=torch.float64)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[0, 1] = True
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        h0 = torch.randn(B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        h0[1] = fill
        leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        y, h_n = rnnrec_fast.recurrence(*leaves, resets=resets, mode=mode, backend=backend)
        grads = torch.autograd.grad((y * 1.5).sum() + h_n.sum(), leaves)
        results.append([y, h_n] + [g for i, g in enumerate(grads) if i != 1])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_non_finite_values_propagate_as_in_the_reference(backend, dtype, mode, reset_after):
    """A state or input gone to inf / NaN gives NaN (or inf) exactly where the reference (torch's
    math) does, and the same finite values elsewhere: no backend turns a diverged state into finite
    outputs (the float32 vector sigmoid gave a denormal for sigmoid(-inf), and 0 * inf became
    inf * denormal = inf, then a finite tanh; numba's did the same)."""
    torch.manual_seed(8)
    T, B, I, H = 3, 5, 5, 6
    G = 3 if mode == "gru" else 1
    x, h0 = torch.randn(T, B, I, dtype=dtype), torch.randn(B, H, dtype=dtype)
    h0[1, 2], h0[2, 0], h0[4, 3] = float("inf"), -float("inf"), float("nan")
    x[1, 3, 1] = float("inf")
    w = [torch.randn(G * H, I, dtype=dtype), torch.randn(G * H, H, dtype=dtype) * 30,
         torch.randn(G * H, dtype=dtype), torch.randn(G * H, dtype=dtype)]
    kw = dict(mode=mode, reset_after=reset_after)
    want = rnnrec_fast.recurrence(x, h0, *w, backend="reference", **kw)
    got = rnnrec_fast.recurrence(x, h0, *w, backend=backend, **kw)
    for a, b, what in zip(got, want, ("output", "h_n")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        assert torch.isnan(b).any() and torch.isfinite(b).any()  # the case has both
        torch.testing.assert_close(a, b, equal_nan=True, **tolerances(dtype))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=["tanh", "relu", "gru", "gru_cho"])
def test_rows_past_their_length_pass_gradients_beside_a_non_finite_w_hh(backend, mode, reset_after):
    """A row's steps past its length pass the gradient through unchanged (the reference selects it,
    torch.where): an inf in W_hh never reaches it there, so h0's gradient of a length-0 row and the
    gradients at a shorter row's last step stay finite, as in the reference. (The CUDA backward
    added 0 @ W_hh to such rows, NaN by IEEE 0 * inf; test_cuda.py holds its twin.)"""
    torch.manual_seed(12)
    T, B, I, H = 4, 3, 3, 5
    G = 3 if mode == "gru" else 1
    x, h0 = torch.randn(T, B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    w = [torch.randn(G * H, I, dtype=torch.float64), torch.randn(G * H, H, dtype=torch.float64),
         torch.randn(G * H, dtype=torch.float64), torch.randn(G * H, dtype=torch.float64)]
    w[1][0, 0] = float("inf")
    lengths = torch.tensor([T, 0, 2])
    grads = []
    for b in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, h0, *w)]
        y, h_n = rnnrec_fast.recurrence(*leaves, lengths=lengths, mode=mode, reset_after=reset_after, backend=b)
        grads.append(torch.autograd.grad((y * 1.5).sum() + h_n.sum(), leaves))
    want, got = grads
    assert torch.isfinite(want[1][1]).all() and torch.isfinite(want[0][1, 2]).all()  # (what the case checks)
    for a, b, what in zip(got, want, ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), what
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["lengths", "resets"])
def test_an_overflowed_state_discarded_stays_out_of_grad_w_hh(backend, dtype, kind):
    """A relu state that overflowed to inf, then discarded: the row's next step is past its length,
    or the row resets there. The reference's h_prev is zero at such steps, so W_hh's gradient stays
    finite; a fast path multiplying the step's zero gradient by the discarded inf made it NaN (the
    C++ backward past a length, the numba backward at a reset; the CUDA backends too: test_cuda.py
    and the simulator check hold their twins). (From a review of the CUDA code.)"""
    T, B, I, H = 2, 2, 2, 3
    g = torch.Generator().manual_seed(3)
    x = torch.rand(T, B, I, generator=g, dtype=torch.float64).to(dtype)
    x[0, 0] = 1e30 if dtype == torch.float32 else 1e300
    w = [t.to(dtype) for t in (torch.rand(H, I, generator=g, dtype=torch.float64) + 0.5,
                               torch.rand(H, H, generator=g, dtype=torch.float64) * 0.1,
                               torch.rand(H, generator=g, dtype=torch.float64),
                               torch.rand(H, generator=g, dtype=torch.float64))]
    w[0] = w[0] * (1e10 if dtype == torch.float32 else 1e10)
    h0 = torch.rand(B, H, generator=g, dtype=torch.float64).to(dtype)
    extra = dict(lengths=torch.tensor([1, 2])) if kind == "lengths" else \
        dict(resets=torch.tensor([[False, False], [True, False]]))
    grads = []
    for b in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, h0, *w)]
        y, h_n = rnnrec_fast.recurrence(*leaves, mode="rnn_relu", backend=b, **extra)
        assert torch.isinf(y[0, 0]).all()  # (what the case is about)
        grads.append(torch.autograd.grad(y[:, 1].sum() + y[0, 0, :0].sum(), leaves, allow_unused=True))
    want, got = grads
    assert torch.isfinite(want[3]).all()
    for a, b_, what in zip(got, want, ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")):
        torch.testing.assert_close(a, b_, equal_nan=True, rtol=1e-5, atol=1e-5, msg=what)


def test_forward_mode_ad_checks_length_values():
    """recurrence() under forward-mode AD (the op's torch operations) refuses lengths past T or
    below 0, as without a tangent (mutation review: dropping the check there computed silently)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(7)
    gru = rnnrec_fast.GRU(3, 4)
    w = [p.detach() for p in gru.parameters()]
    x = torch.randn(5, 2, 3)
    for bad in ([6, 2], [-1, 2]):
        lengths = torch.tensor(bad)
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
            rnnrec_fast.recurrence(x, None, *w, lengths=lengths)
        with fwAD.dual_level(), pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
            rnnrec_fast.recurrence(fwAD.make_dual(x, torch.randn_like(x)), None, *w, lengths=lengths)


@pytest.mark.parametrize("which", ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"])
def test_forward_mode_with_a_tangent_on_one_argument_alone(which):
    """torch.func.jvp of rnnrec_fast.recurrence with a tangent on one argument alone (the others
    closed over) runs the op's torch operations and gives torch.nn.GRU's tangents, whichever
    argument carries it (from a mutation review: with b_hh left out of the tensors recurrence()
    hands op_for, a tangent on b_hh alone reached the op, whose autograd refuses forward mode)."""
    gen = torch.Generator().manual_seed(case_seed(which, "a tangent alone"))
    T, B, I, H = 4, 3, 2, 5
    names = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
    shapes = ((T, B, I), (B, H), (3 * H, I), (3 * H, H), (3 * H,), (3 * H,))
    args = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in zip(names, shapes)}
    tangent = torch.randn(args[which].shape, generator=gen, dtype=torch.float64)
    gru = nn.GRU(I, H, dtype=torch.float64)

    def ours(t):
        return rnnrec_fast.recurrence(*dict(args, **{which: t}).values())

    def theirs(t):
        a = dict(args, **{which: t})
        weights = dict(zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), [a[n] for n in names[2:]]))
        y, h_n = torch.func.functional_call(gru, weights, (a["x"], a["h0"][None]))
        return y, h_n[0]

    _, got = torch.func.jvp(ours, (args[which],), (tangent,))
    assert rnnrec_fast.last_backend() == "reference"
    _, want = torch.func.jvp(theirs, (args[which],), (tangent,))
    assert_close(got[0], want[0], torch.float64, "y's tangent")
    assert_close(got[1], want[1], torch.float64, "h_n's tangent")


@pytest.mark.parametrize("backend", cpu_backends())
def test_last_backend_is_none_in_a_thread_before_its_first_call(backend):
    """last_backend() is per thread and None (not an empty string) in a thread that has made no call
    yet, whatever the other threads ran; then the backend of that thread's own call."""
    import threading

    a = dict(x=torch.randn(3, 2, 4), w_ih=torch.randn(15, 4), w_hh=torch.randn(15, 5))
    rnnrec_fast.recurrence(a["x"], None, a["w_ih"], a["w_hh"], backend="reference")  # (this thread's call)
    seen = []

    def worker():
        seen.append(rnnrec_fast.last_backend())
        rnnrec_fast.recurrence(a["x"], None, a["w_ih"], a["w_hh"], backend=backend)
        seen.append(rnnrec_fast.last_backend())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [None, backend]
    assert rnnrec_fast.last_backend() == "reference"

"""C++ CPU kernel paths that the rest of the suite leaves unexecuted (found with gcov), against torch.nn.

Each case sits just past the size threshold that selects its path (csrc/rnnrec_cpu.cpp,
csrc/rnnrec_avx512.cpp, csrc/rnnrec_avx2_gemm.cpp); the docstrings name the path. Outputs, h_n and
every gradient are compared with torch.nn.GRU / nn.RNN run in float64 on the same weights (Cho's GRU,
reset_after=False, which torch.nn lacks: with the float64 reference backend, differentiated by
autograd). float64 to 1e-10; float32 to 1e-5 of the tensor's largest value.
test_simd_paths_on_avx2 reruns the *_simd_* cases on the AVX2 kernels in a child process.
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnrec_fast
from rnnrec_fast import backends
from rnnrec_fast.backends import reference
from rnnrec_fast.ops import MODES
from rnnrec_fast._checks import env_flag

from conftest import RUN_SEED, case_seed, num_threads

pytestmark = pytest.mark.skipif(not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"),
                                reason="the C++ extension is not built")

ROOT = Path(__file__).resolve().parents[1]
MODE_FORMS = [("rnn_tanh", True), ("rnn_relu", True), ("gru", True), ("gru", False)]
MODE_IDS = ["tanh", "relu", "gru", "gru_cho"]


def simd_level():
    from rnnrec_fast import _C

    return _C.simd_level()


def check(actual, expected, dtype, what):
    """float64: 1e-10; float32: 1e-5 relative, with an absolute floor of 1e-5 x the tensor's largest value
    (a weight gradient sums T * B terms that cancel)."""
    expected = expected.detach().double()
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
    else:
        tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0))
    torch.testing.assert_close(actual.detach().double(), expected, **tol, msg=lambda m: f"{what}: {m}")


def weights(mode, I, H, dtype, gen, bias=True):
    """torch.nn's initial scale, U(-1/sqrt(H), 1/sqrt(H)), drawn from gen."""
    G = 3 if mode == "gru" else 1
    k = H ** -0.5

    def u(*shape):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * k).to(dtype)

    w = [u(G * H, I), u(G * H, H)]
    return w + ([u(G * H), u(G * H)] if bias else [None, None])


def expected_forward(mode, reset_after, x, h0, w, lengths):
    """(y, h_n) in float64 from torch.nn (reset_after) or from the reference backend (Cho's form), as
    functions of x, h0, w that autograd differentiates. Rows past their length: y zero, h_n the state
    after the row's last step."""
    T, B, I = x.shape
    H = h0.shape[1]
    if not reset_after:
        y, h_n, _ = reference.forward(x, h0, w[0], w[1], w[2], w[3], lengths, None, MODES[mode], False)
        return y, h_n
    if mode == "gru":
        m = nn.GRU(I, H, bias=w[2] is not None, dtype=torch.float64)
    else:
        m = nn.RNN(I, H, nonlinearity=mode.split("_")[1], bias=w[2] is not None, dtype=torch.float64)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    params = {n: t for n, t in zip(names, w) if t is not None}
    if lengths is None:
        y, h_n = torch.func.functional_call(m, params, (x, h0.unsqueeze(0)))
    else:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h_n = torch.func.functional_call(m, params, (packed, h0.unsqueeze(0)))
        y, _ = pad_packed_sequence(out, total_length=T)
    return y, h_n[0]


def run_case(mode, reset_after, T, B, I, H, dtype, seed, lengths=None, x=None, loss="random", frozen=(),
             threads=None, bias=True):
    """The op (backend cpp) against expected_forward: y, h_n and the gradients of x, h0 and the
    weights (those not in `frozen`: "x", "h0", "w_ih", "w_hh"). x: a given (T, B, I) tensor (a
    strided view); loss: "random" (random weights on y and h_n), "sum" (y.sum(): an expanded
    gradient, strides 0) or "transposed" (y's gradient a transposed view, its last dimension
    strided)."""
    gen = torch.Generator().manual_seed(case_seed(seed, mode, reset_after, T, B, I, H, str(dtype)))
    if x is None:
        x = torch.randn(T, B, I, generator=gen, dtype=torch.float64).to(dtype)
    h0 = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype) * 0.5
    w = weights(mode, I, H, dtype, gen, bias)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    ins = [x, h0] + w
    grads_of = [n for n, t in zip(names, ins) if t is not None and n not in frozen]
    ours = [t.detach().requires_grad_(n in grads_of) if t is not None else None for n, t in zip(names, ins)]
    theirs = [t.detach().double().requires_grad_(n in grads_of) if t is not None else None for n, t in zip(names, ins)]
    gy = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    gh = torch.randn(B, H, generator=gen, dtype=torch.float64)
    gy_t = torch.randn(T, H, B, generator=gen, dtype=torch.float64)

    def objective(y, h_n):
        if loss == "sum":
            return y.sum() + h_n.sum()
        if loss == "transposed":
            return (y.transpose(1, 2) * gy_t.to(y.dtype)).sum()
        return (y * gy.to(y.dtype)).sum() + (h_n * gh.to(y.dtype)).sum()

    with num_threads(threads) if threads else contextlib.nullcontext():
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(ours[0], ours[1], ours[2], ours[3], ours[4], ours[5], lengths,
                                                     None, mode, reset_after, "cpp")
        assert rnnrec_fast.last_backend() == "cpp"
        g = torch.autograd.grad(objective(y, h_n), [t for n, t in zip(names, ours) if n in grads_of])
    ry, rh = expected_forward(mode, reset_after, theirs[0], theirs[1], theirs[2:], lengths)
    rg = torch.autograd.grad(objective(ry, rh), [t for n, t in zip(names, theirs) if n in grads_of])
    check(y, ry, dtype, "output")
    check(h_n, rh, dtype, "h_n")
    for n, a, b in zip(grads_of, g, rg):
        check(a, b, dtype, f"grad {n}")


# ------------------------------------------------------------------------------------------------
# AVX-512 / AVX2 micro-kernel tails
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,reset_after,H", [("rnn_tanh", True, 40), ("gru", True, 45), ("gru", False, 45)],
                         ids=["tanh", "gru", "gru_cho"])
def test_simd_in_place_product_wide_masked_block_tail_rows(mode, reset_after, H):
    """The backward's carry product dh . W_hh with W_hh read in place (StepW direct, AVX-512): N = H
    columns = 32 + 8 or 32 + 13, so the last two slices go as one masked R x 48 block
    (micro_impl<R, 3, true>), and B = 9, 10, 11, 14, 15 leave R = 1, 2, 3, 6, 7 rows past the 8-row
    blocks (only R = 4, 5, 8 ran before); K = 3H = 135 >= 128 prefetches C. On AVX2, the 6-row
    kernel's 4 + 3 / 4 + 4 splits of the same rows."""
    for B in (9, 10, 11, 14, 15):
        run_case(mode, reset_after, 4, B, 24, H, torch.float32, "wide", threads=1)


@pytest.mark.parametrize("mode,reset_after,H", [("rnn_tanh", True, 15), ("rnn_relu", True, 47), ("rnn_tanh", True, 49),
                                                ("gru", True, 21), ("gru", False, 37), ("gru", True, 27)],
                         ids=["tanh15", "relu47", "tanh49", "gru21", "gru_cho37", "gru27"])
def test_simd_products_whose_last_slice_is_one_column_off_a_vector(mode, reset_after, H):
    """Products whose last 32-column slice holds 15 or 31 columns (N = G H = 15, 63: one column short
    of its vectors; stored whole, the tile writes a zero into the next row's first column), 47 (N =
    47, 111: 32 + 15 as one wide block) or 17 (N = 49, 81: one past a vector, which a one-vector
    block would leave unstored); I = H, so the weight gradients' N = I takes them too, and T * B =
    48 rows the packed input projection. (From a mutation review: the micro-kernel's whole-tile test
    at 16 V - 1 columns, or its one-vector block up to 17, passed every other test.)"""
    run_case(mode, reset_after, 4, 12, H, H, torch.float32, "slice_edge", threads=1)


@pytest.mark.parametrize("B", [9, 10, 13, 14])
@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu"])
def test_simd_sixteen_columns_tail_rows(mode, B):
    """A product of exactly 16 columns (RNN H = 16: the recurrent product packed, the carry product
    in place, the input projection of T * B >= 48 rows packed with K = I = 130 >= 128): one whole
    16-lane slice (store_tile<R, 1> without masks) for tail rows R = B % 8 = 1, 2, 5, 6 and
    (T * B) % 8, where only R = 3, 4, 7, 8 ran."""
    run_case(mode, True, 7, B, 130, 16, torch.float32, "n16", threads=1)


@pytest.mark.parametrize("K", [28, 40, 44, 56, 60, 68, 72, 76, 84, 92, 104, 136, 152, 168, 184])
def test_grouped_one_row_product_every_k(K):
    """The AVX-512 one-row product in groups of whole cache lines (gemv_grouped<K>, one unrolled
    instance per K: P = 4 rows a group where K % 16 is 4 or 12, 2 where it is 8) for the K the suite
    left out (test_op.py takes 20, 24, 36, 52, 88, 100, 120, 200): the same bits as the classes'
    form, float64's values, and an RNN of H = K at B = 1 (its W_hh read so) against torch.nn."""
    from rnnrec_fast import _C

    if simd_level() != "avx512":
        pytest.skip("the AVX-512 kernels do not run on this CPU")
    gen = torch.Generator().manual_seed(case_seed("grouped", K))
    for M in (8, 16, 23):
        W = torch.randn(M, K, generator=gen) / K ** 0.5
        x = torch.randn(1, K, generator=gen)
        outs = {}
        for loads in (2, 1):
            _C._set_gemv_loads(loads)
            try:
                outs[loads] = (_C._gemv_form(W), _C.linear_rows(x, W))
            finally:
                _C._set_gemv_loads(-1)
        assert outs[2][0] == "grouped" and outs[1][0] == "classes", (outs[2][0], outs[1][0])
        assert torch.equal(outs[2][1], outs[1][1]), f"K={K} M={M}"
        check(outs[2][1], x.double() @ W.double().t(), torch.float32, f"K={K} M={M}")
    run_case("rnn_tanh", True, 3, 1, 8, K, torch.float32, "grouped")


@pytest.mark.parametrize("T,B", [(27, 1), (29, 1), (15, 3), (9, 5)])
@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)],
                         ids=["tanh", "gru", "gru_cho"])
def test_simd_input_projection_partial_panel(T, B, mode, reset_after):
    """The input projection of 13-47 rows as the transposed packed product (gemm_nt), where
    T * B % 16 is 9-15 (27, 29, 45 rows): no rest to the few-rows kernel, the last 16-row panel of
    X^T part filled (M % 16 <= 8 only ran before: 17, 20, 33, 40), also in a 32 + 13 wide block."""
    run_case(mode, reset_after, T, B, 70, 64 if mode != "gru" else 32, torch.float32, "proj")


# ------------------------------------------------------------------------------------------------
# gemm_any: the in-place kernel with a transposed A; the backward's input gradient unpacked
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("I", [1000, 1024])
def test_weight_gradient_in_place_with_transposed_a(I):
    """grad_w_ih = dgx^T . x of a backward chunk (96 rows) where op(B) = x is too large to pack for
    M = H = 64 rows (K N > L2 / 4, M < 256) and not MKL's: gemm_any's in-place kernel (AVX-512) with
    a transposed A (copied into 8-row blocks), x read in place (I = 1000) or copied slice by slice
    (I = 1024: rows 4 KiB apart), the last 8 + 32 columns a masked wide block."""
    run_case("rnn_tanh", True, 8, 16, I, 64, torch.float32, "direct_ta", threads=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_input_gradient_of_a_large_w_ih_with_lengths(mode, reset_after, dtype):
    """grad_x = dgx . W_ih where W_ih is larger than avx2_packed_pays (G H I > 32768 floats), so the
    backward does not pack it once (wi_once false): in live_products (lengths, rows past their length
    in the chunk) and, float64, in the whole-chunk product too (neither ran)."""
    H = 64
    I = 200 if mode == "gru" else 520
    lengths = torch.tensor([5, 2, 4, 1, 5, 3])
    run_case(mode, reset_after, 5, 6, I, H, dtype, "wi_big", lengths=lengths)
    if dtype == torch.float64:
        run_case(mode, reset_after, 5, 6, I, H, dtype, "wi_big_plain")


# ------------------------------------------------------------------------------------------------
# float64 with two threads: the pointwise passes split over rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_float64_pointwise_passes_over_two_threads(mode, reset_after):
    """for_rows in parallel (B * work per row >= 65536) in the float64 forward and backward, every
    mode (only float32 ran there): B = 128, H = 128, two threads."""
    if torch.get_num_threads() < 2 and os.cpu_count() < 2:
        pytest.skip("one CPU")
    run_case(mode, reset_after, 3, 128, 16, 128, torch.float64, "f64_rows", threads=2)


# ------------------------------------------------------------------------------------------------
# Strided gradients and inputs read row by row
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["sum", "transposed"])
@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)],
                         ids=["tanh", "gru", "gru_cho"])
def test_threaded_backward_reads_strided_grad_y(mode, reset_after, loss):
    """The backward split over two threads by rows (bwd_threads > 1: B = 32, H = 100, W_hh read in
    place), each thread reading grad_y row by row (View3::row): an expanded gradient (y.sum(),
    strides 0) or a transposed one (last dimension B apart), neither of which ran there (only
    contiguous grad_y)."""
    run_case(mode, reset_after, 3, 32, 20, 100, torch.float32, "thr_gy", loss=loss, threads=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode,reset_after", [("rnn_tanh", True), ("gru", True), ("gru", False)],
                         ids=["tanh", "gru", "gru_cho"])
def test_lengths_with_x_strided_along_features(mode, reset_after, dtype):
    """x a view whose features are not contiguous ((T, I, B) transposed: strides (I B, 1, B)), with
    lengths: the backward's live_products gathers x's live rows element by element (View3::row's
    copy) and the whole chunks copy x's steps; and x expanded along its features (stride 0, the
    row filled from one value); grad_w_ih against torch.nn."""
    T, B, I, H = 4, 5, 7, 6
    gen = torch.Generator().manual_seed(case_seed("xstrided", mode, reset_after, str(dtype)))
    x = torch.randn(T, I, B, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    assert x.stride(2) == B
    lengths = torch.tensor([4, 2, 3, 1, 4])
    run_case(mode, reset_after, T, B, I, H, dtype, "xstrided", x=x, lengths=lengths)
    run_case(mode, reset_after, T, B, I, H, dtype, "xstrided_plain", x=x)
    # x broadcast along its features (stride 0): each live row filled from its one value
    x = torch.randn(T, B, 1, generator=gen, dtype=torch.float64).to(dtype).expand(T, B, I)
    run_case(mode, reset_after, T, B, I, H, dtype, "xbroadcast", x=x, lengths=lengths, frozen=("x",))


@pytest.mark.parametrize("mode,reset_after", MODE_FORMS, ids=MODE_IDS)
def test_batch_first_input_with_frozen_w_ih(mode, reset_after):
    """A batch_first x (rows not evenly spaced) whose W_ih needs no gradient: no gathered copy of x
    (x_rows) is made or read; the other gradients against torch.nn."""
    T, B, I, H = 5, 3, 6, 8
    gen = torch.Generator().manual_seed(case_seed("bf", mode, reset_after))
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64).transpose(0, 1)
    run_case(mode, reset_after, T, B, I, H, torch.float64, "bf", x=x, frozen=("w_ih",))


# ------------------------------------------------------------------------------------------------
# The modules' inference fast path: scratch past the per-thread buffers
# ------------------------------------------------------------------------------------------------
def pair(kind, dtype, I, H, gen, **kw):
    ref = getattr(nn, kind)(I, H, dtype=dtype, **kw)
    ours = getattr(rnnrec_fast, kind)(I, H, dtype=dtype, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * H ** -0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_float64_inference_workspace_past_the_kept_scratch(kind):
    """float64 inference of a T * B * 4H > 2^17 workspace (GRU) and of B * H > 2^17 zero initial
    states (hx None): infer_scratch hands out a buffer of its own (only float32 ran past it)."""
    gen = torch.Generator().manual_seed(case_seed("f64ws", kind))
    for T, B, I, H, with_hx in ((9, 64, 8, 64, True), (1, 520, 8, 256, False)):
        ref, ours = pair(kind, torch.float64, I, H, gen)
        x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
        hx = torch.randn(1, B, H, generator=gen, dtype=torch.float64) if with_hx else None
        with torch.no_grad():
            y, h = ours(x, hx)
            ry, rh = ref(x, hx)
        check(y, ry, torch.float64, f"{kind} output T{T} B{B}")
        check(h, rh, torch.float64, f"{kind} h_n T{T} B{B}")


@pytest.mark.parametrize("dtype,B", [(torch.float32, 1040), (torch.float64, 520)], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["GRUCell", "RNNCell"])
def test_cell_output_past_the_kept_scratch(kind, dtype, B):
    """A cell's inference whose h' (B * H = 266,240 float32 / 133,120 float64 values) is larger than
    the kept per-thread scratch (infer_scratch<T, 1>): a buffer of its own; against torch.nn."""
    gen = torch.Generator().manual_seed(case_seed("cell", kind, str(dtype)))
    H, I = 256, 8
    ref, ours = pair(kind, dtype, I, H, gen)
    x = torch.randn(B, I, generator=gen, dtype=torch.float64).to(dtype)
    h = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = ours(x, h)
        expect = ref.double()(x.double(), h.double())
    check(out, expect, dtype, kind)


@pytest.mark.parametrize("mode,H", [("GRU", 64), ("GRU", 66), ("RNN", 70)])
def test_simd_one_step_batch_with_a_two_row_last_block(mode, H):
    """A one-step inference of B = 66 rows (one_step_rows: blocks of 32 rows, the last of 2) with
    I = 130: the packed product of that 2-row block runs K >= 128 (on AVX2, micro_impl<2, V> with
    its C prefetch, which no test reached; G * H % 16 = 0 and 6: V = 2 and 1)."""
    gen = torch.Generator().manual_seed(case_seed("onestep", mode, H))
    ref, ours = pair(mode, torch.float32, 130, H, gen)
    x = torch.randn(1, 66, 130, generator=gen)
    hx = torch.randn(1, 66, H, generator=gen)
    with torch.no_grad():
        y, h = ours(x, hx)
    ref = ref.double()
    with torch.no_grad():
        ry, rh = ref(x.double(), hx.double())
    check(y, ry, torch.float32, "output")
    check(h, rh, torch.float32, "h_n")


# ------------------------------------------------------------------------------------------------
# Reads stay within the operands
# ------------------------------------------------------------------------------------------------
# (run in a child process: a read past an operand's end kills it with SIGSEGV)
GUARD_PAGE_CHILD = r"""
import ctypes, mmap, sys
import torch
from rnnrec_fast import _C

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def at_page_end(t):
    # a copy of t whose last float is the last one before an unreadable (PROT_NONE) page
    n = t.numel() * t.element_size()
    pages = -(-n // PAGE)
    mm = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert libc.mprotect(base + pages * PAGE, PAGE, 0) == 0, ctypes.get_errno()
    out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=pages * PAGE - n).view(t.shape)
    out.copy_(t)
    return out


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


gen = torch.Generator().manual_seed(int(sys.argv[1]))
# the catalogue's packed copy (pack_b of a transposed B: 16 x 16 blocks with masked K and N edges)
for N, H in ((37, 20), (45, 100), (64, 33)):
    W = torch.randn(N, H, generator=gen)
    packed, want = _C.pack_scores_weights(at_page_end(W)), _C.pack_scores_weights(W)
    if want is None:  # no packed-B kernels (the portable scalar path): nothing packed either way
        assert packed is None and _C.simd_level() == "scalar", (N, H, _C.simd_level())
    else:
        assert torch.equal(packed, want), (N, H)
# a few rows against a weight (the one-row product's plain, classes' and grouped forms; 2-8 rows)
for loads in (0, 1, 2):
    _C._set_gemv_loads(loads)
    for M in range(1, 9):
        for N, K in ((37, 20), (45, 100), (19, 33)):
            x, W = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
            close(_C.linear_rows(at_page_end(x), at_page_end(W)), _C.linear_rows(x, W), f"linear_rows {M} {N} {K}")
_C._set_gemv_loads(-1)
# the op, forward and backward, every operand at a page end: products packed, read in place (the
# carry product's masked and wide blocks: H = 40, 45, 47), the few-rows kernels, the row kernels' tails
for mode, T, B, I, H in (("rnn_tanh", 4, 9, 24, 40), ("gru", 4, 11, 24, 45), ("rnn_relu", 4, 15, 37, 47),
                         ("gru", 8, 16, 37, 64), ("gru", 3, 5, 13, 21), ("gru", 2, 1, 100, 100)):
    G = 3 if mode == "gru" else 1
    ins = [torch.randn(T, B, I, generator=gen), torch.randn(B, H, generator=gen) * 0.5,
           torch.randn(G * H, I, generator=gen) / I ** 0.5, torch.randn(G * H, H, generator=gen) / H ** 0.5,
           torch.randn(G * H, generator=gen) * 0.1, torch.randn(G * H, generator=gen) * 0.1]
    gy = torch.randn(T, B, H, generator=gen)
    outs = []
    for args in (ins, [at_page_end(t) for t in ins]):
        args = [t.detach().requires_grad_() for t in args]
        y, h_n, _ = torch.ops.rnnrec_fast.recurrence(*args, None, None, mode, True, "cpp")
        outs.append([y, h_n] + list(torch.autograd.grad((y * gy).sum() + h_n.sum(), args)))
    for what, a, b in zip(["y", "h_n", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], outs[1], outs[0]):
        close(a, b, f"{mode} T{T} B{B} I{I} H{H} {what}")
print("ok")
"""


def test_simd_kernels_read_nothing_past_their_operands():
    """Every operand (the op's x, h0, weights and biases; linear_rows' x and W; the catalogue that
    pack_scores_weights packs) placed so that its last float ends a page and the next page is
    unreadable: the kernels' loads past the last valid row or column (the K, N and tail edges) must
    be masked, or the process dies; the results equal those of ordinary copies. In a child process,
    on this process's kernels (test_simd_paths_on_avx2 runs it again on AVX2). (From a mutation
    review: an unmasked last vector of a B read in place, or of a 16 x 16 block of a transposed B,
    read up to 15 floats past the operand's end and passed every test, the extra lanes being
    discarded.)"""
    if not hasattr(os, "fork") or not Path("/proc/self/maps").exists():
        pytest.skip("needs mmap / mprotect (Linux)")
    env = dict(os.environ, RNNREC_FAST_TEST_SEED=str(RUN_SEED))
    out = subprocess.run([sys.executable, "-c", GUARD_PAGE_CHILD, str(case_seed("guard", simd_level()))], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), \
        f"exit {out.returncode} (-11: a read past an operand's end)\n{out.stdout[-2000:]}{out.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------
# The same cases on the AVX2 kernels
# ------------------------------------------------------------------------------------------------
def test_simd_paths_on_avx2():
    """This file's *_simd_* cases in a child process on the AVX2 kernels (RNNREC_FAST_NO_AVX512=1),
    whose 6-row micro-kernel and 8-lane few-rows kernels take other tails of the same sizes."""
    if simd_level() != "avx512":
        pytest.skip("runs the AVX2 kernels where AVX-512 is the default")
    env = dict(os.environ, RNNREC_FAST_NO_AVX512="1", RNNREC_FAST_TEST_SEED=str(RUN_SEED))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "simd and not on_avx2"], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-3000:]

"""CPU benchmarks: every case ours beside torch.nn, same weights, same inputs, same run.

pytest benchmarks/bench_cpu.py --benchmark-only [--threads N] [--reps R]; `make bench` prints the ratio
table (three interleaved repetitions of every case, the ratio their median).
"""
import io

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnrec_fast
from rnnrec_fast import backends

from cases import CASES, NUMBA_CASES

try:
    import onnxruntime
except ImportError:  # a benchmark-only extra, never a runtime dependency
    onnxruntime = None


def build_torch(case):
    torch.manual_seed(0)
    H = case.H
    if case.kind in ("GRU", "RNN"):
        return getattr(torch.nn, case.kind)(H, H, num_layers=case.layers, batch_first=True,
                                            bidirectional=case.bidirectional)
    return getattr(torch.nn, case.kind)(H, H)


def inputs(case):
    g = torch.Generator().manual_seed(1)
    if case.kind.endswith("Cell"):
        return torch.randn(case.B, case.H, generator=g), torch.randn(case.B, case.H, generator=g)
    states = case.layers * (2 if case.bidirectional else 1)
    return (torch.randn(case.B, case.T, case.H, generator=g),
            torch.randn(states, case.B, case.H, generator=g))


def onnx_session(module, x, h):
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (x, h), buf, dynamo=False, input_names=["x", "h"],
                      output_names=["y", "h_n"])
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    # ONNX Runtime's fast call: inputs bound once (no conversion of the feed at each call), outputs
    # allocated by it at each call, as ours and torch.nn allocate theirs (plain sess.run took ~24 us
    # against ~15 us so at the serving step: the baseline would have been slower than it is)
    binding = sess.io_binding()
    binding.bind_cpu_input("x", x.numpy())
    binding.bind_cpu_input("h", h.numpy())
    binding.bind_output("y")
    binding.bind_output("h_n")

    def call():
        sess.run_with_iobinding(binding)
    call.binding = binding
    return call


# Each timed call's results against torch.nn's, once, before timing: a case computing something
# else (other weights, inputs or a missing output) would otherwise be timed as if it were the same
# work, and CI's single --benchmark-disable pass would check nothing. float32: inference results
# to torch's default tolerance for it; training gradients (sums over B*T rows) looser.
TOL = {False: dict(rtol=1.3e-6, atol=1e-5), True: dict(rtol=1e-4, atol=1e-4)}


def check_against_torch(case, fn, want_fn):
    ctx = torch.enable_grad if case.train else torch.inference_mode
    with ctx():
        got, want = fn(), want_fn()
    if not isinstance(got, (tuple, list)):
        got, want = (got,), (want,)
    assert len(got) == len(want), (case.name, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(torch.as_tensor(g), w, **TOL[case.train],
                                   msg=lambda m: f"{case.name}: result {i} differs from torch.nn's: {m}")


def make_call(case, impl):
    ref = build_torch(case)
    x, h = inputs(case)
    if impl == "onnxruntime":
        if onnxruntime is None or case.kind != "GRU" or case.train or case.packed:
            pytest.skip("onnxruntime column: GRU inference only, needs onnxruntime installed")
        call = onnx_session(ref, x, h)

        def outputs():  # its y and h_n, as torch.nn's
            call()
            return tuple(call.binding.copy_outputs_to_cpu())

        check_against_torch(case, outputs, lambda: ref(x, h))
        return call, ref
    if impl == "torch":
        module = ref
    else:
        backend = {"ours": "auto", "numba": "numba"}[impl]
        if backend == "numba" and not backends.available("numba"):
            pytest.skip("numba backend unavailable")
        module = rnnrec_fast.from_torch(ref, backend=backend)
    # packed cases: the PackedSequence is made once for inference, in each training step (its
    # graph is the step's); both implementations take the same one
    lengths = case.lengths() if case.packed else None

    def pack(t):
        return pack_padded_sequence(t, lengths, batch_first=True, enforce_sorted=False)

    if not case.train:
        module.eval()
        ref.eval()
        feed = pack(x) if case.packed else x
        call = (lambda: module(feed, h))
        if module is not ref:
            if case.packed:  # (the output's data and h_n)
                def data_and_h(out):
                    return out[0].data, out[1]
                check_against_torch(case, lambda: data_and_h(call()), lambda: data_and_h(ref(feed, h)))
            else:
                check_against_torch(case, call, lambda: ref(x, h))
        return call, module
    x = x.clone().requires_grad_(case.x_grad)
    if not case.weights_grad:
        for p in list(module.parameters()) + list(ref.parameters()):
            p.requires_grad_(False)

    def training_step(m, check=False):
        wrt = [p for p in m.parameters() if p.requires_grad] + ([x] if case.x_grad else [])

        def step():
            out = m(pack(x) if case.packed else x, h)
            y, hn = out if isinstance(out, tuple) else (out, None)
            y = y.data if case.packed else y
            if not check:  # (the timed step)
                return torch.autograd.grad(y.sum(), wrt)
            # the check: y and h_n, and the gradients of y and h_n weighted by fixed random tensors
            # (a gradient of ones cannot tell a gradient turned round in time or batch, or
            # transposed, from the right one, and y.sum() leaves h_n out)
            gen = torch.Generator().manual_seed(7)
            loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
            if hn is not None:
                loss = loss + (hn * torch.randn(hn.shape, generator=gen, dtype=hn.dtype)).sum()
            grads = torch.autograd.grad(loss, wrt)
            return (y.detach(),) + (() if hn is None else (hn.detach(),)) + grads
        return step

    step = training_step(module)
    if module is not ref:
        check_against_torch(case, training_step(module, check=True), training_step(ref, check=True))
    return step, module


def run(benchmark, case, impl, rep):
    fn, module = make_call(case, impl)
    benchmark.group = case.name
    benchmark.extra_info.update(impl=impl, flops=case.flops, B=case.B, T=case.T, H=case.H,
                                train=case.train, threads=torch.get_num_threads(),
                                target=case.target, rep=rep)
    if case.train:
        fn()  # warm up (first-call set-up), as below: pytest-benchmark's own warm-up is off by default
        benchmark(fn)
        if impl not in ("torch", "onnxruntime"):
            benchmark.extra_info["backend"] = rnnrec_fast.last_backend()
    else:
        with torch.inference_mode():
            fn()  # warm up (first-call set-up, numba compilation)
            benchmark(fn)
            if impl not in ("torch", "onnxruntime"):
                benchmark.extra_info["backend"] = rnnrec_fast.last_backend()


# `rep` (--reps, benchmarks/conftest.py): each case's implementations are timed in turn, repeatedly
@pytest.mark.parametrize("impl", ["torch", "ours", "onnxruntime"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu(benchmark, case, impl, rep):
    run(benchmark, case, impl, rep)


@pytest.mark.parametrize("impl", ["torch", "ours", "numba"])
@pytest.mark.parametrize("case", NUMBA_CASES, ids=[c.name for c in NUMBA_CASES])
def test_numba_cpu(benchmark, case, impl, rep):
    run(benchmark, case, impl, rep)

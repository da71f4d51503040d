"""CUDA benchmarks: ours (rnnrec_fast, backend "cuda") beside torch.nn.GRU on cuda (cuDNN), same
weights, same inputs, same run. Wall time per call, torch.cuda.synchronize() included.

    pytest benchmarks/bench_cuda.py --benchmark-only [--benchmark-json out.json]
    python benchmarks/bench_cuda.py [--json out.json] [--repeat 200]    (no pytest-benchmark needed)

Skipped without a GPU or without the built CUDA extension. TF32 is left at PyTorch's defaults
(off for matmuls; cuDNN may use it for float32 RNNs: that is what torch.nn users get).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import pytest
import torch

if __name__ == "__main__":  # run as a script: import the package from this checkout
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rnnrec_fast  # noqa: E402
from rnnrec_fast import backends  # noqa: E402
from rnnrec_fast._checks import env_flag  # noqa: E402


@dataclass(frozen=True)
class CudaCase:
    name: str
    B: int
    T: int
    H: int
    graph: bool = False  # time a CUDA-graph replay instead of an eager call
    train: bool = False  # forward + backward
    per_step: bool = False  # also report time / T


CUDA_CASES = [
    CudaCase("GRU B1 T1 H100 eager", 1, 1, 100),
    CudaCase("GRU B1 T1 H100 graph", 1, 1, 100, graph=True),
    CudaCase("GRU B1 T20 H512 eager", 1, 20, 512),
    CudaCase("GRU B8 T100 H1024 graph", 8, 100, 1024, graph=True, per_step=True),
    CudaCase("GRU B512 T20 H256 eager", 512, 20, 256),
    CudaCase("GRU train B32 T20 H100 eager", 32, 20, 100, train=True),
]
IMPLS = ["ours", "torch"]


def _skip_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not backends.available("cuda"):
        return f"cuda backend unavailable: {backends.unavailable_reason('cuda')}"
    return None


def check_against_torch(case, module, ref, x, h):
    """Ours against torch.nn (cuDNN, TF32 off for the check) once, before timing, as bench_cpu does:
    outputs and h_n, and for training every gradient, of y and h_n weighted by fixed random tensors
    (a gradient of ones cannot tell a gradient turned round in time or batch from the right one)."""
    tol = dict(rtol=1e-4, atol=1e-4) if case.train else dict(rtol=1e-5, atol=2e-5)
    results = []
    gen = torch.Generator(device=x.device).manual_seed(7)
    gy = torch.randn(case.B, case.T, case.H, device=x.device, generator=gen)
    gh = torch.randn(1, case.B, case.H, device=x.device, generator=gen)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for m in (module, ref):
            xi = x.detach().clone().requires_grad_(case.train)
            with torch.set_grad_enabled(case.train):
                out, hn = m(xi, h)
                res = [out, hn]
                if case.train:
                    res += list(torch.autograd.grad((out * gy).sum() + (hn * gh).sum(), [xi] + list(m.parameters())))
            results.append(res)
    compare(case, results[0], results[1], tol)


def compare(case, got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda msg: f"{case.name}: result {i} differs from torch.nn's: {msg}")


def make_call(case: CudaCase, impl: str):
    """A zero-argument callable doing one timed unit of work (ending in torch.cuda.synchronize())."""
    dev = "cuda"
    torch.manual_seed(0)
    ref = torch.nn.GRU(case.H, case.H, batch_first=True, device=dev)
    # inference: both in eval mode, as bench_cpu's (torch.nn passes its training flag to cuDNN, whose
    # training forward keeps a reserve buffer for the backward, no_grad or not)
    ref.train(case.train)
    if impl == "torch":
        module = ref
    else:
        module = rnnrec_fast.GRU(case.H, case.H, batch_first=True, device=dev, backend="cuda")
        module.load_state_dict(ref.state_dict())
        module.train(case.train)
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(case.B, case.T, case.H, device=dev, generator=g)
    h = torch.randn(1, case.B, case.H, device=dev, generator=g)
    if module is not ref:
        check_against_torch(case, module, ref, x, h)

    if case.train:
        x.requires_grad_()
        params = [x] + list(module.parameters())

        def call():
            out, hn = module(x, h)
            torch.autograd.grad(out.sum() + hn.sum(), params)
            torch.cuda.synchronize()

        return call

    if not case.graph:
        def call():
            with torch.no_grad():
                module(x, h)
            torch.cuda.synchronize()

        return call

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                module(x, h)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module(x, h)
    torch.cuda.synchronize()
    # what is timed is the replay: its outputs checked against torch.nn's too (a capture missing a
    # kernel would replay fast and wrong)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        compare(case, [t.clone() for t in captured], list(ref(x, h)), dict(rtol=1e-5, atol=2e-5))

    def call():
        graph.replay()
        torch.cuda.synchronize()

    call._keep = (graph, module, x, h, captured)  # keep the graph's memory alive
    return call


def forward_path_name():
    try:
        from rnnrec_fast import _C_cuda

        return {0: "none", 1: "persistent", 2: "gemm"}[_C_cuda.last_forward_path()]
    except ImportError:
        return "n/a"


# ----------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name.replace(" ", "_"))
def test_cuda(benchmark, case, impl):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    call = make_call(case, impl)
    for _ in range(5):
        call()
    benchmark.group = case.name
    benchmark.extra_info["impl"] = impl
    if impl == "ours":
        benchmark.extra_info["forward_path"] = forward_path_name()
    benchmark.pedantic(call, rounds=50 if case.B * case.T * case.H > 10**6 else 200, iterations=1,
                       warmup_rounds=3)
    if case.per_step and benchmark.stats is not None:
        benchmark.extra_info["per_step_us"] = benchmark.stats.stats.median / case.T * 1e6


# ----------------------------------------------------------------------------------------------
# stand-alone runner


def _time(call, repeat):
    for _ in range(5):
        call()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), min(samples)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)
    reason = _skip_reason()
    if reason:
        # a GPU session (benchmarks/gpu_run.sh) whose CUDA build failed must not pass as "skipped"
        print(f"skipped: {reason}")
        return 1 if env_flag("RNNREC_FAST_REQUIRE_CUDA") else 0
    rows = []
    failed = 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'case':34s} {'ours us':>10s} {'torch us':>10s} {'torch/ours':>10s}  path")

    def save():  # after every case: one case's error does not lose the others' rows on a scarce GPU
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f,
                          indent=2)

    for case in CUDA_CASES:
        res = {}
        path = "n/a"
        try:
            for impl in IMPLS:
                call = make_call(case, impl)
                rep = max(10, args.repeat // 4) if case.B * case.T * case.H > 10**6 else args.repeat
                med, best = _time(call, rep)
                if impl == "ours":
                    path = forward_path_name()
                res[impl] = dict(median_s=med, min_s=best)
                del call
        except Exception as exc:  # noqa: BLE001 - a failed parity check, a capture error: recorded, run goes on
            failed += 1
            rows.append(dict(case=case.name, B=case.B, T=case.T, H=case.H, error=f"{type(exc).__name__}: {exc}"))
            print(f"{case.name:34s} FAILED: {type(exc).__name__}: {exc}")
            save()
            continue
        ratio = res["torch"]["median_s"] / res["ours"]["median_s"]
        row = dict(case=case.name, B=case.B, T=case.T, H=case.H, graph=case.graph, train=case.train,
                   ours=res["ours"], torch=res["torch"], ratio_torch_over_ours=ratio, forward_path=path)
        if case.per_step:
            row["ours_per_step_us"] = res["ours"]["median_s"] / case.T * 1e6
            row["torch_per_step_us"] = res["torch"]["median_s"] / case.T * 1e6
        rows.append(row)
        extra = (f"  per step: ours {row['ours_per_step_us']:.2f} us, torch {row['torch_per_step_us']:.2f} us"
                 if case.per_step else "")
        print(f"{case.name:34s} {res['ours']['median_s'] * 1e6:10.1f} {res['torch']['median_s'] * 1e6:10.1f} "
              f"{ratio:10.2f}  {path}{extra}")
        save()
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

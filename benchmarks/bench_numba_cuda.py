"""GPU: the Numba CUDA backend beside cuDNN (torch.nn.GRU on cuda), same weights, same run.

Wall time per call from Python including torch.cuda.synchronize(). Skipped without a GPU.
Issue 4's target: faster than cuDNN eager at B=1, T=20, H=100.
"""
import pytest
import torch

import rnnrec_fast
from rnnrec_fast import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [(B, T, H) for B in (1, 64) for T in (1, 20) for H in (100, 512)]


@pytest.mark.parametrize("impl", ["cudnn", "numba"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}".format(*c))
def test_numba_cuda_vs_cudnn(benchmark, case, impl):
    if impl == "numba" and not backends.available("numba"):
        pytest.skip("numba backend unavailable")
    if impl == "numba" and backends.device_unavailable("numba", "cuda") is not None:
        pytest.skip(f"numba backend cannot run on cuda here: {backends.device_unavailable('numba', 'cuda')}")
    B, T, H = case
    torch.manual_seed(0)
    ref = torch.nn.GRU(H, H, batch_first=True, device="cuda").eval()
    module = ref if impl == "cudnn" else rnnrec_fast.from_torch(ref, backend="numba").eval()
    x = torch.randn(B, T, H, device="cuda")

    if impl == "numba":  # what is timed computes torch.nn's result (cuDNN without TF32), checked once
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out, hn = module(x)
            assert rnnrec_fast.last_backend() == "numba"
            out_ref, hn_ref = ref(x)
        for a, b in ((out, out_ref), (hn, hn_ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)

    def call():
        out = module(x)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"numba-cuda GRU B{B} T{T} H{H}"
    benchmark.extra_info.update(impl=impl, B=B, T=T, H=H)
    with torch.inference_mode():
        call()
        benchmark(call)

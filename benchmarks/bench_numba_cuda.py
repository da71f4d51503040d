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
    B, T, H = case
    torch.manual_seed(0)
    ref = torch.nn.GRU(H, H, batch_first=True, device="cuda").eval()
    module = ref if impl == "cudnn" else rnnrec_fast.from_torch(ref, backend="numba").eval()
    x = torch.randn(B, T, H, device="cuda")

    def call():
        out = module(x)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"numba-cuda GRU B{B} T{T} H{H}"
    benchmark.extra_info.update(impl=impl, B=B, T=T, H=H)
    with torch.inference_mode():
        call()
        benchmark(call)

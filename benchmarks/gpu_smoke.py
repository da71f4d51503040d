"""The GPU session's first check (benchmarks/gpu_run.sh smoke / sanitize): one forward and one
backward of the CUDA extension per mode, on both forward paths (1: persistent, 2: GEMM), against
the reference backend in float64, with lengths and resets. Prints a line per case and SMOKE OK or
SMOKE FAILED. --quick: the small sizes only (for compute-sanitizer, which runs every kernel ~100x
slower). benchmarks/test_gpu_smoke.py runs it on the CPU against a stand-in extension."""
import math
import sys

import torch

from rnnrec_fast import _C_cuda
from rnnrec_fast.backends import reference

TOL = 1e-8  # float64, T = 6: the paths' summation orders differ from the reference's by ~1e-15


def _err(a, b) -> float:
    """The largest absolute difference (inf for a shape or dtype mismatch; 0 for two empty tensors:
    the Elman RNN's workspace has no columns)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0


def main(quick: bool, dev: str = "cuda") -> int:
    torch.manual_seed(0)
    d = torch.float64
    sizes = [(1, 1), (3, 7), (8, 33)] if quick else [(1, 1), (3, 7), (8, 100), (8, 1024), (40, 33)]
    T, I = (4, 5) if quick else (6, 5)
    ok = True
    for mode, ra in [(0, True), (1, True), (2, True), (2, False)]:
        for path in (1, 2):
            for B, H in sizes:
                G = 3 if mode == 2 else 1
                x = torch.randn(T, B, I, device=dev, dtype=d)
                h0 = torch.randn(B, H, device=dev, dtype=d)
                wi = torch.randn(G * H, I, device=dev, dtype=d) * 0.5
                wh = torch.randn(G * H, H, device=dev, dtype=d) / H ** 0.5
                bi = torch.randn(G * H, device=dev, dtype=d)
                bh = torch.randn(G * H, device=dev, dtype=d)
                L = torch.randint(0, T + 1, (B,), device=dev)
                L[0] = T
                R = torch.rand(T, B, device=dev) < 0.3
                _C_cuda.set_forward_path(path)
                y, hn, ws = _C_cuda.forward(x, h0, wi, wh, bi, bh, L, R, mode, ra)
                took = _C_cuda.last_forward_path()
                ry, rh, rws = reference.forward(x, h0, wi, wh, bi, bh, L, R, mode, ra)
                gy, gh = torch.randn_like(y), torch.randn_like(hn)
                g = _C_cuda.backward(gy, gh, x, h0, wi, wh, bi, bh, L, R, y, ws, mode, ra)
                rg = reference.backward(gy, gh, x, h0, wi, wh, bi, bh, L, R, ry, rws, mode, ra)
                errs = [_err(a, b) for a, b in zip((y, hn, ws) + tuple(g), (ry, rh, rws) + tuple(rg))]
                bad = not all(e <= TOL for e in errs)  # (a NaN fails: max() over a list would skip it)
                ok &= not bad
                worst = max(errs, key=lambda e: math.inf if math.isnan(e) else e)
                print(f"mode={mode} reset_after={ra} want_path={path} took={took} B={B} H={H} "
                      f"max_err={worst:.2e} {'FAIL ' + str(errs) if bad else 'ok'}", flush=True)
    _C_cuda.set_forward_path(0)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("SMOKE", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv[1:]))

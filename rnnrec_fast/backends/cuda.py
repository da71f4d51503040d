"""CUDA backend: fused Elman RNN / GRU kernels from the compiled extension ``rnnrec_fast._C_cuda``.

Implements the contract of :mod:`rnnrec_fast.backends.reference` (same outputs, workspace and
gradients) for CUDA tensors in float32, float64, float16 and bfloat16 (half types are computed with
float32 state and accumulation and a float32 workspace).

Forward paths (``_C_cuda.set_forward_path``: 0 auto, 1 persistent when possible, 2 GEMM; or the
environment variable ``RNNREC_FAST_CUDA_PATH=auto|persistent|gemm``, any case, read at import):

* persistent: batch <= 8 and the recurrent weights fit in shared memory -> one cooperative kernel
  for the whole sequence, each block keeping its slice of ``W_hh`` on chip;
* GEMM: one cuBLAS GEMM per step plus one fused pointwise kernel.

The backward always runs the GEMM path. ``_C_cuda.last_forward_path()`` reports the path the latest
forward took (1 persistent, 2 GEMM).

Importing this module raises ImportError when the extension has not been built (no CUDA toolkit,
or a CPU-only torch).
"""
from __future__ import annotations

import os

import torch

from . import cuda_forward_path

try:
    from rnnrec_fast import _C_cuda
except ImportError as exc:  # not built / not loadable: propagate, saying why
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = ("the extension rnnrec_fast._C_cuda is not built or cannot be loaded (build it with nvcc on "
               "PATH, or RNNREC_FAST_CUDA=1: pip install --no-build-isolation .)")
    raise ImportError(f"{why}: {exc}") from exc

if os.environ.get("RNNREC_FAST_CUDA_PATH"):  # (the one place it is read)
    _C_cuda.set_forward_path(cuda_forward_path(os.environ["RNNREC_FAST_CUDA_PATH"]))

DEVICES = ("cuda",)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

forward = _C_cuda.forward
backward = _C_cuda.backward

__all__ = ["forward", "backward", "DEVICES", "DTYPES"]

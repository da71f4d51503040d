"""C++ CPU backend: fused Elman RNN / GRU kernels from the compiled extension ``rnnrec_fast._C``.

Implements the contract of :mod:`rnnrec_fast.backends.reference` (same outputs, workspace and
gradients). Importing this module raises ImportError when the extension has not been built.
"""
from __future__ import annotations

import torch

from rnnrec_fast import _C  # ImportError when the extension is not built: let it propagate

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)

forward = _C.forward
backward = _C.backward

__all__ = ["forward", "backward", "DEVICES", "DTYPES"]

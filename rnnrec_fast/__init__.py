"""rnnrec_fast: fused Elman RNN / GRU kernels for recommender systems, as a PyTorch custom op.

>>> import rnnrec_fast
>>> gru = rnnrec_fast.GRU(100, 100, batch_first=True)   # drop-in for torch.nn.GRU
>>> gru.active_backend()                                 # which kernels run: 'cpp', 'cuda', 'numba', 'reference'
"""
from . import ops
from .modules import GRU, RNN, GRUCell, RNNCell, from_torch, to_torch
from .ops import backend_info, empty_cache, last_backend, library_path, recurrence, resolve_backend, scratch_bytes

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "RNN",
    "GRUCell",
    "RNNCell",
    "from_torch",
    "to_torch",
    "recurrence",
    "ops",
    "backend_info",
    "empty_cache",
    "scratch_bytes",
    "last_backend",
    "library_path",
    "resolve_backend",
]

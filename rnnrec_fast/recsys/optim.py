"""Adagrad with momentum, as GRU4Rec trains (indexed updates for sparse gradients).

Per parameter: ``acc += g^2``; ``step = -lr * g / sqrt(acc + eps)``; with momentum
``mom = momentum * mom + step; p += mom``, else ``p += step``.
For a sparse (row-indexed) gradient only the rows it touches are updated, accumulators and momentum
included, so rows absent from a mini-batch keep their momentum untouched.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.optim import Optimizer

try:  # one fused pass over the touched rows (no coalesce/sort); torch fallback otherwise
    from .._numba import njit as _njit
except ImportError:  # pragma: no cover
    _njit = None

_sparse_kernel = None


def _get_sparse_kernel():
    global _sparse_kernel
    if _sparse_kernel is None and _njit is not None:
        # error_model="numpy": no Python division-by-zero checks inside the loops, so LLVM
        # vectorises the per-element update (sqrt and division are IEEE either way, same bits)
        @_njit(cache=True, nogil=True, error_model="numpy")
        def kernel(idx, val, p, acc, mom, scratch, seen, lr, momentum, eps):
            # scratch (N, D) is all zero and seen (N,) all False on entry and on exit
            n, D = val.shape
            rows = np.empty(n, dtype=np.int64)
            u = 0
            for k in range(n):
                r = idx[k]
                if not seen[r]:
                    seen[r] = True
                    rows[u] = r
                    u += 1
                for d in range(D):
                    scratch[r, d] += val[k, d]
            use_mom = momentum > 0.0
            for j in range(u):
                r = rows[j]
                seen[r] = False
                for d in range(D):
                    g = scratch[r, d]
                    scratch[r, d] = 0.0
                    a = acc[r, d] + g * g
                    acc[r, d] = a
                    step = -lr * g / np.sqrt(a + eps)
                    if use_mom:
                        m = momentum * mom[r, d] + step
                        mom[r, d] = m
                        p[r, d] += m
                    else:
                        p[r, d] += step
        _sparse_kernel = kernel
    return _sparse_kernel


class AdagradM(Optimizer):
    def __init__(self, params, lr: float = 0.05, momentum: float = 0.0, eps: float = 1e-6):
        if lr <= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if eps <= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps))

    def _state(self, p, momentum):
        st = self.state[p]
        if "acc" not in st:
            st["acc"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if momentum > 0 and "mom" not in st:  # (also a state loaded from a run without momentum)
            st["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _fast_sparse(self, p, g, st, lr, momentum, eps) -> bool:
        """Numba update for CPU float32/64 contiguous 2-D parameters; False when not applicable."""
        if (p.device.type != "cpu" or p.dim() != 2 or not p.is_contiguous()
                or p.dtype not in (torch.float32, torch.float64)):
            return False
        kernel = _get_sparse_kernel()
        if kernel is None:
            return False
        if "scratch" not in st:
            st["scratch"] = torch.zeros_like(p)
            st["seen"] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        idx = g._indices()[0].contiguous().numpy()
        val = g._values().contiguous().numpy()
        mom = st["mom"].numpy() if momentum > 0 else st["acc"].numpy()
        kernel(idx, val, p.detach().numpy(), st["acc"].numpy(), mom, st["scratch"].numpy(),
               st["seen"].numpy(), float(lr), float(momentum), float(eps))
        # written through NumPy, which torch does not see: its version counter tells autograd and
        # whoever holds a copy of the weights (the serving fast path) that they changed
        torch.autograd.graph.increment_version(p)
        return True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eps = group["lr"], group["momentum"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self._state(p, momentum)
                if g.is_sparse and self._fast_sparse(p, g, st, lr, momentum, eps):
                    continue
                if g.is_sparse:
                    g = g.coalesce()  # the update is non-linear: indices must be unique
                    idx, val = g.indices()[0], g.values()
                    acc = st["acc"].index_select(0, idx).addcmul_(val, val)
                    st["acc"].index_copy_(0, idx, acc)
                    upd = val / acc.add_(eps).sqrt_().div_(-lr)
                    if momentum > 0:
                        mom = st["mom"].index_select(0, idx).mul_(momentum).add_(upd)
                        st["mom"].index_copy_(0, idx, mom)
                        upd = mom
                    p.index_add_(0, idx, upd)
                else:
                    acc = st["acc"].addcmul_(g, g)
                    denom = (acc + eps).sqrt_()
                    if momentum > 0:
                        mom = st["mom"].mul_(momentum).addcdiv_(g, denom, value=-lr)
                        p.add_(mom)
                    else:
                        p.addcdiv_(g, denom, value=-lr)
        return loss

"""A drop-in module against its torch.nn twin: built with its weights, on one call (outputs, h_n and
the gradients of the input, h0 and every weight) and on a gradient penalty's second derivatives.
Shared by tests/test_cuda.py (on a GPU) and tests/test_cuda_emulated.py (the same modules on the CUDA
emulator). Plain module, as discarded_state.py."""
import torch
from torch import nn

import rnnrec_fast


def _close(actual, expected, what, **kw):
    torch.testing.assert_close(actual, expected, **kw, msg=lambda m: f"{what}: {m}")


def module_pair(kind, backend, **kw):
    """torch.nn's module of kind ("GRU", "RNN_tanh" or "RNN_relu") and ours on backend, built with
    the keywords kw, ours holding torch.nn's weights."""
    if kind == "GRU":
        ref, ours = nn.GRU(**kw), rnnrec_fast.GRU(backend=backend, **kw)
    else:
        nl = kind.split("_")[1]
        ref, ours = nn.RNN(nonlinearity=nl, **kw), rnnrec_fast.RNN(nonlinearity=nl, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_outputs_and_gradients_close(ref_outs, our_outs, ref_leaves, our_leaves, tol, grad_tol):
    """(output, h_n) of torch.nn and of ours within tol (rtol / atol); the gradients of a random
    linear loss of both, with respect to each side's leaves in order, within grad_tol."""
    for what, a, b in zip(("output", "h_n"), our_outs, ref_outs):
        _close(a, b, what, **tol)
    weights = [torch.randn_like(t) for t in ref_outs]
    g_r = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref_outs, weights)), ref_leaves)
    g_o = torch.autograd.grad(sum((t * w).sum() for t, w in zip(our_outs, weights)), our_leaves)
    for i, (a, b) in enumerate(zip(g_o, g_r)):
        _close(a, b, f"grad {i}", **grad_tol)


def assert_call_matches_torch_nn(ref, ours, x, hx, tol, after=None):
    """ref (torch.nn) and ours called on (x, hx), both leaves that require grad: the output and h_n
    within tol (rtol / atol), the gradients of a random linear loss of both, with respect to x, hx
    and every parameter in order, within 10 tol. after: called once ours has run (the caller's
    checks of what ran)."""
    ref_outs = ref(x, hx)
    our_outs = ours(x, hx)
    if after is not None:
        after()
    assert_outputs_and_gradients_close(ref_outs, our_outs, [x, hx] + list(ref.parameters()),
                                       [x, hx] + list(ours.parameters()), tol,
                                       dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10))


def assert_gradient_penalty_matches_torch_nn(ref, ours, device, after=None):
    """A gradient penalty through ref (torch.nn) and through ours, float64 modules of 3 inputs, 4
    units, 2 layers both ways, batch_first, on device: the gradients taken with create_graph=True
    and the second derivatives of x, hx and every weight, within rtol 1e-9, atol 1e-10. after:
    called once ours has run forward."""
    results = []
    for m in (ref, ours):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 5, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
        hx = torch.randn(4, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
        leaves = [x, hx] + list(m.parameters())
        with torch.backends.cudnn.flags(enabled=False):  # (cuDNN's RNN backward is not differentiable)
            out, h = m(x, hx)
            if m is ours and after is not None:
                after()
            grads = torch.autograd.grad(out.sin().sum() + (h * h).sum(), leaves, create_graph=True)
            results.append((grads, torch.autograd.grad(sum(gi.square().sum() for gi in grads), leaves)))
    for a, b in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

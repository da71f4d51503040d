"""A drop-in module against its torch.nn twin on one call: outputs, h_n and the gradients of the
input, h0 and every weight. Shared by tests/test_cuda.py (on a GPU) and tests/test_cuda_emulated.py
(the same modules on the CUDA emulator). Plain module, as discarded_state.py."""
import torch


def _close(actual, expected, what, **kw):
    torch.testing.assert_close(actual, expected, **kw, msg=lambda m: f"{what}: {m}")


def assert_call_matches_torch_nn(ref, ours, x, hx, tol, after=None):
    """ref (torch.nn) and ours called on (x, hx), both leaves that require grad: the output and h_n
    within tol (rtol / atol), the gradients of a random linear loss of both, with respect to x, hx
    and every parameter in order, within 10 tol. after: called once ours has run (the caller's
    checks of what ran)."""
    out_r, h_r = ref(x, hx)
    out_o, h_o = ours(x, hx)
    if after is not None:
        after()
    _close(out_o, out_r, "output", **tol)
    _close(h_o, h_r, "h_n", **tol)
    gy, gh = torch.randn_like(out_r), torch.randn_like(h_r)
    g_r = torch.autograd.grad((out_r * gy).sum() + (h_r * gh).sum(), [x, hx] + list(ref.parameters()))
    g_o = torch.autograd.grad((out_o * gy).sum() + (h_o * gh).sum(), [x, hx] + list(ours.parameters()))
    for i, (a, b) in enumerate(zip(g_o, g_r)):
        _close(a, b, f"grad {i}", rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)

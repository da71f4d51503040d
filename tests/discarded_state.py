"""A relu case whose discarded state holds inf or NaN, shared by the CUDA backends' tests
(tests/test_cuda.py on a GPU, tests/cudasim_check.py in Numba's simulator; test_op.py has the CPU
backends' own). Plain module: importable from a pytest run and from a script."""
import torch


def discarded_state_case(kind, x, h0, w_ih, device="cpu"):
    """(x, h0, w_ih, lengths, resets) for T = B = 2: "lengths" / "resets", row 0's state overflows to
    inf at step 0 (x and w_ih made large and positive), then the row is past its length (1) or
    resets at step 1; "negative", row 1 has length -3 (the CUDA kernels clamp it to 0) and a NaN h0."""
    lengths = resets = None
    if kind == "negative":
        lengths = torch.tensor([2, -3], device=device)
        h0 = h0.clone()
        h0[1] = float("nan")
        return x, h0, w_ih, lengths, resets
    w_ih = (w_ih.abs() + 0.5) * 1e10
    x = x.abs()
    x[0, 0] = 1e30 if x.dtype == torch.float32 else 1e300
    if kind == "lengths":
        lengths = torch.tensor([1, 2], device=device)
    else:
        resets = torch.tensor([[False, False], [True, False]], device=device)
    return x, h0, w_ih, lengths, resets

"""Direct calls of the CUDA extension's forward and backward with bad arguments, each of which must
raise the extension's own error, shared by tests/test_cuda.py (rnnrec_fast._C_cuda on a GPU) and
tests/test_cuda_emulated.py (the same code on the CPU emulator of tests/cuda_emu). Plain module, as
discarded_state.py."""
import pytest
import torch


def _raises(fn, args):
    with pytest.raises(RuntimeError, match="rnnrec_fast._C_cuda"):
        fn(*args)


def assert_bad_direct_calls_raise(ext, inputs, elsewhere=None):
    """inputs: (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets) of a float32 GRU with biases,
    lengths and resets, T > 1 and I, H > 1. elsewhere: a function moving a tensor to another
    device, for the device checks (test_cuda.py: to the CPU); None where every tensor is on the
    emulator's one device."""
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets = inputs
    T, B, _ = x.shape
    H = h0.shape[1]
    ok = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, 2, True)
    ext.forward(*ok)
    bad = [
        (x, h0.double()) + ok[2:],
        (x, h0[:1]) + ok[2:],
        (x, h0, w_ih[:, :-1]) + ok[3:],
        (x, h0, w_ih, w_hh[:, :-1]) + ok[4:],
        (x, h0, w_ih, w_hh, b_ih[:H - 1]) + ok[5:],
        (x, h0, w_ih, w_hh, b_ih, b_hh, lengths.int()) + ok[7:],
        (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets.float()) + ok[8:],
        (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets[:-1]) + ok[8:],
        ok[:8] + (3, True),
        ok[:8] + (0, True),  # rnn mode with gru-shaped weights
        (x.int(),) + ok[1:],
        (x[:0],) + ok[1:],
    ]
    if elsewhere is not None:
        bad += [(elsewhere(x),) + ok[1:], (x, h0, w_ih, w_hh, b_ih, b_hh, elsewhere(lengths)) + ok[7:]]
    for args in bad:
        _raises(ext.forward, args)
    y, h_n, ws = ext.forward(*ok)
    gy, gh = torch.randn_like(y), torch.randn_like(h_n)
    bok = (gy, gh, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, y, ws, 2, True)
    ext.backward(*bok)
    assert ws.shape == (T, B, 4 * H)
    old_gru_ws = torch.zeros(T, B, 5 * H, device=x.device)  # the former [h_prev, r, z, n, hn] layout
    bad = [(gy[:1],) + bok[1:], (gy, gh.double()) + bok[2:], bok[:11] + (ws.double(), 2, True),
           bok[:11] + (ws[:, :, :H], 2, True), bok[:11] + (old_gru_ws, 2, True),
           bok[:10] + (y[:, :1],) + bok[11:]]
    if elsewhere is not None:
        bad.append(bok[:11] + (elsewhere(ws), 2, True))
    for args in bad:
        _raises(ext.backward, args)
    # rnn modes: the workspace is empty (T, B, 0); the former (T, B, H) one is refused
    rok = (x, h0, w_ih[:H], w_hh[:H], b_ih[:H], b_hh[:H], lengths, resets, 0, True)
    ry, rh, rws = ext.forward(*rok)
    assert rws.shape == (T, B, 0)
    rbok = (torch.randn_like(ry), torch.randn_like(rh)) + rok[:8] + (ry, rws, 0, True)
    ext.backward(*rbok)
    for bad_ws in (torch.zeros(T, B, H, device=x.device), rws.double()):
        _raises(ext.backward, rbok[:11] + (bad_ws, 0, True))

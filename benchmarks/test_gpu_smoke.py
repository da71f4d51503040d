"""benchmarks/gpu_smoke.py, the GPU session's first check, run here on the CPU against a stand-in
for the CUDA extension (the reference backend, with the extension's call signature), so that the
script itself is known to pass a right answer and to fail a wrong one before a GPU session relies
on it (runs with the rest of the benchmark folder)."""
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rnnrec_fast.backends import reference  # noqa: E402


def _stand_in(error=0.0, nan=False):
    m = types.ModuleType("rnnrec_fast._C_cuda")
    m.path = 0

    def set_forward_path(p):
        m.path = p

    def forward(*args):
        y, hn, ws = reference.forward(*args)
        if nan:
            hn = hn.clone()
            hn.view(-1)[0] = float("nan")
        return y + error, hn, ws

    m.set_forward_path = set_forward_path
    m.last_forward_path = lambda: m.path
    m.forward = forward
    m.backward = reference.backward
    return m


@pytest.mark.parametrize("error, nan, ok", [(0.0, False, True), (1e-6, False, False), (0.0, True, False)],
                         ids=["right", "off-by-1e-6", "nan"])
def test_the_smoke_check_passes_the_reference_and_fails_an_error(monkeypatch, capsys, error, nan, ok):
    import rnnrec_fast  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "rnnrec_fast._C_cuda", _stand_in(error, nan))
    monkeypatch.setattr(rnnrec_fast, "_C_cuda", sys.modules["rnnrec_fast._C_cuda"], raising=False)
    monkeypatch.delitem(sys.modules, "gpu_smoke", raising=False)
    import gpu_smoke  # noqa: PLC0415

    assert gpu_smoke.main(quick=True, dev="cpu") == (0 if ok else 1)
    out = capsys.readouterr().out
    assert out.rstrip().endswith("SMOKE OK" if ok else "SMOKE FAILED")
    assert out.count("\n") == 4 * 2 * 3 + 1  # every mode, both paths, the three quick sizes
    assert torch.get_default_dtype() == torch.float32

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


def test_the_smoke_check_passes_the_cuda_code_on_the_emulator(monkeypatch, capsys):
    """And against the CUDA extension's own code, compiled for the CPU emulator of tests/cuda_emu
    (tests/test_cuda_emulated.py), where each forced path is the one taken (every quick size has
    B <= 8)."""
    import importlib.util  # noqa: PLC0415

    import rnnrec_fast  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("cuda_emu_build", os.path.join(root, "tests", "cuda_emu", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    emu = build.load()
    emu.emu_configure()
    emu.emu_reset_stats()
    monkeypatch.setitem(sys.modules, "rnnrec_fast._C_cuda", emu)
    monkeypatch.setattr(rnnrec_fast, "_C_cuda", emu, raising=False)
    monkeypatch.delitem(sys.modules, "gpu_smoke", raising=False)
    import gpu_smoke  # noqa: PLC0415

    assert gpu_smoke.main(quick=True, dev="cpu") == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1] == "SMOKE OK" and len(lines) == 4 * 2 * 3 + 1
    for line in lines[:-1]:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        assert fields["want_path"] == fields["took"], line
    assert emu.emu_stats()["cooperative_launches"] == 4 * 3

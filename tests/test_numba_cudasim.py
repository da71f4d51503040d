"""The numba.cuda kernels of the numba backend, run through Numba's CUDA simulator (no GPU needed).

The simulator must be enabled before numba is imported, so the check (tests/cudasim_check.py) runs
in its own process; this test fails when that process fails.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_numba_cuda_kernels_match_reference_in_simulator():
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cudasim_check.py")], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail("CUDA-simulator check failed (exit code %d):\n%s\n%s"
                    % (proc.returncode, proc.stdout[-4000:], proc.stderr[-8000:]))
    assert "OK" in proc.stdout

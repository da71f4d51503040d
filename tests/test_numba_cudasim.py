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


def test_the_numba_backend_runs_on_cuda_under_the_simulator():
    """Under the CUDA simulator the numba backend's CUDA probe finds nothing missing (no driver,
    NVVM or libdevice is needed there), so "auto" and a forced "numba" may take it for CUDA tensors;
    without the simulator a machine without a driver says so. (From a mutation review: the probe's
    simulator branch could return a reason, and nothing noticed.)"""
    root = os.path.dirname(HERE)
    code = ("from rnnrec_fast import backends\n"
            "from rnnrec_fast.backends import numba_backend\n"
            "print(numba_backend._cuda().SIMULATOR, repr(backends.device_unavailable('numba', 'cuda')))\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "None"], proc.stdout

"""The numba.cuda kernels compiled for a real GPU (PTX for sm_90) without one.

The CUDA simulator (test_numba_cudasim.py) runs the kernels' Python source, so it checks indexing
and synchronisation but not Numba's typing of the kernels for the device. Here NVVM compiles them
as a GPU launch would: the kernels must type and compile, and the float32 ones must hold no float64
arithmetic (a bare ``1.0`` literal in the gate math promotes it to float64, which runs far slower on
a GPU). Needs NVVM and libdevice (a CUDA toolkit), not a GPU or a driver; skipped without them.
"""
import re

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from numba import cuda, types  # noqa: E402

if numba.config.ENABLE_CUDASIM:
    pytest.skip("compiles for a real GPU: not under the CUDA simulator", allow_module_level=True)

from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError  # noqa: E402

from rnnrec_fast.backends import numba_cuda  # noqa: E402


def _signatures(nbdt):
    """Argument types of launch_forward / launch_backward with C-contiguous tensors."""
    A = lambda ndim: types.Array(nbdt, ndim, "C")  # noqa: E731
    lengths = types.Array(types.int64, 1, "C")
    resets = types.Array(types.boolean, 2, "C")
    flag, mode = types.boolean, types.int64
    fwd = (A(3), A(2), A(2), A(1), flag, lengths, flag, resets, flag, mode, mode, A(3), A(2), A(3))
    bwd = (A(3), A(2), A(2), A(2), lengths, flag, resets, flag, A(3), A(3), mode, mode, A(3), A(3),
           A(3), A(2))
    return fwd, bwd


class _Sm90:
    compute_capability = (9, 0)


@pytest.fixture
def no_driver_needed(monkeypatch):
    """Device functions called from a kernel are compiled for the current device's compute
    capability; without a GPU, say sm_90 (the H100/H200 this project builds for)."""
    import numba.cuda.dispatcher as dispatcher

    try:
        cuda.get_current_device()
    except CudaSupportError:
        if not hasattr(dispatcher, "get_current_device"):
            pytest.skip("this numba version compiles device functions only with a CUDA driver")
        monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Sm90())


def _ptx(kernel, sig):
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    except (NvvmSupportError, CudaSupportError) as e:  # no NVVM / libdevice on this machine
        pytest.skip(f"needs NVVM and libdevice (a CUDA toolkit): {str(e).splitlines()[0]}")
    return ptx


F64_OP = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*\.f64)\b", re.M)


@pytest.mark.parametrize("rows_per_block", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_compile_to_ptx(no_driver_needed, dtype, rows_per_block):
    nbdt = types.float32 if dtype == np.float32 else types.float64
    fwd, bwd = numba_cuda._kernels(dtype, rows_per_block)
    fsig, bsig = _signatures(nbdt)
    for name, kernel, sig in (("forward", fwd, fsig), ("backward", bwd, bsig)):
        ptx = _ptx(kernel, sig)
        assert ".entry" in ptx and "bar.sync" in ptx, name
        f64_ops = F64_OP.findall(ptx)
        if dtype == np.float32:
            assert not f64_ops, f"float32 {name} kernel does float64 arithmetic: {sorted(set(f64_ops))}"
        else:
            assert any(op.startswith("fma") for op in f64_ops), name

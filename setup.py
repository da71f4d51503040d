"""Build rnnrec_fast's compiled extension.

CPU part: always built (a compile failure fails the build). The kernels are compiled with -O3 for a
portable x86-64 baseline; set RNNREC_FAST_NATIVE=1 to tune for the build machine (-march=native).
CUDA part: built when torch has CUDA and nvcc is found, or forced with RNNREC_FAST_CUDA=1
(RNNREC_FAST_CUDA=0 disables it).
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("RNNREC_FAST_CUDA")
    if flag is not None:
        return flag == "1"
    import torch

    return torch.version.cuda is not None and (
        cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    )


def _extensions():
    cxx = ["-O3", "-std=c++17", "-fno-math-errno"]
    if os.environ.get("RNNREC_FAST_NATIVE") == "1":
        cxx.append("-march=native")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    exts = [
        cpp_extension.CppExtension(
            "rnnrec_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx},
        )
    ]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if cuda_sources and _want_cuda():
        archs = os.environ.get("RNNREC_FAST_CUDA_ARCHS", "80;90")
        gencode = []
        for a in archs.split(";"):
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        exts.append(
            cpp_extension.CUDAExtension(
                "rnnrec_fast._C_cuda",
                cuda_sources,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"] + gencode},
            )
        )
    return exts


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

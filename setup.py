"""Build rnnrec_fast's compiled extension.

CPU part: always built (a compile failure fails the build). The kernels are compiled with -O3 for a
portable x86-64 baseline; set RNNREC_FAST_NATIVE=1 to tune for the build machine (-march=native).
CUDA part: built when torch has CUDA and nvcc is found, or forced with RNNREC_FAST_CUDA=1
(RNNREC_FAST_CUDA=0 disables it).
librnnrec_fast_ops.so (the op without Python, for libtorch programs): always built, but with
RNNREC_FAST_STANDALONE=0.
RNNREC_FAST_EXT=0: no compiled part at all (a machine without a C++ compiler): the package runs on
its numba or reference backend, with one warning saying so.
"""
import glob
import os
import re
import shutil
import sys

try:
    import torch
except ImportError:  # (pip's isolated build environment has no torch: pyproject.toml does not ask for one)
    sys.exit("rnnrec_fast: building it needs the torch it will run with, installed first: the compiled "
             "extension links that torch's C++ ABI, and the package then requires it exactly. Install torch, "
             "then build without pip's build isolation: pip install --no-build-isolation . (or RNNREC_FAST_EXT=0 "
             "pip install --no-build-isolation . for the pure-Python package). An isolated build would fetch the "
             "newest torch from the index, build against it and pin it, replacing yours with it.")

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name, default):
    """A build switch: 1 / true / yes / on or 0 / false / no / off (any case); unset or empty: the
    default. Another value stops the build (a typo in RNNREC_FAST_CUDA=ture turned CUDA off, silently)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    sys.exit(f"rnnrec_fast: {name}={os.environ[name]!r} is none of 1, true, yes, on, 0, false, no, off")


def _want_cuda():
    flag = _flag("RNNREC_FAST_CUDA", None)
    if flag is not None:
        return flag
    import torch

    return torch.version.cuda is not None and (
        cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    )


def _torch_cxx_std():
    """The C++ standard torch's headers need: C++20 from torch 2.14 on, C++17 before."""
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _cuda_extension(cuda_sources, cxx):
    """rnnrec_fast._C_cuda from csrc/*.cu (kernels in csrc/*.cuh).

    RNNREC_FAST_CUDA_ARCHS: ';'-separated SM versions (default "80;90").
    RNNREC_FAST_CUDA_VERBOSE=1: print ptxas register / spill reports.
    When CUDA_HOME lacks the cuBLAS / cuSPARSE headers or libcudart.so (a toolkit with only nvcc
    and the runtime, the libraries coming from the nvidia-* wheels), they are looked up in the
    nvidia-* wheels and the usual toolkit directories.
    """
    gencode = _gencode(_cuda_archs(os.environ.get("RNNREC_FAST_CUDA_ARCHS") or "80;90"))
    std = _torch_cxx_std()
    nvcc = ["-O3", f"-std={std}", "-diag-suppress=3189"] + gencode
    if _flag("RNNREC_FAST_CUDA_VERBOSE", False):
        nvcc.append("-Xptxas=-v")
    cuda_cxx = [f if not f.startswith("-std=") else f"-std={std}" for f in cxx]
    include_dirs, library_dirs = [], []
    home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    if not os.path.exists(os.path.join(home, "include", "cusparse.h")):
        try:
            import nvidia

            for root in list(nvidia.__path__):
                for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
                    if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(
                        os.path.join(inc, "cublas_v2.h")
                    ):
                        include_dirs.append(inc)
        except ImportError:
            pass
    lib_candidates = [os.path.join(home, d) for d in ("lib64", "lib")] + [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/lib",
    ]
    if not any(os.path.exists(os.path.join(d, "libcudart.so")) for d in lib_candidates[:2]):
        for d in lib_candidates[2:]:
            if os.path.exists(os.path.join(d, "libcudart.so")):
                library_dirs.append(d)
                break
    return cpp_extension.CUDAExtension(
        "rnnrec_fast._C_cuda",
        cuda_sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={"cxx": cuda_cxx, "nvcc": nvcc},
    )


def _cuda_archs(value):
    """RNNREC_FAST_CUDA_ARCHS as SM versions ("80;90", or torch's "8.0;9.0" style; "90a" too), sorted
    by version. Another value stops the build ('' or "80,90" made nvcc flags it refused with the
    compiler hint of a failed build)."""
    out = []
    for part in value.replace(" ", ";").split(";"):
        part = part[:-4] if part.endswith("+PTX") else part  # (torch's style: the newest ships PTX anyway)
        if not part:
            continue
        found = re.fullmatch(r"(\d{1,2})\.?(\d)([af]?)", part)  # major, minor, suffix
        if found is None:
            sys.exit(f"rnnrec_fast: RNNREC_FAST_CUDA_ARCHS={value!r}: {part!r} is not an SM version; give them "
                     "separated by ';', as 80;90 (or 8.0;9.0)")
        out.append("".join(found.groups()))
    if not out:
        sys.exit(f"rnnrec_fast: RNNREC_FAST_CUDA_ARCHS={value!r} names no SM version (as 80;90)")
    return sorted(set(out), key=lambda a: (int(a.rstrip("af")), a))


def _gencode(archs):
    """nvcc's -gencode flags: machine code for each SM version, and the newest one's PTX, which the
    driver compiles for a newer GPU than the list names (sm_ codes alone: "no kernel image is
    available" there)."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # (the PTX of the newest version without an a / f suffix: suffixed PTX runs on its own
    # generation only, not on a newer GPU)
    ptx = [a for a in archs if a.isdigit()] or [archs[-1].rstrip("af")]
    return flags + ["-gencode", f"arch=compute_{ptx[-1]},code=compute_{ptx[-1]}"]


def _torch_uses_openmp():
    """Whether torch's ATen parallel backend is OpenMP (the usual Linux build), with GCC/Clang."""
    if sys.platform not in ("linux", "linux2"):
        return False
    try:
        return bool(torch.backends.openmp.is_available()) and "OpenMP" in torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001 - unknown torch build: stay serial rather than fail the build
        return False


def _extensions():
    if not _flag("RNNREC_FAST_EXT", True):  # (pure Python: the numba / reference backends)
        return []
    # -g0: no debug information (Python's own CFLAGS carry -g: 38 of the installed 41 MB were DWARF)
    cxx = ["-O3", f"-std={_torch_cxx_std()}", "-fno-math-errno", "-g0"]
    if _flag("RNNREC_FAST_NATIVE", False):
        cxx.append("-march=native")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    link = []
    if _torch_uses_openmp():
        # at::parallel_for is inline code: without -fopenmp its `omp parallel` is ignored and every
        # "parallel" loop of the kernels runs on one thread. The extension then shares torch's own
        # OpenMP runtime (same libgomp.so.1, already loaded by torch).
        link = ["-fopenmp"]
    san = []
    if _flag("RNNREC_FAST_SANITIZE", False):
        # `make sanitize`: AddressSanitizer + UndefinedBehaviorSanitizer, any report fatal. -fno-wrapv
        # undoes Python's -fwrapv, under which signed overflow is defined and never reported. Such a
        # build loads only with the sanitizer runtimes preloaded (LD_PRELOAD).
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f not in ("-O3", "-g0")] + ["-O1", "-fno-wrapv"] + san
    exts = [
        cpp_extension.CppExtension(
            "rnnrec_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx + link},
            extra_link_args=link + san,
        )
    ]
    if _flag("RNNREC_FAST_STANDALONE", True):  # (=0: the GPU check's build, its minutes are few)
        # The same kernels and op registration without Python (csrc/standalone/: the sources
        # above built with RNNREC_STANDALONE, schemas defined in C++), for libtorch programs that
        # run an AOTInductor package or a TorchScript model holding the op. Never loaded by the
        # Python package.
        lib = cpp_extension.CppExtension(
            _STANDALONE,
            sorted(glob.glob(os.path.join("csrc", "standalone", "*.cpp"))),
            extra_compile_args={"cxx": cxx + link},
            # (RNNREC_FAST_SANITIZE: cxx instruments it, but the link takes no -fsanitize. With it,
            # GCC drops its default --as-needed (Debian's specs) and the library would then need
            # libtorch.so, an empty shim, by name and with no path to it: dlopen fails in a libtorch
            # program linked --as-needed, which never loaded it. The preloaded runtimes resolve the
            # sanitizers' symbols.)
            extra_link_args=link,
        )
        # CppExtension links libtorch_python by default: nothing in the library uses it, and a
        # libtorch program has no Python to load it with
        lib.libraries = [name for name in lib.libraries if name != "torch_python"]
        exts.append(lib)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if cuda_sources and _want_cuda():
        exts.append(_cuda_extension(cuda_sources, cxx))
    return exts


_STANDALONE = "rnnrec_fast.librnnrec_fast_ops"


class _BuildExt(cpp_extension.BuildExtension):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # (a failed build still fails: the hint is for a machine without a compiler)
            raise RuntimeError(
                f"rnnrec_fast: building the compiled extension failed ({type(exc).__name__}: {exc}). On a "
                "machine without a working C++ compiler, RNNREC_FAST_EXT=0 installs the package without it: it "
                "then runs on its numba or reference backend (slower), with one warning saying so.") from exc

    def get_ext_filename(self, ext_name):
        # the library without Python is no Python module: a plain library name, no ABI tag
        # (distutils asks with the last part of the name, setuptools' in-place copy with all of it)
        if ext_name in (_STANDALONE, _STANDALONE.rsplit(".", 1)[1]):
            return os.path.join(*ext_name.split(".")) + ".so"
        return super().get_ext_filename(ext_name)


def _install_requires():
    """The wheel's runtime requirements: the torch it is built against, exactly (its extension links
    that torch's C++ ABI: under another torch it fails to load and the package falls back to numba;
    a range let pip pair the wheel with the newest torch, a multi-GB CUDA build), numpy and numba.
    ``torch==2.13.0`` also matches the local builds 2.13.0+cpu and 2.13.0+cu130."""
    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "numba"]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
    install_requires=_install_requires(),
)

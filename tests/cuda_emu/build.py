"""Build csrc/rnnrec_cuda.cu for the CPU against the CUDA emulator of include/cuda_emu.h.

The CUDA sources are compiled as they are, with four mechanical rewrites that C++ cannot express
through headers (each must match, or the build stops saying which did not):

* ``kernel<<<grid, block, smem, stream>>>(args)`` -> ``rnnrec_emu::launch(kernel, grid, block,
  smem, stream)(args)``;
* ``cudaLaunchCooperativeKernel((const void*)kernel, ...)`` -> ``rnnrec_emu::launch_cooperative(
  kernel, ...)`` (the emulator needs the kernel's type to unpack its arguments);
* ``extern __shared__ ... name[];`` -> a pointer to the block's emulated shared memory;
* ``.is_cuda()`` -> ``.is_cpu()`` (the emulated device's tensors are CPU tensors);

and the module gains ``emu_configure``, ``emu_stats`` and ``emu_reset_stats``, and the emulator's
self-test kernels (selftest.cu, rewritten the same way) as ``selftest_*``.

    python tests/cuda_emu/build.py      # build (or find built) and print the module's path
"""
from __future__ import annotations

import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE = os.path.join(HERE, "include")
NAME = "rnnrec_cuda_emu"

LAUNCH = re.compile(r"(\b\w+(?:<[^<>;()]*>)?)<<<([^<>;]*?)>>>\(")
COOPERATIVE = re.compile(r"cudaLaunchCooperativeKernel\(\(const void\s*\*\)\s*(\w+),")
SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(unsigned char|char) (\w+)\[\];")
IS_CUDA = re.compile(r"(\.|->)is_cuda\(\)")
MODULE = re.compile(r"(PYBIND11_MODULE\(TORCH_EXTENSION_NAME, m\) \{)")


def _sub(pattern, repl, text, what, where):
    out, n = pattern.subn(repl, text)
    if n == 0:
        raise RuntimeError(f"cuda_emu: no {what} found in {where}: the rewrite no longer matches the source")
    return out, n


def rewrite_kernels(text, where="rnnrec_cuda_kernels.cuh"):
    return _sub(SHARED, r"\1* \2 = reinterpret_cast<\1*>(::rnnrec_emu::dynamic_shared());", text,
                "extern __shared__ array", where)[0]


def rewrite_launches(text, where):
    launches = text.count("<<<")
    text, n = _sub(LAUNCH, r"::rnnrec_emu::launch(\1, \2)(", text, "kernel launch", where)
    if n != launches or "<<<" in text:
        raise RuntimeError(f"cuda_emu: rewrote {n} of {launches} kernel launches in {where}")
    return _sub(COOPERATIVE, r"::rnnrec_emu::launch_cooperative(\1,", text, "cooperative launch", where)[0]


def rewrite_host(text, selftest):
    text = rewrite_launches(text, "rnnrec_cuda.cu")
    text = _sub(IS_CUDA, r"\1is_cpu()", text, ".is_cuda() check", "rnnrec_cuda.cu")[0]
    selftest = rewrite_kernels(rewrite_launches(selftest, "selftest.cu"))
    # the emulator's self-test kernels, then the module with its settings and the self-tests
    text = _sub(MODULE, lambda m: selftest + "\n" + m.group(1) + "\n  ::rnnrec_emu::bind(m);\n"
                "  ::rnnrec_emu_selftest::bind(m);", text, "PYBIND11_MODULE", "rnnrec_cuda.cu")[0]
    # _setjmp/_longjmp switch between fiber stacks, which glibc's fortified longjmp refuses
    return "#undef _FORTIFY_SOURCE\n" + text


def _write_if_changed(path, text):
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def sources(build_dir):
    """Write the rewritten sources into build_dir; returns the translation unit's path."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(CSRC, "rnnrec_cuda_kernels.cuh")) as f:
        kernels = rewrite_kernels(f.read())
    with open(os.path.join(HERE, "selftest.cu")) as f:
        selftest = f.read()
    with open(os.path.join(CSRC, "rnnrec_cuda.cu")) as f:
        host = rewrite_host(f.read(), selftest)
    _write_if_changed(os.path.join(build_dir, "rnnrec_cuda_kernels.cuh"), kernels)
    tu = os.path.join(build_dir, NAME + ".cpp")
    _write_if_changed(tu, host)
    return tu


def load(build_dir=None, verbose=False):
    """Build (ninja skips an unchanged build) and import the emulated CUDA extension."""
    from torch.utils.cpp_extension import load as load_extension  # noqa: PLC0415

    from rnnrec_fast._checks import env_flag  # noqa: PLC0415

    # RNNREC_FAST_SANITIZE=1 (make sanitize): AddressSanitizer and UndefinedBehaviorSanitizer, as
    # setup.py builds the extension then (the module loads only with their runtimes preloaded)
    san = env_flag("RNNREC_FAST_SANITIZE")
    build_dir = build_dir or os.path.join(ROOT, "build", "cuda_emu_sanitize" if san else "cuda_emu")
    tu = sources(build_dir)
    # a build killed midway leaves torch's lock file, and the next load would wait on it for ever
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 600:
        os.remove(lock)
    flags = ["-O1", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas", "-Wno-pedantic"]
    link = []
    if san:  # (-fno-wrapv: Python's -fwrapv would define signed overflow, which UBSan then never reports)
        link = ["-fsanitize=address,undefined"]
        flags += link + ["-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-fno-wrapv", "-g"]
    else:
        flags.append("-g0")
    return load_extension(
        name=NAME, sources=[tu], build_directory=build_dir, extra_include_paths=[INCLUDE], extra_cflags=flags,
        extra_ldflags=link, verbose=verbose)


if __name__ == "__main__":
    mod = load(verbose="-v" in sys.argv)
    print(mod.__file__)

"""The source distribution holds everything the extension's build reads."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_has_every_kernel_source(tmp_path):
    # from a copy of the source tree alone: setuptools also lists what an earlier build's
    # *.egg-info/SOURCES.txt names, which would hide a file the manifest leaves out
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the source files")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\n")
    src = tmp_path / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=src, check=True,
                   capture_output=True, timeout=300)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if "/" in n}
        (pkg_info,) = [m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
        requires = [line.split(":", 1)[1].strip() for line in tar.extractfile(pkg_info).read().decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    needed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert needed and needed <= names, sorted(needed - names)
    assert {"setup.py", "pyproject.toml", "rnnrec_fast/ops.py"} <= names
    # what `make test` runs from an unpacked sdist (a review found the test files without their
    # conftest.py and helpers, and no benchmark folder or examples): all of the git tree's
    # tests/, benchmarks/ (but its recorded results) and examples/
    for folder in ("tests", "benchmarks", "examples"):
        tracked = {n for n in filter(None, files) if n.startswith(folder + "/") and (ROOT / n).is_file()
                   and not n.startswith("benchmarks/results/")}
        assert tracked and tracked <= names, sorted(tracked - names)
    assert {".ci/run", "rnnrec_fast/recsys/README.md", "Makefile"} <= names
    assert not any(n.startswith("benchmarks/results/") or n.endswith((".so", ".pyc")) for n in names)
    # its metadata requires the torch it was built from, exactly (see test_wheel_requires_...)
    assert f"torch=={torch.__version__.split('+')[0]}" in requires, requires


def test_wheel_requires_the_torch_it_is_built_against():
    """A built extension links one torch's C++ ABI: the package's requirements pin that torch (a
    range let pip install a wheel built against 2.13.0 beside torch 2.14.1+cu130, 5.7 GB, under which
    the extension failed to load: undefined symbol), while pyproject.toml leaves them to setup.py."""
    import tomllib  # noqa: PLC0415

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "dependencies" not in project and "dependencies" in project["dynamic"]
    src = (ROOT / "setup.py").read_text()
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_under_test"}
    exec(compile(src[: src.rindex("setup(")], "setup.py", "exec"), ns)
    assert ns["_install_requires"]() == [f"torch=={torch.__version__.split('+')[0]}", "numpy", "numba"]


@pytest.mark.parametrize("flag, expected", [(None, {"rnnrec_fast._C", "rnnrec_fast.librnnrec_fast_ops"}),
                                            ("0", {"rnnrec_fast._C"})])
def test_setup_builds_the_library_without_python_unless_told_not_to(monkeypatch, flag, expected):
    """setup.py's extensions (CUDA off): the Python module and librnnrec_fast_ops, which links no
    libtorch_python; RNNREC_FAST_STANDALONE=0 (the GPU check's build) leaves the library out."""
    monkeypatch.setenv("RNNREC_FAST_CUDA", "0")
    if flag is None:
        monkeypatch.delenv("RNNREC_FAST_STANDALONE", raising=False)
    else:
        monkeypatch.setenv("RNNREC_FAST_STANDALONE", flag)
    src = (ROOT / "setup.py").read_text()
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_under_test"}
    exec(compile(src[: src.rindex("setup(")], "setup.py", "exec"), ns)
    exts = {e.name: e for e in ns["_extensions"]()}
    assert set(exts) == expected
    if "rnnrec_fast.librnnrec_fast_ops" in exts:
        assert "torch_python" not in exts["rnnrec_fast.librnnrec_fast_ops"].libraries
        assert "torch_python" in exts["rnnrec_fast._C"].libraries


def _setup_namespace():
    """setup.py's definitions, without its setup() call."""
    src = (ROOT / "setup.py").read_text()
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_under_test"}
    exec(compile(src[: src.rindex("setup(")], "setup.py", "exec"), ns)
    return ns


def test_build_switches_take_the_run_time_switches_words_and_refuse_others(monkeypatch):
    """The build's switches read 1 / true / yes / on and 0 / false / no / off in any case, unset or
    empty as their default, and stop the build on another value (from a review: only "1" / "0"
    were read, so RNNREC_FAST_CUDA=true turned CUDA off and RNNREC_FAST_EXT=false built it, silently)."""
    flag = _setup_namespace()["_flag"]
    for value, want in [("1", True), ("TRUE", True), (" yes ", True), ("On", True), ("0", False), ("false", False),
                        ("No", False), ("off", False), ("", "default")]:
        monkeypatch.setenv("RNNREC_FAST_X", value)
        assert flag("RNNREC_FAST_X", "default") == want, value
    monkeypatch.delenv("RNNREC_FAST_X")
    assert flag("RNNREC_FAST_X", None) is None
    monkeypatch.setenv("RNNREC_FAST_X", "ture")
    with pytest.raises(SystemExit, match="RNNREC_FAST_X='ture' is none of 1, true, yes, on, 0, false, no, off"):
        flag("RNNREC_FAST_X", True)
    monkeypatch.setenv("RNNREC_FAST_CUDA", "no")
    monkeypatch.setenv("RNNREC_FAST_EXT", "false")
    assert _setup_namespace()["_extensions"]() == []


def test_cuda_archs_are_checked_and_the_newest_ships_ptx():
    """RNNREC_FAST_CUDA_ARCHS: SM versions separated by ';' (torch's 8.0 style too), sorted; a value
    that names none or holds another word stops the build (from a review: '' and '80,90' became nvcc
    flags it refused, under the failed build's compiler hint). The newest also ships as PTX, which
    the driver compiles for a newer GPU (an sm_ code alone: 'no kernel image is available')."""
    ns = _setup_namespace()
    archs = ns["_cuda_archs"]
    assert archs("80;90") == ["80", "90"] and archs("9.0;8.0;") == ["80", "90"] and archs("90a;80") == ["80", "90a"]
    assert archs("75 86") == ["75", "86"] and archs("100;90") == ["90", "100"]
    for bad in ("80,90", "sm_90", "compute_90", ";", "x"):
        with pytest.raises(SystemExit, match="RNNREC_FAST_CUDA_ARCHS"):
            archs(bad)
    flags = ns["_gencode"](archs("80;90"))
    assert flags[1::2] == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                           "arch=compute_90,code=compute_90"] and set(flags[::2]) == {"-gencode"}
    # a suffixed version's PTX runs on its own generation only: the newest plain one's ships (a review)
    assert archs("8.6+PTX;9.0") == ["86", "90"]
    assert ns["_gencode"](archs("80;90a"))[-1] == "arch=compute_80,code=compute_80"
    assert ns["_gencode"](archs("90a"))[-1] == "arch=compute_90,code=compute_90"


def test_an_isolated_build_without_torch_says_how_to_build():
    """pyproject.toml asks for no torch in the build: pip's isolated build (the default) then sees
    none and stops, saying to install torch and build with --no-build-isolation (from a review: with
    torch>=2.4 there, the isolated build fetched the newest torch, built against it and pinned it,
    and pip replaced the user's torch with that multi-GB build). Here: setup.py run where torch is
    not importable (python -S: no site-packages)."""
    import tomllib  # noqa: PLC0415

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.startswith("torch")], requires
    out = subprocess.run([sys.executable, "-S", "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "pip install --no-build-isolation ." in out.stderr, out.stderr[-2000:]


def test_a_machine_without_a_compiler_installs_the_package_without_its_extension(tmp_path):
    """Without a C++ compiler the build fails, saying how to install without it (a review found only
    torch's compiler-check traceback); RNNREC_FAST_EXT=0 installs the pure-Python package, which
    imports and runs on a fallback backend with its one warning."""
    import os

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "*.egg-info",
                                                              "__pycache__", "benchmarks", "tests", "examples"))
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", RNNREC_FAST_CUDA="0")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(tmp_path / "site"), str(src)]
    failed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0
    assert "RNNREC_FAST_EXT=0 installs the package without it" in failed.stdout + failed.stderr, \
        (failed.stdout + failed.stderr)[-3000:]
    env["RNNREC_FAST_EXT"] = "0"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert not list((tmp_path / "site").rglob("*.so")), list((tmp_path / "site").rglob("*.so"))
    code = ("import warnings, torch, rnnrec_fast; warnings.simplefilter('always'); "
            "y, h = rnnrec_fast.GRU(3, 4)(torch.randn(2, 1, 3)); print(rnnrec_fast.last_backend())")
    # (-S: no .pth files, so not the editable install's finder, which would find this checkout's
    # compiled modules for the installed package; torch and numba from this environment's site-packages)
    import sysconfig
    path = os.pathsep.join([str(tmp_path / "site"), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() in ("numba", "reference") and "'cpp' backend is not available" in run.stderr


def test_import_leaves_sympy_alone():
    """`import rnnrec_fast` (and a module's eager call) does not import torch's symbolic shapes,
    which import sympy: ~0.28 s, nine tenths of the package's import time beyond torch's own; the
    size checks read that module only where symbolic sizes exist (ops._surely)."""
    code = ("import sys, torch, rnnrec_fast\n"
            "rnnrec_fast.recurrence(torch.randn(2, 1, 3), None, torch.randn(12, 3), torch.randn(12, 4))\n"
            "rnnrec_fast.GRU(3, 4)(torch.randn(2, 1, 3))\n"
            "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_cuda_is_built_where_torch_and_nvcc_have_it_unless_switched_off(monkeypatch):
    """RNNREC_FAST_CUDA unset: the CUDA extension is built where torch is a CUDA build and a CUDA
    toolkit is found (its default is None, 'decide', not off); set, its word decides (mutation
    check: a default of False, CUDA never built unless asked, passed the suite on a CPU machine)."""
    import shutil

    import torch

    ns = _setup_namespace()
    monkeypatch.delenv("RNNREC_FAST_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc" if name == "nvcc" else None)
    assert ns["_want_cuda"]() is True
    monkeypatch.setattr(torch.version, "cuda", None)  # (a CPU build of torch)
    assert ns["_want_cuda"]() is False
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("RNNREC_FAST_CUDA", "off")
    assert ns["_want_cuda"]() is False


def test_default_build_flags_are_portable_and_carry_no_debug_information(monkeypatch):
    """The default build compiles with -g0 (no DWARF: the extension went from 28 MB to 1.4 MB) and without
    -march=native (a wheel built on one machine runs on another); RNNREC_FAST_NATIVE=1 adds
    -march=native. An SM version given twice is built once (mutation check: none of these was
    pinned)."""
    monkeypatch.setenv("RNNREC_FAST_CUDA", "0")
    for name in ("RNNREC_FAST_NATIVE", "RNNREC_FAST_SANITIZE", "RNNREC_FAST_EXT", "RNNREC_FAST_STANDALONE"):
        monkeypatch.delenv(name, raising=False)
    ns = _setup_namespace()
    for e in ns["_extensions"]():
        cxx = e.extra_compile_args["cxx"]
        assert "-g0" in cxx and "-march=native" not in cxx, (e.name, cxx)
    monkeypatch.setenv("RNNREC_FAST_NATIVE", "1")
    for e in ns["_extensions"]():
        assert "-march=native" in e.extra_compile_args["cxx"], e.name
    assert ns["_cuda_archs"]("90;9.0;80") == ["80", "90"]


def test_a_failed_test_run_names_its_seed_at_its_end(tmp_path):
    """A run with a failure prints its RNNREC_FAST_TEST_SEED again after the short summary (CI shows
    a log's end: the header's line had scrolled out of the excerpt of a failure on a rare draw); a
    run that passes does not."""
    tests = Path(__file__).parent
    for body, printed in (("def test_it():\n    assert False\n", True), ("def test_it():\n    pass\n", False)):
        (tmp_path / "test_seeded.py").write_text(body)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                              str(tmp_path / "test_seeded.py")], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{tests.parent}",
                                                "RNNREC_FAST_TEST_SEED": "424242"})
        assert out.returncode == (1 if printed else 0), out.stdout[-2000:] + out.stderr[-2000:]
        tail = out.stdout.strip().splitlines()[-3:]
        assert any("RNNREC_FAST_TEST_SEED=424242 repeats" in line for line in tail) == printed, tail

"""The C++ backend's portable float32 kernels, on a machine that has better ones.

The kernels are chosen once per process from the CPU's instructions: AVX-512 where it has them,
else AVX2/FMA, else scalar code. Machines without AVX-512 (or without AVX2) run the other paths,
so those are tested here too, in child processes where RNNREC_FAST_NO_AVX512=1 /
RNNREC_FAST_NO_SIMD=1 step the choice down: the op's and the fast path's tests must pass there.
"""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rnnrec_fast import backends
from rnnrec_fast._checks import env_flag

from childrun import ROOT, ChildPytest
from conftest import RUN_SEED

# test_op.py's tests that reach the C++ kernels: the cpp cases, the scoring helpers', and those that
# call the C++ kernels by name without a backend parameter; named once, in the Makefile, whose
# sanitize target runs the same selection
CPP_OP_TESTS = re.search(r"^SAN_OP_TESTS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


# the switch that steps the kernels down to each portable level
_LEVEL_SWITCH = {"avx2": "RNNREC_FAST_NO_AVX512", "scalar": "RNNREC_FAST_NO_SIMD"}


def _level_env(level):
    """This environment with the kernels stepped down to ``level``, and this run's inputs."""
    return dict(os.environ, **{_LEVEL_SWITCH[level]: "1"}, RNNREC_FAST_TEST_SEED=str(RUN_SEED))


@pytest.fixture(scope="module")
def portable_runs(request, tmp_path_factory):
    """The child runs of test_portable_kernel_paths, started together at the first one's call: the
    selected levels' runs side by side (~1 min on 2 cores, where one after the other took ~2), each
    with OMP_WAIT_POLICY=PASSIVE so that two torch thread pools do not spin against each other (side
    by side without it, the two took ~2.5 min); with RNNREC_FAST_BIGMEM=1 one at a time, as those
    tests need ~12 GB each. Any still running at the module's end are stopped."""
    from rnnrec_fast import _C

    selected = [item.callspec.params["level"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_portable_kernel_paths"]
    runs = {}

    def start(level):
        env = _level_env(level)
        if not env_flag("RNNREC_FAST_BIGMEM"):
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        runs[level] = _ChildRun(env, _PORTABLE_SELECT, {"test_op": 360, "test_fastpath": 800, "test_serving": 80},
                                tmp_path_factory.mktemp(f"child-{level}"))

    def run(level):
        if level not in runs:
            start(level)
            if not env_flag("RNNREC_FAST_BIGMEM"):
                for other in selected:
                    if other not in runs and (other != "avx2" or _C.simd_level() != "scalar"):
                        start(other)
        return runs[level]

    yield run
    for child in runs.values():
        child.stop()


@pytest.mark.skipif(not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"),
                    reason="the C++ extension is not built")
@pytest.mark.parametrize("level", ["avx2", "scalar"])
def test_portable_kernel_paths(level, portable_runs):
    from rnnrec_fast import _C

    if level == "avx2" and _C.simd_level() == "scalar":
        pytest.skip("this CPU has no AVX2/FMA")
    probe = subprocess.run([sys.executable, "-c", "from rnnrec_fast import _C; print(_C.simd_level())"],
                           env=_level_env(level), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert probe.stdout.strip() == level, probe.stderr
    portable_runs(level).check()


# every cpp case of the op's tests (relu, lengths, resets, masked backward chunks, non-finite
# values; both dtypes), the scoring helpers' (score_topk's scalar path is at::mv, not the vector
# kernel: from a mutation review, copying one score too few there passed every test, since their
# names hold no "cpp"), all of the fast path's, and the serving calls' (their fallbacks where
# the one-call click and batch decline), but the export round trip, whose kernels run in a
# fresh process of its own. One child process for the three files a level: a child each took ~30 s
# more a level on 2 cores.
# (528, 912 and 83-91 when counted; test_op.py's -k selection once matched the dtype ids
# nowhere and filtered test_fastpath.py too: 64 cases ran, and a broken AVX2 relu backward passed)
_PORTABLE_SELECT = f"test_fastpath or (test_serving and not fresh_process) or ({CPP_OP_TESTS})"


class _ChildRun(ChildPytest):
    """pytest -v -x on the test files named in ``least`` (name: the fewest of their tests that must
    pass) with ``-k select``, in a child process with ``env``; ``check()`` waits for it: every
    selected test passes, and enough of each file's ran."""

    def __init__(self, env, select, least, out_dir, timeout=600):
        self.least = least
        super().__init__(["-v", "-x", *[f"tests/{name}.py" for name in least], "-k", select], env, out_dir, timeout)

    def check(self):
        returncode, out, err = self.wait()
        assert returncode == 0, out[-3000:] + err[-3000:]
        assert re.search(r"\d+ passed", out) and " failed" not in out, out[-3000:]
        for name, fewest in self.least.items():
            passed = len(re.findall(rf"^tests/{name}\.py::\S+ PASSED", out, re.M))
            assert passed >= fewest, f"{name}: {passed} passed\n" + out[-3000:]


@pytest.mark.skipif(not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"),
                    reason="the C++ extension is not built")
def test_chunked_projection_on_avx2(tmp_path):
    """A large GRU inference projects its inputs a chunk of steps at a time on AVX-512 only (where
    it pays); RNNREC_FAST_CHUNKED_PROJECTION=1 has the AVX2 kernels take that path too, where the
    one product would be our packed kernel's (the same bits), so that its tests run on a machine
    without AVX-512: the large-call tests of the fast path and of the serving calls, in a child
    process (a workspace sized for the chunks and written past its end showed only on AVX-512)."""
    from rnnrec_fast import _C

    if _C.simd_level() == "scalar":
        pytest.skip("this CPU has no AVX2/FMA")
    env = {k: v for k, v in os.environ.items() if k not in ("RNNREC_FAST_NO_SIMD",)}
    env.update(RNNREC_FAST_NO_AVX512="1", RNNREC_FAST_CHUNKED_PROJECTION="1", RNNREC_FAST_TEST_SEED=str(RUN_SEED))
    probe = subprocess.run([sys.executable, "-c", "from rnnrec_fast import _C; print(_C.simd_level(), "
                            "_C.chunked_projection())"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert probe.stdout.split() == ["avx2", "True"], probe.stdout + probe.stderr[-2000:]
    _ChildRun(env, "chunk or projected_first_layer or scratch or one_step_inference",
              {"test_fastpath": 10, "test_serving": 2}, tmp_path).check()


@pytest.mark.skipif(not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"),
                    reason="the C++ extension is not built")
def test_switch_values():
    """RNNREC_FAST_NO_SIMD=false / off / 0 leave the vector kernels on, true / On switch them off,
    another value switches them off with a warning naming it (any value but 0 switched them off,
    silently: =false ran the scalar kernels; from an audit)."""
    from rnnrec_fast import _C

    if _C.simd_level() == "scalar":
        pytest.skip("this CPU has no AVX2/FMA")
    probe = "import warnings; warnings.simplefilter('always'); from rnnrec_fast import _C; print(_C.simd_level())"
    for value, scalar, warned in (("false", False, False), ("Off", False, False), ("0", False, False),
                                  ("On", True, False), ("2", True, True)):
        env = {k: v for k, v in os.environ.items() if k not in ("RNNREC_FAST_NO_SIMD", "RNNREC_FAST_NO_AVX512")}
        out = subprocess.run([sys.executable, "-c", probe], env=dict(env, RNNREC_FAST_NO_SIMD=value),
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert (out.stdout.strip() == "scalar") == scalar, (value, out.stdout, out.stderr[-2000:])
        assert ("RNNREC_FAST_NO_SIMD=2 is none of" in out.stderr) == warned, (value, out.stderr[-2000:])


def test_cuda_path_names():
    """RNNREC_FAST_CUDA_PATH names a CUDA forward path in any case; another value is auto, with a
    warning (the extension took only the exact lower-case names, and any other as auto silently).
    (Read by rnnrec_fast.backends.cuda at import where the CUDA extension is built.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (unset or empty is auto without a warning: a mutation review's gap)
        for value, path in ((None, 0), ("", 0), ("auto", 0), ("persistent", 1), ("GEMM", 2), (" Gemm ", 2)):
            assert backends.cuda_forward_path(value) == path, value
    with pytest.warns(RuntimeWarning, match="RNNREC_FAST_CUDA_PATH='persistant' is none of auto, persistent, gemm"):
        assert backends.cuda_forward_path("persistant") == 0


@pytest.mark.skipif(not backends.available("cpp") and not env_flag("RNNREC_FAST_REQUIRE_EXT"),
                    reason="the C++ extension is not built")
def test_avx512_kernels_run_where_the_cpu_has_them():
    """Where the CPU has AVX-512F the default choice is the AVX-512 kernels (the whole suite then
    tests them; the portable paths are tested above); elsewhere this says, as a skip, that nothing
    on this machine runs them (csrc/rnnrec_avx512.cpp is compiled in all the same)."""
    from rnnrec_fast import _C

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not re.search(r"^flags\s*:.*\bavx512f\b", flags, re.M):
        pytest.skip("this CPU has no AVX-512F: the AVX-512 kernels are not run or tested on this machine")
    if os.environ.get("RNNREC_FAST_NO_AVX512", "0").lower() not in ("", "0", "false", "no", "off") or \
            os.environ.get("RNNREC_FAST_NO_SIMD", "0").lower() not in ("", "0", "false", "no", "off"):
        pytest.skip("the AVX-512 kernels are switched off in this run's environment")
    assert _C.simd_level() == "avx512"

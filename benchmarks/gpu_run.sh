#!/usr/bin/env bash
# The one command a GPU session runs (repository root, on the H100 machine):
#
#     bash benchmarks/gpu_run.sh [all|build|smoke|sanitize|test|bench|numba]      (default: all)
#
# build : build the extension in place for sm_90 with RNNREC_FAST_CUDA=1 (ptxas register / spill
#         report in the log); if the full build fails (e.g. the CPU extension), build only
#         rnnrec_fast._C_cuda with setup.py's own CUDA block.
# smoke : one forward / backward per mode on both forward paths vs the reference (seconds;
#         benchmarks/gpu_smoke.py).
# sanitize: the smoke check's small sizes under compute-sanitizer memcheck, racecheck and synccheck
#         (skipped, with a line saying so, where compute-sanitizer is not installed).
# test  : tests/test_cuda.py (RNNREC_FAST_REQUIRE_CUDA=1: a missing CUDA backend fails, not skips), then
#         the gpu-marked end-to-end tests of the recommender and serving (training, clicks on cuda).
# bench : benchmarks/bench_cuda.py, stand-alone table + JSON, and under pytest-benchmark when
#         it is installed.
# numba : the Numba CUDA backend on the GPU: tests/test_numba_gpu.py and benchmarks/bench_numba_cuda.py
#         (numba 0.68 there needs numpy 2.4.6: carry the cp312 wheel in .whl/, see the device README;
#         it is installed into /tmp/site first when present).
# Logs and JSON go to $OUT (default /tmp/rnnrec_gpu_out). Python: $PYTHON, else .venv/bin/python, else python3.
# Each stage is separate so that a session with a 10-minute limit per command can run them one by
# one (the in-place build stays on the machine between calls while it is warm).
#
# With 15 minutes of device time in all (the machine's start counted) and 10 a call, a session runs
# `OUT=$OUT bash benchmarks/gpu_run.sh all` with carry [".whl"] and a timeout below 600 s (each
# stage's logs land in $OUT as it ends, so a timeout still returns the stages that ran), then at
# once, where `status` leaves 4 minutes or more, `... gpu_run.sh numba` (an idle machine goes back
# within a minute, and a fresh start costs minutes). .whl/ (ignored by git) holds the numpy 2.4.6
# cp312 wheel that numba 0.68 needs there (the device README's `pip download` line); every stage
# installs it into /tmp/site first, where it is present.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-all}"
OUT="${OUT:-/tmp/rnnrec_gpu_out}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export RNNREC_FAST_CUDA=1 RNNREC_FAST_CUDA_ARCHS="${RNNREC_FAST_CUDA_ARCHS:-90}" RNNREC_FAST_CUDA_VERBOSE=1
export MAX_JOBS="${MAX_JOBS:-8}"
# when CUDA_HOME is not set, prefer a full toolkit directory over nvcc's parent
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
status=0

env_report() {
  {
    echo "== date: $(date -u)"; echo "== python: $PY"
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    echo "== nvcc: $(command -v nvcc)"; nvcc --version 2>&1 | tail -2
    echo "== CUDA_HOME=${CUDA_HOME:-}"
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import numpy; print('numpy', numpy.__version__); import numba; print('numba', numba.__version__)" 2>&1
    "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1
    "$PY" -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" 2>&1
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

build() {
  echo "== build (log: $OUT/build.log)"
  # (the library without Python is not needed for the GPU checks: its build time is spared)
  if RNNREC_FAST_STANDALONE=0 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    echo "full build ok"
  else
    echo "full build FAILED (tail below); building only rnnrec_fast._C_cuda"
    tail -30 "$OUT/build.log"
    "$PY" - build_ext --inplace > "$OUT/build_cuda_only.log" 2>&1 <<'EOF'
# rnnrec_fast._C_cuda alone, with setup.py's own CUDA block (_cuda_extension)
import glob, os
src = open("setup.py").read()
src = src[: src.rindex("setup(")]
ns = {"__file__": os.path.abspath("setup.py"), "__name__": "setup_cuda_only"}
exec(compile(src, "setup.py", "exec"), ns)
from setuptools import setup
from torch.utils import cpp_extension
setup(name="rnnrec_fast_cuda_only",
      ext_modules=[ns["_cuda_extension"](sorted(glob.glob(os.path.join("csrc", "*.cu"))),
                                         ["-O3", "-std=c++17", "-fno-math-errno"])],
      cmdclass={"build_ext": cpp_extension.BuildExtension})
EOF
    rc=$?
    tail -30 "$OUT/build_cuda_only.log"
    if [ $rc -ne 0 ]; then echo "CUDA-only build FAILED"; status=1; return; fi
  fi
  # ptxas register / spill report of the kernels (demangled)
  grep -h -E "Compiling entry function|Used [0-9]+ registers|spill" "$OUT"/build*.log 2>/dev/null \
    | sed -E "s/.*Compiling entry function '([^']+)'.*/\1/" | (c++filt 2>/dev/null || cat) > "$OUT/ptxas_report.txt"
  grep -A2 "persistent_fwd_kernel" "$OUT/ptxas_report.txt" | head -40
  "$PY" -c "import rnnrec_fast, rnnrec_fast._C_cuda as c; print('import ok:', c.__file__); print(rnnrec_fast.backend_info())" \
    2>&1 | tee "$OUT/import.txt" || status=1
}

smoke() {
  echo "== smoke (log: $OUT/smoke.txt)"
  "$PY" benchmarks/gpu_smoke.py > "$OUT/smoke.txt" 2>&1
  tail -45 "$OUT/smoke.txt"
  grep -q "SMOKE OK" "$OUT/smoke.txt" || status=1
}

sanitize() {
  # compute-sanitizer's memcheck (out-of-bounds and misaligned accesses; torch's caching allocator
  # off, so that a read past a tensor is not hidden inside a pooled block), racecheck (shared-memory
  # hazards) and synccheck (barriers: the persistent kernel's grid.sync, __syncthreads) over the
  # smoke check's small sizes, both forward paths
  local cs
  cs="$(command -v compute-sanitizer || true)"
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -z "$cs" ] && [ -x "$d/bin/compute-sanitizer" ]; then cs="$d/bin/compute-sanitizer"; fi
  done
  if [ -z "$cs" ]; then echo "== sanitize: compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*): skipped"; return; fi
  for tool in memcheck racecheck synccheck; do
    echo "== compute-sanitizer --tool $tool (log: $OUT/sanitize_$tool.log)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 9 \
      "$PY" benchmarks/gpu_smoke.py --quick > "$OUT/sanitize_$tool.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|SMOKE" "$OUT/sanitize_$tool.log" | tail -3
  done
}

tests() {
  echo "== tests/test_cuda.py + the recommender and serving on cuda (log: $OUT/test_cuda.log)"
  RNNREC_FAST_REQUIRE_CUDA=1 "$PY" -m pytest -q -rs tests/test_cuda.py -p no:cacheprovider \
    --junitxml="$OUT/test_cuda.xml" --maxfail=100 > "$OUT/test_cuda.log" 2>&1 || status=1
  tail -40 "$OUT/test_cuda.log"
  RNNREC_FAST_REQUIRE_CUDA=1 "$PY" -m pytest -q -rs -m gpu tests/test_recsys.py tests/test_serving.py \
    -p no:cacheprovider > "$OUT/test_gpu_recsys.log" 2>&1 || status=1
  tail -10 "$OUT/test_gpu_recsys.log"
}

bench() {
  echo "== benchmarks/bench_cuda.py (logs: $OUT/bench_cuda*.{log,json})"
  RNNREC_FAST_REQUIRE_CUDA=1 "$PY" benchmarks/bench_cuda.py --json "$OUT/bench_cuda_table.json" 2>&1 | tee "$OUT/bench_cuda_table.log" || status=1
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    "$PY" -m pytest -q benchmarks/bench_cuda.py --benchmark-only -p no:cacheprovider \
      --benchmark-json="$OUT/bench_cuda.json" --benchmark-columns=min,median,mean,stddev,rounds \
      > "$OUT/bench_cuda.log" 2>&1 || status=1
    tail -40 "$OUT/bench_cuda.log"
  else
    echo "pytest-benchmark not installed: stand-alone table only" | tee "$OUT/bench_cuda.log"
  fi
}

use_wheels() {
  # numba 0.68 imports against numpy 2.4.6, not the machine's 2.5: the carried wheel, where present
  if ls .whl/numpy-2.4.6-*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        .whl/numpy-2.4.6-*.whl > "$OUT/wheels.log" 2>&1; then
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "the carried numpy wheel did not install for $PY ($OUT/wheels.log): numba may not import"
    fi
  fi
}

numba_gpu() {
  echo "== tests/test_numba_gpu.py, test_numba_ptx.py + benchmarks/bench_numba_cuda.py (logs: $OUT/numba_gpu*.log)"
  "$PY" -m pytest -q -rs tests/test_numba_gpu.py tests/test_numba_ptx.py -p no:cacheprovider > "$OUT/numba_gpu_test.log" 2>&1 || status=1
  tail -20 "$OUT/numba_gpu_test.log"
  "$PY" -m pytest -q benchmarks/bench_numba_cuda.py --benchmark-only -p no:cacheprovider \
    --benchmark-json="$OUT/numba_gpu_bench.json" > "$OUT/numba_gpu_bench.log" 2>&1 || status=1
  tail -30 "$OUT/numba_gpu_bench.log"
}

use_wheels
env_report
case "$STAGE" in
  build) build ;;
  smoke) smoke ;;
  sanitize) sanitize ;;
  test) tests ;;
  bench) bench ;;
  numba) numba_gpu ;;
  all) build; if [ $status -eq 0 ]; then smoke; tests; bench; fi ;;
  *) echo "usage: $0 [all|build|smoke|sanitize|test|bench|numba]"; exit 2 ;;
esac
echo "== done: status=$status, outputs in $OUT"
exit $status

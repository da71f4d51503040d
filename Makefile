# rnnrec_fast: set-up, demo, tests and benchmarks. Everything runs inside .venv in the repo root.
#   make demo   set up, build the extension, run the demo
#   make test   set up, build the extension, run the whole test suite
#   make bench  set up, build, run the CPU benchmarks and print the ratio table
#   make sanitize  the C++ kernels' tests under ASan + UBSan (not CI)
PYTHON ?= python3
# torch is pinned: an open range would pull a multi-GB CUDA build. 2.13.0 is the CPU build on this machine.
TORCH_VERSION ?= 2.13.0
# Where pip finds no CPU wheel of torch by itself (this machine's pip has one at hand), PyTorch's CPU
# index keeps the CUDA build out: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV ?= .venv
PY := $(VENV)/bin/python
# setuptools: the build runs without isolation, so the venv's own must build wheels (bdist_wheel,
# built in from 70.1); a new venv's is Python's bundled one (65.5 for 3.11), which cannot. The pin
# also has to suit every torch make may install: 2.11 and 2.12 require setuptools<82, 2.13 and 2.14
# >=77.0.3
# onnx, onnxruntime and onnxscript (never runtime dependencies): the tests export models to ONNX with
# both of torch's exporters (the default one, dynamo=True, needs onnxscript) and run them,
# and ONNX Runtime's GRU is a benchmark baseline
DEPS := numpy==2.4.6 numba==0.68.1 pybind11==3.1.0 ninja==1.13.2 pytest==9.2.0 pytest-benchmark==5.3.1 \
	uvicorn==0.54.0 httptools==0.9.0 uvloop==0.23.0 setuptools==81.0.0 onnx==1.23.2 onnxruntime==1.32.0 \
	onnxscript==0.7.2 onnx-ir==1.1.0
# benchmark-only extra: FastAPI for the plain FastAPI + nn.GRUCell serving baseline
BENCH_DEPS := fastapi==0.165.0
# the stamp names torch's version and a checksum of the pins: a changed pin reaches existing venvs
DEPS_STAMP := $(VENV)/.deps-torch-$(TORCH_VERSION)-$(shell printf '%s' '$(DEPS)' | cksum | cut -d' ' -f1)
BUILD_STAMP := $(VENV)/.built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc csrc/*.cu csrc/*.cuh csrc/standalone/*.cpp)
export RNNREC_FAST_REQUIRE_EXT := 1

.PHONY: setup demo test bench sanitize clean

setup: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): | $(PY)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)" $(DEPS)
	rm -f $(VENV)/.deps-torch-*
	touch $@

# The editable install builds the extension into the source tree, where every venv finds it: the
# venv and torch it was last built for are recorded beside it, and another venv's build (make test
# TORCH_VERSION=2.4.1 VENV=.venv-torch2.4.1) makes this venv's build stale, so that it runs again.
BUILT_FOR := rnnrec_fast/.built-for
ifneq ($(shell cat $(BUILT_FOR) 2>/dev/null),$(abspath $(VENV)) $(TORCH_VERSION))
$(shell rm -f $(BUILD_STAMP))
endif

# A compile error fails here, and so fails `make test` and CI.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import rnnrec_fast._C, rnnrec_fast; rnnrec_fast.library_path()"
	echo '$(abspath $(VENV)) $(TORCH_VERSION)' > $(BUILT_FOR)
	touch $@

demo: setup
	$(PY) -m rnnrec_fast.demo

test: setup
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable

bench: setup $(VENV)/.bench-deps
	$(PY) benchmarks/run.py

$(VENV)/.bench-deps: $(DEPS_STAMP)
	$(PY) -m pip install -q $(BENCH_DEPS)
	touch $@

# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer, any report a failure (not
# CI: ~11 min on 2 cores in its last whole run, session 73). The tracked sources are copied to $(SAN_DIR) and
# built there, the extension _C and librnnrec_fast_ops.so (each loads only with the runtimes
# preloaded), and the tests that run the C++ kernels run from there, on the AVX2/AVX-512 paths and
# on the portable scalar one, and the chunked projection of large GRU inferences on AVX2 (which
# only AVX-512 takes by itself: RNNREC_FAST_CHUNKED_PROJECTION); last, test_compile.py's tests of librnnrec_fast_ops.so
# (SAN_LIB_TESTS: a fresh Python process loads it, a libtorch program dlopens it); then the CUDA
# backend's code on the CPU emulator (tests/test_cuda_emulated.py, the emulator built with them). Their
# subprocesses, the C++ program the test compiles included, inherit LD_PRELOAD and the options,
# and a report ends the process with a failing status, which fails the test.
SAN_DIR := build/sanitize
# test_op.py's tests that reach the C++ kernels (tests/test_simd_paths.py reads this line too)
SAN_OP_TESTS := cpp or topk or linear_rows or extension_helpers or threads_give or few_rows or zero_lengths_keep
# test_compile.py's tests that load librnnrec_fast_ops.so (rnnrec_fast.library_path())
SAN_LIB_TESTS := library
SAN_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1
sanitize: setup
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	git ls-files -z | xargs -0 cp --parents -t $(SAN_DIR)
	cd $(SAN_DIR) && RNNREC_FAST_SANITIZE=1 RNNREC_FAST_CUDA=0 MAX_JOBS=2 \
		$(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -c \
		"import rnnrec_fast, os; assert rnnrec_fast.__file__.startswith(os.getcwd()), rnnrec_fast.__file__"
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider tests/test_op.py -k "$(SAN_OP_TESTS)"
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider tests/test_fastpath.py \
		tests/test_kernel_paths.py tests/test_modules.py tests/test_errors.py tests/test_serving.py tests/test_recsys.py
	cd $(SAN_DIR) && $(SAN_ENV) RNNREC_FAST_NO_SIMD=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider \
		tests/test_op.py -k "$(SAN_OP_TESTS)"
	cd $(SAN_DIR) && $(SAN_ENV) RNNREC_FAST_NO_SIMD=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider \
		tests/test_fastpath.py tests/test_kernel_paths.py
	cd $(SAN_DIR) && $(SAN_ENV) RNNREC_FAST_NO_AVX512=1 RNNREC_FAST_CHUNKED_PROJECTION=1 $(abspath $(PY)) -m pytest \
		-q -p no:cacheprovider tests/test_fastpath.py tests/test_serving.py -k "chunk or projected_first_layer"
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -c "import rnnrec_fast, os; p = rnnrec_fast.library_path(); \
		assert p.startswith(os.getcwd()), p; b = open(p, 'rb').read(); assert b'__asan_' in b and b'__ubsan_' in b, p"
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider tests/test_compile.py \
		-k "$(SAN_LIB_TESTS)"
	cd $(SAN_DIR) && $(SAN_ENV) RNNREC_FAST_SANITIZE=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider \
		tests/test_cuda_emulated.py

clean:
	rm -rf build $(VENV) rnnrec_fast/*.so *.egg-info

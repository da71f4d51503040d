import collections
import contextlib
import os
import random
import sys
import zlib

import pytest
import torch

# torch's CPU build computes tanh, exp, log and erf with MKL's vector math, on two threads from
# 4,096 elements. On the 2-core Intel Xeon VM a process's first such call, run by two threads at
# once, gave one thread's half of the output an error of ~1e-4 (relative) in ~15% of fresh processes
# (torch alone, 2026-12-07: tanh 4/30, exp 4/25, log 2/25, erf 4/25; sigmoid, not MKL's, 0/25), so
# that torch.nn's first GRU call missed our tolerances and a child run's first comparison with it
# failed. One small call first, on one thread, prevents it (none in 140 processes after it: tanh,
# exp, erf, torch.nn.GRU's first call). benchmarks/conftest.py makes the same call.
torch.tanh(torch.zeros(16))

if os.environ.get("RNNREC_FAST_TEST_BLOCK_EXT") == "1":  # (test_fallback: this suite's op tests without _C)
    import importlib.abc

    class _BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in ("rnnrec_fast._C", "rnnrec_fast._C_cuda"):
                # (as a missing build raises it: pytest.importorskip skips on this one only)
                raise ModuleNotFoundError(f"{name} blocked (RNNREC_FAST_TEST_BLOCK_EXT=1)", name=name)

    sys.meta_path.insert(0, _BlockExtension())

import rnnrec_fast  # noqa: E402
from rnnrec_fast import backends  # noqa: E402
from rnnrec_fast._checks import env_flag  # noqa: E402

GPU = torch.cuda.is_available()
# end-to-end tests parametrised over devices: on the CPU (CI) they check the test itself, on a GPU the
# cuda path under the same assertions
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")])]


# Fresh inputs at each run, reproducible: the cases that draw from case_seed() mix this run's seed
# (printed in the header; RNNREC_FAST_TEST_SEED=<it> draws the same again) with their parameters.
RUN_SEED = int(os.environ.get("RNNREC_FAST_TEST_SEED") or random.SystemRandom().randrange(2**31))


def case_seed(*parts) -> int:
    """A seed for one parametrised case: this run's seed and the case's parameters (zlib.crc32 of
    their repr, the same in every process, unlike hash() of a str)."""
    return (zlib.crc32(repr(parts).encode()) ^ RUN_SEED) % 2**31


def pytest_report_header(config):
    return [f"rnnrec_fast backends: {rnnrec_fast.backend_info()}",
            f"rnnrec_fast test seed: RNNREC_FAST_TEST_SEED={RUN_SEED} (fresh inputs each run; set it to repeat these)"]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A failed run names its seed again at its end, after the short summary of the failures (CI
    shows a log's end: the header's seed line had scrolled out of the excerpt of a failure on a rare
    draw, 2026-12-07). (The outermost wrapper: the terminal reporter writes the short summary after
    its own yield.)"""
    yield
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"rnnrec_fast test seed: RNNREC_FAST_TEST_SEED={RUN_SEED} repeats this "
                                    "run's draws")


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op thread count n in the block, then the count before it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_backends():
    """The CPU backends to test. With RNNREC_FAST_REQUIRE_EXT=1 (make test, CI) a missing C++
    extension or numba backend (numba is a pinned dependency there) fails its tests instead of
    skipping them."""
    params = []
    for name in ("cpp", "numba", "reference"):
        if backends.available(name) or (name in ("cpp", "numba") and env_flag("RNNREC_FAST_REQUIRE_EXT")):
            params.append(name)
        else:
            params.append(pytest.param(name, marks=pytest.mark.skip(
                reason=f"backend {name} unavailable: {backends.unavailable_reason(name)}")))
    return params


def relu_recurrence_float64(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, resets=None, reverse=False):
    """An Elman relu recurrence over x (T, B, I) from h0 (B, H), in float64, rows of ``lengths``
    (their later steps inactive: the state kept, the output 0), states zeroed where ``resets``
    (T, B), the steps in reverse with ``reverse``: (the outputs (T, B, H), the pre-activations of
    the active steps, flat). The relu tests' guard against the kink: a finite-difference step
    across it, or float32 rounding that gives a pre-activation near 0 the other sign than another
    computation's, changes a gradient by O(1) with no kernel at fault."""
    x, h, w_ih, w_hh, b_ih, b_hh = (None if t is None else t.detach().double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    T, B, _ = x.shape
    live = torch.ones(T, B, dtype=torch.bool) if lengths is None else torch.arange(T).unsqueeze(1) < lengths
    out, pres = torch.zeros(T, B, w_hh.shape[1], dtype=torch.float64), []
    for t in (reversed(range(T)) if reverse else range(T)):
        h_prev = h if resets is None else h.masked_fill(resets[t].unsqueeze(1), 0.0)
        pre = torch.nn.functional.linear(x[t], w_ih, b_ih) + torch.nn.functional.linear(h_prev, w_hh, b_hh)
        pres.append(pre[live[t]].flatten())
        h = torch.where(live[t].unsqueeze(1), pre.relu(), h)
        out[t] = torch.where(live[t].unsqueeze(1), h, 0.0)
    return out, torch.cat(pres)


def shrunk(t, nbytes=8):
    """t with its storage shrunk to nbytes after it was made (untyped_storage().resize_, as FSDP
    frees parameters): its sizes now reach past its memory."""
    t.untyped_storage().resize_(nbytes)
    return t


def tolerances(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def assert_close(actual, expected, dtype, what=""):
    """Explicit tolerances: float64 1e-9, float32 1e-5 (relative, with a matching absolute floor)."""
    torch.testing.assert_close(actual, expected, **tolerances(dtype), msg=lambda m: f"{what}: {m}")


@pytest.fixture
def data_dir():
    from pathlib import Path

    path = Path(os.environ.get("RNNREC_FAST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (path / "yoochoose-clicks-100k_train_full.txt").exists():
        pytest.skip(f"click-log samples not found in {path}")
    return path


@pytest.fixture
def backend_calls(monkeypatch):
    """Counts the calls of the Python backends' entry points, {(backend, function): n}: their
    forward and backward (the op's kernels call them; not numba's run_cpu, which its forward and
    the inference plan call). Calls on the C++ kernels show as none of these. Lets a test check
    that a forced backend is the one that ran, in every layer and direction and in the backward
    (last_backend() names a forward's only)."""
    from rnnrec_fast.backends import reference

    counts = collections.Counter()

    def spy(name, module, fn):
        orig = getattr(module, fn)

        def counted(*args, **kwargs):
            counts[(name, fn)] += 1
            return orig(*args, **kwargs)

        monkeypatch.setattr(module, fn, counted)

    for fn in ("forward", "backward"):
        spy("reference", reference, fn)
    if backends.available("numba"):
        from rnnrec_fast.backends import numba_backend

        for fn in ("forward", "backward"):
            spy("numba", numba_backend, fn)
    return counts


def expected_calls(backend, forward=0, backward=0):
    """backend_calls' counts when only ``backend`` ran, ``forward`` and ``backward`` times."""
    if backend not in ("numba", "reference"):
        return {}
    return {k: v for k, v in {(backend, "forward"): forward, (backend, "backward"): backward}.items() if v}

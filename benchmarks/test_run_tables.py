"""benchmarks/run.py's table helpers (no timing: runs with the rest of the benchmark folder)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def test_an_implausible_multithread_gemm_rate_is_flagged():
    assert run.ceiling_note(1, {1: 90.0}) == []
    assert run.ceiling_note(2, {1: 90.0, 2: 170.0}) == []
    note = run.ceiling_note(2, {1: 90.0, 2: 90.4})
    assert note and "not to be trusted" in note[0] and "90.0 GFLOP/s" in note[0]

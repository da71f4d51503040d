"""benchmarks/run.py's table helpers (no timing: runs with the rest of the benchmark folder)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402


def test_an_implausible_multithread_gemm_rate_is_flagged():
    assert run.ceiling_note(1, {1: 90.0}) == []
    assert run.ceiling_note(2, {1: 90.0, 2: 170.0}) == []
    note = run.ceiling_note(2, {1: 90.0, 2: 90.4})
    assert note and "not to be trusted" in note[0] and "90.0 GFLOP/s" in note[0]


def _bench(impl, rep, median_us, flops=2e6):
    return {"group": "case1", "stats": {"median": median_us * 1e-6},
            "extra_info": {"impl": impl, "rep": rep, "B": 1, "T": 2, "H": 3, "flops": flops, "target": 2}}


def test_table_takes_the_median_of_per_repetition_ratios_and_their_range():
    """A row's ratio is the median of the per-repetition ratios, with their range (from a mutation
    review, as the next test: table() had no test): torch 100/100/400 µs, ours 25/50/80 µs give
    ratios 4, 2, 5 (median 4, range 2-5), while the ratio of the medians is 2."""
    data = {"benchmarks": [_bench("torch", r, t) for r, t in enumerate((100, 100, 400))]
            + [_bench("ours", r, t) for r, t in enumerate((25, 50, 80))]}
    text = run.table(data, ceiling=80.0, threads=1, columns=["ours", "onnxruntime"])
    head, _, row = text.split("\n")
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["torch.nn (µs)"] == "100.0" and cells["ours (µs)"] == "50.0"
    assert cells["torch/ours"] == "4.00×"
    assert cells["torch/ours over the repetitions"] == "2.00–5.00×"
    assert cells["ours GFLOP/s"] == "40.0"  # 2e6 FLOP in ours' 50 µs
    assert cells["% of 1-thread MKL GEMM"] == "50%"
    assert cells["torch/(GEMM work at MKL's rate)"] == "4.00×"  # 100 µs / (2e6 / 80e9 s)
    assert cells["torch/onnxruntime"] == "–"


def test_run_pytest_refuses_cases_run_on_another_thread_count(monkeypatch, tmp_path):
    """The cases behind an N-thread table must have run on N threads (results of another count are
    refused, not tabled under N)."""

    def fake_run(cmd, **kw):
        path = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        b = _bench("torch", 0, 1.0)
        b["extra_info"]["threads"] = 1
        open(path, "w").write(json.dumps({"benchmarks": [b]}))
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match="ran on"):
        run.run_pytest(2, "test_cpu", tmp_path / "x.json")
    assert run.run_pytest(1, "test_cpu", tmp_path / "y.json")["benchmarks"]

"""benchmarks/run.py's table helpers (no timing: runs with the rest of the benchmark folder)."""
import json
import os
import sys

import pytest
import torch

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


def test_a_case_computing_something_else_fails_before_timing(monkeypatch):
    """bench_cpu checks each case's results against torch.nn's once before timing (from a review:
    no case compared them, and CI's --benchmark-disable pass checked nothing): other weights in
    ours fail a case, for inference and training alike."""
    import bench_cpu
    import rnnrec_fast
    from cases import CASES

    real = rnnrec_fast.from_torch

    def off_by_a_bit(module, **kw):
        ours = real(module, **kw)
        with torch.no_grad():
            next(ours.parameters()).mul_(1.001)
        return ours

    monkeypatch.setattr(rnnrec_fast, "from_torch", off_by_a_bit)
    for case in (CASES[0], next(c for c in CASES if c.train and c.H == 100)):
        with pytest.raises(AssertionError, match="differs from torch.nn's"):
            bench_cpu.make_call(case, "ours")
    monkeypatch.setattr(rnnrec_fast, "from_torch", real)
    bench_cpu.make_call(CASES[0], "ours")


def test_rows_above_the_ceiling_or_on_another_backend_are_flagged():
    """From a review: tables showed ours at 103-121% of a 2-thread MKL rate measured low, without a
    word; a training row did not record its backend (a fallback would be timed as ours)."""
    def bench(impl, median_us, backend=None, group="case1"):
        b = _bench(impl, 0, median_us, flops=2e6)
        b["group"] = group
        if backend:
            b["extra_info"]["backend"] = backend
        return b

    fine = {"benchmarks": [bench("torch", 100), bench("ours", 50, "cpp")]}
    assert run.run_notes(fine, 80.0, ["ours", "onnxruntime"]) == []
    fast = {"benchmarks": [bench("torch", 100), bench("ours", 20, "cpp")]}  # 100 GFLOP/s > 80
    assert "above this table's measured MKL rate" in run.run_notes(fast, 80.0, ["ours", "onnxruntime"])[0]
    other = {"benchmarks": [bench("torch", 100), bench("ours", 50, "numba", group="case2")]}
    note = run.run_notes(other, 80.0, ["ours", "onnxruntime"])
    assert len(note) == 2 and "case2 (ours: numba)" in note[0]
    assert run.run_notes({"benchmarks": [bench("numba", 50, "numba")]}, 80.0, ["numba", "ours"]) == []
    # onnxruntime's rows are neither ours nor held to the MKL rate
    onnx = {"benchmarks": [bench("torch", 100), bench("ours", 50, "cpp"), bench("onnxruntime", 10)]}
    assert run.run_notes(onnx, 80.0, ["ours", "onnxruntime"]) == []


def test_the_parity_check_compares_every_result():
    """check_against_torch compares each result, not only the first: an h_n or a gradient alone
    differing fails."""
    import bench_cpu
    from cases import CASES
    case = next(c for c in CASES if c.train and c.H == 100)
    good = (torch.ones(3), torch.ones(2), torch.ones(4))
    for i in range(3):
        bad = tuple(t + (0.1 if j == i else 0.0) for j, t in enumerate(good))
        with pytest.raises(AssertionError, match=f"result {i} differs"):
            bench_cpu.check_against_torch(case, lambda b=bad: b, lambda: good)
    bench_cpu.check_against_torch(case, lambda: good, lambda: good)


def _cases():
    import cases
    return cases.CASES + cases.NUMBA_CASES


@pytest.mark.parametrize("case", _cases(), ids=[c.name for c in _cases()])
def test_each_cases_flop_count_is_the_products_torch_nn_runs(case):
    """A case's FLOP count (the GFLOP/s and '% of MKL' columns) is what torch.nn does in products on
    the benchmark's modules and inputs, counted by torch's FlopCounterMode: a review found the
    training counts crediting h0's gradient (the first step's carry), which neither side computes
    (a fifth of the one-step case's count). torch.nn's packed reverse direction also carries the
    gradient into the h0 rows of the sessions shorter than the longest (they join its batch
    later): work ours leaves out, not counted."""
    from torch.nn.utils.rnn import pack_padded_sequence
    from torch.utils.flop_counter import FlopCounterMode

    import bench_cpu

    m = bench_cpu.build_torch(case)
    x, h = bench_cpu.inputs(case)
    extra = 0.0
    if case.train:
        x.requires_grad_(case.x_grad)
        for p in m.parameters():
            p.requires_grad_(case.weights_grad)
        if case.packed and case.bidirectional:
            late = int((case.lengths() < case.T).sum())
            extra = case.layers * 2.0 * 3 * case.H * case.H * late
    feed = pack_padded_sequence(x, case.lengths(), batch_first=True, enforce_sorted=False) if case.packed else x
    with FlopCounterMode(display=False) as fc, torch.set_grad_enabled(case.train):
        out = m(feed, h)
        y = out[0] if isinstance(out, tuple) else out
        if case.train:  # (backward, not autograd.grad, which FlopCounterMode's module hooks refuse)
            (y.data if case.packed else y).sum().backward()
    assert fc.get_total_flops() == pytest.approx(case.flops + extra, rel=1e-12), case.name


def test_results_files_are_never_overwritten(tmp_path):
    """A later run on the same day gets its own file stem (make bench's, and bench_serving's report,
    which overwrote the day's file, a review found): b, c, ..., z, then z2, ..."""
    assert run.free_stem("cpu-2026-12-05", tmp_path) == "cpu-2026-12-05"
    (tmp_path / "cpu-2026-12-05.md").write_text("")
    assert run.free_stem("cpu-2026-12-05", tmp_path) == "cpu-2026-12-05b"
    (tmp_path / "cpu-2026-12-05b.json").write_text("")  # (any file of the stem)
    assert run.free_stem("cpu-2026-12-05", tmp_path) == "cpu-2026-12-05c"
    for x in "cdefghijklmnopqrstuvwxyz":
        (tmp_path / f"serving-1{x}.md").write_text("")
    (tmp_path / "serving-1.md").write_text("")
    (tmp_path / "serving-1b.md").write_text("")
    assert run.free_stem("serving-1", tmp_path) == "serving-1z2"

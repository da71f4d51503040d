"""pytest-benchmark: GRU4Rec inference (one click step + top-20 over the whole catalogue),
training throughput and click-log loading, on the CPU.

    pytest benchmarks/bench_recsys.py --reps 3              # measure (torch.nn and ours interleaved)
    pytest benchmarks/bench_recsys.py --benchmark-disable   # quick smoke run (each case once)

Inference is timed beside the same model with its GRU on torch.nn.GRU (same weights: impl=torch).
Catalogues: 3k = a model trained briefly on the YOOCHOOSE 100k sample (2,933 items; a synthetic
3k model when the data is absent), 100k and 1M = synthetic random models (100 units, shared
embedding). Batches: 1, 64 and 1024 concurrent sessions. Loading: generated logs of 300k rows in
GRU4Rec's TSV and the raw yoochoose-clicks.dat format, the fast path (impl=ours) beside the row
reader it falls back to (impl=rows).
"""
import copy
import os

import numpy as np
import pytest
import torch

from rnnrec_fast import recsys
from rnnrec_fast.recsys import GRU4Rec, SessionDataset, TrainConfig, data

H = 100
_MODELS = {}


def _real_or_synthetic_train():
    d = recsys.resolve_data_dir()
    path = d and os.path.join(d, recsys.data.YOOCHOOSE_TRAIN)
    if path and os.path.isfile(path):
        return SessionDataset.from_log(recsys.load_yoochoose(path)), "yoochoose"
    return SessionDataset.from_log(recsys.synthetic_clicks(6000, 3000, seed=0)), "synthetic"


def _model(n):
    if n not in _MODELS:
        torch.manual_seed(0)
        if n == "3k":
            ds, _ = _real_or_synthetic_train()
            cfg = TrainConfig(epochs=1, seed=0, n_sample=512, chunk_steps=8)
            model, _ = recsys.train(ds, cfg, progress=False)
        else:
            model = GRU4Rec({"100k": 100_000, "1M": 1_000_000}[n], [H]).eval()
        _MODELS[n] = model
    return _MODELS[n]


def _on_torch_nn(model):
    """The same model with its GRU layers on torch.nn.GRU (same weights): the baseline. Its step and
    top-k go through the same code; only the recurrence runs on torch.nn. One per model (a copy of
    the 1M catalogue is 400 MB)."""
    key = ("torch", id(model))
    if key in _MODELS:
        return _MODELS[key]
    base = copy.copy(model)  # shares the item matrices; the GRU is replaced on the copy only
    base._modules = dict(model._modules)
    rnn = model.rnn
    base.rnn = torch.nn.GRU(rnn.input_size, rnn.hidden_size, num_layers=rnn.num_layers)
    base.rnn.load_state_dict(rnn.state_dict())
    _MODELS[key] = base.eval()
    return _MODELS[key]


# `rep` (--reps, benchmarks/conftest.py): each case's two implementations timed in turn, repeatedly
@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("batch", [1, 64, 1024])
@pytest.mark.parametrize("catalogue", ["3k", "100k", "1M"])
def test_inference_topk(benchmark, catalogue, batch, impl, rep):
    model = _model(catalogue)
    if impl == "torch":
        if catalogue == "1M" and batch == 1024:
            pytest.skip("the scoring GEMM is the same on both sides; 10 s a round")
        model = _on_torch_nn(model)
    benchmark.group = f"inference {catalogue} B{batch}"
    g = torch.Generator().manual_seed(batch)
    items = torch.randint(0, model.n_items, (batch,), generator=g)
    h = torch.randn(model.num_layers, batch, H, generator=g) * 0.1

    def step_and_rank():
        h2 = model.step(items, h)
        return model.topk(h2[-1], 20)

    vals, idx = benchmark.pedantic(step_and_rank, rounds=3 if catalogue == "1M" else 10, warmup_rounds=1) \
        if catalogue == "1M" and batch == 1024 else benchmark(step_and_rank)
    assert idx.shape == (batch, 20)
    if impl == "ours" and not (catalogue == "1M" and batch == 1024):  # the same top-k as on torch.nn
        base = _on_torch_nn(model)
        with torch.no_grad():
            want = base.topk(base.step(items, h)[-1], 20)[0]
        torch.testing.assert_close(vals, want, rtol=1e-5, atol=1e-5)
    benchmark.extra_info.update(catalogue=model.n_items, batch=batch, impl=impl, rep=rep)


def test_training_throughput(benchmark):
    ds, source = _real_or_synthetic_train()
    n = min(ds.n_sessions, 3000)  # the first 3,000 sessions: a few seconds per round
    sub = SessionDataset(ds.items[:ds.offsets[n]], ds.offsets[:n + 1], ds.item_map)
    cfg = TrainConfig(epochs=1, seed=0)  # GRU4Rec's RSC15 settings: XE, 100 units, batch 32, 2048 samples

    def run():
        return recsys.train(sub, cfg, progress=False)[1]

    stats = benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    benchmark.extra_info.update(source=source, events=stats["events"],
                                events_per_second=round(stats["events_per_second"]))
    assert stats["events_per_second"] > 0


_ROWS = 300_000


@pytest.fixture(scope="module")
def click_files(tmp_path_factory):
    """Generated click logs: GRU4Rec's TSV (Unix seconds) and the raw YOOCHOOSE format (ISO times)."""
    rng = np.random.default_rng(0)
    sessions = np.sort(rng.integers(1, 2_000_000, _ROWS)).tolist()
    items = rng.integers(214_500_000, 214_900_000, _ROWS).tolist()
    seconds = 1_396_000_000 + np.sort(rng.random(_ROWS) * 1.6e7)
    stamps = np.datetime_as_string((seconds * 1000).astype(np.int64).astype("datetime64[ms]"), unit="ms").tolist()
    folder = tmp_path_factory.mktemp("clicks")
    tsv, raw = folder / "clicks.tsv", folder / "yoochoose-clicks.dat"
    tsv.write_text("SessionId\tItemId\tTime\n" + "".join(
        f"{s}\t{i}\t{t:.3f}\n" for s, i, t in zip(sessions, items, seconds.tolist())))
    raw.write_text("".join(f"{s},{t}Z,{i},0\n" for s, i, t in zip(sessions, items, stamps)))
    return {"tsv": (str(tsv), recsys.load_clicks), "raw": (str(raw), recsys.load_yoochoose_raw)}


@pytest.mark.parametrize("impl", ["rows", "ours"])
@pytest.mark.parametrize("fmt", ["tsv", "raw"])
def test_load_clicks(benchmark, click_files, monkeypatch, fmt, impl, rep):
    path, load = click_files[fmt]
    monkeypatch.setattr(data, "_FAST_READ", impl == "ours")
    benchmark.group = f"load {fmt} {_ROWS // 1000}k rows"
    log = benchmark.pedantic(load, args=(path,), rounds=3, warmup_rounds=0)
    assert len(log) == _ROWS
    if impl == "ours":  # (the row reader's log to the bit)
        monkeypatch.setattr(data, "_FAST_READ", False)
        want = load(path)
        assert np.array_equal(log.sessions, want.sessions) and np.array_equal(log.items, want.items)
        assert np.array_equal(log.times.view(np.int64), want.times.view(np.int64))
    benchmark.extra_info.update(rows=_ROWS, impl=impl, rep=rep)

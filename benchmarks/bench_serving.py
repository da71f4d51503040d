"""Benchmarks of rnnrec_fast.serving.

pytest-benchmark cases for the in-process API::

    pytest benchmarks/bench_serving.py --benchmark-only

A Markdown report (in-process percentiles, and with --loadtest the HTTP load test of our service
and the FastAPI baseline in the same run) under benchmarks/results/serving-<date>.md::

    python benchmarks/bench_serving.py --report [--model model.pt] [--loadtest]

Models: the "3k-item sample model" is GRU4Rec with H=100 over the YOOCHOOSE sample's 2,933 items
(weights do not change the timing; --model uses a trained checkpoint instead); its one-hot variant
(embedding='none': GRU4Rec's GRU embedding, each item a row of the first layer's input weights) the
same over the same items; the 100k catalogue is the shared-embedding architecture over 100,000
synthetic item ids.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rnnrec_fast import recsys  # noqa: E402
from rnnrec_fast.serving import SessionRecommender  # noqa: E402

H = 100
SAMPLE_ITEMS = 2933


def sample_model(path=None, embedding="shared"):
    if path:
        return recsys.load_checkpoint(path)
    torch.manual_seed(0)
    return recsys.GRU4Rec(SAMPLE_ITEMS, [H], embedding=embedding,
                          item_ids=[214500000 + 17 * i for i in range(SAMPLE_ITEMS)]).eval()


def big_model(n=100_000):
    torch.manual_seed(0)
    return recsys.GRU4Rec(n, [H], item_ids=list(range(10**9, 10**9 + n))).eval()


class Driver:
    """Cycles through sessions and items so that each call is a realistic click."""

    def __init__(self, rec, n_sessions=10_000, batch=64):
        self.rec = rec
        self.ids = rec.item_ids
        self.n_sessions = n_sessions
        self.batch = batch
        self.i = 0

    def click(self):
        i = self.i = self.i + 1
        return self.rec.click(i % self.n_sessions, self.ids[(i * 7919) % len(self.ids)], k=20)

    def click_many(self):
        i = self.i = self.i + 1
        b = self.batch
        base = (i * b) % self.n_sessions
        sids = [(base + j) % self.n_sessions for j in range(b)]
        items = [self.ids[((i * b + j) * 7919) % len(self.ids)] for j in range(b)]
        return self.rec.click_many(sids, items, k=20)


def check_paths_agree(model, clicks=40, batch=8):
    """The fast path's answers against the model.step / model.score path's (what the tables set side
    by side), before timing: the same clicks, one at a time and in batches, give the same items and
    scores (a broken fast path must not time fast). Returns whether the model has a fast path."""
    fast, slow = SessionRecommender(model, fast=True), SessionRecommender(model, fast=False)
    if not fast.uses_fast_path:
        return False
    for make in (lambda r: Driver(r, n_sessions=7).click, lambda r: Driver(r, n_sessions=11, batch=batch).click_many):
        a, b = make(fast), make(slow)
        for _ in range(clicks // 4):
            got, want = a(), b()
            pairs = zip(got, want) if isinstance(got, list) else [(got, want)]
            for (items, scores), (w_items, w_scores) in pairs:
                torch.testing.assert_close(torch.tensor(scores), torch.tensor(w_scores), rtol=1e-5, atol=1e-5)
                # (the items where their scores are not tied within rounding)
                s = torch.tensor(w_scores)
                apart = torch.cat([s[:-1] - s[1:] > 1e-5, torch.tensor([True])])
                assert [i for i, ok in zip(items, apart) if ok] == [i for i, ok in zip(w_items, apart) if ok]
    return True


# ---------------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    # torch threads: benchmarks/conftest.py's --threads (default 1)
    @pytest.fixture(scope="module")
    def rec_sample():
        model = sample_model(os.environ.get("RNNREC_SERVING_MODEL"))
        check_paths_agree(model)
        return SessionRecommender(model)

    @pytest.fixture(scope="module")
    def rec_one_hot():
        model = sample_model(embedding="none")
        check_paths_agree(model)
        return SessionRecommender(model)

    @pytest.fixture(scope="module")
    def rec_big():
        model = big_model()
        check_paths_agree(model)
        return SessionRecommender(model)

    def test_click_3k(benchmark, rec_sample):
        d = Driver(rec_sample)
        benchmark(d.click)

    def test_click_3k_model_step(benchmark, rec_sample):
        """Same, through model.step / model.score (no fast path)."""
        d = Driver(SessionRecommender(rec_sample.model, fast=False))
        benchmark(d.click)

    def test_click_3k_one_hot(benchmark, rec_one_hot):
        assert rec_one_hot.uses_fast_path
        d = Driver(rec_one_hot)
        benchmark(d.click)

    def test_click_3k_one_hot_model_step(benchmark, rec_one_hot):
        d = Driver(SessionRecommender(rec_one_hot.model, fast=False))
        benchmark(d.click)

    def test_click_many_64_3k(benchmark, rec_sample):
        d = Driver(rec_sample, batch=64)
        benchmark.extra_info["sessions_per_call"] = 64
        benchmark(d.click_many)

    def test_click_100k(benchmark, rec_big):
        d = Driver(rec_big)
        benchmark(d.click)

    def test_click_many_64_100k(benchmark, rec_big):
        d = Driver(rec_big, batch=64)
        benchmark.extra_info["sessions_per_call"] = 64
        benchmark(d.click_many)


# ---------------------------------------------------------------------------------------------- report
def timed(fn, seconds, warmup=200):
    for _ in range(warmup):
        fn()
    out = []
    end = time.perf_counter() + seconds
    pc = time.perf_counter
    while True:
        t = pc()
        fn()
        t1 = pc()
        out.append(t1 - t)
        if t1 > end:
            break
    out.sort()
    return out


def pct(v, q):
    return v[min(len(v) - 1, int(q / 100 * (len(v) - 1) + 0.5))]


def inprocess_rows(model_path, seconds, threads_list):
    rows = []
    models = {"3k sample (2,933 items)": sample_model(model_path),
              "3k sample, one-hot input": sample_model(embedding="none"), "100k synthetic items": big_model()}
    for threads in threads_list:
        torch.set_num_threads(threads)
        for mname, model in models.items():
            has_fast = check_paths_agree(model)
            for fast in ((True, False) if has_fast else (False,)):
                rec = SessionRecommender(model, fast=fast)
                path = "fast path" if rec.uses_fast_path else "model.step/score"
                d = Driver(rec)
                v = timed(d.click, seconds)
                rows.append(dict(op="click", model=mname, path=path, threads=threads, calls=len(v),
                                 p50=pct(v, 50) * 1e6, p95=pct(v, 95) * 1e6, p99=pct(v, 99) * 1e6, per=None))
                d = Driver(SessionRecommender(model, fast=fast), batch=64)
                v = timed(d.click_many, seconds, warmup=20)
                rows.append(dict(op="click_many (64 sessions)", model=mname, path=path, threads=threads, calls=len(v),
                                 p50=pct(v, 50) * 1e6, p95=pct(v, 95) * 1e6, p99=pct(v, 99) * 1e6,
                                 per=pct(v, 50) * 1e6 / 64))
    return rows


def environment():
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs",
        "python": platform.python_version(), "torch": torch.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("numpy", "uvicorn", "httptools", "uvloop", "fastapi", "starlette", "pydantic"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "not installed"
    try:
        import rnnrec_fast

        info["rnnrec_fast backend"] = rnnrec_fast.resolve_backend("auto", "cpu", torch.float32)
    except Exception:  # noqa: BLE001
        pass
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--report", action="store_true", help="write benchmarks/results/serving-<date>.md")
    p.add_argument("--model", default=None, help="trained checkpoint for the 3k model (and needed by --loadtest)")
    p.add_argument("--seconds", type=float, default=2.0, help="per in-process case")
    p.add_argument("--threads", default="1,2", help="torch thread counts for the in-process cases")
    p.add_argument("--loadtest", action="store_true", help="also run benchmarks/loadtest.py (ours + baseline)")
    p.add_argument("--lt-duration", type=float, default=5.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    env = environment()
    rows = inprocess_rows(a.model, a.seconds, [int(t) for t in a.threads.split(",")])
    lines = [f"# rnnrec_fast.serving benchmarks, {env['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## In process (H=100, 1 layer, k=20; time per call, measured one call at a time)", "",
              "| op | catalogue | path | torch threads | calls | p50 (µs) | p95 (µs) | p99 (µs) | p50 per session (µs) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = "" if r["per"] is None else f"{r['per']:.1f}"
        lines.append(f"| {r['op']} | {r['model']} | {r['path']} | {r['threads']} | {r['calls']} | {r['p50']:.1f} | "
                     f"{r['p95']:.1f} | {r['p99']:.1f} | {per} |")
    print("\n".join(lines), flush=True)
    loadtests = []
    if a.loadtest:
        if not a.model:
            raise SystemExit("--loadtest needs --model (a checkpoint)")
        lines += ["", "## HTTP load test (benchmarks/loadtest.py: YOOCHOOSE test sessions replayed over loopback; "
                  "load generator on the same 2 CPUs)", ""]
        for rate, conc in ((0, 8), (0, 32), (2500, 16), (2500, 32)):
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "loadtest.py"), "--model", a.model,
                   "--servers", "ours,baseline", "--duration", str(a.lt_duration), "--rate", str(rate),
                   "--concurrency", str(conc)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            table = [ln for ln in r.stdout.splitlines() if ln.startswith("|") or ln.startswith("# load test")]
            table = [ln.lstrip('# ') if ln.startswith('#') else ln for ln in table]
            lines += [f"`{' '.join(['python benchmarks/loadtest.py'] + cmd[2:])}`", ""] + table + [""]
            loadtests.append(dict(command=cmd[2:], table=table))
            print("\n".join(table), flush=True)
    if a.report:
        if a.out is None:  # (a later report on the same day gets its own file, as make bench's)
            sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
            from run import RESULTS, free_stem
            out = str(RESULTS / f"{free_stem(f'serving-{datetime.date.today().isoformat()}')}.md")
        else:
            out = a.out
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        # beside it, the figures the Markdown rounds (as make bench keeps its raw results)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(dict(environment=env, inprocess=rows, loadtests=loadtests), f, indent=1)
        print(f"wrote {out} and its .json")


if __name__ == "__main__":
    main()

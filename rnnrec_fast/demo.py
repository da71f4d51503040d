"""`make demo`: the fused backend against torch.nn on a few shapes, then the session recommender.

python -m rnnrec_fast.demo [--no-recsys] [--data DIR] [--epochs N]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import rnnrec_fast

SHAPES = [  # (what, B, T, H)
    ("serving step", 1, 1, 100),
    ("one long session", 1, 20, 512),
    ("batch of sessions, one step", 256, 1, 100),
    ("training-size batch", 32, 20, 100),
]


def _median_us(fn, repeat=200):
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def parity_and_speed(reps=3):
    """Each shape on one thread (as the benchmarks time it: on a shared machine torch's default
    threads made a 2 ms call take 170 ms whenever the other core was busy), torch.nn and ours
    timed in ``reps`` interleaved blocks, the median of each side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _table(reps)
    finally:
        torch.set_num_threads(threads)


def _table(reps):
    print(f"rnnrec_fast {rnnrec_fast.__version__}, torch {torch.__version__}, one thread "
          f"(median of {reps} interleaved repetitions; `make bench` for the recorded tables)")
    for name, state in rnnrec_fast.backend_info().items():
        print(f"  backend {name}: {state}")
    print(f"{'case':32s} {'B':>4s} {'T':>3s} {'H':>4s}  {'max |diff|':>10s}  {'torch.nn':>10s}  "
          f"{'ours':>10s}  ratio  backend")
    for what, B, T, H in SHAPES:
        torch.manual_seed(0)
        ref = torch.nn.GRU(H, H, batch_first=True).eval()
        ours = rnnrec_fast.from_torch(ref).eval()
        x = torch.randn(B, T, H)
        with torch.inference_mode():
            diff = (ours(x)[0] - ref(x)[0]).abs().max().item()
            repeat = 200 if B * T * H < 200_000 else 30
            t_ref, t_ours = [], []
            for _ in range(reps):
                t_ref.append(_median_us(lambda: ref(x), repeat))
                t_ours.append(_median_us(lambda: ours(x), repeat))
            t_ref, t_ours = sorted(t_ref)[reps // 2], sorted(t_ours)[reps // 2]
        print(f"{what:32s} {B:4d} {T:3d} {H:4d}  {diff:10.2e}  {t_ref:8.1f}us  {t_ours:8.1f}us  "
              f"{t_ref / t_ours:5.2f}x  {rnnrec_fast.last_backend()}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rnnrec_fast.demo", description=__doc__)
    p.add_argument("--no-recsys", action="store_true", help="only the kernel comparison")
    p.add_argument("--data", default=None, help="folder holding the YOOCHOOSE 100k sample (default: "
                   "$RNNREC_FAST_DATA, else ../shared/data beside a source checkout; without the sample the "
                   "demo trains on a generated click log)")
    p.add_argument("--epochs", type=int, default=None, help="recommender training epochs (default: 3)")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 0:  # (before the kernel table, not after it)
        p.error(f"--epochs must be >= 0, got {args.epochs}")
    parity_and_speed()
    if not args.no_recsys:
        try:
            from rnnrec_fast import recsys
        except ImportError as exc:  # pragma: no cover
            print(f"(recommender demo unavailable: {exc})")
            return 0
        kwargs = {} if args.epochs is None else {"epochs": args.epochs}
        try:
            recsys.demo(data_dir=args.data, **kwargs)
        except recsys.RecsysError as exc:  # bad data in the data folder: its message, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

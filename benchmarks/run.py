"""`make bench`: run the CPU benchmarks at 1 and 2 threads and print/save the ratio table.

Every case is timed in REPS interleaved repetitions (torch.nn, ours, onnxruntime, then again), each
implementation checked against torch.nn once before it is timed (bench_cpu.py). For each case: the
median over the repetitions of torch.nn's and ours' median times, the median of the per-repetition
ratios (torch / ours) with their range, our GFLOP/s and its share of the single-thread (or
N-thread) fp32 GEMM ceiling measured in the same run (a 1024^3 matmul), plus the onnxruntime column
where it is installed, the numba grid, and the peak memory of a training step; each table with its
run's process CPU time / wall time and notes for rows above the ceiling or on another backend.
Writes benchmarks/results/cpu-<date>.json (raw pytest-benchmark output and the derived figures) and
cpu-<date>.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def free_stem(prefix: str, folder: Path = RESULTS) -> str:
    """``prefix`` with the first suffix that names no results file yet: a later run on the same day
    gets its own file (b, c, ..., z, then z2, z3, ...), never one that is there already."""
    suffixes = itertools.chain([""], "bcdefghijklmnopqrstuvwxyz", (f"z{n}" for n in itertools.count(2)))
    return next(s for s in (f"{prefix}{x}" for x in suffixes) if not any(folder.glob(f"{s}.*")))


def _simd_level() -> str:
    try:
        from rnnrec_fast import _C
        return _C.simd_level()
    except ImportError:
        return "none (no C++ extension)"


def gemm_ceiling(threads: int, n: int = 1024) -> float:
    code = (
        "import torch, time\n"
        f"torch.set_num_threads({threads})\n"
        f"a = torch.randn({n}, {n}); b = torch.randn({n}, {n})\n"
        "for _ in range(3): a @ b\n"
        "ts = []\n"
        "for _ in range(15):\n"
        "    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
        f"print(2 * {n}**3 / sorted(ts)[len(ts) // 2] / 1e9)\n"
    )
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).strip())


STREAM_CODE = """
import sys, time, torch
torch.set_num_threads(1)
H = int(sys.argv[1])
w = torch.randn(3 * H, H)              # a GRU's W_hh (or W_ih): 3H x H float32
one = torch.randn(1)
def median(f, n=3000):
    for _ in range(50):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]
# reading the matrix once (a sum streams it from the cache it sits in), minus torch's call overhead
call = median(one.sum)
same = median(w.sum) - call
# and in 16 row blocks whose order turns round at each read, as our step product walks W_hh (the
# rows read last, still in L2 where the matrix is larger than it, are read first next time)
blocks = list(w.split(-(-3 * H // 16)))
turn = [False]
def alternating():
    for b in (blocks[::-1] if turn[0] else blocks):
        b.sum()
    turn[0] = not turn[0]
print(same * 1e6, (median(alternating) - len(blocks) * call) * 1e6)
"""


def stream_us(H: int) -> tuple[float, float]:
    """Time to read a GRU weight matrix (3H x H float32) once, from the cache it stays in between reads,
    one thread: the median of w.sum() minus that of a one-element sum (the call overhead); and the same
    with the matrix read in 16 row blocks whose order turns round from read to read."""
    same, turning = subprocess.check_output([sys.executable, "-c", STREAM_CODE, str(H)], text=True).split()
    return float(same), float(turning)


# One training step of torch.nn.GRU or ours in a fresh process (argv: impl B T H), after a warm-up
# step; the two measures below wrap it.
TRAINING_STEP = """
B, T, H = (int(v) for v in sys.argv[2:5])
torch.manual_seed(0)
ref = torch.nn.GRU(H, H, batch_first=True)
module = ref if sys.argv[1] == "torch" else rnnrec_fast.from_torch(ref)
x = torch.randn(B, T, H, requires_grad=True)
params = list(module.parameters())
def step():
    y, h = module(x)
    return torch.autograd.grad(y.sum(), params + [x])
g = step(); del g                                # warm-up (first-call set-up)
rnnrec_fast.empty_cache()  # the scratch our kernels keep between calls is allocated within the step
"""

PEAK_CODE = """
import sys, torch, rnnrec_fast
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0
""" + TRAINING_STEP + """
open("/proc/self/clear_refs", "w").write("5")    # reset the peak-RSS mark (VmHWM)
base = status("VmRSS:")
g = step()
print(status("VmHWM:") - base)
"""


def peak_training_mib(impl: str, B: int, T: int, H: int) -> float:
    """Peak resident-memory growth of one training step (forward + backward) after a warm-up, in a
    fresh process. Every allocation of 4 KiB or more goes straight to mmap, so freed memory leaves
    the RSS; smaller ones (torch.nn.GRU's many per-step tensors) are served from heap pages the
    warm-up left resident, which the growth does not count: see live_peak_mib for the live bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"}
    runs = sorted(float(subprocess.check_output([sys.executable, "-c", PEAK_CODE, impl, str(B), str(T), str(H)],
                                                text=True, env=env).strip().splitlines()[-1]) for _ in range(5))
    return runs[2]  # the median of 5 fresh processes (a single one varies by ~0.2 MiB here)


LIVE_CODE = """
import ctypes, sys, torch, rnnrec_fast
torch.set_num_threads(1)
count = ctypes.CDLL(None)  # benchmarks/memcount.c, preloaded
count.memcount_peak.restype = count.memcount_current.restype = ctypes.c_long
""" + TRAINING_STEP + """
count.memcount_reset()
base = count.memcount_current()
g = step()
print((count.memcount_peak() - base) / 2**20)
"""


def shared_lib(workdir: str, name: str, *flags: str) -> str | None:
    """benchmarks/<name>.c built as a shared library into workdir (None where no C compiler is found;
    a failed build raises CalledProcessError)."""
    import shutil
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = str(Path(workdir) / f"{name}.so")
    subprocess.run([cc, "-O2", *flags, "-shared", "-fPIC", "-o", out, str(HERE / f"{name}.c")], check=True)
    return out


def memcount_lib(workdir: str) -> str | None:
    """benchmarks/memcount.c built into workdir (None where no C compiler is found)."""
    return shared_lib(workdir, "memcount")


def live_peak_mib(lib: str, impl: str, B: int, T: int, H: int) -> float:
    """Peak of the live heap bytes over one training step after a warm-up, in a fresh process: every
    malloc-family call counted by benchmarks/memcount.c (LD_PRELOAD). It does not depend on which pages
    the allocator reuses, so it gives the same figure run after run (the RSS growth varies by ~0.2 MiB
    between processes at B=32, H=100)."""
    env = {**os.environ, "LD_PRELOAD": lib}
    return float(subprocess.check_output([sys.executable, "-c", LIVE_CODE, impl, str(B), str(T), str(H)],
                                         text=True, env=env).strip().splitlines()[-1])


def fma_peak(workdir: str) -> float | None:
    """The fp32 FMA peak of one core (benchmarks/fmapeak.c: a register-only FMA loop on vectors as
    wide as our kernels'), median of 5; None where no C compiler is found or it does not build."""
    import ctypes
    vbytes = 64 if _simd_level() == "avx512" else 32
    try:
        out = shared_lib(workdir, "fmapeak", "-march=native", "-ffp-contract=fast", f"-DVBYTES={vbytes}")
    except subprocess.CalledProcessError:
        return None
    if out is None:
        return None
    lib = ctypes.CDLL(out)
    lib.fma_gflops.restype = ctypes.c_double
    lib.fma_gflops.argtypes = [ctypes.c_long, ctypes.c_float]
    lib.fma_gflops(2_000_000, 1.0)
    runs = sorted(lib.fma_gflops(20_000_000, 1.0) for _ in range(5))
    return runs[2]


REPS = 3  # interleaved repetitions of every case (benchmarks/conftest.py --reps)


def run_pytest(threads: int, select: str, json_path: Path):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "bench_cpu.py"), "-k", select,
           "--benchmark-only", f"--threads={threads}", f"--reps={REPS}", f"--benchmark-json={json_path}",
           "--benchmark-min-rounds=7", "--benchmark-max-time=0.2", "--benchmark-warmup=on"]
    subprocess.run(cmd, check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL)
    data = json.loads(json_path.read_text())
    ran = {b["extra_info"]["threads"] for b in data["benchmarks"]}
    if ran != {threads}:  # the table's thread count must be the one the cases ran on
        raise SystemExit(f"benchmarks asked for {threads} thread(s) ran on {sorted(ran)}")
    return data


def timed_run(threads: int, select: str, json_path: Path):
    """run_pytest, and the process CPU time / wall time of its run (its children's)."""
    import resource
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    data = run_pytest(threads, select, json_path)
    r1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return data, cpu / wall if wall > 0 else float("nan")


def run_notes(data, ceiling, columns):
    """Warning lines for a table: rows of an implementation that ran above the table's measured MKL
    rate (the ceiling was measured low: its '% of MKL' and 'at MKL's rate' columns are off; from a
    review, two runs' tables showed ours at 103-121% without a word), and rows where ours / numba ran
    on another backend than the column names (a fallback would have been timed as ours)."""
    expect = {"ours": "cpp", "numba": "numba"}
    over, other = set(), set()
    for b in data["benchmarks"]:
        info = b["extra_info"]
        impl = info["impl"]
        if impl not in columns or impl == "onnxruntime":
            continue
        if info["flops"] / b["stats"]["median"] / 1e9 > ceiling:
            over.add(b["group"])
        if impl in expect and info.get("backend") != expect[impl]:
            other.add(f"{b['group']} ({impl}: {info.get('backend')})")
    notes = []
    if over:
        notes += [f"**Note:** {len(over)} case(s) ran above this table's measured MKL rate ({ceiling:.1f} GFLOP/s: "
                  f"{'; '.join(sorted(over))}): the rate was measured low, so the '% of MKL' and 'at MKL's rate' "
                  "columns are off for every row (the times and ratios stand).", ""]
    if other:
        notes += [f"**Note:** not on the backend its column names: {'; '.join(sorted(other))}.", ""]
    return notes


def ceiling_note(threads, ceilings):
    """A warning line for a table whose N-thread GEMM rate is implausibly close to the 1-thread one
    (the first run of 2026-12-01 measured 90.4 GFLOP/s on two threads, one core's rate, and its
    table went out without a word)."""
    one, now = ceilings.get(1), ceilings[threads]
    if threads == 1 or one is None or now >= 1.3 * one:
        return []
    return [f"**Note:** {threads} threads measured under 1.3× the 1-thread rate ({one:.1f} GFLOP/s): the VM "
            f"gave this run less than {threads} cores' worth, so this table's times and its '% of MKL' and "
            "'at MKL's rate' columns are not to be trusted.", ""]


def table(data, ceiling, threads, columns):
    """One row per case. Each implementation was timed in REPS interleaved repetitions: its time is
    the median over them of pytest-benchmark's median; a ratio is the median over repetitions of
    that repetition's torch.nn / implementation (so a burst of load on one repetition moves neither)."""
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], {}).setdefault(b["extra_info"]["impl"], {})[b["extra_info"].get("rep", 0)] = b
    rows = []
    head = ["case", "B", "T", "H", "torch.nn (µs)"] + [f"{c} (µs)" for c in columns] + \
        [f"torch/{c}" for c in columns] + [f"torch/{columns[0]} over the repetitions",
                                           f"{columns[0]} GFLOP/s", f"% of {threads}-thread MKL GEMM",
                                           "torch/(GEMM work at MKL's rate)", "target"]
    for name, impls in groups.items():
        t = impls.get("torch")
        if t is None or impls.get(columns[0]) is None:
            continue
        info = next(iter(t.values()))["extra_info"]
        tmeds = {r: b["stats"]["median"] * 1e6 for r, b in t.items()}
        tm = statistics.median(tmeds.values())
        cells = [name, info["B"], info["T"], info["H"], f"{tm:.1f}"]
        meds, ratios = [], []
        for c in columns:
            cm = {r: b["stats"]["median"] * 1e6 for r, b in impls.get(c, {}).items()}
            meds.append(statistics.median(cm.values()) if cm else None)
            ratios.append([tmeds[r] / cm[r] for r in sorted(cm) if r in tmeds])
        cells += [f"{m:.1f}" if m else "–" for m in meds]
        cells += [f"{statistics.median(r):.2f}×" if r else "–" for r in ratios]
        cells += ["–".join(f"{x:.2f}" for x in (min(ratios[0]), max(ratios[0]))) + "×" if len(ratios[0]) > 1
                  else "–"]
        gflops = info["flops"] / (meds[0] * 1e-6) / 1e9
        target = info.get("target")
        # the ratio a kernel doing only the case's GEMM work at MKL's large-GEMM rate would reach
        at_mkl = tm / (info["flops"] / (ceiling * 1e9) * 1e6)
        cells += [f"{gflops:.1f}", f"{100 * gflops / ceiling:.0f}%", f"{at_mkl:.2f}×",
                  f"≥ {target}×" if target else ""]
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _code_and_versions():
    """The header lines naming the code measured (its commit, and whether tracked files differ from
    it), the command, and the versions of the libraries the columns time."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    commit = git("rev-parse", "--short", "HEAD")
    # (the code's files: a notes file edited during a run is no change to what runs)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "csrc", "rnnrec_fast", "setup.py",
                "benchmarks/*.py", "benchmarks/*.c")
    code = ("unknown (not a git checkout)" if commit is None
            else commit + (" with uncommitted changes to its code" if dirty else ""))
    versions = []
    for name in ("numpy", "numba", "onnxruntime"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed" + (" (its column empty: '–')" if name == "onnxruntime" else ""))
    cmd = " ".join([os.path.relpath(sys.argv[0], HERE.parent)] + sys.argv[1:])
    return [f"- code: commit {code}; command: `python {cmd}` (make bench runs it with no options)",
            f"- {', '.join(versions)}"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    import torch

    import rnnrec_fast

    date = dt.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    header = [f"# CPU benchmarks, {date}", "",
              f"- machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
              f"- python {platform.python_version()}, torch {torch.__version__}, rnnrec_fast {rnnrec_fast.__version__}",
              *_code_and_versions(),
              f"- backends: {rnnrec_fast.backend_info()}",
              "- wall time per call from Python (pytest-benchmark), same weights and inputs, same run;",
              "  inference under torch.inference_mode; training = forward + backward of a scalar loss, the",
              "  gradients of the weights and x (not of the given h0; 'x without grad': not of x either;",
              "  'frozen weights': of x only)",
              f"- every case timed in {REPS} interleaved repetitions (torch.nn, ours, onnxruntime, then again):",
              "  a time is the median over the repetitions of pytest-benchmark's median; torch/ours is the",
              "  median over the repetitions of each one's torch.nn / ours (> 1: ours faster), with its range",
              "- onnxruntime: the torch.nn module exported to ONNX, its intra-op threads = torch's, called",
              "  with IO binding (inputs bound once, outputs allocated at each call; before 2026-12-01f",
              "  plain sess.run with numpy inputs, ~60% slower at the serving step)",
              "- MKL GEMM = torch's own 1024³ fp32 matmul in the same run (the issue's 'GEMM ceiling');",
              "  torch/(GEMM work at MKL's rate) = the ratio a kernel would reach doing nothing but the case's",
              "  GEMM work (the FLOP count in benchmarks/cases.py) at that rate. Not a hard bound: the core's",
              "  fp32 FMA peak (below) is higher, and hand-written kernels can run above MKL's rate",
              f"- our float32 CPU kernels here: {_simd_level()} (MKL takes its AVX2 path on AMD CPUs)",
              "- each table says the process CPU time / wall time of its pytest run (N threads kept busy: N;",
              "  pytest's start-up and collection run on one) and the load average before it: a shared",
              "  machine's load slows torch.nn's many small parallel regions more than ours",
              ""]
    with tempfile.TemporaryDirectory() as tmp:
        peak = fma_peak(tmp)
    header.insert(-1, f"- fp32 FMA peak of one core (benchmarks/fmapeak.c, register-only FMA loop): "
                      + (f"{peak:.1f} GFLOP/s" if peak else "not measured (no C compiler, or it did not build)"))
    out = header[:]
    raw = {}
    ceilings = {}
    derived = {"fma_peak_gflops": peak, "gemm_gflops": {}, "cpu_over_wall": {}, "loadavg_before": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            before = gemm_ceiling(threads)
            load = os.getloadavg()[0]
            data, busy = timed_run(threads, "test_cpu", Path(tmp) / f"cpu{threads}.json")
            # the higher of the rates before and after the cases: a ceiling measured in a burst of
            # load would understate MKL's rate (rows then ran above it)
            ceiling = ceilings[threads] = max(before, gemm_ceiling(threads))
            raw[f"cpu_threads{threads}"] = data
            derived["gemm_gflops"][threads], derived["cpu_over_wall"][threads] = ceiling, busy
            derived["loadavg_before"][threads] = load
            out += [f"## {threads} thread(s); fp32 1024³ MKL GEMM measured now: {ceiling:.1f} GFLOP/s", "",
                    f"process CPU time / wall time of this table's run: {busy:.2f}; load average before it: "
                    f"{load:.2f}", ""]
            out += ceiling_note(threads, ceilings)
            out += [table(data, ceiling, threads, ["ours", "onnxruntime"]), ""]
            out += run_notes(data, ceiling, ["ours", "onnxruntime"])
            print("\n".join(out[-6:]), flush=True)
        if 1 not in ceilings:
            ceilings[1] = gemm_ceiling(1)
        ceiling = ceilings[1]
        data = run_pytest(1, "test_numba_cpu", Path(tmp) / "numba.json")
        raw["numba_threads1"] = data
        out += [f"## Numba CPU backend beside torch.nn and the C++ backend (1 thread; MKL GEMM {ceiling:.1f} "
                "GFLOP/s, as above)", "", table(data, ceiling, 1, ["numba", "ours"]), ""]
        out += run_notes(data, ceiling, ["numba", "ours"])
    # the long session (B=1): every step reads all of W_hh, which does not fit in the core's L2; the
    # input projection of all T steps is one product of T rows, which takes longer as GEMM work than
    # as a read of W_ih. Each phase takes at least the longer of the two.
    case = next(c for c in cases.CASES if c.B == 1 and c.T > 1)
    t_torch = [b["stats"]["median"] * 1e6 for b in raw.get("cpu_threads1", {}).get("benchmarks", [])
               if b["group"] == case.name and b["extra_info"]["impl"] == "torch"]
    if t_torch:
        t_torch = statistics.median(t_torch)
        t_same, t_read = stream_us(case.H)
        gh = 3 * case.H
        t_proj = 2 * case.T * gh * case.H / (ceiling * 1e3)  # µs at MKL's 1-thread rate (GFLOP/s)
        t_step = 2 * gh * case.H / (ceiling * 1e3)
        floor = max(t_same, t_proj) + case.T * max(t_read, t_step)  # (W_ih is read once, in one order)
        derived["long_session"] = dict(w_hh_read_us=t_read, w_hh_read_same_direction_us=t_same,
                                       projection_us=t_proj, step_gemm_us=t_step, floor_us=floor,
                                       torch_us=t_torch)
        out += [f"## Estimated time of the long session (B={case.B}, T={case.T}, H={case.H}, 1 thread)", "",
                f"Each step reads all of W_hh ({gh * case.H * 4 / 2**20:.1f} MiB, more than the core's L2): "
                f"reading one such matrix from the cache it stays in (sums over it, minus the call overhead) took "
                f"{t_read:.1f} µs with the order of its row blocks turned round at each read, as our step product "
                f"walks it ({t_same:.1f} µs in the same order every time), "
                f"longer than the step's GEMM work at MKL's 1-thread rate ({ceiling:.1f} GFLOP/s: "
                f"{t_step:.1f} µs). The input projection of the {case.T} steps is one product of {case.T} rows: its "
                f"GEMM work at that rate takes {t_proj:.0f} µs, {'longer' if t_proj > t_same else 'shorter'} than "
                f"a read of W_ih. So a call takes about {max(t_same, t_proj):.0f} + {case.T} × "
                f"{max(t_read, t_step):.1f} = {floor:.0f} µs, {t_torch / floor:.2f}× faster than torch.nn "
                f"({t_torch:.0f} µs). An estimate, not a hard bound: it takes the projection at MKL's rate, where "
                f"the core's FMA peak is higher, and the reads at the speed of torch's sum.", ""]
    out += ["## Peak memory of one training step (fresh process, after a warm-up step, one thread)", "",
            "live heap: the peak of the bytes held in malloc-family allocations over the step (every call "
            "counted by benchmarks/memcount.c, preloaded; the same figure in every process); RSS: the growth "
            "of the peak resident set over the step, with MALLOC_MMAP_THRESHOLD_=4096 so that it follows the "
            "live bytes, median of 5 processes (it varies by ~0.2 MiB between processes at B=32, H=100: "
            "which pages the allocator reuses differs).", "",
            "| case | torch.nn, live heap | ours, live heap | torch.nn, RSS | ours, RSS |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            lib = memcount_lib(tmp)
        except subprocess.CalledProcessError:
            lib = None
        derived["memory_mib"] = {}
        for B, T, H in ((32, 20, 100), (64, 20, 512)):
            live_mib = {impl: (live_peak_mib(lib, impl, B, T, H) if lib else None) for impl in ("torch", "ours")}
            live = {impl: (f"{v:.2f} MiB" if v is not None else "–") for impl, v in live_mib.items()}
            peaks = {impl: peak_training_mib(impl, B, T, H) for impl in ("torch", "ours")}
            derived["memory_mib"][f"GRU B={B} T={T} H={H}"] = {"live_heap": live_mib, "rss": peaks}
            out.append(f"| GRU B={B} T={T} H={H} | {live['torch']} | {live['ours']} | {peaks['torch']:.1f} MiB | "
                       f"{peaks['ours']:.1f} MiB |")
    out.append("")
    text = "\n".join(out)
    print("\n".join(out[-8:]))
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = free_stem(f"cpu-{date}")
        (RESULTS / f"{stamp}.md").write_text(text)
        for run in raw.values():  # keep the statistics, not every timing sample
            for b in run["benchmarks"]:
                b["stats"].pop("data", None)
        # the figures the Markdown's derived columns and sections use, beside the raw results
        (RESULTS / f"{stamp}.json").write_text(json.dumps({**raw, "derived": derived}, indent=1))
        print(f"saved {RESULTS / stamp}.md and .json")


if __name__ == "__main__":
    main()

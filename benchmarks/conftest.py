import os

import torch

# MKL's vector math set up by one small call on one thread, before torch.nn's first parity check
# (a first call on two threads at once can be off by ~1e-4 on some machines: tests/conftest.py)
torch.tanh(torch.zeros(16))


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=int(os.environ.get("RNNREC_FAST_BENCH_THREADS", "1")),
                     help="intra-op threads for torch (and the C++ kernels); default 1")
    parser.addoption("--reps", type=int, default=1,
                     help="time each case's implementations this many times, interleaved (torch, ours, "
                          "..., torch, ours, ...): a burst of load on a shared machine then lands on "
                          "one pair, not on one side of every pair; make bench uses 3")


def pytest_generate_tests(metafunc):
    if "rep" in metafunc.fixturenames:
        reps = metafunc.config.getoption("--reps")
        metafunc.parametrize("rep", range(reps), ids=[f"rep{r}" for r in range(reps)])


def pytest_collection_modifyitems(config, items):
    """Run each case's measurements interleaved (the tests with a `rep`): case by case in their
    collection order, then repetition by repetition, then implementation in collection order
    (torch.nn first); the other tests follow in their own order."""
    def rep_params(item):
        cs = getattr(item, "callspec", None)
        return cs.params if cs is not None and "rep" in cs.params else None

    def case_of(item, p):  # (the test and its parameters but rep and impl: a Case by identity)
        return (item.originalname,) + tuple(sorted(
            (k, v if isinstance(v, (int, float, str)) else id(v)) for k, v in p.items() if k not in ("rep", "impl")))

    groups, impls = {}, {}
    for item in items:
        p = rep_params(item)
        if p is not None:
            groups.setdefault(case_of(item, p), len(groups))
            impls.setdefault(p["impl"], len(impls))

    def key(n_item):
        n, item = n_item
        p = rep_params(item)
        if p is None:
            return (1, n, 0, 0)
        return (0, groups[case_of(item, p)], p["rep"], impls[p["impl"]])

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_configure(config):
    torch.set_num_threads(config.getoption("--threads"))


def pytest_report_header(config):
    return f"benchmark threads: {torch.get_num_threads()}"

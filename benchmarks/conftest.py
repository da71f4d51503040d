import os

import torch


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=int(os.environ.get("RNNREC_FAST_BENCH_THREADS", "1")),
                     help="intra-op threads for torch (and the C++ kernels); default 1")


def pytest_configure(config):
    torch.set_num_threads(config.getoption("--threads"))


def pytest_report_header(config):
    return f"benchmark threads: {torch.get_num_threads()}"

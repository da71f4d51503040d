import os

import pytest
import torch

import rnnrec_fast
from rnnrec_fast import backends

GPU = torch.cuda.is_available()


def pytest_report_header(config):
    return f"rnnrec_fast backends: {rnnrec_fast.backend_info()}"


def cpu_backends():
    """The CPU backends to test. With RNNREC_FAST_REQUIRE_EXT=1 (make test, CI) a missing C++
    extension or numba backend (numba is a pinned dependency there) fails its tests instead of
    skipping them."""
    params = []
    for name in ("cpp", "numba", "reference"):
        if backends.available(name) or (name in ("cpp", "numba") and os.environ.get("RNNREC_FAST_REQUIRE_EXT") == "1"):
            params.append(name)
        else:
            params.append(pytest.param(name, marks=pytest.mark.skip(
                reason=f"backend {name} unavailable: {backends.unavailable_reason(name)}")))
    return params


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

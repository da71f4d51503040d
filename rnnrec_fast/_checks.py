"""Argument checks shared by the recommender (``recsys``) and the serving layer: each caller keeps
its own message and exception type."""
from __future__ import annotations

import numpy as np


def is_int_at_least(value, minimum: int) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a bool is not) of at least ``minimum``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def env_flag(name: str) -> bool:
    """An on/off environment variable of the tests and benchmarks (RNNREC_FAST_REQUIRE_EXT, ...), read
    as the run-time switches and setup.py's are: 1 / true / yes / on (any case) set it; unset, empty,
    0 / false / no / off leave it off; another value is a ValueError (RNNREC_FAST_REQUIRE_EXT=true
    was read as off: a missing extension then skipped its tests instead of failing them)."""
    import os

    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r} is none of 1, true, yes, on, 0, false, no, off")

"""Argument checks shared by the recommender (``recsys``) and the serving layer: each caller keeps
its own message and exception type."""
from __future__ import annotations

import numpy as np


def is_int_at_least(value, minimum: int) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a bool is not) of at least ``minimum``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum

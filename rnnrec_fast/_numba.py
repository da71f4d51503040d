"""numba.njit with on-disk caching where numba can cache: shared by the numba backend's kernels and
the recommender's optimiser. Importing it raises ImportError without numba."""
from __future__ import annotations

from numba import njit as _numba_njit


def njit(cache=False, **options):
    """numba.njit, cached on disk where numba finds a writable place (the package's __pycache__ or
    the user's cache directory); where it finds none (a read-only install without a writable HOME)
    numba refuses cache=True outright, and the function is compiled in each process instead."""
    def decorate(fn):
        if cache:
            try:
                return _numba_njit(cache=True, **options)(fn)
            except RuntimeError as exc:
                if "cannot cache" not in str(exc):
                    raise
        return _numba_njit(**options)(fn)
    return decorate

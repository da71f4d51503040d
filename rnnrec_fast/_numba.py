"""numba.njit with on-disk caching where numba can cache: shared by the numba backend's kernels and
the recommender's optimiser. Importing it raises ImportError without numba."""
from __future__ import annotations

import os
import warnings

from numba import njit as _numba_njit

_warned = False
cache_failed = False  # numba refused cache=True here (the fallback warning then says so)


def njit(cache=False, **options):
    """numba.njit, cached on disk where numba finds a writable place (the package's __pycache__ or
    the user's cache directory); where it finds none (a read-only install without a writable HOME)
    numba refuses cache=True outright, and the function is compiled in each process instead, with
    one warning a process (without the cache the numba backend's first GRU forward and backward
    took ~16 s in every process, against ~0.5 s cached)."""
    def decorate(fn):
        global _warned, cache_failed
        if cache:
            try:
                return _numba_njit(cache=True, **options)(fn)
            except RuntimeError as exc:
                if "cannot cache" not in str(exc):
                    raise
                cache_failed = True
                if not _warned:
                    _warned = True
                    where = os.environ.get("NUMBA_CACHE_DIR")
                    fix = (f"NUMBA_CACHE_DIR={where!r} is not a writable directory: point it at one" if where
                           else "Set NUMBA_CACHE_DIR to a writable directory")
                    warnings.warn(
                        f"rnnrec_fast: numba cannot cache its compiled kernels here ({exc}); every process "
                        "that uses the numba backend (or the recommender's numba optimiser) compiles them "
                        f"again, seconds at the first call of each kind. {fix} to cache them.",
                        RuntimeWarning, stacklevel=2)
        return _numba_njit(**options)(fn)
    return decorate

"""Backend registry: one module per backend, each exposing the same ``forward``/``backward``.

A backend module has ``forward``, ``backward`` (the contract in :mod:`.reference`), ``DEVICES``
(device types it runs on) and ``DTYPES``. Importing it raises ImportError when it is unavailable
(extension not built, numba missing); any error on import makes the backend unavailable, and the
registry remembers why (``backend_info``). Under ``make test`` (RNNREC_FAST_REQUIRE_EXT=1) the tests
require the cpp and numba backends instead of skipping them.
"""
from __future__ import annotations

import importlib
import os
import threading

import torch

# name -> module path, in the order "auto" tries them on each device type
_MODULES = {
    "cuda": "rnnrec_fast.backends.cuda",
    "cpp": "rnnrec_fast.backends.cpp",
    "numba": "rnnrec_fast.backends.numba_backend",
    "reference": "rnnrec_fast.backends.reference",
}
NAMES = tuple(_MODULES)
AUTO_ORDER = {
    "cpu": ("cpp", "numba", "reference"),
    "cuda": ("cuda", "numba", "reference"),
}

_lock = threading.RLock()  # (reentrant: a fork from inside a load, in its own thread, must not wait on itself)
_loaded: dict[str, object] = {}
_errors: dict[str, str] = {}


# A fork while another thread loads a backend (numba's import: ~1-2 s, under _lock) left the child
# the lock, and Python's lock of the module being imported, held by a thread it does not have: its
# first call of that backend waited forever. A fork waits for a load in progress (the lock taken
# around it), and the child starts with a lock of its own.
def _before_fork():
    _lock.acquire()


def _after_fork_in_parent():
    _lock.release()


def _after_fork_in_child():
    global _lock
    _lock = threading.RLock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)

CUDA_PATHS = {"auto": 0, "persistent": 1, "gemm": 2}


def cuda_forward_path(value: str | None) -> int:
    """The CUDA forward path (``_C_cuda.set_forward_path``'s number) that RNNREC_FAST_CUDA_PATH's
    ``value`` names, in any case; unset or empty: auto. Another value is auto too, with a warning
    (the extension's own reading took only the exact lower-case names, and any other silently)."""
    if not value:
        return 0
    path = CUDA_PATHS.get(value.strip().lower())
    if path is None:
        import warnings

        warnings.warn(f"RNNREC_FAST_CUDA_PATH={value!r} is none of {', '.join(CUDA_PATHS)}: taken as auto",
                      RuntimeWarning, stacklevel=2)
        return 0
    return path


def load(name: str):
    """The backend module ``name``; raises RuntimeError saying why when it is unavailable."""
    mod = _loaded.get(name)
    if mod is not None:
        return mod
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name not in _errors:
            try:
                mod = importlib.import_module(_MODULES[name])
                _loaded[name] = mod
                return mod
            except Exception as exc:  # not built / dependency missing / failed to set up
                _errors[name] = f"{type(exc).__name__}: {exc}"
    raise RuntimeError(f"rnnrec_fast backend {name!r} is not available ({_errors[name]})")


def available(name: str) -> bool:
    try:
        load(name)
        return True
    except (RuntimeError, ValueError):
        return False


def unavailable_reason(name: str) -> str | None:
    return None if available(name) else _errors.get(name, "unknown")


def device_unavailable(name: str, device_type: str) -> str | None:
    """Why the (available) backend ``name`` cannot run on ``device_type`` tensors here, or None.
    A backend may say so through its own ``device_unavailable(device_type)`` (numba: numba.cuda
    needs a driver and NVVM, which a machine with a GPU may still lack)."""
    mod = load(name)
    if device_type not in mod.DEVICES:
        return f"backend {name!r} does not run on {device_type!r} tensors"
    probe = getattr(mod, "device_unavailable", None)
    return None if probe is None else probe(device_type)


def auto_skip(name: str, device_type: str) -> str | None:
    """Why backend="auto" passes the available backend ``name`` over for ``device_type`` tensors, or
    None: a backend says so through its own ``auto_skip(device_type)`` (numba under
    NUMBA_DISABLE_JIT=1)."""
    skip = getattr(load(name), "auto_skip", None)
    return None if skip is None else skip(device_type)


def supports(name: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether backend="auto" may take ``name`` for these tensors."""
    if not available(name) or auto_skip(name, device_type) is not None:
        return False
    return dtype in _loaded[name].DTYPES and device_unavailable(name, device_type) is None

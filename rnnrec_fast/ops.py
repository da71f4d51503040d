"""The ``rnnrec_fast`` op family: registration, fake (meta) kernels, autograd and backend choice.

The public ops under the ``rnnrec_fast`` namespace:

``rnnrec_fast::recurrence``
    one layer, one direction, the whole sequence; returns ``(output, h_n, workspace)``.
``rnnrec_fast::recurrence_backward``
    its gradient; autograd for ``recurrence`` is the kernel :func:`torch.library.register_autograd`
    makes, behind a check that refuses forward-mode AD, so eager mode, ``torch.compile``,
    ``torch.export`` and TorchScript all see the same op. With the compiled extension, CPU tensors
    take a C++ registration of the same autograd (the AutogradCPU kernel in ``csrc/rnnrec_op.cpp``:
    no Python around each call); this one serves the other devices. Under torch.func's transforms
    the modules and :func:`recurrence` call the op through an autograd function, and where forward
    mode or nested transforms need derivatives its autograd does not give, as the reference
    backend's torch operations (``op_for``).
``rnnrec_fast::recurrence_backward_differentiable``
    the same gradient as torch operations that autograd records (the forward recomputed by the
    reference backend): what a backward with ``create_graph=True`` runs, so that second derivatives
    (a gradient penalty, a Hessian-vector product) work in eager mode.

The kernels themselves live in :mod:`rnnrec_fast.backends` (C++, CUDA, Numba, reference); the
``backend`` argument picks one (``"auto"``: the fastest available for the tensors' device).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

import torch
from torch._C._functorch import TransformType as _TransformType
from torch.autograd import forward_ad as _forward_ad

from . import backends as _backends
from .backends import reference as _reference

MODES = {"rnn_tanh": 0, "rnn_relu": 1, "gru": 2}
_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3}
BACKENDS = ("auto",) + _backends.NAMES

_FWD_SCHEMA = (
    "(Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? lengths, Tensor? resets, str mode, bool reset_after, str backend) "
    "-> (Tensor output, Tensor h_n, Tensor workspace)"
)
_BWD_SCHEMA = (
    "(Tensor grad_output, Tensor grad_h_n, Tensor x, Tensor? h0, Tensor w_ih, "
    "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, Tensor? resets, Tensor output, "
    "Tensor workspace, str mode, bool reset_after, str backend) "
    "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
    "Tensor grad_b_hh)"
)
try:
    _lib = torch.library.Library("rnnrec_fast", "DEF")
except RuntimeError as exc:  # (the only other definer: librnnrec_fast_ops.so, see library_path)
    raise ImportError("rnnrec_fast: the rnnrec_fast op namespace is already defined in this process, by "
                      "librnnrec_fast_ops.so (the library for programs without Python); import rnnrec_fast "
                      f"instead of loading that library in Python ({exc})") from exc
_lib.define("recurrence" + _FWD_SCHEMA)
_lib.define("recurrence_backward" + _BWD_SCHEMA)
# The backward as operations autograd records (for a backward taken with create_graph=True: see
# _backward_differentiable); the C++ autograd calls it through the dispatcher.
_lib.define(
    "recurrence_backward_differentiable(Tensor grad_output, Tensor grad_h_n, Tensor x, Tensor? h0, Tensor w_ih, "
    "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, Tensor? resets, str mode, bool reset_after) "
    "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)")
# Twins with Python kernels only: the C++ CPU kernel of `recurrence` hands calls that force a
# Python backend (numba, reference) on CPU tensors to these. Not part of the public API.
_lib.define("recurrence_py" + _FWD_SCHEMA)
_lib.define("recurrence_backward_py" + _BWD_SCHEMA)

try:  # loading the extension registers the C++ CPU kernels of both ops (csrc/rnnrec_op.cpp)
    from . import _C

    _CPP_OP = True
except Exception:  # not built (ImportError), or failed to load: the backends' registry says why
    _CPP_OP = False


def library_path() -> str:
    """The path of ``librnnrec_fast_ops.so``: the op without Python (the C++ CPU kernels, their
    autograd and both schemas; libtorch, libc10 and OpenMP its only torch-side dependencies), built
    beside the extension. A libtorch program loads it (``dlopen``) before it loads an AOTInductor
    package or a TorchScript model that holds the op; it runs the 'cpp' backend on float32 and
    float64 CPU tensors, with the torch it was built against (same version and C++ ABI). In a
    Python process use the package instead: loaded after ``import rnnrec_fast`` the library
    registers nothing, and loaded before it, the import fails. FileNotFoundError where it was
    not built."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "librnnrec_fast_ops.so")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rnnrec_fast: {path} was not built (pip install --no-build-isolation . "
                                "builds it with the extension)")
    return path

# ----------------------------------------------------------------------------------------------
# validation (shared by the real kernels and the fake ones)


def _fail(msg):
    raise ValueError(f"rnnrec_fast.recurrence: {msg}")


def _surely(cond):
    """cond (a bool, or a SymBool of symbolic sizes) where it surely holds. A plain bool is itself;
    a SymBool comes from torch's symbolic shapes, whose module is imported by then: read there at
    the call, not imported with the package (it imports sympy: ~0.28 s of `import rnnrec_fast`'s
    ~0.3 s beyond torch's own, on the Intel Xeon VM)."""
    # eager, a plain truth value (a NumPy bool too) is itself; not while tracing, where dynamo's
    # isinstance() of a SymBool guards on its value
    if not torch.compiler.is_compiling() and not isinstance(cond, torch.SymBool):
        return bool(cond)
    # guard_or_false (torch >= 2.7): False with no guard where the answer depends on an unbacked
    # size; before it, guard_size_oblivious: an unbacked size taken as >= 2. (Not bool(expr) beside
    # free_unbacked_symbols: the older dynamo refuses bool() of a symbolic value and did not see an
    # unbacked size through it.) Looked up, not by version number: a 2.7 pre-release has it.
    shapes = torch.fx.experimental.symbolic_shapes
    return getattr(shapes, "guard_or_false", shapes.guard_size_oblivious)(cond)


def is_zero(n):
    """n == 0 for a size; a size the tracer cannot know (an unbacked one: mark_unbacked, or a batch
    filtered by a mask under torch.export) counts as nonzero, with no guard on it: the eager kernels
    still refuse an empty x when such a graph runs. (Under torch.jit.trace a size is a 0-dim tensor.)"""
    if isinstance(n, torch.Tensor):
        return bool(n == 0)
    return _surely(n == 0)


def sizes_differ(a, b):
    """a != b for two sizes or shapes (ints, SymInts; under torch.jit.trace 0-dim tensors), True only
    where they surely differ: where the answer depends on a size the tracer cannot know (an unbacked
    one: mark_unbacked, or a batch filtered by a mask under torch.export) they count as equal, with
    no guard on them (a guard there fails the compile), and the kernels check the real sizes when
    the graph runs."""
    # eager, plain ints: ~0.5 us, against ~1.3 through the loop below (dynamo takes a SymInt's type
    # for int: not while compiling)
    plain = not torch.compiler.is_compiling()
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        a, b = tuple(a), tuple(b)
        if plain and all(type(n) is int for n in a + b):
            return a != b
        return len(a) != len(b) or any(sizes_differ(p, q) for p, q in zip(a, b))
    if plain and type(a) is int and type(b) is int:
        return a != b
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(a != b)
    return _surely(a != b)


def check_tensor_args(where, required=(), optional=()):
    """A None (or any other object) where the op wants a tensor: a TypeError naming the argument.
    ``required`` and ``optional`` are (name, value) pairs; an optional one may be None. Through the
    dispatcher a None for a tensor becomes an undefined tensor, at which torch's autograd stopped
    with "tensor does not have a device" and the Python kernels' checks with an AttributeError."""
    for name, t in required:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {'None' if t is None else type(t).__name__}")
    for name, t in optional:
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor or None, got {type(t).__name__}")


def _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode):
    """Checks types, ranks, sizes, dtypes and devices; returns (mode index, workspace width)."""
    check_tensor_args("rnnrec_fast.recurrence", (("x", x), ("w_ih", w_ih), ("w_hh", w_hh)),
                      (("h0", h0), ("b_ih", b_ih), ("b_hh", b_hh), ("lengths", lengths), ("resets", resets)))
    gates = _GATES.get(mode)
    if gates is None:
        _fail(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if x.dim() != 3:
        _fail(f"x must be 3-D (T, B, input_size), got shape {tuple(x.shape)}")
    T, B, I = x.shape
    if is_zero(T) or is_zero(B) or is_zero(I):
        _fail(f"x must not be empty, got shape {tuple(x.shape)}")
    if w_hh.dim() != 2 or w_hh.shape[1] == 0 or w_hh.shape[0] != gates * w_hh.shape[1]:
        _fail(f"w_hh must be ({gates}*H, H) for mode {mode!r}, got shape {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    if sizes_differ(w_ih.shape, (gates * H, I)):
        _fail(f"w_ih must be ({gates * H}, {I}) (gates*H, input_size), got shape {tuple(w_ih.shape)}")
    if h0 is not None and sizes_differ(h0.shape, (B, H)):
        _fail(f"h0 must be (B, H) = ({B}, {H}), got shape {tuple(h0.shape)}")
    if not x.dtype.is_floating_point:
        _fail(f"x must be a floating-point tensor, got {x.dtype}")
    named = [("h0", h0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)]
    for name, t in named:
        if t is None:
            continue
        if name.startswith("b_") and sizes_differ(t.shape, (gates * H,)):
            _fail(f"{name} must be ({gates * H},), got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            _fail(f"{name} has dtype {t.dtype} but x has {x.dtype}; all must match")
        if t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}; all must be on one device")
    if lengths is not None:
        if lengths.dtype != torch.int64 or sizes_differ(lengths.shape, (B,)):
            _fail(f"lengths must be an int64 tensor of shape ({B},), got {lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device != x.device:
            _fail(f"lengths is on {lengths.device} but x is on {x.device}")
    if resets is not None:
        if resets.dtype != torch.bool or sizes_differ(resets.shape, (T, B)):
            _fail(f"resets must be a bool tensor of shape ({T}, {B}), got {resets.dtype} {tuple(resets.shape)}")
        if resets.device != x.device:
            _fail(f"resets is on {resets.device} but x is on {x.device}")
    return MODES[mode], (4 * H if gates == 3 else 0)


def storage_reach(t):
    """Bytes from the start of t's storage to the end of its last element (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    if t.is_contiguous():
        return (t.storage_offset() + t.numel()) * t.element_size()
    return (t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def within_storage(t):
    """False for a tensor whose storage was freed or shrunk after it was made."""
    return storage_reach(t) <= t.untyped_storage().nbytes()


def _named_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets):
    """The op's tensor arguments with their names, for _check_memory."""
    return (("x", x), ("h0", h0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh),
            ("lengths", lengths), ("resets", resets))


def _check_memory(*named):
    """Each (name, tensor)'s sizes, strides and offset stay within its storage: one freed or shrunk
    after the tensor was made (untyped_storage().resize_(0), as FSDP frees parameters) would be read
    past its end (garbage, or a crash). For the real kernels only (a fake tensor's storage is not
    sized). Mirrors the C++ op's check_memory."""
    for name, t in named:
        if t is None:
            continue
        need, have = storage_reach(t), t.untyped_storage().nbytes()
        if need > have:
            _fail(f"{name} reaches {need} bytes into its storage, which holds {have}: its memory was freed "
                  "or shrunk (untyped_storage().resize_())")


def _workspace_dtype(dtype):
    """The saved workspace's dtype: float32 for half-precision inputs (the reference upcasts)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_backward_inputs(grad_output, grad_h_n, output, workspace, x, H, width):
    """The backward's own arguments: the output's gradient and the forward's saved output and
    workspace, as the forward made them for x (the kernels read them by shape, unchecked)."""
    check_tensor_args("rnnrec_fast.recurrence", (("grad_output", grad_output), ("grad_h_n", grad_h_n),
                                                 ("output", output), ("workspace", workspace)))
    T, B, _ = x.shape
    _check_grads(grad_output, grad_h_n, x, H)
    _check_like("output", output, (T, B, H), x.dtype, x)
    _check_like("workspace", workspace, (T, B, width), _workspace_dtype(x.dtype), x)


def _check_grads(grad_output, grad_h_n, x, H):
    """The gradients given to a backward: (T, B, H) and (B, H) in x's dtype, on x's device."""
    T, B, _ = x.shape
    _check_like("grad_output", grad_output, (T, B, H), x.dtype, x)
    _check_like("grad_h_n", grad_h_n, (B, H), x.dtype, x)


def _check_like(name, t, shape, dtype, x):
    if tuple(t.shape) != shape or t.dtype != dtype:
        _fail(f"{name} must be a {dtype} tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if t.device != x.device:
        _fail(f"{name} is on {t.device} but x is on {x.device}")


def _check_length_values(lengths, T):
    # Data-dependent, so only on the CPU (a CUDA check would synchronise and break graph capture;
    # the CUDA kernels clamp instead).
    if lengths is not None and lengths.device.type == "cpu":
        if torch.compiler.is_compiling():
            # (dynamo traces the op's torch operations here, inside torch.func's transforms: reading
            # the values would guard on them, "Could not guard on data-dependent expression" with
            # fullgraph=True; the check runs in the graph instead, a RuntimeError when it runs)
            torch._assert_async(((lengths >= 0) & (lengths <= T)).all(), "rnnrec_fast: lengths must lie in [0, T]")
            return
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            _fail(f"lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")


def refuse_forward_ad(name, *tensors):
    """Forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad) of a bare
    torch.ops call is refused where a tangent rides on one of ``tensors``: the op's autograd is
    reverse-mode only (the modules and ``recurrence`` run the op's torch operations there instead:
    op_for). The Python registration's Autograd kernel calls this (CUDA tensors, and CPU without the
    extension): torch.library's kernel calls the kernel without its autograd function where nothing
    requires grad (no_grad, and every torch.func.jvp), which dropped the tangents: zeros, no error.
    The tangents are visible down to the autograd key, not below it
    (_register_reverse_mode_autograd). (The C++ registration, CPU tensors with the extension, raises
    torch's error for a C++ custom Function.) A dual level with no tangent on these tensors (forward
    AD elsewhere in the program) passes."""
    if _has_tangent(tensors):
        raise _forward_ad_error(name)


def _has_tangent(tensors):
    """Whether a forward-mode tangent rides on one of ``tensors`` (none outside a dual level)."""
    return _forward_ad._current_level >= 0 and any(
        isinstance(t, torch.Tensor) and _tangent_of(t) is not None for t in tensors)


def _tangent_of(t):
    # vmap's batched tensor has no batching rule for _unpack_dual (torch.func.jvp(vmap(f)): torch's
    # "Batching rule not implemented for aten::_unpack_dual"); the tensor it holds carries the tangent
    while True:
        try:
            return _forward_ad.unpack_dual(t).tangent
        except RuntimeError:
            if not torch._C._functorch.is_batchedtensor(t):
                raise
            t = torch._C._functorch.get_unwrapped(t)


def _forward_ad_error(name):
    return NotImplementedError(
        f"{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
        "supported by a bare call of the op, whose autograd is reverse-mode only: call rnnrec_fast.recurrence "
        "or the modules, which run the op's torch operations (the reference backend) under it, or convert "
        "the model with rnnrec_fast.to_torch(model)")


# ----------------------------------------------------------------------------------------------
# backend choice

_resolved: dict[tuple, tuple[str, object]] = {}
_warned: set[str] = set()
_tls = threading.local()


def resolve_backend(backend: str, device_type: str, dtype: torch.dtype) -> str:
    """The name of the backend that ``backend`` means for tensors of this device type and dtype."""
    return _resolve(backend, device_type, dtype)[0]


def _caller_stacklevel():
    """warnings.warn's stacklevel, from the function that calls this, of the first frame outside
    this package and torch, the code torch.compile generates (in its cache folder:
    TORCHINDUCTOR_CACHE_DIR or a torchinductor_<user> one) and Python's frozen modules (runpy's):
    the user's call (the depth varies with the path taken). Where there is none (this package's
    command line, run with python -m), the outermost frame of this package."""
    own_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    skip = (own_dir, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    generated = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    generated = os.path.abspath(generated) + os.sep if generated else None
    frame, level, own = sys._getframe(1), 1, None
    while frame is not None:
        path = frame.f_code.co_filename
        path = path if path.startswith("<") else os.path.abspath(path)
        if path.startswith(own_dir):
            own = level
        elif not (path.startswith(skip) or path.startswith("<frozen ") or f"{os.sep}torchinductor_" in path
                  or (generated is not None and path.startswith(generated))):
            return level
        frame, level = frame.f_back, level + 1
    return own if own is not None else 1


def _resolve(backend, device_type, dtype):
    key = (backend, device_type, dtype)
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    if backend == "auto":
        order = _backends.AUTO_ORDER.get(device_type)
        if order is None:
            raise ValueError(f"rnnrec_fast: no backend runs on {device_type!r} tensors")
        for name in order:
            if _backends.supports(name, device_type, dtype):
                break
        else:
            raise ValueError(f"rnnrec_fast: no backend supports {dtype} on {device_type!r}")
        preferred = order[0]
        reason = _backends.unavailable_reason(preferred)
        if name != preferred and reason is not None and device_type not in _warned:
            _warned.add(device_type)
            others = [b for b in order[1:] if _backends.available(b)
                      and _backends.device_unavailable(b, device_type) is None]
            skipped = [f"{b!r} passed over: {why}" for b in others
                       if (why := _backends.auto_skip(b, device_type)) is not None]
            # (and the fallbacks that are not available themselves: a missing or broken numba is why
            # the reference backend runs, ~2x slower than numba's)
            skipped += [f"{b!r} not available: {_backends.unavailable_reason(b)}" for b in order[1:]
                        if not _backends.available(b)]
            compiles = ""
            if name == "numba":
                from . import _numba
                how = ("in every process: numba cannot cache them here, as its warning said" if _numba.cache_failed
                       else "once: they are cached on disk")
                compiles = f" The first calls compile the Numba kernels (up to ~20 s in all, {how})."
            warnings.warn(
                f"rnnrec_fast: the {preferred!r} backend is not available ({reason}); {device_type} "
                f"tensors run on the fallback backends instead ({', '.join(map(repr, others))}, the first "
                f"that supports the dtype{''.join('; ' + k for k in skipped)}: this {dtype} call on {name!r}; "
                f"rnnrec_fast.last_backend() names each call's).{compiles} Build the extension (pip install "
                "--no-build-isolation .) for the fused kernels.",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
        elif name != preferred and reason is None and (device_type, dtype) not in _warned:
            _warned.add((device_type, dtype))
            warnings.warn(
                f"rnnrec_fast: the {preferred!r} backend does not support {dtype}; {device_type} "
                f"{dtype} tensors run on the {name!r} backend instead.",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
    else:
        name = backend
        mod = _backends.load(name)  # RuntimeError with the reason when unavailable
        if device_type not in mod.DEVICES:
            raise ValueError(f"rnnrec_fast: backend {name!r} does not run on {device_type!r} tensors")
        why = _backends.device_unavailable(name, device_type)
        if why is not None:
            raise RuntimeError(f"rnnrec_fast: backend {name!r} cannot run on {device_type!r} tensors "
                               f"here: {why}")
        if dtype not in mod.DTYPES:
            raise ValueError(f"rnnrec_fast: backend {name!r} does not support {dtype}")
    hit = (name, _backends.load(name))
    _resolved[key] = hit
    return hit


def last_backend() -> str | None:
    """The backend that ran this thread's latest ``recurrence`` call (None before the first)."""
    if _CPP_OP:
        return _C.last_backend() or None
    return getattr(_tls, "last", None)


def _set_last(name):
    if _CPP_OP:
        _C.set_last_backend(name)
    else:
        _tls.last = name


def empty_cache() -> int:
    """Free the scratch memory the C++ CPU kernels keep between calls, and return its size in bytes.
    Blocks of 64 KiB or more (packed weights, gradient chunks, and the memory of the op's large
    outputs once they are freed: y, the workspace, the input and weight gradients) are kept for the
    next call, up to 32 MiB in all, instead of going back to the system and being faulted in again
    page by page (B16 T20 H512 inference on the Zen 4 VM: ~1,600 page faults a call; 13.7-13.9 ms ->
    10.4-11.2; B64 T20 H512 training on the Intel Xeon VM: ~700-1,500 a step, ~96 -> ~91 ms). As
    ``torch.cuda.empty_cache``: the kernels allocate again as they need."""
    return int(_C.release_scratch()) if _CPP_OP else 0


def scratch_bytes() -> int:
    """Bytes of scratch memory the C++ CPU kernels keep between calls (see ``empty_cache``)."""
    return int(_C.scratch_bytes()) if _CPP_OP else 0


def backend_info() -> dict:
    """Which backends are available here, and why the others are not (on a machine with a GPU,
    also why an available backend cannot run on it)."""
    info = {}
    for name in _backends.NAMES:
        info[name] = _backends.unavailable_reason(name) or "available"
        if info[name] == "available" and "cuda" in _backends.load(name).DEVICES and torch.cuda.is_available():
            why = _backends.device_unavailable(name, "cuda")
            if why is not None:
                info[name] = f"available, but not on CUDA tensors: {why}"
    return info


# ----------------------------------------------------------------------------------------------
# real kernels (CPU and CUDA dispatch keys)


def _c(t):
    return None if t is None else t.contiguous()


def _zero_state(x, w_hh):
    return x.new_zeros(x.shape[1], w_hh.shape[1])


def _autocast_off(device_type):
    """The op computes in its inputs' dtype, as its fake kernel says, autocast or not: inside it the
    Python backends' own products (torch.mm, F.linear) must not drop to bfloat16 / float16 (numba
    cannot take such results; the reference would return another dtype than the op declares)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _recurrence_kernel(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend):
    mode_i, _ = _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    _check_memory(*_named_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets))
    _check_length_values(lengths, x.shape[0])
    if h0 is None:
        h0 = _zero_state(x, w_hh)
    name, mod = _resolve(backend, x.device.type, x.dtype)
    _set_last(name)
    with _autocast_off(x.device.type):
        return mod.forward(_c(x), _c(h0), _c(w_ih), _c(w_hh), _c(b_ih), _c(b_hh), _c(lengths), _c(resets),
                           mode_i, bool(reset_after))


def _backward_kernel(grad_output, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, output,
                     workspace, mode, reset_after, backend):
    mode_i, width = _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    _check_backward_inputs(grad_output, grad_h_n, output, workspace, x, w_hh.shape[1], width)
    _check_memory(*_named_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets), ("grad_output", grad_output),
                  ("grad_h_n", grad_h_n), ("output", output), ("workspace", workspace))
    _check_length_values(lengths, x.shape[0])  # (as the forward and the C++ backward)
    if h0 is None:
        h0 = _zero_state(x, w_hh)
    name, mod = _resolve(backend, x.device.type, x.dtype)
    with _autocast_off(x.device.type):
        return mod.backward(_c(grad_output), _c(grad_h_n), _c(x), _c(h0), _c(w_ih), _c(w_hh), _c(b_ih),
                            _c(b_hh), _c(lengths), _c(resets), _c(output), _c(workspace), mode_i,
                            bool(reset_after))


for _key in ("CUDA",) if _CPP_OP else ("CPU", "CUDA"):
    _lib.impl("recurrence", _recurrence_kernel, _key)
    _lib.impl("recurrence_backward", _backward_kernel, _key)
for _key in ("CPU", "CUDA"):
    _lib.impl("recurrence_py", _recurrence_kernel, _key)
    _lib.impl("recurrence_backward_py", _backward_kernel, _key)


# ----------------------------------------------------------------------------------------------
# fake kernels (shape propagation for torch.compile / torch.export / meta tensors)


def _check_fake_backend(backend, x):
    """A forced backend that cannot run this is refused as by the real call (torch.compile and
    export would otherwise trace what fails when it runs). Meta tensors run nowhere: there only an
    unknown name, or a dtype the backend never runs, is refused."""
    if backend == "auto":
        return
    if x.device.type != "meta":
        _resolve(backend, x.device.type, x.dtype)
    elif backend not in _backends.NAMES or _backends.available(backend):
        if x.dtype not in _backends.load(backend).DTYPES:  # (load: ValueError for an unknown name)
            raise ValueError(f"rnnrec_fast: backend {backend!r} does not support {x.dtype}")


def _recurrence_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend):
    _, width = _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    _check_fake_backend(backend, x)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    return x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(T, B, width, dtype=_workspace_dtype(x.dtype))


def _backward_fake(grad_output, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, output,
                   workspace, mode, reset_after, backend):
    _, width = _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    _check_backward_inputs(grad_output, grad_h_n, output, workspace, x, w_hh.shape[1], width)
    _check_fake_backend(backend, x)
    G, H = w_hh.shape
    # contiguous, as every backend returns them (empty_like kept a transposed x's strides: inductor
    # then asserted on the real gradient's strides in a batch_first model's backward)
    return (x.new_empty(x.shape), x.new_empty(x.shape[1], H), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            x.new_empty(G), x.new_empty(G))


for _name in ("recurrence", "recurrence_py"):
    torch.library.register_fake(f"rnnrec_fast::{_name}", _recurrence_fake, lib=_lib)
for _name in ("recurrence_backward", "recurrence_backward_py"):
    torch.library.register_fake(f"rnnrec_fast::{_name}", _backward_fake, lib=_lib)

# ----------------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter.FlopCounterMode, which counts matrix products): the
# forward's are the input projection and the recurrent product of every step, 2*T*B*G*H*(I + H)
# (the steps past a row's length included); the backward's twice that (the input and weight
# gradients of both products), less the products the C++ kernel leaves out (the op's autograd on
# the CPU, for inputs requiring no gradient: _C.backward_skips): x's and W_ih's gradients one
# input projection each, W_hh's one recurrent product, h0's the first step's carry (dh . W_hh, the
# rows of W_hh that act on h_prev itself: all but Cho's W_hn, whose product the r gate needs)


def _forward_flops(x_shape, h0_shape, w_ih_shape, w_hh_shape, *args, **kwargs):
    T, B, I = x_shape
    GH, H = w_hh_shape
    return 2 * T * B * GH * (I + H)


def _backward_flops(grad_output_shape, grad_h_n_shape, x_shape, h0_shape, w_ih_shape, w_hh_shape,
                    *args, **kwargs):
    T, B, I = x_shape
    GH, H = w_hh_shape
    total = 2 * _forward_flops(x_shape, h0_shape, w_ih_shape, w_hh_shape)
    if not _CPP_OP:
        return total
    gx, gh0, gw_ih, gw_hh = _C.backward_skips()
    cho = GH == 3 * H and not args[7]  # (args: b_ih, b_hh, lengths, resets, y, ws, mode, reset_after)
    carry0 = 2 * B * (GH - H if cho else GH) * H
    return total - 2 * T * B * GH * (I * (gx + gw_ih) + H * gw_hh) - carry0 * gh0


try:
    from torch.utils.flop_counter import register_flop_formula as _register_flop_formula
except ImportError:  # pragma: no cover - older torch
    _register_flop_formula = None
if _register_flop_formula is not None:
    import torch.utils.flop_counter as _flop_counter

    for _packet, _formula in ((torch.ops.rnnrec_fast.recurrence, _forward_flops),
                              (torch.ops.rnnrec_fast.recurrence_backward, _backward_flops)):
        _wrapped = _register_flop_formula(_packet)(_formula)
        # torch 2.4 registers a packet's overloads while FlopCounterMode looks up the packet: the
        # op counted 0 there (newer torch registers the packet itself)
        _flop_counter.flop_registry.setdefault(_packet, _wrapped)

# ----------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend = inputs
    y, _, ws = output
    # The biases are not saved: the backward never reads them (their gradients are sums of the
    # gates' gradients), and a saved bias changed in place before backward() (a bias-only optimiser
    # step, a constraint) would raise there, where torch.nn's backward runs. A backward with
    # create_graph=True recomputes the forward, with them: they are held with their versions, which
    # only that backward checks (check_bias_versions).
    ctx.save_for_backward(x, h0, w_ih, w_hh, lengths, resets, y, ws)
    ctx.args = (mode, reset_after, backend, b_ih is not None, b_hh is not None)
    ctx.biases = (b_ih, b_hh)
    ctx.bias_versions = tuple(None if b is None or b.is_inference() else b._version for b in (b_ih, b_hh))
    # The workspace is saved state, not a result: no gradient flows into it, and autograd must not
    # materialise a zero (T, B, 4H) gradient for it (nor for an unused output / h_n) in backward.
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_h_n, _grad_ws, backward_op=None):
    x, h0, w_ih, w_hh, lengths, resets, y, ws = ctx.saved_tensors
    mode, reset_after, backend, has_b_ih, has_b_hh = ctx.args
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_h_n is None:
        grad_h_n = y.new_zeros(y.shape[1:])
    if backward_op is None and torch.is_grad_enabled():  # create_graph=True: a backward autograd records
        b_ih, b_hh = ctx.biases
        check_bias_versions((b_ih, b_hh), ctx.bias_versions)
        gx, gh0, gwi, gwh, gbi, gbh = torch.ops.rnnrec_fast.recurrence_backward_differentiable.default(
            grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after)
    else:
        gx, gh0, gwi, gwh, gbi, gbh = (backward_op or torch.ops.rnnrec_fast.recurrence_backward.default)(
            grad_y, grad_h_n, x, h0, w_ih, w_hh, None, None, lengths, resets, y, ws, mode, reset_after,
            backend)
    return (gx, None if h0 is None else gh0, gwi, gwh, gbi if has_b_ih else None, gbh if has_b_hh else None,
            None, None, None, None, None)


def _register_reverse_mode_autograd(name, backward, setup_context):
    """torch.library.register_autograd's Autograd kernel for ``rnnrec_fast::<name>``, behind a check
    that refuses forward-mode AD (refuse_forward_ad). torch's kernel redispatches below autograd
    where nothing requires grad, and a tangent alone requires none: every torch.func.jvp / jacfwd of
    a bare torch.ops call came back with zero tangents, no error. The tangents are visible only at
    this key (the kernels below see plain tensors)."""
    make = getattr(getattr(torch._library, "autograd", None), "make_autograd_impl", None)
    if make is None:  # (a torch without it: its public registration, tangents unchecked)
        torch.library.register_autograd(f"rnnrec_fast::{name}", backward, setup_context=setup_context)
        return
    kernel = make(getattr(torch.ops.rnnrec_fast, name).default, torch._library.autograd.Info(backward, setup_context))
    what = f"rnnrec_fast::{name}"

    def autograd_kernel(keyset, *args):
        if _forward_ad._current_level >= 0:
            refuse_forward_ad(what, *args)
        return kernel(keyset, *args)
    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


_register_reverse_mode_autograd("recurrence", _backward, _setup_context)


def check_bias_versions(biases, versions):
    """A bias changed in place since the forward is refused by a backward that recomputes the
    forward (as autograd refuses a saved tensor changed in place): it would differentiate another
    function."""
    for name, b, v in zip(("b_ih", "b_hh"), biases, versions):
        if b is not None and v is not None and b._version != v:  # (None: no counter, an inference tensor)
            raise RuntimeError(
                f"rnnrec_fast: {name} of a recurrence was modified by an inplace operation (version {v} -> "
                f"{b._version}) between its forward and a backward with create_graph=True, which recomputes "
                "the forward with it; change it after the backward, or out of place")


def _reference_recompute(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after):
    """The op's outputs (y, h_n, workspace) recomputed by the reference backend, the op's
    specification in torch operations, which autograd and torch.func differentiate in either mode
    and to any order. What the kernels never read stays out of it, so that a NaN there gives no NaN
    derivative: x past a row's length (zeros), and the h0 of a row of length 0 (zeros; its h_n is
    h0 itself)."""
    T, B, _ = x.shape
    state = h0 if h0 is not None else x.new_zeros(B, w_hh.shape[1])
    empty = None
    state_in = state
    if lengths is not None:
        x = x.masked_fill(~_reference._active_mask(lengths, T, B, x.device), 0.0)
        empty = (lengths.to(x.device) == 0).unsqueeze(1)
        state_in = state.masked_fill(empty, 0.0)
    y, h_n, ws = _reference.forward(x, state_in, w_ih, w_hh, b_ih, b_hh, lengths, resets, MODES[mode], reset_after)
    if empty is not None:
        h_n = torch.where(empty, state, h_n)
    return y, h_n, ws


def _constant_of_the_trace(fn):
    """torch.compiler.assume_constant_result(fn) (dynamo calls fn while tracing and puts its
    result in the graph as a constant) without its import of torch._dynamo, which imports sympy
    (~0.3 s of `import rnnrec_fast`): the mark it sets (tests/test_compile.py checks that they agree)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_of_the_trace
def _reference_backend_check(backend, device_type, dtype):
    """_reference_op's backend check and last_backend(): at every eager call, and once where dynamo
    traces it (a constant of the trace: dynamo cannot trace the backends' loading lock)."""
    _resolve(backend, device_type, dtype)
    _set_last("reference")
    return True


def _reference_op(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend):
    """The op as torch operations (_reference_recompute), with the op's checks, where its own
    autograd cannot serve: forward-mode AD (a tangent on an input: torch.func.jvp, jacfwd, hessian,
    torch.autograd.forward_ad) and torch.func's reverse transforms nested (grad(grad(f)),
    jacrev(jacrev(f))). The modules and ``recurrence`` call it there (op_for); correct to any order,
    not fast (a Python loop over the steps); last_backend() says 'reference'. A forced backend is
    still checked (refused where it cannot run these tensors)."""
    _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    _check_length_values(lengths, x.shape[0])
    _reference_backend_check(backend, x.device.type, x.dtype)
    with _autocast_off(x.device.type):
        return _reference_recompute(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after)


def _backward_differentiable(grad_y, grad_h_n, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after):
    """The op's backward as operations autograd records, for a backward taken with
    create_graph=True (a gradient penalty, a Hessian-vector product, second-order meta-learning):
    the forward recomputed in torch operations (_reference_recompute), on any device, and
    differentiated with create_graph=True, so that its gradients are differentiable again (to any
    order). Gradients of inputs that require none come back as zeros (the caller drops them). A
    Python loop over the steps: slow, as a second derivative of torch.nn's CPU GRU is.

    Each input requiring a gradient enters the recomputation as an alias of its own (a view), and
    the gradient taken is the alias's: an argument's own, as the kernels give it, where one tensor is
    passed twice (tied weights) or one input is computed from another (h0 from x), whose total
    derivatives would count the shared paths twice."""
    check_tensor_args("rnnrec_fast.recurrence", (("grad_output", grad_y), ("grad_h_n", grad_h_n)))
    # (public as the other two: the same checks, though autograd passes what the forward checked)
    _check_inputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode)
    B = x.shape[1]
    H = w_hh.shape[1]
    _check_grads(grad_y, grad_h_n, x, H)
    _check_length_values(lengths, x.shape[0])
    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
    want = [t is not None and t.requires_grad for t in inputs]
    out = [None] * 6
    if any(want):
        with torch.enable_grad(), _autocast_off(x.device.type):
            alias = [t.view_as(t) if w else t for t, w in zip(inputs, want)]
            y, h_n, _ = _reference_recompute(*alias, lengths, resets, mode, reset_after)
            wrt = [a for a, w in zip(alias, want) if w]
            got = iter(torch.autograd.grad((y, h_n), wrt, (grad_y, grad_h_n), create_graph=True, allow_unused=True))
            out = [next(got) if w else None for w in want]
    G = w_hh.shape[0]
    likes = (x, x.new_empty(B, H), w_ih, w_hh, w_hh.new_empty(G), w_hh.new_empty(G))
    return tuple(torch.zeros_like(like) if g is None else g for g, like in zip(out, likes))


_lib.impl("recurrence_backward_differentiable", _backward_differentiable, "CompositeImplicitAutograd")


def _backward_is_not_differentiable(ctx, *grads):
    raise NotImplementedError("rnnrec_fast: rnnrec_fast::recurrence_backward is not differentiable: second "
                              "derivatives through torch.func's transforms of a bare call of the op are not "
                              "supported; rnnrec_fast.recurrence and the modules give them (they run the op's "
                              "torch operations there), and so does an eager backward with create_graph=True")


if not _CPP_OP:  # (the extension registers the same in C++: csrc/rnnrec_op.cpp, RecurrenceBackwardFn)
    _register_reverse_mode_autograd("recurrence_backward", _backward_is_not_differentiable,
                                    lambda ctx, inputs, output: None)


# torch.func's autograd-based transforms (grad, vjp, jacrev, also with vmap; jvp / jacfwd for the
# calls that carry no tangent) refuse both registered autograd kernels: a C++ autograd function
# ("cannot use C++ torch::autograd::Function with functorch transforms") and torch.library's (an
# old-style autograd.Function: "must override the setup_context staticmethod"). The modules and
# ``recurrence`` call the op through these two instead while such a transform is active: functorch
# runs their forward one level down (plain tensors, below the transform: the registered kernels
# serve it) and their backward at the transform's level. vmap runs them through the op's
# per-sample fallback (generate_vmap_rule).


class _FuncRecurrenceBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.rnnrec_fast.recurrence_backward.default(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _backward_is_not_differentiable(ctx, *grads)


class _FuncRecurrence(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.rnnrec_fast.recurrence.default(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        # (zeros for the unused gradients: torch 2.4's vmap of the backward fails on a None one)
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_ws):
        return _backward(ctx, grad_y, grad_h_n, grad_ws, _FuncRecurrenceBackward.apply)

    @staticmethod
    def jvp(ctx, *tangents):  # (op_for sends calls with tangents to _reference_op: a tangent missed there)
        raise _forward_ad_error("rnnrec_fast::recurrence")


def _func_recurrence(*args):
    if not torch.is_grad_enabled():
        # functorch runs an autograd function's forward with grad mode on at the levels below the
        # transform: under a no_grad inside it the call would be recorded there (for the weights
        # of an outer backward), where torch.nn's operations record nothing. detach() reaches
        # every level.
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    return _FuncRecurrence.apply(*args)


_AUTOGRAD_TRANSFORMS = (_TransformType.Grad, _TransformType.Jvp)


def _grad_transform_active(name=None):
    """Whether one of torch.func's autograd-based transforms is active: grad / vjp / jacrev, or
    jvp / jacfwd (whose level refuses the registered kernels too, also for a call on tensors it
    does not track, where the autograd function runs and torch.nn's answer comes back; a call a
    tangent reaches goes to _reference_op instead: op_for). With ``name``, functionalize around or
    inside one raises:
    torch has no functionalize rule for an autograd function."""
    stack = torch._C._functorch.get_interpreter_stack()  # (None when empty)
    if not stack:
        return False
    keys = [i.key() for i in stack]
    if not any(k in _AUTOGRAD_TRANSFORMS for k in keys):
        return False
    if name is not None and _TransformType.Functionalize in keys:
        raise NotImplementedError(
            f"{name}: torch.func.functionalize combined with torch.func.grad, vjp, jacrev or jvp is not "
            "supported by rnnrec_fast::recurrence (torch has no functionalize rule for the autograd "
            "function those transforms run it through); use either transform alone, or convert the "
            "model with rnnrec_fast.to_torch(model)")
    return True


@_constant_of_the_trace
def _grad_transform_traced():
    """_grad_transform_active() read once while dynamo traces (it cannot trace the interpreter
    stack): the transforms a traced call is nested in are fixed by the traced code, and dynamo
    guards a compiled frame on the stack it was entered with."""
    return _grad_transform_active()


def _vmap_active():
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(i.key() == _TransformType.Vmap for i in stack)


def _reference_needed(tensors):
    """Whether a call on ``tensors`` needs derivatives the op's autograd does not give: a tangent on
    one of them (forward-mode AD: torch.func.jvp, jacfwd, torch.autograd.forward_ad), or torch.func
    transforms nested around it, two reverse ones (grad(grad(f)), jacrev(jacrev(f))) or a forward one
    and a reverse one (hessian = jacfwd(jacrev(f)); also torch.func.grad inside a forward_ad
    dual_level): inside a reverse level the tangents of a forward one are not visible, so such a
    nesting counts whether or not a tangent reaches the call."""
    stack = torch._C._functorch.get_interpreter_stack()
    if stack:
        keys = [i.key() for i in stack]
        grads = keys.count(_TransformType.Grad)
        if grads >= 2 or (grads and (_forward_ad._current_level >= 0 or _TransformType.Jvp in keys)):
            return True
    return _has_tangent(tensors)


def op_for(name, *tensors):
    """The recurrence op a module or ``recurrence`` calls with ``tensors``:
    ``torch.ops.rnnrec_fast.recurrence.default`` (while compiling too: dynamo traces the op, but
    inside a forward-mode level, torch.compile(jvp(f)) or jacfwd, which dynamo traces, it takes
    _reference_op whether or not a tangent reaches the call: the op there met a wrapped tensor
    torch refuses, and reading a tangent of a vmap-batched tensor fails in dynamo's fake run; so it
    does inside torch.func.grad, vjp or jacrev that dynamo traces (torch.compile(grad(f))), where
    the op's registered autograd is refused at the transform's level and dynamo cannot trace the
    autograd function: _grad_transform_traced, a constant of the trace);
    _reference_op, the op in torch operations, where a derivative its autograd does not give is
    wanted (_reference_needed: forward mode, nested reverse transforms); or while one of torch.func's
    autograd-based transforms is active, the autograd function above, which they run."""
    if torch.compiler.is_compiling():
        if _forward_ad._current_level >= 0 or _grad_transform_traced():
            return _reference_op
        return torch.ops.rnnrec_fast.recurrence.default
    if _reference_needed(tensors):
        return _reference_op
    return _func_recurrence if _grad_transform_active(name) else torch.ops.rnnrec_fast.recurrence.default


# ----------------------------------------------------------------------------------------------
# the Python entry point


def as_index_tensor(name, what, value, device):
    """``value`` (lengths or resets: a tensor or a sequence) as a tensor on ``device``; a meta
    tensor, which has no values to read, is refused by name (torch: 'Cannot copy out of meta
    tensor'), as is what torch cannot make a tensor of (a str, a tuple of tensors)."""
    if isinstance(value, torch.Tensor):
        if value.is_meta and device.type != "meta":
            where = "the CPU" if device.type == "cpu" else f"the CPU or {device}"
            raise ValueError(f"{name}: {what} is a meta tensor (no values to read); give it on {where}")
        return value.to(device)
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        if "Overflow" in str(exc):  # (a list of ints is taken: one of them is past int64)
            raise ValueError(f"{name}: {what} holds a value outside int64's range ({exc})") from None
        raise TypeError(f"{name}: {what} must be a tensor or a sequence of numbers, got "
                        f"{type(value).__name__} ({exc})") from None


# ----------------------------------------------------------------------------------------------
# ONNX export: torch.nn's own operators, which torch.onnx's exporters translate

_MODE_KEYS = getattr(torch._C, "_TorchDispatchModeKey", None)
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is capturing this call: the trace of its TorchScript-based exporter,
    or the torch.export capture of the newer one, non-strict (fake tensors) or the strict one (dynamo)
    it falls back to when that fails. The exporters' flag is process-wide: an eager call of another
    thread meanwhile is neither traced nor under a fake tensor mode (thread-local both), nor
    exporting, but a trace or torch.export (strict or not) of another thread's at the very moment of
    an export cannot be told from the export's own (it takes torch.nn's operators too). torch.onnx is
    imported by its user, not by torch; the thread-local checks come first (is_in_onnx_export()
    costs ~2 us a call)."""
    if _is_dynamo_compiling():
        # (dynamo folds is_in_onnx_export() to False: it reads the newer exporter's flag as a global,
        # which it guards on; a torch.compile outside an export is not exporting)
        return _is_exporting() and _onnx_exporter_flag()
    if not (torch.jit.is_tracing()
            or (_MODE_KEYS is not None and torch._C._get_dispatch_mode(_MODE_KEYS.FAKE) is not None)):
        return False
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: True)  # (torch < 2.5: the flag alone)


def _onnx_exporter_flag() -> bool:
    """The torch.export-based exporter's flag (torch.onnx._internal: False where it is not there)."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and bool(getattr(flags, "_is_onnx_exporting", False))


def refuse_for_onnx(name, mode, reset_after, resets=None, lengths=None, packed=False):
    """What torch.nn's operators cannot express under torch.onnx.export, refused by name."""
    if resets is not None:
        raise ValueError(f"{name}: resets cannot be exported to ONNX (its GRU and RNN operators restart no "
                         "state within a sequence); export the model called without them")
    if lengths is not None:
        raise ValueError(f"{name}: lengths cannot be exported to ONNX from the op; give the modules a "
                         "PackedSequence (pack_padded_sequence), which exports as ONNX's sequence lengths")
    if mode == "gru" and not reset_after:
        raise ValueError(f"{name}(reset_after=False), the original GRU form, cannot be exported to ONNX: the "
                         "exporters translate torch.nn's GRU, whose form is reset_after=True")
    if packed and not torch.jit.is_tracing():  # (torch.export makes a PackedSequence's batch_sizes data)
        raise ValueError(f"{name}: a PackedSequence cannot be exported by torch.onnx.export's torch.export-based "
                         "exporter (dynamo=True; nor can torch.nn's modules): export with dynamo=False, which gives "
                         "ONNX's sequence lengths, or give the padded input")


def _torch_layer(x, h0, w_ih, w_hh, b_ih, b_hh, mode):
    """One layer, one direction, on torch.nn's operator (torch._VF.gru / rnn_tanh / rnn_relu)."""
    if h0 is None:
        h0 = torch.zeros(x.shape[1], w_hh.shape[1], dtype=x.dtype, device=x.device)
    biased = b_ih is not None or b_hh is not None
    weights = [w_ih, w_hh] + ([torch.zeros_like(b_hh) if b_ih is None else b_ih,
                               torch.zeros_like(b_ih) if b_hh is None else b_hh] if biased else [])
    y, h_n = getattr(torch._VF, mode)(x, h0.unsqueeze(0), weights, biased, 1, 0.0, False, False, False)
    return y, h_n[0]


def recurrence(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, resets=None, mode="gru",
               reset_after=True, backend="auto"):
    """Run one recurrent layer (one direction) over a whole sequence.

    Args:
        x: (T, B, I) input.  h0: (B, H) initial state, or None for zeros.
        w_ih: (G*H, I), w_hh: (G*H, H), b_ih / b_hh: (G*H,) or None; G = 3 for ``"gru"`` (rows r, z, n,
            as in ``torch.nn.GRU``), 1 for ``"rnn_tanh"`` / ``"rnn_relu"``.
        lengths: optional (B,) valid lengths; steps past a row's length leave its state unchanged and
            write zeros to the output.
        resets: optional (T, B) bool; ``resets[t, b]`` zeroes row b's state before step t.
        reset_after: GRU form; True is PyTorch's / cuDNN's, False the original (Cho et al. 2014).
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"numba"`` or ``"reference"``.

    Returns:
        ``(output (T, B, H), h_n (B, H))``.
    """
    check_tensor_args("rnnrec_fast.recurrence", (("x", x), ("w_ih", w_ih), ("w_hh", w_hh)),
                      (("h0", h0), ("b_ih", b_ih), ("b_hh", b_hh)))
    if lengths is not None:
        lengths = as_index_tensor("rnnrec_fast.recurrence", "lengths", lengths, x.device)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            _fail(f"lengths must hold integers, got {lengths.dtype}")
        lengths = lengths.to(torch.int64)
    if resets is not None:
        resets = as_index_tensor("rnnrec_fast.recurrence", "resets", resets, x.device)
        if resets.dtype != torch.bool:
            raise ValueError(f"rnnrec_fast.recurrence: resets must be a bool tensor, got {resets.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"rnnrec_fast.recurrence: backend must be one of {BACKENDS}, got {backend!r}")
    if onnx_exporting() and mode in MODES:  # (the recommender's layer loops call this)
        refuse_for_onnx("rnnrec_fast.recurrence", mode, reset_after, resets, lengths)
        return _torch_layer(x, h0, w_ih, w_hh, b_ih, b_hh, mode)
    op = op_for("rnnrec_fast.recurrence", x, h0, w_ih, w_hh, b_ih, b_hh)
    y, h_n, _ = op(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend)
    return y, h_n

"""Drop-in ``RNN``, ``GRU``, ``RNNCell`` and ``GRUCell`` running on the fused ``rnnrec_fast`` op.

Same constructor arguments, forward signature, outputs, parameter names, shapes, initialisation and
``state_dict`` as their ``torch.nn`` namesakes, plus two keywords: ``backend`` (``"auto"``, ``"cpp"``,
``"cuda"``, ``"numba"``, ``"reference"``) and, on the GRU classes, ``reset_after``.
They deliberately do not subclass ``torch.nn.RNNBase``: ``torch.compile`` refuses those.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.autograd import forward_ad as _forward_ad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils._device import DeviceContext as _DeviceContext

from . import ops
from .backends import reference

_BACKENDS = ops.BACKENDS

try:  # the C++ inference fast path (csrc/rnnrec_cpu.cpp: infer, InferPlan); None without the extension
    from ._C import InferPlan as _InferPlan, pad_packed_sorted as _pad_packed_sorted
    from ._C import unpad_packed_sorted as _unpad_packed_sorted
    from ._C import pad_packed_autograd as _pad_packed_autograd, unpad_packed_autograd as _unpad_packed_autograd
    from ._C import reverse_padded as _reverse_padded, reverse_padded_autograd as _reverse_padded_autograd
except Exception:  # (as ops.py: not built, or failed to load)
    _InferPlan = _pad_packed_sorted = _unpad_packed_sorted = _pad_packed_autograd = _unpad_packed_autograd = None
    _reverse_padded = _reverse_padded_autograd = None
_FAST_BACKENDS = ("auto", "cpp")

_is_compiling = torch.compiler.is_compiling
# The C++ shortcut in _FastPath.__call__ needs only dynamo's test (dynamo traces that Python code
# and must not reach the C++ call; the classes' C++ call slot runs only for eager calls, which
# dynamo does not trace); under the other tracers (non-strict torch.export, make_fx) the
# inputs are fake or a dispatch mode is on, and the C++ call declines by itself. A third of the
# cost of is_compiling, which also asks torch.jit.is_scripting (~60 ns of a ~7 us serving step).
_is_dynamo_compiling = ops._is_dynamo_compiling

# torch's own nn.Module.__call__ and the _call_impl it calls: where a user has patched either (a
# global call wrapper, for logging, tracing or NaN checks), or a subclass or the instance has its
# own _call_impl, the fast path declines so that the wrapper sees every call, as with torch.nn's
# modules
_TORCH_MODULE_CALL = nn.Module.__dict__.get("_wrapped_call_impl", nn.Module.__dict__["__call__"])
_TORCH_CALL_IMPL = nn.Module.__dict__["_call_impl"]


def _torch_module_call(module):
    return (nn.Module.__dict__.get("__call__") is _TORCH_MODULE_CALL and type(module)._call_impl is _TORCH_CALL_IMPL
            and "_call_impl" not in module.__dict__)


_PY_FAST_BACKENDS = ("auto", "numba", "reference")


def _calls_observed():
    """Something must see the op's call, so the fast paths decline: a torch function mode (a
    FlopCounter, a debug or logging mode) or forward-mode AD (inside ``forward_ad.dual_level()``
    the op's call raises torch's error for it; a fast path dropped the tangents: silently wrong).
    torch's own DeviceContext (``with torch.device(...)``, ``torch.set_default_device``) only
    redirects factory calls and is ignored: declining for it would make every call there take the
    general path (8 -> ~95 us a click)."""
    return _forward_ad._current_level >= 0 or (torch._C._is_torch_function_mode_enabled() and any(
        not isinstance(m, _DeviceContext) for m in torch.overrides._get_current_function_mode_stack()))


# torch.func's wrappers (vmap's batched tensors, ...) have no storage of their own: no fast path
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
# and none inside a torch.func transform at all: a grad / jvp level wraps what every ATen call makes
# there, plain inputs or not (the Python plan's detach() of a weight, the C++ plan's transposed copy of
# a batch_first input), and a wrapper's memory cannot be read ("Cannot access data pointer of Tensor
# that doesn't have storage" for a no_grad call on untracked tensors inside torch.func.grad)
_peek_transform = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


def _plain_memory(t):
    """t's values are its memory as the Python fast path reads them: strided, no negative bit (a
    lazily negated view), not an efficient zero tensor (no memory). The op's dispatcher resolves
    both; other layouts get the module's error. (Whether all of it is there, not freed or shrunk,
    is ops.within_storage: checked for each input, and for a weight when its view is made.)"""
    return t.layout == torch.strided and not t.is_neg() and not t._is_zerotensor()


def _unrecorded(a, b=None):
    """Plain tensors a (and b, when given), and nothing records the call: no torch.jit.trace, torch
    dispatch mode or profiler, no torch.func wrapper or transform. Only then may a kernel that is not the
    registered op (the Python plans, GRU4Rec.score's few-rows kernel) run instead of it. (Compiling
    and function modes are checked where the fast paths are tried.)"""
    return (type(a) is torch.Tensor and (b is None or type(b) is torch.Tensor)
            and torch._C._get_tracing_state() is None and not torch._C._len_torch_dispatch_stack()
            and not torch.autograd._profiler_enabled()
            and not _functorch_wrapped(a) and (b is None or not _functorch_wrapped(b))
            and _peek_transform() is None)


def _cpp_copy_ok(a, b=None):
    """Whether a C++ copy (_C.reverse_padded, pad_packed_sorted, unpad_packed_sorted and their
    autograd forms) may stand in for ATen's index ops on CPU tensors a (and b): nothing compiles,
    observes or records the call (a trace, mode, profiler or torch.func transform must see ATen's
    calls). The callers check the extension, the device and the dtype."""
    return not _is_compiling() and not _calls_observed() and _unrecorded(a, b)


# The op's mode of a module's ``mode``: torch.nn's names on the sequence modules ("GRU", "RNN_TANH",
# "RNN_RELU"), the op's own on the cells (which torch.nn gives no ``mode``) and in modules pickled
# before the sequence modules took torch.nn's names.
_OP_MODES = {"GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu",
             "gru": "gru", "rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu"}


class _PyInferPlan:
    """The inference fast path for the Python backends (numba, reference) on CPU tensors: the role
    of _C.InferPlan for modules whose calls do not run on the C++ kernels (backend="numba" or
    "reference", or "auto" without the extension). It calls the backend directly: no dispatcher
    round trip to the op's Python kernel and none of the general path's reshaping. For numba it
    works on NumPy views (a torch view op costs ~1 us from Python here, NumPy's ~0.2), keeps the
    views of the weights while each weight is the same tensor on the same memory (in-place
    updates show through them; the module drops them when a parameter is reassigned or deleted,
    and a weight whose memory was swapped through .data is released at the next call), writes
    the outputs in place and keeps no workspace (a B=1, T=1, H=100 GRU call: 92 -> ~47 us here,
    torch.nn ~70; the rest is mostly Python and numba's dispatch). Declines (None) calls with
    autograd on and what InferPlan declines (torch.jit.trace, a torch dispatch mode, non-plain
    tensors, other devices and dtypes, missing or mis-shaped weights, shapes that do not
    fit), and also the profiler (InferPlan records its call as an event named after the op instead),
    unbatched inputs, autocast and torch.func's wrapped tensors (vmap); the general path then runs,
    and raises the errors. (A torch function mode is checked by the module before
    either plan: _calls_observed.)"""

    __slots__ = ("params", "names", "mode", "mode_i", "reset_after", "layers", "batch_first", "cell",
                 "backend", "gates", "views")

    def __init__(self, params, names, mode, reset_after, layers, batch_first, cell, backend):
        self.params, self.names, self.mode, self.mode_i = params, list(names), mode, ops.MODES[mode]
        self.reset_after, self.layers, self.batch_first, self.cell = bool(reset_after), layers, batch_first, cell
        self.backend, self.gates = backend, 3 if mode == "gru" else 1
        self.views = [None] * len(self.names)  # (weight, its data_ptr, dtype, NumPy view) per weight

    def __call__(self, input, hx=None):
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not _unrecorded(input, hx):
            return None
        dt = input.dtype
        if (not input.is_cpu or dt not in (torch.float32, torch.float64) or not _plain_memory(input)
                or not ops.within_storage(input)
                or (hx is not None and not (_plain_memory(hx) and ops.within_storage(hx)))):
            return None
        cell = self.cell
        if input.dim() != (2 if cell else 3):
            return None
        try:
            name, backend = ops._resolve(self.backend, "cpu", dt)
        except (RuntimeError, ValueError):
            return None
        if name not in ("numba", "reference"):
            return None
        shape = input.shape
        if cell:
            T, (B, I) = 1, shape
        else:
            T, B, I = (shape[1], shape[0], shape[2]) if self.batch_first else shape
        p, L = self.params, self.layers
        w = [p.get(n) for n in self.names]
        per = len(w) // L
        w_hh0 = w[1]
        if T == 0 or B == 0 or I == 0 or w_hh0 is None or w_hh0.dim() != 2:
            return None
        H = w_hh0.shape[1]
        GH = self.gates * H
        for i, t in enumerate(w):
            if (t is None or (type(t) is not nn.Parameter and type(t) is not torch.Tensor) or t.dtype != dt
                    or not t.is_cpu or _functorch_wrapped(t) or not _plain_memory(t)):
                return None  # (a tensor subclass: its own dispatch must see the op's call)
            k = i % per
            if t.shape != ((GH, I if i < per else H) if k == 0 else (GH, H) if k == 1 else (GH,)):
                return None
        if hx is not None and (hx.dtype != dt or not hx.is_cpu or hx.layout != torch.strided
                               or hx.shape != ((B, H) if cell else (L, B, H))):
            return None
        if name == "numba":
            out = self._numba(backend, input, hx, w, T, B, H)
        elif all(ops.within_storage(t) for t in w):
            out = self._reference(backend, input, hx, w, B, H)
        else:
            return None
        if out is not None:
            ops._set_last(name)
        return out

    def _reference(self, backend, input, hx, w, B, H):
        cell, L = self.cell, self.layers
        per = len(w) // L
        x = input.unsqueeze(0) if cell else input.transpose(0, 1) if self.batch_first else input
        hs = []
        for l in range(L):
            lw = w[l * per:(l + 1) * per]
            b_ih, b_hh = (lw[2].contiguous(), lw[3].contiguous()) if per == 4 else (None, None)
            h0 = x.new_zeros(B, H) if hx is None else hx if cell else hx[l]
            x, h_n, _ = backend.forward(x.contiguous(), h0.contiguous(), lw[0].contiguous(),
                                        lw[1].contiguous(), b_ih, b_hh, None, None, self.mode_i,
                                        self.reset_after)  # (contiguous: the op's rounding)
            hs.append(h_n)
        if cell:
            return hs[0]
        # h_n in place, as the general path's: no view (`h_n.detach_()` between chunks works; the
        # backend's h_n is a tensor of its own)
        return (x.transpose(0, 1) if self.batch_first else x), (hs[0].unsqueeze_(0) if L == 1 else torch.stack(hs))

    def forget(self):
        """Drops the views of the weights (their module replaced or removed one)."""
        self.views = [None] * len(self.names)

    def _arrays(self, w):
        """C-contiguous NumPy views of the weights (copies of non-contiguous ones, not kept); None
        where a weight reaches past its storage (freed or shrunk: the op refuses it). A kept view is
        of the same tensor at the same address and of the same shape: a storage resized since has
        moved (resize_ copies into new memory while the old is still held); set_ onto the same
        storage, or .data = a view of it, keeps the address and may change the shape."""
        views = self.views
        out = []
        for i, t in enumerate(w):
            v = views[i]
            if (v is not None and v[0] is t and v[1] == t.data_ptr() and v[2] is t.dtype
                    and v[3].shape == t.shape and t.is_contiguous()):
                out.append(v[3])
                continue
            if not ops.within_storage(t):
                return None
            a = t.detach().contiguous().numpy()
            if t.is_contiguous():
                views[i] = (t, t.data_ptr(), t.dtype, a)
            out.append(a)
        return out

    def _numba(self, backend, input, hx, w, T, B, H):
        cell, L, bf = self.cell, self.layers, self.batch_first
        dt = input.dtype
        arrays = self._arrays(w)
        if arrays is None:
            return None
        per = len(arrays) // L
        x = (input.detach() if input.requires_grad else input).numpy()
        x = x[None] if cell else x.transpose(1, 0, 2) if bf else x
        h = None if hx is None else (hx.detach() if hx.requires_grad else hx).numpy()
        # the outputs: torch tensors (inference tensors under inference_mode, as torch.nn's), the
        # kernels writing into their NumPy views; the last layer's y is written in the layout
        # returned where (T, B, H) and (B, T, H) order the memory alike (T = 1 or B = 1)
        # (on the CPU, as the inputs: not a default device that torch.set_default_device set)
        h_n = torch.empty((B, H) if cell else (L, B, H), dtype=dt, device="cpu")
        hv = h_n.numpy()
        y = yv = None
        if not cell:
            if bf and (T == 1 or B == 1):
                y = torch.empty(B, T, H, dtype=dt, device="cpu")
                yv = y.numpy().reshape(T, B, H)
            else:
                y = torch.empty(T, B, H, dtype=dt, device="cpu")
                yv = y.numpy()
        layers = [tuple(arrays[l * per:(l + 1) * per]) + ((None, None) if per == 2 else ()) for l in range(L)]
        h0 = [None] * L if h is None else [h] if cell else h
        backend.run_layers_cpu(x, h0, layers, self.mode_i, self.reset_after, [hv] if cell else hv, yv)
        if cell:
            return h_n
        return (y.transpose(0, 1) if bf and T > 1 and B > 1 else y), h_n


class _FastPath(nn.Module):
    """The modules' inference fast path: ``self._plan`` is a ``_C.InferPlan`` bound to this
    module's parameter dict and configuration, or for the Python backends a ``_PyInferPlan``
    (None where no path applies: backend "cuda", a bidirectional module on a Python backend). A
    call tries it first (the plan itself declines calls under torch.jit.trace, on non-plain
    tensors, other dtypes or devices, or whatever it does not handle exactly as the general path
    would; the Python plans also those with autograd on); it is never tried while torch.compile /
    torch.export trace the call (they must see the op). The C++ plan of a sequence module also
    takes a PackedSequence (rnnrec_cpu.cpp, infer_packed: the packed branch of forward in one call),
    and a call that autograd records it makes as forward would: forward's op calls and views
    (and for a PackedSequence its padding and, bidirectional, its per-row reversal), made from C++
    (train_impl, train_packed: the same graph, outputs and gradients, without forward's Python). The plan
    reads the parameters from the dict at every call, so reassigned, reloaded or swapped
    parameters are seen at once; it is rebuilt when an attribute it depends on changes."""

    _plan_config = frozenset()

    def _plan_args(self):  # (weight names, layers, batch_first, cell) of this module's call
        raise NotImplementedError

    @property
    def _op_mode(self):
        return _OP_MODES[self.mode]

    def _refresh_plan(self):
        plan = None
        args = self._plan_args()  # (None: no fast path for this configuration)
        names, layers, batch_first, cell = args or (None, 0, False, False)
        bidirectional = getattr(self, "bidirectional", False)
        if args is None:
            pass
        elif _InferPlan is not None and self.backend in _FAST_BACKENDS:
            plan = _InferPlan(self._parameters, names, ops.MODES[self._op_mode], self.reset_after, layers,
                              batch_first, cell, 2 if bidirectional else 1, self.backend)
        elif self.backend in _PY_FAST_BACKENDS and not bidirectional:
            plan = _PyInferPlan(self._parameters, names, self._op_mode, self.reset_after, layers,
                                batch_first, cell, self.backend)
        self.__dict__["_plan"] = plan
        # the C++ plan also takes the module's whole call, its checks included (see __call__)
        self.__dict__["_module_call"] = getattr(plan, "module_call", None)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._plan_config and "_plan" in self.__dict__:
            self._refresh_plan()
        elif name in self.__dict__.get("_parameters", ()):
            self._forget_weights()
            # (after construction) a weight of other sizes than the module's declines the plan, so
            # that the general path raises as torch.nn's call does; one that fits again brings it back
            if "_plan" in self.__dict__ and (self.__dict__["_plan"] is None or not self._weights_fit_sizes()):
                self._refresh_plan()

    def __delattr__(self, name):
        super().__delattr__(name)
        self._forget_weights()

    def _weights_fit_sizes(self):
        """Whether the registered weights have the shapes the module's sizes say (a weight replaced
        by one of another size makes the call raise, as torch.nn's does; see _plan_args)."""
        return True

    def _forget_weights(self):
        # a Python plan's views of replaced or removed weights would keep their memory alive
        forget = getattr(self.__dict__.get("_plan"), "forget", None)
        if forget is not None:
            forget()

    def __call__(self, *args, **kwargs):
        # The fast path ahead of torch.nn.Module's call machinery, taken only where that machinery
        # would call forward straight away (no hooks of any kind, no module.compile(), no patched
        # nn.Module.__call__ (a user's wrapper must see the call, as with torch.nn); a call under
        # torch.jit.trace is declined by the plan) and forward would take the fast path itself (no
        # resets, no training-mode dropout, not compiling). On a serving step this saves two Python
        # frames and forward's checks (about 2 of the 8 µs of a GRU call on the machine here);
        # everything else goes through nn.Module.__call__ as usual (looked up at call time, so a
        # patched one is honoured), but for torch.fx's symbolic tracing, which records a leaf node.
        # A forward of the user's (a subclass's, or one set on the instance, as wrappers do) is
        # always called: the shortcut would skip it.
        # Calls of the four public classes' instances normally start in the classes' C++ call slot
        # (_C.install_call_slot, at the end of this module), which does the first lines below in
        # C++ and goes on to _call_after as they do; they come here where CPython has reset the
        # slot (a class's __call__ assigned, then deleted: mock.patch.object), and put it back.
        tried = None
        # (compiling is asked first: torch 2.6's dynamo fails on reading the C++ plan's bound method)
        module_call = None if kwargs or _is_dynamo_compiling() else self.__dict__.get("_module_call")
        if module_call is not None:
            cls = type(self)
            if cls in _CALL_SLOT_CLASSES and not _has_call_slot(cls) and cls.__call__ is _FASTPATH_CALL:
                _install_call_slot((cls,), _FASTPATH_CALL, _FastPath._call_after)
            tried = module_call(self, args)  # the checks of _call_after's Python plan branch, in C++
            if tried is not None and tried is not NotImplemented:
                return tried
        return self._call_after(args, kwargs, tried)

    def _call_after(self, args, kwargs, tried):
        """The module's call after the C++ plan's module_call: ``tried`` is what it returned (None:
        declined, or not tried; NotImplemented: only a torch function mode stood in its way)."""
        d = self.__dict__
        if tried is NotImplemented:
            out = None if _calls_observed() else d["_plan"](*args)
            if out is not None:
                return out
        # (compiling is asked before the C++ plan is read: torch 2.6's dynamo fails on its methods)
        plan = None if _is_compiling() or d.get("_module_call") is not None else d.get("_plan")
        if (plan is not None and not kwargs and 0 < len(args) <= 2
                and type(self).forward in _OWN_FORWARDS and "forward" not in d
                and d.get("_compiled_call_impl") is None
                and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                         or self._backward_pre_hooks or _nn_module._global_forward_hooks
                         or _nn_module._global_forward_pre_hooks or _nn_module._global_backward_hooks
                         or _nn_module._global_backward_pre_hooks)
                and not (d["training"] and d.get("dropout")) and not _calls_observed()
                and _torch_module_call(self)):
            out = plan(args[0], args[1] if len(args) == 2 else None)
            if out is not None:
                return out
        if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            return _fx_leaf_call(self, args, kwargs)
        return nn.Module.__call__(self, *args, **kwargs)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: a clear error instead of TorchScript's, before it
        # touches the model (a twin module returned here would replace this one in the caller's
        # eager model too: torch writes it back into the parent's submodules)
        raise TypeError(f"{type(self).__name__}: torch.jit.script cannot compile rnnrec_fast's modules (their "
                        "forward takes PackedSequence and keyword inputs TorchScript cannot type); use "
                        "torch.jit.trace, torch.compile or torch.export, or script a function that calls "
                        "torch.ops.rnnrec_fast.recurrence")

    def __getstate__(self):  # pickle / deepcopy: the plan is rebuilt, bound to the copy's parameters
        state = super().__getstate__()
        state.pop("_plan", None)
        state.pop("_module_call", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._refresh_plan()

    def __deepcopy__(self, memo):
        # as deepcopy through __getstate__ / __setstate__ would; defined here because a module with
        # a parametrized weight gets torch's own __deepcopy__ otherwise, which copies __dict__ whole
        # (the C++ plan cannot be copied)
        new = self.__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in ("_plan", "_module_call")}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._refresh_plan()
        return new


class InputError(ValueError, RuntimeError):
    """A call's input or state does not fit the module. torch.nn raises RuntimeError for these
    (sizes, sequence length, hx shape and dtype), this package ValueError for bad input: this is
    both, so code written against either catches it."""


def _autocast_cast(x, hx, w):
    """Under autocast for their device, an input or hx of another floating dtype than the
    weights', as autocast's ops make them (a bfloat16 Linear before a float32 GRU, a float32 h0
    beside a bfloat16 one), is taken as torch.nn takes it and computed in the weights' dtype (the
    op computes in its inputs' dtype). Autocast leaves float64 alone, and so does this: a float64
    input or hx beside weights of another dtype reaches the usual dtype error (torch.nn refuses it
    under autocast too; rounding it silently would hide the mistake)."""
    # w: the first weight as read (not a tensor: _checked_weights raises); isinstance, not getattr
    # with a default, which torch 2.4's dynamo refuses on a tensor
    w_dtype = w.dtype if isinstance(w, torch.Tensor) else None
    if ((x.dtype != w_dtype or (hx is not None and hx.dtype != w_dtype)) and x.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(x.device.type)):
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(w_dtype)
        if hx is not None and hx.is_floating_point() and hx.dtype != torch.float64:
            hx = hx.to(w_dtype)
    return x, hx


def _check_hx(name, x, hx):
    """hx of the input's dtype and device (torch.nn: RuntimeError; the op's own device check raised
    a plain ValueError naming its arguments)."""
    if hx is not None and hx.dtype != x.dtype:
        raise InputError(f"{name}: hx has dtype {hx.dtype} but input has {x.dtype}; they must match")
    if hx is not None and hx.device != x.device:
        raise InputError(f"{name}: hx is on {hx.device} but the input is on {x.device}; they must be on one device")


def _empty_batch(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, mode, reset_after, backend):
    """The op's call for a batch of zero rows (or a cell of zero input or hidden size), which torch.nn
    accepts (the op does not): the reference math on empty tensors, so the outputs are empty (or, with
    no inputs, come from hx and the biases) and still depend on the weights, as torch.nn's do. A
    forced backend is checked as the op's fake kernel checks it (one that cannot run these tensors is
    refused; meta tensors run nowhere), and last_backend() says "reference"."""
    if not _is_compiling():  # (traced, the graph holds the reference math only)
        ops._check_fake_backend(backend, x)
        if x.device.type != "meta":
            ops._set_last("reference")
    if h0 is None:
        h0 = x.new_zeros(x.shape[1], w_hh.shape[1])
    return reference.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, resets, ops.MODES[mode], reset_after)


def _fx_leaf_call(module, args, kwargs):
    """Under torch.fx symbolic tracing: one call_module node for the module, as the tracer records
    for torch.nn's own RNN modules (leaves to it); the forward itself branches on its input, so it
    cannot be traced through. The call goes through the tracer's call_module (a custom tracer's
    override and its scope bookkeeping run), with a forward that records the leaf node too."""
    tracer = next(a.tracer for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy))
    path = tracer.path_of_module(module)
    return tracer.call_module(module, lambda *a, **k: tracer.create_proxy("call_module", path, a, k), args, kwargs)


_SPARSE = frozenset(getattr(torch, n) for n in ("sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc")
                    if hasattr(torch, n))


def _check_dense(name, what, t):
    if t.layout != torch.strided:
        cells = ("; or, for a cell, leave the backend to choose (backend='auto'), which runs torch.nn's cell "
                 "operator on a sparse input" if name.endswith("Cell") and t.layout in _SPARSE else "")
        raise ValueError(f"{name}: {what} must be a dense tensor (layout torch.strided), got {t.layout}; "
                         f"convert it with .to_dense(){cells}")


def _weight_size(n):
    """A weight's size as an int. Under torch.jit.trace a size is a traced 0-dim tensor, but a
    weight's is a constant of the trace (the weights are), so its conversion, which would warn
    that the trace may be wrong for other inputs, does so silently."""
    if torch._C._get_tracing_state() is None or not isinstance(n, torch.Tensor):
        return n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(n)


def _shown(v):
    """A size or shape as an error message prints it: under torch.jit.trace sizes are 0-dim
    tensors, shown as the numbers they hold (not "tensor(3)"; _weight_size's silent conversion)."""
    if isinstance(v, (tuple, list)):
        return tuple(_shown(n) for n in v)
    return _weight_size(v)


def _differs(a, b):
    """a != b for the sizes or shapes an input check compares before it raises (ops.sizes_differ:
    an unbacked size under torch.compile / torch.export counts as equal, with no guard), without
    torch.jit.trace's warning that converting a tensor to a Python boolean may make the trace
    incorrect (a size is a traced 0-dim tensor there): the answer only decides whether to raise,
    nothing of it enters the trace. (Checks whose answer picks what the trace records keep the
    warning.)"""
    if torch._C._get_tracing_state() is None:
        return ops.sizes_differ(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ops.sizes_differ(a, b)


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _fits(params, names, shapes):
    """Whether each registered parameter of ``names`` (a parameter dict; None or absent ones
    pass) has its ``shapes`` entry."""
    return all(params.get(n) is None or tuple(params[n].shape) == shape for n, shape in zip(names, shapes))


def _checked_weights(name, module, names, values, shapes, x, none_bias=False, sizes=None):
    """The weights ``names`` of ``module``, ``values`` as read from its attributes (as torch.nn
    reads them: a parametrized, pruned or replaced weight is not an entry of _parameters; read once
    a call, so a parametrization runs once, a random one draws once), each checked against
    its ``shapes`` entry and ``x``'s dtype and device, with errors that name the parameter (the
    op's name its own arguments, and infer the hidden size from w_hh: a mis-shaped weight_hh was
    reported as a mis-shaped w_ih). None (a weight or bias set to None on a module that has it)
    is refused as torch.nn's RNN/GRU refuse it (it was dropped, silently, for a bias); with
    ``none_bias``, a None bias is no bias, as torch.nn's cells take it. ``sizes``: the (input, hidden)
    sizes the shapes come from (default: the module's attributes)."""
    I, H = sizes if sizes is not None else (module.input_size, module.hidden_size)
    out = []
    for n, w, shape in zip(names, values, shapes):
        if w is None and none_bias and n.startswith("bias"):
            out.append(None)
            continue
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name}: {n} must be a Tensor, got {type(w).__name__}"
                            + (" (a module built with bias=True needs its biases)" if n.startswith("bias") else ""))
        if _differs(w.shape, shape):
            raise InputError(f"{name}: {n} has shape {_shown(w.shape)}, expected {_shown(shape)} for input_size={I}, "
                             f"hidden_size={H}")
        if w.dtype != x.dtype:
            raise InputError(f"{name}: {n} has dtype {w.dtype} but the input has {x.dtype}; convert the "
                             f"input (input.to({w.dtype})) or the module (module.to({x.dtype}))")
        if w.device != x.device:
            raise InputError(f"{name}: {n} is on {w.device} but the input is on {x.device}")
        out.append(w)
    return out


def _check_packed(name, input):
    """A PackedSequence as pack_padded_sequence makes it, or as torch.nn also takes it (torch's
    pad_packed_sequence aborts the process on negative batch sizes). Returns its batch sizes as a
    list (None under torch.compile, which does not read them)."""
    # (fields by index: torch 2.4's dynamo read a PackedSequence's named fields as the namedtuple's
    # descriptors, so that compiling a call raised this error)
    data, bs = input[0], input[1]
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise InputError(f"{name}: a PackedSequence's data must have 2 dimensions (steps, features), got "
                         f"{data.dim() if isinstance(data, torch.Tensor) else type(data).__name__}")
    if (not isinstance(bs, torch.Tensor) or bs.dim() != 1 or bs.dtype != torch.int64 or bs.device.type != "cpu"
            or bs.numel() == 0):
        raise InputError(f"{name}: a PackedSequence's batch_sizes must be a non-empty 1-D int64 CPU tensor")
    if _is_compiling():  # (reading the sizes' values would break the graph)
        return None
    sizes = bs.tolist()  # (one read of the values, then Python: a tensor op each was ~3 us)
    # (zeros may end them, as torch.nn takes: see _plain_packed)
    if sizes[0] < 1 or sizes[-1] < 0 or any(a < b for a, b in zip(sizes, sizes[1:])) or sum(sizes) != data.shape[0]:
        raise InputError(f"{name}: a PackedSequence's batch_sizes must be non-increasing, the first positive, and sum "
                         f"to its data's {data.shape[0]} rows, got {sizes[:16]}"
                         f"{'...' if len(sizes) > 16 else ''}; build it with pack_padded_sequence")
    for what, idx in (("sorted_indices", input[2]), ("unsorted_indices", input[3])):
        if idx is not None and (not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (sizes[0],)):
            raise InputError(f"{name}: a PackedSequence's {what} must hold one index per sequence "
                             f"({sizes[0]}, batch_sizes[0]), got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}; "
                             "build it with pack_padded_sequence")
    return sizes


def _plain_packed(input, sizes):
    """None where the modules' packed branch takes ``input`` (checked) as it is; else the
    PackedSequence it runs instead, for two forms that pack_padded_sequence never builds, read as
    torch.nn reads them: batch_sizes ending in zeros (steps without rows: dropped, the output keeps
    them), and sorted_indices None with unsorted_indices given (the rows in their packed order, as
    is hx; the caller puts h_n in unsorted_indices' order). ``sizes``: what _check_packed returned,
    None under torch.compile, which does not read them (torch's padding, which runs there, takes
    zero steps)."""
    data, bs, si, ui = input
    uneven = si is None and ui is not None
    zeros = 0 if sizes is None or sizes[-1] else len(sizes) - sizes.index(0)  # (non-increasing: zeros end it)
    if not uneven and not zeros:
        return None
    return PackedSequence(data, bs[:bs.shape[0] - zeros], None if uneven else si, None if uneven else ui)


def _check_backend(backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def _reverse_index(T, lengths, device):
    """Row index into x.reshape(T * B, C) that reverses each row's first lengths[b] steps of x (T, B, C)
    and keeps its padding in place."""
    t = torch.arange(T, device=device).unsqueeze(1)
    L = lengths.unsqueeze(0)
    steps = torch.where(t < L, L - 1 - t, t)
    return (steps * L.shape[1] + torch.arange(L.shape[1], device=device)).reshape(-1)


class _Reversal:
    """Reverses the steps of a bidirectional module's layer inputs and outputs x (T, B, C) for its
    reverse directions: along the whole time axis without lengths (flip, whose backward is a flip
    too); with lengths, each row's first lengths[b] steps, its padding kept in place. That on the
    CPU is _C.reverse_padded (a copy; with autograd _C.reverse_padded_autograd, its own backward),
    where nothing must see ATen's calls (as _pad_packed's copies); else, and on other devices, an
    index_select by _reverse_index (made once, at the first call), whose backward is an index_add
    (~160 us a call at B32 T20 H100 on the CPU, one thread, Zen 3 VM, ad hoc; a gather over the
    expanded index costs ten times as much, and its backward is a scatter-add)."""

    def __init__(self, T, lengths, device):
        self.T, self.lengths, self.device, self.index = T, lengths, device, None

    def __call__(self, x):
        lengths = self.lengths
        if lengths is None:
            return x.flip(0)
        if (_reverse_padded is not None and x.device.type == "cpu" and lengths.device.type == "cpu"
                and _cpp_copy_ok(x, lengths)):
            if x.requires_grad and torch.is_grad_enabled():
                return _reverse_padded_autograd(x, lengths)
            return _reverse_padded(x, lengths)
        if self.index is None:
            self.index = _reverse_index(self.T, lengths, self.device)
        T, B, C = x.shape
        return x.reshape(T * B, C).index_select(0, self.index).view(T, B, C)


_PROJ_SIZE_MSG = "proj_size argument is only supported for LSTM, not RNN or GRU"


class _RNNBase(_FastPath):
    _mode: str = "gru"
    _gates: int = 3
    _plan_config = frozenset({"backend", "mode", "reset_after", "num_layers", "batch_first", "bidirectional",
                              "bias", "_flat_weights_names", "input_size", "hidden_size"})

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 backend="auto", reset_after=True):
        # (torch.nn.RNNBase's positional order: proj_size, LSTM's only, comes before device, dtype)
        super().__init__()
        name = type(self).__name__
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"{name}: proj_size should be a positive integer or zero to disable projections")
        if proj_size != 0:
            raise ValueError(_PROJ_SIZE_MSG)
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout should be a number in range [0, 1], got {dropout!r}")
        # as torch.nn's bias and batch_first (bias=None would silently drop the biases; torch.nn
        # refuses a bidirectional=2 at its first call)
        _check_bools(name, ("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional),
                     ("reset_after", reset_after))
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size),
                           ("num_layers", num_layers)):
            # (torch.nn takes any integer num_layers, NumPy's too: np.random.choice([1, 2, 3]) in a
            # hyperparameter search; its sizes must be Python ints)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if arg == "num_layers" else int):
                raise TypeError(f"{name}: {arg} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name}: {arg} must be greater than zero, got {value}")
        num_layers = int(num_layers)
        if dropout > 0 and num_layers == 1:
            # torch.nn's text, unprefixed: warnings.filterwarnings("ignore", message="dropout option adds
            # dropout") matches the start of the message
            warnings.warn("dropout option adds dropout after all but last recurrent layer, "
                          f"so non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", UserWarning, stacklevel=2)
        self.mode = self._mode.upper()  # as torch.nn: "GRU", "RNN_TANH", "RNN_RELU"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        self.backend = _check_backend(backend)
        self.reset_after = reset_after
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        G = self._gates
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            for direction in range(D):
                layer_in = input_size if layer == 0 else hidden_size * D
                suffix = "_reverse" if direction == 1 else ""
                params = [("weight_ih", (G * hidden_size, layer_in)), ("weight_hh", (G * hidden_size, hidden_size))]
                if bias:
                    params += [("bias_ih", (G * hidden_size,)), ("bias_hh", (G * hidden_size,))]
                names = []
                for pname, shape in params:
                    full = f"{pname}_l{layer}{suffix}"
                    setattr(self, full, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(full)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()
        self._refresh_plan()

    def _plan_args(self):
        if not self._bias_matches() or not self._weights_fit_sizes():
            return None  # the general path raises
        return self._flat_weights_names, self.num_layers, self.batch_first, False

    def _bias_matches(self):
        # the weights are made at construction; torch.nn's call refuses a bias flag set otherwise later
        return bool(self.bias) == (len(self._all_weights[0]) == 4)

    def _weights_fit_sizes(self):
        return self._count_error() is None and all(
            _fits(self._parameters, names, self._weight_shapes(index)) for index, names in enumerate(self._all_weights))

    def _count_error(self):
        """Why num_layers / bidirectional (changed after construction) do not fit the weight sets the
        module was built with, or None. torch.nn's call refuses such a module (the weights are made
        at construction); so do both paths here (sizes changed otherwise: _weights_fit_sizes)."""
        D = 2 if self.bidirectional else 1
        if len(self._all_weights) != self.num_layers * D:
            return (f"num_layers={self.num_layers}, bidirectional={self.bidirectional} but the module holds "
                    f"{len(self._all_weights)} layer and direction weight sets")
        return None

    def _weight_shapes(self, index):
        """The shapes of (layer, direction) ``index``'s w_ih, w_hh, b_ih, b_hh its sizes say."""
        GH, H, D = self._gates * self.hidden_size, self.hidden_size, 2 if self.bidirectional else 1
        in_l = self.input_size if index < D else D * H  # layer 0's input, or the layer below's directions
        return (GH, in_l), (GH, H), (GH,), (GH,)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, for code written against ``torch.nn.RNNBase``."""

    # torch.nn.RNNBase's refresh of its weight list, which code written against it calls after
    # replacing weights (pruning sweeps, quantizers, weight swaps): these modules keep no list, they
    # read the weight attributes at every call, so there is nothing to refresh or to find changed
    def _init_flat_weights(self) -> None:
        """No-op (see above)."""

    _update_flat_weights = _init_flat_weights

    def _weights_have_changed(self) -> bool:
        """False: no weight list to be out of date (see above)."""
        return False

    @property
    def _flat_weight_refs(self):
        return [None if w is None else weakref.ref(w) for w in self._flat_weights]

    # torch.nn.RNNBase's argument checks and hidden-state permutation, for code that calls them
    # (they read only attributes these modules share with it)
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self):
        # (as torch.nn's list: None for a weight the module does not hold, as WeightDrop wrappers leave
        # one between deleting the parameter and setting its replacement)
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @_flat_weights.setter
    def _flat_weights(self, value):
        # torch.nn.RNNBase keeps this list, and code written against it refreshes the list after
        # replacing weights (`m._flat_weights = [getattr(m, n) for n in m._flat_weights_names]`:
        # WeightDrop wrappers, diffq's quantizer). These modules read their weights from the
        # attributes at every call, so such a refresh has nothing to do. A list of other tensors,
        # which torch.nn's forward would run on until a weight attribute changes, is refused: it
        # would be ignored here. (A parametrized weight is a new tensor at every read: torch.nn re-reads
        # it at every call too, whatever the list holds.)
        from torch.nn.utils import parametrize

        names = self._flat_weights_names
        value = list(value)
        refresh = len(value) == len(names) and all(
            parametrize.is_parametrized(self, n) or v is getattr(self, n, None) for n, v in zip(names, value))
        if not refresh:
            raise NotImplementedError(
                f"{type(self).__name__}: _flat_weights can only be refreshed from the weight attributes "
                "([getattr(m, n) for n in m._flat_weights_names]), which this module reads at every call; "
                "to run on other weights assign them as attributes (m.weight_hh_l0 = ...), or use "
                "torch.func.functional_call")

    def extra_repr(self) -> str:
        # torch.nn's text; built from attributes, not str.format(**self.__dict__), which dynamo cannot
        # trace (torch.compile(torch.func.vmap(module)) formats the module)
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self._op_mode == "gru" and not self.reset_after:
            s += ", reset_after=False"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def active_backend(self, device=None) -> str:
        """The backend this module's calls run on for tensors on ``device`` (default: its weights')."""
        p = self.weight_ih_l0
        device = torch.device(device) if device is not None else p.device
        return ops.resolve_backend(self.backend, device.type, p.dtype)

    def _layer_params(self, index, x, weights):
        """The weights of (layer, direction) ``index`` (of ``weights``, the values of
        _flat_weights_names), checked (_checked_weights), as the op's w_ih, w_hh, b_ih, b_hh."""
        count = self._count_error()
        if count is not None:
            raise InputError(f"{type(self).__name__}: {count} (sizes are set at construction, as torch.nn's)")
        names = self._all_weights[index]
        if not self._bias_matches():
            raise InputError(f"{type(self).__name__}: bias={self.bias!r} but the module was built with"
                             f"{'' if len(names) == 4 else 'out'} biases (set at construction, as torch.nn's)")
        values = weights[index * len(names):(index + 1) * len(names)]
        w = _checked_weights(type(self).__name__, self, names, values, self._weight_shapes(index), x)
        return tuple(w) if self.bias else (w[0], w[1], None, None)

    def _torch_op(self):
        """torch.nn's operator for this module's mode: torch._VF.gru, rnn_tanh or rnn_relu."""
        return getattr(torch._VF, self._op_mode)

    def _torch_packed(self, input, hx):
        """forward of a PackedSequence (checked) under torch.onnx.export, as torch.nn's forward
        calls its operator: the packed form, hx in the sorted batch order, h_n back in the input's."""
        name = type(self).__name__
        data, batch_sizes, sorted_indices, unsorted_indices = input
        D = 2 if self.bidirectional else 1
        if hx is None:  # (sized by batch_sizes[0] itself, as torch.nn's: a traced size)
            hx = torch.zeros(self.num_layers * D, batch_sizes[0], self.hidden_size, dtype=data.dtype,
                             device=data.device)
        else:
            if not isinstance(hx, torch.Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            expected = (self.num_layers * D, int(batch_sizes[0]), self.hidden_size)
            if tuple(hx.shape) != expected:
                raise InputError(f"{name}: Expected hidden size {_shown(expected)}, got {_shown(hx.shape)}")
            if sorted_indices is not None:
                hx = hx.index_select(1, sorted_indices)
        weights = [getattr(self, n) for n in self._flat_weights_names]
        out, h_n = self._torch_op()(data, batch_sizes, hx, weights, self.bias, self.num_layers, self.dropout,
                                    self.training, self.bidirectional)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h_n

    def forward(self, input, hx=None, resets=None):
        """``(output, h_n)`` as torch.nn's, for ``input`` (T, B, I), (B, T, I) with batch_first,
        unbatched (T, I) or a PackedSequence, and ``hx`` (layers * directions, B, H) or None (zeros).
        ``resets``, a bool tensor (T, B) ((B, T) with batch_first, (T,) unbatched): True zeroes that
        row's state in every layer before that step (session-parallel training). (A third
        parameter, not keyword-only: torch.onnx.export's TorchScript-based exporter passes every
        parameter of a model's forward by position.)

        Under torch.onnx.export the module calls torch.nn's own operator (torch._VF.gru /
        rnn_tanh / rnn_relu, as torch.nn.GRU / RNN do), which the exporters know: the model
        exports as one holding torch.nn's modules would."""
        if resets is None and not _is_compiling():  # the fast path (see _FastPath)
            plan = self._plan
            if plan is not None and not (self.dropout and self.training) and not _calls_observed():
                out = plan(input, hx)
                if out is not None:
                    return out
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        onnx = ops.onnx_exporting()
        if onnx:
            ops.refuse_for_onnx(name, self._op_mode, self.reset_after, resets, packed=packed)
        lengths = None
        if packed:
            sizes = _check_packed(name, input)
            if onnx:
                return self._torch_packed(input, hx)
            plain = _plain_packed(input, sizes)
            if plain is not None:
                if resets is not None:
                    raise ValueError(f"{name}: resets are taken with a PackedSequence that pack_padded_sequence "
                                     "builds (this one has batch_sizes ending in zeros, or unsorted_indices "
                                     "without sorted_indices)")
                out, h_n = self.forward(plain, hx)
                if input[2] is None and input[3] is not None:  # (torch.nn's permute_hidden of h_n)
                    h_n = h_n.index_select(1, input[3])
                return PackedSequence(out.data, input[1], input[2], input[3]), h_n
            sorted_indices = input[2]  # (by index: see _check_packed)
            if _is_compiling():  # (torch's own padding, which dynamo traces in one graph)
                unpad = None
                x, lengths_cpu = pad_packed_sequence(input, batch_first=False)  # original batch order
                lengths = lengths_cpu.to(x.device)
            else:  # in the sorted batch order (hx and resets permuted to it below, h_n back)
                x, lengths, unpad = _pad_packed(input)
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            _check_dense(name, "input", input)
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor")
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)
            elif self.batch_first:
                x = input.transpose(0, 1)
            else:
                x = input
        weights = [getattr(self, n) for n in self._flat_weights_names]  # (each read once a call)
        if hx is not None and not isinstance(hx, torch.Tensor):  # (before _autocast_cast reads its dtype)
            raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}"
                            + (" (an LSTM's (h, c) pair? RNN and GRU take h alone)" if isinstance(hx, tuple) else ""))
        op = ops.op_for(name, x, hx, *weights)
        x, hx = _autocast_cast(x, hx, weights[0])
        T, B, I = x.shape
        if ops.is_zero(T):
            raise InputError(f"{name}: Expected sequence length to be larger than 0 in RNN")
        if _differs(I, self.input_size):
            raise InputError(f"{name}: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {_shown(I)}")
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        if hx is not None:
            expected = (self.num_layers * D, B, H)
            _check_dense(name, "hx", hx)
            if not batched:
                if hx.dim() != 2:
                    raise InputError(f"{name}: For unbatched 2-D input, hx should also be 2-D but got "
                                     f"{hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
            elif hx.dim() != 3:
                raise InputError(f"{name}: For batched 3-D input, hx should also be 3-D but got "
                                 f"{hx.dim()}-D tensor")
            if _differs(tuple(hx.shape), expected):
                raise InputError(f"{name}: Expected hidden size {_shown(expected)}, got {_shown(hx.shape)}")
            _check_hx(name, x, hx)
        if resets is not None:
            if D == 2:
                raise ValueError(f"{name}: resets are not defined for a bidirectional model")
            resets = ops.as_index_tensor(name, "resets", resets, x.device)
            # laid out as the input: (T,) unbatched, (B, T) with batch_first, else (T, B); for a
            # PackedSequence, as the padded input in the original batch order
            want = (T,) if not batched else (B, T) if self.batch_first else (T, B)
            # (_differs: no guard on an unbacked batch, as hx's check; the kernels check the real size)
            if resets.dtype != torch.bool or _differs(tuple(resets.shape), want):
                raise ValueError(f"{name}: resets must be a bool tensor of shape {_shown(want)}, got {resets.dtype} "
                                 f"{_shown(resets.shape)}")
            resets = resets.unsqueeze(1) if not batched else resets.transpose(0, 1) if self.batch_first else resets
        if packed and unpad is not None and sorted_indices is not None:  # (as torch.nn permutes hx)
            hx = None if hx is None else hx.index_select(1, sorted_indices)
            resets = None if resets is None else resets.index_select(1, sorted_indices)
        if ops.is_zero(B):
            op = _empty_batch
        mode, reset_after, backend = self._op_mode, self.reset_after, self.backend
        if onnx:  # (a batch_first input given to the operator as it is, as torch.nn's forward does)
            bf = batched and self.batch_first
            if hx is None:  # (sized from the input itself: the transposed x would stay in the graph)
                hx = torch.zeros(self.num_layers * D, input.size(0) if bf else B, H, dtype=x.dtype, device=x.device)
            out, h_n = self._torch_op()((input if input.dtype == x.dtype else x.transpose(0, 1)) if bf else x, hx,
                                        weights, self.bias, self.num_layers, self.dropout, self.training,
                                        self.bidirectional, bf)
            if bf:
                return out, h_n
        elif D == 1 and self.num_layers == 1:  # the common case, kept short: one fused call
            out, h = op(x, None if hx is None else hx[0], *self._layer_params(0, x, weights), lengths, resets, mode,
                        reset_after, backend)[:2]
            # in place, as torch.nn's is, h_n is no view: `h_n.detach_()` between batches works
            # (nothing saved h; an empty batch's, and under torch.func.grad, too); traced by dynamo as
            # the plain view, and a view where vmap runs the autograd function of torch.func's
            # transforms (its rule returns views, which refuse the change in place)
            in_place = not _is_compiling() and not (op in (ops._func_recurrence, ops._reference_op) and ops._vmap_active())
            h_n = h.unsqueeze_(0) if in_place else h.unsqueeze(0)
        else:
            reverse = _Reversal(T, lengths, x.device)
            layer_in = x
            hs = []
            for layer in range(self.num_layers):
                outs = []
                for direction in range(D):
                    idx = layer * D + direction
                    xin = layer_in if direction == 0 else reverse(layer_in)
                    y, h = op(xin, None if hx is None else hx[idx], *self._layer_params(idx, xin, weights), lengths,
                              resets, mode, reset_after, backend)[:2]
                    outs.append(y if direction == 0 else reverse(y))
                    hs.append(h)
                layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
                if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                    if packed:  # the mask drawn over the packed rows, as torch.nn's (its layers' output)
                        layer_in = _packed_dropout(layer_in, self.dropout, input[1],
                                                   sorted_indices if unpad is None else None)
                    else:
                        layer_in = F.dropout(layer_in, self.dropout, training=True)
            out, h_n = layer_in, torch.stack(hs)
        if packed:
            if unpad is not None:
                data = unpad(out)
                if sorted_indices is not None:
                    h_n = h_n.index_select(1, input[3])
            else:
                if sorted_indices is not None:
                    out, lengths_cpu = out.index_select(1, sorted_indices), lengths_cpu[sorted_indices.cpu()]
                data = pack_padded_sequence(out, lengths_cpu, enforce_sorted=True).data
            return PackedSequence(data, input[1], input[2], input[3]), h_n  # (batch_sizes, sorted, unsorted)
        # One direction: out is the op's y, which its backward reads (saved). Eager autograd refuses
        # a change in place of it or of a view of it before backward(); a compiled graph returning
        # a view of it (batch_first, unbatched) does not check (the backward read the changed values:
        # wrong gradients, no error), so under torch.compile with grad on that view is a copy.
        copy = D == 1 and _is_compiling() and torch.is_grad_enabled() and not onnx
        if not batched:
            out = out.squeeze(1)
            return (out.clone() if copy else out), h_n.squeeze(1)
        if self.batch_first:
            out = out.transpose(0, 1)
            if copy:
                out = out.clone(memory_format=torch.contiguous_format)
        return out, h_n


def _packed_rows(batch_sizes, sorted_indices, T, B, device):
    """For a PackedSequence of T steps over B sequences: each packed row's place in a padded (T, B)
    layout, flattened (t * B + b), in packed order (time major, each step's rows in the sorted batch
    order, ``batch_sizes[t]`` of them): the original batch order where ``sorted_indices`` is given,
    the sorted one where it is None; and the (T, B) mask of the live entries of the sorted batch
    (CPU, as batch_sizes)."""
    live = torch.arange(B, device=batch_sizes.device).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B) on the CPU
    if sorted_indices is None:  # (t * B + j: the live entries' places, in order)
        return live.view(-1).nonzero().view(-1).to(device), live
    rows = torch.arange(T, device=device).unsqueeze(1) * B + sorted_indices.to(device).unsqueeze(0)  # (T, B): step t, j-th sorted row
    return rows[live.to(device)], live


def _pad_packed(input):
    """A PackedSequence (checked) as the op takes it, in the sorted batch order (longest first, as
    its data holds each step's rows): the data padded to (T, B, I) (zeros past each sequence's end),
    the lengths (B,) on the data's device, non-increasing (the C++ kernels then run each step's
    products on its live rows only, as torch.nn's packed kernels do), and ``unpad``, which takes a
    padded output (T, B, C) of that order back to its packed rows. On the CPU, where no trace,
    dispatch or function mode must see the calls: C++ copies (_C.pad_packed_sorted and
    unpad_packed_sorted), as C++ autograd functions (_C.pad_packed_autograd, unpad_packed_autograd)
    where autograd records them (B32 T20 H100 training, one thread, Zen 3 VM, ad hoc: ATen's index
    ops and their backward, scatter_add and zero fills, took ~0.5 of ~3 ms). Else one index_copy (its gradient one
    index_select) and an index_select back, where torch's pad_packed_sequence copies a slice per
    distinct length, each a node of the graph whose backward clones the whole gradient (~1 ms of a
    ~4 ms training step); under torch.jit.trace torch's own operators (B a traced size there)."""
    data, batch_sizes = input[0], input[1]
    if (_pad_packed_sorted is not None and data.device.type == "cpu" and data.is_floating_point()
            and _cpp_copy_ok(data, batch_sizes)):
        if data.requires_grad and torch.is_grad_enabled():
            x, lengths = _pad_packed_autograd(data, batch_sizes)
        else:
            x, lengths = _pad_packed_sorted(data, batch_sizes)
        return x, lengths, functools.partial(_unpad_cpu, batch_sizes=batch_sizes)
    if torch._C._get_tracing_state() is not None:
        # under torch.jit.trace, torch's own padding and packing operators (torch.nn's
        # pad_packed_sequence and pack_padded_sequence run them): B is read from batch_sizes inside
        # the operator, so that the trace records it as the input's, not as a constant
        # (int(batch_sizes[0]) below made a traced model refuse a larger batch: "index_copy_():
        # Number of indices (9) should be equal to source.size(dim) (10)"; a review)
        x, lengths = torch._VF._pad_packed_sequence(data, batch_sizes, False, 0.0, batch_sizes.shape[0])
        return (x, lengths.to(data.device),
                lambda out: torch._VF._pack_padded_sequence(out, lengths, False)[0])
    T, B = batch_sizes.shape[0], int(batch_sizes[0])
    rows, live = _packed_rows(batch_sizes, None, T, B, data.device)
    x = data.new_zeros(T * B, data.shape[1]).index_copy(0, rows, data).view(T, B, data.shape[1])
    return x, live.sum(0).to(data.device), lambda out: out.reshape(-1, out.shape[-1]).index_select(0, rows)


def _unpad_cpu(out, batch_sizes):
    """A padded CPU output (T, B, C) in a PackedSequence's sorted order back to its packed rows, in
    C++ (with _C.unpad_packed_autograd where autograd records it, or ATen's index ops where something else must
    see the call)."""
    if not _cpp_copy_ok(out):
        T, B = out.shape[0], out.shape[1]  # (sizes, not batch_sizes' values: traced as sizes)
        rows, _ = _packed_rows(batch_sizes, None, T, B, out.device)
        return out.reshape(-1, out.shape[-1]).index_select(0, rows)
    if out.requires_grad and torch.is_grad_enabled():
        return _unpad_packed_autograd(out, batch_sizes)
    return _unpad_packed_sorted(out, batch_sizes)


def _packed_dropout(y, p, batch_sizes, sorted_indices):
    """Dropout of a layer's padded output ``y`` (T, B, DH; batch in the original order) with the
    mask torch.nn's layers draw over their packed output: ``F.dropout`` of the packed rows (time
    major, each step's rows in the sorted batch order, ``batch_sizes[t]`` of them), so that the same
    seed drops the same units as torch.nn.GRU / RNN on the same PackedSequence. The padded steps
    stay zero (no step reads them)."""
    T, B, DH = y.shape
    idx, _ = _packed_rows(batch_sizes, sorted_indices, T, B, y.device)  # the packed rows' places in y
    flat = y.reshape(T * B, DH)
    kept = F.dropout(flat.index_select(0, idx), p, training=True)
    return flat.new_zeros(T * B, DH).index_copy(0, idx, kept).view(T, B, DH)


class RNN(_RNNBase):
    """Drop-in ``torch.nn.RNN`` (Elman, tanh or relu) on the fused op.

    Arguments as torch.nn's, in its positional order: ``input_size, hidden_size, num_layers=1,
    nonlinearity='tanh' (or 'relu'), bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0`` (0 only),
    ``device=None, dtype=None``; then keyword-only:

    * ``backend="auto"``: ``"cpp"``, ``"cuda"``, ``"numba"`` or ``"reference"`` to force one (see
      ``rnnrec_fast.resolve_backend``; ``active_backend()`` names the one that runs).

    Parameter names, initialisation and ``state_dict`` are torch.nn's (``load_state_dict`` takes
    either's); ``forward(input, hx=None, resets=None)`` is torch.nn's with per-step state resets.
    """

    _gates = 1

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:  # as torch.nn.RNN / GRU: a keyword proj_size, even 0, is refused
            raise ValueError(_PROJ_SIZE_MSG)
        if len(args) > 3:  # torch.nn.RNN's positional order: input, hidden, layers, nonlinearity, ...
            if "nonlinearity" in kwargs:  # (torch.nn raises TypeError too; the keyword was dropped silently)
                raise TypeError("RNN: got multiple values for argument 'nonlinearity'")
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or 'relu'.")
        if "reset_after" in kwargs:
            raise TypeError("RNN: reset_after applies to GRU only")
        self.nonlinearity = nonlinearity
        self._mode = "rnn_" + nonlinearity
        super().__init__(*args, **kwargs)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + ", nonlinearity='relu'"


class GRU(_RNNBase):
    """Drop-in ``torch.nn.GRU`` on the fused op (gates r, z, n in torch's order and math).

    Arguments as torch.nn's, in its positional order: ``input_size, hidden_size, num_layers=1,
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0`` (0 only),
    ``device=None, dtype=None``; then keyword-only:

    * ``backend="auto"``: ``"cpp"``, ``"cuda"``, ``"numba"`` or ``"reference"`` to force one (see
      ``rnnrec_fast.resolve_backend``; ``active_backend()`` names the one that runs).
    * ``reset_after=True``: torch's GRU, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``;
      ``False`` gives the original form (Cho et al. 2014, the original GRU4Rec),
      ``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``, which torch.nn lacks.

    Parameter names, initialisation and ``state_dict`` are torch.nn's (``load_state_dict`` takes
    either's); ``forward(input, hx=None, resets=None)`` is torch.nn's with per-step state resets.
    """

    _gates = 3
    _mode = "gru"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError(_PROJ_SIZE_MSG)
        super().__init__(*args, **kwargs)


def _check_bools(name, *args):
    """(arg, value) pairs whose value must be a bool, as torch.nn's flags (reset_after="False" would
    be True): a TypeError naming the first that is not."""
    for arg, value in args:
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {arg} should be of type bool, got: {type(value).__name__}")


class _CellBase(_FastPath):
    _gates = 3
    _plan_config = frozenset({"backend", "mode", "reset_after", "bias_ih", "bias_hh", "input_size", "hidden_size"})

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend="auto",
                 reset_after=True, mode="gru"):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            # torch.nn's cells (unlike its RNN/GRU) accept zero sizes
            # (any integer, NumPy's too, as torch.nn's cells take them; not a bool)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: {arg} should be of type int, got: {type(value).__name__}")
            if value < 0:
                raise InputError(f"{name}: {arg} must be a non-negative int, got {value!r}")
        input_size, hidden_size = int(input_size), int(hidden_size)
        _check_bools(name, ("reset_after", reset_after))
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.mode = mode
        self.backend = _check_backend(backend)
        self.reset_after = reset_after
        factory = {"device": device, "dtype": dtype}
        G = self._gates
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()
        self._refresh_plan()

    def _weights_fit_sizes(self):
        # (and a weight_hh of hidden_size: else the general path, where a call without hx raises)
        shapes = self._weight_shapes()
        return _fits(self._parameters, _CELL_WEIGHTS, shapes) and shapes[1][1] == self.hidden_size

    def _weight_sizes(self, w_ih, w_hh):
        """(input size, hidden size) of a call: as torch.nn's cells, weight_ih's and weight_hh's
        (the attributes where a weight is not a matrix, for the errors). torch.nn's cells do not
        read input_size, and read hidden_size only for the zero state of a call without hx: a weight
        surgery that keeps the four weights consistent works, as there."""
        I = _weight_size(w_ih.shape[1]) if isinstance(w_ih, torch.Tensor) and w_ih.dim() == 2 else self.input_size
        H = _weight_size(w_hh.shape[1]) if isinstance(w_hh, torch.Tensor) and w_hh.dim() == 2 else self.hidden_size
        return I, H

    def _weight_shapes(self, values=None):
        """The shapes of weight_ih, weight_hh, bias_ih, bias_hh that fit the weights' sizes
        (``values``: the four as a call read them; default the registered ones)."""
        w_ih, w_hh = values[:2] if values is not None else map(self._parameters.get, _CELL_WEIGHTS[:2])
        I, H = self._weight_sizes(w_ih, w_hh)
        GH = self._gates * H
        return (GH, I), (GH, H), (GH,), (GH,)

    def _plan_args(self):
        # as torch.nn's cells, the biases the module holds, whatever self.bias says: none where both
        # are None (a plan given the names of None or missing ones declines: the general path runs)
        if not self._weights_fit_sizes():
            return None  # (sizes changed after construction, or weights of other sizes: the general path raises)
        p = self._parameters
        no_bias = all(n in p and p[n] is None for n in ("bias_ih", "bias_hh"))
        return ["weight_ih", "weight_hh"] + ([] if no_bias else ["bias_ih", "bias_hh"]), 1, False, True

    reset_parameters = _RNNBase.reset_parameters

    def extra_repr(self) -> str:  # (as _RNNBase.extra_repr: no str.format(**self.__dict__))
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.mode == "rnn_relu":
            s += ", nonlinearity=relu"
        if self.mode == "gru" and not self.reset_after:
            s += ", reset_after=False"
        return s

    def active_backend(self, device=None) -> str:
        device = torch.device(device) if device is not None else self.weight_ih.device
        return ops.resolve_backend(self.backend, device.type, self.weight_ih.dtype)

    def forward(self, input, hx=None):
        """The new state (B, H) or unbatched (H,), for ``input`` (B, I) or (I,) and ``hx`` or None (zeros)."""
        if not _is_compiling():  # the fast path (see _FastPath)
            plan = self._plan
            if plan is not None and not _calls_observed():
                out = plan(input, hx)
                if out is not None:
                    return out
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        # a sparse input or hx (one-hot rows, say), which torch.nn's cells take: torch.nn's cell
        # operator runs it (below), where the backend is left to choose (a forced one takes dense
        # tensors only; reset_after=False, below)
        sparse = self.backend == "auto" and (input.layout in _SPARSE or (
            isinstance(hx, torch.Tensor) and hx.layout in _SPARSE))
        if sparse and not self.reset_after:  # (torch.nn has no cell of GRU's original form: dense, our kernels)
            input = input.to_dense() if input.layout in _SPARSE else input
            hx = hx.to_dense() if isinstance(hx, torch.Tensor) and hx.layout in _SPARSE else hx
            sparse = False
        if not sparse:
            _check_dense(name, "input", input)
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is not None:
            if not isinstance(hx, torch.Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            if not sparse:
                _check_dense(name, "hx", hx)
            if hx.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
            if hx.dim() != input.dim():
                raise InputError(f"{name}: Expected hidden to be {input.dim()}D, got {hx.dim()}D instead")
            if not batched:
                hx = hx.unsqueeze(0)
        # as torch.nn's cells: the biases the module holds (a None one: none), whatever self.bias says
        values = [getattr(self, n) for n in _CELL_WEIGHTS]  # (each read once a call)
        I, H = self._weight_sizes(values[0], values[1])  # (the weights' sizes, as torch.nn's cells)
        if _differs(x.shape[1], I):
            raise InputError(f"{name}: input has inconsistent input_size: got {_shown(x.shape[1])} expected {I}")
        if hx is not None and _differs(hx.shape[0], x.shape[0]):
            raise InputError(f"{name}: Input batch size {_shown(x.shape[0])} doesn't match hidden0 batch size "
                             f"{_shown(hx.shape[0])}")
        hidden = self.hidden_size if hx is None else hx.shape[1]  # (torch.nn's zero state is hidden_size wide)
        if _differs(hidden, H):
            why = "" if hx is not None else (f" (a call without hx starts from zeros of hidden_size={hidden}; "
                                             f"weight_hh has shape {tuple(values[1].shape)})")
            raise InputError(f"{name}: hidden0 has inconsistent hidden_size: got {_shown(hidden)}, expected {H}{why}")
        op = ops.op_for(name, x, hx, *values)
        x, hx = _autocast_cast(x, hx, values[0])
        w = _checked_weights(name, self, _CELL_WEIGHTS, values, self._weight_shapes(values), x,
                             none_bias=True, sizes=(I, H))  # (torch.nn: RuntimeError)
        b_ih, b_hh = w[2], w[3]
        _check_hx(name, x, hx)
        if sparse or ops.onnx_exporting():  # torch.nn's operator (ONNX: which the exporters know, see _RNNBase.forward)
            if sparse:
                ops._set_last("torch.nn")
            else:
                ops.refuse_for_onnx(name, self._op_mode, self.reset_after)
            if hx is None:
                hx = torch.zeros(x.shape[0], H, dtype=x.dtype, device=x.device)
            h = getattr(torch._VF, self._op_mode + "_cell")(x, hx, w[0], w[1], b_ih, b_hh)
            return h if batched else h.squeeze(0)
        # zero rows, inputs or hidden units: torch.nn's results from the reference math (the op refuses
        # empty tensors; the fast plans decline them or return the same empty result)
        sized = not ops.is_zero(x.shape[0]) and I and H
        if not sized:
            op = _empty_batch
        _, h = op(x.unsqueeze(0), hx, w[0], w[1], b_ih, b_hh, None, None, self.mode, self.reset_after,
                  self.backend)[:2]
        return h if batched else h.squeeze(0)


_OWN_FORWARDS = frozenset({_RNNBase.forward, _CellBase.forward})  # (see _FastPath.__call__)
if _InferPlan is not None:
    from ._C import set_module_call_context as _set_module_call_context

    _set_module_call_context(tuple(_OWN_FORWARDS), _nn_module, _forward_ad, nn.Module, _TORCH_MODULE_CALL,
                             _TORCH_CALL_IMPL, PackedSequence)


class RNNCell(_CellBase):
    """Drop-in ``torch.nn.RNNCell`` on the fused op.

    Arguments as torch.nn's: ``input_size, hidden_size, bias=True, nonlinearity='tanh' (or 'relu'), device=None,
    dtype=None``; then keyword-only ``backend="auto"`` (or ``"cpp"``, ``"cuda"``, ``"numba"``,
    ``"reference"``). ``forward(input, hx=None)`` takes (B, input_size) or unbatched
    (input_size,) input and returns the new state, (B, hidden_size) or (hidden_size,).
    """

    _gates = 1

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None,
                 *, backend="auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend,
                         mode=self._mode_of(nonlinearity))

    @staticmethod
    def _mode_of(nonlinearity):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: Unknown nonlinearity: {nonlinearity!r}")
        return "rnn_" + nonlinearity

    @property
    def nonlinearity(self) -> str:
        return self.mode[4:]

    @nonlinearity.setter
    def nonlinearity(self, value):  # torch.nn's cell reads it at every call: a change takes effect
        self.mode = self._mode_of(value)  # (rebuilds the inference plan)


class GRUCell(_CellBase):
    """Drop-in ``torch.nn.GRUCell`` on the fused op.

    Arguments as torch.nn's: ``input_size, hidden_size, bias=True, device=None,
    dtype=None``; then keyword-only ``backend="auto"`` (or ``"cpp"``, ``"cuda"``, ``"numba"``,
    ``"reference"``) and ``reset_after=True`` (``False``: the original GRU form, as
    for ``GRU``). ``forward(input, hx=None)`` takes (B, input_size) or unbatched
    (input_size,) input and returns the new state, (B, hidden_size) or (hidden_size,).
    """

    _gates = 3

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend="auto",
                 reset_after=True):
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend,
                         reset_after=reset_after, mode="gru")


_CALL_SLOT_CLASSES = frozenset()
_FASTPATH_CALL = _FastPath.__call__
if _InferPlan is not None:
    # Calls of these classes' instances start in C++ (see _FastPath.__call__); their subclasses'
    # run __call__ (CPython gives a new class the slot of its __call__ attribute)
    from ._C import has_call_slot as _has_call_slot
    from ._C import install_call_slot as _install_call_slot

    _CALL_SLOT_CLASSES = frozenset({RNN, GRU, RNNCell, GRUCell})
    _install_call_slot(tuple(_CALL_SLOT_CLASSES), _FASTPATH_CALL, _FastPath._call_after)


_FROM_TORCH = {nn.GRU: GRU, nn.RNN: RNN, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


_TO_TORCH = {v: k for k, v in _FROM_TORCH.items()}


def _check_plain(fn, module):
    from torch.nn.utils import parametrize

    names = module._parameters
    if (parametrize.is_parametrized(module) or any(n.endswith("_orig") for n in names)
            or any(n.endswith("_g") and n[:-2] + "_v" in names for n in names)):
        raise ValueError(f"{fn}: the module's weights are parametrized (weight_norm, spectral_norm, "
                         "parametrize) or pruned; convert the plain module and apply them to the converted one "
                         "(its weights are read as attributes, as torch.nn's), or remove them first "
                         "(parametrize.remove_parametrizations, prune.remove, remove_weight_norm, "
                         "remove_spectral_norm)")


def _convert_tree(fn, model, table, convert):
    """``model`` converted by ``convert`` where its type is a key of ``table``; any other module
    (a model): a deep copy with each submodule of such a type converted, the original untouched. A
    subclass of one is refused (its own code would be lost), as a model holding none. ``convert``
    is given the deep copy's modules, whose parameters the converted ones take over (_twin): a
    module held in two places is converted once and stays one, and a weight tied between modules
    stays tied, as in the copy."""
    from torch.nn.utils.parametrize import type_before_parametrizations

    lib = "torch.nn" if fn == "from_torch" else "rnnrec_fast"
    names = [f"{lib}.{c.__name__}" for c in table]
    expected = f"{fn}: expected {', '.join(names[:-1])} or {names[-1]}"

    def convertible(m):
        cls = type_before_parametrizations(m)  # (a parametrized module is refused by convert, saying so)
        if cls not in table and isinstance(m, tuple(table)):
            raise TypeError(f"{expected}, got {cls.__name__} (a subclass of one: its own code would be lost)")
        return cls in table

    found = [m for m in model.modules() if convertible(m)]
    keeper = None if fn != "to_torch" else next(
        (m for m in model.modules() if getattr(m, "_keeps_rnnrec_fast_modules", False)), None)
    if keeper is not None:
        raise TypeError(f"to_torch: {type(keeper).__name__}'s own code calls its recurrent layers with what only "
                        "rnnrec_fast's modules take (resets, reset_after, the backend): it keeps them")
    if not found:
        raise TypeError(f"{expected} (or a model holding some), got {type(model).__name__}")
    for m in found:  # (the converters' own check, before the copy: the hook-based weight_norm's
        _check_plain(fn, m)  # weights refuse deepcopy)
    out = copy.deepcopy(model)
    done = {}  # id of a module of the copy -> (the module, its conversion or itself)

    def rebuilt(m):
        """m with its submodules rebuilt first (a converted module takes its children as they are
        then: a convertible one registered on another is converted too), then converted itself
        where it is convertible; once per module (a module held in two places stays one)."""
        if id(m) not in done:
            done[id(m)] = (m, m)  # (a cycle back to m meets m itself: repointed below)
            for name, child in list(m._modules.items()):  # (named_children names a shared child once)
                new = None if child is None else rebuilt(child)
                if new is not child:
                    setattr(m, name, new)
            if convertible(m):
                done[id(m)] = (m, convert(m))
        return done[id(m)][1]

    result = rebuilt(out)
    # a child that points back at a module whose conversion was under way (a cycle in the module
    # graph, which torch allows) still holds that module: repointed at its conversion (the entries
    # keep the copy's modules alive, so an id still names its module)
    for m in list(result.modules()):
        for name, child in list(m._modules.items()):
            entry = done.get(id(child))
            if child is not None and entry is not None and entry[0] is child and entry[1] is not child:
                setattr(m, name, entry[1])
    return result


def from_torch(module: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Convert a ``torch.nn`` RNN / GRU / RNNCell / GRUCell (weights included) in one call; given
    any other module (a whole model), a copy of it with each of those inside converted."""
    return _convert_tree("from_torch", module, _FROM_TORCH, lambda m: _from_torch_one(m, backend))


def _from_torch_one(module, backend):
    if getattr(module, "proj_size", 0):
        raise ValueError("from_torch: proj_size is not supported")
    return _twin(module, _FROM_TORCH[type(module)], backend=backend)


def _twin(module, cls, **extra):
    """A ``cls`` with ``module``'s configuration, parameters (the same Parameter objects: ``module``
    is _convert_tree's deep copy), mode, hooks and attributes of its own (those that neither
    class's modules have: a user's)."""
    # dtype and device from its own weights (Parameters, or plain tensors where it holds them so;
    # not a submodule's)
    weights = [t for t in module._parameters.values() if t is not None] + \
        [v for k, v in vars(module).items() if k.startswith(("weight_", "bias_")) and isinstance(v, torch.Tensor)]
    if not weights:
        raise ValueError(f"{type(module).__module__}.{type(module).__name__} holds none of its weights: nothing "
                         "to convert")
    p = weights[0]
    kwargs = dict(bias=module.bias, device=p.device, dtype=p.dtype, **extra)
    if hasattr(module, "num_layers"):  # the sequence modules
        kwargs.update(num_layers=module.num_layers, batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional)
    if hasattr(module, "nonlinearity"):
        # (the sequence RNNs' forward follows mode, which nonlinearity only sets at construction: a
        # mode set later is what the module runs)
        mode = getattr(module, "mode", None) if hasattr(module, "num_layers") else None
        mode = _OP_MODES.get(mode) if isinstance(mode, str) else None
        kwargs["nonlinearity"] = mode[4:] if mode in ("rnn_tanh", "rnn_relu") else module.nonlinearity
    twin = cls(module.input_size, module.hidden_size, **kwargs)
    # The weights as the module holds them (frozen ones stay frozen, tied ones tied): every name of
    # its _parameters (named_parameters lists a Parameter tied under two names once: the other
    # name kept the twin's random weight), and a weight it holds as a plain tensor (deleted and set
    # again, as WeightDrop does), or not at all, loses the twin's Parameter of that name first, as
    # `del` did on the module (a plain tensor set over a Parameter is refused: torch's TypeError)
    plain = [name for name in twin._parameters if name not in module._parameters]
    for name in plain:
        delattr(twin, name)
    for name, p in module._parameters.items():
        setattr(twin, name, p)
    for name in plain:
        if name in module.__dict__:
            setattr(twin, name, module.__dict__[name])
    # in the module's order (named_parameters, state_dict, an optimizer's state by position), the
    # dict reordered in place (the modules' plans hold it)
    ordered = [(name, twin._parameters[name]) for name in module._parameters]
    twin._parameters.clear()
    twin._parameters.update(ordered)
    # buffers and submodules a user registered on it (neither class's modules have any of their own)
    for name, b in module._buffers.items():
        twin.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        twin.add_module(name, child)
    own = _standard_attributes(type(module)) | _standard_attributes(cls)
    for key, value in module.__dict__.items():
        # the hooks (forward, backward, state_dict's; their dicts are every module's) and the rest
        if ("_hook" in key or key not in own) and key not in plain:
            twin.__dict__[key] = value
    twin.training = module.training  # (its own mode: the submodules keep theirs)
    return twin


@functools.cache
def _standard_attributes(cls):
    """The instance attributes every module of ``cls`` has (a 1 x 1 one's)."""
    return frozenset(vars(cls(1, 1)))


def to_torch(module: nn.Module) -> nn.Module:
    """The ``torch.nn`` twin of an rnnrec_fast RNN / GRU / RNNCell / GRUCell, weights included
    (for what needs torch.nn's own classes: ``quantize_dynamic``, code that checks
    ``isinstance(m, nn.GRU)``; ONNX export needs none); given any other module (a whole model), a copy of it with each of
    those inside converted. GRU with ``reset_after=False`` has no torch.nn form and is refused."""
    return _convert_tree("to_torch", module, _TO_TORCH, _to_torch_one)


def _to_torch_one(module):
    if module._op_mode == "gru" and not module.reset_after:
        raise ValueError(f"to_torch: {type(module).__name__}(reset_after=False), the original GRU form, has no "
                         "torch.nn counterpart")
    return _twin(module, _TO_TORCH[type(module)])

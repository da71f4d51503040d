"""A lower-overhead step + score for ``rnnrec_fast.recsys.GRU4Rec`` models.

``model.step`` is general (any device, training toggles, full input validation by
``rnnrec_fast.GRU``); per click that Python overhead is a large part of the latency. This module
runs all GRU layers in one call of the C++ inference path (the one the modules use without
autograd), or of the fused op ``torch.ops.rnnrec_fast.recurrence`` where that does not apply,
directly on detached weights, and scores with one GEMM on the same weights; a lone click (one session
one step) runs as one C++ call from its stored state to its top-k (``click_row``: ``_C.click_topk``),
and so does a batch of clicks of distinct sessions (``click_rows``: ``_C.click_rows_topk``, its
scores and top-k by the extension's GEMM kernel on a packed copy of the output weights). Without
the extension, on the numba backend, the steps call numba's CPU kernels directly on NumPy views of
the weights (``_numba_layers``), as the modules' inference path does.
It is used only when the model has the GRU4Rec layout
it expects *and* it reproduces ``model.step`` / ``model.score`` on a random probe at construction
(see :func:`build`); otherwise the recommender calls ``model.step`` / ``model.score``.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from functools import cached_property

import torch
import torch.nn.functional as F

from .. import ops

try:  # the modules' C++ inference fast path, the few-rows product, the click's score + top-k, all three
    from .._C import click_topk as _click_topk, infer as _infer, linear_rows as _linear_rows, score_topk as _score_topk
    from .._C import click_rows_topk as _click_rows_topk, pack_scores_weights as _pack_scores_weights
    from .._C import score_topk_rows as _score_topk_rows
except Exception:  # not built, or failed to load (as rnnrec_fast.ops)
    _click_topk = _infer = _linear_rows = _score_topk = None
    _click_rows_topk = _pack_scores_weights = _score_topk_rows = None


_GRU = ops.MODES["gru"]


# Optimiser steps over the tensors a fast path copies (Wy, By, eye0), counted by id. torch.optim's
# fused optimisers (fused=True: Adam, AdamW, SGD, Adagrad) update parameters in place without
# raising their version counters (each stays at 0 through step(), torch 2.13), and so does an
# optimiser of one's own writing through ``p.data``: stale() would miss those updates, and batches
# would score with the old Wy's packed copy while a lone click reads the new Wy. A global
# post-step hook (torch.optim.optimizer's register_optimizer_step_post_hook: every Optimizer
# subclass's step), registered with the first fast path, counts the steps of every optimiser
# holding a watched tensor (~35-45 ns a parameter a step, ad hoc, for any optimiser in the process).
_steps: dict[int, int] = {}
_steps_lock = threading.Lock()
_steps_hook = None


def _count_steps(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            k = id(p)
            if k in _steps:
                _steps[k] += 1


def _watch_steps(tensors):
    """Counts from now on the optimiser steps over ``tensors``; returns their counts."""
    global _steps_hook
    with _steps_lock:
        if _steps_hook is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _steps_hook = register_optimizer_step_post_hook(_count_steps)
        for t in tensors:
            if id(t) not in _steps:
                _steps[id(t)] = 0
                weakref.finalize(t, _steps.pop, id(t), None)  # (an id is reused once t is gone)
    return steps_of(tensors)


def steps_of(tensors):
    return [_steps.get(id(t), 0) for t in tensors]


class FastGRU4Rec:
    def __init__(self, model):
        rnn = model.rnn
        L = model.num_layers
        # What this path reads, for stale(), taken before anything is copied (an update racing with
        # the copies then shows as a change): each submodule and parameter as (owner's dict, key,
        # object), to see one replaced; the parameters' storage, to see one swapped through
        # ``p.data = ...`` (the views below would keep the old memory); the versions of the two
        # whose values are copied (Wy into its packed copies, By), to see in-place updates
        # (load_state_dict, an optimiser step), and the optimiser steps over them (_watch_steps: a
        # fused optimiser's raise no version). The other tensors are views: updates show through.
        # (Wt and the oneDNN copy are made at their first use, from Wy as it is then: an update
        # landing between a click's stale() check and that use is in them for that click, as in
        # the views, and the next click's check rebuilds.)
        # A one-hot model's first layer is GRU4Rec's GRU embedding: its input is the item's row of
        # W0 (already the input projection), taken through an identity W_ih (eye0, a buffer); its
        # other layers, if any, are the rnn module's.
        onehot, own, n_rnn = _layout(model)
        names = _rnn_weight_names(n_rnn)
        watch = [(model._modules, "rnn", rnn)]
        watch += [(model._parameters, n, model._parameters[n]) for n in own if model._parameters.get(n) is not None]
        if onehot:
            watch.append((model._buffers, "eye0", model._buffers["eye0"]))
        if rnn is not None:
            watch += [(rnn._parameters, n, rnn._parameters[n]) for n in names if rnn._parameters.get(n) is not None]
        self._watch = watch
        self._params = [o for _, _, o in watch[1:]]
        self._ptrs = [p.data_ptr() for p in self._params]
        # A one-hot first layer's identity W_ih (eye0) is not multiplied by where it is exactly the
        # identity (projected0: the item's W0 row is the projection as it stands; the same bits for
        # finite rows): its version is watched, as the copied ones', so that a change in place is
        # seen (taken before it is looked at; a write through .data or NumPy is not seen, as for Wy).
        self._copied = [model.Wy, model.By] + ([model.eye0] if onehot else [])
        self._versions = [p._version for p in self._copied]
        self._steps = _watch_steps(self._copied)  # (the updates that raise no version: above)
        self.projected0 = bool(onehot) and _is_identity(model.eye0)
        self.L = L
        self.reset_after = bool(model.reset_after)
        self.backend = getattr(rnn if rnn is not None else model, "backend", "auto")
        if onehot:
            self.emb = model.W0.detach()
        elif model.embedding == "shared":
            self.emb = model.Wy.detach()
        else:
            self.emb = model.E.detach()
        self.layers = []
        if onehot:
            self.layers.append(tuple(w.detach() for w in (model.eye0, model.w_hh0, model.b_ih0, model.b_hh0)))
        for layer in range(len(names) // 4):
            ws = [getattr(rnn, n, None) for n in names[4 * layer:4 * layer + 4]]
            self.layers.append(tuple(None if w is None else w.detach() for w in ws))
        self.Wy = model.Wy.detach()
        self.by = model.By.detach().reshape(-1).contiguous()
        self.rows_fast = (_linear_rows is not None and _score_topk is not None and self.Wy.device.type == "cpu"
                          and self.Wy.dtype == torch.float32 and self.Wy.is_contiguous())
        self.wy_small = self.Wy.numel() * self.Wy.element_size() <= _ROWS_MAX_BYTES_1T
        self.op = torch.ops.rnnrec_fast.recurrence
        # Wy packed for the extension's GEMM kernel: a batch's scores and top-k in one call
        # (score_topk_rows); None where that kernel does not run
        self.packed_rows = _pack_scores_weights(self.Wy) if _pack_scores_weights is not None else None
        # All layers in one C++ call where the extension is there (it declines, returning None,
        # whenever it does not apply: autograd on, another device or dtype).
        flat = [w for layer in self.layers for w in layer]
        self.infer = _infer if (_infer is not None and self.backend in ("auto", "cpp")
                                and all(w is not None for w in flat)) else None
        self.flat = flat
        self.click = _click_topk if self.infer is not None and _click_topk is not None else None
        self.click_batch = (_click_rows_topk if self.infer is not None and self.packed_rows is not None
                            and _click_rows_topk is not None else None)
        # The recurrence kernels a step runs on (the op's resolution of the model's backend for
        # these tensors: "cpp" where the C++ call above runs, as the op would pick it).
        self.kernels = ops.resolve_backend(self.backend, self.Wy.device.type, self.Wy.dtype)
        # Without that C++ call, numba's CPU kernels on NumPy views of the weights, as the modules'
        # _PyInferPlan calls them, where the op's dispatch and checks would be most of a click
        # (B1 H100 one layer, extension absent: ~157 us a step through the op, ~25 directly).
        self.np_layers = None
        if self.infer is None and self.kernels == "numba" and self.Wy.device.type == "cpu":
            arrays = (self.emb, *flat)
            if all(w is not None and w.dtype == self.Wy.dtype and w.is_contiguous() for w in arrays):
                from ..backends import numba_backend
                self.run_numba = numba_backend.run_layers_cpu
                self.np_emb = self.emb.numpy()
                self.np_layers = [tuple(w.numpy() for w in layer) for layer in self.layers]

    @cached_property
    def Wt(self):
        """Wy.t() contiguous, (H, n_items): a faster GEMM/GEMV layout on CPU than Wy.t(), for
        :meth:`score`'s few rows off the few-rows product; one more copy of Wy, made at its first
        use (most set-ups never take that path)."""
        return self.Wy.t().contiguous()

    @cached_property
    def packed(self):
        """Wy reordered for oneDNN's GEMM (:func:`_pack_for_onednn`), or None; for :meth:`score`'s
        batches of 4+ rows, which the packed kernel's score_topk_rows mostly spares: one more copy
        of Wy, made at its first use."""
        return _pack_for_onednn(self.Wy, self.by)

    def stale(self):
        """Whether the model's weights changed since this was built (see __init__; ~1.5 us a
        click): the recommender then builds a new one."""
        for owner, key, obj in self._watch:
            if owner.get(key) is not obj:
                return True
        return ([p._version for p in self._copied] != self._versions
                or [p.data_ptr() for p in self._params] != self._ptrs
                or steps_of(self._copied) != self._steps)

    def step(self, items, h):
        """items (B,) int64, h (L, B, H) -> new state (L, B, H)."""
        x = F.embedding(items, self.emb).unsqueeze(0)
        if self.np_layers is not None and h.dtype == self.Wy.dtype and h.is_cpu and not h.requires_grad:
            return self._numba_layers(x.numpy(), h.numpy())
        if self.infer is not None:
            r = self.infer(x, h, self.flat, 2, self.reset_after, self.L, False, False, 1, self.projected0)
            if r is not None:
                return r[1]
        op, ra, be = self.op, self.reset_after, self.backend
        if self.L == 1:
            w = self.layers[0]
            return op(x, h[0], w[0], w[1], w[2], w[3], None, None, "gru", ra, be)[1].unsqueeze(0)
        out = []
        for layer, w in enumerate(self.layers):
            x, hn = op(x, h[layer], w[0], w[1], w[2], w[3], None, None, "gru", ra, be)[:2]
            out.append(hn)
        return torch.stack(out)

    def step_row(self, idx, row):
        """One click of one session: item index ``idx`` (int), state ``row`` (L, H) -> new (L, H)."""
        if self.infer is not None:  # (T=1, H) unbatched input, (L, H) state
            r = self.infer(self.emb[idx:idx + 1], row, self.flat, 2, self.reset_after, self.L, False, False, 1,
                           self.projected0)
            if r is not None:
                return r[1]
        if self.np_layers is not None and row.dtype == self.Wy.dtype:
            return self._numba_layers(self.np_emb[None, idx:idx + 1], row.numpy()[:, None])[:, 0]
        x = self.emb[idx:idx + 1].unsqueeze(0)
        op, ra, be = self.op, self.reset_after, self.backend
        if self.L == 1:
            w = self.layers[0]
            return op(x, row, w[0], w[1], w[2], w[3], None, None, "gru", ra, be)[1]
        out = []
        for layer, w in enumerate(self.layers):
            x, hn = op(x, row[layer:layer + 1], w[0], w[1], w[2], w[3], None, None, "gru", ra, be)[:2]
            out.append(hn)
        return torch.cat(out)

    def _numba_layers(self, x, h):
        """Every layer's step on numba's CPU kernels: x (1, B, I) and h (L, B, H) NumPy arrays ->
        the new state, a (L, B, H) tensor."""
        out = torch.empty(h.shape, dtype=self.Wy.dtype, device="cpu")
        self.run_numba(x, h, self.np_layers, _GRU, self.reset_after, out.numpy())
        ops._set_last("numba")
        return out

    def click_row(self, idx, slab, slot, k, exclude):
        """One click of one session in one C++ call: the step of item index ``idx`` from the state
        ``slab[slot]`` (L, H), the new state written back there, and :meth:`topk_row`'s top-k of its
        top layer (``exclude``: a list of indices): ``(scores, indices)`` lists, the same as
        :meth:`step_row`, the copy back and :meth:`topk_row`; or None, nothing changed, where it
        does not apply (then take those)."""
        if self.click is not None and self._rows_path():
            return self.click(self.emb, idx, slab, slot, self.flat, self.reset_after, self.Wy, self.by, k, exclude,
                              self.projected0)
        return None

    def click_rows(self, idxs, slab, slots, k, exclude):
        """A batch of clicks of distinct sessions in one C++ call: row p steps ``slab[slots[p]]``
        (L, H) with item index ``idxs[p]``, the new states are written back, and the top-k of their
        top layers are returned as :meth:`score_topk_rows` gives them (``exclude``: one index list
        per row, or empty): the same as :meth:`step` on the gathered states, the copy back and
        :meth:`score_topk_rows`; or None, nothing changed, where it does not apply."""
        if self.click_batch is not None:
            return self.click_batch(self.emb, idxs, slab, slots, self.flat, self.reset_after, self.Wy,
                                    self.packed_rows, self.by, k, exclude, self.projected0)
        return None

    def topk_row(self, h_row, k, exclude):
        """The click's top-k for one state ``h_row`` (H,): ``(scores, indices)`` lists, best first,
        ``exclude`` (indices) at -inf; one C++ call (scores, selection and the lists) where the
        few-rows product applies (see :meth:`score`), else None."""
        if self._rows_path():
            return _score_topk(h_row, self.Wy, self.by, k, exclude or [])
        return None

    def score_topk_rows(self, h_top, k, exclude):
        """The top-k of a batch's scores in one C++ call: ``h_top`` (B, H) -> ``(values, indices)``
        (B, k) tensors, as ``torch.topk(score(h_top), k)`` with each row's ``exclude`` (a list of
        index lists, one per row, or empty for none) at -inf first (NaN first, equal scores in index
        order); the scores are never materialised as a tensor. None where it does not apply (no
        packed weights, a tensor it does not take): then score and select. Over 4M scores, it scores
        a block of rows at a time."""
        if self.packed_rows is None:
            return None
        return _score_topk_rows(h_top, self.Wy, self.packed_rows, self.by, k, exclude)

    def _rows_path(self):
        """Whether a few rows go through the extension's few-rows product (see :meth:`score`)."""
        return self.rows_fast and (self.wy_small or torch.get_num_threads() > 1)

    def score(self, h_top):
        """(B, H) -> (B, n_items). Batches of 4+ rows use oneDNN's GEMM on a prepacked copy of
        Wy when available (about 2x MKL's on this AMD CPU); batches over 64 rows are padded to one
        of a few row counts (:func:`onednn_rows`): oneDNN keeps ~0.6 MB of generated code and state
        for each row count it sees (batches of every size up to 4096 grew the process by ~1 GB). Fewer rows use the extension's
        few-rows product, which streams Wy once and splits it over threads, where it measured
        faster than MKL's GEMV (one thread: Wy up to ~8 MiB, that is ~20k items at H=100, 2,933
        items 28 -> 20 us; two threads: every size measured, up to 100k items), else MKL's GEMV."""
        B = h_top.shape[0]
        if B >= _ONEDNN_MIN_ROWS and self.packed is not None:
            P = onednn_rows(B)
            x = h_top.contiguous()
            if P != B:  # zero rows below, their scores dropped
                x = torch.cat([x, x.new_zeros(P - B, x.shape[1])])
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.by, "none", [], "")[:B]
        if self._rows_path():
            return _linear_rows(h_top, self.Wy, self.by)
        return torch.addmm(self.by, h_top, self.Wt)


def _layout(model):
    """``(onehot, own, n_rnn)``: whether the model takes one-hot input (its first layer then the
    model's own), the names of the model's own parameters the path reads, and its rnn module's
    layer count."""
    onehot = model.embedding == 0
    own = ("W0", "w_hh0", "b_ih0", "b_hh0", "Wy", "By") if onehot else ("E", "Wy", "By")
    return onehot, own, model.num_layers - 1 if onehot else model.num_layers


def _is_identity(w):
    """Whether ``w`` is exactly a square identity matrix (ones on its diagonal, zeros elsewhere;
    no identity of its size is made to compare with)."""
    with torch.no_grad():
        return (w.dim() == 2 and w.shape[0] == w.shape[1] and bool((w.diagonal() == 1).all())
                and int(torch.count_nonzero(w)) == w.shape[0])


def _rnn_weight_names(layers):
    """The GRU's weight names, layer by layer: weight_ih, weight_hh, bias_ih, bias_hh of each."""
    return [f"{w}_l{layer}" for layer in range(layers) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


_ONEDNN_MIN_ROWS = 4
_ONEDNN_EXACT_ROWS = 64  # the HTTP service's default batches (max_batch 64) keep their own row count


def onednn_rows(B):
    """The row count a batch of ``B`` (>= 4) rows is scored at by oneDNN: ``B`` itself up to 64,
    beyond that the smallest of 96, 128, 192, 256, ... (2^k and 3 * 2^(k-1)) that holds it: at most
    1.5x the rows, two row counts per doubling (73 row counts in all up to 4096)."""
    if B <= _ONEDNN_EXACT_ROWS:
        return B
    p = 1 << ((B - 1).bit_length() - 1)  # the power of two with p < B <= 2p
    return p + p // 2 if B <= p + p // 2 else 2 * p


_ROWS_MAX_BYTES_1T = 8 << 20  # one thread: MKL's GEMV streams a larger Wy from DRAM faster


def _pack_for_onednn(W, b):
    """``W`` reordered for ``torch.ops.mkldnn._linear_pointwise`` (what inductor's weight
    freezing uses), or None when oneDNN is not there or disagrees with ``F.linear`` on a probe."""
    try:
        if W.device.type != "cpu" or W.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(W)
        x = torch.randn(_ONEDNN_MIN_ROWS + 3, W.shape[1], generator=torch.Generator().manual_seed(1), device="cpu")
        got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        if not torch.allclose(got, F.linear(x, W, b), rtol=1e-4, atol=1e-4):
            return None
        return packed
    except Exception:  # noqa: BLE001 - private op: any trouble, use MKL
        return None


def build(model):
    """A :class:`FastGRU4Rec` for ``model`` when it applies and matches the model's own step and
    score on a probe; else None."""
    return build_or_retry(model)[0]


def build_or_retry(model):
    """``(fast, retry)``: :func:`build`'s result, and whether to try again at the next click in
    eval mode: it was declined, and the model was in training mode when the attempt began or ended
    (a switch during the attempt counts), or its weights changed during the attempt (an update
    racing with the probe: a disagreement that says nothing of the fast path)."""
    was_training = model.training
    fast, changed = _build(model)
    return fast, fast is None and (was_training or model.training or changed)


def _weights_state(model):
    """What tells that any of the model's weights changed: each one's identity, memory and version,
    and the optimiser steps counted over the watched ones (_watch_steps)."""
    params = list(model.parameters())
    return [(id(p), p.data_ptr(), p._version) for p in params] + steps_of(params)


def _build(model):
    """``(fast or None, whether the weights changed while the probe compared it with the model)``."""
    try:
        if type(model).__name__ != "GRU4Rec" or model.training:
            return None, False
        onehot, own, n_rnn = _layout(model)
        rnn = model.rnn
        if (rnn is None) != (n_rnn == 0):
            return None, False
        if rnn is not None:
            if rnn.num_layers != n_rnn or getattr(rnn, "bidirectional", False):
                return None, False
            if getattr(rnn, "mode", "gru") not in ("gru", "GRU"):
                return None, False
            # Only registered parameters read as themselves: a parametrized weight (parametrize,
            # weight_norm) is computed on each read, so the copy taken here would never see its
            # source change (stale() watches the registered ones).
            if any(getattr(rnn, n, None) is not rnn._parameters.get(n) for n in _rnn_weight_names(n_rnn)):
                return None, False
        if any(getattr(model, n, None) is not model._parameters.get(n) for n in own):
            return None, False
        if onehot and getattr(model, "eye0", None) is not model._buffers.get("eye0"):
            return None, False
        before = _weights_state(model)
        fast = FastGRU4Rec(model)
        g = torch.Generator().manual_seed(0)
        B = 3
        dev = model.Wy.device
        # (the probe's inputs drawn on the CPU, as its generator: not on a default device set elsewhere)
        items = torch.randint(0, model.n_items, (B,), generator=g, device="cpu").to(dev)
        h = (torch.rand(model.num_layers, B, model.hidden_size, generator=g, device="cpu") - 0.5).to(dev, model.Wy.dtype)
        with torch.no_grad():
            ref_h = model.step(items, h)
            ref_s = model.score(ref_h[-1])
            got_h = fast.step(items, h)
            got_s = fast.score(got_h[-1])
            got_r = fast.step_row(int(items[0]), h[:, 0])
            k = min(5, model.n_items)
            got_t = fast.score_topk_rows(got_h[-1], k, [])  # (the batch's scores from the packed copy)
            top_ok = got_t is None or torch.allclose(got_t[0], torch.topk(ref_s, k).values, rtol=1e-5, atol=1e-5)
        if not (torch.allclose(got_h, ref_h, rtol=1e-5, atol=1e-6) and top_ok
                and torch.allclose(got_r, ref_h[:, 0], rtol=1e-5, atol=1e-6) and torch.allclose(got_s, ref_s, rtol=1e-5, atol=1e-5)):
            changed = fast.stale() or _weights_state(model) != before
            if not model.training and not changed:  # (a mode switch or an update during the probe explains it)
                warnings.warn("rnnrec_fast.serving: the fast path disagrees with model.step/score; not using it",
                              RuntimeWarning, stacklevel=4)
            return None, changed
        return fast, False
    except Exception:  # noqa: BLE001 - any surprise: use the model's own methods
        return None, False

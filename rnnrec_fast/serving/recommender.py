"""In-process session recommender: one recurrent step per click, top-k over the catalogue."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict

import numpy as np
import torch

from .._checks import is_int_at_least
from ..recsys.data import ItemMap
from . import fastpath as _fastpath
from .store import SessionStore

try:  # torch.topk(scores, k, dim=1) by one selection pass per row (csrc/rnnrec_cpu.cpp)
    from .._C import topk_rows as _topk_rows
except Exception:  # not built, or failed to load (as rnnrec_fast.ops)
    _topk_rows = None


def _shown(value) -> str:
    """repr(value) for an error message, cut to about 80 characters; an int too long for Python to
    write out (ValueError past 4,300 digits) by its size."""
    try:
        shown = repr(value)
    except ValueError:
        return f"<an int of about {int(value.bit_length() * 0.30103) + 1} digits>"
    return shown[:60] + f"... ({len(shown)} characters)" if len(shown) > 80 else shown


class ServingError(Exception):
    """Base class of the errors the serving API raises for bad input."""


class UnknownItemError(ServingError, LookupError):
    """An item id that is not in the model's catalogue."""

    def __init__(self, item_id):
        super().__init__(f"unknown item id {_shown(item_id)} (not in the model's catalogue)")
        self.item_id = item_id

    def __str__(self):  # LookupError/KeyError would repr() the message
        return self.args[0]


class InvalidRequestError(ServingError, ValueError):
    """A malformed request: bad k, mismatched lengths, a batch over max_batch, ..."""


DEFAULT_K = 20


_ID_TYPES = frozenset((int, str))  # exact types: bool (an int subclass) is refused


def _check_session_id(sid):
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise TypeError(f"session_id must be a str or an int, got {type(sid).__name__}")
    return sid


def _check_exclude_seen(excl):
    """``exclude_seen`` as a bool: True or False (a NumPy bool too), nothing else (its truth value
    would take "no", 0.0 or a list of flags as an answer, silently)."""
    if not isinstance(excl, (bool, np.bool_)):
        raise TypeError(f"exclude_seen must be True or False, got {type(excl).__name__}")
    return bool(excl)


class SessionRecommender:
    """Serves next-click recommendations from a recurrent session model.

    ``model`` follows the ``rnnrec_fast.recsys`` interface: ``item_ids``, ``item_index``,
    ``n_items``, ``hidden_size``, ``num_layers``, ``init_state(B)``, ``step(items, h)`` and
    ``score(h_top)`` (and ``item_map``, else one is built from ``item_ids``).

    Item ids are looked up as the model does (``ItemMap.lookup``): an id matches in its int form
    (``int`` or a numpy integer) or its canonical str form, so ``214826715`` and ``"214826715"``
    are the same item.

    Thread safety: one lock serialises every read-modify-write of session states (look up, step,
    write back), so concurrent callers never see each other's state and the clicks of one session
    are applied in the order the calls take the lock. Scoring and top-k run outside the lock, on
    the caller's private copy of the new state; but for a one-click call on the C++ fast path
    (``serving.fastpath``), whose step, write-back, scoring and top-k are one C++ call that holds
    the GIL throughout as the separate scoring call does. The model's weights are not the lock's:
    change them while other threads click inside :meth:`updating` (or with :meth:`load_state_dict`),
    which waits for the clicks in flight and holds the others back, else a click racing with the
    change steps or scores with some weights old and others new.

    Args:
        model: the recommender (eval mode).
        max_sessions, ttl, max_seen, initial_capacity: see :class:`SessionStore`.
        max_k: the largest k a request may ask for (default: the catalogue size). Requests that
            give no k get ``min(20, max_k)``.
        max_batch: the largest batch :meth:`click_many` accepts.
        clock: monotonic clock (seconds) for the idle TTL.
        fast: for ``rnnrec_fast.recsys.GRU4Rec`` models, call the fused op and the scoring GEMM
            directly instead of ``model.step`` / ``model.score`` (less Python per click; used only
            when it reproduces the model's own methods on a probe, see ``serving.fastpath``).
    """

    def __init__(self, model, *, max_sessions=100_000, ttl=1800.0, max_seen=256, max_k=None,
                 max_batch=4096, initial_capacity=1024, clock=time.monotonic, fast=True):
        self.model = model
        # whether to build the fast path again at a click in eval mode: it was declined while the
        # model was in training mode, or while its weights changed (see fastpath.build_or_retry)
        self._fast_retry = False
        self._fast_wanted = bool(fast)
        built = None
        if fast:
            built, self._fast_retry = _fastpath.build_or_retry(model)
        self._use_fast(built)
        self.item_ids = list(model.item_ids)
        self.item_index = model.item_index
        self.item_map = getattr(model, "item_map", None)
        if self.item_map is None:
            self.item_map = ItemMap(self.item_ids)
        # the id -> index dict that ItemMap.lookup tries first (batches look ids up there directly)
        self._item_dict = self.item_map.item_index if type(self.item_map) is ItemMap else None
        self.n_items = int(model.n_items)
        if len(self.item_ids) != self.n_items:
            raise ValueError("model.item_ids and model.n_items disagree")
        self.hidden_size = int(model.hidden_size)
        self.num_layers = int(model.num_layers)
        if max_k is not None and not is_int_at_least(max_k, 1):
            raise ValueError(f"max_k must be a positive int or None, got {max_k!r}")
        self.max_k = self.n_items if max_k is None else min(int(max_k), self.n_items)
        self.default_k = min(DEFAULT_K, self.max_k)
        if not is_int_at_least(max_batch, 1):
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.max_batch = int(max_batch)
        with torch.no_grad():
            h0 = model.init_state(1)
        if tuple(h0.shape) != (self.num_layers, 1, self.hidden_size):
            raise ValueError(f"model.init_state(1) has shape {tuple(h0.shape)}, expected "
                             f"({self.num_layers}, 1, {self.hidden_size})")
        self._h0 = h0[:, 0].detach().clone()
        self.device = h0.device
        self.store = SessionStore(self.num_layers, self.hidden_size, max_sessions=max_sessions, ttl=ttl,
                                  dtype=h0.dtype, device=h0.device, initial_capacity=initial_capacity,
                                  max_seen=max_seen, clock=clock)
        self.clock = clock
        # Reentrant: a thread inside updating() may click (its own writes seen as they stand).
        self._lock = threading.RLock()
        # Calls whose scoring runs after their step, outside the lock (the model's weights still
        # read): updating() waits for them to end.
        self._scoring = 0
        self._scored = threading.Condition(self._lock)
        # updating() blocks waiting for them: new clicks wait for it (else a stream of clicks from
        # several threads kept the count above 0 for seconds); the thread inside the block clicks on
        self._updates_waiting = 0
        self._updater = None
        # every item index as a tensor once: a click's input is a view, no allocation
        self._all_items = torch.arange(self.n_items, dtype=torch.long, device=self.device)
        self._neg_inf = float("-inf")
        # item ids as a numpy array when they are all ints: batch results map to ids in one gather
        self._ids_np = None
        if self.device.type == "cpu" and all(type(i) is int for i in self.item_ids):
            try:
                self._ids_np = np.asarray(self.item_ids, dtype=np.int64)
            except OverflowError:
                pass

    def _use_fast(self, fast):
        self._fast = fast
        self._step = fast.step if fast is not None else self.model.step
        self._score = fast.score if fast is not None else self.model.score

    def _fresh_fast(self):
        """The fast path, rebuilt first when the model's weights changed since it was built
        (load_state_dict, an optimiser step, a replaced parameter or submodule: it holds copies of
        the output weights and views of the others). A change seen while the model is in training
        mode, or one landing during the rebuild, drops it until a later click in eval mode rebuilds
        it. Call under the lock."""
        fast = self._fast
        if (fast is not None and fast.stale()) or (fast is None and self._fast_retry and not self.model.training):
            self._rebuild_fast()
        return self._fast

    def _rebuild_fast(self):
        built, self._fast_retry = _fastpath.build_or_retry(self.model)
        self._use_fast(built)

    def _expire_locked(self):
        if self.store.ttl is not None:
            self.store.expire(self.clock())

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path, device="cpu", **kwargs):
        """Loads a recommender checkpoint written by ``rnnrec_fast.recsys.save_checkpoint``."""
        from rnnrec_fast.recsys import load_checkpoint

        model = load_checkpoint(path, device=device, train_state=False)
        model.eval()
        return cls(model, **kwargs)

    # ------------------------------------------------------------------ validation
    def item_to_index(self, item_id):
        """The catalogue index of an original item id (int or str form, see the class doc);
        UnknownItemError/TypeError otherwise."""
        if isinstance(item_id, bool) or not isinstance(item_id, (int, str, np.integer)):
            raise TypeError(f"item_id must be an int or a str, got {type(item_id).__name__}")
        idx = self.item_map.lookup(item_id)
        if idx is None:
            raise UnknownItemError(item_id)
        return idx

    def _indices(self, item_ids):
        """:meth:`item_to_index` of each id, as a list. Ints and strs found as they are in the
        item map's dict (what ``ItemMap.lookup`` tries first) take one C-level pass; any other id,
        or one not found that way, goes through :meth:`item_to_index` (the same answers, and its
        errors)."""
        index = self._item_dict
        if index is not None and set(map(type, item_ids)) <= _ID_TYPES:
            idxs = list(map(index.get, item_ids))
            if None not in idxs:
                return idxs
        return [self.item_to_index(i) for i in item_ids]

    def check_k(self, k):
        """``k`` as an int (a Python or NumPy integer in [1, max_k]); TypeError/InvalidRequestError
        otherwise."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= self.max_k:
            raise InvalidRequestError(f"k must be in [1, {self.max_k}], got {_shown(int(k))}")
        return int(k)

    # ------------------------------------------------------------------ API
    def click(self, session_id, item_id, k=None, exclude_seen=False):
        """Advances ``session_id`` by one click on ``item_id``; returns its top-k
        ``(item_ids, scores)`` (lists, best first; k None: ``default_k``). Bad input raises before
        any state changes."""
        _check_session_id(session_id)
        idx = self.item_to_index(item_id)
        k = self.check_k(self.default_k if k is None else k)
        exclude_seen = _check_exclude_seen(exclude_seen)
        vals, inds = self._click_core(session_id, idx, k, exclude_seen)
        ids = self.item_ids
        if exclude_seen:
            n = sum(1 for v in vals if v != self._neg_inf)
            vals, inds = vals[:n], inds[:n]
        return [ids[i] for i in inds], vals

    def _click_core(self, session_id, idx, k, exclude_seen):
        """One validated click; returns the top-k (scores, indices) as lists."""
        store = self.store
        with self._lock:
            if self._updates_waiting:
                self._let_update_pass()
            fast = self._fresh_fast()
            now = self.clock()
            if store.ttl is not None:
                store.expire(now)
            e = store.touch(session_id, now)
            new = e is None
            if new:
                e = store.create(session_id, now, self._h0)
            try:
                if fast is not None:
                    # the whole click in one C++ call where it applies (its scoring then runs under
                    # the lock, holding the GIL as the separate call does); the items to exclude:
                    # the session's seen items as they will be after this click
                    excl = self._seen_after(e, idx) if exclude_seen else []
                    top = fast.click_row(idx, store.slab, e.slot, k, excl)
                    if top is not None:
                        self._clicked(e, idx)
                        return top
                with torch.no_grad():
                    row = store.slab[e.slot]
                    if fast is not None:
                        h = fast.step_row(idx, row)  # (L, H)
                    else:
                        h = self._step(self._all_items[idx:idx + 1], row.unsqueeze(1))[:, 0]
                    row.copy_(h)
            except BaseException:
                if new:
                    store.discard(session_id)
                raise
            self._clicked(e, idx)
            seen = list(e.seen) if exclude_seen else None
            self._scoring += 1
        try:
            with torch.no_grad():
                if fast is not None:
                    top = fast.topk_row(h[-1], k, seen)
                    if top is not None:
                        return top
                scores = self._score(h[-1:] if self.num_layers > 1 else h)
                if exclude_seen:
                    scores[0, seen] = self._neg_inf
                vals, inds = self._topk(scores, k)  # (the batch's selection: the same order of ties)
            return vals[0].tolist(), inds[0].tolist()
        finally:
            self._scoring_done()

    def _scoring_done(self):
        with self._lock:
            self._scoring -= 1
            if not self._scoring:
                self._scored.notify_all()

    def _let_update_pass(self):
        """Under the lock, an updating() waiting for the clicks in flight: wait until it is done
        (but in the thread inside an updating() block)."""
        if self._updater != threading.get_ident():
            self._scored.wait_for(lambda: not self._updates_waiting)

    @contextlib.contextmanager
    def updating(self):
        """A block in which the model's weights may change while other threads click: no click
        then steps or scores with some weights old and others new (a click racing with
        ``load_state_dict`` or an optimiser step did, and a session kept the state it stepped to).
        It waits for the clicks in flight to end (new clicks wait behind it), holds every click and
        batch back until the block ends, then rebuilds the fast path (where the recommender uses one,
        the model in eval mode) whatever changed: also a write through ``.data``, which the version
        counters do not show, and after an exception in the block. Yields the model::

            with rec.updating() as model:
                model.load_state_dict(new_weights)

        The thread inside the block may click too (the lock is reentrant)."""
        with self._lock:
            outer = self._updater
            self._updates_waiting += 1
            try:
                self._scored.wait_for(lambda: self._scoring == 0)
                self._updater = threading.get_ident()
                yield self.model
            finally:
                try:
                    if self._fast_wanted:
                        self._rebuild_fast()
                finally:
                    self._updater = outer
                    self._updates_waiting -= 1
                    self._scored.notify_all()

    def load_state_dict(self, state_dict, strict=True):
        """``model.load_state_dict(state_dict, strict)`` inside :meth:`updating`: a hot reload of
        the weights while other threads serve clicks."""
        with self.updating() as model:
            return model.load_state_dict(state_dict, strict=strict)

    def _seen_after(self, e, idx):
        """Session entry ``e``'s seen items as :meth:`_clicked` will leave them after a click on
        ``idx`` (the items a one-call click excludes before its bookkeeping runs)."""
        max_seen = self.store.max_seen
        return (e.seen + [idx])[-max_seen:] if max_seen else []

    def _clicked(self, e, idx):
        """A click on item index ``idx`` applied to session entry ``e``: its count and seen items."""
        e.clicks += 1
        seen = e.seen
        seen.append(idx)
        if len(seen) > self.store.max_seen:
            del seen[0]

    def click_many(self, session_ids, item_ids, k=None, exclude_seen=False):
        """A batch of clicks in one fused step and one scoring GEMM + top-k (k None: ``default_k``).

        Returns one ``(item_ids, scores)`` per click, in input order. A session that appears more
        than once gets its clicks applied in input order (one step per occurrence). A batch with
        more distinct sessions than ``max_sessions`` runs as consecutive sub-batches that each hold
        at most ``max_sessions`` of them, so it gives what the same clicks one at a time give.
        Any bad input raises before any state changes."""
        if len(session_ids) != len(item_ids):
            raise InvalidRequestError(
                f"session_ids and item_ids differ in length ({len(session_ids)} vs {len(item_ids)})")
        if not set(map(type, session_ids)) <= _ID_TYPES:  # (the common case in one C pass)
            for s in session_ids:
                _check_session_id(s)
        idxs = self._indices(item_ids)
        k = self.check_k(self.default_k if k is None else k)
        exclude_seen = _check_exclude_seen(exclude_seen)
        if not idxs:
            return []
        if len(idxs) == 1:
            vals, inds = self.step_batch(list(session_ids), idxs, k, bool(exclude_seen))
        else:
            vals_t, inds_t = self._step_batch(list(session_ids), idxs, k, bool(exclude_seen))
            vals = vals_t.tolist()
            if self._ids_np is not None and not exclude_seen:
                return list(zip(self._ids_np[inds_t.numpy()].tolist(), vals))
            inds = inds_t.tolist()
        ids = self.item_ids
        out = []
        if exclude_seen:
            ninf = self._neg_inf
            for vr, ir in zip(vals, inds):
                n = sum(1 for v in vr if v != ninf)
                out.append(([ids[i] for i in ir[:n]], vr[:n]))
        else:
            for vr, ir in zip(vals, inds):
                out.append(([ids[i] for i in ir], vr))
        return out

    def step_batch(self, session_ids, idxs, k, exclude_seen=False):
        """The batched core on already validated input (list of session ids, list of item
        indices, k (an int, or a list with each click's k), bool or list of bools for exclude_seen).
        Returns ``(values, indices)`` as nested lists of the top-k scores and catalogue indices, one
        list of k (that click's k) per click. Where the one C++ call scores the batch, each row
        takes the first k of its max(k) best (the selection is the same total order); elsewhere each
        distinct k is one selection over its rows."""
        if isinstance(k, (list, tuple)):
            k = list(k)
            if len(k) != len(idxs):
                raise InvalidRequestError(f"{len(k)} values of k for {len(idxs)} clicks")
            if len(set(k)) == 1:
                k = k[0]
        if len(idxs) == 1:  # a lone click: the lower-overhead single-session path
            if len(idxs) > self.max_batch:
                raise InvalidRequestError(f"batch of 1 click exceeds max_batch={self.max_batch}")
            excl = bool(exclude_seen[0] if isinstance(exclude_seen, (list, tuple)) else exclude_seen)
            vals, inds = self._click_core(session_ids[0], idxs[0], k[0] if isinstance(k, list) else k, excl)
            return [vals], [inds]
        vals, inds = self._step_batch(session_ids, idxs, k, exclude_seen)
        if isinstance(vals, list):
            return vals, inds
        return vals.tolist(), inds.tolist()

    def _step_batch(self, session_ids, idxs, k, exclude_seen):
        B = len(idxs)
        if B > self.max_batch:
            raise InvalidRequestError(f"batch of {B} clicks exceeds max_batch={self.max_batch}")
        distinct = _by_last_click(session_ids)
        if len(distinct) <= self.store.max_sessions:
            return self._step_part(session_ids, idxs, k, exclude_seen, distinct)
        # more sessions than the store holds: consecutive parts of at most max_sessions sessions
        # each (a part never evicts its own sessions), in order, as if sent one part at a time
        per_row = isinstance(exclude_seen, (list, tuple))
        per_row_k = isinstance(k, list)
        vals, inds = [], []
        for a, b in _session_bounded_parts(session_ids, self.store.max_sessions):
            v, i = self._step_part(session_ids[a:b], idxs[a:b], k[a:b] if per_row_k else k,
                                   exclude_seen[a:b] if per_row else exclude_seen, _by_last_click(session_ids[a:b]))
            vals.append(v)
            inds.append(i)
        if per_row_k:
            return [r for v in vals for r in v], [r for i in inds for r in i]
        return torch.cat(vals), torch.cat(inds)

    def _topk(self, scores, k):
        """The top-k of each row of ``scores``: ``(values, indices)`` tensors (B, k) for an int k;
        for a list of per-row k, lists of per-row lists (one selection per distinct k)."""
        if not isinstance(k, list):
            if _topk_rows is not None and scores.dtype == torch.float32 and scores.device.type == "cpu":
                return _topk_rows(scores, k)  # one selection pass per row: faster than torch.topk here
            return torch.topk(scores, k, dim=1)
        vals, inds = [None] * len(k), [None] * len(k)
        groups = {}
        for p, kp in enumerate(k):
            groups.setdefault(kp, []).append(p)
        for kp, rows in groups.items():
            v, i = self._topk(scores[rows], kp)
            for p, vr, ir in zip(rows, v.tolist(), i.tolist()):
                vals[p], inds[p] = vr, ir
        return vals, inds

    def _step_part(self, session_ids, idxs, k, exclude_seen, distinct):
        """One fused batch whose ``distinct`` sessions (in order of their last click) fit in the store."""
        B = len(idxs)
        rounds = None
        if len(distinct) < B:
            # round r holds the r-th occurrence of each session (rounds run in order)
            occ = {}
            rounds = [[]]
            for p, sid in enumerate(session_ids):
                r = occ.get(sid, 0)
                occ[sid] = r + 1
                if r == len(rounds):
                    rounds.append([])
                rounds[r].append(p)
        per_row_excl = isinstance(exclude_seen, (list, tuple))
        any_excl = any(exclude_seen) if per_row_excl else bool(exclude_seen)
        k_top = max(k) if isinstance(k, list) else k  # (the one-call paths select each row's max(k))
        store = self.store
        dev = self.device
        with torch.no_grad():
            with self._lock:
                if self._updates_waiting:
                    self._let_update_pass()
                fast = self._fresh_fast()
                step = self._step
                now = self.clock()
                store.expire(now)
                m = store._map
                evict = _lru_evictions(m, session_ids, distinct, store.max_sessions)
                for sid in evict:  # what the clicks one at a time evict before reaching them
                    store.discard(sid)
                store.evicted_lru += len(evict)
                entries = {}
                missing = []
                for sid in distinct:  # existing sessions first, so that creating new ones never evicts them
                    e = m.get(sid)
                    if e is None:
                        missing.append(sid)
                    else:
                        m.move_to_end(sid)
                        e.last = now
                        entries[sid] = e
                for sid in missing:
                    entries[sid] = store.create(sid, now, self._h0)
                if missing and len(distinct) > 1:  # LRU order as after these clicks one at a time
                    for sid in distinct:
                        m.move_to_end(sid)
                slab = store.slab  # after create(): it may have grown
                try:
                    if rounds is None and fast is not None:
                        # the whole batch in one C++ call where it applies (step, write-back, scores
                        # and top-k, under the lock); each row's items to exclude: its session's
                        # seen items as they will be after this click
                        excl = []
                        if any_excl:
                            excl = [self._seen_after(entries[sid], idx) if (not per_row_excl or exclude_seen[p]) else []
                                    for p, (sid, idx) in enumerate(zip(session_ids, idxs))]
                        top_k = fast.click_rows(idxs, slab, [entries[s].slot for s in session_ids], k_top, excl)
                        if top_k is not None:
                            clicked = self._clicked
                            for sid, idx in zip(session_ids, idxs):
                                clicked(entries[sid], idx)
                            return _each_rows_k(top_k, k)
                    items = torch.tensor(idxs, dtype=torch.long, device=dev)
                    if rounds is None:
                        slots = torch.tensor([entries[s].slot for s in session_ids], device=dev)
                        h = slab.index_select(0, slots).transpose(0, 1).contiguous()
                        h = step(items, h)
                        slab.index_copy_(0, slots, h.transpose(0, 1))
                        top = h[-1]
                    else:
                        top = torch.empty(B, self.hidden_size, dtype=slab.dtype, device=dev)
                        for pos in rounds:
                            pos_t = torch.tensor(pos, device=dev)
                            slots = torch.tensor([entries[session_ids[p]].slot for p in pos], device=dev)
                            h = slab.index_select(0, slots).transpose(0, 1).contiguous()
                            h = step(items.index_select(0, pos_t), h)
                            slab.index_copy_(0, slots, h.transpose(0, 1))
                            top.index_copy_(0, pos_t, h[-1])
                except BaseException:
                    for sid in missing:
                        store.discard(sid)
                    raise
                seen_rows = [] if any_excl else None
                for sid, idx in zip(session_ids, idxs):
                    e = entries[sid]
                    self._clicked(e, idx)
                    if any_excl:
                        seen_rows.append(e.seen[:] if (exclude_seen[len(seen_rows)] if per_row_excl else True) else None)
                self._scoring += 1
            try:
                if fast is not None:
                    # scores and top-k in one call (no scores tensor): each row's seen items excluded
                    excl = [s or [] for s in seen_rows] if any_excl else []
                    top_k = fast.score_topk_rows(top, k_top, excl)
                    if top_k is not None:
                        return _each_rows_k(top_k, k)
                scores = self._score(top)
                if any_excl:
                    rows, cols = [], []
                    for p, seen in enumerate(seen_rows):
                        if seen:
                            rows.extend([p] * len(seen))
                            cols.extend(seen)
                    scores[rows, cols] = self._neg_inf
                return self._topk(scores, k)
            finally:
                self._scoring_done()

    def end(self, session_id):
        """Forgets a session. Returns True when it was held."""
        _check_session_id(session_id)
        with self._lock:
            self._expire_locked()
            return self.store.discard(session_id)

    # ------------------------------------------------------------------ inspection
    @property
    def uses_fast_path(self):
        return self._fast is not None

    @property
    def backend(self) -> str:
        """The recurrence kernels a click runs on: the op's backend for the model's backend setting
        and tensors (its fallback warning, where it has one), the fast path's as the model's."""
        fast = self._fast
        if fast is not None:
            return fast.kernels
        from .. import ops

        w = self.model.Wy
        return ops.resolve_backend(getattr(self.model, "backend", "auto"), w.device.type, w.dtype)

    def __len__(self):
        """Sessions held (idle ones past the TTL dropped first)."""
        with self._lock:
            self._expire_locked()
            return len(self.store)

    def session_info(self, session_id, state=False):
        """``{"clicks": n, "seen": [item ids]}`` of a live session, or None (no LRU touch); with
        ``state``, also ``"state"``: a copy of its state, as :meth:`state` gives, taken at the same
        moment (two calls could straddle a click or the session's expiry)."""
        _check_session_id(session_id)
        with self._lock:
            self._expire_locked()
            e = self.store.get(session_id)
            if e is None:
                return None
            info = {"clicks": e.clicks, "seen": [self.item_ids[i] for i in e.seen]}
            if state:
                info["state"] = self.store.slab[e.slot].clone()
            return info

    def state(self, session_id):
        """A copy of a live session's state ``(num_layers, hidden_size)``, or None."""
        _check_session_id(session_id)
        with self._lock:
            self._expire_locked()
            e = self.store.get(session_id)
            return None if e is None else self.store.slab[e.slot].clone()

    def memory(self):
        with self._lock:
            self._expire_locked()
            return self.store.memory()

    def expire(self):
        """Drops idle sessions now (also done by every click, and before answering about sessions:
        :meth:`end`, :meth:`session_info`, :meth:`state`, ``len``, :meth:`memory`)."""
        with self._lock:
            return self.store.expire()


def _lru_evictions(held, session_ids, distinct, max_sessions):
    """The held sessions that these clicks, applied one at a time, would evict (the least recently
    used, each time a new session is created in a full store), in eviction order: none while the
    store has room for every new session. A held session evicted before its own click in the batch
    restarts fresh there, as one at a time. ``distinct`` (the batch's sessions) must number at most
    ``max_sessions``: then an unclicked held session is always there to evict (the clicked ones and
    the new one would otherwise be more than that). ``held``: the store's map, least recently used
    first (not modified)."""
    new = sum(1 for sid in distinct if sid not in held)
    if len(held) + new <= max_sessions:
        return []
    clicked = OrderedDict()  # sessions clicked so far in the batch, least recently first
    evicted = {}
    size = len(held)
    oldest = iter(held)
    for sid in session_ids:
        if sid in clicked:
            clicked.move_to_end(sid)
            continue
        if sid not in held or sid in evicted:  # created by this click
            if size == max_sessions:
                cand = next(c for c in oldest if c not in clicked and c not in evicted)
                evicted[cand] = None
                size -= 1
            size += 1
        clicked[sid] = None
    return list(evicted)


def _each_rows_k(top_k, k):
    """The one-call paths' ``(values, indices)`` (B, max k) tensors as :meth:`SessionRecommender._topk`
    gives them: as they are for an int ``k``; for a list of each row's k, each row's first k as
    lists. The selection is a total order (NaN first, then by score, equal scores by index), so a
    row's k best are the first k of its max(k) best."""
    if not isinstance(k, list):
        return top_k
    vals, inds = top_k
    return [v[:kp] for v, kp in zip(vals.tolist(), k)], [i[:kp] for i, kp in zip(inds.tolist(), k)]


def _by_last_click(session_ids):
    """The distinct session ids, ordered by their last occurrence."""
    return list(dict.fromkeys(reversed(session_ids)))[::-1]


def _session_bounded_parts(session_ids, max_sessions):
    """Consecutive ``(start, end)`` ranges of ``session_ids``, each holding at most
    ``max_sessions`` distinct sessions (a range ends where one more session would not fit)."""
    parts, start, held = [], 0, set()
    for p, sid in enumerate(session_ids):
        if sid not in held and len(held) == max_sessions:
            parts.append((start, p))
            start, held = p, set()
        held.add(sid)
    parts.append((start, len(session_ids)))
    return parts

"""Bounded store of per-session recurrent states.

All states live in one preallocated slab ``(capacity, num_layers, hidden_size)``; a session owns one
row (a *slot*). The slab grows by doubling up to ``max_sessions`` rows and never beyond, so the
memory the states use is bounded by ``max_sessions * num_layers * hidden_size * itemsize`` bytes
(see :meth:`SessionStore.memory`), plus a small per-session bookkeeping overhead.

Sessions are kept in least-recently-used order (an ``OrderedDict``), which is also the order of
their last access time; this makes both LRU eviction and idle-TTL expiry O(1) amortised: expired
sessions are always at the front.

The store itself is *not* locked; :class:`~rnnrec_fast.serving.SessionRecommender` holds its lock
around every use.
"""
from __future__ import annotations

import sys
import time
from collections import OrderedDict

import torch

from .._checks import is_int_at_least

_ENTRY_BYTES = 240  # (measured: ~218 bytes of Python objects a session, its id apart)


class _Entry:
    __slots__ = ("slot", "last", "clicks", "seen")

    def __init__(self, slot, last):
        self.slot = slot
        self.last = last
        self.clicks = 0
        self.seen = []  # item indices clicked (the last ``max_seen`` of them)


class SessionStore:
    """LRU + TTL bounded map ``session id -> state row``.

    Args:
        num_layers, hidden_size: shape of one state.
        max_sessions: at most this many sessions are held; the least recently used one is evicted
            to make room for a new one.
        ttl: seconds of idleness after which a session is forgotten (``None``: never).
        dtype, device: of the state slab.
        initial_capacity: rows allocated up front (the slab doubles on demand up to max_sessions).
        max_seen: how many of a session's most recent clicked items are remembered for
            ``exclude_seen``.
        clock: a monotonic clock in seconds (tests inject a fake one).
    """

    def __init__(self, num_layers, hidden_size, *, max_sessions=100_000, ttl=1800.0,
                 dtype=torch.float32, device="cpu", initial_capacity=1024, max_seen=256,
                 clock=time.monotonic):
        if not is_int_at_least(max_sessions, 1):
            raise ValueError(f"max_sessions must be a positive int, got {max_sessions!r}")
        if ttl is not None and not (isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        if not is_int_at_least(max_seen, 0):
            raise ValueError(f"max_seen must be a non-negative int, got {max_seen!r}")
        if not is_int_at_least(initial_capacity, 1):  # (-5 and 2.5 were taken as 1 and 2)
            raise ValueError(f"initial_capacity must be a positive int, got {initial_capacity!r}")
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.max_sessions = int(max_sessions)
        self.ttl = None if ttl is None else float(ttl)
        self.max_seen = int(max_seen)
        self.clock = clock
        cap = max(1, min(int(initial_capacity), self.max_sessions))
        self.slab = torch.zeros(cap, self.num_layers, self.hidden_size, dtype=dtype, device=device)
        self._free = list(range(cap - 1, -1, -1))  # stack; pops the lowest slot first
        self._map: OrderedDict = OrderedDict()
        self.evicted_lru = 0
        self.expired_ttl = 0

    # ------------------------------------------------------------------ queries
    def __len__(self):
        return len(self._map)

    def __contains__(self, sid):
        return sid in self._map

    @property
    def capacity(self):
        return self.slab.shape[0]

    def memory(self) -> dict:
        """Bytes used now and the bound. ``state_bytes``: the slab as allocated;
        ``max_state_bytes``: the slab at ``max_sessions`` rows; ``bookkeeping_bytes_estimate``: an
        estimate of the Python-side per-session maps (entries, seen lists and the session ids
        themselves); ``max_bookkeeping_bytes``: that at ``max_sessions`` full sessions, for ids of
        up to 64 characters (a longer id adds its own size)."""
        row = self.num_layers * self.hidden_size * self.slab.element_size()
        # per session: OrderedDict node + _Entry + seen list header (~_ENTRY_BYTES), the id's own
        # size, and 8 bytes per remembered item (small ints are shared objects: only the list slot)
        per_entry = _ENTRY_BYTES + sys.getsizeof("x" * 64) + 8 * self.max_seen
        ids = sum(sys.getsizeof(sid) for sid in self._map)
        return {
            "sessions": len(self._map),
            "max_sessions": self.max_sessions,
            "capacity_rows": self.capacity,
            "bytes_per_state": row,
            "state_bytes": self.capacity * row,
            "max_state_bytes": self.max_sessions * row,
            "bookkeeping_bytes_estimate": len(self._map) * _ENTRY_BYTES + ids + 8 * self._seen_total(),
            "max_bookkeeping_bytes": self.max_sessions * per_entry,
        }

    def _seen_total(self):
        return sum(len(e.seen) for e in self._map.values())

    def get(self, sid):
        """The entry of a held session (no LRU touch, no expiry: call :meth:`expire` first), or None."""
        return self._map.get(sid)

    # ------------------------------------------------------------------ mutation
    def expire(self, now=None):
        """Drops sessions idle for ttl seconds or more. Returns how many were dropped."""
        if self.ttl is None or not self._map:
            return 0
        if now is None:
            now = self.clock()
        limit = now - self.ttl
        m = self._map
        n = 0
        while m:
            sid, e = next(iter(m.items()))
            if e.last > limit:
                break
            m.popitem(last=False)
            self._free.append(e.slot)
            n += 1
        self.expired_ttl += n
        return n

    def touch(self, sid, now):
        """Marks an existing session used now (moves it to the MRU end); returns its entry or None."""
        e = self._map.get(sid)
        if e is not None:
            self._map.move_to_end(sid)
            e.last = now
        return e

    def create(self, sid, now, h0_row):
        """Adds a new session with state ``h0_row`` (L, H), evicting the LRU one if full. A session
        already held is an error (its slot would leak)."""
        if sid in self._map:
            raise ValueError(f"session {sid!r} is already held")
        if not self._free:
            if self.capacity < self.max_sessions:
                self._grow()
            else:
                _, old = self._map.popitem(last=False)
                self._free.append(old.slot)
                self.evicted_lru += 1
        slot = self._free.pop()
        self.slab[slot].copy_(h0_row)
        e = _Entry(slot, now)
        self._map[sid] = e
        return e

    def discard(self, sid):
        """Forgets a session. Returns True when it was held."""
        e = self._map.pop(sid, None)
        if e is None:
            return False
        self._free.append(e.slot)
        return True

    def clear(self):
        for e in self._map.values():
            self._free.append(e.slot)
        self._map.clear()

    def _grow(self):
        old = self.slab
        cap = min(self.max_sessions, 2 * old.shape[0])
        new = torch.zeros(cap, *old.shape[1:], dtype=old.dtype, device=old.device)
        new[: old.shape[0]].copy_(old)
        self.slab = new
        self._free.extend(range(cap - 1, old.shape[0] - 1, -1))

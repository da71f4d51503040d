"""Session-parallel mini-batches (GRU4Rec, Hidasi et al. 2016).

``B`` lanes each hold one active session; at every step each lane feeds its session's current click
and is asked for the next one. When a lane's session has no next click, the lane takes the next
session (sessions in dataset order, free lanes in lane order) and its hidden state is reset to zero
before that session's first step. When the sessions run out, lanes go idle (``valid`` is False).

The whole schedule is computed up front as (S, B) arrays, so a chunk of several steps can be run by
one fused recurrence call with the ``resets`` mask.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Schedule:
    inputs: torch.Tensor  # (S, B) int64 item index fed at step s (0 where idle)
    targets: torch.Tensor  # (S, B) int64 next item (0 where idle)
    resets: torch.Tensor  # (S, B) bool: zero the lane's state before step s
    valid: torch.Tensor  # (S, B) bool: the lane has a real event at step s
    n_events: int
    # (S, B) int64: each event's index in the data's order (session by session, click by click),
    # -1 where idle; built on request (with_events)
    event_ids: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return self.inputs.shape[0]

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[1]

    def chunks(self, steps: int):
        """Yield (inputs, targets, resets, valid) slices of ``steps`` steps (the last may be shorter)."""
        for s in range(0, self.n_steps, steps):
            e = min(s + steps, self.n_steps)
            yield self.inputs[s:e], self.targets[s:e], self.resets[s:e], self.valid[s:e]

    def until_fewer_lanes(self, n: int) -> "Schedule":
        """The steps before the first with fewer than ``n`` lanes holding an event (all where
        there is none)."""
        short = (self.valid.sum(1) < n).nonzero()
        if len(short) == 0:
            return self
        S = int(short[0, 0])
        valid = self.valid[:S]
        return Schedule(self.inputs[:S], self.targets[:S], self.resets[:S], valid, int(valid.sum()),
                        None if self.event_ids is None else self.event_ids[:S])

    def to(self, device) -> "Schedule":
        return Schedule(self.inputs.to(device), self.targets.to(device), self.resets.to(device),
                        self.valid.to(device), self.n_events,
                        None if self.event_ids is None else self.event_ids.to(device))


def session_parallel_schedule(items: np.ndarray, offsets: np.ndarray, batch_size: int,
                              session_order: np.ndarray | None = None, with_events: bool = False) -> Schedule:
    """Build the session-parallel schedule for sessions ``items[offsets[k]:offsets[k+1]]``.

    Sessions with fewer than two clicks contribute nothing and are skipped. ``with_events``: also
    each event's index in the data's order (``Schedule.event_ids``).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    offsets = np.asarray(offsets, dtype=np.int64)
    n_sess = len(offsets) - 1
    order = np.arange(n_sess) if session_order is None else np.asarray(session_order)
    lengths = offsets[1:] - offsets[:-1]
    order = order[lengths[order] >= 2]
    n_events = int((lengths[order] - 1).sum())
    B = batch_size
    # lane free times: a min-heap of (step when the lane becomes free, lane)
    heap = [(0, b) for b in range(B)]
    starts_step = np.empty(len(order), dtype=np.int64)
    lanes = np.empty(len(order), dtype=np.int64)
    for k, sidx in enumerate(order):
        step, lane = heapq.heappop(heap)
        starts_step[k] = step
        lanes[k] = lane
        heapq.heappush(heap, (step + int(lengths[sidx]) - 1, lane))
    S = int(max(step for step, _ in heap)) if len(order) else 0
    inputs = np.zeros((S, B), dtype=np.int64)
    targets = np.zeros((S, B), dtype=np.int64)
    resets = np.zeros((S, B), dtype=bool)
    valid = np.zeros((S, B), dtype=bool)
    event_ids = np.full((S, B), -1, dtype=np.int64) if with_events else None
    if len(order):
        n_pairs = lengths[order] - 1
        # flat (step, lane, source position) for every event, vectorised
        rep_k = np.repeat(np.arange(len(order)), n_pairs)
        within = np.arange(n_events) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
        step = starts_step[rep_k] + within
        lane = lanes[rep_k]
        src = offsets[order][rep_k] + within
        inputs[step, lane] = items[src]
        targets[step, lane] = items[src + 1]
        valid[step, lane] = True
        resets[starts_step, lanes] = True
        if with_events:  # a session's first event comes after the events of the sessions before it
            pairs = np.maximum(lengths - 1, 0)
            event_ids[step, lane] = (np.cumsum(pairs) - pairs)[order][rep_k] + within
    return Schedule(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(resets),
                    torch.from_numpy(valid), n_events, None if event_ids is None else torch.from_numpy(event_ids))

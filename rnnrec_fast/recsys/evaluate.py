"""Next-item evaluation: Recall@K and MRR@K with full ranking over all items.

Every click of a test session but the last is a query whose only relevant item is the next click.
The hidden state is zero at each test session's start. Ranks:

* ``"standard"``: 1 + number of items scoring strictly higher than the target;
* ``"conservative"`` (the default here, in the CLI and in GRU4Rec's own evaluation): number of
  items scoring higher than or equal to the target (the target included), i.e. ties count against
  the model.

``data`` must be indexed by the model's item map (``SessionDataset.from_log(log, model.item_map)``);
another map raises RecsysError instead of giving meaningless metrics.

A model that gives a NaN or infinite score raises RecsysError instead of getting meaningless ranks.

Sessions are processed session-parallel (``batch_size`` lanes, ``chunk_steps`` steps per fused call).
"""
from __future__ import annotations

import numpy as np
import torch

from .._checks import is_int_at_least
from .batching import session_parallel_schedule
from .data import RecsysError, SessionDataset

TIES = ("standard", "conservative")


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor, ties: str = "conservative") -> torch.Tensor:
    """Rank of ``targets[r]`` within ``scores[r]`` (R, N) for every row. Non-finite scores (NaN,
    inf) raise RecsysError: they cannot be ranked (a NaN target would count as rank 1)."""
    if not bool(torch.isfinite(scores).all()):
        raise RecsysError("the model gives non-finite scores (NaN or inf), which cannot be ranked: "
                          "its weights are probably diverged or corrupt")
    t = scores.gather(1, targets.view(-1, 1))
    if ties == "standard":
        return (scores > t).sum(1) + 1
    if ties == "conservative":
        return (scores >= t).sum(1)
    raise RecsysError(f"unknown ties mode {ties!r}; choose one of {TIES}")


def check_ks(ks) -> list:
    """The cut-offs ``ks`` as a list of ints >= 1, or RecsysError."""
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    if not ks or any(not is_int_at_least(k, 1) for k in ks):
        raise RecsysError(f"bad cut-offs {ks!r}: need one or more integers >= 1")
    return [int(k) for k in ks]


def metrics_from_ranks(ranks: np.ndarray, ks) -> dict:
    ks = check_ks(ks)
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    n = max(len(ranks), 1)
    for k in ks:
        hit = ranks <= k
        out[f"recall@{k}"] = float(hit.sum() / n)
        out[f"mrr@{k}"] = float((hit / ranks).sum() / n)
    return out


@torch.no_grad()
def compute_ranks(model, data: SessionDataset, *, batch_size: int = 512, chunk_steps: int = 16,
                  ties: str = "conservative", block_elems: int = 1 << 24) -> np.ndarray:
    """The rank of the next click of every next-click event of ``data`` (int64, one per event), in
    the data's order: session by session, and within a session click by click (its k-th element
    the k-th prediction of the sessions of two or more clicks taken in order), whatever
    ``batch_size`` and ``chunk_steps`` (which set only how the sessions run side by side)."""
    if ties not in TIES:
        raise RecsysError(f"unknown ties mode {ties!r}; choose one of {TIES}")
    for name, v in (("batch_size", batch_size), ("chunk_steps", chunk_steps)):
        if not is_int_at_least(v, 1):
            raise RecsysError(f"bad {name} {v!r}: must be an integer >= 1")
    model.item_map.check_same(data.item_map, "the test data")
    training = model.training
    model.eval()
    try:  # (the caller's mode comes back: a model evaluated between epochs goes on training)
        return _ranks(model, data, batch_size, chunk_steps, ties, block_elems)
    finally:
        model.train(training)


def _ranks(model, data, batch_size, chunk_steps, ties, block_elems):
    device = model.Wy.device
    # lanes past the number of sessions would stay idle: not more (a state row each)
    batch_size = max(1, min(int(batch_size), data.n_sessions))
    sched = session_parallel_schedule(data.items, data.offsets, batch_size, with_events=True)
    events = sched.event_ids
    sched = sched.to(device)
    h = model.init_state(batch_size)
    out, ids = [], []
    rows_per_block = max(1, block_elems // model.n_items)
    S = sched.n_steps
    for s0, (inp, tgt, rst, val) in zip(range(0, S, chunk_steps), sched.chunks(chunk_steps)):
        y, h = model.recur(model.embed(inp), h, rst)
        yv, tv = y[val], tgt[val]
        ids.append(events[s0:s0 + chunk_steps][val.cpu()])
        for r in range(0, yv.shape[0], rows_per_block):
            s = model.score(yv[r:r + rows_per_block])
            out.append(ranks_from_scores(s, tv[r:r + rows_per_block], ties).cpu())
    ranks = np.zeros(sched.n_events, np.int64)
    if out:  # (the schedule's order, step by step, to the data's)
        ranks[torch.cat(ids).numpy()] = torch.cat(out).numpy()
    return ranks


def check_events(data: SessionDataset) -> None:
    """RecsysError unless ``data`` has a next-click event to evaluate."""
    if data.n_events <= 0:
        raise RecsysError("the test data has no session with at least two known clicks")


def evaluate(model, data: SessionDataset, ks=(20,), *, ties: str = "conservative", batch_size: int = 512,
             chunk_steps: int = 16) -> dict:
    """{'recall@K': ..., 'mrr@K': ..., 'n_events': ...} over every next-click event of ``data``."""
    check_events(data)
    ks = check_ks(ks)
    ranks = compute_ranks(model, data, batch_size=batch_size, chunk_steps=chunk_steps, ties=ties)
    res = metrics_from_ranks(ranks, ks)
    res["n_events"] = int(len(ranks))
    return res

"""Exporting one serving step (GRU step + scores + top-k) with ``torch.export``.

The exported program contains the ``rnnrec_fast::recurrence`` custom op (the model's GRU layers
are ``rnnrec_fast.GRU``), so a process that runs it must ``import rnnrec_fast`` first to register
the op; nothing else of this package is needed::

    import torch, rnnrec_fast
    ep = torch.export.load("step.pt2")
    h_new, top_scores, top_items = ep.module()(items, h)   # items (B,) int64, h (L, B, H)

``items`` are catalogue indices in ``[0, n_items)`` (an index out of range gets torch's
``IndexError: index out of range in self``) and ``top_items`` too; map them with the model's
``item_ids`` (saved next to the program by :func:`export_step` as ``<path>.items.json``). A
dynamic batch runs 1 to ``MAX_BATCH`` rows.
"""
from __future__ import annotations

import json
import numbers

import torch
from torch import nn


class OneStepScorer(nn.Module):
    """``(items (B,), h (L, B, H)) -> (h_new (L, B, H), top-k scores (B, k), top-k indices (B, k))``.

    Wraps a ``rnnrec_fast.recsys.GRU4Rec`` (in eval mode): embedding lookup, one fused GRU step per
    layer (``rnnrec_fast::recurrence``), the scoring GEMM and top-k.
    """

    def __init__(self, model, k=20):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= model.n_items:
            raise ValueError(f"k must be an int in [1, {model.n_items}], got {k!r}")  # (2.5 was taken as 2)
        self.model = model
        self.k = int(k)

    def forward(self, items: torch.Tensor, h: torch.Tensor):
        x = self.model.embed(items.reshape(1, -1))
        _, h_new = self.model.recur(x, h)
        scores = self.model.score(h_new[-1])
        vals, idx = torch.topk(scores, self.k, dim=1)
        return h_new, vals, idx


MAX_BATCH = 1 << 16  # the dynamic batch dimension's upper bound


def export_step(model, k=20, batch=None, path=None):
    """``torch.export`` of :class:`OneStepScorer` (a dynamic batch dimension of 1 to
    :data:`MAX_BATCH` rows, unless ``batch``, a positive int, fixes it). Saves the program to ``path`` (plus ``path + '.items.json'``) when given; returns the
    ExportedProgram. The model is traced in eval mode, and left in the mode it came in (a snapshot
    exported between training epochs leaves dropout on for the next)."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1):
        raise ValueError(f"batch must be a positive int or None (dynamic), got {batch!r}")  # (2.5 was taken as 2)
    training = model.training
    try:
        return _export_step(model.eval(), k, batch, path)
    finally:
        model.train(training)


def _export_step(model, k, batch, path):
    scorer = OneStepScorer(model, k).eval()
    B = 4 if batch is None else int(batch)
    items = torch.zeros(B, dtype=torch.long, device=model.Wy.device)
    h = model.init_state(B)
    dynamic = None
    if batch is None:
        b = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic = {"items": {0: b}, "h": {1: b}}
    with torch.no_grad():
        ep = torch.export.export(scorer, (items, h), dynamic_shapes=dynamic)
    if path is not None:
        torch.export.save(ep, path)
        with open(str(path) + ".items.json", "w") as f:
            json.dump(list(model.item_ids), f)
    return ep


def custom_ops_in(ep) -> set[str]:
    """Names of the ``rnnrec_fast`` ops called in an exported program's graph."""
    found = set()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            if name.startswith("rnnrec_fast."):
                found.add(name)
    return found

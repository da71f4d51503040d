"""Ranking losses of GRU4Rec over sampled score matrices.

Every loss takes ``logits`` (R, C): row r scores C candidate items, ``target`` (R,) the column of
row r's positive item, and an optional ``col_mask`` (R, C) bool (False = the column is not a
candidate for that row, e.g. an idle lane's in-batch target). It returns the per-row loss (R,).
All other candidate columns are negatives.

* cross-entropy: ``-log softmax(logits)[target]`` (Hidasi & Karatzoglou 2018, with the logQ-corrected
  scores given by the caller).
* BPR-max: ``-log sum_j s_j sigmoid(r_i - r_j) + bpreg * sum_j s_j r_j^2`` with ``s = softmax`` over
  the negatives only.
* TOP1-max: ``sum_j s_j (sigmoid(r_j - r_i) + sigmoid(r_j^2))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross-entropy", "bpr-max", "top1-max")

_NEG_INF = float("-inf")


def _target_mask(logits, target):
    onehot = torch.zeros_like(logits, dtype=torch.bool)
    onehot.scatter_(1, target.unsqueeze(1), True)
    return onehot


def cross_entropy(logits, target, col_mask=None):
    if col_mask is not None:
        logits = logits.masked_fill(~col_mask, _NEG_INF)
    return F.cross_entropy(logits, target, reduction="none")


def _neg_softmax(logits, target, col_mask):
    onehot = _target_mask(logits, target)
    neg = ~onehot if col_mask is None else (col_mask & ~onehot)
    has_neg = neg.any(1)
    s = torch.softmax(logits.masked_fill(~neg, _NEG_INF), dim=1)
    s = torch.where(neg, s, 0.0)  # rows with no negative: all zero instead of NaN
    return s, has_neg


def bpr_max(logits, target, col_mask=None, bpreg: float = 0.0, elu_param: float = 0.0):
    if elu_param > 0:
        logits = F.elu(logits, elu_param)
    s, has_neg = _neg_softmax(logits, target, col_mask)
    pos = logits.gather(1, target.unsqueeze(1))
    loss = -torch.log((torch.sigmoid(pos - logits) * s).sum(1) + 1e-24)
    if bpreg:
        loss = loss + bpreg * (s * logits.square()).sum(1)
    return torch.where(has_neg, loss, 0.0)


def top1_max(logits, target, col_mask=None, elu_param: float = 0.0):
    if elu_param > 0:
        logits = F.elu(logits, elu_param)
    s, has_neg = _neg_softmax(logits, target, col_mask)
    pos = logits.gather(1, target.unsqueeze(1))
    loss = (s * (torch.sigmoid(logits - pos) + torch.sigmoid(logits.square()))).sum(1)
    return torch.where(has_neg, loss, 0.0)


def get_loss(name: str):
    if name == "cross-entropy":
        return cross_entropy
    if name == "bpr-max":
        return bpr_max
    if name == "top1-max":
        return top1_max
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")

"""Session-based recommendation with GRU4Rec on rnnrec_fast's fused GRU.

>>> from rnnrec_fast import recsys
>>> recsys.demo()                                   # YOOCHOOSE sample (or generated clicks)
>>> model = recsys.load_checkpoint("model.pt")      # serving: step() / score() / topk()

Command line: ``python -m rnnrec_fast.recsys train|evaluate|recommend ...`` (``--help``).
"""
from .batching import Schedule, session_parallel_schedule
from .checkpoint import load_checkpoint, save_checkpoint
from .data import (ClickLog, ItemMap, RecsysError, SessionDataset, filter_rare_items, filter_short_sessions,
                   load_any, load_clicks, load_diginetica, load_yoochoose, load_yoochoose_raw, resolve_data_dir,
                   sniff_format, synthetic_clicks, time_split, write_clicks)
from .demo import demo
from .evaluate import compute_ranks, evaluate, metrics_from_ranks, ranks_from_scores
from .losses import bpr_max, cross_entropy, top1_max
from .model import GRU4Rec
from .optim import AdagradM
from .train import TrainConfig, train

__all__ = [
    "AdagradM", "ClickLog", "GRU4Rec", "ItemMap", "RecsysError", "Schedule", "SessionDataset",
    "TrainConfig", "bpr_max", "compute_ranks", "cross_entropy", "demo", "evaluate",
    "filter_rare_items", "filter_short_sessions", "load_any", "load_checkpoint", "load_clicks",
    "load_diginetica", "load_yoochoose", "load_yoochoose_raw", "metrics_from_ranks", "ranks_from_scores", "resolve_data_dir",
    "save_checkpoint", "session_parallel_schedule", "sniff_format", "synthetic_clicks", "time_split", "top1_max",
    "train", "write_clicks",
]

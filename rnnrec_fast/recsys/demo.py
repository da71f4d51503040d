"""A short end-to-end run: train GRU4Rec, report Recall@20 / MRR@20 and training speed."""
from __future__ import annotations

import os

from .data import (YOOCHOOSE_TEST, YOOCHOOSE_TRAIN, SessionDataset, choose_data_dir, load_yoochoose,
                   resolve_data_dir, synthetic_clicks, time_split)


def demo(data_dir: str | None = None, epochs: int = 3, *, batch_size: int = 32, n_sample: int = 2048,
         seed: int = 42, progress: bool = True, out=print) -> dict:
    """Train on the YOOCHOOSE 100k sample (GRU4Rec's best RSC15 settings, ``epochs`` epochs) and
    evaluate on its test day. Without the data, says so and uses a generated click log instead.
    Returns the metrics dict."""
    from .evaluate import evaluate
    from .train import TrainConfig, train

    folder = resolve_data_dir(data_dir)
    tr_path = folder and os.path.join(folder, YOOCHOOSE_TRAIN)
    te_path = folder and os.path.join(folder, YOOCHOOSE_TEST)
    if tr_path and os.path.isfile(tr_path) and os.path.isfile(te_path):
        out(f"data: {tr_path}")
        train_log, test_log = load_yoochoose(tr_path), load_yoochoose(te_path)
        source = "yoochoose-100k"
    else:
        path, source = choose_data_dir(data_dir)
        where = (f"{folder} holds no {YOOCHOOSE_TRAIN} and {YOOCHOOSE_TEST}" if folder else
                 {"argument": f"no folder {path}", "environment": f"no folder {path} ($RNNREC_FAST_DATA)",
                  "default": f"$RNNREC_FAST_DATA unset, no folder {path}"}[source])
        out(f"YOOCHOOSE sample not found ({where}; set RNNREC_FAST_DATA or pass the demo's --data to the "
            "folder holding it); using a generated click log instead")
        train_log, test_log = time_split(synthetic_clicks(4000, 500, seed=seed), test_days=0.5)
        source = "synthetic"
    tr = SessionDataset.from_log(train_log)
    te = SessionDataset.from_log(test_log, tr.item_map)
    out(f"train: {tr.n_events} events, {tr.n_sessions} sessions, {len(tr.item_map)} items; "
        f"test: {te.n_events} events")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, n_sample=min(n_sample, 4 * len(tr.item_map)),
                      seed=seed)
    model, stats = train(tr, cfg, progress=progress)
    res = evaluate(model, te, ks=(20,), ties="conservative")
    out(f"Recall@20 {res['recall@20']:.4f}  MRR@20 {res['mrr@20']:.4f}  "
        f"training {stats['events_per_second']:,.0f} events/s ({stats['train_seconds']:.1f} s, {epochs} epochs)")
    res.update(train_seconds=stats["train_seconds"], events_per_second=stats["events_per_second"],
               source=source)
    return res

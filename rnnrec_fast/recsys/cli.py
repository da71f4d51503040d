"""``python -m rnnrec_fast.recsys {train,evaluate,recommend}``."""
from __future__ import annotations

import argparse
import json
import re
import sys

from .data import RecsysError


def _layers(values):
    out = []
    for v in values:
        for part in str(v).replace("/", ",").split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise RecsysError(f"bad --layers value {v!r}: give layer sizes like 100 or 100,100") from None
            if n < 1:
                raise RecsysError(f"bad --layers value {v!r}: sizes must be positive")
            out.append(n)
    if not out:
        raise RecsysError("--layers needs at least one size")
    return out


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _add_data_opts(p):
    p.add_argument("--format", choices=["auto", "yoochoose", "yoochoose-raw", "diginetica", "columns"],
                   default="auto",
                   help="input format (auto: Diginetica or the raw yoochoose-clicks.dat when their first "
                        "line is seen, else the columns below)")
    p.add_argument("--session-col", default="SessionId")
    p.add_argument("--item-col", default="ItemId")
    p.add_argument("--time-col", default="Time")
    p.add_argument("--sep", default=None, help="field separator (default: sniffed)")
    p.add_argument("--no-header", action="store_true",
                   help="the file has no header line: the columns are 0-based indices (default 0, 1, 2)")
    p.add_argument("--time-unit", choices=["auto", "s", "ms"], default="auto",
                   help="numeric times in seconds or milliseconds (auto: milliseconds where the largest is "
                        "1e11 or more, with a warning)")


# the column options and their defaults: they apply to --format columns (or auto's fallback) alone
_COLUMN_OPTS = (("session_col", "SessionId"), ("item_col", "ItemId"), ("time_col", "Time"), ("sep", None),
                ("no_header", False))


def _load(path, a):
    from .data import load_clicks, load_diginetica, load_yoochoose, load_yoochoose_raw, sniff_format

    fmt = sniff_format(path) if a.format == "auto" else a.format
    loader = {"yoochoose": load_yoochoose, "yoochoose-raw": load_yoochoose_raw,
              "diginetica": load_diginetica}.get(fmt)
    if loader is not None:
        # a fixed format reads its own columns: a column option given with it would be ignored
        given = ["--" + name.replace("_", "-") for name, default in _COLUMN_OPTS if getattr(a, name) != default]
        if given:
            how = "detected from its first line" if a.format == "auto" else "--format " + fmt
            raise RecsysError(f"{path}: {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --format "
                              f"columns, but the file is read as "
                              f"{fmt} ({how}), whose columns are fixed")
        if a.time_unit != "auto":
            if fmt != "yoochoose":
                raise RecsysError(f"{path}: --time-unit applies to numeric times, but the file is read as {fmt}, "
                                  "whose times are dates")
            return loader(path, time_unit=a.time_unit)
        return loader(path)
    # backslash escapes decoded ('\\t': a tab); any other character kept as it is (UTF-8 encoded
    # and decoded as Latin-1 by "unicode_escape" alone, a '§' became 'Â§', refused as two characters)
    try:
        sep = a.sep.encode("latin-1", "backslashreplace").decode("unicode_escape") if a.sep else None
    except UnicodeDecodeError:  # ('\\', '\\x', '\\u': an escape cut short)
        raise RecsysError(f"bad --sep {a.sep!r}: an incomplete backslash escape (give one character, "
                          f"or an escape such as '\\t')") from None
    cols = [a.session_col, a.item_col, a.time_col or None]  # (--no-header: load_clicks reads the defaults as 0, 1, 2)
    return load_clicks(path, session_col=cols[0], item_col=cols[1], time_col=cols[2], sep=sep,
                       header=not a.no_header, time_unit=a.time_unit)


_SAYS_DEFAULT = re.compile(r"%\(default\)|\bdefault[: ]")  # not "(0: torch's default)"


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``parser`` and its sub-commands that has a default says it in --help (where
    its help text does not already say ``default:`` or ``default N``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif (action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
              and not _SAYS_DEFAULT.search(action.help or "")):
            action.help = ((action.help + " ") if action.help else "") + "(default: %(default)s)"
    return parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rnnrec_fast.recsys",
                                 description="GRU4Rec session-based recommender on rnnrec_fast")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train (and evaluate when --test is given)")
    t.add_argument("--train", required=True, help="training click log")
    t.add_argument("--test", help="test click log (items unseen in training are dropped)")
    t.add_argument("--split-days", type=float, default=None,
                   help="without --test: hold out the sessions that end in the last D days of --train "
                        "as the test set (GRU4Rec's time split; RSC15: 1)")
    t.add_argument("--min-item-support", type=int, default=1,
                   help="with --split-days: first drop the items with fewer clicks (and the sessions "
                        "left under 2 clicks), as GRU4Rec's preprocessing (RSC15: 5; default 1: none)")
    t.add_argument("--loss", choices=["cross-entropy", "bpr-max", "top1-max"], default="cross-entropy")
    t.add_argument("--layers", nargs="+", default=["100"], help="GRU layer sizes, e.g. 100 or 100,100 (default: 100)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--n-sample", type=int, default=2048)
    t.add_argument("--sample-alpha", type=float, default=0.5)
    t.add_argument("--logq", type=float, default=None,
                   help="weight of the logQ correction of the cross-entropy loss's negatives (default: 1.0; cross-entropy only)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=0.2)
    t.add_argument("--momentum", type=float, default=None, help="AdagradM's momentum (default: 0.2; adagradm only)")
    t.add_argument("--dropout-hidden", type=float, default=0.4)
    t.add_argument("--dropout-embed", type=float, default=0.0)
    t.add_argument("--embedding", default="shared", help="shared | N | none")
    t.add_argument("--bpreg", type=float, default=0.0, help="score regularisation of bpr-max (default: 0.0)")
    t.add_argument("--elu-param", type=float, default=0.0, help="ELU on the scores (bpr-max/top1-max)")
    t.add_argument("--reset-after", type=_bool, default=True,
                   help="GRU candidate form: true (PyTorch) or false (Cho et al., original GRU4Rec)")
    t.add_argument("--chunk-steps", type=int, default=4,
                   help="session-parallel steps per fused GRU call / optimiser step")
    t.add_argument("--loss-norm", choices=["step", "batch"], default="step",
                   help="chunk loss = mean over its steps of GRU4Rec's per-step loss (step) or their sum (batch)")
    t.add_argument("--state-dropout", type=_bool, default=True,
                   help="carry each layer's dropped-out output as its state across chunk boundaries, "
                        "as GRU4Rec carries it across steps (default: true)")
    t.add_argument("--optimizer", choices=["adagradm", "adagrad", "adam", "sgd"], default="adagradm")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: none, a fresh random run)")
    t.add_argument("--threads", type=int, default=1, help="torch intra-op threads while training (0: torch's default)")
    t.add_argument("--gemm-threads", type=int, default=None,
                   help="threads for the score GEMMs only (default: torch's default, at most 4)")
    t.add_argument("--device", default="cpu", help="cpu | cuda")
    t.add_argument("--save", help="write the trained model here (its training state included: --resume goes on from it)")
    t.add_argument("--resume", metavar="MODEL",
                   help="go on training the model saved there (--save's file; the same name may be given to "
                        "both): its architecture and item map, its optimizer's state and random streams, "
                        "--epochs more epochs (N and then M epochs of one config give the model N + M give; the "
                        "training options not given are the resumed run's, --seed is refused); "
                        "--train's clicks on items it does not know are dropped")
    t.add_argument("--k", type=int, nargs="+", default=[20], help="cut-offs for Recall/MRR")
    t.add_argument("--ties", choices=["standard", "conservative"], default="conservative")
    t.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_data_opts(t)

    e = sub.add_parser("evaluate", help="evaluate a saved model")
    e.add_argument("--model", required=True)
    e.add_argument("--test", required=True)
    e.add_argument("--k", type=int, nargs="+", default=[20])
    e.add_argument("--ties", choices=["standard", "conservative"], default="conservative")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    _add_data_opts(e)

    r = sub.add_parser("recommend", help="top-k next items after a click sequence")
    r.add_argument("--model", required=True)
    r.add_argument("--items", nargs="+", required=True, help="the session's clicks (original ids)")
    r.add_argument("--k", type=int, default=20)
    r.add_argument("--exclude-seen", action="store_true", help="leave the session's own clicks out of the list")
    r.add_argument("--device", default="cpu")
    r.add_argument("--json", action="store_true")
    return show_defaults(ap)


def _check_device(dev):
    from .checkpoint import check_device  # (imports torch: not at --help)

    check_device(dev, "--device")


# train's options that --resume takes from the resumed run's training state where not given
# (their names are TrainConfig's and the options' dests alike)
_RESUMED_OPTIONS = ("loss", "batch_size", "n_sample", "sample_alpha", "logq", "lr", "momentum", "bpreg", "elu_param",
                    "chunk_steps", "optimizer", "loss_norm", "state_dropout")


def _given_options(argv) -> set:
    """The dests of the train options given on the command line ``argv`` (parsed again with no
    defaults: argparse keeps no record of what was typed)."""
    ap = build_parser()
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


# train's model options (their names are the model config's): with --resume, the model's own
_ARCH_OPTIONS = ("layers", "embedding", "dropout_hidden", "dropout_embed", "reset_after")


def _check_resumed_architecture(a, resumed, given) -> None:
    """With --resume the model's own architecture applies: a model option given with another value
    than the model's would be ignored, silently: refused."""
    from .model import parse_embedding

    cfg = resumed.config()
    for name in _ARCH_OPTIONS:
        if name not in given:
            continue
        v = getattr(a, name)
        value = _layers(v) if name == "layers" else parse_embedding(v) if name == "embedding" else v
        if value != cfg[name]:
            opt = "--" + name.replace("_", "-")
            shown = " ".join(map(str, v)) if name == "layers" else str(v).lower() if isinstance(v, bool) else v
            raise RecsysError(f"{opt} {shown} differs from the resumed "
                              f"model's ({cfg[name]}): with --resume the model's own architecture applies "
                              f"(leave {opt} out)")


def _print_metrics(res, ks, out):
    for k in ks:
        out.write(f"Recall@{k}: {res[f'recall@{k}']:.4f}  MRR@{k}: {res[f'mrr@{k}']:.4f}\n")


def _cmd_train(a):
    from .checkpoint import check_save_path, save_checkpoint
    from .data import SessionDataset, time_split
    from .evaluate import evaluate
    from .train import TrainConfig, option_applies, train

    _check_device(a.device)
    if any(k < 1 for k in a.k):
        raise RecsysError("--k values must be >= 1")
    resumed, given = None, None
    if a.resume is not None:
        from .checkpoint import load_checkpoint

        given = a.given
        if "seed" in given:
            raise RecsysError("--seed plays no part with --resume: the random streams go on from the saved "
                              "training state (leave --seed out)")
        resumed = load_checkpoint(a.resume, device=a.device)
        if resumed.train_state is None:
            raise RecsysError(f"--resume {a.resume}: the file holds no training state (saved with "
                              "train_state=False, or by an older version): nothing to go on from")
        _check_resumed_architecture(a, resumed, given)
        # the options not given are the resumed model's and run's (the training ones fell back to
        # the defaults: a run of other options, silently; a review)
        saved = {**(resumed.train_state.get("config") or {}), **resumed.config()}
        for name in _ARCH_OPTIONS + _RESUMED_OPTIONS:
            if name in saved and name not in given:
                setattr(a, name, saved[name])
        # an option carried over that the loss or optimizer given takes no part in is its default
        # (TrainConfig refuses momentum, bpreg and elu_param there: a run saved with --momentum 0.1
        # and resumed with --optimizer adam was refused for a momentum not typed; a review), and so is
        # logq where the loss turns to cross-entropy (a bpr-max run's --logq 0 went on into it).
        # train() warns of each change.
        for name in ("momentum", "bpreg", "elu_param"):
            if name not in given and not option_applies(name, a.loss, a.optimizer):
                setattr(a, name, getattr(TrainConfig, name))
        if "logq" not in given and option_applies("logq", a.loss, a.optimizer) and not option_applies(
                "logq", saved.get("loss", a.loss), saved.get("optimizer", a.optimizer)):
            a.logq = TrainConfig.logq
    # (the other losses take no logQ correction: a --logq given with them would be ignored, silently;
    # --logq 0 says so, as GRU4Rec's published BPR-max settings write it)
    if (given is None or "logq" in given) and a.logq and not option_applies("logq", a.loss, a.optimizer):
        raise RecsysError(f"--logq applies to loss cross-entropy only (the loss is {a.loss})")
    cfg = TrainConfig(loss=a.loss, layers=_layers(a.layers), batch_size=a.batch_size, n_sample=a.n_sample,
                      sample_alpha=a.sample_alpha, logq=1.0 if a.logq is None else a.logq, epochs=a.epochs, lr=a.lr,
                      momentum=a.momentum, dropout_hidden=a.dropout_hidden, dropout_embed=a.dropout_embed,
                      embedding=a.embedding, bpreg=a.bpreg, elu_param=a.elu_param,
                      reset_after=a.reset_after, chunk_steps=a.chunk_steps, optimizer=a.optimizer, loss_norm=a.loss_norm, state_dropout=a.state_dropout,
                      seed=a.seed, device=a.device, threads=a.threads or None,
                      gemm_threads=a.gemm_threads)
    cfg.validate()
    if a.split_days is not None and a.test:
        raise RecsysError("--split-days splits --train into training and test sets: not with --test")
    if a.min_item_support != 1 and a.split_days is None:
        raise RecsysError("--min-item-support applies with --split-days (the raw log's preprocessing)")
    if a.min_item_support < 1 or (a.split_days is not None and not a.split_days > 0):
        raise RecsysError("--split-days must be > 0 and --min-item-support >= 1")
    if a.split_days is not None and not a.time_col and a.format in ("auto", "columns"):
        raise RecsysError("--split-days splits by time: not with --time-col '' (the file order, no times)")
    if a.save is not None:  # (before training, not after it; an empty name is refused there)
        check_save_path(a.save)
    train_log, test_log = _load(a.train, a), None
    if a.split_days is not None:
        train_log, test_log = time_split(train_log, a.split_days, min_item_support=a.min_item_support)
    elif a.test:
        test_log = _load(a.test, a)
    if resumed is None:
        tr = SessionDataset.from_log(train_log)
    else:
        tr = _test_data(train_log, resumed.item_map, a.train)
    te = None if test_log is None else _test_data(test_log, tr.item_map, a.test or "the test split")
    log = sys.stderr
    # an event is a next-click prediction: a session of n clicks gives n - 1 (as GRU4Rec counts them)
    log.write(f"train: {len(tr.items)} clicks, {tr.n_sessions} sessions, {len(tr.item_map)} items "
              f"({tr.n_events} events: next-click targets)\n")
    if resumed is not None:
        dropped = len(train_log) - int(resumed.item_map.known_mask(train_log.items).sum())
        n_ep = resumed.train_state["epochs"]
        log.write(f"resumed {a.resume} after {n_ep} epoch{'' if n_ep == 1 else 's'}"
                  + (f" ({dropped} training clicks on items the model does not know dropped)" if dropped else "")
                  + "\n")
    if te is not None:
        log.write(f"test: {len(te.items)} clicks, {te.n_sessions} sessions ({te.n_events} events)\n")
    model, stats = train(tr, cfg, progress=not a.quiet, model=resumed)
    from .. import ops
    backend = ops.last_backend()  # (the GRU's, as the training thread's latest op call ran it)
    if stats["events"]:
        log.write(f"trained in {stats['train_seconds']:.1f} s, {stats['events_per_second']:,.0f} events/s "
                  f"(the GRU on the {backend!r} backend)\n")
    else:  # (it said "0 events/s (the GRU on the None backend)")
        backend = None
        log.write(f"trained nothing (--epochs 0): the model keeps its {'resumed' if resumed else 'initial'} weights\n")
    res = dict(backend=backend, train_seconds=stats["train_seconds"], events_per_second=stats["events_per_second"],
               cpu_seconds=stats["cpu_seconds"], events_per_cpu_second=stats["events_per_cpu_second"],
               train_events=stats["events"], final_loss=stats["epoch_losses"][-1] if stats["epoch_losses"] else None)
    if a.save is not None:
        save_checkpoint(model, a.save, extra={"train_seconds": stats["train_seconds"]})
        log.write(f"saved {a.save}\n")
    if te is not None:
        m = evaluate(model, te, ks=a.k, ties=a.ties)
        res = {**m, **res}
        _print_metrics(m, a.k, sys.stdout)
    if a.json:
        sys.stdout.write(json.dumps(res) + "\n")
    return 0


def _cmd_evaluate(a):
    from .checkpoint import load_checkpoint
    from .data import SessionDataset
    from .evaluate import evaluate

    _check_device(a.device)
    if any(k < 1 for k in a.k):
        raise RecsysError("--k values must be >= 1")
    model = load_checkpoint(a.model, device=a.device, train_state=False)
    te = _test_data(_load(a.test, a), model.item_map, a.test)
    res = evaluate(model, te, ks=a.k, ties=a.ties, batch_size=a.batch_size)
    _print_metrics(res, a.k, sys.stdout)
    if a.json:
        sys.stdout.write(json.dumps(res) + "\n")
    return 0


def _test_data(log, item_map, what):
    """The test log as a dataset on ``item_map`` (clicks on other items dropped), or RecsysError
    where no event is left, saying how many clicks were on known items (an unrelated file, or ids
    written otherwise, e.g. '214536502.0', leave none)."""
    from .data import SessionDataset

    te = SessionDataset.from_log(log, item_map)
    if te.n_events <= 0:
        known = item_map.known_mask(log.items)
        unknown = log.items[~known]
        example = f" ({str(unknown[0])!r} is not one)" if len(unknown) else ""
        raise RecsysError(f"{what}: no session with at least two clicks on items the model knows: "
                          f"{int(known.sum())} of {len(log)} clicks are on known items{example}")
    return te


def _cmd_recommend(a):
    from .checkpoint import load_checkpoint

    _check_device(a.device)
    if a.k < 1:
        raise RecsysError("--k must be >= 1")
    model = load_checkpoint(a.model, device=a.device, train_state=False)
    recs = model.recommend(a.items, k=a.k, exclude_seen=a.exclude_seen)
    if a.json:
        sys.stdout.write(json.dumps({"items": [i for i, _ in recs], "scores": [s for _, s in recs]}) + "\n")
    else:
        for rank, (item, s) in enumerate(recs, 1):
            sys.stdout.write(f"{rank}\t{item}\t{s:.4f}\n")
    return 0


def _out_of_memory(exc) -> bool:
    """Whether ``exc`` says an allocation failed: Python's MemoryError, or torch's, which are
    RuntimeErrors (CUDA's OutOfMemoryError; the CPU allocator's "can't allocate memory")."""
    import torch

    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(exc)


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.cmd == "train" and a.resume is not None:
        a.given = _given_options(sys.argv[1:] if argv is None else [str(v) for v in argv])
    try:
        return {"train": _cmd_train, "evaluate": _cmd_evaluate, "recommend": _cmd_recommend}[a.cmd](a)
    except RecsysError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        sys.stderr.write("error: out of memory (a smaller --batch-size, --n-sample or model?)\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130

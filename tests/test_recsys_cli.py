"""CLI of rnnrec_fast.recsys: smoke runs on a tiny file and clean errors on bad input."""
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch

import rnnrec_fast

from rnnrec_fast import recsys
from rnnrec_fast.recsys.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("recsys_cli")
    log = recsys.synthetic_clicks(300, 30, seed=4)
    train, test = recsys.time_split(log, test_days=0.1)
    recsys.write_clicks(train, str(d / "train.txt"))
    recsys.write_clicks(test, str(d / "test.txt"))
    return d


def _run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


TRAIN_ARGS = ["--epochs", "2", "--n-sample", "16", "--batch-size", "8", "--layers", "16", "--seed", "0",
              "--quiet"]


def test_train_evaluate_recommend(files, capsys):
    model = files / "m.pt"
    code, out, err = _run(["train", "--train", files / "train.txt", "--test", files / "test.txt",
                           "--save", model, "--json", "--k", "5", "20"] + TRAIN_ARGS, capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("recall@20", "mrr@20", "recall@5", "mrr@5", "train_seconds", "events_per_second"):
        assert key in res
    assert 0 <= res["mrr@20"] <= res["recall@20"] <= 1
    # which backend ran the GRU, said beside the throughput (a review: only the fallback warning did)
    assert res["backend"] == rnnrec_fast.resolve_backend("auto", "cpu", torch.float32), res
    assert f"(the GRU on the {res['backend']!r} backend)" in err
    assert model.exists()
    code, out, err = _run(["evaluate", "--model", model, "--test", files / "test.txt", "--k", "1", "5",
                           "10", "20", "--json"], capsys)
    assert code == 0, err
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev["recall@20"] == pytest.approx(res["recall@20"])
    code, out, err = _run(["recommend", "--model", model, "--items", "1000", "1001", "--k", "7"], capsys)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 7
    code, out, err = _run(["recommend", "--model", model, "--items", "1000", "--k", "3", "--json"], capsys)
    assert len(json.loads(out)["items"]) == 3
    # --exclude-seen: the session's own clicks left out (k past the catalogue: all the others)
    code, out, err = _run(["recommend", "--model", model, "--items", "1000", "1001", "--k", "50", "--json"], capsys)
    every = json.loads(out)["items"]
    assert code == 0 and {1000, 1001} <= set(every)
    code, out, err = _run(["recommend", "--model", model, "--items", "1000", "1001", "--k", "50", "--json",
                           "--exclude-seen"], capsys)
    assert code == 0 and json.loads(out)["items"] == [i for i in every if i not in (1000, 1001)]


@pytest.mark.parametrize("loss,emb,opt", [("bpr-max", "8", ["--bpreg", "0.5"]), ("top1-max", "none", ["--elu-param", "1"])])
def test_train_other_losses(files, capsys, loss, emb, opt):
    code, out, err = _run(["train", "--train", files / "train.txt", "--loss", loss, "--embedding", emb, *opt,
                           "--layers", "16,16", "--reset-after", "false", "--epochs", "1",
                           "--n-sample", "8", "--batch-size", "8", "--quiet"], capsys)
    assert code == 0, err


def test_train_refuses_options_it_would_ignore_and_out_of_range_values(files, capsys):
    """From a review: --bpreg with a loss other than bpr-max, --elu-param with cross-entropy and
    --momentum with an optimizer other than adagradm trained as if they were not given; a seed past
    int64 (or 2**64 - 1) failed after the data was read ("Overflow when unpacking long long"); a batch
    size of 1e20 and an --elu-param of 1e300 ended in tracebacks. Each is a one-line error (exit 2)."""
    base = ["train", "--train", str(files / "train.txt"), "--epochs", "1", "--quiet"]
    for extra, match in ((["--bpreg", "0.5"], "bpreg applies to loss bpr-max only"),
                         (["--loss", "top1-max", "--bpreg", "0.5"], "bpreg applies to loss bpr-max only"),
                         (["--elu-param", "1"], "elu_param applies to losses bpr-max and top1-max only"),
                         (["--optimizer", "sgd", "--momentum", "0.9"], "momentum applies to optimizer adagradm only"),
                         (["--optimizer", "adam", "--momentum", "0.2"], "momentum applies to optimizer adagradm only"),
                         (["--seed", str(2 ** 64 - 1)], "seed must be an integer from"),
                         (["--seed", str(10 ** 20)], "seed must be an integer from"),
                         (["--batch-size", str(10 ** 20)], "batch_size must be at most 2"),
                         (["--loss", "top1-max", "--elu-param", "1e300"], "elu_param must be within float32's range")):
        code, out, err = _run(base + extra, capsys)
        assert code == 2 and match in err and "Traceback" not in err, (extra, err)
    code, out, err = _run(base + ["--optimizer", "adagradm", "--momentum", "0.3", "--seed", str(2 ** 64 - 2),
                                  "--n-sample", "8", "--batch-size", "8", "--layers", "8"], capsys)
    assert code == 0, err


def test_bad_inputs(files, tmp_path, capsys):
    cases = [
        (["train", "--train", tmp_path / "missing.txt"], "not found"),
        (["train", "--train", files / "train.txt", "--batch-size", "0", "--epochs", "1", "--quiet"], "batch size"),
        (["train", "--train", files / "train.txt", "--embedding", "wide", "--epochs", "1"], "embedding"),
        (["train", "--train", files / "train.txt", "--layers", "10,x"], "layers"),
        (["train", "--train", files / "train.txt", "--layers", "10,20"], "same size"),
        (["train", "--train", files / "train.txt", "--dropout-hidden", "1.5"], "dropout"),
        (["evaluate", "--model", tmp_path / "none.pt", "--test", files / "test.txt"], "not found"),
        (["train", "--train", files / "train.txt", "--test", files / "test.txt", "--split-days", "1"],
         "not with --test"),
        (["train", "--train", files / "train.txt", "--min-item-support", "5"], "with --split-days"),
        (["train", "--train", files / "train.txt", "--split-days", "0"], "must be > 0"),
        (["train", "--train", files / "train.txt", "--split-days", "1", "--min-item-support", "0"], ">= 1"),
        (["recommend", "--model", tmp_path / "none.pt", "--items", "1", "--device", "meta"],
         "bad --device 'meta': use cpu or cuda"),
    ]
    for args, msg in cases:
        code, out, err = _run(args, capsys)
        assert code != 0 and msg in err and "Traceback" not in err, (args, err)
    bad = tmp_path / "bad.txt"
    bad.write_text("SessionId\tItemId\tTime\n1\t2\t3\n1\t2\n")
    code, out, err = _run(["train", "--train", bad], capsys)
    assert code != 0 and "malformed row" in err
    model = tmp_path / "m.pt"
    code, _, err = _run(["train", "--train", files / "train.txt", "--save", model] + TRAIN_ARGS, capsys)
    assert code == 0, err
    code, out, err = _run(["recommend", "--model", model, "--items", "424242"], capsys)
    assert code != 0 and "unknown item" in err
    with pytest.raises(SystemExit) as exc:  # argparse: bad choice
        main(["train", "--train", str(files / "train.txt"), "--loss", "hinge"])
    assert exc.value.code != 0


def test_raw_log_split_and_preprocessed(tmp_path, capsys):
    """A raw yoochoose-clicks.dat: recognised without --format, split by --split-days with GRU4Rec's
    --min-item-support, with the same metrics as training on the split written out and passed as
    --train / --test."""
    import datetime as dt

    log = recsys.synthetic_clicks(300, 30, seed=4)
    raw = tmp_path / "yoochoose-clicks.dat"
    with open(raw, "w") as f:
        for s, i, t in zip(log.sessions, log.items, log.times):
            stamp = dt.datetime.fromtimestamp(float(t), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
            f.write(f"{s},{stamp[:-3]}Z,{i},0\n")
    code, out, err = _run(["train", "--train", raw, "--split-days", "0.1", "--min-item-support", "5",
                           "--json"] + TRAIN_ARGS, capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    train, test = recsys.time_split(recsys.load_yoochoose_raw(str(raw)), 0.1, min_item_support=5)
    assert len(train) < len(recsys.time_split(recsys.load_yoochoose_raw(str(raw)), 0.1)[0])  # it filtered
    recsys.write_clicks(train, str(tmp_path / "tr.txt"))
    recsys.write_clicks(test, str(tmp_path / "te.txt"))
    code, out, err = _run(["train", "--train", tmp_path / "tr.txt", "--test", tmp_path / "te.txt",
                           "--json"] + TRAIN_ARGS, capsys)
    assert code == 0, err
    ref = json.loads(out.strip().splitlines()[-1])
    assert res["recall@20"] == ref["recall@20"] and res["mrr@20"] == ref["mrr@20"]
    assert res["train_events"] == ref["train_events"]


def test_ids_beyond_int64_train_and_recommend(tmp_path, capsys):
    big = 18446744073709551615
    data = tmp_path / "big.tsv"
    data.write_text(f"SessionId\tItemId\tTime\n1\t{big}\t10\n1\t5\t11\n2\t5\t12\n2\t{big}\t13\n")
    model = tmp_path / "big.pt"
    code, _, err = _run(["train", "--train", data, "--epochs", "1", "--layers", "4", "--n-sample", "2",
                         "--quiet", "--save", model], capsys)
    assert code == 0, err
    code, out, err = _run(["recommend", "--model", model, "--items", str(big), "--k", "2", "--json"], capsys)
    assert code == 0, err
    assert sorted(json.loads(out)["items"]) == sorted([str(big), "5"])


def test_garbage_model_file_clean_error(files, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello\n")
    for args in (["recommend", "--model", garbage, "--items", "1000"],
                 ["evaluate", "--model", garbage, "--test", files / "test.txt"]):
        code, out, err = _run(args, capsys)
        assert code == 2 and "not a readable rnnrec_fast checkpoint" in err and "Traceback" not in err, err


def test_readme_commands_name_existing_files():
    """The data files the recsys README's commands name exist (relative to the repo root, where
    the commands run); the CLI takes the paths as given."""
    text = open(os.path.join(ROOT, "rnnrec_fast", "recsys", "README.md"), encoding="utf-8").read()
    paths = [p for p in re.findall(r"--(?:train|test) (\S+)", text) if not p.startswith("/path/to/")]
    assert paths  # /path/to/: a placeholder for the user's own download
    for path in paths:
        assert not os.path.basename(path) == path, f"{path}: a bare name, the CLI would not find it"
        if not os.path.isdir(os.path.join(ROOT, os.path.dirname(path))):
            pytest.skip("the shared data folder is absent")
        assert os.path.isfile(os.path.join(ROOT, path)), path


def test_module_entry_point_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "rnnrec_fast.recsys", "evaluate", "--model",
                        str(tmp_path / "no.pt"), "--test", str(tmp_path / "no.txt")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "error:" in p.stderr and "Traceback" not in p.stderr


def test_demo_synthetic(tmp_path, capsys):
    lines = []
    res = recsys.demo(data_dir=str(tmp_path), epochs=1, n_sample=64, progress=False, out=lines.append)
    assert res["source"] == "synthetic" and "events_per_second" in res
    assert any("Recall@20" in x for x in lines)


def test_help_shows_defaults(capsys):
    """--help of the recommender and serving CLIs gives every option's default."""
    from rnnrec_fast.recsys.cli import build_parser
    from rnnrec_fast.serving.__main__ import main as serve_main

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 2048)" in out and "(default: 10)" in out and "(default: 0.0)" in out
    flat = " ".join(out.split())
    # helps that mention torch's default still give their own; --layers reads as typed
    assert "(0: torch's default) (default: 1)" in flat and "100,100 (default: 100)" in flat
    with pytest.raises(SystemExit):
        serve_main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: 0.0)" in out and "(default: 1800.0)" in out
    assert "(0: leave torch's default) (default: 1)" in " ".join(out.split())
    assert "(default: the catalogue size)" in " ".join(out.split())


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The recsys README's Python block runs as written against the model.pt its commands save
    (here a small model holding the item ids it names; recsys.demo, a training run, stubbed)."""
    text = open(os.path.join(ROOT, "rnnrec_fast", "recsys", "README.md"), encoding="utf-8").read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ids = [int(i) for i in re.findall(r"item_index\[(\d+)\]", block)]
    assert ids and "recsys.demo()" in block
    model = recsys.GRU4Rec(5, [8], item_ids=ids + [1, 2, 3, 4][:5 - len(ids)])
    monkeypatch.chdir(tmp_path)
    recsys.save_checkpoint(model, "model.pt")
    monkeypatch.setattr(recsys, "demo", lambda *a, **k: None)
    scope = {}
    exec(compile(block, "recsys/README.md (Python)", "exec"), scope)
    assert scope["scores"].shape == (1, 5) and not scope["model"].training


def test_readme_training_snippet_runs(tmp_path, monkeypatch):
    """The recsys README's second Python block (training and saving from Python) runs as written,
    from a repository root beside ../shared/data (here a generated log under that name), and what
    it saves serves through SessionRecommender.load, as its comment says."""
    from rnnrec_fast.serving import SessionRecommender

    text = open(os.path.join(ROOT, "rnnrec_fast", "recsys", "README.md"), encoding="utf-8").read()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    path = re.search(r'load_clicks\("([^"]+)"\)', block).group(1)
    repo = tmp_path / "repo"
    (tmp_path / os.path.dirname(path.replace("../", ""))).mkdir(parents=True)
    repo.mkdir()
    recsys.write_clicks(recsys.synthetic_clicks(60, 15, seed=4), str(tmp_path / path.replace("../", "")))
    monkeypatch.chdir(repo)
    scope = {}
    exec(compile(block, "recsys/README.md (Python, training)", "exec"), scope)
    assert not scope["model"].training and len(scope["stats"]["epoch_losses"]) == 2
    rec = SessionRecommender.load("model.pt")
    assert len(rec.click("s", scope["model"].item_ids[0], k=3)[0]) == 3


def test_evaluate_defaults_to_conservative_ties(tmp_path, capsys):
    """evaluate ranks ties conservatively unless told otherwise (a model whose scores all tie: the
    target ranks last, recall@1 = 0; 1 with --ties standard). (From a mutation review.)"""
    import numpy as np
    import torch

    model = recsys.GRU4Rec(5, [4], item_ids=[10, 11, 12, 13, 14])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    recsys.save_checkpoint(model, str(tmp_path / "m.pt"))
    recsys.write_clicks(recsys.ClickLog(np.array([1, 1, 1]), np.array([10, 11, 12]), np.array([0.0, 1, 2])),
                        str(tmp_path / "t.txt"))
    args = ["evaluate", "--model", str(tmp_path / "m.pt"), "--test", str(tmp_path / "t.txt"), "--k", "1", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recall@1"] == 0.0
    assert main(args + ["--ties", "standard"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recall@1"] == 1.0


def test_train_checks_save_path_and_test_set_before_training(files, tmp_path, capsys, monkeypatch):
    """--save into a missing folder, onto a folder, or into a read-only one, and a --test log with no
    usable session, are refused before training starts (a whole run was lost at the end)."""
    def no_training(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(sys.modules["rnnrec_fast.recsys.train"], "train", no_training)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [(tmp_path / "missing" / "m.pt", "does not exist"), (tmp_path, "is a folder"),
             (str(tmp_path / "newdir") + os.sep, "names a folder"), ("", "no file name given")]
    if os.geteuid() != 0:  # (root writes anywhere)
        cases.append((ro / "m.pt", "not writable"))
    for save, msg in cases:
        code, _, err = _run(["train", "--train", files / "train.txt", "--save", save] + TRAIN_ARGS, capsys)
        assert code == 2 and msg in err and "Traceback" not in err, err
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("SessionId\tItemId\tTime\n1\t999991\t1\n1\t999992\t2\n")
    code, _, err = _run(["train", "--train", files / "train.txt", "--test", unknown] + TRAIN_ARGS, capsys)
    assert code == 2 and "no session with at least two clicks on items the model knows" in err, err
    assert "0 of 2 clicks are on known items ('999991' is not one)" in err, err  # (from a review: it said no more)


def _damaged_checkpoints(model, d):
    """(file, what the error names) for checkpoints cut short or with a malformed payload."""
    import torch
    data = model.read_bytes()
    out = []
    for frac in (0.1, 0.5, 0.99):
        p = d / f"cut{frac}.pt"
        p.write_bytes(data[:int(len(data) * frac)])
        out.append((p, "truncated or another file"))
    good = torch.load(model, weights_only=True)
    edits = {
        "no_n_items": (lambda c: c["config"].pop("n_items"), "malformed checkpoint"),
        "extra_key": (lambda c: c["config"].update(foo=1), "malformed checkpoint"),
        "config_int": (lambda c: c.update(config=5), "malformed checkpoint"),
        "version_str": (lambda c: c.update(version="2"), "malformed checkpoint"),
        "state_list": (lambda c: c.update(state_dict=[1]), "malformed checkpoint"),
        "items_int": (lambda c: c.update(item_ids=5), "malformed checkpoint"),
        "layers_str": (lambda c: c["config"].update(layers="x"), "malformed checkpoint config"),
        "n_items_float": (lambda c: c["config"].update(n_items=float(c["config"]["n_items"])), "bad n_items"),
        "nan_weights": (lambda c: c["state_dict"]["Wy"].fill_(float("nan")), "Wy hold NaN or infinite"),
        "one_nan": (lambda c: c["state_dict"]["Wy"].view(-1)[3].fill_(float("nan")), "Wy hold NaN or infinite"),
        "backend_key": (lambda c: c["config"].update(backend="reference"), "malformed checkpoint"),
        "items_str": (lambda c: c.update(item_ids="abcde"), "malformed checkpoint"),
        "items_tuple": (lambda c: c.update(item_ids=tuple(c["item_ids"])), "malformed checkpoint"),
        "int_key": (lambda c: c["state_dict"].update({1: torch.zeros(1)}), "weights do not match"),
    }
    for name, (edit, msg) in edits.items():
        c = torch.load(model, weights_only=True)
        edit(c)
        torch.save(c, d / f"{name}.pt")
        out.append((d / f"{name}.pt", msg))
    del good
    return out


def test_damaged_checkpoints_clean_errors(files, tmp_path, capsys):
    """A checkpoint cut short, with a malformed payload (config keys missing or foreign, wrong
    types) or with NaN weights is a one-line error naming the file, from the API (RecsysError) and
    both CLIs, never a traceback or NaN-ranked recommendations. (From a review: truncated gave
    'error: [Errno 22] Invalid argument', malformed ones tracebacks, NaN weights loaded.)"""
    from rnnrec_fast.recsys.checkpoint import load_checkpoint
    model = tmp_path / "m.pt"
    code, _, err = _run(["train", "--train", files / "train.txt", "--save", model] + TRAIN_ARGS, capsys)
    assert code == 0, err
    load_checkpoint(str(model))
    for path, msg in _damaged_checkpoints(model, tmp_path):
        with pytest.raises(recsys.RecsysError, match=re.escape(msg)) as exc:
            load_checkpoint(str(path))
        assert str(path) in str(exc.value)
        code, out, err = _run(["recommend", "--model", path, "--items", "1000"], capsys)
        assert code == 2 and msg in err and "Traceback" not in err and not out, (path, err)
    path = tmp_path / "no_n_items.pt"
    out = subprocess.run([sys.executable, "-m", "rnnrec_fast.serving", "--model", str(path), "--port", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "malformed checkpoint" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_more_bad_options_clean_errors(files, tmp_path, capsys):
    """From a review: a separator of two characters (a traceback), a split leaving no training data
    (it blamed the test data), batch size 1 without samples (no negatives: a loss of 0 trained
    nothing, exit 0)."""
    cases = [
        (["train", "--train", files / "train.txt", "--sep", "ab"], "bad separator 'ab'"),
        (["train", "--train", files / "train.txt", "--split-days", "100000"], "nothing is left to train on"),
        (["train", "--train", files / "train.txt", "--batch-size", "1", "--n-sample", "0", "--epochs", "1",
          "--quiet"], "no negative examples"),
    ]
    for args, msg in cases:
        code, out, err = _run(args, capsys)
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)


def test_config_errors_come_before_the_data_is_read(tmp_path, capsys):
    """From a review: layers of different sizes and batch size 1 without samples were refused only
    after the training log had been read (minutes on the 33M-row raw YOOCHOOSE log); now by
    TrainConfig.validate(), before the file is opened (here a file that does not exist). And --logq
    with a loss that takes no logQ correction (ignored, silently)."""
    from rnnrec_fast.recsys.train import TrainConfig
    missing = tmp_path / "missing.txt"
    for args, msg in [(["--layers", "100", "50"], "all GRU layers must have the same size"),
                      (["--batch-size", "1", "--n-sample", "0"], "no negative examples"),
                      (["--loss", "bpr-max", "--logq", "0.5"], "--logq applies to loss cross-entropy only")]:
        code, out, err = _run(["train", "--train", missing, "--epochs", "1", "--quiet"] + args, capsys)
        assert code == 2 and msg in err and "missing.txt" not in err and "Traceback" not in err, (args, err)
    with pytest.raises(recsys.RecsysError, match="all GRU layers must have the same size"):
        TrainConfig(layers=[8, 4]).validate()
    with pytest.raises(recsys.RecsysError, match="no negative examples"):
        TrainConfig(batch_size=1, n_sample=0).validate()
    TrainConfig(layers=8, batch_size=2, n_sample=0).validate()
    # (--logq: refused with the other losses only where given; TrainConfig's default stays 1.0)
    for args in ([], ["--logq", "0"]):  # (--logq 0 in the README's BPR-max settings)
        code, out, err = _run(["train", "--train", missing, "--loss", "bpr-max", "--quiet"] + args, capsys)
        assert code == 2 and "missing.txt" in err, err


def test_zero_epochs_says_nothing_was_trained(files, tmp_path, capsys):
    """From a review: --epochs 0 printed "trained in 0.0 s, 0 events/s (the GRU on the None
    backend)"; it says that nothing was trained, and still saves and evaluates the initial model."""
    model = tmp_path / "m.pt"
    code, out, err = _run(["train", "--train", files / "train.txt", "--test", files / "test.txt", "--epochs", "0",
                           "--layers", "4", "--n-sample", "4", "--quiet", "--save", model], capsys)
    assert code == 0, err
    assert "trained nothing (--epochs 0)" in err and "None" not in err and "events/s" not in err, err
    assert "Recall@20" in out and model.exists(), out


def test_options_that_would_be_ignored_or_read_nonsense_are_refused(files, tmp_path, capsys):
    """From a review (each trained on nonsense, exit 0): a column option with a fixed format (ignored:
    the format reads its own columns), one column named for two things (each item its own session),
    --split-days without times (row numbers as seconds); and a cut-short --sep escape, a folder as
    the file, a header whose stray quote runs to the csv module's field limit (tracebacks or
    misleading messages)."""
    raw = tmp_path / "raw.dat"  # the raw yoochoose-clicks.dat, detected by --format auto
    raw.write_text("".join(f"{s},2014-04-07T10:5{s % 10}:0{i}.000Z,{214536500 + i},0\n"
                           for s in range(1, 6) for i in range(3)))
    long_quote = tmp_path / "q.csv"
    long_quote.write_text('SessionId,ItemId,"Time\n' + "".join(f"{i // 3},{i % 7},{i}\n" for i in range(20000)))
    short_quote = tmp_path / "q2.csv"
    short_quote.write_text('SessionId,ItemId,"Time\n1,10,1\n1,11,2\n')
    train = files / "train.txt"
    cases = [
        (["train", "--train", train, "--format", "yoochoose", "--item-col", "Bogus"],
         "--item-col applies to --format columns, but the file is read as yoochoose (--format yoochoose)"),
        (["train", "--train", raw, "--session-col", "S", "--sep", ";"],
         "--session-col, --sep apply to --format columns, but the file is read as yoochoose-raw (detected"),
        (["train", "--train", train, "--session-col", "ItemId"], "the session and item columns are the same column"),
        (["train", "--train", train, "--time-col", "SessionId"], "the session and time columns are the same column"),
        (["train", "--train", train, "--time-col", "", "--split-days", "1"], "--split-days splits by time"),
        (["train", "--train", train, "--sep", "\\"], "bad --sep '\\\\': an incomplete backslash escape"),
        (["train", "--train", train, "--sep", "\\x"], "an incomplete backslash escape"),
        (["train", "--train", tmp_path], "is a folder, not a click-log file"),
        (["train", "--train", long_quote], "q.csv:1: unreadable header (field larger than field limit"),
        (["train", "--train", short_quote], "q2.csv:1: a quoted field of the header runs over 3 lines"),
    ]
    for args, msg in cases:
        code, out, err = _run(args + ["--epochs", "1", "--quiet"] if args[0] == "train" else args, capsys)
        assert code == 2 and msg in err and "Traceback" not in err, (args, err)
        assert len(err) < 400  # (the stray-quote header's message held the whole file)


def test_demo_says_bad_data_and_bad_epochs_without_a_traceback(tmp_path):
    """The demo on a data folder whose sample is damaged (an empty training file) or with a negative
    --epochs: an error line and exit code 2, not a traceback (--epochs before the kernel table)."""
    (tmp_path / "yoochoose-clicks-100k_train_full.txt").write_text("")
    (tmp_path / "yoochoose-clicks-100k_test.txt").write_text("SessionId\tItemId\tTime\n1\t2\t3\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RNNREC_FAST_DATA=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "rnnrec_fast.demo", "--epochs", "-1"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "--epochs must be >= 0" in p.stderr and "backend" not in p.stdout
    from rnnrec_fast import demo  # noqa: PLC0415 - in process: the kernel table replaced by nothing

    demo_parity = demo.parity_and_speed
    try:
        demo.parity_and_speed = lambda: None
        code = demo.main(["--data", str(tmp_path), "--epochs", "1"])
    finally:
        demo.parity_and_speed = demo_parity
    assert code == 2


def test_checkpoint_keeps_extra_and_refuses_a_read_only_folder(files, tmp_path, monkeypatch):
    """What was saved beside the weights (extra) comes back; a folder the process cannot write is
    refused before training (checked through os.access: root writes anywhere)."""
    from rnnrec_fast.recsys.checkpoint import check_save_path, load_checkpoint, save_checkpoint
    model = recsys.GRU4Rec(4, [3])
    save_checkpoint(model, str(tmp_path / "m.pt"), extra={"epochs": 3, "note": "x"})
    assert load_checkpoint(str(tmp_path / "m.pt")).checkpoint_extra == {"epochs": 3, "note": "x"}
    monkeypatch.setattr(os, "access", lambda *a, **kw: False)
    with pytest.raises(recsys.RecsysError, match="not writable"):
        check_save_path(str(tmp_path / "n.pt"))
    monkeypatch.undo()
    # where os.access says yes but nothing can be written (root on /proc, a read-only mount): a trial
    # file (training ran to its end, then failed to save, from a review); it leaves nothing behind
    assert check_save_path(str(tmp_path / "n.pt")) == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]

    def read_only(*a, **kw):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(recsys.RecsysError, match=r"cannot write in folder .* \(Read-only file system\)"):
        check_save_path(str(tmp_path / "n.pt"))


def test_out_of_memory_is_a_one_line_error(files, capsys, monkeypatch):
    import rnnrec_fast.recsys.cli as cli

    def oom(a):
        raise MemoryError()
    monkeypatch.setattr(cli, "_cmd_train", oom)
    code, out, err = _run(["train", "--train", files / "train.txt"], capsys)
    assert code == 2 and "out of memory" in err and "Traceback" not in err

    def torch_oom(a):  # (1 EiB: past any address space, whatever the overcommit policy)
        torch.empty(2**60, dtype=torch.uint8)
    # torch's allocators raise RuntimeErrors (the handler above never saw them: a traceback)
    monkeypatch.setattr(cli, "_cmd_train", torch_oom)
    code, out, err = _run(["train", "--train", files / "train.txt"], capsys)
    assert code == 2 and "out of memory" in err and "Traceback" not in err

    def other(a):
        raise RuntimeError("some other failure")
    monkeypatch.setattr(cli, "_cmd_train", other)
    with pytest.raises(RuntimeError, match="some other failure"):  # (not taken for memory)
        _run(["train", "--train", files / "train.txt"], capsys)


def test_non_ascii_separator_kept_escapes_decoded(files, tmp_path, capsys):
    """From an adversarial review: --sep '§' was decoded as 'Â§' (its UTF-8 bytes read as Latin-1
    by the escape decoding) and refused as two characters; escapes such as '\\t' still work."""
    log = recsys.load_clicks(str(files / "train.txt"))
    for sep, name in (("§", "para.txt"), ("€", "euro.txt"), ("\\t", "tab.txt"), ("\\x3b", "semi.txt")):
        real = sep.encode("latin-1", "backslashreplace").decode("unicode_escape")
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            f.write(real.join(["SessionId", "ItemId", "Time"]) + "\n")
            for s, i, t in zip(log.sessions, log.items, log.times):
                f.write(real.join([str(s), str(i), f"{t:.3f}"]) + "\n")
        code, out, err = _run(["train", "--train", tmp_path / name, "--sep", sep, "--epochs", "1",
                               "--n-sample", "4", "--layers", "4", "--quiet"], capsys)
        assert code == 0 and "train: " in err, (sep, err)


def test_headerless_and_millisecond_logs(files, tmp_path, capsys):
    """--no-header reads a log without a header line (columns 0, 1, 2 by default, or the indices
    given; it could not be read at all: '--session-col 0' was looked up as a name), and --time-unit
    says the unit of numeric times (auto: milliseconds, with a warning, where they pass 1e11; a log
    in milliseconds read as seconds held out minutes under --split-days); a fixed date format
    refuses it. From a review of the loaders."""
    log = recsys.load_clicks(str(files / "train.txt"))
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        for s, i, t in zip(log.sessions, log.items, log.times):
            f.write(f"{i}\t{s}\t{int(t * 1000)}\n")  # (item first: the indices below)
    days = (log.times.max() - log.times.min()) / 86400 / 3  # (the last third of the log)
    base = ["train", "--train", plain, "--no-header", "--epochs", "1", "--n-sample", "4", "--layers", "4", "--quiet",
            "--split-days", f"{days:.6f}", "--session-col", "1", "--item-col", "0"]
    with pytest.warns(UserWarning, match="times read as milliseconds"):
        code, out, err = _run(base, capsys)
    assert code == 0, err
    held_auto = re.search(r"test: (\d+) clicks", err + out).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = _run(base + ["--time-unit", "ms"], capsys)
        assert code == 0 and re.search(r"test: (\d+) clicks", err + out).group(1) == held_auto, err
        code, out, err = _run(base + ["--time-unit", "s"], capsys)  # (a split of the last ~seconds)
    assert code != 0 or re.search(r"test: (\d+) clicks", err + out).group(1) != held_auto, err
    base = base[:-4]
    code, out, err = _run(base + ["--session-col", "sid"], capsys)
    assert code == 2 and "must be an index" in err, err
    code, out, err = _run(["train", "--train", plain, "--epochs", "1", "--quiet"], capsys)
    assert code == 2 and "looks like a click, not a header" in err and "--no-header" in err, err
    raw = tmp_path / "raw.dat"
    raw.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n")
    code, out, err = _run(["train", "--train", raw, "--time-unit", "ms", "--epochs", "1", "--quiet"], capsys)
    assert code == 2 and "--time-unit applies to numeric times" in err, err


def test_logq_given_reaches_the_training_config(tmp_path, capsys, monkeypatch):
    """--logq 0 with cross-entropy trains without the logQ correction (mutation review: `a.logq or
    1.0` made it 1.0 and passed); absent, 1.0."""
    import importlib

    train_mod = importlib.import_module("rnnrec_fast.recsys.train")  # (recsys.train is the function)

    seen = []
    validate = train_mod.TrainConfig.validate
    monkeypatch.setattr(train_mod.TrainConfig, "validate", lambda self: (seen.append(self.logq), validate(self))[1])
    for args, want in (([], 1.0), (["--logq", "0"], 0.0), (["--logq", "0.25"], 0.25)):
        seen.clear()
        code, out, err = _run(["train", "--train", tmp_path / "missing.txt", "--loss", "cross-entropy", "--quiet"]
                              + args, capsys)
        assert code == 2 and "missing.txt" in err and seen == [want], (args, seen, err)


def test_zero_epochs_reports_no_backend_after_an_earlier_op_call(tmp_path, capsys):
    """--epochs 0 reports backend null in its JSON even where an earlier call in the thread ran the
    op (mutation review: the JSON took last_backend() of that earlier call)."""
    from rnnrec_fast import recsys

    log = recsys.synthetic_clicks(300, 30, seed=4)
    train, test = recsys.time_split(log, test_days=0.1)
    recsys.write_clicks(train, str(tmp_path / "train.txt"))
    recsys.write_clicks(test, str(tmp_path / "test.txt"))
    with torch.no_grad():
        rnnrec_fast.GRU(3, 4)(torch.randn(2, 1, 3))
    assert rnnrec_fast.last_backend() is not None
    code, out, err = _run(["train", "--train", tmp_path / "train.txt", "--test", tmp_path / "test.txt", "--epochs",
                           "0", "--layers", "4", "--n-sample", "4", "--quiet", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["backend"] is None and res["train_events"] == 0, res


def test_train_resume_goes_on_as_one_longer_run(files, tmp_path, capsys):
    """train --resume MODEL goes on from the saved model's training state: 1 epoch, saved, and 1
    more give the weights a 2-epoch run gives, to the bit.
    Its architecture and item map are the model's (an architecture option that differs is refused,
    as it would be ignored; the same value is fine); clicks on items it does not know are dropped,
    and said so; a file without a training state is refused."""
    args = ["train", "--train", files / "train.txt", "--n-sample", "16", "--batch-size", "8", "--quiet"]
    two, one, more = (str(tmp_path / n) for n in ("two.pt", "one.pt", "more.pt"))
    assert _run(args + ["--layers", "16", "--seed", "0", "--epochs", "2", "--save", two], capsys)[0] == 0
    assert _run(args + ["--layers", "16", "--seed", "0", "--epochs", "1", "--save", one], capsys)[0] == 0
    code, _, err = _run(args + ["--epochs", "1", "--resume", one, "--save", more], capsys)
    assert code == 0 and f"resumed {one} after 1 epoch\n" in err
    a, b = recsys.load_checkpoint(two), recsys.load_checkpoint(more)
    assert b.train_state["epochs"] == 2
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # the same file resumed and saved in place; the same --layers given again
    code, _, err = _run(args + ["--layers", "16", "--epochs", "1", "--resume", more, "--save", more], capsys)
    assert code == 0 and "after 2 epochs" in err and recsys.load_checkpoint(more).train_state["epochs"] == 3
    for opt, value in [("--layers", "32"), ("--embedding", "8"), ("--dropout-hidden", "0.1"), ("--reset-after", "false")]:
        code, _, err = _run(args + [opt, value, "--resume", one], capsys)
        assert code == 2 and f"{opt} {value} differs from the resumed model's" in err, err
    # a log with clicks on new items: those dropped, and counted
    log = recsys.load_clicks(str(files / "train.txt"))
    extra = recsys.ClickLog(np.concatenate([log.sessions, [10 ** 6, 10 ** 6]]),
                            np.concatenate([log.items, [10 ** 7 + 1, 10 ** 7 + 2]]),
                            np.concatenate([log.times, [1.0, 2.0]]))
    recsys.write_clicks(extra, str(tmp_path / "extra.txt"))
    code, _, err = _run(["train", "--train", tmp_path / "extra.txt", "--n-sample", "16", "--batch-size", "8",
                         "--quiet", "--epochs", "1", "--resume", one], capsys)
    assert code == 0 and "(2 training clicks on items the model does not know dropped)" in err
    bare = str(tmp_path / "bare.pt")
    recsys.save_checkpoint(recsys.load_checkpoint(one), bare, train_state=False)
    code, _, err = _run(args + ["--epochs", "1", "--resume", bare], capsys)
    assert code == 2 and "holds no training state" in err
    code, _, err = _run(args + ["--epochs", "1", "--resume", tmp_path / "missing.pt"], capsys)
    assert code == 2 and "model file not found" in err


def test_train_resume_takes_the_resumed_runs_training_options(files, tmp_path, capsys):
    """With --resume the training options not given are the resumed run's, saved in its training
    state (they fell back to the defaults: a bpr-max / Adam / lr 0.05 run went on as cross-entropy,
    AdagradM and lr 0.2, its optimiser state dropped; a review): resumed without repeating them, it
    gives the one longer run's weights. --seed with --resume is refused (it plays no part), and
    --epochs 0 keeps the resumed weights, as it says."""
    opts = ["--layers", "8", "--n-sample", "12", "--batch-size", "6", "--loss", "bpr-max", "--logq", "0",
            "--lr", "0.05", "--optimizer", "adam", "--chunk-steps", "2", "--quiet"]
    two, one, more = (str(tmp_path / n) for n in ("two.pt", "one.pt", "more.pt"))
    base = ["train", "--train", files / "train.txt"]
    assert _run(base + opts + ["--seed", "5", "--epochs", "2", "--save", two], capsys)[0] == 0
    assert _run(base + opts + ["--seed", "5", "--epochs", "1", "--save", one], capsys)[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no config-change or optimizer warning)
        code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--save", more, "--quiet"], capsys)
    assert code == 0, err
    a, b = recsys.load_checkpoint(two), recsys.load_checkpoint(more)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert b.train_state["config"]["loss"] == "bpr-max" and b.train_state["optimizer"] == "adam"
    code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--seed", "3", "--quiet"], capsys)
    assert code == 2 and "--seed plays no part with --resume" in err
    code, _, err = _run(base + ["--epochs", "0", "--resume", one, "--quiet"], capsys)
    assert code == 0 and "the model keeps its resumed weights" in err
    # an option given anew applies, with the library's warning that the run is no longer one run
    with pytest.warns(UserWarning, match=r"config differs .*lr 0.01 \(was 0.05\)"):
        code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--lr", "0.01", "--quiet"], capsys)
    assert code == 0, err


def test_train_resume_takes_every_training_option_from_the_resumed_run(files, tmp_path, capsys):
    """Each training option --resume takes from the saved run where not given, every one of them
    given a value other than its default in the first run (the existing test leaves sample_alpha,
    momentum, bpreg, elu_param, loss_norm and state_dropout at their defaults: a mutation check
    dropped momentum or state_dropout from the options resumed and passed): resumed without
    repeating them, no config-change warning and the one longer run's weights. --dropout-embed
    with another value than the model's is refused as the other architecture options are."""
    opts = ["--layers", "8", "--n-sample", "12", "--batch-size", "6", "--loss", "bpr-max", "--logq", "0",
            "--bpreg", "0.5", "--elu-param", "0.5", "--sample-alpha", "0.75", "--lr", "0.1", "--momentum", "0.1",
            "--chunk-steps", "2", "--loss-norm", "batch", "--state-dropout", "false", "--dropout-hidden", "0.2",
            "--quiet"]
    two, one, more = (str(tmp_path / n) for n in ("two.pt", "one.pt", "more.pt"))
    base = ["train", "--train", files / "train.txt"]
    assert _run(base + opts + ["--seed", "5", "--epochs", "2", "--save", two], capsys)[0] == 0
    assert _run(base + opts + ["--seed", "5", "--epochs", "1", "--save", one], capsys)[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no config-change warning)
        code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--save", more, "--quiet"], capsys)
    assert code == 0, err
    a, b = recsys.load_checkpoint(two), recsys.load_checkpoint(more)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--dropout-embed", "0.1", "--quiet"], capsys)
    assert code == 2 and "--dropout-embed 0.1 differs from the resumed model's" in err, err


def test_train_resume_with_another_loss_keeps_the_runs_logq_without_refusing_it(files, tmp_path, capsys):
    """--logq is refused with a loss other than cross-entropy only where it is given: a cross-entropy
    run (logq 1) resumed with --loss bpr-max goes on, with the library's warning that the config
    changed (mutation check: checking the logq taken from the saved run refused it, '--logq applies
    to loss cross-entropy only', though --logq was not given)."""
    one = str(tmp_path / "one.pt")
    base = ["train", "--train", files / "train.txt", "--quiet"]
    assert _run(base + ["--layers", "8", "--n-sample", "12", "--batch-size", "6", "--seed", "5", "--epochs", "1",
                        "--save", one], capsys)[0] == 0
    with pytest.warns(UserWarning, match=r"config differs .*loss 'bpr-max' \(was 'cross-entropy'\)"):
        code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--loss", "bpr-max"], capsys)
    assert code == 0, err
    code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--loss", "bpr-max", "--logq", "1"], capsys)
    assert code == 2 and "--logq applies to loss cross-entropy only" in err, err


def test_evaluate_and_recommend_do_not_read_the_training_state(files, tmp_path, capsys):
    """evaluate and recommend load the weights alone (train_state=False): a file whose training
    state is of a newer format (or damaged) is evaluated and recommends (mutation check: both read
    and refused it, as serving's loader does not)."""
    path = str(tmp_path / "m.pt")
    assert _run(["train", "--train", files / "train.txt", "--layers", "8", "--n-sample", "12", "--batch-size", "6",
                 "--seed", "5", "--epochs", "1", "--quiet", "--save", path], capsys)[0] == 0
    payload = torch.load(path, weights_only=True)
    payload["train_state"]["version"] = 2
    torch.save(payload, path)
    code, _, err = _run(["train", "--train", files / "train.txt", "--epochs", "1", "--quiet", "--resume", path], capsys)
    assert code == 2 and "version 2: this code reads up to 1" in err, err
    code, out, err = _run(["evaluate", "--model", path, "--test", files / "test.txt"], capsys)
    assert code == 0 and "Recall@20" in out, err
    item = recsys.load_checkpoint(path, train_state=False).item_ids[0]
    code, out, err = _run(["recommend", "--model", path, "--items", item, "--k", "3", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["items"]) == 3, err


def test_train_resume_with_another_optimizer_or_loss_carries_no_option_they_take_no_part_in(files, tmp_path, capsys):
    """A run saved with adagradm's --momentum and bpr-max's --bpreg, --elu-param and --logq 0, resumed
    with --optimizer adam and --loss cross-entropy, goes on: the options carried over that the new
    optimizer or loss takes no part in take their defaults, logq too where the loss turns to
    cross-entropy, and train() names each change (a review: refused with 'momentum applies to
    optimizer adagradm only' for a momentum not typed, and a bpr-max run's --logq 0 went on into
    cross-entropy), also from a saved config without the loss and optimizer. Given, such an option
    is still refused."""
    one = str(tmp_path / "one.pt")
    base = ["train", "--train", files / "train.txt", "--quiet"]
    assert _run(base + ["--layers", "8", "--n-sample", "12", "--batch-size", "6", "--loss", "bpr-max", "--logq", "0",
                        "--bpreg", "0.5", "--elu-param", "0.5", "--momentum", "0.1", "--seed", "5", "--epochs", "1",
                        "--save", one], capsys)[0] == 0
    with pytest.warns(UserWarning, match="config differs") as record:
        code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--optimizer", "adam", "--lr", "0.01",
                                    "--loss", "cross-entropy"], capsys)
    assert code == 0, err
    said = " ".join(str(w.message) for w in record)
    for change in ("momentum None (was 0.1)", "bpreg 0.0 (was 0.5)", "elu_param 0.0 (was 0.5)", "logq 1.0 (was 0.0)"):
        assert change in said, said
    code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--optimizer", "adam", "--momentum", "0.1"], capsys)
    assert code == 2 and "momentum applies to optimizer adagradm only" in err, err
    # a saved config without the loss and optimizer (a partial config is a valid state): the same
    payload = torch.load(one, weights_only=True)
    del payload["train_state"]["config"]["loss"], payload["train_state"]["config"]["optimizer"]
    torch.save(payload, one)
    with pytest.warns(UserWarning, match="config differs"):
        code, _, err = _run(base + ["--epochs", "1", "--resume", one, "--optimizer", "adam", "--lr", "0.01",
                                    "--loss", "cross-entropy"], capsys)
    assert code == 0, err


def test_option_checks_come_before_the_files_are_read(tmp_path, capsys):
    """From a mutation review: --k 0, --min-item-support 0 with --split-days, --layers 0 or ','
    are refused by the CLI's own checks, naming the option, before the training log (here a file
    that does not exist) or the model is read; --threads 0 (torch's default) is taken, and reaches
    the file."""
    missing = tmp_path / "missing.txt"
    for args, msg in [(["--k", "0"], "--k values must be >= 1"),
                      (["--k", "5", "-1"], "--k values must be >= 1"),
                      (["--split-days", "1", "--min-item-support", "0"], "--min-item-support >= 1"),
                      (["--layers", "0"], "bad --layers value '0': sizes must be positive"),
                      (["--layers", ","], "--layers needs at least one size")]:
        code, out, err = _run(["train", "--train", missing, "--quiet"] + args, capsys)
        assert code == 2 and msg in err and "missing.txt" not in err and "Traceback" not in err, (args, err)
    code, out, err = _run(["train", "--train", missing, "--quiet", "--threads", "0"], capsys)
    assert code == 2 and "file not found" in err and "missing.txt" in err, err
    code, out, err = _run(["recommend", "--model", tmp_path / "missing.pt", "--items", "1", "--k", "0"], capsys)
    assert code == 2 and "--k must be >= 1" in err and "missing.pt" not in err, err


def test_bool_options_and_defaults_as_documented():
    """--reset-after / --state-dropout take true/false, 1/0, yes/no, on/off in any case; train and
    evaluate rank ties conservatively by default, recommend gives 20 items (from a mutation review:
    the train --ties default and recommend's --k default were untested)."""
    from rnnrec_fast.recsys.cli import build_parser

    ap = build_parser()
    for value, want in (("ON", True), ("True", True), ("yes", True), ("1", True), ("off", False),
                        ("FALSE", False), ("No", False), ("0", False)):
        a = ap.parse_args(["train", "--train", "x", "--reset-after", value, "--state-dropout", value])
        assert a.reset_after is want and a.state_dropout is want, value
    with pytest.raises(SystemExit):
        ap.parse_args(["train", "--train", "x", "--reset-after", "maybe"])
    assert ap.parse_args(["train", "--train", "x"]).ties == "conservative"
    assert ap.parse_args(["evaluate", "--model", "m", "--test", "t"]).ties == "conservative"
    assert ap.parse_args(["recommend", "--model", "m", "--items", "1"]).k == 20


def test_recommend_lists_ranks_from_one_and_twenty_items_by_default(tmp_path, capsys):
    """recommend's text output: one line per item, 'rank<TAB>item<TAB>score', ranks 1..k, 20 items
    without --k (from a mutation review)."""
    model = recsys.GRU4Rec(30, [4], item_ids=list(range(100, 130)))
    recsys.save_checkpoint(model, str(tmp_path / "m.pt"))
    code, out, err = _run(["recommend", "--model", tmp_path / "m.pt", "--items", "100", "101"], capsys)
    assert code == 0, err
    rows = [line.split("\t") for line in out.strip().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 21))
    assert all(100 <= int(r[1]) < 130 for r in rows)


def test_a_fixed_format_refuses_no_header_and_time_col_empty_reads_the_file_order(files, tmp_path, capsys):
    """--no-header with a fixed format (whose columns are its own) is refused, as the other column
    options are; --time-col '' (no time column: the file order is the time order) trains (from a
    mutation review: --no-header was ignored with --format yoochoose; '' was looked up as a column
    name)."""
    code, out, err = _run(["train", "--train", files / "train.txt", "--format", "yoochoose", "--no-header",
                           "--epochs", "0", "--quiet"], capsys)
    assert code == 2 and "--no-header applies to --format columns" in err, err
    code, out, err = _run(["train", "--train", files / "train.txt", "--time-col", "", "--epochs", "0",
                           "--layers", "4", "--quiet"], capsys)
    assert code == 0 and "train: " in err and "trained nothing" in err, err


def test_value_errors_and_interrupts_end_without_a_traceback(files, capsys, monkeypatch):
    """A ValueError or OSError from a command is a one-line error, exit 2; Ctrl-C says 'interrupted'
    and exits 130, as a shell's SIGINT (from a mutation review)."""
    import rnnrec_fast.recsys.cli as cli

    for exc in (ValueError("a bad value"), OSError("a disk fault")):
        def fail(a, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "_cmd_train", fail)
        code, out, err = _run(["train", "--train", files / "train.txt"], capsys)
        assert code == 2 and err == f"error: {exc}\n", err

    def interrupt(a):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_cmd_train", interrupt)
    code, out, err = _run(["train", "--train", files / "train.txt"], capsys)
    assert code == 130 and err == "interrupted\n", err

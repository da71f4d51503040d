"""The examples run in seconds and learn (loss goes down, beats a trivial baseline)."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: one intra-op thread is fastest, and kind to a shared machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_next_action_rnn():
    res = _load("next_action_rnn").run(epochs=10, n_users=256, verbose=False)
    assert res["last_loss"] < res["first_loss"]
    assert res["test_bce"] < 0.9 * res["baseline_bce"]
    assert res["accuracy"] > res["baseline_accuracy"]


def test_next_rating():
    res = _load("next_rating").run(epochs=15, n_users=256, verbose=False)
    assert res["last_loss"] < res["first_loss"]
    assert res["test_mse"] < 0.5 * res["baseline_mse"]


def test_readme_using_it_snippet_runs():
    """The README's first code block ("Using it") runs as written: a new user's first paste."""
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## Using it\s+```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md (Using it)", "exec"), scope)
    assert scope["y"].shape == (20, 32, 100) and scope["out"].shape == (32, 20, 100)


def test_readme_export_snippet_runs(tmp_path, monkeypatch):
    """The README's serving-export block runs as written against a model.pt of the train command's
    shape (one GRU layer of 100), in a scratch directory."""
    import re

    from rnnrec_fast import recsys

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```python\n(from rnnrec_fast import recsys\nfrom rnnrec_fast.serving.export.*?)```",
                      text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    recsys.save_checkpoint(recsys.GRU4Rec(30, [100], item_ids=list(range(100, 130))), "model.pt")
    scope = {}
    exec(compile(block, "README.md (export)", "exec"), scope)
    assert scope["top_items"].shape == (2, 20) and scope["h_new"].shape == (1, 2, 100)
    assert (tmp_path / "step.pt2.items.json").exists()

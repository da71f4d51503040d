"""rnnrec_fast.serving, in process: semantics vs offline replay, LRU/TTL, threads, errors, export."""
import json
import math
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import rnnrec_fast
from rnnrec_fast import backends, recsys
from rnnrec_fast.serving import InvalidRequestError, SessionRecommender, SessionStore, UnknownItemError

from conftest import DEVICES, case_seed, num_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(n_items=50, layers=(16,), embedding="shared", seed=0, **kwargs):
    torch.manual_seed(seed)
    ids = [1000 + 7 * i for i in range(n_items)]  # original ids != indices
    return recsys.GRU4Rec(n_items, list(layers), embedding=embedding, item_ids=ids, **kwargs).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serving") / "model.pt")
    recsys.save_checkpoint(make_model(layers=(16, 16)), path)
    return path


def replay(model, items):
    """Offline: the state after clicking ``items`` (original ids) from a fresh session, and top-k."""
    h = model.init_state(1)
    for it in items:
        h = model.step(torch.tensor([model.item_index[it]]), h)
    return h[:, 0]


def offline_topk(model, h, k):
    s = model.score(h[-1].unsqueeze(0))[0]
    v, i = torch.topk(s, k)
    return [model.item_ids[j] for j in i.tolist()], v


# ---------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("embedding,layers", [("shared", (16,)), (8, (16, 16)), (0, (16,)), (0, (16, 16, 16))])
def test_click_matches_offline_replay(embedding, layers):
    """Clicks give the model's own step and scores; the fast path serves every model layout,
    one-hot input included (its first layer's input the item's row of W0 through the identity
    W_ih: it had declined those models, ~6x slower a click)."""
    model = make_model(layers=layers, embedding=embedding)
    rec = SessionRecommender(model)
    assert rec.uses_fast_path
    clicks_match_replay(rec, model)
    assert len(rec) == 3
    batch = SessionRecommender(model)  # the batched route, from fresh sessions
    ids = model.item_ids
    got = batch.click_many(["p", "q", "r", "s"], [ids[3], ids[9], ids[0], ids[49]], k=5)
    for (items, scores), it in zip(got, [ids[3], ids[9], ids[0], ids[49]]):
        want_items, want_scores = offline_topk(model, replay(model, [it]), 5)
        assert items == want_items
        torch.testing.assert_close(torch.tensor(scores), want_scores, **TOL)


def test_fast_path_serves_while_another_default_device_is_set():
    """A CPU model's recommender built and clicked while torch.set_default_device names another
    device ('meta' standing for 'cuda'): the fast path serves it (its probe drew its inputs on
    that device: the recommender declined it, slower, its answers still the model's)."""
    model = make_model(layers=(16,), embedding="shared")
    seq = [model.item_ids[3], model.item_ids[9], model.item_ids[40]]
    torch.set_default_device("meta")
    try:
        rec = SessionRecommender(model)
        fast = rec.uses_fast_path
        got = [rec.click("s", it, k=5) for it in seq][-1]
        state = rec.state("s").clone()
    finally:
        torch.set_default_device(None)
    assert fast
    h = replay(model, seq)
    torch.testing.assert_close(state, h, **TOL)
    want_items, want_scores = offline_topk(model, h, 5)
    assert got[0] == want_items
    torch.testing.assert_close(torch.tensor(got[1]), want_scores, **TOL)


def clicks_match_replay(rec, model):
    """Three sessions clicked one click at a time in ``rec``: after each session's clicks, its state
    (on the recommender's device) and top-5 are those of ``model`` (on the CPU) replayed offline.
    Returns the sessions' clicks."""
    ids = model.item_ids
    seqs = {"a": [ids[3], ids[9], ids[3], ids[40]], "b": [ids[1]], 7: [ids[2], ids[2]]}
    for sid, seq in seqs.items():
        for it in seq:
            got_items, got_scores = rec.click(sid, it, k=5)
        h = replay(model, seq)
        assert rec.state(sid).device == rec.device
        torch.testing.assert_close(rec.state(sid).cpu(), h, **TOL)
        exp_items, exp_scores = offline_topk(model, h, 5)
        assert got_items == exp_items
        torch.testing.assert_close(torch.tensor(got_scores), exp_scores, **TOL)
        assert rec.session_info(sid)["clicks"] == len(seq)
    return seqs


def test_batch_scores_use_few_onednn_row_counts():
    """Batches over 64 rows are scored at one of a few padded row counts (oneDNN keeps ~0.6 MB for
    every row count it sees: batches of each size up to 4096 grew the process by ~1 GB), at most
    1.5x the rows: the smallest of 96, 128, 192, 256, ... that holds the batch (96 rows stay 96;
    from a mutation review, which padded 96 rows to 128 and passed the bounds alone), with the
    scores of the rows given."""
    from rnnrec_fast.serving import fastpath

    rows = {fastpath.onednn_rows(B) for B in range(4, 4097)}
    assert len(rows) <= 75
    allowed = sorted({p for k in range(6, 13) for p in (1 << k, 3 << (k - 1))})
    for B in range(4, 4097):
        P = fastpath.onednn_rows(B)
        assert B <= P <= 1.5 * B and (P == B or B > 64)
        assert B <= 64 or P == min(p for p in allowed if p >= B), B
    model = make_model(n_items=300, layers=(24,))
    fast = fastpath.build(model)
    assert fast.packed is not None or not torch.backends.mkldnn.is_available()
    with torch.no_grad():
        for B in (4, 5, 64, 65, 97, 200):
            h = torch.randn(B, 24)
            got = fast.score(h)
            assert got.shape == (B, 300)
            torch.testing.assert_close(got, model.score(h), **TOL)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_fast_path_makes_its_other_copies_of_wy_at_first_use():
    """Wy.t() and oneDNN's reordered Wy (each one more copy of Wy: 40 MB at 100k items x 100) are
    made when score() first takes their route, not when the fast path is built: clicks and batches
    that take the one-call paths never make them; once made they score as model.score does."""
    model = make_model(n_items=300, layers=(24,))
    rec = SessionRecommender(model)
    ids = model.item_ids
    rec.click("a", ids[1])
    rec.click_many([f"s{i}" for i in range(8)], [ids[i] for i in range(8)], k=5)
    fast = rec._fast
    assert fast is not None
    if not _C_scalar():  # (the one-call click and batch ran: neither copy is made)
        assert "Wt" not in vars(fast) and "packed" not in vars(fast)
    h = torch.randn(8, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast.score(h), model.score(h), **TOL)  # (oneDNN's route where it is there)
        assert "packed" in vars(fast)
        assert fast.Wt.is_contiguous() and torch.equal(fast.Wt, model.Wy.detach().t())
        assert fast.Wt is fast.Wt  # (made once)


@pytest.mark.parametrize("threads,small", [(1, True), (2, True), (1, False), (2, False)])
def test_fast_path_scores_every_route(threads, small, monkeypatch):
    """The fast path's single-row scores and a click's top-k (exclude_seen), by the extension's
    few-rows product and one-call top-k (a small catalogue, or more than one thread) or by MKL's
    GEMV and torch.topk (a large one on one thread), equal model.score and torch.topk."""
    from rnnrec_fast.serving import fastpath

    monkeypatch.setattr(fastpath, "_ROWS_MAX_BYTES_1T", 1 << 30 if small else 0)
    model = make_model(n_items=300, layers=(24,))
    fast = fastpath.build(model)
    assert fast is not None
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        h = torch.randn(3, 24)
        with torch.no_grad():
            for rows in (1, 2, 3):
                torch.testing.assert_close(fast.score(h[:rows]), model.score(h[:rows]), **TOL)
            top = fast.topk_row(h[0], 10, [4, 4, 7])
            # (the extension's one-call top-k; without it, torch.topk: None)
            assert (top is not None) == ((small or threads > 1) and backends.available("cpp"))
            if top is not None:
                s = model.score(h[:1])[0]
                s[[4, 7]] = float("-inf")
                v, i = torch.topk(s, 10)
                assert top[1] == i.tolist()
                torch.testing.assert_close(torch.tensor(top[0]), v, **TOL)
            rec = SessionRecommender(model)
            rec._fast = fast
            ids = model.item_ids
            for it in (ids[3], ids[9], ids[3]):
                got = rec.click("s", it, k=6, exclude_seen=True)
            exp_items, exp_scores = offline_topk(model, replay(model, [ids[3], ids[9], ids[3]]), 8)
            exp = [(i, v) for i, v in zip(exp_items, exp_scores.tolist()) if i not in (ids[3], ids[9])][:6]
            assert got[0] == [i for i, _ in exp]
    finally:
        torch.set_num_threads(old)


def test_click_many_matches_click_and_repeats_apply_in_order():
    model = make_model()
    ids = model.item_ids
    rec_a, rec_b = SessionRecommender(model), SessionRecommender(model)
    sids = ["x", "y", "x", "z", "x", "y"]
    items = [ids[1], ids[2], ids[3], ids[4], ids[5], ids[6]]
    rec_a.click("y", ids[10])  # pre-existing state for y
    rec_b.click("y", ids[10])
    batch = rec_a.click_many(sids, items, k=4)
    single = [rec_b.click(s, i, k=4) for s, i in zip(sids, items)]
    assert len(batch) == len(sids)
    for (bi, bs), (si, ss) in zip(batch, single):
        assert bi == si
        torch.testing.assert_close(torch.tensor(bs), torch.tensor(ss), **TOL)
    for s, seq in (("x", [ids[1], ids[3], ids[5]]), ("y", [ids[10], ids[2], ids[6]]), ("z", [ids[4]])):
        torch.testing.assert_close(rec_a.state(s), replay(model, seq), **TOL)
        assert rec_a.session_info(s)["clicks"] == len(seq)
    assert rec_a.click_many([], [], k=3) == []


def test_exclude_seen_and_end():
    model = make_model(n_items=6)
    rec = SessionRecommender(model)
    ids = model.item_ids
    rec.click("s", ids[0], k=3)
    items, scores = rec.click("s", ids[1], k=6, exclude_seen=True)
    assert len(items) == 4 and ids[0] not in items and ids[1] not in items
    assert all(s != float("-inf") for s in scores)
    out = rec.click_many(["s", "t"], [ids[2], ids[2]], k=6, exclude_seen=True)
    assert set(out[0][0]) == set(ids[3:]) and set(out[1][0]) == set(ids) - {ids[2]}
    assert rec.end("s") is True and rec.end("s") is False
    assert rec.state("s") is None
    rec.click("s", ids[4], k=1)  # a new session from the initial state
    torch.testing.assert_close(rec.state("s"), replay(model, [ids[4]]), **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_clicks_on_a_device_match_an_offline_replay_on_the_cpu(device, checkpoint):
    """A recommender on a device (its session store and every click's step, scores and top-k there),
    click by click and in batches, against the checkpoint's model replayed offline on the CPU."""
    rec = SessionRecommender.load(checkpoint, device=device)
    model = recsys.load_checkpoint(checkpoint)
    assert rec.device.type == device
    ids = model.item_ids
    seqs = clicks_match_replay(rec, model)
    batch = rec.click_many(["a", "b", "c"], [ids[5], ids[6], ids[7]], k=3)
    for (items, scores), (sid, seq) in zip(batch, (("a", seqs["a"] + [ids[5]]), ("b", [ids[1], ids[6]]),
                                                   ("c", [ids[7]]))):
        h = replay(model, seq)
        torch.testing.assert_close(rec.state(sid).cpu(), h, **TOL)
        assert items == offline_topk(model, h, 3)[0]


def test_load_from_checkpoint(checkpoint):
    rec = SessionRecommender.load(checkpoint)
    model = recsys.load_checkpoint(checkpoint)
    ids = model.item_ids
    rec.click("a", ids[1])
    items, _ = rec.click("a", ids[2], k=3)
    assert items == offline_topk(model, replay(model, [ids[1], ids[2]]), 3)[0]


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("embedding,layers,reset_after,max_seen",
                         [("shared", (16,), True, 3), (8, (16, 16), True, 256), (32, (24,), False, 0),
                          ("shared", (16, 16, 16), False, 1), (0, (16,), True, 3), (0, (16, 16), False, 256)])
def test_one_call_click_matches_the_separate_calls(embedding, layers, reset_after, max_seen):
    """The fast path's one C++ call for a click (_C.click_topk: the step, the state written back,
    the scores and top-k) gives what its separate calls give (step_row, the copy back, topk_row),
    bit for bit: items, scores, states, seen items; with and without exclude_seen (the excluded
    items as they are after the click: the last max_seen, 0 to 256), any k up to the catalogue,
    new and held sessions, one to three layers, an embedding of its own (I != H), one-hot input
    (I = 3H, through the identity W_ih)."""
    model = make_model(n_items=40, layers=layers, embedding=embedding, reset_after=reset_after)
    one = SessionRecommender(model, max_seen=max_seen)
    sep = SessionRecommender(model, max_seen=max_seen)
    calls = []
    fused = one._fast.click
    one._fast.click = lambda *a: calls.append(1) or fused(*a)
    sep._fast.click = None  # (click_row declines: the separate calls)
    ids = model.item_ids
    gen = torch.Generator().manual_seed(len(layers) * 10 + max_seen)
    for i in range(60):
        sid = int(torch.randint(0, 5, (), generator=gen))
        it = ids[int(torch.randint(0, 40, (), generator=gen))]
        k = int(torch.randint(1, 41, (), generator=gen))
        excl = bool(torch.randint(0, 2, (), generator=gen))
        got, want = one.click(sid, it, k=k, exclude_seen=excl), sep.click(sid, it, k=k, exclude_seen=excl)
        assert got[0] == want[0] and got[1] == want[1], i
        assert torch.equal(one.state(sid), sep.state(sid)), i
        assert one.session_info(sid) == sep.session_info(sid), i
    assert len(calls) == 60


def _refusals_and_declines_without_change(fn, args, slab, refused, declined):
    """fn(**args) changed by each of ``refused`` ((changes, message)) raises a ValueError with that
    message, and changed by each of ``declined`` returns None; none of them writes ``slab`` (the
    one in args) or the slab it was given instead (its values and its version)."""
    before = slab.clone()
    for bad, match in refused:
        with pytest.raises(ValueError, match=match):
            fn(**{**args, **bad})
        assert torch.equal(slab, before)
    for other in declined:
        given = other.get("slab", slab)
        kept, version = given.detach().clone(), given._version
        assert fn(**{**args, **other}) is None
        assert torch.equal(slab, before) and torch.equal(given.detach(), kept) and given._version == version


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_one_call_click_refuses_or_declines_without_change():
    """_C.click_topk raises a ValueError for a bad item index, slot, k or excluded index, and
    declines (None) tensors it does not take (another dtype, a non-contiguous one, shapes that do
    not fit, a missing bias, a state slab that needs autograd: it was written in place, where
    autograd refuses an in-place change of a leaf), in each case before it changes the state."""
    from rnnrec_fast import _C

    if _C.simd_level() == "scalar":
        pytest.skip("without the vector kernels click_topk declines every call")
    model = make_model(n_items=30, layers=(16, 16), embedding=8)
    fast = SessionRecommender(model)._fast
    slab = torch.randn(4, 2, 16)
    before = slab.clone()
    args = dict(emb=fast.emb, idx=3, slab=slab, slot=1, weights=fast.flat, reset_after=True, W=fast.Wy, b=fast.by,
                k=5, exclude=[])
    w = list(fast.flat)
    _refusals_and_declines_without_change(_C.click_topk, args, slab, refused=[
        (dict(idx=30), "item index 30"), (dict(idx=-1), "item index -1"), (dict(slot=4), "slot 4"),
        (dict(k=0), "k must be"), (dict(k=31), "k must be"), (dict(exclude=[2, 30]), "excluded index 30")], declined=[
        dict(slab=slab.double()), dict(slab=torch.randn(4, 16, 2).transpose(1, 2)), dict(slab=torch.randn(4, 1, 16)),
        dict(emb=fast.emb.t().contiguous().t()), dict(W=fast.Wy[:, :8]), dict(W=fast.Wy[:, :8].contiguous()),
        dict(W=fast.Wy[:-1].contiguous()), dict(b=fast.by[:-1]), dict(weights=w[:7]),
        dict(weights=[w[1]] + w[1:]), dict(weights=w[:3] + [w[3].double()] + w[4:]),
        dict(slab=slab.clone().requires_grad_())])
    version = slab._version
    vals, idx = _C.click_topk(**args)
    assert len(vals) == len(idx) == 5 and not torch.equal(slab[1], before[1])
    assert slab._version > version  # (written in place, as row.copy_ would have)
    assert torch.equal(slab[[0, 2, 3]], before[[0, 2, 3]])


def _exact_scoring_case(N, H, M, seed):
    """Integer-valued W (N, H), bias and states (M, H): every score is exact in float32 whatever
    the order of its sums (so the GEMM kernel and ATen's agree bit for bit), with many ties; a NaN,
    +inf and -inf among the biases."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randint(-3, 4, (N, H), generator=g).float()
    b = torch.randint(-8, 9, (N,), generator=g).float()
    b[5], b[7], b[N - 1] = float("nan"), float("inf"), float("-inf")
    h = torch.randint(-2, 3, (M, H), generator=g).float()
    return W, b, h


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_scores_and_topk_in_one_call(threads):
    """_C.score_topk_rows (the batch's scores against the catalogue with the packed GEMM kernel,
    each row's excluded items at -inf, its k best) gives topk_rows of the same scores made by
    ATen, bit for bit: values, indices, the order of ties (lower index first) and of NaN (first);
    for k from 1 to the catalogue (the sorted-array selection to 32, the partial sort past it, the
    vector pass's bound from 1,024 scores), 1 to 64 rows, with and without exclude lists (empty
    ones, repeated indices), on one and two threads."""
    from rnnrec_fast import _C

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N, H in ((300, 24), (2933, 16)):
            W, b, h_all = _exact_scoring_case(N, H, 64, seed=N)
            packed = _C.pack_scores_weights(W)
            if packed is None:
                assert _C.simd_level() == "scalar"
                pytest.skip("without the vector kernels there is no packed GEMM")
            for M in (1, 7, 64):
                h = h_all[:M].contiguous()
                exact = torch.addmm(b, h, W.t())
                g = torch.Generator().manual_seed(M)
                excl = [torch.randint(0, N, (int(torch.randint(0, 6, (), generator=g)),), generator=g).tolist()
                        for _ in range(M)]
                excl[0] = excl[0] + excl[0][:1] + [5]  # (a repeated index; the NaN item excluded)
                for k in (1, 4, 20, 32, 33, N):
                    for ex in ([], excl):
                        vals, idx = _C.score_topk_rows(h, W, packed, b, k, ex)
                        s = exact.clone()
                        for r, row in enumerate(ex):
                            s[r, row] = float("-inf")
                        want_v, want_i = _C.topk_rows(s, k)
                        assert torch.equal(idx, want_i), (N, M, k, bool(ex))
                        torch.testing.assert_close(vals, want_v, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("N,H", [(2933, 100), (301, 13)])
def test_batch_scores_and_topk_of_real_values(N, H):
    """_C.score_topk_rows on real-valued (not exactly summed) weights and states against
    torch.topk of ATen's scores: the values within float32 rounding, each index's score the value
    given for it (a near-tie may order two items differently; nothing else may differ)."""
    from rnnrec_fast import _C

    torch.manual_seed(case_seed("score_topk_rows", N, H))
    W, b, h = torch.randn(N, H) * 0.3, torch.randn(N), torch.randn(37, H)
    packed = _C.pack_scores_weights(W)
    if packed is None:
        pytest.skip("without the vector kernels there is no packed GEMM")
    scores = torch.addmm(b, h, W.t())
    for k in (1, 20, 50):
        vals, idx = _C.score_topk_rows(h, W, packed, b, k, [])
        want = torch.topk(scores, k)
        torch.testing.assert_close(vals, want.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores.gather(1, idx), vals, rtol=1e-5, atol=1e-5)
        assert (vals[:, :-1] >= vals[:, 1:]).all()
        assert (idx == want.indices).float().mean() > 0.99


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("N,M", [(40, 4 * 2**20 // 40 + 1), (70_000, 130), (70_000, 59), (70_000, 60)])
def test_batch_scores_and_topk_past_the_scratch_in_blocks(N, M):
    """Over 4M scores (16 MiB) _C.score_topk_rows scores the batch a block of rows at a time (it
    declined such batches, which then took oneDNN and topk_rows: slower, and one more copy of Wy):
    the same values and indices as topk_rows of ATen's scores, bit for bit on exact data, each row's
    exclude list kept to its row: one row past the limit, three blocks with a shorter last one,
    the largest batch of one block and the smallest of two."""
    from rnnrec_fast import _C

    W, b, h = _exact_scoring_case(N, 8, M, seed=N + M)
    packed = _C.pack_scores_weights(W)
    if packed is None:
        pytest.skip("without the vector kernels there is no packed GEMM")
    scores = torch.addmm(b, h, W.t())
    # each row's own four best (the NaN and +inf biases' items and two of its own) excluded: a row
    # given another row's list shows
    exclude = _C.topk_rows(scores, 4)[1].tolist()
    for r, ex in enumerate(exclude):
        scores[r, ex] = float("-inf")
    want = _C.topk_rows(scores, 10)
    got = _C.score_topk_rows(h, W, packed, b, 10, exclude)
    assert got is not None
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1], want[1])


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_batch_scores_and_topk_refuses_or_declines():
    """_C.score_topk_rows raises a ValueError for a bad k, W not of the bias's and states' sizes,
    packed weights of another size, not one exclude list per row, an excluded index out of range;
    and declines (None) what it does not take: another dtype, a non-contiguous state, states that
    need autograd."""
    from rnnrec_fast import _C

    W, b, h = _exact_scoring_case(40, 8, 3, seed=1)
    packed = _C.pack_scores_weights(W)
    if packed is None:
        pytest.skip("without the vector kernels there is no packed GEMM")
    args = dict(h=h, W=W, packed=packed, b=b, k=5, exclude=[])
    for bad, match in [(dict(k=0), "k must be"), (dict(k=41), "k must be"), (dict(W=W[:, :7]), "W must be"),
                       (dict(W=W[:39]), "W must be"), (dict(packed=packed[:-1]), "packed weights for"),
                       (dict(exclude=[[1], [2]]), "2 exclude lists for 3 rows"),
                       (dict(exclude=[[1], [40], []]), "excluded index 40"),
                       (dict(exclude=[[-1], [], []]), "excluded index -1")]:
        with pytest.raises(ValueError, match=match):
            _C.score_topk_rows(**{**args, **bad})
    for other in [dict(h=h.double()), dict(h=h.t().contiguous().t()), dict(b=b.double()),
                  dict(packed=packed.double()), dict(h=h.clone().requires_grad_())]:
        assert _C.score_topk_rows(**{**args, **other}) is None
    assert _C.pack_scores_weights(W.double()) is None and _C.pack_scores_weights(W.t()) is None
    with torch.no_grad():  # (states that require grad, where no autograd is recorded)
        assert _C.score_topk_rows(**{**args, "h": h.clone().requires_grad_()}) is not None


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("embedding,layers,reset_after,max_seen",
                         [("shared", (16,), True, 3), (8, (13, 13), True, 256), (32, (24,), False, 0),
                          ("shared", (13, 13, 13), False, 1)])
def test_one_call_batch_matches_the_separate_calls(embedding, layers, reset_after, max_seen):
    """The fast path's one C++ call for a batch of clicks of distinct sessions (_C.click_rows_topk:
    the step of the gathered states, the states written back, the scores and top-k) gives what its
    separate calls give (step, the copy back, score_topk_rows), bit for bit: items, scores, states,
    seen items; with and without exclude_seen, any k up to the catalogue, new and held sessions,
    one to three layers, an embedding of its own (I != H); batches with a session twice take the
    step in rounds in both."""
    model = make_model(n_items=43, layers=layers, embedding=embedding, reset_after=reset_after)
    one = SessionRecommender(model, max_seen=max_seen)
    sep = SessionRecommender(model, max_seen=max_seen)
    sep_fast = sep._fast
    assert one._fast.click_batch is not None or _C_scalar()
    calls = []
    fused = one._fast.click_batch
    if fused is not None:
        one._fast.click_batch = lambda *a: calls.append(1) or fused(*a)
    sep._fast.click_batch = None  # (click_rows declines: the separate calls)
    ids = model.item_ids
    gen = torch.Generator().manual_seed(len(layers) * 10 + max_seen)
    distinct = 0
    for i in range(40):
        B = int(torch.randint(1, 9, (), generator=gen))
        sids = torch.randint(0, 10, (B,), generator=gen).tolist()
        items = [ids[int(j)] for j in torch.randint(0, 43, (B,), generator=gen)]
        k = int(torch.randint(1, 44, (), generator=gen))
        excl = bool(torch.randint(0, 2, (), generator=gen))
        got, want = one.click_many(sids, items, k=k, exclude_seen=excl), sep.click_many(sids, items, k=k, exclude_seen=excl)
        assert got == want, i
        distinct += B > 1 and len(set(sids)) == B
        for sid in range(10):  # (every session: a write into another's row would show)
            assert one.session_info(sid) == sep.session_info(sid), i
            if one.session_info(sid) is not None:
                assert torch.equal(one.state(sid), sep.state(sid)), i
    assert distinct > 5 and (len(calls) == distinct or fused is None)
    assert sep._fast is sep_fast and sep_fast.click_batch is None  # (the separate calls all along)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_one_call_batch_past_the_scratch_matches_the_separate_calls():
    """A batch whose scores pass 4M (64 sessions over 70,000 items) takes the one C++ call too (it
    declined them: the separate calls and oneDNN's scores served) and gives what the separate calls
    give, bit for bit: items, scores and states, new and held sessions, with exclude_seen."""
    model = make_model(n_items=70_000, layers=(8,), embedding=8)
    one, sep = SessionRecommender(model), SessionRecommender(model)
    fused = one._fast.click_batch
    if fused is None:
        assert _C_scalar()
        pytest.skip("without the vector kernels there is no one-call batch")
    taken = []
    one._fast.click_batch = lambda *a: taken.append(fused(*a)) or taken[-1]
    sep._fast.click_batch = None
    ids = model.item_ids
    sids = [f"s{i}" for i in range(64)]
    for r in range(2):
        items = [ids[(i * 1093 + r * 17) % 70_000] for i in range(64)]
        got = one.click_many(sids, items, k=10, exclude_seen=True)
        assert got == sep.click_many(sids, items, k=10, exclude_seen=True), r
    assert len(taken) == 2 and all(t is not None for t in taken)
    for sid in sids:
        assert torch.equal(one.state(sid), sep.state(sid)), sid


def _C_scalar():
    from rnnrec_fast import _C

    return _C.simd_level() == "scalar"


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_one_call_batch_refuses_or_declines_without_change():
    """_C.click_rows_topk raises a ValueError for a bad item index or slot, a slot given twice,
    items and slots of different counts, a bad k or exclude list, W not of the catalogue's size;
    and declines (None) tensors it does not take (another dtype, a non-contiguous one, shapes that
    do not fit, a state slab that needs autograd); in each case before it changes the state."""
    from rnnrec_fast import _C

    if _C_scalar():
        pytest.skip("without the vector kernels click_rows_topk declines every call")
    model = make_model(n_items=30, layers=(16, 16), embedding=8)
    fast = SessionRecommender(model)._fast
    slab = torch.randn(6, 2, 16)
    before = slab.clone()
    args = dict(emb=fast.emb, idxs=[3, 4, 5], slab=slab, slots=[1, 4, 2], weights=fast.flat, reset_after=True,
                W=fast.Wy, packed=fast.packed_rows, b=fast.by, k=5, exclude=[])
    w = list(fast.flat)
    _refusals_and_declines_without_change(_C.click_rows_topk, args, slab, refused=[
        (dict(idxs=[3, 30, 1]), "item index 30"), (dict(idxs=[-1, 2, 3]), "item index -1"),
        (dict(slots=[1, 6, 2]), "slot 6"), (dict(slots=[1, -1, 2]), "slot -1"),
        (dict(slots=[1, 4, 1]), "a slot appears more than once"), (dict(slots=[1, 4]), "3 items for 2 slots"),
        (dict(k=0), "k must be"), (dict(k=31), "k must be"), (dict(exclude=[[1]]), "1 exclude lists for 3 rows"),
        (dict(exclude=[[2], [30], []]), "excluded index 30"), (dict(W=fast.Wy[:-1]), "W must be")], declined=[
        dict(slab=slab.double()), dict(slab=torch.randn(6, 16, 2).transpose(1, 2)), dict(slab=torch.randn(6, 1, 16)),
        dict(emb=fast.emb.t().contiguous().t()), dict(b=fast.by.double()), dict(packed=fast.packed_rows.double()),
        dict(weights=w[:7]), dict(weights=[w[1]] + w[1:]), dict(weights=w[:3] + [w[3].double()] + w[4:]),
        dict(slab=slab.clone().requires_grad_())])
    version = slab._version
    vals, idx = _C.click_rows_topk(**args)
    assert vals.shape == idx.shape == (3, 5)
    assert all(not torch.equal(slab[s], before[s]) for s in (1, 4, 2))
    assert slab._version > version  # (written in place, as index_copy_ would have)
    assert torch.equal(slab[[0, 3, 5]], before[[0, 3, 5]])
    grad_slab = before.clone().requires_grad_()
    with torch.no_grad():  # (a slab that requires grad, where autograd records nothing: written)
        assert _C.click_rows_topk(**{**args, "slab": grad_slab}) is not None


# ---------------------------------------------------------------------------------------------- errors
def test_errors_leave_state_unchanged():
    model = make_model()
    rec = SessionRecommender(model, max_k=25)
    ids = model.item_ids
    rec.click("s", ids[1])
    before = rec.state("s")
    bad = [
        (UnknownItemError, "unknown item id 999999", lambda: rec.click("s", 999999)),
        (UnknownItemError, "unknown item id 999999", lambda: rec.click("new", 999999)),
        (TypeError, "item_id must be an int or a str, got float", lambda: rec.click("s", 1.5)),
        (TypeError, "item_id must be an int or a str, got bool", lambda: rec.click("s", True)),
        (TypeError, "session_id must be a str or an int, got NoneType", lambda: rec.click(None, ids[1])),
        (TypeError, "session_id must be a str or an int, got tuple", lambda: rec.click(("t",), ids[1])),
        (InvalidRequestError, r"k must be in \[1, 25\], got 0", lambda: rec.click("s", ids[1], k=0)),
        (InvalidRequestError, r"k must be in \[1, 25\], got 26", lambda: rec.click("s", ids[1], k=26)),
        (TypeError, "k must be an int, got str", lambda: rec.click("s", ids[1], k="5")),
        (UnknownItemError, "unknown item id -5", lambda: rec.click_many(["s", "u"], [ids[2], -5])),
        (InvalidRequestError, r"differ in length \(2 vs 1\)", lambda: rec.click_many(["s", "u"], [ids[2]])),
        (TypeError, "session_id must be a str or an int, got float", lambda: rec.click_many(["s", 2.0], [ids[2], ids[3]])),
        (InvalidRequestError, r"k must be in \[1, 25\], got -1", lambda: rec.click_many(["s"], [ids[2]], k=-1)),
        (TypeError, "item_id must be an int or a str, got float", lambda: rec.click_many(["s", "u"], [ids[2], 2.0])),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
    assert isinstance(UnknownItemError(5), LookupError) and "unknown item id 5" in str(UnknownItemError(5))
    torch.testing.assert_close(rec.state("s"), before, rtol=0, atol=0)
    assert rec.session_info("s")["clicks"] == 1
    assert len(rec) == 1 and rec.state("new") is None and rec.state("u") is None


def test_batch_too_large_rejected_without_change():
    model = make_model()
    rec = SessionRecommender(model, max_sessions=3, max_batch=8)
    ids = model.item_ids
    with pytest.raises(InvalidRequestError, match="max_batch"):
        rec.click_many(["a"] * 9, [ids[0]] * 9)
    assert len(rec) == 0


@pytest.mark.parametrize("exclude_seen", [False, True, "per-row"])
def test_batch_with_more_sessions_than_max_sessions_acts_as_single_clicks(exclude_seen):
    model = make_model()
    ids = model.item_ids
    batch_rec = SessionRecommender(model, max_sessions=2, max_batch=16, initial_capacity=1)
    one_rec = SessionRecommender(model, max_sessions=2, max_batch=16, initial_capacity=1)
    for rec in (batch_rec, one_rec):
        rec.click("b", ids[7])  # held before the batch
    sids = ["a", "b", "a", "c", "d", "b", "e", "e", "a"]
    items = [ids[i] for i in (1, 2, 3, 4, 5, 6, 8, 9, 10)]
    excl = [i % 2 == 0 for i in range(len(sids))] if exclude_seen == "per-row" else exclude_seen
    got = batch_rec.click_many(sids, items, k=6, exclude_seen=excl) if exclude_seen != "per-row" else \
        [(i, v) for v, i in zip(*batch_rec.step_batch(sids, [model.item_index[i] for i in items], 6, excl))]
    want = []
    for n, (s, i) in enumerate(zip(sids, items)):
        e = excl[n] if isinstance(excl, list) else excl
        if exclude_seen == "per-row":
            v, ix = one_rec.step_batch([s], [model.item_index[i]], 6, e)
            want.append((ix[0], v[0]))
        else:
            want.append(one_rec.click(s, i, k=6, exclude_seen=e))
    assert len(got) == len(want)
    for (gi, gs), (wi, ws) in zip(got, want):
        assert list(gi) == list(wi)
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)
    assert sorted(batch_rec.store._map) == sorted(one_rec.store._map) == ["a", "e"]
    for s in ("a", "e"):
        torch.testing.assert_close(batch_rec.state(s), one_rec.state(s), **TOL)
        assert batch_rec.session_info(s) == one_rec.session_info(s)
    assert batch_rec.store.evicted_lru == one_rec.store.evicted_lru


def _same_as_one_at_a_time(batch_rec, one_rec, got, want):
    assert len(got) == len(want)
    for (gi, gs), (wi, ws) in zip(got, want):
        assert list(gi) == list(wi)
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)
    assert list(batch_rec.store._map) == list(one_rec.store._map)  # same sessions, same LRU order
    for s in one_rec.store._map:
        torch.testing.assert_close(batch_rec.state(s), one_rec.state(s), **TOL)
        assert batch_rec.session_info(s) == one_rec.session_info(s)
    assert batch_rec.store.evicted_lru == one_rec.store.evicted_lru


@pytest.mark.parametrize("sids,expect_held", [
    (["c", "a"], ["c", "a"]),  # c's creation evicts a (then least recently used) before a's click
    (["a", "b", "c", "a"], ["c", "a"]),  # a batch evicting its own sessions: as one at a time
    (["c", "b"], ["c", "b"]),
])
def test_batch_in_a_full_store_evicts_as_single_clicks(sids, expect_held):
    """In a full store a batch evicts what the same clicks one at a time evict, in the same order
    (it kept the held sessions it clicked and evicted others: 'a' then had 2 clicks, not 1)."""
    model = make_model()
    ids = model.item_ids
    recs = [SessionRecommender(model, max_sessions=2, initial_capacity=1) for _ in range(2)]
    for rec in recs:
        rec.click("a", ids[1])
        rec.click("b", ids[2])
    items = [ids[10 + n] for n in range(len(sids))]
    got = recs[0].click_many(sids, items, k=5)
    want = [recs[1].click(s, i, k=5) for s, i in zip(sids, items)]
    _same_as_one_at_a_time(recs[0], recs[1], got, want)
    assert list(recs[0].store._map) == expect_held


def test_random_batches_under_lru_pressure_match_single_clicks():
    """Random batches (repeats, held and new sessions, per-row k and exclude_seen) into a store of
    7 sessions: every result, state, click count, LRU order and eviction count equals the clicks
    applied one at a time."""
    import random

    model = make_model()
    ids = model.item_ids
    rng = random.Random(4)
    batch_rec = SessionRecommender(model, max_sessions=7, initial_capacity=2)
    one_rec = SessionRecommender(model, max_sessions=7, initial_capacity=2)
    for _ in range(60):
        B = rng.randint(1, 12)
        sids = [rng.randint(0, 14) for _ in range(B)]
        items = [ids[rng.randrange(len(ids))] for _ in range(B)]
        ks = [rng.choice([1, 3, 40]) for _ in range(B)]
        excl = [rng.random() < 0.3 for _ in range(B)]
        idxs = [model.item_index[i] for i in items]
        v, ix = batch_rec.step_batch(sids, idxs, ks, excl)
        got = list(zip(ix, v))
        want = []
        for s, i, k, e in zip(sids, idxs, ks, excl):
            wv, wi = one_rec.step_batch([s], [i], k, e)
            want.append((wi[0], wv[0]))
        assert [len(g[0]) for g in got] == ks
        _same_as_one_at_a_time(batch_rec, one_rec, got, want)
    assert batch_rec.store.evicted_lru > 20


def test_per_click_k_in_a_batch():
    """step_batch takes each click's k (the HTTP service's batches mix requests): each row gets
    its own k, equal to the leading entries of a larger k; a wrong count of k raises. Such a batch
    takes the one C++ call too, selecting each row's max(k) best (it went to oneDNN's scores and a
    selection per distinct k, and made the oneDNN copy of Wy)."""
    model = make_model()
    rec = SessionRecommender(model)
    one_call = backends.available("cpp") and not _C_scalar()
    taken = []
    if one_call:
        fused = rec._fast.click_batch
        rec._fast.click_batch = lambda *a: taken.append(fused(*a)) or taken[-1]
    idxs = [3, 4, 5, 6]
    v, ix = rec.step_batch(["a", "b", "c", "d"], idxs, [2, 50, 2, 7])
    assert [len(r) for r in v] == [len(r) for r in ix] == [2, 50, 2, 7]
    if one_call:
        assert len(taken) == 1 and taken[0] is not None and "packed" not in vars(rec._fast)
    rec2 = SessionRecommender(model)
    v2, ix2 = rec2.step_batch(["a", "b", "c", "d"], idxs, 50)
    for r, k in enumerate([2, 50, 2, 7]):
        assert ix[r] == ix2[r][:k]
        torch.testing.assert_close(torch.tensor(v[r]), torch.tensor(v2[r][:k]), rtol=0, atol=0)
    with pytest.raises(InvalidRequestError, match="values of k"):
        rec.step_batch(["a", "b"], [1, 2], [3])


def click_with_an_update_during_the_probe(rec, model, update, item):
    """A click whose fast-path rebuild's probe meets another update of the model (update(), run
    right after the probe's model.step): the disagreement is put down to the update, not the fast
    path (no "disagrees" warning), and the build is left to the next click."""
    real_step = model.step

    def step_then_update(*a, **kw):
        del model.step  # once
        out = real_step(*a, **kw)
        with torch.no_grad():
            update()  # (the probe then disagrees: not the fast path's fault)
        return out

    model.step = step_then_update
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "disagrees" warning
        rec.click("z", item)
    assert "step" not in vars(model) and not rec.uses_fast_path  # retried at the next click


def fused_adam_step(model, new):
    """One fused Adam step of model towards new's weights (gradients model - new), which raises no
    parameter's version counter: the case the fast path's step count is for. Skips where this
    torch has no fused Adam for CPU tensors, or its step raises the versions."""
    for p, q in zip(model.parameters(), new.parameters()):
        p.grad = p.detach() - q.detach()
    versions = [p._version for p in model.parameters()]
    try:
        opt = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)
    except RuntimeError as e:  # (fused optimisers on the CPU: torch >= 2.4)
        pytest.skip(f"no fused Adam for CPU tensors in this torch: {e}")
    opt.step()
    if [p._version for p in model.parameters()] != versions:  # (what the cases are about)
        pytest.skip("this torch's fused Adam raises the parameters' version counters")


@pytest.mark.parametrize("change", ["load_state_dict", "optimizer", "fused_optimizer", "data_optimizer", "adagradm",
                                    "reassign", "submodule", "data_swap",
                                    "racing_update", "in_training_mode", "training_during_rebuild",
                                    "update_during_probe"])
@pytest.mark.parametrize("embedding", [8, 0])
@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_fast_path_follows_weight_changes(change, embedding, backend, monkeypatch):
    """After the model's weights change (a hot reload through load_state_dict, an optimiser step,
    a fused one's too (torch.optim's fused=True raises no version counter: a review found batches
    scoring with the old Wy after it), one writing through .data, AdagradM's (its sparse update
    writes through NumPy: it bumped no version), a reassigned parameter or submodule, a parameter's memory swapped through .data, an update
    landing while the fast path copies Wy, a reload done in training mode) clicks and batches
    score with the new weights: the fast path held a copy of the output weights (batches of 4+
    rows scored with the old ones) and views of the others (on numba's kernels, NumPy views)."""
    from rnnrec_fast.serving import fastpath

    _need_backend(backend)
    layers = (16,) if embedding else (16, 16)  # (one-hot: its first layer is the model's own)
    model = make_model(n_items=60, layers=layers, embedding=embedding, backend=backend)
    rec = SessionRecommender(model)
    assert rec.uses_fast_path
    ids = model.item_ids
    rec.click_many(["a", "b", "c", "d"], ids[:4], k=5)  # warm: every path used once
    new = make_model(n_items=60, layers=layers, embedding=embedding, seed=1, backend=backend)
    with torch.no_grad():
        if change == "load_state_dict":
            model.load_state_dict(new.state_dict())
        elif change == "optimizer":
            for p, q in zip(model.parameters(), new.parameters()):
                p.grad = p.detach() - q.detach()
            torch.optim.SGD(model.parameters(), lr=1.0).step()
        elif change == "fused_optimizer":
            fused_adam_step(model, new)
        elif change == "data_optimizer":  # an optimiser of one's own, updating through .data
            class DataSGD(torch.optim.Optimizer):
                def __init__(self, params):
                    super().__init__(params, {"lr": 1.0})

                def step(self, closure=None):
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.data.add_(p.grad, alpha=-group["lr"])

            for p, q in zip(model.parameters(), new.parameters()):
                p.grad = p.detach() - q.detach()
            versions = [p._version for p in model.parameters()]
            DataSGD(model.parameters()).step()
            assert [p._version for p in model.parameters()] == versions
        elif change == "adagradm":  # the package's own optimiser: its sparse update writes through NumPy
            from rnnrec_fast.recsys.optim import AdagradM

            for p, q in zip(model.parameters(), new.parameters()):
                g = (p.detach() - q.detach()) * 10.0
                p.grad = g.to_sparse(1) if p.dim() == 2 else g  # (the item tables' gradients are sparse)
            AdagradM(model.parameters(), lr=1.0).step()
        elif change == "reassign":
            model.Wy = torch.nn.Parameter(new.Wy.detach().clone())
            model.By = torch.nn.Parameter(new.By.detach().clone())
            model.rnn.weight_hh_l0 = torch.nn.Parameter(new.rnn.weight_hh_l0.detach().clone())
            if not embedding:
                model.W0 = torch.nn.Parameter(new.W0.detach().clone())
                model.w_hh0 = torch.nn.Parameter(new.w_hh0.detach().clone())
        elif change == "submodule":
            model.rnn = new.rnn
        elif change == "data_swap":
            for p, q in zip(model.parameters(), new.parameters()):
                p.data = q.detach().clone()
        elif change == "racing_update":  # Wy updated after the rebuild's snapshot, before its copies
            model.By.add_(0.01)  # a change that makes the path rebuild
            real = fastpath._pack_scores_weights  # (the copy made as the path is built)

            def pack_then_update(W):
                out = real(W) if real is not None else None
                if not getattr(pack_then_update, "done", False):
                    pack_then_update.done = True
                    model.Wy.copy_(new.Wy)
                return out
            monkeypatch.setattr(fastpath, "_pack_scores_weights", pack_then_update)
            rec.click("z", ids[30])  # rebuilds, racing with the update
            assert pack_then_update.done
        elif change == "training_during_rebuild":  # training mode switched on while the path rebuilds
            model.load_state_dict(new.state_dict())
            real_step = model.step

            def train_then_step(*a, **kw):
                del model.step  # once
                model.train()
                return real_step(*a, **kw) + 1.0  # the probe disagrees

            model.step = train_then_step
            rec.click("z", ids[30])
            assert "step" not in vars(model) and not rec.uses_fast_path
            model.eval()
        elif change == "update_during_probe":  # another update lands while the rebuild's probe runs
            model.load_state_dict(new.state_dict())
            click_with_an_update_during_the_probe(rec, model, lambda: model.rnn.weight_hh_l0.mul_(1.5), ids[30])
        else:
            model.train()
            model.load_state_dict(new.state_dict())
            rec.click("z", ids[30])  # served by the model's own methods meanwhile
            assert not rec.uses_fast_path
            model.eval()
    sids = ["e", "f", "g", "h"]
    got = rec.click_many(sids, ids[10:14], k=5) + [rec.click("i", ids[20], k=5)]
    fresh = SessionRecommender(model)
    want = fresh.click_many(sids, ids[10:14], k=5) + [fresh.click("i", ids[20], k=5)]
    for (gi, gs), (wi, ws) in zip(got, want):
        assert gi == wi
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)
    assert rec.uses_fast_path
    assert (rec._fast.np_layers is not None) == (rnnrec_fast.resolve_backend(backend, "cpu", torch.float32) == "numba")


def _need_backend(backend):
    if backend != "auto" and not backends.available(backend):
        pytest.skip(f"{backend} backend not available")


def _assert_clicks_as_the_models(rec, model):
    """A batch of fresh sessions' clicks and a single click give what the model's own step and
    score give (a recommender without the fast path)."""
    ids = model.item_ids
    sids = ["f", "g", "h", "i"]
    got = rec.click_many(sids, ids[10:14], k=5) + [rec.click("j", ids[20], k=5)]
    ref = SessionRecommender(model, fast=False)
    want = ref.click_many(sids, ids[10:14], k=5) + [ref.click("j", ids[20], k=5)]
    for (gi, gs), (wi, ws) in zip(got, want):
        assert gi == wi
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)


@pytest.mark.parametrize("name", ["W0", "w_hh0", "b_ih0", "b_hh0", "eye0"])
@pytest.mark.parametrize("how", ["reassign", "data_swap", "in_place"])
@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_fast_path_follows_a_one_hot_layers_own_weights(name, how, backend):
    """A one-hot model's first layer is the model's own (W0, w_hh0, b_ih0, b_hh0, not the rnn
    module's): one of them reassigned, its memory swapped through .data or changed in place, and
    clicks follow it (each alone: a change elsewhere would make the path rebuild anyway); its
    identity W_ih too (the buffer eye0, whose product the fast path skips while it is the identity)."""
    _need_backend(backend)
    model = make_model(n_items=60, layers=(16,), embedding=0, backend=backend)
    rec = SessionRecommender(model)
    assert rec.uses_fast_path
    ids = model.item_ids
    rec.click_many(["a", "b", "c", "d"], ids[:4], k=5)
    rec.click("e", ids[5], k=5)
    p = getattr(model, name)
    new = p.detach() * -1.5 + 0.25
    with torch.no_grad():
        if how == "reassign":  # (a buffer as a plain tensor: a Parameter would take the buffer's place)
            setattr(model, name, new if name == "eye0" else torch.nn.Parameter(new))
        elif how == "data_swap":
            p.data = new
        else:
            p.copy_(new)
    _assert_clicks_as_the_models(rec, model)
    assert rec.uses_fast_path
    assert rec._fast.projected0 == (name != "eye0")


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("layers,reset_after", [((16,), True), ((16, 16), False), ((12, 12, 12), True)])
def test_one_hot_first_layer_skips_its_identity_with_the_same_bits(layers, reset_after):
    """A one-hot model's first layer takes the item's W0 row through the identity W_ih (eye0); the
    fast path's C++ calls leave that product out (projected0): click_topk, click_rows_topk and
    infer give the same bits as with it (results and states), eye0 itself is never read (another
    matrix in its place changes nothing, where with the product it changes the results), and an
    input of another width than the gates' is refused."""
    from rnnrec_fast import _C

    if _C_scalar():
        pytest.skip("without the vector kernels the one-call paths decline every call")
    model = make_model(n_items=40, layers=layers, embedding=0, reset_after=reset_after)
    fast = SessionRecommender(model)._fast
    assert fast.projected0
    L, H = len(layers), layers[0]
    w = list(fast.flat)
    other = [torch.randn_like(w[0])] + w[1:]
    slab0 = torch.randn(5, L, H)
    idxs, slots = [3, 9, 7], [0, 4, 1]

    def calls(weights, projected0):
        slab = slab0.clone()
        one = _C.click_topk(fast.emb, 7, slab, 2, weights, reset_after, fast.Wy, fast.by, 10, [], projected0)
        rows = _C.click_rows_topk(fast.emb, idxs, slab, slots, weights, reset_after, fast.Wy, fast.packed_rows,
                                  fast.by, 10, [], projected0)
        with torch.no_grad():
            seq = _C.infer(fast.emb[idxs].unsqueeze(0), slab0[slots].transpose(0, 1).contiguous(), weights, 2,
                           reset_after, L, False, False, 1, projected0)
        return one, rows, slab, seq

    def same(a, b):
        (one_a, rows_a, slab_a, seq_a), (one_b, rows_b, slab_b, seq_b) = a, b
        return (one_a == one_b and all(torch.equal(x, y) for x, y in zip(rows_a + seq_a, rows_b + seq_b))
                and torch.equal(slab_a, slab_b))

    with_product = calls(w, False)
    assert same(calls(w, True), with_product)
    assert same(calls(other, True), with_product)
    assert not same(calls(other, False), with_product)  # (the comparison sees a difference)
    shared = SessionRecommender(make_model(n_items=40, layers=(16,)))._fast  # (I = H: no projection)
    with pytest.raises(ValueError, match="projected0 needs embedding rows of 48"):
        _C.click_topk(shared.emb, 1, torch.zeros(2, 1, 16), 0, shared.flat, True, shared.Wy, shared.by, 3, [], True)
    with pytest.raises(ValueError, match="projected0 needs embedding rows of 48"):
        _C.click_rows_topk(shared.emb, [1], torch.zeros(2, 1, 16), [0], shared.flat, True, shared.Wy,
                           shared.packed_rows, shared.by, 3, [], True)
    with pytest.raises(ValueError, match="projected0 takes one direction and an input of 48"):
        with torch.no_grad():
            _C.infer(shared.emb[:2].unsqueeze(0), torch.zeros(1, 2, 16), shared.flat, 2, True, 1, False, False, 1, True)


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
@pytest.mark.parametrize("layers", [1, 2])
def test_projected_first_layer_of_a_large_call(layers):
    """_C.infer with projected0 over many steps and rows (T22 B256 H48: a workspace over 4 MiB,
    which a GRU inference projects a chunk of steps at a time where _C.chunked_projection(): on
    AVX-512, and in tests/test_simd_paths.py's child run on AVX2): the projected first layer makes
    no projection to chunk and takes every step's workspace, which is sized for it (it was sized by
    the layer's chunk, one step here, and written past its end: ASan); the same bits as with the
    identity's product."""
    import rnnrec_fast
    from rnnrec_fast import _C

    T, B, H = 22, 256, 48
    gen = torch.Generator().manual_seed(layers)
    w = [torch.eye(3 * H), torch.randn(3 * H, H, generator=gen) * 0.2, torch.randn(3 * H, generator=gen),
         torch.randn(3 * H, generator=gen)]
    for _ in range(layers - 1):
        w += [torch.randn(3 * H, H, generator=gen) * 0.2 for _ in range(2)] + [torch.randn(3 * H, generator=gen)
                                                                             for _ in range(2)]
    x, h = torch.randn(T, B, 3 * H, generator=gen), torch.randn(layers, B, H, generator=gen)
    rnnrec_fast.empty_cache()
    with torch.no_grad():
        want = _C.infer(x, h, w, 2, True, layers, False, False, 1, False)
        if _C.chunked_projection():  # (the product of the identity went in chunks: a small workspace)
            assert rnnrec_fast.scratch_bytes() < T * B * 4 * H * 4 / 2
        got = _C.infer(x, h, w, 2, True, layers, False, False, 1, True)
    assert want is not None and got is not None
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("where", ["rnn", "output", "one-hot layer"])
def test_fast_path_declines_parametrized_weights(where):
    """A parametrized weight (torch.nn.utils.parametrize, weight_norm) is computed on each read:
    the fast path would hold one computed copy and never see its source change. It is not used;
    clicks follow an update of the source."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = make_model(n_items=60, layers=(16,), embedding=0 if where == "one-hot layer" else 8)
    owner, name = {"rnn": (model.rnn, "weight_hh_l0"), "output": (model, "Wy")}.get(where, (model, "w_hh0"))
    parametrize.register_parametrization(owner, name, Double())
    rec = SessionRecommender(model)
    assert not rec.uses_fast_path
    ids = model.item_ids
    rec.click_many(["a", "b", "c", "d"], ids[:4], k=5)
    with torch.no_grad():
        owner.parametrizations[name].original.mul_(-0.5)
    got = rec.click_many(["e", "f", "g", "h"], ids[10:14], k=5) + [rec.click("i", ids[20], k=5)]
    ref = SessionRecommender(model, fast=False)
    want = ref.click_many(["e", "f", "g", "h"], ids[10:14], k=5) + [ref.click("i", ids[20], k=5)]
    for (gi, gs), (wi, ws) in zip(got, want):
        assert gi == wi
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)


@pytest.mark.parametrize("fast", [True, False])
def test_equal_scores_rank_by_lower_index_on_every_route(fast):
    """A full tie (every item scores the same): click, click_many and a batch all give the lowest
    indices first, with or without the fast path (one click without it used torch.topk, whose
    order of ties is open, while batches used the extension's selection)."""
    if not backends.available("cpp"):
        pytest.skip("the ordering of ties is the C++ extension's selection")
    model = make_model(n_items=50, layers=(16,), embedding=8)
    with torch.no_grad():
        model.Wy.zero_()
        model.By.zero_()
    rec = SessionRecommender(model, fast=fast)
    want = model.item_ids[:8]
    assert rec.click("s", model.item_ids[3], k=8)[0] == want
    assert rec.click_many(["t"], [model.item_ids[3]], k=8)[0][0] == want
    assert [r[0] for r in rec.click_many(["u", "v"], model.item_ids[3:5], k=8)] == [want, want]


def test_item_ids_match_as_in_the_model():
    """Serving looks item ids up as the model does: int, numpy int or str form."""
    import numpy as np

    model = make_model()
    ids = model.item_ids
    rec, ref = SessionRecommender(model), SessionRecommender(model)
    want = ref.click("s", ids[5], k=3)
    assert rec.click("s", str(ids[5]), k=3) == want
    assert rec.state("s") is not None and rec.session_info("s")["seen"] == [ids[5]]
    assert rec.click("t", np.int64(ids[5]), k=3) == want
    for got_items, got_scores in rec.click_many(["u", "v"], [str(ids[5]), np.int32(ids[5])], k=3):
        assert got_items == want[0]
        torch.testing.assert_close(torch.tensor(got_scores), torch.tensor(want[1]), **TOL)
    assert rec.item_to_index(str(ids[5])) == model.item_map.lookup(str(ids[5])) == 5
    for bad in ("0" + str(ids[5]), "+" + str(ids[5]), " " + str(ids[5]), 10 ** 5000):  # not the same id
        with pytest.raises(UnknownItemError):  # (10 ** 5000: too many digits for str(); was a ValueError)
            rec.click("s", bad)
    torch.manual_seed(0)
    smodel = recsys.GRU4Rec(3, [8], item_ids=["x1", "3", "007"]).eval()
    srec = SessionRecommender(smodel)
    assert srec.click("s", 3, k=3)[0] == [i for i, _ in smodel.recommend([3], k=3)]
    assert srec.item_to_index(3) == 1 and srec.item_to_index("007") == 2
    with pytest.raises(UnknownItemError):
        srec.click("s", 7)


def test_default_k_capped_at_catalogue_and_max_k():
    torch.manual_seed(0)
    small = recsys.GRU4Rec(3, [8], item_ids=["a", "b", "c"]).eval()
    rec = SessionRecommender(small)
    items, scores = rec.click("s", "a")
    assert sorted(items) == ["a", "b", "c"] and len(scores) == 3
    assert [len(r[0]) for r in rec.click_many(["s", "t"], ["b", "c"])] == [3, 3]
    with pytest.raises(InvalidRequestError):  # an explicit k out of range stays an error
        rec.click("s", "a", k=20)
    assert len(SessionRecommender(make_model(), max_k=7).click("s", 1000)[0]) == 7
    assert len(SessionRecommender(make_model()).click("s", 1000)[0]) == 20


@pytest.mark.parametrize("max_k", [0, -5, 2.5, True])
def test_max_k_must_be_positive(max_k):
    with pytest.raises(ValueError, match="max_k"):
        SessionRecommender(make_model(), max_k=max_k)


def test_load_garbage_checkpoint(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_text("hello\n")
    with pytest.raises(recsys.RecsysError, match="not a readable rnnrec_fast checkpoint"):
        SessionRecommender.load(str(p))


# ---------------------------------------------------------------------------------------------- store
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def ttl_recommender():
    """(model, its item ids, a FakeClock at 0, a SessionRecommender with a 10 s TTL on that clock)."""
    model = make_model()
    clock = FakeClock()
    return model, model.item_ids, clock, SessionRecommender(model, ttl=10.0, clock=clock)


def test_lru_eviction_and_memory_bound():
    model = make_model()
    ids = model.item_ids
    rec = SessionRecommender(model, max_sessions=3, initial_capacity=1)
    for s in "abc":
        rec.click(s, ids[0])
    rec.click("a", ids[1])  # a is now most recent; b is the LRU
    rec.click("d", ids[2])
    assert rec.state("b") is None and all(rec.state(s) is not None for s in "acd")
    assert rec.store.evicted_lru == 1
    # an evicted session restarts from the initial state
    rec.click("b", ids[3])
    torch.testing.assert_close(rec.state("b"), replay(model, [ids[3]]), **TOL)
    mem = rec.memory()
    row = model.num_layers * model.hidden_size * 4
    assert mem["sessions"] == 3 and mem["bytes_per_state"] == row
    assert mem["state_bytes"] <= mem["max_state_bytes"] == 3 * row
    # the bookkeeping estimate counts the session ids' own size (a leak review: it left them out)
    rec.click("s" * 256, ids[0])
    assert rec.memory()["bookkeeping_bytes_estimate"] - mem["bookkeeping_bytes_estimate"] > 200  # (one evicted)
    rec.end("s" * 256)
    # batch: sessions of the batch are never evicted by the batch's own new sessions
    rec.click_many(["x", "d", "y"], [ids[4], ids[5], ids[6]])
    assert rec.state("d") is not None and len(rec) == 3


def test_ttl_expiry():
    model, ids, clock, rec = ttl_recommender()
    rec.click("a", ids[0])
    clock.t = 5.0
    rec.click("b", ids[0])
    clock.t = 12.0  # a idle 12 s > ttl; b idle 7 s
    rec.click("b", ids[1])
    assert rec.state("a") is None and rec.state("b") is not None
    clock.t = 30.0
    rec.click("a", ids[2])  # b expired; a restarts fresh
    torch.testing.assert_close(rec.state("a"), replay(model, [ids[2]]), **TOL)
    assert rec.state("b") is None and rec.store.expired_ttl == 2
    clock.t = 100.0
    assert rec.expire() == 1 and len(rec) == 0


def test_ttl_applies_without_clicks():
    """An idle session past the TTL is gone for every question asked without a click: len,
    session_info, state, end (False), memory; counted as expired (it was reported as held,
    readable and deletable until some click purged it)."""
    _, ids, clock, rec = ttl_recommender()
    rec.click("a", ids[0])
    rec.click("b", ids[1])
    clock.t = 11.0
    assert len(rec) == 0 and rec.store.expired_ttl == 2
    for question in (lambda r: r.session_info("a"), lambda r: r.state("a"), lambda r: r.end("a") or None,
                     lambda r: r.memory()["sessions"] or None):
        rec.click("a", ids[0])
        clock.t += 11.0
        assert question(rec) is None


def test_store_create_refuses_a_held_session():
    store = SessionStore(1, 4, max_sessions=2)
    store.create("a", 0.0, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="already held"):
        store.create("a", 1.0, torch.zeros(1, 4))
    store.create("b", 2.0, torch.zeros(1, 4))
    assert list(store._map) == ["a", "b"] and store.evicted_lru == 0


def test_store_growth_and_validation():
    st = SessionStore(2, 4, max_sessions=5, initial_capacity=1)
    for i in range(5):
        e = st.create(i, 0.0, torch.full((2, 4), float(i)))
        assert st.slab[e.slot][0, 0].item() == i
    assert st.capacity == 5 and len(st) == 5
    assert all(st.slab[st.get(i).slot][1, 3].item() == i for i in range(5))
    with pytest.raises(ValueError):
        SessionStore(1, 4, max_sessions=0)
    with pytest.raises(ValueError):
        SessionStore(1, 4, ttl=-1)


# ---------------------------------------------------------------------------------------------- threads
def test_thread_safety_per_session_order():
    model = make_model(n_items=40)
    ids = model.item_ids
    rec = SessionRecommender(model)
    n_threads, per_thread, clicks = 8, 3, 25
    plans = {}
    g = torch.Generator().manual_seed(1)
    for t in range(n_threads):
        for j in range(per_thread):
            plans[f"t{t}-s{j}"] = [ids[i] for i in torch.randint(0, 40, (clicks,), generator=g).tolist()]
    errors = []
    barrier = threading.Barrier(n_threads)

    def worker(t):
        try:
            barrier.wait()
            mine = [s for s in plans if s.startswith(f"t{t}-")]
            for c in range(clicks):
                if c % 3 == 0:  # mix batched and single clicks; also a shared "hot" session
                    rec.click_many(mine, [plans[s][c] for s in mine], k=3)
                else:
                    for s in mine:
                        rec.click(s, plans[s][c], k=3)
                rec.click("hot", ids[t], k=2)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    for s, seq in plans.items():
        torch.testing.assert_close(rec.state(s), replay(model, seq), **TOL)
    assert rec.session_info("hot")["clicks"] == n_threads * clicks


@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_weight_updates_inside_updating_never_mix_with_clicks(backend):
    """A thread switching the model between two weight sets with rec.load_state_dict (updating())
    while others click fresh sessions, one click each, singly and in batches: every top-k is the
    first set's or the second's, never a mix (with model.load_state_dict from that thread about a
    third of the clicks were neither, and the sessions kept states neither set gives; from a
    review). numba: the step's and the score's calls apart, the score outside the lock."""
    _need_backend(backend)
    a = make_model(n_items=300, layers=(32, 32), embedding=16, backend=backend)
    b = make_model(n_items=300, layers=(32, 32), embedding=16, backend=backend, seed=1)
    sets = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    ids = a.item_ids
    answers = [SessionRecommender(m, fast=False) for m in (a, b)]
    want = {i: [tuple(r.click(f"w{i}", ids[i], k=5)[0]) for r in answers] for i in range(0, 300, 7)}
    rec = SessionRecommender(a)
    stop, errors, got = threading.Event(), [], []

    def updater():
        n = 0
        while not stop.is_set():
            rec.load_state_dict(sets[n % 2])
            n += 1

    def clicker(t):
        try:
            for j in range(150):
                i = list(want)[(j + t) % len(want)]
                if j % 3:
                    got.append((i, tuple(rec.click(f"c{t}-{j}", ids[i], k=5)[0])))
                else:
                    out = rec.click_many([f"b{t}-{j}-{q}" for q in range(4)], [ids[i]] * 4, k=5)
                    got.extend((i, tuple(r[0])) for r in out)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=updater)] + [threading.Thread(target=clicker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads[1:]:
        th.join(120)
    stop.set()
    threads[0].join(60)
    assert not errors
    mixed = [(i, top) for i, top in got if top not in want[i]]
    assert not mixed, f"{len(mixed)} of {len(got)} top-k neither weight set's"
    assert len(got) == 2 * (100 + 50 * 4)


def test_updating_waits_for_a_click_scoring_outside_the_lock(monkeypatch):
    """updating() enters only after a click whose scoring runs outside the lock has ended, and a
    click started inside the block waits for its end; the thread inside it may click itself."""
    model = make_model(n_items=50, layers=(16,))
    rec = SessionRecommender(model, fast=False)  # (model.step, then model.score outside the lock)
    ids = model.item_ids
    scoring, release = threading.Event(), threading.Event()
    real_score = model.score

    def slow_score(h):
        scoring.set()
        assert release.wait(30)
        out = real_score(h)
        order.append(("scored",))  # (before the click counts as ended: the update may enter then)
        return out

    monkeypatch.setattr(model, "score", slow_score)
    rec._score = model.score
    order = []
    th = threading.Thread(target=lambda: rec.click("a", ids[1]))
    th.start()
    assert scoring.wait(30)

    def update():
        with rec.updating() as m:
            order.append(("update", m is model))
            rec._score = real_score
            rec.click("mine", ids[2])  # (reentrant)
            order.append(("clicked inside", rec.session_info("mine")["clicks"]))
    up = threading.Thread(target=update)
    up.start()
    up.join(0.3)
    assert up.is_alive() and not any(o[0] == "update" for o in order)  # held back by the click in flight
    release.set()
    th.join(30)
    up.join(30)
    assert [o[0] for o in order] == ["scored", "update", "clicked inside"]
    assert order[1][1] and order[2][1] == 1


@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_updating_rebuilds_whatever_changed(backend):
    """A write through .data inside updating() (no version counter moves) is seen by single clicks
    and batches after the block, and so is a change made before an exception in the block (the
    rebuild ran only where stale() saw a change; from a review)."""
    _need_backend(backend)
    model = make_model(n_items=60, layers=(16,), embedding=8, backend=backend)
    new = make_model(n_items=60, layers=(16,), embedding=8, backend=backend, seed=1)
    rec = SessionRecommender(model)
    ids = model.item_ids
    rec.click_many(["a", "b", "c", "d"], ids[:4], k=5)
    rec.click("e", ids[5], k=5)
    with rec.updating() as m:
        m.Wy.data.copy_(new.Wy.data)
        m.By.data.copy_(new.By.data)
    with pytest.raises(RuntimeError, match="boom"):
        with rec.updating() as m:
            m.rnn.weight_hh_l0.data.copy_(new.rnn.weight_hh_l0.data)
            raise RuntimeError("boom")
    _assert_clicks_as_the_models(rec, model)
    assert rec.uses_fast_path and rec._updates_waiting == 0 and rec._scoring == 0


def test_updating_is_not_starved_by_clicking_threads(monkeypatch):
    """New clicks wait behind an updating() that waits for the clicks in flight (three threads
    clicking through the split path kept the in-flight count above 0: load_state_dict waited up
    to seconds; from a review). Checked without timing: an updater waiting for a click held in its
    scoring, other threads' new clicks do not start until the update has run."""
    model = make_model(n_items=50, layers=(16,))
    rec = SessionRecommender(model, fast=False)
    ids = model.item_ids
    real_score = model.score
    first, release = threading.Event(), threading.Event()
    events = []

    def score(h):
        if not first.is_set():
            first.set()
            assert release.wait(30)
        events.append("scored")
        return real_score(h)

    monkeypatch.setattr(model, "score", score)
    rec._score = model.score
    held = threading.Thread(target=lambda: rec.click("held", ids[1]))
    held.start()
    assert first.wait(30)
    def update():
        with rec.updating() as m:
            m.load_state_dict(m.state_dict())
            events.append("updated")  # (in the block: a late click may run as soon as it ends)
    up = threading.Thread(target=update)
    up.start()
    while not rec._updates_waiting:  # (the updater is waiting for the held click)
        up.join(0.01)
    late = [threading.Thread(target=lambda t=t: rec.click(f"late{t}", ids[2])) for t in range(3)]
    for th in late:
        th.start()
    up.join(0.2)
    assert events == [] and up.is_alive()  # (the late clicks wait too: none has scored)
    release.set()
    for th in [held, up] + late:
        th.join(30)
    assert events[0] == "scored" and events[1] == "updated" and events[2:] == ["scored"] * 3, events


def test_session_info_with_state_is_one_look():
    """session_info(sid, state=True): clicks, seen and the state at one moment (the debug GET took
    them in two calls, and a session expiring between them came back with a null state)."""
    model = make_model(n_items=30, layers=(8, 8))
    now = [0.0]
    rec = SessionRecommender(model, ttl=10.0, clock=lambda: now[0])
    rec.click("s", model.item_ids[3])
    info = rec.session_info("s", state=True)
    assert info["clicks"] == 1 and info["seen"] == [model.item_ids[3]]
    torch.testing.assert_close(info["state"], rec.state("s"), rtol=0, atol=0)
    now[0] = 11.0
    assert rec.session_info("s", state=True) is None


# ---------------------------------------------------------------------------------------------- export
def test_export_round_trip_in_fresh_process(tmp_path):
    from rnnrec_fast.serving.export import custom_ops_in, export_step

    model = make_model(layers=(16,))
    path = str(tmp_path / "step.pt2")
    ep = export_step(model, k=5, path=path)
    assert "rnnrec_fast.recurrence.default" in custom_ops_in(ep)
    with open(path + ".items.json") as f:  # the model's item ids, not its indices
        assert json.load(f) == list(model.item_ids)
    items = torch.tensor([3, 7, 7])
    h = torch.randn(1, 3, 16)
    torch.save({"items": items, "h": h}, str(tmp_path / "in.pt"))
    code = (
        "import sys, torch, rnnrec_fast\n"
        f"ep = torch.export.load({path!r})\n"
        f"d = torch.load({str(tmp_path / 'in.pt')!r})\n"
        "out = ep.module()(d['items'], d['h'])\n"
        "ops = {str(n.target) for n in ep.graph.nodes if n.op == 'call_function'}\n"
        "assert 'rnnrec_fast.recurrence.default' in ops, ops\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    h_new, vals, idx = torch.load(str(tmp_path / "out.pt"))
    exp_h = model.step(items, h)
    torch.testing.assert_close(h_new, exp_h, **TOL)
    exp_v, exp_i = torch.topk(model.score(exp_h[-1]), 5, dim=1)
    torch.testing.assert_close(vals, exp_v, **TOL)
    assert torch.equal(idx, exp_i)
    assert os.path.exists(path + ".items.json")


# ---- from a mutation review of the tests (each of these failed on a mutant the suite let through)

@pytest.mark.parametrize("batched", [False, True])
def test_max_seen_keeps_exactly_the_last_n(batched):
    """A session remembers exactly its last max_seen items (click and click_many alike), and
    exclude_seen excludes those and the click's own item."""
    torch.manual_seed(0)
    model = recsys.GRU4Rec(10, [8], item_ids=list(range(100, 110))).eval()
    rec = SessionRecommender(model, max_seen=2)
    for it in (100, 101, 102):
        if batched:
            rec.click_many(["s", "t"], [it, it])
        else:
            rec.click("s", it)
    assert rec.session_info("s")["seen"] == [101, 102]
    ids, _ = rec.click("s", 103, k=10, exclude_seen=True)
    assert sorted(set(range(100, 110)) - set(ids)) == [102, 103]


def test_ttl_boundary():
    """A session idle for ttl seconds is forgotten; one idle for less is kept."""
    t = [0.0]
    rec = SessionRecommender(recsys.GRU4Rec(5, [4]).eval(), ttl=10.0, clock=lambda: t[0])
    rec.click("a", 1)
    t[0] = 9.999
    assert rec.session_info("a") is not None
    t[0] = 10.0
    assert rec.session_info("a") is None


def test_cpp_topk_ranks_nan_first_and_ties_by_lower_index_as_torch_topk():
    """_C.topk_rows and _C.score_topk (k <= 32: the insertion pass; k > 32: the key sort) put NaN
    above every number, as torch.topk, and equal scores by lower index; an excluded item scores
    -inf. (This and the tests below are from a mutation review: each failed on a mutant the suite
    let through.)"""
    _C = pytest.importorskip("rnnrec_fast._C")

    def order(row):  # NaN first, then by value descending, ties by lower index
        return sorted(range(len(row)), key=lambda j: (0, 0, j) if math.isnan(row[j]) else (1, -row[j], j))

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (3, 80), generator=g).float()  # many ties
    s[0, [5, 40]] = float("nan")
    s[1, 79] = float("nan")
    for k in (1, 3, 10, 40, 80):
        vals, idx = _C.topk_rows(s, k)
        for r in range(3):
            key = order(s[r].tolist())[:k]
            assert idx[r].tolist() == key, (k, r)
            torch.testing.assert_close(vals[r], s[r, key], equal_nan=True)
        # scores = eye @ h + b: the NaNs come from the bias (0 * NaN in the product would spread them)
        h, b = torch.nan_to_num(s[0], nan=0.0), torch.where(s[0].isnan(), s[0], torch.zeros(80))
        _, i = _C.score_topk(h, torch.eye(80), b, k, [40, 7])
        row = s[0].tolist()
        row[40] = row[7] = float("-inf")
        assert i == order(row)[:k], k


def test_fast_path_sees_the_embedding_swapped_through_data():
    """Only E's memory swapped (p.data = ...): the fast path's view of the old E must be dropped."""
    model = make_model(n_items=60, layers=(16,), embedding=8)
    rec = SessionRecommender(model)
    assert rec.uses_fast_path
    ids = model.item_ids
    rec.click("a", ids[0])
    new = make_model(n_items=60, layers=(16,), embedding=8, seed=1)
    with torch.no_grad():
        model.E.data = new.E.detach().clone()
    got = rec.click("b", ids[5], k=5)
    want = SessionRecommender(model).click("b", ids[5], k=5)
    assert got[0] == want[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), **TOL)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("embedding", [6, "shared", 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_applies_to_multilayer_models_on_python_backends(backend, embedding, dtype):
    """Without the C++ all-layers call (a backend other than auto/cpp) a 2-layer model still gets the fast path
    (numba: its kernels called directly on NumPy views of the weights, as the modules' inference
    path does; the op's dispatch and checks took ~85% of a click's step), its steps of one row and
    of a batch equal model.step, and the recommender says which kernels ran."""
    from rnnrec_fast.serving import fastpath

    _need_backend(backend)
    model = make_model(n_items=40, layers=(12, 12), embedding=embedding, backend=backend).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "disagrees" warning
        fast = fastpath.build(model)
    assert fast is not None and fast.infer is None and fast.kernels == backend
    assert (fast.np_layers is not None) == (backend == "numba")
    h = torch.randn(2, 3, 12, dtype=dtype)
    items = torch.tensor([7, 39, 0])
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(fast.step_row(7, h[:, 1]), model.step(items[:1], h[:, 1:2])[:, 0], **tol)
        torch.testing.assert_close(fast.step(items, h), model.step(items, h), **tol)
        torch.testing.assert_close(fast.step(items, h.transpose(1, 2).contiguous().transpose(1, 2)),
                                   model.step(items, h), **tol)  # (a state of other strides)
    rec = SessionRecommender(model)
    assert rec.uses_fast_path and rec.backend == backend
    rnnrec_fast.ops._set_last("")
    rec.click("a", model.item_ids[3])
    assert rnnrec_fast.last_backend() == backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_recommender_names_the_kernels_of_its_dtype(dtype):
    """backend names the kernels the clicks run on for the model's dtype (it said "cpp" wherever
    the fast path was built: also for a bfloat16 model, whose steps the reference backend runs)."""
    model = make_model(n_items=30, layers=(8,)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (bfloat16: the one fallback warning)
        rec = SessionRecommender(model)
        rnnrec_fast.ops._set_last("")
        rec.click("a", model.item_ids[2])
    assert rec.backend == rnnrec_fast.resolve_backend("auto", "cpu", dtype) == rnnrec_fast.last_backend()


def test_build_retries_when_training_mode_ends_during_the_attempt(monkeypatch):
    """A model in training mode when the attempt began, switched to eval while it ran: declined,
    and to be retried."""
    from rnnrec_fast.serving import fastpath

    model = make_model()
    model.train()
    real = fastpath._build

    def build_then_eval(m):
        out = real(m)
        m.eval()
        return out
    monkeypatch.setattr(fastpath, "_build", build_then_eval)
    fast, retry = fastpath.build_or_retry(model)
    assert fast is None and retry


def test_export_takes_a_positive_int_batch():
    """export_step's batch: a positive int or None (2.5 exported batch 2, True batch 1, "3" batch 3,
    0 a program for empty batches only; from a review)."""
    from rnnrec_fast.serving.export import export_step

    model = make_model(n_items=12, layers=(8,))
    for bad in (2.5, True, "3", 0, -1):
        with pytest.raises(ValueError, match="batch must be a positive int or None"):
            export_step(model, k=3, batch=bad)
    ep = export_step(model, k=3, batch=2)
    _, _, top = ep.module()(torch.tensor([1, 2]), torch.zeros(1, 2, 8))
    assert top.shape == (2, 3)


def test_export_takes_k_up_to_the_catalogue():
    """The exported step's k may be the whole catalogue, not more."""
    from rnnrec_fast.serving.export import OneStepScorer

    model = make_model(n_items=12, layers=(8,))
    OneStepScorer(model, k=12)
    with pytest.raises(ValueError):
        OneStepScorer(model, k=13)


# ---- a second mutation review (each of these failed on a mutant the suite let through)

def test_expired_sessions_free_their_slots():
    """Sessions dropped by the TTL give their slots back: a full store whose sessions all expired
    takes as many new sessions again, without evicting any."""
    clock = FakeClock()
    store = SessionStore(1, 4, max_sessions=2, ttl=10.0, clock=clock)
    store.create("a", 0.0, torch.zeros(1, 4))
    store.create("b", 0.0, torch.zeros(1, 4))
    assert store.expire(10.0) == 2 and len(store) == 0
    store.create("c", 10.0, torch.zeros(1, 4))
    store.create("d", 10.0, torch.zeros(1, 4))
    assert list(store._map) == ["c", "d"] and store.evicted_lru == 0
    assert sorted(store.get(s).slot for s in "cd") == [0, 1]


def test_store_clear_frees_every_slot():
    """After clear(), max_sessions new sessions fit without an eviction (no slot leaked)."""
    store = SessionStore(1, 4, max_sessions=3)
    for s in "abc":
        store.create(s, 0.0, torch.zeros(1, 4))
    store.clear()
    assert len(store) == 0 and len(store._free) == store.capacity == 3
    for s in "xyz":
        store.create(s, 1.0, torch.zeros(1, 4))
    assert list(store._map) == ["x", "y", "z"] and store.evicted_lru == 0


def test_bookkeeping_estimate_counts_the_seen_items():
    """A click on a held session adds one remembered item: the estimate grows by its 8 bytes."""
    model = make_model()
    ids = model.item_ids
    rec = SessionRecommender(model, max_seen=4)
    rec.click("a", ids[0])
    before = rec.memory()["bookkeeping_bytes_estimate"]
    rec.click("a", ids[1])
    assert rec.memory()["bookkeeping_bytes_estimate"] - before == 8


def test_negative_max_seen_refused():
    """max_seen=-1 is refused (store and recommender alike)."""
    with pytest.raises(ValueError, match="max_seen"):
        SessionStore(1, 4, max_seen=-1)
    with pytest.raises(ValueError, match="max_seen"):
        SessionRecommender(make_model(), max_seen=-1)


def test_max_k_above_the_catalogue_capped():
    """max_k over the catalogue size is capped at it: the default k gives the whole catalogue and a
    k past it is refused."""
    model = make_model(n_items=5)
    rec = SessionRecommender(model, max_k=100)
    assert rec.max_k == 5 and rec.default_k == 5
    items, scores = rec.click("s", model.item_ids[0])
    assert sorted(items) == sorted(model.item_ids) and len(scores) == 5
    assert [len(r[0]) for r in rec.click_many(["s", "t"], model.item_ids[:2])] == [5, 5]
    with pytest.raises(InvalidRequestError, match=r"\[1, 5\]"):
        rec.click("s", model.item_ids[0], k=6)


def _failing(*args, **kwargs):
    raise RuntimeError("step failed")


@pytest.mark.parametrize("path", ["one call", "fast", "model"])
def test_failed_first_click_holds_no_session(path):
    """A new session's click whose step raises leaves no session held (and an existing session's
    failed click keeps it, unchanged): the fast path's one C++ call for the whole click, its
    separate step (where that call declines), the model's step."""
    model = make_model()
    ids = model.item_ids
    fast = path != "model"
    rec = SessionRecommender(model, fast=fast)
    assert rec.uses_fast_path == fast
    rec.click("old", ids[0])
    h_old = rec.state("old")
    if path == "one call":
        assert rec._fast.click is not None or not backends.available("cpp")
        rec._fast.click_row = _failing
    elif path == "fast":
        rec._fast.click_row = lambda *args: None
        rec._fast.step_row = _failing
    else:
        rec._step = _failing
    for sid in ("new", "old"):
        with pytest.raises(RuntimeError, match="step failed"):
            rec.click(sid, ids[1])
    assert len(rec) == 1 and rec.session_info("new") is None
    assert rec.session_info("old")["clicks"] == 1
    torch.testing.assert_close(rec.state("old"), h_old)


@pytest.mark.parametrize("path", ["one call", "fast", "model"])
def test_failed_batch_holds_none_of_its_new_sessions(path):
    """click_many with new sessions whose step raises leaves none of them held; the batch's held
    session stays, unchanged: the fast path's one C++ call for a batch of distinct sessions (and
    its step for repeated ones), its separate step (where that call declines), the model's step."""
    model = make_model()
    ids = model.item_ids
    fast = path != "model"
    rec = SessionRecommender(model, fast=fast)
    rec.click("old", ids[0])
    h_old = rec.state("old")
    rec._step = _failing  # the batch's step (the fast path's too: _use_fast set it from there)
    if path == "one call":
        assert rec._fast.click_batch is not None or not backends.available("cpp") or _C_scalar()
        rec._fast.click_rows = _failing
    elif path == "fast":
        rec._fast.click_rows = lambda *args: None
    with pytest.raises(RuntimeError, match="step failed"):
        rec.click_many(["n1", "old", "n2", "n1"], [ids[1], ids[2], ids[3], ids[4]])
    with pytest.raises(RuntimeError, match="step failed"):
        rec.click_many(["n3", "n4"], [ids[1], ids[2]])
    assert len(rec) == 1 and all(rec.session_info(s) is None for s in ("n1", "n2", "n3", "n4"))
    assert rec.session_info("old")["clicks"] == 1
    torch.testing.assert_close(rec.state("old"), h_old)


@pytest.mark.parametrize("batched", [False, True])
def test_click_past_the_ttl_starts_a_new_session(batched):
    """A click after the TTL (nothing asked in between) starts the session afresh: one click, the
    initial state stepped once."""
    model, ids, clock, rec = ttl_recommender()
    rec.click("a", ids[0])
    clock.t = 10.5
    if batched:
        rec.click_many(["a", "b"], [ids[1], ids[2]])
    else:
        rec.click("a", ids[1])
    assert rec.session_info("a") == {"clicks": 1, "seen": [ids[1]]}
    torch.testing.assert_close(rec.state("a"), replay(model, [ids[1]]), **TOL)
    assert rec.store.expired_ttl == 1


def test_fast_path_build_probes_step_row(monkeypatch):
    """A fast path whose single-row step disagrees with model.step is declined at build (with the
    'disagrees' warning)."""
    from rnnrec_fast.serving import fastpath

    model = make_model(layers=(16, 16), embedding=8)
    assert fastpath.build(model) is not None
    real = fastpath.FastGRU4Rec.step_row
    monkeypatch.setattr(fastpath.FastGRU4Rec, "step_row", lambda self, idx, row: real(self, idx, row) + 1e-3)
    with pytest.warns(RuntimeWarning, match="disagree"):
        assert fastpath.build(model) is None


def test_fast_path_disagreeing_score_warns(monkeypatch):
    """A fast path whose scores disagree with model.score is declined with a RuntimeWarning saying so."""
    from rnnrec_fast.serving import fastpath

    model = make_model()
    real = fastpath.FastGRU4Rec.score
    monkeypatch.setattr(fastpath.FastGRU4Rec, "score", lambda self, h: real(self, h) + 1e-2)
    with pytest.warns(RuntimeWarning, match="disagree"):
        assert fastpath.build(model) is None
    with pytest.warns(RuntimeWarning, match="disagree"):
        rec = SessionRecommender(model)
    assert not rec.uses_fast_path


@pytest.mark.skipif(not backends.available("cpp"), reason="the C++ extension is not built")
def test_fast_path_disagreeing_batch_topk_warns(monkeypatch):
    """The build's probe checks the batch's scores from the packed copy of the output weights
    (score_topk_rows) too: a copy that disagrees with model.score declines the fast path."""
    from rnnrec_fast.serving import fastpath

    if _C_scalar():
        pytest.skip("without the vector kernels there is no packed copy")
    model = make_model()
    monkeypatch.setattr(fastpath, "_pack_scores_weights", lambda W: _real_pack(W * 1.01))
    with pytest.warns(RuntimeWarning, match="disagree"):
        assert fastpath.build(model) is None


def _real_pack(W):
    from rnnrec_fast import _C

    return _C.pack_scores_weights(W)


# ---- an adversarial review (each failed before its fix)

def test_exclude_seen_must_be_a_bool():
    """exclude_seen takes True or False: its truth value took "no", None or a list of flags as an
    answer ("no" excluded the seen items), silently; it is a TypeError now, before any state change."""
    import numpy as np

    model = make_model()
    ids = model.item_ids
    rec = SessionRecommender(model)
    for bad in ("no", None, 1, [True, False]):
        with pytest.raises(TypeError, match="exclude_seen"):
            rec.click("s", ids[1], k=5, exclude_seen=bad)
        with pytest.raises(TypeError, match="exclude_seen"):
            rec.click_many(["s", "t"], [ids[1], ids[2]], k=5, exclude_seen=bad)
    assert len(rec) == 0
    got = rec.click("s", ids[1], k=50, exclude_seen=np.bool_(True))
    assert ids[1] not in got[0] and len(got[0]) == 49


def test_recommender_options_and_numpy_k_checked():
    """max_batch must be a positive int (0, -1 and 2.5 were taken: -1 let single clicks through and
    refused every batch); a bool is no TTL or max_seen (ttl=True was a 1 s TTL); k may be a NumPy
    integer, as item ids and max_k may (it was a TypeError), and so may the store's max_sessions and
    max_seen (refused before, where max_batch and max_k took them)."""
    import numpy as np

    model = make_model()
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="max_batch"):
            SessionRecommender(model, max_batch=bad)
    with pytest.raises(ValueError, match="ttl"):
        SessionRecommender(model, ttl=True)
    with pytest.raises(ValueError, match="max_seen"):
        SessionRecommender(model, max_seen=True)
    rec = SessionRecommender(model, max_batch=np.int64(8))
    assert rec.max_batch == 8
    # the store's sizes take NumPy integers too (they were refused there, unlike max_batch and max_k)
    other = SessionRecommender(model, max_sessions=np.int64(5), max_seen=np.int32(2))
    assert type(other.store.max_sessions) is int and other.store.max_sessions == 5
    assert type(other.store.max_seen) is int and other.store.max_seen == 2
    for bad in (0, True, 2.5, np.float64(3.0)):
        with pytest.raises(ValueError, match="max_sessions"):
            SessionRecommender(model, max_sessions=bad)
    want = SessionRecommender(model).click("s", model.item_ids[3], k=4)
    assert rec.click("s", model.item_ids[3], k=np.int64(4)) == want
    assert [r[0] for r in rec.click_many(["a", "b"], model.item_ids[:2], k=np.int32(3))] == \
        [r[0] for r in SessionRecommender(model).click_many(["a", "b"], model.item_ids[:2], k=3)]


def test_export_k_must_be_an_int():
    """The exported step's k is an int: 2.5 was exported as k=2, True as k=1."""
    from rnnrec_fast.serving.export import OneStepScorer

    model = make_model(n_items=12, layers=(8,))
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match="k must be an int"):
            OneStepScorer(model, k=bad)


# ---- a review of 2026-12-05 (each failed before its fix)

def test_export_step_keeps_the_models_mode():
    """export_step traced the model in eval mode and left it there: a snapshot exported between
    training epochs turned dropout off for the rest of the training, without a word. It is traced
    in eval mode still (the same outputs as the model in eval mode) and the mode comes back."""
    from rnnrec_fast.serving.export import export_step

    torch.manual_seed(0)
    model = recsys.GRU4Rec(20, [8], dropout_hidden=0.5)
    model.train()
    ep = export_step(model, k=3)
    assert model.training
    items, h = torch.tensor([1, 5]), model.init_state(2)
    model.eval()
    h_new, vals, idx = ep.module()(items, h)
    want = model.step(items, h)
    torch.testing.assert_close(h_new, want)
    torch.testing.assert_close(vals, torch.topk(model.score(want[-1]), 3).values)
    export_step(model, k=3)
    assert not model.training


def test_huge_k_is_an_invalid_request():
    """k of more than 4,300 digits raised Python's ValueError while its message was formed (the int
    cannot be written out), not the InvalidRequestError a caller catching ServingError expects."""
    from rnnrec_fast.serving.recommender import InvalidRequestError

    model = make_model()
    rec = SessionRecommender(model)
    for k in (10 ** 5000, -(10 ** 5000), 10 ** 30):
        with pytest.raises(InvalidRequestError, match="k must be in"):
            rec.click("s", model.item_ids[0], k=k)
    assert rec.session_info("s") is None


def test_server_url_of_an_ipv6_host_is_bracketed():
    """The URL of an IPv6 host was written http://::1:PORT; RFC 3986 brackets it."""
    from rnnrec_fast.serving.server import url

    assert url("::1", 8080) == "http://[::1]:8080"
    assert url("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert url("localhost", 1) == "http://localhost:1"


def test_session_ids_are_kept_as_given_and_item_ids_match_in_either_form():
    """As the README says: 42 and "42" are two sessions (a str or an int, kept as given), while an
    item id matches in its int or its text form; other session id types are refused."""
    rec = SessionRecommender(make_model())  # (item ids 1000, 1007, ...: ints)
    a = rec.click(42, 1007, k=5)
    b = rec.click("42", "1007", k=5)
    assert a == b  # (the same item, each session's first click)
    assert rec.session_info(42)["clicks"] == rec.session_info("42")["clicks"] == 1
    rec.end(42)
    assert rec.session_info(42) is None and rec.session_info("42")["clicks"] == 1
    for bad in (4.2, None, True, ("s",)):
        with pytest.raises(TypeError, match="session_id must be a str or an int"):
            rec.click(bad, 1007)


def test_initial_capacity_must_be_a_positive_int():
    """initial_capacity -5 or 2.5 was taken as 1 or 2, silently (a review); 1 and more are fine."""
    model = make_model()
    for bad in (-5, 0, 2.5, "8", True):
        with pytest.raises(ValueError, match="initial_capacity must be a positive int"):
            SessionRecommender(model, initial_capacity=bad)
    assert SessionRecommender(model, initial_capacity=3).store.capacity == 3


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_a_model_path_that_is_not_a_regular_file_says_so():
    """--model /dev/null said 'model file not found' (a review)."""
    with pytest.raises(recsys.RecsysError, match="/dev/null is not a regular file"):
        SessionRecommender.load("/dev/null")


# ---- a third mutation review (each of these failed on a mutant the suite let through)

def test_a_batch_of_exactly_max_batch_clicks_is_served():
    """max_batch is the largest batch accepted, not the first refused: a batch of exactly max_batch
    clicks is served (one click past it is refused)."""
    model = make_model()
    ids = model.item_ids
    rec = SessionRecommender(model, max_batch=8)
    out = rec.click_many([f"s{n}" for n in range(8)], ids[:8], k=3)
    assert [len(items) for items, _ in out] == [3] * 8 and len(rec) == 8
    with pytest.raises(InvalidRequestError, match="max_batch=8"):
        rec.click_many(["x"] * 9, [ids[0]] * 9)


@pytest.mark.parametrize("batched", [False, True])
def test_a_click_keeps_its_session_alive_past_the_first_clicks_ttl(batched):
    """The idle TTL counts from a session's last click, not its first: a session clicked at 0 and 8
    (alone, or in a batch) is held at 15 with both clicks, and forgotten 10 s after its last click."""
    model, ids, clock, rec = ttl_recommender()
    rec.click("a", ids[0])
    clock.t = 8.0
    if batched:
        rec.click_many(["a", "b"], [ids[1], ids[2]])  # (a held session touched by a batch)
    else:
        rec.click("a", ids[1])
    clock.t = 15.0
    assert rec.session_info("a") == {"clicks": 2, "seen": [ids[0], ids[1]]}
    assert rec.store.expired_ttl == 0
    clock.t = 18.0
    assert rec.session_info("a") is None


def test_batch_exclude_seen_without_the_fast_path():
    """click_many with exclude_seen on the model's own step and score (fast=False: the batch's
    scores tensor gets the seen items at -inf) excludes each session's seen items, the click's
    own included, as single clicks do."""
    model = make_model(n_items=8)
    ids = model.item_ids
    batch_rec = SessionRecommender(model, fast=False)
    one_rec = SessionRecommender(model, fast=False)
    assert not batch_rec.uses_fast_path
    for rec in (batch_rec, one_rec):
        rec.click("s", ids[0])
    got = batch_rec.click_many(["s", "t", "s"], [ids[1], ids[2], ids[3]], k=8, exclude_seen=True)
    want = [one_rec.click(s, i, k=8, exclude_seen=True) for s, i in (("s", ids[1]), ("t", ids[2]), ("s", ids[3]))]
    assert set(got[0][0]) == set(ids) - {ids[0], ids[1]}
    assert set(got[1][0]) == set(ids) - {ids[2]}
    assert set(got[2][0]) == set(ids) - {ids[0], ids[1], ids[3]}
    for (gi, gs), (wi, ws) in zip(got, want):
        assert gi == wi and all(v != float("-inf") for v in gs)
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)


def test_ttl_of_zero_is_refused():
    """ttl must be a positive number of seconds or None: 0 is refused (it forgot every session at
    once) as -1 is."""
    for bad in (0, 0.0, -1):
        with pytest.raises(ValueError, match="ttl must be a positive number"):
            SessionStore(1, 4, ttl=bad)
        with pytest.raises(ValueError, match="ttl must be a positive number"):
            SessionRecommender(make_model(), ttl=bad)
    assert SessionStore(1, 4, ttl=1e-9).ttl == 1e-9


def test_memory_bound_is_at_max_sessions_not_the_slab_allocated():
    """memory()'s max_state_bytes is the bound at max_sessions rows, whatever the slab holds now
    (the slab grows by doubling: 2 rows allocated, 10 allowed)."""
    model = make_model()
    rec = SessionRecommender(model, max_sessions=10, initial_capacity=2)
    rec.click("a", model.item_ids[0])
    mem = rec.memory()
    row = model.num_layers * model.hidden_size * 4
    assert mem["capacity_rows"] == 2 and mem["state_bytes"] == 2 * row
    assert mem["max_state_bytes"] == 10 * row


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not available")
def test_fast_path_scores_four_rows_with_onednn():
    """score() takes oneDNN's GEMM from 4 rows on (its packed copy of Wy made then), the few-rows
    product below: 3 rows leave no packed copy, 4 make it; both as model.score."""
    from rnnrec_fast.serving import fastpath

    model = make_model(n_items=300, layers=(24,))
    fast = fastpath.build(model)
    assert fast is not None
    h = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast.score(h[:3]), model.score(h[:3]), **TOL)
        assert "packed" not in vars(fast)
        torch.testing.assert_close(fast.score(h), model.score(h), **TOL)
    assert "packed" in vars(fast) and fast.packed is not None


# ---- a fourth mutation review (each of these failed on a mutant the suite let through)

def test_fused_optimizer_step_seen_after_another_fast_path_is_built():
    """An optimiser step that raises no version (fused Adam) is counted once per step however many
    fast paths watch the same weights: a second recommender built on the model after the step
    does not reset the count, and the first one's batches score with the new Wy (a count reset
    to 0 at each build made the first path's snapshot match again: batches kept the old Wy's
    packed copy)."""
    model = make_model(n_items=60, layers=(16,), embedding=8)
    rec = SessionRecommender(model)
    ids = model.item_ids
    rec.click_many(["a", "b", "c", "d"], ids[:4], k=5)
    with torch.no_grad():
        fused_adam_step(model, make_model(n_items=60, layers=(16,), embedding=8, seed=1))
    other = SessionRecommender(model)  # (builds a fast path over the same Wy and By)
    assert other.uses_fast_path
    sids = ["e", "f", "g", "h"]
    got = rec.click_many(sids, ids[10:14], k=5)
    want = SessionRecommender(model, fast=False).click_many(sids, ids[10:14], k=5)
    for (gi, gs), (wi, ws) in zip(got, want):
        assert gi == wi
        torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)


def test_one_thread_few_rows_product_up_to_its_byte_limit(monkeypatch):
    """On one thread the extension's few-rows product and one-call top-k serve an output matrix of
    up to _ROWS_MAX_BYTES_1T bytes, that size included; one byte less of limit and a click's top-k
    is torch's, the one-call click declining without a change (then MKL's GEMV scores)."""
    from rnnrec_fast import _C
    from rnnrec_fast.serving import fastpath

    if not backends.available("cpp"):
        pytest.skip("the few-rows product is the C++ extension's")
    model = make_model(n_items=300, layers=(24,))
    size = model.Wy.numel() * model.Wy.element_size()
    with num_threads(1):
        h = torch.randn(24)
        for limit, served in ((size, True), (size - 1, False)):
            monkeypatch.setattr(fastpath, "_ROWS_MAX_BYTES_1T", limit)
            fast = fastpath.build(model)
            slab = torch.randn(2, 1, 24)
            before = slab.clone()
            with torch.no_grad():
                assert (fast.topk_row(h, 5, []) is not None) == served, limit
                # (the one-call click declines on the portable scalar path, RNNREC_FAST_NO_SIMD, too)
                clicked = served and _C.simd_level() != "scalar"
                assert (fast.click_row(3, slab, 1, 5, []) is not None) == clicked, limit
            assert torch.equal(slab, before) != clicked  # (declined: the state left as it was)


def test_one_step_scorer_scores_the_top_layer():
    """The exported step's module on a model of two GRU layers: the new state, and the top-k of
    the scores of the top layer's state (h_new[-1]), as model.step and model.score give them."""
    from rnnrec_fast.serving.export import OneStepScorer

    model = make_model(n_items=30, layers=(8, 8))
    torch.manual_seed(3)
    items, h = torch.tensor([3, 7, 11]), torch.randn(2, 3, 8)
    with torch.no_grad():
        h_new, vals, idx = OneStepScorer(model, k=4)(items, h)
        exp_h = model.step(items, h)
        exp_v, exp_i = torch.topk(model.score(exp_h[-1]), 4, dim=1)
    torch.testing.assert_close(h_new, exp_h, rtol=0, atol=0)
    torch.testing.assert_close(vals, exp_v, rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, exp_i)


def test_export_k_of_zero_refused():
    """The exported step's k is at least 1: k=0 is refused as k past the catalogue is."""
    from rnnrec_fast.serving.export import OneStepScorer, export_step

    model = make_model(n_items=12, layers=(8,))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 12\]"):
            OneStepScorer(model, k=bad)
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 12\]"):
            export_step(model, k=bad)


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_a_cpp_backend_model_takes_the_one_call_paths(backend):
    """A model that names the extension's kernels (backend='cpp') gets the fast path's C++ calls as
    one on 'auto' does: all layers in one inference call, the one-call click and batch (it stepped
    through the op a layer at a time, with the separate step, copy back and top-k)."""
    from rnnrec_fast import _C
    from rnnrec_fast.serving import fastpath

    if not backends.available("cpp"):
        pytest.skip("the C++ extension is not built")
    fast = fastpath.build(make_model(n_items=40, layers=(16, 16), backend=backend))
    assert fast is not None and fast.kernels == "cpp"
    assert fast.infer is not None and fast.click is not None
    # (the batch's one call reads Wy packed, which the portable scalar path, RNNREC_FAST_NO_SIMD, has not)
    assert (fast.click_batch is not None) == (fast.packed_rows is not None)
    assert (fast.packed_rows is None) == (_C.simd_level() == "scalar")


def test_clicks_score_a_non_contiguous_output_matrix_as_the_model():
    """An output matrix Wy held transposed in memory (a column-major Parameter, say from a
    checkpoint's transpose): single clicks, on one or two threads, and batches score as the model's
    own methods (the extension's few-rows product and one-call top-k read a row-major Wy)."""
    model = make_model(n_items=60, layers=(16,), embedding=8)
    model.Wy = torch.nn.Parameter(model.Wy.detach().t().contiguous().t())
    assert not model.Wy.is_contiguous()
    for threads in (1, 2):
        with num_threads(threads):
            rec = SessionRecommender(model)
            ids = model.item_ids
            sids = ["f", "g", "h", "i"]
            got = [rec.click("a", ids[3], k=5), rec.click("a", ids[7], k=5)] + rec.click_many(sids, ids[10:14], k=5)
            ref = SessionRecommender(model, fast=False)
            want = [ref.click("a", ids[3], k=5), ref.click("a", ids[7], k=5)] + ref.click_many(sids, ids[10:14], k=5)
            for (gi, gs), (wi, ws) in zip(got, want):
                assert gi == wi
                torch.testing.assert_close(torch.tensor(gs), torch.tensor(ws), **TOL)


def test_store_slab_grows_by_doubling_up_to_max_sessions():
    """The slab doubles when full (1, 2, 4, 8 rows), never past max_sessions (10, not 16), and each
    new row is a free slot: ten sessions fit with no eviction."""
    store = SessionStore(1, 4, max_sessions=10, initial_capacity=1)
    caps = []
    for i in range(10):
        store.create(i, 0.0, torch.full((1, 4), float(i)))
        caps.append(store.capacity)
    assert caps == [1, 2, 4, 4, 8, 8, 8, 8, 10, 10]
    assert store.evicted_lru == 0 and store.memory()["state_bytes"] == 10 * 4 * 4
    assert [store.slab[store.get(i).slot][0, 0].item() for i in range(10)] == list(range(10))


def test_store_bookkeeping_bound_counts_the_seen_items():
    """max_bookkeeping_bytes counts 8 bytes for each of max_seen remembered items of every session."""
    small = SessionStore(1, 4, max_sessions=10, max_seen=0).memory()["max_bookkeeping_bytes"]
    large = SessionStore(1, 4, max_sessions=10, max_seen=5).memory()["max_bookkeeping_bytes"]
    assert large - small == 10 * 5 * 8


@pytest.mark.parametrize("change", ["scaled", "permuted", "off_diagonal"])
def test_one_hot_layer_with_an_eye0_near_the_identity_is_not_skipped(change):
    """An eye0 that is not the identity but near it (twice the identity, its rows permuted, or the
    identity plus one nonzero off its diagonal) is multiplied by: the fast path's clicks are the
    model's (a check of the nonzero count alone took the first two for the identity, one of the
    diagonal and of at least as many nonzeros the third, and skipped the product)."""
    model = make_model(n_items=40, layers=(16,), embedding=0)
    with torch.no_grad():
        if change == "scaled":
            model.eye0.mul_(2.0)
        elif change == "permuted":
            model.eye0.copy_(model.eye0.roll(1, dims=0))
        else:
            model.eye0[0, 1] = 0.5
    rec = SessionRecommender(model)
    assert rec.uses_fast_path and not rec._fast.projected0
    _assert_clicks_as_the_models(rec, model)


def test_fast_path_declines_an_output_matrix_held_as_a_plain_tensor():
    """A model whose Wy is a plain tensor attribute, not a registered parameter (as WeightDrop
    holds its weights), is served by its own methods: a later reassignment of that attribute,
    which the fast path's watch of the registered parameters would not see, is followed."""
    model = make_model(n_items=60, layers=(16,), embedding=8)
    w = model.Wy.detach().clone()
    del model.Wy
    model.Wy = w
    assert "Wy" not in model._parameters
    rec = SessionRecommender(model)
    assert not rec.uses_fast_path
    rec.click_many(["a", "b", "c", "d"], model.item_ids[:4], k=5)
    model.Wy = torch.randn_like(w)
    _assert_clicks_as_the_models(rec, model)


def test_eye0_changed_during_the_probe_retries_without_a_warning():
    """A one-hot model's eye0 (a buffer, not a parameter; here not the identity, so the fast path
    reads it) changed in place while a rebuild's probe runs: the disagreement is put down to the
    update, not the fast path (no warning), and the build is tried again at the next click, whose
    answers are the model's."""
    model = make_model(n_items=40, layers=(16,), embedding=0)
    with torch.no_grad():
        model.eye0.mul_(2.0)
    rec = SessionRecommender(model)
    assert rec.uses_fast_path
    ids = model.item_ids
    rec.click_many(["a", "b", "c", "d"], ids[:4], k=5)
    with torch.no_grad():
        model.By.add_(0.01)  # (a change that makes the path rebuild at the next click)
    click_with_an_update_during_the_probe(rec, model, lambda: model.eye0.mul_(1.5), ids[30])
    _assert_clicks_as_the_models(rec, model)
    assert rec.uses_fast_path and not rec._fast.projected0

"""Bounded HTTP load test: replays real YOOCHOOSE test sessions against session-recommender servers.

Loopback only (127.0.0.1), fixed duration, bounded request count. Each connection replays whole
sessions, one click at a time (the next click is sent when the previous answer arrived, as a user
would), so a session's clicks are never in flight together. Afterwards every session's
acknowledged clicks are replayed offline with ``model.step`` and checked against the service:
the top-k of the last answered click must match the offline top-k (same scores within 1e-3, items
equal up to ties), and when the server exposes the debug path (ours with --debug) the session's
click count and state vector must match too. Nothing lost, nothing reordered.

    # start both servers itself (ephemeral ports), same load for each, one table:
    python benchmarks/loadtest.py --model model.pt --servers ours,baseline --duration 5 --rate 2500
    # or against a running server:
    python benchmarks/loadtest.py --model model.pt --url http://127.0.0.1:8000 --duration 5

--rate 0 runs closed-loop (every connection sends as fast as answers come back): the saturation
throughput. Latency is measured per request from just before the send to the full answer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_DURATION = 120.0
MAX_REQUESTS = 1_000_000


def data_dir():
    return os.environ.get("RNNREC_FAST_DATA") or os.path.join(ROOT, "..", "shared", "data")


def load_sessions(path, item_index, limit=None):
    """Sessions of a YOOCHOOSE TSV (SessionId ItemId Time) as [(session id, [item ids])], in order
    of their first click; clicks sorted by time (stable), items outside the catalogue dropped."""
    rows = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        si, ii, ti = header.index("SessionId"), header.index("ItemId"), header.index("Time")
        for n, line in enumerate(f):
            p = line.rstrip("\n").split("\t")
            rows.append((p[si], int(p[ii]), float(p[ti]), n))
    sess = {}
    first = {}
    for sid, item, t, n in rows:
        sess.setdefault(sid, []).append((t, n, item))
        first.setdefault(sid, (t, n))
    out = []
    for sid in sorted(sess, key=lambda s: first[s]):
        clicks = [it for _, _, it in sorted(sess[sid]) if it in item_index]
        if clicks:
            out.append((sid, clicks))
    return out[:limit] if limit else out


def check_loopback(url):
    u = urlsplit(url)
    if u.scheme != "http" or u.hostname != "127.0.0.1" or not u.port:
        raise SystemExit(f"refusing {url!r}: the load test only targets http://127.0.0.1:PORT")
    return u.hostname, u.port


# ---------------------------------------------------------------------------------------------- client
class Conn:
    """One keep-alive HTTP/1.1 connection (just enough HTTP for this service's answers)."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method, path, body=b""):
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        line = await self.reader.readuntil(b"\r\n\r\n")
        status = int(line[9:12])
        n = 0
        close = False
        for h in line.split(b"\r\n")[1:]:
            low = h.lower()
            if low.startswith(b"content-length:"):
                n = int(h[15:])
            elif low.startswith(b"connection:") and b"close" in low:
                close = True
        data = await self.reader.readexactly(n) if n else b""
        if close:
            await self.close()
            await self.open()
        return status, data

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass


async def run_load(host, port, sessions, *, duration, max_requests, concurrency, rate, k, tag):
    """Returns (latencies [s], per-status counts, acked {sid: [items]}, last {sid: body}, elapsed)."""
    lat = []
    statuses = {}
    acked = {}
    last = {}
    errors = []
    state = {"next": 0, "sent": 0}
    nsess = len(sessions)
    t_start = time.perf_counter()
    t_end = t_start + duration
    interval = concurrency / rate if rate > 0 else 0.0

    def next_session():
        i = state["next"]
        state["next"] += 1
        sid, clicks = sessions[i % nsess]
        rnd = i // nsess
        return (f"{tag}-{sid}" if rnd == 0 else f"{tag}-{sid}-r{rnd}"), clicks

    async def worker(w):
        conn = Conn(host, port)
        await conn.open()
        nxt = t_start + w * interval / concurrency if interval else t_start
        try:
            while True:
                sid, clicks = next_session()
                path = f"/v1/sessions/{sid}/clicks"
                for item in clicks:
                    if interval:
                        now = time.perf_counter()
                        if nxt > now:
                            await asyncio.sleep(nxt - now)
                        nxt += interval
                    if time.perf_counter() >= t_end or state["sent"] >= max_requests:
                        return
                    state["sent"] += 1
                    body = b'{"item_id":%d,"k":%d}' % (item, k)
                    t0 = time.perf_counter()
                    try:
                        status, data = await conn.request("POST", path, body)
                    except (OSError, asyncio.IncompleteReadError) as e:
                        statuses["conn_error"] = statuses.get("conn_error", 0) + 1
                        errors.append(repr(e))
                        await conn.close()
                        await conn.open()
                        break  # this session's order can no longer be known; next session
                    lat.append(time.perf_counter() - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        acked.setdefault(sid, []).append(item)
                        last[sid] = data
                    else:
                        if len(errors) < 5:
                            errors.append(data[:200].decode(errors="replace"))
                        break
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    return lat, statuses, acked, last, elapsed, errors


async def fetch(host, port, path):
    c = Conn(host, port)
    await c.open()
    try:
        return await c.request("GET", path)
    finally:
        await c.close()


async def fetch_many(host, port, paths, concurrency=4):
    out = {}
    it = iter(paths)

    async def w():
        c = Conn(host, port)
        await c.open()
        try:
            for p in it:
                out[p] = await c.request("GET", p)
        finally:
            await c.close()

    await asyncio.gather(*(w() for _ in range(concurrency)))
    return out


# ---------------------------------------------------------------------------------------------- checks
def offline_replay(model, acked, batch=512):
    """Final states (L, S, H) of each session's acknowledged clicks, replayed with model.step in
    session-parallel batches (rows advance only while they have clicks)."""
    import torch

    sids = list(acked)
    idx = model.item_index
    L, H = model.num_layers, model.hidden_size
    finals = torch.empty(L, len(sids), H)
    for s0 in range(0, len(sids), batch):
        chunk = sids[s0:s0 + batch]
        seqs = [[idx[i] for i in acked[s]] for s in chunk]
        h = model.init_state(len(chunk))
        for t in range(max(len(q) for q in seqs)):
            rows = [r for r, q in enumerate(seqs) if t < len(q)]
            rt = torch.tensor(rows)
            items = torch.tensor([seqs[r][t] for r in rows])
            hn = model.step(items, h.index_select(1, rt))
            h.index_copy_(1, rt, hn)
        finals[:, s0:s0 + len(chunk)] = h
    return sids, finals


def check_states(model, acked, last, k, debug_states=None, tol=1e-3):
    """Compares the service's answers with the offline replay. Returns a dict of counts.

    Tolerance: batched and single-row kernels sum in different orders, and a GRU can amplify
    those float32 rounding differences along a session (measured: up to ~2e-5 after 15 clicks
    between batch sizes 1 and 7); a lost, extra or reordered click changes states and scores by
    orders of magnitude more than ``tol``."""
    import torch

    sids, finals = offline_replay(model, acked)
    with torch.no_grad():
        scores = model.score(finals[-1])
        top_v, _ = torch.topk(scores, k, dim=1)
    idx = model.item_index
    bad_topk = bad_state = bad_clicks = 0
    examples = []
    for r, sid in enumerate(sids):
        ans = json.loads(last[sid])
        items, vals = ans["items"], ans["scores"]
        ok = len(items) == k and all(abs(a - b) <= tol * (1 + abs(b)) for a, b in zip(vals, top_v[r].tolist()))
        if ok:  # each returned item must really have the returned score (items equal up to ties)
            s_items = scores[r, [idx[i] for i in items]].tolist()
            ok = all(abs(a - b) <= tol * (1 + abs(b)) for a, b in zip(vals, s_items))
            ok = ok and len(set(items)) == len(items)
        if not ok:
            bad_topk += 1
            if len(examples) < 3:
                examples.append(f"top-k of {sid}")
        if debug_states is not None:
            d = debug_states.get(sid)
            if d is None or d["clicks"] != len(acked[sid]):
                bad_clicks += 1
                if len(examples) < 3:
                    examples.append(f"clicks of {sid}: {None if d is None else d['clicks']} vs {len(acked[sid])}")
            elif not torch.allclose(torch.tensor(d["state"]), finals[:, r], atol=tol, rtol=tol):
                bad_state += 1
                if len(examples) < 3:
                    examples.append(f"state of {sid}")
    # negative control: the same check must flag a replay with the last two (different) clicks
    # swapped, i.e. it has the power to see reordering
    swapped = {s: acked[s][:-2] + [acked[s][-1], acked[s][-2]] for s in sids
               if len(acked[s]) >= 2 and acked[s][-1] != acked[s][-2]}
    swapped = dict(list(swapped.items())[:500])
    flagged = 0
    if swapped:
        s_sids, s_finals = offline_replay(model, swapped)
        with torch.no_grad():
            s_top = torch.topk(model.score(s_finals[-1]), k, dim=1).values
        for r, sid in enumerate(s_sids):
            vals = json.loads(last[sid])["scores"]
            same = all(abs(a - b) <= tol * (1 + abs(b)) for a, b in zip(vals, s_top[r].tolist()))
            if debug_states is not None and sid in debug_states:
                same = same and torch.allclose(torch.tensor(debug_states[sid]["state"]), s_finals[:, r],
                                               atol=tol, rtol=tol)
            flagged += not same
    return {"sessions_checked": len(sids), "bad_topk": bad_topk, "bad_state": bad_state, "bad_clicks": bad_clicks,
            "state_compared": debug_states is not None, "examples": examples,
            "negative_control": f"{flagged}/{len(swapped)} swapped replays flagged",
            "passed": bad_topk == 0 and bad_state == 0 and bad_clicks == 0}


# ---------------------------------------------------------------------------------------------- servers
def spawn(kind, model_path, args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if kind == "ours":
        cmd = [sys.executable, "-m", "rnnrec_fast.serving", "--model", model_path, "--host", "127.0.0.1",
               "--port", "0", "--debug", "--max-batch", str(args.max_batch),
               "--batch-window-ms", str(args.batch_window_ms), "--torch-threads", str(args.torch_threads)]
    elif kind == "baseline":
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "baseline_server.py"), "--model", model_path,
               "--host", "127.0.0.1", "--port", "0", "--torch-threads", str(args.torch_threads)]
    else:
        raise SystemExit(f"unknown server {kind!r} (ours, baseline)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on http://" in line:
            url = line.strip().split("listening on ")[1]
            return proc, url
    proc.kill()
    raise SystemExit(f"{kind} server did not start:\n{''.join(lines)}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def measure(name, url, model, sessions, args):
    host, port = check_loopback(url)
    tag = f"{name}{int(time.time() * 1000) % 10**8}"

    async def go():
        st, _ = await fetch(host, port, "/healthz")
        if st != 200:
            raise SystemExit(f"{url}/healthz answered {st}")
        res = await run_load(host, port, sessions, duration=args.duration, max_requests=args.max_requests,
                             concurrency=args.concurrency, rate=args.rate, k=args.k, tag=tag)
        debug = None
        acked = res[2]
        probe = await fetch(host, port, f"/v1/sessions/{next(iter(acked))}") if acked else (404, b"")
        if probe[0] == 200:
            got = await fetch_many(host, port, [f"/v1/sessions/{s}" for s in acked])
            debug = {p[len("/v1/sessions/"):]: json.loads(d) for p, (s, d) in got.items() if s == 200}
        mst, mtext = await fetch(host, port, "/metrics")
        return res, debug, (mtext.decode() if mst == 200 else "")

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    (lat, statuses, acked, last, elapsed, errors), debug, metrics_text = runner(go())
    lat.sort()
    n = len(lat)
    ok = statuses.get(200, 0)
    row = {
        "server": name, "requests": n, "ok": ok, "errors": sum(v for s, v in statuses.items() if s != 200),
        "statuses": {str(s): v for s, v in statuses.items()}, "elapsed_s": elapsed, "throughput_rps": ok / elapsed,
        "p50_ms": percentile(lat, 50) * 1e3, "p95_ms": percentile(lat, 95) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3, "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "sessions": len(acked), "error_examples": errors[:3],
    }
    bs = _batch_mean(metrics_text)
    if bs is not None:
        row["mean_batch"] = bs
        row["server_p99_le_ms"] = _server_quantile(metrics_text, 0.99)
    if args.check:
        row["check"] = check_states(model, acked, last, args.k, debug)
    return row


def _server_quantile(text, q):
    """Upper bucket bound (ms) holding quantile q of the service's own click-latency histogram."""
    buckets = []
    for line in text.splitlines():
        if line.startswith('rnnrec_click_latency_seconds_bucket{le="'):
            le = line.split('"')[1]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not buckets or not buckets[-1][1]:
        return None
    total = buckets[-1][1]
    for le, c in buckets:
        if c >= q * total:
            return le * 1e3
    return None


def _batch_mean(text):
    s = c = None
    for line in text.splitlines():
        if line.startswith("rnnrec_batch_size_sum "):
            s = float(line.split()[1])
        elif line.startswith("rnnrec_batch_size_count "):
            c = float(line.split()[1])
    return s / c if s is not None and c else None


def _le(v):
    return "n/a" if v is None else f"≤ {v:g}"


def markdown(rows, args):
    out = ["| server | target rate (req/s) | conns | requests | throughput (req/s) | p50 (ms) | p95 (ms) | "
           "p99 (ms) | server-side p99 (ms, bucket) | errors | mean batch | state check |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chk = r.get("check")
        chk_s = "n/a" if chk is None else (
            ("pass" if chk["passed"] else "FAIL") + f" ({chk['sessions_checked']} sessions"
            + (", top-k + state" if chk["state_compared"] else ", top-k")
            + f"; control: {chk['negative_control']})")
        out.append(f"| {r['server']} | {'closed loop' if not args.rate else int(args.rate)} | {args.concurrency} | "
                   f"{r['requests']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                   f"{r['p99_ms']:.2f} | {_le(r.get('server_p99_le_ms'))} | {r['errors']} | {r.get('mean_batch', float('nan')):.2f} | {chk_s} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="recommender checkpoint (for the offline replay; and spawned servers)")
    p.add_argument("--url", help="a running server (http://127.0.0.1:PORT); else --servers are started")
    p.add_argument("--servers", default="ours", help="comma list of servers to start and measure: ours,baseline")
    p.add_argument("--test-file", default=None, help="default: $RNNREC_FAST_DATA/yoochoose-clicks-100k_test.txt")
    p.add_argument("--duration", type=float, default=5.0, help=f"seconds per server (at most {MAX_DURATION:.0f})")
    p.add_argument("--max-requests", type=int, default=100_000, help=f"requests per server (at most {MAX_REQUESTS})")
    p.add_argument("--concurrency", type=int, default=8, help="connections (each replays whole sessions)")
    p.add_argument("--rate", type=float, default=2500.0, help="target requests/s in all (0: closed loop)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the offline state check")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-window-ms", type=float, default=0.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        raise SystemExit(f"--duration must be in (0, {MAX_DURATION}]")
    if not 0 < args.max_requests <= MAX_REQUESTS:
        raise SystemExit(f"--max-requests must be in (0, {MAX_REQUESTS}]")
    if not 1 <= args.concurrency <= 256:
        raise SystemExit("--concurrency must be in [1, 256]")

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    from rnnrec_fast.recsys import load_checkpoint

    model = load_checkpoint(args.model)
    test_file = args.test_file or os.path.join(data_dir(), "yoochoose-clicks-100k_test.txt")
    sessions = load_sessions(test_file, model.item_index)
    print(f"# {len(sessions)} sessions, {sum(len(c) for _, c in sessions)} clicks from {test_file}", flush=True)

    rows = []
    if args.url:
        rows.append(measure("server", args.url, model, sessions, args))
    else:
        for kind in [s.strip() for s in args.servers.split(",") if s.strip()]:
            proc, url = spawn(kind, args.model, args)
            try:
                rows.append(measure(kind, url, model, sessions, args))
            finally:
                stop(proc)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n# load test: {platform.node()}, {os.cpu_count()} CPUs, load avg before end "
          f"{os.getloadavg()[0]:.2f}, duration {args.duration}s/server, k={args.k}\n")
    print(markdown(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    failed = any(r["errors"] or (r.get("check") and not r["check"]["passed"]) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""HTTP service: a plain ASGI application (served by uvicorn) with micro-batched clicks.

Endpoints::

    POST   /v1/sessions/{session_id}/clicks   {"item_id": 214821371, "k": 20, "exclude_seen": false}
                                              -> 200 {"items": [...], "scores": [...]}
                                              (item_id: int or str form, as the model matches ids;
                                              k: default min(20, max_k))
    DELETE /v1/sessions/{session_id}          -> 200 {"deleted": true} | 404
    GET    /v1/sessions/{session_id}          -> 200 {"clicks": n, "seen": [...], "state": [[...]]}
                                                 (only with debug=True: for load-test state checks)
    GET    /healthz                           -> 200 {"status": "ok", ...}
    GET    /metrics                           -> Prometheus text format 0.0.4

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with a 4xx status (400 malformed
JSON or fields, 404 unknown route or session, 405 wrong method, 413 body too large, 422 unknown
item or k out of range); the service keeps serving.

Micro-batching: a click request is validated in its handler, then queued. The queue is flushed
as one :meth:`SessionRecommender.step_batch` call (one fused step + one scoring GEMM + one top-k)
when it holds ``max_batch`` clicks, or ``batch_window_ms`` after its first click arrived. With the
default window of 0 the flush runs at the next event-loop pass, so a batch holds every click that
arrived while the previous batch was computing (no added latency when idle). Batches run one at a
time in arrival order, and a batch applies repeated clicks of one session in order, so clicks of a
session are never reordered. A batch holding more distinct sessions than the store's
``max_sessions`` runs as consecutive sub-batches (as if its clicks came in that many batches).
``DELETE`` is applied at once: a click of the same session sent concurrently and still queued is
applied after it (to a fresh session).
"""
from __future__ import annotations

import asyncio
import json
import math
import numbers
import threading
import time
from urllib.parse import unquote_to_bytes

from .._checks import is_int_at_least
from . import metrics as _m
from .recommender import InvalidRequestError, SessionRecommender, UnknownItemError

_JSON = [(b"content-type", b"application/json")]
_PREFIX = "/v1/sessions/"
_MAX_WINDOW_MS = 1000.0
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01,
                    0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CLICK_FIELDS = frozenset({"item_id", "k", "exclude_seen"})  # a click's JSON body


class HTTPError(Exception):
    """An error response: ``allow`` the methods a 405's route takes (its Allow header, which RFC 9110
    requires there); ``endpoint`` the metrics' endpoint label where the route is known before the
    handler's own label is set (a click's session id refused)."""

    def __init__(self, status, code, message, *, allow=None, endpoint=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.allow = allow
        self.endpoint = endpoint


class _Click:
    __slots__ = ("sid", "idx", "k", "excl", "fut")

    def __init__(self, sid, idx, k, excl, fut):
        self.sid = sid
        self.idx = idx
        self.k = k
        self.excl = excl
        self.fut = fut


class ServingApp:
    """The ASGI application.

    Args:
        rec: the :class:`SessionRecommender`.
        max_batch: the most clicks one fused step serves.
        batch_window_ms: how long a batch waits for more clicks after its first (0: only those
            that arrived by the next event-loop pass; timers have about 1 ms resolution).
        max_body_bytes: larger request bodies get 413.
        max_session_id_len: longer session ids get 400.
        debug: enables ``GET /v1/sessions/{id}`` (clicks, seen items and the raw state).
    """

    def __init__(self, rec: SessionRecommender, *, max_batch=64, batch_window_ms=0.0, max_body_bytes=4096,
                 max_session_id_len=256, debug=False):
        if not is_int_at_least(max_batch, 1):
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        if max_batch > rec.max_batch:
            raise ValueError(f"max_batch={max_batch} is over the recommender's max_batch={rec.max_batch}")
        if isinstance(batch_window_ms, bool) or not isinstance(batch_window_ms, numbers.Real):  # ("5" was read as 5)
            raise ValueError(f"batch_window_ms must be a number of milliseconds, got {batch_window_ms!r}")
        window = float(batch_window_ms)
        if not 0.0 <= window <= _MAX_WINDOW_MS:  # (NaN fails too; inf would never flush)
            raise ValueError(f"batch_window_ms must be in [0, {_MAX_WINDOW_MS:g}], got {batch_window_ms!r}")
        for name, v in (("max_body_bytes", max_body_bytes), ("max_session_id_len", max_session_id_len)):
            if not is_int_at_least(v, 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.rec = rec
        self.max_batch = int(max_batch)
        self.window = window / 1000.0
        self.max_body = int(max_body_bytes)
        self.max_sid = int(max_session_id_len)
        self.debug = bool(debug)
        self._pending: list[_Click] = []
        self._flush_handle = None
        self._loop = None
        self._bind_lock = threading.Lock()
        self._ids_json = [json.dumps(i) for i in rec.item_ids]  # item ids pre-encoded
        reg = self.registry = _m.Registry()
        self.m_requests = reg.add(_m.Counter("rnnrec_http_requests_total", "HTTP requests by endpoint and status.",
                                             ("endpoint", "code")))
        self.m_errors = reg.add(_m.Counter("rnnrec_http_errors_total",
                                           "HTTP error responses by error code, and clients gone before their request "
                                           "arrived whole (error=\"disconnected\": no response, not in "
                                           "rnnrec_http_requests_total).",
                                           ("error",)))
        self.m_latency = reg.add(_m.Histogram("rnnrec_click_latency_seconds",
                                              "Click request latency in the service (request start to response).",
                                              _LATENCY_BUCKETS))
        self.m_batch = reg.add(_m.Histogram("rnnrec_batch_size", "Clicks served per fused step.", _BATCH_BUCKETS))
        self.m_clicks = reg.add(_m.Counter("rnnrec_clicks_total", "Clicks applied."))
        reg.add(_m.Gauge("rnnrec_sessions", "Sessions held.", lambda: len(rec)))
        reg.add(_m.Gauge("rnnrec_sessions_max", "Bound on sessions held (LRU beyond).", lambda: rec.store.max_sessions))
        reg.add(_m.Gauge("rnnrec_state_bytes", "Bytes allocated for session states.",
                         lambda: rec.store.capacity * rec.store.slab[0].numel() * rec.store.slab.element_size()))
        reg.add(_m.Gauge("rnnrec_state_bytes_max", "Bound on bytes for session states.",
                         lambda: rec.store.max_sessions * rec.store.slab[0].numel() * rec.store.slab.element_size()))
        reg.add(_m.Gauge("rnnrec_sessions_evicted_lru_total", "Sessions evicted to make room (LRU).",
                         lambda: rec.store.evicted_lru, kind="counter"))
        reg.add(_m.Gauge("rnnrec_sessions_expired_ttl_total", "Sessions dropped after the idle TTL.",
                         lambda: rec.store.expired_ttl, kind="counter"))
        reg.add(_m.Gauge("rnnrec_pending_clicks", "Clicks queued for the next batch.", lambda: len(self._pending)))

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            try:
                await self._http(scope, receive, send)
            except asyncio.CancelledError:
                # a forced shutdown (a second Ctrl-C: the event loop cancels what still runs): the
                # request still waiting gets the service's JSON error, not uvicorn's plain-text 500
                # and an 'Exception in ASGI application' traceback; what went to the socket by then
                # stands (a failed write: the client is gone)
                self.m_errors.inc("shutting_down")
                try:
                    await _respond(send, 503, _error("shutting_down", "the server was stopped"), _JSON)
                except Exception:  # noqa: BLE001 - a response already started, or the transport closed
                    pass
        elif kind == "lifespan":
            try:
                while True:
                    msg = await receive()
                    if msg["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif msg["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            except asyncio.CancelledError:  # (a forced shutdown skips the shutdown event: nothing to do)
                return
        # websockets etc.: not served

    async def _http(self, scope, receive, send):
        method = scope["method"]
        path = scope["path"]
        endpoint = "other"
        headers = _JSON
        t0 = time.perf_counter()
        try:
            if path.startswith(_PREFIX):
                sid, clicks = self._session_route(scope, path)
                if clicks:
                    endpoint = "clicks"
                    if method != "POST":
                        raise HTTPError(405, "method_not_allowed", "use POST for clicks", allow="POST")
                    body = await self._read_body(scope, receive)
                    status, payload = 200, await self._click(sid, body)
                    self.m_latency.observe(time.perf_counter() - t0)
                else:
                    endpoint = "session"
                    if method == "DELETE":
                        if not self.rec.end(sid):
                            raise HTTPError(404, "unknown_session", f"no session {sid!r}")
                        status, payload = 200, b'{"deleted":true}'
                    elif method in ("GET", "HEAD") and self.debug:
                        status, payload = 200, self._session_debug(sid)
                    else:
                        raise HTTPError(405, "method_not_allowed",
                                        "use DELETE" + (" or GET" if self.debug else "") + " on a session",
                                        allow="DELETE, GET, HEAD" if self.debug else "DELETE")
            elif path == "/healthz":
                endpoint = "healthz"
                if method not in ("GET", "HEAD"):
                    raise HTTPError(405, "method_not_allowed", "use GET", allow="GET, HEAD")
                status, payload = 200, json.dumps({"status": "ok", "sessions": len(self.rec),
                                                   "items": self.rec.n_items, "backend": self.rec.backend}).encode()
            elif path == "/metrics":
                endpoint = "metrics"
                if method not in ("GET", "HEAD"):
                    raise HTTPError(405, "method_not_allowed", "use GET", allow="GET, HEAD")
                self.rec.expire()  # idle sessions past the TTL are not reported as held
                text = self.registry.expose().encode()
                self.m_requests.inc(endpoint, "200")
                await _respond(send, 200, text, [(b"content-type", _m.CONTENT_TYPE.encode())])
                return
            else:
                raise HTTPError(404, "not_found", f"no route {method} {path}")
        except HTTPError as e:
            self.m_errors.inc(e.code)
            if e.code == "disconnected":  # (nothing to answer: not counted as a response sent)
                return
            status, payload = e.status, _error(e.code, e.message)
            endpoint = e.endpoint or endpoint
            if e.allow is not None:
                headers = _JSON + [(b"allow", e.allow.encode())]
        except Exception as e:  # noqa: BLE001 - the service must keep serving
            status, payload = 500, _error("internal", f"{type(e).__name__}: {e}")
            self.m_errors.inc("internal")
        self.m_requests.inc(endpoint, _STATUS_STR.get(status) or str(status))
        await _respond(send, status, payload, headers)

    def count_refused(self):
        """Counts a request that the server refused below the app (server.py: a malformed head or
        Content-Length, answered with a 400 there) as the app counts its own 400s."""
        self.m_requests.inc("other", "400")
        self.m_errors.inc("bad_request")

    # ------------------------------------------------------------------ helpers
    def _session_route(self, scope, path):
        """``(session_id, clicks)`` of /v1/sessions/{session_id}[/clicks]. From the raw path where
        the server gives it: the id's percent-escapes are decoded strictly, after the path is split
        (an id may hold an escaped '/'; invalid UTF-8 is a 400, where the decoded path holds U+FFFD
        for it and two ids would be one session)."""
        raw = scope.get("raw_path")
        if raw:  # (every segment decoded: /v1/%73essions/... is the same route, RFC 3986)
            seg = [unquote_to_bytes(s) for s in raw.partition(b"?")[0].split(b"/")]
            clicks = seg[4:] == [b"clicks"]
            ok = seg[:3] == [b"", b"v1", b"sessions"] and (len(seg) == 4 or clicks)
            try:
                sid = seg[3].decode("utf-8") if ok else ""  # (another route: a 404 below)
            except UnicodeDecodeError:
                raise HTTPError(400, "bad_session_id", "session id is not valid UTF-8",
                                endpoint="clicks" if clicks else "session") from None
        else:
            rest = path[len(_PREFIX):]
            clicks = rest.endswith("/clicks")
            sid = rest[:-len("/clicks")] if clicks else rest
            ok = "/" not in sid
        if not ok or not sid:
            raise HTTPError(404, "not_found", "expected /v1/sessions/{session_id}[/clicks]")
        if len(sid) > self.max_sid:
            raise HTTPError(400, "bad_session_id", f"session id longer than {self.max_sid} characters",
                            endpoint="clicks" if clicks else "session")
        return sid, clicks

    async def _read_body(self, scope, receive):
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    raise HTTPError(400, "bad_request", "invalid Content-Length") from None
                if n > self.max_body:
                    raise HTTPError(413, "body_too_large", f"request body over {self.max_body} bytes")
        chunks = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HTTPError(400, "disconnected", "client disconnected")
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    raise HTTPError(413, "body_too_large", f"request body over {self.max_body} bytes")
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _click(self, sid, body):
        try:
            req = json.loads(body, object_pairs_hook=_unique_fields)
        except _DuplicateField as e:
            raise HTTPError(400, "bad_request", str(e)) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, "bad_json", f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise HTTPError(400, "bad_json", "request body is nested too deeply") from None
        if not isinstance(req, dict):
            raise HTTPError(400, "bad_request", "request body must be a JSON object")
        unknown = sorted(set(req) - _CLICK_FIELDS)
        if unknown:  # (a misspelt "exclude_seen" would otherwise fall back to its default, silently)
            raise HTTPError(400, "bad_request", f"unknown field {unknown[0]!r}; a click takes "
                            "'item_id', 'k' and 'exclude_seen'")
        if "item_id" not in req:
            raise HTTPError(400, "bad_request", "missing field 'item_id'")
        k = req["k"] if "k" in req else self.rec.default_k
        excl = req.get("exclude_seen", False)
        if not isinstance(excl, bool):
            raise HTTPError(400, "bad_request", "'exclude_seen' must be true or false")
        rec = self.rec
        try:
            idx = rec.item_to_index(req["item_id"])
            rec.check_k(k)
        except TypeError as e:
            raise HTTPError(400, "bad_request", str(e)) from None
        except UnknownItemError as e:
            raise HTTPError(422, "unknown_item", str(e)) from None
        except InvalidRequestError as e:
            raise HTTPError(422, "bad_k", str(e)) from None
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first request, or the app runs under another loop now
            self._bind(loop)
        fut = loop.create_future()
        pending = self._pending
        pending.append(_Click(sid, idx, k, excl, fut))
        if len(pending) >= self.max_batch:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            self._flush()
        elif self._flush_handle is None:
            if self.window > 0:
                self._flush_handle = loop.call_later(self.window, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)
        vals, inds = await fut
        ids = self._ids_json
        return b'{"items":[%s],"scores":[%s]}' % (
            ",".join([ids[i] for i in inds]).encode(),
            ",".join([_num(v) for v in vals]).encode(),
        )

    def _bind(self, loop):
        """Binds the app to ``loop`` unless another loop is still running it: one app serves one
        event loop at a time (its batch queue and timer are that loop's). From a review: one app
        under two servers at once failed most requests with a 500, each loop failing the other's
        queued clicks and completing its futures from the wrong thread."""
        with self._bind_lock:
            old = self._loop
            if old is loop:
                return
            if old is not None and old.is_running() and not old.is_closed():
                raise HTTPError(500, "app_serves_another_loop",
                                "this app is serving the event loop of another server, which is still running: "
                                "an app serves one server at a time (make one app per server; they may share "
                                "one SessionRecommender)")
            self._new_loop(loop)

    def _new_loop(self, loop):
        """Binds the app to ``loop``: clicks still queued under an earlier loop (closed, or no
        longer running them) fail rather than being applied later behind their requests' backs."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        stale, self._pending = self._pending, []
        for c in stale:
            if not c.fut.done() and not c.fut.get_loop().is_closed():
                c.fut.set_exception(RuntimeError("the event loop serving this click changed"))
        self._loop = loop

    def _flush(self):
        self._flush_handle = None
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._run_batch(batch)

    def _run_batch(self, batch):
        n = len(batch)
        self.m_batch.observe(n)
        ks = [c.k for c in batch]
        excl = [c.excl for c in batch]
        try:  # each click's own k
            vals, inds = self.rec.step_batch([c.sid for c in batch], [c.idx for c in batch], ks,
                                             excl if any(excl) else False)
        except Exception as e:  # noqa: BLE001
            for c in batch:
                if not c.fut.done():
                    c.fut.set_exception(e)
            return
        self.m_clicks.inc(amount=n)
        ninf = float("-inf")
        for c, vr, ir in zip(batch, vals, inds):
            if c.excl:
                m = sum(1 for v in vr if v != ninf)
                vr, ir = vr[:m], ir[:m]
            if not c.fut.done():  # the client may have gone away
                c.fut.set_result((vr, ir))

    def _session_debug(self, sid):
        info = self.rec.session_info(sid, state=True)  # (one look: a click or expiry may come between two)
        if info is None:
            raise HTTPError(404, "unknown_session", f"no session {sid!r}")
        info["state"] = info["state"].tolist()
        return json.dumps(info).encode()


_STATUS_STR = {200: "200", 400: "400", 404: "404", 405: "405", 413: "413", 422: "422", 500: "500"}


class _DuplicateField(ValueError):
    pass


def _unique_fields(pairs):
    """A JSON object as a dict, ValueError where a field repeats: json.loads would keep the last
    value silently ({"item_id": 1, "item_id": 2} clicked item 2); RFC 8259 leaves it open."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateField(f"field {dup!r} appears more than once in the request body")
    return d


def _num(v):
    return repr(v) if math.isfinite(v) else "null"


def _error(code, message):
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def _respond(send, status, body, headers):
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app(model_or_path, *, device="cpu", max_sessions=100_000, ttl=1800.0, max_batch=64, batch_window_ms=0.0,
             max_body_bytes=4096, debug=False, **rec_kwargs):
    """An ASGI app from a checkpoint path, a model or a :class:`SessionRecommender`."""
    if isinstance(max_batch, int):  # the recommender serves the app's batches
        rec_kwargs.setdefault("max_batch", max(4096, max_batch))
    if isinstance(model_or_path, SessionRecommender):
        rec = model_or_path
    elif isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        rec = SessionRecommender.load(model_or_path, device=device, max_sessions=max_sessions, ttl=ttl,
                                      **rec_kwargs)
    else:
        rec = SessionRecommender(model_or_path, max_sessions=max_sessions, ttl=ttl, **rec_kwargs)
    return ServingApp(rec, max_batch=max_batch, batch_window_ms=batch_window_ms, max_body_bytes=max_body_bytes,
                      debug=debug)

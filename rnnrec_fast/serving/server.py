"""Running the ASGI app under uvicorn: in the foreground (the CLI) or in a background thread."""
from __future__ import annotations

import json
import socket
import threading
import time


REQUEST_TIMEOUT = 10.0
# The most bytes a request's head (request line and headers) may take. uvicorn's h11 protocol
# refuses a head over 16 KiB, its httptools protocol (the one used where httptools is installed)
# had no bound: one client sending a header without end for the request timeout had the server
# buffer it all (56 MiB in 4 s on loopback), and a few such clients ran it out of memory.
MAX_HEAD_BYTES = 64 * 1024


_HEAD_TOO_LARGE = f"Request head over {MAX_HEAD_BYTES} bytes"


class _HeadTooLarge(Exception):
    pass


def _with_request_deadline(base, timeout, count_refused=None):
    """uvicorn's HTTP protocol class ``base`` with a deadline on each request's arrival. uvicorn
    closes idle keep-alive connections, but not one whose request arrives slowly: half-sent
    requests (slowloris) held their connections for ever, and a client holding enough of them
    starved the server of connections. Here a request whose head and body have not all arrived
    within ``timeout`` seconds of the connection opening, or of the previous response, has its
    connection closed (the app, if it was reading the body, sees a disconnect). A request that
    has arrived is never cut off, however long the app takes. ``count_refused`` (the app's, where
    it has one) is called for each request refused here with a 400, for the app's metrics."""
    from uvicorn.protocols.http.flow_control import FlowControl

    class HeldFlow(FlowControl):
        """uvicorn's flow control of a connection, whose reading stays paused while requests are
        queued behind the one being answered (httptools' pipeline) or a malformed request's 400
        waits for them. uvicorn resumed reading after every response and at every body read of
        the app: a client pipelining requests without end (reading the responses) had each
        response let another read of them in, 1 GB queued in 7 s from one connection, the other
        clients' clicks ~1 s. Now at most about one read of them (256 KiB) is queued."""

        def __init__(self, transport, protocol):
            super().__init__(transport)
            self._protocol = protocol

        def resume_reading(self):
            p = self._protocol
            if not getattr(p, "pipeline", None) and p._pending_400 is None:
                super().resume_reading()

    class RequestDeadline(base):
        _request_timeout = timeout
        _request_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.flow = HeldFlow(transport, self)
            self._arm_request_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self._no_request_left() and (self._client_done_sending or self._pending_400 is not None):
                # (the last request the client sent before its half-close or a malformed request)
                self._close(self._pending_400)
                return
            self._arm_request_deadline()

        _client_done_sending = False

        def eof_received(self):
            """The client half-closed (``shutdown(SHUT_WR)``: it sends no more, it still reads).
            uvicorn closes the connection there, and the response to a request that had fully
            arrived was lost (its click applied all the same) and the app's write on the closed
            transport logged an error. As the HTTP specs recommend, the requests that arrived are
            answered and the connection closed after the last one; one still arriving (its body
            cut short) can never be completed, and closes it at once, as before."""
            if self._no_request_left() or self.cycle.more_body:
                return None  # (asyncio closes the transport)
            self._client_done_sending = True
            return True  # keep the transport open for the responses

        def _no_request_left(self):
            """Whether no request is in progress or queued behind the one in progress."""
            cycle = self.cycle
            return (cycle is None or cycle.response_complete) and not getattr(self, "pipeline", None)

        if hasattr(base, "on_message_begin"):  # httptools: bound the head (h11 bounds its own)
            _head_bytes = 0  # bytes of the head still arriving, read after the read it began in
            _head_began = False
            _in_head = True  # (a connection opens with a request's head)

            def on_message_begin(self):
                super().on_message_begin()
                self._in_head, self._head_began, self._head_parsed = True, True, 0

            # (a head that arrives whole within reads is measured as httptools parses it, to a few
            # bytes: the request line as its URL + 20, each header with its ": " and CRLF; the
            # exception makes the parser refuse the request, and send_400_response says why)
            def on_url(self, url):
                self._count_head(len(url) + 20 * (not self._head_parsed))
                super().on_url(url)

            def on_header(self, name, value):
                self._count_head(len(name) + len(value) + 4)
                super().on_header(name, value)

            def _count_head(self, n):
                self._head_parsed += n
                if self._head_parsed > MAX_HEAD_BYTES:
                    raise _HeadTooLarge

            def on_headers_complete(self):
                self._in_head = False
                self._cycle_before = self.cycle  # (uvicorn's own field: the request's cycle, next)
                super().on_headers_complete()
                self._open_cycles = [c for c in self._open_cycles if not c.response_complete] + [self.cycle]

            # The requests of the connection not yet answered: the one being served and those
            # pipelined behind it. uvicorn's connection_lost marks only self.cycle disconnected,
            # which is the latest request parsed, not the one being served where requests are
            # pipelined: the app's response to a client gone (reset, its responses unread) was
            # written to the closed transport, and uvloop's RuntimeError logged a traceback (a
            # review: 3 of 3 floods of pipelined clicks). Now each is marked, as uvicorn marks one.
            _open_cycles = ()

            def data_received(self, data):
                if self._pending_400 is not None:
                    return  # (the parser refused the stream: what follows is not read)
                self._head_began = False
                super().data_received(data)
                if self._in_head and not self.transport.is_closing() and self._pending_400 is None:
                    # a head still arriving (one header without end is held by httptools until
                    # it ends: no callback sees it), counted from the read after the one it began
                    # in (that read may hold many whole pipelined requests before it)
                    self._head_bytes = 0 if self._head_began else self._head_bytes + len(data)
                    if self._head_bytes > MAX_HEAD_BYTES:
                        self.send_400_response(_HEAD_TOO_LARGE)

        _pending_400 = None  # the 400 to send once the requests ahead of the malformed one are answered
        _head_parsed = 0  # bytes of the head's URL and headers parsed so far (httptools)
        _cycle_before = None  # the cycle of the request before the latest (httptools)

        def send_400_response(self, msg):
            """A request malformed below the app (uvicorn's parser refused it: a bad or conflicting
            Content-Length, bad chunked encoding, a control character in a header; or a head over
            MAX_HEAD_BYTES) answered as the app answers every error, ``{"error": {"code":
            "bad_request", "message": ...}}``, instead of uvicorn's plain text; the connection then
            closes, as uvicorn closes it. Requests pipelined ahead of it that arrived whole are
            answered first (uvicorn closed at once: their clicks applied, their responses lost, the
            client reading the 400 as the first one's); reading stops at the malformed one."""
            if self._head_parsed > MAX_HEAD_BYTES:
                msg = _HEAD_TOO_LARGE
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and cycle.more_body:  # its body cut short
                pipeline = getattr(self, "pipeline", None)
                if pipeline and pipeline[0][0] is cycle:  # queued behind others: never started, dropped
                    pipeline.popleft()
                    self.cycle = self._cycle_before
                else:  # (the app at work on it sees the disconnect: it can never be completed)
                    return self._close(msg)
            if self._no_request_left():
                return self._close(msg)
            self._pending_400 = msg
            self.flow.pause_reading()

        def _close(self, msg=None):
            """Closes the connection, after the JSON 400 saying ``msg`` where one is given."""
            if msg is not None:
                if count_refused is not None:
                    count_refused()
                body = json.dumps({"error": {"code": "bad_request", "message": str(msg)}}).encode()
                head = [b"HTTP/1.1 400 Bad Request\r\n"]
                for name, value in self.server_state.default_headers:
                    head += [name, b": ", value, b"\r\n"]
                head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                         b"connection: close\r\n\r\n"]
                self.transport.write(b"".join(head) + body)
            self.transport.close()

        def connection_lost(self, exc):
            if self._request_deadline is not None:
                self._request_deadline.cancel()
                self._request_deadline = None
            for cycle in getattr(self, "_open_cycles", ()):  # (httptools: see _open_cycles)
                if not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()
            super().connection_lost(exc)

        def _arm_request_deadline(self):
            if self._request_deadline is not None:
                self._request_deadline.cancel()
            self._request_deadline = self.loop.call_later(self._request_timeout, self._request_deadline_passed)

        def _request_deadline_passed(self):
            self._request_deadline = None
            if getattr(self, "pipeline", None):
                # a request queued behind one being served (httptools): the one ahead has arrived,
                # and the queued one's body waits because uvicorn paused reading, not the client
                return  # (on_response_complete arms the next deadline)
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                return  # the request is in: the app is at work on it
            if not self.transport.is_closing():
                self.transport.close()

    RequestDeadline.__name__ = RequestDeadline.__qualname__ = f"RequestDeadline{base.__name__}"
    return RequestDeadline


def _uvicorn_config(app, log_level="warning", request_timeout=REQUEST_TIMEOUT):
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    if (isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float))
            or not 0 < request_timeout < float("inf")):
        raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
    http = _with_request_deadline(base, float(request_timeout), getattr(app, "count_refused", None))
    return uvicorn.Config(app, loop=loop, http=http, lifespan="on",
                          log_level=log_level, access_log=False, server_header=False, date_header=False)


def address(host, port):
    """``host:port``, an IPv6 address in brackets (RFC 3986)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url(host, port):
    """The http URL of ``host`` and ``port``."""
    return "http://" + address(host, port)


BACKLOG = 2048


def bind(host="127.0.0.1", port=0, backlog=BACKLOG, listen=True):
    """A TCP socket bound to ``host`` (an address or a name; an IPv6 address in brackets too, as
    :func:`url` writes it) and ``port`` (0: an ephemeral port; read it back with
    sock.getsockname()), listening unless ``listen`` is False (the service listens once its model
    is loaded: until then a connection is refused, not left waiting). An OSError names the address."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host or "0.0.0.0"  # ("": every IPv4 address)
    sock = None
    try:
        family, _, _, _, addr = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        if listen:
            sock.listen(backlog)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(e.errno, f"cannot listen on {address(name, port)}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated


def serve(app, sock, log_level="warning", request_timeout=REQUEST_TIMEOUT, ready=None) -> int:
    """Serves ``app`` on a bound socket until SIGINT/SIGTERM: a graceful shutdown (requests in
    flight are answered first), then returns 0. A second SIGINT while it waits for them forces the
    exit (uvicorn's): the requests still waiting get a 503, and it returns 130, the status of a
    process stopped by SIGINT. ``request_timeout``: see _with_request_deadline. ``ready()`` is
    called once the server accepts requests (after the signal handling is in place: a signal from
    then on shuts it down gracefully)."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if ready is not None and self.started:
                ready()

    server = Server(_uvicorn_config(app, log_level, request_timeout))
    # uvicorn raises the signal it handled again once it has shut down: SIGINT as a
    # KeyboardInterrupt, SIGTERM (a supervisor's stop) by default killed the process (status 143)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    return 130 if server.force_exit else 0


class BackgroundServer:
    """Serves an ASGI app from a daemon thread on 127.0.0.1 and an ephemeral port (tests, benchmarks).

    with BackgroundServer(app) as srv:
        urlopen(srv.url + "/healthz")
    """

    def __init__(self, app, host="127.0.0.1", port=0, log_level="warning", start_timeout=10.0,
                 request_timeout=REQUEST_TIMEOUT):
        import uvicorn

        config = _uvicorn_config(app, log_level, request_timeout)
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = url(self.host, self.port)
        self.server = uvicorn.Server(config)
        self.start_timeout = start_timeout
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="rnnrec-serving")

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout=10.0):
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

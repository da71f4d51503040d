"""Running the ASGI app under uvicorn: in the foreground (the CLI) or in a background thread."""
from __future__ import annotations

import socket
import threading
import time


def _uvicorn_config(app, log_level="warning"):
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    return uvicorn.Config(app, loop=loop, http=http, lifespan="on", log_level=log_level, access_log=False,
                          server_header=False, date_header=False)


def bind(host="127.0.0.1", port=0, backlog=2048):
    """A listening TCP socket (port 0: an ephemeral port; read it back with sock.getsockname())."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def serve(app, sock, log_level="warning"):
    """Serves ``app`` on a bound socket until SIGINT/SIGTERM."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(app, log_level))
    server.run(sockets=[sock])


class BackgroundServer:
    """Serves an ASGI app from a daemon thread on 127.0.0.1 and an ephemeral port (tests, benchmarks).

    with BackgroundServer(app) as srv:
        urlopen(srv.url + "/healthz")
    """

    def __init__(self, app, host="127.0.0.1", port=0, log_level="warning", start_timeout=10.0):
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(_uvicorn_config(app, log_level))
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

"""python -m rnnrec_fast.serving --model model.pt --host 127.0.0.1 --port 8000"""
from __future__ import annotations

import argparse
import gc
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rnnrec_fast.serving",
                                description="Serve next-click recommendations from a session recommender checkpoint.")
    p.add_argument("--model", required=True, help="checkpoint written by rnnrec_fast.recsys.save_checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: an ephemeral one, printed at start)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-sessions", type=int, default=100_000, help="sessions held at most (LRU beyond)")
    p.add_argument("--ttl", type=float, default=1800.0,
                   help="seconds of idleness before a session is dropped (inf: never)")
    p.add_argument("--max-batch", type=int, default=64, help="clicks served by one fused step at most")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="how long a batch waits for more clicks (0: those arrived by the next loop pass)")
    p.add_argument("--max-body-bytes", type=int, default=4096, help="largest request body accepted (413 beyond)")
    p.add_argument("--max-k", type=int, default=None, help="largest k a request may ask for (default: the catalogue size)")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds a request's head and body may take to arrive (slow or stalled clients are cut off)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--debug", action="store_true", help="enable GET /v1/sessions/{id} (clicks, seen items, state)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")
    from ..recsys.cli import show_defaults

    a = show_defaults(p).parse_args(argv)

    try:  # the HTTP stack is an optional extra: say so before loading anything
        import uvicorn  # noqa: F401
    except ImportError:
        sys.stderr.write("error: the HTTP service needs uvicorn: pip install 'rnnrec_fast[serve]' "
                         "(uvicorn, httptools, uvloop; make setup installs them)\n")
        return 2
    import torch

    if a.torch_threads > 0:
        torch.set_num_threads(a.torch_threads)
    try:
        import rnnrec_fast  # noqa: F401  (registers the custom ops the model may use)
    except ImportError:
        pass
    from ..recsys.data import RecsysError
    from .app import make_app
    from .server import BACKLOG, bind, serve, url

    sock = None
    try:  # bad options and unusable model files: one line, exit 2 (as the recsys CLI)
        _check_options(a)  # (before the model loads, by their flags)
        sock = bind(a.host, a.port, listen=False)  # (a port in use is said at once)
        app = make_app(a.model, device=a.device, max_sessions=a.max_sessions, ttl=a.ttl, max_batch=a.max_batch,
                       batch_window_ms=a.batch_window_ms, max_body_bytes=a.max_body_bytes, debug=a.debug,
                       max_k=a.max_k)
        sock.listen(BACKLOG)
    except (RecsysError, ValueError, OSError) as exc:
        if sock is not None:
            sock.close()
        sys.stderr.write(f"error: {exc}\n")
        return 2
    # everything allocated so far (model, item maps, modules) is long-lived: keep it out of the
    # cyclic GC's full collections, which would otherwise walk it during serving (latency spikes)
    gc.collect()
    gc.freeze()
    host, port = sock.getsockname()[:2]
    line = (f"rnnrec_fast.serving: {app.rec.n_items} items, H={app.rec.hidden_size}, L={app.rec.num_layers}, "
            f"backend {app.rec.backend}; listening on {url(host, port)}")
    # (printed once the server accepts requests: a supervisor taking it as "ready" may stop it at once)
    return serve(app, sock, log_level=a.log_level, request_timeout=a.request_timeout,
                 ready=lambda: print(line, flush=True))


def _check_options(a):
    """The numeric options' ranges, named by their flags (the recommender and app check the same
    by their parameters' names, after the model has loaded)."""
    checks = [
        ("--port", 0 <= a.port <= 65535, "a port number in [0, 65535] (0: an ephemeral one)"),
        ("--torch-threads", a.torch_threads >= 0, "0 (torch's default) or a number of threads"),
        ("--request-timeout", 0 < a.request_timeout < float("inf"), "a positive number of seconds"),
        ("--max-sessions", a.max_sessions >= 1, "a positive int"),
        ("--ttl", a.ttl > 0, "a positive number of seconds (inf: never)"),
        ("--max-batch", a.max_batch >= 1, "a positive int"),
        ("--batch-window-ms", 0 <= a.batch_window_ms <= 1000, "in [0, 1000]"),
        ("--max-body-bytes", a.max_body_bytes >= 1, "a positive int"),
        ("--max-k", a.max_k is None or a.max_k >= 1, "a positive int"),
    ]
    for flag, ok, what in checks:
        if not ok:  # (NaN fails every comparison)
            value = getattr(a, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag} must be {what}, got {value}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # (Ctrl-C before the server runs, while the model loads: no traceback)
        sys.exit(130)

"""``lmtune serve``: load the model and adapters, listen, print the URL, serve until Ctrl-C or SIGTERM.

Contract: nothing listens before the model has loaded; the socket is bound here (so ``--port 0``
gets a free port, and the printed URL is the real one), on 127.0.0.1 unless ``--host`` says
otherwise. On SIGINT or SIGTERM uvicorn stops accepting connections, streams end (sse-starlette
watches the same signal), requests still waiting get ``SHUTDOWN_GRACE_S`` to finish, then the
generation worker cancels what is left and ``run_serve`` returns 0.
"""

from __future__ import annotations

import signal
import socket

from lmtune.errors import ConfigError
from lmtune.serve.app import ServeLimits, build_app
from lmtune.serve.args import ServeArguments
from lmtune.serve.models import load_catalog
from lmtune.serve.worker import GenerationWorker

# Seconds a non-streamed request in flight may take to finish once a stop was asked for.
SHUTDOWN_GRACE_S = 10


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one).

    Raises:
        ConfigError: when the address cannot be used (port taken, unknown host, no permission).
    """
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose "
                          "another --port (0 picks a free one) or --host.") from err


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run_serve(args: ServeArguments) -> int:
    """Serve until a stop signal (call from the main thread); returns the exit code.

    Args:
        args: The ``lmtune serve`` flags.

    Raises:
        ConfigError: a model that cannot load, or an address that cannot be used.
    """
    import uvicorn

    model, tokenizer, catalog = load_catalog(args)
    sock = bind(args.host, args.port)
    worker = GenerationWorker(model, tokenizer, args.max_queue, catalog.tokenizer_lock)
    app = build_app(catalog, worker, limits=ServeLimits(args.max_new_tokens, args.max_tokens_limit),
                    api_key=args.api_key, cors_origins=args.cors_origins)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    url = url_of(sock)
    stops: list[int] = []
    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises them to the handlers it found:
    # these, which only note the signal, so that the worker is stopped here and the exit is clean.
    previous = {sig: signal.signal(sig, lambda number, frame: stops.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        key = " (API key required)" if args.api_key else ""
        print(f"lmtune serve: models {', '.join(catalog.models)}; chat page {url} ; OpenAI API {url}v1{key}. "
              "Ctrl-C stops.", flush=True)
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("lmtune serve: stopped.", flush=True)
    return 0


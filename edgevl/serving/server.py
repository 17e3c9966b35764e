"""Running the app on uvicorn, with a graceful drain on SIGTERM.

On SIGTERM (or Ctrl-C) the server marks itself draining (``/ready`` answers 503, a new request
on a kept-alive connection gets 503), closes its listening socket, lets every in-flight response
finish (up to ``drain_timeout_s``), then shuts the schedulers down and exits with status 0.
"""

from __future__ import annotations

import signal
import socket
import sys

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: readiness flips to 503 the moment a stop signal arrives, and one
    line on stderr says where it listens once it really accepts connections."""

    def __init__(self, config: uvicorn.Config, announce: str | None = None):
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.announce:
            print(self.announce, file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.draining = True
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free port; the caller reads it back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, sock: socket.socket, drain_timeout_s: float | None = 30.0, log_level: str = "info",
                announce: str | None = None) -> DrainingServer:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout_s,
                            timeout_keep_alive=5, access_log=log_level == "debug")
    return DrainingServer(config, announce)


def serve(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float | None = 30.0,
          log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT; returns after the drain (the caller exits 0)."""
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    server = make_server(app, sock, drain_timeout_s, log_level,
                         announce=f"edgevl serve: listening on http://{shown}:{sock.getsockname()[1]}")
    # uvicorn re-raises the stop signal after its drain; with this no-op handler in place the
    # process then returns normally (exit 0) instead of dying by SIGTERM after a clean shutdown.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()

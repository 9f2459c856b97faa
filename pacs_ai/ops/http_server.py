"""An ASGI application served by uvicorn in a background thread of the daemon.

``AsgiServer(app, host, port).start()`` binds ``host:port`` itself (so a port in use raises at once, as
an :class:`~pacs_ai.errors.PacsAiError`, and port 0 gives a free port, see :attr:`port`), then runs
uvicorn's event loop in a daemon thread and returns once uvicorn has started (bounded wait). ``stop()``
asks uvicorn to exit, which finishes the requests in flight (at most ``graceful_s`` seconds).

uvicorn is given ``log_config=None``: it must not reconfigure the daemon's logging (handlers, PHI
filter); its own loggers (``uvicorn.error``) go through the root handler, the access log is off.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from pacs_ai.errors import PacsAiError

__all__ = ["AsgiServer"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0


class AsgiServer:
    """Serve ``app`` (an ASGI callable) on ``host:port`` from a background thread named ``name``."""

    def __init__(self, app: Any, host: str, port: int, *, name: str = "http", graceful_s: int = 3) -> None:
        self.app = app
        self.host = host
        self.name = name
        self.graceful_s = graceful_s
        self._requested_port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one before ``start()``)."""
        return int(self._socket.getsockname()[1]) if self._socket is not None else self._requested_port

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host.strip("[]"), self._requested_port))
            sock.listen(128)
            sock.set_inheritable(False)
        except OSError as exc:
            sock.close()
            raise PacsAiError(
                f"cannot serve HTTP on {self.host}:{self._requested_port}: {exc.strerror or exc}"
            ) from exc
        return sock

    def start(self) -> None:
        """Bind, start uvicorn in a thread and wait until it serves; raises PacsAiError when it cannot."""
        if self._server is not None:
            return
        sock = self._bind()
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=self.graceful_s,
            server_header=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True)
        self._socket, self._server, self._thread = sock, server, thread
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise PacsAiError(f"the HTTP server on {self.host}:{self._requested_port} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (requests in flight get ``graceful_s`` seconds) and close the socket."""
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=self.graceful_s + 5)
            if thread.is_alive():
                logger.warning("the HTTP server thread did not stop in time")
        if sock is not None:
            sock.close()
            self._socket = None

    def __enter__(self) -> AsgiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

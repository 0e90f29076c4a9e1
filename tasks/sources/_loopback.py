"""The lifecycle shared by the local test endpoints (Sentinel Hub, STAC): a threaded HTTP
server on loopback, run from a background thread, usable as a context manager."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class LoopbackServer:
    """A ``ThreadingHTTPServer`` whose handler class sees ``state`` as a class attribute.

    Subclasses set :attr:`thread_name` and :attr:`handler` and keep their shared state in
    ``self.state`` (which must have ``config.host`` and ``config.port``).
    """

    thread_name = "loopback-endpoint"
    handler: type[BaseHTTPRequestHandler]
    state: Any

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:<port>``."""
        if self._server is None:
            raise RuntimeError("Expected a started endpoint. Got a stopped one.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        """Bind (port 0 = any free port) and serve from a daemon thread."""
        handler = type("Handler", (self.handler,), {"state": self.state})
        cfg = self.state.config
        self._server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until interrupted, then stop (the CLI's mode); starts the server if needed."""
        if self._server is None:
            self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

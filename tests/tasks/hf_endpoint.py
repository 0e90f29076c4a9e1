"""A local HTTP endpoint that serves files the way the Hugging Face Hub does (no network).

Implements what ``huggingface_hub.hf_hub_download`` and ``get_hf_file_metadata`` need:
HEAD and GET ``/{owner}/{repo}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag`` (the SHA-256, as the Hub sends for LFS files), ``X-Linked-Size``,
``Content-Length`` and byte ranges; errors as the Hub signals them (``X-Error-Code``
``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``); private repositories answer 401
without ``Authorization: Bearer <token>``. Counts requests per method for the tests.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str
    branches: tuple[str, ...] = ("main",)
    token: str | None = None  # private: this token is required


@dataclass
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _fail(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool) -> None:
                hub.requests[self.command] += 1
                m = _PATH.match(unquote(self.path.split("?", 1)[0]))
                repo = hub.repos.get(m["repo"]) if m else None
                if m is None or repo is None:
                    return self._fail(401, "RepoNotFound")
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    return self._fail(401, "RepoNotFound")
                if m["rev"] not in (*repo.branches, repo.commit):
                    return self._fail(404, "RevisionNotFound")
                data = repo.files.get(m["file"])
                if data is None:
                    return self._fail(404, "EntryNotFound")
                sha = hashlib.sha256(data).hexdigest()
                start, end = 0, len(data) - 1
                rng = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng:
                    start = int(rng[1])
                    end = int(rng[2]) if rng[2] else end
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(end - start + 1))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start : end + 1])

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

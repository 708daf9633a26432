"""A local stand-in for the Hugging Face Hub that lets ``--push_to_hub`` start and refuses the upload.

It answers what the trainer asks before training (``HEAD /``, ``whoami``: 401 for :data:`BAD_TOKEN`), ``create_repo`` and the model
card lookup (no README yet), and refuses everything else, i.e. the upload itself, with HTTP 403, the way
the Hub answers a token without write access. The trainer's real huggingface_hub client talks to it
through ``HF_ENDPOINT`` (read when huggingface_hub is imported: a trainer subprocess sets it).
"""
from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

USER = "tester"
REFUSAL = "write access refused by the test Hub"
BAD_TOKEN = "hf_revoked"  # whoami answers 401 for it


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet: pytest shows the trainer's output instead
        pass

    def _reply(self, status: int, body: dict | None = None, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        self.server.requests.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        endpoint = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/":
            self._reply(200)
        elif self.path == "/api/whoami-v2" and self.headers.get("Authorization") == f"Bearer {BAD_TOKEN}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
        elif self.path == "/api/whoami-v2":
            self._reply(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
        elif self.path == "/api/repos/create":
            self._reply(200, {"url": f"{endpoint}/{USER}/{body.get('name')}"})
        elif "/resolve/" in self.path:  # the model card: none yet
            self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        elif self.path == "/api/validate-yaml":  # the new model card's metadata
            self._reply(200, {})
        else:
            self._reply(403, {"error": REFUSAL})

    do_GET = do_HEAD = do_POST = do_PUT = _route


@contextlib.contextmanager
def fake_hub() -> Iterator[ThreadingHTTPServer]:
    """The server on a free local port (``server.url``), serving until the block ends; ``server.requests``
    lists what it was asked."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

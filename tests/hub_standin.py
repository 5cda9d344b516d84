"""A local stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's downloads and header reads.

``HubStandin(root)`` serves ``root/<org>/<name>/<files>`` on 127.0.0.1 as hub repos: the model info endpoint
(``/api/models/<org>/<name>/revision/<rev>``), its file tree (``.../tree/<rev>``) and
``/<org>/<name>/resolve/<rev>/<file>`` with HEAD, GET and byte ranges. Point huggingface_hub at it with
``HF_ENDPOINT``. Every request is logged (method, path, Range header), so a test can tell a header read (a range)
from a download (a whole file).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandin:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.log: list[tuple[str, str, str | None]] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                standin._serve(self, body=False)

            def do_GET(self):
                standin._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def whole_file_gets(self, name: str) -> list[str]:
        """The GETs of a file ending in ``name`` without a Range header (downloads, not header reads)."""
        return [p for m, p, r in self.log if m == "GET" and p.endswith(name) and r is None]

    # ------------------------------------------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        rng = h.headers.get("Range")
        self.log.append((h.command, path, rng))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if m:
            return self._model_info(h, m.group(1), body)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path)
        if m:
            return self._tree(h, m.group(1), body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        if m:
            return self._file(h, self.root / m.group(1) / m.group(2), rng, body)
        self._send(h, 404, b'{"error": "not found"}', {"Content-Type": "application/json"}, body)

    def _model_info(self, h, repo: str, body: bool) -> None:
        d = self.root / repo
        if not d.is_dir():
            return self._send(h, 404, b'{"error": "Repository not found"}',
                              {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, body)
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                "siblings": [{"rfilename": f} for f in files]}
        self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _tree(self, h, repo: str, body: bool) -> None:
        d = self.root / repo
        entries = [{"type": "file", "path": str(p.relative_to(d)), "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in sorted(d.rglob("*")) if p.is_file()]
        self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, h, p: Path, rng: str | None, body: bool) -> None:
        if not p.is_file():
            return self._send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
        data = p.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            stop = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            return self._send(h, 206, data[start:stop], headers, body)
        self._send(h, 200, data, headers, body)

    @staticmethod
    def _send(h, code: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

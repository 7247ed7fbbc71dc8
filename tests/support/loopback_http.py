"""A loopback HTTP origin for reference-URL tests: a PNG, redirects, a huge body; it counts hits."""

from __future__ import annotations

import contextlib
import io
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def png_bytes(size: tuple[int, int] = (32, 24), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class LoopbackOrigin:
    origin: str
    hits: Counter[str] = field(default_factory=Counter)
    huge_bytes_sent: list[int] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.origin + path


@contextlib.contextmanager
def loopback_origin() -> Iterator[LoopbackOrigin]:
    """``/ok.png``; ``/redirect?to=URL`` (302); ``/huge`` (an endless PNG-looking body)."""
    image = png_bytes()
    served: LoopbackOrigin | None = None

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            assert served is not None
            parts = urlsplit(self.path)
            served.hits[parts.path] += 1
            if parts.path == "/ok.png":
                self._send(200, image)
            elif parts.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", parse_qs(parts.query)["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif parts.path == "/huge":
                self._send_endless()
            else:
                self._send(404, b"no such thing")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_endless(self) -> None:
            """No Content-Length: only the reader's own cap can stop it."""
            assert served is not None
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk, sent = image[:8] + b"\0" * 65_528, 0
            try:
                while sent < 512 * 1024 * 1024:
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            served.huge_bytes_sent.append(sent)

    with serving_in_thread(Handler) as server:
        served = LoopbackOrigin(f"http://127.0.0.1:{server.server_address[1]}")
        yield served


@contextlib.contextmanager
def serving_in_thread(
    handler: type[BaseHTTPRequestHandler], port: int = 0
) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 answering from a thread, shut down when the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

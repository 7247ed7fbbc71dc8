"""A loopback callback receiver that verifies Standard Webhooks signatures with the library."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.loopback_http import serving_in_thread


@dataclass
class Receiver:
    url: str
    answers: list[int] = field(default_factory=list)
    """Statuses to answer, in order; 200 once they run out."""
    delay_s: float = 0.0
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    """Every request: headers, payload, whether its signature verified, when it arrived."""

    def verified(self) -> list[dict[str, Any]]:
        return [d for d in self.deliveries if d["verified"]]


@contextlib.contextmanager
def webhook_receiver(
    secret: str | bytes, port: int = 0, answers: list[int] | None = None, delay_s: float = 0.0
) -> Iterator[Receiver]:
    verifier = Webhook(secret)
    receiver: Receiver | None = None

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

        def do_POST(self) -> None:
            assert receiver is not None
            arrived = time.monotonic()
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = dict(self.headers.items())
            try:
                payload = verifier.verify(body, headers)
                verified = True
            except WebhookVerificationError:
                payload, verified = json.loads(body), False
            receiver.deliveries.append(
                {"headers": headers, "payload": payload, "verified": verified, "at": arrived}
            )
            time.sleep(receiver.delay_s)
            status = receiver.answers.pop(0) if receiver.answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving_in_thread(Handler, port) as server:
        receiver = Receiver(
            f"http://127.0.0.1:{server.server_address[1]}/hooks", list(answers or []), delay_s
        )
        yield receiver

"""Request body caps, answered with 413 in the contract's error shape.

FastAPI's own ``max_body_size`` answers a plain-text 413 from inside the route, past the
error handlers; this middleware refuses a declared ``Content-Length`` before any byte is
read, and a body that streams past the cap as an ``HTTPException`` the handlers map.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ourvidz_serve.api.errors import error_response


class BodySizeLimit:
    def __init__(
        self, app: ASGIApp, *, default_limit: int, limits: Mapping[str, int] | None = None
    ) -> None:
        """``limits`` maps a path prefix to its own cap (e.g. uploads); others get the default."""
        self.app = app
        self._default = default_limit
        self._limits = sorted((limits or {}).items(), key=lambda item: -len(item[0]))

    def limit_for(self, path: str) -> int:
        return next((cap for prefix, cap in self._limits if path.startswith(prefix)), self._default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        message = f"the request body is larger than {limit} bytes"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(413, "payload_too_large", message, path=scope["path"])
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)

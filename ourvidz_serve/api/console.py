"""The operator console at ``/console``: static files from the package, under a strict CSP.

The page uses the public API only, on this origin; its credential stays in the browser's
``sessionStorage``. Nothing here needs one: the files and the two links are not secrets.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ourvidz_serve.api.dependencies import get_state
from ourvidz_serve.api.state import AppState
from ourvidz_serve.errors import NotFound
from ourvidz_serve.settings import Settings, StorageBackend

STATIC_DIR = Path(str(files("ourvidz_serve.console") / "static"))
PREFIX = "/console"


def content_security_policy(settings: Settings) -> str:
    """No inline script or style, no other origin, no framing. Images and videos come from
    this origin's signed URLs, or from object storage's presigned ones (its origin, then)."""
    media = "'self' blob: data:"
    if settings.storage_backend is StorageBackend.S3:
        endpoint = urlsplit(settings.s3_endpoint_url) if settings.s3_endpoint_url else None
        media += (
            f" {endpoint.scheme}://{endpoint.netloc}" if endpoint else " https://*.amazonaws.com"
        )
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {media}",
            f"media-src {media}",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "object-src 'none'",
        )
    )


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

router = APIRouter(prefix=PREFIX, tags=["console"], include_in_schema=False)


class ConsoleConfig(BaseModel):
    ray_dashboard_url: str | None
    grafana_url: str | None


@router.get("")
async def console_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"])


@router.get("/config.json", response_model=ConsoleConfig)
async def console_config(state: Annotated[AppState, Depends(get_state)]) -> ConsoleConfig:
    """The links the queue panel shows, where the operator set them."""
    settings = state.settings
    return ConsoleConfig(
        ray_dashboard_url=settings.ray_dashboard_url, grafana_url=settings.grafana_url
    )


@router.get("/static/{name}")
async def console_file(name: str) -> FileResponse:
    """One file of the console; only the files shipped, by name (no paths)."""
    path = STATIC_DIR / name
    media_type = _MEDIA_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or media_type is None or not path.is_file():
        raise NotFound(f"no console file {name!r}")
    return FileResponse(path, media_type=media_type)


class ConsoleSecurityHeaders:
    """Every answer under ``/console`` carries the CSP and its companions (errors too)."""

    def __init__(self, app: ASGIApp, *, policy: str) -> None:
        self.app = app
        self.headers = SECURITY_HEADERS | {"content-security-policy": policy}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (
            scope["path"] == PREFIX or scope["path"].startswith(PREFIX + "/")
        ):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.decode().lower() not in self.headers
                ]
                headers += [(k.encode(), v.encode()) for k, v in self.headers.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

"""The OpenAPI document as served (``GET /openapi.json``) and committed (``schemas/``): valid
as the version it declares.

FastAPI declares OpenAPI 3.1 but documents a streaming response (``EventSourceResponse``: the
job events) with ``itemSchema``, a 3.2 keyword that 3.1 validators and generators reject. Here
the item's schema (each event: ``event``, ``data``, ``id``, ``retry``) becomes the media
type's ``schema``: for ``text/event-stream`` that is how 3.1 tools read it (schemathesis
checks each event of a stream against it; a ``type: string`` there fails every event).

FastAPI also documents a route's error responses in the route's media type, so a stream's
errors read as ``text/event-stream``; every error is the JSON error body (``api/errors.py``),
so they are documented as ``application/json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI

from ourvidz_serve.api.errors import OPENAI_PATHS

ITEM_SCHEMA = "itemSchema"
JSON = "application/json"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

Document = dict[str, Any]


def install_openapi(app: FastAPI) -> None:
    """Serve (and cache, as FastAPI does) the document with the fixes above applied."""
    build: Callable[[], Document] = app.openapi  # FastAPI's: builds once, caches the result

    def openapi() -> Document:
        if app.openapi_schema is None:
            document = build()
            # Only the fixed document is cached: a failure below leaves nothing behind.
            app.openapi_schema = None
            app.openapi_schema = as_declared_version(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def as_declared_version(document: Document) -> Document:
    """``document`` with its 3.2 stream bodies in 3.1's form (in place; also returned)."""
    for path, item in document.get("paths", {}).items():
        if path.startswith(OPENAI_PATHS):
            # FastAPI documents its 422 on every route with parameters; the OpenAI routes
            # answer an invalid request 400 in OpenAI's shape instead (api/errors.py).
            for method in _METHODS:
                if isinstance(operation := item.get(method), dict):
                    operation.get("responses", {}).pop("422", None)
    for operation in _operations(document):
        streamed = set()
        for body in _bodies(operation):
            for media_type, media in body.get("content", {}).items():
                if ITEM_SCHEMA in media:
                    body["content"][media_type] = _as_string_stream(media_type, media)
                    streamed.add(media_type)
        for status, response in operation.get("responses", {}).items():
            if str(status)[:1] in "45" and "content" in response:
                response["content"] = _errors_as_json(response["content"], streamed)
    return document


def _as_string_stream(media_type: str, media: dict[str, Any]) -> dict[str, Any]:
    rest = {key: value for key, value in media.items() if key not in (ITEM_SCHEMA, "schema")}
    item = dict(media[ITEM_SCHEMA])
    item.setdefault("description", f"One item of the {media_type} stream")
    return {"schema": item, **rest}


def _errors_as_json(content: dict[str, Any], streamed: set[str]) -> dict[str, Any]:
    moved: dict[str, Any] = {}
    for media_type, media in content.items():
        key = JSON if media_type in streamed and JSON not in content else media_type
        moved.setdefault(key, media)
    return moved


def _operations(document: Document) -> Iterator[dict[str, Any]]:
    """Every operation: under ``paths`` and ``webhooks``, and their callbacks'."""
    path_items = [*document.get("paths", {}).values(), *document.get("webhooks", {}).values()]
    while path_items:
        item = path_items.pop()
        for method in _METHODS:
            if isinstance(operation := item.get(method), dict):
                yield operation
                for callback in operation.get("callbacks", {}).values():
                    path_items.extend(callback.values())


def _bodies(operation: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The request body and the responses: the objects that hold ``content``."""
    if isinstance(body := operation.get("requestBody"), dict):
        yield body
    yield from operation.get("responses", {}).values()

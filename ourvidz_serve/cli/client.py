"""HTTP for the command line: one httpx client, contract errors as CliError, SSE parsing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from ourvidz_serve.cli.common import DEV_KEY_FILE, CliError, Connection

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
REQUEST_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
STREAM_READ_TIMEOUT_S = 90.0
"""The service sends keep-alive comments on an idle stream, so silence this long is a loss."""
STREAM_RETRIES = 5


# --- errors ---------------------------------------------------------------------------------


def describe_error_body(status: int, reason: str, body: str) -> str:
    """``code: message`` from the contract's error body, else ``HTTP status reason: body``.

    Validation errors with more than one problem list the others below the first.
    """
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and "code" in error and "message" in error:
        text = f"{error['code']}: {error['message']}"
        details = error.get("details")
        if isinstance(details, list) and len(details) > 1:
            for item in details[1:]:
                if isinstance(item, dict) and "msg" in item:
                    where = ".".join(str(p) for p in item.get("loc") or () if p != "body")
                    text += f"\n  - {where}: {item['msg']}" if where else f"\n  - {item['msg']}"
        return text
    snippet = " ".join(body.split())[:200]
    head = f"HTTP {status} {reason}".rstrip()
    return f"{head}: {snippet}" if snippet else head


def _hint(status: int, connection: Connection) -> str | None:
    if status == 401:
        if connection.api_key is None:
            return (
                f"no API key: give --api-key, set OURVIDZ_API_KEY, or run from the directory "
                f"where `make serve` keeps .ourvidz/{DEV_KEY_FILE}"
            )
        return f"the service refused the API key (from {connection.api_key_source})"
    return None


def api_error(response: httpx.Response, connection: Connection) -> CliError:
    try:
        body = response.text
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        body = ""
    message = describe_error_body(response.status_code, response.reason_phrase, body)
    hint = _hint(response.status_code, connection)
    retry_after = response.headers.get("Retry-After")
    if response.status_code == 429 and retry_after:
        hint = f"retry after {retry_after} s"
    return CliError(message, hint=hint)


def unreachable(url: str) -> CliError:
    return CliError(f"cannot reach {url}: is the service running? (make serve)")


# --- the client -----------------------------------------------------------------------------


class ApiClient:
    """Requests to the service with the connection's credential; errors become CliError."""

    def __init__(self, connection: Connection, transport: httpx.BaseTransport | None = None):
        self.connection = connection
        headers = {"User-Agent": "ourvidz-serve-cli"}
        if connection.api_key:
            headers["Authorization"] = f"Bearer {connection.api_key}"
        self._http = httpx.Client(
            base_url=connection.url, headers=headers, timeout=REQUEST_TIMEOUT, transport=transport
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of a 2xx response; anything else raises CliError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise unreachable(self.connection.url) from None
        except httpx.TimeoutException:
            raise CliError(f"{self.connection.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise CliError(f"request to {self.connection.url} failed: {exc}") from None
        if not response.is_success:
            raise api_error(response, self.connection)
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"{method} {path} answered {response.status_code} with a body that is not JSON"
            ) from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def follow_events(
        self,
        job_id: str,
        on_event: Callable[[str, dict[str, Any]], None],
        deadline: float | None = None,
    ) -> str:
        """Read ``GET /v1/jobs/{id}/events`` until the terminal ``status``; return it.

        A dropped stream is reopened (with ``Last-Event-ID``; the service starts every stream
        with the job's current state), up to STREAM_RETRIES times in a row.
        """
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            timeout = httpx.Timeout(STREAM_READ_TIMEOUT_S, connect=10.0)
            problem = "the stream ended before the job did"
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if not response.is_success:
                        response.read()
                        raise api_error(response, self.connection)
                    for event in parse_sse(_until(response.iter_lines(), deadline)):
                        failures = 0
                        if event.id is not None:
                            last_id = event.id
                        data = _json_object(event.data)
                        on_event(event.event, data)
                        status = data.get("status")
                        if event.event == "status" and status in TERMINAL_STATUSES:
                            return str(status)
            except httpx.ConnectError:
                if failures >= STREAM_RETRIES or last_id is None:
                    raise unreachable(self.connection.url) from None
                problem = "cannot reach the service"
            except httpx.TimeoutException:
                problem = f"no event or keep-alive for {STREAM_READ_TIMEOUT_S:.0f} s"
            except httpx.TransportError as exc:
                problem = f"the stream broke ({type(exc).__name__})"
            _check_deadline(deadline)
            failures += 1
            if failures > STREAM_RETRIES:
                raise CliError(f"lost the event stream of job {job_id}: {problem}")
            time.sleep(min(0.5 * 2**failures, 5.0))


class WaitTimedOut(CliError):
    pass


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimedOut("timed out")


def _until(lines: Iterable[str], deadline: float | None) -> Iterator[str]:
    for line in lines:
        _check_deadline(deadline)
        yield line


def _json_object(data: str) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {"data": data}
    return value if isinstance(value, dict) else {"data": value}


# --- Server-Sent Events ---------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Events from the lines of a ``text/event-stream`` (the WHATWG rules, minus retry).

    A blank line dispatches; ``:`` starts a comment; ``field: value`` loses one leading
    space; several ``data`` lines join with newlines; an event without data is dropped; the
    type defaults to ``message``; an ``id`` lasts until replaced.
    """
    event_type, last_id = "", None
    data_lines: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data_lines:
                yield SseEvent(event_type or "message", "\n".join(data_lines), last_id)
            event_type, data_lines = "", []
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data_lines.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
    # A stream that ends without a blank line does not dispatch its last event (per spec).


# --- downloads ------------------------------------------------------------------------------


def file_name_from_url(url: str, fallback: str) -> str:
    """The last path segment of a (signed) URL, or ``fallback`` when that is not a plain name."""
    name = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    if not name or name in (".", "..") or "\\" in name or "\0" in name:
        return fallback
    return name


def download(url: str, target: Path, timeout: httpx.Timeout = REQUEST_TIMEOUT) -> int:
    """Save ``url`` as ``target`` (via a temporary file); return the bytes written.

    Asset URLs are signed (local storage) or presigned (S3): they are fetched with no
    Authorization header, which S3 would refuse and must not see anyway.
    """
    partial = target.with_name(f".{target.name}.part")
    size = 0
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=True) as plain,
            plain.stream("GET", url) as response,
        ):
            if not response.is_success:
                response.read()
                message = describe_error_body(
                    response.status_code, response.reason_phrase, response.text
                )
                raise CliError(f"downloading {target.name} failed: {message}")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    size += len(chunk)
        partial.replace(target)
    except httpx.ConnectError:
        raise CliError(f"downloading {target.name}: cannot reach {_origin(url)}") from None
    except httpx.TransportError as exc:
        raise CliError(f"downloading {target.name} failed: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return size


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"

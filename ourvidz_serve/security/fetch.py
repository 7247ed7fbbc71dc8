"""SSRF-safe fetching of reference image URLs.

Every hop (the URL and each redirect) goes through the same checks:

* scheme ``https`` (``http`` too only with ``allow_http`` or for an allowed origin), no
  credentials in the URL, a port that is not on the fetch standard's list of bad ports;
* the host is resolved **once**; every address of the answer must pass
  :func:`~ourvidz_serve.security.addresses.address_refusal` (one refused address refuses the
  whole answer, which defeats mixed public/private answers);
* the connection is pinned to the checked address: the request goes to the IP itself, with the
  original ``Host`` header and, for https, the original name for SNI and certificate
  verification (httpcore's ``sni_hostname`` request extension). No second DNS lookup happens,
  so DNS rebinding between check and connect is impossible.

Redirects are followed by hand (at most ``max_redirects``), the body is read as a stream with a
byte cap (and refused early on a larger ``Content-Length``), the whole fetch runs under one time
limit, and no proxy, netrc or cookie is ever taken from the environment or kept between fetches.

``allowed_origins`` exists for tests only: an origin written ``scheme://ip-literal:port`` whose
URLs are fetched although their address would be refused (e.g. one loopback test server). It
matches only URLs that spell that IP literally; a host name never matches.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from ourvidz_serve.errors import UrlRefused
from ourvidz_serve.security.addresses import IPAddress, address_refusal, parse_literal

Resolver = Callable[[str, int], Awaitable[list[str]]]

FIELD = "reference_image_url"
MAX_URL_LENGTH = 4096
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}

# The WHATWG Fetch standard's "bad ports": services a browser never lets a page talk to.
BAD_PORTS = frozenset(
    {
        0, 1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87,
        95, 101, 102, 103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143,
        161, 179, 389, 427, 465, 512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556,
        563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190,
        5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
    }
)  # fmt: skip

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

_HEADERS = {
    "Accept": "image/png, image/jpeg, image/webp",
    # Content codings are refused: a compressed body could expand far beyond the byte cap
    # before it could be counted.
    "Accept-Encoding": "identity",
    "User-Agent": "ourvidz-serve-reference-fetcher/1",
    "Connection": "close",
}


class FetchSettings(Protocol):
    @property
    def reference_max_bytes(self) -> int: ...
    @property
    def reference_fetch_timeout_s(self) -> float: ...
    @property
    def reference_fetch_allow_http(self) -> bool: ...
    @property
    def reference_fetch_allowed_origins(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class _Origin:
    scheme: str
    address: IPAddress
    port: int


@dataclass(frozen=True)
class _Target:
    """Where one request goes: the URL to send (host = the checked IP) and its extras."""

    url: httpx.URL
    headers: dict[str, str]
    extensions: dict[str, str]


def _refuse(reason: str, code: str) -> UrlRefused:
    return UrlRefused(f"{FIELD} refused: {reason}", details={"reason": code})


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` once with the event loop's ``getaddrinfo`` (TCP addresses only)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_allowed_origin(text: str) -> _Origin:
    """``scheme://ip-literal:port`` (port optional, default for the scheme) or ValueError."""
    try:
        url = httpx.URL(text.strip())
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"allowed origin {text!r} is not a URL") from exc
    if url.scheme not in DEFAULT_PORTS:
        raise ValueError(f"allowed origin {text!r} must be http or https")
    address = parse_literal(url.host)
    if address is None:
        raise ValueError(f"allowed origin {text!r} must name an IP address, not a host name")
    if url.userinfo or url.query or url.fragment or url.path not in ("", "/"):
        raise ValueError(f"allowed origin {text!r} must be scheme://ip:port only")
    return _Origin(url.scheme, address, url.port or DEFAULT_PORTS[url.scheme])


class ReferenceFetcher:
    """Fetch reference images from user-given URLs without reaching internal addresses."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float,
        allow_http: bool = False,
        max_redirects: int = 3,
        allowed_origins: Sequence[str] = (),
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests only); ``resolver`` replaces DNS."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_http = allow_http
        self.max_redirects = max_redirects
        self.allowed_origins = frozenset(parse_allowed_origin(o) for o in allowed_origins)
        self._resolve = resolver or system_resolver
        if transport is None:
            # No keep-alive: a connection set up (and its certificate verified) for one
            # host name must never be reused for another name that pins the same IP.
            transport = httpx.AsyncHTTPTransport(
                retries=0,
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=0),
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout_s),
            # Never store cookies: they would be sent to the next fetch of the same IP.
            cookies=http.cookiejar.CookieJar(
                policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
            ),
            headers=_HEADERS,
        )

    @classmethod
    def from_settings(cls, settings: FetchSettings) -> ReferenceFetcher:
        return cls(
            max_bytes=settings.reference_max_bytes,
            timeout_s=settings.reference_fetch_timeout_s,
            allow_http=settings.reference_fetch_allow_http,
            allowed_origins=list(settings.reference_fetch_allowed_origins),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``; raises :class:`UrlRefused` with the reason otherwise."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise _refuse(f"took longer than {self.timeout_s:g} s", "timeout") from None

    # -- the steps ----------------------------------------------------------------------------

    async def _fetch(self, url: str) -> bytes:
        if len(url) > MAX_URL_LENGTH:
            raise _refuse(f"URL longer than {MAX_URL_LENGTH} characters", "url_too_long")
        try:
            current = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise _refuse("not a valid URL", "invalid_url") from exc

        for redirects in range(self.max_redirects + 1):
            target = await self._check(current)
            try:
                async with self._client.stream(
                    "GET", target.url, headers=target.headers, extensions=target.extensions
                ) as response:
                    if response.status_code in REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise _refuse(
                                f"redirect (HTTP {response.status_code}) without a Location",
                                "bad_redirect",
                            )
                        if redirects == self.max_redirects:
                            raise _refuse(
                                f"more than {self.max_redirects} redirects", "too_many_redirects"
                            )
                        try:
                            current = current.join(location)
                        except (httpx.InvalidURL, ValueError, TypeError) as exc:
                            raise _refuse("redirect to an invalid URL", "bad_redirect") from exc
                        continue
                    return await self._read_body(response)
            except httpx.TimeoutException as exc:
                raise _refuse(f"took longer than {self.timeout_s:g} s", "timeout") from exc
            except httpx.ConnectError as exc:
                raise _refuse("could not connect to the server", "connect_failed") from exc
            except httpx.RemoteProtocolError as exc:
                raise _refuse("the server sent an invalid HTTP response", "bad_response") from exc
            except httpx.HTTPError as exc:
                raise _refuse("the transfer failed", "transfer_failed") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_body(self, response: httpx.Response) -> bytes:
        status = response.status_code
        if not 200 <= status < 300:
            raise _refuse(f"the server answered HTTP {status}", "bad_status")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _refuse(f"compressed responses ({encoding}) are not accepted", "encoded")
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise _refuse(
                f"the response declares {int(declared)} bytes, more than the limit of "
                f"{self.max_bytes}",
                "too_large",
            )
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > self.max_bytes:
                # Leaving the stream context closes the (unfinished) connection.
                raise _refuse(f"the response is larger than {self.max_bytes} bytes", "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _check(self, url: httpx.URL) -> _Target:
        """Apply every rule to ``url`` and say where to connect; raise UrlRefused otherwise."""
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise _refuse(f"scheme {scheme or '(none)'!r} is not allowed", "scheme")
        if url.userinfo:
            raise _refuse("credentials in the URL are not allowed", "userinfo")
        if not url.raw_host:
            raise _refuse("the URL has no host", "invalid_url")
        port = url.port if url.port is not None else DEFAULT_PORTS[scheme]
        if not 0 < port < 65536 or port in BAD_PORTS:
            raise _refuse(f"port {port} is not allowed", "port")

        literal = parse_literal(url.host)
        if literal is not None:
            if _Origin(scheme, _plain(literal), port) in self.allowed_origins:
                return _Target(url=url, headers={}, extensions={})
            reason = address_refusal(literal)
            if reason is not None:
                raise _refuse(f"{url.host} is a {reason} address", "address")
            self._check_scheme(scheme)
            return _Target(url=url, headers={}, extensions={})

        host = url.raw_host.decode("ascii", errors="replace")
        if not _is_hostname(host):
            raise _refuse("the URL's host is not a valid host name", "invalid_url")
        self._check_scheme(scheme)
        try:
            answers = await self._resolve(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            raise _refuse("the host name could not be resolved", "unresolvable") from exc
        if not answers:
            raise _refuse("the host name could not be resolved", "unresolvable")
        addresses: list[IPAddress] = []
        for answer in answers:
            address = parse_literal(str(answer))
            if address is None:
                raise _refuse("the host name resolved to an invalid address", "address")
            reason = address_refusal(address)
            if reason is not None:
                raise _refuse(f"resolves to a {reason} address", "address")
            addresses.append(address)

        pinned = url.copy_with(host=str(_plain(addresses[0])))
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        return _Target(
            url=pinned, headers={"Host": url.netloc.decode("ascii")}, extensions=extensions
        )

    def _check_scheme(self, scheme: str) -> None:
        if scheme == "http" and not self.allow_http:
            raise _refuse("plain http is not allowed; use https", "scheme")


def _is_hostname(host: str) -> bool:
    """A DNS name: letters, digits, ``-`` and ``_`` in labels of 1-63, 253 at most in all."""
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _plain(address: IPAddress) -> IPAddress:
    """The address without an IPv6 zone index."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return ipaddress.IPv6Address(int(address))
    return address

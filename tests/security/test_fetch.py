"""SSRF-safe reference fetching.

Only loopback addresses ever receive a packet here: real servers listen on 127.0.0.1, public
names are answered by fake resolvers, and requests to public addresses go to in-memory
transports that record them instead of connecting anywhere.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from ourvidz_serve.errors import InvalidRequest, UrlRefused
from ourvidz_serve.security import fetch as fetch_module
from ourvidz_serve.security.fetch import ReferenceFetcher, Resolver, parse_allowed_origin

MB = 1024 * 1024


def make_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (20, 200, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = make_png()


# -- a tiny loopback HTTP server ----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]


Handler = Callable[["LoopbackServer", Seen, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 that records every connection and request."""

    ssl_context: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    server_names: list[str | None] = field(default_factory=list)
    handlers_done: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def origin(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> LoopbackServer:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers_done.clear()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            seen = Seen(method, target, headers)
            self.requests.append(seen)
            path = urlsplit(target).path
            handler = ROUTES.get(path.rstrip("0123456789") if path.startswith("/chain/") else path)
            await (handler or not_found)(self, seen, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()
            self.handlers_done.set()


async def respond(
    writer: asyncio.StreamWriter,
    status: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    all_headers = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
    writer.write(head.encode("latin-1") + b"\r\n" + body)
    await writer.drain()


async def not_found(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    await respond(writer, "404 Not Found", b"nothing here")


async def image(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    await respond(writer, "200 OK", PNG, {"Content-Type": "image/png"})


async def redirect(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    location = parse_qs(urlsplit(seen.target).query)["to"][0]
    await respond(writer, "302 Found", headers={"Location": location})


async def chain(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    remaining = int(urlsplit(seen.target).path.rsplit("/", 1)[1])
    if remaining == 0:
        await image(server, seen, writer)
    else:
        await respond(writer, "301 Moved Permanently", headers={"Location": str(remaining - 1)})


async def huge(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    """50 MB without a Content-Length (the end is the connection closing)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
    block = b"\x89PNG" + b"\x00" * (64 * 1024 - 4)
    server.sent["/huge"] = 0
    while server.sent["/huge"] < 50 * MB:
        writer.write(block)
        await writer.drain()
        server.sent["/huge"] += len(block)


async def huge_declared(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(
        f"HTTP/1.1 200 OK\r\nContent-Length: {50 * MB}\r\nConnection: close\r\n\r\n".encode()
    )
    writer.write(b"\x00" * 1024)
    await writer.drain()
    await asyncio.sleep(30)


async def slow(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)
    await image(server, seen, writer)


async def trickle(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    """Each byte comes quickly, but the whole body never finishes in time."""
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(PNG)}\r\n\r\n".encode())
    for index in range(len(PNG)):
        writer.write(PNG[index : index + 1])
        await writer.drain()
        await asyncio.sleep(0.05)


async def gzipped(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    await respond(writer, "200 OK", PNG, {"Content-Encoding": "gzip"})


async def no_location(server: LoopbackServer, seen: Seen, writer: asyncio.StreamWriter) -> None:
    await respond(writer, "302 Found")


ROUTES: dict[str, Handler] = {
    "/image.png": image,
    "/redirect": redirect,
    "/chain/": chain,
    "/huge": huge,
    "/huge-declared": huge_declared,
    "/slow": slow,
    "/trickle": trickle,
    "/gzip": gzipped,
    "/no-location": no_location,
}


@pytest.fixture
async def server() -> AsyncIterator[LoopbackServer]:
    started = await LoopbackServer().start()
    yield started
    await started.stop()


@pytest.fixture
async def other_server() -> AsyncIterator[LoopbackServer]:
    started = await LoopbackServer().start()
    yield started
    await started.stop()


@pytest.fixture
async def fetcher(server: LoopbackServer) -> AsyncIterator[ReferenceFetcher]:
    async with fetcher_with(allowed_origins=[server.origin]) as made:
        yield made


def fake_resolver(
    answers: dict[str, list[str]], calls: list[str] | None = None
) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise OSError(f"unknown host {host}")
        return list(answers[host])

    return resolve


class RecordingTransport(httpx.AsyncBaseTransport):
    """Answers from memory; records each request instead of connecting anywhere."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self._answer = answer or (lambda request: httpx.Response(200, content=PNG))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._answer(request)


IMAGES_EXAMPLE = {"images.example.com": ["93.184.215.14"]}


class FetcherOptions(TypedDict, total=False):
    allow_http: bool
    allowed_origins: Sequence[str]
    resolver: Resolver
    transport: httpx.AsyncBaseTransport


@asynccontextmanager
async def fetcher_with(
    answers: dict[str, list[str]] | None = None,
    calls: list[str] | None = None,
    timeout_s: float = 2,
    **options: Unpack[FetcherOptions],
) -> AsyncIterator[ReferenceFetcher]:
    """A 1 MB fetcher (2 s unless told), closed on exit; ``answers`` make a fake resolver."""
    if answers is not None:
        options["resolver"] = fake_resolver(answers, calls)
    made = ReferenceFetcher(max_bytes=MB, timeout_s=timeout_s, **options)
    try:
        yield made
    finally:
        await made.aclose()


async def refusal(
    url: str,
    answers: dict[str, list[str]] | None = None,
    calls: list[str] | None = None,
    timeout_s: float = 2,
    **options: Unpack[FetcherOptions],
) -> UrlRefused:
    """How a fresh :func:`fetcher_with` fetcher refuses ``url`` (closed afterwards)."""
    async with fetcher_with(answers, calls, timeout_s, **options) as fetcher:
        return await refused(fetcher, url)


async def refused(fetcher: ReferenceFetcher, url: str) -> UrlRefused:
    with pytest.raises(UrlRefused) as caught:
        await fetcher.fetch(url)
    error = caught.value
    assert isinstance(error, InvalidRequest)
    assert error.status_code == 422 and error.code == "reference_url_refused"
    assert error.message.startswith("reference_image_url refused: ")
    assert "Traceback" not in error.message
    return error


# -- the allowed (test) origin ------------------------------------------------------------------


async def test_the_allowed_origin_is_fetched(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    assert await fetcher.fetch(f"{server.origin}/image.png") == PNG
    assert server.requests[0].target == "/image.png"
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"
    assert server.requests[0].headers["accept-encoding"] == "identity"


async def test_another_loopback_port_is_refused_without_a_connection(
    fetcher: ReferenceFetcher, other_server: LoopbackServer
) -> None:
    error = await refused(fetcher, f"{other_server.origin}/image.png")
    assert "loopback" in error.message
    assert other_server.connections == 0


async def test_the_connection_counter_does_count(other_server: LoopbackServer) -> None:
    async with fetcher_with(allowed_origins=[other_server.origin]) as allowing:
        assert await allowing.fetch(f"{other_server.origin}/image.png") == PNG
    assert other_server.connections == 1


async def test_localhost_never_matches_an_allowed_origin(server: LoopbackServer) -> None:
    calls: list[str] = []
    error = await refusal(
        f"http://localhost:{server.port}/image.png",
        {"localhost": ["127.0.0.1", "::1"]},
        calls=calls,
        allow_http=True,
        allowed_origins=[server.origin],
    )
    assert "resolves to a loopback address" in error.message
    assert calls == ["localhost"]
    assert server.connections == 0


async def test_a_numeric_host_name_resolving_to_loopback_is_refused(
    server: LoopbackServer,
) -> None:
    # The system resolver turns "2130706433" into 127.0.0.1 by itself (no DNS query).
    error = await refusal(
        f"http://2130706433:{server.port}/image.png",
        allow_http=True,
        allowed_origins=[server.origin],
    )
    assert "loopback" in error.message
    assert server.connections == 0


async def test_a_redirect_from_the_allowed_origin_to_another_port_is_refused(
    fetcher: ReferenceFetcher, server: LoopbackServer, other_server: LoopbackServer
) -> None:
    target = f"{other_server.origin}/image.png"
    error = await refused(fetcher, f"{server.origin}/redirect?to={target}")
    assert "loopback" in error.message
    assert server.connections == 1
    assert other_server.connections == 0


async def test_redirects_within_the_allowed_origin_are_followed(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    assert await fetcher.fetch(f"{server.origin}/chain/3") == PNG
    assert [seen.target for seen in server.requests] == [
        "/chain/3",
        "/chain/2",
        "/chain/1",
        "/chain/0",
    ]


async def test_more_than_three_redirects_are_refused(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    error = await refused(fetcher, f"{server.origin}/chain/4")
    assert "more than 3 redirects" in error.message
    assert len(server.requests) == 4


async def test_a_redirect_without_location_is_refused(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    error = await refused(fetcher, f"{server.origin}/no-location")
    assert "Location" in error.message


async def test_a_redirect_to_another_scheme_is_refused(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    error = await refused(fetcher, f"{server.origin}/redirect?to=file:///etc/passwd")
    assert "scheme" in error.message


async def test_a_non_2xx_status_is_refused(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    error = await refused(fetcher, f"{server.origin}/missing")
    assert "HTTP 404" in error.message


# -- size and time ------------------------------------------------------------------------------


async def test_an_oversized_body_is_cut_off(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    started = time.perf_counter()
    error = await refused(fetcher, f"{server.origin}/huge")
    assert "larger than 1048576 bytes" in error.message
    assert time.perf_counter() - started < 2.0
    await asyncio.wait_for(server.handlers_done.wait(), 5)
    # The client closed the connection: the server could not push the whole 50 MB.
    assert server.sent["/huge"] < 25 * MB


async def test_an_oversized_content_length_is_refused_early(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    started = time.perf_counter()
    error = await refused(fetcher, f"{server.origin}/huge-declared")
    assert "declares 52428800 bytes" in error.message
    assert time.perf_counter() - started < 1.0


async def test_a_slow_server_is_refused(server: LoopbackServer) -> None:
    async with fetcher_with(timeout_s=0.3, allowed_origins=[server.origin]) as fetcher:
        started = time.perf_counter()
        error = await refused(fetcher, f"{server.origin}/slow")
    assert "took longer than 0.3 s" in error.message
    assert time.perf_counter() - started < 1.5


async def test_the_time_limit_covers_the_whole_fetch(server: LoopbackServer) -> None:
    # Every read succeeds well within the limit; the total does not.
    async with fetcher_with(timeout_s=0.5, allowed_origins=[server.origin]) as fetcher:
        started = time.perf_counter()
        error = await refused(fetcher, f"{server.origin}/trickle")
    assert "took longer" in error.message
    assert time.perf_counter() - started < 2.0


async def test_compressed_bodies_are_refused(
    fetcher: ReferenceFetcher, server: LoopbackServer
) -> None:
    error = await refused(fetcher, f"{server.origin}/gzip")
    assert "gzip" in error.message


# -- URL rules ----------------------------------------------------------------------------------


async def test_http_is_refused_without_allow_http_for_other_origins(
    other_server: LoopbackServer,
) -> None:
    transport = RecordingTransport()
    async with fetcher_with(IMAGES_EXAMPLE, transport=transport) as fetcher:
        error = await refused(fetcher, "http://images.example.com/a.png")
        assert "http" in error.message
        await refused(fetcher, f"{other_server.origin}/image.png")
    assert transport.requests == []
    assert other_server.connections == 0


async def test_http_is_allowed_with_allow_http() -> None:
    transport = RecordingTransport()
    async with fetcher_with(IMAGES_EXAMPLE, allow_http=True, transport=transport) as fetcher:
        assert await fetcher.fetch("http://images.example.com/a.png") == PNG
    (request,) = transport.requests
    assert str(request.url) == "http://93.184.215.14/a.png"
    assert request.headers["host"] == "images.example.com"
    assert "sni_hostname" not in request.extensions


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://user:secret@images.example.com/a.png", "credentials"),
        ("https://user@images.example.com/a.png", "credentials"),
        ("ftp://images.example.com/a.png", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://images.example.com/", "scheme"),
        ("images.example.com/a.png", "scheme"),
        ("https:///a.png", "no host"),
        ("https://images.example.com:22/a.png", "port 22"),
        ("https://images.example.com:0/a.png", "port 0"),
        ("https://images.example.com:99999/a.png", "port 99999"),
        ("https://[::1]/a.png", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://[::ffff:127.0.0.1]/a.png", "IPv4-mapped loopback"),
        ("https://10.0.0.1/a.png", "private"),
        ("https://unknown.example/a.png", "could not be resolved"),
        ("https://images.example.com/" + "a" * 5000, "longer than"),
        ("https://exa mple.com/", "not a valid host name"),
        ("https://a%00b.example/", "not a valid host name"),
        ("https://-a.example/", "not a valid host name"),
        ("https://a..b.example/", "not a valid host name"),
        ("https://[fe80::1%25eth0]/", "link-local"),
        ("https://[::1/", "not a valid URL"),
    ],
)
async def test_urls_breaking_the_rules_are_refused_without_a_request(url: str, reason: str) -> None:
    transport = RecordingTransport()
    error = await refusal(url, IMAGES_EXAMPLE, transport=transport)
    assert reason in error.message
    assert transport.requests == []


# -- resolution and pinning (no network: fake resolver, recording transport) ----------------------


async def test_a_mixed_public_and_loopback_answer_is_refused_before_connecting() -> None:
    transport = RecordingTransport()
    calls: list[str] = []
    answers = {"rebind.example": ["8.8.8.8", "127.0.0.1"]}
    async with fetcher_with(answers, calls=calls, transport=transport) as fetcher:
        started = time.perf_counter()
        error = await refused(fetcher, "https://rebind.example/a.png")
    assert time.perf_counter() - started < 0.5
    assert "resolves to a loopback address" in error.message
    assert calls == ["rebind.example"]
    assert transport.requests == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("fd00::1", "unique local"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("not-an-address", "invalid address"),
    ],
)
async def test_names_resolving_to_refused_addresses_are_refused(answer: str, reason: str) -> None:
    transport = RecordingTransport()
    error = await refusal(
        "https://images.example.com/a.png",
        {"images.example.com": ["93.184.215.14", answer]},
        transport=transport,
    )
    assert reason in error.message
    assert transport.requests == []


async def test_a_public_name_is_pinned_to_its_checked_address() -> None:
    transport = RecordingTransport()
    calls: list[str] = []
    async with fetcher_with(IMAGES_EXAMPLE, calls=calls, transport=transport) as fetcher:
        assert await fetcher.fetch("https://images.example.com/pics/a.png?size=large") == PNG
        assert await fetcher.fetch("https://images.example.com:8443/b.png") == PNG
    first, second = transport.requests
    assert first.url.scheme == "https"
    assert first.url.host == "93.184.215.14"
    assert first.url.raw_path == b"/pics/a.png?size=large"
    assert first.headers["host"] == "images.example.com"
    assert first.extensions["sni_hostname"] == "images.example.com"
    assert second.url.host == "93.184.215.14" and second.url.port == 8443
    assert second.headers["host"] == "images.example.com:8443"
    assert second.extensions["sni_hostname"] == "images.example.com"
    assert calls == ["images.example.com", "images.example.com"]
    assert "cookie" not in second.headers


async def test_an_ipv6_answer_is_pinned_in_brackets() -> None:
    transport = RecordingTransport()
    answers = {"v6.example": ["2606:4700:4700::1111"]}
    async with fetcher_with(answers, transport=transport) as fetcher:
        await fetcher.fetch("https://v6.example/a.png")
    (request,) = transport.requests
    assert str(request.url) == "https://[2606:4700:4700::1111]/a.png"
    assert request.headers["host"] == "v6.example"


async def test_a_name_is_resolved_once_per_hop_so_rebinding_cannot_redirect_the_connection() -> (
    None
):
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    transport = RecordingTransport()
    async with fetcher_with(resolver=rebinding, transport=transport) as fetcher:
        await fetcher.fetch("https://rebinding.example/a.png")
    (request,) = transport.requests
    assert request.url.host == "93.184.215.14"


async def test_a_redirect_to_a_private_name_is_refused() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "https://internal.example/admin"})

    transport = RecordingTransport(answer)
    error = await refusal(
        "https://images.example.com/a.png",
        {**IMAGES_EXAMPLE, "internal.example": ["10.1.2.3"]},
        transport=transport,
    )
    assert "resolves to a private address" in error.message
    assert len(transport.requests) == 1


async def test_a_redirect_to_plain_http_is_refused() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "http://images.example.com/a.png"})

    transport = RecordingTransport(answer)
    error = await refusal("https://images.example.com/a.png", IMAGES_EXAMPLE, transport=transport)
    assert "plain http" in error.message
    assert len(transport.requests) == 1


async def test_cookies_are_never_kept_between_fetches() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=PNG, headers={"Set-Cookie": "session=secret; Path=/"})

    transport = RecordingTransport(answer)
    answers = {"a.example": ["93.184.215.14"], "b.example": ["93.184.215.14"]}
    async with fetcher_with(answers, transport=transport) as fetcher:
        await fetcher.fetch("https://a.example/x.png")
        await fetcher.fetch("https://b.example/y.png")
    assert "cookie" not in transport.requests[1].headers


# -- configuration ------------------------------------------------------------------------------


def test_allowed_origins_must_be_ip_literal_origins() -> None:
    origin = parse_allowed_origin("http://127.0.0.1:43123")
    assert (origin.scheme, origin.address, origin.port) == (
        "http",
        ipaddress.ip_address("127.0.0.1"),
        43123,
    )
    assert parse_allowed_origin("https://[::1]").port == 443
    for bad in ("http://localhost:8000", "ftp://127.0.0.1:21", "http://127.0.0.1:1/path", "x"):
        with pytest.raises(ValueError):
            parse_allowed_origin(bad)


async def test_from_settings_reads_the_reference_settings(server: LoopbackServer) -> None:
    from ourvidz_serve.settings import Settings

    settings = Settings(
        reference_max_bytes=2048,
        reference_fetch_timeout_s=3.5,
        reference_fetch_allow_http=True,
        reference_fetch_allowed_origins=f"{server.origin}",
    )
    fetcher = ReferenceFetcher.from_settings(settings)
    try:
        assert fetcher.max_bytes == 2048
        assert fetcher.timeout_s == 3.5
        assert fetcher.allow_http is True
        assert await fetcher.fetch(f"{server.origin}/image.png") == PNG
    finally:
        await fetcher.aclose()


# -- real TLS on loopback: the pinned connection verifies the certificate of the name ------------


@dataclass
class Pki:
    ca_pem: bytes
    cert_path: Path
    key_path: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("pki")
    cert_path = directory / "leaf.pem"
    key_path = directory / "leaf.key"
    cert_path.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(ca_cert.public_bytes(serialization.Encoding.PEM), cert_path, key_path)


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[LoopbackServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_path, pki.key_path)
    loopback = LoopbackServer(ssl_context=context)

    def remember_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        loopback.server_names.append(name)

    context.sni_callback = remember_sni  # type: ignore[assignment]
    started = await loopback.start()
    yield started
    await started.stop()


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki.ca_pem.decode())
    return context


async def test_pinned_https_sends_sni_and_verifies_the_name_over_a_real_connection(
    pki: Pki, tls_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let this one test connect to loopback through the ordinary name path: the fake resolver
    # says images.test is 127.0.0.1 and the address check is relaxed for 127.0.0.1 alone.
    real_refusal = fetch_module.address_refusal

    def loopback_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        return None if str(address) == "127.0.0.1" else real_refusal(address)

    monkeypatch.setattr(fetch_module, "address_refusal", loopback_allowed)
    transport = httpx.AsyncHTTPTransport(
        verify=client_context(pki), limits=httpx.Limits(max_keepalive_connections=0)
    )
    answers = {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    async with fetcher_with(answers, timeout_s=5, transport=transport) as fetcher:
        assert await fetcher.fetch(f"https://images.test:{tls_server.port}/image.png") == PNG
        assert tls_server.server_names == ["images.test"]
        assert tls_server.requests[0].headers["host"] == f"images.test:{tls_server.port}"

        # The certificate is checked against the name, not the pinned IP.
        error = await refused(fetcher, f"https://other.test:{tls_server.port}/image.png")
        assert "could not connect" in error.message
        assert tls_server.server_names[-1] == "other.test"


async def test_without_sni_hostname_the_ip_would_be_verified(
    pki: Pki, tls_server: LoopbackServer
) -> None:
    """What the extension changes: httpx alone verifies the certificate against the IP."""
    async with httpx.AsyncClient(verify=client_context(pki), trust_env=False) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(
                f"https://127.0.0.1:{tls_server.port}/image.png",
                headers={"Host": "images.test"},
            )
        response = await client.get(
            f"https://127.0.0.1:{tls_server.port}/image.png",
            headers={"Host": "images.test"},
            extensions={"sni_hostname": "images.test"},
        )
        assert response.content == PNG

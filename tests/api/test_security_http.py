"""Hostile input over HTTP, in-process over real PostgreSQL and local storage: uploads,
reference URLs, tokens, per-user isolation, limits across two ingress replicas, prompt policy."""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import httpx
import jwt
import pytest
from PIL import Image

from ourvidz_serve.api.app import create_app
from ourvidz_serve.catalog import Queue
from ourvidz_serve.settings import Settings
from tests.api.conftest import JWT_SECRET
from tests.api.test_jobs_http import USER, assert_error, job, row_counts
from tests.conftest import TEST_API_KEY
from tests.inprocess import InProcessModels, TinyRunners, running_workers
from tests.support.loopback_http import loopback_origin, png_bytes

SERVICE = {"Authorization": f"Bearer {TEST_API_KEY}"}


def token(user: UUID | str, **claims: Any) -> str:
    body = {"sub": str(user), "exp": int(time.time()) + 600} | claims
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


def as_user(user: UUID | str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


@contextlib.asynccontextmanager
async def serving(settings: Settings, models: InProcessModels) -> AsyncIterator[httpx.AsyncClient]:
    """One ingress replica: its own app, lifespan and database pool."""
    app = create_app(settings, models)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield http


@pytest.fixture
async def http(secure_settings, tiny_models, repository) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(secure_settings, tiny_models) as client:
        yield client


def upload(image: bytes, name: str = "picture.png", content_type: str = "image/png") -> dict:
    return {"files": {"file": (name, image, content_type)}}


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header that declares ``width`` x ``height`` pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def jpeg_rotated_with_exif() -> bytes:
    """20x10 pixels stored, EXIF orientation 6 (shown rotated: 10x20), and a camera tag."""
    image = Image.new("RGB", (20, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "SecretCam GPS 51.5N"  # Make
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


# Uploads -------------------------------------------------------------------------------------


async def test_an_upload_is_stored_clean_under_the_users_id_and_can_be_downloaded(http):
    response = await http.post(
        "/v1/references",
        data={"user_id": USER},
        headers=SERVICE,
        **upload(jpeg_rotated_with_exif(), "x.png", "image/png"),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["key"].startswith(f"{USER}/") and body["key"].endswith(".jpg")
    assert (body["width"], body["height"], body["format"]) == (10, 20, "jpeg")
    downloaded = await http.get(body["url"].removeprefix("http://127.0.0.1:8000"))
    assert downloaded.status_code == 200
    with Image.open(io.BytesIO(downloaded.content)) as stored:
        assert stored.size == (10, 20)
        assert not stored.getexif(), "EXIF must be stripped"
    assert b"SecretCam" not in downloaded.content


async def test_a_user_uploads_for_themselves_and_not_for_another_user(http):
    mine = await http.post("/v1/references", headers=as_user(USER), **upload(png_bytes()))
    assert mine.status_code == 201, mine.text
    assert mine.json()["key"].startswith(f"{USER}/")
    theirs = await http.post(
        "/v1/references",
        data={"user_id": str(uuid4())},
        headers=as_user(USER),
        **upload(png_bytes()),
    )
    assert_error(theirs, 403, "forbidden", "does not match")
    no_user = await http.post("/v1/references", headers=SERVICE, **upload(png_bytes()))
    assert_error(no_user, 422, "invalid_request", "user_id is required")


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (b"%PDF-1.7 definitely not a picture", "PNG, JPEG"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "PNG, JPEG"),
        (gif_bytes(), "PNG, JPEG"),
        (png_bytes()[:60], ""),
    ],
    ids=["pdf", "svg", "gif", "truncated-png"],
)
async def test_an_upload_that_is_not_an_accepted_image_gets_422(http, image, fragment):
    # The name and the declared type say PNG; only the content counts.
    response = await http.post(
        "/v1/references", data={"user_id": USER}, headers=SERVICE, **upload(image)
    )
    assert_error(response, 422, "invalid_image", fragment)


async def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(http):
    bomb = png_declaring(50_000, 50_000)  # 2.5 gigapixels: 7.5 GB if decoded
    started = time.monotonic()
    response = await http.post(
        "/v1/references", data={"user_id": USER}, headers=SERVICE, **upload(bomb)
    )
    assert_error(response, 422, "invalid_image", "more pixels than the limit")
    assert time.monotonic() - started < 5


async def test_an_oversized_upload_gets_413(secure_settings, tiny_models, repository):
    settings = secure_settings.model_copy(update={"reference_max_bytes": 4096})
    big = png_bytes((400, 400), "white") + b"\0" * 200_000
    async with serving(settings, tiny_models) as client:
        response = await client.post(
            "/v1/references", data={"user_id": USER}, headers=SERVICE, **upload(big)
        )
    assert_error(response, 413, "payload_too_large")


async def test_a_job_may_name_only_its_own_users_reference(http, pool):
    stranger = uuid4()
    stored = await http.post("/v1/references", headers=as_user(stranger), **upload(png_bytes()))
    key = stored.json()["key"]
    stolen = await http.post("/v1/jobs", json=job(reference_image_key=key), headers=SERVICE)
    assert_error(stolen, 422, "invalid_request", "not name one of this user's")
    assert await row_counts(pool) == (0, 0, 0)
    own = await http.post(
        "/v1/jobs",
        json={"job_type": "sdxl_image_fast", "prompt": "a boat", "reference_image_key": key},
        headers=as_user(stranger),
    )
    assert own.status_code == 202, own.text


# Reference URLs (only loopback servers; one loopback origin is allowed for the test) ---------


@pytest.fixture
async def fetching(
    secure_settings, tiny_models, repository
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Any]]:
    with loopback_origin() as allowed, loopback_origin() as other:
        settings = secure_settings.model_copy(
            update={
                "reference_fetch_allowed_origins": [allowed.origin],
                # So that a refusal below is for the address, not for plain http.
                "reference_fetch_allow_http": True,
                "reference_max_bytes": 1_048_576,
            }
        )
        async with serving(settings, tiny_models) as client:
            yield client, allowed, other


async def test_a_reference_url_is_fetched_once_stored_and_the_job_refers_to_its_key(
    fetching, secure_settings, tiny_runners: TinyRunners, pool
):
    client, allowed, _other = fetching
    url = allowed.url("/ok.png")
    response = await client.post("/v1/jobs", json=job(reference_image_url=url), headers=SERVICE)
    assert response.status_code == 202, response.text
    metadata = response.json()["metadata"]
    assert metadata["reference_image_url"] == url
    assert metadata["reference_image_key"].startswith(f"{USER}/")
    assert allowed.hits["/ok.png"] == 1
    async with running_workers(secure_settings, tiny_runners, queues=(Queue.SDXL,)):
        finished = await wait_for_terminal(client, response.json()["id"])
    assert finished["status"] == "completed", finished
    assert allowed.hits["/ok.png"] == 1, "running the job must not fetch the URL again"


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("other", "loopback"),
        ("localhost", "loopback"),
        ("redirect-to-other", "loopback"),
        ("huge", "bytes"),
        ("metadata", "169.254.169.254"),
        ("ipv4-mapped", "loopback"),
        ("https-private", "private"),
    ],
)
async def test_a_refused_reference_url_gets_422_and_leaves_no_row(fetching, pool, target, fragment):
    client, allowed, other = fetching
    port = allowed.origin.rsplit(":", 1)[1]
    url = {
        "other": other.url("/ok.png"),
        "localhost": f"http://localhost:{port}/ok.png",
        "redirect-to-other": allowed.url(f"/redirect?to={other.url('/ok.png')}"),
        "huge": allowed.url("/huge"),
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "ipv4-mapped": f"http://[::ffff:127.0.0.1]:{port}/ok.png",
        "https-private": "https://10.0.0.1/ok.png",
    }[target]
    response = await client.post("/v1/jobs", json=job(reference_image_url=url), headers=SERVICE)
    assert_error(response, 422, "reference_url_refused", fragment)
    assert await row_counts(pool) == (0, 0, 0)
    assert sum(other.hits.values()) == 0, "no packet may reach a refused address"
    if target == "huge":
        await asyncio.sleep(0.5)
        assert allowed.huge_bytes_sent and allowed.huge_bytes_sent[0] < 64 * 1_048_576


async def wait_for_terminal(client: httpx.AsyncClient, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = (await client.get(f"/v1/jobs/{job_id}", headers=SERVICE)).json()
        if body["status"] in {"completed", "failed", "cancelled"}:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


# Tokens and isolation -----------------------------------------------------------------------


def unsigned_token(user: UUID | str) -> str:
    """``alg: none``: a token anyone can make."""
    return jwt.encode({"sub": str(user), "exp": int(time.time()) + 600}, None, algorithm="none")


@pytest.mark.parametrize(
    ("credential", "fragment"),
    [
        (lambda: token(USER, exp=int(time.time()) - 60), "expired"),
        (
            lambda: jwt.encode({"sub": USER, "exp": int(time.time()) + 600}, "w" * 40, "HS256"),
            "Signature",
        ),
        (lambda: unsigned_token(USER), "alg"),
        (
            lambda: jwt.encode(
                {"sub": USER, "exp": int(time.time()) + 600}, JWT_SECRET * 2, "HS512"
            ),
            "alg",
        ),
        (lambda: jwt.encode({"sub": USER}, JWT_SECRET, "HS256"), "exp"),
        (lambda: jwt.encode({"exp": int(time.time()) + 600}, JWT_SECRET, "HS256"), "sub"),
        (lambda: token("not-a-uuid"), "UUID"),
        (lambda: TEST_API_KEY + "x", "invalid API key"),
        (lambda: TEST_API_KEY[:-1], "invalid API key"),
    ],
    ids=[
        "expired",
        "wrong-secret",
        "alg-none",
        "other-alg",
        "no-exp",
        "no-sub",
        "bad-sub",
        "key-longer",
        "key-shorter",
    ],
)
async def test_a_bad_credential_gets_401_without_echoing_it(http, credential, fragment):
    presented = credential()
    response = await http.get("/v1/jobs", headers={"Authorization": f"Bearer {presented}"})
    assert_error(response, 401, "unauthorized", fragment)
    assert presented not in response.text


async def test_a_token_expired_within_the_leeway_is_still_accepted(http):
    response = await http.get(
        "/v1/jobs", headers={"Authorization": f"Bearer {token(USER, exp=int(time.time()) - 3)}"}
    )
    assert response.status_code == 200, response.text


async def test_a_user_cannot_read_list_or_download_another_users_things(http):
    owner, stranger = uuid4(), uuid4()
    submitted = await http.post(
        "/v1/jobs", json={"job_type": "sdxl_image_fast", "prompt": "a boat"}, headers=as_user(owner)
    )
    job_id = submitted.json()["id"]
    assert_error(await http.get(f"/v1/jobs/{job_id}", headers=as_user(stranger)), 404, "not_found")
    assert (await http.get("/v1/jobs", headers=as_user(stranger))).json()["jobs"] == []
    listed = await http.get(f"/v1/jobs?user_id={owner}", headers=as_user(stranger))
    assert_error(listed, 403, "forbidden")
    # Files: a signed URL is bound to its object; one user's signature opens nothing else.
    mine = (
        await http.post("/v1/references", headers=as_user(stranger), **upload(png_bytes()))
    ).json()
    theirs = (
        await http.post("/v1/references", headers=as_user(owner), **upload(png_bytes((9, 9))))
    ).json()
    my_path = mine["url"].removeprefix("http://127.0.0.1:8000")
    forged = my_path.replace(mine["key"], theirs["key"])
    assert forged != my_path
    assert_error(await http.get(forged), 403, "forbidden", "signature")
    assert (await http.get(my_path)).status_code == 200
    expired_query = my_path.split("?")[0] + "?expires=1&signature=" + "0" * 64
    assert_error(await http.get(expired_query), 403, "forbidden")


# Limits across two ingress replicas -----------------------------------------------------------


async def test_the_per_user_rate_limit_holds_across_two_ingress_replicas(
    secure_settings, tiny_models, repository
):
    settings = secure_settings.model_copy(
        # One request per 10 s refills: nothing refills while the test runs.
        update={"rate_limit_per_user_per_s": 0.1, "rate_limit_per_user_burst": 4}
    )
    user = uuid4()
    async with serving(settings, tiny_models) as first, serving(settings, tiny_models) as second:
        statuses = []
        for replica in (first, second, first, second, first, second):
            response = await replica.get("/v1/jobs", headers=as_user(user))
            statuses.append(response.status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]
        assert_error(response, 429, "rate_limited")
        assert 1 <= int(response.headers["Retry-After"]) <= 10
        # Another user has a budget of their own.
        assert (await second.get("/v1/jobs", headers=as_user(uuid4()))).status_code == 200


async def test_the_per_key_rate_limit_holds_across_two_ingress_replicas(
    secure_settings, tiny_models, repository
):
    settings = secure_settings.model_copy(
        update={"rate_limit_per_key_per_s": 0.1, "rate_limit_per_key_burst": 3}
    )
    async with serving(settings, tiny_models) as first, serving(settings, tiny_models) as second:
        responses = await asyncio.gather(
            *(replica.get("/v1/job-types", headers=SERVICE) for replica in (first, second) * 4)
        )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 3 + [429] * 5
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1


async def test_the_queued_jobs_cap_holds_across_two_ingress_replicas(
    secure_settings, tiny_models, repository, pool
):
    settings = secure_settings.model_copy(
        update={"max_queued_jobs_per_user": 3, "queued_jobs_retry_after_s": 7}
    )
    async with serving(settings, tiny_models) as first, serving(settings, tiny_models) as second:
        # Eight concurrent submissions through both replicas race for three places.
        responses = await asyncio.gather(
            *(
                replica.post("/v1/jobs", json=job(prompt=f"boat {i}"), headers=SERVICE)
                for i, replica in enumerate((first, second) * 4)
            )
        )
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [202] * 3 + [429] * 5
        refused = next(r for r in responses if r.status_code == 429)
        assert_error(refused, 429, "too_many_queued_jobs")
        assert refused.headers["Retry-After"] == "7"
        assert await row_counts(pool) == (3, 3, 0)
        # A replay of an accepted submission is still answered at the cap.
        headers = SERVICE | {"Idempotency-Key": "replay-at-cap"}
        await pool.execute("DELETE FROM jobs WHERE id = (SELECT id FROM jobs LIMIT 1)")
        created = await first.post("/v1/jobs", json=job(prompt="kept"), headers=headers)
        assert created.status_code == 202, created.text
        replayed = await second.post("/v1/jobs", json=job(prompt="kept"), headers=headers)
        assert replayed.status_code == 200 and replayed.json()["id"] == created.json()["id"]
        # Other users are not affected.
        other = await first.post("/v1/jobs", json=job(user_id=str(uuid4())), headers=SERVICE)
        assert other.status_code == 202


# Request size and shape -------------------------------------------------------------------------


async def test_an_oversized_json_body_gets_413_and_leaves_no_row(
    secure_settings, tiny_models, repository, pool
):
    settings = secure_settings.model_copy(update={"max_body_bytes": 4096})
    async with serving(settings, tiny_models) as client:
        response = await client.post(
            "/v1/jobs", json=job(metadata={"note": "x" * 8000}), headers=SERVICE
        )
    assert_error(response, 413, "payload_too_large")
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_body_nested_beyond_parsing_gets_400_not_500(http, pool):
    deep = "[" * 200_000 + "]" * 200_000
    response = await http.post(
        "/v1/jobs", content=deep, headers=SERVICE | {"Content-Type": "application/json"}
    )
    assert response.status_code in (400, 413), response.text
    assert set(response.json()) == {"error"}
    assert await row_counts(pool) == (0, 0, 0)


async def test_metadata_nested_too_deeply_gets_422(http, pool):
    nested: dict = {}
    for _ in range(12):
        nested = {"n": nested}
    response = await http.post("/v1/jobs", json=job(metadata=nested), headers=SERVICE)
    assert_error(response, 422, "invalid_request", "nested")
    assert await row_counts(pool) == (0, 0, 0)


# Prompt policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        job(prompt="nude photo of a 12 year old girl"),
        # The seed's payload shape: the prompt inside metadata.
        {"job_type": "sdxl_image_fast", "user_id": USER, "metadata": {"prompt": "naked kid, nsfw"}},
        job(prompt="a portrait", negative_prompt="n.a.k.e.d c h i l d"),
    ],
    ids=["prompt", "prompt-in-metadata", "negative-prompt"],
)
async def test_a_refused_prompt_gets_422_before_any_row_and_is_not_echoed(http, pool, body):
    response = await http.post("/v1/jobs", json=body, headers=SERVICE)
    assert_error(response, 422, "prompt_refused", "content policy")
    for term in ("nude", "naked", "kid", "child", "12"):
        assert term not in response.json()["error"]["message"]
    assert await row_counts(pool) == (0, 0, 0)

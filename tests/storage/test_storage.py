"""Behaviour every storage backend shares; runs against local and both S3 mappings."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.errors import InvalidRequest, ObjectNotFound
from ourvidz_serve.storage import (
    LOGICAL_BUCKETS,
    MAX_KEY_BYTES,
    Storage,
    asset_key,
    validate_location,
)
from ourvidz_serve.storage.local import LocalStorage, verify_signature

from .conftest import PUBLIC_BASE_URL, SIGNING_KEY

BUCKET = "sdxl_image_fast"
PAYLOAD = bytes(range(256)) * 64


def new_key(name: str = "obj.png") -> str:
    return f"{uuid.uuid4()}/{name}"


async def download(storage: Storage, url: str) -> bytes:
    """Fetch a signed URL the way its consumer would."""
    if isinstance(storage, LocalStorage):
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_BASE_URL
        prefix = "/v1/files/"
        assert parts.path.startswith(prefix)
        bucket, _, key = unquote(parts.path.removeprefix(prefix)).partition("/")
        query = parse_qs(parts.query)
        verify_signature(SIGNING_KEY, bucket, key, int(query["expires"][0]), query["signature"][0])
        path = await storage.open_for_download(bucket, key)
        return path.read_bytes()
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    return response.content


def test_logical_buckets_are_the_job_types_plus_references_workspace_and_loras() -> None:
    assert set(LOGICAL_BUCKETS) == {*JOB_TYPES, "reference_images", "workspace_assets", "loras"}
    assert len(LOGICAL_BUCKETS) == 13


async def test_put_then_get_returns_the_same_bytes(storage: Storage) -> None:
    key = new_key()
    await storage.put(BUCKET, key, PAYLOAD, "image/png")
    assert await storage.get(BUCKET, key) == PAYLOAD


async def test_empty_object_roundtrips(storage: Storage) -> None:
    key = new_key()
    await storage.put("workspace_assets", key, b"", "application/octet-stream")
    assert await storage.get("workspace_assets", key) == b""
    assert await storage.exists("workspace_assets", key)


async def test_put_overwrites_an_existing_object(storage: Storage) -> None:
    key = new_key()
    await storage.put(BUCKET, key, b"first version", "image/png")
    await storage.put(BUCKET, key, b"second", "image/png")
    assert await storage.get(BUCKET, key) == b"second"


async def test_exists_is_true_only_after_put(storage: Storage) -> None:
    key = new_key()
    assert not await storage.exists(BUCKET, key)
    await storage.put(BUCKET, key, b"x", "image/png")
    assert await storage.exists(BUCKET, key)


async def test_same_key_in_another_bucket_is_a_different_object(storage: Storage) -> None:
    key = new_key()
    await storage.put("image_fast", key, b"image", "image/png")
    assert not await storage.exists("image_high", key)
    with pytest.raises(ObjectNotFound):
        await storage.get("image_high", key)


async def test_a_key_prefix_is_not_an_object(storage: Storage) -> None:
    directory = str(uuid.uuid4())
    await storage.put(BUCKET, f"{directory}/a.png", b"a", "image/png")
    assert not await storage.exists(BUCKET, directory)
    with pytest.raises(ObjectNotFound):
        await storage.get(BUCKET, directory)


async def test_get_of_a_missing_key_raises_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        await storage.get(BUCKET, new_key("missing.png"))


@pytest.mark.parametrize("bucket", ["", "unknown", "sdxl-image-fast", "SDXL_IMAGE_FAST", "../x"])
async def test_unknown_buckets_are_rejected(storage: Storage, bucket: str) -> None:
    key = new_key()
    with pytest.raises(InvalidRequest):
        await storage.put(bucket, key, b"x", "image/png")
    with pytest.raises(InvalidRequest):
        await storage.get(bucket, key)
    with pytest.raises(InvalidRequest):
        await storage.exists(bucket, key)
    with pytest.raises(InvalidRequest):
        await storage.signed_url(bucket, key)


BAD_KEYS = [
    "",
    "/etc/passwd",
    "..",
    "../escape.png",
    "a/../../escape.png",
    "a/./b.png",
    "a//b.png",
    "a/",
    "a\\b.png",
    "a\x00b.png",
    "line\nbreak.png",
    "x" * (MAX_KEY_BYTES + 1),
    "a/" + "b" * 256,
    "\udcff.png",
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_unsafe_keys_are_rejected(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidRequest):
        await storage.put(BUCKET, key, b"x", "image/png")
    with pytest.raises(InvalidRequest):
        await storage.get(BUCKET, key)
    with pytest.raises(InvalidRequest):
        await storage.exists(BUCKET, key)
    with pytest.raises(InvalidRequest):
        await storage.signed_url(BUCKET, key)


async def test_signed_url_downloads_the_bytes(storage: Storage) -> None:
    key = new_key()
    await storage.put("reference_images", key, PAYLOAD, "image/png")
    url = await storage.signed_url("reference_images", key)
    assert await download(storage, url) == PAYLOAD


async def test_signed_url_of_a_key_needing_quoting_downloads_the_bytes(storage: Storage) -> None:
    key = new_key("my photo #1 ?&=+%20 é.png")
    await storage.put("reference_images", key, b"quoted", "image/png")
    url = await storage.signed_url("reference_images", key, expires_in_s=60)
    assert await download(storage, url) == b"quoted"


@pytest.mark.parametrize("ttl", [0, -5])
async def test_signed_url_rejects_a_non_positive_lifetime(storage: Storage, ttl: int) -> None:
    with pytest.raises(InvalidRequest):
        await storage.signed_url(BUCKET, new_key(), expires_in_s=ttl)


async def test_start_is_idempotent(storage: Storage) -> None:
    await storage.start()
    key = new_key()
    await storage.put(BUCKET, key, b"still works", "image/png")
    assert await storage.get(BUCKET, key) == b"still works"


async def test_check_passes_on_a_working_backend(storage: Storage) -> None:
    await storage.check()


async def test_asset_keys_store_in_their_job_type_bucket(storage: Storage) -> None:
    user_id, job_id = uuid.uuid4(), uuid.uuid4()
    image = asset_key(user_id, job_id, "png", 2)
    video = asset_key(user_id, job_id, "mp4", None)
    await storage.put(JOB_TYPES["sdxl_image_high"].bucket, image, b"png", "image/png")
    await storage.put(JOB_TYPES["video7b_high_enhanced"].bucket, video, b"mp4", "video/mp4")
    assert await storage.get("sdxl_image_high", image) == b"png"
    assert await storage.get("video7b_high_enhanced", video) == b"mp4"


def test_asset_key_follows_the_contract() -> None:
    user_id = uuid.UUID("11111111-2222-3333-4444-555555555555")
    job_id = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
    assert asset_key(user_id, job_id, "png", 0) == f"{user_id}/{job_id}_0.png"
    assert asset_key(user_id, job_id, "png", 5) == f"{user_id}/{job_id}_5.png"
    assert asset_key(user_id, job_id, ".mp4", None) == f"{user_id}/{job_id}.mp4"
    for spec in JOB_TYPES.values():
        validate_location(spec.bucket, asset_key(user_id, job_id, spec.file_extension, 0))


@pytest.mark.parametrize(("extension", "index"), [("", 0), ("p/ng", 0), ("../x", 0), ("png", -1)])
def test_asset_key_rejects_bad_parts(extension: str, index: int) -> None:
    with pytest.raises(InvalidRequest):
        asset_key(uuid.uuid4(), uuid.uuid4(), extension, index)

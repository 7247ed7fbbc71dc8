"""Listing keys by prefix; runs against local storage and both S3 mappings (moto)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ourvidz_serve.errors import InvalidRequest
from ourvidz_serve.storage import Storage
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.storage.s3 import S3Storage

BUCKET = "video_fast"
OTHER_BUCKET = "reference_images"


async def put_all(storage: Storage, bucket: str, keys: list[str]) -> None:
    for key in keys:
        await storage.put(bucket, key, b"x", "application/octet-stream")


async def test_a_user_prefix_lists_that_users_keys_only_as_logical_keys(storage: Storage) -> None:
    user, other = uuid.uuid4(), uuid.uuid4()
    job = uuid.uuid4()
    mine = [
        f"{user}/{job}.mp4",
        f"{user}/{job}_poster.webp",
        f"{user}/{job}.attempt-2.mp4",
        f"{user}/nested/deeper/file.bin",
    ]
    await put_all(storage, BUCKET, mine)
    await put_all(storage, BUCKET, [f"{other}/{job}.mp4"])
    await put_all(storage, OTHER_BUCKET, [f"{user}/abc.png"])

    assert await storage.list_keys(BUCKET, f"{user}/") == sorted(mine)
    assert await storage.list_keys(BUCKET, f"{other}/") == [f"{other}/{job}.mp4"]
    assert await storage.list_keys(OTHER_BUCKET, f"{user}/") == [f"{user}/abc.png"]
    assert await storage.list_keys(BUCKET, f"{uuid.uuid4()}/") == []


async def test_a_prefix_is_a_plain_string_prefix_within_a_directory(storage: Storage) -> None:
    user = uuid.uuid4()
    job, other_job = uuid.uuid4(), uuid.uuid4()
    keys = [f"{user}/{job}_0.png", f"{user}/{job}_1.png", f"{user}/{job}_0.attempt-3.png"]
    await put_all(storage, "sdxl_image_fast", [*keys, f"{user}/{other_job}_0.png"])

    assert await storage.list_keys("sdxl_image_fast", f"{user}/{job}") == sorted(keys)
    assert await storage.list_keys("sdxl_image_fast", f"{user}/{job}_1") == [f"{user}/{job}_1.png"]


async def test_deleted_keys_are_no_longer_listed(storage: Storage) -> None:
    user = uuid.uuid4()
    await put_all(storage, BUCKET, [f"{user}/a.mp4", f"{user}/b.mp4"])
    await storage.delete(BUCKET, f"{user}/a.mp4")
    assert await storage.list_keys(BUCKET, f"{user}/") == [f"{user}/b.mp4"]


@pytest.mark.parametrize("prefix", ["/abs/", "../x", "a/../b", "a//b", "a\\b"])
async def test_an_unsafe_prefix_is_refused(storage: Storage, prefix: str) -> None:
    with pytest.raises(InvalidRequest):
        await storage.list_keys(BUCKET, prefix)


async def test_an_unknown_bucket_is_refused(storage: Storage) -> None:
    with pytest.raises(InvalidRequest, match="unknown storage bucket"):
        await storage.list_keys("no_such_bucket", "a/")


@pytest.mark.parametrize("storage", ["s3-per-bucket", "s3-shared-bucket"], indirect=True)
async def test_s3_listing_follows_every_page(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(storage, S3Storage)
    client: Any = storage._client
    original = client.list_objects_v2
    pages = 0

    async def small_pages(**params: Any) -> Any:
        nonlocal pages
        pages += 1
        return await original(**params, MaxKeys=2)

    monkeypatch.setattr(client, "list_objects_v2", small_pages)
    user = uuid.uuid4()
    keys = [f"{user}/{i}.mp4" for i in range(5)]
    await put_all(storage, BUCKET, keys)
    assert await storage.list_keys(BUCKET, f"{user}/") == keys
    assert pages == 3


@pytest.mark.parametrize("storage", ["local"], indirect=True)
async def test_local_listing_skips_files_still_being_written(storage: Storage) -> None:
    assert isinstance(storage, LocalStorage)
    user = uuid.uuid4()
    await put_all(storage, BUCKET, [f"{user}/done.mp4"])
    partial = storage.path_for(BUCKET, f"{user}/done.mp4").parent / ".tmp-abc.part"
    partial.write_bytes(b"half")
    assert await storage.list_keys(BUCKET, f"{user}/") == [f"{user}/done.mp4"]

"""S3-backend specifics against a real moto server: bucket mapping and error mapping."""

from __future__ import annotations

import uuid

import aioboto3
import pytest
from botocore.exceptions import BotoCoreError

from ourvidz_serve.errors import StorageError
from ourvidz_serve.settings import Settings, StorageBackend
from ourvidz_serve.storage import LOGICAL_BUCKETS, create_storage
from ourvidz_serve.storage.s3 import S3Storage, real_location
from tests.moto_server import closed_loopback_url


async def raw_get(endpoint: str, bucket: str, key: str) -> bytes:
    """Read an object with a plain S3 client, bypassing the mapping under test."""
    async with aioboto3.Session().client("s3", endpoint_url=endpoint) as client:
        response = await client.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            data: bytes = await body.read()
    return data


def test_a_template_with_bucket_gives_one_real_bucket_per_logical_bucket() -> None:
    assert real_location("ourvidz-{bucket}", "sdxl_image_fast", "u/j_0.png") == (
        "ourvidz-sdxl-image-fast",
        "u/j_0.png",
    )
    storage = S3Storage("ourvidz-{bucket}")
    assert len(storage.real_buckets) == len(LOGICAL_BUCKETS)
    assert all("_" not in name for name in storage.real_buckets)


def test_a_template_without_bucket_is_one_shared_bucket_with_prefixes() -> None:
    assert real_location("ourvidz", "video_high", "u/j.mp4") == ("ourvidz", "video_high/u/j.mp4")
    assert S3Storage("ourvidz").real_buckets == ["ourvidz"]


@pytest.mark.parametrize("template", ["Ourvidz-{bucket}", "ourvidz_{bucket}", "x", "-{bucket}"])
def test_a_template_giving_invalid_bucket_names_is_refused(template: str) -> None:
    with pytest.raises(ValueError, match="invalid bucket name"):
        S3Storage(template)


def test_create_storage_builds_the_s3_backend(aws_env: None) -> None:
    settings = Settings(storage_backend=StorageBackend.S3, s3_bucket_template="shared-bucket")
    storage = create_storage(settings)
    assert isinstance(storage, S3Storage)
    assert storage.real_buckets == ["shared-bucket"]


@pytest.mark.parametrize(
    ("template", "region"), [("ovz-map-{bucket}", None), ("ovz-map-shared", "eu-west-1")]
)
async def test_objects_land_where_the_mapping_says(
    moto_endpoint: str, template: str, region: str | None
) -> None:
    storage = S3Storage(template, endpoint_url=moto_endpoint, region=region)
    await storage.start()
    try:
        key = f"{uuid.uuid4()}/job_0.png"
        await storage.put("sdxl_image_fast", key, b"mapped", "image/png")
        real_bucket, real_key = real_location(template, "sdxl_image_fast", key)
        assert await raw_get(moto_endpoint, real_bucket, real_key) == b"mapped"
    finally:
        await storage.close()


async def test_start_creates_missing_buckets_and_tolerates_existing_ones(
    moto_endpoint: str,
) -> None:
    template = f"ovz-{uuid.uuid4().hex[:12]}-{{bucket}}"
    first = S3Storage(template, endpoint_url=moto_endpoint)
    second = S3Storage(template, endpoint_url=moto_endpoint)
    await first.start()
    await second.start()
    try:
        async with aioboto3.Session().client("s3", endpoint_url=moto_endpoint) as client:
            listed = {bucket["Name"] for bucket in (await client.list_buckets())["Buckets"]}
        assert set(first.real_buckets) <= listed
        await second.check()
    finally:
        await first.close()
        await second.close()


async def test_check_fails_when_a_bucket_is_missing(moto_endpoint: str) -> None:
    template = f"ovz-{uuid.uuid4().hex[:12]}"
    storage = S3Storage(template, endpoint_url=moto_endpoint, create_buckets=False)
    await storage.start()
    try:
        with pytest.raises(StorageError, match=r"NoSuchBucket|404"):
            await storage.check()
        with pytest.raises(StorageError):
            await storage.put("image_fast", "u/j_0.png", b"x", "image/png")
    finally:
        await storage.close()


async def test_a_dead_endpoint_is_a_storage_error_not_a_botocore_error(aws_env: None) -> None:
    storage = S3Storage(
        "ovz-{bucket}", endpoint_url=closed_loopback_url(), create_buckets=False, max_attempts=1
    )
    await storage.start()
    try:
        with pytest.raises(StorageError) as check_error:
            await storage.check()
        assert isinstance(check_error.value.__cause__, BotoCoreError)
        with pytest.raises(StorageError) as put_error:
            await storage.put("image_fast", "u/j_0.png", b"x", "image/png")
        assert isinstance(put_error.value.__cause__, BotoCoreError)
        with pytest.raises(StorageError):
            await storage.get("image_fast", "u/j_0.png")
        with pytest.raises(StorageError):
            await storage.exists("image_fast", "u/j_0.png")
    finally:
        await storage.close()


async def test_start_against_a_dead_endpoint_fails_with_storage_error(aws_env: None) -> None:
    storage = S3Storage("ovz-{bucket}", endpoint_url=closed_loopback_url(), max_attempts=1)
    with pytest.raises(StorageError, match="unreachable"):
        await storage.start()
    with pytest.raises(StorageError, match="not started"):
        await storage.check()
    await storage.close()


async def test_operations_before_start_are_a_storage_error() -> None:
    storage = S3Storage("ovz-{bucket}")
    with pytest.raises(StorageError, match="not started"):
        await storage.get("image_fast", "u/j_0.png")

"""S3 storage through aioboto3 (AWS S3 or any S3-compatible endpoint).

Settings: ``OURVIDZ_S3_ENDPOINT_URL`` (unset: AWS), ``OURVIDZ_S3_REGION`` (unset: the AWS
default chain, e.g. ``AWS_DEFAULT_REGION``), ``OURVIDZ_S3_BUCKET_TEMPLATE``; credentials come
from the usual AWS sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, roles).
With a custom endpoint, path-style addressing is used (MinIO, Ceph, moto, ...).

Logical bucket -> real location, by ``OURVIDZ_S3_BUCKET_TEMPLATE``:

* template contains ``{bucket}`` (default ``ourvidz-{bucket}``): one real bucket per logical
  bucket, ``{bucket}`` replaced by the logical name with ``_`` turned into ``-``
  (``sdxl_image_fast`` -> ``ourvidz-sdxl-image-fast``); the key is unchanged.
* template without ``{bucket}`` (e.g. ``ourvidz``): one shared real bucket named by the
  template; the key becomes ``{logical bucket}/{key}`` (``ourvidz/sdxl_image_fast/{user}/...``).

``start()`` creates missing real buckets unless ``create_buckets=False`` (for credentials
without ``s3:CreateBucket``; the buckets must then exist). Signed URLs are presigned GETs
(SigV4, at most 7 days).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any, NoReturn

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from ourvidz_serve.errors import ObjectNotFound, StorageError
from ourvidz_serve.storage import (
    LOGICAL_BUCKETS,
    resolve_ttl,
    validate_location,
    validate_prefix,
)

MAX_PRESIGN_TTL_S = 7 * 24 * 3600
"""SigV4 presigned URLs cannot live longer than a week."""

_BUCKET_NAME = re.compile(r"(?!xn--)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_OBJECT_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, TimeoutError)


def real_location(bucket_template: str, bucket: str, key: str) -> tuple[str, str]:
    """The real ``(bucket, key)`` of a logical bucket and key (see the module docstring)."""
    if "{bucket}" in bucket_template:
        return bucket_template.replace("{bucket}", bucket.replace("_", "-")), key
    return bucket_template, f"{bucket}/{key}"


class S3Storage:
    """S3 backend: one aioboto3 session and one client, opened by ``start`` and closed by
    ``close``. Every botocore/transport failure surfaces as ``StorageError`` (cause kept)."""

    def __init__(
        self,
        bucket_template: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        default_ttl_s: int = 3600,
        *,
        create_buckets: bool = True,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self._template = bucket_template
        self._real_buckets = sorted(
            {real_location(bucket_template, bucket, "k")[0] for bucket in LOGICAL_BUCKETS}
        )
        for name in self._real_buckets:
            if not _BUCKET_NAME.fullmatch(name):
                raise ValueError(
                    f"S3 bucket template {bucket_template!r} gives the invalid bucket name "
                    f"{name!r} (3-63 of a-z, 0-9, '.', '-', starting and ending alphanumeric)"
                )
        self._endpoint_url = endpoint_url or None
        self._region = region or None
        self._default_ttl_s = resolve_ttl(None, default_ttl_s, MAX_PRESIGN_TTL_S)
        self._create_buckets = create_buckets
        s3_options: dict[str, Any] = {"addressing_style": "path"} if self._endpoint_url else {}
        self._config = AioConfig(
            signature_version="s3v4",
            s3=s3_options,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._start_lock = asyncio.Lock()

    @property
    def real_buckets(self) -> list[str]:
        """The real S3 buckets the logical buckets map to."""
        return list(self._real_buckets)

    async def start(self) -> None:
        async with self._start_lock:
            if self._client is None:
                await self._open()

    async def _open(self) -> None:
        stack = AsyncExitStack()
        try:
            session = aioboto3.Session()
            self._client = await stack.enter_async_context(
                session.client(
                    "s3",
                    endpoint_url=self._endpoint_url,
                    region_name=self._region,
                    config=self._config,
                )
            )
            self._stack = stack
            if self._create_buckets:
                for name in self._real_buckets:
                    await self._ensure_bucket(name)
        except BaseException:
            self._client = None
            self._stack = None
            await stack.aclose()
            raise

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        client = self._require_client()
        real_bucket, real_key = self._locate(bucket, key)
        with _translate_errors("put", real_bucket, real_key):
            await client.put_object(
                Bucket=real_bucket, Key=real_key, Body=data, ContentType=content_type
            )

    async def get(self, bucket: str, key: str) -> bytes:
        client = self._require_client()
        real_bucket, real_key = self._locate(bucket, key)
        with _translate_errors("get", real_bucket, real_key):
            response = await client.get_object(Bucket=real_bucket, Key=real_key)
            async with response["Body"] as body:
                data: bytes = await body.read()
        return data

    async def exists(self, bucket: str, key: str) -> bool:
        client = self._require_client()
        real_bucket, real_key = self._locate(bucket, key)
        try:
            with _translate_errors("head", real_bucket, real_key):
                await client.head_object(Bucket=real_bucket, Key=real_key)
        except ObjectNotFound:
            return False
        return True

    async def delete(self, bucket: str, key: str) -> None:
        client = self._require_client()
        real_bucket, real_key = self._locate(bucket, key)
        with _translate_errors("delete", real_bucket, real_key):
            await client.delete_object(Bucket=real_bucket, Key=real_key)

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """``ListObjectsV2`` under the real prefix, page by page; logical keys come back."""
        client = self._require_client()
        validate_prefix(bucket, prefix)
        real_bucket, real_prefix = real_location(self._template, bucket, prefix)
        strip = len(real_prefix) - len(prefix)  # the shared bucket's "{logical bucket}/"
        keys: list[str] = []
        params: dict[str, Any] = {"Bucket": real_bucket, "Prefix": real_prefix}
        while True:
            with _translate_errors("list", real_bucket, None):
                page = await client.list_objects_v2(**params)
            keys.extend(item["Key"][strip:] for item in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(keys)
            params["ContinuationToken"] = token

    async def signed_url(self, bucket: str, key: str, expires_in_s: int | None = None) -> str:
        client = self._require_client()
        real_bucket, real_key = self._locate(bucket, key)
        ttl = resolve_ttl(expires_in_s, self._default_ttl_s, MAX_PRESIGN_TTL_S)
        with _translate_errors("presign", real_bucket, real_key):
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": real_bucket, "Key": real_key}, ExpiresIn=ttl
            )
        return url

    async def check(self) -> None:
        """Every real bucket answers ``HeadBucket``."""
        client = self._require_client()

        async def head(name: str) -> None:
            with _translate_errors("head bucket", name, None):
                await client.head_bucket(Bucket=name)

        results = await asyncio.gather(
            *(head(name) for name in self._real_buckets), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _locate(self, bucket: str, key: str) -> tuple[str, str]:
        validate_location(bucket, key)
        return real_location(self._template, bucket, key)

    def _require_client(self) -> Any:
        if self._client is None:
            raise StorageError("S3 storage is not started")
        return self._client

    async def _ensure_bucket(self, name: str) -> None:
        client = self._client
        try:
            await client.head_bucket(Bucket=name)
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                _raise_storage_error("head bucket", name, None, exc)
        except _TRANSPORT_ERRORS as exc:
            _raise_storage_error("head bucket", name, None, exc)

        params: dict[str, Any] = {"Bucket": name}
        region = client.meta.region_name
        if region and region not in ("us-east-1", "aws-global"):
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await client.create_bucket(**params)
        except ClientError as exc:
            code = _error_code(exc)
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":
                # Another replica may have won the race; it is only fine if we can use it.
                with _translate_errors("head bucket", name, None):
                    await client.head_bucket(Bucket=name)
                return
            _raise_storage_error("create bucket", name, None, exc)
        except _TRANSPORT_ERRORS as exc:
            _raise_storage_error("create bucket", name, None, exc)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _raise_storage_error(action: str, bucket: str, key: str | None, exc: BaseException) -> NoReturn:
    target = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        detail = f"{error.get('Code', 'unknown')}: {error.get('Message', '')}".rstrip(": ")
        raise StorageError(f"S3 {action} of {target} failed ({detail})") from exc
    raise StorageError(
        f"S3 {action} of {target} failed: storage unreachable ({type(exc).__name__}: {exc})"
    ) from exc


@contextmanager
def _translate_errors(action: str, bucket: str, key: str | None) -> Iterator[None]:
    """Map botocore/transport errors: a missing object (``key`` given) -> ``ObjectNotFound``,
    anything else -> ``StorageError``."""
    try:
        yield
    except ClientError as exc:
        if key is not None and _error_code(exc) in _OBJECT_MISSING_CODES:
            raise ObjectNotFound(f"no object s3://{bucket}/{key}") from exc
        _raise_storage_error(action, bucket, key, exc)
    except _TRANSPORT_ERRORS as exc:
        _raise_storage_error(action, bucket, key, exc)

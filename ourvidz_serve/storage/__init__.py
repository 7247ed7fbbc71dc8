"""Object storage: the interface every backend implements, key rules, and the factory.

Buckets are *logical* names (one per job type, plus ``reference_images`` and
``workspace_assets``). A backend maps them to where bytes really live: a directory under
the data dir (:mod:`ourvidz_serve.storage.local`) or S3 buckets/prefixes
(:mod:`ourvidz_serve.storage.s3`). Every backend validates bucket and key with
:func:`validate_location` before touching anything.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.errors import InvalidRequest
from ourvidz_serve.settings import StorageBackend

if TYPE_CHECKING:
    from ourvidz_serve.settings import Settings

__all__ = [
    "LOGICAL_BUCKETS",
    "LORAS_BUCKET",
    "MAX_KEY_BYTES",
    "REFERENCE_IMAGES_BUCKET",
    "WORKSPACE_ASSETS_BUCKET",
    "Storage",
    "asset_key",
    "attempt_key",
    "create_storage",
    "lora_key",
    "poster_key",
    "resolve_ttl",
    "validate_location",
    "validate_prefix",
]

REFERENCE_IMAGES_BUCKET = "reference_images"
WORKSPACE_ASSETS_BUCKET = "workspace_assets"
LORAS_BUCKET = "loras"
"""The LoRA registry's files, ``sdxl/{sha256}.safetensors``: shared by every user, by content."""
LOGICAL_BUCKETS: tuple[str, ...] = (
    *(spec.bucket for spec in JOB_TYPES.values()),
    REFERENCE_IMAGES_BUCKET,
    WORKSPACE_ASSETS_BUCKET,
    LORAS_BUCKET,
)

MAX_KEY_BYTES = 900
"""UTF-8 bytes. S3 allows 1024; the margin leaves room for the shared-bucket prefix."""
MAX_SEGMENT_BYTES = 255
"""Longest file name most filesystems accept, so every key also works on the local backend."""

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_EXTENSION = re.compile(r"[a-z0-9]{1,10}")


class Storage(Protocol):
    """What the rest of the service needs from object storage.

    ``start`` must be called (and may be called again) before use; ``close`` releases
    clients. Errors: :class:`~ourvidz_serve.errors.InvalidRequest` for a bad bucket or
    key, :class:`~ourvidz_serve.errors.ObjectNotFound` for a missing object and
    :class:`~ourvidz_serve.errors.StorageError` when the backend itself fails.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None: ...

    async def get(self, bucket: str, key: str) -> bytes: ...

    async def exists(self, bucket: str, key: str) -> bool: ...

    async def delete(self, bucket: str, key: str) -> None:
        """Remove the object; deleting one that does not exist is not an error."""
        ...

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """Every key of the bucket that starts with ``prefix`` (plain string prefix: ``u/j``
        matches ``u/j_0.png``; ``u/`` everything under ``u``), sorted. Objects still being
        written are not listed. ``InvalidRequest`` for a bad bucket or prefix."""
        ...

    async def signed_url(self, bucket: str, key: str, expires_in_s: int | None = None) -> str:
        """A URL that downloads the object without other credentials until it expires."""
        ...

    async def check(self) -> None:
        """Readiness probe: return when usable, raise ``StorageError`` otherwise."""
        ...


def validate_location(bucket: str, key: str) -> None:
    """Raise ``InvalidRequest`` unless ``bucket`` is a logical bucket and ``key`` a safe key.

    A safe key is relative (no leading ``/``), has no empty, ``.`` or ``..`` segments, no
    backslashes or control characters (NUL included), at most ``MAX_KEY_BYTES`` bytes and
    segments of at most ``MAX_SEGMENT_BYTES`` bytes.
    """
    if bucket not in LOGICAL_BUCKETS:
        raise InvalidRequest(f"unknown storage bucket {bucket!r}", details={"bucket": bucket})

    def bad(reason: str) -> InvalidRequest:
        return InvalidRequest(f"invalid storage key: {reason}", details={"key": key[:200]})

    if not key:
        raise bad("empty")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("not valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise bad(f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise bad("must be relative")
    if _CONTROL_CHARS.search(key):
        raise bad("contains a backslash or control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise bad("empty, '.' or '..' path segment")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise bad(f"path segment longer than {MAX_SEGMENT_BYTES} bytes")


def validate_prefix(bucket: str, prefix: str) -> None:
    """Raise ``InvalidRequest`` unless ``bucket`` is a logical bucket and ``prefix`` the start
    of a safe key (empty: the whole bucket; a trailing ``/`` is allowed)."""
    validate_location(bucket, prefix.removesuffix("/") or "k")


def resolve_ttl(expires_in_s: int | None, default_s: int, max_s: int | None = None) -> int:
    """The signed-URL lifetime to use; ``InvalidRequest`` when out of range."""
    ttl = default_s if expires_in_s is None else expires_in_s
    if ttl < 1 or (max_s is not None and ttl > max_s):
        upper = f" and at most {max_s}" if max_s is not None else ""
        raise InvalidRequest(f"signed URL lifetime must be at least 1 s{upper}, got {ttl}")
    return ttl


def asset_key(user_id: UUID, job_id: UUID, extension: str, index: int | None) -> str:
    """The contract's object key: ``{user_id}/{job_id}_{i}.png`` or ``{user_id}/{job_id}.mp4``.

    ``index`` is the image index; ``None`` (videos) leaves the ``_{i}`` suffix out.
    """
    ext = extension.removeprefix(".").lower()
    if not _EXTENSION.fullmatch(ext):
        raise InvalidRequest(f"invalid file extension {extension!r}")
    if index is not None and index < 0:
        raise InvalidRequest(f"asset index must be >= 0, got {index}")
    suffix = "" if index is None else f"_{index}"
    return f"{UUID(str(user_id))}/{UUID(str(job_id))}{suffix}.{ext}"


def lora_key(digest: str) -> str:
    """Where the LoRA file with this sha256 lives in ``LORAS_BUCKET``."""
    return f"sdxl/{digest}.safetensors"


def poster_key(video_key: str) -> str:
    """The deterministic key of a video's poster frame, beside it: ``{job_id}_poster.webp``."""
    stem, dot, _extension = video_key.rpartition(".")
    return f"{stem if dot else video_key}_poster.webp"


def attempt_key(key: str, attempt: int) -> str:
    """The key an attempt stores a planned file under: the planned (contract) key for the
    first attempt, ``{stem}.attempt-{n}.{ext}`` for a re-run.

    Each attempt writes only its own keys, so an attempt that lost its lease can never
    overwrite what a newer attempt recorded; the fenced completion records which keys won.
    """
    if attempt <= 1:
        return key
    stem, dot, extension = key.rpartition(".")
    return f"{stem}.attempt-{attempt}.{extension}" if dot else f"{key}.attempt-{attempt}"


def create_storage(settings: Settings) -> Storage:
    """The backend ``settings.storage_backend`` names, not yet started.

    The local backend needs ``settings.signing_key()``, which raises ``ValueError`` when
    neither a URL signing secret nor an API key is configured.
    """
    if settings.storage_backend is StorageBackend.S3:
        from ourvidz_serve.storage.s3 import S3Storage

        return S3Storage(
            bucket_template=settings.s3_bucket_template,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            default_ttl_s=settings.signed_url_ttl_s,
        )
    from ourvidz_serve.storage.local import LocalStorage

    return LocalStorage(
        root=settings.local_storage_dir,
        public_base_url=settings.public_base_url,
        signing_key=settings.signing_key(),
        default_ttl_s=settings.signed_url_ttl_s,
    )

"""Local-directory storage: objects are files at ``root/{bucket}/{key}``.

Objects are served back by the ingress at ``GET /v1/files/{bucket}/{key}`` behind signed
URLs: ``?expires={unix seconds}&signature={hex HMAC-SHA256 of "{bucket}/{key}:{expires}"}``.
The ingress checks them with :func:`verify_signature` (or :meth:`LocalStorage.verify`) and
streams the path :meth:`LocalStorage.open_for_download` returns. The content type is not
stored; the file extension determines it when served.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from ourvidz_serve.errors import Forbidden, ObjectNotFound, StorageError
from ourvidz_serve.storage import (
    LOGICAL_BUCKETS,
    resolve_ttl,
    validate_location,
    validate_prefix,
)

_TEMP_PREFIX = ".tmp-"


def compute_signature(signing_key: bytes, bucket: str, key: str, expires: int) -> str:
    """Hex HMAC-SHA256 of ``"{bucket}/{key}:{expires}"``."""
    message = f"{bucket}/{key}:{expires}".encode()
    return hmac.new(signing_key, message, hashlib.sha256).hexdigest()


def verify_signature(
    signing_key: bytes,
    bucket: str,
    key: str,
    expires: int,
    signature: str,
    now: float | None = None,
) -> None:
    """Raise ``Forbidden`` unless ``signature`` is valid for this object and not expired.

    ``InvalidRequest`` for a bucket or key no object can have: ``"{bucket}/{key}"`` alone
    would not tell ``a/b`` + ``c`` from ``a`` + ``b/c``.
    """
    validate_location(bucket, key)
    expected = compute_signature(signing_key, bucket, key, expires)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise Forbidden("invalid URL signature")
    if (time.time() if now is None else now) > expires:
        raise Forbidden("signed URL has expired")


class LocalStorage:
    """Files under ``root``; all file I/O runs in worker threads, writes are atomic."""

    def __init__(
        self, root: Path, public_base_url: str, signing_key: bytes, default_ttl_s: int
    ) -> None:
        if not signing_key:
            raise ValueError("signing_key must not be empty")
        self.root = Path(root)
        self._public_base_url = public_base_url.rstrip("/")
        self._signing_key = signing_key
        self._default_ttl_s = resolve_ttl(None, default_ttl_s)

    def path_for(self, bucket: str, key: str) -> Path:
        """Where the object lives (validated; the file need not exist)."""
        validate_location(bucket, key)
        return self.root / bucket / key

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._make_dirs)
        except OSError as exc:
            raise StorageError(f"cannot create storage directory {self.root}: {exc}") from exc

    def _make_dirs(self) -> None:
        for bucket in LOGICAL_BUCKETS:
            (self.root / bucket).mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        path = self.path_for(bucket, key)
        try:
            await asyncio.to_thread(_write_atomic, path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {bucket}/{key}: {exc}") from exc

    async def get(self, bucket: str, key: str) -> bytes:
        path = self.path_for(bucket, key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {bucket}/{key}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {bucket}/{key}: {exc}") from exc

    async def exists(self, bucket: str, key: str) -> bool:
        path = self.path_for(bucket, key)
        return await asyncio.to_thread(path.is_file)

    async def delete(self, bucket: str, key: str) -> None:
        path = self.path_for(bucket, key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {bucket}/{key}: {exc}") from exc

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        validate_prefix(bucket, prefix)
        try:
            return await asyncio.to_thread(self._list_keys, bucket, prefix)
        except OSError as exc:
            raise StorageError(f"cannot list {bucket}/{prefix}: {exc}") from exc

    def _list_keys(self, bucket: str, prefix: str) -> list[str]:
        bucket_dir = self.root / bucket
        # Walk only the deepest directory the prefix names: "u/j" walks "u", "u/" walks "u".
        directory, _, _ = prefix.rpartition("/")
        top = bucket_dir / directory if directory else bucket_dir
        if not top.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(top):
            relative = Path(dirpath).relative_to(bucket_dir).as_posix()
            for name in filenames:
                if name.startswith(_TEMP_PREFIX):  # an atomic write in progress
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def open_for_download(self, bucket: str, key: str) -> Path:
        """The file to stream for a (signature-checked) download; ``ObjectNotFound`` if absent."""
        path = self.path_for(bucket, key)
        if not await asyncio.to_thread(path.is_file):
            raise ObjectNotFound(f"no object {bucket}/{key}")
        return path

    async def signed_url(self, bucket: str, key: str, expires_in_s: int | None = None) -> str:
        validate_location(bucket, key)
        expires = int(time.time()) + resolve_ttl(expires_in_s, self._default_ttl_s)
        query = urlencode(
            {
                "expires": expires,
                "signature": compute_signature(self._signing_key, bucket, key, expires),
            }
        )
        path = f"{quote(bucket, safe='')}/{quote(key, safe='/')}"
        return f"{self._public_base_url}/v1/files/{path}?{query}"

    def verify(self, bucket: str, key: str, expires: int, signature: str) -> None:
        """:func:`verify_signature` with this storage's key; ``Forbidden`` when invalid."""
        verify_signature(self._signing_key, bucket, key, expires, signature)

    async def check(self) -> None:
        try:
            await asyncio.to_thread(self._probe_write)
        except OSError as exc:
            raise StorageError(f"local storage at {self.root} is not writable: {exc}") from exc

    def _probe_write(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.root, prefix=_TEMP_PREFIX + "probe-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise

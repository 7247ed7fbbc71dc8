"""Reference images: uploaded or fetched, checked as images, stored under their user's id.

A reference lives in the ``reference_images`` bucket at ``{user_id}/{content hash}.{ext}``:
the prefix is what ties it to its user (a job may name only its own user's keys), and the
hash makes storing the same picture twice a no-op.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from uuid import UUID

from ourvidz_serve.errors import InvalidRequest
from ourvidz_serve.security.fetch import ReferenceFetcher
from ourvidz_serve.security.images import check_image
from ourvidz_serve.storage import REFERENCE_IMAGES_BUCKET, Storage


@dataclass(frozen=True)
class StoredReference:
    key: str
    width: int
    height: int
    format: str


class ReferenceService:
    def __init__(
        self, storage: Storage, fetcher: ReferenceFetcher, *, max_bytes: int, max_pixels: int
    ) -> None:
        self._storage = storage
        self._fetcher = fetcher
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels

    async def store(self, data: bytes, user_id: UUID) -> StoredReference:
        """Check ``data`` as an image (in a thread: decoding is CPU work) and store it clean."""
        checked = await asyncio.to_thread(
            check_image, data, max_bytes=self._max_bytes, max_pixels=self._max_pixels
        )
        digest = hashlib.sha256(checked.data).hexdigest()[:32]
        key = f"{user_id}/{digest}.{checked.extension}"
        await self._storage.put(REFERENCE_IMAGES_BUCKET, key, checked.data, checked.content_type)
        return StoredReference(key, checked.width, checked.height, checked.format)

    async def fetch(self, url: str, user_id: UUID) -> StoredReference:
        """Fetch a reference URL safely (see :mod:`ourvidz_serve.security.fetch`) and store it."""
        return await self.store(await self._fetcher.fetch(url), user_id)

    async def ensure_usable(self, key: str, user_id: UUID) -> None:
        """Refuse a key that is not one of ``user_id``'s stored references.

        Another user's key and a missing key get the same answer, so that a caller learns
        nothing about other users' references.
        """
        if not key.startswith(f"{user_id}/") or not await self._storage.exists(
            REFERENCE_IMAGES_BUCKET, key
        ):
            raise InvalidRequest(
                "reference_image_key does not name one of this user's reference images",
                details={"reference_image_key": key},
            )

    async def signed_url(self, key: str) -> str:
        return await self._storage.signed_url(REFERENCE_IMAGES_BUCKET, key)

    async def close(self) -> None:
        await self._fetcher.aclose()

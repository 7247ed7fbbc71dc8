"""Local-backend specifics: layout on disk, atomic writes, readiness."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from ourvidz_serve.errors import ObjectNotFound, StorageError
from ourvidz_serve.settings import Settings, StorageBackend
from ourvidz_serve.storage import LOGICAL_BUCKETS, create_storage
from ourvidz_serve.storage.local import LocalStorage


def names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def make(root: Path) -> LocalStorage:
    return LocalStorage(root, "http://host", b"key", default_ttl_s=60)


async def test_objects_live_at_root_bucket_key_and_leave_no_temp_files(tmp_path: Path) -> None:
    storage = make(tmp_path)
    await storage.start()
    await storage.put("video_fast", "user/job.mp4", b"one", "video/mp4")
    await storage.put("video_fast", "user/job.mp4", b"two", "video/mp4")

    assert (tmp_path / "video_fast" / "user" / "job.mp4").read_bytes() == b"two"
    assert names(tmp_path / "video_fast" / "user") == {"job.mp4"}
    assert names(tmp_path) == set(LOGICAL_BUCKETS)


async def test_open_for_download_returns_the_file_or_raises_not_found(tmp_path: Path) -> None:
    storage = make(tmp_path)
    await storage.start()
    await storage.put("image_fast", "u/j_0.png", b"png", "image/png")
    assert (await storage.open_for_download("image_fast", "u/j_0.png")).read_bytes() == b"png"
    with pytest.raises(ObjectNotFound):
        await storage.open_for_download("image_fast", "u/j_1.png")
    with pytest.raises(ObjectNotFound):
        await storage.open_for_download("image_fast", "u")


async def test_check_fails_when_the_root_is_unusable(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    storage = make(root)
    with pytest.raises(StorageError):
        await storage.check()
    await storage.start()
    await storage.check()


async def test_a_write_that_cannot_happen_is_a_storage_error(tmp_path: Path) -> None:
    storage = make(tmp_path)
    await storage.start()
    await storage.put("image_fast", "u", b"a file where a directory is needed", "image/png")
    with pytest.raises(StorageError):
        await storage.put("image_fast", "u/j_0.png", b"png", "image/png")


async def test_start_fails_with_storage_error_when_root_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "file"
    root.write_bytes(b"")
    with pytest.raises(StorageError):
        await make(root).start()


def test_create_storage_builds_the_local_backend_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, url_signing_secret=SecretStr("s3cret"))
    storage = create_storage(settings)
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path.resolve() / "storage"
    assert settings.storage_backend is StorageBackend.LOCAL

"""Signed URLs of the local backend: only the exact, unexpired object is accepted."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from ourvidz_serve.errors import Forbidden, InvalidRequest
from ourvidz_serve.storage.local import LocalStorage, compute_signature, verify_signature

KEY = b"k" * 32
BUCKET = "image_fast"
OBJECT = "user/job_0.png"
EXPIRES = 2_000_000_000
NOW = EXPIRES - 100


def valid_signature() -> str:
    return compute_signature(KEY, BUCKET, OBJECT, EXPIRES)


def test_a_valid_signature_is_accepted() -> None:
    verify_signature(KEY, BUCKET, OBJECT, EXPIRES, valid_signature(), now=NOW)


def test_the_signature_is_hex_hmac_sha256_of_bucket_key_and_expiry() -> None:
    message = f"{BUCKET}/{OBJECT}:{EXPIRES}".encode()
    assert valid_signature() == hmac.new(KEY, message, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "0" * 64,
        "not-hex",
        "é" * 64,
        "\udcff",
    ],
)
def test_a_forged_signature_is_forbidden(signature: str) -> None:
    with pytest.raises(Forbidden):
        verify_signature(KEY, BUCKET, OBJECT, EXPIRES, signature, now=NOW)


def test_a_tampered_signature_is_forbidden() -> None:
    good = valid_signature()
    tampered = ("0" if good[0] != "0" else "1") + good[1:]
    with pytest.raises(Forbidden):
        verify_signature(KEY, BUCKET, OBJECT, EXPIRES, tampered, now=NOW)


def test_an_expired_signature_is_forbidden() -> None:
    verify_signature(KEY, BUCKET, OBJECT, EXPIRES, valid_signature(), now=EXPIRES)
    with pytest.raises(Forbidden, match="expired"):
        verify_signature(KEY, BUCKET, OBJECT, EXPIRES, valid_signature(), now=EXPIRES + 1)


def test_extending_the_expiry_invalidates_the_signature() -> None:
    with pytest.raises(Forbidden):
        verify_signature(KEY, BUCKET, OBJECT, EXPIRES + 3600, valid_signature(), now=NOW)


@pytest.mark.parametrize(
    ("bucket", "key"),
    [
        (BUCKET, "user/job_1.png"),
        (BUCKET, "other/job_0.png"),
        ("image_high", OBJECT),
    ],
)
def test_a_signature_for_another_object_is_forbidden(bucket: str, key: str) -> None:
    with pytest.raises(Forbidden):
        verify_signature(KEY, bucket, key, EXPIRES, valid_signature(), now=NOW)


@pytest.mark.parametrize(("bucket", "key"), [("image_fast/user", "job_0.png"), (BUCKET, "../x")])
def test_a_location_no_object_can_have_is_invalid(bucket: str, key: str) -> None:
    with pytest.raises(InvalidRequest):
        verify_signature(KEY, bucket, key, EXPIRES, valid_signature(), now=NOW)


def test_a_signature_made_with_another_signing_key_is_forbidden() -> None:
    with pytest.raises(Forbidden):
        verify_signature(b"other-key", BUCKET, OBJECT, EXPIRES, valid_signature(), now=NOW)


async def test_signed_url_expires_after_the_requested_lifetime(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://host:8000/", KEY, default_ttl_s=300)
    before = int(time.time())
    url = await storage.signed_url(BUCKET, OBJECT)
    custom = await storage.signed_url(BUCKET, OBJECT, expires_in_s=10)

    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "http",
        "host:8000",
        f"/v1/files/{BUCKET}/{OBJECT}",
    )
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    expires = int(query["expires"])
    assert before + 300 <= expires <= int(time.time()) + 300
    storage.verify(BUCKET, OBJECT, expires, query["signature"])
    with pytest.raises(Forbidden):
        verify_signature(KEY, BUCKET, OBJECT, expires, query["signature"], now=expires + 1)

    custom_expires = int(parse_qs(urlsplit(custom).query)["expires"][0])
    assert before + 10 <= custom_expires <= int(time.time()) + 10


async def test_signed_url_validates_bucket_and_key(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://host", KEY, default_ttl_s=300)
    with pytest.raises(InvalidRequest):
        await storage.signed_url(BUCKET, "../../etc/passwd")
    with pytest.raises(InvalidRequest):
        await storage.signed_url("nope", OBJECT)

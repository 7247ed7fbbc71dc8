"""Fixtures: every storage test runs against the local backend and a real moto S3 server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ourvidz_serve.storage import Storage
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.storage.s3 import S3Storage
from tests.moto_server import DUMMY_AWS_ENV, run_moto_server

SIGNING_KEY = b"test-signing-key"
PUBLIC_BASE_URL = "http://files.test"
PER_BUCKET_TEMPLATE = "ovz-test-{bucket}"
SHARED_BUCKET_TEMPLATE = "ovz-test-shared"


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials and region for the whole session."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in DUMMY_AWS_ENV.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        yield


@pytest.fixture(scope="session")
def moto_endpoint(aws_env: None) -> Iterator[str]:
    """Endpoint URL of a moto S3 server running over HTTP on loopback."""
    with run_moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session", params=["local", "s3-per-bucket", "s3-shared-bucket"])
async def storage(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Storage]:
    """A started backend; S3 in both bucket mappings (the shared one outside us-east-1).

    Shared by the tests of a session, so tests use fresh keys (a new UUID prefix).
    """
    backend: Storage
    if request.param == "local":
        backend = LocalStorage(
            root=tmp_path_factory.mktemp("local-storage"),
            public_base_url=PUBLIC_BASE_URL,
            signing_key=SIGNING_KEY,
            default_ttl_s=600,
        )
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        per_bucket = request.param == "s3-per-bucket"
        backend = S3Storage(
            bucket_template=PER_BUCKET_TEMPLATE if per_bucket else SHARED_BUCKET_TEMPLATE,
            endpoint_url=endpoint,
            region=None if per_bucket else "eu-west-1",
            default_ttl_s=600,
        )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()

"""DELETE /v1/users/{user_id}/data over real PostgreSQL, with local storage and S3 (moto)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from uuid import UUID, uuid4

import asyncpg
import httpx
import jwt
import pytest

from ourvidz_serve.api.state import AppState
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.persistence.repository import (
    CANCEL_CHANNEL,
    AssetCompletion,
    JobRecord,
    JobRepository,
)
from ourvidz_serve.settings import Settings, StorageBackend
from ourvidz_serve.storage import LOGICAL_BUCKETS, REFERENCE_IMAGES_BUCKET, WORKSPACE_ASSETS_BUCKET
from tests.api.conftest import JWT_SECRET
from tests.moto_server import DUMMY_AWS_ENV, run_moto_server
from tests.support.bare_ingress import bare_ingress
from tests.support.finished_jobs import claimed, completed, store_files, submit


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in DUMMY_AWS_ENV.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        with run_moto_server() as endpoint:
            yield endpoint


@pytest.fixture(params=["local", "s3"])
async def ingress(
    request: pytest.FixtureRequest, secure_settings: Settings, repository: JobRepository
) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    settings = secure_settings
    if request.param == "s3":
        settings = settings.model_copy(
            update={
                "storage_backend": StorageBackend.S3,
                "s3_endpoint_url": request.getfixturevalue("moto_endpoint"),
                "s3_bucket_template": "ovz-users-{bucket}",
            }
        )
    async with bare_ingress(settings) as running:
        yield running


def as_user(user: UUID) -> dict[str, str]:
    token = jwt.encode({"sub": str(user), "exp": int(time.time()) + 600}, JWT_SECRET, "HS256")
    return {"Authorization": f"Bearer {token}"}


async def rows_of(pool: asyncpg.Pool, user: UUID, job_ids: list[UUID]) -> dict[str, int]:
    counts = await pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM jobs WHERE user_id = $1) AS jobs,
               (SELECT count(*) FROM images WHERE user_id = $1) AS images,
               (SELECT count(*) FROM videos WHERE user_id = $1) AS videos,
               (SELECT count(*) FROM callback_deliveries WHERE job_id = ANY($2::uuid[]))
                   AS callback_deliveries,
               (SELECT count(*) FROM fair_shares WHERE user_id = $1) AS fair_shares,
               (SELECT count(*) FROM gpu_usage WHERE user_id = $1) AS gpu_usage,
               (SELECT count(*) FROM rate_limits WHERE subject = 'user:' || $1::text)
                   AS rate_limits
        """,
        user,
        job_ids,
    )
    return dict(counts)


async def keys_of(state: AppState, user: UUID) -> list[str]:
    found = []
    for bucket in LOGICAL_BUCKETS:
        found += [f"{bucket}/{key}" for key in await state.storage.list_keys(bucket, f"{user}/")]
    return found


async def user_with_everything(state: AppState, pool: asyncpg.Pool, user: UUID) -> list[JobRecord]:
    """Two completed jobs with their files (callbacks owed, GPU usage charged), a reference,
    a workspace file, fair-order rows and a rate-limit row; the jobs."""
    repository, storage = state.repository, state.storage
    images, _ = await completed(repository, pool, storage, user, num_images=3, owes_callback=True)
    video, _ = await completed(repository, pool, storage, user, "video_fast", owes_callback=True)
    await storage.put(REFERENCE_IMAGES_BUCKET, f"{user}/{'cd' * 32}.png", b"ref", "image/png")
    await storage.put(WORKSPACE_ASSETS_BUCKET, f"{user}/board/notes.bin", b"w", "a/b")
    await repository.take_rate_token(f"user:{user}", 1.0, 5)
    for queue in ("sdxl_queue", "wan_queue"):  # whatever submission already wrote stays
        await pool.execute(
            "INSERT INTO fair_shares (queue, user_id, virtual_finish) VALUES ($1, $2, 1) "
            "ON CONFLICT DO NOTHING",
            queue,
            user,
        )
    return [images, video]


async def test_deleting_a_users_data_cancels_first_then_removes_every_row_and_file(
    ingress: tuple[httpx.AsyncClient, AppState], pool: asyncpg.Pool, database_url: str
) -> None:
    http, state = ingress
    repository = state.repository
    a, b = uuid4(), uuid4()
    a_jobs = await user_with_everything(state, pool, a)
    b_jobs = await user_with_everything(state, pool, b)
    # A's running job has stored a file already; A's queued job has not started.
    running = await claimed(repository, pool, await submit(repository, a, "video_fast"))
    in_flight = await store_files(state.storage, running, 1)
    queued = await submit(repository, a, "sdxl_image_high")
    a_ids = [job.id for job in (*a_jobs, running, queued)]
    b_ids = [job.id for job in b_jobs]

    before = await rows_of(pool, a, a_ids)
    assert all(before[table] > 0 for table in before), before
    assert len(await keys_of(state, a)) == 3 + 2 + len(in_flight) + 2
    b_rows, b_keys = await rows_of(pool, b, b_ids), await keys_of(state, b)

    told: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(CANCEL_CHANNEL, lambda *args: told.put_nowait(args[-1]))
        response = await http.delete(f"/v1/users/{a}/data")
        assert response.status_code == 204, response.text
        assert response.content == b""
        # The running job was cancelled (its worker told) before its row went ...
        assert await asyncio.wait_for(told.get(), 5) == str(running.id)
    finally:
        await listener.close()
    # ... and whatever its worker records now is fenced out.
    completion = [AssetCompletion(0, "late.mp4", {})]
    assert not await repository.complete_job(running.id, running.attempts, {}, completion)
    assert await repository.heartbeat({running.id: running.attempts}, 30) == set()

    assert await rows_of(pool, a, a_ids) == dict.fromkeys(before, 0)
    assert await keys_of(state, a) == []
    assert await rows_of(pool, b, b_ids) == b_rows
    assert await keys_of(state, b) == b_keys
    for job in b_jobs:
        kept = await repository.get_job(job.id)
        assert kept is not None and kept.status is JobStatus.COMPLETED

    again = await http.delete(f"/v1/users/{a}/data")
    assert (again.status_code, again.content) == (response.status_code, response.content)
    assert (await http.get(f"/v1/jobs/{a_jobs[0].id}")).status_code == 404


async def test_deleting_a_user_with_no_data_answers_the_same(
    ingress: tuple[httpx.AsyncClient, AppState],
) -> None:
    http, _state = ingress
    response = await http.delete(f"/v1/users/{uuid4()}/data")
    assert (response.status_code, response.content) == (204, b"")


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] == code


async def test_a_user_token_may_not_delete_data_not_even_its_own(
    ingress: tuple[httpx.AsyncClient, AppState], pool: asyncpg.Pool
) -> None:
    http, state = ingress
    user = uuid4()
    job, keys = await completed(state.repository, pool, state.storage, user)
    response = await http.delete(f"/v1/users/{user}/data", headers=as_user(user))
    assert_error(response, 403, "forbidden")
    assert await state.repository.get_job(job.id) is not None
    assert await state.storage.list_keys("sdxl_image_fast", f"{user}/") == sorted(keys)


@pytest.mark.parametrize("user_id", ["not-a-uuid", "123"])
async def test_a_bad_user_id_is_422(
    ingress: tuple[httpx.AsyncClient, AppState], user_id: str
) -> None:
    http, _state = ingress
    assert_error(await http.delete(f"/v1/users/{user_id}/data"), 422, "invalid_request")


async def test_no_credential_is_401(ingress: tuple[httpx.AsyncClient, AppState]) -> None:
    http, _state = ingress
    response = await http.delete(f"/v1/users/{uuid4()}/data", headers={"Authorization": ""})
    assert_error(response, 401, "unauthorized")

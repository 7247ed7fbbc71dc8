"""Downloads of files retention deleted answer 410; the expired job hands out no URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import httpx
import pytest

from ourvidz_serve.api.state import AppState
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.settings import Settings
from ourvidz_serve.workers.retention import RetentionSweeper
from tests.support.bare_ingress import bare_ingress
from tests.support.finished_jobs import completed, ended_ago

RETENTION_S = 3.0


@pytest.fixture
async def ingress(
    settings: Settings, repository: JobRepository
) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    retained = settings.model_copy(update={"retention_days": RETENTION_S / 86400})
    async with bare_ingress(retained) as running:
        yield running


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_an_expired_jobs_download_answers_410_and_its_resource_has_no_urls(
    ingress: tuple[httpx.AsyncClient, AppState], pool: asyncpg.Pool
) -> None:
    http, state = ingress
    user = uuid4()
    job, _ = await completed(state.repository, pool, state.storage, user, "video_fast")
    before = (await http.get(f"/v1/jobs/{job.id}")).json()
    [asset] = before["assets"]
    assert before["expired_at"] is None
    assert (await http.get(asset["url"], headers={"Authorization": ""})).status_code == 200

    await ended_ago(pool, job.id, RETENTION_S + 60)
    sweeper = RetentionSweeper.from_settings(state.repository, state.storage, state.settings)
    assert sweeper is not None
    assert await sweeper.expire_once() == [job.id]

    for url in (asset["url"], asset["thumbnail_url"]):
        response = await http.get(url, headers={"Authorization": ""})
        assert_error(response, 410, "expired")
        assert response.json()["error"]["details"]["job_id"] == str(job.id)
    after = (await http.get(f"/v1/jobs/{job.id}")).json()
    assert after["expired_at"] is not None
    assert after["status"] == "completed"
    assert [(a["url"], a["thumbnail_url"]) for a in after["assets"]] == [(None, None)]
    assert after["assets"][0]["path"] == asset["path"]


async def test_a_missing_file_of_a_job_that_did_not_expire_is_still_404(
    ingress: tuple[httpx.AsyncClient, AppState], pool: asyncpg.Pool
) -> None:
    http, state = ingress
    user = uuid4()
    job, keys = await completed(state.repository, pool, state.storage, user)
    url = (await http.get(f"/v1/jobs/{job.id}")).json()["assets"][0]["url"]
    await state.storage.delete("sdxl_image_fast", keys[0])
    assert_error(await http.get(url, headers={"Authorization": ""}), 404, "object_not_found")


@pytest.mark.parametrize(
    "key", [f"{uuid4()}/{uuid4()}_0.png", f"{uuid4()}/not-a-job.png", "plain.png"]
)
async def test_an_unknown_key_is_still_404(
    ingress: tuple[httpx.AsyncClient, AppState], key: str
) -> None:
    http, state = ingress
    url = await state.storage.signed_url("sdxl_image_fast", key)
    assert_error(await http.get(url, headers={"Authorization": ""}), 404, "object_not_found")


async def test_an_expired_jobs_key_in_another_bucket_is_404(
    ingress: tuple[httpx.AsyncClient, AppState], pool: asyncpg.Pool
) -> None:
    http, state = ingress
    user = uuid4()
    job, keys = await completed(state.repository, pool, state.storage, user)
    await ended_ago(pool, job.id, RETENTION_S + 60)
    sweeper = RetentionSweeper.from_settings(state.repository, state.storage, state.settings)
    assert sweeper is not None and await sweeper.expire_once() == [job.id]
    url = await state.storage.signed_url("sdxl_image_high", keys[0])
    assert_error(await http.get(url, headers={"Authorization": ""}), 404, "object_not_found")

"""Job control over HTTP, in-process over real PostgreSQL: cancellation and idempotency
under concurrency (running jobs stopped mid-call are in tests/workers/test_worker.py)."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from tests.api.test_jobs_http import USER, assert_error, job, row_counts, wait_for_terminal
from tests.api.test_security_http import SERVICE, as_user, serving


@pytest.fixture
async def ingress(secure_settings, tiny_models, repository):
    """The ingress alone: jobs stay queued."""
    async with serving(secure_settings, tiny_models) as client:
        yield client


async def test_a_queued_job_is_cancelled_at_once_with_its_asset_rows(ingress, pool):
    submitted = (await ingress.post("/v1/jobs", json=job(num_images=3), headers=SERVICE)).json()
    response = await ingress.delete(f"/v1/jobs/{submitted['id']}", headers=SERVICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled" and body["completed_at"] is not None
    assert [asset["status"] for asset in body["assets"]] == ["cancelled"] * 3
    statuses = await pool.fetch("SELECT status FROM images WHERE job_id = $1", submitted["id"])
    assert [row["status"] for row in statuses] == ["cancelled"] * 3
    again = await ingress.delete(f"/v1/jobs/{submitted['id']}", headers=SERVICE)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert await row_counts(pool) == (1, 3, 0)


async def test_only_the_owner_or_a_service_key_may_cancel(ingress):
    owner = uuid4()
    submitted = await ingress.post(
        "/v1/jobs", json={"job_type": "video_fast", "prompt": "a canal"}, headers=as_user(owner)
    )
    job_id = submitted.json()["id"]
    stranger = await ingress.delete(f"/v1/jobs/{job_id}", headers=as_user(uuid4()))
    assert_error(stranger, 404, "not_found")
    assert (await ingress.get(f"/v1/jobs/{job_id}", headers=SERVICE)).json()["status"] == "queued"
    mine = await ingress.delete(f"/v1/jobs/{job_id}", headers=as_user(owner))
    assert mine.status_code == 200 and mine.json()["status"] == "cancelled"
    missing = await ingress.delete(f"/v1/jobs/{uuid4()}", headers=SERVICE)
    assert_error(missing, 404, "not_found")


async def test_cancelling_a_finished_job_answers_409(client):
    submitted = (await client.post("/v1/jobs", json=job())).json()
    done = await wait_for_terminal(client, submitted["id"])
    assert done["status"] == "completed"
    response = await client.delete(f"/v1/jobs/{submitted['id']}")
    assert_error(response, 409, "conflict", "already ended completed")
    assert (await client.get(f"/v1/jobs/{submitted['id']}")).json()["status"] == "completed"


async def test_twenty_identical_submissions_at_once_make_one_job(ingress, pool):
    headers = SERVICE | {"Idempotency-Key": "twenty-at-once"}
    body = job(prompt="a single lighthouse", num_images=3)
    responses = await asyncio.gather(
        *(ingress.post("/v1/jobs", json=body, headers=headers) for _ in range(20))
    )
    ids = {response.json()["id"] for response in responses}
    assert len(ids) == 1, [response.text for response in responses]
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 19 + [202]
    assert await row_counts(pool) == (1, 3, 0)
    assert all(USER == response.json()["user_id"] for response in responses)

"""Tiers, GPU-time quotas, usage, the queues and a job's place in fair order, over HTTP
(in-process app, real PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from uuid import UUID, uuid4

import httpx
import pytest

from ourvidz_serve.api.app import create_app
from ourvidz_serve.catalog import JOB_TYPES, Tier
from ourvidz_serve.settings import Settings
from tests.api.test_jobs_http import assert_error, job, row_counts
from tests.api.test_security_http import SERVICE, serving, token, wait_for_terminal
from tests.inprocess import running_workers

FAST_IMAGE_S = JOB_TYPES["sdxl_image_fast"].expected_time_s  # one image's expected GPU seconds


def as_user(user: UUID, **claims: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **claims)}"}


@pytest.fixture
async def http(secure_settings, tiny_models, repository):
    """The app with no workers: submitted jobs stay queued."""
    async with serving(secure_settings, tiny_models) as client:
        yield client


def with_quota(settings: Settings, jobs: int) -> Settings:
    """A standard-tier budget of ``jobs`` one-image fast SDXL jobs."""
    return settings.model_copy(
        update={"quota_gpu_seconds": {Tier.STANDARD: jobs * FAST_IMAGE_S}, "quota_window_s": 3600}
    )


# Tiers --------------------------------------------------------------------------------------


async def test_a_service_key_sets_the_tier_and_a_token_carries_the_users_own(http):
    user = uuid4()
    by_key = await http.post(
        "/v1/jobs", json=job(user_id=str(user), tier="premium"), headers=SERVICE
    )
    assert by_key.status_code == 202 and by_key.json()["tier"] == "premium"
    default = await http.post("/v1/jobs", json=job(user_id=str(user)), headers=SERVICE)
    assert default.json()["tier"] == "standard"
    premium_user = as_user(user, tier="premium")
    own = await http.post("/v1/jobs", json=job(user_id=None), headers=premium_user)
    assert own.status_code == 202 and own.json()["tier"] == "premium"
    lowered = await http.post("/v1/jobs", json=job(user_id=None, tier="bulk"), headers=premium_user)
    assert lowered.status_code == 202 and lowered.json()["tier"] == "bulk"


async def test_a_user_cannot_raise_their_tier_in_the_body(http, pool):
    before = await row_counts(pool)
    response = await http.post(
        "/v1/jobs", json=job(user_id=None, tier="premium"), headers=as_user(uuid4())
    )
    assert_error(response, 403, "forbidden", "above this user's tier")
    assert await row_counts(pool) == before


async def test_a_token_with_an_unknown_tier_is_refused(http):
    response = await http.post(
        "/v1/jobs", json=job(user_id=None), headers=as_user(uuid4(), tier="gold")
    )
    assert_error(response, 401, "unauthorized", "tier")


async def test_an_unknown_tier_in_the_body_gets_422(http):
    response = await http.post("/v1/jobs", json=job(tier="platinum"), headers=SERVICE)
    assert_error(response, 422, "invalid_request")


# Quotas -------------------------------------------------------------------------------------


async def test_eight_concurrent_submissions_against_a_budget_of_three_jobs_admit_at_most_three(
    secure_settings, tiny_models, repository, pool
):
    user = str(uuid4())
    async with serving(with_quota(secure_settings, 3), tiny_models) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/jobs", json=job(user_id=user), headers=SERVICE) for _ in range(8))
        )
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(accepted) == 3, [a.status_code for a in answers]
    for answer in refused:
        assert_error(answer, 429, "quota_exhausted", "quota")
        assert int(answer.headers["Retry-After"]) >= 1
        assert answer.json()["error"]["details"]["reserved_gpu_seconds"] == 3 * FAST_IMAGE_S
    # Refused before the job row existed: only the admitted jobs have rows.
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1", UUID(user)) == 3


async def test_a_job_larger_than_what_is_left_is_refused_and_a_smaller_one_admitted(
    secure_settings, tiny_models, repository, pool
):
    user = str(uuid4())
    async with serving(with_quota(secure_settings, 7), tiny_models) as http:
        three = await http.post("/v1/jobs", json=job(user_id=user, num_images=3), headers=SERVICE)
        assert three.status_code == 202
        six = await http.post("/v1/jobs", json=job(user_id=user, num_images=6), headers=SERVICE)
        assert_error(six, 429, "quota_exhausted", "needs about")
        three_more = job(user_id=user, num_images=3)
        again = await http.post("/v1/jobs", json=three_more, headers=SERVICE)
        assert again.status_code == 202
        usage = (await http.get(f"/v1/usage?user_id={user}", headers=SERVICE)).json()
    assert usage["reserved_gpu_seconds"] == pytest.approx(6 * FAST_IMAGE_S)
    assert usage["remaining_gpu_seconds"] == pytest.approx(FAST_IMAGE_S)
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1", UUID(user)) == 2


async def test_a_job_larger_than_the_whole_quota_is_invalid_not_retryable(
    secure_settings, tiny_models, repository, pool
):
    user = str(uuid4())
    async with serving(with_quota(secure_settings, 4), tiny_models) as http:
        six = await http.post("/v1/jobs", json=job(user_id=user, num_images=6), headers=SERVICE)
        usage = (await http.get(f"/v1/usage?user_id={user}", headers=SERVICE)).json()
    assert_error(six, 422, "invalid_request", "more than the whole quota")
    assert "retry-after" not in six.headers
    assert usage["spent_gpu_seconds"] == 0 and usage["reserved_gpu_seconds"] == 0
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1", UUID(user)) == 0


async def test_completion_charges_the_measured_time_and_usage_shows_it(
    secure_settings, tiny_models, tiny_runners, repository, pool
):
    user = uuid4()
    settings = with_quota(secure_settings, 3)
    app = create_app(settings, tiny_models)
    async with (
        app.router.lifespan_context(app),
        running_workers(settings, tiny_runners),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as http,
    ):
        submitted = await http.post("/v1/jobs", json=job(user_id=str(user)), headers=SERVICE)
        done = await wait_for_terminal(http, submitted.json()["id"])
        usage = (await http.get("/v1/usage", headers=as_user(user))).json()
    assert done["status"] == "completed", done
    charge = await pool.fetchrow(
        "SELECT gpu_seconds, attempt, tier FROM gpu_usage WHERE job_id = $1", UUID(done["id"])
    )
    # The recorded generation time of its call, times its share of the call, times the
    # replica's GPU share (a CPU replica counts as one whole device).
    recorded = done["metadata"]["generation_time"] * 1 / done["metadata"]["pipeline_batch_images"]
    assert charge["gpu_seconds"] == pytest.approx(recorded, abs=1e-3)
    assert done["metadata"]["gpu_seconds"] == charge["gpu_seconds"] > 0
    assert (charge["attempt"], charge["tier"]) == (1, "standard")
    assert usage["user_id"] == str(user) and usage["tier"] == "standard"
    assert usage["spent_gpu_seconds"] == pytest.approx(charge["gpu_seconds"], abs=1e-3)
    assert usage["reserved_gpu_seconds"] == 0
    assert usage["budget_gpu_seconds"] == 3 * FAST_IMAGE_S
    assert usage["remaining_gpu_seconds"] == pytest.approx(
        3 * FAST_IMAGE_S - charge["gpu_seconds"], abs=1e-3
    )


async def test_usage_is_a_users_own_and_any_users_for_a_service_key(http):
    user, other = uuid4(), uuid4()
    own = await http.get("/v1/usage", headers=as_user(user))
    assert own.status_code == 200
    assert own.json()["budget_gpu_seconds"] is None  # no quota configured
    assert own.json()["remaining_gpu_seconds"] is None
    assert_error(
        await http.get(f"/v1/usage?user_id={other}", headers=as_user(user)), 403, "forbidden"
    )
    assert_error(await http.get("/v1/usage", headers=SERVICE), 422, "invalid_request", "user_id")
    by_key = await http.get(f"/v1/usage?user_id={other}&tier=bulk", headers=SERVICE)
    assert by_key.status_code == 200 and by_key.json()["tier"] == "bulk"


# Queues and positions -----------------------------------------------------------------------


async def test_the_queues_show_queued_work_per_tier_to_a_service_key_only(http):
    heavy, light = str(uuid4()), str(uuid4())
    for _ in range(2):
        await http.post("/v1/jobs", json=job(user_id=heavy, num_images=3), headers=SERVICE)
    await http.post(
        "/v1/jobs",
        json={"job_type": "video_fast", "prompt": "a river", "user_id": light, "tier": "premium"},
        headers=SERVICE,
    )
    assert_error(await http.get("/v1/queues", headers=as_user(uuid4())), 403, "forbidden")
    answer = await http.get("/v1/queues", headers=SERVICE)
    assert answer.status_code == 200, answer.text
    queues = {queue["queue"]: queue for queue in answer.json()["queues"]}
    sdxl, wan = queues["sdxl_queue"], queues["wan_queue"]
    assert (sdxl["queued"], sdxl["running"], sdxl["replicas"]) == (2, 0, 1)
    assert sdxl["backlog_gpu_seconds"] == 6 * FAST_IMAGE_S
    assert [tier["tier"] for tier in sdxl["tiers"]] == ["standard"]
    assert sdxl["oldest_wait_s"] >= 0
    assert [(t["tier"], t["queued"]) for t in wan["tiers"]] == [("premium", 1)]
    assert wan["backlog_gpu_seconds"] == JOB_TYPES["video_fast"].expected_time_s


async def test_a_queued_job_shows_its_place_in_fair_order_and_an_estimated_start(http):
    heavy, light = str(uuid4()), str(uuid4())
    heavy_jobs = [
        (await http.post("/v1/jobs", json=job(user_id=heavy), headers=SERVICE)).json()["id"]
        for _ in range(3)
    ]
    light_job = (await http.post("/v1/jobs", json=job(user_id=light), headers=SERVICE)).json()
    assert light_job["queue_position"] is None  # GET only: the submission answers at once
    places = {}
    for job_id in [*heavy_jobs, light_job["id"]]:
        body = (await http.get(f"/v1/jobs/{job_id}", headers=SERVICE)).json()
        places[job_id] = (
            body["queue_position"],
            datetime.fromisoformat(body["estimated_start_at"]),
        )
    # The light user's job arrived last but is second in fair order, level with the heavy
    # user's first job.
    assert places[heavy_jobs[0]][0] in (0, 1)
    assert places[light_job["id"]][0] in (0, 1)
    assert [places[j][0] for j in heavy_jobs[1:]] == [2, 3]
    # Each job ahead adds its expected GPU time over the queue's one replica.
    (first, first_at), (last, last_at) = places[heavy_jobs[0]], places[heavy_jobs[2]]
    assert (last_at - first_at).total_seconds() == pytest.approx(
        (last - first) * FAST_IMAGE_S, abs=1.0
    )

"""``GET /metrics`` in-process: the families, their types, and counts equal to the jobs run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import uuid4

import httpx
import pytest

from ourvidz_serve.api.app import create_app
from ourvidz_serve.observability.exposition import RegistryFeed
from ourvidz_serve.observability.metrics import FAMILIES, Metrics, PrometheusBackend
from ourvidz_serve.settings import Settings
from tests.api.test_jobs_http import assert_error
from tests.conftest import TEST_API_KEY
from tests.inprocess import InProcessModels, TinyRunners, running_workers
from tests.support.prometheus import parse, total

USER = str(uuid4())
WORKLOAD = [
    ("sdxl_image_fast", 1),
    ("sdxl_image_fast", 3),
    ("sdxl_image_high", 6),
    ("image_fast", 1),
    ("video_fast", 1),
]


@pytest.fixture
async def scraped_client(
    settings: Settings, tiny_models: InProcessModels, tiny_runners: TinyRunners, repository
) -> AsyncIterator[httpx.AsyncClient]:
    """App and workers sharing one registry, as the processes of one Ray node share its export."""
    backend = PrometheusBackend()
    metrics = Metrics(backend)
    app = create_app(settings, tiny_models, metrics, RegistryFeed(backend.registry))
    async with (
        app.router.lifespan_context(app),
        running_workers(settings, tiny_runners, metrics=metrics),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://127.0.0.1:8000",
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        ) as http,
    ):
        yield http


async def finished(http: httpx.AsyncClient, job_id: str) -> dict:
    for _ in range(600):
        body = (await http.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


async def test_metrics_count_the_jobs_run_with_every_family_and_its_type(scraped_client):
    http = scraped_client
    jobs = []
    for job_type, num_images in WORKLOAD:
        body = {"job_type": job_type, "prompt": "a kite", "user_id": USER}
        if num_images > 1:
            body["num_images"] = num_images
        response = await http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        jobs.append(response.json())
    done = [await finished(http, job["id"]) for job in jobs]
    assert all(job["status"] == "completed" for job in done)
    cancelled = (
        await http.post("/v1/jobs", json={"job_type": "video_high", "prompt": "x", "user_id": USER})
    ).json()
    await http.delete(f"/v1/jobs/{cancelled['id']}")

    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = parse(response.text)
    for family in FAMILIES:
        assert family.name in families, family.name
        assert families[family.name][0] == family.kind.value, family.name

    submitted = families["ourvidz_jobs_submitted"][1]
    finished_samples = families["ourvidz_jobs_finished"][1]
    for job_type in {job_type for job_type, _ in WORKLOAD}:
        runs = sum(1 for t, _ in WORKLOAD if t == job_type)
        assert total(submitted, "ourvidz_jobs_submitted_total", job_type=job_type) == runs + (
            job_type == "video_high"
        )
        assert (
            total(
                finished_samples,
                "ourvidz_jobs_finished_total",
                job_type=job_type,
                status="completed",
            )
            == runs
        )
    assert (
        total(
            finished_samples,
            "ourvidz_jobs_finished_total",
            job_type="video_high",
            status="cancelled",
        )
        == 1
    )
    generation = families["ourvidz_generation_seconds"][1]
    assert total(generation, "ourvidz_generation_seconds_count") == len(WORKLOAD)
    # A wait ends at the claim: the cancelled job counts if a worker claimed it first.
    claimed = (await http.get(f"/v1/jobs/{cancelled['id']}")).json()["started_at"] is not None
    waits = total(families["ourvidz_queue_wait_seconds"][1], "ourvidz_queue_wait_seconds_count")
    assert waits == len(WORKLOAD) + claimed
    assert total(
        families["ourvidz_generation_time_ratio"][1], "ourvidz_generation_time_ratio_count"
    ) == len(WORKLOAD)

    # Images per call: every SDXL image in some call, and the calls the records show.
    per_call = families["ourvidz_images_per_pipeline_call"][1]
    sdxl = [job for job in done if job["job_type"].startswith("sdxl")]
    images = sum(len(job["assets"]) for job in sdxl)
    calls = sum(len(job["assets"]) / job["metadata"]["pipeline_batch_images"] for job in sdxl)
    assert total(per_call, "ourvidz_images_per_pipeline_call_sum", model="sdxl") == images
    assert total(per_call, "ourvidz_images_per_pipeline_call_count", model="sdxl") == pytest.approx(
        calls
    )
    assert total(per_call, "ourvidz_images_per_pipeline_call_count", model="wan") == 2

    queues = families["ourvidz_queue_length"][1]
    assert {s.labels["queue"]: s.value for s in queues} == {
        "sdxl_queue": 0,
        "wan_queue": 0,
        "enhance": 0,
    }
    last_hour = families["ourvidz_jobs_last_hour"][1]
    assert total(last_hour, "ourvidz_jobs_last_hour", status="completed") == len(WORKLOAD)
    assert total(families["ourvidz_error_rate_last_hour"][1], "ourvidz_error_rate_last_hour") == 0


async def test_metrics_need_a_credential(scraped_client):
    response = await scraped_client.get("/metrics", headers={"Authorization": ""})
    assert_error(response, 401, "unauthorized")

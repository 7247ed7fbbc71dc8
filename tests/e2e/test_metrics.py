"""``GET /metrics`` on a running application with two SDXL replicas.

The workers record through Ray's metrics API in their own processes; the ingress reads Ray's
export back, so its ``/metrics`` counts the jobs of both replicas (``test_cluster.py`` shows
the same across two nodes).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import asyncpg
import httpx
import pytest

from ourvidz_serve.observability.dashboard import metric_names_in_dashboard
from ourvidz_serve.observability.metrics import FAMILIES
from ourvidz_serve.persistence.database import start_embedded_postgres
from tests.e2e.conftest import service_client
from tests.e2e.test_serve_lifecycle import finished
from tests.launcher import NO_USER_LIMITS, RunningService, run_service
from tests.support.prometheus import scrape_until, total
from tests.support.webhook_receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.e2e

API_KEY = "metrics-e2e-key"
CALLBACK_SECRET = "whsec_" + base64.b64encode(b"metrics-e2e-callback-secret-0001").decode()
USER = str(uuid4())
TWO_SDXL_REPLICAS = {
    "SDXL": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}},
    "Ingress": {"ray_actor_options": {"num_cpus": 0.125}},
}
# 9 SDXL jobs of 38 images: more than one call of 6 images can hold, so both replicas claim.
WORKLOAD = (
    [("sdxl_image_fast", 6)] * 4
    + [("sdxl_image_high", 3)] * 3
    + [("sdxl_image_fast", 1)] * 5
    + [("image_fast", 1), ("video_fast", 1), ("image7b_fast_enhanced", 1)]
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver(CALLBACK_SECRET) as running:
        yield running


@pytest.fixture(scope="module")
def metrics_service(
    tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[RunningService]:
    callbacks = {"OURVIDZ_CALLBACK_URL": receiver.url, "OURVIDZ_CALLBACK_SECRET": CALLBACK_SECRET}
    with run_service(
        tmp_path_factory.mktemp("metrics"),
        api_key=API_KEY,
        extra_env=NO_USER_LIMITS | callbacks,
        deployment_overrides=TWO_SDXL_REPLICAS,
    ) as service:
        yield service


@pytest.fixture
async def client(metrics_service: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(metrics_service) as http:
        yield http


async def test_metrics_after_a_mixed_workload_count_the_jobs_of_both_sdxl_replicas(
    client, metrics_service: RunningService, receiver: Receiver
) -> None:
    submitted = []
    for job_type, num_images in WORKLOAD:
        body: dict = {"job_type": job_type, "prompt": "a lighthouse at dusk", "user_id": USER}
        if num_images > 1:
            body["num_images"] = num_images
        response = await client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])
    jobs = await asyncio.gather(*(finished(client, job_id, 400) for job_id in submitted))
    assert all(job["status"] == "completed" for job in jobs), [j["error_message"] for j in jobs]

    server = start_embedded_postgres(metrics_service.data_dir / "postgres")
    try:
        connection = await asyncpg.connect(str(server.get_uri()))
        workers = await connection.fetchval(
            "SELECT count(DISTINCT split_part(claimed_by, '@', 1)) FROM jobs"
            " WHERE queue = 'sdxl_queue'"
        )
        await connection.close()
    finally:
        server.cleanup()
    assert workers == 2, "both SDXL replicas ran jobs"

    def counted(families: dict) -> bool:
        finished = families.get("ourvidz_jobs_finished", ("", []))[1]
        delivered = families.get("ourvidz_callback_deliveries", ("", []))[1]
        return total(finished, "ourvidz_jobs_finished_total") >= len(WORKLOAD) and total(
            delivered, "ourvidz_callback_deliveries_total", outcome="delivered"
        ) >= len(WORKLOAD)

    families = await scrape_until(client, counted)
    for family in FAMILIES:
        assert family.name in families, family.name
        assert families[family.name][0] == family.kind.value, family.name

    by_type: dict[str, int] = {}
    for job_type, _ in WORKLOAD:
        by_type[job_type] = by_type.get(job_type, 0) + 1
    for job_type, runs in by_type.items():
        for name in ("ourvidz_jobs_submitted", "ourvidz_jobs_finished"):
            labels = {"job_type": job_type} | (
                {"status": "completed"} if "finished" in name else {}
            )
            assert total(families[name][1], f"{name}_total", **labels) == runs, (name, job_type)
        assert (
            total(
                families["ourvidz_generation_seconds"][1],
                "ourvidz_generation_seconds_count",
                job_type=job_type,
            )
            == runs
        )

    per_call = families["ourvidz_images_per_pipeline_call"][1]
    sdxl = [job for job in jobs if job["job_type"].startswith("sdxl")]
    images = sum(len(job["assets"]) for job in sdxl)
    calls = sum(len(job["assets"]) / job["metadata"]["pipeline_batch_images"] for job in sdxl)
    assert total(per_call, "ourvidz_images_per_pipeline_call_sum", model="sdxl") == images
    assert total(per_call, "ourvidz_images_per_pipeline_call_count", model="sdxl") == (
        pytest.approx(calls)
    )
    assert total(per_call, "ourvidz_images_per_pipeline_call_count", model="wan") == 3

    queues = {s.labels["queue"]: s.value for s in families["ourvidz_queue_length"][1]}
    assert queues == {"sdxl_queue": 0, "wan_queue": 0, "enhance": 0}
    memory = families["ourvidz_gpu_memory_total_bytes"][1]
    assert {s.labels["deployment"] for s in memory} >= {"SDXL", "WAN", "Enhancer"}
    sdxl_replicas = {s.labels["replica"] for s in memory if s.labels["deployment"] == "SDXL"}
    assert len(sdxl_replicas) == 2

    # One verified callback per job, each counted once whichever replica delivered it.
    assert len({d["payload"]["job_id"] for d in receiver.verified()}) == len(WORKLOAD)
    deliveries = families["ourvidz_callback_deliveries"][1]
    assert total(deliveries, "ourvidz_callback_deliveries_total", outcome="delivered") == len(
        receiver.verified()
    )

    # The dashboard's queries name only what the application exports, sample by sample.
    exported = {sample.name for _, samples in families.values() for sample in samples}
    assert metric_names_in_dashboard(prefix="ourvidz_") <= exported

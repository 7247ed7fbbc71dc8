"""The queue service's replica counts: Serve's view, and the replicas holding leases."""

from __future__ import annotations

from uuid import uuid4

from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.scheduling import QueueService
from tests.persistence.test_fair_queue import submit

SERVICE = Principal(user_id=None, is_service=True, key_id="test")


async def overview_replicas(service: QueueService) -> dict[str, int | None]:
    queues = (await service.overview(SERVICE)).queues
    return {status.queue.value: status.replicas for status in queues}


async def test_replicas_holding_leases_count_while_serve_still_reports_them_starting(
    repository,
):
    async def serve_reports_none_running() -> dict[str, int]:
        return {"sdxl_queue": 0, "wan_queue": 0}

    service = QueueService(repository, serve_reports_none_running)
    for _ in range(3):
        await submit(repository, uuid4())
    await repository.claim_jobs("sdxl_queue", 1, "sdxl-replica-a", 30.0)
    await repository.claim_jobs("sdxl_queue", 2, "sdxl-replica-b", 30.0)
    assert await overview_replicas(service) == {"sdxl_queue": 2, "wan_queue": 0}


async def test_serves_running_replicas_count_when_idle_and_none_when_serve_cannot_say(
    repository,
):
    async def serve_reports() -> dict[str, int]:
        return {"sdxl_queue": 2, "wan_queue": 1}

    async def serve_unreachable() -> dict[str, int]:
        raise TimeoutError("the controller did not answer")

    assert await overview_replicas(QueueService(repository, serve_reports)) == {
        "sdxl_queue": 2,
        "wan_queue": 1,
    }
    unknown = await overview_replicas(QueueService(repository, serve_unreachable))
    assert unknown == {"sdxl_queue": None, "wan_queue": None}

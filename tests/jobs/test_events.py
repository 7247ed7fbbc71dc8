"""Job event streams without HTTP: the fan-out hub, and the re-read that covers lost events."""

from __future__ import annotations

import asyncio
import json
from uuid import UUID, uuid4

import pytest

from ourvidz_serve.jobs import service as service_module
from ourvidz_serve.jobs.events import SUBSCRIBER_QUEUE_SIZE, JobEventHub
from ourvidz_serve.jobs.limits import RateLimiter
from ourvidz_serve.jobs.loras import LoraService
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.jobs.references import ReferenceService
from ourvidz_serve.jobs.service import JobService
from ourvidz_serve.security.fetch import ReferenceFetcher
from ourvidz_serve.security.prompt_policy import PromptPolicy
from ourvidz_serve.storage import create_storage

SERVICE = Principal(user_id=None, is_service=True, key_id="test")


async def test_the_hub_fans_a_jobs_events_out_to_its_subscribers_only(repository):
    hub = JobEventHub(repository)
    mine, other = uuid4(), uuid4()
    async with hub.subscribe(mine) as first, hub.subscribe(mine) as second:
        async with hub.subscribe(other) as elsewhere:
            hub._on_event(json.dumps({"job": str(mine), "type": "progress", "step": 1}))
            hub._on_event("not json")  # ignored, with a warning
            assert first.get_nowait()["step"] == second.get_nowait()["step"] == 1
            assert elsewhere.empty()
        assert hub.subscriber_count() == 2
    assert hub.subscriber_count() == 0


async def test_a_slow_subscriber_loses_its_oldest_events_not_the_last(repository):
    hub = JobEventHub(repository)
    job_id = uuid4()
    async with hub.subscribe(job_id) as queue:
        for step in range(SUBSCRIBER_QUEUE_SIZE + 10):
            hub._on_event(json.dumps({"job": str(job_id), "type": "progress", "step": step}))
        hub._on_event(json.dumps({"job": str(job_id), "type": "status", "status": "completed"}))
        events = [queue.get_nowait() for _ in range(queue.qsize())]
    assert len(events) == SUBSCRIBER_QUEUE_SIZE
    assert events[-1]["status"] == "completed"


async def test_a_stream_whose_events_were_lost_still_ends_by_reading_the_job(
    repository, settings, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(service_module, "EVENTS_RECHECK_S", 0.2)
    storage = create_storage(settings)
    await storage.start()
    fetcher = ReferenceFetcher.from_settings(settings)
    jobs = JobService(
        repository,
        storage,
        references=ReferenceService(storage, fetcher, max_bytes=1024, max_pixels=1024),
        loras=LoraService(repository, storage, max_rank=4, max_bytes=1024, max_per_job=1),
        policy=PromptPolicy(),
        limiter=RateLimiter(
            repository, per_key_per_s=0, per_key_burst=1, per_user_per_s=0, per_user_burst=1
        ),
        # Never started: no notification reaches this hub, as if its listener were down.
        events=JobEventHub(repository),
    )
    request = JobRequest.model_validate({"job_type": "video_fast", "prompt": "rain"})
    job, _ = await repository.insert_job(plan_job(request, UUID(int=7)))
    events = []

    async def follow() -> None:
        async for event in jobs.events(job.id, SERVICE):
            events.append(event)

    following = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    await repository.cancel_job(job.id)
    await asyncio.wait_for(following, 5)
    await fetcher.aclose()
    assert events == [("status", {"status": "queued"}), ("status", {"status": "cancelled"})]

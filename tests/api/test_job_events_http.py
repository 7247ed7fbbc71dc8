"""SSE job events, in-process over real PostgreSQL: two ingress apps (each its own pool, as
two replicas) and queue workers; the events travel by PostgreSQL NOTIFY only."""

from __future__ import annotations

import asyncio
import json
import time
from uuid import uuid4

import httpx
import pytest

from ourvidz_serve.catalog import Queue
from tests.api.test_jobs_http import assert_error, job
from tests.api.test_security_http import SERVICE, as_user, serving
from tests.inprocess import TinyRunners, running_workers


def parse_events(text: str) -> list[tuple[str, dict]]:
    """``(event, data)`` of an SSE body; comments (keep-alives) are skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def stream(client: httpx.AsyncClient, job_id: str, **headers: str) -> list[tuple[str, dict]]:
    response = await client.get(f"/v1/jobs/{job_id}/events", headers=SERVICE | headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_events(response.text)


@pytest.fixture
async def two_ingresses(secure_settings, tiny_models, repository):
    async with (
        serving(secure_settings, tiny_models) as first,
        serving(secure_settings, tiny_models) as second,
    ):
        yield first, second


async def wait_for_subscribers() -> None:
    await asyncio.sleep(0.5)  # the streams subscribed and read the current state


async def test_every_event_of_a_three_image_job_in_order_on_two_ingress_replicas(
    two_ingresses, secure_settings, tiny_runners: TinyRunners
):
    first, second = two_ingresses
    submitted = (await first.post("/v1/jobs", json=job(num_images=3), headers=SERVICE)).json()
    on_first = asyncio.create_task(stream(first, submitted["id"]))
    on_second = asyncio.create_task(stream(second, submitted["id"]))
    await wait_for_subscribers()
    async with running_workers(secure_settings, tiny_runners, queues=(Queue.SDXL,)):
        events = await asyncio.wait_for(on_second, 90)
        same = await asyncio.wait_for(on_first, 90)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "status" and events[0][1] == {"status": "queued"}
    assert events[1] == ("status", {"status": "processing"})
    progress = [data for kind, data in events if kind == "progress"]
    assert progress, "at least one progress event"
    assert all(0 < p["step"] <= p["total"] for p in progress)
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    assets = [data for kind, data in events if kind == "asset"]
    assert sorted(a["index"] for a in assets) == [0, 1, 2]
    assert all(a["url"].startswith("http://127.0.0.1:8000/v1/files/") for a in assets)
    assert events[-1] == ("status", {"status": "completed"})
    # Status, then progress, then the assets as they are stored, then the end.
    last_progress = max(i for i, (kind, _) in enumerate(events) if kind == "progress")
    first_asset = min(i for i, (kind, _) in enumerate(events) if kind == "asset")
    assert 1 < last_progress < first_asset < len(events) - 1
    # The other replica's subscriber saw the same stream (URLs are signed per answer).
    assert [kind for kind, _ in same] == kinds
    downloaded = await first.get(assets[0]["url"].removeprefix("http://127.0.0.1:8000"))
    assert downloaded.status_code == 200 and downloaded.content[:4] == b"\x89PNG"


async def test_a_late_subscriber_gets_the_current_state_and_the_end(
    two_ingresses, secure_settings, tiny_runners: TinyRunners
):
    first, second = two_ingresses
    submitted = (await first.post("/v1/jobs", json=job(num_images=3), headers=SERVICE)).json()
    async with running_workers(secure_settings, tiny_runners, queues=(Queue.SDXL,)):
        deadline = time.monotonic() + 60
        while (await first.get(f"/v1/jobs/{submitted['id']}", headers=SERVICE)).json()[
            "status"
        ] != "completed":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    events = await stream(second, submitted["id"], **{"Last-Event-ID": "41"})
    assert [kind for kind, _ in events] == ["asset", "asset", "asset", "status"]
    assert [data["index"] for _, data in events[:3]] == [0, 1, 2]
    assert events[-1] == ("status", {"status": "completed"})
    response = await second.get(
        f"/v1/jobs/{submitted['id']}/events", headers=SERVICE | {"Last-Event-ID": "41"}
    )
    assert "id: 42" in response.text, "ids go on from the client's Last-Event-ID"


async def test_a_cancelled_job_ends_its_stream_with_cancelled(two_ingresses):
    first, second = two_ingresses
    submitted = (await first.post("/v1/jobs", json=job(), headers=SERVICE)).json()
    listening = asyncio.create_task(stream(second, submitted["id"]))
    await wait_for_subscribers()
    await first.delete(f"/v1/jobs/{submitted['id']}", headers=SERVICE)
    events = await asyncio.wait_for(listening, 30)
    assert events == [("status", {"status": "queued"}), ("status", {"status": "cancelled"})]


async def test_the_stream_of_another_users_job_is_404(two_ingresses):
    first, _ = two_ingresses
    owner = uuid4()
    submitted = await first.post(
        "/v1/jobs", json={"job_type": "video_fast", "prompt": "rain"}, headers=as_user(owner)
    )
    job_id = submitted.json()["id"]
    refused = await first.get(f"/v1/jobs/{job_id}/events", headers=as_user(uuid4()))
    assert_error(refused, 404, "not_found")
    missing = await first.get(f"/v1/jobs/{uuid4()}/events", headers=SERVICE)
    assert_error(missing, 404, "not_found")

"""Fair order through Ray Serve: a light user's job is not stuck behind a heavy user's."""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import httpx
import pytest

from tests.e2e.test_job_control import wait_for_progress
from tests.e2e.test_serve_lifecycle import submit

pytestmark = pytest.mark.e2e


async def started(http: httpx.AsyncClient, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (body := (await http.get(f"/v1/jobs/{job_id}")).json())["started_at"] is None:
        assert body["status"] == "queued", body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)
    return body


async def test_a_light_users_image_starts_before_a_heavy_users_queued_videos(
    http: httpx.AsyncClient,
):
    heavy, light = str(uuid4()), str(uuid4())
    # The heavy user's long video holds the WAN replica while the rest queue behind it.
    running = await submit(http, job_type="video_high", frame_num=121, user_id=heavy)
    await wait_for_progress(http, running["id"])
    videos = [await submit(http, job_type="video_fast", user_id=heavy) for _ in range(6)]
    image = await submit(http, job_type="image_fast", user_id=light)

    # Fair order, as the job resource and the queues show it: the light job is next.
    seen = (await http.get(f"/v1/jobs/{image['id']}")).json()
    assert (seen["status"], seen["queue_position"]) == ("queued", 0), seen
    positions = [(await http.get(f"/v1/jobs/{v['id']}")).json()["queue_position"] for v in videos]
    assert positions == [1, 2, 3, 4, 5, 6]
    queues = {q["queue"]: q for q in (await http.get("/v1/queues")).json()["queues"]}
    assert queues["wan_queue"]["replicas"] >= 1
    assert queues["wan_queue"]["queued"] >= 7 and queues["wan_queue"]["running"] >= 1

    # The running video ends (cancelled); the replica's next claim is the light user's image.
    assert (await http.delete(f"/v1/jobs/{running['id']}")).status_code == 200
    light_started = await started(http, image["id"])
    try:
        for video in videos:
            body = (await http.get(f"/v1/jobs/{video['id']}")).json()
            assert body["started_at"] is None or body["started_at"] > light_started["started_at"]
    finally:
        await asyncio.gather(*(http.delete(f"/v1/jobs/{video['id']}") for video in videos))

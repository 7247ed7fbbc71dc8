"""Cancellation through Ray Serve: a queued job at once, a running WAN video at its next
denoising step (and the replica goes on with the next job), a finished job is a conflict."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from tests.e2e.test_serve_lifecycle import finished, png_pixels, submit
from tests.launcher import RunningService

pytestmark = pytest.mark.e2e


async def wait_for_progress(http: httpx.AsyncClient, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = (await http.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] == "processing" and (body["progress"] or {}).get("step", 0) >= 1:
            return body
        assert body["status"] in ("queued", "processing"), body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def test_cancelling_queued_running_and_finished_jobs(http: httpx.AsyncClient):
    running = await submit(http, job_type="video_high", frame_num=121)
    following = await submit(http, job_type="image_fast")
    waiting = await submit(http, job_type="video_fast")

    seen = await wait_for_progress(http, running["id"])
    assert seen["progress"]["total"] == 50

    # Queued behind the running video: cancelled at once, rows included.
    response = await http.delete(f"/v1/jobs/{waiting['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert [asset["status"] for asset in response.json()["assets"]] == ["cancelled"]

    # Running: its rows end cancelled at once; the replica stops it at the next step.
    response = await http.delete(f"/v1/jobs/{running['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"

    # The replica takes the next job and finishes it.
    done = await finished(http, following["id"])
    assert done["status"] == "completed", done

    deadline = time.monotonic() + 30
    while (
        "stopped_at_step"
        not in (stopped := (await http.get(f"/v1/jobs/{running['id']}")).json())["metadata"]
    ):
        assert time.monotonic() < deadline, stopped
        await asyncio.sleep(0.1)
    assert stopped["status"] == "cancelled"
    assert stopped["metadata"]["total_steps"] == 50
    assert stopped["metadata"]["stopped_at_step"] < 50, "it stopped before its last step"
    assert [asset["url"] for asset in stopped["assets"]] == [None]

    conflict = await http.delete(f"/v1/jobs/{following['id']}")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"
    assert (await http.delete(f"/v1/jobs/{waiting['id']}")).status_code == 200


async def sse_events(http: httpx.AsyncClient, job_id: str) -> list[tuple[str, dict]]:
    """Read a job's stream over real HTTP until the service ends it."""
    events: list[tuple[str, dict]] = []
    fields: dict[str, str] = {}
    async with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                if "event" in fields:
                    events.append((fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


async def test_two_subscribers_through_serve_see_the_same_stream(http: httpx.AsyncClient):
    submitted = await submit(http, job_type="sdxl_image_fast", num_images=3)
    streams = [asyncio.create_task(sse_events(http, submitted["id"])) for _ in range(2)]
    first, second = await asyncio.wait_for(asyncio.gather(*streams), 180)
    for events in (first, second):
        assert events[-1] == ("status", {"status": "completed"})
        assert sorted(d["index"] for kind, d in events if kind == "asset") == [0, 1, 2]

    def milestones(events: list[tuple[str, dict]]) -> list[tuple[str, object]]:
        # A subscriber that came a moment later may have missed 'queued' or some progress.
        return [
            (kind, data.get("status", data.get("index")))
            for kind, data in events
            if kind != "progress" and data != {"status": "queued"}
        ]

    assert sorted(milestones(first), key=str) == sorted(milestones(second), key=str)


async def test_cancelling_one_job_of_a_shared_sdxl_call_leaves_its_batch_mate_exact(
    http: httpx.AsyncClient, service: RunningService
):
    # Keep the SDXL replica busy, so that the next two jobs wait and share one call.
    busy = await submit(http, job_type="sdxl_image_high", num_images=6)
    await wait_for_progress(http, busy["id"])
    kept, dropped = await asyncio.gather(
        submit(http, job_type="sdxl_image_high", num_images=3, seed=1234),
        submit(http, job_type="sdxl_image_high", num_images=3, seed=98765),
    )
    await wait_for_progress(http, kept["id"])
    response = await http.delete(f"/v1/jobs/{dropped['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"

    done = await finished(http, kept["id"])
    assert done["status"] == "completed", done
    assert done["metadata"]["pipeline_batch_images"] == 6, "the two jobs shared one call"
    gone = (await http.get(f"/v1/jobs/{dropped['id']}")).json()
    assert gone["status"] == "cancelled"
    assert [asset["status"] for asset in gone["assets"]] == ["cancelled"] * 3
    for asset in gone["assets"]:
        assert not (service.data_dir / "storage" / asset["bucket"] / asset["path"]).exists()

    # Image 1 of the kept job equals the same seed generated alone.
    alone = await submit(http, job_type="sdxl_image_high", num_images=1, seed=1235)
    alone_done = await finished(http, alone["id"])
    batch_png = (await http.get(done["assets"][1]["url"])).content
    alone_png = (await http.get(alone_done["assets"][0]["url"])).content
    difference = np.abs(png_pixels(batch_png) - png_pixels(alone_png)).max()
    assert int(difference) <= 2
    await finished(http, busy["id"])

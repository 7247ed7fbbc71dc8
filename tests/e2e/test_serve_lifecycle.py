"""Every job type through Ray Serve for real: HTTP -> PostgreSQL -> model deployments -> storage."""

from __future__ import annotations

import asyncio
import io
import time
from uuid import uuid4

import asyncpg
import httpx
import numpy as np
import pytest
from PIL import Image

from ourvidz_serve.catalog import JOB_TYPES, OutputFormat
from ourvidz_serve.jobs.protocol import RESERVED_METADATA_KEYS
from ourvidz_serve.pipelines.encode import probe_mp4
from tests.launcher import RunningService

pytestmark = pytest.mark.e2e

USER = str(uuid4())
COMMON_METADATA = {
    "model_variant",
    "queue",
    "seed",
    "num_images",
    "expected_generation_time",
    "generation_time",
    "content_type",
    "file_extension",
    "prompt_length",
    "prompt_word_count",
    "generation_timestamp",
}
WAN_METADATA = {"sample_steps", "sample_guide_scale", "sample_solver", "sample_shift", "frame_num"}


async def submit(http: httpx.AsyncClient, **fields) -> dict:
    body = {"prompt": "a lighthouse on a cliff at dusk", "user_id": USER} | fields
    response = await http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


async def finished(http: httpx.AsyncClient, job_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = (await http.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} still not finished after {timeout_s}s")


def png_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_every_job_type_completes_with_rows_files_and_metadata(
    http: httpx.AsyncClient, service: RunningService, service_db: asyncpg.Connection
):
    extra = {"sdxl_image_fast": {"num_images": 3}, "sdxl_image_high": {"num_images": 1}}
    submitted = await asyncio.gather(
        *(submit(http, job_type=name, **extra.get(name, {})) for name in JOB_TYPES)
    )
    results = await asyncio.gather(*(finished(http, job["id"]) for job in submitted))

    for job in results:
        spec = JOB_TYPES[job["job_type"]]
        assert job["status"] == "completed", (job["job_type"], job["error_message"])
        meta = job["metadata"]
        required = COMMON_METADATA | (
            {"negative_prompt"} if spec.model.value == "sdxl" else WAN_METADATA
        )
        if spec.enhanced:
            required |= {"original_prompt", "enhanced_prompt"}
        assert required <= set(meta), (job["job_type"], required - set(meta))
        assert meta["queue"] == spec.queue.value

        row = await service_db.fetchrow("SELECT * FROM jobs WHERE id = $1::uuid", job["id"])
        assert row["status"] == "completed" and row["completed_at"] is not None
        assert (row["format"], row["quality"], row["model_type"]) == (
            spec.format.value,
            spec.quality.value,
            spec.model_type,
        )
        assert set(meta) <= RESERVED_METADATA_KEYS, set(meta) - RESERVED_METADATA_KEYS
        is_video = spec.format is OutputFormat.VIDEO
        assets = await service_db.fetch(
            "SELECT status, video_url AS path, thumbnail_url, metadata FROM videos "
            "WHERE job_id = $1::uuid"
            if is_video
            else "SELECT status, image_url AS path, metadata FROM images "
            "WHERE job_id = $1::uuid ORDER BY image_index",
            job["id"],
        )
        assert len(assets) == meta["num_images"] == len(job["assets"])
        for asset_row, asset in zip(assets, job["assets"], strict=True):
            assert asset_row["status"] == "completed"
            assert asset_row["path"] == asset["path"] == asset_row["metadata"]["stored_path"]
            assert asset_row["metadata"]["seed"] == asset["seed"]
            stored = service.data_dir / "storage" / spec.bucket / asset_row["path"]
            data = stored.read_bytes()
            download = await http.get(asset["url"], headers={"Authorization": ""})
            assert download.content == data
            if spec.format is OutputFormat.VIDEO:
                assert stored.name == f"{job['id']}.mp4"
                info = probe_mp4(data)
                assert info.num_frames == meta["frame_num"] == 81
                assert info.fps == 16
                # The poster frame, beside the video, in the row and behind a signed URL.
                poster_key = f"{job['user_id']}/{job['id']}_poster.webp"
                assert asset_row["thumbnail_url"] == poster_key
                poster = await http.get(asset["thumbnail_url"], headers={"Authorization": ""})
                assert poster.content[:4] == b"RIFF" and poster.content[8:12] == b"WEBP"
                assert poster.content == (stored.parent / f"{job['id']}_poster.webp").read_bytes()
                with Image.open(io.BytesIO(poster.content)) as frame:
                    assert frame.size == (info.width, info.height)
            else:
                assert stored.name == f"{job['id']}_{asset['index']}.png"
                assert png_pixels(data).ndim == 3
                assert asset["thumbnail_url"] is None


async def test_a_six_image_job_updates_its_six_rows_and_never_inserts(
    http: httpx.AsyncClient, service_db: asyncpg.Connection
):
    job = await submit(http, job_type="sdxl_image_high", num_images=6, seed=1000)
    at_submission = await service_db.fetch(
        "SELECT id, image_index, status FROM images WHERE job_id = $1::uuid ORDER BY image_index",
        job["id"],
    )
    assert [r["image_index"] for r in at_submission] == list(range(6))
    assert [str(r["id"]) for r in at_submission] == [a["id"] for a in job["assets"]]
    assert {r["status"] for r in at_submission} <= {"queued", "processing"}

    done = await finished(http, job["id"])
    assert done["status"] == "completed", done["error_message"]
    after = await service_db.fetch(
        "SELECT id, status, metadata FROM images WHERE job_id = $1::uuid ORDER BY image_index",
        job["id"],
    )
    assert [r["id"] for r in after] == [r["id"] for r in at_submission]
    assert {r["status"] for r in after} == {"completed"}
    assert [r["metadata"]["seed"] for r in after] == list(range(1000, 1006))


async def test_image_two_of_a_three_image_job_equals_a_single_image_with_seed_plus_two(
    http: httpx.AsyncClient,
):
    seed = 123_456
    three, single = await asyncio.gather(
        submit(http, job_type="sdxl_image_fast", num_images=3, seed=seed),
        submit(http, job_type="sdxl_image_fast", num_images=1, seed=seed + 2),
    )
    three, single = await asyncio.gather(finished(http, three["id"]), finished(http, single["id"]))
    assert three["assets"][2]["seed"] == single["assets"][0]["seed"] == seed + 2
    batch_image = png_pixels((await http.get(three["assets"][2]["url"])).content)
    alone_image = png_pixels((await http.get(single["assets"][0]["url"])).content)
    assert batch_image.shape == alone_image.shape
    assert int(np.abs(batch_image - alone_image).max()) <= 2
    first_image = png_pixels((await http.get(three["assets"][0]["url"])).content)
    assert int(np.abs(first_image - alone_image).max()) > 2


async def test_bad_input_through_serve_gets_the_error_body_and_no_row(
    http: httpx.AsyncClient, service_db: asyncpg.Connection
):
    marker = str(uuid4())
    response = await http.post(
        "/v1/jobs",
        json={"job_type": "video_fast", "prompt": "x", "user_id": marker, "num_images": 3},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert (
        await service_db.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1::uuid", marker) == 0
    )
    unauthorized = await http.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "unauthorized"


async def test_a_job_with_a_bad_reference_fails_alone_and_its_neighbours_complete(
    http: httpx.AsyncClient, service: RunningService
):
    reference = service.data_dir / "storage" / "reference_images" / USER / "broken.png"
    reference.parent.mkdir(parents=True, exist_ok=True)
    reference.write_bytes(b"this is not an image")
    bad, *good = await asyncio.gather(
        submit(http, job_type="sdxl_image_fast", reference_image_key=f"{USER}/broken.png"),
        *(submit(http, job_type="sdxl_image_fast", seed=seed) for seed in range(3)),
    )
    bad_done = await finished(http, bad["id"])
    assert bad_done["status"] == "failed"
    assert bad_done["metadata"]["error_type"] == "InvalidRequest"
    assert "reference" in bad_done["error_message"]
    for job in good:
        done = await finished(http, job["id"])
        assert done["status"] == "completed", done["error_message"]

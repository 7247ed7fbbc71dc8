"""The OpenAI-compatible routes over HTTP, in-process (no Ray) over real PostgreSQL, local
storage and tiny models: requests become ordinary jobs, answers and errors in OpenAI's shape.

The official SDK against the Ray Serve service is in tests/e2e/test_openai.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import httpx
import pytest
from PIL import Image

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.settings import Settings
from tests.api.test_jobs_http import USER, row_counts
from tests.api.test_security_http import SERVICE, as_user, serving
from tests.inprocess import InProcessModels, TinyRunners, running_workers
from tests.support.loopback_http import png_bytes
from tests.workers.test_worker import eventually

OTHER_USER = "0b6d8a52-2f43-4c3e-9a57-3c1a7c0e9d21"


def assert_openai_error(
    response: httpx.Response, status: int, kind: str, code: str, param: str | None = None
) -> dict:
    """OpenAI's error shape, exactly: what the SDKs read."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    assert error["message"]
    return error


@pytest.fixture
async def running(
    secure_settings: Settings, tiny_models: InProcessModels, tiny_runners: TinyRunners, repository
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with queue workers running its jobs."""
    async with (
        serving(secure_settings, tiny_models) as http,
        running_workers(secure_settings, tiny_runners),
    ):
        yield http


@pytest.fixture
async def idle(secure_settings, tiny_models, repository) -> AsyncIterator[httpx.AsyncClient]:
    """The app with no workers: jobs stay queued; waiting requests give up after 1 s."""
    settings = secure_settings.model_copy(update={"openai_wait_s": 1.0})
    async with serving(settings, tiny_models) as http:
        yield http


async def start_waiting_request(http: httpx.AsyncClient, pool) -> asyncio.Task:
    """An image request in flight, once its job row exists (it then waits for the job)."""
    request = asyncio.create_task(
        http.post("/v1/images/generations", json=generate(), headers=SERVICE)
    )

    async def submitted() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM jobs"))

    await eventually(submitted, what="the job row")
    return request


def generate(**fields) -> dict:
    return {"prompt": "a lighthouse at dusk", "user": USER} | fields


# --- Images ----------------------------------------------------------------------------------


async def test_generate_with_b64_json_answers_the_jobs_pngs_and_records_an_ordinary_job(
    running, pool
):
    response = await running.post(
        "/v1/images/generations",
        json=generate(n=3, response_format="b64_json", seed=7, metadata={"source": "sdk"}),
        headers=SERVICE,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 3
    images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in body["data"]]
    assert {image.format for image in images} == {"PNG"}
    job = (await running.get(f"/v1/jobs/{body['job_id']}", headers=SERVICE)).json()
    assert job["status"] == "completed" and job["job_type"] == "sdxl_image_fast"
    assert [asset["seed"] for asset in job["assets"]] == [7, 8, 9]
    width, height = job["metadata"]["output_width"], job["metadata"]["output_height"]
    assert [image.size for image in images] == [(width, height)] * 3
    assert body["size"] == f"{width}x{height}"
    assert job["metadata"]["openai_request"] == {
        "model": "sdxl_image_fast",
        "n": 3,
        "response_format": "b64_json",
        "user": USER,
        "seed": 7,
    }
    assert job["metadata"]["source"] == "sdk"
    assert await row_counts(pool) == (1, 3, 0)


async def test_generate_with_url_answers_signed_urls_that_download(running):
    response = await running.post(
        "/v1/images/generations", json=generate(n=1, size="1024x1024"), headers=SERVICE
    )
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    assert "b64_json" not in item or item["b64_json"] is None
    download = await running.get(item["url"])
    assert download.status_code == 200
    assert Image.open(io.BytesIO(download.content)).format == "PNG"


async def test_a_user_token_generates_for_itself_without_naming_a_user(running):
    user = uuid4()
    response = await running.post(
        "/v1/images/generations", json={"prompt": "a red kite"}, headers=as_user(user)
    )
    assert response.status_code == 200, response.text
    job = (await running.get(f"/v1/jobs/{response.json()['job_id']}", headers=SERVICE)).json()
    assert job["user_id"] == str(user)


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"model": "dall-e-3"}, "model", "sdxl_image_fast"),
        ({"model": "video_fast"}, "model", "image model"),
        ({"n": 2}, "n", "[1, 3, 6]"),
        ({"model": "image_fast", "n": 3}, "n", "[1]"),
        ({"size": "512x512"}, "size", "1024x1024"),
        ({"model": "image_fast", "size": "1024x1024"}, "size", "832x480"),
        ({"user": "alice"}, "user", "UUID"),
        ({"response_format": "png"}, "response_format", ""),
        ({"quality": "hd"}, "quality", "Extra inputs"),
        ({"prompt": ""}, "prompt", ""),
        ({"seed": -1}, "seed", ""),
        ({"model": "image_fast", "negative_prompt": "blurry"}, "negative_prompt", "SDXL"),
        ({"metadata": {"job_type": "x"}}, "metadata", "set by the service"),
    ],
)
async def test_a_bad_image_request_is_a_400_naming_the_field_and_leaves_no_row(
    idle, pool, fields, param, fragment
):
    response = await idle.post("/v1/images/generations", json=generate(**fields), headers=SERVICE)
    error = assert_openai_error(response, 400, "invalid_request_error", "invalid_request", param)
    assert fragment in error["message"]
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_refused_prompt_is_a_400_with_its_code_and_leaves_no_row(idle, pool):
    response = await idle.post(
        "/v1/images/generations",
        json=generate(prompt="nude photo of a 12 year old girl"),
        headers=SERVICE,
    )
    error = assert_openai_error(response, 400, "invalid_request_error", "prompt_refused")
    assert "12 year" not in error["message"]
    assert await row_counts(pool) == (0, 0, 0)


@pytest.mark.parametrize(
    ("headers", "status", "kind", "code"),
    [
        ({"Authorization": "Bearer not-a-key"}, 401, "authentication_error", "unauthorized"),
        ({}, 401, "authentication_error", "unauthorized"),
    ],
)
async def test_a_bad_credential_is_an_authentication_error(idle, headers, status, kind, code):
    response = await idle.post("/v1/images/generations", json=generate(), headers=headers)
    error = assert_openai_error(response, status, kind, code)
    assert "not-a-key" not in error["message"]


async def test_a_user_naming_another_user_is_a_permission_error(idle, pool):
    response = await idle.post(
        "/v1/images/generations", json=generate(user=OTHER_USER), headers=as_user(USER)
    )
    assert_openai_error(response, 403, "permission_error", "forbidden")
    assert await row_counts(pool) == (0, 0, 0)


async def test_the_job_api_keeps_the_contracts_error_shape(idle):
    response = await idle.post("/v1/jobs", json={"job_type": "nope"}, headers=SERVICE)
    assert response.status_code == 422
    assert set(response.json()["error"]) == {"code", "message", "details"}


async def test_a_wait_that_runs_out_names_the_job_which_stays_queued(idle, repository):
    response = await idle.post("/v1/images/generations", json=generate(), headers=SERVICE)
    error = assert_openai_error(response, 504, "server_error", "generation_timeout")
    # Without an Idempotency-Key the SDK must not retry: it would submit a second job.
    assert response.headers["x-should-retry"] == "false"
    job = await repository.get_job(UUID(error["job_id"]))
    assert job is not None and job.status.value == "queued"
    assert error["job_id"] in error["message"]


async def test_a_timed_out_request_with_an_idempotency_key_may_be_retried_into_the_same_job(
    idle, pool
):
    headers = SERVICE | {"Idempotency-Key": "openai-retry-1"}
    first = await idle.post("/v1/images/generations", json=generate(), headers=headers)
    assert first.headers["x-should-retry"] == "true"
    second = await idle.post("/v1/images/generations", json=generate(), headers=headers)
    assert second.json()["error"]["job_id"] == first.json()["error"]["job_id"]
    assert await row_counts(pool) == (1, 1, 0)


async def test_a_job_cancelled_while_its_request_waits_is_a_500_not_to_be_retried(
    secure_settings, tiny_models, repository, pool
):
    async with serving(secure_settings, tiny_models) as http:
        waiting = await start_waiting_request(http, pool)
        job_id = await pool.fetchval("SELECT id FROM jobs")
        cancelled = await http.delete(f"/v1/jobs/{job_id}", headers=SERVICE)
        assert cancelled.status_code == 200
        response = await asyncio.wait_for(waiting, 30)
    error = assert_openai_error(response, 500, "server_error", "generation_failed")
    assert "cancelled" in error["message"] and error["job_id"] == str(job_id)
    assert response.headers["x-should-retry"] == "false"


async def test_edit_makes_an_sdxl_reference_job_on_the_uploaded_image(running):
    response = await running.post(
        "/v1/images/edits",
        data={"prompt": "the same scene at night", "user": USER, "reference_type": "composition"},
        files={"image": ("scene.png", png_bytes((48, 40), "blue"), "image/png")},
        headers=SERVICE,
    )
    assert response.status_code == 200, response.text
    job = (await running.get(f"/v1/jobs/{response.json()['job_id']}", headers=SERVICE)).json()
    assert job["metadata"]["reference_type"] == "composition"
    assert job["metadata"]["reference_image_key"].startswith(f"{USER}/")
    assert job["status"] == "completed"


@pytest.mark.parametrize(
    ("data", "files", "status", "code", "param"),
    [
        ({"prompt": "x", "user": USER}, None, 400, "invalid_request", "image"),
        (
            {"prompt": "x", "user": USER},
            {"image": ("a.png", b"not an image", "image/png")},
            400,
            "invalid_image",
            None,
        ),
        (
            {"prompt": "x", "user": USER, "model": "image_fast"},
            {"image": ("a.png", png_bytes(), "image/png")},
            400,
            "invalid_request",
            "model",
        ),
        (
            {"prompt": "x", "user": USER, "reference_strength": "3"},
            {"image": ("a.png", png_bytes(), "image/png")},
            400,
            "invalid_request",
            "reference_strength",
        ),
    ],
    ids=["no-image", "not-an-image", "not-sdxl", "strength"],
)
async def test_a_bad_edit_is_refused_in_openai_shape_and_stores_nothing(
    idle, pool, secure_settings, data, files, status, code, param
):
    response = await idle.post("/v1/images/edits", data=data, files=files, headers=SERVICE)
    assert_openai_error(response, status, "invalid_request_error", code, param)
    assert await row_counts(pool) == (0, 0, 0)
    assert not list((secure_settings.local_storage_dir).rglob("*.png"))


async def test_an_oversized_edit_upload_is_a_413(idle, secure_settings):
    limit = secure_settings.reference_max_bytes
    response = await idle.post(
        "/v1/images/edits",
        data={"prompt": "x", "user": USER},
        files={"image": ("big.png", b"\0" * (limit + 1), "image/png")},
        headers=SERVICE,
    )
    assert_openai_error(response, 413, "invalid_request_error", "payload_too_large")


# --- Videos ----------------------------------------------------------------------------------


async def test_a_video_is_created_from_json_or_multipart_with_seconds_as_frames(idle):
    as_json = await idle.post(
        "/v1/videos",
        json={"model": "video_fast", "prompt": "waves", "seconds": "4", "user": USER},
        headers=SERVICE,
    )
    as_form = await idle.post(
        "/v1/videos",
        data={"model": "video_fast", "prompt": "waves", "seconds": "2", "user": USER},
        headers=SERVICE,
    )
    for response in (as_json, as_form):
        assert response.status_code == 200, response.text
        video = response.json()
        assert (video["object"], video["status"], video["progress"]) == ("video", "queued", 0)
        assert video["size"] == "832x480" and video["model"] == "video_fast"
    # 4 s at 16 fps is 64 frames; the nearest valid count (4k+1) is 65.
    assert as_json.json()["seconds"] == "4.06"
    assert as_form.json()["seconds"] == "2.06"
    job = (await idle.get(f"/v1/jobs/{as_json.json()['id']}", headers=SERVICE)).json()
    assert job["metadata"]["frame_num"] == 65
    assert job["metadata"]["frame_num_requested"] == 64
    assert job["metadata"]["openai_request"]["seconds"] == "4"


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"seconds": "8"}, "seconds", "7.5625"),
        ({"seconds": "soon"}, "seconds", "number"),
        ({"seconds": "0"}, "seconds", "more than 0"),
        ({"size": "1280x720"}, "size", "832x480"),
        ({"model": "sora-2"}, "model", "video_fast"),
        ({"model": "sdxl_image_fast"}, "model", "video model"),
        (
            {"input_reference": {"image_url": "https://example.com/a.png"}},
            "input_reference",
            "text-to-video",
        ),
        ({"negative_prompt": "blurry"}, "negative_prompt", "Extra inputs"),
    ],
)
async def test_a_bad_video_request_is_a_400_naming_the_field(idle, pool, fields, param, fragment):
    body = {"model": "video_fast", "prompt": "waves", "user": USER} | fields
    response = await idle.post("/v1/videos", json=body, headers=SERVICE)
    error = assert_openai_error(response, 400, "invalid_request_error", "invalid_request", param)
    assert fragment in error["message"]
    assert await row_counts(pool) == (0, 0, 0)


async def test_an_input_reference_file_is_refused_as_text_to_video_only(idle, pool):
    response = await idle.post(
        "/v1/videos",
        data={"prompt": "waves", "user": USER},
        files={"input_reference": ("a.png", png_bytes(), "image/png")},
        headers=SERVICE,
    )
    assert_openai_error(
        response, 400, "invalid_request_error", "invalid_request", "input_reference"
    )
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_video_body_that_is_neither_json_nor_a_form_is_a_400(idle):
    response = await idle.post(
        "/v1/videos", content=b"prompt=x", headers=SERVICE | {"Content-Type": "text/plain"}
    )
    assert_openai_error(response, 400, "invalid_request_error", "invalid_request")
    broken = await idle.post(
        "/v1/videos", content=b"{", headers=SERVICE | {"Content-Type": "application/json"}
    )
    assert_openai_error(broken, 400, "invalid_request_error", "invalid_request")


async def create_videos(http: httpx.AsyncClient, count: int, headers: dict) -> list[str]:
    ids = []
    for index in range(count):
        response = await http.post(
            "/v1/videos", json={"prompt": f"clip {index}", "user": USER}, headers=headers
        )
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


async def test_videos_list_pages_with_after_in_either_order_and_only_videos(idle):
    ids = await create_videos(idle, 5, SERVICE)
    image = await idle.post(
        "/v1/jobs",
        json={"job_type": "sdxl_image_fast", "prompt": "x", "user_id": USER},
        headers=SERVICE,
    )
    assert image.status_code == 202
    seen, after = [], None
    while True:
        params = {"limit": 2, "user_id": USER} | ({"after": after} if after else {})
        page = (await idle.get("/v1/videos", params=params, headers=SERVICE)).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [video["id"] for video in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    oldest = (
        await idle.get("/v1/videos", params={"order": "asc", "limit": 3}, headers=SERVICE)
    ).json()
    assert [video["id"] for video in oldest["data"]] == ids[:3]
    assert oldest["first_id"] == ids[0] and oldest["has_more"] is True


async def test_another_users_video_and_an_image_job_are_not_found(idle):
    [video_id] = await create_videos(idle, 1, SERVICE)
    image = await idle.post(
        "/v1/jobs",
        json={"job_type": "sdxl_image_fast", "prompt": "x", "user_id": USER},
        headers=SERVICE,
    )
    stranger = as_user(OTHER_USER)
    for path in (f"/v1/videos/{video_id}", f"/v1/videos/{video_id}/content"):
        assert_openai_error(
            await idle.get(path, headers=stranger), 404, "invalid_request_error", "not_found"
        )
    assert_openai_error(
        await idle.delete(f"/v1/videos/{video_id}", headers=stranger),
        404,
        "invalid_request_error",
        "not_found",
    )
    for missing in (image.json()["id"], "not-a-uuid", str(uuid4())):
        assert_openai_error(
            await idle.get(f"/v1/videos/{missing}", headers=SERVICE),
            404,
            "invalid_request_error",
            "not_found",
        )
    owners = (await idle.get("/v1/videos", headers=stranger)).json()
    assert owners["data"] == []
    mine = (await idle.get("/v1/videos", headers=as_user(USER))).json()
    assert [video["id"] for video in mine["data"]] == [video_id]


async def test_deleting_a_queued_video_cancels_it_and_its_content_is_gone(idle, repository):
    [video_id] = await create_videos(idle, 1, SERVICE)
    response = await idle.delete(f"/v1/videos/{video_id}", headers=SERVICE)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
    video = (await idle.get(f"/v1/videos/{video_id}", headers=SERVICE)).json()
    assert video["status"] == "failed" and video["error"]["code"] == "cancelled"
    assert video["expires_at"] is not None
    job = await repository.get_job(UUID(video_id))
    assert job is not None and job.status.value == "cancelled" and job.expired_at is not None
    content = await idle.get(f"/v1/videos/{video_id}/content", headers=SERVICE)
    assert_openai_error(content, 410, "invalid_request_error", "expired")


async def test_a_completed_videos_content_and_poster_download_and_are_then_deleted(
    running, secure_settings
):
    [video_id] = await create_videos(running, 1, SERVICE)
    for _ in range(600):
        video = (await running.get(f"/v1/videos/{video_id}", headers=SERVICE)).json()
        if video["status"] in ("completed", "failed"):
            break
        await asyncio.sleep(0.2)
    assert video["status"] == "completed" and video["progress"] == 100, video
    mp4 = await running.get(f"/v1/videos/{video_id}/content", headers=SERVICE)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    assert mp4.content[4:8] == b"ftyp"
    poster = await running.get(
        f"/v1/videos/{video_id}/content", params={"variant": "thumbnail"}, headers=SERVICE
    )
    assert poster.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(poster.content)).format == "WEBP"
    sprites = await running.get(
        f"/v1/videos/{video_id}/content", params={"variant": "spritesheet"}, headers=SERVICE
    )
    assert_openai_error(sprites, 400, "invalid_request_error", "invalid_request", "variant")
    deleted = await running.delete(f"/v1/videos/{video_id}", headers=SERVICE)
    assert deleted.status_code == 200
    assert not list(secure_settings.local_storage_dir.rglob(f"*{video_id}*"))


async def test_the_content_of_an_unfinished_video_is_a_400(idle):
    [video_id] = await create_videos(idle, 1, SERVICE)
    response = await idle.get(f"/v1/videos/{video_id}/content", headers=SERVICE)
    error = assert_openai_error(
        response, 400, "invalid_request_error", "invalid_request", "video_id"
    )
    assert "queued" in error["message"]


# --- Models --------------------------------------------------------------------------------------


async def test_models_are_the_ten_job_types(idle):
    listed = (await idle.get("/v1/models", headers=SERVICE)).json()
    assert listed["object"] == "list"
    assert sorted(model["id"] for model in listed["data"]) == sorted(JOB_TYPES)
    assert {(m["object"], m["owned_by"]) for m in listed["data"]} == {("model", "ourvidz")}
    one = (await idle.get("/v1/models/video_fast", headers=SERVICE)).json()
    assert one["id"] == "video_fast" and isinstance(one["created"], int)
    missing = await idle.get("/v1/models/gpt-image-1", headers=SERVICE)
    assert_openai_error(missing, 404, "invalid_request_error", "not_found", "model")


async def test_an_idempotency_key_replays_the_same_video(idle, pool):
    headers = SERVICE | {"Idempotency-Key": "video-once"}
    body = {"prompt": "waves", "user": USER, "seconds": "3"}
    first = await idle.post("/v1/videos", json=body, headers=headers)
    second = await idle.post("/v1/videos", json=body, headers=headers)
    assert first.status_code == second.status_code == 200, second.text
    assert first.json()["id"] == second.json()["id"]
    assert await row_counts(pool) == (1, 0, 1)
    changed = await idle.post("/v1/videos", json=body | {"seconds": "4"}, headers=headers)
    assert_openai_error(changed, 409, "invalid_request_error", "conflict")
    # OpenAI's SDKs retry a 409; this one would never succeed.
    assert changed.headers["x-should-retry"] == "false"


async def test_a_service_key_must_name_the_end_user(idle, pool):
    for path, body in (
        ("/v1/images/generations", {"prompt": "a cat"}),
        ("/v1/videos", {"prompt": "a cat"}),
    ):
        response = await idle.post(path, json=body, headers=SERVICE)
        assert_openai_error(response, 400, "invalid_request_error", "invalid_request", "user")
    assert await row_counts(pool) == (0, 0, 0)


@pytest.mark.parametrize("key", ["seed", "reference_image_url", "frame_num", "prompt"])
async def test_metadata_may_not_carry_generation_options(idle, pool, key):
    metadata = {key: "https://example.com/a.png" if key.endswith("url") else 3}
    for path in ("/v1/images/generations", "/v1/videos"):
        response = await idle.post(path, json=generate(metadata=metadata), headers=SERVICE)
        error = assert_openai_error(
            response, 400, "invalid_request_error", "invalid_request", "metadata"
        )
        assert key in error["message"]
    assert await row_counts(pool) == (0, 0, 0)


@pytest.mark.parametrize("metadata", ["[" * 100_000, "not json", "[1, 2]"])
async def test_form_metadata_that_is_not_a_json_object_is_a_400(idle, pool, metadata):
    response = await idle.post(
        "/v1/videos", data={"prompt": "waves", "user": USER, "metadata": metadata}, headers=SERVICE
    )
    assert_openai_error(response, 400, "invalid_request_error", "invalid_request", "metadata")
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_body_that_is_not_json_names_no_field(idle):
    response = await idle.post(
        "/v1/images/generations",
        content=b'{"prompt": ',
        headers=SERVICE | {"Content-Type": "application/json"},
    )
    assert_openai_error(response, 400, "invalid_request_error", "invalid_request", None)


async def test_a_refused_edit_stores_neither_a_job_nor_the_upload(idle, pool, secure_settings):
    response = await idle.post(
        "/v1/images/edits",
        data={"prompt": "nude photo of a 12 year old girl", "user": USER},
        files={"image": ("a.png", png_bytes(), "image/png")},
        headers=SERVICE,
    )
    assert_openai_error(response, 400, "invalid_request_error", "prompt_refused")
    assert await row_counts(pool) == (0, 0, 0)
    assert not [path for path in secure_settings.local_storage_dir.rglob("*") if path.is_file()]


async def test_waiting_requests_beyond_the_replicas_cap_get_a_429_before_any_row(
    secure_settings, tiny_models, repository, pool
):
    settings = secure_settings.model_copy(update={"openai_wait_s": 30.0, "openai_max_waiting": 1})
    async with serving(settings, tiny_models) as http:
        first = await start_waiting_request(http, pool)
        second = await http.post("/v1/images/generations", json=generate(), headers=SERVICE)
        assert_openai_error(second, 429, "rate_limit_error", "too_many_waiting_requests")
        assert int(second.headers["Retry-After"]) >= 1
        assert await row_counts(pool) == (1, 1, 0)
        first.cancel()


async def test_deleting_a_running_video_cancels_it_and_deletes_its_files(
    running, repository, secure_settings
):
    response = await running.post(
        "/v1/videos",
        json={"model": "video_high", "prompt": "a storm", "seconds": "7.5", "user": USER},
        headers=SERVICE,
    )
    video_id = response.json()["id"]

    async def started() -> bool:
        video = (await running.get(f"/v1/videos/{video_id}", headers=SERVICE)).json()
        assert video["status"] in ("queued", "in_progress"), video
        return video["status"] == "in_progress"

    await eventually(started, timeout_s=120, what="the video running")
    deleted = await running.delete(f"/v1/videos/{video_id}", headers=SERVICE)
    assert deleted.json()["deleted"] is True
    job = await repository.get_job(UUID(video_id))
    assert job is not None and job.status.value == "cancelled"
    # Not marked expired: its fenced-out attempt may still store a file, and deletes it.
    assert job.expired_at is None
    content = await running.get(f"/v1/videos/{video_id}/content", headers=SERVICE)
    assert_openai_error(content, 400, "invalid_request_error", "invalid_request", "video_id")

    async def no_files() -> bool:
        return not list(secure_settings.local_storage_dir.rglob(f"*{video_id}*"))

    await eventually(no_files, timeout_s=60, what="the video's files gone")

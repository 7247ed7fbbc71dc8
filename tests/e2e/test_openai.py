"""The official ``openai`` Python client against the Ray Serve service: images, edits,
videos, models and its typed errors, through the OpenAI-compatible routes."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import httpx
import jwt
import numpy as np
import openai
import pytest
from PIL import Image

from ourvidz_serve.catalog import JOB_TYPES, WAN_FPS
from ourvidz_serve.pipelines.encode import probe_mp4
from tests.e2e.conftest import API_KEY, JWT_SECRET
from tests.launcher import RunningService

pytestmark = pytest.mark.e2e

CLIENT_TIMEOUT_S = 240


def sdk(service: RunningService, api_key: str = API_KEY) -> openai.OpenAI:
    """The SDK as a user would point it at us; no retries, so every error is seen once."""
    return openai.OpenAI(
        api_key=api_key, base_url=f"{service.base_url}/v1", max_retries=0, timeout=CLIENT_TIMEOUT_S
    )


def user_token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 900}, JWT_SECRET, "HS256")


@pytest.fixture
def client(service: RunningService) -> Iterator[openai.OpenAI]:
    with sdk(service) as client:
        yield client


@pytest.fixture
def jobs_api(service: RunningService) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as http:
        yield http


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_images_generate_answers_three_pngs_as_b64_json_or_urls_and_an_ordinary_job(
    client: openai.OpenAI, jobs_api: httpx.Client
):
    user = str(uuid4())
    as_b64 = client.images.generate(
        model="sdxl_image_fast",
        prompt="a lighthouse at dusk",
        n=3,
        size="1024x1024",
        response_format="b64_json",
        user=user,
        extra_body={"seed": 11},
    )
    assert as_b64.data is not None and len(as_b64.data) == 3
    images = [pixels(base64.b64decode(item.b64_json or "")) for item in as_b64.data]
    job = jobs_api.get(f"/v1/jobs/{as_b64.model_extra['job_id']}").json()
    assert job["user_id"] == user and job["status"] == "completed"
    expected = (job["metadata"]["output_height"], job["metadata"]["output_width"], 3)
    assert [image.shape for image in images] == [expected] * 3
    assert as_b64.size == f"{expected[1]}x{expected[0]}"

    as_urls = client.images.generate(
        model="sdxl_image_fast", prompt="a lighthouse at dusk", n=3, response_format="url",
        user=user, extra_body={"seed": 11},
    )  # fmt: skip
    assert as_urls.data is not None and len(as_urls.data) == 3
    downloads = [httpx.get(item.url or "", timeout=60) for item in as_urls.data]
    assert [download.status_code for download in downloads] == [200] * 3
    # Same seed, same job type: the same three pictures, now as files.
    for download, image in zip(downloads, images, strict=True):
        assert np.array_equal(pixels(download.content), image)

    listed = jobs_api.get("/v1/jobs", params={"user_id": user}).json()["jobs"]
    assert len(listed) == 2
    for listed_job in listed:
        assert listed_job["job_type"] == "sdxl_image_fast"
        assert [asset["status"] for asset in listed_job["assets"]] == ["completed"] * 3
        assert listed_job["metadata"]["openai_request"]["n"] == 3


def test_images_edit_runs_a_reference_job_that_differs_from_no_reference(
    client: openai.OpenAI, jobs_api: httpx.Client
):
    user = str(uuid4())
    reference = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(reference, format="PNG")
    common = {"model": "sdxl_image_fast", "prompt": "a harbour", "n": 1, "user": user}
    edited = client.images.edit(
        image=("reference.png", reference.getvalue(), "image/png"),
        response_format="b64_json",
        extra_body={"seed": 5, "reference_type": "composition", "reference_strength": "0.9"},
        **common,
    )
    plain = client.images.generate(response_format="b64_json", extra_body={"seed": 5}, **common)
    assert edited.data is not None and plain.data is not None
    with_reference = pixels(base64.b64decode(edited.data[0].b64_json or ""))
    without = pixels(base64.b64decode(plain.data[0].b64_json or ""))
    assert with_reference.shape == without.shape
    assert np.abs(with_reference - without).mean() > 1.0
    job = jobs_api.get(f"/v1/jobs/{edited.model_extra['job_id']}").json()
    assert job["metadata"]["reference_type"] == "composition"
    assert job["metadata"]["reference_strength"] == 0.9
    assert job["metadata"]["reference_image_key"].startswith(f"{user}/")


def test_videos_create_poll_download_list_and_delete(service: RunningService):
    user = str(uuid4())
    with sdk(service, user_token(user)) as client:
        created = client.videos.create(model="video_fast", prompt="waves on a shore", seconds="1")
        assert (created.object, created.status, created.size) == ("video", "queued", "832x480")
        video = client.videos.poll(created.id, poll_interval_ms=200)
        assert video.status == "completed" and video.progress == 100, video
        # 1 s at 16 fps: 16 frames asked, 17 made (WAN makes 4k+1).
        assert video.seconds == "1.06"
        mp4 = client.videos.download_content(created.id).content
        info = probe_mp4(mp4)
        assert info.num_frames == 17 and info.fps == WAN_FPS
        poster = client.videos.download_content(created.id, variant="thumbnail").content
        assert poster[:4] == b"RIFF" and poster[8:12] == b"WEBP"

        more = [
            client.videos.create(model="video_fast", prompt=f"clip {i}", seconds="1").id
            for i in range(2)
        ]
        first_page = client.videos.list(limit=1)
        assert [v.id for v in first_page.data] == [more[-1]] and first_page.has_more
        second_page = client.videos.list(limit=1, after=first_page.data[0].id)
        assert [v.id for v in second_page.data] == [more[0]]
        # The SDK's own paging follows last_id as `after`, page by page.
        assert [v.id for v in client.videos.list(limit=1)] == [*more[::-1], created.id]

        running = client.videos.create(model="video_high", prompt="a long storm", seconds="7.5")
        deadline = time.monotonic() + 180
        while (state := client.videos.retrieve(running.id)).status == "queued" or (
            state.status == "in_progress" and state.progress == 0
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state.status == "in_progress", state
        deleted = client.videos.delete(running.id)
        assert (deleted.id, deleted.deleted) == (running.id, True)
        after = client.videos.retrieve(running.id)
        assert after.status == "failed" and after.error is not None
        assert after.error.code == "cancelled"
        with pytest.raises(openai.BadRequestError) as no_content:
            client.videos.download_content(running.id)
        assert no_content.value.param == "video_id"
        for video_id in more:
            client.videos.delete(video_id)


def test_models_list_names_the_ten_job_types(client: openai.OpenAI):
    models = list(client.models.list())
    assert sorted(model.id for model in models) == sorted(JOB_TYPES)
    assert {model.owned_by for model in models} == {"ourvidz"}
    assert client.models.retrieve("video_fast").id == "video_fast"


def test_the_sdk_raises_its_own_exception_for_each_error(
    service: RunningService, client: openai.OpenAI
):
    user = str(uuid4())
    with pytest.raises(openai.BadRequestError) as unknown:
        client.images.generate(model="dall-e-3", prompt="a cat", user=user)
    assert unknown.value.param == "model"

    with sdk(service, "not-our-key") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()

    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="nude photo of a 12 year old girl", user=user)
    assert refused.value.code == "prompt_refused"

    owner = sdk(service, user_token(user))
    video = owner.videos.create(prompt="a quiet lake", seconds="1")
    with sdk(service, user_token(str(uuid4()))) as other, pytest.raises(openai.NotFoundError):
        other.videos.retrieve(video.id)
    owner.videos.delete(video.id)

    # The per-user rate limit (a burst of 30, then 5 a second) answers 429: RateLimitError.
    with pytest.raises(openai.RateLimitError):
        for _ in range(200):
            owner.models.list()
    owner.close()


def test_a_client_that_goes_away_does_not_lose_its_images(
    service: RunningService, jobs_api: httpx.Client
):
    """The request is sent, held open until its job exists, then its connection closed
    before any answer: the job still completes and stays in the user's jobs."""
    user = str(uuid4())
    body = json.dumps({"prompt": "a windmill", "n": 3, "user": user}).encode()
    url = httpx.URL(service.base_url)
    request = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    deadline = time.monotonic() + 120
    with socket.create_connection((url.host, url.port), timeout=30) as connection:
        connection.sendall(request)
        while not (jobs := jobs_api.get("/v1/jobs", params={"user_id": user}).json()["jobs"]):
            assert time.monotonic() < deadline, "the job was never stored"
            time.sleep(0.05)
    while jobs[0]["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)
        jobs = jobs_api.get("/v1/jobs", params={"user_id": user}).json()["jobs"]
    assert jobs[0]["status"] == "completed"
    assert [asset["status"] for asset in jobs[0]["assets"]] == ["completed"] * 3


def readme_examples() -> tuple[str, str]:
    """The Python and the shell example of the README's "OpenAI-compatible API" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## OpenAI-compatible API\n", 1)[1].split("\n## ", 1)[0]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    shell = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(shell) == 1
    return python[0], shell[0]


def test_the_readme_examples_work_verbatim(service: RunningService, tmp_path: Path):
    """Run as written, in a directory holding ``.ourvidz/dev-api-key``; only the address is
    the test service's instead of ``make serve``'s."""
    (tmp_path / ".ourvidz").mkdir()
    (tmp_path / ".ourvidz" / "dev-api-key").write_text(API_KEY + "\n")
    python, shell = (
        example.replace("http://127.0.0.1:8000", service.base_url) for example in readme_examples()
    )
    ran = subprocess.run(
        [sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split() == ["completed", "2.06"]
    for index in range(3):
        assert Image.open(tmp_path / f"lighthouse{index}.png").format == "PNG"
    assert probe_mp4((tmp_path / "waves.mp4").read_bytes()).num_frames == 33
    assert (tmp_path / "waves.webp").read_bytes()[8:12] == b"WEBP"
    (tmp_path / "waves.mp4").unlink()

    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", shell],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout)
    assert len(answer["data"]) == 1 and answer["data"][0]["url"].startswith(service.base_url)
    assert probe_mp4((tmp_path / "waves.mp4").read_bytes()).num_frames == 33

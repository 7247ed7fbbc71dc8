"""The installed ``ourvidz-serve`` command against Ray Serve for real: submit with progress and
downloads (images, a video and its poster), cancel, errors, enhance, status and job types."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
from PIL import Image

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.pipelines.encode import probe_mp4
from tests.launcher import RunningService

pytestmark = pytest.mark.e2e

USER = str(uuid4())
SCRIPT = Path(sys.executable).parent / "ourvidz-serve"
JOB_ID = re.compile(r"job id: ([0-9a-f-]{36})")


def run_cli(
    service: RunningService, *arguments: str, timeout_s: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    connection = ["--url", service.base_url, "--api-key", service.api_key, "--user-id", USER]
    started = time.monotonic()
    result = subprocess.run(
        [str(SCRIPT), *connection, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
    )
    took = time.monotonic() - started
    print(f"$ ourvidz-serve {' '.join(arguments)}  -> {result.returncode} in {took:.1f} s")
    print(result.stdout, result.stderr, sep="\n")
    return result


def job_id_of(result: subprocess.CompletedProcess[str]) -> str:
    match = JOB_ID.search(result.stdout)
    assert match, result.stdout
    return match[1]


def status_json(service: RunningService, job_id: str) -> dict:
    result = run_cli(service, "status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    job: dict = json.loads(result.stdout)
    return job


def test_submit_waits_with_progress_and_downloads_three_pngs(
    service: RunningService, tmp_path: Path
):
    prompt = "a lighthouse on a cliff at dusk"
    arguments = ["sdxl_image_fast", prompt, "--num-images", "3", "--seed", "7"]
    result = run_cli(service, "submit", *arguments, "--wait", "--output", "tmp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    assert re.search(r"progress: step \d+/15", result.stdout), result.stdout
    assert f"completed: job {job_id}" in result.stdout
    out = tmp_path / "tmp"
    assert "saved 3 file(s) to tmp" in result.stdout
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"{job_id}_{i}.png" for i in range(3)]
    for path in files:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.load()
            assert image.width > 0 and image.height > 0

    # The job is over: cancelling it is a conflict, said plainly, and exits 1.
    result = run_cli(service, "cancel", job_id)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert f"cannot cancel job {job_id}: conflict: job {job_id} has already ended completed" in (
        message
    )
    assert "Traceback" not in result.stderr

    # The status table shows the job and every asset's URL; --json the raw resource.
    table = run_cli(service, "status", job_id)
    assert table.returncode == 0, table.stderr
    assert "completed" in table.stdout and "Assets" in table.stdout
    job = status_json(service, job_id)
    assert job["status"] == "completed" and job["metadata"]["seed"] == 7
    for asset in job["assets"]:  # signed again on every request: the same file, a new expiry
        unsigned = asset["url"].split("?", 1)[0]
        assert f"{asset['index']} url: {unsigned}?expires=" in table.stdout


def test_a_video_arrives_with_its_poster(service: RunningService, tmp_path: Path):
    result = run_cli(
        service, "submit", "video_fast", "waves on a beach", "--wait", "--output", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result)
    assert "completed" in result.stdout and "step" in result.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{job_id}.mp4", f"{job_id}_poster.webp"]
    video = probe_mp4((tmp_path / f"{job_id}.mp4").read_bytes())
    assert video.num_frames == 81 and video.fps == 16
    with Image.open(tmp_path / f"{job_id}_poster.webp") as poster:
        assert poster.format == "WEBP"
        assert poster.size == (video.width, video.height)


def test_cancel_a_job_right_after_submitting_it(service: RunningService):
    # A tiny video can end within the second a CLI process takes to start, so a few videos go
    # first (straight over HTTP, in milliseconds): the one the CLI submits is still waiting or
    # running when its cancel arrives.
    headers = {"Authorization": f"Bearer {service.api_key}"}
    with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as http:
        body = {"job_type": "video_high", "prompt": "ahead", "user_id": USER, "frame_num": 121}
        ahead = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(3)]
        try:
            result = run_cli(
                service, "submit", "video_high", "a long slow pan", "--frame-num", "121"
            )
            assert result.returncode == 0, result.stderr
            job_id = job_id_of(result)
            result = run_cli(service, "cancel", job_id)
            assert result.returncode == 0, result.stderr
            assert f"job {job_id}: cancelled" in result.stdout
        finally:
            for other in ahead:
                http.delete(f"/v1/jobs/{other}")  # 409 once it has ended: fine
    deadline = time.monotonic() + 120
    job = status_json(service, job_id)
    while job["status"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(1)
        job = status_json(service, job_id)
    assert job["status"] == "cancelled"
    assert [asset["status"] for asset in job["assets"]] == ["cancelled"]
    # Waiting on it now says how it ended, and exits 1.
    result = run_cli(service, "wait", job_id)
    assert result.returncode == 1 and f"job {job_id} was cancelled" in result.stderr


def test_bad_arguments_are_refused_with_clear_messages(service: RunningService):
    result = run_cli(service, "submit", "sdxl_image_fastest", "a cat")
    assert result.returncode == 2
    text = " ".join(result.stderr.replace("│", " ").split())
    assert "unknown job type 'sdxl_image_fastest'; valid job types:" in text
    for name in JOB_TYPES:
        assert name in text

    result = run_cli(service, "submit", "sdxl_image_fast", "a cat", "--num-images", "4")
    assert result.returncode == 2
    text = " ".join(result.stderr.replace("│", " ").split())
    assert "4 images are not allowed for sdxl_image_fast; allowed: 1, 3, 6" in text

    # What only the service can judge comes back as its code and message, exit 1.
    result = run_cli(service, "submit", "sdxl_image_fast", "a cat", "--reference-key", "nope.png")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: invalid_request: reference_image_key does not name one of this user's "
    ), result.stderr
    result = run_cli(service, "status", str(uuid4()))
    assert result.returncode == 1 and result.stderr.startswith("error: not_found: ")


def test_a_failed_job_exits_1_with_its_error(service: RunningService):
    reference = service.data_dir / "storage" / "reference_images" / USER / "cli-broken.png"
    reference.parent.mkdir(parents=True, exist_ok=True)
    reference.write_bytes(b"this is not an image")
    key = f"{USER}/cli-broken.png"
    result = run_cli(service, "submit", "sdxl_image_fast", "a cat", "--reference-key", key, "-w")
    assert result.returncode == 1
    job_id = job_id_of(result)
    message = " ".join(result.stderr.split())
    assert message.startswith(f"error: job {job_id} failed: ") and "reference" in message


def test_enhance_and_job_types_answer(service: RunningService):
    result = run_cli(service, "enhance", "a cat on a windowsill", "--target", "sdxl")
    assert result.returncode == 0, result.stderr
    for label in ("original", "a cat on a windowsill", "enhanced", "model", "time", "fallback"):
        assert label in result.stdout
    answer = json.loads(
        run_cli(service, "enhance", "a cat", "--target", "wan_video", "--json").stdout
    )
    assert answer["original_prompt"] == "a cat" and answer["target"] == "wan_video"
    assert isinstance(answer["fallback"], bool)

    result = run_cli(service, "job-types")
    assert result.returncode == 0, result.stderr
    for name in JOB_TYPES:
        assert name in result.stdout

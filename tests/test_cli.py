"""The ``ourvidz-serve`` command line: ``plan``; the HTTP commands' arguments, output and errors.

The HTTP commands run against a small fake of the contract on loopback (scripted SSE streams,
signed-looking file URLs, contract error bodies); the real service is tests/e2e/test_cli_live.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from rich.console import Console
from typer.testing import CliRunner

from ourvidz_serve.catalog import JOB_TYPES, ReferenceType
from ourvidz_serve.cli import app
from ourvidz_serve.cli.client import describe_error_body, file_name_from_url, parse_sse
from ourvidz_serve.cli.jobs import JobFollower, build_job_request
from ourvidz_serve.cli.migrate import redact_dsn
from tests.support.databases import new_database_sync
from tests.support.loopback_http import png_bytes, serving_in_thread

REPO = Path(__file__).resolve().parents[1]
ADA = REPO / "deployments" / "ada-48gb.yaml"
runner = CliRunner()
USER = "6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11"
KEY = "good-key"


@pytest.fixture(autouse=True)
def _no_ambient_connection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer's OURVIDZ_* variables or .ourvidz/dev-api-key leak into these tests."""
    for name in ("OURVIDZ_URL", "OURVIDZ_API_KEY", "OURVIDZ_USER_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OURVIDZ_DATA_DIR", str(tmp_path / "no-data-dir"))


# --- plan ----------------------------------------------------------------------------------


def test_help_lists_the_plan_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "plan" in result.output
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0
    assert "--gpu-memory-gib" in result.output and "--json" in result.output


def test_the_installed_script_answers_help():
    # `make` installs the package with its [project.scripts] entry point beside the interpreter.
    script = Path(sys.executable).with_name("ourvidz-serve")
    assert script.exists(), "the ourvidz-serve script is not installed (pip install -e .)"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("plan", "submit", "status", "cancel", "enhance", "job-types", "migrate"):
        assert command in result.stdout


@pytest.mark.parametrize("name", ["ada-48gb", "h100-80gb", "split-gpus"])
def test_the_hardware_profiles_fit(name):
    result = runner.invoke(app, ["plan", str(REPO / "deployments" / f"{name}.yaml")])
    assert result.exit_code == 0, result.output
    for deployment in ("SDXL", "WAN", "Enhancer", "Per GPU"):
        assert deployment in result.output
    assert "fits" in result.output


def test_json_output_parses():
    result = runner.invoke(app, ["plan", str(ADA), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and plan["problems"] == []
    assert plan["gpu_memory_gib"] == 47.5
    by_name = {d["name"]: d for d in plan["deployments"]}
    assert by_name["Ingress"]["need"] is None
    sdxl = by_name["SDXL"]["need"]
    assert {w["name"] for w in sdxl["weights"]} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert sdxl["total_bytes"] <= by_name["SDXL"]["share_bytes"]
    [gpu] = plan["gpus"]
    assert gpu["replicas"] == ["SDXL#1", "WAN#1", "Enhancer#1"] and gpu["fits"] is True


def test_a_smaller_gpu_than_planned_does_not_fit():
    result = runner.invoke(app, ["plan", str(ADA), "--gpu-memory-gib", "24"])
    assert result.exit_code == 1
    assert "does not fit" in result.output
    assert "NO" in result.output


def test_an_over_full_profile_exits_1(tmp_path):
    document = yaml.safe_load(ADA.read_text())
    for deployment in document["applications"][0]["deployments"]:
        if deployment["name"] != "Ingress":
            deployment["ray_actor_options"]["num_gpus"] = 0.3  # Qwen needs more than 14.2 GiB
    path = tmp_path / "over-full.yaml"
    path.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 1
    plan = json.loads(result.stdout)
    assert plan["fits"] is False
    assert any(p.startswith("Enhancer: a replica needs") for p in plan["problems"])


def test_a_missing_file_is_a_friendly_error():
    result = runner.invoke(app, ["plan", "deployments/no-such-profile.yaml"])
    assert result.exit_code == 2
    assert "error: deployments/no-such-profile.yaml: no such file" in result.output
    assert "Traceback" not in result.output


def test_bad_yaml_and_unknown_deployments_are_friendly_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n")
    result = runner.invoke(app, ["plan", str(broken)])
    assert result.exit_code == 2 and "not valid YAML" in result.output

    document = yaml.safe_load(ADA.read_text())
    document["applications"][0]["deployments"][0]["name"] = "Gateway"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["plan", str(unknown)])
    assert result.exit_code == 2 and "unknown deployment 'Gateway'" in result.output


def test_a_gpu_profile_needs_a_gpu_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("OURVIDZ_GPU_MEMORY_GIB", raising=False)
    document = yaml.safe_load(ADA.read_text())
    del document["applications"][0]["args"]["gpu_memory_gib"]
    path = tmp_path / "no-memory.yaml"
    path.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2 and "--gpu-memory-gib" in result.output
    assert runner.invoke(app, ["plan", str(path), "--gpu-memory-gib", "47.5"]).exit_code == 0


# --- help and light imports -------------------------------------------------------------------

COMMAND_OPTIONS = {
    "submit": ["--num-images", "--seed", "--negative-prompt", "--reference-key", "--reference-url",
               "--reference-type", "--reference-strength", "--frame-num", "--wait", "--output",
               "--url", "--api-key", "--user-id"],
    "wait": ["--output", "--timeout"],
    "status": ["--json", "--url", "--api-key"],
    "cancel": ["--url", "--api-key"],
    "enhance": ["--target", "--json"],
    "job-types": ["--json"],
    "migrate": ["OURVIDZ_DATABASE_URL", "OURVIDZ_DATA_DIR"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in COMMAND_OPTIONS[command]:
        assert option in result.output


def test_the_global_help_names_the_connection_options_and_their_variables():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("--url", "OURVIDZ_URL", "--api-key", "OURVIDZ_API_KEY", "--user-id",
                 "http://127.0.0.1:8000", ".ourvidz/dev-api-key"):  # fmt: skip
        assert text in result.output


def test_importing_the_cli_imports_no_model_or_database_library():
    code = (
        "import sys, ourvidz_serve.cli; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'asyncpg', 'pgserver', "
        "'ray') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- argument errors (nothing is sent) --------------------------------------------------------

NOWHERE = ["--url", "http://127.0.0.1:9", "--api-key", KEY, "--user-id", USER]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["submit", "sdxl_fast", "x"], "unknown job type 'sdxl_fast'; valid job types: "
         "sdxl_image_fast, sdxl_image_high, image_fast"),
        (["submit", "sdxl_image_fast", "x", "--num-images", "4"],
         "4 images are not allowed for sdxl_image_fast; allowed: 1, 3, 6"),
        (["submit", "video_fast", "x", "-n", "3"], "3 images are not allowed for video_fast"),
        (["submit", "video_fast", "x", "--negative-prompt", "blurry"], "only SDXL job types"),
        (["submit", "image_fast", "x", "--reference-key", "a/b.png"], "only SDXL job types"),
        (["submit", "image_fast", "x", "--frame-num", "33"], "only video job types"),
        (["submit", "video_fast", "x", "--frame-num", "500"], "less than or equal to 121"),
        (["submit", "sdxl_image_fast", "x", "--seed", "-1"], "--seed"),
        (["submit", "sdxl_image_fast", "x", "--reference-strength", "2"], "--reference-strength"),
        (["submit", "sdxl_image_fast", "x", "--reference-key", "k", "--reference-url",
          "https://example.com/a.png"], "not both"),
        (["submit", "sdxl_image_fast", "x", "--reference-type", "style"], "needs a reference"),
        (["submit", "sdxl_image_fast", "x", "--reference-type", "mood", "--reference-key", "k"],
         "'mood' is not one of 'style', 'composition', 'character'"),
        (["submit", "sdxl_image_fast", "   "], "the prompt is empty"),
        (["submit", "sdxl_image_fast", "x" * 2001], "at most 2000"),
        (["submit", "sdxl_image_fast", "x", "--metadata", "{nope"], "not valid JSON"),
        (["submit", "sdxl_image_fast", "x", "--metadata", "[1]"], "must be a JSON object"),
        (["status", "not-a-uuid"], "valid UUID"),
        (["cancel", "42"], "valid UUID"),
        (["enhance", "a cat", "--target", "midjourney"],
         "'midjourney' is not one of 'sdxl', 'wan_image', 'wan_video'"),
        (["enhance", "  "], "the prompt is empty"),
    ],
)  # fmt: skip
def test_bad_arguments_are_usage_errors_with_clear_messages(arguments, expected):
    result = runner.invoke(app, [*NOWHERE, *arguments], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output and "cannot reach" not in result.output


def test_a_service_key_needs_a_user_id_for_submit():
    result = runner.invoke(
        app, ["--api-key", KEY, "submit", "sdxl_image_fast", "x"], terminal_width=300
    )
    assert result.exit_code == 2
    assert "give --user-id UUID" in " ".join(result.output.replace("│", " ").split())


def test_a_bad_url_is_a_usage_error():
    result = runner.invoke(app, ["--url", "localhost:8000", "job-types"], terminal_width=300)
    assert result.exit_code == 2
    assert "'localhost:8000' is not an http(s) URL" in result.output


def test_the_request_body_carries_only_what_was_given():
    body = build_job_request(
        "sdxl_image_high",
        "  a lighthouse  ",
        user_id=uuid.UUID(USER),
        num_images=6,
        seed=7,
        reference_key="u/ref.png",
        reference_type=ReferenceType.CHARACTER,
    )
    assert body == {
        "job_type": "sdxl_image_high",
        "prompt": "a lighthouse",
        "user_id": USER,
        "num_images": 6,
        "seed": 7,
        "reference_image_key": "u/ref.png",
        "reference_type": "character",
    }
    assert build_job_request("video_high", "a wave", frame_num=33) == {
        "job_type": "video_high",
        "prompt": "a wave",
        "frame_num": 33,
    }
    for name, spec in JOB_TYPES.items():  # every catalog type and count it allows passes
        for count in spec.allowed_num_images:
            assert build_job_request(name, "p", num_images=count)["num_images"] == count
    with pytest.raises(typer.BadParameter):
        build_job_request("image7b_fast_enhanced", "p", num_images=3)


# --- rendering helpers ------------------------------------------------------------------------


def test_contract_error_bodies_render_as_code_and_message():
    body = {"error": {"code": "invalid_request", "message": "num_images: not allowed"}}
    assert describe_error_body(422, "Unprocessable", json.dumps(body)) == (
        "invalid_request: num_images: not allowed"
    )
    details = [
        {"loc": ["body", "seed"], "msg": "too big"},
        {"loc": ["body", "frame_num"], "msg": "too small"},
        {"loc": [], "msg": "and this"},
    ]
    body = {"error": {"code": "invalid_request", "message": "seed: too big", "details": details}}
    assert describe_error_body(422, "", json.dumps(body)) == (
        "invalid_request: seed: too big\n  - frame_num: too small\n  - and this"
    )
    assert describe_error_body(502, "Bad Gateway", "<html>\n<b>oops</b>\n</html>") == (
        "HTTP 502 Bad Gateway: <html> <b>oops</b> </html>"
    )
    assert describe_error_body(500, "Internal Server Error", "") == "HTTP 500 Internal Server Error"
    assert describe_error_body(404, "Not Found", '{"detail": "Not Found"}') == (
        'HTTP 404 Not Found: {"detail": "Not Found"}'
    )


def test_the_sse_parser_follows_the_event_stream_rules():
    lines = [
        ": ping",
        "event: status",
        'data: {"status": "queued"}',
        "id: 1",
        "",
        "",  # a second blank line dispatches nothing
        "event:progress\r",  # no space after the colon; CR stripped
        "data: {",
        'data: "step": 2, "total": 15}',
        "",
        "data: no type",
        "retry: 1000",
        "",
        "event: asset",
        "",  # no data: dropped
        "event: status",
        'data: {"status": "completed"}',  # no final blank line: not dispatched
    ]
    events = list(parse_sse(lines))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("status", '{"status": "queued"}', "1"),
        ("progress", '{\n"step": 2, "total": 15}', "1"),
        ("message", "no type", "1"),
    ]
    assert json.loads(events[1].data) == {"step": 2, "total": 15}


def test_file_names_come_from_the_signed_url():
    url = "http://127.0.0.1:8000/v1/files/sdxl_image_fast/u/j_0.png?expires=1&signature=x"
    assert file_name_from_url(url, "fallback.png") == "j_0.png"
    s3 = "https://s3.example.com/ourvidz-video-fast/u/j.mp4?X-Amz-Signature=abc"
    assert file_name_from_url(s3, "f") == "j.mp4"
    assert file_name_from_url("http://host/a/%2E%2E?x", "safe.png") == "safe.png"
    assert file_name_from_url("http://host/", "safe.png") == "safe.png"


def test_dsn_passwords_are_not_printed():
    assert redact_dsn("postgresql://app:s3cret@db:5432/ourvidz") == (
        "postgresql://app:***@db:5432/ourvidz"
    )
    assert redact_dsn("postgresql://db/ourvidz") == "postgresql://db/ourvidz"


def test_a_terminal_gets_a_progress_bar():
    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=True, width=120)
    job = {"id": str(uuid.uuid4()), "job_type": "sdxl_image_fast", "status": "queued",
           "assets": [{}, {}, {}]}  # fmt: skip
    with JobFollower(out, job) as follower:
        follower.on_event("status", {"status": "processing"})
        for step in range(1, 16):
            follower.on_event("progress", {"step": step, "total": 15})
        follower.on_event("asset", {"index": 0, "url": "http://x/a.png"})
        follower.on_event("status", {"status": "completed"})
    text = buffer.getvalue()
    assert "15/15" in text and "━" in text
    assert "status: processing" in text and "asset 1/3 stored" in text


# --- the HTTP commands against a fake of the contract on loopback -----------------------------


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": None}}


@dataclass
class FakeService:
    """The routes the CLI uses; a job's prompt scripts its stream: 'fail', 'drop', 'late'."""

    origin: str = ""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    streams: list[tuple[str, str | None]] = field(default_factory=list)
    file_auth: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_job(self, body: dict[str, Any]) -> dict[str, Any]:
        job_id = str(uuid.uuid4())
        spec = JOB_TYPES[body["job_type"]]
        count = body.get("num_images", 1)
        assets = [
            {
                "id": str(uuid.uuid4()),
                "kind": spec.format.value,
                "index": i,
                "status": "queued",
                "bucket": spec.bucket,
                "path": f"{body['user_id']}/{job_id}"
                + (f".{spec.file_extension}" if spec.format.value == "video" else f"_{i}.png"),
                "url": None,
                "thumbnail_url": None,
                "seed": 42 + i,
                "metadata": {},
                "completed_at": None,
            }
            for i in range(count)
        ]
        job = {
            "id": job_id,
            "user_id": body["user_id"],
            "job_type": spec.job_type,
            "format": spec.format.value,
            "quality": spec.quality.value,
            "status": "queued",
            "prompt": body["prompt"],
            "metadata": {"seed": 42},
            "attempts": 0,
            "error_message": None,
            "progress": None,
            "assets": assets,
        }
        self.jobs[job_id] = job
        return job

    def finish(self, job: dict[str, Any], status: str) -> None:
        job["status"] = status
        if status == "failed":
            job["error_message"] = "OutOfMemory: the replica ran out of GPU memory"
        if status != "completed":
            return
        job["metadata"]["generation_time"] = 1.25
        for asset in job["assets"]:
            name = asset["path"].rsplit("/", 1)[-1]
            asset["status"] = "completed"
            asset["url"] = f"{self.origin}/v1/files/{asset['bucket']}/{name}?signature=s"
            if asset["kind"] == "video":
                poster = name.replace(".mp4", "_poster.webp")
                asset["thumbnail_url"] = f"{self.origin}/v1/files/{asset['bucket']}/{poster}?s=1"

    def script(self, job: dict[str, Any], reconnect: bool) -> list[tuple[str, dict[str, Any]]]:
        total = 4
        prompt = job["prompt"]
        events: list[tuple[str, dict[str, Any]]] = [("status", {"status": "queued"})]
        events.append(("status", {"status": "processing"}))
        events += [("progress", {"step": s, "total": total}) for s in range(1, total + 1)]
        if prompt == "drop" and not reconnect:
            return events[:4]  # the stream breaks off mid-job
        if prompt == "late":  # it ended before the stream opened: its files, then the end
            self.finish(job, "completed")
            job["progress"] = {"step": 25, "total": 25, "at": "2026-01-01T00:00:00Z"}
            assets = [("asset", {"index": a["index"], "url": a["url"]}) for a in job["assets"]]
            return [*assets, ("status", {"status": "completed"})]
        if prompt == "fail":
            self.finish(job, "failed")
            return [*events[:3], ("status", {"status": "failed"})]
        self.finish(job, "completed")
        for asset in job["assets"]:
            events.append(("asset", {"index": asset["index"], "url": asset["url"]}))
        return [*events, ("status", {"status": "completed"})]


@pytest.fixture
def fake() -> Iterator[FakeService]:
    state = FakeService()
    video = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {KEY}":
                return True
            self._json(401, _error("unauthorized", "invalid API key or token"))
            return False

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/v1/files/"):
                state.file_auth.append(self.headers.get("Authorization"))
                name = path.rsplit("/", 1)[-1]
                data = png_bytes() if name.endswith(".png") else video
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if not self._authorized():
                return
            parts = path.strip("/").split("/")
            if path == "/v1/job-types":
                self._json(200, [{"job_type": n, **s.model_dump(mode="json"), "fps": 16,
                                  "model_variant": s.model_variant}
                                 for n, s in JOB_TYPES.items()])  # fmt: skip
            elif len(parts) >= 3 and parts[2] in state.jobs:
                job = state.jobs[parts[2]]
                if len(parts) == 4 and parts[3] == "events":
                    self._stream(job)
                else:
                    self._json(200, job)
            else:
                self._json(404, _error("not_found", "no such job"))

        def _stream(self, job: dict[str, Any]) -> None:
            with state.lock:
                reconnect = any(j == job["id"] for j, _ in state.streams)
                state.streams.append((job["id"], self.headers.get("Last-Event-ID")))
                events = state.script(job, reconnect)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b": ping\n\n")
            for number, (kind, data) in enumerate(events, start=1):
                chunk = f"event: {kind}\ndata: {json.dumps(data)}\nid: {number}\n\n"
                self.wfile.write(chunk.encode())
                self.wfile.flush()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self._authorized():
                return
            state.bodies.append(body)
            if self.path == "/v1/enhance":
                answer = {
                    "original_prompt": body["prompt"],
                    "enhanced_prompt": body["prompt"] + ", golden hour, 35mm",
                    "target": body["target"],
                    "model": "qwen2.5-7b-instruct",
                    "generation_time": 0.42,
                    "fallback": False,
                    "warning": None,
                }
                self._json(200, answer)
            elif body.get("prompt") == "refuse":
                self._json(422, _error("prompt_refused", "the prompt breaks the content policy"))
            else:
                self._json(202, state.new_job(body))

        def do_DELETE(self) -> None:
            if not self._authorized():
                return
            job = state.jobs.get(self.path.strip("/").split("/")[2])
            if job is None:
                self._json(404, _error("not_found", "no such job"))
            elif job["status"] in ("completed", "failed"):
                message = f"job {job['id']} has already ended {job['status']}"
                self._json(409, _error("conflict", message))
            else:
                state.finish(job, "cancelled")
                self._json(200, job)

    with serving_in_thread(Handler) as server:
        state.origin = f"http://127.0.0.1:{server.server_address[1]}"
        yield state


def cli(fake: FakeService, *arguments: str, key: str = KEY) -> Any:
    options = ["--url", fake.origin, "--api-key", key, "--user-id", USER]
    return runner.invoke(app, [*options, *arguments], terminal_width=200)


def test_submit_prints_the_job_id(fake):
    result = cli(fake, "submit", "sdxl_image_fast", "a lighthouse", "-n", "3", "--seed", "42")
    assert result.exit_code == 0, result.output
    [job_id] = fake.jobs
    assert f"job id: {job_id}" in result.stdout
    assert "submitted sdxl_image_fast job (3 images, seed 42): queued" in result.stdout
    assert fake.bodies == [
        {"job_type": "sdxl_image_fast", "prompt": "a lighthouse", "user_id": USER,
         "num_images": 3, "seed": 42}
    ]  # fmt: skip


def test_submit_wait_output_follows_the_stream_and_downloads_every_file(fake, tmp_path):
    out = tmp_path / "out"
    result = cli(fake, "submit", "sdxl_image_fast", "a lighthouse", "-n", "3", "--output", str(out))
    assert result.exit_code == 0, result.output
    [job_id] = fake.jobs
    for text in ("status: processing", "progress: step 1/4", "progress: step 4/4",
                 "asset 3/3 stored", f"completed: job {job_id} in 1.2 s",
                 f"saved 3 file(s) to {out}"):  # fmt: skip
        assert text in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{job_id}_{i}.png" for i in range(3)]
    assert (out / names[0]).read_bytes() == png_bytes()
    assert fake.file_auth == [None, None, None], "signed URLs are fetched without the API key"


def test_a_video_download_includes_its_poster(fake, tmp_path):
    result = cli(
        fake, "submit", "video_fast", "waves", "--frame-num", "33", "-w", "-o", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    [job_id] = fake.jobs
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{job_id}.mp4", f"{job_id}_poster.webp"]
    assert fake.bodies[0]["frame_num"] == 33


def test_a_failed_job_exits_1_with_its_error(fake):
    result = cli(fake, "submit", "image_fast", "fail", "--wait")
    assert result.exit_code == 1
    [job_id] = fake.jobs
    assert f"error: job {job_id} failed: OutOfMemory: the replica ran out of GPU memory" in (
        " ".join(result.stderr.split())
    )


def test_a_job_that_ended_before_the_stream_shows_its_last_step(fake):
    result = cli(fake, "submit", "image_fast", "late", "--wait")
    assert result.exit_code == 0, result.output
    assert "progress: step 25/25" in result.stdout
    assert "status: completed" in result.stdout


def test_a_broken_stream_is_reopened_with_last_event_id(fake):
    result = cli(fake, "submit", "image_fast", "drop", "--wait")
    assert result.exit_code == 0, result.output
    [job_id] = fake.jobs
    assert fake.streams == [(job_id, None), (job_id, "4")]
    assert "completed" in result.stdout


def test_submit_json_prints_the_resource(fake):
    result = cli(fake, "submit", "image_high", "a fox", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] in fake.jobs


def test_wait_on_a_submitted_job(fake, tmp_path):
    result = cli(fake, "submit", "image_fast", "a fox")
    [job_id] = fake.jobs
    result = cli(fake, "wait", job_id, "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == [f"{job_id}_0.png"]


def test_http_errors_print_the_contract_code_and_message(fake):
    result = cli(fake, "submit", "sdxl_image_fast", "refuse")
    assert result.exit_code == 1
    assert "error: prompt_refused: the prompt breaks the content policy" in result.stderr
    missing = str(uuid.uuid4())
    result = cli(fake, "status", missing)
    assert result.exit_code == 1 and "error: not_found: no such job" in result.stderr


def test_a_refused_key_gets_a_hint(fake):
    result = cli(fake, "job-types", key="wrong")
    assert result.exit_code == 1
    assert "error: unauthorized: invalid API key or token" in result.stderr
    assert "refused the API key (from option)" in result.stderr


def test_the_dev_key_file_is_the_default_key(fake, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dev-api-key").write_text(KEY + "\n")
    monkeypatch.setenv("OURVIDZ_DATA_DIR", str(data_dir))
    result = runner.invoke(app, ["--url", fake.origin, "job-types"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # The environment wins over the file; a per-command option over both.
    monkeypatch.setenv("OURVIDZ_API_KEY", "wrong")
    assert runner.invoke(app, ["--url", fake.origin, "job-types"]).exit_code == 1
    assert runner.invoke(app, ["job-types", "--url", fake.origin, "--api-key", KEY]).exit_code == 0
    monkeypatch.setenv("OURVIDZ_URL", fake.origin)
    assert runner.invoke(app, ["--api-key", KEY, "job-types"]).exit_code == 0


def test_no_key_anywhere_is_explained(fake):
    result = runner.invoke(app, ["--url", fake.origin, "job-types"], terminal_width=200)
    assert result.exit_code == 1
    assert "no API key: give --api-key, set OURVIDZ_API_KEY" in " ".join(result.stderr.split())


def test_an_unreachable_service_is_explained():
    with serving_in_thread(BaseHTTPRequestHandler) as server:
        port = server.server_address[1]
    # the port was just closed: nothing listens there now
    result = runner.invoke(app, ["--url", f"http://127.0.0.1:{port}", "job-types"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: cannot reach http://127.0.0.1:{port}: is the service running? (make serve)"
    )


def test_status_shows_a_table_and_raw_json(fake):
    cli(fake, "submit", "video_high", "waves", "--wait")
    [job_id] = fake.jobs
    result = cli(fake, "status", job_id)
    assert result.exit_code == 0, result.output
    [asset] = fake.jobs[job_id]["assets"]
    for text in (job_id, "video_high (video, high)", "completed", "Assets", f"{job_id}.mp4",
                 f"0 url: {asset['url']}", f"0 poster: {asset['thumbnail_url']}"):  # fmt: skip
        assert text in result.stdout
    raw = cli(fake, "status", job_id, "--json")
    assert json.loads(raw.stdout) == fake.jobs[job_id]


def test_cancel_and_cancelling_a_finished_job(fake):
    cli(fake, "submit", "video_high", "waves")
    [job_id] = fake.jobs
    result = cli(fake, "cancel", job_id)
    assert result.exit_code == 0 and f"job {job_id}: cancelled" in result.stdout
    fake.jobs[job_id]["status"] = "completed"
    result = cli(fake, "cancel", job_id)
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert f"error: cannot cancel job {job_id}: conflict: job {job_id} has already ended" in message
    assert "only a queued or running job can be cancelled" in message


def test_enhance_prints_the_answer(fake):
    result = cli(fake, "enhance", "a cat", "--target", "wan_video")
    assert result.exit_code == 0, result.output
    for text in ("original", "a cat", "enhanced", "a cat, golden hour, 35mm",
                 "qwen2.5-7b-instruct", "0.42 s", "fallback", "no"):  # fmt: skip
        assert text in result.stdout
    assert fake.bodies == [{"prompt": "a cat", "target": "wan_video"}]
    raw = cli(fake, "enhance", "a cat", "--json")
    assert json.loads(raw.stdout)["target"] == "sdxl"


def test_job_types_lists_the_catalog(fake):
    result = cli(fake, "job-types")
    assert result.exit_code == 0, result.output
    for name in JOB_TYPES:
        assert name in result.stdout
    assert "1, 3, 6" in result.stdout and "832x480" in result.stdout


# --- migrate ------------------------------------------------------------------------------------


def test_migrate_applies_the_migrations_once(database_url, monkeypatch):
    with new_database_sync(database_url, "cli_migrate") as dsn:
        monkeypatch.setenv("OURVIDZ_DATABASE_URL", dsn)
        versions = sorted(
            int(p.name[:4]) for p in (REPO / "schemas" / "migrations").glob("[0-9]*.sql")
        )
        first = runner.invoke(app, ["migrate"], terminal_width=200)
        assert first.exit_code == 0, first.output
        assert f"applied migrations: {', '.join(map(str, versions))}" in first.stdout
        again = runner.invoke(app, ["migrate"], terminal_width=200)
        assert again.exit_code == 0, again.output
        assert "already up to date" in again.stdout
        assert "initial" in again.stdout


def test_migrate_reports_bad_settings(monkeypatch):
    monkeypatch.setenv("OURVIDZ_LEASE_S", "1")
    monkeypatch.setenv("OURVIDZ_HEARTBEAT_INTERVAL_S", "5")
    result = runner.invoke(app, ["migrate"], terminal_width=200)
    assert result.exit_code == 2
    assert "invalid OURVIDZ_* settings" in result.stderr and "heartbeat_interval_s" in result.stderr


def test_migrate_reports_an_unreachable_database(monkeypatch):
    monkeypatch.setenv("OURVIDZ_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    result = runner.invoke(app, ["migrate"], terminal_width=200)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot migrate:")

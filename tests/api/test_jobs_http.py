"""The jobs API over HTTP, in-process: validation, auth, errors, and the job lifecycle."""

from __future__ import annotations

import asyncio
import io
import time
from uuid import UUID, uuid4

import asyncpg
import httpx
import jwt
import pytest
from PIL import Image
from pydantic import SecretStr

from ourvidz_serve.api.app import create_app
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import create_storage
from tests.conftest import TEST_API_KEY

USER = "6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11"


def job(**fields) -> dict:
    return {"job_type": "sdxl_image_fast", "prompt": "a lighthouse at dusk", "user_id": USER} | (
        fields
    )


async def row_counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM jobs) AS j, (SELECT count(*) FROM images) AS i, "
        "(SELECT count(*) FROM videos) AS v"
    )
    return row["j"], row["i"], row["v"]


async def wait_for_terminal(client: httpx.AsyncClient, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = (await client.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")


def assert_error(response: httpx.Response, status: int, code: str, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]
    assert "Traceback" not in response.text


BAD_REQUESTS = [
    (job(job_type="sdxl_image_ultra"), "unknown job type"),
    (job(prompt=""), "prompt"),
    (job(prompt="   "), "prompt"),
    (job(prompt="x" * 2001), "at most 2000"),
    ({"job_type": "sdxl_image_fast", "user_id": USER}, "prompt: Field required"),
    (job(user_id=None), "user_id is required"),
    (job(user_id="not-a-uuid"), "valid UUID"),
    (job(num_images=4), "num_images=4"),
    (job(job_type="video_fast", num_images=3), "num_images=3"),
    (job(seed=-5), "seed"),
    (job(seed=2**32), "seed"),
    (job(job_type="image_high", negative_prompt="blur"), "only supported by SDXL"),
    (job(reference_image_key=f"{USER}/missing.png"), "not name one of this user's"),
    (job(reference_image_key="../../etc/passwd"), "not name one of this user's"),
    (job(reference_image_key=f"{USER}/../../etc/passwd"), "'..' path segment"),
    (job(reference_type="pose"), "reference_type"),
    (job(reference_strength=0), "reference_strength"),
    (job(job_type="image_fast", frame_num=17), "only supported by WAN video"),
    (job(job_type="video_fast", frame_num=500), "frame_num"),
    (job(project_id="nope"), "project_id"),
    (job(metadata={"big": "x" * 20_000}), "metadata is"),
    (job(surprise=True), "Extra inputs"),
    (job(seed=True), "seed"),
    (job(seed="12"), "seed"),
    (job(num_images=3.0), "num_images"),
    (job(job_type="video_fast", reference_strength=0.5), "only supported by SDXL"),
    (job(metadata={"error_type": "forged"}), "set by the service"),
    (job(metadata={"generation_time": 0.1}), "set by the service"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_REQUESTS)
async def test_invalid_submission_gets_422_with_the_error_body_and_leaves_no_row(
    client, repository, body, fragment, pool
):
    response = await client.post("/v1/jobs", json=body)
    assert_error(response, 422, "invalid_request", fragment)
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_body_that_is_not_json_gets_422_and_leaves_no_row(client, repository, pool):
    response = await client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_request_without_credentials_gets_401(client, repository, pool):
    for headers in (
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic x"},
    ):
        response = await client.post("/v1/jobs", json=job(), headers=headers)
        assert_error(response, 401, "unauthorized")
    assert_error(await client.get("/v1/jobs", headers={"Authorization": ""}), 401, "unauthorized")
    assert await row_counts(pool) == (0, 0, 0)


async def test_healthz_needs_no_credential_and_readyz_checks_everything(client):
    assert (await client.get("/healthz", headers={"Authorization": ""})).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "storage", "models", "loops"}
    # The ingress's background loops, each with its last success.
    assert set(checks["loops"]) == {"reaper", "job-events"}
    assert all(loop["running"] and loop["failures"] == 0 for loop in checks["loops"].values())


async def test_unknown_routes_and_jobs_get_the_error_body(client):
    assert_error(await client.get("/v1/nothing"), 404, "not_found")
    assert_error(await client.get(f"/v1/jobs/{uuid4()}"), 404, "not_found")
    assert_error(await client.get("/v1/jobs/not-a-uuid"), 422, "invalid_request")
    assert_error(await client.get("/v1/jobs?limit=0"), 422, "invalid_request")
    assert_error(await client.get("/v1/jobs?cursor=%%%"), 422, "invalid_request", "cursor")


async def test_job_types_lists_the_ten_types(client):
    body = (await client.get("/v1/job-types")).json()
    assert len(body) == 10
    video = next(t for t in body if t["job_type"] == "video_high")
    assert (video["steps"], video["num_frames"], video["fps"]) == (50, 81, 16)


async def test_openapi_document_is_served(client):
    document = (await client.get("/openapi.json")).json()
    assert "/v1/jobs" in document["paths"]
    assert "JobRequest" in document["components"]["schemas"]


async def test_sdxl_job_runs_to_completion_and_its_images_download(client, repository, pool):
    response = await client.post("/v1/jobs", json=job(num_images=3, seed=42))
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["status"] == "queued"
    assert [a["index"] for a in submitted["assets"]] == [0, 1, 2]
    assert await row_counts(pool) == (1, 3, 0)

    done = await wait_for_terminal(client, submitted["id"])
    assert done["status"] == "completed", done["error_message"]
    assert [a["seed"] for a in done["assets"]] == [42, 43, 44]
    for asset in done["assets"]:
        assert asset["path"] == f"{USER}/{submitted['id']}_{asset['index']}.png"
        download = await client.get(asset["url"], headers={"Authorization": ""})
        assert download.status_code == 200
        assert Image.open(io.BytesIO(download.content)).format == "PNG"
    assert done["metadata"]["generation_time"] > 0


async def test_a_tampered_download_url_is_refused(client):
    submitted = (await client.post("/v1/jobs", json=job(seed=1))).json()
    done = await wait_for_terminal(client, submitted["id"])
    url = done["assets"][0]["url"]
    assert_error(await client.get(url.replace("signature=", "signature=0")), 403, "forbidden")
    other = url.replace("_0.png", "_1.png")
    assert_error(await client.get(other), 403, "forbidden")


async def test_enhanced_job_records_original_and_enhanced_prompts(client):
    submitted = (
        await client.post("/v1/jobs", json=job(job_type="image7b_fast_enhanced", prompt="a fox"))
    ).json()
    done = await wait_for_terminal(client, submitted["id"])
    assert done["status"] == "completed", done["error_message"]
    assert done["metadata"]["original_prompt"] == "a fox"
    assert isinstance(done["metadata"]["enhanced_prompt"], str)
    assert done["metadata"]["enhanced_prompt"]


async def test_a_reference_that_is_not_an_image_fails_the_job_with_its_error_type(
    client, settings: Settings
):
    storage = create_storage(settings)
    await storage.start()
    await storage.put("reference_images", f"{USER}/ref.png", b"not an image", "image/png")
    await storage.close()
    submitted = (
        await client.post("/v1/jobs", json=job(reference_image_key=f"{USER}/ref.png"))
    ).json()
    done = await wait_for_terminal(client, submitted["id"])
    assert done["status"] == "failed"
    assert done["error_message"]
    assert done["metadata"]["error_type"] == "InvalidRequest"
    assert {a["status"] for a in done["assets"]} == {"failed"}


async def test_reference_image_runs_image_to_image(client, settings: Settings):
    buffer = io.BytesIO()
    Image.new("RGB", (80, 48), (200, 30, 30)).save(buffer, format="PNG")
    storage = create_storage(settings)
    await storage.start()
    await storage.put("reference_images", f"{USER}/red.png", buffer.getvalue(), "image/png")
    await storage.close()
    body = job(reference_image_key=f"{USER}/red.png", reference_strength=0.5, seed=3)
    done = await wait_for_terminal(client, (await client.post("/v1/jobs", json=body)).json()["id"])
    assert done["status"] == "completed", done["error_message"]
    assert done["metadata"]["reference_strength"] == 0.5
    assert done["metadata"]["reference_type"] == "style"


async def test_idempotency_key_replays_the_job_or_conflicts(client, repository, pool):
    headers = {"Idempotency-Key": "order-17"}
    first = await client.post("/v1/jobs", json=job(seed=5), headers=headers)
    again = await client.post("/v1/jobs", json=job(seed=5), headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    conflict = await client.post("/v1/jobs", json=job(seed=6), headers=headers)
    assert_error(conflict, 409, "conflict")
    assert (await row_counts(pool))[0] == 1


async def test_list_pages_newest_first_with_filters(client):
    ids = [(await client.post("/v1/jobs", json=job(seed=i))).json()["id"] for i in range(3)]
    await client.post("/v1/jobs", json=job(user_id=str(uuid4())))
    first = (await client.get(f"/v1/jobs?user_id={USER}&limit=2")).json()
    second = (
        await client.get(f"/v1/jobs?user_id={USER}&limit=2&cursor={first['next_cursor']}")
    ).json()
    assert [j["id"] for j in first["jobs"] + second["jobs"]] == list(reversed(ids))
    assert second["next_cursor"] is None
    only_video = (await client.get("/v1/jobs?job_type=video_fast")).json()
    assert only_video["jobs"] == []


async def test_a_user_token_sees_and_lists_only_its_own_jobs(settings, tiny_models, repository):
    secret = "user-token-secret-for-tests-0123456789"
    app = create_app(settings.model_copy(update={"jwt_secret": SecretStr(secret)}), tiny_models)
    owner, stranger = uuid4(), uuid4()

    def token(user: UUID) -> str:
        claims = {"sub": str(user), "exp": int(time.time()) + 600}
        return jwt.encode(claims, secret, algorithm="HS256")

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            as_owner = {"Authorization": f"Bearer {token(owner)}"}
            as_stranger = {"Authorization": f"Bearer {token(stranger)}"}
            body = {"job_type": "sdxl_image_fast", "prompt": "a boat"}
            created = await http.post("/v1/jobs", json=body, headers=as_owner)
            assert created.status_code == 202, created.text
            assert created.json()["user_id"] == str(owner)
            job_id = created.json()["id"]
            assert (await http.get(f"/v1/jobs/{job_id}", headers=as_owner)).status_code == 200
            hidden = await http.get(f"/v1/jobs/{job_id}", headers=as_stranger)
            assert_error(hidden, 404, "not_found")
            assert (await http.get("/v1/jobs", headers=as_stranger)).json()["jobs"] == []
            expired = jwt.encode({"sub": str(owner), "exp": 1}, secret, algorithm="HS256")
            refused = await http.get("/v1/jobs", headers={"Authorization": f"Bearer {expired}"})
            assert_error(refused, 401, "unauthorized", "expired")
            other_user = await http.post(
                "/v1/jobs", json=body | {"user_id": str(stranger)}, headers=as_owner
            )
            assert_error(other_user, 403, "forbidden", "does not match")
            other_list = await http.get(f"/v1/jobs?user_id={stranger}", headers=as_owner)
            assert_error(other_list, 403, "forbidden", "only list their own")


async def test_the_ingress_alone_accepts_jobs_and_leaves_them_queued(
    settings, tiny_models, repository
):
    """The ingress runs no jobs: without a model replica, a job waits in the queue."""
    app = create_app(settings, tiny_models)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers
        ) as http:
            submitted = (await http.post("/v1/jobs", json=job())).json()
            await asyncio.sleep(1.0)
            assert (await http.get(f"/v1/jobs/{submitted['id']}")).json()["status"] == "queued"


async def test_closed_sets_are_enums_in_the_openapi_document(client):
    """The platform generates TypeScript from it: a typo in a job type must not compile."""
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]

    def enum_of(model: str, field: str) -> list[str]:
        spec = schemas[model]["properties"][field]
        if "$ref" in spec:
            spec = schemas[spec["$ref"].rsplit("/", 1)[1]]
        assert "enum" in spec, (model, field, spec)
        return list(spec["enum"])

    assert len(enum_of("JobResource", "job_type")) == 10
    assert len(enum_of("JobTypeResource", "job_type")) == 10
    assert len(enum_of("JobRequest", "job_type")) == 10
    assert set(enum_of("JobResource", "status")) == {
        "queued",
        "processing",
        "completed",
        "failed",
        "cancelled",
    }
    assert set(enum_of("JobResource", "format")) == {"image", "video"}
    assert set(enum_of("JobResource", "quality")) == {"fast", "high"}
    assert set(enum_of("JobRequest", "reference_type")) == {"style", "composition", "character"}
    assert set(enum_of("EnhanceBody", "target")) == {"sdxl", "wan_image", "wan_video"}

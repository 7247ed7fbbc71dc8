"""The LoRA registry over HTTP, in-process over real PostgreSQL and local storage: uploads
checked before anything is stored, listing, retiring, and jobs naming LoRAs."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import AsyncIterator
from io import BytesIO
from uuid import uuid4

import asyncpg
import httpx
import pytest
import torch

from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import LORAS_BUCKET, create_storage, lora_key
from tests.api.test_jobs_http import assert_error, job, row_counts
from tests.api.test_security_http import SERVICE, as_user, serving
from tests.support.loras import lora_file

MAX_RANK = 8
MAX_BYTES = 64 * 1024


@pytest.fixture
def lora_settings(secure_settings: Settings) -> Settings:
    return secure_settings.model_copy(
        update={
            "sdxl_lora_max_rank": MAX_RANK,
            "sdxl_lora_max_bytes": MAX_BYTES,
            "sdxl_max_loras_per_job": 2,
        }
    )


@pytest.fixture
async def http(lora_settings, tiny_models, repository) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(lora_settings, tiny_models) as client:
        yield client


async def upload(
    http: httpx.AsyncClient, data: bytes, name: str = "film-grain", headers: dict | None = None
) -> httpx.Response:
    return await http.post(
        "/v1/loras",
        data={"name": name},
        files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
        headers=headers or SERVICE,
    )


async def stored_files(settings: Settings) -> list[str]:
    storage = create_storage(settings)
    await storage.start()
    try:
        return await storage.list_keys(LORAS_BUCKET, "sdxl/")
    finally:
        await storage.close()


async def registry_rows(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM loras"))


async def test_an_upload_is_stored_by_its_digest_and_listed(http, lora_settings, pool):
    data = lora_file(rank=4, naming="kohya")
    response = await upload(http, data)
    assert response.status_code == 201, response.text
    body = response.json()
    digest = hashlib.sha256(data).hexdigest()
    assert body | {"created_at": None, "targets": sorted(body["targets"])} == {
        "name": "film-grain",
        "digest": digest,
        "rank": 4,
        "size_bytes": len(data),
        "format": "kohya",
        "dtype": "F16",
        "targets": ["text_encoder", "unet"],
        "created_at": None,
    }
    assert await stored_files(lora_settings) == [lora_key(digest)]
    listed = (await http.get("/v1/loras", headers=as_user(uuid4()))).json()["data"]
    assert [(lora["name"], lora["digest"]) for lora in listed] == [("film-grain", digest)]


async def test_the_same_file_under_two_names_is_stored_once(http, lora_settings):
    data = lora_file()
    assert (await upload(http, data, "one")).status_code == 201
    assert (await upload(http, data, "two")).status_code == 201
    assert len(await stored_files(lora_settings)) == 1


def truncated() -> bytes:
    data = lora_file()
    return data[: len(data) // 2]


def torch_save_zip() -> bytes:
    buffer = BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    assert zipfile.is_zipfile(BytesIO(buffer.getvalue()))
    return buffer.getvalue()


REFUSED_UPLOADS = [
    pytest.param(pickle.dumps({"state_dict": [0.0] * 8}, protocol=4), "safetensors", id="pickle"),
    pytest.param(torch_save_zip(), "safetensors", id="torch-save-zip"),
    pytest.param(truncated(), "", id="truncated"),
    pytest.param(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", "", id="header-not-json"),
    pytest.param(
        lora_file(module="single_transformer_blocks.0.attn.to_q").replace(b"unet.", b"xfmr."),
        "",
        id="names-of-another-model",
    ),
    pytest.param(lora_file(rank=MAX_RANK + 1), "rank", id="rank-too-high"),
    pytest.param(lora_file(dtype=torch.float64), "", id="float64"),
    pytest.param(b"\x00" * (MAX_BYTES + 1), "larger than", id="too-large"),
]


@pytest.mark.parametrize(("data", "fragment"), REFUSED_UPLOADS)
async def test_a_refused_upload_gets_422_and_stores_nothing(
    http, lora_settings, pool, data, fragment
):
    response = await upload(http, data)
    assert_error(response, 422, "invalid_lora", fragment)
    assert await registry_rows(pool) == 0
    assert await stored_files(lora_settings) == []


async def test_a_bad_name_gets_422_and_stores_nothing(http, lora_settings, pool):
    response = await upload(http, lora_file(), name="../escape")
    assert_error(response, 422, "invalid_request", "LoRA name")
    assert await registry_rows(pool) == 0
    assert await stored_files(lora_settings) == []


async def test_a_user_token_may_list_but_not_upload_or_delete(http, lora_settings, pool):
    user = as_user(uuid4())
    assert_error(await upload(http, lora_file(), headers=user), 403, "forbidden", "service")
    assert await stored_files(lora_settings) == []
    assert (await upload(http, lora_file())).status_code == 201
    assert_error(await http.delete("/v1/loras/film-grain", headers=user), 403, "forbidden")
    assert (await http.get("/v1/loras", headers=user)).status_code == 200


async def test_a_live_name_cannot_be_uploaded_twice(http, lora_settings, pool):
    assert (await upload(http, lora_file(seed=1))).status_code == 201
    assert_error(await upload(http, lora_file(seed=2)), 409, "conflict", "film-grain")
    assert await registry_rows(pool) == 1
    assert len(await stored_files(lora_settings)) == 1


async def test_an_unknown_name_cannot_be_deleted(http):
    assert_error(await http.delete("/v1/loras/nothing", headers=SERVICE), 404, "not_found")


async def test_a_job_records_the_loras_it_names_with_their_digests(http):
    data = lora_file()
    await upload(http, data)
    response = await http.post(
        "/v1/jobs", json=job(loras=[{"name": "film-grain", "scale": 0.8}]), headers=SERVICE
    )
    assert response.status_code == 202, response.text
    recorded = response.json()["metadata"]["loras"]
    assert recorded == [
        {"name": "film-grain", "scale": 0.8, "digest": hashlib.sha256(data).hexdigest()}
    ]


BAD_LORA_JOBS = [
    pytest.param(job(loras=[{"name": "nothing"}]), "unknown or deleted", id="unknown-name"),
    pytest.param(
        job(loras=[{"name": "film-grain"}, {"name": "a"}, {"name": "b"}]),
        "at most 2",
        id="too-many",
    ),
    pytest.param(
        job(loras=[{"name": "film-grain"}, {"name": "film-grain"}]),
        "more than once",
        id="repeated",
    ),
    pytest.param(job(loras=[{"name": "film-grain", "scale": 2.5}]), "scale", id="scale-too-big"),
    pytest.param(
        job(job_type="video_fast", loras=[{"name": "film-grain"}]),
        "only supported by SDXL",
        id="on-a-wan-job",
    ),
    pytest.param(job(loras=[{"name": "film grain"}]), "name", id="bad-name"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_LORA_JOBS)
async def test_a_job_with_bad_loras_gets_422_and_leaves_no_row(http, pool, body, fragment):
    await upload(http, lora_file())
    response = await http.post("/v1/jobs", json=body, headers=SERVICE)
    assert response.status_code == 422, response.text
    assert fragment in response.text
    assert await row_counts(pool) == (0, 0, 0)


async def test_a_retired_lora_runs_for_queued_jobs_and_is_refused_for_new_ones(http, pool):
    data = lora_file()
    await upload(http, data)
    queued = await http.post("/v1/jobs", json=job(loras=[{"name": "film-grain"}]), headers=SERVICE)
    retired = await http.delete("/v1/loras/film-grain", headers=SERVICE)
    assert retired.status_code == 200 and retired.json()["name"] == "film-grain"
    assert (await http.get("/v1/loras", headers=SERVICE)).json()["data"] == []
    refused = await http.post("/v1/jobs", json=job(loras=[{"name": "film-grain"}]), headers=SERVICE)
    assert_error(refused, 422, "invalid_request", "unknown or deleted")
    # The queued job keeps its place and its weights (by digest): nothing about it changed.
    still = (await http.get(f"/v1/jobs/{queued.json()['id']}", headers=SERVICE)).json()
    assert still["status"] == "queued"
    assert still["metadata"]["loras"][0]["digest"] == hashlib.sha256(data).hexdigest()
    # The name may be used again, for other weights.
    again = await upload(http, lora_file(seed=3))
    assert (
        again.status_code == 201
        and again.json()["digest"] != still["metadata"]["loras"][0]["digest"]
    )

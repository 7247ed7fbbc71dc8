"""``deployments/ada-48gb.yaml`` as written, on a Ray that declares one GPU: it all fits.

The profile puts the three models on one 48 GB GPU with fractional ``num_gpus``. Ray is told
this machine has one GPU (``RAY_OVERRIDE_RESOURCES``, read when the node starts) and many
logical CPUs, so the profile's resource requests are scheduled exactly as on the workstation;
the models run the tiny profile on the CPU (torch finds no CUDA device behind the GPU id).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import httpx
import pytest
import yaml

from ourvidz_serve.catalog import JOB_TYPES
from tests.e2e.conftest import service_client
from tests.e2e.test_serve_lifecycle import finished
from tests.launcher import NO_USER_LIMITS, REPO_ROOT, RunningService, run_service

pytestmark = pytest.mark.e2e

PROFILE = REPO_ROOT / "deployments" / "ada-48gb.yaml"
API_KEY = "one-gpu-profile-test-key"


@pytest.fixture(scope="module")
def one_gpu_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with run_service(
        tmp_path_factory.mktemp("one-gpu"),
        api_key=API_KEY,
        config=PROFILE,
        app_args={"model_profile": "tiny"},
        extra_env={"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 16, "GPU": 1}), **NO_USER_LIMITS},
        start_timeout_s=400,
    ) as service:
        yield service


@pytest.fixture
async def client(one_gpu_service: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(one_gpu_service) as http:
        yield http


def gpu_fractions() -> dict[str, float]:
    config = yaml.safe_load(PROFILE.read_text())
    return {
        d["name"]: d["ray_actor_options"].get("num_gpus", 0)
        for d in config["applications"][0]["deployments"]
    }


def test_the_profile_shares_one_gpu_between_the_three_models() -> None:
    fractions = gpu_fractions()
    assert fractions["Ingress"] == 0
    models = [fractions[name] for name in ("SDXL", "WAN", "Enhancer")]
    assert all(0 < fraction < 1 for fraction in models)
    assert sum(models) <= 1


async def test_every_model_replica_is_placed_on_the_declared_gpu(client) -> None:
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    models = ready.json()["checks"]["models"]
    fractions = gpu_fractions()
    for key, deployment in (("sdxl", "SDXL"), ("wan", "WAN"), ("enhancer", "Enhancer")):
        replica = models[key]
        assert replica["gpu_ids"] == ["0"], (key, replica)
        assert replica["resources"]["GPU"] == pytest.approx(fractions[deployment])


async def test_a_job_of_every_type_completes_on_the_one_gpu_profile(client) -> None:
    user = str(uuid4())
    submitted = []
    for job_type in JOB_TYPES:
        response = await client.post(
            "/v1/jobs", json={"job_type": job_type, "prompt": "a lighthouse", "user_id": user}
        )
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])
    jobs = await asyncio.gather(*(finished(client, job_id, 400) for job_id in submitted))
    for job in jobs:
        assert job["status"] == "completed", job
        for asset in job["assets"]:
            download = await client.get(asset["url"])
            assert download.status_code == 200 and download.content, asset

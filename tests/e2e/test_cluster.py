"""A two-node Ray cluster on this machine, run as on a real one: ``deployments/ada-48gb.yaml``.

The head node (2 CPUs, no GPU) and a GPU worker node (6 CPUs, 1 GPU) are each a
``ray start`` with the ``OURVIDZ_*`` settings in its environment, as KubeRay's pods get them
from a Secret. PostgreSQL is a server of its own and files go to moto's S3 over HTTP: the
node-local embedded database and local storage are refused on more than one node. The
profile is unchanged (the models run the tiny profile on the CPU behind the declared GPU):
its three models share the worker's GPU, and the ingress, which asks for 2 CPUs and no GPU,
fits only on the head. So a job crosses nodes both ways, and ``/metrics`` on the head must
read the worker node's Ray export to count it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit
from uuid import uuid4

import asyncpg
import httpx
import pytest
import yaml

from ourvidz_serve.catalog import JOB_TYPES
from tests.e2e.conftest import service_client
from tests.e2e.test_serve_lifecycle import finished
from tests.launcher import (
    NO_USER_LIMITS,
    REPO_ROOT,
    RayNode,
    RunningService,
    cluster_placement,
    run_cluster_service,
)
from tests.moto_server import DUMMY_AWS_ENV, run_moto_server
from tests.support.prometheus import scrape_until, total

pytestmark = pytest.mark.e2e

PROFILE = REPO_ROOT / "deployments" / "ada-48gb.yaml"
API_KEY = "cluster-e2e-key"
HEAD = RayNode(num_cpus=2)
GPU_WORKER = RayNode(num_cpus=6, num_gpus=1)
# The first bytes of a PNG, and the box type an MP4 starts with (after its 4-byte size).
MAGIC = {"image": b"\x89PNG\r\n\x1a\n", "video": b"ftyp"}


def database_named(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="module")
def cluster_database_url(database_url: str) -> str:
    """A fresh database of its own on the tests' PostgreSQL server."""
    name = f"cluster_{uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return database_named(database_url, name)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with run_moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def cluster_service(
    tmp_path_factory: pytest.TempPathFactory, cluster_database_url: str, s3_endpoint: str
) -> Iterator[RunningService]:
    settings = {
        "OURVIDZ_DATABASE_URL": cluster_database_url,
        "OURVIDZ_STORAGE_BACKEND": "s3",
        "OURVIDZ_S3_ENDPOINT_URL": s3_endpoint,
        "OURVIDZ_S3_REGION": "us-east-1",
    }
    with run_cluster_service(
        tmp_path_factory.mktemp("cluster"),
        api_key=API_KEY,
        head=HEAD,
        workers=[GPU_WORKER],
        config=PROFILE,
        app_args={"model_profile": "tiny"},
        extra_env=settings | DUMMY_AWS_ENV | NO_USER_LIMITS,
        start_timeout_s=400,
    ) as service:
        yield service


@pytest.fixture
async def client(cluster_service: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(cluster_service) as http:
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


async def test_the_models_run_on_the_gpu_worker_and_the_ingress_on_the_head(
    client, cluster_service: RunningService
) -> None:
    placement = await asyncio.to_thread(cluster_placement, cluster_service)
    nodes = {node["node_id"]: node["resources"] for node in placement["nodes"]}  # type: ignore[attr-defined]
    assert len(nodes) == 2
    [head] = [node for node, resources in nodes.items() if "node:__internal_head__" in resources]
    [worker] = [node for node in nodes if node != head]
    assert nodes[head].get("GPU", 0) == 0 and nodes[worker]["GPU"] == 1
    replicas = placement["replicas"]
    assert replicas["Ingress"] == [head], replicas  # type: ignore[index]
    for deployment in ("SDXL", "WAN", "Enhancer"):
        assert set(replicas[deployment]) == {worker}, replicas  # type: ignore[index]

    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    models = ready.json()["checks"]["models"]
    fractions = gpu_fractions()
    for key, deployment in (("sdxl", "SDXL"), ("wan", "WAN"), ("enhancer", "Enhancer")):
        replica = models[key]
        assert replica["node_id"] == worker, (key, replica)
        assert replica["gpu_ids"] == ["0"], (key, replica)
        assert replica["resources"]["GPU"] == pytest.approx(fractions[deployment])


async def test_a_job_of_every_type_completes_on_the_cluster_and_metrics_count_it(
    client, cluster_database_url: str, s3_endpoint: str
) -> None:
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

    # Every file is in S3, at the signed URL the ingress answers with.
    async with httpx.AsyncClient(timeout=60) as downloads:
        for job in jobs:
            spec = JOB_TYPES[job["job_type"]]
            assert job["assets"], job
            for asset in job["assets"]:
                assert asset["url"].startswith(s3_endpoint + "/"), asset
                download = await downloads.get(asset["url"])
                assert download.status_code == 200, (asset, download.text[:200])
                assert MAGIC[spec.format.value] in download.content[:16], asset

    # The records are in the external database, each claimed by a replica on the GPU node.
    connection = await asyncpg.connect(cluster_database_url)
    try:
        rows = await connection.fetch(
            "SELECT job_type, status, claimed_by FROM jobs WHERE user_id = $1", user
        )
    finally:
        await connection.close()
    assert sorted(row["job_type"] for row in rows) == sorted(JOB_TYPES)
    assert all(row["status"] == "completed" and row["claimed_by"] for row in rows)

    def counted(families: dict) -> bool:
        finished_samples = families.get("ourvidz_jobs_finished", ("", []))[1]
        return total(finished_samples, "ourvidz_jobs_finished_total") >= len(JOB_TYPES)

    families = await scrape_until(client, counted)
    submitted_samples = families["ourvidz_jobs_submitted"][1]
    finished_samples = families["ourvidz_jobs_finished"][1]
    generation = families["ourvidz_generation_seconds"][1]
    for job_type in JOB_TYPES:
        assert total(submitted_samples, "ourvidz_jobs_submitted_total", job_type=job_type) == 1
        assert (
            total(
                finished_samples,
                "ourvidz_jobs_finished_total",
                job_type=job_type,
                status="completed",
            )
            == 1
        ), job_type
        assert total(generation, "ourvidz_generation_seconds_count", job_type=job_type) == 1

"""Ray Serve for real: ``serve run`` on a copy of serve_config.yaml (only the port changed)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from ourvidz_serve.persistence.database import start_embedded_postgres
from tests.launcher import RunningService, run_service

API_KEY = "e2e-service-key"
JWT_SECRET = "e2e-jwt-secret-of-at-least-thirty-two-bytes"
# Short leases, so a killed replica's jobs come back within seconds; long enough (10 heartbeats)
# that a live replica on a loaded CI machine does not lose one.
FAST_RECOVERY = {
    "OURVIDZ_QUEUE_POLL_INTERVAL_S": "0.2",
    "OURVIDZ_LEASE_S": "10",
    "OURVIDZ_HEARTBEAT_INTERVAL_S": "1",
    "OURVIDZ_REAPER_INTERVAL_S": "1",
}
# Two ingress replicas, so that limits are shown to hold across them; together they take the
# CPU share one had, so the second SDXL replica of the autoscaling test still fits in 2 CPUs.
TWO_INGRESS_REPLICAS = {"Ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.125}}}


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    workdir = tmp_path_factory.mktemp("e2e")
    env = FAST_RECOVERY | {"OURVIDZ_JWT_SECRET": JWT_SECRET}
    with run_service(
        workdir, api_key=API_KEY, extra_env=env, deployment_overrides=TWO_INGRESS_REPLICAS
    ) as running:
        yield running


@contextlib.asynccontextmanager
async def service_client(service: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``service`` that sends its API key."""
    headers = {"Authorization": f"Bearer {service.api_key}"}
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture
async def http(service: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(service) as client:
        yield client


@pytest.fixture(scope="session")
async def service_db(service: RunningService) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the embedded PostgreSQL the service started under its data dir."""
    server = start_embedded_postgres(service.data_dir / "postgres")
    connection = await asyncpg.connect(str(server.get_uri()))
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    yield connection
    await connection.close()
    server.cleanup()

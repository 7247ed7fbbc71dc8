"""Ray Serve for real: ``serve run`` on a copy of serve_config.yaml (only the port changed)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from ourvidz_serve.persistence.database import start_embedded_postgres
from tests.launcher import RunningService, run_service
from tests.support.pgbouncer import PgBouncer, running_pgbouncer
from tests.support.webhook_receiver import Receiver, webhook_receiver

API_KEY = "e2e-service-key"
JWT_SECRET = "e2e-jwt-secret-of-at-least-thirty-two-bytes"
# Short leases, so a killed replica's jobs come back within seconds; long enough (10 heartbeats)
# that a live replica on a loaded CI machine does not lose one.
FAST_RECOVERY = {
    "OURVIDZ_QUEUE_POLL_INTERVAL_S": "0.2",
    "OURVIDZ_LEASE_S": "10",
    "OURVIDZ_HEARTBEAT_INTERVAL_S": "1",
    "OURVIDZ_REAPER_INTERVAL_S": "1",
    # A statement waiting on a lock gives up after 5 s (the health test holds one).
    "OURVIDZ_DB_COMMAND_TIMEOUT_S": "5",
}
# Two ingress replicas, so that limits are shown to hold across them; together they take the
# CPU share one had, so the second SDXL replica of the autoscaling test still fits in 2 CPUs.
TWO_INGRESS_REPLICAS = {"Ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.125}}}
# Serve asks the WAN replica's check_health every second (the config says 5 s), so the test of
# an unhealthy replica sees it replaced within seconds.
FAST_WAN_HEALTH_CHECKS = {"WAN": {"health_check_period_s": 1, "health_check_timeout_s": 5}}
CALLBACK_SECRET = "whsec_" + base64.b64encode(b"e2e-session-service-callbacks-01").decode()
# Fewer server connections than the replicas' pools hold clients: their statements share them.
POOLER_SERVER_CONNECTIONS = 10


@dataclass(frozen=True)
class ServiceDatabase:
    direct_url: str
    """The PostgreSQL itself: migrations, LISTEN and the tests' own connection."""
    pooler: PgBouncer
    """PgBouncer in transaction mode in front of it: the service's pools (as Supabase's 6543)."""


@pytest.fixture(scope="session")
def service_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceDatabase]:
    """The session service's database: a PostgreSQL, and PgBouncer in transaction mode."""
    # Unix socket paths are limited to ~107 bytes, so keep the directory short.
    server = start_embedded_postgres(tmp_path_factory.mktemp("e2epg", numbered=True))
    try:
        direct_url = str(server.get_uri())
        with running_pgbouncer(direct_url, pool_size=POOLER_SERVER_CONNECTIONS) as pooler:
            yield ServiceDatabase(direct_url, pooler)
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def callback_receiver() -> Iterator[Receiver]:
    """Receives (and verifies) the session service's callbacks, for the whole session."""
    with webhook_receiver(CALLBACK_SECRET) as receiver:
        yield receiver


@pytest.fixture(scope="session")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    service_database: ServiceDatabase,
    callback_receiver: Receiver,
) -> Iterator[RunningService]:
    """The service as it runs on Supabase: its pools through a transaction-mode pooler, LISTEN
    and migrations on the direct connection, and callbacks on."""
    workdir = tmp_path_factory.mktemp("e2e")
    env = FAST_RECOVERY | {
        "OURVIDZ_JWT_SECRET": JWT_SECRET,
        "OURVIDZ_DATABASE_URL": service_database.pooler.url(),
        "OURVIDZ_DATABASE_DIRECT_URL": service_database.direct_url,
        "OURVIDZ_CALLBACK_URL": callback_receiver.url,
        "OURVIDZ_CALLBACK_SECRET": CALLBACK_SECRET,
        "OURVIDZ_CALLBACK_POLL_INTERVAL_S": "0.5",
        # Image requests of the OpenAI routes wait for their job: fuzzed ones give up (504,
        # naming the job) inside schemathesis's request timeout (test_security.py).
        "OURVIDZ_OPENAI_WAIT_S": "60",
    }
    with run_service(
        workdir,
        api_key=API_KEY,
        extra_env=env,
        deployment_overrides=TWO_INGRESS_REPLICAS | FAST_WAN_HEALTH_CHECKS,
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
async def service_db(
    service: RunningService, service_database: ServiceDatabase
) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the service's PostgreSQL (not through its pooler)."""
    connection = await asyncpg.connect(service_database.direct_url)
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    yield connection
    await connection.close()

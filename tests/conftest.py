"""Shared fixtures: a real PostgreSQL (embedded pgserver, or DATABASE_URL) and settings."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from ourvidz_serve.persistence.database import open_database, start_embedded_postgres
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.settings import Settings
from tests.inprocess import TinyRunners

TEST_API_KEY = "test-service-key"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests of the session-wide e2e service last.

    That service lives until the session ends; the e2e tests that start a Serve application
    (or a Ray cluster) of their own would otherwise share the 2 CPUs with its idle replicas.
    """
    items.sort(key=lambda item: "service" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database for the tests: ``DATABASE_URL`` if set, else an embedded server."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    # Unix socket paths are limited to ~107 bytes, so keep the directory short.
    server = start_embedded_postgres(Path(tmp_path_factory.mktemp("pg", numbered=True)))
    yield str(server.get_uri())
    server.cleanup()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        api_keys=[TEST_API_KEY],
        queue_poll_interval_s=0.2,
        # Limits get their own tests; elsewhere a test may submit as fast as it likes.
        rate_limit_per_user_per_s=0,
        max_queued_jobs_per_user=0,
    )


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with open_database(Settings(database_url=database_url)) as pool:
        yield pool


TABLES = (
    "jobs",
    "images",
    "videos",
    "rate_limits",
    "callback_deliveries",
    "fair_shares",
    "gpu_usage",
    "loras",
)
SESSIONS_HOLDING_LOCKS = """
SELECT pid, state, xact_start, wait_event, left(query, 200) AS query, pg_blocking_pids(pid)
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'
"""


@pytest.fixture
async def repository(pool: asyncpg.Pool) -> JobRepository:
    """A repository over empty tables."""
    try:
        await pool.execute(f"TRUNCATE {', '.join(TABLES)}", timeout=30)
    except TimeoutError:
        # Name whatever holds the tables (a test's leaked transaction) instead of a bare timeout.
        sessions = await pool.fetch(SESSIONS_HOLDING_LOCKS)
        raise AssertionError(
            "TRUNCATE waited 30 s on a lock; other sessions: " + "; ".join(map(str, sessions))
        ) from None
    return JobRepository(pool)


@pytest.fixture(scope="session")
def tiny_runners() -> TinyRunners:
    """The real pipeline runners on the tiny profile, built once per session."""
    return TinyRunners.build()

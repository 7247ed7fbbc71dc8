"""Connecting to PostgreSQL: a configured DSN, or the embedded server under the data dir."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from ourvidz_serve.persistence.migrations import (
    DEFAULT_MIGRATIONS_DIR,
    apply_migrations,
    load_migrations,
)
from ourvidz_serve.settings import Settings

logger = logging.getLogger(__name__)


def start_embedded_postgres(directory: Path) -> Any:
    """Start (or attach to) the embedded PostgreSQL in ``directory``; return its handle.

    pgserver shares one server per data directory between processes, so every replica that
    attaches to the same directory talks to the same database. ``handle.cleanup()`` detaches;
    the last process to detach stops the server.
    """
    import pgserver  # heavy import, only needed without a DATABASE_URL

    directory.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(directory, cleanup_mode="stop")


def direct_dsn(settings: Settings) -> str | None:
    """The session DSN for migrations (and LISTEN): ``database_direct_url``, else
    ``database_url``; ``None`` for the embedded server (its URI is known once it runs), which
    is used whenever ``database_url`` is unset."""
    if settings.database_url is None:
        return None
    return (settings.database_direct_url or settings.database_url).get_secret_value()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset on release, which asyncpg defaults to a round trip of
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` after every use: a commit
    more per statement, about a tenth of the queue's capacity (``benchmarks/queue_cost.py``).
    Nothing here leaves session state on a pooled connection (no session ``SET``, advisory
    locks only transaction-scoped, LISTEN removed before release), and behind a
    transaction-mode pooler there is no session to reset anyway. asyncpg still rolls back an
    open transaction and drops the connection's listeners before calling this."""


async def _init_connection(connection: asyncpg.Connection) -> None:
    for type_name in ("jsonb", "json"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def migrate_direct(
    dsn: str, settings: Settings, migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
) -> tuple[list[int], list[asyncpg.Record]]:
    """Apply the migrations over a connection of their own to ``dsn`` (the direct one: the
    session parameter below needs a session); return the versions applied now and every
    recorded one. No command timeout: a migration, or the wait for another replica's, may take
    longer than any one service statement."""
    migrations = load_migrations(migrations_dir)
    connection = await asyncpg.connect(dsn)
    try:
        if settings.callback_url is not None:
            # Read by migration 0007 only: jobs unfinished at the upgrade keep the callback
            # they were submitted with (0005 took it from this session parameter).
            await connection.execute("SET ourvidz.callbacks = 'on'")
        applied = await apply_migrations(connection, migrations)
        recorded = await connection.fetch(
            "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
        )
    finally:
        await connection.close()
    return applied, recorded


@asynccontextmanager
async def open_database(
    settings: Settings, migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on an up-to-date schema: the configured DSN, or the embedded server.

    ``database_url`` may be a transaction-mode pooler (PgBouncer, Supabase's port 6543): the
    pool relies on no session state, startup parameter or named prepared statement. The
    migrations run over ``database_direct_url`` (else ``database_url``); LISTEN takes its own
    connection there too (``JobRepository(pool, direct_dsn=...)``).
    """
    embedded = None
    direct = direct_dsn(settings)
    if settings.database_url is not None and direct is not None:
        dsn = settings.database_url.get_secret_value()
    else:
        embedded = await asyncio.to_thread(start_embedded_postgres, settings.embedded_database_dir)
        dsn = direct = str(embedded.get_uri())
    try:
        applied, _ = await migrate_direct(direct, settings, migrations_dir)
        if applied:
            logger.info("applied migrations %s", applied)
        pool = await asyncpg.create_pool(
            dsn,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            init=_init_connection,
            reset=_keep_session,
            command_timeout=settings.db_command_timeout_s,
            # A configured DSN may be a transaction-mode pooler, where a prepared statement
            # named on one server connection is missing on the next (asyncpg's FAQ). The
            # embedded server is always direct and keeps the cache.
            statement_cache_size=0 if embedded is None else 100,
        )
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.cleanup)

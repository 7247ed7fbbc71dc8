"""Connecting to PostgreSQL: a configured DSN, or the embedded server under the data dir."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import asyncpg

from ourvidz_serve.persistence.migrations import (
    DEFAULT_MIGRATIONS_DIR,
    apply_migrations,
    load_migrations,
)
from ourvidz_serve.settings import Settings

logger = logging.getLogger(__name__)


def start_embedded_postgres(directory: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL in ``directory``; return its DSN.

    pgserver shares one server per data directory between processes, so every replica that
    calls this with the same directory talks to the same database; the server stops when the
    last process that attached to it exits.
    """
    import pgserver  # heavy import, only needed without a DATABASE_URL

    directory.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(directory, cleanup_mode="stop")
    return str(server.get_uri())


async def resolve_dsn(settings: Settings) -> str:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return await asyncio.to_thread(start_embedded_postgres, settings.embedded_database_dir)


async def _init_connection(connection: asyncpg.Connection) -> None:
    for type_name in ("jsonb", "json"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def open_pool(
    settings: Settings, migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
) -> asyncpg.Pool:
    """Open the pool and bring the schema up to date."""
    dsn = await resolve_dsn(settings)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        init=_init_connection,
    )
    try:
        async with pool.acquire() as connection:
            applied = await apply_migrations(connection, load_migrations(migrations_dir))
    except BaseException:
        await pool.close()
        raise
    if applied:
        logger.info("applied migrations %s", applied)
    return pool

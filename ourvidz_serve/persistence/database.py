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


CALLBACKS_PARAMETER = "ourvidz.callbacks"


async def _init_connection(connection: asyncpg.Connection) -> None:
    for type_name in ("jsonb", "json"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


@asynccontextmanager
async def open_database(
    settings: Settings, migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on an up-to-date schema: the configured DSN, or the embedded server."""
    embedded = None
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
    else:
        embedded = await asyncio.to_thread(start_embedded_postgres, settings.embedded_database_dir)
        dsn = str(embedded.get_uri())
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            init=_init_connection,
            # The outbox trigger owes a callback only on connections that say so: with no
            # callback URL, ending a job writes no delivery row.
            server_settings={CALLBACKS_PARAMETER: "on"} if settings.callback_url else None,
        )
        try:
            async with pool.acquire() as connection:
                applied = await apply_migrations(connection, load_migrations(migrations_dir))
            if applied:
                logger.info("applied migrations %s", applied)
            yield pool
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.cleanup)

"""Versioned SQL migrations from ``schemas/migrations/NNNN_name.sql``, recorded in a table.

Each file is applied once; the pending ones together in one transaction, under an advisory
lock, so that several replicas starting together apply each exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import asyncpg

# Package data of ourvidz_serve._sql (pyproject.toml maps it onto schemas/): inside the installed
# package from a wheel, schemas/migrations itself in an editable install. pip installs a wheel
# unpacked, so the resource is a plain folder.
DEFAULT_MIGRATIONS_DIR = Path(str(files("ourvidz_serve._sql") / "migrations"))
_ADVISORY_LOCK_ID = 0x0_5E_7F_1D_2
_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    if not directory.is_dir():
        raise FileNotFoundError(f"migrations directory {directory} does not exist")
    migrations = []
    for path in sorted(directory.iterdir()):
        match = _FILE_PATTERN.match(path.name)
        if path.suffix == ".sql" and not match:
            raise ValueError(f"migration file {path.name} does not match NNNN_name.sql")
        if match:
            migrations.append(Migration(int(match[1]), match[2], path.read_text("utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return migrations


async def apply_migrations(
    connection: asyncpg.Connection, migrations: list[Migration]
) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied now.

    All of them in one transaction under a transaction-scoped advisory lock: replicas starting
    together apply each exactly once, a failing file leaves the schema as it was, and it works
    through a transaction-mode pooler too (a session lock could be taken on one server
    connection and released on another)."""
    applied_now: list[int] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK_ID)
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     INTEGER PRIMARY KEY,
                name        TEXT NOT NULL,
                applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            row["version"]
            for row in await connection.fetch("SELECT version FROM schema_migrations")
        }
        for migration in migrations:
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    return applied_now

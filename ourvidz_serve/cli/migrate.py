"""``migrate``: apply the SQL migrations to the configured database, as the service does."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.table import Table

from ourvidz_serve.cli.common import EXIT_FAILED, EXIT_USAGE, app, console, fail


@dataclass(frozen=True)
class MigrationReport:
    database: str
    applied_now: list[int]
    recorded: list[dict[str, Any]]


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for printing."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def run_migrations(settings: Any) -> MigrationReport:
    """Connect like ``open_database`` (the direct DSN, or the embedded server under the data
    dir) and apply the migrations not yet recorded."""
    from ourvidz_serve.persistence.database import (
        direct_dsn,
        migrate_direct,
        start_embedded_postgres,
    )

    embedded = None
    dsn = direct_dsn(settings)
    if dsn is not None:
        where = redact_dsn(dsn)
    else:
        directory = settings.embedded_database_dir
        embedded = await asyncio.to_thread(start_embedded_postgres, directory)
        dsn = str(embedded.get_uri())
        where = f"embedded PostgreSQL under {directory}"
    try:
        applied, rows = await migrate_direct(dsn, settings)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.cleanup)
    return MigrationReport(where, applied, [dict(row) for row in rows])


@app.command(
    help="Apply the database migrations (schemas/migrations) with the settings from the "
    "environment: OURVIDZ_DATABASE_DIRECT_URL (a session, not a transaction-mode pooler), "
    "else OURVIDZ_DATABASE_URL, or with neither the embedded PostgreSQL under "
    "OURVIDZ_DATA_DIR (./.ourvidz). Safe to run while the service runs: each migration is "
    "applied once, under an advisory lock. Prints the versions applied."
)
def migrate() -> None:
    from pydantic import ValidationError

    from ourvidz_serve.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise fail(f"invalid OURVIDZ_* settings: {problems}", EXIT_USAGE) from None
    # pgserver asks platformdirs for a runtime dir, which warns where XDG_RUNTIME_DIR is unset.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    try:
        report = asyncio.run(run_migrations(settings))
    except (OSError, ValueError) as exc:
        raise fail(f"cannot migrate: {exc}", EXIT_FAILED) from None
    except Exception as exc:  # noqa: BLE001 - asyncpg/pgserver errors: print, no traceback
        raise fail(f"cannot migrate: {type(exc).__name__}: {exc}", EXIT_FAILED) from None
    out = console()
    out.print(f"database: {report.database}", soft_wrap=True, markup=False)
    if report.applied_now:
        out.print(f"applied migrations: {', '.join(str(v) for v in report.applied_now)}")
    else:
        out.print("already up to date: no migration to apply")
    table = Table(title="schema_migrations", title_justify="left")
    table.add_column("version", justify="right")
    table.add_column("name")
    table.add_column("applied at")
    for row in report.recorded:
        table.add_row(str(row["version"]), str(row["name"]), str(row["applied_at"]))
    out.print(table)
    raise typer.Exit(0)

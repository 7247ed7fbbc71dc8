from pathlib import Path

import asyncpg
import pytest

from ourvidz_serve.persistence.migrations import apply_migrations, load_migrations


async def test_migrations_are_recorded_and_applying_again_changes_nothing(pool: asyncpg.Pool):
    migrations = load_migrations()
    assert migrations[0].version == 1
    async with pool.acquire() as connection:
        assert await apply_migrations(connection, migrations) == []
        recorded = await connection.fetch("SELECT version, name FROM schema_migrations")
    assert {(r["version"], r["name"]) for r in recorded} >= {(1, "initial")}


async def test_a_new_migration_is_applied_once_in_order(pool: asyncpg.Pool, tmp_path: Path):
    for path in load_migrations():
        (tmp_path / f"{path.version:04d}_{path.name}.sql").write_text(path.sql)
    (tmp_path / "9001_probe.sql").write_text("CREATE TABLE migration_probe (id INT);")
    async with pool.acquire() as connection:
        try:
            assert await apply_migrations(connection, load_migrations(tmp_path)) == [9001]
            assert await apply_migrations(connection, load_migrations(tmp_path)) == []
            assert await connection.fetchval("SELECT count(*) FROM migration_probe") == 0
        finally:
            await connection.execute("DROP TABLE IF EXISTS migration_probe")
            await connection.execute("DELETE FROM schema_migrations WHERE version = 9001")


async def test_a_failing_migration_is_not_recorded(pool: asyncpg.Pool, tmp_path: Path):
    (tmp_path / "9002_broken.sql").write_text("CREATE TABLE broken_probe (id INT); SELECT nope;")
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.UndefinedColumnError):
            await apply_migrations(connection, load_migrations(tmp_path))
        assert await connection.fetchval("SELECT to_regclass('broken_probe')") is None
        assert not await connection.fetchval(
            "SELECT exists(SELECT 1 FROM schema_migrations WHERE version = 9002)"
        )


def test_badly_named_migration_files_are_refused(tmp_path: Path):
    (tmp_path / "1_initial.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="does not match"):
        load_migrations(tmp_path)


def test_a_missing_migrations_directory_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_migrations(tmp_path / "absent")

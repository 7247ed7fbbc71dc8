from pathlib import Path

from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.settings import Settings


async def test_without_a_database_url_an_embedded_server_is_started_migrated_and_stopped(
    tmp_path: Path,
):
    settings = Settings(database_url=None, data_dir=tmp_path / "d")
    pid_file = settings.embedded_database_dir / "postmaster.pid"
    async with open_database(settings) as pool:
        assert pid_file.exists()
        assert await pool.fetchval("SELECT max(version) FROM schema_migrations") >= 1
        assert await pool.fetchval("SELECT count(*) FROM jobs") == 0
    assert not pid_file.exists(), "the last process to detach stops the embedded server"


async def test_the_embedded_database_keeps_its_rows_across_restarts(tmp_path: Path):
    settings = Settings(database_url=None, data_dir=tmp_path / "d")
    async with open_database(settings) as pool:
        await pool.execute("CREATE TABLE restart_probe AS SELECT 7 AS n")
    async with open_database(settings) as pool:
        assert await pool.fetchval("SELECT n FROM restart_probe") == 7

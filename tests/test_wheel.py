"""The built wheel runs on its own: the SQL ships as package data (``ourvidz_serve._sql``).

The wheel is built from a copy of what the Dockerfile copies (pyproject.toml, README.md,
ourvidz_serve/, schemas/), installed into a fresh virtual environment, and its
``ourvidz-serve migrate`` is run from outside the source tree against an empty database.
The fresh environment sees the project environment's site-packages through a ``.pth`` file
(torch and the rest are not installed again); a directory named in a ``.pth`` file is not a
site directory, so the editable install's finder there stays inactive and only the wheel's
``ourvidz_serve`` can be imported.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.databases import new_database_sync

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS = REPO / "schemas" / "migrations"
QUERIES = REPO / "schemas" / "queries"
TABLES = {"jobs", "images", "videos", "callback_deliveries", "schema_migrations"}


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def clean_environment() -> dict[str, str]:
    """This process's environment less what would point Python or the service elsewhere."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OURVIDZ_", "PYTHON", "VIRTUAL_ENV"))
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of the sources (the tree itself gets no build/)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("ourvidz_serve", "schemas"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "."],
        cwd=source,
    )
    [built] = dist.glob("ourvidz_serve-*.whl")
    return built


@pytest.fixture(scope="module")
def environment(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel's ourvidz_serve and console script."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], cwd=venv)
    python = venv / "bin" / "python"
    site_packages = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=venv,
            env=clean_environment(),
        ).stdout.strip()
    )
    (site_packages / "_project_site_packages.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    # pip from the project environment, run by the new interpreter: it installs into the new
    # environment (scheme and script shebangs) and, with --ignore-installed, leaves the
    # project environment's editable install alone.
    run(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--no-input",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--no-compile",
            str(wheel),
        ],
        cwd=venv,
        env=clean_environment(),
    )
    return venv


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    """The DSN of a new, empty database on the tests' PostgreSQL server."""
    with new_database_sync(database_url, "wheel_migrate") as dsn:
        yield dsn


def test_the_wheel_holds_every_sql_file_and_the_whole_package_but_no_json_schema(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, target in ((MIGRATIONS, "migrations"), (QUERIES, "queries")):
        files = sorted(folder.glob("*.sql"))
        assert files, folder
        for file in files:
            assert f"ourvidz_serve/_sql/{target}/{file.name}" in names, file.name
    assert "ourvidz_serve/_sql/__init__.py" in names
    assert not [name for name in names if name.endswith((".schema.json", "openapi.json"))]
    assert not [name for name in names if name.startswith("schemas/")]
    # pyproject.toml lists the packages: a subpackage missing there would be missing here.
    for file in (REPO / "ourvidz_serve").rglob("*"):
        if (
            file.suffix in {".py", ".json", ".html", ".js", ".css"}
            and "__pycache__" not in file.parts
        ):
            assert file.relative_to(REPO).as_posix() in names, file


def test_the_installed_wheel_migrates_an_empty_database_from_outside_the_tree(
    environment: Path, empty_database: str, tmp_path: Path
):
    env = {**clean_environment(), "OURVIDZ_DATA_DIR": str(tmp_path / "data")}
    where = run(
        [
            str(environment / "bin" / "python"),
            "-c",
            "import ourvidz_serve, ourvidz_serve.persistence.migrations as m, "
            "ourvidz_serve.persistence.queries as q; "
            "print(ourvidz_serve.__file__); print(m.DEFAULT_MIGRATIONS_DIR); "
            "print(q.DEFAULT_QUERIES_DIR); assert q.load_queries() and m.load_migrations()",
        ],
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert len(where) == 3, where
    for path in map(Path, where):
        assert path.resolve().is_relative_to(environment.resolve()), path
        assert not path.resolve().is_relative_to(REPO), path

    script = environment / "bin" / "ourvidz-serve"
    # The script runs the new environment's interpreter (pip writes its shebang).
    assert str(environment / "bin" / "python") in "".join(script.read_text().splitlines()[:3])
    result = run(
        [str(script), "migrate"],
        cwd=tmp_path,
        env={**env, "OURVIDZ_DATABASE_URL": empty_database, "COLUMNS": "200"},
    )
    versions = sorted(int(file.name[:4]) for file in MIGRATIONS.glob("[0-9]*.sql"))
    assert f"applied migrations: {', '.join(map(str, versions))}" in result.stdout

    async def inspect() -> tuple[set[str], list[int]]:
        connection = await asyncpg.connect(empty_database)
        try:
            tables = await connection.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            recorded = await connection.fetch(
                "SELECT version FROM schema_migrations ORDER BY version"
            )
        finally:
            await connection.close()
        return {row["table_name"] for row in tables}, [row["version"] for row in recorded]

    tables, recorded = asyncio.run(inspect())
    assert tables >= TABLES, TABLES - tables
    assert recorded == versions

"""PgBouncer in transaction mode in front of the tests' PostgreSQL, as Supabase's pooler is.

The process is the test's own: started in the foreground (never ``-d``), with its config, auth
file and log in a temporary directory, and stopped when the block ends. PgBouncer refuses to
run as root; as root it runs as the owner of the backend's socket directory (``-u``), the one
user that can reach an embedded server's socket.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from tests.launcher import free_loopback_port

ADMIN_DATABASE = "pgbouncer"


def pgbouncer_binary() -> str:
    """The installed pgbouncer; `make test` installs Debian's package when it is missing."""
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(
            "pgbouncer is not installed: run `make test` (apt-get install pgbouncer)"
        )
    return found


@dataclass(frozen=True)
class Backend:
    host: str  # a host name, or a Unix socket directory
    port: int
    user: str
    password: str | None
    database: str


def parse_dsn(dsn: str) -> Backend:
    """The parts of a ``postgresql://`` URI PgBouncer needs, the socket directory of an
    embedded server (``?host=/dir``) included."""
    parts = urlsplit(dsn)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return Backend(
        host=query.get("host") or parts.hostname or "localhost",
        port=int(query.get("port") or parts.port or 5432),
        user=query.get("user") or parts.username or "postgres",
        password=query.get("password") or parts.password or None,
        database=(parts.path.lstrip("/") or query.get("dbname") or "postgres"),
    )


@dataclass(frozen=True)
class PgBouncer:
    port: int
    backend: Backend
    directory: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str | None = None) -> str:
        """A DSN of the pooler for the backend's user (and password, which PgBouncer ignores
        under ``auth_type = trust`` but passes on to the server)."""
        user = quote(self.backend.user, safe="")
        password = f":{quote(self.backend.password, safe='')}" if self.backend.password else ""
        name = database or self.backend.database
        return f"postgresql://{user}{password}@127.0.0.1:{self.port}/{name}"

    @property
    def admin_url(self) -> str:
        """The admin console (``SHOW STATS``, ``SHOW POOLS``; simple queries only)."""
        return self.url(ADMIN_DATABASE)

    def log(self) -> str:
        return (self.directory / "pgbouncer.log").read_text(errors="replace")

    def show(self, command: str) -> list[dict[str, str]]:
        """Rows of an admin console command, e.g. ``show("STATS")``, by ``psql`` (the console
        speaks only the simple query protocol, which asyncpg's ``fetch`` does not use)."""
        psql = _psql()
        result = subprocess.run(
            [psql, "--no-psqlrc", "--csv", "-d", self.admin_url, "-c", f"SHOW {command}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return list(csv.DictReader(io.StringIO(result.stdout)))

    def stats(self) -> dict[str, int]:
        """The backend database's counters (``total_query_count``, ``total_xact_count``...);
        none before its first client."""
        for row in self.show("STATS"):
            if row["database"] == self.backend.database:
                return {key: int(value) for key, value in row.items() if key != "database"}
        return {}

    def server_pids(self) -> set[int]:
        """PostgreSQL backend pids of PgBouncer's server connections (``SHOW SERVERS``)."""
        return {int(row["remote_pid"]) for row in self.show("SERVERS") if row["remote_pid"]}


def _psql() -> str:
    """psql from PATH, or the one that comes with pgserver (the embedded PostgreSQL)."""
    found = shutil.which("psql")
    if found is not None:
        return found
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql")


def _run_as(backend: Backend) -> list[str]:
    """``-u USER`` as root (PgBouncer will not run as root): the owner of the backend's socket
    directory, which alone may reach an embedded server's socket; ``nobody`` over TCP."""
    if os.geteuid() != 0:
        return []
    if backend.host.startswith("/"):
        return ["-u", pwd.getpwuid(os.stat(backend.host).st_uid).pw_name]
    return ["-u", "nobody"]


def _config(backend: Backend, port: int, directory: Path, pool_size: int) -> str:
    password = f" password={backend.password}" if backend.password else ""
    server = f"host={backend.host} port={backend.port} user={backend.user}{password}"
    return "\n".join(
        [
            "[databases]",
            f"{backend.database} = {server} dbname={backend.database}",
            # Any other database of the same server, under its own name (tests that create one).
            f"* = {server}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "pool_mode = transaction",
            "auth_type = trust",
            f"auth_file = {directory / 'userlist.txt'}",
            f"admin_users = {backend.user}",
            f"stats_users = {backend.user}",
            # Some clients (psql, JDBC) send it; harmless to drop.
            "ignore_startup_parameters = extra_float_digits",
            "max_client_conn = 500",
            f"default_pool_size = {pool_size}",
            "server_check_delay = 1",
            "log_connections = 0",
            "log_disconnections = 0",
            "",
        ]
    )


@contextlib.contextmanager
def running_pgbouncer(
    dsn: str, pool_size: int = 20, start_timeout_s: float = 30
) -> Iterator[PgBouncer]:
    """PgBouncer on a loopback port in front of ``dsn``, transaction pooling with at most
    ``pool_size`` server connections; stopped on exit."""
    backend = parse_dsn(dsn)
    port = free_loopback_port()
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    # Readable by the user PgBouncer runs as (it reads its files after giving up root).
    directory.chmod(0o755)
    try:
        (directory / "userlist.txt").write_text(f'"{backend.user}" ""\n')
        config = directory / "pgbouncer.ini"
        config.write_text(_config(backend, port, directory, pool_size))
        with (directory / "pgbouncer.log").open("wb") as log:
            process = subprocess.Popen(
                [pgbouncer_binary(), *_run_as(backend), str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        bouncer = PgBouncer(port, backend, directory, process)
        try:
            _wait_until_listening(bouncer, start_timeout_s)
            yield bouncer
        finally:
            process.terminate()  # SIGTERM: immediate shutdown
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_listening(bouncer: PgBouncer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if bouncer.process.poll() is not None:
            raise RuntimeError(
                f"pgbouncer exited with {bouncer.process.returncode}:\n{bouncer.log()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", bouncer.port), 1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pgbouncer not listening after {timeout_s}s:\n{bouncer.log()}")
        time.sleep(0.05)

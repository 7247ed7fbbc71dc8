"""Start the service with ``serve run`` in a subprocess, for end-to-end tests and benchmarks.

The config is a copy of a Serve config with only the HTTP port changed; settings go in as
``OURVIDZ_*`` environment variables, exactly as an operator would pass them.

Each service gets a Ray instance of its own, and stopping it stops that instance only: never
``ray stop``, which kills every Ray instance on the machine (a developer's ``make serve``, a
second test run). ``RAY_TMPDIR`` points at a fresh directory, so the ``ray.init()`` inside
``serve run`` finds no ``ray_current_cluster`` file of another instance (``ray start`` writes
one under ``$RAY_TMPDIR/ray``) and starts a new instance with its sockets and session files
there. A process belongs to the instance when it is in the session that ``serve run`` leads
(it starts with ``start_new_session=True``; no Ray daemon or worker leaves it), when its
environment or command line names that directory (the embedded PostgreSQL inherits the
environment, but ``pg_ctl`` starts it in a session of its own), or when it descends from
such a process (PostgreSQL's backends, each in a session of its own, overwrite their
environment with their process titles).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "ourvidz"
# Load generators submit far faster than one user may: they measure the service, not the limits.
NO_USER_LIMITS = {
    "OURVIDZ_RATE_LIMIT_PER_USER_PER_S": "0",
    "OURVIDZ_MAX_QUEUED_JOBS_PER_USER": "0",
}
NO_REQUEST_LIMITS = NO_USER_LIMITS | {"OURVIDZ_RATE_LIMIT_PER_KEY_PER_S": "0"}


@dataclass(frozen=True)
class RunningService:
    base_url: str
    data_dir: Path
    log_path: Path
    api_key: str
    # RAY_TMPDIR of this service's Ray instance (Ray keeps its files under ray_tmpdir / "ray").
    ray_tmpdir: Path
    # pid of `serve run`, also the session id of the processes it starts.
    serve_pid: int


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_service(
    workdir: Path,
    *,
    api_key: str,
    config: Path = REPO_ROOT / "serve_config.yaml",
    extra_env: Mapping[str, str] | None = None,
    deployment_overrides: Mapping[str, Mapping[str, object]] | None = None,
    app_args: Mapping[str, object] | None = None,
    start_timeout_s: float = 300,
) -> Iterator[RunningService]:
    """Run ``serve run`` on ``config`` with its data under ``workdir``; stop it on exit.

    ``deployment_overrides`` merges options into named deployments of the config (one level
    deep: ``{"Ingress": {"num_replicas": 2}}``), for tests that need another shape;
    ``app_args`` replace the application's ``args`` of the same names (settings overrides,
    which win over ``OURVIDZ_*`` variables).
    """
    port = free_loopback_port()
    serve_config = yaml.safe_load(config.read_text())
    serve_config["http_options"]["port"] = port
    application = serve_config["applications"][0]
    application["args"] = {**(application.get("args") or {}), **(app_args or {})}
    for deployment in serve_config["applications"][0]["deployments"]:
        for key, value in (deployment_overrides or {}).get(deployment["name"], {}).items():
            if isinstance(value, Mapping):
                deployment[key] = {**deployment.get(key, {}), **value}
            else:
                deployment[key] = value
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    base_url = f"http://127.0.0.1:{port}"
    data_dir = workdir / "data"
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ovz", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "RAY_ADDRESS"))}
    env |= {
        "RAY_TMPDIR": str(ray_tmpdir),
        "OURVIDZ_DATA_DIR": str(data_dir),
        "OURVIDZ_API_KEYS": api_key,
        "OURVIDZ_PUBLIC_BASE_URL": base_url,
        **(extra_env or {}),
    }
    bin_dir = Path(sys.executable).parent
    log_path = workdir / "serve.log"
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(bin_dir / "serve"), "run", str(config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except BaseException:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        raise
    try:
        _wait_until_ready(base_url, api_key, process, log_path, start_timeout_s)
        yield RunningService(base_url, data_dir, log_path, api_key, ray_tmpdir, process.pid)
    finally:
        _stop(process)
        _stop_embedded_postgres(data_dir / "postgres")
        _kill_instance(ray_tmpdir, process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def replica_pids(service: RunningService, deployment: str) -> list[int]:
    """The live replica processes of ``deployment`` in this service's Ray instance."""
    # Ray titles an actor's process ray::<actor class>, and ray::<actor class>.<method>
    # while a method runs; Serve names a replica's class ServeReplica:<app>:<deployment>.
    title = f"ray::ServeReplica:{APP_NAME}:{deployment}"
    pids = []
    for pid in _instance_pids(service.ray_tmpdir, service.serve_pid):
        argv0 = _read_proc(pid, "cmdline").split(b"\0")[0].decode(errors="replace").strip()
        if argv0 == title or argv0.startswith(f"{title}."):
            pids.append(pid)
    return sorted(pids)


def _wait_until_ready(
    base_url: str,
    api_key: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{log_path.read_text()[-5000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", headers=headers, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"service not ready in {timeout_s}s:\n{log_path.read_text()[-5000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for ``serve run``: it shuts Serve down, then the Ray instance it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)


def _kill_instance(ray_tmpdir: Path, session: int, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL, whatever of this instance outlived ``serve run``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + wait_s
        while pids := _instance_pids(ray_tmpdir, session):
            if time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            time.sleep(0.2)
        else:
            return


def _instance_pids(ray_tmpdir: Path, session: int) -> set[int]:
    """Live processes of the instance that ``serve run`` (pid ``session``) started.

    See the module's docstring; neither the environment nor the command line alone would do,
    since a process that sets its title (Ray's workers and agents, PostgreSQL's backends) may
    overwrite both.
    """
    env_entry = f"RAY_TMPDIR={ray_tmpdir}".encode()
    path_prefix = f"{ray_tmpdir}/".encode()
    own = os.getpid()
    children: dict[int, list[int]] = {}
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        pid = int(entry.name)
        stat = _read_proc(pid, "stat")
        if not stat:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
        state, ppid, _pgrp, sid = stat[stat.rindex(b")") + 2 :].split()[:4]
        if state in (b"Z", b"X"):
            continue
        children.setdefault(int(ppid), []).append(pid)
        if (
            int(sid) == session
            or env_entry in _read_proc(pid, "environ").split(b"\0")
            or path_prefix in _read_proc(pid, "cmdline")
        ):
            pids.add(pid)
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    return pids


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _stop_embedded_postgres(pg_dir: Path) -> None:
    """Fast shutdown of an embedded server a killed replica may have left running."""
    pid_file = pg_dir / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGINT)

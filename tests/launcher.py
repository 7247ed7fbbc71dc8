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
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
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
    # GCS address of a cluster started by run_cluster_service (None: serve run's own Ray).
    ray_address: str | None = None


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RayNode:
    """A node of a Ray cluster started with ``ray start`` on this machine."""

    num_cpus: float
    num_gpus: int = 0


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
    config_path = _write_config(workdir, config, port, deployment_overrides, app_args)
    base_url = f"http://127.0.0.1:{port}"
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ovz", dir="/tmp"))
    env = _service_env(workdir, ray_tmpdir, api_key, base_url, extra_env)
    try:
        with _serve_run([str(config_path)], workdir, env, api_key, start_timeout_s) as running:
            yield running
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@contextlib.contextmanager
def run_cluster_service(
    workdir: Path,
    *,
    api_key: str,
    head: RayNode,
    workers: Sequence[RayNode],
    config: Path = REPO_ROOT / "serve_config.yaml",
    extra_env: Mapping[str, str] | None = None,
    app_args: Mapping[str, object] | None = None,
    start_timeout_s: float = 300,
) -> Iterator[RunningService]:
    """Start a Ray cluster of ``head`` and ``workers`` on this machine, then ``serve run``.

    Each node is a ``ray start --block`` with its own resources, as on a real cluster (or a
    KubeRay pod): its processes get their environment, the ``OURVIDZ_*`` settings included,
    from that node's ``ray start``. All nodes share one IP (127.0.0.1), so every port a node
    would bind by default (the dashboard agent's, the metrics export's) is given explicitly,
    and Serve's HTTP proxy runs on the head only.
    """
    port = free_loopback_port()
    config_path = _write_config(workdir, config, port, None, app_args, proxy_location="HeadOnly")
    base_url = f"http://127.0.0.1:{port}"
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ovz", dir="/tmp"))
    env = _service_env(workdir, ray_tmpdir, api_key, base_url, extra_env)
    env |= _cluster_auth_env(workdir)
    Path(env["RAY_AUTH_TOKEN_PATH"]).write_text(secrets.token_hex(32))
    gcs_port = free_loopback_port()
    address = f"127.0.0.1:{gcs_port}"
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head_args = ["--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1"]
        head_args += [f"--dashboard-port={free_loopback_port()}"]
        head_args += [f"--ray-client-server-port={free_loopback_port()}"]
        nodes.append(_start_node(workdir / "head.log", env, head, head_args))
        _wait_for_nodes(address, env, 1, nodes, start_timeout_s)
        for index, worker in enumerate(workers):
            log_path = workdir / f"worker-{index}.log"
            nodes.append(_start_node(log_path, env, worker, [f"--address={address}"]))
        _wait_for_nodes(address, env, 1 + len(workers), nodes, start_timeout_s)
        command = ["--address", address, str(config_path)]
        with _serve_run(command, workdir, env, api_key, start_timeout_s, address) as running:
            yield running
    finally:
        # Workers first: a node drains through the head's GCS, and waits 30 s for a gone one.
        # The signal goes to `ray start` alone, which drains, then stops its node's processes;
        # its process group holds the GCS, which must outlive the drain.
        for node in reversed(nodes):
            node.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=60)
        for node in nodes:
            _kill_instance(ray_tmpdir, node.pid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _cluster_auth_env(workdir: Path) -> dict[str, str]:
    """Token authentication, as Ray 2.60 turns on for a cluster, with a token of the cluster's
    own under ``workdir``: every node, the driver and the probes read it; ~/.ray/auth_token is
    left alone."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(workdir / "ray_auth_token")}


def _write_config(
    workdir: Path,
    config: Path,
    port: int,
    deployment_overrides: Mapping[str, Mapping[str, object]] | None,
    app_args: Mapping[str, object] | None,
    proxy_location: str | None = None,
) -> Path:
    serve_config = yaml.safe_load(config.read_text())
    # Tests listen on loopback only, whatever host the profile binds in production.
    serve_config["http_options"] |= {"host": "127.0.0.1", "port": port}
    if proxy_location is not None:
        serve_config["proxy_location"] = proxy_location
    application = serve_config["applications"][0]
    application["args"] = {**(application.get("args") or {}), **(app_args or {})}
    for deployment in application["deployments"]:
        for key, value in (deployment_overrides or {}).get(deployment["name"], {}).items():
            if isinstance(value, Mapping):
                deployment[key] = {**deployment.get(key, {}), **value}
            else:
                deployment[key] = value
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    return config_path


def _service_env(
    workdir: Path,
    ray_tmpdir: Path,
    api_key: str,
    base_url: str,
    extra_env: Mapping[str, str] | None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "RAY_ADDRESS"))}
    return env | {
        "RAY_TMPDIR": str(ray_tmpdir),
        "OURVIDZ_DATA_DIR": str(workdir / "data"),
        "OURVIDZ_API_KEYS": api_key,
        "OURVIDZ_PUBLIC_BASE_URL": base_url,
        **(extra_env or {}),
    }


@contextlib.contextmanager
def _serve_run(
    arguments: Sequence[str],
    workdir: Path,
    env: Mapping[str, str],
    api_key: str,
    start_timeout_s: float,
    ray_address: str | None = None,
) -> Iterator[RunningService]:
    base_url = env["OURVIDZ_PUBLIC_BASE_URL"]
    ray_tmpdir = Path(env["RAY_TMPDIR"])
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "serve"), "run", *arguments],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_ready(base_url, api_key, process, log_path, start_timeout_s)
        yield RunningService(
            base_url, workdir / "data", log_path, api_key, ray_tmpdir, process.pid, ray_address
        )
    finally:
        _stop(process)
        _stop_embedded_postgres(workdir / "data" / "postgres")
        if ray_address is None:  # serve run's own Ray; a cluster's nodes are stopped by its owner
            _kill_instance(ray_tmpdir, process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def _start_node(
    log_path: Path, env: Mapping[str, str], node: RayNode, arguments: Sequence[str]
) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", *arguments]
    command += ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    command += [f"--num-cpus={node.num_cpus}", f"--num-gpus={node.num_gpus}"]
    command += [f"--metrics-export-port={free_loopback_port()}"]
    command += [f"--dashboard-agent-listen-port={free_loopback_port()}"]
    command += [f"--object-store-memory={256 * 1024 * 1024}"]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for_nodes(
    address: str,
    env: Mapping[str, str],
    count: int,
    nodes: Sequence[subprocess.Popen[bytes]],
    timeout_s: float,
) -> None:
    """Wait until ``count`` nodes are alive in the cluster at ``address``."""
    script = "import ray; print(sum(node['Alive'] for node in ray.nodes()))"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            raise RuntimeError(f"a ray start exited early (rc {[n.poll() for n in nodes]})")
        result = _run_driver(address, env, script)
        if result.returncode == 0 and int(result.stdout.split()[-1]) >= count:
            return
        time.sleep(1)
    raise RuntimeError(
        f"fewer than {count} Ray nodes alive in {timeout_s}s:\n{result.stderr[-3000:]}"
    )


def _run_driver(
    address: str, env: Mapping[str, str], script: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a Python process connected to the cluster at ``address`` as a driver."""
    connect = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False)\n"
    return subprocess.run(
        [sys.executable, "-c", connect + script, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


_PLACEMENT_SCRIPT = """
import json
import ray
from ray.util.state import list_actors
nodes = [
    {"node_id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
]
replicas = {}
for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
    prefix, _, name = actor.class_name.rpartition(":")
    if prefix.startswith("ServeReplica:"):
        replicas.setdefault(name, []).append(actor.node_id)
print(json.dumps({"nodes": nodes, "replicas": replicas}))
"""


def cluster_placement(service: RunningService) -> dict[str, object]:
    """The alive nodes (id, resources) and the node of each Serve replica, by deployment."""
    assert service.ray_address is not None, "a service of run_cluster_service"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env |= {"RAY_TMPDIR": str(service.ray_tmpdir), **_cluster_auth_env(service.log_path.parent)}
    result = _run_driver(service.ray_address, env, _PLACEMENT_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    placement: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return placement


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

"""Start the service with ``serve run`` in a subprocess, for end-to-end tests and benchmarks.

The config is a copy of a Serve config with only the HTTP port changed; settings go in as
``OURVIDZ_*`` environment variables, exactly as an operator would pass them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunningService:
    base_url: str
    data_dir: Path
    log_path: Path
    api_key: str


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
    start_timeout_s: float = 300,
) -> Iterator[RunningService]:
    """Run ``serve run`` on ``config`` with its data under ``workdir``; stop it on exit."""
    port = free_loopback_port()
    serve_config = yaml.safe_load(config.read_text())
    serve_config["http_options"]["port"] = port
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    base_url = f"http://127.0.0.1:{port}"
    data_dir = workdir / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "RAY_ADDRESS"))}
    env |= {
        "OURVIDZ_DATA_DIR": str(data_dir),
        "OURVIDZ_API_KEYS": api_key,
        "OURVIDZ_PUBLIC_BASE_URL": base_url,
        **(extra_env or {}),
    }
    bin_dir = Path(sys.executable).parent
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(bin_dir / "serve"), "run", str(config_path)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_ready(base_url, api_key, process, log_path, start_timeout_s)
        yield RunningService(base_url, data_dir, log_path, api_key)
    finally:
        _stop(process)
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], check=False, capture_output=True)
        _stop_embedded_postgres(data_dir / "postgres")


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
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _stop_embedded_postgres(pg_dir: Path) -> None:
    """Fast shutdown of an embedded server a killed replica may have left running."""
    pid_file = pg_dir / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGINT)

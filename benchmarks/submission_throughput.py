"""Submission throughput: POST /v1/jobs vs a bare one-hop Ray Serve echo app, 32 clients.

PERFORMANCE.md's target: at 32 concurrent clients the submission path (validation, the
PostgreSQL transaction that writes the job and its asset rows, the 202 body) reaches at
least 0.8x the throughput of a one-hop echo app on the same machine.

    .venv/bin/python benchmarks/submission_throughput.py [--clients 32] [--seconds 10]

The service is measured twice: with the per-key rate limit on (one more statement per
request, in PostgreSQL so that it holds across ingress replicas) and with every limit off.

Both run under the same Ray settings (fractional CPUs, ``max_ongoing_requests=256``). The
service runs with ``OURVIDZ_WORKERS_ENABLED=false`` so that generating the submitted jobs
does not compete with the submissions for this machine's two cores; the load generator
runs in this process, so both figures share its limit and only their ratio is meaningful.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from uuid import uuid4

import httpx
import ray
from fastapi import FastAPI, Request
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests
from tests.launcher import NO_REQUEST_LIMITS, NO_USER_LIMITS, free_loopback_port, run_service

echo_api = FastAPI()


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(echo_api)
class Echo:
    @echo_api.post("/echo")
    async def echo(self, request: Request) -> dict:
        return dict(await request.json())


async def drive(url: str, body: dict, headers: dict, clients: int, seconds: float) -> float:
    """Requests per second over ``seconds`` after a one-second warm-up; errors abort."""
    done = 0
    measuring = False
    stop_at = time.monotonic() + 1.0 + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            response = await http.post(url, json=body, headers=headers)
            if response.status_code not in (200, 202):
                raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
            if measuring:
                done += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        await asyncio.sleep(1.0)
        measuring, started = True, time.monotonic()
        await asyncio.gather(*tasks)
    return done / (time.monotonic() - started)


def echo_throughput(clients: int, seconds: float, body: dict) -> float:
    port = free_loopback_port()
    # A Ray instance of its own: never one that `ray start` or RAY_ADDRESS points at, which
    # serve.shutdown() below would strip of its applications.
    ray_tmpdir = tempfile.TemporaryDirectory(prefix="ovz", dir="/tmp", ignore_cleanup_errors=True)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=ray_tmpdir.name,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Echo.bind(), name="echo", route_prefix="/")
        return asyncio.run(drive(f"http://127.0.0.1:{port}/echo", body, {}, clients, seconds))
    finally:
        serve.shutdown()
        ray.shutdown()
        ray_tmpdir.cleanup()


def submission_throughput(clients: int, seconds: float, body: dict, key_limit: bool) -> float:
    """With ``key_limit`` the per-key rate limit is on (its round trip is part of a
    submission's cost, at a rate the load stays under); one user's limits are always off,
    since they would refuse the load itself."""
    api_key = "bench-" + uuid4().hex
    limits = NO_USER_LIMITS if key_limit else NO_REQUEST_LIMITS
    extra_env = limits | {"OURVIDZ_WORKERS_ENABLED": "false"}
    if key_limit:
        extra_env |= {"OURVIDZ_RATE_LIMIT_PER_KEY_PER_S": "100000"}
    with (
        tempfile.TemporaryDirectory(prefix="ovz-bench-") as workdir,
        run_service(Path(workdir), api_key=api_key, extra_env=extra_env) as service,
    ):
        headers = {"Authorization": f"Bearer {api_key}"}
        url = f"{service.base_url}/v1/jobs"
        return asyncio.run(drive(url, body, headers, clients, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    body = {
        "job_type": "sdxl_image_fast",
        "prompt": "a lighthouse on a cliff at dusk",
        "user_id": str(uuid4()),
        "num_images": 3,
    }
    echo = echo_throughput(args.clients, args.seconds, body)
    limited = submission_throughput(args.clients, args.seconds, body, key_limit=True)
    unlimited = submission_throughput(args.clients, args.seconds, body, key_limit=False)
    print(f"{args.clients} concurrent clients, {args.seconds:.0f} s each")
    print(f"echo app (one hop)                          {echo:8.1f} req/s")
    print(f"POST /v1/jobs (3-image SDXL), key limit on  {limited:8.1f} req/s")
    print(f"POST /v1/jobs (3-image SDXL), limits off    {unlimited:8.1f} req/s")
    print(f"ratio (key limit on)                        {limited / echo:8.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()

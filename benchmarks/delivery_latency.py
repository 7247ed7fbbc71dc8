"""Delivery latency: from a job's last denoising step to its SSE terminal event and to its
callback arriving, through Ray Serve on the tiny profile.

    .venv/bin/python benchmarks/delivery_latency.py [--jobs 20] [--job-type sdxl_image_fast]

Starts ``serve run serve_config.yaml`` (tiny profile, embedded PostgreSQL, local storage, two
ingress replicas as in the end-to-end tests) with a callback URL pointing at a loopback
receiver in this process. One job at a time: subscribe to its events, then let it run; the
worker records ``denoising_finished_at`` (wall clock, this machine) when the last step ends,
and this process notes when the terminal ``status`` event and the verified callback arrive.
What lies between: decoding and encoding the outputs, storing them, the completion
statement and its NOTIFY, the event's way through an ingress replica; for the callback, the
deliverer's poll (OURVIDZ_CALLBACK_POLL_INTERVAL_S, 1 s by default) and the POST.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from uuid import uuid4

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests
from tests.launcher import NO_REQUEST_LIMITS, run_service
from tests.support.webhook_receiver import webhook_receiver

SECRET = "whsec_" + base64.b64encode(b"delivery-latency-benchmark-secret").decode()
TWO_INGRESS_REPLICAS = {"Ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.125}}}


async def one_job(http: httpx.AsyncClient, job_type: str, receiver) -> tuple[float, float]:
    body = {"job_type": job_type, "prompt": "a lighthouse at dusk", "user_id": str(uuid4())}
    submitted = (await http.post("/v1/jobs", json=body)).json()
    job_id = submitted["id"]
    terminal_at = None
    async with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"status"' in line:
                status = json.loads(line[6:])["status"]
                if status in ("completed", "failed", "cancelled"):
                    terminal_at = time.time()
    assert terminal_at is not None and status == "completed", status
    deadline = time.monotonic() + 60
    while not [d for d in receiver.verified() if d["payload"]["job_id"] == job_id]:
        assert time.monotonic() < deadline, "no callback"
        await asyncio.sleep(0.01)
    [delivery] = [d for d in receiver.verified() if d["payload"]["job_id"] == job_id]
    # The receiver notes arrival on its monotonic clock; turn it into wall-clock time.
    callback_at = time.time() - (time.monotonic() - delivery["at"])
    job = (await http.get(f"/v1/jobs/{job_id}")).json()
    denoised = datetime.fromisoformat(job["metadata"]["denoising_finished_at"]).timestamp()
    return terminal_at - denoised, callback_at - denoised


async def measure(base_url: str, api_key: str, jobs: int, job_type: str, receiver) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        await one_job(http, job_type, receiver)  # warm-up, not counted
        sse, callback = [], []
        for _ in range(jobs):
            to_event, to_callback = await one_job(http, job_type, receiver)
            sse.append(to_event)
            callback.append(to_callback)
    print(f"{jobs} {job_type} jobs, one at a time, tiny profile, through Ray Serve")
    for name, values in (("SSE terminal status", sse), ("callback arrival", callback)):
        ms = sorted(v * 1000 for v in values)
        print(
            f"last denoising step -> {name:<19} median {statistics.median(ms):7.1f} ms  "
            f"min {ms[0]:7.1f}  max {ms[-1]:7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--job-type", default="sdxl_image_fast")
    args = parser.parse_args()
    api_key = "bench-" + uuid4().hex
    with webhook_receiver(SECRET) as receiver, tempfile.TemporaryDirectory() as workdir:
        env = NO_REQUEST_LIMITS | {
            "OURVIDZ_CALLBACK_URL": receiver.url,
            "OURVIDZ_CALLBACK_SECRET": SECRET,
        }
        with run_service(
            Path(workdir),
            api_key=api_key,
            extra_env=env,
            deployment_overrides=TWO_INGRESS_REPLICAS,
        ) as service:
            asyncio.run(measure(service.base_url, api_key, args.jobs, args.job_type, receiver))


if __name__ == "__main__":
    main()

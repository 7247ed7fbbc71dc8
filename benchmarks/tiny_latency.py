"""Serving overhead: end-to-end latency of tiny jobs through Ray Serve vs the bare pipeline call.

PERFORMANCE.md's target: at low load, a tiny job end to end (POST sent -> job row completed)
takes at most 1.15x the bare pipeline call of the same job in one process.

    .venv/bin/python benchmarks/tiny_latency.py [--repeats 10]

Starts ``serve run serve_config.yaml`` (tiny profile, embedded PostgreSQL, local storage) in a
temporary directory, submits one job at a time, and prints medians. The bare call runs the
same runner with one torch thread, as a Serve replica with a fractional CPU does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from uuid import uuid4

import httpx
import torch

from ourvidz_serve.catalog import JOB_TYPES, ModelFamily
from ourvidz_serve.launcher import run_service
from ourvidz_serve.pipelines.base import ImageRequest, VideoRequest
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.pipelines.wan import WanPipelineRunner
from ourvidz_serve.settings import Settings

JOB_TYPES_MEASURED = ("sdxl_image_fast", "image_fast", "video_fast")
# Polling fast loads the 2-core machine it measures (at 10 GET/s the model call took twice as
# long), so the latency is taken from the row's completed_at (same machine, same clock) and
# the poll interval does not add to it.
POLL_INTERVAL_S = 0.5


def bare_call_seconds(job_type: str, repeats: int) -> list[float]:
    spec = JOB_TYPES[job_type]
    settings = Settings()
    times = []
    if spec.model is ModelFamily.SDXL:
        sdxl = SDXLPipelineRunner.build(settings)
        request = ImageRequest(
            "a lighthouse", "blurry", 1, spec.steps, spec.guidance_scale, spec.width, spec.height
        )
        sdxl.generate([request])
        for seed in range(repeats):
            started = time.perf_counter()
            sdxl.generate([ImageRequest(**{**request.__dict__, "seed": seed})])
            times.append(time.perf_counter() - started)
    else:
        wan = WanPipelineRunner.build(settings)
        video = VideoRequest(
            "a lighthouse",
            None,
            1,
            spec.steps,
            spec.guidance_scale,
            spec.width,
            spec.height,
            spec.num_frames,
        )
        wan.generate(video)
        for seed in range(repeats):
            started = time.perf_counter()
            wan.generate(VideoRequest(**{**video.__dict__, "seed": seed}))
            times.append(time.perf_counter() - started)
    return times


def end_to_end_seconds(
    client: httpx.Client, job_type: str, repeats: int
) -> tuple[list[float], list[float]]:
    user = str(uuid4())
    totals, model_times = [], []
    for seed in range(repeats + 1):
        body = {"job_type": job_type, "prompt": "a lighthouse", "user_id": user, "seed": seed}
        started = time.time()
        job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed"):
                break
            time.sleep(POLL_INTERVAL_S)
        if job["status"] != "completed":
            raise RuntimeError(f"{job_type} failed: {job['error_message']}")
        if seed > 0:  # the first job warms the path
            totals.append(datetime.fromisoformat(job["completed_at"]).timestamp() - started)
            model_times.append(job["metadata"]["generation_time"])
    return totals, model_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(1)
    bare = {name: bare_call_seconds(name, args.repeats) for name in JOB_TYPES_MEASURED}

    api_key = "bench-" + uuid4().hex
    with (
        tempfile.TemporaryDirectory(prefix="ovz-bench-") as workdir,
        run_service(Path(workdir), api_key=api_key) as service,
        httpx.Client(
            base_url=service.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        ) as client,
    ):
        served = {name: end_to_end_seconds(client, name, args.repeats) for name in bare}

    print(f"tiny profile, {args.repeats} jobs each, one at a time; medians in ms")
    columns = ("bare call", "in-service", "end to end", "e2e/bare")
    print(f"{'job_type':<18}" + "".join(f"{column:>12}" for column in columns))
    for name in JOB_TYPES_MEASURED:
        bare_ms = statistics.median(bare[name]) * 1000
        totals, model_times = served[name]
        model_ms = statistics.median(model_times) * 1000
        e2e_ms = statistics.median(totals) * 1000
        print(
            f"{name:<18}{bare_ms:>12.1f}{model_ms:>12.1f}{e2e_ms:>12.1f}{e2e_ms / bare_ms:>12.2f}"
        )
    print("in-service: the job's recorded generation_time (model call through the Serve handle)")


if __name__ == "__main__":
    main()

"""Serving overhead: end-to-end latency of tiny jobs through Ray Serve vs the bare pipeline call.

PERFORMANCE.md's target: at low load, a tiny job end to end (POST sent -> job row completed)
takes at most 1.15x the bare pipeline call of the same job in one process.

    .venv/bin/python benchmarks/tiny_latency.py [--repeats 10]

Starts ``serve run serve_config.yaml`` (tiny profile, embedded PostgreSQL, local storage) in a
temporary directory, submits one job at a time, and prints medians. The bare call runs the
same runner with one torch thread, as a Serve replica with a fractional CPU does, alternating
with the served jobs so that both see the machine in the same state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from uuid import uuid4

import httpx
import torch

from ourvidz_serve.catalog import JOB_TYPES, ModelFamily
from ourvidz_serve.pipelines.base import ImageRequest, VideoRequest
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.pipelines.wan import WanPipelineRunner
from ourvidz_serve.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests
from tests.launcher import NO_REQUEST_LIMITS, run_service

USER = str(uuid4())
MEASURED = ("sdxl_image_fast", "image_fast", "video_fast")
# Polling fast loads the 2-core machine it measures (at 10 GET/s the model call took twice as
# long), so the latency is taken from the row's completed_at (same machine, same clock) and
# the poll interval does not add to it.
POLL_INTERVAL_S = 0.5


class BareRunners:
    """The same runners the deployments wrap, called directly in this process."""

    def __init__(self) -> None:
        settings = Settings()
        self.sdxl = SDXLPipelineRunner.build(settings)
        self.wan = WanPipelineRunner.build(settings)

    def seconds(self, job_type: str, seed: int) -> float:
        spec = JOB_TYPES[job_type]
        started = time.perf_counter()
        if spec.model is ModelFamily.SDXL:
            request = ImageRequest(
                "a lighthouse", None, seed, spec.steps, spec.guidance_scale, spec.width, spec.height
            )
            self.sdxl.generate([request])
        else:
            video = VideoRequest(
                "a lighthouse",
                None,
                seed,
                spec.steps,
                spec.guidance_scale,
                spec.width,
                spec.height,
                spec.num_frames,
            )
            self.wan.generate(video)
        return time.perf_counter() - started


def served_seconds(client: httpx.Client, job_type: str, seed: int) -> tuple[float, float]:
    """(POST sent -> row completed, the job's recorded model time) for one job."""
    body = {"job_type": job_type, "prompt": "a lighthouse", "user_id": USER, "seed": seed}
    started = time.time()
    job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed"):
            break
        time.sleep(POLL_INTERVAL_S)
    if job["status"] != "completed":
        raise RuntimeError(f"{job_type} failed: {job['error_message']}")
    total = datetime.fromisoformat(job["completed_at"]).timestamp() - started
    return total, float(job["metadata"]["generation_time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(1)
    bare_runners = BareRunners()
    api_key = "bench-" + uuid4().hex
    results: dict[str, dict[str, list[float]]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="ovz-bench-") as workdir,
        run_service(Path(workdir), api_key=api_key, extra_env=NO_REQUEST_LIMITS) as service,
        httpx.Client(
            base_url=service.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        ) as client,
    ):
        for name in MEASURED:
            bare_runners.seconds(name, 0)
            served_seconds(client, name, 0)
            bare, total, model = [], [], []
            # Alternating, so that both see the same machine at nearly the same time.
            for seed in range(1, args.repeats + 1):
                bare.append(bare_runners.seconds(name, seed))
                served_total, served_model = served_seconds(client, name, seed)
                total.append(served_total)
                model.append(served_model)
            results[name] = {"bare": bare, "total": total, "model": model}

    print(f"tiny profile, {args.repeats} jobs each, one at a time; medians in ms")
    columns = ("bare call", "in-service", "end to end", "e2e/bare")
    print(f"{'job_type':<18}" + "".join(f"{column:>12}" for column in columns))
    for name, figures in results.items():
        bare_ms, model_ms, e2e_ms = (
            statistics.median(figures[key]) * 1000 for key in ("bare", "model", "total")
        )
        print(
            f"{name:<18}{bare_ms:>12.1f}{model_ms:>12.1f}{e2e_ms:>12.1f}{e2e_ms / bare_ms:>12.2f}"
        )
    print("in-service: the job's recorded generation_time (the pipeline call in the replica)")


if __name__ == "__main__":
    main()

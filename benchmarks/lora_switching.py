"""LoRA switching: adapter-aware claims against plain fair order, on one tiny SDXL replica.

Issue 24's target: 24 tiny SDXL jobs over 3 adapters on one replica, adapter-aware claims
against plain order in one run: fewer adapter loads and pipeline calls, never slower.

    .venv/bin/python benchmarks/lora_switching.py [--jobs 24] [--adapters 3] [--intervals 0 0.1 0.2]

No Ray: real PostgreSQL (an embedded pgserver in a temporary directory, or ``--database-url``,
an existing empty database whose tables it truncates), local storage, and the real queue
worker, SDXL handler and tiny SDXL runner in this process, as a Serve replica runs them. Each
arm builds a fresh runner (nothing held) and submits the same jobs: job i applies adapter
``i mod adapters`` at scale 1, from user ``i mod users`` (so fair order interleaves the
adapters), one job every ``interval`` seconds while the replica works, for each of
``--intervals`` (0: all at once; longer: jobs trickle in while calls run). The arms differ only
in ``OURVIDZ_LORA_AFFINITY_MAX_WAIT_S``: 0 (plain fair order) or ``--max-wait``.

Printed per arm: pipeline calls, adapter downloads (files fetched and parsed into the CPU
cache), adapter activations (loads into the pipeline), switches (calls whose adapters differ
from the previous call's), total seconds from the first submission to the last job's end, and
the longest wait of a job from submission to claim.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import asyncpg

from ourvidz_serve.catalog import Queue
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.observability.metrics import IMAGES_PER_CALL, Metrics, PrometheusBackend
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.pipelines.lora import random_sdxl_lora, sha256_digest
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import LORAS_BUCKET, create_storage, lora_key
from ourvidz_serve.workers.handlers import SDXLJobHandler
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig

PROMPT = "a lighthouse on a cliff at dusk, waves below, cinematic light"
TABLES = "jobs, images, videos, fair_shares, gpu_usage, loras, callback_deliveries"


@dataclass(frozen=True)
class ArmResult:
    calls: int
    downloads: int
    activations: int
    switches: int
    total_s: float
    max_wait_s: float


async def run_arm(
    settings: Settings,
    pool: asyncpg.Pool,
    digests: list[str],
    interval: float,
    args: argparse.Namespace,
) -> ArmResult:
    await pool.execute(f"TRUNCATE {TABLES}")
    repository = JobRepository(pool)
    storage = create_storage(settings)
    await storage.start()
    runner = await asyncio.to_thread(SDXLPipelineRunner.build, settings)
    # The handler's own per-call metric counts the pipeline calls (one per claimed batch).
    backend = PrometheusBackend()
    metrics = Metrics(backend)
    worker = QueueWorker(
        repository,
        storage,
        SDXLJobHandler(runner, storage, metrics),
        WorkerConfig.for_queue(settings, Queue.SDXL),
        "lora-switching",
        metrics,
    )
    started = time.monotonic()
    job_ids = []
    await worker.start()
    try:
        for index in range(args.jobs):
            adapter = index % args.adapters
            body = {
                "job_type": "sdxl_image_fast",
                "prompt": PROMPT,
                "seed": index,
                "loras": [{"name": f"adapter-{adapter}", "scale": 1.0}],
            }
            plan = plan_job(
                JobRequest.model_validate(body),
                UUID(int=1 + index % args.users),
                lora_digests={f"adapter-{i}": digest for i, digest in enumerate(digests)},
            )
            job, _ = await repository.insert_job(plan)
            job_ids.append(job.id)
            await asyncio.sleep(interval)
        while True:
            jobs = [await repository.get_job(job_id) for job_id in job_ids]
            if all(job is not None and job.status in ("completed", "failed") for job in jobs):
                break
            await asyncio.sleep(0.05)
        total_s = time.monotonic() - started
    finally:
        await worker.stop()
        await storage.close()
    failed = [job for job in jobs if job is None or job.status != "completed"]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not complete: {failed[0]}")
    waits = [
        (job.started_at - job.created_at).total_seconds()
        for job in jobs
        if job is not None and job.started_at is not None
    ]
    stats = runner.lora_stats
    return ArmResult(
        calls=int(
            backend.registry.get_sample_value(f"{IMAGES_PER_CALL.name}_count", {"model": "sdxl"})
            or 0
        ),
        downloads=stats.loads,
        activations=stats.activations,
        switches=stats.switches,
        total_s=total_s,
        max_wait_s=max(waits),
    )


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="ovzl", dir="/tmp"))
    base = Settings(
        database_url=args.database_url,
        data_dir=data_dir,
        device="cpu",
        queue_poll_interval_s=0.05,
        sdxl_lora_cache=args.cache,
        api_keys=["lora-switching-benchmark"],  # local storage signs its URLs with it
    )
    print(
        f"lora switching: {args.jobs} tiny SDXL jobs (1 image, adapter i mod {args.adapters}, "
        f"users i mod {args.users}), one replica (batch {base.sdxl_batch_images} images, CPU "
        f"cache {args.cache} adapters); interval: seconds between two submissions"
    )
    print(
        f"{'interval':>8}  {'claims':<18}{'calls':>6}{'downloads':>10}{'activations':>12}"
        f"{'switches':>9}{'total s':>9}{'max wait s':>11}"
    )
    try:
        async with open_database(base) as pool:
            storage = create_storage(base)
            await storage.start()
            try:
                maker = await asyncio.to_thread(SDXLPipelineRunner.build, base)
                digests = []
                for seed in range(args.adapters):
                    data = random_sdxl_lora(maker.pipe, rank=4, seed=seed)
                    digest = sha256_digest(data)
                    await storage.put(
                        LORAS_BUCKET, lora_key(digest), data, "application/octet-stream"
                    )
                    digests.append(digest)
            finally:
                await storage.close()
            for interval in args.intervals:
                results = {}
                for label, max_wait in (
                    ("plain fair order", 0.0),
                    ("adapter-aware", args.max_wait),
                ):
                    settings = base.model_copy(update={"lora_affinity_max_wait_s": max_wait})
                    result = await run_arm(settings, pool, digests, interval, args)
                    results[label] = result
                    print(
                        f"{interval:>8g}  {label:<18}{result.calls:>6}{result.downloads:>10}"
                        f"{result.activations:>12}{result.switches:>9}{result.total_s:>9.2f}"
                        f"{result.max_wait_s:>11.2f}",
                        flush=True,
                    )
                plain, aware = results["plain fair order"], results["adapter-aware"]
                print(
                    f"{interval:>8g}  adapter-aware / plain: calls {aware.calls}/{plain.calls}, "
                    f"activations {aware.activations}/{plain.activations}, total time "
                    f"{aware.total_s / plain.total_s:.2f}x",
                    flush=True,
                )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument(
        "--intervals",
        type=float,
        nargs="+",
        default=[0.0, 0.1, 0.2],
        help="seconds between two submissions; each is a pair of arms",
    )
    parser.add_argument("--cache", type=int, default=8, help="OURVIDZ_SDXL_LORA_CACHE")
    parser.add_argument(
        "--max-wait", type=float, default=30.0, help="the adapter-aware arm's longest wait"
    )
    parser.add_argument("--database-url", help="an empty database (default: embedded)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

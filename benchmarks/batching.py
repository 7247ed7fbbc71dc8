"""SDXL batching: images/s of concurrent 1-image jobs with batching on vs off, served for real.

PERFORMANCE.md's target: on the tiny profile, 12 concurrent 1-image ``sdxl_image_fast`` jobs
finish at least 2x faster when one SDXL replica runs up to 6 images per pipeline call
(``OURVIDZ_SDXL_BATCH_IMAGES=6``) than one image per call (``=1``).

    .venv/bin/python benchmarks/batching.py [--repeats 3] [--jobs 12] [--batch-images 6]

Starts ``serve run`` on ``serve_config.yaml`` with the SDXL deployment pinned to one replica
(autoscaling would add a second replica, and a second core, to whichever mode leaves a backlog;
batching is what is measured) once per mode, warms it up with a round of the same shape, then
times ``--repeats`` rounds: the jobs (distinct seeds) are posted at once, and a round lasts
from the first job's ``created_at`` to the last job's ``completed_at``, both from the service's
database (one clock). The database is polled for completion a few times a second only: polling
loads the 2-core machine it measures. Each round's jobs' ``pipeline_batch_images`` (images in
the pipeline call that made each job) shows whether batching happened, and ``claimed_by`` how
many SDXL replicas worked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import httpx
import yaml

from ourvidz_serve.persistence.database import start_embedded_postgres

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests
from tests.launcher import (
    NO_REQUEST_LIMITS,
    REPO_ROOT,
    RunningService,
    replica_pids,
    run_service,
)

JOB_TYPE = "sdxl_image_fast"
USER = str(uuid4())
POLL_INTERVAL_S = 0.3
ROUND_TIMEOUT_S = 600
TERMINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Round:
    images: int
    seconds: float
    posting_s: float
    """First to last ``created_at``: how long the round's jobs took to arrive."""
    batch_sizes: Counter[int]
    """``{pipeline_batch_images: jobs made by a call of that many images}``."""
    workers: int
    """Distinct SDXL replicas that claimed the round's jobs."""
    sdxl_replicas: int
    """Live SDXL replica processes when the round started."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


async def run_round(
    http: httpx.AsyncClient,
    db: asyncpg.Connection,
    service: RunningService,
    jobs: int,
    first_seed: int,
) -> Round:
    sdxl_replicas = len(await asyncio.to_thread(replica_pids, service, "SDXL"))

    async def submit(seed: int) -> UUID:
        body = {"job_type": JOB_TYPE, "prompt": "a lighthouse", "user_id": USER, "seed": seed}
        response = await http.post("/v1/jobs", json=body)
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text[:300]}")
        return UUID(response.json()["id"])

    ids = await asyncio.gather(*(submit(first_seed + i) for i in range(jobs)))
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while (
        await db.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = ANY($2::text[])",
            ids,
            TERMINAL,
        )
        < jobs
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{jobs} jobs not finished after {ROUND_TIMEOUT_S}s")
        await asyncio.sleep(POLL_INTERVAL_S)
    rows = await db.fetch(
        "SELECT id, status, error_message, created_at, completed_at, claimed_by, units,"
        "       (metadata->>'pipeline_batch_images')::int AS batch"
        "  FROM jobs WHERE id = ANY($1::uuid[])",
        ids,
    )
    failed = [row for row in rows if row["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not complete, e.g. {dict(failed[0])}")
    started = min(row["created_at"] for row in rows)
    finished = max(row["completed_at"] for row in rows)
    return Round(
        images=sum(row["units"] for row in rows),
        seconds=(finished - started).total_seconds(),
        posting_s=(max(row["created_at"] for row in rows) - started).total_seconds(),
        batch_sizes=Counter(row["batch"] for row in rows),
        workers=len({row["claimed_by"] for row in rows}),
        sdxl_replicas=sdxl_replicas,
    )


async def measure(service: RunningService, args: argparse.Namespace) -> list[Round]:
    server = start_embedded_postgres(service.data_dir / "postgres")
    db = await asyncpg.connect(str(server.get_uri()))
    headers = {"Authorization": f"Bearer {service.api_key}"}
    try:
        async with httpx.AsyncClient(
            base_url=service.base_url, headers=headers, timeout=60
        ) as http:
            for _ in range(args.warmup_rounds):
                await run_round(http, db, service, args.jobs, first_seed=0)
            await asyncio.sleep(args.settle_s)
            return [
                await run_round(http, db, service, args.jobs, first_seed=1000 * (r + 1))
                for r in range(args.repeats)
            ]
    finally:
        await db.close()
        server.cleanup()


def one_sdxl_replica_config() -> dict:
    """``serve_config.yaml`` with the SDXL deployment fixed at one replica."""
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "SDXL":
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
    return config


def run_mode(batch_images: int, args: argparse.Namespace) -> list[Round]:
    api_key = "bench-" + uuid4().hex
    with tempfile.TemporaryDirectory(prefix="ovz-bench-") as workdir:
        config = Path(workdir) / "one_sdxl_replica.yaml"
        config.write_text(yaml.safe_dump(one_sdxl_replica_config(), sort_keys=False))
        with run_service(
            Path(workdir), api_key=api_key, config=config, extra_env=mode_env(batch_images)
        ) as service:
            return asyncio.run(measure(service, args))


def mode_env(batch_images: int) -> dict[str, str]:
    return NO_REQUEST_LIMITS | {"OURVIDZ_SDXL_BATCH_IMAGES": str(batch_images)}


def format_batches(batch_sizes: Counter[int]) -> str:
    return ", ".join(f"{jobs}x{size}" for size, jobs in sorted(batch_sizes.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per mode")
    parser.add_argument("--jobs", type=int, default=12, help="concurrent 1-image jobs a round")
    parser.add_argument("--batch-images", type=int, default=6, help="OURVIDZ_SDXL_BATCH_IMAGES on")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--settle-s", type=float, default=5.0, help="pause after the warm-up (replica starts)"
    )
    args = parser.parse_args()

    modes = {"on": args.batch_images, "off": 1}
    print("serve config: serve_config.yaml with SDXL at one replica (http port replaced):")
    print(yaml.safe_dump(one_sdxl_replica_config(), sort_keys=False).rstrip())
    # The launcher passes no OURVIDZ_* variable of this process on, only its own settings.
    inherited = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    print(f"inherited RAY_* environment: {json.dumps(inherited)}")
    for mode, batch_images in modes.items():
        print(f"batching {mode}: OURVIDZ_* settings {json.dumps(mode_env(batch_images))}")
    print(
        f"job: {JOB_TYPE}, num_images 1; {args.jobs} jobs a round posted at once, "
        f"{args.warmup_rounds} warm-up round(s), {args.repeats} timed round(s); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )

    results = {mode: run_mode(batch_images, args) for mode, batch_images in modes.items()}

    print()
    print("seconds: first created_at -> last completed_at of the round's jobs")
    print("posting: first -> last created_at (the jobs' arrival spread)")
    print("batches: jobs x pipeline_batch_images (images in the call that made each job)")
    header = ("mode", "round", "images", "posting", "seconds", "images/s", "replicas", "claimers")
    print(f"{header[0]:<14}" + "".join(f"{h:>10}" for h in header[1:]) + "  batches")
    for mode, rounds in results.items():
        for number, result in enumerate(rounds, 1):
            print(
                f"{mode + f' ({modes[mode]})':<14}{number:>10}{result.images:>10}"
                f"{result.posting_s:>10.2f}{result.seconds:>10.2f}{result.images_per_s:>10.2f}"
                f"{result.sdxl_replicas:>10}{result.workers:>10}  "
                f"{format_batches(result.batch_sizes)}"
            )
    print("replicas: live SDXL replicas at the round's start; claimers: those that ran its jobs")
    print()
    medians = {
        mode: statistics.median(r.images_per_s for r in rounds) for mode, rounds in results.items()
    }
    for mode, median in medians.items():
        seen = sorted(set().union(*(r.batch_sizes for r in results[mode])))
        print(
            f"batching {mode:<3} (OURVIDZ_SDXL_BATCH_IMAGES={modes[mode]}): "
            f"median {median:6.2f} images/s; pipeline_batch_images seen: {seen}"
        )
    print(f"ratio on/off: {medians['on'] / medians['off']:.2f}x (target >= 2x on the tiny profile)")


if __name__ == "__main__":
    main()

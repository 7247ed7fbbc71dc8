"""Fairness: light users' waits and Jain's index behind a heavy user, FIFO against fair order.

Issue 21's targets: with one heavy user and a few light ones on one queue, fair order (start-time
fair queuing, migration 0008) gives the users backlogged together equal GPU time (Jain's index
>= 0.95) and the light users a p95 wait at least 5x lower than first-in-first-out.

    .venv/bin/python benchmarks/fairness.py [--heavy-jobs 50] [--light-users 9] [--light-jobs 2]

No Ray and no model: real PostgreSQL (an embedded pgserver in a temporary directory, or
``--database-url``, an existing empty database whose tables it truncates) through
``JobRepository``, in simulated time. Every user is on the same tier (equal weights) and submits
1-unit ``--job-type`` jobs (``video_fast``: the WAN queue) through ``insert_job``. One worker
claims one job at a time (``claim_jobs(queue, 1)``); each job takes ``--duration`` seconds of
simulated time (default: the job type's expected GPU seconds, its ``cost_s``), then is completed
with that many GPU seconds charged. A job's wait is its claim's simulated time minus its
arrival's. Two scenarios, each run twice on empty tables:

- together: every job arrives at t=0, the heavy user's first. Jain's index is taken over the
  GPU seconds each user started in the window [0, users x light jobs x duration): the span in
  which equal shares serve every light user's whole backlog (all users had queued work at its
  start). At the default sizes no order can make the light users' p95 wait more than about 4x
  lower than FIFO's here (FIFO starts their 18 jobs after the heavy user's 50: p95 66 D; even
  light jobs first could not start them before one another: p95 16 D).
- staggered: the heavy user's jobs arrive at t=0, light user i's at (i + 1) x ``--gap``
  durations, while the heavy backlog drains (Jain's index: "-"; the users are not backlogged
  together).

FIFO is the order of the claim before fair queuing (``ORDER BY created_at, id``), reproduced here
and only here: before each claim of the FIFO arm every queued job's virtual start is set to its
arrival time, so that the product's claim (by virtual start, then id) takes jobs in arrival order.
The fair arm runs the product's statements unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import asyncpg

from ourvidz_serve.catalog import JOB_TYPES, Tier
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import AssetCompletion, JobRepository
from ourvidz_serve.settings import Settings

PROMPT = "a lighthouse on a cliff at dusk, waves below, cinematic light"
HEAVY = UUID(int=0xFA1E_0000_0000_4000_8000_0000_0000_0000)
TIER = Tier.STANDARD
WORKER = "fairness-worker"
LEASE_S = 600.0
ORDERS = ("FIFO", "fair")

# The claim order before fair queuing, for the FIFO arm: virtual start = seconds since the
# arm's first arrival (relative, so that a double keeps microseconds).
FIFO_ORDER_SQL = """
UPDATE jobs SET virtual_start = extract(EPOCH FROM created_at - $2::timestamptz)
 WHERE status = 'queued' AND queue = $1
"""


@dataclass
class Arrival:
    at: float
    """Simulated seconds."""
    user: UUID


@dataclass
class Outcome:
    waits: dict[UUID, list[float]] = field(default_factory=dict)
    """Each user's jobs' waits, simulated seconds, in claim order."""
    starts: dict[UUID, list[float]] = field(default_factory=dict)
    """Each user's jobs' start times, simulated seconds."""
    wall_s: float = 0.0


def light_user(index: int) -> UUID:
    return UUID(int=HEAVY.int + 1 + index)


def arrivals(scenario: str, args: argparse.Namespace) -> list[Arrival]:
    """Every job's arrival, in submission order (the heavy user's first)."""
    jobs = [Arrival(0.0, HEAVY) for _ in range(args.heavy_jobs)]
    for index in range(args.light_users):
        at = 0.0 if scenario == "together" else (index + 1) * args.gap * args.duration
        jobs += [Arrival(at, light_user(index)) for _ in range(args.light_jobs)]
    return sorted(jobs, key=lambda job: job.at)  # stable: submission order within an instant


async def simulate(
    pool: asyncpg.Pool,
    repository: JobRepository,
    order: str,
    jobs: list[Arrival],
    args: argparse.Namespace,
    weight: float,
) -> Outcome:
    """One worker, one job at a time, ``args.duration`` simulated seconds each."""
    await pool.execute("TRUNCATE jobs, images, videos, callback_deliveries, fair_shares, gpu_usage")
    spec = JOB_TYPES[args.job_type]
    queue = spec.queue.value
    request = JobRequest(job_type=args.job_type, prompt=PROMPT)
    outcome = Outcome()
    arrived: dict[UUID, float] = {}
    pending = list(jobs)
    first_arrival = await pool.fetchval("SELECT clock_timestamp()")
    now = 0.0
    started = time.perf_counter()
    while pending or await repository.queued_units(queue):
        while pending and pending[0].at <= now:
            job = pending.pop(0)
            record, _ = await repository.insert_job(
                plan_job(request, job.user, tier=TIER), weight=weight
            )
            arrived[record.id] = job.at
        if order == "FIFO":
            await pool.execute(FIFO_ORDER_SQL, queue, first_arrival)
        claimed = await repository.claim_jobs(queue, 1, WORKER, LEASE_S)
        if not claimed:
            now = pending[0].at  # idle until the next arrival
            continue
        [running] = claimed
        user = running.user_id
        outcome.waits.setdefault(user, []).append(now - arrived[running.id])
        outcome.starts.setdefault(user, []).append(now)
        now += args.duration
        assets = [AssetCompletion(a.index, a.path, {}) for a in running.assets]
        if not await repository.complete_job(
            running.id, running.attempts, {}, assets, gpu_seconds=args.duration
        ):
            raise RuntimeError(f"job {running.id} was not completed")
    outcome.wall_s = time.perf_counter() - started
    return outcome


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one user has everything."""
    total = sum(values)
    squares = sum(value * value for value in values)
    return total * total / (len(values) * squares) if squares else 1.0


def window_index(outcome: Outcome, users: list[UUID], window_s: float, duration: float) -> float:
    """Jain's index of the GPU seconds each user's jobs ran within [0, window_s)."""
    return jain(
        [
            sum(max(min(start + duration, window_s) - start, 0.0) for start in starts)
            for starts in (outcome.starts.get(user, []) for user in users)
        ]
    )


def p95(samples: list[float]) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=20, method="inclusive")[18]


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="ovzf", dir="/tmp"))
    settings = Settings(database_url=args.database_url, data_dir=data_dir)
    weight = settings.tier_weights.get(TIER, 1.0)
    light = [light_user(index) for index in range(args.light_users)]
    users = [HEAVY, *light]
    unit = args.duration
    print(
        f"fairness: 1 heavy user ({args.heavy_jobs} jobs) and {args.light_users} light users "
        f"({args.light_jobs} jobs each), {args.job_type} on one queue, tier {TIER}; one worker, "
        f"{unit:g} s per job (simulated, D); staggered: light user i arrives at "
        f"(i + 1) x {args.gap:g} D"
    )
    header = (
        f"{'scenario':<11}{'order':<7}{'light p50 wait':>16}{'light p95 wait':>16}"
        f"{'light max wait':>16}{'Jain':>7}{'wall s':>8}"
    )
    ratios: dict[str, float] = {}
    indexes: dict[str, float] = {}
    try:
        async with open_database(settings) as pool:
            repository = JobRepository(pool)
            print(header)
            for scenario in ("together", "staggered"):
                jobs = arrivals(scenario, args)
                p95s = {}
                for order in ORDERS:
                    outcome = await simulate(pool, repository, order, jobs, args, weight)
                    waits = [wait for user in light for wait in outcome.waits[user]]
                    p95s[order] = p95(waits)
                    index = "-"
                    if scenario == "together":
                        window = len(users) * args.light_jobs * unit
                        indexes[order] = window_index(outcome, users, window, unit)
                        index = f"{indexes[order]:.3f}"
                    print(
                        f"{scenario:<11}{order:<7}"
                        f"{_in_d(statistics.median(waits), unit):>16}"
                        f"{_in_d(p95s[order], unit):>16}{_in_d(max(waits), unit):>16}"
                        f"{index:>7}{outcome.wall_s:>8.2f}",
                        flush=True,
                    )
                ratios[scenario] = p95s["FIFO"] / p95s["fair"] if p95s["fair"] else float("inf")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        "light users' p95 wait, FIFO / fair: "
        + ", ".join(f"{scenario} {ratio:.1f}x" for scenario, ratio in ratios.items())
        + " (target: >= 5x)"
    )
    print(
        f"Jain's index (together): FIFO {indexes['FIFO']:.3f}, fair {indexes['fair']:.3f} "
        f"(target: fair >= 0.95), over the GPU seconds started in the first "
        f"{len(users) * args.light_jobs} D by each of the {len(users)} users"
    )


def _in_d(seconds: float, unit: float) -> str:
    return f"{seconds / unit:.1f} D"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy-jobs", type=int, default=50)
    parser.add_argument("--light-users", type=int, default=9)
    parser.add_argument("--light-jobs", type=int, default=2, help="jobs per light user")
    parser.add_argument("--job-type", default="video_fast", help="a 1-unit job type")
    parser.add_argument(
        "--duration", type=float, help="simulated seconds per job; default: its cost_s"
    )
    parser.add_argument(
        "--gap", type=float, default=4.0, help="staggered arrivals, in job durations"
    )
    parser.add_argument(
        "--database-url",
        help="an existing, empty database (its tables are truncated); default: an embedded "
        "PostgreSQL in a temporary directory",
    )
    args = parser.parse_args()
    if args.duration is None:
        args.duration = plan_job(JobRequest(job_type=args.job_type, prompt=PROMPT), HEAVY).cost_s
    if args.heavy_jobs < 1 or args.light_users < 1 or args.light_jobs < 1:
        parser.error("every user needs at least one job")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

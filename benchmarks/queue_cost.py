"""Queue cost: the PostgreSQL queue's statements at a small and a huge backlog, and its capacity.

PERFORMANCE.md's targets: the queue's per-call cost does not grow with its backlog (claims,
heartbeats, completions, reaps, list pages and the backlog count use indexes that reach the
rows they need without scanning the backlog), and at 32 concurrent workers the queue claims
and completes at least 400 jobs/s on this machine's embedded PostgreSQL.

    .venv/bin/python benchmarks/queue_cost.py [--sizes 10000 1000000] [--repeats 30]

Starts an embedded PostgreSQL (pgserver) in a temporary directory, removed at the end.

1. Cost per call. For each backlog size the tables are filled with set-based SQL (one
   ``INSERT ... SELECT FROM generate_series`` per chunk writing the jobs and their image and
   video rows, in the shape ``plan_job`` writes): a mix of 1, 3 and 6-image SDXL jobs and WAN
   jobs over a few users, all queued. Then ``VACUUM ANALYZE`` and a checkpoint, and each
   operation runs through ``JobRepository`` ``--repeats`` times after one warm-up call;
   median and p95 in ms. "lone batch key" claims with an image-to-image job at the head whose
   batch key no other queued job shares (so the claim takes it alone). The claim's plans at
   the largest size (``EXPLAIN (ANALYZE, BUFFERS)``, custom and generic, rolled back) show
   which indexes it uses.
2. Capacity. A backlog of ``--capacity-jobs`` 1-image SDXL jobs; N concurrent workers each
   loop claim_jobs(sdxl_queue, 1) -> heartbeat -> complete_job until the queue is empty or
   ``--capacity-seconds`` have passed; jobs/s claimed and completed for each N.

The workers run in this process (one asyncio loop) on the same two cores as PostgreSQL, so
the capacity figure is the queue and its client together, not the database alone ("client
CPU": this process's CPU time over the run's wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from uuid import UUID

import asyncpg

from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.database import open_database
from ourvidz_serve.persistence.repository import (
    QUERIES,
    AssetCompletion,
    JobFilters,
    JobRecord,
    JobRepository,
)
from ourvidz_serve.settings import Settings

USERS = [UUID(int=0x0B0E_0000_0000_4000_8000_0000_0000_0000 + n) for n in range(1, 9)]
PROMPT = "a lighthouse on a cliff at dusk, waves below, cinematic light"
WORKER = "bench-worker"
LEASE_S = 600.0
MAX_ATTEMPTS = 3
EXPIRED_PER_REAP = 5
PAGE = 50
FILL_CHUNK = 50_000

# (job_type, num_images): weight in percent of the backlog.
MIXED = {
    ("sdxl_image_fast", 1): 25,
    ("sdxl_image_fast", 3): 15,
    ("sdxl_image_fast", 6): 15,
    ("sdxl_image_high", 1): 10,
    ("sdxl_image_high", 3): 5,
    ("sdxl_image_high", 6): 5,
    ("video_fast", 1): 10,
    ("video_high", 1): 5,
    ("image_fast", 1): 5,
    ("video7b_fast_enhanced", 1): 5,
}
ONE_IMAGE = {("sdxl_image_fast", 1): 100}

# One template per kind: the planner's own rows, with the per-job seed, times and keys left to
# the fill statement.
KINDS_TABLE = """
CREATE UNLOGGED TABLE bench_kinds (
    kind int PRIMARY KEY, job_type text, format text, quality text, model_type text, queue text,
    batch_key text, units int, num_images int, asset_table text, file_extension text,
    prompt text, metadata jsonb, asset_metadata jsonb
);
CREATE UNLOGGED TABLE bench_slots (slot int PRIMARY KEY, kind int);
"""

# $1, $2: the chunk's first and last job number; $3: the first job's created_at; $4: users.
FILL_CHUNK_SQL = """
WITH new_jobs AS (
    INSERT INTO jobs (user_id, job_type, format, quality, model_type, queue, metadata,
                      batch_key, units, created_at, updated_at)
    SELECT ($4::uuid[])[1 + g % cardinality($4::uuid[])], k.job_type, k.format, k.quality,
           k.model_type, k.queue,
           k.metadata || jsonb_build_object(
               'seed', (g * 2654435761) % 4294967296,
               'submitted_at', to_char(($3::timestamptz + g * interval '1 millisecond')
                                       AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
           k.batch_key, k.units,
           $3::timestamptz + g * interval '1 millisecond',
           $3::timestamptz + g * interval '1 millisecond'
      FROM generate_series($1::bigint, $2::bigint) AS g
      JOIN bench_slots AS s ON s.slot = g % 100
      JOIN bench_kinds AS k ON k.kind = s.kind
    RETURNING id, user_id, job_type, units, created_at, (metadata->>'seed')::bigint AS seed
), assets AS (
    SELECT j.id, j.user_id, j.created_at, k.prompt, k.quality, k.file_extension,
           k.asset_table, i AS idx,
           (k.asset_metadata -> i) || jsonb_build_object(
               'seed', (j.seed + i) % 4294967296,
               'stored_path', CASE WHEN k.asset_table = 'videos'
                                   THEN format('%s/%s.%s', j.user_id, j.id, k.file_extension)
                                   ELSE format('%s/%s_%s.%s', j.user_id, j.id, i,
                                               k.file_extension) END) AS metadata
      FROM new_jobs AS j
      JOIN bench_kinds AS k ON k.job_type = j.job_type AND k.units = j.units
      CROSS JOIN LATERAL generate_series(0, k.num_images - 1) AS i
), image_rows AS (
    INSERT INTO images (user_id, job_id, image_index, prompt, quality, format, metadata,
                        created_at, updated_at)
    SELECT user_id, id, idx, prompt, quality, file_extension, metadata, created_at, created_at
      FROM assets WHERE asset_table = 'images'
)
INSERT INTO videos (user_id, job_id, prompt, quality, format, metadata, created_at, updated_at)
SELECT user_id, id, prompt, quality, file_extension, metadata, created_at, created_at
  FROM assets WHERE asset_table = 'videos'
"""


# The tables' keys and indexes, as statements that drop them (foreign keys first) and that
# restore them (in the reverse order): the fill writes bare tables, then builds each index once.
KEYS_SQL = """
SELECT drop_statement, restore_statement FROM (
    SELECT CASE contype WHEN 'f' THEN 1 ELSE 2 END AS step,
           format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname),
           format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname,
                  pg_get_constraintdef(oid))
      FROM pg_constraint
     WHERE conrelid = ANY($1::regclass[]) AND contype IN ('f', 'p', 'u')
    UNION ALL
    SELECT 3, format('DROP INDEX %s', indexrelid::regclass), pg_get_indexdef(indexrelid)
      FROM pg_index
     WHERE indrelid = ANY($1::regclass[])
       AND NOT EXISTS (SELECT FROM pg_constraint WHERE conindid = indexrelid)
) AS keys (step, drop_statement, restore_statement)
ORDER BY step
"""
INDEX_DEFINITIONS_SQL = """
SELECT array_agg(pg_get_indexdef(indexrelid) ORDER BY indexrelid::regclass::text)
  FROM pg_index WHERE indrelid = ANY($1::regclass[])
"""
TABLES = ["jobs", "images", "videos"]


async def fill(pool: asyncpg.Pool, jobs: int, mix: dict[tuple[str, int], int]) -> str:
    """Empty the tables, then write ``jobs`` queued jobs of the mix; returns a summary line.

    Bulk-load practice: the keys and indexes are dropped, the rows written in created_at order,
    then the same keys and indexes (read back from the catalog) built again.
    """
    started = time.perf_counter()
    async with pool.acquire() as connection:
        await connection.execute("TRUNCATE jobs, images, videos, callback_deliveries")
        await connection.execute("SET synchronous_commit = off")
        await connection.execute("SET maintenance_work_mem = '512MB'")
        await write_kinds(connection, mix)
        first = await connection.fetchval(
            "SELECT now() - make_interval(secs => $1::float8 / 1000)", jobs + 1
        )
        indexes = await connection.fetchval(INDEX_DEFINITIONS_SQL, TABLES)
        keys = await connection.fetch(KEYS_SQL, TABLES)
        for key in keys:
            await connection.execute(key["drop_statement"])
        for low in range(0, jobs, FILL_CHUNK):
            high = min(low + FILL_CHUNK, jobs) - 1
            await connection.execute(FILL_CHUNK_SQL, low, high, first, USERS)
        written = time.perf_counter()
        for key in reversed(keys):
            await connection.execute(key["restore_statement"])
        if await connection.fetchval(INDEX_DEFINITIONS_SQL, TABLES) != indexes:
            raise RuntimeError("the rebuilt indexes differ from the schema's")
        await connection.execute("DROP TABLE bench_kinds, bench_slots")
        indexed = time.perf_counter()
        await connection.execute("VACUUM ANALYZE jobs, images, videos")
        await connection.execute("CHECKPOINT")
        counts = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM images) AS images,"
            " (SELECT count(*) FROM videos) AS videos,"
            " pg_size_pretty(pg_total_relation_size('jobs') + pg_total_relation_size('images')"
            " + pg_total_relation_size('videos')) AS size"
        )
    return (
        f"{counts['jobs']} jobs, {counts['images']} images, {counts['videos']} videos "
        f"({counts['size']}); rows {written - started:.1f} s, keys and indexes "
        f"{indexed - written:.1f} s, vacuum analyze {time.perf_counter() - indexed:.1f} s"
    )


async def write_kinds(connection: asyncpg.Connection, mix: dict[tuple[str, int], int]) -> None:
    """The fill's templates: one planned job per kind, and 100 slots spread in the mix."""
    await connection.execute("DROP TABLE IF EXISTS bench_kinds, bench_slots")
    await connection.execute(KINDS_TABLE)
    slots: list[int] = []
    for kind, ((job_type, num_images), weight) in enumerate(mix.items()):
        request = JobRequest(job_type=job_type, prompt=PROMPT, num_images=num_images, seed=0)
        plan = plan_job(request, USERS[0])
        spec = plan.spec
        await connection.execute(
            "INSERT INTO bench_kinds VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14)",
            kind,
            spec.job_type,
            spec.format.value,
            spec.quality.value,
            spec.model_type,
            spec.queue.value,
            plan.batch_key,
            plan.units,
            len(plan.assets),
            f"{plan.asset_kind.value}s",
            spec.file_extension,
            plan.prompt,
            plan.metadata,
            [asset.metadata for asset in plan.assets],
        )
        slots += [kind] * weight
    if len(slots) != 100:
        raise ValueError("the mix's weights must add up to 100")
    random.Random(7).shuffle(slots)
    await connection.executemany("INSERT INTO bench_slots VALUES ($1, $2)", list(enumerate(slots)))


class Held:
    """Jobs this benchmark holds (claimed, processing); more are claimed, untimed, on demand."""

    def __init__(self, repository: JobRepository) -> None:
        self.repository = repository
        self.jobs: list[JobRecord] = []

    async def at_least(self, count: int) -> list[JobRecord]:
        while len(self.jobs) < count:
            claimed = await self.repository.claim_jobs("sdxl_queue", 6, WORKER, LEASE_S)
            if not claimed:
                raise RuntimeError("the SDXL queue ran dry")
            self.jobs += claimed
        return self.jobs[:count]

    async def take(self, count: int) -> list[JobRecord]:
        jobs = await self.at_least(count)
        del self.jobs[:count]
        return jobs


async def timed(
    repeats: int,
    call: Callable[..., Awaitable[object]],
    prepare: Callable[[], Awaitable[tuple]] | None = None,
) -> list[float]:
    """Milliseconds per call over ``repeats`` calls; one warm-up call first is not counted.

    ``prepare`` (untimed) makes each call's arguments.
    """
    samples = []
    for _ in range(repeats + 1):
        args = await prepare() if prepare is not None else ()
        started = time.perf_counter()
        await call(*args)
        samples.append((time.perf_counter() - started) * 1000)
    return samples[1:]


async def operation_costs(
    pool: asyncpg.Pool, repository: JobRepository, repeats: int
) -> dict[str, list[float]]:
    held = Held(repository)
    results: dict[str, list[float]] = {}

    async def claim() -> None:
        claimed = await repository.claim_jobs("sdxl_queue", 6, WORKER, LEASE_S)
        if not claimed:
            raise RuntimeError("claim_jobs found nothing")
        held.jobs += claimed

    results["claim_jobs (sdxl, 6 units)"] = await timed(repeats, claim)

    async def claim_lone(job_id: UUID) -> None:
        claimed = await repository.claim_jobs("sdxl_queue", 6, WORKER, LEASE_S)
        if [job.id for job in claimed] != [job_id]:
            raise RuntimeError("the claim did not take the lone job at the head alone")
        # Not held: left processing under its lease, so no later reap puts it back at the head.

    results["claim_jobs (lone batch key)"] = await timed(
        repeats, claim_lone, lambda: lone_job_at_head(pool, repository)
    )

    beating = {job.id: job.attempts for job in await held.at_least(6)}

    async def heartbeat() -> None:
        if len(await repository.heartbeat(beating, LEASE_S)) != len(beating):
            raise RuntimeError("a held job was lost")

    results["heartbeat (6 jobs)"] = await timed(repeats, heartbeat)

    async def one_job() -> tuple[JobRecord]:
        [job] = await held.take(1)
        return (job,)

    async def complete(job: JobRecord) -> None:
        assets = [AssetCompletion(a.index, a.path, {"width": 1024}) for a in job.assets]
        if not await repository.complete_job(job.id, job.attempts, {"generation_time": 1}, assets):
            raise RuntimeError(f"job {job.id} was not completed")

    results["complete_job (fenced)"] = await timed(repeats, complete, one_job)

    async def expire_some() -> tuple:
        expired = [job.id for job in await held.take(EXPIRED_PER_REAP)]
        await pool.execute(
            "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 second' "
            "WHERE id = ANY($1::uuid[])",
            expired,
        )
        return ()

    async def reap() -> None:
        reaped = await repository.reap_expired_leases(MAX_ATTEMPTS, 100)
        if len(reaped) != EXPIRED_PER_REAP:
            raise RuntimeError(f"reaped {len(reaped)} jobs, expected {EXPIRED_PER_REAP}")

    results[f"reap_expired_leases ({EXPIRED_PER_REAP})"] = await timed(repeats, reap, expire_some)

    async def page(filters: JobFilters, cursor: str | None = None) -> str | None:
        jobs, next_cursor = await repository.list_jobs(filters, PAGE, cursor)
        if len(jobs) != PAGE:
            raise RuntimeError(f"a page of {len(jobs)} jobs")
        return next_cursor

    second = await page(JobFilters())
    results["list_jobs (page 1)"] = await timed(repeats, page, _args(JobFilters()))
    results["list_jobs (user, page 1)"] = await timed(
        repeats, page, _args(JobFilters(user_id=USERS[3]))
    )
    results["list_jobs (page 2, cursor)"] = await timed(repeats, page, _args(JobFilters(), second))
    results["queued_units (sdxl)"] = await timed(
        repeats, lambda: repository.queued_units("sdxl_queue")
    )
    return results


async def lone_job_at_head(pool: asyncpg.Pool, repository: JobRepository) -> tuple[UUID]:
    """Submit an image-to-image job, whose batch key no queued job shares, at the queue's head.

    Its claim must stop at the head job: the younger jobs cannot share its pipeline call.
    """
    request = JobRequest(
        job_type="sdxl_image_fast",
        prompt=PROMPT,
        num_images=1,
        reference_image_key="reference_images/bench.png",
        reference_strength=0.5,
    )
    job, _ = await repository.insert_job(plan_job(request, USERS[0]))
    await pool.execute(
        "UPDATE jobs SET created_at = created_at - interval '30 days' WHERE id = $1", job.id
    )
    return (job.id,)


def _args(*args: object) -> Callable[[], Awaitable[tuple]]:
    async def prepare() -> tuple:
        return args

    return prepare


async def explain_claim(pool: asyncpg.Pool, repository: JobRepository) -> list[str]:
    """The claim's plans, custom and generic, at the queue as it is and with a lone batch key
    at the head; each claim is rolled back."""
    lines = []
    async with pool.acquire() as connection:
        await connection.execute(
            f"PREPARE bench_claim(text, int, text, float8) AS {QUERIES['claim_jobs']}"
        )
        try:
            for head in ("queue as filled", "lone batch key at the head"):
                if head.startswith("lone"):
                    await lone_job_at_head(pool, repository)
                for mode in ("custom", "generic"):
                    lines.append(f"-- {head}, {mode} plan")
                    lines += await _explain_summary(
                        connection,
                        f"force_{mode}_plan",
                        "EXECUTE bench_claim('sdxl_queue', 6, 'bench-explain', 600)",
                    )
        finally:
            await connection.execute("DEALLOCATE bench_claim")
    return lines


async def _explain_summary(connection: asyncpg.Connection, mode: str, statement: str) -> list[str]:
    """The top node, every scan and the times of ``EXPLAIN (ANALYZE, BUFFERS)``, rolled back."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(f"SET LOCAL plan_cache_mode = {mode}")
        rows = [row[0] for row in await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {statement}")]
    finally:
        await transaction.rollback()
    wanted = ("Scan", "Rows Removed", "Planning Time", "Execution Time")
    return [rows[0]] + [row for row in rows[1:] if any(word in row for word in wanted)]


async def capacity(
    pool: asyncpg.Pool, repository: JobRepository, workers: int, seconds: float
) -> tuple[int, float, float]:
    """Jobs claimed, heartbeated and completed by ``workers`` concurrent loops; the seconds they
    took; this process's CPU time over those seconds (the client's share of the machine)."""
    completed = 0
    deadline = time.perf_counter() + seconds

    async def worker(name: str) -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            claimed = await repository.claim_jobs("sdxl_queue", 1, name, LEASE_S)
            if not claimed:
                return
            [job] = claimed
            if job.id not in await repository.heartbeat({job.id: job.attempts}, LEASE_S):
                raise RuntimeError(f"{name} lost job {job.id}")
            assets = [AssetCompletion(a.index, a.path, {}) for a in job.assets]
            if not await repository.complete_job(job.id, job.attempts, {}, assets):
                raise RuntimeError(f"{name} could not complete job {job.id}")
            completed += 1

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(f"bench-worker-{n}") for n in range(workers)))
    seconds = time.perf_counter() - started
    return completed, seconds, (time.process_time() - cpu_started) / seconds


async def warm_pool(pool: asyncpg.Pool, connections: int) -> None:
    """Open the pool's connections before timing, so that no run pays for connecting."""

    async def hold() -> None:
        async with pool.acquire() as connection:
            await connection.execute("SELECT pg_sleep(0.05)")

    await asyncio.gather(*(hold() for _ in range(connections)))


def quantiles(samples: list[float]) -> tuple[float, float]:
    p95 = statistics.quantiles(samples, n=20, method="inclusive")[18]
    return statistics.median(samples), p95


def print_costs(sizes: list[int], costs: dict[int, dict[str, list[float]]]) -> None:
    smallest, largest = sizes[0], sizes[-1]
    print(f"\ncost per call in ms (median / p95); ratio: median at {largest} / at {smallest}")
    header = f"{'operation':<30}" + "".join(f"{f'{size} jobs':>21}" for size in sizes)
    print(header + f"{'ratio':>8}")
    for name in costs[smallest]:
        cells = []
        for size in sizes:
            median, p95 = quantiles(costs[size][name])
            cells.append(f"{median:>11.2f} /{p95:>8.2f}")
        ratio = statistics.median(costs[largest][name]) / statistics.median(costs[smallest][name])
        print(f"{name:<30}" + "".join(cells) + f"{ratio:>8.2f}")


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="ovzq", dir="/tmp"))
    settings = Settings(
        database_url=None, data_dir=data_dir, db_pool_max_size=max(args.workers) + 4
    )
    try:
        load = " ".join(f"{value:.1f}" for value in os.getloadavg())
        print(f"{os.cpu_count()} CPUs, load average {load} at the start")
        async with open_database(settings) as pool:
            repository = JobRepository(pool)
            costs = {}
            explain: list[str] = []
            for size in args.sizes:
                print(f"backlog {size}: {await fill(pool, size, MIXED)}", flush=True)
                costs[size] = await operation_costs(pool, repository, args.repeats)
                if size == args.sizes[-1]:
                    explain = await explain_claim(pool, repository)
            print_costs(args.sizes, costs)
            print(f"\nclaim_jobs at {args.sizes[-1]} jobs: EXPLAIN (ANALYZE, BUFFERS), rolled back")
            print("\n".join(explain))

            print(
                f"\ncapacity: {args.capacity_jobs} queued 1-image SDXL jobs; each worker loops "
                f"claim_jobs(1) -> heartbeat -> complete_job (at most {args.capacity_seconds} s)"
            )
            print(f"{'workers':>8}{'jobs':>8}{'seconds':>10}{'jobs/s':>10}{'client CPU':>12}")
            await warm_pool(pool, max(args.workers))
            for workers in args.workers:
                await fill(pool, args.capacity_jobs, ONE_IMAGE)
                done, seconds, cpu = await capacity(
                    pool, repository, workers, args.capacity_seconds
                )
                print(
                    f"{workers:>8}{done:>8}{seconds:>10.2f}{done / seconds:>10.0f}{cpu:>12.0%}",
                    flush=True,
                )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--capacity-jobs", type=int, default=5000)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    args = parser.parse_args()
    args.sizes.sort()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

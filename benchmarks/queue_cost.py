"""Queue cost: the PostgreSQL queue's statements at a small and a huge backlog, and its capacity.

PERFORMANCE.md's targets: the queue's per-call cost does not grow with its backlog (claims,
heartbeats, completions, reaps, list pages and the backlog count use indexes that reach the
rows they need without scanning the backlog), and at 32 concurrent workers the queue claims,
heartbeats and completes at least 400 jobs/s on this machine's embedded PostgreSQL.

    .venv/bin/python benchmarks/queue_cost.py [--sizes 10000 1000000] [--repeats 30]
        [--users 10000] [--workers 1 8 32] [--database-url postgresql://...]

Starts an embedded PostgreSQL (pgserver) in a temporary directory, removed at the end; or fills
``--database-url``, an existing database (its queue tables are truncated; a DSN is used as the
service uses one: without asyncpg's statement cache, see ``open_database``).

1. Cost per call. For each backlog size the tables are filled with set-based SQL (one
   ``INSERT ... SELECT FROM generate_series`` per chunk writing the jobs and their image and
   video rows, in the shape ``plan_job`` writes): a mix of 1, 3 and 6-image SDXL jobs and WAN
   jobs, all queued, over ``--users`` users drawn log-uniformly (a few heavy users, a long
   tail; a tenth of them premium, a fifth bulk, the rest standard), each job with its tier, its
   expected cost and the virtual start ``insert_job`` would have given it (fair order,
   migration 0008), and each user's virtual finish in ``fair_shares``. Then ``VACUUM
   ANALYZE`` and a checkpoint, and each operation runs through ``JobRepository`` ``--repeats``
   times after one warm-up call; median and p95 in ms. "lone batch key" claims with an
   image-to-image job at the head whose batch key no other queued job shares (so the claim
   takes it alone); "user, page 1" lists the heaviest user's jobs. The claim's plans at the
   largest size (``EXPLAIN (ANALYZE, BUFFERS)``, custom and generic, rolled back) show which
   indexes it uses.
2. Capacity. A backlog of ``--capacity-jobs`` 1-image SDXL jobs; N concurrent workers each
   loop claim_jobs(sdxl_queue, 1) -> heartbeat -> complete_job until the queue is empty or
   ``--capacity-seconds`` have passed; jobs/s claimed, heartbeated and completed for each N.
3. Where it goes, for each N: the CPU of this process, of the server's processes and of the
   whole machine; each statement's mean latency as the workers saw it; commits, WAL bytes and
   WAL syncs per job (``pg_stat_database``, ``pg_stat_wal``); and what the workers' server
   sessions were doing, sampled from ``pg_stat_activity`` every 50 ms (e.g. ``Lock/object``:
   waiting for the lock that serializes the commits of transactions that NOTIFY, held through
   each one's WAL flush; ``LWLock/WALWrite``, ``IO/WALSync``: waiting for a WAL flush; ``CPU``:
   running).

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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import asyncpg

from ourvidz_serve.catalog import Tier
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

USER_BASE = 0x0B0E_0000_0000_4000_8000_0000_0000_0000
HEAVY_USER = UUID(int=USER_BASE)
"""User 0: the most jobs (the log-uniform spread's head), whose list page is timed."""
PROMPT = "a lighthouse on a cliff at dusk, waves below, cinematic light"
WORKER = "bench-worker"
LEASE_S = 600.0
MAX_ATTEMPTS = 3
EXPIRED_PER_REAP = 5
PAGE = 50
FILL_CHUNK = 50_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

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
    prompt text, metadata jsonb, asset_metadata jsonb, cost_s float8
);
CREATE UNLOGGED TABLE bench_slots (slot int PRIMARY KEY, kind int);
-- idx 0 .. users - 1; every tenth user premium, every fifth (offset 1) bulk, the rest standard.
CREATE UNLOGGED TABLE bench_users (idx int PRIMARY KEY, user_id uuid, tier text, weight float8);
-- Each user's virtual finish per queue, carried from one chunk to the next.
CREATE UNLOGGED TABLE bench_finish (
    queue text, user_id uuid, finish float8, PRIMARY KEY (queue, user_id)
);
"""

# $1, $2: the chunk's first and last job number; $3: the first job's created_at; $4: users.
# A job's user is drawn log-uniformly over the users (Zipf-like: user 0 submits about 7% of the
# jobs at 10 000 users, the last one about 1 in 100 000), its kind from the slots. Arrivals are
# all before any claim, so the queue's virtual clock stays at 0 and a job's virtual start is its
# user's virtual finish in its queue: the running sum of the user's earlier jobs' cost over
# their tier's weight, as insert_job computes it one job at a time (migration 0008).
FILL_CHUNK_SQL = """
WITH planned AS (
    SELECT g, u.user_id, u.tier, k.kind, k.queue, k.cost_s, k.cost_s / u.weight AS step
      FROM generate_series($1::bigint, $2::bigint) AS g
      JOIN bench_slots AS s ON s.slot = g % 100
      JOIN bench_kinds AS k ON k.kind = s.kind
      JOIN bench_users AS u
        ON u.idx = least($4::int - 1, floor(power($4::float8 + 1,
                         ((g * 2246822519) % 4294967296) / 4294967296.0))::int - 1)
), ordered AS (
    SELECT p.*, coalesce(f.finish, 0)
                + sum(p.step) OVER (PARTITION BY p.queue, p.user_id ORDER BY p.g)
                - p.step AS virtual_start
      FROM planned AS p
      LEFT JOIN bench_finish AS f ON f.queue = p.queue AND f.user_id = p.user_id
), finishes AS (
    INSERT INTO bench_finish (queue, user_id, finish)
    SELECT queue, user_id, max(virtual_start + step) FROM ordered GROUP BY queue, user_id
    ON CONFLICT (queue, user_id) DO UPDATE SET finish = EXCLUDED.finish
), new_jobs AS (
    INSERT INTO jobs (user_id, job_type, format, quality, model_type, queue, metadata,
                      batch_key, units, tier, cost_s, virtual_start, created_at, updated_at)
    SELECT o.user_id, k.job_type, k.format, k.quality, k.model_type, k.queue,
           k.metadata || jsonb_build_object(
               'seed', (o.g * 2654435761) % 4294967296,
               'submitted_at', to_char(($3::timestamptz + o.g * interval '1 millisecond')
                                       AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')),
           k.batch_key, k.units, o.tier, o.cost_s, o.virtual_start,
           $3::timestamptz + o.g * interval '1 millisecond',
           $3::timestamptz + o.g * interval '1 millisecond'
      FROM ordered AS o
      JOIN bench_kinds AS k ON k.kind = o.kind
     ORDER BY o.g
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


# The tables' keys and indexes, as statements that drop them (foreign keys first, also those of
# other tables that reference them, e.g. callback_deliveries.job_id: they depend on jobs_pkey)
# and that restore them (in the reverse order): the fill writes bare tables, then builds each
# index once.
KEYS_SQL = """
SELECT drop_statement, restore_statement FROM (
    SELECT CASE contype WHEN 'f' THEN 1 ELSE 2 END AS step,
           format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname),
           format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname,
                  pg_get_constraintdef(oid))
      FROM pg_constraint
     WHERE (conrelid = ANY($1::regclass[]) AND contype IN ('f', 'p', 'u'))
        OR (confrelid = ANY($1::regclass[]) AND contype = 'f')
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


async def fill(
    pool: asyncpg.Pool,
    jobs: int,
    mix: dict[tuple[str, int], int],
    users: int,
    weights: dict[Tier, float],
) -> str:
    """Empty the tables, then write ``jobs`` queued jobs of the mix over ``users`` users, in
    fair order, and each user's virtual finish; returns a summary line.

    Bulk-load practice: the keys and indexes are dropped, the rows written in created_at order,
    then the same keys and indexes (read back from the catalog) built again.
    """
    started = time.perf_counter()
    async with pool.acquire() as connection:
        await connection.execute(
            "TRUNCATE jobs, images, videos, callback_deliveries, fair_shares, gpu_usage"
        )
        await connection.execute("SET synchronous_commit = off")
        await connection.execute("SET maintenance_work_mem = '512MB'")
        await write_templates(connection, mix, users, weights)
        first = await connection.fetchval(
            "SELECT now() - make_interval(secs => $1::float8 / 1000)", jobs + 1
        )
        indexes = await connection.fetchval(INDEX_DEFINITIONS_SQL, TABLES)
        keys = await connection.fetch(KEYS_SQL, TABLES)
        for key in keys:
            await connection.execute(key["drop_statement"])
        for low in range(0, jobs, FILL_CHUNK):
            high = min(low + FILL_CHUNK, jobs) - 1
            await connection.execute(FILL_CHUNK_SQL, low, high, first, users)
        await connection.execute(
            "INSERT INTO fair_shares (queue, user_id, virtual_finish)"
            " SELECT queue, user_id, finish FROM bench_finish"
        )
        written = time.perf_counter()
        for key in reversed(keys):
            await connection.execute(key["restore_statement"])
        if await connection.fetchval(INDEX_DEFINITIONS_SQL, TABLES) != indexes:
            raise RuntimeError("the rebuilt indexes differ from the schema's")
        await connection.execute("DROP TABLE bench_kinds, bench_slots, bench_users, bench_finish")
        indexed = time.perf_counter()
        await connection.execute("VACUUM ANALYZE jobs, images, videos, fair_shares")
        await connection.execute("CHECKPOINT")
        # The pooled session goes back as it came (a pool need not reset sessions).
        await connection.execute("RESET synchronous_commit; RESET maintenance_work_mem")
        counts = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM images) AS images,"
            " (SELECT count(*) FROM videos) AS videos,"
            " (SELECT count(DISTINCT user_id) FROM fair_shares) AS users,"
            " pg_size_pretty(pg_total_relation_size('jobs') + pg_total_relation_size('images')"
            " + pg_total_relation_size('videos')) AS size"
        )
    return (
        f"{counts['jobs']} jobs of {counts['users']} users, {counts['images']} images, "
        f"{counts['videos']} videos ({counts['size']}); rows {written - started:.1f} s, keys "
        f"and indexes {indexed - written:.1f} s, vacuum analyze "
        f"{time.perf_counter() - indexed:.1f} s"
    )


def user_id(index: int) -> UUID:
    return UUID(int=USER_BASE + index)


def tier_of(index: int) -> Tier:
    """Every tenth user premium, every fifth (offset 1) bulk, the rest standard."""
    if index % 10 == 0:
        return Tier.PREMIUM
    return Tier.BULK if index % 5 == 1 else Tier.STANDARD


async def write_templates(
    connection: asyncpg.Connection,
    mix: dict[tuple[str, int], int],
    users: int,
    weights: dict[Tier, float],
) -> None:
    """The fill's templates: one planned job per kind, 100 slots spread in the mix, the users
    with their tiers' weights."""
    await connection.execute("DROP TABLE IF EXISTS bench_kinds, bench_slots, bench_users")
    await connection.execute("DROP TABLE IF EXISTS bench_finish")
    await connection.execute(KINDS_TABLE)
    slots: list[int] = []
    for kind, ((job_type, num_images), weight) in enumerate(mix.items()):
        request = JobRequest(job_type=job_type, prompt=PROMPT, num_images=num_images, seed=0)
        plan = plan_job(request, HEAVY_USER)
        spec = plan.spec
        await connection.execute(
            "INSERT INTO bench_kinds VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14, $15)",
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
            plan.cost_s,
        )
        slots += [kind] * weight
    if len(slots) != 100:
        raise ValueError("the mix's weights must add up to 100")
    random.Random(7).shuffle(slots)
    await connection.executemany("INSERT INTO bench_slots VALUES ($1, $2)", list(enumerate(slots)))
    await connection.copy_records_to_table(
        "bench_users",
        records=[
            (n, user_id(n), tier_of(n).value, weights.get(tier_of(n), 1.0)) for n in range(users)
        ],
    )
    await connection.execute("ANALYZE bench_kinds, bench_slots, bench_users")


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
        repeats, page, _args(JobFilters(user_id=HEAVY_USER))
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
    job, _ = await repository.insert_job(plan_job(request, HEAVY_USER))
    # Then ahead of the queue's head, whatever its user's virtual finish gave it.
    await pool.execute(
        "UPDATE jobs SET virtual_start = (SELECT min(virtual_start) - 1 FROM jobs"
        " WHERE status = 'queued' AND queue = 'sdxl_queue') WHERE id = $1",
        job.id,
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
            "PREPARE bench_claim(text, int, text, float8, text[], float8, int, text[]) AS "
            + QUERIES["claim_jobs"]
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
                        # As an SDXL replica claims: adapter affinity on, holding none.
                        "EXECUTE bench_claim('sdxl_queue', 6, 'bench-explain', 600, '{}', 30, "
                        "16, '{}')",
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


@dataclass
class Capacity:
    """One capacity run: the jobs done, the wall time, and where the time went."""

    jobs: int
    seconds: float
    client_cpu: float
    """This process's CPU time over the wall time (1.0: one core)."""
    server_cpu: float | None
    """The PostgreSQL processes' CPU time over the wall time (None: not on this machine)."""
    machine_cpu: float
    """Every process's, this one's and the server's included (2.0: both of two cores)."""
    latency_ms: dict[str, float]
    """Mean milliseconds per call of each statement, as the workers saw them."""
    per_job: dict[str, float]
    """Server counters per completed job: commits, WAL bytes, WAL syncs (every session's,
    this benchmark's own few statements included)."""
    waits: list[tuple[str, float]]
    """The most common states of the workers' server sessions while active: the mean number of
    sessions in each (``Lock/object``: waiting for the NOTIFY commit lock; ``CPU``: running)."""


SERVER_COUNTERS_SQL = """
SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits,
       wal_bytes::float8 AS wal_bytes, wal_sync AS wal_syncs
  FROM pg_stat_wal
"""
ACTIVE_SESSIONS_SQL = """
SELECT coalesce(wait_event_type || '/' || wait_event, 'CPU') AS state,
       split_part(query, E'\n', 1) AS statement
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()
"""
STATEMENT_NAMES = {"-- The first": "claim", "-- Extend": "heartbeat", "-- The job a": "complete"}
SAMPLE_EVERY_S = 0.05


async def capacity(
    pool: asyncpg.Pool, repository: JobRepository, workers: int, seconds: float
) -> Capacity:
    """Jobs claimed, heartbeated and completed by ``workers`` concurrent loops, and where the
    time went: CPU of this process, of the server and of the machine; each statement's latency;
    commits, WAL and WAL syncs per job; what the server sessions were doing (sampled)."""
    completed = 0
    deadline = time.perf_counter() + seconds
    latencies: dict[str, list[float]] = {"claim": [], "heartbeat": [], "complete": []}

    async def worker(name: str) -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            claimed = await repository.claim_jobs("sdxl_queue", 1, name, LEASE_S)
            claimed_at = time.perf_counter()
            latencies["claim"].append(claimed_at - started)
            if not claimed:
                return
            [job] = claimed
            if job.id not in await repository.heartbeat({job.id: job.attempts}, LEASE_S):
                raise RuntimeError(f"{name} lost job {job.id}")
            beaten_at = time.perf_counter()
            latencies["heartbeat"].append(beaten_at - claimed_at)
            assets = [AssetCompletion(a.index, a.path, {}) for a in job.assets]
            if not await repository.complete_job(
                job.id, job.attempts, {}, assets, gpu_seconds=job.cost_s
            ):
                raise RuntimeError(f"{name} could not complete job {job.id}")
            latencies["complete"].append(time.perf_counter() - beaten_at)
            completed += 1

    states: Counter[str] = Counter()
    samples = 0
    working = True

    async def sample(connection: asyncpg.Connection) -> None:
        nonlocal samples
        while working:
            for row in await connection.fetch(ACTIVE_SESSIONS_SQL):
                name = next(
                    (v for k, v in STATEMENT_NAMES.items() if row["statement"].startswith(k)),
                    "other",
                )
                states[f"{row['state']} ({name})"] += 1
            samples += 1
            await asyncio.sleep(SAMPLE_EVERY_S)

    async with pool.acquire() as observer:
        server_pids = await _server_pids(observer)
        before = await server_counters(pool, observer)
        server_started, machine_started = _cpu_of(server_pids), _machine_cpu()
        started, cpu_started = time.perf_counter(), time.process_time()
        sampler = asyncio.create_task(sample(observer))
        await asyncio.gather(*(worker(f"bench-worker-{n}") for n in range(workers)))
        wall = time.perf_counter() - started
        client = (time.process_time() - cpu_started) / wall
        server_ended = _cpu_of(server_pids)
        machine = (_machine_cpu() - machine_started) / wall
        working = False
        await sampler
        after = await server_counters(pool, observer)
    done = max(completed, 1)
    return Capacity(
        jobs=completed,
        seconds=wall,
        client_cpu=client,
        server_cpu=None
        if server_started is None or server_ended is None
        else (server_ended - server_started) / wall,
        machine_cpu=machine,
        latency_ms={k: statistics.fmean(v) * 1000 for k, v in latencies.items() if v},
        per_job={key: (after[key] - before[key]) / done for key in before},
        waits=[(state, count / max(samples, 1)) for state, count in states.most_common(4)],
    )


async def server_counters(pool: asyncpg.Pool, observer: asyncpg.Connection) -> dict[str, float]:
    """Commits, WAL bytes and WAL syncs so far. Every session reports its counts to the server
    only now and then (up to seconds late), so each of the pool's sessions is asked to now."""
    others = [await pool.acquire() for _ in range(pool.get_size() - 1)]
    try:
        for connection in [observer, *others]:
            await connection.execute("SELECT pg_stat_force_next_flush()")
        await asyncio.sleep(0.1)  # each flushes as it goes idle
        return dict(await observer.fetchrow(SERVER_COUNTERS_SQL))
    finally:
        for connection in others:
            await pool.release(connection)


async def _server_pids(connection: asyncpg.Connection) -> list[int]:
    """The server's processes, when it runs on this machine (the embedded one does)."""
    pids = [row["pid"] for row in await connection.fetch("SELECT pid FROM pg_stat_activity")]
    return [pid for pid in pids if _cpu_of([pid]) is not None]


def _cpu_of(pids: list[int]) -> float | None:
    """CPU seconds the processes used so far (from /proc); None if one is not visible."""
    if not pids:
        return None
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def _machine_cpu() -> float:
    """CPU seconds every core spent busy so far (/proc/stat: all but idle and iowait)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


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


def print_where_it_goes(runs: dict[int, Capacity]) -> None:
    print(
        "\nwhere it goes: mean ms per call as the workers saw it; per job: commits, WAL bytes,"
        " WAL syncs; the workers' active server sessions (mean count per sample) by state"
    )
    for workers, run in runs.items():
        latency = ", ".join(f"{name} {ms:.2f}" for name, ms in run.latency_ms.items())
        per_job = run.per_job
        print(
            f"{workers:>8} workers: {latency} ms; {per_job['commits']:.1f} commits, "
            f"{per_job['wal_bytes']:.0f} B WAL, {per_job['wal_syncs']:.2f} syncs per job"
        )
        waits = ", ".join(f"{state} {count:.1f}" for state, count in run.waits)
        print(f"{'':>8}  sessions: {waits or '-'}")


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="ovzq", dir="/tmp"))
    settings = Settings(
        database_url=args.database_url,
        data_dir=data_dir,
        db_pool_max_size=max(args.workers) + 4,
    )
    weights = settings.tier_weights
    try:
        load = " ".join(f"{value:.1f}" for value in os.getloadavg())
        print(f"{os.cpu_count()} CPUs, load average {load} at the start")
        async with open_database(settings) as pool:
            repository = JobRepository(pool)
            costs = {}
            explain: list[str] = []
            for size in args.sizes:
                summary = await fill(pool, size, MIXED, args.users, weights)
                print(f"backlog {size}: {summary}", flush=True)
                costs[size] = await operation_costs(pool, repository, args.repeats)
                if size == args.sizes[-1]:
                    explain = await explain_claim(pool, repository)
            print_costs(args.sizes, costs)
            print(f"\nclaim_jobs at {args.sizes[-1]} jobs: EXPLAIN (ANALYZE, BUFFERS), rolled back")
            print("\n".join(explain))

            print(
                f"\ncapacity: {args.capacity_jobs} queued 1-image SDXL jobs of {args.users} "
                f"users; each worker loops claim_jobs(1) -> heartbeat -> complete_job (at most "
                f"{args.capacity_seconds} s)"
            )
            print(
                f"{'workers':>8}{'jobs':>8}{'seconds':>10}{'jobs/s':>10}{'client CPU':>12}"
                f"{'server CPU':>12}{'machine CPU':>13}"
            )
            await warm_pool(pool, max(args.workers))
            runs = {}
            for workers in args.workers:
                await fill(pool, args.capacity_jobs, ONE_IMAGE, args.users, weights)
                run = runs[workers] = await capacity(
                    pool, repository, workers, args.capacity_seconds
                )
                server = "-" if run.server_cpu is None else f"{run.server_cpu:.0%}"
                print(
                    f"{workers:>8}{run.jobs:>8}{run.seconds:>10.2f}"
                    f"{run.jobs / run.seconds:>10.0f}{run.client_cpu:>12.0%}{server:>12}"
                    f"{run.machine_cpu:>13.0%}",
                    flush=True,
                )
            print_where_it_goes(runs)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--users", type=int, default=10_000, help="the backlog's submitters")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--capacity-jobs", type=int, default=5000)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument(
        "--database-url",
        help="an existing, empty database to fill (its tables are truncated); default: an "
        "embedded PostgreSQL in a temporary directory",
    )
    args = parser.parse_args()
    args.sizes.sort()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

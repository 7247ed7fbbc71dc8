"""Every SQL statement the service runs. Nothing else talks to the database."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import SecretStr

from ourvidz_serve.catalog import Tier
from ourvidz_serve.domain import AssetKind, JobPlan, JobStatus
from ourvidz_serve.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidRequest,
    QuotaExhausted,
    TooManyQueuedJobs,
)
from ourvidz_serve.persistence.queries import load_queries
from ourvidz_serve.persistence.retention import (
    CancelledJob,
    DeletedUserRows,
    FinishedJobFiles,
    PurgeFiles,
)

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "ourvidz_jobs_queued"
CANCEL_CHANNEL = "ourvidz_jobs_cancelled"
EVENTS_CHANNEL = "ourvidz_job_events"  # also named in migration 0006 (its status trigger)
"""JSON events of running jobs (status, progress, asset) for the SSE streams."""

# What a lost or unreachable server raises; each becomes DatabaseUnavailable (HTTP 503).
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
# Statements that failed for a reason that passes, so the caller retries them (HTTP 503): one
# cancelled by statement_timeout, lock_timeout or an operator (pg_cancel_backend), a deadlock or
# serialization failure, a write refused as read-only during a managed failover, a connection
# the driver no longer accepts. Any other error is a bug and propagates as it is.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    asyncpg.TransactionRollbackError,
    asyncpg.ReadOnlySQLTransactionError,
)
# The driver's own errors on a connection that went away under a statement (asyncpg has no
# subclass for them); any other InterfaceError ("another operation is in progress") is a bug.
_LOST_CONNECTION_MESSAGES = ("connection is closed", "connection was closed", "pool is closing")


class JobStateError(RuntimeError):
    """A state change that the job's current status does not allow."""


@dataclass(frozen=True)
class AssetRecord:
    id: UUID
    kind: AssetKind
    index: int
    status: JobStatus
    path: str
    """Storage key in the bucket: planned at submission, the stored file once completed."""
    metadata: dict[str, Any]
    completed_at: datetime | None

    @property
    def seed(self) -> int | None:
        seed = self.metadata.get("seed")
        return int(seed) if seed is not None else None

    @property
    def bucket(self) -> str:
        return str(self.metadata["bucket"])


@dataclass(frozen=True)
class JobRecord:
    id: UUID
    user_id: UUID
    job_type: str
    format: str
    quality: str
    model_type: str
    queue: str
    status: JobStatus
    metadata: dict[str, Any]
    project_id: UUID | None
    video_id: UUID | None
    image_id: UUID | None
    attempts: int
    """The attempt number of the latest claim: fences that attempt's outcome."""
    claimed_by: str | None
    lease_expires_at: datetime | None
    units: int
    """Work in the queue's capacity unit: images for SDXL, jobs for WAN."""
    request_hash: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    progress: dict[str, Any] | None
    """The latest ``{step, total, at}`` its worker recorded while it ran."""
    tier: Tier
    cost_s: float
    """Expected GPU seconds (fair order advances by it; a quota reserves it until the end)."""
    virtual_start: float
    """Its place in the queue's fair order: claims take the smallest."""
    expired_at: datetime | None
    """When retention deleted its files (downloads then answer 410)."""
    assets: list[AssetRecord]

    @property
    def prompt(self) -> str:
        return str(self.metadata["prompt"])


@dataclass(frozen=True)
class TierQueueFigures:
    queue: str
    tier: Tier
    queued: int
    running: int
    backlog_s: float
    """Expected GPU seconds of the queued jobs."""
    oldest_wait_s: float | None
    """How long the oldest queued job has waited (None: none queued)."""


@dataclass(frozen=True)
class GpuQuota:
    budget_s: float
    """GPU seconds a user may spend per window (``inf``: no quota, usage still counted)."""
    window_s: float


@dataclass(frozen=True)
class GpuUsage:
    spent_s: float
    """Charged in the rolling window: measured time times the deployment's GPU share."""
    reserved_s: float
    """The expected cost of the user's unfinished jobs."""
    budget_s: float
    window_s: float

    @property
    def remaining_s(self) -> float:
        return max(self.budget_s - self.spent_s - self.reserved_s, 0.0)


@dataclass(frozen=True)
class AssetCompletion:
    index: int
    path: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class JobFilters:
    user_id: UUID | None = None
    status: JobStatus | None = None
    job_type: str | None = None
    job_types: tuple[str, ...] | None = None
    """Any of these types (the OpenAI video routes list the video types)."""


@dataclass(frozen=True)
class CallbackClaim:
    id: UUID
    job_id: UUID
    event: str
    webhook_id: str
    attempt: int


@dataclass(frozen=True)
class ReapedJob:
    id: UUID
    queue: str
    status: JobStatus
    """``queued`` for a re-run, ``failed`` once the job used its attempts."""
    attempts: int


_JOB_COLUMNS = """
    id, user_id, job_type, format, quality, model_type, queue, status, metadata, project_id,
    video_id, image_id, attempts, claimed_by, lease_expires_at, units, request_hash,
    created_at, started_at, completed_at, error_message, progress, tier, cost_s, virtual_start,
    expired_at
"""

_JOB_FIELDS = [name.strip() for name in _JOB_COLUMNS.split(",")]

_LORA_COLUMNS = """
    name, digest, storage_key, rank, size_bytes, format, dtype, targets, created_by, created_at,
    retired_at
"""
_LORA_FIELDS = [name.strip() for name in _LORA_COLUMNS.split(",")]

QUERIES = load_queries(
    substitutions={
        "job_columns": _JOB_COLUMNS.strip(),
        "lora_columns": _LORA_COLUMNS.strip(),
        "notify_channel": NOTIFY_CHANNEL,
        "cancel_channel": CANCEL_CHANNEL,
        "events_channel": EVENTS_CHANNEL,
    }
)

_ASSETS_OF_JOBS = """
    SELECT job_id, id, 'image' AS kind, image_index AS idx, status,
           coalesce(image_url, metadata->>'stored_path') AS path,
           metadata, completed_at
      FROM images WHERE job_id = ANY($1::uuid[])
    UNION ALL
    SELECT job_id, id, 'video' AS kind, 0 AS idx, status,
           coalesce(video_url, metadata->>'stored_path') AS path,
           metadata, completed_at
      FROM videos WHERE job_id = ANY($1::uuid[])
    ORDER BY job_id, idx
"""


CLAIM_WINDOW = 16
"""Jobs at the head of fair order a claim without adapter preference looks at."""


@dataclass(frozen=True)
class AdapterAffinity:
    """What a claim may prefer: jobs whose LoRAs the claiming replica already holds."""

    active: Sequence[str]
    """Content digests of the LoRAs in the replica's pipeline now (nothing to load)."""
    cached: Sequence[str]
    """Content digests of the LoRAs in its CPU cache (nothing to download)."""
    max_wait_s: float
    """A job waiting this long since submission takes its fair place again."""
    window: int
    """How many jobs at the head of the fair order the preference looks at."""


@dataclass(frozen=True)
class LoraRecord:
    """A row of the LoRA registry."""

    name: str
    digest: str
    storage_key: str
    rank: int
    size_bytes: int
    format: str
    dtype: str
    targets: list[str]
    created_by: str
    created_at: datetime
    retired_at: datetime | None


def lora_name_taken(name: str) -> Conflict:
    """The answer to a second live LoRA of one name."""
    return Conflict(
        f"a LoRA named {name!r} exists; delete it first or choose another name",
        details={"name": name},
        param="name",
    )


def encode_cursor(created_at: datetime, job_id: UUID) -> str:
    raw = f"{created_at.isoformat()}|{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_id = raw.split("|")
        return datetime.fromisoformat(created_at), UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest("cursor is not valid", details={"cursor": cursor}) from exc


class JobRepository:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout_s: float = 10.0,
        direct_dsn: SecretStr | str | None = None,
    ) -> None:
        """``direct_dsn``: a session connection for LISTEN (``OURVIDZ_DATABASE_DIRECT_URL``),
        needed when ``pool`` goes through a transaction-mode pooler; ``None``: LISTEN holds a
        pooled connection."""
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self._direct_dsn = SecretStr(direct_dsn) if isinstance(direct_dsn, str) else direct_dsn

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. The one place database errors are classified: a lost or
        unreachable server, and a statement that failed for a passing reason, raise
        ``DatabaseUnavailable`` (retry); anything else propagates as the bug it is."""
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as connection:
                yield connection
        except _UNAVAILABLE_ERRORS as exc:
            # The detail (hosts, socket paths) is for the operator's log, not for callers.
            logger.warning("database unavailable: %s: %s", type(exc).__name__, exc)
            raise DatabaseUnavailable(
                f"the database is unavailable ({type(exc).__name__}); retry shortly"
            ) from exc
        except (*_TRANSIENT_ERRORS, asyncpg.InterfaceError) as exc:
            if isinstance(exc, asyncpg.InterfaceError) and not any(
                message in str(exc) for message in _LOST_CONNECTION_MESSAGES
            ):
                raise
            logger.warning("database statement failed: %s: %s", type(exc).__name__, exc)
            raise DatabaseUnavailable(
                f"the database did not complete the statement ({type(exc).__name__}); retry shortly"
            ) from exc

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")

    async def take_rate_token(self, subject: str, per_second: float, burst: int) -> float | None:
        """Spend one request of ``subject``'s budget: ``None`` if allowed, else seconds to wait.

        The budget lives in PostgreSQL, so every ingress replica spends from the same one.
        """
        interval = 1.0 / per_second
        async with self._connection() as connection:
            row = await connection.fetchrow(
                QUERIES["take_rate_token"], subject, interval, float(burst)
            )
        if row["allowed"]:
            return None
        # A concurrent request wrote the row after this statement began: about one interval.
        wait = row["wait_s"]
        return interval if wait is None else max(wait, 0.0)

    async def insert_job(
        self,
        plan: JobPlan,
        *,
        max_queued: int = 0,
        retry_after_s: float = 15.0,
        owes_callback: bool = False,
        weight: float = 1.0,
        quota: GpuQuota | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert the job and all its asset rows in one transaction and wake the workers.

        Returns ``(job, created)``. With an idempotency key already used by the same user, the
        original job comes back with ``created=False``; with a different body, ``Conflict``.
        Two statements write everything (the job with its NOTIFY, then every asset row), and
        their RETURNING rows make the record, so a submission costs no read-back.

        ``max_queued`` > 0 caps the user's queued jobs (``TooManyQueuedJobs`` beyond it). The
        cap costs two more statements under a per-user lock, so that submissions through
        several ingress replicas cannot overshoot it; a replay of an idempotent submission is
        answered even at the cap.

        ``owes_callback``: a callback URL is configured, so the job's end writes a delivery
        row (migration 0007's trigger), whichever connection ends it.

        ``weight``: the tier's weight in fair order. ``quota``: the user's GPU-time budget;
        ``QuotaExhausted`` when what the window charged, plus what the user's unfinished jobs
        reserve, plus this job's cost exceeds it. Checked under the same per-user lock as the
        cap, so concurrent submissions cannot overspend it.
        """
        spec = plan.spec
        async with self._connection() as connection, connection.transaction():
            # An idempotency key takes the lock too: two concurrent submissions with one key
            # would otherwise both advance the user's virtual finish (insert_job's upsert runs
            # before its insert finds the conflict).
            if max_queued > 0 or quota is not None or plan.idempotency_key is not None:
                await connection.execute(QUERIES["lock_user_submissions"], plan.user_id)
                if plan.idempotency_key is not None:
                    replay = await self._idempotent_replay(connection, plan)
                    if replay is not None:
                        return replay, False
            if max_queued > 0:
                queued = await connection.fetchval(
                    QUERIES["queued_jobs_of_user"], plan.user_id, max_queued
                )
                if queued >= max_queued:
                    raise TooManyQueuedJobs(
                        f"the user already has {max_queued} queued jobs; retry once some start",
                        retry_after_s=retry_after_s,
                        details={"max_queued_jobs": max_queued},
                    )
            if quota is not None:
                await self._check_quota(connection, plan.user_id, plan.cost_s, quota)
            job_row = await connection.fetchrow(
                QUERIES["insert_job"],
                plan.job_id,
                plan.user_id,
                spec.job_type,
                spec.format.value,
                spec.quality.value,
                spec.model_type,
                spec.queue.value,
                plan.metadata,
                plan.project_id,
                plan.video_id,
                plan.image_id,
                plan.idempotency_key,
                plan.request_hash,
                NOTIFY_CHANNEL,
                plan.batch_key,
                plan.units,
                owes_callback,
                plan.tier.value,
                plan.cost_s,
                weight,
                list(plan.adapters),
            )
            if job_row is None:
                return await self._existing_idempotent_job(connection, plan), False
            # The URL columns stay empty until the file exists (complete_job); the planned key
            # is metadata.stored_path from submission on.
            is_video = plan.asset_kind is AssetKind.VIDEO
            table = "videos" if is_video else "images"
            index_column, index_value = ("", "") if is_video else (", image_index", ", asset.idx")
            asset_rows = await connection.fetch(
                f"""
                INSERT INTO {table} (user_id, project_id, job_id, prompt, quality, format,
                                     metadata{index_column})
                SELECT $1, $2, $3, $4, $5, $6, asset.meta{index_value}
                  FROM unnest($7::int[], $8::jsonb[]) AS asset(idx, meta)
                RETURNING job_id, id, '{plan.asset_kind.value}' AS kind,
                          {"0" if is_video else "image_index"} AS idx, status,
                          metadata->>'stored_path' AS path, metadata, completed_at
                """,
                plan.user_id,
                plan.project_id,
                plan.job_id,
                plan.prompt,
                spec.quality.value,
                spec.file_extension,
                [asset.index for asset in plan.assets],
                [asset.metadata for asset in plan.assets],
            )
        assets = sorted((_asset_record(row) for row in asset_rows), key=lambda a: a.index)
        return _job_record(job_row, assets), True

    async def _check_quota(
        self, connection: asyncpg.Connection, user_id: UUID, cost_s: float, quota: GpuQuota
    ) -> None:
        usage = await self._usage(connection, user_id, quota)
        if usage.spent_s + usage.reserved_s + cost_s <= quota.budget_s:
            return
        # Retry once enough charges have left the window; if the unfinished jobs alone are too
        # much, once they have been charged and left it too.
        excess = usage.spent_s + usage.reserved_s + cost_s - quota.budget_s
        wait = await connection.fetchval(QUERIES["quota_frees_in"], user_id, quota.window_s, excess)
        retry_after = quota.window_s if wait is None else max(float(wait), 1.0)
        raise QuotaExhausted(
            f"the user's GPU-time quota is exhausted: {usage.spent_s:.1f} s spent and "
            f"{usage.reserved_s:.1f} s reserved by unfinished jobs of {quota.budget_s:g} s per "
            f"{quota.window_s:g} s; this job needs about {cost_s:g} s",
            retry_after_s=retry_after,
            details={
                "budget_gpu_seconds": quota.budget_s,
                "spent_gpu_seconds": round(usage.spent_s, 3),
                "reserved_gpu_seconds": round(usage.reserved_s, 3),
                "job_gpu_seconds": cost_s,
                "window_s": quota.window_s,
            },
        )

    async def _usage(
        self, connection: asyncpg.Connection, user_id: UUID, quota: GpuQuota
    ) -> GpuUsage:
        row = await connection.fetchrow(QUERIES["gpu_usage_of_user"], user_id, quota.window_s)
        return GpuUsage(
            spent_s=float(row["spent"]),
            reserved_s=float(row["reserved"]),
            budget_s=quota.budget_s,
            window_s=quota.window_s,
        )

    async def gpu_usage(self, user_id: UUID, quota: GpuQuota) -> GpuUsage:
        """What the user spent in the window and what their unfinished jobs reserve."""
        async with self._connection() as connection:
            return await self._usage(connection, user_id, quota)

    async def _existing_idempotent_job(
        self, connection: asyncpg.Connection, plan: JobPlan
    ) -> JobRecord:
        job = await self._idempotent_replay(connection, plan)
        assert job is not None
        return job

    async def _idempotent_replay(
        self, connection: asyncpg.Connection, plan: JobPlan
    ) -> JobRecord | None:
        """The job submitted before under this idempotency key, if any (``Conflict`` when its
        body differs)."""
        job_id = await connection.fetchval(
            "SELECT id FROM jobs WHERE user_id = $1 AND idempotency_key = $2",
            plan.user_id,
            plan.idempotency_key,
        )
        if job_id is None:
            return None
        job = await self._fetch_job(connection, job_id)
        assert job is not None
        if job.request_hash != plan.request_hash:
            raise Conflict(
                "Idempotency-Key was already used with a different request body",
                details={"job_id": str(job.id)},
            )
        return job

    async def get_job(self, job_id: UUID) -> JobRecord | None:
        async with self._connection() as connection:
            return await self._fetch_job(connection, job_id)

    async def _fetch_job(self, connection: asyncpg.Connection, job_id: UUID) -> JobRecord | None:
        row = await connection.fetchrow(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        if row is None:
            return None
        assets = await self._fetch_assets(connection, [job_id])
        return _job_record(row, assets.get(job_id, []))

    async def _fetch_assets(
        self, connection: asyncpg.Connection, job_ids: list[UUID]
    ) -> dict[UUID, list[AssetRecord]]:
        by_job: dict[UUID, list[AssetRecord]] = {}
        for row in await connection.fetch(_ASSETS_OF_JOBS, job_ids):
            by_job.setdefault(row["job_id"], []).append(_asset_record(row))
        return by_job

    async def list_jobs(
        self, filters: JobFilters, limit: int, cursor: str | None, *, oldest_first: bool = False
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first (or oldest first); keyset pagination on ``(created_at, id)``."""
        conditions: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("user_id", filters.user_id),
            ("status", filters.status.value if filters.status else None),
            ("job_type", filters.job_type),
        ):
            if value is not None:
                args.append(value)
                conditions.append(f"{column} = ${len(args)}")
        if filters.job_types is not None:
            args.append(list(filters.job_types))
            conditions.append(f"job_type = ANY(${len(args)}::text[])")
        beyond, direction = (">", "ASC") if oldest_first else ("<", "DESC")
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            args += [created_at, job_id]
            conditions.append(f"(created_at, id) {beyond} (${len(args) - 1}, ${len(args)})")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        args.append(limit + 1)
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM jobs {where} "
            f"ORDER BY created_at {direction}, id {direction} LIMIT ${len(args)}"
        )
        async with self._connection() as connection:
            rows = await connection.fetch(sql, *args)
            page = rows[:limit]
            assets = await self._fetch_assets(connection, [row["id"] for row in page])
        jobs = [_job_record(row, assets.get(row["id"], [])) for row in page]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(page[-1]["created_at"], page[-1]["id"])
        return jobs, next_cursor

    async def claim_jobs(
        self,
        queue: str,
        free_units: int,
        worker_id: str,
        lease_s: float,
        affinity: AdapterAffinity | None = None,
    ) -> list[JobRecord]:
        """Claim the first queued job in fair order and jobs that can share its pipeline call.

        At most ``free_units`` units are claimed; each claimed job is ``processing`` under a
        lease of ``lease_s`` held by ``worker_id``, with its attempt number incremented.
        ``FOR UPDATE SKIP LOCKED`` lets any number of workers claim at once. With an
        ``affinity``, a job near the head whose LoRAs the worker holds may go first, for a
        while (see the query's comment).
        """
        if free_units <= 0:
            return []
        active = list(affinity.active) if affinity is not None else None
        cached = list(affinity.cached) if affinity is not None else []
        max_wait_s = affinity.max_wait_s if affinity is not None else 0.0
        # The window also bounds how many jobs a claim passes over that other replicas are
        # claiming at the same moment (SKIP LOCKED).
        window = affinity.window if affinity is not None else CLAIM_WINDOW
        async with self._connection() as connection:
            rows = await connection.fetch(
                QUERIES["claim_jobs"],
                queue,
                free_units,
                worker_id,
                float(lease_s),
                active,
                float(max_wait_s),
                window,
                cached,
            )
        jobs = [_job_record(row, _claimed_assets(row)) for row in rows]
        return sorted(jobs, key=lambda job: (job.created_at, job.id))

    async def heartbeat(self, held: dict[UUID, int], lease_s: float) -> set[UUID]:
        """Extend the leases of ``{job_id: attempt}``; return the ids still held."""
        if not held:
            return set()
        async with self._connection() as connection:
            rows = await connection.fetch(
                QUERIES["heartbeat"], list(held), list(held.values()), float(lease_s)
            )
        return {row["id"] for row in rows}

    async def complete_job(
        self,
        job_id: UUID,
        attempt: int,
        metadata_patch: dict[str, Any],
        assets: list[AssetCompletion],
        gpu_seconds: float = 0.0,
    ) -> bool:
        """Mark the job and every asset row completed (rows are updated, never inserted) and
        charge ``gpu_seconds`` to its user.

        Fenced: False (and nothing changed) unless the job is still ``processing`` in this
        attempt. Raises ``JobStateError`` (and changes nothing) when an asset has no row.
        """
        async with self._connection() as connection:
            completed = await connection.fetchval(
                QUERIES["complete_job"],
                job_id,
                attempt,
                metadata_patch,
                [asset.index for asset in assets],
                [asset.path for asset in assets],
                [asset.metadata for asset in assets],
                float(gpu_seconds),
            )
            if completed:
                return True
            current = await connection.fetchrow(QUERIES["job_attempt"], job_id)
        if current is not None and (current["status"], current["attempts"]) == (
            JobStatus.PROCESSING.value,
            attempt,
        ):
            raise JobStateError(f"an asset of job {job_id} has no row; nothing was completed")
        return False

    async def job_attempt(self, job_id: UUID) -> tuple[JobStatus, int] | None:
        """The job's status and latest attempt number (None: no such job)."""
        async with self._connection() as connection:
            row = await connection.fetchrow(QUERIES["job_attempt"], job_id)
        return None if row is None else (JobStatus(row["status"]), int(row["attempts"]))

    async def fail_job(
        self,
        job_id: UUID,
        attempt: int,
        error_message: str,
        error_type: str,
        metadata: dict[str, Any],
        gpu_seconds: float = 0.0,
    ) -> bool:
        """Mark the job and its asset rows failed and charge the ``gpu_seconds`` its attempt
        ran; fenced like ``complete_job``."""
        async with self._connection() as connection:
            failed = await connection.fetchval(
                QUERIES["fail_job"],
                job_id,
                attempt,
                error_message,
                metadata | {"error_type": error_type},
                {"error_type": error_type, "error_message": error_message},
                float(gpu_seconds),
            )
        return bool(failed)

    async def release_job(
        self, job_id: UUID, attempt: int, worker_id: str, give_back: bool = True
    ) -> bool:
        """Put a job this attempt of ``worker_id`` holds back in the queue (its replica is
        stopping), its attempt given back unless ``give_back`` is False."""
        async with self._connection() as connection:
            released = await connection.fetch(
                QUERIES["release_job"], job_id, attempt, worker_id, give_back
            )
        return bool(released)

    async def reap_expired_leases(self, max_attempts: int, limit: int = 100) -> list[ReapedJob]:
        """Requeue jobs whose lease expired, or fail those that used ``max_attempts``."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["reap_expired_leases"], max_attempts, limit)
        return [
            ReapedJob(row["id"], row["queue"], JobStatus(row["status"]), row["attempts"])
            for row in rows
        ]

    async def queued_units(self, queue: str, max_jobs: int = 10_000) -> int:
        """Units waiting in a queue, counted over its oldest ``max_jobs`` jobs (flat cost)."""
        async with self._connection() as connection:
            return int(await connection.fetchval(QUERIES["queued_units"], queue, max_jobs))

    async def queue_overview(
        self, queues: Sequence[str], cap: int = 100_000, timeout_s: float = 2.0
    ) -> list[TierQueueFigures]:
        """Per queue and tier: queued and running jobs, backlog and oldest wait (capped)."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                QUERIES["queue_overview"], list(queues), cap, timeout=timeout_s
            )
        return [
            TierQueueFigures(
                queue=row["queue"],
                tier=Tier(row["tier"]),
                queued=int(row["queued"]),
                running=int(row["running"]),
                backlog_s=float(row["backlog_s"]),
                oldest_wait_s=row["oldest_wait_s"],
            )
            for row in rows
        ]

    async def replicas_at_work(
        self, queues: Sequence[str], timeout_s: float = 2.0
    ) -> dict[str, int]:
        """Per queue, how many replicas hold a job's lease."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                QUERIES["replicas_at_work"], list(queues), timeout=timeout_s
            )
        return {row["queue"]: int(row["replicas"]) for row in rows}

    async def queue_position(self, job: JobRecord, cap: int = 10_000) -> tuple[int, float]:
        """``(jobs ahead, their expected GPU seconds)`` of a queued job in fair order."""
        async with self._connection() as connection:
            row = await connection.fetchrow(
                QUERIES["queue_position"], job.queue, job.virtual_start, job.id, cap
            )
        return int(row["ahead"]), float(row["ahead_s"])

    async def queue_lengths(
        self, queues: Sequence[str], cap: int = 100_000, timeout_s: float = 2.0
    ) -> dict[str, int]:
        """Jobs waiting in each queue, each count capped at ``cap`` (for ``/metrics``)."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                QUERIES["queue_lengths"], list(queues), cap, timeout=timeout_s
            )
        return {row["queue"]: int(row["waiting"]) for row in rows}

    async def jobs_last_hour(self, timeout_s: float = 2.0) -> list[tuple[str, str, int]]:
        """``(job_type, status, jobs)`` of the jobs submitted in the last hour."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["jobs_last_hour"], timeout=timeout_s)
        return [(row["job_type"], row["status"], int(row["jobs"])) for row in rows]

    async def cancel_job(self, job_id: UUID) -> JobStatus | None:
        """End a queued or running job ``cancelled``; return the status it had (None: none).

        A finished job is left as it is (the caller tells ``completed`` and ``failed`` from
        ``cancelled``, which makes cancelling twice harmless).
        """
        async with self._connection() as connection:
            row = await connection.fetchrow(QUERIES["cancel_job"], job_id)
        return None if row["was"] is None else JobStatus(row["was"])

    async def record_cancelled_stop(
        self, job_id: UUID, attempt: int, patch: dict[str, Any], gpu_seconds: float = 0.0
    ) -> bool:
        """Merge where a cancelled attempt's call stopped into the cancelled job's metadata and
        charge the ``gpu_seconds`` it ran."""
        async with self._connection() as connection:
            recorded = await connection.fetchval(
                QUERIES["record_cancelled_stop"], job_id, attempt, patch, float(gpu_seconds)
            )
        return bool(recorded)

    async def record_progress(self, progress: dict[tuple[UUID, int], tuple[int, int]]) -> None:
        """``{(job id, attempt): (step, total)}`` as each job's latest progress (fenced)."""
        if not progress:
            return
        keys = list(progress)
        async with self._connection() as connection:
            await connection.execute(
                QUERIES["record_progress"],
                [job_id for job_id, _ in keys],
                [attempt for _, attempt in keys],
                [progress[key][0] for key in keys],
                [progress[key][1] for key in keys],
            )

    async def claim_callbacks(self, limit: int, lock_s: float) -> list[CallbackClaim]:
        """Due callback deliveries, locked for this deliverer (SKIP LOCKED)."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["claim_callbacks"], limit, float(lock_s))
        return [
            CallbackClaim(
                row["id"], row["job_id"], row["event"], row["webhook_id"], row["attempts"]
            )
            for row in rows
        ]

    async def record_callback_attempt(
        self,
        claim: CallbackClaim,
        outcome: str,
        retry_in_s: float,
        record: dict[str, Any],
    ) -> bool:
        """Keep one attempt's record; ``outcome`` is ``delivered``, ``failed`` or ``pending``
        (due again in ``retry_in_s``). Fenced by the attempt number."""
        async with self._connection() as connection:
            status = await connection.execute(
                QUERIES["record_callback_attempt"],
                claim.id,
                claim.attempt,
                outcome,
                float(retry_in_s),
                record,
            )
        return status == "UPDATE 1"

    async def callback_deliveries(self, job_id: UUID) -> list[dict[str, Any]]:
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["callback_deliveries_of_job"], job_id)
        return [dict(row) for row in rows]

    async def publish_asset_stored(
        self, job_id: UUID, attempt: int, index: int, bucket: str, path: str
    ) -> None:
        """Tell SSE subscribers that one file of a running attempt is stored."""
        async with self._connection() as connection:
            await connection.execute(
                QUERIES["publish_asset_stored"], job_id, attempt, index, bucket, path
            )

    # --- Retention and per-user data deletion (schemas/queries/retention.sql) ---

    async def expire_jobs(self, retention_s: float, limit: int, purge: PurgeFiles) -> list[UUID]:
        """Lock up to ``limit`` finished jobs that ended more than ``retention_s`` ago and are
        not expired yet (SKIP LOCKED: sweepers in other replicas take other jobs), call
        ``purge`` with them while they stay locked, and set ``expired_at`` on the jobs it
        returns. Returns those ids. A purge that raises marks nothing (and its jobs come back
        in a later batch: deleting files again is harmless)."""
        async with self._connection() as connection, connection.transaction():
            rows = await connection.fetch(
                QUERIES["lock_expiring_jobs"], float(retention_s), int(limit)
            )
            if not rows:
                return []
            purged = await purge(await self._files_of_jobs(connection, rows))
            if not purged:
                return []
            marked = await connection.fetch(QUERIES["mark_jobs_expired"], list(purged))
        return [row["id"] for row in marked]

    async def mark_expired(self, job_ids: list[UUID]) -> list[UUID]:
        """Mark finished jobs whose files were deleted on request (not by the sweeper) expired;
        the ids marked (one already expired is left as it is)."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["mark_jobs_expired"], job_ids)
        return [row["id"] for row in rows]

    async def jobs_with_possible_orphans(
        self, ended_s_ago: float, window_s: float, limit: int
    ) -> list[FinishedJobFiles]:
        """Finished, unexpired jobs that ended between ``ended_s_ago`` and ``ended_s_ago +
        window_s`` ago and may hold files no row names (claimed more than once, or not
        completed), with the keys their rows name."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                QUERIES["jobs_with_possible_orphans"],
                float(ended_s_ago),
                float(window_s),
                int(limit),
            )
            return await self._files_of_jobs(connection, rows) if rows else []

    async def _files_of_jobs(
        self, connection: asyncpg.Connection, jobs: Sequence[asyncpg.Record]
    ) -> list[FinishedJobFiles]:
        recorded: dict[UUID, set[str]] = {job["id"]: set() for job in jobs}
        named: dict[UUID, set[str]] = {job["id"]: set() for job in jobs}
        buckets: dict[UUID, str] = {}
        for row in await connection.fetch(QUERIES["files_of_jobs"], list(recorded)):
            job_id = row["job_id"]
            if row["bucket"]:
                buckets[job_id] = row["bucket"]
            served = {row["recorded"], row["recorded_poster"]} - {None}
            recorded[job_id] |= served
            named[job_id] |= served | ({row["stored_path"], row["thumbnail_path"]} - {None})
        return [
            FinishedJobFiles(
                id=job["id"],
                user_id=job["user_id"],
                job_type=job["job_type"],
                status=JobStatus(job["status"]),
                bucket=buckets.get(job["id"]),
                recorded=frozenset(recorded[job["id"]]),
                named=frozenset(named[job["id"]]),
            )
            for job in jobs
        ]

    async def expired_job(self, job_id: UUID, user_id: UUID) -> tuple[str, datetime] | None:
        """``(job_type, expired_at)`` of the user's job if retention expired it, else None."""
        async with self._connection() as connection:
            row = await connection.fetchrow(QUERIES["expired_job"], job_id, user_id)
        return None if row is None else (row["job_type"], row["expired_at"])

    async def cancel_user_jobs(self, user_id: UUID) -> list[CancelledJob]:
        """End every queued or running job of the user ``cancelled`` (as ``cancel_job``: the
        workers running them are told, and their outcomes are fenced out)."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["cancel_user_jobs"], user_id)
        return [CancelledJob(row["id"], row["job_type"], JobStatus(row["was"])) for row in rows]

    async def delete_user_rows(
        self, user_id: UUID, queues: Sequence[str], batch: int = 500
    ) -> DeletedUserRows:
        """Delete the user's jobs (their asset and callback rows by cascade), a bounded batch
        per transaction, then their fair-order, GPU-usage and rate-limit rows. ``queues``:
        every queue name (the fair-order rows are found by primary key). Idempotent."""
        deleted = 0
        while True:
            async with self._connection() as connection:
                rows = await connection.fetch(QUERIES["delete_user_jobs"], user_id, int(batch))
            deleted += len(rows)
            if len(rows) < batch:
                break
        async with self._connection() as connection:
            counts = await connection.fetchrow(
                QUERIES["delete_user_records"], user_id, list(queues)
            )
        return DeletedUserRows(
            jobs=deleted,
            fair_shares=int(counts["fair_shares"]),
            gpu_usage=int(counts["gpu_usage"]),
            rate_limits=int(counts["rate_limits"]),
        )

    async def insert_lora(
        self,
        *,
        name: str,
        digest: str,
        storage_key: str,
        rank: int,
        size_bytes: int,
        format: str,
        dtype: str,
        targets: Sequence[str],
        created_by: str,
    ) -> LoraRecord:
        """A new live registry row; ``Conflict`` when the name is live already."""
        async with self._connection() as connection:
            try:
                row = await connection.fetchrow(
                    QUERIES["insert_lora"],
                    name,
                    digest,
                    storage_key,
                    rank,
                    size_bytes,
                    format,
                    dtype,
                    list(targets),
                    created_by,
                )
            except asyncpg.UniqueViolationError:
                raise lora_name_taken(name) from None
        return _lora_record(row)

    async def list_loras(self) -> list[LoraRecord]:
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["list_loras"])
        return [_lora_record(row) for row in rows]

    async def live_loras(self, names: Sequence[str]) -> dict[str, LoraRecord]:
        """The live rows of ``names``, by name (unknown and retired names are absent)."""
        if not names:
            return {}
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["live_loras"], list(names))
        return {row["name"]: _lora_record(row) for row in rows}

    async def retire_lora(self, name: str) -> LoraRecord | None:
        """Retire a live name; None when no live row has it."""
        async with self._connection() as connection:
            row = await connection.fetchrow(QUERIES["retire_lora"], name)
        return _lora_record(row) if row is not None else None

    async def listen(
        self,
        on_queued: Callable[[str], None],
        on_cancelled: Callable[[UUID], None] | None = None,
        retry_s: float = 1.0,
        on_listening: Callable[[], None] = lambda: None,
    ) -> None:
        """Call ``on_queued(queue)`` for every submission or requeue, and ``on_cancelled(id)``
        for every cancelled running job, until cancelled.

        Callers still poll (and the heartbeat drops cancelled jobs), since a notification
        sent while no listener was connected is gone. ``on_listening()`` is called each time
        LISTEN is established.
        """
        handlers: dict[str, Callable[[str], None]] = {NOTIFY_CHANNEL: on_queued}
        if on_cancelled is not None:
            handlers[CANCEL_CHANNEL] = lambda payload: on_cancelled(UUID(payload))
        await self._listen(handlers, retry_s, on_listening)

    async def listen_events(
        self,
        on_event: Callable[[str], None],
        retry_s: float = 1.0,
        on_listening: Callable[[], None] = lambda: None,
    ) -> None:
        """Call ``on_event(json)`` for every job event (see ``EVENTS_CHANNEL``), until
        cancelled. Events sent while the connection was lost are gone: subscribers read the
        job's current state when they start."""
        await self._listen({EVENTS_CHANNEL: on_event}, retry_s, on_listening)

    async def _listen(
        self,
        handlers: dict[str, Callable[[str], None]],
        retry_s: float,
        on_listening: Callable[[], None],
    ) -> None:
        """Hold one connection for ``LISTEN`` on the channels (a session of its own on the
        direct DSN, else a pooled one); when it is lost (a database restart), listen again as
        soon as a connection can be made."""

        def notified(_connection: Any, _pid: int, channel: str, payload: str) -> None:
            handlers[channel](payload)

        while True:
            try:
                await self._listen_until_lost(list(handlers), notified, on_listening)
            except DatabaseUnavailable as exc:
                logger.warning("LISTEN lost (%s); listening again in %.1fs", exc, retry_s)
            await asyncio.sleep(retry_s)

    async def _listen_until_lost(
        self,
        channels: list[str],
        notified: Callable[[Any, int, str, str], None],
        on_listening: Callable[[], None],
    ) -> None:
        # A transaction-mode pooler hands the server connection to other clients between
        # statements, so LISTEN needs a session: its own connection to the direct DSN.
        held = (
            self._connection()
            if self._direct_dsn is None
            else _session_connection(self._direct_dsn.get_secret_value())
        )
        async with held as connection:
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _connection: lost.set())
            async with contextlib.AsyncExitStack() as listeners:
                for channel in channels:
                    await connection.add_listener(channel, notified)
                    # Each removed even if removing another was interrupted: a connection
                    # goes back to the pool with no listener left on it.
                    listeners.push_async_callback(_unlisten, connection, channel, notified)
                on_listening()
                # Also look every few seconds: a dead socket is not always reported at once.
                while not _closed(connection):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=5)


async def _unlisten(
    connection: asyncpg.Connection, channel: str, notified: Callable[[Any, int, str, str], None]
) -> None:
    if not _closed(connection):
        await connection.remove_listener(channel, notified)


@contextlib.asynccontextmanager
async def _session_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own (not pooled), closed after; a lost or unreachable server raises
    ``DatabaseUnavailable``, as for pooled connections."""
    try:
        connection = await asyncpg.connect(dsn)
        try:
            yield connection
        finally:
            try:
                # A connection lost meanwhile has nothing to close politely.
                with contextlib.suppress(Exception):
                    await connection.close(timeout=5)
            finally:
                if not connection.is_closed():  # close timed out or was cancelled
                    connection.terminate()
    except (*_UNAVAILABLE_ERRORS, asyncpg.InterfaceError) as exc:  # Interface: closed under us
        logger.warning("database unavailable: %s: %s", type(exc).__name__, exc)
        raise DatabaseUnavailable(
            f"the database is unavailable ({type(exc).__name__}); retry shortly"
        ) from exc


def _closed(connection: asyncpg.Connection) -> bool:
    """Closed, or already taken back by the pool (which it does when the server goes away)."""
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        return True


def _lora_record(row: asyncpg.Record) -> LoraRecord:
    return LoraRecord(**{field: row[field] for field in _LORA_FIELDS})


def _asset_record(row: asyncpg.Record) -> AssetRecord:
    return AssetRecord(
        id=row["id"],
        kind=AssetKind(row["kind"]),
        index=row["idx"],
        status=JobStatus(row["status"]),
        path=row["path"],
        metadata=row["metadata"],
        completed_at=row["completed_at"],
    )


def _claimed_assets(row: asyncpg.Record) -> list[AssetRecord]:
    """The asset rows a claim returns with its job, as parallel arrays in index order."""
    return [
        AssetRecord(
            id=asset_id,
            kind=AssetKind(kind),
            index=index,
            status=JobStatus(status),
            path=path,
            metadata=metadata,
            completed_at=completed_at,
        )
        for asset_id, kind, index, status, path, metadata, completed_at in zip(
            row["asset_ids"] or [],
            row["asset_kinds"] or [],
            row["asset_indexes"] or [],
            row["asset_statuses"] or [],
            row["asset_paths"] or [],
            row["asset_metadata"] or [],
            row["asset_completed_at"] or [],
            strict=True,
        )
    ]


def _job_record(row: asyncpg.Record, assets: list[AssetRecord]) -> JobRecord:
    values = {key: row[key] for key in _JOB_FIELDS}
    values["status"] = JobStatus(values["status"])
    values["tier"] = Tier(values["tier"])
    return JobRecord(**values, assets=assets)

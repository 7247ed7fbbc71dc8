"""Every SQL statement the service runs. Nothing else talks to the database."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from ourvidz_serve.errors import Conflict, InvalidRequest
from ourvidz_serve.jobs.planning import JobPlan
from ourvidz_serve.jobs.protocol import AssetKind, JobStatus

NOTIFY_CHANNEL = "ourvidz_jobs_queued"


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
    request_hash: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    assets: list[AssetRecord]

    @property
    def prompt(self) -> str:
        return str(self.metadata["prompt"])


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


_JOB_COLUMNS = """
    id, user_id, job_type, format, quality, model_type, queue, status, metadata, project_id,
    video_id, image_id, attempts, request_hash, created_at, started_at, completed_at,
    error_message
"""

_JOB_FIELDS = [name.strip() for name in _JOB_COLUMNS.split(",")]

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
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    async def insert_job(self, plan: JobPlan) -> tuple[JobRecord, bool]:
        """Insert the job and all its asset rows in one transaction and wake the dispatchers.

        Returns ``(job, created)``. With an idempotency key already used by the same user, the
        original job comes back with ``created=False``; with a different body, ``Conflict``.
        Two statements write everything (the job with its NOTIFY, then every asset row), and
        their RETURNING rows make the record, so a submission costs no read-back.
        """
        spec = plan.spec
        async with self._pool.acquire() as connection, connection.transaction():
            job_row = await connection.fetchrow(
                f"""
                WITH inserted AS (
                    INSERT INTO jobs (id, user_id, job_type, format, quality, model_type, queue,
                                      metadata, project_id, video_id, image_id,
                                      idempotency_key, request_hash)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                    ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL
                    DO NOTHING
                    RETURNING {_JOB_COLUMNS}
                )
                SELECT inserted.*, pg_notify($14, inserted.queue) FROM inserted
                """,
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

    async def _existing_idempotent_job(
        self, connection: asyncpg.Connection, plan: JobPlan
    ) -> JobRecord:
        job_id = await connection.fetchval(
            "SELECT id FROM jobs WHERE user_id = $1 AND idempotency_key = $2",
            plan.user_id,
            plan.idempotency_key,
        )
        job = await self._fetch_job(connection, job_id)
        assert job is not None
        if job.request_hash != plan.request_hash:
            raise Conflict(
                "Idempotency-Key was already used with a different request body",
                details={"job_id": str(job.id)},
            )
        return job

    async def get_job(self, job_id: UUID) -> JobRecord | None:
        async with self._pool.acquire() as connection:
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
        self, filters: JobFilters, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first; keyset pagination on ``(created_at, id)``."""
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
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            args += [created_at, job_id]
            conditions.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        args.append(limit + 1)
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM jobs {where} "
            f"ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
        )
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(sql, *args)
            page = rows[:limit]
            assets = await self._fetch_assets(connection, [row["id"] for row in page])
        jobs = [_job_record(row, assets.get(row["id"], [])) for row in page]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(page[-1]["created_at"], page[-1]["id"])
        return jobs, next_cursor

    async def claim_jobs(self, queue: str, limit: int) -> list[JobRecord]:
        """Take up to ``limit`` of the oldest queued jobs of a queue and mark them processing.

        ``FOR UPDATE SKIP LOCKED`` lets any number of dispatchers claim concurrently without
        ever handing the same job to two of them.
        """
        if limit <= 0:
            return []
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                f"""
                UPDATE jobs SET status = 'processing', started_at = clock_timestamp(),
                                updated_at = clock_timestamp(), attempts = attempts + 1
                 WHERE id IN (SELECT id FROM jobs
                               WHERE status = 'queued' AND queue = $1
                               ORDER BY created_at, id
                               LIMIT $2
                               FOR UPDATE SKIP LOCKED)
                RETURNING {_JOB_COLUMNS}
                """,
                queue,
                limit,
            )
            if not rows:
                return []
            ids = [row["id"] for row in rows]
            await _set_asset_status(connection, ids, JobStatus.PROCESSING)
            assets = await self._fetch_assets(connection, ids)
        jobs = [_job_record(row, assets.get(row["id"], [])) for row in rows]
        return sorted(jobs, key=lambda job: (job.created_at, job.id))

    async def merge_job_metadata(self, job_id: UUID, patch: dict[str, Any]) -> None:
        await self._pool.execute(
            "UPDATE jobs SET metadata = metadata || $2::jsonb, updated_at = clock_timestamp() "
            "WHERE id = $1",
            job_id,
            patch,
        )

    async def complete_job(
        self, job_id: UUID, metadata_patch: dict[str, Any], assets: list[AssetCompletion]
    ) -> None:
        """Mark a processing job and every asset row completed; rows are updated, not inserted.

        Raises ``JobStateError`` (and changes nothing) when the job is not processing or an
        asset has no row.
        """
        async with self._pool.acquire() as connection, connection.transaction():
            job_format = await connection.fetchval(
                """
                UPDATE jobs SET status = 'completed', metadata = metadata || $2::jsonb,
                       completed_at = clock_timestamp(), updated_at = clock_timestamp()
                 WHERE id = $1 AND status = 'processing'
                RETURNING format
                """,
                job_id,
                metadata_patch,
            )
            if job_format is None:
                raise JobStateError(f"job {job_id} is not processing; not completing it")
            for asset in assets:
                if job_format == "video":
                    status = await connection.execute(
                        """
                        UPDATE videos SET status = 'completed', video_url = $2,
                               metadata = metadata || $3::jsonb,
                               completed_at = clock_timestamp(), updated_at = clock_timestamp()
                         WHERE job_id = $1
                        """,
                        job_id,
                        asset.path,
                        asset.metadata,
                    )
                else:
                    status = await connection.execute(
                        """
                        UPDATE images SET status = 'completed', image_url = $3,
                               metadata = metadata || $4::jsonb,
                               completed_at = clock_timestamp(), updated_at = clock_timestamp()
                         WHERE job_id = $1 AND image_index = $2
                        """,
                        job_id,
                        asset.index,
                        asset.path,
                        asset.metadata,
                    )
                if status != "UPDATE 1":
                    raise JobStateError(f"asset {asset.index} of job {job_id} has no row")

    async def fail_job(
        self, job_id: UUID, error_message: str, error_type: str, metadata: dict[str, Any]
    ) -> bool:
        """Mark a job that has not ended, and its asset rows, failed; False if it had ended."""
        patch = metadata | {"error_type": error_type}
        async with self._pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                """
                UPDATE jobs SET status = 'failed', error_message = $2,
                       metadata = metadata || $3::jsonb,
                       completed_at = clock_timestamp(), updated_at = clock_timestamp()
                 WHERE id = $1 AND status IN ('queued', 'processing')
                """,
                job_id,
                error_message,
                patch,
            )
            if status != "UPDATE 1":
                return False
            await _set_asset_status(
                connection,
                [job_id],
                JobStatus.FAILED,
                {"error_type": error_type, "error_message": error_message},
            )
        return True

    async def requeue_job(self, job_id: UUID) -> bool:
        """Put a processing job (and its assets) back in the queue; False if not processing."""
        async with self._pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                """
                UPDATE jobs SET status = 'queued', started_at = NULL,
                       updated_at = clock_timestamp()
                 WHERE id = $1 AND status = 'processing'
                """,
                job_id,
            )
            if status != "UPDATE 1":
                return False
            await _set_asset_status(connection, [job_id], JobStatus.QUEUED)
            await connection.execute(
                "SELECT pg_notify($1, queue) FROM jobs WHERE id = $2", NOTIFY_CHANNEL, job_id
            )
        return True

    async def queue_lengths(self) -> dict[str, int]:
        rows = await self._pool.fetch(
            "SELECT queue, count(*) AS n FROM jobs WHERE status = 'queued' GROUP BY queue"
        )
        return {row["queue"]: row["n"] for row in rows}


async def _set_asset_status(
    connection: asyncpg.Connection,
    job_ids: list[UUID],
    status: JobStatus,
    metadata_patch: dict[str, Any] | None = None,
) -> None:
    """Give every asset row (image or video) of these jobs the job's new status."""
    for table in ("images", "videos"):
        await connection.execute(
            f"UPDATE {table} SET status = $2, metadata = metadata || $3::jsonb, "
            "updated_at = clock_timestamp() WHERE job_id = ANY($1::uuid[])",
            job_ids,
            status.value,
            metadata_patch or {},
        )


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


def _job_record(row: asyncpg.Record, assets: list[AssetRecord]) -> JobRecord:
    values = {key: row[key] for key in _JOB_FIELDS}
    values["status"] = JobStatus(values["status"])
    return JobRecord(**values, assets=assets)

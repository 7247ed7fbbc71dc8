"""The attempt fences storage: a worker paused mid-upload past its lease (SIGSTOP), resumed
(SIGCONT) after the next attempt completed, changes neither the recorded files nor their bytes,
and what it uploaded is deleted. The paused worker is a process of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from ourvidz_serve.domain import JobStatus
from ourvidz_serve.storage import attempt_key
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.workers.reaper import reap_once
from tests.workers.test_worker import HeldHandler, eventually, plan, terminal, worker

REPO_ROOT = Path(__file__).resolve().parents[2]


async def line_with(stream: asyncio.StreamReader, text: str, timeout_s: float = 60) -> str:
    async with asyncio.timeout(timeout_s):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the paused worker exited before printing {text!r}"
            if text in line:
                return line


async def test_a_paused_attempt_resumed_after_the_next_one_completed_changes_nothing(
    repository, pool, settings, database_url, local_storage: LocalStorage
):
    job, _ = await repository.insert_job(plan(num_images=1))
    [planned] = job.assets
    paused = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.paused_worker",
        database_url,
        str(settings.data_dir),
        "bytes of the stale attempt",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
    )
    assert paused.stdout is not None
    try:
        uploading = await line_with(paused.stdout, "UPLOADING")
        os.kill(paused.pid, signal.SIGSTOP)
        assert planned.path in uploading, "the first attempt stores under the contract's key"

        # Its 2-second lease runs out while it is stopped; the job is queued and run again.
        async def expired() -> bool:
            lease = await pool.fetchval(
                "SELECT lease_expires_at < clock_timestamp() FROM jobs WHERE id=$1", job.id
            )
            return bool(lease)

        await eventually(expired, 10, "the paused attempt's lease expiring")
        [reaped] = await reap_once(repository, max_attempts=3)
        assert (reaped.id, reaped.status) == (job.id, JobStatus.QUEUED)
        winner = HeldHandler(payload=b"bytes of the attempt that completed")
        winner.release.set()
        async with worker(repository, local_storage, winner, settings):
            done = await terminal(repository, job.id, timeout_s=30)
        assert (done.status, done.attempts) == (JobStatus.COMPLETED, 2)
        [asset] = done.assets
        assert asset.path == attempt_key(planned.path, 2) != planned.path
        recorded = await local_storage.get(asset.bucket, asset.path)
        assert recorded == b"bytes of the attempt that completed"

        # The stale attempt wakes up, uploads, is fenced out and deletes its own upload.
        os.kill(paused.pid, signal.SIGCONT)
        await line_with(paused.stdout, "deleted the 1 files")
        after = await repository.get_job(job.id)
        assert after is not None
        assert (after.status, after.attempts, [a.path for a in after.assets]) == (
            JobStatus.COMPLETED,
            2,
            [asset.path],
        )
        assert await local_storage.get(asset.bucket, asset.path) == recorded
        assert not await local_storage.exists(asset.bucket, planned.path)
    finally:
        if paused.returncode is None:
            os.kill(paused.pid, signal.SIGCONT)
            paused.terminate()
            await paused.wait()

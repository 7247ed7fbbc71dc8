"""Chaos: replicas SIGKILLed at random while mixed jobs are submitted; no job may be lost.

A bounded run for an operator, not part of the test suite (it takes minutes and loads the
machine). It checks the queue's promises under crashes: every accepted job ends terminal,
exactly once, with exactly its asset rows and their files.

    .venv/bin/python benchmarks/chaos.py [--jobs 500] [--submitters 32] [--kill-every 10]

Starts ``serve run serve_config.yaml`` (tiny profile, embedded PostgreSQL, local storage) with
short leases (a killed replica's jobs return to the queue within seconds) and a high
``OURVIDZ_MAX_ATTEMPTS`` (so the kill schedule alone fails no job). ``--submitters`` clients
post ``--jobs`` jobs of all ten types (SDXL with 1, 3 and 6 images) in a shuffled order, at
``--rate`` jobs per second in all (unpaced, 500 jobs go in seconds and few kills meet them),
each with an ``Idempotency-Key``: a submission that meets a connection error or a 5xx (the
ingress restarting) is retried with the same key, so a job stored before its answer was lost
comes back as a 200 replay rather than a second job. Meanwhile every ``--kill-every`` seconds
a random live replica of a random deployment (Ingress, SDXL, WAN, Enhancer) gets SIGKILL,
until the submissions are done and ``--kill-tail`` seconds more (or every job is terminal).
Then it waits up to ``--timeout`` seconds for every job to be terminal and reads the
service's database and storage.

Exits non-zero, keeping the work directory (``serve.log``, Ray's Serve logs, the database),
when a job is lost (accepted but absent or never terminal), submitted twice, has duplicated
or missing asset rows, is completed with an asset row or file missing, when a submission
was given up, or when the service is not ready again at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx

from ourvidz_serve.catalog import JOB_TYPES, SDXL_NUM_IMAGES, ModelFamily, OutputFormat
from ourvidz_serve.persistence.database import start_embedded_postgres

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests
from tests.launcher import NO_REQUEST_LIMITS, RunningService, replica_pids, run_service

DEPLOYMENTS = ("Ingress", "SDXL", "WAN", "Enhancer")
TERMINAL = ["completed", "failed", "cancelled"]
USER = str(uuid4())
SETTINGS = {
    "OURVIDZ_LEASE_S": "4",
    "OURVIDZ_HEARTBEAT_INTERVAL_S": "1",
    "OURVIDZ_REAPER_INTERVAL_S": "1",
    "OURVIDZ_QUEUE_POLL_INTERVAL_S": "0.2",
    "OURVIDZ_MAX_ATTEMPTS": "10",
}
DB_POLL_S = 2.0
SHOWN = 10
"""Job ids printed per kind of problem."""
# Each must be 0 at the end of a run.
PROBLEMS = (
    "lost",
    "double-submitted",
    "asset rows duplicated",
    "asset rows missing",
    "files missing",
    "completed with unfinished asset rows",
    "submissions given up",
)


@dataclass
class Submission:
    body: dict[str, Any]
    key: str = field(default_factory=lambda: "chaos-" + uuid4().hex)
    job_id: UUID | None = None
    retries: int = 0
    replayed: bool = False
    """Answered 200: an earlier try had stored the job, its answer was lost."""
    error: str | None = None
    """Why the submission was given up (or rejected)."""
    seconds: float = 0.0
    """From the first try to the answer (the proxy holds requests while the ingress restarts)."""


@dataclass
class Kill:
    at_s: float
    deployment: str
    pid: int


@dataclass
class Run:
    submissions: list[Submission]
    started: float = field(default_factory=time.monotonic)
    retry_reasons: Counter[str] = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)
    kill_skips: int = 0
    submitted_s: float | None = None
    drained_s: float | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Report:
    statuses: Counter[str]
    failures: Counter[str]
    attempts: Counter[int]
    problems: dict[str, list[str]]
    """``{problem: [one line per job or submission]}``; empty lists are fine."""
    replicas_at_end: dict[str, int]
    ready: str


def plan_jobs(count: int, rng: random.Random) -> list[Submission]:
    """``count`` jobs cycling through the ten types (SDXL through 1, 3, 6 images), shuffled."""
    sizes = itertools.cycle(SDXL_NUM_IMAGES)
    types = itertools.cycle(JOB_TYPES.values())
    submissions = []
    for number in range(count):
        spec = next(types)
        body: dict[str, Any] = {
            "job_type": spec.job_type,
            "prompt": f"chaos job {number}: a lighthouse on a cliff at dusk",
            "user_id": USER,
            "seed": number * 10,
        }
        if spec.model is ModelFamily.SDXL:
            body["num_images"] = next(sizes)
        submissions.append(Submission(body))
    rng.shuffle(submissions)
    return submissions


async def submit(http: httpx.AsyncClient, run: Run, sub: Submission, give_up_s: float) -> None:
    """Post until stored: connection errors and 5xx are retried with the same key."""
    started = time.monotonic()
    deadline = started + give_up_s
    while True:
        try:
            response = await http.post(
                "/v1/jobs", json=sub.body, headers={"Idempotency-Key": sub.key}
            )
        except httpx.TransportError as exc:
            reason = type(exc).__name__
        else:
            if response.status_code in (200, 202):
                sub.job_id = UUID(response.json()["id"])
                sub.replayed = response.status_code == 200
                sub.seconds = time.monotonic() - started
                return
            if response.status_code < 500:
                sub.error = f"rejected: {response.status_code} {response.text[:200]}"
                return
            reason = f"HTTP {response.status_code}"
        if time.monotonic() > deadline:
            sub.error = f"gave up after {sub.retries} retries, last: {reason}"
            return
        sub.retries += 1
        run.retry_reasons[reason] += 1
        await asyncio.sleep(min(0.2 * 2 ** min(sub.retries, 4), 2.0))


async def submitter(
    http: httpx.AsyncClient,
    run: Run,
    todo: asyncio.Queue[tuple[int, Submission]],
    rate: float,
    give_up_s: float,
) -> None:
    """Take the next submission; with a ``rate``, not before its turn (``number / rate`` s)."""
    while True:
        try:
            number, sub = todo.get_nowait()
        except asyncio.QueueEmpty:
            return
        if rate > 0:
            await asyncio.sleep(run.started + number / rate - time.monotonic())
        await submit(http, run, sub, give_up_s)


def live_replicas(service: RunningService) -> dict[str, list[int]]:
    return {deployment: replica_pids(service, deployment) for deployment in DEPLOYMENTS}


async def killer(
    service: RunningService, run: Run, rng: random.Random, every_s: float, stop: asyncio.Event
) -> None:
    """SIGKILL a random live replica of a random deployment every ``every_s`` until ``stop``."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
            return
        live = await asyncio.to_thread(live_replicas, service)
        deployment = rng.choice(DEPLOYMENTS)
        if not live[deployment]:  # restarting: take another one that is up
            up = [name for name in DEPLOYMENTS if live[name]]
            if not up:
                run.kill_skips += 1
                continue
            deployment = rng.choice(up)
        pid = rng.choice(live[deployment])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            run.kills.append(Kill(run.elapsed(), deployment, pid))
            print(f"[{run.elapsed():7.1f}s] SIGKILL {deployment} replica pid {pid}", flush=True)


async def terminal_count(pool: asyncpg.Pool, ids: list[UUID]) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = ANY($2::text[])",
        ids,
        TERMINAL,
    )


async def progress(pool: asyncpg.Pool, run: Run, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        rows = await pool.fetch(
            "SELECT status, count(*) AS n FROM jobs WHERE user_id = $1::uuid GROUP BY status", USER
        )
        stored = sum(1 for sub in run.submissions if sub.job_id is not None)
        retries = sum(sub.retries for sub in run.submissions)
        statuses = ", ".join(f"{row['status']} {row['n']}" for row in rows)
        print(
            f"[{run.elapsed():7.1f}s] submitted {stored}/{len(run.submissions)} "
            f"(retries {retries}); jobs: {statuses or 'none'}; kills {len(run.kills)}",
            flush=True,
        )


async def chaos(service: RunningService, args: argparse.Namespace) -> tuple[Run, Report]:
    rng = random.Random(args.seed)
    run = Run(plan_jobs(args.jobs, rng))
    todo: asyncio.Queue[tuple[int, Submission]] = asyncio.Queue()
    for number, sub in enumerate(run.submissions):
        todo.put_nowait((number, sub))
    server = start_embedded_postgres(service.data_dir / "postgres")
    pool = await asyncpg.create_pool(str(server.get_uri()), min_size=1, max_size=2)
    headers = {"Authorization": f"Bearer {service.api_key}"}
    limits = httpx.Limits(max_connections=args.submitters)
    stop_killing = asyncio.Event()
    try:
        async with httpx.AsyncClient(
            base_url=service.base_url, headers=headers, timeout=60, limits=limits
        ) as http:
            run.started = time.monotonic()
            kill_task = asyncio.create_task(
                killer(service, run, rng, args.kill_every, stop_killing)
            )
            progress_task = asyncio.create_task(progress(pool, run, args.progress_every))
            await asyncio.gather(
                *(
                    submitter(http, run, todo, args.rate, args.give_up)
                    for _ in range(args.submitters)
                )
            )
            run.submitted_s = run.elapsed()
            ids = [sub.job_id for sub in run.submissions if sub.job_id is not None]
            print(f"[{run.elapsed():7.1f}s] submissions done", flush=True)

            deadline = time.monotonic() + args.timeout
            stop_killing_at = time.monotonic() + args.kill_tail
            while await terminal_count(pool, ids) < len(ids) and time.monotonic() < deadline:
                if time.monotonic() >= stop_killing_at:
                    stop_killing.set()
                await asyncio.sleep(DB_POLL_S)
            if await terminal_count(pool, ids) == len(ids):
                run.drained_s = run.elapsed()
            stop_killing.set()
            await kill_task
            progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress_task
            ready = await wait_ready(http, args.ready_timeout)
        report = await inspect(pool, service, run, ready)
        if report.problems or args.keep:
            keep_ray_logs(service)
        return run, report
    finally:
        await pool.close()
        server.cleanup()


async def wait_ready(http: httpx.AsyncClient, timeout_s: float) -> str:
    """``ok``, or the last answer of /readyz when it never said ready in ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    answer = ""
    while time.monotonic() < deadline:
        try:
            response = await http.get("/readyz")
        except httpx.TransportError as exc:
            answer = type(exc).__name__
        else:
            if response.status_code == 200:
                return "ok"
            answer = f"{response.status_code} {response.text[:300]}"
        await asyncio.sleep(2)
    return answer


async def inspect(pool: asyncpg.Pool, service: RunningService, run: Run, ready: str) -> Report:
    jobs = {
        row["id"]: row
        for row in await pool.fetch(
            "SELECT id, job_type, status, attempts, units, idempotency_key, claimed_by,"
            "       error_message, metadata->>'error_type' AS error_type"
            "  FROM jobs WHERE user_id = $1::uuid",
            USER,
        )
    }
    asset_rows = await pool.fetch(
        "SELECT job_id, 'image' AS kind, image_index AS idx, status, image_url AS path"
        "  FROM images WHERE user_id = $1::uuid"
        " UNION ALL "
        "SELECT job_id, 'video' AS kind, 0 AS idx, status, video_url AS path"
        "  FROM videos WHERE user_id = $1::uuid",
        USER,
    )
    by_key = {sub.key: sub for sub in run.submissions}
    stored = {sub.job_id: sub for sub in run.submissions if sub.job_id is not None}
    problems: dict[str, list[str]] = {name: [] for name in PROBLEMS}

    def describe(job_id: UUID) -> str:
        row = jobs.get(job_id)
        if row is None:
            return f"{job_id}: no row"
        return (
            f"{job_id} {row['job_type']} status={row['status']} attempts={row['attempts']} "
            f"claimed_by={row['claimed_by']} error={row['error_message']!r}"
        )

    for sub in run.submissions:
        if sub.error is not None:
            row_ids = [job_id for job_id, row in jobs.items() if row["idempotency_key"] == sub.key]
            problems["submissions given up"].append(
                f"{sub.body['job_type']} key={sub.key}: {sub.error}; rows stored: {row_ids}"
            )
    for job_id in stored:
        if job_id not in jobs or jobs[job_id]["status"] not in TERMINAL:
            problems["lost"].append(describe(job_id))
    for job_id, row in jobs.items():
        sub = by_key.get(row["idempotency_key"])
        if job_id not in stored and (sub is None or sub.error is None):
            problems["double-submitted"].append(describe(job_id))

    assets: dict[UUID, list[asyncpg.Record]] = {}
    for asset in asset_rows:
        assets.setdefault(asset["job_id"], []).append(asset)
    for job_id, row in jobs.items():
        spec = JOB_TYPES[row["job_type"]]
        # An image job has rows 0..num_images-1 in images; a video job one row in videos.
        kind = "video" if spec.format is OutputFormat.VIDEO else "image"
        expected = 1 if kind == "video" else row["units"]
        rows = assets.get(job_id, [])
        indexes = Counter(asset["idx"] for asset in rows)
        if (
            len(rows) > expected
            or any(asset["kind"] != kind for asset in rows)
            or max(indexes.values(), default=1) > 1
        ):
            problems["asset rows duplicated"].append(
                f"{describe(job_id)}; asset rows {sorted(indexes.elements())}, expected {expected}"
            )
        elif len(rows) < expected:
            problems["asset rows missing"].append(
                f"{describe(job_id)}; asset rows {sorted(indexes.elements())}, expected {expected}"
            )
        if row["status"] != "completed":
            continue
        for asset in rows:
            if asset["status"] != "completed" or not asset["path"]:
                problems["completed with unfinished asset rows"].append(
                    f"{describe(job_id)}; asset {asset['idx']} status={asset['status']} "
                    f"path={asset['path']!r}"
                )
                continue
            file = service.data_dir / "storage" / spec.bucket / asset["path"]
            if not file.is_file() or file.stat().st_size == 0:
                problems["files missing"].append(f"{describe(job_id)}; {file}")

    submitted = [jobs[job_id] for job_id in stored if job_id in jobs]
    live = await asyncio.to_thread(live_replicas, service)
    return Report(
        statuses=Counter(row["status"] for row in submitted),
        failures=Counter(
            f"[{row['error_type']}] {(row['error_message'] or '').splitlines()[0][:200]}"
            for row in submitted
            if row["status"] == "failed"
        ),
        attempts=Counter(row["attempts"] for row in submitted),
        problems={name: lines for name, lines in problems.items() if lines},
        replicas_at_end={name: len(pids) for name, pids in live.items()},
        ready=ready,
    )


def keep_ray_logs(service: RunningService) -> None:
    """Copy Ray's Serve logs next to serve.log: the launcher deletes Ray's directory."""
    logs = service.ray_tmpdir / "ray" / "session_latest" / "logs"
    with contextlib.suppress(OSError):
        shutil.copytree(logs, service.log_path.parent / "ray-logs", dirs_exist_ok=True)


def print_report(report: Report, run: Run, args: argparse.Namespace) -> None:
    subs = run.submissions
    stored = [sub for sub in subs if sub.job_id is not None]
    kills = Counter(kill.deployment for kill in run.kills)
    rerun = sum(n for attempts, n in report.attempts.items() if attempts > 1)
    print()
    print(f"settings: {json.dumps(SETTINGS)}")
    print(
        f"run: --jobs {args.jobs} --submitters {args.submitters} --rate {args.rate} "
        f"--kill-every {args.kill_every} "
        f"--kill-tail {args.kill_tail} --timeout {args.timeout} --seed {args.seed}"
    )

    def line(name: str, value: object) -> None:
        print(f"{name:<44}{value}")

    line("jobs planned", len(subs))
    line("jobs submitted (stored, id returned)", len(stored))
    line("  submissions retried (same key)", sum(1 for sub in subs if sub.retries))
    line("  retries in all", sum(sub.retries for sub in subs))
    line("  retry reasons", dict(run.retry_reasons.most_common()) or "-")
    line("  answered 200 (replay of a stored job)", sum(1 for sub in subs if sub.replayed))
    seconds = sorted(sub.seconds for sub in stored) or [0.0]
    line(
        "  seconds per submission: median, max",
        f"{seconds[len(seconds) // 2]:.2f}, {seconds[-1]:.2f}",
    )
    line("completed", report.statuses["completed"])
    line("failed", report.statuses["failed"])
    for message, count in report.failures.most_common():
        print(f"  {count:>5} x {message}")
    line("jobs re-run (attempts > 1)", rerun)
    line("attempts per job", dict(sorted(report.attempts.items())))
    for name in PROBLEMS:
        line(name, len(report.problems.get(name, [])))
    line("kills per deployment", {name: kills[name] for name in DEPLOYMENTS})
    line("  kill ticks skipped (nothing up)", run.kill_skips)
    line("live replicas at the end", report.replicas_at_end)
    line("ready at the end", report.ready)
    line("submission phase", f"{run.submitted_s:.1f} s")
    drained = f"{run.drained_s:.1f} s" if run.drained_s is not None else "not drained (timeout)"
    line("all jobs terminal after", drained)
    line("wall time", f"{run.elapsed():.1f} s")
    for name, lines in report.problems.items():
        print(f"\n{name} ({len(lines)}):")
        for text in lines[:SHOWN]:
            print(f"  {text}")
        if len(lines) > SHOWN:
            print(f"  ... and {len(lines) - SHOWN} more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--submitters", type=int, default=32, help="concurrent clients")
    parser.add_argument(
        "--rate",
        type=float,
        default=2.0,
        help="submissions per second in all, so that kills meet submissions (0: no limit)",
    )
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument(
        "--kill-tail", type=float, default=60.0, help="keep killing this long after submitting"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="wait this long for every job to finish"
    )
    parser.add_argument(
        "--give-up", type=float, default=300.0, help="retry one submission this long at most"
    )
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--progress-every", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0, help="job order and kill choices")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ovz-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    api_key = "chaos-" + uuid4().hex
    print(f"work directory {workdir}; service log {workdir / 'serve.log'}", flush=True)
    with run_service(workdir, api_key=api_key, extra_env=NO_REQUEST_LIMITS | SETTINGS) as service:
        print(f"service ready at {service.base_url}", flush=True)
        run, report = asyncio.run(chaos(service, args))
    print_report(report, run, args)
    if report.problems or report.ready != "ok":
        failed = [*report.problems, *([] if report.ready == "ok" else ["not ready at the end"])]
        print(f"\nFAILED: {', '.join(failed)}; kept {workdir}")
        sys.exit(1)
    if args.keep or args.workdir:
        print(f"\nOK; kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        print("\nOK")


if __name__ == "__main__":
    main()

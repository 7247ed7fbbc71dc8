"""The supervisor of background loops, without a database: restarts, stalls, health."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ourvidz_serve.errors import DatabaseUnavailable
from ourvidz_serve.workers.supervision import ReplicaUnhealthy, Supervisor, check_health


async def settle(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_a_loop_that_raises_any_error_is_logged_with_its_traceback_and_runs_again(caplog):
    supervisor = Supervisor(restart_max_s=0.05, stall_s=60)
    rounds: list[int] = []

    async def flaky() -> None:
        rounds.append(len(rounds))
        if len(rounds) in (2, 3):
            raise KeyError("a bug in round two")
        if len(rounds) == 4:
            raise DatabaseUnavailable("the database is restarting")

    with caplog.at_level(logging.WARNING, logger="ourvidz_serve.workers.supervision"):
        supervisor.every("flaky", 0.01, flaky)
        await settle(lambda: len(rounds) >= 8)
        report = supervisor.report()["flaky"]
        await supervisor.stop()
    assert report["restarts"] == 3 and report["failures"] == 0 and report["running"]
    assert report["last_success"] is not None
    bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
    outages = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(bugs) == 2 and all(r.exc_info and "a bug" in str(r.exc_info[1]) for r in bugs)
    assert len(outages) == 1 and "restarting" in outages[0].getMessage()


async def test_a_loop_that_returns_is_started_again():
    supervisor = Supervisor(restart_max_s=0.01, stall_s=60)
    starts = 0

    async def short_lived(beat) -> None:
        nonlocal starts
        starts += 1
        beat()

    supervisor.run("short", short_lived)
    await settle(lambda: starts >= 3)
    await supervisor.stop()
    assert supervisor.names() == []


async def test_a_loop_failing_past_the_stall_limit_is_a_problem_until_it_succeeds_again():
    supervisor = Supervisor(restart_max_s=0.01, stall_s=0.2)
    failing = True

    async def round_() -> None:
        if failing:
            raise asyncio.InvalidStateError("stuck")

    supervisor.every("stuck", 0.01, round_)
    await asyncio.sleep(0.1)
    assert supervisor.problems() == [], "failing, but not for long yet"
    await asyncio.sleep(0.25)
    [problem] = supervisor.problems()
    assert "stuck" in problem and "InvalidStateError" in problem
    with pytest.raises(ReplicaUnhealthy, match="stuck"):
        await check_health(supervisor.problems(), _answers, 1.0)
    failing = False
    await settle(lambda: not supervisor.problems())
    await check_health(supervisor.problems(), _answers, 1.0)
    await supervisor.stop()


async def test_the_health_check_fails_when_the_database_does_not_answer_in_time():
    async def hangs() -> None:
        await asyncio.sleep(10)

    async def unavailable() -> None:
        raise DatabaseUnavailable("the database is unavailable (OSError); retry shortly")

    with pytest.raises(ReplicaUnhealthy, match=r"did not answer within 0\.1s"):
        await check_health([], hangs, 0.1)
    with pytest.raises(ReplicaUnhealthy, match="unavailable"):
        await check_health(["the claim loop is not running"], unavailable, 1.0)


async def _answers() -> None:
    return None

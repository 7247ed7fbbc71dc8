"""Every benchmark that needs neither Ray nor a GPU runs here at a tiny size: a benchmark that
no test runs rots. Each runs as the operator runs it (a subprocess of this interpreter) and must
exit 0 and print its figures; nothing is asserted on a figure's value (timings vary)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.databases import new_database_sync

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"

# Each starts ``serve run`` or a Ray cluster: minutes, not a smoke test.
NEEDS_RAY = {
    "batching.py",
    "chaos.py",
    "delivery_latency.py",
    "openai_overhead.py",
    "submission_throughput.py",
    "tiny_latency.py",
}
# Run below, each at a size that takes seconds.
SMOKED = {
    "queue_cost.py",
    "fairness.py",
    "flops.py",
    "gpu_full_random.py",
    "lora_switching.py",
    "wan_step_cache.py",
}


def run_benchmark(script: str, *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


def assert_lines(output: str, *expected: str) -> None:
    missing = [text for text in expected if text not in output]
    assert not missing, f"missing {missing} in:\n{output}"


def test_every_benchmark_is_smoked_or_needs_ray():
    assert {path.name for path in BENCHMARKS.glob("*.py")} == SMOKED | NEEDS_RAY


def test_queue_cost(database_url: str):
    with new_database_sync(database_url, "bench_queue_cost") as dsn:
        output = run_benchmark(
            "queue_cost.py",
            "--database-url",
            dsn,
            "--sizes",
            "300",
            "600",
            "--users",
            "5",
            "--repeats",
            "3",
            "--workers",
            "1",
            "4",
            "--capacity-jobs",
            "60",
            "--capacity-seconds",
            "5",
        )
    assert_lines(
        output,
        "backlog 300: 300 jobs of 5 users",
        "backlog 600: 600 jobs of 5 users",
        "cost per call in ms (median / p95)",
        "claim_jobs (sdxl, 6 units)",
        "claim_jobs (lone batch key)",
        "heartbeat (6 jobs)",
        "complete_job (fenced)",
        "reap_expired_leases (5)",
        "list_jobs (user, page 1)",
        "queued_units (sdxl)",
        "Index Only Scan using jobs_fair_idx",
        "workers    jobs   seconds    jobs/s  client CPU  server CPU  machine CPU",
        "where it goes",
        "sessions:",
    )
    # The claim's plans, generic ones included, never scan the whole queue.
    assert "Seq Scan on jobs" not in output
    capacity = output.split("machine CPU\n")[1].splitlines()
    assert [line.split()[:2] for line in capacity[:2]] == [["1", "60"], ["4", "60"]]


def test_fairness(database_url: str):
    with new_database_sync(database_url, "bench_fairness") as dsn:
        output = run_benchmark(
            "fairness.py",
            "--database-url",
            dsn,
            "--heavy-jobs",
            "6",
            "--light-users",
            "3",
            "--light-jobs",
            "1",
        )
    assert_lines(output, "light p95 wait", "Jain", "light users' p95 wait, FIFO / fair:")
    rows = [line.split()[:2] for line in output.splitlines()]
    for scenario in ("together", "staggered"):
        for order in ("FIFO", "fair"):
            assert [scenario, order] in rows


def test_lora_switching(database_url: str):
    with new_database_sync(database_url, "bench_lora_switching") as dsn:
        output = run_benchmark(
            "lora_switching.py",
            "--database-url",
            dsn,
            "--jobs",
            "4",
            "--adapters",
            "2",
            "--intervals",
            "0",
            timeout=240,
        )
    assert_lines(output, "calls", "activations", "adapter-aware / plain: calls")
    for label in ("plain fair order", "adapter-aware"):
        [row] = [line.split() for line in output.splitlines() if f"0  {label}  " in line]
        calls, downloads = int(row[-6]), int(row[-5])
        # Each adapter is downloaded once into the cache; 4 one-image jobs of 2 adapters
        # need at least 2 calls (one per adapter) and at most 4.
        assert downloads == 2 and 2 <= calls <= 4


def test_flops():
    output = run_benchmark("flops.py", "--only", "qwen")
    assert_lines(output, "Qwen2.5-7B bf16 weight bytes/token", "Rows off PERFORMANCE.md")


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "gpu_full_random.py",
            # Tiny profile on the CPU; one row per model.
            [
                "--device=cpu",
                "--sdxl-batches=1",
                "--sdxl-steps=1",
                "--wan-steps=2",
                "--wan-frames=1",
                "--step-caches",
                "--qwen-batches=1",
                "--qwen-new-tokens=2",
            ],
            ["SDXL (tiny, cpu)", "WAN (tiny, cpu)", "Qwen (tiny, cpu)", "tokens/s"],
        ),
        (
            "wan_step_cache.py",
            ["--device=cpu", "--frames=1", "--steps=4", "--repeats=1"],
            ["WAN step caches (tiny, cpu", "first_block", "mag", "taylor_seer", "PSNR dB"],
        ),
    ],
)
def test_model_benchmark_on_the_tiny_profile(script: str, args: list[str], expected: list[str]):
    assert_lines(run_benchmark(script, *args), *expected)

"""OpenAI adapter overhead: ``images.generate`` vs the job API for one tiny SDXL image.

The issue's target: generating one tiny SDXL image with the official ``openai`` client
(``POST /v1/images/generations``, which answers once the job is complete) takes at most 1.05x
what the job API takes for the same result without the adapter: ``POST /v1/jobs``, its
``GET /v1/jobs/{id}/events`` stream read to the terminal ``status`` event, then
``GET /v1/jobs/{id}`` for the image's URL.

    .venv/bin/python benchmarks/openai_overhead.py [--repeats 30]

Starts ``serve run serve_config.yaml`` (tiny profile, embedded PostgreSQL, local storage) in a
temporary directory and runs one job at a time (low load), alternating the two paths after a
few warm-up rounds of each, and swapping which goes first every round, so that both see the
machine in the same state. Each path keeps its connections alive (one SDK client, one
``httpx.Client``); every job has a seed of its own, the prompt is the same. Prints each path's
median, p90 and mean wall time in ms, the median of the jobs' recorded model time
(``generation_time``) and of the rest (wall less model time: the serving overhead), the ratio of
the medians with their difference, and whether the 5 % target is met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests
from tests.launcher import NO_REQUEST_LIMITS, run_service

JOB_TYPE = "sdxl_image_fast"
PROMPT = "a lighthouse"
USER = str(uuid4())
WARMUP_ROUNDS = 3
TARGET_RATIO = 1.05
CLIENT_TIMEOUT_S = 240

# (wall seconds, job id)
Run = tuple[float, str]


def via_openai(client: openai.OpenAI, seed: int) -> Run:
    """A: ``images.generate``, call to return; its answer carries the finished image's URL."""
    started = time.perf_counter()
    response = client.images.generate(
        model=JOB_TYPE,
        prompt=PROMPT,
        n=1,
        response_format="url",
        user=USER,
        extra_body={"seed": seed},
    )
    elapsed = time.perf_counter() - started
    if not response.data or not response.data[0].url:
        raise RuntimeError(f"images.generate answered no URL: {response}")
    return elapsed, str((response.model_extra or {})["job_id"])


def via_jobs(http: httpx.Client, seed: int) -> Run:
    """B: submit, wait on the job's event stream until it ends, then read the job's URL."""
    body = {"job_type": JOB_TYPE, "prompt": PROMPT, "user_id": USER, "seed": seed, "num_images": 1}
    started = time.perf_counter()
    job_id = http.post("/v1/jobs", json=body).raise_for_status().json()["id"]
    last_status = None
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=CLIENT_TIMEOUT_S) as stream:
        stream.raise_for_status()
        event: dict[str, str] = {}
        for line in stream.iter_lines():
            if line.startswith(":"):  # a keep-alive comment
                continue
            if line:
                name, _, value = line.partition(":")
                event[name] = value.removeprefix(" ")
                continue
            if event.get("event") == "status":
                last_status = json.loads(event["data"])["status"]
            event = {}
    job = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    elapsed = time.perf_counter() - started
    if last_status != "completed" or job["status"] != "completed":
        raise RuntimeError(f"job {job_id} ended {last_status}: {job.get('error_message')}")
    if not job["assets"] or not job["assets"][0].get("url"):
        raise RuntimeError(f"job {job_id} completed without a URL: {job['assets']}")
    return elapsed, job_id


def model_seconds(http: httpx.Client, job_id: str) -> float:
    """The job's recorded model time (the pipeline call in the replica); read untimed."""
    job = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    return float(job["metadata"]["generation_time"])


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    api_key = "bench-" + uuid4().hex
    wall: dict[str, list[float]] = {"A": [], "B": []}
    jobs: dict[str, list[str]] = {"A": [], "B": []}
    with (
        tempfile.TemporaryDirectory(prefix="ovz-bench-") as workdir,
        run_service(Path(workdir), api_key=api_key, extra_env=NO_REQUEST_LIMITS) as service,
        httpx.Client(
            base_url=service.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        ) as http,
        openai.OpenAI(
            api_key=api_key,
            base_url=f"{service.base_url}/v1",
            max_retries=0,
            timeout=CLIENT_TIMEOUT_S,
        ) as client,
    ):
        paths: dict[str, Callable[[int], Run]] = {
            "A": lambda seed: via_openai(client, seed),
            "B": lambda seed: via_jobs(http, seed),
        }
        seeds = iter(range(1, 2 * (WARMUP_ROUNDS + args.repeats) + 1))
        for _ in range(WARMUP_ROUNDS):
            for run in paths.values():
                run(next(seeds))
        for round_index in range(args.repeats):
            # Alternating, and which goes first swaps each round: no path always follows
            # the other (a replica just freed, a connection just used).
            order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
            for name in order:
                elapsed, job_id = paths[name](next(seeds))
                wall[name].append(elapsed)
                jobs[name].append(job_id)
        model = {name: [model_seconds(http, job) for job in ids] for name, ids in jobs.items()}

    labels = {
        "A": "A images.generate (openai)",
        "B": "B POST /v1/jobs + events + GET",
    }
    print(
        f"tiny profile, {JOB_TYPE} n=1, {args.repeats} rounds after {WARMUP_ROUNDS} warm-up, "
        "one job at a time, A and B alternating; ms"
    )
    columns = ("median", "p90", "mean", "model med", "rest med")
    print(f"{'path':<32}" + "".join(f"{column:>11}" for column in columns))
    for name, label in labels.items():
        figures = [
            statistics.median(wall[name]),
            p90(wall[name]),
            statistics.mean(wall[name]),
            statistics.median(model[name]),
            statistics.median(w - m for w, m in zip(wall[name], model[name], strict=True)),
        ]
        print(f"{label:<32}" + "".join(f"{value * 1000:>11.1f}" for value in figures))
    print("model med: the jobs' recorded generation_time (the pipeline call in the replica)")
    print("rest med: each job's wall time less its model time (queueing, HTTP, storage, ...)")
    median_a, median_b = statistics.median(wall["A"]), statistics.median(wall["B"])
    ratio = median_a / median_b
    print(
        f"median(A)/median(B) = {ratio:.3f}, "
        f"median(A) - median(B) = {(median_a - median_b) * 1000:+.1f} ms"
    )
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"target (adapter adds at most 5 %, ratio <= {TARGET_RATIO:.2f}): {verdict}")


if __name__ == "__main__":
    main()

"""WAN step caches: speed-up and PSNR of each diffusers cache against the uncached output.

On a GPU, the real WAN 2.1 1.3B architecture with random weights, an image and an 81-frame
832x480 video at 25 and 50 steps:

    .venv/bin/python benchmarks/wan_step_cache.py --profile full-random --device cuda

On this CPU, the tiny profile (64x32, 25 steps) in under a minute, to prove the plumbing:

    .venv/bin/python benchmarks/wan_step_cache.py

For each (frames, steps) row: one untimed warm-up call, then ``--repeats`` rounds of the
uncached call and one call per cache in ``wan.STEP_CACHE_DEFAULTS``'s configuration, at the
same prompt and seed, interleaved so that all see the machine alike (medians are printed; on
a CPU torch runs one thread). MagCache's ratios are first calibrated on the same shape and
step count but another seed (an untimed call; a replica does this on its first ``mag`` job).
Printed per cache: seconds, speed-up (uncached / cached seconds), the transformer calls whose
blocks were skipped, and the PSNR of the delivered output (PNG, or the H.264 MP4 decoded)
against the uncached one.

On the tiny profile the transformer is a small part of a call (text encoder, VAE decode and
the encoders dominate), so skipping most of its calls saves little wall time there.

Random weights make the cache's choices differ from a trained model's: first-block cache and
MagCache skip when consecutive steps' residuals are alike, which depends on the weights, so
their speed-ups and PSNR here are not the real model's; TaylorSeer's schedule is fixed. Only
``--profile weights`` measures what users would get.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ourvidz_serve.catalog import StepCache
from ourvidz_serve.pipelines.base import EncodedAsset, VideoRequest
from ourvidz_serve.pipelines.encode import decode_png, read_mp4_frames
from ourvidz_serve.pipelines.wan import WanPipelineRunner
from ourvidz_serve.settings import ModelProfile, Settings

PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
NEGATIVE = "static, blurry, low quality"
SEED, CALIBRATION_SEED = 7, 8
GUIDANCE = 6.5


def timed(call: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def frames_of(asset: EncodedAsset) -> np.ndarray:
    if asset.num_frames == 1:
        return decode_png(asset.data)[None].astype(np.float64)
    return read_mp4_frames(asset.data).astype(np.float64)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = float(np.mean((reference - other) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def rows(
    runner: WanPipelineRunner,
    frames: list[int],
    steps: list[int],
    caches: list[StepCache],
    repeats: int,
) -> None:
    print(
        f"{'frames':>6} {'steps':>5} {'cache':>12} {'seconds':>9} {'speed-up':>9} "
        f"{'skipped calls':>14} {'PSNR dB':>8}"
    )
    for frame_count in frames:
        for step_count in steps:

            def request(
                cache: StepCache | None, seed: int = SEED, n: int = frame_count, s: int = step_count
            ) -> VideoRequest:
                return VideoRequest(
                    PROMPT, NEGATIVE, seed, s, GUIDANCE, 832, 480, n, 16, step_cache=cache
                )

            def run(cache: StepCache | None) -> tuple[tuple[EncodedAsset, dict], float]:
                return timed(lambda: runner.generate_with_stats(request(cache)), runner.device)

            runner.generate(request(None))  # warm-up: kernels, allocator
            if StepCache.MAG in caches:
                runner.calibrate_mag_cache(request(None, seed=CALIBRATION_SEED))
            variants: list[StepCache | None] = [None, *caches]
            seconds: dict[StepCache | None, list[float]] = {v: [] for v in variants}
            results: dict[StepCache | None, tuple[EncodedAsset, dict]] = {}
            for _ in range(repeats):  # interleaved, so that all see the machine alike
                for variant in variants:
                    results[variant], elapsed = run(variant)
                    seconds[variant].append(elapsed)
            base_s = statistics.median(seconds[None])
            calls = step_count * (2 if GUIDANCE > 1 else 1)
            print(
                f"{frame_count:>6} {step_count:>5} {'none':>12} {base_s:>9.2f} {'1.00x':>9} "
                f"{f'0/{calls}':>14} {'-':>8}"
            )
            reference = frames_of(results[None][0])
            for cache in caches:
                output, stats = results[cache]
                cached_s = statistics.median(seconds[cache])
                skipped = f"{stats['step_cache_skipped_calls']}/{calls}"
                print(
                    f"{frame_count:>6} {step_count:>5} {cache.value:>12} {cached_s:>9.2f} "
                    f"{base_s / cached_s:>8.2f}x {skipped:>14} "
                    f"{psnr(reference, frames_of(output)):>8.1f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=[p.value for p in ModelProfile], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 81])
    parser.add_argument(
        "--steps", type=int, nargs="+", help="default: 25 on the tiny profile, else 25 and 50"
    )
    parser.add_argument(
        "--caches", nargs="+", choices=[c.value for c in StepCache], default=list(StepCache)
    )
    parser.add_argument(
        "--repeats", type=int, help="timed calls per row, of which the median (tiny: 3, else 1)"
    )
    args = parser.parse_args()
    profile = ModelProfile(args.profile)
    tiny = profile is ModelProfile.TINY
    steps = args.steps or ([25] if tiny else [25, 50])
    repeats = args.repeats or (3 if tiny else 1)
    runner = WanPipelineRunner.build(Settings(model_profile=profile, device=args.device))
    if runner.device.type == "cpu":
        torch.set_num_threads(1)  # as a Serve replica with a fractional CPU; steadier timings
    device = runner.device
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"WAN step caches ({profile}, {device}{gpu}, torch {torch.__version__})")
    rows(runner, args.frames, steps, [StepCache(c) for c in args.caches], repeats)


if __name__ == "__main__":
    main()

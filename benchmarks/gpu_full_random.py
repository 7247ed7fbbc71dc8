"""Model time of the three pipelines, per profile: the GPU figures of the README.

On a GPU, the real architectures at full size with random weights (the time of a step does
not depend on the weights' values):

    .venv/bin/python benchmarks/gpu_full_random.py --profile full-random --device cuda

On this CPU, the tiny profile runs the same code in about a minute, to prove the plumbing
(its figures say nothing about a GPU):

    .venv/bin/python benchmarks/gpu_full_random.py

What it prints, each after one untimed warm-up call of the same shape:

- SDXL: seconds per image at 1024² (the job types' size; tiny: its native 32²) for 15 and
  25 steps at batch 1, 3 and 6, and the peak GPU memory of each.
- WAN: one image (1 frame) and an 81-frame video at 832x480 for 25 and 50 steps, without a
  step cache and with each of ``--step-caches``; the cached rows give the speed-up and the
  PSNR of the output against the uncached one at the same seed (on the delivered files: PNG,
  or H.264 on both sides).
- Qwen: new tokens per second at batch 1 and 8 (greedy, a fixed number of new tokens).

Peak memory is ``torch.cuda.max_memory_allocated`` per row (PyTorch's allocator: the CUDA
context and cached blocks come on top); "-" on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

# Run as a script: its folder is on sys.path, so the step-cache benchmark's helpers import.
from wan_step_cache import frames_of, psnr

from ourvidz_serve.catalog import StepCache
from ourvidz_serve.pipelines.base import ImageRequest, VideoRequest
from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.pipelines.wan import WanPipelineRunner
from ourvidz_serve.prompts import enhancer_messages
from ourvidz_serve.settings import ModelProfile, Settings

PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"


def timed(call: Callable[[], Any], device: torch.device) -> tuple[Any, float, int | None]:
    """(result, seconds, peak bytes) of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return result, elapsed, peak


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def sdxl_rows(settings: Settings, batches: list[int], steps: list[int]) -> None:
    runner = SDXLPipelineRunner.build(settings)
    print(f"\nSDXL ({settings.model_profile}, {runner.device})")
    print(f"{'steps':>5} {'batch':>5} {'s / call':>9} {'s / image':>10} {'peak memory':>12}")
    for step_count in steps:
        for batch in batches:
            requests = [
                ImageRequest(PROMPT, None, seed, step_count, 7.5, 1024, 1024)
                for seed in range(batch)
            ]
            runner.generate(requests)  # warm-up: kernels, allocator, cuDNN autotuning
            _, elapsed, peak = timed(lambda r=requests: runner.generate(r), runner.device)
            print(
                f"{step_count:>5} {batch:>5} {elapsed:>9.2f} {elapsed / batch:>10.3f} "
                f"{gib(peak):>12}"
            )


def wan_rows(settings: Settings, steps: list[int], caches: list[StepCache], frames: list[int]):
    runner = WanPipelineRunner.build(settings)
    print(f"\nWAN ({settings.model_profile}, {runner.device})")
    print(
        f"{'frames':>6} {'steps':>5} {'cache':>12} {'seconds':>9} {'speed-up':>9} "
        f"{'PSNR dB':>8} {'peak memory':>12}"
    )
    for frame_count in frames:
        for step_count in steps:

            def request(cache: StepCache | None, n: int = frame_count, s: int = step_count):
                return VideoRequest(PROMPT, None, 7, s, 6.5, 832, 480, n, 16, step_cache=cache)

            runner.generate(request(None))  # warm-up
            uncached, base_s, peak = timed(lambda: runner.generate(request(None)), runner.device)
            print(
                f"{frame_count:>6} {step_count:>5} {'none':>12} {base_s:>9.2f} {'1.00x':>9} "
                f"{'-':>8} {gib(peak):>12}"
            )
            reference = frames_of(uncached)
            for cache in caches:
                if cache is StepCache.MAG:
                    # MagCache's ratios come from one full call (another seed), untimed.
                    runner.calibrate_mag_cache(dataclasses.replace(request(None), seed=8))
                output, cached_s, peak = timed(
                    lambda c=cache: runner.generate(request(c)), runner.device
                )
                print(
                    f"{frame_count:>6} {step_count:>5} {cache.value:>12} {cached_s:>9.2f} "
                    f"{base_s / cached_s:>8.2f}x {psnr(reference, frames_of(output)):>8.1f} "
                    f"{gib(peak):>12}"
                )


def qwen_rows(settings: Settings, batches: list[int], new_tokens: int) -> None:
    runner = QwenEnhancerRunner.build(settings)
    tokenizer = runner.tokenizer
    print(f"\nQwen ({settings.model_profile}, {runner.device}), {new_tokens} new tokens")
    print(f"{'batch':>5} {'seconds':>9} {'tokens/s':>10} {'peak memory':>12}")
    for batch in batches:
        texts = [
            tokenizer.apply_chat_template(
                enhancer_messages(f"{PROMPT} #{i}", "wan_video"),
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in range(batch)
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(runner.device)

        def generate(encoded: Any = inputs) -> torch.Tensor:
            with torch.inference_mode():
                return runner.model.generate(
                    **encoded,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,  # a fixed count, whatever the weights say
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )

        generate()  # warm-up
        output, elapsed, peak = timed(generate, runner.device)
        produced = (output.shape[1] - inputs["input_ids"].shape[1]) * batch
        print(f"{batch:>5} {elapsed:>9.2f} {produced / elapsed:>10.1f} {gib(peak):>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=[p.value for p in ModelProfile], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=["sdxl", "wan", "qwen"], action="append")
    parser.add_argument("--sdxl-batches", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--sdxl-steps", type=int, nargs="+", default=[15, 25])
    parser.add_argument("--wan-steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--wan-frames", type=int, nargs="+", default=[1, 81])
    parser.add_argument(
        "--step-caches",
        nargs="*",
        choices=[c.value for c in StepCache],
        default=[c.value for c in StepCache],
    )
    parser.add_argument("--qwen-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--qwen-new-tokens", type=int, default=200)
    args = parser.parse_args()
    settings = Settings(model_profile=ModelProfile(args.profile), device=args.device)
    only = set(args.only or ["sdxl", "wan", "qwen"])
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "sdxl" in only:
        sdxl_rows(settings, args.sdxl_batches, args.sdxl_steps)
    if "wan" in only:
        caches = [StepCache(c) for c in args.step_caches]
        wan_rows(settings, args.wan_steps, caches, args.wan_frames)
    if "qwen" in only:
        qwen_rows(settings, args.qwen_batches, args.qwen_new_tokens)


if __name__ == "__main__":
    main()

"""Model time of the three pipelines, per profile: the GPU figures of the README.

On a GPU, the real architectures at full size with random weights (the time of a step does
not depend on the weights' values); on a machine without diffusers, benchmarks/gpu_check.sh
installs the kit and runs this:

    .venv/bin/python benchmarks/gpu_full_random.py --profile full-random --device cuda \\
        --json gpu_check.json --table gpu_check.md

On this CPU, the tiny profile runs the same code in about a minute, to prove the plumbing
(its figures say nothing about a GPU):

    .venv/bin/python benchmarks/gpu_full_random.py

What it measures, each timed call after an untimed warm-up call of the same shape with
``--warmup-steps`` steps (kernels, allocator and autotuning depend on the shape, not on the
step count):

- SDXL: 1, 3 and 6 images at 1024² (the job types' size; tiny: its native 32²) for 15 and 25
  steps (sdxl_image_fast and sdxl_image_high).
- WAN: one image (1 frame) and an 81-frame video at 832x480 for 25 and 50 steps (the fast and
  high job types). The video runs ``--wan-video-steps`` steps (default 25) and a longer row is
  extrapolated from that call: the steps' own time (the median interval between step ends,
  synchronised) times the full count, plus the rest of the call (text encoder, VAE decode,
  MP4 encoding). On an H100 a video step is about a second, so the default keeps the whole run
  under 8 minutes; the row says how many steps ran. ``--step-caches`` adds a row per step
  cache at the measured step count, with its speed-up and the PSNR of its output against the
  uncached one (benchmarks/wan_step_cache.py measures those in depth).
- Qwen: new tokens per second at batch 1 and 8 (greedy, a fixed number of new tokens).

Each row's bound is the least time the device could take, from the FLOP counts of
benchmarks/flops.py (the real architectures on the meta device) at the device's peak dense
bf16/fp16 rate: SDXL batch x (steps x UNet step with CFG + VAE decode); WAN steps x transformer
step with CFG + VAE decode; Qwen new tokens x the larger of reading the bf16 weights once and
batch x one token's FLOPs. "x bound" is seconds / bound. Only on a known GPU (H100, H200,
RTX 6000 Ada; ``--peak-tflops`` / ``--peak-tbps`` for another) and not on the tiny profile,
whose models are not the real ones; "-" otherwise.

Peak memory is ``torch.cuda.max_memory_allocated`` per timed call (PyTorch's allocator: the
CUDA context and cached blocks come on top); "-" on a CPU. ``--json`` and ``--table`` are
rewritten after every row, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# flops and wan_step_cache are the other benchmarks: run as a script, this file's folder is
# on sys.path.
import flops
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from wan_step_cache import frames_of, psnr

from ourvidz_serve.catalog import JOB_TYPES, StepCache
from ourvidz_serve.pipelines.base import ImageRequest, VideoRequest
from ourvidz_serve.pipelines.devices import random_init, resolve_device
from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner
from ourvidz_serve.pipelines.sdxl import SDXL_BASE_CONFIGS, SDXLPipelineRunner
from ourvidz_serve.pipelines.wan import WAN_1_3B_CONFIGS, WanPipelineRunner
from ourvidz_serve.prompts import enhancer_messages
from ourvidz_serve.settings import ModelProfile, Settings

PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
SDXL_SIZE = (JOB_TYPES["sdxl_image_fast"].width, JOB_TYPES["sdxl_image_fast"].height)
WAN_SIZE = (JOB_TYPES["video_fast"].width, JOB_TYPES["video_fast"].height)
WAN_SEED, WAN_GUIDANCE, WAN_FPS = 7, 6.5, 16


# --- The device's limits -------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """A GPU's dense bf16/fp16 tensor rate and memory bandwidth."""

    name: str
    flops: float
    bytes_per_s: float


# Matched in order against ``torch.cuda.get_device_name()``: the H100 PCIe and NVL parts are
# slower than the SXM one that flops.py's H100 figures are for. The H200 has the SXM H100's
# tensor cores with faster memory.
KNOWN_PEAKS = (
    ("H100 PCIe", Peak("H100 PCIe", 756e12, 2.0e12)),
    ("H100 NVL", Peak("H100 NVL", 835e12, 3.9e12)),
    ("H100", Peak("H100 SXM", flops.H100_FLOPS, flops.H100_BYTES_PER_S)),
    ("H200", Peak("H200", flops.H100_FLOPS, 4.8e12)),
    ("RTX 6000 Ada", Peak("RTX 6000 Ada", flops.ADA_FLOPS, flops.ADA_BYTES_PER_S)),
)


def known_peak(device_name: str) -> Peak | None:
    """The peak of a GPU named so by CUDA (e.g. "NVIDIA H100 80GB HBM3"), if known."""
    return next((peak for key, peak in KNOWN_PEAKS if key in device_name), None)


def device_peak(device: torch.device, tflops: float | None, tbps: float | None) -> Peak | None:
    """The peak of ``device``: the given figures, else a known GPU's, else None (a CPU)."""
    if tflops is not None and tbps is not None:
        return Peak("given", tflops * 1e12, tbps * 1e12)
    if device.type != "cuda":
        return None
    return known_peak(torch.cuda.get_device_name(device))


class Bounds:
    """Least seconds of each row on a device of ``peak``, from flops.py's meta-device counts.

    The meta models are built and counted on first use, once per shape.
    """

    def __init__(self, peak: Peak) -> None:
        self.peak = peak
        self._counts: dict[tuple[Any, ...], float] = {}

    def _count(self, key: tuple[Any, ...], count: Callable[[], float]) -> float:
        if key not in self._counts:
            self._counts[key] = count()
        return self._counts[key]

    def sdxl(self, steps: int, batch: int, width: int, height: int) -> float:
        def count() -> float:
            with random_init(flops.META, flops.DTYPE):
                unet = UNet2DConditionModel(**SDXL_BASE_CONFIGS.unet).eval()
                vae = AutoencoderKL(**SDXL_BASE_CONFIGS.vae).eval()
            self._counts["sdxl decode", width, height] = flops.sdxl_vae_decode_flops(
                vae, width, height
            )
            return flops.sdxl_unet_step_flops(unet, width, height)

        step = self._count(("sdxl step", width, height), count)
        decode = self._counts["sdxl decode", width, height]
        return batch * (steps * step + decode) / self.peak.flops

    def wan(self, steps: int, frames: int, width: int, height: int) -> float:
        def count() -> float:
            with random_init(flops.META, flops.DTYPE):
                transformer = WanTransformer3DModel(**WAN_1_3B_CONFIGS.transformer).eval()
                vae = AutoencoderKLWan(**WAN_1_3B_CONFIGS.vae).eval()
            self._counts["wan decode", frames, width, height] = flops.wan_vae_decode_flops(
                vae, frames, width, height
            )
            return flops.wan_step_flops(transformer, frames, width, height)

        step = self._count(("wan step", frames, width, height), count)
        decode = self._counts["wan decode", frames, width, height]
        return (steps * step + decode) / self.peak.flops

    def qwen(self, batch: int, new_tokens: int) -> float:
        def count() -> float:
            rows = flops.qwen_rows()
            self._counts[("qwen token flops",)] = next(r.amount for r in rows if r.unit == "FLOP")
            return next(r.amount for r in rows if r.unit == "B")

        weight_bytes = self._count(("qwen weight bytes",), count)
        token_flops = self._counts[("qwen token flops",)]
        per_token = max(weight_bytes / self.peak.bytes_per_s, batch * token_flops / self.peak.flops)
        return new_tokens * per_token


# --- Rows and the report -------------------------------------------------------------------


@dataclass
class Row:
    """One measured (or extrapolated) call."""

    model: str
    work: str
    seconds: float
    """The call at ``work``'s step count: measured, or extrapolated from ``measured_steps``."""
    rate: str
    """Per image, or tokens per second."""
    peak_memory_bytes: int | None
    bound_s: float | None
    measured_steps: int | None = None
    """Set when fewer steps ran than ``work`` names and ``seconds`` is extrapolated."""
    measured_s: float | None = None
    step_s: float | None = None
    """Median seconds of one denoising step, where measured (WAN)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if self.bound_s is None else self.seconds / self.bound_s

    def note(self) -> str:
        notes = []
        if self.measured_steps is not None:
            notes.append(
                f"extrapolated from {self.measured_steps} steps run in {self.measured_s:.2f} s"
            )
        if self.step_s is not None:
            notes.append(f"{self.step_s:.3f} s/step")
        notes += [f"{key} {value}" for key, value in self.extra.items()]
        return "; ".join(notes)


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 0.1 else f"{value:.3g} s"


class Report:
    """The rows so far, rewritten to ``--json`` and ``--table`` after each one."""

    def __init__(self, meta: dict[str, Any], json_path: Path | None, table_path: Path | None):
        self.meta = meta
        self.rows: list[Row] = []
        self.json_path = json_path
        self.table_path = table_path
        self.started = time.perf_counter()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.write()

    def table(self) -> str:
        header = (
            "| model | work | seconds | per image / tokens/s | bound | x bound | peak memory "
            "| note |\n|---|---|---:|---:|---:|---:|---:|---|\n"
        )
        lines = [
            f"| {r.model} | {r.work} | {r.seconds:.2f} | {r.rate} | {seconds_text(r.bound_s)} "
            f"| {'-' if r.ratio is None else f'{r.ratio:.1f}'} | {gib(r.peak_memory_bytes)} "
            f"| {r.note()} |\n"
            for r in self.rows
        ]
        return header + "".join(lines)

    def write(self) -> None:
        elapsed = time.perf_counter() - self.started
        if self.json_path is not None:
            document = {
                "meta": {**self.meta, "elapsed_s": round(elapsed, 1)},
                "rows": [
                    {**dataclasses.asdict(row), "ratio": row.ratio, "note": row.note()}
                    for row in self.rows
                ],
            }
            self.json_path.write_text(json.dumps(document, indent=2) + "\n")
        if self.table_path is not None:
            self.table_path.write_text(self.caption() + "\n\n" + self.table())

    def caption(self) -> str:
        meta = self.meta
        peak = meta["peak"]
        bound = (
            f"bound at {peak['flops'] / 1e12:.0f} TFLOP/s and {peak['bytes_per_s'] / 1e12:.2f} "
            f"TB/s ({peak['name']})"
            if peak
            else "no bound (a CPU, an unknown GPU or the tiny profile)"
        )
        return (
            f"{meta['profile']} profile on {meta['device_name']}, torch {meta['versions']['torch']}"
            f", diffusers {meta['versions']['diffusers']}, transformers "
            f"{meta['versions']['transformers']}; {bound}; each row after a warm-up."
        )


# --- Timing --------------------------------------------------------------------------------


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


class StepClock:
    """``on_step`` callback: the (synchronised) time at which each denoising step ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def __call__(self, step: int, total: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())

    def step_s(self) -> float | None:
        """Median interval between step ends (the first step's own start is not seen)."""
        intervals = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return statistics.median(intervals) if intervals else None


@dataclass(frozen=True)
class StepMeasurement:
    seconds: float
    steps: int
    step_s: float | None
    peak: int | None

    def extrapolate(self, steps: int) -> float:
        """The call at ``steps`` steps: the same fixed part, each step at ``step_s``."""
        assert self.step_s is not None, "extrapolating needs at least two measured steps"
        return self.seconds + (steps - self.steps) * self.step_s


# --- The models ----------------------------------------------------------------------------


def sdxl_rows(
    settings: Settings,
    batches: list[int],
    steps: list[int],
    warmup_steps: int,
    bounds: Bounds | None,
    report: Report,
) -> None:
    runner = SDXLPipelineRunner.build(settings)
    width, height = SDXL_SIZE
    print(f"\nSDXL ({settings.model_profile}, {runner.device})")
    print(f"{'steps':>5} {'batch':>5} {'s / call':>9} {'s / image':>10} {'peak memory':>12}")
    for step_count in steps:
        for batch in batches:

            def requests(count: int, b: int = batch) -> list[ImageRequest]:
                return [
                    ImageRequest(PROMPT, None, seed, count, 7.5, width, height) for seed in range(b)
                ]

            runner.generate(requests(warmup_steps))  # warm-up: kernels, allocator, autotuning
            _, elapsed, peak = timed(
                functools.partial(runner.generate, requests(step_count)), runner.device
            )
            print(
                f"{step_count:>5} {batch:>5} {elapsed:>9.2f} {elapsed / batch:>10.3f} "
                f"{gib(peak):>12}"
            )
            size = "x".join(map(str, runner.output_size(width, height)))
            report.add(
                Row(
                    model="SDXL",
                    work=f"{step_count} steps, {batch} x {size}",
                    seconds=elapsed,
                    rate=f"{elapsed / batch:.3f} s/image",
                    peak_memory_bytes=peak,
                    bound_s=bounds.sdxl(step_count, batch, width, height) if bounds else None,
                )
            )


def wan_rows(
    settings: Settings,
    steps: list[int],
    frames: list[int],
    video_steps: int,
    caches: list[StepCache],
    warmup_steps: int,
    bounds: Bounds | None,
    report: Report,
) -> None:
    runner = WanPipelineRunner.build(settings)
    width, height = WAN_SIZE
    print(f"\nWAN ({settings.model_profile}, {runner.device})")
    print(
        f"{'frames':>6} {'steps':>5} {'cache':>12} {'seconds':>9} {'ran steps':>9} "
        f"{'s / step':>9} {'speed-up':>9} {'PSNR dB':>8} {'peak memory':>12}"
    )

    def request(n: int, s: int, cache: StepCache | None = None, seed: int = WAN_SEED):
        return VideoRequest(
            PROMPT, None, seed, s, WAN_GUIDANCE, width, height, n, WAN_FPS, step_cache=cache
        )

    def measure(n: int, s: int, cache: StepCache | None = None) -> tuple[Any, StepMeasurement]:
        clock = StepClock(runner.device)
        output, elapsed, peak = timed(
            lambda: runner.generate(request(n, s, cache), on_step=clock), runner.device
        )
        return output, StepMeasurement(elapsed, s, clock.step_s(), peak)

    produced = "x".join(map(str, runner.output_size(width, height)))
    for frame_count in frames:
        what = "image" if frame_count == 1 else f"{frame_count}-frame video"
        # Each step count runs in full for an image; a video runs at most video_steps steps,
        # and one call serves every row of that step count or more.
        measured: dict[int, StepMeasurement] = {}
        for step_count in steps:
            run_steps = step_count if frame_count == 1 else min(step_count, video_steps)
            fresh = run_steps not in measured
            if fresh:
                runner.generate(request(frame_count, warmup_steps))  # warm-up of this shape
                output, measured[run_steps] = measure(frame_count, run_steps)
            m = measured[run_steps]
            extrapolated = run_steps != step_count
            seconds = m.extrapolate(step_count) if extrapolated else m.seconds
            print(
                f"{frame_count:>6} {step_count:>5} {'none':>12} {seconds:>9.2f} {run_steps:>9} "
                f"{seconds_text(m.step_s):>9} {'-':>9} {'-':>8} {gib(m.peak):>12}"
            )
            report.add(
                Row(
                    model="WAN",
                    work=f"{what}, {step_count} steps, {produced}",
                    seconds=seconds,
                    rate=f"{seconds:.2f} s/{'image' if frame_count == 1 else 'video'}",
                    peak_memory_bytes=m.peak,
                    bound_s=bounds.wan(step_count, frame_count, width, height) if bounds else None,
                    measured_steps=run_steps if extrapolated else None,
                    measured_s=m.seconds if extrapolated else None,
                    step_s=m.step_s,
                )
            )
            if not fresh:
                continue
            reference = frames_of(output)
            for cache in caches:
                if cache is StepCache.MAG:
                    # MagCache's ratios come from one full call (another seed), untimed.
                    runner.calibrate_mag_cache(request(frame_count, run_steps, seed=WAN_SEED + 1))
                cached_output, c = measure(frame_count, run_steps, cache)
                speed_up = m.seconds / c.seconds
                quality = psnr(reference, frames_of(cached_output))
                print(
                    f"{frame_count:>6} {run_steps:>5} {cache.value:>12} {c.seconds:>9.2f} "
                    f"{run_steps:>9} {seconds_text(c.step_s):>9} {speed_up:>8.2f}x "
                    f"{quality:>8.1f} {gib(c.peak):>12}"
                )
                report.add(
                    Row(
                        model="WAN",
                        work=f"{what}, {run_steps} steps, {produced}, {cache.value} cache",
                        seconds=c.seconds,
                        rate=f"{c.seconds:.2f} s/{'image' if frame_count == 1 else 'video'}",
                        peak_memory_bytes=c.peak,
                        bound_s=None,  # a cache skips steps: the bound counts every one
                        step_s=c.step_s,
                        extra={"speed-up": f"{speed_up:.2f}x", "PSNR dB": f"{quality:.1f}"},
                    )
                )


def qwen_rows(
    settings: Settings, batches: list[int], new_tokens: int, bounds: Bounds | None, report: Report
) -> None:
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
        report.add(
            Row(
                model="Qwen",
                work=f"batch {batch}, {new_tokens} new tokens",
                seconds=elapsed,
                rate=f"{produced / elapsed:.1f} tokens/s",
                peak_memory_bytes=peak,
                bound_s=bounds.qwen(batch, new_tokens) if bounds else None,
            )
        )


# --- Main ----------------------------------------------------------------------------------


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def release_memory(device: torch.device) -> None:
    """Free the last model family's memory before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=[p.value for p in ModelProfile], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=["sdxl", "wan", "qwen"], action="append")
    parser.add_argument("--sdxl-batches", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--sdxl-steps", type=int, nargs="+", default=[15, 25])
    parser.add_argument("--wan-steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--wan-frames", type=int, nargs="+", default=[1, 81])
    parser.add_argument(
        "--wan-video-steps",
        type=int,
        default=25,
        help="most steps a video runs; longer rows are extrapolated from it (at least 2)",
    )
    parser.add_argument(
        "--step-caches",
        nargs="*",
        choices=[c.value for c in StepCache],
        default=[],
        help="WAN step caches to time beside the uncached call (default: none)",
    )
    parser.add_argument("--qwen-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--qwen-new-tokens", type=int, default=200)
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="steps of each untimed warm-up call"
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 TFLOP/s")
    parser.add_argument("--peak-tbps", type=float, help="the GPU's memory bandwidth in TB/s")
    parser.add_argument("--json", type=Path, help="write the rows and their context here")
    parser.add_argument("--table", type=Path, help="write the rows as a markdown table here")
    args = parser.parse_args()
    if args.wan_video_steps < 2:
        parser.error("--wan-video-steps must be at least 2: a step's time is between two ends")
    if (args.peak_tflops is None) != (args.peak_tbps is None):
        parser.error("--peak-tflops and --peak-tbps go together")
    return args


def main() -> None:
    args = parse_args()
    settings = Settings(model_profile=ModelProfile(args.profile), device=args.device)
    device = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        print(f"GPU: {device_name}, torch {torch.__version__}")
    peak = device_peak(device, args.peak_tflops, args.peak_tbps)
    # The counts are of the real architectures: nothing to compare the tiny models with.
    bounds = Bounds(peak) if peak and settings.model_profile is not ModelProfile.TINY else None
    meta = {
        "profile": settings.model_profile.value,
        "device": str(device),
        "device_name": device_name,
        "peak": dataclasses.asdict(bounds.peak) if bounds else None,
        "versions": {
            name: version(name)
            for name in ("torch", "diffusers", "transformers", "peft", "imageio-ffmpeg")
        },
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    report = Report(meta, args.json, args.table)
    report.write()
    only = set(args.only or ["sdxl", "wan", "qwen"])
    if "sdxl" in only:
        sdxl_rows(settings, args.sdxl_batches, args.sdxl_steps, args.warmup_steps, bounds, report)
        release_memory(device)
    if "qwen" in only:
        qwen_rows(settings, args.qwen_batches, args.qwen_new_tokens, bounds, report)
        release_memory(device)
    # WAN last: the longest, so a run cut short by a time limit loses the least.
    if "wan" in only:
        caches = [StepCache(c) for c in args.step_caches]
        wan_rows(
            settings,
            args.wan_steps,
            args.wan_frames,
            args.wan_video_steps,
            caches,
            args.warmup_steps,
            bounds,
            report,
        )
    print(f"\n{report.caption()}\n\n{report.table()}")
    print(f"{len(report.rows)} rows in {time.perf_counter() - report.started:.0f} s")


if __name__ == "__main__":
    main()

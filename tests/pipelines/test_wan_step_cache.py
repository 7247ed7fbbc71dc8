"""WAN step caches on the tiny profile: they skip block computations, and leave nothing behind.

Block computations are counted with plain torch forward hooks on the blocks' FFNs: diffusers'
cache hooks replace a skipped block's ``forward``, so a hook on the block itself would still
fire, while its FFN runs only when the block really computes.

The tiny model's random weights change less from step to step than a trained WAN's in some
ways and more in others: at these 6 steps its first-block residual moves by 5-11 % a step, so
first-block cache's default threshold (0.05) skips nothing here and the tests use 0.2 for it;
MagCache (calibrated on this model) and TaylorSeer skip with their defaults.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

from ourvidz_serve.catalog import StepCache
from ourvidz_serve.pipelines.base import VideoRequest
from ourvidz_serve.pipelines.encode import decode_png
from ourvidz_serve.pipelines.wan import MAX_SEQUENCE_LENGTH, WanPipelineRunner
from ourvidz_serve.settings import Settings

STEPS = 6
CFG_PASSES = 2  # guidance_scale > 1: a "cond" and an "uncond" transformer call per step
FIRST_BLOCK_THRESHOLD = 0.2


def tiny_runner() -> WanPipelineRunner:
    built = WanPipelineRunner.build(Settings(device="cpu"))  # seeded: always the same weights
    return WanPipelineRunner(
        built.pipe,
        profile=built.profile,
        device=built.device,
        step_cache_options={StepCache.FIRST_BLOCK: {"threshold": FIRST_BLOCK_THRESHOLD}},
    )


@pytest.fixture(scope="module")
def runner() -> WanPipelineRunner:
    return tiny_runner()


@pytest.fixture
def calibrated(runner: WanPipelineRunner) -> WanPipelineRunner:
    if runner.mag_ratios is None:
        runner.calibrate_mag_cache(request())
    return runner


def request(step_cache: StepCache | None = None, **changes: object) -> VideoRequest:
    fields: dict = {
        "prompt": "a paper boat drifting down a rainy street",
        "negative_prompt": "static, blurry",
        "seed": 3,
        "steps": STEPS,
        "guidance_scale": 6.5,
        "width": 64,
        "height": 32,
        "num_frames": 1,
        "step_cache": step_cache,
    }
    fields.update(changes)
    return VideoRequest(**fields)


@contextmanager
def block_computations(runner: WanPipelineRunner) -> Iterator[list[int]]:
    """Per block, how many transformer calls it computed in (hooks on the blocks' FFNs)."""
    blocks = runner.pipe.transformer.blocks
    counts = [0] * len(blocks)

    def counter(index: int):
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            counts[index] += 1

        return hook

    handles = [block.ffn.register_forward_hook(counter(i)) for i, block in enumerate(blocks)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def cache_hooks_left(runner: WanPipelineRunner) -> list[str]:
    """Names of diffusers hooks still registered anywhere in the transformer."""
    return [
        f"{name}: {hook}"
        for name, module in runner.pipe.transformer.named_modules()
        for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
    ]


def pixels(data: bytes) -> np.ndarray:
    return decode_png(data).astype(int)


def test_the_tiny_transformer_has_two_blocks(runner: WanPipelineRunner) -> None:
    # The counts below rely on it: first-block cache's head is block 0, its tail block 1.
    assert len(runner.pipe.transformer.blocks) == 2


@pytest.mark.parametrize(("guidance", "passes"), [(6.5, CFG_PASSES), (1.0, 1)])
def test_without_a_cache_every_block_runs_once_per_step_and_guidance_pass(
    runner: WanPipelineRunner, guidance: float, passes: int
) -> None:
    with block_computations(runner) as counts:
        _, stats = runner.generate_with_stats(request(guidance_scale=guidance))
    assert counts == [STEPS * passes, STEPS * passes]
    assert stats == {}, "no cache, nothing recorded"


@pytest.mark.parametrize("cache", list(StepCache))
def test_a_cache_computes_fewer_blocks_than_an_uncached_call_at_the_same_seed(
    calibrated: WanPipelineRunner, cache: StepCache
) -> None:
    runner = calibrated
    with block_computations(runner) as uncached:
        runner.generate(request())
    with block_computations(runner) as cached:
        _, stats = runner.generate_with_stats(request(cache))
    calls = STEPS * CFG_PASSES
    assert uncached == [calls, calls]
    assert cached[1] < calls, f"{cache} skipped nothing: {cached}"
    if cache is StepCache.FIRST_BLOCK:
        assert cached[0] == calls, "first-block cache always runs the first block"
    assert stats == {
        "step_cache_computed_calls": cached[1],
        "step_cache_skipped_calls": calls - cached[1],
    }


def test_taylor_seer_skips_blocks_in_4_of_each_5_steps_after_3_warm_up_steps(
    runner: WanPipelineRunner,
) -> None:
    # Steps 0, 1, 2 warm up, step 4 refreshes; 3 and 5 are predicted, for both passes.
    _, stats = runner.generate_with_stats(request(StepCache.TAYLOR_SEER))
    assert stats["step_cache_computed_calls"] == 4 * CFG_PASSES
    assert stats["step_cache_skipped_calls"] == 2 * CFG_PASSES


def test_taylor_seers_default_patterns_hook_nothing_on_wan_hence_lite_mode(
    runner: WanPipelineRunner,
) -> None:
    # `^blocks.*attn` must match a whole name; WAN's attentions are attn1 / attn2.
    transformer = runner.pipe.transformer
    transformer.enable_cache(TaylorSeerCacheConfig())
    try:
        assert cache_hooks_left(runner) == []
    finally:
        transformer.disable_cache()


@pytest.mark.parametrize("cache", list(StepCache))
def test_a_cached_call_is_deterministic(calibrated: WanPipelineRunner, cache: StepCache) -> None:
    first = calibrated.generate(request(cache, seed=11))
    again = calibrated.generate(request(cache, seed=11))
    assert first.data == again.data


@pytest.mark.parametrize("cache", list(StepCache))
def test_a_call_after_a_cached_one_gives_the_pixels_of_a_fresh_uncached_call(
    calibrated: WanPipelineRunner, cache: StepCache
) -> None:
    runner = calibrated
    fresh = runner.generate(request(seed=21))
    cached = runner.generate(request(cache, seed=21))
    assert not runner.pipe.transformer.is_cache_enabled
    assert cache_hooks_left(runner) == []
    with block_computations(runner) as counts:
        after = runner.generate(request(seed=21))
    assert counts == [STEPS * CFG_PASSES] * 2, "every block computed again"
    assert after.data == fresh.data
    # The cache approximates the same image; the tiny model's pixels stay close.
    assert np.abs(pixels(cached.data) - pixels(fresh.data)).mean() < 4


def test_a_cached_call_aborted_by_its_callback_leaves_no_hooks(
    runner: WanPipelineRunner,
) -> None:
    class Cancelled(Exception):
        pass

    def cancel(step: int, total: int) -> None:
        if step == 3:
            raise Cancelled

    fresh = runner.generate(request(seed=31))
    with pytest.raises(Cancelled):
        runner.generate(request(StepCache.FIRST_BLOCK, seed=31), on_step=cancel)
    assert not runner.pipe.transformer.is_cache_enabled
    assert cache_hooks_left(runner) == []
    assert runner.generate(request(seed=31)).data == fresh.data


def test_the_cond_and_uncond_passes_keep_separate_cache_state(runner: WanPipelineRunner) -> None:
    # WanPipeline calls the transformer under cache_context("cond") and ("uncond"); the
    # first-block cache's state is keyed by that name, so one pass never reuses the other's.
    seen: list[set[str]] = []

    def look(step: int, total: int) -> None:
        head = runner.pipe.transformer.blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
        seen.append(set(head.state_manager._state_cache))

    runner.generate(request(StepCache.FIRST_BLOCK), on_step=look)
    assert seen == [{"cond", "uncond"}] * STEPS
    seen.clear()
    runner.generate(request(StepCache.FIRST_BLOCK, guidance_scale=1.0), on_step=look)
    assert seen == [{"cond"}] * STEPS


def test_the_first_mag_call_calibrates_in_full_and_later_ones_skip(
    runner: WanPipelineRunner,
) -> None:
    runner.mag_ratios = None
    uncached = runner.generate(request(seed=41))
    with pytest.raises(RuntimeError, match="not calibrated"):
        runner.step_cache_config(StepCache.MAG, STEPS)
    with block_computations(runner) as counts:
        first, stats = runner.generate_with_stats(request(StepCache.MAG, seed=41))
    assert counts == [STEPS * CFG_PASSES] * 2
    assert stats == {
        "step_cache_computed_calls": STEPS * CFG_PASSES,
        "step_cache_skipped_calls": 0,
        "step_cache_calibration": True,
    }
    assert first.data == uncached.data, "calibration computes every step"
    assert runner.mag_ratios is not None and len(runner.mag_ratios) == STEPS
    _, stats = runner.generate_with_stats(request(StepCache.MAG, seed=41))
    assert stats["step_cache_skipped_calls"] > 0
    assert "step_cache_calibration" not in stats


def test_mag_ratios_match_diffusers_calibration_mode(
    runner: WanPipelineRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = runner.calibrate_mag_cache(request(seed=51))
    capsys.readouterr()
    transformer = runner.pipe.transformer
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    try:
        with torch.inference_mode():
            runner.pipe(
                prompt=request().prompt,
                negative_prompt=request().negative_prompt,
                height=32,
                width=64,
                num_frames=1,
                num_inference_steps=STEPS,
                guidance_scale=6.5,
                generator=torch.Generator().manual_seed(51),
                output_type="np",
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
    finally:
        transformer.disable_cache()
    printed = [
        ast.literal_eval(line)
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("[1.0")
    ]
    assert len(printed) == CFG_PASSES, "diffusers prints one array per cache context"
    assert ours == pytest.approx(np.mean(printed, axis=0).tolist(), rel=1e-5)


def test_ratios_given_to_the_runner_skip_calibration(runner: WanPipelineRunner) -> None:
    given = WanPipelineRunner(
        runner.pipe, profile=runner.profile, device=runner.device, mag_ratios=[1.0] * STEPS
    )
    _, stats = given.generate_with_stats(request(StepCache.MAG))
    assert "step_cache_calibration" not in stats
    # Ratios of exactly 1 accumulate no error: after the retained first 20 %, MagCache skips
    # as many calls in a row as it may (3) before it computes again.
    assert stats["step_cache_skipped_calls"] > 0
    config = given.step_cache_config(StepCache.MAG, 50)
    assert isinstance(config, MagCacheConfig)
    assert (config.threshold, config.max_skip_steps, config.retention_ratio) == (0.06, 3, 0.2)
    assert len(config.mag_ratios) == 50, "diffusers interpolates the ratios to the step count"


def test_with_compiled_blocks_caches_give_the_eager_pixels_and_mag_still_calibrates(
    runner: WanPipelineRunner,
) -> None:
    # As Settings.torch_compile does (regional compilation), with Dynamo's eager backend.
    compiled = tiny_runner()
    compiled.pipe.transformer.compile_repeated_blocks(backend="eager")
    try:
        assert compiled.generate(request(seed=61)).data == runner.generate(request(seed=61)).data
        # Hooks added after compilation are not called by compiled code: the calibration call
        # runs eagerly (and is counted), and cached calls record no counts rather than wrong ones.
        _, stats = compiled.generate_with_stats(request(StepCache.MAG, seed=61))
        assert stats == {
            "step_cache_computed_calls": STEPS * CFG_PASSES,
            "step_cache_skipped_calls": 0,
            "step_cache_calibration": True,
        }
        assert compiled.mag_ratios == pytest.approx(runner.calibrate_mag_cache(request(seed=61)))
        for cache in StepCache:
            asset, stats = compiled.generate_with_stats(request(cache, seed=62))
            assert stats == {}
            assert asset.data == runner.generate(request(cache, seed=62)).data, cache
        assert not compiled.pipe.transformer.is_cache_enabled
        assert compiled.generate(request(seed=61)).data == runner.generate(request(seed=61)).data
    finally:
        torch._dynamo.reset()

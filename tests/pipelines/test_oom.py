"""Out-of-memory splitting: errors injected into the real tiny SDXL pipeline's UNet on CPU."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ourvidz_serve.catalog import ReferenceType
from ourvidz_serve.pipelines.base import ImageRequest
from ourvidz_serve.pipelines.encode import decode_png
from ourvidz_serve.pipelines.oom import OOMSplitter, OutOfGPUMemory
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.settings import Settings
from tests.pipelines.sdxl_support import image_request

STEPS = 4


@pytest.fixture(scope="module")
def runner() -> SDXLPipelineRunner:
    return SDXLPipelineRunner.build(Settings(device="cpu"))


def request(seed: int, **changes: Any) -> ImageRequest:
    return image_request(seed, f"a harbour at dawn, take {seed}", **{"steps": STEPS, **changes})


def reference_png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (48, 40), color)
    image.paste((255 - color[0], 128, color[2]), (8, 8, 30, 30))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def unet_out_of_memory(
    runner: SDXLPipelineRunner, fits: Callable[[int, int], bool]
) -> Iterator[list[int]]:
    """Raise CUDA's out-of-memory error in the UNet's forward unless ``fits(images, call)``.

    ``images`` is the UNet batch over the two guidance halves; ``call`` counts UNet calls
    from 1. Yields the image counts of the calls that ran.
    """
    ran: list[int] = []
    calls = 0

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal calls
        calls += 1
        images = args[0].shape[0] // 2
        if not fits(images, calls):
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {images * 2.5:.2f} GiB (injected)"
            )
        ran.append(images)

    handle = runner.pipe.unet.register_forward_pre_hook(hook)
    try:
        yield ran
    finally:
        handle.remove()


def same_pixels(a: bytes, b: bytes) -> bool:
    """Equal up to float noise: as images batched together and alone (tests/pipelines/test_sdxl).

    A half is a smaller batch, and CPU kernels sum in a batch-size dependent order: measured,
    at most one level in one or two pixels of a 32x32 image differs from the unsplit call.
    """
    difference = np.abs(decode_png(a).astype(np.int16) - decode_png(b).astype(np.int16))
    return int(difference.max()) <= 2


def test_a_batch_split_after_running_out_of_memory_gives_the_pixels_of_one_call(
    runner: SDXLPipelineRunner, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [request(seed) for seed in range(40, 45)]
    unsplit = runner.generate(requests)
    splits = runner.oom.splits

    with (
        caplog.at_level(logging.WARNING, logger="ourvidz_serve.pipelines.oom"),
        unet_out_of_memory(runner, lambda images, _call: images <= 2) as ran,
    ):
        split = runner.generate(requests)

    # 5 -> 3 + 2, 3 -> 2 + 1: every image once, in calls of at most two.
    assert set(ran) == {2, 1} and sum(ran) == 5 * STEPS
    for whole, part in zip(unsplit, split, strict=True):
        assert same_pixels(whole.data, part.data), "a split must not change a pixel"
    assert runner.oom.splits - splits == 2
    assert runner.oom.last_split == (3, 2, 1)
    logged = [r.getMessage() for r in caplog.records if r.name == "ourvidz_serve.pipelines.oom"]
    assert logged == [
        "SDXL: out of GPU memory for 5 32x32 images; retrying as 3 + 2",
        "SDXL: out of GPU memory for 3 32x32 images; retrying as 2 + 1",
    ]


def test_a_split_reference_batch_keeps_each_images_own_reference(
    runner: SDXLPipelineRunner,
) -> None:
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    for kind in (ReferenceType.STYLE, ReferenceType.CHARACTER, ReferenceType.COMPOSITION):
        requests = [
            request(seed, reference_image=reference_png(colour), reference_type=kind)
            for seed, colour in enumerate(colours)
        ]
        unsplit = runner.generate(requests)
        with unet_out_of_memory(runner, lambda images, _call: images == 1):
            split = runner.generate(requests)
        for whole, part in zip(unsplit, split, strict=True):
            assert same_pixels(whole.data, part.data), kind


def test_running_out_of_memory_while_decoding_splits_too(runner: SDXLPipelineRunner) -> None:
    requests = [request(seed) for seed in range(20, 22)]
    unsplit = runner.generate(requests)
    failures = iter([True])

    def hook(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        if next(failures, False):
            raise torch.OutOfMemoryError("CUDA out of memory in the VAE decoder (injected)")

    handle = runner.pipe.vae.decoder.register_forward_pre_hook(hook)
    try:
        split = runner.generate(requests)
    finally:
        handle.remove()
    assert runner.oom.last_split == (2, 1, 1)
    # On CUDA the retry first puts a force_upcast VAE back to float16; on CPU it stays float32.
    assert runner.pipe.vae.dtype == runner.pipe.unet.dtype
    for whole, part in zip(unsplit, split, strict=True):
        assert same_pixels(whole.data, part.data)


def test_progress_never_goes_back_when_a_call_is_split_halfway(
    runner: SDXLPipelineRunner,
) -> None:
    requests = [request(seed) for seed in range(4)]
    progress: list[tuple[int, int]] = []

    # The full batch runs two steps, then the third runs out of memory.
    def fits(images: int, call: int) -> bool:
        return images <= 2 or call <= 2

    with unet_out_of_memory(runner, fits) as ran:
        runner.generate(requests, on_step=lambda step, total: progress.append((step, total)))

    assert ran == [4, 4] + [2] * STEPS * 2
    steps = [step for step, _ in progress]
    assert {total for _, total in progress} == {STEPS}
    assert len(progress) == len(ran), "one report per denoising step that ran"
    assert steps == sorted(steps) and steps[-1] == STEPS
    # Two steps reported before the failure, held while the first half catches up.
    assert steps == [1, 2, 2, 2, 2, 2, 2, 3, 3, 4]


def test_progress_of_later_groups_follows_a_split_group(runner: SDXLPipelineRunner) -> None:
    requests = [request(seed) for seed in range(3)] + [request(9, steps=STEPS + 2)]
    progress: list[tuple[int, int]] = []
    with unet_out_of_memory(runner, lambda images, _call: images == 1):
        runner.generate(requests, on_step=lambda step, total: progress.append((step, total)))

    total = STEPS + STEPS + 2
    steps = [step for step, _ in progress]
    assert {t for _, t in progress} == {total}
    assert steps == sorted(steps) and steps[-1] == total
    assert steps[-(STEPS + 2) :] == list(range(STEPS + 1, total + 1)), "second group unsplit"


def test_running_out_of_memory_for_a_single_image_fails_clearly_and_leaves_the_runner_usable(
    runner: SDXLPipelineRunner,
) -> None:
    exhausted = runner.oom.exhausted
    with (
        unet_out_of_memory(runner, lambda _images, _call: False),
        pytest.raises(OutOfGPUMemory, match="out of GPU memory even for a single 32x32 image"),
    ):
        runner.generate([request(1), request(2)])

    assert runner.oom.exhausted == exhausted + 1
    assert len(runner.generate([request(1)])) == 1


def test_other_errors_are_not_split(runner: SDXLPipelineRunner) -> None:
    splits = runner.oom.splits

    def hook(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    handle = runner.pipe.unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            runner.generate([request(1), request(2)])
    finally:
        handle.remove()
    assert runner.oom.splits == splits


def halves_under(limit: int, seen: list[int]) -> Callable[[Sequence[int]], list[int]]:
    """A call that squares its items and runs out of memory above ``limit`` items."""

    def call(items: Sequence[int]) -> list[int]:
        seen.append(len(items))
        if len(items) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return [item * item for item in items]

    return call


def test_the_splitter_keeps_order_and_halves_down_to_what_fits() -> None:
    splitter, seen = OOMSplitter("test"), list[int]()

    squares = splitter.run(list(range(6)), halves_under(2, seen), unit="frame")

    assert squares == [0, 1, 4, 9, 16, 25]
    assert seen == [6, 3, 2, 1, 3, 2, 1]
    assert splitter.splits == 3 and splitter.exhausted == 0
    assert splitter.run([], halves_under(2, seen)) == []


def test_the_splitter_restores_state_before_each_retry_and_names_the_unit() -> None:
    splitter, restored = OOMSplitter("test"), list[int]()
    with pytest.raises(OutOfGPUMemory, match=r"test: out of GPU memory even for a single frame"):
        splitter.run([1, 2], halves_under(0, []), unit="frame", restore=lambda: restored.append(1))
    # 2 fails, then 1 fails and the splitter gives up: a restore after each failure.
    assert restored == [1, 1]
    assert splitter.exhausted == 1

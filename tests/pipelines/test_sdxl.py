"""SDXL runner on the tiny profile: real diffusers pipelines with small random weights."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ourvidz_serve.catalog import ReferenceType
from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.base import ImageRequest
from ourvidz_serve.pipelines.encode import decode_png
from ourvidz_serve.pipelines.sdxl import (
    REFERENCE_MODES,
    SDXL_BASE_CONFIGS,
    TINY_CONFIGS,
    SDXLPipelineRunner,
    build_random_sdxl_pipeline,
)
from ourvidz_serve.pipelines.tokenizers import clip_tokenizer
from ourvidz_serve.settings import ModelProfile, Settings
from tests.pipelines.sdxl_support import image_request

STEPS = 4


@pytest.fixture(scope="module")
def runner() -> SDXLPipelineRunner:
    return SDXLPipelineRunner.build(Settings(device="cpu"))


def request(seed: int, prompt: str = "a lighthouse at dusk", **changes: Any) -> ImageRequest:
    changes.setdefault("negative_prompt", "blurry, lowres")
    return image_request(seed, prompt, **{"steps": STEPS, **changes})


def reference_png(color: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], 40, 200), (10, 10, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(asset_data: bytes) -> np.ndarray:
    return decode_png(asset_data).astype(np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_images_generated_in_a_batch_equal_the_same_images_generated_alone(
    runner: SDXLPipelineRunner,
) -> None:
    requests = [
        request(7, "a red fox in snow"),
        request(8, "two women dancing", negative_prompt="extra limbs"),
        request(9, "a city street at night"),
    ]
    progress: list[tuple[int, int]] = []
    batched = runner.generate(requests, on_step=lambda step, total: progress.append((step, total)))
    alone = [runner.generate([r])[0] for r in requests]

    assert progress[-1] == (STEPS, STEPS), "three compatible requests must be one pipeline call"
    for together, single in zip(batched, alone, strict=True):
        assert max_diff(together.data, single.data) <= 2


def test_mixed_batch_returns_images_in_request_order_each_as_if_alone(
    runner: SDXLPipelineRunner,
) -> None:
    requests = [
        request(1),
        request(2, reference_image=reference_png((200, 30, 30)), reference_strength=0.5),
        request(3, steps=STEPS + 2),
        request(4, negative_prompt=None),
        request(5),
    ]
    progress: list[tuple[int, int]] = []
    batched = runner.generate(requests, on_step=lambda step, total: progress.append((step, total)))
    alone = [runner.generate([r])[0] for r in requests]

    style_steps = REFERENCE_MODES[ReferenceType.STYLE].denoising_steps(STEPS, 0.5)
    expected_total = STEPS + style_steps + (STEPS + 2) + STEPS
    assert [step for step, _ in progress] == list(range(1, expected_total + 1))
    assert {total for _, total in progress} == {expected_total}
    assert [a.seed for a in batched] == [1, 2, 3, 4, 5]
    for together, single in zip(batched, alone, strict=True):
        assert max_diff(together.data, single.data) <= 2


def test_same_seed_gives_identical_png_bytes(runner: SDXLPipelineRunner) -> None:
    first = runner.generate([request(42)])[0]
    second = runner.generate([request(42)])[0]
    assert first.data == second.data


def test_different_seeds_give_different_images(runner: SDXLPipelineRunner) -> None:
    a, b = runner.generate([request(100), request(101)])
    assert max_diff(a.data, b.data) > 10


def test_tiny_profile_produces_valid_png_at_its_native_size(runner: SDXLPipelineRunner) -> None:
    asset = runner.generate([request(3)])[0]
    width, height = runner.output_size(1024, 1024)
    with Image.open(io.BytesIO(asset.data)) as image:
        assert image.format == "PNG"
        assert image.size == (width, height) == (asset.width, asset.height)
    assert asset.mime_type == "image/png"
    assert asset.num_frames == 1
    assert pixels(asset.data).std() > 1, "an image, not a flat colour"


def test_image_to_image_runs_img2img_and_differs_from_text_to_image(
    runner: SDXLPipelineRunner,
) -> None:
    strength = 0.5
    progress: list[tuple[int, int]] = []
    red_ref = request(11, reference_image=reference_png((220, 20, 20)), reference_strength=strength)
    blue_ref = request(
        11, reference_image=reference_png((20, 20, 220)), reference_strength=strength
    )
    from_red = runner.generate([red_ref], on_step=lambda s, t: progress.append((s, t)))[0]
    from_blue = runner.generate([blue_ref])[0]
    text_only = runner.generate([request(11)])[0]

    # img2img denoises only the last steps x strength steps, at the default type's strength.
    steps = REFERENCE_MODES[ReferenceType.STYLE].denoising_steps(STEPS, strength)
    assert progress == [(step, steps) for step in range(1, steps + 1)]
    assert max_diff(from_red.data, text_only.data) > 10
    assert max_diff(from_red.data, from_blue.data) > 10, "the output depends on the reference"
    assert (from_red.width, from_red.height) == runner.output_size(1024, 1024)


@pytest.mark.parametrize(
    "bad",
    [
        request(1, reference_image=b"definitely not an image"),
        request(1, reference_image=reference_png((1, 2, 3))[:40]),
        request(1, prompt="   "),
        request(1, steps=0),
        request(1, width=1001),
        request(1, reference_image=reference_png((1, 2, 3)), reference_strength=0.0),
    ],
    ids=["garbage-bytes", "truncated-png", "empty-prompt", "no-steps", "odd-size", "strength-0"],
)
def test_invalid_requests_are_rejected_before_any_model_time(
    runner: SDXLPipelineRunner, bad: ImageRequest
) -> None:
    steps: list[int] = []
    with pytest.raises(InvalidRequest):
        runner.generate([request(1), bad], on_step=lambda step, total: steps.append(step))
    assert steps == []
    with pytest.raises(InvalidRequest):
        runner.validate([bad])


def test_weights_profile_without_checkpoint_setting_raises_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="OURVIDZ_SDXL_CHECKPOINT"):
        SDXLPipelineRunner.build(Settings(device="cpu", model_profile=ModelProfile.WEIGHTS))


def test_weights_profile_with_missing_checkpoint_raises_model_load_error(tmp_path: Path) -> None:
    settings = Settings(
        device="cpu",
        model_profile=ModelProfile.WEIGHTS,
        sdxl_checkpoint=tmp_path / "missing.safetensors",
    )
    with pytest.raises(ModelLoadError, match="does not exist"):
        SDXLPipelineRunner.build(settings)


def test_weights_profile_with_unreadable_single_file_raises_model_load_error(
    tmp_path: Path,
) -> None:
    checkpoint = tmp_path / "broken.safetensors"
    checkpoint.write_bytes(b"not a safetensors file")
    settings = Settings(
        device="cpu", model_profile=ModelProfile.WEIGHTS, sdxl_checkpoint=checkpoint
    )
    with pytest.raises(ModelLoadError):
        SDXLPipelineRunner.build(settings)


def test_weights_profile_loads_a_local_diffusers_folder(tmp_path: Path) -> None:
    # The tiny runner's UNet carries an IP-Adapter; a checkpoint is the plain SDXL model.
    saved = build_random_sdxl_pipeline(TINY_CONFIGS, torch.device("cpu"), torch.float32)
    saved.save_pretrained(tmp_path / "sdxl")
    settings = Settings(
        device="cpu", model_profile=ModelProfile.WEIGHTS, sdxl_checkpoint=tmp_path / "sdxl"
    )
    loaded = SDXLPipelineRunner.build(settings)

    assert not loaded.ip_adapter, "OURVIDZ_SDXL_IP_ADAPTER is unset"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original = getattr(saved, name).state_dict()
        for key, tensor in getattr(loaded.pipe, name).state_dict().items():
            assert torch.equal(tensor, original[key]), f"{name}.{key}"
    asset = loaded.generate([request(5, width=64, height=64)])[0]
    assert decode_png(asset.data).shape == (64, 64, 3), "weights profile honours the size"


def test_every_replica_builds_identical_tiny_weights(runner: SDXLPipelineRunner) -> None:
    other = SDXLPipelineRunner.build(Settings(device="cpu"))
    for key, tensor in other.pipe.unet.state_dict().items():
        assert torch.equal(tensor, runner.pipe.unet.state_dict()[key])


def test_building_leaves_the_callers_rng_and_default_dtype_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_random_sdxl_pipeline(SDXL_BASE_CONFIGS, torch.device("meta"), torch.float16)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_default_dtype() == torch.float32


def test_full_random_configs_are_the_sdxl_base_architecture() -> None:
    pipe = build_random_sdxl_pipeline(SDXL_BASE_CONFIGS, torch.device("meta"), torch.float16)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(pipe.unet) == 2_567_463_684
    assert count(pipe.vae) == 83_653_863
    assert count(pipe.text_encoder) == 123_060_480  # CLIP ViT-L/14 text
    assert count(pipe.text_encoder_2) == 694_659_840  # OpenCLIP ViT-bigG/14 text + projection
    assert pipe.text_encoder_2.config.projection_dim == 1280
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae_scale_factor == 8


def test_clip_tokenizer_pads_to_77_with_start_and_end_tokens() -> None:
    tokenizer = clip_tokenizer()
    ids = tokenizer(
        ["A Cat", "word " * 200], padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert tokenizer.model_max_length == 77
    assert all(len(row) == 77 for row in ids)
    assert ids[0][0] == tokenizer.bos_token_id
    assert ids[1][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a cat"

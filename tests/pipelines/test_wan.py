"""WAN runner on the tiny profile: the real WanPipeline with small random weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ourvidz_serve.errors import InvalidRequest, ModelLoadError
from ourvidz_serve.pipelines.base import VideoRequest
from ourvidz_serve.pipelines.encode import decode_png, probe_mp4, read_mp4_frames
from ourvidz_serve.pipelines.tokenizers import t5_tokenizer
from ourvidz_serve.pipelines.wan import (
    WAN_1_3B_CONFIGS,
    WanPipelineRunner,
    build_random_wan_pipeline,
)
from ourvidz_serve.settings import ModelProfile, Settings

STEPS = 3


@pytest.fixture(scope="module")
def runner() -> WanPipelineRunner:
    return WanPipelineRunner.build(Settings(device="cpu"))


def request(num_frames: int, seed: int = 1, **changes: object) -> VideoRequest:
    fields: dict = {
        "prompt": "a paper boat drifting down a rainy street",
        "negative_prompt": "static, blurry",
        "seed": seed,
        "steps": STEPS,
        "guidance_scale": 6.5,
        "width": 832,
        "height": 480,
        "num_frames": num_frames,
        "fps": 16,
    }
    fields.update(changes)
    return VideoRequest(**fields)


def test_81_frame_video_is_an_h264_mp4_with_81_frames_at_16_fps(
    runner: WanPipelineRunner,
) -> None:
    asset = runner.generate(request(81))
    info = probe_mp4(asset.data)
    width, height = runner.output_size(832, 480)

    assert asset.mime_type == "video/mp4"
    assert asset.num_frames == info.num_frames == 81
    assert info.fps == 16
    assert info.codec == "h264"
    assert info.pix_fmt.startswith("yuv420p")
    assert (info.width, info.height) == (width, height) == (asset.width, asset.height)
    frames = read_mp4_frames(asset.data)
    assert frames.shape == (81, height, width, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 0, "frames change"
    # The poster is the first frame, as WebP (lossy: close, not equal).
    assert asset.poster is not None
    with Image.open(io.BytesIO(asset.poster)) as poster:
        assert poster.format == "WEBP" and poster.size == (width, height)
        first = np.asarray(poster.convert("RGB"), dtype=int)
    assert np.abs(first - frames[0].astype(int)).mean() < 12


def test_single_frame_request_returns_a_png_image(runner: WanPipelineRunner) -> None:
    asset = runner.generate(request(1))
    assert asset.poster is None
    with Image.open(io.BytesIO(asset.data)) as image:
        assert image.format == "PNG"
        assert image.size == runner.output_size(832, 480) == (asset.width, asset.height)
    assert asset.mime_type == "image/png"
    assert asset.num_frames == 1


def test_same_seed_gives_identical_image_and_different_seeds_differ(
    runner: WanPipelineRunner,
) -> None:
    first = runner.generate(request(1, seed=5))
    again = runner.generate(request(1, seed=5))
    other = runner.generate(request(1, seed=6))
    assert first.data == again.data
    assert np.abs(decode_png(first.data).astype(int) - decode_png(other.data)).max() > 10


@pytest.mark.parametrize("frames", [0, 2, 80, 83, 125])
def test_frame_counts_that_are_not_4k_plus_1_are_rejected(
    runner: WanPipelineRunner, frames: int
) -> None:
    with pytest.raises(InvalidRequest, match="4k\\+1"):
        runner.generate(request(frames))


def test_sizes_that_are_not_multiples_of_16_are_rejected(runner: WanPipelineRunner) -> None:
    with pytest.raises(InvalidRequest, match="multiple of 16"):
        runner.generate(request(1, width=840))


def test_progress_is_reported_after_every_denoising_step(runner: WanPipelineRunner) -> None:
    progress: list[tuple[int, int]] = []
    runner.generate(request(5), on_step=lambda step, total: progress.append((step, total)))
    assert progress == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_a_raising_progress_callback_aborts_the_generation(runner: WanPipelineRunner) -> None:
    class Cancelled(Exception):
        pass

    def cancel(step: int, total: int) -> None:
        raise Cancelled

    before = runner.generate(request(1, seed=77))
    with pytest.raises(Cancelled):
        runner.generate(request(5), on_step=cancel)
    assert runner.generate(request(1, seed=77)).data == before.data, "no state left behind"


def test_scheduler_is_unipc_with_flow_shift_5(runner: WanPipelineRunner) -> None:
    config = runner.pipe.scheduler.config
    assert type(runner.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert config.flow_shift == 5.0
    assert config.use_flow_sigmas
    assert config.prediction_type == "flow_prediction"


def test_weights_profile_without_model_dir_raises_model_load_error() -> None:
    with pytest.raises(ModelLoadError, match="OURVIDZ_WAN_MODEL_DIR"):
        WanPipelineRunner.build(Settings(device="cpu", model_profile=ModelProfile.WEIGHTS))


def test_weights_profile_with_missing_model_dir_raises_model_load_error(tmp_path: Path) -> None:
    settings = Settings(
        device="cpu", model_profile=ModelProfile.WEIGHTS, wan_model_dir=tmp_path / "missing"
    )
    with pytest.raises(ModelLoadError, match="does not exist"):
        WanPipelineRunner.build(settings)


def test_weights_profile_with_an_empty_folder_raises_model_load_error(tmp_path: Path) -> None:
    settings = Settings(device="cpu", model_profile=ModelProfile.WEIGHTS, wan_model_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="could not load"):
        WanPipelineRunner.build(settings)


def test_weights_profile_loads_a_local_diffusers_folder(
    runner: WanPipelineRunner, tmp_path: Path
) -> None:
    runner.pipe.save_pretrained(tmp_path / "wan")
    settings = Settings(
        device="cpu", model_profile=ModelProfile.WEIGHTS, wan_model_dir=tmp_path / "wan"
    )
    loaded = WanPipelineRunner.build(settings)
    assert loaded.pipe.scheduler.config.flow_shift == 5.0
    small = request(1, seed=9, width=64, height=32)
    from_folder = decode_png(loaded.generate(small).data).astype(int)
    built = decode_png(runner.generate(small).data).astype(int)
    assert np.abs(from_folder - built).max() <= 2, "same weights, same pixels (float noise aside)"


def test_full_random_configs_are_the_wan_2_1_1_3b_architecture() -> None:
    pipe = build_random_wan_pipeline(
        WAN_1_3B_CONFIGS, torch.device("meta"), torch.bfloat16, torch.float32
    )

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(pipe.transformer) == 1_418_996_800
    assert count(pipe.text_encoder) == 5_680_910_336  # UMT5-XXL encoder
    assert count(pipe.vae) == 126_892_531
    assert pipe.transformer.config.num_attention_heads * 128 == 1536
    assert pipe.text_encoder.config.vocab_size == 256_384
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.transformer.scale_shift_table.dtype == torch.float32, "as from_pretrained keeps"
    assert pipe.transformer.blocks[0].norm2.weight.dtype == torch.float32
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32


def test_t5_tokenizer_pads_to_512_and_ends_with_eos() -> None:
    tokenizer = t5_tokenizer()
    batch = tokenizer(
        ["a cat", "x"],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
    )
    assert [len(row) for row in batch.input_ids] == [512, 512]
    length = sum(batch.attention_mask[0])
    assert batch.input_ids[0][length - 1] == tokenizer.eos_token_id
    assert batch.input_ids[0][length] == tokenizer.pad_token_id == 0

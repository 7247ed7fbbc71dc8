"""GPU settings applied to real tiny pipelines, checked on CPU where they can be."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from ourvidz_serve.catalog import ReferenceType
from ourvidz_serve.errors import ModelLoadError
from ourvidz_serve.pipelines.accel import (
    AccelerationOptions,
    apply_acceleration,
    apply_attention_backend,
    inference_dtype,
)
from ourvidz_serve.pipelines.base import ImageRequest
from ourvidz_serve.pipelines.encode import decode_png
from ourvidz_serve.pipelines.sdxl import (
    TINY_CONFIGS,
    SDXLPipelineRunner,
    build_random_sdxl_pipeline,
)
from ourvidz_serve.pipelines.wan import TINY_CONFIGS as WAN_TINY_CONFIGS
from ourvidz_serve.pipelines.wan import build_random_wan_pipeline
from ourvidz_serve.settings import Settings
from tests.pipelines.sdxl_support import image_request

STEPS = 3


@pytest.fixture(scope="module")
def runner() -> SDXLPipelineRunner:
    return SDXLPipelineRunner.build(Settings(device="cpu"))


def request(seed: int, **changes: Any) -> ImageRequest:
    return image_request(seed, "a red bicycle", **{"steps": STEPS, **changes})


def reference_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (30, 160, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(decode_png(a).astype(np.int16) - decode_png(b).astype(np.int16)).max())


def test_the_default_description_says_what_runs_on_cpu(runner: SDXLPipelineRunner) -> None:
    assert runner.acceleration == {
        "device": "cpu",
        "dtype": "float32",
        "vae_dtype": "float32",
        "attention_backend": "sdpa",
        "channels_last": False,  # CUDA only
        "vae_slicing": True,
        "vae_tiling": False,
        "compiled": False,
        "compile_scope": None,
        "compile_backend": None,
        "warm_up_s": None,  # nothing to warm on CPU without compiling
    }


def test_the_description_follows_the_settings_and_the_vae_really_changes() -> None:
    settings = Settings(device="cpu", vae_slicing=False, vae_tiling=True, channels_last=False)
    runner = SDXLPipelineRunner.build(settings)

    assert runner.acceleration["vae_slicing"] is False
    assert runner.acceleration["vae_tiling"] is True
    assert runner.acceleration["channels_last"] is False
    assert (runner.pipe.vae.use_slicing, runner.pipe.vae.use_tiling) == (False, True)


def test_vae_slicing_keeps_the_pixels_of_a_three_image_batch(runner: SDXLPipelineRunner) -> None:
    unsliced = SDXLPipelineRunner.build(Settings(device="cpu", vae_slicing=False))
    requests = [request(seed) for seed in (3, 4, 5)]

    sliced_images = runner.generate(requests)
    whole_images = unsliced.generate(requests)

    assert runner.pipe.vae.use_slicing and not unsliced.pipe.vae.use_slicing
    for sliced, whole in zip(sliced_images, whole_images, strict=True):
        # Decoding one image at a time differs from the batched decode by float noise only.
        assert max_diff(sliced.data, whole.data) <= 1


def test_a_half_precision_sdxl_vae_is_described_as_decoding_in_float32() -> None:
    pipe = build_random_sdxl_pipeline(TINY_CONFIGS, torch.device("meta"), torch.float16)
    meta = torch.device("meta")

    described = apply_acceleration(pipe, pipe.unet, AccelerationOptions(), meta)
    assert (described["dtype"], described["vae_dtype"]) == ("float16", "float32")

    # A VAE fixed for float16 (force_upcast off) decodes in float16.
    pipe.vae.register_to_config(force_upcast=False)
    described = apply_acceleration(pipe, pipe.unet, AccelerationOptions(), meta)
    assert described["vae_dtype"] == "float16"


def test_the_compute_dtype_is_half_on_cuda_only() -> None:
    assert inference_dtype(torch.device("cuda"), torch.float16) == torch.float16
    assert inference_dtype(torch.device("cuda:1"), torch.bfloat16) == torch.bfloat16
    assert inference_dtype(torch.device("cpu"), torch.float16) == torch.float32


def test_an_unknown_attention_backend_fails_the_build_clearly() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown attention backend 'flashy'.*\bflash\b"):
        SDXLPipelineRunner.build(Settings(device="cpu", attention_backend="flashy"))


def test_sdxl_reports_sdpa_when_a_backend_is_set_that_its_processors_ignore() -> None:
    runner = SDXLPipelineRunner.build(Settings(device="cpu", attention_backend="native"))

    assert runner.acceleration["attention_backend"] == "sdpa"
    assert runner.acceleration["attention_backend_requested"] == "native"


def test_a_dispatching_denoiser_gets_the_backend_or_a_clear_error() -> None:
    pipe = build_random_wan_pipeline(
        WAN_TINY_CONFIGS, torch.device("cpu"), torch.float32, torch.float32
    )
    processors = list(pipe.transformer.attn_processors.values())

    assert apply_attention_backend(pipe.transformer, "native") == "native"
    assert {p._attention_backend for p in processors} == {"native"}
    # flash-attn is not installed here: a known name whose package is missing.
    with pytest.raises(ModelLoadError, match="attention backend 'flash' cannot be used"):
        apply_attention_backend(pipe.transformer, "flash")


@pytest.fixture
def compiled() -> Iterator[SDXLPipelineRunner]:
    """A tiny runner with its UNet's blocks compiled by Dynamo's eager backend.

    Inductor on this 2-core CPU took about 60 s for the first call and 25 s per recompile of
    the tiny UNet's blocks (over 100 s compiling the whole UNet); the eager backend runs the
    same capture, guards and warm-up in seconds. Inductor is the service's backend.
    """
    counters.clear()
    runner = SDXLPipelineRunner.build(
        Settings(device="cpu", torch_compile=True), compile_backend="eager"
    )
    yield runner
    torch._dynamo.reset()


def test_torch_compile_warms_up_at_build_so_no_request_compiles(
    compiled: SDXLPipelineRunner, runner: SDXLPipelineRunner
) -> None:
    description = compiled.acceleration
    assert description["compiled"] is True
    assert description["compile_scope"] == "repeated_blocks"
    assert description["warm_up_s"] > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the warm-up compiled"

    reference = {"reference_image": reference_png(), "reference_strength": 0.6}
    batches = [[request(seed) for seed in range(n)] for n in (1, 2, 4)]
    for kind in ReferenceType:
        batches += [
            [request(seed, reference_type=kind, **reference) for seed in range(n)] for n in (1, 2)
        ]
    outputs = [compiled.generate(batch) for batch in batches]

    assert counters["stats"]["unique_graphs"] == graphs, "no request paid for a compile"
    for batch, images in zip(batches, outputs, strict=True):
        for single, image in zip(batch, images, strict=True):
            assert max_diff(image.data, runner.generate([single])[0].data) <= 2

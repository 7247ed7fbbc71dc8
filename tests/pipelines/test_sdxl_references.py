"""Reference types on the tiny profile: real SDXL pipelines with a small random IP-Adapter."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ourvidz_serve.catalog import ReferenceType
from ourvidz_serve.errors import ModelLoadError
from ourvidz_serve.pipelines.base import ImageRequest
from ourvidz_serve.pipelines.encode import decode_png
from ourvidz_serve.pipelines.sdxl import (
    REFERENCE_MODES,
    SDXL_BASE_CONFIGS,
    SDXL_IP_ADAPTER_IMAGE_ENCODER_CONFIG,
    TINY_CONFIGS,
    TINY_IMAGE_ENCODER_CONFIG,
    SDXLPipelineRunner,
    build_random_ip_adapter,
    build_random_sdxl_pipeline,
)
from ourvidz_serve.settings import ModelProfile, Settings
from tests.pipelines.sdxl_support import image_request

STEPS = 4
STYLE, COMPOSITION, CHARACTER = (
    ReferenceType.STYLE,
    ReferenceType.COMPOSITION,
    ReferenceType.CHARACTER,
)
GREY, RED, BLUE, GREEN = (128, 128, 128), (230, 20, 20), (20, 20, 230), (20, 200, 20)


@pytest.fixture(scope="module")
def runner() -> SDXLPipelineRunner:
    return SDXLPipelineRunner.build(Settings(device="cpu"))


def landscape_reference() -> bytes:
    """2:1, grey, a red band on the left edge, a blue one on the right, a green centre."""
    image = Image.new("RGB", (128, 64), GREY)
    image.paste(RED, (0, 0, 12, 64))
    image.paste(BLUE, (116, 0, 128, 64))
    image.paste(GREEN, (52, 20, 76, 44))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


REFERENCE = landscape_reference()


def request(seed: int, reference_type: ReferenceType = STYLE, **changes: Any) -> ImageRequest:
    reference = {
        "steps": STEPS,
        "reference_image": REFERENCE,
        "reference_strength": 0.7,
        "reference_type": reference_type,
    }
    prompt = str(changes.pop("prompt", "a knight in a forest"))
    return image_request(seed, prompt, **(reference | changes))


def progress_into(progress: list[tuple[int, int]]) -> Callable[[int, int], None]:
    return lambda step, total: progress.append((step, total))


def pixels(data: bytes) -> np.ndarray:
    return decode_png(data).astype(np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@contextmanager
def recorded_calls(modules: dict[str, torch.nn.Module]) -> Iterator[list[str]]:
    """Names of ``modules`` in the order their forward ran (forward hooks; nothing replaced)."""
    calls: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in modules.items()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def init_images(runner: SDXLPipelineRunner) -> Iterator[list[torch.Tensor]]:
    """The images img2img hands the VAE encoder, in [-1, 1], as the pipeline really ran."""
    seen: list[torch.Tensor] = []
    handle = runner.pipe.vae.encoder.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].detach().clone())
    )
    try:
        yield seen
    finally:
        handle.remove()


def image_encoder(runner: SDXLPipelineRunner) -> torch.nn.Module:
    encoder = runner.pipe.image_encoder
    assert isinstance(encoder, torch.nn.Module), "an IP-Adapter brings its image encoder"
    return encoder


def ip_key_layers(runner: SDXLPipelineRunner) -> dict[str, torch.nn.Module]:
    """The IP-Adapter's key projection of every cross-attention layer, by layer name."""
    return {
        name.removesuffix(".to_k_ip.0"): module
        for name, module in runner.pipe.unet.named_modules()
        if name.endswith("to_k_ip.0")
    }


def test_the_three_types_give_different_images_from_the_same_reference_seed_and_prompt(
    runner: SDXLPipelineRunner,
) -> None:
    images = {kind: runner.generate([request(21, kind)])[0] for kind in ReferenceType}

    for a, b in [(STYLE, COMPOSITION), (STYLE, CHARACTER), (COMPOSITION, CHARACTER)]:
        assert max_diff(images[a].data, images[b].data) > 10, f"{a} and {b} look alike"


def test_style_and_character_run_the_ip_adapter_and_composition_does_not(
    runner: SDXLPipelineRunner,
) -> None:
    assert runner.ip_adapter, "the tiny profile builds a random IP-Adapter"
    layers = ip_key_layers(runner)
    watched = {"image_encoder": image_encoder(runner), **layers}

    used: dict[ReferenceType | None, list[str]] = {}
    for kind in [*ReferenceType, None]:
        changes = {"reference_image": None} if kind is None else {}
        with recorded_calls(watched) as calls:
            runner.generate([request(3, kind or STYLE, **changes)])
        used[kind] = calls

    steps = {kind: mode.denoising_steps(STEPS, 0.7) for kind, mode in REFERENCE_MODES.items()}
    # One encoder pass per call for the reference; the adapter's layers at every step.
    assert used[STYLE].count("image_encoder") == 1
    assert used[CHARACTER].count("image_encoder") == 1
    # Style weights only InstantStyle's style layer: the first up block's second attention.
    style_layers = {name for name in used[STYLE] if name != "image_encoder"}
    assert style_layers and all(
        name.startswith("up_blocks.0.attentions.1.") for name in style_layers
    )
    assert len(used[STYLE]) == 1 + steps[STYLE] * len(style_layers)
    # Character weights every cross-attention layer.
    assert {name for name in used[CHARACTER] if name != "image_encoder"} == set(layers)
    assert len(used[CHARACTER]) == 1 + steps[CHARACTER] * len(layers)
    # Composition and text-to-image keep the adapter at weight 0: diffusers skips it.
    assert used[COMPOSITION] == []
    assert used[None] == []


def test_composition_keeps_the_whole_reference_while_style_and_character_crop(
    runner: SDXLPipelineRunner,
) -> None:
    seen: dict[ReferenceType, np.ndarray] = {}
    for kind in ReferenceType:
        with init_images(runner) as images:
            runner.generate([request(5, kind)])
        [image] = images
        seen[kind] = ((image[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()

    def share(image: np.ndarray, color: tuple[int, int, int]) -> float:
        return float((np.abs(image - np.array(color)).max(axis=-1) < 40).mean())

    width, height = runner.output_size(1024, 1024)
    composition = seen[COMPOSITION]
    assert composition.shape == (height, width, 3)
    # Letterboxed: a 2:1 reference in a square leaves bars of a quarter height above and below,
    # in the reference's mean colour; the full width, red and blue edges included, is kept.
    bar = height // 4
    for rows in (composition[: bar - 1], composition[-bar + 1 :]):
        assert np.ptp(rows.reshape(-1, 3), axis=0).max() <= 2, "a flat bar"
    mean = np.asarray(Image.open(io.BytesIO(REFERENCE)).convert("RGB")).reshape(-1, 3).mean(0)
    assert np.abs(composition[0, 0] - mean).max() <= 2
    assert share(composition, RED) > 0.02 and share(composition, BLUE) > 0.02

    # Covered: the centre of the reference fills the frame and the edges are cut off.
    for kind in (STYLE, CHARACTER):
        assert share(seen[kind], RED) == 0 and share(seen[kind], BLUE) == 0, kind
    # Character cuts 10 % more from every edge: the centred subject is framed larger.
    assert share(seen[CHARACTER], GREEN) > 1.2 * share(seen[STYLE], GREEN)


def test_a_reference_image_is_reproducible_alone_and_in_a_batch(
    runner: SDXLPipelineRunner,
) -> None:
    other = io.BytesIO()
    Image.new("RGB", (40, 90), BLUE).save(other, format="PNG")
    mine = request(9, STYLE)
    neighbour = request(10, STYLE, reference_image=other.getvalue(), prompt="a castle")

    first = runner.generate([mine])[0]
    again = runner.generate([mine])[0]
    with recorded_calls({"image_encoder": image_encoder(runner)}) as calls:
        batched = runner.generate([neighbour, mine])

    assert first.data == again.data, "same inputs, same pixels"
    assert calls == ["image_encoder"], "both references share one batched call"
    # diffusers alone would give every prompt both references; here each keeps its own.
    assert max_diff(batched[1].data, first.data) <= 2


def test_requests_of_different_types_run_in_separate_calls_each_as_if_alone(
    runner: SDXLPipelineRunner,
) -> None:
    requests = [request(30, kind) for kind in ReferenceType]
    progress: list[tuple[int, int]] = []
    together = runner.generate(requests, on_step=lambda step, total: progress.append((step, total)))
    alone = [runner.generate([r])[0] for r in requests]

    total = sum(REFERENCE_MODES[kind].denoising_steps(STEPS, 0.7) for kind in ReferenceType)
    assert progress == [(step, total) for step in range(1, total + 1)], "one call per type"
    for a, b in zip(together, alone, strict=True):
        assert max_diff(a.data, b.data) <= 2


@pytest.mark.parametrize("strength", [0.1, 0.35, 0.7, 1.0])
def test_each_type_maps_strength_to_the_steps_diffusers_runs(
    runner: SDXLPipelineRunner, strength: float
) -> None:
    steps = 15  # sdxl_image_fast: every strength the API accepts leaves a step for every type
    for kind, mode in REFERENCE_MODES.items():
        low, high = mode.denoise
        assert mode.denoising_strength(strength) == pytest.approx(low + (high - low) * strength)
        progress: list[tuple[int, int]] = []
        runner.generate(
            [request(1, kind, steps=steps, reference_strength=strength)],
            on_step=progress_into(progress),
        )
        expected = mode.denoising_steps(steps, strength)
        assert expected >= 1
        assert progress == [(step, expected) for step in range(1, expected + 1)], kind

    # A stronger reference leaves less to redraw; composition keeps the most of it, style the
    # least (it always redraws the layout).
    strengths = {kind: REFERENCE_MODES[kind].denoising_strength for kind in ReferenceType}
    assert all(strengths[kind](strength) < strengths[kind](strength / 2) for kind in strengths)
    assert (
        strengths[COMPOSITION](strength)
        < strengths[CHARACTER](strength)
        < strengths[STYLE](strength)
        <= 1.0
    )


def save_ip_adapter_folder(root: Path, weight_name: str) -> dict[str, torch.Tensor]:
    """A random tiny IP-Adapter in h94/IP-Adapter's layout; returns its flat state dict."""
    unet = build_random_sdxl_pipeline(TINY_CONFIGS, torch.device("cpu"), torch.float32).unet
    adapter = build_random_ip_adapter(
        unet, TINY_IMAGE_ENCODER_CONFIG, torch.device("cpu"), torch.float32, seed=7
    )
    flat = {
        f"{part}.{key}": tensor.contiguous()
        for part, tensors in adapter.state_dict.items()
        for key, tensor in tensors.items()
    }
    (root / "sdxl_models").mkdir(parents=True)
    save_file(flat, root / "sdxl_models" / weight_name)
    adapter.image_encoder.save_pretrained(root / "sdxl_models" / "image_encoder")
    return flat


def test_weights_profile_loads_a_local_ip_adapter_for_style_and_character(
    tmp_path: Path,
) -> None:
    build_random_sdxl_pipeline(TINY_CONFIGS, torch.device("cpu"), torch.float32).save_pretrained(
        tmp_path / "sdxl"
    )
    saved = save_ip_adapter_folder(tmp_path / "ip-adapter", "ip-adapter_sdxl.safetensors")
    settings = Settings(
        device="cpu",
        model_profile=ModelProfile.WEIGHTS,
        sdxl_checkpoint=tmp_path / "sdxl",
        sdxl_ip_adapter=tmp_path / "ip-adapter",
    )
    loaded = SDXLPipelineRunner.build(settings)

    assert loaded.ip_adapter
    first_key_layer = next(iter(ip_key_layers(loaded).values()))
    assert isinstance(first_key_layer, torch.nn.Linear)
    assert torch.equal(first_key_layer.weight, saved["ip_adapter.1.to_k_ip.weight"])
    with recorded_calls({"image_encoder": image_encoder(loaded)}) as calls:
        asset = loaded.generate([request(2, CHARACTER, width=64, height=64)])[0]
    assert calls == ["image_encoder"]
    assert decode_png(asset.data).shape == (64, 64, 3)


def test_weights_profile_with_a_missing_ip_adapter_fails_loudly(tmp_path: Path) -> None:
    build_random_sdxl_pipeline(TINY_CONFIGS, torch.device("cpu"), torch.float32).save_pretrained(
        tmp_path / "sdxl"
    )
    settings = Settings(
        device="cpu",
        model_profile=ModelProfile.WEIGHTS,
        sdxl_checkpoint=tmp_path / "sdxl",
        sdxl_ip_adapter=tmp_path / "no-such-adapter",
    )
    with pytest.raises(ModelLoadError, match=r"IP-Adapter weights .* do not exist"):
        SDXLPipelineRunner.build(settings)


def test_full_random_builds_the_ip_adapter_sdxl_architecture() -> None:
    unet = build_random_sdxl_pipeline(SDXL_BASE_CONFIGS, torch.device("meta"), torch.float16).unet
    adapter = build_random_ip_adapter(
        unet, SDXL_IP_ADAPTER_IMAGE_ENCODER_CONFIG, torch.device("meta"), torch.float16
    )

    encoder_parameters = sum(p.numel() for p in adapter.image_encoder.parameters())
    assert encoder_parameters == 1_844_907_264  # OpenCLIP ViT-bigG/14 vision tower + projection
    assert adapter.state_dict["image_proj"]["proj.weight"].shape == (4 * 2048, 1280)
    # ip-adapter_sdxl.safetensors: keys and values for SDXL's 70 cross-attention layers.
    keys = adapter.state_dict["ip_adapter"]
    assert sorted({int(key.split(".")[0]) for key in keys}) == list(range(1, 140, 2))
    assert keys["1.to_k_ip.weight"].shape == (640, 2048)

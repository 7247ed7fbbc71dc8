"""Per-request LoRAs on the tiny SDXL runner: real diffusers/PEFT adapters, random weights."""

from __future__ import annotations

import copy
import io
import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import (
    convert_all_state_dict_to_peft,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load, save
from torch._dynamo.utils import counters

from ourvidz_serve.catalog import ReferenceType
from ourvidz_serve.errors import InvalidRequest, LoraRejected
from ourvidz_serve.pipelines.base import ImageRequest, LoraWeight
from ourvidz_serve.pipelines.encode import decode_png
from ourvidz_serve.pipelines.lora import LoraNotLoaded, random_sdxl_lora, sha256_digest
from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner
from ourvidz_serve.security.loras import inspect_lora
from ourvidz_serve.settings import Settings
from tests.pipelines.sdxl_support import image_request

STEPS = 3


@pytest.fixture(scope="module")
def runner() -> SDXLPipelineRunner:
    """This module's own runner: its cache and adapters are this file's business."""
    return SDXLPipelineRunner.build(Settings(device="cpu"))


@pytest.fixture(scope="module")
def files(runner: SDXLPipelineRunner) -> dict[str, bytes]:
    """LoRA files for the tiny pipeline; ``a`` and ``a_kohya`` are one LoRA in two namings."""
    pipe = runner.pipe
    return {
        "a": random_sdxl_lora(pipe, seed=1),
        "a_kohya": random_sdxl_lora(pipe, seed=1, naming="kohya"),
        "a_unet_only": random_sdxl_lora(pipe, seed=1, text_encoders=False),
        "b": random_sdxl_lora(pipe, seed=2, rank=8),
        "c": random_sdxl_lora(pipe, seed=3, rank=2, naming="kohya"),
    }


def add(runner: SDXLPipelineRunner, data: bytes) -> str:
    digest = sha256_digest(data)
    runner.add_lora(digest, data)
    return digest


def request(seed: int, *loras: tuple[str, float], **changes: Any) -> ImageRequest:
    weights = tuple(LoraWeight(digest, scale) for digest, scale in loras)
    return image_request(seed, "a lighthouse at dusk", steps=STEPS, loras=weights, **changes)


def reference_png() -> bytes:
    image = Image.new("RGB", (48, 40), (200, 60, 30))
    image.paste((20, 40, 200), (8, 8, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(decode_png(a).astype(np.int16) - decode_png(b).astype(np.int16)).max())


def one(runner: SDXLPipelineRunner, req: ImageRequest) -> bytes:
    return runner.generate([req])[0].data


def test_a_lora_changes_the_image_and_kohya_and_diffusers_naming_load_the_same(
    runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    diffusers_named = add(runner, files["a"])
    kohya_named = add(runner, files["a_kohya"])

    base = one(runner, request(4))
    with_diffusers = one(runner, request(4, (diffusers_named, 1.0)))
    with_kohya = one(runner, request(4, (kohya_named, 1.0)))

    assert max_diff(with_diffusers, base) > 10
    # kohya's file: SGM block names, lora_te1/te2, alpha = rank / 2 with lora_up scaled back.
    assert max_diff(with_kohya, with_diffusers) <= 1, "both namings are one LoRA"


def with_alpha_metadata(data: bytes, alpha: int) -> bytes:
    """``data`` (diffusers naming, rank 4) with diffusers' adapter metadata, lora_alpha
    ``alpha``."""
    tensors = load(data)
    metadata: dict[str, Any] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        modules = {
            key.removeprefix(f"{component}.").rsplit(".lora_", 1)[0]
            for key in tensors
            if key.split(".")[0] == component
        }
        if component == "text_encoder":  # CLIPTextModel has no text_model in transformers 5
            modules = {m.removeprefix("text_model.") for m in modules}
        metadata |= {
            f"{component}.r": 4,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": sorted(modules),
        }
    return save(tensors, metadata={"lora_adapter_metadata": json.dumps(metadata)})


@pytest.mark.parametrize("kind", ["kohya", "diffusers-with-alpha-metadata"])
def test_a_lora_gives_the_pixels_of_diffusers_loading_the_same_file(
    files: dict[str, bytes], tmp_path: Path, kind: str
) -> None:
    data = files["a_kohya"] if kind == "kohya" else with_alpha_metadata(files["a"], alpha=12)
    ours = SDXLPipelineRunner.build(Settings(device="cpu"))
    theirs = SDXLPipelineRunner.build(Settings(device="cpu"))
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data)
    # diffusers' own loader, from the file; a request without LoRAs leaves it as it is.
    theirs.pipe.load_lora_weights(str(path), adapter_name="theirs")
    theirs.pipe.set_adapters(["theirs"], adapter_weights=[0.8])

    image = one(ours, request(6, (add(ours, data), 0.8)))
    assert max_diff(image, one(theirs, request(6))) <= 1
    assert max_diff(image, one(ours, request(6))) > 10


def test_the_text_encoder_layers_of_a_lora_take_effect(
    runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    # Same seed: the same UNet layers; one file also adapts both CLIP encoders.
    whole = add(runner, files["a"])
    unet_only = add(runner, files["a_unet_only"])

    with_text = one(runner, request(4, (whole, 1.0)))
    assert max_diff(with_text, one(runner, request(4, (unet_only, 1.0)))) > 5


def test_scale_zero_gives_the_base_image_byte_for_byte(
    runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    digest = add(runner, files["a"])
    assert one(runner, request(9, (digest, 0.0))) == one(runner, request(9))


def test_lora_images_are_reproducible_alone_and_in_a_batch(
    runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    a, b = add(runner, files["a"]), add(runner, files["b"])
    requests = [
        request(5, (a, 1.0)),
        request(6, (a, 1.0)),
        request(7),
        request(8, (b, 0.8), (a, 0.5)),
    ]
    batched = runner.generate(requests)
    alone = [one(runner, r) for r in requests]

    for together, single in zip(batched, alone, strict=True):
        assert max_diff(together.data, single) <= 2
    assert one(runner, requests[0]) == alone[0], "the same request, the same PNG"


def test_requests_share_a_pipeline_call_only_with_the_same_loras_and_scales(
    runner: SDXLPipelineRunner, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = add(runner, files["a"]), add(runner, files["b"])
    calls: list[list[int]] = []
    real_call = runner._call

    def spy(items: Any, progress: Any) -> Any:
        calls.append([item.request.seed for item in items])
        return real_call(items, progress)

    monkeypatch.setattr(runner, "_call", spy)
    runner.generate([request(1, (a, 1.0)), request(2, (a, 1.0))])
    assert calls == [[1, 2]]

    calls.clear()
    before = runner.lora_stats
    runner.generate([request(1, (a, 1.0)), request(2, (b, 1.0)), request(3, (a, 0.5))])
    assert calls == [[1], [2], [3]]
    # The first group keeps the adapters of the call before it; then two switches.
    assert runner.lora_stats.switches - before.switches == 2

    calls.clear()
    # Order matters (adapters add up in order); a LoRA at scale 0 is the base model.
    runner.generate(
        [request(1, (a, 1.0), (b, 1.0)), request(2, (b, 1.0), (a, 1.0)), request(3, (a, 0.0))]
    )
    assert sorted(calls) == [[1], [2], [3]]
    runner.generate([request(4), request(5, (b, 0.0))])
    assert calls[-1] == [4, 5]


def test_a_job_without_loras_is_the_same_after_lora_jobs_ran(
    runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    fresh = SDXLPipelineRunner.build(Settings(device="cpu"))  # never saw an adapter
    plain = [request(3), request(4, reference_image=reference_png(), reference_strength=0.6)]
    before = [asset.data for asset in fresh.generate(plain)]

    a, c = add(runner, files["a"]), add(runner, files["c"])
    runner.generate([request(1, (a, 1.0)), request(2, (c, 0.7), (a, 1.0))])
    after = [asset.data for asset in runner.generate(plain)]

    assert after == before


def test_a_reference_job_with_a_lora_runs_and_differs_from_one_without(
    runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    # The image-to-image pipeline runs on the same modules: what the text-to-image one loads.
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert getattr(runner.img2img, name) is getattr(runner.pipe, name)
    processors = dict(runner.pipe.unet.attn_processors)
    digest = add(runner, files["a"])
    for kind in (ReferenceType.STYLE, ReferenceType.CHARACTER):  # the IP-Adapter runs
        reference = {
            "reference_image": reference_png(),
            "reference_strength": 0.5,
            "reference_type": kind,
        }
        with_lora = one(runner, request(2, (digest, 1.0), **reference))
        without = one(runner, request(2, **reference))
        assert max_diff(with_lora, without) > 10, kind
    # PEFT wraps the Linear layers; the IP-Adapter's attention processors stay as they were.
    assert runner.pipe.unet.attn_processors == processors


def test_the_cpu_cache_evicts_the_least_recently_used_lora(files: dict[str, bytes]) -> None:
    runner = SDXLPipelineRunner.build(Settings(device="cpu", sdxl_lora_cache=2))
    a, b = add(runner, files["a"]), add(runner, files["b"])
    assert runner.resident_loras() == [a, b]

    runner.generate([request(1, (a, 1.0))])  # a is now the most recent
    assert runner.resident_loras() == [b, a]
    c = add(runner, files["c"])
    assert runner.resident_loras() == [a, c], "b was the least recently used"

    add(runner, files["a"])  # cached: marked used, not parsed again
    assert runner.resident_loras() == [c, a]
    assert runner.lora_stats.as_dict() == {
        "loads": 3,
        "evictions": 1,
        "activations": 1,
        "switches": 1,
    }
    with pytest.raises(LoraNotLoaded, match=b[:12]):
        runner.generate([request(1, (b, 1.0))])


def test_a_lora_not_in_the_cache_is_refused_before_any_model_time(
    runner: SDXLPipelineRunner,
) -> None:
    unknown = sha256_digest(b"never added")
    steps: list[int] = []
    bad = request(1, (unknown, 1.0))
    with pytest.raises(InvalidRequest, match="not loaded"):
        runner.generate([request(2), bad], on_step=lambda step, total: steps.append(step))
    assert steps == []
    with pytest.raises(LoraNotLoaded):
        runner.validate([bad])


def test_a_lora_evicted_while_a_call_runs_is_still_applied_by_that_call(
    files: dict[str, bytes],
) -> None:
    runner = SDXLPipelineRunner.build(Settings(device="cpu", sdxl_lora_cache=1))
    a = add(runner, files["a"])
    requests = [request(4), request(3, (a, 1.0))]  # the LoRA group runs second
    expected = [asset.data for asset in runner.generate(requests)]
    started, evicted = threading.Event(), threading.Event()

    def on_step(step: int, total: int) -> None:
        started.set()
        evicted.wait(10)

    result: list[list[bytes]] = []
    worker = threading.Thread(
        target=lambda: result.append([x.data for x in runner.generate(requests, on_step)])
    )
    worker.start()
    assert started.wait(10)
    add(runner, files["b"])  # add_lora does not wait for the call; a leaves the cache
    evicted.set()
    worker.join(30)

    assert runner.resident_loras() == [sha256_digest(files["b"])]
    assert result == [expected], "the call loaded a from the parsed copy it took at its start"


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


WRONG_WIDTH = _safetensors(
    {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (
            torch.zeros(4, 640)
        ),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (
            torch.zeros(640, 4)
        ),
    }
)
UNKNOWN_LAYER = _safetensors(
    {
        "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64),
        "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4),
    }
)
NOT_A_LORA = _safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)})


def conv_lora() -> bytes:
    """A kohya LoCon-style LoRA on one ResNet convolution (SGM name: input_blocks.1.0)."""
    generator = torch.Generator().manual_seed(0)
    name = "lora_unet_input_blocks_1_0_in_layers_2"  # down_blocks.0.resnets.0.conv1
    return _safetensors(
        {
            f"{name}.lora_down.weight": torch.randn(4, 32, 3, 3, generator=generator) * 0.2,
            f"{name}.lora_up.weight": torch.randn(32, 4, 1, 1, generator=generator) * 0.5,
            f"{name}.alpha": torch.tensor(4.0),
        }
    )


def test_a_convolution_lora_runs_on_an_uncompiled_runner(runner: SDXLPipelineRunner) -> None:
    digest = add(runner, conv_lora())
    assert max_diff(one(runner, request(2, (digest, 1.0))), one(runner, request(2))) > 5


@pytest.mark.parametrize(
    "data",
    [b"definitely not safetensors", NOT_A_LORA, WRONG_WIDTH, UNKNOWN_LAYER],
    ids=["garbage", "not-a-lora", "wrong-width", "unknown-layer"],
)
def test_files_that_are_not_an_sdxl_lora_for_this_pipeline_are_refused(
    runner: SDXLPipelineRunner, data: bytes
) -> None:
    stats = runner.lora_stats
    with pytest.raises(LoraRejected) as raised:
        runner.add_lora(sha256_digest(data), data)
    assert isinstance(raised.value, InvalidRequest)
    assert sha256_digest(data) not in runner.resident_loras()
    assert runner.lora_stats == stats


def test_a_digest_that_is_not_the_files_sha256_and_a_rank_above_the_limit_are_refused(
    files: dict[str, bytes],
) -> None:
    runner = SDXLPipelineRunner.build(Settings(device="cpu", sdxl_lora_max_rank=4))
    with pytest.raises(LoraRejected, match="sha256"):
        runner.add_lora(sha256_digest(files["a"]), files["c"])
    with pytest.raises(LoraRejected, match="rank 8; the limit is 4"):
        add(runner, files["b"])
    assert runner.resident_loras() == []


@pytest.fixture
def compiled() -> Iterator[SDXLPipelineRunner]:
    """A compiled tiny runner (Dynamo's eager backend, as test_accel) with two rank-8 slots."""
    counters.clear()
    settings = Settings(
        device="cpu", torch_compile=True, sdxl_max_loras_per_job=2, sdxl_lora_max_rank=8
    )
    yield SDXLPipelineRunner.build(settings, compile_backend="eager")
    torch._dynamo.reset()


def test_switching_loras_on_a_compiled_unet_never_recompiles(
    compiled: SDXLPipelineRunner, runner: SDXLPipelineRunner, files: dict[str, bytes]
) -> None:
    for name in ("a", "b", "c"):
        add(runner, files[name])
    a, b, c = (add(compiled, files[name]) for name in ("a", "b", "c"))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the warm-up compiled"
    to_q = compiled.pipe.unet.get_submodule(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    # Every slot was padded to the highest rank before compiling; a swap only copies into it.
    assert {to_q.lora_A[slot].weight.shape[0] for slot in ("slot0", "slot1")} == {8}
    reference = {"reference_image": reference_png(), "reference_strength": 0.6}
    sequence = [
        [request(1)],
        [request(1, (a, 1.0))],
        [request(2, (b, 0.7)), request(3, (b, 0.7))],
        [request(1, (a, 1.0), (c, -0.5)), request(4)],
        [request(5, (c, 1.0), **reference)],
        [request(1)],
        [request(6, (b, 1.0), (a, 0.3))],
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = [compiled.generate(batch) for batch in sequence]

    assert counters["stats"]["unique_graphs"] == graphs, "no switch compiled anything"
    for batch, images in zip(sequence, outputs, strict=True):
        for single, image in zip(batch, images, strict=True):
            assert max_diff(image.data, one(runner, single)) <= 2
    assert compiled.lora_stats.activations >= 5  # hot-swaps and text-encoder loads

    with pytest.raises(LoraRejected, match="compiled"):
        add(compiled, conv_lora())  # slots cover the Linear layers only
    with pytest.raises(LoraRejected, match="the limit is 8"):
        add(compiled, random_sdxl_lora(runner.pipe, rank=16))


PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_trained_files(runner: SDXLPipelineRunner) -> tuple[bytes, bytes]:
    """A LoRA as diffusers' trainers make one: PEFT's adapter on a copy of the tiny UNet
    (lora_B drawn at random, as training would leave it), saved by
    ``save_lora_weights`` in diffusers naming and converted with
    ``convert_state_dict_to_kohya`` (their ``--output_kohya_format``) in kohya naming."""
    unet = copy.deepcopy(runner.pipe.unet)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=PEFT_TARGETS)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    with tempfile.TemporaryDirectory() as folder:
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers)
        diffusers_named = (Path(folder) / "pytorch_lora_weights.safetensors").read_bytes()
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load(diffusers_named)))
    return diffusers_named, save({name: t.contiguous() for name, t in kohya.items()})


def test_a_lora_made_with_peft_passes_the_upload_check_and_runs_in_both_namings(
    runner: SDXLPipelineRunner,
) -> None:
    diffusers_named, kohya_named = peft_trained_files(runner)
    infos = [
        inspect_lora(data, max_rank=128, max_bytes=1 << 30)
        for data in (diffusers_named, kohya_named)
    ]
    assert [(info.format, info.rank, info.targets) for info in infos] == [
        ("diffusers", 4, ("unet",)),
        ("kohya", 4, ("unet",)),
    ]
    base = one(runner, request(6))
    images = [
        one(runner, request(6, (add(runner, data), 1.0))) for data in (diffusers_named, kohya_named)
    ]
    assert max_diff(images[0], base) > 10
    assert max_diff(images[1], images[0]) == 0, "one LoRA in two namings"

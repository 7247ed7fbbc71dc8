"""Uploaded SDXL LoRA checks: the safetensors container, the tensor names, pairs, rank, dtype.

Files are built by hand (length, JSON header, zero-filled data) so that each test can break
exactly one rule; safetensors itself reads the well-formed ones and refuses the broken layouts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import time
import tracemalloc
from collections.abc import Mapping, Sequence

import pytest
import safetensors
import safetensors.torch
import torch

from ourvidz_serve.errors import LoraRejected
from ourvidz_serve.security.loras import MAX_HEADER_BYTES, LoraInfo, inspect_lora

MAX_RANK = 64
MAX_BYTES = 1 << 30

DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "F8_E4M3": 1, "I64": 8, "BOOL": 1}

TensorSpecs = Mapping[str, tuple[str, Sequence[int]]]
"""name -> (safetensors dtype, shape)"""


def safetensors_file(
    tensors: TensorSpecs, *, metadata: Mapping[str, object] | None = None, header_length: int = 0
) -> bytes:
    """A .safetensors file of zero-filled tensors, laid out one after another in the given order.
    ``header_length`` pads the header with spaces (as safetensors does) up to that length."""
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return raw_file(header, bytes(offset), header_length=header_length)


def raw_file(header: object, data: bytes = b"", *, header_length: int = 0) -> bytes:
    """The 8-byte little-endian header length, the header (JSON unless given as bytes), data."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    encoded = encoded.ljust(header_length, b" ")
    return struct.pack("<Q", len(encoded)) + encoded + data


def kohya_pair(
    module: str, rank: int, shape_in: Sequence[int], out: int, *, dtype: str = "F16"
) -> dict[str, tuple[str, Sequence[int]]]:
    """kohya's tensors for one layer: linear when ``shape_in`` is [in], conv when [in, kh, kw]."""
    up_tail = [1, 1] if len(shape_in) == 3 else []
    return {
        f"{module}.lora_down.weight": (dtype, [rank, *shape_in]),
        f"{module}.lora_up.weight": (dtype, [out, rank, *up_tail]),
        f"{module}.alpha": ("F32", []),
    }


def diffusers_pair(
    module: str,
    rank: int,
    shape_in: Sequence[int],
    out: int,
    *,
    dtype: str = "BF16",
    spelling: tuple[str, str] = ("lora_A.weight", "lora_B.weight"),
) -> dict[str, tuple[str, Sequence[int]]]:
    up_tail = [1, 1] if len(shape_in) == 3 else []
    down, up = spelling
    return {
        f"{module}.{down}": (dtype, [rank, *shape_in]),
        f"{module}.{up}": (dtype, [out, rank, *up_tail]),
    }


def inspect(data: bytes, **limits: int) -> LoraInfo:
    return inspect_lora(
        data,
        max_rank=limits.get("max_rank", MAX_RANK),
        max_bytes=limits.get("max_bytes", MAX_BYTES),
    )


# kohya's SDXL LoRAs name the UNet after the original SGM model kohya trains on.
KOHYA_UNET_ONLY: TensorSpecs = {
    **kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 8, [640], 640),
    **kohya_pair("lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k", 8, [2048], 1280),
    **kohya_pair("lora_unet_middle_block_1_proj_in", 16, [1280], 1280),
    **kohya_pair(
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj", 8, [1280], 10240
    ),
    **kohya_pair("lora_unet_input_blocks_1_0_in_layers_2", 8, [320, 3, 3], 320),
    **kohya_pair("lora_unet_output_blocks_2_2_conv", 4, [1280, 3, 3], 1280),
}
KOHYA_UNET_AND_TEXT_ENCODERS: TensorSpecs = {
    **kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, [768], 768),
    **kohya_pair("lora_te1_text_model_encoder_layers_11_mlp_fc2", 4, [3072], 768),
    **kohya_pair("lora_te2_text_model_encoder_layers_31_mlp_fc1", 4, [1280], 5120),
    **kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", 4, [1280], 1280),
    # LyCORIS spells the same UNet with diffusers' module names, flattened.
    **kohya_pair(
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_out_0", 32, [640], 640
    ),
    **kohya_pair("lora_unet_up_blocks_0_resnets_2_conv_shortcut", 4, [1920, 1, 1], 1280),
}
DIFFUSERS_UNET_ONLY: TensorSpecs = {
    **diffusers_pair(
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 4, [640], 640
    ),
    **diffusers_pair(
        "unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_v", 4, [2048], 1280
    ),
    **diffusers_pair(
        "unet.up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", 4, [5120], 1280
    ),
    **diffusers_pair("unet.down_blocks.0.resnets.1.conv1", 4, [320, 3, 3], 320),
    **diffusers_pair("unet.up_blocks.1.upsamplers.0.conv", 4, [640, 3, 3], 640),
}
# The older diffusers spellings: lora.down/up in the UNet, lora_linear_layer in text encoders.
DIFFUSERS_UNET_AND_TEXT_ENCODERS: TensorSpecs = {
    **diffusers_pair(
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
        12,
        [2048],
        640,
        dtype="F32",
        spelling=("lora.down.weight", "lora.up.weight"),
    ),
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.alpha": ("F32", []),
    **diffusers_pair(
        "text_encoder.text_model.encoder.layers.5.self_attn.k_proj",
        12,
        [768],
        768,
        dtype="F32",
        spelling=("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
    ),
    **diffusers_pair(
        "text_encoder_2.text_model.encoder.layers.20.mlp.fc1",
        12,
        [1280],
        5120,
        dtype="F32",
        spelling=("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
    ),
}

PAIR = kohya_pair("lora_unet_middle_block_1_proj_out", 4, [1280], 1280)
DOWN, UP, ALPHA = PAIR


# -- accepted files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        (KOHYA_UNET_ONLY, ("kohya", 16, "F16", ("unet",))),
        (
            KOHYA_UNET_AND_TEXT_ENCODERS,
            ("kohya", 32, "F16", ("unet", "text_encoder", "text_encoder_2")),
        ),
        (DIFFUSERS_UNET_ONLY, ("diffusers", 4, "BF16", ("unet",))),
        (
            DIFFUSERS_UNET_AND_TEXT_ENCODERS,
            ("diffusers", 12, "F32", ("unet", "text_encoder", "text_encoder_2")),
        ),
    ],
    ids=["kohya-unet", "kohya-unet-te1-te2", "diffusers-unet", "diffusers-unet-te1-te2"],
)
def test_sdxl_loras_are_described_by_their_header(
    tensors: TensorSpecs, expected: tuple[str, int, str, tuple[str, ...]]
) -> None:
    data = safetensors_file(tensors, metadata={"ss_network_dim": "16", "format": "pt"})
    info = inspect(data)
    assert (info.format, info.rank, info.dtype, info.targets) == expected
    assert info.digest == hashlib.sha256(data).hexdigest()
    assert info.size_bytes == len(data)
    assert info.tensors == len(tensors)


@pytest.mark.parametrize(
    "tensors",
    [
        KOHYA_UNET_ONLY,
        KOHYA_UNET_AND_TEXT_ENCODERS,
        DIFFUSERS_UNET_ONLY,
        DIFFUSERS_UNET_AND_TEXT_ENCODERS,
    ],
)
def test_the_hand_built_files_are_ones_safetensors_itself_reads(tensors: TensorSpecs) -> None:
    names = [name for name, _ in safetensors.deserialize(safetensors_file(tensors))]
    assert sorted(names) == sorted(tensors)


def test_a_file_written_by_safetensors_torch_is_accepted() -> None:
    zeros = torch.zeros
    data = safetensors.torch.save(
        {
            "unet.down_blocks.2.attentions.1.transformer_blocks.4.attn1.to_k.lora_A.weight": zeros(
                8, 1280, dtype=torch.float16
            ),
            "unet.down_blocks.2.attentions.1.transformer_blocks.4.attn1.to_k.lora_B.weight": zeros(
                1280, 8, dtype=torch.float16
            ),
            "unet.conv_in.lora_A.weight": zeros(8, 4, 3, 3, dtype=torch.float16),
            "unet.conv_in.lora_B.weight": zeros(320, 8, 1, 1, dtype=torch.float16),
            "text_encoder.text_model.encoder.layers.3.self_attn.v_proj.lora_A.weight": zeros(
                2, 768, dtype=torch.float16
            ),
            "text_encoder.text_model.encoder.layers.3.self_attn.v_proj.lora_B.weight": zeros(
                768, 2, dtype=torch.float16
            ),
        },
        metadata={"format": "pt"},
    )
    info = inspect(data)
    assert (info.format, info.rank, info.dtype, info.tensors) == ("diffusers", 8, "F16", 6)
    assert info.targets == ("unet", "text_encoder")
    assert info.digest == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "module",
    [
        # kohya, SGM UNet: conv_in, conv_out, the embedding MLPs, ResBlock parts, down/upsampling
        "lora_unet_input_blocks_0_0",
        "lora_unet_out_2",
        "lora_unet_time_embed_0",
        "lora_unet_label_emb_0_2",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_emb_layers_1",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_8_1_transformer_blocks_1_attn1_to_v",
        # kohya, diffusers' UNet names and the old single text encoder prefix
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_time_embedding_linear_1",
        "lora_te_text_model_encoder_layers_5_mlp_fc2",
        # diffusers
        "unet.conv_out",
        "unet.add_embedding.linear_1",
        "unet.time_embedding.linear_2",
        "unet.down_blocks.1.resnets.0.conv_shortcut",
        "unet.down_blocks.0.downsamplers.0.conv",
        "unet.mid_block.resnets.1.time_emb_proj",
        "unet.up_blocks.0.attentions.0.proj_in",
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    ],
)
def test_sdxl_layers_are_accepted_in_each_naming(module: str) -> None:
    if module.startswith("lora_"):
        tensors = kohya_pair(module, 4, [64], 64)
    else:
        tensors = diffusers_pair(module, 4, [64], 64)
    assert inspect(safetensors_file(tensors)).rank == 4


def test_the_metadata_is_allowed_and_ignored() -> None:
    info = inspect(safetensors_file(PAIR, metadata={"ss_base_model_version": "sdxl_base_v1-0"}))
    assert info.tensors == 3


def test_a_file_of_exactly_max_bytes_is_accepted() -> None:
    data = safetensors_file(PAIR)
    assert inspect(data, max_bytes=len(data)).size_bytes == len(data)


def test_a_rank_equal_to_max_rank_is_accepted() -> None:
    assert inspect(safetensors_file(KOHYA_UNET_ONLY), max_rank=16).rank == 16


@pytest.mark.parametrize("alpha_dtype", ["F16", "BF16", "F32", "F64"])
def test_an_alpha_may_be_any_float_dtype(alpha_dtype: str) -> None:
    tensors = {DOWN: PAIR[DOWN], UP: PAIR[UP], ALPHA: (alpha_dtype, [])}
    assert inspect(safetensors_file(tensors)).dtype == "F16"


def test_mixed_matrix_dtypes_report_the_widest() -> None:
    tensors = {
        **kohya_pair("lora_unet_middle_block_1_proj_in", 4, [1280], 1280, dtype="F16"),
        **kohya_pair("lora_unet_middle_block_1_proj_out", 4, [1280], 1280, dtype="F32"),
    }
    assert inspect(safetensors_file(tensors)).dtype == "F32"


def test_a_header_length_starting_with_0x80_is_not_taken_for_a_pickle() -> None:
    data = safetensors_file(PAIR, header_length=0x180)
    assert data[0] == 0x80
    assert inspect(data).tensors == 3


def test_inspecting_reads_the_header_without_copying_tensor_data() -> None:
    # 64 MiB of tensor data: a copy of any of it would show in the peak.
    data = safetensors_file(kohya_pair("lora_unet_middle_block_1_proj_in", 64, [1 << 18], 1 << 18))
    assert len(data) > 64_000_000
    tracemalloc.start()
    try:
        inspect(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


# -- refused: size and container ----------------------------------------------------------------


def test_a_file_over_max_bytes_is_refused_before_it_is_hashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_hashing(*_: object) -> None:
        raise AssertionError("a file over the limit was hashed")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    data = safetensors_file(PAIR)
    with pytest.raises(
        LoraRejected, match=rf"{len(data)} bytes, larger than the limit of 100 bytes"
    ):
        inspect(data, max_bytes=100)


def test_a_file_too_short_for_the_header_length_is_refused() -> None:
    with pytest.raises(LoraRejected, match=r"too short to be a .safetensors file"):
        inspect(b"{}\x00")


def test_a_header_length_beyond_the_end_of_the_file_is_refused() -> None:
    data = safetensors_file(PAIR)
    with pytest.raises(LoraRejected, match=r"header length field says .* but only 10 follow it"):
        inspect(data[: 8 + 10])


def test_a_header_length_above_the_safetensors_limit_is_refused() -> None:
    data = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(LoraRejected, match="more than safetensors' limit"):
        inspect(data)


def test_a_header_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(LoraRejected, match="header is not UTF-8 text"):
        inspect(raw_file(b'{"\xff\xfe": 1}'))


@pytest.mark.parametrize(
    "header",
    [b"{not json}", b'{"a": ', b"[" * 200_000 + b"]" * 200_000],
    ids=["garbage", "cut-short", "nested-past-the-recursion-limit"],
)
def test_a_header_that_is_not_json_is_refused(header: bytes) -> None:
    with pytest.raises(LoraRejected, match="header is not valid JSON"):
        inspect(raw_file(header))


def test_a_header_that_is_not_a_json_object_is_refused() -> None:
    with pytest.raises(LoraRejected, match="header is not a JSON object"):
        inspect(raw_file(b'["lora_unet_out_2.lora_down.weight"]'))


def test_a_pickle_is_refused_as_not_safetensors() -> None:
    buffer = io.BytesIO()
    # The pre-1.6 torch.save format: a bare pickle, as in most .ckpt and old .bin files.
    torch.save({DOWN: torch.zeros(4, 8)}, buffer, _use_new_zipfile_serialization=False)
    assert buffer.getvalue()[0] == 0x80
    with pytest.raises(LoraRejected, match=r"is a pickle .* only \.safetensors LoRAs are accepted"):
        inspect(buffer.getvalue())


def test_a_zip_archive_is_refused_as_not_safetensors() -> None:
    buffer = io.BytesIO()
    torch.save({DOWN: torch.zeros(4, 8)}, buffer)
    assert buffer.getvalue().startswith(b"PK\x03\x04")
    with pytest.raises(LoraRejected, match=r"zip archive .* only \.safetensors LoRAs are accepted"):
        inspect(buffer.getvalue())


def test_a_truncated_file_is_refused() -> None:
    data = safetensors_file(PAIR)
    with pytest.raises(LoraRejected, match=r"the file is truncated: tensor .* ends at byte"):
        inspect(data[:-10])


def layout_file(*ranges: tuple[int, int], data_length: int) -> bytes:
    """F16 tensors with the given byte ranges, sized to match them, over ``data_length`` bytes."""
    header = {
        f"lora_unet_out_2.lora_{index}": {
            "dtype": "F16",
            "shape": [(end - begin) // 2],
            "data_offsets": [begin, end],
        }
        for index, (begin, end) in enumerate(ranges)
    }
    return raw_file(header, bytes(data_length))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (layout_file((0, 8), (4, 12), data_length=12), "tensors .* and .* overlap"),
        (layout_file((0, 8), (10, 18), data_length=18), "bytes 8 to 10 of the data section"),
        (layout_file((2, 10), data_length=10), "bytes 0 to 2 of the data section"),
        (layout_file((0, 8), data_length=12), "the last 4 bytes belong to no tensor"),
    ],
    ids=["overlap", "gap", "gap-at-start", "bytes-after-the-last-tensor"],
)
def test_byte_ranges_that_do_not_tile_the_data_section_are_refused(
    data: bytes, reason: str
) -> None:
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(data)
    with pytest.raises(LoraRejected, match=reason):
        inspect(data)


def test_a_data_length_that_does_not_match_shape_and_dtype_is_refused() -> None:
    header = {DOWN: {"dtype": "F16", "shape": [4, 1280], "data_offsets": [0, 4 * 1280]}}
    data = raw_file(header, bytes(4 * 1280))
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(data)
    with pytest.raises(
        LoraRejected, match=r"shape \[4, 1280\] in F16, which does not fit its 5120"
    ):
        inspect(data)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}, "unknown dtype 'F12'"),
        ({"shape": [1], "data_offsets": [0, 2]}, "has no dtype"),
        ({"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}, "shape that is not a list"),
        ({"dtype": "F16", "shape": [True], "data_offsets": [0, 2]}, "shape that is not a list"),
        ({"dtype": "F16", "shape": [1], "data_offsets": [2, 0]}, "data_offsets that are not"),
        ({"dtype": "F16", "shape": [1], "data_offsets": [0]}, "data_offsets that are not"),
        ([1, 2], "is not described by a JSON object"),
    ],
)
def test_malformed_tensor_entries_are_refused(entry: object, reason: str) -> None:
    with pytest.raises(LoraRejected, match=f"not a valid .safetensors file: tensor .*{reason}"):
        inspect(raw_file({DOWN: entry}, bytes(2)))


def test_a_shape_with_a_million_huge_dimensions_is_refused_quickly() -> None:
    header = {DOWN: {"dtype": "F16", "shape": [1 << 62] * 100_000, "data_offsets": [0, 2]}}
    started = time.monotonic()
    with pytest.raises(LoraRejected, match="shape of 100000 dimensions"):
        inspect(raw_file(header, bytes(2)))
    assert time.monotonic() - started < 5


def test_a_tensor_named_twice_is_refused() -> None:
    entry = '{"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}'
    header = f'{{"{DOWN}": {entry}, "{DOWN}": {entry}}}'.encode()
    with pytest.raises(LoraRejected, match=f"header names '{re.escape(DOWN)}' twice"):
        inspect(raw_file(header, bytes(2)))


@pytest.mark.parametrize("metadata", [{"ss_network_dim": 16}, ["format", "pt"], "pt"])
def test_metadata_that_is_not_a_map_of_strings_is_refused(metadata: object) -> None:
    header = {"__metadata__": metadata}
    with pytest.raises(LoraRejected, match="__metadata__ must map strings to strings"):
        inspect(raw_file(header))


@pytest.mark.parametrize(
    "header", [{}, {"__metadata__": {"format": "pt"}}], ids=["bare", "metadata-only"]
)
def test_a_file_without_tensors_is_refused(header: object) -> None:
    with pytest.raises(LoraRejected, match="contains no tensors"):
        inspect(raw_file(header))


# -- refused: not an SDXL LoRA ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "another model"),
        ("transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight", "another model"),
        ("lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight", "another"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "not a layer of SDXL's UNet"),
        ("lora_unet_blocks_0_self_attn_q.lora_down.weight", "not a layer of SDXL's UNet"),
        ("diffusion_model.blocks.0.cross_attn.k.lora_A.weight", "another model"),
        ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "full model checkpoint"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "full model"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "language model"),
        ("lora_unet_input_blocks_4_1_proj_in.hada_w1_a", "LyCORIS"),
        ("lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight", "LyCORIS"),
        ("lora_unet_middle_block_1_proj_in.dora_scale", "DoRA"),
        ("unet.mid_block.attentions.0.proj_in.lora_A.default.weight", "another model"),
        ("lora_te1_text_model_embeddings_token_embedding.lora_down.weight", "CLIP text encoders"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q.lora_A.weight", "CLIP"),
        ("text_encoder_2.text_projection.lora_A.weight", "CLIP"),
        ("unet.input_blocks.4.1.proj_in.lora_A.weight", "not a layer of SDXL's UNet"),
        ("hello", "full model"),
    ],
)
def test_tensors_of_other_models_and_junk_are_refused_by_name(name: str, why: str) -> None:
    data = safetensors_file({name: ("F16", [4, 64])})
    with pytest.raises(LoraRejected) as refusal:
        inspect(data)
    assert f"tensor {name!r} is not part of an SDXL LoRA" in refusal.value.message
    assert why in refusal.value.message


def test_the_message_names_the_first_offending_tensor() -> None:
    tensors = {
        **PAIR,
        "transformer.proj_out.lora_A.weight": ("F16", [4, 64]),
        "transformer.proj_out.lora_B.weight": ("F16", [64, 4]),
    }
    with pytest.raises(LoraRejected) as refusal:
        inspect(safetensors_file(tensors))
    assert "'transformer.proj_out.lora_A.weight'" in refusal.value.message
    assert "'transformer.proj_out.lora_B.weight'" not in refusal.value.message


def test_a_file_mixing_kohya_and_diffusers_names_is_refused() -> None:
    tensors = {**PAIR, **diffusers_pair("unet.conv_in", 4, [4, 3, 3], 320)}
    with pytest.raises(LoraRejected, match=r"mixes kohya names .* and diffusers names"):
        inspect(safetensors_file(tensors))


@pytest.mark.parametrize(("kept", "missing"), [(DOWN, "up"), (UP, "down")])
def test_a_lone_half_of_a_pair_is_refused(kept: str, missing: str) -> None:
    with pytest.raises(
        LoraRejected, match=rf"{re.escape(kept)}' has no {missing} \([AB]\) partner"
    ):
        inspect(safetensors_file({kept: PAIR[kept], ALPHA: PAIR[ALPHA]}))


def test_an_alpha_without_its_pair_is_refused() -> None:
    with pytest.raises(LoraRejected, match="belongs to no LoRA pair"):
        inspect(safetensors_file({**PAIR, "lora_unet_out_2.alpha": ("F32", [])}))


@pytest.mark.parametrize(
    ("down_shape", "up_shape"),
    [
        ([4, 1280], [1280, 8]),  # ranks differ
        ([4, 1280], [1280, 4, 1, 1]),  # linear down, conv up
        ([4, 320, 3, 3], [320, 4, 3, 3]),  # conv up must be 1x1
        ([4, 1280, 2], [1280, 4]),
        ([0, 1280], [1280, 0]),  # rank 0
    ],
)
def test_pairs_with_inconsistent_shapes_are_refused(
    down_shape: list[int], up_shape: list[int]
) -> None:
    tensors = {DOWN: ("F16", down_shape), UP: ("F16", up_shape)}
    with pytest.raises(LoraRejected, match="do not form a LoRA pair"):
        inspect(safetensors_file(tensors))


def test_an_alpha_that_is_not_a_single_number_is_refused() -> None:
    with pytest.raises(LoraRejected, match="an alpha is a single number"):
        inspect(safetensors_file({**PAIR, ALPHA: ("F32", [4])}))


def test_a_pair_spelled_two_ways_is_refused() -> None:
    module = "unet.mid_block.attentions.0.proj_out"
    tensors = {
        f"{module}.lora_A.weight": ("F16", [4, 1280]),
        f"{module}.lora.up.weight": ("F16", [1280, 4]),
    }
    with pytest.raises(LoraRejected, match="spell one LoRA pair two ways"):
        inspect(safetensors_file(tensors))


def test_one_layer_given_twice_is_refused() -> None:
    tensors = {
        **PAIR,
        # kohya's te and te1 prefixes name the same text encoder.
        **kohya_pair("lora_te_text_model_encoder_layers_0_mlp_fc1", 4, [768], 3072),
        **kohya_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 4, [768], 3072),
    }
    with pytest.raises(LoraRejected, match=r"are both the down \(A\) matrix of one layer"):
        inspect(safetensors_file(tensors))


def test_a_rank_above_max_rank_is_refused() -> None:
    with pytest.raises(LoraRejected, match=r"rank 16 .* more than the limit of 8") as refusal:
        inspect(safetensors_file(KOHYA_UNET_ONLY), max_rank=8)
    assert "lora_unet_middle_block_1_proj_in.lora_down.weight" in refusal.value.message


@pytest.mark.parametrize("dtype", ["I8", "F8_E4M3", "F64"])
def test_a_matrix_dtype_other_than_f16_bf16_f32_is_refused(dtype: str) -> None:
    tensors = {DOWN: (dtype, [4, 1280]), UP: ("F16", [1280, 4])}
    with pytest.raises(LoraRejected, match=f"stored as {dtype}; LoRA matrices must be F16, BF16"):
        inspect(safetensors_file(tensors))


def test_an_integer_alpha_is_accepted_as_diffusers_kohya_conversion_writes_it() -> None:
    assert inspect(safetensors_file({**PAIR, ALPHA: ("I64", [])})).rank == 4


def test_a_boolean_alpha_is_refused() -> None:
    with pytest.raises(LoraRejected, match="an alpha is a number"):
        inspect(safetensors_file({**PAIR, ALPHA: ("BOOL", [])}))

"""Checks an uploaded SDXL LoRA from its .safetensors header alone, before anything is stored.

Plain Python (no torch, no safetensors, no Ray) because it runs in the HTTP ingress. The
header is parsed from the bytes given; tensor data is never read or copied: only its byte
ranges are checked against the header, as safetensors itself does when it opens a file.
Every refusal is a :class:`LoraRejected` whose message says what is wrong with the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ourvidz_serve.errors import LoraRejected

MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the JSON header, so any file it can open passes this check."""

MATRIX_DTYPES = ("F16", "BF16", "F32")
"""What the LoRA matrices may be stored as, narrowest first (``LoraInfo.dtype`` of a mix is
the last of these present)."""

TARGETS = ("unet", "text_encoder", "text_encoder_2")

# Every dtype safetensors 0.8 knows, with its width in bits (F4 and F6 pack below a byte).
_DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# Alphas are scalars read with .item(): any number safetensors.torch can load will do. Integers
# included: diffusers' convert_state_dict_to_kohya (its trainers' --output_kohya_format) writes
# an int64 alpha.
_ALPHA_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
    | {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
)

# Every pickle of protocol 2 or later (torch.save's legacy format) opens with PROTO, protocol.
_PICKLE_STARTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_JSON_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
_ONLY_SAFETENSORS = (
    "only .safetensors LoRAs are accepted; convert it (e.g. with safetensors.torch.save_file) "
    "and upload the .safetensors file"
)

# -- tensor names -------------------------------------------------------------------------------
#
# Module paths are written once with "." between parts; kohya names are the same paths with
# every "." turned into "_" (kohya flattens the module name that way), so each pattern is
# compiled for both separators. The grammar follows SDXL's UNet2DConditionModel and the
# original SGM UNet that kohya trains SDXL on; block and layer indices are not pinned to SDXL's
# counts, so a file is judged by the kind of model its names describe, not by its layout.
# (SD 1.x LoRAs use the same names and pass; their widths differ, which names do not show.)

_ATTENTION_PROJECTION = "(?:attn1|attn2).(?:to_q|to_k|to_v|to_out.0)"
_FEED_FORWARD = "ff.net.(?:0.proj|2)"
_TRANSFORMER = (
    rf"(?:proj_in|proj_out|transformer_blocks.\d+.(?:{_ATTENTION_PROJECTION}|{_FEED_FORWARD}))"
)
_RESNET = "(?:conv1|conv2|time_emb_proj|conv_shortcut)"
_DIFFUSERS_UNET = (
    r"(?:(?:down_blocks|up_blocks).\d+.(?:"
    rf"resnets.\d+.{_RESNET}|attentions.\d+.{_TRANSFORMER}|(?:downsamplers|upsamplers).0.conv)"
    rf"|mid_block.(?:resnets.\d+.{_RESNET}|attentions.\d+.{_TRANSFORMER})"
    "|conv_in|conv_out|(?:time_embedding|add_embedding).(?:linear_1|linear_2))"
)
# SGM (kohya's SDXL UNet): input_blocks.0.0 is conv_in, out.2 conv_out, time_embed and
# label_emb the two embedding MLPs; a ResBlock's convolutions sit in in_layers/out_layers.
_SGM_RESNET = "(?:in_layers.2|emb_layers.1|out_layers.3|skip_connection)"
_SGM_UNET = (
    "(?:input_blocks.0.0"
    rf"|input_blocks.\d+.\d+.(?:{_SGM_RESNET}|{_TRANSFORMER}|op)"
    rf"|middle_block.\d+.(?:{_SGM_RESNET}|{_TRANSFORMER})"
    rf"|output_blocks.\d+.\d+.(?:{_SGM_RESNET}|{_TRANSFORMER}|conv)"
    "|time_embed.(?:0|2)|label_emb.0.(?:0|2)|out.2)"
)
# Not text_projection: diffusers derives a text encoder's LoRA rank from the attention and MLP
# layers only, so no replica could load a LoRA of it (the runner refuses one too).
_CLIP_TEXT_ENCODER = (
    r"(?:text_model.encoder.layers.\d+.(?:self_attn.(?:q_proj|k_proj|v_proj|out_proj)"
    "|mlp.(?:fc1|fc2)))"
)


def _module_path(grammar: str, separator: str) -> re.Pattern[str]:
    return re.compile(grammar.replace(".", re.escape(separator)))


_KOHYA_PATHS = {
    "unet": _module_path(f"(?:{_DIFFUSERS_UNET}|{_SGM_UNET})", "_"),
    "text_encoder": _module_path(_CLIP_TEXT_ENCODER, "_"),
    "text_encoder_2": _module_path(_CLIP_TEXT_ENCODER, "_"),
}
_DIFFUSERS_PATHS = {
    "unet": _module_path(_DIFFUSERS_UNET, "."),
    "text_encoder": _module_path(_CLIP_TEXT_ENCODER, "."),
    "text_encoder_2": _module_path(_CLIP_TEXT_ENCODER, "."),
}

# te1/te2 come before te, or "lora_te1_x" would read as te with the path "1_x".
_KOHYA_NAME = re.compile(
    r"lora_(?P<prefix>unet|te1|te2|te)_(?P<path>[^.]+)\."
    r"(?P<suffix>lora_down\.weight|lora_up\.weight|alpha)"
)
_DIFFUSERS_NAME = re.compile(
    r"(?P<prefix>unet|text_encoder|text_encoder_2)\.(?P<path>.+?)\."
    r"(?P<suffix>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
    r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)"
)
_TARGET_OF_PREFIX = {
    "unet": "unet",
    "te": "text_encoder",  # kohya's name for SD 1.x's only text encoder, still met in SDXL files
    "te1": "text_encoder",
    "te2": "text_encoder_2",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
}
# suffix -> (role, the spelling of the pair it belongs to)
_ROLE_OF_SUFFIX = {
    "lora_down.weight": ("down", "lora_down/lora_up"),
    "lora_up.weight": ("up", "lora_down/lora_up"),
    "lora_A.weight": ("down", "lora_A/lora_B"),
    "lora_B.weight": ("up", "lora_A/lora_B"),
    "lora.down.weight": ("down", "lora.down/lora.up"),
    "lora.up.weight": ("up", "lora.down/lora.up"),
    "lora_linear_layer.down.weight": ("down", "lora_linear_layer.down/up"),
    "lora_linear_layer.up.weight": ("up", "lora_linear_layer.down/up"),
    "alpha": ("alpha", ""),
}
_ROLE_TEXT = {"down": "down (A) matrix", "up": "up (B) matrix", "alpha": "alpha"}
_ACCEPTED_NAMES = (
    "kohya names (lora_unet_..., lora_te1_..., lora_te2_... with .lora_down.weight, "
    ".lora_up.weight, .alpha) or diffusers names (unet..., text_encoder..., text_encoder_2... "
    "with .lora_A.weight/.lora_B.weight)"
)


@dataclass(frozen=True)
class LoraInfo:
    digest: str
    """sha256 (hex) of the whole file: its content address."""
    size_bytes: int
    rank: int
    """The largest rank among its LoRA pairs."""
    format: str
    """``kohya`` or ``diffusers`` (diffusers/PEFT naming)."""
    dtype: str
    """``F16``, ``BF16`` or ``F32``: of the LoRA matrices (the widest, where they mix)."""
    tensors: int
    targets: tuple[str, ...]
    """Which of ``unet``, ``text_encoder``, ``text_encoder_2`` it changes, in that order."""


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    """Offsets into the data section (after the header), as the header gives them."""


@dataclass(frozen=True)
class _LoraPart:
    tensor: _Tensor
    format: str
    target: str
    path: str
    role: str
    """``down``, ``up`` or ``alpha``."""
    spelling: str


def inspect_lora(data: bytes, *, max_rank: int, max_bytes: int) -> LoraInfo:
    """Check that ``data`` is a .safetensors SDXL LoRA within the limits, from its header.

    Raises :class:`LoraRejected` with the reason otherwise. The size is checked before
    anything else, and the file is hashed only once everything else has passed.
    """
    if len(data) > max_bytes:
        raise LoraRejected(
            f"the file is {len(data)} bytes, larger than the limit of {max_bytes} bytes",
            details={"bytes": len(data), "max_bytes": max_bytes},
        )
    header, data_start = _read_header(data)
    tensors = _tensor_entries(header)
    if not tensors:
        raise LoraRejected("the file contains no tensors")
    _check_layout(tensors, len(data) - data_start)

    parts = [_lora_part(tensor) for tensor in tensors]
    first_name_of_format: dict[str, str] = {}
    for part in parts:
        first_name_of_format.setdefault(part.format, part.tensor.name)
    if len(first_name_of_format) > 1:
        raise LoraRejected(
            f"the file mixes kohya names ({_quote(first_name_of_format['kohya'])}) and diffusers "
            f"names ({_quote(first_name_of_format['diffusers'])}); a LoRA uses one naming scheme"
        )
    _check_dtypes(parts)
    rank, rank_tensor = _check_pairs(parts)
    if rank > max_rank:
        raise LoraRejected(
            f"the LoRA has rank {rank} ({_quote(rank_tensor)}), more than the limit of "
            f"{max_rank}; resize it to rank {max_rank} or less",
            details={"rank": rank, "max_rank": max_rank},
        )

    matrix_dtypes = {part.tensor.dtype for part in parts if part.role != "alpha"}
    present_targets = {part.target for part in parts}
    return LoraInfo(
        digest=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        rank=rank,
        format=parts[0].format,
        dtype=next(dtype for dtype in reversed(MATRIX_DTYPES) if dtype in matrix_dtypes),
        tensors=len(tensors),
        targets=tuple(target for target in TARGETS if target in present_targets),
    )


# -- the safetensors container ------------------------------------------------------------------


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The header's JSON object, and where the data section starts."""
    if len(data) >= 8:
        (header_length,) = struct.unpack_from("<Q", data, 0)
        header_fits = header_length <= min(MAX_HEADER_BYTES, len(data) - 8)
    else:
        header_length, header_fits = 0, False
    # A safetensors header length can start with 0x80 too, so a file is called a pickle or a
    # zip archive only when it does not also read as the start of a safetensors header.
    if not (header_fits and _JSON_OBJECT_START.match(data, 8, 8 + header_length)):
        if data.startswith(_PICKLE_STARTS):
            raise LoraRejected(
                "the file is a pickle (a .ckpt, .pt, .pth or .bin saved by torch.save), which "
                f"can run code when loaded; {_ONLY_SAFETENSORS}"
            )
        if data.startswith(_ZIP_MAGIC):
            raise LoraRejected(
                "the file is a zip archive (such as a .pt or .ckpt saved by torch.save); "
                f"{_ONLY_SAFETENSORS}"
            )
    if len(data) < 8:
        raise LoraRejected(
            f"the file is {len(data)} bytes, too short to be a .safetensors file (which starts "
            "with an 8-byte header length)"
        )
    if header_length > MAX_HEADER_BYTES:
        raise LoraRejected(
            f"not a .safetensors file: its header length field says {header_length} bytes, "
            f"more than safetensors' limit of {MAX_HEADER_BYTES}"
        )
    if header_length > len(data) - 8:
        raise LoraRejected(
            f"not a .safetensors file, or a truncated one: its header length field says "
            f"{header_length} bytes but only {len(data) - 8} follow it"
        )
    with memoryview(data) as view:
        try:
            text = str(view[8 : 8 + header_length], "utf-8")
        except UnicodeDecodeError:
            raise LoraRejected("not a .safetensors file: its header is not UTF-8 text") from None
    try:
        header = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as duplicate:
        raise LoraRejected(
            f"not a valid .safetensors file: its header names {_quote(duplicate.key)} twice"
        ) from None
    # RecursionError: deeply nested arrays exhaust the JSON decoder's stack.
    except (ValueError, RecursionError):
        raise LoraRejected("not a .safetensors file: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise LoraRejected("not a .safetensors file: its header is not a JSON object")
    return header, 8 + header_length


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook: a name given twice would let two readers see different tensors."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _tensor_entries(header: dict[str, Any]) -> list[_Tensor]:
    """The header's tensors in header order; ``__metadata__`` is checked and left out."""
    tensors: list[_Tensor] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(value, str) for value in entry.values()
            ):
                raise LoraRejected(
                    "not a valid .safetensors file: __metadata__ must map strings to strings"
                )
            continue
        tensors.append(_tensor_entry(name, entry))
    return tensors


def _tensor_entry(name: str, entry: object) -> _Tensor:
    def invalid(reason: str) -> LoraRejected:
        return LoraRejected(f"not a valid .safetensors file: tensor {_quote(name)} {reason}")

    if not isinstance(entry, dict):
        raise invalid("is not described by a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise invalid("has no dtype")
    if dtype not in _DTYPE_BITS:
        raise invalid(f"has an unknown dtype {_quote(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
        raise invalid("has a shape that is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise invalid("has data_offsets that are not a [begin, end] pair of byte offsets")
    begin, end = offsets
    bits = _data_bits(shape, _DTYPE_BITS[dtype], limit=(end - begin) * 8)
    if bits != (end - begin) * 8:
        raise invalid(
            f"has shape {_shape_text(shape)} in {dtype}, which does not fit its "
            f"{end - begin} bytes of data"
        )
    return _Tensor(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _data_bits(shape: list[int], dtype_bits: int, *, limit: int) -> int:
    """prod(shape) x dtype_bits, or some number above ``limit`` once it is past it: a hostile
    header can list a million huge dimensions, whose full product would take long to compute."""
    if 0 in shape:
        return 0
    bits = dtype_bits
    for size in shape:
        bits *= size
        if bits > limit:
            break
    return bits


def _is_count(value: object) -> bool:
    # bool is an int in Python but true/false is not a size in JSON.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: list[_Tensor], data_length: int) -> None:
    """safetensors' rule: the tensors' byte ranges tile the data section, no gap, no overlap."""
    for tensor in tensors:
        if tensor.end > data_length:
            raise LoraRejected(
                f"the file is truncated: tensor {_quote(tensor.name)} ends at byte {tensor.end} "
                f"of the data section, which holds only {data_length} bytes; upload the "
                "complete file"
            )
    covered = 0
    previous: _Tensor | None = None
    for tensor in sorted(tensors, key=lambda tensor: (tensor.begin, tensor.end)):
        if previous is not None and tensor.begin < previous.end:
            raise LoraRejected(
                f"not a valid .safetensors file: tensors {_quote(previous.name)} and "
                f"{_quote(tensor.name)} overlap"
            )
        if tensor.begin > covered:
            raise LoraRejected(
                f"not a valid .safetensors file: bytes {covered} to {tensor.begin} of the data "
                "section belong to no tensor"
            )
        covered, previous = tensor.end, tensor
    if covered != data_length:
        raise LoraRejected(
            f"not a valid .safetensors file: the last {data_length - covered} bytes belong to "
            "no tensor"
        )


# -- the LoRA inside it -------------------------------------------------------------------------


def _lora_part(tensor: _Tensor) -> _LoraPart:
    """Which module and which half of its LoRA a tensor is, from its name alone."""
    for name_format, name_pattern, paths in (
        ("kohya", _KOHYA_NAME, _KOHYA_PATHS),
        ("diffusers", _DIFFUSERS_NAME, _DIFFUSERS_PATHS),
    ):
        match = name_pattern.fullmatch(tensor.name)
        if match is None:
            continue
        target = _TARGET_OF_PREFIX[match["prefix"]]
        if paths[target].fullmatch(match["path"]) is None:
            raise _unrecognised_name(tensor.name, target, match["path"])
        role, spelling = _ROLE_OF_SUFFIX[match["suffix"]]
        return _LoraPart(tensor, name_format, target, match["path"], role, spelling)
    raise _unrecognised_name(tensor.name, None, None)


def _unrecognised_name(name: str, target: str | None, path: str | None) -> LoraRejected:
    if path is not None and target == "unet":
        why = f"{_quote(path)} is not a layer of SDXL's UNet (a LoRA for another model?)"
    elif path is not None:
        why = f"{_quote(path)} is not a layer of SDXL's CLIP text encoders"
    elif any(
        part in name for part in ("hada_", "lokr_", "lora_mid", "dora_scale", "magnitude_vector")
    ):
        why = "LyCORIS (LoHa, LoKr, Tucker) and DoRA layers are not supported, only LoRA pairs"
    elif name.startswith("base_model.model."):
        why = "it looks like a PEFT adapter for a language model"
    elif "lora" not in name.lower():
        why = "it is a plain weight, not a LoRA matrix (a full model checkpoint?)"
    else:
        why = "it looks like a LoRA for another model (such as Flux, SD3 or a video model)"
    return LoraRejected(
        f"tensor {_quote(name)} is not part of an SDXL LoRA: {why}. Accepted are {_ACCEPTED_NAMES}"
    )


def _check_dtypes(parts: list[_LoraPart]) -> None:
    for part in parts:
        tensor = part.tensor
        if part.role == "alpha":
            if tensor.dtype not in _ALPHA_DTYPES:
                raise LoraRejected(
                    f"alpha {_quote(tensor.name)} is stored as {tensor.dtype}; an alpha is a number"
                )
        elif tensor.dtype not in MATRIX_DTYPES:
            raise LoraRejected(
                f"tensor {_quote(tensor.name)} is stored as {tensor.dtype}; LoRA matrices must "
                "be F16, BF16 or F32"
            )


def _check_pairs(parts: list[_LoraPart]) -> tuple[int, str]:
    """Every module has a down and an up of matching shapes; returns the highest rank and the
    down matrix that has it."""
    modules: dict[tuple[str, str], dict[str, _LoraPart]] = {}
    for part in parts:
        halves = modules.setdefault((part.target, part.path), {})
        if part.role in halves:
            raise LoraRejected(
                f"tensors {_quote(halves[part.role].tensor.name)} and {_quote(part.tensor.name)} "
                f"are both the {_ROLE_TEXT[part.role]} of one layer"
            )
        halves[part.role] = part

    rank, rank_tensor = 0, ""
    for halves in modules.values():
        down, up, alpha = halves.get("down"), halves.get("up"), halves.get("alpha")
        if down is None or up is None:
            lone = down or up
            if lone is None:
                raise LoraRejected(
                    f"alpha {_quote(next(iter(halves.values())).tensor.name)} belongs to no "
                    "LoRA pair: it has neither a down (A) nor an up (B) matrix"
                )
            missing = "up (B)" if up is None else "down (A)"
            raise LoraRejected(
                f"tensor {_quote(lone.tensor.name)} has no {missing} partner: each LoRA layer "
                "needs both its down (A) and its up (B) matrix"
            )
        if down.spelling != up.spelling:
            raise LoraRejected(
                f"tensors {_quote(down.tensor.name)} and {_quote(up.tensor.name)} spell one "
                "LoRA pair two ways"
            )
        _check_pair_shapes(down.tensor, up.tensor)
        if alpha is not None and (
            len(alpha.tensor.shape) > 1 or math.prod(alpha.tensor.shape) != 1
        ):
            raise LoraRejected(
                f"alpha {_quote(alpha.tensor.name)} has shape "
                f"{_shape_text(alpha.tensor.shape)}; an alpha is a single number"
            )
        if down.tensor.shape[0] > rank:
            rank, rank_tensor = down.tensor.shape[0], down.tensor.name
    return rank, rank_tensor


def _check_pair_shapes(down: _Tensor, up: _Tensor) -> None:
    """Linear: down [r, in], up [out, r]. Convolution: down [r, in, kh, kw], up [out, r, 1, 1]."""
    linear = len(down.shape) == 2 and len(up.shape) == 2
    convolution = len(down.shape) == 4 and len(up.shape) == 4 and up.shape[2:] == (1, 1)
    if (
        not (linear or convolution)
        or 0 in down.shape
        or 0 in up.shape
        or down.shape[0] != up.shape[1]
    ):
        raise LoraRejected(
            f"tensors {_quote(down.name)} {_shape_text(down.shape)} and "
            f"{_quote(up.name)} {_shape_text(up.shape)} do not form a LoRA pair: down must be "
            "[rank, in] (or [rank, in, kh, kw]) and up [out, rank] (or [out, rank, 1, 1])"
        )


def _quote(name: str) -> str:
    """A name from the file as the message shows it: quoted, escaped, and cut if very long."""
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _shape_text(shape: Sequence[int]) -> str:
    """A shape from the file as the message shows it: in full unless it has very many axes."""
    return str(list(shape)) if len(shape) <= 8 else f"of {len(shape)} dimensions"

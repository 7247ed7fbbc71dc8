"""Validation and re-encoding of reference images (uploaded or fetched).

:func:`check_image` is synchronous and CPU-bound; callers run it in a thread. It never
decodes pixels before the declared size has been checked, so a decompression bomb (a small
file declaring billions of pixels) is refused from its header alone. What it returns is a
fresh encoding of the pixels only: EXIF orientation applied, every piece of metadata (EXIF,
XMP, ICC profiles, text chunks, comments) dropped.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ourvidz_serve.errors import ImageRejected

ACCEPTED = "PNG, JPEG or WebP"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Our format name -> (Pillow format names accepted for it, content type, file extension)
_FORMATS: dict[str, tuple[frozenset[str], str, str]] = {
    "png": (frozenset({"PNG"}), "image/png", "png"),
    # A JPEG with an MPF segment (e.g. from some cameras) opens as MPO; its first picture is
    # the JPEG itself.
    "jpeg": (frozenset({"JPEG", "MPO"}), "image/jpeg", "jpg"),
    "webp": (frozenset({"WEBP"}), "image/webp", "webp"),
}
_PIL_OPENER = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_GRAY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

# Errors Pillow raises on damaged, truncated or hostile data.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    ZeroDivisionError,
)


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    """Re-encoded: EXIF orientation applied, all metadata stripped."""
    format: str
    """``png``, ``jpeg`` or ``webp``."""
    width: int
    """After orientation."""
    height: int
    content_type: str
    extension: str
    """``png``, ``jpg`` or ``webp``."""


def sniff_format(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` from the magic bytes alone; ``None`` for anything else."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _describe_other(data: bytes) -> str | None:
    """A name for a recognisable but unaccepted format, for the refusal message."""
    head = data[:32]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if head.startswith((b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")):
        return "ICO"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "SVG"
    if head.startswith(b"%PDF"):
        return "PDF"
    return None


def _webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP file carries a VP8L (lossless) bitstream, by walking its chunks."""
    offset = 12
    end = len(data)
    while offset + 8 <= end:
        fourcc = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        if fourcc == b"VP8L":
            return True
        if fourcc == b"VP8 ":
            return False
        offset += 8 + size + (size & 1)
    return False


def _normalize_mode(image: Image.Image, fmt: str) -> Image.Image:
    """Convert to a plain 8-bit mode the output format stores as is.

    PNG: L, LA, RGB or RGBA. JPEG: L or RGB. WebP: RGB or RGBA. Transparency (an alpha
    channel, or a palette / colour-key ``transparency``) is kept for PNG and WebP.
    """
    mode = image.mode
    if mode in _HIGH_DEPTH_GRAY:
        # 16-bit (or 32-bit / float) grayscale: scale down to 8 bits rather than clipping.
        scale = 1.0 if mode == "F" else 1 / 256
        image = image.convert("I") if mode != "F" else image
        image = image.point(lambda value: value * scale).convert("L")
        mode = "L"
    if mode == "1":
        image = image.convert("L")
        mode = "L"

    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    grayscale = mode in ("L", "LA", "La")

    color = "L" if grayscale and fmt != "webp" else "RGB"
    target = color + "A" if has_alpha and fmt != "jpeg" else color

    if mode == target and "transparency" not in image.info:
        return image
    if mode == "La":
        image = image.convert("LA")
    if mode == "RGBa":
        image = image.convert("RGBA")
    return image.convert(target)


def _encode(image: Image.Image, fmt: str, *, lossless: bool) -> bytes:
    # Metadata Pillow would carry over from ``info`` (ICC profile, comments, XMP, ...) goes.
    image.info.clear()
    buffer = io.BytesIO()
    options: dict[str, Any]
    if fmt == "png":
        options = {"format": "PNG", "optimize": False}
    elif fmt == "jpeg":
        options = {"format": "JPEG", "quality": 95}
    elif lossless:
        options = {"format": "WEBP", "lossless": True, "quality": 95}
    else:
        options = {"format": "WEBP", "quality": 95}
    image.save(buffer, **options)
    return buffer.getvalue()


def _too_many_pixels(max_pixels: int) -> ImageRejected:
    """The refusal for an image over Pillow's decompression-bomb limit (header or decode)."""
    return ImageRejected(
        f"image declares more pixels than the limit of {max_pixels}",
        details={"max_pixels": max_pixels},
    )


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Validate ``data`` as a PNG, JPEG or WebP image and return a clean re-encoding.

    Raises :class:`ImageRejected` (with a short reason, never a traceback) when the data is too
    large, not an accepted format, declares more than ``max_pixels`` pixels, is animated, or is
    truncated or corrupt.
    """
    if len(data) > max_bytes:
        raise ImageRejected(
            f"image is {len(data)} bytes, more than the limit of {max_bytes} bytes",
            details={"max_bytes": max_bytes, "bytes": len(data)},
        )
    if not data:
        raise ImageRejected("image is empty")

    fmt = sniff_format(data)
    if fmt is None:
        other = _describe_other(data)
        if other is not None:
            raise ImageRejected(
                f"image format {other} is not accepted; send {ACCEPTED}",
                details={"format": other.lower(), "accepted": ["png", "jpeg", "webp"]},
            )
        raise ImageRejected(
            f"data is not an image (or not a {ACCEPTED} image)",
            details={"accepted": ["png", "jpeg", "webp"]},
        )
    pil_names, content_type, extension = _FORMATS[fmt]

    # Header only: Image.open is lazy and decodes no pixel data.
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_OPENER[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own (global) limit was exceeded while reading the header.
        raise _too_many_pixels(max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(f"image data is not a valid {fmt.upper()} file") from exc
    except _DECODE_ERRORS as exc:
        raise ImageRejected(f"image data is truncated or corrupt ({fmt.upper()})") from exc

    with image:
        if image.format not in pil_names:
            raise ImageRejected(
                f"image content does not match its {fmt.upper()} signature",
                details={"sniffed": fmt, "detected": image.format},
            )
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageRejected("image declares an empty size")
        if width * height > max_pixels:
            raise ImageRejected(
                f"image declares {width}x{height} pixels, more than the limit of {max_pixels}",
                details={"width": width, "height": height, "max_pixels": max_pixels},
            )
        # An MPO's further pictures are previews / stereo views: only the first one is used.
        try:
            frames = 1 if image.format == "MPO" else int(getattr(image, "n_frames", 1))
        except _DECODE_ERRORS as exc:
            raise ImageRejected(f"image data is truncated or corrupt ({fmt.upper()})") from exc
        if frames > 1:
            raise ImageRejected("animated images are not accepted", details={"frames": frames})

        lossless = fmt == "webp" and _webp_is_lossless(data)
        try:
            image.load()
            try:
                oriented = ImageOps.exif_transpose(image)
            except _DECODE_ERRORS:
                # Unreadable EXIF: the pixels are fine, keep them as stored.
                oriented = image.copy()
            normalized = _normalize_mode(oriented, fmt)
            encoded = _encode(normalized, fmt, lossless=lossless)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_many_pixels(max_pixels) from exc
        except MemoryError as exc:
            raise ImageRejected("image is too large to decode") from exc
        except _DECODE_ERRORS as exc:
            raise ImageRejected(f"image data is truncated or corrupt ({fmt.upper()})") from exc
        out_width, out_height = normalized.size

    return CheckedImage(
        data=encoded,
        format=fmt,
        width=out_width,
        height=out_height,
        content_type=content_type,
        extension=extension,
    )

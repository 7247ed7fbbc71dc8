"""Reference image validation: formats by magic bytes, pixel cap before decoding, re-encoding."""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from ourvidz_serve.errors import ImageRejected, InvalidRequest
from ourvidz_serve.security.images import CheckedImage, check_image, sniff_format

MAX_BYTES = 4_000_000
MAX_PIXELS = 4_000_000


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def check(data: bytes, **limits: int) -> CheckedImage:
    return check_image(
        data,
        max_bytes=limits.get("max_bytes", MAX_BYTES),
        max_pixels=limits.get("max_pixels", MAX_PIXELS),
    )


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    channels = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * channels))


# -- accepted formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pil_format", "fmt", "content_type", "extension"),
    [
        ("PNG", "png", "image/png", "png"),
        ("JPEG", "jpeg", "image/jpeg", "jpg"),
        ("WEBP", "webp", "image/webp", "webp"),
    ],
)
def test_valid_images_are_accepted_with_their_size(
    pil_format: str, fmt: str, content_type: str, extension: str
) -> None:
    data = encode(Image.new("RGB", (64, 48), (10, 120, 200)), pil_format)
    checked = check(data)
    assert (checked.format, checked.width, checked.height) == (fmt, 64, 48)
    assert (checked.content_type, checked.extension) == (content_type, extension)
    assert sniff_format(checked.data) == fmt
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.format == pil_format
        assert reopened.size == (64, 48)


def test_png_alpha_is_kept() -> None:
    checked = check(encode(Image.new("RGBA", (8, 8), (255, 0, 0, 100)), "PNG"))
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.mode == "RGBA"
        assert reopened.getpixel((0, 0)) == (255, 0, 0, 100)


def test_palette_png_with_transparency_becomes_rgba() -> None:
    palette_image = Image.new("P", (6, 6), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((1, 1), 1)
    checked = check(encode(palette_image, "PNG", transparency=0))
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.mode == "RGBA"
        assert reopened.getpixel((0, 0))[3] == 0
        assert reopened.getpixel((1, 1)) == (255, 0, 0, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    checked = check(encode(Image.new("I;16", (4, 4), 40_000), "PNG"))
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.mode == "L"
        assert reopened.getpixel((0, 0)) == 40_000 // 256


def test_cmyk_jpeg_becomes_rgb() -> None:
    checked = check(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.mode == "RGB"
        red, green, blue = reopened.getpixel((4, 4))
        assert red > 200 and green < 60 and blue < 60


def test_lossless_webp_stays_lossless() -> None:
    original = noise((16, 16))
    checked = check(encode(original, "WEBP", lossless=True))
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.convert("RGB").tobytes() == original.tobytes()


# -- orientation and metadata -------------------------------------------------------------------


def test_exif_orientation_is_applied_and_exif_is_stripped() -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "SecretCameraMaker"
    data = encode(image, "JPEG", exif=exif, quality=95)
    with Image.open(io.BytesIO(data)) as source:
        assert source.size == (20, 10)
        assert source.getexif()[0x0112] == 6

    checked = check(data)
    assert (checked.width, checked.height) == (10, 20)
    assert b"Exif" not in checked.data
    assert b"SecretCameraMaker" not in checked.data
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.size == (10, 20)
        assert len(reopened.getexif()) == 0
        top = reopened.getpixel((5, 3))
        bottom = reopened.getpixel((5, 16))
    # Rotated clockwise, the left (red) half is now on top.
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_jpeg_metadata_is_stripped() -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">SecretXmp</x:xmpmeta>'
    icc = b"SecretIcc" * 10
    data = encode(
        Image.new("RGB", (8, 8), "white"),
        "JPEG",
        comment=b"SecretComment",
        xmp=xmp,
        icc_profile=icc,
    )
    assert b"SecretComment" in data and b"SecretXmp" in data and b"SecretIcc" in data
    checked = check(data)
    for secret in (b"SecretComment", b"SecretXmp", b"SecretIcc", b"ICC_PROFILE", b"Exif"):
        assert secret not in checked.data
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert "comment" not in reopened.info and "icc_profile" not in reopened.info


def test_png_metadata_is_stripped() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "SecretText")
    info.add_itxt("XML:com.adobe.xmp", "SecretXmp")
    exif = Image.Exif()
    exif[0x010F] = "SecretMaker"
    data = encode(Image.new("RGB", (8, 8), "white"), "PNG", pnginfo=info, exif=exif)
    checked = check(data)
    for secret in (b"SecretText", b"SecretXmp", b"SecretMaker", b"tEXt", b"iTXt", b"eXIf"):
        assert secret not in checked.data


def test_webp_metadata_is_stripped() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretMaker"
    data = encode(Image.new("RGB", (8, 8), "white"), "WEBP", exif=exif, xmp=b"SecretXmp")
    assert b"SecretMaker" in data
    checked = check(data)
    for secret in (b"SecretMaker", b"SecretXmp", b"EXIF", b"XMP "):
        assert secret not in checked.data


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"hello, world" * 10, b"<html><body>not an image</body></html>", b"\x00" * 100, b"RIFF"],
)
def test_non_images_are_refused(data: bytes) -> None:
    with pytest.raises(ImageRejected) as caught:
        check(data)
    assert "PNG, JPEG or WebP" in caught.value.message
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.status_code == 422 and caught.value.code == "invalid_image"


def test_empty_data_is_refused() -> None:
    with pytest.raises(ImageRejected, match="empty"):
        check(b"")


@pytest.mark.parametrize(("pil_format", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_image_formats_are_refused_by_format(pil_format: str, name: str) -> None:
    data = encode(Image.new("RGB", (8, 8), "red"), pil_format)
    with pytest.raises(ImageRejected) as caught:
        check(data)
    assert name in caught.value.message
    assert "PNG, JPEG or WebP" in caught.value.message


def test_oversized_bytes_are_refused_before_anything_else() -> None:
    data = encode(noise((64, 64)), "PNG")
    with pytest.raises(ImageRejected, match="more than the limit of 1024 bytes"):
        check(data, max_bytes=1024)
    with pytest.raises(ImageRejected, match="bytes"):
        check(b"\x00" * 2048, max_bytes=1024)


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_header_only(50_000, 50_000)
    assert len(data) < 200
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy_load(self: ImageFile.ImageFile) -> object:
        loads.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageRejected) as caught:
            check(data, max_bytes=MAX_BYTES, max_pixels=40_000_000)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "pixels" in caught.value.message
    assert elapsed < 1.0
    assert peak < 20_000_000
    assert loads == []


def test_the_pixel_cap_is_checked_on_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under Pillow's own limit: only our check stands between the header and a decode.
    data = png_header_only(3000, 3000)
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as caught:
        check(data, max_pixels=1_000_000)
    assert time.perf_counter() - started < 1.0
    assert "3000x3000" in caught.value.message
    assert caught.value.details["max_pixels"] == 1_000_000
    assert loads == []


def test_a_truncated_png_is_refused() -> None:
    data = encode(noise((128, 128)), "PNG")
    with pytest.raises(ImageRejected, match="truncated or corrupt") as caught:
        check(data[: len(data) // 2])
    assert "Traceback" not in caught.value.message


def test_a_truncated_jpeg_is_refused() -> None:
    data = encode(noise((128, 128)), "JPEG")
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        check(data[:400])


def test_a_png_signature_over_garbage_is_refused() -> None:
    with pytest.raises(ImageRejected):
        check(b"\x89PNG\r\n\x1a\n" + os.urandom(200))


def test_a_header_only_png_within_limits_is_refused_as_truncated() -> None:
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        check(png_header_only(64, 64))


@pytest.mark.parametrize("pil_format", ["PNG", "WEBP"])
def test_animated_images_are_refused(pil_format: str) -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")]
    data = encode(frames[0], pil_format, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageRejected, match="animated"):
        check(data)


def test_the_pixels_of_a_plain_png_are_kept_exactly() -> None:
    original = noise((12, 7))
    checked = check(encode(original, "PNG"))
    with Image.open(io.BytesIO(checked.data)) as reopened:
        assert reopened.mode == "RGB"
        assert reopened.tobytes() == original.tobytes()


# -- sniffing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n....", "png"),
        (b"\xff\xd8\xff\xe0....", "jpeg"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"GIF89a....", None),
        (b"BM......", None),
        (b"\xff\xd8", None),
        (b"", None),
    ],
)
def test_sniff_format_reads_magic_bytes_only(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected

"""PNG and MP4 encoding, read back with Pillow and ffmpeg."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ourvidz_serve.pipelines.encode import (
    decode_png,
    encode_mp4,
    encode_png,
    probe_mp4,
    probe_mp4_frame_count,
    read_mp4_frames,
)


def gradient_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth moving gradients: content H.264 reproduces closely."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack(
            [(x + t) / (width + num_frames), y / height, np.full_like(x, 0.5, dtype=np.float64)],
            axis=-1,
        )
        for t in range(num_frames)
    ]
    return np.asarray(frames, dtype=np.float32)


def test_png_round_trips_uint8_pixels_exactly() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == (40, 24)
    assert np.array_equal(decode_png(data), pixels)


def test_png_quantises_float_pixels_and_clips_out_of_range_values() -> None:
    pixels = np.array([[[0.0, 0.5, 1.0], [-0.2, 1.7, np.nan]]], dtype=np.float32)
    assert decode_png(encode_png(pixels)).tolist() == [[[0, 128, 255], [0, 255, 0]]]


def test_png_accepts_pil_images() -> None:
    image = Image.new("RGB", (8, 4), (10, 20, 30))
    assert decode_png(encode_png(image))[0, 0].tolist() == [10, 20, 30]


def test_mp4_is_h264_yuv420p_with_every_frame_at_the_given_fps() -> None:
    frames = gradient_frames(81, 48, 64)
    data = encode_mp4(frames, fps=16)
    info = probe_mp4(data)

    assert data[4:8] == b"ftyp"
    assert info.num_frames == probe_mp4_frame_count(data) == 81
    assert info.fps == 16
    assert (info.width, info.height) == (64, 48)
    assert info.codec == "h264"
    assert info.pix_fmt.startswith("yuv420p")


def test_mp4_frames_read_back_close_to_the_input() -> None:
    frames = gradient_frames(9, 32, 64)
    decoded = read_mp4_frames(encode_mp4(frames, fps=8))
    expected = (frames * 255).round()
    assert decoded.shape == (9, 32, 64, 3)
    assert np.abs(decoded.astype(np.float32) - expected).mean() < 3


def test_mp4_accepts_uint8_frames_and_other_frame_rates() -> None:
    frames = np.full((5, 16, 16, 3), 128, dtype=np.uint8)
    info = probe_mp4(encode_mp4(frames, fps=24))
    assert (info.num_frames, info.fps) == (5, 24)


@pytest.mark.parametrize(
    "frames",
    [np.zeros((3, 15, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8), np.zeros((0, 16, 16, 3))],
    ids=["odd-height", "no-time-axis", "no-frames"],
)
def test_mp4_rejects_frames_h264_cannot_hold(frames: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_mp4(frames, fps=16)

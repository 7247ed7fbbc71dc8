"""Encoding finished pixels: PNG via Pillow, MP4 (H.264, yuv420p) via imageio-ffmpeg."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

MP4_CRF = 18
"""x264 constant rate factor: visually near-lossless at a modest size."""
MP4_PRESET = "fast"


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 stays as is; float arrays are taken as [0, 1], clipped and rounded."""
    if pixels.dtype == np.uint8:
        return pixels
    if not np.issubdtype(pixels.dtype, np.floating):
        raise TypeError(f"expected uint8 or float pixels, got {pixels.dtype}")
    return (np.clip(np.nan_to_num(pixels), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or an (H, W, 3) uint8 / float [0, 1] array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(to_uint8(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_webp(image: np.ndarray, quality: int = 85) -> bytes:
    """WebP bytes of an (H, W, 3) uint8 / float [0, 1] frame (a video's poster)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an encoded image."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@contextmanager
def _temp_path(suffix: str, data: bytes | None = None) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="ourvidz-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if data is not None:
                handle.write(data)
        yield path
    finally:
        path.unlink(missing_ok=True)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 (libx264, yuv420p) MP4 bytes of (T, H, W, 3) uint8 or float [0, 1] frames.

    Width and height must be even (yuv420p subsamples chroma by 2); the MP4 index is
    moved to the front (``+faststart``) so players can start before the download ends.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames < 1:
        raise ValueError("no frames to encode")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
    pixels = np.ascontiguousarray(to_uint8(frames))
    with _temp_path(".mp4") as path:
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=2,
            output_params=["-crf", str(MP4_CRF), "-preset", MP4_PRESET, "-movflags", "+faststart"],
        )
        writer.send(None)
        try:
            for frame in pixels:
                writer.send(frame)
        finally:
            writer.close()
        return path.read_bytes()


@dataclass(frozen=True)
class Mp4Info:
    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str


def probe_mp4(data: bytes) -> Mp4Info:
    """Frame count (decoded, exact), frame rate, size and codec of MP4 bytes."""
    with _temp_path(".mp4", data) as path:
        reader = imageio_ffmpeg.read_frames(str(path))
        try:
            meta = next(reader)
        finally:
            reader.close()
        num_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return Mp4Info(
        num_frames=num_frames,
        fps=float(meta["fps"]),
        width=width,
        height=height,
        codec=str(meta.get("codec", "")),
        pix_fmt=str(meta.get("pix_fmt", "")),
    )


def probe_mp4_frame_count(data: bytes) -> int:
    return probe_mp4(data).num_frames


def read_mp4_frames(data: bytes) -> np.ndarray:
    """All frames of MP4 bytes as a (T, H, W, 3) uint8 array."""
    with _temp_path(".mp4", data) as path:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [
            np.frombuffer(chunk, dtype=np.uint8).reshape(height, width, 3) for chunk in reader
        ]
    return np.stack(frames)

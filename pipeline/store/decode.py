"""Image bytes to RGB uint8 pixels with OpenCV, and the resizes around inference.

Decoding decisions (one place, so the model always sees the same thing):
- Flags `IMREAD_COLOR | IMREAD_ANYDEPTH`, then `cvtColor(BGR2RGB)`: OpenCV returns 3
  channels, applies JPEG EXIF orientation as viewers do (only `IMREAD_UNCHANGED` and
  `IMREAD_IGNORE_ORIENTATION` skip it), expands grayscale and palette images, converts
  CMYK JPEGs, and keeps 16-bit samples 16-bit so that they are scaled here rather than
  truncated (`>> 8`). Its BGR order never leaves this module. `IMREAD_COLOR_RGB` is not
  used: in OpenCV 5.0.0, combined with `IMREAD_ANYDEPTH`, it returns 16-bit RGB TIFFs
  in BGR order.
- Alpha is dropped: the colour stored under a (partly) transparent pixel is kept, as
  Pillow's `convert("RGB")` and OpenCV's `IMREAD_COLOR` do, so masks match what most
  training pipelines fed the model.
- 16-bit samples are scaled with round(v / 257): the exact inverse of the usual 8 -> 16
  bit expansion (v * 257), mapping 0 -> 0 and 65535 -> 255. Other depths (float, signed)
  are rejected.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["MIN_SIDE", "DecodeError", "decode_image", "fit_max_side", "resize_mask"]

MIN_SIDE = 8
"""Smallest height and width labelled (a DRN's output stride)."""

_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH


class DecodeError(ValueError):
    """The bytes are not an image this pipeline can label. Permanent: never retried."""


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes to an H x W x 3 uint8 RGB array as displayed.

    `name` (the image id or URI) only appears in error messages, which are one line:
    "<name>: <reason>". Sizes in messages are width x height.
    """
    if len(data) == 0:
        raise DecodeError(f"{name}: not a decodable image (0 bytes)")
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    except cv2.error:
        pixels = None  # OpenCV raises for some malformed headers, returns None for others
    if pixels is None:
        raise DecodeError(
            f"{name}: not a decodable image (truncated or not an image; {len(data)} bytes)")
    if pixels.dtype == np.uint16:
        # round(v / 257) in integers; fits in uint32.
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise DecodeError(
            f"{name}: unsupported sample type {pixels.dtype} (convert to 8- or 16-bit)")
    height, width = pixels.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise DecodeError(f"{name}: image too small to label "
                          f"({width}x{height}; minimum {MIN_SIDE}x{MIN_SIDE})")
    if pixels.ndim == 2:  # defensive: IMREAD_COLOR always gives 3 channels
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def fit_max_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Scale `rgb` down (area interpolation, aspect ratio kept) so its longer side is
    `max_side`; an image that already fits is returned unchanged (the same object)."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    height, width = rgb.shape[:2]
    longer = max(height, width)
    if longer <= max_side:
        return rgb
    scale = max_side / longer
    new_height = max(1, min(max_side, round(height * scale)))
    new_width = max(1, min(max_side, round(width * scale)))
    return cv2.resize(rgb, (new_width, new_height), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a class-index mask (uint8 or uint16, H x W) to
    height x width; pixel-centre aligned, so class values are never blended."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {mask.shape}")
    if mask.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"mask must be uint8 or uint16, got {mask.dtype}")
    if mask.shape == (height, width):
        return mask
    # INTER_NEAREST_EXACT picks the source pixel whose centre is nearest, like Pillow and
    # scikit-image; plain INTER_NEAREST is biased by half a pixel.
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)

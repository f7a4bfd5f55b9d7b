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
- A JPEG the decoder had to fill in is refused: libjpeg reports corrupt or missing scan
  data only as a warning printed on stderr ("Corrupt JPEG data: premature end of data
  segment") and returns an image padded with grey. So while OpenCV decodes a JPEG, file
  descriptor 2 points at a scratch file; a warning of that kind makes the image an error,
  and any other text is passed on to the real stderr. (PNG, WebP and TIFF decoders fail
  outright on such damage, so OpenCV returns nothing.)
"""
from __future__ import annotations

import os
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["MIN_SIDE", "DecodeError", "decode_image", "fit_max_side", "resize_mask"]

MIN_SIDE = 8
"""Smallest height and width labelled (a DRN's output stride)."""

_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH


class DecodeError(ValueError):
    """The bytes are not an image this pipeline can label. Permanent: never retried."""


DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image decoded (width x height, read from the header first): `--max-pixels`."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about itself before any pixel is decoded."""

    format: str
    width: int
    height: int
    complete: bool  # the file's own end marker / declared length is there


def read_header(data: bytes) -> ImageHeader | None:
    """Format, width and height from the header of a PNG, JPEG, BMP, WebP or TIFF file,
    and whether the file is complete; None when the bytes are none of these (or the
    header itself is cut short). Reads a few bytes; never decodes pixels."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return ImageHeader("PNG", w, h, data.rfind(b"IEND") > 24)
        if data[:2] == b"\xff\xd8":
            return _jpeg_header(data)
        if data[:2] == b"BM":
            declared, = struct.unpack("<I", data[2:6])
            dib, = struct.unpack("<I", data[14:18])
            if dib == 12:
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
            return ImageHeader("BMP", abs(w), abs(h), declared == 0 or declared <= len(data))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            declared, = struct.unpack("<I", data[4:8])
            complete = declared + 8 <= len(data)
            chunk = data[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return ImageHeader("WebP", w & 0x3FFF, h & 0x3FFF, complete)
            if chunk == b"VP8L":
                bits, = struct.unpack("<I", data[21:25])
                return ImageHeader("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, complete)
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return ImageHeader("WebP", w, h, complete)
            return None
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_header(data)
    except struct.error:
        return None
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> ImageHeader | None:
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length, = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (w, h)
        if marker == 0xDA:  # start of scan: entropy-coded data follows, then EOI
            if size is None:
                return None
            return ImageHeader("JPEG", size[0], size[1], data.rfind(b"\xff\xd9") > pos)
        pos += 2 + length
    return None


def _tiff_header(data: bytes) -> ImageHeader | None:
    order = "<" if data[:2] == b"II" else ">"
    offset, = struct.unpack(order + "I", data[4:8])
    count, = struct.unpack(order + "H", data[offset:offset + 2])
    values: dict[int, int] = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            values[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10 if kind == 3 else 12])[0]
    if 256 not in values or 257 not in values:
        return None
    return ImageHeader("TIFF", values[256], values[257], True)


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an H x W x 3 uint8 RGB array as displayed.

    Bounded: the header is read first (`read_header`); a format other than PNG, JPEG,
    BMP, WebP or TIFF, a declared size above `max_pixels`, or a file without its end
    marker (truncated, or a forged header over a few bytes) is refused before OpenCV
    allocates anything. 16-bit images are scaled down a band of rows at a time, so the
    peak stays near the 16-bit image plus the 8-bit result (about 9 bytes per pixel).

    `name` (the image id or URI) only appears in error messages, which are one line:
    "<name>: <reason>". Sizes in messages are width x height.
    """
    if len(data) == 0:
        raise DecodeError(f"{name}: not a decodable image (0 bytes)")
    header = read_header(data)
    if header is None:
        raise DecodeError(f"{name}: not a decodable image (not PNG, JPEG, BMP, WebP or TIFF, "
                          f"or its header is cut short; {len(data)} bytes)")
    pixels_declared = header.width * header.height
    if pixels_declared > max_pixels:
        raise DecodeError(f"{name}: {header.format} declares {header.width}x{header.height} = "
                          f"{pixels_declared:,} pixels, above the cap of {max_pixels:,} "
                          f"(--max-pixels); not decoded")
    if not header.complete:
        raise DecodeError(f"{name}: truncated {header.format} ({header.width}x{header.height} "
                          f"declared, {len(data)} bytes, no end marker); not decoded")
    warning = None
    try:
        if header.format == "JPEG":
            pixels, warning = _decode_watching_stderr(data)
        else:
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    except cv2.error:
        pixels = None  # OpenCV raises for some malformed headers, returns None for others
    if warning is not None:
        raise DecodeError(f"{name}: corrupt JPEG, the decoder had to fill it in ({warning}); "
                          "not labelled")
    if pixels is None:
        raise DecodeError(
            f"{name}: not a decodable image (truncated or not an image; {len(data)} bytes)")
    if pixels.dtype == np.uint16:
        pixels = _to_8bit(pixels)
    elif pixels.dtype != np.uint8:
        raise DecodeError(
            f"{name}: unsupported sample type {pixels.dtype} (convert to 8- or 16-bit)")
    height, width = pixels.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise DecodeError(f"{name}: image too small to label "
                          f"({width}x{height}; minimum {MIN_SIDE}x{MIN_SIDE})")
    if pixels.ndim == 2:  # defensive: IMREAD_COLOR always gives 3 channels
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB, dst=pixels)


_CORRUPTION_WARNINGS = (b"Corrupt JPEG data", b"Premature end of JPEG file")
"""How libjpeg's warnings about damaged scan data begin (jerror.h: JWRN_JPEG_EOF,
JWRN_EXTRANEOUS_DATA, JWRN_HIT_MARKER, JWRN_HUFF_BAD_CODE, ...)."""
_STDERR_LOCK = threading.Lock()
_scratch: list = []  # one scratch file per process, made on first use


def _decode_watching_stderr(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """cv2.imdecode with fd 2 pointed at a scratch file: (pixels, the first corruption
    warning or None). Other text written meanwhile (another thread's) is passed on."""
    with _STDERR_LOCK:
        if not _scratch:
            _scratch.append(tempfile.TemporaryFile())
        scratch = _scratch[0].fileno()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(scratch, 2)
        try:
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        written = os.fstat(scratch).st_size
        text = os.pread(scratch, written, 0) if written else b""
        if written:  # empty it for the next image (the offset is shared with fd 2's copy)
            os.ftruncate(scratch, 0)
            os.lseek(scratch, 0, os.SEEK_SET)
    if not text:
        return pixels, None
    warning, passed_on = None, []
    for line in text.splitlines(keepends=True):
        if warning is None and line.startswith(_CORRUPTION_WARNINGS):
            warning = " ".join(line.decode("utf-8", "replace").split())
        elif not line.startswith(_CORRUPTION_WARNINGS):
            passed_on.append(line)
    if passed_on:
        os.write(2, b"".join(passed_on))
    return pixels, warning


_BAND_PIXELS = 1 << 16  # samples per band: its uint32 temporary is 256 KiB


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    """round(v / 257) per sample (the exact inverse of 8 -> 16 bit expansion, v * 257),
    a band of rows at a time so the 32-bit temporaries stay small."""
    out = np.empty(pixels.shape, np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, pixels[0].size))
    for top in range(0, pixels.shape[0], rows):
        band = pixels[top:top + rows].astype(np.uint32)
        band += 128
        band //= 257
        out[top:top + rows] = band
    return out


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

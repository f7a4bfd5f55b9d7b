"""A deterministic collection of real image files for decode, source and end-to-end tests.

`make_collection(root)` writes good images of many sizes and encodings (nested folders,
upper-case extensions, grayscale, alpha, 16-bit, palette, CMYK, EXIF-rotated JPEGs) and a
few bad files, and returns what a correct decoder must produce for each. Pixels are
written with Pillow or by hand (16-bit PNG/TIFF), never with OpenCV, so a decoder test
does not compare OpenCV with itself.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ImageCase", "make_collection", "scene", "write_png16", "write_tiff16"]

# EXIF tag 0x0112; values as in the EXIF specification.
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageCase:
    """One file of the collection and what decoding it must give.

    `size` is (height, width) as displayed (after EXIF orientation); `rgb` is the
    displayed H x W x 3 uint8 RGB image. Lossless cases must decode exactly; lossy ones
    (JPEG, lossy WebP) within a small tolerance. Bad cases have `ok=False`, no size or
    pixels, and `error` holding the reason the decoder reports after "<name>: ".
    """

    image_id: str
    path: Path
    size: tuple[int, int] | None
    ok: bool
    rgb: np.ndarray | None = field(default=None, repr=False, compare=False)
    lossless: bool = True
    error: str | None = None


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """An RGB uint8 picture with real structure: a colour gradient plus a few solid
    shapes in distinct colours, placed by `seed`, so a segmentation mask varies over it
    and any flip, rotation or channel swap changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 40 + 150 * xx / max(width - 1, 1)
    img[..., 1] = 30 + 120 * yy / max(height - 1, 1)
    img[..., 2] = 90 + 60 * np.sin((xx + yy) / max(height, width) * 3.0)
    palette = np.array(
        [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
         (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 250, 250), (10, 10, 10)],
        np.float32,
    )
    for k in range(int(rng.integers(3, 6))):
        color = palette[(seed + 3 * k) % len(palette)]
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if k % 2 == 0:  # disc
            r = rng.uniform(0.1, 0.3) * min(height, width) + 1
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = color
        else:  # rectangle
            h2 = rng.uniform(0.1, 0.25) * height + 1
            w2 = rng.uniform(0.1, 0.25) * width + 1
            img[(np.abs(yy - cy) <= h2) & (np.abs(xx - cx) <= w2)] = color
    # A marker in the top-left corner makes orientation errors obvious.
    img[: max(2, height // 8), : max(2, width // 5)] = (255, 0, 0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    # Same weights as ITU-R 601 luma, rounded; the exact formula does not matter because
    # the gray image itself is what gets written.
    g = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _to16(pixels: np.ndarray, offset: int) -> np.ndarray:
    return np.minimum(pixels.astype(np.uint32) * 257 + offset, 65535).astype(np.uint16)


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """Write a 16-bit PNG (gray H x W or RGB H x W x 3, uint16) by hand; Pillow cannot
    write 16-bit RGB."""
    pixels = np.asarray(pixels, np.uint16)
    color_type = 0 if pixels.ndim == 2 else 2
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()  # filter 0

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(
            ">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_tiff16(path: Path, pixels: np.ndarray) -> None:
    """Write an uncompressed little-endian 16-bit RGB TIFF (H x W x 3 uint16) by hand."""
    pixels = np.ascontiguousarray(pixels, "<u2")
    height, width, channels = pixels.shape
    data = pixels.tobytes()
    bits_offset = 8
    data_offset = bits_offset + 8
    ifd_offset = data_offset + len(data)
    ifd_offset += ifd_offset % 2
    # (tag, type, count, value): type 3 = SHORT, 4 = LONG.
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, channels, bits_offset),
        (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, data_offset), (277, 3, 1, channels),
        (278, 4, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if typ == 3 and count == 1:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    ifd += struct.pack("<I", 0)
    out = b"II*\x00" + struct.pack("<I", ifd_offset)
    out += struct.pack("<4H", *([16] * channels + [0] * (4 - channels)))
    out += data + b"\x00" * (ifd_offset - data_offset - len(data)) + ifd
    path.write_bytes(out)


# Displayed image from the stored (raw) pixels, per EXIF orientation value.
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_collection(root: Path) -> dict[str, ImageCase]:
    """Write the collection under `root` and return its cases keyed by image_id (the
    path relative to `root`, forward slashes). Deterministic: same bytes every call."""
    root = Path(root)
    cases: dict[str, ImageCase] = {}
    seed = [100]

    def next_scene(h: int, w: int) -> np.ndarray:
        seed[0] += 1
        return scene(h, w, seed[0])

    def put(image_id: str, data: bytes, expected: np.ndarray | None, *,
            lossless: bool = True, error: str | None = None) -> None:
        path = root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        add(image_id, expected, lossless=lossless, error=error)

    def add(image_id: str, expected: np.ndarray | None, *, lossless: bool = True,
            error: str | None = None) -> None:
        ok = expected is not None
        if ok:
            expected = np.ascontiguousarray(expected)
            expected.setflags(write=False)
        cases[image_id] = ImageCase(
            image_id=image_id, path=root / image_id,
            size=tuple(expected.shape[:2]) if ok else None, ok=ok,
            rgb=expected, lossless=lossless, error=error)

    # 4:4:4 chroma keeps JPEG close to the source; two files keep the common 4:2:0.
    jpeg = {"quality": 95, "subsampling": 0}

    # Plain RGB at odd and even sizes, nested folders.
    for image_id, (h, w) in {
        "rgb_53x37.png": (37, 53), "rgb_64x64.png": (64, 64),
        "street/rgb_200x120.png": (120, 200), "street/day/rgb_8x8.png": (8, 8),
        "street/night/wide_300x16.png": (16, 300), "fields/a/b/c/deep_41x29.png": (29, 41),
    }.items():
        rgb = next_scene(h, w)
        put(image_id, _save(Image.fromarray(rgb), "PNG"), rgb)
    for image_id, (h, w), kw in [
        ("street/photo_200x120.jpg", (120, 200), {}),
        ("street/day/photo_512x384.jpg", (384, 512), {"subsampling": 2}),
        ("fields/tall_16x300.jpg", (300, 16), {}),
        ("fields/progressive_97x61.jpeg", (61, 97), {"progressive": True, "subsampling": 2}),
    ]:
        rgb = next_scene(h, w)
        put(image_id, _save(Image.fromarray(rgb), "JPEG", **{**jpeg, **kw}), rgb,
            lossless=False)

    # A pure red image: catches any BGR leak at a glance.
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    put("colors/pure_red.png", _save(Image.fromarray(red), "PNG"), red)
    rgb = next_scene(40, 48)
    put("colors/channels_48x40.bmp", _save(Image.fromarray(rgb), "BMP"), rgb)

    # Upper/mixed-case extensions.
    rgb = next_scene(45, 70)
    put("upper/CAMERA_70x45.JPG", _save(Image.fromarray(rgb), "JPEG", **jpeg), rgb,
        lossless=False)
    rgb = next_scene(33, 66)
    put("upper/SCAN_66x33.PNG", _save(Image.fromarray(rgb), "PNG"), rgb)
    rgb = next_scene(50, 50)
    put("upper/mixed_50x50.Jpeg", _save(Image.fromarray(rgb), "JPEG", **jpeg), rgb,
        lossless=False)
    gray = _gray(next_scene(31, 59))
    put("upper/gray_59x31.TIFF", _save(Image.fromarray(gray), "TIFF"), _as_rgb(gray))

    # Grayscale and alpha (alpha is dropped: the colour under it is kept as stored).
    gray = _gray(next_scene(48, 64))
    put("gray/gray_64x48.png", _save(Image.fromarray(gray), "PNG"), _as_rgb(gray))
    gray = _gray(next_scene(75, 90))
    put("gray/gray_90x75.jpg", _save(Image.fromarray(gray), "JPEG", **jpeg), _as_rgb(gray),
        lossless=False)
    gray = _gray(next_scene(20, 36))
    put("gray/gray_36x20.bmp", _save(Image.fromarray(gray), "BMP"), _as_rgb(gray))
    rgb = next_scene(60, 80)
    alpha = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (60, 1))
    alpha[:10] = 0  # fully transparent rows still carry colour
    put("alpha/rgba_80x60.png", _save(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), rgb)
    gray = _gray(next_scene(44, 52))
    alpha = np.full_like(gray, 128)
    alpha[::3] = 0
    put("alpha/la_52x44.png", _save(Image.fromarray(np.dstack([gray, alpha])), "PNG"),
        _as_rgb(gray))
    rgb = next_scene(30, 30)
    alpha = np.full((30, 30), 200, np.uint8)
    put("alpha/rgba_30x30.webp",
        _save(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True, exact=True),
        rgb)

    # 16-bit: values are 8-bit content * 257 plus an offset below 128.5 (capped at
    # 65535), so the right 16 -> 8 bit scaling (round(v / 257)) gives the 8-bit content
    # back exactly and a plain `>> 8` does not.
    rgb = next_scene(50, 70)
    write_png16_path = root / "deep/rgb16_70x50.png"
    write_png16_path.parent.mkdir(parents=True, exist_ok=True)
    write_png16(write_png16_path, _to16(rgb, 100))
    add("deep/rgb16_70x50.png", rgb)
    gray = _gray(next_scene(40, 40))
    put("deep/gray16_40x40.png",
        _save(Image.fromarray(_to16(gray, 27)), "PNG"), _as_rgb(gray))
    rgb = next_scene(24, 56)
    write_tiff16(root / "deep/rgb16_56x24.tif", _to16(rgb, 90))
    add("deep/rgb16_56x24.tif", rgb)

    # Palette PNGs (with and without a transparent entry) and other encodings.
    rgb = next_scene(64, 96)
    pal = Image.fromarray(rgb).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    put("palette/palette_96x64.png", _save(pal, "PNG"), np.asarray(pal.convert("RGB")))
    rgb = next_scene(40, 50)
    pal = Image.fromarray(rgb).quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    put("palette/palette_trns_50x40.png", _save(pal, "PNG", transparency=0),
        np.asarray(pal.convert("RGB")))
    rgb = next_scene(54, 72)
    put("formats/cmyk_72x54.jpg",
        _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", **jpeg), rgb, lossless=False)
    rgb = next_scene(64, 48)
    put("formats/rgb_48x64.tif", _save(Image.fromarray(rgb), "TIFF"), rgb)
    rgb = next_scene(36, 60)
    put("formats/lzw_60x36.tiff", _save(Image.fromarray(rgb), "TIFF", compression="tiff_lzw"),
        rgb)
    rgb = next_scene(56, 40)
    put("formats/lossless_40x56.webp", _save(Image.fromarray(rgb), "WEBP", lossless=True), rgb)
    rgb = next_scene(48, 64)
    put("formats/lossy_64x48.webp", _save(Image.fromarray(rgb), "WEBP", quality=95), rgb,
        lossless=False)

    # EXIF orientation: stored pixels are the raw (unrotated) scene; the expected image
    # is what a viewer displays.
    for orientation, (h, w) in [(6, (37, 53)), (8, (64, 48)), (3, (40, 72)), (1, (30, 44)),
                                (5, (24, 40))]:
        raw = next_scene(h, w)
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        shown = _ORIENT[orientation](raw)
        put(f"exif/orientation{orientation}_{w}x{h}.jpg",
            _save(Image.fromarray(raw), "JPEG", exif=exif, **jpeg), shown, lossless=False)

    # Bad files: each must become an error, never an exception that stops a job.
    good_jpeg = _save(Image.fromarray(next_scene(64, 64)), "JPEG", **jpeg)
    put("bad/empty.jpg", b"", None, error="not a decodable image (0 bytes)")
    truncated = good_jpeg[: len(good_jpeg) // 2]
    put("bad/truncated.jpg", truncated, None,
        error=f"truncated JPEG (64x64 declared, {len(truncated)} bytes, no end marker); not decoded")
    text = b"this is a text file, not a PNG\n"
    put("bad/not_an_image.png", text, None,
        error=f"not a decodable image (not PNG, JPEG, BMP, WebP or TIFF, or its header is cut "
              f"short; {len(text)} bytes)")
    png = _save(Image.fromarray(next_scene(64, 64)), "PNG")
    put("bad/truncated.png", png[:-20], None,
        error=f"truncated PNG (64x64 declared, {len(png) - 20} bytes, no end marker); not decoded")
    put("bad/one_pixel.png", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), None,
        error="image too small to label (1x1; minimum 8x8)")
    put("bad/thin_20x4.png", _save(Image.fromarray(next_scene(4, 20)), "PNG"), None,
        error="image too small to label (20x4; minimum 8x8)")
    return cases

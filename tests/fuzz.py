"""A corpus of mutated images from a fixed seed, and a command that labels it.

`make_corpus(folder, count, seed)` writes `count` files derived from real PNG, JPEG, BMP,
WebP and TIFF images by random mutations: bit flips, truncation at a random offset,
header fields rewritten (PNG IHDR and JPEG SOF sizes, BMP dimensions), bytes of one
format spliced behind another's signature, and files under the wrong extension. The
same seed gives the same corpus, byte for byte.

The test suite labels 300 of them (tests/e2e/test_hostile.py). The longer run:

    python -m tests.fuzz --count 3000 --out /tmp/fuzz

writes the corpus, runs `drn-label run` over it, checks that every input became exactly
one row, and prints rows, ok/error counts, wall time and the largest decode peak.
"""
from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

FORMATS = {"png": ".png", "jpg": ".jpg", "bmp": ".bmp", "webp": ".webp", "tif": ".tif"}


def _seed_images(rng: np.random.Generator) -> dict[str, bytes]:
    """One small real image per format (smooth gradients plus noise: compressible, not flat)."""
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.float32)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    out = {}
    for name, ext in FORMATS.items():
        ok, buf = cv2.imencode(ext, rgb[..., ::-1])
        assert ok, ext
        out[name] = buf.tobytes()
    return out


def _flip_bits(data: bytearray, rng: np.random.Generator) -> bytearray:
    for _ in range(int(rng.integers(1, 16))):
        i = int(rng.integers(0, len(data)))
        data[i] ^= 1 << int(rng.integers(0, 8))
    return data


def _truncate(data: bytearray, rng: np.random.Generator) -> bytearray:
    return data[: int(rng.integers(0, len(data)))]


def _rewrite_size(data: bytearray, rng: np.random.Generator) -> bytearray:
    """Forge the declared width/height (huge, zero or odd) where the format keeps them."""
    w, h = (int(v) for v in rng.choice([0, 1, 7, 65535, 32000, 8000, 100000], 2))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        data[16:24] = struct.pack(">II", w, h)
    elif data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 < len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            length = struct.unpack(">H", bytes(data[pos + 2:pos + 4]))[0]
            if marker in (0xC0, 0xC1, 0xC2):
                data[pos + 5:pos + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
                break
            pos += 2 + length
    elif data[:2] == b"BM":
        data[18:26] = struct.pack("<ii", min(w, 2**31 - 1), -min(h, 2**31 - 1))
    else:
        return _flip_bits(data, rng)
    return data


def _splice(data: bytearray, rng: np.random.Generator, seeds: dict[str, bytes]) -> bytearray:
    """Another format's signature in front of this file's body."""
    other = seeds[str(rng.choice(list(seeds)))]
    cut = int(rng.integers(2, 24))
    return bytearray(other[:cut]) + data[cut:]


def make_corpus(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` mutated images into `folder`; returns their paths (sorted)."""
    rng = np.random.default_rng(seed)
    seeds = _seed_images(rng)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(seeds)
    paths = []
    for i in range(count):
        fmt = names[i % len(names)]
        data = bytearray(seeds[fmt])
        kind = int(rng.integers(0, 6))
        if kind == 0:
            data = _flip_bits(data, rng)
        elif kind == 1:
            data = _truncate(data, rng)
        elif kind == 2:
            data = _rewrite_size(data, rng)
        elif kind == 3:
            data = _splice(data, rng, seeds)
        elif kind == 4:  # the wrong extension, bytes untouched
            fmt = names[(names.index(fmt) + 1) % len(names)]
        # kind 5: unmutated, must label fine
        path = folder / f"{i:05d}-{kind}{FORMATS[fmt]}"
        path.write_bytes(bytes(data))
        paths.append(path)
    return sorted(paths)


def decode_peak_bytes(path: Path) -> int:
    """Peak memory traced while reading and decoding one file as a labelling run does."""
    import pyarrow as pa

    from pipeline.job.stages import decode_batch

    batch = pa.table({"image_id": [path.name], "uri": [str(path)]})
    tracemalloc.start()
    try:
        decode_batch(batch, max_side=2048, retries=0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="working folder (corpus, output)")
    args = parser.parse_args(argv)
    corpus = make_corpus(args.out / "corpus", args.count, args.seed)
    peak = max(decode_peak_bytes(p) for p in corpus)
    t0 = time.time()
    output = args.out / "labels"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(args.out / "corpus"),
                           str(output), "--num-classes", "3", "--max-side", "64",
                           "--batch-size", "8", "--rows-per-file", "500"], text=True)
    wall = time.time() - t0
    import pyarrow.parquet as pq

    from pipeline.store.output import data_files

    table = pq.read_table(data_files(str(output)), columns=["image_id", "status"])
    ids = table["image_id"].to_pylist()
    ok = sum(s == "ok" for s in table["status"].to_pylist())
    expected = sorted(p.name for p in corpus)
    print(f"inputs {len(corpus)}  rows {len(ids)}  unique {len(set(ids))}  ok {ok}  "
          f"errors {len(ids) - ok}  exit {proc.returncode}  wall {wall:.1f}s  "
          f"largest decode peak {peak / 2**20:.1f} MiB")
    return 0 if proc.returncode == 0 and sorted(ids) == expected else 1


if __name__ == "__main__":
    sys.exit(main())

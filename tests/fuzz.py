"""Fuzz corpora from a fixed seed, and a command that labels them.

`make_corpus(folder, count, seed)` writes `count` files derived from real PNG, JPEG, BMP,
WebP and TIFF images by random mutations: bit flips, truncation at a random offset,
header fields rewritten (PNG IHDR and JPEG SOF sizes, BMP dimensions), bytes of one
format spliced behind another's signature, and files under the wrong extension.

`make_manifest_corpus(folder, count, seed)` writes a CSV manifest of `count` rows: about
two thirds such mutated image files, the rest cases that only a manifest can hold: bad
URLs (malformed ports and hosts, other schemes, internal addresses that must be refused
without a connection), members of WebDataset shards cut or corrupted at random, rows of
an embedded-bytes Parquet file (some past its end), missing files and special files;
every row with an odd image_id (quotes, commas, newlines, 300 characters, non-ASCII,
empty: the URI then). `make_shards(folder, count, seed)` writes shards damaged at random
(cut inside a member or a header, bytes flipped in a header, junk). The same seed gives
the same corpus, byte for byte.

The test suite labels a 300-row manifest corpus (tests/e2e/test_hostile.py) and lists a
shard corpus (tests/unit/test_web_sources.py). The longer run:

    python -m tests.fuzz --count 3000 --out /tmp/fuzz

writes the manifest corpus, runs `drn-label run` over it, checks that every row became
exactly one output row, and prints rows, ok/error counts, wall time and the largest
decode peak (docs/benchmarks.md has a run's figures).
"""
from __future__ import annotations

import argparse
import os
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


_ODD_IDS = ("", "with space", 'quo"te', "comma,inside", "new\nline", "tab\there", "x" * 300,
            "caf\u00e9/\u6f22\u5b57", "../../escape", "trailing/", "#hash", "  padded  ",
            "emoji \U0001f600", "back\\slash")
_BAD_URLS = ("http://host:abc/x.png", "http://[::1/x.png", "http:///x.png", "http://:80/x.png",
             "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/x", "http://127.0.0.1:9/x.png",
             "https://127.0.0.2/x.png", "http://[::1]:8080/x.png", "http://0.0.0.0/x.png",
             "http://[::ffff:127.0.0.1]/x.png", "http://localhost:99999/x.png",
             "http://0x7f.1/x.png", "http://127.1/x y.png", "http://127.0.0.1:8\n0/x.png")
"""Every one is malformed or names this machine (refused before any connection, as a run
without --allow-private-urls does): the corpus needs no network and reaches no host."""


def make_shards(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` WebDataset shards of 2 to 6 mutated-or-good images (plus a .cls member each),
    about half of them damaged: cut at a random offset, a header's bytes flipped, or junk."""
    import io
    import tarfile

    rng = np.random.default_rng(seed + 1)
    seeds = _seed_images(rng)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(seeds)
    paths = []
    for i in range(count):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for k in range(int(rng.integers(2, 7))):
                fmt = names[int(rng.integers(0, len(names)))]
                for name, data in ((f"{k:03d}{FORMATS[fmt]}", seeds[fmt]), (f"{k:03d}.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = bytearray(buf.getvalue())
        damage = int(rng.integers(0, 6))
        if damage == 0:
            data = data[: int(rng.integers(1, len(data)))]
        elif damage == 1:  # flip bytes in the first header (its name, size or checksum)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, 512))] ^= 0xFF
        elif damage == 2:
            data = bytearray(rng.bytes(int(rng.integers(1, 4096))))
        path = folder / f"shard-{i:04d}.tar"
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def make_manifest_corpus(folder: Path, count: int, seed: int = 0) -> tuple[Path, list[str]]:
    """A CSV manifest of `count` rows (see the module's doc) in `folder`, and the image_ids
    a run must give one row each."""
    import csv
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 2)
    images = make_corpus(folder / "images", count - count // 3, seed)
    uris = [str(p.relative_to(folder)) for p in images]
    shards = make_shards(folder / "shards", max(1, count // 30), seed)
    members = []
    for shard in shards:  # members as a listing of the intact part would name them
        try:
            with tarfile.open(shard, mode="r:") as tar:
                members += [f"{shard}#{m.name}@{m.offset_data}+{m.size}" for m in tar if m.isfile()]
        except (tarfile.TarError, OSError, EOFError):
            pass
    seeds = _seed_images(rng)
    cells = [seeds[str(rng.choice(list(seeds)))] if rng.random() < 0.7 else rng.bytes(64)
             for _ in range(12)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    embedded = folder / "embedded.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": c, "path": None} for c in cells],
                                               image_type)}), embedded, row_group_size=5)
    os.mkfifo(folder / "fifo.png")
    extra = ([f"{embedded}#row={k}" for k in range(14)] + members
             + [f"{u}?{k}" if u.startswith("http") else u for k, u in enumerate(_BAD_URLS)]
             + [str(folder / "missing.png"), str(folder / "images"), "/dev/zero",
                str(folder / "fifo.png")])
    rng.shuffle(extra)
    uris += extra[: count - len(uris)]
    while len(uris) < count:  # more bad URLs, each made unique by its query
        uris.append(f"{_BAD_URLS[len(uris) % len(_BAD_URLS)]}?n={len(uris)}")
    rows, ids = [], []
    for i, uri in enumerate(uris):
        odd = _ODD_IDS[int(rng.integers(0, len(_ODD_IDS)))]
        image_id = f"{i:05d} {odd}" if odd else ""
        rows.append((image_id, uri))
        ids.append(image_id or uri.strip())
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "uri"])
        writer.writerows(rows)
    return folder / "manifest.csv", ids


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
    manifest, expected = make_manifest_corpus(args.out / "corpus", args.count, args.seed)
    peak = max(decode_peak_bytes(p) for p in sorted((args.out / "corpus" / "images").iterdir()))
    t0 = time.time()
    output = args.out / "labels"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(manifest),
                           str(output), "--num-classes", "3", "--max-side", "64",
                           "--batch-size", "8", "--rows-per-file", "500"], text=True)
    wall = time.time() - t0
    import pyarrow.parquet as pq

    from pipeline.store.output import data_files

    table = pq.read_table(data_files(str(output)), columns=["image_id", "status", "error"])
    ids = table["image_id"].to_pylist()
    ok = sum(s == "ok" for s in table["status"].to_pylist())
    one_line = all("\n" not in e for e in table["error"].to_pylist() if e)
    print(f"inputs {len(expected)}  rows {len(ids)}  unique {len(set(ids))}  ok {ok}  "
          f"errors {len(ids) - ok}  exit {proc.returncode}  wall {wall:.1f}s  "
          f"largest decode peak {peak / 2**20:.1f} MiB  one-line errors {one_line}")
    return 0 if proc.returncode == 0 and sorted(ids) == sorted(expected) and one_line else 1


if __name__ == "__main__":
    sys.exit(main())

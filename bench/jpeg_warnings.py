"""What watching libjpeg's warnings costs a normal JPEG (pipeline.store.decode).

Decodes the same JPEGs with `decode_image` (fd 2 pointed at a scratch file around
cv2.imdecode) and with the bare calls it makes otherwise (header check, cv2.imdecode,
cvtColor), alternating rounds so that a busy machine slows both alike; prints the median
per image and the ratio.

    python -m bench.jpeg_warnings --count 200 --side 512 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from pipeline.store.decode import _FLAGS, decode_image, read_header


def _bare(data: bytes) -> np.ndarray:
    read_header(data)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB, dst=pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:args.side, 0:args.side]
    images = []
    for k in range(args.count):
        rgb = np.stack([xx + k, yy * 2, (xx + yy) // 2], -1) % 256
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        images.append(cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    watched, bare = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for data in images:
            decode_image(data, "x.jpg")
        watched.append((time.perf_counter() - t) / len(images))
        t = time.perf_counter()
        for data in images:
            _bare(data)
        bare.append((time.perf_counter() - t) / len(images))
    w, b = statistics.median(watched), statistics.median(bare)
    print(f"{args.count} JPEGs {args.side}x{args.side}, {args.rounds} rounds: watched "
          f"{w * 1e6:.0f} us/image, bare {b * 1e6:.0f} us/image, ratio {w / b:.3f} "
          f"(+{(w - b) * 1e6:.0f} us/image)")


if __name__ == "__main__":
    main()

"""Gallery pictures stay small on photos: the overlay of a textured 768 x 1024 photo at the
default thumbnail size weighs at most 30 KB (the same picture as PNG does not fit)."""
from __future__ import annotations

import base64

import cv2
import numpy as np
from PIL import Image

import drn
from pipeline.store.output import OutputMetadata
from pipeline.tools.report import MAX_THUMB_BYTES, THUMB_SIDE, gallery_item
from tests.imagegen import scene


def _bytes(uri: str) -> int:
    return len(base64.b64decode(uri.split(",", 1)[1]))


def test_overlay_of_a_photo_fits_the_budget(tmp_path):
    rng = np.random.default_rng(0)
    # A photo-like picture: smooth scene plus sensor-like grain (PNG cannot compress grain).
    photo = np.clip(scene(768, 1024, seed=5).astype(np.int16)
                    + rng.normal(0, 12, (768, 1024, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(path, quality=92)
    mask = (np.arange(768)[:, None] // 96 + np.arange(1024)[None, :] // 128).astype(np.uint8) % 19
    ls = drn.get_preset("cityscapes")
    meta = OutputMetadata(model="drn_d_22", weights=None, weights_sha256="x", num_classes=19,
                          classes=tuple(ls.class_names), palette=tuple(map(tuple, ls.palette)),
                          mean=tuple(ls.mean), std=tuple(ls.std))
    item = gallery_item("photo.jpg", str(path), 0.5, mask, meta)
    assert item.note is None
    assert item.overlay_uri.startswith("data:image/webp;base64,")
    assert item.image_uri.startswith("data:image/jpeg;base64,")
    assert _bytes(item.overlay_uri) <= MAX_THUMB_BYTES and _bytes(item.image_uri) <= MAX_THUMB_BYTES
    # The same overlay as PNG (the former encoding) does not fit: the budget is a real bound.
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(item.overlay_uri.split(",", 1)[1]),
                                         np.uint8), cv2.IMREAD_COLOR)
    assert max(overlay.shape[:2]) == THUMB_SIDE
    assert len(cv2.imencode(".png", overlay)[1]) > MAX_THUMB_BYTES

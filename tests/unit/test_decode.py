"""pipeline.store.decode on real files of every supported kind (tests/imagegen.py)."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.store.decode import MIN_SIDE, DecodeError, decode_image, fit_max_side, resize_mask
from tests.imagegen import ImageCase, make_collection, scene, write_png16, write_tiff16

# Mean absolute difference allowed for lossy files (JPEG q95, lossy WebP); a wrong
# orientation, flip or channel order costs far more (see test_lossy_tolerance_is_tight).
LOSSY_MEAN_TOLERANCE = 6.0


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, ImageCase]:
    return make_collection(tmp_path_factory.mktemp("images"))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_collection_covers_the_cases(collection):
    good = [c for c in collection.values() if c.ok]
    assert len(good) >= 30
    assert len(collection) - len(good) >= 4
    ids = set(collection)
    for suffix in (".JPG", ".PNG", ".Jpeg", ".bmp", ".tif", ".tiff", ".webp", ".jpeg"):
        assert any(i.endswith(suffix) for i in ids), suffix
    assert any(i.count("/") >= 3 for i in ids)


def test_collection_is_deterministic(tmp_path):
    first = make_collection(tmp_path / "a")
    second = make_collection(tmp_path / "b")
    for image_id, case in first.items():
        assert case.path.read_bytes() == second[image_id].path.read_bytes(), image_id


def test_every_good_image_decodes_as_displayed(collection):
    for image_id, case in collection.items():
        if not case.ok:
            continue
        rgb = decode_image(case.path.read_bytes(), image_id)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, image_id
        assert rgb.shape[:2] == case.size, image_id
        assert rgb.flags.c_contiguous, image_id
        if case.lossless:
            np.testing.assert_array_equal(rgb, case.rgb, err_msg=image_id)
        else:
            assert _mean_diff(rgb, case.rgb) < LOSSY_MEAN_TOLERANCE, image_id


def test_lossy_tolerance_is_tight(collection):
    """The tolerance would catch a channel swap or an unapplied EXIF rotation."""
    for image_id in ("exif/orientation3_72x40.jpg", "upper/CAMERA_70x45.JPG",
                     "formats/cmyk_72x54.jpg"):
        case = collection[image_id]
        rgb = decode_image(case.path.read_bytes(), image_id)
        assert _mean_diff(rgb[..., ::-1], case.rgb) > 3 * LOSSY_MEAN_TOLERANCE
        assert _mean_diff(rgb[::-1, ::-1], case.rgb) > 3 * LOSSY_MEAN_TOLERANCE


@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_exif_orientation_is_applied(collection, orientation):
    (case,) = [c for i, c in collection.items()
               if i.startswith(f"exif/orientation{orientation}_")]
    stored = Image.open(case.path)
    rgb = decode_image(case.path.read_bytes(), case.image_id)
    if orientation in (5, 6, 8):  # quarter turns swap the sides
        assert rgb.shape[:2] == (stored.width, stored.height)
    else:
        assert rgb.shape[:2] == (stored.height, stored.width)
    # The red marker sits in the top-left corner of the stored (raw) pixels; where it is
    # shown depends on the orientation.
    h, w = rgb.shape[:2]
    corners = {"tl": rgb[1, 1], "tr": rgb[1, w - 2], "bl": rgb[h - 2, 1],
               "br": rgb[h - 2, w - 2]}
    red = [name for name, (r, g, b) in corners.items() if r > 200 and g < 60 and b < 60]
    assert red == [{3: "br", 5: "tl", 6: "tr", 8: "bl"}[orientation]], corners


def test_red_stays_red():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    rgb = decode_image(_png(red), "red.png")
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    np.testing.assert_array_equal(rgb, red)


def test_sixteen_bit_scales_with_rounding(tmp_path):
    values = np.array([0, 128, 129, 257, 385, 386, 32896, 65407, 65535], np.uint16)
    expected = np.array([0, 0, 1, 1, 1, 2, 128, 255, 255], np.uint8)  # round(v / 257)
    pixels = np.tile(values, (8, 1))
    rgb16 = np.dstack([pixels, pixels[:, ::-1], np.full_like(pixels, 65535)])
    for path, writer in ((tmp_path / "x.png", write_png16), (tmp_path / "x.tif", write_tiff16)):
        writer(path, rgb16)
        rgb = decode_image(path.read_bytes(), path.name)
        np.testing.assert_array_equal(rgb[..., 0], np.tile(expected, (8, 1)), err_msg=path.name)
        np.testing.assert_array_equal(rgb[..., 1], np.tile(expected[::-1], (8, 1)))
        assert (rgb[..., 2] == 255).all()


def test_alpha_is_dropped_not_composited():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = 0  # fully transparent: the stored colour is kept
    rgb = decode_image(_png(rgba), "clear.png")
    assert (rgb == (10, 200, 30)).all()


@pytest.mark.parametrize("image_id", ["bad/empty.jpg", "bad/truncated.jpg",
                                      "bad/not_an_image.png", "bad/truncated.png",
                                      "bad/one_pixel.png", "bad/thin_20x4.png"])
def test_bad_files_give_one_line_errors(collection, image_id):
    case = collection[image_id]
    with pytest.raises(DecodeError) as info:
        decode_image(case.path.read_bytes(), image_id)
    assert str(info.value) == f"{image_id}: {case.error}"
    assert "\n" not in str(info.value)


def test_error_texts():
    with pytest.raises(DecodeError, match=r"^data/003\.jpg: not a decodable image \(0 bytes\)$"):
        decode_image(b"", "data/003.jpg")
    with pytest.raises(DecodeError) as info:
        decode_image(b"x" * 1234, "data/004.jpg")
    assert str(info.value) == (
        "data/004.jpg: not a decodable image (not PNG, JPEG, BMP, WebP or TIFF, or its header "
        "is cut short; 1234 bytes)")
    with pytest.raises(DecodeError) as info:
        decode_image(_png(np.zeros((1, 1, 3), np.uint8)), "x.png")
    assert str(info.value) == "x.png: image too small to label (1x1; minimum 8x8)"
    assert MIN_SIDE == 8
    assert isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is DecodeError and str(again) == str(info.value)


def test_smallest_accepted_size():
    rgb = scene(MIN_SIDE, MIN_SIDE, seed=1)
    np.testing.assert_array_equal(decode_image(_png(rgb), "8.png"), rgb)
    with pytest.raises(DecodeError, match=r"\(8x7; minimum 8x8\)"):
        decode_image(_png(scene(7, 8, seed=1)), "7.png")


def test_fit_max_side():
    rgb = scene(300, 200, seed=3)
    assert fit_max_side(rgb, 300) is rgb
    assert fit_max_side(rgb, 1000) is rgb
    small = fit_max_side(rgb, 150)
    assert small.shape == (150, 100, 3) and small.dtype == np.uint8
    # Area interpolation averages: a uniform image stays uniform.
    flat = np.full((64, 48, 3), (12, 34, 56), np.uint8)
    np.testing.assert_array_equal(fit_max_side(flat, 16), np.full((16, 12, 3), (12, 34, 56)))
    thin = fit_max_side(scene(8, 4000, seed=2), 100)
    assert thin.shape == (1, 100, 3)  # never below 1 pixel
    wide = fit_max_side(scene(99, 301, seed=4), 100)
    assert wide.shape == (33, 100, 3)
    with pytest.raises(ValueError):
        fit_max_side(rgb, 0)


def test_resize_mask_is_nearest_and_keeps_dtype():
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    big = resize_mask(mask, 4, 6)
    assert big.dtype == np.uint8 and big.shape == (4, 6)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(mask, 2, axis=0), 3, axis=1))
    mask16 = np.array([[0, 300], [999, 65535]], np.uint16)
    big16 = resize_mask(mask16, 5, 3)
    assert big16.dtype == np.uint16 and big16.shape == (5, 3)
    assert set(np.unique(big16)) <= set(mask16.ravel())  # never blended
    assert resize_mask(mask, 2, 2) is mask
    # A round trip through fit_max_side's size gives back the labels on a grid.
    labels = (np.arange(40 * 60).reshape(40, 60) // 7 % 5).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(resize_mask(labels, 80, 120), 40, 60), labels)
    with pytest.raises(ValueError):
        resize_mask(mask.astype(np.int32), 4, 4)
    with pytest.raises(ValueError):
        resize_mask(np.zeros((2, 2, 1), np.uint8), 4, 4)


def _jpeg_scan_damage() -> tuple[bytes, bytes, bytes]:
    """(a good JPEG, its scan cut to a third with the end marker put back, its scan with
    bits flipped): the two damaged ones decode in OpenCV to a picture padded with grey,
    with only a libjpeg warning on stderr."""
    import cv2

    rgb = scene(96, 128, seed=5)
    good = cv2.imencode(".jpg", rgb[..., ::-1])[1].tobytes()
    scan = good.find(b"\xff\xda")
    cut = good[: scan + (len(good) - scan) // 3] + b"\xff\xd9"
    flipped = bytearray(good)
    for k in range(20):
        flipped[scan + 200 + 37 * k] ^= 0x55
    return good, cut, bytes(flipped)


def test_a_jpeg_the_decoder_had_to_fill_in_is_an_error(capfd):
    import cv2

    good, cut, flipped = _jpeg_scan_damage()
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV: "ok"
    capfd.readouterr()
    with pytest.raises(DecodeError) as info:
        decode_image(cut, "cut.jpg")
    assert str(info.value) == ("cut.jpg: corrupt JPEG, the decoder had to fill it in (Corrupt JPEG "
                               "data: premature end of data segment); not labelled")
    with pytest.raises(DecodeError, match=r"^flipped\.jpg: corrupt JPEG, the decoder had to fill "
                                          r"it in \(Corrupt JPEG data: \d+ extraneous bytes"):
        decode_image(flipped, "flipped.jpg")
    assert decode_image(good, "good.jpg").shape == (96, 128, 3)
    import os

    os.write(2, b"stderr is back\n")  # fd 2 is restored, and the warnings went nowhere else
    err = capfd.readouterr().err
    assert err == "stderr is back\n", err

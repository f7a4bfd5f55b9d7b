"""Mask encodings of labelling tools, both directions, side by side: Label Studio's brush
RLE and COCO's RLE / polygons, plus the file names derived from image ids that exports
and imports share.

Exports (`pipeline.tools.export`) encode OUTPUT's masks with these; imports
(`pipeline.training.importer`) decode what annotators send back. Keeping each pair in
one module is what makes "export, then import" reproduce the masks exactly (tested).
Ray-free and Parquet-free; pycocotools does COCO's RLE arithmetic.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

import numpy as np


def classes_present(mask: np.ndarray, num_classes: int) -> list[int]:
    """Class ids that occur in `mask`, ascending (values >= num_classes, e.g. 255, skipped)."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    return np.flatnonzero(counts).tolist()


# -- file names from image ids ------------------------------------------------------------------
# Every export (PNG, YOLO, CVAT) and the import of a PNG folder name files after image ids
# the same way: the id's path with the extension dropped (``a/b.jpg`` -> ``a/b``), made safe,
# then the format's suffix (``.png``, ``.txt``). Safe: never outside the folder (empty, ``.``
# and ``..`` parts), no control characters (a newline would split CVAT's image list), no
# part longer than MAX_PART_BYTES (NAME_MAX is 255 bytes) and no name longer than
# MAX_NAME_BYTES (PATH_MAX is 4096 with the export folder's own path in front). A part that
# had to be shortened, or that already looks like a shortened one, becomes its first bytes +
# ``~`` + a digest, so the two kinds never meet. Where two exported ids would still share a
# name (``a.jpg`` and ``a.png``; ``A.jpg`` and ``a.jpg`` on a case-insensitive disk; ``a.png``
# beside a folder ``a.png/``), each of them gets ``~`` + the digest of its id (`ExportNames`).
MAX_PART_BYTES = 200
MAX_NAME_BYTES = 1000
DIGEST_CHARS = 12
NAME_SUFFIXES = (".png", ".txt")
"""Suffixes the exports add to a name; a folder named like one of them beside the name is a clash."""
_DIGESTED = re.compile(r"~[0-9a-f]{%d}" % DIGEST_CHARS, re.IGNORECASE)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def name_digest(text: str) -> str:
    """A short stable digest of `text` (blake2b), the same in every process and version."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=DIGEST_CHARS // 2).hexdigest()


def _cut(text: str, limit: int) -> str:
    """`text`'s first `limit` UTF-8 bytes, never splitting a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _safe_part(part: str) -> str:
    part = _UNSAFE.sub("_", part)
    if len(part.encode("utf-8")) > MAX_PART_BYTES or _DIGESTED.search(part):
        return _cut(part, MAX_PART_BYTES - DIGEST_CHARS - 1) + "~" + name_digest(part)
    return part


def id_name(image_id: str, *, keep_extension: bool = False) -> str:
    """The safe relative name of an image id, without a suffix: ``a/b.jpg`` -> ``a/b`` (with
    `keep_extension`, ``a/b.jpg``). A pure function of the id; see `ExportNames` for ids
    that share a name."""
    parts = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".")]
    parts = ["__" if p == ".." else p for p in parts] or ["image"]
    stem, dot, _ = parts[-1].rpartition(".")
    if not keep_extension and dot and stem:
        parts[-1] = stem
    name = "/".join(_safe_part(p) for p in parts)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:  # too deep: flat, under the id's digest
        name = _cut(_UNSAFE.sub("_", parts[-1]), MAX_PART_BYTES - DIGEST_CHARS - 1) + "~" + name_digest(image_id)
    return name


def mask_png_name(image_id: str, *, keep_extension: bool = False) -> str:
    """Relative PNG path for an image id (`id_name` + ``.png``): ``a/b.jpg`` -> ``a/b.png``
    (with `keep_extension`, ``a/b.jpg.png``). Never leaves the folder it is joined to."""
    return id_name(image_id, keep_extension=keep_extension) + ".png"


class ExportNames:
    """File names of one export's image ids, unique and the same in every format.

    Built from every id the export will write (one pass over the ids before the masks):
    an id's name is `id_name` unless another id of the export shares it, compared without
    letter case, or a folder of another id's name is that name plus a suffix
    (``a.png`` beside ``a.png/b.jpg``); then each of them is ``name~<digest of the id>``.
    The name depends on the id and the set of ids, not on their order. An id that occurs
    more than once (an OUTPUT written before duplicates were reconciled) is exported once:
    `first` says whether a row is the first of its id.

    Memory: four 8-byte hashes per id while building, then only the clashing names."""

    def __init__(self, image_ids: Iterable[str]) -> None:
        from array import array

        ids, names, suffixed, folders = array("q"), array("q"), array("q"), array("q")
        for image_id in image_ids:
            name = id_name(image_id).casefold()
            ids.append(hash(image_id))
            names.append(hash(name))
            for suffix in NAME_SUFFIXES:
                suffixed.append(hash(name + suffix))
            slash = name.find("/")
            while slash >= 0:
                folders.append(hash(name[:slash]))
                slash = name.find("/", slash + 1)
        ids_np = np.frombuffer(ids, np.int64) if ids else np.zeros(0, np.int64)
        distinct, first, counts = np.unique(ids_np, return_index=True, return_counts=True)
        self._repeated = set(distinct[counts > 1].tolist())
        names_np = (np.frombuffer(names, np.int64) if names else np.zeros(0, np.int64))[first]
        values, counts = np.unique(names_np, return_counts=True)
        clashing = set(values[counts > 1].tolist())
        if folders:
            per_id = (np.frombuffer(suffixed, np.int64).reshape(-1, len(NAME_SUFFIXES)))[first]
            beside = np.isin(per_id, np.frombuffer(folders, np.int64)).any(axis=1)
            clashing.update(names_np[beside].tolist())
        self._clashing = clashing
        self._seen: set[str] = set()

    def name(self, image_id: str) -> str:
        """The id's relative name without a suffix (``a/b`` or ``a/b~0123456789ab``)."""
        name = id_name(image_id)
        if hash(name.casefold()) in self._clashing:
            name += "~" + name_digest(image_id)
        return name

    def first(self, image_id: str) -> bool:
        """True the first time an id is asked about (and for any id that occurs once)."""
        if hash(image_id) not in self._repeated:
            return True
        if image_id in self._seen:
            return False
        self._seen.add(image_id)
        return True


# -- COCO ------------------------------------------------------------------------------------
def coco_annotations(mask: np.ndarray, num_classes: int) -> Iterator[tuple[int, dict, int, list[float]]]:
    """(class id, compressed RLE with str counts, area, bbox [x, y, w, h]) per class present."""
    from pycocotools import mask as mask_utils

    for class_id in classes_present(mask, num_classes):
        rle = mask_utils.encode(np.asfortranarray(mask == class_id, dtype=np.uint8))
        area = int(mask_utils.area(rle))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        yield class_id, rle, area, bbox


def coco_region(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` as a boolean H x W region: compressed RLE (``counts`` a
    string), uncompressed RLE (``counts`` a list, as iscrowd annotations carry) or
    polygons (a list of [x1, y1, x2, y2, ...] lists, rasterised by pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, *rle.get("size", (height, width)))
        elif isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        size = tuple(rle.get("size", ()))
        if size != (height, width):
            raise ValueError(f"RLE of size {list(size)} on an image of {height} x {width}")
    elif isinstance(segmentation, list) and segmentation:
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        raise ValueError(f"segmentation is neither RLE nor polygons: {str(segmentation)[:60]}")
    return mask_utils.decode(rle).astype(bool)


# -- Label Studio ----------------------------------------------------------------------------
# Label Studio's brush RLE (the thi.ng rle-pack bit stream its editor decodes), MSB first:
# 32 bits: number of values (H * W * 4: RGBA, row-major); 5 bits: word size - 1; 4 x 4 bits:
# the four run-length field sizes - 1; then runs, each 1 bit (1 = one value repeated, 0 =
# literal values), 2 bits choosing the length field, that field holding length - 1, and the
# value(s) in word-size bits; zero bits pad the last byte. Every pixel is 4 equal values (0,
# or 255 inside the region; the editor reads the alpha channel), so runs are >= 4 long and
# all are repeats. Field sizes 3, 4, 8, 16 bits (runs <= 8, 16, 256, 65536 values); longer
# runs are split.
_WORD_BITS = 8
_LENGTH_BITS = np.array([3, 4, 8, 16], np.int64)
_LENGTH_LIMITS = 1 << _LENGTH_BITS


def brush_rle(region: np.ndarray) -> list[int]:
    """Label Studio brush RLE bytes (``value.rle``) of a boolean H x W region."""
    flat = np.ascontiguousarray(region, dtype=bool).ravel()
    n = flat.size
    if 4 * n >= 1 << 32:
        raise ValueError(f"region of {n} pixels is too large for Label Studio's brush RLE")
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1]) if n else np.zeros(0, np.int64)
    lengths = np.diff(np.concatenate([starts, [n]])).astype(np.int64) * 4
    values = np.where(flat[starts], 255, 0).astype(np.int64)
    # Split runs longer than the widest length field into full pieces plus a remainder.
    pieces = -(-lengths // _LENGTH_LIMITS[-1])
    values = np.repeat(values, pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    index_in_run = np.arange(pieces.sum()) - first
    remaining = np.repeat(lengths, pieces) - index_in_run * _LENGTH_LIMITS[-1]
    lengths = np.minimum(remaining, _LENGTH_LIMITS[-1])
    choice = np.searchsorted(_LENGTH_LIMITS, lengths)  # smallest field that holds length - 1
    length_bits = _LENGTH_BITS[choice]
    # One integer per run: repeat flag, field choice, length - 1, value (<= 27 bits).
    records = (((1 << 2 | choice) << length_bits | (lengths - 1)) << _WORD_BITS) | values
    widths = 3 + length_bits + _WORD_BITS
    header_values = np.array([4 * n, _WORD_BITS - 1, *(_LENGTH_BITS - 1)], np.int64)
    header_widths = np.array([32, 5, 4, 4, 4, 4], np.int64)
    bits = [_bits(header_values, header_widths)]
    step = 1 << 16  # bound the temporary arrays for very fragmented masks
    for i in range(0, len(records), step):
        bits.append(_bits(records[i:i + step], widths[i:i + step]))
    return np.packbits(np.concatenate(bits)).tolist()


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate each value's `width` low bits, most significant first (uint8 0/1)."""
    total = int(widths.sum())
    field = np.repeat(np.arange(len(values)), widths)
    offset = np.arange(total) - np.repeat(np.cumsum(widths) - widths, widths)
    shift = widths[field] - 1 - offset
    return ((values[field] >> shift) & 1).astype(np.uint8)


def brush_region(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """A brush RLE (ours, or the editor's, which also writes literal runs and other field
    sizes) back to the boolean H x W region the editor draws (alpha channel > 0)."""
    bits = np.unpackbits(np.frombuffer(bytes(rle), np.uint8))
    weights = 1 << np.arange(63, -1, -1, dtype=np.uint64)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > bits.size:
            raise ValueError("brush RLE ends in the middle of a run")
        value = int(bits[pos:pos + n].astype(np.uint64) @ weights[64 - n:])
        pos += n
        return value

    num = read(32)
    if num != 4 * height * width:
        raise ValueError(f"brush RLE holds {num // 4} pixels, the image {height} x {width} = "
                         f"{height * width}")
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = min(num, i + 1 + read(sizes[read(2)]))
        if repeat:
            out[i:j] = read(word)
        else:
            out[i:j] = [read(word) for _ in range(j - i)]
        i = j
    return out.reshape(height, width, 4)[..., 3] > 0

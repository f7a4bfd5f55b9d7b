"""Exports of OUTPUT to what labelling tools import: mask PNGs, COCO JSON, Label Studio tasks.

Every export streams OUTPUT (projected columns, small row batches) and writes as it reads,
so memory stays bounded by one Parquet row group plus one batch of decoded masks, whatever
the number of rows (and, for the names, a few bytes per image: `ExportNames`). Files are
written under a temporary name and renamed when whole; folders (png, yolo) are written as a
hidden sibling renamed when whole, so a failed export leaves nothing behind.

File names come from `pipeline.store.formats.ExportNames`, the same in every format: the
image id's path with its extension replaced (``a/b.jpg`` -> ``a/b.png``), made safe (never
outside the folder, no control characters, long parts shortened with a digest), and
``~<digest of the id>`` added where two ids of the export would share a name. An id that
OUTPUT holds twice is exported once.

Formats:
- ``png``: one PNG per image, named after the image id (``a/b.jpg`` -> ``a/b.png``): class
  ids (one channel, 8- or 16-bit, as in OUTPUT) or, with ``colour``, RGB in the palette.
- ``coco``: one COCO JSON; categories are the class names with ``id = class index + 1``
  (COCO keeps 0 for "no category"); one annotation per class present per image, its
  ``segmentation`` a compressed RLE made by ``pycocotools.mask.encode`` (``counts`` as a
  string), ``area`` and ``bbox`` from pycocotools, ``iscrowd`` 0 (as COCO-Stuff does).
  With ``polygons``, ``segmentation`` is a list of polygons instead (outer contours of each
  class's regions, traced by OpenCV; holes are filled, regions under 3 pixels dropped).
- ``yolo``: Ultralytics YOLO segmentation labels: ``labels/<image id stem>.txt`` with one
  line per polygon, ``<class index> x1 y1 x2 y2 ...`` normalised to 0..1 by the image's
  width and height, and ``data.yaml`` naming the classes.
- ``cvat``: CVAT's "Segmentation mask 1.1" (the Pascal VOC layout) as a zip:
  ``labelmap.txt`` (``name:r,g,b::`` per class), ``SegmentationClass/<id>.png`` (RGB in the
  palette), ``SegmentationObject/<id>.png`` (one colour per class present, an object per
  class) and ``ImageSets/Segmentation/default.txt`` (the image names).
- ``label-studio``: a JSON list of tasks, each with one prediction whose results are
  ``brushlabels`` regions, one per class present, in Label Studio's brush RLE (see
  `brush_rle`); a labelling config (``<out stem>_config.xml``) is written beside it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

import numpy as np
import pyarrow.compute as pc

from drn.io import atomic_write
from pipeline.errors import DrnLabelError, StorageError, UsageError
from pipeline.store.formats import ExportNames, brush_rle, classes_present, coco_annotations
from pipeline.store.fs import os_error_text
from pipeline.store.output import OutputMetadata
from pipeline.store.reader import count_errors, ids_filter, iter_batches, iter_mask_rows, select_identity

FORMATS = ("png", "coco", "yolo", "cvat", "label-studio")


class ExportError(UsageError):
    """The export's target or options cannot be used; the message names it and the fix."""


def atomic_text(path: Path):
    """A UTF-8 text file written whole or not at all (`drn.io.atomic_write`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, "w", encoding="utf-8")


# -- shared pieces ---------------------------------------------------------------------------
def palette_lut(meta: OutputMetadata, dtype: np.dtype = np.dtype(np.uint8)) -> np.ndarray:
    """RGB colour of every possible mask value (ids without a palette entry are black)."""
    size = np.iinfo(dtype).max + 1  # one entry per value the mask dtype holds
    lut = np.zeros((size, 3), np.uint8)
    palette = np.asarray(meta.palette, np.uint8).reshape(-1, 3)[:size]
    lut[: len(palette)] = palette
    return lut


def colourise(mask: np.ndarray, meta: OutputMetadata) -> np.ndarray:
    """H x W x 3 RGB picture of a class-id mask in the output's palette."""
    return palette_lut(meta, mask.dtype)[mask]


@dataclass(frozen=True)
class ExportResult:
    format: str
    out: str
    images: int
    annotations: int
    skipped_errors: int
    repeated: int = 0  # rows of an image already exported (OUTPUT held it twice)

    def summary(self) -> str:
        what = f"{self.images} images" + (f", {self.annotations} annotations" if self.annotations else "")
        notes = [f"{self.skipped_errors} error rows skipped"] if self.skipped_errors else []
        if self.repeated:
            notes.append(f"{self.repeated} duplicate rows skipped: OUTPUT holds those images twice; "
                         "rerun `drn-label run` on it to keep one row each")
        return f"exported {what} as {self.format} to {self.out}" + (f" ({'; '.join(notes)})" if notes else "")


class ExportRows:
    """The ok rows an export writes, each with its file name (`ExportNames`), one per image
    id: the ids are read once first (one column), then the masks are streamed."""

    def __init__(self, output: str, meta: OutputMetadata, image_ids: Sequence[str] | None) -> None:
        self.output, self.meta, self.image_ids = output, meta, image_ids
        where = pc.field("status") == "ok"
        if image_ids is not None:
            where = where & ids_filter(image_ids)
        self.names = ExportNames(i for batch in iter_batches(output, meta, ["image_id"], where=where,
                                                             batch_size=65536)
                                 for i in batch.column("image_id").to_pylist())
        self.repeated = 0

    def __iter__(self) -> Iterator[tuple[dict, str]]:
        for row in iter_mask_rows(self.output, self.meta, image_ids=self.image_ids):
            if not self.names.first(row["image_id"]):
                self.repeated += 1
                continue
            yield row, self.names.name(row["image_id"])

    def result(self, fmt: str, out: Path, images: int, annotations: int) -> ExportResult:
        return ExportResult(fmt, str(out), images, annotations,
                            count_errors(self.output, self.meta, image_ids=self.image_ids), self.repeated)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A folder written whole or not at all. `out` must be new or empty; the files go to a
    hidden sibling that is renamed to `out` when the block ends, and removed if it fails."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        yield work
        if out.exists():
            out.rmdir()  # empty, checked above
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_file(path: Path, data: bytes | str) -> None:
    """One file inside a staged folder (its own parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


# -- png -------------------------------------------------------------------------------------
def export_png(output: str, out: Path, meta: OutputMetadata, *, colour: bool = False,
               image_ids: Sequence[str] | None = None) -> ExportResult:
    """A folder of mask PNGs named after the image ids (`ExportNames`). `out` must be new or
    empty; a failed export leaves nothing behind (`staged_folder`)."""
    import cv2

    rows = ExportRows(output, meta, image_ids)
    images = 0
    with staged_folder(out) as work:
        for row, name in rows:
            mask = row["mask"]
            pixels = cv2.cvtColor(colourise(mask, meta), cv2.COLOR_RGB2BGR) if colour else mask
            write_file(work / (name + ".png"), cv2.imencode(".png", pixels)[1].tobytes())
            images += 1
    return rows.result("png", out, images, 0)


# -- coco ------------------------------------------------------------------------------------
def coco_categories(meta: OutputMetadata) -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "class"}
            for i, name in enumerate(meta.classes)]


def class_polygons(region: np.ndarray) -> list[list[float]]:
    """Outer contours of a boolean region as flat [x1, y1, x2, y2, ...] lists through the
    boundary pixels' centres (holes filled; contours of fewer than 3 points, i.e. specks,
    dropped). On the speckled masks of the test run the polygons reproduce 81-94% of the
    pixels; on smooth regions nearly all."""
    import cv2

    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    # OpenCV's points are pixel indices; in COCO (and YOLO) coordinates pixel x spans
    # [x, x + 1], so its centre is x + 0.5.
    return [(c.reshape(-1).astype(float) + 0.5).tolist() for c in contours if len(c) >= 3]


def coco_polygon_annotations(mask: np.ndarray, num_classes: int) -> Iterator[tuple[int, list, int, list[float]]]:
    """(class id, polygons, area, bbox) per class present, area and bbox of the polygons as
    pycocotools computes them (so a reader's numbers agree with the file)."""
    from pycocotools import mask as mask_utils

    height, width = mask.shape
    for class_id in classes_present(mask, num_classes):
        polygons = class_polygons(mask == class_id)
        if not polygons:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        yield (class_id, polygons, int(mask_utils.area(rle)),
               [float(v) for v in mask_utils.toBbox(rle)])


def export_coco(output: str, out: Path, meta: OutputMetadata, *, polygons: bool = False,
                image_ids: Sequence[str] | None = None) -> ExportResult:
    """One COCO JSON. Annotations are written as rows stream in; the image entries, a few
    dozen bytes each, wait in a spooled temporary file and are appended at the end.
    `polygons`: polygon segmentations (outer contours) instead of exact RLE."""
    from datetime import datetime, timezone

    images = annotations = 0
    info = {"description": f"drn-label pre-labels: {meta.model} (weights {meta.weights_sha256[:12]})",
            "version": str(meta.schema_version),
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rows = ExportRows(output, meta, image_ids)
    with atomic_text(out) as f, tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+") as image_list:
        f.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": '
                + json.dumps(coco_categories(meta)) + ',\n"annotations": [')
        for row, _ in rows:
            images += 1
            mask = row["mask"]
            height, width = mask.shape
            image_list.write(("," if images > 1 else "") + "\n" + json.dumps(
                {"id": images, "file_name": row["image_id"], "height": height, "width": width}))
            annotate = coco_polygon_annotations if polygons else coco_annotations
            for class_id, rle, area, bbox in annotate(mask, meta.num_classes):
                annotations += 1
                f.write(("," if annotations > 1 else "") + "\n" + json.dumps(
                    {"id": annotations, "image_id": images, "category_id": class_id + 1,
                     "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0}))
        f.write('\n],\n"images": [')
        image_list.seek(0)
        while chunk := image_list.read(1 << 20):
            f.write(chunk)
        f.write("\n]}\n")
    return rows.result("coco", out, images, annotations)


# -- yolo ------------------------------------------------------------------------------------
def export_yolo(output: str, out: Path, meta: OutputMetadata, *,
                image_ids: Sequence[str] | None = None) -> ExportResult:
    """YOLO segmentation labels, one text file per image (``labels/<name>.txt``), and
    data.yaml with the names; written whole or not at all (`staged_folder`)."""
    import yaml

    rows = ExportRows(output, meta, image_ids)
    images = annotations = 0
    with staged_folder(out) as work:
        for row, name in rows:
            mask = row["mask"]
            height, width = mask.shape
            lines = []
            for class_id in classes_present(mask, meta.num_classes):
                for polygon in class_polygons(mask == class_id):
                    xy = np.asarray(polygon).reshape(-1, 2) / [width, height]
                    lines.append(f"{class_id} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
            write_file(work / "labels" / (name + ".txt"), "".join(line + "\n" for line in lines))
            images += 1
            annotations += len(lines)
        write_file(work / "data.yaml", yaml.safe_dump(
            {"path": ".", "train": "images", "val": "images", "names": dict(enumerate(meta.classes))},
            sort_keys=False))
    return rows.result("yolo", out, images, annotations)


# -- cvat ------------------------------------------------------------------------------------
def export_cvat(output: str, out: Path, meta: OutputMetadata, *,
                image_ids: Sequence[str] | None = None) -> ExportResult:
    """CVAT "Segmentation mask 1.1" zip, written whole or not at all."""
    import zipfile

    import cv2

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = ExportRows(output, meta, image_ids)
    images = annotations = 0
    with atomic_write(out) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf, \
            tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8") as names:
        labelmap = "# label:color_rgb:parts:actions\n" + "".join(
            f"{name}:{r},{g},{b}::\n" for name, (r, g, b) in zip(meta.classes, meta.palette))
        zf.writestr("labelmap.txt", labelmap)
        for row, name in rows:
            mask = row["mask"]
            names.write(name + "\n")
            present = classes_present(mask, meta.num_classes)
            colour = cv2.cvtColor(colourise(mask, meta), cv2.COLOR_RGB2BGR)
            objects = np.zeros((*mask.shape, 3), np.uint8)
            for k, class_id in enumerate(present):  # object k + 1 in VOC's object palette
                objects[mask == class_id] = _voc_colour(k + 1)[::-1]
            zf.writestr(f"SegmentationClass/{name}.png", cv2.imencode(".png", colour)[1].tobytes())
            zf.writestr(f"SegmentationObject/{name}.png", cv2.imencode(".png", objects)[1].tobytes())
            images += 1
            annotations += len(present)
        names.seek(0)
        with zf.open("ImageSets/Segmentation/default.txt", "w") as listing:
            while chunk := names.read(1 << 20):
                listing.write(chunk.encode("utf-8"))
    return rows.result("cvat", out, images, annotations)


def _voc_colour(index: int) -> tuple[int, int, int]:
    """Pascal VOC's colour for index `index` (the bit-interleaved palette CVAT reads)."""
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> 0) & 1) << (7 - shift)
        g |= ((index >> 1) & 1) << (7 - shift)
        b |= ((index >> 2) & 1) << (7 - shift)
        index >>= 3
    return r, g, b


# -- label studio ----------------------------------------------------------------------------
def label_studio_config(meta: OutputMetadata, *, from_name: str = "tag", to_name: str = "image") -> str:
    """The labelling config that the tasks' results refer to (BrushLabels over an Image)."""
    labels = "\n".join(
        f'    <Label value="{escape(name)}" background="#{r:02x}{g:02x}{b:02x}"/>'
        for name, (r, g, b) in zip(meta.classes, meta.palette))
    return (f'<View>\n  <Image name="{escape(to_name)}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{escape(from_name)}" toName="{escape(to_name)}">\n{labels}\n'
            "  </BrushLabels>\n</View>\n")


def label_studio_task(row: dict, meta: OutputMetadata, *, from_name: str, to_name: str,
                      url_prefix: str | None) -> dict:
    mask = row["mask"]
    height, width = mask.shape
    results = [
        {"id": f"{row['image_id']}#{class_id}", "type": "brushlabels",
         "from_name": from_name, "to_name": to_name,
         "original_width": width, "original_height": height, "image_rotation": 0,
         "value": {"format": "rle", "rle": brush_rle(mask == class_id),
                   "brushlabels": [meta.classes[class_id]]}}
        for class_id in classes_present(mask, meta.num_classes)]
    # The id goes into a URL (e.g. Label Studio's ``?d=`` local-file parameter): quoted, so
    # that ``#``, ``&``, ``?``, spaces and newlines stay part of it.
    image = url_prefix + quote(row["image_id"], safe="/") if url_prefix is not None else row["uri"]
    return {"data": {"image": image, "image_id": row["image_id"]},
            "predictions": [{"model_version": f"{meta.model}@{meta.weights_sha256[:12]}",
                             "score": round(float(row["confidence"]), 6), "result": results}]}


def export_label_studio(output: str, out: Path, meta: OutputMetadata, *, from_name: str = "tag",
                        to_name: str = "image", url_prefix: str | None = None,
                        image_ids: Sequence[str] | None = None) -> ExportResult:
    """A JSON list of Label Studio tasks with brush-label predictions, written task by task,
    and the matching labelling config beside it. ``data.image`` is the row's ``uri``, or
    `url_prefix` + image id (e.g. ``/data/local-files/?d=images/`` for Label Studio's
    local file serving)."""
    out = Path(out)
    rows = ExportRows(output, meta, image_ids)
    images = annotations = 0
    with atomic_text(config_path(out)) as f:
        f.write(label_studio_config(meta, from_name=from_name, to_name=to_name))
    with atomic_text(out) as f:
        f.write("[")
        for row, _ in rows:
            task = label_studio_task(row, meta, from_name=from_name, to_name=to_name,
                                     url_prefix=url_prefix)
            f.write(("," if images else "") + "\n" + json.dumps(task, separators=(",", ":")))
            images += 1
            annotations += len(task["predictions"][0]["result"])
        f.write("\n]\n")
    return rows.result("label-studio", out, images, annotations)


def config_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).stem + "_config.xml")


# -- one entry point ---------------------------------------------------------------------------
def check_ids(output: str, meta: OutputMetadata, image_ids: Sequence[str], source: Path) -> None:
    """Every id of a manifest must have a row of `meta`'s identity in OUTPUT: a manifest of
    another OUTPUT or model would otherwise export a silent subset."""
    found: set[str] = set()
    for batch in iter_batches(output, meta, ["image_id"], where=ids_filter(image_ids),
                              batch_size=65536):
        found.update(batch.column("image_id").to_pylist())
    missing = [i for i in image_ids if i not in found]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ExportError(f"--ids {source}: {len(missing)} of {len(image_ids)} image ids have no row of "
                          f"{meta.model} (weights {meta.weights_sha256[:12]}) in {output} ({shown}); "
                          "select them from this OUTPUT and model (`drn-label select`)")


def export(output: str, fmt: str, out: Path, *, colour: bool = False, model: str | None = None,
           weights_sha256: str | None = None, from_name: str = "tag", to_name: str = "image",
           url_prefix: str | None = None, polygons: bool = False,
           ids: Path | None = None) -> ExportResult:
    """Export one model identity's ok rows (only the manifest `ids`' images, when given).
    A failed write (disk full, no permission) is a `StorageError` naming `out`."""
    try:
        return _export(output, fmt, Path(out), colour=colour, model=model, weights_sha256=weights_sha256,
                       from_name=from_name, to_name=to_name, url_prefix=url_prefix,
                       polygons=polygons, ids=ids)
    except DrnLabelError:
        raise
    except OSError as exc:
        raise StorageError(f"--out {out}: cannot write the {fmt} export ({os_error_text(exc)})") from None


def _export(output: str, fmt: str, out: Path, *, colour: bool, model: str | None,
            weights_sha256: str | None, from_name: str, to_name: str, url_prefix: str | None,
            polygons: bool, ids: Path | None) -> ExportResult:
    meta = select_identity(output, model=model, weights_sha256=weights_sha256)
    image_ids = None
    if ids is not None:
        from pipeline.tools.select import read_ids

        image_ids = read_ids(ids)
        check_ids(output, meta, image_ids, ids)
    if fmt == "png":
        return export_png(output, out, meta, colour=colour, image_ids=image_ids)
    if colour:
        raise ExportError("--colour applies to --format png only")
    if polygons and fmt != "coco":
        raise ExportError("--polygons applies to --format coco only (yolo is always polygons)")
    if fmt == "yolo":  # a folder, like png
        return export_yolo(output, out, meta, image_ids=image_ids)
    if Path(out).is_dir():
        suffix = ".zip" if fmt == "cvat" else ".json"
        raise ExportError(f"--out {out}: is a folder; give the file to write, e.g. "
                          f"{Path(out) / (fmt.replace('-', '_') + suffix)}")
    if fmt == "coco":
        return export_coco(output, out, meta, polygons=polygons, image_ids=image_ids)
    if fmt == "cvat":
        return export_cvat(output, out, meta, image_ids=image_ids)
    if fmt == "label-studio":
        return export_label_studio(output, out, meta, from_name=from_name, to_name=to_name,
                                   url_prefix=url_prefix, image_ids=image_ids)
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")

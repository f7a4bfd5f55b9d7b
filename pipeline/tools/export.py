"""Exports of OUTPUT to what labelling tools import: mask PNGs, COCO JSON, Label Studio tasks.

Every export streams OUTPUT (projected columns, small row batches) and writes as it reads,
so memory stays bounded by one Parquet row group plus one batch of decoded masks, whatever
the number of rows. JSON files are written under a temporary name and renamed when whole.

Formats:
- ``png``: one PNG per image, named after the image id (``a/b.jpg`` -> ``a/b.png``): class
  ids (one channel, 8- or 16-bit, as in OUTPUT) or, with ``colour``, RGB in the palette.
- ``coco``: one COCO JSON; categories are the class names with ``id = class index + 1``
  (COCO keeps 0 for "no category"); one annotation per class present per image, its
  ``segmentation`` a compressed RLE made by ``pycocotools.mask.encode`` (``counts`` as a
  string), ``area`` and ``bbox`` from pycocotools, ``iscrowd`` 0 (as COCO-Stuff does).
- ``label-studio``: a JSON list of tasks, each with one prediction whose results are
  ``brushlabels`` regions, one per class present, in Label Studio's brush RLE (see
  `brush_rle`); a labelling config (``<out stem>_config.xml``) is written beside it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.compute as pc

from drn.io import atomic_write
from pipeline.errors import UsageError
from pipeline.store.formats import brush_rle, classes_present, coco_annotations, mask_png_name
from pipeline.store.output import OutputMetadata
from pipeline.store.reader import count_errors, ids_filter, iter_batches, iter_mask_rows, select_identity

FORMATS = ("png", "coco", "label-studio")


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

    def summary(self) -> str:
        what = f"{self.images} images" + (f", {self.annotations} annotations" if self.annotations else "")
        skipped = f" ({self.skipped_errors} error rows skipped)" if self.skipped_errors else ""
        return f"exported {what} as {self.format} to {self.out}{skipped}"


# -- png -------------------------------------------------------------------------------------
def export_png(output: str, out: Path, meta: OutputMetadata, *, colour: bool = False,
               image_ids: Sequence[str] | None = None) -> ExportResult:
    """A folder of mask PNGs named after the image ids. `out` must be new or empty. The
    folder is written under a temporary name beside it and renamed when whole, so a failed
    export leaves nothing behind. Ids that map to one name (``a.jpg`` and ``a.png``), or a
    name that is also another id's folder (``a.png`` and ``a.png/b.jpg``), are told apart
    (``a.png.png``; ``a.png~1.png``), never overwritten."""
    import cv2

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    images = 0
    try:
        for row in iter_mask_rows(output, meta, image_ids=image_ids):
            target = _free_target(work, row["image_id"])
            target.parent.mkdir(parents=True, exist_ok=True)
            mask = row["mask"]
            pixels = cv2.cvtColor(colourise(mask, meta), cv2.COLOR_RGB2BGR) if colour else mask
            if not cv2.imwrite(str(target), pixels):
                raise ExportError(f"{out / target.relative_to(work)}: cannot be written")
            images += 1
        if out.exists():
            out.rmdir()  # empty, checked above
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult("png", str(out), images, 0, count_errors(output, meta, image_ids=image_ids))


def _free_target(folder: Path, image_id: str) -> Path:
    """Where image `image_id`'s mask goes in `folder`: its name, else its name with the
    image's extension kept, else with ``~k``; never under a path that is a file."""
    candidates = [mask_png_name(image_id), mask_png_name(image_id, keep_extension=True)]
    for rel in candidates:
        if _usable(folder, folder / rel):
            return folder / rel
    flat = candidates[1][:-4].replace("/", "~")
    k = 1
    while not _usable(folder, folder / f"{flat}~{k}.png"):
        k += 1
    return folder / f"{flat}~{k}.png"


def _usable(folder: Path, target: Path) -> bool:
    if target.exists():
        return False
    parent = target.parent
    while parent != folder:
        if parent.exists() and not parent.is_dir():
            return False
        parent = parent.parent
    return True


# -- coco ------------------------------------------------------------------------------------
def coco_categories(meta: OutputMetadata) -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "class"}
            for i, name in enumerate(meta.classes)]


def export_coco(output: str, out: Path, meta: OutputMetadata, *,
                image_ids: Sequence[str] | None = None) -> ExportResult:
    """One COCO JSON. Annotations are written as rows stream in; the image entries, a few
    dozen bytes each, wait in a spooled temporary file and are appended at the end."""
    from datetime import datetime, timezone

    images = annotations = 0
    info = {"description": f"drn-label pre-labels: {meta.model} (weights {meta.weights_sha256[:12]})",
            "version": str(meta.schema_version),
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with atomic_text(out) as f, tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+") as image_list:
        f.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": '
                + json.dumps(coco_categories(meta)) + ',\n"annotations": [')
        for row in iter_mask_rows(output, meta, image_ids=image_ids):
            images += 1
            mask = row["mask"]
            height, width = mask.shape
            image_list.write(("," if images > 1 else "") + "\n" + json.dumps(
                {"id": images, "file_name": row["image_id"], "height": height, "width": width}))
            for class_id, rle, area, bbox in coco_annotations(mask, meta.num_classes):
                annotations += 1
                f.write(("," if annotations > 1 else "") + "\n" + json.dumps(
                    {"id": annotations, "image_id": images, "category_id": class_id + 1,
                     "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0}))
        f.write('\n],\n"images": [')
        image_list.seek(0)
        while chunk := image_list.read(1 << 20):
            f.write(chunk)
        f.write("\n]}\n")
    return ExportResult("coco", str(out), images, annotations, count_errors(output, meta, image_ids=image_ids))


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
    image = url_prefix + row["image_id"] if url_prefix is not None else row["uri"]
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
    images = annotations = 0
    with atomic_text(out) as f:
        f.write("[")
        for row in iter_mask_rows(output, meta, image_ids=image_ids):
            task = label_studio_task(row, meta, from_name=from_name, to_name=to_name,
                                     url_prefix=url_prefix)
            f.write(("," if images else "") + "\n" + json.dumps(task, separators=(",", ":")))
            images += 1
            annotations += len(task["predictions"][0]["result"])
        f.write("\n]\n")
    config_path(out).write_text(label_studio_config(meta, from_name=from_name, to_name=to_name))
    return ExportResult("label-studio", str(out), images, annotations, count_errors(output, meta, image_ids=image_ids))


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
           url_prefix: str | None = None, ids: Path | None = None) -> ExportResult:
    """Export one model identity's ok rows (only the manifest `ids`' images, when given)."""
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
    if Path(out).is_dir():
        raise ExportError(f"--out {out}: is a folder; give the JSON file to write, e.g. "
                          f"{Path(out) / (fmt.replace('-', '_') + '.json')}")
    if fmt == "coco":
        return export_coco(output, out, meta, image_ids=image_ids)
    if fmt == "label-studio":
        return export_label_studio(output, out, meta, from_name=from_name, to_name=to_name,
                                   url_prefix=url_prefix, image_ids=image_ids)
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")

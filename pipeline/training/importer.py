"""`drn-label import`: corrections from a labelling tool back into a training folder.

Reads what annotators send back and writes the layout `synth` writes and `train` reads::

    DATA/images/<image id>      the image's bytes, copied unchanged
    DATA/masks/<id stem>.png    one channel, class index per pixel, 255 = not labelled
    DATA/classes.json           names and palette (and mean/std when known)

Formats (detected; ``fmt`` forces one):

- ``label-studio``: a Label Studio JSON export (a list of tasks). Each task's latest
  annotation that was not cancelled is used; its ``brushlabels`` results (brush RLE) paint
  their class, later results over earlier ones. Tasks nobody annotated are skipped, or,
  with ``with_predictions``, contribute their prediction (pre-labels accepted as they are).
  The image id is ``data.image_id`` (what `drn-label export` writes), else the file name
  in ``data.image``.
- ``coco``: a COCO JSON; ``segmentation`` as compressed or uncompressed RLE or polygons;
  ``category_id`` is mapped to a class by the category's name (by position in the
  categories when no class list is given); the image id is ``file_name``.
- ``png``: a folder of mask PNGs (class index per pixel) named like the images
  (``a/b.png`` for image ``a/b.jpg``), as `export --format png` writes them.

Pixels no region covers stay 255 (ignored by training): an annotator who left a pixel
unpainted did not say what it is. Image files come from ``images`` (a folder the ids are
relative to), or for Label Studio from ``data.image`` when it is a local path.
"""
from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

import cv2
import numpy as np

from drn.io import atomic_write
from pipeline.errors import UsageError
from pipeline.store.decode import decode_image
from pipeline.store.formats import ExportNames, brush_region, coco_region, mask_png_name

FORMATS = ("label-studio", "coco", "png")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class Classes:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def index(self, name: str, where: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UsageError(f"{where}: label {name!r} is not one of the classes "
                             f"({', '.join(self.names)}); pass --classes with the label set used") from None

    def to_json(self) -> dict:
        data: dict = {"name": "imported", "classes": list(self.names), "ignore_index": IGNORE_INDEX}
        if self.palette:
            data["palette"] = [list(c) for c in self.palette]
        if self.mean and self.std:
            data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


@dataclass(frozen=True)
class Correction:
    image_id: str
    source: Path  # the image file
    mask: np.ndarray  # uint8 class ids, 255 = not labelled


@dataclass(frozen=True)
class ImportResult:
    format: str
    out: Path
    images: int
    skipped: int  # tasks / images without an annotation
    classes: tuple[str, ...]

    def summary(self) -> str:
        skipped = f" ({self.skipped} without an annotation skipped)" if self.skipped else ""
        return (f"imported {self.images} images with masks from {self.format} into {self.out}"
                f"{skipped}; classes: {', '.join(self.classes)}")


# -- detection and classes ----------------------------------------------------------------------
def detect_format(path: Path) -> tuple[str, object]:
    """(format, parsed JSON or None) of an export file or folder."""
    if path.is_dir():
        return "png", None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a folder of PNG masks and not JSON ({exc}); pass a Label "
                         "Studio or COCO JSON export, or a folder of mask PNGs") from None
    if isinstance(data, list):
        return "label-studio", data
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco", data
    raise UsageError(f"{path}: JSON that is neither a Label Studio export (a list of tasks) nor "
                     "COCO (images + annotations); pass --format to say which")


def load_classes(classes: str | None) -> Classes | None:
    """A preset or classes file (drn.load_label_set), or a labelled OUTPUT (the classes,
    palette and mean/std of the model that labelled it)."""
    if classes is None:
        return None
    import drn

    from pipeline.store.output import data_files

    if Path(classes).is_dir() or "://" in classes:
        if not data_files(classes):
            raise UsageError(f"--classes {classes}: a folder without labelled rows; pass a preset, a "
                             "classes file, or a `drn-label run` OUTPUT")
        from pipeline.store.reader import read_metadata

        metas = {(m.classes, m.palette, m.mean, m.std) for m in read_metadata(classes)}
        if len({m[0] for m in metas}) > 1:
            raise UsageError(f"--classes {classes}: its models use different label sets; pass a "
                             "classes file")
        names, palette, mean, std = sorted(metas)[0]
        return Classes(tuple(names), tuple(palette), tuple(mean), tuple(std))
    try:
        label_set = drn.load_label_set(classes)
    except ValueError as exc:
        raise UsageError(f"--classes: {exc}") from None
    data = json.loads(Path(classes).read_text()) if Path(classes).suffix.lower() == ".json" else {}
    known = str(classes) in drn.list_presets() or (data.get("mean") and data.get("std"))
    return Classes(tuple(label_set.class_names), tuple(label_set.palette),
                   tuple(label_set.mean) if known else None, tuple(label_set.std) if known else None)


def label_studio_classes(export: Path) -> Classes | None:
    """Class names (and colours) of the labelling config `drn-label export` writes beside
    its tasks (``<stem>_config.xml``), in order."""
    config = export.with_name(export.stem + "_config.xml")
    if not config.is_file():
        return None
    labels = ET.parse(config).getroot().iter("Label")
    names, palette = [], []
    for label in labels:
        names.append(label.get("value"))
        colour = label.get("background", "")
        match = re.fullmatch(r"#([0-9a-fA-F]{6})", colour)
        palette.append(tuple(int(match.group(1)[i:i + 2], 16) for i in (0, 2, 4)) if match else None)
    if not names:
        return None
    return Classes(tuple(names), tuple(palette) if all(palette) else None)


# -- readers ------------------------------------------------------------------------------------
def _image_source(image_id: str, images: Path | None, hint: str | None, where: str) -> Path:
    if images is not None:
        path = images / image_id
        if not path.is_file():
            raise UsageError(f"{where}: image {image_id!r} is not in --images {images}")
        return path
    if hint:
        parsed = urlparse(hint)
        local = unquote(parsed.path) if parsed.scheme in ("", "file") else None
        if local and Path(local).is_file():
            return Path(local)
    raise UsageError(f"{where}: cannot find the image file of {image_id!r}; pass --images, the "
                     "folder the image ids are relative to")


def _task_image_id(task: dict) -> tuple[str, str | None]:
    data = task.get("data") or {}
    image = data.get("image")
    if data.get("image_id"):
        return str(data["image_id"]), image
    if not image:
        raise UsageError(f"Label Studio task {task.get('id')}: no data.image or data.image_id")
    parsed = urlparse(str(image))
    name = parse_qs_d(parsed.query) or parsed.path
    return os.path.basename(unquote(name)), image


def parse_qs_d(query: str) -> str | None:
    """Label Studio's local file serving: ``/data/local-files/?d=folder/name.jpg``."""
    from urllib.parse import parse_qs

    values = parse_qs(query).get("d")
    return values[0] if values else None


def read_label_studio(tasks: list, classes: Classes, *, images: Path | None, source: Path,
                      with_predictions: bool) -> Iterator[Correction | None]:
    """One Correction per annotated task (None for a task without one)."""
    for number, task in enumerate(tasks):
        where = f"{source} task {task.get('id', number)}"
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if annotations:
            chosen = max(enumerate(annotations),
                         key=lambda ia: (str(ia[1].get("updated_at") or ""), ia[0]))[1]
        elif with_predictions and task.get("predictions"):
            chosen = task["predictions"][-1]
        else:
            yield None
            continue
        image_id, hint = _task_image_id(task)
        mask = None
        for result in chosen.get("result") or []:
            if result.get("type") != "brushlabels":
                continue
            value = result.get("value") or {}
            height, width = int(result["original_height"]), int(result["original_width"])
            if mask is None:
                mask = np.full((height, width), IGNORE_INDEX, np.uint8)
            elif mask.shape != (height, width):
                raise UsageError(f"{where}: results of sizes {mask.shape} and {(height, width)}")
            if value.get("format", "rle") != "rle" or "rle" not in value:
                raise UsageError(f"{where}: brush result without RLE (format {value.get('format')!r})")
            for name in value.get("brushlabels") or []:
                try:
                    region = brush_region(value["rle"], height, width)
                except ValueError as exc:
                    raise UsageError(f"{where}: {exc}") from None
                mask[region] = classes.index(name, where)
        if mask is None:
            yield None
            continue
        yield Correction(image_id, _image_source(image_id, images, hint, where), mask)


def read_coco(data: dict, classes: Classes, *, images: Path | None, source: Path) -> Iterator[Correction | None]:
    categories = {c["id"]: classes.index(c["name"], f"{source} category {c['id']}")
                  for c in data.get("categories") or []}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in data["images"]:
        anns = by_image.get(image["id"])
        if not anns:
            yield None
            continue
        where = f"{source} image {image['file_name']!r}"
        height, width = int(image["height"]), int(image["width"])
        mask = np.full((height, width), IGNORE_INDEX, np.uint8)
        for ann in anns:
            if ann["category_id"] not in categories:
                raise UsageError(f"{where}: category_id {ann['category_id']} is not in categories")
            try:
                region = coco_region(ann["segmentation"], height, width)
            except ValueError as exc:
                raise UsageError(f"{where}: {exc}") from None
            mask[region] = categories[ann["category_id"]]
        image_id = str(image["file_name"])
        yield Correction(image_id, _image_source(image_id, images, None, where), mask)


def read_png_folder(folder: Path, classes: Classes, *, images: Path | None) -> Iterator[Correction]:
    if images is None:
        raise UsageError(f"{folder}: a folder of masks needs --images, the folder of the images "
                         "they belong to")
    # Masks are named as `export --format png` names them (`ExportNames` over the images);
    # an export of a subset (--ids) may have kept a plain name that the whole folder shares.
    files = {p.relative_to(images).as_posix(): p for p in sorted(images.rglob("*")) if p.is_file()}
    names = ExportNames(files)
    plain: dict[str, list[Path]] = {}
    for rel, p in files.items():
        plain.setdefault(mask_png_name(rel), []).append(p)
    by_stem = {name: found[0] for name, found in plain.items() if len(found) == 1}
    by_stem.update({names.name(rel) + ".png": p for rel, p in files.items()})
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder).as_posix()
        source = by_stem.get(rel)
        if source is None and rel in plain:
            shown = ", ".join(p.relative_to(images).as_posix() for p in plain[rel][:3])
            raise UsageError(f"mask {path}: images {shown} in --images {images} share its name; "
                             "export them together (they are then named apart) or pass --images "
                             "with only the exported ones")
        if source is None:
            raise UsageError(f"mask {path}: no image named {rel[:-4]}.* in --images {images}")
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2:
            raise UsageError(f"mask {path}: expected a one-channel PNG of class indices")
        bad = (mask >= len(classes.names)) & (mask != IGNORE_INDEX)
        if bad.any():
            raise UsageError(f"mask {path}: class index {int(mask[bad].max())} but there are "
                             f"{len(classes.names)} classes")
        yield Correction(source.relative_to(images).as_posix(), source, mask.astype(np.uint8))


# -- the command ----------------------------------------------------------------------------------
def import_corrections(export: Path, out: Path, *, fmt: str | None = None, images: Path | None = None,
                       classes: str | None = None, with_predictions: bool = False) -> ImportResult:
    """Write the training folder `out` from the labelling tool's `export` (module doc)."""
    export, out = Path(export), Path(out)
    images = Path(images) if images is not None else None
    if not export.exists():
        raise UsageError(f"{export}: no such file or folder")
    detected, data = detect_format(export)
    fmt = fmt or detected
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != detected:
        raise UsageError(f"{export} looks like {detected}, not {fmt}; drop --format or pass the right file")
    existing = out / "classes.json"
    chosen = load_classes(classes)
    if chosen is None and fmt == "label-studio":
        chosen = label_studio_classes(export)
    if chosen is None and fmt == "coco":
        cats = sorted(data.get("categories") or [], key=lambda c: c["id"])
        chosen = Classes(tuple(c["name"] for c in cats)) if cats else None
    if chosen is None and existing.is_file():
        chosen = load_classes(str(existing))
    if chosen is None:
        raise UsageError(f"{export}: which class is which is not known; pass --classes (a preset, a "
                         "classes file, or the OUTPUT the export was made from)")
    if existing.is_file():
        have = json.loads(existing.read_text()).get("classes")
        if list(have or []) != list(chosen.names):
            raise UsageError(f"--out {out}: holds classes {have}, not {list(chosen.names)}; choose a "
                             "new folder")
    if fmt == "label-studio":
        if not isinstance(data, list):
            raise UsageError(f"{export}: a Label Studio export is a JSON list of tasks")
        corrections = read_label_studio(data, chosen, images=images, source=export,
                                        with_predictions=with_predictions)
    elif fmt == "coco":
        corrections = read_coco(data, chosen, images=images, source=export)
    else:
        corrections = read_png_folder(export, chosen, images=images)

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    count = skipped = 0
    for item in corrections:
        if item is None:
            skipped += 1
            continue
        name = mask_png_name(item.image_id)
        if written.get(name, item.image_id) != item.image_id:
            raise UsageError(f"{export}: images {written[name]!r} and {item.image_id!r} would share "
                             f"the mask {name}; rename one")
        written[name] = item.image_id
        image_path = out / "images" / Path(*Path(mask_png_name(item.image_id, keep_extension=True)).parts)
        image_path = image_path.with_name(image_path.name[:-4])  # the id's own name, made safe
        data_bytes = item.source.read_bytes()
        try:
            image = decode_image(data_bytes, f"image {item.source}")  # the one decode path
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if image.shape[:2] != item.mask.shape:
            raise UsageError(f"image {item.source} is {image.shape[1]}x{image.shape[0]} but its "
                             f"correction is {item.mask.shape[1]}x{item.mask.shape[0]}")
        _write(image_path, data_bytes)
        png = cv2.imencode(".png", item.mask)[1]
        _write(out / "masks" / name, png.tobytes())
        count += 1
    if not count:
        raise UsageError(f"{export}: no annotated images to import"
                         + ("; pass --with-predictions to take the pre-labels of tasks nobody annotated"
                            if fmt == "label-studio" else ""))
    with atomic_write(existing, "w", encoding="utf-8") as f:
        f.write(json.dumps(chosen.to_json(), indent=2) + "\n")
    return ImportResult(fmt, out, count, skipped, chosen.names)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)

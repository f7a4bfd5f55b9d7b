"""Stand in for the annotators of docs/labelling-loop.md: add the ground truth to Label
Studio tasks as each task's annotation, as if a person had corrected the pre-labels.

    python docs/annotate_with_ground_truth.py TASKS.json --masks DATA/masks

TASKS.json is what `drn-label export --format label-studio` wrote; DATA/masks holds the
true masks (`drn-label synth` writes them), named like the images (``0007.png``). The
class names come from the labelling config beside the tasks (``TASKS_config.xml``).
Pixels of 255 (the ignore outline) are left unpainted, as an annotator would leave them.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2

from drn.io import atomic_write
from pipeline.store.formats import brush_rle, classes_present, mask_png_name


def annotate(tasks_path: Path, masks: Path) -> int:
    config = tasks_path.with_name(tasks_path.stem + "_config.xml")
    names = [label.get("value") for label in ET.parse(config).getroot().iter("Label")]
    tasks = json.loads(tasks_path.read_text())
    for task in tasks:
        truth = cv2.imread(str(masks / mask_png_name(task["data"]["image_id"])), cv2.IMREAD_UNCHANGED)
        height, width = truth.shape
        result = [{"id": f"gt{class_id}", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                   "original_width": width, "original_height": height, "image_rotation": 0,
                   "value": {"format": "rle", "rle": brush_rle(truth == class_id),
                             "brushlabels": [names[class_id]]}}
                  for class_id in classes_present(truth, len(names))]
        task["annotations"] = [{"completed_by": "ground truth", "was_cancelled": False,
                                "result": result}]
    with atomic_write(tasks_path, "w", encoding="utf-8") as f:
        json.dump(tasks, f)
    return len(tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", type=Path)
    parser.add_argument("--masks", type=Path, required=True)
    args = parser.parse_args()
    print(f"annotated {annotate(args.tasks, args.masks)} tasks with the ground truth")

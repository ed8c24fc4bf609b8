"""PadChest's label file for `cxr.data.select`: `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)`.

One row per image. The columns read here: `ImageID` (the file name), `ImageDir` (the numbered folder the file was
released in), `PatientID`, `Projection` (PA, AP, AP_horizontal, L, ...), `Labels` (the findings of the report as a
Python-style list in one quoted CSV cell, e.g. `"['normal']"` or `"['cardiomegaly', 'pleural effusion']"`) and
`MethodLabel` (`Physician` when a physician labelled the report, `RNN_model` when the labelling network did).

An image is normal when its label list is exactly `normal`: every entry, stripped of spaces, is `normal` (blank
entries are ignored) and there is at least one. A blank cell (an unlabelled report) and an empty list are not
normal. The cell is parsed with `ast.literal_eval`, which reads literals only and never runs code; a cell that is
not a list of strings is an error naming the file, line and column.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cxr.data.select_csv import (
    ImageToLocate,
    LabelOptions,
    SelectionError,
    Step,
    bad_value,
    check_known,
    iter_label_rows,
    require_value,
)

PADCHEST_LABEL_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_NORMAL = "normal"
PADCHEST_PHYSICIAN = "Physician"
PADCHEST_METHODS = frozenset({PADCHEST_PHYSICIAN, "RNN_model", ""})
PADCHEST_COLUMNS = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels", "MethodLabel")


def parse_padchest_labels(value: str, path: Path, line: int) -> list[str] | None:
    """The findings of one `Labels` cell, stripped, blank entries dropped; None for a blank cell (not labelled)."""
    if value == "":
        return None
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise bad_value(path, line, "Labels", value, "a Python-style list of strings such as ['normal']")
    return [item.strip() for item in parsed if item.strip()]


def is_normal(labels: list[str] | None) -> bool:
    """The label list is exactly `normal` (see the module docstring)."""
    return bool(labels) and set(labels) == {PADCHEST_NORMAL}


def padchest_candidates(label_files, views, options: LabelOptions):
    """The images of the PadChest label file(s) that are labelled normal, (optionally) by a physician, with a
    `Projection` in `views`; located at `<ImageDir>/<ImageID>` under the images root, or at `<ImageID>` when the
    numbered folders were unpacked into one."""
    seen: dict[str, tuple[Path, int]] = {}
    total = normal = physician = 0
    candidates = []
    for path in label_files:
        for line, row in iter_label_rows(path, PADCHEST_COLUMNS, f"PadChest {PADCHEST_LABEL_FILE}"):
            image_id = require_value(row["ImageID"], path, line, "ImageID")
            if image_id in seen:
                first_path, first_line = seen[image_id]
                raise SelectionError(
                    f"{path}, line {line}: image {image_id} is listed twice (first at {first_path}, line "
                    f"{first_line}); pass the label file once"
                )
            seen[image_id] = (path, line)
            folder = require_value(row["ImageDir"], path, line, "ImageDir")
            patient = require_value(row["PatientID"], path, line, "PatientID")
            method = check_known(row["MethodLabel"], PADCHEST_METHODS, path, line, "MethodLabel")
            labels = parse_padchest_labels(row["Labels"], path, line)
            total += 1
            if not is_normal(labels):
                continue
            normal += 1
            if options.physician_labels_only and method != PADCHEST_PHYSICIAN:
                continue
            physician += 1
            projection = row["Projection"]
            if projection in views:
                candidates.append(ImageToLocate(image_id, patient, projection, (f"{folder}/{image_id}", image_id)))
    steps = [
        Step("rows", "label rows (images)", total),
        Step("normal", f"Labels is exactly ['{PADCHEST_NORMAL}'] (blank cells and other labels excluded)", normal),
    ]
    if options.physician_labels_only:
        steps.append(Step("physician", f"MethodLabel == {PADCHEST_PHYSICIAN} (--physician_labels_only)", physician))
    steps.append(Step("view", f"Projection in {list(views)}", len(candidates)))
    return candidates, steps

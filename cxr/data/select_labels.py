"""Reading the public datasets' label files for `cxr.data.select`: per source (NIH, CheXpert, MIMIC-CXR-JPG, VinDr),
the images whose labels pass that source's normal-frontal rules (see cxr.data.select's docstring), with the count
left after each filter step.

Each rule, `rule(label_files, views, options)`, returns (images to locate on disk, steps); cxr.data.select maps
the sources to their rules (PadChest's is in cxr.data.select_padchest).
A missing column or a value outside the known set is a SelectionError naming the file, line and column.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from cxr.data.select_csv import (
    ImageToLocate,
    LabelOptions,
    SelectionError,
    Step,
    bad_value,
    check_known,
    iter_label_rows,
    read_header,
    require_value,
)

NIH_LABELS = frozenset(
    {
        "No Finding",
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Effusion",
        "Emphysema",
        "Fibrosis",
        "Hernia",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pleural_Thickening",
        "Pneumonia",
        "Pneumothorax",
    }
)
NIH_VIEWS = frozenset({"PA", "AP"})
# The 14 CheXpert-labeler observations, shared by CheXpert and MIMIC-CXR-JPG.
CHEXPERT_PATHOLOGIES = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
)
SUPPORT_DEVICES = "Support Devices"
NO_FINDING = "No Finding"
CHEXPERT_LABEL_COLUMNS = (NO_FINDING, *CHEXPERT_PATHOLOGIES, SUPPORT_DEVICES)
CHEXPERT_FRONTAL_LATERAL = frozenset({"Frontal", "Lateral"})
CHEXPERT_AP_PA = frozenset({"AP", "PA", "LL", "RL", ""})  # blank on lateral images
MIMIC_VIEWS = frozenset(
    {
        "PA",
        "AP",
        "LATERAL",
        "LL",
        "LAO",
        "RAO",
        "LPO",
        "RPO",
        "AP AXIAL",
        "PA LLD",
        "PA RLD",
        "AP LLD",
        "AP RLD",
        "XTABLE LATERAL",
        "SWIMMERS",
        "L5 S1",
        "",  # blank: not recorded in the DICOM header
    }
)
VINDR_NO_FINDING = "No finding"
VINDR_NO_FINDING_CLASS_ID = "14"
VINDR_ID_COLUMNS = frozenset({"image_id", "rad_id"})  # compared lower-case: some releases spell it rad_ID
VINDR_LABEL_VALUES = frozenset({"0", "1", "0.0", "1.0", ""})
VINDR_DECLARED_VIEW = "PA"
VINDR_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")  # preference order when several exist


def parse_chexpert_label(value: str, path: Path, line: int, column: str) -> float | None:
    """A CheXpert-labeler cell: 1.0 positive, 0.0 negative, -1.0 uncertain, None when blank (not mentioned)."""
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (1.0, 0.0, -1.0):
        raise bad_value(path, line, column, value, "1.0, 0.0, -1.0 or blank")
    return number


# ---------------------------------------------------------------------------------------------------------
# Label rules per source. Each returns the candidates that pass the label filters and the steps so far.


def nih_candidates(label_files, views, options: LabelOptions):
    required = ("Image Index", "Finding Labels", "Patient ID", "View Position")
    seen: dict[str, tuple[Path, int]] = {}
    total = normal = 0
    candidates = []
    for path in label_files:
        for line, row in iter_label_rows(path, required, "NIH ChestX-ray14 Data_Entry_2017"):
            name = require_value(row["Image Index"], path, line, "Image Index")
            if name in seen:
                first_path, first_line = seen[name]
                raise SelectionError(
                    f"{path}, line {line}: image {name} is listed twice (first at {first_path}, line {first_line}); "
                    "pass each Data_Entry file once"
                )
            seen[name] = (path, line)
            total += 1
            findings = row["Finding Labels"]
            tokens = findings.split("|")
            for token in tokens:
                check_known(token, NIH_LABELS, path, line, "Finding Labels")
            if "No Finding" in tokens and len(tokens) > 1:
                raise bad_value(path, line, "Finding Labels", findings, '"No Finding" alone or a list of findings')
            view = check_known(row["View Position"], NIH_VIEWS, path, line, "View Position")
            patient = require_value(row["Patient ID"], path, line, "Patient ID")
            if findings != "No Finding":
                continue
            normal += 1
            if view in views:
                candidates.append(ImageToLocate(name, patient, view, (name,)))
    steps = [
        Step("rows", "label rows (images)", total),
        Step("normal", 'Finding Labels == "No Finding"', normal),
        Step("view", f"View Position in {list(views)}", len(candidates)),
    ]
    return candidates, steps


def _chexpert_normal(row, path, line) -> tuple[bool, bool, bool]:
    """(labelled normal, consistent with the labeler's rule, free of support devices) for one row."""
    labels = {c: parse_chexpert_label(row[c], path, line, c) for c in CHEXPERT_LABEL_COLUMNS}
    normal = labels[NO_FINDING] == 1.0
    # The labeler sets No Finding only when no pathology (Support Devices aside) is positive or uncertain.
    consistent = all(labels[c] not in (1.0, -1.0) for c in CHEXPERT_PATHOLOGIES)
    no_devices = labels[SUPPORT_DEVICES] != 1.0
    return normal, consistent, no_devices


def _support_device_step(count: int, exclude_support_devices: bool) -> list[Step]:
    if not exclude_support_devices:
        return []
    return [Step("no_support_devices", "Support Devices != 1.0 (--exclude_support_devices)", count)]


_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


def _count_normal_filters(row, path: Path, line: int, exclude_support_devices: bool, counts: dict) -> bool:
    """Apply the CheXpert-labeler normal filters (normal, consistent, device-free) to one row, counting each
    step's survivors in `counts`; True when the row passes them all."""
    is_normal, is_consistent, is_device_free = _chexpert_normal(row, path, line)
    for name, passed in (
        ("normal", is_normal),
        ("consistent", is_consistent),
        ("no_devices", is_device_free or not exclude_support_devices),
    ):
        if not passed:
            return False
        counts[name] += 1
    return True


def chexpert_candidates(label_files, views, options: LabelOptions):
    exclude_support_devices = options.exclude_support_devices
    required = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABEL_COLUMNS)
    seen: dict[str, tuple[Path, int]] = {}
    total = frontal = 0
    counts = dict.fromkeys(("normal", "consistent", "no_devices"), 0)
    candidates = []
    for path in label_files:
        for line, row in iter_label_rows(path, required, "CheXpert train.csv/valid.csv"):
            image_path = require_value(row["Path"], path, line, "Path").replace("\\", "/")
            if image_path in seen:
                first_path, first_line = seen[image_path]
                raise SelectionError(
                    f"{path}, line {line}: image {image_path} is listed twice (first at {first_path}, line "
                    f"{first_line})"
                )
            seen[image_path] = (path, line)
            match = _CHEXPERT_PATIENT.search(image_path)
            if match is None:
                raise bad_value(path, line, "Path", image_path, "a path with a patientNNNNN folder")
            orientation = check_known(row["Frontal/Lateral"], CHEXPERT_FRONTAL_LATERAL, path, line, "Frontal/Lateral")
            view = check_known(row["AP/PA"], CHEXPERT_AP_PA, path, line, "AP/PA")
            total += 1
            if not _count_normal_filters(row, path, line, exclude_support_devices, counts):
                continue
            if orientation != "Frontal":
                continue
            frontal += 1
            if view in views:
                # The CSV paths start with the archive's folder (CheXpert-v1.0-small/ or CheXpert-v1.0/):
                # accept an images root above that folder or the folder itself.
                parts = image_path.split("/")
                locations = (image_path, "/".join(parts[1:])) if len(parts) > 1 else (image_path,)
                candidates.append(ImageToLocate(image_path, match.group(1), view, locations))
    steps = [
        Step("rows", "label rows (images)", total),
        Step("normal", "No Finding == 1.0 (blank and -1.0 excluded)", counts["normal"]),
        Step("consistent", "no other pathology 1.0 or -1.0 (Support Devices allowed)", counts["consistent"]),
        *_support_device_step(counts["no_devices"], exclude_support_devices),
        Step("frontal", "Frontal/Lateral == Frontal", frontal),
        Step("view", f"AP/PA in {list(views)}", len(candidates)),
    ]
    return candidates, steps


def _split_mimic_files(label_files) -> tuple[Path, Path]:
    """(labels file, metadata file), told apart by their columns, whatever the order on the command line."""
    labels, metadata = [], []
    for path in label_files:
        columns = read_header(path)
        if "dicom_id" in columns:
            metadata.append(path)
        elif NO_FINDING in columns:
            labels.append(path)
        else:
            raise SelectionError(
                f"{path}: neither a MIMIC-CXR-JPG label file (column {NO_FINDING!r}) nor the metadata file "
                f"(column 'dicom_id'); columns found: {columns}"
            )
    if len(labels) != 1 or len(metadata) != 1:
        raise SelectionError(
            "--source mimic needs exactly two --labels files: mimic-cxr-2.0.0-chexpert.csv(.gz) (or -negbio) and "
            f"mimic-cxr-2.0.0-metadata.csv(.gz); got {len(labels)} label file(s) {[str(p) for p in labels]} and "
            f"{len(metadata)} metadata file(s) {[str(p) for p in metadata]}"
        )
    return labels[0], metadata[0]


def _mimic_id(value: str, path: Path, line: int, column: str) -> str:
    if not value.isdigit():
        raise bad_value(path, line, column, value, "a whole number")
    return value


def mimic_candidates(label_files, views, options: LabelOptions):
    exclude_support_devices = options.exclude_support_devices
    labels_path, metadata_path = _split_mimic_files(label_files)
    studies: dict[tuple[str, str], int] = {}
    normal_studies: set[tuple[str, str]] = set()
    counts = dict.fromkeys(("normal", "consistent", "no_devices"), 0)
    for line, row in iter_label_rows(
        labels_path, ("subject_id", "study_id", *CHEXPERT_LABEL_COLUMNS), "MIMIC-CXR-JPG label"
    ):
        study = (
            _mimic_id(row["subject_id"], labels_path, line, "subject_id"),
            _mimic_id(row["study_id"], labels_path, line, "study_id"),
        )
        if study in studies:
            raise SelectionError(
                f"{labels_path}, line {line}: study {study[1]} of subject {study[0]} is listed twice "
                f"(first at line {studies[study]})"
            )
        studies[study] = line
        if _count_normal_filters(row, labels_path, line, exclude_support_devices, counts):
            normal_studies.add(study)

    images = images_in_normal = 0
    candidates = []
    dicom_lines: dict[str, int] = {}
    required = ("dicom_id", "subject_id", "study_id", "ViewPosition")
    for line, row in iter_label_rows(metadata_path, required, "MIMIC-CXR-JPG metadata"):
        dicom_id = require_value(row["dicom_id"], metadata_path, line, "dicom_id")
        if dicom_id in dicom_lines:
            raise SelectionError(
                f"{metadata_path}, line {line}: dicom_id {dicom_id} is listed twice (first at line "
                f"{dicom_lines[dicom_id]})"
            )
        dicom_lines[dicom_id] = line
        subject = _mimic_id(row["subject_id"], metadata_path, line, "subject_id")
        study = _mimic_id(row["study_id"], metadata_path, line, "study_id")
        view = check_known(row["ViewPosition"], MIMIC_VIEWS, metadata_path, line, "ViewPosition")
        images += 1
        if (subject, study) not in normal_studies:
            continue
        images_in_normal += 1
        if view in views:
            relpath = f"p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
            candidates.append(ImageToLocate(dicom_id, subject, view, (f"files/{relpath}", relpath)))
    steps = [
        Step("rows", f"label rows (studies) in {labels_path.name}", len(studies)),
        Step("normal", "studies with No Finding == 1.0 (blank and -1.0 excluded)", counts["normal"]),
        Step("consistent", "no other pathology 1.0 or -1.0 (Support Devices allowed)", counts["consistent"]),
        *_support_device_step(counts["no_devices"], exclude_support_devices),
        Step("images", f"images of those studies in {metadata_path.name} (of {images})", images_in_normal),
        Step("view", f"ViewPosition in {list(views)}", len(candidates)),
    ]
    return candidates, steps


def _vindr_box_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, bool]]:
    """(image_id, says no finding) per row of a box file: Kaggle train.csv or PhysioNet annotations_*.csv."""
    check_class_id = "class_id" in columns
    for line, row in iter_label_rows(path, ("image_id", "class_name"), "VinDr-CXR box annotation"):
        image_id = require_value(row["image_id"], path, line, "image_id")
        class_name = require_value(row["class_name"], path, line, "class_name")
        is_no_finding = class_name == VINDR_NO_FINDING
        if not is_no_finding and class_name.lower() == VINDR_NO_FINDING.lower():
            raise bad_value(path, line, "class_name", class_name, f"exactly {VINDR_NO_FINDING!r} for no finding")
        if check_class_id and is_no_finding != (row["class_id"] == VINDR_NO_FINDING_CLASS_ID):
            raise SelectionError(
                f"{path}, line {line}: class_name {class_name!r} does not match class_id {row['class_id']!r} "
                f"({VINDR_NO_FINDING!r} is class_id {VINDR_NO_FINDING_CLASS_ID})"
            )
        yield image_id, is_no_finding


def _vindr_image_label_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, bool]]:
    """(image_id, says no finding) per row of PhysioNet image_labels_*.csv: one 0/1 column per local and
    global label. A row says no finding when `No finding` is 1 and no other label is 1 (blank = not marked)."""
    labels = [name for name in columns if name and name.lower() not in VINDR_ID_COLUMNS]
    for line, row in iter_label_rows(path, ("image_id", VINDR_NO_FINDING), "VinDr-CXR image label"):
        image_id = require_value(row["image_id"], path, line, "image_id")
        marked = set()
        for name in labels:
            value = row.get(name, "")
            if value not in VINDR_LABEL_VALUES:
                raise bad_value(path, line, name, value, "0, 1 or blank")
            if value in ("1", "1.0"):
                marked.add(name)
        yield image_id, marked == {VINDR_NO_FINDING}


def vindr_candidates(label_files, views, options: LabelOptions):
    normal_by_image: dict[str, bool] = {}
    total = 0
    for path in label_files:
        columns = read_header(path)
        if "class_name" in columns:
            rows = _vindr_box_rows(path, columns)
        elif VINDR_NO_FINDING in columns:
            rows = _vindr_image_label_rows(path, columns)
        else:
            raise SelectionError(
                f"{path}: neither a VinDr-CXR box annotation file (column 'class_name': train.csv, "
                f"annotations_train.csv) nor an image label file (column {VINDR_NO_FINDING!r}: "
                f"image_labels_train.csv); "
                f"columns found: {columns}"
            )
        for image_id, says_no_finding in rows:
            total += 1
            normal_by_image[image_id] = normal_by_image.get(image_id, True) and says_no_finding
    normal_ids = sorted(image_id for image_id, normal in normal_by_image.items() if normal)
    view_ok = VINDR_DECLARED_VIEW in views
    candidates = [
        ImageToLocate(image_id, image_id, VINDR_DECLARED_VIEW, tuple(image_id + s for s in VINDR_SUFFIXES))
        for image_id in normal_ids
        if view_ok
    ]
    steps = [
        Step("rows", "label rows (per radiologist, and per finding in box files)", total),
        Step("images", "distinct image_id", len(normal_by_image)),
        Step("normal", f'every row of the image says "{VINDR_NO_FINDING}" and nothing else', len(normal_ids)),
        Step(
            "view",
            f"declared view {VINDR_DECLARED_VIEW} (no per-image view published) in {list(views)}",
            len(candidates),
        ),
    ]
    return candidates, steps

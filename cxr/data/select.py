"""Pick normal frontal chest X-rays out of public datasets' label files and write a file list for train.py.

    python -m cxr.select --source nih --labels Data_Entry_2017_v2020.csv --images_root /data/nih --out nih_normal_pa.csv
    python -m cxr.select --source chexpert --labels train.csv valid.csv --images_root /data/chexpert --out chexpert.csv
    python -m cxr.select --source mimic --labels mimic-cxr-2.0.0-chexpert.csv.gz mimic-cxr-2.0.0-metadata.csv.gz \\
        --images_root /data/mimic-cxr-jpg/2.0.0 --out mimic.csv
    python -m cxr.select --source vindr --labels annotations/annotations_train.csv annotations/image_labels_train.csv \\
        --images_root /data/vindr-cxr/1.0.0 --out vindr.csv
    python -m cxr.select --source padchest --labels PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz \\
        --images_root /data/padchest --views PA,AP,AP_horizontal --physician_labels_only --out padchest.csv
    python train.py --dataset_dir IMAGES_ROOT --file_list list.csv ...

The list is a CSV with the header `path,patient_id,view,source`; `path` is relative to --images_root (POSIX
separators) unless --absolute_paths is given. Rows are sorted by path, so the same inputs give the same file.

Rules per source (counts are printed after every step and returned in `SelectionResult.steps`):
- nih: `Finding Labels == "No Finding"`; `View Position` in --views; `Patient ID`; the file named `Image Index`
  is searched anywhere under --images_root (the release spreads the files over `images_*/images/`).
- chexpert: `No Finding == 1.0` only (blank = not mentioned, -1.0 = uncertain, both excluded); rows that also
  carry a positive or uncertain pathology other than Support Devices contradict the labeler and are excluded;
  `Frontal/Lateral == Frontal`; `AP/PA` in --views; patient id = the `patientNNNNN` folder of `Path`.
- mimic: studies with `No Finding == 1.0` in mimic-cxr-2.0.0-chexpert.csv(.gz), joined on
  (subject_id, study_id) with the images of mimic-cxr-2.0.0-metadata.csv(.gz); `ViewPosition` in --views;
  path files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg; patient id = subject_id.
- vindr: an image is normal only when every radiologist row says `class_name == "No finding"` (box files:
  Kaggle train.csv, PhysioNet annotations_train.csv) and, in PhysioNet image_labels_train.csv, `No finding == 1`
  with no other local or global label (e.g. Tuberculosis, which has no box); the dataset
  publishes no view column (it is described as postero-anterior, so every image counts as PA) and no patient
  id (patient id = image_id, so a patient split degrades to an image split); files <image_id>.dicom.
- padchest: the `Labels` list is exactly `['normal']` (parsed with ast.literal_eval, never eval); `Projection` in
  --views (PA, AP and AP_horizontal may be chosen); with --physician_labels_only also `MethodLabel == Physician`;
  patient id = `PatientID`; path <ImageDir>/<ImageID> (or <ImageID> when the numbered folders were merged).
A missing column or a value outside the known set is an error naming the file, line and column.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr.data.dataset import FILE_LIST_COLUMNS
from cxr.data.select_csv import ImageToLocate, LabelOptions, SelectionError, Step
from cxr.data.select_labels import chexpert_candidates, mimic_candidates, nih_candidates, vindr_candidates
from cxr.data.select_padchest import padchest_candidates
from cxr.fileio import atomic_path, check_writable_file
from cxr.flags import ConfigError, check_choices, flag, parse_config, require

LABEL_RULES = {
    "nih": nih_candidates,
    "chexpert": chexpert_candidates,
    "mimic": mimic_candidates,
    "vindr": vindr_candidates,
    "padchest": padchest_candidates,
}
SOURCES = tuple(LABEL_RULES)
# nih and vindr name files that may sit in any subfolder; the others give paths from the root.
FIND_BY_NAME = {"nih": True, "vindr": True, "chexpert": False, "mimic": False, "padchest": False}
PATH_SOURCES = tuple(source for source in SOURCES if not FIND_BY_NAME[source])
FRONTAL_VIEWS = ("PA", "AP")
# PadChest also records AP images taken lying down (Projection AP_horizontal); the other sources have no such value.
FRONTAL_VIEWS_BY_SOURCE = {"padchest": ("PA", "AP", "AP_horizontal")}


@dataclass(frozen=True)
class SelectedImage:
    """One row of the file list. `path` is relative to the images root, with POSIX separators."""

    path: str
    patient_id: str
    view: str
    source: str


@dataclass
class SelectionResult:
    """The selected images (sorted by path), the count after each filter step, and the files not found."""

    rows: list[SelectedImage]
    steps: list[Step]
    missing: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {step.name: step.count for step in self.steps}


# ---------------------------------------------------------------------------------------------------------
# Finding the files


def index_file_names(root: Path, wanted: set[str]) -> dict[str, list[str]]:
    """Map each wanted file name to its paths (relative, POSIX) anywhere under `root`; one walk of the tree.

    Hidden files and folders (names starting with ".") are skipped, as in cxr.data.dataset; a folder reached twice
    through symlinks is walked once, through the first path in sorted order.
    """
    found: dict[str, list[str]] = {}
    visited: set[str] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            raise SelectionError(f"cannot list {folder} under --images_root: {error}") from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append(Path(entry.path))
            elif entry.name in wanted:
                found.setdefault(entry.name, []).append(Path(entry.path).relative_to(root).as_posix())
        pending.extend(reversed(subfolders))  # depth-first in name order
    return found


def _locate_by_name(root: Path, candidates: list[ImageToLocate]) -> dict[str, str]:
    wanted = {name for candidate in candidates for name in candidate.locations}
    index = index_file_names(root, wanted)
    located = {}
    for candidate in candidates:
        for name in candidate.locations:
            paths = index.get(name)
            if not paths:
                continue
            if len(paths) > 1:
                raise SelectionError(
                    f"{name} is present more than once under {root}: {sorted(paths)}; remove the duplicate copies"
                )
            located[candidate.key] = paths[0]
            break
    return located


def _locate_by_path(root: Path, candidates: list[ImageToLocate]) -> dict[str, str]:
    located = {}
    for candidate in candidates:
        for relpath in candidate.locations:
            if (root / relpath).is_file():
                located[candidate.key] = relpath
                break
    return located


# ---------------------------------------------------------------------------------------------------------
# Public API


def parse_views(views: str | Sequence[str], source: str | None = None) -> tuple[str, ...]:
    """("PA",) from "PA", "pa", "PA,AP" or ["PA", "AP"]; only frontal views are allowed (for padchest also
    AP_horizontal, spelled as in its label file whatever the case given)."""
    allowed = FRONTAL_VIEWS_BY_SOURCE.get(source, FRONTAL_VIEWS)
    spelling = {view.upper(): view for view in allowed}
    items = views.split(",") if isinstance(views, str) else list(views)
    given = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not given:
        raise ConfigError(f"--views: give at least one of {', '.join(allowed)}")
    unknown = [v for v in given if v.upper() not in spelling]
    if unknown:
        hint = " (AP_horizontal: --source padchest only)" if any(v.upper() == "AP_HORIZONTAL" for v in unknown) else ""
        raise ConfigError(
            f"--views: {unknown} not allowed{hint}; use frontal views {', '.join(allowed)} (e.g. --views PA,AP)"
        )
    return tuple(dict.fromkeys(spelling[v.upper()] for v in given))


def select_images(
    source: str,
    labels: str | Path | Sequence[str | Path],
    images_root: str | Path,
    views: str | Sequence[str] = ("PA",),
    *,
    exclude_support_devices: bool = False,
    physician_labels_only: bool = False,
    check_files: bool = True,
    verbose: bool = True,
) -> SelectionResult:
    """Select the normal frontal images of one public dataset that are present under `images_root`.

    `labels` are the dataset's label file(s) (see the module docstring for each source's rules). Prints the
    count left after each filter step unless `verbose` is False. With `check_files=False` (chexpert, mimic and
    padchest, whose label files give the full path) the disk is not looked at: the list names the files to fetch.
    Raises SelectionError for malformed label files, duplicated files on disk, or an empty selection.
    """
    if source not in SOURCES:
        raise SelectionError(f"unknown source {source!r}; use one of {list(SOURCES)}")
    if exclude_support_devices and source not in ("chexpert", "mimic"):
        raise SelectionError(
            f"exclude_support_devices applies to chexpert and mimic only (they have that label), not {source}"
        )
    if physician_labels_only and source != "padchest":
        raise SelectionError(f"physician_labels_only applies to padchest only (it has MethodLabel), not {source}")
    if not check_files and FIND_BY_NAME[source]:
        raise SelectionError(
            f"check_files=False needs a source whose labels give the path ({', '.join(PATH_SOURCES)}); "
            f"{source} files are found by name under the images root"
        )
    label_files = [Path(labels)] if isinstance(labels, (str, Path)) else [Path(p) for p in labels]
    if not label_files:
        raise SelectionError("give at least one label file")
    root = Path(images_root)
    if not root.is_dir():
        raise SelectionError(f"images root {root} is not a folder")
    views = parse_views(views, source)

    options = LabelOptions(exclude_support_devices, physician_labels_only)
    candidates, steps = LABEL_RULES[source](label_files, views, options)
    if check_files:
        locate = _locate_by_name if FIND_BY_NAME[source] else _locate_by_path
        located = locate(root, candidates)
        steps.append(Step("on_disk", "found on disk under --images_root", len(located)))
    else:
        located = {c.key: c.locations[0] for c in candidates}
    rows = sorted(
        (SelectedImage(located[c.key], c.patient_id, c.view, source) for c in candidates if c.key in located),
        key=lambda row: row.path,
    )
    missing = sorted(c.locations[0] for c in candidates if c.key not in located)
    steps.append(Step("patients", "distinct patient_id among them", len({row.patient_id for row in rows})))
    if verbose:
        print(format_steps(source, label_files, root, steps, missing))
    _check_not_empty(steps, root, candidates)
    return SelectionResult(rows=rows, steps=steps, missing=missing)


def _check_not_empty(steps: list[Step], root: Path, candidates: list[ImageToLocate]) -> None:
    emptied = next((step for step in steps if step.count == 0), None)
    if emptied is None:
        return
    if emptied.name == "on_disk":
        example = candidates[0].locations[0]
        raise SelectionError(
            f"none of the {len(candidates)} selected images was found under {root} (e.g. {example}); "
            "check --images_root: it should be the folder the dataset was unpacked into"
        )
    raise SelectionError(f"no images left after the step '{emptied.name}' ({emptied.description}); nothing to write")


def format_steps(
    source: str, label_files: Sequence[Path], root: Path, steps: Sequence[Step], missing: Sequence[str]
) -> str:
    """The per-step counts as printed by select_images."""
    width = max(len(step.description) for step in steps)
    lines = [f"cxr.data.select {source}: labels {', '.join(str(p) for p in label_files)}; images root {root}"]
    lines += [f"  {step.description:<{width}}  {step.count:>9,}" for step in steps]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        lines.append(f"  {len(missing):,} selected image(s) not on disk (skipped): {shown}")
    return "\n".join(lines)


def write_file_list(rows: Iterable[SelectedImage], out: str | Path, *, absolute_root: str | Path | None = None) -> Path:
    """Write the file list CSV (`path,patient_id,view,source`) atomically; returns its path.

    With `absolute_root`, paths are written as absolute paths under it instead of relative ones.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(absolute_root).resolve() if absolute_root is not None else None
    with atomic_path(out) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(FILE_LIST_COLUMNS)
        for row in rows:
            path = (root / row.path).as_posix() if root is not None else row.path
            writer.writerow((path, row.patient_id, row.view, row.source))
    return out


@dataclass
class SelectConfig:
    """Select normal frontal chest X-rays from a public dataset's label files and write a file list for train.py."""

    source: str | None = flag(None, "which dataset the label files come from", SOURCES)
    labels: list[Path] | None = flag(
        None,
        "label file(s), .csv or .csv.gz: nih Data_Entry_2017*.csv; chexpert train.csv [valid.csv]; mimic "
        "mimic-cxr-2.0.0-chexpert.csv.gz and mimic-cxr-2.0.0-metadata.csv.gz; vindr annotations_train.csv "
        "[image_labels_train.csv] (PhysioNet) or train.csv (Kaggle); padchest "
        "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]",
    )
    images_root: Path | None = flag(
        None,
        "folder the images were unpacked into; list paths are relative to it (pass it to train.py as --dataset_dir)",
    )
    out: Path | None = flag(None, "the file list CSV to write (columns path,patient_id,view,source)")
    views: str = flag(
        "PA", "comma-separated frontal views to keep: PA, AP or PA,AP (padchest also AP_horizontal: AP lying down)"
    )
    exclude_support_devices: bool = flag(
        False, "chexpert/mimic: also drop normal images labelled Support Devices == 1.0 (lines, tubes, pacemakers)"
    )
    physician_labels_only: bool = flag(
        False, "padchest: keep only reports labelled by a physician (MethodLabel == Physician), not by the RNN model"
    )
    absolute_paths: bool = flag(False, "write absolute paths instead of paths relative to --images_root")
    check_files: bool = flag(
        True,
        "keep only images present under --images_root; --no-check_files (chexpert/mimic/padchest) lists them all, "
        "e.g. to download just those files",
    )

    def validate(self) -> None:
        require(self.source is not None, "source", f"is required: one of {', '.join(SOURCES)}")
        check_choices(self)
        require(bool(self.labels), "labels", "is required: the dataset's label file(s)")
        self.labels = [Path(p) for p in self.labels]
        for path in self.labels:
            require(path.is_file(), "labels", f"file {path} does not exist")
        require(self.images_root is not None, "images_root", "is required: the folder the images were unpacked into")
        require(Path(self.images_root).is_dir(), "images_root", f"{self.images_root} is not a folder")
        require(self.out is not None, "out", "is required: where to write the file list CSV")
        check_writable_file(self.out, "--out", ConfigError)  # before the label files are read, not after
        parse_views(self.views, self.source)
        require(
            not self.physician_labels_only or self.source == "padchest",
            "physician_labels_only",
            f"applies to --source padchest only (it has MethodLabel), not {self.source}",
        )
        require(
            not self.exclude_support_devices or self.source in ("chexpert", "mimic"),
            "exclude_support_devices",
            f"applies to --source chexpert and mimic only, not {self.source}",
        )
        require(
            self.check_files or self.source in PATH_SOURCES,
            "check_files",
            f"--no-check_files needs --source {' or '.join(PATH_SOURCES)} (their labels give the path), "
            f"not {self.source}",
        )


def parse_select_config(argv: list[str] | None = None) -> SelectConfig:
    """Flags (and an optional --config TOML file) to a validated SelectConfig; bad values exit with status 2."""
    return parse_config(SelectConfig, argv, prog="python -m cxr.select")


def main(argv: list[str] | None = None) -> int:
    """`python -m cxr.select ...`: select, print the counts, write the list. Exit status 1 on a selection error."""
    config = parse_select_config(argv)
    try:
        result = select_images(
            config.source,
            config.labels,
            config.images_root,
            config.views,
            exclude_support_devices=config.exclude_support_devices,
            physician_labels_only=config.physician_labels_only,
            check_files=config.check_files,
        )
    except SelectionError as error:
        print(f"cxr.data.select: error: {error}", file=sys.stderr)
        return 1
    try:
        out = write_file_list(
            result.rows, config.out, absolute_root=config.images_root if config.absolute_paths else None
        )
    except OSError as error:  # a full disk: the temporary file is removed, an earlier list is kept
        print(f"cxr.data.select: error: --out: cannot write {config.out} ({error.strerror or error})", file=sys.stderr)
        return 1
    print(f"wrote {len(result.rows):,} images of {result.counts['patients']:,} patients to {out}")
    if not config.check_files:
        print("the disk was not checked (--no-check_files): fetch these files, then run again without it")
    elif not config.absolute_paths:
        print(f"train with: python train.py --dataset_dir {config.images_root} --file_list {out} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())

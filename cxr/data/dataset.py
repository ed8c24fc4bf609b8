"""Finding, validating and splitting the training images; the run's manifest.

`scan_dataset` finds the images (recursively under `--dataset_dir`, or listed in `--file_list`), opens and
decodes every one of them once (in worker processes, with a progress bar), and returns one `ImageRecord` per
usable image with its size and SHA-256 content hash. Bad files (missing, empty, not an image, truncated,
unsupported, smaller than `--min_image_size`) stop the run with a list of each file and its reason, or are
skipped with a summary under `--skip_bad_images`. Byte-identical copies are kept once (a copy on both sides
of the held-out split would leak it). Images are only ever read. Decoding one file and the bad-file messages
live in `cxr.data.imagecheck`.

`split_holdout` holds out a validation set fixed by the seed, by patient when the file list gives
`patient_id`. `write_manifest` records both splits with content hashes, so a run says exactly what it
trained on.

Seeded choices (the `--max_images` subset, the split) rank items by SHA-256(seed, name): a pure function of
the seed and the names, the same on every machine and library version, and stable when files are added
(an image's rank never depends on the other images).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cxr.data.imagecheck import LISTED_IN_ERRORS, bad_files_message, bad_files_summary, inspect_all
from cxr.data.imageio import DICOM_INSTALL_HINT, DICOM_SUFFIXES, SUPPORTED_SUFFIXES
from cxr.data.manifestcheck import manifest_problem, manifest_split_sha256
from cxr.fileio import atomic_write_bytes, file_sha256

MANIFEST_FORMAT = "cxr-manifest/1"
FILE_LIST_COLUMNS = ("path", "patient_id", "view", "source")  # written by cxr.data.select, read by read_file_list


class DatasetError(RuntimeError):
    """The dataset cannot be used as given; the message says which files/flag and what to do."""


@dataclass
class ImageRecord:
    """One usable image. `relpath` is relative to --dataset_dir (POSIX), or absolute for files outside it."""

    path: Path
    relpath: str
    size_bytes: int
    sha256: str
    patient_id: str | None = None
    view: str | None = None
    source: str | None = None
    height: int | None = None
    width: int | None = None


@dataclass
class ScanReport:
    """What `scan_dataset_report` found: the usable records and every file it left out, with why."""

    records: list[ImageRecord]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (relpath, relpath of the kept copy)
    candidates: int = 0  # files found or listed


@dataclass(frozen=True)
class ImageToCheck:
    """A file found under --dataset_dir or listed in --file_list (with the list's columns), not yet opened."""

    path: Path
    relpath: str
    patient_id: str | None = None
    view: str | None = None
    source: str | None = None


# ------------------------------------------------------------------------------------------ discovery


def _relpath(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass
class ImageSearch:
    """What `find_images` found under a folder."""

    root: Path
    paths: list[Path]  # supported image files, sorted by their path relative to `root`
    other_suffixes: Counter  # suffix -> number of other (not hidden, not excluded) files
    unreadable: list[tuple[Path, str]]  # folders that could not be listed, with the reason

    def unreadable_message(self, name: str, hint: str) -> str:
        """'N folder(s) under NAME cannot be read: ...' with each folder and why, then `hint`."""
        lines = [f"  {_relpath(folder, self.root)}/: {reason}" for folder, reason in self.unreadable[:LISTED_IN_ERRORS]]
        if len(self.unreadable) > LISTED_IN_ERRORS:
            lines.append(f"  ... and {len(self.unreadable) - LISTED_IN_ERRORS} more")
        return f"{len(self.unreadable)} folder(s) under {name} cannot be read:\n" + "\n".join(lines) + f"\n{hint}"


def find_images(folder, exclude: str = "") -> ImageSearch:
    """The image search of every command (train.py's scan, cxr.privacy.audit, cxr.privacy.evaluate): supported image
    files under
    `folder`, recursively.

    The suffix decides (case-insensitive, see SUPPORTED_SUFFIXES). Hidden files and folders (names starting with
    a dot, such as the `._x.png` files macOS leaves on other disks) are skipped, and so are file names matching
    one of the comma-separated, case-insensitive `exclude` patterns. Symlinked folders are followed once. A folder
    that cannot be listed (no permission) is never skipped silently: it is returned in `unreadable`.
    """
    root = Path(folder)
    patterns = [p.strip().lower() for p in exclude.split(",") if p.strip()]
    found, other_suffixes, unreadable, visited = [], Counter(), [], set()

    def on_error(error: OSError) -> None:
        unreadable.append((Path(error.filename) if error.filename else root, error.strerror or str(error)))

    for current, subfolders, files in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(current)
        if real in visited:  # a symlink loop
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(d for d in subfolders if not _is_hidden(d))
        for name in files:
            if _is_hidden(name) or any(fnmatch.fnmatch(name.lower(), pattern) for pattern in patterns):
                continue
            suffix = Path(name).suffix.lower()
            if suffix in SUPPORTED_SUFFIXES:
                found.append(Path(current) / name)
            else:
                other_suffixes[suffix or "(no suffix)"] += 1
    found.sort(key=lambda p: _relpath(p, root))
    unreadable.sort(key=lambda item: _relpath(item[0], root))
    return ImageSearch(root, found, other_suffixes, unreadable)


def discover_images(dataset_dir, skip_unreadable: bool = False) -> list[Path]:
    """`find_images` of --dataset_dir, sorted; a clear DatasetError when it finds nothing usable.

    A subfolder that cannot be listed is an error, or with `skip_unreadable` (--skip_bad_images) skipped with a
    warning naming it; an unreadable --dataset_dir is always an error.
    """
    if dataset_dir is None:
        raise DatasetError("--dataset_dir is required when no --file_list is given")
    root = Path(dataset_dir)
    if not root.exists():
        raise DatasetError(f"--dataset_dir {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"--dataset_dir {root} is not a folder (to train on a list of files, use --file_list)")
    search = find_images(root)
    for folder, reason in search.unreadable:
        if folder == root:
            raise DatasetError(
                f"--dataset_dir {root} cannot be read ({reason}): give the user running train.py permission to list it"
            )
    if search.unreadable:
        name = f"--dataset_dir {root}"
        if not skip_unreadable:
            raise DatasetError(
                search.unreadable_message(
                    name,
                    "Give the user running train.py permission to list "
                    "them, or pass --skip_bad_images to train without the images in them.",
                )
            )
        print(
            "[cxr] --skip_bad_images: skipped " + search.unreadable_message(name, "(their images are not used)"),
            file=sys.stderr,
        )
    if not search.paths:
        if not search.other_suffixes:
            raise DatasetError(f"--dataset_dir {root} contains no files (hidden files are ignored)")
        seen = ", ".join(f"{s} ({n})" for s, n in search.other_suffixes.most_common(8))
        raise DatasetError(
            f"--dataset_dir {root} has no supported images ({', '.join(sorted(SUPPORTED_SUFFIXES))}); "
            f"it contains: {seen}. DICOM files without a suffix can be given with --file_list."
        )
    return search.paths


def read_file_list(file_list, dataset_dir=None) -> list[ImageToCheck]:
    """Entries of a `--file_list`: a CSV with a header (`path`, optional `patient_id`, `view`, `source`)
    or a text file of one path per line (blank lines and `#` comments skipped).

    Relative paths are resolved against `dataset_dir`. Duplicate paths and rows without a patient id (when
    the column exists) are errors; missing files are left to the validation pass.
    """
    list_path = Path(file_list)
    if not list_path.is_file():
        raise DatasetError(f"--file_list {list_path} does not exist")
    root = Path(dataset_dir) if dataset_dir is not None else None
    if root is not None and not root.is_dir():
        raise DatasetError(
            f"--dataset_dir {root} does not exist (relative paths in --file_list are resolved against it)"
        )
    rows = _read_csv_rows(list_path) if list_path.suffix.lower() == ".csv" else _read_txt_rows(list_path)
    if not rows:
        raise DatasetError(f"--file_list {list_path} lists no images")

    candidates, first_line_of = [], {}
    duplicates = []
    for line, row in rows:
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            if root is None:
                raise DatasetError(
                    f"--file_list {list_path} line {line}: relative path {row['path']!r} needs --dataset_dir "
                    "(the folder the paths are relative to)"
                )
            path = root / path
        key = os.path.normpath(path)
        if key in first_line_of:
            duplicates.append(f"line {line}: {row['path']} (same file as line {first_line_of[key]})")
            continue
        first_line_of[key] = line
        candidates.append(
            ImageToCheck(
                Path(key),
                _relpath(Path(key), root),
                patient_id=row.get("patient_id"),
                view=row.get("view"),
                source=row.get("source"),
            )
        )
    if duplicates:
        raise DatasetError(
            f"--file_list {list_path} names the same file more than once:\n  "
            + "\n  ".join(duplicates[:LISTED_IN_ERRORS])
        )
    return sorted(candidates, key=lambda c: c.relpath)


def _read_csv_rows(list_path: Path) -> list[tuple[int, dict]]:
    # surrogateescape: bytes that are not UTF-8 (a file name from an old export) stay the file name's own bytes.
    with open(list_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        header = [(name or "").strip() for name in (reader.fieldnames or [])]
        if "path" not in header:
            raise DatasetError(
                f"--file_list {list_path}: the CSV header must have a `path` column (optional: patient_id, view, "
                f"source); found columns {header}. A list without a header must be a .txt file."
            )
        reader.fieldnames = header
        has_patient = "patient_id" in header
        rows, missing_patient = [], []
        for line, raw in enumerate(reader, start=2):
            row = {k: (raw.get(k) or "").strip() or None for k in FILE_LIST_COLUMNS if k in header}
            if row["path"] is None:
                raise DatasetError(f"--file_list {list_path} line {line}: empty `path`")
            if has_patient and row["patient_id"] is None:
                missing_patient.append(str(line))
            rows.append((line, row))
    if missing_patient:
        raise DatasetError(
            f"--file_list {list_path}: `patient_id` is empty on line(s) {', '.join(missing_patient[:20])}"
            f"{' ...' if len(missing_patient) > 20 else ''}; every row needs one for a patient-level split "
            "(or drop the column to split by image)"
        )
    return rows


def _read_txt_rows(list_path: Path) -> list[tuple[int, dict]]:
    rows = []
    for line, text in enumerate(
        list_path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines(), start=1
    ):
        entry = text.strip()
        if not entry or entry.startswith("#") or (line == 1 and entry == "path"):
            continue
        rows.append((line, {"path": entry}))
    return rows


# ------------------------------------------------------------------------------------------ validation


def selection_rank(seed: int, name: str) -> str:
    """Sort key of seeded choices: SHA-256 of (seed, name); depends on nothing else."""
    # surrogateescape: a file name that is not valid UTF-8 (M\xfcller.png from an old export) hashes as its bytes.
    return hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogateescape")).hexdigest()


def scan_dataset(
    dataset_dir, file_list=None, *, min_image_size=64, skip_bad_images=False, max_images=None, seed=0, num_workers=0
) -> list[ImageRecord]:
    """Find, open and validate every image; return the usable ones sorted by relpath.

    With `max_images`, a seeded subset: candidates are taken in `selection_rank(seed, relpath)` order (only
    those are opened) and a bad or duplicate file is replaced by the next one in that order, so the subset is
    a function of the seed and the files alone. `num_workers` decoding processes (0: in this process).
    Raises DatasetError for a missing/empty folder, an unusable file list, or bad files (unless
    `skip_bad_images`, which skips them and prints a summary).
    """
    return scan_dataset_report(
        dataset_dir,
        file_list,
        min_image_size=min_image_size,
        skip_bad_images=skip_bad_images,
        max_images=max_images,
        seed=seed,
        num_workers=num_workers,
    ).records


def scan_dataset_report(
    dataset_dir, file_list=None, *, min_image_size=64, skip_bad_images=False, max_images=None, seed=0, num_workers=0
) -> ScanReport:
    """`scan_dataset`, also returning the skipped bad files and duplicates (for logs and the manifest)."""
    if file_list is not None:
        candidates = read_file_list(file_list, dataset_dir)
        source = f"--file_list {file_list}"
    else:
        root = Path(dataset_dir) if dataset_dir is not None else None
        candidates = [ImageToCheck(p, _relpath(p, root)) for p in discover_images(dataset_dir, skip_bad_images)]
        source = f"--dataset_dir {dataset_dir}"
    if file_list is not None and not any(c.path.exists() for c in candidates):
        raise DatasetError(
            f"none of the {len(candidates)} files in {source} exist (first: {candidates[0].path}); relative "
            f"paths are resolved against --dataset_dir ({dataset_dir})"
        )
    _require_dicom_support(candidates, source)
    if max_images is not None:
        candidates = sorted(candidates, key=lambda c: selection_rank(seed, c.relpath))
        target = min(max_images, len(candidates))
    else:
        target = len(candidates)

    good, bad, duplicates, kept_copy = [], [], [], {}
    position = 0
    executor = None
    if num_workers > 0:
        # The platform's default start method, as torch's DataLoader uses: the workers only decode files.
        executor = ProcessPoolExecutor(num_workers)
    try:
        with tqdm(total=target, desc="checking images", unit="img", disable=None) as progress:
            while len(good) < target and position < len(candidates):
                batch = candidates[position : position + target - len(good)]
                if position > 0:  # replacements for skipped files
                    progress.total += len(batch)
                    progress.refresh()
                position += len(batch)
                for candidate, (info, reason) in zip(
                    batch, inspect_all([c.path for c in batch], min_image_size, executor, num_workers, progress)
                ):
                    if info is None:
                        bad.append((candidate.relpath, reason))
                        continue
                    size_bytes, sha256, height, width = info
                    if sha256 in kept_copy:
                        duplicates.append((candidate.relpath, kept_copy[sha256]))
                        continue
                    kept_copy[sha256] = candidate.relpath
                    good.append(
                        ImageRecord(
                            path=Path(os.path.abspath(candidate.path)),
                            relpath=candidate.relpath,
                            size_bytes=size_bytes,
                            sha256=sha256,
                            patient_id=candidate.patient_id,
                            view=candidate.view,
                            source=candidate.source,
                            height=height,
                            width=width,
                        )
                    )
                if bad and not skip_bad_images:
                    break
    finally:
        if executor is not None:
            executor.shutdown()

    if bad and not skip_bad_images:
        raise DatasetError(bad_files_message(bad, len(good), source, complete=max_images is None))
    if bad:
        print(bad_files_summary(bad), file=sys.stderr)
    if duplicates:
        print(
            f"[cxr] {len(duplicates)} file(s) are byte-identical copies of another image and were used once: "
            + "; ".join(f"{d} = {k}" for d, k in duplicates[:10])
            + (" ..." if len(duplicates) > 10 else ""),
            file=sys.stderr,
        )
    if not good:
        raise DatasetError(f"no usable images in {source} ({len(bad)} bad file(s), {len(duplicates)} duplicate(s))")
    good.sort(key=lambda r: r.relpath)
    return ScanReport(good, bad, duplicates, candidates=len(candidates))


def _require_dicom_support(candidates: list[ImageToCheck], source: str) -> None:
    """Fail once, up front, instead of reporting every DICOM file as bad when pydicom is missing."""
    dicoms = [c for c in candidates if c.path.suffix.lower() in DICOM_SUFFIXES]
    if not dicoms:
        return
    try:
        import pydicom  # noqa: F401 - an optional dependency, only needed for DICOM files
    except ImportError:
        raise DatasetError(
            f"{source} has {len(dicoms)} DICOM file(s) (e.g. {dicoms[0].relpath}); {DICOM_INSTALL_HINT}"
        ) from None


# ------------------------------------------------------------------------------------------ split


def _group_key(record: ImageRecord) -> str:
    return f"patient:{record.patient_id}" if record.patient_id is not None else f"image:{record.relpath}"


def split_holdout(records, *, val_fraction, val_count=None, seed=0) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, val), fixed by the seed; both sorted by relpath.

    When records carry `patient_id` the split is by patient: all images of a patient go to the same side,
    and `val_fraction` is a fraction of patients. `val_count` (images) overrides `val_fraction`; by patient,
    whole patients are taken in seeded order, each one only if it still fits, so the held-out set has at
    most `val_count` images (usually exactly; a patient is never split to hit the number). A non-zero fraction holds
    out at least one image/patient. At least one
    training image must remain.
    """
    records = list(records)
    if not records:
        raise DatasetError("split_holdout: no images to split")
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        groups.setdefault(_group_key(record), []).append(record)
    by_patient = any(r.patient_id is not None for r in records)
    ordered = sorted(groups, key=lambda key: selection_rank(seed, key))

    chosen: list[str] = []
    if val_count is not None:
        if val_count < 0:
            raise DatasetError(f"--val_count must be >= 0, got {val_count}")
        if val_count >= len(records):
            raise DatasetError(f"--val_count {val_count} leaves no training images (the dataset has {len(records)})")
        taken = 0
        for key in ordered:
            if taken == val_count:
                break
            if taken + len(groups[key]) <= val_count:
                chosen.append(key)
                taken += len(groups[key])
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(f"--val_fraction must be in [0, 1), got {val_fraction}")
        wanted = round(val_fraction * len(ordered))
        if val_fraction > 0:
            wanted = max(1, wanted)
        chosen = ordered[:wanted]
    val_keys = set(chosen)
    train = sorted((r for r in records if _group_key(r) not in val_keys), key=lambda r: r.relpath)
    val = sorted((r for r in records if _group_key(r) in val_keys), key=lambda r: r.relpath)
    if not train:
        unit = "patients" if by_patient else "images"
        raise DatasetError(
            f"the held-out split leaves no training images ({len(records)} images, {len(groups)} {unit}); "
            "lower --val_fraction / --val_count or add images"
        )
    return train, val


# ------------------------------------------------------------------------------------------ manifest


def _patients(records) -> int | None:
    ids = {r.patient_id for r in records if r.patient_id is not None}
    return len(ids) if ids else None


def _dataset_root(records) -> str | None:
    """The --dataset_dir the relative paths start from (recovered from path = root / relpath)."""
    for record in records:
        if not Path(record.relpath).is_absolute():
            parts = len(Path(record.relpath).parts)
            return Path(record.path).parents[parts - 1].as_posix()
    return None


def _entry(record: ImageRecord, split: str) -> dict:
    return {
        "relpath": record.relpath,
        "size_bytes": record.size_bytes,
        "sha256": record.sha256,
        "patient_id": record.patient_id,
        "view": record.view,
        "source": record.source,
        "height": record.height,
        "width": record.width,
        "split": split,
    }


def content_fingerprint(records) -> str:
    """SHA-256 over the sorted content hashes: equal exactly when the image contents are equal."""
    return hashlib.sha256("\n".join(sorted(r.sha256 for r in records)).encode()).hexdigest()


def drop_duplicates(records: list[ImageRecord], report_path) -> tuple[list[ImageRecord], dict]:
    """The records without the images a `cxr.privacy.dedup` report lists to drop (matched by SHA-256 content hash,
    so the report may come from another folder or file list), and what to record in the manifest. Prints how many
    it excluded, warns when the report matches none of them, and refuses to drop every image."""
    report_path = Path(report_path)
    flag = f"--exclude_duplicates {report_path}"
    try:
        report = json.loads(report_path.read_text())
        drop = {entry["sha256"]: entry for entry in report["drop"]}
    except FileNotFoundError:
        raise DatasetError(
            f"--exclude_duplicates: {report_path} does not exist; run `python -m cxr.dedup --out DIR` "
            "and pass DIR/report.json"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"--exclude_duplicates: {report_path} is not a cxr.privacy.dedup report.json ({error})"
        ) from None
    kept = [r for r in records if r.sha256 not in drop]
    removed = [
        {"relpath": r.relpath, "sha256": r.sha256, "duplicate_of": drop[r.sha256].get("duplicate_of")}
        for r in records
        if r.sha256 in drop
    ]
    if records and not kept:
        raise DatasetError(
            f"{flag}: it drops all {len(records)} images of this run (it lists every one to drop), so none is left "
            "to train on; check that the report was made from these images, or train without --exclude_duplicates"
        )
    print(f"[cxr] {flag}: excluded {len(removed)} of {len(records)} images", file=sys.stderr)
    if drop and not removed:
        warnings.warn(
            f"{flag}: none of the {len(drop)} images it lists to drop is among the {len(records)} images of this "
            "run (matched by content hash); the report was made from other data, so no duplicate was excluded",
            stacklevel=2,
        )
    return kept, {"report": str(report_path), "report_sha256": file_sha256(report_path), "dropped": removed}


def write_manifest(
    path, train, val, extra: dict | None = None, dropped: list[dict] | None = None, deduplicated: dict | None = None
) -> str:
    """Write the run's manifest (JSON, written atomically); return the SHA-256 hex of the file.

    Holds every image's relpath, size, content hash, patient id and split, the counts (images and
    patients), the dataset folder, a content fingerprint per split, and `extra` (e.g. the config).
    `dropped` (only written when non-empty): images of the split that a resumed run no longer uses
    (`relpath`, `sha256`, `split`, `reason`), see `check_unchanged`. `deduplicated` (only with
    --exclude_duplicates): the cxr.privacy.dedup report used, its hash, and the images it removed (see
    `drop_duplicates`).
    """
    train, val = list(train), list(val)
    train_ids = {r.patient_id for r in train if r.patient_id is not None}
    val_ids = {r.patient_id for r in val if r.patient_id is not None}
    if train_ids & val_ids:
        raise DatasetError(f"patients on both sides of the split: {sorted(train_ids & val_ids)[:10]}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset_dir": _dataset_root(train + val),
        "split_by": "patient" if (train_ids or val_ids) else "image",
        "counts": {
            "train_images": len(train),
            "val_images": len(val),
            "total_images": len(train) + len(val),
            "train_patients": _patients(train),
            "val_patients": _patients(val),
            "total_patients": _patients(train + val),
        },
        "train_sha256": content_fingerprint(train),
        "val_sha256": content_fingerprint(val),
        "train": [_entry(r, "train") for r in train],
        "val": [_entry(r, "val") for r in val],
        "extra": extra or {},
    }
    if dropped:
        manifest["dropped"] = list(dropped)
    if deduplicated:
        manifest["deduplicated"] = deduplicated
    data = (json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n").encode()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(path) -> dict:
    """Read a manifest written by `write_manifest` (DatasetError when missing, not a cxr manifest, or a field has
    the wrong type: the message names the field)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"manifest {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"manifest {path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{path} is not a cxr manifest (expected format {MANIFEST_FORMAT!r})")
    problem = manifest_problem(manifest)
    if problem:
        raise DatasetError(
            f"manifest {path}: {problem}; the file was edited or damaged: use the manifest.json the training run wrote"
        )
    return manifest


def check_split(manifest_path, manifest: dict, recorded: str | None, checkpoint) -> None:
    """DatasetError unless `manifest` records the split that `checkpoint` was trained on: `recorded`, its
    `cxr.data.manifestcheck.split_sha256` (None: a checkpoint written before checkpoints recorded it)."""
    actual = manifest_split_sha256(manifest)
    if recorded is not None and recorded != actual:
        raise DatasetError(
            f"--resume_from_checkpoint {checkpoint}: the run's manifest {manifest_path} holds another train/held-out "
            f"split than the one this checkpoint was trained on (split sha256 {actual[:12]}..., the checkpoint "
            f"recorded {recorded[:12]}...): it was replaced or edited, and resuming would train on held-out images. "
            "Put the run's own manifest.json back, or start a new run in another --output_dir"
        )


def records_from_manifest(manifest: dict, split: str, dataset_dir=None) -> list[ImageRecord]:
    """The ImageRecords of one split ("train" or "val") of a manifest; relative paths are resolved against
    `dataset_dir` (default: the folder the manifest records)."""
    root = dataset_dir if dataset_dir is not None else manifest.get("dataset_dir")
    records = []
    for entry in manifest[split]:
        path = Path(entry["relpath"])
        if not path.is_absolute():
            if root is None:
                raise DatasetError(
                    "the manifest has relative paths and no dataset_dir; pass the training --dataset_dir"
                )
            path = Path(root) / path
        records.append(
            ImageRecord(
                path=path,
                relpath=entry["relpath"],
                size_bytes=entry["size_bytes"],
                sha256=entry["sha256"],
                patient_id=entry.get("patient_id"),
                view=entry.get("view"),
                source=entry.get("source"),
                height=entry.get("height"),
                width=entry.get("width"),
            )
        )
    return records


def _change_reason(record: ImageRecord) -> str | None:
    try:
        size = os.path.getsize(record.path)
        digest = file_sha256(record.path) if size == record.size_bytes else None
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if digest != record.sha256:
        return "changed (its content no longer matches the sha256 recorded in the manifest)"
    return None


def check_unchanged(records, num_workers: int = 0) -> list[tuple[ImageRecord, str]]:
    """(record, reason) for every record whose file is missing, unreadable, or whose bytes differ from the size
    and SHA-256 the manifest recorded; [] when all are as they were. Files are hashed in `num_workers` threads."""
    records = list(records)
    if num_workers > 1:
        with ThreadPoolExecutor(num_workers) as pool:  # hashlib releases the GIL on large buffers
            reasons = list(pool.map(_change_reason, records))
    else:
        reasons = [_change_reason(r) for r in records]
    return [(record, reason) for record, reason in zip(records, reasons) if reason is not None]

"""Finding and validating the training images.

`scan_dataset` finds the images (recursively under `--dataset_dir`, or listed in `--file_list`), opens and
decodes every one of them once (in worker processes, with a progress bar), and returns one `ImageRecord` per
usable image with its size and SHA-256 content hash. Bad files (missing, empty, not an image, truncated,
unsupported, smaller than `--min_image_size`) stop the run with a list of each file and its reason, or are
skipped with a summary under `--skip_bad_images`. Byte-identical copies are kept once (a copy on both sides
of the held-out split would leak it). Images are only ever read. Decoding one file and the bad-file messages
live in `cxr.data.imagecheck`.

The held-out split and the run's manifest, built from these records, live in `cxr.data.manifest`.

Seeded choices (the `--max_images` subset, the split) rank items by SHA-256(seed, name): a pure function of
the seed and the names, the same on every machine and library version, and stable when files are added
(an image's rank never depends on the other images).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cxr.data.imagecheck import LISTED_IN_ERRORS, bad_files_message, bad_files_summary, inspect_all
from cxr.data.imageio import DICOM_INSTALL_HINT, DICOM_SUFFIXES, SUPPORTED_SUFFIXES

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

    good, bad, duplicates = _check_candidates(candidates, target, min_image_size, skip_bad_images, num_workers)
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


def _check_candidates(candidates, target, min_image_size, skip_bad_images, num_workers):
    """Open candidates in order until `target` are usable (a bad or duplicate file is replaced by the next one);
    stop at the first bad batch unless `skip_bad_images`. Returns (good records, bad, duplicates)."""
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
    return good, bad, duplicates


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

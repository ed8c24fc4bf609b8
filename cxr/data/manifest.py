"""The run's record of its images: the ones --exclude_duplicates leaves out, the seeded held-out split, and the
manifest that records both.

`drop_duplicates` removes the images a `cxr.privacy.dedup` report lists to drop. `split_holdout` holds out a
validation set fixed by the seed (`cxr.data.dataset.selection_rank`), by patient when the file list gives
`patient_id`. `write_manifest` records both splits with content hashes, so a run says exactly what it trained on;
`read_manifest` and `records_from_manifest` read it back, `check_split` refuses a manifest of another split, and
`check_unchanged` finds images that changed on disk since (the field checks live in `cxr.data.manifestcheck`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cxr.data.dataset import DatasetError, ImageRecord, selection_rank
from cxr.data.manifestcheck import manifest_problem, manifest_split_sha256
from cxr.fileio import atomic_write_bytes, file_sha256

MANIFEST_FORMAT = "cxr-manifest/1"

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

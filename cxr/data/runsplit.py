"""The train/held-out split of a training run: drawn once, at the run's first start, and recorded in its
manifest; a resumed run reads it back from there and never re-draws it, so no image moves between the splits.

    split_for_run(cfg, resume_path, recorded_split) -> RunSplit   a fresh split, or the one of the first start
                                                   (a resume: refused when it is not the one its checkpoint recorded)
    write_run_manifest(cfg, split) -> sha256      OUTPUT_DIR/manifest.json, with every result flag
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from cxr.config import TrainConfig
from cxr.data import dataset
from cxr.data.dataset import DatasetError, ImageRecord
from cxr.data.manifest import (
    check_split,
    check_unchanged,
    drop_duplicates,
    read_manifest,
    records_from_manifest,
    split_holdout,
    write_manifest,
)
from cxr.flags import result_flags, to_dict
from cxr.runpaths import RunPaths
from cxr.runtime import TrainingError

LISTED_CHANGES = 50  # changed images named one by one in the message; the rest are counted


@dataclass
class RunSplit:
    train: list[ImageRecord]
    val: list[ImageRecord]
    dropped: list[dict] | None = None  # images of the first start's split a resumed run no longer uses
    deduplicated: dict | None = None  # what --exclude_duplicates removed (cxr.privacy.dedup)

    @property
    def image_count(self) -> int:
        return len(self.train) + len(self.val)


def split_for_run(cfg: TrainConfig, resume_path: Path | None = None, recorded_split: str | None = None) -> RunSplit:
    """A fresh run scans the dataset and splits it by --seed; a resumed run (`resume_path`, its checkpoint)
    takes the split recorded at its first start, once it is the one the checkpoint recorded (`recorded_split`)."""
    if resume_path is not None:
        return split_of_first_start(cfg, Path(resume_path), recorded_split)
    records = dataset.scan_dataset(
        cfg.dataset_dir,
        cfg.file_list,
        min_image_size=cfg.min_image_size,
        skip_bad_images=cfg.skip_bad_images,
        max_images=cfg.max_images,
        seed=cfg.seed,
        num_workers=cfg.resolved_num_workers,
    )
    deduplicated = None
    if cfg.exclude_duplicates is not None:
        records, deduplicated = drop_duplicates(records, cfg.exclude_duplicates)
    train, val = split_holdout(records, val_fraction=cfg.val_fraction, val_count=cfg.val_count, seed=cfg.seed)
    return RunSplit(train, val, deduplicated=deduplicated)


def write_run_manifest(cfg: TrainConfig, split: RunSplit) -> str:
    """Write the run's manifest (both splits, every result flag under `extra`); returns its sha256."""
    extra = {name: value for name, value in to_dict(cfg).items() if name in result_flags(TrainConfig)}
    return write_manifest(cfg.run_paths.manifest, split.train, split.val, extra, split.dropped, split.deduplicated)


def split_of_first_start(cfg: TrainConfig, resume_path: Path, recorded_split: str | None = None) -> RunSplit:
    """The split recorded in the manifest of the run the checkpoint `resume_path` belongs to; DatasetError when it
    is not the one the checkpoint recorded (`recorded_split`, `cxr.data.manifest.check_split`). Images missing or
    changed since are an error naming them, or with --skip_bad_images left out of both splits with a warning
    (listed under `dropped`)."""
    manifest_path = RunPaths.of_checkpoint(resume_path).manifest
    if not manifest_path.is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {resume_path}: the run's manifest {manifest_path} is missing; it records the "
            "train/held-out split fixed at the run's first start, which a resumed run keeps. Restore it, or start a "
            "new run (without --resume_from_checkpoint) in another --output_dir"
        )
    manifest = read_manifest(manifest_path)
    check_split(manifest_path, manifest, recorded_split, resume_path)
    splits = {name: records_from_manifest(manifest, name, dataset_dir=cfg.dataset_dir) for name in ("train", "val")}
    changed = [
        (name, record, reason)
        for name in splits
        for record, reason in check_unchanged(splits[name], cfg.resolved_num_workers)
    ]
    dropped = list(manifest.get("dropped", []))
    if changed:
        splits = _without_changed(cfg, manifest_path, splits, changed)
        dropped += [
            {"relpath": record.relpath, "sha256": record.sha256, "split": name, "reason": reason}
            for name, record, reason in changed
        ]
    print(
        f"[cxr] resuming with the split of the first start ({manifest_path}): {len(splits['train'])} training, "
        f"{len(splits['val'])} held-out images",
        file=sys.stderr,
    )
    return RunSplit(splits["train"], splits["val"], dropped, manifest.get("deduplicated"))


def _without_changed(cfg: TrainConfig, manifest_path: Path, splits: dict, changed: list) -> dict:
    """The splits without the `changed` images (with --skip_bad_images, and a warning); else DatasetError."""
    listed = "\n".join(
        f"  {record.relpath} ({'held-out' if name == 'val' else 'training'} image): {reason}"
        for name, record, reason in changed[:LISTED_CHANGES]
    )
    if len(changed) > LISTED_CHANGES:
        listed += f"\n  ... and {len(changed) - LISTED_CHANGES} more"
    head = (
        f"--resume_from_checkpoint: {len(changed)} image(s) of the run's train/held-out split ({manifest_path}, "
        f"fixed at its first start) are missing or changed since:\n{listed}\n"
    )
    if not cfg.skip_bad_images:
        raise DatasetError(
            head + "Restore them (the manifest records each file's size and sha256), or pass "
            "--skip_bad_images to continue without them (they are left out of both splits, never "
            "moved from one to the other), or start a new run in another --output_dir"
        )
    warnings.warn(
        head + "--skip_bad_images: continuing without them (left out of both splits and listed under "
        "`dropped` in manifest.json); the data order differs from the original run from here on",
        stacklevel=3,
    )
    gone = {(name, record.relpath) for name, record, _ in changed}
    splits = {name: [r for r in records if (name, r.relpath) not in gone] for name, records in splits.items()}
    if not splits["train"]:
        raise DatasetError(
            f"--resume_from_checkpoint: no training image of {manifest_path} is left; restore "
            "the images, or start a new run in another --output_dir"
        )
    return splits

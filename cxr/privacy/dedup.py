"""Training-set hygiene: exact and near-duplicate chest X-rays, found before training.

Duplicated training images are memorized far more often than unique ones (Carlini et al. 2023, "Extracting
Training Data from Diffusion Models"; Somepalli et al. 2023), and public chest X-ray sets hold both kinds:
the same film exported twice (byte-identical, or re-encoded), and near-identical follow-up studies.

1. Exact duplicates: byte-identical files (SHA-256 of the content), found by the same scan train.py runs.
   train.py already keeps only one of each; they are listed here too.
2. Near duplicates: every image against every other with the memorization audit's engine (`cxr.privacy.audit`):
   standardized `--resolution` px thumbnails, normalized cross-correlation, the max over shifts up to
   `--max_shift` thumbnail pixels, an exact top-k search chunked to `--memory_budget_mb`. A pair whose
   score is at least `--threshold` is a near duplicate. Pairs are joined into groups (connected
   components); the kept image of a group is the first by path, the others are listed to drop.
3. With `--train_manifest` (a run's manifest.json) both splits are searched, and pairs with one image on
   each side of the held-out split are reported apart: such a pair makes the audit's calibration too lenient
   (a held-out image that is really a training image scores like a copy).

Outputs in `--out`: `report.json` (groups, pairs, what to drop, cross-split pairs, the best-score
distribution), `pairs.csv`, `gallery.png` (the closest pairs side by side) and, with `--write_file_list`,
a CSV of the kept images that train.py reads with `--file_list`.

    python -m cxr.dedup --dataset_dir data/train --out dedup --write_file_list dedup/keep.csv
    python -m cxr.dedup --train_manifest cxr-lora/manifest.json --train_dir data --out dedup
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.config import check_choices, flag, parse_config, require, to_dict
from cxr.fileio import check_writable, check_writable_file, staged_files

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


@dataclass
class DedupConfig:
    """Find exact and near-duplicate images in a training set (and across a run's held-out split)."""

    dataset_dir: Path | None = flag(None, "folder of training images (searched recursively, as train.py does)")
    file_list: Path | None = flag(
        None, "CSV/TXT list of images (as train.py --file_list); paths relative to --dataset_dir"
    )
    train_manifest: Path | None = flag(
        None, "a run's manifest.json: search both its splits and report pairs across the split"
    )
    train_dir: Path | None = flag(
        None, "with --train_manifest: the folder its relative paths start from (default: the one it records)"
    )
    out: Path = flag(Path("dedup"), "report folder: report.json, pairs.csv, gallery.png")
    threshold: float = flag(
        0.98,
        "a pair whose shift-tolerant NCC is at least this is a near duplicate (1 = identical thumbnails) "
        "(range: (-1, 1])",
    )
    resolution: int = flag(64, "side of the square thumbnails compared by NCC", bounds=(8, 1024))
    pad_to_square: bool = flag(
        False, "pad non-square images to square instead of center-cropping (use the training setting)"
    )
    intensity_clip_percent: float = flag(
        0.0,
        "read 16-bit/float images and DICOM without a VOI window with this train.py --intensity_clip_percent "
        "(range: [0, 50))",
    )
    max_shift: float = flag(
        0.5, "tolerate translations up to this many thumbnail pixels (0 disables)", bounds=(0.0, 256.0)
    )
    shift_step: float = flag(0.5, "step of the shift grid in thumbnail pixels", bounds=(0.01, 256.0))
    neighbours: int = flag(
        8,
        "nearest images examined per image (a group larger than this is still joined through its members)",
        bounds=(1, 1000),
    )
    gallery_pairs: int = flag(16, "closest pairs shown in gallery.png (0 disables)", bounds=(0, 1000))
    write_file_list: Path | None = flag(
        None, "write the kept images (one per group, none dropped otherwise) as a CSV for train.py --file_list"
    )
    fail_on_duplicates: bool = flag(False, "exit with code 1 when any duplicate (exact or near) is found")
    min_image_size: int = flag(64, "as train.py: images whose shorter side is below this are bad", bounds=(1, 65536))
    skip_bad_images: bool = flag(False, "as train.py: skip unreadable images instead of stopping")
    device: str = flag("auto", "cuda, cpu or auto (matrix products)")
    num_workers: int = flag(2, "worker processes that read and resize images", bounds=(0, 256))
    batch_size: int = flag(64, "images per reading batch", bounds=(1, 4096))
    memory_budget_mb: int = flag(
        512, "working memory of the search (sets the chunk sizes); the thumbnails come on top", bounds=(1, 10**7)
    )

    def validate(self) -> None:
        check_choices(self)
        require(
            self.dataset_dir is not None or self.file_list is not None or self.train_manifest is not None,
            "dataset_dir",
            "is required (or give --file_list or --train_manifest)",
        )
        require(-1.0 < self.threshold <= 1.0, "threshold", f"must be in (-1, 1] (an NCC), got {self.threshold}")
        require(
            0.0 <= self.intensity_clip_percent < 50.0,
            "intensity_clip_percent",
            f"must be in [0, 50), got {self.intensity_clip_percent}",
        )
        require(
            0 <= self.max_shift < self.resolution / 4,
            "max_shift",
            f"must be in [0, resolution/4), got {self.max_shift}",
        )
        require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


# --------------------------------------------------------------------------------------------- pure parts


def near_duplicate_pairs(scores, indices, shifts, threshold: float) -> dict[tuple[int, int], tuple[float, tuple]]:
    """{(i, j) with i < j: (best score, (dy, dx))} for every neighbour j of i (j != i) scoring >= threshold.

    `scores`/`indices`/`shifts` are `cxr.privacy.ncc.best_matches` of a set against itself; a pair found from both
    ends keeps its higher score (shifting i onto j and j onto i can differ by interpolation).
    """
    pairs: dict[tuple[int, int], tuple[float, tuple]] = {}
    for i, (row_scores, row_indices) in enumerate(zip(scores.tolist(), indices.tolist())):
        for column, (score, j) in enumerate(zip(row_scores, row_indices)):
            if j < 0 or j == i or not score >= threshold:
                continue
            key = (min(i, j), max(i, j))
            if key not in pairs or score > pairs[key][0]:
                pairs[key] = (float(score), tuple(float(v) for v in shifts[i, column].tolist()))
    return pairs


def connected_groups(count: int, pairs) -> list[list[int]]:
    """Groups (sorted lists, sorted by first member) of the items joined by `pairs`; singletons left out."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: g[0])


# --------------------------------------------------------------------------------------------- the run


def _records(cfg: DedupConfig):
    """(records, split of each record or None, byte-identical duplicates [(relpath, kept relpath)])."""
    from cxr.data.dataset import read_manifest, records_from_manifest, scan_dataset_report

    if cfg.train_manifest is not None:
        manifest = read_manifest(cfg.train_manifest)
        records, splits = [], []
        for split in ("train", "val"):
            part = records_from_manifest(manifest, split, dataset_dir=cfg.train_dir)
            records += part
            splits += [split] * len(part)
        missing = [str(r.path) for r in records if not r.path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"--train_manifest {cfg.train_manifest}: {len(missing)} listed images are missing "
                f"(first: {missing[0]}); pass --train_dir, the folder the relative paths start from"
            )
        return records, splits, []
    scan = scan_dataset_report(
        cfg.dataset_dir,
        cfg.file_list,
        min_image_size=cfg.min_image_size,
        skip_bad_images=cfg.skip_bad_images,
        num_workers=cfg.num_workers,
    )
    return scan.records, [None] * len(scan.records), list(scan.duplicates)


def find_duplicates(cfg: DedupConfig) -> dict:
    """Run the search and write report.json, pairs.csv, gallery.png (and the kept file list) to `cfg.out`."""
    from cxr.data.imageio import Preprocess
    from cxr.model.loading import pick_device
    from cxr.privacy.imagesets import load_thumbnails

    started = time.time()
    # Before any image is read: a bad path fails at once, not after the search.
    check_writable(Path(cfg.out), "--out", create=False)
    if cfg.write_file_list is not None:
        check_writable_file(cfg.write_file_list, "--write_file_list")
    device = pick_device(cfg.device)
    records, splits, exact = _records(cfg)
    if len(records) < 2:
        raise FileNotFoundError(f"found {len(records)} usable image(s): nothing to compare")
    preprocess = Preprocess(cfg.resolution, cfg.pad_to_square, cfg.intensity_clip_percent)
    thumbs = load_thumbnails(
        [r.path for r in records],
        preprocess,
        num_workers=cfg.num_workers,
        batch_size=cfg.batch_size,
        desc="reading images",
    )
    read_seconds = time.time() - started
    scores, indices, shifts = _self_matches(cfg, thumbs, device)
    del thumbs
    search_seconds = time.time() - started - read_seconds
    pairs = near_duplicate_pairs(scores, indices, shifts, cfg.threshold)
    groups = connected_groups(len(records), pairs)
    rel = [r.relpath for r in records]
    pair_rows = _pair_rows(pairs, records, splits)
    drop = _drop_list(groups, records)
    report = {
        "config": to_dict(cfg),
        "counts": {
            "images": len(records),
            "exact_duplicates": len(exact),
            "near_pairs": len(pair_rows),
            "groups": len(groups),
            "drop": len(drop),
            "cross_split_pairs": sum(row["cross_split"] for row in pair_rows),
        },
        "statistic": f"best NCC of {cfg.resolution}x{cfg.resolution} standardized thumbnails, max over shifts up to "
        f"{cfg.max_shift} px in steps of {cfg.shift_step} px; near duplicate when >= {cfg.threshold}",
        "exact_duplicates": [{"file": a, "same_bytes_as": b} for a, b in exact],
        "groups": [{"keep": rel[g[0]], "drop": [rel[m] for m in g[1:]]} for g in groups],
        "drop": drop,
        "pairs": pair_rows,
        "cross_split_pairs": [row for row in pair_rows if row["cross_split"]],
        "best_other": _best_other(scores, indices),
        "seconds": {
            "total": round(time.time() - started, 2),
            "scan_and_read": round(read_seconds, 2),
            "search": round(search_seconds, 2),
        },
    }
    with staged_files("--out") as files:
        _write_outputs(cfg, files, report, records, preprocess)
    return report


def _self_matches(cfg: DedupConfig, thumbs, device):
    """(scores, indices, shifts): the `--neighbours` best matches of every image among all of them, itself included
    (k + 1: the image itself is its own best match, NCC 1 at shift 0)."""
    from cxr.privacy.ncc import best_matches, standardize

    return best_matches(
        thumbs,
        standardize(thumbs),
        k=min(cfg.neighbours + 1, len(thumbs)),
        max_shift=cfg.max_shift,
        shift_step=cfg.shift_step,
        memory_budget_mb=cfg.memory_budget_mb,
        device=device,
        progress=True,
    )


def _best_other(scores, indices) -> dict:
    """The report's `best_other`: each image's best score with another image, as a histogram and quantiles."""
    import torch

    from cxr.privacy.audit_scores import score_histogram

    others = (indices != torch.arange(len(indices))[:, None]) & (indices >= 0)
    best_other = np.array([float(row[mask][0]) if mask.any() else -1.0 for row, mask in zip(scores, others)])
    return {
        "histogram": score_histogram(best_other, low=-1.0, high=1.0),
        "p50": float(np.median(best_other)),
        "p99": float(np.quantile(best_other, 0.99)),
        "max": float(best_other.max()),
    }


def _pair_rows(pairs: dict, records, splits) -> list[dict]:
    """One pairs.csv row per near-duplicate pair, the highest score first, with the split and patient of each side."""
    rows = []
    for (i, j), (score, (dy, dx)) in sorted(pairs.items(), key=lambda item: -item[1][0]):
        rows.append(
            {
                "a": records[i].relpath,
                "b": records[j].relpath,
                "ncc": score,
                "shift_y": dy,
                "shift_x": dx,
                "split_a": splits[i],
                "split_b": splits[j],
                "patient_a": records[i].patient_id,
                "patient_b": records[j].patient_id,
                "cross_split": splits[i] is not None and splits[i] != splits[j],
            }
        )
    return rows


def _drop_list(groups: list[list[int]], records) -> list[dict]:
    """Every member of a group but its first (the kept image), sorted by path, with its content hash: the hash
    identifies a dropped image whatever folder or file list it is later read from."""
    keep_of = {member: group[0] for group in groups for member in group}
    return sorted(
        (
            {"relpath": records[m].relpath, "sha256": records[m].sha256, "duplicate_of": records[keep_of[m]].relpath}
            for m in keep_of
            if keep_of[m] != m
        ),
        key=lambda d: d["relpath"],
    )


PAIR_COLUMNS = ("a", "b", "ncc", "shift_y", "shift_x", "split_a", "split_b", "patient_a", "patient_b", "cross_split")


def _write_outputs(cfg: DedupConfig, files, report: dict, records, preprocess) -> None:
    """pairs.csv, gallery.png, the kept file list and report.json, staged (`cxr.fileio.staged_files`): they appear
    together or not at all. File names that are not valid UTF-8 are written as their own bytes (surrogateescape),
    which is how train.py reads --file_list back."""
    from cxr.privacy.imagesets import draw_gallery

    out, pair_rows = Path(cfg.out), report["pairs"]
    with open(files.path(out / "pairs.csv"), "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(PAIR_COLUMNS))
        writer.writeheader()
        writer.writerows(pair_rows)
    closest = pair_rows[: cfg.gallery_pairs]
    if closest:
        by_rel = {r.relpath: r.path for r in records}
        rows = [
            {"sample": str(by_rel[row["a"]]), "best_match": str(by_rel[row["b"]]), "ncc": row["ncc"], "flagged": True}
            for row in closest
        ]
        draw_gallery(rows, files.path(out / "gallery.png"), preprocess)
    if cfg.write_file_list is not None:
        dropped = {d["relpath"] for d in report["drop"]}
        write_kept_list(files.path(cfg.write_file_list), [r for r in records if r.relpath not in dropped])
    files.write_bytes(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())


def write_kept_list(path, records) -> None:
    """A train.py --file_list CSV: absolute paths, plus the patient id (when every image has one: train.py
    then splits by patient), view and source."""
    path = Path(path)
    columns = ["path"] + (["patient_id"] if all(r.patient_id for r in records) else []) + ["view", "source"]
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            values = {
                "path": str(Path(record.path).resolve()),
                "patient_id": record.patient_id,
                "view": record.view or "",
                "source": record.source or "",
            }
            writer.writerow([values[c] for c in columns])


def format_summary(report: dict) -> str:
    counts = report["counts"]
    lines = [
        f"searched {counts['images']} images: {counts['exact_duplicates']} byte-identical copies (train.py keeps one), "
        f"{counts['near_pairs']} near-duplicate pairs in {counts['groups']} groups; {counts['drop']} images to drop",
        f"statistic: {report['statistic']}",
        f"best match with another image: median {report['best_other']['p50']:.4f}, p99 "
        f"{report['best_other']['p99']:.4f}",
    ]
    if counts["cross_split_pairs"]:
        lines.append(
            f"WARNING: {counts['cross_split_pairs']} near-duplicate pairs straddle the held-out split: the "
            "audit's calibration is too lenient; drop them and retrain, or audit with another held-out set"
        )
    lines.append(f"report: {Path(report['config']['out']) / 'report.json'}, pairs.csv, gallery.png")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DedupConfig, argv, prog="python -m cxr.dedup")
    try:
        report = find_duplicates(cfg)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(report))
    found = report["counts"]["exact_duplicates"] + report["counts"]["near_pairs"]
    return EXIT_FOUND if cfg.fail_on_duplicates and found else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Memorization audit: which generated X-rays are near-copies of training X-rays?

A near-copy of a chest X-ray can re-identify the patient, so every generated image is compared with
every training image:

1. Each image is center-cropped (or padded) to a square by the same function as in training
   (`cxr.data.preprocess.crop_or_pad_square`), resized with an antialiased bilinear filter (training resizes with
   Lanczos) to `--resolution` pixels (64 by default) and standardized (zero mean, unit norm).
2. The normalized cross-correlation (NCC) of two images is then the dot product of their vectors. An
   exact top-k search runs as chunked matrix products (float32, CPU or CUDA) whose chunk sizes come from
   `--memory_budget_mb`: no N_samples x N_train matrix is ever held.
3. Translations: the generated image is also compared after moving it by every offset of a grid of up
   to `--max_shift` thumbnail pixels in `--shift_step` steps (default +-0.5 px at 64 = +-2 px at 256;
   half pixels by bilinear interpolation) and its score is the max over the grid, so a copy moved by a
   few pixels still scores like a copy. (At 64 px a 2-px shift alone drops the NCC of an exact copy of
   a phantom from 1.0 to ~0.976, as low as unrelated phantoms.) Optionally SSIM is computed on the
   top-k candidates at `--ssim_resolution`. Training and held-out images are read with the training run's
   `--intensity_clip_percent` (from the manifest, or the flag), so they look as they did to the model;
   generated images are read as they are.
4. Calibration: the same statistic (best match among the training images) is computed for held-out real
   images that the model never saw. The threshold is the `--threshold_quantile` quantile (0.99) of that
   baseline: a novel image from the real distribution exceeds it with probability ~1%. `--threshold` sets
   it by hand; without held-out images `--default_threshold` (0.95) is used with a warning. Fewer held-out
   images than the quantile needs (`required_holdout_images`: 100 for 0.99) give a loud warning, and with
   `--fail_above` an error unless `--threshold` is given; an empty `--holdout_dir` is an error.
5. A generated image is flagged as a likely copy when its best score is above the threshold.

Commands:

    python -m cxr.audit --train_dir data/train --samples_dir samples --holdout_dir data/val --out audit
    python -m cxr.audit --train_manifest cxr-lora/manifest.json --train_dir data --samples_dir samples \
        --out audit --fail_above 0.02

Exit codes: 0 done; 1 the flagged rate is above `--fail_above`; 2 bad flags or unreadable inputs.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxr.config import TrainConfig
from cxr.data.manifest import read_manifest, records_from_manifest
from cxr.data.preprocess import Preprocess, thumbnail
from cxr.fileio import check_writable, staged_files
from cxr.flags import check_choices, flag, parse_config, recorded_values, require, to_dict
from cxr.model.loading import pick_device
from cxr.privacy.embedding import embedding_search
from cxr.privacy.evaluate import FEATURES_TRUST
from cxr.privacy.imagemetrics import ssim
from cxr.privacy.imagesets import byte_identical, draw_gallery, list_images, load_thumbnails
from cxr.privacy.ncc import best_matches, calibrate_threshold, standardize_in_place

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE = 0, 1, 2
# Held-out images needed before a calibrated threshold is trusted. A new real image exceeds the k-th largest of n
# held-out scores with probability k / (n + 1) (order statistics of exchangeable scores), so n images resolve
# false-flag rates only down to about 1 / (n + 1). For the threshold to be the q-quantile, and not merely "about
# the largest held-out score", n must be at least 1 / (1 - q): 100 at the default q = 0.99, where it lies between
# the two largest scores (a rate of 1-2 %); with 48 images that "0.99 quantile" lets 2-4 % through, with 1 image
# 50 %. And never fewer than 100, whatever q: the rate the threshold lets through has a sampling error of about
# sqrt(q (1 - q) / n), which 100 images keep to a third of the rate or less for q <= 0.9 (0.03 of 0.1).
MIN_HOLDOUT_IMAGES = 100
# A threshold at or above this flags nothing: an NCC or a cosine is at most 1 (float32 rounding gives ~1e-7 either way).
SCORE_CEILING = 1.0 - 1e-6


class CalibrationError(ValueError):
    """The threshold cannot be calibrated as asked (no or too few held-out images for a --fail_above gate)."""


@dataclass
class AuditConfig:
    """Memorization audit: flag generated images that are near-copies of training images."""

    train_dir: Path | None = flag(
        None,
        "folder of training images (searched recursively); with --train_manifest, the folder its relative paths start "
        "from",
    )
    train_manifest: Path | None = flag(
        None,
        "OUTPUT_DIR/manifest.json of a training run: its train split is the reference set and its val split the "
        "held-out baseline",
    )
    samples_dir: Path | None = flag(None, "folder of generated images to audit (searched recursively)")
    holdout_dir: Path | None = flag(
        None,
        "folder of held-out real images (never trained on) that calibrate the threshold; overrides the manifest's val "
        "split",
    )
    out: Path = flag(Path("audit"), "report folder: report.json, scores.csv, gallery.png")
    exclude: str = flag(
        "contact_sheet*", "comma-separated file-name patterns to skip in every folder (sample.py's contact sheet)"
    )
    resolution: int = flag(64, "side of the square thumbnails compared by NCC", bounds=(8, 1024))
    pad_to_square: bool = flag(
        False, "pad non-square images to square instead of center-cropping (use the training setting)"
    )
    intensity_clip_percent: float | None = flag(
        None,
        "read the training and held-out images (not the samples) with this train.py --intensity_clip_percent "
        "(percentile window for 16-bit/float images and DICOM without a VOI window); default: the value in "
        "--train_manifest, else 0 (min-max) (range: [0, 50))",
    )
    top_k: int = flag(
        5, "nearest training images kept per image (the best is reported; --ssim scores all of them)", bounds=(1, 1000)
    )
    max_shift: float = flag(
        0.5,
        "tolerate translations up to this many thumbnail pixels (0.5 px at 64 = 2 px at 256; 0 disables; cost grows "
        "with the number of shifts)",
        bounds=(0.0, 256.0),
    )
    shift_step: float = flag(
        0.5, "step of the shift grid in thumbnail pixels (fractional shifts are bilinear)", bounds=(0.01, 256.0)
    )
    ssim: bool = flag(
        False, "also compute SSIM with the top-k candidates at --ssim_resolution (informative; flagging uses NCC)"
    )
    ssim_resolution: int = flag(256, "image side for SSIM", bounds=(16, 4096))
    threshold: float | None = flag(
        None, "flag images whose best NCC is above this value (default: calibrated on held-out images) (range: [-1, 1))"
    )
    threshold_quantile: float = flag(
        0.99,
        "calibrated threshold = this quantile of the held-out images' best NCC with the training set (range: (0, 1])",
    )
    default_threshold: float = flag(
        0.95, "threshold used when there are no held-out images and no --threshold (uncalibrated) (range: [-1, 1))"
    )
    min_holdout_images: int | None = flag(
        None,
        "held-out images a calibrated threshold needs; fewer: a loud warning, and with --fail_above an error unless "
        "--threshold is given (default: 1 / (1 - --threshold_quantile), at least 100; lower it only knowingly)",
        bounds=(1, 10**9),
    )
    fail_above: float | None = flag(
        None, "exit with code 1 when the flagged fraction of samples is above this rate (e.g. 0.01)", bounds=(0.0, 1.0)
    )
    gallery_pairs: int = flag(16, "closest sample/training pairs shown in gallery.png (0 disables)", bounds=(0, 1000))
    device: str = flag("auto", "cuda, cpu or auto (matrix products)")
    num_workers: int = flag(2, "worker processes that read and resize images", bounds=(0, 256))
    batch_size: int = flag(64, "images per reading batch", bounds=(1, 4096))
    memory_budget_mb: int = flag(
        512,
        "working memory of the search (similarity blocks and shifted copies of the queries); sets the chunk sizes. "
        "The thumbnails come on top: N x resolution^2 x 4 bytes per set",
        bounds=(1, 10**7),
    )
    features: Path | None = flag(
        None,
        "also audit in the embedding space of this local feature network, as cxr.privacy.evaluate --features takes "
        "it (a TorchScript file mapping (N, 3, H, W) images in [0, 1] to (N, D), or torchvision Inception-v3 "
        "weights): the same top-k search and held-out calibration by cosine similarity, reported beside NCC; a "
        f"sample is flagged when either statistic is above its threshold. {FEATURES_TRUST}",
    )
    features_image_size: int = flag(
        224, "with --features: images are resized to this square size for the network", bounds=(8, 4096)
    )
    features_threshold: float | None = flag(
        None,
        "with --features: flag samples whose best cosine is above this value (default: calibrated on the held-out "
        "images like the NCC threshold) (range: [-1, 1))",
    )

    def validate(self) -> None:
        check_choices(self)
        require(
            self.train_dir is not None or self.train_manifest is not None,
            "train_dir",
            "is required (or give --train_manifest)",
        )
        require(self.samples_dir is not None, "samples_dir", "is required: the folder of generated images to audit")
        require(
            self.intensity_clip_percent is None or 0.0 <= self.intensity_clip_percent < 50.0,
            "intensity_clip_percent",
            f"must be in [0, 50), got {self.intensity_clip_percent}",
        )
        require(
            0 <= self.max_shift < self.resolution / 4,
            "max_shift",
            f"must be in [0, resolution/4), got {self.max_shift}",
        )
        for name in ("threshold", "default_threshold", "features_threshold"):
            value = getattr(self, name)
            require(value is None or value >= -1.0, name, f"must be in [-1, 1), got {value}")
            require(
                value is None or value < 1.0,
                name,
                f"must be below 1: an NCC or cosine is at most 1, so a threshold of {value} would flag nothing",
            )
        require(
            0.0 < self.threshold_quantile <= 1.0,
            "threshold_quantile",
            f"must be in (0, 1], got {self.threshold_quantile}",
        )
        require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


# ----------------------------------------------------------------------------------------------
# SSIM of the candidates


class _SSIMDataset:
    """Item i: SSIM of sample i with each of its candidate training images, at `real.resolution` pixels."""

    def __init__(self, sample_paths, train_paths, candidates, real: Preprocess):
        self.sample_paths, self.train_paths, self.candidates = sample_paths, train_paths, candidates
        self.real, self.generated = real, replace(real, intensity_clip_percent=0.0)

    def __len__(self):
        return len(self.sample_paths)

    def __getitem__(self, index):
        sample = thumbnail(self.generated.read(self.sample_paths[index]), self.generated)
        refs = torch.stack(
            [thumbnail(self.real.read(self.train_paths[j]), self.real) for j in self.candidates[index].tolist()]
        )
        return ssim(sample.expand_as(refs), refs)


def candidate_ssim(sample_paths, train_paths, candidates, real: Preprocess, *, num_workers=0):
    """float32 (Nq, k) SSIM of every sample with each of its candidates (rows of `candidates`) at
    `real.resolution`; the training images are read as `real` says, the samples without an intensity window."""
    dataset = _SSIMDataset(sample_paths, train_paths, candidates, real)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    rows = [row for row in tqdm(loader, total=len(dataset), desc="SSIM", unit="img", disable=None)]
    return torch.stack(rows) if rows else torch.empty((0, candidates.shape[1]))


# ----------------------------------------------------------------------------------------------
# Calibration, summaries, report


def required_holdout_images(quantile: float) -> int:
    """Held-out images the `quantile` threshold needs: 1 / (1 - quantile), at least MIN_HOLDOUT_IMAGES (see there)."""
    if quantile >= 1.0:
        return MIN_HOLDOUT_IMAGES
    return max(MIN_HOLDOUT_IMAGES, math.ceil(round(1.0 / (1.0 - quantile), 6)))


def check_calibration(config: AuditConfig, holdout_count: int) -> dict:
    """How many held-out images set the threshold and whether that is enough (the report's `calibration`).

    Too few without --threshold: a loud warning, or with --fail_above a CalibrationError (a release gate must not
    rest on a threshold that is not the quantile it claims to be).
    """
    needed = config.min_holdout_images or required_holdout_images(config.threshold_quantile)
    calibration = {
        "holdout_images": holdout_count,
        "min_holdout_images": needed,
        "sufficient": holdout_count >= needed,
        "quantile": config.threshold_quantile,
    }
    if calibration["sufficient"] or config.threshold is not None:
        return calibration
    fix = (
        f"give a --holdout_dir with at least {needed} real images the model never trained on (or a "
        f"--train_manifest whose val split has that many: train.py --val_count {needed}), or set --threshold"
    )
    if config.fail_above is not None:
        raise CalibrationError(
            f"--fail_above: the threshold would rest on {holdout_count} held-out images, fewer than the {needed} that "
            f"quantile {config.threshold_quantile} needs, so the gate would not mean what it says; {fix}"
        )
    if holdout_count:
        # The threshold sits at position q (n - 1) of the n sorted scores; a new real image exceeds the j-th smallest
        # (0-based) with probability (n - j) / (n + 1) (exchangeable scores), interpolated here.
        passed = (holdout_count - config.threshold_quantile * (holdout_count - 1)) / (holdout_count + 1)
        warnings.warn(
            f"only {holdout_count} held-out images calibrate the threshold; quantile {config.threshold_quantile} needs "
            f"at least {needed}. With {holdout_count} the threshold lets about {passed:.0%} of novel real images "
            f"through, not {1 - config.threshold_quantile:.0%}; {fix}",
            stacklevel=3,
        )
    return calibration


def score_summary(scores) -> dict:
    """count, mean, min, max and percentiles of a score vector (JSON-ready)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return {"count": 0}
    percentiles = {f"p{p}": float(np.percentile(scores, p)) for p in (1, 5, 25, 50, 75, 95, 99)}
    return {
        "count": int(scores.size),
        "mean": float(scores.mean()),
        "min": float(scores.min()),
        **percentiles,
        "max": float(scores.max()),
    }


def score_histogram(scores, bins: int = 40, low: float = 0.0, high: float = 1.0) -> dict:
    """Histogram of scores on [low, high] (values below `low` are counted in `below`)."""
    scores = np.asarray(scores, dtype=np.float64)
    counts, edges = np.histogram(np.clip(scores, low, high), bins=bins, range=(low, high))
    counts[0] -= int((scores < low).sum())
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "below": int((scores < low).sum())}


def _split_paths(manifest: dict, train_dir=None) -> tuple[list[Path], list[Path]]:
    train, val = (records_from_manifest(manifest, split, dataset_dir=train_dir) for split in ("train", "val"))
    return [record.path for record in train], [record.path for record in val]


def _resolve_sets(config: AuditConfig) -> tuple[list[Path], list[Path], list[Path], float]:
    """(train, samples, held-out) paths and the intensity clip percent to read the real images with."""
    clip_percent = config.intensity_clip_percent
    if config.train_manifest is not None:
        manifest = read_manifest(config.train_manifest)
        train_paths, holdout_paths = _split_paths(manifest, config.train_dir)
        # The training run's pixel settings; a manifest from before a flag existed means its default then.
        trained = recorded_values(TrainConfig, manifest.get("extra", {}), ("intensity_clip_percent", "pad_to_square"))
        if clip_percent is None:
            clip_percent = float(trained["intensity_clip_percent"])
        trained_padded = trained["pad_to_square"]
        if bool(trained_padded) != config.pad_to_square:
            warnings.warn(
                f"--pad_to_square: the training run {'padded' if trained_padded else 'center-cropped'} its "
                f"images but this audit {'pads' if config.pad_to_square else 'crops'} them, so copies can be "
                f"missed; pass {'--pad_to_square' if trained_padded else 'no --pad_to_square'} to match "
                f"{config.train_manifest}",
                stacklevel=2,
            )
    else:
        train_paths, holdout_paths = list_images(config.train_dir, config.exclude), []
    if config.holdout_dir is not None:
        if not Path(config.holdout_dir).is_dir():
            raise FileNotFoundError(f"--holdout_dir {config.holdout_dir}: folder does not exist")
        holdout_paths = list_images(config.holdout_dir, config.exclude)
        if not holdout_paths:  # a mistyped or empty folder must not fall back to an uncalibrated threshold
            raise FileNotFoundError(
                f"--holdout_dir {config.holdout_dir}: no images found; give the folder of "
                "held-out real images, or leave the flag out to use --train_manifest's val split"
            )
    sample_paths = list_images(config.samples_dir, config.exclude)
    if not train_paths:
        raise FileNotFoundError(f"--train_dir {config.train_dir}: no images found")
    if not sample_paths:
        raise FileNotFoundError(f"--samples_dir {config.samples_dir}: no images found")
    return train_paths, sample_paths, holdout_paths, clip_percent or 0.0


def audit(config: AuditConfig) -> dict:
    """Run the audit and write report.json, scores.csv and gallery.png to `config.out`.

    Returns the report dict (also in report.json); `report["exit_code"]` is 1 when `--fail_above` is
    exceeded, else 0.
    """
    started = time.time()
    check_writable(config.out, "--out", create=False)  # before any image is read, not after the search
    if config.features is not None and not Path(config.features).is_file():
        raise FileNotFoundError(
            f"--features {config.features}: file does not exist (a local feature network; nothing is downloaded)"
        )
    device = pick_device(config.device)
    train_paths, sample_paths, holdout_paths, clip_percent = _resolve_sets(config)
    holdout_paths, training_copies = _drop_training_copies(config, train_paths, holdout_paths)
    calibration = check_calibration(config, len(holdout_paths))  # before the work: may refuse a --fail_above gate
    real = Preprocess(
        config.resolution, config.pad_to_square, clip_percent
    )  # training and held-out images, as the model saw them
    generated = replace(real, intensity_clip_percent=0.0)  # samples, as they were written
    read = dict(num_workers=config.num_workers, batch_size=config.batch_size)
    train_features = standardize_in_place(load_thumbnails(train_paths, real, desc="training images", **read))
    search = dict(
        k=config.top_k,
        max_shift=config.max_shift,
        shift_step=config.shift_step,
        memory_budget_mb=config.memory_budget_mb,
        device=device,
        progress=True,
    )
    holdout_best = _holdout_baseline(holdout_paths, train_features, real, read, search)
    threshold, rule = _threshold(config, holdout_best)

    sample_thumbs = load_thumbnails(sample_paths, generated, desc="samples", **read)
    scores, indices, shifts = best_matches(sample_thumbs, train_features, **search)
    del sample_thumbs, train_features
    ssim_scores = None
    if config.ssim:
        ssim_scores = candidate_ssim(
            sample_paths,
            train_paths,
            indices,
            replace(real, resolution=config.ssim_resolution),
            num_workers=config.num_workers,
        )
    best = scores[:, 0].numpy().astype(np.float64)
    flagged = best > threshold
    rows = _score_rows(sample_paths, train_paths, best, flagged, indices, shifts, ssim_scores)
    embedding = None
    if config.features is not None:
        embedding = _embedding_audit(config, train_paths, holdout_paths, sample_paths, real, device, rows)
    flagged_any = np.array([row["flagged"] or row.get("embedding_flagged", False) for row in rows], dtype=bool)
    with staged_files("--out") as files:  # scores.csv, gallery.png and report.json appear together or not at all
        closest = _write_tables(config, files, rows, real)
        # --fail_above gates on the samples flagged by either statistic (NCC, and the embedding with --features).
        gate_rate = float(flagged_any.mean())
        exit_code = EXIT_FLAGGED if config.fail_above is not None and gate_rate > config.fail_above else EXIT_OK
        report = {
            "config": to_dict(config),
            "counts": {
                "train": len(train_paths),
                "samples": len(sample_paths),
                "holdout": int(holdout_best.size),
                "holdout_training_copies": training_copies,
            },
            "intensity_clip_percent": clip_percent,
            "statistic": f"best NCC with a training image of {config.resolution}x{config.resolution} "
            "standardized thumbnails, "
            f"max over shifts up to {config.max_shift} px in steps of {config.shift_step} px",
            "threshold": {
                "value": float(threshold),
                "rule": rule,
                "calibrated": config.threshold is None and holdout_best.size > 0,
            },
            "calibration": calibration,
            "flagged_any": {"count": int(flagged_any.sum()), "rate": gate_rate},
            "embedding": embedding,
            "flagged": {
                "count": int(flagged.sum()),
                "rate": float(flagged.mean()),
                "holdout_rate": float((holdout_best > threshold).mean()) if holdout_best.size else None,
            },
            "samples": {"summary": score_summary(best), "histogram": score_histogram(best)},
            "holdout": {"summary": score_summary(holdout_best), "histogram": score_histogram(holdout_best)},
            "closest_pairs": closest,
            "fail_above": config.fail_above,
            "exit_code": exit_code,
            "seconds": round(time.time() - started, 2),
        }
        files.write_bytes(Path(config.out) / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def _drop_training_copies(config: AuditConfig, train_paths, holdout_paths) -> tuple[list[Path], int]:
    """The held-out images without the byte-identical copies of training images, and how many those were. A copy
    scores NCC 1 and pushes the threshold to 1, where no sample can be flagged; all of them copies is an error."""
    copies = byte_identical(holdout_paths, train_paths)
    if not copies:
        return holdout_paths, 0
    example = f"{copies[0][0]} = {copies[0][1]}"
    if len(copies) == len(holdout_paths):
        source = f"--holdout_dir {config.holdout_dir}" if config.holdout_dir else "--train_manifest's val split"
        raise CalibrationError(
            f"{source}: all {len(copies)} held-out images are byte-identical copies of training images (e.g. "
            f"{example}), so they cannot calibrate a threshold; give real images the model never trained on (the "
            "training run's val split: --train_manifest OUTPUT_DIR/manifest.json)"
        )
    warnings.warn(
        f"{len(copies)} of the {len(holdout_paths)} held-out images are byte-identical copies of training images "
        f"(e.g. {example}); they are left out, and the other {len(holdout_paths) - len(copies)} calibrate the "
        "threshold",
        stacklevel=3,
    )
    dropped = {path for path, _ in copies}
    return [path for path in holdout_paths if Path(path) not in dropped], len(copies)


def check_ceiling(threshold: float, statistic: str, holdout_count: int) -> None:
    """CalibrationError when a calibrated threshold is at the score's ceiling of 1: nothing could be flagged."""
    if threshold >= SCORE_CEILING:
        raise CalibrationError(
            f"the calibrated threshold is {threshold:.4f}: the held-out images ({holdout_count}) match training "
            f"images perfectly ({statistic} 1), so no sample could be flagged. They hold copies of training images "
            "(re-encoded or renamed); give real images the model never trained on, or set the threshold by hand"
        )


def _holdout_baseline(holdout_paths, train_features, real: Preprocess, read: dict, search: dict) -> np.ndarray:
    """float64 (N_holdout,): each held-out image's best NCC with the training set (the calibration baseline)."""
    if not holdout_paths:
        return np.zeros(0)
    holdout_thumbs = load_thumbnails(holdout_paths, real, desc="held-out images", **read)
    holdout_best = best_matches(holdout_thumbs, train_features, **search)[0][:, 0].numpy().astype(np.float64)
    duplicates = int((holdout_best > 0.999).sum())
    if duplicates:
        warnings.warn(
            f"{duplicates} held-out images have a near-identical training image (NCC > 0.999): the "
            "held-out set overlaps the training set, which inflates the calibrated threshold. Use images "
            "the model was not trained on (the manifest's val split).",
            stacklevel=3,
        )
    return holdout_best


def _threshold(config: AuditConfig, holdout_best: np.ndarray) -> tuple[float, str]:
    """(threshold, the rule that set it): --threshold, else calibrated on the held-out images, else the default."""
    if config.threshold is not None:
        return config.threshold, "set by --threshold"
    if holdout_best.size:
        rule = (
            f"quantile {config.threshold_quantile} of {holdout_best.size} held-out images' "
            "best NCC with the training set"
        )
        threshold = calibrate_threshold(holdout_best, config.threshold_quantile)
        check_ceiling(threshold, "NCC", holdout_best.size)
        return threshold, rule
    threshold = config.default_threshold
    warnings.warn(
        f"no held-out images: using the uncalibrated threshold {threshold}. Pass --holdout_dir or "
        "--train_manifest (its val split) so the threshold reflects how similar real images are.",
        stacklevel=3,
    )
    return threshold, "uncalibrated --default_threshold (no held-out images)"


def _score_rows(sample_paths, train_paths, best, flagged, indices, shifts, ssim_scores) -> list[dict]:
    """One scores.csv row per sample: its best match, NCC, shift, SSIM (with --ssim) and verdict."""
    rows = []
    for i, path in enumerate(sample_paths):
        row = {
            "sample": str(path),
            "best_match": str(train_paths[int(indices[i, 0])]),
            "ncc": float(best[i]),
            "shift_y": float(shifts[i, 0, 0]),
            "shift_x": float(shifts[i, 0, 1]),
            "ssim": None,
            "ssim_match": None,
            "flagged": bool(flagged[i]),
        }
        if ssim_scores is not None:
            j = int(ssim_scores[i].argmax())
            row["ssim"], row["ssim_match"] = float(ssim_scores[i, j]), str(train_paths[int(indices[i, j])])
        rows.append(row)
    return rows


def _write_tables(config: AuditConfig, files, rows: list[dict], real: Preprocess) -> list[dict]:
    """Write scores.csv and gallery.png (the --gallery_pairs closest pairs) through `files` (staged); return those
    closest rows. File names that are not valid UTF-8 are written as their own bytes."""
    out = Path(config.out)
    with open(files.path(out / "scores.csv"), "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            [
                {
                    **r,
                    "ssim": "" if r["ssim"] is None else f"{r['ssim']:.6f}",
                    "ssim_match": r["ssim_match"] or "",
                    "ncc": f"{r['ncc']:.6f}",
                }
                for r in rows
            ]
        )
    closest = sorted(rows, key=lambda r: -r["ncc"])[: config.gallery_pairs]
    if closest:
        draw_gallery(closest, files.path(out / "gallery.png"), real)
    return closest


def _embedding_audit(
    config: AuditConfig, train_paths, holdout_paths, sample_paths, real: Preprocess, device, rows: list[dict]
) -> dict:
    """The audit by cosine similarity in the --features network's embedding space (cxr.privacy.embedding); adds the
    embedding_* columns to `rows` and returns the report's `embedding` section."""
    matches = embedding_search(
        config.features,
        train_paths=train_paths,
        holdout_paths=holdout_paths,
        sample_paths=sample_paths,
        preprocess=replace(real, resolution=config.features_image_size),
        k=config.top_k,
        quantile=config.threshold_quantile,
        threshold=config.features_threshold,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        device=device,
        memory_budget_mb=config.memory_budget_mb,
    )
    if matches.calibrated:
        check_ceiling(matches.threshold, "cosine", matches.holdout_best.size)
    best = matches.scores[:, 0]
    flagged = best > matches.threshold if matches.threshold is not None else np.zeros(len(best), dtype=bool)
    for i, row in enumerate(rows):
        row.update(
            embedding_cosine=float(best[i]),
            embedding_match=str(train_paths[int(matches.indices[i, 0])]),
            embedding_flagged=bool(flagged[i]),
        )
    holdout = matches.holdout_best
    closest = sorted(rows, key=lambda r: -r["embedding_cosine"])[: config.gallery_pairs]
    return {
        "extractor": matches.extractor,
        "dim": matches.dim,
        "image_size": config.features_image_size,
        "statistic": f"best cosine similarity with a training image of L2-normalized {matches.dim}-d embeddings",
        "threshold": {"value": matches.threshold, "rule": matches.rule, "calibrated": matches.calibrated},
        "flagged": {
            "count": int(flagged.sum()),
            "rate": float(flagged.mean()),
            "holdout_rate": float((holdout > matches.threshold).mean())
            if holdout.size and matches.threshold is not None
            else None,
        },
        "samples": {"summary": score_summary(best), "histogram": score_histogram(best, low=-1.0, high=1.0)},
        "holdout": {"summary": score_summary(holdout), "histogram": score_histogram(holdout, low=-1.0, high=1.0)},
        "closest_pairs": [
            {
                "sample": r["sample"],
                "best_match": r["embedding_match"],
                "cosine": r["embedding_cosine"],
                "flagged": r["embedding_flagged"],
            }
            for r in closest
        ],
    }


def _calibration_warning(report: dict) -> list[str]:
    calibration = report.get("calibration")
    if not calibration or calibration["sufficient"] or report["config"].get("threshold") is not None:
        return []
    count, needed = calibration["holdout_images"], calibration["min_holdout_images"]
    if count == 0:
        return [
            f"WARNING: no held-out images: the threshold is uncalibrated (quantile {calibration['quantile']} "
            f"needs at least {needed} held-out images)"
        ]
    return [
        f"WARNING: the threshold rests on only {count} held-out images; quantile {calibration['quantile']} "
        f"needs at least {needed}, so it is not that quantile (see the warning above)"
    ]


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    threshold, flagged, counts = report["threshold"], report["flagged"], report["counts"]
    samples = report["samples"]["summary"]
    lines = [
        f"audited {counts['samples']} samples against {counts['train']} training images "
        f"({counts['holdout']} held-out images for calibration"
        + (
            f"; {counts['holdout_training_copies']} copies of training images left out"
            if counts.get("holdout_training_copies")
            else ""
        )
        + ")",
        f"threshold NCC > {threshold['value']:.4f} ({threshold['rule']})",
        *_calibration_warning(report),
        f"flagged {flagged['count']} / {counts['samples']} samples = {flagged['rate']:.2%}"
        + (f" (held-out real images: {flagged['holdout_rate']:.2%})" if flagged["holdout_rate"] is not None else ""),
        f"sample best NCC: median {samples['p50']:.4f}, p99 {samples['p99']:.4f}, max {samples['max']:.4f}",
    ]
    embedding = report.get("embedding")
    if embedding:
        value = embedding["threshold"]["value"]
        emb_flagged = embedding["flagged"]
        lines += [
            f"embedding ({embedding['extractor']}): threshold cosine > "
            + (f"{value:.4f}" if value is not None else "none")
            + f" ({embedding['threshold']['rule']})",
            f"flagged by the embedding {emb_flagged['count']} / {counts['samples']} = {emb_flagged['rate']:.2%}"
            + (
                f" (held-out real images: {emb_flagged['holdout_rate']:.2%})"
                if emb_flagged["holdout_rate"] is not None
                else ""
            ),
            f"flagged by either statistic: {report['flagged_any']['count']} / {counts['samples']}",
        ]
    lines.append(f"report: {Path(report['config']['out']) / 'report.json'}, scores.csv, gallery.png")
    if report["exit_code"] == EXIT_FLAGGED:
        lines.append(
            f"FAIL: flagged rate {report['flagged_any']['rate']:.2%} is above --fail_above {report['fail_above']:.2%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: parse flags into an AuditConfig, run `audit`, print the summary, return the exit code."""
    config = parse_config(AuditConfig, argv)
    try:
        report = audit(config)
    except (
        FileNotFoundError,
        ValueError,
        RuntimeError,
    ) as error:  # ImageReadError, ConfigError: ValueError; DatasetError: RuntimeError
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(report))
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

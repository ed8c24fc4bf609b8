"""Memorization audit: which generated X-rays are near-copies of training X-rays?

A near-copy of a chest X-ray can re-identify the patient, so every generated image is compared with
every training image:

1. Each image is center-cropped (or padded) to a square by the same function as in training
   (`cxr.data.imageio.crop_or_pad_square`), resized with an antialiased bilinear filter (training resizes with
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

The flags are `cxr.privacy.audit_config.AuditConfig`; step 4 is `cxr.privacy.audit_calibration`; the scores, the
embedding audit and the tables are `cxr.privacy.audit_scores`; this module reads the images and runs the steps.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from cxr.config import TrainConfig, parse_config, recorded_values, to_dict
from cxr.data.dataset import read_manifest, records_from_manifest
from cxr.data.imageio import Preprocess
from cxr.fileio import check_writable, staged_files
from cxr.model.loading import pick_device
from cxr.privacy.audit_calibration import check_calibration, choose_threshold, drop_training_copies
from cxr.privacy.audit_config import AuditConfig
from cxr.privacy.audit_scores import candidate_ssim, embedding_audit, score_rows, score_section, write_tables
from cxr.privacy.imagesets import list_images, load_thumbnails
from cxr.privacy.ncc import best_matches, standardize_in_place

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE = 0, 1, 2


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
    _check_before_reading(config)
    device = pick_device(config.device)
    train_paths, sample_paths, holdout_paths, clip_percent = _resolve_sets(config)
    holdout_paths, training_copies = drop_training_copies(config, train_paths, holdout_paths)
    calibration = check_calibration(config, len(holdout_paths))  # before the work: may refuse a --fail_above gate
    real = Preprocess(
        config.resolution, config.pad_to_square, clip_percent
    )  # training, held-out: as the model saw them
    read = dict(num_workers=config.num_workers, batch_size=config.batch_size)
    search = _search_settings(config, device)
    train_features = standardize_in_place(load_thumbnails(train_paths, real, desc="training images", **read))
    holdout_best = _holdout_baseline(holdout_paths, train_features, real, read, search)
    threshold, rule = choose_threshold(config, holdout_best)

    generated = replace(real, intensity_clip_percent=0.0)  # samples, as they were written
    sample_thumbs = load_thumbnails(sample_paths, generated, desc="samples", **read)
    scores, indices, shifts = best_matches(sample_thumbs, train_features, **search)
    del sample_thumbs, train_features
    ssim_scores = _sample_ssim(config, sample_paths, train_paths, indices, real) if config.ssim else None
    best = scores[:, 0].numpy().astype(np.float64)
    flagged = best > threshold
    rows = score_rows(sample_paths, train_paths, best, flagged, indices, shifts, ssim_scores)
    embedding = None
    if config.features is not None:
        embedding = embedding_audit(config, train_paths, holdout_paths, sample_paths, real, device, rows)
    flagged_any = np.array([row["flagged"] or row.get("embedding_flagged", False) for row in rows], dtype=bool)
    with staged_files("--out") as files:  # scores.csv, gallery.png and report.json appear together or not at all
        closest = write_tables(config, files, rows, real)
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
            "samples": score_section(best),
            "holdout": score_section(holdout_best),
            "closest_pairs": closest,
            "fail_above": config.fail_above,
            "exit_code": exit_code,
            "seconds": round(time.time() - started, 2),
        }
        files.write_bytes(Path(config.out) / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def _check_before_reading(config: AuditConfig) -> None:
    """The output folder and the --features file, checked before any image is read, not after the search."""
    check_writable(config.out, "--out", create=False)
    if config.features is not None and not Path(config.features).is_file():
        raise FileNotFoundError(
            f"--features {config.features}: file does not exist (a local feature network; nothing is downloaded)"
        )


def _search_settings(config: AuditConfig, device) -> dict:
    """The keyword arguments of `best_matches` for the held-out and the sample searches."""
    return dict(
        k=config.top_k,
        max_shift=config.max_shift,
        shift_step=config.shift_step,
        memory_budget_mb=config.memory_budget_mb,
        device=device,
        progress=True,
    )


def _sample_ssim(config: AuditConfig, sample_paths, train_paths, indices, real: Preprocess):
    """--ssim: SSIM of every sample with each of its top-k training images, at --ssim_resolution."""
    ssim_real = replace(real, resolution=config.ssim_resolution)
    return candidate_ssim(sample_paths, train_paths, indices, ssim_real, num_workers=config.num_workers)


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

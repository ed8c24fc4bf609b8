"""The memorization audit's threshold: how many held-out images calibrate it, which held-out images may, and its value.

The threshold is the `--threshold_quantile` quantile of the held-out real images' best match with the training set
(`cxr.privacy.ncc.calibrate_threshold`), `--threshold` when given, else `--default_threshold`. The memorization watch
(`cxr.privacy.watch`) applies the same rule inside the training run.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from cxr.privacy.audit_config import AuditConfig
from cxr.privacy.imagesets import byte_identical
from cxr.privacy.ncc import calibrate_threshold

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


def drop_training_copies(config: AuditConfig, train_paths, holdout_paths) -> tuple[list[Path], int]:
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


def choose_threshold(config: AuditConfig, holdout_best: np.ndarray) -> tuple[float, str]:
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

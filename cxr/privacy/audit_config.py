"""The memorization audit's flags (`python -m cxr.audit`, `cxr.privacy.audit.audit`): one dataclass, the single source
of their types, defaults, help texts and checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr.config import check_choices, flag, require
from cxr.privacy.evaluate import FEATURES_TRUST


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

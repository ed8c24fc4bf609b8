"""The memorization watch: the audit (`cxr.privacy.audit`) inside the training run, at step 0 and every validation.

Rank 0 draws `--memorization_samples` images from fixed seeds (the validation pipeline,
`cxr.train.validation.validation_images`) and compares them on the training device with every training image and
with the held-out split, with the audit's own pieces and defaults:

* best match: each sample's shift-tolerant NCC with its nearest training image (`cxr.privacy.ncc.best_matches`,
  the audit's shift grid and memory budget), summarised as median, 95th percentile and maximum;
* copy rate: the fraction of samples whose best match is above the threshold. The threshold is calibrated once,
  at the start, by the audit's rule: the `threshold_quantile` (0.99) of the held-out images' best match with the
  training set (`cxr.privacy.ncc.calibrate_threshold`), trusted from `cxr.privacy.audit_calibration.check_calibration`'s
  minimum count of held-out images on (100 at 0.99). Below it, or without held-out images (the audit's
  uncalibrated `default_threshold` then), the log and TensorBoard's text say so;
* KID (`cxr.privacy.imagemetrics.kid`) of the samples to the held-out images, in the thumbnail space, or with
  `--memorization_features` in that network's embedding space, where the same search and calibration also run
  by cosine similarity (as `cxr.privacy.embedding`); a sample then counts as a copy when either statistic flags
  it (the audit's `flagged_any`).

Samples are compared as sample.py writes them (8-bit RGB PNG) and the audit reads them back (the BT.601 luma of
the 8-bit values), so at a checkpoint the copy rate equals `cxr.audit --threshold T` run on sample.py's images of
that checkpoint's adapter with the same seeds.

The training images' thumbnails are read once, from the files the latent cache was built from, kept in the cache
folder (`thumbnails-<key>.safetensors`, keyed by the images' contents and the thumbnail settings) and held on the
device standardized: N x R^2 float32, 328 MB for 20,000 images at 64 px.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cxr.data.imageio import BT601_LUMA, Preprocess, thumbnail
from cxr.fileio import atomic_path
from cxr.privacy.audit_calibration import SCORE_CEILING, check_calibration
from cxr.privacy.audit_config import AuditConfig
from cxr.privacy.imagemetrics import kid
from cxr.privacy.imagesets import load_thumbnails
from cxr.privacy.ncc import best_matches, calibrate_threshold, ncc_topk, standardize_in_place
from cxr.runtime import TrainingError

THUMBNAIL_FORMAT = "cxr-thumbnails/1"
AUDIT = AuditConfig()  # the audit's defaults: quantile, minimum held-out count, shift grid, memory budget
KID_SUBSETS = 100  # cxr.evaluate's defaults
KID_SUBSET_SIZE = 1000
PAIR_GAP = 2  # white pixels between the sample and its training image in the closest-pair picture


# ----------------------------------------------------------------------------------------------- reading, once


def cached_thumbnails(records, preprocess: Preprocess, cache_dir, *, num_workers: int = 0, desc: str) -> torch.Tensor:
    """float32 (N, R, R) thumbnails of `records` (row i = records[i]) as the audit reads them, from
    `cache_dir/thumbnails-<key>.safetensors` or read once (`cxr.privacy.imagesets.load_thumbnails`) and kept there."""
    from safetensors.torch import load_file, save_file

    fields = {"format": THUMBNAIL_FORMAT, **preprocess.key_fields(), "content_sha256": [r.sha256 for r in records]}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"thumbnails-{key}.safetensors"
    size = preprocess.resolution
    if path.is_file():
        try:
            thumbs = load_file(str(path))["thumbnails"]
            if thumbs.shape == (len(records), size, size):
                return thumbs
        except Exception:  # noqa: BLE001 - a damaged file is read again and replaced
            pass
    thumbs = load_thumbnails([r.path for r in records], preprocess, num_workers=num_workers, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({"thumbnails": thumbs.contiguous()}, str(temporary))
    return thumbs


def as_written(samples: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float32 grayscale of (N, 3, H, W) samples in [0, 1], as cxr.audit reads the 8-bit RGB PNGs sample.py
    writes (`cxr.sample.sampling.to_pil`): rounded to 0..255 per channel, /255, BT.601 luma (`cxr.data.imageio`)."""
    rgb = torch.round(samples.detach().float().cpu().clamp(0.0, 1.0) * 255) / 255.0
    return BT601_LUMA[0] * rgb[:, 0] + BT601_LUMA[1] * rgb[:, 1] + BT601_LUMA[2] * rgb[:, 2]


def _summary(scores: np.ndarray) -> dict:
    return {
        "median": float(np.median(scores)),
        "p95": float(np.quantile(scores, 0.95)),
        "max": float(scores.max()),
    }


# ----------------------------------------------------------------------------------------------- one statistic


@dataclass
class _Space:
    """One comparison space (NCC of thumbnails, or cosine of embeddings): the training rows on the device and the
    threshold calibrated once on the held-out rows' best match."""

    name: str  # "ncc" or "cosine"
    train: torch.Tensor  # (N, D) standardized / L2-normalized, on the device
    holdout_count: int
    threshold: float = 0.0
    calibration: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def calibrate(self, holdout_best: np.ndarray) -> None:
        """The audit's rule: its quantile of the held-out best matches, trusted from its minimum count on."""
        with warnings.catch_warnings(record=True) as caught:  # its advice names the audit's flags: kept for the notes
            warnings.simplefilter("always")
            self.calibration = check_calibration(AUDIT, self.holdout_count)
        needed = self.calibration["min_holdout_images"]
        what = str(caught[0].message).split("; give a")[0] + "; " if caught else ""
        if self.holdout_count:
            self.threshold = calibrate_threshold(holdout_best, AUDIT.threshold_quantile)
            rule = f"quantile {AUDIT.threshold_quantile} of {self.holdout_count} held-out images' best {self.name}"
        else:
            self.threshold = AUDIT.default_threshold
            rule = f"uncalibrated: no held-out images (cxr.audit's default threshold {AUDIT.default_threshold})"
        self.calibration.update(threshold=self.threshold, rule=rule, calibrated=self.holdout_count > 0)
        if not self.calibration["sufficient"]:
            self.notes.append(
                f"memorization watch ({self.name}): the copy threshold {self.threshold:.4f} rests on "
                f"{self.holdout_count} held-out images, fewer than the {needed} that quantile "
                f"{AUDIT.threshold_quantile} needs ({what}copy rates are indicative). Hold out at least {needed} "
                f"images (--val_count {needed}) for a calibrated threshold"
            )
        if self.threshold >= SCORE_CEILING:
            self.notes.append(
                f"memorization watch ({self.name}): the threshold is {self.threshold:.4f}, the score's ceiling: the "
                "held-out images match training images perfectly, so no sample can count as a copy"
            )
        duplicates = int((holdout_best > 0.999).sum()) if self.name == "ncc" else 0
        if duplicates:
            self.notes.append(
                f"memorization watch: {duplicates} held-out images have a near-identical training image (NCC > "
                "0.999), which inflates the threshold; deduplicate the data set (python -m cxr.dedup)"
            )

    def judge(self, best: np.ndarray) -> tuple[dict, np.ndarray]:
        """(figures, flagged) of the samples' best matches `best`."""
        flagged = best > self.threshold
        figures = {"threshold": self.threshold, "copies": int(flagged.sum()), "copy_rate": float(flagged.mean())}
        return {**figures, **_summary(best)}, flagged


# ----------------------------------------------------------------------------------------------- the watch


class MemorizationWatch:
    """Built once per run (rank 0); `observe` compares one validation's samples. See the module docstring."""

    def __init__(
        self,
        train_thumbs: torch.Tensor,
        holdout_thumbs: torch.Tensor,
        *,
        train_names: list[str],
        device,
        preprocess: Preprocess,
        embedding: dict | None = None,
    ):
        self.device, self.preprocess, self.train_names = torch.device(device), preprocess, list(train_names)
        self.search = dict(
            max_shift=AUDIT.max_shift,
            shift_step=AUDIT.shift_step,
            memory_budget_mb=AUDIT.memory_budget_mb,
            device=self.device,
        )
        self.holdout_pixels = holdout_thumbs.reshape(len(holdout_thumbs), preprocess.resolution**2).to(self.device)
        self.ncc = _Space("ncc", standardize_in_place(train_thumbs).to(self.device), len(holdout_thumbs))
        holdout_best = np.zeros(0)
        if len(holdout_thumbs):
            holdout_best = best_matches(holdout_thumbs, self.ncc.train, k=1, **self.search)[0][:, 0].double().numpy()
        self.ncc.calibrate(holdout_best)
        self.embedding = embedding
        self.cosine = None
        if embedding is not None:
            holdout = torch.nn.functional.normalize(embedding["holdout"].float(), dim=1)
            self.cosine = _Space("cosine", embedding["train"].to(self.device), len(holdout))
            best = ncc_topk(holdout, self.cosine.train, 1, device=self.device)[0][:, 0].double().numpy()
            self.cosine.calibrate(best if len(holdout) else np.zeros(0))
        self.curve: list[dict] = []
        self.checkpoints: dict[int, dict] = {}
        self.closest_pair: torch.Tensor | None = None
        self.limit: dict = {}  # --stop_on_copy_rate's outcome (copy_limit_report)

    @property
    def notes(self) -> list[str]:
        return self.ncc.notes + (self.cosine.notes if self.cosine else [])

    @property
    def latest(self) -> dict | None:
        return self.curve[-1] if self.curve else None

    def at_checkpoint(self, step: int) -> dict | None:
        """The latest figures (measured at their own `step`, normally the checkpoint's), recorded for checkpoint
        `step`: what its state.json and summary.json hold."""
        if self.latest is not None:
            self.checkpoints[step] = self.latest
        return self.latest

    def observe(self, samples: torch.Tensor, step: int) -> dict:
        """The figures of one validation's samples ((N, 3, H, W) in [0, 1]); also kept in `curve`."""
        thumbs = torch.stack([thumbnail(gray.numpy(), self.preprocess) for gray in as_written(samples)])
        scores, indices, _ = best_matches(thumbs, self.ncc.train, k=1, **self.search)
        best = scores[:, 0].double().numpy()
        ncc, flagged = self.ncc.judge(best)
        closest = int(best.argmax())
        ncc["closest"] = {"sample": closest, "train": self.train_names[int(indices[closest, 0])]}
        self.closest_pair = self._pair_image(thumbs[closest], int(indices[closest, 0]))
        figures = {"step": int(step), "samples": len(thumbs), "ncc": ncc}
        kid_features = (thumbs.reshape(len(thumbs), -1).to(self.device), self.holdout_pixels)
        if self.cosine is not None:
            raw = self._embed(samples)
            normalized = torch.nn.functional.normalize(raw.float(), dim=1)
            cosine_best = ncc_topk(normalized, self.cosine.train, 1, device=self.device)[0][:, 0].double().numpy()
            figures["cosine"], cosine_flagged = self.cosine.judge(cosine_best)
            flagged = flagged | cosine_flagged
            kid_features = (raw, self.embedding["holdout"])
        figures["copies"], figures["copy_rate"] = int(flagged.sum()), float(flagged.mean())
        figures["kid"] = None
        if len(kid_features[0]) >= 2 and len(kid_features[1]) >= 2:
            mean, std = kid(*kid_features, num_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0)
            figures["kid"] = {"mean": mean, "std": std, "space": "embedding" if self.cosine else "thumbnails"}
        self.curve.append(figures)
        return figures

    def _embed(self, samples: torch.Tensor) -> torch.Tensor:
        """(N, D) float64 raw embeddings of samples read as written, at the network's input size (what
        `cxr.privacy.evaluate.read_set` gives the network: thumbnails repeated to 3 channels)."""
        size = Preprocess(self.embedding["image_size"], self.preprocess.pad_to_square)
        thumbs = torch.stack([thumbnail(gray.numpy(), size) for gray in as_written(samples)])
        with torch.inference_mode():
            output = self.embedding["extractor"](thumbs[:, None].expand(-1, 3, -1, -1).to(self.device))
        return output.double()

    def _pair_image(self, sample_thumb: torch.Tensor, train_index: int) -> torch.Tensor:
        """(1, R, 2R + gap) picture: the sample and its nearest training image, each scaled to [0, 1] (the training
        row is kept standardized; standardizing is affine, so its min-max view is the image's)."""
        size = self.preprocess.resolution
        train = self.ncc.train[train_index].float().cpu().reshape(size, size)
        tiles = [(t - t.min()) / (t.max() - t.min()).clamp_min(1e-12) for t in (sample_thumb, train)]
        picture = torch.ones((1, size, 2 * size + PAIR_GAP))
        picture[0, :, :size], picture[0, :, size + PAIR_GAP :] = tiles
        return picture

    def log(self, writer, figures: dict) -> None:
        """TensorBoard: privacy/* and quality/* scalars and the closest pair of this validation."""
        step = figures["step"]
        writer.add_scalar("privacy/copy_rate", figures["copy_rate"], step)
        for space in ("ncc", "cosine"):
            if space in figures:
                for name in ("median", "p95", "max"):
                    writer.add_scalar(f"privacy/best_{space}_{name}", figures[space][name], step)
                writer.add_scalar(f"privacy/{space}_threshold", figures[space]["threshold"], step)
        if "cosine" in figures:  # privacy/copy_rate counts either statistic's copies, as the audit's gate does
            writer.add_scalar("privacy/ncc_copy_rate", figures["ncc"]["copy_rate"], step)
        if figures["kid"] is not None:
            writer.add_scalar("quality/kid_heldout", figures["kid"]["mean"], step)
        if self.closest_pair is not None:
            writer.add_image("privacy/closest_pair", self.closest_pair, step)

    def calibration_text(self) -> str:
        """The thresholds, how they were set and any warning: TensorBoard's privacy/calibration text."""
        lines = []
        for space in (self.ncc, self.cosine):
            if space is not None:
                lines.append(f"- {space.name} threshold {space.threshold:.4f}: {space.calibration['rule']}")
        lines += [f"- **warning**: {note}" for note in self.notes]
        return "\n".join(lines)

    def summary(self) -> dict:
        """summary.json's `memorization`: the calibration, every validation's figures, each checkpoint's."""
        return {
            "calibration": {"ncc": self.ncc.calibration, "cosine": self.cosine.calibration if self.cosine else None},
            "notes": self.notes,
            "curve": self.curve,
            "checkpoints": {str(step): figures for step, figures in sorted(self.checkpoints.items())},
            **self.limit,
        }


# ----------------------------------------------------------------------------------------------- the run's side


def build_watch(cfg, train_records, val_records, device) -> MemorizationWatch | None:
    """The watch of a training run (`cfg`: a TrainConfig), or None when --memorization_samples is 0 or there is
    no validation. Reads (or finds cached) the thumbnails of both splits, calibrates the thresholds."""
    if cfg.memorization_samples <= 0 or cfg.validation_steps <= 0:
        return None
    preprocess = Preprocess(cfg.memorization_resolution, cfg.pad_to_square, cfg.intensity_clip_percent)
    read = dict(num_workers=cfg.resolved_num_workers)
    cache = cfg.resolved_cache_dir
    train = cached_thumbnails(train_records, preprocess, cache, desc="thumbnails of the training images", **read)
    holdout = cached_thumbnails(val_records, preprocess, cache, desc="thumbnails of the held-out images", **read)
    embedding = None
    if cfg.memorization_features is not None:
        if not Path(cfg.memorization_features).is_file():
            raise TrainingError(
                f"--memorization_features {cfg.memorization_features}: file does not exist (a local TorchScript "
                "network, as cxr.audit --features; nothing is downloaded)"
            )
        embedding = _embedding_sets(cfg, train_records, val_records, preprocess, device)
    watch = MemorizationWatch(
        train,
        holdout,
        train_names=[r.relpath for r in train_records],
        device=device,
        preprocess=preprocess,
        embedding=embedding,
    )
    print(f"[cxr] memorization watch: {len(train_records)} training thumbnails; threshold:", file=sys.stderr)
    print(watch.calibration_text(), file=sys.stderr)
    return watch


def _embedding_sets(cfg, train_records, val_records, preprocess: Preprocess, device) -> dict:
    """The --memorization_features network and the training (L2-normalized) and held-out (raw) embeddings."""
    from cxr.privacy.embedding import embed
    from cxr.privacy.evaluate import load_feature_extractor, read_set

    extractor, _ = load_feature_extractor(cfg.memorization_features, device)
    sized = replace(preprocess, resolution=AUDIT.features_image_size)
    read = dict(batch_size=AUDIT.batch_size, num_workers=cfg.resolved_num_workers, device=device)
    train = embed([r.path for r in train_records], extractor, sized, desc="embedding training images", **read)
    holdout = torch.zeros((0, train.shape[1]), dtype=torch.float64)
    if val_records:
        features = read_set(
            [r.path for r in val_records], sized, extractor=extractor, desc="embedding held-out images", **read
        )
        holdout = torch.from_numpy(features["features"])
    return {
        "extractor": extractor,
        "image_size": AUDIT.features_image_size,
        "train": train,
        "holdout": holdout.to(device),
    }


def over_limit(figures: dict | None, limit: float | None) -> bool:
    """Whether a validation's copy rate is above --stop_on_copy_rate."""
    return limit is not None and figures is not None and figures["copy_rate"] > limit


def copy_limit_report(watch: MemorizationWatch, checkpoints_dir, limit: float, stopped_at: int | None = None) -> str:
    """The run's end under --stop_on_copy_rate: which checkpoint is the last under the limit (kept in
    `watch.limit`, hence summary.json), as a message for the log; `stopped_at`: the step whose copy rate stopped
    the run."""
    found = last_checkpoint_under(checkpoints_dir, limit)
    watch.limit = {
        "stop_on_copy_rate": limit,
        "stopped_at_step": stopped_at,
        "last_checkpoint_under_limit": str(found[0]) if found else None,
        "last_checkpoint_under_limit_figures": found[1] if found else None,
    }
    lines = []
    if stopped_at is not None:
        latest = watch.latest
        lines.append(
            f"[cxr] stopped at step {stopped_at}: copy rate {latest['copy_rate']:.1%} ({latest['copies']} of "
            f"{latest['samples']} samples above the copy threshold) is above --stop_on_copy_rate {limit:.1%}; "
            f"checkpoint {Path(checkpoints_dir) / f'checkpoint-{stopped_at}'} holds the weights of this step"
        )
    if found:
        path, figures = found
        adapter = Path(checkpoints_dir).parent / "lora_unet"
        lines.append(
            f"[cxr] last checkpoint under --stop_on_copy_rate {limit:.1%}: {path} (copy rate "
            f"{figures['copy_rate']:.1%} at step {figures['step']})"
            + (f"; {adapter} holds its adapter (sample.py --lora_path {adapter})" if stopped_at is not None else "")
        )
    else:
        lines.append(
            f"[cxr] no checkpoint under --stop_on_copy_rate {limit:.1%} is left in {checkpoints_dir} (a checkpoint "
            "counts when the watch measured it at its own step: save checkpoints at validation steps)"
            + (
                "; lora_unet/ holds the adapter of the stopping step: do not release it"
                if stopped_at is not None
                else ""
            )
        )
    return "\n".join(lines)


def last_checkpoint_under(checkpoints_dir, limit: float) -> tuple[Path, dict] | None:
    """The newest complete checkpoint whose figures, measured at its own step, have a copy rate of at most
    `limit` (read from its state.json), with those figures; None if there is none."""
    from cxr.train.checkpoint import CheckpointError, checkpoint_dirs, verify_checkpoint

    for step, path in reversed(checkpoint_dirs(checkpoints_dir)):
        try:
            verify_checkpoint(path)
            figures = json.loads((path / "state.json").read_text()).get("memorization")
        except (CheckpointError, OSError, ValueError):
            continue
        if figures and figures["step"] == step and figures["copy_rate"] <= limit:
            return path, figures
    return None

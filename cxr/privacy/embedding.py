"""The memorization audit in a learned embedding space: the same top-k search and held-out calibration as the
pixel NCC audit (`cxr.privacy.audit`), by cosine similarity of a feature network's embeddings.

Pixel NCC catches near-exact copies. Published memorization studies use learned embeddings (SSCD copy
detection, patient re-identification networks), which also catch copies that moved, were re-windowed or
re-noised. Any local TorchScript network works (`--features model.pt`, as in `cxr.privacy.evaluate`): it maps
(N, 3, H, W) float images in [0, 1] to (N, D) embeddings. Nothing is downloaded.

Each image is read as the pixel audit reads it (training and held-out images with the run's intensity window,
samples as written), squared, resized to `image_size`, repeated to 3 channels and embedded; embeddings are
L2-normalized, so a dot product is the cosine similarity. The threshold is the same quantile of the held-out
images' best cosine with the training set (or set by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cxr.data.preprocess import Preprocess
from cxr.privacy.evaluate import load_feature_extractor, read_set
from cxr.privacy.ncc import calibrate_threshold, ncc_topk


@dataclass
class EmbeddingMatches:
    """Result of `embedding_search`: best-first cosine scores and training indices of every sample, the held-out
    baseline, and the threshold with the rule that set it."""

    scores: np.ndarray  # (num_samples, k) float64
    indices: np.ndarray  # (num_samples, k) int64 into the training paths
    holdout_best: np.ndarray  # (num_holdout,) float64
    threshold: float | None
    rule: str
    calibrated: bool
    extractor: str
    dim: int


def embed(
    paths,
    extractor,
    preprocess: Preprocess,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    desc: str = "embedding",
):
    """(N, D) float32 torch tensor of L2-normalized embeddings of the images at `paths`, read as `preprocess` says
    and resized to its resolution."""
    if not paths:
        return torch.zeros((0, 1))
    features = read_set(
        paths, preprocess, extractor=extractor, batch_size=batch_size, num_workers=num_workers, device=device, desc=desc
    )["features"]
    features = torch.from_numpy(np.asarray(features, dtype=np.float32))
    if not torch.isfinite(features).all():
        raise ValueError("the feature network returned NaN/inf embeddings; check the network and its input range")
    return torch.nn.functional.normalize(features, dim=1)


def embedding_search(
    features_path,
    *,
    train_paths,
    holdout_paths,
    sample_paths,
    preprocess: Preprocess,
    k: int = 5,
    quantile: float = 0.99,
    threshold: float | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device="cpu",
    memory_budget_mb: float = 512,
) -> EmbeddingMatches:
    """Embed the three sets with the network at `features_path`, then the exact top-k cosine search of every sample
    and held-out image against the training set (chunked like the NCC search) and the calibrated threshold.

    The training and held-out images are read as `preprocess` says (its resolution: the network's input size), the
    samples the same way without the intensity window."""
    extractor, kind = load_feature_extractor(features_path, device)
    read = dict(batch_size=batch_size, num_workers=num_workers, device=device)
    train = embed(train_paths, extractor, preprocess, desc="embedding training images", **read)
    holdout = embed(holdout_paths, extractor, preprocess, desc="embedding held-out images", **read)
    samples = embed(
        sample_paths, extractor, replace(preprocess, intensity_clip_percent=0.0), desc="embedding samples", **read
    )
    search = dict(memory_budget_mb=memory_budget_mb, device=device)
    scores, indices = ncc_topk(samples, train, k, **search)
    holdout_best = (
        ncc_topk(holdout, train, 1, **search)[0][:, 0].numpy().astype(np.float64) if len(holdout) else np.zeros(0)
    )
    if threshold is not None:
        value, rule, calibrated = threshold, "set by --features_threshold", False
    elif holdout_best.size:
        value, calibrated = calibrate_threshold(holdout_best, quantile), True
        rule = f"quantile {quantile} of {holdout_best.size} held-out images' best cosine with the training set"
    else:
        value, rule, calibrated = None, "none: no held-out images and no --features_threshold (nothing flagged)", False
    return EmbeddingMatches(
        scores=scores.numpy().astype(np.float64),
        indices=indices.numpy(),
        holdout_best=holdout_best,
        threshold=value,
        rule=rule,
        calibrated=calibrated,
        extractor=f"{Path(features_path)} ({kind})",
        dim=int(train.shape[1]),
    )

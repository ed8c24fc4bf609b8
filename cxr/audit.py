"""Memorization audit: which generated X-rays are near-copies of training X-rays?

A near-copy of a chest X-ray can re-identify the patient, so every generated image is compared with
every training image:

1. Each image is center-cropped (or padded) to a square like in training, resized with an antialiased
   filter to `--resolution` pixels (64 by default) and standardized (zero mean, unit norm).
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.config import TrainConfig, check_choices, require, flag, parse_config, recorded_values, to_dict

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE = 0, 1, 2
# Held-out images needed before a calibrated threshold is trusted. A new real image exceeds the k-th largest of n
# held-out scores with probability k / (n + 1) (order statistics of exchangeable scores), so n images resolve
# false-flag rates only down to about 1 / (n + 1). For the threshold to be the q-quantile, and not merely "about
# the largest held-out score", n must be at least 1 / (1 - q): 100 at the default q = 0.99, where it lies between
# the two largest scores (a rate of 1-2 %); with 48 images that "0.99 quantile" lets 2-4 % through, with 1 image
# 50 %. And never fewer than 100, whatever q: the rate the threshold lets through has a sampling error of about
# sqrt(q (1 - q) / n), which 100 images keep to a third of the rate or less for q <= 0.9 (0.03 of 0.1).
MIN_HOLDOUT_IMAGES = 100


class CalibrationError(ValueError):
    """The threshold cannot be calibrated as asked (no or too few held-out images for a --fail_above gate)."""


@dataclass
class AuditConfig:
    """Memorization audit: flag generated images that are near-copies of training images."""

    train_dir: Path | None = flag(None, "folder of training images (searched recursively); with --train_manifest, the folder its relative paths start from")
    train_manifest: Path | None = flag(None, "OUTPUT_DIR/manifest.json of a training run: its train split is the reference set and its val split the held-out baseline")
    samples_dir: Path | None = flag(None, "folder of generated images to audit (searched recursively)")
    holdout_dir: Path | None = flag(None, "folder of held-out real images (never trained on) that calibrate the threshold; overrides the manifest's val split")
    out: Path = flag(Path("audit"), "report folder: report.json, scores.csv, gallery.png")
    exclude: str = flag("contact_sheet*", "comma-separated file-name patterns to skip in every folder (sample.py's contact sheet)")
    resolution: int = flag(64, "side of the square thumbnails compared by NCC")
    pad_to_square: bool = flag(False, "pad non-square images to square instead of center-cropping (use the training setting)")
    intensity_clip_percent: float | None = flag(None, "read the training and held-out images (not the samples) with this train.py --intensity_clip_percent (percentile window for 16-bit/float images and DICOM without a VOI window); default: the value in --train_manifest, else 0 (min-max)")
    top_k: int = flag(5, "nearest training images kept per image (the best is reported; --ssim scores all of them)")
    max_shift: float = flag(0.5, "tolerate translations up to this many thumbnail pixels (0.5 px at 64 = 2 px at 256; 0 disables; cost grows with the number of shifts)")
    shift_step: float = flag(0.5, "step of the shift grid in thumbnail pixels (fractional shifts are bilinear)")
    ssim: bool = flag(False, "also compute SSIM with the top-k candidates at --ssim_resolution (informative; flagging uses NCC)")
    ssim_resolution: int = flag(256, "image side for SSIM")
    threshold: float | None = flag(None, "flag images whose best NCC is above this value (default: calibrated on held-out images)")
    threshold_quantile: float = flag(0.99, "calibrated threshold = this quantile of the held-out images' best NCC with the training set")
    default_threshold: float = flag(0.95, "threshold used when there are no held-out images and no --threshold (uncalibrated)")
    min_holdout_images: int | None = flag(None, "held-out images a calibrated threshold needs; fewer: a loud warning, and with --fail_above an error unless --threshold is given (default: 1 / (1 - --threshold_quantile), at least 100; lower it only knowingly)")
    fail_above: float | None = flag(None, "exit with code 1 when the flagged fraction of samples is above this rate (e.g. 0.01)")
    gallery_pairs: int = flag(16, "closest sample/training pairs shown in gallery.png (0 disables)")
    device: str = flag("auto", "cuda, cpu or auto (matrix products)")
    num_workers: int = flag(2, "worker processes that read and resize images")
    batch_size: int = flag(64, "images per reading batch")
    memory_budget_mb: int = flag(512, "working memory of the search (similarity blocks and shifted copies of the queries); sets the chunk sizes. The thumbnails come on top: N x resolution^2 x 4 bytes per set")
    features: Path | None = flag(None, "also audit in the embedding space of this local TorchScript network ((N, 3, H, W) images in [0, 1] -> (N, D), as cxr.evaluate --features): the same top-k search and held-out calibration by cosine similarity, reported beside NCC; a sample is flagged when either statistic is above its threshold")
    features_image_size: int = flag(224, "with --features: images are resized to this square size for the network")
    features_threshold: float | None = flag(None, "with --features: flag samples whose best cosine is above this value (default: calibrated on the held-out images like the NCC threshold)")

    def validate(self) -> None:
        check_choices(self)
        require(self.train_dir is not None or self.train_manifest is not None, "train_dir", "is required (or give --train_manifest)")
        require(self.samples_dir is not None, "samples_dir", "is required: the folder of generated images to audit")
        require(self.intensity_clip_percent is None or 0.0 <= self.intensity_clip_percent < 50.0, "intensity_clip_percent",
                f"must be in [0, 50), got {self.intensity_clip_percent}")
        require(self.resolution >= 8, "resolution", f"must be >= 8, got {self.resolution}")
        require(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        require(0 <= self.max_shift < self.resolution / 4, "max_shift", f"must be in [0, resolution/4), got {self.max_shift}")
        require(self.shift_step > 0, "shift_step", f"must be > 0, got {self.shift_step}")
        require(self.ssim_resolution >= 16, "ssim_resolution", f"must be >= 16 (SSIM uses an 11-pixel window), got {self.ssim_resolution}")
        require(self.threshold is None or -1.0 <= self.threshold <= 1.0, "threshold", f"must be in [-1, 1] (an NCC), got {self.threshold}")
        require(0.0 < self.threshold_quantile <= 1.0, "threshold_quantile", f"must be in (0, 1], got {self.threshold_quantile}")
        require(-1.0 <= self.default_threshold <= 1.0, "default_threshold", f"must be in [-1, 1], got {self.default_threshold}")
        require(self.min_holdout_images is None or self.min_holdout_images >= 1, "min_holdout_images",
                f"must be >= 1, got {self.min_holdout_images}")
        require(self.fail_above is None or 0.0 <= self.fail_above <= 1.0, "fail_above", f"must be a rate in [0, 1], got {self.fail_above}")
        require(self.gallery_pairs >= 0, "gallery_pairs", f"must be >= 0, got {self.gallery_pairs}")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.memory_budget_mb >= 1, "memory_budget_mb", f"must be >= 1, got {self.memory_budget_mb}")
        require(self.features_image_size >= 8, "features_image_size", f"must be >= 8, got {self.features_image_size}")
        require(self.features_threshold is None or -1.0 <= self.features_threshold <= 1.0, "features_threshold",
                f"must be in [-1, 1] (a cosine), got {self.features_threshold}")


# ----------------------------------------------------------------------------------------------
# Images


def read_image(path, intensity_clip_percent: float = 0.0) -> np.ndarray:
    """Grayscale float32 (H, W) in [0, 1] through cxr.imageio (8/16-bit PNG, JPEG, TIFF, DICOM); see
    `cxr.imageio.read_grayscale` for `intensity_clip_percent`."""
    from cxr.imageio import read_grayscale

    return read_grayscale(path, intensity_clip_percent)


def list_images(folder, exclude: str = "") -> list[Path]:
    """Image files under `folder` (recursive, sorted, hidden files skipped: `cxr.dataset.find_images`, the search
    train.py uses), skipping names that match an `exclude` pattern. A folder that cannot be listed is an error."""
    from cxr.dataset import DatasetError, find_images

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder does not exist")
    search = find_images(folder, exclude)
    if search.unreadable:
        raise DatasetError(search.unreadable_message(str(folder), "Give this user permission to list them, or move "
                                                                  "them out of the folder."))
    return search.paths


def square(gray: np.ndarray, pad_to_square: bool = False) -> np.ndarray:
    """Center-crop (or zero-pad) a (H, W) image to a square, as training does."""
    height, width = gray.shape
    if height == width:
        return gray
    side = max(height, width) if pad_to_square else min(height, width)
    if pad_to_square:
        out = np.zeros((side, side), gray.dtype)
        top, left = (side - height) // 2, (side - width) // 2
        out[top:top + height, left:left + width] = gray
        return out
    top, left = (height - side) // 2, (width - side) // 2
    return gray[top:top + side, left:left + side]


def resize_square(gray: np.ndarray, size: int, pad_to_square: bool = False):
    """float32 torch (size, size): squared, then resized with an antialiased bilinear filter."""
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(np.ascontiguousarray(square(gray, pad_to_square), dtype=np.float32))
    if image.shape[0] == size:
        return image
    return F.interpolate(image[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]


class _ThumbnailDataset:
    """Reads image i and returns its (size, size) thumbnail; used through a DataLoader with workers."""

    def __init__(self, paths, size: int, pad_to_square: bool, intensity_clip_percent: float):
        self.paths, self.size, self.pad_to_square = list(paths), size, pad_to_square
        self.intensity_clip_percent = intensity_clip_percent

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        gray = read_image(self.paths[index], self.intensity_clip_percent)
        return resize_square(gray, self.size, self.pad_to_square)


def load_thumbnails(paths, size: int, *, pad_to_square=False, intensity_clip_percent=0.0, num_workers=0, batch_size=64,
                    desc="reading"):
    """float32 (N, size, size) thumbnails, read in a streaming way by `num_workers` processes."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    paths = list(paths)
    out = torch.empty((len(paths), size, size), dtype=torch.float32)
    loader = DataLoader(_ThumbnailDataset(paths, size, pad_to_square, intensity_clip_percent), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    start = 0
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar:
        for batch in loader:
            out[start:start + len(batch)] = batch
            start += len(batch)
            bar.update(len(batch))
    return out


# ----------------------------------------------------------------------------------------------
# Normalized cross-correlation


def standardize(vectors):
    """Rows with zero mean and unit L2 norm (float32), so that NCC(a, b) = a . b.

    A constant image has no structure to correlate: its row becomes all zeros (NCC 0 with anything).
    """
    import torch

    vectors = torch.as_tensor(vectors, dtype=torch.float32).reshape(len(vectors), -1)
    centered = vectors - vectors.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centered, dim=1, keepdim=True)
    return centered / torch.where(norms > 0, norms, torch.ones_like(norms))


def standardize_in_place(thumbs, rows: int = 4096):
    """`standardize` of (N, H, W) thumbnails into their own storage, a chunk of rows at a time, as (N, H*W)
    (so that 20,000 thumbnails do not need two more copies of themselves)."""
    features = thumbs.reshape(len(thumbs), -1)
    for start in range(0, len(features), rows):
        features[start:start + rows] = standardize(features[start:start + rows])
    return features


def chunk_sizes(num_queries: int, num_refs: int, memory_budget_mb: float) -> tuple[int, int]:
    """(query_chunk, ref_chunk) such that one block of scores and its top-k fit the budget.

    A block costs about 2 x query_chunk x ref_chunk float32 (the scores and topk's work space).
    """
    cells = max(1, int(memory_budget_mb * 2**20 / (2 * 4)))
    query_chunk = max(1, min(num_queries, int(math.sqrt(cells))))
    ref_chunk = max(1, min(num_refs, cells // query_chunk))
    return query_chunk, ref_chunk


def ncc_topk(queries, refs, k: int, *, memory_budget_mb: float = 512, device=None, progress: bool = False):
    """Exact top-k by NCC of standardized rows: (scores (Nq, k) descending, indices (Nq, k) int64).

    Computed block by block (`chunk_sizes`), keeping a running top-k, so memory stays bounded whatever
    Nq x Nr is. `queries` and `refs` stay where they are; only the current chunks are moved to `device`.
    """
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device or "cpu")
    num_queries, num_refs = len(queries), len(refs)
    k = min(k, num_refs)
    query_chunk, ref_chunk = chunk_sizes(num_queries, num_refs, memory_budget_mb)
    best_scores = torch.empty((num_queries, k), dtype=torch.float32)
    best_indices = torch.empty((num_queries, k), dtype=torch.int64)
    blocks = math.ceil(num_queries / query_chunk) * math.ceil(num_refs / ref_chunk)
    with tqdm(total=blocks, desc="nearest neighbours", unit="block", disable=not progress or None) as bar:
        # One buffer for every block: fresh allocations of varying size fragment the heap and let the
        # process grow far beyond the budget (glibc raises its mmap threshold after the first free).
        block_buffer = torch.empty(query_chunk * ref_chunk, dtype=torch.float32, device=device)
        for q0 in range(0, num_queries, query_chunk):
            query_block = queries[q0:q0 + query_chunk].to(device, torch.float32)
            scores = torch.full((len(query_block), 0), -math.inf, device=device)
            indices = torch.empty((len(query_block), 0), dtype=torch.int64, device=device)
            for r0 in range(0, num_refs, ref_chunk):
                ref_block = refs[r0:r0 + ref_chunk].to(device, torch.float32)
                block = block_buffer[: len(query_block) * len(ref_block)].view(len(query_block), len(ref_block))
                torch.mm(query_block, ref_block.T, out=block)
                # Top-k of the block first, then merge with the running top-k: only (n, 2k) is concatenated.
                block_scores, block_indices = block.topk(min(k, block.shape[1]), dim=1)
                merged_scores = torch.cat([scores, block_scores], dim=1)
                merged_indices = torch.cat([indices, block_indices + r0], dim=1)
                scores, position = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
                indices = merged_indices.gather(1, position)
                bar.update(1)
            best_scores[q0:q0 + query_chunk] = scores.cpu()
            best_indices[q0:q0 + query_chunk] = indices.cpu()
    return best_scores, best_indices


def shift_offsets(max_shift: float, step: float) -> list[tuple[float, float]]:
    """(dy, dx) grid in thumbnail pixels, |dy|, |dx| <= max_shift in steps of `step`; (0, 0) first."""
    count = int(round(max_shift / step)) if max_shift > 0 else 0
    values = [i * step for i in range(-count, count + 1)]
    grid = [(dy, dx) for dy in values for dx in values if (dy, dx) != (0.0, 0.0)]
    return [(0.0, 0.0)] + grid


def shift_images(thumbs, dy: float, dx: float):
    """(N, H, W) images moved down by dy and right by dx pixels (fractional: bilinear; edges replicated)."""
    import torch
    import torch.nn.functional as F

    if dy == 0 and dx == 0:
        return thumbs
    count, height, width = thumbs.shape
    # grid_sample reads output pixel (y, x) from input (y - dy, x - dx), in [-1, 1] pixel-center units.
    ys = (torch.arange(height, dtype=torch.float32) - dy + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) - dx + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).to(thumbs.device)[None].expand(count, -1, -1, -1)
    moved = F.grid_sample(thumbs[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved[:, 0]


def merge_topk(scores, indices, k: int):
    """Per row, the k best distinct indices among candidate (score, index) columns: (scores, indices).

    Rows are (N, C) with C >= k distinct-or-repeated candidates (one block per shift); a reference
    found under several shifts keeps its best score. Rows with fewer than k distinct indices are padded
    with -inf / -1.
    """
    import torch

    order = scores.argsort(dim=1, descending=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    out_scores = torch.full((len(scores), k), -math.inf, dtype=scores.dtype)
    out_indices = torch.full((len(scores), k), -1, dtype=torch.int64)
    for row, (row_scores, row_indices) in enumerate(zip(scores.tolist(), indices.tolist())):
        seen = {}
        for score, index in zip(row_scores, row_indices):
            if index not in seen:
                seen[index] = score
                if len(seen) == k:
                    break
        out_indices[row, : len(seen)] = torch.tensor(list(seen))
        out_scores[row, : len(seen)] = torch.tensor(list(seen.values()), dtype=scores.dtype)
    return out_scores, out_indices


def _return_free_memory_to_os() -> None:
    """glibc keeps freed blocks of the short-lived per-chunk tensors in fragmented arenas, so without
    this the resident size of a long search creeps up well past the budget; malloc_trim hands the free
    pages back. A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def best_matches(query_thumbs, ref_features, *, k: int, max_shift: float = 0.0, shift_step: float = 0.5,
                 memory_budget_mb: float = 512, device=None, progress: bool = False):
    """The audit statistic: each query's k nearest references by shift-tolerant NCC, best first.

    The score of (query, reference) is the max NCC over copies of the query moved by every offset of
    `shift_offsets(max_shift, shift_step)` (thumbnail pixels; half pixels are bilinear). Returns
    (scores (Nq, k), indices (Nq, k), shifts (Nq, k, 2) float: the (dy, dx) that gave each score).
    """
    import torch

    offsets = shift_offsets(max_shift, shift_step)
    # A quarter of the budget holds the shifted copies of a chunk of queries, the rest the score blocks.
    dim = query_thumbs[0].numel() if len(query_thumbs) else 1
    variant_rows = max(len(offsets), int(memory_budget_mb * 2**20 / 4 / (4 * dim)))
    block_budget_mb = memory_budget_mb * 3 / 4
    variant_rows = min(variant_rows, chunk_sizes(len(query_thumbs) * len(offsets), len(ref_features), block_budget_mb)[0])
    query_chunk = max(1, variant_rows // len(offsets))
    k = min(k, len(ref_features))
    all_scores, all_indices, all_shifts = [], [], []
    variant_buffer = torch.empty((query_chunk * len(offsets), dim), dtype=torch.float32)  # reused, see ncc_topk
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(query_thumbs), query_chunk), desc="nearest neighbours", unit="chunk",
                      disable=not progress or None):
        chunk = query_thumbs[start:start + query_chunk]
        variants = variant_buffer[: len(offsets) * len(chunk)]
        for shift_index, (dy, dx) in enumerate(offsets):
            variants[shift_index * len(chunk):(shift_index + 1) * len(chunk)] = standardize(shift_images(chunk, dy, dx))
        scores, indices = ncc_topk(variants, ref_features, k, memory_budget_mb=block_budget_mb, device=device)
        # (S * n, k) -> (n, S * k): every shift's candidates side by side for each query.
        scores = scores.reshape(len(offsets), len(chunk), k).permute(1, 0, 2).reshape(len(chunk), -1)
        indices = indices.reshape(len(offsets), len(chunk), k).permute(1, 0, 2).reshape(len(chunk), -1)
        shift_of_column = torch.tensor(offsets, dtype=torch.float32).repeat_interleave(k, dim=0)
        best_scores, best_indices = merge_topk(scores, indices, k)
        # The shift that produced each kept (score, index): the first column holding that pair.
        match = (indices[:, None, :] == best_indices[:, :, None]) & (scores[:, None, :] == best_scores[:, :, None])
        all_shifts.append(shift_of_column[match.float().argmax(dim=2)])
        all_scores.append(best_scores)
        all_indices.append(best_indices)
        _return_free_memory_to_os()
    return torch.cat(all_scores), torch.cat(all_indices), torch.cat(all_shifts)



# ----------------------------------------------------------------------------------------------
# SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03, 'valid' filtering)


def gaussian_window(size: int = 11, sigma: float = 1.5):
    """Normalized 1-D gaussian (float64 torch)."""
    import torch

    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def _filter(images, window):
    """Separable 'valid' filtering of (N, 1, H, W) with a 1-D window."""
    import torch.nn.functional as F

    images = F.conv2d(images, window.view(1, 1, 1, -1))
    return F.conv2d(images, window.view(1, 1, -1, 1))


def ssim_components(x, y, *, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
                    k1: float = 0.01, k2: float = 0.03):
    """Per-image mean SSIM and mean contrast-structure term cs, for (N, 1, H, W) image batches."""
    import torch

    window = gaussian_window(window_size, sigma).to(x.device, x.dtype)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(1).mean(dim=1), cs_map.flatten(1).mean(dim=1)


def ssim(x, y, data_range: float = 1.0, dtype=None):
    """Mean SSIM of paired grayscale images: x, y (N, H, W) or (N, 1, H, W), values in [0, data_range].

    Returns (N,) in `dtype` (default float32; float64 is several times slower on CPU).
    """
    import torch

    dtype = dtype or torch.float32
    x = torch.as_tensor(x).to(dtype)
    y = torch.as_tensor(y).to(dtype)
    if x.dim() == 3:
        x, y = x[:, None], y[:, None]
    return ssim_components(x, y, data_range=data_range)[0]


class _SSIMDataset:
    """Item i: SSIM of sample i with each of its candidate training images, at `size` pixels."""

    def __init__(self, sample_paths, train_paths, candidates, size, pad_to_square, intensity_clip_percent):
        self.sample_paths, self.train_paths = sample_paths, train_paths
        self.candidates, self.size, self.pad_to_square = candidates, size, pad_to_square
        self.intensity_clip_percent = intensity_clip_percent

    def __len__(self):
        return len(self.sample_paths)

    def __getitem__(self, index):
        import torch

        load = lambda path, clip: resize_square(read_image(path, clip), self.size, self.pad_to_square)  # noqa: E731
        sample = load(self.sample_paths[index], 0.0)
        refs = torch.stack([load(self.train_paths[j], self.intensity_clip_percent) for j in self.candidates[index].tolist()])
        return ssim(sample.expand_as(refs), refs)


def candidate_ssim(sample_paths, train_paths, candidates, *, size, pad_to_square=False, intensity_clip_percent=0.0,
                   num_workers=0):
    """float32 (Nq, k) SSIM of every sample with each of its candidates (rows of `candidates`); the
    training images are read with `intensity_clip_percent`, the samples as they are."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dataset = _SSIMDataset(sample_paths, train_paths, candidates, size, pad_to_square, intensity_clip_percent)
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
    calibration = {"holdout_images": holdout_count, "min_holdout_images": needed,
                   "sufficient": holdout_count >= needed, "quantile": config.threshold_quantile}
    if calibration["sufficient"] or config.threshold is not None:
        return calibration
    fix = (f"give a --holdout_dir with at least {needed} real images the model never trained on (or a "
           f"--train_manifest whose val split has that many: train.py --val_count {needed}), or set --threshold")
    if config.fail_above is not None:
        raise CalibrationError(
            f"--fail_above: the threshold would rest on {holdout_count} held-out images, fewer than the {needed} that "
            f"quantile {config.threshold_quantile} needs, so the gate would not mean what it says; {fix}")
    if holdout_count:
        # The threshold sits at position q (n - 1) of the n sorted scores; a new real image exceeds the j-th smallest
        # (0-based) with probability (n - j) / (n + 1) (exchangeable scores), interpolated here.
        passed = (holdout_count - config.threshold_quantile * (holdout_count - 1)) / (holdout_count + 1)
        warnings.warn(
            f"only {holdout_count} held-out images calibrate the threshold; quantile {config.threshold_quantile} needs "
            f"at least {needed}. With {holdout_count} the threshold lets about {passed:.0%} of novel real images "
            f"through, not {1 - config.threshold_quantile:.0%}; {fix}", stacklevel=3)
    return calibration


def calibrate_threshold(holdout_scores, quantile: float) -> float:
    """The `quantile` of the held-out images' best-match scores (linear interpolation)."""
    return float(np.quantile(np.asarray(holdout_scores, dtype=np.float64), quantile))


def score_summary(scores) -> dict:
    """count, mean, min, max and percentiles of a score vector (JSON-ready)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return {"count": 0}
    percentiles = {f"p{p}": float(np.percentile(scores, p)) for p in (1, 5, 25, 50, 75, 95, 99)}
    return {"count": int(scores.size), "mean": float(scores.mean()), "min": float(scores.min()),
            **percentiles, "max": float(scores.max())}


def score_histogram(scores, bins: int = 40, low: float = 0.0, high: float = 1.0) -> dict:
    """Histogram of scores on [low, high] (values below `low` are counted in `below`)."""
    scores = np.asarray(scores, dtype=np.float64)
    counts, edges = np.histogram(np.clip(scores, low, high), bins=bins, range=(low, high))
    counts[0] -= int((scores < low).sum())
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "below": int((scores < low).sum())}


def manifest_paths(manifest_path, train_dir=None) -> tuple[list[Path], list[Path]]:
    """(train, val) image paths of a training run's manifest.json (cxr.dataset format).

    Relative paths are resolved against `train_dir` when given, else against the dataset folder the
    manifest records.
    """
    from cxr.dataset import read_manifest

    return _split_paths(read_manifest(manifest_path), train_dir)


def _split_paths(manifest: dict, train_dir=None) -> tuple[list[Path], list[Path]]:
    from cxr.dataset import records_from_manifest

    train, val = (records_from_manifest(manifest, split, dataset_dir=train_dir) for split in ("train", "val"))
    return [record.path for record in train], [record.path for record in val]


def draw_gallery(rows: list[dict], path, pad_to_square: bool = False, tile: int = 192, pairs_per_row: int = 2,
                 intensity_clip_percent: float = 0.0) -> None:
    """PNG of pairs (sample | nearest training image), closest first, scores and names written above; the
    training images are read with `intensity_clip_percent`."""
    from PIL import Image, ImageDraw

    banner, margin = 30, 6
    pair_width, pair_height = 2 * tile + 3 * margin, tile + banner + margin
    grid_rows = max(1, math.ceil(len(rows) / pairs_per_row))
    sheet = Image.new("L", (min(len(rows), pairs_per_row) * pair_width + margin, grid_rows * pair_height + margin), 0)
    draw = ImageDraw.Draw(sheet)
    for rank, row in enumerate(rows):
        left = (rank % pairs_per_row) * pair_width
        top = margin + (rank // pairs_per_row) * pair_height
        ssim_text = f"  SSIM {row['ssim']:.3f}" if row.get("ssim") is not None else ""
        verdict = "  FLAGGED" if row["flagged"] else ""
        draw.text((left + margin, top + 2), f"#{rank + 1}  NCC {row['ncc']:.4f}{ssim_text}{verdict}", fill=255)
        draw.text((left + margin, top + 15), f"{Path(row['sample']).name}  |  {Path(row['best_match']).name}", fill=180)
        for column, (key, clip) in enumerate((("sample", 0.0), ("best_match", intensity_clip_percent))):
            image = resize_square(read_image(row[key], clip), tile, pad_to_square).numpy()
            pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L")
            sheet.paste(pixels, (left + margin + column * (tile + margin), top + banner))
    sheet.save(path)


def _resolve_sets(config: AuditConfig) -> tuple[list[Path], list[Path], list[Path], float]:
    """(train, samples, held-out) paths and the intensity clip percent to read the real images with."""
    from cxr.dataset import read_manifest

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
            warnings.warn(f"--pad_to_square: the training run {'padded' if trained_padded else 'center-cropped'} its "
                          f"images but this audit {'pads' if config.pad_to_square else 'crops'} them, so copies can be "
                          f"missed; pass {'--pad_to_square' if trained_padded else 'no --pad_to_square'} to match "
                          f"{config.train_manifest}", stacklevel=2)
    else:
        train_paths, holdout_paths = list_images(config.train_dir, config.exclude), []
    if config.holdout_dir is not None:
        if not Path(config.holdout_dir).is_dir():
            raise FileNotFoundError(f"--holdout_dir {config.holdout_dir}: folder does not exist")
        holdout_paths = list_images(config.holdout_dir, config.exclude)
        if not holdout_paths:  # a mistyped or empty folder must not fall back to an uncalibrated threshold
            raise FileNotFoundError(f"--holdout_dir {config.holdout_dir}: no images found; give the folder of "
                                    "held-out real images, or leave the flag out to use --train_manifest's val split")
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
    from cxr.fileio import check_writable
    from cxr.models import pick_device

    started = time.time()
    check_writable(config.out, "--out", create=False)  # before any image is read, not after the search
    if config.features is not None and not Path(config.features).is_file():
        raise FileNotFoundError(f"--features {config.features}: file does not exist (a local TorchScript network; "
                                "nothing is downloaded)")
    device = pick_device(config.device)
    train_paths, sample_paths, holdout_paths, clip_percent = _resolve_sets(config)
    calibration = check_calibration(config, len(holdout_paths))  # before the work: may refuse a --fail_above gate
    read = dict(pad_to_square=config.pad_to_square, num_workers=config.num_workers, batch_size=config.batch_size)
    real = dict(read, intensity_clip_percent=clip_percent)  # training and held-out images, as the model saw them
    train_features = standardize_in_place(load_thumbnails(train_paths, config.resolution, desc="training images", **real))
    search = dict(k=config.top_k, max_shift=config.max_shift, shift_step=config.shift_step,
                  memory_budget_mb=config.memory_budget_mb, device=device, progress=True)

    holdout_best = np.zeros(0)
    if holdout_paths:
        holdout_thumbs = load_thumbnails(holdout_paths, config.resolution, desc="held-out images", **real)
        holdout_best = best_matches(holdout_thumbs, train_features, **search)[0][:, 0].numpy().astype(np.float64)
        del holdout_thumbs
        duplicates = int((holdout_best > 0.999).sum())
        if duplicates:
            warnings.warn(f"{duplicates} held-out images have a near-identical training image (NCC > 0.999): the "
                          "held-out set overlaps the training set, which inflates the calibrated threshold. Use images "
                          "the model was not trained on (the manifest's val split).", stacklevel=2)
    if config.threshold is not None:
        threshold, rule = config.threshold, "set by --threshold"
    elif holdout_best.size:
        threshold = calibrate_threshold(holdout_best, config.threshold_quantile)
        rule = f"quantile {config.threshold_quantile} of {holdout_best.size} held-out images' best NCC with the training set"
    else:
        threshold, rule = config.default_threshold, "uncalibrated --default_threshold (no held-out images)"
        warnings.warn(f"no held-out images: using the uncalibrated threshold {threshold}. Pass --holdout_dir or "
                      "--train_manifest (its val split) so the threshold reflects how similar real images are.",
                      stacklevel=2)

    sample_thumbs = load_thumbnails(sample_paths, config.resolution, desc="samples", **read)
    scores, indices, shifts = best_matches(sample_thumbs, train_features, **search)
    del sample_thumbs, train_features
    ssim_scores = None
    if config.ssim:
        ssim_scores = candidate_ssim(sample_paths, train_paths, indices, size=config.ssim_resolution,
                                     pad_to_square=config.pad_to_square, intensity_clip_percent=clip_percent,
                                     num_workers=config.num_workers)

    best = scores[:, 0].numpy().astype(np.float64)
    flagged = best > threshold
    rows = []
    for i, path in enumerate(sample_paths):
        row = {"sample": str(path), "best_match": str(train_paths[int(indices[i, 0])]), "ncc": float(best[i]),
               "shift_y": float(shifts[i, 0, 0]), "shift_x": float(shifts[i, 0, 1]), "ssim": None, "ssim_match": None,
               "flagged": bool(flagged[i])}
        if ssim_scores is not None:
            j = int(ssim_scores[i].argmax())
            row["ssim"], row["ssim_match"] = float(ssim_scores[i, j]), str(train_paths[int(indices[i, j])])
        rows.append(row)
    embedding = None
    if config.features is not None:
        embedding = _embedding_audit(config, train_paths, holdout_paths, sample_paths, clip_percent, device, rows)
    flagged_any = np.array([row["flagged"] or row.get("embedding_flagged", False) for row in rows], dtype=bool)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{**r, "ssim": "" if r["ssim"] is None else f"{r['ssim']:.6f}",
                           "ssim_match": r["ssim_match"] or "", "ncc": f"{r['ncc']:.6f}"} for r in rows])
    closest = sorted(rows, key=lambda r: -r["ncc"])[: config.gallery_pairs]
    if closest:
        draw_gallery(closest, out / "gallery.png", config.pad_to_square, intensity_clip_percent=clip_percent)

    flagged_rate = float(flagged.mean())
    # --fail_above gates on the samples flagged by either statistic (NCC, and the embedding with --features).
    gate_rate = float(flagged_any.mean())
    exit_code = EXIT_FLAGGED if config.fail_above is not None and gate_rate > config.fail_above else EXIT_OK
    report = {
        "config": to_dict(config),
        "counts": {"train": len(train_paths), "samples": len(sample_paths), "holdout": int(holdout_best.size)},
        "intensity_clip_percent": clip_percent,
        "statistic": f"best NCC with a training image of {config.resolution}x{config.resolution} standardized thumbnails, "
                     f"max over shifts up to {config.max_shift} px in steps of {config.shift_step} px",
        "threshold": {"value": float(threshold), "rule": rule, "calibrated": config.threshold is None and holdout_best.size > 0},
        "calibration": calibration,
        "flagged_any": {"count": int(flagged_any.sum()), "rate": gate_rate},
        "embedding": embedding,
        "flagged": {"count": int(flagged.sum()), "rate": flagged_rate,
                    "holdout_rate": float((holdout_best > threshold).mean()) if holdout_best.size else None},
        "samples": {"summary": score_summary(best), "histogram": score_histogram(best)},
        "holdout": {"summary": score_summary(holdout_best), "histogram": score_histogram(holdout_best)},
        "closest_pairs": closest,
        "fail_above": config.fail_above,
        "exit_code": exit_code,
        "seconds": round(time.time() - started, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _embedding_audit(config: AuditConfig, train_paths, holdout_paths, sample_paths, clip_percent: float, device,
                     rows: list[dict]) -> dict:
    """The audit by cosine similarity in the --features network's embedding space (cxr.embedding); adds the
    embedding_* columns to `rows` and returns the report's `embedding` section."""
    from cxr.embedding import embedding_search

    matches = embedding_search(
        config.features, train_paths=train_paths, holdout_paths=holdout_paths, sample_paths=sample_paths,
        k=config.top_k, image_size=config.features_image_size, pad_to_square=config.pad_to_square,
        intensity_clip_percent=clip_percent, quantile=config.threshold_quantile, threshold=config.features_threshold,
        batch_size=config.batch_size, num_workers=config.num_workers, device=device,
        memory_budget_mb=config.memory_budget_mb)
    best = matches.scores[:, 0]
    flagged = best > matches.threshold if matches.threshold is not None else np.zeros(len(best), dtype=bool)
    for i, row in enumerate(rows):
        row.update(embedding_cosine=float(best[i]), embedding_match=str(train_paths[int(matches.indices[i, 0])]),
                   embedding_flagged=bool(flagged[i]))
    holdout = matches.holdout_best
    closest = sorted(rows, key=lambda r: -r["embedding_cosine"])[: config.gallery_pairs]
    return {
        "extractor": matches.extractor, "dim": matches.dim, "image_size": config.features_image_size,
        "statistic": f"best cosine similarity with a training image of L2-normalized {matches.dim}-d embeddings",
        "threshold": {"value": matches.threshold, "rule": matches.rule, "calibrated": matches.calibrated},
        "flagged": {"count": int(flagged.sum()), "rate": float(flagged.mean()),
                    "holdout_rate": float((holdout > matches.threshold).mean())
                    if holdout.size and matches.threshold is not None else None},
        "samples": {"summary": score_summary(best), "histogram": score_histogram(best, low=-1.0, high=1.0)},
        "holdout": {"summary": score_summary(holdout), "histogram": score_histogram(holdout, low=-1.0, high=1.0)},
        "closest_pairs": [{"sample": r["sample"], "best_match": r["embedding_match"], "cosine": r["embedding_cosine"],
                           "flagged": r["embedding_flagged"]} for r in closest],
    }


def _calibration_warning(report: dict) -> list[str]:
    calibration = report.get("calibration")
    if not calibration or calibration["sufficient"] or report["config"].get("threshold") is not None:
        return []
    count, needed = calibration["holdout_images"], calibration["min_holdout_images"]
    if count == 0:
        return [f"WARNING: no held-out images: the threshold is uncalibrated (quantile {calibration['quantile']} "
                f"needs at least {needed} held-out images)"]
    return [f"WARNING: the threshold rests on only {count} held-out images; quantile {calibration['quantile']} "
            f"needs at least {needed}, so it is not that quantile (see the warning above)"]


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    threshold, flagged, counts = report["threshold"], report["flagged"], report["counts"]
    samples = report["samples"]["summary"]
    lines = [
        f"audited {counts['samples']} samples against {counts['train']} training images "
        f"({counts['holdout']} held-out images for calibration)",
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
            + (f"{value:.4f}" if value is not None else "none") + f" ({embedding['threshold']['rule']})",
            f"flagged by the embedding {emb_flagged['count']} / {counts['samples']} = {emb_flagged['rate']:.2%}"
            + (f" (held-out real images: {emb_flagged['holdout_rate']:.2%})" if emb_flagged["holdout_rate"] is not None else ""),
            f"flagged by either statistic: {report['flagged_any']['count']} / {counts['samples']}",
        ]
    lines.append(f"report: {Path(report['config']['out']) / 'report.json'}, scores.csv, gallery.png")
    if report["exit_code"] == EXIT_FLAGGED:
        lines.append(f"FAIL: flagged rate {report['flagged_any']['rate']:.2%} is above --fail_above {report['fail_above']:.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: parse flags into an AuditConfig, run `audit`, print the summary, return the exit code."""
    config = parse_config(AuditConfig, argv)
    try:
        report = audit(config)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # ImageReadError, ConfigError: ValueError; DatasetError: RuntimeError
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(report))
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

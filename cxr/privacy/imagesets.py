"""Sets of images read for comparison (cxr.privacy.audit, cxr.privacy.dedup, cxr.privacy.evaluate): listing a folder,
reading every
image as a small square thumbnail with DataLoader workers, and a gallery of image pairs.

Each image is read as `preprocess` says (`cxr.data.preprocess.Preprocess`: intensity window, crop or pad) and resized
by `cxr.data.preprocess.thumbnail` (antialiased bilinear).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxr.data.dataset import DatasetError, find_images
from cxr.data.preprocess import Preprocess, thumbnail
from cxr.fileio import file_sha256


def list_images(folder, exclude: str = "") -> list[Path]:
    """Image files under `folder` (recursive, sorted, hidden files skipped: `cxr.data.dataset.find_images`, the search
    train.py uses), skipping names that match an `exclude` pattern. A folder that cannot be listed is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder does not exist")
    search = find_images(folder, exclude)
    if search.unreadable:
        raise DatasetError(
            search.unreadable_message(
                str(folder), "Give this user permission to list them, or move them out of the folder."
            )
        )
    return search.paths


def byte_identical(paths, references) -> list[tuple[Path, Path]]:
    """(path, reference) for every file of `paths` whose bytes are those of a file of `references`: the sizes are
    compared first, so only files of a size found in both sets are hashed (sha256)."""
    sizes = {}
    for path in references:
        sizes.setdefault(Path(path).stat().st_size, []).append(Path(path))
    candidates = [Path(p) for p in paths if Path(p).stat().st_size in sizes]
    if not candidates:
        return []
    wanted = {path.stat().st_size for path in candidates}
    by_hash = {file_sha256(ref): ref for size in sorted(wanted) for ref in sizes[size]}
    return [(path, by_hash[digest]) for path in candidates if (digest := file_sha256(path)) in by_hash]


class _ThumbnailDataset:
    """Reads image i and returns its (size, size) thumbnail; used through a DataLoader with workers."""

    def __init__(self, paths, preprocess: Preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return thumbnail(self.preprocess.read(self.paths[index]), self.preprocess)


def load_thumbnails(paths, preprocess: Preprocess, *, num_workers=0, batch_size=64, desc="reading"):
    """float32 (N, R, R) thumbnails (R = preprocess.resolution), read in a streaming way by `num_workers`
    processes."""
    paths = list(paths)
    size = preprocess.resolution
    out = torch.empty((len(paths), size, size), dtype=torch.float32)
    loader = DataLoader(
        _ThumbnailDataset(paths, preprocess), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    start = 0
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar:
        for batch in loader:
            out[start : start + len(batch)] = batch
            start += len(batch)
            bar.update(len(batch))
    return out


def draw_gallery(rows: list[dict], path, preprocess: Preprocess, tile: int = 192, pairs_per_row: int = 2) -> None:
    """PNG of pairs (sample | nearest training image), closest first, scores and names written above. The
    training images are read with `preprocess` (its crop mode and intensity window; the resolution is `tile`),
    the samples with the same crop mode and no intensity window."""
    banner, margin = 30, 6
    pair_width, pair_height = 2 * tile + 3 * margin, tile + banner + margin
    grid_rows = max(1, math.ceil(len(rows) / pairs_per_row))
    sheet = Image.new("L", (min(len(rows), pairs_per_row) * pair_width + margin, grid_rows * pair_height + margin), 0)
    draw = ImageDraw.Draw(sheet)
    real = replace(preprocess, resolution=tile)
    readers = {"sample": replace(real, intensity_clip_percent=0.0), "best_match": real}
    for rank, row in enumerate(rows):
        left = (rank % pairs_per_row) * pair_width
        top = margin + (rank // pairs_per_row) * pair_height
        ssim_text = f"  SSIM {row['ssim']:.3f}" if row.get("ssim") is not None else ""
        verdict = "  FLAGGED" if row["flagged"] else ""
        draw.text((left + margin, top + 2), f"#{rank + 1}  NCC {row['ncc']:.4f}{ssim_text}{verdict}", fill=255)
        draw.text((left + margin, top + 15), f"{Path(row['sample']).name}  |  {Path(row['best_match']).name}", fill=180)
        for column, (key, reader) in enumerate(readers.items()):
            image = thumbnail(reader.read(row[key]), reader).numpy()
            pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L")
            sheet.paste(pixels, (left + margin + column * (tile + margin), top + banner))
    sheet.save(path, format="PNG")  # by name: `path` may be a temporary file without the .png suffix

"""From the pipeline's float decode to PNG files: the pixels (RGB, or BT.601 luminance at 8 or 16 bits) and the
image files of one run, encoded and written on two worker threads, so that PNG encoding (zlib releases the GIL)
and writing of batch k overlap the generation of batch k + 1."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the ones Pillow's convert("L") and cxr.data.imageio's colour -> gray use.
from cxr.data.imageio import BT601_LUMA as LUMA_WEIGHTS
from cxr.sample.samplefolder import png_bytes, sha256_bytes, write_new_file


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of float RGB (..., 3) -> (...) in float64, computed before any quantisation."""
    return np.tensordot(np.asarray(rgb, dtype=np.float64), np.asarray(LUMA_WEIGHTS, dtype=np.float64), axes=([-1], [0]))


def quantise(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """Round [0, 1] floats to 0..255 (uint8) or 0..65535 (uint16)."""
    top = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(values, 0.0, 1.0) * top).astype(dtype)


def to_pil(rgb: np.ndarray, *, grayscale: bool, bit_depth: int = 8):
    """A PIL image from a float RGB (H, W, 3) decode: RGB 8-bit, or luminance as mode L / I;16."""
    if grayscale:
        return Image.fromarray(quantise(luminance(rgb), bit_depth))  # uint8 -> "L", uint16 -> "I;16"
    return Image.fromarray(quantise(rgb, 8))  # uint8 (H, W, 3) -> "RGB"


def encode_and_write(path: Path, rgb: np.ndarray, text: dict[str, str], to_image: Callable) -> str | None:
    """Encode one image (`to_image(rgb)` -> PIL image) as PNG and write it unless the file exists: the file's
    sha256, or None when skipped."""
    data = png_bytes(to_image(rgb), text)
    return sha256_bytes(data) if write_new_file(path, data) else None


class PngWrites:
    """`submit` queues one image; `collect` turns finished writes into index rows (`rows`, updated in place) and
    the `made` / `skipped` lists."""

    def __init__(self, rows: dict[int, dict], skipped: list[Path], image_fields: dict, to_image: Callable):
        self.rows, self.skipped, self.made = rows, skipped, []
        self.image_fields = image_fields  # device, dtype, lora_merged: the same for every image of the run
        self.to_image = to_image
        self.pending: list[tuple[int, int, Path, Future]] = []  # (index, seed, path, future of sha256 or None)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cxr-png")

    def submit(self, path: Path, index: int, seed: int, rgb: np.ndarray, text: dict[str, str]) -> None:
        self.pending.append((index, seed, path, self.pool.submit(encode_and_write, path, rgb, text, self.to_image)))

    def collect(self, quiet: bool = False) -> None:
        while self.pending:
            index, seed, path, future = self.pending.pop(0)
            if quiet and future.exception() is not None:  # already failing: keep what was written
                continue
            digest = future.result()  # raises the writer's error (e.g. a full disk)
            if digest is None:  # the file appeared meanwhile (another process): left as it is
                self.skipped.append(path)
                continue
            self.made.append(path)
            self.rows[index] = {"file": path.name, "index": index, "seed": seed, "sha256": digest, **self.image_fields}

    def close(self) -> None:
        """Wait for the writes in flight and record those that landed (after an error: the ones that succeeded)."""
        self.pool.shutdown(wait=True)
        self.collect(quiet=True)

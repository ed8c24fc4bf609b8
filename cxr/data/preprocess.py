"""From a decoded grayscale image to what the model and the comparison tools see: one square picture.

`Preprocess` names the settings (resolution, crop or pad, intensity window) wherever they travel and are recorded;
`to_model_input` makes training's VAE input (Lanczos), `thumbnail` the comparison tools' small image (bilinear);
both square the image with `crop_or_pad_square`. Reading a file into grayscale is `cxr.data.imageio`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr.data.imageio import decode_grayscale, read_grayscale

# Bumped whenever to_model_input changes its output, so latent caches built by older code are rebuilt.
PREPROCESS_VERSION = "center-crop-or-pad/lanczos-F/v1"

FLIP_WARNING = (
    "--random_flip mirrors chest X-rays left-right. A mirrored PA film shows the heart on the patient's "
    "right (dextrocardia, about 1 in 10,000 people), so the model learns an anatomy that is almost never "
    "normal, and side markers/text come out mirrored. Leave it off unless you know you want this."
)


def flip_warning() -> str:
    """The warning text shown when horizontal flips are enabled (why they are unwise for chest X-rays)."""
    return FLIP_WARNING


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a square picture: one value wherever these settings travel (training's
    latent cache, the audit, dedup, evaluate and embedding reading) and where they are recorded.

    `resolution`: side of the square output; `pad_to_square`: pad with black to the longer side instead of
    center-cropping to the shorter one; `intensity_clip_percent`: the percentile window of `read_grayscale`.
    """

    resolution: int
    pad_to_square: bool = False
    intensity_clip_percent: float = 0.0

    def read(self, path) -> np.ndarray:
        """`read_grayscale` of `path` with this intensity window."""
        return read_grayscale(path, self.intensity_clip_percent)

    def decode(self, data: bytes, path) -> np.ndarray:
        """`decode_grayscale` of a file's bytes with this intensity window."""
        return decode_grayscale(data, path, self.intensity_clip_percent)

    def key_fields(self) -> dict:
        """The fields a latent cache key hashes. The intensity window only when set: at 0 the keys of caches built
        before the flag existed still match."""
        fields = {"resolution": int(self.resolution), "pad_to_square": bool(self.pad_to_square)}
        if self.intensity_clip_percent > 0:
            fields["intensity_clip_percent"] = float(self.intensity_clip_percent)
        return fields

    def metadata(self) -> dict[str, str]:
        """The settings as strings, recorded in a latent cache file's header."""
        return {
            "resolution": str(self.resolution),
            "pad_to_square": str(self.pad_to_square),
            "intensity_clip_percent": repr(float(self.intensity_clip_percent)),
        }


def crop_or_pad_square(gray: np.ndarray, pad_to_square: bool = False) -> np.ndarray:
    """A (H, W) image made square: center-cropped to the shorter side, or with `pad_to_square` centered on a
    black (0) square of the longer side. Training and the comparison tools share it, so they square alike."""
    height, width = gray.shape
    if height == width:
        return gray
    if pad_to_square:
        side = max(height, width)
        padded = np.zeros((side, side), gray.dtype)
        top, left = (side - height) // 2, (side - width) // 2
        padded[top : top + height, left : left + width] = gray
        return padded
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return gray[top : top + side, left : left + side]


def to_model_input(gray: np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    """Grayscale (H, W) in [0, 1] -> float32 tensor (3, R, R) in [-1, 1] for the VAE (training's preprocessing).

    `crop_or_pad_square`, then a Lanczos resize to `preprocess.resolution` in float ('F' mode, no 8-bit
    rounding, antialiased when downscaling), clipped to [0, 1] against Lanczos overshoot, replicated to 3
    channels. No flipping happens here.
    """
    gray = np.asarray(gray, np.float32)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {gray.shape}")
    square = crop_or_pad_square(gray, preprocess.pad_to_square)
    resolution = preprocess.resolution
    if square.shape[0] != resolution:
        as_float_image = Image.fromarray(np.ascontiguousarray(square))  # float32 -> mode "F"
        resized = as_float_image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        square = np.clip(np.asarray(resized, np.float32), 0.0, 1.0)
    tensor = torch.from_numpy(np.ascontiguousarray(square) * 2.0 - 1.0)
    return tensor.unsqueeze(0).repeat(3, 1, 1)


def thumbnail(gray: np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    """Grayscale (H, W) -> float32 tensor (R, R) in the input's range, for comparing images (audit, dedup,
    evaluate, embedding): `crop_or_pad_square`, then an antialiased *bilinear* resize (not training's Lanczos:
    the audit's calibrated thresholds and its tests rest on this filter)."""
    image = torch.from_numpy(np.ascontiguousarray(crop_or_pad_square(gray, preprocess.pad_to_square), dtype=np.float32))
    size = preprocess.resolution
    if image.shape[0] == size:
        return image
    return F.interpolate(image[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[
        0, 0
    ]

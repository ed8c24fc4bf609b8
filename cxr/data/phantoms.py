"""Synthetic frontal chest radiographs ("phantoms") for tests and the demo.

Geometry follows a PA chest film as displayed: the patient's left is on the image's right, so the heart
shadow bulges to the image's right. Dense structures are bright (bone, mediastinum, diaphragm), air is
dark (lungs). Each image varies in size, position, rib phase, exposure and noise. They are test data,
not a claim of realism.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _soft(mask_distance, edge=0.08):
    """1 inside an ellipse distance < 1, 0 outside, with a soft edge."""
    return np.clip((1.0 - mask_distance) / edge, 0.0, 1.0)


def make_phantom(rng: np.random.Generator, height: int = 256, width: int = 256) -> np.ndarray:
    """One phantom as float32 (height, width) in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    jitter = lambda scale: float(rng.normal(0.0, scale))  # noqa: E731

    image = np.full((height, width), 0.05, np.float32)
    body = _soft(_ellipse(yy, xx, 0.58 + jitter(0.01), 0.5 + jitter(0.01), 0.55, 0.46 + jitter(0.02)), 0.05)
    image += 0.45 * body

    lung_y, lung_ry, lung_rx = 0.47 + jitter(0.015), 0.3 + jitter(0.015), 0.15 + jitter(0.01)
    right_lung = _soft(_ellipse(yy, xx, lung_y, 0.31 + jitter(0.01), lung_ry, lung_rx))  # image left
    left_lung = _soft(_ellipse(yy, xx, lung_y + 0.01, 0.69 + jitter(0.01), lung_ry * 0.97, lung_rx))
    lungs = np.maximum(right_lung, left_lung)
    image -= 0.35 * lungs * body

    mediastinum = _soft(_ellipse(yy, xx, 0.45, 0.5, 0.33, 0.07 + jitter(0.005)))
    heart = _soft(_ellipse(yy, xx, 0.66 + jitter(0.01), 0.57 + jitter(0.01), 0.14, 0.16 + jitter(0.01)))
    image += 0.3 * np.maximum(mediastinum, heart)

    diaphragm = np.clip((yy - (0.74 + 0.05 * np.cos((xx - 0.5) * 6.0) + jitter(0.01))) / 0.02, 0, 1)
    image += 0.25 * diaphragm * body

    rib_phase, rib_spacing = rng.uniform(0, 2 * np.pi), 0.075 + jitter(0.004)
    for side in (-1.0, 1.0):
        dx = (xx - 0.5) * side
        curve = yy - 0.25 * dx**2 * 4.0  # ribs sweep down laterally
        ribs = 0.5 + 0.5 * np.cos(2 * np.pi * curve / rib_spacing + rib_phase)
        image += 0.08 * (ribs**6) * (dx > 0.04) * lungs
    for side in (-1.0, 1.0):
        clavicle = np.abs(yy - (0.19 + 0.08 * ((xx - 0.5) * side) + jitter(0.005))) < 0.012
        image += 0.15 * clavicle * (np.abs(xx - 0.5) < 0.3) * (np.abs(xx - 0.5) > 0.05)
    spine = _soft(_ellipse(yy, xx, 0.5, 0.5, 0.6, 0.025))
    image += 0.1 * spine

    image *= 1.0 + jitter(0.05)  # exposure
    image += rng.normal(0.0, 0.015, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def to_uint(image: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return np.round(np.clip(image, 0, 1) * top).astype(np.uint16 if bits == 16 else np.uint8)


def write_phantoms(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((256, 256),),
    formats: tuple[str, ...] = ("png8",),
) -> list[Path]:
    """Write `count` phantoms, cycling through `sizes` (height, width) and `formats`.

    Formats: png8 (mode L), png16 (16-bit grayscale), jpg (8-bit). Phantom i depends only on
    (seed, i), so the same call writes the same files.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        height, width = sizes[index % len(sizes)]
        kind = formats[index % len(formats)]
        image = make_phantom(rng, height, width)
        if kind == "png8":
            path = out_dir / f"phantom_{index:05d}.png"
            Image.fromarray(to_uint(image, 8), mode="L").save(path)
        elif kind == "png16":
            path = out_dir / f"phantom_{index:05d}_16bit.png"
            Image.fromarray(to_uint(image, 16)).save(path)
        elif kind == "jpg":
            path = out_dir / f"phantom_{index:05d}.jpg"
            Image.fromarray(to_uint(image, 8), mode="L").save(path, quality=95)
        else:
            raise ValueError(f"unknown phantom format {kind!r}; use png8, png16 or jpg")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write synthetic chest X-ray phantoms.")
    parser.add_argument("out_dir", help="folder to write the images to")
    parser.add_argument("--count", type=int, default=64, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="seed (same seed, same files)")
    parser.add_argument("--size", type=int, default=256, help="square size in pixels")
    parser.add_argument("--formats", default="png8", help="comma list of png8, png16, jpg (cycled)")
    args = parser.parse_args()
    written = write_phantoms(
        args.out_dir, args.count, args.seed, ((args.size, args.size),), tuple(args.formats.split(","))
    )
    print(f"wrote {len(written)} phantoms to {args.out_dir}")

"""A tiny *pretrained* SD-shaped base model, trained on the CPU by this module, for the demo and the learning tests.

`cxr.model.tiny` gives random weights: LoRA training on it runs, but nothing can be learned that a person could see.
This module trains the same tiny architecture into a real (small) latent diffusion model:

1. the VAE (`AutoencoderKL`, downsampling by 8, 4 latent channels as in SD v1.5) is trained as an autoencoder
   on a mix of generic shapes and phantom chest radiographs (`cxr.data.phantoms`), so it can encode and decode
   the *target* domain;
2. its `scaling_factor` is set, as in SD, to 1 / std of the latents;
3. the UNet is trained as an epsilon denoiser (SD v1.5's noise schedule) on the *source* domain only:
   random grey shapes (ellipses, rectangles, stripes) on gradient backgrounds, never a radiograph. Prompts
   are dropped to "" half of the time, so classifier-free guidance works as on SD.

So the base samples shapes; a LoRA trained through `train.py` on radiographs has to teach it radiographs,
and the learning tests measure whether it did. The text encoder and tokenizer are `cxr.model.tiny`'s (random,
frozen): the prompt is constant anyway.

The result is a folder written with `save_pretrained`, loaded with `from_pretrained` like any base model.
The build of the default settings is committed (`ASSET_DIR`, 3.6 MB), so the demo and CI never pay for it (14
minutes on one busy CPU core). `pretrained_base()` returns it while its recorded key matches a hash of
`BaseSettings()` and `BUILDER_VERSION`; otherwise it builds once into `$CXR_CACHE_DIR` (default
`~/.cache/cxr`), in a folder named after that hash (a temporary folder renamed into place, so a concurrent
build by another process is harmless).

    python -m cxr.model.pretrained --out cxr/model/assets/tiny-pretrained   # rebuild the committed copy
    python -m cxr.model.pretrained                                    # the folder pretrained_base() uses

Everything is seeded; on one machine, torch version and thread count the build is bit-for-bit repeatable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when the code below changes what is built: the cache key includes it.
BUILDER_VERSION = 1
CACHE_ENV = "CXR_CACHE_DIR"
# The committed build of the default settings (reproduce: python -m cxr.model.pretrained --out
# cxr/model/assets/tiny-pretrained).
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny-pretrained"


def _log(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class BaseSettings:
    """What the build depends on (with BUILDER_VERSION): the cache key is a hash of these."""

    resolution: int = 64
    seed: int = 0
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)
    vae_steps: int = 500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    num_source_images: int = 2048
    num_phantoms: int = 256  # for the VAE only (the UNet never sees a phantom)


# --------------------------------------------------------------------------------------------- data


def make_shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    """One *source-domain* image, float32 (size, size) in [0, 1]: 1-4 grey ellipses, rectangles or stripe
    patches on a linear-gradient background. Nothing in it resembles a chest radiograph."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    image = rng.uniform(0.1, 0.9) + rng.uniform(-0.3, 0.3) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        ry, rx = rng.uniform(0.08, 0.3, 2)
        value = rng.uniform(0.0, 1.0)
        kind = rng.integers(0, 3)
        if kind == 0:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        else:
            mask = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        if kind == 2:  # a patch of stripes
            period, theta = rng.uniform(0.06, 0.15), rng.uniform(0, np.pi)
            stripes = np.cos(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0
            image = np.where(mask & stripes, value, image)
        else:
            image = np.where(mask, value, image)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def source_images(count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size) float32 source-domain images; image i depends only on (seed, i)."""
    return np.stack([make_shapes(np.random.default_rng([seed, 1, i]), size) for i in range(count)])


def phantom_images(count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size) float32 phantoms drawn from other seeds than `write_phantoms(..., seed=0)` uses."""
    from cxr.data.phantoms import make_phantom

    return np.stack([make_phantom(np.random.default_rng([seed, 2, i]), size, size) for i in range(count)])


def _to_model_input(images: np.ndarray):
    """(N, H, W) [0, 1] -> (N, 3, H, W) [-1, 1], as the training pipeline feeds the VAE (grey repeated)."""
    import torch

    tensor = torch.from_numpy(images) * 2.0 - 1.0
    return tensor[:, None].repeat(1, 3, 1, 1)


# -------------------------------------------------------------------------------------------- build


def settings_key(settings: BaseSettings) -> str:
    payload = json.dumps({"builder_version": BUILDER_VERSION, **dataclasses.asdict(settings)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _vae_config(settings: BaseSettings) -> dict:
    from cxr.model.tiny import _vae_config as tiny_vae_config

    return dict(
        tiny_vae_config("tiny"),
        block_out_channels=tuple(settings.vae_channels),
        sample_size=settings.resolution,
        norm_num_groups=8,
    )


def _batches(count: int, batch: int, steps: int, generator):
    import torch

    for _ in range(steps):
        yield torch.randint(0, count, (batch,), generator=generator)


def warmup_cosine_lr(step: int, base_lr: float, *, warmup: int, total: int) -> float:
    """The builders' learning rate: a linear ramp over `warmup` steps times a cosine decay over `total` steps."""
    return base_lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + np.cos(np.pi * step / total)))


def train_vae(settings: BaseSettings, log=_log):
    """An AutoencoderKL trained on shapes + phantoms (L1 + MSE reconstruction, a small KL term)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(**_vae_config(settings))
    size = settings.resolution
    data = torch.cat(
        [
            _to_model_input(source_images(settings.num_source_images, size, settings.seed)),
            _to_model_input(phantom_images(settings.num_phantoms, size, settings.seed)),
        ]
    )
    # Phantoms are an eighth of the mix by count; weight their draws up so both domains are seen equally.
    weights = torch.cat(
        [
            torch.full((settings.num_source_images,), 1.0 / settings.num_source_images),
            torch.full((settings.num_phantoms,), 1.0 / settings.num_phantoms),
        ]
    )
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(settings.vae_steps):
        lr = warmup_cosine_lr(step, settings.vae_lr, warmup=50, total=settings.vae_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.multinomial(weights, settings.vae_batch, replacement=True, generator=generator)
        x = data[rows]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + settings.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == settings.vae_steps - 1:
            log(f"  vae step {step:4d}/{settings.vae_steps}  loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i : i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def train_unet(unet, vae, text_encoder, tokenizer, scheduler_config: dict, settings: BaseSettings, log=_log):
    """Train `unet` in place as an epsilon denoiser on source-domain latents (never on a phantom)."""
    import torch

    from cxr import DEFAULT_PROMPT
    from cxr.data.latents import encode_prompt
    from cxr.model.ddpm import add_noise, make_schedule, sample_timesteps

    size = settings.resolution
    images = _to_model_input(source_images(settings.num_source_images, size, settings.seed))
    with torch.no_grad():
        posteriors = [vae.encode(images[i : i + 64]).latent_dist for i in range(0, len(images), 64)]
    mean = torch.cat([p.mean for p in posteriors])
    std = torch.cat([p.std for p in posteriors])
    scaling = vae.config.scaling_factor
    embeds = torch.cat([encode_prompt(tokenizer, text_encoder, text, "cpu") for text in (DEFAULT_PROMPT, "")])
    schedule = make_schedule(scheduler_config, "cpu", "epsilon")
    generator = torch.Generator().manual_seed(settings.seed + 1)
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=1e-2)
    for step, rows in enumerate(_batches(len(mean), settings.unet_batch, settings.unet_steps, generator)):
        lr = warmup_cosine_lr(step, settings.unet_lr, warmup=100, total=settings.unet_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0 = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scaling
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = sample_timesteps(len(rows), schedule, generator, "cpu")
        which = torch.randint(0, 2, (len(rows),), generator=generator)  # 0: the prompt, 1: "" (for guidance)
        prediction = unet(add_noise(x0, noise, timesteps, schedule), timesteps, embeds[which]).sample
        loss = ((prediction - noise) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == settings.unet_steps - 1:
            log(f"  unet step {step:4d}/{settings.unet_steps}  loss {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    return unet


def build(out_dir: str | Path, settings: BaseSettings = BaseSettings(), log=_log) -> Path:
    """Train the base and write it with `save_pretrained` to `out_dir` (written to a temporary folder first,
    then renamed into place; an existing complete folder is returned as it is)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from cxr.model.tiny import _unet_config, build_components

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    started = time.time()
    components = build_components("tiny", seed=settings.seed)
    torch.manual_seed(settings.seed)
    unet = UNet2DConditionModel(**dict(_unet_config("tiny"), sample_size=settings.resolution // 8))
    log(f"building the tiny pretrained base ({settings_key(settings)}): VAE on shapes + phantoms")
    vae = train_vae(settings, log)
    log("UNet on shapes only")
    train_unet(
        unet,
        vae,
        components["text_encoder"],
        components["tokenizer"],
        dict(components["scheduler"].config),
        settings,
        log,
    )
    pipe = StableDiffusionPipeline(
        **dict(components, unet=unet, vae=vae),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        (partial / "cxr_base.json").write_text(
            json.dumps(
                {
                    "key": settings_key(settings),
                    "builder_version": BUILDER_VERSION,
                    "settings": dataclasses.asdict(settings),
                    "build_seconds": round(time.time() - started, 1),
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        try:
            os.replace(partial, out_dir)
        except OSError:  # another process finished first: keep its folder
            if not (out_dir / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"built in {time.time() - started:.0f} s: {out_dir}")
    return out_dir


# ------------------------------------------------------------------------------------ measuring learning

THUMBNAIL = 16  # the fixed feature space: a 16x16 grey thumbnail (256 numbers) of each image


def center_square(gray: np.ndarray) -> np.ndarray:
    """The largest centred square of an (H, W) image (the training crop)."""
    side = min(gray.shape)
    top, left = (gray.shape[0] - side) // 2, (gray.shape[1] - side) // 2
    return gray[top : top + side, left : left + side]


def image_paths(folder: str | Path) -> list[Path]:
    """The PNG and JPEG files directly in `folder`, sorted (sample.py's contact sheet left out)."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.suffix.lower() in (".png", ".jpg", ".jpeg") and not p.name.startswith("contact_sheet")
    )


def thumbnails(images_or_paths, size: int = THUMBNAIL) -> np.ndarray:
    """(N, size*size) float64 features: each image read as grey [0, 1] (paths through cxr.data.imageio, or
    (H, W) arrays), centre-cropped to a square and resized with an antialiased bilinear filter."""
    import torch
    import torch.nn.functional as F

    from cxr.data.imageio import read_grayscale

    rows = []
    for item in images_or_paths:
        gray = read_grayscale(item) if isinstance(item, (str, Path)) else np.asarray(item, np.float32)
        square = torch.from_numpy(np.ascontiguousarray(center_square(gray), dtype=np.float32))[None, None]
        small = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        rows.append(small.reshape(-1).numpy())
    return np.stack(rows).astype(np.float64)


def nearest_ncc(samples: np.ndarray, references: np.ndarray) -> np.ndarray:
    """For each sample row, the largest normalised cross-correlation with any reference row (N,)."""

    def unit(x):
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return (unit(samples) @ unit(references).T).max(axis=1)


def distance_to_training(samples, training, seed: int = 0) -> dict:
    """How far generated images are from the training images, in the fixed thumbnail feature space.

    `kid`: KID (cxr.privacy.imagemetrics' unbiased polynomial-kernel MMD^2, x1000) between the two sets of thumbnails,
    a distribution distance: it grows when the samples are unlike the training images *or* all alike.
    `nn_ncc`: mean over samples of the best NCC with a training image (1 = a copy of one), easy to read.
    """
    from cxr.privacy.imagemetrics import kid

    fake, real = thumbnails(samples), thumbnails(training)
    size = min(len(fake), len(real))
    mean, _ = kid(fake, real, num_subsets=50, subset_size=size, seed=seed)
    return {"kid_x1000": 1000.0 * mean, "nn_ncc": float(nearest_ncc(fake, real).mean()), "samples": len(fake)}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cxr").expanduser()


def built_key(folder: str | Path) -> str | None:
    """The settings key a built folder records (None when it is not a complete build)."""
    try:
        return json.loads((Path(folder) / "cxr_base.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def pretrained_base(settings: BaseSettings = BaseSettings(), cache_dir: str | Path | None = None, log=_log) -> Path:
    """The folder of the pretrained base for `settings`: the committed copy (ASSET_DIR) when it was built with
    these settings and this BUILDER_VERSION, else the cache's, else built into the cache now (minutes on a CPU)."""
    if cache_dir is None and built_key(ASSET_DIR) == settings_key(settings):
        return ASSET_DIR
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return build(root / f"tiny-pretrained-{settings_key(settings)}", settings, log)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build (or find in the cache) the tiny pretrained base model.")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder to build into (default: the cache, ${CACHE_ENV} or ~/.cache/cxr)",
    )
    args = parser.parse_args()
    print(build(args.out) if args.out else pretrained_base())

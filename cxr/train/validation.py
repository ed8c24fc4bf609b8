"""Validation during training: the held-out loss at fixed latents, noise and timesteps, and the sample grid.

log_validation(model, val_inputs, writer, cfg, step, images) -> loss   both, logged to TensorBoard
fixed_validation_inputs(val_mean, scaling_factor, seed, device) -> (x0, noise, timesteps)
validation_loss(unet, x0, noise, timesteps, prompt_embeds, schedule, batch_size, autocast_dtype) -> float
validation_images(unet, vae, tokenizer, scheduler_config, ...) -> (N, 3, R, R) in [0, 1]
"""

from __future__ import annotations

import functools

import torch

from cxr.runtime import autocast_dtype, compute_dtype
from cxr.train.step import diffusion_loss
from cxr.train.tblog import image_grid

VALIDATION_GUIDANCE_SCALE = 3.0
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed timesteps of the held-out loss
VALIDATION_MAX_IMAGES = 256  # held-out images used for the loss (the first ones of the split)
VALIDATION_GRID_GAP = 4  # white pixels between the validation grid's tiles


def _draw(model, cfg, autocast, count: int, steps: int) -> torch.Tensor:
    """`count` validation samples (seeds --seed + i) at `steps` denoising steps."""
    return validation_images(
        model.unet,
        model.vae,
        model.tokenizer,
        model.scheduler_config,
        model.prompt_embeds,
        model.negative_embeds,
        num_images=count,
        steps=steps,
        resolution=cfg.resolution,
        seed=cfg.seed,
        prediction_type=model.schedule.prediction_type,
        autocast_dtype=autocast,
        batch_size=cfg.train_batch_size,
    )


def log_validation(model, val_inputs, writer, cfg, step: int, *, images: bool, watch=None) -> float | None:
    """The held-out loss at `step` (val/loss; None without held-out images) and, with `images`, the sample grid
    (val/samples), written to `writer`. `model` is the run's model side (cxr.train.setup.RunModel), `cfg` its
    TrainConfig; the UNet is back in training mode on return. With `watch` (cxr.privacy.watch, not yet measured
    at `step`), --memorization_samples samples at --memorization_inference_steps (the grid's seeds are the first
    of them) go through it too."""
    autocast = autocast_dtype(cfg.mixed_precision)
    model.unet.eval()
    loss = None
    if val_inputs is not None:
        loss = validation_loss(
            model.unet,
            *val_inputs,
            model.prompt_embeds.to(compute_dtype(cfg.mixed_precision)),
            model.schedule,
            cfg.train_batch_size,
            autocast,
        )
        writer.add_scalar("val/loss", loss, step)
    watched = watch is not None and (watch.latest or {}).get("step") != step
    if images and model.vae is not None:
        draw = functools.partial(_draw, model, cfg, autocast)
        # One draw serves both when the step counts agree: the grid's seeds are the first of the watch's.
        shared = watched and cfg.memorization_inference_steps == cfg.validation_inference_steps
        samples = None
        if cfg.num_validation_images:
            count = max(cfg.num_validation_images, cfg.memorization_samples if shared else 0)
            samples = draw(count, cfg.validation_inference_steps)
            grid = image_grid(samples[: cfg.num_validation_images], gap=VALIDATION_GRID_GAP)
            writer.add_image("val/samples", grid, step)
        if watched:
            if not shared or samples is None:
                samples = draw(cfg.memorization_samples, cfg.memorization_inference_steps)
            watch.log(writer, watch.observe(samples[: cfg.memorization_samples], step))
    writer.flush()
    model.unet.train()
    return loss


@torch.no_grad()
def validation_loss(
    unet,
    val_x0: torch.Tensor,
    val_noise: torch.Tensor,
    val_timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    schedule,
    batch_size: int,
    autocast_dtype,
) -> float:
    """Plain (unweighted) MSE of the target over fixed held-out latents, noise and timesteps (comparable across
    steps and runs). Syncs: it returns a float."""
    total = torch.zeros((), device=val_x0.device)
    for start in range(0, val_x0.shape[0], batch_size):
        part = slice(start, start + batch_size)
        loss = diffusion_loss(
            unet, val_x0[part], val_noise[part], val_timesteps[part], prompt_embeds, schedule, 0.0, autocast_dtype
        )
        total += loss * val_x0[part].shape[0]
    return (total / val_x0.shape[0]).item()


def fixed_validation_inputs(val_mean: torch.Tensor, scaling_factor: float, seed: int, device):
    """Every held-out latent (posterior mean) paired with each of VALIDATION_TIMESTEPS, and fixed noise drawn
    on the CPU from `seed` (identical on every device)."""
    x0 = (val_mean[:VALIDATION_MAX_IMAGES] * scaling_factor).float()
    count = len(VALIDATION_TIMESTEPS)
    x0 = x0.repeat_interleave(count, dim=0)
    timesteps = torch.tensor(VALIDATION_TIMESTEPS, dtype=torch.long).repeat(x0.shape[0] // count)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return x0.to(device), noise.to(device), timesteps.to(device)


@torch.no_grad()
def validation_images(
    unet,
    vae,
    tokenizer,
    scheduler_config: dict,
    prompt_embeds,
    negative_embeds,
    *,
    num_images: int,
    steps: int,
    resolution: int,
    seed: int,
    prediction_type: str,
    autocast_dtype,
    batch_size: int | None = None,
) -> torch.Tensor:
    """(N, 3, R, R) samples in [0, 1] from fixed seeds (seed + i): a stock StableDiffusionPipeline built from the
    in-memory components (LoRA applied, DPM-Solver++), then a float32 VAE decode outside autocast. `batch_size`
    images at a time (all at once by default); image i depends only on its seed, not on its batch."""
    # Imported on first use: the pipeline module pulls in transformers' image processors (seconds, and their
    # warnings), which a run without a validation grid never needs.
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    device = prompt_embeds.device
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    images, chunk = [], max(1, batch_size or num_images)
    for start in range(0, num_images, chunk):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, min(num_images, start + chunk))]
        count = len(generators)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            latents = pipe(
                prompt_embeds=prompt_embeds.float().expand(count, -1, -1),
                negative_prompt_embeds=negative_embeds.float().expand(count, -1, -1),
                num_inference_steps=steps,
                guidance_scale=VALIDATION_GUIDANCE_SCALE,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="latent",
            ).images
        decoded = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        images.append((decoded / 2 + 0.5).clamp(0, 1).float().cpu())
    return torch.cat(images)

"""DDPM forward-process math for training: schedule tables, noising, targets, Min-SNR weights.

The tables are computed once in float64 from the base model's scheduler config (Ho et al. 2020, eq. 4:
`abar_t = prod_{s<=t} (1 - beta_s)`) and kept on the training device as float32, so a training step
only gathers them by timestep on the device: no host copies and no bf16 tables. Every function takes
its random inputs (`noise`, `timesteps`) explicitly and is pure, so the step can be compiled or
captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep float32 tables on one device, plus the training target kind."""

    num_train_timesteps: int
    prediction_type: str
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    snr: torch.Tensor  # abar / (1 - abar)


def betas_float64(config: dict) -> torch.Tensor:
    """The beta table of a diffusers scheduler config, in float64."""
    count = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, count, dtype=torch.float64)
    if kind == "scaled_linear":  # Latent Diffusion: linear in sqrt(beta)
        return torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), 0.999) for i in range(count)],
            dtype=torch.float64,
        )
    raise ValueError(
        f"scheduler config: beta_schedule {kind!r} is not supported for training; use one of {BETA_SCHEDULES}"
    )


def make_schedule(config: dict, device="cpu", prediction_type: str | None = None) -> NoiseSchedule:
    """Build the tables from a scheduler config (`scheduler.config`); `prediction_type` overrides the config's."""
    prediction_type = prediction_type or config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction_type: {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler config: rescale_betas_zero_snr is not supported for training")
    alphas_cumprod = torch.cumprod(1.0 - betas_float64(config), dim=0)
    tables = dict(
        alphas_cumprod=alphas_cumprod,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
        snr=alphas_cumprod / (1.0 - alphas_cumprod),
    )
    return NoiseSchedule(
        num_train_timesteps=len(alphas_cumprod),
        prediction_type=prediction_type,
        **{name: table.to(device=device, dtype=torch.float32) for name, table in tables.items()},
    )


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (B,) vector as (B, 1, 1, ...) so that it broadcasts over the other dims of `like`."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return (
        per_sample(schedule.sqrt_alphas_cumprod[timesteps], x0) * x0
        + per_sample(schedule.sqrt_one_minus_alphas_cumprod[timesteps], x0) * noise
    )


def velocity(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
    return (
        per_sample(schedule.sqrt_alphas_cumprod[timesteps], x0) * noise
        - per_sample(schedule.sqrt_one_minus_alphas_cumprod[timesteps], x0) * x0
    )


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if schedule.prediction_type == "v_prediction":
        return velocity(x0, noise, timesteps, schedule)
    return noise


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for per-timestep `snr` values.

    The paper weights the x0-loss by min(snr, gamma); expressed on the epsilon loss that is
    min(snr, gamma) / snr, and on the v loss min(snr, gamma) / (snr + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def offset_noise(noise: torch.Tensor, channel_noise: torch.Tensor, strength: float) -> torch.Tensor:
    """Noise offset (Guttenberg 2023): add `strength` times a per-(sample, channel) constant `channel_noise` (B, C, 1,
    1)."""
    return noise + strength * channel_noise


def sample_timesteps(count: int, schedule: NoiseSchedule, generator: torch.Generator, device) -> torch.Tensor:
    """`count` timesteps drawn uniformly from [0, T) on `device`."""
    return torch.randint(0, schedule.num_train_timesteps, (count,), generator=generator, device=device)

"""The LoRA training loop: `train(cfg) -> summary`, and the step-building pieces it is made of.

Data flow: images -> (once) VAE posterior mean/std cached on disk and held on the device; prompt -> (once)
text-encoder embedding. Each step then only indexes the device-resident cache, samples latents and noise on
the device, runs the UNet forward/backward with LoRA, clips and steps AdamW. The step has static shapes and
no host synchronisation (no `.item()`, no tensor-valued `if`), so on CUDA it can be captured whole in a
CUDA graph (`--cuda_graph`); the loss and grad norm are summed on the device and read every `--log_every`
steps.

Reusable pieces (also used by `cxr.bench`):
    make_optimizer(params, lr, weight_decay, device, capturable)  AdamW over the LoRA tensors, fused where possible
    StepMetrics(device)                         device accumulators for loss / grad norm / non-finite flag
    diffusion_loss(model, x0, noise, t, prompt_embeds, schedule, snr_gamma, autocast_dtype)  forward + loss
    make_train_step(...) -> step(indices)       one optimizer step (all micro-batches) on device tensors
    capture_cuda_graph(step, indices, ...) -> step(indices)   the same step replayed from a CUDA graph
    snapshot_train_state / restore_train_state  undo warm-up steps (LoRA weights, optimizer state, generator)
    DataOrder                                   per-epoch permutations on the device, rank shards, position
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cxr import __version__
from cxr.config import TrainConfig, save_json, to_dict

# The validation grid uses the same classifier-free guidance scale as sample.py's default.
VALIDATION_GUIDANCE_SCALE = 3.0
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed timesteps of the held-out loss
VALIDATION_MAX_IMAGES = 256  # held-out images used for the loss (the first ones of the split)
LORA_PARAMS_PER_RANK_SD15 = 199_296  # LoRA parameters per unit of rank on SD v1.5's 4 default targets


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says which flag/file and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN/inf; the last good checkpoint is left in place."""


# ----------------------------------------------------------------------------------------- small helpers


def compute_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then constant,
    linear decay to 0 or cosine decay to 0 at `total_steps`. The first warm-up step already has lr > 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"--lr_scheduler: unknown schedule {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the LR without a host sync: fill the device tensor in place (what a CUDA graph reads) or set the float."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def make_optimizer(params, *, lr: float, weight_decay: float, device: torch.device, capturable: bool = False):
    """AdamW over `params`. Fused (one kernel, step counter and LR kept as device tensors: no host reads) on
    CUDA and CPU; foreach where fused is unavailable. With `capturable` the LR is a device tensor a graph reads."""
    params = list(params)
    try:
        lr_value = torch.tensor(lr, dtype=torch.float32, device=device) if device.type == "cuda" else lr
        return torch.optim.AdamW(params, lr=lr_value, weight_decay=weight_decay, fused=True, capturable=capturable)
    except (RuntimeError, ValueError):
        if capturable:
            raise
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "cxr": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------- output dir checks


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` and write + delete a probe file there; TrainingError naming `flag` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cxr-write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        raise TrainingError(
            f"{flag}: cannot write to {folder} ({error.strerror or error}); choose a folder you can write to"
        ) from None


def estimate_disk_bytes(cfg: TrainConfig, num_images: int, vae_scale_factor: int) -> dict[str, int]:
    """Rough upper bounds of what the run writes: checkpoints, adapter export, latent cache, logs.
    `vae_scale_factor`: the base VAE's downsampling (8 for SD v1.5; `cxr.models.read_vae_scale_factor`)."""
    lora_bytes = cfg.lora_rank * LORA_PARAMS_PER_RANK_SD15 * 4
    checkpoint = 3 * lora_bytes + (1 << 20)  # weights + two AdamW moments
    kept = (cfg.checkpoints_total_limit or max(1, cfg.max_train_steps // max(1, cfg.checkpointing_steps or cfg.max_train_steps))) + 1
    latent = 4 * (cfg.resolution // vae_scale_factor) ** 2 * 4 * 2  # mean and std, float32
    rows = num_images * (2 if cfg.random_flip else 1)
    return {"output": kept * checkpoint + 2 * lora_bytes + (64 << 20), "cache": rows * latent + (16 << 20)}


def check_free_space(cfg: TrainConfig, num_images: int) -> None:
    from cxr.models import read_vae_scale_factor

    need = estimate_disk_bytes(cfg, num_images, read_vae_scale_factor(cfg.model_id, cfg.revision))
    places = [(Path(cfg.output_dir), need["output"], "--output_dir"), (cfg.resolved_cache_dir, need["cache"], "--cache_dir")]
    for folder, needed, flag in places:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise TrainingError(
                f"{flag}: {folder} has {free / 2**20:.0f} MiB free but this run needs about {needed / 2**20:.0f} MiB "
                "(checkpoints, adapter, latent cache, logs); free some space, lower --checkpoints_total_limit, "
                "or point the flag at a larger disk"
            )


# ------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_device_and_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """The training device; under torchrun (WORLD_SIZE > 1) also init the process group from the env vars
    (NCCL on CUDA, gloo on the CPU) and pick cuda:LOCAL_RANK."""
    from cxr.models import pick_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if not info.enabled:
        return info, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return info, device


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _broadcast_object(value, info: DistInfo):
    if not info.enabled:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ------------------------------------------------------------------------------------------- data order


class DataOrder:
    """Which cache rows each step uses: a fresh permutation per epoch, computed on the device from
    (seed, epoch) so that it can be recomputed on resume; the last partial global batch is dropped.

    A step takes `grad_accum_steps` micro-batches of the global batch (`batch_size * world_size` rows);
    rank r uses columns [r * batch_size, (r + 1) * batch_size) of each, so 2 ranks at batch B see exactly
    the rows one process at batch 2B sees. The position is (epoch, rows consumed in that epoch).
    """

    def __init__(self, num_rows: int, *, batch_size: int, grad_accum_steps: int, dist: DistInfo, seed: int, device):
        self.num_rows, self.batch_size, self.accum, self.dist = num_rows, batch_size, grad_accum_steps, dist
        self.global_batch = batch_size * dist.world_size
        self.rows_per_step = self.global_batch * grad_accum_steps
        if num_rows < self.rows_per_step:
            raise TrainingError(
                f"--train_batch_size: one step needs {self.rows_per_step} images "
                f"(batch {batch_size} x {grad_accum_steps} accumulation x {dist.world_size} processes) but the "
                f"training split has {num_rows}; lower --train_batch_size/--grad_accum_steps or add images"
            )
        self.steps_per_epoch = num_rows // self.rows_per_step
        self.seed, self.device = seed, device
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator, device=self.device)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None

    def next_indices(self) -> torch.Tensor:
        """(grad_accum_steps, batch_size) cache rows of this rank for the next step, on the device."""
        if self.position + self.rows_per_step > self.num_rows:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = self._permutation(self.epoch)
        rows = self._perm[self.position:self.position + self.rows_per_step].view(self.accum, self.global_batch)
        self.position += self.rows_per_step
        start = self.dist.rank * self.batch_size
        return rows[:, start:start + self.batch_size]


# ------------------------------------------------------------------------------------------------ step


class StepMetrics:
    """Device-side sums over the steps since the last read; `read()` is the only host sync of the loop."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.steps = 0  # host counter: the host knows how many steps it launched

    def reset(self) -> None:
        for tensor in (self.loss_sum, self.grad_norm_sum, self.nonfinite):
            tensor.zero_()
        self.steps = 0

    def read(self, dist: DistInfo | None = None, extra_flag: bool = False) -> dict:
        """Mean loss / grad norm since the last read, whether any was non-finite, and `extra_flag` OR-ed over
        ranks (used to agree on a stop request); averaged over ranks under DDP. Syncs with the device."""
        packed = torch.stack([self.loss_sum, self.grad_norm_sum, self.nonfinite,
                              torch.tensor(float(extra_flag), device=self.loss_sum.device)])
        world = 1
        if dist is not None and dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(packed)
            world = dist.world_size
        loss_sum, grad_sum, nonfinite, flag = packed.tolist()  # the sync: once per --log_every steps
        steps = max(1, self.steps)
        self.reset()
        return {
            "loss": loss_sum / world / steps,
            "grad_norm": grad_sum / world / steps,
            "nonfinite": nonfinite > 0,
            "flag": flag > 0,
        }


def diffusion_loss(model, x0, noise, timesteps, prompt_embeds, schedule, snr_gamma: float, autocast_dtype):
    """Per-step training loss: noise x0 at `timesteps`, predict with `model` under autocast, MSE against the
    target per sample in float32, Min-SNR-gamma weighted (gamma 0: plain MSE), mean over the batch."""
    from cxr import ddpm

    noisy = ddpm.add_noise(x0, noise, timesteps, schedule)
    embeds = prompt_embeds.expand(x0.shape[0], -1, -1)
    # No autocast weight cache: each weight is used once per forward, and a cache breaks CUDA-graph capture.
    with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                        cache_enabled=False):
        prediction = model(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    target = ddpm.training_target(x0, noise, timesteps, schedule)
    per_sample = (prediction.float() - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if snr_gamma > 0:
        per_sample = per_sample * ddpm.min_snr_weights(schedule.snr[timesteps], snr_gamma, schedule.prediction_type)
    return per_sample.mean()


def make_train_step(
    *,
    model,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule,
    latents_mean: torch.Tensor,
    latents_std: torch.Tensor,
    scaling_factor: float,
    prompt_embeds: torch.Tensor,
    generator: torch.Generator,
    metrics: StepMetrics,
    batch_size: int,
    grad_accum_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
    snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    max_grad_norm: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    scaler=None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Callable[[torch.Tensor], None]:
    """Build `step(indices)`: one optimizer step over `indices` (grad_accum_steps, batch_size) of cache rows.

    Everything runs on the device: latent sampling (mean + std * noise), diffusion noise (+ offset) and uniform
    timesteps drawn from `generator` for the whole global batch (every rank draws all `batch_size * world_size`
    rows and keeps its own slice, so N ranks at batch B equal one process at batch N*B), forward + weighted
    loss, backward, gradient clipping, AdamW. Loss and grad norm are added to `metrics` on the device. No
    host sync except inside a GradScaler (fp16), which reads its inf check on the host.
    `model` may be the UNet, its DDP wrapper or a compiled module; `no_sync` is DDP's `no_sync` (skips the
    all-reduce on all but the last micro-batch).
    """
    from cxr import ddpm
    from cxr.latents import sample_latents

    device = latents_mean.device
    global_batch = batch_size * world_size
    own = slice(rank * batch_size, (rank + 1) * batch_size)
    latent_shape = tuple(latents_mean.shape[1:])
    prompt_embeds = prompt_embeds.to(device)

    def draw(*shape):
        return torch.randn((global_batch, *shape), generator=generator, device=device)[own]

    def step(indices: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(grad_accum_steps):
            rows = indices[micro]
            x0 = sample_latents(latents_mean[rows], latents_std[rows], draw(*latent_shape), scaling_factor)
            noise = draw(*latent_shape)
            if noise_offset > 0:
                noise = ddpm.offset_noise(noise, draw(latent_shape[0], 1, 1), noise_offset)
            timesteps = ddpm.sample_timesteps(global_batch, schedule, generator, device)[own]
            sync = no_sync is not None and micro < grad_accum_steps - 1
            with no_sync() if sync else contextlib.nullcontext():
                loss = diffusion_loss(model, x0, noise, timesteps, prompt_embeds, schedule, snr_gamma, autocast_dtype)
                scaled = loss / grad_accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            metrics.loss_sum.add_(scaled.detach())
            metrics.nonfinite.add_((~torch.isfinite(loss.detach())).float())
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        metrics.grad_norm_sum.add_(grad_norm.detach())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step


def snapshot_train_state(params: list[torch.nn.Parameter], optimizer, generator) -> dict:
    """Copies of what a training step changes (LoRA weights, optimizer state, noise generator)."""
    return {
        "params": [p.detach().clone() for p in params],
        "optimizer": {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                      for p in params if p in optimizer.state},
        "generator": generator.get_state(),
    }


@torch.no_grad()
def restore_train_state(snapshot: dict, params, optimizer, metrics: StepMetrics, generator) -> None:
    """Put back a snapshot in place (tensor storage is kept: a captured graph keeps pointing at it); optimizer
    state created since the snapshot is zeroed, which is what a fresh AdamW state is; metrics are reset."""
    for param, saved in zip(params, snapshot["params"]):
        param.copy_(saved)
    for param in params:
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                saved = snapshot["optimizer"].get(param, {}).get(key)
                if saved is None:
                    value.zero_()
                else:
                    value.copy_(saved)
    metrics.reset()
    generator.set_state(snapshot["generator"])


def capture_cuda_graph(step: Callable[[torch.Tensor], None], example_indices: torch.Tensor, *,
                       params: list[torch.nn.Parameter], optimizer, metrics: StepMetrics, generator,
                       warmup_steps: int = 3) -> Callable[[torch.Tensor], None]:
    """Capture `step` in a CUDA graph and return `replay(indices)` with the same effect.

    Warm-up runs on a side stream (as torch.cuda.graph requires); the LoRA weights, optimizer state, metrics
    and the noise generator are restored afterwards, so the warm-up leaves no trace in the training run.
    The optimizer must be capturable and `generator` the device's default CUDA generator (graph-safe).
    """
    static_indices = example_indices.clone()
    snapshot = snapshot_train_state(params, optimizer, generator)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step(static_indices)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_indices)
    restore_train_state(snapshot, params, optimizer, metrics, generator)

    def replay(indices: torch.Tensor) -> None:
        static_indices.copy_(indices)
        graph.replay()

    return replay


# ------------------------------------------------------------------------------------------ validation


@torch.no_grad()
def validation_loss(unet, val_x0: torch.Tensor, val_noise: torch.Tensor, val_timesteps: torch.Tensor,
                    prompt_embeds: torch.Tensor, schedule, batch_size: int, autocast_dtype) -> float:
    """Plain (unweighted) MSE of the target over fixed held-out latents, noise and timesteps (comparable across
    steps and runs). Syncs: it returns a float."""
    total = torch.zeros((), device=val_x0.device)
    for start in range(0, val_x0.shape[0], batch_size):
        part = slice(start, start + batch_size)
        loss = diffusion_loss(unet, val_x0[part], val_noise[part], val_timesteps[part], prompt_embeds, schedule,
                              0.0, autocast_dtype)
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
def validation_images(unet, vae, tokenizer, scheduler_config: dict, prompt_embeds, negative_embeds, *,
                      num_images: int, steps: int, resolution: int, seed: int, prediction_type: str,
                      autocast_dtype) -> torch.Tensor:
    """(N, 3, R, R) samples in [0, 1] from fixed seeds (seed + i): a stock StableDiffusionPipeline built from the
    in-memory components (LoRA applied, DPM-Solver++), then a float32 VAE decode outside autocast."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    device = prompt_embeds.device
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        latents = pipe(
            prompt_embeds=prompt_embeds.float().expand(num_images, -1, -1),
            negative_prompt_embeds=negative_embeds.float().expand(num_images, -1, -1),
            num_inference_steps=steps, guidance_scale=VALIDATION_GUIDANCE_SCALE,
            height=resolution, width=resolution, generator=generators, output_type="latent",
        ).images
    decoded = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1).float().cpu()


# -------------------------------------------------------------------------------------------- signals


class StopFlag:
    """SIGINT/SIGTERM set `signal_name`; the loop checkpoints at the next step boundary and returns."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


# ---------------------------------------------------------------------------------------------- train


def _prepare_data(cfg: TrainConfig, dist: DistInfo):
    """Scan and split the dataset and write the manifest on rank 0; every rank gets the same records."""
    from cxr.dataset import scan_dataset, split_holdout, write_manifest

    result = None
    if dist.is_main:
        records = scan_dataset(
            cfg.dataset_dir, cfg.file_list, min_image_size=cfg.min_image_size, skip_bad_images=cfg.skip_bad_images,
            max_images=cfg.max_images, seed=cfg.seed, num_workers=cfg.resolved_num_workers,
        )
        train_records, val_records = split_holdout(records, val_fraction=cfg.val_fraction, val_count=cfg.val_count,
                                                   seed=cfg.seed)
        check_free_space(cfg, len(records))
        extra = {"resolution": cfg.resolution, "pad_to_square": cfg.pad_to_square, "model_id": cfg.model_id,
                 "seed": cfg.seed, "intensity_clip_percent": cfg.intensity_clip_percent}
        manifest_sha = write_manifest(Path(cfg.output_dir) / "manifest.json", train_records, val_records, extra)
        result = (train_records, val_records, manifest_sha)
    return _broadcast_object(result, dist)


def _build_caches(cfg: TrainConfig, dist: DistInfo, vae, train_records, val_records, device):
    """Latent caches of both splits; rank 0 builds them, the other ranks wait and then load them."""
    from cxr.latents import build_or_load_latent_cache

    common = dict(resolution=cfg.resolution, pad_to_square=cfg.pad_to_square,
                  intensity_clip_percent=cfg.intensity_clip_percent, cache_dir=cfg.resolved_cache_dir,
                  device=device, batch_size=cfg.encode_batch_size, num_workers=cfg.resolved_num_workers,
                  vae_id=f"{cfg.model_id}@{cfg.revision or 'main'}")
    caches = None
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            train_cache = build_or_load_latent_cache(train_records, vae, random_flip=cfg.random_flip, **common)
            val_cache = build_or_load_latent_cache(val_records, vae, random_flip=False, **common) if val_records else None
            caches = (train_cache, val_cache)
        _barrier(dist)
    return caches


def _load_model(cfg: TrainConfig, device, dtype):
    from cxr.lora import inject_lora
    from cxr.models import load_components

    components = load_components(cfg.model_id, cfg.revision)
    unet = components["unet"].to(device=device, dtype=dtype)
    torch.manual_seed(cfg.seed)  # the LoRA A init
    paths = inject_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list,
                        dropout=cfg.lora_dropout)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # The VAE stays float32: the cache stores its posterior exactly and validation decodes without fp16 overflow.
    components["vae"].to(device=device, dtype=torch.float32)
    components["text_encoder"].to(device=device)
    components["unet"] = unet
    return components, paths


def _check_flags_for_device(cfg: TrainConfig, device, dist: DistInfo) -> None:
    if cfg.cuda_graph:
        if device.type != "cuda":
            raise TrainingError(f"--cuda_graph: needs a CUDA device but this run is on {device}; drop --cuda_graph")
        if cfg.mixed_precision == "fp16":
            raise TrainingError("--cuda_graph: cannot capture fp16 training (the GradScaler checks for inf on the "
                                "host every step); use --mixed_precision bf16")
        if dist.enabled:
            raise TrainingError("--cuda_graph: not supported with several processes (DDP); drop --cuda_graph")
        if cfg.torch_compile:
            raise TrainingError("--cuda_graph: use either --cuda_graph or --torch_compile, not both")


def _adapter_metadata(cfg: TrainConfig, step: int, manifest_sha: str, prediction_type: str) -> dict[str, str]:
    from cxr.models import resolve_model_id

    return {
        "base_model": resolve_model_id(cfg.model_id), "revision": str(cfg.revision or ""),
        "resolution": str(cfg.resolution), "pad_to_square": str(cfg.pad_to_square),
        "intensity_clip_percent": str(cfg.intensity_clip_percent), "prompt": cfg.prompt, "steps": str(step), "manifest_sha256": manifest_sha,
        "cxr_version": __version__, "prediction_type": prediction_type,
    }


def train(cfg: TrainConfig, *, stop_after_steps: int | None = None) -> dict:
    """Run (or resume) LoRA training as configured; returns a summary dict.

    `stop_after_steps` behaves like a SIGTERM arriving after that many steps (checkpoint, export, return): for
    tests and for simulating preemption. SIGINT/SIGTERM received at any time (model loading included) stop
    the run after the next step with a checkpoint. Raises TrainingError (and subclasses), CheckpointError,
    DatasetError, AdapterError with messages that name the flag or file at fault.
    """
    with StopFlag() as stop:
        return _train(cfg, stop, stop_after_steps)


def _train(cfg: TrainConfig, stop: StopFlag, stop_after_steps: int | None) -> dict:
    from cxr import ddpm
    from cxr.checkpoint import (capture_rng_state, load_checkpoint, resolve_resume, restore_rng_state,
                                save_checkpoint)
    from cxr.latents import encode_prompt
    from cxr.lora import lora_parameters, lora_state_dict, load_lora_state_dict, save_adapter
    from cxr.tblog import config_markdown, image_grid, make_writer
    from tqdm.auto import tqdm

    dist, device = setup_device_and_distributed(cfg.device)
    _check_flags_for_device(cfg, device, dist)
    output_dir = Path(cfg.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    if dist.is_main:
        check_writable(output_dir, "--output_dir")
        check_writable(cfg.resolved_cache_dir, "--cache_dir")
        check_writable(cfg.resolved_logging_dir, "--logging_dir")
    dtype = compute_dtype(cfg.mixed_precision)
    autocast_dtype = None if cfg.mixed_precision == "no" else dtype

    train_records, val_records, manifest_sha = _prepare_data(cfg, dist)
    components, lora_paths = _load_model(cfg, device, dtype)
    unet, vae, tokenizer = components["unet"], components["vae"], components["tokenizer"]
    scheduler_config = dict(components["scheduler"].config)
    schedule = ddpm.make_schedule(scheduler_config, device, cfg.prediction_type or None)

    # The prompt is constant: encode it once (and "" for the validation grid's guidance), then free the encoder.
    prompt_embeds = encode_prompt(tokenizer, components["text_encoder"], cfg.prompt, device).to(device)
    negative_embeds = encode_prompt(tokenizer, components["text_encoder"], "", device).to(device)
    train_cache, val_cache = _build_caches(cfg, dist, vae, train_records, val_records, device)
    del components["text_encoder"]
    want_images = dist.is_main and cfg.validation_steps > 0 and cfg.num_validation_images > 0
    if not want_images:  # the VAE is kept (float32, on the device) only for the validation grid's decode
        vae = None
        del components["vae"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    latents_mean = train_cache.mean.to(device=device, dtype=torch.float32)
    latents_std = train_cache.std.to(device=device, dtype=torch.float32)
    scaling_factor = float(train_cache.scaling_factor)
    val_inputs = None
    if val_cache is not None and dist.is_main:
        val_inputs = fixed_validation_inputs(val_cache.mean, scaling_factor, cfg.seed + 1, device)

    params = lora_parameters(unet)
    unet.train()
    model = unet
    ddp = None
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=False, gradient_as_bucket_view=True)
        model = ddp
    if cfg.torch_compile:
        model = torch.compile(model)

    optimizer = make_optimizer(params, lr=lr_at(0, base_lr=cfg.learning_rate, warmup_steps=cfg.lr_warmup_steps,
                                                total_steps=cfg.max_train_steps, kind=cfg.lr_scheduler),
                               weight_decay=cfg.adam_weight_decay, device=device, capturable=cfg.cuda_graph)
    lr_tensors = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    if cfg.cuda_graph:  # graph capture tracks the default CUDA generator's offsets by itself
        generator = torch.cuda.default_generators[device.index or 0]
        generator.manual_seed(cfg.seed)
    else:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    data = DataOrder(latents_mean.shape[0], batch_size=cfg.train_batch_size, grad_accum_steps=cfg.grad_accum_steps,
                     dist=dist, seed=cfg.seed, device=device)

    start_step = 0
    resume_path = _broadcast_object(resolve_resume(cfg.resume_from_checkpoint, checkpoints_dir) if dist.is_main
                                    else None, dist)
    if cfg.resume_from_checkpoint and resume_path is None and dist.is_main:
        warnings.warn(f"--resume_from_checkpoint latest: no complete checkpoint in {checkpoints_dir}; starting from step 0")
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, device)
        load_lora_state_dict(unet, checkpoint.lora)
        optimizer.load_state_dict(checkpoint.optimizer["optimizer"])
        for group, lr_tensor in zip(optimizer.param_groups, lr_tensors):
            group["lr"] = lr_tensor  # keep the tensor the step (and a CUDA graph) reads
        if scaler is not None and checkpoint.optimizer.get("scaler"):
            scaler.load_state_dict(checkpoint.optimizer["scaler"])
        restore_rng_state(checkpoint.rng, {"noise": generator})
        data.load_state(checkpoint.state["data"])
        start_step = checkpoint.step
        saved = checkpoint.state.get("config", {})
        # Flags a checkpoint predates (absent from its config) had their default value then.
        changed = [f"--{name}" for name in ("train_batch_size", "grad_accum_steps", "seed", "max_train_steps",
                                            "lr_scheduler", "learning_rate", "resolution", "random_flip",
                                            "pad_to_square", "intensity_clip_percent")
                   if saved.get(name, to_dict(TrainConfig())[name]) != to_dict(cfg)[name]]
        if checkpoint.state.get("world_size") != dist.world_size:
            changed.append("the number of processes")
        if changed and dist.is_main:
            warnings.warn(f"--resume_from_checkpoint {resume_path}: {', '.join(changed)} differ from the checkpoint's "
                          "run; training continues, but not exactly as the original run would have")

    metrics = StepMetrics(device)
    step_fn = make_train_step(
        model=model, params=params, optimizer=optimizer, schedule=schedule, latents_mean=latents_mean,
        latents_std=latents_std, scaling_factor=scaling_factor, prompt_embeds=prompt_embeds.to(dtype),
        generator=generator, metrics=metrics, batch_size=cfg.train_batch_size, grad_accum_steps=cfg.grad_accum_steps,
        rank=dist.rank, world_size=dist.world_size, snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset,
        max_grad_norm=cfg.max_grad_norm, autocast_dtype=autocast_dtype, scaler=scaler,
        no_sync=ddp.no_sync if ddp is not None else None,
    )

    writer = make_writer(cfg.resolved_logging_dir, dist.rank)
    run_versions = versions()
    if dist.is_main:
        resolved = {"prediction_type": schedule.prediction_type, "global_batch": data.rows_per_step,
                    "steps_per_epoch": data.steps_per_epoch, "device": str(device)}
        save_json(cfg, output_dir / "config.json", {"versions": run_versions, "world_size": dist.world_size,
                                                   "resolved": resolved, "lora_paths": lora_paths,
                                                   "manifest_sha256": manifest_sha})
        writer.add_text("config", config_markdown(to_dict(cfg), run_versions), start_step)

    summary = {"output_dir": str(output_dir), "start_step": start_step, "steps": start_step, "interrupted": False,
               "signal": None, "val_losses": [], "checkpoint": None, "adapter": [], "manifest_sha256": manifest_sha,
               "train_images": len(train_records), "val_images": len(val_records), "world_size": dist.world_size}

    def run_validation(step: int, images: bool) -> None:
        unet.eval()
        if val_inputs is not None:
            loss = validation_loss(unet, *val_inputs, prompt_embeds.to(dtype), schedule, cfg.train_batch_size,
                                   autocast_dtype)
            writer.add_scalar("val/loss", loss, step)
            summary["val_losses"].append((step, loss))
        if images and want_images:
            samples = validation_images(
                unet, vae, tokenizer, scheduler_config, prompt_embeds, negative_embeds,
                num_images=cfg.num_validation_images, steps=cfg.validation_inference_steps,
                resolution=cfg.resolution, seed=cfg.seed, prediction_type=schedule.prediction_type,
                autocast_dtype=autocast_dtype)
            writer.add_image("val/samples", image_grid(samples), step)
        writer.flush()
        unet.train()

    def check_finite(step: int, nonfinite: bool) -> None:
        if nonfinite:
            raise NonFiniteLossError(
                f"the training loss became NaN/inf before step {step} (checked every --log_every={cfg.log_every} "
                f"steps). The last good checkpoint in {checkpoints_dir} is kept. Try a lower --learning_rate, "
                "--mixed_precision bf16 instead of fp16, a smaller --max_grad_norm, and check the images "
                f"listed in {output_dir / 'manifest.json'}; then --resume_from_checkpoint latest"
            )

    def save(step: int) -> None:
        """Checkpoint + export (rank 0); refuses to save weights that went non-finite."""
        if not dist.is_main:
            return
        try:
            path = save_checkpoint(
                checkpoints_dir, step, lora=lora_state_dict(unet),
                optimizer={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {}},
                rng=capture_rng_state({"noise": generator}),
                state={"data": data.state(), "lr_schedule": {"kind": cfg.lr_scheduler, "base_lr": cfg.learning_rate,
                       "warmup_steps": cfg.lr_warmup_steps, "total_steps": cfg.max_train_steps},
                       "world_size": dist.world_size, "config": to_dict(cfg)},
                total_limit=cfg.checkpoints_total_limit,
            )
            summary["adapter"] = [str(p) for p in save_adapter(
                unet, output_dir / "lora_unet", rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                targets=cfg.lora_target_list, metadata=_adapter_metadata(cfg, step, manifest_sha, schedule.prediction_type),
                export_format=cfg.export_format)]
        except OSError as error:
            raise TrainingError(
                f"--output_dir: writing checkpoint {step} to {checkpoints_dir} failed ({error.strerror or error}); "
                "the previous checkpoints are intact. Free disk space, then --resume_from_checkpoint latest"
            ) from error
        summary["checkpoint"] = str(path)

    if cfg.cuda_graph and start_step < cfg.max_train_steps:
        position = data.state()
        example = data.next_indices()
        data.load_state(position)
        step_fn = capture_cuda_graph(step_fn, example, params=params, optimizer=optimizer, metrics=metrics,
                                     generator=generator)

    if start_step < cfg.max_train_steps and val_inputs is not None:
        run_validation(start_step, images=False)  # the baseline of val/loss
    progress = tqdm(total=cfg.max_train_steps, initial=start_step, disable=not dist.is_main, desc="train",
                    dynamic_ncols=True)
    images_per_step = data.rows_per_step
    clock, timed_steps, images_per_s = time.perf_counter(), 0, float("nan")
    step = start_step
    signalled = stop.signal_name is not None
    if dist.enabled:
        signalled = metrics.read(dist, extra_flag=signalled)["flag"]
    if signalled:  # signalled during setup: nothing new to save, leave at once
        summary.update(interrupted=True, signal=stop.signal_name or "SIGTERM")
        progress.close()
        writer.close()
        _barrier(dist)
        return summary
    while step < cfg.max_train_steps:
        set_lr(optimizer, lr_at(step, base_lr=cfg.learning_rate, warmup_steps=cfg.lr_warmup_steps,
                                total_steps=cfg.max_train_steps, kind=cfg.lr_scheduler))
        step_fn(data.next_indices())
        metrics.steps += 1
        step += 1
        timed_steps += 1
        progress.update(1)
        stop_requested = stop.signal_name is not None or (stop_after_steps is not None and step >= stop_after_steps)
        log_due = step % cfg.log_every == 0 or step == cfg.max_train_steps
        checkpoint_due = step == cfg.max_train_steps or (cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0)
        if dist.enabled and not (log_due or checkpoint_due):
            stop_requested = False  # ranks agree on stopping at the next log or checkpoint step
        if log_due or checkpoint_due or stop_requested:
            read = metrics.read(dist, extra_flag=stop_requested)  # host sync: only here
            check_finite(step, read["nonfinite"])
            stop_requested = read["flag"]
            if log_due:
                images_per_s = timed_steps * images_per_step / (time.perf_counter() - clock)
                lr_now = lr_at(step - 1, base_lr=cfg.learning_rate, warmup_steps=cfg.lr_warmup_steps,
                               total_steps=cfg.max_train_steps, kind=cfg.lr_scheduler)
                for tag, value in (("train/loss", read["loss"]), ("train/grad_norm", read["grad_norm"]),
                                   ("train/lr", lr_now), ("train/images_per_s", images_per_s),
                                   ("memory/peak_mib", peak_memory_mib(device))):
                    writer.add_scalar(tag, value, step)
                progress.set_postfix(loss=f"{read['loss']:.4f}", img_s=f"{images_per_s:.1f}")
                summary["final_loss"] = read["loss"]
                clock, timed_steps = time.perf_counter(), 0
        if dist.is_main and cfg.validation_steps and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
            run_validation(step, images=True)
            clock, timed_steps = time.perf_counter(), 0
        if checkpoint_due or stop_requested:
            save(step)
            _barrier(dist)
            clock, timed_steps = time.perf_counter(), 0
        if stop_requested:
            summary["interrupted"] = True
            summary["signal"] = stop.signal_name or "stop_after_steps"
            break
    if step >= cfg.max_train_steps and dist.is_main:
        if step == start_step:  # resumed from a finished run: just (re-)export
            save(step)
        run_validation(step, images=True)
    progress.close()
    writer.close()
    summary.update(steps=step, images_per_s=images_per_s, peak_memory_mib=peak_memory_mib(device))
    if summary["val_losses"]:
        summary["val_loss_initial"] = summary["val_losses"][0][1]
        summary["val_loss_final"] = summary["val_losses"][-1][1]
    if dist.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _barrier(dist)
    return summary


def exit_code(summary: dict) -> int:
    """Process exit status for a summary: 0 when finished, 128 + signal number when stopped by a signal
    (130 SIGINT, 143 SIGTERM: what shells and schedulers expect), 0 for a simulated stop."""
    name = summary.get("signal")
    if name in ("SIGINT", "SIGTERM"):
        return 128 + int(signal.Signals[name])
    return 0


def run(cfg: TrainConfig) -> int:
    """Train and return the process exit status; known failures print one clear `error:` line and give 1."""
    from cxr.checkpoint import CheckpointError

    known: tuple[type[BaseException], ...] = (TrainingError, CheckpointError)
    with contextlib.suppress(ImportError):
        from cxr.dataset import DatasetError
        from cxr.lora import AdapterError

        known = known + (DatasetError, AdapterError)
    try:
        summary = train(cfg)
    except known as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
    return exit_code(summary)

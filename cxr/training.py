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
from cxr.config import TrainConfig, cache_flags, changed_result_flags, result_flags, save_json, to_dict

# The validation grid uses the same classifier-free guidance scale as sample.py's default.
VALIDATION_GUIDANCE_SCALE = 3.0
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed timesteps of the held-out loss
VALIDATION_MAX_IMAGES = 256  # held-out images used for the loss (the first ones of the split)
VALIDATION_GRID_GAP = 4  # white pixels between the validation grid's tiles
LORA_PARAMS_PER_RANK_SD15 = 199_296  # LoRA parameters per unit of rank on SD v1.5's 4 default targets


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says which flag/file and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf; checkpoints whose weights led there are marked NONFINITE."""


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state but keep this optimizer's settings.

    The checkpoint gives the state (moments, step counts); the freshly built param groups give everything
    else: the flags of this run (LR, weight decay) and its mode (`fused`, `capturable`, `foreach`). Taking
    the mode from the checkpoint would make an eager run's checkpoint fail inside a --cuda_graph capture
    ("capturable is False"), and the reverse run slower. The settings go in before loading, so the step
    counters are placed where this mode needs them (on the device when fused or capturable). The LR object
    itself (a device tensor a CUDA graph reads) is put back after loading, which copies it.
    """
    fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    groups = [{**old, **new} for old, new in zip(saved["param_groups"], fresh)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    for group, settings in zip(optimizer.param_groups, fresh):
        group["lr"] = settings["lr"]


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
    """`cxr.fileio.check_writable` (shared by every command), raising TrainingError naming `flag`."""
    from cxr import fileio

    fileio.check_writable(folder, flag, TrainingError)


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


def setup_device_and_distributed(device_name: str, timeout_minutes: int = 180) -> tuple[DistInfo, torch.device]:
    """The training device; under torchrun (WORLD_SIZE > 1) also init the process group from the env vars
    (NCCL on CUDA, gloo on the CPU) and pick cuda:LOCAL_RANK. `timeout_minutes` (--ddp_timeout_minutes) is how
    long a collective waits: the other ranks wait in a barrier while rank 0 alone scans and encodes the dataset."""
    import datetime

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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
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
    """Device-side sums over the steps since the last read; `read()` is the only host sync of the loop.

    `nonfinite` counts steps whose loss or gradient norm was NaN/inf; `finite_steps` counts the steps before
    the first such step, so a read tells which step of its window went bad first (and hence which weights
    still gave a finite loss)."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.steps = 0  # host counter: the host knows how many steps it launched

    def reset(self) -> None:
        for tensor in (self.loss_sum, self.grad_norm_sum, self.nonfinite, self.finite_steps):
            tensor.zero_()
        self.steps = 0

    def add_nonfinite(self, flag: torch.Tensor) -> None:
        """Record one step's non-finite flag (0-dim, > 0 when bad) on the device."""
        self.nonfinite.add_((flag > 0).float())
        self.finite_steps.add_((self.nonfinite == 0).float())

    def read(self, dist: DistInfo | None = None, extra_flag: bool = False) -> dict:
        """Mean loss / grad norm since the last read, whether any was non-finite, and `extra_flag` OR-ed over
        ranks (used to agree on a stop request); averaged over ranks under DDP. Syncs with the device."""
        packed = torch.stack([self.loss_sum, self.grad_norm_sum, self.nonfinite,
                              torch.tensor(float(extra_flag), device=self.loss_sum.device)])
        finite_steps = self.finite_steps.clone()
        world = 1
        if dist is not None and dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(packed)
            world = dist.world_size
        loss_sum, grad_sum, nonfinite, flag = packed.tolist()  # the sync: once per --log_every steps
        if nonfinite > 0 and world > 1:  # every rank takes this branch: the first bad step on any rank
            tdist.all_reduce(finite_steps, op=tdist.ReduceOp.MIN)
        window = self.steps
        steps = max(1, self.steps)
        self.reset()
        return {
            "loss": loss_sum / world / steps,
            "grad_norm": grad_sum / world / steps,
            "nonfinite": nonfinite > 0,
            "finite_steps": int(finite_steps.item()) if nonfinite > 0 else window,  # steps before the first bad one
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
    loss, backward, gradient clipping, AdamW. Loss and grad norm are added to `metrics` on the device. An update
    whose gradient norm is NaN/inf is never applied (`step_unless`: LoRA weights and AdamW state stay as they
    were); such a step, or a NaN/inf loss, is flagged in `metrics`. With a GradScaler (fp16) the scaler skips
    inf steps itself (its loss-scale search) and only the loss is flagged. No host sync except inside a
    GradScaler, which reads its inf check on the host.
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
        bad_loss = torch.zeros((), device=device)
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
            bad_loss = bad_loss + (~torch.isfinite(loss.detach())).float()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        metrics.grad_norm_sum.add_(grad_norm.detach())
        if scaler is not None:
            metrics.add_nonfinite(bad_loss)
            scaler.step(optimizer)
            scaler.update()
        else:
            # Decided on the (all-reduced) gradient norm alone, so that every DDP rank skips the same steps.
            skip = (~torch.isfinite(grad_norm.detach())).float()
            metrics.add_nonfinite(bad_loss + skip)
            step_unless(optimizer, params, skip)

    return step


def step_unless(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], skip: torch.Tensor) -> None:
    """`optimizer.step()`, without any effect when `skip` (0-dim float32 on the device, 1.0 or 0.0) is 1.

    No host read on the fused path. A fused optimizer (what make_optimizer builds on CUDA and CPU) takes `skip`
    as its `found_inf`, the GradScaler protocol: the kernel leaves weights and moments alone and the step count
    is put back. Any other optimizer is stepped, then its weights and tensor state are put back with
    torch.where (state created by this step goes back to zeros: a fresh AdamW state).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    with torch.no_grad():
        before = {p: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
                                           if torch.is_tensor(v)}) for p in params}
        optimizer.step()
        for param, (weights, state) in before.items():
            param.copy_(torch.where(skip.to(param.device) > 0, weights, param))
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    old = state.get(key, torch.zeros_like(value))
                    value.copy_(torch.where(skip.to(value.device) > 0, old, value))


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


def _prepare_data(cfg: TrainConfig, dist: DistInfo, resume_path: Path | None = None):
    """Scan and split the dataset (a fresh run) or take the split of the first start from the run's manifest
    (a resumed run), and write the manifest on rank 0; every rank gets the same records."""
    from cxr.dataset import drop_duplicates, scan_dataset, split_holdout, write_manifest

    result = None
    if dist.is_main:
        dropped, deduplicated = None, None
        if resume_path is not None:
            train_records, val_records, dropped, deduplicated = _split_of_first_start(cfg, Path(resume_path))
            records = train_records + val_records
        else:
            records = scan_dataset(
                cfg.dataset_dir, cfg.file_list, min_image_size=cfg.min_image_size, skip_bad_images=cfg.skip_bad_images,
                max_images=cfg.max_images, seed=cfg.seed, num_workers=cfg.resolved_num_workers,
            )
            if cfg.exclude_duplicates is not None:
                records, deduplicated = drop_duplicates(records, cfg.exclude_duplicates)
            train_records, val_records = split_holdout(records, val_fraction=cfg.val_fraction, val_count=cfg.val_count,
                                                       seed=cfg.seed)
        check_free_space(cfg, len(records))
        extra = {name: value for name, value in to_dict(cfg).items() if name in result_flags(TrainConfig)}
        manifest_sha = write_manifest(Path(cfg.output_dir) / "manifest.json", train_records, val_records, extra,
                                      dropped, deduplicated)
        result = (train_records, val_records, manifest_sha)
    return _broadcast_object(result, dist)


def _split_of_first_start(cfg: TrainConfig, resume_path: Path):
    """(train, val, dropped, deduplicated) of a resumed run: the split recorded in the manifest of the run the checkpoint belongs
    to, never re-drawn, so no image moves between the splits. Images missing or changed since are an error naming
    them, or with --skip_bad_images left out of both splits with a warning (listed under `dropped`)."""
    from cxr.dataset import DatasetError, check_unchanged, read_manifest, records_from_manifest

    manifest_path = resume_path.parent.parent / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {resume_path}: the run's manifest {manifest_path} is missing; it records the "
            "train/held-out split fixed at the run's first start, which a resumed run keeps. Restore it, or start a "
            "new run (without --resume_from_checkpoint) in another --output_dir"
        )
    manifest = read_manifest(manifest_path)
    splits = {name: records_from_manifest(manifest, name, dataset_dir=cfg.dataset_dir) for name in ("train", "val")}
    changed = [(name, record, reason) for name in splits
               for record, reason in check_unchanged(splits[name], cfg.resolved_num_workers)]
    dropped = list(manifest.get("dropped", []))
    if changed:
        listed = "\n".join(f"  {record.relpath} ({'held-out' if name == 'val' else 'training'} image): {reason}"
                           for name, record, reason in changed[:50])
        listed += f"\n  ... and {len(changed) - 50} more" if len(changed) > 50 else ""
        head = (f"--resume_from_checkpoint: {len(changed)} image(s) of the run's train/held-out split ({manifest_path}, "
                f"fixed at its first start) are missing or changed since:\n{listed}\n")
        if not cfg.skip_bad_images:
            raise DatasetError(head + "Restore them (the manifest records each file's size and sha256), or pass "
                               "--skip_bad_images to continue without them (they are left out of both splits, never "
                               "moved from one to the other), or start a new run in another --output_dir")
        warnings.warn(head + "--skip_bad_images: continuing without them (left out of both splits and listed under "
                      "`dropped` in manifest.json); the data order differs from the original run from here on",
                      stacklevel=2)
        gone = {(name, record.relpath) for name, record, _ in changed}
        splits = {name: [r for r in records if (name, r.relpath) not in gone] for name, records in splits.items()}
        dropped += [{"relpath": record.relpath, "sha256": record.sha256, "split": name, "reason": reason}
                    for name, record, reason in changed]
        if not splits["train"]:
            raise DatasetError(f"--resume_from_checkpoint: no training image of {manifest_path} is left; restore "
                               "the images, or start a new run in another --output_dir")
    print(f"[cxr] resuming with the split of the first start ({manifest_path}): {len(splits['train'])} training, "
          f"{len(splits['val'])} held-out images", file=sys.stderr)
    return splits["train"], splits["val"], dropped, manifest.get("deduplicated")


def _build_caches(cfg: TrainConfig, dist: DistInfo, vae, train_records, val_records, device):
    """Latent caches of both splits; rank 0 builds them, the other ranks wait and then load them."""
    from cxr.latents import build_or_load_latent_cache

    # Every flag declared cache=True goes to the cache (which keys on what it is given); the model id and
    # revision travel as one `vae_id`, the name the key has always used for them.
    settings = {name: getattr(cfg, name) for name in cache_flags(TrainConfig)}
    settings["vae_id"] = f"{settings.pop('model_id')}@{settings.pop('revision') or 'main'}"
    common = dict(settings, cache_dir=cfg.resolved_cache_dir, device=device, batch_size=cfg.encode_batch_size,
                  num_workers=cfg.resolved_num_workers)
    caches = None
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            train_cache = build_or_load_latent_cache(train_records, vae, **common)
            val_cache = None
            if val_records:  # the held-out images are never mirrored
                val_cache = build_or_load_latent_cache(val_records, vae, **{**common, "random_flip": False})
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
    if cfg.cuda_graph and cfg.gradient_checkpointing:
        # Checkpointing stashes and restores the CUDA RNG state inside the captured region, which graph capture
        # does not support in the torch versions we run (pytorch/pytorch#162504); untested on a GPU, so refused.
        raise TrainingError("--cuda_graph: cannot be combined with --gradient_checkpointing (activation "
                            "checkpointing is not graph-safe in this PyTorch); drop one of them: "
                            "--gradient_checkpointing to save memory, --cuda_graph for speed")
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


# Result flags the adapter header records from the weights themselves (cxr.rank, cxr.alpha, cxr.targets).
_HEADER_FROM_WEIGHTS = ("lora_rank", "lora_alpha", "lora_targets")


def _adapter_metadata(cfg: TrainConfig, step: int, manifest_sha: str, prediction_type: str) -> dict[str, str]:
    """Every result flag (as `str(value)`, None as ""), under the names sample.py and users read: the model id
    as `base_model` (resolved), the prediction type as resolved from the base scheduler when the flag is empty."""
    from cxr.models import resolve_model_id

    metadata = {name: "" if value is None else str(value) for name, value in to_dict(cfg).items()
                if name in result_flags(TrainConfig) and name not in _HEADER_FROM_WEIGHTS}
    metadata["base_model"] = resolve_model_id(metadata.pop("model_id"))
    metadata.update(prediction_type=prediction_type, steps=str(step), manifest_sha256=manifest_sha,
                    cxr_version=__version__)
    return metadata


def train(cfg: TrainConfig, *, stop_after_steps: int | None = None) -> dict:
    """Run (or resume) LoRA training as configured; returns a summary dict.

    `stop_after_steps` behaves like a SIGTERM arriving after that many steps (checkpoint, export, return): for
    tests and for simulating preemption. SIGINT/SIGTERM received at any time (model loading included) stop
    the run after the next step with a checkpoint. Raises TrainingError (and subclasses), CheckpointError,
    DatasetError, AdapterError with messages that name the flag or file at fault.
    """
    with StopFlag() as stop, contextlib.ExitStack() as held:  # `held`: the output folder's lock, released on exit
        return _train(cfg, stop, stop_after_steps, held)


STALE_TEMP_AGE_S = 3600  # temporary files in --cache_dir (may be shared by runs) are removed only this old


def _claim_output_dir(cfg: TrainConfig, dist: DistInfo, checkpoints_dir: Path, held: contextlib.ExitStack):
    """Before the scan and the model load: rank 0 locks --output_dir for the run's life (released by `held`),
    removes temporary files killed runs left there, checks --resume_from_checkpoint, and refuses to start over an
    earlier run's checkpoints/adapter (or moves them aside with --overwrite_output_dir). Returns the checkpoint to
    resume from (None: step 0); every rank gets the same result or the same error."""
    from cxr.checkpoint import CheckpointError

    resume_path, error = None, None
    if dist.is_main:
        try:
            resume_path = _claim_output_dir_main(cfg, checkpoints_dir, held)
        except (TrainingError, CheckpointError) as caught:
            error = caught
    shared = _broadcast_object((None if resume_path is None else str(resume_path),
                                None if error is None else str(error)), dist)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise TrainingError(shared[1])
    return None if shared[0] is None else Path(shared[0])


def _claim_output_dir_main(cfg: TrainConfig, checkpoints_dir: Path, held: contextlib.ExitStack) -> Path | None:
    from cxr import runlock
    from cxr.checkpoint import FILES, MARKER, resolve_resume

    output_dir = Path(cfg.output_dir)
    try:
        lock = runlock.acquire(output_dir, flag="--output_dir")
    except runlock.RunLockError as error:
        raise TrainingError(str(error)) from None
    except OSError as error:
        raise TrainingError(f"--output_dir: cannot create the lock file in {output_dir} ({error.strerror or error}); "
                            "choose a folder you can write to") from None
    held.callback(lock.release)
    _remove_stale_temp_files(cfg)

    resume_path = None
    if cfg.resume_from_checkpoint:
        given = Path(cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint != "latest" and given.is_dir() and not any((given / n).exists() for n in (*FILES, MARKER)):
            raise TrainingError(f"--resume_from_checkpoint: {given} is not a checkpoint folder (it has none of "
                                f"{MARKER}, {', '.join(FILES)}); give `latest` or a folder "
                                f"{checkpoints_dir}/checkpoint-<step>")
        resume_path = resolve_resume(cfg.resume_from_checkpoint, checkpoints_dir)
    continues_here = resume_path is not None and os.path.realpath(resume_path.parent) == os.path.realpath(checkpoints_dir)
    earlier = [] if continues_here else runlock.previous_run_files(output_dir)
    if not earlier:
        return resume_path
    listed = ", ".join(earlier[:6]) + (f" and {len(earlier) - 6} more" if len(earlier) > 6 else "")
    if cfg.overwrite_output_dir:
        keep = () if not _is_inside(cfg.resolved_cache_dir, output_dir) else (
            Path(os.path.relpath(os.path.realpath(cfg.resolved_cache_dir), os.path.realpath(output_dir))).parts[0],)
        moved = runlock.move_previous_run(output_dir, keep=keep)
        warnings.warn(f"--overwrite_output_dir: the earlier run in {output_dir} ({listed}) was moved to {moved}; "
                      "delete that folder when you no longer need it", stacklevel=2)
        return resume_path
    if resume_path is not None:
        why = f"this run resumes from {resume_path}, a checkpoint of another folder, but {output_dir} holds"
    elif cfg.resume_from_checkpoint:
        why = (f"--resume_from_checkpoint latest found no complete checkpoint in {checkpoints_dir} (see the warnings "
               f"above), but {output_dir} holds")
    else:
        why = f"this is a fresh run (no --resume_from_checkpoint) but {output_dir} holds"
    raise TrainingError(
        f"--output_dir: {why} an earlier run's files ({listed}). Starting over them would mix two runs (checkpoint "
        "rotation would delete the new checkpoints, `latest` would pick the old run). Continue that run with "
        "--resume_from_checkpoint latest, write this run to another --output_dir, or pass --overwrite_output_dir to "
        f"move the earlier run into {output_dir}/{runlock.PREVIOUS_RUN_PREFIX}<time>/ (nothing is deleted)"
    )


def _is_inside(path: Path, folder: Path) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def _remove_stale_temp_files(cfg: TrainConfig) -> None:
    """Delete the temporary files killed runs left (see cxr.runlock.stale_temp_files): in --output_dir, which this
    run holds the lock of, every stale one; in --cache_dir, which other runs may share, only those untouched for
    STALE_TEMP_AGE_S."""
    from cxr.runlock import remove_files, stale_temp_files

    output_dir, cache_dir = Path(cfg.output_dir), cfg.resolved_cache_dir
    found = stale_temp_files(output_dir, unnamed=True, skip=(cache_dir,))
    found += stale_temp_files(cache_dir, unnamed=True, min_age_s=STALE_TEMP_AGE_S)
    if found:
        freed = remove_files(found)
        print(f"[cxr] removed {len(found)} temporary file(s) ({freed / 2**20:.1f} MiB) that a killed run left: "
              + ", ".join(str(p) for p in found[:10]) + (" ..." if len(found) > 10 else ""), file=sys.stderr)


def _train(cfg: TrainConfig, stop: StopFlag, stop_after_steps: int | None, held: contextlib.ExitStack) -> dict:
    from cxr import ddpm
    from cxr.checkpoint import (NonFiniteError, capture_rng_state, find_latest_checkpoint, load_checkpoint,
                                mark_nonfinite, restore_rng_state, save_checkpoint)
    from cxr.latents import encode_prompt
    from cxr.adapter_files import save_adapter
    from cxr.lora import lora_parameters, lora_state_dict, load_lora_state_dict
    from cxr.tblog import config_markdown, image_grid, make_writer, new_run_name
    from tqdm.auto import tqdm

    dist, device = setup_device_and_distributed(cfg.device, cfg.ddp_timeout_minutes)
    _check_flags_for_device(cfg, device, dist)
    output_dir = Path(cfg.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    if dist.is_main:
        check_writable(output_dir, "--output_dir")
        check_writable(cfg.resolved_cache_dir, "--cache_dir")
        check_writable(cfg.resolved_logging_dir, "--logging_dir")
    resume_target = _claim_output_dir(cfg, dist, checkpoints_dir, held)
    dtype = compute_dtype(cfg.mixed_precision)
    autocast_dtype = None if cfg.mixed_precision == "no" else dtype

    train_records, val_records, manifest_sha = _prepare_data(cfg, dist, resume_target)
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
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    if cfg.cuda_graph:  # graph capture tracks the default CUDA generator's offsets by itself
        generator = torch.cuda.default_generators[device.index or 0]
        generator.manual_seed(cfg.seed)
    else:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    data = DataOrder(latents_mean.shape[0], batch_size=cfg.train_batch_size, grad_accum_steps=cfg.grad_accum_steps,
                     dist=dist, seed=cfg.seed, device=device)

    start_step = 0
    run_name = None
    resume_path = resume_target  # resolved (and checked) once, under the output folder's lock
    if cfg.resume_from_checkpoint and resume_path is None and dist.is_main:
        warnings.warn(f"--resume_from_checkpoint latest: no complete checkpoint in {checkpoints_dir}; starting from step 0")
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, device)
        load_lora_state_dict(unet, checkpoint.lora)
        load_optimizer_state(optimizer, checkpoint.optimizer["optimizer"])
        if scaler is not None and checkpoint.optimizer.get("scaler"):
            scaler.load_state_dict(checkpoint.optimizer["scaler"])
        restore_rng_state(checkpoint.rng, {"noise": generator})
        data.load_state(checkpoint.state["data"])
        start_step = checkpoint.step
        run_name = checkpoint.state.get("run_name")  # a resume appends to its run's TensorBoard folder
        changed = changed_result_flags(checkpoint.state.get("config", {}), cfg)
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

    # One TensorBoard folder per run; a resume appends to its run's folder, hiding what an interrupted part
    # logged after the checkpoint it resumes from.
    run_name = run_name or new_run_name(output_dir, cfg.resolved_logging_dir)
    run_dir = cfg.resolved_logging_dir / run_name
    new_run = not run_dir.is_dir() or not any(run_dir.glob("events.out.tfevents.*"))
    writer = make_writer(run_dir, dist.rank, purge_step=None if new_run else start_step + 1)
    if new_run:
        hparams = {name: value for name, value in to_dict(cfg).items() if name in result_flags(TrainConfig)}
        hparams.update(prediction_type=schedule.prediction_type, world_size=dist.world_size)
        writer.add_hparams_start(hparams)
    run_versions = versions()
    if dist.is_main:
        resolved = {"prediction_type": schedule.prediction_type, "global_batch": data.rows_per_step,
                    "steps_per_epoch": data.steps_per_epoch, "device": str(device), "tensorboard_run": str(run_dir)}
        save_json(cfg, output_dir / "config.json", {"versions": run_versions, "world_size": dist.world_size,
                                                   "resolved": resolved, "lora_paths": lora_paths,
                                                   "manifest_sha256": manifest_sha})
        writer.add_text("config", config_markdown(to_dict(cfg), run_versions), start_step)

    summary = {"output_dir": str(output_dir), "start_step": start_step, "steps": start_step, "interrupted": False,
               "signal": None, "val_losses": [], "checkpoint": None, "adapter": [], "manifest_sha256": manifest_sha,
               "train_images": len(train_records), "val_images": len(val_records), "world_size": dist.world_size,
               "tensorboard_run": str(run_dir)}

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
            writer.add_image("val/samples", image_grid(samples, gap=VALIDATION_GRID_GAP), step)
        writer.flush()
        unet.train()

    # This run's checkpoints (and the one it resumed from) by step, and the step of the adapter in lora_unet/
    # (on a resume: the resumed step's, as `latest` left it): after a NaN/inf, the ones whose weights led there
    # are marked so that `latest` never picks them, and the adapter is re-exported.
    session_checkpoints = {start_step: resume_path} if resume_path is not None else {}
    exported = {"step": start_step if resume_path is not None else None}

    def check_finite(step: int, read: dict, window: int) -> None:
        if read["nonfinite"]:
            first_bad = step - window + read["finite_steps"] + 1
            stop_nonfinite(first_bad, f"the training loss or gradient norm became NaN/inf at step {first_bad} (found "
                           f"by the check of steps {step - window + 1}-{step}, before step {step} was saved or "
                           f"logged; read every --log_every={cfg.log_every} steps and at checkpoints); no update "
                           "with a NaN/inf gradient was applied")

    def stop_nonfinite(first_bad: int, what: str) -> None:
        """Raise NonFiniteLossError; on rank 0 first mark the checkpoints of weights that did not give a finite
        loss and gradient at the next step (the step of weights W_s is s + 1, so only those of step
        <= first_bad - 2 are trusted), and re-export the adapter from the newest trusted checkpoint."""
        notes = []
        if dist.is_main:
            for saved_step, path in sorted(session_checkpoints.items()):
                if saved_step > first_bad - 2 and path.is_dir():
                    mark_nonfinite(path, f"its weights gave a NaN/inf loss or gradient at step {first_bad}")
                    notes.append(f"{path} is marked NONFINITE (kept, never resumed from).")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the folders just marked: the message says so
                keep = find_latest_checkpoint(checkpoints_dir)
            if keep is None:
                notes.append(f"No checkpoint in {checkpoints_dir} can be resumed from: "
                             "--resume_from_checkpoint latest starts from step 0.")
            else:
                notes.append(f"--resume_from_checkpoint latest resumes from {keep}.")
            if exported["step"] is not None and exported["step"] > first_bad - 2:
                adapter_dir = output_dir / "lora_unet"
                if keep is not None:
                    checkpoint = load_checkpoint(keep, device)
                    load_lora_state_dict(unet, checkpoint.lora)
                    save_adapter(unet, adapter_dir, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                 targets=cfg.lora_target_list, export_format=cfg.export_format,
                                 metadata=_adapter_metadata(cfg, checkpoint.step, manifest_sha, schedule.prediction_type))
                    notes.append(f"{adapter_dir} was re-exported from it.")
                else:
                    notes.append(f"{adapter_dir} holds the weights of step {exported['step']}, which gave NaN/inf "
                                 "afterwards: do not use it.")
        raise NonFiniteLossError(
            f"{what}. {' '.join(notes)} Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, a "
            f"smaller --max_grad_norm, and check the images listed in {output_dir / 'manifest.json'}; then "
            "--resume_from_checkpoint latest"
        )

    def save(step: int) -> None:
        """Checkpoint + export (rank 0); refuses to save weights that went non-finite."""
        if not dist.is_main:
            return
        from safetensors import SafetensorError

        writing = f"checkpoint {step} to {checkpoints_dir}"
        try:
            path = save_checkpoint(
                checkpoints_dir, step, lora=lora_state_dict(unet),
                optimizer={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {}},
                rng=capture_rng_state({"noise": generator}),
                state={"data": data.state(), "lr_schedule": {"kind": cfg.lr_scheduler, "base_lr": cfg.learning_rate,
                       "warmup_steps": cfg.lr_warmup_steps, "total_steps": cfg.max_train_steps},
                       "world_size": dist.world_size, "config": to_dict(cfg), "run_name": run_name},
                total_limit=cfg.checkpoints_total_limit,
            )
            session_checkpoints[step] = path
            writing = f"the adapter of step {step} to {output_dir / 'lora_unet'}"
            summary["adapter"] = [str(p) for p in save_adapter(
                unet, output_dir / "lora_unet", rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                targets=cfg.lora_target_list, metadata=_adapter_metadata(cfg, step, manifest_sha, schedule.prediction_type),
                export_format=cfg.export_format)]
            exported["step"] = step
        except NonFiniteError as error:  # finite loss up to `step`, yet the weights after it are not
            stop_nonfinite(step + 1, f"the LoRA weights or optimizer state became NaN/inf at step {step} ({error})")
        except (OSError, SafetensorError) as error:  # a full disk: OSError, or safetensors' own error type
            raise TrainingError(
                f"--output_dir: writing {writing} failed "
                f"({getattr(error, 'strerror', None) or error}); "
                "the previous checkpoints are intact. Free disk space, then --resume_from_checkpoint latest"
            ) from error
        summary["checkpoint"] = str(path)

    if cfg.cuda_graph and start_step < cfg.max_train_steps:
        position = data.state()
        example = data.next_indices()
        data.load_state(position)
        step_fn = capture_cuda_graph(step_fn, example, params=params, optimizer=optimizer, metrics=metrics,
                                     generator=generator)

    if start_step < cfg.max_train_steps and dist.is_main:
        run_validation(start_step, images=start_step == 0)  # the baselines: val/loss, and the grid before training
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
            window = metrics.steps
            read = metrics.read(dist, extra_flag=stop_requested)  # host sync: only here
            check_finite(step, read, window)
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
        writer.add_hparams_end()
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

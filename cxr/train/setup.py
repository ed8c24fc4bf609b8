"""Everything before a training run's first step: `setup(cfg, held) -> TrainRun`, what the run holds.

setup(cfg, held)
  the device and the DDP process group; --cuda_graph checked against them       cxr.runtime, cxr.train.step_graph
  the output folder claimed (writable, locked), the checkpoint to resume,
  an earlier run in the folder kept apart                                       cxr.train.rundir
  the train/held-out split and the manifest (rank 0)                            cxr.data.runsplit
  the base model with LoRA, the prompt embeddings, the latent caches            cxr.model.loading, cxr.data.latents
  the step and its data order                                                   cxr.train.step
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cxr.config import TrainConfig
from cxr.data import latents, runsplit
from cxr.data.manifestcheck import split_sha256
from cxr.model import ddpm, loading
from cxr.model.lora import lora_parameters
from cxr.privacy.watch import MemorizationWatch, build_watch
from cxr.runpaths import RunPaths
from cxr.runtime import (
    DistInfo,
    broadcast_object,
    compute_dtype,
    setup_device_and_distributed,
    warn_on_main,
    wrap_ddp,
)
from cxr.train.checkpoint import RunCheckpoints, read_state
from cxr.train.rundir import check_free_space, claim_output_dir, find_resume_checkpoint, keep_earlier_run_apart
from cxr.train.step import DataOrder, TrainStep, configure_cuda
from cxr.train.step_graph import check_cuda_graph_flag
from cxr.train.tblog import NullWriter
from cxr.train.validation import fixed_validation_inputs


@dataclass(frozen=True)
class RunModel:
    """The model side of a run, fixed once set up."""

    unet: torch.nn.Module  # the plain UNet with LoRA (checkpoints and exports are saved from it)
    vae: torch.nn.Module | None  # kept (float32) only where the validation grid is drawn
    tokenizer: object
    scheduler_config: dict
    schedule: ddpm.Schedule
    lora_paths: list[str]
    prompt_embeds: torch.Tensor  # float32; the step and the held-out loss use it in the compute dtype
    negative_embeds: torch.Tensor


@dataclass(frozen=True)
class RunImages:
    """The run's images: its split, the sha256 of the manifest recording it, the fixed held-out inputs."""

    train: list
    val: list
    manifest_sha: str
    split_sha: str  # the split's sha256 (cxr.data.manifestcheck), recorded in every checkpoint
    val_inputs: tuple | None  # fixed held-out (x0, noise, timesteps), rank 0 only


@dataclass(kw_only=True)
class TrainRun:
    """What one training run holds: built by setup(), moved on by resume() and the loop."""

    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    model: RunModel
    images: RunImages
    data: DataOrder  # which cache rows each step uses, and the position in that order
    step: TrainStep
    checkpoints: RunCheckpoints  # the one resumed from, the ones saved, the step of the exported adapter
    start_step: int = 0
    run_name: str | None = None  # the TensorBoard run folder's name
    writer: object = field(default_factory=NullWriter)
    summary: dict = field(default_factory=dict)
    watch: MemorizationWatch | None = None  # rank 0, with --memorization_samples (cxr.privacy.watch)

    @property
    def paths(self) -> RunPaths:
        return self.cfg.run_paths


def setup(cfg: TrainConfig, held: contextlib.ExitStack) -> TrainRun:
    """Everything before the first step. `held` keeps the output folder's lock until the run ends."""
    dist, device = setup_device_and_distributed(cfg.device, cfg.ddp_timeout_minutes)
    check_cuda_graph_flag(cfg, device, dist)
    configure_cuda(device, cfg.tf32)
    claim_output_dir(cfg, dist, held)
    resume_path = find_resume_checkpoint(cfg, dist)
    keep_earlier_run_apart(cfg, dist, resume_path)
    train_records, val_records, manifest_sha, split_sha = prepare_data(cfg, dist, resume_path)
    model, train_cache, val_cache = _model_and_caches(cfg, dist, device, train_records, val_records)

    latents_mean = train_cache.mean.to(device=device, dtype=torch.float32)
    latents_std = train_cache.std.to(device=device, dtype=torch.float32)
    scaling_factor = float(train_cache.scaling_factor)
    val_inputs = None
    if val_cache is not None and dist.is_main:  # rank 0 alone runs validation
        val_inputs = fixed_validation_inputs(val_cache.mean, scaling_factor, cfg.seed + 1, device)

    model.unet.train()
    ddp = wrap_ddp(model.unet, dist, device)  # None in a single process
    wrapped = model.unet if ddp is None else ddp
    if cfg.torch_compile:
        wrapped = torch.compile(wrapped)
    step = TrainStep(
        cfg,
        model=wrapped,
        params=lora_parameters(model.unet),
        schedule=model.schedule,
        latents_mean=latents_mean,
        latents_std=latents_std,
        scaling_factor=scaling_factor,
        prompt_embeds=model.prompt_embeds.to(compute_dtype(cfg.mixed_precision)),
        dist=dist,
        no_sync=ddp.no_sync if ddp is not None else None,
    )
    data = DataOrder(
        latents_mean.shape[0],
        batch_size=cfg.train_batch_size,
        grad_accum_steps=cfg.grad_accum_steps,
        dist=dist,
        seed=cfg.seed,
        device=device,
    )
    if cfg.resume_from_checkpoint and resume_path is None:
        warn_on_main(
            dist,
            f"--resume_from_checkpoint latest: no complete checkpoint in {cfg.run_paths.checkpoints}; "
            "starting from step 0",
        )
    return TrainRun(
        cfg=cfg,
        dist=dist,
        device=device,
        model=model,
        images=RunImages(train_records, val_records, manifest_sha, split_sha, val_inputs),
        data=data,
        step=step,
        checkpoints=RunCheckpoints(resumed_from=resume_path),
        watch=build_watch(cfg, train_records, val_records, device) if dist.is_main else None,
    )


def prepare_data(cfg: TrainConfig, dist: DistInfo, resume_path: Path | None = None):
    """(train records, held-out records, manifest sha256, split sha256), the same on every rank. Rank 0 draws the
    split (or, on a resume, takes the first start's: cxr.data.runsplit), checks the disks have room, writes the
    manifest."""
    result = None
    if dist.is_main:
        recorded = None if resume_path is None else read_state(resume_path).get("split_sha256")
        split = runsplit.split_for_run(cfg, resume_path, recorded)
        check_free_space(cfg, split.image_count)
        split_sha = split_sha256(split.train, split.val, split.dropped or [])
        result = (split.train, split.val, runsplit.write_run_manifest(cfg, split), split_sha)
    return broadcast_object(result, dist)


def _model_and_caches(cfg: TrainConfig, dist: DistInfo, device, train_records, val_records):
    """The model with LoRA, the prompt embeddings and both latent caches; the text encoder (and the VAE, unless
    the validation grid needs it) are freed once used."""
    components, lora_paths = loading.load_for_training(cfg, device, compute_dtype(cfg.mixed_precision))
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    scheduler_config = dict(components["scheduler"].config)
    schedule = ddpm.make_schedule(scheduler_config, device, cfg.prediction_type or None)
    # The prompt is constant: encode it once (and "" for the validation grid's guidance), then free the encoder.
    prompt_embeds = latents.encode_prompt(tokenizer, text_encoder, cfg.prompt, device).to(device)
    negative_embeds = latents.encode_prompt(tokenizer, text_encoder, "", device).to(device)
    train_cache, val_cache = latents.run_caches(cfg, dist, components["vae"], train_records, val_records, device)
    want_images = dist.is_main and cfg.validation_steps > 0 and (cfg.num_validation_images or cfg.memorization_samples)
    model = RunModel(
        unet=components["unet"],
        vae=components["vae"] if want_images else None,  # kept only for the validation samples' decode
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        schedule=schedule,
        lora_paths=lora_paths,
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
    )
    del components, text_encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, train_cache, val_cache

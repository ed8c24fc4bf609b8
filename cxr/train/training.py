"""LoRA training, top to bottom: `train(cfg) -> summary`.

    train(cfg)
      setup(cfg, held) -> TrainRun    device/DDP, output folder claim, data split, model + LoRA, latent caches,
                                      the step (cxr.train.step.TrainStep) and its data order
      resume(run, checkpoint)         LoRA, optimizer, scaler, RNG and data position of a checkpoint
      start_logging(run)              TensorBoard run folder (a resume appends to its run's), config.json
      train_loop(run, stop, ...)      the loop: step, read metrics every --log_every steps, validate, save
      save_state(run, step)           checkpoint + adapter export (rank 0)

Data flow: images -> (once) VAE posterior mean/std cached on disk and held on the device; prompt -> (once)
text-encoder embedding. Each step then only indexes the device-resident cache (see cxr.train.step). Process and
device matters (dtypes, DDP, signals, peak memory) live in cxr.runtime, the output folder's checks and lock
in cxr.train.rundir, validation in cxr.train.validation.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cxr import __version__
from cxr.config import TrainConfig, cache_flags, changed_result_flags, result_flags, save_json, to_dict
from cxr.data import dataset, latents
from cxr.data.dataset import DatasetError
from cxr.model import ddpm, loading
from cxr.model.export import RunFacts, export_adapter, usage_lines
from cxr.model.lora import AdapterError, inject_lora, load_lora_state_dict, lora_parameters, lora_state_dict
from cxr.privacy.watch import MemorizationWatch, build_watch, copy_limit_report, over_limit
from cxr.runtime import (
    DistInfo,
    StopFlag,
    TrainingError,
    autocast_dtype,
    barrier,
    broadcast_object,
    compute_dtype,
    exit_code,
    peak_memory_mib,
    setup_device_and_distributed,
    shutdown_distributed,
    warn_on_main,
)
from cxr.train.checkpoint import (
    CheckpointError,
    NonFiniteError,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    mark_nonfinite,
    restore_rng_state,
    save_checkpoint,
)
from cxr.train.rundir import check_free_space, claim_output_dir
from cxr.train.step import DataOrder, TrainStep, configure_cuda, load_optimizer_state, scheduled_lr, set_lr
from cxr.train.step_graph import check_cuda_graph_flag
from cxr.train.tblog import NullWriter, config_markdown, image_grid, make_writer, new_run_name
from cxr.train.validation import VALIDATION_GRID_GAP, fixed_validation_inputs, validation_images, validation_loss


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf; checkpoints whose weights led there are marked NONFINITE."""


# --------------------------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, *, stop_after_steps: int | None = None) -> dict:
    """Run (or resume) LoRA training as configured; returns a summary dict.

    `stop_after_steps` behaves like a SIGTERM arriving after that many steps (checkpoint, export, return): for
    tests and for simulating preemption. SIGINT/SIGTERM received at any time (model loading included) stop
    the run after the next step with a checkpoint. Raises TrainingError (and subclasses), CheckpointError,
    DatasetError, AdapterError with messages that name the flag or file at fault.
    """
    with StopFlag() as stop, contextlib.ExitStack() as held:  # `held`: the output folder's lock, released on exit
        run = setup(cfg, held)
        if run.resume_path is not None:
            resume(run, run.resume_path)
        start_logging(run)
        if run.start_step < cfg.max_train_steps:
            run.step.start_cuda_graph(run.data.peek_indices())  # --cuda_graph: replay a checked graph, or eager
        return train_loop(run, stop, stop_after_steps)


@dataclass
class TrainRun:
    """What one training run holds: built by setup(), moved on by resume() and the loop."""

    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    unet: torch.nn.Module  # the plain UNet with LoRA (checkpoints and exports are saved from it)
    vae: torch.nn.Module | None  # kept (float32) only where the validation grid is drawn
    tokenizer: object
    scheduler_config: dict
    schedule: ddpm.Schedule
    lora_paths: list[str]
    prompt_embeds: torch.Tensor  # float32; the step and the held-out loss use it in the compute dtype
    negative_embeds: torch.Tensor
    val_inputs: tuple | None  # fixed held-out (x0, noise, timesteps), rank 0 only
    data: DataOrder
    step: TrainStep
    train_records: list
    val_records: list
    manifest_sha: str
    resume_path: Path | None = None
    start_step: int = 0
    run_name: str | None = None  # the TensorBoard run folder's name
    writer: object = field(default_factory=NullWriter)
    summary: dict = field(default_factory=dict)
    # This run's checkpoints (and the one it resumed from) by step, and the step of the adapter in lora_unet/:
    # after a NaN/inf, the ones whose weights led there are marked and the adapter is re-exported.
    checkpoints: dict[int, Path] = field(default_factory=dict)
    exported_step: int | None = None
    watch: MemorizationWatch | None = None  # rank 0, with --memorization_samples (cxr.privacy.watch)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.cfg.mixed_precision)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.cfg.mixed_precision)


def setup(cfg: TrainConfig, held: contextlib.ExitStack) -> TrainRun:
    """Everything before the first step. `held` keeps the output folder's lock until the run ends."""
    dist, device = setup_device_and_distributed(cfg.device, cfg.ddp_timeout_minutes)
    check_cuda_graph_flag(cfg, device, dist)
    configure_cuda(device, cfg.tf32)
    output_dir = Path(cfg.output_dir)
    resume_path = claim_output_dir(cfg, dist, output_dir / "checkpoints", held)
    dtype = compute_dtype(cfg.mixed_precision)
    train_records, val_records, manifest_sha = _prepare_data(cfg, dist, resume_path)
    components, lora_paths = _load_model(cfg, device, dtype)
    unet, tokenizer = components["unet"], components["tokenizer"]
    scheduler_config = dict(components["scheduler"].config)
    schedule = ddpm.make_schedule(scheduler_config, device, cfg.prediction_type or None)

    # The prompt is constant: encode it once (and "" for the validation grid's guidance), then free the encoder.
    prompt_embeds = latents.encode_prompt(tokenizer, components["text_encoder"], cfg.prompt, device).to(device)
    negative_embeds = latents.encode_prompt(tokenizer, components["text_encoder"], "", device).to(device)
    train_cache, val_cache = _build_caches(cfg, dist, components["vae"], train_records, val_records, device)
    validates = dist.is_main  # rank 0 alone runs validation
    want_images = validates and cfg.validation_steps > 0 and (cfg.num_validation_images or cfg.memorization_samples)
    vae = components["vae"] if want_images else None  # kept only for the validation samples' decode
    watch = build_watch(cfg, train_records, val_records, device) if validates else None
    del components
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    latents_mean = train_cache.mean.to(device=device, dtype=torch.float32)
    latents_std = train_cache.std.to(device=device, dtype=torch.float32)
    scaling_factor = float(train_cache.scaling_factor)
    val_inputs = None
    if val_cache is not None and validates:
        val_inputs = fixed_validation_inputs(val_cache.mean, scaling_factor, cfg.seed + 1, device)

    unet.train()
    model, ddp = unet, None
    if dist.enabled:
        ddp = DistributedDataParallel(
            unet,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,
        )
        model = ddp
    if cfg.torch_compile:
        model = torch.compile(model)
    step = TrainStep(
        cfg,
        model=model,
        params=lora_parameters(unet),
        schedule=schedule,
        latents_mean=latents_mean,
        latents_std=latents_std,
        scaling_factor=scaling_factor,
        prompt_embeds=prompt_embeds.to(dtype),
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
            f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir / 'checkpoints'}; "
            "starting from step 0",
        )
    return TrainRun(
        cfg,
        dist,
        device,
        unet,
        vae,
        tokenizer,
        scheduler_config,
        schedule,
        lora_paths,
        prompt_embeds,
        negative_embeds,
        val_inputs,
        data,
        step,
        train_records,
        val_records,
        manifest_sha,
        resume_path,
        watch=watch,
    )


def resume(run: TrainRun, path: Path) -> None:
    """Continue from checkpoint `path` exactly: LoRA, optimizer (this run's settings), scaler, RNG, data position."""
    checkpoint = load_checkpoint(path, run.device)
    load_lora_state_dict(run.unet, checkpoint.lora)
    load_optimizer_state(run.step.optimizer, checkpoint.optimizer["optimizer"])
    if run.step.scaler is not None and checkpoint.optimizer.get("scaler"):
        run.step.scaler.load_state_dict(checkpoint.optimizer["scaler"])
    # A dropout stream the checkpoint lacks (its run trained without dropout) starts from its seed; the noise
    # stream is always there.
    saved = checkpoint.rng["generators"]
    restore_rng_state(checkpoint.rng, {n: g for n, g in run.step.generators.items() if n == "noise" or n in saved})
    run.data.load_state(checkpoint.state["data"])
    run.start_step = run.exported_step = checkpoint.step  # lora_unet/ holds this step's adapter, as `latest` left it
    run.checkpoints[checkpoint.step] = path
    run.run_name = checkpoint.state.get("run_name")  # a resume appends to its run's TensorBoard folder
    changed = changed_result_flags(checkpoint.state.get("config", {}), run.cfg)
    if checkpoint.state.get("world_size") != run.dist.world_size:
        changed.append("the number of processes")
    if changed:
        warn_on_main(
            run.dist,
            f"--resume_from_checkpoint {path}: {', '.join(changed)} differ from the checkpoint's "
            "run; training continues, but not exactly as the original run would have",
        )


def start_logging(run: TrainRun) -> None:
    """One TensorBoard folder per run (a resume appends to its run's folder, hiding what an interrupted part
    logged after the checkpoint it resumes from); config.json; the summary train() returns."""
    cfg, dist = run.cfg, run.dist
    run.run_name = run.run_name or new_run_name(run.output_dir, cfg.resolved_logging_dir)
    run_dir = cfg.resolved_logging_dir / run.run_name
    new_run = not run_dir.is_dir() or not any(run_dir.glob("events.out.tfevents.*"))
    run.writer = make_writer(run_dir, dist.rank, purge_step=None if new_run else run.start_step + 1)
    if new_run:
        hparams = {name: value for name, value in to_dict(cfg).items() if name in result_flags(TrainConfig)}
        hparams.update(prediction_type=run.schedule.prediction_type, world_size=dist.world_size)
        run.writer.add_hparams_start(hparams)
    run_versions = versions()
    if dist.is_main:
        resolved = {
            "prediction_type": run.schedule.prediction_type,
            "global_batch": run.data.rows_per_step,
            "steps_per_epoch": run.data.steps_per_epoch,
            "device": str(run.device),
            "tensorboard_run": str(run_dir),
        }
        save_json(
            cfg,
            run.output_dir / "config.json",
            {
                "versions": run_versions,
                "world_size": dist.world_size,
                "resolved": resolved,
                "lora_paths": run.lora_paths,
                "manifest_sha256": run.manifest_sha,
            },
        )
    run.writer.add_text("config", config_markdown(to_dict(cfg), run_versions), run.start_step)
    if run.watch is not None:
        run.writer.add_text("privacy/calibration", run.watch.calibration_text(), run.start_step)
    run.summary = {
        "output_dir": str(run.output_dir),
        "start_step": run.start_step,
        "steps": run.start_step,
        "interrupted": False,
        "signal": None,
        "val_losses": [],
        "checkpoint": None,
        "adapter": [],
        "manifest_sha256": run.manifest_sha,
        "train_images": len(run.train_records),
        "val_images": len(run.val_records),
        "world_size": dist.world_size,
        "tensorboard_run": str(run_dir),
    }


def train_loop(run: TrainRun, stop: StopFlag, stop_after_steps: int | None) -> dict:
    """Steps from run.start_step to --max_train_steps; metrics are read (the only host sync) at log and checkpoint
    steps, where the ranks also agree on stopping; checkpoints at --checkpointing_steps and on a stop."""
    cfg, dist, metrics = run.cfg, run.dist, run.step.metrics
    if run.start_step < cfg.max_train_steps:
        validate(run, run.start_step, images=run.start_step == 0)  # the baselines: val/loss, the grid before training
    progress = tqdm(
        total=cfg.max_train_steps, initial=run.start_step, disable=not dist.is_main, desc="train", dynamic_ncols=True
    )
    clock = _Throughput(run.data.rows_per_step)
    step = run.start_step
    signalled = stop.signal_name is not None
    if dist.enabled:
        signalled = metrics.read(dist, extra_flag=signalled)["flag"]
    if signalled:  # signalled during setup: nothing new to save, leave at once
        run.summary.update(interrupted=True, signal=stop.signal_name or "SIGTERM")
        return _close(run, progress)
    while step < cfg.max_train_steps:
        set_lr(run.step.optimizer, scheduled_lr(cfg, step))
        run.step(run.data.next_indices())
        metrics.steps += 1
        step += 1
        clock.tick()
        progress.update(1)
        stop_requested = stop.signal_name is not None or (stop_after_steps is not None and step >= stop_after_steps)
        log_due = step % cfg.log_every == 0 or step == cfg.max_train_steps
        checkpoint_due = step == cfg.max_train_steps or (
            cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0
        )
        if dist.enabled and not (log_due or checkpoint_due):
            stop_requested = False  # ranks agree on stopping at the next log or checkpoint step
        if log_due or checkpoint_due or stop_requested:
            window = metrics.steps
            read = metrics.read(dist, extra_flag=stop_requested)  # host sync: only here
            _check_finite(run, step, read, window)
            stop_requested = read["flag"]
            if log_due:
                _log_train(run, step, read, clock.measure(), progress)
        # The last step is validated here, before its checkpoint, so the checkpoint holds its own watch figures.
        validation_due = step == cfg.max_train_steps or (cfg.validation_steps and step % cfg.validation_steps == 0)
        if validation_due:
            validate(run, step, images=True)
            clock.restart()
        copying = validation_due and _copying(run, step)
        if checkpoint_due or stop_requested or copying:
            save_state(run, step)
            barrier(dist)
            clock.restart()
        if copying:
            _stop_copying(run, step)
            break
        if stop_requested:
            run.summary.update(interrupted=True, signal=stop.signal_name or "stop_after_steps")
            break
    _finish(run, step, clock)
    return _close(run, progress)


def _finish(run: TrainRun, step: int, clock: _Throughput) -> None:
    """After the last step (or a stop): the final validation and HParams, the summary and summary.json."""
    wall = clock.overall()  # from the first step to the last, periodic validation and checkpoints included
    if step >= run.cfg.max_train_steps:
        if step == run.start_step:  # resumed from a finished run: just (re-)export (the loop validated the others)
            save_state(run, step)
            validate(run, step, images=True)
        run.writer.add_hparams_end()
    if run.watch is not None:
        if run.cfg.stop_on_copy_rate is not None and not run.watch.limit and run.dist.is_main:
            print(copy_limit_report(run.watch, run.checkpoints_dir, run.cfg.stop_on_copy_rate), file=sys.stderr)
        run.summary["memorization"] = run.watch.summary()
    run.summary.update(
        steps=step,
        images_per_s=clock.last,
        images_per_s_wall=wall,
        peak_memory_mib=peak_memory_mib(run.device),
    )
    if run.summary["val_losses"]:
        run.summary["val_loss_initial"] = run.summary["val_losses"][0][1]
        run.summary["val_loss_final"] = run.summary["val_losses"][-1][1]
    if run.dist.is_main:
        (run.output_dir / "summary.json").write_text(json.dumps(run.summary, indent=2, default=str) + "\n")


def _log_train(run: TrainRun, step: int, read: dict, images_per_s: tuple[float, float], progress) -> None:
    steps_only, wall = images_per_s
    for tag, value in (
        ("train/loss", read["loss"]),
        ("train/grad_norm", read["grad_norm"]),
        ("train/lr", scheduled_lr(run.cfg, step - 1)),
        ("train/images_per_s", steps_only),
        ("train/images_per_s_wall", wall),
        ("memory/peak_mib", peak_memory_mib(run.device)),
    ):
        run.writer.add_scalar(tag, value, step)
    progress.set_postfix(loss=f"{read['loss']:.4f}", img_s=f"{steps_only:.1f}")
    run.summary["final_loss"] = read["loss"]


class _Throughput:
    """Images/s since the last log, two ways: of the training steps alone (`images_per_s`: validation and
    checkpoints restart its clock, so their time is left out) and of the wall clock (`images_per_s_wall`:
    everything since the last log); `overall()` is the wall-clock figure of the whole loop."""

    def __init__(self, images_per_step: int):
        self.images_per_step, self.last = images_per_step, float("nan")
        self.loop_started = self.window_started = time.perf_counter()
        self.loop_steps = self.window_steps = 0
        self.restart()

    def tick(self) -> None:
        self.steps += 1
        self.window_steps += 1
        self.loop_steps += 1

    def restart(self) -> None:
        self.started, self.steps = time.perf_counter(), 0

    def measure(self) -> tuple[float, float]:
        """(steps only, wall clock) since the last call; both clocks restart."""
        now = time.perf_counter()
        self.last = self.steps * self.images_per_step / (now - self.started)
        wall = self.window_steps * self.images_per_step / (now - self.window_started)
        self.window_started, self.window_steps = now, 0
        self.restart()
        return self.last, wall

    def overall(self) -> float:
        elapsed = time.perf_counter() - self.loop_started
        return self.loop_steps * self.images_per_step / elapsed if self.loop_steps else float("nan")


def _close(run: TrainRun, progress) -> dict:
    progress.close()
    run.writer.close()
    barrier(run.dist)
    return run.summary


# ------------------------------------------------------------------------------ validation, checkpoints


def validate(run: TrainRun, step: int, images: bool) -> None:
    """Rank 0: the held-out loss (val/loss) and, with `images`, the sample grid (val/samples)."""
    if not run.dist.is_main:
        return
    cfg, autocast = run.cfg, run.autocast_dtype
    run.unet.eval()
    if run.val_inputs is not None:
        loss = validation_loss(
            run.unet,
            *run.val_inputs,
            run.prompt_embeds.to(run.compute_dtype),
            run.schedule,
            cfg.train_batch_size,
            autocast,
        )
        run.writer.add_scalar("val/loss", loss, step)
        run.summary["val_losses"].append((step, loss))
    watched = run.watch is not None and (run.watch.latest or {}).get("step") != step
    count = max(cfg.num_validation_images, cfg.memorization_samples if watched else 0)
    if images and run.vae is not None and count:
        samples = validation_images(
            run.unet,
            run.vae,
            run.tokenizer,
            run.scheduler_config,
            run.prompt_embeds,
            run.negative_embeds,
            num_images=count,
            steps=cfg.validation_inference_steps,
            resolution=cfg.resolution,
            seed=cfg.seed,
            prediction_type=run.schedule.prediction_type,
            autocast_dtype=autocast,
            batch_size=cfg.train_batch_size,
        )
        if cfg.num_validation_images:  # the grid: the first samples (seeds seed, seed + 1, ...)
            grid = image_grid(samples[: cfg.num_validation_images], gap=VALIDATION_GRID_GAP)
            run.writer.add_image("val/samples", grid, step)
        if watched:
            run.watch.log(run.writer, run.watch.observe(samples[: cfg.memorization_samples], step))
            run.summary["memorization"] = run.watch.summary()
    run.writer.flush()
    run.unet.train()


def save_state(run: TrainRun, step: int) -> None:
    """Rank 0: checkpoint + adapter export; refuses to save weights that went non-finite."""
    if not run.dist.is_main:
        return
    cfg, checkpoints_dir, adapter_dir = run.cfg, run.checkpoints_dir, run.output_dir / "lora_unet"
    writing = f"checkpoint {step} to {checkpoints_dir}"
    try:
        path = save_checkpoint(
            checkpoints_dir,
            step,
            lora=lora_state_dict(run.unet),
            optimizer={
                "optimizer": run.step.optimizer.state_dict(),
                "scaler": run.step.scaler.state_dict() if run.step.scaler else {},
            },
            rng=capture_rng_state(run.step.generators),
            state={
                "data": run.data.state(),
                "lr_schedule": {
                    "kind": cfg.lr_scheduler,
                    "base_lr": cfg.learning_rate,
                    "warmup_steps": cfg.lr_warmup_steps,
                    "total_steps": cfg.max_train_steps,
                },
                "world_size": run.dist.world_size,
                "config": to_dict(cfg),
                "run_name": run.run_name,
                "memorization": run.watch.at_checkpoint(step) if run.watch is not None else None,
            },
            total_limit=cfg.checkpoints_total_limit,
        )
        run.checkpoints[step] = path
        writing = f"the adapter of step {step} to {adapter_dir}"
        run.summary["adapter"] = [str(p) for p in _export_adapter(run, step)]
        run.exported_step = step
    except NonFiniteError as error:  # finite loss up to `step`, yet the weights after it are not
        _stop_nonfinite(run, step + 1, f"the LoRA weights or optimizer state became NaN/inf at step {step} ({error})")
    except (OSError, SafetensorError) as error:  # a full disk: OSError, or safetensors' own error type
        raise TrainingError(
            f"--output_dir: writing {writing} failed "
            f"({getattr(error, 'strerror', None) or error}); "
            "the previous checkpoints are intact. Free disk space, then --resume_from_checkpoint latest"
        ) from error
    run.summary["checkpoint"] = str(path)


def _copying(run: TrainRun, step: int) -> bool:
    """Whether this step's validation found a copy rate above --stop_on_copy_rate (rank 0's verdict, on every rank)."""
    if run.cfg.stop_on_copy_rate is None:
        return False
    figures = run.watch.latest if run.watch is not None else None
    verdict = figures is not None and figures["step"] == step and over_limit(figures, run.cfg.stop_on_copy_rate)
    return broadcast_object(verdict, run.dist)


def _stop_copying(run: TrainRun, step: int) -> None:
    """The run ends after a validation above --stop_on_copy_rate and its checkpoint: lora_unet/ gets the adapter of
    the last checkpoint under the limit back (the run's end says which)."""
    run.summary.update(interrupted=True, signal="stop_on_copy_rate")
    if not run.dist.is_main:
        return
    print(
        copy_limit_report(run.watch, run.checkpoints_dir, run.cfg.stop_on_copy_rate, stopped_at=step), file=sys.stderr
    )
    keep = run.watch.limit.get("last_checkpoint_under_limit")
    if keep is not None:
        checkpoint = load_checkpoint(Path(keep), run.device)
        load_lora_state_dict(run.unet, checkpoint.lora)
        run.summary["adapter"] = [str(p) for p in _export_adapter(run, checkpoint.step)]
        run.exported_step = checkpoint.step


def _export_adapter(run: TrainRun, step: int) -> list[Path]:
    """The adapter file(s) and model card of `step` in OUTPUT_DIR/lora_unet (cxr.model.export)."""
    facts = RunFacts(step, run.manifest_sha, run.schedule.prediction_type, run.train_records, run.val_records)
    exported = export_adapter(run.unet, run.cfg, facts)
    run.summary["card"] = str(exported.card)
    return exported.files


def _check_finite(run: TrainRun, step: int, read: dict, window: int) -> None:
    if read["nonfinite"]:
        first_bad = step - window + read["finite_steps"] + 1
        _stop_nonfinite(
            run,
            first_bad,
            f"the training loss or gradient norm became NaN/inf at step {first_bad} "
            f"(found by the check of steps {step - window + 1}-{step}, before step {step} was saved or "
            f"logged; read every --log_every={run.cfg.log_every} steps and at checkpoints); no update "
            "with a NaN/inf gradient was applied",
        )


def _stop_nonfinite(run: TrainRun, first_bad: int, what: str) -> None:
    """Raise NonFiniteLossError; on rank 0 first mark the checkpoints of weights that did not give a finite
    loss and gradient at the next step (the step of weights W_s is s + 1, so only those of step
    <= first_bad - 2 are trusted), and re-export the adapter from the newest trusted checkpoint."""
    notes = _mark_nonfinite(run, first_bad) if run.dist.is_main else []
    raise NonFiniteLossError(
        f"{what}. {' '.join(notes)} Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, a "
        f"smaller --max_grad_norm, and check the images listed in {run.output_dir / 'manifest.json'}; then "
        "--resume_from_checkpoint latest"
    )


def _mark_nonfinite(run: TrainRun, first_bad: int) -> list[str]:
    notes = []
    for saved_step, path in sorted(run.checkpoints.items()):
        if saved_step > first_bad - 2 and path.is_dir():
            mark_nonfinite(path, f"its weights gave a NaN/inf loss or gradient at step {first_bad}")
            notes.append(f"{path} is marked NONFINITE (kept, never resumed from).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the folders just marked: the message says so
        keep = find_latest_checkpoint(run.checkpoints_dir)
    if keep is None:
        notes.append(
            f"No checkpoint in {run.checkpoints_dir} can be resumed from: "
            "--resume_from_checkpoint latest starts from step 0."
        )
    else:
        notes.append(f"--resume_from_checkpoint latest resumes from {keep}.")
    if run.exported_step is not None and run.exported_step > first_bad - 2:
        adapter_dir = run.output_dir / "lora_unet"
        if keep is not None:
            checkpoint = load_checkpoint(keep, run.device)
            load_lora_state_dict(run.unet, checkpoint.lora)
            _export_adapter(run, checkpoint.step)
            notes.append(f"{adapter_dir} was re-exported from it.")
        else:
            notes.append(
                f"{adapter_dir} holds the weights of step {run.exported_step}, which gave NaN/inf "
                "afterwards: do not use it."
            )
    return notes


# ------------------------------------------------------------------------------------- data and model


def _prepare_data(cfg: TrainConfig, dist: DistInfo, resume_path: Path | None = None):
    """Scan and split the dataset (a fresh run) or take the split of the first start from the run's manifest
    (a resumed run), and write the manifest on rank 0; every rank gets the same records."""
    result = None
    if dist.is_main:
        dropped, deduplicated = None, None
        if resume_path is not None:
            train_records, val_records, dropped, deduplicated = _split_of_first_start(cfg, Path(resume_path))
            records = train_records + val_records
        else:
            records = dataset.scan_dataset(
                cfg.dataset_dir,
                cfg.file_list,
                min_image_size=cfg.min_image_size,
                skip_bad_images=cfg.skip_bad_images,
                max_images=cfg.max_images,
                seed=cfg.seed,
                num_workers=cfg.resolved_num_workers,
            )
            if cfg.exclude_duplicates is not None:
                records, deduplicated = dataset.drop_duplicates(records, cfg.exclude_duplicates)
            train_records, val_records = dataset.split_holdout(
                records, val_fraction=cfg.val_fraction, val_count=cfg.val_count, seed=cfg.seed
            )
        check_free_space(cfg, len(records))
        extra = {name: value for name, value in to_dict(cfg).items() if name in result_flags(TrainConfig)}
        manifest_sha = dataset.write_manifest(
            Path(cfg.output_dir) / "manifest.json", train_records, val_records, extra, dropped, deduplicated
        )
        result = (train_records, val_records, manifest_sha)
    return broadcast_object(result, dist)


def _split_of_first_start(cfg: TrainConfig, resume_path: Path):
    """(train, val, dropped, deduplicated) of a resumed run: the split recorded in the manifest of the run the
    checkpoint belongs
    to, never re-drawn, so no image moves between the splits. Images missing or changed since are an error naming
    them, or with --skip_bad_images left out of both splits with a warning (listed under `dropped`)."""
    manifest_path = resume_path.parent.parent / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {resume_path}: the run's manifest {manifest_path} is missing; it records the "
            "train/held-out split fixed at the run's first start, which a resumed run keeps. Restore it, or start a "
            "new run (without --resume_from_checkpoint) in another --output_dir"
        )
    manifest = dataset.read_manifest(manifest_path)
    splits = {
        name: dataset.records_from_manifest(manifest, name, dataset_dir=cfg.dataset_dir) for name in ("train", "val")
    }
    changed = [
        (name, record, reason)
        for name in splits
        for record, reason in dataset.check_unchanged(splits[name], cfg.resolved_num_workers)
    ]
    dropped = list(manifest.get("dropped", []))
    if changed:
        listed = "\n".join(
            f"  {record.relpath} ({'held-out' if name == 'val' else 'training'} image): {reason}"
            for name, record, reason in changed[:50]
        )
        listed += f"\n  ... and {len(changed) - 50} more" if len(changed) > 50 else ""
        head = (
            f"--resume_from_checkpoint: {len(changed)} image(s) of the run's train/held-out split ({manifest_path}, "
            f"fixed at its first start) are missing or changed since:\n{listed}\n"
        )
        if not cfg.skip_bad_images:
            raise DatasetError(
                head + "Restore them (the manifest records each file's size and sha256), or pass "
                "--skip_bad_images to continue without them (they are left out of both splits, never "
                "moved from one to the other), or start a new run in another --output_dir"
            )
        warnings.warn(
            head + "--skip_bad_images: continuing without them (left out of both splits and listed under "
            "`dropped` in manifest.json); the data order differs from the original run from here on",
            stacklevel=2,
        )
        gone = {(name, record.relpath) for name, record, _ in changed}
        splits = {name: [r for r in records if (name, r.relpath) not in gone] for name, records in splits.items()}
        dropped += [
            {"relpath": record.relpath, "sha256": record.sha256, "split": name, "reason": reason}
            for name, record, reason in changed
        ]
        if not splits["train"]:
            raise DatasetError(
                f"--resume_from_checkpoint: no training image of {manifest_path} is left; restore "
                "the images, or start a new run in another --output_dir"
            )
    print(
        f"[cxr] resuming with the split of the first start ({manifest_path}): {len(splits['train'])} training, "
        f"{len(splits['val'])} held-out images",
        file=sys.stderr,
    )
    return splits["train"], splits["val"], dropped, manifest.get("deduplicated")


def _build_caches(cfg: TrainConfig, dist: DistInfo, vae, train_records, val_records, device):
    """Latent caches of both splits; rank 0 builds them, the other ranks wait and then load them."""
    # Every flag declared cache=True goes to the cache (which keys on what it is given); the model id and
    # revision travel as one `vae_id`, the name the key has always used for them.
    settings = {name: getattr(cfg, name) for name in cache_flags(TrainConfig)}
    settings["vae_id"] = f"{settings.pop('model_id')}@{settings.pop('revision') or 'main'}"
    common = dict(
        settings,
        cache_dir=cfg.resolved_cache_dir,
        device=device,
        batch_size=cfg.encode_batch_size,
        num_workers=cfg.resolved_num_workers,
    )
    caches = None
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            train_cache = latents.build_or_load_latent_cache(train_records, vae, **common)
            val_cache = None
            if val_records:  # the held-out images are never mirrored
                val_cache = latents.build_or_load_latent_cache(val_records, vae, **{**common, "random_flip": False})
            caches = (train_cache, val_cache)
        barrier(dist)
    return caches


def _load_model(cfg: TrainConfig, device, dtype):
    components = loading.load_components(cfg.model_id, cfg.revision)
    unet = components["unet"].to(device=device, dtype=dtype)
    # The LoRA A init draws from --seed without touching the global RNG the caller (or a later run) relies on.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        paths = inject_lora(
            unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_target_list, dropout=cfg.lora_dropout
        )
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # The VAE stays float32: the cache stores its posterior exactly and validation decodes without fp16 overflow.
    components["vae"].to(device=device, dtype=torch.float32)
    components["text_encoder"].to(device=device)
    components["unet"] = unet
    return components, paths


def versions() -> dict[str, str]:
    return {
        "cxr": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------- command


def run(cfg: TrainConfig) -> int:
    """Train and return the process exit status; known failures print one clear `error:` line and give 1."""
    try:
        summary = train(cfg)
    except (TrainingError, CheckpointError, DatasetError, AdapterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    lines = usage_lines([Path(p) for p in summary.get("adapter", [])], summary.get("card") and Path(summary["card"]))
    if lines:  # rank 0 exported the adapter; the other ranks have nothing to say
        print("\n".join(lines), flush=True)
    return exit_code(summary)

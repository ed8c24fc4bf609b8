"""The training run, top to bottom: `train(cfg) -> summary`.

    train(cfg)
      setup(cfg, held) -> TrainRun    cxr.train.setup: device/DDP, output folder claim, data split, model +
                                      LoRA, latent caches, the step and its data order
      resume(run, checkpoint)         LoRA, optimizer, scaler, RNG and data position of a checkpoint
      start_logging(run)              TensorBoard run folder (a resume appends to its run's), config.json
      train_loop(run, stop, ...)      the loop: step, read metrics every --log_every steps, validate, save
      save_state(run, step)           checkpoint + adapter export (rank 0), cxr.train.saving

Data flow: images -> (once) VAE posterior mean/std cached on disk and held on the device; prompt -> (once)
text-encoder embedding. Each step then only indexes the device-resident cache: the step and its loss are
cxr.train.step, validation cxr.train.validation, checkpoints (and what a NaN/inf marks) cxr.train.checkpoint,
the run folder's paths cxr.runpaths.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from cxr.config import TrainConfig
from cxr.data.dataset import DatasetError
from cxr.flags import changed_result_flags, result_flags, save_json, to_dict
from cxr.model.export import usage_lines
from cxr.model.lora import AdapterError, load_lora_state_dict
from cxr.privacy.watch import copy_limit_report
from cxr.runtime import (
    StopFlag,
    Throughput,
    TrainingError,
    barrier,
    exit_code,
    package_versions,
    peak_memory_mib,
    shutdown_distributed,
    warn_on_main,
)
from cxr.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
)
from cxr.train.saving import check_finite, over_copy_limit, save_state, stop_copying
from cxr.train.setup import TrainRun, setup
from cxr.train.step import load_optimizer_state, scheduled_lr, set_lr
from cxr.train.tblog import config_markdown, make_writer, new_run_name
from cxr.train.validation import log_validation

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
        if run.checkpoints.resumed_from is not None:
            resume(run, run.checkpoints.resumed_from)
        start_logging(run)
        # After the resume: loading AdamW's state makes new tensors, which a graph captured earlier would not read.
        # From the capture on, the run only copies into what the step reads (cxr.train.step_graph).
        if run.start_step < cfg.max_train_steps:
            run.step.start_cuda_graph(run.data.peek_indices())  # --cuda_graph: replay a checked graph, or eager
        return train_loop(run, stop, stop_after_steps)


def resume(run: TrainRun, path: Path) -> None:
    """Continue from checkpoint `path` exactly: LoRA, optimizer (this run's settings), scaler, RNG, data position."""
    checkpoint = load_checkpoint(path, run.device)
    load_lora_state_dict(run.model.unet, checkpoint.lora)
    load_optimizer_state(run.step.optimizer, checkpoint.optimizer["optimizer"], run.model.unet)
    if run.step.scaler is not None and checkpoint.optimizer.get("scaler"):
        run.step.scaler.load_state_dict(checkpoint.optimizer["scaler"])
    # A dropout stream the checkpoint lacks (its run trained without dropout) starts from its seed; the noise
    # stream is always there.
    saved = checkpoint.rng["generators"]
    restore_rng_state(checkpoint.rng, {n: g for n, g in run.step.generators.items() if n == "noise" or n in saved})
    run.data.load_state(checkpoint.state["data"])
    # lora_unet/ holds this step's adapter, as `latest` left it
    run.start_step = run.checkpoints.exported_step = checkpoint.step
    run.checkpoints.by_step[checkpoint.step] = path
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
    run.run_name = run.run_name or new_run_name(run.paths.root, run.paths.logs)
    run_dir = run.paths.logs / run.run_name
    new_run = not run_dir.is_dir() or not any(run_dir.glob("events.out.tfevents.*"))
    run.writer = make_writer(run_dir, dist.rank, purge_step=None if new_run else run.start_step + 1)
    if new_run:
        hparams = {name: value for name, value in to_dict(cfg).items() if name in result_flags(TrainConfig)}
        hparams.update(prediction_type=run.model.schedule.prediction_type, world_size=dist.world_size)
        run.writer.add_hparams_start(hparams)
    run_versions = package_versions()
    if dist.is_main:
        resolved = {
            "prediction_type": run.model.schedule.prediction_type,
            "global_batch": run.data.rows_per_step,
            "steps_per_epoch": run.data.steps_per_epoch,
            "device": str(run.device),
            "tensorboard_run": str(run_dir),
        }
        save_json(
            cfg,
            run.paths.config,
            {
                "versions": run_versions,
                "world_size": dist.world_size,
                "resolved": resolved,
                "lora_paths": run.model.lora_paths,
                "manifest_sha256": run.images.manifest_sha,
            },
        )
    run.writer.add_text("config", config_markdown(to_dict(cfg), run_versions), run.start_step)
    if run.watch is not None:
        run.writer.add_text("privacy/calibration", run.watch.calibration_text(), run.start_step)
    run.summary = {
        "output_dir": str(run.paths.root),
        "start_step": run.start_step,
        "steps": run.start_step,
        "interrupted": False,
        "signal": None,
        "val_losses": [],
        "checkpoint": None,
        "adapter": [],
        "manifest_sha256": run.images.manifest_sha,
        "train_images": len(run.images.train),
        "val_images": len(run.images.val),
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
    clock = Throughput(run.data.rows_per_step)
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
            check_finite(run, step, read, window)
            stop_requested = read["flag"]
            if log_due:
                _log_train(run, step, read, clock.measure(), progress)
        # The last step is validated here, before its checkpoint, so the checkpoint holds its own watch figures.
        validation_due = step == cfg.max_train_steps or (cfg.validation_steps and step % cfg.validation_steps == 0)
        if validation_due:
            validate(run, step, images=True)
            clock.restart()
        copying = validation_due and over_copy_limit(run, step)
        if checkpoint_due or stop_requested or copying:
            save_state(run, step)
            barrier(dist)
            clock.restart()
        if copying:
            stop_copying(run, step)
            break
        if stop_requested:
            run.summary.update(interrupted=True, signal=stop.signal_name or "stop_after_steps")
            break
    _finish(run, step, clock)
    return _close(run, progress)


def _finish(run: TrainRun, step: int, clock: Throughput) -> None:
    """After the last step (or a stop): the final validation and HParams, the summary and summary.json."""
    wall = clock.overall()  # from the first step to the last, periodic validation and checkpoints included
    if step >= run.cfg.max_train_steps:
        if step == run.start_step:  # resumed from a finished run: just (re-)export (the loop validated the others)
            save_state(run, step)
            validate(run, step, images=True)
        run.writer.add_hparams_end()
        if run.cfg.checkpoints_total_limit and run.dist.is_main:
            # A finished run resumes from its last checkpoint alone: the older good one kept beside it in case the
            # next step diverged is no longer needed.
            rotate_checkpoints(run.paths.checkpoints, run.cfg.checkpoints_total_limit)
    if run.watch is not None:
        if run.cfg.stop_on_copy_rate is not None and not run.watch.limit and run.dist.is_main:
            print(copy_limit_report(run.watch, run.paths.checkpoints, run.cfg.stop_on_copy_rate), file=sys.stderr)
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
        run.paths.summary.write_text(json.dumps(run.summary, indent=2, default=str) + "\n")


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
    loss = log_validation(run.model, run.images.val_inputs, run.writer, run.cfg, step, images=images, watch=run.watch)
    if loss is not None:
        run.summary["val_losses"].append((step, loss))
    if run.watch is not None:
        run.summary["memorization"] = run.watch.summary()


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

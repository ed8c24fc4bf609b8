"""What the run writes and how it stops on its own: a checkpoint with the adapter export (rank 0), the stop on
NaN/inf (its checkpoints marked, the adapter re-exported from the last good one) and the stop on
--stop_on_copy_rate (the adapter of the last checkpoint under the limit put back).

    save_state(run, step)                    checkpoint + adapter export; refuses non-finite weights
    check_finite(run, step, read, window)    NonFiniteLossError when the metrics read went NaN/inf
    over_copy_limit(run, step) / stop_copying(run, step)   the copy-rate verdict of this step's validation, and the stop
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors import SafetensorError

from cxr.flags import to_dict
from cxr.model.export import RunFacts, export_adapter
from cxr.model.lora import load_lora_state_dict, lora_state_dict
from cxr.privacy.watch import copy_limit_report, over_limit
from cxr.runtime import TrainingError, broadcast_object
from cxr.train.checkpoint import NonFiniteError, capture_rng_state, load_checkpoint, save_checkpoint, stop_nonfinite
from cxr.train.setup import TrainRun
from cxr.train.step import optimizer_state_dict


def save_state(run: TrainRun, step: int) -> None:
    """Rank 0: checkpoint + adapter export; refuses to save weights that went non-finite."""
    if not run.dist.is_main:
        return
    cfg, checkpoints_dir, adapter_dir = run.cfg, run.paths.checkpoints, run.paths.adapter
    writing = f"checkpoint {step} to {checkpoints_dir}"
    try:
        path = save_checkpoint(
            checkpoints_dir,
            step,
            lora=lora_state_dict(run.model.unet),
            optimizer={
                "optimizer": optimizer_state_dict(run.step.optimizer, run.model.unet),
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
                "split_sha256": run.images.split_sha,
                "memorization": run.watch.at_checkpoint(step) if run.watch is not None else None,
            },
            total_limit=cfg.checkpoints_total_limit,
        )
        run.checkpoints.by_step[step] = path
        writing = f"the adapter of step {step} to {adapter_dir}"
        run.summary["adapter"] = [str(p) for p in _export_adapter(run, step)]
        run.checkpoints.exported_step = step
    except NonFiniteError as error:  # finite loss up to `step`, yet the weights after it are not
        _stop_nonfinite(run, step + 1, f"the LoRA weights or optimizer state became NaN/inf at step {step} ({error})")
    except (OSError, SafetensorError) as error:  # a full disk: OSError, or safetensors' own error type
        raise TrainingError(
            f"--output_dir: writing {writing} failed "
            f"({getattr(error, 'strerror', None) or error}); "
            "the previous checkpoints are intact. Free disk space, then --resume_from_checkpoint latest"
        ) from error
    run.summary["checkpoint"] = str(path)


def over_copy_limit(run: TrainRun, step: int) -> bool:
    """Whether this step's validation found a copy rate above --stop_on_copy_rate (rank 0's verdict, on every rank)."""
    if run.cfg.stop_on_copy_rate is None:
        return False
    figures = run.watch.latest if run.watch is not None else None
    verdict = figures is not None and figures["step"] == step and over_limit(figures, run.cfg.stop_on_copy_rate)
    return broadcast_object(verdict, run.dist)


def stop_copying(run: TrainRun, step: int) -> None:
    """The run ends after a validation above --stop_on_copy_rate and its checkpoint: lora_unet/ gets the adapter of
    the last checkpoint under the limit back (the run's end says which)."""
    run.summary.update(interrupted=True, signal="stop_on_copy_rate")
    if not run.dist.is_main:
        return
    report = copy_limit_report(run.watch, run.paths.checkpoints, run.cfg.stop_on_copy_rate, stopped_at=step)
    print(report, file=sys.stderr)
    keep = run.watch.limit.get("last_checkpoint_under_limit")
    if keep is not None:
        checkpoint = load_checkpoint(Path(keep), run.device)
        load_lora_state_dict(run.model.unet, checkpoint.lora)
        run.summary["adapter"] = [str(p) for p in _export_adapter(run, checkpoint.step)]
        run.checkpoints.exported_step = checkpoint.step


def _export_adapter(run: TrainRun, step: int) -> list[Path]:
    """The adapter file(s) and model card of `step` in OUTPUT_DIR/lora_unet (cxr.model.export)."""
    images, schedule = run.images, run.model.schedule
    facts = RunFacts(step, images.manifest_sha, schedule.prediction_type, images.train, images.val)
    exported = export_adapter(run.model.unet, run.cfg, facts)
    run.summary["card"] = str(exported.card)
    return exported.files


def check_finite(run: TrainRun, step: int, read: dict, window: int) -> None:
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
    """NonFiniteLossError; rank 0 first marks the checkpoints that led there and re-exports the adapter."""
    stop_nonfinite(
        run.checkpoints, first_bad, what, run.paths, main=run.dist.is_main, reexport=lambda p: _reexport_from(run, p)
    )


def _reexport_from(run: TrainRun, path: Path) -> None:
    checkpoint = load_checkpoint(path, run.device)
    load_lora_state_dict(run.model.unet, checkpoint.lora)
    _export_adapter(run, checkpoint.step)

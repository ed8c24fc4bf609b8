"""The output folder of a training run: writable and free-space checks before anything heavy, then the claim:
rank 0 locks --output_dir for the run's life and removes temporary files killed runs left; the checkpoint to
resume from is found; an earlier run in the folder is refused (or moved aside with --overwrite_output_dir).
The folder's layout is `cxr.runpaths.RunPaths`.

    check_writable(folder, flag)              TrainingError naming the flag when `folder` is not writable
    check_free_space(cfg, num_images)         TrainingError when a disk is too small for the run
    claim_output_dir(cfg, dist, held)         output, cache and logging folders writable; the lock; stale temp files
    find_resume_checkpoint(cfg, dist)         the checkpoint --resume_from_checkpoint names, or None (step 0)
    keep_earlier_run_apart(cfg, dist, resume) refuse to start over an earlier run's files, or move them aside
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from cxr import fileio
from cxr.config import TrainConfig
from cxr.data.latents import CACHE_FORMAT
from cxr.model.loading import read_vae_scale_factor
from cxr.runpaths import CHECKPOINT_PREFIX, PREVIOUS_RUN_PREFIX
from cxr.runtime import DistInfo, TrainingError, broadcast_object
from cxr.train import runlock
from cxr.train.checkpoint import (
    FILES,
    MARKER,
    NONFINITE,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_leftovers,
    previous_run_files,
    resolve_resume,
)

LORA_PARAMS_PER_RANK_SD15 = 199_296  # LoRA parameters per unit of rank on SD v1.5's 4 default targets
STALE_TEMP_AGE_S = 3600  # temporary files in --cache_dir (may be shared by runs) are removed only this old
# The files whose `.NAME.PID.tmp` a killed run leaves (cxr.fileio.atomic_path), by the folder they are written to.
_RUN_FILES = re.compile(r"manifest\.json|config\.json|summary\.json|" + re.escape(runlock.LOCK_NAME.lstrip(".")))
_ADAPTER_FILES = re.compile(r".+\.safetensors|README\.md")
_CACHE_FILES = re.compile(r"[0-9a-f]{64}\.safetensors")  # cxr.data.latents: <key>.safetensors
_CACHE_CHUNKS = re.compile(r"chunk-\d+\.safetensors")  # in <key>.partial/
_CACHE_PARTIAL = re.compile(r"[0-9a-f]{64}\.partial")


def check_writable(folder: Path, flag: str) -> None:
    """`cxr.fileio.check_writable` (shared by every command), raising TrainingError naming `flag`."""
    fileio.check_writable(folder, flag, TrainingError)


def estimate_disk_bytes(cfg: TrainConfig, num_images: int, vae_scale_factor: int) -> dict[str, int]:
    """Rough upper bounds of what the run writes: checkpoints, adapter export, latent cache, logs.
    `vae_scale_factor`: the base VAE's downsampling (8 for SD v1.5; `cxr.model.loading.read_vae_scale_factor`)."""
    lora_bytes = cfg.lora_rank * LORA_PARAMS_PER_RANK_SD15 * 4
    checkpoint = 3 * lora_bytes + (1 << 20)  # weights + two AdamW moments
    written = -(-cfg.max_train_steps // cfg.checkpointing_steps) if cfg.checkpointing_steps else 1  # incl. the last
    # + the one written before the oldest goes; at a limit of 1 the newest known-good one stays beside the last
    kept = min(max(cfg.checkpoints_total_limit or written, 2), written) + 1
    latent = 4 * (cfg.resolution // vae_scale_factor) ** 2 * 4 * 2  # mean and std, float32
    rows = num_images * (2 if cfg.random_flip else 1)
    return {"output": kept * checkpoint + 2 * lora_bytes + (64 << 20), "cache": rows * latent + (16 << 20)}


def check_free_space(cfg: TrainConfig, num_images: int) -> None:
    need = estimate_disk_bytes(cfg, num_images, read_vae_scale_factor(cfg.model_id, cfg.revision))
    paths = cfg.run_paths
    places = [
        (paths.root, need["output"], "--output_dir"),
        (paths.cache, need["cache"], "--cache_dir"),
    ]
    for folder, needed, flag in places:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise TrainingError(
                f"{flag}: {folder} has {free / 2**20:.0f} MiB free but this run needs about {needed / 2**20:.0f} MiB "
                "(checkpoints, adapter, latent cache, logs); free some space, lower --checkpoints_total_limit, "
                "or point the flag at a larger disk"
            )


def claim_output_dir(cfg: TrainConfig, dist: DistInfo, held: contextlib.ExitStack) -> None:
    """Before the scan and the model load: rank 0 checks that --output_dir, --cache_dir and --logging_dir are
    writable, locks --output_dir for the run's life (released by `held`) and removes temporary files killed runs
    left there. Every rank gets the same error."""
    _on_main_rank(dist, lambda: _claim(cfg, held))


def find_resume_checkpoint(cfg: TrainConfig, dist: DistInfo) -> Path | None:
    """The checkpoint folder to resume from: None without --resume_from_checkpoint (or with `latest` when
    OUTPUT_DIR/checkpoints holds no complete one yet), the newest complete one for `latest`, or the given folder
    once its files match their hashes. Rank 0 looks; every rank gets the same answer or the same error."""
    return _on_main_rank(dist, lambda: _find_resume_checkpoint(cfg))


def keep_earlier_run_apart(cfg: TrainConfig, dist: DistInfo, resume_path: Path | None) -> None:
    """Refuse to start over an earlier run's checkpoints/adapter in --output_dir (two runs would mix), or move
    them aside with --overwrite_output_dir. A run resuming from a checkpoint of this folder continues that run."""
    _on_main_rank(dist, lambda: _keep_earlier_run_apart(cfg, resume_path))


def _on_main_rank(dist: DistInfo, work):
    """`work()` on rank 0 alone; every rank returns its result, or raises its error."""
    result, error = None, None
    if dist.is_main:
        try:
            result = work()
        except (TrainingError, CheckpointError) as caught:
            error = caught
    shared = broadcast_object((result, None if error is None else str(error)), dist)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise TrainingError(shared[1])
    return shared[0]


def _claim(cfg: TrainConfig, held: contextlib.ExitStack) -> None:
    output_dir = Path(cfg.output_dir)
    check_writable(output_dir, "--output_dir")
    check_writable(cfg.resolved_cache_dir, "--cache_dir")
    check_writable(cfg.resolved_logging_dir, "--logging_dir")
    try:
        lock = runlock.acquire(output_dir, flag="--output_dir")
    except runlock.RunLockError as error:
        raise TrainingError(str(error)) from None
    except OSError as error:
        raise TrainingError(
            f"--output_dir: cannot create the lock file in {output_dir} ({error.strerror or error}); "
            "choose a folder you can write to"
        ) from None
    held.callback(lock.release)
    _remove_stale_temp_files(cfg)


def _find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    checkpoints_dir = cfg.run_paths.checkpoints
    if not cfg.resume_from_checkpoint:
        return None
    given = Path(cfg.resume_from_checkpoint)
    if (
        cfg.resume_from_checkpoint != "latest"
        and given.is_dir()
        and not any((given / n).exists() for n in (*FILES, MARKER))
    ):
        raise TrainingError(
            f"--resume_from_checkpoint: {given} is not a checkpoint folder (it has none of "
            f"{MARKER}, {', '.join(FILES)}); give `latest` or a folder "
            f"{checkpoints_dir}/{CHECKPOINT_PREFIX}<step>"
        )
    return resolve_resume(cfg.resume_from_checkpoint, checkpoints_dir)


def _keep_earlier_run_apart(cfg: TrainConfig, resume_path: Path | None) -> None:
    paths = cfg.run_paths
    output_dir, checkpoints_dir = paths.root, paths.checkpoints
    continues_here = resume_path is not None and os.path.realpath(resume_path.parent) == os.path.realpath(
        checkpoints_dir
    )
    earlier = [] if continues_here else previous_run_files(paths)
    if not earlier:
        return
    listed = ", ".join(earlier[:6]) + (f" and {len(earlier) - 6} more" if len(earlier) > 6 else "")
    if cfg.overwrite_output_dir:
        _move_earlier_run_aside(cfg, listed)
        return
    if resume_path is not None:
        why = f"this run resumes from {resume_path}, a checkpoint of another folder, but {output_dir} holds"
    elif cfg.resume_from_checkpoint:
        why = (
            f"--resume_from_checkpoint latest found no complete checkpoint in {checkpoints_dir} (see the warnings "
            f"above), but {output_dir} holds"
        )
    else:
        why = f"this is a fresh run (no --resume_from_checkpoint) but {output_dir} holds"
    raise TrainingError(
        f"--output_dir: {why} an earlier run's files ({listed}). Starting over them would mix two runs (checkpoint "
        "rotation would delete the new checkpoints, `latest` would pick the old run). Continue that run with "
        "--resume_from_checkpoint latest, write this run to another --output_dir, or pass --overwrite_output_dir to "
        f"move the earlier run into {output_dir}/{PREVIOUS_RUN_PREFIX}<time>/ (nothing is deleted)"
    )


def _move_earlier_run_aside(cfg: TrainConfig, listed: str) -> None:
    """--overwrite_output_dir: move the earlier run into OUTPUT_DIR/previous-run-<time>/, keeping a --cache_dir
    inside the folder where it is; refused, before anything moves, when an input of the run would move with it."""
    output_dir, cache_dir = cfg.run_paths.root, cfg.run_paths.cache
    keep = ()
    if _is_inside(cache_dir, output_dir):
        keep = (Path(os.path.relpath(os.path.realpath(cache_dir), os.path.realpath(output_dir))).parts[0],)
    entries = runlock.previous_run_entries(output_dir, keep)
    model = cfg.model_id if Path(cfg.model_id).exists() else None  # a local folder, not a hub id
    inputs = [
        (flag, value)
        for flag, value in (
            ("--dataset_dir", cfg.dataset_dir),
            ("--file_list", cfg.file_list),
            ("--exclude_duplicates", cfg.exclude_duplicates),
            ("--model_id", model),
        )
        if value is not None and any(_within(value, entry) for entry in entries)
    ]
    if inputs:
        named = ", ".join(f"{flag} {value}" for flag, value in inputs)
        raise TrainingError(
            f"--overwrite_output_dir: {named} lies inside {output_dir}, whose earlier run this flag would move into "
            f"{output_dir}/{PREVIOUS_RUN_PREFIX}<time>/ ({listed}), and this run could then not read it. "
            f"Nothing was moved. Keep the run's inputs outside {output_dir}, or write this run to another --output_dir"
        )
    moved = runlock.move_previous_run(output_dir, keep=keep)
    warnings.warn(
        f"--overwrite_output_dir: the earlier run in {output_dir} ({listed}) was moved to {moved}; "
        "delete that folder when you no longer need it",
        stacklevel=3,
    )


def _is_inside(path: Path, folder: Path) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def _within(path, entry: Path) -> bool:
    """Whether `path` is `entry` or lies in it, as written or with links resolved; `entry` itself is moved by a
    rename, so a link there counts as the link, not as what it points to."""
    entry_forms = (os.path.abspath(entry), os.path.join(os.path.realpath(entry.parent), entry.name))
    for form in {os.path.abspath(path), os.path.realpath(path)}:
        if any(form == e or form.startswith(e.rstrip(os.sep) + os.sep) for e in entry_forms):
            return True
    return False


def _remove_stale_temp_files(cfg: TrainConfig) -> None:
    """Delete what killed runs left, recognised by name and place (never by a pattern elsewhere): in --output_dir,
    which this run holds the lock of, the `.NAME.PID.tmp` of its own files, adapter files and NONFINITE markers
    and the checkpoint-<step>.tmp/.old folders of a killed save (cxr.train.checkpoint.checkpoint_leftovers); in
    --cache_dir, which other runs may share, the temporary files of latent caches untouched for STALE_TEMP_AGE_S."""
    paths = cfg.run_paths
    output_dir, cache_dir = paths.root, paths.cache
    found = runlock.stale_temp_files(output_dir, _RUN_FILES)
    found += runlock.stale_temp_files(paths.adapter, _ADAPTER_FILES)
    for _, folder in checkpoint_dirs(paths.checkpoints):
        found += runlock.stale_temp_files(folder, re.compile(NONFINITE))
    age = STALE_TEMP_AGE_S
    found += runlock.stale_temp_files(cache_dir, _CACHE_FILES, min_age_s=age)
    found += runlock.stale_unnamed_temp_files(cache_dir, min_age_s=age, is_ours=_holds_a_latent_cache)
    for partial in sorted(cache_dir.glob("*.partial")) if cache_dir.is_dir() else []:
        if _CACHE_PARTIAL.fullmatch(partial.name) and partial.is_dir() and not partial.is_symlink():
            found += runlock.stale_temp_files(partial, _CACHE_CHUNKS, min_age_s=age)
            found += runlock.stale_unnamed_temp_files(partial, min_age_s=age)
    folders = checkpoint_leftovers(paths.checkpoints)
    if not found and not folders:
        return
    freed = runlock.remove_files(found)
    for folder in folders:
        freed += sum(p.stat().st_size for p in folder.iterdir())
        shutil.rmtree(folder)
    removed = [str(p) for p in found + folders]
    print(
        f"[cxr] removed {len(removed)} temporary file(s) or folder(s) ({freed / 2**20:.1f} MiB) that a killed run "
        "left: " + ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""),
        file=sys.stderr,
    )


def _holds_a_latent_cache(path: Path) -> bool:
    """Whether a safetensors temporary file is one of a latent cache: its header (written first) names the
    cache's format."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)) if 0 < size < min(path.stat().st_size, 1 << 28) else None
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("format") == CACHE_FORMAT

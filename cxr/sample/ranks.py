"""Sampling in several processes (`torchrun --nproc_per_node N sample.py ...`) and one run per output folder.

Every rank loads the pipeline. Rank 0 locks `--out_dir` (`cxr.train.runlock`, the lock training takes on its output
folder), checks the folder against the run's settings and lists the requested images that are missing; every rank
gets that list. The batches a one-process run would make of it are dealt round-robin, batch k to rank k mod N, and
image i is still made from seed + i, so each image is made in the same batch as by one process and the folder is
the same. At the end the index rows of all ranks are gathered and rank 0 writes the index and the contact sheet.

A plain `sample.py` takes the same lock, so a second process started on a folder in use is refused instead of
writing an index of its own.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from tqdm.auto import tqdm

from cxr.config import SampleConfig
from cxr.runtime import DistInfo, broadcast_object, gather_object, setup_device_and_distributed
from cxr.sample.pngwrites import PngWrites, to_pil
from cxr.sample.samplefolder import (
    SamplingError,
    image_name,
    png_text,
    reconcile_folder,
    remove_stale_partials,
    shared_config,
    write_contact_sheet,
    write_index,
)
from cxr.train import runlock

INDEX_WRITE_SECONDS = 60.0  # rank 0 rewrites the index at most this often during a run (and always at the end)


@dataclass
class Claim:
    """The folder as the run found it. `rows` and `runs` (the index) are rank 0's only; `todo` (the requested
    images not on disk) and `present` (those on disk) are every rank's."""

    todo: list[int]
    present: list[int]
    rows: dict[int, dict]
    runs: list[dict]


def start_processes(device_name: str) -> tuple[DistInfo, torch.device, bool]:
    """(ranks, this rank's device, whether this call started the process group). Under torchrun (WORLD_SIZE > 1)
    the group is started from torchrun's environment (NCCL on CUDA, gloo on the CPU) and each rank takes
    cuda:LOCAL_RANK; in a single process nothing is started."""
    started_before = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        dist, device = setup_device_and_distributed(device_name)
    except RuntimeError as error:
        raise SamplingError(str(error)) from error
    return dist, device, dist.enabled and not started_before


def rank_batches(todo: list[int], batch_size: int, dist: DistInfo) -> list[list[int]]:
    """This rank's batches: those of a one-process run (`todo` in order, `batch_size` at a time), dealt
    round-robin over the ranks."""
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    return batches[dist.rank :: dist.world_size]


def _in_use(out_dir: Path, holder: runlock.LockInfo) -> SamplingError:
    path = Path(out_dir) / runlock.LOCK_NAME
    if runlock.holder_alive(holder) is None:
        return SamplingError(
            f"--out_dir {out_dir} is locked by a run on another machine ({holder.describe()}; lock file {path}); "
            f"this host ({socket.gethostname()}) cannot check whether it still runs. If it does, choose another "
            f"--out_dir; if it has ended, delete {path} and start again"
        )
    return SamplingError(
        f"--out_dir {out_dir} is in use by another run ({holder.describe()}; lock file {path}). Two processes "
        "filling one folder would each write their own index. Wait for that run to finish or choose another "
        "--out_dir; to share one run's images over several processes or GPUs, start it with "
        "`torchrun --nproc_per_node N sample.py ...`"
    )


def refuse_if_in_use(out_dir: Path, dist: DistInfo) -> None:
    """Rank 0, before the model loads: SamplingError when a live run holds the lock of `out_dir` (the lock itself
    is taken later, by `claim_folder`, so that a run that fails to load leaves no folder behind)."""
    if not dist.is_main:
        return
    holder = runlock.read_lock(Path(out_dir) / runlock.LOCK_NAME)
    if holder is not None and runlock.holder_alive(holder) is not False:
        raise _in_use(out_dir, holder)


def lock_out_dir(out_dir: Path) -> runlock.RunLock:
    """Lock `out_dir` (created if needed) for this run; SamplingError naming the run that holds it."""
    try:
        return runlock.acquire(out_dir, flag="--out_dir")
    except runlock.RunLockError as error:
        holder = runlock.read_lock(Path(out_dir) / runlock.LOCK_NAME)
        raise (SamplingError(str(error)) if holder is None else _in_use(out_dir, holder)) from None
    except OSError as error:
        raise SamplingError(
            f"--out_dir: cannot create the lock file in {out_dir} ({error.strerror or error}); choose a folder you "
            "can write to"
        ) from None


def claim_folder(
    out_dir: Path, identity: dict, requested: list[int], dist: DistInfo, held: contextlib.ExitStack
) -> Claim:
    """Rank 0 locks the folder for the run's life (released by `held`), reconciles its index with the images on
    disk (refusing a folder made with other settings) and lists what is missing; every rank gets the same list
    or the same error."""
    claim, error = None, None
    if dist.is_main:
        try:
            held.enter_context(lock_out_dir(out_dir))
            rows, runs = reconcile_folder(out_dir, identity)
            remove_stale_partials(out_dir)
            on_disk = {i for i in requested if (out_dir / image_name(i)).exists()}
            todo = [i for i in requested if i not in on_disk]
            claim = Claim(todo, sorted(on_disk), rows, runs)
        except SamplingError as caught:
            error = caught
    lists = None if claim is None else (claim.todo, claim.present)
    lists, message = broadcast_object((lists, None if error is None else str(error)), dist)
    if error is not None:
        raise error
    if message is not None:
        raise SamplingError(message)
    return claim if claim is not None else Claim(*lists, rows={}, runs=[])


def stop_processes(started: bool) -> None:
    """Destroy the process group `start_processes` started (nothing when it started none)."""
    if started and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- one rank's part


def check_finite(images: np.ndarray, batch: list[int], dtype_name: str) -> None:
    if not np.isfinite(images).all():
        hint = (
            "fp16 overflow in the UNet or VAE? Rerun with --dtype bf16 or --dtype fp32"
            if dtype_name == "float16"
            else "Check the adapter (--lora_path: from a training run that diverged?), --lora_scale and "
            "--guidance_scale"
        )
        raise SamplingError(
            f"images {batch[0]}..{batch[-1]} came out NaN/inf in {dtype_name}; nothing of this "
            f"batch was written. {hint} (the images already written are kept and skipped)."
        )


class RankRun:
    """One rank's part of a sampling run: its batches, its image writes and (rank 0) the folder's index and run
    record."""

    def __init__(self, cfg: SampleConfig, claim: Claim, identity: dict, dist: DistInfo, device, dtype_name, adapter):
        self.cfg, self.claim, self.identity, self.dist = cfg, claim, identity, dist
        self.device, self.dtype_name = device, dtype_name
        self.out_dir = Path(cfg.out_dir)
        self.adapter = adapter.file.name if adapter else None  # shared with the images: never a local path
        self.merged = bool(adapter is not None and cfg.merge_lora)
        self.record = {
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": shared_config(cfg, identity["base_model"]),
            "device": str(device),
            "dtype": dtype_name,
            "adapter_file": adapter.file.name if adapter else None,
            "requested": [cfg.start_index, cfg.start_index + cfg.num_images],
            "processes": dist.world_size,
            "made": 0,
            "skipped": len(claim.present),
        }
        self.runs = [*claim.runs, self.record]
        self.generation_seconds = 0.0
        to_image = functools.partial(to_pil, grayscale=cfg.grayscale_out, bit_depth=cfg.bit_depth)
        image_fields = {"device": device.type, "dtype": dtype_name, "lora_merged": self.merged}
        self.writes = PngWrites(claim.rows, [], image_fields, to_image)

    def generate(self, pipe, batches: list[list[int]], generate_batch: Callable) -> None:
        """Make `batches` with `generate_batch` (cxr.sample.sampling's) and write their files, image i from
        seed + i; rank 0 rewrites the index now and then."""
        cfg = self.cfg
        last_index_write = time.perf_counter()
        progress = tqdm(total=sum(map(len, batches)), unit="img", desc="sampling", disable=not self.dist.is_main)
        with progress:
            for batch in batches:
                batch_started = time.perf_counter()
                images = generate_batch(
                    pipe,
                    [cfg.seed + i for i in batch],
                    prompt=cfg.prompt,
                    negative_prompt=cfg.negative_prompt,
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    height=cfg.height,
                    width=cfg.width,
                )
                self.generation_seconds += time.perf_counter() - batch_started  # output_type="np" synchronised
                check_finite(images, batch, self.dtype_name)
                self.writes.collect()
                for index, rgb in zip(batch, images):
                    text = png_text(
                        self.identity,
                        index=index,
                        adapter=self.adapter,
                        device=self.device.type,
                        dtype=self.dtype_name,
                        merged=self.merged,
                    )
                    self.writes.submit(self.out_dir / image_name(index), index, cfg.seed + index, rgb, text)
                progress.update(len(batch))
                if time.perf_counter() - last_index_write > INDEX_WRITE_SECONDS:
                    self.write_index(len(self.writes.made), self.generation_seconds)
                    last_index_write = time.perf_counter()
            self.writes.collect()

    def write_index(self, made: int, generation_seconds: float) -> tuple[Path, Path] | None:
        """Rank 0: index.json / index.csv with every image of the folder known to this rank."""
        if not self.dist.is_main:
            return None
        self.record["made"] = made
        self.record["images_per_second"] = round(made / generation_seconds, 4) if generation_seconds else None
        return write_index(self.out_dir, self.identity, self.writes.rows, self.runs)

    def finish(self) -> tuple[list[Path], list[Path], float, Path | None]:
        """Gather the images every rank made; rank 0 indexes them all and draws the contact sheet; every rank
        waits for that. Returns (made, skipped, generation seconds of the slowest rank, contact sheet)."""
        mine = (
            {} if self.dist.is_main else self.writes.rows,  # rank 0's rows are in its own index already
            [p.name for p in self.writes.made],
            [p.name for p in self.writes.skipped],
            self.generation_seconds,
        )
        everyone = gather_object(mine, self.dist)
        made = sorted(self.out_dir / name for _, names, _, _ in everyone for name in names)
        skipped = [self.out_dir / image_name(i) for i in self.claim.present]
        skipped = sorted(skipped + [self.out_dir / name for _, _, names, _ in everyone for name in names])
        seconds = max(part[3] for part in everyone)
        sheet = None
        if self.dist.is_main:
            for rows, *_ in everyone:
                self.writes.rows.update(rows)
            self.write_index(len(made), seconds)
            rows = self.writes.rows
            sheet_paths = [self.out_dir / rows[i]["file"] for i in sorted(rows)[: self.cfg.contact_sheet]]
            sheet = write_contact_sheet(self.out_dir, sheet_paths) if self.cfg.contact_sheet else None
        sheet = broadcast_object(sheet, self.dist)  # every rank returns once the folder is complete
        return made, skipped, seconds, sheet

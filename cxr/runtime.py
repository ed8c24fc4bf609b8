"""The process and the device: dtypes, distributed setup, collectives, clocks, peak memory, signals, exit status.

Used by training, the benchmark and sampling, so that each of these has one home:
    DTYPES / compute_dtype / autocast_dtype   the one dtype table (flag value -> torch dtype)
    DistInfo, setup_device_and_distributed    rank, world size and device (torchrun's env vars)
    barrier, broadcast_object, warn_on_main   rank-aware helpers (no-ops / plain in a single process)
    wrap_ddp                                  the DDP wrapper of a module (None in a single process)
    synchronize, Throughput                   wait for the device before reading a clock; images/s
    reset_peak_memory, peak_memory_mib        peak memory, measured one way (see peak_memory_mib)
    StopFlag, exit_code                       SIGINT/SIGTERM -> stop at the next step; 130 / 143 on exit
    TrainingError                             a run cannot start or continue (names the flag or file)
    package_versions                          the versions a run records (cxr, torch, diffusers, ...)
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed

from cxr.model.loading import pick_device


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says which flag/file and what to do."""


# Flag values of --mixed_precision (train), --dtype (sample, bench) -> torch dtype. "no" is training's fp32.
DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    """The dtype of the frozen weights for a flag value of DTYPES."""
    return DTYPES[name]


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype for a flag value of DTYPES; None (no autocast) for float32."""
    dtype = DTYPES[name]
    return None if dtype == torch.float32 else dtype


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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return info, device


def shutdown_distributed() -> None:
    """Destroy the process group a torchrun run created (nothing in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def warn_on_main(info: DistInfo, message: str) -> None:
    """warnings.warn on rank 0 only: every rank comes to the same conclusion, one report is enough."""
    if info.is_main:
        warnings.warn(message, stacklevel=2)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch.distributed.barrier()


def broadcast_object(value, info: DistInfo):
    """Rank 0's `value` on every rank."""
    if not info.enabled:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device):
    """`module` in DistributedDataParallel (on cuda: its device) when several processes run, else None."""
    if not info.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        gradient_as_bucket_view=True,
    )


# ------------------------------------------------------------------------------------ clocks and memory


def synchronize(device) -> None:
    """Wait for the queued CUDA work of `device` (a torch.device or a name); nothing on the CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Images/s since the last log, two ways: of the training steps alone (`measure()[0]`: validation and
    checkpoints `restart` its clock, so their time is left out) and of the wall clock (`measure()[1]`: everything
    since the last log); `overall()` is the wall-clock figure of the whole loop."""

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


def _proc_status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_memory(device) -> bool:
    """Start a new peak-memory window; returns whether the counter could actually be reset (on the CPU: the
    kernel's peak-RSS counter VmHWM, through /proc/self/clear_refs, Linux only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_mib(device) -> float:
    """CUDA: peak bytes allocated by tensors on `device`; CPU: peak resident set size of this process, in MiB.

    On the CPU this reads VmHWM rather than getrusage's ru_maxrss: both are the kernel's peak RSS, but only VmHWM
    can be reset (reset_peak_memory), which the benchmark needs for per-round windows. Without a reset the two
    agree. ru_maxrss is the fallback where /proc is missing (macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm_kib = _proc_status_kib("VmHWM")
    if hwm_kib is not None:
        return hwm_kib / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


# -------------------------------------------------------------------------------------------- signals


class StopFlag:
    """SIGINT/SIGTERM set `signal_name`; the loop checkpoints at the next step boundary and returns."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def quiet_tensorboard_thread_errors() -> None:
    """TensorBoard's writer thread keeps a write error (a full disk) and the next call in the loop raises it, where
    train.py names the folder in one line; the thread also printed its own raw traceback beside that line."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "cxr_quiet", False):
        return

    def hook(args):
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.cxr_quiet = True
    threading.excepthook = hook


def package_versions() -> dict[str, str]:
    """The versions of cxr, torch, diffusers, transformers and Python this process runs (config.json records
    them)."""
    import diffusers
    import transformers

    from cxr import __version__

    return {
        "cxr": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def exit_code(summary: dict) -> int:
    """Process exit status for a summary: 0 when finished, 128 + signal number when stopped by a signal
    (130 SIGINT, 143 SIGTERM: what shells and schedulers expect), 0 for a simulated stop."""
    name = summary.get("signal")
    if name in ("SIGINT", "SIGTERM"):
        return 128 + int(signal.Signals[name])
    return 0

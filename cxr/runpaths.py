"""Every path of a training run's folder (--output_dir), named once: `RunPaths`.

    OUTPUT_DIR/
      manifest.json                   the train/held-out split, fixed at the first start (cxr.data.runsplit)
      config.json                     every flag, versions and resolved settings (written at each start)
      summary.json                    what the run returned (written at its end)
      checkpoints/checkpoint-<step>/  resumable state (cxr.train.checkpoint)
      lora_unet/                      the adapter for users (cxr.model.adapter_files)
      logs/<run name>/                TensorBoard; --logging_dir moves it
      cache/                          latent caches; --cache_dir moves them
      .cxr-run.lock                   held for the run's life (cxr.train.runlock)
      previous-run-<UTC time>/        an earlier run moved aside by --overwrite_output_dir

Standard library only: the demo and the GPU check read run folders before torch is installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".cxr-run.lock"
PREVIOUS_RUN_PREFIX = "previous-run-"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (matched by CHECKPOINT_NAME)."""
    return f"{CHECKPOINT_PREFIX}{step}"


@dataclass(frozen=True)
class RunPaths:
    """The paths of one run folder. `logs` and `cache` are the TensorBoard and latent-cache folders the run uses:
    inside `root` unless --logging_dir / --cache_dir put them elsewhere (see `of`)."""

    root: Path
    logs: Path
    cache: Path

    @classmethod
    def of(cls, output_dir, logging_dir=None, cache_dir=None) -> RunPaths:
        """The folder `output_dir`, with the --logging_dir and --cache_dir flags applied (empty: the defaults)."""
        root = Path(output_dir)
        return cls(
            root=root,
            logs=Path(logging_dir) if logging_dir else root / "logs",
            cache=Path(cache_dir) if cache_dir else root / "cache",
        )

    @classmethod
    def of_checkpoint(cls, checkpoint) -> RunPaths:
        """The run folder that checkpoint folder `checkpoint` (OUTPUT_DIR/checkpoints/checkpoint-<step>) belongs
        to, with the default logs and cache folders (a checkpoint does not record where those were)."""
        return cls.of(Path(checkpoint).parent.parent)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    @property
    def adapter(self) -> Path:
        return self.root / "lora_unet"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

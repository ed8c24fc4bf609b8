"""TensorBoard logging for rank 0, and a writer with the same interface that does nothing for other ranks.

The loop calls the writer unconditionally; `make_writer(log_dir, rank)` decides who writes. Each run writes
into its own subfolder of the logging folder (`new_run_name`: output folder name + start time; a resume
reuses the name stored in its checkpoint), so TensorBoard lists runs by name and compares them, also in its
HParams tab (`add_hparams_start` / `add_hparams_end`: the hparams plugin's session summaries written into the
run's own folder, not into a second run folder as `SummaryWriter.add_hparams` does).
"""

from __future__ import annotations

import time
from pathlib import Path


class NullWriter:
    """Accepts every SummaryWriter call the loop makes and drops it (ranks > 0)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def add_hparams_start(self, *args, **kwargs) -> None:
        pass

    def add_hparams_end(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def new_run_name(output_dir: Path, log_dir: Path, now: float | None = None) -> str:
    """A new run's TensorBoard folder name in `log_dir`: the output folder's name and the local start time, e.g.
    `cxr-lora-20261129-201530` (several runs can share one --logging_dir and stay apart), with `-2`, `-3`, ...
    appended if that folder exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    name = base = f"{Path(output_dir).resolve().name}-{stamp}"
    suffix = 1
    while (Path(log_dir) / name).exists():
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def _summary_writer_class():
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    class RunWriter(SummaryWriter):
        """A SummaryWriter that also writes the HParams plugin's summaries into its own folder."""

        def add_hparams_start(self, hparam_dict: dict) -> None:
            """The run's hyperparameters (values: int, float, str, bool; None is left out).

            Only the session's start is written, no experiment summary: TensorBoard then builds the experiment
            from every run's hyperparameters (their union, and which ones differ between runs) and takes the
            metrics from the runs' scalar tags (the last `val/loss` is the final validation loss). An experiment
            summary in each run would make it pick one run's arbitrarily (`_find_experiment_tag`)."""
            _, start, _ = hparams({k: v for k, v in hparam_dict.items() if v is not None}, {})
            self._get_file_writer().add_summary(start)

        def add_hparams_end(self) -> None:
            """Mark the run finished (the HParams tab's status column)."""
            _, _, end = hparams({}, {})
            self._get_file_writer().add_summary(end)

    return RunWriter


def make_writer(log_dir: Path, rank: int = 0, purge_step: int | None = None):
    """A SummaryWriter on `log_dir` for rank 0, a NullWriter elsewhere. `purge_step`: on resume, events of
    this step and later that an earlier, interrupted part wrote are hidden by TensorBoard."""
    if rank != 0:
        return NullWriter()
    from cxr.runtime import quiet_tensorboard_thread_errors

    quiet_tensorboard_thread_errors()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return _summary_writer_class()(log_dir=str(log_dir), purge_step=purge_step)


def image_grid(images, columns: int | None = None, gap: int = 0, gap_value: float = 1.0):
    """(N, C, H, W) float in [0, 1] -> one (C, rows*H + (rows-1)*gap, columns*W + (columns-1)*gap) grid tensor
    for add_image; `gap` pixels of `gap_value` (white) between tiles, so dark-bordered X-rays do not run
    together. Cells without an image stay black."""
    import math

    import torch

    images = torch.as_tensor(images)
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = images.new_full(
        (channels, rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap), gap_value
    )
    for index in range(rows * columns):
        row, col = divmod(index, columns)
        top, left = row * (height + gap), col * (width + gap)
        grid[:, top : top + height, left : left + width] = images[index] if index < count else 0
    return grid


def config_markdown(config: dict, versions: dict | None = None) -> str:
    """The run config (and versions) as a Markdown table for add_text."""
    lines = ["| flag | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(config.items())]
    for key, value in sorted((versions or {}).items()):
        lines.append(f"| version: {key} | `{value}` |")
    return "\n".join(lines)

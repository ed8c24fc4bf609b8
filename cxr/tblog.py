"""TensorBoard logging for rank 0, and a writer with the same interface that does nothing for other ranks.

The loop calls the writer unconditionally; `make_writer(log_dir, rank)` decides who writes.
"""

from __future__ import annotations

from pathlib import Path


class NullWriter:
    """Accepts every SummaryWriter call the loop makes and drops it (ranks > 0)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_writer(log_dir: Path, rank: int = 0):
    """A torch SummaryWriter on `log_dir` for rank 0, a NullWriter elsewhere."""
    if rank != 0:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))


def image_grid(images, columns: int | None = None):
    """(N, C, H, W) float in [0, 1] -> one (C, rows*H, columns*W) grid tensor for add_image."""
    import math

    import torch

    images = torch.as_tensor(images)
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = images.new_zeros(channels, rows * height, columns * width)
    for index in range(count):
        row, col = divmod(index, columns)
        grid[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = images[index]
    return grid


def config_markdown(config: dict, versions: dict | None = None) -> str:
    """The run config (and versions) as a Markdown table for add_text."""
    lines = ["| flag | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(config.items())]
    for key, value in sorted((versions or {}).items()):
        lines.append(f"| version: {key} | `{value}` |")
    return "\n".join(lines)

"""The benchmark's data sections: decoding and resizing images through a DataLoader, and building and reloading the
latent cache.

input, cache   (registered in `cxr.perf.bench_sections.SECTION_FUNCTIONS`)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cxr.data.dataset import scan_dataset
from cxr.data.imageio import read_grayscale
from cxr.data.latents import build_or_load_latent_cache
from cxr.data.phantoms import write_phantoms
from cxr.data.preprocess import Preprocess, to_model_input
from cxr.perf.bench_context import Context, Row, throughput_row, time_interleaved


class _DecodeDataset:
    """Decode + resize files exactly as the latent-cache build does (torch Dataset protocol)."""

    def __init__(self, paths: list[Path], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return to_model_input(read_grayscale(self.paths[index]), Preprocess(self.resolution))


def write_bench_phantoms(out_dir: Path, count: int, size: int, seed: int) -> list[Path]:
    """`count` 8-bit PNG phantoms of `size` x `size` pixels (NIH ChestX-ray14 files are 1024 px 8-bit PNGs)."""
    return write_phantoms(out_dir, count, seed=seed, sizes=((size, size),), formats=("png8",))


def section_input(ctx: Context) -> list[Row]:
    """Decode + resize images/s through a DataLoader, per worker count."""
    cfg = ctx.cfg
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        paths = write_bench_phantoms(Path(tmp), cfg.input_images, cfg.input_size, cfg.seed)
        dataset = _DecodeDataset(paths, cfg.resolution)
        for workers in cfg.worker_counts:
            loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers, persistent_workers=workers > 0)

            def epoch(loader=loader):
                for _ in loader:
                    pass

            timing = time_interleaved({"epoch": epoch}, torch.device("cpu"), warmup=1, steps=1, repeats=cfg.repeats)[
                "epoch"
            ]
            rows.append(
                throughput_row(
                    ctx,
                    "input",
                    f"decode+resize, {workers} workers",
                    timing,
                    len(paths),
                    note=f"{cfg.input_size} px 8-bit PNG -> {cfg.resolution} px; ms per epoch of {len(paths)}",
                )
            )
            del loader
    return rows


def section_cache(ctx: Context) -> list[Row]:
    """Latent-cache build images/s (decode, resize, VAE encode) and reload images/s."""
    cfg = ctx.cfg
    vae = ctx.models()["vae"]
    bench_dtype = vae.dtype
    vae.float()  # training keeps the VAE in float32 to cache its posterior exactly
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        write_bench_phantoms(Path(tmp) / "images", cfg.cache_images, cfg.input_size, cfg.seed)
        records = scan_dataset(Path(tmp) / "images")
        workers = max(cfg.worker_counts)

        def cache_in(folder: Path):
            return build_or_load_latent_cache(
                records,
                vae,
                resolution=cfg.resolution,
                pad_to_square=False,
                random_flip=False,
                cache_dir=folder,
                device=ctx.device,
                batch_size=cfg.batch_size,
                num_workers=workers,
                vae_id=f"bench-{cfg.arch}",
            )

        builds = iter(range(10**6))
        build = lambda: cache_in(Path(tmp) / f"cache-{next(builds)}")  # a fresh folder: every call builds  # noqa: E731
        load = lambda: cache_in(Path(tmp) / "cache-0")  # noqa: E731

        with torch.no_grad():
            timing = time_interleaved({"build": build}, ctx.device, warmup=0, steps=1, repeats=1)["build"]
            flops = ctx.flops.get("vae_encoder")
            rows.append(
                throughput_row(
                    ctx,
                    "cache",
                    f"build, {workers} workers",
                    timing,
                    len(records),
                    flops,
                    note=f"{len(records)} images {cfg.input_size} px -> {cfg.resolution} px latents; one build",
                )
            )
            timing = time_interleaved({"load": load}, ctx.device, warmup=0, steps=1, repeats=cfg.repeats)["load"]
            rows.append(
                throughput_row(
                    ctx,
                    "cache",
                    "reload (cache hit)",
                    timing,
                    len(records),
                    note="same images, resolution, crop and VAE: read back, nothing encoded",
                )
            )
    if bench_dtype != torch.float32:
        vae.to(dtype=bench_dtype)
    return rows

"""What the benchmark's sections share: the settings (BenchConfig), the table row, the context with the
random-weight models, our training step built as training builds it (`cxr.train.step.TrainStep`), and the
interleaved timer. The sections are registered in `cxr.perf.bench_sections.SECTION_FUNCTIONS`; the command is
`python -m cxr.bench`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cxr import DEFAULT_PROMPT
from cxr.config import TRAIN_SEED_MAX, TrainConfig
from cxr.data.latents import encode_prompt
from cxr.fileio import check_writable_file
from cxr.flags import ConfigError, check_choices, flag
from cxr.model import ddpm
from cxr.model.loading import pick_device, vae_scale_factor
from cxr.model.lora import inject_lora, lora_parameters
from cxr.model.tiny import build_components
from cxr.runtime import DTYPES, DistInfo, peak_memory_mib, reset_peak_memory, synchronize
from cxr.train.step import DataOrder, TrainStep

SECTIONS = ("peak", "flops", "ops", "train", "lora", "cuda", "memory", "activations", "input", "cache", "sampling")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class BenchConfig:
    """Benchmark LoRA training and sampling (random-weight models; nothing is downloaded)."""

    arch: str = flag(
        "tiny", "model architecture: tiny (tests, seconds) or sd15 (full SD v1.5, random weights)", ("tiny", "sd15")
    )
    batch_size: int = flag(2, "images per training step", bounds=(1, 4096))
    resolution: int = flag(
        256, "image resolution in pixels (latents are resolution / 8, the VAE's downsampling)", bounds=(8, 4096)
    )
    steps: int = flag(3, "timed steps per round", bounds=(1, 10**6))
    warmup: int = flag(1, "untimed steps per variant before timing", bounds=(0, 10**6))
    repeats: int = flag(3, "timed rounds per variant; the median round is reported", bounds=(1, 1000))
    device: str = flag("auto", "cuda, cpu or auto")
    dtype: str = flag("auto", "compute dtype of the frozen base (auto: bf16 on CUDA, fp32 on CPU)", DTYPE_CHOICES)
    sections: str = flag(",".join(SECTIONS), f"comma-separated sections to run, from {','.join(SECTIONS)}")
    lora_rank: int = flag(16, "LoRA rank", bounds=(1, 1024))
    lora_alpha: float = flag(16.0, "LoRA alpha", bounds=(1e-6, 1e4))
    workers: str = flag("0,1,2", "comma-separated DataLoader worker counts for the input section")
    input_images: int = flag(32, "phantom images decoded per round in the input section", bounds=(1, 10**6))
    input_size: int = flag(
        1024, "side in pixels of the phantom PNGs of the input section (NIH: 1024)", bounds=(8, 16384)
    )
    cache_images: int = flag(8, "images encoded in the latent-cache section", bounds=(1, 10**6))
    cache_rows: int = flag(
        20000,
        "rows of the synthetic device-resident latent cache of the train step (~ the dataset size)",
        bounds=(1, 10**8),
    )
    sample_steps: int = flag(25, "denoising steps per image in the sampling section", bounds=(1, 1000))
    guidance_scale: float = flag(3.0, "classifier-free guidance scale of the sampling section", bounds=(0.0, 100.0))
    seed: int = flag(0, "seed for the random weights and inputs", bounds=(0, TRAIN_SEED_MAX))
    tf32: bool = flag(True, "TensorFloat-32 for float32 matmuls and convolutions on CUDA, as train.py --tf32")
    out: Path | None = flag(None, "also write the table, machine and settings to this JSON file")

    def validate(self) -> None:
        check_choices(self)
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"--device: must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.resolution % 8:
            raise ConfigError(f"--resolution: must be a multiple of 8, got {self.resolution}")
        if self.arch not in ("tiny", "sd15"):
            raise ConfigError(f"--arch: {self.arch!r} is not one of ['tiny', 'sd15']")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype: {self.dtype!r} is not one of {list(DTYPE_CHOICES)}")
        unknown = sorted(set(self.section_list) - set(SECTIONS))
        if unknown or not self.section_list:
            raise ConfigError(f"--sections: unknown {unknown or 'empty list'}; choose from {','.join(SECTIONS)}")
        try:
            counts = self.worker_counts
        except ValueError:
            counts = [-1]
        if not counts or min(counts) < 0:
            raise ConfigError(f"--workers: expected comma-separated counts >= 0 like 0,1,2, got {self.workers!r}")
        if self.out is not None:  # before the benchmark runs, not after minutes of it
            check_writable_file(self.out, "--out", ConfigError)

    @property
    def section_list(self) -> list[str]:
        return [s.strip() for s in self.sections.split(",") if s.strip()]

    @property
    def worker_counts(self) -> list[int]:
        return [int(w) for w in self.workers.split(",") if w.strip()]


@dataclass
class Row:
    """One line of the table. Throughputs are per image; `None` means not applicable or not measured."""

    section: str
    variant: str
    images_per_s: float | None = None
    ms_per_step: float | None = None
    peak_mem_mb: float | None = None
    gflop_per_image: float | None = None
    tflop_per_s: float | None = None
    percent_of_peak: float | None = None
    note: str = ""
    rounds_ms: list[float] = field(default_factory=list)  # every timed round (JSON only): how noisy it was


@dataclass
class TrainState:
    """Our training step and what it works on: LoRA UNet, a device-resident latent cache, the prompt
    embedding, the data order. `run()` is one optimizer step exactly as the training loop calls it."""

    unet: torch.nn.Module
    step: TrainStep
    latents_mean: torch.Tensor
    latents_std: torch.Tensor
    prompt_embedding: torch.Tensor
    data: DataOrder

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.step.params

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    def run(self) -> None:
        self.step(self.data.next_indices())


@dataclass
class Context:
    """What the sections share: settings, device, dtype, models, our train state, the measured peak and FLOPs."""

    cfg: BenchConfig
    device: object
    dtype: object
    peak_tflop_per_s: float | None = None
    flops: dict = field(default_factory=dict)  # name -> FLOPs per image (counted)
    ops: dict = field(default_factory=dict)  # aten ops of one step (counted; the ops section)
    components: dict | None = None
    state: TrainState | None = None
    noise_schedule: object = None

    def models(self) -> dict:
        """The random-weight components on the bench device in the bench dtype (built once)."""
        if self.components is None:
            self.components = build_components(self.cfg.arch, seed=self.cfg.seed)
            for name in ("unet", "vae", "text_encoder"):
                self.components[name].to(device=self.device, dtype=self.dtype)
        return self.components

    def latent_shape(self) -> tuple[int, int, int]:
        """(UNet input channels, resolution / f, resolution / f), f the VAE's downsampling (8 for SD v1.5)."""
        parts = self.models()
        size = self.cfg.resolution // vae_scale_factor(parts["vae"].config)
        return (parts["unet"].config.in_channels, size, size)

    def schedule(self):
        """DDPM tables of the base scheduler config, on the device (as the training loop builds them)."""
        if self.noise_schedule is None:
            self.noise_schedule = ddpm.make_schedule(dict(self.models()["scheduler"].config), self.device)
        return self.noise_schedule

    def train_state(self) -> TrainState:
        """Our step on the shared UNet (LoRA injected on first use)."""
        if self.state is None:
            self.state = build_train_state(self)
        return self.state


def resolve_device_dtype(cfg: BenchConfig):
    device = pick_device(cfg.device)
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, DTYPES[name]


# ---------------------------------------------------------------------------------------------- the step


def synthetic_posterior(rows: int, shape: tuple[int, int, int], device, seed: int):
    """A latent cache of `rows` random VAE posteriors (mean, std) of latent `shape`, float32 on `device` like the
    real cache."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(rows, *shape, generator=generator)
    std = torch.rand(rows, *shape, generator=generator) * 0.1 + 0.01
    return mean.to(device), std.to(device)


def train_config(ctx: Context, **overrides) -> TrainConfig:
    """The flags the bench's step runs with: train.py's defaults (Min-SNR gamma, clipping, LR, weight decay) at
    the bench batch size, dtype, seed and LoRA size."""
    precision = {dtype: name for name, dtype in DTYPES.items() if name != "fp32"}[ctx.dtype]  # float32 -> "no"
    return TrainConfig(
        train_batch_size=ctx.cfg.batch_size,
        mixed_precision=precision,
        seed=ctx.cfg.seed,
        lora_rank=ctx.cfg.lora_rank,
        lora_alpha=ctx.cfg.lora_alpha,
        **overrides,
    )


def make_step(
    ctx: Context,
    *,
    model,
    params,
    latents_mean,
    latents_std,
    prompt_embedding,
    optimizer=None,
    cuda_graph: bool = False,
) -> TrainStep:
    """The training step (`cxr.train.step.TrainStep`, as train() builds it) on the given model and cache;
    `optimizer` shares an existing one, `cuda_graph` builds it as --cuda_graph on does (capturable), else as
    --cuda_graph off."""
    return TrainStep(
        train_config(ctx, cuda_graph="on" if cuda_graph else "off", tf32=ctx.cfg.tf32),
        model=model,
        params=params,
        schedule=ctx.schedule(),
        latents_mean=latents_mean,
        latents_std=latents_std,
        scaling_factor=ctx.models()["vae"].config.scaling_factor,
        prompt_embeds=prompt_embedding,
        optimizer=optimizer,
    )


def build_train_state(ctx: Context) -> TrainState:
    """Inject our LoRA into the shared UNet and build the training loop's step over a synthetic latent cache."""
    cfg, parts = ctx.cfg, ctx.models()
    unet = parts["unet"]
    torch.manual_seed(cfg.seed)  # the LoRA A init, as in training
    inject_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    unet.train()
    prompt_embedding = encode_prompt(parts["tokenizer"], parts["text_encoder"], DEFAULT_PROMPT, ctx.device).to(
        ctx.dtype
    )
    mean, std = synthetic_posterior(cfg.cache_rows, ctx.latent_shape(), ctx.device, cfg.seed)
    data = DataOrder(
        cfg.cache_rows, batch_size=cfg.batch_size, grad_accum_steps=1, dist=DistInfo(), seed=cfg.seed, device=ctx.device
    )
    step = make_step(
        ctx,
        model=unet,
        params=lora_parameters(unet),
        latents_mean=mean,
        latents_std=std,
        prompt_embedding=prompt_embedding,
    )
    return TrainState(unet, step, mean, std, prompt_embedding, data)


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    seconds_per_call: float  # median over rounds
    rounds: list[float]
    peak_mem_mb: float
    peak_reset: bool  # False: the memory figure is the process-lifetime peak


def time_interleaved(
    variants: dict[str, Callable[[], object]], device, *, warmup: int, steps: int, repeats: int
) -> dict[str, Timing]:
    """Seconds per call of each variant: warm-up calls, then `repeats` rounds of `steps` timed calls.

    Rounds alternate between the variants so that load from other processes spreads over all of them.
    """
    for call in variants.values():
        for _ in range(warmup):
            call()
    synchronize(device)
    rounds = {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    resets = {name: True for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            resets[name] &= reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                call()
            synchronize(device)
            rounds[name].append((time.perf_counter() - start) / steps)
            peaks[name] = max(peaks[name], peak_memory_mib(device))
    return {name: Timing(statistics.median(rounds[name]), rounds[name], peaks[name], resets[name]) for name in variants}


def throughput_row(
    ctx: Context,
    section: str,
    variant: str,
    timing: Timing,
    images_per_call: int,
    flops_per_image: float | None = None,
    note: str = "",
) -> Row:
    """A table row from a timing: images/s, ms per call, peak memory and (given FLOPs) TFLOP/s and % of peak."""
    images_per_s = images_per_call / timing.seconds_per_call
    tflops = flops_per_image * images_per_s / 1e12 if flops_per_image else None
    percent = 100.0 * tflops / ctx.peak_tflop_per_s if tflops and ctx.peak_tflop_per_s else None
    if not timing.peak_reset:
        note = "; ".join(filter(None, [note, "memory: process-lifetime peak"]))
    return Row(
        section,
        variant,
        images_per_s,
        1000.0 * timing.seconds_per_call,
        timing.peak_mem_mb,
        flops_per_image / 1e9 if flops_per_image else None,
        tflops,
        percent,
        note,
        [1000.0 * seconds for seconds in timing.rounds],
    )

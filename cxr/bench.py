"""Benchmark: where the time of LoRA training and sampling goes, on the CPU or on CUDA.

    python -m cxr.bench --arch tiny                    # the tiny architecture, CPU: a few minutes at most
    python -m cxr.bench --arch sd15 --batch_size 2 --steps 1 --warmup 1 --repeats 3 \
        --sections peak,flops,train,lora --out bench-sd15-cpu.json          # the issue's CPU comparison
    python -m cxr.bench --arch sd15 --batch_size 16 --device cuda --dtype bf16 --steps 20 --warmup 5 \
        --out bench-cuda.json                                              # one GPU, every section

Models are built with random weights from the SD v1.5 (or tiny) architecture (`cxr.tiny`); nothing is
downloaded. Sections (`--sections`, comma-separated):

- `peak`: measured dense matmul throughput in the bench dtype, the denominator of "% of peak".
- `flops`: model FLOPs per image counted with `torch.utils.flop_counter.FlopCounterMode` on the models
  being timed (UNet forward, UNet forward + backward with the frozen base and LoRA, VAE encoder, text
  encoder per prompt).
- `train`: our training step (cached latents and prompt embedding resident on the device) against the
  step generic trainers run (VAE-encode the pixel batch and text-encode the prompt every step, then the
  same UNet step), same model, same batch, same run, interleaved.
- `lora`: the same UNet step with our LoRA (`cxr.lora`) and with a stock peft LoRA on the same targets.
- `cuda`: eager vs `--cuda_graph` vs `torch.compile` of our step (CUDA only).
- `memory`: the memory budget of training: a child process that holds only what the training loop
  holds (UNet + LoRA + optimizer + latent cache) runs our step.
- `activations`: what the memory budget is made of, counted rather than measured: the bytes autograd saves
  for the backward pass in one forward of our step (at the bench batch and dtype), and their sum with the
  frozen weights, the LoRA + AdamW state and the latent cache: a lower bound of the training peak that
  needs no GPU.
- `input`: decode + resize images/s per DataLoader worker count, over 8-bit PNG phantoms (1024 px, like NIH).
- `cache`: latent-cache build images/s (VAE encoding included) and reload images/s.
- `sampling`: images/s of sampling with classifier-free guidance.

Timing: `--warmup` untimed steps per variant, then `--repeats` rounds of `--steps` timed steps; the
variants of a section are interleaved round by round so that a noisy shared machine hurts them alike;
the figure is the median round. CUDA work is synchronised before every clock read.
Peak memory: on CUDA `torch.cuda.max_memory_allocated`, reset before each timed round. On the CPU the
peak resident set size (VmHWM) of the bench process, reset before each round through
`/proc/self/clear_refs` (Linux); it includes every model resident at the time. Where that reset is not
available the figure is the process-lifetime peak, and the table says so.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from cxr.config import ConfigError, flag, parse_config

SECTIONS = ("peak", "flops", "train", "lora", "cuda", "memory", "activations", "input", "cache", "sampling")
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class BenchConfig:
    """Benchmark LoRA training and sampling (random-weight models; nothing is downloaded)."""

    arch: str = flag("tiny", "model architecture: tiny (tests, seconds) or sd15 (full SD v1.5, random weights)", ("tiny", "sd15"))
    batch_size: int = flag(2, "images per training step")
    resolution: int = flag(256, "image resolution in pixels (latents are resolution / 8, the VAE's downsampling)")
    steps: int = flag(3, "timed steps per round")
    warmup: int = flag(1, "untimed steps per variant before timing")
    repeats: int = flag(3, "timed rounds per variant; the median round is reported")
    device: str = flag("auto", "cuda, cpu or auto")
    dtype: str = flag("auto", "compute dtype of the frozen base (auto: bf16 on CUDA, fp32 on CPU)", DTYPES)
    sections: str = flag(",".join(SECTIONS), f"comma-separated sections to run, from {','.join(SECTIONS)}")
    lora_rank: int = flag(16, "LoRA rank")
    lora_alpha: float = flag(16.0, "LoRA alpha")
    workers: str = flag("0,1,2", "comma-separated DataLoader worker counts for the input section")
    input_images: int = flag(32, "phantom images decoded per round in the input section")
    input_size: int = flag(1024, "side in pixels of the phantom PNGs of the input section (NIH: 1024)")
    cache_images: int = flag(8, "images encoded in the latent-cache section")
    cache_rows: int = flag(20000, "rows of the synthetic device-resident latent cache of the train step (~ the dataset size)")
    sample_steps: int = flag(25, "denoising steps per image in the sampling section")
    guidance_scale: float = flag(3.0, "classifier-free guidance scale of the sampling section")
    seed: int = flag(0, "seed for the random weights and inputs")
    out: Path | None = flag(None, "also write the table, machine and settings to this JSON file")

    def validate(self) -> None:
        for name in ("batch_size", "resolution", "steps", "repeats", "lora_rank", "input_images", "cache_images",
                     "cache_rows", "sample_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}: must be > 0, got {getattr(self, name)}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"--device: must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup: must be >= 0, got {self.warmup}")
        if self.resolution % 8:
            raise ConfigError(f"--resolution: must be a multiple of 8, got {self.resolution}")
        if self.arch not in ("tiny", "sd15"):
            raise ConfigError(f"--arch: {self.arch!r} is not one of ['tiny', 'sd15']")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        unknown = sorted(set(self.section_list) - set(SECTIONS))
        if unknown or not self.section_list:
            raise ConfigError(f"--sections: unknown {unknown or 'empty list'}; choose from {','.join(SECTIONS)}")
        try:
            counts = self.worker_counts
        except ValueError:
            counts = [-1]
        if not counts or min(counts) < 0:
            raise ConfigError(f"--workers: expected comma-separated counts >= 0 like 0,1,2, got {self.workers!r}")

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
    """Our training step and what it works on: LoRA UNet, AdamW, a device-resident latent cache, the prompt
    embedding, the data order. `run()` is one optimizer step exactly as the training loop calls it."""

    unet: object
    params: list
    optimizer: object
    latents_mean: object
    latents_std: object
    prompt_embedding: object
    data: object
    step: Callable

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
    components: dict | None = None
    state: TrainState | None = None
    noise_schedule: object = None

    def models(self) -> dict:
        """The random-weight components on the bench device in the bench dtype (built once)."""
        if self.components is None:
            from cxr.tiny import build_components

            self.components = build_components(self.cfg.arch, seed=self.cfg.seed)
            for name in ("unet", "vae", "text_encoder"):
                self.components[name].to(device=self.device, dtype=self.dtype)
        return self.components

    def latent_shape(self) -> tuple[int, int, int]:
        """(UNet input channels, resolution / f, resolution / f), f the VAE's downsampling (8 for SD v1.5)."""
        from cxr.models import vae_scale_factor

        parts = self.models()
        size = self.cfg.resolution // vae_scale_factor(parts["vae"].config)
        return (parts["unet"].config.in_channels, size, size)

    def schedule(self):
        """DDPM tables of the base scheduler config, on the device (as the training loop builds them)."""
        if self.noise_schedule is None:
            from cxr import ddpm

            self.noise_schedule = ddpm.make_schedule(dict(self.models()["scheduler"].config), self.device)
        return self.noise_schedule

    def train_state(self) -> TrainState:
        """Our step on the shared UNet (LoRA injected on first use)."""
        if self.state is None:
            self.state = build_train_state(self)
        return self.state


# ----------------------------------------------------------------------------------------------
# Clocks and memory


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def reset_peak_memory(device) -> bool:
    """Start a new peak-memory window; returns whether the counter could actually be reset."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_peak_rss()


def peak_memory_mb(device) -> float:
    """CUDA: peak bytes allocated by tensors on `device`; CPU: peak resident set size of this process."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm_kib = _proc_status_kib("VmHWM")
    if hwm_kib is not None:
        return hwm_kib / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


@dataclass
class Timing:
    seconds_per_call: float  # median over rounds
    rounds: list[float]
    peak_mem_mb: float
    peak_reset: bool  # False: the memory figure is the process-lifetime peak


def time_interleaved(variants: dict[str, Callable[[], object]], device, *, warmup: int, steps: int, repeats: int) -> dict[str, Timing]:
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
            peaks[name] = max(peaks[name], peak_memory_mb(device))
    return {
        name: Timing(statistics.median(rounds[name]), rounds[name], peaks[name], resets[name])
        for name in variants
    }


def throughput_row(ctx: Context, section: str, variant: str, timing: Timing, images_per_call: int,
                   flops_per_image: float | None = None, note: str = "") -> Row:
    """A table row from a timing: images/s, ms per call, peak memory and (given FLOPs) TFLOP/s and % of peak."""
    images_per_s = images_per_call / timing.seconds_per_call
    tflops = flops_per_image * images_per_s / 1e12 if flops_per_image else None
    percent = 100.0 * tflops / ctx.peak_tflop_per_s if tflops and ctx.peak_tflop_per_s else None
    if not timing.peak_reset:
        note = "; ".join(filter(None, [note, "memory: process-lifetime peak"]))
    return Row(section, variant, images_per_s, 1000.0 * timing.seconds_per_call, timing.peak_mem_mb,
               flops_per_image / 1e9 if flops_per_image else None, tflops, percent, note,
               [1000.0 * seconds for seconds in timing.rounds])


# ----------------------------------------------------------------------------------------------
# Sections


def resolve_device_dtype(cfg: BenchConfig):
    import torch

    from cxr.models import pick_device

    device = pick_device(cfg.device)
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return device, dtype


def measure_matmul_peak(device, dtype) -> float:
    """Dense matmul TFLOP/s in `dtype` on `device`: the best of a few timed square matmuls."""
    import torch

    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    calls = 20 if device.type == "cuda" else 3
    best = 0.0
    for _ in range(3):
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        synchronize(device)
        best = max(best, 2 * size**3 * calls / (time.perf_counter() - start) / 1e12)
    return best


def section_peak(ctx: Context) -> list[Row]:
    ctx.peak_tflop_per_s = measure_matmul_peak(ctx.device, ctx.dtype)
    name = str(ctx.dtype).replace("torch.", "")
    return [Row("peak", f"matmul {name}", tflop_per_s=ctx.peak_tflop_per_s, percent_of_peak=100.0,
                note="measured dense matmul; the denominator of % of peak")]


def _train_defaults():
    """The training loop's defaults (Min-SNR gamma, clipping, LR, weight decay), so the bench runs its step."""
    from cxr.config import TrainConfig

    return TrainConfig()


def synthetic_posterior(rows: int, shape: tuple[int, int, int], device, seed: int):
    """A latent cache of `rows` random VAE posteriors (mean, std) of latent `shape`, float32 on `device` like the
    real cache."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(rows, *shape, generator=generator)
    std = torch.rand(rows, *shape, generator=generator) * 0.1 + 0.01
    return mean.to(device), std.to(device)


def make_step(ctx: Context, *, model, params, latents_mean, latents_std, prompt_embedding, optimizer=None,
              generator=None, metrics=None, capturable: bool = False) -> tuple[Callable, object, object, object]:
    """`cxr.training.make_train_step` with the training loop's settings; returns (step, optimizer, generator, metrics)."""
    import torch

    from cxr.training import StepMetrics, make_optimizer, make_train_step

    defaults = _train_defaults()
    if optimizer is None:
        optimizer = make_optimizer(params, lr=defaults.learning_rate, weight_decay=defaults.adam_weight_decay,
                                   device=ctx.device, capturable=capturable)
    if generator is None:
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.cfg.seed)
    metrics = metrics or StepMetrics(ctx.device)
    autocast_dtype = None if ctx.dtype == torch.float32 else ctx.dtype
    step = make_train_step(
        model=model, params=params, optimizer=optimizer, schedule=ctx.schedule(),
        latents_mean=latents_mean, latents_std=latents_std, scaling_factor=ctx.models()["vae"].config.scaling_factor,
        prompt_embeds=prompt_embedding, generator=generator, metrics=metrics, batch_size=ctx.cfg.batch_size,
        snr_gamma=defaults.snr_gamma, max_grad_norm=defaults.max_grad_norm, autocast_dtype=autocast_dtype,
        scaler=torch.amp.GradScaler(ctx.device.type) if ctx.dtype == torch.float16 else None,
    )
    return step, optimizer, generator, metrics


def build_train_state(ctx: Context) -> TrainState:
    """Inject our LoRA into the shared UNet and build the training loop's step over a synthetic latent cache."""
    import torch

    from cxr import DEFAULT_PROMPT
    from cxr.latents import encode_prompt
    from cxr.lora import inject_lora, lora_parameters
    from cxr.training import DataOrder, DistInfo

    cfg, parts = ctx.cfg, ctx.models()
    unet = parts["unet"]
    torch.manual_seed(cfg.seed)  # the LoRA A init, as in training
    inject_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    unet.train()
    params = lora_parameters(unet)
    prompt_embedding = encode_prompt(parts["tokenizer"], parts["text_encoder"], DEFAULT_PROMPT, ctx.device).to(ctx.dtype)
    mean, std = synthetic_posterior(cfg.cache_rows, ctx.latent_shape(), ctx.device, cfg.seed)
    data = DataOrder(cfg.cache_rows, batch_size=cfg.batch_size, grad_accum_steps=1, dist=DistInfo(),
                     seed=cfg.seed, device=ctx.device)
    step, optimizer, _, _ = make_step(ctx, model=unet, params=params, latents_mean=mean, latents_std=std,
                                      prompt_embedding=prompt_embedding)
    return TrainState(unet, params, optimizer, mean, std, prompt_embedding, data, step)


def make_encode_every_step(ctx: Context) -> Callable[[], None]:
    """The step generic trainers run: tokenize and text-encode the prompt of every image, VAE-encode the pixel
    batch, then the same UNet step (our `make_train_step`, same UNet, LoRA and optimizer) on those latents.

    Pixels are already on the device (decoding is measured in the input section), which favours this baseline.
    """
    import torch

    from cxr import DEFAULT_PROMPT

    cfg, parts, state = ctx.cfg, ctx.models(), ctx.train_state()
    tokenizer, text_encoder, vae = parts["tokenizer"], parts["text_encoder"], parts["vae"]
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1)
    pixels = torch.rand(cfg.batch_size, 3, cfg.resolution, cfg.resolution, generator=generator, device=ctx.device)
    pixels = (pixels * 2 - 1).to(ctx.dtype)
    # Per-step buffers the step reads: this batch's posteriors and prompt embedding.
    mean = torch.zeros(cfg.batch_size, *state.latents_mean.shape[1:], device=ctx.device)
    std = torch.zeros_like(mean)
    prompt_embedding = torch.zeros_like(state.prompt_embedding)
    rows = torch.arange(cfg.batch_size, device=ctx.device).view(1, -1)
    step, _, _, _ = make_step(ctx, model=state.unet, params=state.params, latents_mean=mean, latents_std=std,
                              prompt_embedding=prompt_embedding, optimizer=state.optimizer)

    def encode_and_step() -> None:
        with torch.no_grad():
            ids = tokenizer([DEFAULT_PROMPT] * cfg.batch_size, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(ctx.device)
            embeddings = text_encoder(ids)[0]
            posterior = vae.encode(pixels).latent_dist
            mean.copy_(posterior.mean)
            std.copy_(posterior.std)
            prompt_embedding.copy_(embeddings[:1])
        step(rows)

    return encode_and_step


def section_train(ctx: Context) -> list[Row]:
    """Our cached step against the encode-every-step step: same UNet, LoRA, optimizer, batch; interleaved."""
    cfg, state = ctx.cfg, ctx.train_state()
    variants = {"cached": state.run, "encode": make_encode_every_step(ctx)}
    timings = time_interleaved(variants, ctx.device, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats)
    return [
        throughput_row(ctx, "train", "our step, cached latents", timings["cached"], cfg.batch_size,
                       ctx.flops.get("cached_step"), note="device-resident latent cache + prompt embedding"),
        throughput_row(ctx, "train", "encode every step", timings["encode"], cfg.batch_size,
                       ctx.flops.get("encode_every_step"),
                       note="+ tokenize, text encoder, VAE encoder per batch (pixels already on the device)"),
    ]


def _plain_copy(unet):
    """A deep copy of our LoRA UNet with every LoRALinear replaced by its frozen base Linear."""
    import copy

    from cxr.lora import lora_modules

    clone = copy.deepcopy(unet)
    for path, module in lora_modules(clone).items():
        parent_path, _, name = path.rpartition(".")
        setattr(clone.get_submodule(parent_path) if parent_path else clone, name, module.base)
    return clone


def peft_unet(ctx: Context):
    """The same base UNet with a stock peft LoRA on the same targets, rank and alpha (peft: a bench/test extra)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise RuntimeError(
            "--sections lora: the peft comparison needs peft, a test/benchmark extra: "
            "pip install -e '.[test]' (or drop `lora` from --sections)") from None
    from cxr.lora import DEFAULT_TARGETS

    unet = _plain_copy(ctx.train_state().unet)
    unet.add_adapter(LoraConfig(r=ctx.cfg.lora_rank, lora_alpha=ctx.cfg.lora_alpha, target_modules=list(DEFAULT_TARGETS)))
    unet.train()
    return unet


def section_lora(ctx: Context) -> list[Row]:
    """The UNet step (forward, backward, clip, AdamW) with our LoRA and with peft's, same base weights and batch."""
    cfg, state = ctx.cfg, ctx.train_state()
    theirs = peft_unet(ctx)
    params = [p for p in theirs.parameters() if p.requires_grad]
    step, _, _, _ = make_step(ctx, model=theirs, params=params, latents_mean=state.latents_mean,
                              latents_std=state.latents_std, prompt_embedding=state.prompt_embedding)
    variants = {"ours": state.run, "peft": lambda: step(state.data.next_indices())}
    timings = time_interleaved(variants, ctx.device, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats)
    count = sum(p.numel() for p in state.params)
    flops = ctx.flops.get("cached_step")
    rows = [
        throughput_row(ctx, "lora", "our LoRA", timings["ours"], cfg.batch_size, flops,
                       note=f"cxr.lora, {count} trainable parameters"),
        throughput_row(ctx, "lora", "peft LoRA", timings["peft"], cfg.batch_size, flops,
                       note=f"peft LoraConfig(r={cfg.lora_rank}, lora_alpha={cfg.lora_alpha:g}), "
                            f"{sum(p.numel() for p in params)} trainable parameters"),
    ]
    del theirs, step, variants
    _free_memory(ctx.device)
    return rows


def _free_memory(device) -> None:
    """Return what the last section dropped, so that later peak-memory windows start clean."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section_cuda(ctx: Context) -> list[Row]:
    """Our step eager, replayed from a CUDA graph (`--cuda_graph`) and with a compiled UNet (`--torch_compile`)."""
    import torch

    from cxr.training import capture_cuda_graph

    cfg, state = ctx.cfg, ctx.train_state()
    variants, failures = {"eager": state.run}, {}
    try:
        generator = torch.cuda.default_generators[ctx.device.index or 0]  # graph-safe, as train() uses it
        step, optimizer, generator, metrics = make_step(
            ctx, model=state.unet, params=state.params, latents_mean=state.latents_mean,
            latents_std=state.latents_std, prompt_embedding=state.prompt_embedding, generator=generator,
            capturable=True)
        replay = capture_cuda_graph(step, state.data.next_indices(), params=state.params, optimizer=optimizer,
                                    metrics=metrics, generator=generator)
        variants["cuda graph"] = lambda: replay(state.data.next_indices())
    except Exception as error:  # report and carry on: the other variants are still worth measuring
        failures["cuda graph"] = f"{type(error).__name__}: {error}"
    try:
        compiled = torch.compile(state.unet)
        step, _, _, _ = make_step(ctx, model=compiled, params=state.params, latents_mean=state.latents_mean,
                                  latents_std=state.latents_std, prompt_embedding=state.prompt_embedding)
        started = time.perf_counter()
        for _ in range(2):  # compilation happens here, outside the timed rounds
            step(state.data.next_indices())
        synchronize(ctx.device)
        compile_seconds = time.perf_counter() - started
        variants["torch.compile"] = lambda: step(state.data.next_indices())
    except Exception as error:
        failures["torch.compile"] = f"{type(error).__name__}: {error}"
    timings = time_interleaved(variants, ctx.device, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats)
    # channels_last is not a train.py option yet: measured here (after the others, same UNet) to decide on it.
    state.unet.to(memory_format=torch.channels_last)
    try:
        timings["eager, channels_last"] = time_interleaved({"eager": state.run}, ctx.device, warmup=cfg.warmup,
                                                           steps=cfg.steps, repeats=cfg.repeats)["eager"]
    finally:
        state.unet.to(memory_format=torch.contiguous_format)
    # cudnn.benchmark is not a train.py option either: it times conv algorithms per shape (our shapes are static)
    # but may pick different ones per process, so a resumed run would not be bit-identical. Measured to decide.
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        timings["eager, cudnn.benchmark"] = time_interleaved({"eager": state.run}, ctx.device, warmup=cfg.warmup + 1,
                                                             steps=cfg.steps, repeats=cfg.repeats)["eager"]
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    notes = {"eager": "train.py default", "cuda graph": "train.py --cuda_graph",
             "torch.compile": f"train.py --torch_compile; first 2 steps (compile) took {compile_seconds:.0f} s"
             if "torch.compile" in variants else "",
             "eager, channels_last": "UNet weights in channels_last (not a train.py option); measured after the others",
             "eager, cudnn.benchmark": "torch.backends.cudnn.benchmark = True (not a train.py option); measured last"}
    rows = [throughput_row(ctx, "cuda", name, timing, cfg.batch_size, ctx.flops.get("cached_step"), note=notes[name])
            for name, timing in timings.items()]
    rows += [Row("cuda", name, note=f"failed: {message[:200]}") for name, message in failures.items()]
    return rows


def section_memory(ctx: Context) -> list[Row]:
    """Peak memory of our step in a child process that holds only what training holds (UNet + LoRA +
    optimizer + latent cache + prompt embedding; VAE and text encoder freed, as train() does)."""
    cfg = ctx.cfg
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(device=str(ctx.device), out=None)
    code = "import json, sys; from cxr.bench import memory_child; print(json.dumps(memory_child(json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--sections memory: the child process failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    what = "CUDA max_memory_allocated" if ctx.device.type == "cuda" else "peak RSS of the process"
    return [Row("memory", "training process", result["images_per_s"], result["ms_per_step"], result["peak_mem_mb"],
                note=f"{what}; batch {cfg.batch_size}, {cfg.cache_rows} cached latents, only the UNet resident")]


def memory_child(settings: dict) -> dict:
    """Body of the memory section's child process: build our step, free VAE and text encoder, run, report."""
    cfg = BenchConfig(**{**settings, "out": None})
    device, dtype = resolve_device_dtype(cfg)
    ctx = Context(cfg, device, dtype)
    state = ctx.train_state()
    for name in ("vae", "text_encoder"):
        del ctx.components[name]
    _free_memory(device)
    reset = reset_peak_memory(device)
    for _ in range(cfg.warmup):
        state.run()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(cfg.steps):
        state.run()
    synchronize(device)
    seconds = (time.perf_counter() - started) / cfg.steps
    return {"peak_mem_mb": peak_memory_mb(device), "peak_reset": reset, "ms_per_step": 1000 * seconds,
            "images_per_s": cfg.batch_size / seconds}


def saved_activation_bytes(forward: Callable[[], object], exclude=()) -> int:
    """Bytes of the distinct tensor storages autograd saves for the backward pass while `forward()` runs, not
    counting the storages of the tensors in `exclude` (the model's parameters). The graph is freed on return."""
    import torch

    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            sizes[storage.data_ptr()] = storage.nbytes()  # saved tensors stay alive: no address is reused
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    del result
    return sum(sizes.values())


def section_activations(ctx: Context) -> list[Row]:
    """Saved activations of one forward of our step (counted), and the budget they add up to with the weights,
    the LoRA + AdamW state and the latent cache (a lower bound of the training peak: no temporaries)."""
    import torch

    from cxr.training import diffusion_loss

    cfg, state = ctx.cfg, ctx.train_state()
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    shape = (cfg.batch_size, *state.latents_mean.shape[1:])
    x0, noise = (torch.randn(shape, generator=generator, device=ctx.device) for _ in range(2))
    timesteps = torch.randint(0, len(ctx.schedule().alphas_cumprod), (cfg.batch_size,), generator=generator,
                              device=ctx.device)
    autocast_dtype = None if ctx.dtype == torch.float32 else ctx.dtype
    saved = saved_activation_bytes(
        lambda: diffusion_loss(state.unet, x0, noise, timesteps, state.prompt_embedding, ctx.schedule(), 0.0,
                               autocast_dtype),
        exclude=list(state.unet.parameters()))
    frozen = sum(p.numel() * p.element_size() for p in state.unet.parameters() if not p.requires_grad)
    lora_state = 4 * sum(p.numel() * p.element_size() for p in state.params)  # weights, grads, 2 AdamW moments
    cache = state.latents_mean.nbytes + state.latents_std.nbytes
    mib = 2**20
    dtype_name = str(ctx.dtype).replace("torch.", "")
    return [
        Row("activations", "saved for backward (counted)", peak_mem_mb=saved / mib,
            note=f"batch {cfg.batch_size}, {dtype_name}: {saved / cfg.batch_size / mib:.0f} MiB per image; "
                 "autograd's saved tensors of one forward (saved_tensors_hooks)"),
        Row("activations", "training lower bound (sum)", peak_mem_mb=(saved + frozen + lora_state + cache) / mib,
            note=f"saved activations + frozen UNet {frozen / mib:.0f} MiB + LoRA/AdamW {lora_state / mib:.0f} MiB + "
                 f"latent cache {cache / mib:.0f} MiB ({cfg.cache_rows} rows); excludes backward temporaries"),
    ]


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one call, counted by PyTorch's FLOP counter (matmuls, convolutions, attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # PyTorch has no FLOP formula for the CPU's fused attention kernel; the math backend spells attention
    # out as matmuls, which are counted, on every device.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def section_flops(ctx: Context) -> list[Row]:
    """FLOPs per image of each model, counted on the models being benchmarked at batch 1."""
    import torch

    state = ctx.train_state()
    unet, vae, text_encoder = state.unet, ctx.models()["vae"], ctx.models()["text_encoder"]
    device, dtype = ctx.device, ctx.dtype
    latents = torch.randn(1, *ctx.latent_shape(), device=device, dtype=dtype)
    timesteps = torch.full((1,), 500, device=device, dtype=torch.long)
    embedding = state.prompt_embedding[:1].to(dtype)
    pixels = torch.zeros(1, 3, ctx.cfg.resolution, ctx.cfg.resolution, device=device, dtype=dtype)
    token_ids = torch.zeros(1, ctx.models()["tokenizer"].model_max_length, device=device, dtype=torch.long)

    def unet_forward():
        with torch.no_grad():
            unet(latents, timesteps, embedding).sample

    def unet_forward_backward():
        unet(latents, timesteps, embedding).sample.float().square().mean().backward()

    def vae_encoder():
        with torch.no_grad():
            vae.encode(pixels.to(vae.dtype)).latent_dist.mean

    def text_encoder_call():
        with torch.no_grad():
            text_encoder(token_ids)[0]

    ctx.flops.update(
        unet_forward=count_flops(unet_forward),
        unet_forward_backward=count_flops(unet_forward_backward),
        vae_encoder=count_flops(vae_encoder),
        text_encoder=count_flops(text_encoder_call),
    )
    unet.zero_grad(set_to_none=True)
    ctx.flops["cached_step"] = ctx.flops["unet_forward_backward"]
    # Generic trainers tokenize and encode the prompt once per image of the batch.
    ctx.flops["encode_every_step"] = sum(ctx.flops[k] for k in ("unet_forward_backward", "vae_encoder", "text_encoder"))
    notes = {
        "unet_forward": "UNet forward, no grad",
        "unet_forward_backward": "UNet forward + backward, frozen base, LoRA grads only",
        "vae_encoder": f"VAE encoder at {ctx.cfg.resolution} px",
        "text_encoder": "text encoder, one 77-token prompt",
        "cached_step": "our step: UNet forward + backward",
        "encode_every_step": "generic step: + VAE encoder + text encoder per image",
    }
    return [Row("flops", name, gflop_per_image=ctx.flops[name] / 1e9, note=note) for name, note in notes.items()]


class _DecodeDataset:
    """Decode + resize files exactly as the latent-cache build does (torch Dataset protocol)."""

    def __init__(self, paths: list[Path], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from cxr.imageio import read_grayscale, to_model_input

        return to_model_input(read_grayscale(self.paths[index]), self.resolution)


def write_bench_phantoms(out_dir: Path, count: int, size: int, seed: int) -> list[Path]:
    """`count` 8-bit PNG phantoms of `size` x `size` pixels (NIH ChestX-ray14 files are 1024 px 8-bit PNGs)."""
    from cxr.phantoms import write_phantoms

    return write_phantoms(out_dir, count, seed=seed, sizes=((size, size),), formats=("png8",))


def section_input(ctx: Context) -> list[Row]:
    """Decode + resize images/s through a DataLoader, per worker count."""
    import torch
    from torch.utils.data import DataLoader

    cfg = ctx.cfg
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        paths = write_bench_phantoms(Path(tmp), cfg.input_images, cfg.input_size, cfg.seed)
        dataset = _DecodeDataset(paths, cfg.resolution)
        for workers in cfg.worker_counts:
            loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers,
                                persistent_workers=workers > 0)

            def epoch(loader=loader):
                for _ in loader:
                    pass

            timing = time_interleaved({"epoch": epoch}, torch.device("cpu"), warmup=1, steps=1, repeats=cfg.repeats)["epoch"]
            rows.append(throughput_row(ctx, "input", f"decode+resize, {workers} workers", timing, len(paths),
                                       note=f"{cfg.input_size} px 8-bit PNG -> {cfg.resolution} px; ms per epoch of {len(paths)}"))
            del loader
    return rows


def section_cache(ctx: Context) -> list[Row]:
    """Latent-cache build images/s (decode, resize, VAE encode) and reload images/s."""
    import torch

    from cxr.dataset import scan_dataset
    from cxr.latents import build_or_load_latent_cache

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
                records, vae, resolution=cfg.resolution, pad_to_square=False, random_flip=False, cache_dir=folder,
                device=ctx.device, batch_size=cfg.batch_size, num_workers=workers, vae_id=f"bench-{cfg.arch}")

        builds = iter(range(10**6))
        build = lambda: cache_in(Path(tmp) / f"cache-{next(builds)}")  # a fresh folder: every call builds  # noqa: E731
        load = lambda: cache_in(Path(tmp) / "cache-0")  # noqa: E731

        with torch.no_grad():
            timing = time_interleaved({"build": build}, ctx.device, warmup=0, steps=1, repeats=1)["build"]
            flops = ctx.flops.get("vae_encoder")
            rows.append(throughput_row(ctx, "cache", f"build, {workers} workers", timing, len(records), flops,
                                       note=f"{len(records)} images {cfg.input_size} px -> {cfg.resolution} px latents; one build"))
            timing = time_interleaved({"load": load}, ctx.device, warmup=0, steps=1, repeats=cfg.repeats)["load"]
            rows.append(throughput_row(ctx, "cache", "reload (cache hit)", timing, len(records),
                                       note="same images, resolution, crop and VAE: read back, nothing encoded"))
    if bench_dtype != torch.float32:
        vae.to(dtype=bench_dtype)
    return rows


def section_sampling(ctx: Context) -> list[Row]:
    """Images/s of sampling (sample.py's default DPM-Solver++ and guidance) with the merged adapter."""
    from diffusers import StableDiffusionPipeline

    from cxr import DEFAULT_PROMPT
    from cxr.lora import merge_lora, unmerge_lora
    from cxr.sampling import generate_batch, make_scheduler

    cfg, parts = ctx.cfg, ctx.models()
    unet = ctx.train_state().unet
    pipe = StableDiffusionPipeline(
        unet=unet, vae=parts["vae"], text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], scheduler=make_scheduler("dpm++", parts["scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    seeds = iter(range(10**9))

    def generate():
        generate_batch(pipe, [next(seeds) for _ in range(cfg.batch_size)], prompt=DEFAULT_PROMPT,
                       num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                       height=cfg.resolution, width=cfg.resolution)

    merge_lora(unet)  # sample.py merges by default: the adapter then costs nothing per denoising step
    unet.eval()
    try:
        timing = time_interleaved({"sample": generate}, ctx.device, warmup=min(cfg.warmup, 1), steps=1,
                                  repeats=cfg.repeats)["sample"]
    finally:
        unmerge_lora(unet)
        unet.train()
    unet_evals = cfg.sample_steps * (2 if cfg.guidance_scale > 1.0 else 1)
    flops = ctx.flops["unet_forward"] * unet_evals if "unet_forward" in ctx.flops else None
    note = (f"{cfg.sample_steps} DPM-Solver++ steps, guidance {cfg.guidance_scale:g}, VAE decode included; "
            "GFLOP/img counts the UNet evaluations only")
    return [throughput_row(ctx, "sampling", "txt2img, merged LoRA", timing, cfg.batch_size, flops, note=note)]


# ----------------------------------------------------------------------------------------------
# Table, JSON, entry point

COLUMNS = (
    ("section", "section", "{}"),
    ("variant", "variant", "{}"),
    ("images_per_s", "images/s", "{:.3g}"),
    ("ms_per_step", "ms/step", "{:.4g}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("gflop_per_image", "GFLOP/img", "{:.4g}"),
    ("tflop_per_s", "TFLOP/s", "{:.3g}"),
    ("percent_of_peak", "% peak", "{:.1f}"),
    ("note", "note", "{}"),
)


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (pastes into the README as it is)."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for row in rows:
        cells = []
        for name, _, fmt in COLUMNS:
            value = getattr(row, name)
            cells.append("" if value is None or value == "" else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rows: list[Row]) -> dict[str, float]:
    """The ratios the issue's goals are stated in (images/s of one variant over another)."""
    by_key = {(r.section, r.variant): r.images_per_s for r in rows if r.images_per_s}
    pairs = {
        "cached_vs_encode_every_step": (("train", "our step, cached latents"), ("train", "encode every step")),
        "our_lora_vs_peft": (("lora", "our LoRA"), ("lora", "peft LoRA")),
        "cuda_graph_vs_eager": (("cuda", "cuda graph"), ("cuda", "eager")),
        "torch_compile_vs_eager": (("cuda", "torch.compile"), ("cuda", "eager")),
    }
    return {name: by_key[a] / by_key[b] for name, (a, b) in pairs.items() if a in by_key and b in by_key}


def machine_info(device) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    cpu_model = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    if cpu_model:
        info["cpu"] = cpu_model.group(1).strip()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


SECTION_FUNCTIONS = {
    "peak": section_peak,
    "flops": section_flops,
    "train": section_train,
    "lora": section_lora,
    "cuda": section_cuda,
    "memory": section_memory,
    "activations": section_activations,
    "input": section_input,
    "cache": section_cache,
    "sampling": section_sampling,
}


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the chosen sections in the order of SECTIONS; returns {"machine", "config", "rows", "speedups"}."""
    import torch

    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device_dtype(cfg)
    ctx = Context(cfg, device, dtype)
    rows: list[Row] = []
    for name in SECTIONS:
        if name not in cfg.section_list:
            continue
        if name == "cuda" and device.type != "cuda":
            rows.append(Row("cuda", "skipped", note="CUDA graph / torch.compile comparison needs --device cuda"))
            continue
        started = time.perf_counter()
        new_rows = SECTION_FUNCTIONS[name](ctx)
        rows.extend(new_rows)
        log(f"[bench] {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {"machine": machine_info(device), "config": config, "dtype": str(dtype).replace("torch.", ""),
            "rows": [asdict(r) for r in rows], "speedups": speedups(rows), "flops": ctx.flops}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchConfig, argv)
    result = run_bench(cfg)
    rows = [Row(**r) for r in result["rows"]]
    print(f"machine: {json.dumps(result['machine'])}")
    print(f"arch {cfg.arch}, {cfg.resolution} px, batch {cfg.batch_size}, dtype {result['dtype']}")
    print(format_table(rows))
    for name, value in result["speedups"].items():
        print(f"{name}: {value:.2f}x")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    main()

"""The benchmark's memory sections: the peak memory of a process that holds only what training holds, and the
activations autograd saves for one step's backward (counted).

memory, activations   (registered in `cxr.perf.bench_sections.SECTION_FUNCTIONS`)
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cxr.perf.bench_context import BenchConfig, Context, Row, resolve_device_dtype
from cxr.runtime import peak_memory_mib, reset_peak_memory, synchronize
from cxr.train.step import diffusion_loss


def free_memory(device) -> None:
    """Return what the last section dropped, so that later peak-memory windows start clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def section_memory(ctx: Context) -> list[Row]:
    """Peak memory of our step in a child process that holds only what training holds (UNet + LoRA +
    optimizer + latent cache + prompt embedding; VAE and text encoder freed, as train() does)."""
    cfg = ctx.cfg
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(device=str(ctx.device), out=None)
    code = (
        "import json, sys; from cxr.perf.bench_memory import memory_child; "
        "print(json.dumps(memory_child(json.loads(sys.argv[1]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--sections memory: the child process failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    what = "CUDA max_memory_allocated" if ctx.device.type == "cuda" else "peak RSS of the process"
    return [
        Row(
            "memory",
            "training process",
            result["images_per_s"],
            result["ms_per_step"],
            result["peak_mem_mb"],
            note=f"{what}; batch {cfg.batch_size}, {cfg.cache_rows} cached latents, only the UNet resident",
        )
    ]


def memory_child(settings: dict) -> dict:
    """Body of the memory section's child process: build our step, free VAE and text encoder, run, report."""
    cfg = BenchConfig(**{**settings, "out": None})
    device, dtype = resolve_device_dtype(cfg)
    ctx = Context(cfg, device, dtype)
    state = ctx.train_state()
    for name in ("vae", "text_encoder"):
        del ctx.components[name]
    free_memory(device)
    reset = reset_peak_memory(device)
    for _ in range(cfg.warmup):
        state.run()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(cfg.steps):
        state.run()
    synchronize(device)
    seconds = (time.perf_counter() - started) / cfg.steps
    return {
        "peak_mem_mb": peak_memory_mib(device),
        "peak_reset": reset,
        "ms_per_step": 1000 * seconds,
        "images_per_s": cfg.batch_size / seconds,
    }


def saved_activation_bytes(forward: Callable[[], object], exclude=()) -> int:
    """Bytes of the distinct tensor storages autograd saves for the backward pass while `forward()` runs, not
    counting the storages of the tensors in `exclude` (the model's parameters). The graph is freed on return."""
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
    cfg, state = ctx.cfg, ctx.train_state()
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    shape = (cfg.batch_size, *state.latents_mean.shape[1:])
    x0, noise = (torch.randn(shape, generator=generator, device=ctx.device) for _ in range(2))
    timesteps = torch.randint(
        0, len(ctx.schedule().alphas_cumprod), (cfg.batch_size,), generator=generator, device=ctx.device
    )
    autocast_dtype = None if ctx.dtype == torch.float32 else ctx.dtype
    saved = saved_activation_bytes(
        lambda: diffusion_loss(
            state.unet, x0, noise, timesteps, state.prompt_embedding, ctx.schedule(), 0.0, autocast_dtype
        ),
        exclude=list(state.unet.parameters()),
    )
    frozen = sum(p.numel() * p.element_size() for p in state.unet.parameters() if not p.requires_grad)
    lora_state = 4 * sum(p.numel() * p.element_size() for p in state.params)  # weights, grads, 2 AdamW moments
    cache = state.latents_mean.nbytes + state.latents_std.nbytes
    mib = 2**20
    dtype_name = str(ctx.dtype).replace("torch.", "")
    return [
        Row(
            "activations",
            "saved for backward (counted)",
            peak_mem_mb=saved / mib,
            note=f"batch {cfg.batch_size}, {dtype_name}: {saved / cfg.batch_size / mib:.0f} MiB per image; "
            "autograd's saved tensors of one forward (saved_tensors_hooks)",
        ),
        Row(
            "activations",
            "training lower bound (sum)",
            peak_mem_mb=(saved + frozen + lora_state + cache) / mib,
            note=f"saved activations + frozen UNet {frozen / mib:.0f} MiB + LoRA/AdamW {lora_state / mib:.0f} MiB + "
            f"latent cache {cache / mib:.0f} MiB ({cfg.cache_rows} rows); excludes backward temporaries",
        ),
    ]

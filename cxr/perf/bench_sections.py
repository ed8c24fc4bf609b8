"""The benchmark's sections: each takes the shared Context and returns table rows (see `python -m cxr.bench`).

peak, flops, train, lora, cuda, sampling here; memory, activations in `cxr.perf.bench_memory`; input, cache in
`cxr.perf.bench_data`; ops in `cxr.perf.bench_ops`   (all registered in SECTION_FUNCTIONS)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cxr import DEFAULT_PROMPT
from cxr.model.lora import DEFAULT_TARGETS, PACK_NAME, lora_modules, merge_lora, unmerge_lora
from cxr.perf.bench_context import (
    Context,
    Row,
    make_step,
    throughput_row,
    time_interleaved,
)
from cxr.perf.bench_data import section_cache, section_input
from cxr.perf.bench_memory import free_memory, section_activations, section_memory
from cxr.perf.bench_ops import section_ops
from cxr.runtime import synchronize
from cxr.sample.sampling import generate_batch, make_scheduler


def measure_matmul_peak(device, dtype) -> float:
    """Dense matmul TFLOP/s in `dtype` on `device`: the best of a few timed square matmuls."""
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
    return [
        Row(
            "peak",
            f"matmul {name}",
            tflop_per_s=ctx.peak_tflop_per_s,
            percent_of_peak=100.0,
            note="measured dense matmul; the denominator of % of peak",
        )
    ]


def make_encode_every_step(ctx: Context) -> Callable[[], None]:
    """The step generic trainers run: tokenize and text-encode the prompt of every image, VAE-encode the pixel
    batch, then the same UNet step (our training step, same UNet, LoRA and optimizer) on those latents.

    Pixels are already on the device (decoding is measured in the input section), which favours this baseline.
    """
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
    step = make_step(
        ctx,
        model=state.unet,
        params=state.params,
        latents_mean=mean,
        latents_std=std,
        prompt_embedding=prompt_embedding,
        optimizer=state.optimizer,
    )

    def encode_and_step() -> None:
        with torch.no_grad():
            ids = tokenizer(
                [DEFAULT_PROMPT] * cfg.batch_size,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids.to(ctx.device)
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
        throughput_row(
            ctx,
            "train",
            "our step, cached latents",
            timings["cached"],
            cfg.batch_size,
            ctx.flops.get("cached_step"),
            note="device-resident latent cache + prompt embedding",
        ),
        throughput_row(
            ctx,
            "train",
            "encode every step",
            timings["encode"],
            cfg.batch_size,
            ctx.flops.get("encode_every_step"),
            note="+ tokenize, text encoder, VAE encoder per batch (pixels already on the device)",
        ),
    ]


def _plain_copy(unet):
    """A deep copy of our LoRA UNet with every LoRALinear replaced by its frozen base Linear."""
    clone = copy.deepcopy(unet)
    for path, module in lora_modules(clone).items():
        parent_path, _, name = path.rpartition(".")
        setattr(clone.get_submodule(parent_path) if parent_path else clone, name, module.base)
    clone._modules.pop(PACK_NAME, None)  # the packed LoRA tensors: nothing reads them any more
    return clone


def peft_unet(ctx: Context):
    """The same base UNet with a stock peft LoRA on the same targets, rank and alpha (peft: a bench/test extra)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise RuntimeError(
            "--sections lora: the peft comparison needs peft, a test/benchmark extra: "
            "pip install -e '.[test]' (or drop `lora` from --sections)"
        ) from None

    unet = _plain_copy(ctx.train_state().unet)
    unet.add_adapter(
        LoraConfig(r=ctx.cfg.lora_rank, lora_alpha=ctx.cfg.lora_alpha, target_modules=list(DEFAULT_TARGETS))
    )
    unet.train()
    return unet


def section_lora(ctx: Context) -> list[Row]:
    """The UNet step (forward, backward, clip, AdamW) with our LoRA and with peft's, same base weights and batch."""
    cfg, state = ctx.cfg, ctx.train_state()
    theirs = peft_unet(ctx)
    params = [p for p in theirs.parameters() if p.requires_grad]
    step = make_step(
        ctx,
        model=theirs,
        params=params,
        latents_mean=state.latents_mean,
        latents_std=state.latents_std,
        prompt_embedding=state.prompt_embedding,
    )
    variants = {"ours": state.run, "peft": lambda: step(state.data.next_indices())}  # noqa: F821 (del below)
    timings = time_interleaved(variants, ctx.device, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats)
    count = sum(p.numel() for p in state.params)
    flops = ctx.flops.get("cached_step")
    rows = [
        throughput_row(
            ctx,
            "lora",
            "our LoRA",
            timings["ours"],
            cfg.batch_size,
            flops,
            note=f"cxr.model.lora, {count} trainable parameters",
        ),
        throughput_row(
            ctx,
            "lora",
            "peft LoRA",
            timings["peft"],
            cfg.batch_size,
            flops,
            note=f"peft LoraConfig(r={cfg.lora_rank}, lora_alpha={cfg.lora_alpha:g}), "
            f"{sum(p.numel() for p in params)} trainable parameters",
        ),
    ]
    del theirs, step, variants
    free_memory(ctx.device)
    return rows


def section_cuda(ctx: Context) -> list[Row]:
    """Our step eager, replayed from a CUDA graph (`--cuda_graph`) and with a compiled UNet (`--torch_compile`)."""

    cfg, state = ctx.cfg, ctx.train_state()
    variants, failures = {"eager": state.run}, {}
    try:
        graphed = make_step(
            ctx,
            model=state.unet,
            params=state.params,
            latents_mean=state.latents_mean,
            latents_std=state.latents_std,
            prompt_embedding=state.prompt_embedding,
            cuda_graph=True,
        )
        graphed.capture_cuda_graph(state.data.next_indices())
        variants["cuda graph"] = lambda: graphed(state.data.next_indices())
    except Exception as error:  # report and carry on: the other variants are still worth measuring
        failures["cuda graph"] = f"{type(error).__name__}: {error}"
    try:
        compiled = torch.compile(state.unet)
        step = make_step(
            ctx,
            model=compiled,
            params=state.params,
            latents_mean=state.latents_mean,
            latents_std=state.latents_std,
            prompt_embedding=state.prompt_embedding,
        )
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
        timings["eager, channels_last"] = time_interleaved(
            {"eager": state.run}, ctx.device, warmup=cfg.warmup, steps=cfg.steps, repeats=cfg.repeats
        )["eager"]
    finally:
        state.unet.to(memory_format=torch.contiguous_format)
    # cudnn.benchmark is not a train.py option either: it times conv algorithms per shape (our shapes are static)
    # but may pick different ones per process, so a resumed run would not be bit-identical. Measured to decide.
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        timings["eager, cudnn.benchmark"] = time_interleaved(
            {"eager": state.run}, ctx.device, warmup=cfg.warmup + 1, steps=cfg.steps, repeats=cfg.repeats
        )["eager"]
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    notes = {
        "eager": "train.py default",
        "cuda graph": "train.py --cuda_graph",
        "torch.compile": f"train.py --torch_compile; first 2 steps (compile) took {compile_seconds:.0f} s"
        if "torch.compile" in variants
        else "",
        "eager, channels_last": "UNet weights in channels_last (not a train.py option); measured after the others",
        "eager, cudnn.benchmark": "torch.backends.cudnn.benchmark = True (not a train.py option); measured last",
    }
    rows = [
        throughput_row(ctx, "cuda", name, timing, cfg.batch_size, ctx.flops.get("cached_step"), note=notes[name])
        for name, timing in timings.items()
    ]
    rows += [Row("cuda", name, note=f"failed: {message[:200]}") for name, message in failures.items()]
    return rows


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one call, counted by PyTorch's FLOP counter (matmuls, convolutions, attention)."""
    # PyTorch has no FLOP formula for the CPU's fused attention kernel; the math backend spells attention
    # out as matmuls, which are counted, on every device.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def section_flops(ctx: Context) -> list[Row]:
    """FLOPs per image of each model, counted on the models being benchmarked at batch 1."""
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
            _ = unet(latents, timesteps, embedding).sample

    def unet_forward_backward():
        unet(latents, timesteps, embedding).sample.float().square().mean().backward()

    def vae_encoder():
        with torch.no_grad():
            _ = vae.encode(pixels.to(vae.dtype)).latent_dist.mean

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


def section_sampling(ctx: Context) -> list[Row]:
    """Images/s of sampling (sample.py's default DPM-Solver++ and guidance) with the merged adapter."""
    # Imported here: the pipeline module pulls in transformers' image processors (seconds, and their warnings),
    # which only this section needs.
    from diffusers import StableDiffusionPipeline

    cfg, parts = ctx.cfg, ctx.models()
    unet = ctx.train_state().unet
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler=make_scheduler("dpm++", parts["scheduler"].config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    seeds = iter(range(10**9))

    def generate():
        generate_batch(
            pipe,
            [next(seeds) for _ in range(cfg.batch_size)],
            prompt=DEFAULT_PROMPT,
            num_inference_steps=cfg.sample_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.resolution,
            width=cfg.resolution,
        )

    merge_lora(unet)  # sample.py merges by default: the adapter then costs nothing per denoising step
    unet.eval()
    try:
        timing = time_interleaved(
            {"sample": generate}, ctx.device, warmup=min(cfg.warmup, 1), steps=1, repeats=cfg.repeats
        )["sample"]
    finally:
        unmerge_lora(unet)
        unet.train()
    unet_evals = cfg.sample_steps * (2 if cfg.guidance_scale > 1.0 else 1)
    flops = ctx.flops["unet_forward"] * unet_evals if "unet_forward" in ctx.flops else None
    note = (
        f"{cfg.sample_steps} DPM-Solver++ steps, guidance {cfg.guidance_scale:g}, VAE decode included; "
        "GFLOP/img counts the UNet evaluations only"
    )
    return [throughput_row(ctx, "sampling", "txt2img, merged LoRA", timing, cfg.batch_size, flops, note=note)]


SECTION_FUNCTIONS = {
    "peak": section_peak,
    "flops": section_flops,
    "ops": section_ops,
    "train": section_train,
    "lora": section_lora,
    "cuda": section_cuda,
    "memory": section_memory,
    "activations": section_activations,
    "input": section_input,
    "cache": section_cache,
    "sampling": section_sampling,
}

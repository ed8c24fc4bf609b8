"""Sampling synthetic chest X-rays: the base SD v1.5 pipeline plus a cxr LoRA adapter -> PNG files with provenance.

Reproducibility rule: image `i` is made from its own generator `torch.Generator("cpu").manual_seed(seed + i)`.
Its initial latent is the first draw of that generator, `randn((C, height // f, width // f), float32)`, with C
the UNet's `in_channels` and f the pipeline's `vae_scale_factor` (4 and 8 for SD v1.5; the shape diffusers' own
pipeline draws), and schedulers that draw noise while sampling (ddpm, euler_a) continue from the same
generator. So image `i` does not depend on which other images share its batch, on `--start_index` or on
`--batch_size` (beyond float rounding of batched kernels), and the initial noise is the same on CPU and GPU.

The output folder (images with PNG provenance, index.json / index.csv, contact sheet) and its bookkeeping live in
`cxr.sample.samplefolder`; this module makes the images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

from cxr import DEFAULT_PROMPT
from cxr.config import SampleConfig, TrainConfig, to_dict
from cxr.fileio import check_writable
from cxr.model.adapter_files import load_adapter
from cxr.model.ddpm import PREDICTION_TYPES
from cxr.model.loading import pick_device, resolve_model_id
from cxr.model.lora import AdapterError, merge_lora
from cxr.runtime import DTYPES
from cxr.sample.samplefolder import (
    IMAGE_PREFIX,
    SamplingError,
    image_name,
    png_bytes,
    png_text,
    reconcile_folder,
    remove_stale_partials,
    run_identity,
    sha256_bytes,
    write_contact_sheet,
    write_index,
    write_new_file,
)

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the ones Pillow's convert("L") and cxr.data.imageio's colour -> gray use.
from cxr.data.imageio import BT601_LUMA as LUMA_WEIGHTS  # noqa: E402 - one home for the luma weights

INDEX_WRITE_SECONDS = 60.0  # rewrite the index at most this often during a run (and always at the end)


@dataclass
class SampleResult:
    """What one `sample_run` did. `paths` are all images of the requested range, made now or already there."""

    out_dir: Path
    paths: list[Path]
    made: list[Path]
    skipped: list[Path]
    index_json: Path
    index_csv: Path
    contact_sheet: Path | None
    device: str
    dtype: str
    generation_seconds: float  # time inside the pipeline (device synchronised), without loading or file writing
    total_seconds: float

    @property
    def images_per_second(self) -> float:
        """Images made per second of generation (the pipeline's throughput)."""
        return len(self.made) / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"made {len(self.made)} image(s), skipped {len(self.skipped)} already present, in {self.out_dir}",
            f"  images:        {self.out_dir / (IMAGE_PREFIX + '<index:06d>.png')}",
            f"  index:         {self.index_json} and {self.index_csv}",
        ]
        if self.contact_sheet is not None:
            lines.append(f"  contact sheet: {self.contact_sheet}")
        if self.made:
            lines.append(
                f"  speed:         {self.images_per_second:.2f} images/s on {self.device} ({self.dtype}), "
                f"{self.total_seconds:.1f} s in all"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- model


def resolve_device_and_dtype(device: str, dtype: str):
    """(torch.device, torch.dtype) for `--device` / `--dtype`; auto dtype is fp16 on CUDA, fp32 elsewhere."""
    try:
        torch_device = pick_device(device)
    except RuntimeError as error:
        raise SamplingError(str(error)) from error
    if dtype == "auto":
        dtype = "fp16" if torch_device.type == "cuda" else "fp32"
    return torch_device, DTYPES[dtype]


def _looks_like_local_path(name: str) -> bool:
    return (
        Path(name).exists()
        or name.startswith(("/", ".", "~", "\\"))
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")
    )


def check_paths(cfg: SampleConfig) -> None:
    """Fail fast, before loading anything, when --base_model or --lora_path points to nothing usable."""
    base = str(cfg.base_model)
    if _looks_like_local_path(base):
        folder = Path(base).expanduser()
        if not folder.exists():
            raise SamplingError(
                f"--base_model {base}: no such folder. Give a diffusers pipeline folder (one with model_index.json, "
                "written by save_pretrained) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
            )
        if not (folder / "model_index.json").is_file():
            raise SamplingError(
                f"--base_model {base}: not a diffusers pipeline folder (no model_index.json). Point it at the folder "
                "written by save_pretrained, or give a hub id."
            )
    if cfg.lora_path is not None and not Path(cfg.lora_path).exists():
        raise SamplingError(
            f"--lora_path {cfg.lora_path}: no such file or folder. Give OUTPUT_DIR/lora_unet written by train.py "
            "or an adapter .safetensors file (diffusers or kohya format); omit the flag for the base model alone."
        )


def make_scheduler(name: str, base_config, prediction_type: str | None = None):
    """The `--scheduler` sampler, built from the base pipeline's scheduler config (betas, prediction type);
    `prediction_type` (the adapter's training target) overrides the config's."""
    factories = {
        # DPM-Solver++(2M): deterministic, good samples in 20-25 steps. Karras sigmas are left off (the diffusers
        # default for SD v1.5) so the timesteps are the same spacing the other samplers use.
        "dpm++": (
            DPMSolverMultistepScheduler,
            dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False),
        ),
        "ddim": (DDIMScheduler, {}),
        "ddpm": (DDPMScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "pndm": (PNDMScheduler, dict(skip_prk_steps=True)),
        "unipc": (UniPCMultistepScheduler, {}),
    }
    if name not in factories:
        raise SamplingError(f"--scheduler {name!r}: unknown; choose one of {sorted(factories)}")
    cls, overrides = factories[name]
    if prediction_type:
        overrides = {**overrides, "prediction_type": prediction_type}
    return cls.from_config(base_config, **overrides)


def load_pipeline(cfg: SampleConfig, device=None, dtype=None):
    """Load the base pipeline (safety checker off), apply the adapter at --lora_scale (merged with --merge_lora).

    Returns `(pipe, adapter_info_or_None)`. Every error (missing/invalid base model, missing/incompatible
    adapter) is raised as SamplingError before any image is generated.
    """
    check_paths(cfg)
    if not np.isfinite(cfg.lora_scale):  # before the slow load (sample_run's validate() already refuses it)
        raise SamplingError(f"--lora_scale: must be a finite number, got {cfg.lora_scale}")
    if device is None or dtype is None:
        device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    model_id = resolve_model_id(cfg.base_model)
    if _looks_like_local_path(model_id):
        model_id = str(Path(model_id).expanduser())
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; torch_dtype works in every version we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                model_id,
                revision=cfg.revision,
                safety_checker=None,
                requires_safety_checker=False,
                torch_dtype=dtype,
            )
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SamplingError(
            f"--base_model {cfg.base_model}: could not load a Stable Diffusion pipeline ({error}). Give a local "
            "diffusers pipeline folder or a hub id you can download (log in with `hf auth login` if it is gated)."
        ) from error
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    adapter = None
    if cfg.lora_path is not None:
        try:
            # The LoRA tensors stay float32 (LoRALinear); merging adds them to the base weights in float32.
            adapter = load_adapter(pipe.unet, cfg.lora_path, scale=cfg.lora_scale)
        except AdapterError as error:
            raise SamplingError(f"--lora_path {cfg.lora_path}: {error}") from error
        if cfg.merge_lora:
            merge_lora(pipe.unet)
    # An adapter trained with --prediction_type v_prediction predicts v: sample it as v, whatever the base says.
    prediction_type = adapter_prediction_type(adapter.metadata, adapter.file) if adapter else None
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config, prediction_type)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe, adapter


def adapter_prediction_type(header: dict[str, str], source) -> str | None:
    """The training target in an adapter header (`cxr.prediction_type`, written by train.py), or None when the
    header has none (an adapter from another tool: the base scheduler's is used)."""
    prediction_type = header.get("cxr.prediction_type") or None
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise SamplingError(
            f"--lora_path {source}: header key cxr.prediction_type is {prediction_type!r}, not one of "
            f"{list(PREDICTION_TYPES)}; the file is damaged or not written by cxr"
        )
    return prediction_type


def resolve_sample_settings(cfg: SampleConfig, header: dict[str, str] | None, source) -> SampleConfig:
    """`cfg` with --prompt/--height/--width filled in from the adapter header `header` (None: the base model
    alone). Unset flags take the header's training prompt and resolution (`cxr.prompt`, `cxr.resolution`), else
    the defaults; a flag given that differs from the header warns."""
    header = header or {}
    trained_prompt = header.get("cxr.prompt")
    try:
        trained_size = int(header["cxr.resolution"]) if header.get("cxr.resolution") else None
    except ValueError:
        raise SamplingError(
            f"--lora_path {source}: header key cxr.resolution is {header['cxr.resolution']!r}, not "
            "a number of pixels; give --height and --width"
        ) from None
    values = {}
    for name, trained, default in (
        ("prompt", trained_prompt, DEFAULT_PROMPT),
        ("height", trained_size, TrainConfig.resolution),
        ("width", trained_size, TrainConfig.resolution),
    ):
        given = getattr(cfg, name)
        if given is None:
            values[name] = trained if trained is not None else default
        else:
            values[name] = given
            if trained is not None and given != trained:
                what = "prompt" if name == "prompt" else "resolution"
                warnings.warn(
                    f"--{name} {given!r} differs from the adapter's training {what} {trained!r} ({source}); "
                    f"the adapter has only seen that {what}. Omit --{name} to use it.",
                    stacklevel=2,
                )
    return dataclasses.replace(cfg, **values)


# --------------------------------------------------------------------------------------------- generation


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    """(C, height / f, width / f): the UNet's input channels and the VAE's downsampling f (`pipe.vae_scale_factor`),
    the shape diffusers' pipeline draws its own initial latents in."""
    factor = int(pipe.vae_scale_factor)
    if height % factor or width % factor:
        raise SamplingError(
            f"--height {height} / --width {width}: must be multiples of {factor}, the downsampling "
            "factor of this base model's VAE"
        )
    return (int(pipe.unet.config.in_channels), height // factor, width // factor)


def initial_latents(seeds: Sequence[int], shape: Sequence[int]):
    """(latents (B, *shape) float32 on CPU, one CPU generator per image) for the given image seeds; `shape` is
    `latent_shape(pipe, height, width)`.

    Each generator has made exactly the image's initial latent; schedulers that draw noise while sampling
    continue from it, so every random number of image i comes from seed i alone.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    latents = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
    return latents, generators


def generate_batch(
    pipe,
    seeds: Sequence[int],
    *,
    prompt: str,
    negative_prompt: str = "",
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
) -> np.ndarray:
    """Generate one image per seed in one batch: float32 RGB (B, H, W, 3) in [0, 1], the VAE decode before any
    quantisation. The building block of `sample_run` and of throughput measurements."""
    latents, generators = initial_latents(seeds, latent_shape(pipe, height, width))
    with torch.inference_mode():
        out = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_images_per_prompt=len(seeds),
            latents=latents.to(device=pipe.device, dtype=pipe.unet.dtype),
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            output_type="np",
        )
    images = np.asarray(out.images, dtype=np.float32)
    if images.shape[1:3] != (height, width):
        # diffusers takes given latents as they are: a wrong latent shape silently makes images of another size.
        raise SamplingError(
            f"the pipeline made {images.shape[2]}x{images.shape[1]} images for a {width}x{height} "
            f"request (--width x --height; latents {tuple(latents.shape[1:])}); the base model's VAE "
            "does not downsample by its pipeline's vae_scale_factor"
        )
    return images


# --------------------------------------------------------------------------------------------- pixels


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of float RGB (..., 3) -> (...) in float64, computed before any quantisation."""
    return np.tensordot(np.asarray(rgb, dtype=np.float64), np.asarray(LUMA_WEIGHTS, dtype=np.float64), axes=([-1], [0]))


def quantise(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """Round [0, 1] floats to 0..255 (uint8) or 0..65535 (uint16)."""
    top = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(np.clip(values, 0.0, 1.0) * top).astype(dtype)


def to_pil(rgb: np.ndarray, *, grayscale: bool, bit_depth: int = 8):
    """A PIL image from a float RGB (H, W, 3) decode: RGB 8-bit, or luminance as mode L / I;16."""
    if grayscale:
        return Image.fromarray(quantise(luminance(rgb), bit_depth))  # uint8 -> "L", uint16 -> "I;16"
    return Image.fromarray(quantise(rgb, 8))  # uint8 (H, W, 3) -> "RGB"


def _encode_and_write(
    path: Path, rgb: np.ndarray, text: dict[str, str], *, grayscale: bool, bit_depth: int
) -> str | None:
    """Encode one image as PNG and write it unless the file exists: the file's sha256, or None when skipped."""
    data = png_bytes(to_pil(rgb, grayscale=grayscale, bit_depth=bit_depth), text)
    return sha256_bytes(data) if write_new_file(path, data) else None


# --------------------------------------------------------------------------------------------- the run


class _PngWrites:
    """The image files of one run, encoded and written on two worker threads: PNG encoding (zlib releases the GIL)
    and writing of batch k overlap the generation of batch k + 1. `collect` turns finished writes into index rows
    (`rows`, updated in place) and the `made` / `skipped` lists."""

    def __init__(
        self, rows: dict[int, dict], skipped: list[Path], image_fields: dict, *, grayscale: bool, bit_depth: int
    ):
        self.rows, self.skipped, self.made = rows, skipped, []
        self.image_fields = image_fields  # device, dtype, lora_merged: the same for every image of the run
        self.encoding = dict(grayscale=grayscale, bit_depth=bit_depth)
        self.pending: list[tuple[int, int, Path, Future]] = []  # (index, seed, path, future of sha256 or None)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cxr-png")

    def submit(self, path: Path, index: int, seed: int, rgb: np.ndarray, text: dict[str, str]) -> None:
        self.pending.append((index, seed, path, self.pool.submit(_encode_and_write, path, rgb, text, **self.encoding)))

    def collect(self, quiet: bool = False) -> None:
        while self.pending:
            index, seed, path, future = self.pending.pop(0)
            if quiet and future.exception() is not None:  # already failing: keep what was written
                continue
            digest = future.result()  # raises the writer's error (e.g. a full disk)
            if digest is None:  # the file appeared meanwhile (another process): left as it is
                self.skipped.append(path)
                continue
            self.made.append(path)
            self.rows[index] = {"file": path.name, "index": index, "seed": seed, "sha256": digest, **self.image_fields}

    def close(self) -> None:
        """Wait for the writes in flight and record those that landed (after an error: the ones that succeeded)."""
        self.pool.shutdown(wait=True)
        self.collect(quiet=True)


def _check_finite(images: np.ndarray, batch: list[int], dtype_name: str) -> None:
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


def sample_run(cfg: SampleConfig) -> SampleResult:
    """Generate images [start_index, start_index + num_images) into --out_dir; skip those already there.

    Everything that can be wrong (flags, base model, adapter, a folder made with other settings) raises
    before the first image is generated.
    """
    cfg.validate()
    check_writable(cfg.out_dir, "--out_dir", SamplingError, create=False)  # before the model loads, not after
    started = time.perf_counter()
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    pipe, adapter = load_pipeline(cfg, device, dtype)
    cfg = resolve_sample_settings(cfg, adapter.metadata if adapter else None, adapter.file if adapter else None)
    latent_shape(pipe, cfg.height, cfg.width)  # a size this VAE cannot make fails before the first image
    identity = run_identity(cfg, adapter.sha256 if adapter else None)
    out_dir = Path(cfg.out_dir)
    rows, runs = reconcile_folder(out_dir, identity)

    requested = list(range(cfg.start_index, cfg.start_index + cfg.num_images))
    present = {i for i in requested if (out_dir / image_name(i)).exists()}
    todo = [i for i in requested if i not in present]
    skipped = [out_dir / image_name(i) for i in sorted(present)]
    if skipped:
        logger.info("skipping %d of %d image(s) already in %s", len(skipped), len(requested), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)

    merged = bool(adapter is not None and cfg.merge_lora)
    run_record = {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "device": str(device),
        "dtype": dtype_name,
        "adapter_file": str(adapter.file) if adapter else None,
        "requested": [cfg.start_index, cfg.start_index + cfg.num_images],
        "made": 0,
        "skipped": len(skipped),
    }
    runs = [*runs, run_record]
    generation_seconds = 0.0
    last_index_write = time.perf_counter()
    progress = tqdm(total=len(todo), unit="img", desc="sampling", disable=not todo)
    writes = _PngWrites(
        rows,
        skipped,
        {"device": device.type, "dtype": dtype_name, "lora_merged": merged},
        grayscale=cfg.grayscale_out,
        bit_depth=cfg.bit_depth,
    )
    try:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
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
            generation_seconds += time.perf_counter() - batch_started  # output_type="np" already synchronised
            _check_finite(images, batch, dtype_name)
            writes.collect()
            for index, rgb in zip(batch, images):
                text = png_text(
                    identity,
                    index=index,
                    adapter=str(cfg.lora_path) if adapter else None,
                    device=device.type,
                    dtype=dtype_name,
                    merged=merged,
                )
                writes.submit(out_dir / image_name(index), index, cfg.seed + index, rgb, text)
            progress.update(len(batch))
            if time.perf_counter() - last_index_write > INDEX_WRITE_SECONDS:
                run_record["made"] = len(writes.made)
                write_index(out_dir, identity, rows, runs)
                last_index_write = time.perf_counter()
        writes.collect()
    finally:
        writes.close()
        progress.close()
        run_record["made"] = len(writes.made)
        run_record["images_per_second"] = (
            round(len(writes.made) / generation_seconds, 4) if generation_seconds else None
        )
        index_json, index_csv = write_index(out_dir, identity, rows, runs)
    sheet_paths = [out_dir / rows[i]["file"] for i in sorted(rows)[: cfg.contact_sheet]]
    contact_sheet = write_contact_sheet(out_dir, sheet_paths) if cfg.contact_sheet else None
    return SampleResult(
        out_dir=out_dir,
        paths=[out_dir / image_name(i) for i in requested],
        made=writes.made,
        skipped=sorted(skipped),
        index_json=index_json,
        index_csv=index_csv,
        contact_sheet=contact_sheet,
        device=str(device),
        dtype=dtype_name,
        generation_seconds=generation_seconds,
        total_seconds=time.perf_counter() - started,
    )


def sample(cfg: SampleConfig) -> list[Path]:
    """Run sampling for `cfg`, print where everything went, and return the paths of images
    [start_index, start_index + num_images) (made now or already present)."""
    result = sample_run(cfg)
    print(result.summary(), flush=True)
    return result.paths

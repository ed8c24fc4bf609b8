"""Sampling synthetic chest X-rays: the base SD v1.5 pipeline plus a cxr LoRA adapter -> PNG files with provenance.

Reproducibility rule: image `i` is made from its own generator `torch.Generator("cpu").manual_seed(seed + i)`.
Its initial latent is the first draw of that generator, `randn((C, height // f, width // f), float32)`, with C
the UNet's `in_channels` and f the pipeline's `vae_scale_factor` (4 and 8 for SD v1.5; the shape diffusers' own
pipeline draws), and schedulers that draw noise while sampling (ddpm, euler_a) continue from the same
generator. So image `i` does not depend on which other images share its batch, on `--start_index` or on
`--batch_size` (beyond float rounding of batched kernels), and the initial noise is the same on CPU and GPU.

The output folder (images with PNG provenance, index.json / index.csv, contact sheet) and its bookkeeping live in
`cxr.sample.samplefolder`, the PNG files in `cxr.sample.pngwrites`, and the split of a run over torchrun ranks and
the folder lock in `cxr.sample.ranks`; this module makes the images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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

from cxr import DEFAULT_PROMPT
from cxr.config import SampleConfig, TrainConfig
from cxr.fileio import check_writable
from cxr.model.adapter_files import load_adapter
from cxr.model.ddpm import PREDICTION_TYPES
from cxr.model.loading import pick_device, resolve_model_id
from cxr.model.lora import AdapterError, merge_lora
from cxr.runtime import DTYPES, DistInfo
from cxr.sample.ranks import RankRun, claim_folder, rank_batches, refuse_if_in_use, start_processes, stop_processes
from cxr.sample.samplefolder import (
    IMAGE_PREFIX,
    INDEX_CSV,
    INDEX_JSON,
    SamplingError,
    image_name,
    run_identity,
)

logger = logging.getLogger(__name__)

# The image files (cxr.sample.pngwrites): BT.601 luminance with the one home of the luma weights, cxr.data.imageio.
from cxr.sample.pngwrites import LUMA_WEIGHTS, luminance, quantise, to_pil  # noqa: E402, F401 - used from here too


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
    generation_seconds: float  # time inside the pipeline (device synchronised; the slowest rank's under torchrun)
    total_seconds: float
    rank: int = 0  # this process's rank under torchrun

    @property
    def images_per_second(self) -> float:
        """Images made per second of generation (the pipeline's throughput, of all ranks together)."""
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
    return torch_device, resolve_dtype(torch_device, dtype)


def resolve_dtype(device, dtype: str):
    """The torch dtype for `--dtype` on `device`: auto is fp16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    return DTYPES[dtype]


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


# --------------------------------------------------------------------------------------------- the run


def sample_run(cfg: SampleConfig) -> SampleResult:
    """Generate images [start_index, start_index + num_images) into --out_dir; skip those already there.

    Under torchrun the images are shared out over the ranks (cxr.sample.ranks) and the folder ends up the same as
    with one process; the result is the run's, the same on every rank but for `device`. Everything that can be
    wrong (flags, base model, adapter, a folder made with other settings or in use by another run) raises before
    the first image is generated.
    """
    cfg.validate()
    check_writable(cfg.out_dir, "--out_dir", SamplingError, create=False)  # before the model loads, not after
    started = time.perf_counter()
    dist, device, started_group = start_processes(cfg.device)
    try:
        refuse_if_in_use(cfg.out_dir, dist)  # before the model loads, like the other folder checks
        with contextlib.ExitStack() as held:
            return _sample_run(cfg, dist, device, held, started)
    finally:
        stop_processes(started_group)


def _sample_run(cfg: SampleConfig, dist: DistInfo, device, held: contextlib.ExitStack, started: float):
    dtype = resolve_dtype(device, cfg.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    pipe, adapter = load_pipeline(cfg, device, dtype)
    cfg = resolve_sample_settings(cfg, adapter.metadata if adapter else None, adapter.file if adapter else None)
    latent_shape(pipe, cfg.height, cfg.width)  # a size this VAE cannot make fails before the first image
    identity = run_identity(cfg, adapter.sha256 if adapter else None)
    requested = list(range(cfg.start_index, cfg.start_index + cfg.num_images))
    claim = claim_folder(Path(cfg.out_dir), identity, requested, dist, held)
    if claim.present and dist.is_main:
        logger.info("skipping %d of %d image(s) already in %s", len(claim.present), len(requested), cfg.out_dir)
    run = RankRun(cfg, claim, identity, dist, device, dtype_name, adapter)
    try:
        run.generate(pipe, rank_batches(claim.todo, cfg.batch_size, dist), generate_batch)
        run.writes.close()
        made, skipped, seconds, sheet = run.finish()
    except BaseException as error:
        # Keep what landed (also when another rank failed): rank 0 indexes its own images now; the next run indexes
        # the other ranks' from their PNG metadata.
        run.writes.close()
        with contextlib.suppress(OSError):  # on a full disk the index fails too: the first error is the one to say
            run.write_index(len(run.writes.made), run.generation_seconds)
        if isinstance(error, OSError):  # a full disk: one line, not two chained tracebacks
            raise SamplingError(_write_failure(Path(cfg.out_dir), error, len(run.writes.made))) from None
        raise
    out_dir = Path(cfg.out_dir)
    return SampleResult(
        out_dir=out_dir,
        paths=[out_dir / image_name(i) for i in requested],
        made=made,
        skipped=skipped,
        index_json=out_dir / INDEX_JSON,
        index_csv=out_dir / INDEX_CSV,
        contact_sheet=sheet,
        device=str(device),
        dtype=dtype_name,
        generation_seconds=seconds,
        total_seconds=time.perf_counter() - started,
        rank=dist.rank,
    )


def _write_failure(out_dir: Path, error: OSError, made: int) -> str:
    """One line for a failed write (a full disk): which file, why, and that a rerun completes the folder."""
    name = Path(error.filename).name if error.filename else "a file"
    name = re.sub(r"^\.(.+)\.\d+\.(partial|tmp)$", r"\1", name)  # the temporary file's final name
    return (
        f"--out_dir {out_dir}: cannot write {name} ({error.strerror or error}); the {made} image(s) made in this run "
        "are kept, and a rerun with the same flags skips them and completes the folder. Free some space first"
    )


def sample(cfg: SampleConfig) -> list[Path]:
    """Run sampling for `cfg`, print where everything went, and return the paths of images
    [start_index, start_index + num_images) (made now or already present)."""
    result = sample_run(cfg)
    if result.rank == 0:
        print(result.summary(), flush=True)
    return result.paths

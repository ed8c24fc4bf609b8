"""Config dataclasses: the single source of truth for every flag of train.py and sample.py.

Each field carries its default, type, help text and (optionally) choices. The argparse parser, the
`--config FILE.toml` support, the flag tables of docs/flags.md and the saved `config.json` are all generated from
these dataclasses, so they cannot drift apart. `validate()` rejects bad values with a message that names
the flag, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from cxr import DEFAULT_MODEL_ID, DEFAULT_PROMPT
from cxr.fileio import atomic_write_bytes
from cxr.runpaths import RunPaths


class ConfigError(ValueError):
    """A flag has an invalid value. The message starts with the flag's name."""


# torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and wraps negative values onto that range): sample.py seeds
# image i with seed + i, so every one of those must lie in it.
SEED_MAX = 2**64 - 1
# An adapter file name: shown in every tool's LoRA list and typed into A1111 prompts (<lora:NAME:1>).
OUTPUT_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*(?<!\.safetensors)"
# Training seeds its data order with seed * 1_000_003 + epoch (cxr.train.step.DataOrder), which must stay within
# SEED_MAX too: 2**32 - 1 (numpy's seed range) leaves room for ~4e12 epochs.
TRAIN_SEED_MAX = 2**32 - 1


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one, e.g. under a job scheduler)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def flag(
    default,
    help: str,
    choices: tuple | None = None,
    *,
    result: bool = False,
    cache: bool = False,
    bounds: tuple | None = None,
):
    """A dataclass field with its help text (and allowed values) kept next to the default.

    `bounds=(low, high)`: the sane range of a numeric flag, both ends included, checked by every `validate()` (with
    the other flags, before any work) and shown in --help and docs/flags.md. Every int and float flag has one: a
    huge but finite value (1e20 steps, alpha 1e308) must be a flag error, not an overflow deep in the work.

    `result=True`: the flag changes what training produces (beyond float rounding). A resume with another value
    warns, and the value is recorded in the adapter's header, the manifest and TensorBoard's HParams.
    `cache=True`: it also changes the latent cache's numbers (implies `result`), so it is part of the cache key.
    Those lists are derived from these declarations (`result_flags`, `cache_flags`), never kept by hand.
    """
    metadata = {"help": help, "choices": choices, "result": result or cache, "cache": cache, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def result_flags(cls) -> tuple[str, ...]:
    """Names of the fields declared `result=True` (or `cache=True`), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("result"))


def cache_flags(cls) -> tuple[str, ...]:
    """Names of the fields declared `cache=True`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cache"))


def recorded_values(cls, saved: dict, names) -> dict:
    """The values of `names` in a saved config dict (a checkpoint's config, a manifest's `extra`), JSON-style
    (Paths as strings); a flag the record predates (absent from it) had its default value then."""
    defaults = to_dict(cls())
    return {name: saved.get(name, defaults[name]) for name in names}


def changed_result_flags(saved: dict, config) -> list[str]:
    """`--name` of every result flag whose value in `config` differs from the saved config dict's."""
    current = to_dict(config)
    recorded = recorded_values(type(config), saved, result_flags(type(config)))
    return [f"--{name}" for name, value in recorded.items() if value != current[name]]


def _base_type(annotation) -> type:
    """`int`, `float`, `str`, `bool`, `Path` or `list` from an annotation like `int | None`."""
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _item_type(annotation) -> type:
    """The element type of a `list[X] | None` annotation (str when unspecified)."""
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return (typing.get_args(hint) or (str,))[0]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--name` option per dataclass field, plus `--config FILE.toml`."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file setting any of these flags (flat `name = value`); flags given on the command line win",
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in ("", None) else "")
        if f.metadata.get("bounds"):
            help_text += f" (range: {range_text(f.metadata['bounds'])})"
        # SUPPRESS: only flags actually given override the TOML file and the dataclass defaults.
        kwargs = dict(help=help_text.replace("%", "%%"), default=argparse.SUPPRESS)
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)  # --flag / --no-flag
        elif kind is list:
            item = _item_type(hints[f.name])
            kwargs.update(nargs="+", type=item, metavar=item.__name__.upper())
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        if f.metadata.get("choices"):
            kwargs.update(choices=f.metadata["choices"], metavar=None)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _coerce(cls, name: str, value, source: str):
    hints = typing.get_type_hints(cls)
    kind = _base_type(hints[name])
    if value is None:
        return None
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind is Path:
            return Path(value)
        if kind is list:
            item = _item_type(hints[name])
            return [item(v) for v in (value if isinstance(value, list) else [value])]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError
        return value
    except (TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"--{name}: {source} gives {value!r}, expected {kind.__name__}") from None


def load_toml(cls, path: Path) -> dict:
    """Read a flat TOML file of flag values; unknown keys are an error (a typo must not be ignored)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"--config: {path} sets unknown flags {unknown}; see --help for the list")
    return {k: _coerce(cls, k, v, f"--config {path}") for k, v in data.items()}


def parse_config(cls, argv: list[str] | None = None, description: str = "", prog: str | None = None):
    """Parse command-line flags (and an optional TOML file) into a validated `cls` instance.

    Invalid values exit with status 2 and a one-line message naming the flag.
    """
    parser = build_parser(cls, description, prog)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    config_file = args.pop("config")
    try:
        values = load_toml(cls, config_file) if config_file else {}
        values.update(args)
        config = cls(**values)
        config.validate()
    except ConfigError as error:
        parser.error(str(error))
    return config


def to_dict(config) -> dict:
    """JSON-ready dict of a config (Paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def save_json(config, path: Path, extra: dict | None = None) -> None:
    """Write `config` (every flag) and `extra` to `path` atomically: a failed write keeps the previous file."""
    payload = {"config": to_dict(config), **(extra or {})}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def flag_table(cls) -> str:
    """A Markdown table of every flag (name, default, help): one table of docs/flags.md."""
    hints = typing.get_type_hints(cls)
    rows = ["| flag | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _base_type(hints[f.name]).__name__
        if kind == "list":
            kind = f"{_item_type(hints[f.name]).__name__} [...]"
        choices = f.metadata.get("choices")
        if choices:
            kind = "{" + ",".join(map(str, choices)) + "}"
        if f.metadata.get("bounds"):
            kind += f" in {range_text(f.metadata['bounds'])}"
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        if f.metadata.get("result"):
            help_text += " *(result, cache key)*" if f.metadata.get("cache") else " *(result)*"
        rows.append(f"| `--{f.name}` | {kind} | `{default!r}` | {help_text} |")
    return "\n".join(rows)


def require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--{name}: {message}")


def check_output_name(given: str, resolved: str) -> None:
    """--output_name names the adapter file in every tool's LoRA list and in A1111 prompts (<lora:NAME:1>)."""
    require(
        not given or re.fullmatch(OUTPUT_NAME_PATTERN, given) is not None,
        "output_name",
        f"{given!r} is not a file name of letters, digits, '.', '_' and '-' (starting with a letter or digit, without "
        ".safetensors): it names the adapter file in every tool's LoRA list",
    )
    require(
        resolved != "pytorch_lora_weights",
        "output_name",
        "pytorch_lora_weights is the name of the diffusers-format file; choose another",
    )


def check_finite(config) -> None:
    """Every float flag is a finite number: `inf` and `nan` parse as floats but no flag means them."""
    import math

    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _base_type(hints[f.name]) is float and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name}: must be a finite number, got {value}")


def range_text(bounds: tuple) -> str:
    """`[low, high]` of a flag's bounds, as --help, docs/flags.md and the error messages write it."""
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in bounds) + "]"


def check_choices(config) -> None:
    """Choices and bounds of every flag that has them, and finite float flags (every validate() starts here)."""
    check_finite(config)
    for f in dataclasses.fields(config):
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ConfigError(f"--{f.name}: {value!r} is not one of {list(choices)}")
        if bounds and value is not None and not bounds[0] <= value <= bounds[1]:
            raise ConfigError(f"--{f.name}: must be in {range_text(bounds)}, got {value}")


@dataclass
class TrainConfig:
    """Fine-tune the SD v1.5 UNet with LoRA on a folder of normal chest X-rays."""

    # `result=True` / `cache=True` (see `flag`) mark what changes the trained adapter / the latent cache. Not
    # result flags, by decision: dataset_dir and file_list (paths: the images themselves are pinned by content
    # hash in the manifest, whose sha256 the adapter records; a moved folder is the same data, and a local path
    # does not belong in a shared adapter); output/cache/logging folders, workers, encode batch, export format,
    # logging, validation and checkpoint cadence (they do not touch the weights or the random streams);
    # gradient_checkpointing (recomputes the same activations); cuda_graph, torch_compile and tf32 (the same
    # step, float rounding may differ); device (same computation; CPU and CUDA generators draw different random
    # streams, so a resume on the other kind continues in distribution but not bit for bit); ddp_timeout_minutes.
    # The memorization watch and --stop_on_copy_rate: the watch samples with its own generators and the step reads
    # nothing of it; a stop on the copy rate is like a signal's.
    # skip_bad_images and min_image_size are result flags: they decide which images are trained on.
    # --- data ---
    dataset_dir: Path | None = flag(
        None, "folder of chest X-ray images (searched recursively: PNG, JPEG, TIFF, BMP, DICOM)"
    )
    file_list: Path | None = flag(
        None,
        "CSV/TXT list of images to use (column `path`, optional `patient_id`); paths relative to --dataset_dir or "
        "absolute",
    )
    exclude_duplicates: Path | None = flag(
        None,
        "report.json of `python -m cxr.dedup`: leave out the images it lists to drop (one image of each duplicate "
        "group is kept), matched by content hash, before the split; recorded in the manifest",
    )
    output_dir: Path = flag(Path("cxr-lora"), "where the adapter, checkpoints, logs, manifest and config go")
    resolution: int = flag(256, "training resolution in pixels (square; a multiple of 8)", cache=True, bounds=(8, 4096))
    pad_to_square: bool = flag(
        False, "pad non-square images to square (black borders) instead of center-cropping", cache=True
    )
    intensity_clip_percent: float = flag(
        0.0,
        "for 16-bit/float images and DICOM files without a VOI window: scale between the P-th and (100-P)-th "
        "percentile of the image's pixels (P = this value) instead of its min and max, clipping the tails (e.g. 0.5 "
        "for burned-in labels or hot/dead pixels; 0 = min-max). 8-bit images and DICOM files with a window are "
        "unaffected (range: [0, 50))",
        cache=True,
    )
    random_flip: bool = flag(
        False, "random horizontal flips (unwise for chest X-rays: teaches dextrocardia)", cache=True
    )
    skip_bad_images: bool = flag(
        False, "skip unreadable/truncated/too-small images (listed in a summary) instead of stopping", result=True
    )
    min_image_size: int = flag(
        64, "images whose shorter side is below this many pixels are rejected as bad", result=True, bounds=(1, 65536)
    )
    max_images: int | None = flag(
        None, "use a seeded random subset of at most this many images", result=True, bounds=(1, 10**9)
    )
    val_fraction: float = flag(
        0.02,
        "fraction of images (or of patients, when the file list has patient_id) held out for validation loss and the "
        "memorization audit (range: [0, 1))",
        result=True,
    )
    val_count: int | None = flag(
        None, "hold out exactly this many images instead of --val_fraction", result=True, bounds=(0, 10**9)
    )
    dataloader_num_workers: int | None = flag(
        None,
        "worker processes that decode images (bad-file check, latent-cache build); default: min(8, CPUs available)",
        bounds=(0, 256),
    )
    cache_dir: Path | None = flag(
        None,
        "where latent caches live (default: OUTPUT_DIR/cache); reused when images, resolution, crop mode and VAE are "
        "unchanged",
    )
    encode_batch_size: int = flag(16, "images per VAE forward pass when building the latent cache", bounds=(1, 4096))
    # --- model ---
    model_id: str = flag(
        DEFAULT_MODEL_ID,
        "base model: hub id or local folder (the old runwayml id is mapped to the new one)",
        cache=True,
    )
    revision: str | None = flag(None, "hub revision (branch, tag or commit) of --model_id", cache=True)
    prompt: str = flag(DEFAULT_PROMPT, "the constant training prompt", result=True)
    prediction_type: str = flag(
        "",
        "training target; empty = the base scheduler's (epsilon for SD v1.5)",
        ("", "epsilon", "v_prediction"),
        result=True,
    )
    lora_rank: int = flag(16, "LoRA rank r", result=True, bounds=(1, 1024))
    lora_alpha: float = flag(16.0, "LoRA alpha; the update is scaled by alpha / rank", result=True, bounds=(1e-6, 1e4))
    lora_dropout: float = flag(0.0, "dropout on the LoRA input (0 disables) (range: [0, 1))", result=True)
    lora_targets: str = flag(
        "to_q,to_k,to_v,to_out.0", "comma-separated attention projections to wrap in every attn1/attn2", result=True
    )
    export_format: str = flag(
        "kohya",
        "adapter format(s) written to OUTPUT_DIR/lora_unet: kohya (OUTPUT_NAME.safetensors: ComfyUI, A1111/Forge, "
        "kohya sd-scripts and diffusers all load it), diffusers (pytorch_lora_weights.safetensors, peft keys: "
        "diffusers and peft only) or both",
        ("kohya", "diffusers", "both"),
    )
    output_name: str = flag(
        "",
        "name of the adapter file (OUTPUT_NAME.safetensors) and its title in other tools (A1111's <lora:NAME:1>, "
        "ss_output_name, modelspec.title); letters, digits, '.', '_', '-'; default: the --output_dir folder's name",
    )
    # --- optimisation ---
    train_batch_size: int = flag(16, "images per step per GPU", result=True, bounds=(1, 4096))
    grad_accum_steps: int = flag(1, "micro-batches accumulated per optimizer step", result=True, bounds=(1, 4096))
    max_train_steps: int = flag(2000, "optimizer steps to train", result=True, bounds=(1, 10**9))
    learning_rate: float = flag(1e-4, "AdamW learning rate of the LoRA parameters", result=True, bounds=(1e-12, 10.0))
    lr_scheduler: str = flag(
        "constant", "learning-rate schedule after warm-up", ("constant", "linear", "cosine"), result=True
    )
    lr_warmup_steps: int = flag(0, "linear warm-up steps", result=True, bounds=(0, 10**9))
    adam_weight_decay: float = flag(1e-2, "AdamW weight decay", result=True, bounds=(0.0, 10.0))
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0 disables)", result=True, bounds=(0.0, 1e6))
    snr_gamma: float = flag(5.0, "Min-SNR-gamma loss weighting (0 disables)", result=True, bounds=(0.0, 1e4))
    noise_offset: float = flag(0.0, "noise offset (0 disables)", result=True, bounds=(0.0, 1.0))
    mixed_precision: str = flag(
        "bf16", "compute dtype of the frozen base and autocast", ("no", "fp16", "bf16"), result=True
    )
    seed: int = flag(
        0,
        "seed for the split, LoRA init, noise and timesteps (0 to 2**32 - 1)",
        result=True,
        bounds=(0, TRAIN_SEED_MAX),
    )
    # --- speed ---
    device: str = flag("auto", "cuda, cpu or auto")
    ddp_timeout_minutes: int = flag(
        90,
        "under torchrun: how long a process waits for the others at one collective before aborting. The longest wait "
        "is the first run's dataset scan, which rank 0 does alone (one decode per image: about 42 min for 1M PNGs at "
        "400 images/s); every rank encodes its share of the latent cache, so none waits long for it. 90 leaves twice "
        "the scan; NCCL's own default of 10 min does not",
        bounds=(1, 10080),
    )
    cuda_graph: str = flag(
        "auto",
        "replay the whole training step from a CUDA graph (one launch instead of thousands). auto: on CUDA when "
        "the run allows it (one process, not fp16, no --gradient_checkpointing) and a check at the start (two "
        "replayed steps against two eager ones) passes, else eager with a warning that says why; on: the same, "
        "but an error instead of eager; off: always eager (if a run with the graph stops on NaN/inf where an "
        "eager run would not, resume it with --cuda_graph off and report it)",
        ("auto", "on", "off"),
    )
    tf32: bool = flag(
        True,
        "TensorFloat-32 for float32 matmuls and convolutions on CUDA (the latent cache's VAE encode; the whole step "
        "with --mixed_precision no): inputs rounded to a 10-bit mantissa, float32 accumulation; --no-tf32 for full "
        "float32. No effect on the CPU",
    )
    torch_compile: bool = flag(False, "torch.compile the UNet forward")
    gradient_checkpointing: bool = flag(False, "recompute UNet activations in backward (less memory, slower)")
    # --- logging, validation, checkpoints ---
    logging_dir: Path | None = flag(None, "TensorBoard log folder (default: OUTPUT_DIR/logs)")
    log_every: int = flag(10, "read loss/grad norm from the device and log them every N steps", bounds=(1, 10**9))
    validation_steps: int = flag(
        500, "every N steps: held-out loss and a grid of samples (0 disables)", bounds=(0, 10**9)
    )
    num_validation_images: int = flag(4, "samples in the validation grid (fixed seeds)", bounds=(0, 256))
    validation_inference_steps: int = flag(25, "denoising steps for the validation samples", bounds=(1, 1000))
    memorization_samples: int = flag(
        64,
        "at step 0 and every validation: this many samples (fixed seeds) are compared with every training image and "
        "the held-out split as cxr.audit compares them (best-match NCC, copy rate, KID to the held-out images; "
        "TensorBoard privacy/ and quality/, summary.json, each checkpoint's state.json; see docs/privacy.md); 0 "
        "disables",
        bounds=(0, 4096),
    )
    memorization_resolution: int = flag(
        64, "side of the thumbnails the memorization watch compares (cxr.audit's)", bounds=(8, 1024)
    )
    memorization_features: Path | None = flag(
        None,
        "also watch in the embedding space of this local TorchScript network, as cxr.audit --features: copies by "
        "cosine similarity (a sample counts when either statistic flags it) and KID in that space",
    )
    stop_on_copy_rate: float | None = flag(
        None,
        "stop with a checkpoint when a validation's copy rate is above this rate (e.g. 0.05); OUTPUT_DIR/lora_unet "
        "then holds the adapter of the last checkpoint whose own copy rate was under it",
        bounds=(0.0, 1.0),
    )
    checkpointing_steps: int = flag(
        500, "save a resumable checkpoint every N steps (0: only at the end)", bounds=(0, 10**9)
    )
    checkpoints_total_limit: int | None = flag(
        3, "keep at most this many checkpoints (oldest removed first)", bounds=(1, 10**6)
    )
    resume_from_checkpoint: str | None = flag(None, "`latest` or a checkpoint folder to continue from exactly")
    overwrite_output_dir: bool = flag(
        False,
        "start a fresh run in an --output_dir that holds an earlier run's checkpoints or adapter: that run's files "
        "are moved into OUTPUT_DIR/previous-run-<UTC time>/ (nothing is deleted; the latent cache stays)",
    )

    def validate(self) -> None:
        check_choices(self)
        require(
            self.dataset_dir is not None or self.file_list is not None,
            "dataset_dir",
            "is required (or give --file_list with absolute paths)",
        )
        require(
            self.resolution > 0 and self.resolution % 8 == 0,
            "resolution",
            f"must be a positive multiple of 8, got {self.resolution}",
        )
        require(
            0.0 <= self.intensity_clip_percent < 50.0,
            "intensity_clip_percent",
            f"must be in [0, 50), got {self.intensity_clip_percent}",
        )
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(bool(self.lora_targets.strip(",").strip()), "lora_targets", "must name at least one projection")
        require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )
        check_output_name(self.output_name, self.resolved_output_name)
        require(
            self.stop_on_copy_rate is None or (self.memorization_samples > 0 and self.validation_steps > 0),
            "stop_on_copy_rate",
            "needs the memorization watch: --memorization_samples > 0 and --validation_steps > 0",
        )
        require(
            not (self.overwrite_output_dir and self.resume_from_checkpoint),
            "overwrite_output_dir",
            "cannot be combined with --resume_from_checkpoint (one moves the earlier run aside, the other continues "
            "it)",
        )

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def run_paths(self) -> RunPaths:
        """Every path of the run folder, --logging_dir and --cache_dir applied."""
        return RunPaths.of(self.output_dir, logging_dir=self.logging_dir, cache_dir=self.cache_dir)

    @property
    def resolved_output_name(self) -> str:
        """--output_name, or the output folder's name with anything but letters, digits, '.', '_', '-' as '_'."""
        if self.output_name:
            return self.output_name
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(self.output_dir).resolve().name).lstrip("._-")
        return name.removesuffix(".safetensors") or "cxr-lora"

    @property
    def resolved_logging_dir(self) -> Path:
        return self.run_paths.logs

    @property
    def resolved_cache_dir(self) -> Path:
        return self.run_paths.cache

    @property
    def resolved_num_workers(self) -> int:
        """--dataloader_num_workers, or min(8, CPUs this process may use). One process decodes and resizes ~50
        NIH-sized PNGs/s (bench input section, CPU), far slower than a GPU's VAE encoder: the cache build needs
        several."""
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        return min(8, available_cpus())


SCHEDULERS = ("dpm++", "ddim", "ddpm", "euler", "euler_a", "pndm", "unipc")


@dataclass
class SampleConfig:
    """Generate synthetic chest X-rays from the base model plus a cxr LoRA adapter."""

    base_model: str = flag(
        DEFAULT_MODEL_ID, "base model: hub id or local folder (the old runwayml id is mapped to the new one)"
    )
    revision: str | None = flag(None, "hub revision of --base_model")
    lora_path: Path | None = flag(
        None,
        "adapter folder (OUTPUT_DIR/lora_unet) or .safetensors file, diffusers or kohya format; omit for the base "
        "model alone",
    )
    lora_scale: float = flag(1.0, "strength of the adapter (0 = base model)", bounds=(-10.0, 10.0))
    merge_lora: bool = flag(
        True, "merge the adapter into the UNet weights before sampling (faster; same images up to rounding)"
    )
    out_dir: Path = flag(Path("samples"), "folder for the images, contact sheet and index")
    num_images: int = flag(16, "images to generate (image i uses seed + i)", bounds=(1, 10**7))
    start_index: int = flag(
        0, "index of the first image (to extend a run: images already on disk are skipped)", bounds=(0, 10**9)
    )
    height: int | None = flag(
        None,
        "image height in pixels (multiple of 8); default: the adapter's training resolution (cxr.resolution in its "
        "header), else 256",
        bounds=(8, 4096),
    )
    width: int | None = flag(
        None,
        "image width in pixels (multiple of 8); default: the adapter's training resolution, else 256",
        bounds=(8, 4096),
    )
    prompt: str | None = flag(
        None, f"prompt; default: the adapter's training prompt (cxr.prompt in its header), else {DEFAULT_PROMPT!r}"
    )
    negative_prompt: str = flag("", "negative prompt")
    num_inference_steps: int = flag(25, "denoising steps", bounds=(1, 1000))
    guidance_scale: float = flag(3.0, "classifier-free guidance scale (1 disables guidance)", bounds=(0.0, 100.0))
    scheduler: str = flag("dpm++", "sampler", SCHEDULERS)
    seed: int = flag(
        0, "base seed; image i uses seed + i (each in 0 to 2**64 - 1, the generator's range)", bounds=(0, SEED_MAX)
    )
    batch_size: int = flag(8, "images per forward pass", bounds=(1, 1024))
    grayscale_out: bool = flag(False, "write single-channel PNGs computed from the decoded luminance")
    bit_depth: int = flag(8, "bit depth of --grayscale_out PNGs", (8, 16))
    contact_sheet: int = flag(16, "images in the contact sheet (0 disables)", bounds=(0, 1024))
    device: str = flag("auto", "cuda, cpu or auto")
    dtype: str = flag("auto", "compute dtype (auto: fp16 on CUDA, fp32 on CPU)", ("auto", "fp32", "fp16", "bf16"))

    def validate(self) -> None:
        check_choices(self)
        require(
            self.height is None or (self.height > 0 and self.height % 8 == 0),
            "height",
            f"must be a positive multiple of 8, got {self.height}",
        )
        require(
            self.width is None or (self.width > 0 and self.width % 8 == 0),
            "width",
            f"must be a positive multiple of 8, got {self.width}",
        )
        last_seed = self.seed + self.start_index + self.num_images - 1
        require(
            0 <= self.seed and last_seed <= SEED_MAX,
            "seed",
            f"image i uses seed + i, so --seed ({self.seed}) + --start_index ({self.start_index}) + --num_images "
            f"({self.num_images}) - 1 must be in [0, {SEED_MAX}] (torch.Generator's seed range); choose a smaller "
            f"--seed",
        )
        require(
            self.bit_depth == 8 or self.grayscale_out,
            "bit_depth",
            "16 needs --grayscale_out (16-bit PNGs are single-channel luminance)",
        )
        require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


# docs/flags.md block name -> "module:ConfigClass" (imported lazily: those modules import this one).
FLAG_TABLES = {
    "train": "cxr.config:TrainConfig",
    "sample": "cxr.config:SampleConfig",
    "select": "cxr.data.select:SelectConfig",
    "audit": "cxr.privacy.audit:AuditConfig",
    "evaluate": "cxr.privacy.evaluate:EvaluateConfig",
    "report": "cxr.privacy.report:ReportConfig",
    "dedup": "cxr.privacy.dedup:DedupConfig",
    "bench": "cxr.perf.bench:BenchConfig",
}


def _config_class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def update_flag_tables(text: str) -> str:
    """Replace each `<!-- flags:NAME -->...<!-- /flags:NAME -->` block with the generated table."""
    for name, spec in FLAG_TABLES.items():
        cls = _config_class(spec)
        start, end = f"<!-- flags:{name} -->", f"<!-- /flags:{name} -->"
        head, found, rest = text.partition(start)
        if not found:
            raise ValueError(f"the flag reference has no {start} marker")
        _, found_end, tail = rest.partition(end)
        if not found_end:
            raise ValueError(f"the flag reference has no {end} marker")
        text = f"{head}{start}\n{flag_table(cls)}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> None:
    """`python -m cxr.config FILE`: regenerate the flag tables of FILE (docs/flags.md) from the dataclasses. The file
    is named explicitly and must hold the table markers: nothing else is ever rewritten."""
    parser = argparse.ArgumentParser(
        prog="python -m cxr.config",
        description="Regenerate the flag tables (<!-- flags:NAME --> blocks) of the flag reference from the config "
        "dataclasses.",
    )
    parser.add_argument("reference", type=Path, help="the flag reference to update, e.g. docs/flags.md")
    reference = parser.parse_args(argv).reference
    try:
        text = reference.read_text(encoding="utf-8")
        updated = update_flag_tables(text)
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"{reference}: cannot be read ({getattr(error, 'strerror', None) or error})")
    except ValueError as error:
        parser.error(f"{reference}: {error}; give the flag reference (docs/flags.md)")
    if updated != text:
        from cxr.fileio import atomic_write_bytes

        atomic_write_bytes(reference, updated.encode("utf-8"))
    print(f"updated flag tables in {reference}")


if __name__ == "__main__":
    main()

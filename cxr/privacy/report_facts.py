"""The release report's facts: every input read and checked, gathered into one JSON-ready dict.

The run folder (config.json, manifest.json, the adapter files, TensorBoard logs), the sample folder's index.json,
the audit's report.json and the optional evaluation JSON are read here; a missing or damaged input is a
ReportError naming its flag. `cxr.privacy.report_page` draws the page from the dict, `cxr.privacy.report`
writes both.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from cxr import __version__
from cxr.config import TrainConfig, result_flags
from cxr.fileio import file_sha256
from cxr.model.provenance import shared_name, without_local_paths
from cxr.runpaths import RunPaths

# The memorization watch's curves too (train.py --memorization_samples): copy rate, best match, KID to held-out.
CURVE_TAGS = (
    "train/loss",
    "val/loss",
    "train/lr",
    "train/grad_norm",
    "privacy/copy_rate",
    "privacy/best_ncc_p95",
    "quality/kid_heldout",
)
INTENDED_USE = (
    "Research use: data augmentation, training and testing anomaly detectors, method development, and sharing "
    "example images where real radiographs cannot be shared. Every image is synthetic: it shows no real patient "
    "and must not be used for diagnosis or for the clinical care of anyone."
)
KNOWN_LIMITS = (
    "The images imitate the training set, including its scanners, positioning, labels and population; they "
    "are not a sample of all chest X-rays.",
    "The training set was filtered to normal studies: subtle findings the labels missed may be reproduced, and "
    "no finding should be expected or trusted in these images.",
    "The memorization audit compares pixels (normalized cross-correlation of small thumbnails, shift-tolerant). "
    "It catches near-copies; a copy that was re-windowed, cropped differently or strongly re-noised can score "
    "lower. The threshold is only as good as the held-out set that calibrated it.",
    "Image quality metrics (FID/KID) depend on the feature network; a network trained on photographs measures "
    "radiographs only roughly.",
)


class ReportError(ValueError):
    """An input of the report is missing or unreadable; the message names the flag and the file."""


# The sections of each input the page reads, and their JSON types (checked when read, so that a damaged or foreign
# file is named instead of failing deep in the drawing).
RUN_SHAPE = {"config": dict, "versions": dict, "resolved": dict}
INDEX_SHAPE = {"settings": dict, "images": list}
AUDIT_SHAPE = {
    **dict.fromkeys(("config", "counts", "threshold", "calibration", "flagged", "flagged_any"), dict),
    **dict.fromkeys(("samples", "holdout", "embedding"), dict),
    "closest_pairs": list,
}
EVAL_SHAPE = {"kid": dict, "features": dict, "diversity_ms_ssim": dict, "intensity": dict}
_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def _read_json(path: Path, flag_name: str, what: str, shape: dict[str, type] | None = None) -> dict:
    """The JSON object in `path`; ReportError naming the flag when it is missing, unreadable, not an object, or a
    section of `shape` has another type."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"--{flag_name}: {path} does not exist; {what}") from None
    except (OSError, ValueError) as error:
        raise ReportError(f"--{flag_name}: {path} is unreadable ({error}); {what}") from None
    wrong = [] if isinstance(data, dict) else [("the file", data, dict)]
    wrong += [
        (f"`{key}`", data[key], kind)
        for key, kind in (shape or {}).items()
        if not wrong and data.get(key) is not None and not isinstance(data[key], kind)
    ]
    if wrong:
        where, value, kind = wrong[0]
        found = _JSON_TYPES.get(type(value), type(value).__name__)
        raise ReportError(f"--{flag_name}: {path}: {where} is a JSON {found}, not an {_JSON_TYPES[kind]}; {what}")
    return data


def adapter_facts(run_dir: Path) -> dict:
    """sha256 and `cxr.*` header metadata of every adapter file in RUN/lora_unet, and the one sample.py loads."""
    from safetensors import SafetensorError, safe_open

    from cxr.model.adapter_files import resolve_adapter_file
    from cxr.model.lora import AdapterError

    folder = RunPaths.of(run_dir).adapter
    try:
        loaded = resolve_adapter_file(folder)
    except AdapterError as error:
        raise ReportError(f"--run: {error}; point --run at a finished training run's --output_dir") from None
    files = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ReportError(f"--run: adapter {path} is unreadable ({error}); it is damaged or incomplete") from None
        files.append(
            {
                "file": path.name,
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "metadata": {k: v for k, v in sorted(header.items()) if k.startswith("cxr.")},
            }
        )
    chosen = next(f for f in files if f["file"] == loaded.name)
    return {
        "loaded_by_sample_py": loaded.name,
        "sha256": chosen["sha256"],
        "metadata": chosen["metadata"],
        "files": files,
    }


def training_curves(log_dir: Path, tags=CURVE_TAGS) -> dict[str, list[list[float]]]:
    """{tag: [[step, value], ...]} read back with TensorBoard's own reader from every event file under `log_dir`
    (resumed runs and per-run subfolders included); a later point at the same step replaces an earlier one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    folders = sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")})
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                points = curves.setdefault(tag, {})
                for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
                    points[int(event.step)] = float(event.value)
    return {tag: [[step, value] for step, value in sorted(points.items())] for tag, points in curves.items()}


def versions_here() -> dict[str, str]:
    import diffusers
    import numpy
    import safetensors
    import torch
    import transformers

    return {
        "cxr": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


def _same_folder(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _consistency_warnings(
    run_config: dict, manifest_sha: str | None, adapter: dict, index: dict, audit: dict, samples_dir: Path
) -> list[str]:
    """What does not fit together: samples of another adapter, a changed manifest, an audit of other samples or
    with an uncalibrated threshold."""
    warnings_list = []
    settings = index.get("settings", {})
    if settings.get("adapter_sha256") != adapter["sha256"]:
        warnings_list.append(
            f"The samples were not made by this run's adapter: index.json records adapter sha256 "
            f"{settings.get('adapter_sha256')!r}, the run's {adapter['loaded_by_sample_py']} is {adapter['sha256']!r}."
        )
    if manifest_sha and run_config.get("manifest_sha256") not in (None, manifest_sha):
        warnings_list.append(
            "The run's manifest.json changed after training started (its sha256 differs from the "
            "one recorded in config.json)."
        )
    if manifest_sha and adapter["metadata"].get("cxr.manifest_sha256") not in (None, manifest_sha):
        warnings_list.append("The adapter was trained on another manifest than the run's manifest.json.")
    audited = audit.get("config", {}).get("samples_dir")
    if audited and not _same_folder(audited, samples_dir):
        warnings_list.append(
            f"The audit was run on the folder {shared_name(audited)!r}, not on the released samples "
            f"{shared_name(samples_dir)!r}."
        )
    counts = audit.get("counts", {})
    calibration = audit.get("calibration") or {}
    if not audit.get("threshold", {}).get("calibrated", False):
        warnings_list.append("The audit threshold was not calibrated on held-out images.")
    elif calibration and not calibration.get("sufficient", True):
        warnings_list.append(
            f"The audit threshold was calibrated on only {calibration.get('holdout_images')} held-out "
            f"images; quantile {calibration.get('quantile')} needs at least "
            f"{calibration.get('min_holdout_images')} to mean what it says."
        )
    image_count = len(index.get("images", []))
    if counts.get("samples") is not None and counts["samples"] != image_count:
        warnings_list.append(f"The audit covered {counts['samples']} images; the sample folder indexes {image_count}.")
    return warnings_list


# The audit report's sections the page shows.
AUDIT_KEYS = (
    "counts",
    "statistic",
    "threshold",
    "calibration",
    "flagged",
    "flagged_any",
    "embedding",
    "samples",
    "holdout",
    "closest_pairs",
    "intensity_clip_percent",
)


def _log_dir(run_dir: Path, train_flags: dict) -> Path:
    """The run's TensorBoard folder: its recorded --logging_dir, or RUN/logs when that is relative and not found from
    here (the run was trained in another working folder)."""
    log_dir = RunPaths.of(run_dir, logging_dir=train_flags.get("logging_dir")).logs
    if not log_dir.is_absolute() and not log_dir.exists():
        log_dir = RunPaths.of(run_dir).logs
    return log_dir


def gather_facts(run_dir: Path, samples_dir: Path, audit_dir: Path, eval_file: Path | None = None) -> dict:
    """Everything the page shows, as a JSON-ready dict (written beside the page): the report's --run, --samples,
    --audit and --eval inputs read and checked. Raises ReportError."""
    run_dir, samples_dir, audit_dir = Path(run_dir), Path(samples_dir), Path(audit_dir)
    run_config = _read_json(RunPaths.of(run_dir).config, "run", "give a training run's --output_dir", RUN_SHAPE)
    train_flags = run_config.get("config", {})
    manifest_path = RunPaths.of(run_dir).manifest
    manifest_sha = file_sha256(manifest_path) if manifest_path.is_file() else None
    adapter = adapter_facts(run_dir)
    index = _read_json(
        samples_dir / "index.json", "samples", "give the folder sample.py wrote (it holds index.json)", INDEX_SHAPE
    )
    audit = _read_json(
        audit_dir / "report.json",
        "audit",
        "run `python -m cxr.audit --samples_dir SAMPLES --out DIR` first",
        AUDIT_SHAPE,
    )
    evaluation = (
        _read_json(Path(eval_file), "eval", "give the file written by `python -m cxr.evaluate --out FILE`", EVAL_SHAPE)
        if eval_file is not None
        else None
    )

    settings = index.get("settings", {})
    image_count = len(index.get("images", []))
    warnings_list = _consistency_warnings(run_config, manifest_sha, adapter, index, audit, samples_dir)
    # The page and its JSON are meant to be shared: every local path in them becomes its name.
    return without_local_paths(
        {
            "report": {
                "cxr_version": __version__,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "inputs": {
                    "run": str(run_dir),
                    "samples": str(samples_dir),
                    "audit": str(audit_dir),
                    "eval": str(eval_file) if eval_file else None,
                },
            },
            "warnings": warnings_list,
            "provenance": {
                "base_model": adapter["metadata"].get("cxr.base_model") or train_flags.get("model_id"),
                "base_model_sha256": adapter["metadata"].get("cxr.base_model_sha256"),
                "revision": train_flags.get("revision"),
                "adapter": adapter,
                "manifest_sha256": manifest_sha,
                "result_flags": {
                    name: train_flags.get(name) for name in result_flags(TrainConfig) if name in train_flags
                },
                "training_flags": train_flags,
                "training_versions": run_config.get("versions", {}),
                "report_versions": versions_here(),
                "resolved": run_config.get("resolved", {}),
            },
            "samples": {
                "folder": str(samples_dir),
                "count": image_count,
                "settings": settings,
                "files": [row["file"] for row in index.get("images", [])],
            },
            "training_curves": training_curves(_log_dir(run_dir, train_flags)),
            "audit": {key: audit.get(key) for key in AUDIT_KEYS},
            "evaluation": evaluation,
            "intended_use": INTENDED_USE,
            "known_limits": list(KNOWN_LIMITS),
        }
    )

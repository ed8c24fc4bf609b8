"""Release report for a synthetic chest X-ray set: one self-contained HTML page, plus the same facts as JSON.

Attach it when you share generated images. It gathers what a reader needs to judge the set:

* provenance: base model id and revision, the adapter's sha256 and header, the training manifest's hash,
  the training flags, package versions (of the training run and of this machine);
* a grid of samples, and the settings that made them (with a loud warning when the samples were not made by
  the run's adapter);
* the training curves, read back from the run's TensorBoard event files;
* the memorization audit: the threshold and how it was set, the flagged rate next to the held-out rate, the
  score histograms and the closest-pairs gallery;
* the evaluation metrics (`cxr.privacy.evaluate --out FILE`) when given;
* the intended use and the known limits.

The page embeds its images as PNG data URIs and draws its charts as inline SVG: it opens offline, from a
USB stick, in any browser. Nothing is fetched.

    python -m cxr.report --run cxr-lora --samples samples --audit audit --eval eval.json --out report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxr import __version__
from cxr.config import TrainConfig
from cxr.fileio import check_writable_file, file_sha256, staged_files
from cxr.flags import check_choices, flag, parse_config, require, result_flags
from cxr.model.provenance import shared_name, without_local_paths
from cxr.runpaths import RunPaths

EXIT_OK, EXIT_USAGE = 0, 2
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


@dataclass
class ReportConfig:
    """Write a self-contained release report (HTML + JSON) for a set of synthetic chest X-rays."""

    run: Path | None = flag(None, "the training run's --output_dir (config.json, manifest.json, lora_unet/, logs/)")
    samples: Path | None = flag(None, "the sample.py --out_dir of the set being released (index.json and the images)")
    audit: Path | None = flag(None, "the cxr.privacy.audit --out folder of these samples (report.json, gallery.png)")
    eval: Path | None = flag(None, "optional cxr.privacy.evaluate --out JSON file of these samples")
    out: Path = flag(
        Path("report.html"), "the HTML page to write; the same facts go beside it as JSON (same name, .json)"
    )
    grid_images: int = flag(16, "samples shown in the page's grid", bounds=(1, 1024))

    def validate(self) -> None:
        check_choices(self)
        require(self.run is not None, "run", "is required: the training run's --output_dir")
        require(self.samples is not None, "samples", "is required: the sample.py --out_dir of the released set")
        require(self.audit is not None, "audit", "is required: the cxr.privacy.audit --out folder of these samples")
        require(Path(self.out).suffix.lower() in (".html", ".htm"), "out", f"must end in .html, got {self.out}")


# --------------------------------------------------------------------------------------------- reading


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


def gather_facts(cfg: ReportConfig) -> dict:
    """Everything the page shows, as a JSON-ready dict (written beside the page). Raises ReportError."""
    run_dir, samples_dir, audit_dir = Path(cfg.run), Path(cfg.samples), Path(cfg.audit)
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
        _read_json(Path(cfg.eval), "eval", "give the file written by `python -m cxr.evaluate --out FILE`", EVAL_SHAPE)
        if cfg.eval is not None
        else None
    )

    settings = index.get("settings", {})
    image_count = len(index.get("images", []))
    warnings_list = _consistency_warnings(run_config, manifest_sha, adapter, index, audit, samples_dir)

    log_dir = RunPaths.of(run_dir, logging_dir=train_flags.get("logging_dir")).logs
    if not log_dir.is_absolute() and not log_dir.exists():
        log_dir = RunPaths.of(run_dir).logs
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
                    "eval": str(cfg.eval) if cfg.eval else None,
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
            "training_curves": training_curves(log_dir),
            "audit": {
                key: audit.get(key)
                for key in (
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
            },
            "evaluation": evaluation,
            "intended_use": INTENDED_USE,
            "known_limits": list(KNOWN_LIMITS),
        }
    )


# --------------------------------------------------------------------------------------------- drawing


def png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_grid(paths: list[Path], tile: int = 160, gap: int = 4, columns: int = 8):
    """The images side by side (grayscale, `tile` px, `gap` px apart) as one PIL image, or None without images."""
    from PIL import Image, ImageOps

    if not paths:
        return None
    columns = min(columns, len(paths))
    rows = math.ceil(len(paths) / columns)
    grid = Image.new("L", (columns * tile + (columns - 1) * gap, rows * tile + (rows - 1) * gap), 255)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image = ImageOps.fit(image.convert("L"), (tile, tile), Image.LANCZOS)
        row, col = divmod(i, columns)
        grid.paste(image, (col * (tile + gap), row * (tile + gap)))
    return grid


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def svg_line_chart(points: list[list[float]], *, title: str, width: int = 420, height: int = 220) -> str:
    """One curve as inline SVG with axis labels (min/max of each axis)."""
    if not points:
        return ""
    pad_left, pad_right, pad_top, pad_bottom = 56, 12, 24, 28
    points = [p for p in points if math.isfinite(p[1])]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-9
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom

    def at(x, y):
        return pad_left + (x - x0) / (x1 - x0) * plot_w, pad_top + (1 - (y - y0) / (y1 - y0)) * plot_h

    coords = " ".join(f"{at(x, y)[0]:.1f},{at(x, y)[1]:.1f}" for x, y in zip(xs, ys))
    marks = (
        "".join(f'<circle cx="{at(x, y)[0]:.1f}" cy="{at(x, y)[1]:.1f}" r="2.5"/>' for x, y in zip(xs, ys))
        if len(xs) <= 40
        else ""
    )
    label = lambda v: _fmt(float(v), 3)  # noqa: E731
    return (
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
        f'<text x="{pad_left}" y="15" class="ct">{html.escape(title)}</text>'
        f'<rect x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}" class="frame"/>'
        f'<polyline points="{coords}" class="line"/><g class="dots">{marks}</g>'
        f'<text x="{pad_left - 4}" y="{pad_top + 10}" class="yl">{label(y1)}</text>'
        f'<text x="{pad_left - 4}" y="{pad_top + plot_h}" class="yl">{label(y0)}</text>'
        f'<text x="{pad_left}" y="{height - 8}" class="xl">step {int(x0)}</text>'
        f'<text x="{pad_left + plot_w}" y="{height - 8}" class="xl end">step {int(x1)}</text></svg>'
    )


def svg_histograms(
    samples: dict | None, holdout: dict | None, threshold: float | None, *, width: int = 560, height: int = 240
) -> str:
    """The audit's score histograms (samples and held-out, each as a fraction of its set) and the threshold."""
    sets = [
        (name, h) for name, h in (("samples", samples), ("held-out", holdout)) if h and sum(h.get("counts", [])) > 0
    ]
    if not sets:
        return ""
    edges = sets[0][1]["edges"]
    low, high = edges[0], edges[-1]
    pad_left, pad_bottom, pad_top = 40, 28, 24
    plot_w, plot_h = width - pad_left - 12, height - pad_bottom - pad_top
    fractions = {name: [c / sum(h["counts"]) for c in h["counts"]] for name, h in sets}
    peak = max(max(f) for f in fractions.values()) or 1.0
    bars = []
    bin_w = plot_w / len(edges[:-1])
    for k, (name, _) in enumerate(sets):
        for i, value in enumerate(fractions[name]):
            if value <= 0:
                continue
            bar_h = value / peak * plot_h
            x = pad_left + i * bin_w + k * bin_w / len(sets)
            bars.append(
                f'<rect x="{x:.1f}" y="{pad_top + plot_h - bar_h:.1f}" width="{bin_w / len(sets):.1f}" '
                f'height="{bar_h:.1f}" class="b{k}"><title>{name}: {value:.1%} in '
                f"[{edges[i]:.3f}, {edges[i + 1]:.3f})</title></rect>"
            )
    marker = ""
    if threshold is not None and low <= threshold <= high:
        x = pad_left + (threshold - low) / (high - low) * plot_w
        marker = (
            f'<line x1="{x:.1f}" y1="{pad_top}" x2="{x:.1f}" y2="{pad_top + plot_h}" class="thr"/>'
            f'<text x="{x - 4:.1f}" y="{pad_top - 6}" class="yl">threshold {threshold:.3f}</text>'
        )
    legend = "".join(
        f'<rect x="{pad_left + 8 + 110 * k}" y="{pad_top + 4}" width="10" height="10" class="b{k}"/>'
        f'<text x="{pad_left + 22 + 110 * k}" y="{pad_top + 13}">{name}</text>'
        for k, (name, _) in enumerate(sets)
    )
    return (
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="audit score histograms"><title>best NCC with a training image</title>'
        f'<rect x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}" class="frame"/>{"".join(bars)}'
        f'{marker}{legend}<text x="{pad_left}" y="{height - 8}" class="xl">NCC {low:g}</text>'
        f'<text x="{pad_left + plot_w}" y="{height - 8}" class="xl end">{high:g}</text></svg>'
    )


# --------------------------------------------------------------------------------------------- page

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#1b1b1b}
h1{font-size:24px}h2{margin-top:32px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}code{font-size:13px;word-break:break-all}
.warn{background:#fff1d6;border:1px solid #e0a800;padding:8px 12px;margin:8px 0}
.chart{margin:6px 12px 6px 0;font-size:11px}.chart .frame{fill:none;stroke:#999}.chart .line{fill:none;
stroke:#1f5fa8;stroke-width:1.6}.chart .dots circle{fill:#1f5fa8}.chart .yl{text-anchor:end}.chart .end{text-anchor:end}
.chart .ct{font-weight:600;font-size:12px}.b0{fill:#1f5fa8;opacity:.8}.b1{fill:#d17a00;opacity:.8}
.thr{stroke:#c00;stroke-width:1.5;stroke-dasharray:4 3}img{max-width:100%;image-rendering:auto}
.small{color:#555;font-size:13px}
"""


def _table(rows, header=("", "")) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _code(value) -> str:
    return f"<code>{html.escape(_fmt(value) if isinstance(value, float) else str(value))}</code>"


def render_html(facts: dict, images: dict[str, str]) -> str:
    """The page: one section per part of the report, every image a data URI, every chart inline SVG."""
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Release report: synthetic chest "
        f"X-rays</title><style>{STYLE}</style></head><body>",
        "<h1>Synthetic chest X-ray set: release report</h1>",
        f"<p class='small'>Written {html.escape(facts['report']['written'])} by cxr {html.escape(__version__)}. "
        "Every image in this set is synthetic: it shows no real patient.</p>",
    ]
    for warning in facts["warnings"]:
        parts.append(f"<div class='warn'><b>Check:</b> {html.escape(warning)}</div>")
    parts += _summary_section(facts)
    parts += _samples_section(facts["samples"], images)
    parts += _training_section(facts["training_curves"])
    parts += _audit_section(facts["audit"], images)
    parts += _evaluation_section(facts["evaluation"])
    parts += _provenance_section(facts["provenance"], facts["samples"])
    parts.append("<section id='use'><h2>Intended use and known limits</h2>")
    parts.append(f"<p>{html.escape(facts['intended_use'])}</p><ul>")
    parts.extend(f"<li>{html.escape(limit)}</li>" for limit in facts["known_limits"])
    parts.append("</ul></section></body></html>")
    return "\n".join(parts)


def _audit_parts(audit: dict) -> tuple[dict, dict, dict]:
    """The audit report's (threshold, flagged, counts) sections, empty where missing."""
    return audit.get("threshold") or {}, audit.get("flagged") or {}, audit.get("counts") or {}


def _summary_section(facts: dict) -> list[str]:
    prov, samples, audit = facts["provenance"], facts["samples"], facts["audit"]
    threshold, flagged, counts = _audit_parts(audit)
    holdout_rate = flagged.get("holdout_rate")
    verdict = (
        (
            f"{flagged.get('count')} of {counts.get('samples')} samples ({flagged.get('rate', 0):.2%}) score above the "
            f"memorization threshold {_fmt(threshold.get('value'))}"
            + ("" if holdout_rate is None else f"; held-out real images: {holdout_rate:.2%}")
        )
        if flagged
        else "n/a"
    )
    return [
        "<section id='summary'><h2>Summary</h2>",
        _table(
            [
                ("images", f"{samples['count']} synthetic chest X-rays"),
                ("made from", f"{_code(prov['base_model'])} + LoRA adapter {_code(prov['adapter']['sha256'][:16])}…"),
                ("memorization audit", html.escape(verdict)),
                ("threshold set by", html.escape(str(threshold.get("rule")))),
                *(
                    [
                        (
                            "embedding audit",
                            html.escape(
                                f"{audit['embedding']['flagged']['count']} samples above the cosine "
                                f"threshold; {(audit.get('flagged_any') or {}).get('count')} flagged by either "
                                "statistic"
                            ),
                        )
                    ]
                    if audit.get("embedding")
                    else []
                ),
            ],
            ("what", "value"),
        ),
        "</section>",
    ]


def _samples_section(samples: dict, images: dict[str, str]) -> list[str]:
    parts = [
        "<section id='samples'><h2>Samples</h2>",
        f"<p>{samples['count']} images in <code>{html.escape(samples['folder'])}</code>; the first "
        f"{images.get('grid_count', 0)} are shown.</p>",
    ]
    if "grid" in images:
        parts.append(f"<img alt='sample grid' src='{images['grid']}'>")
    settings = samples["settings"]
    parts.append(_table([(_code(k), _code(settings[k])) for k in sorted(settings)], ("sampling setting", "value")))
    parts.append("</section>")
    return parts


def _training_section(curves: dict) -> list[str]:
    parts = ["<section id='training'><h2>Training curves</h2>"]
    if curves:
        parts.append("<div>" + "".join(svg_line_chart(points, title=tag) for tag, points in curves.items()) + "</div>")
        parts.append(
            "<p class='small'>Read back from the run's TensorBoard event files. val/loss is the plain MSE on "
            "fixed held-out latents, noise and timesteps, so its points compare across steps. privacy/copy_rate is "
            "the share of the run's fixed-seed validation samples whose best match with a training image is above "
            "the audit's held-out threshold (the memorization watch: docs/privacy.md).</p>"
        )
    else:
        parts.append("<p>No TensorBoard scalars were found in the run's log folder.</p>")
    parts.append("</section>")
    return parts


def _audit_section(audit: dict, images: dict[str, str]) -> list[str]:
    threshold, flagged, counts = _audit_parts(audit)
    holdout_rate = flagged.get("holdout_rate")
    parts = [
        "<section id='audit'><h2>Memorization audit</h2>",
        _table(
            [
                ("statistic", html.escape(str(audit.get("statistic")))),
                ("threshold", f"{_code(threshold.get('value'))} ({html.escape(str(threshold.get('rule')))})"),
                ("calibrated on held-out images", _code(threshold.get("calibrated"))),
                (
                    "images",
                    f"{counts.get('samples')} samples, {counts.get('train')} training, {counts.get('holdout')} "
                    f"held-out",
                ),
                ("flagged samples", f"{flagged.get('count')} = {flagged.get('rate', 0):.2%}" if flagged else "n/a"),
                ("held-out real images above the threshold", "n/a" if holdout_rate is None else f"{holdout_rate:.2%}"),
            ],
            ("what", "value"),
        ),
    ]
    hist = svg_histograms(
        (audit.get("samples") or {}).get("histogram"),
        (audit.get("holdout") or {}).get("histogram"),
        threshold.get("value"),
    )
    if hist:
        parts.append(hist)
    if audit.get("embedding"):
        parts += _embedding_audit_parts(audit)
    if "gallery" in images:
        parts.append("<h3>Closest pairs (sample, training image)</h3>")
        parts.append(f"<img alt='closest pairs gallery' src='{images['gallery']}'>")
    pairs = audit.get("closest_pairs") or []
    if pairs:
        parts.append(
            _table(
                [
                    (
                        _code(Path(p["sample"]).name),
                        _code(Path(p["best_match"]).name),
                        _code(p["ncc"]),
                        _code(p["flagged"]),
                    )
                    for p in pairs[:16]
                ],
                ("sample", "closest training image", "NCC", "flagged"),
            )
        )
    parts.append("</section>")
    return parts


def _embedding_audit_parts(audit: dict) -> list[str]:
    embedding = audit["embedding"]
    emb_threshold, emb_flagged = embedding["threshold"], embedding["flagged"]
    emb_rate = emb_flagged.get("holdout_rate")
    parts = [
        "<h3>In the embedding space of the --features network</h3>",
        _table(
            [
                ("network", _code(embedding["extractor"])),
                ("statistic", html.escape(embedding["statistic"])),
                ("threshold", f"{_code(emb_threshold['value'])} ({html.escape(str(emb_threshold['rule']))})"),
                ("flagged samples", f"{emb_flagged['count']} = {emb_flagged['rate']:.2%}"),
                ("held-out real images above the threshold", "n/a" if emb_rate is None else f"{emb_rate:.2%}"),
                ("flagged by either statistic", f"{(audit.get('flagged_any') or {}).get('count')}"),
            ],
            ("what", "value"),
        ),
    ]
    emb_hist = svg_histograms(
        embedding["samples"].get("histogram"), embedding["holdout"].get("histogram"), emb_threshold["value"]
    )
    if emb_hist:
        parts.append(emb_hist)
    return parts


def _evaluation_section(evaluation: dict | None) -> list[str]:
    parts = ["<section id='evaluation'><h2>Evaluation</h2>"]
    if evaluation:
        rows = []
        if "fid" in evaluation:
            rows.append(("FID", _code(evaluation["fid"])))
            rows.append(("KID", f"{_code(evaluation['kid']['mean'])} ± {_code(evaluation['kid']['std'])}"))
            rows.append(("feature network", _code(evaluation.get("features", {}).get("extractor"))))
        diversity = evaluation.get("diversity_ms_ssim", {})
        for name in ("fake", "real"):
            if name in diversity:
                rows.append(
                    (f"MS-SSIM between {name} pairs (lower = more diverse)", _code(diversity[name].get("mean")))
                )
        intensity = evaluation.get("intensity", {})
        for key in ("histogram_intersection", "wasserstein1"):
            if key in intensity:
                rows.append((f"intensity {key.replace('_', ' ')}", _code(intensity[key])))
        parts.append(_table(rows, ("metric", "value")))
    else:
        parts.append("<p>No evaluation was given (<code>--eval</code>).</p>")
    parts.append("</section>")
    return parts


def _provenance_section(prov: dict, samples: dict) -> list[str]:
    adapter = prov["adapter"]
    parts = [
        "<section id='provenance'><h2>Provenance</h2>",
        _table(
            [
                ("base model", _code(prov["base_model"])),
                ("base model content sha256 (a local folder)", _code(prov.get("base_model_sha256") or "-")),
                ("base model revision", _code(prov["revision"] or "main (unpinned)")),
                ("adapter file (loaded by sample.py)", _code(adapter["loaded_by_sample_py"])),
                ("adapter sha256", _code(adapter["sha256"])),
                ("training manifest sha256", _code(prov["manifest_sha256"])),
                ("samples made with adapter sha256", _code(samples["settings"].get("adapter_sha256"))),
            ],
            ("what", "value"),
        ),
    ]
    if len(adapter["files"]) > 1:
        parts.append(
            _table(
                [(_code(f["file"]), _code(f["sha256"]), _code(f["bytes"])) for f in adapter["files"]],
                ("adapter file", "sha256", "bytes"),
            )
        )
    parts.append("<h3>Flags that change the result</h3>")
    parts.append(_table([(_code(k), _code(v)) for k, v in prov["result_flags"].items()], ("flag", "value")))
    parts.append("<details><summary>All training flags (the run's config.json)</summary>")
    parts.append(_table([(_code(k), _code(v)) for k, v in sorted(prov["training_flags"].items())], ("flag", "value")))
    parts.append("</details>")
    if adapter["metadata"]:
        parts.append("<h3>Adapter header</h3>")
        parts.append(_table([(_code(k), _code(v)) for k, v in adapter["metadata"].items()], ("key", "value")))
    names = sorted(set(prov["training_versions"]) | set(prov["report_versions"]))
    parts.append("<h3>Package versions</h3>")
    parts.append(
        _table(
            [
                (html.escape(n), _code(prov["training_versions"].get(n, "")), _code(prov["report_versions"].get(n, "")))
                for n in names
            ],
            ("package", "training run", "this report"),
        )
    )
    parts.append("</section>")
    return parts


def write_report(cfg: ReportConfig) -> dict:
    """Gather the facts, draw the images, write OUT (HTML) and OUT.json. Returns the facts."""
    out = Path(cfg.out)
    for path in (out, out.with_suffix(".json")):  # before any input is read, not after the work
        check_writable_file(path, "--out", ReportError)
    try:
        facts = gather_facts(cfg)
        page = _render(cfg, facts)
    except (KeyError, TypeError, AttributeError, IndexError) as error:  # a field deeper than the checked sections
        raise ReportError(
            f"--run, --samples, --audit or --eval: a file has an unexpected structure ({type(error).__name__}: "
            f"{error}); give the files as the cxr commands wrote them"
        ) from None
    with staged_files("--out", ReportError) as files:  # the page and its JSON appear together or not at all
        files.write_bytes(out, page.encode("utf-8"))
        files.write_bytes(out.with_suffix(".json"), (json.dumps(facts, indent=2, default=str) + "\n").encode("utf-8"))
    return facts


def _render(cfg: ReportConfig, facts: dict) -> str:
    """The HTML page of `facts`, with the sample grid and the audit's gallery embedded."""
    from PIL import Image

    images: dict[str, str] = {}
    grid_paths = [Path(cfg.samples) / name for name in facts["samples"]["files"][: cfg.grid_images]]
    grid_paths = [p for p in grid_paths if p.is_file()]
    grid = sample_grid(grid_paths)
    if grid is not None:
        images["grid"], images["grid_count"] = png_data_uri(grid), len(grid_paths)
    gallery = Path(cfg.audit) / "gallery.png"
    if gallery.is_file():
        with Image.open(gallery) as image:
            images["gallery"] = png_data_uri(image.copy())
    return render_html(facts, images)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ReportConfig, argv, prog="python -m cxr.report")
    try:
        facts = write_report(cfg)
    except (ReportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.json')}")
    for warning in facts["warnings"]:
        print(f"check: {warning}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

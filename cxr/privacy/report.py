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
USB stick, in any browser. Nothing is fetched. The inputs are read and checked in `cxr.privacy.report_facts`,
the figures drawn in `cxr.privacy.report_figures` and the page written in `cxr.privacy.report_page`; this module
is the command.

    python -m cxr.report --run cxr-lora --samples samples --audit audit --eval eval.json --out report.html
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cxr.config import check_choices, flag, parse_config, require
from cxr.fileio import check_writable_file, staged_files
from cxr.privacy.report_facts import ReportError, gather_facts
from cxr.privacy.report_figures import png_data_uri, sample_grid
from cxr.privacy.report_page import render_html

EXIT_OK, EXIT_USAGE = 0, 2


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


def write_report(cfg: ReportConfig) -> dict:
    """Gather the facts, draw the images, write OUT (HTML) and OUT.json. Returns the facts."""
    out = Path(cfg.out)
    for path in (out, out.with_suffix(".json")):  # before any input is read, not after the work
        check_writable_file(path, "--out", ReportError)
    try:
        facts = gather_facts(cfg.run, cfg.samples, cfg.audit, cfg.eval)
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

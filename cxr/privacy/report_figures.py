"""The release report's figures: PNG data URIs, the sample grid, and the inline SVG charts (training curves and
the audit's score histograms). Each is self-contained: the page opens offline."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path


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


def format_number(value, digits: int = 4) -> str:
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
    label = lambda v: format_number(float(v), 3)  # noqa: E731
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

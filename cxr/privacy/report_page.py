"""The release report's HTML page: one section per part of the report, written from the facts
(`cxr.privacy.report_facts.gather_facts`) with the images and charts of `cxr.privacy.report_figures`."""

from __future__ import annotations

import html
from pathlib import Path

from cxr import __version__
from cxr.privacy.report_figures import format_number, svg_histograms, svg_line_chart

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
    return f"<code>{html.escape(format_number(value) if isinstance(value, float) else str(value))}</code>"


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
            f"memorization threshold {format_number(threshold.get('value'))}"
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

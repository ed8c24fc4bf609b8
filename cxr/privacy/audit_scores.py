"""The memorization audit's scores: SSIM with the candidates, one row per sample, summaries and histograms, the
audit in a feature network's embedding space, and the tables written from them (scores.csv, gallery.png)."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxr.data.imageio import Preprocess, thumbnail
from cxr.privacy.audit_calibration import check_ceiling
from cxr.privacy.audit_config import AuditConfig
from cxr.privacy.embedding import embedding_search
from cxr.privacy.imagemetrics import ssim
from cxr.privacy.imagesets import draw_gallery


class _SSIMDataset:
    """Item i: SSIM of sample i with each of its candidate training images, at `real.resolution` pixels."""

    def __init__(self, sample_paths, train_paths, candidates, real: Preprocess):
        self.sample_paths, self.train_paths, self.candidates = sample_paths, train_paths, candidates
        self.real, self.generated = real, replace(real, intensity_clip_percent=0.0)

    def __len__(self):
        return len(self.sample_paths)

    def __getitem__(self, index):
        sample = thumbnail(self.generated.read(self.sample_paths[index]), self.generated)
        refs = torch.stack(
            [thumbnail(self.real.read(self.train_paths[j]), self.real) for j in self.candidates[index].tolist()]
        )
        return ssim(sample.expand_as(refs), refs)


def candidate_ssim(sample_paths, train_paths, candidates, real: Preprocess, *, num_workers=0):
    """float32 (Nq, k) SSIM of every sample with each of its candidates (rows of `candidates`) at
    `real.resolution`; the training images are read as `real` says, the samples without an intensity window."""
    dataset = _SSIMDataset(sample_paths, train_paths, candidates, real)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    rows = [row for row in tqdm(loader, total=len(dataset), desc="SSIM", unit="img", disable=None)]
    return torch.stack(rows) if rows else torch.empty((0, candidates.shape[1]))


def score_summary(scores) -> dict:
    """count, mean, min, max and percentiles of a score vector (JSON-ready)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return {"count": 0}
    percentiles = {f"p{p}": float(np.percentile(scores, p)) for p in (1, 5, 25, 50, 75, 95, 99)}
    return {
        "count": int(scores.size),
        "mean": float(scores.mean()),
        "min": float(scores.min()),
        **percentiles,
        "max": float(scores.max()),
    }


def score_histogram(scores, bins: int = 40, low: float = 0.0, high: float = 1.0) -> dict:
    """Histogram of scores on [low, high] (values below `low` are counted in `below`)."""
    scores = np.asarray(scores, dtype=np.float64)
    counts, edges = np.histogram(np.clip(scores, low, high), bins=bins, range=(low, high))
    counts[0] -= int((scores < low).sum())
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "below": int((scores < low).sum())}


def score_section(scores, low: float = 0.0, high: float = 1.0) -> dict:
    """A report's section of one score vector: its summary and its histogram on [low, high]."""
    return {"summary": score_summary(scores), "histogram": score_histogram(scores, low=low, high=high)}


def score_rows(sample_paths, train_paths, best, flagged, indices, shifts, ssim_scores) -> list[dict]:
    """One scores.csv row per sample: its best match, NCC, shift, SSIM (with --ssim) and verdict."""
    rows = []
    for i, path in enumerate(sample_paths):
        row = {
            "sample": str(path),
            "best_match": str(train_paths[int(indices[i, 0])]),
            "ncc": float(best[i]),
            "shift_y": float(shifts[i, 0, 0]),
            "shift_x": float(shifts[i, 0, 1]),
            "ssim": None,
            "ssim_match": None,
            "flagged": bool(flagged[i]),
        }
        if ssim_scores is not None:
            j = int(ssim_scores[i].argmax())
            row["ssim"], row["ssim_match"] = float(ssim_scores[i, j]), str(train_paths[int(indices[i, j])])
        rows.append(row)
    return rows


def write_tables(config: AuditConfig, files, rows: list[dict], real: Preprocess) -> list[dict]:
    """Write scores.csv and gallery.png (the --gallery_pairs closest pairs) through `files` (staged); return those
    closest rows. File names that are not valid UTF-8 are written as their own bytes."""
    out = Path(config.out)
    with open(files.path(out / "scores.csv"), "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            [
                {
                    **r,
                    "ssim": "" if r["ssim"] is None else f"{r['ssim']:.6f}",
                    "ssim_match": r["ssim_match"] or "",
                    "ncc": f"{r['ncc']:.6f}",
                }
                for r in rows
            ]
        )
    closest = sorted(rows, key=lambda r: -r["ncc"])[: config.gallery_pairs]
    if closest:
        draw_gallery(closest, files.path(out / "gallery.png"), real)
    return closest


def embedding_audit(
    config: AuditConfig, train_paths, holdout_paths, sample_paths, real: Preprocess, device, rows: list[dict]
) -> dict:
    """The audit by cosine similarity in the --features network's embedding space (cxr.privacy.embedding); adds the
    embedding_* columns to `rows` and returns the report's `embedding` section."""
    matches = embedding_search(
        config.features,
        train_paths=train_paths,
        holdout_paths=holdout_paths,
        sample_paths=sample_paths,
        preprocess=replace(real, resolution=config.features_image_size),
        k=config.top_k,
        quantile=config.threshold_quantile,
        threshold=config.features_threshold,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        device=device,
        memory_budget_mb=config.memory_budget_mb,
    )
    if matches.calibrated:
        check_ceiling(matches.threshold, "cosine", matches.holdout_best.size)
    best = matches.scores[:, 0]
    flagged = best > matches.threshold if matches.threshold is not None else np.zeros(len(best), dtype=bool)
    for i, row in enumerate(rows):
        row.update(
            embedding_cosine=float(best[i]),
            embedding_match=str(train_paths[int(matches.indices[i, 0])]),
            embedding_flagged=bool(flagged[i]),
        )
    holdout = matches.holdout_best
    closest = sorted(rows, key=lambda r: -r["embedding_cosine"])[: config.gallery_pairs]
    return {
        "extractor": matches.extractor,
        "dim": matches.dim,
        "image_size": config.features_image_size,
        "statistic": f"best cosine similarity with a training image of L2-normalized {matches.dim}-d embeddings",
        "threshold": {"value": matches.threshold, "rule": matches.rule, "calibrated": matches.calibrated},
        "flagged": {
            "count": int(flagged.sum()),
            "rate": float(flagged.mean()),
            "holdout_rate": float((holdout > matches.threshold).mean())
            if holdout.size and matches.threshold is not None
            else None,
        },
        "samples": score_section(best, low=-1.0, high=1.0),
        "holdout": score_section(holdout, low=-1.0, high=1.0),
        "closest_pairs": [
            {
                "sample": r["sample"],
                "best_match": r["embedding_match"],
                "cosine": r["embedding_cosine"],
                "flagged": r["embedding_flagged"],
            }
            for r in closest
        ],
    }

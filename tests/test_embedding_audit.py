"""The audit in an embedding space: a test-built TorchScript network flags copies that pixel NCC misses."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.data.imageio import Preprocess
from cxr.data.phantoms import write_phantoms
from cxr.privacy.embedding import embedding_search
from cxr.privacy.imagesets import load_thumbnails
from cxr.privacy.ncc import best_matches, calibrate_threshold, standardize

ROLLS = {3: (37, 53), 8: (-60, 25)}  # training image index -> circular shift (rows, columns) at 256 px


class LowFrequencySpectrum(torch.nn.Module):
    """Log-magnitudes of the lowest spatial frequencies: unchanged by a circular shift of the image, unlike pixels."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.mean(1)
        spectrum = torch.fft.rfft2(gray - gray.mean(dim=(1, 2), keepdim=True)).abs()
        low = torch.cat([spectrum[:, :12, :12], spectrum[:, -12:, :12]], dim=1)
        features = torch.log1p(low).flatten(1)
        return features - features.mean(1, keepdim=True)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    train, holdout, samples = root / "train", root / "holdout", root / "samples"
    write_phantoms(train, 40, seed=0)
    write_phantoms(holdout, 30, seed=1)
    write_phantoms(samples, 8, seed=2)
    files = sorted(train.glob("*.png"))
    for index, shift in ROLLS.items():
        pixels = np.asarray(Image.open(files[index]).convert("L"))
        Image.fromarray(np.roll(pixels, shift, axis=(0, 1))).save(samples / f"rolled_copy_{index:02d}.png")
    network = root / "spectrum.pt"
    torch.jit.script(LowFrequencySpectrum()).save(str(network))
    return {
        "train": files,
        "holdout": sorted(holdout.glob("*.png")),
        "samples": sorted(samples.glob("*.png")),
        "network": network,
    }


def test_embedding_search_flags_rolled_copies_that_pixel_ncc_misses(sets):
    torch.set_num_threads(1)
    matches = embedding_search(
        sets["network"],
        train_paths=sets["train"],
        holdout_paths=sets["holdout"],
        sample_paths=sets["samples"],
        k=3,
        preprocess=Preprocess(128),
    )
    names = [p.name for p in sets["samples"]]
    flagged_by_embedding = {names[i] for i in np.flatnonzero(matches.scores[:, 0] > matches.threshold)}
    assert flagged_by_embedding == {f"rolled_copy_{i:02d}.png" for i in ROLLS}
    for i, name in enumerate(names):  # each copy's best match is the image it was made from
        if name.startswith("rolled_copy_"):
            assert sets["train"][matches.indices[i, 0]].name == f"phantom_{int(name[12:14]):05d}.png"
    assert matches.calibrated and "30 held-out images" in matches.rule
    assert matches.threshold == pytest.approx(calibrate_threshold(matches.holdout_best, 0.99))

    # The same images through the pixel audit's statistic (default 64 px, shifts up to 0.5 px): the rolled copies
    # score like strangers, far below the threshold calibrated the same way.
    train = standardize(load_thumbnails(sets["train"], Preprocess(64)))
    ncc = best_matches(load_thumbnails(sets["samples"], Preprocess(64)), train, k=1, max_shift=0.5)[0][:, 0].numpy()
    holdout = best_matches(load_thumbnails(sets["holdout"], Preprocess(64)), train, k=1, max_shift=0.5)[0][:, 0].numpy()
    ncc_threshold = calibrate_threshold(holdout.astype(np.float64), 0.99)
    assert not {names[i] for i in np.flatnonzero(ncc > ncc_threshold)} & flagged_by_embedding


def test_cosine_scores_equal_a_direct_computation(sets):
    from cxr.privacy.embedding import embed
    from cxr.privacy.evaluate import load_feature_extractor

    matches = embedding_search(
        sets["network"],
        train_paths=sets["train"],
        holdout_paths=[],
        sample_paths=sets["samples"],
        k=2,
        preprocess=Preprocess(64),
        threshold=0.5,
    )
    extractor, _ = load_feature_extractor(sets["network"])
    samples, train = (embed(paths, extractor, Preprocess(64)) for paths in (sets["samples"], sets["train"]))
    cosine = (samples @ train.T).numpy()
    np.testing.assert_allclose(matches.scores[:, 0], cosine.max(1), atol=1e-6)
    np.testing.assert_array_equal(matches.indices[:, 0], cosine.argmax(1))
    assert matches.threshold == 0.5 and not matches.calibrated and matches.holdout_best.size == 0


def test_audit_with_features_reports_both_statistics_and_gates_on_either(sets, tmp_path):
    import csv

    from cxr.privacy.audit import audit, format_summary
    from cxr.privacy.audit_config import AuditConfig

    folders = {name: sets[name][0].parent for name in ("train", "holdout", "samples")}
    cfg = AuditConfig(
        train_dir=folders["train"],
        holdout_dir=folders["holdout"],
        samples_dir=folders["samples"],
        out=tmp_path / "audit",
        features=sets["network"],
        features_image_size=128,
        num_workers=0,
        device="cpu",
        min_holdout_images=30,
        fail_above=0.05,
    )
    cfg.validate()
    report = audit(cfg)
    copies = {f"rolled_copy_{i:02d}.png" for i in ROLLS}
    with open(tmp_path / "audit" / "scores.csv") as handle:
        rows = {Path(r["sample"]).name: r for r in csv.DictReader(handle)}
    by_ncc = {name for name, r in rows.items() if r["flagged"] == "True"}
    by_embedding = {name for name, r in rows.items() if r["embedding_flagged"] == "True"}
    assert not by_ncc & copies  # pixel NCC misses the rolled copies (phantoms are alike: it may flag a stranger)
    assert by_embedding == copies
    embedding = report["embedding"]
    assert embedding["threshold"]["calibrated"] and embedding["flagged"]["count"] == 2
    assert {Path(p["sample"]).name for p in embedding["closest_pairs"][:2]} == copies
    assert report["flagged"]["count"] == len(by_ncc)
    assert report["flagged_any"]["count"] == len(by_ncc | copies)
    assert report["exit_code"] == 1  # >= 20% flagged by either statistic > --fail_above 5%
    assert "flagged by the embedding 2 / 10" in format_summary(report)


def test_audit_refuses_a_missing_features_file_before_reading(sets, tmp_path, capsys):
    from cxr.privacy.audit import main

    folder = sets["train"][0].parent
    code = main(
        [
            "--train_dir",
            str(folder),
            "--samples_dir",
            str(folder),
            "--holdout_dir",
            str(folder),
            "--out",
            str(tmp_path / "a"),
            "--features",
            str(tmp_path / "missing.pt"),
        ]
    )
    assert code == 2 and "--features" in capsys.readouterr().err and not (tmp_path / "a").exists()

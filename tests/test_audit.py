"""Memorization audit: NCC search against brute-force references, SSIM against a NumPy/SciPy formula,
and end to end on phantoms: copies (exact, noisy, shifted, brighter) are flagged, fresh phantoms are not."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.data.phantoms import make_phantom, to_uint
from cxr.privacy.audit import audit, main
from cxr.privacy.audit_config import AuditConfig
from cxr.privacy.imagemetrics import ssim
from cxr.privacy.ncc import (
    best_matches,
    chunk_sizes,
    merge_topk,
    ncc_topk,
    shift_images,
    shift_offsets,
    standardize,
    standardize_in_place,
)


def pearson_matrix(a, b):
    """NCC reference: Pearson correlation of every row of a with every row of b (np.corrcoef)."""
    return np.corrcoef(a, b)[: len(a), len(a) :]


def test_ncc_topk_equals_brute_force_with_tiny_chunks():
    rng = np.random.default_rng(0)
    queries, refs = rng.normal(size=(37, 64)), rng.normal(size=(53, 64))
    # 0.002 MB -> 9 x 19 blocks: many query and reference chunks, merged across blocks.
    assert chunk_sizes(37, 53, 0.002)[0] < 37 and chunk_sizes(37, 53, 0.002)[1] < 53
    scores, indices = ncc_topk(standardize(queries), standardize(refs), 5, memory_budget_mb=0.002)
    reference = pearson_matrix(queries, refs)
    expected_indices = np.argsort(-reference, axis=1)[:, :5]
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(reference, expected_indices, 1), atol=1e-5)


def test_standardize_in_place_equals_standardize():
    thumbs = torch.rand(10, 8, 8)
    expected = standardize(thumbs)
    torch.testing.assert_close(standardize_in_place(thumbs.clone(), rows=3), expected)


def test_ncc_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = standardize(rng.normal(size=(20, 100))), standardize(rng.normal(size=(30, 100)))
    ab_scores, ab_indices = ncc_topk(a, b, 30, memory_budget_mb=0.001)
    ba_scores, ba_indices = ncc_topk(b, a, 20, memory_budget_mb=0.001)
    ab = torch.empty(20, 30).scatter_(1, ab_indices, ab_scores)
    ba = torch.empty(30, 20).scatter_(1, ba_indices, ba_scores)
    torch.testing.assert_close(ab, ba.T, atol=1e-6, rtol=0)


def test_standardize_is_invariant_to_brightness_and_contrast():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(3, 16, 16))
    torch.testing.assert_close(standardize(x), standardize(0.5 * x + 0.2), atol=1e-6, rtol=0)
    assert torch.all(standardize(np.ones((1, 8, 8))) == 0)  # a constant image correlates with nothing


def test_chunk_sizes_respect_the_budget():
    for budget in (1, 16, 512):
        query_chunk, ref_chunk = chunk_sizes(20_000, 20_000, budget)
        assert 2 * 4 * query_chunk * ref_chunk <= budget * 2**20


def test_shift_images_integer_shift_moves_pixels():
    x = torch.arange(2 * 6 * 7, dtype=torch.float32).reshape(2, 6, 7)
    moved = shift_images(x, 1.0, -2.0)  # down 1, left 2
    torch.testing.assert_close(moved[:, 1:, :-2], x[:, :-1, 2:])
    half = shift_images(x, 0.0, 0.5)  # half a pixel right: mean of the two neighbours
    torch.testing.assert_close(half[:, :, 1:], (x[:, :, 1:] + x[:, :, :-1]) / 2)
    assert shift_offsets(0.5, 0.5)[0] == (0.0, 0.0) and len(shift_offsets(0.5, 0.5)) == 9
    assert shift_offsets(0, 0.5) == [(0.0, 0.0)]


def test_merge_topk_keeps_each_reference_once_with_its_best_score():
    scores = torch.tensor([[0.9, 0.5, 0.95, 0.4]])
    indices = torch.tensor([[3, 1, 3, 7]])
    best_scores, best_indices = merge_topk(scores, indices, 3)
    assert best_indices.tolist() == [[3, 1, 7]]
    torch.testing.assert_close(best_scores, torch.tensor([[0.95, 0.5, 0.4]]))


def test_best_matches_without_shift_equals_plain_ncc_and_shift_recovers_a_moved_copy():
    refs = torch.from_numpy(np.stack([make_phantom(np.random.default_rng([0, i]), 64, 64) for i in range(6)]))
    queries = refs[:2].clone()
    queries[1] = shift_images(refs[1:2], 0.5, -0.5)[0]
    plain, plain_indices, _ = best_matches(queries, standardize(refs), k=3, max_shift=0)
    direct, direct_indices = ncc_topk(standardize(queries), standardize(refs), 3)
    torch.testing.assert_close(plain, direct)
    scores, indices, shifts = best_matches(queries, standardize(refs), k=3, max_shift=0.5, shift_step=0.5)
    assert indices[:, 0].tolist() == [0, 1]
    assert scores[1, 0] > plain[1, 0] + 0.01  # (two half-pixel moves blur, so not exactly 1)
    assert shifts[1, 0].tolist() == [-0.5, 0.5]  # moving the query back aligns it
    queries[1] = shift_images(refs[1:2], 1.0, 0.0)[0]
    scores, indices, shifts = best_matches(queries, standardize(refs), k=3, max_shift=1, shift_step=1)
    assert indices[1, 0] == 1 and scores[1, 0] > 0.995 and shifts[1, 0].tolist() == [-1.0, 0.0]


def ssim_reference(x, y, data_range=1.0):
    """Wang et al. 2004 SSIM with SciPy: 11x11 gaussian (sigma 1.5) 'valid' filtering, K1=0.01, K2=0.03."""
    from scipy.signal import convolve2d

    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    blur = lambda image: convolve2d(image, window, mode="valid")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))))


def test_ssim_matches_scipy_reference():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(4)
    x = make_phantom(np.random.default_rng([0, 0]), 64, 64).astype(np.float64)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    z = make_phantom(np.random.default_rng([0, 1]), 64, 64).astype(np.float64)
    expected = [ssim_reference(x, x), ssim_reference(x, y), ssim_reference(x, z)]
    ours = ssim(np.stack([x, x, x]), np.stack([x, y, z]), dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ssim(np.stack([x, x, x]), np.stack([x, y, z])).numpy(), expected, atol=1e-4)
    assert ours[0] == pytest.approx(1.0) and ours[2] < ours[1] < 1.0


# ---------------------------------------------------------------------------------------------- end to end


def save_png(image, path):
    from PIL import Image

    Image.fromarray(to_uint(image, 8), mode="L").save(path)


def copies_of(image, rng):
    """The four near-copies the audit must catch: exact, gaussian noise, a 2-px shift, 5% brighter."""
    shifted = np.pad(image, 2, mode="edge")[:-4, :-4]  # content moved 2 px down and 2 px right
    return {
        "exact": image,
        "noise": np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1),
        "shift": shifted,
        "bright": np.clip(image * 1.05, 0, 1),
    }


@pytest.fixture(scope="module")
def audit_data(tmp_path_factory):
    """48 training phantoms, 48 held-out phantoms, and samples: 24 fresh phantoms + 4 copies of 8 training images."""
    from cxr.data.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("audit")
    train = write_phantoms(root / "train", 48, seed=0)
    write_phantoms(root / "holdout", 48, seed=1)
    write_phantoms(root / "samples" / "fresh", 24, seed=2)
    (root / "samples" / "copies").mkdir()
    rng = np.random.default_rng(7)
    sources = {}
    for source in train[:8]:
        image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(source), dtype=np.float32) / 255
        for kind, copy in copies_of(image, rng).items():
            path = root / "samples" / "copies" / f"{kind}_{source.stem}.png"
            save_png(copy, path)
            sources[path.name] = source.name
    save_png(np.zeros((64, 64)), root / "samples" / "contact_sheet.png")  # sample.py's sheet: excluded
    return root, sources


def read_scores(report_dir):
    import csv

    with open(report_dir / "scores.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_audit_flags_copies_and_not_fresh_phantoms(audit_data, capsys):
    root, sources = audit_data
    out = root / "report"
    argv = [
        "--train_dir",
        str(root / "train"),
        "--samples_dir",
        str(root / "samples"),
        "--holdout_dir",
        str(root / "holdout"),
        "--out",
        str(out),
        "--num_workers",
        "0",
        "--ssim",
        "--ssim_resolution",
        "64",
        "--fail_above",
        "0.7",
        "--min_holdout_images",
        "48",
    ]
    assert main(argv) == 0  # 32 copies of 56 samples (+ at most ~1% false flags) = 57% < 70%
    assert "flagged 3" in capsys.readouterr().out
    rows = read_scores(out)
    assert len(rows) == 24 + 32  # the contact sheet is not audited
    copies = [r for r in rows if "copies" in r["sample"]]
    fresh = [r for r in rows if "fresh" in r["sample"]]
    assert all(r["flagged"] == "True" for r in copies), [
        (r["sample"], r["ncc"]) for r in copies if r["flagged"] != "True"
    ]
    assert all(sources[r["sample"].split("/")[-1]] == r["best_match"].split("/")[-1] for r in copies)
    report = json.loads((out / "report.json").read_text())
    assert report["threshold"]["calibrated"] and report["counts"] == {
        "train": 48,
        "samples": 56,
        "holdout": 48,
        "holdout_training_copies": 0,
    }
    # The 0.99 quantile lets ~1% of novel images through by design: at most 1 of 24 fresh phantoms.
    assert sum(r["flagged"] == "True" for r in fresh) <= 1
    # With the held-out max as threshold, the sets separate completely: copies above, fresh below.
    holdout_max = report["holdout"]["summary"]["max"]
    assert min(float(r["ncc"]) for r in copies) > holdout_max > max(float(r["ncc"]) for r in fresh)
    assert report["flagged"]["count"] == sum(r["flagged"] == "True" for r in rows) and report["exit_code"] == 0
    assert sum(report["samples"]["histogram"]["counts"]) + report["samples"]["histogram"]["below"] == 56
    clean_copies_ssim = [float(r["ssim"]) for r in copies if "exact" in r["sample"] or "bright" in r["sample"]]
    assert min(clean_copies_ssim) > 0.95 > max(float(r["ssim"]) for r in fresh)
    from PIL import Image

    assert Image.open(out / "gallery.png").size == (2 * (2 * 192 + 18) + 6, 8 * (192 + 36) + 6)


@pytest.mark.slow
def test_fresh_phantoms_need_calibration(audit_data):
    """Phantoms resemble each other (NCC ~0.98), so the uncalibrated 0.95 fallback flags fresh ones:
    the held-out baseline is what makes the audit work, and the fallback warns about it."""
    root, _ = audit_data
    config = AuditConfig(
        train_dir=root / "train",
        samples_dir=root / "samples" / "fresh",
        out=root / "uncalibrated",
        num_workers=0,
        gallery_pairs=0,
    )
    with pytest.warns(UserWarning, match="uncalibrated"):
        report = audit(config)
    assert report["threshold"] == {
        "value": 0.95,
        "rule": "uncalibrated --default_threshold (no held-out images)",
        "calibrated": False,
    }
    assert report["flagged"]["rate"] == 1.0


def test_manifest_splits_are_train_and_baseline(tmp_path):
    from cxr.data.dataset import scan_dataset, split_holdout, write_manifest
    from cxr.data.phantoms import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data / "a", 6, seed=0)
    train, val = split_holdout(scan_dataset(data), val_fraction=0.0, val_count=2, seed=0)
    manifest = tmp_path / "run" / "manifest.json"
    write_manifest(manifest, train, val)
    samples = tmp_path / "samples"
    samples.mkdir()
    for record in train[:2]:
        (samples / f"copy_{record.path.name}").write_bytes(record.path.read_bytes())
    argv = [
        "--train_manifest",
        str(manifest),
        "--samples_dir",
        str(tmp_path / "samples"),
        "--out",
        str(tmp_path / "out"),
        "--num_workers",
        "0",
        "--max_shift",
        "0",
        "--fail_above",
        "0.5",
        "--min_holdout_images",
        "2",
    ]
    assert main(argv) == 1  # both samples copy training images: 100% > 50%
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"] == {"train": 4, "samples": 2, "holdout": 2, "holdout_training_copies": 0}
    assert report["threshold"]["calibrated"] and report["exit_code"] == 1
    flagged = {Path(r["sample"]).name[len("copy_") :] for r in read_scores(tmp_path / "out") if r["flagged"] == "True"}
    assert flagged == {record.path.name for record in train[:2]}


def test_bad_flags_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_dir", str(tmp_path), "--samples_dir", str(tmp_path), "--fail_above", "2"])
    assert exit_info.value.code == 2 and "--fail_above" in capsys.readouterr().err
    assert main(["--train_dir", str(tmp_path / "missing"), "--samples_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, time, torch
    import cxr.privacy.ncc
    from cxr.privacy.ncc import best_matches, ncc_topk
    num_queries, num_refs, side = (int(a) for a in sys.argv[1:4])
    budget, max_shift = float(sys.argv[4]), float(sys.argv[5])
    if sys.argv[6:] == ["no_trim"]:
        cxr.privacy.ncc._return_free_memory_to_os = lambda: None
    torch.manual_seed(0)
    queries, refs = torch.empty(num_queries, side, side), torch.empty(num_refs, side * side)
    for features in (queries, refs):  # filled in place: no temporaries that would raise the peak
        for start in range(0, len(features), 500):
            features[start:start + 500].normal_()
    refs /= refs.norm(dim=1, keepdim=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.time()
    if max_shift == 0:
        ncc_topk(queries.reshape(num_queries, -1), refs, 5, memory_budget_mb=budget)
    else:
        best_matches(queries, refs, k=5, max_shift=max_shift, memory_budget_mb=budget)
    seconds = time.time() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024, before / 1024, seconds)
""")


def peak_rss_growth(*args):
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, *map(str, args)], capture_output=True, text=True, check=True
    )
    return tuple(map(float, result.stdout.split()))


@pytest.mark.slow
def test_memory_is_bounded_on_5000_by_5000():
    """Peak RSS growth of the search stays near the budget, far below the 100 MB a 5000 x 5000 matrix needs."""
    growth_mb, baseline_mb, seconds = peak_rss_growth(5000, 5000, 64, 32, 0)
    print(f"5000 x 5000 x 4096, budget 32 MB: peak RSS +{growth_mb:.1f} MB over {baseline_mb:.0f} MB, {seconds:.1f} s")
    assert growth_mb < 64, growth_mb


@pytest.mark.slow
def test_memory_is_bounded_with_shifts():
    """The shift-tolerant search stays near its budget too (all 9 shifted copies of the queries at once
    would take 88 MB, the score matrix 14 MB)."""
    growth_mb, baseline_mb, seconds = peak_rss_growth(600, 1500, 64, 16, 0.5)
    print(
        f"600 x 1500 x 4096, 9 shifts, budget 16 MB: peak RSS +{growth_mb:.1f} MB over {baseline_mb:.0f} MB, "
        f"{seconds:.1f} s"
    )
    assert growth_mb < 40, growth_mb


def _reencoded(source: Path, target: Path) -> Path:
    """The same pixels as `source` in a file with other bytes (another PNG compression level)."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(source).save(target, compress_level=1)
    assert target.read_bytes() != source.read_bytes()
    return target


def _overlap_config(tmp_path, holdout, **flags):
    return AuditConfig(
        train_dir=tmp_path / "train",
        holdout_dir=holdout,
        samples_dir=tmp_path / "samples",
        out=tmp_path / "out",
        num_workers=0,
        max_shift=0,
        gallery_pairs=0,
        **flags,
    )


def test_holdout_overlapping_training_set_warns(tmp_path):
    from cxr.data.phantoms import write_phantoms

    train = write_phantoms(tmp_path / "train", 4, seed=0)
    write_phantoms(tmp_path / "samples", 2, seed=1)
    holdout = write_phantoms(tmp_path / "holdout", 6, seed=2)[:2]
    holdout += [_reencoded(path, tmp_path / "holdout" / f"again_{path.name}") for path in train[:2]]
    config = _overlap_config(tmp_path, tmp_path / "holdout", threshold_quantile=0.5)
    with pytest.warns(UserWarning, match="2 held-out images have a near-identical training image"):
        audit(config)


def test_holdout_dir_equal_to_the_training_set_is_refused(tmp_path, capsys):
    """Byte copies of every training image as the held-out set: the threshold would be 1 and flag nothing."""
    from cxr.data.phantoms import write_phantoms

    train = write_phantoms(tmp_path / "train", 4, seed=0)
    (tmp_path / "samples").mkdir()
    for path in train:
        (tmp_path / "samples" / f"copy_{path.name}").write_bytes(path.read_bytes())
    argv = ["--train_dir", str(tmp_path / "train"), "--holdout_dir", str(tmp_path / "train")]
    argv += ["--samples_dir", str(tmp_path / "samples"), "--out", str(tmp_path / "out"), "--num_workers", "0"]
    argv += ["--fail_above", "0.01", "--min_holdout_images", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--holdout_dir" in err and "all 4 held-out images are byte-identical copies of training images" in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_byte_copies_of_training_images_are_dropped_from_the_holdout_with_a_count(tmp_path):
    from cxr.data.phantoms import write_phantoms

    train = write_phantoms(tmp_path / "train", 4, seed=0)
    write_phantoms(tmp_path / "samples", 2, seed=1)
    write_phantoms(tmp_path / "holdout", 3, seed=2)
    for path in train[:2]:
        (tmp_path / "holdout" / f"copy_{path.name}").write_bytes(path.read_bytes())
    with pytest.warns(UserWarning, match="2 of the 5 held-out images are byte-identical copies of training images"):
        report = audit(_overlap_config(tmp_path, tmp_path / "holdout"))
    assert report["counts"]["holdout"] == 3 and report["counts"]["holdout_training_copies"] == 2
    assert report["holdout"]["summary"]["max"] < 0.999


def test_a_calibrated_threshold_at_1_is_refused(tmp_path, capsys):
    """Re-encoded copies (same pixels, other bytes) pass the hash check but score NCC 1: no sample could ever
    be above that threshold, so it is refused instead of passing every copy."""
    from cxr.data.phantoms import write_phantoms

    train = write_phantoms(tmp_path / "train", 4, seed=0)
    write_phantoms(tmp_path / "samples", 2, seed=1)
    for path in train:
        _reencoded(path, tmp_path / "holdout" / path.name)
    with pytest.raises(ValueError, match=r"calibrated threshold is 1\.0000"):
        audit(_overlap_config(tmp_path, tmp_path / "holdout"))
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("flag", ["threshold", "default_threshold", "features_threshold"])
def test_a_threshold_of_1_is_a_flag_error(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_dir", str(tmp_path), "--samples_dir", str(tmp_path), f"--{flag}", "1"])
    assert exit_info.value.code == 2 and f"--{flag}: must be below 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """A training run on 12-bit X-rays in 16-bit PNGs, each with a burned-in label (240 px = 0.37%) at 65535,
    trained with --intensity_clip_percent 0.5 (its manifest says so), and 8-bit samples that copy the anatomy
    of 2 of them (no label)."""
    from PIL import Image

    from cxr.data.dataset import scan_dataset, write_manifest

    root = tmp_path_factory.mktemp("labelled")
    (root / "train").mkdir()
    (root / "samples").mkdir()
    for index in range(6):
        anatomy = make_phantom(np.random.default_rng([5, index]), 256, 256)
        stored = np.round(anatomy * 4095).astype(np.uint16)
        stored[8:16, 200:230] = 65535
        Image.fromarray(stored).save(root / "train" / f"xray_{index}.png")
        if index < 2:
            save_png(anatomy, root / "samples" / f"copy_{index}.png")
    write_manifest(root / "run" / "manifest.json", scan_dataset(root / "train"), [], {"intensity_clip_percent": 0.5})
    return root


def _best_ncc(report_dir) -> list[float]:
    return [float(row["ncc"]) for row in read_scores(report_dir)]


def test_audit_reads_training_images_with_the_manifests_intensity_window(labelled_run):
    root = labelled_run
    common = {
        "samples_dir": root / "samples",
        "num_workers": 0,
        "max_shift": 0,
        "threshold": 0.9,
        "gallery_pairs": 2,
        "ssim": True,
        "ssim_resolution": 64,
    }
    report = audit(AuditConfig(train_manifest=root / "run" / "manifest.json", out=root / "manifest", **common))
    assert report["intensity_clip_percent"] == 0.5
    rows = read_scores(root / "manifest")
    assert report["flagged"]["count"] == 2 and min(_best_ncc(root / "manifest")) > 0.95
    assert all(Path(r["best_match"]).stem == Path(r["sample"]).stem.replace("copy", "xray") for r in rows)
    assert min(float(r["ssim"]) for r in rows) > 0.95  # SSIM reads the training images with the window too

    # Read min-max instead, the label squeezes the anatomy and dominates the thumbnails: the copies are missed.
    report = audit(
        AuditConfig(
            train_manifest=root / "run" / "manifest.json", intensity_clip_percent=0.0, out=root / "min_max", **common
        )
    )
    assert report["intensity_clip_percent"] == 0.0
    assert report["flagged"]["count"] == 0 and max(_best_ncc(root / "min_max")) < 0.6
    assert max(float(r["ssim"]) for r in read_scores(root / "min_max")) < 0.3

    # A folder of training images takes the window from the flag, and gives the manifest run's scores.
    audit(AuditConfig(train_dir=root / "train", intensity_clip_percent=0.5, out=root / "folder", **common))
    assert read_scores(root / "folder") == read_scores(root / "manifest")


def test_manifest_from_before_the_window_reads_min_max(labelled_run, tmp_path):
    from cxr.data.dataset import scan_dataset, write_manifest

    write_manifest(tmp_path / "old_run" / "manifest.json", scan_dataset(labelled_run / "train"), [], {"seed": 0})
    report = audit(
        AuditConfig(
            train_manifest=tmp_path / "old_run" / "manifest.json",
            samples_dir=labelled_run / "samples",
            out=tmp_path / "out",
            num_workers=0,
            max_shift=0,
            threshold=0.9,
            gallery_pairs=0,
        )
    )
    assert report["intensity_clip_percent"] == 0.0 and report["flagged"]["count"] == 0


@pytest.mark.parametrize("value", ["-1", "50"])
def test_bad_intensity_clip_percent_exits_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_dir", str(tmp_path), "--samples_dir", str(tmp_path), "--intensity_clip_percent", value])
    assert exit_info.value.code == 2 and "--intensity_clip_percent: must be in [0, 50)" in capsys.readouterr().err


def test_audit_warns_when_its_crop_differs_from_the_training_runs(labelled_run, tmp_path):
    import warnings as warnings_module

    from cxr.data.dataset import scan_dataset, write_manifest

    manifest = tmp_path / "padded_run" / "manifest.json"
    write_manifest(manifest, scan_dataset(labelled_run / "train"), [], {"pad_to_square": True})
    common = dict(
        train_manifest=manifest,
        samples_dir=labelled_run / "samples",
        num_workers=0,
        max_shift=0,
        threshold=0.9,
        gallery_pairs=0,
    )
    with pytest.warns(UserWarning, match=r"--pad_to_square: the training run padded its images"):
        audit(AuditConfig(out=tmp_path / "cropped", **common))
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        audit(AuditConfig(out=tmp_path / "padded", pad_to_square=True, **common))
    assert not [w for w in caught if "--pad_to_square" in str(w.message)]


def _full_disk_audit(tmp_path, monkeypatch, failing):
    """The audit of 2 samples against 4 training images with writes of `failing` files failing for lack of space."""
    import errno

    from PIL import Image as PILImage

    from cxr.data.phantoms import write_phantoms

    write_phantoms(tmp_path / "train", 4, seed=0)
    write_phantoms(tmp_path / "samples", 2, seed=1)
    original_open, original_save, original_write = open, PILImage.Image.save, Path.write_bytes

    def full(name):
        return OSError(errno.ENOSPC, "No space left on device", str(name))

    def guarded_open(file, mode="r", *args, **kwargs):
        if "w" in mode and failing in str(file):
            raise full(file)
        return original_open(file, mode, *args, **kwargs)

    def save(self, fp, *args, **kwargs):
        if failing in str(fp):
            raise full(fp)
        return original_save(self, fp, *args, **kwargs)

    def write_bytes(self, data):
        if failing in str(self):
            original_write(self, data[:1])
            raise full(self)
        return original_write(self, data)

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(PILImage.Image, "save", save)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    argv = ["--train_dir", str(tmp_path / "train"), "--samples_dir", str(tmp_path / "samples")]
    return argv + ["--out", str(tmp_path / "out"), "--num_workers", "0", "--threshold", "0.9", "--gallery_pairs", "2"]


@pytest.mark.parametrize("failing", ["scores.csv", "gallery", "report.json", "cxr-write-probe"])
def test_a_full_disk_is_one_line_and_leaves_no_half_report(tmp_path, monkeypatch, capsys, failing):
    argv = _full_disk_audit(tmp_path, monkeypatch, failing)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--out: cannot write" in err and "Traceback" not in err
    if failing != "cxr-write-probe":
        assert failing in err.split("(No space")[0]  # the file is named
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []

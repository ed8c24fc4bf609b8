"""Evaluation metrics against references: FID vs scipy.linalg.sqrtm and the Gaussian closed form, KID vs a
loop implementation, MS-SSIM vs a SciPy implementation, intensity statistics vs NumPy/SciPy, and the
command end to end with a TorchScript extractor saved in the test."""

import json

import numpy as np
import pytest
import torch

from cxr.data.phantoms import make_phantom
from cxr.privacy.evaluate import (
    MISSING_FEATURES_MESSAGE,
    EvaluateConfig,
    FeatureExtractorError,
    evaluate,
    load_feature_extractor,
    main,
    random_pairs,
)
from cxr.privacy.imagemetrics import (
    feature_statistics,
    frechet_distance,
    histogram_intersection,
    histogram_statistics,
    histogram_wasserstein1,
    kid,
    kid_subset_indices,
    mmd2_unbiased,
    ms_ssim,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


def correlated_features(rng, n, dim, shift=0.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def test_frechet_distance_equals_scipy_sqrtm():
    rng = np.random.default_rng(0)
    real, fake = correlated_features(rng, 400, 32), correlated_features(rng, 300, 32, shift=0.3)
    mu1, s1 = feature_statistics(real)
    mu2, s2 = feature_statistics(fake)
    np.testing.assert_allclose(s1, np.cov(real.T))
    covmean = scipy_linalg.sqrtm(s1 @ s2).real  # the pytorch-fid / TTUR computation
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    rotated = frechet_distance(
        rotation @ mu1, rotation @ np.diag(var1) @ rotation.T, rotation @ mu2, rotation @ np.diag(var2) @ rotation.T
    )
    assert rotated == pytest.approx(expected, rel=1e-9)


def mmd2_loop_reference(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 written as explicit sums over pairs."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_loop_reference():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(30, 6)), rng.normal(0.5, 1.0, size=(25, 6))
    assert mmd2_unbiased(real[:20], fake[:20]) == pytest.approx(mmd2_loop_reference(real[:20], fake[:20]), rel=1e-10)
    mean, std = kid(real, fake, num_subsets=4, subset_size=10, seed=3)
    expected = [mmd2_loop_reference(real[i], fake[j]) for i, j in kid_subset_indices(30, 25, 4, 10, seed=3)]
    assert mean == pytest.approx(np.mean(expected), rel=1e-10) and std == pytest.approx(np.std(expected), rel=1e-10)
    assert all(len(set(i)) == 10 and len(set(j)) == 10 for i, j in kid_subset_indices(30, 25, 4, 10, seed=3))
    # Same distribution: KID near 0 (unbiased: can be slightly negative); shifted: clearly positive.
    same = kid(rng.normal(size=(200, 6)), rng.normal(size=(200, 6)), num_subsets=10, subset_size=100)[0]
    assert abs(same) < 0.05 < kid(real, fake + 1.0, num_subsets=10, subset_size=20)[0]


def ms_ssim_reference(x, y):
    """MS-SSIM with SciPy: Wang 2003 weights, 'valid' gaussian SSIM per scale, 2x2 mean pooling (even sizes)."""
    from scipy.signal import convolve2d

    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum())[None]  # the 11x11 window is the outer product g^T g: filter rows, then columns
    blur = lambda image: convolve2d(convolve2d(image, g, mode="valid"), g.T, mode="valid")  # noqa: E731
    c1, c2 = 0.01**2, 0.03**2
    value = 1.0
    for scale, weight in enumerate((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        term = np.mean((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs) if scale == 4 else np.mean(cs)
        value *= max(term, 0.0) ** weight
        x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
        y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
    return value


@pytest.mark.slow
def test_ms_ssim_matches_scipy_reference_and_is_one_for_identical_images():
    rng = np.random.default_rng(4)
    x = make_phantom(np.random.default_rng([0, 0]), 192, 192).astype(np.float64)
    noisy = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    other = make_phantom(np.random.default_rng([0, 1]), 192, 192).astype(np.float64)
    ours = ms_ssim(np.stack([x, x, x]), np.stack([x, noisy, other]), dtype=torch.float64).numpy()
    expected = [ms_ssim_reference(x, x), ms_ssim_reference(x, noisy), ms_ssim_reference(x, other)]
    np.testing.assert_allclose(ours, expected, rtol=1e-9)
    assert ours[0] == pytest.approx(1.0, abs=1e-12) and ours[1] < 1.0
    np.testing.assert_allclose(ms_ssim(np.stack([x, x]), np.stack([noisy, other])).numpy(), expected[1:], atol=1e-4)
    with pytest.raises(ValueError, match="at least 161"):
        ms_ssim(np.zeros((1, 128, 128)), np.zeros((1, 128, 128)))


def test_random_pairs_are_distinct():
    pairs = random_pairs(5, 500, seed=0)
    assert pairs.shape == (500, 2) and np.all(pairs[:, 0] != pairs[:, 1]) and set(pairs.ravel()) == set(range(5))


def test_intensity_statistics_match_numpy_and_scipy():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(5)
    a, b = rng.beta(2, 5, 50_000), rng.beta(3, 3, 40_000)
    bins = 1024
    counts_a, counts_b = np.histogram(a, bins, (0, 1))[0], np.histogram(b, bins, (0, 1))[0]
    stats = histogram_statistics(counts_a, a.sum(), (a**2).sum())
    assert stats["mean"] == pytest.approx(a.mean(), rel=1e-12) and stats["std"] == pytest.approx(a.std(), rel=1e-9)
    for p in (1, 50, 99):
        assert stats[f"p{p}"] == pytest.approx(np.percentile(a, p), abs=1.0 / bins)
    assert histogram_wasserstein1(counts_a, counts_b) == pytest.approx(wasserstein_distance(a, b), abs=1.0 / bins)
    assert histogram_intersection(counts_a, counts_a) == pytest.approx(1.0)
    assert histogram_intersection([1, 0], [0, 1]) == 0.0 and histogram_wasserstein1([1, 0], [0, 1]) == pytest.approx(
        0.5
    )


# ---------------------------------------------------------------------------------------------- command


class MeanPoolFeatures(torch.nn.Module):
    """A tiny feature extractor: 4x4 average-pooled channels -> (N, 48)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)


class Uint8Detector(torch.nn.Module):
    """Mimics the calling convention of StyleGAN2-ADA's inception-2015-12-05.pt: uint8 in, features on request."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.dtype == torch.uint8
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return pooled if return_features else pooled[:, :3]


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    from cxr.data.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("evaluate")
    write_phantoms(root / "real", 12, seed=0)
    write_phantoms(root / "fake", 10, seed=1)
    return root


def test_evaluate_end_to_end_with_a_torchscript_extractor(image_sets, tmp_path, capsys):
    extractor = tmp_path / "extractor.pt"
    torch.jit.script(MeanPoolFeatures()).save(str(extractor))
    out = tmp_path / "results.json"
    argv = [
        "--real",
        str(image_sets / "real"),
        "--fake",
        str(image_sets / "fake"),
        "--features",
        str(extractor),
        "--out",
        str(out),
        "--image_size",
        "64",
        "--num_workers",
        "0",
        "--diversity_pairs",
        "6",
        "--msssim_resolution",
        "161",
        "--kid_subsets",
        "5",
        "--kid_subset_size",
        "8",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "KID" in printed and "MS-SSIM fake pairs" in printed
    results = json.loads(out.read_text())
    assert results["counts"] == {"real": 12, "fake": 10} and results["features"]["dim"] == 48
    # The FID equals the formula on features computed here independently of the command.
    from cxr.data.imageio import read_grayscale
    from cxr.data.preprocess import Preprocess, thumbnail
    from cxr.privacy.imagesets import list_images

    def direct_features(folder):
        images = torch.stack([thumbnail(read_grayscale(p), Preprocess(64)) for p in list_images(folder)])
        return MeanPoolFeatures()(images[:, None].expand(-1, 3, -1, -1)).double().numpy()

    real, fake = direct_features(image_sets / "real"), direct_features(image_sets / "fake")
    assert results["fid"] == pytest.approx(
        frechet_distance(*feature_statistics(real), *feature_statistics(fake)), rel=1e-6
    )
    assert results["kid"]["mean"] == pytest.approx(kid(real, fake, 5, 8, seed=0)[0], rel=1e-6, abs=1e-9)
    assert 0 < results["diversity_ms_ssim"]["fake"]["mean"] < 1 and results["diversity_ms_ssim"]["fake"]["pairs"] == 6
    assert 0 < results["intensity"]["histogram_intersection"] <= 1


def test_uint8_torchscript_convention(image_sets, tmp_path):
    extractor = tmp_path / "detector.pt"
    torch.jit.script(Uint8Detector()).save(str(extractor))
    features, kind = load_feature_extractor(extractor)
    assert "uint8" in kind and features(torch.rand(2, 3, 32, 32)).shape == (2, 48)


def test_missing_features_gives_the_documented_message(image_sets, capsys):
    assert main(["--real", str(image_sets / "real"), "--fake", str(image_sets / "fake")]) == 2
    error = capsys.readouterr().err
    assert (
        MISSING_FEATURES_MESSAGE in error and "inception_v3_google-0cc3c7bd.pth" in error and "--skip_features" in error
    )
    assert main(["--real", str(image_sets / "real"), "--fake", str(image_sets / "fake"), "--features", "nope.pt"]) == 2
    assert "nope.pt: file does not exist" in capsys.readouterr().err


def test_state_dict_without_torchvision_says_what_to_do(tmp_path, monkeypatch):
    import sys

    weights = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if torchvision were not installed
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(FeatureExtractorError, match="needs torchvision.*pip install torchvision.*TorchScript"):
        load_feature_extractor(weights)


def test_pickled_module_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(MeanPoolFeatures(), path)  # a whole pickled module: loading it would need weights_only=False
    with pytest.raises(FeatureExtractorError, match="torch.jit.trace"):
        load_feature_extractor(path)


def test_skip_features_needs_no_extractor(image_sets):
    results = evaluate(
        EvaluateConfig(
            real=image_sets / "real", fake=image_sets / "fake", skip_features=True, num_workers=0, diversity_pairs=0
        )
    )
    assert "fid" not in results and results["intensity"]["real"]["pixels"] == 12 * 256 * 256


def test_intensity_clip_percent_reads_the_real_images_like_training(image_sets, tmp_path):
    """12-bit data in 16-bit PNGs with a burned-in label at 65535: with the training run's window the real
    set's statistics are those of the percentile-windowed pixels; the generated set is read as written."""
    from PIL import Image

    from cxr.data.imageio import read_grayscale

    rng = np.random.default_rng(3)
    real = tmp_path / "real16"
    real.mkdir()
    for i in range(3):
        pixels = rng.integers(100, 4000, size=(64, 64)).astype(np.uint16)
        pixels[:3, :3] = 65535  # 9 of 4096 pixels: inside the 1% tail
        Image.fromarray(pixels).save(real / f"{i}.png")
    common = dict(real=real, fake=image_sets / "fake", skip_features=True, num_workers=0, diversity_pairs=0)
    plain = evaluate(EvaluateConfig(**common))["intensity"]
    windowed = evaluate(EvaluateConfig(**common, intensity_clip_percent=1.0))["intensity"]
    reference = np.concatenate([read_grayscale(path, 1.0).ravel() for path in sorted(real.glob("*.png"))])
    assert windowed["real"]["mean"] == pytest.approx(reference.mean(), rel=1e-6)
    assert windowed["real"]["mean"] > 0.45 and plain["real"]["mean"] < 0.07  # min-max squeezes the anatomy
    assert windowed["fake"] == plain["fake"]


@pytest.mark.parametrize("value", ["-1", "50", "nan"])
def test_intensity_clip_percent_out_of_range_names_the_flag(value, capsys):
    from cxr.privacy.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--real", "a", "--fake", "b", "--skip_features", "--intensity_clip_percent", value])
    assert exit_info.value.code == 2 and "--intensity_clip_percent" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["cxr.privacy.evaluate", "cxr.privacy.audit"])
def test_help_says_plainly_that_a_torchscript_feature_model_runs_code(module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = " ".join(capsys.readouterr().out.split()).lower()
    assert "loading a torchscript file runs code from it: only load feature models you trust" in text
    assert ".safetensors" in text  # the route that runs no code


def test_the_pickle_refusal_does_not_call_torchscript_safe(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(MeanPoolFeatures(), path)
    with pytest.raises(FeatureExtractorError) as info:
        load_feature_extractor(path)
    message = str(info.value)
    assert "TorchScript also runs code" in message and ".safetensors" in message

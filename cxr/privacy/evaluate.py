"""Quality of generated X-rays against real ones: FID, KID, MS-SSIM diversity, intensity statistics.

    python -m cxr.evaluate --real data/val --fake samples --features inception_v3_google-0cc3c7bd.pth \
        --out eval.json
    python -m cxr.evaluate --real data/val --fake samples --skip_features     # no extractor needed

* Frechet distance (FID) and KID are computed on features of a feature extractor that you provide as a
  LOCAL file; nothing is ever downloaded. Accepted: a TorchScript module mapping (N, 3, H, W) float images
  in [0, 1] to (N, D) features; the StyleGAN2-ADA / clean-fid TorchScript `inception-2015-12-05.pt`
  (recognised by its `return_features` argument; it gets uint8 images, as in its own code); or a
  torchvision Inception-v3 state dict (.pth / .safetensors, needs torchvision), whose 2048-d pool3
  output is used. Grayscale images are repeated to 3 channels and resized to `--image_size`.
  Trust: loading a TorchScript file runs code from it (any file but .safetensors is tried as TorchScript first),
  so only load feature models you trust; Inception-v3 weights as .safetensors load without running any code.
* KID: polynomial kernel k(x, y) = (x.y / D + 1)^3, unbiased MMD^2 averaged over random subsets
  (Binkowski et al. 2018; the torch-fidelity / clean-fid defaults: 100 subsets of 1000).
* Diversity: mean MS-SSIM (Wang et al. 2003, 5 scales) over random pairs of generated images; lower
  means more diverse. The same number for random pairs of real images is the reference.
* Intensity statistics: pixel-intensity histograms per set, their mean / std / percentiles, histogram
  intersection (1 = identical) and the Wasserstein-1 distance between the two distributions.

Exit codes: 0 done; 2 bad flags, unreadable images, or a missing/invalid feature extractor.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxr.config import TRAIN_SEED_MAX
from cxr.data.preprocess import Preprocess, thumbnail
from cxr.fileio import atomic_write_bytes, check_writable_file
from cxr.flags import check_choices, flag, parse_config, require, to_dict
from cxr.model.loading import pick_device
from cxr.privacy.imagemetrics import (
    feature_statistics,
    frechet_distance,
    histogram_intersection,
    histogram_statistics,
    histogram_wasserstein1,
    kid,
    ms_ssim,
)
from cxr.privacy.imagesets import list_images

EXIT_OK, EXIT_USAGE = 0, 2
TORCHVISION_INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
NVIDIA_INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
MISSING_FEATURES_MESSAGE = f"""\
--features is required for FID and KID: pass a feature extractor as a LOCAL file (nothing is downloaded):
  * the FID Inception used by StyleGAN2-ADA and clean-fid (TorchScript), inception-2015-12-05.pt:
      {NVIDIA_INCEPTION_URL}
  * or torchvision's Inception-v3 weights, inception_v3_google-0cc3c7bd.pth (needs `pip install torchvision`):
      {TORCHVISION_INCEPTION_URL}
  * or any TorchScript module (torch.jit.save) mapping (N, 3, H, W) float images in [0, 1] to (N, D) features.
Download the file on a machine with internet, copy it here and pass --features PATH.
Or pass --skip_features to compute only the MS-SSIM diversity and the intensity statistics."""


# Said in --help (here and in cxr.privacy.audit) and docs/guarantees.md: the trust boundary of --features.
FEATURES_TRUST = (
    "Loading a TorchScript file runs code from it: only load feature models you trust. Any file but .safetensors is "
    "tried as TorchScript first; torchvision Inception-v3 weights as .safetensors load without running any code"
)


class FeatureExtractorError(ValueError):
    """The --features file is missing, unreadable, or not a usable feature extractor."""


@dataclass
class EvaluateConfig:
    """Quality of generated X-rays against real ones: FID, KID, MS-SSIM diversity, intensity statistics."""

    real: Path | None = flag(None, "folder of real images (searched recursively), e.g. the held-out split")
    fake: Path | None = flag(None, "folder of generated images (searched recursively)")
    features: Path | None = flag(
        None,
        "local feature extractor for FID/KID: TorchScript file, or torchvision Inception-v3 state dict "
        f"(.pth/.safetensors). {FEATURES_TRUST}",
    )
    skip_features: bool = flag(
        False, "skip FID and KID (no extractor needed): only MS-SSIM diversity and intensity statistics"
    )
    out: Path | None = flag(None, "write the results as JSON to this file")
    exclude: str = flag("contact_sheet*", "comma-separated file-name patterns to skip (sample.py's contact sheet)")
    image_size: int = flag(
        299, "images are resized to this square size for the feature extractor (Inception: 299)", bounds=(16, 4096)
    )
    pad_to_square: bool = flag(False, "pad non-square images to square instead of center-cropping")
    intensity_clip_percent: float = flag(
        0.0,
        "read the --real images (not --fake) with this train.py --intensity_clip_percent (percentile window for "
        "16-bit/float images and DICOM without a VOI window), so they look as they did in training; 0 = min-max "
        "(range: [0, 50))",
    )
    batch_size: int = flag(32, "images per forward pass of the extractor", bounds=(1, 4096))
    num_workers: int = flag(2, "worker processes that read and resize images", bounds=(0, 256))
    device: str = flag("auto", "cuda, cpu or auto")
    kid_subsets: int = flag(100, "random subsets averaged for KID", bounds=(1, 100_000))
    kid_subset_size: int = flag(1000, "images per KID subset (capped at the smaller set's size)", bounds=(2, 10**7))
    diversity_pairs: int = flag(
        200, "random image pairs for the MS-SSIM diversity of each set (0 disables)", bounds=(0, 10**7)
    )
    msssim_resolution: int = flag(
        256, "image side for MS-SSIM (at least 161 for 5 scales of an 11-px window)", bounds=(161, 4096)
    )
    histogram_bins: int = flag(256, "bins of the intensity histograms on [0, 1]", bounds=(2, 65536))
    seed: int = flag(0, "seed of the KID subsets and the MS-SSIM pairs", bounds=(0, TRAIN_SEED_MAX))

    def validate(self) -> None:
        check_choices(self)
        require(self.real is not None, "real", "is required: a folder of real images")
        require(self.fake is not None, "fake", "is required: a folder of generated images")
        require(
            0.0 <= self.intensity_clip_percent < 50.0,
            "intensity_clip_percent",
            f"must be in [0, 50), got {self.intensity_clip_percent}",
        )
        require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


# ----------------------------------------------------------------------------------------------
# MS-SSIM diversity of a set


def random_pairs(count: int, num_pairs: int, seed: int = 0) -> np.ndarray:
    """(P, 2) distinct index pairs i != j drawn uniformly (with replacement across pairs)."""
    if count < 2 or num_pairs == 0:
        return np.zeros((0, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, count, num_pairs)
    second = (first + rng.integers(1, count, num_pairs)) % count
    return np.stack([first, second], axis=1)


def ms_ssim_diversity(paths, num_pairs: int, preprocess: Preprocess, *, seed=0, batch=16) -> dict:
    """Mean and std of MS-SSIM over random pairs of images read as `preprocess` says, at its resolution (lower =
    more diverse)."""
    pairs = random_pairs(len(paths), num_pairs, seed)
    if len(pairs) == 0:
        return {"pairs": 0, "mean": None, "std": None}
    needed = sorted(set(pairs.ravel().tolist()))
    images = {i: thumbnail(preprocess.read(paths[i]), preprocess) for i in needed}
    values = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        a = torch.stack([images[i] for i in chunk[:, 0]])
        b = torch.stack([images[j] for j in chunk[:, 1]])
        values.append(ms_ssim(a, b))
    values = torch.cat(values).double().numpy()
    return {"pairs": int(len(pairs)), "mean": float(values.mean()), "std": float(values.std())}


# ----------------------------------------------------------------------------------------------
# Feature extractors


def _torchscript_extractor(module):
    """Callable (N, 3, H, W) float [0, 1] -> (N, D) for a TorchScript module."""
    arguments = [argument.name for argument in module.forward.schema.arguments]
    if "return_features" in arguments:
        # StyleGAN2-ADA / clean-fid inception-2015-12-05.pt: uint8 images, features on request.
        return lambda images: module(
            (images * 255).round().clamp(0, 255).to(torch.uint8), return_features=True
        ), "torchscript (return_features, uint8 input)"
    return lambda images: module(images), "torchscript"


def _inception_from_state_dict(state: dict, path: Path, device):
    """torchvision Inception-v3 with the given weights; returns the pool3 (2048-d) feature callable."""
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise FeatureExtractorError(
            f"--features {path}: this is a state dict, and building Inception-v3 from it needs torchvision, which "
            "is not installed. `pip install torchvision` (the build matching your torch), or pass a TorchScript "
            "extractor instead."
        ) from None
    if "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise FeatureExtractorError(
            f"--features {path}: not an Inception-v3 state dict (no fc / Mixed_7c weights); "
            "pass torchvision's inception_v3_google-0cc3c7bd.pth or a TorchScript extractor"
        )
    model = inception_v3(
        weights=None,
        aux_logits=any(key.startswith("AuxLogits.") for key in state),
        init_weights=False,
        num_classes=state["fc.weight"].shape[0],
        transform_input=False,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise FeatureExtractorError(f"--features {path}: does not match torchvision's Inception-v3: {error}") from None
    model.fc = torch.nn.Identity()  # the 2048-d average-pooled "pool3" features
    model.eval().to(device)
    # torchvision's ImageNet weights expect (x - 0.5) / 0.5 (what transform_input=True produces from
    # ImageNet-normalized input), so [0, 1] images are mapped to [-1, 1] directly.
    return lambda images: model(images * 2 - 1), "torchvision inception_v3 pool3"


def load_feature_extractor(path, device="cpu"):
    """(callable (N, 3, H, W) float [0, 1] -> (N, D) features, description) from a local file.

    TorchScript files are tried first; anything else is read as a state dict with weights_only=True
    (or safetensors) and built as torchvision's Inception-v3.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureExtractorError(f"--features {path}: file does not exist.\n{MISSING_FEATURES_MESSAGE}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _inception_from_state_dict(load_file(str(path)), path, device)
    try:
        module = torch.jit.load(str(path), map_location=device)
    except RuntimeError:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FeatureExtractorError(
                f"--features {path}: neither TorchScript nor a weights-only state dict ({error}). A pickled nn.Module "
                "is not loaded (unpickling can run code). TorchScript also runs code from its file when loaded: a "
                "model you trust can be exported with torch.jit.trace(model, example).save(PATH); weights that need "
                "no trust are torchvision Inception-v3 weights saved as .safetensors"
            ) from None
        if not isinstance(state, dict):
            raise FeatureExtractorError(
                f"--features {path}: expected a state dict, found {type(state).__name__}"
            ) from None
        return _inception_from_state_dict(state, path, device)
    module.eval()
    return _torchscript_extractor(module)


# ----------------------------------------------------------------------------------------------
# Reading a set once: extractor inputs and intensity histogram


class _EvalDataset:
    """Item i: image i resized for the extractor (when `resize`), its intensity histogram and its pixel sums."""

    def __init__(self, paths, preprocess: Preprocess, bins: int, resize: bool):
        self.paths, self.preprocess, self.bins, self.resize = list(paths), preprocess, bins, resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        gray = self.preprocess.read(self.paths[index])
        counts = np.histogram(gray, bins=self.bins, range=(0.0, 1.0))[0]
        sums = torch.tensor([gray.sum(dtype=np.float64), np.square(gray, dtype=np.float64).sum()], dtype=torch.float64)
        image = thumbnail(gray, self.preprocess) if self.resize else torch.zeros(0)
        return image, torch.from_numpy(counts), sums


def read_set(
    paths,
    preprocess: Preprocess,
    *,
    extractor=None,
    bins=256,
    batch_size=32,
    num_workers=0,
    device="cpu",
    desc="images",
) -> dict:
    """One pass over a set read as `preprocess` says: extractor features (N, D) float64 of the images resized to
    its resolution (or None without an extractor) and the intensity histogram."""
    dataset = _EvalDataset(paths, preprocess, bins, resize=extractor is not None)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    features, counts, sums = [], np.zeros(bins, np.int64), np.zeros(2, np.float64)
    with torch.inference_mode():
        for images, batch_counts, batch_sums in tqdm(loader, desc=desc, unit="batch", disable=None):
            counts += batch_counts.sum(dim=0).numpy()
            sums += batch_sums.sum(dim=0).numpy()
            if extractor is not None:
                rgb = images[:, None].expand(-1, 3, -1, -1).to(device)
                output = extractor(rgb)
                if output.dim() != 2:
                    raise FeatureExtractorError(
                        f"the feature extractor returned shape {tuple(output.shape)}; expected (N, D)"
                    )
                features.append(output.double().cpu().numpy())
    return {
        "features": np.concatenate(features) if features else None,
        "counts": counts,
        "sum": float(sums[0]),
        "sum_squares": float(sums[1]),
    }


def evaluate(config: EvaluateConfig) -> dict:
    """Compute every metric; returns the results dict (also written to `config.out` when set)."""
    if config.features is None and not config.skip_features:
        raise FeatureExtractorError(MISSING_FEATURES_MESSAGE)
    if config.out is not None:
        check_writable_file(config.out, "--out")  # before any image is read, not after every metric
    device = pick_device(config.device)
    real_paths, fake_paths = list_images(config.real, config.exclude), list_images(config.fake, config.exclude)
    for name, paths in (("real", real_paths), ("fake", fake_paths)):
        if len(paths) < 2:
            raise FileNotFoundError(f"--{name} {getattr(config, name)}: found {len(paths)} images, need at least 2")
    extractor, extractor_kind = (
        (None, None) if config.skip_features else load_feature_extractor(config.features, device)
    )
    read = dict(
        extractor=extractor,
        bins=config.histogram_bins,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        device=device,
    )
    # The real images as training saw them; samples are 8/16-bit as written.
    real_preprocess = Preprocess(config.image_size, config.pad_to_square, config.intensity_clip_percent)
    fake_preprocess = replace(real_preprocess, intensity_clip_percent=0.0)
    real = read_set(real_paths, real_preprocess, desc="real", **read)
    fake = read_set(fake_paths, fake_preprocess, desc="fake", **read)

    results = {"config": to_dict(config), "counts": {"real": len(real_paths), "fake": len(fake_paths)}}
    if extractor is not None:
        mu_real, sigma_real = feature_statistics(real["features"])
        mu_fake, sigma_fake = feature_statistics(fake["features"])
        kid_mean, kid_std = kid(
            real["features"], fake["features"], config.kid_subsets, config.kid_subset_size, config.seed
        )
        results["features"] = {
            "extractor": str(config.features),
            "kind": extractor_kind,
            "dim": int(real["features"].shape[1]),
            "image_size": config.image_size,
        }
        results["fid"] = frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
        results["kid"] = {
            "mean": kid_mean,
            "std": kid_std,
            "subsets": config.kid_subsets,
            "subset_size": min(config.kid_subset_size, len(real_paths), len(fake_paths)),
        }
    at_msssim_size = dict(resolution=config.msssim_resolution)
    results["diversity_ms_ssim"] = {
        "fake": ms_ssim_diversity(
            fake_paths, config.diversity_pairs, replace(fake_preprocess, **at_msssim_size), seed=config.seed
        ),
        "real": ms_ssim_diversity(
            real_paths, config.diversity_pairs, replace(real_preprocess, **at_msssim_size), seed=config.seed
        ),
    }
    results["intensity"] = {
        "real": histogram_statistics(real["counts"], real["sum"], real["sum_squares"]),
        "fake": histogram_statistics(fake["counts"], fake["sum"], fake["sum_squares"]),
        "histogram_intersection": histogram_intersection(real["counts"], fake["counts"]),
        "wasserstein1": histogram_wasserstein1(real["counts"], fake["counts"]),
        "bins": config.histogram_bins,
    }
    if config.out is not None:
        atomic_write_bytes(config.out, (json.dumps(results, indent=2) + "\n").encode())
    return results


def format_table(results: dict) -> str:
    """The results as an aligned text table."""
    fmt = lambda value, digits=4: "n/a" if value is None else f"{value:.{digits}f}"  # noqa: E731
    rows = [("images (real / fake)", f"{results['counts']['real']} / {results['counts']['fake']}", "")]
    if "fid" in results:
        rows.append(("FID", fmt(results["fid"], 3), f"{results['features']['kind']}, {results['features']['dim']}-d"))
        kid_result = results["kid"]
        rows.append(
            (
                "KID",
                f"{fmt(kid_result['mean'], 5)} +- {fmt(kid_result['std'], 5)}",
                f"{kid_result['subsets']} subsets of {kid_result['subset_size']}",
            )
        )
    else:
        rows.append(("FID / KID", "skipped", "--skip_features"))
    diversity = results["diversity_ms_ssim"]
    rows.append(("MS-SSIM fake pairs", fmt(diversity["fake"]["mean"]), "lower = more diverse"))
    rows.append(("MS-SSIM real pairs", fmt(diversity["real"]["mean"]), "reference"))
    intensity = results["intensity"]
    for name in ("real", "fake"):
        stats = intensity[name]
        rows.append(
            (
                f"intensity {name}",
                f"mean {fmt(stats['mean'], 3)} std {fmt(stats['std'], 3)}",
                f"p5 {fmt(stats['p5'], 3)} p50 {fmt(stats['p50'], 3)} p95 {fmt(stats['p95'], 3)}",
            )
        )
    rows.append(("histogram intersection", fmt(intensity["histogram_intersection"]), "1 = identical"))
    rows.append(("intensity Wasserstein-1", fmt(intensity["wasserstein1"]), "0 = identical"))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: parse flags into an EvaluateConfig, run `evaluate`, print the table, return the exit code."""
    config = parse_config(EvaluateConfig, argv)
    try:
        results = evaluate(config)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # FeatureExtractorError, ImageReadError: ValueError
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(results))
    if config.out is not None:
        print(f"results: {config.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

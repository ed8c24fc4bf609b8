"""Image metrics as pure functions of arrays: SSIM and MS-SSIM, the Frechet distance (FID) and KID of feature
sets, and intensity-histogram statistics. Reading the images is the caller's part (`cxr.privacy.audit`,
`cxr.privacy.evaluate`).

* SSIM: Wang et al. 2004 (11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03, 'valid' filtering).
* MS-SSIM: Wang, Simoncelli & Bovik 2003, 5 scales.
* KID: polynomial kernel k(x, y) = (x.y / D + 1)^3, unbiased MMD^2 averaged over random subsets
  (Binkowski et al. 2018).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ----------------------------------------------------------------------------------------------
# SSIM and MS-SSIM


def gaussian_window(size: int = 11, sigma: float = 1.5):
    """Normalized 1-D gaussian (float64 torch)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def _filter(images, window):
    """Separable 'valid' filtering of (N, 1, H, W) with a 1-D window."""
    images = F.conv2d(images, window.view(1, 1, 1, -1))
    return F.conv2d(images, window.view(1, 1, -1, 1))


def ssim_components(
    x, y, *, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
):
    """Per-image mean SSIM and mean contrast-structure term cs, for (N, 1, H, W) image batches."""
    window = gaussian_window(window_size, sigma).to(x.device, x.dtype)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(1).mean(dim=1), cs_map.flatten(1).mean(dim=1)


def ssim(x, y, data_range: float = 1.0, dtype=None):
    """Mean SSIM of paired grayscale images: x, y (N, H, W) or (N, 1, H, W), values in [0, data_range].

    Returns (N,) in `dtype` (default float32; float64 is several times slower on CPU).
    """
    dtype = dtype or torch.float32
    x = torch.as_tensor(x).to(dtype)
    y = torch.as_tensor(y).to(dtype)
    if x.dim() == 3:
        x, y = x[:, None], y[:, None]
    return ssim_components(x, y, data_range=data_range)[0]


def ms_ssim(x, y, data_range: float = 1.0, weights=MS_SSIM_WEIGHTS, dtype=None):
    """Multi-scale SSIM of paired grayscale images (N, H, W) or (N, 1, H, W) in [0, data_range].

    Wang, Simoncelli & Bovik 2003: the contrast-structure term at the first len(weights) - 1 scales and
    the full SSIM at the last, each raised to its weight; 2x2 average pooling between scales. Negative
    terms are clipped to 0 (as in pytorch-msssim) so the power is defined. Returns (N,).
    """
    dtype = dtype or torch.float32
    x, y = torch.as_tensor(x).to(dtype), torch.as_tensor(y).to(dtype)
    if x.dim() == 3:
        x, y = x[:, None], y[:, None]
    smallest = (11 - 1) * 2 ** (len(weights) - 1) + 1
    if min(x.shape[-2:]) < smallest:
        raise ValueError(
            f"MS-SSIM with {len(weights)} scales needs images of at least {smallest} px, got {tuple(x.shape[-2:])}"
        )
    terms = []
    for scale in range(len(weights)):
        ssim_value, cs_value = ssim_components(x, y, data_range=data_range)
        if scale == len(weights) - 1:
            terms.append(torch.relu(ssim_value))
        else:
            terms.append(torch.relu(cs_value))
            padding = [size % 2 for size in x.shape[-2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    weights = torch.tensor(weights, dtype=dtype)
    return torch.prod(torch.stack(terms, dim=1) ** weights, dim=1)


# ----------------------------------------------------------------------------------------------
# Frechet distance and KID (pure functions of feature arrays)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, float64 (covariance with N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), which avoids the complex round-off
    of a general matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"feature statistics differ in shape: {mu1.shape} / {mu2.shape}, {sigma1.shape} / {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _float64(values):
    """float64 numpy array, or for a torch tensor a float64 tensor on its own device (KID of features that live on
    the training GPU, `cxr.privacy.watch`)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64)
    return np.asarray(values, np.float64)


def polynomial_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """(x y^T * gamma + coef0) ** degree with gamma = 1 / D by default (float64; numpy, or torch on x's device)."""
    x, y = _float64(x), _float64(y)
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 of two equally sized samples (m, D) under the polynomial kernel (numpy arrays or torch
    tensors)."""
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError(f"mmd2_unbiased needs two samples of the same size >= 2, got {len(x)} and {len(y)}")
    k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef0)
    off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(off_diagonal - 2 * k_xy.sum() / m**2)


def kid_subset_indices(n1: int, n2: int, num_subsets: int, subset_size: int, seed: int = 0):
    """The (indices into set 1, indices into set 2) of each KID subset, drawn without replacement."""
    size = min(subset_size, n1, n2)
    rng = np.random.default_rng(seed)
    return [(rng.choice(n1, size, replace=False), rng.choice(n2, size, replace=False)) for _ in range(num_subsets)]


def kid(
    features1,
    features2,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets.

    Each subset takes min(subset_size, N1, N2) rows of each set without replacement. Torch tensors (both on one
    device) are computed there in float64, with the same subsets as numpy arrays.
    """
    features1, features2 = _float64(features1), _float64(features2)
    values = [
        mmd2_unbiased(features1[_rows(i, features1)], features2[_rows(j, features2)], degree, gamma, coef0)
        for i, j in kid_subset_indices(len(features1), len(features2), num_subsets, subset_size, seed)
    ]
    return float(np.mean(values)), float(np.std(values))


def _rows(indices: np.ndarray, features):
    """`indices` as what indexes `features`: the numpy array itself, or a tensor on the features' device."""
    return torch.as_tensor(indices, device=features.device) if isinstance(features, torch.Tensor) else indices


# ----------------------------------------------------------------------------------------------
# Intensity histograms


def histogram_statistics(counts, sum_values: float, sum_squares: float) -> dict:
    """Mean and std (exact, from the sums) and percentiles (from the histogram on [0, 1])."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    mean = sum_values / total
    std = float(np.sqrt(max(sum_squares / total - mean**2, 0.0)))
    edges = np.linspace(0.0, 1.0, len(counts) + 1)
    cdf = np.concatenate([[0.0], np.cumsum(counts) / total])
    percentiles = {f"p{p}": float(np.interp(p / 100, cdf, edges)) for p in (1, 5, 25, 50, 75, 95, 99)}
    return {"pixels": int(total), "mean": float(mean), "std": std, **percentiles}


def histogram_intersection(counts1, counts2) -> float:
    """sum(min(p, q)) of the two normalized histograms: 1 for identical distributions, 0 for disjoint."""
    p = np.asarray(counts1, np.float64) / np.sum(counts1)
    q = np.asarray(counts2, np.float64) / np.sum(counts2)
    return float(np.minimum(p, q).sum())


def histogram_wasserstein1(counts1, counts2) -> float:
    """Wasserstein-1 distance of two intensity distributions on [0, 1] given as histograms: the area
    between their CDFs (exact up to the bin width)."""
    p = np.asarray(counts1, np.float64) / np.sum(counts1)
    q = np.asarray(counts2, np.float64) / np.sum(counts2)
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum() / len(p))

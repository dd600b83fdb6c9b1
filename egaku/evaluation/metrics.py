"""Distribution and adherence metrics computed from a judge network's features and predictions."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula, Heusel et al. 2017).

    d² = |mu_a - mu_b|² + Tr(S_a + S_b - 2 (S_a S_b)^½). FID proper uses Inception-v3 pool features;
    we use the features of a judge trained by our own code, so values compare only within one judge.
    """
    feats_a = np.asarray(feats_a, dtype=np.float64)
    feats_b = np.asarray(feats_b, dtype=np.float64)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sets must be 2-D with the same width, got {feats_a.shape} and {feats_b.shape}")
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("need at least two samples in each feature set")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)  # no disp=: newer SciPy removed it (and returns the root alone)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean), 0.0))


def class_coverage(predicted: np.ndarray, num_classes: int) -> float:
    """Normalised entropy of the predicted-class histogram: 1.0 = all classes equally often, 0 = one class."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(num_classes))

"""Distances between two feature sets: the metrics of the quality report.

Each takes (n, d) arrays of real and synthetic features; module `quality` documents what
they mean for generated images and which sets it compares. Float64 throughout (pairwise
distances by torch's exact cdist), so the formulas can be checked on known distributions
(tests/core/test_synthesis.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "distribution_metrics",
    "frechet_distance",
    "frechet_distance_gaussians",
    "knn_precision_recall",
    "median_bandwidth",
    "mmd_rbf",
]

#: Random-stream tag of the metric subsamples.
SUBSAMPLE_STREAM = 31

def _as_features(a: Any, name: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) feature array, got shape {x.shape}.")
    return x


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    root1 = _sqrtm_psd(s1)
    middle = root1 @ s2 @ root1
    eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(eig)))
    return max(value, 0.0)


def frechet_distance(a: Any, b: Any) -> float:
    """FD between Gaussians fitted (mean, unbiased covariance) to feature sets ``a`` and ``b``."""
    x, y = _as_features(a, "a"), _as_features(b, "b")
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"frechet_distance needs two sets of >= 2 points of equal dimension, got {x.shape}, {y.shape}.")
    return frechet_distance_gaussians(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    return torch.cdist(tx, ty, compute_mode="donot_use_mm_for_euclid_dist").pow(2).numpy()


def _pair_distances(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared distances within x, within y and between them, each pair computed once: the
    bandwidth, MMD and every k of the k-NN metrics read the same three matrices (each pair's
    value does not depend on which matrix holds it, so the results equal separate calls')."""
    return _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)


def _median_of_pairs(xx: np.ndarray, yy: np.ndarray, xy: np.ndarray) -> float:
    """The median distance over the distinct pairs of the pooled sample: within-set pairs
    once (upper triangles) and every cross pair."""
    distinct = np.concatenate([xx[np.triu_indices(xx.shape[0], k=1)], yy[np.triu_indices(yy.shape[0], k=1)], xy.ravel()])
    med = float(np.sqrt(np.median(distinct))) if distinct.size else 0.0
    return med if med > 0 else 1.0


def median_bandwidth(a: Any, b: Any) -> float:
    """The median heuristic: median pairwise Euclidean distance of the pooled sample
    (distinct pairs only); 1.0 when every distance is 0."""
    return _median_of_pairs(*_pair_distances(_as_features(a, "a"), _as_features(b, "b")))


def _require_two_per_set(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"mmd_rbf needs >= 2 points per set, got {x.shape[0]}, {y.shape[0]}.")


def _mmd_of_pairs(xx: np.ndarray, yy: np.ndarray, xy: np.ndarray, bandwidth: float) -> float:
    m, n = xx.shape[0], yy.shape[0]
    gamma = 1.0 / (2.0 * bandwidth * bandwidth)
    kxx, kyy, kxy = (np.exp(-gamma * d) for d in (xx, yy, xy))
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def mmd_rbf(a: Any, b: Any, bandwidth: float | None = None) -> tuple[float, float]:
    """(unbiased MMD^2, bandwidth) with an RBF kernel; bandwidth by the median heuristic
    unless given."""
    x, y = _as_features(a, "a"), _as_features(b, "b")
    _require_two_per_set(x, y)
    pairs = _pair_distances(x, y)
    s = float(bandwidth) if bandwidth is not None else _median_of_pairs(*pairs)
    return _mmd_of_pairs(*pairs, s), s


def _kth_radius(within: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(within)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _knn_of_pairs(rr: np.ndarray, ff: np.ndarray, rf: np.ndarray, k: int) -> tuple[float, float]:
    cross = np.sqrt(rf.T)  # (n_fake, n_real)
    precision = float(np.mean((cross <= _kth_radius(rr, k)[None, :]).any(axis=1)))
    recall = float(np.mean((cross <= _kth_radius(ff, k)[:, None]).any(axis=0)))
    return precision, recall


def knn_precision_recall(real: Any, fake: Any, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of Kynkaanniemi et al. 2019 with k-NN radii (self excluded)."""
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[0] <= k or f.shape[0] <= k:
        raise ValueError(f"knn_precision_recall with k={k} needs more than k points per set, got {r.shape[0]}, {f.shape[0]}.")
    return _knn_of_pairs(*_pair_distances(r, f), k)


def _subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= limit:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=limit, replace=False))]


def distribution_metrics(
    real: np.ndarray, fake: np.ndarray, knn_k: Sequence[int] = (3, 5), max_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """FD, MMD^2 (median heuristic), k-NN precision/recall for each k, and the set sizes."""
    rng = np.random.default_rng([seed, SUBSAMPLE_STREAM])
    out: dict[str, Any] = {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0]), "fd": frechet_distance(real, fake)}
    r, f = _subsample(real, max_samples, rng), _subsample(fake, max_samples, rng)
    _require_two_per_set(r, f)
    pairs = _pair_distances(r, f)
    bandwidth = _median_of_pairs(*pairs)
    out["mmd2"], out["mmd_bandwidth"] = _mmd_of_pairs(*pairs, bandwidth), bandwidth
    for k in knn_k:
        if min(r.shape[0], f.shape[0]) > k:
            out[f"precision_k{k}"], out[f"recall_k{k}"] = _knn_of_pairs(*pairs, k)
        else:
            out[f"precision_k{k}"] = out[f"recall_k{k}"] = None
    return out

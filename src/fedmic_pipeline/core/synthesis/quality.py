"""How good are the synthetic images? Distribution distances, coverage, and usefulness.

Evaluation only: nothing here influences the generator, the plan or any federated model.

Reference encoder (why not Inception): FID's Inception-v3 weights cannot be downloaded
here (no internet), and ImageNet features are a poor ruler for 28x28 grey X-rays anyway.
The project therefore trains its own ruler: the compact student CNN
(``models.build_model('student_cnn')``, thin widths by default) trained as a classifier of
the JOINT label class x device on the real pooled training data of the partition. Why the
joint label: a class-only encoder learns to be invariant to the imaging device, i.e. blind
to exactly the domain differences FedSSG's generator must reproduce; predicting the device
too makes the feature space separate devices. Features are the 64-d (by default)
penultimate representation ``model.features(x)``. Pooling the clients' real training
images is possible only because this is a simulation; it is an evaluation-only step.

Metrics, each per (class, device) cell, per class (pooled over devices), per device
(pooled over classes) and overall:

* Frechet distance (FD) between Gaussians fitted to the two feature sets:
  |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}) (symmetric square roots
  by eigendecomposition in float64; negative round-off eigenvalues clipped to 0). "FID"
  only when the features are Inception's, so it is called FD here.
* MMD^2 with an RBF kernel k(x, y) = exp(-|x - y|^2 / (2 s^2)), s = the median pairwise
  distance of the pooled sample (median heuristic), unbiased U-statistic estimator (its
  within-set sums exclude the diagonal, so it can be slightly negative when the sets
  match).
* k-NN precision and recall (Kynkaanniemi et al. 2019) for every k in ``knn_k``: the real
  manifold is the union of balls around real points with radius = distance to their k-th
  nearest real neighbour (self excluded); precision = fraction of synthetic points inside
  it; recall = the same with the roles swapped.
* Classification accuracy score (CAS, Ravuri & Vinyals 2019): a student CNN trained on
  synthetic images only, tested on the real global test set as rendered by every device
  (the held-out device included: the unseen-device accuracy), with per-class recall;
  beside it the same student recipe trained on the real pooled training data.

Which sets are compared (the reference scale): the real side is the global TEST set of
class c rendered by device d (held-out real data). The synthetic set of a cell has as
many images as the real training data of that cell (capped at ``max_per_cell``), drawn
from the generator. The same metrics between the real TRAIN data of the cell and the same
test images are reported beside, as the floor a perfect generator would reach with that
sample size (FD and MMD are biased by sample size, so only same-size comparisons are
meaningful). MMD and k-NN metrics use at most ``max_metric_samples`` points per side
(seeded subsample), FD uses all. Pooled scopes (per class, per device, overall) take the
same number of images from both sides of every cell, so their mixtures over cells match.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import derive_seed, make_generator
from ..evaluation import per_class_recall
from ..models import build_model
from ..protocol import ConfigurationError, DataSpec, RoundContext, reject_unknown_keys
from ..training import make_optimizer, train_local
from .generator import ConditionalSampler, images_to_uint8

__all__ = [
    "QualityConfig",
    "distribution_metrics",
    "evaluate_quality",
    "extract_features",
    "frechet_distance",
    "frechet_distance_gaussians",
    "knn_precision_recall",
    "median_bandwidth",
    "mmd_rbf",
    "recalibrate_batchnorm",
    "train_classifier",
]

logger = logging.getLogger(__name__)

#: Random-stream tags of the quality step (subsamples, synthetic draws, model training).
#: Both CAS students (synthetic-trained and real-trained) use the _CAS stream: same initial
#: weights and batch-order stream, so only the training images differ.
_SUBSAMPLE, _SYNTH_DRAW, _ENCODER, _CAS = 31, 32, 33, 34


@dataclass(frozen=True)
class QualityConfig:
    """Parameters of the quality step (``synthetic.quality``)."""

    encoder_epochs: int = 5
    classifier_epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    model_options: Mapping[str, Any] = field(default_factory=lambda: {"widths": [16, 32, 64], "feature_dim": 64})
    knn_k: tuple[int, ...] = (3, 5)
    min_per_cell: int = 10
    max_per_cell: int = 500
    max_metric_samples: int = 1000
    temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "knn_k", tuple(int(k) for k in self.knn_k))
        opts = dict(self.model_options or {})
        if "widths" in opts:
            opts["widths"] = tuple(int(w) for w in opts["widths"])
        object.__setattr__(self, "model_options", opts)
        checks = [
            (self.encoder_epochs >= 1 and self.classifier_epochs >= 1, "encoder_epochs and classifier_epochs must be >= 1."),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}."),
            (self.lr > 0 and 0.0 <= self.momentum < 1.0, "lr must be > 0 and momentum in [0, 1)."),
            (len(self.knn_k) >= 1 and min(self.knn_k) >= 1, f"knn_k must be a non-empty list of integers >= 1, got {self.knn_k}."),
            (self.min_per_cell >= 2, f"min_per_cell must be >= 2 (a covariance needs two samples), got {self.min_per_cell}."),
            (self.max_per_cell >= self.min_per_cell, "max_per_cell must be >= min_per_cell."),
            (self.max_metric_samples >= max(self.knn_k) + 2, "max_metric_samples must exceed the largest k by 2."),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(f"synthetic.quality: {message}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> QualityConfig:
        reject_unknown_keys(params, list(cls.__dataclass_fields__), "synthetic.quality")
        values = dict(params)
        for key in ("lr", "momentum", "temperature"):
            if key in values:
                values[key] = float(values[key])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["knn_k"] = list(self.knn_k)
        out["model_options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.model_options).items()}
        return out


# ---------------------------------------------------------------------------------------
# Distances between feature sets (numpy float64)
# ---------------------------------------------------------------------------------------


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


def median_bandwidth(a: Any, b: Any) -> float:
    """The median heuristic: median pairwise Euclidean distance of the pooled sample
    (distinct pairs only); 1.0 when every distance is 0."""
    pooled = np.concatenate([_as_features(a, "a"), _as_features(b, "b")])
    d2 = _sq_dists(pooled, pooled)
    iu = np.triu_indices(pooled.shape[0], k=1)
    med = float(np.sqrt(np.median(d2[iu]))) if iu[0].size else 0.0
    return med if med > 0 else 1.0


def mmd_rbf(a: Any, b: Any, bandwidth: float | None = None) -> tuple[float, float]:
    """(unbiased MMD^2, bandwidth) with an RBF kernel; bandwidth by the median heuristic
    unless given."""
    x, y = _as_features(a, "a"), _as_features(b, "b")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"mmd_rbf needs >= 2 points per set, got {m}, {n}.")
    s = float(bandwidth) if bandwidth is not None else median_bandwidth(x, y)
    gamma = 1.0 / (2.0 * s * s)
    kxx, kyy, kxy = (np.exp(-gamma * _sq_dists(p, q)) for p, q in ((x, x), (y, y), (x, y)))
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean()), s


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(_sq_dists(x, x))
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def knn_precision_recall(real: Any, fake: Any, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of Kynkaanniemi et al. 2019 with k-NN radii (self excluded)."""
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[0] <= k or f.shape[0] <= k:
        raise ValueError(f"knn_precision_recall with k={k} needs more than k points per set, got {r.shape[0]}, {f.shape[0]}.")
    cross = np.sqrt(_sq_dists(f, r))  # (n_fake, n_real)
    precision = float(np.mean((cross <= _kth_radius(r, k)[None, :]).any(axis=1)))
    recall = float(np.mean((cross <= _kth_radius(f, k)[:, None]).any(axis=0)))
    return precision, recall


def _subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= limit:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=limit, replace=False))]


def distribution_metrics(
    real: np.ndarray, fake: np.ndarray, knn_k: Sequence[int] = (3, 5), max_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """FD, MMD^2 (median heuristic), k-NN precision/recall for each k, and the set sizes."""
    rng = np.random.default_rng([seed, _SUBSAMPLE])
    out: dict[str, Any] = {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0]), "fd": frechet_distance(real, fake)}
    r, f = _subsample(real, max_samples, rng), _subsample(fake, max_samples, rng)
    out["mmd2"], out["mmd_bandwidth"] = mmd_rbf(r, f)
    for k in knn_k:
        if min(r.shape[0], f.shape[0]) > k:
            out[f"precision_k{k}"], out[f"recall_k{k}"] = knn_precision_recall(r, f, k)
        else:
            out[f"precision_k{k}"] = out[f"recall_k{k}"] = None
    return out


# ---------------------------------------------------------------------------------------
# Models of the evaluation (encoder, CAS students)
# ---------------------------------------------------------------------------------------


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_outputs: int, config: QualityConfig, seed: int, epochs: int
) -> nn.Module:
    """A student CNN trained from scratch on (x, y) with SGD; deterministic for the seed (CPU)."""
    if int(y.shape[0]) < 2:
        raise ConfigurationError(f"Cannot train a quality classifier on {int(y.shape[0])} images.")
    spec = DataSpec(in_channels=int(x.shape[1]), num_classes=int(num_outputs), image_size=int(x.shape[-1]))
    model = build_model("student_cnn", spec, seed=seed, **config.model_options)
    optimizer = make_optimizer(model.parameters(), "sgd", config.lr, momentum=config.momentum)
    ctx = RoundContext(round=0, num_rounds=1, seed=seed, device=torch.device("cpu"))
    stats = train_local(model, (x, y), epochs, config.batch_size, optimizer, make_generator(seed, 0), ctx)
    recalibrate_batchnorm(model, x)
    logger.info("quality classifier (%d outputs, %d images, %d epochs): train loss %.4f acc %.3f",
                num_outputs, int(y.shape[0]), epochs, stats.loss, stats.accuracy)  # fmt: skip
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> None:
    """Replace BatchNorm running statistics by sample-weighted averages over all of ``x``.

    Why: after a few epochs of SGD with momentum the exponential running averages lag far
    behind the final weights; measured on PneumoniaMNIST, the joint class x device encoder
    scored 0.19 on its own training images in eval mode and 0.95 after this pass (the
    device signal is in global intensity statistics, which stale BN statistics corrupt).
    One pass in a fixed order, each batch weighted by its size (momentum n_b / n_seen),
    makes the running mean the exact mean over ``x`` (the variance is the size-weighted
    mean of the per-batch variances); the weights are untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    model.train()
    seen = 0
    for i in range(0, x.shape[0], batch_size):
        batch = x[i : i + batch_size]
        if batch.shape[0] < 2:  # BatchNorm cannot take statistics of one sample
            break
        seen += int(batch.shape[0])
        for m in norms:
            m.momentum = batch.shape[0] / seen  # 1.0 for the first batch: forgets the stale values
        model(batch)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """``model.features`` of every image, float64 (N, feature_dim), in eval mode."""
    model.eval()
    chunks = [model.features(x[i : i + batch_size]).double() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, getattr(model, "feature_dim", 0)))


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]).numpy()


def _accuracy_block(model: nn.Module, tests: Mapping[int, tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict[int, dict[str, Any]]:
    out = {}
    for d, (x, y) in sorted(tests.items()):
        pred = _predict(model, x)
        truth = y.numpy()
        recall = per_class_recall(truth, pred, num_classes)
        out[d] = {
            "accuracy": float(np.mean(pred == truth)) if truth.size else None,
            "per_class_recall": [None if math.isnan(v) else float(v) for v in np.asarray(recall, dtype=float)],
            "n": int(truth.size),
        }
    return out


# ---------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------


def _synthetic_mirror(
    generator_model: ConditionalSampler, classes: np.ndarray, devices: np.ndarray, seed: int, temperature: float, layout_ndim: int
) -> torch.Tensor:
    """Generator samples with the same (class, device) labels as the given rows, passed
    through the same uint8 quantisation as the shipped synthetic sets."""
    images = generator_model.sample(classes, devices, make_generator(seed, _SYNTH_DRAW), temperature=temperature)
    arr = images_to_uint8(images, layout_ndim)
    arr = arr[:, None] if layout_ndim == 3 else np.transpose(arr, (0, 3, 1, 2))
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)


def evaluate_quality(
    generator_model: ConditionalSampler,
    real_train: tuple[torch.Tensor, np.ndarray, np.ndarray],
    real_test: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    num_devices: int,
    held_out_device: int | None,
    config: QualityConfig,
    seed: int,
    layout_ndim: int = 3,
) -> dict[str, Any]:
    """All quality numbers of the module docstring as one JSON-ready dict (device ids as ints).

    ``real_train`` = (images float (N,C,H,W) in [0,1], classes (N,), devices (N,)): the
    pooled real training data. ``real_test[d]`` = (images, labels) of the global test set
    rendered by device d (every device, the held-out one included).
    """
    x_train, c_train, d_train = real_train
    c_train, d_train = np.asarray(c_train, dtype=np.int64), np.asarray(d_train, dtype=np.int64)
    if x_train.shape[0] != c_train.size or c_train.size != d_train.size:
        raise ConfigurationError("evaluate_quality: real_train images, classes and devices differ in length.")
    if held_out_device is not None and (d_train == held_out_device).any():
        raise ConfigurationError("evaluate_quality: the real training data contains the held-out device.")

    # 1. the synthetic mirror of the real training data (same labels and devices)
    x_syn = _synthetic_mirror(generator_model, c_train, d_train, seed, config.temperature, layout_ndim)

    # 2. the reference encoder on the JOINT label class * num_devices + device
    joint = torch.from_numpy(c_train * num_devices + d_train)
    encoder = train_classifier(x_train, joint, num_classes * num_devices, config, seed=derive_seed(seed, _ENCODER), epochs=config.encoder_epochs)
    f_train, f_syn = extract_features(encoder, x_train), extract_features(encoder, x_syn)
    f_test = {d: extract_features(encoder, x) for d, (x, _) in real_test.items()}
    encoder_acc, encoder_device_acc = {}, {}
    for d, (x, y) in sorted(real_test.items()):
        if d == held_out_device:
            continue
        pred = _predict(encoder, x)
        encoder_acc[d] = float(np.mean(pred == (y.numpy() * num_devices + d)))
        encoder_device_acc[d] = float(np.mean(pred % num_devices == d))

    # 3. distribution metrics per cell and pooled
    rng = np.random.default_rng([seed, _SUBSAMPLE, 1])
    cells: list[dict[str, Any]] = []
    groups: dict[tuple[str, int], dict[str, list[np.ndarray]]] = {}

    def add(key: tuple[str, int], tr: np.ndarray, sy: np.ndarray, te: np.ndarray) -> None:
        g = groups.setdefault(key, {"train": [], "syn": [], "test": []})
        g["train"].append(tr), g["syn"].append(sy), g["test"].append(te)

    for d in range(num_devices):
        if d == held_out_device or d not in real_test:
            continue
        y_test = real_test[d][1].numpy()
        for c in range(num_classes):
            rows = np.flatnonzero((c_train == c) & (d_train == d))
            test_rows = np.flatnonzero(y_test == c)
            entry: dict[str, Any] = {"class_id": c, "device": d, "n_real_train": int(rows.size), "n_real_test": int(test_rows.size)}
            if rows.size < config.min_per_cell or test_rows.size < config.min_per_cell:
                entry["skipped"] = f"fewer than min_per_cell={config.min_per_cell} real train or test images"
                cells.append(entry)
                continue
            if rows.size > config.max_per_cell:
                rows = np.sort(rng.choice(rows, size=config.max_per_cell, replace=False))
            tr, sy, te = f_train[rows], f_syn[rows], f_test[d][test_rows]
            entry["synthetic_vs_test"] = distribution_metrics(te, sy, config.knn_k, config.max_metric_samples, seed)
            entry["real_train_vs_test"] = distribution_metrics(te, tr, config.knn_k, config.max_metric_samples, seed)
            cells.append(entry)
            # pooled scopes take m = min(n_train, n_test) of each side per cell, so the real
            # test side is mixed over cells exactly like the train/synthetic side
            m = min(rows.size, test_rows.size)
            keep_tr = np.sort(rng.choice(rows.size, size=m, replace=False))
            keep_te = np.sort(rng.choice(test_rows.size, size=m, replace=False))
            for key in (("class", c), ("device", d), ("overall", 0)):
                add(key, tr[keep_tr], sy[keep_tr], te[keep_te])

    def pooled(kind: str) -> list[dict[str, Any]]:
        out = []
        for (k, ident), g in sorted(groups.items()):
            if k != kind:
                continue
            te, sy, tr = (np.concatenate(g[s]) for s in ("test", "syn", "train"))
            out.append({
                ("class_id" if kind == "class" else "device" if kind == "device" else "scope"): ident if kind != "overall" else "all",
                "synthetic_vs_test": distribution_metrics(te, sy, config.knn_k, config.max_metric_samples, seed),
                "real_train_vs_test": distribution_metrics(te, tr, config.knn_k, config.max_metric_samples, seed),
            })  # fmt: skip
        return out

    distribution = {"cells": cells, "by_class": pooled("class"), "by_device": pooled("device"), "overall": (pooled("overall") or [None])[0]}
    logger.info("quality: overall FD synthetic %.3f vs real-train floor %.3f",
                (distribution["overall"] or {}).get("synthetic_vs_test", {}).get("fd", float("nan")),
                (distribution["overall"] or {}).get("real_train_vs_test", {}).get("fd", float("nan")))  # fmt: skip

    # 4. classification accuracy score: synthetic-only vs real-only students
    y_train = torch.from_numpy(c_train)
    cas_model = train_classifier(x_syn, y_train, num_classes, config, seed=derive_seed(seed, _CAS), epochs=config.classifier_epochs)
    real_model = train_classifier(x_train, y_train, num_classes, config, seed=derive_seed(seed, _CAS), epochs=config.classifier_epochs)
    cas = {
        "train_size": int(y_train.shape[0]),
        "trained_on_synthetic": _accuracy_block(cas_model, real_test, num_classes),
        "trained_on_real": _accuracy_block(real_model, real_test, num_classes),
        "held_out_device": held_out_device,
    }
    for key in ("trained_on_synthetic", "trained_on_real"):
        seen = [v["accuracy"] for d, v in cas[key].items() if d != held_out_device and v["accuracy"] is not None]
        cas[f"{key}_mean_seen_devices"] = float(np.mean(seen)) if seen else None
        if held_out_device is not None and held_out_device in cas[key]:
            cas[f"{key}_held_out_device"] = cas[key][held_out_device]["accuracy"]
    logger.info("quality: CAS (synthetic-trained) %.3f vs real-trained %.3f on the seen devices' test renderings",
                cas["trained_on_synthetic_mean_seen_devices"] or float("nan"),
                cas["trained_on_real_mean_seen_devices"] or float("nan"))  # fmt: skip

    return {
        "config": config.as_dict(),
        "seed": int(seed),
        "encoder": {
            "architecture": "student_cnn",
            "model_options": config.as_dict()["model_options"],
            "target": "joint label class * num_devices + device",
            "trained_on": "real pooled training data of the partition (evaluation only)",
            "feature_dim": int(f_train.shape[1]),
            "test_joint_accuracy_by_device": encoder_acc,
            "test_device_accuracy_by_device": encoder_device_acc,
        },
        "distribution": distribution,
        "cas": cas,
    }

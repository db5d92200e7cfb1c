"""Classification metrics, bootstrap confidence intervals and calibration (torch + numpy).

One engine computes every metric from a matrix of sample *weights* W (B, N): the point
estimate is the single row of ones, and a bootstrap resample is the row of how many times
each sample was drawn. So the intervals use exactly the code of the point estimates, and
1000 resamples cost a few vectorised numpy passes (group sums by ``np.add.reduceat``)
instead of 1000 Python-level metric calls.

Conventions (checked against scikit-learn in tests/core/test_evaluation.py):

* confusion matrix: rows = true class, columns = predicted class (``argmax`` of proba).
* balanced accuracy: mean recall over the classes present in y_true (sklearn's rule).
* macro F1: mean F1 over classes present in y_true or y_pred (sklearn's default labels);
  a present class with no true positive scores 0.
* macro AUC: binary -> the AUC of P(class 1); multiclass -> the mean of one-vs-rest
  AUCs. Each AUC is the Mann-Whitney statistic with ties counted 1/2 (exact, rank based).
  Classes absent from y_true (or making up all of it) have no AUC and are left out of
  the mean; sklearn raises there instead. A bootstrap resample that lacks a class
  therefore averages over the classes it has.
* ECE: 15 equal-width bins (lo, hi] on the top-class confidence, sum over bins of
  |accuracy - confidence| weighted by the bin's share of samples (Guo et al. 2017).
* bootstrap: percentile intervals, resampling test samples with replacement from
  ``numpy.random.default_rng(seed)``; NaN resamples are ignored.
* constant predictor: a model whose most frequent prediction covers at least
  ``CONSTANT_SHARE`` (95 %) of a set is flagged (``constant_predictor``), whatever its
  accuracy: on a one-class hospital or an imbalanced test set such a model can look good.
* majority-class baseline (``majority_class_metrics``): always predict the most frequent
  class of the *training* labels, with the training prior as probabilities, so its
  accuracy is that class's share of the test set, its balanced accuracy 1 / K and its AUC
  0.5: the row every table prints so that a constant model cannot pass for a good one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CONSTANT_SHARE",
    "SCALAR_METRICS",
    "accuracy",
    "accuracy_of",
    "balanced_accuracy",
    "bootstrap_weights",
    "compute_metrics",
    "confusion_matrix",
    "evaluate_model",
    "expected_calibration_error",
    "macro_auc",
    "macro_f1",
    "majority_class_metrics",
    "per_class_recall",
    "predict_proba",
    "summarize_sites",
]

SCALAR_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece")
#: Metrics where a lower value is better (``summarize_sites`` takes their maximum as worst).
_LOWER_IS_BETTER = ("ece", "loss", "error")
#: Bookkeeping fields of a metrics dict that ``summarize_sites`` does not summarise.
_NOT_METRICS = frozenset({"n", "n_bootstrap", "ci_level", "num_train", "round", "top_class_share", "device_id"})
#: A model whose most frequent prediction covers this share of a set is a constant predictor.
CONSTANT_SHARE = 0.95
_CHUNK = 250  # bootstrap resamples per vectorised block (bounds memory at 250 x N floats)


# ---------------------------------------------------------------------------------------
# The weighted engine
# ---------------------------------------------------------------------------------------


def _group_sums(weights: np.ndarray, keys: np.ndarray, n_groups: int) -> np.ndarray:
    """(B, n_groups): for each row of ``weights`` (B, N), the sum over samples per key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    out = np.zeros((weights.shape[0], n_groups), dtype=np.float64)
    if sorted_keys.size:
        out[:, sorted_keys[starts]] = np.add.reduceat(weights[:, order], starts, axis=1)
    return out


def _confusion_w(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return _group_sums(weights, y * k + pred, k * k).reshape(-1, k, k)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(values)
    count = valid.sum(axis=1)
    total = np.where(valid, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _auc_w(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B,) Mann-Whitney AUC of ``scores`` for ``positive`` under each weight row; ties 1/2."""
    _, groups = np.unique(scores, return_inverse=True)  # ascending score groups (ties share one)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    pos = _group_sums(weights * positive, groups, n_groups)
    neg = _group_sums(weights * ~positive, groups, n_groups)
    neg_below = np.cumsum(neg, axis=1) - neg
    u = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _safe_div(u, pos.sum(axis=1) * neg.sum(axis=1))


def _metrics_w(weights: np.ndarray, y: np.ndarray, proba: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Every metric for each weight row: scalars as (B,), per-class recall as (B, K)."""
    k = proba.shape[1]
    pred = proba.argmax(axis=1)
    cm = _confusion_w(weights, y, pred, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true_n = cm.sum(axis=2)
    pred_n = cm.sum(axis=1)
    total = true_n.sum(axis=1)
    recall = _safe_div(tp, true_n)
    present = (true_n + pred_n) > 0
    f1 = np.where(present, _safe_div(2 * tp, true_n + pred_n), np.nan)
    if k == 2:
        auc = _auc_w(weights, y == 1, proba[:, 1])
    else:
        auc = _nanmean_rows(np.stack([_auc_w(weights, y == c, proba[:, c]) for c in range(k)], axis=1))
    conf = proba.max(axis=1)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    correct = (pred == y).astype(np.float64)
    gap = _group_sums(weights * correct, bins, n_bins) - _group_sums(weights * conf, bins, n_bins)
    return {
        "accuracy": _safe_div(tp.sum(axis=1), total),
        "balanced_accuracy": _nanmean_rows(recall),
        "macro_auc": auc,
        "macro_f1": _nanmean_rows(f1),
        "ece": _safe_div(np.abs(gap).sum(axis=1), total),
        "per_class_recall": recall,
        "confusion_matrix": cm,
    }


def _check(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"proba must be (N, K) with N = len(y_true) = {y.shape[0]}, got {p.shape}.")
    if p.shape[1] < 2:
        raise ValueError("proba needs at least two classes.")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}].")
    return y, p


def _onehot_proba(y_pred: np.ndarray, k: int) -> np.ndarray:
    p = np.zeros((y_pred.shape[0], k))
    p[np.arange(y_pred.shape[0]), y_pred] = 1.0
    return p


def _labels(y_true: Any, y_pred: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    yt = np.asarray(y_true).reshape(-1).astype(np.int64)
    yp = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape[0]} vs {yp.shape[0]}.")
    k = num_classes if num_classes is not None else int(max(yt.max(initial=0), yp.max(initial=0))) + 1
    return yt, yp, max(k, 2)


# ---------------------------------------------------------------------------------------
# Public single-shot metrics
# ---------------------------------------------------------------------------------------


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    yt, yp, k = _labels(y_true, y_pred, num_classes)
    return np.bincount(yt * k + yp, minlength=k * k).reshape(k, k)


def accuracy(y_true: Any, y_pred: Any) -> float:
    yt, yp, _ = _labels(y_true, y_pred, None)
    return float(np.mean(yt == yp)) if yt.size else math.nan


def per_class_recall(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Recall per class (NaN for a class absent from y_true)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    return _safe_div(np.diag(cm), cm.sum(axis=1))


def balanced_accuracy(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in y_true."""
    recall = per_class_recall(y_true, y_pred, num_classes)
    return float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else math.nan


def macro_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Mean F1 over the classes present in y_true or y_pred."""
    yt, yp, k = _labels(y_true, y_pred, num_classes)
    m = _metrics_w(np.ones((1, yt.size)), yt, _onehot_proba(yp, k), 15)
    return float(m["macro_f1"][0])


def macro_auc(y_true: Any, proba: Any) -> float:
    """Binary: AUC of proba[:, 1]; multiclass: macro one-vs-rest AUC (see module doc)."""
    y, p = _check(y_true, proba)
    w = np.ones((1, y.size))
    if p.shape[1] == 2:
        return float(_auc_w(w, y == 1, p[:, 1])[0])
    aucs = np.stack([_auc_w(w, y == c, p[:, c]) for c in range(p.shape[1])], axis=1)
    return float(_nanmean_rows(aucs)[0])


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (lo, hi]."""
    y, p = _check(y_true, proba)
    return float(_metrics_w(np.ones((1, y.size)), y, p, n_bins)["ece"][0])


def bootstrap_weights(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) multiplicities of each sample in resamples drawn with replacement."""
    idx = rng.integers(0, n, size=(n_resamples, n))
    flat = idx + (np.arange(n_resamples)[:, None] * n)
    return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def reliability_bins(y: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """The reliability diagram behind the ECE: per confidence bin (the top-class probability
    in ``n_bins`` equal bins of (0, 1]) its sample count, mean confidence and accuracy
    (None for an empty bin)."""
    conf = proba.max(axis=1)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    confidence = np.bincount(bins, weights=conf, minlength=n_bins)
    correct = np.bincount(bins, weights=(proba.argmax(axis=1) == y).astype(np.float64), minlength=n_bins)
    mean = [None if n == 0 else float(v / n) for v, n in zip(confidence, count, strict=True)]
    accuracy = [None if n == 0 else float(v / n) for v, n in zip(correct, count, strict=True)]
    return {"count": [int(n) for n in count], "mean_confidence": mean, "accuracy": accuracy}


def compute_metrics(
    y_true: Any,
    proba: Any,
    num_classes: int | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    n_bins: int = 15,
) -> dict[str, Any]:
    """All metrics of a prediction, plus percentile bootstrap intervals when n_bootstrap > 0.

    Returns plain Python values: the scalars of ``SCALAR_METRICS``, ``n``,
    ``per_class_recall`` (list, NaN for absent classes), ``confusion_matrix`` (list of
    lists), ``reliability`` (``reliability_bins``), and ``ci`` = {metric: [low, high]} plus
    ``per_class_recall_ci``.
    """
    y, p = _check(y_true, proba)
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"proba has {p.shape[1]} columns but num_classes is {num_classes}.")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}.")
    if y.size == 0:
        raise ValueError("compute_metrics needs at least one sample.")
    point = _metrics_w(np.ones((1, y.size)), y, p, n_bins)
    out: dict[str, Any] = {"n": int(y.size)}
    for name in SCALAR_METRICS:
        out[name] = float(point[name][0])
    out["per_class_recall"] = [float(v) for v in point["per_class_recall"][0]]
    out["confusion_matrix"] = point["confusion_matrix"][0].round().astype(np.int64).tolist()
    out["reliability"] = reliability_bins(y, p, n_bins)
    predicted = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
    out["top_class_share"] = float(predicted.max() / y.size)
    out["constant_predictor"] = bool(out["top_class_share"] >= CONSTANT_SHARE)
    out["n_bootstrap"] = int(n_bootstrap)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws: dict[str, list[np.ndarray]] = {name: [] for name in (*SCALAR_METRICS, "per_class_recall")}
        for start in range(0, n_bootstrap, _CHUNK):
            w = bootstrap_weights(y.size, min(_CHUNK, n_bootstrap - start), rng)
            m = _metrics_w(w, y, p, n_bins)
            for name in draws:
                draws[name].append(m[name])
        q = [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]
        intervals: dict[str, list[float]] = {}
        for name in SCALAR_METRICS:
            values = np.concatenate(draws[name])
            intervals[name] = _percentiles(values, q)
        out["ci"] = intervals
        recalls = np.concatenate(draws["per_class_recall"], axis=0)
        out["per_class_recall_ci"] = [_percentiles(recalls[:, c], q) for c in range(recalls.shape[1])]
        out["ci_level"] = float(ci)
    return out


def majority_class_metrics(
    train_labels: Any, y_true: Any, num_classes: int, n_bootstrap: int = 0, seed: int = 0
) -> dict[str, Any]:
    """``compute_metrics`` of the majority-class baseline (see the module docstring).

    Every sample gets the training prior as its probabilities (add-one smoothed, so each
    class has some mass), so the prediction is the training majority and the scores tie.
    """
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64).reshape(-1), minlength=num_classes).astype(np.float64)
    prior = (counts + 1.0) / (counts.sum() + num_classes)
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    proba = np.tile(prior, (y.size, 1))
    return compute_metrics(y, proba, num_classes, n_bootstrap=n_bootstrap, seed=seed)


def _percentiles(values: np.ndarray, q: Sequence[float]) -> list[float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return [math.nan, math.nan]
    return [float(v) for v in np.percentile(finite, q)]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_proba(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None
) -> np.ndarray:
    """Softmax probabilities (N, K) as float64 numpy, in eval mode (restored afterwards).

    Runs where the model lives unless ``device`` is given (then the model is moved there
    and back); batches of ``x`` are copied to that device one at a time, so a CPU test
    set can be scored by a GPU model. float32 forward without autocast, so evaluation
    never depends on AMP settings.
    """
    first = next(model.parameters(), None)
    home = first.device if first is not None else x.device
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.to(dev).eval()
    try:
        chunks = [torch.softmax(model(x[i : i + batch_size].to(dev)).float(), dim=1) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(chunks).double().cpu().numpy()
    finally:
        model.to(home).train(was_training)


@torch.inference_mode()
def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy on resident tensors without leaving the device (per-round curves)."""
    if y.shape[0] == 0:
        return math.nan
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.int64, device=y.device)
        for i in range(0, x.shape[0], batch_size):
            correct += (model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum()
        return float(correct) / int(y.shape[0])
    finally:
        model.train(was_training)


def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    num_classes: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, Any]:
    """``compute_metrics`` of the model's predictions on (x, y); see that function."""
    proba = predict_proba(model, x, batch_size=batch_size)
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return compute_metrics(labels, proba, num_classes=num_classes, n_bootstrap=n_bootstrap, seed=seed)


def summarize_sites(per_client: Sequence[dict[str, Any]], site_key: str = "client_id") -> dict[str, Any]:
    """Mean, spread and worst site of every scalar metric over hospitals.

    The mean is unweighted (every hospital counts once: the fairness view; the pooled
    view is the global test set). "Worst" is the minimum, or the maximum for ECE, loss
    and error metrics; ``worst_site`` names the site (its ``site_key`` value, else its
    index). NaN sites (e.g. AUC of a single-class site) are ignored.
    """
    if not per_client:
        raise ValueError("summarize_sites needs at least one site.")
    names = [
        k
        for k, v in per_client[0].items()
        if k != site_key
        and k not in _NOT_METRICS
        and isinstance(v, (int, float, np.floating, np.integer))
        and not isinstance(v, bool)
    ]
    out: dict[str, Any] = {
        "num_sites": len(per_client),
        "num_constant_sites": sum(bool(site.get("constant_predictor", False)) for site in per_client),
        "sites_covered": {},
        "mean": {},
        "std": {},
        "worst": {},
        "worst_site": {},
    }
    for name in names:
        values = np.array([float(site.get(name, math.nan)) for site in per_client])
        ids = [site.get(site_key, i) for i, site in enumerate(per_client)]
        valid = ~np.isnan(values)
        out["sites_covered"][name] = int(valid.sum())
        if not valid.any():
            out["mean"][name] = out["std"][name] = out["worst"][name] = math.nan
            out["worst_site"][name] = None
            continue
        lower_better = any(tag in name for tag in _LOWER_IS_BETTER)
        masked = np.where(valid, values, -np.inf if lower_better else np.inf)
        worst = int(np.argmax(masked) if lower_better else np.argmin(masked))
        out["mean"][name] = float(values[valid].mean())
        out["std"][name] = float(values[valid].std())
        out["worst"][name] = float(values[worst])
        out["worst_site"][name] = ids[worst]
    return out

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
  synthetic images only, tested on each reference's real images of every device it has
  (the test set's held-out device: the unseen-device accuracy), with per-class recall;
  beside it the same student recipe trained on the real pooled training data.

Which sets are compared (the reference scale): the real side is a held-out set of class c
rendered by device d. Two references, each reported on its own: ``validation`` (the
hospitals' local validation splits pooled per device; the held-out device has none) is
the one to choose generators and sampling settings on, ``test`` (the global test set
rendered by every device, the held-out one included) the final report, looked at once.
The synthetic set of a cell has as many images as the real training data of that cell
(capped at ``max_per_cell``), drawn from the generator. The same metrics between the real
TRAIN data of the cell and the same reference images are reported beside, as the floor a
perfect generator would reach with that sample size (FD and MMD are biased by sample
size, so only same-size comparisons are meaningful). MMD and k-NN metrics use at most
``max_metric_samples`` points per side (seeded subsample), FD uses all. Pooled scopes
(per class, per device, overall) take the same number of images from both sides of every
cell, so their mixtures over cells match. ``QualityRuler`` computes everything that does
not depend on the generator once.
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
from .distances import SUBSAMPLE_STREAM, distribution_metrics
from .generator import ConditionalSampler, images_to_uint8

__all__ = [
    "QualityConfig",
    "QualityRuler",
    "extract_features",
    "recalibrate_batchnorm",
    "train_classifier",
]

logger = logging.getLogger(__name__)

#: Random-stream tags of the quality step (synthetic draws, model training; the metric
#: subsamples use distances.SUBSAMPLE_STREAM).
#: Both CAS students (synthetic-trained and real-trained) use the _CAS stream: same initial
#: weights and batch-order stream, so only the training images differ.
_SYNTH_DRAW, _ENCODER, _CAS = 32, 33, 34


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
# Models of the evaluation (encoder, CAS students)
# ---------------------------------------------------------------------------------------


def _student_cnn(x: torch.Tensor, num_outputs: int, config: QualityConfig, seed: int) -> nn.Module:
    """The untrained evaluation CNN for images like ``x`` (NHWC weights)."""
    spec = DataSpec(in_channels=int(x.shape[1]), num_classes=int(num_outputs), image_size=int(x.shape[-1]))
    return build_model("student_cnn", spec, seed=seed, channels_last=True, **config.model_options)


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_outputs: int, config: QualityConfig, seed: int, epochs: int
) -> nn.Module:
    """A student CNN trained from scratch on (x, y) with SGD; deterministic for the seed (CPU).
    Its weights are NHWC (``channels_last``, as in federated training): 1.4x faster on the CPU."""
    if int(y.shape[0]) < 2:
        raise ConfigurationError(f"Cannot train a quality classifier on {int(y.shape[0])} images.")
    model = _student_cnn(x, num_outputs, config, seed)
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


#: Images by device: ``{device: (images float (N,C,H,W) in [0,1], labels (N,))}``.
Rendered = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _CellDraw:
    """Which real rows one (class, device) cell compares against one reference: the
    training rows (capped at max_per_cell), the reference rows, and the equal-size subsets
    the pooled scopes take from each side."""

    class_id: int
    device: int
    train_rows: np.ndarray
    reference_rows: np.ndarray
    pooled_train: np.ndarray  # indices into train_rows
    pooled_reference: np.ndarray  # indices into reference_rows


class QualityRuler:
    """The half of the evaluation that does not depend on the generator, fitted once.

    The reference encoder, the real features (training data and every reference set), the
    real-trained CAS student and its accuracies, the real-train-vs-reference metrics (the
    floor a perfect generator would reach) and every subsample are computed here; ``score``
    then only samples the generator's mirror of the training data, embeds it and compares.
    So comparing several generators, or one generator at several sampling settings, on one
    partition pays for the encoder and the real side once (``benchmarks.sampler_settings``).

    ``references`` names the held-out real sets, e.g. ``{"validation": ..., "test": ...}``:
    each maps a device to that device's images and labels. A reference may lack devices
    (the hospitals' validation splits have no image of the held-out device).

    ``fitted`` is the ``fitted_state()`` of an earlier ruler built on the same inputs (a
    cache across runs): the trained parts are restored instead of refitted, and ``score``
    gives the same numbers bit for bit. Whether the inputs are the same is the caller's
    key to keep; only the shapes are checked here.
    """

    def __init__(
        self,
        real_train: tuple[torch.Tensor, np.ndarray, np.ndarray],
        references: Mapping[str, Rendered],
        num_classes: int,
        num_devices: int,
        held_out_device: int | None,
        config: QualityConfig,
        seed: int,
        fitted: Mapping[str, Any] | None = None,
    ) -> None:
        x_train, c_train, d_train = real_train
        c_train, d_train = np.asarray(c_train, dtype=np.int64), np.asarray(d_train, dtype=np.int64)
        if x_train.shape[0] != c_train.size or c_train.size != d_train.size:
            raise ConfigurationError("QualityRuler: real_train images, classes and devices differ in length.")
        if held_out_device is not None and (d_train == held_out_device).any():
            raise ConfigurationError("QualityRuler: the real training data contains the held-out device.")
        if not references:
            raise ConfigurationError("QualityRuler: no real reference set to compare with.")
        self.classes, self.devices, self.references = c_train, d_train, references
        self.num_classes, self.num_devices, self.held_out_device = num_classes, num_devices, held_out_device
        self.config, self.seed = config, int(seed)

        self.draws = self._draw_cells()
        if fitted is not None:
            self._restore(fitted, x_train)
            return
        joint = torch.from_numpy(c_train * num_devices + d_train)
        self.encoder = train_classifier(x_train, joint, num_classes * num_devices, config, seed=derive_seed(seed, _ENCODER), epochs=config.encoder_epochs)
        self.f_train = extract_features(self.encoder, x_train)
        self.f_reference = {name: {d: extract_features(self.encoder, x) for d, (x, _) in ref.items()} for name, ref in references.items()}
        self.encoder_accuracy = {name: self._encoder_accuracy(ref) for name, ref in references.items()}
        real_model = train_classifier(x_train, torch.from_numpy(c_train), num_classes, config, seed=derive_seed(seed, _CAS), epochs=config.classifier_epochs)
        self.real_cas = {name: _accuracy_block(real_model, ref, num_classes) for name, ref in references.items()}
        self.real_metrics = {name: self._compare(name, self.f_train) for name in references}

    def fitted_state(self) -> dict[str, Any]:
        """The trained, generator-independent parts (tensors and plain values only, so
        ``torch.load(weights_only=True)`` reads them back): the encoder's weights, the real
        features, the real-trained CAS accuracies and the real-side metrics. The subsample
        draws are not kept: they are recomputed from the seed in microseconds."""
        return {
            "encoder": {k: v.detach().clone() for k, v in self.encoder.state_dict().items()},
            "f_train": torch.from_numpy(self.f_train),
            "f_reference": {name: {d: torch.from_numpy(f) for d, f in by.items()} for name, by in self.f_reference.items()},
            "encoder_accuracy": self.encoder_accuracy,
            "real_cas": self.real_cas,
            "real_metrics": self.real_metrics,
        }

    def _restore(self, fitted: Mapping[str, Any], x_train: torch.Tensor) -> None:
        if set(fitted.get("f_reference", {})) != set(self.references) or int(fitted["f_train"].shape[0]) != int(x_train.shape[0]):
            raise ConfigurationError("QualityRuler: the fitted state was built on other references or another training set.")
        self.encoder = _student_cnn(x_train, self.num_classes * self.num_devices, self.config, derive_seed(self.seed, _ENCODER))
        self.encoder.load_state_dict(fitted["encoder"])
        self.encoder.eval()
        self.f_train = fitted["f_train"].numpy()
        self.f_reference = {name: {int(d): f.numpy() for d, f in by.items()} for name, by in fitted["f_reference"].items()}
        self.encoder_accuracy = fitted["encoder_accuracy"]
        self.real_cas = fitted["real_cas"]
        self.real_metrics = fitted["real_metrics"]

    def _encoder_accuracy(self, reference: Rendered) -> dict[str, dict[int, float]]:
        joint, device = {}, {}
        for d, (x, y) in sorted(reference.items()):
            if d == self.held_out_device:
                continue
            pred = _predict(self.encoder, x)
            joint[d] = float(np.mean(pred == (y.numpy() * self.num_devices + d)))
            device[d] = float(np.mean(pred % self.num_devices == d))
        return {"joint_by_device": joint, "device_by_device": device}

    def _draw_cells(self) -> dict[str, list[dict[str, Any]]]:
        """Per reference, one entry per seen (class, device): a _CellDraw or the reason it is skipped.

        The training-row cap is drawn once per cell, so every reference compares the same
        synthetic images; the draws come in a fixed order from one seeded stream."""
        rng = np.random.default_rng([self.seed, SUBSAMPLE_STREAM, 1])
        config, out = self.config, {name: [] for name in self.references}
        for d in range(self.num_devices):
            if d == self.held_out_device:
                continue
            for c in range(self.num_classes):
                rows = np.flatnonzero((self.classes == c) & (self.devices == d))
                if rows.size > config.max_per_cell:
                    rows = np.sort(rng.choice(rows, size=config.max_per_cell, replace=False))
                for name, ref in self.references.items():
                    ref_rows = np.flatnonzero(ref[d][1].numpy() == c) if d in ref else np.zeros(0, dtype=np.int64)
                    entry: dict[str, Any] = {"class_id": c, "device": d, "n_real_train": int(rows.size), "n_reference": int(ref_rows.size)}
                    if rows.size < config.min_per_cell or ref_rows.size < config.min_per_cell:
                        entry["skipped"] = f"fewer than min_per_cell={config.min_per_cell} real train or {name} images"
                    else:
                        m = min(rows.size, ref_rows.size)
                        keep_tr = np.sort(rng.choice(rows.size, size=m, replace=False))
                        keep_ref = np.sort(rng.choice(ref_rows.size, size=m, replace=False))
                        entry["draw"] = _CellDraw(c, d, rows, ref_rows, keep_tr, keep_ref)
                    out[name].append(entry)
        return out

    def _compare(self, name: str, features: np.ndarray) -> dict[str, Any]:
        """Distribution metrics of ``features`` (rows aligned with the training data: the
        real training features, or the synthetic mirror's) against reference ``name``, per
        cell and pooled; pooled scopes take as many images from both sides of every cell,
        so their mixtures over cells match."""
        config, seed = self.config, self.seed
        cells: list[dict[str, Any]] = []
        groups: dict[tuple[str, int], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for entry in self.draws[name]:
            draw = entry.get("draw")
            public = {k: v for k, v in entry.items() if k != "draw"}
            if draw is None:
                cells.append(public)
                continue
            ours, ref = features[draw.train_rows], self.f_reference[name][draw.device][draw.reference_rows]
            cells.append({**public, "metrics": distribution_metrics(ref, ours, config.knn_k, config.max_metric_samples, seed)})
            for key in (("class", draw.class_id), ("device", draw.device), ("overall", 0)):
                mine, theirs = groups.setdefault(key, ([], []))
                mine.append(ours[draw.pooled_train]), theirs.append(ref[draw.pooled_reference])

        def pooled(kind: str) -> list[dict[str, Any]]:
            label = {"class": "class_id", "device": "device", "overall": "scope"}[kind]
            return [
                {label: ident if kind != "overall" else "all",
                 "metrics": distribution_metrics(np.concatenate(theirs), np.concatenate(mine), config.knn_k, config.max_metric_samples, seed)}
                for (k, ident), (mine, theirs) in sorted(groups.items()) if k == kind
            ]  # fmt: skip

        return {"cells": cells, "by_class": pooled("class"), "by_device": pooled("device"), "overall": (pooled("overall") or [None])[0]}

    def score(self, generator_model: ConditionalSampler, layout_ndim: int = 3, temperature: float | None = None) -> dict[str, Any]:
        """Every quality number of the module docstring for one generator, JSON-ready
        (device ids as ints), with a ``summary`` of the headline numbers per reference.
        ``temperature`` overrides the config's sampling temperature."""
        config = self.config
        temperature = config.temperature if temperature is None else float(temperature)
        x_syn = _synthetic_mirror(generator_model, self.classes, self.devices, self.seed, temperature, layout_ndim)
        f_syn = extract_features(self.encoder, x_syn)
        synthetic = {name: self._compare(name, f_syn) for name in self.references}
        cas_model = train_classifier(x_syn, torch.from_numpy(self.classes), self.num_classes, config, seed=derive_seed(self.seed, _CAS), epochs=config.classifier_epochs)
        references = {}
        for name, ref in self.references.items():
            distribution = _merge_sides(synthetic[name], self.real_metrics[name])
            cas = {
                "train_size": int(self.classes.size),
                "trained_on_synthetic": _accuracy_block(cas_model, ref, self.num_classes),
                "trained_on_real": self.real_cas[name],
                "held_out_device": self.held_out_device,
            }
            for key in ("trained_on_synthetic", "trained_on_real"):
                seen = [v["accuracy"] for d, v in cas[key].items() if d != self.held_out_device and v["accuracy"] is not None]
                cas[f"{key}_mean_seen_devices"] = float(np.mean(seen)) if seen else None
                if self.held_out_device is not None and self.held_out_device in cas[key]:
                    cas[f"{key}_held_out_device"] = cas[key][self.held_out_device]["accuracy"]
            references[name] = {"distribution": distribution, "cas": cas}
        summary = {name: _headline(block) for name, block in references.items()}
        for name, s in summary.items():
            logger.info("quality vs %s: FD %.3f (real-train %.3f), recall@3 %s, CAS seen %s vs real %s", name,
                        s["fd"] if s["fd"] is not None else float("nan"), s["fd_real_train"] if s["fd_real_train"] is not None else float("nan"),
                        s["recall_k3"], s["cas_seen"], s["cas_real_seen"])  # fmt: skip
        return {
            "config": config.as_dict(),
            "seed": self.seed,
            "encoder": {
                "architecture": "student_cnn",
                "model_options": config.as_dict()["model_options"],
                "target": "joint label class * num_devices + device",
                "trained_on": "real pooled training data of the partition (evaluation only)",
                "feature_dim": int(self.f_train.shape[1]),
                "accuracy": self.encoder_accuracy,
            },
            "references": references,
            "summary": summary,
        }


def _merge_sides(synthetic: Mapping[str, Any], real: Mapping[str, Any]) -> dict[str, Any]:
    """One distribution block whose entries hold ``synthetic`` and ``real_train`` metrics side by side."""

    def merge(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if a is None:
            return None
        out = {k: v for k, v in a.items() if k != "metrics"}
        if "metrics" in a:
            out["synthetic"], out["real_train"] = a["metrics"], b["metrics"]
        return out

    return {
        "cells": [merge(a, b) for a, b in zip(synthetic["cells"], real["cells"], strict=True)],
        "by_class": [merge(a, b) for a, b in zip(synthetic["by_class"], real["by_class"], strict=True)],
        "by_device": [merge(a, b) for a, b in zip(synthetic["by_device"], real["by_device"], strict=True)],
        "overall": merge(synthetic["overall"], real["overall"]),
    }


def _headline(block: Mapping[str, Any]) -> dict[str, Any]:
    """Overall FD (and its ratio to the real-train floor), k-NN P/R at k=3, CAS over real."""
    overall, cas = block["distribution"]["overall"] or {}, block["cas"]
    syn, ref = overall.get("synthetic") or {}, overall.get("real_train") or {}
    fd, fd_ref = syn.get("fd"), ref.get("fd")
    seen, real_seen = cas["trained_on_synthetic_mean_seen_devices"], cas["trained_on_real_mean_seen_devices"]
    return {
        "fd": fd,
        "fd_real_train": fd_ref,
        "fd_ratio": fd / fd_ref if fd is not None and fd_ref else None,
        "precision_k3": syn.get("precision_k3"),
        "recall_k3": syn.get("recall_k3"),
        "cas_seen": seen,
        "cas_real_seen": real_seen,
        "cas_ratio": seen / real_seen if seen is not None and real_seen else None,
        "cas_held_out": cas.get("trained_on_synthetic_held_out_device"),
        "cas_real_held_out": cas.get("trained_on_real_held_out_device"),
    }

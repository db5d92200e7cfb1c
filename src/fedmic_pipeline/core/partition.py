"""Label-skewed federated partitions: Dirichlet(lambda) over classes, then local splits.

The non-IID setting of FedMIC and FedSSG (methods.md section 4). The official MedMNIST
test split is never partitioned; the *pool* is the official train split followed by the
official val split, and a pool position ("origin" p) names every image for the rest of
the pipeline. Each class's pool members are shuffled and cut among K clients by
proportions p ~ Dir(lambda * 1_K): the smaller lambda, the more each client is dominated
by few classes.

Why redraws are bounded: a client can receive almost nothing when lambda is small, so the
draw is repeated while any client has fewer than `min_samples` images. A public
implementation does this in an unbounded loop that never ends at 500 clients; here the
number of redraws is capped and the error reports the best draw reached and which
parameter to change. Redraws only re-sample the K-vector of proportions per class (the
sizes follow from them alone); the class shuffles are drawn once a draw is accepted, so
even the 10,000 redraws that lambda = 0.1 can need on a 2-class dataset cost well under a
second.

Determinism: everything is drawn from the `numpy.random.Generator` passed in, classes are
visited in ascending label order, and returned index arrays are sorted, so the same seed
and parameters give the same partition on every machine and thread count.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

# When a class has fewer images than there are splits, they go to the splits in this
# order (a client must train on what it has; a test image beats a val image for the
# hospital's own evaluation).
_SMALL_CLASS_PRIORITY: tuple[str, str, str] = ("train", "test", "val")


class PartitionError(ValueError):
    """The requested partition cannot be drawn; the message names the parameter to change."""


@dataclass(frozen=True)
class DirichletDraw:
    """An accepted Dirichlet partition and how many draws it took.

    `client_indices[k]` holds sorted positions into the labels array given to the draw.
    `attempts` counts every draw including the accepted one (1 = first draw accepted).
    """

    client_indices: list[np.ndarray]
    attempts: int


def _validate_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array of class ids, got shape {array.shape}; flatten (N, 1) labels first.")
    if array.size == 0:
        raise PartitionError("labels is empty: there is nothing to partition; check the ingested dataset.")
    if not np.issubdtype(array.dtype, np.integer):
        raise PartitionError(f"labels must be integers, got dtype {array.dtype}.")
    if array.min() < 0:
        raise PartitionError(f"labels must be non-negative class ids, found {int(array.min())}.")
    return array.astype(np.int64, copy=False)


def _cut_sizes(proportions: np.ndarray, n: int) -> np.ndarray:
    """Client sizes from cutting n shuffled items at the cumulative proportions."""
    cuts = (np.cumsum(proportions) * n).astype(np.int64)[:-1]
    cuts = np.clip(cuts, 0, n)
    bounds = np.concatenate(([0], cuts, [n]))
    return np.diff(bounds)


def dirichlet_label_partition(
    labels: np.ndarray,
    num_clients: int,
    lam: float,
    min_samples: int,
    max_redraws: int,
    rng: np.random.Generator,
) -> DirichletDraw:
    """Split the positions of `labels` among `num_clients` by label Dirichlet(lam).

    For each class c (ascending), draw p_c ~ Dir(lam * 1_K); client k receives the slice
    [floor(P_{k-1} n_c), floor(P_k n_c)) of that class's shuffled members, where P is the
    cumulative sum of p_c. The whole draw (all classes) is repeated while any client has
    fewer than `min_samples` items, at most `max_redraws` times after the first draw.
    Every position goes to exactly one client.

    Raises:
        PartitionError: invalid parameters, or no acceptable draw within the bound.
    """
    y = _validate_labels(labels)
    n_total = int(y.size)
    if int(num_clients) != num_clients or num_clients < 1:
        raise PartitionError(f"num_clients must be an integer >= 1, got {num_clients!r}.")
    num_clients = int(num_clients)
    if not np.isfinite(lam) or lam <= 0:
        raise PartitionError(f"dirichlet_lambda must be a finite number > 0, got {lam!r} (the papers use 0.1, 0.3, 0.5).")
    if int(min_samples) != min_samples or min_samples < 0:
        raise PartitionError(f"min_samples_per_client must be an integer >= 0, got {min_samples!r}.")
    min_samples = int(min_samples)
    if int(max_redraws) != max_redraws or max_redraws < 0:
        raise PartitionError(f"max_redraws must be an integer >= 0, got {max_redraws!r}.")
    max_redraws = int(max_redraws)
    if num_clients * min_samples > n_total:
        raise PartitionError(
            f"{num_clients} clients x min_samples_per_client={min_samples} = {num_clients * min_samples} "
            f"exceeds the {n_total} images in the pool; lower num_clients or min_samples_per_client."
        )

    classes = np.unique(y)  # ascending: the order draws are made in
    members = [np.flatnonzero(y == c) for c in classes]
    class_sizes = [int(m.size) for m in members]
    alpha = np.full(num_clients, float(lam))

    best_min = -1
    accepted: list[np.ndarray] | None = None
    attempts = 0
    for attempts in range(1, max_redraws + 2):
        proportions = [rng.dirichlet(alpha) for _ in classes]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for p, n_c in zip(proportions, class_sizes):
            sizes += _cut_sizes(p, n_c)
        smallest = int(sizes.min())
        best_min = max(best_min, smallest)
        if smallest >= min_samples:
            accepted = proportions
            break

    if accepted is None:
        raise PartitionError(
            f"No Dirichlet draw gave all {num_clients} clients at least {min_samples} images in "
            f"{max_redraws + 1} draws (dirichlet_lambda={lam}, pool of {n_total} images, class sizes "
            f"{class_sizes}); the best draw's smallest client had {best_min} images. "
            "Lower num_clients or min_samples_per_client, raise dirichlet_lambda (less skew), "
            "or raise max_redraws."
        )

    per_client: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for p, idx in zip(accepted, members):
        shuffled = idx[rng.permutation(idx.size)]
        bounds = np.concatenate(([0], np.cumsum(_cut_sizes(p, idx.size))))
        for k in range(num_clients):
            per_client[k].append(shuffled[bounds[k] : bounds[k + 1]])
    client_indices = [np.sort(np.concatenate(parts)).astype(np.int64, copy=False) for parts in per_client]
    logger.info(
        "Dirichlet(lambda=%s) partition of %d images into %d clients accepted after %d draw(s); sizes %s",
        lam, n_total, num_clients, attempts, [int(c.size) for c in client_indices],
    )
    return DirichletDraw(client_indices=client_indices, attempts=attempts)


def _normalise_fractions(fractions: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    if isinstance(fractions, Mapping):
        unknown = sorted(set(fractions) - set(SPLIT_NAMES))
        missing = [name for name in SPLIT_NAMES if name not in fractions]
        if unknown or missing:
            raise PartitionError(
                f"local_split must have exactly the keys {list(SPLIT_NAMES)}; missing {missing}, unknown {unknown}."
            )
        values = [fractions[name] for name in SPLIT_NAMES]
    else:
        values = list(fractions)
        if len(values) != 3:
            raise PartitionError(f"local_split needs 3 fractions (train, val, test), got {len(values)}.")
    f = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise PartitionError(f"local_split fractions must be finite and >= 0, got {values}.")
    if f[0] <= 0:
        raise PartitionError("local_split.train must be > 0: every client needs training data.")
    if abs(float(f.sum()) - 1.0) > 1e-6:
        raise PartitionError(f"local_split fractions must sum to 1, got {values} (sum {float(f.sum()):.6f}).")
    return f / f.sum()


def local_split_counts(n: int, fractions: Mapping[str, float] | Sequence[float]) -> dict[str, int]:
    """How many of a class's n images go to train / val / test.

    The rule (deterministic, documented for the manifest readers):
    1. largest-remainder rounding of n * fraction (ties go to the earlier split,
       train before val before test), so the counts sum to n;
    2. if n is at least the number of splits with a positive fraction, every such split
       gets at least one image, taken from the currently largest split;
    3. otherwise (n = 1 or 2) the images go one each to train, then test, then val.
    """
    f = _normalise_fractions(fractions)
    n = int(n)
    if n < 0:
        raise PartitionError(f"a class count cannot be negative, got {n}.")
    positive = [i for i in range(3) if f[i] > 0]
    counts = np.zeros(3, dtype=np.int64)
    if n < len(positive):
        order = [SPLIT_NAMES.index(name) for name in _SMALL_CLASS_PRIORITY if f[SPLIT_NAMES.index(name)] > 0]
        for i in order[:n]:
            counts[i] = 1
    else:
        exact = f * n
        counts = np.floor(exact).astype(np.int64)
        remainder = exact - counts
        short = n - int(counts.sum())
        # stable sort on the negated remainder: ties keep split order
        for i in np.argsort(-remainder, kind="stable")[:short]:
            counts[i] += 1
        for i in positive:
            if counts[i] == 0:
                donor = int(np.argmax(counts))  # first largest
                counts[donor] -= 1
                counts[i] += 1
    return {name: int(counts[i]) for i, name in enumerate(SPLIT_NAMES)}


def split_local(
    indices: np.ndarray,
    labels: np.ndarray,
    fractions: Mapping[str, float] | Sequence[float],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Split one client's pool positions into local train / val / test, stratified by class.

    `labels` is indexed by pool position (the full pool labels). Each class of the client
    (ascending) is shuffled with `rng` and cut by `local_split_counts`, so every class with
    at least 3 images (and positive fractions) appears in each split. Returned arrays are
    sorted pool positions; together they are exactly `indices`.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise PartitionError(f"indices must be 1-D, got shape {idx.shape}.")
    y = np.asarray(labels)
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise PartitionError(f"indices must lie in [0, {y.size}); got range [{int(idx.min())}, {int(idx.max())}].")
    if np.unique(idx).size != idx.size:
        raise PartitionError("indices contain duplicates: a pool image cannot be placed twice.")
    _normalise_fractions(fractions)
    ordered = np.sort(idx)
    client_labels = y[ordered]
    out: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for c in np.unique(client_labels):
        members = ordered[client_labels == c]
        shuffled = members[rng.permutation(members.size)]
        counts = local_split_counts(members.size, fractions)
        start = 0
        for name in SPLIT_NAMES:
            out[name].append(shuffled[start : start + counts[name]])
            start += counts[name]
    return {
        name: (np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)).astype(np.int64, copy=False)
        for name, parts in out.items()
    }


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (nats) of a label multiset; 0 for an empty or single-class set."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def mean_label_entropy(client_indices: Sequence[np.ndarray], labels: np.ndarray, num_classes: int | None = None) -> float:
    """Mean over clients of each client's label entropy (nats): lower = more label skew.

    An IID split has about the pool's entropy at every client; a strongly skewed one
    approaches 0. Used by the tests (smaller lambda, lower entropy) and the manifest.
    """
    y = np.asarray(labels, dtype=np.int64)
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if len(client_indices) == 0:
        raise PartitionError("mean_label_entropy needs at least one client.")
    values = np.array([label_entropy(y[np.asarray(ix, dtype=np.int64)], k) for ix in client_indices])
    return float(values.mean())


# ---- the whole plan: configuration, Dirichlet draw, local splits -----------------------

# Random streams, one per purpose, so that changing one step never shifts another's draws:
# numpy.random.default_rng([seed, stream, ...]) seeds a SeedSequence from these integers.
DIRICHLET_STREAM = 0
LOCAL_SPLIT_STREAM = 1


@dataclass(frozen=True)
class PartitionConfig:
    """The `partition` parameters, validated (unknown keys are rejected as typos)."""

    seed: int
    num_clients: int
    dirichlet_lambda: float
    min_samples_per_client: int
    max_redraws: int
    local_split: dict[str, float]

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> PartitionConfig:
        required = ("seed", "num_clients", "dirichlet_lambda", "min_samples_per_client", "max_redraws", "local_split")
        missing = [k for k in required if k not in params]
        unknown = sorted(set(params) - set(required))
        if missing or unknown:
            raise PartitionError(f"partition parameters: missing {missing}, unknown {unknown}; expected exactly {list(required)}.")
        local = params["local_split"]
        if not isinstance(local, Mapping):
            raise PartitionError("partition.local_split must be a mapping {train: f, val: f, test: f}.")
        for name, value in local.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= 1:
                raise PartitionError(f"partition.local_split.{name} must be a fraction in [0, 1], got {value!r}.")
        fractions = {name: float(v) for name, v in local.items()}
        _normalise_fractions(fractions)
        lowest = {"seed": 0, "num_clients": 1, "min_samples_per_client": 0, "max_redraws": 0}
        for key, minimum in lowest.items():
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise PartitionError(f"partition.{key} must be an integer >= {minimum}, got {value!r}.")
        lam = params["dirichlet_lambda"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.number)) or not np.isfinite(lam) or lam <= 0:
            raise PartitionError(
                f"partition.dirichlet_lambda must be a finite number > 0, got {lam!r} (the papers use 0.1, 0.3, 0.5)."
            )
        return cls(
            seed=int(params["seed"]),
            num_clients=int(params["num_clients"]),
            dirichlet_lambda=float(params["dirichlet_lambda"]),
            min_samples_per_client=int(params["min_samples_per_client"]),
            max_redraws=int(params["max_redraws"]),
            local_split={name: fractions[name] for name in SPLIT_NAMES},
        )


@dataclass(frozen=True)
class PartitionPlan:
    """Who holds which pool image, in which local split, with which device (indices only).

    `client_splits[k][split]` are sorted pool positions; `client_devices[k]` is a device
    id (position in the device profile list). The plan holds no images, so it can be
    validated by the data gate before any array is rendered or written.
    """

    pool_labels: np.ndarray
    client_splits: list[dict[str, np.ndarray]]
    client_devices: np.ndarray
    attempts: int

    @property
    def num_clients(self) -> int:
        return len(self.client_splits)

    def client_indices(self, k: int) -> np.ndarray:
        return np.sort(np.concatenate([self.client_splits[k][name] for name in SPLIT_NAMES]))

    def placement(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origin, client, local split name) for every placed pool image, ordered by origin."""
        origins, clients, splits = [], [], []
        for k, parts in enumerate(self.client_splits):
            for name in SPLIT_NAMES:
                origins.append(parts[name])
                clients.append(np.full(parts[name].size, k, dtype=np.int64))
                splits.append(np.full(parts[name].size, name))
        origin = np.concatenate(origins)
        order = np.argsort(origin, kind="stable")
        return origin[order], np.concatenate(clients)[order], np.concatenate(splits)[order]


def plan_partition(pool_labels: np.ndarray, config: PartitionConfig, client_devices: np.ndarray) -> PartitionPlan:
    """Dirichlet draw over the pool, then each client's stratified local split.

    Streams: Dirichlet from default_rng([seed, 0]); client k's local split from
    default_rng([seed, 1, k]), so a client's split depends only on its own images.
    """
    labels = _validate_labels(pool_labels)
    devices = np.asarray(client_devices, dtype=np.int64)
    if devices.shape != (config.num_clients,):
        raise PartitionError(f"need one device per client: got {devices.shape[0] if devices.ndim else 0} for {config.num_clients} clients.")
    draw = dirichlet_label_partition(
        labels,
        config.num_clients,
        config.dirichlet_lambda,
        config.min_samples_per_client,
        config.max_redraws,
        np.random.default_rng([config.seed, DIRICHLET_STREAM]),
    )
    splits = [
        split_local(ix, labels, config.local_split, np.random.default_rng([config.seed, LOCAL_SPLIT_STREAM, k]))
        for k, ix in enumerate(draw.client_indices)
    ]
    return PartitionPlan(pool_labels=labels, client_splits=splits, client_devices=devices, attempts=draw.attempts)

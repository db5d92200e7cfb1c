"""Dirichlet label partition and local splits: properties, determinism, skew, bounded redraws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from fedmic_pipeline.core.partition import (
    SPLIT_NAMES,
    PartitionConfig,
    PartitionError,
    dirichlet_label_partition,
    label_entropy,
    local_split_counts,
    mean_label_entropy,
    plan_partition,
    split_local,
)


@st.composite
def partition_problems(draw):
    """Random label vectors, client counts and minimum sizes (mostly feasible ones)."""
    n_classes = draw(st.integers(1, 6))
    n = draw(st.integers(20, 400))
    weights = draw(st.lists(st.floats(0.05, 1.0), min_size=n_classes, max_size=n_classes))
    seed = draw(st.integers(0, 2**31 - 1))
    p = np.asarray(weights) / np.sum(weights)
    labels = np.random.default_rng(seed).choice(n_classes, size=n, p=p).astype(np.int64)
    num_clients = draw(st.integers(1, 8))
    min_samples = draw(st.integers(0, 2))
    lam = draw(st.sampled_from([0.1, 0.3, 0.5, 1.0, 5.0]))
    return labels, num_clients, lam, min_samples, seed


def _accepted_split(labels, k, lam, min_samples, seed):
    """The draw, or a rejected example where no draw within the bound is acceptable (a few
    images under strong skew): that error path has its own test below."""
    try:
        return dirichlet_label_partition(labels, k, lam, min_samples, 5000, np.random.default_rng(seed)).client_indices
    except PartitionError as exc:
        if "No Dirichlet draw" not in str(exc):
            raise
        reject()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(partition_problems())
def test_partition_is_disjoint_complete_and_respects_minimum(problem):
    labels, k, lam, min_samples, seed = problem
    parts = _accepted_split(labels, k, lam, min_samples, seed)
    assert len(parts) == k
    joined = np.concatenate(parts)
    assert joined.size == labels.size  # complete and, with the next line, disjoint
    assert np.array_equal(np.sort(joined), np.arange(labels.size))
    for part in parts:
        assert part.dtype == np.int64
        assert part.size >= min_samples
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates


@settings(max_examples=25, deadline=None, derandomize=True)
@given(partition_problems())
def test_partition_is_deterministic_for_a_seed(problem):
    labels, k, lam, min_samples, seed = problem
    a = _accepted_split(labels, k, lam, min_samples, seed)
    b = _accepted_split(labels, k, lam, min_samples, seed)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_different_seeds_give_different_partitions():
    labels = np.repeat(np.arange(3), 200)
    draws = [dirichlet_label_partition(labels, 5, 0.5, 10, 1000, np.random.default_rng(s)).client_indices for s in range(5)]
    signatures = {tuple(np.concatenate([np.full(p.size, k) for k, p in enumerate(d)])[np.argsort(np.concatenate(d))]) for d in draws}
    assert len(signatures) == 5


def test_smaller_lambda_gives_lower_mean_label_entropy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=3000)

    def averaged(lam: float) -> float:
        return float(np.mean([
            mean_label_entropy(dirichlet_label_partition(labels, 10, lam, 0, 0, np.random.default_rng(seed)).client_indices, labels, 5)
            for seed in range(20)
        ]))

    h01, h03, h10, h100 = averaged(0.1), averaged(0.3), averaged(1.0), averaged(100.0)
    assert h01 < h03 < h10 < h100
    assert h100 == pytest.approx(label_entropy(labels, 5), abs=0.05)  # near-IID at large lambda


def test_bounded_redraws_raise_a_clear_error():
    labels = np.repeat([0, 1], [30, 970])
    with pytest.raises(PartitionError) as info:
        dirichlet_label_partition(labels, 20, 0.05, 45, 25, np.random.default_rng(0)).client_indices
    message = str(info.value)
    assert "26 draws" in message and "smallest client had" in message
    for hint in ("num_clients", "min_samples_per_client", "dirichlet_lambda", "max_redraws"):
        assert hint in message
    assert issubclass(PartitionError, ValueError)


def test_attempts_are_counted_and_redraws_are_used():
    labels = np.repeat([0, 1], [1349, 3883])  # PneumoniaMNIST's train+val class sizes
    draw = dirichlet_label_partition(labels, 10, 0.1, 40, 10000, np.random.default_rng(42))
    assert draw.attempts > 1
    assert min(p.size for p in draw.client_indices) >= 40


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"lam": 0.0}, "dirichlet_lambda"),
        ({"lam": float("nan")}, "dirichlet_lambda"),
        ({"min_samples": -1}, "min_samples_per_client"),
        ({"max_redraws": -1}, "max_redraws"),
        ({"num_clients": 11, "min_samples": 10}, "exceeds the 100 images"),
    ],
)
def test_invalid_inputs_fail_early(kwargs, needle):
    args = {"num_clients": 2, "lam": 0.5, "min_samples": 1, "max_redraws": 10} | kwargs
    with pytest.raises(PartitionError, match=needle):
        dirichlet_label_partition(np.arange(100) % 2, rng=np.random.default_rng(0), **args).client_indices


def test_labels_must_be_flat_integers():
    with pytest.raises(PartitionError, match="1-D"):
        dirichlet_label_partition(np.zeros((10, 1), dtype=np.int64), 2, 0.5, 0, 0, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="integers"):
        dirichlet_label_partition(np.zeros(10), 2, 0.5, 0, 0, np.random.default_rng(0)).client_indices


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(0, 500), st.sampled_from([(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.9, 0.0, 0.1), (1.0, 0.0, 0.0)]))
def test_local_split_counts_rule(n, fractions):
    counts = local_split_counts(n, fractions)
    assert sum(counts.values()) == n
    positive = [name for name, f in zip(SPLIT_NAMES, fractions) if f > 0]
    if n >= len(positive):
        assert all(counts[name] >= 1 for name in positive)
    for name, f in zip(SPLIT_NAMES, fractions):
        if f == 0:
            assert counts[name] == 0
        else:  # never further than the minimum-one correction from n * f
            assert abs(counts[name] - n * f) <= len(positive)


def test_small_classes_go_to_train_then_test():
    assert local_split_counts(1, (0.7, 0.15, 0.15)) == {"train": 1, "val": 0, "test": 0}
    assert local_split_counts(2, (0.7, 0.15, 0.15)) == {"train": 1, "val": 0, "test": 1}
    assert local_split_counts(3, (0.7, 0.15, 0.15)) == {"train": 1, "val": 1, "test": 1}
    assert local_split_counts(100, (0.7, 0.15, 0.15)) == {"train": 70, "val": 15, "test": 15}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(partition_problems())
def test_split_local_is_a_stratified_partition_of_the_client(problem):
    labels, k, lam, min_samples, seed = problem
    parts = dirichlet_label_partition(labels, k, lam, min_samples, 5000, np.random.default_rng(seed)).client_indices
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    for part in parts:
        split = split_local(part, labels, fractions, np.random.default_rng(seed))
        again = split_local(part, labels, fractions, np.random.default_rng(seed))
        assert all(np.array_equal(split[s], again[s]) for s in SPLIT_NAMES)
        joined = np.concatenate([split[s] for s in SPLIT_NAMES])
        assert np.array_equal(np.sort(joined), part)
        for c in np.unique(labels[part]):
            n_c = int(np.sum(labels[part] == c))
            got = {s: int(np.sum(labels[split[s]] == c)) for s in SPLIT_NAMES}
            assert got == local_split_counts(n_c, fractions)


def test_split_local_rejects_bad_fractions_and_indices():
    labels = np.zeros(10, dtype=np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(PartitionError, match="sum to 1"):
        split_local(np.arange(10), labels, {"train": 0.5, "val": 0.1, "test": 0.1}, rng)
    with pytest.raises(PartitionError, match="missing"):
        split_local(np.arange(10), labels, {"train": 0.8, "validation": 0.2}, rng)
    with pytest.raises(PartitionError, match="duplicates"):
        split_local(np.array([1, 1, 2]), labels, (0.8, 0.1, 0.1), rng)


def _config(**overrides) -> PartitionConfig:
    params = {
        "seed": 7,
        "num_clients": 4,
        "dirichlet_lambda": 0.3,
        "min_samples_per_client": 10,
        "max_redraws": 500,
        "local_split": {"train": 0.7, "val": 0.15, "test": 0.15},
    } | overrides
    return PartitionConfig.from_params(params)


def test_plan_is_deterministic_and_places_every_pool_image_once():
    labels = np.random.default_rng(1).integers(0, 3, size=600)
    devices = np.array([0, 1, 0, 2])
    a = plan_partition(labels, _config(), devices)
    b = plan_partition(labels, _config(), devices)
    origin, client, split = a.placement()
    assert np.array_equal(origin, np.arange(600))
    for k in range(4):
        for s in SPLIT_NAMES:
            assert np.array_equal(a.client_splits[k][s], b.client_splits[k][s])
            assert np.array_equal(np.sort(origin[(client == k) & (split == s)]), a.client_splits[k][s])
    c = plan_partition(labels, _config(seed=8), devices)
    assert any(not np.array_equal(a.client_indices(k), c.client_indices(k)) for k in range(4))


def test_config_rejects_typos_and_non_integers():
    with pytest.raises(PartitionError, match="unknown \\['num_client'\\]"):
        PartitionConfig.from_params({"num_client": 3})
    with pytest.raises(PartitionError, match="num_clients must be an integer"):
        _config(num_clients=2.5)

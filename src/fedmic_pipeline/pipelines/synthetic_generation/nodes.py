"""Nodes of `synthetic_generation` (FedSSG, methods.md section 2): thin wrappers over
`fedmic_pipeline.synthetic_sets`, the validation suite and the quality report.

Flow: partition -> federated generator training -> plan from the clients' count reports ->
sampling (in memory) -> data gate -> only then the per-client synthetic files and their
manifest; beside it, evaluation-only quality metrics and a sample grid.

The output contract read by training (`training.extra_training_data: synthetic`): `synthetic_client_sets`
holds one `client_XX.npz` per partition client with exactly the keys `images` (uint8, the
partition's layout: (N,H,W) or (N,H,W,3)), `labels` (int64), `devices` (int64) and
`is_synthetic` (bool, all True); N may be 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedmic_pipeline import synthetic_sets
from fedmic_pipeline.reporting.synthetic_tables import quality_markdown, quality_table
from fedmic_pipeline.validation.stage_gate import enforce_stage_gate

PartitionLoaders = Mapping[str, Callable[[], dict[str, np.ndarray]]]


def train_synthetic_generator(
    client_partitions: PartitionLoaders, partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The FedAvg-trained (class, device)-conditional generator's record and training summary
    (untrained, with no round run, when ``synthetic.enabled`` is false)."""
    return synthetic_sets.train_generator(client_partitions, partition_manifest, synthetic)


def compute_synthesis_plan(
    client_partitions: PartitionLoaders, partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> dict[str, Any]:
    """The server's plan from each client's class x device count report (train split only);
    an empty set for every client when ``synthetic.enabled`` is false."""
    return synthetic_sets.plan_synthesis(client_partitions, partition_manifest, synthetic)


def sample_synthetic_sets(
    synthetic_generator: dict[str, Any], synthesis_plan: dict[str, Any], partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> dict[str, dict[str, np.ndarray]]:
    """Draw every client's planned images from the generator; kept in memory until the gate passes."""
    return synthetic_sets.sample_sets(synthetic_generator, synthesis_plan, synthetic)


def validate_synthetic_sets(
    synthetic_candidate_sets: dict[str, dict[str, np.ndarray]],
    synthesis_plan: dict[str, Any],
    client_partitions: PartitionLoaders,
    global_test_set: dict[str, np.ndarray],
    partition_manifest: dict[str, Any],
    synthetic: dict[str, Any],
) -> dict[str, Any]:
    """The synthetic data gate (Great Expectations), run BEFORE any synthetic file is written.

    Checks: every sample flagged synthetic; labels within the classes; devices valid and
    never the held-out one; uint8 pixels of the partition's image shape within [0, 255];
    no synthetic image equal (pixel SHA-1) to any evaluation image (global test set in every
    rendering, clients' local val/test); one set per partition client with exactly the
    keys {images, labels, devices, is_synthetic} of equal lengths; counts per (client,
    class, device) equal to the plan.
    """
    return synthetic_sets.validate_candidates(
        synthetic_candidate_sets, synthesis_plan, client_partitions, global_test_set, partition_manifest, synthetic
    )


def enforce_synthetic_gate(synthetic_validation_report: dict[str, Any]) -> bool:
    """Stop the run (raise) when the synthetic gate failed; otherwise unlock publishing."""
    return enforce_stage_gate(synthetic_validation_report, "synthetic_generation", withheld="synthetic file", upstream="the partition")


def publish_synthetic_sets(
    synthetic_candidate_sets: dict[str, dict[str, np.ndarray]],
    synthetic_generator: dict[str, Any],
    synthesis_plan: dict[str, Any],
    synthetic_validation_report: dict[str, Any],
    synthetic: dict[str, Any],
    synthetic_gate_passed: bool,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """The per-client files (only after the gate) and their manifest (no timestamps: the same
    inputs give a byte-identical file)."""
    if synthetic_gate_passed is not True:
        raise RuntimeError("The synthetic data gate did not pass; refusing to write synthetic sets.")
    return synthetic_sets.publish(synthetic_candidate_sets, synthetic_generator, synthesis_plan, synthetic_validation_report, synthetic)


def evaluate_synthetic_quality(
    synthetic_generator: dict[str, Any],
    client_partitions: PartitionLoaders,
    global_test_set: dict[str, np.ndarray],
    partition_manifest: dict[str, Any],
    synthetic: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, str]:
    """FD, MMD, k-NN precision/recall and CAS: JSON, a tidy CSV table and a markdown summary.
    Evaluation only: its outputs feed nothing else."""
    result = synthetic_sets.measure_quality(synthetic_generator, client_partitions, global_test_set, partition_manifest, synthetic)
    table = quality_table(result)
    return result, table, quality_markdown(result, table)


def plot_synthetic_grid(
    synthetic_generator: dict[str, Any], global_test_set: dict[str, np.ndarray], partition_manifest: dict[str, Any], synthetic: dict[str, Any]
) -> Figure:
    """Real global-test images beside synthetic samples, one row per (class, training device)."""
    return synthetic_sets.grid_figure(synthetic_generator, global_test_set, partition_manifest, synthetic)

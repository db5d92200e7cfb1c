"""FedSSG's synthetic samples (methods.md section 2): torch + numpy only, no files or Kedro.

* ``generator``: a (class, device)-conditional VAE with FiLM conditioning, and
  ``build_generator``, which also builds ``flow``'s flow-matching UNet (the sharper option);
* ``federated``: its FedAvg training through the project's round runner (no real image
  leaves a client);
* ``plan``: the server's synthesis plan from the clients' class x device count reports,
  and sampling it into per-client synthetic sets;
* ``quality``: FD, MMD, k-NN precision/recall (their formulas: ``distances``) and the
  classification accuracy score in the feature space of an evaluation-only reference
  encoder, against the hospitals' validation splits and the global test set.
"""

from .flow import ConditionalFlow, flow_matching_loss
from .federated import FedAvgGenerator, GeneratorTrainingConfig, GeneratorTrainingResult, train_generator_federated
from .generator import (
    GENERATOR_ARCHITECTURE,
    ConditionalVAE,
    build_generator,
    generator_from_record,
    generator_record,
    images_to_uint8,
    state_sha256,
    vae_loss,
)
from .plan import PlanCell, PlanConfig, SynthesisPlan, client_count_matrix, compute_plan, pooled_counts, sample_plan
from .distances import (
    distribution_metrics,
    frechet_distance,
    frechet_distance_gaussians,
    knn_precision_recall,
    median_bandwidth,
    mmd_rbf,
)
from .quality import QualityConfig, QualityRuler, extract_features

__all__ = [
    "GENERATOR_ARCHITECTURE",
    "ConditionalFlow",
    "ConditionalVAE",
    "FedAvgGenerator",
    "GeneratorTrainingConfig",
    "GeneratorTrainingResult",
    "PlanCell",
    "PlanConfig",
    "QualityConfig",
    "QualityRuler",
    "SynthesisPlan",
    "build_generator",
    "client_count_matrix",
    "compute_plan",
    "distribution_metrics",
    "extract_features",
    "flow_matching_loss",
    "frechet_distance",
    "frechet_distance_gaussians",
    "generator_from_record",
    "generator_record",
    "images_to_uint8",
    "knn_precision_recall",
    "median_bandwidth",
    "mmd_rbf",
    "pooled_counts",
    "sample_plan",
    "state_sha256",
    "train_generator_federated",
    "vae_loss",
]

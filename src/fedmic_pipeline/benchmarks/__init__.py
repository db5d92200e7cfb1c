"""Performance measurements of the project (figures, not assertions).

* :mod:`fedmic_pipeline.benchmarks.throughput`: client-training throughput and time per
  round of the federated algorithms on the resident-tensor data path, beside a naive
  per-client ``DataLoader`` reference on the same workload
  (``python -m fedmic_pipeline.benchmarks.throughput --help``).

Nothing here is imported by the pipeline; the modules import torch lazily enough that
``--help`` stays quick.
"""

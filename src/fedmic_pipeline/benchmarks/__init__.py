"""Performance measurements of the project (figures, not assertions).

* :mod:`fedmic_pipeline.benchmarks.throughput`: client-training throughput and time per
  round of the federated algorithms on the resident-tensor data path, beside a naive
  per-client ``DataLoader`` reference on the same workload
  (``python -m fedmic_pipeline.benchmarks.throughput --help``); its parts are
  ``settings`` (the setting measured), ``naive`` (the naive algorithms), ``variants``
  (what each variant trains), ``load`` (other processes' load) and ``report``.
* :mod:`fedmic_pipeline.benchmarks.recipe`: the learning-recipe ablation.

Nothing here is imported by the pipeline.
"""

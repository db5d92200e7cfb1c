"""The audit report of a training run: technical documentation (EU AI Act Annex IV layout,
FDA GMLP cross-reference) plus a re-hash of the data the run used.

`collect.build_report` assembles the evidence (`inputs.AuditInputs`) into one JSON-ready
dict from the sections in `development_sections`, `data_sections` and `results_sections`,
the re-hash in `integrity` and the `verdict`; `render` turns that dict into a
self-contained HTML page. Kedro nodes live in `fedmic_pipeline.pipelines.audit`.
"""

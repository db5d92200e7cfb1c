"""The audit report of a training run: technical documentation (EU AI Act Annex IV layout,
FDA GMLP cross-reference) plus a re-hash of the data the run used.

`collect` gathers the evidence into one JSON-ready dict; `render` turns that dict into a
self-contained HTML page. Kedro nodes live in `fedmic_pipeline.pipelines.audit`.
"""

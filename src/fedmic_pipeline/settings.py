"""Kedro project settings."""

from fedmic_pipeline.telemetry import switch_off_telemetry

# The project never phones home, whichever way Kedro is started (CLI, notebook, tests).
switch_off_telemetry()

from kedro.config import OmegaConfigLoader  # noqa: E402
from omegaconf.resolvers import oc  # noqa: E402

from fedmic_pipeline.hooks import RunGuard, StageTimer  # noqa: E402

# Parameters checked before the first node, logs/info.log, one-paragraph input errors (hooks.py).
HOOKS = (RunGuard(), StageTimer())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Lets conf/base/mlflow.yml honour MLFLOW_TRACKING_URI, so one variable switches a run
    # from the embedded SQLite store to a tracking server.
    "custom_resolvers": {"oc.env": oc.env},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
}

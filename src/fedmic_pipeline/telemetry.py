"""The environment that keeps every tool of the project from phoning home, in one place.

`settings.py` applies it before Kedro loads, the test suite applies it, and the container
test checks that the Dockerfile sets them too.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TELEMETRY_OFF: dict[str, str] = {
    "KEDRO_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DO_NOT_TRACK": "1",
}


def switch_off_telemetry(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set each variable of `TELEMETRY_OFF` that the environment does not set already."""
    for name, value in TELEMETRY_OFF.items():
        environ.setdefault(name, value)

"""The gate node of a stage that writes files only after its data gate passed.

`data_partition` and `synthetic_generation` share this step: stop the run with the failed
expectations and what to fix, or hand the writing node the `True` it waits for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .gate import enforce_gate


def enforce_stage_gate(report: Mapping[str, Any], pipeline: str, *, withheld: str, upstream: str) -> bool:
    """Raise DataGateError unless `report` passed, saying that no `withheld` was written and
    how to re-run `pipeline` (its parameters file, or the `upstream` data named above)."""
    enforce_gate(
        report,
        hint=f"No {withheld} was written. Fix conf/base/parameters_{pipeline}.yml (or {upstream}, named above), "
        f"then re-run `kedro run --pipelines {pipeline}`.",
    )
    return True

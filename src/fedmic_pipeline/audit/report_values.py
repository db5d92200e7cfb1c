"""The vocabulary every part of the audit report shares.

Sections, integrity checks and the verdict grade what they find in the same status words,
emit only values that survive `json.dumps`, and print numbers in sentences the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

PASS, FAIL, WARN, MISSING, SKIPPED, NOT_USED = "PASS", "FAIL", "WARN", "MISSING", "SKIPPED", "NOT USED"


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        with contextlib.suppress(Exception):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"

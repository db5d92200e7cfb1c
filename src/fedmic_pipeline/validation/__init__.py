"""Great Expectations data gates: the raw-data gate and the partition gate.

GX itself is imported only when a gate runs (it takes ~5 s to import).
"""

from .gate import DataGateError, TableCheck, describe_failures, enforce_gate, validate_table, validate_tables
from .partition_suite import validate_partition
from .raw_suite import validate_raw_manifest

__all__ = [
    "DataGateError",
    "TableCheck",
    "describe_failures",
    "enforce_gate",
    "validate_partition",
    "validate_raw_manifest",
    "validate_table",
    "validate_tables",
]

"""The federated algorithms, one module per method, and their registry.

Each module registers its class with ``@register("<name>")`` (see ``base.py``) when it is
imported; this package imports every module explicitly, so ``ALGORITHMS`` is complete
after ``import fedmic_pipeline.core.algorithms`` and a missing file is an ImportError,
never a silently absent method. To add a method: write ``<name>.py`` with a registered
class and add its module to the import list below.
"""

from __future__ import annotations

from . import (  # noqa: F401  (imported for their @register side effect)
    # baselines: the engine
    centralized,
    # methods: personalized and distillation-based
    ditto,
    fedavg,
    fedbn,
    fedkd,
    fedmic,
    fedprox,
    local_only,
    moon,
    scaffold,
)
from .base import ALGORITHMS, AlgorithmConfig, BaseAlgorithm, build_algorithm, register, require

__all__ = ["ALGORITHMS", "AlgorithmConfig", "BaseAlgorithm", "build_algorithm", "register", "require"]

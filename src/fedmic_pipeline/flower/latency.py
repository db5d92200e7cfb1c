"""Shorter retry waits in Flower 1.41's object transfer, for loopback and LAN federations.

Flower moves a message as content-addressed objects; a process that pulls a message
(the ServerApp pulling a node's reply from the SuperLink, a SuperNode pulling a message
from the SuperLink, a ClientApp pulling it from its SuperNode) retries an object that is
not there yet after 1 s, then 2, 4, ... up to 10 s (``PULL_INITIAL_BACKOFF`` /
``PULL_BACKOFF_CAP`` in ``flwr.supercore.constant``, bound as keyword defaults of
``inflatable_utils.pull_objects`` and ``pull_and_inflate_object_from_tree``). The
object is usually missing only because its sender is still pushing it, so on loopback
nearly every hop waited a full second or more: measured as 1.5-6 s of
``reply-transit-s`` and ``startup-s`` per message (``docs/results/flower_rounds.md``).

``apply_pull_backoff_from_env`` sets those defaults from ``$FEDMIC_FLOWER_PULL_BACKOFF_S``
(initial wait; the cap becomes 20x that, at most 1 s) in the calling process; the
ServerApp, the warm SuperExec (before it forks ClientApps) and ``site_supernode`` call it,
and the loopback launcher sets the variable with its warm ClientApps. Unset = Flower's
waits. The number of tries per object (500) and the total limit (7200 s) are unchanged.
"""

from __future__ import annotations

import logging
import os

__all__ = ["PULL_BACKOFF_ENV", "apply_pull_backoff_from_env"]

PULL_BACKOFF_ENV = "FEDMIC_FLOWER_PULL_BACKOFF_S"

logger = logging.getLogger(__name__)


def apply_pull_backoff_from_env() -> float | None:
    """Apply ``$FEDMIC_FLOWER_PULL_BACKOFF_S`` to this process's Flower object pulls;
    returns the initial wait set, or None when the variable is unset."""
    raw = os.environ.get(PULL_BACKOFF_ENV, "").strip()
    if not raw:
        return None
    try:
        initial = float(raw)
    except ValueError:
        raise ValueError(f"${PULL_BACKOFF_ENV} must be a number of seconds, got {raw!r}.") from None
    if not 0 < initial <= 10:
        raise ValueError(f"${PULL_BACKOFF_ENV} must be in (0, 10] seconds, got {initial}.")
    from flwr.supercore.inflatable import inflatable_utils

    cap = max(initial, min(1.0, 20 * initial))
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = dict(function.__kwdefaults__ or {})
        if "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"Flower's {function.__name__} has no initial_backoff/backoff_cap defaults to shorten.")
        defaults.update(initial_backoff=initial, backoff_cap=cap)
        function.__kwdefaults__ = defaults
    logger.debug("Flower object pulls retry after %.3fs (cap %.3fs)", initial, cap)
    return initial

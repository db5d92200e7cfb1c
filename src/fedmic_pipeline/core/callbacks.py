"""The engine's standard extras as callbacks: progress bar, round log, checkpoints.

Each is independent of the runner: the in-process simulation and the Flower ServerApp
pass the same objects to ``RoundEngine`` (MLflow logging lives in ``tracking/``, since the
core imports neither MLflow nor Kedro).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .checkpoint import build_checkpoint
from .engine import Callback, EngineState, RoundEngine

__all__ = ["Checkpointer", "OnRound", "ProgressBar", "RoundLogger", "fmt"]

logger = logging.getLogger("fedmic_pipeline.core.simulation")
_MB = 1024.0 * 1024.0


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A metric for a log line: '-' when there is none."""
    return "-" if value is None else format(value, spec)


class RoundLogger(Callback):
    """One INFO line per round: clients, loss, bytes, validation scores, time (and, where the
    transport measured them, the wire bytes)."""

    def after_round(self, engine: RoundEngine, state: EngineState, record: dict[str, Any]) -> None:
        wire = ""
        if "wire_bytes_up_total" in record:
            wire = f" (wire {record['wire_bytes_up_total'] / _MB:.3f} MB up, {record['wire_bytes_down_total'] / _MB:.3f} MB down)"
        logger.info(
            "%s round %d/%d | clients %s | loss %s acc %s | up %.3f MB down %.3f MB%s | val balanced acc: global %s, "
            "personalized %s | %.2fs",
            engine.algorithm.name, record["round"] + 1, engine.config.num_rounds, record.get("participants", record["sampled"]),
            fmt(record["train_loss"], ".4f"), fmt(record["train_accuracy"]), record["bytes_up_total"] / _MB,
            record["bytes_down_total"] / _MB, wire, fmt(record["global_val_balanced_accuracy"]),
            fmt(record["personalized_val_balanced_accuracy"]), record["round_time_s"],
        )  # fmt: skip


class ProgressBar(Callback):
    """A tqdm or rich bar over the rounds (imported only when asked for; 'none' = no bar).

    Log lines must not cut through the bar: under tqdm the standard handlers write through
    ``tqdm.write`` while the bar runs; rich's bar shares the console of Kedro's rich log
    handler, which prints above it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._bar: Any = None
        self._rich: Any = None
        self._redirect: Any = None

    def on_train_begin(self, engine: RoundEngine, state: EngineState) -> None:
        total, label = engine.config.num_rounds - state.rounds_completed, engine.algorithm.name
        if self.kind == "tqdm":
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it
            self._redirect.__enter__()
            self._bar = tqdm(total=total, desc=label, unit="round")
        elif self.kind == "rich":
            from rich.progress import Progress

            self._rich = Progress()
            self._rich.start()
            self._task = self._rich.add_task(label, total=total)

    def after_round(self, engine: RoundEngine, state: EngineState, record: dict[str, Any]) -> None:
        text = (
            f"loss {fmt(record['train_loss'], '.4f')} acc {fmt(record['train_accuracy'])} "
            f"val bal {fmt(record['global_val_balanced_accuracy'])}"
        )
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1, description=text)

    def on_train_end(self, engine: RoundEngine, state: EngineState, status: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
        elif self._rich is not None:
            self._rich.stop()


class Checkpointer(Callback):
    """Hands ``save`` a checkpoint dict (``checkpoint.build_checkpoint``) after every
    ``every``-th round, except the last (the run's result is then returned instead).

    The dict references live models: ``save`` must serialise it before returning
    (``checkpoint.serialize_checkpoint``). ``fingerprint`` is the run's
    (``checkpoint.run_fingerprint``), checked when the checkpoint is resumed.
    """

    def __init__(self, every: int, save: Callable[[dict[str, Any]], None], fingerprint: Mapping[str, Any]) -> None:
        self.every = every
        self.save = save
        self.fingerprint = dict(fingerprint)

    def after_round(self, engine: RoundEngine, state: EngineState, record: dict[str, Any]) -> None:
        done = state.rounds_completed
        if self.every <= 0 or done % self.every or done >= engine.config.num_rounds:
            return
        self.save(
            build_checkpoint(
                fingerprint=self.fingerprint, rounds_completed=done, num_rounds=engine.config.num_rounds,
                algorithm_name=engine.algorithm.name, payload=state.payload, server_state=state.server_state,
                client_states=state.client_states, history=state.history, elapsed_s=state.elapsed_s,
                selection=state.selector.state_dict(),
            )  # fmt: skip
        )


class OnRound(Callback):
    """Calls ``function(record)`` after every round (a plain function as a callback)."""

    def __init__(self, function: Callable[[dict[str, Any]], None]) -> None:
        self.function = function

    def after_round(self, engine: RoundEngine, state: EngineState, record: dict[str, Any]) -> None:
        self.function(record)

"""Champion/challenger promotion in the MLflow model registry.

Every training run registers its global model (`<dataset>-<algorithm>-global`), so the
registry fills up with versions; something has to say which one is *the* model. That is
the alias `champion` (configurable), and it moves only by the rule below, applied after
evaluation has logged the `final.*` metrics into the run:

* A metric is only comparable between two models evaluated on the SAME data: the same
  partition (the run tag `partition.manifest_sha256`) of the same raw file (the run tag
  `dataset.md5`). Each data version has its own champion, marked by the alias
  `<alias>-<data version>`; `<alias>` itself points at the most recently promoted one.
* The candidate is compared with the champion of its own data version and takes the
  aliases only when it beats that champion's metric by at least `min_improvement`.
* With no champion for its data version yet, the candidate is promoted without a
  comparison (and the decision says so); a champion trained on other data is never used
  as the yardstick, however good or bad its number is.

The decision and its inputs are written as model-version tags (`promotion.*`), so the
registry itself explains why an alias points where it does, and returned as a dict (the
`promotion_decision` JSON). An MLflow tracking server and the embedded SQLite store
behave the same: only `MlflowClient` calls are used.

Promotions of one registered model are serialised (``promotion_lock``): reading the
aliases, deciding and moving them is one critical section, so two candidates evaluated at
the same moment decide one after the other, as if run in sequence, across processes and
across the workers of a shared tracking server.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

PROMOTED = "promoted"
NOT_PROMOTED = "not_promoted"
#: The evaluation's constant-predictor flag of the global model, as logged in the training run.
CONSTANT_METRIC = "final.global.constant_predictor"
ALREADY_CHAMPION = "already_champion"
SKIPPED = "skipped"

MANIFEST_TAG = "partition.manifest_sha256"
DATASET_TAG = "dataset.md5"
#: The majority-class baseline's balanced accuracy (1 / K for any constant predictor), as evaluation logs it.
MAJORITY_METRIC = "final.majority_class.global.balanced_accuracy"
_RULE_KEYS = ("enabled", "metric", "greater_is_better", "min_improvement", "alias", "must_beat_majority")


class PromotionConfigError(ValueError):
    """`params:promotion` is unusable; the message names the key to fix."""


@dataclass(frozen=True)
class PromotionRule:
    """Which metric decides, in which direction, by how much, and which alias moves.

    The default metric is the selected round's pooled *validation* balanced accuracy (the
    training run's ``total.selected_global_val_balanced_accuracy``): the test set judges a
    model, it never chooses one. ``must_beat_majority``: a candidate whose balanced accuracy
    does not exceed the majority-class baseline's (1 / K) is never promoted, not even as the
    first champion of a data version.
    """

    metric: str = "total.selected_global_val_balanced_accuracy"
    greater_is_better: bool = True
    min_improvement: float = 0.0
    alias: str = "champion"
    enabled: bool = True
    must_beat_majority: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> PromotionRule:
        params = dict(params or {})
        unknown = sorted(set(params) - set(_RULE_KEYS))
        if unknown:
            raise PromotionConfigError(
                f"Unknown key(s) {unknown} in params:promotion (conf/base/parameters_audit.yml); valid keys: {list(_RULE_KEYS)}."
            )
        for switch in ("enabled", "greater_is_better", "must_beat_majority"):
            if switch in params and not isinstance(params[switch], bool):
                raise PromotionConfigError(f"promotion.{switch} must be true or false, got {params[switch]!r}.")
        if isinstance(params.get("min_improvement"), bool):
            raise PromotionConfigError(f"promotion.min_improvement must be a number >= 0, got {params['min_improvement']!r}.")
        if "alias" in params and not isinstance(params["alias"], str):
            raise PromotionConfigError(f"promotion.alias must be a string such as 'champion', got {params['alias']!r}.")
        rule = cls(**params)
        if not isinstance(rule.metric, str) or not rule.metric:
            raise PromotionConfigError("promotion.metric must name a metric logged in the training run, e.g. final.global.balanced_accuracy.")
        try:
            improvement = float(rule.min_improvement)
        except (TypeError, ValueError):
            raise PromotionConfigError(f"promotion.min_improvement must be a number >= 0, got {rule.min_improvement!r}.") from None
        if not math.isfinite(improvement) or improvement < 0:
            raise PromotionConfigError(f"promotion.min_improvement must be a number >= 0, got {rule.min_improvement!r}.")
        from mlflow.utils.validation import _REGISTERED_MODEL_ALIAS_REGEX, _REGISTERED_MODEL_ALIAS_VERSION_REGEX

        alias = str(rule.alias)
        if not _REGISTERED_MODEL_ALIAS_REGEX.match(alias) or _REGISTERED_MODEL_ALIAS_VERSION_REGEX.match(alias) or alias.lower() == "latest":
            raise PromotionConfigError(
                f"promotion.alias '{alias}' is not a valid MLflow alias (letters, digits, '_' and '-'; not 'latest' or 'v<number>')."
            )
        return cls(
            metric=rule.metric,
            greater_is_better=bool(rule.greater_is_better),
            min_improvement=improvement,
            alias=alias,
            enabled=bool(rule.enabled),
            must_beat_majority=bool(rule.must_beat_majority),
        )

    def data_alias(self, data_key: str) -> str:
        """The alias that marks the champion of one data version."""
        return f"{self.alias}-{data_key}"

    def improvement(self, candidate: float, reference: float) -> float:
        """How much better the candidate is (positive = better), whatever the direction."""
        return candidate - reference if self.greater_is_better else reference - candidate


@dataclass(frozen=True)
class DataVersion:
    """The data a model was trained and evaluated on, as the run's lineage tags record it."""

    partition_manifest_sha256: str | None
    dataset_md5: str | None

    @property
    def known(self) -> bool:
        return bool(self.partition_manifest_sha256) and bool(self.dataset_md5)

    @property
    def key(self) -> str:
        """A short id for aliases and tags; 'unknown' when a lineage tag is missing."""
        if not self.known:
            return "unknown"
        return hashlib.sha256(f"{self.partition_manifest_sha256}|{self.dataset_md5}".encode()).hexdigest()[:12]

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> DataVersion:
        return cls(partition_manifest_sha256=tags.get(MANIFEST_TAG) or None, dataset_md5=tags.get(DATASET_TAG) or None)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _metric(client: Any, run_id: str, metric: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(metric)
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _version_facts(client: Any, name: str, version: str, metric: str) -> dict[str, Any]:
    """A registered version with its run, data version and value of the deciding metric."""
    model_version = client.get_model_version(name, str(version))
    run = client.get_run(model_version.run_id)
    data = DataVersion.from_tags(run.data.tags)
    value = run.data.metrics.get(metric)
    return {
        "version": str(model_version.version),
        "run_id": model_version.run_id,
        "data_version": data,
        "value": float(value) if value is not None and math.isfinite(float(value)) else None,
    }


def _aliases(client: Any, name: str) -> dict[str, str]:
    return {str(alias): str(version) for alias, version in (client.get_registered_model(name).aliases or {}).items()}


def _public(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    if facts is None:
        return None
    return {**facts, "data_version": facts["data_version"].as_dict()}


def skipped_decision(reason: str, rule: PromotionRule, **extra: Any) -> dict[str, Any]:
    """A decision that changed nothing in the registry (no run, no model, disabled)."""
    logger.warning("Promotion skipped: %s", reason)
    return {"decision": SKIPPED, "promoted": False, "reason": reason, "rule": asdict(rule), "decided_at": _now(), **extra}


#: Registered-model name suffix of the lock entry held while a promotion decides.
LOCK_SUFFIX = ".promotion-lock"


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, timeout_s: float = 120.0, stale_s: float = 600.0) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` for the body.

    Creating a registered model fails when the name exists (in every MLflow store), which
    makes creating ``<name>.promotion-lock`` an atomic try-lock shared by every process
    that talks to the registry; the lock is deleted on the way out. A lock older than
    ``stale_s`` belongs to a promoter that died mid-decision and is broken.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

    # A create racing another promoter's create or delete can also answer "does not exist"
    # (the server found the name taken, then gone): both mean "not acquired, try again".
    contended = {ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)}
    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"acquired_at": repr(time.time()), "pid": str(os.getpid())},
                description=f"held while a promotion of {name} decides; deleted when it is done",
            )  # fmt: skip
            break
        except MlflowException as error:
            if error.error_code not in contended:
                raise
        with contextlib.suppress(MlflowException):  # released between our two calls: just retry
            held_since = float(client.get_registered_model(lock).tags.get("acquired_at", "0"))
            if time.time() - held_since > stale_s:
                logger.warning("Breaking the stale promotion lock %s (held since %.0f s)", lock, time.time() - held_since)
                client.delete_registered_model(lock)
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Another promotion of {name} held the registry lock '{lock}' for over {timeout_s:.0f} s. If no promotion "
                f"is running, delete that registered model (MlflowClient().delete_registered_model('{lock}')) and rerun."
            )
        time.sleep(0.1 + random.random() * 0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def decide_and_apply(
    client: Any,
    name: str,
    version: str | int,
    rule: PromotionRule,
    candidate_value_fallback: float | None = None,
    candidate_constant: bool | None = None,
    majority_fallback: float | None = None,
) -> dict[str, Any]:
    """Apply the promotion rule to registered version `version` of `name`; return the decision.

    `candidate_value_fallback` is used when the candidate's run lacks `rule.metric` (the
    headline numbers of the evaluation that just ran, before they reached MLflow), and
    `candidate_constant` when it lacks `final.global.constant_predictor`. A constant
    predictor (one class for >= 95 % of the global test set) is never promoted, nor, under
    ``rule.must_beat_majority``, a balanced accuracy at or below the majority-class baseline
    (the run's ``final.majority_class.global.balanced_accuracy``, else ``majority_fallback``).
    Runs under ``promotion_lock``: concurrent promotions decide one after the other.
    """
    with promotion_lock(client, name):
        return _decide_and_apply(client, name, str(version), rule, candidate_value_fallback, candidate_constant, majority_fallback)


def _decide_and_apply(
    client: Any,
    name: str,
    version: str,
    rule: PromotionRule,
    candidate_value_fallback: float | None,
    candidate_constant: bool | None,
    majority_fallback: float | None,
) -> dict[str, Any]:
    candidate = _version_facts(client, name, version, rule.metric)
    if candidate_constant is None:
        flag = _metric(client, candidate["run_id"], CONSTANT_METRIC)
        candidate_constant = None if flag is None else bool(flag)
    if candidate["value"] is None and candidate_value_fallback is not None and math.isfinite(candidate_value_fallback):
        candidate["value"] = float(candidate_value_fallback)
    floor_applies = rule.must_beat_majority and rule.greater_is_better and "balanced_accuracy" in rule.metric
    majority = _metric(client, candidate["run_id"], MAJORITY_METRIC) if floor_applies else None
    if majority is None and floor_applies and majority_fallback is not None and math.isfinite(majority_fallback):
        majority = float(majority_fallback)
    data: DataVersion = candidate["data_version"]
    aliases_before = _aliases(client, name)

    champion = None
    if rule.alias in aliases_before:
        champion = _version_facts(client, name, aliases_before[rule.alias], rule.metric)
    data_alias = rule.data_alias(data.key) if data.known else None
    reference = None  # the champion of the candidate's own data version, the only valid yardstick
    if data_alias and data_alias in aliases_before:
        reference = _version_facts(client, name, aliases_before[data_alias], rule.metric)
    elif champion is not None and data.known and champion["data_version"] == data:
        reference = champion  # promoted before data aliases existed, or alias removed by hand

    compared = False
    improvement = None
    if champion is not None and champion["version"] == version:
        decision, reason = ALREADY_CHAMPION, f"version {version} already holds the alias '{rule.alias}'; nothing changed"
    elif candidate_constant:
        decision = NOT_PROMOTED
        reason = (
            "the candidate is a constant predictor (it gives one class to at least 95 % of the global test set): a "
            "model that has learned nothing is never promoted, whatever its score; aliases unchanged"
        )
    elif candidate["value"] is None:
        decision = NOT_PROMOTED
        reason = f"the candidate's run has no finite value of {rule.metric}: cannot judge it; aliases unchanged"
    elif majority is not None and candidate["value"] <= majority:
        decision = NOT_PROMOTED
        reason = (
            f"{rule.metric} {candidate['value']:.6g} does not beat the majority-class baseline's balanced accuracy "
            f"{majority:.6g} (always predicting one class): it has learned nothing usable; aliases unchanged"
        )
    elif not data.known:
        missing = [t for t, v in ((MANIFEST_TAG, data.partition_manifest_sha256), (DATASET_TAG, data.dataset_md5)) if not v]
        if champion is None:
            decision = PROMOTED
            reason = f"no champion yet; promoted although the run lacks the lineage tag(s) {missing}, so its data version is unknown"
        else:
            decision = NOT_PROMOTED
            reason = (
                f"the run lacks the lineage tag(s) {missing}: its data version is unknown, so it cannot be compared with "
                f"champion version {champion['version']}; aliases unchanged"
            )
    elif reference is None:
        decision = PROMOTED
        if champion is None:
            reason = f"no champion yet: version {version} becomes '{rule.alias}' (data version {data.key})"
        else:
            reason = (
                f"no champion for data version {data.key} yet: version {version} becomes '{rule.alias}' without a comparison; "
                f"the previous champion, version {champion['version']}, was trained on data version "
                f"{champion['data_version'].key}, whose metrics are not comparable"
            )
    elif reference["version"] == version:
        decision, reason = ALREADY_CHAMPION, f"version {version} already is the champion of data version {data.key}"
    elif reference["value"] is None:
        decision = NOT_PROMOTED
        reason = (
            f"champion version {reference['version']} of data version {data.key} has no {rule.metric}; cannot compare. "
            f"Set the alias by hand if version {version} should replace it"
        )
    else:
        compared = True
        improvement = rule.improvement(candidate["value"], reference["value"])
        direction = "higher" if rule.greater_is_better else "lower"
        numbers = (
            f"{rule.metric} {candidate['value']:.6g} vs champion version {reference['version']}'s {reference['value']:.6g} "
            f"({direction} is better; improvement {improvement:+.6g}, required >= {rule.min_improvement:g} and > 0)"
        )
        if improvement > 0 and improvement >= rule.min_improvement:
            decision, reason = PROMOTED, f"beats the champion of data version {data.key}: {numbers}"
        else:
            decision, reason = NOT_PROMOTED, f"does not beat the champion of data version {data.key}: {numbers}; aliases unchanged"

    if decision == PROMOTED:
        client.set_registered_model_alias(name, rule.alias, version)
        if data_alias:
            client.set_registered_model_alias(name, data_alias, version)
        replaced = {f["version"] for f in (champion, reference) if f is not None and f["version"] != version}
        for old in sorted(replaced):
            client.set_model_version_tag(name, old, "promotion.replaced_by", version)
    if decision == ALREADY_CHAMPION and data_alias and aliases_before.get(data_alias) != version:
        client.set_registered_model_alias(name, data_alias, version)

    decided_at = _now()
    tags = {
        "promotion.decision": decision,
        "promotion.reason": reason[:4900],
        "promotion.metric": rule.metric,
        "promotion.greater_is_better": str(rule.greater_is_better),
        "promotion.min_improvement": repr(rule.min_improvement),
        "promotion.candidate_value": "none" if candidate["value"] is None else repr(candidate["value"]),
        "promotion.majority_baseline": "none" if majority is None else repr(majority),
        "promotion.compared": str(compared),
        "promotion.compared_with_version": reference["version"] if compared else "none",
        "promotion.champion_value": repr(reference["value"]) if compared else "none",
        "promotion.improvement": "none" if improvement is None else repr(improvement),
        "promotion.previous_champion_version": champion["version"] if champion else "none",
        "promotion.data_version": data.key,
        "promotion.decided_at": decided_at,
        "data.partition_manifest_sha256": data.partition_manifest_sha256 or "unknown",
        "data.dataset_md5": data.dataset_md5 or "unknown",
    }
    recorded = None
    if decision == ALREADY_CHAMPION:
        # keep the tags of the decision that made it champion; only note the re-check
        old = client.get_model_version(name, version).tags or {}
        recorded = {k.removeprefix("promotion."): v for k, v in old.items() if k in ("promotion.decision", "promotion.reason", "promotion.decided_at")}
        client.set_model_version_tag(name, version, "promotion.rechecked_at", decided_at)
    else:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

    aliases_after = _aliases(client, name)
    result = {
        "decision": decision,
        "promoted": decision == PROMOTED,
        "reason": reason,
        "registered_model": name,
        "version": version,
        "run_id": candidate["run_id"],
        "rule": asdict(rule),
        "candidate": _public(candidate),
        "compared": compared,
        "compared_with": _public(reference) if compared else None,
        "improvement": improvement,
        "previous_champion": _public(champion),
        "data_alias": data_alias,
        "aliases_before": aliases_before,
        "aliases_after": aliases_after,
        "champion_version": aliases_after.get(rule.alias),
        "decided_at": decided_at,
        "original_decision": recorded,  # for already_champion: the decision that made it champion
    }
    log = logger.info if decision in (PROMOTED, ALREADY_CHAMPION) else logger.warning
    log("Promotion of %s version %s: %s (%s)", name, version, decision, reason)
    return result


def promote_from_tracking(
    training_tracking: Mapping[str, Any],
    evaluation_metrics: Mapping[str, Any],
    promotion: Mapping[str, Any] | None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """The promotion decision for the model registered by the run in `training_tracking`.

    Skips (and says why) when promotion is disabled, the run was not tracked, or the
    method has no global model (local_only); registry errors propagate with the URI.
    """
    rule = PromotionRule.from_params(promotion)
    if not rule.enabled:
        return skipped_decision("promotion.enabled is false", rule)
    run_id = training_tracking.get("mlflow_run_id")
    registered = training_tracking.get("registered") or {}
    if not run_id:
        return skipped_decision("the training run was not tracked in MLflow (no mlflow_run_id in mlflow_run.json)", rule)
    if not registered.get("registered_model") or registered.get("version") in (None, ""):
        return skipped_decision(
            "the training run registered no global model (a method without one, e.g. local_only)", rule, run_id=run_id
        )
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri) if tracking_uri else MlflowClient()
    metric_key = rule.metric.removeprefix("final.")
    fallback = evaluation_metrics.get(metric_key) if rule.metric.startswith("final.") else None
    try:
        fallback_value = float(fallback) if fallback is not None else None
    except (TypeError, ValueError):
        fallback_value = None
    constant = evaluation_metrics.get("global.constant_predictor")
    majority = evaluation_metrics.get(MAJORITY_METRIC.removeprefix("final."))
    try:
        return decide_and_apply(
            client, registered["registered_model"], registered["version"], rule, fallback_value,
            candidate_constant=None if constant is None else bool(constant),
            majority_fallback=float(majority) if isinstance(majority, (int, float)) else None,
        )  # fmt: skip
    except MlflowException as error:
        raise RuntimeError(
            f"Promotion of {registered['registered_model']} version {registered['version']} failed against the MLflow "
            f"registry at {client.tracking_uri}: {error.message}. Check MLFLOW_TRACKING_URI (conf/base/mlflow.yml) points "
            "at the store the training run was logged to, or set promotion.enabled: false."
        ) from error

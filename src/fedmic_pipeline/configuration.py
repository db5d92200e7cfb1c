"""The project's run parameters, checked on the way in: typed objects and one strict check per block.

``TrainingConfig.from_params`` reads the ``training`` block of
``conf/base/parameters_federated_training.yml`` (what the Kedro nodes, the comparison, the
ablation and the recipe benchmark receive as ``params:training``) and refuses keys that
nobody reads: a typo such as ``training.num_round=1`` would otherwise run the default 20
rounds and exit 0. ``algorithm_params_for`` is the one place where a method's parameters
are ``algorithm_params.common`` overlaid with its own block; ``read_algorithm_params``
does the same from a YAML file (the Flower ServerApp and the throughput benchmark).

``validate_parameters`` checks every other block of ``conf/base/parameters_*.yml`` the same
way, before any node runs (``hooks.py`` calls it with the blocks of the pipeline about to
run): an unknown key, a wrong type or an out-of-range value is one paragraph naming the
block, the key and where to fix it, instead of a silently ignored setting or a TypeError
an hour into a run. A block with a typed config of its own (``partition``, ``devices``,
``promotion``, ``synthetic.*``, each algorithm's config) is checked by that config, so each
rule lives in one place; only the blocks read as plain dicts are described here, by
``Rule`` tables.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmic_pipeline.core.algorithms import ALGORITHMS, build_algorithm
from fedmic_pipeline.core.devices import DeviceConfigError, DevicesConfig
from fedmic_pipeline.core.engine import SimulationConfig
from fedmic_pipeline.core.partition import PartitionConfig, PartitionError
from fedmic_pipeline.core.pretraining import PretrainingConfig
from fedmic_pipeline.core.protocol import ConfigurationError, DataSpec, reject_unknown_keys
from fedmic_pipeline.ingestion import MedMNISTSourceError
from fedmic_pipeline.tracking.registry import PromotionConfigError, PromotionRule

__all__ = [
    "EXTRA_TRAINING_DATA",
    "PARAMETER_BLOCKS",
    "PARAMETER_ERRORS",
    "PARAMS_FILE",
    "Rule",
    "TrainingConfig",
    "algorithm_params_for",
    "blocks_read_by",
    "read_algorithm_params",
    "validate_parameters",
]

PARAMS_FILE = Path("conf/base/parameters_federated_training.yml")
#: What each hospital may add to its training split (the FedSSG switch and the ablation).
EXTRA_TRAINING_DATA = ("none", "synthetic", "augmented")
_RESUME = {"true": "true", "yes": "true", "1": "true", "false": "false", "no": "false", "0": "false", "none": "false", "auto": "auto"}
_SIMULATION_KEYS = tuple(f.name for f in dataclasses.fields(SimulationConfig))

#: The error classes a parameter check raises: ConfigurationError, or the block's own class
#: where its config had one before this module checked every block.
PARAMETER_ERRORS: tuple[type[Exception], ...] = (
    ConfigurationError, PartitionError, DeviceConfigError, PromotionConfigError, MedMNISTSourceError,
)


# ---- what one key accepts ------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """What one parameter accepts, and how to say so in an error message.

    ``kind``: 'int', 'number' (int or float, always finite), 'bool', 'str' (non-empty),
    'list', 'mapping', or 'words': a list, or the command line's space-separated string
    (``kedro run --params`` splits on commas, so ``compare.seeds="0 1 2"``), or a single value.
    Bounds are inclusive (``low``, ``high``) or exclusive (``above``); ``items`` is the rule
    of every element of a list, ``fields`` the rules of a mapping's keys (any other key is
    refused).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] = ()
    items: Rule | None = None
    fields: Mapping[str, Rule] | None = None
    optional: bool = False
    nullable: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        text = {
            "int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a non-empty string",
            "list": "a list", "mapping": "a mapping", "words": "a list (or a space-separated string)",
        }[self.kind]  # fmt: skip
        if self.low is not None and self.high is not None:
            text += f" in [{self.low}, {self.high}]"
        elif self.above is not None and self.high is not None:
            text += f" in ({self.above}, {self.high}]"
        elif self.low is not None:
            text += f" >= {self.low}"
        elif self.above is not None:
            text += f" > {self.above}"
        if self.items is not None:
            text += f" whose items are each {self.items.describe()}"
        return text + (", or null" if self.nullable else "")

    def check(self, path: str, value: Any) -> None:
        """Raise a ConfigurationError naming ``path`` unless ``value`` is acceptable."""
        if value is None:
            if self.nullable:
                return
            raise ConfigurationError(f"`{path}` must be {self.describe()}, got null.")
        if not self._has_kind(value) or (self.choices and value not in self.choices):
            raise ConfigurationError(f"`{path}` must be {self.describe()}, got {value!r}.")
        if self.kind in ("int", "number") and not self._in_range(value):
            raise ConfigurationError(f"`{path}` must be {self.describe()}, got {value!r}.")
        if self.items is not None:
            for position, item in enumerate(_elements(value)):
                self.items.check(f"{path}[{position}]", item)
        if self.fields is not None:
            check_block(value, self.fields, path)

    def _has_kind(self, value: Any) -> bool:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": numeric and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str) and bool(value.strip()),
            "list": isinstance(value, (list, tuple)),
            "mapping": isinstance(value, Mapping),
            "words": isinstance(value, (list, tuple, str)) or numeric,
        }[self.kind]

    def _in_range(self, value: float) -> bool:
        return (
            (self.low is None or value >= self.low)
            and (self.high is None or value <= self.high)
            and (self.above is None or value > self.above)
        )


def _elements(value: Any) -> list[Any]:
    """A list's items; a command-line string's words (as numbers where they read as one)."""
    if isinstance(value, str):
        return [_number_or_word(word) for word in value.split()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _number_or_word(word: str) -> int | float | str:
    for convert in (int, float):
        try:
            return convert(word)
        except ValueError:
            pass
    return word


def check_block(values: Any, rules: Mapping[str, Rule], path: str) -> None:
    """``values`` must be a mapping holding only the keys of ``rules``, each acceptable."""
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"`{path}` must be a mapping with the keys {', '.join(rules)}, got {values!r}.")
    reject_unknown_keys(values, list(rules), path)
    for key, rule in rules.items():
        if key in values:
            rule.check(f"{path}.{key}", values[key])
        elif not rule.optional:
            raise ConfigurationError(f"`{path}.{key}` is missing: add it ({rule.describe()}).")


def rules_of(config_class: type) -> dict[str, Rule]:
    """A type Rule per field of a config dataclass, read from its annotation.

    The configs check their ranges with comparisons and ``float(...)``, which meet a string
    or a list with a bare TypeError or ValueError; these rules turn that into a message
    naming the key.
    """
    kinds = {"int": "int", "float": "number", "bool": "bool", "str": "str"}
    rules = {}
    for field in dataclasses.fields(config_class):
        annotation = str(field.type)
        nullable = annotation.endswith("| None")
        base = annotation.removesuffix("| None").strip()
        if base in kinds:
            rule = Rule(kinds[base], optional=True, nullable=nullable)
        elif base.startswith(("Mapping", "dict")):
            rule = Rule("mapping", optional=True, nullable=nullable)
        elif base.startswith(("tuple[int", "list[int")):
            rule = Rule("list", items=Rule("int"), optional=True, nullable=nullable)
        else:
            continue
        rules[field.name] = rule
    return rules


def check_types(values: Mapping[str, Any], rules: Mapping[str, Rule], path: str) -> None:
    """Check the keys of ``values`` that ``rules`` know; unknown keys are the config's to refuse."""
    for key, rule in rules.items():
        if key in values:
            rule.check(f"{path}.{key}", values[key])


_MODEL_OPTION = (Rule("int", low=1), Rule("number", above=0), Rule("str"), Rule("list", items=Rule("int", low=1)))


def check_model_options(options: Any, path: str) -> None:
    """Model options are sizes (``feature_dim``), lists of sizes (``widths``), names (``norm``) or
    positive scales (the flow generator's ``guidance``);
    which ones a model takes is checked by building it."""
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"`{path}` must be a mapping of model options, got {options!r}.")
    for key, value in options.items():
        if not any(_accepts(rule, value) for rule in _MODEL_OPTION):
            raise ConfigurationError(f"`{path}.{key}` must be a positive number, a list of positive integers or a name, got {value!r}.")


def _accepts(rule: Rule, value: Any) -> bool:
    try:
        rule.check("", value)
    except ConfigurationError:
        return False
    return True


def _refuse_nan(tree: Any, path: str) -> None:
    """No parameter of a method is NaN: every comparison with NaN is false, so a range check
    written as ``if x < 0: raise`` lets it through. (Infinity is each config's to judge: FedMIC's
    ``max_adaptive_weight: .inf`` means no cap.) The configs turn numeric strings into
    numbers, so "nan" counts too."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            _refuse_nan(value, f"{path}.{key}")
        return
    number = _number_or_word(tree) if isinstance(tree, str) else tree
    if isinstance(number, float) and math.isnan(number):
        raise ConfigurationError(f"`{path}` must be a number, got {tree!r}.")


# ---- the training block and the algorithm parameters ------------------------------------------

_SIMULATION_RULES = rules_of(SimulationConfig)


@dataclass(frozen=True)
class TrainingConfig:
    """``params:training``: which method, how the federation runs, checkpoints and resume.

    ``resume``: 'true' (continue the checkpoint, fail if there is none), 'auto' (continue
    if there is one) or 'false' (start afresh, overwriting one). ``checkpoint_path`` is
    ``<checkpoint_dir>/<algorithm>-seed<seed>.pt`` (None without a checkpoint_dir).
    """

    algorithm: str
    simulation: SimulationConfig
    extra_training_data: str = "none"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    resume: str = "false"
    #: Server pretraining on the synthetic pool before round 1 (``core/pretraining.py``);
    #: None = off. ``pretraining.enabled: auto`` turns it on with the synthetic sets (FedSSG).
    pretraining: PretrainingConfig | None = None

    #: The block's own keys; every other key must be a ``SimulationConfig`` field.
    OWN_KEYS = ("algorithm", "extra_training_data", "checkpoint_dir", "checkpoint_every", "resume", "pretraining")

    @classmethod
    def from_params(cls, training: Mapping[str, Any]) -> TrainingConfig:
        if not isinstance(training, Mapping):
            raise ConfigurationError(f"The `training` block must be a mapping of its keys, got {training!r}.")
        unknown = sorted(set(training) - set(_SIMULATION_KEYS) - set(cls.OWN_KEYS))
        if unknown:
            valid = ", ".join(sorted((*_SIMULATION_KEYS, *cls.OWN_KEYS)))
            raise ConfigurationError(f"Unknown key(s) {unknown} in the `training` block; valid keys: {valid}.")
        check_types(training, _SIMULATION_RULES, "training")
        Rule("str", nullable=True).check("training.checkpoint_dir", training.get("checkpoint_dir"))
        algorithm = str(training.get("algorithm", "fedavg"))
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"Unknown algorithm '{algorithm}'. Valid algorithms: {', '.join(sorted(ALGORITHMS))} (training.algorithm)."
            )
        extra = str(training.get("extra_training_data", "none"))
        if extra not in EXTRA_TRAINING_DATA:
            raise ConfigurationError(
                f"training.extra_training_data must be one of {', '.join(EXTRA_TRAINING_DATA)}, got '{extra}'."
            )
        every = 0 if training.get("checkpoint_every") is None else training["checkpoint_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigurationError(f"training.checkpoint_every must be an integer >= 0 (0 = never), got {every!r}.")
        resume = _RESUME.get(str(training.get("resume", False)).strip().lower())
        if resume is None:
            raise ConfigurationError(f"training.resume must be true, false or auto, got {training.get('resume')!r}.")
        directory = training.get("checkpoint_dir")
        if not directory and resume == "true":
            raise ConfigurationError("training.resume is true but training.checkpoint_dir is empty: nothing to resume from.")
        try:
            simulation = SimulationConfig(**{key: training[key] for key in _SIMULATION_KEYS if key in training})
        except ConfigurationError as exc:
            raise ConfigurationError(f"In the `training` block: {exc}") from None
        pretraining = _pretraining(training.get("pretraining"), extra)
        return cls(algorithm, simulation, extra, Path(directory) if directory else None, every, resume, pretraining)

    @property
    def seed(self) -> int:
        return self.simulation.seed

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / f"{self.algorithm}-seed{self.seed}.pt"


def _pretraining(block: Any, extra_training_data: str) -> PretrainingConfig | None:
    """``training.pretraining``: {enabled: auto | true | false, epochs, lr, momentum, batch_size,
    weight_decay}; auto = on exactly when the hospitals train with the synthetic sets."""
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise ConfigurationError(f"training.pretraining must be a mapping (enabled, epochs, lr, ...), got {block!r}.")
    fields = [f.name for f in dataclasses.fields(PretrainingConfig)]
    unknown = sorted(set(block) - {"enabled", *fields})
    if unknown:
        raise ConfigurationError(f"Unknown key(s) {unknown} in training.pretraining; valid keys: enabled, {', '.join(fields)}.")
    enabled = _RESUME.get(str(block.get("enabled", "auto")).strip().lower())
    if enabled is None:
        raise ConfigurationError(f"training.pretraining.enabled must be true, false or auto, got {block.get('enabled')!r}.")
    config = PretrainingConfig(**{key: block[key] for key in fields if key in block})  # checked even when off
    if enabled == "false" or (enabled == "auto" and extra_training_data != "synthetic"):
        return None
    return config


def algorithm_params_for(name: str, algorithm_params: Mapping[str, Any]) -> dict[str, Any]:
    """``algorithm_params.common`` merged with the method's own block (the method's values win)."""
    if name not in ALGORITHMS:
        raise ConfigurationError(f"Unknown algorithm '{name}'. Valid algorithms: {', '.join(sorted(ALGORITHMS))}.")
    for block in ("common", name):
        value = algorithm_params.get(block)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigurationError(f"algorithm_params.{block} must be a mapping, got {value!r}.")
    return {**dict(algorithm_params.get("common") or {}), **dict(algorithm_params.get(name) or {})}


def read_algorithm_params(path: Path, name: str) -> dict[str, Any]:
    """``algorithm_params_for(name, ...)`` of the ``algorithm_params`` block of a YAML file."""
    import yaml

    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    blocks = document.get("algorithm_params", {}) if isinstance(document, dict) else None
    if not isinstance(blocks, Mapping):
        raise ConfigurationError(f"{path}: 'algorithm_params' must be a mapping.")
    try:
        return algorithm_params_for(name, blocks)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None


def _check_algorithm_params(algorithm_params: Any, parameters: Mapping[str, Any]) -> None:
    """Every method's merged parameters build its algorithm, so a typo in any method's block
    fails now, not when a comparison reaches that method hours later. The stand-in DataSpec
    (one channel, two classes, 28 px) only sizes the models; the weights are thrown away and
    the global RNG is left as it was."""
    import torch

    if not isinstance(algorithm_params, Mapping):
        raise ConfigurationError(f"`algorithm_params` must be a mapping of `common` and method blocks, got {algorithm_params!r}.")
    reject_unknown_keys(algorithm_params, ["common", *sorted(ALGORITHMS)], "algorithm_params")
    _refuse_nan(algorithm_params, "algorithm_params")
    for block, values in algorithm_params.items():
        for options in ("model_options", "teacher_options"):
            if isinstance(values, Mapping) and values.get(options) is not None:
                check_model_options(values[options], f"algorithm_params.{block}.{options}")
    stand_in = DataSpec(in_channels=1, num_classes=2, image_size=28)
    for name in sorted(ALGORITHMS):
        try:
            with torch.random.fork_rng(devices=[]):
                build_algorithm(name, algorithm_params_for(name, algorithm_params), stand_in)
        except ConfigurationError as exc:
            raise ConfigurationError(f"`algorithm_params.common` overlaid with `algorithm_params.{name}`: {exc}") from None


# ---- the blocks read as plain dicts -------------------------------------------------------------

_METHODS = Rule("words", items=Rule("str", choices=tuple(sorted(ALGORITHMS))))
_SEEDS = Rule("words", items=Rule("int", low=0))
_LAMBDAS = Rule("words", items=Rule("number", above=0))
_JOIN_RATIOS = Rule("words", items=Rule("number", above=0, high=1), optional=True, nullable=True)
_SCENARIO = Rule("mapping", fields={
    "methods": dataclasses.replace(_METHODS, optional=True), "lambdas": dataclasses.replace(_LAMBDAS, optional=True),
    "join_ratios": _JOIN_RATIOS, "seeds": dataclasses.replace(_SEEDS, optional=True),
})  # fmt: skip

EVALUATION_RULES = {
    "n_bootstrap": Rule("int", low=0),
    "seed": Rule("int", low=0),
    "batch_size": Rule("int", low=1, optional=True),
}
COMPARE_RULES = {
    "methods": _METHODS,
    "lambdas": _LAMBDAS,
    "join_ratios": _JOIN_RATIOS,
    "seeds": _SEEDS,
    "scenarios": Rule("list", items=_SCENARIO, optional=True, nullable=True),
    "n_bootstrap": Rule("int", low=0, optional=True),
    "cache_dir": Rule("str", optional=True, nullable=True),
    "training_overrides": Rule("mapping", optional=True),
}
ABLATION_RULES = {
    "dirichlet_lambda": Rule("number", above=0),
    "methods": _METHODS,
    "seeds": _SEEDS,
    "n_bootstrap": Rule("int", low=0, optional=True),
    "training_overrides": Rule("mapping", optional=True),
}
_TEXTS = Rule("list", items=Rule("str"), optional=True)
AUDIT_RULES = {
    "fail_on_tamper": Rule("bool", optional=True),
    "fail_on_missing": Rule("bool", optional=True),
    "mlflow_timeout_s": Rule("number", above=0, optional=True),
    "paths": Rule("mapping", optional=True, fields={
        key: Rule("str", optional=True) for key in (
            "clients", "global_test", "partition_manifest", "synthetic_clients", "models", "dvc_lock", "dvc_cache", "requirements_lock"
        )
    }),
    # the sections the HTML report shows figures in (audit_report.html.j2)
    "plots": Rule("mapping", optional=True, fields={section: _TEXTS for section in ("performance", "data", "synthetic")}),
    "model_card": Rule("mapping", optional=True, fields={
        "intended_use": Rule("str", optional=True), "out_of_scope": Rule("str", optional=True),
        "limitations": _TEXTS, "ethical_considerations": _TEXTS, "caveats": _TEXTS,
    }),
}  # fmt: skip
DATASET_RULES = {
    "name": Rule("str"),
    "size": Rule("int", optional=True),
    "raw_dir": Rule("str"),
    "download": Rule("bool", optional=True),
}
INGESTION_RULES = {
    "verify_md5": Rule("bool", optional=True),
    "pixel_range": Rule("list", items=Rule("int", low=0, high=255)),
    "data_docs_dir": Rule("str", optional=True),
}
DOCS_DIR_RULES = {"docs_dir": Rule("str")}
_SYNTHETIC_EXTRA_RULES = {
    "device": Rule("str", optional=True),
    "cache_dir": Rule("str", optional=True, nullable=True),
    "sampling": Rule("mapping", optional=True, fields={"temperature": Rule("number", above=0, optional=True)}),
    "gate": Rule("mapping", optional=True, fields={"docs_dir": Rule("str", optional=True)}),
    "report": Rule("mapping", optional=True, fields={"grid_examples": Rule("int", low=1, optional=True)}),
}
#: A MedMNIST 2D flag as `dataset.name` spells it (pneumoniamnist, breastmnist, ...).
_DATASET_FLAG = re.compile(r"^[a-z]+mnist$")


Checker = Callable[[Any, Mapping[str, Any]], None]


def _rules_checker(rules: Mapping[str, Rule], block: str) -> Checker:
    def check(values: Any, parameters: Mapping[str, Any]) -> None:
        check_block(values, rules, block)

    return check


def _config_checker(block: str, parse: Callable[[Mapping[str, Any]], Any], error: type[Exception]) -> Checker:
    """A block parsed by its own config class, whose error class it keeps."""

    def check(values: Any, parameters: Mapping[str, Any]) -> None:
        if not isinstance(values, Mapping):
            raise error(f"The `{block}` block must be a mapping of its keys, got {values!r}.")
        parse(values)

    return check


def _check_overrides(overrides: Any, parameters: Mapping[str, Any], path: str) -> None:
    """A sweep's ``training_overrides`` must make a valid ``training`` block with the run's."""
    try:
        TrainingConfig.from_params({**dict(parameters.get("training") or {}), **dict(overrides or {})})
    except ConfigurationError as exc:
        raise ConfigurationError(f"`{path}` overlaid on `training`: {exc}") from None


def _check_compare(compare: Any, parameters: Mapping[str, Any]) -> None:
    if isinstance(compare, Mapping) and isinstance(compare.get("scenarios"), str):
        if compare["scenarios"].strip().lower() in ("", "none", "null"):  # the command line's `compare.scenarios=none`
            compare = {**compare, "scenarios": None}
    check_block(compare, COMPARE_RULES, "compare")
    _check_overrides(compare.get("training_overrides"), parameters, "compare.training_overrides")


def _check_ablation(ablation: Any, parameters: Mapping[str, Any]) -> None:
    check_block(ablation, ABLATION_RULES, "ablation")
    _check_overrides(ablation.get("training_overrides"), parameters, "ablation.training_overrides")


def _check_dataset(dataset: Any, parameters: Mapping[str, Any]) -> None:
    """The flag and size must be a released 2D MedMNIST set (medmnist's own table says)."""
    from fedmic_pipeline.ingestion import dataset_spec

    check_block(dataset, DATASET_RULES, "dataset")
    dataset_spec(dataset["name"], dataset.get("size", 28))


def _check_ingestion(ingestion: Any, parameters: Mapping[str, Any]) -> None:
    check_block(ingestion, INGESTION_RULES, "ingestion")
    pixel_range = ingestion["pixel_range"]
    if len(pixel_range) != 2 or pixel_range[0] > pixel_range[1]:
        raise ConfigurationError(f"`ingestion.pixel_range` must be [low, high] with low <= high, got {pixel_range!r}.")


def _check_min_samples_by_dataset(table: Any, parameters: Mapping[str, Any]) -> None:
    """Dataset flags, each with its floor of ``partition.min_samples_per_client``."""
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"`min_samples_per_client_by_dataset` must map dataset names to integers, got {table!r}.")
    for flag, floor in table.items():
        if not isinstance(flag, str) or not _DATASET_FLAG.match(flag):
            raise ConfigurationError(
                f"`min_samples_per_client_by_dataset` has the key {flag!r}, which is not a MedMNIST 2D dataset name "
                "(lower case, ending in 'mnist', as `dataset.name` spells it)."
            )
        Rule("int", low=0).check(f"min_samples_per_client_by_dataset.{flag}", floor)


def _check_synthetic(synthetic: Any, parameters: Mapping[str, Any]) -> None:
    """The synthetic stage's own check, after a type pass over its typed sub-blocks (whose
    range checks compare and convert values), then the sub-blocks it reads with ``.get``
    and the generator and encoder models built from their options."""
    import torch

    from fedmic_pipeline import synthetic_sets
    from fedmic_pipeline.core.data import resolve_device
    from fedmic_pipeline.core.models import build_model
    from fedmic_pipeline.core.synthesis import GeneratorTrainingConfig, PlanConfig, QualityConfig, build_generator

    if not isinstance(synthetic, Mapping):
        raise ConfigurationError(f"The `synthetic` block must be a mapping of its keys, got {synthetic!r}.")
    typed = {"generator": GeneratorTrainingConfig, "plan": PlanConfig, "quality": QualityConfig}
    for name, config_class in typed.items():
        Rule("mapping", optional=True).check(f"synthetic.{name}", synthetic.get(name, {}))
        check_types(synthetic.get(name, {}), rules_of(config_class), f"synthetic.{name}")
    for name in ("generator", "quality"):
        check_model_options(synthetic.get(name, {}).get("model_options") or {}, f"synthetic.{name}.model_options")
    synthetic_sets._check_params(synthetic)
    check_types(synthetic, _SYNTHETIC_EXTRA_RULES, "synthetic")
    try:
        resolve_device(synthetic.get("device", "cpu"))
    except ConfigurationError as exc:
        raise ConfigurationError(f"`synthetic.device`: {exc}") from None
    stand_in = DataSpec(in_channels=1, num_classes=2, image_size=28)
    models = {
        "generator": lambda options: build_generator(stand_in, 2, seed=0, **options),
        "quality": lambda options: build_model("student_cnn", stand_in, seed=0, **options),
    }
    for name, build in models.items():
        try:
            with torch.random.fork_rng(devices=[]):
                build(synthetic.get(name, {}).get("model_options") or {})
        except ConfigurationError as exc:
            raise ConfigurationError(f"`synthetic.{name}.model_options`: {exc}") from None


# ---- every block, and which a pipeline reads ------------------------------------------------

_TRAINING_FILE = "conf/base/parameters_federated_training.yml"
_AUDIT_FILE = "conf/base/parameters_audit.yml"
_INGESTION_FILE = "conf/base/parameters_data_ingestion.yml"
_PARTITION_FILE = "conf/base/parameters_data_partition.yml"

#: Every parameter block: the file that defines it and its check. A block missing here is
#: refused as unknown, so a new block must be added with its check.
PARAMETER_BLOCKS: dict[str, tuple[str, Checker]] = {
    "training": (_TRAINING_FILE, _config_checker("training", TrainingConfig.from_params, ConfigurationError)),
    "algorithm_params": (_TRAINING_FILE, _check_algorithm_params),
    "evaluation": (_TRAINING_FILE, _rules_checker(EVALUATION_RULES, "evaluation")),
    "promotion": (_AUDIT_FILE, _config_checker("promotion", PromotionRule.from_params, PromotionConfigError)),
    "audit": (_AUDIT_FILE, _rules_checker(AUDIT_RULES, "audit")),
    "compare": ("conf/base/parameters_compare.yml", _check_compare),
    "ablation": ("conf/base/parameters_ablation.yml", _check_ablation),
    "dataset": (_INGESTION_FILE, _check_dataset),
    "ingestion": (_INGESTION_FILE, _check_ingestion),
    "partition": (_PARTITION_FILE, _config_checker("partition", PartitionConfig.from_params, PartitionError)),
    "min_samples_per_client_by_dataset": (_PARTITION_FILE, _check_min_samples_by_dataset),
    "partition_gate": (_PARTITION_FILE, _rules_checker(DOCS_DIR_RULES, "partition_gate")),
    "devices": (_PARTITION_FILE, _config_checker("devices", DevicesConfig.from_params, DeviceConfigError)),
    "synthetic": ("conf/base/parameters_synthetic_generation.yml", _check_synthetic),
}
#: Blocks that no node reads but that feed a block that one does (through an interpolation).
_FEEDS = {"partition": ("min_samples_per_client_by_dataset",)}


def blocks_read_by(input_names: Iterable[str]) -> set[str]:
    """The parameter blocks behind a pipeline's inputs (``params:training``, ``params:training.seed``;
    ``parameters`` is all of them), with the blocks that feed them."""
    blocks: set[str] = set()
    for name in input_names:
        if name == "parameters":
            blocks.update(PARAMETER_BLOCKS)
        elif name.startswith("params:"):
            block = name.removeprefix("params:").split(".", 1)[0]
            blocks.update((block, *_FEEDS.get(block, ())))
    return blocks


def validate_parameters(parameters: Mapping[str, Any], blocks: Iterable[str] | None = None) -> None:
    """Refuse unknown blocks, then check ``blocks`` (all present ones when None).

    Raises the checker's own error class (one of ``PARAMETER_ERRORS``) with one paragraph:
    which block, in which file, what is wrong with which key, and where to fix it.
    """
    unknown = sorted(set(parameters) - set(PARAMETER_BLOCKS))
    if unknown:
        raise ConfigurationError(
            f"Unknown parameter block(s) {unknown}: nothing reads them, so their values would be silently ignored "
            f"(a misspelt `--params` block such as `trainig.num_rounds=1` lands here). Valid blocks: "
            f"{', '.join(PARAMETER_BLOCKS)}. Fix the name in conf/ or on the command line."
        )
    wanted = set(PARAMETER_BLOCKS if blocks is None else blocks)
    for block, (file, check) in PARAMETER_BLOCKS.items():  # `training` before the sweeps that overlay it
        if block not in wanted or block not in parameters:
            continue
        try:
            check(parameters[block], parameters)
        except PARAMETER_ERRORS as exc:
            detail = " ".join(str(exc).split())
            raise type(exc)(
                f"Invalid `{block}` parameter ({file}): {detail} Fix it in that file, or on the command line "
                f"(`kedro run --params {block}.<key>=<value>`)."
            ) from exc
